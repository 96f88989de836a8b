//! The idempotency index: which task took a tenant's idempotency key.
//!
//! Held on every node for every task submitted with a key, so it is kept
//! small: a 64-bit hash of the tenant and key to the task id (16 bytes an
//! entry), where a map of the two strings cost about 120. A hit is
//! confirmed against the task itself, which keeps its tenant and key. A key
//! whose hash another key already holds is kept in full in an overflow map,
//! so colliding keys, made by chance or on purpose, cost a map lookup each,
//! never a scan, and are never confused.
//!
//! The hash is FNV-1a, written out here: the index is part of the
//! replicated state and its snapshots, so the hash must be the same on
//! every node and in every build (std's hashers promise neither).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::task::{Task, TaskId, Tenant};

/// Tenant and key to task, by hash, with the colliding keys in full.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Idempotency {
    /// The first task to take each hash.
    by_hash: BTreeMap<u64, TaskId>,
    /// Keys taken while another key held their hash.
    overflow: BTreeMap<(Tenant, String), TaskId>,
}

impl Idempotency {
    /// The task that holds `key` in `tenant`, if any.
    pub(crate) fn get(
        &self,
        tasks: &BTreeMap<TaskId, Arc<Task>>,
        tenant: &Tenant,
        key: &str,
    ) -> Option<TaskId> {
        self.get_hashed(tasks, hash(tenant, key), tenant, key)
    }

    /// Records that task `id` took `key` in `tenant` (which no task holds).
    pub(crate) fn insert(&mut self, tenant: &Tenant, key: &str, id: TaskId) {
        self.insert_hashed(hash(tenant, key), tenant, key, id);
    }

    /// Frees `key` in `tenant` if task `id` holds it.
    pub(crate) fn remove(&mut self, tenant: &Tenant, key: &str, id: TaskId) {
        self.remove_hashed(hash(tenant, key), tenant, key, id);
    }

    /// How many keys are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_hash.len() + self.overflow.len()
    }

    fn get_hashed(
        &self,
        tasks: &BTreeMap<TaskId, Arc<Task>>,
        h: u64,
        tenant: &Tenant,
        key: &str,
    ) -> Option<TaskId> {
        let holds = |id: &TaskId| {
            tasks
                .get(id)
                .is_some_and(|t| t.tenant == *tenant && t.idempotency_key.as_deref() == Some(key))
        };
        if let Some(id) = self.by_hash.get(&h).filter(|id| holds(id)) {
            return Some(*id);
        }
        if self.overflow.is_empty() {
            return None;
        }
        self.overflow
            .get(&(tenant.clone(), key.to_owned()))
            .copied()
    }

    fn insert_hashed(&mut self, h: u64, tenant: &Tenant, key: &str, id: TaskId) {
        match self.by_hash.entry(h) {
            Entry::Vacant(slot) => {
                slot.insert(id);
            }
            Entry::Occupied(_) => {
                self.overflow.insert((tenant.clone(), key.to_owned()), id);
            }
        }
    }

    fn remove_hashed(&mut self, h: u64, tenant: &Tenant, key: &str, id: TaskId) {
        if self.by_hash.get(&h) == Some(&id) {
            self.by_hash.remove(&h);
            return;
        }
        let full = (tenant.clone(), key.to_owned());
        if self.overflow.get(&full) == Some(&id) {
            self.overflow.remove(&full);
        }
    }
}

