//! The `openclaw` driver: runs each attempt as one agent turn on a real
//! OpenClaw gateway, over its WebSocket protocol (v4, as observed in
//! `../shared/openclaw/PROTOCOL.md`).
//!
//! # Mapping
//!
//! - **Session.** A Godel session key `k` of tenant `t` is the gateway
//!   session `agent:<agent_id>:godel-s-<t>~<k>` (the key
//!   [`crate::fsm::gateway_session_key`] gives); a task without one runs in a session
//!   of its own, `agent:<agent_id>:godel-t-<task id>`. The session is
//!   created (`sessions.create`, idempotent on the gateway) before the
//!   first turn in it on each gateway boot.
//! - **Turn.** One attempt is one `agent` request: the message is the
//!   payload's `message` string if it has one, the payload itself if it is
//!   a JSON string, else the payload's JSON text. Its `idempotencyKey` (and
//!   so its run id) is `godel-<task>-<fencing token>-<gateway token>`: a
//!   retry of the same attempt after a dropped socket is the same run, a
//!   new attempt (or the same lease under a new owner) is a new one. The
//!   gateway token ([`super::GatewayFence`]) is the only place the agent
//!   protocol lets a caller name its placement (the schema forbids extra
//!   fields); the gateway does not check it. Its `timeout` is always set, to the smaller of the spec's
//!   `turn_timeout` and the attempt's timeout (the gateway has no default
//!   cap on a tool loop).
//! - **Result.** The second `res` of the `agent` request (the first only
//!   accepts it): `{"text", "usage", "run_id", "session_key",
//!   "stop_reason"}`, `usage` being the gateway's token counts when it
//!   reports them.
//! - **Events.** The `agent` and `chat` events of the run are not written
//!   through Raft: each one is counted (`godel_openclaw_events_total`), the
//!   run's lifecycle, tool calls and model retries are logged with the task
//!   id, and the run's totals (text deltas, tool calls, retries) end up in
//!   one log line when it ends.
//!
//! # Faults and what they become
//!
//! | fault | attempt outcome |
//! |---|---|
//! | gateway not ready (refused, `UNAVAILABLE`, `/readyz` 503) | retried with backoff within the attempt's budget and the `reconnect_window`, then `Unavailable` (retryable, trips the breaker) |
//! | token, protocol or client refused at `connect` | `Rejected`: the agent gives the lease back without spending an attempt; it trips the breaker and the probe reports it, so the gateway soon takes no work |
//! | socket closed mid-run, same gateway process back | `agent.wait` on the run id until it ends |
//! | socket closed, gateway not back within `reconnect_window` | `Unavailable` (retryable): another attempt, maybe on another gateway |
//! | gateway restarted mid-run (new boot id) | the session's run is aborted, then `Unavailable` (retryable); the old run id is unknown to the new process, which may otherwise resume the turn by itself |
//! | `shutdown` event (SIGTERM) | the gateway drains: running turns finish; the probe reports it unhealthy so nothing new is sent; the close (1012) is a closed socket as above |
//! | model or run error (final `res` not ok) | `TaskFailed` with the gateway's error text, retryable: the task dead-letters after its attempts |
//! | turn timed out on the gateway | `Timeout` |
//! | `agent` refused (bad params) | `TaskFailed`, not retryable |
//! | cancelled, timed out by Godel, or the attempt dropped (lease lost) | `sessions.abort {key, runId}` sent in the background |
//!
//! # Shortcuts taken on purpose
//!
//! - `ws://` only; TLS is left to a proxy.
//! - A turn interrupted by a gateway restart is aborted and retried by
//!   Godel rather than adopted: the gateway's restart recovery runs it again
//!   under a run id Godel never chose, and following it by session key
//!   (describe, then wait on `lastRunId`) is left for later.
//! - Runs are followed by their final response, not reconstructed from
//!   events; events only feed logs and metrics.
//! - The session cache (which keys exist on which boot) is per driver and
//!   bounded by clearing it when full.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spec::{GatewayKind, OpenClawSpec};
use super::{
    BoxFuture, DriverError, GatewayDriver, Health, MAX_RESULT_BYTES, PROBE_TIMEOUT, Result,
    RunOutput, RunRequest,
};
use crate::fsm::{SessionKey, TaskId};

mod client;
mod device;
mod wire;

use client::{CallError, Client, Conn, ConnectError};
use device::Device;
use wire::GwError;

