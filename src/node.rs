//! A Godel node: the Raft instance, its storage and transport, the write
//! pipeline (batching, forwarding to the leader) and linearizable reads.
//!
//! # Writes
//!
//! Every mutation is an [`fsm::Command`] handed to [`Node::write`]. Commands
//! wait in one bounded queue ([`QueueConfig::max_queued_commands`]; past it
//! the caller gets [`NodeError::Overloaded`]); the proposer drains up to
//! `batch_max_commands` at a time. On the leader a batch becomes one Raft
//! entry, stamped with the leader's clock and a jitter seed; on a follower it
//! is forwarded, whole, to the leader, whose own queue takes the commands, so
//! every write in the cluster shares the leader's one batching pipeline. There
//! is no artificial wait: a lone write goes at once, and writes that arrive
//! while a proposal is in flight share the next one. openraft 0.9 spends one
//! fsync per entry, so fewer, bigger entries win: `max_inflight_batches`
//! defaults to 1 (BENCHMARKS.md has the measurements). A write reports
//! success only after its entry is committed (fsynced on a majority) and
//! applied; each command of a batch gets its own result.
//!
//! # Failing fast without a quorum
//!
//! A leader that has not heard from a quorum for longer than the election
//! timeout refuses writes at once; a node that knows no leader refuses at
//! once; everything else is bounded by `write_timeout`. All of these are
//! [`NodeError::Unavailable`] (503 with `Retry-After`): the outcome of a
//! timed-out write is unknown, so clients retry with an idempotency key.
//!
//! # Reads
//!
//! [`Node::read_barrier`] makes the next local read linearizable: the leader
//! confirms its leadership with a quorum round (ReadIndex); a follower asks the
//! leader for that index and waits until it has applied it.

mod contact;
mod drain;
mod group;
mod membership;
mod placer;
mod prevote;
mod proposer;
mod queue;
mod server;
mod shards;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use group::{Group, GroupStatus};
pub use membership::MemberStatus;
pub(crate) use membership::load_secret as cluster_secret;

use crate::config::{Config, QueueConfig};
use crate::fsm;
use crate::raft::rpc::{RemoteFailure, RpcReply, RpcRequest};
use crate::raft::{GroupId, META_GROUP, NodeId, NodeInfo, Raft};
use crate::store::SharedState;
use crate::transport;
use crate::{codec, store};

/// Errors of the node layer; each knows its API code.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NodeError {
    /// No leader, no quorum, or no answer in time. Retry later.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// Too many writes waiting. Retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The request was refused as invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A local failure (storage, encoding).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<NodeError> for RemoteFailure {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Invalid(m) => RemoteFailure::Invalid(m),
            NodeError::Unavailable(m) | NodeError::Overloaded(m) | NodeError::Internal(m) => {
                RemoteFailure::Unavailable(m)
            }
        }
    }
}

impl From<RemoteFailure> for NodeError {
    fn from(f: RemoteFailure) -> Self {
        match f {
            RemoteFailure::Invalid(m) => NodeError::Invalid(m),
            RemoteFailure::Unavailable(m) => NodeError::Unavailable(m),
            RemoteFailure::NotLeader { leader } => NodeError::Unavailable(format!(
                "leadership is changing (last known leader: {leader:?})"
            )),
        }
    }
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    info: NodeInfo,
    config: Config,
    /// The meta group: membership, the registry, tenants and keys, and,
    /// with one shard, the queue.
    meta: Group,
    /// The queue shards' groups, `1..=cluster.shards`, when there is more
    /// than one shard (`docs/shards.md`).
    shards: Vec<Group>,
    /// The groups that hold tasks: the shards, or the meta group alone.
    queue: Vec<Group>,
    client: transport::Client,
    /// Calls to other nodes' HTTP APIs (bootstrap probe, join, transfer relay).
    peer_api: crate::api::peers::PeerApi,
    /// Peers this node's transport is cut off from (fault injection).
    faults: transport::Faults,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// The supervision tree of this node's actors (taken at stop).
    actors: std::sync::Mutex<Option<crate::actors::NodeSupervisor>>,
    /// The agent actors running here (for lease hints and fault injection).
    agents: crate::actors::AgentDirectory,
    /// The actor fabric, when enabled and started (taken at stop).
    fabric: std::sync::Mutex<Option<crate::fabric::Fabric>>,
    /// When this node's last committed heartbeat was sent.
    contact: contact::Contact,
    /// Held, on the meta leader, by a change of the meta group's voters and
    /// by the step that proposes a shard growth, which records the voters
    /// the added groups start with: no change of them runs while it is
    /// proposed, nor until the added shards' route opens
    /// (`node/shards.rs`).
    membership: tokio::sync::Mutex<()>,
}

