//! Pulling across queue shards with strict priority held cluster-wide
//! (`docs/shards.md`, "Dispatch across shards: the agent pulls").
//!
//! A node pulls for its own agents. Before each pull it reads every shard
//! (a read barrier on its replica makes the read linearizable) and asks,
//! per agent, for the highest priority of a ready task the agent could run
//! there ([`State::best_ready`]). The pull goes to the shard holding the
//! most urgent of those, and names each agent whose best is there with that
//! best as its floor (`min_priority`): the shard grants it nothing lower.
//! A round proposes one pull to each shard that holds some agent's best,
//! at once, and names each agent in one of them. So no
//! lease returns a lower priority than a task the agent could run that was
//! ready, in any shard, when the read was made; a task that became ready
//! after the read is concurrent with the pull.

use super::command::{AgentProfile, PullSlot};
use super::queue::normalize_caps;
use super::state::State;
use super::task::AgentId;
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
    /// The highest priority of a ready task `agent` (its profile: the
    /// capabilities, region and gateway session room the node counted)
    /// could take here: a region it may run in (a task that requires
    /// another region does not count; one that prefers it does), and a
    /// session that admits the agent: its own idle session, or a new one
    /// while its gateway has room (`Pull` leases by the same rules, so an
    /// agent is never sent to a shard whose top task it may not take), and
    /// that no kill switch on its gateway's kind or model stops.
    pub fn best_ready(&self, agent: &AgentId, profile: &AgentProfile) -> Option<Priority> {
        let caps = normalize_caps(&profile.capabilities);
        let tasks = &self.tasks;
        let sessions = &self.sessions;
        let room = profile.session_room > 0;
        let holds = self.agent_holds(&profile.kind, profile.model.as_deref())?;
        let allowed = |id| {
            let t = &tasks[&id];
            t.may_run_in(Some(&profile.region))
                && sessions.may_take(t, agent, &profile.gateway, room)
                && !self.held_on_agent(&holds, t)
        };
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

/// The pulls for `slots` (each with its profile and the free count its
/// node has for it) over `shards`: at most one per shard, each agent in
/// at most one, proposed at once; empty when no agent with room has work
/// in any shard. Slots without a profile are skipped: a shard needs it.
pub fn plan_pull(shards: &[&State], slots: &[PullSlot]) -> Vec<PullPlan> {
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
            shard.best_ready(&slot.agent, profile)
        })
        .collect()
}

