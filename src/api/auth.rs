//! Who is calling, and may they: every API route except the liveness and
//! readiness probes (and `/metrics` while `auth.metrics_open`) runs behind
//! the guard (`guard.rs`).
//!
//! # One request
//!
//! 1. **Authenticate.** `Authorization: Bearer <credential>`, where the
//!    credential is an API key (`dk_live_...`/`dk_test_...`, found by its
//!    SHA-256 in the replicated state) or an HS256 JWT (see `jwt.rs`).
//!    A cluster node that is joining may instead sign the call with the
//!    cluster secret (`node_proof.rs`). No usable credential: 401 with
//!    `WWW-Authenticate: Bearer` and an audit entry, unless the source
//!    address is over its failure budget (429, not audited).
//! 2. **Rate limits** of the credential and its tenant (`rate.rs`), before
//!    the permission check, so a credential cannot flood the audit log
//!    with forbidden calls either.
//! 3. **Authorize** against the permission table (`permissions.rs`): a
//!    role without the route's permission gets 403 naming the permission,
//!    and an audit entry.
//! 4. The handler gets the [`Caller`]: its role, its tenant, and the audit
//!    stamp its writes carry. Developers and viewers are confined to their
//!    tenant ([`Caller::scope`]); the state machine enforces the scope of
//!    every write, so a handler cannot forget it.
//!
//! # Cost
//!
//! A verified credential is cached per node, keyed by the credential's
//! text, with the replicated state's credential version
//! ([`SharedState::auth_version`]): while the version is unchanged, a
//! request costs one hash-map lookup, not a SHA-256 or an HMAC. A
//! revocation, expiry change or tenant change bumps the version on every
//! node as it applies the entry, so every cached credential is checked
//! again on its next use: a revoked key stops working on a node as soon as
//! that node applies the revocation (milliseconds behind the leader). The
//! cache is bounded (`auth.cache_entries`), and only holds credentials
//! that verified, so garbage fills nothing.
//!
//! # Shortcuts
//!
//! - Denials are written to the audit log by a bounded set of background
//!   writes ([`MAX_PENDING_DENIALS`]); past it they are counted in
//!   `godel_api_denials_unaudited_total` instead. The per-address failure
//!   budget keeps an anonymous flood far below that.
//! - Expiry is checked against this node's wall clock.

mod bootstrap;
mod guard;
mod jwt;
pub mod node_proof;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

pub use bootstrap::{ADMIN_KEY_FILE, bootstrap_admin_key, check_configured_key};
pub(crate) use guard::{GuardLayer, in_band};
pub use jwt::JwtVerifier;

use super::error::{ApiError, ApiResult};
use super::rate::RateLimits;
use crate::config::Config;
use crate::fsm::{
    ApiKeyId, Audit, AuditCaller, AuditTarget, KEY_TOUCH_EVERY_MS, KeyHash, Role, Tenant,
};
use crate::store::SharedState;

/// The prefixes of API keys: live keys and test keys.
pub const KEY_PREFIXES: [&str; 2] = ["dk_live_", "dk_test_"];
/// Characters after the prefix: at least 32 random bytes in base64url.
const KEY_MIN_SECRET_CHARS: usize = 43;
/// Denials being written to the audit log at once; past it they are
/// counted, not recorded.
pub const MAX_PENDING_DENIALS: usize = 256;

