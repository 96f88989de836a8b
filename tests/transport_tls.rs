//! Mutual TLS on the node-to-node transport (`[cluster.tls]`).
//!
//! In process: peers with certificates from one CA talk (and reuse their
//! connections), a peer from another CA is refused in either direction, a
//! certificate that does not name the dialed address is refused, and a
//! plaintext peer on a TLS port (or the reverse) fails at once while the
//! server keeps serving. As processes: a three-node TLS cluster commits, a
//! node with another CA's certificate can neither join it nor, listed as a
//! member, take part in its votes.
//!
//! Every test is bounded in time and its processes are killed by PID.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use godel::config::TlsFiles;
use godel::tls::MutualTls;
use godel::transport::{Client, Faults, Handler, Secret, TransportConfig, TransportError, serve};
use support::certs::Ca;
use support::{Cluster, bounded, deadline, task_body, wait_until};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-cluster-secret-0123456789";
const CALL: Duration = Duration::from_secs(2);
const BOUND: Duration = Duration::from_secs(30);
const CLUSTER_BOUND: Duration = Duration::from_secs(120);

/// `[cluster.tls]` for these files.
fn tls_table(files: &TlsFiles) -> String {
    format!(
        "[cluster.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        files.cert, files.key, files.ca
    )
}

/// Echoes `<peer>:<request>`; `sleep:<ms>` answers after that long.
#[derive(Default)]
struct Echo {
    calls: AtomicUsize,
    /// Handler runs dropped before they finished.
    abandoned: AtomicUsize,
}

struct Running<'a>(&'a Echo, bool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Handler for Echo {
    async fn handle(&self, peer: u64, request: Vec<u8>) -> Vec<u8> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut running = Running(self, false);
        let text = String::from_utf8_lossy(&request).into_owned();
        if let Some(ms) = text.strip_prefix("sleep:") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        running.1 = true;
        format!("{peer}:{text}").into_bytes()
    }
}

fn config(node_id: u64, tls: Option<&TlsFiles>) -> TransportConfig {
    let mut config = TransportConfig::new(node_id, Secret::new(SECRET));
    config.connect_timeout = Duration::from_secs(1);
    config.shutdown_grace = Duration::from_millis(300);
    config.tls = tls.map(|files| MutualTls::load(files, "cluster.tls").unwrap());
    config
}

/// A transport server on 127.0.0.1, stopped on drop.
struct Server {
    addr: String,
    echo: Arc<Echo>,
    shutdown: CancellationToken,
}

impl Server {
    async fn start(config: TransportConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let echo = Arc::new(Echo::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            config,
            Faults::new(),
            Arc::clone(&echo),
            shutdown.clone(),
        ));
        Server {
            addr,
            echo,
            shutdown,
        }
    }

    fn calls(&self) -> usize {
        self.echo.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn client(config: TransportConfig) -> Client {
    Client::new(config, Faults::new()).unwrap()
}

/// A call from a client with `from` to node `to` served by `server`, which
/// TLS must refuse before the handler runs; the error.
async fn refused_by_tls(from: TransportConfig, to: u64, server: &Server) -> TransportError {
    let e = client(from)
        .call(to, &server.addr, b"hello".to_vec(), CALL)
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Tls { .. }), "{e}");
    assert_eq!(server.calls(), 0);
    e
}

