//! Configuration: one typed tree, layered defaults -> TOML file -> `GODEL_*`
//! environment -> command-line flags.
//!
//! With no file at all, `godel serve` is a single node with its data in
//! `./data`, its API on 127.0.0.1:7373 and its node-to-node transport on
//! 127.0.0.1:7474. Every duration is written the human way (`"500ms"`,
//! `"30s"`); unknown keys are errors; [`Config::validate`] reports every
//! problem at once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::raft::NodeId;

mod security;

pub use security::{
    AuthConfig, CommandPolicy, GatewaysConfig, MAX_JWT_LEEWAY, MIN_JWT_SECRET_BYTES, RateConfig,
    SecretsConfig, TlsFiles, read_secret_file, write_private_file,
};

/// The whole configuration of one node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// The cluster it belongs to.
    pub cluster: ClusterConfig,
    /// Raft timing and log compaction.
    pub raft: RaftConfig,
    /// Write batching and lease defaults.
    pub queue: QueueConfig,
    /// The actor runtime: dispatch, sessions, agents, gateway probes.
    pub runtime: RuntimeConfig,
    /// HTTP API limits.
    pub api: ApiConfig,
    /// The actor fabric (ractor_cluster): lease hints between nodes.
    pub fabric: FabricConfig,
    /// API credentials, JWT and rate limits.
    pub auth: AuthConfig,
    /// What gateway drivers on this node may run and call.
    pub gateways: GatewaysConfig,
    /// Which secret references resolve on this node.
    pub secrets: SecretsConfig,
    /// Model prices, in USD per million tokens, by the model name a
    /// task's result reports (`GET /usage` turns tokens into cost with
    /// them; `default` prices a model not listed, or none named). Keep
    /// them the same on every node.
    pub prices: std::collections::BTreeMap<String, Price>,
    /// Agent roles besides (or replacing) the built-in `coordinator`,
    /// `worker`, `reviewer` and `monitor` (`crate::roles`). Keep them the
    /// same on every node.
    pub roles: std::collections::BTreeMap<String, crate::roles::RoleSpec>,
}

/// One model's price (`[prices."model-name"]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// USD per million tokens in.
    pub input_per_mtok: f64,
    /// USD per million tokens out.
    pub output_per_mtok: f64,
}

impl Config {
    /// The price of `model` (`None`: none named): its own, else
    /// `default`, else none.
    pub fn price_of(&self, model: Option<&str>) -> Option<Price> {
        model
            .and_then(|m| self.prices.get(m))
            .or_else(|| self.prices.get("default"))
            .copied()
    }
}

/// This node's identity and addresses.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Stable node id (never reuse one with a wiped data directory).
    pub id: NodeId,
    /// Region label.
    pub region: String,
    /// Where the log, snapshots and the node's secret live.
    pub data_dir: PathBuf,
    /// HTTP API listen address.
    pub api_addr: SocketAddr,
    /// Node-to-node transport listen address.
    pub raft_addr: SocketAddr,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: 1,
            region: "local".into(),
            data_dir: PathBuf::from("./data"),
            api_addr: ([127, 0, 0, 1], 7373).into(),
            raft_addr: ([127, 0, 0, 1], 7474).into(),
        }
    }
}

/// Cluster membership at bootstrap, the shared secret, and the number of
/// queue shards.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Initial voters. Empty: this node alone. The member with the lowest id
    /// initializes a pristine cluster; the others wait to be contacted.
    pub members: Vec<MemberConfig>,
    /// API address of a running node to ask to add this one (as a learner,
    /// then a voter) when this node's data directory is pristine.
    pub join: Option<String>,
    /// The shared node-to-node secret. Prefer `secret_file` or the
    /// `GODEL_CLUSTER_SECRET` environment variable.
    pub secret: Option<String>,
    /// A file holding the shared secret.
    pub secret_file: Option<PathBuf>,
    /// Mutual TLS for the node-to-node transport (Raft, forwarded writes
    /// and reads); plain TCP after the secret handshake when absent.
    pub tls: Option<TlsFiles>,
    /// Queue shards (`docs/shards.md`). 1: the meta group is the one
    /// shard, as before shards existed. N > 1: N more Raft groups, `1..=N`,
    /// each replicated on every voter with its leader spread over the
    /// nodes. Recorded when the cluster is created; it can grow (raise it
    /// on every node, restarting them one at a time: `docs/shards.md`,
    /// "Changing the number of shards"), never shrink: a node whose data
    /// holds more refuses to start.
    pub shards: u32,
    /// Where each queue shard's voters go: `auto` (default: `spread` with
    /// more than five voters in three or more regions, else `every`),
    /// `every`, `spread` or `regional` (`docs/shards.md`). Fixed with the
    /// count when the cluster is created.
    pub shard_placement: crate::fsm::ShardPlacement,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            members: Vec::new(),
            join: None,
            secret: None,
            secret_file: None,
            tls: None,
            shards: 1,
            shard_placement: crate::fsm::ShardPlacement::Auto,
        }
    }
}

