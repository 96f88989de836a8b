//! Telling agents about their leases. The node's lease router reads every
//! applied entry and, for each lease granted to an agent whose actor runs on
//! this node, sends it a `Granted` hint; when a routed lease is lost
//! (expired, timed out, released, cancelled) it sends `Lost`. Hints are only
//! a shortcut: each agent also reconciles with the committed leases on a
//! timer, and the router asks every agent to reconcile when the leader
//! changes (a hint the old leader sent over the fabric may be lost), so a
//! lost or late hint delays an attempt but never loses or doubles one.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use ractor::ActorRef;
use tokio::sync::broadcast::error::RecvError;

use super::agent::AgentMsg;
use crate::fsm::{AgentId, EventKind, FencingToken, TaskId, What};
use crate::node::{Group, Node};

/// The agent actors running on this node, by agent id. Each actor adds
/// itself when it starts and removes itself when it stops.
#[derive(Clone, Debug, Default)]
pub struct AgentDirectory {
    inner: Arc<RwLock<HashMap<AgentId, ActorRef<AgentMsg>>>>,
    /// When each agent's actor last beat (it does at every sync): the
    /// node's watch takes one silent for long out of dispatch.
    beats: Arc<std::sync::Mutex<HashMap<AgentId, std::time::Instant>>>,
    /// Agents whose own breaker is open here: this node pulls nothing for
    /// them, even before the registry has heard.
    open: Arc<std::sync::Mutex<std::collections::HashSet<AgentId>>>,
}

impl AgentDirectory {
    /// Records a heartbeat of `agent`'s actor.
    pub fn beat(&self, agent: &AgentId) {
        let mut b = self
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.insert(agent.clone(), std::time::Instant::now());
    }

    /// Records whether `agent`'s own breaker is open.
    pub fn set_breaker_open(&self, agent: &AgentId, open: bool) {
        let mut o = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if open {
            o.insert(agent.clone());
        } else {
            o.remove(agent);
        }
    }

    /// Whether `agent`'s own breaker is open on this node.
    pub fn breaker_open(&self, agent: &AgentId) -> bool {
        let o = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        o.contains(agent)
    }

    /// Starts the silence clock of an agent online here that has never
    /// beaten (its actor not started, or unable to start): past
    /// `runtime.agent_silent_after` without a beat, it is silent.
    pub fn beat_if_unheard(&self, agent: &AgentId) {
        let mut b = self
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.entry(agent.clone())
            .or_insert_with(std::time::Instant::now);
    }

    /// How long ago `agent`'s actor last beat (`None`: never here).
    pub fn silent_for(&self, agent: &AgentId) -> Option<std::time::Duration> {
        let b = self
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.get(agent).map(std::time::Instant::elapsed)
    }

    /// Forgets the heartbeats of agents not in `keep`.
    pub fn retain_beats(&self, keep: impl Fn(&AgentId) -> bool) {
        let mut b = self
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.retain(|a, _| keep(a));
    }

    /// Records `actor` as the running actor of `agent`.
    pub fn insert(&self, agent: AgentId, actor: ActorRef<AgentMsg>) {
        self.write().insert(agent, actor);
    }

    /// Forgets `agent`'s actor if it is still `actor` (a newer incarnation
    /// may have replaced it).
    pub fn remove(&self, agent: &AgentId, actor: &ActorRef<AgentMsg>) {
        let mut map = self.write();
        if map.get(agent).is_some_and(|a| a.get_id() == actor.get_id()) {
            map.remove(agent);
        }
    }

    /// The running actor of `agent`.
    pub fn get(&self, agent: &AgentId) -> Option<ActorRef<AgentMsg>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(agent)
            .cloned()
    }

    fn all(&self) -> Vec<ActorRef<AgentMsg>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<AgentId, ActorRef<AgentMsg>>> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Routes the lease hints of queue group `group` (one router per group
/// that holds tasks) to this node's agents until the node shuts down.
pub async fn route_leases(node: Node, group: Group, directory: AgentDirectory) {
    let mut applied = group.state().subscribe();
    // Leases routed to a local agent and not ended yet.
    let mut routed: HashMap<TaskId, AgentId> = HashMap::new();
    let shutdown = node.shutdown_token().clone();
    // Server metrics change only with the vote, role, leader or membership,
    // not with every append and apply as `metrics()` does.
    let mut raft = group.raft().server_metrics();
    let mut leader = raft.borrow_and_update().current_leader;
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = raft.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = raft.borrow_and_update().current_leader;
                if now != leader {
                    leader = now;
                    sync_all(&directory);
                }
                continue;
            }
            r = applied.recv() => r,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "lease router lagged; agents resync");
                routed.clear();
                sync_all(&directory);
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if batch.snapshot_installed {
            routed.clear();
            sync_all(&directory);
            continue;
        }
        for e in &batch.events {
            let What::Task { task, kind, .. } = &e.what else {
                continue;
            };
            let task = *task;
            match kind {
                EventKind::Leased { token, agent } => {
                    if let Some(actor) = directory.get(agent) {
                        routed.insert(task, agent.clone());
                        let _ = actor.send_message(AgentMsg::Granted {
                            token: *token,
                            task,
                        });
                    }
                }
                EventKind::LeaseExpired { token }
                | EventKind::TimedOut { token }
                | EventKind::Released { token } => {
                    lost(&mut routed, &directory, task, Some(*token));
                }
                EventKind::Cancelled => lost(&mut routed, &directory, task, None),
                EventKind::Completed | EventKind::Failed { .. } | EventKind::DeadLettered => {
                    routed.remove(&task);
                }
                _ => {}
            }
        }
    }
}

/// Tells the agent that held `task` that its lease `token` (every lease
/// of the task, when `None`) ended without its report.
fn lost(
    routed: &mut HashMap<TaskId, AgentId>,
    directory: &AgentDirectory,
    task: TaskId,
    token: Option<FencingToken>,
) {
    if let Some(agent) = routed.remove(&task)
        && let Some(actor) = directory.get(&agent)
    {
        let _ = actor.send_message(AgentMsg::Lost { task, token });
    }
}

fn sync_all(directory: &AgentDirectory) {
    for actor in directory.all() {
        let _ = actor.send_message(AgentMsg::Sync);
    }
}
