//! The faults: each takes the cluster, does its damage for `hold`, undoes
//! it, and waits (bounded) until the node it hit is back in step, so the
//! next fault starts from a whole cluster. Processes are signalled by PID
//! through the harness; partitions go through the nodes' fault-injection
//! endpoints; nothing leaves 127.0.0.1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::drill::{CorruptMode, FaultSpec, Kind, Target};
use crate::fleet::now_ms;
use crate::support::{Api, Cluster};

/// Longest a node may take to catch up after a fault is cleared.
pub const CATCH_UP: Duration = Duration::from_secs(60);
/// Grace for a SIGTERMed node to exit before it is SIGKILLed.
const TERM_GRACE: Duration = Duration::from_secs(15);
/// How long `add-shard` waits for every node to route over the new count
/// once the last node is back.
const ROUTE_WAIT: Duration = Duration::from_secs(60);
/// Pause between two lease probes through a partitioned minority.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// One injected fault, as it happened.
#[derive(Debug)]
pub struct Record {
    /// What was done.
    pub label: String,
    /// What it hit: `node 3`, or `region eu (nodes 1, 2, 3)`.
    pub hit: String,
    /// That node's process id when it was hit.
    pub pid: Option<u32>,
    /// When it started (ms since the epoch).
    pub injected_ms: u64,
    /// When it was undone.
    pub cleared_ms: u64,
    /// What the node did (for damaged storage), or why it was skipped.
    pub note: String,
    /// Skipped (not root for disk-full).
    pub skipped: bool,
    /// When the fault was fully in place (ms since the epoch): recovery
    /// counts only tasks whose submission was sent after it, which only the
    /// majority can have committed.
    pub in_place_ms: u64,
    /// The drill's bound on recovery, if any (a must-pass).
    pub recover_within: Option<Duration>,
}

/// What the partition probes saw.
#[derive(Debug, Default)]
pub struct Probes {
    /// Lease requests sent through a cut-off minority.
    pub sent: usize,
    /// Leases they were granted (must be 0).
    pub granted: usize,
    /// HTTP statuses answered, with counts.
    pub statuses: std::collections::BTreeMap<String, usize>,
}

impl Probes {
    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: Probes) {
        self.sent += other.sent;
        self.granted += other.granted;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
    }
}

/// One lease request as `agent` through node `i`, which is cut off from
/// the majority and must grant none; counted in `probes`.
pub async fn probe_once(api: &Api, i: usize, agent: &str, probes: &mut Probes) {
    let body = json!({ "agent_id": agent, "capabilities": [], "max": 5, "lease_ms": 5000 });
    probes.sent += 1;
    let status = match api.post(i, "/api/v1/leases", &body).await {
        Ok(r) => {
            let n = r.body["leases"].as_array().map_or(0, Vec::len);
            if r.status == 200 && n > 0 {
                eprintln!("[chaos] MINORITY GRANTED {n} leases: {:?}", r.body);
            }
            probes.granted += n;
            r.status.to_string()
        }
        Err(_) => "no answer".to_owned(),
    };
    *probes.statuses.entry(status).or_default() += 1;
}

/// Mount points made for disk-full faults; unmounted (lazily) on drop,
/// which the runner arranges to happen after the nodes are dead.
#[derive(Default)]
pub struct Mounts(pub Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in &self.0 {
            let ok = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status()
                .is_ok_and(|s| s.success());
            eprintln!(
                "[chaos] umount {}: {}",
                m.display(),
                if ok { "ok" } else { "FAILED" }
            );
        }
    }
}

/// Runs a drill's faults in order.
pub struct Injector<'a> {
    pub c: &'a mut Cluster,
    pub api: Api,
    pub rng: u64,
    pub mounts: &'a mut Mounts,
    pub records: Vec<Record>,
    pub probes: Probes,
    /// The process id of the node last picked, for its record.
    pub hit_pid: Option<u32>,
}

