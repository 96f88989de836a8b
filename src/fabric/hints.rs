//! The LeaseHints actor: on the leader it fans committed grants out to the
//! nodes that run their agents; on a follower it hands each hint it receives
//! to the agent's actor.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, pg};
use serde::{Deserialize, Serialize};

use crate::actors::AgentMsg;
use crate::codec;
use crate::fsm::{AgentId, FencingToken, LeaseGrant, Task};
use crate::node::Node;
use crate::raft::NodeId;

/// The wire name of [`HintMsg::Granted`], with its format version: a node
/// that does not know a name (a newer format) drops the message with a
/// debug log and counts it as `unreadable`.
pub const GRANTED_V2: &str = "godel.hint.granted.v2";

/// The process group of node `id`'s hints actor.
pub fn group(id: NodeId) -> String {
    format!("godel.hints.{id}")
}

/// A lease the leader committed, as sent to the node running its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// The agent holding the lease.
    pub agent: AgentId,
    /// The lease's fencing token.
    pub token: FencingToken,
    /// The task as the leader applied the grant (its lease included).
    pub task: Arc<Task>,
    /// The log index of the entry that granted it.
    pub committed_index: u64,
}

/// Messages of the hints actor.
#[derive(Debug)]
pub enum HintMsg {
    /// Local, from the leader's proposer: a dispatch round committed at
    /// `committed_index` granted these leases; hint the other nodes.
    Fanout {
        /// The grants.
        grants: Vec<LeaseGrant>,
        /// The entry's log index.
        committed_index: u64,
    },
    /// From the leader, over the fabric: a lease for an agent of this node.
    Granted(Hint),
    /// A message from the fabric that this build cannot read.
    Unreadable(String),
}

// Only `Granted` crosses nodes. Decoding never fails as far as ractor can
// tell: what cannot be read becomes `Unreadable`, so it is logged and
// counted here rather than dropped silently by ractor.
impl ractor::Message for HintMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            HintMsg::Granted(hint) => Ok(SerializedMessage::Cast {
                variant: GRANTED_V2.to_string(),
                args: codec::encode(&hint).map_err(|_| BoxedDowncastErr)?,
                metadata: None,
            }),
            HintMsg::Fanout { .. } | HintMsg::Unreadable(_) => Err(BoxedDowncastErr),
        }
    }

    fn deserialize(msg: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        Ok(match msg {
            SerializedMessage::Cast { variant, args, .. } if variant == GRANTED_V2 => {
                match codec::decode::<Hint>(&args) {
                    Ok(hint) => HintMsg::Granted(hint),
                    Err(e) => HintMsg::Unreadable(format!("{variant}: {e}")),
                }
            }
            SerializedMessage::Cast { variant, .. } => {
                HintMsg::Unreadable(format!("unknown message `{variant}`"))
            }
            SerializedMessage::Call { variant, .. } => {
                HintMsg::Unreadable(format!("unexpected call `{variant}`"))
            }
            SerializedMessage::CallReply(..) => HintMsg::Unreadable("unexpected reply".into()),
        })
    }
}

/// Called by the leader's proposer once an entry with dispatch rounds is
/// applied: hands the grants to this node's hints actor (never waits).
pub fn dispatched(node: &Node, grants: Vec<LeaseGrant>, committed_index: u64) {
    if grants.is_empty() || !node.config().fabric.enabled {
        return;
    }
    if let Some(local) = pg::get_local_members(&group(node.id())).into_iter().next() {
        let _ = ActorRef::<HintMsg>::from(local).send_message(HintMsg::Fanout {
            grants,
            committed_index,
        });
    }
}

/// The hints actor.
pub struct LeaseHints;

impl Actor for LeaseHints {
    type Msg = HintMsg;
    type State = Node;
    type Arguments = Node;

    async fn pre_start(
        &self,
        myself: ActorRef<HintMsg>,
        node: Node,
    ) -> Result<Node, ActorProcessingErr> {
        // Left automatically when the actor exits.
        pg::join(group(node.id()), vec![myself.get_cell()]);
        Ok(node)
    }

    async fn handle(
        &self,
        _myself: ActorRef<HintMsg>,
        msg: HintMsg,
        node: &mut Node,
    ) -> Result<(), ActorProcessingErr> {
        let m = crate::metrics::global();
        match msg {
            HintMsg::Fanout {
                grants,
                committed_index,
            } => fan_out(node, grants, committed_index),
            HintMsg::Granted(hint) => {
                m.hints_received.inc();
                deliver(node, hint);
            }
            HintMsg::Unreadable(why) => {
                m.hints_dropped.with_label_values(&["unreadable"]).inc();
                tracing::debug!(reason = %why, "fabric message dropped: unreadable");
            }
        }
        Ok(())
    }
}

