//! Token accounting and tenant budgets over several queue shards
//! (`cluster.shards > 1`, `docs/shards.md` step 3): each shard keeps its own
//! usage ledger, and `GET /usage`, `GET /usage/export`, a tenant's budget
//! and its `/metrics` gauge must add up every shard's, not one.
//!
//! Two runs of one scenario, over real `godel serve` processes on 127.0.0.1:
//! one node with four shards, and three nodes with three shards (every call
//! rotated over the nodes, every read checked through each node).
//!
//! - One tenant submits tasks keyed so that each shard gets the same number
//!   (`1 + fnv1a(tenant, 0, key) mod N`); each task's id names the shard the
//!   key routes to, and each shard's audit chain holds the submissions of
//!   exactly its tasks: the placement is read from the API, not assumed.
//! - A worker of its own leases them over HTTP and completes each with
//!   usage in its result (`prompt_tokens`/`completion_tokens`), naming a
//!   model per shard (`m-1` .. `m-N`, all priced at the same rate), so every
//!   shard holds tokens of its own and `group_by=model` shows each shard's
//!   ledger as one row; one attempt first fails reporting usage (no model).
//! - `GET /usage?group_by=tenant` is the exact sum over every shard (tasks,
//!   failed attempts, tokens in and out, cost, unpriced tokens, first-lease
//!   waits), `group_by=tenant,model` has each shard's own sums, and the CSV
//!   export has the same totals. A reader of one shard's ledger would miss
//!   the others' tokens, which every shard has.
//! - A daily token budget of exactly the total refuses the tenant's next
//!   task on every node (429 `budget`, `Retry-After` until UTC midnight),
//!   not another tenant's, and `/metrics` shows it used up; one token more
//!   admits it on every node.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(180);
/// Longest wait for the shards to have leaders (and, with several nodes,
/// for their leaders to spread and stay put).
const SETTLE: Duration = Duration::from_secs(45);
const TENANT: &str = "acme";
/// The capability only this test's tasks and worker have.
const CAP: &str = "usage-shards";
/// The worker's name.
const WORKER: &str = "w-shards";
/// Tasks submitted into each shard.
const PER_SHARD: usize = 3;
/// The tokens of the one attempt that fails first (no model: unpriced).
const FAILED_IN: u64 = 20;
const FAILED_OUT: u64 = 4;
/// Every model's price, USD per million tokens: 3 and 15 micro-USD a token,
/// so every cost is a whole number of micro-USD.
const PRICE_IN: u64 = 3;
const PRICE_OUT: u64 = 15;

/// The node config: `shards` queue shards, and a price for each shard's
/// model `m-1` .. `m-{shards}`.
fn config(shards: u64) -> String {
    let mut c = format!("[cluster]\nshards = {shards}\n");
    for s in 1..=shards {
        c.push_str(&format!(
            "\n[prices.{}]\ninput_per_mtok = {PRICE_IN}.0\noutput_per_mtok = {PRICE_OUT}.0\n",
            model(s)
        ));
    }
    c
}

/// The model the worker names for a task of shard `s`.
fn model(s: u64) -> String {
    format!("m-{s}")
}

/// The shard an id or fencing token names (its low byte).
fn shard_of(id: u64) -> u64 {
    id & 0xff
}

/// The shard a task of `tenant` with `key` is routed to, over `n` shards:
/// `1 + h mod n`, `h` the 64-bit FNV-1a of the tenant, a zero byte and the
/// key (`fsm::route`).
fn route(tenant: &str, key: &str, n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    1 + h % n
}

/// Tokens in and out the worker reports for completing task `id`: distinct
/// per task, and per shard in their own range.
fn tokens_of(id: u64) -> (u64, u64) {
    let s = shard_of(id);
    (1000 * s + (id >> 8), 10 * s + 1)
}

/// What one shard's ledger should hold, as the test counts it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sums {
    completed: u64,
    failed_attempts: u64,
    input_tokens: u64,
    output_tokens: u64,
    /// Priced tokens' cost, in micro-USD.
    cost_micros: u64,
    unpriced_tokens: u64,
}

impl Sums {
    fn add(&mut self, o: &Sums) {
        self.completed += o.completed;
        self.failed_attempts += o.failed_attempts;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cost_micros += o.cost_micros;
        self.unpriced_tokens += o.unpriced_tokens;
    }

    fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    /// Checks a `GET /usage` row against these sums.
    fn check_row(&self, row: &Value, what: &str) {
        let got = Sums {
            completed: row["completed"].as_u64().expect("completed"),
            failed_attempts: row["failed_attempts"].as_u64().expect("failed_attempts"),
            input_tokens: row["input_tokens"].as_u64().expect("input_tokens"),
            output_tokens: row["output_tokens"].as_u64().expect("output_tokens"),
            cost_micros: micros(&row["cost_usd"]),
            unpriced_tokens: row["unpriced_tokens"].as_u64().expect("unpriced_tokens"),
        };
        assert_eq!(&got, self, "{what}: {row}");
        assert_eq!(row["lost_attempts"], 0, "{what}: {row}");
    }
}

/// A `cost_usd` in micro-USD.
fn micros(cost: &Value) -> u64 {
    let usd = cost.as_f64().unwrap_or_else(|| panic!("cost_usd {cost}"));
    (usd * 1e6).round() as u64
}

/// `POST` until the answer is not 503 (no leader, routes not yet known:
/// nothing was written). Only for calls a 503 leaves undone.
async fn post_through(api: &Api, i: usize, path: &str, body: &Value) -> Value {
    wait_until(
        &format!("POST {path} on node index {i}"),
        deadline(Duration::from_secs(20)),
        async || {
            let r = api.post(i, path, body).await?;
            if r.status == 503 {
                bail!("not now: {r:?}");
            }
            assert_eq!(r.status, 200, "POST {path} on node index {i}: {r:?}");
            Ok(r.body)
        },
    )
    .await
}

