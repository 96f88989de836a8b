//! Dispatch: the shard leader's matching of ready tasks to agents, applied
//! against the committed state so that every replica makes the same choice.
//!
//! An agent can take work when its gateway is placed on a node that is
//! heartbeating and not draining, its actor there has announced itself
//! (`AgentOnline`), the gateway's breaker is not open and its
//! last probe did not find it unhealthy, and the agent holds fewer live
//! leases than its capacity. Each agent takes, in turn, the task it would get
//! from the ready queue (strict priority, tenant round robin, capability
//! match, FIFO) among the tasks session affinity lets it run; the turn goes
//! to the least-loaded agent (or round robin). A gateway at 90% of its
//! sessions opens no new one, so it takes only tasks for its idle sessions.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::command::{
    AgentProfile, DispatchPolicy, DispatchSpec, Outcome, PullSlot, PullSpec, Rejection, Reply,
};
use super::event::{Event, EventKind};
use super::lease::check_lease_ms;
use super::queue::{is_subset, normalize_caps};
use super::registry::{Circuit, GatewayId, Health, new_session_room};
use super::state::State;
use super::task::{AgentId, FencingToken, Limits, Priority, Tenant};

/// An agent that may take tasks in this round.
struct Slot {
    agent: AgentId,
    /// The node its actor runs on (its gateway's owner).
    node: u64,
    caps: Vec<String>,
    gateway: GatewayId,
    region: String,
    free: u32,
    load: u32,
    /// The lowest priority it may take in this round.
    min: Priority,
    /// The kill switches that stop some work on it (by its gateway's kind
    /// or model), by name.
    holds: Vec<String>,
}

/// A place in the dispatch order: (sort key, tasks taken this round, slot).
type Turn = ((u32, usize), u32, usize);

/// New sessions each gateway may still open in this round.
type Rooms = BTreeMap<GatewayId, u32>;

/// Whether one of `holds` (names of `switches`) stops task `t`: the one
/// test of [`State::held_on_agent`] and of a dispatch turn, which holds the
/// ready queue mutably and so reads the switches apart.
fn held_by(
    switches: &BTreeMap<String, super::KillSwitch>,
    holds: &[String],
    t: &super::Task,
) -> bool {
    holds
        .iter()
        .any(|n| switches.get(n).is_some_and(|sw| sw.covers(n, t)))
}

/// Refuses a round with a lease length or size out of range.
fn check_round(spec: &DispatchSpec) -> Result<(), Rejection> {
    check_lease_ms(spec.lease_ms)?;
    if !(1..=Limits::MAX_DISPATCH).contains(&spec.max) {
        let problem = format!("must be 1..={}", Limits::MAX_DISPATCH);
        return Err(Rejection::invalid("max", problem));
    }
    Ok(())
}

impl State {
    /// The kill switches that stop work on the agents of a gateway of
    /// `kind` running `model`, by name; `None` when one stops all of it
    /// (such an agent takes nothing).
    pub(crate) fn agent_holds(&self, kind: &str, model: Option<&str>) -> Option<Vec<String>> {
        let mut holds = Vec::new();
        for (name, sw) in &self.switches {
            if sw.on_gateway(kind, model) {
                if sw.covers_all() {
                    return None;
                }
                holds.push(name.clone());
            }
        }
        Some(holds)
    }

    /// Whether one of `holds` (switch names from [`State::agent_holds`])
    /// stops task `t` on the agent they apply to.
    pub(crate) fn held_on_agent(&self, holds: &[String], t: &super::Task) -> bool {
        held_by(&self.switches, holds, t)
    }

    /// The agents that may take work now, in agent-id order.
    fn eligible_slots(&self, node_dead_after_ms: u64) -> Vec<Slot> {
        self.eligible_slots_on(node_dead_after_ms, None)
    }

