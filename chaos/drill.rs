//! A drill file: `chaos/drills/<name>.toml`, one per drill. What load to
//! drive, which faults to inject in which order, and the bounds on waiting.
//!
//! ```toml
//! description = "kill -9 the leader 12 times"
//! tier = "full"       # full (default; `all` runs these) | ci (run when no drill is named)
//! shape = "one-region"  # one-region (default): `nodes` nodes in region `local`;
//!                     # regions-3x3: 9 nodes, 1-3 in eu, 4-6 in us, 7-9 in ap
//! nodes = 3           # one-region only: cluster size (default 3)
//! shards = 5          # queue shards (`cluster.shards`, default 1;
//!                     # `GODEL_CHAOS_SHARDS` overrides it)
//! rate = 30           # task submissions per second, round robin over the nodes
//! batch = 10          # tasks per request: `POST /tasks:batch` of that many
//!                     # (default 1: one `POST /tasks` each)
//! warmup = "4s"       # load before the first fault
//! tail = "3s"         # load after the last fault is cleared
//! quiesce = "120s"    # longest wait for every acknowledged task to end (default 120 s)
//! seed = 7            # for `target = "random"` (default: from the clock, printed)
//!
//! [[fault]]
//! kind = "kill"       # kill | pause | partition | rolling-restart | corrupt-log | disk-full
//!                     # | region-partition | region-loss (regions-3x3 only)
//!                     # | shard-leader-kill, add-shard (with shards; `target` is ignored)
//! target = "leader"   # leader | follower | random (default follower); for region
//!                     # faults: the leader's region | another region | any region
//! times = 12          # repetitions (default 1)
//! hold = "1s"         # how long the fault lasts (node down, paused, cut off, disk full)
//! gap = "3s"          # wait after clearing it before the next injection (default 0)
//! recover_within = "2s"  # a verdict requirement: the majority dispatches a task
//!                     # submitted after the injection within this (default: none)
//! ```
//!
//! `corrupt-log` takes `mode` (`truncate-entry`, `garbage-entry`, `torn-file`);
//! `disk-full` takes `size_mib` (the tmpfs size, default 64) and
//! `headroom_kib` (free space left after filling it, default 64).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// A parsed drill file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drill {
    /// The file name without `.toml`.
    #[serde(skip)]
    pub name: String,
    /// One line for the listing and the verdict.
    pub description: String,
    /// Which runs include it.
    #[serde(default)]
    pub tier: Tier,
    /// The cluster's nodes and regions.
    #[serde(default)]
    pub shape: Shape,
    /// Cluster size (one-region only; default 3).
    nodes: Option<usize>,
    /// Queue shards (`cluster.shards`; default 1).
    pub shards: Option<u32>,
    /// Submissions per second.
    pub rate: u32,
    /// Tasks per request (`POST /tasks:batch`; default 1, `POST /tasks`).
    #[serde(default = "one")]
    pub batch: u32,
    /// Load before the first fault.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// Load after the last fault.
    #[serde(with = "humantime_serde")]
    pub tail: Duration,
    /// Longest wait for quiescence.
    #[serde(with = "humantime_serde", default = "quiesce")]
    pub quiesce: Duration,
    /// Seed for random targets.
    pub seed: Option<u64>,
    /// The fault schedule, in order.
    #[serde(rename = "fault", default)]
    pub faults: Vec<FaultSpec>,
}

/// Which runs include a drill.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// `all`, or by name.
    #[default]
    Full,
    /// The CI tier: run when no drill is named (so by `cargo test`), or as
    /// `ci`; short enough for CI.
    Ci,
}

/// The cluster a drill runs on.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// `nodes` nodes, all in region `local`.
    #[default]
    OneRegion,
    /// Nine nodes in three regions of three, as `cluster-config/regions-3x3`:
    /// nodes 1-3 in `eu`, 4-6 in `us`, 7-9 in `ap`.
    #[serde(rename = "regions-3x3")]
    Regions3x3,
}

/// The regions of [`Shape::Regions3x3`], three nodes each, in node order.
pub const REGIONS_3X3: [&str; 3] = ["eu", "us", "ap"];

fn quiesce() -> Duration {
    Duration::from_secs(120)
}

fn one() -> u32 {
    1
}

