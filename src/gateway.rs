//! Gateways: the external agent runtimes Godel drives, seen through one trait.
//!
//! A **gateway driver** ([`GatewayDriver`]) runs one *attempt* of one task on
//! one gateway: it gets a [`RunRequest`] (task id, fencing token, optional
//! session key, the payload as JSON text, a timeout) and a
//! [`CancellationToken`], and returns either a [`RunOutput`] (the result as
//! JSON text) or a [`DriverError`] that says whether another attempt makes
//! sense. Drivers know nothing of Raft, leases or actors: the gateway and
//! session actors decide *when* to run an attempt and what to do with its
//! outcome; the driver only decides *how*. Kinds:
//!
//! - `sim`: built in, no I/O. A latency distribution, a failure rate and a
//!   hang rate, optionally seeded. A zero-latency attempt never touches the
//!   timer, so benchmarks can push many thousands per second through it.
//! - `command`: runs a configured program per attempt, payload on stdin,
//!   result on stdout, in its own process group; on Linux the program is
//!   SIGKILLed if its node dies (`PR_SET_PDEATHSIG`).
//! - `http`: POSTs the task to a webhook; the 2xx body is the result.
//! - `openclaw`: runs the task as one agent turn on a real OpenClaw gateway
//!   over its WebSocket protocol (v4): one shared connection per gateway
//!   with the token and the node's Ed25519 device identity, a gateway
//!   session per Godel session key, a bounded turn, the final answer and
//!   token usage as the result, `sessions.abort` when the attempt ends
//!   first. Its module essay maps each gateway fault to an outcome.
//!
//! Around the drivers sit the per-gateway policies: a [`CircuitBreaker`]
//! (closed, open, half-open; time passed in, every transition returned),
//! the health [`Health`] a probe reports, and backpressure
//! ([`accepts_new_session`]: at [`BACKPRESSURE_PERCENT`]% of its session
//! capacity a gateway takes no new sessions). A gateway is described for
//! registration by a [`GatewaySpec`] (serde, unknown fields rejected,
//! [`GatewaySpec::validate`] reports every problem) and [`driver_for`] builds
//! its driver.
//!
//! # Invariants
//!
//! - **An attempt that ends leaves nothing behind.** Every attempt ends by
//!   its own result, by its timeout or by its cancellation token, whichever
//!   comes first. A timed-out or cancelled `command` attempt kills the whole
//!   process group with SIGKILL *before* reaping the leader (so the group id
//!   cannot have been reused) and then reaps it; if the attempt's future is
//!   dropped instead, a guard kills the group and tokio reaps the leader. A
//!   timed-out or cancelled `http` attempt drops its connection. A timed-out,
//!   cancelled or dropped `openclaw` attempt aborts its run on the gateway
//!   (from a task it spawns, since the attempt's future may be gone).
//! - **Results are bounded.** A result larger than [`MAX_RESULT_BYTES`]
//!   fails the attempt with [`DriverError::OutputTooLarge`] (the process is
//!   killed, the response dropped) rather than being truncated into invalid
//!   JSON. Only the last [`MAX_STDERR_TAIL_BYTES`] of a program's stderr are
//!   kept, for the error message.
//! - **A node runs only what its operator allowed.** [`DriverPolicy`], from
//!   the node's `[gateways]` and `[secrets]` config, decides which programs
//!   a `command` gateway may run (absolute paths listed exactly, none by
//!   default) and where, which secret references resolve (env names with
//!   the configured prefix, never the cluster secret; files under the
//!   configured directory, links resolved), which hosts `http` and
//!   `openclaw` gateways call, and that the device key stays in the data
//!   directory. The node that takes a registration checks it, and
//!   [`driver_for`] checks it again with the building node's own policy,
//!   so a refused spec never starts a process, reads a secret or opens a
//!   connection.
//! - **Secrets by reference only.** A spec names an environment variable or a
//!   file ([`SecretRef`]); the value is read when the driver is built, kept
//!   in a header marked sensitive (`http`) or in the connection client
//!   (`openclaw`), and never printed by `Debug` or logged.
//! - **Programs see a clean environment**: only `PATH`, the spec's own
//!   variables and `GODEL_TASK_ID`, `GODEL_FENCING_TOKEN`, the gateway's
//!   fence (`GODEL_GATEWAY_ID`, `GODEL_GATEWAY_OWNER`, `GODEL_GATEWAY_TOKEN`)
//!   and `GODEL_SESSION_KEY` when there is one, so a node's secrets never
//!   leak into a gateway program.
//! - **Every call names its owner** ([`GatewayFence`]): the node that drives
//!   the gateway and its placement token, which rises with each move, so a
//!   gateway can refuse an old owner ([`DriverError::Fenced`]).
//!
//! # Shortcuts taken on purpose
//!
//! - [`GatewayDriver::open_session`] and [`GatewayDriver::close_session`]
//!   exist for drivers with gateway-side sessions (`openclaw`), but no
//!   session actor calls them yet: the `openclaw` driver makes sure its
//!   session exists before each turn instead.
//! - A `command` program that exits normally is trusted not to leave
//!   daemons: the group is killed only on timeout, cancel or oversize output
//!   (killing it after the leader is reaped could hit a reused id). A
//!   grandchild still holding stdout keeps the attempt open until its timeout,
//!   which then kills it.
//! - The breaker counts consecutive failures, not a ratio over a window:
//!   simpler to reason about and to test, and enough for a per-gateway trip.
//!   A result that arrives after the state it was admitted in has changed is
//!   applied to the current state (no generation counter).
//! - Secrets are read once, when the driver is built; rotating one means
//!   rebuilding the driver.
//! - `http` probes without a health URL report healthy; the breaker judges
//!   such a gateway by its calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fsm::{FencingToken, SessionKey, TaskId};

