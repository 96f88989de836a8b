//! Credentials and tenants in the replicated state: API keys (by hash),
//! revoked JWT ids, tenant records with their quotas, and the tenant scope
//! a caller's commands are confined to.
//!
//! # API keys
//!
//! A key is `dk_live_` or `dk_test_` followed by at least 32 random bytes
//! (base64url). The state never holds a key, only its SHA-256: a key has
//! 256 bits of entropy, so a fast unsalted hash is as strong as a slow
//! salted one here (there is no dictionary to try), and it lets every node
//! find a key by its hash in one map lookup. Whoever reads a snapshot
//! learns which keys exist, never a key. Records keep who made them, when,
//! the role and tenant they grant, an optional expiry, a revocation time
//! and a coarse last use (written at most every few minutes per key, by the
//! node that saw the use, so a busy key costs no log entry per request).
//!
//! The first key is the bootstrap admin key: [`Command::BootstrapApiKey`]
//! creates a key only while the cluster has never had one, so a restarted
//! or re-elected node can never mint a second admin key, even after every
//! key was revoked.
//!
//! # Tenants
//!
//! A tenant exists as soon as something names it; a [`TenantRecord`] only
//! carries settings: the most unfinished tasks it may hold (checked at
//! submit, in apply, so every replica refuses the same submission) and a
//! request rate that nodes enforce locally. Its round-robin weight stays in
//! the state's weight table, which dispatch reads.
//!
//! # Scope
//!
//! A command proposed on behalf of a developer or viewer carries the
//! caller's tenant as its scope ([`super::Audited::scope`]). Applying it
//! checks that every object it touches belongs to that tenant; another
//! tenant's task, lease or session answers exactly as a missing one does
//! (`not_found`, or `stale_token` for a lease), so ids leak nothing.
//!
//! [`Command::BootstrapApiKey`]: super::Command::BootstrapApiKey

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::command::{Command, Outcome, Rejection, ReplaySelector, Reply, check_name};
use super::state::State;
use super::task::{TaskId, TaskStatus, Tenant};

/// What a credential may do; the permission table in the API maps each
/// route to the roles that may call it.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, in every tenant.
    Admin,
    /// Gateways, agents, sessions, drain, dead letters and task
    /// administration in every tenant; no membership and no keys.
    Operator,
    /// Tasks, sessions and leases in its own tenant.
    Developer,
    /// Read-only, in its own tenant.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Developer, Role::Viewer];

    /// The snake_case name used in the API and in JWT claims.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }

    /// Whether the role works across tenants (admin and operator): its
    /// commands carry no tenant scope, and it may name a tenant.
    pub fn is_cross_tenant(self) -> bool {
        matches!(self, Role::Admin | Role::Operator)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role `{s}` (expected admin, operator, developer or viewer)")
            })
    }
}

impl Tenant {
    /// Checks the name: 1 to 256 of `A-Z a-z 0-9 - _ . : /`.
    pub fn validate(&self) -> Result<(), String> {
        check_name("tenant", &self.0, false).map_err(|(_, p)| p)
    }
}

/// An API key's identity (not the key).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKeyId(pub String);

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of an API key.
pub type KeyHash = [u8; 32];

/// A key to record, as the API node built it (it drew the id and the key,
/// and hashed the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewApiKey {
    /// Its id.
    pub id: ApiKeyId,
    /// A name for people.
    pub name: String,
    /// The role it grants.
    pub role: Role,
    /// The tenant it acts in.
    pub tenant: Tenant,
    /// SHA-256 of the key.
    pub hash: KeyHash,
    /// The key's first characters (`dk_live_AbCd`), to recognise it in lists.
    pub prefix: String,
    /// When it stops working, ms since the epoch.
    pub expires_at_ms: Option<u64>,
    /// Who created it (a key id, a JWT subject, or `bootstrap`).
    pub created_by: String,
}

/// A key as the state keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Its id.
    pub id: ApiKeyId,
    /// A name for people.
    pub name: String,
    /// The role it grants.
    pub role: Role,
    /// The tenant it acts in.
    pub tenant: Tenant,
    /// SHA-256 of the key.
    pub hash: KeyHash,
    /// The key's first characters.
    pub prefix: String,
    /// Who created it.
    pub created_by: String,
    /// Creation time.
    pub created_at_ms: u64,
    /// When it stops working.
    pub expires_at_ms: Option<u64>,
    /// When it was revoked.
    pub revoked_at_ms: Option<u64>,
    /// When a node last saw it used (coarse: see [`KEY_TOUCH_EVERY_MS`]).
    pub last_used_ms: Option<u64>,
}

