//! The CLI's text output: a table per resource list, a block of fields per
//! resource, chosen by the command (not guessed from the JSON). Pure
//! functions of the API's JSON, so golden tests pin them
//! (`tests/cli_text.rs`). `-o json` prints the API's JSON instead.

use std::fmt::Write as _;

use serde_json::Value;

/// What a command's answer is, for rendering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Tasks (`task ls`, `dlq ls`), or one task (`task get`, `submit`, ...).
    Tasks,
    /// `lease acquire`: the leases granted.
    Leases,
    /// `task submit-batch`, `lease report`: a result per item.
    Batch,
    /// `queue depth`.
    Queue,
    /// `cluster status`.
    Cluster,
    /// Gateways.
    Gateways,
    /// Agents.
    Agents,
    /// Sessions.
    Sessions,
    /// The node registry.
    Nodes,
    /// API keys.
    Keys,
    /// Tenants.
    Tenants,
    /// Revoked JWT ids.
    Jwts,
    /// The audit log.
    Audit,
    /// `usage`: one row per group, then the queue waits.
    Usage,
    /// Anything else: its fields.
    Fields,
}

/// The text for `v`, the answer to a command of `view`; ends with a newline.
pub fn render(view: View, v: &Value) -> String {
    let mut out = match (view, v) {
        (_, Value::String(s)) => s.trim_end().to_owned(),
        (View::Queue, _) => queue(v),
        (View::Usage, _) => usage(v),
        (View::Cluster, _) => cluster(v),
        (View::Leases, _) => match v["leases"].as_array() {
            Some(leases) => table(view, leases),
            None => fields(v),
        },
        (View::Tasks, _) if v["items"].is_null() && v.get("id").is_some() => task(v),
        (View::Batch, _) => {
            let items = v["items"].as_array().cloned().unwrap_or_default();
            let mut t = table(view, &items);
            let counts: Vec<String> = ["created", "existing", "done", "failed"]
                .iter()
                .filter(|k| !v[**k].is_null())
                .map(|k| format!("{k} {}", cell(&v[*k])))
                .collect();
            let _ = write!(t, "\n\n{}", counts.join(", "));
            t
        }
        (_, _) => match v["items"].as_array() {
            Some(items) => {
                let mut t = table(view, items);
                if let Some(anchor) = v.get("anchor").filter(|a| !a.is_null()) {
                    let _ = write!(t, "\n\nanchor: seq {}", cell(&anchor["seq"]));
                }
                if let Some(c) = v["next_cursor"].as_str() {
                    let _ = write!(t, "\n\nmore: --cursor {c}");
                }
                t
            }
            None => fields(v),
        },
    };
    if view == View::Keys && v["key"].is_string() {
        out.push_str("\n\nThe key is shown this once: store it now.");
    }
    out.push('\n');
    out
}

