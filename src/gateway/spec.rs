//! `GatewaySpec`: how a gateway is described for registration (API, CLI,
//! config), and the checks it must pass before a driver is built from it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::breaker::BreakerConfig;
use super::{DriverError, Result};
use crate::fsm::{GatewayId, MAX_SESSIONS_PER_GATEWAY};

/// Longest id, region or capability name, in bytes: the replicated state's
/// bound, so a valid spec always registers.
const MAX_NAME_BYTES: usize = crate::fsm::Limits::MAX_NAME_BYTES;
/// Most capabilities one gateway may declare.
const MAX_CAPABILITIES: usize = 64;
/// Longest latency the simulator may be told to add.
const MAX_SIM_LATENCY: Duration = Duration::from_secs(3600);
/// Most arguments or environment variables of a `command` gateway.
const MAX_COMMAND_ITEMS: usize = 256;
/// Longest URL, in bytes.
const MAX_URL_BYTES: usize = 2048;

/// The kinds of gateway Godel can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayKind {
    /// The built-in simulator.
    Sim,
    /// A local program per task.
    Command,
    /// An HTTP webhook.
    Http,
    /// An OpenClaw gateway (WebSocket protocol v4).
    Openclaw,
}

impl fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GatewayKind::Sim => "sim",
            GatewayKind::Command => "command",
            GatewayKind::Http => "http",
            GatewayKind::Openclaw => "openclaw",
        })
    }
}

/// A gateway, as registered.
///
/// ```json
/// {"id": "gw-1", "region": "eu", "capabilities": ["rust"], "max_sessions": 10,
///  "driver": {"kind": "command", "program": "/usr/bin/agent", "args": ["--json"]}}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    /// Unique id: 1 to `Limits::MAX_NAME_BYTES` of `A-Z a-z 0-9 - _ . : /`.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9._:/-]{1,256}$")]
    pub id: GatewayId,
    /// Region label; placement prefers nodes of the same region.
    #[schema(pattern = "^[A-Za-z0-9._:/-]{1,256}$")]
    pub region: String,
    /// What tasks it can run (matched against a task's required capabilities).
    #[serde(default)]
    #[schema(max_items = 64)]
    pub capabilities: BTreeSet<String>,
    /// Most sessions open at once, 1..=[`MAX_SESSIONS_PER_GATEWAY`].
    #[schema(minimum = 1, maximum = 10_000)]
    pub max_sessions: u32,
    /// Circuit breaker thresholds.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Godel starts the gateway's process itself: the node that owns the
    /// gateway runs `command`, restarts it with backoff when it exits, and
    /// stops it when the gateway leaves the node (drain, move, shutdown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedSpec>,
    /// The model its agents run, as the operator declares it (a kill
    /// switch by model stops work on this gateway's agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9._:/-]{1,256}$")]
    pub model: Option<String>,
    /// The kind and its settings.
    #[serde(deserialize_with = "string_tags")]
    pub driver: DriverSpec,
}

/// Deserializes a driver spec whose tags (`kind`, and `latency.dist` of a
/// simulator) are strings: serde also reads an internally tagged enum's
/// tag from a variant's index, so `{"kind": 0}` was a simulator.
fn string_tags<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<DriverSpec, D::Error> {
    use serde::de::Error;
    let v = serde_json::Value::deserialize(d)?;
    for (name, tag) in [
        ("kind", &v["kind"]),
        ("latency.dist", &v["latency"]["dist"]),
    ] {
        if !tag.is_null() && !tag.is_string() {
            return Err(D::Error::custom(format!(
                "`{name}` must be a string, not {tag}"
            )));
        }
    }
    DriverSpec::deserialize(v).map_err(D::Error::custom)
}

/// The kind of a gateway and the settings of that kind, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DriverSpec {
    /// The built-in simulator.
    Sim(SimSpec),
    /// A local program per task.
    Command(CommandSpec),
    /// An HTTP webhook.
    Http(HttpSpec),
    /// An OpenClaw gateway.
    Openclaw(OpenClawSpec),
}

