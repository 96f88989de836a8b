//! `GET /api/v1/events`: the cluster's events over a WebSocket.
//!
//! The protocol (JSON text frames):
//! - **Credential**: the `Authorization` header of the upgrade (CLI), or,
//!   when there is none (browsers), a first message `{"auth": "<key or
//!   JWT>"}` within [`AUTH_WITHIN`]. A refusal is an `error` message and
//!   close code 4001 (4029 when the address has failed too often).
//! - The server then says `{"hello": {"node", "seq", "oldest"}}`: the last
//!   seq this node has applied and the oldest it can replay. With several
//!   queue shards each Raft group numbers its own events: `hello` also
//!   lists `groups` (`[{"group", "seq", "oldest"}]`, the meta group's
//!   first) and `resume`, the position to resume from now
//!   (`g0:412,g1:77,...`).
//! - **Subscribing**: `{"subscribe": ["task.*", "gateway.>"]}` and
//!   `{"unsubscribe": [...]}`, any time (or `?subscribe=a,b` in the URL);
//!   each is answered `{"subscribed": [...]}` with the patterns now held.
//!   Nothing is sent before the first pattern.
//! - **Events**: `{"seq", "type", "time", "tenant", "data"}`, in commit
//!   order, each once; a queue shard's also carry `"group"` (their `seq`
//!   counts in that group, and the order holds within a group). Only those the caller may read: each kind needs what
//!   reading its object over REST needs, and scoped roles see only their
//!   tenant's.
//! - **Resuming**: `?since=<seq>` replays from the node's buffer first; if
//!   the buffer no longer holds all of it, a `{"gap": {"from", "to"}}`
//!   comes first. A gap also reports events the node itself missed. With
//!   several shards, `?since=g0:412,g1:77,...` resumes each group named
//!   (a group not named, or a plain number's other groups, starts live),
//!   and a gap names its `group`.
//! - **Slow consumers**: one that falls `api.events_queue` events behind
//!   gets `{"lagged": {"resume": <seq>}}` (with several shards, the
//!   position string) and close code 4008; one that does not take a message within [`SEND_WITHIN`] is
//!   dropped. Neither holds up the node.
//! - Bad client messages get an `error` message and change nothing.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use utoipa::IntoParams;

use super::json::Params;
use super::permissions::{Permission, RouteSpec};
use super::{Api, ApiError, ApiResult, Caller};
use crate::events::{Live, MAX_PATTERNS, Pattern, StreamEvent, Subscription};
use crate::fsm::What;

/// How long a client without an `Authorization` header has to send its
/// credential.
pub const AUTH_WITHIN: Duration = Duration::from_secs(5);
/// How long one message may take to go out before the subscriber is
/// dropped as stalled.
pub const SEND_WITHIN: Duration = Duration::from_secs(10);
/// Most live events written before one flush.
const MAX_BATCH: usize = 1024;
/// Largest client message, in bytes.
const MAX_CLIENT_MESSAGE: usize = 16 * 1024;

/// Close codes (the private range).
const CLOSE_UNAUTHENTICATED: u16 = 4001;
const CLOSE_FORBIDDEN: u16 = 4003;
const CLOSE_LAGGED: u16 = 4008;
const CLOSE_RATE_LIMITED: u16 = 4029;
/// Going away: the node shuts down.
const CLOSE_GOING_AWAY: u16 = 1001;

/// The query of the upgrade.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Replay the node's buffered events after this seq first (a `gap`
    /// message says what it no longer holds); with several shards,
    /// `g0:412,g1:77,...` per group.
    #[param(value_type = Option<String>, pattern = "^([0-9]{1,19}|g[0-9]{1,3}:[0-9]{1,19}(,g[0-9]{1,3}:[0-9]{1,19})*)$")]
    since: Option<String>,
    /// Patterns to start with, comma-separated (`task.*,gateway.>`): `*`
    /// matches one segment, a final `>` the rest.
    subscribe: Option<String>,
}

/// What a client may send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage {
    auth: Option<String>,
    subscribe: Option<Vec<String>>,
    unsubscribe: Option<Vec<String>>,
}

