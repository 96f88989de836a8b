//! The node server and the sessions to the other members.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NodeServer, NodeServerMessage};

use super::tls::FabricTlsConfig;

use crate::node::Node;
use crate::raft::NodeId;

/// How often a node dials the members it has no authenticated session with.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(2);
/// Longest a dial (TCP connect) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest the node server may take to list its sessions, in ms.
const SESSIONS_TIMEOUT_MS: u64 = 1000;
/// Dials that reach a peer without an authenticated session before the
/// node warns that the cookies (so the cluster secrets) may differ.
const WARN_AFTER_DIALS: u32 = 3;
/// Largest fabric frame accepted, in bytes: 4 MiB. A hint carries one task
/// (payload at most 256 KiB); ractor_cluster's own default is 16 MiB.
const MAX_FRAME_BYTES: u64 = 4 * 1024 * 1024;

/// The fabric name of node `id` (unique per node, stable across restarts).
pub fn node_name(id: NodeId) -> String {
    format!("godel-{id}")
}

/// The node id in a peer's fabric name (`godel-<id>@<host>`).
pub fn parse_node_name(name: &str) -> Option<NodeId> {
    let (name, _host) = name.split_once('@').unwrap_or((name, ""));
    name.strip_prefix("godel-")?.parse().ok()
}

/// A member's fabric address from its transport address (`host:port`, a
/// name or an IP): the same host, the port + `config::FABRIC_PORT_OFFSET`.
pub fn peer_addr(raft_addr: &str) -> Option<String> {
    let (host, port) = raft_addr.rsplit_once(':')?;
    let port = port
        .parse::<u16>()
        .ok()?
        .checked_add(crate::config::FABRIC_PORT_OFFSET)?;
    Some(format!("{host}:{port}"))
}

/// Starts the node server listening on the configured fabric address.
pub(super) async fn start_server(
    node: &Node,
    cookie: String,
    tls: Option<&FabricTlsConfig>,
) -> anyhow::Result<ActorRef<NodeServerMessage>> {
    let addr = node
        .config()
        .fabric_listen_addr()
        .ok_or_else(|| anyhow::anyhow!("no fabric address (raft port + 100 overflows)"))?;
    let server = NodeServer::new(
        addr.port(),
        cookie,
        node_name(node.id()),
        addr.ip().to_string(),
        tls.map(FabricTlsConfig::incoming),
        // Dial only what membership names: Transitive would dial whatever
        // peers advertise (and never over TLS).
        Some(NodeConnectionMode::Isolated),
    )
    .with_listen_addr(addr.ip())
    .with_max_inbound_frame_size(MAX_FRAME_BYTES);
    let (server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| anyhow::anyhow!("fabric listener on {addr}: {e}"))?;
    tracing::info!(%addr, tls = tls.is_some(), "fabric listening");
    Ok(server)
}

/// Until shutdown: every [`RECONNECT_EVERY`], lists the authenticated
/// sessions, logs the ones that came up or went down, and dials each member
/// with a higher id than this node that has none (the lower id dials, so two
/// nodes never race to connect to each other).
pub(super) async fn keep_connected(
    node: Node,
    server: ActorRef<NodeServerMessage>,
    tls: Option<FabricTlsConfig>,
) {
    let shutdown = node.shutdown_token().clone();
    let mut up: BTreeSet<NodeId> = BTreeSet::new();
    let mut dials: BTreeMap<NodeId, u32> = BTreeMap::new();
    loop {
        let Some(now) = authenticated_peers(&server).await else {
            tracing::debug!("fabric node server did not list its sessions");
            if wait(&shutdown).await {
                return;
            }
            continue;
        };
        for id in now.difference(&up) {
            tracing::info!(peer = id, "fabric session up");
            dials.remove(id);
        }
        for id in up.difference(&now) {
            tracing::info!(peer = id, "fabric session down");
        }
        crate::metrics::global().fabric_peers.set(now.len() as i64);
        up = now;
        let (_, members) = node.members();
        for (id, info) in members {
            if id <= node.id() || up.contains(&id) {
                continue;
            }
            dial(&server, id, &info.raft_addr, tls.as_ref(), &mut dials).await;
        }
        if wait(&shutdown).await {
            return;
        }
    }
}

/// Sleeps one period; true if the node is shutting down.
async fn wait(shutdown: &tokio_util::sync::CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(RECONNECT_EVERY) => false,
    }
}

/// Node ids of the peers with an authenticated session.
async fn authenticated_peers(server: &ActorRef<NodeServerMessage>) -> Option<BTreeSet<NodeId>> {
    let sessions =
        ractor::call_t!(server, NodeServerMessage::GetSessions, SESSIONS_TIMEOUT_MS).ok()?;
    Some(
        sessions
            .values()
            .filter_map(|s| parse_node_name(&s.peer_name.as_ref()?.name))
            .collect(),
    )
}

/// Opens a session to member `id`. An Ok here only means TCP connected:
/// authentication finishes (or fails) later, which the next listing shows.
async fn dial(
    server: &ActorRef<NodeServerMessage>,
    id: NodeId,
    raft_addr: &str,
    tls: Option<&FabricTlsConfig>,
    dials: &mut BTreeMap<NodeId, u32>,
) {
    let Some(addr) = peer_addr(raft_addr) else {
        tracing::debug!(peer = id, raft_addr, "no fabric address for member");
        return;
    };
    let connect = async {
        match tls {
            None => ractor_cluster::client_connect(server, addr.clone()).await,
            Some(tls) => {
                let Some(name) = super::tls::server_name(&addr) else {
                    tracing::debug!(peer = id, %addr, "no TLS server name in the member's address");
                    return Ok(());
                };
                ractor_cluster::client_connect_enc(server, addr.clone(), tls.connector(), name)
                    .await
            }
        }
    };
    match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Ok(Ok(())) => {
            let n = dials.entry(id).or_insert(0);
            *n += 1;
            if *n == WARN_AFTER_DIALS {
                tracing::warn!(peer = id, %addr, "fabric sessions to this member never authenticate: do the nodes share the cluster secret (and, with [fabric.tls], a CA)?");
            } else {
                tracing::debug!(peer = id, %addr, "fabric dialed");
            }
        }
        Ok(Err(e)) => tracing::debug!(peer = id, %addr, error = %e, "fabric dial failed"),
        Err(_) => tracing::debug!(peer = id, %addr, "fabric dial timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(
            parse_node_name(&format!("{}@127.0.0.1", node_name(12))),
            Some(12)
        );
        assert_eq!(parse_node_name("other-1@h"), None);
        assert_eq!(
            peer_addr("127.0.0.1:7474").as_deref(),
            Some("127.0.0.1:7574")
        );
        assert_eq!(peer_addr("node-2:7474").as_deref(), Some("node-2:7574"));
        assert_eq!(peer_addr("[::1]:7474").as_deref(), Some("[::1]:7574"));
        assert_eq!(peer_addr("127.0.0.1:65500"), None);
        assert_eq!(peer_addr("nohost"), None);
    }
}