impl DriverSpec {
    /// Which kind this is.
    pub fn kind(&self) -> GatewayKind {
        match self {
            DriverSpec::Sim(_) => GatewayKind::Sim,
            DriverSpec::Command(_) => GatewayKind::Command,
            DriverSpec::Http(_) => GatewayKind::Http,
            DriverSpec::Openclaw(_) => GatewayKind::Openclaw,
        }
    }
}

// Written out: the derive describes an internally tagged variant as its
// struct's schema *and* an object with the tag, which no value satisfies
// when the struct refuses unknown fields. Each variant here is its
// struct's own schema with `kind` added.
impl utoipa::PartialSchema for DriverSpec {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let tagged = |kind: GatewayKind, schema| {
            let mut v = serde_json::to_value(schema).expect("invariant: a schema serializes");
            v["properties"]["kind"] =
                serde_json::json!({ "type": "string", "enum": [kind.to_string()] });
            match v["required"].as_array_mut() {
                Some(required) => required.push("kind".into()),
                None => v["required"] = serde_json::json!(["kind"]),
            }
            v
        };
        let schema = serde_json::json!({
            "description": "The kind of a gateway (`kind`) and the settings of that kind",
            "oneOf": [
                tagged(GatewayKind::Sim, SimSpec::schema()),
                tagged(GatewayKind::Command, CommandSpec::schema()),
                tagged(GatewayKind::Http, HttpSpec::schema()),
                tagged(GatewayKind::Openclaw, OpenClawSpec::schema()),
            ],
        });
        utoipa::openapi::RefOr::T(
            serde_json::from_value(schema).expect("invariant: a valid schema object"),
        )
    }
}

impl ToSchema for DriverSpec {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        SimSpec::schemas(schemas);
        CommandSpec::schemas(schemas);
        HttpSpec::schemas(schemas);
        OpenClawSpec::schemas(schemas);
    }
}

/// Simulator settings. The default completes every attempt at once.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SimSpec {
    /// How long an attempt takes.
    pub latency: LatencySpec,
    /// Share of attempts that fail (retryably), 0.0..=1.0.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub failure_rate: f64,
    /// Share of attempts that never finish until cancelled or timed out,
    /// 0.0..=1.0; `failure_rate + hang_rate <= 1`.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub hang_rate: f64,
    /// Seed for a reproducible sequence of outcomes; random when absent.
    pub seed: Option<u64>,
    /// Token usage each completed attempt reports, as a model's would
    /// (none: no usage).
    pub usage: Option<SimUsage>,
}

/// What a simulated attempt reports using.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimUsage {
    /// Tokens in.
    pub input_tokens: u64,
    /// Tokens out.
    pub output_tokens: u64,
    /// The model named (priced by `[prices]`).
    #[serde(default)]
    pub model: Option<String>,
}

/// A latency distribution, tagged by `dist`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum LatencySpec {
    /// Always the same.
    Fixed {
        /// The latency.
        #[serde(with = "humantime_serde")]
        #[schema(value_type = String, example = "1s")]
        value: Duration,
    },
    /// Uniform between `min` and `max`.
    Uniform {
        /// Shortest.
        #[serde(with = "humantime_serde")]
        #[schema(value_type = String, example = "1s")]
        min: Duration,
        /// Longest.
        #[serde(with = "humantime_serde")]
        #[schema(value_type = String, example = "1s")]
        max: Duration,
    },
    /// Log-normal with the given median and 99th percentile (a long tail,
    /// like real model calls).
    LogNormal {
        /// Median.
        #[serde(with = "humantime_serde")]
        #[schema(value_type = String, example = "1s")]
        p50: Duration,
        /// 99th percentile.
        #[serde(with = "humantime_serde")]
        #[schema(value_type = String, example = "1s")]
        p99: Duration,
    },
}