/// [`plan_pull`] from each shard's [`best_of`] (read one shard at a time,
/// each under its own lock). Each agent with work goes to one shard that
/// holds its best, with that best as its floor; among those shards, the
/// one that serves the most agents at their best (then the lowest index),
/// so a round proposes as few pulls as it can. Plans come shard by shard.
pub fn plan_from(per_shard: &[Vec<Option<Priority>>], slots: &[PullSlot]) -> Vec<PullPlan> {
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
    let served: Vec<usize> = (0..shards)
        .map(|g| best.iter().filter(|(_, _, at)| at.contains(&g)).count())
        .collect();
    let mut plans: Vec<PullPlan> = Vec::new();
    for (i, floor, at) in best {
        let shard = *at
            .iter()
            .max_by_key(|g| (served[**g], std::cmp::Reverse(**g)))
            .expect("an agent with a best has a shard holding it");
        let slot = PullSlot {
            min_priority: floor,
            ..slots[i].clone()
        };
        match plans.iter_mut().find(|p| p.shard == shard) {
            Some(p) => p.slots.push(slot),
            None => plans.push(PullPlan {
                shard,
                slots: vec![slot],
            }),
        }
    }
    plans.sort_by_key(|p| p.shard);
    plans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{
        Command, DispatchPolicy, DispatchSpec, GatewayId, PullSpec, Reply, SessionKey, SubmitTask,
        Tenant,
    };

    fn shard(g: u32) -> State {
        let mut s = State::default();
        s.apply_one(0, Command::DefineGroup { group: g }).unwrap();
        s
    }

    fn submit(s: &mut State, priority: Priority, session: Option<&str>) {
        let t = SubmitTask {
            tenant: Tenant("t".into()),
            priority: Some(priority),
            payload: "{}".into(),
            session_key: session.map(|k| SessionKey(k.into())),
            ..Default::default()
        };
        s.apply_one(1, Command::Submit(t)).unwrap();
    }

    fn slot(agent: &str, room: u32) -> PullSlot {
        PullSlot {
            agent: AgentId(agent.into()),
            free: 1,
            min_priority: Priority::Low,
            profile: Some(AgentProfile {
                capabilities: vec![],
                gateway: GatewayId(format!("gw-{agent}")),
                region: "eu".into(),
                capacity: 1,
                session_room: room,
                placement_token: 1,
                kind: "sim".into(),
                model: None,
            }),
        }
    }

    fn pull(s: &mut State, slots: Vec<PullSlot>) -> Vec<crate::fsm::LeaseGrant> {
        let spec = PullSpec {
            round: DispatchSpec {
                lease_ms: 30_000,
                max: 100,
                policy: DispatchPolicy::LeastLoaded,
                node_dead_after_ms: 60_000,
                session_limit_ms: 0,
                session_idle_ms: 0,
                session_checkpoint_every: 0,
            },
            node: 1,
            slots,
        };
        match s.apply_one(2, Command::Pull(spec)) {
            Ok(Reply::Dispatched(grants)) => grants,
            other => panic!("pull: {other:?}"),
        }
    }

    /// A critical task whose session another agent is driving is not an
    /// agent's best: the plan sends it to the shard with work it may take
    /// (before, its floor was critical in a shard that could give it
    /// nothing, and it waited there while other shards had work for it).
    /// Each agent is in one pull; pulls go to every shard that has work.
    #[test]
    fn an_agent_goes_where_it_may_take_work_and_every_such_shard_is_pulled() {
        let mut one = shard(1);
        submit(&mut one, Priority::Medium, Some("s1"));
        let grants = pull(&mut one, vec![slot("b", 10)]);
        assert_eq!(grants.len(), 1, "b drives s1");
        let done = Command::Complete {
            token: grants[0].token,
            result: "{}".into(),
        };
        one.apply_one(3, done).unwrap();
        submit(&mut one, Priority::Critical, Some("s1"));
        let mut two = shard(2);
        submit(&mut two, Priority::Low, None);
        submit(&mut two, Priority::Low, Some("s2"));

        let a = slot("a", 10);
        assert_eq!(one.best_ready(&a.agent, a.profile.as_ref().unwrap()), None);
        let plans = plan_pull(&[&one, &two], std::slice::from_ref(&a));
        assert_eq!(plans.len(), 1, "{plans:?}");
        assert_eq!(plans[0].shard, 1);
        assert_eq!(plans[0].slots[0].min_priority, Priority::Low);

        // Without session room, only work of a session the agent already
        // drives counts: none here.
        let full = slot("a", 0);
        assert!(plan_pull(&[&one, &two], &[full]).is_empty());

        // Agent c has work at its best (low) in both shards once s1's
        // critical task is free; b's best is that critical task in shard 1.
        let mut three = shard(3);
        submit(&mut three, Priority::Low, None);
        let plans = plan_pull(&[&one, &two, &three], &[slot("b", 10), slot("c", 10)]);
        let shards: Vec<usize> = plans.iter().map(|p| p.shard).collect();
        assert_eq!(shards, vec![0, 1], "{plans:?}");
        assert_eq!(plans[0].slots.len(), 1);
        assert_eq!(plans[0].slots[0].agent, AgentId("b".into()));
        assert_eq!(plans[0].slots[0].min_priority, Priority::Critical);
        assert_eq!(plans[1].slots[0].agent, AgentId("c".into()));
        assert_eq!(plans[1].slots[0].min_priority, Priority::Low);
    }

    #[test]
    fn an_agent_a_kill_switch_stops_is_sent_where_it_may_still_take_work() {
        let mut one = shard(1);
        submit(&mut one, Priority::Critical, None);
        let mut two = shard(2);
        submit(&mut two, Priority::Low, None);
        // Shard 1's copy of a switch that stops every task (a share of
        // 100%, so through the per-task check) on openclaw gateways.
        let switch = crate::fsm::KillSwitch {
            gateway_kind: Some("openclaw".into()),
            percent: Some(100),
            gateways: vec![GatewayId("gw-a".into())],
            ..Default::default()
        };
        let sync = Command::SyncShard {
            weights: vec![],
            switches: vec![crate::fsm::SyncSwitch {
                name: "oc-off".into(),
                switch: Some(switch),
                rev: 1,
            }],
        };
        one.apply_one(2, sync).unwrap();
        let mut a = slot("a", 10);
        a.profile.as_mut().unwrap().kind = "openclaw".into();
        assert_eq!(one.best_ready(&a.agent, a.profile.as_ref().unwrap()), None);
        // Its best is the low task in shard 2, not the critical one it may
        // not take in shard 1 (a pull there would lease nothing).
        let plans = plan_pull(&[&one, &two], std::slice::from_ref(&a));
        assert_eq!(plans.len(), 1, "{plans:?}");
        assert_eq!(plans[0].shard, 1);
        assert_eq!(plans[0].slots[0].min_priority, Priority::Low);
        // A sim agent still takes the critical task first.
        let b = slot("b", 10);
        let plans = plan_pull(&[&one, &two], std::slice::from_ref(&b));
        assert_eq!(plans[0].shard, 0);
        assert_eq!(plans[0].slots[0].min_priority, Priority::Critical);
    }
}
