//! Session actors: one per live session of a gateway placed on this node,
//! supervised by that gateway's actor (through its `sessions` supervisor,
//! under the node's one restart policy).
//!
//! A session actor owns the gateway-side session of one Godel session: it
//! opens it ([`GatewayDriver::open_session`]) before the first attempt it
//! runs, runs every attempt of the session's tasks through the gateway's
//! driver, and is stopped by its gateway actor once the committed session
//! has ended, which then closes the gateway-side session
//! ([`GatewayDriver::close_session`]: whatever still runs there is stopped).
//! The replicated state decides the session's lifecycle (`fsm::session`);
//! the actor only carries it out on the gateway.
//!
//! Agents reach a session's actor through their gateway's [`SessionHost`],
//! which starts it on first use. Tasks without a session key run straight
//! through the driver.
//!
//! # Failures
//!
//! An attempt runs in a task of its own, tied to the actor: if the actor
//! fails (or is stopped) mid-attempt, the attempt is stopped and its agent
//! gets [`DriverError::Unavailable`] (retryable), so the task is tried
//! again; the restarted actor opens the gateway-side session again before
//! its next attempt (opening is idempotent).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{ChildSpec, SupervisorRef};
use crate::fsm::{GatewayId, SessionId, SessionKey};
use crate::gateway::{DriverError, GatewayDriver, Result, RunOutput, RunRequest};

/// Role name of each gateway actor's session supervisor (a metrics label).
pub const SESSIONS: &str = "sessions";

/// How long opening a gateway-side session may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an agent waits for its gateway's session supervisor to exist
/// (its gateway actor restarting) or a session actor to come back from a
/// restart, before its attempt fails as unavailable.
const HOST_WAIT: Duration = Duration::from_secs(3);
const HOST_POLL: Duration = Duration::from_millis(50);

/// The name of session `id`'s actor under its gateway's session
/// supervisor, for the session's first conversation (generation 0).
pub fn session_actor(id: SessionId) -> String {
    session_actor_at(id, 0)
}

/// The name of session `id`'s actor for its conversation `generation`
/// (a session that moved on and came back has a new one).
pub fn session_actor_at(id: SessionId, generation: u32) -> String {
    match generation {
        0 => format!("session:{id}"),
        g => format!("session:{id}.{g}"),
    }
}

/// The session id and generation in a session actor's name.
pub fn parse_session_actor(name: &str) -> Option<(SessionId, u32)> {
    let rest = name.strip_prefix("session:")?;
    match rest.split_once('.') {
        None => Some((rest.parse().ok()?, 0)),
        Some((id, g)) => Some((id.parse().ok()?, g.parse().ok()?)),
    }
}

/// Where a gateway's agents find its session actors: the session supervisor
/// of the gateway actor's current incarnation (set when it starts, cleared
/// when it stops). Cheap to clone; one per placed gateway.
#[derive(Clone)]
pub struct SessionHost {
    gateway: GatewayId,
    driver: Arc<dyn GatewayDriver>,
    supervisor: Arc<Mutex<Option<SupervisorRef>>>,
}

