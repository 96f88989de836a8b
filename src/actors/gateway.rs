//! The Gateway actor: one per gateway placed on this node. It probes the
//! gateway's health on a timer and watches its circuit breaker, and records
//! both in the replicated registry whenever they differ from what is
//! committed there, which is what dispatch reads: an open breaker or an
//! unhealthy probe takes the gateway's agents out of dispatch until they
//! recover. It compares with the committed record, not with a cache, so a
//! report lost to a leader change is made again on the next check.
//!
//! It also supervises the gateway's session actors (`actors::session`)
//! through a `sessions` supervisor linked to it: agents start them on first
//! use through the gateway's [`SessionHost`], and on every check the gateway
//! actor stops those whose committed session has ended (or left this
//! gateway) and closes their gateway-side sessions. A session supervisor
//! that exhausts its restarts escalates: this actor fails, and its own
//! supervisor decides.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::session::{SESSIONS, SessionHost, parse_session_actor, session_actor_at};
use super::{Observer, RestartPolicy, Supervisor, SupervisorArgs, SupervisorRef};
use crate::fsm::{
    Circuit, Command, GatewayId, Health, ManagedState, ManagedStatus, SessionId, SessionKey,
};
use crate::gateway::{
    BoxFuture, GatewayDriver, GuardedDriver, ManagedProcess, ManagedSpec, PROBE_TIMEOUT,
};
use crate::node::Node;

/// How long stopping an ended session's actor may take.
const SESSION_STOP_WAIT: Duration = Duration::from_secs(2);

/// Probes that must fail in a row before the gateway is reported
/// unhealthy (one success reports it healthy again).
pub const UNHEALTHY_AFTER: u32 = 3;

/// How often the breaker's state is compared with the registry.
pub const CIRCUIT_CHECK: Duration = Duration::from_millis(500);

/// Where a gateway actor reads and writes its registry record: the node in
/// production; tests may supply their own.
pub trait GatewayRegistry: Send + Sync + 'static {
    /// The committed health and circuit of `id`, if registered.
    fn committed(&self, id: &GatewayId) -> Option<(Health, Circuit)>;
    /// Proposes a new health and circuit; true once committed.
    fn report(&self, id: &GatewayId, health: Health, circuit: Circuit) -> BoxFuture<'_, bool>;
    /// Of `sessions` (each with the generation of its conversation here),
    /// those whose conversation on gateway `id` is over (the session
    /// ended, moved on, or is unknown), with that conversation's key when
    /// it had one.
    fn ended_sessions(
        &self,
        id: &GatewayId,
        sessions: &[(SessionId, u32)],
    ) -> Vec<(SessionId, u32, Option<SessionKey>)>;
    /// The committed status of a managed gateway's process.
    fn committed_process(&self, _id: &GatewayId) -> Option<ManagedStatus> {
        None
    }
    /// Proposes a managed gateway's process status; true once committed.
    fn report_process(&self, _id: &GatewayId, _status: ManagedStatus) -> BoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}

impl GatewayRegistry for Node {
    fn committed_process(&self, id: &GatewayId) -> Option<ManagedStatus> {
        self.state()
            .read(|s| s.registry().gateway(id).and_then(|g| g.managed.clone()))
    }

    fn report_process(&self, id: &GatewayId, status: ManagedStatus) -> BoxFuture<'_, bool> {
        let cmd = Command::ReportManaged {
            id: id.clone(),
            node: self.id(),
            status,
        };
        Box::pin(async move { matches!(self.write(cmd).await, Ok(Ok(_))) })
    }

    fn committed(&self, id: &GatewayId) -> Option<(Health, Circuit)> {
        self.state()
            .read(|s| s.registry().gateway(id).map(|g| (g.health, g.circuit)))
    }

    fn report(&self, id: &GatewayId, health: Health, circuit: Circuit) -> BoxFuture<'_, bool> {
        let cmd = Command::ReportGateway {
            id: id.clone(),
            health,
            circuit,
        };
        Box::pin(async move { matches!(self.write(cmd).await, Ok(Ok(_))) })
    }

    fn ended_sessions(
        &self,
        id: &GatewayId,
        sessions: &[(SessionId, u32)],
    ) -> Vec<(SessionId, u32, Option<SessionKey>)> {
        // Each session is in the queue group that minted its id.
        sessions
            .iter()
            .filter_map(|&(sid, generation)| {
                let Ok(group) = self.queue_group_of(sid) else {
                    return Some((sid, generation, None));
                };
                group.state().read(|s| match s.sessions().get(sid) {
                    Some(r)
                        if r.gateway == *id
                            && r.generation == generation
                            && !r.moving
                            && !r.state.is_terminal() =>
                    {
                        None
                    }
                    Some(r) => Some((sid, generation, r.gateway_key_at(generation))),
                    None => Some((sid, generation, None)),
                })
            })
            .collect()
    }
}

