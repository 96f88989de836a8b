//! The security tables of the configuration: `[auth]` (credentials, JWT,
//! rate limits), `[gateways]` (what drivers may run and call), `[secrets]`
//! (which secret references resolve) and the TLS file sets shared by the
//! node-to-node transport, the actor fabric and the HTTP API.
//!
//! Every default is the closed one, except where closing it would break the
//! two-command start: a node with no config still serves its API on
//! loopback, creates its first admin key itself and runs the built-in
//! simulated gateway; it runs no program, resolves no secret file and
//! accepts no JWT until the operator configures them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[auth]`: how API callers prove who they are, and how fast they may go.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret for JWTs (at least [`MIN_JWT_SECRET_BYTES`] bytes;
    /// surrounding whitespace ignored). Absent: every JWT is refused and
    /// only API keys authenticate.
    pub jwt_secret_file: Option<PathBuf>,
    /// The secret being rotated out: JWTs signed with it are still accepted
    /// until it is removed from the config.
    pub jwt_previous_secret_file: Option<PathBuf>,
    /// The `iss` every JWT must carry.
    pub jwt_issuer: String,
    /// The `aud` every JWT must carry.
    pub jwt_audience: String,
    /// Clock skew allowed on `exp` and `nbf`, at most 60 s.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// A file holding the admin key a pristine cluster bootstraps with
    /// (`dk_live_...`), for clusters whose operator must know the key
    /// before the first start (compose files, tests). Absent: the node that
    /// bootstraps generates one and writes it to `<data_dir>/admin.key`.
    pub bootstrap_key_file: Option<PathBuf>,
    /// Whether `GET /metrics` answers without a credential (default true;
    /// false asks for one with the `metrics:read` permission).
    pub metrics_open: bool,
    /// Verified credentials remembered per node, so a request costs a map
    /// lookup rather than a SHA-256 or a signature check.
    pub cache_entries: usize,
    /// Request rates.
    pub rate: RateConfig,
}

/// Shortest JWT secret accepted, in bytes (HS256 wants at least the hash size).
pub const MIN_JWT_SECRET_BYTES: usize = 32;
/// Largest clock skew allowed on JWT times.
pub const MAX_JWT_LEEWAY: Duration = Duration::from_secs(60);

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret_file: None,
            jwt_previous_secret_file: None,
            jwt_issuer: "godel".into(),
            jwt_audience: "godel-api".into(),
            jwt_leeway: Duration::from_secs(60),
            bootstrap_key_file: None,
            metrics_open: true,
            cache_entries: 10_000,
            rate: RateConfig::default(),
        }
    }
}

/// `[auth.rate]`: token buckets, per node. A bucket holds `burst` requests
/// and refills at `per_second`; past it the caller gets 429 with
/// `Retry-After`. With several nodes behind one address a caller's rate is
/// up to this times the number of nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    /// Requests per second per credential (API key or JWT subject).
    pub credential_per_second: u32,
    /// Bucket size per credential.
    pub credential_burst: u32,
    /// Requests per second per tenant, unless the tenant's own quota says
    /// otherwise (`PATCH /api/v1/tenants/{tenant}`).
    pub tenant_per_second: u32,
    /// Bucket size per tenant.
    pub tenant_burst: u32,
    /// Failed authentications per minute per source address.
    pub auth_failures_per_minute: u32,
    /// Bucket size of failed authentications per source address.
    pub auth_failures_burst: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            credential_per_second: 5_000,
            credential_burst: 10_000,
            tenant_per_second: 10_000,
            tenant_burst: 20_000,
            auth_failures_per_minute: 60,
            auth_failures_burst: 20,
        }
    }
}

/// `[gateways]`: what gateway drivers on this node may run and call.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaysConfig {
    /// Hosts `http` and `openclaw` gateways may be pointed at (names or IP
    /// addresses, matched exactly, case-insensitively). Empty: any host.
    pub allow_hosts: Vec<String>,
    /// `[gateways.command]`: the programs `command` gateways may run.
    pub command: CommandPolicy,
}

