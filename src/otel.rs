//! OTLP span export: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the spans
//! Godel makes (`request` for each API call, `attempt` for each run of a
//! task on a gateway) go to that collector over OTLP/HTTP with JSON
//! bodies, batched in the background (the standard `OTEL_*` variables
//! tune the exporter and the batch: `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_BSP_SCHEDULE_DELAY`, ...; the service name is `godel`).
//!
//! Each exported span keeps the W3C trace it belongs to: a request's span
//! is the child of the `traceparent` the client sent, an attempt's the
//! child of its task's trace, and the ids the logs, the response's
//! `traceparent` and the gateway call name are the exported span's own.
//! Without the variable nothing is exported and nothing of this runs.

use std::sync::OnceLock;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace::TraceContext;

/// The variable that turns export on.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The provider, once export is on (flushed at shutdown).
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported.
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// The tracing layer that exports Godel's spans, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set; needs a tokio runtime (the
/// exporter's requests run on it).
pub fn layer<S>() -> anyhow::Result<Option<impl tracing_subscriber::Layer<S>>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    if std::env::var_os(ENDPOINT_VAR).is_none_or(|v| v.is_empty()) {
        return Ok(None);
    }
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()?,
        runtime: tokio::runtime::Handle::try_current()?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_http_client(client)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("godel")
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("godel");
    let _ = PROVIDER.set(provider);
    let exported = tracing_subscriber::filter::filter_fn(|m| {
        m.is_span() && matches!(m.name(), "request" | "attempt")
    });
    Ok(Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(exported),
    ))
}

/// Sends what is still batched (at shutdown).
pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

/// Makes `span` (a `request` or `attempt` span) the child of `parent` (a
/// root when none), and returns the context its ids should be named by:
/// the exported span's own when export is on, else `fallback`.
pub fn adopt(
    span: &tracing::Span,
    parent: Option<TraceContext>,
    fallback: TraceContext,
) -> TraceContext {
    if !enabled() || span.is_none() {
        return fallback;
    }
    if let Some(parent) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_bytes()),
            SpanId::from_bytes(parent.span_bytes()),
            if parent.sampled() {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let ctx = span.context();
    let own = ctx.span().span_context().clone();
    if !own.is_valid() {
        return fallback;
    }
    TraceContext::from_parts(
        own.trace_id().to_bytes(),
        own.span_id().to_bytes(),
        own.is_sampled(),
    )
}

/// The exporter's HTTP client: the reqwest the CLI and the nodes already
/// use, on the node's runtime (the batch processor runs on a thread of
/// its own, outside it).
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let http = self.http.clone();
        let (parts, body) = request.into_parts();
        let call = async move {
            let mut req = http.request(parts.method, parts.uri.to_string()).body(body);
            for (name, value) in &parts.headers {
                req = req.header(name, value);
            }
            let resp = req.send().await?;
            let status = resp.status();
            let bytes = resp.bytes().await?;
            let mut out = opentelemetry_http::Response::new(bytes);
            *out.status_mut() = status;
            Ok::<_, reqwest::Error>(out)
        };
        Ok(self.runtime.spawn(call).await??)
    }
}
