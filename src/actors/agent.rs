//! The Agent actor: one per registered agent of a gateway placed on this
//! node. The shard leader's dispatch leases tasks to it; it runs each
//! through its gateway's driver, renews all its leases in one batched
//! command every third of the lease, and reports completion or failure with
//! the fencing token.
//!
//! It learns of its leases from the committed state: the node's lease
//! router hints it (`Granted`, `Lost`) as entries apply, and it reconciles
//! with its committed leases on a timer and on a leader change (`Sync`), so
//! a lost hint delays an attempt but never loses or doubles one.
//!
//! # Hints from the leader
//!
//! With the actor fabric on, the leader also sends a follower's agent each
//! grant as soon as the dispatch round commits (`Hinted`), before the local
//! replica applies it. The grant is committed (the leader applied it), so
//! the agent may start at once, but it cannot check the lease against its
//! replica yet. What it keeps instead:
//!
//! - a token runs at most once per incarnation: `running` and `skip` guard
//!   it, and a hinted token stays in `skip` (and its attempt is not stopped
//!   by `Sync`) until the replica has applied the hint's entry, so the
//!   router's `Granted` for the same token is a no-op;
//! - once the replica has applied the entry, a hint is handled exactly as
//!   the router's `Granted` (the replica is the judge);
//! - before that, the agent starts only if the hint names this agent and
//!   its token, the lease has not lapsed by this node's clock, and the
//!   replica (older than the grant) still places the agent's gateway here;
//!   the leader sent it only because its own state, which includes the
//!   grant, places the gateway here too;
//! - what it cannot rule out: the gateway moving away in an entry the
//!   replica has not applied yet. The attempt then runs on the old owner
//!   until its replica applies the move (its actor is stopped, the attempt
//!   cancelled), while the new owner's agent releases the lease at start;
//!   the fencing token makes the old attempt's report stale, so at most one
//!   result is ever accepted. The router path has the same window (a move
//!   after the grant applied), only shorter.
//!
//! Its attempts live and die with it: they are cancelled when the actor
//! stops or fails. A new incarnation (restart, node restart, gateway moved
//! here) announces the agent online on this node (`AgentOnline`; dispatch
//! leases only to agents online on their gateway's owner) and in the same
//! command gives back the leases its agent still holds, since nobody runs
//! them any more; their tasks are leased again at once, with new tokens.
//! It announces again whenever the registry shows it offline here (the
//! gateway moved away and back between two reconciles).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::router::AgentDirectory;
use super::session::SessionHost;
use crate::fsm::{AgentId, Command, FencingToken, LeaseGrant, Rejection, Reply, Task, TaskId};
use crate::gateway::{CircuitBreaker, DriverError, GatewayDriver, RunRequest};
use crate::node::Node;

/// The agent actor.
pub struct AgentActor;

/// What an agent actor starts with.
#[derive(Clone)]
pub struct AgentArgs {
    /// The node it proposes through.
    pub node: Node,
    /// The agent.
    pub id: AgentId,
    /// Its gateway's driver.
    pub driver: Arc<dyn GatewayDriver>,
    /// Where it announces itself to the node's lease router.
    pub directory: AgentDirectory,
    /// Its gateway's session actors: a task with a session key runs in its
    /// session's actor.
    pub sessions: SessionHost,
}

/// Messages: verbs.
pub enum AgentMsg {
    /// A lease for this agent was committed (a hint from the router).
    Granted {
        /// The lease.
        token: FencingToken,
        /// Its task.
        task: TaskId,
    },
    /// A lease of this agent ended without its report (expired, released,
    /// cancelled): stop the attempt.
    Lost {
        /// The task.
        task: TaskId,
        /// The lease that ended; `None` for every lease of the task (it
        /// was cancelled). By token, because the task may already run here
        /// under a newer lease: a lease given back is granted again at once,
        /// and the new grant's hint may come first.
        token: Option<FencingToken>,
    },
    /// A lease the leader committed for this agent, sent over the fabric
    /// before the local replica applied it (see "Hints from the leader").
    Hinted {
        /// The grant as the leader applied it.
        grant: LeaseGrant,
        /// The log index of the entry that granted it.
        committed_index: u64,
    },
    /// Reconcile attempts with the committed leases.
    Sync,
    /// An announcement ended (committed or not).
    Announced(bool),
    /// Renew every lease in one command.
    Renew,
    /// These leases were refused as stale by a renew.
    Stale(Vec<FencingToken>),
    /// Fail now, as a panic in a handler would (fault injection for drills
    /// and tests, behind `runtime.fault_injection`).
    Crash,
    /// An attempt ended: reported, stopped, or (`given_up`) its result
    /// could not be committed, so its lease is left to lapse.
    Ended {
        /// The lease.
        token: FencingToken,
        /// Whether the lease is still live but must not be run again.
        given_up: bool,
        /// What it says of the agent, for its breaker: `Some(true)` it
        /// completed, `Some(false)` it failed for reasons not the gateway's,
        /// `None` nothing (not run, stopped, the gateway's fault).
        verdict: Option<bool>,
    },
    /// Hang in the handler this long, as an actor stuck on a call would
    /// (fault injection for drills and tests, behind
    /// `runtime.fault_injection`).
    Stall(Duration),
    /// The agent's breaker report was written (`true`) or not.
    CircuitReported(crate::fsm::Circuit, bool),
}

