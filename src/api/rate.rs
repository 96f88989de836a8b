//! Request rates: token buckets per credential, per tenant and, for failed
//! authentications, per source address (governor's GCRA).
//!
//! Buckets are per node: a caller spreading requests over N nodes gets up
//! to N times its rate. Every authenticated answer carries the tighter of
//! its credential's and its tenant's bucket as `X-RateLimit-Limit` (the
//! bucket size), `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds
//! until the bucket is full again); past either, the answer is 429 with
//! `Retry-After`. Failed authentications spend a per-address bucket (per
//! minute), so guessing keys is slow and so is filling the audit log with
//! denials; past it the answer is 429 and is not audited.
//!
//! Keyed buckets are pruned of idle keys by [`RateLimits::prune`], which
//! the API's housekeeping task runs every few seconds, so memory follows
//! the callers active lately, not every caller ever seen; there is one
//! tenant bucket per tenant that has made a request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::RateConfig;
use crate::fsm::{Tenant, TenantSettings};

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;
type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One tenant's bucket, with the settings it was built from and the
/// credential version they were read at.
struct TenantBucket {
    version: u64,
    per_second: u32,
    burst: u32,
    limiter: Arc<Direct>,
}

/// The node's rate limits.
pub struct RateLimits {
    config: RateConfig,
    clock: DefaultClock,
    credentials: Keyed<Arc<str>>,
    failures: Keyed<IpAddr>,
    tenants: Mutex<HashMap<Tenant, TenantBucket>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// What a request's buckets looked like after it took its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    /// The bucket size of the tighter bucket.
    pub limit: u32,
    /// Tokens left in it.
    pub remaining: u32,
    /// Seconds until it is full again.
    pub reset_s: u64,
}

impl Allowance {
    /// Writes the `X-RateLimit-*` headers.
    pub fn write(&self, h: &mut HeaderMap) {
        h.insert(LIMIT.clone(), HeaderValue::from(self.limit));
        h.insert(REMAINING.clone(), HeaderValue::from(self.remaining));
        h.insert(RESET.clone(), HeaderValue::from(self.reset_s));
    }

    fn of(s: &StateSnapshot) -> Allowance {
        let q = s.quota();
        let limit = q.burst_size().get();
        let remaining = s.remaining_burst_capacity();
        let reset = q.replenish_interval() * (limit - remaining.min(limit));
        Allowance {
            limit,
            remaining,
            reset_s: reset.as_secs_f64().ceil() as u64,
        }
    }

    fn tighter(self, other: Allowance) -> Allowance {
        if other.remaining < self.remaining {
            other
        } else {
            self
        }
    }
}

/// A request over a limit: which one, and when to come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// `credential`, `tenant` or `source address`.
    pub bucket: &'static str,
    /// How long until a request would pass.
    pub retry_after: Duration,
    /// The bucket's state (remaining 0).
    pub allowance: Allowance,
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v.max(1)).expect("invariant: at least 1")
}

