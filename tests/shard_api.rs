//! The HTTP API of a three-node cluster with three queue shards
//! (`cluster.shards = 3`, `docs/shards.md` step 3), end to end over real
//! `godel serve` processes.
//!
//! What it proves:
//!
//! - a submission goes to the shard its key names (`1 + fnv1a(tenant, 0,
//!   key) mod 3`, its id's low byte), whichever node takes it: the tasks
//!   cover all three shards, a session key always lands in the same shard,
//!   an idempotent resubmission through another node returns the first task
//!   with 200, and every task reads back on every node;
//! - the task list merges the shards: paged by 7 with its cursor, alone and
//!   with a priority filter, it yields every task once, in id order, and
//!   the queue depth sums the shards;
//! - an external worker's lease keeps strict priority over the shards: it
//!   gets every medium task before any low one, and a critical task
//!   submitted into shard 3 or 2 while the other shards hold low work is the
//!   next one leased; a lease completes through another node;
//! - a task failed without retry is a dead letter on every node; a replay
//!   naming it with a missing task (in another shard, in its own shard, or
//!   in no shard) is refused and changes nothing, and alone it puts the
//!   task back in the queue;
//! - cancel works through any node, and ids naming no shard (or no task of
//!   an existing shard) are 404 on get, cancel and retry;
//! - task, lease and replay writes are audited in their shard's chain only,
//!   never in the meta group's; an unknown group is a 404; and
//!   `godel audit verify` walks and verifies all four chains, over the API
//!   and from a stopped node's data directory.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Api, BIN, Cluster, bounded, deadline, wait_until};

const SHARDED: &str = "[cluster]\nshards = 3\n";
const TEST_BOUND: Duration = Duration::from_secs(240);
const SETTLE: Duration = Duration::from_secs(40);
/// Tasks of the first batch.
const BATCH: usize = 60;

/// The shard an id, fencing token or session id names.
fn shard_of(id: u64) -> u64 {
    id & 0xff
}

/// The shard a task with `key` of `tenant` is routed to: `1 + h mod 3`,
/// `h` the 64-bit FNV-1a of the tenant, a zero byte and the key.
fn route(tenant: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    1 + h % 3
}

/// What the test knows of one task.
#[derive(Clone, Debug)]
struct Known {
    priority: &'static str,
    status: &'static str,
}

/// The test's model of the queue and of the audited writes.
#[derive(Default)]
struct Model {
    tenant: String,
    tasks: BTreeMap<u64, Known>,
    /// Accepted `POST /tasks` calls per shard (first submissions and
    /// idempotent repeats alike).
    submits: BTreeMap<u64, usize>,
    /// Submissions sent again after a 503/504/429 or a lost connection
    /// (each may have been applied, and audited, once more).
    resent: usize,
}

impl Model {
    fn count(&self, priority: Option<&str>, status: &str) -> u64 {
        self.tasks
            .values()
            .filter(|k| priority.is_none_or(|p| k.priority == p) && k.status == status)
            .count() as u64
    }

    fn ids_where(&self, f: impl Fn(&Known) -> bool) -> Vec<u64> {
        self.tasks
            .iter()
            .filter(|(_, k)| f(k))
            .map(|(id, _)| *id)
            .collect()
    }

    fn set(&mut self, id: u64, status: &'static str) {
        self.tasks.get_mut(&id).expect("a known task").status = status;
    }
}

fn priority_name(p: &str) -> &'static str {
    match p {
        "low" => "low",
        "medium" => "medium",
        "high" => "high",
        "critical" => "critical",
        other => panic!("unknown priority {other}"),
    }
}

/// An HTTP answer: status and JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

