//! The per-gateway circuit breaker: a small state machine with time passed
//! in, so it is tested without sleeping and every transition is returned.
//!
//! ```text
//! Closed --(failure_threshold consecutive failures)--> Open
//! Open --(cool_down elapsed, seen by `admit` or `poll`)--> HalfOpen
//! HalfOpen --(success_threshold successes)--> Closed
//! HalfOpen --(any failure)--> Open
//! ```
//!
//! In half-open at most `half_open_max_calls` trial calls are in flight at
//! once; a trial that ends with no verdict (cancelled, or a task-side
//! failure) must be handed back with [`CircuitBreaker::on_neutral`] so its
//! slot frees.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Breaker thresholds, part of a gateway's spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures (in closed) that open the breaker.
    #[schema(minimum = 1, maximum = 10_000)]
    pub failure_threshold: u32,
    /// How long the breaker stays open before it lets trial calls through
    /// (up to an hour).
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub cool_down: Duration,
    /// Trial calls in flight at once while half-open.
    #[schema(minimum = 1, maximum = 10_000)]
    pub half_open_max_calls: u32,
    /// Successful trial calls, counted over the whole half-open period,
    /// that close the breaker again.
    #[schema(minimum = 1, maximum = 10_000)]
    pub success_threshold: u32,
}

impl BreakerConfig {
    /// Longest cool-down a spec may ask for.
    pub const MAX_COOL_DOWN: Duration = Duration::from_secs(3600);
    /// Largest threshold or call count a spec may ask for.
    pub const MAX_COUNT: u32 = 10_000;

    /// Every problem with these thresholds, each prefixed with `prefix` and
    /// the field name.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v) in [
            ("failure_threshold", self.failure_threshold),
            ("half_open_max_calls", self.half_open_max_calls),
            ("success_threshold", self.success_threshold),
        ] {
            if v == 0 || v > Self::MAX_COUNT {
                p.push(format!("{prefix}{name}: must be 1..={}", Self::MAX_COUNT));
            }
        }
        if self.cool_down.is_zero() || self.cool_down > Self::MAX_COOL_DOWN {
            p.push(format!(
                "{prefix}cool_down: must be > 0 and at most {:?}",
                Self::MAX_COOL_DOWN
            ));
        }
        p
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(10),
            half_open_max_calls: 2,
            success_threshold: 2,
        }
    }
}

/// The breaker's state, as reported and emitted in events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow; failures are counted.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// A few trial calls decide whether to close or reopen.
    HalfOpen,
}

/// The breaker's state as the registry records it.
impl From<BreakerState> for crate::fsm::Circuit {
    fn from(s: BreakerState) -> Self {
        match s {
            BreakerState::Closed => crate::fsm::Circuit::Closed,
            BreakerState::Open => crate::fsm::Circuit::Open,
            BreakerState::HalfOpen => crate::fsm::Circuit::HalfOpen,
        }
    }
}

/// A change of state, returned by the call that caused it so the caller can
/// emit the event, the metric and the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

impl Inner {
    fn state(&self) -> BreakerState {
        match self {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// One gateway's circuit breaker. Not thread safe on purpose: the gateway's
/// [`super::GuardedDriver`] owns it behind a mutex.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Inner,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Inner::Closed { failures: 0 },
        }
    }

    /// The current state (does not advance time: see [`Self::poll`]).
    pub fn state(&self) -> BreakerState {
        self.inner.state()
    }

    /// The thresholds.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// How long until an open breaker lets trial calls through; `None` when
    /// not open.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match self.inner {
            Inner::Open { until } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// Moves an open breaker whose cool-down has passed to half-open.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        match self.inner {
            Inner::Open { until } if now >= until => self.set(Inner::HalfOpen {
                in_flight: 0,
                successes: 0,
            }),
            _ => None,
        }
    }

    /// Asks to make one call. Returns whether it may go ahead, and the
    /// transition (open -> half-open) the asking caused, if any. Every
    /// allowed call must be answered by exactly one of [`Self::on_success`],
    /// [`Self::on_failure`] or [`Self::on_neutral`].
    pub fn admit(&mut self, now: Instant) -> (bool, Option<Transition>) {
        let transition = self.poll(now);
        let allowed = match &mut self.inner {
            Inner::Closed { .. } => true,
            Inner::Open { .. } => false,
            Inner::HalfOpen { in_flight, .. } => {
                if *in_flight < self.config.half_open_max_calls {
                    *in_flight += 1;
                    true
                } else {
                    false
                }
            }
        };
        (allowed, transition)
    }

    /// A call succeeded.
    pub fn on_success(&mut self, _now: Instant) -> Option<Transition> {
        match &mut self.inner {
            Inner::Closed { failures } => {
                *failures = 0;
                None
            }
            Inner::Open { .. } => None,
            Inner::HalfOpen {
                in_flight,
                successes,
            } => {
                *in_flight = in_flight.saturating_sub(1);
                *successes += 1;
                if *successes >= self.config.success_threshold {
                    self.set(Inner::Closed { failures: 0 })
                } else {
                    None
                }
            }
        }
    }

    /// A call failed in a way that speaks against the gateway (see
    /// [`super::DriverError::is_gateway_fault`]).
    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        let open = Inner::Open {
            until: now + self.config.cool_down,
        };
        match &mut self.inner {
            Inner::Closed { failures } => {
                *failures += 1;
                if *failures >= self.config.failure_threshold {
                    self.set(open)
                } else {
                    None
                }
            }
            Inner::Open { .. } => None,
            Inner::HalfOpen { .. } => self.set(open),
        }
    }

    /// A call ended with no verdict on the gateway (cancelled, or failed for
    /// the task's own reasons): frees its half-open trial slot.
    pub fn on_neutral(&mut self, _now: Instant) {
        if let Inner::HalfOpen { in_flight, .. } = &mut self.inner {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    fn set(&mut self, next: Inner) -> Option<Transition> {
        let from = self.inner.state();
        self.inner = next;
        let to = next.state();
        (from != to).then_some(Transition { from, to })
    }
}
