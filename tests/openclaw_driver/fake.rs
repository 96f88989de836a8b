//! An in-process fake OpenClaw gateway on 127.0.0.1: the v4 handshake (it
//! verifies the device signature), HTTP `/readyz` on the same port, and
//! agent turns scripted by the message text:
//!
//! - `ok <text>`: accept, send a burst of noise (junk frames, unknown
//!   events and fields, a response to nobody), then the final response with
//!   `REPLY: <text>` and usage; `ok@<ms> <text>` waits `ms` first;
//! - `slow`: accept and never finish, until `sessions.abort`;
//! - `drop`: accept, drop the socket, finish the run 200 ms later (a new
//!   connection can `agent.wait` for it);
//! - `restart`: accept, drop the socket and come back as a new boot that
//!   knows no run;
//! - `vanish`: accept, drop the socket and stop listening;
//! - `shutdown`: accept, send the `shutdown` event, finish the run, and
//!   close with 1012 once [`Fake::close_draining`] is called;
//! - `fail`: the final response is an error with a model error text;
//! - `failnow`: the only response is that error (no acceptance first).
//!
//! Every request (method and params, connect included) is logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub conn: usize,
    pub method: String,
    pub params: Value,
    pub traceparent: Option<String>,
}

#[derive(Default)]
struct Runs {
    /// Run id -> its final payload once it ended.
    done: HashMap<String, Value>,
    /// Run id -> (session key, connection it was sent on, its ender).
    active: HashMap<String, (String, mpsc::UnboundedSender<Ended>)>,
}

/// How a scripted run ends early.
enum Ended {
    Aborted,
}

pub struct State {
    token: String,
    boot: Mutex<String>,
    pub seen: Mutex<Vec<Seen>>,
    pub conns: AtomicUsize,
    /// Connects answered UNAVAILABLE before the gateway is "ready".
    pub not_ready_connects: AtomicUsize,
    pub ready: AtomicBool,
    runs: Mutex<Runs>,
    listening: CancellationToken,
    /// Connections closed abruptly when cancelled (restart).
    drop_all: Mutex<CancellationToken>,
    draining_close: Notify,
}

/// The fake gateway.
pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<State>,
}