// Local only: never sent to another node.
impl ractor::Message for AgentMsg {}

/// One running attempt.
struct Attempt {
    task: TaskId,
    cancel: CancellationToken,
}

/// The actor's cache of its attempts.
pub struct AgentState {
    args: AgentArgs,
    running: HashMap<FencingToken, Attempt>,
    /// Leases this incarnation must not run (again): those of an earlier
    /// one (given back at start) and those it already ran. Pruned to the
    /// live ones on every sync.
    skip: HashSet<FencingToken>,
    /// The last announcement failed: try again on the next sync.
    announce_due: bool,
    /// An announcement is being written.
    announce_in_flight: bool,
    /// Leases started from a hint, with the index of their entry, until the
    /// local replica applies it: `Sync` neither stops them nor drops them
    /// from `skip` meanwhile.
    hinted: HashMap<FencingToken, u64>,
    /// Parent of every attempt's cancel token: dropping the state (stop or
    /// failure) cancels them all.
    attempts: CancellationToken,
    /// Its own circuit breaker (`runtime.agent_breaker`): attempts that
    /// keep failing for reasons not the gateway's open it, and the
    /// registry takes it out of dispatch while it is open.
    breaker: CircuitBreaker,
    /// The breaker state the registry was last told of (`None`: closed, as
    /// the announcement left it, or unknown).
    circuit_reported: Option<crate::fsm::Circuit>,
    /// A breaker report is being written.
    circuit_in_flight: bool,
    _cancel_on_drop: DropGuard,
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        args: AgentArgs,
    ) -> Result<AgentState, ActorProcessingErr> {
        // Whatever the agent holds now, nobody here runs: an earlier
        // incarnation's leases. Give them back as the agent comes online.
        // The replica must show every lease committed so far first: a node
        // restarted after a SIGKILL replays its log only up to its last
        // durable commit index, so a grant its previous process was running
        // may not have applied yet; missed here, it would be run again, with
        // the same token, once it applies (found by the chaos drills). A
        // read barrier is not enough: a restarted leader that resumes its
        // term answers it with its stale commit index. So the replica must
        // also have applied this node's own log, which holds every grant the
        // previous process ran here. Not there in time: no start (the
        // reconciler, or the restart policy, retries).
        replica_has_own_log(&args.node).await.map_err(|e| {
            ActorProcessingErr::from(format!(
                "agent {}: cannot read its committed leases: {e}",
                args.id
            ))
        })?;
        args.directory.insert(args.id.clone(), myself.clone());
        let orphans = held(&args);
        let announced = announce(&args, orphans.clone()).await;
        let skip: HashSet<FencingToken> = orphans.into_iter().collect();
        let attempts = CancellationToken::new();
        let lease = args.node.queue_config().default_lease;
        let sync = args.node.config().runtime.agent_sync_interval;
        let args_breaker = args.node.config().runtime.agent_breaker.clone();
        args.directory.beat(&args.id);
        args.directory.set_breaker_open(&args.id, false);
        myself.send_interval(renew_every(lease), || AgentMsg::Renew);
        myself.send_interval(sync, || AgentMsg::Sync);
        Ok(AgentState {
            args,
            running: HashMap::new(),
            skip,
            announce_due: !announced,
            announce_in_flight: false,
            hinted: HashMap::new(),
            _cancel_on_drop: attempts.clone().drop_guard(),
            attempts,
            breaker: CircuitBreaker::new(args_breaker),
            circuit_reported: Some(crate::fsm::Circuit::Closed),
            circuit_in_flight: false,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<AgentMsg>,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        state.args.directory.remove(&state.args.id, &myself);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Granted { token, task } => start_if_live(&myself, state, token, task),
            AgentMsg::Hinted {
                grant,
                committed_index,
            } => start_hinted(&myself, state, grant, committed_index),
            AgentMsg::Lost { task, token } => {
                for (t, a) in &state.running {
                    if a.task == task && token.is_none_or(|lost| lost == *t) {
                        a.cancel.cancel();
                    }
                }
            }
            AgentMsg::Sync => {
                state.args.directory.beat(&state.args.id);
                if let Some(t) = state.breaker.poll(std::time::Instant::now()) {
                    tracing::info!(agent = %state.args.id, from = ?t.from, to = ?t.to, "agent circuit breaker changed state");
                    state.args.directory.set_breaker_open(&state.args.id, false);
                }
                report_circuit(&myself, state);
                sync(&myself, state);
            }
            AgentMsg::Announced(ok) => {
                state.announce_in_flight = false;
                state.announce_due = !ok;
            }
            AgentMsg::Crash => {
                return Err(ActorProcessingErr::from(
                    "crash requested through fault injection",
                ));
            }
            AgentMsg::Stall(d) => tokio::time::sleep(d).await,
            AgentMsg::Renew => renew(&myself, state),
            AgentMsg::Stale(tokens) => {
                for t in tokens {
                    if let Some(a) = state.running.get(&t) {
                        a.cancel.cancel();
                    }
                }
            }
            AgentMsg::CircuitReported(c, ok) => {
                state.circuit_in_flight = false;
                if ok {
                    state.circuit_reported = Some(c);
                }
            }
            AgentMsg::Ended {
                token,
                given_up,
                verdict,
            } => {
                let now = std::time::Instant::now();
                let t = match verdict {
                    Some(true) => state.breaker.on_success(now),
                    Some(false) => state.breaker.on_failure(now),
                    None => None,
                };
                if let Some(t) = t {
                    tracing::warn!(agent = %state.args.id, from = ?t.from, to = ?t.to, "agent circuit breaker changed state");
                    state.args.directory.set_breaker_open(
                        &state.args.id,
                        t.to == crate::gateway::BreakerState::Open,
                    );
                    report_circuit(&myself, state);
                }
                state.running.remove(&token);
                // Never run a lease twice: the local replica may still show
                // it live until the result (committed on the leader) applies
                // here, and a lease given up on must lapse unrun.
                state.skip.insert(token);
                if given_up {
                    tracing::debug!(agent = %state.args.id, %token, "lease left to lapse");
                }
            }
        }
        Ok(())
    }
}

