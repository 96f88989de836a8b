//! The `godel` command line: `serve`, and a client command for each API call.

mod backup;
mod client;
mod events;
mod security;
mod serve;
pub mod text;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use backup::{BackupArgs, BackupCmd, RestoreArgs};
pub use security::{AuditCmd, JwtCmd, KeyCmd, TenantCmd};

pub use client::run_client;
pub use serve::run_serve;

/// Godel: a fault-tolerant control plane for AI coding agents.
#[derive(Debug, Parser)]
#[command(name = "godel", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// API base URL of any node.
    #[arg(
        long,
        global = true,
        env = "GODEL_API",
        default_value = "http://127.0.0.1:7373"
    )]
    pub api: String,
    /// Output format of client commands.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "text")]
    pub output: Output,
    /// API key or JWT to call with (default: the key in ./data/admin.key,
    /// which a node started here with no config writes).
    #[arg(long, global = true, env = "GODEL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// CA certificate (PEM) to trust, besides the system's, for an https
    /// API whose certificate a private CA signed.
    #[arg(long, global = true, env = "GODEL_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// The API's JSON, for scripts.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (no config: one node, data in ./data, API on 127.0.0.1:7373).
    Serve(ServeArgs),
    /// The cluster on one screen: members, nodes, queue, gateways, agents.
    Status,
    /// Tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Worker leases.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Queue depth.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Dead letters.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Gateways (agent runtimes Godel drives).
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Agents (workers bound to a gateway).
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Sessions (one conversation each on a gateway).
    #[command(subcommand)]
    Session(SessionCmd),
    /// The node registry.
    #[command(subcommand)]
    Node(NodeCmd),
    /// API keys (admin).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Tenants, their weights and quotas (admin).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Kill switches: stop dispatch of a tenant's or a capability's work,
    /// or work on a gateway kind or model, at once (operator or admin).
    #[command(subcommand)]
    Switch(SwitchCmd),
    /// Feature flags: turn a flag on for a tenant, a capability, a gateway
    /// kind or model, or a share of the work; attempts hand the flags on
    /// for their task to the gateway (operator or admin).
    #[command(subcommand)]
    Flag(FlagCmd),
    /// Agent roles: the built-in ones and the config's `[roles]`.
    #[command(subcommand)]
    Role(RoleCmd),
    /// Tokens, compute time and cost over a range of days, grouped by
    /// tenant, day, model, gateway or agent (`--csv` for the export).
    Usage(UsageArgs),
    /// Revoked JWTs (admin).
    #[command(subcommand)]
    Jwt(JwtCmd),
    /// The hash-chained audit log (admin); `verify` walks the chain.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// A consistent, checksummed backup of every Raft group (admin):
    /// streamed from any node, `--out FILE`; or copied from a stopped
    /// node's `--data-dir` (unsafe recovery); `verify FILE` checks one.
    Backup(BackupArgs),
    /// Create a fresh node data directory from a backup: `godel serve` on
    /// it starts a one-node cluster holding the backup's state.
    Restore(RestoreArgs),
    /// Tail the cluster's events: `godel events 'task.*' 'gateway.>'`
    /// (`*` matches one segment, `>` the rest; default: everything the
    /// credential may see).
    Events(EventsArgs),
}

/// `godel role ...`
#[derive(Debug, Subcommand)]
pub enum RoleCmd {
    /// The roles, with the capabilities, tools and prompt each gives.
    Ls,
}