mod backpressure;
mod breaker;
mod command;
mod guarded;
mod http;
mod managed;
mod openclaw;
mod policy;
mod sim;
mod spec;

pub use backpressure::{BACKPRESSURE_PERCENT, accepts_new_session};
pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker, Transition};
pub use command::CommandDriver;
pub use guarded::GuardedDriver;
pub use http::HttpDriver;
pub use managed::ManagedProcess;
pub use openclaw::{DEVICE_KEY_FILE, OpenClawDriver};
pub use policy::DriverPolicy;
pub use sim::SimDriver;
pub use spec::{
    CommandSpec, DriverSpec, GatewayKind, GatewaySpec, HttpSpec, LatencySpec, ManagedSpec,
    OpenClawSpec, SecretRef, SimSpec,
};

/// Largest result an attempt may return, in bytes (stdout of a `command`
/// program, body of an `http` response). Past it the attempt fails with
/// [`DriverError::OutputTooLarge`].
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;

/// How much of a program's stderr (its last bytes) goes into an error, in bytes.
pub const MAX_STDERR_TAIL_BYTES: usize = 4 * 1024;

/// How long a health probe may take before it reports unhealthy.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A boxed, sendable future borrowing the driver: what the trait's methods
/// return, so the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Results of this module.
pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// One way of running task attempts on one kind of gateway.
///
/// Implementations are shared (`Arc<dyn GatewayDriver>`) by every session of
/// a gateway, so `run` takes `&self` and may be called concurrently.
pub trait GatewayDriver: Send + Sync + std::fmt::Debug {
    /// The kind of gateway this driver talks to.
    fn kind(&self) -> GatewayKind;

    /// Runs one attempt. Ends by the attempt's result, by `req.timeout`
    /// ([`DriverError::Timeout`]) or by `cancel` ([`DriverError::Cancelled`]),
    /// whichever comes first, leaving no process or connection behind.
    fn run(&self, req: RunRequest, cancel: CancellationToken) -> BoxFuture<'_, Result<RunOutput>>;

    /// Checks whether the gateway can take work; never takes longer than
    /// about [`PROBE_TIMEOUT`].
    fn probe(&self) -> BoxFuture<'_, Health>;

    /// Makes sure the gateway-side session for `key` exists before the
    /// first attempt of a Godel session runs in it. Called by the session
    /// actor; must be idempotent (it runs again after a restart or a move).
    /// Drivers without gateway-side sessions have nothing to open.
    fn open_session(&self, key: &SessionKey) -> BoxFuture<'_, Result<()>> {
        let _ = key;
        Box::pin(async { Ok(()) })
    }

    /// Ends whatever still runs in the gateway-side session for `key` once
    /// the Godel session has ended (completed, failed, cancelled, timed out
    /// or errored). Idempotent; drivers without sessions do nothing.
    fn close_session(&self, key: &SessionKey) -> BoxFuture<'_, Result<()>> {
        let _ = key;
        Box::pin(async { Ok(()) })
    }
}

