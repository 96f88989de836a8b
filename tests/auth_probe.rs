//! The door: what an anonymous client tried before authentication existed
//! (run any program, read secrets, change membership, read every tenant)
//! now fails at every step; and the two-command start still works with no
//! config at all, the CLI finding the bootstrap key by itself.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{BIN, Cluster, bounded};

const TEST_BOUND: Duration = Duration::from_secs(120);

/// Every step of the probe, anonymously: 401 each, nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anonymous_probe_fails_at_every_step() {
    let c = Cluster::start_with(1, "[auth.rate]\nauth_failures_burst = 1000\n").await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let anon = admin.anonymous();
        let steps: [(&str, &str, Value); 11] = [
            ("POST", "/api/v1/gateways", json!({"id": "probe", "region": "local", "max_sessions": 1,
                "driver": {"kind": "command", "program": "sh", "args": ["-c", "id -un"]}})),
            ("POST", "/api/v1/agents", json!({"id": "probe-1", "gateway": "probe"})),
            ("POST", "/api/v1/tasks", json!({"payload": {}})),
            ("POST", "/api/v1/gateways", json!({"id": "leak", "region": "local", "max_sessions": 1,
                "driver": {"kind": "http", "url": "http://127.0.0.1:9/", "auth_header": {"env": "GODEL_CLUSTER_SECRET"}}})),
            ("POST", "/api/v1/cluster/leave", json!({"id": 1})),
            ("POST", "/api/v1/cluster/transfer-leader", json!({"to": 1})),
            ("POST", "/api/v1/admin/nodes/1/drain", json!({"force": true})),
            ("POST", "/api/v1/tasks/1/cancel", json!({})),
            ("POST", "/api/v1/dead-letter/replay", json!({"tenant": "default"})),
            ("GET", "/api/v1/tasks?tenant=default", Value::Null),
            ("GET", "/api/v1/gateways", Value::Null),
        ];
        for (method, path, body) in &steps {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let body = (!body.is_null()).then_some(body);
            let r = anon.request(m, 0, path, body).await.unwrap();
            r.assert_error(401, "unauthenticated");
        }
        // The deprecated alias is guarded the same way.
        anon.get(0, "/api/tasks").await.unwrap().assert_error(401, "unauthenticated");
        // Nothing changed.
        let gws = admin.get_ok(0, "/api/v1/gateways").await;
        let ids: Vec<&str> = gws["items"].as_array().unwrap().iter().filter_map(|g| g["id"].as_str()).collect();
        assert!(!ids.contains(&"probe") && !ids.contains(&"leak"), "{gws}");
        assert_eq!(admin.get_ok(0, "/api/v1/tasks").await["items"], json!([]));
        let cluster = admin.get_ok(0, "/api/v1/cluster").await;
        assert_eq!(cluster["members"].as_array().unwrap().len(), 1, "{cluster}");
        // A developer cannot change membership either.
        let r = admin
            .post(0, "/api/v1/api-keys", &json!({"name": "d", "role": "developer", "tenant": "acme"}))
            .await
            .unwrap();
        let dev = admin.with_key(r.body["key"].as_str().unwrap());
        dev.post(0, "/api/v1/cluster/leave", &json!({"id": 1})).await.unwrap().assert_error(403, "forbidden");
    })
    .await;
}

/// A free port on 127.0.0.1 whose +100 neighbour (the fabric's) is free.
fn free_port_pair(taken: &[u16]) -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        // Neither port of the pair may be one already handed out (the
        // listeners are gone by then, so the OS may offer one again).
        let clash = taken
            .iter()
            .any(|&t| [p, p + 100].contains(&t) || t + 100 == p);
        if p < 65_000 && !clash && TcpListener::bind(("127.0.0.1", p + 100)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(dir: &Path, api: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .current_dir(dir)
        .env_remove("GODEL_API_KEY")
        .args(["--api", api])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// README's first command, `godel serve` with no config, writes its admin
/// key to `./data/admin.key` (0600), logs the path and never the key, and
/// the CLI run from the same directory uses it with no flag.
#[test]
fn no_config_start_bootstraps_a_key_the_cli_finds() {
    let dir = tempfile::tempdir().unwrap();
    let api_port = free_port_pair(&[]);
    let raft_port = free_port_pair(&[api_port]);
    let api = format!("http://127.0.0.1:{api_port}");
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let _node = Serve(
        Command::new(BIN)
            .current_dir(dir.path())
            .env("NO_COLOR", "1")
            .env_remove("GODEL_API_KEY")
            .args(["serve", "--api-addr", &format!("127.0.0.1:{api_port}")])
            .args(["--raft-addr", &format!("127.0.0.1:{raft_port}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let key_file = dir.path().join("data/admin.key");
    let until = Instant::now() + Duration::from_secs(30);
    while !key_file.exists() {
        assert!(
            Instant::now() < until,
            "no data/admin.key after 30 s; serve.log:\n{}",
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin.key mode {mode:o}");
    }
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(key.starts_with("dk_live_") && key.len() >= 8 + 43, "{key}");
    let submitted = Instant::now() + Duration::from_secs(30);
    let task = loop {
        let (code, out) = cli(
            dir.path(),
            &api,
            &["-o", "json", "task", "submit", "--payload", "{\"hi\":1}"],
        );
        if code == 0 {
            break serde_json::from_str::<Value>(&out).unwrap();
        }
        assert!(Instant::now() < submitted, "submit kept failing: {out}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(task["tenant"], "default");
    let id = task["id"].as_u64().unwrap().to_string();
    let done = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out) = cli(dir.path(), &api, &["-o", "json", "task", "get", &id]);
        assert_eq!(code, 0, "{out}");
        if out.contains("\"completed\"") {
            break;
        }
        assert!(
            Instant::now() < done,
            "the simulated gateway did not complete it: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Without the key file, the CLI says how to authenticate.
    let elsewhere = tempfile::tempdir().unwrap();
    let (code, out) = cli(elsewhere.path(), &api, &["task", "ls"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("401") && out.contains("--api-key"), "{out}");
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("admin.key"), "the log names the file");
    assert!(!log.contains(&key), "the log never holds the key");
}