/// The upgrade: checks the query, then hands the socket to [`session`].
#[utoipa::path(
    get,
    path = "/events",
    params(EventsQuery),
    description = "The cluster's event stream over a WebSocket (send an upgrade request). \
        Messages are JSON text: `hello`, then events `{seq, type, time, tenant, data}` \
        matching the patterns sent as `{\"subscribe\": [...]}`, and `gap`, `lagged` or \
        `error` notices. Without an `Authorization` header the first message must be \
        `{\"auth\": \"<key or JWT>\"}`. A request that is not an upgrade is 400.",
    responses((status = 101, description = "Switched to the WebSocket event stream"))
)]
pub async fn subscribe(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Params(q): Params<EventsQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let patterns = match &q.subscribe {
        Some(list) => parse_patterns(list.split(',').filter(|p| !p.is_empty()))?,
        None => Vec::new(),
    };
    let since = match &q.since {
        Some(text) => parse_since(text, api.events.len())?,
        None => vec![None; api.events.len()],
    };
    let ws = ws.map_err(|e| {
        ApiError::invalid(format!(
            "this is a WebSocket endpoint; send an upgrade request ({e})"
        ))
    })?;
    let admitted = api
        .events
        .first()
        .expect("invariant: the meta group's hub exists")
        .admit()
        .ok_or_else(|| ApiError::unavailable("too many event-stream connections on this node"))?;
    let spec = super::permissions::spec(&axum::http::Method::GET, "/events")
        .expect("invariant: the events route is in the permission table");
    Ok(ws
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| async move {
            let start = Start {
                api,
                spec,
                caller: caller.map(|Extension(c)| c),
                peer,
                since,
                patterns,
            };
            session(socket, start).await;
            drop(admitted);
        })
        .into_response())
}

/// Checks patterns; the error names the first bad one.
fn parse_patterns<'a>(list: impl Iterator<Item = &'a str>) -> ApiResult<Vec<Pattern>> {
    let patterns = list
        .map(Pattern::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::invalid)?;
    if patterns.len() > MAX_PATTERNS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_PATTERNS} patterns"
        )));
    }
    Ok(patterns)
}

/// Everything a session starts from.
struct Start {
    api: Api,
    spec: &'static RouteSpec,
    caller: Option<Caller>,
    peer: SocketAddr,
    since: Vec<Option<u64>>,
    patterns: Vec<Pattern>,
}

/// `since` as a position per group: a plain seq is the meta group's;
/// `g0:412,g1:77` names groups (each at most once). Groups not named start
/// live.
fn parse_since(text: &str, groups: usize) -> ApiResult<Vec<Option<u64>>> {
    let bad = |why: String| ApiError::invalid(format!("invalid field `since`: {why}"));
    let mut at = vec![None; groups];
    if let Ok(seq) = text.parse::<u64>() {
        at[0] = Some(seq);
        return Ok(at);
    }
    for part in text.split(',') {
        let (g, seq) = part
            .strip_prefix('g')
            .and_then(|p| p.split_once(':'))
            .ok_or_else(|| bad(format!("`{part}` is neither a seq nor g<group>:<seq>")))?;
        let g: usize = g.parse().map_err(|_| bad(format!("`{part}`: bad group")))?;
        let seq: u64 = seq.parse().map_err(|_| bad(format!("`{part}`: bad seq")))?;
        let slot = at.get_mut(g).ok_or_else(|| {
            bad(format!(
                "no group {g} (this cluster has 0..={})",
                groups - 1
            ))
        })?;
        if slot.replace(seq).is_some() {
            return Err(bad(format!("group {g} named twice")));
        }
    }
    Ok(at)
}