/// One attempt of one task, as a driver sees it.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// The task.
    pub task_id: TaskId,
    /// The fencing token of the lease this attempt runs under; the gateway
    /// should pass it back with anything it writes elsewhere.
    pub fencing_token: FencingToken,
    /// Session affinity, if the task has it.
    pub session_key: Option<SessionKey>,
    /// The task's payload, JSON text (shared: retries reuse it).
    pub payload: Arc<str>,
    /// How long the attempt may take, end to end.
    pub timeout: Duration,
    /// This attempt's span in the task's trace, sent to the gateway as
    /// `traceparent`; `None` for a task without a trace.
    pub trace: Option<crate::trace::TraceContext>,
    /// Which node drives the gateway, and under which placement: sent with
    /// the call so the gateway can refuse an old owner.
    pub fence: GatewayFence,
    /// Asked right before the call leaves for the gateway (a program
    /// started, a request or frame sent), after any wait on the way:
    /// false stops it unrun ([`DriverError::NotOwner`]).
    pub guard: CallGuard,
    /// For the first attempt of a session on a gateway that does not hold
    /// its conversation (it moved here): the turns of its last checkpoint,
    /// as text, which the driver gives the model before the message (the
    /// OpenClaw driver puts them ahead of the turn's message, so they
    /// enter the new conversation's transcript).
    pub context: Option<Arc<str>>,
    /// The feature flags on for this task here (`fsm::FeatureFlag`), by
    /// name: an `http` gateway gets them as `flags`, a `command` program
    /// as `GODEL_FLAGS` (comma-separated), a simulator echoes them.
    pub flags: Vec<String>,
    /// The agent's role, as its registration copied it: an OpenClaw run
    /// that calls a tool it does not list is stopped, and the prompt goes
    /// ahead of the message; other gateways are told (`role` in an `http`
    /// body, `GODEL_ROLE`, `GODEL_ROLE_PROMPT` and `GODEL_ALLOWED_TOOLS`
    /// for a `command` program). `None`: no role (a test's request).
    pub role: Option<Arc<RunRole>>,
}

/// An agent's role, for one attempt ([`RunRequest::role`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunRole {
    /// Its name.
    pub name: String,
    /// The tools the agent may call (`None`: any).
    pub tools: Option<Vec<String>>,
    /// Given ahead of the task's message.
    pub prompt: Option<String>,
}

impl RunRole {
    /// Whether the agent may call `tool`.
    pub fn allows(&self, tool: &str) -> bool {
        self.tools
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == tool))
    }
}

/// Whether this node may still make a gateway call: asked by the driver at
/// the last moment before the call leaves. The agent's guard: the node is
/// in contact with the majority and its replica still places the gateway
/// here under the call's fencing token. An attempt checks both when it
/// starts; a node frozen (SIGSTOP, a VM pause) between that check and the
/// call would otherwise make the call with the old token after the
/// majority moved the gateway, and the new owner had called it.
#[derive(Clone)]
pub struct CallGuard(Option<Arc<dyn Fn() -> bool + Send + Sync>>);

impl CallGuard {
    /// A guard asking `allows`.
    pub fn new(allows: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        CallGuard(Some(Arc::new(allows)))
    }

    /// Whether the call may leave now.
    pub fn allows(&self) -> bool {
        self.0.as_ref().is_none_or(|f| f())
    }

    /// [`DriverError::NotOwner`] unless the call may leave now.
    pub fn check(&self) -> Result<()> {
        if self.allows() {
            Ok(())
        } else {
            Err(DriverError::NotOwner)
        }
    }
}

/// A guard that always allows (callers that own nothing to lose).
impl Default for CallGuard {
    fn default() -> Self {
        CallGuard(None)
    }
}

impl std::fmt::Debug for CallGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "CallGuard"
        } else {
            "CallGuard(always)"
        })
    }
}

/// A gateway's owner and fencing token, sent with every call to it.
///
/// The token rises each time the gateway is placed on a node (the
/// registry's `placement_token`). A gateway that keeps the highest token it
/// has seen and refuses lower ones ([`DriverError::Fenced`]) is never driven
/// by two nodes at once: an old owner that has not yet applied the move is
/// refused from the new owner's first call on. How each kind carries it:
///
/// | kind | carried as | refusal |
/// | --- | --- | --- |
/// | `command` | env `GODEL_GATEWAY_ID`, `GODEL_GATEWAY_OWNER`, `GODEL_GATEWAY_TOKEN` | exit status [`FENCED_EXIT_CODE`] |
/// | `http` | headers `Godel-Gateway-Id`, `Godel-Gateway-Owner`, `Godel-Gateway-Token` | `409` with a `Godel-Fenced` header |
/// | `openclaw` | the run's `idempotencyKey`: `godel-<task>-<lease token>-<gateway token>` | none (the gateway has no such check; the key shows the owner's placement in its logs) |
/// | `sim` | not sent (no I/O) | none |
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayFence {
    /// The gateway.
    pub gateway: crate::fsm::GatewayId,
    /// The node that drives it.
    pub owner: crate::raft::NodeId,
    /// Its placement token on that node.
    pub token: u64,
}

