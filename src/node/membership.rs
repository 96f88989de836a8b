//! Cluster membership: bootstrap from config, join and leave through the
//! leader, and leadership transfer.
//!
//! openraft 0.9 has no leader transfer; we do it by hand: the leader checks
//! the target is a voter that has replicated its whole log, stops sending
//! heartbeats, waits out the followers' leader lease (the election timeout
//! maximum) and asks the target to start an election at once. The old leader
//! turns its heartbeats back on either way; if the target's election fails, a
//! normal election follows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::error::{InitializeError, RaftError};
use serde::Serialize;

use super::{Group, Node, NodeError};
use crate::api::auth::node_proof;
use crate::clock;
use crate::config::Config;
use crate::raft::rpc::{RemoteFailure, RpcReply, RpcRequest};
use crate::raft::{NodeId, NodeInfo};

/// One member as `GET /cluster` shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Member)]
pub struct MemberStatus {
    /// Its id.
    #[schema(value_type = u64)]
    pub id: NodeId,
    /// `voter` or `learner`.
    pub role: &'static str,
    /// Addresses and region.
    pub info: NodeInfo,
    /// Whether it is the current leader.
    pub leader: bool,
    /// Last log index the leader knows it has (leader only).
    pub matched_index: Option<u64>,
}

/// Reads the shared secret: config value, then file; a single node with
/// neither gets a random one kept in its data directory.
pub(crate) fn load_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = &config.cluster.secret {
        return Ok(s.as_bytes().to_vec());
    }
    if let Some(path) = &config.cluster.secret_file {
        let s = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cluster.secret_file {}: {e}", path.display()))?;
        return Ok(s.trim().as_bytes().to_vec());
    }
    let path = config.node.data_dir.join("cluster.secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().as_bytes().to_vec());
    }
    std::fs::create_dir_all(&config.node.data_dir)?;
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    crate::config::write_private_file(&path, secret.as_bytes())?;
    Ok(secret.into_bytes())
}

/// A pristine node initializes the cluster if it is the lowest-id member (or
/// alone); with `cluster.join` it asks a running node to add it.
pub(super) async fn bootstrap(node: &Node) -> anyhow::Result<()> {
    if node.raft().is_initialized().await? {
        return Ok(());
    }
    let c = node.config();
    if let Some(seed) = c.cluster.join.clone() {
        let node = node.clone();
        node.clone()
            .spawn(async move { join_loop(node, seed).await });
        return Ok(());
    }
    let members: BTreeMap<NodeId, NodeInfo> = if c.cluster.members.is_empty() {
        BTreeMap::from([(node.id(), node.info().clone())])
    } else {
        c.cluster
            .members
            .iter()
            .map(|m| {
                (
                    m.id,
                    NodeInfo {
                        raft_addr: m.raft_addr.clone(),
                        api_addr: m.api_addr.clone(),
                        region: m.region.clone(),
                    },
                )
            })
            .collect()
    };
    if members.keys().next() == Some(&node.id()) {
        if let Some(peer) = running_peer(node, &members).await? {
            anyhow::bail!(
                "this node's data directory is empty but node {peer} already belongs to a running \
                 cluster: refusing to initialize a second one. If this node lost its data, remove it \
                 (`godel cluster leave {id}`), then add it back with `[cluster] join`",
                id = node.id()
            );
        }
        tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "initializing the cluster");
        // The shard groups first: a node that stops in between finds its
        // meta group pristine and comes back here, where a group already
        // initialized answers "not allowed" and is skipped.
        for group in node.shard_groups() {
            match group.raft().initialize(members.clone()).await {
                Ok(()) => {}
                Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                    tracing::info!(group = group.id(), error = %e, "group already initialized");
                }
                Err(e) => anyhow::bail!("initializing shard group {}: {e}", group.id()),
            }
        }
        if let Err(e) = node.raft().initialize(members).await {
            tracing::info!(error = %e, "initialize skipped");
        }
    }
    Ok(())
}

