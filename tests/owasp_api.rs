//! The API against the OWASP API Security Top 10 (2023), on real nodes:
//! API1 broken object-level authorization (another tenant's objects), API2
//! broken authentication (keys and JWTs), API3 broken object-property
//! authorization (`tenant` and `role` in bodies), API4 unrestricted
//! resource consumption (rate limits, quotas, body size). API5 (function
//! level) is `tests/auth_matrix.rs`; API8 (misconfiguration) is
//! `tests/safe_drivers.rs` and the probe in `tests/auth_probe.rs`.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(180);

/// A key of `role` in `tenant`, made by the admin.
async fn key(api: &Api, role: &str, tenant: &str) -> (String, String) {
    let r = api
        .post(
            0,
            "/api/v1/api-keys",
            &json!({ "name": format!("{role}@{tenant}"), "role": role, "tenant": tenant }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    (
        r.body["key"].as_str().unwrap().to_owned(),
        r.body["id"].as_str().unwrap().to_owned(),
    )
}

async fn submit(api: &Api, body: Value) -> Value {
    let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body
}

/// Leases one task as `agent` through `api`; (task id, token).
async fn lease_one(api: &Api, agent: &str) -> (u64, u64) {
    let r = api
        .post(0, "/api/v1/leases", &json!({ "agent_id": agent, "max": 1 }))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let l = &r.body["leases"][0];
    (
        l["task_id"].as_u64().expect("a lease"),
        l["fencing_token"].as_u64().unwrap(),
    )
}

/// API1: a developer of `acme` meets `globex`'s task, lease, session and
/// dead letter by id: each answers exactly as a missing one does, and
/// nothing of globex's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api1_another_tenants_objects_do_not_exist() {
    // No agents take the tasks: workers below lease them by hand.
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let acme = admin.with_key(&key(&admin, "developer", "acme").await.0);
        let globex = admin.with_key(&key(&admin, "developer", "globex").await.0);
        let g1 = submit(
            &globex,
            json!({ "payload": {"g": 1}, "session_key": "conv" }),
        )
        .await;
        let g2 = submit(&globex, json!({ "payload": {"g": 2}, "max_attempts": 1 })).await;
        let mine = submit(&acme, json!({ "payload": {"a": 1} })).await;
        assert_eq!(g1["tenant"], "globex");
        assert_eq!(mine["tenant"], "acme");
        let (gid, gid2) = (g1["id"].as_u64().unwrap(), g2["id"].as_u64().unwrap());

        // Worker of acme leases only acme's task.
        let (t, tok) = lease_one(&acme, "acme-worker").await;
        assert_eq!(t, mine["id"].as_u64().unwrap());
        // globex's worker takes globex's two.
        let (_, gtok) = lease_one(&globex, "globex-worker").await;
        let (_, gtok2) = lease_one(&globex, "globex-worker").await;
        let r = globex
            .post(
                0,
                &format!("/api/v1/leases/{gtok2}/fail"),
                &json!({ "error": "x", "retryable": false }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");

        // Tasks: get, cancel, retry.
        for (method, path) in [
            ("GET", format!("/api/v1/tasks/{gid}")),
            ("POST", format!("/api/v1/tasks/{gid}/cancel")),
            ("POST", format!("/api/v1/tasks/{gid2}/retry")),
        ] {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let body = (method == "POST").then(|| json!({}));
            let theirs = acme
                .request(m.clone(), 0, &path, body.as_ref())
                .await
                .unwrap();
            let missing = acme
                .request(
                    m,
                    0,
                    &path
                        .replace(&format!("/{gid}"), "/999999")
                        .replace(&format!("/{gid2}"), "/999999"),
                    body.as_ref(),
                )
                .await
                .unwrap();
            theirs.assert_error(404, "not_found");
            missing.assert_error(404, "not_found");
            assert_eq!(
                theirs
                    .message()
                    .replace(&gid.to_string(), "N")
                    .replace(&gid2.to_string(), "N"),
                missing.message().replace("999999", "N"),
                "another tenant's task reads exactly like a missing one"
            );
        }
        // Leases: renew, complete, fail with globex's live token: stale.
        for verb in ["renew", "complete", "fail"] {
            let body = if verb == "fail" {
                json!({ "error": "x" })
            } else {
                json!({})
            };
            let r = acme
                .post(0, &format!("/api/v1/leases/{gtok}/{verb}"), &body)
                .await
                .unwrap();
            r.assert_error(409, "conflict");
            assert!(r.message().contains("not a live lease"), "{r:?}");
        }
        // Dead letters: not listed, not exported, not replayed.
        let dl = acme.get_ok(0, "/api/v1/dead-letter").await;
        assert_eq!(dl["items"], json!([]), "{dl}");
        let r = acme
            .post(0, "/api/v1/dead-letter/replay", &json!({ "ids": [gid2] }))
            .await
            .unwrap();
        // A developer may not replay in bulk at all (operator's job); the
        // scope check is behind it either way.
        r.assert_error(403, "forbidden");
        // Lists and depth show only acme.
        let all = acme.get_ok(0, "/api/v1/tasks").await;
        let tenants: Vec<&str> = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tenant"].as_str().unwrap())
            .collect();
        assert_eq!(tenants, ["acme"], "{all}");
        acme.get(0, "/api/v1/tasks?tenant=globex")
            .await
            .unwrap()
            .assert_error(403, "forbidden");
        let depth = acme.get_ok(0, "/api/v1/queue/depth").await;
        assert!(depth["by_tenant"].get("globex").is_none(), "{depth}");
        // Sessions: globex's conversation does not exist for acme.
        let sessions = acme.get_ok(0, "/api/v1/sessions").await;
        assert_eq!(sessions["items"], json!([]), "{sessions}");

        // globex's task is untouched: still leased by its worker.
        let t = globex.get_ok(0, &format!("/api/v1/tasks/{gid}")).await;
        assert_eq!(t["status"], "leased", "{t}");
        // acme's own lease completes.
        let r = acme
            .post(
                0,
                &format!("/api/v1/leases/{tok}/complete"),
                &json!({"result": 1}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    })
    .await;
}

/// A session opened for globex's task is invisible to acme's developer,
/// who can neither read it nor pause, resume or checkpoint it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api1_sessions_of_another_tenant_are_not_found() {
    let gw = r#"{"id":"hold","region":"local","max_sessions":4,"driver":{"kind":"sim","latency":{"dist":"fixed","value":"30s"}}}"#;
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let gw: Value = serde_json::from_str(gw).unwrap();
        assert_eq!(admin.post(0, "/api/v1/gateways", &gw).await.unwrap().status, 201);
        let agent = json!({ "id": "hold-1", "gateway": "hold", "capabilities": ["slow"], "capacity": 2 });
        assert_eq!(admin.post(0, "/api/v1/agents", &agent).await.unwrap().status, 201);
        let acme = admin.with_key(&key(&admin, "developer", "acme").await.0);
        let globex = admin.with_key(&key(&admin, "viewer", "globex").await.0);
        let t = submit(&admin, json!({ "tenant": "globex", "payload": {}, "capabilities": ["slow"], "session_key": "conv-1" })).await;
        let session = wait_until("globex's session opens", deadline(Duration::from_secs(20)), async || {
            let s = admin.get_ok(0, "/api/v1/sessions?live=true").await;
            s["items"][0]["id"].as_u64().ok_or_else(|| anyhow::anyhow!("no session yet: {s}"))
        })
        .await;
        let s = globex.get_ok(0, &format!("/api/v1/sessions/{session}")).await;
        assert_eq!((s["tenant"].as_str(), s["task"].as_u64()), (Some("globex"), t["id"].as_u64()));
        acme.get(0, &format!("/api/v1/sessions/{session}")).await.unwrap().assert_error(404, "not_found");
        let missing = acme.get(0, "/api/v1/sessions/424242").await.unwrap();
        missing.assert_error(404, "not_found");
        let listed = acme.get_ok(0, "/api/v1/sessions").await;
        assert_eq!(listed["items"], json!([]));
        acme.get(0, "/api/v1/sessions?tenant=globex").await.unwrap().assert_error(403, "forbidden");
        // Nor can acme's developer (who may pause, resume and checkpoint its
        // own) act on it or read its checkpoints; nothing changes.
        for verb in ["pause", "resume", "checkpoint"] {
            let r = acme.post(0, &format!("/api/v1/sessions/{session}/{verb}"), &json!({})).await.unwrap();
            r.assert_error(404, "not_found");
        }
        let r = acme.get(0, &format!("/api/v1/sessions/{session}/checkpoints")).await.unwrap();
        r.assert_error(404, "not_found");
        let after = globex.get_ok(0, &format!("/api/v1/sessions/{session}")).await;
        assert_eq!(
            (&after["state"], &after["checkpoint_seq"], &after["then"]),
            (&s["state"], &s["checkpoint_seq"], &Value::Null),
            "{after}"
        );
        assert_eq!(globex.get_ok(0, &format!("/api/v1/sessions/{session}/checkpoints")).await["items"], json!([]));
    })
    .await;
}