    /// [`State::eligible_slots`], of the agents online on `only` if given.
    fn eligible_slots_on(&self, node_dead_after_ms: u64, only: Option<u64>) -> Vec<Slot> {
        let reg = &self.registry;
        reg.agents
            .values()
            .filter(|a| only.is_none() || a.online_on == only)
            .filter_map(|a| {
                let gw = reg.gateways.get(&a.reg.gateway)?;
                let owner = gw.owner?;
                if a.online_on != Some(owner) {
                    return None;
                }
                let node = reg.nodes.get(&owner)?;
                let alive =
                    node.last_heartbeat_ms.saturating_add(node_dead_after_ms) >= self.clock_ms;
                let usable = gw.circuit != Circuit::Open
                    && gw.health != Health::Unhealthy
                    && !gw.process_down();
                let load = self.agent_load(&a.reg.id);
                let free = match a.circuit {
                    // A trial at a time: only while it holds nothing.
                    Circuit::HalfOpen => u32::from(load == 0),
                    _ => a.reg.capacity.saturating_sub(load),
                };
                let holds = self.agent_holds(&gw.reg.kind, gw.reg.model.as_deref())?;
                (alive && !node.draining && usable && a.may_work() && free > 0).then(|| Slot {
                    agent: a.reg.id.clone(),
                    node: owner,
                    caps: a.reg.dispatch_caps(),
                    gateway: a.reg.gateway.clone(),
                    region: gw.reg.region.clone(),
                    free,
                    load,
                    min: Priority::Low,
                    holds,
                })
            })
            .collect()
    }

    /// New sessions each gateway may still open: below 90% of its limit,
    /// counting live sessions plus leased tasks that have no session key
    /// (each runs in a session of its own).
    fn gateway_rooms(&self) -> Rooms {
        let reg = &self.registry;
        let mut active: BTreeMap<&GatewayId, u32> = reg
            .gateways
            .values()
            .map(|g| (&g.reg.id, self.sessions.live_on(&g.reg.id)))
            .collect();
        for (agent, held) in &self.agent_leases {
            let Some(a) = reg.agents.get(agent) else {
                continue;
            };
            let keyless = held
                .iter()
                .filter(|t| self.tasks[&self.leases[*t]].session_key.is_none())
                .count() as u32;
            if let Some(n) = active.get_mut(&a.reg.gateway) {
                *n += keyless;
            }
        }
        reg.gateways
            .values()
            .map(|g| {
                let room = new_session_room(active[&g.reg.id], g.reg.max_sessions);
                (g.reg.id.clone(), room)
            })
            .collect()
    }

    /// Why a ready task that must run in a region cannot be leased there
    /// now, if that is why it waits: no gateway registered in the region,
    /// none usable (placed on a live node that is not draining, breaker not
    /// open, not unhealthy), or no agent online on one with the task's
    /// capabilities. `None` for every other task (busy agents are not a
    /// reason: the task is next in line).
    pub fn region_wait_reason(
        &self,
        task: &super::Task,
        node_dead_after_ms: u64,
    ) -> Option<String> {
        let r = task.extras().region.as_ref().filter(|r| r.required)?;
        if task.status != super::TaskStatus::Pending {
            return None;
        }
        let reg = &self.registry;
        let in_region: Vec<_> = reg
            .gateways
            .values()
            .filter(|g| g.reg.region == r.name)
            .collect();
        if in_region.is_empty() {
            return Some(format!("no gateway in region {} (required)", r.name));
        }
        let usable: Vec<_> = in_region
            .into_iter()
            .filter(|g| {
                let live = g.owner.and_then(|o| reg.nodes.get(&o)).is_some_and(|n| {
                    !n.draining
                        && n.last_heartbeat_ms.saturating_add(node_dead_after_ms) >= self.clock_ms
                });
                live && g.circuit != Circuit::Open && g.health != Health::Unhealthy
            })
            .collect();
        if usable.is_empty() {
            return Some(format!(
                "no usable gateway in region {} (required): none placed on a live node, or breaker open, or unhealthy",
                r.name
            ));
        }
        let capable = reg.agents.values().any(|a| {
            usable
                .iter()
                .any(|g| g.reg.id == a.reg.gateway && g.owner == a.online_on)
                && is_subset(&task.capabilities, &a.reg.dispatch_caps())
        });
        (!capable).then(|| {
            format!(
                "no agent online in region {} (required) with capabilities {:?}",
                r.name, task.capabilities
            )
        })
    }