/// `godel flag ...`
#[derive(Debug, Subcommand)]
pub enum FlagCmd {
    /// Every flag, on or off.
    Ls,
    /// Set (or replace) a flag.
    Set {
        /// Its name.
        name: String,
        /// Keep it, off.
        #[arg(long)]
        off: bool,
        /// Only this tenant's tasks.
        #[arg(long)]
        tenant: Option<String>,
        /// Only tasks that need this capability.
        #[arg(long)]
        capability: Option<String>,
        /// Only on agents of gateways of this driver kind.
        #[arg(long)]
        gateway_kind: Option<String>,
        /// Only on agents of gateways that declare this model.
        #[arg(long)]
        model: Option<String>,
        /// Only this share of the work, 1 to 100 (by session, else task).
        #[arg(long)]
        percent: Option<u8>,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// Remove a flag.
    Rm {
        /// Its name.
        name: String,
    },
}

/// `godel switch ...`
#[derive(Debug, Subcommand)]
pub enum SwitchCmd {
    /// The switches that are on.
    Ls,
    /// Set (or replace) a switch: matching ready work stops being leased.
    Set {
        /// Its name.
        name: String,
        /// Only this tenant's tasks.
        #[arg(long)]
        tenant: Option<String>,
        /// Only tasks that need this capability.
        #[arg(long)]
        capability: Option<String>,
        /// Only on agents of gateways of this driver kind (`sim`,
        /// `command`, `http`, `openclaw`): other agents may take the work.
        #[arg(long)]
        gateway_kind: Option<String>,
        /// Only on agents of gateways that declare this model.
        #[arg(long)]
        model: Option<String>,
        /// Only this share of the matching tasks, 1 to 100.
        #[arg(long)]
        percent: Option<u8>,
        /// Stop all work (alone).
        #[arg(long, conflicts_with_all = ["tenant", "capability", "gateway_kind", "model", "percent"])]
        all: bool,
        /// Cancel matching leased work too (default: it finishes).
        #[arg(long)]
        cancel_leased: bool,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a switch: held work is ready again.
    Lift {
        /// Its name.
        name: String,
    },
}

/// `godel usage` flags.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this tenant's.
    #[arg(long)]
    pub tenant: Option<String>,
    /// First day (UTC), YYYY-MM-DD (default: 29 days before --to).
    #[arg(long)]
    pub from: Option<String>,
    /// Last day (UTC), included (default: today).
    #[arg(long)]
    pub to: Option<String>,
    /// Comma-separated: tenant, day, model, gateway, agent (default
    /// tenant; empty for one row).
    #[arg(long)]
    pub group_by: Option<String>,
    /// The rows as CSV.
    #[arg(long)]
    pub csv: bool,
}

/// `godel events` flags.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Patterns (`task.*`, `gateway.>`, `node.leader_changed`).
    pub patterns: Vec<String>,
    /// Replay from after this seq first (as far as the node's buffer
    /// holds); with several shards, a position `g0:412,g1:77,...` as the
    /// stream's `hello` and `lagged` give it.
    #[arg(long)]
    pub since: Option<String>,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// `godel agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Register (or update) an agent.
    Add {
        /// Agent id.
        #[arg(long)]
        id: String,
        /// The gateway it runs on.
        #[arg(long)]
        gateway: String,
        /// Capabilities, comma-separated.
        #[arg(long, value_delimiter = ',')]
        caps: Vec<String>,
        /// Role label.
        #[arg(long, default_value = "worker")]
        role: String,
        /// Concurrent tasks.
        #[arg(long, default_value_t = 1)]
        capacity: u32,
    },
    /// List agents with their load.
    Ls,
    /// Show one agent.
    Get {
        /// Agent id.
        id: String,
    },
    /// Load, capacity and queue depth of one agent.
    Status {
        /// Agent id.
        id: String,
    },
    /// Deregister an agent.
    Rm {
        /// Agent id.
        id: String,
    },
}

