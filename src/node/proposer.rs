//! The write pipeline: one bounded queue of commands, drained into batches;
//! each batch is proposed as one Raft entry on the leader or forwarded whole
//! to it. Also the leader's timer loop, which proposes a tick when a timer in
//! the state machine is due.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{Group, Node, NodeError};
use crate::clock;
use crate::fsm::{Batch, Command, Outcome, Request, Write};
use crate::raft::rpc::{Forwarded, RemoteFailure, RpcReply, RpcRequest};
use crate::raft::{META_GROUP, NodeId};

/// What a job's caller gets back: one result per write, in order.
pub(super) type Results = Vec<Result<Outcome, NodeError>>;

/// Writes that join the pipeline together: they go into one Raft entry
/// (with other jobs when there is room), and their caller gets one answer.
pub(super) struct Job {
    writes: Vec<Write>,
    /// The commands' encoded size, counted when queued (audit marks, a
    /// few dozen bytes each, are not counted).
    bytes: usize,
    reply: oneshot::Sender<Results>,
    /// The job's places in the queue, given back when a batch takes it.
    _room: OwnedSemaphorePermit,
}

/// The sending side of the command queue.
pub(super) struct Queue {
    tx: mpsc::UnboundedSender<Job>,
    /// Commands that may still wait: the queue's bound, counted in
    /// commands (a job of many takes many places).
    room: Arc<Semaphore>,
}

impl Queue {
    /// A queue holding at most `capacity` waiting commands.
    pub(super) fn new(capacity: usize) -> (Self, mpsc::UnboundedReceiver<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(capacity));
        (Self { tx, room }, rx)
    }

    /// Room left in the queue, in commands.
    pub(super) fn free(&self) -> usize {
        self.room.available_permits()
    }

    /// Enqueues writes that go into one entry together; full (no room for
    /// all of them) means overloaded, never a wait, and nothing is queued.
    pub(super) fn push(&self, writes: Vec<Write>) -> Result<oneshot::Receiver<Results>, NodeError> {
        let n = u32::try_from(writes.len()).unwrap_or(u32::MAX);
        let room = self
            .room
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => {
                    NodeError::Overloaded("write queue is full".into())
                }
                tokio::sync::TryAcquireError::Closed => {
                    NodeError::Unavailable("node is shutting down".into())
                }
            })?;
        let (reply, rx) = oneshot::channel();
        let bytes = writes
            .iter()
            .map(|w| crate::codec::encoded_len(&w.command))
            .sum();
        let job = Job {
            writes,
            bytes,
            reply,
            _room: room,
        };
        self.tx
            .send(job)
            .map_err(|_| NodeError::Unavailable("node is shutting down".into()))?;
        Ok(rx)
    }
}

/// The bounds of one batch.
#[derive(Clone, Copy, Debug)]
struct BatchMax {
    commands: usize,
    bytes: usize,
}

/// One batch: the commands of the jobs it took, in order, and each job's
/// reply with its count of commands.
type Gathered = (Vec<Write>, Vec<(oneshot::Sender<Results>, usize)>);

/// Takes `first` and the jobs already waiting behind it, whole, while the
/// batch stays within `max` commands and bytes. A job that does not fit is
/// returned to start the next batch; `first` is taken even when it alone is
/// past the bounds (a request's commands are never split).
fn gather(
    first: Job,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    max: BatchMax,
) -> (Gathered, Option<Job>) {
    let mut cmds = Vec::with_capacity(first.writes.len());
    let mut replies = Vec::new();
    let mut bytes = 0;
    let mut carried = None;
    let mut next = Some(first);
    while let Some(Job {
        writes,
        bytes: b,
        reply,
        ..
    }) = next
    {
        replies.push((reply, writes.len()));
        cmds.extend(writes);
        bytes += b;
        next = None;
        if cmds.len() < max.commands
            && bytes < max.bytes
            && let Ok(job) = rx.try_recv()
        {
            if cmds.len() + job.writes.len() <= max.commands && bytes + job.bytes <= max.bytes {
                next = Some(job);
            } else {
                carried = Some(job);
            }
        }
    }
    ((cmds, replies), carried)
}