/// A member other than this node that reports an established cluster (a
/// term past zero), if any answers within a second. The call is signed
/// with the cluster secret; a member that refuses it (another secret) is
/// an error, never a reason to initialize.
async fn running_peer(
    node: &Node,
    members: &BTreeMap<NodeId, NodeInfo>,
) -> anyhow::Result<Option<NodeId>> {
    let peers = node.peer_api();
    let key = proof_key(node)?;
    let path = "/api/v1/cluster";
    for (id, info) in members.iter().filter(|(id, _)| **id != node.id()) {
        let url = peers.url(&info.api_addr, path);
        let proof = node_proof::header(&key, "GET", path, node.id(), clock::now_ms(), b"");
        let Ok(resp) = peers
            .http()
            .get(&url)
            .timeout(Duration::from_secs(1))
            .header(reqwest::header::AUTHORIZATION, proof)
            .send()
            .await
        else {
            continue;
        };
        let status = resp.status();
        if matches!(status.as_u16(), 401 | 403) {
            anyhow::bail!(
                "node {id} at {} refused this node's signed call ({status}): do the two share \
                 cluster.secret? Refusing to initialize a cluster without knowing whether one runs",
                info.api_addr
            );
        }
        let Ok(body) = resp.json::<serde_json::Value>().await else {
            continue;
        };
        if body["term"].as_u64().is_some_and(|t| t > 0) {
            return Ok(Some(*id));
        }
    }
    Ok(None)
}

/// The key this node signs its own API calls to peers with: derived from
/// the cluster secret (see `api::auth::node_proof`).
fn proof_key(node: &Node) -> anyhow::Result<Vec<u8>> {
    Ok(node_proof::key(&load_secret(node.config())?))
}

