//! The queue shards' Raft groups on a node (`docs/shards.md`): the count
//! the cluster was created with, each group's voters kept equal to the
//! cluster's, and their leaders spread over the nodes.
//!
//! Every node runs [`shard_loop`]. On the meta leader it records the
//! shard count once (`DefineShards`). On the leader of a shard group it
//! records the group's shard in its state (`DefineGroup`, so its ids carry
//! it), makes the group's membership follow the meta group's voters, one
//! change at a time (a node that joined the cluster becomes a learner of
//! the group, then a voter once it has caught up; a node that left is
//! removed), and hands the group to its preferred leader: the shard's
//! turn in the sorted list of voters that are alive and not draining, so a
//! 3-node, 3-shard cluster has one shard leader per node. openraft 0.9 has
//! no leader transfer; the hand-over is the one the meta group uses (stop
//! heartbeats, wait out the lease, ask the target to elect), about one
//! election timeout during which that one shard takes no write.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use openraft::ChangeMembers;

use super::{Group, Node};
use crate::config::Config;
use crate::fsm::{Command, Member, ShardPlacement, ShardRule};
use crate::raft::rpc::{RemoteFailure, RpcReply, RpcRequest};
use crate::raft::{GroupId, NodeId, NodeInfo};
use crate::store::SharedState;

/// How often a node looks over its shard groups.
const PASS: Duration = Duration::from_millis(500);
/// How long one membership step may take before the next pass retries it.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a hand-over that did not happen, how long before the next try.
const TRANSFER_BACKOFF: Duration = Duration::from_secs(10);
/// After a hand-over, how long before that group may move again.
const HOLD_AFTER_MOVE: Duration = Duration::from_secs(30);
/// How long `leave` waits for the shard groups to drop a node.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the meta leader waits for its shard replicas to exist before
/// it warns (and again after each warning).
const UNINITIALIZED_WARNING: Duration = Duration::from_secs(30);
/// How long a hand-over target has to answer a ping.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one shard's copy of the weights and kill switches may take
/// before the pass goes on (the next pass tries again).
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// A learner this close to the leader's last index has caught up.
const CAUGHT_UP_LAG: u64 = 8;

/// Refuses to start a node configured with another shard count than the
/// one its data records for the cluster.
pub(super) fn check_count(config: &Config, meta: &SharedState) -> anyhow::Result<()> {
    let (recorded, placement) = meta.read(|s| (s.shard_count(), s.shard_placement()));
    let configured = config.cluster.shards;
    if recorded != 0 && placement != config.cluster.shard_placement {
        anyhow::bail!(
            "cluster.shard_placement is `{}` but this cluster was created with `{placement}` \
             (recorded in its data directory); it is fixed when the cluster is created: set \
             cluster.shard_placement = \"{placement}\"",
            config.cluster.shard_placement
        );
    }
    if recorded == 1 && configured > 1 {
        anyhow::bail!(
            "cluster.shards is {configured} but this cluster was created with one queue shard \
             (recorded in its data directory), whose queue is the meta group's: it cannot add \
             shards; set cluster.shards = 1"
        );
    }
    if recorded != 0 && configured < recorded {
        anyhow::bail!(
            "cluster.shards is {configured} but this cluster has {recorded} queue shards \
             (recorded in its data directory); shards are not removed: set \
             cluster.shards = {recorded}"
        );
    }
    if recorded != 0 && configured > recorded {
        tracing::info!(
            configured,
            recorded,
            "this node hosts more queue shards than the cluster has: the cluster adds them \
             once every node does (docs/shards.md, \"Changing the number of shards\")"
        );
    }
    Ok(())
}

