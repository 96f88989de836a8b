//! One shared WebSocket connection per gateway: the v4 handshake,
//! request/response matching by id (a request stays registered until its
//! caller has the answer it waits for, so the `agent` method's two `res`
//! frames reach the same caller), events fanned out on a bounded broadcast,
//! and a new connection (with backoff while the gateway is not ready) when
//! the old one closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::device::{Device, Proof};
use super::wire::{self, Event, Frame, GwError, Res};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The protocol version spoken (PROTOCOL.md: v4 only).
pub(crate) const PROTOCOL: u64 = 4;
/// The client id: one of the gateway's closed set.
const CLIENT_ID: &str = "gateway-client";
/// The client mode.
const CLIENT_MODE: &str = "backend";
/// The role asked for.
const ROLE: &str = "operator";
/// The scopes asked for: reading sessions and runs, starting and aborting
/// runs. (`sessions.create`, `agent`, `sessions.abort` and `chat.history`
/// all work with these two; no admin scope is needed.)
const SCOPES: [&str; 2] = ["operator.read", "operator.write"];
/// Longest a TCP connect plus the WebSocket upgrade plus the handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a frame write may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame accepted from the gateway, in bytes (its own `maxPayload`
/// is 25 MiB).
const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;
/// Events buffered per subscriber; a slower subscriber skips ahead (events
/// only feed logs and metrics: results come from responses).
const EVENT_BUFFER: usize = 1024;
/// Responses buffered per request (the `agent` method sends two).
const RES_BUFFER: usize = 4;
/// The gateway's tick period when its hello does not say.
const DEFAULT_TICK: Duration = Duration::from_secs(30);
/// First pause between connection attempts while the gateway is not ready;
/// doubled per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Least time a connection attempt gets, even at the end of its window.
const LAST_TRY: Duration = Duration::from_millis(100);

/// Why a connection could not be made.
#[derive(Clone, Debug)]
pub(crate) enum ConnectError {
    /// Not reachable or not ready yet (refused, still starting, closed
    /// during the handshake): try again, after the hint if there is one.
    NotReady(String, Option<Duration>),
    /// The gateway refused the handshake for good (token, protocol, client
    /// identity): the configuration must change.
    Rejected(String),
}

/// Why a request got no (wanted) answer.
#[derive(Clone, Debug)]
pub(crate) enum CallError {
    /// The connection closed first; why.
    Closed(String),
    /// The gateway answered with an error.
    Gateway(GwError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Closed(why) => write!(f, "connection closed: {why}"),
            CallError::Gateway(e) => write!(f, "{e}"),
        }
    }
}

/// What the gateway said about itself in `hello-ok`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Hello {
    /// Changes when the gateway process restarts: runs of an earlier boot
    /// are unknown to it.
    pub boot_id: Option<String>,
    /// The server's version.
    pub version: Option<String>,
    /// How often it sends `tick`.
    pub tick: Duration,
}

/// One live connection.
pub(crate) struct Conn {
    sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
    pending: Mutex<HashMap<String, mpsc::Sender<Res>>>,
    events: broadcast::Sender<Arc<Event>>,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
    draining: Mutex<Option<String>>,
    next_id: AtomicU64,
    /// What the gateway said in `hello-ok`.
    pub hello: Hello,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("hello", &self.hello)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// A request registered for its answers; deregistered when dropped.
pub(crate) struct Call {
    conn: Arc<Conn>,
    id: String,
    rx: mpsc::Receiver<Res>,
}

impl Call {
    /// The next `res` frame for this request: its payload, or the error it
    /// carries (with the payload, which the `agent` method's final error
    /// response fills too).
    pub(crate) async fn next(&mut self) -> Result<Value, (CallError, Value)> {
        match self.rx.recv().await {
            Some(Res {
                error: None,
                payload,
                ..
            }) => Ok(payload),
            Some(Res {
                error: Some(e),
                payload,
                ..
            }) => Err((CallError::Gateway(e), payload)),
            None => Err((CallError::Closed(self.conn.close_reason()), Value::Null)),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.conn.lock_pending().remove(&self.id);
    }
}

impl Conn {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Res>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the socket has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Why the socket closed (or "open").
    pub(crate) fn close_reason(&self) -> String {
        self.close_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "open".into())
    }

