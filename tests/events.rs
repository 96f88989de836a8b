//! The event stream (`GET /api/v1/events`) against real nodes: one
//! cluster-wide history served by every node, NATS-style patterns changed
//! at any time, resuming with `?since=` (and the gap when the buffer no
//! longer holds it), the credential as a first message, tenant scope,
//! slow consumers told they lagged and closed while the node goes on, and
//! with three queue shards, each group's own numbering and a resume
//! position per group.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{ADMIN_KEY, Api, Cluster, bounded, deadline, wait_until};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest any one message may take to arrive.
const MESSAGE_WITHIN: Duration = Duration::from_secs(15);

/// Connects to node `addr` with `query`, sending `key` in the header.
async fn connect(addr: SocketAddr, query: &str, key: Option<&str>) -> Ws {
    let mut req = format!("ws://{addr}/api/v1/events{query}")
        .into_client_request()
        .unwrap();
    if let Some(key) = key {
        let v = HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
        req.headers_mut().insert("authorization", v);
    }
    let (ws, resp) = tokio::time::timeout(MESSAGE_WITHIN, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect in time")
        .expect("upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

/// The next message: JSON, or `{"closed": code}` for a close frame.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(MESSAGE_WITHIN, ws.next())
            .await
            .expect("a message in time");
        match msg {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(0, |f| u16::from(f.code));
                return json!({ "closed": code });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return json!({ "closed": 0, "error": e.to_string() }),
            None => return json!({ "closed": 0 }),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Events until `done` says the collected ones suffice.
async fn collect(ws: &mut Ws, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    while !done(&got) {
        let v = next(ws).await;
        assert!(
            v.get("closed").is_none(),
            "stream closed: {v} after {got:?}"
        );
        if v.get("seq").is_some() {
            got.push(v);
        }
    }
    got
}

/// Registers a simulated gateway with one agent on `leader`.
async fn sim_gateway(api: &Api, leader: usize) {
    let gw = json!({"id": "sim", "region": "local", "max_sessions": 16, "driver": {"kind": "sim"}});
    let r = api
        .post_retrying(
            leader,
            "/api/v1/gateways",
            &gw,
            deadline(Duration::from_secs(20)),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let agent = json!({"id": "sim-a", "gateway": "sim", "capacity": 8});
    let r = api.post(leader, "/api/v1/agents", &agent).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
}

async fn submit(api: &Api, i: usize, body: Value) -> u64 {
    let r = api.post(i, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

fn of_type<'a>(events: &'a [Value], ty: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}

/// Every node serves the same history: the same events with the same seqs,
/// in commit order, each once; patterns change while connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_streams_the_cluster_history_once_in_order() {
    bounded(Duration::from_secs(120), async {
        let c = Cluster::start(3).await;
        let api = c.api();
        let leader = c.leader().await;
        let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        sim_gateway(&api, leader).await;

        let mut a = connect(api.addr(followers[0]), "?subscribe=task.*", Some(ADMIN_KEY)).await;
        let mut b = connect(api.addr(followers[1]), "", Some(ADMIN_KEY)).await;
        let hello = next(&mut a).await;
        assert!(hello["hello"]["seq"].as_u64().is_some(), "{hello}");
        assert!(next(&mut b).await.get("hello").is_some());
        // b subscribes by message, with a NATS `>` and a one-segment `*`.
        send(&mut b, json!({"subscribe": ["task.>", "*.completed"]})).await;
        assert_eq!(
            next(&mut b).await,
            json!({"subscribed": ["task.>", "*.completed"]})
        );

        let mut ids = Vec::new();
        for i in 0..20 {
            let prio = ["low", "medium", "high", "critical"][i % 4];
            ids.push(submit(&api, leader, json!({"payload": {"i": i}, "priority": prio})).await);
        }
        let all_done = |ev: &[Value]| of_type(ev, "task.completed").len() == ids.len();
        let (ea, eb) = (
            collect(&mut a, all_done).await,
            collect(&mut b, all_done).await,
        );
        let seqs = |ev: &[Value]| {
            ev.iter()
                .map(|e| e["seq"].as_u64().unwrap())
                .collect::<Vec<_>>()
        };
        let (sa, sb) = (seqs(&ea), seqs(&eb));
        assert!(sa.windows(2).all(|w| w[0] < w[1]), "in order, once: {sa:?}");
        // Both saw the same events: same seqs, same content.
        let common = sa.len().min(sb.len());
        assert_eq!(ea[..common], eb[..common]);
        for e in &ea {
            assert!(e["type"].as_str().unwrap().starts_with("task."), "{e}");
            assert_eq!(e["tenant"], "default", "{e}");
            assert!(e["time"].as_u64().unwrap() > 1_600_000_000_000, "{e}");
        }
        let created: Vec<u64> = of_type(&ea, "task.created")
            .iter()
            .map(|e| e["data"]["id"].as_u64().unwrap())
            .collect();
        assert_eq!(created, ids, "created in submission order");
        for id in &ids {
            let kinds: Vec<&str> = ea
                .iter()
                .filter(|e| e["data"]["id"] == *id)
                .map(|e| e["type"].as_str().unwrap())
                .collect();
            assert_eq!(kinds.first(), Some(&"task.created"), "task {id}: {kinds:?}");
            assert_eq!(
                kinds.last(),
                Some(&"task.completed"),
                "task {id}: {kinds:?}"
            );
            assert!(kinds.contains(&"task.leased"), "task {id}: {kinds:?}");
        }

        // Patterns change at any time: a sees node events once it asks.
        send(
            &mut a,
            json!({"unsubscribe": ["task.*"], "subscribe": ["node.>"]}),
        )
        .await;
        assert_eq!(next(&mut a).await, json!({"subscribed": ["node.>"]}));
        let id = c.node(followers[1]).id;
        let r = api
            .post(
                leader,
                &format!("/api/v1/admin/nodes/{id}/drain"),
                &json!({}),
            )
            .await
            .unwrap();
        assert!(r.status < 300, "{r:?}");
        let drained = collect(&mut a, |ev| !of_type(ev, "node.draining").is_empty()).await;
        assert!(
            drained
                .iter()
                .all(|e| e["type"].as_str().unwrap().starts_with("node."))
        );
        assert_eq!(of_type(&drained, "node.draining")[0]["data"]["id"], id);
        assert_eq!(of_type(&drained, "node.draining")[0]["tenant"], Value::Null);

        // Bad patterns are refused with a reason and change nothing.
        send(&mut a, json!({"subscribe": ["task.>.x"]})).await;
        let err = next(&mut a).await;
        assert_eq!(err["error"]["code"], "invalid_request", "{err}");
        send(&mut a, json!({"subscribe": []})).await;
        assert_eq!(next(&mut a).await, json!({"subscribed": ["node.>"]}));
        // A bad query is a 400 before any upgrade.
        let r = api
            .get(leader, "/api/v1/events?subscribe=Task")
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{r:?}");
    })
    .await;
}

/// A client resumes where it stopped, on another node; from before what the
/// buffer holds it is told of the gap first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_replays_from_the_buffer_or_reports_the_gap() {
    bounded(Duration::from_secs(120), async {
        let c = Cluster::start_with(3, "[api]\nevents_buffer = 64\n").await;
        let api = c.api();
        let leader = c.leader().await;
        let mut first = connect(api.addr(0), "?subscribe=task.created", Some(ADMIN_KEY)).await;
        let hello = next(&mut first).await;
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(submit(&api, leader, json!({"payload": {"i": i}})).await);
        }
        let seen = collect(&mut first, |ev| ev.len() == 2).await;
        let resume = seen[1]["seq"].as_u64().unwrap();
        drop(first);
        // On another node, from the second event on: the other three.
        let mut again = connect(
            api.addr(1),
            &format!("?subscribe=task.created&since={resume}"),
            Some(ADMIN_KEY),
        )
        .await;
        assert!(next(&mut again).await.get("hello").is_some());
        let rest = collect(&mut again, |ev| ev.len() == 3).await;
        let rest_ids: Vec<u64> = rest
            .iter()
            .map(|e| e["data"]["id"].as_u64().unwrap())
            .collect();
        assert_eq!(rest_ids, ids[2..]);
        assert!(rest[0]["seq"].as_u64().unwrap() > resume);

        // Push the start of history out of the 64-event buffers.
        for i in 0..40 {
            submit(&api, leader, json!({"payload": {"i": i}})).await;
        }
        let since = hello["hello"]["seq"].as_u64().unwrap();
        let until = deadline(Duration::from_secs(20));
        wait_until(
            "node 2's buffer to move past the start",
            until,
            async || {
                let mut ws = connect(api.addr(2), "?subscribe=%3E", Some(ADMIN_KEY)).await;
                let h = next(&mut ws).await;
                let oldest = h["hello"]["oldest"].as_u64().unwrap_or(0);
                anyhow::ensure!(oldest > since + 1, "oldest {oldest}");
                Ok(())
            },
        )
        .await;
        let mut late = connect(
            api.addr(2),
            &format!("?subscribe=task.created&since={since}"),
            Some(ADMIN_KEY),
        )
        .await;
        let hello = next(&mut late).await;
        let gap = next(&mut late).await;
        assert_eq!(gap["gap"]["from"], since + 1, "{gap}");
        assert_eq!(
            gap["gap"]["to"].as_u64().unwrap() + 1,
            hello["hello"]["oldest"].as_u64().unwrap(),
            "{gap} {hello}"
        );
        let after = next(&mut late).await;
        assert!(after["seq"].as_u64().unwrap() > gap["gap"]["to"].as_u64().unwrap());
    })
    .await;
}

/// With three queue shards every group numbers its own events: a task's
/// events name the shard its id carries, seqs grow within each group, and
/// a position taken from `hello` and the events seen (`g0:..,g1:..`)
/// resumes on another node with exactly the events after it. A position
/// naming no group is refused before the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_number_their_events_and_resume_per_group() {
    bounded(Duration::from_secs(120), async {
        let c = Cluster::start_with(3, "[cluster]\nshards = 3\n").await;
        let api = c.api();
        let leader = c.leader().await;
        let mut ws = connect(api.addr(0), "?subscribe=task.created", Some(ADMIN_KEY)).await;
        let hello = next(&mut ws).await;
        let groups = hello["hello"]["groups"].as_array().expect("groups").clone();
        assert_eq!(groups.len(), 4, "{hello}");
        let mut at: Vec<u64> = groups.iter().map(|g| g["seq"].as_u64().unwrap()).collect();
        assert!(
            hello["hello"]["resume"]
                .as_str()
                .unwrap()
                .starts_with("g0:")
        );
        let mut ids = Vec::new();
        for i in 0..12 {
            let body = json!({"payload": {"i": i}, "session_key": format!("s-{i}")});
            ids.push(submit(&api, leader, body).await);
        }
        let seen = collect(&mut ws, |ev| ev.len() == 12).await;
        let mut per_group: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for e in &seen {
            let id = e["data"]["id"].as_u64().unwrap();
            let group = e["group"].as_u64().unwrap_or(0);
            assert_eq!(group, id & 0xff, "a task's event names its shard: {e}");
            per_group
                .entry(group)
                .or_default()
                .push(e["seq"].as_u64().unwrap());
        }
        assert!(
            per_group.len() >= 2,
            "twelve keys in one shard: {per_group:?}"
        );
        for (g, seqs) in &per_group {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "group {g}: {seqs:?}");
        }
        let mut got: Vec<u64> = seen
            .iter()
            .map(|e| e["data"]["id"].as_u64().unwrap())
            .collect();
        got.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(got, want, "each task's creation once");
        // The position after the first six events, resumed on node 1.
        for e in &seen[..6] {
            let g = e["group"].as_u64().unwrap_or(0) as usize;
            at[g] = e["seq"].as_u64().unwrap();
        }
        let since: Vec<String> = at
            .iter()
            .enumerate()
            .map(|(g, s)| format!("g{g}:{s}"))
            .collect();
        drop(ws);
        let mut again = connect(
            api.addr(1),
            &format!("?subscribe=task.created&since={}", since.join(",")),
            Some(ADMIN_KEY),
        )
        .await;
        assert!(next(&mut again).await.get("hello").is_some());
        let rest = collect(&mut again, |ev| ev.len() == 6).await;
        let mut rest_ids: Vec<u64> = rest
            .iter()
            .map(|e| e["data"]["id"].as_u64().unwrap())
            .collect();
        let mut later: Vec<u64> = seen[6..]
            .iter()
            .map(|e| e["data"]["id"].as_u64().unwrap())
            .collect();
        rest_ids.sort();
        later.sort();
        assert_eq!(rest_ids, later, "exactly the events after the position");
        let r = api.get(0, "/api/v1/events?since=g7:1").await.unwrap();
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.message().contains("since"), "{r:?}");
    })
    .await;
}