/// The exit status with which a `command` gateway program refuses a call
/// whose [`GatewayFence`] token is lower than one it has seen.
pub const FENCED_EXIT_CODE: i32 = 86;

/// The response header with which an `http` gateway marks a `409` as a
/// refused [`GatewayFence`] (any value).
pub const FENCED_HEADER: &str = "godel-fenced";

/// What a successful attempt produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutput {
    /// The result, JSON text of at most [`MAX_RESULT_BYTES`] bytes.
    pub result_json: String,
    /// How long the attempt took, as the driver measured it.
    pub elapsed: Duration,
}

/// What a health probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// The gateway answers and can take work.
    Healthy,
    /// The gateway cannot take work now.
    Unhealthy {
        /// Why, for operators.
        reason: String,
    },
}

impl Health {
    /// Whether the probe found the gateway healthy.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// What a probe found, as the registry records it.
impl From<&Health> for crate::fsm::Health {
    fn from(h: &Health) -> Self {
        match h {
            Health::Healthy => crate::fsm::Health::Healthy,
            Health::Unhealthy { .. } => crate::fsm::Health::Unhealthy,
        }
    }
}

/// Errors of gateway drivers and gateway specs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The attempt ran past its timeout and was stopped.
    #[error("attempt timed out after {after:?}")]
    Timeout {
        /// The timeout that expired.
        after: Duration,
    },
    /// The attempt was cancelled by its caller and stopped.
    #[error("attempt cancelled")]
    Cancelled,
    /// The gateway could not be reached or could not run the attempt
    /// (connection refused, HTTP 5xx, program could not be started).
    #[error("gateway unavailable: {reason}")]
    Unavailable {
        /// What went wrong.
        reason: String,
    },
    /// The gateway ran the attempt and it failed (non-zero exit, HTTP 4xx,
    /// a simulated failure).
    #[error("task failed: {reason}")]
    TaskFailed {
        /// What the gateway said (for a program: exit status and stderr tail).
        reason: String,
        /// Whether the same task might succeed on another attempt.
        retryable: bool,
    },
    /// The gateway's circuit breaker is open: the attempt was not tried.
    #[error("gateway circuit open{}", .retry_after.map(|d| format!("; retry after {d:?}")).unwrap_or_default())]
    CircuitOpen {
        /// When trial calls will be let through.
        retry_after: Option<Duration>,
    },
    /// The result was larger than allowed.
    #[error("result larger than {limit_bytes} bytes")]
    OutputTooLarge {
        /// The bound that was exceeded, in bytes.
        limit_bytes: usize,
    },
    /// A gateway spec does not make sense; every problem is listed, each
    /// starting with the field it is about.
    #[error("invalid gateway spec:\n  - {}", .0.join("\n  - "))]
    InvalidSpec(Vec<String>),
    /// The gateway refused Godel itself (a wrong token, an unsupported
    /// protocol version, a client identity it does not accept): nothing
    /// will work on it until its configuration or Godel's changes. Not the
    /// task's fault: agents give such a lease back without spending an
    /// attempt (the task may run on another gateway), and the breaker
    /// counts it, so the gateway soon takes no work.
    #[error("gateway refused the connection: {reason}")]
    Rejected {
        /// What the gateway said.
        reason: String,
    },
    /// The gateway refused the call's [`GatewayFence`]: it has seen a higher
    /// token, so another node drives it now. Not the task's fault: the
    /// agent gives the lease back without spending an attempt (this node is
    /// about to learn of the move). The breaker counts it, so a gateway
    /// that keeps refusing (its record of tokens is wrong) soon takes no
    /// work here instead of bouncing leases.
    #[error("gateway refused a stale fencing token: {reason}")]
    Fenced {
        /// What the gateway said.
        reason: String,
    },
    /// The call was not made: right before it would have left, this node
    /// was no longer the gateway's owner in good standing (cut off from the
    /// majority, or its replica had moved the gateway). Not the task's or
    /// the gateway's fault.
    #[error("not made: this node no longer drives the gateway")]
    NotOwner,
    /// A secret a spec refers to could not be read. Names the reference,
    /// never the value.
    #[error("secret {reference} unavailable: {reason}")]
    Secret {
        /// The reference (`env:NAME` or `file:PATH`).
        reference: String,
        /// Why it could not be read.
        reason: String,
    },
}

