//! The guard in front of every authenticated route: a tower layer, so a
//! request that passes costs no boxed future (only a call signed with a
//! node proof, which must read its body first, takes a boxed slow path).
//! The steps are in the `auth` module essay.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use super::{Caller, Denied, Identity, node_proof};
use crate::api::Api;
use crate::api::error::{ApiError, DeniedInHandler};
use crate::api::permissions::RouteSpec;
use crate::api::rate::Allowance;
use crate::clock;
use crate::fsm::{AuditCaller, AuditRecord, Command, Role, Tenant};

/// The most bytes of an `Authorization` header looked at.
const MAX_CREDENTIAL_BYTES: usize = 4096;

/// Guards one route.
#[derive(Clone)]
pub(crate) struct GuardLayer {
    api: Api,
    spec: &'static RouteSpec,
}

impl GuardLayer {
    /// The guard of the route `spec` describes.
    pub(crate) fn new(api: Api, spec: &'static RouteSpec) -> Self {
        GuardLayer { api, spec }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            g: self.clone(),
        }
    }
}

/// The guard around one route's handler.
#[derive(Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    g: GuardLayer,
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The instance made ready is the one that serves; keep a fresh one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let proof = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix(node_proof::SCHEME))
            .map(str::to_owned);
        let g = self.g.clone();
        if let Some(proof) = proof {
            return GuardFuture::Boxed {
                fut: Box::pin(signed_by_a_node(g, proof, req, inner)),
            };
        }
        if g.spec.credential_in_band
            && req.headers().contains_key(header::UPGRADE)
            && !req.headers().contains_key(header::AUTHORIZATION)
        {
            // The handler takes the credential from the connection (the
            // event stream's first message) and checks it with `in_band`.
            return GuardFuture::InBand {
                fut: inner.call(req),
            };
        }
        let caller = match bearer_caller(&g, &req) {
            Ok(c) => c,
            Err(denied) => return GuardFuture::done(unauthenticated(&g, denied, &req)),
        };
        admit(g, caller, req, inner)
    }
}

/// Rate limits and permission for an authenticated caller; then the handler.
fn admit<S>(g: GuardLayer, caller: Caller, mut req: Request, mut inner: S) -> GuardFuture<S::Future>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let allowance = match rate(&g, &caller) {
        Ok(a) => a,
        Err(resp) => return GuardFuture::done(resp),
    };
    if let Err(mut resp) = authorize(&g, &caller) {
        allowance.write(resp.headers_mut());
        return GuardFuture::done(resp);
    }
    req.extensions_mut().insert(caller.clone());
    GuardFuture::Inner {
        fut: inner.call(req),
        done: Some((g.api, caller, allowance)),
    }
}

pin_project_lite::pin_project! {
    /// What the guard of one request is doing.
    #[project = Step]
    pub(crate) enum GuardFuture<F> {
        /// Refused: the answer.
        Done { resp: Option<Response> },
        /// Admitted: the handler runs; then the rate headers, and the audit
        /// of a refusal the handler made.
        Inner {
            #[pin]
            fut: F,
            done: Option<(Api, Caller, Allowance)>,
        },
        /// A node-signed call (reads its body first).
        Boxed { fut: Pin<Box<dyn Future<Output = Response> + Send>> },
        /// A call whose handler checks the credential it sends in band.
        InBand {
            #[pin]
            fut: F,
        },
    }
}

impl<F> GuardFuture<F> {
    fn done(resp: Response) -> Self {
        GuardFuture::Done { resp: Some(resp) }
    }
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Step::Done { resp } => Poll::Ready(Ok(resp
                .take()
                .expect("invariant: a guard future is not polled after it finished"))),
            Step::Boxed { fut } => fut.as_mut().poll(cx).map(Ok),
            Step::InBand { fut } => fut.poll(cx),
            Step::Inner { fut, done } => {
                let Poll::Ready(Ok(mut resp)) = fut.poll(cx) else {
                    return Poll::Pending;
                };
                let (api, caller, allowance) = done
                    .take()
                    .expect("invariant: a guard future is not polled after it finished");
                if resp.extensions().get::<DeniedInHandler>().is_some() {
                    denied(&api, &caller, "forbidden");
                }
                allowance.write(resp.headers_mut());
                Poll::Ready(Ok(resp))
            }
        }
    }
}