/// The breaker's state as the registry names it.
fn circuit_of(b: &CircuitBreaker) -> crate::fsm::Circuit {
    match b.state() {
        crate::gateway::BreakerState::Closed => crate::fsm::Circuit::Closed,
        crate::gateway::BreakerState::Open => crate::fsm::Circuit::Open,
        crate::gateway::BreakerState::HalfOpen => crate::fsm::Circuit::HalfOpen,
    }
}

/// Tells the registry the breaker's state when it differs from what the
/// replica shows (a report lost, or a new state), one report at a time.
fn report_circuit(myself: &ActorRef<AgentMsg>, state: &mut AgentState) {
    let now = circuit_of(&state.breaker);
    let id = state.args.id.clone();
    let shown = state
        .args
        .node
        .state()
        .read(|s| s.registry().agent(&id).map(|a| a.circuit));
    if state.circuit_in_flight || (shown == Some(now) && state.circuit_reported == Some(now)) {
        return;
    }
    state.circuit_in_flight = true;
    let node = state.args.node.clone();
    let me = myself.clone();
    tokio::spawn(async move {
        let cmd = Command::ReportAgent {
            agent: id.clone(),
            node: node.id(),
            circuit: Some(now),
            silent: None,
        };
        let ok = matches!(node.write(cmd).await, Ok(Ok(_)));
        if !ok {
            tracing::debug!(agent = %id, circuit = ?now, "agent breaker not reported yet; retrying next sync");
        }
        let _ = me.send_message(AgentMsg::CircuitReported(now, ok));
    });
}

/// A third of the lease, so two renewals may be lost before it lapses.
fn renew_every(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(50))
}