/// The most queue shards a cluster may have: a task id keeps its shard in
/// its low 8 bits, and every group costs its own heartbeats.
pub const MAX_SHARDS: u32 = 64;

/// One initial member.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Its node id.
    pub id: NodeId,
    /// Its transport address.
    pub raft_addr: String,
    /// Its HTTP API address.
    pub api_addr: String,
    /// Its region.
    #[serde(default = "default_region")]
    pub region: String,
}

fn default_region() -> String {
    "local".into()
}

/// Raft timing. Defaults suit nodes on one LAN; cross-region clusters need
/// heartbeat >= RTT + fsync and elections several times that.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat period (also openraft's per-RPC append timeout).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Log entries between snapshots.
    pub snapshot_every_entries: u64,
    /// Commands (a task submitted, a lease, a report...) between
    /// snapshots, whichever of this and `snapshot_every_entries` comes
    /// first: an entry carries up to `queue.batch_max_commands`, and a
    /// restart applies again every command after the last snapshot.
    pub snapshot_every_commands: u64,
    /// Log entries kept behind a snapshot for slow followers.
    pub keep_entries_after_snapshot: u64,
    /// Timeout of one install-snapshot chunk RPC.
    #[serde(with = "humantime_serde")]
    pub snapshot_rpc_timeout: Duration,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(250),
            snapshot_every_entries: 5000,
            snapshot_every_commands: 2_000_000,
            keep_entries_after_snapshot: 1000,
            snapshot_rpc_timeout: Duration::from_secs(5),
        }
    }
}

/// Write batching and lease defaults.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Most commands in one Raft entry.
    pub batch_max_commands: usize,
    /// Most bytes of commands (encoded) in one Raft entry: a batch closes
    /// at whichever of this and `batch_max_commands` comes first. One
    /// request's commands are never split, so an entry of a single request
    /// can be larger (up to `api.max_body_bytes` and its encoding).
    pub batch_max_bytes: usize,
    /// Raft proposals in flight at once from this node.
    pub max_inflight_batches: usize,
    /// Commands waiting for a batch before callers are told to back off (429).
    pub max_queued_commands: usize,
    /// How long a write may wait for commit before it fails with 503.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Lease length when a worker does not ask for one.
    #[serde(with = "humantime_serde")]
    pub default_lease: Duration,
    /// How often the leader checks for due timers (scheduled tasks, expired
    /// leases, backoffs) and proposes a tick when one is due.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// How often each node records its heartbeat in the node registry.
    #[serde(with = "humantime_serde")]
    pub node_heartbeat_interval: Duration,
    /// A node whose last heartbeat is older than this is dead to placement:
    /// the leader moves its gateways to live nodes.
    #[serde(with = "humantime_serde")]
    pub node_dead_after: Duration,
    /// Unfinished tasks (not completed, cancelled or dead-lettered) the
    /// cluster holds before it refuses new ones, whatever their priority;
    /// lower priorities are shed earlier, at their `shed_at` share of it.
    /// None (default): no limit.
    pub max_unfinished_tasks: Option<u64>,
    /// Load shedding by priority: the share of the write queue
    /// (`max_queued_commands`) and of `max_unfinished_tasks` from which new
    /// tasks of each priority are refused (429, code `shed`); `critical` is
    /// refused only when full.
    pub shed_at: ShedAt,
    /// Completed and cancelled tasks are purged from the state (and their
    /// idempotency keys freed) once they finished longer ago than this.
    #[serde(with = "humantime_serde")]
    pub retain_finished: Duration,
    /// Dead letters not replayed, cancelled or otherwise changed for this
    /// long are purged too (a dead letter a blocked task waits on, or with
    /// unfinished children, is kept). Replay or export them before.
    #[serde(with = "humantime_serde")]
    pub retain_dead_letters: Duration,
    /// At most this many completed and cancelled tasks are kept per Raft
    /// group: past it the oldest are purged, however recent. Bounds memory
    /// under sustained throughput (each finished task stays in memory on
    /// every node until purged).
    pub retain_finished_max: u64,
}