/// A new API key: the prefix and 32 random bytes, base64url.
pub fn generate_key(test: bool) -> String {
    let bytes: [u8; 32] = rand::random();
    let prefix = if test {
        KEY_PREFIXES[1]
    } else {
        KEY_PREFIXES[0]
    };
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether `s` looks like an API key (prefix, then at least 43 base64url
/// characters).
pub fn is_key_shaped(s: &str) -> bool {
    KEY_PREFIXES.iter().any(|p| {
        s.strip_prefix(p).is_some_and(|rest| {
            rest.len() >= KEY_MIN_SECRET_CHARS
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    })
}

/// What the state stores of a key. A key carries 256 random bits, so an
/// unsalted SHA-256 cannot be reversed by guessing (there is no dictionary
/// of likely keys), and it lets any node find the key in one lookup.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// The first characters of a key, shown in lists to recognise it.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(12).collect()
}

/// The authenticated caller of one request: who (shared with the
/// credential cache, so cloning it allocates nothing) and which route.
#[derive(Clone, Debug)]
pub struct Caller {
    id: Arc<Identity>,
    /// The route's audit action.
    pub action: &'static str,
    /// A cluster node proving the cluster secret (join and status only).
    node: bool,
}

impl Caller {
    /// `key:<id>`, `jwt:<sub>` or `node:<id>`: the audit log's actor.
    pub fn actor(&self) -> &Arc<str> {
        &self.id.actor
    }

    /// What it may do.
    pub fn role(&self) -> Role {
        self.id.role
    }

    /// The tenant it acts in.
    pub fn tenant(&self) -> &Tenant {
        &self.id.tenant
    }

    /// Its API key, if it used one.
    pub fn key(&self) -> Option<&ApiKeyId> {
        self.id.key.as_ref()
    }

    /// Whether its writes are confined to its own tenant: developers and
    /// viewers are, admins and operators are not.
    pub fn is_scoped(&self) -> bool {
        !self.id.role.is_cross_tenant()
    }

    /// The tenant a new object belongs to: the one named, if this caller
    /// may name it, else its own. Naming another tenant without being
    /// cross-tenant is 403.
    pub fn tenant_named(&self, named: Option<String>) -> ApiResult<Tenant> {
        match named {
            None => Ok(self.id.tenant.clone()),
            Some(t) if t == self.id.tenant.as_str() || self.id.role.is_cross_tenant() => {
                Ok(Tenant::from(t))
            }
            Some(t) => Err(self.other_tenant(&t)),
        }
    }

    /// The tenant a list is filtered to: any or the one named for admins
    /// and operators; always its own for the others (naming another: 403).
    pub fn tenant_filter(&self, named: Option<String>) -> ApiResult<Option<Tenant>> {
        if self.id.role.is_cross_tenant() {
            return Ok(named.map(Tenant::from));
        }
        match named {
            Some(t) if t != self.id.tenant.as_str() => Err(self.other_tenant(&t)),
            _ => Ok(Some(self.id.tenant.clone())),
        }
    }

    /// Whether an object of tenant `t` exists for this caller.
    pub fn sees(&self, t: &Tenant) -> bool {
        self.sees_named(&t.0)
    }

    /// Whether an object of the tenant named `t` exists for this caller.
    pub fn sees_named(&self, t: &str) -> bool {
        self.id.role.is_cross_tenant() || t == self.id.tenant.as_str()
    }

    /// Who is asking for what, as the audit log records it.
    pub fn audit_caller(&self) -> AuditCaller {
        AuditCaller {
            actor: Arc::clone(&self.id.actor),
            tenant: Arc::clone(&self.id.tenant_name),
            action: std::borrow::Cow::Borrowed(self.action),
        }
    }

    /// The audit of a write about `target` on this caller's behalf,
    /// confined to its tenant unless it is cross-tenant.
    pub fn audit(&self, target: Option<AuditTarget>) -> Audit {
        Audit {
            caller: self.audit_caller(),
            scoped: self.is_scoped(),
            target,
        }
    }

    fn other_tenant(&self, t: &str) -> ApiError {
        ApiError::forbidden(format!(
            "this credential acts in tenant `{}`; it cannot name tenant `{t}`",
            self.id.tenant
        ))
        .audited()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::from(crate::node::NodeError::Internal(
                "route has no authentication guard".into(),
            ))
        })
    }
}

/// Who a verified credential is: the cacheable part of a [`Caller`].
#[derive(Debug)]
struct Identity {
    actor: Arc<str>,
    role: Role,
    tenant: Tenant,
    /// The tenant's name as the audit stamp carries it.
    tenant_name: Arc<str>,
    key: Option<ApiKeyId>,
    /// When it stops being accepted, ms since the epoch.
    expires_at_ms: Option<u64>,
}

impl Identity {
    fn new(actor: String, role: Role, tenant: Tenant, key: Option<ApiKeyId>) -> Self {
        Identity {
            actor: actor.into(),
            role,
            tenant_name: tenant.as_str().into(),
            tenant,
            key,
            expires_at_ms: None,
        }
    }
}

/// A refused credential: who it seemed to be (for the audit log) and why.
#[derive(Clone, Debug)]
pub struct Denied {
    /// The actor to record: the key's id when the key was found.
    pub actor: Option<String>,
    /// Why, for the 401 (never echoes the credential).
    pub message: String,
}

impl Denied {
    fn new(message: impl Into<String>) -> Self {
        Denied {
            actor: None,
            message: message.into(),
        }
    }
}

struct Cached {
    identity: Arc<Identity>,
    version: u64,
    /// When this node last recorded (or asked to record) the key's use.
    touched_ms: u64,
}

/// Verifies credentials for one node.
pub struct Authenticator {
    state: SharedState,
    jwt: Option<JwtVerifier>,
    node_key: Vec<u8>,
    metrics_open: bool,
    cache: Mutex<HashMap<Box<str>, Cached>>,
    cache_entries: usize,
    touches: Mutex<BTreeSet<ApiKeyId>>,
    /// The node's rate limits.
    pub rates: RateLimits,
    denials: Arc<Semaphore>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt.is_some())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Reads the JWT secrets (failing on a short one) and sets up the cache
    /// and rate limits.
    pub fn new(config: &Config, state: SharedState, cluster_secret: &[u8]) -> anyhow::Result<Self> {
        Ok(Authenticator {
            state,
            jwt: JwtVerifier::from_config(&config.auth)?,
            node_key: node_proof::key(cluster_secret),
            metrics_open: config.auth.metrics_open,
            cache: Mutex::new(HashMap::new()),
            cache_entries: config.auth.cache_entries,
            touches: Mutex::new(BTreeSet::new()),
            rates: RateLimits::new(&config.auth.rate),
            denials: Arc::new(Semaphore::new(MAX_PENDING_DENIALS)),
        })
    }

    /// Whether `/metrics` answers without a credential.
    pub fn metrics_open(&self) -> bool {
        self.metrics_open
    }

    /// The keys seen in use whose `last_used` is due to be recorded.
    pub fn take_touches(&self) -> Vec<ApiKeyId> {
        std::mem::take(&mut *self.touches.lock().expect("invariant: never poisoned"))
            .into_iter()
            .collect()
    }

    /// Who a bearer credential is, from the cache when it is current.
    fn identify(&self, bearer: &str, now_ms: u64) -> Result<Arc<Identity>, Denied> {
        let version = self.state.auth_version();
        if let Some(id) = self.cached(bearer, version, now_ms)? {
            return Ok(id);
        }
        let (identity, touched_ms) = if is_key_shaped(bearer) {
            self.verify_key(bearer, now_ms)?
        } else if bearer.bytes().filter(|b| *b == b'.').count() == 2 {
            (self.verify_jwt(bearer)?, now_ms)
        } else {
            return Err(Denied::new(
                "malformed credential: expected an API key (dk_live_..., dk_test_...) or a JWT",
            ));
        };
        let identity = Arc::new(identity);
        let mut cache = self.cache.lock().expect("invariant: never poisoned");
        if cache.len() >= self.cache_entries
            && let Some(victim) = cache.keys().next().cloned()
        {
            cache.remove(&victim);
        }
        cache.insert(
            bearer.into(),
            Cached {
                identity: Arc::clone(&identity),
                version,
                touched_ms,
            },
        );
        Ok(identity)
    }

    /// A cache hit: the identity if the cache is current and it has not
    /// expired (and the key's use noted when due); `None` to verify afresh.
    fn cached(
        &self,
        bearer: &str,
        version: u64,
        now_ms: u64,
    ) -> Result<Option<Arc<Identity>>, Denied> {
        let mut cache = self.cache.lock().expect("invariant: never poisoned");
        let Some(c) = cache.get_mut(bearer).filter(|c| c.version == version) else {
            return Ok(None);
        };
        if c.identity.expires_at_ms.is_some_and(|at| now_ms >= at) {
            cache.remove(bearer);
            return Err(Denied::new("credential expired"));
        }
        if let Some(key) = &c.identity.key
            && now_ms.saturating_sub(c.touched_ms) >= KEY_TOUCH_EVERY_MS
        {
            c.touched_ms = now_ms;
            self.touch(key.clone());
        }
        Ok(Some(Arc::clone(&c.identity)))
    }

    fn touch(&self, key: ApiKeyId) {
        self.touches
            .lock()
            .expect("invariant: never poisoned")
            .insert(key);
    }

    /// The key's identity, and when its use was last recorded.
    fn verify_key(&self, key: &str, now_ms: u64) -> Result<(Identity, u64), Denied> {
        let hash = hash_key(key);
        let rec = self
            .state
            .read(|s| s.auth().key_by_hash(&hash).cloned())
            .ok_or_else(|| Denied::new("unknown API key"))?;
        let actor = format!("key:{}", rec.id);
        let refuse = |why: &str| Denied {
            actor: Some(actor.clone()),
            message: why.into(),
        };
        if rec.revoked_at_ms.is_some() {
            return Err(refuse("API key revoked"));
        }
        if rec.expires_at_ms.is_some_and(|at| now_ms >= at) {
            return Err(refuse("API key expired"));
        }
        let touched_ms = match rec.last_used_ms {
            Some(t) if now_ms.saturating_sub(t) < KEY_TOUCH_EVERY_MS => t,
            _ => {
                self.touch(rec.id.clone());
                now_ms
            }
        };
        let mut id = Identity::new(actor, rec.role, rec.tenant.clone(), Some(rec.id.clone()));
        id.expires_at_ms = rec.expires_at_ms;
        Ok((id, touched_ms))
    }

    fn verify_jwt(&self, token: &str) -> Result<Identity, Denied> {
        let Some(verifier) = &self.jwt else {
            return Err(Denied::new(
                "JWTs are not accepted: this node has no auth.jwt_secret_file",
            ));
        };
        let (claims, role) = verifier.verify(token).map_err(Denied::new)?;
        let actor = format!("jwt:{}", claims.sub);
        if let Some(jti) = &claims.jti
            && self.state.read(|s| s.auth().is_jti_revoked(jti))
        {
            return Err(Denied {
                actor: Some(actor),
                message: "token revoked".into(),
            });
        }
        let mut id = Identity::new(actor, role, Tenant::from(claims.tenant_id), None);
        id.expires_at_ms = Some((claims.exp + verifier.leeway_s()).saturating_mul(1000));
        Ok(id)
    }
}
