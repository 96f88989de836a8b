//! The OpenAPI document (`GET /api/v1/openapi.json`) against the router:
//! it is OpenAPI 3.1, every `$ref` in it resolves, it documents exactly the
//! routes the router serves (`godel::api::route_list` plus the public ones),
//! every guarded operation asks for the bearer credential and the public
//! ones for none; and a running node serves it, and the `/docs` page,
//! with nothing fetched from elsewhere.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use godel::api::permissions;
use serde_json::Value;
use support::{Cluster, bounded};

const TEST_BOUND: Duration = Duration::from_secs(60);

/// The HTTP methods an OpenAPI path item may hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(godel::api::openapi_document()).expect("the document is JSON")
}

/// Every `(method, path)` the document describes, the method upper-case.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("`paths` is an object");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

/// Every `(method, path)` the router serves.
fn served() -> BTreeSet<(String, String)> {
    let guarded = godel::api::route_list()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p));
    let public = permissions::PUBLIC
        .iter()
        .map(|(m, p)| (m.to_string(), (*p).to_owned()));
    guarded.chain(public).collect()
}

/// Every `$ref` under `v`, with where it was found.
fn refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("$ref", Value::String(r)) => out.push((at.to_owned(), r.clone())),
                    _ => refs(child, &format!("{at}/{k}"), out),
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                refs(child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_document_is_openapi_3_1_and_every_ref_resolves() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3.1."), "openapi: {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut found = Vec::new();
    refs(&doc, "#", &mut found);
    assert!(found.len() > 100, "{} refs", found.len());
    let broken: Vec<_> = found
        .iter()
        .filter(|(_, r)| {
            r.strip_prefix('#')
                .is_none_or(|pointer| doc.pointer(pointer).is_none())
        })
        .collect();
    assert!(broken.is_empty(), "unresolved refs (at, ref): {broken:#?}");
}

#[test]
fn the_document_and_the_router_have_the_same_routes() {
    let documented = documented(&document());
    let served = served();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served, not documented: {undocumented:#?}"
    );
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(unserved.is_empty(), "documented, not served: {unserved:#?}");
    assert!(served.len() >= 55, "{} routes", served.len());
}

#[test]
fn guarded_operations_need_the_bearer_and_public_ones_nothing() {
    let doc = document();
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    let mut ids = BTreeSet::new();
    for (method, path) in documented(&doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        let id = op["operationId"]
            .as_str()
            .expect("every operation has an id");
        assert!(ids.insert(id.to_owned()), "operation id {id} twice");
        let public = permissions::PUBLIC.iter().any(|(_, p)| *p == path);
        let security = op["security"].as_array().expect("security is explicit");
        if public {
            assert!(security.is_empty(), "{method} {path}: {security:?}");
        } else {
            // `/metrics` is open by default: no credential, or a bearer.
            let bearer = security.last().expect("a requirement");
            assert!(bearer.get("bearer").is_some(), "{method} {path}");
            let optional = &security[..security.len() - 1];
            assert!(
                optional.is_empty() || path == "/metrics" && optional == [serde_json::json!({})],
                "{method} {path}: {security:?}"
            );
            for status in ["401", "403", "429"] {
                assert!(
                    op["responses"].get(status).is_some(),
                    "{method} {path} documents {status}"
                );
            }
        }
        let ok = op["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .any(|s| s.starts_with('2') || s == "101");
        assert!(
            ok,
            "{method} {path} documents a success (2xx, or 101 for an upgrade)"
        );
    }
}

/// The error shape in the document is the one the API answers.
#[test]
fn the_error_schema_has_code_message_and_retryable() {
    let doc = document();
    let error = &doc["components"]["schemas"]["Error"];
    let detail_ref = error["properties"]["error"]["$ref"].as_str().unwrap();
    let detail = doc.pointer(detail_ref.trim_start_matches('#')).unwrap();
    let required: BTreeSet<&str> = detail["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        required,
        BTreeSet::from(["code", "message", "retryable"]),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_the_document_and_the_docs_page() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let served = api.get_ok(0, "/api/v1/openapi.json").await;
        assert_eq!(served, document());
        api.anonymous()
            .get(0, "/api/v1/openapi.json")
            .await
            .unwrap()
            .assert_error(401, "unauthenticated");
        let page = api.anonymous().get(0, "/docs").await.unwrap();
        assert_eq!(page.status, 200, "{page:?}");
        assert!(
            page.header("content-type")
                .is_some_and(|t| t.starts_with("text/html")),
            "{page:?}"
        );
        let html = page.body.as_str().expect("an HTML page");
        assert!(
            html.contains("/api/v1/openapi.json"),
            "it fetches the document"
        );
        assert!(html.contains("sessionStorage"), "it keeps the key per tab");
        for external in ["http://", "https://", "//cdn", "<script src", "<link"] {
            assert!(
                !html.contains(external),
                "the page loads nothing else: {external}"
            );
        }
    })
    .await;
}
