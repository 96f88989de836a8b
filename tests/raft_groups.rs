//! Raft messages carry their group over the shared node-to-node transport
//! (`docs/shards.md`, step 1): the meta group's travel as before, another
//! group's wrapped with its id. A node answers a group it does not host as
//! unreachable, which openraft treats as a peer that is down (it backs off),
//! and never hands such a message to the meta group's Raft.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use godel::codec;
use godel::raft::network::Network;
use godel::raft::rpc::{RpcReply, RpcRequest};
use godel::raft::{NodeInfo, TypeConfig};
use godel::transport::{Client, Faults, Secret, TransportConfig};
use openraft::Vote;
use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use support::{Cluster, SECRET, bounded};

const TEST_BOUND: Duration = Duration::from_secs(60);
const CALL: Duration = Duration::from_secs(5);

/// A transport client speaking as node 99, which is not a member.
fn client() -> Client {
    let cfg = TransportConfig::new(99, Secret::new(SECRET.as_bytes()));
    Client::new(cfg, Faults::default()).unwrap()
}

async fn call(c: &Client, target: u64, addr: &str, req: &RpcRequest) -> RpcReply {
    let bytes = c
        .call(target, addr, codec::encode(req).unwrap(), CALL)
        .await
        .unwrap();
    codec::decode(&bytes).unwrap()
}

/// A vote for term 0 from node 99: refused by value, never granted.
fn stale_vote() -> VoteRequest<u64> {
    VoteRequest::new(Vote::new(0, 99), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_are_routed_by_group() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        c.leader().await;
        let node = c.node(0);
        let addr = node.raft_addr.to_string();
        let cl = client();

        // The meta group's messages, unwrapped or wrapped with group 0,
        // reach its Raft (which refuses a stale vote by value).
        for req in [
            RpcRequest::Vote(stale_vote()),
            RpcRequest::Group {
                group: 0,
                request: Box::new(RpcRequest::Vote(stale_vote())),
            },
        ] {
            match call(&cl, node.id, &addr, &req).await {
                RpcReply::Vote(Ok(r)) => assert!(!r.vote_granted, "{r:?}"),
                other => panic!("{other:?}"),
            }
        }
        // Another group's, or a message that is not a group's: no such group.
        for (group, inner) in [
            (7, RpcRequest::Vote(stale_vote())),
            (0, RpcRequest::Ping),
            (3, RpcRequest::ReadIndex),
        ] {
            let req = RpcRequest::Group {
                group,
                request: Box::new(inner),
            };
            match call(&cl, node.id, &addr, &req).await {
                RpcReply::NoSuchGroup(g) => assert_eq!(g, group),
                other => panic!("group {group}: {other:?}"),
            }
        }

        // openraft's side: a group the peer does not host is unreachable.
        let info = NodeInfo {
            raft_addr: addr.clone(),
            api_addr: String::new(),
            region: "local".into(),
        };
        let mut net = Network::for_group(client(), 99, 7);
        let mut peer = RaftNetworkFactory::<TypeConfig>::new_client(&mut net, node.id, &info).await;
        let option = RPCOption::new(CALL);
        match peer.vote(stale_vote(), option).await {
            Err(RPCError::Unreachable(e)) => {
                assert!(e.to_string().contains("hosts no replica of group 7"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // The meta group's network reaches the Raft.
        let mut net = Network::new(client(), 99);
        let mut peer = RaftNetworkFactory::<TypeConfig>::new_client(&mut net, node.id, &info).await;
        match peer.vote(stale_vote(), RPCOption::new(CALL)).await {
            Ok(r) => assert!(!r.vote_granted, "{r:?}"),
            other => panic!("{other:?}"),
        }
    })
    .await;
}