/// The gateway actor.
pub struct GatewayActor;

/// What a gateway actor starts with.
#[derive(Clone)]
pub struct GatewayArgs {
    /// The gateway.
    pub id: GatewayId,
    /// Its guarded driver (shared with its agents).
    pub driver: Arc<GuardedDriver>,
    /// Where its record lives.
    pub registry: Arc<dyn GatewayRegistry>,
    /// How often to probe.
    pub probe_every: Duration,
    /// Where its agents find its session actors.
    pub sessions: SessionHost,
    /// The restart policy of its session supervisor (the node's).
    pub policy: RestartPolicy,
    /// Where its session supervisor's events go.
    pub observer: Observer,
    /// Its process, when Godel runs it (`managed` in its spec).
    pub managed: Option<ManagedSpec>,
}

/// Messages.
pub enum GatewayMsg {
    /// Probe health now.
    Probe,
    /// Compare the breaker's state with the registry.
    Check,
}

// Local only: never sent to another node.
impl ractor::Message for GatewayMsg {}

/// The actor's state.
pub struct GatewayState {
    args: GatewayArgs,
    /// Last probe verdict (unknown until the first probe).
    health: Health,
    /// Probes failed in a row.
    failed_probes: u32,
    /// This incarnation's session supervisor.
    sessions: SupervisorRef,
    /// Stops it and unhooks it from the host when the state goes, also when
    /// the actor fails (ractor runs no `post_stop` then).
    _sessions_guard: SessionsGuard,
    /// Stops the task that reports an opened breaker at once.
    _breaker_watch: tokio_util::sync::DropGuard,
    /// Its process, when managed: stopped with this state (the actor
    /// stopping or failing).
    process: Option<ManagedProcess>,
    /// The run of the process whose probe last answered.
    answered_run: u64,
}

/// See [`GatewayState`]'s `_sessions_guard`.
struct SessionsGuard {
    host: SessionHost,
    cell: ractor::ActorCell,
}

impl Drop for SessionsGuard {
    fn drop(&mut self) {
        self.host.clear_if(&self.cell);
        self.cell.stop(None);
    }
}

impl Actor for GatewayActor {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GatewayMsg>,
        args: GatewayArgs,
    ) -> Result<GatewayState, ActorProcessingErr> {
        let (sessions, _) = Supervisor::spawn_linked(
            None,
            Supervisor,
            SupervisorArgs::new(SESSIONS, args.policy.clone(), args.observer.clone()),
            myself.get_cell(),
        )
        .await?;
        let sessions = SupervisorRef::from_cell(SESSIONS, sessions.get_cell());
        args.sessions.set(Some(sessions.clone()));
        myself.send_message(GatewayMsg::Probe)?;
        myself.send_interval(args.probe_every, || GatewayMsg::Probe);
        myself.send_interval(CIRCUIT_CHECK, || GatewayMsg::Check);
        // An opened breaker is reported at once, not at the next check.
        // The watcher lives as long as this incarnation's state.
        let (driver, me) = (Arc::clone(&args.driver), myself.clone());
        let watch = tokio_util::sync::CancellationToken::new();
        let stop = watch.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = driver.opened() => {
                        if me.send_message(GatewayMsg::Check).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let _sessions_guard = SessionsGuard {
            host: args.sessions.clone(),
            cell: sessions.cell(),
        };
        let process = args
            .managed
            .clone()
            .map(|m| ManagedProcess::start(args.id.clone(), m));
        Ok(GatewayState {
            args,
            health: Health::Unknown,
            failed_probes: 0,
            sessions,
            _sessions_guard,
            _breaker_watch: watch.drop_guard(),
            process,
            answered_run: 0,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<GatewayMsg>,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        // Agents stop reaching this incarnation's sessions; its session
        // actors (and their attempts) stop with their supervisor.
        let cell = state.sessions.cell();
        state.args.sessions.clear_if(&cell);
        cell.stop(None);
        if cell.wait(Some(SESSION_STOP_WAIT)).await.is_err() {
            super::supervisor::kill_tree(&cell);
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<GatewayMsg>,
        event: SupervisionEvent,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, why)
                if cell.get_id() == state.sessions.cell().get_id() =>
            {
                Err(ActorProcessingErr::from(format!(
                    "session supervisor of gateway {} escalated: {why}",
                    state.args.id
                )))
            }
            SupervisionEvent::ActorTerminated(cell, _, why)
                if cell.get_id() == state.sessions.cell().get_id() =>
            {
                Err(ActorProcessingErr::from(format!(
                    "session supervisor of gateway {} stopped: {why:?}",
                    state.args.id
                )))
            }
            _ => Ok(()),
        }
    }

    async fn handle(
        &self,
        _myself: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Probe => {
                let found = tokio::time::timeout(
                    PROBE_TIMEOUT + Duration::from_millis(500),
                    state.args.driver.probe(),
                )
                .await;
                let failed = match found {
                    Ok(h) if h.is_healthy() => None,
                    Ok(h) => Some(format!("{h:?}")),
                    Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
                };
                // A managed process that is not up, or up and not yet
                // answering, is degraded (failed: unhealthy), not a run of
                // failed probes.
                if let Some(p) = &state.process {
                    let (st, run) = p.status();
                    if st.state == ManagedState::Running && failed.is_none() {
                        state.answered_run = run;
                    }
                    if st.state != ManagedState::Running || state.answered_run != run {
                        state.failed_probes = 0;
                        state.health = if st.state == ManagedState::Failed {
                            Health::Unhealthy
                        } else {
                            Health::Degraded
                        };
                        sync_record(state).await;
                        return Ok(());
                    }
                }
                match failed {
                    None => {
                        state.failed_probes = 0;
                        state.health = Health::Healthy;
                    }
                    Some(why) => {
                        state.failed_probes += 1;
                        tracing::info!(gateway = %state.args.id, probe = %why, in_a_row = state.failed_probes, "gateway probe failed");
                        // One slow answer on a busy machine is not a dead
                        // gateway: unhealthy (no dispatch, idle sessions
                        // end) only after several in a row.
                        if state.failed_probes >= UNHEALTHY_AFTER {
                            state.health = Health::Unhealthy;
                        }
                    }
                }
                sync_record(state).await;
            }
            GatewayMsg::Check => {
                sync_record(state).await;
                stop_ended_sessions(state).await;
            }
        }
        Ok(())
    }
}