fn jwt_config(dir: &std::path::Path, secret: &str) -> String {
    let path = dir.join("jwt.secret");
    std::fs::write(&path, secret).unwrap();
    format!(
        "[auth]\njwt_secret_file = {:?}\njwt_issuer = \"idp\"\njwt_audience = \"godel\"\n\
         [auth.rate]\nauth_failures_burst = 1000\n",
        path.to_string_lossy()
    )
}

const SECRET: &str = "a-test-hs256-secret-that-is-long-enough-0123456789";

fn claims(offset_exp: i64, extra: Value) -> Value {
    let now = godel::clock::now_ms() as i64 / 1000;
    let mut c = json!({
        "sub": "alice", "role": "developer", "tenant_id": "acme",
        "iss": "idp", "aud": "godel", "exp": now + offset_exp, "iat": now,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// API2: a JWT is accepted only when it is HS256, signed with the secret,
/// from the right issuer for the right audience, current, and not revoked;
/// every other credential shape is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api2_jwts_and_keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_with(1, &jwt_config(dir.path(), SECRET)).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let good = sign(Algorithm::HS256, SECRET, &claims(3600, json!({ "jti": "t-1" })));
        let as_alice = admin.with_key(&good);
        let r = as_alice.post(0, "/api/v1/tasks", &json!({ "payload": {} })).await.unwrap();
        assert_eq!((r.status, r.body["tenant"].as_str()), (201, Some("acme")), "{r:?}");

        let header_none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(claims(3600, json!({})).to_string());
        let mut tampered = good.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let cases = [
            ("alg none", format!("{header_none}.{body}.")),
            ("HS384", sign(Algorithm::HS384, SECRET, &claims(3600, json!({})))),
            ("wrong key", sign(Algorithm::HS256, "another-secret-that-is-also-long-enough-xx", &claims(3600, json!({})))),
            ("expired", sign(Algorithm::HS256, SECRET, &claims(-120, json!({})))),
            ("nbf in the future", sign(Algorithm::HS256, SECRET, &claims(3600, json!({ "nbf": godel::clock::now_ms() / 1000 + 600 })))),
            ("wrong aud", sign(Algorithm::HS256, SECRET, &claims(3600, json!({ "aud": "other" })))),
            ("wrong iss", sign(Algorithm::HS256, SECRET, &claims(3600, json!({ "iss": "other" })))),
            ("tampered signature", String::from_utf8(tampered).unwrap()),
            ("unknown role", sign(Algorithm::HS256, SECRET, &claims(3600, json!({ "role": "root" })))),
            ("no tenant", sign(Algorithm::HS256, SECRET, &json!({ "sub": "x", "role": "admin", "iss": "idp", "aud": "godel", "exp": 4102444800u64 }))),
            ("unknown key", "dk_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()),
            ("short key", "dk_live_short".into()),
            ("garbage", "not-a-credential".into()),
        ];
        for (what, token) in cases {
            let r = admin.with_key(&token).get(0, "/api/v1/tasks").await.unwrap();
            assert_eq!(r.status, 401, "{what}: {r:?}");
            r.assert_error(401, "unauthenticated");
        }
        // Expired within the 60 s leeway still passes; beyond it does not
        // (checked above at -120 s).
        let late = sign(Algorithm::HS256, SECRET, &claims(-30, json!({})));
        assert_eq!(admin.with_key(&late).get(0, "/api/v1/tasks").await.unwrap().status, 200);
        // Malformed Authorization headers.
        for h in ["Basic YWxhZGRpbjpvcGVuc2VzYW1l", "Bearer", "Bearer    ", "Token abc", "bearerdk_live_x"] {
            let r = reqwest::Client::new()
                .get(format!("http://{}/api/v1/tasks", c.node(0).api_addr))
                .header("authorization", h)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{h:?}");
        }
        // A revoked jti is refused from then on.
        let r = admin.post(0, "/api/v1/jwt/revocations", &json!({ "jti": "t-1" })).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        as_alice.get(0, "/api/v1/tasks").await.unwrap().assert_error(401, "unauthenticated");
        // Denials are in the audit log.
        let denied = admin.get_ok(0, "/api/v1/audit?outcome=denied:unauthenticated&limit=1000").await;
        assert!(denied["items"].as_array().unwrap().len() >= 10, "{denied}");
    })
    .await;
}

/// A JWT secret under 32 bytes stops the node at start, naming the key.
#[test]
fn api2_short_jwt_secret_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, "too-short").unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ndata_dir = {:?}\napi_addr = \"127.0.0.1:0\"\nraft_addr = \"127.0.0.1:0\"\n[fabric]\nenabled = false\n[auth]\njwt_secret_file = {:?}\n",
            dir.path().join("data").to_string_lossy(),
            secret.to_string_lossy()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(support::BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("auth.jwt_secret_file") && err.contains("at least 32"),
        "{err}"
    );
}

