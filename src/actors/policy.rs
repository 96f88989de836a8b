//! The restart policy and the pure decision logic that applies it.
//!
//! Nothing here touches ractor, tokio or the clock: the caller passes `now`,
//! so every decision is unit-tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which children a supervisor restarts when one of them fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Restart only the child that failed (the default: gateways, agents and
    /// shards are independent of their siblings).
    #[default]
    OneForOne,
    /// Stop every sibling and restart all of them after the failed child's
    /// backoff (for children that only make sense together).
    OneForAll,
}

/// What happens when a child fails more often than the intensity limit allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// The supervisor fails, so its own parent sees `ActorFailed` and applies
    /// its policy (OTP's escalation; the default).
    #[default]
    Escalate,
    /// The supervisor drops the child, reports a give-up and keeps running
    /// (for children whose loss should not take their siblings down).
    GiveUp,
}

/// How a supervisor restarts failed children: the one restart policy of the
/// actor tree (CONVENTIONS 9).
///
/// Backoff for the n-th failure inside `window` (n = 1, 2, ...) is
/// `initial_backoff * multiplier^(n-1)`, capped at `max_backoff`. A child that
/// fails more than `max_restarts` times within `window` is not restarted
/// again: see [`OnExhausted`]. Failures older than `window` are forgotten, so
/// the backoff also resets after a quiet `window`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartPolicy {
    /// Delay before the first restart. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Factor applied to the delay for each further failure in the window
    /// (unitless, >= 1.0). Default 2.0.
    pub multiplier: f64,
    /// Upper bound on the delay. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Restarts allowed within `window` before the limit trips. Default 5.
    pub max_restarts: u32,
    /// The sliding window the intensity limit counts over. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Which children restart when one fails. Default one-for-one.
    pub strategy: Strategy,
    /// What exceeding the intensity limit does. Default escalate.
    pub on_exhausted: OnExhausted,
    /// How long a stopping supervisor waits for each child to stop gracefully
    /// before the child is killed. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(5),
            max_restarts: 5,
            window: Duration::from_secs(30),
            strategy: Strategy::OneForOne,
            on_exhausted: OnExhausted::Escalate,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

impl RestartPolicy {
    /// Every problem with the policy, or `Ok` (CONVENTIONS 12: report all at
    /// once).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            problems.push(format!(
                "restart multiplier must be a finite number >= 1.0, got {}",
                self.multiplier
            ));
        }
        if self.initial_backoff > self.max_backoff {
            problems.push(format!(
                "initial_backoff ({:?}) exceeds max_backoff ({:?})",
                self.initial_backoff, self.max_backoff
            ));
        }
        if self.window.is_zero() {
            problems.push("restart window must be longer than zero".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The delay before restarting after the `nth` failure in the window
    /// (1-based). Saturates at `max_backoff`.
    pub fn backoff(&self, nth: u32) -> Duration {
        let exp = i32::try_from(nth.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        if !secs.is_finite() || secs >= self.max_backoff.as_secs_f64() {
            return self.max_backoff;
        }
        Duration::from_secs_f64(secs)
    }
}

/// What a supervisor does about one child failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart the child after this delay; `attempt` is the failure's number
    /// within the window (1-based).
    Restart {
        /// Delay before the restart.
        after: Duration,
        /// The failure's number within the window, 1-based.
        attempt: u32,
    },
    /// The intensity limit tripped: the supervisor must fail.
    Escalate,
    /// The intensity limit tripped: drop the child and carry on.
    GiveUp,
}

/// Remembers one child's recent failures and turns the next one into a
/// [`Decision`]. Pure: time comes in as an argument.
#[derive(Clone, Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    failures: VecDeque<Instant>,
}