/// The caller of a bearer credential, from the cache when it is current.
fn bearer_caller(g: &GuardLayer, req: &Request) -> Result<Caller, Denied> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            Denied::new("missing credential: send Authorization: Bearer <api key or JWT>")
        })?
        .to_str()
        .map_err(|_| Denied::new("malformed Authorization header"))?;
    if header.len() > MAX_CREDENTIAL_BYTES {
        return Err(Denied::new("credential too long"));
    }
    let bearer = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| {
            Denied::new("malformed Authorization header: expected `Bearer <credential>`")
        })?;
    let id = g.api.auth.identify(bearer, clock::now_ms())?;
    Ok(Caller {
        id,
        action: g.spec.action,
        node: false,
    })
}

/// A call signed with the cluster secret: the body is read (bounded) to
/// check the signature, then handed on.
async fn signed_by_a_node<S>(g: GuardLayer, proof: String, req: Request, inner: S) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let (parts, body) = req.into_parts();
    let limit = g.api.node.config().api.max_body_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        let req = Request::from_parts(parts, axum::body::Body::empty());
        let denied = Denied::new("cannot read the body of a node-signed request");
        return unauthenticated(&g, denied, &req);
    };
    // Nested routers see the path without their prefix; the proof covers
    // the path the caller sent.
    let path = parts
        .extensions
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| parts.uri.path().to_owned(), |o| o.0.path().to_owned());
    let verified = node_proof::verify(
        &g.api.auth.node_key,
        &proof,
        parts.method.as_str(),
        &path,
        clock::now_ms(),
        &bytes,
    );
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    let node = match verified {
        Ok(node) => node,
        Err(why) => return unauthenticated(&g, Denied::new(why), &req),
    };
    let caller = Caller {
        id: Arc::new(Identity::new(
            format!("node:{node}"),
            Role::Admin,
            Tenant::from("default"),
            None,
        )),
        action: g.spec.action,
        node: true,
    };
    match admit(g, caller, req, inner).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Takes the caller's and its tenant's tokens; 429 when either is out.
fn rate(g: &GuardLayer, caller: &Caller) -> Result<Allowance, Response> {
    let auth = &g.api.auth;
    let version = auth.state.auth_version();
    let settings = || {
        auth.state
            .read(|s| s.auth().tenant(caller.tenant()).map(|t| t.settings.clone()))
    };
    auth.rates
        .admit(caller.actor(), caller.tenant(), version, settings)
        .map_err(|limited| {
            crate::metrics::global()
                .api_denials
                .with_label_values(&["rate_limited"])
                .inc();
            let mut resp = ApiError::rate_limited(format!(
                "{} rate limit reached; retry in {} ms",
                limited.bucket,
                limited.retry_after.as_millis()
            ))
            .into_response();
            limited.allowance.write(resp.headers_mut());
            set_retry_after(
                resp.headers_mut(),
                limited.retry_after.as_secs_f64().ceil() as u64,
            );
            resp
        })
}

/// 403 (and its audit entry) unless the caller's role holds the route's
/// permission; a node proof covers only what a joining node calls.
fn authorize(g: &GuardLayer, caller: &Caller) -> Result<(), Response> {
    let spec = g.spec;
    let allowed = if caller.node {
        matches!(spec.action, "cluster.status" | "cluster.join")
    } else {
        spec.permission.granted_to(caller.role())
    };
    if allowed {
        return Ok(());
    }
    denied(&g.api, caller, "forbidden");
    Err(forbidden(spec, caller).into_response())
}

/// The 403 of a caller whose role lacks the route's permission.
fn forbidden(spec: &RouteSpec, caller: &Caller) -> ApiError {
    ApiError::forbidden(format!(
        "role `{}` lacks permission `{}` ({} {})",
        caller.role(),
        spec.permission.as_str(),
        spec.method,
        spec.path
    ))
}

