//! A node runs only the programs, reads only the secrets and calls only the
//! hosts its operator's config allows (OWASP API8, security
//! misconfiguration: the defaults are closed), checked where a gateway is
//! registered and again where it runs.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(120);

/// The probe's gateway: a shell line that records who ran it in `marker`.
fn probe(id: &str, marker: &Path) -> Value {
    json!({"id": id, "region": "local", "max_sessions": 4, "capabilities": ["probe"],
           "driver": {"kind": "command", "program": "/bin/sh",
                      "args": ["-c", format!("id -un > {}; echo '{{}}'", marker.display())]}})
}

/// With the default config, even the admin cannot register a command
/// gateway or point a gateway at the cluster secret or at a file: 400,
/// naming the config key, recorded as rejected; nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api8_default_config_runs_nothing_and_reads_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let r = admin.post(0, "/api/v1/gateways", &probe("probe", &marker)).await.unwrap();
        r.assert_error(400, "invalid_request");
        assert!(r.message().contains("[gateways.command] allow"), "{r:?}");
        let cases = [
            (json!({"env": "GODEL_CLUSTER_SECRET"}), "cluster secret"),
            (json!({"env": "HOME"}), "env_prefix"),
            (json!({"file": "/etc/passwd"}), "[secrets] dir"),
        ];
        for (reference, needle) in cases {
            let spec = json!({"id": "leak", "region": "local", "max_sessions": 1,
                "driver": {"kind": "http", "url": "http://127.0.0.1:9/", "auth_header": reference}});
            let r = admin.post(0, "/api/v1/gateways", &spec).await.unwrap();
            r.assert_error(400, "invalid_request");
            assert!(r.message().contains(needle), "{needle}: {r:?}");
        }
        let gws = admin.get_ok(0, "/api/v1/gateways").await;
        let ids: Vec<&str> = gws["items"].as_array().unwrap().iter().filter_map(|g| g["id"].as_str()).collect();
        assert!(!ids.contains(&"probe") && !ids.contains(&"leak"), "{gws}");
        let audit = admin
            .get_ok(0, "/api/v1/audit?action=gateways.register&outcome=rejected")
            .await;
        assert_eq!(audit["items"].as_array().unwrap().len(), 4, "{audit}");
        assert!(!marker.exists(), "nothing ran");
    })
    .await;
}

/// Hosts outside `[gateways] allow_hosts` are refused when it is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_call_only_allowed_hosts() {
    let c = Cluster::start_with(1, "[gateways]\nallow_hosts = [\"127.0.0.1\"]\n").await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let spec = |url: &str| {
            json!({"id": "h", "region": "local", "max_sessions": 1,
                                      "driver": {"kind": "http", "url": url}})
        };
        let r = admin
            .post(0, "/api/v1/gateways", &spec("http://example.com/run"))
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        assert!(r.message().contains("allow_hosts"), "{r:?}");
        let r = admin
            .post(0, "/api/v1/gateways", &spec("http://127.0.0.1:9/run"))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
    })
    .await;
}

/// The node that runs a gateway checks its own config: a command gateway
/// registered while `/bin/sh` was allowed does not run once the node's
/// config stops allowing it (restarted with an empty list), and the node
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_node_refuses_what_its_own_config_does_not_allow() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let mut c = Cluster::start_with(1, "[gateways.command]\nallow = [\"/bin/sh\"]\n").await;
    let api = c.api();
    bounded(TEST_BOUND, async {
        let r = api
            .post(0, "/api/v1/gateways", &probe("probe", &marker))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let agent =
            json!({"id": "probe-1", "gateway": "probe", "capabilities": ["probe"], "capacity": 1});
        assert_eq!(
            api.post(0, "/api/v1/agents", &agent).await.unwrap().status,
            201
        );
        // Allowed: it runs.
        let t = api
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "capabilities": ["probe"]}),
            )
            .await
            .unwrap();
        let id = t.body["id"].as_u64().unwrap();
        wait_until(
            "the allowed program runs",
            deadline(Duration::from_secs(20)),
            async || {
                let t = api.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
                if t["status"] == "completed" {
                    Ok(())
                } else {
                    anyhow::bail!("{t}")
                }
            },
        )
        .await;
        assert!(marker.exists());
        std::fs::remove_file(&marker).unwrap();
    })
    .await;
    assert!(c.terminate(0, Duration::from_secs(10)));
    c.edit_config(0, |t| t.replace("allow = [\"/bin/sh\"]", "allow = []"));
    c.restart(0);
    bounded(TEST_BOUND, async {
        c.leader().await;
        let log = wait_until(
            "the node refuses the driver",
            deadline(Duration::from_secs(20)),
            async || {
                let log = c.node(0).log_tail(400);
                if log.contains("cannot build the gateway's driver on this node") {
                    Ok(log)
                } else {
                    anyhow::bail!("not yet")
                }
            },
        )
        .await;
        assert!(log.contains("[gateways.command] allow"), "{log}");
        let r = api
            .post_retrying(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "capabilities": ["probe"], "idempotency_key": "after"}),
                deadline(Duration::from_secs(10)),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        // An absence: watched for a bounded while (the allowed run above
        // took well under a second).
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            assert!(!marker.exists(), "the refused program ran");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let id = r.body["id"].as_u64().unwrap();
        let t = api.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
        assert_ne!(t["status"], "completed", "{t}");
    })
    .await;
}