/// Name of the device key file in a node's data directory.
pub const DEVICE_KEY_FILE: &str = "openclaw-device.key";
/// Longest a single control request (create, describe, abort) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the `agent` request may wait for its acceptance.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one `agent.wait` asks the gateway to wait.
const WAIT_SLICE: Duration = Duration::from_secs(30);
/// Most session keys remembered as created, per driver.
const MAX_KNOWN_SESSIONS: usize = 10_000;
/// Longest result text kept in a log line, in bytes.
const LOG_TEXT_BYTES: usize = 120;

/// The `openclaw` driver.
pub struct OpenClawDriver {
    spec: OpenClawSpec,
    client: Arc<Client>,
    http: reqwest::Client,
    readyz: String,
    /// Gateway session keys created on the gateway boot named first.
    sessions: Mutex<(Option<String>, HashSet<String>)>,
    /// Ephemeral workers: sessions created ahead of need for tasks without
    /// a session key (`warm_sessions`), shared with the task that refills
    /// them.
    pool: Arc<Mutex<WarmPool>>,
}

/// Warm gateway sessions, each for one task.
#[derive(Debug, Default)]
struct WarmPool {
    /// The gateway boot they were created on (another boot: dropped).
    boot: Option<String>,
    /// Created and never used.
    ready: std::collections::VecDeque<String>,
    /// A refill is under way.
    refilling: bool,
    /// Names the next one (after a per-driver nonce).
    next: u64,
    /// This driver's nonce in the keys, so no two drivers (or restarts of
    /// one) name the same session.
    nonce: u64,
}

