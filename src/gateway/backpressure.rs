//! Backpressure: a gateway near its session capacity takes no new sessions.

/// At this share of its `max_sessions`, in percent, a gateway accepts no new
/// sessions. Sessions already open keep running and keep their session
/// keys; new work waits in the queue or goes to another gateway.
pub const BACKPRESSURE_PERCENT: u32 = 90;

/// Whether a gateway with `active` open sessions out of `max_sessions` may
/// open one more: true while `active < 90% of max_sessions`.
///
/// A gateway with no capacity (`max_sessions == 0`) accepts nothing. Small
/// gateways still fill up: with `max_sessions = 5` the fifth session opens
/// (4 is 80%), the sixth does not.
pub fn accepts_new_session(active: u32, max_sessions: u32) -> bool {
    // Integer math, no rounding: active / max < 90 / 100.
    u64::from(active) * 100 < u64::from(max_sessions) * u64::from(BACKPRESSURE_PERCENT)
}