/// A column: its heading and how a row's cell is made.
type Column = (&'static str, fn(&Value) -> String);

fn columns(view: View) -> &'static [Column] {
    match view {
        View::Tasks => &[
            ("ID", |t| cell(&t["id"])),
            ("STATUS", |t| cell(&t["status"])),
            ("PRIORITY", |t| cell(&t["priority"])),
            ("TENANT", |t| cell(&t["tenant"])),
            ("ATTEMPTS", |t| {
                format!("{}/{}", cell(&t["attempt_count"]), cell(&t["max_attempts"]))
            }),
            ("AGENT", |t| cell(&t["agent_id"])),
            ("SESSION", |t| cell(&t["session_key"])),
            ("UPDATED", |t| cell(&t["updated_at"])),
            ("ERROR", |t| clip(&cell(&t["error"]), 60)),
        ],
        View::Batch => &[
            ("STATUS", |i| cell(&i["status"])),
            ("TASK", |i| cell(&i["task"]["id"])),
            ("TASK STATUS", |i| cell(&i["task"]["status"])),
            ("PRIORITY", |i| cell(&i["task"]["priority"])),
            ("ERROR", |i| clip(&cell(&i["error"]["message"]), 60)),
        ],
        View::Leases => &[
            ("TOKEN", |l| cell(&l["fencing_token"])),
            ("TASK", |l| cell(&l["task_id"])),
            ("PRIORITY", |l| cell(&l["task"]["priority"])),
            ("TENANT", |l| cell(&l["task"]["tenant"])),
            ("EXPIRES", |l| cell(&l["expires_at"])),
        ],
        View::Gateways => &[
            ("ID", |g| cell(&g["id"])),
            ("KIND", |g| cell(&g["kind"])),
            ("REGION", |g| cell(&g["region"])),
            ("OWNER", |g| cell(&g["owner"])),
            ("HEALTH", |g| cell(&g["health"])),
            ("CIRCUIT", |g| cell(&g["circuit"])),
            ("MAX SESSIONS", |g| cell(&g["max_sessions"])),
            ("CAPABILITIES", |g| list(&g["capabilities"])),
        ],
        View::Agents => &[
            ("ID", |a| cell(&a["id"])),
            ("GATEWAY", |a| cell(&a["gateway"])),
            ("STATUS", |a| cell(&a["status"])),
            ("LOAD", |a| {
                format!("{}/{}", cell(&a["current_load"]), cell(&a["capacity"]))
            }),
            ("ONLINE ON", |a| cell(&a["online_on"])),
            ("ROLE", |a| cell(&a["role"])),
            ("CAPABILITIES", |a| list(&a["capabilities"])),
        ],
        View::Sessions => &[
            ("ID", |s| cell(&s["id"])),
            ("STATE", |s| cell(&s["state"])),
            ("TENANT", |s| cell(&s["tenant"])),
            ("KEY", |s| cell(&s["session_key"])),
            ("GATEWAY", |s| cell(&s["gateway"])),
            ("AGENT", |s| cell(&s["agent"])),
            ("TASK", |s| cell(&s["task"])),
            ("TURNS", |s| cell(&s["turns"])),
            ("GEN", |s| cell(&s["generation"])),
            ("LIVE", |s| cell(&s["live"])),
            ("REASON", |s| clip(&cell(&s["reason"]), 60)),
        ],
        View::Nodes => &[
            ("ID", |n| cell(&n["id"])),
            ("REGION", |n| cell(&n["region"])),
            ("API", |n| cell(&n["api_addr"])),
            ("DRAINING", |n| cell(&n["draining"])),
            ("HEARTBEAT AGE", |n| match n["heartbeat_age_ms"].as_u64() {
                Some(ms) => format!("{ms} ms"),
                None => "-".into(),
            }),
        ],
        View::Keys => &[
            ("ID", |k| cell(&k["id"])),
            ("NAME", |k| cell(&k["name"])),
            ("ROLE", |k| cell(&k["role"])),
            ("TENANT", |k| cell(&k["tenant"])),
            ("PREFIX", |k| cell(&k["prefix"])),
            ("STATE", |k| key_state(k)),
            ("EXPIRES", |k| cell(&k["expires_at"])),
            ("LAST USED", |k| cell(&k["last_used_at"])),
        ],
        View::Tenants => &[
            ("NAME", |t| cell(&t["name"])),
            ("WEIGHT", |t| cell(&t["weight"])),
            ("MAX QUEUED", |t| cell(&t["max_queued"])),
            ("RATE/S", |t| cell(&t["rate_per_second"])),
            ("BURST", |t| cell(&t["burst"])),
            ("QUEUED", |t| cell(&t["queued"])),
        ],
        View::Jwts => &[
            ("JTI", |j| cell(&j["jti"])),
            ("REVOKED UNTIL", |j| cell(&j["until"])),
        ],
        View::Audit => &[
            ("SEQ", |e| cell(&e["seq"])),
            ("TIME", |e| cell(&e["time"])),
            ("ACTOR", |e| cell(&e["actor"])),
            ("TENANT", |e| cell(&e["tenant"])),
            ("ACTION", |e| cell(&e["action"])),
            ("TARGET", |e| cell(&e["target"])),
            ("OUTCOME", |e| cell(&e["outcome"])),
            ("HASH", |e| clip(&cell(&e["hash"]), 12)),
        ],
        View::Queue | View::Cluster | View::Usage | View::Fields => &[],
    }
}