/// Where each priority is shed, as a share of a limit (0 to 1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShedAt {
    /// `low` tasks are refused from this share (default 0.5).
    pub low: f64,
    /// `medium` tasks are refused from this share (default 0.7).
    pub medium: f64,
    /// `high` tasks are refused from this share (default 0.85).
    pub high: f64,
}

impl Default for ShedAt {
    fn default() -> Self {
        Self {
            low: 0.5,
            medium: 0.7,
            high: 0.85,
        }
    }
}

impl ShedAt {
    /// The share of a limit from which `priority` is refused.
    pub fn of(&self, priority: crate::fsm::Priority) -> f64 {
        use crate::fsm::Priority;
        match priority {
            Priority::Low => self.low,
            Priority::Medium => self.medium,
            Priority::High => self.high,
            Priority::Critical => 1.0,
        }
    }

    /// Whether a new task of `priority` is admitted with `used` of `limit`
    /// taken (`critical` until the limit itself).
    pub fn admits(&self, priority: crate::fsm::Priority, used: u64, limit: u64) -> bool {
        (used as f64) < self.of(priority) * limit as f64
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            batch_max_commands: 1000,
            batch_max_bytes: 8 * 1024 * 1024,
            max_inflight_batches: 1,
            max_queued_commands: 100_000,
            write_timeout: Duration::from_secs(3),
            default_lease: Duration::from_secs(30),
            tick_interval: Duration::from_millis(100),
            node_heartbeat_interval: Duration::from_millis(500),
            node_dead_after: Duration::from_secs(2),
            max_unfinished_tasks: None,
            shed_at: ShedAt::default(),
            retain_finished: Duration::from_secs(7 * 24 * 3600),
            retain_dead_letters: Duration::from_secs(7 * 24 * 3600),
            retain_finished_max: 1_000_000,
        }
    }
}

/// The actor runtime: how the shard leader matches ready tasks to agents,
/// session limits, agent reconciliation and gateway probes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Who matches ready tasks to agents: `push`, the leader's queue-shard
    /// actor for every agent, or `pull`, each node for the agents it runs
    /// (`docs/shards.md`). `auto` (default): `push` with one shard, `pull`
    /// with more (several shards need it: see [`Config::dispatch`]).
    pub dispatch: DispatchMode,
    /// `least_loaded` (default) or `round_robin`.
    pub policy: crate::fsm::DispatchPolicy,
    /// Most leases one dispatch round commits (one Raft command).
    pub max_per_round: u32,
    /// Dispatch is woken by every applied change; this is the fallback
    /// period (registry changes, missed wake-ups).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Longest life of a gateway session (`0s`: no limit). A session past it
    /// ends as `timeout` and its running attempt fails.
    #[serde(with = "humantime_serde")]
    pub session_time_limit: Duration,
    /// An idle session (no task) closes after this long (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// A gateway whose health probe has failed this long is taken as down:
    /// its sessions move on to other gateways from their last checkpoint
    /// (one whose breaker opens moves them at once; a short failure is
    /// more likely a gateway too busy to answer).
    #[serde(with = "humantime_serde")]
    pub session_move_after: Duration,
    /// A session takes a checkpoint (its latest turns and tokens, what
    /// another gateway needs to continue it) after every this many
    /// completed tasks (`0`: only when an operator asks).
    pub session_checkpoint_every: u32,
    /// How often an agent reconciles its attempts with the committed leases
    /// (a lost hint delays work by at most this much).
    #[serde(with = "humantime_serde")]
    pub agent_sync_interval: Duration,
    /// Each agent's own circuit breaker: this many attempts in a row that
    /// fail on this agent in a way that may pass (a retryable task
    /// failure; the gateway's faults are its own breaker's) open it, and
    /// the agent takes no work for `cool_down`; then one trial task at a
    /// time (`half_open_max_calls` is ignored) until `success_threshold`
    /// complete. Default 10 in a row and 10 s: a flaky but working agent
    /// (a 30% failure rate makes 10 in a row about once in 170,000
    /// attempts) is not taken out.
    pub agent_breaker: crate::gateway::BreakerConfig,
    /// An agent whose actor has not been heard (it beats at every
    /// `agent_sync_interval`) for this long is taken out of dispatch until
    /// heard again; its leases lapse if it stopped renewing them.
    #[serde(with = "humantime_serde")]
    pub agent_silent_after: Duration,
    /// How often a gateway actor probes its gateway's health.
    #[serde(with = "humantime_serde")]
    pub gateway_probe_interval: Duration,
    /// How long a draining node keeps a gateway whose agents still run
    /// tasks: the gateway moves when they are done or at this deadline,
    /// whichever comes first (its unfinished tasks are then leased again
    /// on the new owner).
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Enables `POST /api/v1/admin/agents/{id}/crash`, which makes an agent
    /// actor fail as a panic would, and `/api/v1/admin/faults/*`, which cut
    /// this node's transport off from chosen peers (for drills and tests;
    /// off by default).
    pub fault_injection: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            dispatch: DispatchMode::Auto,
            policy: crate::fsm::DispatchPolicy::LeastLoaded,
            max_per_round: 1000,
            interval: Duration::from_millis(100),
            session_time_limit: Duration::from_secs(3600),
            session_idle: Duration::from_secs(300),
            session_checkpoint_every: 1,
            session_move_after: Duration::from_secs(30),
            agent_sync_interval: Duration::from_secs(1),
            agent_breaker: crate::gateway::BreakerConfig {
                failure_threshold: 10,
                cool_down: Duration::from_secs(10),
                half_open_max_calls: 1,
                success_threshold: 1,
            },
            agent_silent_after: Duration::from_secs(10),
            gateway_probe_interval: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(30),
            fault_injection: false,
        }
    }
}