/// The position string of `sent` (per group): `g0:412,g1:77,...`.
fn position(sent: &[u64]) -> String {
    sent.iter()
        .enumerate()
        .map(|(g, seq)| format!("g{g}:{seq}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a session ended, for the metric.
#[derive(Clone, Copy)]
enum End {
    Closed,
    Lagged,
    Slow,
    Unauthenticated,
    Shutdown,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Lagged => "lagged",
            End::Slow => "slow",
            End::Unauthenticated => "unauthenticated",
            End::Shutdown => "shutdown",
        }
    }
}

async fn session(mut socket: WebSocket, start: Start) {
    let end = run(&mut socket, start).await;
    crate::metrics::global()
        .event_disconnects
        .with_label_values(&[end.as_str()])
        .inc();
}

/// One subscriber, from its credential to its end.
async fn run(socket: &mut WebSocket, start: Start) -> End {
    let Start {
        api,
        spec,
        caller,
        peer,
        since,
        patterns,
    } = start;
    let caller = match caller {
        Some(c) => c,
        None => match authenticate(socket, &api, spec, peer).await {
            Ok(c) => c,
            Err(end) => return end,
        },
    };
    let (last, oldest) = api.events[0].position();
    let mut hello = json!({"hello": {"node": api.node.id(), "seq": last, "oldest": oldest}});
    if api.events.len() > 1 {
        let at: Vec<(u64, u64)> = api.events.iter().map(|h| h.position()).collect();
        let groups: Vec<_> = at
            .iter()
            .enumerate()
            .map(|(g, (seq, oldest))| json!({"group": g, "seq": seq, "oldest": oldest}))
            .collect();
        let last: Vec<u64> = at.iter().map(|(seq, _)| *seq).collect();
        hello["hello"]["groups"] = json!(groups);
        hello["hello"]["resume"] = json!(position(&last));
    }
    if send(socket, hello.to_string()).await.is_err() {
        return End::Slow;
    }
    let mut sub = Subscriber {
        caller,
        patterns,
        sent_through: vec![0; since.len()],
        since,
        streams: Vec::new(),
    };
    if !sub.patterns.is_empty()
        && let Err(end) = sub.start(socket, &api).await
    {
        return end;
    }
    let shutdown = api.node.shutdown_token().clone();
    let stop = shutdown.cancelled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => {
                close(socket, CLOSE_GOING_AWAY, "node shutting down").await;
                return End::Shutdown;
            }
            msg = socket.recv() => {
                let Some(Ok(msg)) = msg else { return End::Closed };
                match msg {
                    Message::Text(text) => {
                        if let Err(end) = sub.on_message(socket, &api, &text).await {
                            return end;
                        }
                    }
                    Message::Binary(_) => {
                        if error(socket, "invalid_request", "send JSON text messages").await.is_err() {
                            return End::Slow;
                        }
                    }
                    Message::Close(_) => return End::Closed,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            (g, live) = next_live(&mut sub.streams) => {
                if let Err(end) = sub.on_live(socket, g, live).await {
                    return end;
                }
                if let Err(end) = sub.drain(socket).await {
                    return end;
                }
            }
        }
    }
}

/// Waits for the first message's credential and checks it.
async fn authenticate(
    socket: &mut WebSocket,
    api: &Api,
    spec: &'static RouteSpec,
    peer: SocketAddr,
) -> Result<Caller, End> {
    let first = tokio::time::timeout(AUTH_WITHIN, socket.recv()).await;
    let bearer = match first {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<ClientMessage>(&text)
            .ok()
            .and_then(|m| m.auth),
        Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => return Err(End::Closed),
        _ => None,
    };
    let Some(bearer) = bearer else {
        let msg = "send {\"auth\": \"<api key or JWT>\"} first, or an Authorization header";
        let _ = error(socket, "unauthenticated", msg).await;
        close(socket, CLOSE_UNAUTHENTICATED, "unauthenticated").await;
        return Err(End::Unauthenticated);
    };
    match super::auth::in_band(api, spec, &bearer, Some(peer.ip())) {
        Ok(caller) => Ok(caller),
        Err(e) => {
            let code = match e.code {
                "rate_limited" => CLOSE_RATE_LIMITED,
                "forbidden" => CLOSE_FORBIDDEN,
                _ => CLOSE_UNAUTHENTICATED,
            };
            let _ = error(socket, e.code, &e.message).await;
            close(socket, code, e.code).await;
            Err(End::Unauthenticated)
        }
    }
}

/// One subscriber's state.
struct Subscriber {
    caller: Caller,
    patterns: Vec<Pattern>,
    /// Per group: replay from after this seq when the stream starts.
    since: Vec<Option<u64>>,
    /// Per group, the live stream, once the first pattern came (empty
    /// before).
    streams: Vec<Subscription>,
    /// Per group, the last seq sent (or skipped as replayed).
    sent_through: Vec<u64>,
}

impl Subscriber {
    /// Starts the stream: the gap, the replay, then live.
    async fn start(&mut self, socket: &mut WebSocket, api: &Api) -> Result<(), End> {
        for (g, hub) in api.events.iter().enumerate() {
            let mut stream = hub.subscribe(self.since[g]);
            self.sent_through[g] = stream.skip_through;
            if let Some((from, to)) = stream.gap {
                send(socket, gap(g, from, to)).await?;
            }
            for e in std::mem::take(&mut stream.replay) {
                self.offer(socket, &e).await?;
            }
            self.streams.push(stream);
        }
        flush(socket).await
    }

    /// Sends `e` if the caller may see it and a pattern matches.
    async fn offer(&mut self, socket: &mut WebSocket, e: &StreamEvent) -> Result<(), End> {
        if !may_see(&self.caller, e.what()) {
            return Ok(());
        }
        let name = e.what().name();
        if !self.patterns.iter().any(|p| p.matches(name)) {
            return Ok(());
        }
        queue(socket, e.json().to_owned()).await?;
        crate::metrics::global().events_sent.inc();
        Ok(())
    }

    /// Takes what the live stream already holds (up to [`MAX_BATCH`]
    /// items), then flushes once: one write for many events.
    async fn drain(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let mut taken = 0;
        for g in 0..self.streams.len() {
            while taken < MAX_BATCH {
                let next = match self.streams[g].live.try_recv() {
                    Ok(live) => Ok(live),
                    Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                };
                taken += 1;
                self.on_live(socket, g, next).await?;
            }
        }
        flush(socket).await
    }

    /// A client message: patterns change, or an error says why not.
    async fn on_message(
        &mut self,
        socket: &mut WebSocket,
        api: &Api,
        text: &str,
    ) -> Result<(), End> {
        let msg = match serde_json::from_str::<ClientMessage>(text) {
            Ok(m) if m.auth.is_none() && (m.subscribe.is_some() || m.unsubscribe.is_some()) => m,
            Ok(m) if m.auth.is_some() => {
                return error(socket, "invalid_request", "already authenticated").await;
            }
            Ok(_) => {
                return error(
                    socket,
                    "invalid_request",
                    "expected `subscribe` or `unsubscribe`",
                )
                .await;
            }
            Err(e) => return error(socket, "invalid_request", &format!("bad message: {e}")).await,
        };
        let add = match parse_patterns(msg.subscribe.iter().flatten().map(String::as_str)) {
            Ok(p) => p,
            Err(e) => return error(socket, "invalid_request", &e.message).await,
        };
        let remove = match parse_patterns(msg.unsubscribe.iter().flatten().map(String::as_str)) {
            Ok(p) => p,
            Err(e) => return error(socket, "invalid_request", &e.message).await,
        };
        let mut next = self.patterns.clone();
        next.retain(|p| !remove.contains(p));
        for p in add {
            if !next.contains(&p) {
                next.push(p);
            }
        }
        if next.len() > MAX_PATTERNS {
            let m = format!("at most {MAX_PATTERNS} patterns");
            return error(socket, "invalid_request", &m).await;
        }
        self.patterns = next;
        let held: Vec<&str> = self.patterns.iter().map(Pattern::as_str).collect();
        send(socket, json!({ "subscribed": held }).to_string()).await?;
        if self.streams.is_empty() && !self.patterns.is_empty() {
            self.start(socket, api).await?;
        }
        Ok(())
    }

    /// The next live item.
    async fn on_live(
        &mut self,
        socket: &mut WebSocket,
        g: usize,
        live: Result<Live, RecvError>,
    ) -> Result<(), End> {
        match live {
            Ok(Live::Event(e)) => {
                if e.seq() <= self.sent_through[g] {
                    return Ok(());
                }
                self.sent_through[g] = e.seq();
                self.offer(socket, &e).await
            }
            Ok(Live::Gap { from, to }) => {
                self.sent_through[g] = self.sent_through[g].max(to);
                send(socket, gap(g, from, to)).await
            }
            Err(RecvError::Lagged(missed)) => {
                let resume = match self.sent_through.as_slice() {
                    [one] => json!(one),
                    all => json!(position(all)),
                };
                let text = json!({"lagged": {"missed": missed, "resume": resume}}).to_string();
                let _ = send(socket, text).await;
                let shown = resume.as_str().map_or(resume.to_string(), str::to_owned);
                let why = format!("lagged: resume with since={shown}");
                close(socket, CLOSE_LAGGED, &why).await;
                Err(End::Lagged)
            }
            Err(RecvError::Closed) => {
                close(socket, CLOSE_GOING_AWAY, "node shutting down").await;
                Err(End::Shutdown)
            }
        }
    }
}

/// The next item of any group's live stream, with the group; never before
/// the streams start.
async fn next_live(streams: &mut [Subscription]) -> (usize, Result<Live, RecvError>) {
    match streams {
        [] => std::future::pending().await,
        [one] => (0, one.live.recv().await),
        all => {
            // A broadcast receive is cancel-safe: the losers lose nothing.
            let each = all
                .iter_mut()
                .enumerate()
                .map(|(g, s)| Box::pin(async move { (g, s.live.recv().await) }));
            futures_util::future::select_all(each).await.0
        }
    }
}

/// Whether `caller` may read the object of an event: what its REST read
/// needs, in a tenant it sees.
fn may_see(caller: &Caller, what: &What) -> bool {
    let needs = match what {
        What::Task { .. } | What::Budget(_) => Permission::TasksRead,
        What::Session { .. } | What::Checkpoint { .. } => Permission::SessionsRead,
        What::Gateway { .. } | What::Agent { .. } => Permission::RegistryRead,
        What::Node { .. } => Permission::ClusterRead,
        What::Audit(_) => Permission::AuditRead,
    };
    needs.granted_to(caller.role()) && what.tenant().is_none_or(|t| caller.sees_named(t))
}

/// A `gap` notice; one of a queue shard's events names its group.
fn gap(group: usize, from: u64, to: u64) -> String {
    let mut v = json!({"gap": {"from": from, "to": to}});
    if group > 0 {
        v["gap"]["group"] = json!(group);
    }
    v.to_string()
}

/// Sends one text message: [`queue`], then [`flush`].
async fn send(socket: &mut WebSocket, text: String) -> Result<(), End> {
    queue(socket, text).await?;
    flush(socket).await
}

/// Queues one text message without flushing (it goes out when the
/// buffer fills or at the next flush), within [`SEND_WITHIN`].
async fn queue(socket: &mut WebSocket, text: String) -> Result<(), End> {
    use futures_util::SinkExt;
    let msg = Message::Text(Utf8Bytes::from(text));
    match tokio::time::timeout(SEND_WITHIN, socket.feed(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Closed),
        Err(_) => Err(End::Slow),
    }
}

/// Sends what [`queue`] left buffered, within [`SEND_WITHIN`].
async fn flush(socket: &mut WebSocket) -> Result<(), End> {
    use futures_util::SinkExt;
    match tokio::time::timeout(SEND_WITHIN, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Closed),
        Err(_) => Err(End::Slow),
    }
}