/// Asks the node at `seed` (an API address) to add this one, until it does.
/// The call is signed with the cluster secret: a joining node has no API key.
async fn join_loop(node: Node, seed: String) {
    let path = "/api/v1/cluster/join";
    let body = serde_json::json!({
        "id": node.id(),
        "raft_addr": node.info().raft_addr,
        "api_addr": node.info().api_addr,
        "region": node.info().region,
        "shards": node.config().cluster.shards,
    })
    .to_string();
    let key = match proof_key(&node) {
        Ok(k) => k,
        Err(e) => return tracing::error!(error = %e, "cannot join: no cluster secret"),
    };
    let peers = node.peer_api().clone();
    let url = peers.url(&seed, path);
    let mut delay = Duration::from_millis(200);
    loop {
        let proof = node_proof::header(
            &key,
            "POST",
            path,
            node.id(),
            clock::now_ms(),
            body.as_bytes(),
        );
        match peers
            .http()
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, proof)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .timeout(Duration::from_secs(30))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                tracing::info!(%seed, "joined the cluster");
                return;
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                tracing::warn!(%seed, %status, reason = %body, "join refused; retrying");
            }
            Err(e) => tracing::warn!(%seed, error = %e, "join failed; retrying"),
        }
        tokio::select! {
            _ = node.shutdown_token().cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// How long the leader waits for a joining node to answer a ping.
const JOIN_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// On the leader: checks the node answers over the transport, adds it as a
/// learner, waits for it to catch up, makes it a voter.
pub(super) async fn add_member(
    node: &Node,
    id: NodeId,
    info: NodeInfo,
) -> Result<(), RemoteFailure> {
    ensure_leader(node)?;
    let _one_change = node.inner.membership.lock().await;
    refuse_while_growing(node)?;
    if !node.members().1.contains_key(&id) {
        // A node this one cannot talk to (a certificate from another CA,
        // another cluster secret, a wrong address) would sit in the
        // membership as a learner that never catches up: refuse it first,
        // with the transport's reason.
        match node
            .call_peer(id, &info.raft_addr, RpcRequest::Ping, JOIN_PING_TIMEOUT)
            .await
        {
            Ok(RpcReply::Pong) => {}
            Ok(other) => {
                return Err(RemoteFailure::Invalid(format!(
                    "node {id} at {} answered a ping with {other:?}",
                    info.raft_addr
                )));
            }
            Err(e) => {
                tracing::warn!(node = id, error = %e, "refusing to add a node this leader cannot reach over the transport");
                return Err(RemoteFailure::Unavailable(format!(
                    "the leader cannot reach the node over the transport: {e}"
                )));
            }
        }
        same_shards(node, id, &info).await?;
    }
    let raft = node.raft();
    raft.add_learner(id, info, true)
        .await
        .map_err(|e| RemoteFailure::Unavailable(e.to_string()))?;
    let (voters, _) = node.members();
    let mut voters: BTreeSet<NodeId> = voters.into_iter().collect();
    voters.insert(id);
    raft.change_membership(voters, false)
        .await
        .map_err(|e| RemoteFailure::Unavailable(e.to_string()))?;
    tracing::info!(node = id, "node added as voter");
    Ok(())
}

/// Checks that node `id` hosts exactly this cluster's shard groups: it
/// answers for each of them and not for the one past the last. A node
/// configured with another `cluster.shards` is refused before it is added.
async fn same_shards(node: &Node, id: NodeId, info: &NodeInfo) -> Result<(), RemoteFailure> {
    let ours = node.shard_groups().len() as u32;
    let probe = |g: u32| {
        let req = RpcRequest::for_group(g, RpcRequest::PreVote);
        node.call_peer(id, &info.raft_addr, req, JOIN_PING_TIMEOUT)
    };
    let refuse = |why: String| {
        RemoteFailure::Invalid(format!(
            "node {id} is not configured for this cluster's {} queue shards: {why}; set \
             cluster.shards = {} on it",
            ours.max(1),
            ours.max(1)
        ))
    };
    for g in 1..=ours {
        match probe(g).await {
            Ok(RpcReply::NoSuchGroup(_)) => {
                return Err(refuse(format!("it hosts no shard group {g}")));
            }
            Ok(_) => {}
            Err(e) => return Err(RemoteFailure::Unavailable(e.to_string())),
        }
    }
    match probe(ours + 1).await {
        Ok(RpcReply::NoSuchGroup(_)) => Ok(()),
        Ok(_) => Err(refuse(format!("it hosts a shard group {}", ours + 1))),
        Err(e) => Err(RemoteFailure::Unavailable(e.to_string())),
    }
}

/// On the meta leader: removes a node from the cluster: from the meta
/// group, then from every queue shard's group (through each shard's
/// leader), so that once `leave` returns no group still counts on it and
/// the node can be stopped. Refused, changing nothing, while the node is
/// the only voter of a shard group (a node that joined has not been added
/// to it yet).
pub(super) async fn remove_member(node: &Node, id: NodeId) -> Result<(), RemoteFailure> {
    ensure_leader(node)?;
    let _one_change = node.inner.membership.lock().await;
    refuse_while_growing(node)?;
    for group in node.shard_groups() {
        let (voters, _) = group.members();
        if voters == [id] {
            return Err(RemoteFailure::Invalid(format!(
                "node {id} is the only voter of shard group {}: wait until the other nodes \
                 are its voters (GET /cluster lists each group's voters)",
                group.id()
            )));
        }
    }
    let meta = node.meta().clone();
    remove_from_group(&meta, id).await?;
    super::shards::remove_from_shards(node, id).await
}

/// On `group`'s leader: removes a node from its voters and learners.
pub(super) async fn remove_from_group(group: &Group, id: NodeId) -> Result<(), RemoteFailure> {
    if !group.is_leader() {
        return Err(RemoteFailure::NotLeader {
            leader: group.leader().map(|(id, _)| id),
        });
    }
    let (voters, nodes) = group.members();
    if !nodes.contains_key(&id) {
        return Err(RemoteFailure::Invalid(format!("node {id} is not a member")));
    }
    if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(RemoteFailure::Invalid(
                "cannot remove the last voter".into(),
            ));
        }
        let change = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
        group
            .raft()
            .change_membership(change, false)
            .await
            .map_err(|e| RemoteFailure::Unavailable(e.to_string()))?;
    }
    let change = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
    group
        .raft()
        .change_membership(change, false)
        .await
        .map_err(|e| RemoteFailure::Unavailable(e.to_string()))?;
    tracing::info!(group = group.id(), node = id, "node removed");
    Ok(())
}

/// Refuses a change of the meta group's voters while a shard the cluster
/// has grown by is not routed to yet. Not what keeps the added groups'
/// voters one set (the growth records them, and every meta leader
/// initializes the groups with those): it keeps a growth short and plain,
/// with the nodes that every added shard was checked on (a node joining
/// then becomes the added groups' learner afterwards, as for every group).
/// A join refused here is retried by the joining node.
fn refuse_while_growing(node: &Node) -> Result<(), RemoteFailure> {
    let (count, routed) = node
        .state()
        .read(|s| (s.shard_count(), s.routes().last().copied()));
    match routed {
        Some(routed) if count > routed => Err(RemoteFailure::Unavailable(format!(
            "queue shards {}..={count} are being added; nodes join or leave once they are routed to (GET /cluster: routes)",
            routed + 1
        ))),
        _ => Ok(()),
    }
}

