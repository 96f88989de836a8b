//! The audit log on a real node: state-changing calls and denials are
//! recorded with their outcome; `godel audit verify` walks the chain over
//! the API and, from a stopped node's data directory, offline; one byte
//! flipped in the stored snapshot is named by its seq.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{ADMIN_KEY, BIN, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(120);

/// Snapshots every 20 entries, so the entries below end up in one.
const CONFIG: &str = "[raft]\nheartbeat_interval = \"50ms\"\nelection_timeout_min = \"150ms\"\n\
                      election_timeout_max = \"300ms\"\nsnapshot_every_entries = 20\n\
                      keep_entries_after_snapshot = 5\n";

/// `godel ARGS` with the admin key; (exit code, stdout).
fn godel(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .env("GODEL_API_KEY", ADMIN_KEY)
        .args(args)
        .output()
        .expect("run godel");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_denials_are_chained_and_verified_online_and_offline() {
    let mut c = Cluster::start_with(1, CONFIG).await;
    let data = c.node(0).data_dir();
    let url = format!("http://{}", c.node(0).api_addr);
    let marker_seq = bounded(TEST_BOUND, async {
        let api = c.api();
        // A rejected call with a unique target, then enough traffic for
        // two snapshots after it.
        let r = api
            .post(0, "/api/v1/tasks/777777/cancel", &json!({}))
            .await
            .unwrap();
        r.assert_error(404, "not_found");
        let gw = json!({"id": "zz-marker", "region": "local", "max_sessions": 1, "driver": {"kind": "sim"}});
        assert_eq!(api.post(0, "/api/v1/gateways", &gw).await.unwrap().status, 201);
        for i in 0..50 {
            let r = api
                .post(0, "/api/v1/tasks", &json!({ "payload": { "i": i } }))
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{r:?}");
        }
        let anon = api.anonymous().get(0, "/api/v1/tasks").await.unwrap();
        assert_eq!(anon.status, 401);
        let log = wait_until(
            "the denial is recorded",
            deadline(Duration::from_secs(5)),
            async || {
                let page = api.get_ok(0, "/api/v1/audit?limit=1000").await;
                let items = page["items"].as_array().cloned().unwrap_or_default();
                if items
                    .iter()
                    .any(|e| e["outcome"] == "denied:unauthenticated")
                {
                    Ok(items)
                } else {
                    anyhow::bail!("not yet")
                }
            },
        )
        .await;
        let find = |f: &dyn Fn(&Value) -> bool| log.iter().find(|e| f(e)).cloned();
        let marker = find(&|e| e["target"] == "task/777777").expect("the cancel is recorded");
        assert_eq!(
            (
                marker["actor"].as_str(),
                marker["action"].as_str(),
                marker["outcome"].as_str()
            ),
            (
                Some("key:k_bootstrap"),
                Some("tasks.cancel"),
                Some("rejected:not_found")
            )
        );
        let submit = find(&|e| e["action"] == "tasks.submit").expect("submits are recorded");
        assert_eq!(submit["outcome"], "ok");
        assert!(submit["target"].as_str().unwrap().starts_with("task/"));
        let denied = find(&|e| e["outcome"] == "denied:unauthenticated").unwrap();
        assert!(
            denied["actor"]
                .as_str()
                .unwrap()
                .starts_with("anonymous@127.0.0.1"),
            "{denied}"
        );
        let gateway = find(&|e| e["target"] == "gateway/zz-marker")
            .unwrap_or_else(|| panic!("the registration: {log:?}"));
        assert_eq!(gateway["action"], "gateways.register");
        // Filters.
        let only = api.get_ok(0, "/api/v1/audit?action=tasks.cancel").await;
        assert_eq!(only["items"].as_array().unwrap().len(), 1, "{only}");
        // Over the API.
        let (code, out) = godel(&["--api", &url, "audit", "verify"]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("audit chain verified"), "{out}");
        gateway["seq"].as_u64().unwrap()
    })
    .await;
    assert!(
        c.terminate(0, Duration::from_secs(10)),
        "the node stops cleanly"
    );

    // Offline, from the data directory.
    let dir = data.to_string_lossy().into_owned();
    let (code, out) = godel(&["audit", "verify", "--data-dir", &dir]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit chain verified"), "{out}");

    flip_a_byte_of(&data.join("raft"), b"gateway/zz-marker");
    let (code, out) = godel(&["audit", "verify", "--data-dir", &dir]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("audit chain broken at seq {marker_seq}:")),
        "verify names exactly the changed entry ({marker_seq}): {out}"
    );
}

/// Flips one bit of the first occurrence of `needle` in the stored
/// snapshot of the meta group (its payload file, `godel-snapshots/g0-*.snap`
/// in the store's directory: `src/store/db.rs`), as a tampered or damaged
/// disk would.
fn flip_a_byte_of(raft_dir: &Path, needle: &[u8]) {
    let dir = raft_dir.join("godel-snapshots");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the snapshot directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("g0-") && name.ends_with(".snap")
        })
        .collect();
    assert_eq!(files.len(), 1, "one snapshot of the meta group: {files:?}");
    let mut data = std::fs::read(&files[0]).unwrap();
    let at = data
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the marked entry is in the snapshot");
    data[at] ^= 0x20; // `g` becomes `G`
    std::fs::write(&files[0], data).unwrap();
}