impl Default for LatencySpec {
    fn default() -> Self {
        LatencySpec::Fixed {
            value: Duration::ZERO,
        }
    }
}

/// Settings of a gateway that runs a local program per attempt.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// The program: a path, or a name looked up in `PATH`.
    pub program: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables (not secrets: specs are replicated and
    /// listed). Names starting with `GODEL_` are reserved.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the node's own when absent.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub working_dir: Option<PathBuf>,
}

/// Settings of a webhook gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Where attempts are POSTed (`http://` or `https://`).
    pub url: String,
    /// GET here answers 2xx when the gateway is healthy.
    #[serde(default)]
    pub health_url: Option<String>,
    /// The `Authorization` header's value, by reference.
    #[serde(default)]
    pub auth_header: Option<SecretRef>,
}

/// A gateway process Godel runs itself (`managed` in a gateway spec).
///
/// ```json
/// {"command": ["/usr/bin/node", "/opt/openclaw/openclaw.mjs", "gateway", "run", "--port", "18789"],
///  "env": {"OPENCLAW_STATE_DIR": "/var/lib/oc"}, "probe_interval": "2s", "max_retries": 5}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManagedSpec {
    /// The program (an absolute path in `[gateways.command] allow`) and
    /// its arguments.
    #[schema(min_items = 1, max_items = 64)]
    pub command: Vec<String>,
    /// Its environment, besides `PATH` (nothing else of the node's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where it runs (under a `[gateways.command] working_dirs` entry).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub working_dir: Option<PathBuf>,
    /// How often the gateway is probed while it runs (default 2 s).
    #[serde(default = "default_managed_probe", with = "humantime_serde")]
    #[schema(value_type = String, example = "2s")]
    pub probe_interval: Duration,
    /// Restarts in a row (each run shorter than a minute) before the node
    /// gives up until the gateway is placed again (default 5).
    #[serde(default = "default_managed_retries")]
    #[schema(minimum = 0, maximum = 1000)]
    pub max_retries: u32,
}

fn default_managed_probe() -> Duration {
    Duration::from_secs(2)
}

fn default_managed_retries() -> u32 {
    5
}

/// Settings of an OpenClaw gateway (`kind: "openclaw"`).
///
/// ```json
/// {"kind": "openclaw", "url": "ws://127.0.0.1:18789", "token": {"env": "OC_TOKEN"},
///  "agent_id": "main", "turn_timeout": "10m", "reconnect_window": "30s"}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenClawSpec {
    /// The gateway's WebSocket endpoint: `ws://host:port` (OpenClaw's
    /// default port is 18789). Its HTTP `/readyz` is probed on the same
    /// host and port.
    pub url: String,
    /// The gateway's shared token (`gateway.auth.token`), by reference.
    pub token: SecretRef,
    /// The OpenClaw agent that runs the turns.
    #[serde(default = "default_openclaw_agent")]
    pub agent_id: String,
    /// Longest agent turn. Every turn is sent with a `timeout` of the
    /// smaller of this and the task's timeout: the gateway itself puts no
    /// cap on a turn's tool loop.
    #[serde(default = "default_turn_timeout", with = "humantime_serde")]
    #[schema(value_type = String, example = "10m")]
    pub turn_timeout: Duration,
    /// How long an attempt waits for the gateway to accept a connection
    /// (at its start, or after its connection dropped mid-run) before it
    /// gives up as unavailable; the attempt's own timeout still bounds it.
    #[serde(default = "default_reconnect_window", with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    pub reconnect_window: Duration,
    /// The node's Ed25519 device key file (created when missing); by
    /// default `openclaw-device.key` in the node's data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub device_key: Option<PathBuf>,
    /// Ephemeral workers: this many gateway sessions kept created ahead of
    /// need (0 to 64, default 0: none). A task without a session key takes
    /// one instead of creating its own, and the session is retired after
    /// that one task (never given another) while a fresh one takes its
    /// place in the pool.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schema(minimum = 0, maximum = 64)]
    pub warm_sessions: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Most warm sessions an OpenClaw gateway keeps.