/// A browser sends its credential as the first message; a bad or missing
/// one closes with 4001 and is audited. A developer sees only its tenant's
/// tasks, never the cluster's objects or the audit log; an admin sees audit
/// entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credential_comes_first_and_scopes_what_is_seen() {
    bounded(Duration::from_secs(120), async {
        let c = Cluster::start(1).await;
        let api = c.api();
        let addr = api.addr(0);
        let r = api
            .post(0, "/api/v1/api-keys", &json!({"name": "dev", "role": "developer", "tenant": "acme"}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let dev_key = r.body["key"].as_str().unwrap().to_owned();

        // No header, no credential message: 4001 after AUTH_WITHIN.
        let mut ws = connect(addr, "?subscribe=%3E", None).await;
        let err = next(&mut ws).await;
        assert_eq!(err["error"]["code"], "unauthenticated", "{err}");
        assert_eq!(next(&mut ws).await["closed"], 4001);
        // A wrong one: refused at once.
        let mut ws = connect(addr, "?subscribe=%3E", None).await;
        send(&mut ws, json!({"auth": "dk_live_nope"})).await;
        assert_eq!(next(&mut ws).await["error"]["code"], "unauthenticated");
        assert_eq!(next(&mut ws).await["closed"], 4001);
        // Without an upgrade, the route wants a header like any other.
        let r = api.anonymous().get(0, "/api/v1/events").await.unwrap();
        assert_eq!(r.status, 401, "{r:?}");

        let mut dev = connect(addr, "?subscribe=%3E", None).await;
        send(&mut dev, json!({"auth": dev_key})).await;
        assert!(next(&mut dev).await.get("hello").is_some());
        let mut admin = connect(addr, "?subscribe=%3E", None).await;
        send(&mut admin, json!({"auth": ADMIN_KEY})).await;
        assert!(next(&mut admin).await.get("hello").is_some());

        let theirs = submit(&api, 0, json!({"payload": {}, "tenant": "zen"})).await;
        let ours = submit(&api.with_key(&dev_key), 0, json!({"payload": {}})).await;
        let r = api
            .post(0, "/api/v1/gateways", &json!({"id": "g", "region": "local", "max_sessions": 1, "driver": {"kind": "sim"}}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let marker = submit(&api.with_key(&dev_key), 0, json!({"payload": {"last": true}})).await;

        let saw = |id: u64| move |ev: &[Value]| ev.iter().any(|e| e["data"]["id"] == id && e["type"] == "task.created");
        let dev_events = collect(&mut dev, saw(marker)).await;
        for e in &dev_events {
            assert_eq!(e["tenant"], "acme", "a developer of acme saw {e}");
            assert!(e["type"].as_str().unwrap().starts_with("task."), "{e}");
        }
        assert!(dev_events.iter().any(|e| e["data"]["id"] == ours));
        let admin_events = collect(&mut admin, saw(marker)).await;
        let by_type = |t: &str| admin_events.iter().filter(|e| e["type"] == t).count();
        assert!(admin_events.iter().any(|e| e["data"]["id"] == theirs && e["tenant"] == "zen"));
        assert_eq!(by_type("gateway.registered"), 1, "{admin_events:?}");
        assert!(by_type("audit.entry") >= 3, "{admin_events:?}");
        let audit: Vec<&Value> = of_type(&admin_events, "audit.entry");
        assert!(
            audit.iter().any(|e| e["data"]["action"] == "gateways.register"
                && e["data"]["outcome"] == "ok"),
            "{audit:?}"
        );
        // The refused credentials above were audited too.
        let denied = api.get(0, "/api/v1/audit?action=events.subscribe").await.unwrap();
        let outcomes: Vec<&str> = denied.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["outcome"].as_str().unwrap())
            .collect();
        assert!(
            outcomes.iter().filter(|o| **o == "denied:unauthenticated").count() >= 1,
            "{denied:?}"
        );
    })
    .await;
}

/// A consumer that falls behind is told so, with the seq to resume from,
/// and closed with 4008; one that stops reading is dropped. The node and
/// other consumers go on, and the lagged one resumes without a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_are_told_they_lagged_and_closed() {
    bounded(Duration::from_secs(120), async {
        let c = Cluster::start_with(1, "[api]\nevents_queue = 8\n").await;
        let api = c.api();
        let addr = api.addr(0);
        let mut stalled = connect(addr, "?subscribe=%3E", Some(ADMIN_KEY)).await;
        let mut lagging = connect(addr, "?subscribe=task.created", Some(ADMIN_KEY)).await;
        let first = next(&mut lagging).await["hello"]["seq"].as_u64().unwrap();
        // Many events in few log entries: more than 8 at once.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let api = api.clone();
            tasks.push(tokio::spawn(async move {
                submit(&api, 0, json!({"payload": {"i": i}})).await
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        ids.sort_unstable();
        let mut got: BTreeMap<u64, u64> = BTreeMap::new();
        let resume = loop {
            let v = next(&mut lagging).await;
            if let Some(l) = v.get("lagged") {
                assert_eq!(next(&mut lagging).await["closed"], 4008);
                break l["resume"].as_u64().unwrap();
            }
            assert!(v.get("closed").is_none(), "closed without `lagged`: {v}");
            got.insert(
                v["seq"].as_u64().unwrap(),
                v["data"]["id"].as_u64().unwrap(),
            );
        };
        assert!(resume >= first);
        // Resuming from the seq it was given loses nothing.
        let mut again = connect(
            addr,
            &format!("?subscribe=task.created&since={resume}"),
            Some(ADMIN_KEY),
        )
        .await;
        next(&mut again).await;
        while got.len() < ids.len() {
            let v = next(&mut again).await;
            assert!(v.get("seq").is_some(), "{v}");
            got.insert(
                v["seq"].as_u64().unwrap(),
                v["data"]["id"].as_u64().unwrap(),
            );
        }
        let mut seen: Vec<u64> = got.into_values().collect();
        seen.sort_unstable();
        assert_eq!(seen, ids);
        // The node still answers, and counted the lagged consumer.
        let lagged = api
            .metric(0, "godel_event_disconnects_total{reason=\"lagged\"}")
            .await;
        assert!(lagged >= 1.0, "lagged disconnects: {lagged}");
        // The stalled one was dropped too (lagged as well: it never read).
        let v = next(&mut stalled).await;
        assert!(v.get("hello").is_some(), "{v}");
        let mut closed = false;
        for _ in 0..10_000 {
            let v = next(&mut stalled).await;
            if v.get("closed").is_some() {
                closed = true;
                break;
            }
        }
        assert!(closed, "the stalled consumer was not closed");
    })
    .await;
}