/// API2: a revoked key stops working on every node within a second of
/// the revocation's answer; an expired key is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api2_revoked_key_is_refused_on_every_node_within_a_second() {
    let c = Cluster::start(3).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let (k, id) = key(&admin, "developer", "acme").await;
        let dev = admin.with_key(&k);
        for i in 0..3 {
            // Warm each node's cache, so the revocation must invalidate it.
            let r = dev.get(i, "/api/v1/tasks").await.unwrap();
            assert_eq!(r.status, 200, "node {i}: {r:?}");
        }
        let r = admin
            .delete(0, &format!("/api/v1/api-keys/{id}"))
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.body["live"].as_bool()),
            (200, Some(false)),
            "{r:?}"
        );
        let revoked = Instant::now();
        for i in 0..3 {
            loop {
                let r = dev.get(i, "/api/v1/tasks").await.unwrap();
                if r.status == 401 {
                    break;
                }
                assert!(
                    revoked.elapsed() < Duration::from_secs(1),
                    "node {i} still accepts the revoked key after {:?}",
                    revoked.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Revoking again is harmless; the record stays, dead.
        let r = admin
            .delete(0, &format!("/api/v1/api-keys/{id}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let listed = admin.get_ok(0, "/api/v1/api-keys?live=false").await;
        assert!(
            listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["id"] == id.as_str())
        );
        assert!(
            listed.to_string().find(&k).is_none(),
            "a list never shows a key"
        );
        // A key that expires.
        let r = admin
            .post(
                0,
                "/api/v1/api-keys",
                &json!({ "name": "brief", "role": "viewer", "tenant": "acme", "expires_in": "1s" }),
            )
            .await
            .unwrap();
        let brief = admin.with_key(r.body["key"].as_str().unwrap());
        assert_eq!(brief.get(0, "/api/v1/tasks").await.unwrap().status, 200);
        wait_until(
            "the brief key expires",
            deadline(Duration::from_secs(5)),
            async || match brief.get(0, "/api/v1/tasks").await?.status {
                401 => Ok(()),
                s => anyhow::bail!("status {s}"),
            },
        )
        .await;
    })
    .await;
}

/// API3: `tenant` and `role` in bodies cannot raise what a credential may
/// do: another tenant is 403, an unknown field is 400, and neither creates
/// anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api3_tenant_and_role_in_bodies_change_nothing() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let dev = admin.with_key(&key(&admin, "developer", "acme").await.0);
        let r = dev
            .post(
                0,
                "/api/v1/tasks",
                &json!({ "payload": {}, "tenant": "globex" }),
            )
            .await
            .unwrap();
        r.assert_error(403, "forbidden");
        let r = dev
            .post(
                0,
                "/api/v1/tasks",
                &json!({ "payload": {}, "role": "admin" }),
            )
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        assert!(r.message().contains("role"), "{r:?}");
        let r = dev
            .post(
                0,
                "/api/v1/leases",
                &json!({ "agent_id": "w", "tenant": "globex" }),
            )
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        let r = dev
            .post(
                0,
                "/api/v1/api-keys",
                &json!({ "name": "x", "role": "admin", "tenant": "acme" }),
            )
            .await
            .unwrap();
        r.assert_error(403, "forbidden");
        // Its own tenant named explicitly is fine.
        let t = submit(&dev, json!({ "payload": {}, "tenant": "acme" })).await;
        assert_eq!(t["tenant"], "acme");
        // Exactly that one task exists, and the denials were audited.
        let all = admin.get_ok(0, "/api/v1/tasks").await;
        assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");
        let denied = wait_until(
            "denials audited",
            deadline(Duration::from_secs(5)),
            async || {
                let d = admin
                    .get_ok(0, "/api/v1/audit?outcome=denied:forbidden")
                    .await;
                let n = d["items"].as_array().map_or(0, Vec::len);
                if n >= 2 {
                    Ok(d)
                } else {
                    anyhow::bail!("{n} so far")
                }
            },
        )
        .await;
        assert!(denied.to_string().contains("tasks.submit"), "{denied}");
    })
    .await;
}

