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

/// A transport server that accepts every AppendEntries and records how
/// many entries each carried and how many bytes it was.
#[derive(Default)]
struct Follower {
    got: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl godel::transport::Handler for Follower {
    async fn handle(&self, _peer: u64, request: Vec<u8>) -> Vec<u8> {
        let reply = match codec::decode::<RpcRequest>(&request).unwrap() {
            RpcRequest::AppendEntries(rpc) => {
                self.got
                    .lock()
                    .unwrap()
                    .push((rpc.entries.len(), request.len()));
                RpcReply::AppendEntries(Ok(openraft::raft::AppendEntriesResponse::Success))
            }
            other => panic!("unexpected {other:?}"),
        };
        codec::encode(&reply).unwrap()
    }
}

/// Entries that together pass the transport's frame limit go in parts of
/// at most half a frame, each reported as a partial success up to its last
/// entry; openraft sends the rest next. Sent whole, the request was refused
/// before any I/O every time, and a follower catching up on big entries
/// never did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_entries_past_a_frame_go_in_parts() {
    use godel::fsm::{Batch, Command, Request, SubmitTask};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    bounded(TEST_BOUND, async {
        let secret = || Secret::new(SECRET.as_bytes());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let follower = std::sync::Arc::new(Follower::default());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(godel::transport::serve(
            listener,
            TransportConfig::new(2, secret()),
            Faults::default(),
            std::sync::Arc::clone(&follower),
            shutdown.clone(),
        ));
        let mut cfg = TransportConfig::new(1, secret());
        cfg.max_frame_bytes = 256 * 1024;
        let mut net = Network::new(Client::new(cfg, Faults::default()).unwrap(), 1);
        let info = NodeInfo {
            raft_addr: addr,
            api_addr: "127.0.0.1:1".into(),
            region: "local".into(),
        };
        let mut peer = RaftNetworkFactory::<TypeConfig>::new_client(&mut net, 2, &info).await;

        // 40 entries of 10 tasks with 2 KiB payloads: about 800 KiB.
        let log_id = |i: u64| LogId::new(CommittedLeaderId::new(1, 1), i);
        let entries: Vec<Entry<TypeConfig>> = (1..=40)
            .map(|i| {
                let submits = (0..10)
                    .map(|k| {
                        Command::Submit(SubmitTask {
                            tenant: "a".into(),
                            payload: format!(r#"{{"pad":"{}","k":{k}}}"#, "x".repeat(2048)),
                            ..Default::default()
                        })
                    })
                    .collect();
                Entry {
                    log_id: log_id(i),
                    payload: EntryPayload::Normal(Request::Batch(Batch::unaudited(1, i, submits))),
                }
            })
            .collect();
        let mut next = 0;
        while next < entries.len() {
            let rpc = AppendEntriesRequest {
                vote: Vote::new_committed(1, 1),
                prev_log_id: (next > 0).then(|| log_id(next as u64)),
                entries: entries[next..].to_vec(),
                leader_commit: None,
            };
            let sent = match peer
                .append_entries(rpc, RPCOption::new(CALL))
                .await
                .unwrap()
            {
                AppendEntriesResponse::Success => entries.len(),
                AppendEntriesResponse::PartialSuccess(Some(last)) => last.index as usize,
                other => panic!("{other:?}"),
            };
            assert!(sent > next, "no progress from entry {next}");
            next = sent;
        }
        let got = follower.got.lock().unwrap().clone();
        assert!(got.len() > 1, "sent whole: {got:?}");
        assert_eq!(got.iter().map(|(n, _)| n).sum::<usize>(), 40, "{got:?}");
        assert!(got.iter().all(|(_, bytes)| *bytes <= 128 * 1024), "{got:?}");
        shutdown.cancel();
        let _ = server.await;
    })
    .await;
}
