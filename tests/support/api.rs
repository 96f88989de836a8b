//! The harness's HTTP client: one [`Api`] for the cluster's nodes (the
//! admin key by default, any credential on request) and the [`Resp`] it
//! returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{ADMIN_KEY, HTTP_TIMEOUT, POLL, deadline};

/// An HTTP response: status, `Retry-After`, JSON body (`Null` if none).
#[derive(Clone, Debug)]
pub struct Resp {
    /// HTTP status code.
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The body as JSON (a string value if it was not JSON).
    pub body: Value,
    /// Every response header, names in lower case.
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    /// A response header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    /// `error.message` of an error body.
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }

    /// Checks the DESIGN error shape, status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "unexpected response {self:?}");
        let e = &self.body["error"];
        assert_eq!(e["code"].as_str(), Some(code), "error code in {self:?}");
        assert!(e["message"].is_string(), "error.message missing: {self:?}");
        assert!(
            e["retryable"].is_boolean(),
            "error.retryable missing: {self:?}"
        );
        let keys: Vec<&String> = e.as_object().expect("error object").keys().collect();
        assert_eq!(
            keys.len(),
            3,
            "error has exactly code/message/retryable: {self:?}"
        );
    }
}

/// A cheap, cloneable HTTP client for the cluster's API addresses, usable
/// from spawned tasks.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    /// `http`, or `https` for a cluster whose API serves TLS.
    scheme: &'static str,
    addrs: Arc<Vec<SocketAddr>>,
    /// The bearer credential sent with every request; none: anonymous.
    key: Option<Arc<str>>,
}

impl Api {
    /// A client for these API addresses; with `ca` (a PEM bundle) it speaks
    /// https and trusts only that CA.
    pub(super) fn new(addrs: Vec<SocketAddr>, ca: Option<&str>) -> Self {
        let mut builder = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(5));
        if let Some(pem) = ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).expect("CA PEM");
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().expect("http client");
        Self {
            http,
            scheme: if ca.is_some() { "https" } else { "http" },
            addrs: Arc::new(addrs),
            key: Some(ADMIN_KEY.into()),
        }
    }

    /// The same nodes, calling with `credential` (an API key or a JWT).
    pub fn with_key(&self, credential: &str) -> Api {
        Api {
            key: Some(credential.into()),
            ..self.clone()
        }
    }

    /// The same nodes, calling with no credential at all.
    pub fn anonymous(&self) -> Api {
        Api {
            key: None,
            ..self.clone()
        }
    }

    /// A request of any method, with the credential and (if given) a JSON body.
    pub async fn request(
        &self,
        method: reqwest::Method,
        i: usize,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Resp> {
        let mut req = self.http.request(method.clone(), self.url(i, path));
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).expect("json"));
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path} on node index {i}"))?;
        Self::finish(resp).await
    }

    /// `DELETE` on node `i`.
    pub async fn delete(&self, i: usize, path: &str) -> Result<Resp> {
        self.request(reqwest::Method::DELETE, i, path, None).await
    }

    /// `PATCH` of a JSON body on node `i`.
    pub async fn patch(&self, i: usize, path: &str, body: &Value) -> Result<Resp> {
        self.request(reqwest::Method::PATCH, i, path, Some(body))
            .await
    }

    /// `PUT` of a JSON body on node `i`.
    pub async fn put(&self, i: usize, path: &str, body: &Value) -> Result<Resp> {
        self.request(reqwest::Method::PUT, i, path, Some(body))
            .await
    }

    /// Number of nodes addressed.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// The API address of node `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addrs[i])
    }

    async fn finish(resp: reqwest::Response) -> Result<Resp> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.bytes().await.context("reading response body")?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok(Resp {
            status,
            retry_after,
            body,
            headers,
        })
    }

    /// `GET` on node `i`.
    pub async fn get(&self, i: usize, path: &str) -> Result<Resp> {
        self.request(reqwest::Method::GET, i, path, None).await
    }

    /// `POST` of a JSON body on node `i`.
    pub async fn post(&self, i: usize, path: &str, body: &Value) -> Result<Resp> {
        self.post_raw(i, path, serde_json::to_vec(body).expect("json"))
            .await
    }

    /// `POST` of raw bytes (as `application/json`) on node `i`.
    pub async fn post_raw(&self, i: usize, path: &str, body: Vec<u8>) -> Result<Resp> {
        let mut req = self
            .http
            .post(self.url(i, path))
            .header("content-type", "application/json");
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {path} on node index {i}"))?;
        Self::finish(resp).await
    }

    /// `POST` until it is not a retryable failure (503, 429, 504, no
    /// connection), or `deadline`. Safe only for idempotent requests (a
    /// submit with an idempotency key, a lease is not).
    pub async fn post_retrying(
        &self,
        i: usize,
        path: &str,
        body: &Value,
        deadline: Instant,
    ) -> Resp {
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.post(i, path, body).await {
                Ok(r) if matches!(r.status, 429 | 503 | 504) => last = format!("{r:?}"),
                Ok(r) => return r,
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(POLL * 2).await;
        }
        panic!("POST {path} on node index {i} kept failing until the deadline; last: {last}");
    }

    /// `GET` that must answer 200; returns the body. A 503/504 or a failed
    /// connection is retried for up to 10 s (a read is idempotent, and "not
    /// now" is not a wrong answer); any other status fails the test.
    pub async fn get_ok(&self, i: usize, path: &str) -> Value {
        let until = deadline(Duration::from_secs(10));
        loop {
            let last = match self.get(i, path).await {
                Ok(r) if r.status == 200 => return r.body,
                Ok(r) if matches!(r.status, 503 | 504) => format!("{r:?}"),
                Ok(r) => panic!("GET {path} on node index {i}: {r:?}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                Instant::now() < until,
                "GET {path} on node index {i} kept failing; last: {last}"
            );
            tokio::time::sleep(POLL * 2).await;
        }
    }

    /// Every task matching `query` (e.g. `status=leased`), following cursors.
    pub async fn list_tasks(&self, i: usize, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/tasks?limit=1000&{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = self.get_ok(i, &path).await;
            out.extend(page["items"].as_array().expect("items").iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }

    /// `GET /api/v1/queue/depth` on node `i`.
    pub async fn depth(&self, i: usize) -> Value {
        self.get_ok(i, "/api/v1/queue/depth").await
    }

    /// A metric from node `i`'s `/metrics`: the sum of the samples of
    /// `series`, which is a bare name (every label set counts) or a name
    /// with its labels, written as Prometheus prints them
    /// (`name{label="v"}`, matched exactly); 0 when absent.
    pub async fn metric(&self, i: usize, series: &str) -> f64 {
        let r = self.get(i, "/metrics").await.expect("GET /metrics");
        assert_eq!(r.status, 200, "{r:?}");
        let bare = !series.contains('{');
        r.body
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(key, _)| *key == series || (bare && key.split('{').next() == Some(series)))
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum()
    }

    /// `GET /api/v1/cluster` on node `i`.
    pub async fn cluster(&self, i: usize) -> Result<Value> {
        let r = self.get(i, "/api/v1/cluster").await?;
        if r.status != 200 {
            bail!("GET /api/v1/cluster: {r:?}");
        }
        Ok(r.body)
    }
}