/// Drains the group's queue into batches until shutdown: each batch is the
/// jobs waiting, whole, up to `batch_max_commands` and `batch_max_bytes` (a
/// job is never split: one that does not fit starts the next batch, and one
/// bigger than that is an entry of its own).
pub(super) async fn run(node: Node, group: Group, mut rx: mpsc::UnboundedReceiver<Job>) {
    let max = BatchMax {
        commands: node.queue_config().batch_max_commands,
        bytes: node.queue_config().batch_max_bytes,
    };
    let inflight = Arc::new(Semaphore::new(node.queue_config().max_inflight_batches));
    let shutdown = node.shutdown_token().clone();
    // A job that did not fit the last batch: it starts the next one.
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => tokio::select! {
                _ = shutdown.cancelled() => break,
                next = rx.recv() => match next { Some(x) => x, None => break },
            },
        };
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        let ((cmds, replies), rest) = gather(first, &mut rx, max);
        carried = rest;
        let node = node.clone();
        let group = group.clone();
        node.clone().spawn(async move {
            let n = cmds.len();
            match dispatch(&node, &group, cmds).await {
                Ok(each) if each.len() == n => {
                    let mut each = each.into_iter();
                    for (reply, k) in replies {
                        let _ = reply.send(each.by_ref().take(k).collect());
                    }
                }
                Ok(each) => {
                    let msg = format!("{} results for {n} commands", each.len());
                    fail_all(replies, NodeError::Internal(msg));
                }
                Err(e) => fail_all(replies, e),
            }
            drop(permit);
        });
    }
}

fn fail_all(replies: Vec<(oneshot::Sender<Results>, usize)>, e: NodeError) {
    for (reply, k) in replies {
        let _ = reply.send(vec![Err(e.clone()); k]);
    }
}

/// Proposes a batch here if leader, else forwards it to the leader. A batch
/// refused as a whole because the receiver was not the leader was not
/// proposed, so it is retried (twice) once the view of the leader refreshes.
async fn dispatch(node: &Node, group: &Group, cmds: Vec<Write>) -> Result<Results, NodeError> {
    let n = cmds.len();
    let cmds = with_pull(node, group, cmds);
    let mut each = propose_or_forward(node, group, cmds).await?;
    if let Some(Ok(Ok(crate::fsm::Reply::Dispatched(grants)))) = each.get(n) {
        crate::metrics::global()
            .dispatch_leases
            .inc_by(grants.len() as u64);
    }
    each.truncate(n);
    Ok(each)
}

/// With pull dispatch, a batch that adds ready work or frees capacity ends
/// with a pull for this node's agents, so they can take the work in the
/// entry that makes it available (as push dispatch's piggybacked round
/// does on the leader); agents of other nodes pull in their own rounds.
fn with_pull(node: &Node, group: &Group, mut cmds: Vec<Write>) -> Vec<Write> {
    let pulls = group.id() == META_GROUP
        && node.config().dispatch() == crate::config::DispatchMode::Pull
        && cmds.iter().any(|w| frees_or_adds_work(&w.command))
        && !cmds.iter().any(|w| matches!(w.command, Command::Pull(_)));
    if !pulls {
        return cmds;
    }
    let slots = group.state().read(|s| s.pull_slots_on(node.id()));
    if !slots.is_empty() {
        let spec = crate::fsm::PullSpec {
            round: crate::actors::dispatch_spec(node),
            node: node.id(),
            slots,
        };
        cmds.push(Command::Pull(spec).into());
    }
    cmds
}