    /// Whether a dispatch now would lease anything (a cheap check before
    /// proposing one; it ignores session affinity and backpressure, so it
    /// may say yes to a round that leases nothing).
    pub fn dispatch_would_lease(&self, node_dead_after_ms: u64) -> bool {
        if self.ready.is_empty() {
            return false;
        }
        self.eligible_slots(node_dead_after_ms).iter().any(|s| {
            if s.holds.is_empty() {
                return self.ready.any_match(&s.caps);
            }
            let free = |id| !self.held_on_agent(&s.holds, &self.tasks[&id]);
            self.ready.best_priority(&s.caps, &free).is_some()
        })
    }

    /// What node `node` pulls for now: its online agents that may take work,
    /// with their free capacity, that have a ready task they could run: its
    /// capabilities, a region it may run in, and a session that admits the
    /// agent or none yet (it ignores the gateway's session room). Checked
    /// on the node's replica, so rounds that would lease nothing are
    /// mostly not proposed.
    pub fn pull_slots(&self, node: u64, node_dead_after_ms: u64) -> Vec<PullSlot> {
        if self.ready.is_empty() {
            return Vec::new();
        }
        let tasks = &self.tasks;
        let sessions = &self.sessions;
        self.eligible_slots_on(node_dead_after_ms, Some(node))
            .into_iter()
            .filter(|s| {
                let runnable = |id| {
                    let t = &tasks[&id];
                    t.may_run_in(Some(&s.region))
                        && t.session_key
                            .as_ref()
                            .is_none_or(|k| sessions.admits(&t.tenant, k, &s.agent, &s.gateway))
                        && !self.held_on_agent(&s.holds, t)
                };
                self.ready.best_priority(&s.caps, &runnable).is_some()
            })
            .map(|s| PullSlot {
                agent: s.agent,
                free: s.free,
                min_priority: Priority::Low,
                profile: None,
            })
            .collect()
    }

    /// What node `node` pulls from the queue shards for (the meta group's
    /// replica: it alone has the registry): its online agents that may take
    /// work (gateway placed on it, usable, the node alive and not
    /// draining), each with its profile. `free` and `session_room` are the
    /// agent's whole capacity and its gateway's `max_sessions`: the puller
    /// takes off what the shards hold ([`State::session_load`]).
    pub fn pull_profiles(&self, node: u64, node_dead_after_ms: u64) -> Vec<PullSlot> {
        let reg = &self.registry;
        self.eligible_slots_on(node_dead_after_ms, Some(node))
            .into_iter()
            .filter_map(|s| {
                let a = reg.agents.get(&s.agent)?;
                let g = reg.gateways.get(&s.gateway)?;
                // Half-open: one trial task at a time, over every shard.
                let capacity = match a.circuit {
                    Circuit::HalfOpen => 1,
                    _ => a.reg.capacity,
                };
                Some(PullSlot {
                    free: capacity,
                    min_priority: Priority::Low,
                    profile: Some(AgentProfile {
                        capabilities: s.caps,
                        gateway: s.gateway,
                        region: s.region,
                        capacity,
                        session_room: g.reg.max_sessions,
                        placement_token: g.placement_token,
                        kind: g.reg.kind.clone(),
                        model: g.reg.model.clone(),
                    }),
                    agent: s.agent,
                })
            })
            .collect()
    }

    /// The sessions `gateway` has open in this replica, as dispatch counts
    /// them against its limit: its live sessions here, plus the keyless
    /// leases of `agents` (its agents), each of which opens one.
    pub fn session_load(&self, gateway: &GatewayId, agents: &[AgentId]) -> u32 {
        let keyless: usize = agents
            .iter()
            .filter_map(|a| self.agent_leases.get(a))
            .flat_map(|held| held.iter())
            .filter(|t| self.tasks[&self.leases[*t]].session_key.is_none())
            .count();
        self.sessions.live_on(gateway) + keyless as u32
    }