/// Runs the passes until shutdown.
pub(super) async fn shard_loop(node: Node) {
    let shutdown = node.shutdown_token().clone();
    let mut backoff: BTreeMap<GroupId, Instant> = BTreeMap::new();
    let mut warned = false;
    let mut uninitialized_since: Option<Instant> = None;
    let mut growth = Growth::default();
    // The first pass at once: the count is recorded as soon as the first
    // leader can, with the start-up writes.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = PASS;
        if node.is_leader() {
            record_count(&node, &mut uninitialized_since).await;
            grow(&node, &mut growth).await;
            move_sessions_off(&node).await;
        }
        let recorded = node.state().read(|s| s.shard_count());
        let configured = node.config().cluster.shards;
        if recorded != 0 && (configured < recorded || (recorded == 1 && configured > 1)) {
            if !warned {
                tracing::error!(
                    configured,
                    recorded,
                    "cluster.shards differs from the cluster's shard count: this node's \
                     shard groups are not managed; set cluster.shards to the recorded count"
                );
                warned = true;
            }
            continue;
        }
        // A node the cluster removed manages nothing (it may still lead a
        // shard group until its removal from it commits).
        if !node.members().0.contains(&node.id()) {
            continue;
        }
        let mut settled = Vec::new();
        for group in node.shard_groups() {
            if !group.is_leader() {
                continue;
            }
            define_group(&node, group).await;
            match follow_cluster_voters(&node, group).await {
                Ok(()) => settled.push(group),
                Err(e) => {
                    tracing::info!(group = group.id(), error = %e, "shard membership not settled yet");
                }
            }
        }
        // Hand-overs after every group's membership step: each costs about
        // an election timeout, and none holds up another group's changes.
        for group in settled {
            if backoff
                .get(&group.id())
                .is_some_and(|t| Instant::now() < *t)
            {
                continue;
            }
            if let Some(to) = preferred_leader(&node, group) {
                // A node dead for less than `node_dead_after` still looks
                // alive in the registry: one that does not answer is not
                // handed a group (the hand-over would cost an election).
                if !answers(&node, group, to).await {
                    backoff.insert(group.id(), Instant::now() + TRANSFER_BACKOFF);
                    continue;
                }
                match node.transfer_group_leadership(group, to).await {
                    Ok(()) => {
                        tracing::info!(group = group.id(), to, "shard leadership balanced");
                        // Held there a while, so a node whose liveness
                        // flickers does not pull groups back and forth.
                        backoff.insert(group.id(), Instant::now() + HOLD_AFTER_MOVE);
                    }
                    Err(e) => {
                        tracing::info!(group = group.id(), to, error = %e, "shard leadership hand-over not done");
                        backoff.insert(group.id(), Instant::now() + TRANSFER_BACKOFF);
                    }
                }
            }
        }
    }
}

/// On the meta leader: records the cluster's shard count, once its own
/// replicas of every shard group exist (a cluster created before it had
/// shards never gets them: its nodes are told so instead).
async fn record_count(node: &Node, uninitialized_since: &mut Option<Instant>) {
    if node.state().read(|s| s.shard_count()) != 0 {
        return;
    }
    for group in node.shard_groups() {
        if !group.raft().is_initialized().await.unwrap_or(false) {
            // Normal for a few passes while the group's leader reaches this
            // replica; for good when the cluster was created with fewer.
            let since = *uninitialized_since.get_or_insert_with(Instant::now);
            if since.elapsed() > UNINITIALIZED_WARNING {
                tracing::warn!(
                    group = group.id(),
                    "this node's replica of the shard group is not initialized: the cluster \
                     records its shard count once it is (a cluster created with fewer shards \
                     never gets more: set cluster.shards to the count it was created with)"
                );
                *uninitialized_since = Some(Instant::now());
            }
            return;
        }
    }
    let count = node.config().cluster.shards;
    let placement = node.config().cluster.shard_placement;
    match node.write(Command::DefineShards { count, placement }).await {
        Ok(Ok(_)) => tracing::info!(count, "recorded the cluster's queue-shard count"),
        Ok(Err(rejected)) => tracing::error!(error = %rejected, "shard count refused"),
        Err(e) => tracing::debug!(error = %e, "shard count not committed yet"),
    }
}

/// What the meta leader's growth steps remember between passes.
#[derive(Default)]
struct Growth {
    /// When it last said which nodes do not host the new shards yet.
    waiting_said: Option<Instant>,
}

/// How often the meta leader repeats which nodes hold up an added shard.
const GROWTH_WAITING_NOTICE: Duration = Duration::from_secs(30);