impl Node {
    /// Opens storage, starts Raft, the transport server, the proposer and the
    /// timer loop, and bootstraps or joins the cluster.
    pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Node> {
        // Bad TLS files stop the node before it opens anything: an operator
        // who asked for an encrypted transport or fabric never gets a clear
        // one.
        let fabric_tls = match (&config.fabric.tls, config.fabric.enabled) {
            (Some(tls), true) => Some(crate::fabric::FabricTlsConfig::load(tls)?),
            _ => None,
        };
        let cluster_tls = match &config.cluster.tls {
            Some(tls) => Some(crate::tls::MutualTls::load(tls, "cluster.tls")?),
            None => None,
        };
        let peer_api = crate::api::peers::PeerApi::new(&config)?;
        let secret = transport::Secret::new(membership::load_secret(&config)?);
        let dir = config.node.data_dir.join("raft");
        let ids = group_ids(config.cluster.shards);
        let stores =
            tokio::task::spawn_blocking(move || store::Store::open_groups(&dir, &ids)).await??;
        let mut tcfg = transport::TransportConfig::new(config.node.id, secret.clone());
        tcfg.tls = cluster_tls;
        let faults = transport::Faults::default();
        let client = transport::Client::new(tcfg.clone(), faults.clone())?;
        let raft_config = Arc::new(raft_config(&config)?);
        let mut groups = Vec::with_capacity(stores.len());
        let mut receivers = Vec::with_capacity(stores.len());
        let count = stores.len() as u32;
        for (i, (g, log_store, sm)) in stores.into_iter().enumerate() {
            if i > 0 {
                // Groups started together tick together (openraft issue
                // 1959): spread their timers over one heartbeat interval.
                tokio::time::sleep(config.raft.heartbeat_interval / count).await;
            }
            let state = sm.shared();
            let network =
                crate::raft::network::Network::for_group(client.clone(), config.node.id, g);
            let raft =
                Raft::new(config.node.id, raft_config.clone(), network, log_store, sm).await?;
            let (queue, queue_rx) = proposer::Queue::new(config.queue.max_queued_commands);
            groups.push(Group::new(g, config.node.id, raft, state, queue));
            receivers.push(queue_rx);
        }
        let meta = groups.remove(0);
        shards::check_count(&config, meta.state())?;
        let queue = if groups.is_empty() {
            vec![meta.clone()]
        } else {
            groups.clone()
        };
        let info = NodeInfo {
            raft_addr: config.node.raft_addr.to_string(),
            api_addr: config.node.api_addr.to_string(),
            region: config.node.region.clone(),
        };
        let node = Node {
            inner: Arc::new(Inner {
                id: config.node.id,
                info,
                config,
                meta,
                shards: groups,
                queue,
                client,
                peer_api,
                faults: faults.clone(),
                tasks: TaskTracker::new(),
                shutdown,
                actors: std::sync::Mutex::new(None),
                agents: crate::actors::AgentDirectory::default(),
                fabric: std::sync::Mutex::new(None),
                contact: contact::Contact::default(),
                membership: tokio::sync::Mutex::new(()),
            }),
        };
        let listener = tokio::net::TcpListener::bind(node.inner.config.node.raft_addr).await?;
        let handler = Arc::new(server::RpcHandler { node: node.clone() });
        let token = node.inner.shutdown.clone();
        node.spawn(async move {
            if let Err(e) = transport::serve(listener, tcfg, faults, handler, token).await {
                tracing::error!(error = %e, "node-to-node transport stopped");
            }
        });
        for (group, rx) in node.groups().zip(receivers) {
            node.spawn(proposer::run(node.clone(), group.clone(), rx));
        }
        // The meta group's timers; a queue shard's are its keeper actor's,
        // on the node that leads it (`actors/keeper.rs`).
        node.spawn(proposer::tick_loop(node.clone(), node.meta().clone()));
        node.spawn(proposer::heartbeat_loop(node.clone()));
        node.spawn(drain::drain_loop(node.clone()));
        node.spawn(placer::placement_loop(node.clone()));
        for group in node.groups() {
            node.spawn(observe_events(node.clone(), group.state().clone()));
            node.spawn(snapshot_by_commands(node.clone(), group.clone()));
        }
        membership::bootstrap(&node).await?;
        node.spawn(shards::shard_loop(node.clone()));
        node.spawn(prevote::gate_loop(node.clone()));
        node.start_actors().await?;
        node.start_fabric(&secret, fabric_tls).await;
        Ok(node)
    }