/// An `error` message; the session goes on.
async fn error(socket: &mut WebSocket, code: &str, message: &str) -> Result<(), End> {
    let text = json!({"error": {"code": code, "message": message, "retryable": false}});
    send(socket, text.to_string()).await
}

/// Closes with `code`, within [`SEND_WITHIN`].
async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    };
    let _ = tokio::time::timeout(SEND_WITHIN, socket.send(Message::Close(Some(frame)))).await;
}

#[cfg(test)]
mod tests {
    use super::{parse_since, position};

    #[test]
    fn since_is_a_seq_or_a_position_per_group() {
        assert_eq!(parse_since("412", 1).unwrap(), vec![Some(412)]);
        assert_eq!(
            parse_since("412", 4).unwrap(),
            vec![Some(412), None, None, None],
            "a plain seq is the meta group's; the shards start live"
        );
        assert_eq!(
            parse_since("g0:412,g2:7", 4).unwrap(),
            vec![Some(412), None, Some(7), None]
        );
        let at = parse_since(&position(&[5, 0, 9, 3]), 4).unwrap();
        assert_eq!(at, vec![Some(5), Some(0), Some(9), Some(3)], "round trip");
        for bad in ["g4:1", "g1:1,g1:2", "x", "g1", "g1:", "1:2", "g0:-1", ""] {
            let e = parse_since(bad, 4).unwrap_err();
            assert!(e.message.contains("`since`"), "{bad}: {}", e.message);
        }
    }
}