/// On the leader: sends each grant whose agent runs on another node to that
/// node's hints actor. The owner is read from this node's state, which
/// includes the granting entry.
fn fan_out(node: &Node, grants: Vec<LeaseGrant>, committed_index: u64) {
    let me = node.id();
    let targets: Vec<(NodeId, AgentId, LeaseGrant)> = node.state().read(|s| {
        let reg = s.registry();
        grants
            .into_iter()
            .filter_map(|g| {
                let agent = g.task.lease.as_ref()?.agent_id.clone();
                let owner = reg
                    .agent(&agent)
                    .and_then(|a| reg.gateway(&a.reg.gateway))
                    .and_then(|gw| gw.owner)?;
                (owner != me).then_some((owner, agent, g))
            })
            .collect()
    });
    let m = crate::metrics::global();
    let mut peers: HashMap<NodeId, Option<ActorCell>> = HashMap::new();
    for (owner, agent, grant) in targets {
        let peer = peers.entry(owner).or_insert_with(|| remote_hints(owner));
        let Some(peer) = peer.clone() else {
            m.hints_dropped.with_label_values(&["no_peer"]).inc();
            tracing::debug!(node = owner, %agent, token = %grant.token, "no fabric session to the agent's node; hint dropped");
            continue;
        };
        let token = grant.token;
        let hint = Hint {
            agent,
            token,
            task: grant.task,
            committed_index,
        };
        match ActorRef::<HintMsg>::from(peer).send_message(HintMsg::Granted(hint)) {
            Ok(()) => {
                m.hints_sent.inc();
                tracing::debug!(node = owner, %token, committed_index, "lease hint sent");
            }
            Err(e) => {
                m.hints_dropped.with_label_values(&["send_failed"]).inc();
                tracing::debug!(node = owner, %token, error = %e, "lease hint not sent");
            }
        }
    }
}

/// The hints actor of node `id` as seen through the fabric, if a session
/// to it is up and has synced its process groups.
fn remote_hints(id: NodeId) -> Option<ActorCell> {
    pg::get_members(&group(id))
        .into_iter()
        .find(|c| !c.get_id().is_local())
}

/// On the agent's node: passes the hint to the agent's actor.
fn deliver(node: &Node, hint: Hint) {
    let Some(actor) = node.agent_directory().get(&hint.agent) else {
        crate::metrics::global()
            .hints_dropped
            .with_label_values(&["no_agent"])
            .inc();
        tracing::debug!(agent = %hint.agent, token = %hint.token, "lease hint for an agent not running here");
        return;
    };
    tracing::debug!(agent = %hint.agent, token = %hint.token, committed_index = hint.committed_index, "lease hint received");
    let expires_at_ms = hint.task.lease.as_ref().map_or(0, |l| l.expires_at_ms);
    let _ = actor.send_message(AgentMsg::Hinted {
        grant: LeaseGrant {
            token: hint.token,
            expires_at_ms,
            task: hint.task,
        },
        committed_index: hint.committed_index,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::Message;

    #[test]
    fn granted_round_trips_and_unknown_versions_are_unreadable() {
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": 7, "tenant": "t", "priority": "high", "payload": {"Held": "{}"},
            "capabilities": [], "session_key": null, "scheduled_at_ms": null,
            "max_attempts": 3, "timeout_ms": 1000,
            "backoff": {"initial_ms": 1000, "multiplier": 2, "max_ms": 30000},
            "idempotency_key": null, "parent_id": null, "status": "leased",
            "attempts": 0, "lease_count": 1, "lease": null, "last_agent": null,
            "next_attempt_at_ms": null, "result": null, "last_error": null,
            "created_at_ms": 1, "updated_at_ms": 2, "depends_on": [], "waiting_on": [],
            "on_dependency_failure": "cancel", "blocked": null
        }))
        .expect("a task");
        let hint = Hint {
            agent: AgentId::from("g.a0"),
            token: FencingToken(42),
            task: Arc::new(task),
            committed_index: 9,
        };
        let wire = HintMsg::Granted(hint.clone()).serialize().unwrap();
        let SerializedMessage::Cast { variant, args, .. } = wire else {
            panic!("a cast")
        };
        assert_eq!(variant, GRANTED_V2);
        let back = HintMsg::deserialize(SerializedMessage::Cast {
            variant,
            args: args.clone(),
            metadata: None,
        })
        .unwrap();
        assert!(matches!(back, HintMsg::Granted(h) if h == hint));
        let newer = HintMsg::deserialize(SerializedMessage::Cast {
            variant: "godel.hint.granted.v3".into(),
            args,
            metadata: None,
        })
        .unwrap();
        assert!(matches!(newer, HintMsg::Unreadable(_)));
        let garbage = HintMsg::deserialize(SerializedMessage::Cast {
            variant: GRANTED_V2.into(),
            args: vec![1, 2, 3],
            metadata: None,
        })
        .unwrap();
        assert!(matches!(garbage, HintMsg::Unreadable(_)));
        assert!(
            HintMsg::Unreadable(String::new()).serialize().is_err(),
            "local-only verbs never cross nodes"
        );
    }
}