/// API4: a credential's bucket runs out with 429 and `Retry-After`, its
/// headers counting down; failed authentications from one address are
/// limited (429, not audited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api4_credential_bucket_and_failed_authentications_are_limited() {
    let config = "[auth.rate]\ncredential_per_second = 2\ncredential_burst = 5\n\
                  auth_failures_per_minute = 2\nauth_failures_burst = 3\n";
    let c = Cluster::start_with(1, config).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        // The admin key has a bucket of 5 too (and the harness spent some
        // of it): retry a 429, which means nothing was done.
        let body = json!({ "name": "v", "role": "viewer", "tenant": "acme" });
        let r = admin
            .post_retrying(
                0,
                "/api/v1/api-keys",
                &body,
                deadline(Duration::from_secs(10)),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let viewer = admin.with_key(r.body["key"].as_str().unwrap());
        let mut remaining = Vec::new();
        let mut limited = None;
        for _ in 0..10 {
            let r = viewer.get(0, "/api/v1/tasks").await.unwrap();
            assert_eq!(r.header("x-ratelimit-limit"), Some("5"), "{r:?}");
            assert!(r.header("x-ratelimit-reset").is_some());
            if r.status == 429 {
                limited = Some(r);
                break;
            }
            remaining.push(
                r.header("x-ratelimit-remaining")
                    .unwrap()
                    .parse::<u32>()
                    .unwrap(),
            );
        }
        let r = limited.expect("the bucket of 5 ran out within 10 requests");
        r.assert_error(429, "rate_limited");
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
        assert!(
            r.retry_after
                .as_deref()
                .is_some_and(|s| s.parse::<u64>().unwrap() >= 1),
            "{r:?}"
        );
        assert!(remaining.windows(2).all(|w| w[1] <= w[0]), "{remaining:?}");
        assert!(remaining.len() >= 4, "{remaining:?}");

        // Failed authentications: 3, then 429, per source address (the
        // harness's own polls before the key existed spent 127.0.0.1's).
        let url = format!("http://{}/api/v1/tasks", c.node(0).api_addr);
        let from_2 = failed_auths(&url, [127, 0, 0, 2], 5).await;
        assert_eq!(&from_2[..3], &[401, 401, 401], "{from_2:?}");
        assert!(from_2[3..].iter().all(|s| *s == 429), "{from_2:?}");
        let from_3 = failed_auths(&url, [127, 0, 0, 3], 1).await;
        assert_eq!(from_3, [401], "another address has its own budget");
        // The limited ones were not audited: four denials only. Denials
        // are written after the answer, so wait for all four to land.
        let from_2_or_3 = |audit: &Value| -> usize {
            audit["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["actor"].as_str())
                .filter(|a| {
                    a.starts_with("anonymous@127.0.0.2") || a.starts_with("anonymous@127.0.0.3")
                })
                .count()
        };
        let denials = async |at_least: usize| {
            wait_until(
                "denials audited",
                deadline(Duration::from_secs(10)),
                async || {
                    let r = admin
                        .get(0, "/api/v1/audit?outcome=denied:unauthenticated")
                        .await?;
                    match r.status {
                        200 if from_2_or_3(&r.body) >= at_least => Ok(r.body),
                        _ => anyhow::bail!("{r:?}"),
                    }
                },
            )
            .await
        };
        denials(4).await;
        // A moment more for any limited call that was audited by mistake.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let audit = denials(0).await;
        let from = from_2_or_3(&audit);
        assert_eq!(
            from, 4,
            "3 from .2 and 1 from .3, the limited ones not: {audit}"
        );
    })
    .await;
}