impl Fake {
    /// A fake gateway that accepts `token`.
    pub async fn start(token: &str) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            token: token.to_owned(),
            boot: Mutex::new("boot-1".into()),
            seen: Mutex::new(Vec::new()),
            conns: AtomicUsize::new(0),
            not_ready_connects: AtomicUsize::new(0),
            ready: AtomicBool::new(true),
            runs: Mutex::new(Runs::default()),
            listening: CancellationToken::new(),
            drop_all: Mutex::new(CancellationToken::new()),
            draining_close: Notify::new(),
        });
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = st.listening.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((tcp, _)) = accepted else { return };
                tokio::spawn(serve(Arc::clone(&st), tcp));
            }
        });
        Fake { addr, state }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Requests seen with this method.
    pub fn seen(&self, method: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method)
            .cloned()
            .collect()
    }

    /// Waits (bounded) until a request with `method` was seen.
    pub async fn wait_seen(&self, method: &str, limit: Duration) -> Seen {
        let end = tokio::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.seen(method).pop() {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "the fake never saw {method}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lets the draining connections close (1012).
    pub fn close_draining(&self) {
        self.state.draining_close.notify_waiters();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.state.listening.cancel();
        self.state.drop_all.lock().unwrap().cancel();
    }
}

async fn serve(st: Arc<State>, tcp: TcpStream) {
    // Plain HTTP `/readyz` on the same port, as the real gateway has.
    let mut peek = [0u8; 16];
    let n = tcp.peek(&mut peek).await.unwrap_or(0);
    if peek[..n].starts_with(b"GET /readyz") {
        let mut tcp = tcp;
        let (code, body) = if st.ready.load(Ordering::SeqCst) {
            ("200 OK", r#"{"ready":true,"failing":[]}"#)
        } else {
            (
                "503 Service Unavailable",
                r#"{"ready":false,"failing":["startup-sidecars"]}"#,
            )
        };
        let resp = format!(
            "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(resp.as_bytes()).await;
        return;
    }
    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    let conn = st.conns.fetch_add(1, Ordering::SeqCst) + 1;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let kill = st.drop_all.lock().unwrap().clone();
    let writer = {
        let kill = kill.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = kill.cancelled() => return,
                    m = rx.recv() => match m {
                        Some(m) => {
                            let close = matches!(m, Message::Close(_));
                            if sink.send(m).await.is_err() || close {
                                return;
                            }
                        }
                        None => return,
                    },
                }
            }
        })
    };
    let send = |v: Value| {
        let _ = tx.send(Message::Text(v.to_string().into()));
    };
    send(json!({"type":"event","event":"connect.challenge",
                "payload":{"nonce":format!("nonce-{conn}"),"ts":1_795_287_562_171u64,"capabilities":[]}}));
    // The handshake.
    let first = tokio::select! {
        () = kill.cancelled() => return,
        f = stream.next() => f,
    };
    let Some(Ok(Message::Text(t))) = first else {
        return;
    };
    let req: Value = serde_json::from_str(t.as_str()).unwrap();
    log(&st, conn, &req);
    let id = req["id"].clone();
    match check_connect(&st, &req["params"], conn) {
        Ok(()) => {}
        Err((code, detail, retryable, close)) => {
            let mut err = json!({"code": code, "message": format!("fake: {detail}"),
                                 "details": {"code": detail}});
            if retryable {
                err["retryable"] = json!(true);
                err["retryAfterMs"] = json!(50);
            }
            send(json!({"type":"res","id":id,"ok":false,"error":err}));
            if close {
                let _ = tx.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Policy,
                    reason: "auth".into(),
                })));
            }
            let _ = writer.await;
            return;
        }
    }
    let boot = st.boot.lock().unwrap().clone();
    send(
        json!({"type":"res","id":id,"ok":true,"payload":{"type":"hello-ok","protocol":4,
        "server":{"version":"fake","bootId":boot,"connId":format!("c{conn}")},
        "policy":{"tickIntervalMs":30000},"surprise":{"x":1}}}),
    );
    loop {
        let f = tokio::select! {
            () = kill.cancelled() => return,
            f = stream.next() => f,
        };
        let Some(Ok(m)) = f else { return };
        let Message::Text(t) = m else { continue };
        let Ok(req) = serde_json::from_str::<Value>(t.as_str()) else {
            continue;
        };
        log(&st, conn, &req);
        tokio::spawn(handle(Arc::clone(&st), conn, req, tx.clone(), kill.clone()));
    }
}

fn log(st: &State, conn: usize, req: &Value) {
    st.seen.lock().unwrap().push(Seen {
        conn,
        method: req["method"].as_str().unwrap_or("").to_owned(),
        params: req["params"].clone(),
        traceparent: req["traceparent"].as_str().map(str::to_owned),
    });
}

type Refusal = (&'static str, &'static str, bool, bool);

fn check_connect(st: &State, p: &Value, _conn: usize) -> Result<(), Refusal> {
    if st
        .not_ready_connects
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(("UNAVAILABLE", "startup-sidecars", true, false));
    }
    if p["minProtocol"] != 4 || p["maxProtocol"] != 4 {
        return Err(("INVALID_REQUEST", "PROTOCOL_MISMATCH", false, true));
    }
    if p["auth"]["token"].as_str() != Some(st.token.as_str()) {
        return Err(("INVALID_REQUEST", "AUTH_TOKEN_MISMATCH", false, true));
    }
    // The device proof, checked as the gateway does.
    let d = &p["device"];
    let pk: [u8; 32] = URL_SAFE_NO_PAD
        .decode(d["publicKey"].as_str().unwrap_or(""))
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(("INVALID_REQUEST", "DEVICE_KEY", false, true))?;
    let id: String = Sha256::digest(pk)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if d["id"].as_str() != Some(id.as_str()) {
        return Err(("INVALID_REQUEST", "DEVICE_ID", false, true));
    }
    let scopes: Vec<&str> = p["scopes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let signed = format!(
        "v3|{id}|{}|{}|{}|{}|{}|{}|{}|{}|",
        p["client"]["id"].as_str().unwrap_or(""),
        p["client"]["mode"].as_str().unwrap_or(""),
        p["role"].as_str().unwrap_or(""),
        scopes.join(","),
        d["signedAt"],
        st.token,
        d["nonce"].as_str().unwrap_or(""),
        p["client"]["platform"]
            .as_str()
            .unwrap_or("")
            .to_lowercase(),
    );
    let sig: [u8; 64] = URL_SAFE_NO_PAD
        .decode(d["signature"].as_str().unwrap_or(""))
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(("INVALID_REQUEST", "DEVICE_SIGNATURE", false, true))?;
    VerifyingKey::from_bytes(&pk)
        .and_then(|k| k.verify(signed.as_bytes(), &Signature::from_bytes(&sig)))
        .map_err(|_| ("INVALID_REQUEST", "DEVICE_SIGNATURE", false, true))
}