    /// Spawns a background task owned by the node: it is awaited at shutdown.
    pub(crate) fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.inner.tasks.spawn(fut);
    }

    /// Starts the supervision tree and the reconciler that keeps an agent
    /// actor for each agent of the gateways placed here.
    async fn start_actors(&self) -> anyhow::Result<()> {
        let (observer, mut events) = crate::actors::Observer::channel(1024);
        let policy = crate::actors::RestartPolicy::default();
        let tree = crate::actors::NodeSupervisor::start(policy.clone(), observer.clone()).await?;
        if self.inner.config.fabric.enabled {
            crate::fabric::start_hints(self, tree.root()).await?;
        }
        let directory = self.inner.agents.clone();
        for group in self.hosted_queue_groups() {
            let router =
                crate::actors::route_leases(self.clone(), group.clone(), directory.clone());
            self.spawn(router);
        }
        self.spawn(crate::actors::reconcile_loop(
            self.clone(),
            tree.root().clone(),
            directory,
            policy,
            observer,
        ));
        let shutdown = self.inner.shutdown.clone();
        // The observer already logs and counts each event; drain the channel.
        self.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    e = events.recv() => if e.is_none() { break },
                }
            }
        });
        *self
            .inner
            .actors
            .lock()
            .expect("invariant: the actors lock is never poisoned") = Some(tree);
        Ok(())
    }

    /// Joins the actor fabric if it is enabled. A fabric that cannot start
    /// (its port taken, say) leaves the node running without lease hints.
    async fn start_fabric(
        &self,
        secret: &transport::Secret,
        tls: Option<crate::fabric::FabricTlsConfig>,
    ) {
        if !self.inner.config.fabric.enabled {
            tracing::info!("fabric disabled: agents learn of leases from their replica only");
            return;
        }
        match crate::fabric::Fabric::start(self, secret, tls).await {
            Ok(f) => {
                *self
                    .inner
                    .fabric
                    .lock()
                    .expect("invariant: the fabric lock is never poisoned") = Some(f);
            }
            Err(e) => {
                tracing::warn!(error = %e, "fabric not started; this node runs without lease hints");
            }
        }
    }

    /// Stops Raft and waits (bounded) for the node's background tasks.
    pub async fn stop(&self, deadline: Duration) {
        self.inner.shutdown.cancel();
        let fabric = self
            .inner
            .fabric
            .lock()
            .expect("invariant: the fabric lock is never poisoned")
            .take();
        if let Some(f) = fabric {
            f.stop();
        }
        let tree = self
            .inner
            .actors
            .lock()
            .expect("invariant: the actors lock is never poisoned")
            .take();
        if let Some(tree) = tree
            && let Err(e) = tree.stop(deadline).await
        {
            tracing::warn!(error = %e, "actor tree did not stop cleanly");
        }
        self.inner.tasks.close();
        for group in self.groups() {
            if let Err(e) = group.raft().shutdown().await {
                tracing::warn!(group = group.id(), error = %e, "raft shutdown");
            }
        }
        if tokio::time::timeout(deadline, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?deadline,
                "background tasks still running at shutdown deadline"
            );
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This node's addresses and region.
    pub fn info(&self) -> &NodeInfo {
        &self.inner.info
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The client for other nodes' HTTP APIs.
    pub fn peer_api(&self) -> &crate::api::peers::PeerApi {
        &self.inner.peer_api
    }

    /// The meta group's Raft handle (metrics, membership).
    pub fn raft(&self) -> &Raft {
        self.inner.meta.raft()
    }

    /// The local replica of the meta group's state machine.
    pub fn state(&self) -> &SharedState {
        self.inner.meta.state()
    }

    /// Task `task`'s payload (JSON object text): the state's copy, or
    /// the one its shard's store keeps on this node.
    pub fn payload_of(&self, task: &fsm::Task) -> Result<Arc<str>, NodeError> {
        if let Some(text) = task.payload.held() {
            return Ok(Arc::from(text));
        }
        let group = self.queue_group_of(task.id.0)?;
        group.state().payload(task).map_err(|e| {
            tracing::error!(task = %task.id, error = %e, "a task's payload is not readable");
            NodeError::Internal(format!("task {}'s payload: {e}", task.id))
        })
    }

    /// The meta group.
    pub fn meta(&self) -> &Group {
        &self.inner.meta
    }

    /// The queue shards' groups (empty with one shard: the meta group is it).
    pub fn shard_groups(&self) -> &[Group] {
        &self.inner.shards
    }

    /// The groups that hold tasks, leases and sessions: the queue shards
    /// some routing epoch has routed to (a shard being added is not one
    /// until the meta group opens an epoch over it), or the meta group when
    /// the cluster has one shard.
    pub fn queue_groups(&self) -> &[Group] {
        let all = &self.inner.queue;
        if self.inner.shards.is_empty() {
            return all;
        }
        let routed = self.inner.meta.state().read(|s| s.routes().last().copied());
        let n = routed.map_or(all.len(), |n| (n as usize).min(all.len()));
        &all[..n]
    }

    /// Every group this node hosts that holds or will hold tasks: the
    /// queue groups and any shard being added.
    pub fn hosted_queue_groups(&self) -> &[Group] {
        &self.inner.queue
    }

    /// The group that holds task, lease or session `id` (ids carry their
    /// shard: `fsm::group_of`), or an error: `Invalid` when the id names no
    /// shard of this cluster (no such object, then), `Unavailable` when it
    /// names one this node does not host (a node restarted with fewer
    /// shards than the cluster routes to cannot serve it). Any shard this
    /// node hosts is looked in, routed to or not by its replica of the meta
    /// group: a replica that has not applied the latest `OpenRoute` yet
    /// must still find a task a newer shard minted.
    pub fn queue_group_of(&self, id: u64) -> Result<&Group, NodeError> {
        if self.inner.shards.is_empty() {
            return Ok(&self.inner.meta);
        }
        let hosted = self.inner.queue.len() as u32;
        if let Some(g) = fsm::group_of(id, hosted) {
            return self.group(g).ok_or_else(|| {
                NodeError::Internal(format!("queue shard {g} is hosted but not found"))
            });
        }
        let routed = self.inner.meta.state().read(|s| s.routes().last().copied());
        let g = (id & 0xff) as u32;
        match routed {
            Some(n) if (1..=n).contains(&g) => Err(NodeError::Unavailable(format!(
                "{id} is in queue shard {g}, which this node does not host (it hosts {hosted}): ask another node"
            ))),
            _ => Err(NodeError::Invalid(format!(
                "{id} names no queue shard of this cluster"
            ))),
        }
    }

    /// Commands waiting in this node's write queues (the fullest of the
    /// meta group's and the routed shards'), and the queue's capacity
    /// (`queue.max_queued_commands`): what load shedding looks at.
    pub fn write_backlog(&self) -> (u64, u64) {
        let capacity = self.inner.config.queue.max_queued_commands;
        let free = self
            .routed_groups()
            .map(|g| g.queue().free())
            .min()
            .unwrap_or(capacity);
        ((capacity.saturating_sub(free)) as u64, capacity as u64)
    }

    /// Takes a meta read barrier when this node hosts more shards than its
    /// replica routes to: a shard being added, or an `OpenRoute` that has
    /// not reached this replica yet. After it, [`Node::queue_groups`] names
    /// every shard routed to when the call began.
    pub async fn fresh_routes(&self) -> Result<(), NodeError> {
        if self.queue_groups().len() < self.inner.queue.len() {
            self.read_barrier().await?;
        }
        Ok(())
    }

    /// Where a new task of `tenant` goes (`docs/shards.md`, "Changing the
    /// number of shards"), by this node's replica of the meta group's
    /// routing epochs: the shard the current epoch routes its `key`
    /// (session key, else idempotency key; `fsm::route`) to, or a random
    /// one for a task with neither (nothing to keep together or
    /// deduplicate); and, oldest first, the other shards earlier epochs
    /// routed the key to, which a lookback submission asks first.
    pub fn submission_route(
        &self,
        tenant: &str,
        key: Option<&str>,
    ) -> Result<SubmissionRoute, NodeError> {
        if self.inner.shards.is_empty() {
            return Ok(SubmissionRoute {
                epoch: 1,
                target: META_GROUP,
                lookback: Vec::new(),
            });
        }
        let hosted = self.inner.queue.len() as u32;
        let routes = self.inner.meta.state().read(|s| s.routes().to_vec());
        let Some(&current) = routes.last() else {
            return Err(NodeError::Unavailable(
                "this node's replica of the meta group has no shard map yet (the cluster is starting, or the node is catching up)".into(),
            ));
        };
        // Every node hosts a shard before an epoch opens over it; a node
        // restarted with fewer shards would route differently from the rest.
        if current > hosted {
            return Err(NodeError::Unavailable(format!(
                "the cluster routes over {current} queue shards and this node hosts {hosted}: restart it with cluster.shards = {current}, or submit through another node"
            )));
        }
        let Some(k) = key else {
            return Ok(SubmissionRoute {
                epoch: routes.len() as u32,
                target: 1 + rand::random::<u32>() % current,
                lookback: Vec::new(),
            });
        };
        let target = fsm::route(tenant, k, current);
        let mut lookback: Vec<GroupId> = Vec::new();
        for c in &routes[..routes.len() - 1] {
            let g = fsm::route(tenant, k, *c);
            if g != target && !lookback.contains(&g) {
                lookback.push(g);
            }
        }
        Ok(SubmissionRoute {
            epoch: routes.len() as u32,
            target,
            lookback,
        })
    }

    /// The meta group and the queue shards routed to (not a shard being
    /// added, whose group may have no leader yet), the meta group first.
    pub fn routed_groups(&self) -> impl Iterator<Item = &Group> {
        let shards = if self.inner.shards.is_empty() {
            &[][..]
        } else {
            self.queue_groups()
        };
        std::iter::once(&self.inner.meta).chain(shards)
    }

    /// On `group`'s leader, proposes a tick if a state-machine timer is
    /// due; false when one was due and did not commit.
    pub async fn tick_if_due(&self, group: &Group) -> bool {
        proposer::tick_if_due(self, group).await
    }

    /// The queue shards this node runs a keeper actor for (the ones it
    /// leads, once the runtime reconciler has caught up), from the
    /// supervision tree.
    pub async fn keepers(&self) -> Vec<GroupId> {
        let root = {
            let actors = self.inner.actors.lock().expect("actors lock");
            actors.as_ref().map(|a| a.root().clone())
        };
        let Some(root) = root else {
            return Vec::new();
        };
        crate::actors::keepers_under(&root).await
    }

    /// Every group this node hosts, the meta group first.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        std::iter::once(&self.inner.meta).chain(self.inner.shards.iter())
    }

    /// The group `id`, if this node hosts it.
    pub fn group(&self, id: GroupId) -> Option<&Group> {
        if id == META_GROUP {
            return Some(&self.inner.meta);
        }
        self.inner.shards.iter().find(|g| g.id() == id)
    }

    /// The queue settings.
    pub fn queue_config(&self) -> &QueueConfig {
        &self.inner.config.queue
    }

    /// Cancelled when the node shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The meta group's leader this node knows of, with its addresses.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        self.inner.meta.leader()
    }

    /// The peers this node's transport is cut off from: drills partition a
    /// node through it (`POST /admin/faults/partition`, only with
    /// `runtime.fault_injection = true`). Covers Raft traffic and write and
    /// read-index forwarding, not the actor fabric (lease hints, sent only
    /// for committed leases) nor the HTTP API.
    pub fn faults(&self) -> &transport::Faults {
        &self.inner.faults
    }

    /// The agent actors running on this node.
    pub fn agent_directory(&self) -> &crate::actors::AgentDirectory {
        &self.inner.agents
    }

    /// Whether this node believes it leads the meta group.
    pub fn is_leader(&self) -> bool {
        self.inner.meta.is_leader()
    }

    /// Whether this node counts itself cut off from the majority: no
    /// heartbeat it sent within `node_dead_after` less one heartbeat
    /// interval has committed (see `node/contact.rs`). It then runs no
    /// gateway or agent actors.
    pub fn cut_off(&self) -> bool {
        let q = &self.inner.config.queue;
        let bound = q
            .node_dead_after
            .saturating_sub(q.node_heartbeat_interval)
            .max(q.node_heartbeat_interval);
        self.inner.contact.lost(bound)
    }

    /// Whether this node is in a quorum: it is a leader that heard from a
    /// quorum recently, or a follower/learner with a leader that answers.
    pub async fn in_quorum(&self) -> bool {
        self.read_barrier().await.is_ok()
    }

    /// Proposes one command to the meta group and returns its outcome once
    /// committed and applied.
    pub async fn write(&self, cmd: fsm::Command) -> Result<fsm::Outcome, NodeError> {
        self.write_audited(cmd, None).await
    }

    /// Proposes one command to group `group` (through its leader, like
    /// [`Node::write`]) and returns its outcome once committed and applied.
    pub async fn write_to(
        &self,
        group: GroupId,
        cmd: fsm::Command,
    ) -> Result<fsm::Outcome, NodeError> {
        let g = self.hosted(group)?;
        self.write_in(g, fsm::Write::from(cmd)).await
    }

    /// The group `id`, or an error naming what this node hosts.
    fn hosted(&self, id: GroupId) -> Result<&Group, NodeError> {
        self.group(id).ok_or_else(|| {
            NodeError::Invalid(format!(
                "no Raft group {id} on this node (it hosts 0..={})",
                self.inner.shards.len()
            ))
        })
    }

    /// Proposes one command asked for by an API caller (`audit`): applying
    /// it appends its audit entry, and a scoped one touches only the
    /// caller's tenant. Returns its outcome once committed and applied.
    pub async fn write_audited(
        &self,
        command: fsm::Command,
        audit: Option<fsm::Audit>,
    ) -> Result<fsm::Outcome, NodeError> {
        self.write_in(&self.inner.meta, fsm::Write { command, audit })
            .await
    }

    /// [`Node::write_audited`] to group `group` (a queue shard's commands
    /// are audited in that shard's chain).
    pub async fn write_audited_in(
        &self,
        group: &Group,
        command: fsm::Command,
        audit: Option<fsm::Audit>,
    ) -> Result<fsm::Outcome, NodeError> {
        self.write_in(group, fsm::Write { command, audit }).await
    }

    async fn write_in(&self, group: &Group, write: fsm::Write) -> Result<fsm::Outcome, NodeError> {
        let mut each = self.write_many_in(group, vec![write]).await?;
        each.pop()
            .unwrap_or_else(|| Err(NodeError::Internal("no result for a write".into())))
    }

    /// Proposes `writes` to `group` together: they go into one Raft entry
    /// (bigger batches join theirs up to `queue.batch_max_commands`), in
    /// order, each with its own outcome. `Err` when none was queued (the
    /// write queue has no room for all of them, or the node is stopping);
    /// a write that did not commit in time fails alone in the list.
    pub async fn write_many_in(
        &self,
        group: &Group,
        writes: Vec<fsm::Write>,
    ) -> Result<Vec<Result<fsm::Outcome, NodeError>>, NodeError> {
        let n = writes.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        // A queue shard takes queue commands only once it knows which shard
        // it is: before, it would mint ids without the shard in them, and
        // `DefineGroup` would then be refused for good. Its local replica
        // having applied it means the group committed it first.
        let defines = |w: &fsm::Write| matches!(w.command, fsm::Command::DefineGroup { .. });
        if group.id() != META_GROUP
            && !writes.iter().all(defines)
            && group.state().read(|s| s.group()) == 0
        {
            return Err(NodeError::Unavailable(format!(
                "queue shard {} is not set up yet (its DefineGroup has not applied on this node)",
                group.id()
            )));
        }
        let timeout = self.inner.config.queue.write_timeout;
        let rx = group.queue().push(writes)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(each)) => Ok(each),
            Ok(Err(_)) => Err(NodeError::Unavailable("node is shutting down".into())),
            Err(_) => Ok(vec![
                Err(NodeError::Unavailable(format!(
                    "not committed within {timeout:?}"
                )));
                n
            ]),
        }
    }

    /// Waits until a local read of the meta group sees every write
    /// committed before this call.
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        self.read_barrier_in(&self.inner.meta).await
    }

    /// [`Node::read_barrier`] for group `group`.
    pub async fn read_barrier_of(&self, group: GroupId) -> Result<(), NodeError> {
        self.read_barrier_in(self.hosted(group)?).await
    }

    /// [`Node::read_barrier`] for every group that holds tasks, at once.
    pub async fn read_barrier_queue(&self) -> Result<(), NodeError> {
        self.fresh_routes().await?;
        self.read_barriers(self.queue_groups().iter()).await
    }

    /// [`Node::read_barrier`] for the meta group and every queue shard
    /// routed to, at once.
    pub async fn read_barrier_all(&self) -> Result<(), NodeError> {
        self.fresh_routes().await?;
        self.read_barriers(self.routed_groups()).await
    }

    /// A read barrier on each of `groups`, at once; the first error.
    async fn read_barriers<'a>(
        &self,
        groups: impl Iterator<Item = &'a Group>,
    ) -> Result<(), NodeError> {
        let all = groups.map(|g| self.read_barrier_in(g));
        for r in futures_util::future::join_all(all).await {
            r?;
        }
        Ok(())
    }

    /// A read barrier on `group`. One that finds no leader, or a leader
    /// that has just lost office, waits for the next (at most an election
    /// timeout, twice), as a write does.
    pub(crate) async fn read_barrier_in(&self, group: &Group) -> Result<(), NodeError> {
        let mut tried = None;
        let mut last = RemoteFailure::NotLeader { leader: None };
        for attempt in 0..3 {
            if attempt > 0 {
                let wait = self.inner.config.raft.election_timeout_max;
                let _ = tokio::time::timeout(wait, proposer::new_leader(group, tried)).await;
            }
            tried = group.leader().map(|(id, _)| id);
            match self.read_barrier_once(group).await {
                Err(e @ RemoteFailure::NotLeader { .. }) => last = e,
                other => return other.map_err(NodeError::from),
            }
        }
        Err(last.into())
    }

    async fn read_barrier_once(&self, group: &Group) -> Result<(), RemoteFailure> {
        let timeout = self.inner.config.queue.write_timeout;
        let index = if group.is_leader() {
            self.leader_read_index(group).await?
        } else {
            let (leader, info) = group
                .leader()
                .ok_or(RemoteFailure::NotLeader { leader: None })?;
            let req = RpcRequest::for_group(group.id(), RpcRequest::ReadIndex);
            match self
                .call_peer(leader, &info.raft_addr, req, timeout)
                .await?
            {
                RpcReply::ReadIndex(r) => r?,
                other => {
                    return Err(RemoteFailure::Unavailable(format!(
                        "unexpected reply {other:?}"
                    )));
                }
            }
        };
        group
            .raft()
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| RemoteFailure::Unavailable(format!("not caught up: {e}")))
    }

    /// On the leader: confirm leadership with a quorum and return the index
    /// a linearizable read must wait for: the end of the leader's log, not
    /// only its commit index. openraft 0.9 lets a restarted leader resume
    /// its term with the commit index it had made durable, which can be
    /// behind what it had committed before it stopped (the chaos drills
    /// caught a read missing a committed grant that way); every committed
    /// entry is in the leader's log, so waiting until the whole log has
    /// applied covers them, at the cost of also waiting for the writes in
    /// flight at the time of the read.
    async fn leader_read_index(&self, group: &Group) -> Result<u64, RemoteFailure> {
        let timeout = self.inner.config.queue.write_timeout;
        let last = group.raft().metrics().borrow().last_log_index;
        let fut = group.raft().get_read_log_id();
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok((read, _applied))) => Ok(read.map_or(0, |l| l.index).max(last.unwrap_or(0))),
            Ok(Err(e)) => Err(not_leader_or_unavailable(e)),
            Err(_) => Err(RemoteFailure::Unavailable(format!(
                "no quorum within {timeout:?}"
            ))),
        }
    }

    /// Sends one RPC to a peer and decodes its reply.
    async fn call_peer(
        &self,
        peer: NodeId,
        addr: &str,
        req: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcReply, NodeError> {
        let bytes = codec::encode(&req).map_err(|e| NodeError::Internal(e.to_string()))?;
        let reply = self
            .inner
            .client
            .call(peer, addr, bytes, timeout)
            .await
            .map_err(|e| NodeError::Unavailable(format!("node {peer} at {addr}: {e}")))?;
        codec::decode(&reply)
            .map_err(|e| NodeError::Internal(format!("reply from node {peer}: {e}")))
    }

    /// The meta group's membership (the cluster's): voters, and every
    /// member with its addresses.
    pub fn members(&self) -> (Vec<NodeId>, BTreeMap<NodeId, NodeInfo>) {
        self.inner.meta.members()
    }
}

