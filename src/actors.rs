//! Actors: the node's supervision tree and its one restart policy.
//!
//! # Shape
//!
//! ```text
//! NodeSupervisor ("node")
//! ├── "queue_shards"  Supervisor ─ QueueShard actors
//! ├── "gateways"      Supervisor ─ Gateway actors
//! │                                 └── "sessions" Supervisor ─ Session actors
//! └── "agents"        Supervisor ─ Agent actors
//! ```
//!
//! Each gateway actor links a `sessions` supervisor of its own (same
//! policy): agents start a session's actor on first use through the
//! gateway's [`SessionHost`], the gateway actor stops it when the committed
//! session ends, and a `sessions` supervisor that escalates fails its
//! gateway actor, which its own supervisor then restarts (see `session`).
//!
//! Every box is the same [`Supervisor`] actor. A supervisor owns named
//! children, each described by a [`ChildSpec`] (a name plus a factory that
//! returns the actor and its arguments, so it can spawn the child again).
//! Children are added and removed at runtime through a [`SupervisorRef`]
//! (gateways and agents come and go with the replicated state); the three
//! subtrees start empty. [`NodeSupervisor`] starts and stops the tree as one
//! unit: stop goes top-down, each supervisor stopping its children in
//! `post_stop` and waiting up to `shutdown_timeout` before ractor kills them,
//! and the whole stop is bounded by a caller's deadline.
//!
//! # The policy
//!
//! [`RestartPolicy`] is the only place restart behaviour is configured, and
//! [`RestartTracker`] the only place it is decided, as a pure function of a
//! child's recent failures and `now` (unit-tested without sleeping):
//!
//! - A child that **fails** (a handler panicked or returned `Err`) is
//!   restarted after an exponential backoff: `initial_backoff` (100 ms) times
//!   `multiplier` (2) per failure in the window, capped at `max_backoff` (5 s).
//!   The restart is a timer message to the supervisor itself, so its mailbox
//!   keeps flowing during the backoff.
//! - More than `max_restarts` (5) failures within `window` (30 s) trips the
//!   intensity limit: by default the supervisor **escalates**, failing itself
//!   so that its parent sees `ActorFailed` and applies the same policy one
//!   level up (Erlang/OTP). `OnExhausted::GiveUp` drops just the child.
//! - A child that **stops cleanly** is forgotten, never restarted; ractor
//!   reports a `kill` as a clean stop too.
//! - One-for-one by default; `Strategy::OneForAll` stops and restarts every
//!   sibling with the failed child's backoff.
//!
//! Every restart, escalation and give-up is a [`SupervisorEvent`], turned by
//! one function into a log line, a counter ([`METRIC_RESTARTS`] and friends;
//! register them with [`register_metrics`]) and a message on the tree's
//! bounded [`Observer`] channel.
//!
//! # Why ractor's defaults are overridden
//!
//! ractor (0.16) supplies supervision *events* but no restart strategy: its
//! default `handle_supervisor_evt` stops the supervisor when any child exits,
//! even cleanly, and nothing is ever restarted (CRATES.md 1.1, pitfall 6).
//! [`Supervisor`] overrides it. Two ractor facts this module relies on: a
//! panic is only caught if the build unwinds (`panic = "abort"` would turn
//! every actor panic into a process abort), and an error in `pre_start` fails
//! the spawn rather than producing a supervision event, so a failed restart
//! is fed back into the tracker as one more failure.
//!
//! # Shortcuts, on purpose
//!
//! - Intensity and backoff are counted **per child**, not per supervisor as
//!   in OTP: children here are independent gateways and agents, and a
//!   supervisor-wide count would let one noisy child spend its siblings'
//!   budget. A crash-looping child still escalates.
//! - No jitter on the backoff: restarts are local and rare, not a herd.
//! - A restarted supervisor comes back with its initial children only;
//!   children added at runtime are re-added by their owner, which reconciles
//!   with the committed state (actors cache; the state is the truth).
//! - Children are spawned unregistered: ractor's registry is process-global,
//!   and names here are only unique among siblings.
//! - One-for-all does not wait for the stopped siblings to exit before the
//!   restart timer fires; with a backoff of a few milliseconds old and new
//!   incarnations may overlap briefly.
//! - Requests to a supervisor ([`SupervisorRef`]) time out after
//!   [`CALL_TIMEOUT`].

mod agent;
mod error;
mod events;
mod gateway;
mod keeper;
mod node;
mod policy;
mod router;
mod runtime;
mod session;
mod shard;
mod spec;
mod supervisor;

pub use agent::{AgentActor, AgentArgs, AgentMsg, AgentState};
pub use error::{Error, Result};
pub use events::{
    LABEL_SUPERVISOR, METRIC_ESCALATIONS, METRIC_EVENTS_DROPPED, METRIC_GIVE_UPS, METRIC_RESTARTS,
    Observer, SupervisionMetrics, SupervisorEvent, metrics, register_metrics,
};
pub use gateway::{
    CIRCUIT_CHECK, GatewayActor, GatewayArgs, GatewayMsg, GatewayRegistry, GatewayState,
    UNHEALTHY_AFTER,
};
pub use keeper::{KeeperMsg, ShardKeeper, keeper_name, keepers_under};
pub use node::{AGENTS, GATEWAYS, NODE, NodeSupervisor, QUEUE_SHARDS};
pub use policy::{Decision, OnExhausted, RestartPolicy, RestartTracker, Strategy};
pub use router::{AgentDirectory, route_leases};
pub use runtime::{RECONCILE_INTERVAL, reconcile_loop};
pub use session::{
    OPEN_TIMEOUT, SESSIONS, SessionActor, SessionArgs, SessionHost, SessionMsg, SessionState,
    session_actor,
};
pub use shard::{QueueShardActor, SHARD, ShardMsg, dispatch_spec};
pub use spec::ChildSpec;
pub use supervisor::{
    CALL_TIMEOUT, Supervisor, SupervisorArgs, SupervisorMsg, SupervisorRef, SupervisorState,
};