impl RestartTracker {
    /// A tracker with no failures yet.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            failures: VecDeque::new(),
        }
    }

    /// The policy this tracker applies.
    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// Failures currently inside the window (as of the last call).
    pub fn recent_failures(&self) -> usize {
        self.failures.len()
    }

    /// Records a failure at `now` and decides what to do about it.
    pub fn on_failure(&mut self, now: Instant) -> Decision {
        while let Some(&oldest) = self.failures.front() {
            if now.saturating_duration_since(oldest) >= self.policy.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        self.failures.push_back(now);
        let nth = u32::try_from(self.failures.len()).unwrap_or(u32::MAX);
        if nth > self.policy.max_restarts {
            return match self.policy.on_exhausted {
                OnExhausted::Escalate => Decision::Escalate,
                OnExhausted::GiveUp => Decision::GiveUp,
            };
        }
        Decision::Restart {
            after: self.policy.backoff(nth),
            attempt: nth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(max_restarts: u32, window: Duration) -> RestartPolicy {
        RestartPolicy {
            initial_backoff: ms(100),
            multiplier: 2.0,
            max_backoff: ms(1000),
            max_restarts,
            window,
            ..RestartPolicy::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RestartPolicy::default().validate(), Ok(()));
    }

    #[test]
    fn validate_reports_every_problem() {
        let p = RestartPolicy {
            multiplier: 0.5,
            initial_backoff: ms(10),
            max_backoff: ms(1),
            window: Duration::ZERO,
            ..RestartPolicy::default()
        };
        assert_eq!(p.validate().unwrap_err().len(), 3);
    }

    #[test]
    fn backoff_grows_exponentially_and_caps() {
        let p = policy(10, Duration::from_secs(60));
        let got: Vec<_> = (1..=6).map(|n| p.backoff(n)).collect();
        assert_eq!(
            got,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(p.backoff(u32::MAX), ms(1000));
    }

    #[test]
    fn restarts_then_escalates_past_the_limit() {
        let mut t = RestartTracker::new(policy(2, Duration::from_secs(10)));
        let t0 = Instant::now();
        assert_eq!(
            t.on_failure(t0),
            Decision::Restart {
                after: ms(100),
                attempt: 1
            }
        );
        assert_eq!(
            t.on_failure(t0 + ms(500)),
            Decision::Restart {
                after: ms(200),
                attempt: 2
            }
        );
        assert_eq!(t.on_failure(t0 + ms(900)), Decision::Escalate);
    }

    #[test]
    fn give_up_instead_of_escalating_when_configured() {
        let mut p = policy(0, Duration::from_secs(10));
        p.on_exhausted = OnExhausted::GiveUp;
        let mut t = RestartTracker::new(p);
        assert_eq!(t.on_failure(Instant::now()), Decision::GiveUp);
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let mut t = RestartTracker::new(policy(2, Duration::from_secs(10)));
        let t0 = Instant::now();
        t.on_failure(t0);
        t.on_failure(t0 + ms(1));
        // Both earlier failures are 10 s old: the window is empty again, and
        // the backoff starts over.
        assert_eq!(
            t.on_failure(t0 + Duration::from_secs(10) + ms(1)),
            Decision::Restart {
                after: ms(100),
                attempt: 1
            }
        );
        assert_eq!(t.recent_failures(), 1);
    }

    #[test]
    fn sliding_window_keeps_recent_failures() {
        let mut t = RestartTracker::new(policy(2, Duration::from_secs(10)));
        let t0 = Instant::now();
        t.on_failure(t0);
        t.on_failure(t0 + Duration::from_secs(6));
        // t0 drops out, t0+6 s stays: this is the 2nd failure in the window.
        assert_eq!(
            t.on_failure(t0 + Duration::from_secs(11)),
            Decision::Restart {
                after: ms(200),
                attempt: 2
            }
        );
        assert_eq!(
            t.on_failure(t0 + Duration::from_secs(12)),
            Decision::Escalate
        );
    }

    #[test]
    fn policy_reads_from_toml_with_human_durations() {
        let p: RestartPolicy = toml::from_str(
            "initial_backoff = \"50ms\"\nmax_restarts = 3\nstrategy = \"one_for_all\"",
        )
        .unwrap();
        assert_eq!(p.initial_backoff, ms(50));
        assert_eq!(p.max_restarts, 3);
        assert_eq!(p.strategy, Strategy::OneForAll);
        assert_eq!(p.window, RestartPolicy::default().window);
        assert!(toml::from_str::<RestartPolicy>("bogus = 1").is_err());
    }
}
