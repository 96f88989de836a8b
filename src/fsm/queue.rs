//! The ready queue: pending tasks by priority, tenant and capability set.
//!
//! `pick` finds the task an agent should get next: the most urgent priority
//! that has a task the agent can run; within it, the tenant whose turn it is
//! under weighted round robin (skipping tenants with nothing the agent can
//! run); within that tenant, the oldest task whose required capabilities are a
//! subset of the agent's.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use serde::{Deserialize, Serialize};

use super::task::{Priority, TaskId, Tenant};

/// Pending tasks, indexed for leasing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReadyQueues {
    levels: [Level; 4],
}

/// One priority level.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Level {
    tenants: BTreeMap<Tenant, TenantQueue>,
    /// The tenant served last under round robin, and how many consecutive
    /// leases it has taken in its current turn.
    turn: Option<(Tenant, u32)>,
}

/// One tenant's pending tasks at one priority, per required-capability set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct TenantQueue {
    by_caps: BTreeMap<Vec<String>, BTreeSet<TaskId>>,
}

impl TenantQueue {
    /// The oldest task whose capabilities the agent has.
    fn first_match(&self, agent_caps: &[String]) -> Option<TaskId> {
        self.first_allowed(agent_caps, &|_| true)
    }

    /// The oldest task whose capabilities the agent has and that `allowed`
    /// accepts, looking at most [`FILTER_SCAN`] tasks deep per capability set.
    fn first_allowed(
        &self,
        agent_caps: &[String],
        allowed: &dyn Fn(TaskId) -> bool,
    ) -> Option<TaskId> {
        self.by_caps
            .iter()
            .filter(|(need, _)| is_subset(need, agent_caps))
            .filter_map(|(_, ids)| {
                ids.iter()
                    .take(FILTER_SCAN)
                    .copied()
                    .find(|id| allowed(*id))
            })
            .min()
    }

    fn is_empty(&self) -> bool {
        self.by_caps.is_empty()
    }
}

/// How deep a filtered pick looks into one tenant's tasks of one capability
/// set: tasks refused by the filter (a session busy with an earlier task)
/// are skipped up to this many; past it the pick waits for the head to move.
pub(crate) const FILTER_SCAN: usize = 256;

/// A capability list in the one form the queue compares: sorted, without
/// duplicates.
pub(crate) fn normalize_caps(caps: &[String]) -> Vec<String> {
    let mut v = caps.to_vec();
    v.sort();
    v.dedup();
    v
}

/// Whether sorted `need` is contained in sorted `have`.
pub(crate) fn is_subset(need: &[String], have: &[String]) -> bool {
    need.iter().all(|c| have.binary_search(c).is_ok())
}

impl ReadyQueues {
    /// Adds a pending task. `caps` must be sorted and deduplicated.
    pub(crate) fn insert(&mut self, p: Priority, tenant: &Tenant, caps: &[String], id: TaskId) {
        let q = self.levels[p.rank()]
            .tenants
            .entry(tenant.clone())
            .or_default();
        q.by_caps.entry(caps.to_vec()).or_default().insert(id);
    }

    /// Removes a pending task; returns whether it was there.
    pub(crate) fn remove(
        &mut self,
        p: Priority,
        tenant: &Tenant,
        caps: &[String],
        id: TaskId,
    ) -> bool {
        let level = &mut self.levels[p.rank()];
        let Some(q) = level.tenants.get_mut(tenant) else {
            return false;
        };
        let Some(ids) = q.by_caps.get_mut(caps) else {
            return false;
        };
        let removed = ids.remove(&id);
        if ids.is_empty() {
            q.by_caps.remove(caps);
        }
        if q.is_empty() {
            level.tenants.remove(tenant);
        }
        removed
    }

    /// Whether no task is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.levels.iter().all(|l| l.tenants.is_empty())
    }

    /// Whether any pending task could go to an agent with sorted
    /// capabilities `agent_caps` (a cheap check before proposing a lease).
    pub(crate) fn any_match(&self, agent_caps: &[String]) -> bool {
        self.levels.iter().any(|level| {
            level
                .tenants
                .values()
                .any(|q| q.first_match(agent_caps).is_some())
        })
    }

    /// Chooses the next task for an agent with sorted capabilities
    /// `agent_caps`, and advances the round robin as if it was leased. The
    /// caller removes the task (through its status change).
    #[cfg(test)]
    pub(crate) fn pick(
        &mut self,
        agent_caps: &[String],
        weight: impl Fn(&Tenant) -> u32,
    ) -> Option<TaskId> {
        self.pick_allowed(agent_caps, weight, &|_| true)
    }

    /// The highest priority at which some tenant has a task `allowed`
    /// accepts that the capabilities cover (the priority a pick would
    /// return; no turn is taken).
    pub(crate) fn best_priority(
        &self,
        agent_caps: &[String],
        allowed: &dyn Fn(TaskId) -> bool,
    ) -> Option<Priority> {
        self.levels
            .iter()
            .zip(Priority::URGENT_FIRST)
            .find(|(level, _)| {
                level
                    .tenants
                    .values()
                    .any(|q| q.first_allowed(agent_caps, allowed).is_some())
            })
            .map(|(_, p)| p)
    }

    /// The next task of one tenant only, by priority then age, for a
    /// worker confined to that tenant; the round-robin turns are untouched
    /// (the pick does not take a turn from other tenants).
    pub(crate) fn pick_in(
        &self,
        tenant: &Tenant,
        agent_caps: &[String],
        allowed: &dyn Fn(TaskId) -> bool,
    ) -> Option<TaskId> {
        self.levels.iter().find_map(|level| {
            level
                .tenants
                .get(tenant)
                .and_then(|q| q.first_allowed(agent_caps, allowed))
        })
    }

    /// [`ReadyQueues::pick`] among the tasks `allowed` accepts.
    pub(crate) fn pick_allowed(
        &mut self,
        agent_caps: &[String],
        weight: impl Fn(&Tenant) -> u32,
        allowed: &dyn Fn(TaskId) -> bool,
    ) -> Option<TaskId> {
        self.pick_at_least(Priority::Low, agent_caps, weight, allowed)
    }

    /// [`ReadyQueues::pick_allowed`] among the tasks of priority `min` or
    /// higher.
    pub(crate) fn pick_at_least(
        &mut self,
        min: Priority,
        agent_caps: &[String],
        weight: impl Fn(&Tenant) -> u32,
        allowed: &dyn Fn(TaskId) -> bool,
    ) -> Option<TaskId> {
        self.levels
            .iter_mut()
            .take(min.rank() + 1)
            .find_map(|level| level.pick(agent_caps, &weight, allowed))
    }
}

