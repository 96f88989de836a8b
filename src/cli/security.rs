//! `godel key`, `godel tenant`, `godel jwt` and `godel audit`: the client
//! commands of credentials, tenants and the audit log, and where the CLI
//! finds its own credential.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::{Req, query_string, strip_nulls};
use crate::fsm::{AuditAnchor, AuditEntry, AuditTarget};

/// Where the CLI looks for a key when neither `--api-key` nor
/// `GODEL_API_KEY` gives one: the bootstrap key of a node started in the
/// current directory with no config.
pub const DEFAULT_KEY_FILE: &str = "data/admin.key";

/// The credential to send: the flag (or `GODEL_API_KEY`), else
/// `./data/admin.key` if it exists, else none.
pub fn credential(flag: Option<String>) -> anyhow::Result<Option<String>> {
    if let Some(k) = flag.filter(|k| !k.trim().is_empty()) {
        return Ok(Some(k.trim().to_owned()));
    }
    let path = Path::new(DEFAULT_KEY_FILE);
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `godel key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Print a new random key without calling any node: for
    /// `auth.bootstrap_key_file` (the first admin key of a new cluster).
    Generate {
        /// A `dk_test_` key.
        #[arg(long)]
        test: bool,
    },
    /// Create an API key; prints it once.
    Create {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// admin, operator, developer or viewer.
        #[arg(long)]
        role: String,
        /// The tenant it acts in (default: yours).
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime, e.g. `90d`, `12h`.
        #[arg(long)]
        expires_in: Option<String>,
        /// A `dk_test_` key.
        #[arg(long)]
        test: bool,
    },
    /// List keys (never the keys themselves).
    Ls {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this role.
        #[arg(long)]
        role: Option<String>,
        /// Only live keys (`--live false`: only revoked or expired).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        live: Option<bool>,
    },
    /// Show one key.
    Get {
        /// Key id.
        id: String,
    },
    /// Revoke a key on every node.
    Revoke {
        /// Key id.
        id: String,
    },
}

/// `godel tenant ...`
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant record.
    Add {
        /// Tenant name.
        name: String,
        /// Its settings.
        #[command(flatten)]
        settings: TenantSettingsArgs,
    },
    /// List tenant records with their unfinished tasks.
    Ls,
    /// Show one tenant.
    Get {
        /// Tenant name.
        name: String,
    },
    /// Change a tenant's settings (`none` clears a limit).
    Set {
        /// Tenant name.
        name: String,
        /// Its settings.
        #[command(flatten)]
        settings: TenantSettingsArgs,
    },
    /// Remove a tenant's record (refused while it has live keys or tasks).
    Rm {
        /// Tenant name.
        name: String,
    },
}

/// A tenant's settings on the command line.
#[derive(Debug, clap::Args)]
pub struct TenantSettingsArgs {
    /// Round-robin weight, 1..=1000.
    #[arg(long)]
    weight: Option<u32>,
    /// Most unfinished tasks, or `none`.
    #[arg(long)]
    max_queued: Option<String>,
    /// Requests per second per node, or `none` (node default).
    #[arg(long)]
    rate: Option<String>,
    /// Bucket size per node, or `none` (node default).
    #[arg(long)]
    burst: Option<String>,
    /// Budget: tokens a UTC day (a budget is replaced whole by any
    /// budget flag).
    #[arg(long)]
    daily_tokens: Option<u64>,
    /// Budget: tokens a calendar month.
    #[arg(long)]
    monthly_tokens: Option<u64>,
    /// Budget: USD a UTC day (at the nodes' [prices]).
    #[arg(long)]
    daily_cost_usd: Option<f64>,
    /// Budget: USD a calendar month.
    #[arg(long)]
    monthly_cost_usd: Option<f64>,
    /// Budget: the share of a limit, in percent, from which it alerts
    /// (default 80).
    #[arg(long)]
    soft_percent: Option<u8>,
    /// Remove the tenant's budget.
    #[arg(long, conflicts_with_all = ["daily_tokens", "monthly_tokens", "daily_cost_usd", "monthly_cost_usd", "soft_percent"])]
    no_budget: bool,
}

/// `godel jwt ...`
#[derive(Debug, Subcommand)]
pub enum JwtCmd {
    /// Refuse JWTs carrying this id from now on.
    Revoke {
        /// The token's `jti`.
        #[arg(long)]
        jti: String,
        /// The token's expiry (RFC 3339); default: 30 days from now.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Revoked JWT ids.
    Ls,
}

/// `godel audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Audit entries, oldest first.
    Ls {
        /// Only this actor (`key:<id>`, `jwt:<sub>`).
        #[arg(long)]
        actor: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Actions starting with this (`tasks.`).
        #[arg(long)]
        action: Option<String>,
        /// Outcomes starting with this (`ok`, `rejected`, `denied`).
        #[arg(long)]
        outcome: Option<String>,
        /// Page size.
        #[arg(long)]
        limit: Option<usize>,
        /// Cursor from the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Walk the hash chain and name the first broken entry: over the API,
    /// or offline from a stopped node's data directory.
    Verify {
        /// A stopped node's data directory (its `raft` store).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// The request of a key command.
pub fn key_request(k: KeyCmd) -> anyhow::Result<Req> {
    Ok(match k {
        KeyCmd::Generate { .. } => bail!("`key generate` calls no node"),
        KeyCmd::Create {
            name,
            role,
            tenant,
            expires_in,
            test,
        } => (
            "POST",
            "/api/v1/api-keys".into(),
            Some(strip_nulls(json!({
                "name": name, "role": role, "tenant": tenant, "expires_in": expires_in, "test": test,
            }))),
        ),
        KeyCmd::Ls { tenant, role, live } => (
            "GET",
            format!(
                "/api/v1/api-keys{}",
                query_string([
                    ("tenant", tenant),
                    ("role", role),
                    ("live", live.map(|l| l.to_string()))
                ])
            ),
            None,
        ),
        KeyCmd::Get { id } => ("GET", format!("/api/v1/api-keys/{id}"), None),
        KeyCmd::Revoke { id } => ("DELETE", format!("/api/v1/api-keys/{id}"), None),
    })
}

/// A limit given on the command line: a number, or `none` (JSON null).
fn limit_arg(name: &str, v: Option<String>) -> anyhow::Result<Option<Value>> {
    Ok(match v.as_deref() {
        None => None,
        Some("none") => Some(Value::Null),
        Some(n) => Some(json!(n.parse::<u64>().with_context(|| format!(
            "--{name}: `{n}` is not a number or `none`"
        ))?)),
    })
}

fn settings_body(name: Option<String>, s: TenantSettingsArgs) -> anyhow::Result<Value> {
    let mut body = serde_json::Map::new();
    if let Some(n) = name {
        body.insert("name".into(), json!(n));
    }
    if let Some(w) = s.weight {
        body.insert("weight".into(), json!(w));
    }
    for (key, flag, v) in [
        ("max_queued", "max-queued", s.max_queued),
        ("rate_per_second", "rate", s.rate),
        ("burst", "burst", s.burst),
    ] {
        if let Some(v) = limit_arg(flag, v)? {
            body.insert(key.into(), v);
        }
    }
    let budget = strip_nulls(json!({
        "daily_tokens": s.daily_tokens, "monthly_tokens": s.monthly_tokens,
        "daily_cost_usd": s.daily_cost_usd, "monthly_cost_usd": s.monthly_cost_usd,
        "soft_percent": s.soft_percent,
    }));
    if s.no_budget {
        body.insert("budget".into(), Value::Null);
    } else if budget.as_object().is_some_and(|b| !b.is_empty()) {
        body.insert("budget".into(), budget);
    }
    Ok(Value::Object(body))
}

/// The request of a tenant command.
pub fn tenant_request(t: TenantCmd) -> anyhow::Result<Req> {
    Ok(match t {
        TenantCmd::Add { name, settings } => (
            "POST",
            "/api/v1/tenants".into(),
            Some(settings_body(Some(name), settings)?),
        ),
        TenantCmd::Ls => ("GET", "/api/v1/tenants".into(), None),
        TenantCmd::Get { name } => ("GET", format!("/api/v1/tenants/{name}"), None),
        TenantCmd::Set { name, settings } => (
            "PATCH",
            format!("/api/v1/tenants/{name}"),
            Some(settings_body(None, settings)?),
        ),
        TenantCmd::Rm { name } => ("DELETE", format!("/api/v1/tenants/{name}"), None),
    })
}

/// The request of a JWT command.
pub fn jwt_request(j: JwtCmd) -> Req {
    match j {
        JwtCmd::Revoke { jti, expires_at } => (
            "POST",
            "/api/v1/jwt/revocations".into(),
            Some(strip_nulls(json!({ "jti": jti, "expires_at": expires_at }))),
        ),
        JwtCmd::Ls => ("GET", "/api/v1/jwt/revocations".into(), None),
    }
}

/// The request of `godel audit ls`.
pub fn audit_ls_request(a: AuditCmd) -> anyhow::Result<Req> {
    let AuditCmd::Ls {
        actor,
        tenant,
        action,
        outcome,
        limit,
        cursor,
    } = a
    else {
        bail!("`audit verify` is not a single request");
    };
    let q = query_string([
        ("actor", actor),
        ("tenant", tenant),
        ("action", action),
        ("outcome", outcome),
        ("limit", limit.map(|l| l.to_string())),
        ("cursor", cursor),
    ]);
    Ok(("GET", format!("/api/v1/audit{q}"), None))
}

/// `godel audit verify --data-dir D`: the chains in a stopped node's
/// store, every group it holds (the meta group's, and each queue shard's
/// under a `group G:` header when there are several, as over the API).
/// Returns the exit code (0 verified, 1 any broken).
pub fn verify_offline(data_dir: &Path) -> anyhow::Result<i32> {
    let dir = data_dir.join("raft");
    if !dir.is_dir() {
        bail!(
            "{} is not a Godel data directory (no raft/)",
            data_dir.display()
        );
    }
    let groups = crate::store::offline_captures(
        &dir,
        crate::store::Through::Committed,
        &std::env::temp_dir(),
    )
    .with_context(|| format!("reading {} (is the node stopped?)", dir.display()))?;
    let several = groups.len() > 1;
    let mut code = 0;
    for (group, capture) in &groups {
        if several {
            println!("group {group}:");
        }
        let log = capture.state().audit();
        let entries: Vec<AuditEntry> = log.entries().collect();
        code = code.max(report(log.anchor(), &entries));
    }
    Ok(code)
}

/// Prints what a walk of the chain found; the exit code.
pub fn report(anchor: Option<AuditAnchor>, entries: &[AuditEntry]) -> i32 {
    let first = entries.first().map(|e| e.seq);
    let last = entries.last().map(|e| e.seq);
    match crate::fsm::verify_audit_chain(anchor, entries) {
        Ok(n) => {
            let range = match (first, last) {
                (Some(a), Some(b)) => format!(", seq {a}..={b}"),
                _ => String::new(),
            };
            let from = anchor.map_or("the first entry".to_owned(), |a| {
                format!("the anchor at seq {}", a.seq)
            });
            println!("audit chain verified: {n} entries{range}, from {from}");
            0
        }
        Err(broken) => {
            println!("audit chain broken at seq {}: {}", broken.seq, broken.why);
            1
        }
    }
}

/// An entry from its API view (every field the hash covers).
pub fn entry_from_json(v: &Value) -> anyhow::Result<AuditEntry> {
    let text = |k: &str| -> anyhow::Result<String> {
        v[k].as_str()
            .map(str::to_owned)
            .with_context(|| format!("audit entry without `{k}`: {v}"))
    };
    let num = |k: &str| -> anyhow::Result<u64> {
        v[k].as_u64()
            .with_context(|| format!("audit entry without `{k}`: {v}"))
    };
    Ok(AuditEntry {
        seq: num("seq")?,
        time_ms: num("time_ms")?,
        actor: text("actor")?.into(),
        tenant: text("tenant")?.into(),
        action: text("action")?.into(),
        target: AuditTarget::text(text("target")?),
        outcome: text("outcome")?.into(),
        prev_hash: unhex(&text("prev_hash")?)?,
        hash: unhex(&text("hash")?)?,
    })
}

/// 32 bytes from 64 hex digits.
pub fn unhex(s: &str) -> anyhow::Result<[u8; 32]> {
    if s.len() != 64 {
        bail!("`{s}` is not a 32-byte hex hash");
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .with_context(|| format!("`{s}` is not hex"))?;
    }
    Ok(out)
}