pub const MAX_WARM_SESSIONS: u32 = 64;

/// OpenClaw's default agent.
fn default_openclaw_agent() -> String {
    "main".to_owned()
}

/// Ten minutes.
fn default_turn_timeout() -> Duration {
    Duration::from_secs(600)
}

/// Thirty seconds: longer than a gateway restart (13 to 21 s measured).
fn default_reconnect_window() -> Duration {
    Duration::from_secs(30)
}

/// Longest agent turn a spec may ask for.
const MAX_TURN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest reconnect window a spec may ask for.
const MAX_RECONNECT_WINDOW: Duration = Duration::from_secs(600);
/// Longest OpenClaw agent id, in bytes.
const MAX_AGENT_ID_BYTES: usize = 64;

/// Where a secret is, never the secret itself: `{"env": "NAME"}` or
/// `{"file": "/path"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// An environment variable of the node running the gateway.
    Env(String),
    /// A file on the node running the gateway (trailing newline ignored).
    File(PathBuf),
}

// Written out: the derive cannot describe a `PathBuf` in a newtype variant.
impl utoipa::PartialSchema for SecretRef {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let one = |key: &str| {
            serde_json::json!({
                "type": "object",
                "properties": { key: { "type": "string" } },
                "required": [key],
                "additionalProperties": false,
            })
        };
        let schema = serde_json::json!({
            "description": "Where a secret is: `{\"env\": \"NAME\"}` or `{\"file\": \"/path\"}`",
            "oneOf": [one("env"), one("file")],
        });
        utoipa::openapi::RefOr::T(
            serde_json::from_value(schema).expect("invariant: a valid schema object"),
        )
    }
}

impl ToSchema for SecretRef {}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl SecretRef {
    /// Reads the secret, if `policy` lets this node read it (an env name
    /// with the configured prefix, never the cluster secret; a file that,
    /// with links resolved, is under the configured directory). Errors name
    /// the reference and the config key, never a value.
    pub fn resolve(&self, policy: &super::DriverPolicy) -> Result<String> {
        let fail = |reason: String| DriverError::Secret {
            reference: self.to_string(),
            reason,
        };
        policy.secret_allowed(self).map_err(fail)?;
        let value = match self {
            SecretRef::Env(name) => std::env::var(name).map_err(|e| fail(e.to_string()))?,
            SecretRef::File(path) => {
                let real = policy.secret_file(path).map_err(fail)?;
                std::fs::read_to_string(real)
                    .map_err(|e| fail(e.to_string()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned()
            }
        };
        if value.is_empty() {
            return Err(fail("empty".into()));
        }
        Ok(value)
    }
}

impl GatewaySpec {
    /// What the registry stores for this spec: the whole spec as JSON text,
    /// plus the fields the state machine indexes.
    pub fn to_registration(&self) -> crate::fsm::GatewayRegistration {
        crate::fsm::GatewayRegistration {
            id: self.id.clone(),
            kind: self.driver.kind().to_string(),
            spec: serde_json::to_string(self).expect("invariant: a gateway spec always serializes"),
            region: self.region.clone(),
            capabilities: self.capabilities.iter().cloned().collect(),
            max_sessions: self.max_sessions,
            model: self.model.clone(),
            managed: self.managed.is_some(),
        }
    }

    /// Checks the whole spec, reporting every problem at once, each starting
    /// with the field it is about (`driver.failure_rate: ...`).
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        check_name(&mut p, "id", &self.id.0);
        check_name(&mut p, "region", &self.region);
        if let Some(m) = &self.model {
            check_name(&mut p, "model", m);
        }
        if let Some(m) = &self.managed {
            if m.command.is_empty() || m.command.len() > 64 {
                p.push("managed.command: 1 to 64 items, the program first".into());
            }
            if m.env.len() > 64 {
                p.push("managed.env: at most 64 variables".into());
            }
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&m.probe_interval)
            {
                p.push("managed.probe_interval: 100ms to 1h".into());
            }
            if m.max_retries > 1000 {
                p.push("managed.max_retries: at most 1000".into());
            }
        }
        if self.capabilities.len() > MAX_CAPABILITIES {
            p.push(format!("capabilities: at most {MAX_CAPABILITIES}"));
        }
        for c in &self.capabilities {
            check_name(&mut p, "capabilities", c);
        }
        if self.max_sessions == 0 || self.max_sessions > MAX_SESSIONS_PER_GATEWAY {
            p.push(format!(
                "max_sessions: must be 1..={MAX_SESSIONS_PER_GATEWAY}"
            ));
        }
        p.extend(self.breaker.problems("breaker."));
        match &self.driver {
            DriverSpec::Sim(s) => check_sim(&mut p, s),
            DriverSpec::Command(c) => check_command(&mut p, c),
            DriverSpec::Http(h) => check_http(&mut p, h),
            DriverSpec::Openclaw(o) => check_openclaw(&mut p, o),
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(DriverError::InvalidSpec(p))
        }
    }
}