/// Turns every applied event of a group into its log line and metrics.
async fn observe_events(node: Node, state: SharedState) {
    let mut rx = state.subscribe();
    let shutdown = node.shutdown_token().clone();
    loop {
        let applied = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = rx.recv() => r,
        };
        match applied {
            Ok(a) => crate::metrics::observe(&a.events),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    skipped = n,
                    "event observer lagged; some task events were not counted"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Asks `group`'s Raft for a snapshot once `raft.snapshot_every_commands`
/// commands have applied since the last one, as openraft's own policy
/// does after `raft.snapshot_every_entries` entries: entries of a thousand
/// tasks would otherwise leave millions of commands for a restart to
/// apply again. Checked every second; a request while a build runs is
/// ignored by openraft, and the count restarts at each build's view.
async fn snapshot_by_commands(node: Node, group: Group) {
    let every = node.inner.config.raft.snapshot_every_commands;
    let shutdown = node.shutdown_token().clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let since = group.state().commands_since_snapshot();
        if since < every {
            continue;
        }
        tracing::debug!(
            group = group.id(),
            commands = since,
            "snapshot asked for by command count"
        );
        if let Err(e) = group.raft().trigger().snapshot().await {
            // Raft has stopped (shutdown or a fatal storage error, logged
            // where it happened).
            tracing::debug!(group = group.id(), error = %e, "snapshot trigger refused");
            break;
        }
    }
}

/// Maps a leadership-check error to "not leader" or "unavailable".
fn not_leader_or_unavailable(
    e: openraft::error::RaftError<NodeId, openraft::error::CheckIsLeaderError<NodeId, NodeInfo>>,
) -> RemoteFailure {
    use openraft::error::{CheckIsLeaderError, RaftError};
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => RemoteFailure::NotLeader {
            leader: f.leader_id,
        },
        other => RemoteFailure::Unavailable(other.to_string()),
    }
}

