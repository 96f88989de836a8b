//! The shipped alert rules (`cluster-config/alerts.yml`): `promtool` checks
//! them and runs their unit tests (`cluster-config/alerts_test.yml`), every
//! rule has a test, and every Godel metric a rule reads is one a running
//! node exports. `promtool` comes with Debian's `prometheus` package; the
//! promtool steps are skipped loudly without it, except under `CI`, where
//! they fail.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{Cluster, bounded};

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster-config")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(config_dir().join(name)).expect("read rule file")
}

/// The values after `key:` on lines of `text` (`- alert: X`, `alertname: X`).
fn values_of(text: &str, key: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .collect()
}

/// `godel_*` metric names in the rules' expressions.
fn metrics_in_rules() -> BTreeSet<String> {
    read("alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(metric_names)
        .collect()
}

/// The `godel_*` names in `text`, histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("godel_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.insert(base.to_owned());
    }
    names
}

/// Every Rust source file under `dir`, concatenated.
fn sources(dir: &Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.push_str(&sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            all.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    all
}

#[test]
fn every_metric_the_dashboard_and_rules_read_is_declared() {
    let src = sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let dashboard = read("grafana/dashboard.json");
    let used: BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metrics_in_rules())
        .collect();
    assert!(used.len() >= 10, "{used:?}");
    let undeclared: Vec<_> = used
        .iter()
        .filter(|m| !src.contains(&format!("\"{m}\"")))
        .collect();
    assert!(
        undeclared.is_empty(),
        "read but never declared: {undeclared:?}"
    );
}

/// Runs `promtool args` in the config dir; `None` when there is no promtool
/// (a loud skip, or a failure under `CI`).
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(config_dir())
        .output()
    {
        Ok(out) => Some(out),
        Err(e) => {
            let msg = format!("promtool is not available ({e}): apt-get install prometheus");
            if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
                panic!("{msg}\n(CI is set, so this fails instead of skipping)");
            }
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
            None
        }
    }
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"],
    ] {
        let Some(out) = promtool(args) else { return };
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_rule_has_a_unit_test() {
    let rules = values_of(&read("alerts.yml"), "alert:");
    let tested = values_of(&read("alerts_test.yml"), "alertname:");
    assert!(rules.len() >= 7, "{rules:?}");
    let untested: Vec<_> = rules.difference(&tested).collect();
    assert!(untested.is_empty(), "rules without a test: {untested:?}");
    let unknown: Vec<_> = tested.difference(&rules).collect();
    assert!(unknown.is_empty(), "tests of no rule: {unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_a_rule_reads_is_exported_by_a_node() {
    let wanted = metrics_in_rules();
    assert!(wanted.contains("godel_raft_is_leader"), "{wanted:?}");
    let c = Cluster::start(1).await;
    bounded(Duration::from_secs(60), async {
        let api = c.api();
        let base = format!("http://{}", c.node(0).api_addr);
        // Labelled counters appear once counted: one denial, one proposal,
        // one task event; the budget gauges with a budget.
        let anonymous = reqwest::get(format!("{base}/api/v1/tasks")).await.unwrap();
        assert_eq!(anonymous.status(), 401);
        let r = api
            .post_retrying(
                0,
                "/api/v1/tasks",
                &support::task_body("default", "high", 0, None),
                support::deadline(Duration::from_secs(20)),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        // Budget gauges appear for a tenant with a budget.
        let body = serde_json::json!({"name": "capped", "budget": {"daily_tokens": 1000}});
        let r = api.post(0, "/api/v1/tenants", &body).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let exported: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let missing: Vec<_> = wanted
            .iter()
            .filter(|m| !exported.contains(m.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "rules read metrics no node exports: {missing:?}\n{text}"
        );
    })
    .await;
}