    /// Every agent online on `node`, with its whole capacity as its free
    /// count: the pull a node appends to a batch that frees or adds work,
    /// before its replica has applied the batch (the state at apply caps
    /// each agent at what it really has free).
    pub fn pull_slots_on(&self, node: u64) -> Vec<PullSlot> {
        self.registry
            .agents
            .values()
            .filter(|a| a.online_on == Some(node))
            .map(|a| PullSlot {
                agent: a.reg.id.clone(),
                free: a.reg.capacity,
                min_priority: Priority::Low,
                profile: None,
            })
            .collect()
    }

    pub(crate) fn dispatch(&mut self, spec: &DispatchSpec, events: &mut Vec<Event>) -> Outcome {
        check_round(spec)?;
        let slots = self.eligible_slots(spec.node_dead_after_ms);
        let takers = (0..slots.len()).collect();
        self.match_round(spec, slots, takers, Self::gateway_rooms, events)
    }

    /// A node's pull: a dispatch round in which only the agents it names
    /// that are online on it take turns, each capped at the `free` the node
    /// counted and confined to tasks of its `min_priority` or higher. Every
    /// other eligible agent still counts as room in its region, so a task
    /// that prefers another region is left for that region's node to pull.
    pub(crate) fn pull(&mut self, spec: &PullSpec, events: &mut Vec<Event>) -> Outcome {
        check_round(&spec.round)?;
        if spec.slots.len() > Limits::MAX_DISPATCH as usize {
            let problem = format!("at most {} agents", Limits::MAX_DISPATCH);
            return Err(Rejection::invalid("slots", problem));
        }
        let mut named: BTreeMap<&AgentId, &PullSlot> = BTreeMap::new();
        for p in &spec.slots {
            if named.insert(&p.agent, p).is_some() {
                let problem = format!("names agent `{}` twice", p.agent);
                return Err(Rejection::invalid("slots", problem));
            }
        }
        if self.group > 0 {
            return self.pull_in_shard(spec, events);
        }
        let mut slots = self.eligible_slots(spec.round.node_dead_after_ms);
        let mut takers = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Some(p) = named.get(&slot.agent)
                && slot.node == spec.node
            {
                slot.free = slot.free.min(p.free);
                slot.min = p.min_priority;
                if slot.free > 0 {
                    takers.push(i);
                }
            }
        }
        self.match_round(&spec.round, slots, takers, Self::gateway_rooms, events)
    }

    /// A pull from a queue shard, which has no registry: the node's profile
    /// of each agent stands in for it. A profile whose placement token is
    /// older than one the shard saw for the agent is a stale owner's and
    /// leases nothing; a newer one first gives back the agent's leases here
    /// (granted under the older placement, which nobody runs any more).
    fn pull_in_shard(&mut self, spec: &PullSpec, events: &mut Vec<Event>) -> Outcome {
        for p in &spec.slots {
            if p.profile.is_none() {
                let problem = format!(
                    "agent `{}` has no profile (a queue shard has no registry)",
                    p.agent
                );
                return Err(Rejection::invalid("slots", problem));
            }
        }
        let mut slots = Vec::new();
        let mut rooms = Rooms::new();
        for p in &spec.slots {
            let profile = p.profile.as_ref().expect("checked above");
            let seen = self.placements.get(&p.agent).copied().unwrap_or(0);
            if profile.placement_token < seen {
                continue;
            }
            if profile.placement_token > seen {
                self.placements
                    .insert(p.agent.clone(), profile.placement_token);
                let held: Vec<FencingToken> = self
                    .agent_leases
                    .get(&p.agent)
                    .map(|h| h.iter().copied().collect())
                    .unwrap_or_default();
                self.release(&held, events)?;
            }
            let Some(holds) = self.agent_holds(&profile.kind, profile.model.as_deref()) else {
                continue;
            };
            let load = self.agent_load(&p.agent);
            let room = rooms
                .entry(profile.gateway.clone())
                .or_insert(profile.session_room);
            *room = (*room).min(profile.session_room);
            slots.push(Slot {
                agent: p.agent.clone(),
                node: spec.node,
                caps: normalize_caps(&profile.capabilities),
                gateway: profile.gateway.clone(),
                region: profile.region.clone(),
                free: p.free.min(profile.capacity.saturating_sub(load)),
                load,
                min: p.min_priority,
                holds,
            });
        }
        let takers = (0..slots.len()).filter(|&i| slots[i].free > 0).collect();
        self.match_round(&spec.round, slots, takers, |_| rooms, events)
    }

    /// Matches ready tasks to `slots[takers]`, in turns (see the module
    /// doc); the other slots only count as room in their region.
    fn match_round(
        &mut self,
        spec: &DispatchSpec,
        mut slots: Vec<Slot>,
        takers: Vec<usize>,
        rooms: impl FnOnce(&Self) -> Rooms,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if takers.is_empty() || self.ready.is_empty() {
            // Nothing can move (the common case for a batch piggybacking a
            // round while every agent is busy): skip the session count.
            return Ok(Reply::Dispatched(Vec::new()));
        }
        let mut rooms = rooms(self);
        let n = slots.len();
        let start = match spec.policy {
            DispatchPolicy::LeastLoaded => 0,
            DispatchPolicy::RoundRobin if n > 0 => (self.dispatch_cursor % n as u64) as usize,
            DispatchPolicy::RoundRobin => 0,
        };
        // The next turn goes to the smallest key: (load, position) or, for
        // round robin, (tasks taken this round, rotated position).
        let key = |s: &Slot, taken: u32, i: usize| match spec.policy {
            DispatchPolicy::LeastLoaded => (s.load, i),
            DispatchPolicy::RoundRobin => (taken, (i + n - start) % n),
        };
        let mut turns: BinaryHeap<Reverse<Turn>> = takers
            .into_iter()
            .map(|i| Reverse((key(&slots[i], 0, i), 0, i)))
            .collect();
        let mut grants = Vec::new();
        // Turns that found nothing only because a task preferred another
        // region's agent with room: they get another turn once the pass
        // has leased something (that agent may be full now).
        let mut deferred: Vec<Reverse<Turn>> = Vec::new();
        let mut granted_since_deferral = false;
        while grants.len() < spec.max as usize {
            let Some(Reverse((k, taken, i))) = turns.pop() else {
                if deferred.is_empty() || !granted_since_deferral {
                    break;
                }
                turns.extend(deferred.drain(..));
                granted_since_deferral = false;
                continue;
            };
            let room = rooms
                .get_mut(&slots[i].gateway)
                .expect("invariant: every slot's gateway has a room");
            let may_open = *room > 0;
            let (picked, yielded) = self.pick_for(&slots, i, may_open);
            let Some(id) = picked else {
                if yielded {
                    deferred.push(Reverse((k, taken, i)));
                }
                continue;
            };
            granted_since_deferral = true;
            let slot = &mut slots[i];
            let t = &self.tasks[&id];
            let keyed_session = t
                .session_key
                .as_ref()
                .and_then(|k| self.sessions.by_key(&t.tenant, k))
                .is_some_and(|s| !s.moving);
            if !keyed_session {
                *room = room.saturating_sub(1);
            }
            let grant = self.grant(id, &slot.agent, Some(&slot.gateway), spec.lease_ms, events);
            self.session_for_grant(id, &slot.agent, &slot.gateway, spec);
            grants.push(grant);
            slot.free -= 1;
            slot.load += 1;
            if slot.free > 0 {
                turns.push(Reverse((key(slot, taken + 1, i), taken + 1, i)));
            }
        }
        self.dispatch_cursor = self.dispatch_cursor.wrapping_add(1);
        Ok(Reply::Dispatched(grants))
    }

    /// The task the agent of `slots[i]` should get next: the ready-queue
    /// order among tasks its region allows (see [`TaskRegion`]) with no
    /// session key, or whose session is idle on this agent, or that would
    /// open a new session (only while the gateway may open one).
    ///
    /// [`TaskRegion`]: super::task::TaskRegion
    ///
    /// Also says whether it passed over a task only because the task
    /// prefers a region where an agent has room.
    fn pick_for(
        &mut self,
        slots: &[Slot],
        i: usize,
        may_open: bool,
    ) -> (Option<super::task::TaskId>, bool) {
        let slot = &slots[i];
        let agent = &slot.agent;
        let weights = &self.weights;
        let weight = |t: &Tenant| weights.get(t).copied().unwrap_or(1);
        let tasks = &self.tasks;
        let sessions = &self.sessions;
        let switches = &self.switches;
        let held_on = |s: &Slot, t: &super::Task| held_by(switches, &s.holds, t);
        // An agent of the task's region that could take it now (its
        // capabilities, and no kill switch on its gateway stopping it).
        let room_in = |region: &str, t: &super::Task| {
            slots.iter().any(|s| {
                s.free > 0
                    && s.region == region
                    && is_subset(&t.capabilities, &s.caps)
                    && !held_on(s, t)
            })
        };
        let yielded = std::cell::Cell::new(false);
        let allowed = |id| {
            let t = &tasks[&id];
            if let Some(r) = &t.extras().region
                && slot.region != r.name
            {
                if r.required {
                    return false;
                }
                if room_in(&r.name, t) {
                    yielded.set(true);
                    return false;
                }
            }
            sessions.may_take(t, agent, &slot.gateway, may_open) && !held_on(slot, t)
        };
        let picked = self
            .ready
            .pick_at_least(slot.min, &slot.caps, weight, &allowed);
        (picked, yielded.get())
    }

    pub(crate) fn renew_many(
        &mut self,
        tokens: &[FencingToken],
        lease_ms: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        check_lease_ms(lease_ms)?;
        if tokens.len() > Limits::MAX_DISPATCH as usize {
            let problem = format!("at most {} tokens", Limits::MAX_DISPATCH);
            return Err(Rejection::invalid("tokens", problem));
        }
        let mut stale = Vec::new();
        for &token in tokens {
            match self.renew(token, lease_ms, events) {
                Ok(_) => {}
                Err(Rejection::StaleToken(t)) => stale.push(t),
                Err(other) => return Err(other),
            }
        }
        Ok(Reply::Renewed { stale })
    }

    pub(crate) fn release(&mut self, tokens: &[FencingToken], events: &mut Vec<Event>) -> Outcome {
        if tokens.len() > Limits::MAX_DISPATCH as usize {
            let problem = format!("at most {} tokens", Limits::MAX_DISPATCH);
            return Err(Rejection::invalid("tokens", problem));
        }
        let mut released = Vec::new();
        for token in tokens {
            let Some(&id) = self.leases.get(token) else {
                continue;
            };
            self.emit(events, id, EventKind::Released { token: *token });
            self.lease_lost(id, events);
            released.push(id);
        }
        Ok(Reply::Released(released))
    }
}

