//! The actor fabric: ractor_cluster joins the nodes' actor systems so that
//! an actor on one node can message an actor on another. Godel uses it for
//! one thing: the leader tells a follower's agents about leases it has just
//! committed for them, instead of leaving them to wait until the follower's
//! replica applies the entry.
//!
//! # Hints only
//!
//! Every fabric message is a hint. ractor_cluster has no failure detector (a
//! frozen or partitioned peer goes unnoticed for minutes), reconnects on a
//! best-effort basis and silently drops what it cannot decode, so nothing
//! depends on a message arriving:
//!
//! - Raft, write forwarding and reads never ride on it (they have their own
//!   authenticated transport, `transport`); node liveness comes from Raft
//!   heartbeats and the node registry, never from fabric sessions.
//! - Every agent reconciles with the committed state on a timer and when the
//!   leader changes, so a lost hint delays an attempt by at most
//!   `runtime.agent_sync_interval` plus replication, and never loses it.
//! - A hint cannot double an attempt: the agent runs each fencing token at
//!   most once, and the token still fences results, so a stale or repeated
//!   hint yields at most a refused report (`actors::agent` has the checks).
//!
//! # Shape
//!
//! - Each node runs a ractor_cluster `NodeServer` on its raft IP at the raft
//!   port + 100 (`config::FABRIC_PORT_OFFSET`; members carry no fabric
//!   address, so peers' addresses are derived the same way). Connections are
//!   Isolated (no transitive dialing): the node with the lower id dials, every
//!   2 s ([`RECONNECT_EVERY`]) for each member of the current Raft membership
//!   without an authenticated session; sessions going up and down are
//!   logged and counted in `godel_fabric_peers`.
//! - Sessions authenticate with ractor_cluster's challenge/response over a
//!   cookie derived from the cluster secret (HMAC-SHA256 of the secret over
//!   [`COOKIE_LABEL`]), never the secret itself. A single node has a secret
//!   too (random, in its data directory), so it runs the fabric alone: it
//!   listens, has no peer to dial, and sends nothing.
//! - A [`LeaseHints`] actor per node joins the process group
//!   `godel.hints.<node id>`; pg membership is synced over the sessions, so
//!   the leader finds a follower's actor by its node id. After a dispatch
//!   round commits on the leader, the proposer hands the grants to the local
//!   `LeaseHints`, which sends each grant whose agent's gateway is placed on
//!   another node to that node's `LeaseHints` ([`HintMsg::Granted`]), which
//!   passes it to the agent actor as `AgentMsg::Hinted`.
//!
//! # Shortcuts, on purpose
//!
//! - TLS is opt-in (`[fabric.tls]`: mutual TLS, every node's certificate
//!   from one CA; see `tls`). Without it the session after the cookie
//!   handshake is plain TCP, readable and forgeable on the wire (a forged
//!   hint can at worst start an attempt whose report is refused): keep such
//!   a fabric on a trusted network or set `fabric.enabled = false`.
//! - A hint goes to the first remote member of the group; after a reconnect
//!   pg may briefly list a stale stub, and that hint is lost (see above).
//! - The hints actor's mailbox is ractor's, unbounded; it receives at most
//!   one message per committed dispatch round (leader) or per grant
//!   (follower), each handled without waiting.

mod hints;
mod peers;
mod tls;

use ractor::ActorRef;
use ractor_cluster::NodeServerMessage;

pub use hints::{GRANTED_V2, Hint, HintMsg, LeaseHints, dispatched, group};
pub use peers::{RECONNECT_EVERY, node_name, parse_node_name, peer_addr};
pub use tls::{FabricTlsConfig, server_name};

use crate::actors::{ChildSpec, SupervisorRef};
use crate::node::Node;
use crate::transport::Secret;

/// The label the fabric cookie is derived under.
pub const COOKIE_LABEL: &str = "godel fabric cookie";

/// Name of the hints actor under the node's root supervisor.
pub const HINTS_ACTOR: &str = "lease_hints";

/// The fabric cookie for a cluster secret.
pub fn cookie(secret: &Secret) -> String {
    secret.derive_hex(COOKIE_LABEL)
}

/// A running fabric: its node server (which owns the listener and the
/// sessions) and its dialing loop (a task owned by the node).
pub struct Fabric {
    server: ActorRef<NodeServerMessage>,
}

impl Fabric {
    /// Starts the node server and the loop that keeps sessions to the other
    /// members, over mutual TLS when `tls` is given (see
    /// [`FabricTlsConfig::load`]). Fails if the listener cannot bind; the
    /// node then runs without the fabric (hints are a shortcut only).
    pub async fn start(
        node: &Node,
        secret: &Secret,
        tls: Option<FabricTlsConfig>,
    ) -> anyhow::Result<Fabric> {
        let server = peers::start_server(node, cookie(secret), tls.as_ref()).await?;
        node.spawn(peers::keep_connected(node.clone(), server.clone(), tls));
        Ok(Fabric { server })
    }

    /// Stops the node server, its listener and every session.
    pub fn stop(self) {
        self.server.kill();
    }
}

/// Starts the hints actor under the node's root supervisor (restarted by
/// the same policy as every other actor).
pub async fn start_hints(node: &Node, root: &SupervisorRef) -> crate::actors::Result<()> {
    let node = node.clone();
    root.add_child(ChildSpec::new(HINTS_ACTOR, move || {
        (LeaseHints, node.clone())
    }))
    .await?;
    Ok(())
}
