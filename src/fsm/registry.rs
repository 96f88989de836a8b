//! The cluster's registries in the replicated state: nodes (region, drain
//! flag, last heartbeat), gateways (kind, region, capabilities, capacity,
//! health, circuit, owner node) and agents (gateway, capabilities, role,
//! capacity), plus the session lifecycle table.
//!
//! Everything here changes only through commands, so every node agrees on
//! who owns which gateway and which nodes are draining; the leader computes
//! placement and heartbeat times and stamps them into commands. An agent's
//! current load is not stored: it is the number of live leases it holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::{Outcome, Rejection, Reply, check_name};
use super::event::{AgentChange, Event, GatewayChange, NodeChange, What};
use super::queue::normalize_caps;
use super::state::State;
use super::task::{AgentId, FencingToken, Limits, TaskId};

/// A node's identity (the Raft node id).
pub type NodeId = u64;

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_id!(
    /// A gateway's name, chosen at registration.
    GatewayId
);

/// What the registry knows about a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Raft node id.
    pub id: NodeId,
    /// Region label.
    pub region: String,
    /// HTTP API address.
    pub api_addr: String,
    /// A draining node takes no new leases and hands its gateways over.
    pub draining: bool,
    /// Leader time of the node's last heartbeat, ms since the epoch.
    pub last_heartbeat_ms: u64,
    /// When it first registered.
    pub registered_at_ms: u64,
    /// When its current drain began (leader time), while draining.
    pub draining_since_ms: Option<u64>,
}

/// A gateway's health as last probed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not probed yet.
    #[default]
    Unknown,
    /// Answering normally.
    Healthy,
    /// Answering, but slow or partly failing.
    Degraded,
    /// Not answering.
    Unhealthy,
}

/// A gateway's circuit-breaker state as last reported by its owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    /// Calls flow.
    #[default]
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// A few trial calls are allowed.
    HalfOpen,
}

/// The gateway driver kinds.
pub(crate) const GATEWAY_KINDS: [&str; 4] = ["sim", "command", "http", "openclaw"];

/// A gateway registration, as the API validated it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRegistration {
    /// Its name.
    pub id: GatewayId,
    /// Driver kind (`sim`, `command`, `http`, `openclaw`).
    pub kind: String,
    /// Driver settings as JSON text (secrets only by reference, never inline).
    pub spec: String,
    /// Region label (placement prefers nodes of the same region).
    pub region: String,
    /// What tasks it can run.
    pub capabilities: Vec<String>,
    /// Most concurrent sessions.
    pub max_sessions: u32,
    /// The model its agents run, as the operator declares it (kill
    /// switches by model match it; none: not declared).
    pub model: Option<String>,
    /// Godel runs its process (`managed` in its spec): it takes work only
    /// while its owner reports the process up and answering.
    pub managed: bool,
}

/// Where a managed gateway's process is, as its owner reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ManagedState {
    /// Being started (or started, not yet answering its probe).
    #[default]
    Starting,
    /// Up and answering.
    Running,
    /// Exited; started again after a pause.
    Backoff,
    /// Exited too often in a row: not started again until the gateway is
    /// placed again.
    Failed,
}

/// A managed gateway's process, as its owner last reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedStatus {
    /// Where it is.
    pub state: ManagedState,
    /// Its process id on the owner (while it runs).
    pub pid: Option<u32>,
    /// How often the owner has started it again since it was placed there.
    pub restarts: u32,
    /// How its last run ended (exit status or spawn error).
    pub last_exit: Option<String>,
}

/// What the registry knows about a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// The registration.
    pub reg: GatewayRegistration,
    /// Last probed health.
    pub health: Health,
    /// Last reported breaker state.
    pub circuit: Circuit,
    /// The node that runs its actors, if placed.
    pub owner: Option<NodeId>,
    /// The gateway's fencing token: raised each time it is placed on a
    /// node (0: never placed). Every call to the gateway carries it with
    /// its owner, so a gateway that keeps the highest token it has seen
    /// can refuse an old owner that has not yet learned of the move.
    pub placement_token: u64,
    /// Registration time.
    pub registered_at_ms: u64,
    /// Time of the last change.
    pub updated_at_ms: u64,
    /// Since when its probe has failed without a break (`None`: not
    /// unhealthy): a gateway unhealthy for long is taken as down, and its
    /// sessions move on (the meta leader's pass, `node/shards.rs`).
    pub unhealthy_since_ms: Option<u64>,
    /// A managed gateway's process (`None`: not managed).
    pub managed: Option<ManagedStatus>,
}