fn check_name(p: &mut Vec<String>, field: &str, v: &str) {
    // The replicated state's name alphabet, so task capabilities such as
    // `lang:rust` can be matched.
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_.:/".contains(c);
    if v.is_empty() || v.len() > MAX_NAME_BYTES || !v.chars().all(ok_char) {
        p.push(format!(
            "{field}: `{v}` must be 1 to {MAX_NAME_BYTES} of A-Z a-z 0-9 - _ . : /"
        ));
    }
}

fn check_sim(p: &mut Vec<String>, s: &SimSpec) {
    for (name, rate) in [("failure_rate", s.failure_rate), ("hang_rate", s.hang_rate)] {
        if !(0.0..=1.0).contains(&rate) {
            p.push(format!("driver.{name}: {rate} is not within 0.0..=1.0"));
        }
    }
    if s.failure_rate + s.hang_rate > 1.0 {
        p.push("driver.hang_rate: failure_rate + hang_rate must be <= 1".into());
    }
    let too_long = |d: &Duration| *d > MAX_SIM_LATENCY;
    let bad = match &s.latency {
        LatencySpec::Fixed { value } => too_long(value).then_some("value exceeds the maximum"),
        LatencySpec::Uniform { min, max } if min > max => Some("min must be <= max"),
        LatencySpec::Uniform { max, .. } => too_long(max).then_some("max exceeds the maximum"),
        LatencySpec::LogNormal { p50, p99 } if p50.is_zero() || p50 > p99 => {
            Some("p50 must be > 0 and <= p99")
        }
        LatencySpec::LogNormal { p99, .. } => too_long(p99).then_some("p99 exceeds the maximum"),
    };
    if let Some(why) = bad {
        p.push(format!(
            "driver.latency: {why} (maximum {MAX_SIM_LATENCY:?})"
        ));
    }
}

fn check_command(p: &mut Vec<String>, c: &CommandSpec) {
    if c.program.trim().is_empty() {
        p.push("driver.program: must not be empty".into());
    }
    if c.args.len() > MAX_COMMAND_ITEMS || c.env.len() > MAX_COMMAND_ITEMS {
        p.push(format!(
            "driver.args, driver.env: at most {MAX_COMMAND_ITEMS} each"
        ));
    }
    for name in c.env.keys() {
        if name.is_empty() || name.contains(['=', '\0']) {
            p.push(format!("driver.env: `{name}` is not a variable name"));
        } else if name.starts_with("GODEL_") {
            p.push(format!("driver.env: `{name}` is reserved (GODEL_*)"));
        }
    }
}

fn check_http(p: &mut Vec<String>, h: &HttpSpec) {
    check_url(p, "driver.url", &h.url);
    if let Some(u) = &h.health_url {
        check_url(p, "driver.health_url", u);
    }
    if let Some(r) = &h.auth_header {
        check_secret_ref(p, "driver.auth_header", r);
    }
}