/// `godel session ...`
#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// List sessions, oldest first.
    #[command(visible_alias = "list")]
    Ls(SessionListArgs),
    /// Show one session.
    Get {
        /// Session id.
        id: u64,
    },
    /// End a live session as `cancelled` (its running attempt is retried).
    Kill {
        /// Session id.
        id: u64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Pause a live session: no task runs in it until it is resumed (one
    /// running now finishes first).
    Pause {
        /// Session id.
        id: u64,
    },
    /// Resume a paused session (where it was, or from its last checkpoint
    /// on another gateway if its own cannot serve it).
    Resume {
        /// Session id.
        id: u64,
    },
    /// Take a checkpoint of a live session now.
    Checkpoint {
        /// Session id.
        id: u64,
        /// A name for the record.
        #[arg(long)]
        name: Option<String>,
    },
    /// Move a live session to another gateway from its last checkpoint
    /// (its next task opens it there).
    Migrate {
        /// Session id.
        id: u64,
        /// The gateway it must go to (default: whichever takes its next task).
        #[arg(long)]
        gateway: Option<String>,
    },
    /// A session's checkpoints, oldest first.
    Checkpoints {
        /// Session id.
        id: u64,
    },
}

/// Filters and pagination for `godel session ls`.
#[derive(Debug, Args)]
pub struct SessionListArgs {
    /// Only sessions on this gateway.
    #[arg(long)]
    pub gateway: Option<String>,
    /// Only sessions in this state (created, initializing, ready, running,
    /// completing, completed, failed, cancelled, timeout, error).
    #[arg(long)]
    pub state: Option<String>,
    /// Only sessions with this session key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only live sessions (`--live false`: only ended ones).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub live: Option<bool>,
    /// Page size.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Cursor from the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
}

/// `godel gateway ...`
#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Register (or update) a gateway.
    Add {
        /// Gateway id.
        #[arg(long)]
        id: String,
        /// Region.
        #[arg(long, default_value = "local")]
        region: String,
        /// Capabilities, comma-separated.
        #[arg(long, value_delimiter = ',')]
        caps: Vec<String>,
        /// Most concurrent sessions.
        #[arg(long, default_value_t = 10)]
        max_sessions: u32,
        /// The model its agents run (kill switches by model match it).
        #[arg(long)]
        model: Option<String>,
        /// The driver: a JSON object with `kind` (sim, command, http, openclaw) and its settings.
        #[arg(long, default_value = r#"{"kind":"sim"}"#)]
        driver: String,
    },
    /// List gateways with health, breaker state and owner node.
    Ls,
    /// Show one gateway.
    Get {
        /// Gateway id.
        id: String,
    },
    /// Deregister a gateway (no agents may be bound to it).
    Rm {
        /// Gateway id.
        id: String,
    },
}

/// `godel node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Registered nodes with region, drain flag and heartbeat age.
    Ls,
    /// Drain a node: not-ready, leadership handed over, no new work.
    Drain {
        /// Node id.
        id: u64,
        /// Even if it empties a region or leaves too few voters.
        #[arg(long)]
        force: bool,
    },
    /// Stop draining a node.
    Undrain {
        /// Node id.
        id: u64,
    },
    /// A drain's progress.
    DrainStatus {
        /// Node id.
        id: u64,
    },
}

/// `godel serve` flags (they override the file and the environment).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, short, env = "GODEL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Node id.
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// HTTP API listen address.
    #[arg(long)]
    pub api_addr: Option<std::net::SocketAddr>,
    /// Node-to-node listen address.
    #[arg(long)]
    pub raft_addr: Option<std::net::SocketAddr>,
    /// Log as JSON lines.
    #[arg(long, env = "GODEL_LOG_JSON")]
    pub log_json: bool,
}

/// `godel task ...`
#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Submit a task.
    Submit {
        /// JSON object payload.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// critical, high, medium or low.
        #[arg(long)]
        priority: Option<String>,
        /// Tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Required capabilities, comma-separated.
        #[arg(long, value_delimiter = ',')]
        caps: Vec<String>,
        /// Session affinity key.
        #[arg(long)]
        session_key: Option<String>,
        /// RFC 3339 start time.
        #[arg(long)]
        scheduled_at: Option<String>,
        /// Attempts before dead letter.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Attempt timeout in ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Idempotency key.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Parent task id.
        #[arg(long)]
        parent_id: Option<u64>,
        /// The region it should run in (its agent's gateway's region).
        #[arg(long)]
        region: Option<String>,
        /// It must run in `--region`: it waits rather than run elsewhere.
        #[arg(long, requires = "region")]
        region_required: bool,
        /// Tasks that must complete first (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        depends_on: Vec<u64>,
        /// What a dependency dead-lettered or cancelled does: cancel (the
        /// default) or block.
        #[arg(long, requires = "depends_on")]
        on_dependency_failure: Option<String>,
        /// It waits for an operator's approval before anything else.
        #[arg(long)]
        requires_approval: bool,
        /// With `--requires-approval`: ms before an undecided request lapses.
        #[arg(long, requires = "requires_approval")]
        approval_expires_in_ms: Option<u64>,
    },
    /// Submit up to 1,000 tasks in one request: a file of JSON lines (or
    /// one JSON array), each task as `POST /api/v1/tasks` takes it; prints
    /// a result per task. Give each an `idempotency_key` to make sending
    /// the file again safe.
    SubmitBatch {
        /// The file (`-`: standard input).
        #[arg(long)]
        file: String,
    },
    /// Show a task.
    Get {
        /// Task id.
        id: u64,
    },
    /// List tasks.
    Ls(ListArgs),
    /// Cancel a task.
    Cancel {
        /// Task id.
        id: u64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        /// Leave its unfinished children alone (by default they are
        /// cancelled too).
        #[arg(long)]
        keep_children: bool,
    },
    /// Make a failed or dead-lettered task ready now.
    Retry {
        /// Task id.
        id: u64,
    },
    /// Approve a task awaiting approval (operator or admin).
    Approve {
        /// Task id.
        id: u64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reject a task awaiting approval: it is cancelled (operator or admin).
    Reject {
        /// Task id.
        id: u64,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
}

/// Filters and pagination for listings.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Status filter.
    #[arg(long)]
    pub status: Option<String>,
    /// Priority filter.
    #[arg(long)]
    pub priority: Option<String>,
    /// Tenant filter.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Page size.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Cursor from the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
}