fn res(id: &Value, payload: Value) -> Message {
    Message::Text(
        json!({"type":"res","id":id,"ok":true,"payload":payload})
            .to_string()
            .into(),
    )
}

fn final_ok(run: &str, text: &str) -> Value {
    json!({"runId": run, "status": "ok", "summary": "completed", "stopReason": "stop",
           "result": {"payloads": [{"text": text, "mediaUrl": null}],
                      "meta": {"durationMs": 5, "agentMeta": {"usage": {"input": 10, "output": 5, "total": 15, "cacheRead": 0}}}}})
}

async fn handle(
    st: Arc<State>,
    _conn: usize,
    req: Value,
    tx: mpsc::UnboundedSender<Message>,
    kill: CancellationToken,
) {
    let id = req["id"].clone();
    let p = &req["params"];
    let method = req["method"].as_str().unwrap_or("");
    let send = |m: Message| {
        let _ = tx.send(m);
    };
    match method {
        "health" => send(res(&id, json!({"ok": true}))),
        "sessions.describe" => send(res(
            &id,
            json!({"session": {"key": p["key"], "status": "running", "lastRunId": "recovery-run-1"}}),
        )),
        "sessions.create" => send(res(&id, json!({"ok": true, "key": p["key"], "sessionId": "s"}))),
        "sessions.abort" => {
            let key = p["key"].as_str().unwrap_or("").to_owned();
            let ender = {
                let runs = st.runs.lock().unwrap();
                runs.active
                    .iter()
                    .find(|(_, (k, _))| *k == key)
                    .map(|(r, (_, e))| (r.clone(), e.clone()))
            };
            match ender {
                Some((run, e)) => {
                    let _ = e.send(Ended::Aborted);
                    send(res(&id, json!({"ok": true, "abortedRunId": run, "status": "aborted"})));
                }
                None => send(res(&id, json!({"ok": true, "abortedRunId": null, "status": "no-active-run"}))),
            }
        }
        "agent.wait" => {
            let run = p["runId"].as_str().unwrap_or("").to_owned();
            let end = tokio::time::Instant::now()
                + Duration::from_millis(p["timeoutMs"].as_u64().unwrap_or(30_000));
            loop {
                let done = st.runs.lock().unwrap().done.get(&run).cloned();
                if let Some(f) = done {
                    let text = f["result"]["payloads"][0]["text"].clone();
                    send(res(&id, json!({"runId": run, "status": f["status"],
                                         "terminalReply": {"disposition": "visible", "text": text}})));
                    return;
                }
                if tokio::time::Instant::now() >= end {
                    send(res(&id, json!({"runId": run, "status": "timeout"})));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        "agent" => agent(&st, &id, p, &tx, &kill).await,
        _ => send(Message::Text(
            json!({"type":"res","id":id,"ok":false,"error":{"code":"INVALID_REQUEST","message":format!("unknown method: {method}")}})
                .to_string()
                .into(),
        )),
    }
}

async fn agent(
    st: &Arc<State>,
    id: &Value,
    p: &Value,
    tx: &mpsc::UnboundedSender<Message>,
    kill: &CancellationToken,
) {
    let send = |m: Message| {
        let _ = tx.send(m);
    };
    let run = p["idempotencyKey"].as_str().unwrap_or("").to_owned();
    let key = p["sessionKey"].as_str().unwrap_or("").to_owned();
    let msg = p["message"].as_str().unwrap_or("").to_owned();
    if msg == "failnow" {
        // Refused at once with the run's outcome: no acceptance first.
        let f = json!({"runId": run, "status": "error", "summary": "model disabled for a minute"});
        let m = json!({"type":"res","id":id,"ok":false,"payload":f,
                       "error":{"code":"UNAVAILABLE","message":"model disabled"}});
        send(Message::Text(m.to_string().into()));
        return;
    }
    if st.runs.lock().unwrap().done.contains_key(&run) {
        send(res(id, json!({"runId": run, "status": "in_flight"})));
        return;
    }
    let (end_tx, mut end_rx) = mpsc::unbounded_channel();
    st.runs
        .lock()
        .unwrap()
        .active
        .insert(run.clone(), (key.clone(), end_tx));
    send(res(
        id,
        json!({"runId": run, "sessionKey": key, "agentId": "main",
                        "status": "accepted", "acceptedAt": 1}),
    ));
    let finish = |payload: Value| {
        let mut runs = st.runs.lock().unwrap();
        runs.active.remove(&run);
        runs.done.insert(run.clone(), payload);
    };
    let word = msg.split_whitespace().next().unwrap_or("");
    let rest = msg.split_once(' ').map_or("", |x| x.1).to_owned();
    match word {
        w if w.starts_with("ok") => {
            if let Some(ms) = w.strip_prefix("ok@").and_then(|s| s.parse().ok()) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            // Noise a lenient client must survive.
            send(Message::Text("not json at all".into()));
            send(Message::Binary(vec![1, 2, 3].into()));
            send(Message::Text(
                r#"{"type":"event","event":"brand.new.event","payload":{"x":1},"seq":1}"#.into(),
            ));
            send(Message::Text(
                r#"{"type":"res","id":"nobody","ok":true,"payload":{}}"#.into(),
            ));
            for (stream, data) in [
                ("lifecycle", json!({"phase": "start", "startedAt": 1})),
                (
                    "assistant",
                    json!({"text": "REPLY:", "delta": "REPLY:", "novel": true}),
                ),
                (
                    "tool",
                    json!({"phase": "start", "name": "ls", "toolCallId": "t1"}),
                ),
                ("mystery_stream", json!({"anything": [1, 2]})),
                ("usage", json!({"outputTokens": 5})),
                ("lifecycle", json!({"phase": "end", "stopReason": "stop"})),
            ] {
                send(Message::Text(
                    json!({"type":"event","event":"agent","seq":7,
                    "payload":{"runId":run,"seq":3,"stream":stream,"ts":1,"data":data,
                               "sessionKey":key,"agentId":"main","unlisted":"field"}})
                    .to_string()
                    .into(),
                ));
            }
            let f = final_ok(&run, &format!("REPLY: {rest}"));
            finish(f.clone());
            send(res(id, f));
        }
        "slow" => {
            tokio::select! {
                _ = end_rx.recv() => {
                    let f = json!({"runId": run, "status": "timeout", "summary": "aborted", "stopReason": "rpc"});
                    finish(f.clone());
                    send(res(id, f));
                }
                () = tokio::time::sleep(Duration::from_secs(600)) => {}
            }
        }
        "fail" => {
            let f = json!({"runId": run, "status": "error",
                           "summary": "LLM request failed: provider rejected the request schema or tool payload."});
            finish(f.clone());
            let m = json!({"type":"res","id":id,"ok":false,"payload":f,
                           "error":{"code":"UNAVAILABLE","message":"LLM request failed"}});
            send(Message::Text(m.to_string().into()));
        }
        "drop" => {
            kill_connections(st);
            tokio::time::sleep(Duration::from_millis(200)).await;
            finish(final_ok(&run, &format!("REPLY: {rest}")));
        }
        "restart" => {
            *st.boot.lock().unwrap() = "boot-2".into();
            st.runs.lock().unwrap().active.remove(&run);
            kill_connections(st);
        }
        "vanish" => {
            st.listening.cancel();
            kill_connections(st);
        }
        "shutdown" => {
            send(Message::Text(
                json!({"type":"event","event":"shutdown",
                "payload":{"reason":"gateway stopping","restartExpectedMs":null}})
                .to_string()
                .into(),
            ));
            let f = final_ok(&run, &format!("REPLY: {rest}"));
            finish(f.clone());
            send(res(id, f));
            let closing = st.draining_close.notified();
            tokio::select! {
                () = closing => {}
                () = kill.cancelled() => return,
            }
            *st.boot.lock().unwrap() = "boot-after-shutdown".into();
            send(Message::Close(Some(CloseFrame {
                code: CloseCode::Restart,
                reason: "service restart".into(),
            })));
        }
        _ => {
            let f = final_ok(&run, "unscripted");
            finish(f.clone());
            send(res(id, f));
        }
    }
}

/// Drops every open connection without a close frame (as a SIGKILL does).
fn kill_connections(st: &State) {
    let mut k = st.drop_all.lock().unwrap();
    k.cancel();
    *k = CancellationToken::new();
}