impl GatewayRecord {
    /// Whether a managed gateway's process keeps it from taking work (not
    /// up and answering).
    pub fn process_down(&self) -> bool {
        self.managed
            .as_ref()
            .is_some_and(|m| m.state != ManagedState::Running)
    }
}

/// An agent registration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRegistration {
    /// Its id (the lease holder name).
    pub id: AgentId,
    /// The gateway it runs on.
    pub gateway: GatewayId,
    /// What it can do.
    pub capabilities: Vec<String>,
    /// Free-form role label (e.g. `coder`, `reviewer`).
    pub role: String,
    /// Concurrent tasks it may hold.
    pub capacity: u32,
    /// The tools it may call, from its role (`None`: any).
    pub tools: Option<Vec<String>>,
    /// Given to the model ahead of each task's message, from its role.
    pub prompt: Option<String>,
}

impl AgentRegistration {
    /// The capabilities dispatch matches a task against: its own, and
    /// `role:<role>` for its role (a task submitted with `role` needs it).
    pub fn dispatch_caps(&self) -> Vec<String> {
        let mut caps = self.capabilities.clone();
        if !self.role.is_empty() {
            caps.push(format!("role:{}", self.role));
        }
        super::queue::normalize_caps(&caps)
    }
}

/// What the registry knows about an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The registration.
    pub reg: AgentRegistration,
    /// Registration time.
    pub registered_at_ms: u64,
    /// The node whose actor for this agent announced itself, since the
    /// gateway was last placed. Dispatch leases only to an agent online on
    /// its gateway's owner, so no lease waits for an actor that is not there.
    pub online_on: Option<NodeId>,
    /// Its own circuit breaker, as its actor last reported it: open, it
    /// takes no work (its attempts kept failing); half-open, one task at a
    /// time. Closed again when a new incarnation announces itself.
    pub circuit: Circuit,
    /// Since when its actor has been silent (no heartbeat on its node for
    /// `runtime.agent_silent_after`; `None`: heard): a silent agent takes
    /// no work.
    pub silent_since_ms: Option<u64>,
}

impl AgentRecord {
    /// Whether its own state lets it take work (breaker not open, not
    /// silent), whatever its node and gateway.
    pub fn may_work(&self) -> bool {
        self.circuit != Circuit::Open && self.silent_since_ms.is_none()
    }
}

/// The registries, part of [`State`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub(crate) nodes: BTreeMap<NodeId, NodeRecord>,
    pub(crate) gateways: BTreeMap<GatewayId, GatewayRecord>,
    pub(crate) agents: BTreeMap<AgentId, AgentRecord>,
}

/// Most sessions a gateway may declare.
pub const MAX_SESSIONS_PER_GATEWAY: u32 = 10_000;
/// Most concurrent tasks an agent may declare.
pub const MAX_AGENT_CAPACITY: u32 = 1_000;

/// At this share of its `max_sessions`, in percent, a gateway takes no new
/// sessions (backpressure).
pub const BACKPRESSURE_PERCENT: u32 = 90;

/// Whether a gateway with `active` sessions in use out of `max_sessions` may
/// open one more: true while `active < 90% of max_sessions` (integer math,
/// no rounding; a gateway with no capacity accepts nothing).
pub fn accepts_new_session(active: u32, max_sessions: u32) -> bool {
    u64::from(active) * 100 < u64::from(max_sessions) * u64::from(BACKPRESSURE_PERCENT)
}

/// How many new sessions a gateway with `active` sessions in use out of
/// `max_sessions` may still open before [`accepts_new_session`] says no.
pub fn new_session_room(active: u32, max_sessions: u32) -> u32 {
    let limit = (u64::from(max_sessions) * u64::from(BACKPRESSURE_PERCENT)).div_ceil(100);
    (limit as u32).saturating_sub(active)
}

pub(crate) fn not_found(what: &str, name: impl std::fmt::Display) -> Rejection {
    Rejection::Unknown {
        what: what.to_owned(),
        name: name.to_string(),
    }
}