/// A call from a client with `from` to node `to` served by `server` that
/// must fail at once (well within its 10 s budget), not time out.
async fn fails_fast(from: TransportConfig, to: u64, server: &Server) {
    let started = Instant::now();
    let e = client(from)
        .call(to, &server.addr, b"hello".to_vec(), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(!matches!(e, TransportError::Timeout { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{e} after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn peers_of_one_ca_talk_over_tls_and_reuse_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let (one, two) = (
        ca.issue("n1", &["127.0.0.1"]),
        ca.issue("n2", &["127.0.0.1"]),
    );
    bounded(BOUND, async {
        let server = Server::start(config(1, Some(&one))).await;
        let client = client(config(2, Some(&two)));
        for i in 0..3 {
            let reply = client
                .call(1, &server.addr, format!("hi{i}").into_bytes(), CALL)
                .await
                .unwrap();
            assert_eq!(reply, format!("2:hi{i}").into_bytes());
        }
        assert_eq!(client.idle_connections(1, &server.addr), 1);
        // A caller that gives up: the server sees the hangup through TLS
        // and drops the handler.
        let e = client
            .call(
                1,
                &server.addr,
                b"sleep:5000".to_vec(),
                Duration::from_millis(300),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
        let until = Instant::now() + Duration::from_secs(5);
        while server.echo.abandoned.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < until, "the hangup was never noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reply = client.call(1, &server.addr, b"after".to_vec(), CALL).await;
        assert_eq!(reply.unwrap(), b"2:after".to_vec());
    })
    .await;
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Ca::new(dir.path(), "ours");
    let theirs = Ca::new(dir.path(), "theirs");
    let (good, rogue) = (
        ours.issue("n1", &["127.0.0.1"]),
        theirs.issue("n9", &["127.0.0.1"]),
    );
    bounded(BOUND, async {
        let server = Server::start(config(1, Some(&good))).await;
        let e = refused_by_tls(config(9, Some(&rogue)), 1, &server).await;
        assert!(!e.is_retryable());

        let rogue_server = Server::start(config(9, Some(&rogue))).await;
        let e = refused_by_tls(config(1, Some(&good)), 9, &rogue_server).await;
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn a_certificate_that_does_not_name_the_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let elsewhere = ca.issue("n1", &["node-1.internal"]);
    let two = ca.issue("n2", &["127.0.0.1"]);
    bounded(BOUND, async {
        let server = Server::start(config(1, Some(&elsewhere))).await;
        let e = refused_by_tls(config(2, Some(&two)), 1, &server).await;
        assert!(e.to_string().contains("not valid for name"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn plaintext_and_tls_peers_fail_fast_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ours");
    let (one, two) = (
        ca.issue("n1", &["127.0.0.1"]),
        ca.issue("n2", &["127.0.0.1"]),
    );
    bounded(BOUND, async {
        let tls_server = Server::start(config(1, Some(&one))).await;
        fails_fast(config(2, None), 1, &tls_server).await;
        let ok = client(config(2, Some(&two)))
            .call(1, &tls_server.addr, b"still".to_vec(), CALL)
            .await;
        assert_eq!(ok.unwrap(), b"2:still".to_vec());

        let plain_server = Server::start(config(1, None)).await;
        fails_fast(config(2, Some(&two)), 1, &plain_server).await;
        assert_eq!(plain_server.calls(), 0);
    })
    .await;
}

/// Submits a task on node `i`; its id.
async fn submit(c: &Cluster, i: usize, n: usize) -> anyhow::Result<String> {
    let r = c
        .api()
        .post(i, "/api/v1/tasks", &task_body("t", "high", n, None))
        .await?;
    if r.status != 201 && r.status != 200 {
        bail!("submit on node {}: {r:?}", c.node(i).id);
    }
    r.body["id"]
        .as_u64()
        .map(|id| id.to_string())
        .ok_or_else(|| anyhow!("no id in {:?}", r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_commits_and_a_node_from_another_ca_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Ca::new(dir.path(), "ours");
    let theirs = Ca::new(dir.path(), "theirs");
    let good = tls_table(&ours.issue("node", &["127.0.0.1"]));
    let rogue = tls_table(&theirs.issue("node", &["127.0.0.1"]));
    bounded(CLUSTER_BOUND, async {
        let mut c = Cluster::start_with(3, &good).await;
        let leader = c.leader().await;
        let id = submit(&c, (leader + 1) % 3, 1).await.unwrap();
        for i in 0..3 {
            c.wait_caught_up(i, Duration::from_secs(20)).await;
            let t = c
                .api()
                .get(i, &format!("/api/v1/tasks/{id}"))
                .await
                .unwrap();
            assert_eq!(t.status, 200, "node {}: {t:?}", c.node(i).id);
        }

        let j = c.start_joining_with(leader, &rogue);
        let rogue_id = c.node(j).id;
        wait_until(
            "the rogue node's join to be refused for TLS",
            deadline(Duration::from_secs(30)),
            async || {
                let log = std::fs::read_to_string(c.node(j).log_path())?;
                if log.contains("join refused") && log.contains("TLS") {
                    Ok(())
                } else {
                    bail!("no refusal yet")
                }
            },
        )
        .await;
        let leader_log = std::fs::read_to_string(c.node(leader).log_path()).unwrap();
        assert!(
            leader_log.contains("cannot reach over the transport"),
            "{leader_log}"
        );
        let cluster = c.api().cluster(leader).await.unwrap();
        let text = cluster.to_string();
        assert!(
            !cluster["members"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["id"] == rogue_id),
            "the rogue node became a member: {text}"
        );
        // The cluster goes on committing.
        submit(&c, leader, 2).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_cas_certificate_never_votes() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Ca::new(dir.path(), "ours");
    let theirs = Ca::new(dir.path(), "theirs");
    let good = tls_table(&ours.issue("node", &["127.0.0.1"]));
    let rogue = tls_table(&theirs.issue("node", &["127.0.0.1"]));
    bounded(CLUSTER_BOUND, async {
        let mut c = Cluster::start_with(3, &good).await;
        let api = c.api();
        let leader = c.leader().await;
        // A follower comes back with a certificate from another CA: it hears
        // no heartbeats and asks the others for a pre-vote again and again;
        // nobody hears it, so it never campaigns (its term stays) and the
        // others are never disturbed.
        let f = (leader + 1) % 3;
        assert!(
            c.terminate(f, Duration::from_secs(10)),
            "node stops on SIGTERM"
        );
        c.edit_config(f, |text| text.replace(&good, &rogue));
        c.restart(f);
        let before = api.cluster(leader).await.unwrap();
        let term = before["term"].as_u64().unwrap();
        let rogue_id = c.node(f).id;
        wait_until(
            "the rogue follower's pre-votes to be denied",
            deadline(Duration::from_secs(20)),
            async || {
                api.cluster(f).await?; // up and answering
                let denied = api
                    .metric(f, "godel_raft_prevotes_total{result=\"denied\"}")
                    .await;
                if denied >= 5.0 {
                    Ok(())
                } else {
                    bail!("node {rogue_id}: {denied} pre-votes denied")
                }
            },
        )
        .await;
        let s = api.cluster(f).await.unwrap();
        assert!(
            s["term"].as_u64() <= Some(term),
            "the rogue node campaigned: {s}"
        );
        assert_ne!(s["state"], "leader", "{s}");
        let id = submit(&c, leader, 7).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        for i in (0..3).filter(|&i| i != f) {
            let s = api.cluster(i).await.unwrap();
            assert_eq!(
                s["term"].as_u64(),
                Some(term),
                "node {} was disturbed: {s}",
                i + 1
            );
            assert_eq!(s["leader"], before["node_id"], "{s}");
            let t = api.get(i, &format!("/api/v1/tasks/{id}")).await.unwrap();
            assert_eq!(t.status, 200, "{t:?}");
        }
        // The rogue node cannot serve reads (it cannot reach the leader for
        // a read index) and never received the new entry; it still has not
        // campaigned.
        let s = api.cluster(f).await.unwrap();
        assert!(
            s["term"].as_u64() <= Some(term),
            "the rogue node campaigned: {s}"
        );
        let there = api.get(f, &format!("/api/v1/tasks/{id}")).await.unwrap();
        assert_eq!(there.status, 503, "{there:?}");
        let applied = |s: &serde_json::Value| s["applied_index"].as_u64().unwrap_or(0);
        let (mine, leaders) = (
            applied(&api.cluster(f).await.unwrap()),
            applied(&api.cluster(leader).await.unwrap()),
        );
        assert!(mine < leaders, "rogue applied {mine}, leader {leaders}");
        let log = std::fs::read_to_string(c.node(leader).log_path()).unwrap();
        assert!(log.contains("TLS handshake failed"), "{log}");
    })
    .await;
}
