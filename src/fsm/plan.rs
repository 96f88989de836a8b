//! Pulling across queue shards with strict priority held cluster-wide
//! (`docs/shards.md`, "Dispatch across shards: the agent pulls").
//!
//! A node pulls for its own agents. Before each pull it reads every shard
//! (a read barrier on its replica makes the read linearizable) and asks,
//! per agent, for the highest priority of a ready task the agent could run
//! there ([`State::best_ready`]). The pull goes to the shard holding the
//! most urgent of those, and names each agent whose best is there with that
//! best as its floor (`min_priority`): the shard grants it nothing lower.
//! Agents whose best is in another shard wait for the next pull. So no
//! lease returns a lower priority than a task the agent could run that was
//! ready, in any shard, when the read was made; a task that became ready
//! after the read is concurrent with the pull.

use super::command::PullSlot;
use super::queue::normalize_caps;
use super::state::State;
use super::task::Priority;

/// One pull: the shard (an index into the states given) and the agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullPlan {
    /// Index of the shard to pull from.
    pub shard: usize,
    /// The agents, each with its floor.
    pub slots: Vec<PullSlot>,
}

impl State {
    /// The highest priority of a ready task an agent with `capabilities`
    /// in `region` could run here, ignoring session affinity (a task that
    /// requires another region does not count; one that prefers it does).
    pub fn best_ready(&self, capabilities: &[String], region: &str) -> Option<Priority> {
        let caps = normalize_caps(capabilities);
        let tasks = &self.tasks;
        let allowed = |id| tasks[&id].may_run_in(Some(region));
        self.ready.best_priority(&caps, &allowed)
    }

    /// The highest priority of a ready task an external worker with
    /// `capabilities` could lease here (`Command::Lease` in a shard, which
    /// knows no worker's region) among those `visible` lets through.
    pub fn best_ready_for_worker(
        &self,
        capabilities: &[String],
        visible: impl Fn(&super::task::Task) -> bool,
    ) -> Option<Priority> {
        let caps = normalize_caps(capabilities);
        let tasks = &self.tasks;
        let allowed = |id| {
            let t = &tasks[&id];
            t.may_run_in(None) && visible(t)
        };
        self.ready.best_priority(&caps, &allowed)
    }
}

/// The next pull for `slots` (each with its profile and the free count its
/// node has for it) over `shards`, or `None` when no agent with room has
/// work in any shard. Slots without a profile are skipped: a shard needs it.
pub fn plan_pull(shards: &[&State], slots: &[PullSlot]) -> Option<PullPlan> {
    let per_shard: Vec<Vec<Option<Priority>>> = shards.iter().map(|s| best_of(s, slots)).collect();
    plan_from(&per_shard, slots)
}

/// Per slot, the best priority it could lease in `shard` (`None` for a
/// slot without a profile or room): one read of a shard for a pull plan.
pub fn best_of(shard: &State, slots: &[PullSlot]) -> Vec<Option<Priority>> {
    slots
        .iter()
        .map(|slot| {
            let profile = slot.profile.as_ref().filter(|_| slot.free > 0)?;
            shard.best_ready(&profile.capabilities, &profile.region)
        })
        .collect()
}

/// [`plan_pull`] from each shard's [`best_of`] (read one shard at a time,
/// each under its own lock).
pub fn plan_from(per_shard: &[Vec<Option<Priority>>], slots: &[PullSlot]) -> Option<PullPlan> {
    let shards = per_shard.len();
    // Per agent with room: its best priority, and the shards that have it.
    let mut best: Vec<(usize, Priority, Vec<usize>)> = Vec::new();
    for i in 0..slots.len() {
        let Some(top) = per_shard.iter().filter_map(|b| b[i]).max() else {
            continue;
        };
        let at: Vec<usize> = (0..shards)
            .filter(|&g| per_shard[g][i] == Some(top))
            .collect();
        best.push((i, top, at));
    }
    // The shard holding the most urgent best; among those, the one that
    // serves the most agents at their best; then the lowest index.
    let top = best.iter().map(|(_, p, _)| *p).max()?;
    let shard = (0..shards)
        .filter(|g| best.iter().any(|(_, p, at)| *p == top && at.contains(g)))
        .max_by_key(|g| {
            let served = best.iter().filter(|(_, _, at)| at.contains(g)).count();
            (served, std::cmp::Reverse(*g))
        })?;
    let slots = best
        .into_iter()
        .filter(|(_, _, at)| at.contains(&shard))
        .map(|(i, floor, _)| PullSlot {
            min_priority: floor,
            ..slots[i].clone()
        })
        .collect();
    Some(PullPlan { shard, slots })
}