impl std::fmt::Debug for OpenClawDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClawDriver")
            .field("url", &self.spec.url)
            .field("token", &self.spec.token.to_string())
            .field("agent_id", &self.spec.agent_id)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl OpenClawDriver {
    /// A driver for the gateway `spec` names (assumed validated): reads the
    /// token it refers to and loads (or creates) the device key, from the
    /// spec's `device_key`, else from `data_dir`, else a key kept in memory.
    /// The token is read as `policy` allows.
    pub fn new(
        spec: OpenClawSpec,
        data_dir: Option<&Path>,
        policy: &super::DriverPolicy,
    ) -> Result<Self> {
        let token = spec.token.resolve(policy)?;
        let device = match (&spec.device_key, data_dir) {
            (Some(path), _) => Device::load_or_create(path)?,
            (None, Some(dir)) => Device::load_or_create(&dir.join(DEVICE_KEY_FILE))?,
            (None, None) => Device::ephemeral(),
        };
        let mut readyz = reqwest::Url::parse(&spec.url)
            .map_err(|e| DriverError::InvalidSpec(vec![format!("driver.url: {e}")]))?;
        readyz
            .set_scheme("http")
            .expect("invariant: ws and http are both special schemes");
        readyz.set_path("/readyz");
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DriverError::Unavailable {
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Self {
            client: Arc::new(Client::new(spec.url.clone(), token, device)),
            readyz: readyz.to_string(),
            http,
            sessions: Mutex::new((None, HashSet::new())),
            pool: Arc::new(Mutex::new(WarmPool {
                nonce: rand::random::<u64>(),
                ..WarmPool::default()
            })),
            spec,
        })
    }

    /// The gateway session key of a Godel session key (or of a task without one).
    fn gateway_key(&self, key: Option<&SessionKey>, task: TaskId) -> String {
        match key {
            Some(k) => format!("agent:{}:godel-s-{}", self.spec.agent_id, k.0),
            None => format!("agent:{}:godel-t-{}", self.spec.agent_id, task.0),
        }
    }

    /// A warm session created on the gateway boot `boot`, if one is ready
    /// (it is the caller's for one task, then retired); the pool refills.
    fn take_warm(&self, boot: Option<&String>) -> Option<String> {
        if self.spec.warm_sessions == 0 {
            return None;
        }
        let key = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            // Only sessions of the boot this attempt talks to, and only
            // from a gateway that names its boot (one that does not could
            // have restarted and lost them). The refill owns `boot`.
            if boot.is_some() && pool.boot.as_ref() == boot {
                pool.ready.pop_front()
            } else {
                None
            }
        };
        let m = &crate::metrics::global().openclaw_warm_sessions;
        m.with_label_values(&[if key.is_some() { "taken" } else { "missed" }])
            .inc();
        tracing::debug!(warm = ?key, "one-shot task: warm session");
        self.refill();
        key
    }

    /// Creates warm sessions, in the background, until the pool holds
    /// `warm_sessions` (one refill at a time; a failure waits for the next
    /// probe or task).
    fn refill(&self) {
        let want = self.spec.warm_sessions as usize;
        if want == 0 {
            return;
        }
        {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.refilling || pool.ready.len() >= want {
                return;
            }
            pool.refilling = true;
        }
        let (client, pool, agent) = (
            Arc::clone(&self.client),
            Arc::clone(&self.pool),
            self.spec.agent_id.clone(),
        );
        tokio::spawn(async move {
            let lock = || pool.lock().unwrap_or_else(PoisonError::into_inner);
            let made = async {
                let conn = client.conn_once(CONTROL_TIMEOUT).await.ok()?;
                let boot = conn.hello.boot_id.clone();
                loop {
                    let key = {
                        let mut p = lock();
                        if p.boot != boot {
                            p.ready.clear();
                            p.boot.clone_from(&boot);
                        }
                        if p.ready.len() >= want {
                            return Some(());
                        }
                        p.next += 1;
                        format!("agent:{agent}:godel-w-{:016x}-{}", p.nonce, p.next)
                    };
                    let trace = client::new_traceparent();
                    let params = json!({"key": key, "agentId": agent});
                    if let Err(e) = conn
                        .request("sessions.create", params, &trace, CONTROL_TIMEOUT)
                        .await
                    {
                        tracing::info!(error = %control_error("sessions.create", e), "warm openclaw session not created; the next probe retries");
                        return None;
                    }
                    crate::metrics::global()
                        .openclaw_warm_sessions
                        .with_label_values(&["created"])
                        .inc();
                    lock().ready.push_back(key);
                }
            };
            let _ = made.await;
            lock().refilling = false;
        });
    }

    /// A connection, trying until `until` while the gateway is not ready.
    async fn conn(&self, until: Instant) -> Result<Arc<Conn>> {
        self.client.conn(until).await.map_err(|e| match e {
            ConnectError::NotReady(why, _) => DriverError::Unavailable {
                reason: format!("openclaw gateway {} not ready: {why}", self.spec.url),
            },
            ConnectError::Rejected(why) => DriverError::Rejected {
                reason: format!("openclaw gateway {}: {why}", self.spec.url),
            },
        })
    }

    /// Creates the gateway session `key` unless this boot of the gateway
    /// already has it (from this driver).
    async fn ensure_session(&self, conn: &Arc<Conn>, key: &str, trace: &str) -> Result<()> {
        let boot = conn.hello.boot_id.clone();
        {
            let known = self.lock_sessions();
            if known.0.is_some() && known.0 == boot && known.1.contains(key) {
                return Ok(());
            }
        }
        let params = json!({"key": key, "agentId": self.spec.agent_id});
        conn.request("sessions.create", params, trace, CONTROL_TIMEOUT)
            .await
            .map_err(|e| control_error("sessions.create", e))?;
        let mut known = self.lock_sessions();
        if known.0 != boot || known.1.len() >= MAX_KNOWN_SESSIONS {
            *known = (boot, HashSet::new());
        }
        known.1.insert(key.to_owned());
        Ok(())
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, (Option<String>, HashSet<String>)> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn attempt(&self, req: RunRequest) -> Result<RunOutput> {
        let started = Instant::now();
        let until = started + req.timeout;
        let run_id = format!(
            "godel-{}-{}-{}",
            req.task_id.0, req.fencing_token.0, req.fence.token
        );
        let message = message_of(&req.payload)?;
        // A session that moved here: its earlier turns come first, so the
        // model sees them and they enter this gateway's transcript.
        let message = match &req.context {
            Some(earlier) => format!("{earlier}\n\n{message}"),
            None => message,
        };
        // The role's prompt comes first of all.
        let message = match req.role.as_ref().and_then(|r| r.prompt.as_deref()) {
            Some(prompt) => format!("{prompt}\n\n{message}"),
            None => message,
        };
        let turn = req.timeout.min(self.spec.turn_timeout);
        let trace = req
            .trace
            .map_or_else(client::new_traceparent, |t| t.header());
        // A gateway that is down or still starting is waited for, but no
        // longer than the reconnect window: past it, another attempt (maybe
        // on another gateway) is better than this one waiting its budget out.
        let window = until.min(started + self.spec.reconnect_window);
        let conn = self.conn(window).await?;
        if let Some(reason) = conn.draining() {
            // It finishes what it runs and then closes: send nothing new.
            return Err(DriverError::Unavailable {
                reason: format!(
                    "openclaw gateway {} is shutting down: {reason}",
                    self.spec.url
                ),
            });
        }
        req.guard.check()?;
        // A one-shot task runs in a warm session when one is ready (it is
        // never used again); otherwise in a session of its own.
        let warm = if req.session_key.is_none() {
            self.take_warm(conn.hello.boot_id.as_ref())
        } else {
            None
        };
        let key = match warm {
            Some(w) => w,
            None => {
                let key = self.gateway_key(req.session_key.as_ref(), req.task_id);
                self.ensure_session(&conn, &key, &trace).await?;
                key
            }
        };
        req.guard.check()?;
        let params = json!({
            "message": message,
            "sessionKey": key,
            "agentId": self.spec.agent_id,
            "idempotencyKey": run_id,
            // Seconds, rounded up, at least one.
            "timeout": turn.as_secs() + u64::from(turn.subsec_nanos() > 0),
        });
        let mut abort = AbortOnDrop {
            client: Arc::clone(&self.client),
            key: key.clone(),
            run_id: None,
            task: req.task_id,
        };
        let run = Run {
            task: req.task_id,
            run_id: &run_id,
            key: &key,
            trace: &trace,
            turn,
            role: req.role.as_deref(),
        };
        let outcome = self
            .send_turn(&conn, &run, params, window, &mut abort)
            .await;
        let outcome = match outcome {
            Err(Lost::Closed(why)) => self.follow(&conn, &run, &why, until).await,
            Err(Lost::Failed(e)) => Err(e),
            Ok(final_payload) => Ok(final_payload),
        };
        // Whatever the outcome, the run has ended (or was aborted in
        // `follow`): nothing left to abort.
        abort.run_id = None;
        let payload = outcome?;
        let result = result_of(&run, &payload)?;
        Ok(RunOutput {
            result_json: result,
            elapsed: started.elapsed(),
        })
    }

    /// Sends the turn and waits for its final response, logging its events.
    /// A turn the gateway will not take yet is sent again until `until`.
    async fn send_turn(
        &self,
        conn: &Arc<Conn>,
        run: &Run<'_>,
        params: Value,
        until: Instant,
        abort: &mut AbortOnDrop,
    ) -> std::result::Result<Value, Lost> {
        let mut events = conn.subscribe();
        let mut tally = Tally::default();
        let mut call = loop {
            let mut call = conn
                .call("agent", params.clone(), run.trace)
                .await
                .map_err(Lost::from_call)?;
            // From here the gateway may run it: abort it if we go away.
            abort.run_id = Some(run.run_id.to_owned());
            let ack = tokio::time::timeout(ACK_TIMEOUT, call.next()).await;
            let ack = match ack {
                Err(_) => {
                    return Err(Lost::Closed(format!(
                        "no acceptance within {ACK_TIMEOUT:?}"
                    )));
                }
                Ok(a) => a,
            };
            match ack {
                Ok(p) => match wire::str_at(&p, &["status"]) {
                    Some("accepted") => break call,
                    // The same run is already going (a retry after a
                    // dropped socket): follow it by id.
                    Some("in_flight") => return Err(Lost::Closed("run already in flight".into())),
                    // Already final (lenient: a gateway that answers once).
                    _ => return Ok(p),
                },
                // An error that carries a run status is the run's outcome
                // (it failed at once), not the gateway being busy.
                Err((CallError::Gateway(e), p)) if p.get("status").is_some() => {
                    abort.run_id = None;
                    return Err(Lost::Failed(run_error(run, &e, &p)));
                }
                Err((CallError::Gateway(e), _)) if e.is_not_ready() => {
                    abort.run_id = None;
                    let pause = e
                        .retry_after_ms
                        .map_or(Duration::from_millis(500), Duration::from_millis);
                    if Instant::now() + pause >= until {
                        return Err(Lost::Failed(DriverError::Unavailable {
                            reason: format!("openclaw gateway did not accept the turn: {e}"),
                        }));
                    }
                    tokio::time::sleep(pause).await;
                }
                Err((CallError::Gateway(e), _)) => {
                    abort.run_id = None;
                    return Err(Lost::Failed(DriverError::TaskFailed {
                        reason: format!("openclaw gateway refused the turn: {e}"),
                        retryable: false,
                    }));
                }
                Err((CallError::Closed(why), _)) => return Err(Lost::Closed(why)),
            }
        };
        tracing::debug!(task = %run.task, run = %run.run_id, session = %run.key, "openclaw turn accepted");
        loop {
            tokio::select! {
                fin = call.next() => {
                    tally.log(run);
                    return match fin {
                        Ok(p) => Ok(p),
                        Err((CallError::Gateway(e), p)) => Err(Lost::Failed(run_error(run, &e, &p))),
                        Err((CallError::Closed(why), _)) => Err(Lost::Closed(why)),
                    };
                }
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        let Some(tool) = tally.observe(run, &ev) else {
                            continue;
                        };
                        let Some(role) = run.role.filter(|r| !r.allows(&tool)) else {
                            continue;
                        };
                        // Not this role's to call: stop the run here.
                        let allowed = role.tools.as_deref().unwrap_or_default().join(", ");
                        let why = format!(
                            "the run called tool `{tool}`, which role `{}` does not allow (allowed: [{allowed}]); the run was stopped",
                            role.name
                        );
                        return Err(stop_run(conn, run, abort, &tally, why, false).await);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tally.lagged += n;
                        // A tool call may have been among the events lost:
                        // a role that limits tools cannot vouch for the run.
                        if run.role.is_some_and(|r| r.tools.is_some()) {
                            let why = format!("{n} events of the run were lost, so its tools could not be checked against its role; the run was stopped");
                            return Err(stop_run(conn, run, abort, &tally, why, true).await);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
            }
        }
    }

    /// After the socket closed mid-run: reconnect within the reconnect
    /// window and wait for the run by id; if the gateway restarted, abort
    /// whatever runs in the session and give the attempt up.
    async fn follow(
        &self,
        old: &Arc<Conn>,
        run: &Run<'_>,
        why: &str,
        until: Instant,
    ) -> Result<Value> {
        let window = until.min(Instant::now() + self.spec.reconnect_window);
        tracing::info!(task = %run.task, run = %run.run_id, reason = %why, "openclaw run not answered on its connection; following it by run id");
        if old.is_closed() {
            crate::metrics::global()
                .openclaw_runs
                .with_label_values(&["connection_lost"])
                .inc();
        }
        let conn = self
            .conn(window)
            .await
            .map_err(|e| DriverError::Unavailable {
                reason: format!("connection lost mid-run ({why}) and not back: {e}"),
            })?;
        if conn.hello.boot_id.is_none() || conn.hello.boot_id != old.hello.boot_id {
            // The new process knows no run id of the old one; what it may
            // still do is resume the turn in the session by itself. Track
            // the session by key: see where it is, abort whatever runs.
            let seen = describe(&conn, run.key, run.trace).await;
            let aborted = abort_run(&conn, run.key, None, run.trace).await;
            tracing::info!(task = %run.task, run = %run.run_id, session = %run.key, %seen, %aborted, "openclaw gateway restarted mid-run; session aborted");
            return Err(DriverError::Unavailable {
                reason: format!(
                    "openclaw gateway restarted during run {} (boot {:?} -> {:?}); session {} was {seen}, its run aborted ({aborted})",
                    run.run_id, old.hello.boot_id, conn.hello.boot_id, run.key
                ),
            });
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let slice = left.min(WAIT_SLICE).max(Duration::from_millis(100));
            let params = json!({"runId": run.run_id, "timeoutMs": slice.as_millis() as u64});
            let waited = conn
                .request("agent.wait", params, run.trace, slice + CONTROL_TIMEOUT)
                .await;
            match waited {
                Ok(p) if wire::str_at(&p, &["status"]) == Some("timeout") => {
                    if Instant::now() >= until {
                        // Still running (or unknown): stop it before giving up.
                        let aborted = abort_run(&conn, run.key, Some(run.run_id), run.trace).await;
                        tracing::info!(task = %run.task, run = %run.run_id, %aborted, "openclaw run outlived its attempt; aborted");
                        return Err(DriverError::Timeout { after: run.turn });
                    }
                }
                Ok(p) => return Ok(wait_to_final(&p)),
                Err(CallError::Gateway(e)) => {
                    return Err(control_error("agent.wait", CallError::Gateway(e)));
                }
                Err(CallError::Closed(why)) => {
                    return Err(DriverError::Unavailable {
                        reason: format!("connection lost again while waiting for the run: {why}"),
                    });
                }
            }
        }
    }
}

/// The ids a run is known by, for logs and requests.
struct Run<'a> {
    task: TaskId,
    run_id: &'a str,
    key: &'a str,
    trace: &'a str,
    turn: Duration,
    /// The agent's role: a tool it does not allow stops the run.
    role: Option<&'a super::RunRole>,
}

