//! Serving the API: the accept loop and one task per connection, over TCP
//! or TLS, with the bounds a public listener needs.
//!
//! - **TLS** when `api.tls_cert`/`api.tls_key` are set, handshaken in the
//!   connection's task (never in the accept loop), within
//!   `api.header_timeout`; a plaintext client on a TLS port fails its
//!   handshake and is closed.
//! - **Slow clients**: a connection on which no request starts (and none
//!   is being answered) for `api.header_timeout` is closed: headers
//!   trickled too slowly, a client that stopped reading its answer, or
//!   simply an idle keep-alive connection. One coarse timer per connection
//!   checks this, not a timer per request. The same watchdog fails a body
//!   not fully read within `api.body_timeout` (408). Both limits hold
//!   within one watchdog period (the shorter of the two timeouts).
//! - **Declared sizes**: a `Content-Length` over `api.max_body_bytes` is
//!   answered 413 at once, before any of the body is read.
//! - **Bounded**: at most [`MAX_CONNECTIONS`] connections at once; past it
//!   a new connection is closed as soon as it is accepted.
//! - **JSON depth**: bodies nested deeper than `api.max_json_depth` are
//!   400 (the limit rides in each request for the body extractor).
//! - **Streamed answers** (a backup) count as being answered until their
//!   body ends, so the idle check above leaves them be; they bound
//!   themselves.
//! - **Upgrades** (the event stream's WebSocket) leave this loop: the
//!   upgraded connection belongs to its handler, which bounds it.
//! - Each request carries its peer address (`ConnectInfo<SocketAddr>`),
//!   which the guard limits failed authentications by.
//! - **Shutdown**: on the node's cancellation the loop stops accepting,
//!   in-flight requests get up to [`SHUTDOWN_GRACE`] to finish, and every
//!   connection task is owned by one `TaskTracker`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::task::AtomicWaker;
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::error::ApiError;
use super::json::MaxJsonDepth;
use crate::config::ApiConfig;

/// Most API connections open at once; past it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long in-flight requests may run on after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ApiConfig,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = Arc::new(Limits {
        max_body: config.max_body_bytes,
        max_json_depth: config.max_json_depth,
        header_timeout: config.header_timeout,
        body_timeout: config.body_timeout,
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tasks = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, max = MAX_CONNECTIONS, "API connection refused: too many open");
            continue;
        };
        let conn = Connection {
            app: app.clone(),
            limits: Arc::clone(&limits),
            tls: tls.clone(),
            peer,
            shutdown: shutdown.clone(),
        };
        tasks.spawn(async move {
            conn.run(stream).await;
            drop(permit);
        });
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "API connections still open at the end of the grace");
    }
    Ok(())
}

/// The bounds every request is held to.
struct Limits {
    max_body: usize,
    max_json_depth: usize,
    header_timeout: Duration,
    body_timeout: Duration,
}

/// One accepted connection.
struct Connection {
    app: Router,
    limits: Arc<Limits>,
    tls: Option<TlsAcceptor>,
    peer: SocketAddr,
    /// Cancelled when the node shuts down: the connection finishes the
    /// request in flight and closes.
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        match self.tls.clone() {
            None => self.http(stream).await,
            Some(acceptor) => {
                let timeout = self.limits.header_timeout;
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.http(tls).await,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "API TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(peer = %self.peer, "API TLS handshake timed out"),
                }
            }
        }
    }

    async fn http<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            app,
            limits,
            peer,
            shutdown,
            ..
        } = self;
        let (header_timeout, body_timeout) = (limits.header_timeout, limits.body_timeout);
        let period = header_timeout.min(body_timeout);
        let activity = Arc::new(Activity::new());
        let counted = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let (app, limits) = (app.clone(), Arc::clone(&limits));
            let answering = Answering::start(&counted);
            async move {
                let resp = handle(app, &limits, peer, &answering.0, req).await;
                Ok::<_, Infallible>(answering.hold_while_streaming(resp))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        // No per-request header timer: the watchdog below does that job.
        builder.header_read_timeout(None).keep_alive(true);
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut seen, mut since) = (0, Instant::now());
        let mut closing = false;
        // One waiter for the connection's life, not one per wake-up (each
        // registers with the node's token under its lock).
        let stop = shutdown.cancelled();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                ended = &mut conn => {
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "API connection ended");
                    }
                    return;
                }
                now = tick.tick() => {
                    let started = activity.started.load(Ordering::Relaxed);
                    if started != seen {
                        (seen, since) = (started, now);
                    } else if activity.answering.load(Ordering::Relaxed) == 0
                        && now - since >= header_timeout
                    {
                        tracing::debug!(%peer, "API connection idle or too slow; closing");
                        return;
                    }
                    activity.expire_body(now, body_timeout);
                }
            }
        }
    }
}