/// Waits until every node has the recorded shard count routed to, a
/// leader for every group, and all agree on them; with several nodes, until
/// the shard leaders have spread over them too (`docs/shards.md`: they then
/// stay put a while, so the test's writes do not meet a hand-over).
async fn wait_shards(c: &Cluster, shards: u64) {
    let api = c.api();
    wait_until(
        "every shard routed to, with a leader",
        deadline(SETTLE),
        async || {
            c.check_alive()?;
            let mut seen: Option<Vec<u64>> = None;
            for i in 0..c.len() {
                let view = api.cluster(i).await?;
                ensure!(view["shard_count"] == shards, "node {i}: {view}");
                ensure!(
                    view["routes"].as_array().and_then(|r| r.last()) == Some(&json!(shards)),
                    "node {i}: routes {}",
                    view["routes"]
                );
                let groups = view["groups"].as_array().cloned().unwrap_or_default();
                let ids: Vec<u64> = groups.iter().filter_map(|g| g["group"].as_u64()).collect();
                ensure!(
                    ids == (0..=shards).collect::<Vec<_>>(),
                    "node {i}: groups {ids:?}"
                );
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
            let distinct: BTreeSet<u64> = leaders[1..].iter().copied().collect();
            let want = c.len().min(shards as usize);
            ensure!(
                distinct.len() == want,
                "shard leaders not spread yet: {leaders:?}"
            );
            Ok(())
        },
    )
    .await;
}

/// Every entry of group `g`'s audit chain, read through node `i`.
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

/// Submits `PER_SHARD` tasks of `TENANT` into each shard, keyed so the
/// routing puts them there, rotating over the nodes; checks that each id
/// names the shard its key routes to. The ids by shard.
async fn submit_spread(c: &Cluster, shards: u64) -> BTreeMap<u64, Vec<u64>> {
    let api = c.api();
    let mut by_shard: BTreeMap<u64, Vec<u64>> = (1..=shards).map(|s| (s, Vec::new())).collect();
    let mut n = 0usize;
    for k in 0.. {
        if by_shard.values().all(|ids| ids.len() == PER_SHARD) {
            break;
        }
        assert!(k < 10_000, "no keys found for every shard: {by_shard:?}");
        let key = format!("usage-{k}");
        let s = route(TENANT, &key, shards);
        if by_shard[&s].len() == PER_SHARD {
            continue;
        }
        let body = json!({"tenant": TENANT, "payload": {"k": k}, "capabilities": [CAP],
                          "idempotency_key": key});
        let i = n % c.len();
        n += 1;
        let r = api
            .post_retrying(i, "/api/v1/tasks", &body, deadline(Duration::from_secs(20)))
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().expect("task id");
        assert_eq!(
            shard_of(id),
            s,
            "task {id} (key {key}) is in the shard its key routes to"
        );
        by_shard.get_mut(&s).expect("a shard").push(id);
    }
    by_shard
}

/// Leases every submitted task as `WORKER` and completes it with usage in
/// its result (the first one leased fails once first, reporting usage);
/// returns what each shard's ledger should hold.
async fn run_worker(c: &Cluster, tasks: &BTreeMap<u64, Vec<u64>>) -> BTreeMap<u64, Sums> {
    let api = c.api();
    let all: BTreeSet<u64> = tasks.values().flatten().copied().collect();
    let mut done = BTreeSet::new();
    let mut failed_once = false;
    let mut sums: BTreeMap<u64, Sums> = tasks.keys().map(|s| (*s, Sums::default())).collect();
    let mut call = 0usize;
    let lease_body =
        json!({"agent_id": WORKER, "capabilities": [CAP], "max": 1, "lease_ms": 30000});
    while done.len() < all.len() {
        call += 1;
        let i = call % c.len();
        // The failed task waits out its backoff: poll until something is
        // ready.
        let (id, token) = wait_until("a lease", deadline(Duration::from_secs(30)), async || {
            let r = api.post(i, "/api/v1/leases", &lease_body).await?;
            ensure!(r.status == 200, "{r:?}");
            let lease = &r.body["leases"][0];
            match (lease["task_id"].as_u64(), lease["fencing_token"].as_u64()) {
                (Some(id), Some(token)) => Ok((id, token)),
                _ => bail!("nothing leased: {r:?}"),
            }
        })
        .await;
        assert!(all.contains(&id) && !done.contains(&id), "leased task {id}");
        let s = shard_of(id);
        assert_eq!(
            shard_of(token),
            s,
            "the lease token {token} names its task's shard"
        );
        let sum = sums.get_mut(&s).expect("a shard");
        // Reported through another node than the lease was taken on.
        let j = (call + 1) % c.len();
        if !failed_once {
            failed_once = true;
            let body = json!({"error": "flaky", "retryable": true,
                              "usage": {"input_tokens": FAILED_IN, "output_tokens": FAILED_OUT}});
            post_through(&api, j, &format!("/api/v1/leases/{token}/fail"), &body).await;
            sum.failed_attempts += 1;
            sum.input_tokens += FAILED_IN;
            sum.output_tokens += FAILED_OUT;
            sum.unpriced_tokens += FAILED_IN + FAILED_OUT;
            continue;
        }
        let (tin, tout) = tokens_of(id);
        let result = json!({"answer": id, "model": model(s),
                            "usage": {"prompt_tokens": tin, "completion_tokens": tout}});
        post_through(
            &api,
            j,
            &format!("/api/v1/leases/{token}/complete"),
            &json!({"result": result}),
        )
        .await;
        sum.completed += 1;
        sum.input_tokens += tin;
        sum.output_tokens += tout;
        sum.cost_micros += PRICE_IN * tin + PRICE_OUT * tout;
        done.insert(id);
    }
    sums
}

/// Checks that shard `g`'s audit chain holds the submission of exactly its
/// tasks, and one completion for each.
async fn check_placement(c: &Cluster, tasks: &BTreeMap<u64, Vec<u64>>) {
    let api = c.api();
    for (&g, ids) in tasks {
        let chain = audit_chain(&api, g as usize % c.len(), g).await;
        let submitted: BTreeSet<String> = chain
            .iter()
            .filter(|e| e["action"] == "tasks.submit" && e["outcome"] == "ok")
            .filter_map(|e| e["target"].as_str().map(str::to_owned))
            .collect();
        let want: BTreeSet<String> = ids.iter().map(|id| format!("task/{id}")).collect();
        assert_eq!(
            submitted, want,
            "shard {g}'s audit chain holds the submission of its tasks"
        );
        let completes = chain
            .iter()
            .filter(|e| e["action"] == "leases.complete" && e["outcome"] == "ok")
            .count();
        assert_eq!(
            completes,
            ids.len(),
            "shard {g} audits one completion per task"
        );
    }
}

/// Checks the usage views and the CSV export through node `i`.
async fn check_usage(
    api: &Api,
    i: usize,
    per_shard: &BTreeMap<u64, Sums>,
    total: &Sums,
    tasks: usize,
) {
    // One row for the tenant: the sum over every shard.
    let u = api.get_ok(i, "/api/v1/usage?group_by=tenant").await;
    assert_eq!(u["group_by"], json!(["tenant"]), "{u}");
    let items = u["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "node index {i}: {u}");
    assert_eq!(items[0]["tenant"], TENANT, "{u}");
    total.check_row(
        &items[0],
        &format!("node index {i}: the tenant's row over every shard"),
    );
    // Every task's first lease counted once, whichever shard holds it.
    let waits = u["waits"].as_array().expect("waits");
    assert_eq!(waits.len(), 1, "{u}");
    assert_eq!(
        (
            &waits[0]["tenant"],
            &waits[0]["priority"],
            &waits[0]["tasks"]
        ),
        (&json!(TENANT), &json!("medium"), &json!(tasks)),
        "node index {i}: {u}"
    );

    // By model: each shard's own ledger is one row (its model), and the
    // failed attempt (no model) is one more.
    let u = api.get_ok(i, "/api/v1/usage?group_by=tenant,model").await;
    let items = u["items"].as_array().expect("items");
    assert_eq!(items.len(), per_shard.len() + 1, "node index {i}: {u}");
    let unnamed = Sums {
        failed_attempts: 1,
        input_tokens: FAILED_IN,
        output_tokens: FAILED_OUT,
        unpriced_tokens: FAILED_IN + FAILED_OUT,
        ..Sums::default()
    };
    assert_eq!(items[0]["model"], Value::Null, "{u}");
    unnamed.check_row(&items[0], &format!("node index {i}: the failed attempt"));
    for (row, (s, sum)) in items[1..].iter().zip(per_shard) {
        assert_eq!(
            (&row["tenant"], &row["model"]),
            (&json!(TENANT), &json!(model(*s))),
            "{u}"
        );
        let mut own = sum.clone();
        if own.failed_attempts > 0 {
            own.failed_attempts = 0;
            own.input_tokens -= FAILED_IN;
            own.output_tokens -= FAILED_OUT;
            own.unpriced_tokens = 0;
        }
        own.check_row(row, &format!("node index {i}: shard {s}'s model"));
    }

    // Filtered to the tenant, and with no grouping: the same totals.
    for q in ["group_by=&tenant=acme", "group_by="] {
        let u = api.get_ok(i, &format!("/api/v1/usage?{q}")).await;
        assert_eq!(u["items"].as_array().map(Vec::len), Some(1), "{q}: {u}");
        total.check_row(&u["items"][0], &format!("node index {i}, {q}"));
    }

    // The CSV export: the same row, its compute time as the JSON one's.
    let compute = api.get_ok(i, "/api/v1/usage?group_by=tenant").await["items"][0]["compute_ms"]
        .as_u64()
        .expect("compute_ms");
    let csv = api
        .get(i, "/api/v1/usage/export?group_by=tenant")
        .await
        .expect("GET export");
    assert_eq!(csv.status, 200, "{csv:?}");
    assert!(
        csv.header("content-type")
            .unwrap_or("")
            .starts_with("text/csv"),
        "{csv:?}"
    );
    let want = format!(
        "tenant,completed,failed_attempts,lost_attempts,input_tokens,output_tokens,compute_ms,cost_usd,unpriced_tokens\n\
         {TENANT},{},{},0,{},{},{compute},{:.6},{}\n",
        total.completed,
        total.failed_attempts,
        total.input_tokens,
        total.output_tokens,
        total.cost_micros as f64 / 1e6,
        total.unpriced_tokens,
    );
    assert_eq!(
        csv.body.as_str(),
        Some(want.as_str()),
        "node index {i}: the CSV export"
    );
}

/// Sets (`POST`, the first time) or changes `TENANT`'s daily token budget,
/// then waits until every node's replica of the meta group has it (a read
/// through each node, after its read barrier).
async fn set_budget(api: &Api, nodes: usize, daily_tokens: u64, create: bool) {
    let budget = json!({"daily_tokens": daily_tokens});
    let r = if create {
        api.post(
            0,
            "/api/v1/tenants",
            &json!({"name": TENANT, "budget": budget}),
        )
        .await
    } else {
        api.patch(
            0,
            &format!("/api/v1/tenants/{TENANT}"),
            &json!({"budget": budget}),
        )
        .await
    }
    .expect("set the budget");
    assert_eq!(r.status, if create { 201 } else { 200 }, "{r:?}");
    assert_eq!(r.body["budget"]["daily_tokens"], daily_tokens, "{r:?}");
    for i in 0..nodes {
        let t = api.get_ok(i, &format!("/api/v1/tenants/{TENANT}")).await;
        assert_eq!(
            t["budget"]["daily_tokens"], daily_tokens,
            "node index {i}: {t}"
        );
    }
}

/// The whole scenario on a started cluster with `shards` queue shards.
async fn scenario(c: &Cluster, shards: u64) {
    let t0 = Instant::now();
    let api = c.api();
    wait_shards(c, shards).await;
    eprintln!("[test] {shards} shards ready at {:?}", t0.elapsed());

    let tasks = submit_spread(c, shards).await;
    let count = tasks.values().map(Vec::len).sum::<usize>();
    assert_eq!(count, PER_SHARD * shards as usize);
    let per_shard = run_worker(c, &tasks).await;
    eprintln!("[test] {count} tasks completed at {:?}", t0.elapsed());

    // Each task shows its own usage, read through every node.
    for (n, id) in tasks.values().flatten().enumerate() {
        let t = api
            .get_ok(n % c.len(), &format!("/api/v1/tasks/{id}"))
            .await;
        let (tin, tout) = tokens_of(*id);
        assert_eq!(
            (
                &t["status"],
                &t["usage"]["input_tokens"],
                &t["usage"]["output_tokens"],
                &t["usage"]["model"]
            ),
            (
                &json!("completed"),
                &json!(tin),
                &json!(tout),
                &json!(model(shard_of(*id)))
            ),
            "{t}"
        );
    }
    check_placement(c, &tasks).await;

    // Every shard holds tokens of its own: a total read from fewer shards
    // than all of them falls short of the one the test expects.
    let mut total = Sums::default();
    for (s, sum) in &per_shard {
        assert_eq!(sum.completed, PER_SHARD as u64, "shard {s}: {sum:?}");
        assert!(sum.tokens() > 0, "shard {s}: {sum:?}");
        total.add(sum);
    }
    assert_eq!(total.failed_attempts, 1);
    for (s, sum) in &per_shard {
        assert!(
            sum.tokens() < total.tokens(),
            "shard {s} alone does not make the total"
        );
    }
    eprintln!("[test] expected per shard {per_shard:?}, total {total:?}");
    for i in 0..c.len() {
        check_usage(&api, i, &per_shard, &total, count).await;
    }

    // A daily budget of exactly the total, which only the sum over every
    // shard reaches: the tenant's next task is refused on every node.
    let used = total.tokens();
    set_budget(&api, c.len(), used, true).await;
    let probe = json!({"tenant": TENANT, "payload": {}, "capabilities": ["nobody-has-this"]});
    for i in 0..c.len() {
        let r = api
            .post(i, "/api/v1/tasks", &probe)
            .await
            .expect("POST /tasks");
        assert_eq!(
            r.status, 429,
            "node index {i}: a budget of the tokens of every shard is used up: {r:?}"
        );
        r.assert_error(429, "budget");
        assert!(
            r.message()
                .contains(&format!("{used} tokens of its day budget of {used} tokens")),
            "node index {i}: {r:?}"
        );
        let wait: u64 = r
            .retry_after
            .as_deref()
            .unwrap_or_else(|| panic!("Retry-After on {r:?}"))
            .parse()
            .expect("Retry-After in seconds");
        let until_midnight = 86_400 - (godel::clock::now_ms() / 1000) % 86_400;
        assert!(
            wait > 0 && wait.abs_diff(until_midnight) <= 5,
            "node index {i}: Retry-After {wait}, {until_midnight} s to midnight"
        );
        let line = format!(
            r#"godel_tenant_budget_used_ratio{{period="day",tenant="{TENANT}",unit="tokens"}}"#
        );
        assert_eq!(api.metric(i, &line).await, 1.0, "node index {i}: {line}");
    }
    // Another tenant has no budget.
    let beta = json!({"tenant": "beta", "payload": {}, "capabilities": ["nobody-has-this"]});
    let r = api
        .post(0, "/api/v1/tasks", &beta)
        .await
        .expect("POST /tasks");
    assert_eq!(r.status, 201, "{r:?}");

    // One token more: admitted on every node (the admitted tasks run
    // nowhere, so the use stays at the total).
    set_budget(&api, c.len(), used + 1, false).await;
    for i in 0..c.len() {
        let r = api
            .post(i, "/api/v1/tasks", &probe)
            .await
            .expect("POST /tasks");
        assert_eq!(r.status, 201, "node index {i}: {r:?}");
        let line = format!(
            r#"godel_tenant_budget_used_ratio{{period="day",tenant="{TENANT}",unit="tokens"}}"#
        );
        let ratio = api.metric(i, &line).await;
        assert!(
            (ratio - used as f64 / (used + 1) as f64).abs() < 1e-9,
            "node index {i}: {ratio}"
        );
    }
    c.check_alive().expect("every node still runs");
    eprintln!("[test] done at {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_budgets_add_up_four_shards_on_one_node() {
    let c = Cluster::start_with(1, &config(4)).await;
    bounded(TEST_BOUND, scenario(&c, 4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_budgets_add_up_three_shards_on_three_nodes() {
    let c = Cluster::start_with(3, &config(3)).await;
    bounded(TEST_BOUND, scenario(&c, 3)).await;
}
