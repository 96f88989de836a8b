//! The fault-injection seam: a shared set of node ids this node is cut off from.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::raft::NodeId;

/// A shared, cheaply cloned set of blocked peers, held by a node's [`super::Client`]
/// and its [`super::serve`] loop. Empty (no faults) by default; checking an
/// empty set is one atomic load.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether `blocked` is non-empty; written only under the lock.
    any: AtomicBool,
    blocked: Mutex<HashSet<NodeId>>,
}

impl Faults {
    /// No faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts this node off from `peer`: calls to it fail at once and its
    /// connections are refused or closed.
    pub fn block(&self, peer: NodeId) {
        let mut blocked = self.lock();
        blocked.insert(peer);
        self.inner.any.store(true, Ordering::Release);
    }

    /// Undoes [`Faults::block`] for `peer`.
    pub fn unblock(&self, peer: NodeId) {
        let mut blocked = self.lock();
        blocked.remove(&peer);
        self.inner.any.store(!blocked.is_empty(), Ordering::Release);
    }

    /// Replaces the blocked set with `peers` in one step.
    pub fn set(&self, peers: impl IntoIterator<Item = NodeId>) {
        let mut blocked = self.lock();
        *blocked = peers.into_iter().collect();
        self.inner.any.store(!blocked.is_empty(), Ordering::Release);
    }

    /// Unblocks every peer.
    pub fn heal(&self) {
        let mut blocked = self.lock();
        blocked.clear();
        self.inner.any.store(false, Ordering::Release);
    }

    /// Whether `peer` is blocked.
    pub fn is_blocked(&self, peer: NodeId) -> bool {
        self.inner.any.load(Ordering::Acquire) && self.lock().contains(&peer)
    }

    /// The blocked peers, in ascending order.
    pub fn blocked(&self) -> Vec<NodeId> {
        let mut peers: Vec<NodeId> = self.lock().iter().copied().collect();
        peers.sort_unstable();
        peers
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<NodeId>> {
        // No section under this lock can panic half-way, so a poisoned set
        // is still consistent.
        self.inner
            .blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_unblock_heal() {
        let faults = Faults::new();
        let shared = faults.clone();
        assert!(!faults.is_blocked(2));
        shared.block(2);
        shared.block(3);
        assert!(faults.is_blocked(2));
        assert_eq!(faults.blocked(), vec![2, 3]);
        faults.unblock(2);
        assert!(!shared.is_blocked(2));
        assert!(shared.is_blocked(3));
        faults.heal();
        assert!(shared.blocked().is_empty());
        assert!(!shared.is_blocked(3));
        shared.set([4, 5]);
        assert_eq!(faults.blocked(), vec![4, 5]);
        shared.set([]);
        assert!(!faults.is_blocked(4));
    }
}
