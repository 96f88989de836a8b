//! The `godel` CLI against a real one-node cluster: every client command
//! runs, `--output json` prints the API's JSON, and errors exit non-zero.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use support::{Api, BIN, Cluster, deadline, wait_until};

/// Runs `godel --api URL -o json ARGS`; returns (exit code, parsed stdout).
fn godel(api: &str, args: &[&str]) -> (i32, Value) {
    let out = Command::new(BIN)
        .env("GODEL_API_KEY", support::ADMIN_KEY)
        .args(["--api", api, "-o", "json"])
        .args(args)
        .output()
        .expect("run godel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|_| Value::String(stdout.to_string()));
    (out.status.code().unwrap_or(-1), value)
}

fn ok(api: &str, args: &[&str]) -> Value {
    let (code, v) = godel(api, args);
    assert_eq!(code, 0, "godel {args:?} failed: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_command_works_with_json_output() {
    let c = Cluster::start_with(1, "[gateways.command]\nallow = [\"/bin/sleep\"]\n").await;
    let api = format!("http://{}", c.node(0).api_addr);
    let api = api.as_str();
    tokio::task::spawn_blocking({
        let api = api.to_owned();
        move || cli_session(&api)
    })
    .await
    .expect("cli session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_commands_submit_and_report_many() {
    let c = Cluster::start(1).await;
    let api = format!("http://{}", c.node(0).api_addr);
    tokio::task::spawn_blocking(move || batch_session(&api))
        .await
        .expect("cli session");
}

fn batch_session(api: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let tasks = dir.path().join("tasks.jsonl");
    std::fs::write(
        &tasks,
        concat!(
            "{\"payload\": {\"n\": 1}, \"priority\": \"high\", \"idempotency_key\": \"a\"}\n",
            "\n",
            "{\"payload\": {\"n\": 2}, \"idempotency_key\": \"b\"}\n",
        ),
    )
    .expect("write tasks");
    let tasks = tasks.to_str().expect("utf-8 path");
    let r = ok(api, &["task", "submit-batch", "--file", tasks]);
    assert_eq!(
        (r["created"].as_u64(), r["failed"].as_u64()),
        (Some(2), Some(0)),
        "{r}"
    );
    assert_eq!(r["items"][0]["task"]["priority"], "high", "{r}");
    // Again: the same tasks, by their keys.
    let again = ok(api, &["task", "submit-batch", "--file", tasks]);
    assert_eq!(again["existing"], 2, "{again}");
    assert_eq!(again["items"][1]["task"]["id"], r["items"][1]["task"]["id"]);
    // A refused item: exit 2, the rest submitted.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"payload": {"n": 3}}, {"payload": {}, "parent_id": 999999}]"#,
    )
    .expect("write");
    let (code, v) = godel(
        api,
        &["task", "submit-batch", "--file", bad.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{v}");
    assert_eq!(
        (v["created"].as_u64(), v["failed"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    // Not JSON, or empty: nothing sent.
    let junk = dir.path().join("junk.jsonl");
    std::fs::write(&junk, "{\"payload\": {}}\nnot json\n").expect("write");
    let (code, _) = godel(
        api,
        &["task", "submit-batch", "--file", junk.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    std::fs::write(&junk, "\n").expect("write");
    let (code, _) = godel(
        api,
        &["task", "submit-batch", "--file", junk.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert_eq!(ok(api, &["queue", "depth"])["pending"], 3);

    let leases = ok(api, &["lease", "acquire", "--agent", "w1", "--max", "3"]);
    let tokens: Vec<u64> = leases["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| l["fencing_token"].as_u64().expect("token"))
        .collect();
    assert_eq!(tokens.len(), 3, "{leases}");
    let report = dir.path().join("report.jsonl");
    std::fs::write(
        &report,
        format!(
            "{{\"fencing_token\": {}, \"result\": {{\"ok\": true}}}}\n{{\"fencing_token\": {}, \"error\": \"boom\", \"retryable\": false}}\n{{\"fencing_token\": {}}}\n",
            tokens[0], tokens[1], tokens[2]
        ),
    )
    .expect("write report");
    let r = ok(
        api,
        &["lease", "report", "--file", report.to_str().unwrap()],
    );
    assert_eq!(r["done"], 3, "{r}");
    assert_eq!(r["items"][0]["task"]["status"], "completed", "{r}");
    assert_eq!(r["items"][1]["task"]["status"], "dead_letter", "{r}");
    // Reported twice: each item refused, exit 2; text lists every item.
    let (code, out, _) = godel_text(
        api,
        &["lease", "report", "--file", report.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{out}");
    assert_eq!(out.matches("409").count(), 3, "{out}");
    assert!(out.contains("done 0, failed 3"), "{out}");
}

fn cli_session(api: &str) {
    let t = ok(
        api,
        &[
            "task",
            "submit",
            "--payload",
            r#"{"p":1}"#,
            "--priority",
            "high",
            "--tenant",
            "acme",
        ],
    );
    assert_eq!(t["priority"], "high");
    assert_eq!(t["payload"]["p"], 1);
    let id = t["id"].as_u64().expect("id").to_string();
    assert_eq!(ok(api, &["task", "get", &id])["status"], "pending");
    let page = ok(api, &["task", "ls", "--tenant", "acme", "--limit", "5"]);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(ok(api, &["queue", "depth"])["pending"], 1);

    let leases = ok(api, &["lease", "acquire", "--agent", "w1", "--max", "1"]);
    let token = leases["leases"][0]["fencing_token"]
        .as_u64()
        .expect("token")
        .to_string();
    assert_eq!(ok(api, &["lease", "renew", &token])["status"], "running");
    assert_eq!(
        ok(
            api,
            &["lease", "complete", &token, "--result", r#"{"ok":true}"#]
        )["status"],
        "completed"
    );
    // A second completion with the same token is a conflict: exit 1 and the error JSON.
    let (code, err) = godel(api, &["lease", "complete", &token]);
    assert_eq!(code, 1);
    assert_eq!(err["error"]["code"], "conflict");

    let t2 = ok(api, &["task", "submit", "--max-attempts", "1"]);
    let id2 = t2["id"].as_u64().expect("id").to_string();
    let leases = ok(api, &["lease", "acquire", "--agent", "w1"]);
    let token = leases["leases"][0]["fencing_token"]
        .as_u64()
        .expect("token")
        .to_string();
    assert_eq!(
        ok(api, &["lease", "fail", &token, "--error", "boom"])["status"],
        "dead_letter"
    );
    assert_eq!(ok(api, &["dlq", "ls"])["items"][0]["error"], "boom");
    let (code, export) = godel(api, &["dlq", "export"]);
    assert_eq!(code, 0);
    assert!(export.to_string().contains("boom"), "{export}");
    let replayed = ok(api, &["dlq", "replay", "--ids", &id2]);
    assert_eq!(
        replayed["replayed"][0].as_u64().map(|v| v.to_string()),
        Some(id2.clone())
    );
    assert_eq!(
        ok(api, &["task", "cancel", &id2, "--reason", "not needed"])["status"],
        "cancelled"
    );
    let (code, _) = godel(api, &["task", "retry", &id2]);
    assert_eq!(code, 1, "a cancelled task cannot be retried");

    // Approvals and dependencies.
    let gated = ok(
        api,
        &[
            "task",
            "submit",
            "--requires-approval",
            "--approval-expires-in-ms",
            "60000",
        ],
    );
    assert_eq!(gated["status"], "awaiting_approval", "{gated}");
    let gid = gated["id"].as_u64().expect("id").to_string();
    let dep = ok(
        api,
        &[
            "task",
            "submit",
            "--depends-on",
            &gid,
            "--on-dependency-failure",
            "block",
        ],
    );
    assert_eq!(dep["status"], "waiting", "{dep}");
    assert_eq!(dep["depends_on"][0].to_string(), gid, "{dep}");
    let (code, _) = godel(api, &["task", "reject", &gid]);
    assert_ne!(code, 0, "a rejection without --reason");
    let rejected = ok(api, &["task", "reject", &gid, "--reason", "not now"]);
    assert_eq!(rejected["status"], "cancelled", "{rejected}");
    let dep_id = dep["id"].as_u64().expect("id").to_string();
    let dep = ok(api, &["task", "get", &dep_id]);
    assert_eq!(
        dep["blocked"],
        format!("dependency {gid} is cancelled"),
        "{dep}"
    );
    let dep = ok(api, &["task", "cancel", &dep_id, "--keep-children"]);
    assert_eq!(dep["status"], "cancelled", "{dep}");
    let gated = ok(api, &["task", "submit", "--requires-approval"]);
    let gid = gated["id"].as_u64().expect("id").to_string();
    let approved = ok(api, &["task", "approve", &gid, "--reason", "reviewed"]);
    assert_eq!(
        approved["approval"]["decision"]["approved"], true,
        "{approved}"
    );
    // Out of the way of the agent checks below.
    assert_eq!(ok(api, &["task", "cancel", &gid])["status"], "cancelled");

    // Kill switches.
    let sw = ok(
        api,
        &[
            "switch",
            "set",
            "hold-rust",
            "--capability",
            "rust",
            "--reason",
            "maintenance",
        ],
    );
    assert_eq!(
        (&sw["name"], &sw["reason"]),
        (&json!("hold-rust"), &json!("maintenance"))
    );
    assert_eq!(ok(api, &["switch", "ls"])["items"][0]["name"], "hold-rust");
    let (code, _) = godel(api, &["switch", "set", "nothing"]);
    assert_eq!(code, 1, "a switch that names nothing is refused");
    let (code, _) = godel(api, &["switch", "lift", "hold-rust"]);
    assert_eq!(code, 0);
    assert_eq!(ok(api, &["switch", "ls"])["items"], json!([]));

    registry_session(api);
    let cluster = ok(api, &["cluster", "status"]);
    assert_eq!(cluster["members"].as_array().map(Vec::len), Some(1));
    // A one-shard cluster has no queue shard to place: refused, not sent
    // wrong (tests/shard_placement_api.rs places one for real).
    let (code, _) = godel(
        api,
        &["cluster", "place-shard", "2", "regional", "--home", "eu"],
    );
    assert_ne!(code, 0, "placing a shard the cluster lacks");
    let (code, err) = godel(api, &["task", "get", "999999"]);
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (1, Some("not_found"))
    );
    text_session(api, &id2);
}

/// `godel` without `-o json`: exit code, stdout, stderr.
fn godel_text(api: &str, args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .env("GODEL_API_KEY", support::ADMIN_KEY)
        .args(["--api", api])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run godel");
    // Bounded: `godel events` tails until its count; killed by PID past 30 s.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("wait godel").is_none() {
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let out = child.wait_with_output().expect("godel output");
            panic!(
                "godel {args:?} did not finish within 30 s; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("godel output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Text output against a live node (the layouts are pinned by
/// tests/cli_text.rs): tables with headers, one-screen status, errors with
/// the API's code on stderr and a non-zero exit.
fn text_session(api: &str, cancelled: &str) {
    let (code, out, err) = godel_text(api, &["task", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID  STATUS  "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{cancelled} ")) && l.contains(" cancelled ")),
        "{out}"
    );
    let (code, out, err) = godel_text(api, &["task", "get", cancelled]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("status:          cancelled"), "{out}");
    let (code, out, err) = godel_text(api, &["status"]);
    assert_eq!(code, 0, "{err}");
    for label in ["cluster:", "nodes:", "queue:", "gateways:", "agents:"] {
        assert!(out.contains(label), "{label} missing: {out}");
    }
    for args in [
        &["cluster", "status"][..],
        &["node", "ls"],
        &["queue", "depth"],
    ] {
        let (code, out, err) = godel_text(api, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            !out.contains("null") && !out.contains('{'),
            "{args:?}: {out}"
        );
    }
    // The event stream from the start: the first three task events.
    let (code, out, err) = godel_text(api, &["events", "--since", "0", "--count", "3", "task.*"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains(" task.created "), "{out}");
    assert!(lines.iter().all(|l| l.contains(" task.")), "{out}");
    let (code, out, err) = godel_text(
        api,
        &[
            "events", "-o", "json", "--since", "0", "--count", "1", "task.>",
        ],
    );
    // Events applied before this node's API started are not in its buffer,
    // so `--since 0` may begin with a gap (a note on stderr).
    assert_eq!(code, 0, "{err}");
    let first: Value = serde_json::from_str(out.trim()).expect("one JSON event");
    assert_eq!(first["type"], "task.created", "{out}");
    assert!(first["seq"].as_u64().is_some_and(|s| s >= 1), "{out}");
    let (code, _, err) = godel_text(api, &["events", "Task"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("segment `Task`"), "{err}");
    let (code, out, err) = godel_text(api, &["task", "get", "999999"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("error: not_found (404 Not Found): "),
        "{err}"
    );
}

fn registry_session(api: &str) {
    let (code, err) = godel(api, &["agent", "add", "--id", "a1", "--gateway", "gw-1"]);
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (1, Some("not_found")),
        "{err}"
    );
    // A long-running program: the agent's actor on this node may run the
    // task (dispatch, or adopting the CLI's lease for its agent id), and it
    // must still be busy when its status is read.
    let driver = r#"{"kind":"command","program":"/bin/sleep","args":["30"]}"#;
    let add = [
        "gateway",
        "add",
        "--id",
        "gw-1",
        "--caps",
        "rust,git",
        "--max-sessions",
        "4",
        "--driver",
        driver,
    ];
    let g = ok(api, &add);
    assert_eq!(g["capabilities"], serde_json::json!(["git", "rust"]));
    assert_eq!(g["kind"], "command");
    assert_eq!(g["spec"]["driver"]["program"], "/bin/sleep");
    let bad = [
        "gateway",
        "add",
        "--id",
        "gw-2",
        "--driver",
        r#"{"kind":"ftp"}"#,
    ];
    let (code, err) = godel(api, &bad);
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (1, Some("invalid_request")),
        "{err}"
    );
    assert_eq!(
        ok(api, &["gateway", "ls"])["items"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let a = ok(
        api,
        &[
            "agent",
            "add",
            "--id",
            "a1",
            "--gateway",
            "gw-1",
            "--caps",
            "rust",
            "--capacity",
            "2",
        ],
    );
    assert_eq!(
        (a["capacity"].as_u64(), a["current_load"].as_u64()),
        (Some(2), Some(0))
    );
    // Wait for the agent's actor to come online first: an actor that
    // starts after the lease below would give it back as a lease of an
    // earlier incarnation (a race, not what this checks).
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while ok(api, &["agent", "status", "a1"])["agent"]["status"] == "offline" {
        assert!(
            std::time::Instant::now() < until,
            "agent a1 never came online"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(api, &["task", "submit", "--caps", "rust"]);
    ok(
        api,
        &["lease", "acquire", "--agent", "a1", "--caps", "rust"],
    );
    let st = ok(api, &["agent", "status", "a1"]);
    assert_eq!(
        (st["active_tasks"].as_u64(), st["agent"]["status"].as_str()),
        (Some(1), Some("busy"))
    );
    assert_eq!(ok(api, &["agent", "ls"])["items"][0]["id"], "a1");
    let (code, _) = godel(api, &["gateway", "rm", "gw-1"]);
    assert_eq!(code, 1, "a gateway with a bound agent cannot be removed");
    ok(api, &["agent", "rm", "a1"]);
    ok(api, &["gateway", "rm", "gw-1"]);
    let (code, _) = godel(api, &["agent", "get", "a1"]);
    assert_eq!(code, 1);
    let nodes = ok(api, &["node", "ls"]);
    assert!(nodes["items"].is_array(), "{nodes}");
}

/// The sessions endpoints without a session: empty lists, 404s and 400s in
/// the API's error shape, the deprecated alias, and the CLI commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_api_reports_errors_in_the_error_shape() {
    let c = Cluster::start(1).await;
    let api = c.api();
    let list = api.get_ok(0, "/api/v1/sessions").await;
    assert_eq!(list, json!({ "items": [], "next_cursor": null }));
    let filtered = "/api/v1/sessions?gateway=sim&state=running&key=k1&live=true&limit=5";
    assert_eq!(api.get_ok(0, filtered).await["items"], json!([]));
    for (query, field) in [
        ("state=sleeping", "state"),
        ("live=maybe", "live"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("cursor=x", "cursor"),
        ("colour=red", "colour"),
    ] {
        let r = api
            .get(0, &format!("/api/v1/sessions?{query}"))
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        assert!(r.message().contains(field), "{query}: {r:?}");
    }

    let r = api.get(0, "/api/v1/sessions/4242").await.unwrap();
    r.assert_error(404, "not_found");
    let r = api.get(0, "/api/v1/sessions/abc").await.unwrap();
    r.assert_error(400, "invalid_request");
    assert!(r.message().contains("`id`"), "{r:?}");
    let r = api
        .post_raw(0, "/api/v1/sessions/4242/kill", Vec::new())
        .await
        .unwrap();
    r.assert_error(404, "not_found");
    let r = api
        .post(
            0,
            "/api/v1/sessions/4242/kill",
            &json!({ "reason": "gone" }),
        )
        .await
        .unwrap();
    r.assert_error(404, "not_found");
    let r = api
        .post(0, "/api/v1/sessions/abc/kill", &json!({}))
        .await
        .unwrap();
    r.assert_error(400, "invalid_request");
    assert!(r.message().contains("`id`"), "{r:?}");
    let r = api
        .post(0, "/api/v1/sessions/4242/kill", &json!({ "why": "x" }))
        .await
        .unwrap();
    r.assert_error(400, "invalid_request");
    assert!(r.message().contains("why"), "{r:?}");

    let old = api.get(0, "/api/sessions").await.unwrap();
    assert_eq!(old.status, 200);
    assert_eq!(old.header("deprecation"), Some("true"));

    let api_url = format!("http://{}", c.node(0).api_addr);
    tokio::task::spawn_blocking(move || {
        let api = api_url.as_str();
        assert_eq!(ok(api, &["session", "ls"])["items"], json!([]));
        let args = ["session", "list", "--live", "--state", "running"];
        assert_eq!(ok(api, &args)["items"], json!([]));
        for args in [
            &["session", "get", "4242"][..],
            &["session", "kill", "4242", "--reason", "gone"],
        ] {
            let (code, err) = godel(api, args);
            assert_eq!(
                (code, err["error"]["code"].as_str()),
                (1, Some("not_found")),
                "{args:?}: {err}"
            );
        }
    })
    .await
    .expect("cli session commands");
}

/// A task with a session key opens a session on the agent's gateway; an
/// operator kills it; it ends `cancelled` and cannot be killed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_session_ends_cancelled() {
    let c = Cluster::start(1).await;
    let api = c.api();
    // Every attempt on this gateway hangs until it is cancelled.
    let gateway = json!({
        "id": "gw-hang", "region": "local", "capabilities": ["hang"], "max_sessions": 4,
        "driver": { "kind": "sim", "hang_rate": 1.0 },
    });
    let r = api.post(0, "/api/v1/gateways", &gateway).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let agent = json!({ "id": "hang-1", "gateway": "gw-hang", "capabilities": ["hang"] });
    let r = api.post(0, "/api/v1/agents", &agent).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let task = json!({
        "payload": { "prompt": "take your time" }, "capabilities": ["hang"],
        "session_key": "conv-1", "timeout_ms": 600_000,
    });
    let r = api.post(0, "/api/v1/tasks", &task).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let task_id = r.body["id"].as_u64().expect("task id");

    let s = live_session(&api, "conv-1").await;
    assert_eq!(
        (s["gateway"].as_str(), s["agent"].as_str()),
        (Some("gw-hang"), Some("hang-1")),
        "{s}"
    );
    let id = s["id"].as_u64().expect("session id");
    assert_eq!(
        api.get_ok(0, &format!("/api/v1/sessions/{id}")).await["id"],
        id
    );

    let api_url = format!("http://{}", c.node(0).api_addr);
    let killed = tokio::task::spawn_blocking(move || {
        let id = id.to_string();
        ok(
            &api_url,
            &["session", "kill", &id, "--reason", "operator says stop"],
        )
    })
    .await
    .expect("cli kill");
    assert_eq!(
        (killed["state"].as_str(), killed["live"].as_bool()),
        (Some("cancelled"), Some(false)),
        "{killed}"
    );
    assert_eq!(killed["reason"], "operator says stop");
    assert_eq!(killed["task"], Value::Null);

    let again = api
        .post_raw(0, &format!("/api/v1/sessions/{id}/kill"), Vec::new())
        .await
        .unwrap();
    again.assert_error(409, "conflict");
    assert!(
        again
            .message()
            .contains("is cancelled and cannot become cancelled"),
        "{again:?}"
    );
    let ended = api
        .get_ok(0, "/api/v1/sessions?key=conv-1&live=false")
        .await;
    assert_eq!(ended["items"][0]["id"], id, "{ended}");
    let t = api.get_ok(0, &format!("/api/v1/tasks/{task_id}")).await;
    let error = t["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&format!("session {id} ended")),
        "the running attempt failed with the kill: {t}"
    );
    // The task ran in its session's actor, which opened the gateway-side
    // session; the gateway actor stopped that actor and closed the session.
    wait_until(
        "the session actor to close the gateway-side session",
        deadline(Duration::from_secs(10)),
        async || {
            let opened = api
                .metric(0, "godel_gateway_sessions_total{event=\"opened\"}")
                .await
                == 1.0;
            let closed = api
                .metric(0, "godel_gateway_sessions_total{event=\"closed\"}")
                .await
                == 1.0;
            if opened && closed {
                Ok(())
            } else {
                bail!("opened {opened}, closed {closed}")
            }
        },
    )
    .await;
}

/// The live session holding `key`, polled for up to 10 s.
async fn live_session(api: &Api, key: &str) -> Value {
    let path = format!("/api/v1/sessions?key={key}&live=true");
    wait_until(
        "a live session for the key",
        deadline(Duration::from_secs(10)),
        async || {
            let page = api.get_ok(0, &path).await;
            match page["items"].as_array().and_then(|i| i.first()) {
                Some(s) => Ok(s.clone()),
                None => bail!("no live session with key `{key}` yet"),
            }
        },
    )
    .await
}

/// The fault-injection endpoints answer 403 in the error shape unless the
/// node runs with `runtime.fault_injection = true`, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_is_refused_unless_turned_on() {
    let c = Cluster::start(1).await;
    let api = c.api();
    let partition = json!({ "peers": [2] });
    for (method, path) in [
        ("GET", "/api/v1/admin/faults"),
        ("POST", "/api/v1/admin/faults/partition"),
        ("POST", "/api/v1/admin/faults/heal"),
        ("POST", "/api/v1/admin/agents/a1/crash"),
    ] {
        let r = if method == "GET" {
            api.get(0, path).await.unwrap()
        } else {
            api.post(0, path, &partition).await.unwrap()
        };
        r.assert_error(403, "forbidden");
        assert!(
            r.message().contains("fault injection is off"),
            "{path}: {r:?}"
        );
    }
    // The node still serves writes: nothing was cut off.
    let r = api
        .post(0, "/api/v1/tasks", &json!({ "payload": {} }))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{r:?}");
}

/// Bad query strings on the task and dead-letter lists get a 400 in the
/// API's error shape, naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_lists_answer_bad_queries_in_the_error_shape() {
    let c = Cluster::start(1).await;
    let api = c.api();
    for path in [
        "/api/v1/tasks",
        "/api/v1/dead-letter",
        "/api/v1/dead-letter/export",
    ] {
        for (query, field) in [("limit=many", "limit"), ("colour=red", "colour")] {
            let r = api.get(0, &format!("{path}?{query}")).await.unwrap();
            r.assert_error(400, "invalid_request");
            assert!(r.message().contains(field), "{path}?{query}: {r:?}");
        }
    }
}

/// The credential, tenant, JWT and audit commands, end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_commands_work() {
    let c = Cluster::start(1).await;
    let api = format!("http://{}", c.node(0).api_addr);
    tokio::task::spawn_blocking(move || security_session(&api))
        .await
        .expect("cli security session");
}

fn security_session(api: &str) {
    let (code, generated) = godel(api, &["key", "generate"]);
    assert_eq!(code, 0);
    assert!(
        generated.as_str().unwrap().trim().starts_with("dk_live_"),
        "{generated}"
    );
    let k = ok(
        api,
        &[
            "key",
            "create",
            "--name",
            "ci",
            "--role",
            "developer",
            "--tenant",
            "acme",
            "--expires-in",
            "1d",
        ],
    );
    let (id, key) = (k["id"].as_str().unwrap(), k["key"].as_str().unwrap());
    assert!(
        key.starts_with("dk_live_") && k["expires_at"].is_string(),
        "{k}"
    );
    let listed = ok(api, &["key", "ls", "--tenant", "acme"]);
    assert_eq!(listed["items"][0]["id"], id, "{listed}");
    assert!(
        !listed.to_string().contains(key),
        "a list never shows a key"
    );
    assert_eq!(ok(api, &["key", "get", id])["role"], "developer");
    // The new key works through --api-key.
    let out = Command::new(BIN)
        .args([
            "--api",
            api,
            "--api-key",
            key,
            "-o",
            "json",
            "task",
            "submit",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = ok(api, &["key", "revoke", id]);
    assert_eq!(revoked["live"], false, "{revoked}");
    let (code, err) = godel(api, &["key", "create", "--name", "x", "--role", "root"]);
    assert_eq!(code, 1, "{err}");

    let t = ok(
        api,
        &[
            "tenant",
            "add",
            "acme",
            "--weight",
            "3",
            "--max-queued",
            "100",
        ],
    );
    assert_eq!(
        (t["weight"].as_u64(), t["max_queued"].as_u64()),
        (Some(3), Some(100)),
        "{t}"
    );
    let t = ok(
        api,
        &[
            "tenant",
            "set",
            "acme",
            "--max-queued",
            "none",
            "--rate",
            "50",
        ],
    );
    assert_eq!(
        (t["max_queued"].is_null(), t["rate_per_second"].as_u64()),
        (true, Some(50)),
        "{t}"
    );
    let t = ok(
        api,
        &[
            "tenant",
            "set",
            "acme",
            "--daily-tokens",
            "5000",
            "--monthly-cost-usd",
            "20",
        ],
    );
    assert_eq!(
        t["budget"],
        serde_json::json!({"daily_tokens": 5000, "monthly_tokens": null, "daily_cost_usd": null,
                           "monthly_cost_usd": 20.0, "soft_percent": 80}),
        "{t}"
    );
    let t = ok(api, &["tenant", "set", "acme", "--no-budget"]);
    assert!(t["budget"].is_null(), "{t}");
    let u = ok(
        api,
        &["usage", "--tenant", "acme", "--group-by", "tenant,day"],
    );
    assert_eq!(u["group_by"], serde_json::json!(["tenant", "day"]), "{u}");
    assert_eq!(ok(api, &["tenant", "ls"])["items"][0]["queued"], 1);
    assert_eq!(ok(api, &["tenant", "get", "acme"])["weight"], 3);
    let (code, err) = godel(api, &["tenant", "rm", "acme"]);
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (1, Some("conflict")),
        "{err}"
    );

    let j = ok(api, &["jwt", "revoke", "--jti", "tok-1"]);
    assert_eq!(j["jti"], "tok-1");
    assert_eq!(ok(api, &["jwt", "ls"])["items"][0]["jti"], "tok-1");

    let audit = ok(api, &["audit", "ls", "--action", "api_keys."]);
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"api_keys.create") && actions.contains(&"api_keys.revoke"),
        "{audit}"
    );
    let (code, out) = godel(api, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}");
}
