//! The Agent actor: one per registered agent of a gateway placed on this
//! node. It leases up to its free capacity, runs each task through its
//! gateway's driver, renews the lease while the attempt runs, and reports
//! completion or failure with the fencing token.
//!
//! The actor's state is only a cache (how many attempts it is running); the
//! committed state is the truth. If the actor is restarted, the attempts of
//! its previous incarnation go on and report by their own tokens; a task
//! whose attempt was lost is leased again when its lease lapses.
//!
//! Shortcut, on purpose, until the QueueShard dispatcher exists: agents
//! pull (lease when they have room, poll when idle) instead of being pushed
//! leases by the shard leader.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::CancellationToken;

use crate::fsm::{AgentId, Command, LeaseGrant, Rejection, Reply};
use crate::gateway::{GatewayDriver, RunRequest};
use crate::node::Node;

/// Delay between lease attempts while there is nothing to lease.
pub const IDLE_POLL: Duration = Duration::from_millis(100);
/// Delay after a lease attempt that failed (no leader, overloaded).
pub const ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// The agent actor.
pub struct AgentActor;

/// What an agent actor starts with.
#[derive(Clone)]
pub struct AgentArgs {
    /// The node it proposes through.
    pub node: Node,
    /// The agent.
    pub id: AgentId,
    /// Its capabilities.
    pub capabilities: Vec<String>,
    /// Most attempts at once.
    pub capacity: u32,
    /// Its gateway's driver.
    pub driver: Arc<dyn GatewayDriver>,
}

/// Messages: verbs.
pub enum AgentMsg {
    /// Lease work if there is room.
    Poll,
    /// An attempt ended (reported or abandoned).
    Finished,
}

/// The actor's cache.
pub struct AgentState {
    args: AgentArgs,
    running: u32,
    poll_pending: bool,
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
        myself.send_message(AgentMsg::Poll)?;
        Ok(AgentState {
            args,
            running: 0,
            poll_pending: true,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Poll => {
                state.poll_pending = false;
                poll(&myself, state).await;
            }
            AgentMsg::Finished => {
                state.running = state.running.saturating_sub(1);
                if !state.poll_pending {
                    poll(&myself, state).await;
                }
            }
        }
        Ok(())
    }
}

fn schedule_poll(myself: &ActorRef<AgentMsg>, state: &mut AgentState, after: Duration) {
    if !state.poll_pending {
        state.poll_pending = true;
        myself.send_after(after, || AgentMsg::Poll);
    }
}

/// Leases up to the free capacity and starts an attempt per lease.
async fn poll(myself: &ActorRef<AgentMsg>, state: &mut AgentState) {
    let free = state.args.capacity.saturating_sub(state.running);
    if free == 0 {
        return;
    }
    let a = &state.args;
    // Nothing this agent can run in the local replica: no log entry for an
    // empty lease. The replica may lag a little; that only delays the poll.
    if !a.node.state().read(|s| s.has_ready_for(&a.capabilities)) {
        schedule_poll(myself, state, IDLE_POLL);
        return;
    }
    let lease_ms = a.node.queue_config().default_lease.as_millis() as u64;
    let cmd = Command::Lease {
        agent_id: a.id.clone(),
        capabilities: a.capabilities.clone(),
        max: free,
        lease_ms,
    };
    match a.node.write(cmd).await {
        Ok(Ok(Reply::Leased(grants))) => {
            let got = grants.len() as u32;
            for grant in grants {
                state.running += 1;
                tokio::spawn(attempt(state.args.clone(), grant, lease_ms, myself.clone()));
            }
            if got < free {
                schedule_poll(myself, state, IDLE_POLL);
            }
        }
        Ok(other) => {
            tracing::warn!(agent = %state.args.id, outcome = ?other.err(), "lease refused");
            schedule_poll(myself, state, ERROR_BACKOFF);
        }
        Err(e) => {
            tracing::debug!(agent = %state.args.id, error = %e, "lease not committed");
            schedule_poll(myself, state, ERROR_BACKOFF);
        }
    }
}

/// One attempt: run it through the driver while renewing the lease; report
/// the outcome with the fencing token. A lost lease cancels the run.
async fn attempt(args: AgentArgs, grant: LeaseGrant, lease_ms: u64, actor: ActorRef<AgentMsg>) {
    let task = &grant.task;
    let cancel = CancellationToken::new();
    let req = RunRequest {
        task_id: task.id,
        fencing_token: grant.token,
        session_key: task.session_key.clone(),
        payload: Arc::from(task.payload.as_str()),
        timeout: Duration::from_millis(task.timeout_ms),
    };
    let run = args.driver.run(req, cancel.clone());
    let renew = renew_until_lost(&args.node, grant.token, lease_ms);
    let result = tokio::select! {
        r = run => Some(r),
        () = renew => { cancel.cancel(); None }
    };
    let report = match result {
        Some(Ok(out)) => Some(Command::Complete {
            token: grant.token,
            result: out.result_json,
        }),
        Some(Err(e)) => Some(Command::Fail {
            token: grant.token,
            error: e.to_string(),
            retryable: e.is_retryable(),
        }),
        None => None,
    };
    if let Some(cmd) = report {
        match args.node.write(cmd).await {
            Ok(Ok(_)) => {}
            Ok(Err(Rejection::StaleToken(t))) => {
                tracing::info!(task = %task.id, token = %t, "result refused: lease lost")
            }
            Ok(Err(r)) => tracing::warn!(task = %task.id, error = %r, "result refused"),
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "result not committed; the lease will lapse")
            }
        }
    }
    let _ = actor.send_message(AgentMsg::Finished);
}

/// Renews every third of the lease; returns when the lease is gone (stale).
async fn renew_until_lost(node: &Node, token: crate::fsm::FencingToken, lease_ms: u64) {
    let every = Duration::from_millis((lease_ms / 3).max(50));
    loop {
        tokio::time::sleep(every).await;
        match node.write(Command::Renew { token, lease_ms }).await {
            Ok(Err(Rejection::StaleToken(_))) => return,
            Ok(_) => {}
            Err(e) => tracing::debug!(%token, error = %e, "renew not committed"),
        }
    }
}