/// Announces the agent online on this node (`AgentOnline`), giving back
/// `orphans` (its leases nobody here runs) in the same command. Returns
/// whether it committed.
async fn announce(args: &AgentArgs, orphans: Vec<FencingToken>) -> bool {
    // With several shards the orphans are theirs: each gives its own back
    // first (the node pulls nothing for the agent until it is online).
    let mut release = orphans.clone();
    if args.node.shard_groups().len() > 1 {
        for (group, tokens) in by_group(&args.node, std::mem::take(&mut release)) {
            let cmd = Command::Release { tokens };
            if let Err(e) = args.node.write_to(group, cmd).await {
                tracing::warn!(agent = %args.id, group, error = %e, "orphan leases not given back yet; retrying");
                return false;
            }
        }
    }
    let cmd = Command::AgentOnline {
        agent: args.id.clone(),
        node: args.node.id(),
        release,
    };
    match args.node.write(cmd).await {
        Ok(Ok(_)) => {
            tracing::info!(agent = %args.id, released = orphans.len(), "agent online");
            true
        }
        other => {
            tracing::warn!(agent = %args.id, outcome = ?other.map(|o| o.err()), "agent not announced yet; retrying");
            false
        }
    }
}

/// Waits (bounded by the write timeout) until the local replica of every
/// group routed to has applied every entry committed before the call and
/// every entry of this node's own log of the group.
async fn replica_has_own_log(node: &Node) -> Result<(), String> {
    for group in node.routed_groups() {
        node.read_barrier_in(group)
            .await
            .map_err(|e| format!("group {}: {e}", group.id()))?;
        let last = group.raft().metrics().borrow().last_log_index;
        group
            .raft()
            .wait(Some(node.queue_config().write_timeout))
            .applied_index_at_least(last, "agent start")
            .await
            .map_err(|e| format!("group {}: own log not applied yet: {e}", group.id()))?;
    }
    Ok(())
}

/// The agent's live leases in the local replicas of the queue groups.
fn held(args: &AgentArgs) -> Vec<FencingToken> {
    args.node
        .agent_leases(&args.id)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// `tokens` by the queue group that granted them (tokens carry it); one
/// naming no group of the cluster is dropped (no lease has it).
fn by_group(node: &Node, tokens: Vec<FencingToken>) -> BTreeMap<u32, Vec<FencingToken>> {
    let mut out: BTreeMap<u32, Vec<FencingToken>> = BTreeMap::new();
    for t in tokens {
        if let Ok(g) = node.queue_group_of(t.0) {
            out.entry(g.id()).or_default().push(t);
        }
    }
    out
}

/// Whether the committed registry has this agent's gateway on this node
/// but the agent not online here (first start, a restart, or the gateway
/// moved away and back).
fn needs_announce(args: &AgentArgs) -> bool {
    let here = args.node.id();
    args.node.state().read(|s| {
        placed_here(s, &args.id, here)
            && s.registry()
                .agent(&args.id)
                .is_some_and(|a| a.online_on != Some(here))
    })
}

/// Starts an attempt for `token` if it is still this agent's live lease in
/// the local replica, the agent's gateway is still placed on this node, and
/// it was not run already. The placement check reads the same replica as
/// the lease, so a lease granted after the gateway moved away is never run
/// here (its entry applies after the move's).
fn start_if_live(
    myself: &ActorRef<AgentMsg>,
    state: &mut AgentState,
    token: FencingToken,
    id: TaskId,
) {
    if state.running.contains_key(&token) || state.skip.contains(&token) {
        return;
    }
    let me = &state.args.id;
    let here = state.args.node.id();
    let node = &state.args.node;
    if !node.state().read(|s| placed_here(s, me, here)) {
        return;
    }
    // With several shards the lease is in its shard's replica, read after
    // the placement: a move applied in between is caught by the fence the
    // attempt carries (as with a move after the grant applied).
    let Ok(group) = node.queue_group_of(token.0) else {
        return;
    };
    let task = group.state().read(|s| {
        s.task_shared(id).filter(|t| {
            t.lease
                .as_ref()
                .is_some_and(|l| l.token == token && l.agent_id == *me)
        })
    });
    let Some(task) = task else {
        return;
    };
    spawn_attempt(myself, state, token, task);
}

/// The fence of this agent's gateway if the replica places it on this node.
fn fence_here(args: &AgentArgs) -> Option<crate::gateway::GatewayFence> {
    let here = args.node.id();
    args.node.state().read(|s| {
        gateway_here(s, &args.id, here).map(|g| crate::gateway::GatewayFence {
            gateway: g.reg.id.clone(),
            owner: here,
            token: g.placement_token,
        })
    })
}

/// `agent`'s gateway in the replica `s`, if it places it on node `here`.
fn gateway_here<'s>(
    s: &'s crate::fsm::State,
    agent: &AgentId,
    here: crate::raft::NodeId,
) -> Option<&'s crate::fsm::GatewayRecord> {
    let reg = s.registry();
    reg.agent(agent)
        .and_then(|a| reg.gateway(&a.reg.gateway))
        .filter(|g| g.owner == Some(here))
}