/// `[gateways.command]`: nothing runs unless listed here.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandPolicy {
    /// Programs a `command` gateway may run: absolute paths, matched
    /// exactly. Empty (the default): registering a command gateway is
    /// refused.
    pub allow: Vec<PathBuf>,
    /// Directories a command gateway's `working_dir` must sit under
    /// (absolute). Empty: a `working_dir` is refused (the program runs in
    /// the node's own directory).
    pub working_dirs: Vec<PathBuf>,
}

/// `[secrets]`: which secret references (`{"env": ...}`, `{"file": ...}`)
/// in gateway specs resolve on this node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// `{"env": NAME}` resolves only names starting with this prefix (and
    /// never the cluster secret).
    pub env_prefix: String,
    /// `{"file": PATH}` resolves only files under this directory. Absent:
    /// file references are refused.
    pub dir: Option<PathBuf>,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self {
            env_prefix: "GODEL_SECRET_".into(),
            dir: None,
        }
    }
}

/// A set of PEM files for mutual TLS: this node's certificate chain and key,
/// and the CA its peers' certificates must chain to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This node's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) peers' certificates must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// One problem per file that is not a readable file, named `{table}.{field}`.
    pub fn problems(&self, table: &str) -> Vec<String> {
        [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)]
            .into_iter()
            .filter(|(_, path)| !path.is_file())
            .map(|(field, path)| {
                format!("{table}.{field}: {} is not a readable file", path.display())
            })
            .collect()
    }
}

impl AuthConfig {
    pub(super) fn problems(&self, p: &mut Vec<String>) {
        if self.jwt_leeway > MAX_JWT_LEEWAY {
            p.push("auth.jwt_leeway must be at most 60s".into());
        }
        if self.jwt_issuer.is_empty() || self.jwt_audience.is_empty() {
            p.push("auth.jwt_issuer and auth.jwt_audience must not be empty".into());
        }
        if self.jwt_previous_secret_file.is_some() && self.jwt_secret_file.is_none() {
            p.push("auth.jwt_previous_secret_file needs auth.jwt_secret_file".into());
        }
        if self.cache_entries == 0 {
            p.push("auth.cache_entries must be > 0".into());
        }
        let r = &self.rate;
        for (name, v) in [
            ("credential_per_second", r.credential_per_second),
            ("credential_burst", r.credential_burst),
            ("tenant_per_second", r.tenant_per_second),
            ("tenant_burst", r.tenant_burst),
            ("auth_failures_per_minute", r.auth_failures_per_minute),
            ("auth_failures_burst", r.auth_failures_burst),
        ] {
            if v == 0 {
                p.push(format!("auth.rate.{name} must be > 0"));
            }
        }
    }
}

impl GatewaysConfig {
    pub(super) fn problems(&self, p: &mut Vec<String>) {
        for prog in &self.command.allow {
            if !prog.is_absolute() {
                p.push(format!(
                    "gateways.command.allow: `{}` must be an absolute path",
                    prog.display()
                ));
            }
        }
        for dir in &self.command.working_dirs {
            if !dir.is_absolute() {
                p.push(format!(
                    "gateways.command.working_dirs: `{}` must be an absolute path",
                    dir.display()
                ));
            }
        }
        for host in &self.allow_hosts {
            if host.is_empty() || host.contains(['/', ' ', '@']) {
                p.push(format!(
                    "gateways.allow_hosts: `{host}` is not a host name or IP address"
                ));
            }
        }
    }
}

impl SecretsConfig {
    pub(super) fn problems(&self, p: &mut Vec<String>) {
        if self.env_prefix.is_empty() {
            p.push("secrets.env_prefix must not be empty (it would let specs read any variable of the node)".into());
        }
        if let Some(dir) = &self.dir
            && !dir.is_absolute()
        {
            p.push(format!(
                "secrets.dir: `{}` must be an absolute path",
                dir.display()
            ));
        }
    }
}

/// Reads a secret file for the configuration (the JWT secret, a bootstrap
/// key): its contents with surrounding whitespace removed. Errors name the
/// key and the file, never the contents.
pub fn read_secret_file(key: &str, path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{key}: cannot read {}: {e}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// Writes a file only its owner can read (mode 0600 on Unix), created
/// fresh: a secret never exists, even briefly, with wider permissions.
/// Replaces an existing file through a temporary one and a rename.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}
