//! W3C trace context on every API request: the request's `traceparent`
//! (or a new trace when it has none or a malformed one) becomes the parent
//! of a server span, `request{method, path, trace_id, span_id}`, that every
//! log line written while the request is handled carries (JSON logs as
//! `span` fields, text logs as the span prefix). The response's
//! `traceparent` names that server span, so a client that sent none can
//! still find its request in the logs. `POST /tasks` keeps the trace a
//! client sent in the task (`tasks::Traceparent`); a task submitted
//! without one has a trace derived from its id instead (its view's
//! `trace_id`), which costs no bytes in the log.
//!
//! With `godel::api=debug`, each request also logs `request done` with its
//! status and duration. A tower layer with its own future, so a request
//! costs no boxed future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::trace::TraceContext;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Puts every request in a trace.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTraceLayer;

impl<S> Layer<S> for RequestTraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner }
    }
}

/// A service whose requests each get a server span.
#[derive(Clone, Debug)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Service<Request> for Traced<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TracedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let sent = req
            .headers()
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let fallback = sent.map_or_else(TraceContext::random, |c| c.child());
        let span = tracing::info_span!(
            "request",
            method = %req.method(),
            path = %req.uri().path(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let ctx = crate::otel::adopt(&span, sent, fallback);
        span.record("trace_id", tracing::field::display(ctx.trace_field()));
        span.record("span_id", tracing::field::display(ctx.span_field()));
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        TracedFuture {
            inner: fut.instrument(span),
            ctx,
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future inside the request's span; then the response's
    /// `traceparent`.
    pub struct TracedFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        ctx: TraceContext,
        started: Instant,
    }
}

impl<F, E> Future for TracedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Poll::Ready(out) = this.inner.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        Poll::Ready(out.map(|mut resp| {
            this.inner.span().in_scope(|| {
                tracing::debug!(
                    status = resp.status().as_u16(),
                    micros = this.started.elapsed().as_micros() as u64,
                    "request done"
                );
            });
            if let Ok(v) = HeaderValue::from_str(&this.ctx.header()) {
                resp.headers_mut().insert(TRACEPARENT.clone(), v);
            }
            resp
        }))
    }
}