/// Whether the replica places `agent`'s gateway on node `here`.
fn placed_here(s: &crate::fsm::State, agent: &AgentId, here: crate::raft::NodeId) -> bool {
    gateway_here(s, agent, here).is_some()
}

/// Starts an attempt for a lease the leader hinted (see "Hints from the
/// leader" above for what is checked and why).
fn start_hinted(
    myself: &ActorRef<AgentMsg>,
    state: &mut AgentState,
    grant: LeaseGrant,
    committed_index: u64,
) {
    let token = grant.token;
    if state.running.contains_key(&token) || state.skip.contains(&token) {
        return;
    }
    let me = &state.args.id;
    let here = state.args.node.id();
    let (applied, placed) = state
        .args
        .node
        .state()
        .read_indexed(|applied, s| (applied, placed_here(s, me, here)));
    if applied >= committed_index {
        return start_if_live(myself, state, token, grant.task.id);
    }
    let now = crate::clock::now_ms();
    let lease_ok = grant
        .task
        .lease
        .as_ref()
        .is_some_and(|l| l.token == token && l.agent_id == *me && l.expires_at_ms > now);
    if !placed || !lease_ok {
        tracing::debug!(agent = %me, %token, placed, lease_ok, "hint ignored");
        return;
    }
    tracing::debug!(agent = %me, %token, task = %grant.task.id, committed_index, applied, "starting a hinted lease ahead of the replica");
    crate::metrics::global().hints_started.inc();
    state.hinted.insert(token, committed_index);
    spawn_attempt(myself, state, token, grant.task);
}

/// Records and spawns one attempt.
fn spawn_attempt(
    myself: &ActorRef<AgentMsg>,
    state: &mut AgentState,
    token: FencingToken,
    task: Arc<Task>,
) {
    let id = task.id;
    if state.breaker.state() == crate::gateway::BreakerState::Open {
        // Granted before the registry heard the breaker open: given back
        // unrun, no attempt spent (another agent takes it).
        state.skip.insert(token);
        tracing::info!(agent = %state.args.id, task = %id, "agent breaker open; lease given back");
        crate::metrics::global()
            .attempts
            .with_label_values(&["agent_circuit_open"])
            .inc();
        let node = state.args.node.clone();
        tokio::spawn(async move {
            let cmd = Command::Release {
                tokens: vec![token],
            };
            if let Ok(group) = node.queue_group_of(id.0) {
                let _ = node.write_to(group.id(), cmd).await;
            }
        });
        return;
    }
    let cancel = state.attempts.child_token();
    state.running.insert(
        token,
        Attempt {
            task: id,
            cancel: cancel.clone(),
        },
    );
    tokio::spawn(attempt(
        state.args.clone(),
        task,
        token,
        cancel,
        myself.clone(),
    ));
}

/// Reconciles attempts with the committed leases: adopts leases whose hint
/// was lost, stops attempts whose lease is gone.
fn sync(myself: &ActorRef<AgentMsg>, state: &mut AgentState) {
    if !state.announce_in_flight && (state.announce_due || needs_announce(&state.args)) {
        // Offline: dispatch grants nothing new, so every lease held and not
        // running here is an orphan to give back.
        let orphans: Vec<FencingToken> = held(&state.args)
            .into_iter()
            .filter(|t| !state.running.contains_key(t))
            .collect();
        state.skip.extend(orphans.iter().copied());
        let (args, me) = (state.args.clone(), myself.clone());
        state.announce_in_flight = true;
        tokio::spawn(async move {
            let ok = announce(&args, orphans).await;
            let _ = me.send_message(AgentMsg::Announced(ok));
        });
    }
    // Hints are of the meta group's grants (the one group with push).
    let applied = state.args.node.state().read_indexed(|applied, _| applied);
    let live: HashMap<FencingToken, TaskId> = state
        .args
        .node
        .agent_leases(&state.args.id)
        .into_iter()
        .collect();
    // Hinted leases whose entry the replica has applied are judged by it.
    state.hinted.retain(|_, index| *index > applied);
    let ahead = &state.hinted;
    for (token, a) in &state.running {
        if !live.contains_key(token) && !ahead.contains_key(token) {
            a.cancel.cancel();
        }
    }
    state
        .skip
        .retain(|t| live.contains_key(t) || ahead.contains_key(t));
    for (token, task) in live {
        start_if_live(myself, state, token, task);
    }
}