async fn propose_or_forward(
    node: &Node,
    group: &Group,
    cmds: Vec<Write>,
) -> Result<Results, NodeError> {
    let timeout = node.queue_config().write_timeout;
    let mut last = NodeError::Unavailable("no leader known".into());
    // The leader the last attempt found (or none): the next waits for a
    // different one, at most an election timeout (an election in progress
    // ends within one; on a loaded machine it takes longer than the
    // heartbeat that once bounded this wait, and a group's first election
    // at start-up refused writes with "no leader known"). A node cut off
    // from a quorum refuses after two such waits.
    let mut tried = None;
    for attempt in 0..3 {
        if attempt > 0 {
            let wait = node.config().raft.election_timeout_max;
            let _ = tokio::time::timeout(wait, new_leader(group, tried)).await;
        }
        tried = group.leader().map(|(id, _)| id);
        if group.is_leader() {
            match propose_as_leader(node, group, cmds.clone()).await {
                Err(RemoteFailure::NotLeader { .. }) => continue,
                Ok(outcomes) => return Ok(outcomes.into_iter().map(Ok).collect()),
                Err(e) => return Err(e.into()),
            }
        }
        let Some((leader, info)) = group.leader().filter(|(id, _)| *id != node.id()) else {
            continue;
        };
        let (commands, callers, audit) = crate::fsm::pack(cmds.clone());
        let req = RpcRequest::for_group(
            group.id(),
            RpcRequest::Forward(Forwarded {
                commands,
                callers,
                audit,
            }),
        );
        let reply = tokio::select! {
            r = node.call_peer(leader, &info.raft_addr, req, timeout) => r?,
            // A paused or cut-off leader would hold the pipeline for the whole
            // timeout. The batch may still commit (if the old leader
            // replicated it), so it is not sent again: its outcome is unknown.
            () = leader_changed(group, leader) => {
                return Err(NodeError::Unavailable(format!(
                    "leader {leader} was replaced while the write was in flight; its outcome is unknown"
                )));
            }
        };
        match reply {
            RpcReply::Forward(Err(RemoteFailure::NotLeader { .. })) => {
                last = NodeError::Unavailable(format!("node {leader} is no longer the leader"));
            }
            RpcReply::Forward(Ok(each)) => {
                return Ok(each
                    .into_iter()
                    .map(|r| r.map_err(NodeError::from))
                    .collect());
            }
            RpcReply::Forward(Err(e)) => return Err(e.into()),
            other => return Err(NodeError::Internal(format!("unexpected reply {other:?}"))),
        }
    }
    Err(last)
}

/// Resolves once this node knows a leader of the group other than `tried`.
pub(super) async fn new_leader(group: &Group, tried: Option<NodeId>) {
    leader_becomes(group, |now| now.is_some() && now != tried).await;
}

/// Resolves once this node sees a leader of the group other than `from`
/// (or none).
async fn leader_changed(group: &Group, from: NodeId) {
    leader_becomes(group, |now| now != Some(from)).await;
}

/// Resolves once the leader this node knows of satisfies `wanted`.
async fn leader_becomes(group: &Group, wanted: impl Fn(Option<NodeId>) -> bool) {
    let mut metrics = group.raft().server_metrics();
    loop {
        if wanted(metrics.borrow_and_update().current_leader) {
            return;
        }
        if metrics.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// On the leader: commands forwarded by a follower join this node's own
/// queue, so every write shares one batching pipeline (bigger entries, fewer
/// fsyncs). Refused whole if the queue cannot take them all.
pub(super) async fn accept_forwarded(
    node: &Node,
    group: &Group,
    cmds: Vec<Write>,
) -> Result<Vec<Result<Outcome, RemoteFailure>>, RemoteFailure> {
    if !group.is_leader() {
        return Err(RemoteFailure::NotLeader {
            leader: group.leader().map(|(id, _)| id),
        });
    }
    let n = cmds.len();
    let rx = group.queue().push(cmds).map_err(|e| match e {
        NodeError::Overloaded(_) => {
            RemoteFailure::Unavailable("the leader's write queue is full".into())
        }
        e => RemoteFailure::from(e),
    })?;
    let timeout = node.queue_config().write_timeout;
    let each = match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(each)) => each,
        Ok(Err(_)) => vec![Err(NodeError::Unavailable("leader is shutting down".into())); n],
        Err(_) => vec![
            Err(NodeError::Unavailable(format!(
                "not committed within {timeout:?}"
            )));
            n
        ],
    };
    Ok(each
        .into_iter()
        .map(|r| r.map_err(RemoteFailure::from))
        .collect())
}