impl Level {
    /// Weighted round robin over the tenants with a task the agent can run.
    /// The tenant served last keeps the turn while it has weight left;
    /// otherwise the turn goes to the next tenant in name order (wrapping
    /// around, the last-served tenant itself coming last). The next tenant is
    /// found now rather than when the turn ended, so a tenant that arrived
    /// meanwhile is not skipped.
    fn pick(
        &mut self,
        agent_caps: &[String],
        weight: &impl Fn(&Tenant) -> u32,
        allowed: &dyn Fn(TaskId) -> bool,
    ) -> Option<TaskId> {
        let matching = |(t, q): (&Tenant, &TenantQueue)| {
            q.first_allowed(agent_caps, allowed)
                .map(|id| (t.clone(), id))
        };
        let keeps_turn = |(last, used): &(Tenant, u32)| *used < weight(last).max(1);
        let (tenant, id) = match &self.turn {
            Some(turn) if keeps_turn(turn) => self
                .tenants
                .range::<Tenant, _>((Bound::Included(&turn.0), Bound::Unbounded))
                .chain(
                    self.tenants
                        .range::<Tenant, _>((Bound::Unbounded, Bound::Excluded(&turn.0))),
                )
                .find_map(matching),
            Some((last, _)) => self
                .tenants
                .range::<Tenant, _>((Bound::Excluded(last), Bound::Unbounded))
                .chain(
                    self.tenants
                        .range::<Tenant, _>((Bound::Unbounded, Bound::Included(last))),
                )
                .find_map(matching),
            None => self.tenants.iter().find_map(matching),
        }?;
        let used = match &self.turn {
            Some(turn) if turn.0 == tenant && keeps_turn(turn) => turn.1 + 1,
            _ => 1,
        };
        self.turn = Some((tenant, used));
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    fn take(
        q: &mut ReadyQueues,
        agent: &[String],
        w: impl Fn(&Tenant) -> u32 + Copy,
    ) -> Option<u64> {
        let id = q.pick(agent, w)?;
        for p in Priority::URGENT_FIRST {
            for t in ["a", "b", "c"] {
                for c in [caps(&[]), caps(&["gpu"])] {
                    q.remove(p, &Tenant::from(t), &c, id);
                }
            }
        }
        Some(id.0)
    }

    #[test]
    fn strict_priority_then_fifo() {
        let mut q = ReadyQueues::default();
        q.insert(Priority::Low, &"a".into(), &[], TaskId(1));
        q.insert(Priority::High, &"a".into(), &[], TaskId(3));
        q.insert(Priority::High, &"a".into(), &[], TaskId(2));
        let order: Vec<_> = std::iter::from_fn(|| take(&mut q, &[], |_| 1)).collect();
        assert_eq!(order, vec![2, 3, 1]);
    }

    #[test]
    fn round_robin_across_tenants_with_weights() {
        let mut q = ReadyQueues::default();
        for i in 0..4 {
            q.insert(Priority::Medium, &"a".into(), &[], TaskId(i));
            q.insert(Priority::Medium, &"b".into(), &[], TaskId(10 + i));
        }
        let w = |t: &Tenant| if t.as_str() == "a" { 2 } else { 1 };
        let order: Vec<_> = std::iter::from_fn(|| take(&mut q, &[], w)).collect();
        assert_eq!(order, vec![0, 1, 10, 2, 3, 11, 12, 13]);
    }

    #[test]
    fn capability_mismatch_does_not_block_and_lower_priority_waits_only_if_unmatched() {
        let mut q = ReadyQueues::default();
        q.insert(Priority::Critical, &"a".into(), &caps(&["gpu"]), TaskId(1));
        q.insert(Priority::Low, &"a".into(), &[], TaskId(2));
        // An agent without gpu cannot run task 1, so it gets the low task.
        assert_eq!(take(&mut q, &[], |_| 1), Some(2));
        assert_eq!(take(&mut q, &[], |_| 1), None);
        assert_eq!(take(&mut q, &caps(&["gpu", "x"]), |_| 1), Some(1));
    }
}