/// Counts and records a refusal of `caller`.
fn denied(api: &Api, caller: &Caller, code: &'static str) {
    crate::metrics::global()
        .api_denials
        .with_label_values(&[code])
        .inc();
    record_denial(
        api,
        AuditRecord {
            caller: caller.audit_caller(),
            target: None,
            outcome: format!("denied:{code}"),
        },
    );
}

/// Checks a credential sent inside a connection rather than in its
/// `Authorization` header, exactly as the guard checks a header: the same
/// identity, permission, failed-authentication budget and audit of
/// refusals. For routes whose spec says `credential_in_band`.
pub(crate) fn in_band(
    api: &Api,
    spec: &'static RouteSpec,
    bearer: &str,
    peer: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    let g = GuardLayer::new(api.clone(), spec);
    if bearer.len() > MAX_CREDENTIAL_BYTES {
        return Err(refuse(&g, Denied::new("credential too long"), peer));
    }
    let id = api
        .auth
        .identify(bearer.trim(), clock::now_ms())
        .map_err(|denied| refuse(&g, denied, peer))?;
    let caller = Caller {
        id,
        action: spec.action,
        node: false,
    };
    if !spec.permission.granted_to(caller.role()) {
        denied(api, &caller, "forbidden");
        return Err(forbidden(spec, &caller));
    }
    Ok(caller)
}

/// 401 with its audit entry, or 429 once the source address is over its
/// budget of failed authentications.
fn unauthenticated(g: &GuardLayer, denied: Denied, req: &Request) -> Response {
    let peer: Option<IpAddr> = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (err, retry_after) = refused(g, denied, peer);
    let mut resp = err.into_response();
    if let Some(secs) = retry_after {
        set_retry_after(resp.headers_mut(), secs);
    }
    resp
}

/// [`refused`] without the retry time.
fn refuse(g: &GuardLayer, denied: Denied, peer: Option<IpAddr>) -> ApiError {
    refused(g, denied, peer).0
}

/// The refusal of a credential that did not authenticate: 401 with its
/// audit entry, or 429 (with the seconds to wait) once `peer` is over its
/// budget of failures.
fn refused(g: &GuardLayer, denied: Denied, peer: Option<IpAddr>) -> (ApiError, Option<u64>) {
    let m = crate::metrics::global();
    if let Some(ip) = peer
        && let Err(limited) = g.api.auth.rates.failed_auth(ip)
    {
        m.api_denials
            .with_label_values(&["auth_rate_limited"])
            .inc();
        let secs = limited.retry_after.as_secs_f64().ceil();
        let err = ApiError::rate_limited(format!(
            "too many failed authentications from {ip}; retry in {secs} s"
        ));
        return (err, Some(secs as u64));
    }
    m.api_denials.with_label_values(&["unauthenticated"]).inc();
    let actor = denied.actor.unwrap_or_else(|| match peer {
        Some(ip) => format!("anonymous@{ip}"),
        None => "anonymous".into(),
    });
    record_denial(
        &g.api,
        AuditRecord {
            caller: AuditCaller {
                actor: actor.into(),
                tenant: "-".into(),
                action: std::borrow::Cow::Borrowed(g.spec.action),
            },
            target: None,
            outcome: "denied:unauthenticated".into(),
        },
    );
    (ApiError::unauthenticated(denied.message), None)
}

/// Appends a denial to the audit log in the background, bounded.
fn record_denial(api: &Api, rec: AuditRecord) {
    let Ok(permit) = Arc::clone(&api.auth.denials).try_acquire_owned() else {
        crate::metrics::global().api_denials_unaudited.inc();
        return;
    };
    let node = api.node.clone();
    api.node.spawn(async move {
        if !matches!(node.write(Command::Audit(rec)).await, Ok(Ok(_))) {
            crate::metrics::global().api_denials_unaudited.inc();
        }
        drop(permit);
    });
}

fn set_retry_after(h: &mut HeaderMap, secs: u64) {
    h.insert(header::RETRY_AFTER, secs.max(1).into());
}