/// Who matches ready tasks to agents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchMode {
    /// `Push` with one shard, `Pull` with several.
    #[default]
    Auto,
    /// The leader's queue-shard actor proposes rounds for every agent, and
    /// a batch that adds work ends with one.
    Push,
    /// Every node proposes rounds for the agents online on it (`Pull`).
    Pull,
}

/// HTTP API limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Largest request body, in bytes (413 past it).
    pub max_body_bytes: usize,
    /// Longest a request may take before 504.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most items a list page returns.
    pub max_page_size: usize,
    /// Longest a client may take to send a request's headers; the
    /// connection is closed past it.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest a client may take to send a request's body (408 past it).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Deepest nesting of arrays and objects a JSON body may have (400 past it).
    pub max_json_depth: usize,
    /// Serve the API over TLS with this certificate chain (PEM); needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that signed the nodes' API certificates, when
    /// not a public CA: nodes trust only these when they call each other's
    /// API (joins, leader transfer). Unset: the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// Events each node keeps for event-stream clients resuming with
    /// `?since=` (older ones answer with a gap).
    pub events_buffer: usize,
    /// Events queued for one event-stream client before it is told it
    /// lagged and closed.
    pub events_queue: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            max_page_size: 1000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_json_depth: 32,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            events_buffer: crate::events::DEFAULT_CAPACITY,
            events_queue: crate::events::LIVE_CAPACITY,
        }
    }
}

/// The actor fabric: ractor_cluster sessions between the nodes, over which
/// the leader hints followers' agents about their new leases (`src/fabric.rs`).
/// Hints are a shortcut only: with the fabric off, agents learn of their
/// leases when their replica applies them.
///
/// Every node listens on its `raft_addr` IP at the raft port
/// [`FABRIC_PORT_OFFSET`] (100) higher, and finds its peers the same way
/// from their `raft_addr` (members carry no fabric address), so the offset
/// is fixed cluster-wide. The session cookie is derived from the cluster
/// secret, never the secret itself. Without `[fabric.tls]` the session
/// after the cookie handshake is plain TCP: keep the fabric port on a
/// trusted network, set `[fabric.tls]`, or turn the fabric off.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FabricConfig {
    /// Whether this node joins the fabric (default true).
    pub enabled: bool,
    /// Listen address; default: `node.raft_addr` with the port plus 100.
    /// Peers always dial the raft IP at port + 100, so set this only to
    /// listen on another interface (say `0.0.0.0`); its port must be the
    /// raft port + 100.
    pub addr: Option<SocketAddr>,
    /// Mutual TLS for fabric sessions; plain TCP after the cookie handshake
    /// when absent.
    pub tls: Option<FabricTls>,
}

impl Default for FabricConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: None,
            tls: None,
        }
    }
}

/// `[fabric.tls]`: PEM files for mutual TLS between the nodes' fabric
/// endpoints. Every node presents `cert` and accepts only peers whose
/// certificate chains to `ca`; a dialer checks that the listener's
/// certificate names the host of the member's `raft_addr` (IP or DNS name,
/// as a subject alternative name). A node whose files cannot be read or do
/// not fit together refuses to start rather than run the fabric in clear.
pub type FabricTls = TlsFiles;

/// The fabric port is the raft port plus this, on every node.
pub const FABRIC_PORT_OFFSET: u16 = 100;