/// On the leader: stamps the batch with the clock and a seed, proposes it as
/// one entry and waits for it to be applied: at most `write_timeout`, and
/// less if the leader stops hearing from a quorum meanwhile.
pub(super) async fn propose_as_leader(
    node: &Node,
    group: &Group,
    writes: Vec<Write>,
) -> Result<Vec<Outcome>, RemoteFailure> {
    quorum_fresh(node, group).await?;
    let n = writes.len();
    let mut writes = writes;
    // A batch that adds ready work or frees capacity ends with a dispatch
    // round, so new tasks are leased in the entry that commits them instead
    // of one entry later (the queue-shard actor covers everything else).
    // Only the meta group dispatches until the queue moves to the shards
    // (docs/shards.md, step 2): a shard's replica has no agents to lease to.
    let piggyback = group.id() == META_GROUP
        && node.config().dispatch() == crate::config::DispatchMode::Push
        && writes.iter().any(|w| frees_or_adds_work(&w.command))
        && !writes
            .iter()
            .any(|w| matches!(w.command, Command::Dispatch(_)));
    if piggyback {
        writes.push(Command::Dispatch(crate::actors::dispatch_spec(node)).into());
    }
    let batch = Batch::of(clock::now_ms(), rand::random(), writes);
    let timeout = node.queue_config().write_timeout;
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = group.raft().client_write(Request::Batch(batch)) => match r {
            Ok(resp) => {
                let mut outcomes = resp.data.outcomes;
                group.state().hold_reply_payloads(&mut outcomes);
                if piggyback && let Some(Ok(crate::fsm::Reply::Dispatched(grants))) = outcomes.get(n) {
                    crate::metrics::global().dispatch_leases.inc_by(grants.len() as u64);
                }
                if group.id() == META_GROUP {
                    hint_grants(node, &outcomes, resp.log_id.index);
                }
                outcomes.truncate(n);
                Ok(outcomes)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(RemoteFailure::NotLeader { leader: f.leader_id })
            }
            Err(e) => Err(RemoteFailure::Unavailable(e.to_string())),
        },
        e = quorum_lost(node, group) => Err(e),
        _ = tokio::time::sleep(timeout) => Err(RemoteFailure::Unavailable(format!("not committed within {timeout:?}"))),
    };
    let m = crate::metrics::global();
    m.proposals
        .with_label_values(&[if result.is_ok() {
            "committed"
        } else {
            "failed"
        }])
        .inc();
    m.batch_commands.observe(n as f64);
    m.commit_seconds.observe(started.elapsed().as_secs_f64());
    result
}