/// How waiting for a run's answer ended without one.
enum Lost {
    /// The socket closed (or the run was already in flight): follow the run.
    Closed(String),
    /// The attempt failed.
    Failed(DriverError),
}

impl Lost {
    fn from_call(e: CallError) -> Lost {
        match e {
            CallError::Closed(why) => Lost::Closed(why),
            CallError::Gateway(e) => Lost::Failed(DriverError::Unavailable {
                reason: format!("openclaw gateway: {e}"),
            }),
        }
    }
}

/// Sends `sessions.abort` for a run when the attempt that started it goes
/// away before the run ended (cancel, timeout, lease lost, actor stopped).
struct AbortOnDrop {
    client: Arc<Client>,
    key: String,
    run_id: Option<String>,
    task: TaskId,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(run_id) = self.run_id.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, key, task) = (Arc::clone(&self.client), self.key.clone(), self.task);
        rt.spawn(async move {
            let trace = client::new_traceparent();
            let until = Instant::now() + CONTROL_TIMEOUT;
            let outcome = match client.conn(until).await {
                Ok(conn) => abort_run(&conn, &key, Some(&run_id), &trace).await,
                Err(e) => format!("not sent: {e:?}"),
            };
            crate::metrics::global()
                .openclaw_runs
                .with_label_values(&["aborted"])
                .inc();
            tracing::info!(%task, run = %run_id, session = %key, outcome = %outcome, "openclaw run aborted: its attempt ended first");
        });
    }
}