/// `godel lease ...`
#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// Lease tasks for an agent.
    Acquire {
        /// Agent id.
        #[arg(long)]
        agent: String,
        /// Agent capabilities, comma-separated.
        #[arg(long, value_delimiter = ',')]
        caps: Vec<String>,
        /// Most tasks.
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// Lease length in ms.
        #[arg(long)]
        lease_ms: Option<u64>,
    },
    /// Renew a lease.
    Renew {
        /// Fencing token.
        token: u64,
    },
    /// Complete a leased task.
    Complete {
        /// Fencing token.
        token: u64,
        /// JSON result.
        #[arg(long, default_value = "null")]
        result: String,
    },
    /// Complete and fail up to 1,000 leases in one request: a file of
    /// JSON lines (or one JSON array) of `{"fencing_token", "result"}` or
    /// `{"fencing_token", "error", "retryable"}`; prints a result per lease.
    Report {
        /// The file (`-`: standard input).
        #[arg(long)]
        file: String,
    },
    /// Fail a leased task.
    Fail {
        /// Fencing token.
        token: u64,
        /// Error message.
        #[arg(long)]
        error: String,
        /// Send it straight to the dead-letter queue.
        #[arg(long)]
        no_retry: bool,
    },
}

/// `godel queue ...`
#[derive(Debug, Subcommand)]
pub enum QueueCmd {
    /// Exact depth per priority, status and tenant.
    Depth,
}

/// `godel dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List dead letters.
    Ls(ListArgs),
    /// Export dead letters as JSON lines.
    Export,
    /// Replay dead letters by id or by filter.
    Replay {
        /// Task ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u64>,
        /// Tenant filter.
        #[arg(long)]
        tenant: Option<String>,
        /// Priority filter.
        #[arg(long)]
        priority: Option<String>,
        /// Error text filter.
        #[arg(long)]
        error_contains: Option<String>,
        /// Most to replay.
        #[arg(long)]
        limit: Option<u32>,
    },
}

/// `godel cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Nodes, roles, leader, term, indexes.
    Status,
    /// Add a node.
    Join {
        /// Node id.
        #[arg(long)]
        id: u64,
        /// Its node-to-node address.
        #[arg(long)]
        raft_addr: String,
        /// Its API address.
        #[arg(long)]
        api_addr: String,
        /// Its region.
        #[arg(long, default_value = "local")]
        region: String,
    },
    /// Remove a node.
    Leave {
        /// Node id.
        id: u64,
    },
    /// Hand leadership to a voter.
    Transfer {
        /// Node id.
        to: u64,
    },
    /// Give a queue shard its own placement (`docs/shards.md`).
    PlaceShard {
        /// The shard.
        shard: u32,
        /// `auto`, `every`, `spread` or `regional`.
        placement: String,
        /// With `regional`: the region its voters go to.
        #[arg(long)]
        home: Option<String>,
    },
    /// Put a queue shard back on the cluster's `shard_placement`.
    UnplaceShard {
        /// The shard.
        shard: u32,
    },
}
