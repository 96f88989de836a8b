//! Backpressure: a gateway near its session capacity takes no new sessions.
//!
//! The rule lives in the replicated state (the dispatcher applies it when it
//! matches tasks to agents); it is re-exported here with the gateway code.
//! Sessions already open keep running and keep their session keys; new work
//! waits in the queue or goes to another gateway. Small gateways still fill
//! up: with `max_sessions = 5` the fifth session opens (4 is 80%), the sixth
//! does not.

pub use crate::fsm::{BACKPRESSURE_PERCENT, accepts_new_session};