/// `sessions.describe`: the session's status and last run, for logs.
async fn describe(conn: &Arc<Conn>, key: &str, trace: &str) -> String {
    match conn
        .request(
            "sessions.describe",
            json!({"key": key}),
            trace,
            CONTROL_TIMEOUT,
        )
        .await
    {
        Ok(p) => match p.get("session") {
            Some(s) if !s.is_null() => format!(
                "{} (last run {})",
                wire::str_at(s, &["status"]).unwrap_or("in no known state"),
                wire::str_at(s, &["lastRunId"]).unwrap_or("none")
            ),
            _ => "unknown to the gateway".to_owned(),
        },
        Err(e) => format!("not described: {e}"),
    }
}

/// `sessions.abort`; what the gateway said, for logs.
async fn abort_run(conn: &Arc<Conn>, key: &str, run_id: Option<&str>, trace: &str) -> String {
    let mut params = json!({"key": key});
    if let Some(id) = run_id {
        params["runId"] = json!(id);
    }
    match conn
        .request("sessions.abort", params, trace, CONTROL_TIMEOUT)
        .await
    {
        Ok(p) => wire::str_at(&p, &["status"]).unwrap_or("ok").to_owned(),
        Err(e) => format!("failed: {e}"),
    }
}

/// Stops a run its role cannot vouch for: aborts it on the gateway, logs
/// its tally, and fails the attempt with `why`.
async fn stop_run(
    conn: &Arc<Conn>,
    run: &Run<'_>,
    abort: &mut AbortOnDrop,
    tally: &Tally,
    why: String,
    retryable: bool,
) -> Lost {
    let aborted = abort_run(conn, run.key, Some(run.run_id), run.trace).await;
    abort.run_id = None;
    tally.log(run);
    tracing::warn!(task = %run.task, run = %run.run_id, %aborted, reason = %why, "openclaw run stopped");
    Lost::Failed(DriverError::TaskFailed {
        reason: why,
        retryable,
    })
}