/// `POST /tasks` on node `i`, sent again while the answer is "not now"
/// (every body here has an idempotency key, so a resend cannot duplicate).
/// Records the accepted call in `m`; returns the answer.
async fn submit(api: &Api, m: &mut Model, i: usize, body: &Value) -> Answer {
    assert!(body["idempotency_key"].is_string(), "resendable: {body}");
    let until = deadline(Duration::from_secs(20));
    loop {
        let last = match api.post(i, "/api/v1/tasks", body).await {
            Ok(r) if matches!(r.status, 429 | 503 | 504) => format!("{r:?}"),
            Ok(r) => {
                if matches!(r.status, 200 | 201) {
                    let id = r.body["id"].as_u64().expect("task id");
                    *m.submits.entry(shard_of(id)).or_default() += 1;
                }
                return Answer {
                    status: r.status,
                    body: r.body,
                };
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(
            Instant::now() < until,
            "POST /tasks on node index {i} kept failing: {last}"
        );
        m.resent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node sees a leader for every group, the same ones,
/// with the three shard leaders on three different nodes (the leaders have
/// been spread and stay put for a while, so no write meets a hand-over).
async fn wait_spread(c: &Cluster) {
    let api = c.api();
    wait_until(
        "the shard leaders to spread",
        deadline(SETTLE),
        async || {
            c.check_alive()?;
            let mut seen: Option<Vec<u64>> = None;
            for i in 0..c.len() {
                let view = api.cluster(i).await?;
                if view["shard_count"] != 3 {
                    bail!("node {i}: shard_count {}", view["shard_count"]);
                }
                let groups = view["groups"].as_array().cloned().unwrap_or_default();
                let ids: Vec<u64> = groups.iter().filter_map(|g| g["group"].as_u64()).collect();
                if ids != [0, 1, 2, 3] {
                    bail!("node {i}: groups {ids:?}");
                }
                let mut leaders = Vec::new();
                for g in &groups {
                    match g["leader"].as_u64() {
                        Some(l) => leaders.push(l),
                        None => bail!("node {i}: group {} has no leader", g["group"]),
                    }
                }
                if seen.as_ref().is_some_and(|s| s != &leaders) {
                    bail!("nodes disagree on the leaders: {seen:?} vs {leaders:?}");
                }
                seen = Some(leaders);
            }
            let leaders = seen.unwrap_or_default();
            let shards: BTreeSet<u64> = leaders[1..].iter().copied().collect();
            if shards.len() != 3 {
                bail!("shard leaders not spread yet: {leaders:?}");
            }
            Ok(leaders)
        },
    )
    .await;
}

/// Every id of `GET {path}?limit={limit}&{query}` page by page, each page
/// read through the next node; checks that every page but the last is full.
async fn page_through(api: &Api, path: &str, query: &str, limit: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0usize;
    loop {
        let mut p = format!("{path}?limit={limit}&{query}");
        if let Some(c) = &cursor {
            p.push_str(&format!("&cursor={c}"));
        }
        let page = api.get_ok(pages % api.len(), &p).await;
        pages += 1;
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= limit, "page {pages} of {p}: {page}");
        ids.extend(items.iter().map(|t| t["id"].as_u64().expect("id")));
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(items.len(), limit, "a page before the end is full: {page}");
                assert_eq!(
                    c,
                    items.last().expect("a full page")["id"].to_string(),
                    "the cursor is the page's last id"
                );
                cursor = Some(c.to_owned());
            }
            None => return ids,
        }
        assert!(pages < 1000, "paging {path} does not end");
    }
}

/// One lease for worker `w1` through node `i`; the grant.
async fn lease_one(api: &Api, i: usize) -> Value {
    let r = api
        .post(
            i,
            "/api/v1/leases",
            &json!({"agent_id": "w1", "capabilities": [], "max": 1, "lease_ms": 30000}),
        )
        .await
        .expect("POST /leases");
    assert_eq!(r.status, 200, "{r:?}");
    let leases = r.body["leases"].as_array().expect("leases");
    assert_eq!(leases.len(), 1, "one lease granted: {r:?}");
    let g = leases[0].clone();
    let id = g["task_id"].as_u64().expect("task_id");
    let token = g["fencing_token"].as_u64().expect("fencing_token");
    assert_eq!(g["task"]["id"], id, "{g}");
    assert_eq!(g["task"]["status"], "leased", "{g}");
    assert_eq!(g["task"]["lease"]["fencing_token"], token, "{g}");
    assert_eq!(
        shard_of(token),
        shard_of(id),
        "a token names its task's shard: {g}"
    );
    g
}

/// `POST {path}` on node `i` that must answer 200; the body.
async fn post_ok(api: &Api, i: usize, path: &str, body: &Value) -> Value {
    let r = api.post(i, path, body).await.expect("POST");
    assert_eq!(r.status, 200, "POST {path} on node index {i}: {r:?}");
    r.body
}

/// Every entry of group `g`'s audit chain, oldest first.
async fn audit_chain(api: &Api, i: usize, g: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut p = format!("/api/v1/audit?group={g}&limit=1000");
        if let Some(c) = &cursor {
            p.push_str(&format!("&cursor={c}"));
        }
        let page = api.get_ok(i, &p).await;
        out.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_routes_merges_and_leases_across_three_shards() {
    let t0 = Instant::now();
    let mut c = Cluster::start_with(3, SHARDED).await;
    bounded(TEST_BOUND, async {
        wait_spread(&c).await;
        eprintln!("[test] shard leaders spread at {:?}", t0.elapsed());
        let api = c.api();
        let mut m = Model::default();
        submissions(&api, &mut m).await;
        eprintln!("[test] submitted at {:?}", t0.elapsed());
        listing_and_depth(&api, &m).await;
        strict_priority(&api, &mut m).await;
        eprintln!("[test] leased at {:?}", t0.elapsed());
        dead_letters(&api, &mut m).await;
        cancel_and_unknown_ids(&api, &mut m).await;
        final_state(&api, &m).await;
        audit(&api, &m).await;
        verify_with_the_cli(&c).await;
        eprintln!("[test] done at {:?}", t0.elapsed());
    })
    .await;
    verify_offline(&mut c);
}

/// Step 1: routing, reads by id on every node, sessions and idempotency.
async fn submissions(api: &Api, m: &mut Model) {
    // Session key, else idempotency key: the routing key of task i.
    let mut keys: BTreeMap<u64, String> = BTreeMap::new();
    let mut bodies: Vec<(u64, Value)> = Vec::new();
    for i in 0..BATCH {
        let priority = if i % 5 == 0 { "medium" } else { "low" };
        let mut body = json!({
            "payload": {"n": i},
            "priority": priority,
            "idempotency_key": format!("idem-{i}"),
        });
        // Every sixth task has no session key: its idempotency key routes it.
        let key = if i % 6 == 5 {
            format!("idem-{i}")
        } else {
            body["session_key"] = json!(format!("sess-{i}"));
            format!("sess-{i}")
        };
        let r = submit(api, m, i % 3, &body).await;
        assert_eq!(r.status, 201, "{r:?}");
        let t = &r.body;
        let id = t["id"].as_u64().expect("id");
        assert_eq!(t["status"], "pending", "{t}");
        assert_eq!(t["priority"], priority, "{t}");
        let tenant = t["tenant"].as_str().expect("tenant").to_owned();
        if m.tenant.is_empty() {
            m.tenant = tenant;
        } else {
            assert_eq!(m.tenant, tenant, "one tenant: the admin key's");
        }
        assert_eq!(
            shard_of(id),
            route(&m.tenant, &key),
            "task {i} (key {key}) is in the shard its key routes to: {t}"
        );
        assert!(
            m.tasks
                .insert(
                    id,
                    Known {
                        priority: priority_name(priority),
                        status: "pending",
                    }
                )
                .is_none(),
            "ids are unique: {id}"
        );
        keys.insert(id, key);
        bodies.push((id, body));
    }
    let shards: BTreeMap<u64, usize> = m.tasks.keys().fold(BTreeMap::new(), |mut acc, id| {
        *acc.entry(shard_of(*id)).or_default() += 1;
        acc
    });
    eprintln!("[test] tasks per shard: {shards:?}");
    assert_eq!(
        shards.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3],
        "every shard got tasks, and no id names another group"
    );

    // The same idempotency key through another node: the first task, 200.
    for (n, (id, body)) in bodies.iter().enumerate() {
        let r = submit(api, m, (n + 1) % 3, body).await;
        assert_eq!(r.status, 200, "a repeat is not a new task: {r:?}");
        assert_eq!(r.body["id"], *id, "{r:?}");
    }

    // A session key used again, through a third node: the same shard.
    for i in (0..BATCH).filter(|i| i % 6 != 5).take(6) {
        let body = json!({
            "payload": {"again": i},
            "priority": "low",
            "session_key": format!("sess-{i}"),
            "idempotency_key": format!("again-{i}"),
        });
        let r = submit(api, m, (i + 2) % 3, &body).await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().expect("id");
        let first = *keys
            .iter()
            .find(|(_, k)| **k == format!("sess-{i}"))
            .expect("the first task of the session")
            .0;
        assert_ne!(id, first, "a new task");
        assert_eq!(
            shard_of(id),
            shard_of(first),
            "session sess-{i}: {id} and {first} share a shard"
        );
        assert_eq!(r.body["session_key"], format!("sess-{i}"));
        m.tasks.insert(
            id,
            Known {
                priority: "low",
                status: "pending",
            },
        );
    }

    // Every task reads back, the same, on every node.
    for (id, k) in &m.tasks {
        for i in 0..api.len() {
            let t = api.get_ok(i, &format!("/api/v1/tasks/{id}")).await;
            assert_eq!(t["id"], *id, "{t}");
            assert_eq!(t["priority"], k.priority, "{t}");
            assert_eq!(t["status"], "pending", "{t}");
        }
    }
}

/// Steps 2 and 3: merged pages by 7 and the summed depth.
async fn listing_and_depth(api: &Api, m: &Model) {
    let all: Vec<u64> = m.tasks.keys().copied().collect();
    let paged = page_through(api, "/api/v1/tasks", "", 7).await;
    assert_eq!(paged, all, "every task once, in id order, over the shards");
    for p in ["medium", "low"] {
        let want = m.ids_where(|k| k.priority == p);
        assert!(!want.is_empty());
        let got = page_through(api, "/api/v1/tasks", &format!("priority={p}"), 7).await;
        assert_eq!(got, want, "priority={p}: every such task once, in id order");
    }
    let pending = page_through(api, "/api/v1/tasks", "status=pending&priority=medium", 5).await;
    assert_eq!(pending, m.ids_where(|k| k.priority == "medium"));

    for i in 0..api.len() {
        let d = api.depth(i).await;
        assert_eq!(d["pending"], m.tasks.len(), "depth sums the shards: {d}");
        assert_eq!(d["by_status"]["pending"], m.tasks.len(), "{d}");
        assert_eq!(d["by_status"]["leased"], 0, "{d}");
        assert_eq!(
            d["by_priority"]["medium"],
            m.count(Some("medium"), "pending"),
            "{d}"
        );
        assert_eq!(
            d["by_priority"]["low"],
            m.count(Some("low"), "pending"),
            "{d}"
        );
        assert_eq!(d["by_tenant"][&m.tenant]["pending"], m.tasks.len(), "{d}");
    }
}

/// Step 4: strict priority over the shards for an external worker, and
/// completion through another node.
async fn strict_priority(api: &Api, m: &mut Model) {
    let mediums = m.ids_where(|k| k.priority == "medium");
    let medium_shards: BTreeSet<u64> = mediums.iter().map(|id| shard_of(*id)).collect();
    assert!(
        medium_shards.len() >= 2,
        "medium work in several shards: {mediums:?}"
    );
    // Every medium task comes before any low one, whichever shard holds it.
    let mut grants = Vec::new();
    for k in 0..mediums.len() {
        let g = lease_one(api, k % 3).await;
        assert_eq!(
            g["task"]["priority"], "medium",
            "lease {k}: medium tasks are still ready, yet: {g}"
        );
        grants.push((k % 3, g));
    }
    let leased: Vec<u64> = {
        let mut v: Vec<u64> = grants
            .iter()
            .map(|(_, g)| g["task_id"].as_u64().expect("id"))
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(leased, mediums, "every medium task, each once");
    for id in &leased {
        m.set(*id, "leased");
    }
    let d = api.depth(1).await;
    assert_eq!(d["pending"], m.count(None, "pending"), "{d}");
    assert_eq!(d["by_status"]["leased"], mediums.len(), "{d}");
    assert_eq!(d["by_priority"]["medium"], 0, "{d}");

    // Each completed through another node than the one that leased it.
    for (n, (at, g)) in grants.iter().enumerate() {
        let token = g["fencing_token"].as_u64().expect("token");
        let id = g["task_id"].as_u64().expect("id");
        let t = post_ok(
            api,
            (at + 1) % 3,
            &format!("/api/v1/leases/{token}/complete"),
            &json!({"result": {"n": n}}),
        )
        .await;
        assert_eq!(t["id"], id, "{t}");
        assert_eq!(t["status"], "completed", "{t}");
        let seen = api
            .get_ok((at + 2) % 3, &format!("/api/v1/tasks/{id}"))
            .await;
        assert_eq!(seen["status"], "completed", "{seen}");
        assert_eq!(seen["result"], json!({"n": n}), "{seen}");
        m.set(id, "completed");
    }

    // Only low work is ready now, in every shard. A critical task routed
    // to shard 3, then one to shard 2 (shard 1 wins ties, so these are the
    // shards a wrong choice would skip), is the next lease each time.
    let lows: BTreeSet<u64> = m
        .ids_where(|k| k.status == "pending")
        .iter()
        .map(|id| shard_of(*id))
        .collect();
    assert_eq!(
        lows.into_iter().collect::<Vec<_>>(),
        [1, 2, 3],
        "low work in every shard"
    );
    let d = api.depth(2).await;
    assert_eq!(d["pending"], d["by_priority"]["low"], "only low work: {d}");
    for (n, shard) in [3u64, 2].into_iter().enumerate() {
        let key = (0..)
            .map(|j| format!("crit-{j}"))
            .find(|k| route(&m.tenant, k) == shard)
            .expect("a key for the shard");
        let body = json!({
            "payload": {"critical": n},
            "priority": "critical",
            "session_key": key,
            "idempotency_key": key,
        });
        let r = submit(api, m, n % 3, &body).await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().expect("id");
        assert_eq!(shard_of(id), shard, "{r:?}");
        m.tasks.insert(
            id,
            Known {
                priority: "critical",
                status: "pending",
            },
        );
        let at = (n + 1) % 3;
        let g = lease_one(api, at).await;
        assert_eq!(
            g["task_id"], id,
            "the critical task in shard {shard} goes first: {g}"
        );
        assert_eq!(g["task"]["priority"], "critical", "{g}");
        let token = g["fencing_token"].as_u64().expect("token");
        let done = post_ok(
            api,
            (at + 1) % 3,
            &format!("/api/v1/leases/{token}/complete"),
            &json!({"result": "ok"}),
        )
        .await;
        assert_eq!(done["status"], "completed", "{done}");
        let seen = api.get_ok(at, &format!("/api/v1/tasks/{id}")).await;
        assert_eq!(seen["status"], "completed", "{seen}");
        assert_eq!(seen["result"], "ok", "{seen}");
        m.set(id, "completed");
    }
}

/// The dead-letter ids every node lists.
async fn dead_letter_ids(api: &Api) -> Vec<Vec<u64>> {
    let mut out = Vec::new();
    for i in 0..api.len() {
        let page = api.get_ok(i, "/api/v1/dead-letter?limit=100").await;
        out.push(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|t| {
                    assert_eq!(t["status"], "dead_letter", "{t}");
                    t["id"].as_u64().expect("id")
                })
                .collect(),
        );
    }
    out
}

/// Step 5: a dead letter, replays refused whole, then replayed.
async fn dead_letters(api: &Api, m: &mut Model) {
    let g = lease_one(api, 2).await;
    assert_eq!(g["task"]["priority"], "low", "only low work is left: {g}");
    let id = g["task_id"].as_u64().expect("id");
    let token = g["fencing_token"].as_u64().expect("token");
    let t = post_ok(
        api,
        0,
        &format!("/api/v1/leases/{token}/fail"),
        &json!({"error": "boom", "retryable": false}),
    )
    .await;
    assert_eq!(t["status"], "dead_letter", "{t}");
    assert_eq!(t["error"], "boom", "{t}");
    m.set(id, "dead_letter");
    assert_eq!(dead_letter_ids(api).await, vec![vec![id]; 3]);

    // Missing tasks: in another shard, in its own shard, in no shard.
    let other = shard_of(id) % 3 + 1;
    let bogus = [
        (0xabcde << 8) | other,
        (0xabcde << 8) | shard_of(id),
        (0xabcde << 8),
        200,
    ];
    for (n, b) in bogus.into_iter().enumerate() {
        assert!(!m.tasks.contains_key(&b));
        let r = api
            .post(
                n % 3,
                "/api/v1/dead-letter/replay",
                &json!({"ids": [id, b]}),
            )
            .await
            .expect("POST replay");
        assert!(
            (400..500).contains(&r.status),
            "a replay naming missing task {b} is refused: {r:?}"
        );
        assert!(r.body["error"]["code"].is_string(), "{r:?}");
        let t = api
            .get_ok((n + 1) % 3, &format!("/api/v1/tasks/{id}"))
            .await;
        assert_eq!(
            t["status"], "dead_letter",
            "a refused replay changes nothing: {t}"
        );
    }
    assert_eq!(dead_letter_ids(api).await, vec![vec![id]; 3]);

    let r = post_ok(api, 1, "/api/v1/dead-letter/replay", &json!({"ids": [id]})).await;
    assert_eq!(r["replayed"], json!([id]), "{r}");
    for i in 0..api.len() {
        let t = api.get_ok(i, &format!("/api/v1/tasks/{id}")).await;
        assert_eq!(t["status"], "pending", "replayed: {t}");
    }
    m.set(id, "pending");
    assert_eq!(dead_letter_ids(api).await, vec![Vec::<u64>::new(); 3]);
}

/// Step 6: cancel through a node; ids naming no shard or no task are 404.
async fn cancel_and_unknown_ids(api: &Api, m: &mut Model) {
    let pending = m.ids_where(|k| k.status == "pending");
    // The last pending task of each shard, each through another node.
    for shard in 1..=3u64 {
        let id = *pending
            .iter()
            .rev()
            .find(|id| shard_of(**id) == shard)
            .expect("pending work in every shard");
        let t = post_ok(
            api,
            (shard as usize) % 3,
            &format!("/api/v1/tasks/{id}/cancel"),
            &json!({"reason": "not needed"}),
        )
        .await;
        assert_eq!(t["id"], id, "{t}");
        assert_eq!(t["status"], "cancelled", "{t}");
        for i in 0..api.len() {
            let t = api.get_ok(i, &format!("/api/v1/tasks/{id}")).await;
            assert_eq!(t["status"], "cancelled", "{t}");
        }
        m.set(id, "cancelled");
    }
    let max = m.tasks.keys().max().copied().expect("tasks");
    let unknown = [256 * 5, 200, 256 * 7 + 4, 255, (max | 0xff) + 1 + 2];
    for (n, id) in unknown.into_iter().enumerate() {
        for i in 0..api.len() {
            let r = api.get(i, &format!("/api/v1/tasks/{id}")).await.unwrap();
            r.assert_error(404, "not_found");
        }
        let r = api
            .post(n % 3, &format!("/api/v1/tasks/{id}/cancel"), &json!({}))
            .await
            .unwrap();
        r.assert_error(404, "not_found");
        let r = api
            .post(
                (n + 1) % 3,
                &format!("/api/v1/tasks/{id}/retry"),
                &json!({}),
            )
            .await
            .unwrap();
        r.assert_error(404, "not_found");
        let r = api
            .post(
                (n + 2) % 3,
                &format!("/api/v1/leases/{id}/complete"),
                &json!({}),
            )
            .await
            .unwrap();
        // A token naming no shard is no lease; one naming a shard but no
        // live lease there is a stale token.
        if (1..=3).contains(&shard_of(id)) {
            r.assert_error(409, "conflict");
        } else {
            r.assert_error(404, "not_found");
        }
    }
}

/// Every node's list and depth agree with the model.
async fn final_state(api: &Api, m: &Model) {
    for i in 0..api.len() {
        let listed: BTreeMap<u64, String> = api
            .list_tasks(i, "")
            .await
            .into_iter()
            .map(|t| {
                (
                    t["id"].as_u64().expect("id"),
                    t["status"].as_str().expect("status").to_owned(),
                )
            })
            .collect();
        let want: BTreeMap<u64, String> = m
            .tasks
            .iter()
            .map(|(id, k)| (*id, k.status.to_owned()))
            .collect();
        assert_eq!(listed, want, "node index {i} lists every task as it is");
        let d = api.depth(i).await;
        for s in ["pending", "leased", "completed", "cancelled", "dead_letter"] {
            assert_eq!(d["by_status"][s], m.count(None, s), "{s}: {d}");
        }
        assert_eq!(d["pending"], m.count(None, "pending"), "{d}");
    }
}

/// Step 7: every task write is in its shard's audit chain, none in the
/// meta group's.
async fn audit(api: &Api, m: &Model) {
    let meta = audit_chain(api, 0, 0).await;
    let queue_actions = ["tasks.", "leases.", "dead_letter."];
    let strays: Vec<&Value> = meta
        .iter()
        .filter(|e| {
            let a = e["action"].as_str().unwrap_or_default();
            queue_actions.iter().any(|p| a.starts_with(p))
        })
        .collect();
    assert!(
        strays.is_empty(),
        "task writes in the meta chain: {strays:?}"
    );

    let mut completes = 0;
    for g in 1..=3u64 {
        let chain = audit_chain(api, (g as usize) % 3, g).await;
        let ok = |action: &str| {
            chain
                .iter()
                .filter(|e| e["action"] == action && e["outcome"] == "ok")
                .count()
        };
        let submits = ok("tasks.submit");
        let want = m.submits.get(&g).copied().unwrap_or(0);
        assert!(
            (want..=want + m.resent).contains(&submits),
            "group {g}: {submits} submissions audited, {want} accepted ({} resent)",
            m.resent
        );
        completes += ok("leases.complete");
        for e in &chain {
            let target = e["target"].as_str().unwrap_or_default();
            let named = target
                .strip_prefix("task/")
                .or_else(|| target.strip_prefix("lease/"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(n) = named {
                assert_eq!(shard_of(n), g, "group {g} audits {e}");
            }
        }
        let cancelled: Vec<u64> = m
            .ids_where(|k| k.status == "cancelled")
            .into_iter()
            .filter(|id| shard_of(*id) == g)
            .collect();
        assert_eq!(cancelled.len(), 1);
        let target = format!("task/{}", cancelled[0]);
        assert!(
            chain
                .iter()
                .any(|e| e["action"] == "tasks.cancel" && e["target"] == target),
            "group {g} audits the cancel of {target}"
        );
        // Chained: each entry names the one before it.
        for w in chain.windows(2) {
            assert_eq!(w[1]["prev_hash"], w[0]["hash"], "group {g}: {w:?}");
            assert_eq!(
                w[1]["seq"].as_u64(),
                w[0]["seq"].as_u64().map(|s| s + 1),
                "group {g}: {w:?}"
            );
        }
    }
    assert_eq!(
        completes,
        m.count(None, "completed") as usize,
        "each completion audited once, in its shard"
    );
    let leases_failed: usize = {
        let mut n = 0;
        for g in 1..=3u64 {
            n += audit_chain(api, 1, g)
                .await
                .iter()
                .filter(|e| e["action"] == "leases.fail" && e["outcome"] == "ok")
                .count();
        }
        n
    };
    assert_eq!(leases_failed, 1, "the one failure, audited once");

    for bad in [4, 9] {
        let r = api
            .get(0, &format!("/api/v1/audit?group={bad}"))
            .await
            .unwrap();
        r.assert_error(404, "not_found");
    }
}

/// Step 8: `godel audit verify` over the API walks every group's chain.
async fn verify_with_the_cli(c: &Cluster) {
    let url = format!("http://{}", c.node(1).api_addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .env("GODEL_API_KEY", ADMIN_KEY)
            .args(["--api", &url, "audit", "verify"])
            .output()
            .expect("run godel")
    })
    .await
    .expect("join");
    every_chain_verified(&out);
}

/// Step 9: `godel audit verify --data-dir` on a stopped node's store walks
/// every group's chain too.
fn verify_offline(c: &mut Cluster) {
    assert!(
        c.terminate(2, Duration::from_secs(10)),
        "node index 2 stops cleanly"
    );
    let dir = c.node(2).data_dir();
    let out = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run godel");
    every_chain_verified(&out);
}

/// The output of `godel audit verify`: a header and a verdict for each of
/// the four groups, every chain verified and not empty.
fn every_chain_verified(out: &std::process::Output) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{all}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "a header and a verdict per group: {all}");
    for (g, pair) in lines.chunks(2).enumerate() {
        assert_eq!(pair[0], format!("group {g}:"), "{all}");
        assert!(
            pair[1].starts_with("audit chain verified: "),
            "group {g}: {all}"
        );
        let n: u64 = pair[1]["audit chain verified: ".len()..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(n > 0, "group {g} has entries: {all}");
    }
}