#[cfg(test)]
mod tests {
    use crate::fsm::{
        AgentId, AgentRegistration, Command, DispatchPolicy, DispatchSpec, FencingToken, GatewayId,
        GatewayRegistration, Reply, State, SubmitTask, TaskStatus,
    };

    fn dispatch() -> Command {
        Command::Dispatch(DispatchSpec {
            lease_ms: 30_000,
            max: 10,
            policy: DispatchPolicy::LeastLoaded,
            node_dead_after_ms: 60_000,
            session_limit_ms: 0,
            session_idle_ms: 0,
            session_checkpoint_every: 0,
        })
    }

    fn granted(s: &mut State, now: u64) -> Vec<u64> {
        match s.apply_one(now, dispatch()) {
            Ok(Reply::Dispatched(g)) => g.iter().map(|g| g.token.0).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// Nodes `nodes` heartbeating, gateway `g` placed on node 1, and agent
    /// `a` of `capacity` registered on it (not announced online yet).
    fn one_agent(nodes: &[u64], capacity: u32) -> (State, AgentId) {
        let mut s = State::default();
        for &id in nodes {
            let hb = Command::NodeHeartbeat {
                id,
                region: "eu".into(),
                api_addr: "a".into(),
            };
            s.apply_one(0, hb).unwrap();
        }
        let gw = GatewayRegistration {
            id: GatewayId("g".into()),
            kind: "sim".into(),
            spec: "{}".into(),
            region: "eu".into(),
            capabilities: vec![],
            max_sessions: 10,
            model: None,
            managed: false,
        };
        s.apply_one(0, Command::RegisterGateway(gw)).unwrap();
        let place = Command::PlaceGateway {
            id: GatewayId("g".into()),
            owner: Some(1),
        };
        s.apply_one(0, place).unwrap();
        let agent = AgentId("a".into());
        let reg = AgentRegistration {
            id: agent.clone(),
            gateway: GatewayId("g".into()),
            role: "r".into(),
            capacity,
            ..Default::default()
        };
        s.apply_one(0, Command::RegisterAgent(reg)).unwrap();
        (s, agent)
    }

    /// Dispatch leases only to an agent whose actor announced itself on its
    /// gateway's owner; a move takes the agent offline and gives its leases
    /// back at once; an announcement releases only the agent's own leases.
    #[test]
    fn only_online_agents_get_work_and_a_move_releases_leases() {
        let (mut s, agent) = one_agent(&[1, 2], 4);
        let submit = SubmitTask {
            tenant: "t".into(),
            payload: "{}".into(),
            ..Default::default()
        };
        s.apply_one(0, Command::Submit(submit)).unwrap();
        assert!(
            granted(&mut s, 1).is_empty(),
            "no actor announced: no lease"
        );

        let online = |node, release| Command::AgentOnline {
            agent: agent.clone(),
            node,
            release,
        };
        s.apply_one(2, online(1, vec![])).unwrap();
        assert_eq!(granted(&mut s, 3), vec![1]);

        // Another agent's announcement cannot release this agent's lease.
        let other = AgentRegistration {
            id: AgentId("b".into()),
            gateway: GatewayId("g".into()),
            role: "r".into(),
            capacity: 1,
            ..Default::default()
        };
        s.apply_one(4, Command::RegisterAgent(other)).unwrap();
        let foreign = Command::AgentOnline {
            agent: AgentId("b".into()),
            node: 1,
            release: vec![FencingToken(1)],
        };
        s.apply_one(4, foreign).unwrap();
        assert_eq!(s.agent_load(&agent), 1, "still held");

        // The gateway moves: the lease is given back, the agents are offline.
        s.apply_one(
            5,
            Command::PlaceGateway {
                id: GatewayId("g".into()),
                owner: Some(2),
            },
        )
        .unwrap();
        assert_eq!(s.agent_load(&agent), 0);
        let task = s.task_shared(crate::fsm::TaskId(1)).unwrap();
        assert_eq!((task.status, task.attempts), (TaskStatus::Pending, 0));
        assert!(
            granted(&mut s, 6).is_empty(),
            "offline until the new owner's actor announces"
        );
        s.apply_one(7, online(2, vec![])).unwrap();
        assert_eq!(granted(&mut s, 8), vec![2], "leased again with a new token");
    }

    /// A task whose leases keep ending without a result (released here, as
    /// when it crashes its agent every time) is dead-lettered after
    /// `Limits::MAX_LOST_LEASES` of them instead of looping forever.
    #[test]
    fn a_task_that_keeps_losing_its_lease_is_dead_lettered() {
        use crate::fsm::{Limits, TaskId};
        let (mut s, agent) = one_agent(&[1], 1);
        let online = Command::AgentOnline {
            agent,
            node: 1,
            release: vec![],
        };
        s.apply_one(0, online).unwrap();
        let submit = SubmitTask {
            tenant: "t".into(),
            payload: "{}".into(),
            ..Default::default()
        };
        s.apply_one(0, Command::Submit(submit)).unwrap();
        for n in 1..=Limits::MAX_LOST_LEASES {
            let tokens = granted(&mut s, u64::from(n));
            assert_eq!(tokens.len(), 1, "lease {n}");
            let release = Command::Release {
                tokens: vec![FencingToken(tokens[0])],
            };
            s.apply_one(u64::from(n), release).unwrap();
            let t = s.task_shared(TaskId(1)).unwrap();
            let expect = if n < Limits::MAX_LOST_LEASES {
                TaskStatus::Pending
            } else {
                TaskStatus::DeadLetter
            };
            assert_eq!((t.status, t.attempts), (expect, 0), "after lease {n}");
        }
        let t = s.task_shared(TaskId(1)).unwrap();
        assert!(
            t.outcome()
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("50 leases ended without a result")),
            "{t:?}"
        );
        assert!(
            granted(&mut s, 1000).is_empty(),
            "a dead letter is not leased"
        );
    }
}