/// Counts of one run's events, logged when it ends.
#[derive(Default)]
struct Tally {
    deltas: u64,
    tools: u64,
    retries: u64,
    lagged: u64,
    output_tokens: Option<u64>,
}

impl Tally {
    /// Counts one event of the run; returns the tool's name when it is a
    /// tool call starting.
    fn observe(&mut self, run: &Run<'_>, ev: &wire::Event) -> Option<String> {
        if wire::str_at(&ev.payload, &["runId"]) != Some(run.run_id) {
            return None;
        }
        let data = ev.payload.get("data").unwrap_or(&Value::Null);
        match (ev.event.as_str(), wire::str_at(&ev.payload, &["stream"])) {
            ("agent", Some("assistant")) => self.deltas += 1,
            ("agent", Some("usage")) => {
                self.output_tokens = data.get("outputTokens").and_then(Value::as_u64);
            }
            ("agent", Some("lifecycle")) => {
                let phase = wire::str_at(data, &["phase"]).unwrap_or("?");
                tracing::debug!(task = %run.task, run = %run.run_id, phase, "openclaw run lifecycle");
            }
            ("agent", Some("tool")) if wire::str_at(data, &["phase"]) == Some("start") => {
                self.tools += 1;
                let name = wire::str_at(data, &["name"]).unwrap_or("?");
                tracing::info!(task = %run.task, run = %run.run_id, tool = name, "openclaw run calls a tool");
                return Some(name.to_owned());
            }
            ("agent", Some("run_status")) => {
                self.retries += 1;
                let reason = wire::str_at(data, &["reason"]).unwrap_or("?");
                tracing::info!(task = %run.task, run = %run.run_id, reason, "openclaw run retries its model call");
            }
            _ => {}
        }
        None
    }

    fn log(&self, run: &Run<'_>) {
        tracing::info!(
            task = %run.task, run = %run.run_id, session = %run.key,
            deltas = self.deltas, tool_calls = self.tools, model_retries = self.retries,
            output_tokens = ?self.output_tokens, events_skipped = self.lagged,
            "openclaw run ended"
        );
    }
}