/// Stops the actors of sessions that have ended (or left this gateway) and
/// closes their gateway-side sessions, in the background.
async fn stop_ended_sessions(state: &GatewayState) {
    let Ok(children) = state.sessions.children().await else {
        return;
    };
    let ids: Vec<(SessionId, u32)> = children
        .iter()
        .filter_map(|n| parse_session_actor(n))
        .collect();
    if ids.is_empty() {
        return;
    }
    let a = &state.args;
    for (id, generation, key) in a.registry.ended_sessions(&a.id, &ids) {
        if let Err(e) = state
            .sessions
            .remove_child(&session_actor_at(id, generation), SESSION_STOP_WAIT)
            .await
        {
            tracing::debug!(gateway = %a.id, session = id, error = %e, "session actor not removed; next check retries");
            continue;
        }
        tracing::debug!(gateway = %a.id, session = id, "session ended: actor stopped");
        if let Some(key) = key {
            let driver = Arc::clone(a.sessions.driver());
            let gateway = a.id.clone();
            tokio::spawn(async move {
                let m = &crate::metrics::global().gateway_sessions;
                match driver.close_session(&key).await {
                    Ok(()) => m.with_label_values(&["closed"]).inc(),
                    Err(e) => {
                        m.with_label_values(&["close_failed"]).inc();
                        tracing::info!(%gateway, session = id, %key, error = %e, "gateway session not closed");
                    }
                }
            });
        }
    }
}

/// Reports health and circuit if the committed record says otherwise, and
/// a managed gateway's process.
async fn sync_record(state: &GatewayState) {
    let a = &state.args;
    if let Some(p) = &state.process {
        let (mut st, run) = p.status();
        if st.state == ManagedState::Running && state.answered_run != run {
            st.state = ManagedState::Starting;
        }
        if a.registry.committed_process(&a.id).as_ref() != Some(&st) {
            tracing::info!(gateway = %a.id, process = ?st.state, pid = st.pid, restarts = st.restarts, "reporting managed gateway process");
            if !a.registry.report_process(&a.id, st).await {
                tracing::debug!(gateway = %a.id, "process report not committed; next check retries");
            }
        }
    }
    let circuit = Circuit::from(a.driver.circuit());
    let Some((health, committed_circuit)) = a.registry.committed(&a.id) else {
        return;
    };
    let want = if state.health == Health::Unknown {
        health
    } else {
        state.health
    };
    if (want, circuit) != (health, committed_circuit) {
        tracing::info!(gateway = %a.id, health = ?want, circuit = ?circuit, "reporting gateway state");
        if !a.registry.report(&a.id, want, circuit).await {
            tracing::debug!(gateway = %a.id, "gateway report not committed; next check retries");
        }
    }
}