fn check_caps(caps: &[String]) -> Result<(), Rejection> {
    if caps.len() > Limits::MAX_CAPABILITIES {
        return Err(Rejection::invalid(
            "capabilities",
            format!("at most {}", Limits::MAX_CAPABILITIES),
        ));
    }
    for c in caps {
        check_name("capabilities", c, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
    }
    Ok(())
}

impl State {
    /// Registers a node or refreshes its heartbeat (time from the batch).
    pub(crate) fn node_heartbeat(&mut self, id: NodeId, region: &str, api_addr: &str) -> Outcome {
        check_name("region", region, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        check_name("api_addr", api_addr, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        let now = self.clock_ms;
        let rec = self.registry.nodes.entry(id).or_insert_with(|| NodeRecord {
            id,
            region: region.to_owned(),
            api_addr: api_addr.to_owned(),
            draining: false,
            draining_since_ms: None,
            last_heartbeat_ms: now,
            registered_at_ms: now,
        });
        rec.region = region.to_owned();
        rec.api_addr = api_addr.to_owned();
        rec.last_heartbeat_ms = now;
        Ok(Reply::Done)
    }

    /// Sets or clears a node's drain flag.
    pub(crate) fn set_drain(&mut self, id: NodeId, draining: bool) -> Outcome {
        let rec = self
            .registry
            .nodes
            .get_mut(&id)
            .ok_or_else(|| not_found("node", id))?;
        if draining && !rec.draining {
            rec.draining_since_ms = Some(self.clock_ms);
        } else if !draining {
            rec.draining_since_ms = None;
        }
        let changed = rec.draining != draining;
        rec.draining = draining;
        if changed {
            let change = if draining {
                NodeChange::Draining
            } else {
                NodeChange::Undrained
            };
            self.notice(What::Node { id, change });
        }
        Ok(Reply::Done)
    }

    /// Registers a gateway, or updates one with the same id (kept placement
    /// and health).
    pub(crate) fn register_gateway(&mut self, reg: &GatewayRegistration) -> Outcome {
        check_name("id", &reg.id.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        if !GATEWAY_KINDS.contains(&reg.kind.as_str()) {
            return Err(Rejection::invalid(
                "kind",
                "must be sim, command, http or openclaw",
            ));
        }
        check_name("region", &reg.region, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        if let Some(m) = &reg.model {
            check_name("model", m, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        }
        check_caps(&reg.capabilities)?;
        if !(1..=MAX_SESSIONS_PER_GATEWAY).contains(&reg.max_sessions) {
            return Err(Rejection::invalid(
                "max_sessions",
                format!("must be 1..={MAX_SESSIONS_PER_GATEWAY}"),
            ));
        }
        if reg.spec.len() > Limits::MAX_PAYLOAD_BYTES {
            return Err(Rejection::invalid("spec", "is too large"));
        }
        let now = self.clock_ms;
        let reg = GatewayRegistration {
            capabilities: normalize_caps(&reg.capabilities),
            ..reg.clone()
        };
        let id = reg.id.clone();
        let change = match self.registry.gateways.get_mut(&reg.id) {
            Some(rec) => {
                // Managed now, or no longer: the owner reports anew.
                if rec.reg.managed != reg.managed {
                    rec.managed = reg.managed.then(ManagedStatus::default);
                }
                rec.reg = reg;
                rec.updated_at_ms = now;
                GatewayChange::Updated
            }
            None => {
                let rec = GatewayRecord {
                    reg: reg.clone(),
                    health: Health::Unknown,
                    circuit: Circuit::Closed,
                    owner: None,
                    placement_token: 0,
                    registered_at_ms: now,
                    updated_at_ms: now,
                    unhealthy_since_ms: None,
                    // Down until its owner starts it and it answers.
                    managed: reg.managed.then(ManagedStatus::default),
                };
                self.registry.gateways.insert(reg.id, rec);
                GatewayChange::Registered
            }
        };
        self.notice(What::Gateway { id, change });
        Ok(Reply::Done)
    }

    /// Removes a gateway that no agent is bound to.
    pub(crate) fn deregister_gateway(&mut self, id: &GatewayId) -> Outcome {
        if !self.registry.gateways.contains_key(id) {
            return Err(not_found("gateway", id));
        }
        let bound = self
            .registry
            .agents
            .values()
            .filter(|a| a.reg.gateway == *id)
            .count();
        if bound > 0 {
            return Err(Rejection::invalid(
                "gateway",
                format!("{bound} agents are bound to `{id}`; deregister them first"),
            ));
        }
        self.registry.gateways.remove(id);
        self.notice(What::Gateway {
            id: id.clone(),
            change: GatewayChange::Deregistered,
        });
        // Sessions bound for it go to any gateway; any left on it move on.
        self.end_idle_sessions_on(id, &format!("gateway {id} was deregistered"));
        Ok(Reply::Done)
    }

    /// Records a gateway's probed health and breaker state.
    /// A gateway whose breaker opened (calls to it keep failing) also sends
    /// its idle sessions on from their last checkpoint, so that tasks with
    /// their keys open them on another gateway instead of waiting for this
    /// one; a session running a task moves when that attempt ends
    /// ([`State::session_task_ended`]). A failed health probe alone only
    /// stops dispatch there: a gateway too busy to answer its probe still
    /// holds the conversation, which is worth waiting for, a while
    /// (`runtime.session_move_after`: then the meta leader moves them).
    pub(crate) fn report_gateway(
        &mut self,
        id: &GatewayId,
        health: Health,
        circuit: Circuit,
    ) -> Outcome {
        let mut changed = false;
        let now = self.clock_ms;
        let reply = self.edit_gateway(id, |rec| {
            changed = (rec.health, rec.circuit) != (health, circuit);
            rec.health = health;
            rec.circuit = circuit;
            rec.unhealthy_since_ms = match health {
                Health::Unhealthy => rec.unhealthy_since_ms.or(Some(now)),
                _ => None,
            };
        })?;
        if changed {
            self.notice(What::Gateway {
                id: id.clone(),
                change: GatewayChange::Health { health, circuit },
            });
        }
        if let Some(why) = self.gateway_unusable(id) {
            self.end_idle_sessions_on(id, &why);
        }
        Ok(reply)
    }

    /// Why sessions on gateway `id` cannot go on there, if they cannot:
    /// its breaker is open (calls to it keep failing).
    pub(crate) fn gateway_unusable(&self, id: &GatewayId) -> Option<String> {
        let g = self.registry.gateways.get(id)?;
        (g.circuit == Circuit::Open).then(|| format!("gateway {id}'s circuit breaker is open"))
    }

    /// Why sessions on gateway `id` should move on at `now_ms` (ms since
    /// the epoch), if they should: its breaker is open, or it has been
    /// unhealthy for `move_after_ms` (down, not only too busy to answer
    /// a probe). Dispatch gives it no new work either way.
    pub fn gateway_down(&self, id: &GatewayId, now_ms: u64, move_after_ms: u64) -> Option<String> {
        if let Some(why) = self.gateway_unusable(id) {
            return Some(why);
        }
        let since = self.registry.gateways.get(id)?.unhealthy_since_ms?;
        (now_ms.saturating_sub(since) >= move_after_ms).then(|| {
            format!(
                "gateway {id} has been unhealthy for {} s",
                now_ms.saturating_sub(since) / 1000
            )
        })
    }

    /// Records which node runs a gateway (the leader decides). When the
    /// owner changes, the gateway's agents are offline until their actors
    /// on the new owner announce themselves, and the leases they held are
    /// given back at once (no attempt spent): the old owner stops running
    /// them (it is dead, or its drain deadline passed).
    pub(crate) fn place_gateway(
        &mut self,
        id: &GatewayId,
        owner: Option<NodeId>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if let Some(n) = owner
            && !self.registry.nodes.contains_key(&n)
        {
            return Err(not_found("owner", n));
        }
        let before = self.registry.gateways.get(id).and_then(|g| g.owner);
        let moved = before != owner;
        let mut token = 0;
        let reply = self.edit_gateway(id, |rec| {
            rec.owner = owner;
            if moved && owner.is_some() {
                rec.placement_token += 1;
            }
            if moved && rec.managed.is_some() {
                // The new owner starts its own process.
                rec.managed = Some(ManagedStatus::default());
            }
            token = rec.placement_token;
        })?;
        if moved {
            self.notice(What::Gateway {
                id: id.clone(),
                change: GatewayChange::Placed { owner, token },
            });
            let agents: Vec<AgentId> = self
                .registry
                .agents
                .values()
                .filter(|a| a.reg.gateway == *id)
                .map(|a| a.reg.id.clone())
                .collect();
            for agent in agents {
                if let Some(a) = self.registry.agents.get_mut(&agent) {
                    a.online_on = None;
                }
                self.release_all(&agent, events);
            }
        }
        Ok(reply)
    }

    /// An agent's actor announces itself on `node`, giving back the named
    /// leases of its agent first.
    pub(crate) fn agent_online(
        &mut self,
        agent: &AgentId,
        node: NodeId,
        release: &[FencingToken],
        events: &mut Vec<Event>,
    ) -> Outcome {
        if !self.registry.agents.contains_key(agent) {
            return Err(not_found("agent", agent));
        }
        if !self.registry.nodes.contains_key(&node) {
            return Err(not_found("node", node));
        }
        let held = self.agent_leases.get(agent);
        let own: Vec<FencingToken> = release
            .iter()
            .copied()
            .filter(|t| held.is_some_and(|h| h.contains(t)))
            .collect();
        self.release(&own, events)?;
        if let Some(a) = self.registry.agents.get_mut(agent) {
            // A new incarnation: its breaker starts closed, and it is heard.
            a.online_on = Some(node);
            a.circuit = Circuit::Closed;
            a.silent_since_ms = None;
        }
        self.notice(What::Agent {
            id: agent.clone(),
            change: AgentChange::Online { node },
        });
        Ok(Reply::Done)
    }

    /// A managed gateway's owner reports its process. From a node that
    /// does not own the gateway (a late report from an old owner), or for a
    /// gateway that is not managed, it changes nothing.
    pub(crate) fn report_managed(
        &mut self,
        id: &GatewayId,
        node: NodeId,
        status: &ManagedStatus,
    ) -> Outcome {
        let rec = self
            .registry
            .gateways
            .get(id)
            .ok_or_else(|| not_found("gateway", id))?;
        if rec.owner != Some(node) || rec.managed.is_none() {
            return Ok(Reply::Done);
        }
        let mut status = status.clone();
        status.last_exit = status
            .last_exit
            .map(|e| super::state::truncate(&e, Limits::MAX_ERROR_BYTES));
        let changed = rec.managed.as_ref().map(|m| m.state) != Some(status.state);
        let state = status.state;
        self.edit_gateway(id, |rec| rec.managed = Some(status))?;
        if changed {
            self.notice(What::Gateway {
                id: id.clone(),
                change: GatewayChange::Process { state },
            });
        }
        Ok(Reply::Done)
    }

    /// An agent's actor on `node` reports its breaker, or the node reports
    /// the actor silent or heard again. From a node the agent is not online
    /// on (an old owner's late report), it changes nothing.
    pub(crate) fn report_agent(
        &mut self,
        agent: &AgentId,
        node: NodeId,
        circuit: Option<Circuit>,
        silent: Option<bool>,
    ) -> Outcome {
        let now = self.clock_ms;
        let a = self
            .registry
            .agents
            .get_mut(agent)
            .ok_or_else(|| not_found("agent", agent))?;
        if a.online_on != Some(node) {
            return Ok(Reply::Done);
        }
        let mut changes = Vec::new();
        if let Some(c) = circuit
            && c != a.circuit
        {
            a.circuit = c;
            changes.push(AgentChange::Circuit { circuit: c });
        }
        match silent {
            Some(true) if a.silent_since_ms.is_none() => {
                a.silent_since_ms = Some(now);
                changes.push(AgentChange::Silent);
            }
            Some(false) if a.silent_since_ms.is_some() => {
                a.silent_since_ms = None;
                changes.push(AgentChange::Heard);
            }
            _ => {}
        }
        for change in changes {
            self.notice(What::Agent {
                id: agent.clone(),
                change,
            });
        }
        Ok(Reply::Done)
    }

    /// Changes a registered gateway and stamps the change time.
    fn edit_gateway(&mut self, id: &GatewayId, edit: impl FnOnce(&mut GatewayRecord)) -> Outcome {
        let now = self.clock_ms;
        let rec = self
            .registry
            .gateways
            .get_mut(id)
            .ok_or_else(|| not_found("gateway", id))?;
        edit(rec);
        rec.updated_at_ms = now;
        Ok(Reply::Done)
    }

    /// Registers (or updates) an agent on a registered gateway. An agent
    /// moved to another gateway gives back its leases and ends its sessions
    /// (they belong to the old gateway).
    pub(crate) fn register_agent(
        &mut self,
        reg: &AgentRegistration,
        events: &mut Vec<Event>,
    ) -> Outcome {
        check_name("id", &reg.id.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        if !self.registry.gateways.contains_key(&reg.gateway) {
            return Err(not_found("gateway", &reg.gateway));
        }
        check_caps(&reg.capabilities)?;
        check_name("role", &reg.role, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        if !(1..=MAX_AGENT_CAPACITY).contains(&reg.capacity) {
            return Err(Rejection::invalid(
                "capacity",
                format!("must be 1..={MAX_AGENT_CAPACITY}"),
            ));
        }
        if let Some(tools) = &reg.tools {
            if tools.len() > crate::roles::MAX_TOOLS {
                let problem = format!("at most {}", crate::roles::MAX_TOOLS);
                return Err(Rejection::invalid("tools", problem));
            }
            for t in tools {
                check_name("tools", t, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
            }
        }
        if reg
            .prompt
            .as_ref()
            .is_some_and(|p| p.len() > crate::roles::MAX_PROMPT_BYTES)
        {
            let problem = format!("at most {} bytes", crate::roles::MAX_PROMPT_BYTES);
            return Err(Rejection::invalid("prompt", problem));
        }
        let reg = AgentRegistration {
            capabilities: normalize_caps(&reg.capabilities),
            ..reg.clone()
        };
        let old = self.registry.agents.get(&reg.id);
        let known = old.is_some();
        let registered_at_ms = old.map_or(self.clock_ms, |a| a.registered_at_ms);
        let mut online_on = old.and_then(|a| a.online_on);
        let old_circuit = old.map_or(Circuit::Closed, |a| a.circuit);
        let silent_since_ms = old.and_then(|a| a.silent_since_ms);
        if old.is_some_and(|a| a.reg.gateway != reg.gateway) {
            self.let_go(&reg.id, "agent moved to another gateway", events);
            online_on = None;
        }
        let (id, gateway) = (reg.id.clone(), reg.gateway.clone());
        let change = if known {
            AgentChange::Updated { gateway }
        } else {
            AgentChange::Registered { gateway }
        };
        self.registry.agents.insert(
            reg.id.clone(),
            AgentRecord {
                reg,
                registered_at_ms,
                online_on,
                circuit: old_circuit,
                silent_since_ms,
            },
        );
        self.notice(What::Agent { id, change });
        Ok(Reply::Done)
    }

    /// Removes an agent: its live leases are given back (their tasks are
    /// ready again, no attempt spent) and its sessions end as `error`.
    pub(crate) fn deregister_agent(&mut self, id: &AgentId, events: &mut Vec<Event>) -> Outcome {
        self.registry
            .agents
            .remove(id)
            .ok_or_else(|| not_found("agent", id))?;
        self.let_go(id, "agent deregistered", events);
        self.notice(What::Agent {
            id: id.clone(),
            change: AgentChange::Deregistered,
        });
        Ok(Reply::Done)
    }

    /// In a queue shard: lets a deregistered agent go (its leases and
    /// sessions here). Refused while the agent is registered here (the
    /// meta group of a one-group cluster, where deregistering does this).
    pub(crate) fn release_agent(&mut self, agent: &AgentId, events: &mut Vec<Event>) -> Outcome {
        if self.registry.agents.contains_key(agent) {
            return Err(Rejection::invalid(
                "agent",
                format!("agent `{agent}` is registered: deregister it"),
            ));
        }
        self.let_go(agent, "agent deregistered", events);
        Ok(Reply::Done)
    }

    /// Releases `agent`'s live leases and ends its sessions.
    fn let_go(&mut self, agent: &AgentId, why: &str, events: &mut Vec<Event>) {
        self.release_all(agent, events);
        self.end_agent_sessions(agent, why);
    }

    /// Gives back every live lease `agent` holds (no attempt spent).
    fn release_all(&mut self, agent: &AgentId, events: &mut Vec<Event>) {
        let tokens: Vec<FencingToken> = self
            .agent_leases(agent)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        self.release(&tokens, events)
            .expect("invariant: releasing live leases always succeeds");
    }

    /// Live leases held by the agents of `gateway`.
    pub fn gateway_leases(&self, gateway: &GatewayId) -> u32 {
        self.gateway_leases_in(gateway, |a| self.agent_load(a))
    }

    /// Live leases held by the agents of `gateway` (this registry's), each
    /// agent's load as `load` counts it (over every queue shard).
    pub fn gateway_leases_in(&self, gateway: &GatewayId, load: impl Fn(&AgentId) -> u32) -> u32 {
        self.registry
            .agents
            .values()
            .filter(|a| a.reg.gateway == *gateway)
            .map(|a| load(&a.reg.id))
            .sum()
    }

    /// Every agent holding leases here, with how many.
    pub fn agent_loads(&self) -> impl Iterator<Item = (&AgentId, u32)> {
        self.agent_leases
            .iter()
            .map(|(a, held)| (a, held.len() as u32))
            .filter(|(_, n)| *n > 0)
    }

    /// The registries.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Live leases held by `agent`: its current load.
    pub fn agent_load(&self, agent: &AgentId) -> u32 {
        self.agent_leases.get(agent).map_or(0, |l| l.len() as u32)
    }

    /// The live leases held by `agent`, with their tasks, by token.
    pub fn agent_leases(&self, agent: &AgentId) -> Vec<(FencingToken, TaskId)> {
        self.agent_leases.get(agent).map_or_else(Vec::new, |held| {
            held.iter().map(|t| (*t, self.leases[t])).collect()
        })
    }
}

impl Registry {
    /// Registered nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// Registered gateways.
    pub fn gateways(&self) -> impl Iterator<Item = &GatewayRecord> {
        self.gateways.values()
    }

    /// One gateway.
    pub fn gateway(&self, id: &GatewayId) -> Option<&GatewayRecord> {
        self.gateways.get(id)
    }

    /// Registered agents.
    pub fn agents(&self) -> impl Iterator<Item = &AgentRecord> {
        self.agents.values()
    }

    /// One agent.
    pub fn agent(&self, id: &AgentId) -> Option<&AgentRecord> {
        self.agents.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::Command;

    /// The room is exactly how many more sessions the 90% rule admits.
    #[test]
    fn session_room_counts_what_backpressure_admits() {
        for max in 0..=120 {
            for active in 0..=130 {
                let mut admitted = 0;
                while accepts_new_session(active + admitted, max) {
                    admitted += 1;
                }
                assert_eq!(new_session_room(active, max), admitted, "{active}/{max}");
            }
        }
    }

    fn apply(state: &mut State, now_ms: u64, cmd: Command) -> Outcome {
        state.apply_one(now_ms, cmd)
    }

    fn gateway(id: &str) -> GatewayRegistration {
        GatewayRegistration {
            id: GatewayId(id.into()),
            kind: "sim".into(),
            spec: "{}".into(),
            region: "eu".into(),
            capabilities: vec!["rust".into(), "git".into(), "rust".into()],
            max_sessions: 10,
            model: None,
            managed: false,
        }
    }

    #[test]
    fn nodes_heartbeat_and_drain() {
        let mut s = State::default();
        assert!(
            apply(
                &mut s,
                1000,
                Command::SetDrain {
                    id: 1,
                    draining: true
                }
            )
            .is_err()
        );
        let hb = || Command::NodeHeartbeat {
            id: 1,
            region: "eu".into(),
            api_addr: "127.0.0.1:7373".into(),
        };
        apply(&mut s, 1000, hb()).unwrap();
        apply(&mut s, 2500, hb()).unwrap();
        apply(
            &mut s,
            2600,
            Command::SetDrain {
                id: 1,
                draining: true,
            },
        )
        .unwrap();
        let n = s.registry().nodes().next().unwrap();
        assert_eq!(
            (n.registered_at_ms, n.last_heartbeat_ms, n.draining),
            (1000, 2500, true)
        );
    }

    #[test]
    fn gateways_and_agents() {
        let mut s = State::default();
        apply(&mut s, 10, Command::RegisterGateway(gateway("gw-1"))).unwrap();
        let g = s.registry().gateway(&GatewayId("gw-1".into())).unwrap();
        assert_eq!(g.reg.capabilities, vec!["git".to_string(), "rust".into()]);
        assert_eq!(
            (g.health, g.circuit, g.owner),
            (Health::Unknown, Circuit::Closed, None)
        );
        let bad = GatewayRegistration {
            kind: "ftp".into(),
            ..gateway("gw-2")
        };
        assert!(
            matches!(apply(&mut s, 10, Command::RegisterGateway(bad)), Err(Rejection::Invalid { field, .. }) if field == "kind")
        );
        let agent = AgentRegistration {
            id: AgentId("a1".into()),
            gateway: GatewayId("gw-1".into()),
            capabilities: vec!["rust".into()],
            role: "coder".into(),
            capacity: 2,
            ..Default::default()
        };
        apply(&mut s, 20, Command::RegisterAgent(agent.clone())).unwrap();
        let orphan = AgentRegistration {
            gateway: GatewayId("nope".into()),
            ..agent.clone()
        };
        assert!(apply(&mut s, 20, Command::RegisterAgent(orphan)).is_err());
        // Bound agents keep their gateway registered.
        let id = GatewayId("gw-1".into());
        assert!(apply(&mut s, 30, Command::DeregisterGateway { id: id.clone() }).is_err());
        assert!(
            apply(
                &mut s,
                30,
                Command::PlaceGateway {
                    id: id.clone(),
                    owner: Some(9)
                }
            )
            .is_err()
        );
        apply(
            &mut s,
            30,
            Command::NodeHeartbeat {
                id: 9,
                region: "eu".into(),
                api_addr: "x:1".into(),
            },
        )
        .unwrap();
        apply(
            &mut s,
            31,
            Command::PlaceGateway {
                id: id.clone(),
                owner: Some(9),
            },
        )
        .unwrap();
        apply(
            &mut s,
            32,
            Command::ReportGateway {
                id: id.clone(),
                health: Health::Degraded,
                circuit: Circuit::HalfOpen,
            },
        )
        .unwrap();
        let g = s.registry().gateway(&id).unwrap();
        assert_eq!(
            (g.owner, g.health, g.circuit, g.updated_at_ms),
            (Some(9), Health::Degraded, Circuit::HalfOpen, 32)
        );
        // Where the agent is registered, ReleaseAgent (a shard's) is
        // refused and changes nothing: deregistering does it.
        let before = crate::codec::encode(&s).unwrap();
        let early = Command::ReleaseAgent {
            agent: agent.id.clone(),
        };
        assert!(apply(&mut s, 32, early).is_err());
        assert_eq!(crate::codec::encode(&s).unwrap(), before);
        apply(
            &mut s,
            40,
            Command::DeregisterAgent {
                id: agent.id.clone(),
            },
        )
        .unwrap();
        apply(&mut s, 41, Command::DeregisterGateway { id }).unwrap();
        assert_eq!(s.registry().gateways().count(), 0);
    }

    #[test]
    fn agent_load_counts_live_leases() {
        let mut s = State::default();
        let submit = Command::Submit(crate::fsm::SubmitTask {
            tenant: "t".into(),
            payload: "{}".into(),
            ..Default::default()
        });
        apply(&mut s, 1, submit.clone()).unwrap();
        apply(&mut s, 1, submit).unwrap();
        let lease = Command::Lease {
            agent_id: AgentId("a1".into()),
            capabilities: vec![],
            max: 2,
            lease_ms: 1000,
        };
        apply(&mut s, 2, lease).unwrap();
        assert_eq!(s.agent_load(&AgentId("a1".into())), 2);
        apply(&mut s, 5000, Command::Tick).unwrap();
        assert_eq!(
            s.agent_load(&AgentId("a1".into())),
            0,
            "expired leases free the agent"
        );
    }
}

#[cfg(test)]
mod down_tests {
    use crate::fsm::{Circuit, Command, GatewayId, GatewayRegistration, Health, State};

    fn report(s: &mut State, at: u64, health: Health, circuit: Circuit) {
        let cmd = Command::ReportGateway {
            id: GatewayId("g".into()),
            health,
            circuit,
        };
        s.apply_one(at, cmd).unwrap();
    }

    #[test]
    fn a_gateway_is_down_once_unhealthy_for_long_or_its_breaker_opens() {
        let mut s = State::default();
        let reg = GatewayRegistration {
            id: GatewayId("g".into()),
            kind: "sim".into(),
            spec: "{}".into(),
            region: "r".into(),
            capabilities: vec![],
            max_sessions: 4,
            model: None,
            managed: false,
        };
        s.apply_one(0, Command::RegisterGateway(reg)).unwrap();
        let g = GatewayId("g".into());
        let down = |s: &State, now| s.gateway_down(&g, now, 30_000);
        report(&mut s, 1_000, Health::Unhealthy, Circuit::Closed);
        // Still unhealthy later: the first report's time counts.
        report(&mut s, 5_000, Health::Unhealthy, Circuit::Closed);
        assert_eq!(down(&s, 30_999), None, "a busy moment is not down");
        assert_eq!(
            down(&s, 31_000).as_deref(),
            Some("gateway g has been unhealthy for 30 s")
        );
        // Healthy again: the clock starts over at the next failure.
        report(&mut s, 40_000, Health::Healthy, Circuit::Closed);
        assert_eq!(down(&s, 100_000), None);
        report(&mut s, 50_000, Health::Unhealthy, Circuit::Closed);
        assert_eq!(down(&s, 79_999), None);
        // An open breaker is down at once, whatever the health.
        report(&mut s, 60_000, Health::Healthy, Circuit::Open);
        assert_eq!(
            down(&s, 60_000).as_deref(),
            Some("gateway g's circuit breaker is open")
        );
        assert_eq!(s.gateway_down(&GatewayId("nope".into()), 0, 0), None);
    }
}