/// What the watchdog of a connection sees: requests started, being
/// answered, and the body being read.
struct Activity {
    started: AtomicU64,
    answering: AtomicU64,
    /// When the connection began; body start times count from it.
    epoch: Instant,
    /// The body being read: its id (0: none), and when it began (ms after
    /// `epoch`).
    body: AtomicU64,
    body_since_ms: AtomicU64,
    /// The id of the body the watchdog timed out.
    expired: AtomicU64,
    /// Wakes the body's reader when it times out.
    waker: AtomicWaker,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: AtomicU64::new(0),
            answering: AtomicU64::new(0),
            epoch: Instant::now(),
            body: AtomicU64::new(0),
            body_since_ms: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            waker: AtomicWaker::new(),
        }
    }

    /// Times out the body being read if it began `timeout` or longer ago.
    fn expire_body(&self, now: Instant, timeout: Duration) {
        let id = self.body.load(Ordering::Acquire);
        if id == 0 {
            return;
        }
        let since = self.epoch + Duration::from_millis(self.body_since_ms.load(Ordering::Acquire));
        if now.saturating_duration_since(since) >= timeout {
            self.expired.store(id, Ordering::Release);
            self.waker.wake();
        }
    }
}

/// A request body under the connection's watchdog: it fails with
/// [`BodyTimedOut`] once the watchdog finds it unread past
/// `api.body_timeout`. Costs no timer of its own.
struct WatchedBody {
    inner: Incoming,
    activity: Arc<Activity>,
    id: u64,
}

impl WatchedBody {
    fn new(inner: Incoming, activity: &Arc<Activity>) -> WatchedBody {
        // Requests on one connection are read one after another, so a
        // request's number names its body.
        let id = activity.started.load(Ordering::Relaxed);
        let since = activity.epoch.elapsed().as_millis() as u64;
        activity.body_since_ms.store(since, Ordering::Release);
        activity.body.store(id, Ordering::Release);
        WatchedBody {
            inner,
            activity: Arc::clone(activity),
            id,
        }
    }

    /// Stops watching (read to the end, failed, or dropped).
    fn done(&self) {
        let _ =
            self.activity
                .body
                .compare_exchange(self.id, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.done();
    }
}

/// The error a body reports when the watchdog timed it out.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within api.body_timeout")]
pub(crate) struct BodyTimedOut;

impl hyper::body::Body for WatchedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.activity.expired.load(Ordering::Acquire) == self.id {
            self.done();
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        self.activity.waker.register(cx.waker());
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => self.done(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.done(),
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One request being answered; counted until dropped.
struct Answering(Arc<Activity>);

impl Answering {
    fn start(activity: &Arc<Activity>) -> Answering {
        activity.started.fetch_add(1, Ordering::Relaxed);
        activity.answering.fetch_add(1, Ordering::Relaxed);
        Answering(Arc::clone(activity))
    }
}

impl Answering {
    /// `resp`, still counted as being answered until its body ends when
    /// that body is streamed (its length unknown up front, as a backup's):
    /// the watchdog must not take a long download for an idle connection.
    /// Such a stream bounds itself (a backup stops when its client takes
    /// nothing for `backup::STREAM_STALL`).
    fn hold_while_streaming(self, resp: Response) -> Response {
        if hyper::body::Body::size_hint(resp.body()).exact().is_some() {
            return resp;
        }
        resp.map(|inner| {
            Body::new(HeldBody {
                inner,
                _answering: self,
            })
        })
    }
}

/// A streamed response body that keeps its request counted as being
/// answered until it is dropped.
struct HeldBody {
    inner: Body,
    _answering: Answering,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request: refused at once when it declares a body over the limit,
/// else handed to the router with its peer address and a body deadline.
async fn handle(
    app: Router,
    limits: &Limits,
    peer: SocketAddr,
    activity: &Arc<Activity>,
    req: hyper::Request<Incoming>,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        let mut resp = ApiError::too_large(format!(
            "request body of {} bytes is over the limit of {} bytes",
            declared.unwrap_or_default(),
            limits.max_body
        ))
        .into_response();
        // The body was not read: the connection cannot carry another request.
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        // Lingering close: a client still sending its body would get a
        // reset, and lose this answer, if the connection closed on unread
        // data; discard what it sends (bounded in bytes and time) instead.
        tokio::spawn(discard(
            req.into_body(),
            4 * limits.max_body,
            limits.body_timeout,
        ));
        return resp;
    }
    // Only a request that may carry a body needs a deadline on it.
    let bodiless = declared == Some(0)
        || (declared.is_none() && !req.headers().contains_key(header::TRANSFER_ENCODING));
    let mut req: Request = if bodiless {
        req.map(Body::new)
    } else {
        req.map(|body| Body::new(WatchedBody::new(body, activity)))
    };
    req.extensions_mut().insert(ConnectInfo(peer));
    req.extensions_mut()
        .insert(MaxJsonDepth(limits.max_json_depth));
    match app.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Reads and drops up to `max` bytes of `body`, for at most `within`.
async fn discard(mut body: Incoming, max: usize, within: Duration) {
    use hyper::body::Body as _;
    let _ = tokio::time::timeout(within, async {
        let mut seen = 0;
        while seen <= max {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(frame)) => seen += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
    })
    .await;
}