/// How stale a key's `last_used` may get before a node that sees it used
/// records the use again: 5 minutes.
pub const KEY_TOUCH_EVERY_MS: u64 = 5 * 60 * 1000;

impl ApiKeyRecord {
    /// Whether the key authenticates at `now_ms`: not revoked, not expired.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|at| now_ms < at)
    }
}

/// A tenant's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSettings {
    /// Most unfinished tasks (pending, scheduled, leased, running, failed)
    /// the tenant may hold; a submission past it is refused. None: no limit.
    pub max_queued: Option<u64>,
    /// Requests per second its callers may make on each node; None: the
    /// node's `auth.rate.tenant_per_second`.
    pub rate_per_second: Option<u32>,
    /// Its bucket size on each node; None: the node's `auth.rate.tenant_burst`.
    pub burst: Option<u32>,
    /// Its spending limits (none: no limit).
    pub budget: Option<Budget>,
}

/// A tenant's spending limits per UTC day and calendar month, in tokens
/// (in and out) and cost (at the nodes' `[prices]`, in millionths of a
/// USD). Past a limit, its new tasks are refused until the period ends
/// (running ones finish); past `soft_percent` of one, an alert.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Tokens a day.
    pub daily_tokens: Option<u64>,
    /// Tokens a month.
    pub monthly_tokens: Option<u64>,
    /// Cost a day, in millionths of a USD.
    pub daily_cost_micros: Option<u64>,
    /// Cost a month, in millionths of a USD.
    pub monthly_cost_micros: Option<u64>,
    /// The share of a limit, in percent, from which it alerts (1 to 100).
    pub soft_percent: u8,
}

impl Budget {
    /// Why it is not a budget, if it is not.
    pub fn check(&self) -> Result<(), String> {
        let limits = [
            self.daily_tokens,
            self.monthly_tokens,
            self.daily_cost_micros,
            self.monthly_cost_micros,
        ];
        if limits.iter().all(Option::is_none) {
            return Err("names no limit (null removes the budget)".into());
        }
        if limits.contains(&Some(0)) {
            return Err("a limit must be > 0".into());
        }
        if !(1..=100).contains(&self.soft_percent) {
            return Err("soft_percent must be 1..=100".into());
        }
        Ok(())
    }
}

/// A tenant with settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Its name.
    pub name: Tenant,
    /// Its settings.
    pub settings: TenantSettings,
    /// Creation time.
    pub created_at_ms: u64,
    /// Time of the last change.
    pub updated_at_ms: u64,
}

/// A change to a tenant's settings: `None` leaves a field as it is;
/// `Some(None)` clears a limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantPatch {
    /// New round-robin weight.
    pub weight: Option<u32>,
    /// New task limit.
    pub max_queued: Option<Option<u64>>,
    /// New rate.
    pub rate_per_second: Option<Option<u32>>,
    /// New bucket size.
    pub burst: Option<Option<u32>>,
    /// New budget (`Some(None)`: none).
    pub budget: Option<Option<Budget>>,
}

/// Credentials and tenants, part of [`State`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    keys: BTreeMap<ApiKeyId, Arc<ApiKeyRecord>>,
    by_hash: BTreeMap<KeyHash, ApiKeyId>,
    /// Whether the cluster has ever had a key.
    bootstrapped: bool,
    tenants: BTreeMap<Tenant, TenantRecord>,
    /// Revoked JWT ids, until when they stay revoked.
    revoked_jtis: BTreeMap<String, u64>,
    /// The same, by time, for pruning.
    jti_expiries: BTreeSet<(u64, String)>,
    /// Grows on every change that may invalidate a cached credential or
    /// rate (keys, tenants, revoked JWT ids).
    version: u64,
}

impl Auth {
    /// The key with this hash.
    pub fn key_by_hash(&self, hash: &KeyHash) -> Option<&Arc<ApiKeyRecord>> {
        self.by_hash.get(hash).and_then(|id| self.keys.get(id))
    }

    /// One key.
    pub fn key(&self, id: &ApiKeyId) -> Option<&Arc<ApiKeyRecord>> {
        self.keys.get(id)
    }

    /// Every key, by id.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<ApiKeyRecord>> {
        self.keys.values()
    }

    /// Whether the cluster has ever had a key.
    pub fn bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    /// Whether a JWT id is revoked.
    pub fn is_jti_revoked(&self, jti: &str) -> bool {
        self.revoked_jtis.contains_key(jti)
    }

    /// Revoked JWT ids with the time they stay revoked until.
    pub fn revoked_jtis(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.revoked_jtis.iter()
    }

    /// One tenant's record.
    pub fn tenant(&self, t: &Tenant) -> Option<&TenantRecord> {
        self.tenants.get(t)
    }

    /// Every tenant record, by name.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantRecord> {
        self.tenants.values()
    }

    /// Grows whenever a cached credential or rate may have changed.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// Bounds on credentials, enforced at apply.