/// One line of the schedule.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What to do.
    pub kind: Kind,
    /// To which node.
    #[serde(default)]
    pub target: Target,
    /// Repetitions.
    #[serde(default = "one")]
    pub times: u32,
    /// How long each lasts.
    #[serde(with = "humantime_serde")]
    pub hold: Duration,
    /// Wait after clearing one before the next.
    #[serde(with = "humantime_serde", default)]
    pub gap: Duration,
    /// Longest the majority may take to dispatch again (a must-pass).
    #[serde(with = "humantime_serde", default)]
    pub recover_within: Option<Duration>,
    /// `corrupt-log` only.
    pub mode: Option<CorruptMode>,
    /// `disk-full` only: tmpfs size.
    pub size_mib: Option<u64>,
    /// `disk-full` only: free space left.
    pub headroom_kib: Option<u64>,
}

/// Fault kinds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// SIGKILL, restart after `hold`.
    Kill,
    /// SIGSTOP for `hold`, then SIGCONT.
    Pause,
    /// Cut the target off from the others' transport for `hold`.
    Partition,
    /// SIGTERM each node in turn, restart it after `hold`, wait until it
    /// caught up; `target` is ignored.
    RollingRestart,
    /// SIGKILL, damage the last Raft log entry, restart.
    CorruptLog,
    /// SIGKILL, restart on a nearly full tmpfs, free it after `hold`.
    DiskFull,
    /// Cut every node of one region off from every node of the others (both
    /// directions) for `hold`, probing leases through the cut-off region.
    RegionPartition,
    /// SIGKILL every node of one region at once, restart them after `hold`.
    RegionLoss,
    /// SIGKILL, at once, the nodes leading queue shards (as many as may
    /// die while a majority lives, the meta group's leader last in line),
    /// restart them after `hold`.
    ShardLeaderKill,
    /// Add a queue shard (`docs/shards.md`): SIGKILL each node in turn
    /// (the meta leader last), restart it after `hold` with
    /// `cluster.shards` one higher, wait until it caught up; then wait
    /// until every node routes new tasks over the new count. `target` is
    /// ignored.
    AddShard,
}

impl Kind {
    /// Whether the fault hits a whole region.
    pub fn is_regional(self) -> bool {
        matches!(self, Kind::RegionPartition | Kind::RegionLoss)
    }
}

/// Which node a fault hits.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The current leader.
    Leader,
    /// A follower (the lowest index that is not the leader).
    #[default]
    Follower,
    /// Any node, drawn from the drill's seed.
    Random,
}

/// How `corrupt-log` damages the log.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CorruptMode {
    /// The last entry's stored bytes cut in half (through sled).
    TruncateEntry,
    /// The last entry's stored bytes overwritten with 0xFF (through sled).
    GarbageEntry,
    /// The last 4 KiB of sled's data file cut off (a torn write).
    TornFile,
}

/// The drills directory.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("chaos/drills")
}

/// Every drill file, sorted by name.
pub fn all() -> Result<Vec<Drill>> {
    let mut drills = Vec::new();
    for entry in std::fs::read_dir(dir()).context("reading chaos/drills")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            drills.push(load(&path)?);
        }
    }
    drills.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(drills)
}

fn load(path: &Path) -> Result<Drill> {
    let text = std::fs::read_to_string(path)?;
    let mut d: Drill = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    d.name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .context("drill file name")?
        .to_owned();
    d.validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(d)
}

impl Drill {
    /// The region of each node, in node order.
    pub fn regions(&self) -> Vec<&'static str> {
        match self.shape {
            Shape::OneRegion => vec!["local"; self.nodes.unwrap_or(3)],
            Shape::Regions3x3 => REGIONS_3X3.iter().flat_map(|r| [*r; 3]).collect(),
        }
    }

    fn validate(&self) -> Result<()> {
        match (self.shape, self.nodes) {
            (Shape::OneRegion, Some(n)) if n < 3 => {
                bail!("nodes must be at least 3 (a majority must survive one fault)")
            }
            (Shape::Regions3x3, Some(_)) => bail!("`nodes` is for shape one-region only"),
            _ => {}
        }
        if self.rate == 0 {
            bail!("rate must be at least 1");
        }
        if !(1..=1000).contains(&self.batch) || self.batch > self.rate {
            bail!("batch must be 1..=1000 and at most the rate");
        }
        for f in &self.faults {
            if (f.kind == Kind::CorruptLog) != f.mode.is_some() {
                bail!("`mode` is required for corrupt-log and only for it");
            }
            if f.kind != Kind::DiskFull && (f.size_mib.is_some() || f.headroom_kib.is_some()) {
                bail!("`size_mib` and `headroom_kib` are for disk-full only");
            }
            if f.times == 0 {
                bail!("times must be at least 1");
            }
            if f.kind.is_regional() && self.shape != Shape::Regions3x3 {
                bail!("{:?} needs shape = \"regions-3x3\"", f.kind);
            }
        }
        Ok(())
    }
}