/// On the meta leader: adding queue shards (`docs/shards.md`, "Changing
/// the number of shards"), one step per pass:
///
/// 1. This node is configured with more shards than the cluster has, and
///    every node of the cluster hosts them (each answers for the highest
///    one over the transport): the count grows (`GrowShards`), recording
///    the meta group's voters.
/// 2. A shard past the current routing epoch's count: its group is
///    initialized here with the voters the growth recorded (its leader
///    then records its shard and follows the placement, as for every
///    shard); once each such group knows its shard, it takes the meta
///    group's weights and kill switches (`SyncShard`) and the next routing
///    epoch opens over every shard (`OpenRoute` in the meta group).
/// 3. Every shard routed to is brought up to the meta group's weights and
///    kill switches (a change the API could not copy to it, or made while
///    an added shard was not routed to yet), and told the current epoch,
///    so a node whose routing is behind has its submissions refused and
///    routes again.
async fn grow(node: &Node, growth: &mut Growth) {
    let (recorded, routes) = node
        .state()
        .read(|s| (s.shard_count(), s.routes().to_vec()));
    let Some(&routed) = routes.last() else {
        return;
    };
    if recorded <= 1 {
        return;
    }
    // The shards routed to, first and whatever a growth is waiting for:
    // their copies of the weights and kill switches brought up to the meta
    // group's, and the current routing epoch told.
    let epoch = routes.len() as u32;
    let routed_groups = node.shard_groups().iter().take(routed as usize);
    futures_util::future::join_all(routed_groups.map(|group| async move {
        sync_shard(node, group.id()).await;
        if epoch < 2 || group.state().read(|s| s.route_epoch()) >= epoch {
            return;
        }
        let cmd = Command::OpenRoute {
            epoch,
            count: routed,
            sync_rev: 0,
        };
        if let Err(e) = node.write_to(group.id(), cmd).await {
            tracing::debug!(group = group.id(), error = %e, "routing epoch not told to the shard yet");
        }
    }))
    .await;
    let configured = node.config().cluster.shards;
    if configured > recorded {
        let missing = nodes_without_group(node, configured).await;
        if missing.is_empty() {
            // No change of the voters runs while the growth is proposed,
            // and none starts until the added shards are routed to
            // (membership.rs), so the voters recorded are the cluster's.
            let Ok(_no_change) = node.inner.membership.try_lock() else {
                return;
            };
            // The voters the added groups start with, recorded with the
            // growth: a meta leader that takes over initializes them with
            // the same ones.
            let (voters, nodes) = node.members();
            let voters = voters
                .iter()
                .map(|id| {
                    let info = nodes.get(id).cloned().unwrap_or_default();
                    let member = Member {
                        raft_addr: info.raft_addr,
                        api_addr: info.api_addr,
                        region: info.region,
                    };
                    (*id, member)
                })
                .collect();
            let cmd = Command::GrowShards {
                count: configured,
                voters,
            };
            match node.write(cmd).await {
                Ok(Ok(_)) => {
                    tracing::info!(
                        from = recorded,
                        to = configured,
                        "the cluster's queue shards grow"
                    )
                }
                Ok(Err(rejected)) => tracing::error!(error = %rejected, "shard growth refused"),
                Err(e) => tracing::debug!(error = %e, "shard growth not committed yet"),
            }
            return;
        }
        if growth
            .waiting_said
            .is_none_or(|t| t.elapsed() > GROWTH_WAITING_NOTICE)
        {
            tracing::info!(
                to = configured,
                nodes = ?missing,
                "queue shards wait to be added until these nodes host them (cluster.shards = {configured} on each)"
            );
            growth.waiting_said = Some(Instant::now());
        }
        return;
    }
    if recorded > routed {
        open_next_route(node, routed, recorded, epoch).await;
    }
}