impl super::task::Limits {
    /// Most API key records (live, expired and revoked).
    pub const MAX_API_KEYS: usize = 100_000;
    /// Most JWT ids revoked at once.
    pub const MAX_REVOKED_JTIS: usize = 100_000;
    /// Most tenant records.
    pub const MAX_TENANTS: usize = 10_000;
}

impl State {
    /// Credentials and tenants.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    pub(crate) fn create_api_key(&mut self, new: &NewApiKey, bootstrap: bool) -> Outcome {
        if bootstrap && self.auth.bootstrapped {
            return Ok(Reply::Done);
        }
        check_new_key(new, self.clock_ms)?;
        if self.auth.keys.contains_key(&new.id) {
            return Err(Rejection::Conflict(format!("api key `{}` exists", new.id)));
        }
        if self.auth.by_hash.contains_key(&new.hash) {
            return Err(Rejection::Conflict(
                "an api key with this hash exists".into(),
            ));
        }
        if self.auth.keys.len() >= super::task::Limits::MAX_API_KEYS {
            return Err(Rejection::Conflict(
                "too many api keys: delete revoked ones first".into(),
            ));
        }
        let rec = Arc::new(ApiKeyRecord {
            id: new.id.clone(),
            name: new.name.clone(),
            role: new.role,
            tenant: new.tenant.clone(),
            hash: new.hash,
            prefix: new.prefix.clone(),
            created_by: new.created_by.clone(),
            created_at_ms: self.clock_ms,
            expires_at_ms: new.expires_at_ms,
            revoked_at_ms: None,
            last_used_ms: None,
        });
        self.auth.by_hash.insert(new.hash, new.id.clone());
        self.auth.keys.insert(new.id.clone(), Arc::clone(&rec));
        self.auth.bootstrapped = true;
        self.auth.version += 1;
        Ok(Reply::ApiKey(rec))
    }

    pub(crate) fn revoke_api_key(&mut self, id: &ApiKeyId) -> Outcome {
        let now = self.clock_ms;
        let slot = self
            .auth
            .keys
            .get_mut(id)
            .ok_or_else(|| super::registry::not_found("api key", id))?;
        if slot.revoked_at_ms.is_none() {
            Arc::make_mut(slot).revoked_at_ms = Some(now);
            self.auth.version += 1;
        }
        Ok(Reply::ApiKey(Arc::clone(slot)))
    }

    /// Records that nodes saw these keys used now; unknown ids are skipped
    /// (a key deleted meanwhile).
    pub(crate) fn touch_api_keys(&mut self, ids: &[ApiKeyId]) -> Outcome {
        let now = self.clock_ms;
        for id in ids {
            if let Some(slot) = self.auth.keys.get_mut(id) {
                Arc::make_mut(slot).last_used_ms = Some(now);
            }
        }
        Ok(Reply::Done)
    }

    pub(crate) fn create_tenant(&mut self, name: &Tenant, patch: &TenantPatch) -> Outcome {
        check_name("tenant", &name.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        if self.auth.tenants.contains_key(name) {
            return Err(Rejection::Conflict(format!("tenant `{name}` exists")));
        }
        if self.auth.tenants.len() >= super::task::Limits::MAX_TENANTS {
            return Err(Rejection::Conflict("too many tenants".into()));
        }
        let rec = TenantRecord {
            name: name.clone(),
            settings: TenantSettings::default(),
            created_at_ms: self.clock_ms,
            updated_at_ms: self.clock_ms,
        };
        self.apply_tenant_patch(rec, patch)
    }

    pub(crate) fn update_tenant(&mut self, name: &Tenant, patch: &TenantPatch) -> Outcome {
        let rec = self
            .auth
            .tenants
            .get(name)
            .cloned()
            .ok_or_else(|| super::registry::not_found("tenant", name))?;
        self.apply_tenant_patch(rec, patch)
    }

    /// Checks a patch against `rec`, then stores the result: all or nothing.
    fn apply_tenant_patch(&mut self, mut rec: TenantRecord, patch: &TenantPatch) -> Outcome {
        if let Some(w) = patch.weight
            && !(1..=1000).contains(&w)
        {
            return Err(Rejection::invalid("weight", "must be 1..=1000"));
        }
        if let Some(Some(b)) = &patch.budget {
            b.check().map_err(|p| Rejection::invalid("budget", p))?;
        }
        let s = &mut rec.settings;
        if let Some(v) = patch.max_queued {
            s.max_queued = v;
        }
        if let Some(v) = patch.rate_per_second {
            s.rate_per_second = v;
        }
        if let Some(v) = patch.burst {
            s.burst = v;
        }
        if let Some(v) = &patch.budget {
            s.budget = v.clone();
        }
        if s.rate_per_second == Some(0) || s.burst == Some(0) {
            return Err(Rejection::invalid(
                "rate_per_second",
                "rate_per_second and burst must be > 0 (or null for the node's default)",
            ));
        }
        rec.updated_at_ms = self.clock_ms;
        if let Some(w) = patch.weight {
            self.weights.insert(rec.name.clone(), w);
            let name = rec.name.clone();
            self.weight_changed(&name);
        }
        let name = rec.name.clone();
        self.auth.tenants.insert(name.clone(), rec.clone());
        self.auth.version += 1;
        Ok(self.tenant_reply(&name))
    }

    /// A tenant record with its weight, as a reply.
    pub(crate) fn tenant_reply(&self, name: &Tenant) -> Reply {
        Reply::Tenant {
            record: self.auth.tenants[name].clone(),
            weight: self.weights.get(name).copied().unwrap_or(1),
        }
    }

    /// Removes a tenant's record (its settings go back to the defaults).
    /// Refused while the tenant has live keys or unfinished tasks: revoke
    /// and drain first, so nothing is left running under limits nobody can
    /// see any more.
    pub(crate) fn delete_tenant(&mut self, name: &Tenant) -> Outcome {
        if !self.auth.tenants.contains_key(name) {
            return Err(super::registry::not_found("tenant", name));
        }
        let now = self.clock_ms;
        let keys = self
            .auth
            .keys
            .values()
            .filter(|k| k.tenant == *name && k.is_live(now))
            .count();
        let queued = self.queued_of(name);
        if keys > 0 || queued > 0 {
            return Err(Rejection::Conflict(format!(
                "tenant `{name}` has {keys} live api keys and {queued} unfinished tasks: revoke and drain them first"
            )));
        }
        self.auth.tenants.remove(name);
        if self.weights.remove(name).is_some() {
            self.weight_changed(name);
        }
        self.auth.version += 1;
        Ok(Reply::Done)
    }

    pub(crate) fn revoke_jti(&mut self, jti: &str, until_ms: u64) -> Outcome {
        if jti.is_empty() || jti.len() > super::task::Limits::MAX_NAME_BYTES {
            return Err(Rejection::invalid("jti", "must be 1..=256 bytes"));
        }
        if until_ms <= self.clock_ms {
            return Err(Rejection::invalid("expires_at", "must be in the future"));
        }
        if !self.auth.revoked_jtis.contains_key(jti)
            && self.auth.revoked_jtis.len() >= super::task::Limits::MAX_REVOKED_JTIS
        {
            return Err(Rejection::Conflict("too many revoked JWT ids".into()));
        }
        if let Some(old) = self.auth.revoked_jtis.insert(jti.to_owned(), until_ms) {
            self.auth.jti_expiries.remove(&(old, jti.to_owned()));
        }
        self.auth.jti_expiries.insert((until_ms, jti.to_owned()));
        self.auth.version += 1;
        Ok(Reply::Done)
    }

    /// Forgets revoked JWT ids whose tokens have expired anyway.
    pub(crate) fn prune_jtis(&mut self) {
        while let Some((at, jti)) = self.auth.jti_expiries.first().cloned() {
            if at > self.clock_ms {
                break;
            }
            self.auth.jti_expiries.pop_first();
            self.auth.revoked_jtis.remove(&jti);
            self.auth.version += 1;
        }
    }

    /// Unfinished tasks of a tenant: what its `max_queued` limits.
    pub fn queued_of(&self, tenant: &Tenant) -> u64 {
        use TaskStatus::*;
        self.counts.get(tenant).map_or(0, |per_priority| {
            per_priority
                .iter()
                .flat_map(|per_status| {
                    [
                        Pending,
                        Scheduled,
                        Leased,
                        Running,
                        Failed,
                        Waiting,
                        AwaitingApproval,
                    ]
                    .map(|s| per_status[s.index()])
                })
                .sum()
        })
    }

    /// Unfinished tasks of every tenant (what `queue.max_unfinished_tasks`
    /// limits, summed over the shards).
    pub fn unfinished(&self) -> u64 {
        self.counts.keys().map(|t| self.queued_of(t)).sum()
    }

    /// Tenant `tenant`'s `max_queued`, if it has one.
    pub fn tenant_max_queued(&self, tenant: &Tenant) -> Option<u64> {
        self.auth
            .tenants
            .get(tenant)
            .and_then(|r| r.settings.max_queued)
    }

    /// Refuses a new task of `tenant` past its `max_queued`.
    pub(crate) fn check_quota(&self, tenant: &Tenant) -> Result<(), Rejection> {
        let Some(limit) = self.tenant_max_queued(tenant) else {
            return Ok(());
        };
        let queued = self.queued_of(tenant);
        if queued >= limit {
            return Err(Rejection::QuotaExceeded {
                tenant: tenant.clone(),
                queued,
                limit,
            });
        }
        Ok(())
    }

    /// Applies `cmd` confined to tenant `scope`'s objects; see the module
    /// essay.
    pub(crate) fn apply_scoped(
        &mut self,
        cmd: &Command,
        scope: &str,
        entropy: u64,
        events: &mut Vec<super::event::Event>,
    ) -> Outcome {
        match cmd {
            Command::Submit(spec) | Command::SubmitRouted { task: spec, .. }
                if spec.tenant.as_str() != scope =>
            {
                Err(Rejection::Forbidden(format!(
                    "this credential acts in tenant `{scope}` and cannot submit to `{}`",
                    spec.tenant
                )))
            }
            Command::Lease {
                agent_id,
                capabilities,
                max,
                lease_ms,
            } => {
                let tenant = Tenant::from(scope);
                self.lease(
                    agent_id,
                    capabilities,
                    *max,
                    *lease_ms,
                    Some(&tenant),
                    events,
                )
            }
            Command::Renew { token, .. }
            | Command::Complete { token, .. }
            | Command::Fail { token, .. } => {
                let owned = self
                    .leases
                    .get(token)
                    .is_some_and(|id| self.owns(scope, *id));
                if !owned {
                    return Err(Rejection::StaleToken(*token));
                }
                self.apply_command(cmd, entropy, events)
            }
            Command::Cancel { id, .. }
            | Command::Retry { id }
            | Command::Approve { id, .. }
            | Command::Reject { id, .. } => {
                self.check_owns(scope, *id)?;
                self.apply_command(cmd, entropy, events)
            }
            Command::Replay { selector, limit } => {
                let selector = match selector {
                    ReplaySelector::Ids(ids) => {
                        for id in ids {
                            self.check_owns(scope, *id)?;
                        }
                        selector.clone()
                    }
                    ReplaySelector::Filter(f) => {
                        let mut f = f.clone();
                        f.tenant = Some(Tenant::from(scope));
                        ReplaySelector::Filter(f)
                    }
                };
                self.replay(&selector, *limit, events)
            }
            Command::KillSession { id, .. }
            | Command::PauseSession { id }
            | Command::ResumeSession { id }
            | Command::CheckpointSession { id, .. }
            | Command::MigrateSession { id, .. } => {
                let owned = self
                    .sessions
                    .get(*id)
                    .is_some_and(|s| s.tenant.as_str() == scope);
                if !owned {
                    return Err(super::registry::not_found("session", id));
                }
                self.apply_command(cmd, entropy, events)
            }
            Command::Submit(_) | Command::SubmitRouted { .. } => {
                self.apply_command(cmd, entropy, events)
            }
            _ => Err(Rejection::Forbidden(
                "this command is not confined to one tenant".into(),
            )),
        }
    }

    fn owns(&self, scope: &str, id: TaskId) -> bool {
        self.tasks
            .get(&id)
            .is_some_and(|t| t.tenant.as_str() == scope)
    }

    fn check_owns(&self, scope: &str, id: TaskId) -> Result<(), Rejection> {
        if self.owns(scope, id) {
            Ok(())
        } else {
            Err(Rejection::NotFound(id))
        }
    }
}

/// Checks a new key's fields.
fn check_new_key(new: &NewApiKey, now_ms: u64) -> Result<(), Rejection> {
    let bad = |f: &str, p: &str| Err(Rejection::invalid(f, p));
    check_name("name", &new.name, true).map_err(|(f, p)| Rejection::invalid(f, p))?;
    check_name("tenant", &new.tenant.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
    check_name("id", &new.id.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
    if !(new.prefix.starts_with("dk_live_") || new.prefix.starts_with("dk_test_"))
        || new.prefix.len() > 32
    {
        return bad("prefix", "must be the start of a dk_live_ or dk_test_ key");
    }
    if new.expires_at_ms.is_some_and(|at| at <= now_ms) {
        return bad("expires_in", "must be in the future");
    }
    check_name("created_by", &new.created_by, true).map_err(|(f, p)| Rejection::invalid(f, p))
}