/// The fabric address of a node whose transport listens on `raft_addr`.
pub fn fabric_addr_of(raft_addr: SocketAddr) -> Option<SocketAddr> {
    let port = raft_addr.port().checked_add(FABRIC_PORT_OFFSET)?;
    Some(SocketAddr::new(raft_addr.ip(), port))
}

impl Config {
    /// Where this node's fabric listens (`fabric.addr` or the derived one).
    pub fn fabric_listen_addr(&self) -> Option<SocketAddr> {
        self.fabric
            .addr
            .or_else(|| fabric_addr_of(self.node.raft_addr))
    }

    /// Who matches tasks to agents on this node: `runtime.dispatch`, with
    /// `auto` resolved by the shard count. Never `Auto`.
    pub fn dispatch(&self) -> DispatchMode {
        match self.runtime.dispatch {
            DispatchMode::Auto if self.cluster.shards > 1 => DispatchMode::Pull,
            DispatchMode::Auto => DispatchMode::Push,
            chosen => chosen,
        }
    }
}

/// Configuration errors, all of them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this tree.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
    /// Values that parse but do not make sense.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text over the defaults.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies `GODEL_*` environment overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Some(v) = get("GODEL_NODE_ID") {
            match v.parse() {
                Ok(id) => self.node.id = id,
                Err(_) => problems.push(format!("GODEL_NODE_ID: `{v}` is not a number")),
            }
        }
        if let Some(v) = get("GODEL_DATA_DIR") {
            self.node.data_dir = v.into();
        }
        for (key, slot) in [
            ("GODEL_API_ADDR", &mut self.node.api_addr),
            ("GODEL_RAFT_ADDR", &mut self.node.raft_addr),
        ] {
            if let Some(v) = get(key) {
                match v.parse() {
                    Ok(a) => *slot = a,
                    Err(_) => problems.push(format!("{key}: `{v}` is not host:port")),
                }
            }
        }
        if let Some(v) = get("GODEL_CLUSTER_SECRET") {
            self.cluster.secret = Some(v);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Checks the whole tree, reporting every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let r = &self.raft;
        if r.heartbeat_interval.is_zero() {
            p.push("raft.heartbeat_interval must be > 0".to_string());
        }
        if r.election_timeout_min <= r.heartbeat_interval {
            p.push("raft.election_timeout_min must exceed raft.heartbeat_interval".into());
        }
        if r.election_timeout_max <= r.election_timeout_min {
            p.push("raft.election_timeout_max must exceed raft.election_timeout_min".into());
        }
        if r.snapshot_every_entries == 0 || r.snapshot_every_commands == 0 {
            p.push("raft.snapshot_every_entries and snapshot_every_commands must be > 0".into());
        }
        let q = &self.queue;
        if q.batch_max_commands == 0 || q.max_inflight_batches == 0 || q.max_queued_commands == 0 {
            p.push("queue.batch_max_commands, max_inflight_batches and max_queued_commands must be > 0".into());
        }
        // A follower's forwarded batch joins the leader's queue whole: it
        // must fit (one API batch, or `batch_max_commands`, and its pull).
        let forwarded = q.batch_max_commands.max(crate::api::MAX_BATCH_ITEMS) + 1;
        if q.max_queued_commands < forwarded {
            p.push(format!(
                "queue.max_queued_commands must be at least {forwarded} (a follower's forwarded batch, which the leader takes whole)"
            ));
        }
        let shed = q.shed_at;
        if !(0.0 < shed.low
            && shed.low <= shed.medium
            && shed.medium <= shed.high
            && shed.high <= 1.0)
        {
            p.push(format!(
                "queue.shed_at must satisfy 0 < low <= medium <= high <= 1 (got low {}, medium {}, high {})",
                shed.low, shed.medium, shed.high
            ));
        }
        for (model, price) in &self.prices {
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if !ok(price.input_per_mtok) || !ok(price.output_per_mtok) {
                p.push(format!(
                    "prices.\"{model}\": input_per_mtok and output_per_mtok must be finite and >= 0"
                ));
            }
        }
        if q.retain_finished < Duration::from_secs(1) {
            p.push("queue.retain_finished must be at least 1s".into());
        }
        if q.retain_dead_letters < Duration::from_secs(1) {
            p.push("queue.retain_dead_letters must be at least 1s".into());
        }
        if q.retain_finished_max == 0 {
            p.push("queue.retain_finished_max must be > 0".into());
        }
        if q.max_unfinished_tasks == Some(0) {
            p.push("queue.max_unfinished_tasks must be > 0 (leave it out for no limit)".into());
        }
        let (lo, hi) = crate::fsm::Limits::LEASE_MS_RANGE;
        let lease = q.default_lease.as_millis() as u64;
        if !(lo..=hi).contains(&lease) {
            p.push(format!(
                "queue.default_lease must be between {lo}ms and {hi}ms"
            ));
        }
        if q.node_heartbeat_interval < Duration::from_millis(100) {
            p.push("queue.node_heartbeat_interval must be at least 100ms".into());
        }
        if q.node_dead_after <= q.node_heartbeat_interval {
            p.push("queue.node_dead_after must exceed queue.node_heartbeat_interval".into());
        }
        let d = &self.runtime;
        if !(1..=crate::fsm::Limits::MAX_DISPATCH).contains(&d.max_per_round) {
            p.push(format!(
                "runtime.max_per_round must be 1..={}",
                crate::fsm::Limits::MAX_DISPATCH
            ));
        }
        if d.interval < Duration::from_millis(1)
            || d.agent_sync_interval < Duration::from_millis(10)
        {
            p.push("runtime.interval must be at least 1ms, runtime.agent_sync_interval at least 10ms and runtime.gateway_probe_interval at least 100ms".into());
        }
        if d.agent_silent_after <= d.agent_sync_interval * 2 {
            p.push("runtime.agent_silent_after must exceed twice runtime.agent_sync_interval (an agent beats once per sync)".into());
        }
        p.extend(d.agent_breaker.problems("runtime.agent_breaker."));
        // An entry goes to a follower in one transport frame: a batch (at
        // most `batch_max_bytes`) or one request's commands whole (about
        // its body) must leave room for the AppendEntries around it.
        let entry_max = crate::transport::DEFAULT_MAX_FRAME_BYTES as usize / 4;
        if self.api.max_body_bytes < 1024 || self.api.max_body_bytes > entry_max {
            p.push(format!(
                "api.max_body_bytes must be 1024..={entry_max} (one request's commands are one Raft entry)"
            ));
        }
        if self.queue.batch_max_bytes < 1024 || self.queue.batch_max_bytes > entry_max {
            p.push(format!(
                "queue.batch_max_bytes must be 1024..={entry_max} (a Raft entry must fit a transport frame)"
            ));
        }
        if self.api.max_json_depth == 0
            || self.api.header_timeout.is_zero()
            || self.api.body_timeout.is_zero()
        {
            p.push(
                "api.max_json_depth, api.header_timeout and api.body_timeout must be > 0".into(),
            );
        }
        if self.api.events_buffer == 0 || self.api.events_queue == 0 {
            p.push("api.events_buffer and api.events_queue must be > 0".into());
        }
        match (&self.api.tls_cert, &self.api.tls_key) {
            (Some(c), Some(k)) => {
                for (field, path) in [("tls_cert", c), ("tls_key", k)] {
                    if !path.is_file() {
                        p.push(format!(
                            "api.{field}: {} is not a readable file",
                            path.display()
                        ));
                    }
                }
            }
            (None, None) => {}
            _ => p.push("api.tls_cert and api.tls_key go together".into()),
        }
        if let Some(ca) = &self.api.tls_ca {
            if self.api.tls_cert.is_none() {
                p.push("api.tls_ca needs api.tls_cert (the API serves plain HTTP)".into());
            }
            if !ca.is_file() {
                p.push(format!(
                    "api.tls_ca: {} is not a readable file",
                    ca.display()
                ));
            }
        }
        if let Some(tls) = &self.cluster.tls {
            p.extend(tls.problems("cluster.tls"));
        }
        self.auth.problems(&mut p);
        self.gateways.problems(&mut p);
        p.extend(crate::roles::problems(&self.roles));
        self.secrets.problems(&mut p);
        self.validate_members(&mut p);
        self.validate_fabric(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    fn validate_fabric(&self, p: &mut Vec<String>) {
        if !self.fabric.enabled {
            return;
        }
        match fabric_addr_of(self.node.raft_addr) {
            None => p.push(format!(
                "fabric: node.raft_addr's port + {FABRIC_PORT_OFFSET} is past 65535 (set fabric.enabled = false or lower the raft port)"
            )),
            Some(derived) => {
                if let Some(addr) = self.fabric.addr
                    && addr.port() != derived.port()
                {
                    p.push(format!(
                        "fabric.addr must use port {} (node.raft_addr's port + {FABRIC_PORT_OFFSET}): peers derive it",
                        derived.port()
                    ));
                }
            }
        }
        if let Some(tls) = &self.fabric.tls {
            p.extend(tls.problems("fabric.tls"));
        }
    }

    fn validate_members(&self, p: &mut Vec<String>) {
        if self.cluster.shards > 1 && self.runtime.dispatch == DispatchMode::Push {
            p.push(
                "runtime.dispatch = \"push\" needs cluster.shards = 1: with several shards only an agent's own node can count its leases over them (set \"pull\" or \"auto\")"
                    .into(),
            );
        }
        if !(1..=MAX_SHARDS).contains(&self.cluster.shards) {
            p.push(format!(
                "cluster.shards must be 1..={MAX_SHARDS} (is {})",
                self.cluster.shards
            ));
        }
        let m = &self.cluster.members;
        let ids: BTreeSet<NodeId> = m.iter().map(|m| m.id).collect();
        if ids.len() != m.len() {
            p.push("cluster.members: node ids must be unique".into());
        }
        if !m.is_empty() && !ids.contains(&self.node.id) && self.cluster.join.is_none() {
            p.push(format!(
                "cluster.members does not list this node (node.id = {})",
                self.node.id
            ));
        }
        if !m.is_empty() && self.cluster.secret.is_none() && self.cluster.secret_file.is_none() {
            p.push("a multi-node cluster needs cluster.secret_file, cluster.secret or GODEL_CLUSTER_SECRET".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_single_node_default() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.node.api_addr.to_string(), "127.0.0.1:7373");
        assert_eq!(c.node.data_dir, PathBuf::from("./data"));
        c.validate().unwrap();
    }

    /// `auto` dispatch is push with one shard and pull with several; push
    /// with several shards is refused, naming the fix.
    #[test]
    fn dispatch_follows_the_shard_count() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.dispatch(), DispatchMode::Push);
        let c = Config::from_toml("[cluster]\nshards = 3\n").unwrap();
        assert_eq!(c.dispatch(), DispatchMode::Pull);
        c.validate().unwrap();
        let c = Config::from_toml("[runtime]\ndispatch = \"pull\"\n").unwrap();
        assert_eq!(c.dispatch(), DispatchMode::Pull);
        let c =
            Config::from_toml("[runtime]\ndispatch = \"push\"\n[cluster]\nshards = 3\n").unwrap();
        let ConfigError::Invalid(p) = c.validate().unwrap_err() else {
            panic!()
        };
        assert!(
            p[0].contains("runtime.dispatch") && p[0].contains("\"pull\""),
            "{p:?}"
        );
    }

    /// Each priority is shed from its share of a limit, critical only at
    /// the limit; bad shares are refused, naming the rule.
    #[test]
    fn shedding_admits_by_priority() {
        use crate::fsm::Priority::*;
        let shed = ShedAt::default();
        let admitted = |p| (0..100).filter(|used| shed.admits(p, *used, 100)).count();
        assert_eq!(
            [Low, Medium, High, Critical].map(admitted),
            [50, 70, 85, 100]
        );
        assert!(!shed.admits(Critical, 20, 20));
        let c = Config::from_toml(
            "[queue.shed_at]
low = 0.8
medium = 0.6
",
        )
        .unwrap();
        let ConfigError::Invalid(p) = c.validate().unwrap_err() else {
            panic!()
        };
        assert!(p[0].contains("queue.shed_at"), "{p:?}");
        let c = Config::from_toml(
            "[queue]
max_unfinished_tasks = 0
",
        )
        .unwrap();
        assert!(c.validate().is_err());
        for (bad, field) in [
            ("retain_finished = \"500ms\"", "queue.retain_finished"),
            ("retain_finished_max = 0", "queue.retain_finished_max"),
            ("retain_dead_letters = \"0s\"", "queue.retain_dead_letters"),
        ] {
            let c = Config::from_toml(&format!("[queue]\n{bad}\n")).unwrap();
            let ConfigError::Invalid(p) = c.validate().unwrap_err() else {
                panic!()
            };
            assert!(p[0].contains(field), "{p:?}");
        }
        // An entry must fit a transport frame with room to spare.
        for (bad, field) in [
            ("[queue]\nbatch_max_bytes = 100", "queue.batch_max_bytes"),
            (
                "[queue]\nbatch_max_bytes = 20000000",
                "queue.batch_max_bytes",
            ),
            ("[api]\nmax_body_bytes = 20000000", "api.max_body_bytes"),
        ] {
            let c = Config::from_toml(bad).unwrap();
            let ConfigError::Invalid(p) = c.validate().unwrap_err() else {
                panic!()
            };
            assert!(p[0].contains(field), "{p:?}");
        }
        Config::from_toml("[queue]\nbatch_max_bytes = 16777216\n[api]\nmax_body_bytes = 16777216")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn prices_fall_back_to_default_and_must_be_sane() {
        let c = Config::from_toml(
            "[prices.m-1]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n\
             [prices.default]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.price_of(Some("m-1")).unwrap().output_per_mtok, 15.0);
        assert_eq!(c.price_of(Some("other")).unwrap().input_per_mtok, 1.0);
        assert_eq!(c.price_of(None).unwrap().input_per_mtok, 1.0);
        assert!(Config::default().price_of(Some("m-1")).is_none());
        let c = Config::from_toml("[prices.m]\ninput_per_mtok = -1.0\noutput_per_mtok = 1.0\n")
            .unwrap();
        let ConfigError::Invalid(p) = c.validate().unwrap_err() else {
            panic!()
        };
        assert!(p[0].contains("prices.\"m\""), "{p:?}");
        assert!(Config::from_toml("[prices.m]\ninput_per_mtok = 1.0\n").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_named() {
        let e = Config::from_toml("[node]\nidd = 3\n").unwrap_err();
        assert!(e.contains("idd"), "{e}");
        let e = Config::from_toml("[raft]\nheartbeat_interval = \"fast\"\n").unwrap_err();
        assert!(
            e.contains("heartbeat_interval") || e.contains("fast"),
            "{e}"
        );
        let c = Config::from_toml("[raft]\nheartbeat_interval = \"20ms\"\n").unwrap();
        assert_eq!(c.raft.heartbeat_interval, Duration::from_millis(20));
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = Config::default();
        c.raft.election_timeout_max = Duration::from_millis(10);
        c.queue.batch_max_commands = 0;
        c.cluster.members = vec![MemberConfig {
            id: 9,
            raft_addr: "x:1".into(),
            api_addr: "x:2".into(),
            region: "r".into(),
        }];
        let ConfigError::Invalid(p) = c.validate().unwrap_err() else {
            panic!()
        };
        assert_eq!(p.len(), 4, "{p:?}");
    }

    #[test]
    fn fabric_defaults_to_the_raft_port_plus_100() {
        let c = Config::from_toml("").unwrap();
        assert!(c.fabric.enabled);
        assert_eq!(
            c.fabric_listen_addr().unwrap().to_string(),
            "127.0.0.1:7574"
        );
        let c = Config::from_toml("[fabric]\naddr = \"0.0.0.0:7574\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.fabric_listen_addr().unwrap().to_string(), "0.0.0.0:7574");
        let c = Config::from_toml("[fabric]\naddr = \"0.0.0.0:9000\"\n").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml("[node]\nraft_addr = \"127.0.0.1:65500\"\n").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml(
            "[node]\nraft_addr = \"127.0.0.1:65500\"\n[fabric]\nenabled = false\n",
        )
        .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn api_tls_settings_are_checked_together() {
        let problems = |text: &str| match Config::from_toml(text).unwrap().validate() {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected invalid, got {other:?}"),
        };
        let p = problems("[api]\ntls_cert = \"/nonexistent/a.crt\"\n");
        assert_eq!(p, ["api.tls_cert and api.tls_key go together"]);
        let p = problems("[api]\ntls_ca = \"/nonexistent/ca.crt\"\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("api.tls_ca needs api.tls_cert"), "{p:?}");
        assert!(p[1].starts_with("api.tls_ca: /nonexistent/ca.crt"), "{p:?}");
    }

    #[test]
    fn fabric_tls_files_must_exist() {
        let c = Config::from_toml(
            "[fabric.tls]\ncert = \"/nonexistent/n.crt\"\nkey = \"/nonexistent/n.key\"\nca = \"/nonexistent/ca.crt\"\n",
        )
        .unwrap();
        let ConfigError::Invalid(p) = c.validate().unwrap_err() else {
            panic!("expected invalid")
        };
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].starts_with("fabric.tls.cert: /nonexistent/n.crt"),
            "{p:?}"
        );
        assert!(
            Config::from_toml("[fabric.tls]\ncert = \"a\"\n").is_err(),
            "key and ca are required with cert"
        );
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        let env = |k: &str| match k {
            "GODEL_NODE_ID" => Some("7".to_string()),
            "GODEL_API_ADDR" => Some("127.0.0.1:9000".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert_eq!(c.node.id, 7);
        assert_eq!(c.node.api_addr.port(), 9000);
        assert!(
            c.apply_env(|k| (k == "GODEL_NODE_ID").then(|| "x".to_string()))
                .is_err()
        );
    }
}