/// Step 2 of [`grow`]: shards `routed + 1..=recorded` made ready, then
/// routing epoch `epoch + 1` opened over them.
async fn open_next_route(node: &Node, routed: u32, recorded: u32, epoch: u32) {
    let members: BTreeMap<NodeId, NodeInfo> = node.state().read(|s| {
        s.growth_voters()
            .iter()
            .map(|(id, m)| {
                let info = NodeInfo {
                    raft_addr: m.raft_addr.clone(),
                    api_addr: m.api_addr.clone(),
                    region: m.region.clone(),
                };
                (*id, info)
            })
            .collect()
    });
    if members.is_empty() {
        tracing::error!("the cluster grew its shards without recording their voters");
        return;
    }
    let mut ready = true;
    for g in routed + 1..=recorded {
        let Some(group) = node.group(g) else {
            tracing::error!(group = g, "this node does not host a shard the cluster has");
            return;
        };
        if !group.raft().is_initialized().await.unwrap_or(false) {
            match group.raft().initialize(members.clone()).await {
                Ok(()) => tracing::info!(group = g, "initialized an added queue shard's group"),
                Err(e) => {
                    tracing::info!(group = g, error = %e, "added shard's group not initialized here")
                }
            }
        }
        ready &= group.state().read(|s| s.group()) == g;
    }
    if !ready {
        return;
    }
    // Tenants' round-robin weights and the kill switches live in every
    // shard: the added ones get the meta group's before tasks go to them.
    // The epoch opens only if no change came since (it names the revision
    // they were brought to): one that did is synced at the next pass.
    let sync_rev = node.state().read(|s| s.sync_rev());
    for g in routed + 1..=recorded {
        if !sync_shard(node, g).await {
            return;
        }
    }
    let cmd = Command::OpenRoute {
        epoch: epoch + 1,
        count: recorded,
        sync_rev,
    };
    match node.write(cmd).await {
        Ok(Ok(_)) => tracing::info!(
            epoch = epoch + 1,
            shards = recorded,
            "a routing epoch opened: new tasks go to the added shards too"
        ),
        Ok(Err(crate::fsm::Rejection::Conflict(why))) => {
            tracing::info!(why, "routing epoch not opened yet")
        }
        Ok(Err(rejected)) => tracing::error!(error = %rejected, "routing epoch refused"),
        Err(e) => tracing::debug!(error = %e, "routing epoch not committed yet"),
    }
}

/// On the meta leader: brings queue shard `g`'s copy of the weights and
/// kill switches up to the meta group's, as this node's replica of the
/// shard shows it (a replica behind costs a write that changes nothing).
/// Whether the shard's copy is known to be up to date.
async fn sync_shard(node: &Node, g: GroupId) -> bool {
    let Some(group) = node.group(g) else {
        return false;
    };
    let copy = group.state().read(|s| s.synced());
    let Some(cmd) = node.state().read(|meta| meta.sync_for(&copy)) else {
        return true;
    };
    let write = tokio::time::timeout(SYNC_TIMEOUT, node.write_to(g, cmd));
    let Ok(written) = write.await else {
        tracing::debug!(
            group = g,
            "weights and kill switches not copied to the shard in time"
        );
        return false;
    };
    match written {
        Ok(Ok(_)) => true,
        Ok(Err(rejected)) => {
            tracing::warn!(group = g, error = %rejected, "a shard refused the meta group's weights and kill switches");
            false
        }
        Err(e) => {
            tracing::debug!(group = g, error = %e, "weights and kill switches not copied to the shard yet");
            false
        }
    }
}