/// The turn's message from the task's payload.
fn message_of(payload: &str) -> Result<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(payload).map_err(|e| {
        DriverError::TaskFailed {
            reason: format!("payload is not JSON: {e}"),
            retryable: false,
        }
    })?;
    let text = crate::fsm::payload_message(payload).unwrap_or_else(|| payload.to_owned());
    if text.trim().is_empty() {
        return Err(DriverError::TaskFailed {
            reason: "the payload's message is empty".into(),
            retryable: false,
        });
    }
    Ok(text)
}

/// What a failed final response means for the attempt: the gateway's own
/// error text, retryable (a model error may pass; attempts bound it).
fn run_error(run: &Run<'_>, e: &GwError, payload: &Value) -> DriverError {
    let text = wire::str_at(payload, &["summary"])
        .filter(|s| !s.is_empty())
        .unwrap_or(&e.message);
    crate::metrics::global()
        .openclaw_runs
        .with_label_values(&["error"])
        .inc();
    tracing::info!(task = %run.task, run = %run.run_id, error = %text, "openclaw run failed");
    DriverError::TaskFailed {
        reason: format!("openclaw run {} failed: {text}", run.run_id),
        retryable: true,
    }
}

/// An `agent.wait` answer in the shape of a final `agent` response.
fn wait_to_final(p: &Value) -> Value {
    let text = wire::str_at(p, &["terminalReply", "text"]).unwrap_or("");
    json!({
        "runId": p.get("runId"),
        "status": p.get("status"),
        "stopReason": p.get("stopReason"),
        "summary": p.get("error"),
        "result": {"payloads": [{"text": text}]},
    })
}