/// Hands every lease granted by the entry's dispatch rounds (the queue
/// shard's and the piggybacked one) to the fabric, which hints the nodes
/// running their agents. Never waits.
fn hint_grants(node: &Node, outcomes: &[Outcome], index: u64) {
    let grants: Vec<crate::fsm::LeaseGrant> = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok(crate::fsm::Reply::Dispatched(g)) => Some(g.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect();
    crate::fabric::dispatched(node, grants, index);
}

/// Whether a command may make a dispatch round lease something: it adds a
/// ready task or ends a lease (freeing an agent).
fn frees_or_adds_work(c: &Command) -> bool {
    matches!(
        c,
        Command::Submit(_)
            | Command::SubmitRouted { .. }
            | Command::Complete { .. }
            | Command::Fail { .. }
            | Command::Release { .. }
            | Command::Retry { .. }
            | Command::Replay { .. }
            | Command::Cancel { .. }
            | Command::Approve { .. }
            | Command::Reject { .. }
    )
}

/// How long a leader may go without a quorum's acknowledgement before it
/// refuses writes: one election timeout (by then the majority has elected
/// someone else, or is unreachable).
fn quorum_limit_ms(node: &Node) -> u64 {
    node.config().raft.election_timeout_max.as_millis() as u64
}

/// A leader that has not heard from a quorum for a whole election timeout is
/// probably on the minority side: refuse rather than hang.
///
/// A stale figure is confirmed before it counts. openraft computes
/// `millis_since_quorum_ack` when it reports metrics, so a leader whose
/// runtime was starved of CPU for a moment (two cores, a build beside it)
/// reads a figure taken before it processed the acknowledgements that
/// queued meanwhile. So it waits for newer reports, at most one more limit;
/// a leader that is really cut off refuses that much later.
async fn quorum_fresh(node: &Node, group: &Group) -> Result<(), RemoteFailure> {
    let limit = quorum_limit_ms(node);
    let mut metrics = group.raft().metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(limit);
    loop {
        let since_ack = metrics.borrow_and_update().millis_since_quorum_ack;
        let ms = match since_ack {
            Some(ms) if ms > limit => ms,
            _ => return Ok(()),
        };
        let newer = tokio::time::timeout_at(deadline, metrics.changed()).await;
        if !matches!(newer, Ok(Ok(()))) {
            return Err(RemoteFailure::Unavailable(format!(
                "leader has not heard from a quorum for {ms} ms"
            )));
        }
    }
}

/// Resolves when the leader has lost touch with its quorum (checked every
/// heartbeat), so a write in flight fails fast instead of waiting out its timeout.
async fn quorum_lost(node: &Node, group: &Group) -> RemoteFailure {
    loop {
        tokio::time::sleep(node.config().raft.heartbeat_interval).await;
        if let Err(e) = quorum_fresh(node, group).await {
            return e;
        }
    }
}

/// On the group's leader, proposes a tick whenever a state-machine timer
/// is due. The meta group's; each queue shard's timers are its keeper
/// actor's (`actors/keeper.rs`).
pub(super) async fn tick_loop(node: Node, group: Group) {
    let every = node.queue_config().tick_interval;
    let shutdown = node.shutdown_token().clone();
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = timer.tick() => {}
        }
        if !tick_if_due(&node, &group).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// On the group's leader, proposes a tick if a state-machine timer is due,
/// then a purge if finished tasks are past retention; false when one was
/// due and did not commit.
pub(crate) async fn tick_if_due(node: &Node, group: &Group) -> bool {
    if !group.is_leader() {
        return true;
    }
    let due = group.state().read(|s| s.next_due_ms());
    if due.is_some_and(|d| d <= clock::now_ms())
        && let Err(e) = node.write_in(group, Command::Tick.into()).await
    {
        tracing::debug!(group = group.id(), error = %e, "tick not committed");
        return false;
    }
    purge_if_due(node, group).await
}

/// On the group's leader, proposes a [`Command::Purge`] when finished tasks
/// are past `queue.retain_finished` or over `queue.retain_finished_max`, or
/// dead letters past `queue.retain_dead_letters`; false when one was due
/// and did not commit. One purge forgets at most `Limits::MAX_PURGE`; the
/// next tick takes the rest.
async fn purge_if_due(node: &Node, group: &Group) -> bool {
    let q = node.queue_config();
    let now = clock::now_ms();
    let horizon = crate::fsm::Horizon {
        finished_before_ms: now.saturating_sub(q.retain_finished.as_millis() as u64),
        keep: q.retain_finished_max,
        dead_before_ms: now.saturating_sub(q.retain_dead_letters.as_millis() as u64),
    };
    let (due, dead) = group.state().read(|s| {
        (
            s.purge_due(horizon),
            s.dead_letters_before(
                horizon.dead_before_ms,
                crate::fsm::Limits::MAX_PURGE as usize,
            ),
        )
    });
    if !due {
        return true;
    }
    let purge = Command::Purge {
        finished_before_ms: horizon.finished_before_ms,
        keep: horizon.keep,
        max: crate::fsm::Limits::MAX_PURGE,
        dead_before_ms: horizon.dead_before_ms,
    };
    match node.write_in(group, purge.into()).await {
        Ok(Ok(crate::fsm::Reply::Purged(n))) => {
            crate::metrics::global().tasks_purged.inc_by(u64::from(n));
            tracing::debug!(group = group.id(), purged = n, "finished tasks purged");
            // Dead letters are what an operator may still want: say so
            // when they go (at most this many, fewer if some were kept).
            if dead > 0 {
                tracing::info!(
                    group = group.id(),
                    dead_letters = dead,
                    retain_dead_letters = ?q.retain_dead_letters,
                    "purging dead letters past queue.retain_dead_letters"
                );
            }
            true
        }
        Ok(other) => {
            tracing::warn!(group = group.id(), outcome = ?other, "purge refused");
            true
        }
        Err(e) => {
            tracing::debug!(group = group.id(), error = %e, "purge not committed");
            false
        }
    }
}

/// Records this node's heartbeat (region, API address) in the node registry
/// at a fixed interval, through the normal write path; a heartbeat that did
/// not commit (no leader yet, say) is retried soon rather than a whole
/// interval later.
pub(super) async fn heartbeat_loop(node: Node) {
    /// Delay before retrying a heartbeat that did not commit.
    const RETRY: Duration = Duration::from_millis(250);
    let shutdown = node.shutdown_token().clone();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let info = node.info();
        let cmd = Command::NodeHeartbeat {
            id: node.id(),
            region: info.region.clone(),
            api_addr: info.api_addr.clone(),
        };
        let sent = std::time::Instant::now();
        let committed = match node.write(cmd).await {
            Ok(Ok(_)) => true,
            Ok(Err(rejected)) => {
                // Applied, so committed: the majority heard it.
                tracing::warn!(error = %rejected, "node heartbeat rejected");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "node heartbeat not committed; retrying");
                false
            }
        };
        // Contact counts only once this node's own replica has applied
        // everything committed by then (a read barrier): a node back from
        // a pause must not see its heartbeat commit while its replica still
        // places a gateway here that the majority has moved away.
        wait = match (committed, committed && node.read_barrier().await.is_ok()) {
            (true, true) => {
                node.inner.contact.committed(sent);
                node.queue_config().node_heartbeat_interval
            }
            _ => RETRY,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::SubmitTask;

    /// A job of `n` submits with `payload` bytes each, queued on `queue`.
    fn queue_job(queue: &Queue, n: usize, payload: usize) {
        let writes = (0..n)
            .map(|_| {
                Command::Submit(SubmitTask {
                    payload: "x".repeat(payload),
                    ..SubmitTask::default()
                })
                .into()
            })
            .collect();
        queue.push(writes).unwrap();
    }

    /// The batches `gather` makes of everything waiting: commands per
    /// batch, and jobs per batch.
    fn batches(rx: &mut mpsc::UnboundedReceiver<Job>, max: BatchMax) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut carried = None;
        while let Some(first) = carried.take().or_else(|| rx.try_recv().ok()) {
            let ((cmds, replies), rest) = gather(first, rx, max);
            out.push((cmds.len(), replies.len()));
            carried = rest;
        }
        out
    }

    #[test]
    fn batches_close_at_the_byte_bound() {
        let (queue, mut rx) = Queue::new(100_000);
        // Ten single submits of 100 KiB: 1 MiB in all.
        for _ in 0..10 {
            queue_job(&queue, 1, 100 * 1024);
        }
        let max = BatchMax {
            commands: 1000,
            bytes: 256 * 1024,
        };
        // Two fit under 256 KiB, a third does not.
        assert_eq!(batches(&mut rx, max), vec![(2, 2); 5]);
    }

    #[test]
    fn batches_close_at_the_command_bound_and_never_split_a_job() {
        let (queue, mut rx) = Queue::new(100_000);
        queue_job(&queue, 3, 10);
        queue_job(&queue, 3, 10);
        queue_job(&queue, 5, 10);
        queue_job(&queue, 1, 10);
        let max = BatchMax {
            commands: 4,
            bytes: 1 << 20,
        };
        // 3 (the next 3 would pass 4), 3, 5 alone (past the bound, whole), 1.
        assert_eq!(batches(&mut rx, max), vec![(3, 1), (3, 1), (5, 1), (1, 1)]);
    }

    #[test]
    fn a_job_past_the_byte_bound_is_an_entry_of_its_own() {
        let (queue, mut rx) = Queue::new(100_000);
        queue_job(&queue, 1, 10);
        queue_job(&queue, 4, 100 * 1024);
        queue_job(&queue, 1, 10);
        let max = BatchMax {
            commands: 1000,
            bytes: 64 * 1024,
        };
        assert_eq!(batches(&mut rx, max), vec![(1, 1), (4, 1), (1, 1)]);
    }

    #[test]
    fn small_jobs_fill_a_batch() {
        let (queue, mut rx) = Queue::new(100_000);
        for _ in 0..2500 {
            queue_job(&queue, 1, 40);
        }
        let max = BatchMax {
            commands: 1000,
            bytes: 8 << 20,
        };
        assert_eq!(
            batches(&mut rx, max),
            vec![(1000, 1000), (1000, 1000), (500, 500)]
        );
    }
}