/// On the meta leader: moves sessions off gateways that are down. A queue
/// shard holds no registry, so it cannot see a gateway's breaker open; and
/// a gateway unhealthy for `runtime.session_move_after` is taken as down
/// (a probe that fails for a while, not a busy moment), which no command
/// marks. For each such gateway, every queue group (the meta group's own
/// while it is the only one) with live sessions on it that are not moving
/// yet is told to move them on ([`crate::fsm::Command::MoveSessionsOff`]).
/// A group that misses the write is told again at the next pass.
async fn move_sessions_off(node: &Node) {
    let now = crate::clock::now_ms();
    let after = node.config().runtime.session_move_after.as_millis() as u64;
    let down: Vec<(crate::fsm::GatewayId, String)> = node.state().read(|meta| {
        meta.registry()
            .gateways()
            .filter_map(|g| Some((g.reg.id.clone(), meta.gateway_down(&g.reg.id, now, after)?)))
            .collect()
    });
    // Every (gateway, group) write at once, each bounded: a group without
    // quorum does not hold up the others, nor the rest of the pass.
    let writes = down.iter().flat_map(|(gateway, why)| {
        node.queue_groups()
            .iter()
            .filter(|g| g.state().read(|s| !s.sessions_on(gateway).is_empty()))
            .map(move |group| async move {
                let cmd = crate::fsm::Command::MoveSessionsOff {
                    gateway: gateway.clone(),
                    why: why.clone(),
                };
                let written =
                    tokio::time::timeout(SYNC_TIMEOUT, node.write_to(group.id(), cmd)).await;
                match written {
                    Ok(Ok(Ok(_))) => {
                        tracing::info!(group = group.id(), %gateway, %why, "sessions move off a gateway that is down");
                    }
                    Ok(Ok(Err(rejected))) => {
                        tracing::warn!(group = group.id(), %gateway, error = %rejected, "a group refused to move sessions off a gateway");
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(group = group.id(), %gateway, error = %e, "sessions not moved off the gateway yet");
                    }
                    Err(_) => {
                        tracing::debug!(group = group.id(), %gateway, "sessions not moved off the gateway in time");
                    }
                }
            })
    });
    futures_util::future::join_all(writes).await;
}

