//! The actor fabric against real `godel serve` processes on 127.0.0.1. Run
//! with `cargo test --test fabric -- --test-threads=1`.
//!
//! What they prove:
//!
//! - with the fabric on, the nodes open authenticated sessions to each
//!   other, the leader hints the followers' agents about the leases it
//!   commits for them, the followers start attempts from those hints before
//!   their replicas apply the grants, and every task completes once;
//! - with the fabric off on every node, the same work completes: hints are
//!   only a shortcut;
//! - with `[fabric.tls]`, the sessions come up over mutual TLS and hints
//!   flow the same way; a node whose TLS files are unusable refuses to
//!   start, naming the file.

// Each target that includes the harness uses a different subset of it.
#[allow(dead_code)]
mod support;

#[allow(dead_code)]
#[path = "runtime/fleet.rs"]
mod fleet;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use fleet::{by_status, register_fleet, sim_gateway, submit_marked, wait_completed, wait_placed};
use serde_json::json;
use support::{Api, Cluster, bounded, deadline, wait_until};

/// Node heartbeats as the runtime tests use them; a lease long enough that
/// none lapses on a busy machine.
const QUEUE: &str = "[queue]\nnode_heartbeat_interval = \"250ms\"\n\
                     node_dead_after = \"5s\"\ndefault_lease = \"30s\"\n";