fn ensure_leader(node: &Node) -> Result<(), RemoteFailure> {
    if node.is_leader() {
        Ok(())
    } else {
        Err(RemoteFailure::NotLeader {
            leader: node.leader().map(|(id, _)| id),
        })
    }
}

impl Node {
    /// Adds a node to the cluster (routed to the leader).
    pub async fn join(&self, id: NodeId, info: NodeInfo) -> Result<(), NodeError> {
        if self.is_leader() {
            return add_member(self, id, info).await.map_err(NodeError::from);
        }
        self.membership_rpc(RpcRequest::Join { id, info }).await
    }

    /// Removes a node from the cluster (routed to the leader).
    pub async fn leave(&self, id: NodeId) -> Result<(), NodeError> {
        if self.is_leader() {
            return remove_member(self, id).await.map_err(NodeError::from);
        }
        self.membership_rpc(RpcRequest::Leave { id }).await
    }

    async fn membership_rpc(&self, req: RpcRequest) -> Result<(), NodeError> {
        let (leader, info) = self
            .leader()
            .ok_or_else(|| NodeError::Unavailable("no leader known".into()))?;
        match self
            .call_peer(leader, &info.raft_addr, req, Duration::from_secs(60))
            .await?
        {
            RpcReply::Membership(r) => r.map_err(NodeError::from),
            other => Err(NodeError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Hands the meta group's leadership to voter `to`. Must run on the
    /// leader.
    pub async fn transfer_leadership(&self, to: NodeId) -> Result<(), NodeError> {
        let meta = self.meta().clone();
        self.transfer_group_leadership(&meta, to).await
    }

    /// Hands `group`'s leadership to its voter `to`. Must run on the
    /// group's leader.
    pub(super) async fn transfer_group_leadership(
        &self,
        group: &Group,
        to: NodeId,
    ) -> Result<(), NodeError> {
        if !group.is_leader() {
            return Err(NodeError::from(RemoteFailure::NotLeader {
                leader: group.leader().map(|(id, _)| id),
            }));
        }
        let m = group.raft().metrics().borrow().clone();
        if to == self.id() {
            return Ok(());
        }
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == to)
        {
            return Err(NodeError::Invalid(format!("node {to} is not a voter")));
        }
        let last = m.last_log_index;
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&to).cloned().flatten())
            .map(|l| l.index);
        if matched < last {
            return Err(NodeError::Unavailable(format!(
                "node {to} has not caught up ({matched:?} < {last:?})"
            )));
        }
        let info = group.members().1.get(&to).cloned().unwrap_or_default();
        let raft = group.raft();
        raft.runtime_config().heartbeat(false);
        raft.runtime_config().elect(false);
        tokio::time::sleep(
            self.config().raft.election_timeout_max + self.config().raft.heartbeat_interval,
        )
        .await;
        let result = self
            .call_peer(
                to,
                &info.raft_addr,
                RpcRequest::for_group(group.id(), RpcRequest::Elect),
                Duration::from_secs(2),
            )
            .await;
        let won = raft
            .wait(Some(Duration::from_secs(3)))
            .metrics(|m| m.current_leader == Some(to), "transfer")
            .await;
        raft.runtime_config().heartbeat(true);
        raft.runtime_config().elect(true);
        match (result?, won) {
            (RpcReply::Elect(Ok(())), Ok(_)) => Ok(()),
            (RpcReply::Elect(Err(e)), _) => Err(e.into()),
            (_, Err(e)) => Err(NodeError::Unavailable(format!(
                "node {to} did not take over: {e}"
            ))),
            (other, _) => Err(NodeError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Every member, with its role.
    pub fn member_statuses(&self) -> Vec<MemberStatus> {
        let m = self.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, info)| MemberStatus {
                id: *id,
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                },
                info: info.clone(),
                leader: m.current_leader == Some(*id),
                matched_index: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index),
            })
            .collect()
    }
}