/// The cluster's nodes (voters and learners of the meta group) that do not
/// answer for group `group` over the transport: not hosting it, or down.
async fn nodes_without_group(node: &Node, group: GroupId) -> Vec<NodeId> {
    let (_, nodes) = node.members();
    let asks = nodes
        .iter()
        .filter(|(id, _)| **id != node.id())
        .map(|(id, info)| async move {
            let req = RpcRequest::for_group(group, RpcRequest::PreVote);
            let hosted = matches!(
                node.call_peer(*id, &info.raft_addr, req, PING_TIMEOUT)
                    .await,
                Ok(RpcReply::PreVote(_))
            );
            (!hosted).then_some(*id)
        });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// On a shard group's leader, until its state knows: records which shard
/// the group is (`DefineGroup`), so its ids carry the shard.
async fn define_group(node: &Node, group: &Group) {
    let id = group.id();
    if group.state().read(|s| s.group()) == id {
        return;
    }
    match node.write_to(id, Command::DefineGroup { group: id }).await {
        Ok(Ok(_)) => tracing::info!(group = id, "the shard group knows its shard"),
        Ok(Err(rejected)) => {
            tracing::error!(group = id, error = %rejected, "the shard group refused its shard")
        }
        Err(e) => tracing::debug!(group = id, error = %e, "shard definition not committed yet"),
    }
}

/// The voters a shard should have under `placement`, from the cluster's
/// voters and their regions. Deterministic (every shard leader computes
/// the same), and rotated by shard so the shards' voters, and so their
/// leaders, spread over the nodes.
#[cfg(test)]
pub fn shard_voters(
    shard: GroupId,
    placement: ShardPlacement,
    voters: &[(NodeId, String)],
) -> BTreeSet<NodeId> {
    let rule = ShardRule {
        placement,
        home: None,
    };
    shard_voters_by(shard, &rule, voters)
}

/// [`shard_voters`] under a shard's own rule: `regional` with a home puts
/// its voters in that region; a home no voter is in any more gives it
/// `spread` instead (a shard with no voter cannot run).
pub fn shard_voters_by(
    shard: GroupId,
    rule: &ShardRule,
    voters: &[(NodeId, String)],
) -> BTreeSet<NodeId> {
    let placement = rule.placement;
    let mut by_region: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for (id, region) in voters {
        by_region.entry(region.as_str()).or_default().push(*id);
    }
    for ids in by_region.values_mut() {
        ids.sort_unstable();
    }
    let turn = (shard as usize).saturating_sub(1);
    let placement = match placement {
        ShardPlacement::Auto if voters.len() > 5 && by_region.len() >= 3 => ShardPlacement::Spread,
        ShardPlacement::Auto => ShardPlacement::Every,
        p => p,
    };
    // Each region's nodes, rotated by shard.
    let rotated = |ids: &Vec<NodeId>| -> Vec<NodeId> {
        (0..ids.len())
            .map(|k| ids[(turn + k) % ids.len()])
            .collect()
    };
    match placement {
        ShardPlacement::Every | ShardPlacement::Auto => voters.iter().map(|(id, _)| *id).collect(),
        ShardPlacement::Regional
            if rule
                .home
                .as_deref()
                .is_some_and(|h| by_region.contains_key(h)) =>
        {
            let home = &by_region[rule.home.as_deref().expect("checked above")];
            rotated(home).into_iter().take(SHARD_VOTERS).collect()
        }
        ShardPlacement::Regional if !by_region.is_empty() && rule.home.is_none() => {
            let home = by_region
                .values()
                .nth(turn % by_region.len())
                .expect("index within the regions");
            rotated(home).into_iter().take(SHARD_VOTERS).collect()
        }
        ShardPlacement::Regional | ShardPlacement::Spread => {
            // Regions in turn, starting with the shard's, one node each
            // per round, until there are enough.
            let regions: Vec<Vec<NodeId>> = by_region.values().map(rotated).collect();
            let mut out = BTreeSet::new();
            let want = SHARD_VOTERS.min(voters.len());
            let mut round = 0;
            while out.len() < want {
                for r in 0..regions.len() {
                    let region = &regions[(turn + r) % regions.len()];
                    if let Some(id) = region.get(round)
                        && out.len() < want
                    {
                        out.insert(*id);
                    }
                }
                round += 1;
            }
            out
        }
    }
}

/// Voters of a `spread` or `regional` shard.
const SHARD_VOTERS: usize = 3;

/// On a shard group's leader: one step toward the group's voters being the
/// ones its placement gives (`shard_voters`), with every other node of the
/// cluster a learner (so each node has a replica of every shard). Adds
/// missing nodes as learners, promotes those caught up, turns voters the
/// placement does not want into learners, drops nodes the cluster no
/// longer has.
async fn follow_cluster_voters(node: &Node, group: &Group) -> Result<(), String> {
    let (meta_voters, meta_nodes) = node.members();
    let cluster: BTreeSet<NodeId> = meta_voters.iter().copied().collect();
    let rule = node.state().read(|s| s.shard_rule(group.id()));
    let with_regions: Vec<(NodeId, String)> = meta_voters
        .iter()
        .map(|id| {
            let region = meta_nodes.get(id).map(|i| i.region.clone());
            (*id, region.unwrap_or_default())
        })
        .collect();
    let want = shard_voters_by(group.id(), &rule, &with_regions);
    let (voters, nodes) = group.members();
    let voters: BTreeSet<NodeId> = voters.into_iter().collect();
    let raft = group.raft();
    let step = |what: &'static str| move |e: String| format!("{what}: {e}");
    for id in cluster.iter().filter(|id| !nodes.contains_key(id)) {
        let info: NodeInfo = meta_nodes.get(id).cloned().unwrap_or_default();
        tracing::info!(
            group = group.id(),
            node = id,
            "adding a cluster voter to the shard group as a learner"
        );
        timed(raft.add_learner(*id, info, false))
            .await
            .map_err(step("add learner"))?;
    }
    let m = raft.metrics().borrow().clone();
    let last = m.last_log_index.unwrap_or(0);
    // A learner is promoted once the leader has a confirmed match for it
    // near its last index (none yet: not caught up, however short the log).
    let caught_up = |id: &NodeId| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(id).cloned().flatten())
            .is_some_and(|l| l.index + CAUGHT_UP_LAG >= last)
    };
    let next: BTreeSet<NodeId> = want
        .iter()
        .filter(|id| voters.contains(id) || caught_up(id))
        .copied()
        .collect();
    if next != voters && !next.is_empty() {
        tracing::info!(group = group.id(), from = ?voters, to = ?next, "changing the shard group's voters");
        // Retained: a voter the placement no longer wants stays a learner.
        timed(raft.change_membership(ChangeMembers::ReplaceAllVoters(next), true))
            .await
            .map_err(step("change voters"))?;
    }
    let (voters, nodes) = group.members();
    let gone: BTreeSet<NodeId> = nodes
        .keys()
        .filter(|id| !cluster.contains(id) && !voters.contains(id))
        .copied()
        .collect();
    if !gone.is_empty() {
        tracing::info!(group = group.id(), nodes = ?gone, "removing departed learners from the shard group");
        timed(raft.change_membership(ChangeMembers::RemoveNodes(gone), false))
            .await
            .map_err(step("remove learners"))?;
    }
    Ok(())
}