impl RateLimits {
    /// Buckets with the node's configured sizes.
    pub fn new(config: &RateConfig) -> RateLimits {
        let cred = Quota::per_second(nz(config.credential_per_second))
            .allow_burst(nz(config.credential_burst));
        let fail = Quota::per_minute(nz(config.auth_failures_per_minute))
            .allow_burst(nz(config.auth_failures_burst));
        RateLimits {
            config: config.clone(),
            clock: DefaultClock::default(),
            credentials: RateLimiter::keyed(cred).with_middleware::<StateInformationMiddleware>(),
            failures: RateLimiter::keyed(fail).with_middleware::<StateInformationMiddleware>(),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from the credential's bucket and one from its
    /// tenant's, whose size comes from the tenant's `settings` (read only
    /// when the replicated credential `version` changed since the bucket
    /// was sized), or the node's default.
    pub fn admit(
        &self,
        credential: &Arc<str>,
        tenant: &Tenant,
        version: u64,
        settings: impl FnOnce() -> Option<TenantSettings>,
    ) -> Result<Allowance, Limited> {
        let cred = self
            .credentials
            .check_key(credential)
            .map(|s| Allowance::of(&s))
            .map_err(|n| self.limited("credential", n, self.config.credential_burst))?;
        let bucket = self.tenant_bucket(tenant, version, settings);
        let per_tenant = bucket.check().map(|s| Allowance::of(&s)).map_err(|n| {
            let burst = n.quota().burst_size().get();
            self.limited("tenant", n, burst)
        })?;
        Ok(cred.tighter(per_tenant))
    }

    /// Counts a failed authentication from `addr`; `Err` once the address
    /// is over its limit (answer 429, do not audit).
    pub fn failed_auth(&self, addr: IpAddr) -> Result<(), Limited> {
        self.failures
            .check_key(&addr)
            .map(|_| ())
            .map_err(|n| self.limited("source address", n, self.config.auth_failures_burst))
    }

    /// Forgets idle credentials and addresses (their buckets are full again
    /// anyway). Tenant buckets stay: there is one per tenant that has made
    /// a request, and dropping a busy one would refill it.
    pub fn prune(&self) {
        self.credentials.retain_recent();
        self.credentials.shrink_to_fit();
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
    }

    fn tenant_bucket(
        &self,
        tenant: &Tenant,
        version: u64,
        settings: impl FnOnce() -> Option<TenantSettings>,
    ) -> Arc<Direct> {
        let mut map = self
            .tenants
            .lock()
            .expect("invariant: the tenant bucket lock is never poisoned");
        if let Some(b) = map.get(tenant).filter(|b| b.version == version) {
            return Arc::clone(&b.limiter);
        }
        let settings = settings();
        let per_second = settings
            .as_ref()
            .and_then(|s| s.rate_per_second)
            .unwrap_or(self.config.tenant_per_second);
        let burst = settings
            .as_ref()
            .and_then(|s| s.burst)
            .unwrap_or(self.config.tenant_burst);
        let limiter = match map.get(tenant) {
            Some(b) if b.per_second == per_second && b.burst == burst => Arc::clone(&b.limiter),
            _ => {
                let quota = Quota::per_second(nz(per_second)).allow_burst(nz(burst));
                Arc::new(RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>())
            }
        };
        map.insert(
            tenant.clone(),
            TenantBucket {
                version,
                per_second,
                burst,
                limiter: Arc::clone(&limiter),
            },
        );
        limiter
    }

    fn limited(
        &self,
        bucket: &'static str,
        n: governor::NotUntil<<DefaultClock as Clock>::Instant>,
        burst: u32,
    ) -> Limited {
        let retry_after = n.wait_time_from(self.clock.now());
        Limited {
            bucket,
            retry_after,
            allowance: Allowance {
                limit: burst,
                remaining: 0,
                reset_s: retry_after.as_secs_f64().ceil() as u64,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> RateConfig {
        RateConfig {
            credential_per_second: 1,
            credential_burst: 3,
            tenant_per_second: 1,
            tenant_burst: 5,
            auth_failures_per_minute: 1,
            auth_failures_burst: 2,
        }
    }

    #[test]
    fn credential_bucket_runs_out_and_says_when_to_return() {
        let mut h = HeaderMap::new();
        Allowance {
            limit: 10_000,
            remaining: 0,
            reset_s: 123,
        }
        .write(&mut h);
        assert_eq!(
            (
                &h["x-ratelimit-limit"],
                &h["x-ratelimit-remaining"],
                &h["x-ratelimit-reset"]
            ),
            (
                &HeaderValue::from(10_000),
                &HeaderValue::from(0),
                &HeaderValue::from(123)
            )
        );
        let r = RateLimits::new(&small());
        let k: Arc<str> = "key:a".into();
        let t = Tenant::from("acme");
        let a = r.admit(&k, &t, 0, || None).unwrap();
        assert_eq!((a.limit, a.remaining), (3, 2));
        r.admit(&k, &t, 0, || None).unwrap();
        let last = r.admit(&k, &t, 0, || None).unwrap();
        assert_eq!(last.remaining, 0);
        assert!(last.reset_s >= 2, "{last:?}");
        let e = r.admit(&k, &t, 0, || None).unwrap_err();
        assert_eq!(e.bucket, "credential");
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_secs(1));
        // Another credential of the same tenant still passes (tenant: 5).
        r.admit(&"key:b".into(), &t, 0, || None).unwrap();
    }

    #[test]
    fn tenant_settings_size_its_bucket() {
        let r = RateLimits::new(&small());
        let t = Tenant::from("tiny");
        let s = TenantSettings {
            rate_per_second: Some(1),
            burst: Some(1),
            ..Default::default()
        };
        r.admit(&"key:x".into(), &t, 1, || Some(s.clone())).unwrap();
        let e = r
            .admit(&"key:y".into(), &t, 1, || Some(s.clone()))
            .unwrap_err();
        assert_eq!(e.bucket, "tenant");
        assert_eq!(e.allowance.limit, 1);
    }

    #[test]
    fn failed_authentications_are_limited_per_address() {
        let r = RateLimits::new(&small());
        let a: IpAddr = [127, 0, 0, 1].into();
        r.failed_auth(a).unwrap();
        r.failed_auth(a).unwrap();
        assert_eq!(r.failed_auth(a).unwrap_err().bucket, "source address");
        r.failed_auth([127, 0, 0, 2].into()).unwrap();
    }
}