/// `items` as the view's table; a line saying so when there are none.
/// `GET /usage`: a row per group (the columns grouped by, then the
/// sums), then the waits for a first lease.
fn usage(v: &Value) -> String {
    let by: Vec<&str> = v["group_by"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let sums = crate::api::usage::SUMS;
    let head: Vec<String> = by.iter().chain(&sums).map(|h| h.to_uppercase()).collect();
    let rows: Vec<Vec<String>> = v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| by.iter().chain(&sums).map(|k| cell(&i[*k])).collect())
                .collect()
        })
        .unwrap_or_default();
    let mut out = if rows.is_empty() {
        "(none)".to_owned()
    } else {
        let head: Vec<&str> = head.iter().map(String::as_str).collect();
        grid(&head, &rows)
    };
    let waits: Vec<Vec<String>> = v["waits"]
        .as_array()
        .map(|w| {
            w.iter()
                .map(|r| {
                    ["tenant", "priority", "tasks", "mean_wait_ms", "max_wait_ms"]
                        .iter()
                        .map(|k| cell(&r[*k]))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    if !waits.is_empty() {
        out.push_str("\n\nwaits for a first lease:\n");
        out.push_str(&grid(
            &["TENANT", "PRIORITY", "TASKS", "MEAN_WAIT_MS", "MAX_WAIT_MS"],
            &waits,
        ));
    }
    let _ = write!(out, "\n\ndays {} to {}", cell(&v["from"]), cell(&v["to"]));
    out
}

fn table(view: View, items: &[Value]) -> String {
    let cols = columns(view);
    if cols.is_empty() {
        return items.iter().map(fields).collect::<Vec<_>>().join("\n\n");
    }
    if items.is_empty() {
        return "(none)".to_owned();
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| cols.iter().map(|(_, f)| f(item)).collect())
        .collect();
    grid(&cols.iter().map(|(h, _)| *h).collect::<Vec<_>>(), &rows)
}

/// Left-aligned columns two spaces apart; the last one is not padded.
fn grid(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ");
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = vec![line(&mut head.iter().copied())];
    out.extend(rows.iter().map(|r| line(&mut r.iter().map(String::as_str))));
    out.join("\n")
}

/// A task's region and whether it is required.
fn region(t: &Value) -> String {
    match (t["region"].as_str(), t["region_required"].as_bool()) {
        (Some(r), Some(true)) => format!("{r} (required)"),
        (Some(r), _) => format!("{r} (preferred)"),
        (None, _) => cell(&Value::Null),
    }
}

/// One task: its fields, then its payload and result in full.
fn task(t: &Value) -> String {
    let mut s = kv(&[
        ("id", cell(&t["id"])),
        ("status", cell(&t["status"])),
        ("priority", cell(&t["priority"])),
        ("tenant", cell(&t["tenant"])),
        ("session key", cell(&t["session_key"])),
        ("capabilities", list(&t["capabilities"])),
        ("agent", cell(&t["agent_id"])),
        (
            "attempts",
            format!(
                "{} failed of {} allowed, {} leases",
                cell(&t["attempt_count"]),
                cell(&t["max_attempts"]),
                cell(&t["lease_count"])
            ),
        ),
        ("lease", lease(&t["lease"])),
        ("created", cell(&t["created_at"])),
        ("updated", cell(&t["updated_at"])),
        ("scheduled at", cell(&t["scheduled_at"])),
        ("next attempt", cell(&t["next_attempt_at"])),
        ("parent", cell(&t["parent_id"])),
        ("depends on", depends_on(t)),
        ("approval", approval(&t["approval"])),
        ("region", region(t)),
        ("waiting for", cell(&t["waiting_for"])),
        ("usage", usage_of(&t["usage"])),
        ("idempotency key", cell(&t["idempotency_key"])),
        ("trace", cell(&t["trace_id"])),
        ("error", cell(&t["error"])),
    ]);
    for (label, key) in [("payload", "payload"), ("result", "result")] {
        if !t[key].is_null() {
            let _ = write!(s, "\n{label}:\n{}", indent(&pretty(&t[key])));
        }
    }
    s
}

/// What a task's completed attempt used: tokens in and out, the model,
/// the time.
fn usage_of(u: &Value) -> String {
    if u.is_null() {
        return "-".into();
    }
    let model = u["model"]
        .as_str()
        .map(|m| format!(", {m}"))
        .unwrap_or_default();
    format!(
        "{} tokens in, {} out{model}, {} ms",
        cell(&u["input_tokens"]),
        cell(&u["output_tokens"]),
        cell(&u["compute_ms"])
    )
}

/// A task's approval: asked (and until when), or who decided how.
fn approval(a: &Value) -> String {
    if a.is_null() {
        return "-".into();
    }
    let d = &a["decision"];
    if d.is_null() {
        return match a["expires_at"].as_str() {
            Some(at) => format!("awaited, lapses at {at}"),
            None => "awaited".into(),
        };
    }
    let how = if d["approved"] == true {
        "approved"
    } else {
        "rejected"
    };
    let why = d["reason"]
        .as_str()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!("{how} by {} at {}{why}", cell(&d["by"]), cell(&d["at"]))
}

/// A task's dependencies and, with them, its policy (`-` without).
fn depends_on(t: &Value) -> String {
    match t["depends_on"].as_array() {
        Some(a) if !a.is_empty() => format!(
            "{} (if one fails: {})",
            list(&t["depends_on"]),
            cell(&t["on_dependency_failure"])
        ),
        _ => "-".into(),
    }
}

fn lease(l: &Value) -> String {
    if l.is_null() {
        return "-".into();
    }
    let mut parts = vec![format!("token {}", cell(&l["fencing_token"]))];
    for (label, key) in [("agent", "agent_id"), ("expires", "expires_at")] {
        if !l[key].is_null() {
            parts.push(format!("{label} {}", cell(&l[key])));
        }
    }
    parts.join(", ")
}

/// `queue depth`: ready tasks per priority, then every status per tenant.
fn queue(v: &Value) -> String {
    const PRIORITIES: [&str; 4] = ["critical", "high", "medium", "low"];
    const STATUSES: [&str; 9] = [
        "waiting",
        "pending",
        "scheduled",
        "leased",
        "running",
        "failed",
        "dead_letter",
        "completed",
        "cancelled",
    ];
    let mut s = format!("pending: {}\n\n", cell(&v["pending"]));
    let by_p = &v["by_priority"];
    s.push_str(&grid(
        &["PRIORITY", "critical", "high", "medium", "low"],
        &[std::iter::once("ready".to_owned())
            .chain(PRIORITIES.iter().map(|p| cell(&by_p[*p])))
            .collect()],
    ));
    let mut head = vec!["TENANT"];
    head.extend(STATUSES);
    let mut rows: Vec<Vec<String>> = Vec::new();
    if let Some(tenants) = v["by_tenant"].as_object() {
        for (name, counts) in tenants {
            rows.push(
                std::iter::once(name.clone())
                    .chain(STATUSES.iter().map(|k| cell(&counts[*k])))
                    .collect(),
            );
        }
    }
    rows.push(
        std::iter::once("(all)".to_owned())
            .chain(STATUSES.iter().map(|k| cell(&v["by_status"][*k])))
            .collect(),
    );
    s.push_str("\n\n");
    s.push_str(&grid(&head, &rows));
    s
}

/// `cluster status`: this node's view, then the members.
fn cluster(v: &Value) -> String {
    let mut s = kv(&[
        ("node", cell(&v["node_id"])),
        ("state", cell(&v["state"])),
        ("leader", cell(&v["leader"])),
        ("term", cell(&v["term"])),
        ("region", cell(&v["region"])),
        (
            "log",
            format!(
                "last {}, applied {}, snapshot {}",
                cell(&v["last_log_index"]),
                cell(&v["applied_index"]),
                cell(&v["snapshot_index"])
            ),
        ),
        (
            "quorum ack",
            match v["millis_since_quorum_ack"].as_u64() {
                Some(ms) => format!("{ms} ms ago"),
                None => "-".into(),
            },
        ),
    ]);
    let members = v["members"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                cell(&m["id"]),
                cell(&m["role"]),
                if m["leader"].as_bool() == Some(true) {
                    "*"
                } else {
                    ""
                }
                .into(),
                cell(&m["matched_index"]),
                cell(&m["info"]["region"]),
                cell(&m["info"]["api_addr"]),
                cell(&m["info"]["raft_addr"]),
            ]
        })
        .collect();
    s.push_str("\n\n");
    s.push_str(&grid(
        &["ID", "ROLE", "LEADER", "MATCHED", "REGION", "API", "RAFT"],
        &rows,
    ));
    s
}

/// Every top-level field, `name: value`; nested values as compact JSON.
fn fields(v: &Value) -> String {
    match v.as_object() {
        Some(map) => {
            let pairs: Vec<(&str, String)> =
                map.iter().map(|(k, v)| (k.as_str(), cell(v))).collect();
            kv(&pairs)
        }
        None => pretty(v),
    }
}

/// Aligned `label: value` lines.
fn kv<S: AsRef<str>>(pairs: &[(&str, S)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {}", format!("{k}:"), v.as_ref()))
        .map(|l| l.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A JSON value as a table cell: `-` for null, strings bare.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.replace(['\n', '\t'], " "),
        other => other.to_string(),
    }
}

/// An array of strings, comma-separated (`-` when empty).
fn list(v: &Value) -> String {
    match v.as_array() {
        Some(a) if !a.is_empty() => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Some(_) => "-".into(),
        None => cell(v),
    }
}

fn key_state(k: &Value) -> String {
    if k["live"].as_bool() == Some(true) {
        "live".into()
    } else if !k["revoked_at"].is_null() {
        format!("revoked {}", cell(&k["revoked_at"]))
    } else {
        "expired".into()
    }
}

/// At most `max` characters, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `godel status`: `all` holds the answers of `cluster`, `nodes`, `queue`
/// (depth), `gateways` and `agents`.
pub fn summary(all: &Value) -> String {
    let c = &all["cluster"];
    let members = c["members"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let voters = members.iter().filter(|m| m["role"] == "voter").count();
    let q = &all["queue"];
    let p = &q["by_priority"];
    let items = |k: &str| all[k]["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let (gateways, agents, nodes) = (items("gateways"), items("agents"), items("nodes"));
    let count =
        |list: &[Value], key: &str, want: &str| list.iter().filter(|x| x[key] == want).count();
    let load: u64 = agents
        .iter()
        .filter_map(|a| a["current_load"].as_u64())
        .sum();
    let capacity: u64 = agents.iter().filter_map(|a| a["capacity"].as_u64()).sum();
    let draining: Vec<String> = nodes
        .iter()
        .filter(|n| n["draining"].as_bool() == Some(true))
        .map(|n| cell(&n["id"]))
        .collect();
    let mut s = kv(&[
        (
            "cluster",
            format!(
                "leader {}, term {}, members {} (voters {voters}), answered by node {} ({})",
                cell(&c["leader"]),
                cell(&c["term"]),
                members.len(),
                cell(&c["node_id"]),
                cell(&c["state"])
            ),
        ),
        (
            "nodes",
            format!(
                "{} registered, draining: {}",
                nodes.len(),
                if draining.is_empty() {
                    "none".to_owned()
                } else {
                    draining.join(",")
                }
            ),
        ),
        (
            "queue",
            format!(
                "{} pending (critical {}, high {}, medium {}, low {}), {} leased, {} running, {} dead letters",
                cell(&q["pending"]),
                cell(&p["critical"]),
                cell(&p["high"]),
                cell(&p["medium"]),
                cell(&p["low"]),
                cell(&q["by_status"]["leased"]),
                cell(&q["by_status"]["running"]),
                cell(&q["by_status"]["dead_letter"])
            ),
        ),
        (
            "gateways",
            format!(
                "{} ({} healthy, {} circuit open)",
                gateways.len(),
                count(gateways, "health", "healthy"),
                count(gateways, "circuit", "open")
            ),
        ),
        (
            "agents",
            format!(
                "{} ({} idle, {} busy, {} offline), load {load}/{capacity}",
                agents.len(),
                count(agents, "status", "idle"),
                count(agents, "status", "busy"),
                count(agents, "status", "offline")
            ),
        ),
    ]);
    s.push_str("\n\n");
    s.push_str(&table(View::Nodes, nodes));
    s.push('\n');
    s
}
