//! Godel-managed gateways on running nodes: the node that owns a gateway
//! whose spec says `managed` runs its process itself. Here the process is
//! a small Python webhook (an `http` gateway). Tasks wait while it starts
//! (the gateway shows its process `starting`, health `degraded`); a
//! SIGKILL of the process is followed by a restart and the next task
//! completing on the new process; draining the owner stops the process
//! there and the new owner starts its own; SIGKILL of the owner node
//! re-places the gateway and it is started on a surviving node; a node
//! shut down stops it. A program not in `[gateways.command] allow` is
//! refused.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use support::work::completed;
use support::{Api, Cluster, bounded, deadline, free_port, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(150);

/// A webhook that answers every attempt with its own pid.
const WEBHOOK: &str = r#"
import http.server, json, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, body):
        b = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self): self.reply({"ok": True})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.reply({"pid": os.getpid()})
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// The real Python interpreter (not a shim), an absolute path.
fn python() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn gateway(api: &Api, i: usize) -> Value {
    api.get_ok(i, "/api/v1/gateways/gw-managed").await
}

/// Waits until the gateway's process runs on a node, and returns its pid
/// and owner.
async fn running(api: &Api, i: usize, not_pid: Option<u64>) -> (u64, u64) {
    wait_until(
        "the managed process to run",
        deadline(Duration::from_secs(40)),
        async || {
            let g = gateway(api, i).await;
            match g["process"]["pid"].as_u64() {
                Some(pid) if g["process"]["state"] == "running" && Some(pid) != not_pid => {
                    Ok((pid, g["owner"].as_u64().unwrap()))
                }
                _ => bail!("{g}"),
            }
        },
    )
    .await
}

/// Submits a task and returns the pid of the process that ran it.
async fn run_task(api: &Api, i: usize) -> u64 {
    let r = api
        .post(
            i,
            "/api/v1/tasks",
            &json!({"payload": {}, "capabilities": ["hook"]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_u64().unwrap();
    let t = completed(api, i, id, Duration::from_secs(40)).await;
    t["result"]["pid"].as_u64().expect("the webhook's pid")
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn godel_runs_restarts_moves_and_stops_a_managed_gateway() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("webhook.py");
    std::fs::write(&script, WEBHOOK).unwrap();
    let config = format!(
        "[queue]\nnode_heartbeat_interval = \"250ms\"\nnode_dead_after = \"2s\"\n\n\
         [gateways.command]\nallow = [{python:?}]\n"
    );
    let mut c = Cluster::start_with(3, &config).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let leader = c.leader().await;
        let port = free_port();
        let managed = json!({"command": [python, script, port.to_string()],
                             "probe_interval": "200ms", "max_retries": 5});
        let spec = json!({
            "id": "gw-managed", "region": "local", "max_sessions": 8, "capabilities": ["hook"],
            "driver": {"kind": "http", "url": format!("http://127.0.0.1:{port}/run"),
                       "health_url": format!("http://127.0.0.1:{port}/health")},
            "managed": managed,
        });

        // A program the nodes do not allow is refused, and nothing is set.
        let mut bad = spec.clone();
        bad["id"] = json!("gw-bad");
        bad["managed"]["command"][0] = json!("/bin/sh");
        let r = api.post(leader, "/api/v1/gateways", &bad).await.unwrap();
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.body.to_string().contains("managed.command"), "{r:?}");

        // Submitted before the gateway exists: it waits, then runs once
        // Godel has started the process and it answers.
        let r = api
            .post(leader, "/api/v1/tasks", &json!({"payload": {}, "capabilities": ["hook"]}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let early = r.body["id"].as_u64().unwrap();
        let r = api.post(leader, "/api/v1/gateways", &spec).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.body["process"]["state"], "starting", "{r:?}");
        let r = api
            .post(leader, "/api/v1/agents", &json!({"id": "hook-1", "gateway": "gw-managed", "capacity": 2, "capabilities": ["hook"]}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let (pid1, owner1) = running(&api, leader, None).await;
        assert!(alive(pid1), "pid {pid1} runs");
        let t = completed(&api, leader, early, Duration::from_secs(30)).await;
        assert_eq!(t["result"]["pid"], pid1, "{t}");
        assert_eq!(t["attempt_count"], 0, "no attempt failed while it started: {t}");

        // SIGKILL of the process: restarted, and the next task runs on
        // the new one.
        // SAFETY: kill(2) of a process this test's cluster started.
        unsafe { libc::kill(pid1 as i32, libc::SIGKILL) };
        let (pid2, _) = running(&api, leader, Some(pid1)).await;
        let g = gateway(&api, leader).await;
        assert!(g["process"]["restarts"].as_u64().unwrap() >= 1, "{g}");
        assert!(g["process"]["last_exit"].as_str().unwrap_or("").contains("9"), "{g}");
        assert_eq!(run_task(&api, leader).await, pid2);

        // Draining the owner: its process stops, the new owner starts one.
        let drain_via = (0..3).find(|&i| c.node(i).id != owner1).unwrap();
        let r = api
            .post(drain_via, &format!("/api/v1/admin/nodes/{owner1}/drain"), &json!({"force": true}))
            .await
            .unwrap();
        assert!(r.status == 200 || r.status == 202, "{r:?}");
        // All nodes share this host, so the new owner's process may start
        // while the old one still holds the port (and fail to bind, and be
        // started again): wait for the old one to stop, then a task runs
        // on the process the registry names.
        wait_until("the drained node's process to stop", deadline(Duration::from_secs(15)), async || {
            if alive(pid2) { bail!("pid {pid2} still runs") } else { Ok(()) }
        })
        .await;
        let ran = run_task(&api, drain_via).await;
        let (pid3, owner3) = running(&api, drain_via, Some(pid2)).await;
        assert_ne!(owner3, owner1, "moved off the drained node");
        assert_eq!(ran, pid3);

        // SIGKILL of the owner node: the gateway is placed on a live node
        // and started there (the process died with its node).
        let idx = (0..3).find(|&i| c.node(i).id == owner3).unwrap();
        let via = (0..3).find(|&i| i != idx && c.node(i).id != owner1).unwrap();
        c.kill9(idx);
        wait_until("the killed node's process to die with it", deadline(Duration::from_secs(10)), async || {
            if alive(pid3) { bail!("pid {pid3} still runs") } else { Ok(()) }
        })
        .await;
        let r = api
            .post(via, &format!("/api/v1/admin/nodes/{owner1}/undrain"), &json!({}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let (pid4, owner4) = running(&api, via, Some(pid3)).await;
        assert_ne!(owner4, owner3);
        assert_eq!(run_task(&api, via).await, pid4);

        // A node shut down (SIGTERM) stops the process it runs.
        let idx = (0..3).find(|&i| c.node(i).id == owner4).unwrap();
        c.terminate(idx, Duration::from_secs(20));
        wait_until("the stopped node's process to stop", deadline(Duration::from_secs(10)), async || {
            if alive(pid4) { bail!("pid {pid4} still runs") } else { Ok(()) }
        })
        .await;
    })
    .await;
}