impl DriverError {
    /// Whether another attempt of the same task may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            DriverError::Timeout { .. }
            | DriverError::Unavailable { .. }
            | DriverError::CircuitOpen { .. }
            | DriverError::Rejected { .. }
            | DriverError::Fenced { .. }
            | DriverError::NotOwner => true,
            DriverError::TaskFailed { retryable, .. } => *retryable,
            DriverError::Cancelled
            | DriverError::OutputTooLarge { .. }
            | DriverError::InvalidSpec(_)
            | DriverError::Secret { .. } => false,
        }
    }

    /// Whether the error speaks against the gateway itself (and so counts
    /// as a failure for its [`CircuitBreaker`]), rather than against the
    /// task or the caller.
    pub fn is_gateway_fault(&self) -> bool {
        matches!(
            self,
            DriverError::Timeout { .. }
                | DriverError::Unavailable { .. }
                | DriverError::Rejected { .. }
                | DriverError::Fenced { .. }
        )
    }

    /// Stable machine-readable code, recorded as an attempt's failure reason.
    pub fn code(&self) -> &'static str {
        match self {
            DriverError::Timeout { .. } => "timeout",
            DriverError::Cancelled => "cancelled",
            DriverError::Unavailable { .. } => "gateway_unavailable",
            DriverError::CircuitOpen { .. } => "circuit_open",
            DriverError::TaskFailed { .. } => "task_failed",
            DriverError::OutputTooLarge { .. } => "output_too_large",
            DriverError::Rejected { .. } => "gateway_rejected",
            DriverError::Fenced { .. } => "gateway_fenced",
            DriverError::NotOwner => "not_owner",
            DriverError::InvalidSpec(_) => "invalid_spec",
            DriverError::Secret { .. } => "secret_unavailable",
        }
    }
}

/// What a node gives the drivers it builds.
#[derive(Clone, Debug, Default)]
pub struct DriverContext {
    /// The node's data directory: where node-wide driver state lives (the
    /// `openclaw` device key, [`DEVICE_KEY_FILE`]). Without one, such state
    /// is kept in memory only.
    pub data_dir: Option<std::path::PathBuf>,
    /// What the node's config lets drivers run, read and call.
    pub policy: DriverPolicy,
}

impl DriverContext {
    /// The context a node with `config` builds drivers in.
    pub fn for_node(config: &crate::config::Config) -> Self {
        DriverContext {
            data_dir: Some(config.node.data_dir.clone()),
            policy: DriverPolicy::from_config(config),
        }
    }
}

/// Builds the driver a spec describes, if it is valid and the context's
/// policy lets this node run it; reads the secrets the spec refers to (and
/// the node's `openclaw` device key). A refused spec starts nothing.
pub fn driver_for(spec: &GatewaySpec, ctx: &DriverContext) -> Result<Arc<dyn GatewayDriver>> {
    spec.validate()?;
    ctx.policy.check(spec)?;
    Ok(match &spec.driver {
        DriverSpec::Sim(s) => Arc::new(SimDriver::new(s.clone())),
        DriverSpec::Command(c) => Arc::new(CommandDriver::new(c.clone())),
        DriverSpec::Http(h) => Arc::new(HttpDriver::new(h.clone(), &ctx.policy)?),
        DriverSpec::Openclaw(o) => Arc::new(OpenClawDriver::new(
            o.clone(),
            ctx.data_dir.as_deref(),
            &ctx.policy,
        )?),
    })
}

/// Runs `work` until it finishes, `timeout` passes or `cancel` fires,
/// whichever comes first. Dropping `work` is how the attempt is stopped.
async fn bounded<T>(
    timeout: Duration,
    cancel: &CancellationToken,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(DriverError::Cancelled),
        r = work => r,
        _ = tokio::time::sleep(timeout) => Err(DriverError::Timeout { after: timeout }),
    }
}

/// Turns gateway output into result JSON: the text itself if it is JSON,
/// else the text as a JSON string. Empty output is `null`. Fails when the
/// JSON (escaping included) is larger than [`MAX_RESULT_BYTES`].
fn result_json(bytes: &[u8]) -> Result<String> {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    let json = if trimmed.is_empty() {
        "null".to_owned()
    } else if serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_ok() {
        trimmed.to_owned()
    } else {
        serde_json::Value::String(trimmed.to_owned()).to_string()
    };
    if json.len() > MAX_RESULT_BYTES {
        return Err(DriverError::OutputTooLarge {
            limit_bytes: MAX_RESULT_BYTES,
        });
    }
    Ok(json)
}
