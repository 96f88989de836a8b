//! Contact with the majority, as this node can judge it: when the last
//! heartbeat it sent was committed.
//!
//! The leader's placer moves a node's gateways once that node's last
//! committed heartbeat is older than `node_dead_after` (by the leader's
//! clock, from the time the leader stamped into the entry). The node itself
//! measures from when it *sent* that heartbeat, which is no later than the
//! stamp, and with a bound one heartbeat interval shorter (the margin
//! covers its reconciler's period and stopping the actors), so it counts
//! itself cut off before the majority counts it dead (the two clocks only
//! need to run at about the same rate). It then stops running its gateways
//! and agents (the runtime reconciler wants none): a node on the minority
//! side of a partition stops driving its gateways before the majority
//! places them elsewhere, and its agents stop running the leases that the
//! move gives back. The price: a cluster that commits nothing for that
//! long (an election that drags on) stops every node's actors, which the
//! reconciler starts again once heartbeats commit; the majority's placer
//! would move every gateway in that case anyway.
//!
//! A heartbeat counts only once this node's own replica has caught up with
//! what was committed when it committed (a read barrier), and an agent
//! checks for contact right before each gateway call. Without both, a node
//! back from a pause (SIGSTOP) longer than `node_dead_after` saw its first
//! heartbeat commit while its replica still applied the grants it had
//! missed, placed on it before the majority moved the gateway away, and
//! called the gateway with the old fencing token after the new owner had
//! used the new one (the `pause` drill's "gateways with two owners").
//! The driver asks once more right before the call leaves
//! (`gateway::CallGuard`): a node frozen between the agent's check and the
//! call must not make it on waking.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When this node last sent a heartbeat that committed.
#[derive(Debug)]
pub struct Contact {
    /// What the offsets count from.
    base: Instant,
    /// One more than the milliseconds after `base` at which the last
    /// committed heartbeat was sent; 0 before the first.
    sent_ms: AtomicU64,
}

impl Default for Contact {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            sent_ms: AtomicU64::new(0),
        }
    }
}

impl Contact {
    /// Records that a heartbeat sent at `sent` has committed.
    pub fn committed(&self, sent: Instant) {
        let ms = sent.saturating_duration_since(self.base).as_millis() as u64;
        self.sent_ms.fetch_max(ms + 1, Ordering::Relaxed);
    }

    /// How long ago the last committed heartbeat was sent; `None` before
    /// the first.
    pub fn age(&self) -> Option<Duration> {
        let ms = self.sent_ms.load(Ordering::Relaxed).checked_sub(1)?;
        let sent = self.base + Duration::from_millis(ms);
        Some(Instant::now().saturating_duration_since(sent))
    }

    /// Whether no heartbeat sent within `bound` has committed (or none ever).
    pub fn lost(&self, bound: Duration) -> bool {
        self.age().is_none_or(|age| age > bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_until_a_heartbeat_commits_and_again_once_it_is_old() {
        let c = Contact::default();
        assert!(c.lost(Duration::from_secs(3600)), "nothing committed yet");
        let sent = Instant::now();
        c.committed(sent);
        assert!(!c.lost(Duration::from_secs(3600)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.lost(Duration::from_millis(10)));
        // An older heartbeat committing late does not move the time back.
        c.committed(sent - Duration::from_millis(5));
        assert!(c.age().unwrap() >= Duration::from_millis(20));
    }
}