/// Where a new task goes: [`Node::submission_route`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmissionRoute {
    /// The routing epoch it was routed by.
    pub epoch: u32,
    /// The shard the current epoch routes it to.
    pub target: GroupId,
    /// Other shards earlier epochs routed its key to, oldest first.
    pub lookback: Vec<GroupId>,
}

/// The groups a node with `shards` queue shards hosts: the meta group, and
/// one per shard when there is more than one.
fn group_ids(shards: u32) -> Vec<GroupId> {
    let extra = if shards > 1 { shards } else { 0 };
    (0..=extra).collect()
}

/// openraft's config from ours.
fn raft_config(c: &Config) -> anyhow::Result<openraft::Config> {
    let r = &c.raft;
    let ms = |d: Duration| d.as_millis() as u64;
    let cfg = openraft::Config {
        cluster_name: "godel".into(),
        heartbeat_interval: ms(r.heartbeat_interval),
        election_timeout_min: ms(r.election_timeout_min),
        election_timeout_max: ms(r.election_timeout_max),
        install_snapshot_timeout: ms(r.snapshot_rpc_timeout),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
        max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
        // Elections wait for a pre-vote (node/prevote.rs), which turns
        // each group's timer on when a majority has no leader.
        enable_elect: false,
        ..Default::default()
    };
    Ok(cfg.validate()?)
}