/// Renews all running leases in one command; stale ones are stopped.
fn renew(myself: &ActorRef<AgentMsg>, state: &AgentState) {
    if state.running.is_empty() {
        return;
    }
    let tokens: Vec<FencingToken> = state.running.keys().copied().collect();
    let node = state.args.node.clone();
    let lease_ms = node.queue_config().default_lease.as_millis() as u64;
    let me = myself.clone();
    tokio::spawn(async move {
        for (group, tokens) in by_group(&node, tokens) {
            match node
                .write_to(group, Command::RenewMany { tokens, lease_ms })
                .await
            {
                Ok(Ok(Reply::Renewed { stale })) if !stale.is_empty() => {
                    let _ = me.send_message(AgentMsg::Stale(stale));
                }
                Ok(Ok(_)) => {}
                Ok(Err(r)) => tracing::warn!(error = %r, group, "renew refused"),
                Err(e) => {
                    tracing::debug!(error = %e, group, "renew not committed; retrying next period")
                }
            }
        }
    });
}

/// One attempt: run it through the driver until it ends or the lease is
/// lost, then report the outcome with the fencing token.
async fn attempt(
    args: AgentArgs,
    task: Arc<Task>,
    token: FencingToken,
    cancel: CancellationToken,
    actor: ActorRef<AgentMsg>,
) {
    let m = crate::metrics::global();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    m.dispatch_seconds
        .observe(now_ms.saturating_sub(task.created_at_ms) as f64 / 1000.0);
    // A node cut off from the majority makes no gateway call: its replica
    // may be behind a move of the gateway (a node back from a pause applies
    // the grants it missed before the move that followed them). Its lease
    // lapses, or the move gives it back.
    let not_run = |given_up: bool| {
        m.attempts.with_label_values(&["stopped"]).inc();
        let _ = actor.send_message(AgentMsg::Ended {
            token,
            given_up,
            verdict: None,
        });
    };
    if args.node.cut_off() {
        tracing::info!(agent = %args.id, task = %task.id, "this node is cut off from the majority; the attempt is not run");
        return not_run(true);
    }
    // The fence is read when the call is made: the replica's placement of
    // the gateway on this node now, which no later owner's call can carry.
    let Some(fence) = fence_here(&args) else {
        // Moved away since the start was checked: the move gave the lease
        // back, and the new owner runs it.
        tracing::debug!(agent = %args.id, task = %task.id, "gateway moved away before the attempt; not run");
        return not_run(false);
    };
    // Asked again by the driver right before the call leaves: a node frozen
    // since the checks above must not call with the old fence after the
    // majority moved the gateway.
    let guard = {
        let (node, agent, placed) = (args.node.clone(), args.id.clone(), fence.token);
        crate::gateway::CallGuard::new(move || {
            let here = node.id();
            !node.cut_off()
                && node.state().read(|s| {
                    gateway_here(s, &agent, here).is_some_and(|g| g.placement_token == placed)
                })
        })
    };
    // The feature flags on for this task on this agent's gateway, as the
    // replica has them now.
    // and its role, as its registration has it.
    let (flags, role) = args.node.state().read(|s| {
        let gw = gateway_here(s, &args.id, args.node.id());
        let kind = gw.map(|g| g.reg.kind.as_str());
        let model = gw.and_then(|g| g.reg.model.as_deref());
        let role = s.registry().agent(&args.id).map(|a| {
            Arc::new(crate::gateway::RunRole {
                name: a.reg.role.clone(),
                tools: a.reg.tools.clone(),
                prompt: a.reg.prompt.clone(),
            })
        });
        (s.flags_on(&task, kind, model), role)
    });
    // A grant carries its payload; one read from this node's replica is
    // in its store. Unreadable, the attempt fails (and is retried, or
    // dead-lettered in the end) with the reason.
    let payload = match args.node.payload_of(&task) {
        Ok(p) => p,
        Err(e) => {
            m.attempts.with_label_values(&["failed"]).inc();
            let cmd = Command::Fail {
                token,
                error: format!(
                    "the task's payload could not be read on node {}: {e}",
                    args.node.id()
                ),
                retryable: true,
                usage: None,
            };
            return report_and_end(&args.node, &task, token, cmd, &cancel, &actor).await;
        }
    };
    let req = RunRequest {
        guard,
        task_id: task.id,
        fencing_token: token,
        session_key: task
            .session_key
            .as_ref()
            .map(|k| crate::fsm::gateway_session_key(&task.tenant, k)),
        payload,
        timeout: Duration::from_millis(task.timeout_ms),
        trace: None,
        fence,
        context: None,
        flags,
        role,
    };
    // A span of its own only when it is exported: an attempt's log lines
    // name its ids anyway.
    let span = if crate::otel::enabled() {
        tracing::info_span!("attempt", task = task.id.0, token = token.0)
    } else {
        tracing::Span::none()
    };
    let trace = crate::otel::adopt(&span, Some(task.trace()), task.trace().child());
    let req = RunRequest {
        trace: Some(trace),
        ..req
    };
    tracing::debug!(
        task = task.id.0,
        token = token.0,
        trace_id = %trace.trace_hex(),
        span_id = %trace.span_hex(),
        "attempt started"
    );
    let seen = match live_session(&args, &task, token).await {
        Seen::Session(s) => Some(s),
        Seen::None => None,
        Seen::Behind => {
            // Run now, it would run outside its session (the wrong
            // conversation, nothing carried): the lease goes back, no
            // attempt spent.
            tracing::info!(agent = %args.id, task = %task.id, "this node's replica has not applied the grant; lease given back");
            m.attempts.with_label_values(&["replica_behind"]).inc();
            let cmd = Command::Release {
                tokens: vec![token],
            };
            return report_and_end(&args.node, &task, token, cmd, &cancel, &actor).await;
        }
    };
    let run = match seen {
        Some(s) => {
            // The conversation's own key: a session that moved on has a
            // new one per gateway it lands on.
            let req = RunRequest {
                context: s.context,
                session_key: Some(s.key.clone()),
                ..req
            };
            Box::pin(
                args.sessions
                    .run_at(s.id, s.generation, s.key, req, cancel.clone()),
            )
        }
        None => args.driver.run(req, cancel.clone()),
    };
    let run = tracing::Instrument::instrument(run, span);
    let result = tokio::select! {
        r = run => Some(r),
        () = cancel.cancelled() => None,
    };
    // For the agent's own breaker: a completion speaks for it, a failure
    // that is not the gateway's against it.
    let verdict = match &result {
        Some(Ok(_)) => Some(true),
        // Only failures that may pass (a broken workspace, a model that
        // keeps failing here): a task that can never succeed (bad input, a
        // tool its role forbids) says nothing of the agent, and one
        // tenant's bad tasks must not take every agent out.
        Some(Err(DriverError::TaskFailed {
            retryable: true, ..
        })) if !cancel.is_cancelled() => Some(false),
        _ => None,
    };
    let (report, outcome) = match result {
        Some(Ok(out)) => (
            Some(Command::Complete {
                token,
                result: out.result_json,
            }),
            "completed",
        ),
        // Not tried: give the task back without spending an attempt; the
        // gateway actor reports the open circuit, which stops dispatch here.
        Some(Err(DriverError::CircuitOpen { .. })) => (
            Some(Command::Release {
                tokens: vec![token],
            }),
            "circuit_open",
        ),
        // The gateway refused Godel itself: not the task's fault either.
        // The breaker counts it and soon opens.
        Some(Err(e @ DriverError::Rejected { .. })) => {
            tracing::warn!(agent = %args.id, task = %task.id, error = %e, "gateway refused the attempt; lease given back");
            (
                Some(Command::Release {
                    tokens: vec![token],
                }),
                "gateway_rejected",
            )
        }
        // Not made: the guard found this node cut off or the gateway moved
        // by the time the call would have left. As when the checks at the
        // start find it: nothing reported (the move gives the lease back,
        // or it lapses), the lease given up here.
        Some(Err(DriverError::NotOwner)) => {
            tracing::info!(agent = %args.id, task = %task.id, "the gateway call was not made: this node no longer drives the gateway");
            m.attempts.with_label_values(&["stopped"]).inc();
            let _ = actor.send_message(AgentMsg::Ended {
                token,
                given_up: true,
                verdict: None,
            });
            return;
        }
        // The gateway has seen a newer owner: this node has not applied the
        // move yet, and the lease went back with it.
        Some(Err(e @ DriverError::Fenced { .. })) => {
            tracing::warn!(agent = %args.id, task = %task.id, error = %e, "gateway refused this node's fencing token; lease given back");
            (
                Some(Command::Release {
                    tokens: vec![token],
                }),
                "gateway_fenced",
            )
        }
        Some(Err(e)) if !cancel.is_cancelled() => (
            Some(Command::Fail {
                token,
                error: e.to_string(),
                retryable: e.is_retryable(),
                usage: None,
            }),
            "failed",
        ),
        _ => (None, "stopped"),
    };
    m.attempts.with_label_values(&[outcome]).inc();
    let given_up = match report {
        Some(cmd) => !report_result(&args.node, &task, cmd, &cancel).await,
        None => false,
    };
    let _ = actor.send_message(AgentMsg::Ended {
        token,
        given_up,
        verdict,
    });
}