impl std::fmt::Debug for SessionHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHost")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl SessionHost {
    /// A host for `gateway`'s sessions, run through `driver`; empty until
    /// the gateway actor starts.
    pub fn new(gateway: GatewayId, driver: Arc<dyn GatewayDriver>) -> Self {
        Self {
            gateway,
            driver,
            supervisor: Arc::new(Mutex::new(None)),
        }
    }

    /// The gateway.
    pub fn gateway(&self) -> &GatewayId {
        &self.gateway
    }

    /// The driver its sessions run through.
    pub fn driver(&self) -> &Arc<dyn GatewayDriver> {
        &self.driver
    }

    pub(super) fn set(&self, supervisor: Option<SupervisorRef>) {
        *self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = supervisor;
    }

    /// Unhooks the session supervisor `cell`, unless another incarnation's
    /// has replaced it already.
    pub(super) fn clear_if(&self, cell: &ActorCell) {
        let mut s = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if s.as_ref()
            .is_some_and(|s| s.cell().get_id() == cell.get_id())
        {
            *s = None;
        }
    }

    /// The current session supervisor, if the gateway actor runs.
    pub fn supervisor(&self) -> Option<SupervisorRef> {
        self.supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs one attempt in session `id` (gateway-side key `key`), starting
    /// its actor if it has none. Ends as the driver's `run` does; fails as
    /// unavailable when no session actor can be reached within a few
    /// seconds or the actor stops mid-attempt.
    pub async fn run(
        &self,
        id: SessionId,
        key: SessionKey,
        req: RunRequest,
        cancel: CancellationToken,
    ) -> Result<RunOutput> {
        self.run_at(id, 0, key, req, cancel).await
    }

    /// [`SessionHost::run`] in the session's conversation `generation`
    /// (its actor is that generation's).
    pub async fn run_at(
        &self,
        id: SessionId,
        generation: u32,
        key: SessionKey,
        req: RunRequest,
        cancel: CancellationToken,
    ) -> Result<RunOutput> {
        let actor = tokio::select! {
            a = self.actor(id, generation, &key) => a?,
            () = cancel.cancelled() => return Err(DriverError::Cancelled),
        };
        let (reply, result) = oneshot::channel();
        ActorRef::<SessionMsg>::from(actor)
            .send_message(SessionMsg::Run {
                req: Box::new(req),
                cancel,
                reply,
            })
            .map_err(|_| stopped())?;
        result.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Session `id`'s running actor, started if absent.
    async fn actor(&self, id: SessionId, generation: u32, key: &SessionKey) -> Result<ActorCell> {
        let name = session_actor_at(id, generation);
        let until = tokio::time::Instant::now() + HOST_WAIT;
        loop {
            let why = match self.supervisor() {
                None => "the gateway actor is not running".to_owned(),
                Some(sup) => match sup.child(&name).await {
                    Ok(Some(cell)) => return Ok(cell),
                    Ok(None) => {
                        let args = SessionArgs {
                            id,
                            key: key.clone(),
                            driver: Arc::clone(&self.driver),
                        };
                        let spec =
                            ChildSpec::new(name.clone(), move || (SessionActor, args.clone()));
                        match sup.add_child(spec).await {
                            Ok(cell) => {
                                tracing::debug!(gateway = %self.gateway, session = id, "session actor started");
                                return Ok(cell);
                            }
                            // Another agent started it, it awaits a restart,
                            // or the supervisor is busy: look again.
                            Err(e) => e.to_string(),
                        }
                    }
                    Err(e) => e.to_string(),
                },
            };
            if tokio::time::Instant::now() >= until {
                return Err(DriverError::Unavailable {
                    reason: format!("no actor for session {id}: {why}"),
                });
            }
            tokio::time::sleep(HOST_POLL).await;
        }
    }
}

fn stopped() -> DriverError {
    DriverError::Unavailable {
        reason: "session actor stopped mid-attempt".to_owned(),
    }
}

/// The session actor.
pub struct SessionActor;

/// What a session actor starts with.
#[derive(Clone)]
pub struct SessionArgs {
    /// The Godel session.
    pub id: SessionId,
    /// Its key on the gateway.
    pub key: SessionKey,
    /// The gateway's (guarded) driver.
    pub driver: Arc<dyn GatewayDriver>,
}

/// Messages.
pub enum SessionMsg {
    /// Run one attempt in the session; the outcome goes to `reply`.
    Run {
        /// The attempt (boxed: the message is mostly this).
        req: Box<RunRequest>,
        /// The agent's cancellation (lease lost, task cancelled).
        cancel: CancellationToken,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<RunOutput>>,
    },
    /// Fail now, as a panic in a handler would (tests of supervision).
    Crash,
}

// Local only: never sent to another node.
impl ractor::Message for SessionMsg {}

/// The actor's state.
pub struct SessionState {
    args: SessionArgs,
    /// Whether this incarnation has opened the gateway-side session.
    opened: bool,
    /// Parent of every attempt's stop signal: dropping the state (stop or
    /// failure) stops them all.
    attempts: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> std::result::Result<SessionState, ActorProcessingErr> {
        let attempts = CancellationToken::new();
        Ok(SessionState {
            args,
            opened: false,
            _stop_on_drop: attempts.clone().drop_guard(),
            attempts,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Run { req, cancel, reply } => {
                // Opening is a gateway call too: not by a node that no
                // longer drives the gateway.
                if let Err(e) = req.guard.check() {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if !state.opened {
                    let a = &state.args;
                    let opened = tokio::select! {
                        r = tokio::time::timeout(OPEN_TIMEOUT, a.driver.open_session(&a.key)) => {
                            r.unwrap_or(Err(DriverError::Unavailable {
                                reason: format!("opening the session took over {OPEN_TIMEOUT:?}"),
                            }))
                        }
                        () = cancel.cancelled() => Err(DriverError::Cancelled),
                    };
                    let m = &crate::metrics::global().gateway_sessions;
                    if let Err(e) = opened {
                        m.with_label_values(&["open_failed"]).inc();
                        tracing::info!(session = a.id, key = %a.key, error = %e, "gateway session not opened");
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                    m.with_label_values(&["opened"]).inc();
                    state.opened = true;
                }
                tokio::spawn(run(
                    Arc::clone(&state.args.driver),
                    *req,
                    cancel,
                    state.attempts.child_token(),
                    reply,
                ));
            }
            SessionMsg::Crash => {
                return Err(ActorProcessingErr::from("crash requested"));
            }
        }
        Ok(())
    }
}

/// One attempt: stopped by the agent (`cancel`) or by the actor's end
/// (`actor_gone`), whichever comes first.
async fn run(
    driver: Arc<dyn GatewayDriver>,
    req: RunRequest,
    cancel: CancellationToken,
    actor_gone: CancellationToken,
    reply: oneshot::Sender<Result<RunOutput>>,
) {
    let stop = actor_gone.child_token();
    let outcome = {
        let forward = async {
            cancel.cancelled().await;
            stop.cancel();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            r = driver.run(req, stop.clone()) => r,
            () = forward => unreachable!("forward never ends"),
        }
    };
    let outcome = match outcome {
        Err(DriverError::Cancelled) if !cancel.is_cancelled() => Err(stopped()),
        other => other,
    };
    let _ = reply.send(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_session_actor(&session_actor(42)), Some((42, 0)));
        assert_eq!(parse_session_actor(&session_actor_at(42, 3)), Some((42, 3)));
        assert_eq!(parse_session_actor("session:42.x"), None);
        assert_eq!(parse_session_actor("agent:42"), None);
        assert_eq!(parse_session_actor("session:x"), None);
    }
}