/// On the meta leader, after node `id` left the meta group: removes it from
/// every shard group through that group's leader, retrying (a shard
/// leader may be making its own membership step) until none lists it or
/// [`REMOVE_TIMEOUT`] passes.
pub(super) async fn remove_from_shards(node: &Node, id: NodeId) -> Result<(), RemoteFailure> {
    let give_up = Instant::now() + REMOVE_TIMEOUT;
    for group in node.shard_groups() {
        while group.members().1.contains_key(&id) {
            let result = remove_once(node, group, id).await;
            match result {
                Ok(()) => {}
                Err(e) if Instant::now() < give_up => {
                    tracing::info!(group = group.id(), node = id, error = %e, "removing the node from the shard group; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(RemoteFailure::Unavailable(format!(
                        "node {id} left the meta group but shard group {} still lists it: {e}",
                        group.id()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// One try at removing node `id` from `group`: here if this node leads
/// it, else through its leader.
async fn remove_once(node: &Node, group: &Group, id: NodeId) -> Result<(), RemoteFailure> {
    if group.is_leader() {
        return super::membership::remove_from_group(group, id).await;
    }
    let (leader, info) = group
        .leader()
        .ok_or_else(|| RemoteFailure::Unavailable("no leader known".into()))?;
    let req = RpcRequest::for_group(group.id(), RpcRequest::Leave { id });
    match node
        .call_peer(leader, &info.raft_addr, req, CHANGE_TIMEOUT)
        .await
    {
        Ok(RpcReply::Membership(r)) => r,
        Ok(other) => Err(RemoteFailure::Unavailable(format!(
            "unexpected reply {other:?}"
        ))),
        Err(e) => Err(RemoteFailure::Unavailable(e.to_string())),
    }
}

/// Whether node `to` answers a ping over the transport now.
async fn answers(node: &Node, group: &Group, to: NodeId) -> bool {
    let Some(info) = group.members().1.get(&to).cloned() else {
        return false;
    };
    matches!(
        node.call_peer(to, &info.raft_addr, RpcRequest::Ping, PING_TIMEOUT)
            .await,
        Ok(RpcReply::Pong)
    )
}

/// A membership call under [`CHANGE_TIMEOUT`], its error as text.
async fn timed<T, E: std::fmt::Display>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(), String> {
    match tokio::time::timeout(CHANGE_TIMEOUT, fut).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CHANGE_TIMEOUT:?}")),
    }
}

/// The node that should lead `group`, when it is not this one: among the
/// group's voters that are heartbeating and not draining, sorted by id,
/// the one at the shard's turn. `None` when this node is the one, or
/// when no other candidate has caught up.
fn preferred_leader(node: &Node, group: &Group) -> Option<NodeId> {
    if node.cut_off() {
        return None;
    }
    let (voters, _) = group.members();
    let dead_after = node.queue_config().node_dead_after.as_millis() as u64;
    let usable: BTreeSet<NodeId> = node.state().read(|s| {
        let now = s.clock_ms();
        s.registry()
            .nodes()
            .filter(|n| !n.draining && n.last_heartbeat_ms.saturating_add(dead_after) >= now)
            .map(|n| n.id)
            .collect()
    });
    let candidates: Vec<NodeId> = voters.into_iter().filter(|v| usable.contains(v)).collect();
    if candidates.is_empty() {
        return None;
    }
    let turn = (group.id() as usize).saturating_sub(1) % candidates.len();
    let to = candidates[turn];
    if to == node.id() {
        return None;
    }
    let m = group.raft().metrics().borrow().clone();
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&to).cloned().flatten())
        .map(|l| l.index);
    (matched >= m.last_log_index).then_some(to)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{shard_voters, shard_voters_by};
    use crate::fsm::{ShardPlacement, ShardRule};
    use crate::raft::NodeId;

    fn nodes(regions: &[&str]) -> Vec<(u64, String)> {
        regions
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u64 + 1, (*r).to_owned()))
            .collect()
    }

    fn regions_of(voters: &BTreeSet<u64>, all: &[(u64, String)]) -> BTreeSet<String> {
        voters
            .iter()
            .map(|v| all[*v as usize - 1].1.clone())
            .collect()
    }

    #[test]
    fn small_clusters_and_every_keep_every_voter() {
        let three = nodes(&["eu", "us", "ap"]);
        for shard in 1..=4 {
            assert_eq!(shard_voters(shard, ShardPlacement::Auto, &three).len(), 3);
            assert_eq!(shard_voters(shard, ShardPlacement::Every, &three).len(), 3);
        }
        let nine_one_region = nodes(&["eu"; 9]);
        assert_eq!(
            shard_voters(1, ShardPlacement::Auto, &nine_one_region).len(),
            9
        );
    }

    /// Nine nodes in three regions: `auto` is `spread`, three voters in
    /// three regions, and the shards' voters cover every node.
    #[test]
    fn spread_takes_one_voter_per_region_and_rotates() {
        let nine = nodes(&["eu", "eu", "eu", "us", "us", "us", "ap", "ap", "ap"]);
        let mut covered = BTreeSet::new();
        for shard in 1..=9 {
            for placement in [ShardPlacement::Auto, ShardPlacement::Spread] {
                let v = shard_voters(shard, placement, &nine);
                assert_eq!(v.len(), 3, "shard {shard}: {v:?}");
                assert_eq!(regions_of(&v, &nine).len(), 3, "shard {shard}: {v:?}");
                covered.extend(v);
            }
        }
        assert_eq!(covered.len(), 9, "{covered:?}");
        // Two regions: three voters over both.
        let four = nodes(&["eu", "eu", "us", "us"]);
        let v = shard_voters(1, ShardPlacement::Spread, &four);
        assert_eq!((v.len(), regions_of(&v, &four).len()), (3, 2), "{v:?}");
    }

    /// `regional`: up to three voters, all in the shard's home region; the
    /// regions take turns as homes.
    #[test]
    fn regional_keeps_voters_home() {
        let nine = nodes(&["eu", "eu", "eu", "us", "us", "us", "ap", "ap", "ap"]);
        let homes: Vec<BTreeSet<String>> = (1..=3)
            .map(|shard| {
                let v = shard_voters(shard, ShardPlacement::Regional, &nine);
                assert_eq!(v.len(), 3, "{v:?}");
                regions_of(&v, &nine)
            })
            .collect();
        for h in &homes {
            assert_eq!(h.len(), 1, "{homes:?}");
        }
        let all: BTreeSet<&String> = homes.iter().flatten().collect();
        assert_eq!(all.len(), 3, "every region is some shard's home: {homes:?}");
    }

    /// A shard placed `regional` with a home has its voters there, rotated
    /// by shard; a home no voter is in gives it `spread`.
    #[test]
    fn a_home_region_holds_a_regional_shards_voters() {
        let nine: Vec<(NodeId, String)> = (1..=9)
            .map(|id| (id, ["ap", "eu", "us"][(id as usize - 1) / 3].to_string()))
            .collect();
        let region = |id: &NodeId| nine[*id as usize - 1].1.clone();
        let rule = |home: &str| ShardRule {
            placement: ShardPlacement::Regional,
            home: Some(home.into()),
        };
        for shard in 1..=3 {
            let v = shard_voters_by(shard, &rule("us"), &nine);
            assert_eq!(v, BTreeSet::from([7, 8, 9]), "shard {shard}");
        }
        let gone = shard_voters_by(2, &rule("mars"), &nine);
        let regions: BTreeSet<String> = gone.iter().map(region).collect();
        assert_eq!((gone.len(), regions.len()), (3, 3), "{gone:?}");
    }
}