impl Injector<'_> {
    /// Runs `spec` `times` times.
    pub async fn run(&mut self, spec: &FaultSpec) -> Result<()> {
        for round in 0..spec.times {
            eprintln!("[chaos] fault {:?} {}/{}", spec.kind, round + 1, spec.times);
            let before = self.records.len();
            match spec.kind {
                Kind::Kill => self.kill(spec).await?,
                Kind::Pause => self.pause(spec).await?,
                Kind::Partition => self.partition(spec).await?,
                Kind::RollingRestart => self.rolling(spec).await?,
                Kind::CorruptLog => self.corrupt(spec).await?,
                Kind::DiskFull => self.disk_full(spec).await?,
                Kind::RegionPartition => self.region_partition(spec).await?,
                Kind::RegionLoss => self.region_loss(spec).await?,
                Kind::ShardLeaderKill => self.shard_leader_kill(spec).await?,
                Kind::AddShard => self.add_shard(spec).await?,
            }
            for r in &mut self.records[before..] {
                r.recover_within = spec.recover_within;
            }
            tokio::time::sleep(spec.gap).await;
        }
        Ok(())
    }

    pub fn draw(&mut self, n: usize) -> usize {
        // xorshift64*: reproducible from the printed seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }

    pub async fn pick(&mut self, t: Target) -> usize {
        let leader = self.c.leader().await;
        let live = self.c.live();
        let i = match t {
            Target::Leader => leader,
            Target::Random => live[self.draw(live.len())],
            Target::Follower => {
                let f: Vec<usize> = live.into_iter().filter(|i| *i != leader).collect();
                f[self.draw(f.len())]
            }
        };
        self.hit_pid = self.c.node(i).pid();
        i
    }

    /// Records a fault on node `i`, injected and in place at `at`.
    pub fn record(&mut self, label: String, i: usize, at: (u64, u64), note: String) {
        let hit = format!("node {}", self.c.node(i).id);
        self.record_hit(label, hit, self.hit_pid, at, note);
    }

    /// Records a fault that hit `hit` (process `pid`, if one), injected and
    /// in place at `at`, cleared now.
    pub fn record_hit(
        &mut self,
        label: String,
        hit: String,
        pid: Option<u32>,
        at: (u64, u64),
        note: String,
    ) {
        self.records.push(Record {
            label,
            hit,
            pid,
            injected_ms: at.0,
            cleared_ms: now_ms(),
            note,
            skipped: false,
            in_place_ms: at.1,
            recover_within: None,
        });
    }

    async fn kill(&mut self, spec: &FaultSpec) -> Result<()> {
        let i = self.pick(spec.target).await;
        self.c.kill9(i);
        let at = now_ms();
        tokio::time::sleep(spec.hold).await;
        self.c.restart(i);
        let label = format!("kill -9 {:?}", spec.target);
        self.record(label, i, (at, at), String::new());
        self.c.wait_caught_up(i, CATCH_UP).await;
        Ok(())
    }

    /// SIGKILLs at once the nodes that lead queue shards, up to a minority
    /// of the cluster (those leading the most shards first, the meta
    /// group's leader last), restarts them after `hold`.
    async fn shard_leader_kill(&mut self, spec: &FaultSpec) -> Result<()> {
        let meta = self.c.leader().await;
        let live = self.c.live();
        let view = self.api.cluster(live[0]).await?;
        let mut led: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
        for s in view["shards"]
            .as_array()
            .context("GET /cluster without shards")?
        {
            if s["shard"].as_u64() > Some(0)
                && let Some(l) = s["leader"].as_u64()
            {
                *led.entry(l).or_default() += 1;
            }
        }
        if led.is_empty() {
            bail!("no queue shard has a leader (is the drill's `shards` above 1?)");
        }
        let meta_id = self.c.node(meta).id;
        let mut order: Vec<(u64, usize)> = led.into_iter().collect();
        order.sort_by_key(|(id, n)| (*id == meta_id, std::cmp::Reverse(*n), *id));
        let most = (self.c.len() - 1) / 2;
        let hit: Vec<usize> = order
            .iter()
            .take(most)
            .map(|(id, _)| self.c.index_of(*id))
            .collect();
        let shards: usize = order.iter().take(most).map(|(_, n)| n).sum();
        let at = now_ms();
        for i in &hit {
            self.c.kill9(*i);
        }
        let in_place = now_ms();
        tokio::time::sleep(spec.hold).await;
        for i in &hit {
            self.c.restart(*i);
        }
        let ids: Vec<String> = hit.iter().map(|i| self.c.node(*i).id.to_string()).collect();
        let label = format!(
            "kill -9 the leaders of {shards} shards at once, down {:?}",
            spec.hold
        );
        let note = format!("killed after {} ms", in_place - at);
        let hit_text = format!("nodes {}", ids.join(", "));
        self.record_hit(label, hit_text, None, (at, in_place), note);
        for i in hit {
            self.c.wait_caught_up(i, CATCH_UP).await;
        }
        Ok(())
    }

    /// A rolling restart that adds a queue shard: each node (the meta
    /// leader last) is killed with SIGKILL and comes back after `hold` with
    /// `cluster.shards` one higher; then every node must route new tasks
    /// over the new count within [`ROUTE_WAIT`].
    async fn add_shard(&mut self, spec: &FaultSpec) -> Result<()> {
        let leader = self.c.leader().await;
        let from = self.api.cluster(leader).await?["shard_count"]
            .as_u64()
            .context("GET /cluster without shard_count")?;
        if from < 2 {
            bail!(
                "add-shard needs a cluster created with two shards or more (the drill's `shards`)"
            );
        }
        let to = from + 1;
        let order = self.followers_then(leader);
        for i in order {
            self.hit_pid = self.c.node(i).pid();
            let at = now_ms();
            self.c.kill9(i);
            let down = now_ms();
            self.c.edit_config(i, |t| {
                t.replacen(&format!("shards = {from}"), &format!("shards = {to}"), 1)
            });
            tokio::time::sleep(spec.hold).await;
            self.c.restart(i);
            self.record(
                format!("add-shard: kill -9, back with {to} shards"),
                i,
                (at, down),
                String::new(),
            );
            self.c.wait_caught_up(i, CATCH_UP).await;
            self.c.leader().await;
        }
        let since = now_ms();
        let until = std::time::Instant::now() + ROUTE_WAIT;
        loop {
            let mut routed = 0;
            for i in self.c.live() {
                let view = self.api.cluster(i).await?;
                let last = view["routes"].as_array().and_then(|r| r.last()).cloned();
                if last.and_then(|v| v.as_u64()) == Some(to) {
                    routed += 1;
                }
            }
            if routed == self.c.live().len() {
                break;
            }
            if std::time::Instant::now() > until {
                bail!(
                    "{to} shards not routed on every node within {ROUTE_WAIT:?} of the last restart"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "[chaos] shards {from} -> {to}: routed on every node {} ms after the last restart",
            now_ms() - since
        );
        Ok(())
    }

    async fn pause(&mut self, spec: &FaultSpec) -> Result<()> {
        let i = self.pick(spec.target).await;
        self.c.pause(i);
        let at = now_ms();
        tokio::time::sleep(spec.hold).await;
        self.c.resume(i);
        let label = format!("SIGSTOP {:?} for {:?}", spec.target, spec.hold);
        self.record(label, i, (at, at), String::new());
        self.c.wait_caught_up(i, CATCH_UP).await;
        Ok(())
    }

    /// Cuts node `i` off from every other node (both directions), probes
    /// leases through it for `hold`, heals.
    async fn partition(&mut self, spec: &FaultSpec) -> Result<()> {
        let i = self.pick(spec.target).await;
        let me = self.c.node(i).id;
        let others: Vec<u64> = (0..self.c.len())
            .filter(|j| *j != i)
            .map(|j| self.c.node(j).id)
            .collect();
        let at = now_ms();
        // Whole once the node is told: it neither sends to nor answers a
        // peer it blocks.
        self.set_blocked(i, &others).await?;
        let in_place = now_ms();
        for j in self.c.live().into_iter().filter(|j| *j != i) {
            self.set_blocked(j, &[me]).await?;
        }
        let until = tokio::time::Instant::now() + spec.hold;
        while tokio::time::Instant::now() < until {
            self.probe_lease(i).await;
            tokio::time::sleep(PROBE_EVERY).await;
        }
        for j in self.c.live() {
            let r = self
                .api
                .post(j, "/api/v1/admin/faults/heal", &json!({}))
                .await?;
            if r.status != 200 {
                bail!("heal on node index {j}: {r:?}");
            }
        }
        let label = format!("partition {:?} away for {:?}", spec.target, spec.hold);
        self.record(label, i, (at, in_place), String::new());
        self.c.wait_caught_up(i, CATCH_UP).await;
        Ok(())
    }

    pub async fn set_blocked(&self, i: usize, peers: &[u64]) -> Result<()> {
        let r = self
            .api
            .post(
                i,
                "/api/v1/admin/faults/partition",
                &json!({ "peers": peers }),
            )
            .await?;
        if r.status != 200 || r.body["blocked"] != json!(peers) {
            bail!("partition on node index {i}: {r:?}");
        }
        Ok(())
    }

    /// One lease request through the cut-off node `i`: it must grant none.
    async fn probe_lease(&mut self, i: usize) {
        let agent = format!("chaos-probe-{}", self.probes.sent);
        probe_once(&self.api, i, &agent, &mut self.probes).await;
    }

    /// The running nodes other than `leader`, then `leader`: the order of
    /// the rolling faults.
    fn followers_then(&self, leader: usize) -> Vec<usize> {
        (0..self.c.len())
            .filter(|i| *i != leader && self.c.node(*i).is_running())
            .chain([leader])
            .collect()
    }

    /// SIGTERM each node in turn (followers first), restart it after
    /// `hold`, wait until it caught up.
    async fn rolling(&mut self, spec: &FaultSpec) -> Result<()> {
        let leader = self.c.leader().await;
        let order = self.followers_then(leader);
        for i in order {
            self.hit_pid = self.c.node(i).pid();
            let at = now_ms();
            let clean = self.c.terminate(i, TERM_GRACE);
            let down = now_ms();
            tokio::time::sleep(spec.hold).await;
            self.c.restart(i);
            let note = if clean { "" } else { "did not exit on SIGTERM" };
            self.record(
                "rolling restart (SIGTERM)".into(),
                i,
                (at, down),
                note.into(),
            );
            self.c.wait_caught_up(i, CATCH_UP).await;
            self.c.leader().await;
        }
        Ok(())
    }
}

/// The node's sled directory.
pub fn raft_dir(data: &Path) -> PathBuf {
    data.join("raft")
}

/// Whether this process may mount a tmpfs.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Damages the last Raft log entry of the (stopped) node whose sled
/// directory is `dir`; what was done.
pub fn damage_log(dir: &Path, mode: CorruptMode) -> Result<String> {
    if mode == CorruptMode::TornFile {
        let file = dir.join("db");
        let len = std::fs::metadata(&file)?.len();
        let cut = len.min(4096);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)?
            .set_len(len - cut)?;
        return Ok(format!(
            "cut the last {cut} of {len} bytes of sled's data file"
        ));
    }
    let db = open_sled(dir)?;
    let logs = db.open_tree("logs")?;
    let (key, value) = logs.last()?.context("the log is empty")?;
    let index = u64::from_be_bytes(key.as_ref().try_into().context("log key")?);
    let bad = match mode {
        CorruptMode::TruncateEntry => value[..value.len() / 2].to_vec(),
        _ => vec![0xFF; value.len()],
    };
    logs.insert(key, bad)?;
    db.flush()?;
    Ok(format!(
        "{mode:?} on log entry {index} ({} bytes)",
        value.len()
    ))
}

/// Opens a stopped node's sled database, retrying while the killed
/// process's lock is released.
fn open_sled(dir: &Path) -> Result<sled::Db> {
    let mut last = None;
    for _ in 0..50 {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.expect("tried at least once").into())
}