/// API4: a tenant's task quota refuses submissions past it (an idempotent
/// retry still gets its task), its request rate runs out across its
/// credentials, and an oversized body is 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api4_tenant_quota_rate_and_body_size() {
    let c = Cluster::start_with(1, "[api]\nmax_body_bytes = 4096\n").await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let r = admin.post(0, "/api/v1/tenants", &json!({ "name": "tiny", "max_queued": 2 })).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        // No agent has `nothing`: the tasks stay pending.
        let task = |k: &str| json!({ "tenant": "tiny", "payload": {}, "capabilities": ["nothing"], "idempotency_key": k });
        submit(&admin, task("a")).await;
        submit(&admin, task("b")).await;
        let r = admin.post(0, "/api/v1/tasks", &task("c")).await.unwrap();
        r.assert_error(429, "rate_limited");
        assert!(r.message().contains("quota is 2"), "{r:?}");
        let again = admin.post(0, "/api/v1/tasks", &task("a")).await.unwrap();
        assert_eq!(again.status, 200, "an idempotent retry is answered: {again:?}");
        let t = admin.get_ok(0, "/api/v1/tenants/tiny").await;
        assert_eq!(t["queued"], 2, "{t}");

        let r = admin.patch(0, "/api/v1/tenants/tiny", &json!({ "rate_per_second": 1, "burst": 2 })).await.unwrap();
        assert_eq!((r.status, &r.body["burst"]), (200, &json!(2)), "{r:?}");
        let dev = admin.with_key(&key(&admin, "developer", "tiny").await.0);
        let viewer = admin.with_key(&key(&admin, "viewer", "tiny").await.0);
        let a = dev.get(0, "/api/v1/tasks").await.unwrap();
        let b = viewer.get(0, "/api/v1/tasks").await.unwrap();
        let third = dev.get(0, "/api/v1/tasks").await.unwrap();
        assert_eq!((a.status, b.status), (200, 200), "{a:?} {b:?}");
        third.assert_error(429, "rate_limited");
        assert!(third.message().contains("tenant"), "{third:?}");

        let big = json!({ "payload": { "x": "y".repeat(8000) } });
        admin.post(0, "/api/v1/tasks", &big).await.unwrap().assert_error(413, "payload_too_large");
        assert_eq!(admin.get_ok(0, "/api/v1/tasks").await["items"].as_array().unwrap().len(), 2);
    })
    .await;
}

/// `n` requests with an unknown key from local address `from`; their
/// statuses.
async fn failed_auths(url: &str, from: [u8; 4], n: usize) -> Vec<u16> {
    let http = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let r = http
            .get(url)
            .bearer_auth("dk_live_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB")
            .send()
            .await
            .unwrap();
        out.push(r.status().as_u16());
    }
    out
}