    /// The reason of the gateway's `shutdown` event, once it sent one: it is
    /// draining and will close the socket (1012) when its runs are done.
    pub(crate) fn draining(&self) -> Option<String> {
        self.draining
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A receiver of every event from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Sends a request and registers for its answers.
    pub(crate) async fn call(
        self: &Arc<Self>,
        method: &str,
        params: Value,
        traceparent: &str,
    ) -> Result<Call, CallError> {
        let id = format!("g{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel(RES_BUFFER);
        self.lock_pending().insert(id.clone(), tx);
        let call = Call {
            conn: Arc::clone(self),
            id: id.clone(),
            rx,
        };
        // Closed before the reader could drop our sender: fail now rather
        // than wait for an answer that cannot come.
        if self.is_closed() {
            return Err(CallError::Closed(self.close_reason()));
        }
        let frame = json!({
            "type": "req", "id": id, "method": method, "params": params,
            "traceparent": traceparent,
        });
        let sent = {
            let mut sink = self.sink.lock().await;
            tokio::time::timeout(
                WRITE_TIMEOUT,
                sink.send(Message::Text(frame.to_string().into())),
            )
            .await
        };
        match sent {
            Ok(Ok(())) => Ok(call),
            Ok(Err(e)) => {
                self.mark_closed(format!("write failed: {e}"));
                Err(CallError::Closed(self.close_reason()))
            }
            Err(_) => {
                self.mark_closed(format!("write took longer than {WRITE_TIMEOUT:?}"));
                Err(CallError::Closed(self.close_reason()))
            }
        }
    }

    /// One request, one answer, within `limit`.
    pub(crate) async fn request(
        self: &Arc<Self>,
        method: &str,
        params: Value,
        traceparent: &str,
        limit: Duration,
    ) -> Result<Value, CallError> {
        let work = async {
            let mut call = self.call(method, params, traceparent).await?;
            call.next().await.map_err(|(e, _)| e)
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Closed(format!(
                "no answer to {method} within {limit:?}"
            ))),
        }
    }

    fn mark_closed(&self, why: String) {
        {
            let mut r = self
                .close_reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if r.is_none() {
                *r = Some(why);
            }
        }
        // Closed first, then the senders dropped: a call registered after
        // the clear sees `closed` (see `call`).
        self.closed.cancel();
        self.lock_pending().clear();
    }

    fn dispatch(&self, text: &str) {
        let m = crate::metrics::global();
        match wire::parse(text) {
            Some(Frame::Res(res)) => {
                let tx = self.lock_pending().get(&res.id).cloned();
                match tx {
                    Some(tx) => {
                        if tx.try_send(res).is_err() {
                            tracing::debug!(
                                "openclaw: a response nobody reads any more was dropped"
                            );
                        }
                    }
                    None => {
                        tracing::debug!(id = %res.id, "openclaw: response to a request nobody waits for")
                    }
                }
            }
            Some(Frame::Event(ev)) => {
                m.openclaw_events
                    .with_label_values(&[event_label(&ev.event)])
                    .inc();
                if ev.event == "shutdown" {
                    let reason = wire::str_at(&ev.payload, &["reason"])
                        .unwrap_or("gateway stopping")
                        .to_owned();
                    tracing::info!(%reason, "openclaw gateway is shutting down (draining)");
                    *self.draining.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
                }
                let _ = self.events.send(Arc::new(ev));
            }
            Some(Frame::Other) => {}
            None => {
                m.openclaw_events.with_label_values(&["unparsed"]).inc();
                tracing::debug!(
                    len = text.len(),
                    "openclaw: skipped a frame that is not a JSON object with a type"
                );
            }
        }
    }
}

/// Event names used as a metric label: the known ones, else `other`.
fn event_label(name: &str) -> &'static str {
    match name {
        "agent" => "agent",
        "chat" => "chat",
        "tick" => "tick",
        "health" => "health",
        "shutdown" => "shutdown",
        "task" => "task",
        "sessions.changed" => "sessions.changed",
        "session.message" => "session.message",
        _ => "other",
    }
}

/// Reads frames until the socket closes, the gateway goes quiet for two
/// tick periods, or the client is dropped.
async fn read_loop(conn: Arc<Conn>, mut stream: SplitStream<Ws>, stop: CancellationToken) {
    let quiet_limit = conn.hello.tick * 2;
    let why = loop {
        let next = tokio::select! {
            () = stop.cancelled() => {
                let mut sink = conn.sink.lock().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                break "client dropped".to_owned();
            }
            () = conn.closed.cancelled() => break conn.close_reason(),
            n = tokio::time::timeout(quiet_limit, stream.next()) => n,
        };
        match next {
            Err(_) => break format!("no frame from the gateway for {quiet_limit:?}"),
            Ok(None) => break "socket closed without a close frame".to_owned(),
            Ok(Some(Err(e))) => break format!("socket error: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => conn.dispatch(t.as_str()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                break match frame {
                    Some(f) => format!("closed by the gateway: {} {}", u16::from(f.code), f.reason),
                    None => "closed by the gateway".to_owned(),
                };
            }
            Ok(Some(Ok(_))) => {}
        }
    };
    tracing::info!(reason = %why, "openclaw connection closed");
    conn.mark_closed(why);
}

