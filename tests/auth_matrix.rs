//! The permission matrix, built from the router's own route list
//! (`godel::api::route_list`): every route, called with a credential of
//! every role, is refused with 403 exactly when the permission table says
//! the role lacks its permission, and anonymous calls are 401 on every
//! route. A route added without a table entry makes the router panic as it
//! is built, so this file (and every other test that starts a node) fails.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use godel::api::permissions;
use godel::fsm::Role;
use serde_json::json;
use support::{Api, Cluster, bounded};

const TEST_BOUND: Duration = Duration::from_secs(240);

/// Nodes run with fault injection on (so the fault routes answer by
/// permission, not by the switch) and `/metrics` locked, so every route of
/// the table is behind the guard; the failed-authentication budget is
/// raised so the anonymous sweep gets 401s, not 429s.
const CONFIG: &str = "[runtime]\nfault_injection = true\n[auth]\nmetrics_open = false\n\
                      [auth.rate]\nauth_failures_burst = 1000\n";

/// A key of `role` in tenant `acme`, made by the admin.
pub async fn key_of(api: &Api, role: Role) -> String {
    let r = api
        .post(
            0,
            "/api/v1/api-keys",
            &json!({ "name": format!("{role}-key"), "role": role, "tenant": "acme" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["key"].as_str().expect("the key, once").to_owned()
}

/// A concrete path for a route pattern.
fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{token}", "1")
        .replace("{tenant}", "acme")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_role_as_the_table_says() {
    let c = Cluster::start_with(1, CONFIG).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let routes = godel::api::route_list();
        assert!(routes.len() >= 50, "{} routes", routes.len());
        let anonymous = admin.anonymous();
        for role in Role::ALL {
            let api = admin.with_key(&key_of(&admin, role).await);
            for (method, path) in &routes {
                let pattern = path.strip_prefix("/api/v1").unwrap_or(path);
                let spec = permissions::spec(method, pattern)
                    .unwrap_or_else(|| panic!("{method} {path} is served but not in the table"));
                let body = (*method != reqwest::Method::GET).then(|| json!({}));
                let r = api
                    .request(method.clone(), 0, &concrete(path), body.as_ref())
                    .await
                    .unwrap();
                let allowed = spec.permission.granted_to(role);
                if allowed {
                    assert!(
                        !matches!(r.status, 401 | 403),
                        "{role} may {method} {path} ({}) but got {r:?}",
                        spec.permission.as_str()
                    );
                } else {
                    r.assert_error(403, "forbidden");
                    assert!(
                        r.message().contains(spec.permission.as_str()),
                        "the 403 names the permission: {r:?}"
                    );
                }
                assert!(
                    r.header("x-ratelimit-limit").is_some(),
                    "{method} {path}: rate-limit headers on every authenticated answer"
                );
            }
        }
        for (method, path) in &routes {
            let r = anonymous
                .request(method.clone(), 0, &concrete(path), None)
                .await
                .unwrap();
            r.assert_error(401, "unauthenticated");
            assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"godel\""));
        }
    })
    .await;
}

/// The probes answer without a credential; `/metrics` does too by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_default_metrics_are_open() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let anon = c.api().anonymous();
        for (method, path) in permissions::PUBLIC {
            let r = anon.request(method.clone(), 0, path, None).await.unwrap();
            assert_eq!(r.status, 200, "{path}: {r:?}");
        }
        let r = anon.get(0, "/metrics").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.as_str().unwrap_or("").contains("godel_raft_term"));
        // The deep health check is not a probe: it needs `cluster:read`.
        anon.get(0, "/health")
            .await
            .unwrap()
            .assert_error(401, "unauthenticated");
    })
    .await;
}

/// The viewer (read-only) is refused every mutating route, whatever the
/// body says (OWASP API5, broken function-level authorization, spelled
/// out: the matrix above covers it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api5_viewer_is_refused_every_mutating_route() {
    let c = Cluster::start_with(1, CONFIG).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        let viewer = admin.with_key(&key_of(&admin, Role::Viewer).await);
        let mut mutating = 0;
        for (method, path) in godel::api::route_list() {
            if method == reqwest::Method::GET {
                continue;
            }
            mutating += 1;
            let body = json!({ "tenant": "acme", "payload": {}, "name": "x", "role": "admin" });
            let r = viewer
                .request(method.clone(), 0, &concrete(&path), Some(&body))
                .await
                .unwrap();
            r.assert_error(403, "forbidden");
        }
        assert!(mutating >= 28, "{mutating} mutating routes");
        // Nothing was created on the way.
        let tasks = admin.get_ok(0, "/api/v1/tasks?tenant=acme").await;
        assert_eq!(tasks["items"], json!([]));
    })
    .await;
}