/// Tasks per test.
const TASKS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_hints_followers_and_every_task_completes() {
    let c = Cluster::start_with(3, QUEUE).await;
    bounded(Duration::from_secs(120), async {
        let api = c.api();
        wait_sessions(&api, 2).await;
        let (leader, followers) = run_fleet(&c, "fab-on").await;
        let sent = api.metric(leader, "godel_fabric_hints_sent_total").await;
        let mut received = 0.0;
        let mut started = 0.0;
        for &f in &followers {
            received += api.metric(f, "godel_fabric_hints_received_total").await;
            started += api.metric(f, "godel_fabric_hinted_attempts_total").await;
        }
        eprintln!("[test] hints sent {sent}, received {received}, started ahead {started}");
        print_dispatch(&api, &followers, "fabric on").await;
        assert!(sent > 0.0, "the leader sent no hint");
        assert!(received > 0.0, "no follower received a hint");
        assert!(
            started > 0.0,
            "no follower started an attempt from a hint ahead of its replica"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_complete_with_the_fabric_disabled() {
    let extra = format!("{QUEUE}\n[fabric]\nenabled = false\n");
    let c = Cluster::start_with(3, &extra).await;
    bounded(Duration::from_secs(120), async {
        let api = c.api();
        let (leader, followers) = run_fleet(&c, "fab-off").await;
        assert_eq!(
            api.metric(leader, "godel_fabric_hints_sent_total").await,
            0.0
        );
        for &f in &followers {
            assert_eq!(
                api.metric(f, "godel_fabric_hints_received_total").await,
                0.0
            );
            assert_eq!(api.metric(f, "godel_fabric_peers").await, 0.0);
        }
        print_dispatch(&api, &followers, "fabric off").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hints_flow_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, _) = issue_certs(dir.path());
    let extra = format!("{QUEUE}\n{tls}");
    let c = Cluster::start_with(3, &extra).await;
    bounded(Duration::from_secs(120), async {
        let api = c.api();
        wait_sessions(&api, 2).await;
        for i in 0..c.len() {
            assert!(
                c.node(i).log_tail(400).contains("fabric listening")
                    && c.node(i).log_tail(400).contains("tls=true"),
                "node index {i} did not listen with TLS:\n{}",
                c.node(i).log_tail(40)
            );
        }
        let (_, followers) = run_fleet(&c, "fab-tls").await;
        let mut received = 0.0;
        for &f in &followers {
            received += api.metric(f, "godel_fabric_hints_received_total").await;
        }
        assert!(received > 0.0, "no follower received a hint over TLS");
    })
    .await;
}

#[test]
fn unusable_tls_files_stop_the_node_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, files) = issue_certs(dir.path());
    // The key file exists (so the config parses and validates) but holds
    // no key: loading it must fail and the node must not start.
    std::fs::write(&files.key, "not a key\n").unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ndata_dir = {:?}\napi_addr = \"127.0.0.1:0\"\nraft_addr = \"127.0.0.1:0\"\n{tls}",
            dir.path().join("data")
        ),
    )
    .unwrap();
    // Bounded: a node that does start is killed (by PID) after 30 s.
    let log = dir.path().join("serve.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_godel"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > give_up {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "node started with a bad key:\n{text}"
    );
    assert!(text.contains("fabric.tls.key"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "the node opened its data directory before checking TLS"
    );
}

/// Writes a CA and one certificate for 127.0.0.1 signed by it (shared by
/// every node of a test cluster, as all listen on 127.0.0.1) into `dir`;
/// returns the `[fabric.tls]` table naming them, and the files.
fn issue_certs(dir: &std::path::Path) -> (String, godel::config::TlsFiles) {
    let files = support::certs::Ca::new(dir, "godel test fabric").issue("node", &["127.0.0.1"]);
    let (c, k, a) = (&files.cert, &files.key, &files.ca);
    let table = format!("[fabric.tls]\ncert = {c:?}\nkey = {k:?}\nca = {a:?}\n");
    (table, files)
}

/// Registers six `sim` gateways with two agents each, checks that some are
/// placed on followers, submits [`TASKS`] tasks through every node and waits
/// until all complete. Returns the leader's index and the followers'.
async fn run_fleet(c: &Cluster, prefix: &'static str) -> (usize, Vec<usize>) {
    let api = c.api();
    let leader = c.leader().await;
    let specs: Vec<_> = (0..6)
        .map(|k| {
            let latency = json!({ "dist": "uniform", "min": "2ms", "max": "8ms" });
            sim_gateway(&format!("sim-{k}"), latency)
        })
        .collect();
    let ids = register_fleet(&api, leader, &specs, 2, 4).await;
    let placed = wait_placed(&api, leader, &ids).await;
    let leader_id = c.node(leader).id;
    let followers: Vec<usize> = (0..c.len()).filter(|i| *i != leader).collect();
    let on_followers = placed.values().filter(|n| **n != leader_id).count();
    eprintln!("[test] leader node {leader_id}, placement {placed:?}");
    assert!(
        on_followers > 0,
        "every gateway landed on the leader: {placed:?}"
    );
    // Give the followers' agent actors a moment to exist, so the first
    // hints find them (a hint without an actor is only dropped).
    wait_agents(c, &followers, &placed).await;
    let all: Vec<usize> = (0..c.len()).collect();
    let acked = submit_marked(api.clone(), all, prefix, TASKS, "medium").await;
    assert_eq!(acked.len(), TASKS);
    wait_completed(&api, leader, TASKS, Duration::from_secs(60)).await;
    let s = by_status(&api, leader).await;
    assert_eq!(s["completed"].as_u64(), Some(TASKS as u64), "{s}");
    (leader, followers)
}

/// Waits until each follower's log shows the actors of the agents of the
/// gateways placed on it.
async fn wait_agents(c: &Cluster, followers: &[usize], placed: &BTreeMap<String, u64>) {
    for &f in followers {
        let id = c.node(f).id;
        let agents: Vec<String> = placed
            .iter()
            .filter(|(_, n)| **n == id)
            .flat_map(|(g, _)| [format!("{g}.a0"), format!("{g}.a1")])
            .collect();
        fleet::wait_agents_started(c, f, &agents).await;
    }
}

/// Waits until every node has `peers` authenticated fabric sessions.
async fn wait_sessions(api: &Api, peers: u64) {
    for i in 0..api.len() {
        wait_until(
            "fabric sessions up",
            deadline(Duration::from_secs(20)),
            async || {
                let n = api.metric(i, "godel_fabric_peers").await;
                if n as u64 == peers {
                    Ok(())
                } else {
                    bail!("node index {i} has {n} fabric peers")
                }
            },
        )
        .await;
    }
}

/// Prints the followers' submit-to-attempt-start times (bucket counts of
/// `godel_dispatch_seconds`): a figure, not an assertion.
async fn print_dispatch(api: &Api, followers: &[usize], what: &str) {
    for &f in followers {
        let count = api.metric(f, "godel_dispatch_seconds_count").await;
        let sum = api.metric(f, "godel_dispatch_seconds_sum").await;
        if count > 0.0 {
            eprintln!(
                "[test] {what}: node index {f}: {count} attempts, mean submit-to-start {:.1} ms",
                sum / count * 1000.0
            );
        }
    }
}