/// The client of one gateway: makes and keeps the shared connection.
pub(crate) struct Client {
    url: String,
    token: String,
    device: Device,
    current: tokio::sync::Mutex<Option<Arc<Conn>>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Client {
    /// A client of the gateway at `url`, signing in with `token` and `device`.
    pub(crate) fn new(url: String, token: String, device: Device) -> Client {
        Client {
            url,
            token,
            device,
            current: tokio::sync::Mutex::new(None),
            stop: CancellationToken::new(),
        }
    }

    /// The open connection, or a new one: one try, bounded by `limit`.
    pub(crate) async fn conn_once(&self, limit: Duration) -> Result<Arc<Conn>, ConnectError> {
        let mut cur = self.current.lock().await;
        if let Some(c) = cur.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let m = crate::metrics::global();
        let made = tokio::time::timeout(limit.min(HANDSHAKE_TIMEOUT), self.handshake()).await;
        let made = made.unwrap_or_else(|_| {
            Err(ConnectError::NotReady(
                format!("no hello within {:?}", limit.min(HANDSHAKE_TIMEOUT)),
                None,
            ))
        });
        let outcome = match &made {
            Ok(_) => "ok",
            Err(ConnectError::NotReady(..)) => "not_ready",
            Err(ConnectError::Rejected(_)) => "rejected",
        };
        m.openclaw_connects.with_label_values(&[outcome]).inc();
        let conn = made?;
        *cur = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// The open connection, or a new one, trying until `until` while the
    /// gateway is not ready (with backoff, honouring its retry hint).
    pub(crate) async fn conn(&self, until: Instant) -> Result<Arc<Conn>, ConnectError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            // The last try still gets a moment to complete a handshake.
            let left = until.saturating_duration_since(Instant::now());
            match self.conn_once(left.max(LAST_TRY)).await {
                Ok(c) => return Ok(c),
                Err(ConnectError::NotReady(why, hint)) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ConnectError::NotReady(why, hint));
                    }
                    let pause = hint.unwrap_or(backoff).min(MAX_BACKOFF).min(left);
                    tracing::debug!(reason = %why, ?pause, "openclaw gateway not ready; retrying");
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens a socket and runs the v4 handshake.
    async fn handshake(&self) -> Result<Arc<Conn>, ConnectError> {
        let not_ready = |why: String| ConnectError::NotReady(why, None);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let (ws, _) = tokio_tungstenite::connect_async_with_config(&self.url, Some(config), true)
            .await
            .map_err(|e| not_ready(format!("cannot connect to {}: {e}", self.url)))?;
        let (mut sink, mut stream) = ws.split();
        // 1. The challenge.
        let challenge = loop {
            match next_frame(&mut stream).await.map_err(not_ready)? {
                Frame::Event(e) if e.event == "connect.challenge" => break e.payload,
                _ => continue,
            }
        };
        let nonce = wire::str_at(&challenge, &["nonce"])
            .ok_or_else(|| not_ready("connect.challenge without a nonce".into()))?
            .to_owned();
        let ts = challenge.get("ts").and_then(Value::as_u64).unwrap_or(0);
        // 2. connect, with the token and the device proof.
        let proof = Proof {
            client_id: CLIENT_ID,
            client_mode: CLIENT_MODE,
            role: ROLE,
            scopes: &SCOPES,
            signed_at: ts,
            token: &self.token,
            nonce: &nonce,
            platform: std::env::consts::OS,
        };
        let params = json!({
            "minProtocol": PROTOCOL, "maxProtocol": PROTOCOL,
            "client": {
                "id": CLIENT_ID, "version": env!("CARGO_PKG_VERSION"),
                "platform": std::env::consts::OS, "mode": CLIENT_MODE, "displayName": "godel",
            },
            "role": ROLE, "scopes": SCOPES, "caps": ["tool-events"],
            "locale": "en-US", "userAgent": concat!("godel/", env!("CARGO_PKG_VERSION")),
            "auth": { "token": self.token },
            "device": {
                "id": self.device.id(), "publicKey": self.device.public_key(),
                "signature": self.device.sign(&proof), "signedAt": ts, "nonce": nonce,
            },
        });
        let frame = json!({"type": "req", "id": "connect", "method": "connect", "params": params});
        sink.send(Message::Text(frame.to_string().into()))
            .await
            .map_err(|e| not_ready(format!("cannot send connect: {e}")))?;
        // 3. hello-ok, or why not.
        let hello = loop {
            match next_frame(&mut stream).await.map_err(not_ready)? {
                Frame::Res(r) if r.id == "connect" => match r.error {
                    None => break r.payload,
                    Some(e) if e.is_not_ready() => {
                        let hint = e.retry_after_ms.map(Duration::from_millis);
                        return Err(ConnectError::NotReady(
                            format!("gateway answered {e}"),
                            hint,
                        ));
                    }
                    Some(e) => {
                        return Err(ConnectError::Rejected(format!(
                            "the gateway refused the connection: {e}"
                        )));
                    }
                },
                _ => continue,
            }
        };
        let hello = Hello {
            boot_id: wire::str_at(&hello, &["server", "bootId"]).map(str::to_owned),
            version: wire::str_at(&hello, &["server", "version"]).map(str::to_owned),
            tick: hello
                .get("policy")
                .and_then(|p| p.get("tickIntervalMs"))
                .and_then(Value::as_u64)
                .filter(|ms| *ms > 0)
                .map_or(DEFAULT_TICK, Duration::from_millis),
        };
        tracing::info!(url = %self.url, boot = ?hello.boot_id, version = ?hello.version, device = %self.device.id(), "openclaw connection open");
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let conn = Arc::new(Conn {
            sink: tokio::sync::Mutex::new(sink),
            pending: Mutex::new(HashMap::new()),
            events,
            closed: CancellationToken::new(),
            close_reason: Mutex::new(None),
            draining: Mutex::new(None),
            next_id: AtomicU64::new(1),
            hello,
        });
        tokio::spawn(read_loop(Arc::clone(&conn), stream, self.stop.clone()));
        Ok(conn)
    }
}

/// The next parseable frame during the handshake.
async fn next_frame(stream: &mut SplitStream<Ws>) -> Result<Frame, String> {
    loop {
        match stream.next().await {
            None => return Err("socket closed during the handshake".into()),
            Some(Err(e)) => return Err(format!("socket error during the handshake: {e}")),
            Some(Ok(Message::Text(t))) => {
                if let Some(f) = wire::parse(t.as_str()) {
                    return Ok(f);
                }
            }
            Some(Ok(Message::Close(f))) => {
                return Err(match f {
                    Some(f) => format!(
                        "closed during the handshake: {} {}",
                        u16::from(f.code),
                        f.reason
                    ),
                    None => "closed during the handshake".into(),
                });
            }
            Some(Ok(_)) => {}
        }
    }
}

/// A W3C `traceparent` for a call that belongs to no task: a new trace.
pub(crate) fn new_traceparent() -> String {
    crate::trace::TraceContext::random().header()
}