/// The task's result from a run's final response (or an error).
fn result_of(run: &Run<'_>, p: &Value) -> Result<String> {
    let m = crate::metrics::global();
    let status = wire::str_at(p, &["status"]).unwrap_or("ok");
    let summary = wire::str_at(p, &["summary"]).unwrap_or("");
    let payloads = p
        .pointer("/result/payloads")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let texts = |errors: bool| -> String {
        payloads
            .iter()
            .filter(|x| x.get("isError").and_then(Value::as_bool).unwrap_or(false) == errors)
            .filter_map(|x| x.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")
    };
    match status {
        "ok" => {}
        "timeout" if summary == "aborted" => {
            m.openclaw_runs.with_label_values(&["aborted"]).inc();
            return Err(DriverError::TaskFailed {
                reason: format!(
                    "openclaw run {} was aborted on the gateway ({})",
                    run.run_id,
                    wire::str_at(p, &["stopReason"]).unwrap_or("no reason")
                ),
                retryable: true,
            });
        }
        "timeout" => {
            m.openclaw_runs.with_label_values(&["timeout"]).inc();
            return Err(DriverError::Timeout { after: run.turn });
        }
        other => {
            m.openclaw_runs.with_label_values(&["error"]).inc();
            let errs = texts(true);
            let text = [summary, errs.as_str()]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or("no error text");
            return Err(DriverError::TaskFailed {
                reason: format!("openclaw run {} ended {other}: {text}", run.run_id),
                retryable: true,
            });
        }
    }
    m.openclaw_runs.with_label_values(&["ok"]).inc();
    let text = texts(false);
    let usage = p.pointer("/result/meta/agentMeta/usage").map(|u| {
        json!({
            "input": u.get("input"), "output": u.get("output"), "total": u.get("total"),
        })
    });
    let mut out = json!({
        "text": text,
        "run_id": run.run_id,
        "session_key": run.key,
    });
    if let Some(u) = usage {
        out["usage"] = u;
    }
    if let Some(s) = p.get("stopReason").filter(|s| !s.is_null()) {
        out["stop_reason"] = s.clone();
    }
    let json = out.to_string();
    if json.len() > MAX_RESULT_BYTES {
        return Err(DriverError::OutputTooLarge {
            limit_bytes: MAX_RESULT_BYTES,
        });
    }
    let shown: String = text.chars().take(LOG_TEXT_BYTES).collect();
    tracing::debug!(task = %run.task, run = %run.run_id, text = %shown, "openclaw run completed");
    Ok(json)
}

/// What a failed control request means for the attempt.
fn control_error(method: &str, e: CallError) -> DriverError {
    match e {
        CallError::Closed(why) => DriverError::Unavailable {
            reason: format!("openclaw {method}: connection closed: {why}"),
        },
        CallError::Gateway(e) if e.is_not_ready() => DriverError::Unavailable {
            reason: format!("openclaw {method}: {e}"),
        },
        CallError::Gateway(e) => DriverError::TaskFailed {
            reason: format!("openclaw {method} refused: {e}"),
            retryable: false,
        },
    }
}

impl GatewayDriver for OpenClawDriver {
    fn kind(&self) -> GatewayKind {
        GatewayKind::Openclaw
    }

    fn run(&self, req: RunRequest, cancel: CancellationToken) -> BoxFuture<'_, Result<RunOutput>> {
        Box::pin(async move {
            let timeout = req.timeout;
            super::bounded(timeout, &cancel, self.attempt(req)).await
        })
    }

    fn probe(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let unhealthy = |reason: String| Health::Unhealthy { reason };
            let half = PROBE_TIMEOUT / 2;
            match self.http.get(&self.readyz).timeout(half).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => return unhealthy(format!("{} answered HTTP {}", self.readyz, r.status())),
                Err(e) => return unhealthy(format!("{} failed: {e}", self.readyz)),
            }
            let conn = match self.client.conn_once(half).await {
                Ok(c) => c,
                Err(ConnectError::NotReady(why, _)) => {
                    return unhealthy(format!("not ready: {why}"));
                }
                Err(ConnectError::Rejected(why)) => return unhealthy(why),
            };
            if let Some(reason) = conn.draining() {
                return unhealthy(format!("gateway is shutting down: {reason}"));
            }
            let trace = client::new_traceparent();
            match conn.request("health", json!({}), &trace, half).await {
                Ok(_) => {
                    // Up: keep the warm sessions ready.
                    self.refill();
                    Health::Healthy
                }
                Err(e) => unhealthy(format!("health: {e}")),
            }
        })
    }

    fn open_session(&self, key: &SessionKey) -> BoxFuture<'_, Result<()>> {
        let gw_key = self.gateway_key(Some(key), TaskId(0));
        Box::pin(async move {
            let conn = self.conn(Instant::now() + CONTROL_TIMEOUT).await?;
            self.ensure_session(&conn, &gw_key, &client::new_traceparent())
                .await
        })
    }

    fn close_session(&self, key: &SessionKey) -> BoxFuture<'_, Result<()>> {
        let gw_key = self.gateway_key(Some(key), TaskId(0));
        Box::pin(async move {
            let conn = self.conn(Instant::now() + CONTROL_TIMEOUT).await?;
            let trace = client::new_traceparent();
            let params = json!({"key": gw_key});
            conn.request("sessions.abort", params, &trace, CONTROL_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|e| control_error("sessions.abort", e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Run<'static> {
        Run {
            task: TaskId(7),
            run_id: "godel-7-3",
            key: "agent:main:godel-t-7",
            trace: "00-1-1-01",
            turn: Duration::from_secs(60),
            role: None,
        }
    }

    #[test]
    fn messages_come_from_the_payload() {
        assert_eq!(message_of(r#""hi""#).unwrap(), "hi");
        assert_eq!(message_of(r#"{"message":"do it","x":1}"#).unwrap(), "do it");
        assert_eq!(message_of(r#"{"n":1}"#).unwrap(), r#"{"n":1}"#);
        assert!(!message_of(r#""  ""#).unwrap_err().is_retryable());
        assert!(!message_of("{").unwrap_err().is_retryable());
    }

    #[test]
    fn final_responses_map_to_results_and_errors() {
        let ok = json!({"runId":"godel-7-3","status":"ok","summary":"completed","result":{
            "payloads":[{"text":"MOCK-REPLY: hi","mediaUrl":null}],
            "meta":{"agentMeta":{"usage":{"input":10,"output":5,"total":15,"cacheRead":0}}}}});
        let r: Value = serde_json::from_str(&result_of(&run(), &ok).unwrap()).unwrap();
        assert_eq!(r["text"], "MOCK-REPLY: hi");
        assert_eq!(r["usage"], json!({"input":10,"output":5,"total":15}));
        assert_eq!(r["run_id"], "godel-7-3");
        let aborted = json!({"status":"timeout","summary":"aborted","stopReason":"rpc"});
        let e = result_of(&run(), &aborted).unwrap_err();
        assert!(e.to_string().contains("aborted"), "{e}");
        let timeout =
            json!({"status":"timeout","result":{"payloads":[{"text":"slow","isError":true}]}});
        assert!(matches!(
            result_of(&run(), &timeout),
            Err(DriverError::Timeout { .. })
        ));
        let failed = json!({"status":"error","summary":"LLM request failed (HTTP 400)."});
        let e = result_of(&run(), &failed).unwrap_err();
        assert!(
            e.is_retryable() && e.to_string().contains("HTTP 400"),
            "{e}"
        );
    }
}