/// Reports `cmd` for an attempt that did not run, then tells the agent it
/// ended (given up if the report did not land), with no verdict on it.
async fn report_and_end(
    node: &Node,
    task: &Task,
    token: FencingToken,
    cmd: Command,
    cancel: &CancellationToken,
    actor: &ActorRef<AgentMsg>,
) {
    let given_up = !report_result(node, task, cmd, cancel).await;
    let _ = actor.send_message(AgentMsg::Ended {
        token,
        given_up,
        verdict: None,
    });
}

/// The session an attempt runs in.
struct LiveSession {
    id: crate::fsm::SessionId,
    /// Its conversation's generation, and that conversation's key.
    generation: u32,
    key: crate::fsm::SessionKey,
    /// The carried checkpoint's turns, when the conversation is new here.
    context: Option<Arc<str>>,
}

/// How long an attempt in a session waits for this node's replica to
/// apply its lease (a grant can reach the agent before the replica has the
/// entry that made it, and the session's record with it).
const SESSION_SEEN_WAIT: Duration = Duration::from_secs(2);

/// What this node's replica says about an attempt's session.
enum Seen {
    /// It runs in this session.
    Session(LiveSession),
    /// It runs in none (no key, or none live here for it).
    None,
    /// The replica has not applied the grant yet: it cannot say.
    Behind,
}

