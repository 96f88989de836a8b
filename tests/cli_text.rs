//! Golden tests of the CLI's text output: each `tests/cli_text/<name>.json`
//! is an answer captured from a running node (`godel -o json ...`), and
//! `<name>.txt` is what `godel` prints for it without `-o json`.
//! `UPDATE_GOLDEN=1 cargo test --test cli_text` rewrites the `.txt` files.

use std::path::{Path, PathBuf};

use godel::cli::text::{self, View};
use serde_json::Value;

/// The command each fixture answers, by file name.
const CASES: &[(&str, View)] = &[
    ("task_ls", View::Tasks),
    ("task_get_completed", View::Tasks),
    ("task_get_dead_letter", View::Tasks),
    ("task_get_rejected", View::Tasks),
    ("task_get_waiting", View::Tasks),
    ("task_get_leased", View::Tasks),
    ("dlq_ls", View::Tasks),
    ("lease_acquire", View::Leases),
    ("queue_depth", View::Queue),
    ("cluster_status", View::Cluster),
    ("gateway_ls", View::Gateways),
    ("agent_ls", View::Agents),
    ("session_ls", View::Sessions),
    ("node_ls", View::Nodes),
    ("node_drain_status", View::Fields),
    ("key_ls", View::Keys),
    ("key_create", View::Keys),
    ("tenant_ls", View::Tenants),
    ("jwt_ls", View::Jwts),
    ("audit_ls", View::Audit),
    ("usage", View::Usage),
];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli_text")
}

fn fixture(name: &str) -> Value {
    let path = dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Compares `got` with `<name>.txt`, or rewrites it under UPDATE_GOLDEN.
fn golden(name: &str, got: &str) -> Result<(), String> {
    let path = dir().join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return Ok(());
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want == got {
        Ok(())
    } else {
        Err(format!(
            "{name}: text differs from {path:?}\n--- want\n{want}--- got\n{got}"
        ))
    }
}

#[test]
fn every_resource_reads_as_its_golden_text() {
    let mut failures = Vec::new();
    for (name, view) in CASES {
        let got = text::render(*view, &fixture(name));
        if let Err(e) = golden(name, &got) {
            failures.push(e);
        }
    }
    let got = text::summary(&fixture("status"));
    if let Err(e) = golden("status", &got) {
        failures.push(e);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_has_a_case_and_no_text_shows_json_nulls() {
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            assert!(
                stem == "status" || CASES.iter().any(|(n, _)| *n == stem),
                "{stem}.json has no case"
            );
        }
    }
    for (name, view) in CASES {
        let got = text::render(*view, &fixture(name));
        assert!(!got.contains("null"), "{name}: {got}");
        assert!(
            !got.contains('{') || name.starts_with("task_get"),
            "{name} shows JSON: {got}"
        );
    }
}

#[test]
fn lists_are_tables_with_a_header_and_one_row_per_item() {
    for (name, view) in CASES {
        let v = fixture(name);
        let Some(items) = v["items"].as_array().or(v["leases"].as_array()) else {
            continue;
        };
        let got = text::render(*view, &v);
        if items.is_empty() {
            assert_eq!(got, "(none)\n", "{name}");
            continue;
        }
        let lines: Vec<&str> = got.lines().take_while(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), items.len() + 1, "{name}: {got}");
        assert!(
            lines[0].chars().all(|c| !c.is_lowercase()),
            "{name}: the first line is the header: {got}"
        );
    }
}
