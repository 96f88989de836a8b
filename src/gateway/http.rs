//! The `http` driver: POSTs each attempt to a webhook and takes the 2xx
//! response body as the result.
//!
//! Request body: `{"task_id": 7, "fencing_token": 12, "session_key": "s" | null,
//! "payload": <the task's payload JSON>}`. Status mapping: 2xx succeeds; 5xx,
//! 408 and 429, connection errors and timeouts are [`DriverError::Unavailable`]
//! or [`DriverError::Timeout`] (retryable); any other status (redirects
//! included: they are not followed) fails the task for good.

use std::fmt;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::spec::{GatewayKind, HttpSpec};
use super::{
    BoxFuture, DriverError, GatewayDriver, Health, MAX_RESULT_BYTES, PROBE_TIMEOUT, Result,
    RunOutput, RunRequest,
};

/// How long establishing a connection may take (within the attempt's timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of an error response's body goes into the error, in bytes.
const MAX_ERROR_BODY_BYTES: usize = 512;

/// The `http` driver.
pub struct HttpDriver {
    spec: HttpSpec,
    client: reqwest::Client,
    /// The resolved `Authorization` value, marked sensitive.
    auth: Option<HeaderValue>,
}

impl fmt::Debug for HttpDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpDriver")
            .field("url", &self.spec.url)
            .field("health_url", &self.spec.health_url)
            .field(
                "auth_header",
                &self.spec.auth_header.as_ref().map(|r| r.to_string()),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Body<'a> {
    task_id: u64,
    fencing_token: u64,
    session_key: Option<&'a str>,
    payload: &'a RawValue,
    /// A session's earlier turns, carried to this gateway (only on the
    /// first attempt after it moved here).
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a str>,
    /// The feature flags on for this task (absent when none are).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    flags: &'a [String],
    /// The agent's role: `{name, tools, prompt}` (`tools` null: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a super::RunRole>,
}

impl HttpDriver {
    /// A driver for the webhook `spec` names (assumed validated); reads the
    /// auth secret it refers to, as `policy` allows.
    pub fn new(spec: HttpSpec, policy: &super::DriverPolicy) -> Result<Self> {
        let auth = match &spec.auth_header {
            None => None,
            Some(r) => {
                let mut v = HeaderValue::from_str(&r.resolve(policy)?).map_err(|_| {
                    DriverError::Secret {
                        reference: r.to_string(),
                        reason: "not a valid header value".into(),
                    }
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let client = reqwest::Client::builder()
            .no_proxy()
            // A webhook answers itself: a redirect is a misconfiguration, and
            // following one could carry the task (and its auth) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| DriverError::Unavailable {
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Self { spec, client, auth })
    }

    async fn attempt(&self, req: RunRequest, cancel: CancellationToken) -> Result<RunOutput> {
        let started = tokio::time::Instant::now();
        let payload: &RawValue =
            serde_json::from_str(&req.payload).map_err(|e| DriverError::TaskFailed {
                reason: format!("payload is not JSON: {e}"),
                retryable: false,
            })?;
        let body = serde_json::to_vec(&Body {
            task_id: req.task_id.0,
            fencing_token: req.fencing_token.0,
            session_key: req.session_key.as_ref().map(|k| k.0.as_str()),
            payload,
            context: req.context.as_deref(),
            flags: &req.flags,
            role: req.role.as_deref(),
        })
        .map_err(|e| DriverError::TaskFailed {
            reason: format!("cannot encode the request: {e}"),
            retryable: false,
        })?;
        let timeout = req.timeout;
        super::bounded(timeout, &cancel, async move {
            let mut post = self
                .client
                .post(&self.spec.url)
                .header(CONTENT_TYPE, "application/json")
                .body(body);
            if let Some(auth) = &self.auth {
                post = post.header(AUTHORIZATION, auth.clone());
            }
            if let Some(trace) = &req.trace {
                post = post.header("traceparent", trace.header());
            }
            let fence = &req.fence;
            post = post
                .header("godel-gateway-id", fence.gateway.0.as_str())
                .header("godel-gateway-owner", fence.owner)
                .header("godel-gateway-token", fence.token);
            req.guard.check()?;
            let resp = post.send().await.map_err(|e| send_error(e, timeout))?;
            let status = resp.status();
            let fenced =
                status == StatusCode::CONFLICT && resp.headers().contains_key(super::FENCED_HEADER);
            if status.is_success() {
                let bytes = read_body(resp, MAX_RESULT_BYTES, false, timeout).await?;
                return Ok(RunOutput {
                    result_json: super::result_json(&bytes)?,
                    elapsed: started.elapsed(),
                });
            }
            let bytes = read_body(resp, MAX_ERROR_BODY_BYTES, true, timeout).await?;
            if fenced {
                return Err(DriverError::Fenced {
                    reason: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
                });
            }
            Err(status_error(status, &bytes))
        })
        .await
    }
}

fn send_error(e: reqwest::Error, timeout: Duration) -> DriverError {
    if e.is_timeout() {
        DriverError::Timeout { after: timeout }
    } else {
        DriverError::Unavailable {
            reason: format!("request failed: {e}"),
        }
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> DriverError {
    let text = String::from_utf8_lossy(body);
    let reason = format!("HTTP {status}: {}", text.trim());
    let retryable = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    if retryable {
        DriverError::Unavailable { reason }
    } else {
        DriverError::TaskFailed {
            reason,
            retryable: false,
        }
    }
}

/// Reads a response body of at most `limit` bytes: past it, either keeps
/// the first `limit` bytes (`truncate`) or fails with
/// [`DriverError::OutputTooLarge`].
async fn read_body(
    mut resp: reqwest::Response,
    limit: usize,
    truncate: bool,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let too_large = DriverError::OutputTooLarge { limit_bytes: limit };
    if !truncate && resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| send_error(e, timeout))? {
        if out.len() + chunk.len() > limit {
            if truncate {
                out.extend_from_slice(&chunk[..limit - out.len()]);
                break;
            }
            return Err(too_large);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

impl GatewayDriver for HttpDriver {
    fn kind(&self) -> GatewayKind {
        GatewayKind::Http
    }

    fn run(&self, req: RunRequest, cancel: CancellationToken) -> BoxFuture<'_, Result<RunOutput>> {
        Box::pin(self.attempt(req, cancel))
    }

    fn probe(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let Some(url) = &self.spec.health_url else {
                return Health::Healthy;
            };
            let unhealthy = |reason: String| Health::Unhealthy { reason };
            match self.client.get(url).timeout(PROBE_TIMEOUT).send().await {
                Ok(r) if r.status().is_success() => Health::Healthy,
                Ok(r) => unhealthy(format!("health check answered HTTP {}", r.status())),
                Err(e) => unhealthy(format!("health check failed: {e}")),
            }
        })
    }
}
