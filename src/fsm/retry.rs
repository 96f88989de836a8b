//! Retry backoff: exponential, capped, with jitter derived from the leader's seed.

use serde::{Deserialize, Serialize};

/// How long a failed task waits before its next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Delay after the first failure, in ms.
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub initial_ms: u64,
    /// Growth factor per further failure.
    #[schema(minimum = 1, maximum = 10)]
    pub multiplier: u32,
    /// Upper bound on any delay, in ms (at least `initial_ms`).
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 1_000,
            multiplier: 2,
            max_ms: 30_000,
        }
    }
}

impl Backoff {
    /// Longest delay a policy may ask for (one day), in ms.
    pub const MAX_DELAY_MS: u64 = 24 * 3600 * 1000;

    /// Checks the policy's fields, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial_ms == 0 || self.initial_ms > Self::MAX_DELAY_MS {
            return Err(format!(
                "backoff.initial_ms must be 1..={}",
                Self::MAX_DELAY_MS
            ));
        }
        if !(1..=10).contains(&self.multiplier) {
            return Err("backoff.multiplier must be 1..=10".into());
        }
        if self.max_ms < self.initial_ms || self.max_ms > Self::MAX_DELAY_MS {
            return Err(format!(
                "backoff.max_ms must be between backoff.initial_ms and {}",
                Self::MAX_DELAY_MS
            ));
        }
        Ok(())
    }
}

/// The delay before attempt `failures + 1`, after `failures >= 1` failed attempts.
///
/// The base grows as `initial * multiplier^(failures-1)`, capped at `max_ms`;
/// jitter spreads it over `[0.75, 1.25] x base`, again capped at `max_ms`.
/// `entropy` comes from the leader's seed, so every replica computes the same.
pub fn backoff_delay_ms(policy: &Backoff, failures: u32, entropy: u64) -> u64 {
    let mut base = policy.initial_ms;
    for _ in 1..failures.max(1) {
        base = base.saturating_mul(u64::from(policy.multiplier));
        if base >= policy.max_ms {
            break;
        }
    }
    let base = base.min(policy.max_ms);
    let spread = base / 2;
    let jittered = base - base / 4 + mix(entropy) % (spread + 1);
    jittered.clamp(1, policy.max_ms)
}

/// SplitMix64 finalizer: turns a seed into well-spread bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let p = Backoff::default();
        for seed in 0..200 {
            let d1 = backoff_delay_ms(&p, 1, seed);
            assert!((750..=1250).contains(&d1), "{d1}");
            let d3 = backoff_delay_ms(&p, 3, seed);
            assert!((3000..=5000).contains(&d3), "{d3}");
            let d20 = backoff_delay_ms(&p, 20, seed);
            assert!((22_500..=30_000).contains(&d20), "{d20}");
        }
    }

    #[test]
    fn same_seed_same_delay() {
        let p = Backoff::default();
        assert_eq!(backoff_delay_ms(&p, 2, 7), backoff_delay_ms(&p, 2, 7));
        let spread: std::collections::BTreeSet<u64> =
            (0..50).map(|s| backoff_delay_ms(&p, 2, s)).collect();
        assert!(spread.len() > 10, "jitter should vary with the seed");
    }

    #[test]
    fn rejects_bad_policy() {
        let bad = Backoff {
            initial_ms: 0,
            ..Backoff::default()
        };
        assert!(bad.validate().unwrap_err().contains("initial_ms"));
        let bad = Backoff {
            max_ms: 10,
            ..Backoff::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_ms"));
    }
}