/// FNV-1a (64-bit) of the tenant, a separator byte no UTF-8 text holds,
/// and the key.
fn hash(tenant: &Tenant, key: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = tenant.0.bytes().chain([0xff]).chain(key.bytes());
    bytes.fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u64, tenant: &str, key: &str) -> (TaskId, Arc<Task>) {
        let mut s = crate::fsm::State::default();
        let spec = crate::fsm::SubmitTask {
            tenant: tenant.into(),
            payload: "{}".into(),
            idempotency_key: Some(key.into()),
            ..Default::default()
        };
        let request = crate::fsm::Request::Batch(crate::fsm::Batch::unaudited(
            1,
            1,
            vec![crate::fsm::Command::Submit(spec)],
        ));
        let _ = s.apply(&request);
        let mut t = (*s.tasks[&TaskId(1)]).clone();
        t.id = TaskId(id);
        (TaskId(id), Arc::new(t))
    }

    /// The hash is fixed: these values are part of every snapshot.
    #[test]
    fn the_hash_is_fnv1a_and_never_changes() {
        // FNV-1a of "\xff" and of "acme\xfforder-7", computed apart.
        assert_eq!(hash(&Tenant::from(""), ""), 0xaf64_724c_8602_eb6e);
        assert_eq!(
            hash(&Tenant::from("acme"), "order-7"),
            0x7a88_d51c_3e65_3518
        );
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            hash(&Tenant::from("ab"), "c"),
            hash(&Tenant::from("a"), "bc")
        );
    }

    /// Keys whose hashes collide are kept apart (the second in full), each
    /// found, each freed only by its own task.
    #[test]
    fn colliding_keys_are_kept_apart() {
        let tasks: BTreeMap<TaskId, Arc<Task>> =
            [task(1, "a", "k1"), task(2, "a", "k2"), task(3, "b", "k1")]
                .into_iter()
                .collect();
        let (a, b) = (Tenant::from("a"), Tenant::from("b"));
        let mut idx = Idempotency::default();
        // All three forced onto one hash.
        idx.insert_hashed(7, &a, "k1", TaskId(1));
        idx.insert_hashed(7, &a, "k2", TaskId(2));
        idx.insert_hashed(7, &b, "k1", TaskId(3));
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.get_hashed(&tasks, 7, &a, "k1"), Some(TaskId(1)));
        assert_eq!(idx.get_hashed(&tasks, 7, &a, "k2"), Some(TaskId(2)));
        assert_eq!(idx.get_hashed(&tasks, 7, &b, "k1"), Some(TaskId(3)));
        assert_eq!(idx.get_hashed(&tasks, 7, &b, "k2"), None);
        // Another task does not free a key it does not hold.
        idx.remove_hashed(7, &a, "k2", TaskId(9));
        assert_eq!(idx.get_hashed(&tasks, 7, &a, "k2"), Some(TaskId(2)));
        // Freeing the slot's holder leaves the overflow's keys found.
        idx.remove_hashed(7, &a, "k1", TaskId(1));
        assert_eq!(idx.get_hashed(&tasks, 7, &a, "k1"), None);
        assert_eq!(idx.get_hashed(&tasks, 7, &a, "k2"), Some(TaskId(2)));
        // A new key takes the free slot; the overflow still answers.
        idx.insert_hashed(7, &a, "k1", TaskId(1));
        assert_eq!(idx.get_hashed(&tasks, 7, &a, "k1"), Some(TaskId(1)));
        assert_eq!(idx.get_hashed(&tasks, 7, &b, "k1"), Some(TaskId(3)));
        idx.remove_hashed(7, &b, "k1", TaskId(3));
        assert_eq!(idx.get_hashed(&tasks, 7, &b, "k1"), None);
        assert_eq!(idx.len(), 2);
    }

    /// A slot whose task no longer holds the key (another tenant or key
    /// with the same hash) is not a hit.
    #[test]
    fn a_hit_is_confirmed_against_the_task() {
        let tasks: BTreeMap<TaskId, Arc<Task>> = [task(1, "a", "k1")].into_iter().collect();
        let mut idx = Idempotency::default();
        idx.insert_hashed(5, &Tenant::from("a"), "k1", TaskId(1));
        assert_eq!(idx.get_hashed(&tasks, 5, &Tenant::from("a"), "other"), None);
        assert_eq!(idx.get_hashed(&tasks, 5, &Tenant::from("z"), "k1"), None);
        assert_eq!(
            idx.get(&tasks, &Tenant::from("a"), "k1"),
            None,
            "hash 5 is not k1's"
        );
    }
}