/// The live session on this agent's gateway that `task` runs in, if it has
/// a session key (dispatch opened or reused it with the lease, in the same
/// entry: once the replica holds lease `token`, it holds the session as
/// the grant left it).
async fn live_session(args: &AgentArgs, task: &Task, token: FencingToken) -> Seen {
    let Some(key) = task.session_key.as_ref() else {
        return Seen::None;
    };
    let Ok(group) = args.node.queue_group_of(task.id.0) else {
        return Seen::None;
    };
    let until = tokio::time::Instant::now() + SESSION_SEEN_WAIT;
    // Tokens are minted in order per group: the replica has applied the
    // grant once it has minted this token.
    let applied = || group.state().read(|s| s.last_token() >= token.0);
    while !applied() {
        if tokio::time::Instant::now() >= until {
            return Seen::Behind;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = group.state().read(|s| {
        let r = s.sessions().by_key(&task.tenant, key)?;
        if r.gateway != *args.sessions.gateway() || r.state.is_terminal() {
            return None;
        }
        // The latest checkpoint holds the turns to carry (a move takes one
        // of the latest turns first; no turn completes while it moves).
        let context = r.carry.and_then(|_| {
            let cp = s.sessions().checkpoints(r.id).last()?;
            crate::fsm::carried_context(cp).map(Arc::from)
        });
        Some(LiveSession {
            id: r.id,
            generation: r.generation,
            key: r.gateway_key()?,
            context,
        })
    });
    seen.map_or(Seen::None, Seen::Session)
}

/// Tries to commit a result for up to [`REPORT_TRIES`] writes (a leader
/// change fails a write without an answer), while the lease stays renewed.
/// A retry of a result that did commit is refused as stale: harmless.
/// Returns false when no write got an answer.
async fn report_result(node: &Node, task: &Task, cmd: Command, cancel: &CancellationToken) -> bool {
    let Ok(group) = node.queue_group_of(task.id.0).map(|g| g.id()) else {
        return true;
    };
    for attempt in 1..=REPORT_TRIES {
        match node.write_to(group, cmd.clone()).await {
            Ok(Ok(_)) => return true,
            Ok(Err(Rejection::StaleToken(t))) => {
                tracing::info!(task = %task.id, token = %t, "result refused: lease lost or already reported");
                return true;
            }
            Ok(Err(r)) => {
                tracing::warn!(task = %task.id, error = %r, "result refused");
                return true;
            }
            Err(e) if attempt == REPORT_TRIES => {
                tracing::warn!(task = %task.id, error = %e, "result not committed; the lease will lapse");
            }
            Err(e) => {
                tracing::debug!(task = %task.id, error = %e, "result not committed yet; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return true,
                    () = tokio::time::sleep(REPORT_RETRY) => {}
                }
            }
        }
    }
    false
}

/// Writes tried per result.
const REPORT_TRIES: u32 = 10;
/// Pause between them.
const REPORT_RETRY: Duration = Duration::from_millis(300);