fn check_openclaw(p: &mut Vec<String>, o: &OpenClawSpec) {
    if o.url.len() > MAX_URL_BYTES {
        p.push(format!("driver.url: longer than {MAX_URL_BYTES} bytes"));
    } else {
        match reqwest::Url::parse(&o.url) {
            Ok(u) if u.scheme() == "ws" && u.host().is_some() => {
                if u.query().is_some() || u.fragment().is_some() {
                    p.push("driver.url: must have no query or fragment".into());
                }
            }
            Ok(u) if u.scheme() == "wss" => p.push(format!(
                "driver.url: `{}`: wss:// (TLS) is not supported yet; use ws:// on loopback or behind a TLS proxy",
                o.url
            )),
            Ok(_) => p.push(format!(
                "driver.url: `{}` must be a ws:// URL with a host",
                o.url
            )),
            Err(e) => p.push(format!("driver.url: `{}` is not a URL: {e}", o.url)),
        }
    }
    check_secret_ref(p, "driver.token", &o.token);
    let id_ok = |c: char| c.is_ascii_alphanumeric() || "-_".contains(c);
    if o.agent_id.is_empty()
        || o.agent_id.len() > MAX_AGENT_ID_BYTES
        || !o.agent_id.chars().all(id_ok)
    {
        p.push(format!(
            "driver.agent_id: `{}` must be 1 to {MAX_AGENT_ID_BYTES} of A-Z a-z 0-9 - _",
            o.agent_id
        ));
    }
    if o.turn_timeout < Duration::from_secs(1) || o.turn_timeout > MAX_TURN_TIMEOUT {
        p.push(format!(
            "driver.turn_timeout: must be between 1s and {}",
            humantime::format_duration(MAX_TURN_TIMEOUT)
        ));
    }
    if o.reconnect_window > MAX_RECONNECT_WINDOW {
        p.push(format!(
            "driver.reconnect_window: at most {}",
            humantime::format_duration(MAX_RECONNECT_WINDOW)
        ));
    }
    if let Some(path) = &o.device_key
        && !path.is_absolute()
    {
        p.push("driver.device_key: must be an absolute path".into());
    }
    if o.warm_sessions > MAX_WARM_SESSIONS {
        p.push(format!("driver.warm_sessions: at most {MAX_WARM_SESSIONS}"));
    }
}

fn check_secret_ref(p: &mut Vec<String>, field: &str, r: &SecretRef) {
    match r {
        SecretRef::Env(name) if name.is_empty() || name.contains(['=', '\0']) => {
            p.push(format!("{field}.env: must name an environment variable"));
        }
        SecretRef::File(path) if !path.is_absolute() => {
            p.push(format!("{field}.file: must be an absolute path"));
        }
        _ => {}
    }
}

fn check_url(p: &mut Vec<String>, field: &str, url: &str) {
    if url.len() > MAX_URL_BYTES {
        p.push(format!("{field}: longer than {MAX_URL_BYTES} bytes"));
        return;
    }
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        Ok(_) => p.push(format!(
            "{field}: `{url}` must be an http(s) URL with a host"
        )),
        Err(e) => p.push(format!("{field}: `{url}` is not a URL: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_tags_are_names_not_indices() {
        let spec = |driver: &str| {
            let text = format!(r#"{{"id":"g","region":"r","max_sessions":1,"driver":{driver}}}"#);
            serde_json::from_str::<GatewaySpec>(&text)
        };
        let sim = spec(r#"{"kind":"sim","latency":{"dist":"fixed","value":"1s"}}"#).unwrap();
        assert_eq!(sim.driver.kind(), GatewayKind::Sim);
        for bad in [
            r#"{"kind":0}"#,
            r#"{"kind":"sim","latency":{"dist":0,"value":"1s"}}"#,
        ] {
            let e = spec(bad).unwrap_err().to_string();
            assert!(e.contains("must be a string"), "{bad}: {e}");
        }
    }
}
