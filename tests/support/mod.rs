//! A multi-process cluster harness: real `godel serve` processes on
//! 127.0.0.1, each with its own temporary directory (config, data, log).
//!
//! - The binary is the one cargo already built for this test
//!   (`CARGO_BIN_EXE_godel`); the harness never builds anything.
//! - Ports are picked free by binding port 0 and releasing it; a process-wide
//!   set makes sure two nodes of concurrently running tests never get the same
//!   port from this process.
//! - Processes are signalled by PID only: `kill9` is `Child::kill` (SIGKILL)
//!   plus `wait`, `pause`/`resume` run `kill -STOP|-CONT <pid>` (no extra
//!   dependency needed for two signals). Drop kills whatever still runs.
//! - Every wait polls with a deadline ([`wait_until`]); nothing sleeps a fixed
//!   time to wait for a condition.
//! - Each node logs to `node.log` in its directory; when a test panics the
//!   harness prints the tail of every node's log. Set `GODEL_TEST_KEEP=1` to
//!   keep the directories, `GODEL_TEST_LOG` to change the nodes' log filter.
//! - Every node is in region `local`, unless the cluster is started with a
//!   region per node ([`Cluster::start_in_regions`]); a node that joins later
//!   is in `local`.
//!
//! Includers declare it `#[allow(dead_code)] mod support;`: each test or bench
//! target uses a different subset of it.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

mod api;
pub mod certs;
mod prepared;
pub mod work;

pub use api::Api;

/// The binary under test, built by cargo for this integration test.
pub const BIN: &str = env!("CARGO_BIN_EXE_godel");
/// The shared node-to-node secret of every test cluster.
pub const SECRET: &str = "godel-cluster-test-secret-0123456789";
/// Default headers for hand-built HTTP clients (load generators): the
/// admin key as a bearer credential.
pub fn auth_headers() -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {ADMIN_KEY}").parse().expect("valid header"),
    );
    h
}

/// The admin API key every test cluster bootstraps with (`[auth]
/// bootstrap_key_file`), and which [`Api`] sends unless told otherwise.
pub const ADMIN_KEY: &str = "dk_test_T3N0LWFkbWluLWtleS1mb3ItdGhlLWhhcm5lc3MtMDEyMzQ1Njc4OQ";
/// Longest a single HTTP request may take (client side).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Cluster::start` waits for an agreed leader.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(25);
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 120;

/// Ports handed out by this process, so concurrent tests never share one.
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free port on 127.0.0.1 that this process has not handed out before.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        let mut used = PORTS.lock().expect("ports lock");
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free port found in 100 tries");
}

/// A free transport port whose fabric port (the transport port + 100, where
/// `godel serve` listens for the actor fabric) is free too; both reserved.
pub fn free_raft_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        let Some(fabric) = port.checked_add(100) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", fabric)).is_err() {
            continue;
        }
        let mut used = PORTS.lock().expect("ports lock");
        if used.get_or_insert_with(HashSet::new).insert(fabric) {
            return port;
        }
    }
    panic!("no free transport and fabric port pair found in 100 tries");
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TOML string literal.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Moves the keys of a `[cluster]` table in `extra` into `cluster` (the
/// harness's table, which starts with `[cluster]`); returns both.
fn merge_cluster_table(extra: &str, cluster: &str) -> (String, String) {
    let Some(start) = extra.find("[cluster]\n") else {
        return (extra.to_owned(), cluster.to_owned());
    };
    let body = &extra[start + "[cluster]\n".len()..];
    let end = body.find("\n[").map_or(body.len(), |i| i + 1);
    let keys = &body[..end];
    let rest = format!("{}{}", &extra[..start], &body[end..]);
    let merged = cluster.replacen("[cluster]\n", &format!("[cluster]\n{keys}"), 1);
    (rest, merged)
}

/// One `godel serve` process and its directory.
pub struct NodeProc {
    /// Raft node id (index + 1).
    pub id: u64,
    /// HTTP API address.
    pub api_addr: SocketAddr,
    /// Node-to-node transport address (the actor fabric listens on its
    /// port + 100).
    pub raft_addr: SocketAddr,
    dir: Option<tempfile::TempDir>,
    config: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    paused: bool,
    /// Extra config tables for this node (see `Cluster::start_with`).
    extra: String,
    /// Its region label (`local` unless launched with regions).
    region: String,
}

impl NodeProc {
    fn new(id: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("godel-node{id}-"))
            .tempdir()
            .expect("tempdir");
        let config = dir.path().join("node.toml");
        let log = dir.path().join("node.log");
        Self {
            id,
            api_addr: loopback(free_port()),
            raft_addr: loopback(free_raft_port()),
            dir: Some(dir),
            config,
            log,
            child: Mutex::new(None),
            paused: false,
            extra: String::new(),
            region: "local".to_owned(),
        }
    }

    /// The node's region label.
    pub fn region(&self) -> &str {
        &self.region
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir present until drop").path()
    }

    /// Writes this node's config: `[cluster] members` or `join`. Benchmarks
    /// add tables with `GODEL_TEST_EXTRA_TOML` (its `[raft]` replaces ours).
    fn write_config(&self, cluster: &str) {
        let extra = if self.extra.is_empty() {
            std::env::var("GODEL_TEST_EXTRA_TOML").unwrap_or_default()
        } else {
            self.extra.clone()
        };
        // The defaults (`RaftConfig::default`), pinned so a change to them
        // is seen here.
        let raft = if extra.contains("[raft]") {
            String::new()
        } else {
            "[raft]\nheartbeat_interval = \"50ms\"\n\
             election_timeout_min = \"150ms\"\nelection_timeout_max = \"250ms\"\n"
                .to_string()
        };
        // Registry heartbeats would add a log entry a second, which the
        // tests that check "no log entry was written" cannot tell apart.
        let queue = if extra.contains("[queue]") {
            ""
        } else {
            "[queue]\nnode_heartbeat_interval = \"1h\"\nnode_dead_after = \"2h\"\n"
        };
        // Every node bootstraps with the same known admin key; a test that
        // brings its own `[auth]` table gets the key file line added to it.
        let key_file = self.path().join("admin-bootstrap.key");
        std::fs::write(&key_file, ADMIN_KEY).expect("write bootstrap key");
        let key_line = format!(
            "bootstrap_key_file = {}\n",
            toml_str(&key_file.to_string_lossy())
        );
        let (auth, extra) = if extra.contains("[auth]\n") {
            (
                String::new(),
                extra.replacen("[auth]\n", &format!("[auth]\n{key_line}"), 1),
            )
        } else {
            (format!("[auth]\n{key_line}"), extra)
        };
        // A `[cluster]` table in `extra` (say `shards = 3`) is merged into
        // the harness's own, which holds the members or the join address.
        let (extra, cluster) = merge_cluster_table(&extra, cluster);
        let text = format!(
            "# written by tests/support for node {id}\n\
             [node]\nid = {id}\nregion = {region}\ndata_dir = {data}\n\
             api_addr = \"{api}\"\nraft_addr = \"{raft_addr}\"\n\n\
             {raft}\n{queue}\n{auth}\n{extra}\n{cluster}",
            id = self.id,
            region = toml_str(&self.region),
            data = toml_str(&self.path().join("data").to_string_lossy()),
            api = self.api_addr,
            raft_addr = self.raft_addr,
        );
        std::fs::write(&self.config, text).expect("write node config");
    }

    fn spawn(&mut self) {
        let mut child = self.child.lock().expect("child lock");
        assert!(child.is_none(), "node {} is already running", self.id);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        writeln!(log, "===== harness: starting node {} =====", self.id).expect("write log");
        let filter = std::env::var("GODEL_TEST_LOG")
            .unwrap_or_else(|_| "info,openraft=warn,sled=warn".to_string());
        // GODEL_NODE_BIN runs another build's nodes under the same harness
        // (benchmarks comparing two builds); the tests never set it.
        let bin = std::env::var("GODEL_NODE_BIN").unwrap_or_else(|_| BIN.to_owned());
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        for (k, _) in std::env::vars() {
            if k.starts_with("GODEL_") {
                cmd.env_remove(k);
            }
        }
        *child = Some(cmd.spawn().expect("spawn godel serve"));
        self.paused = false;
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .expect("child lock")
            .as_ref()
            .map(Child::id)
    }

    /// Waits (bounded) for the process to exit on its own; its exit status.
    pub fn wait_exit(&self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(c) = self.child.lock().expect("child lock").as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The node's data directory (`data_dir` in its config).
    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    /// The node's log file (every start appends to it).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Deletes the node's data directory (the process must be stopped).
    pub fn wipe_data(&self) {
        let data = self.path().join("data");
        if data.exists() {
            std::fs::remove_dir_all(&data).expect("wipe data dir");
        }
    }

    /// Whether the process was started and not killed by the harness.
    pub fn is_running(&self) -> bool {
        self.child.lock().expect("child lock").is_some()
    }

    /// Fails if the process exited on its own.
    fn check_alive(&self) -> Result<()> {
        let mut child = self.child.lock().expect("child lock");
        if let Some(c) = child.as_mut()
            && let Some(status) = c.try_wait().context("try_wait")?
        {
            bail!("node {} exited unexpectedly with {status}", self.id);
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.lock().expect("child lock").take() {
            // SIGKILL also ends a stopped process.
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("node is running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed: {status}");
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)));
            let _ = f.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Polls `f` until it returns `Ok`, or panics at `deadline` with `what` and
/// the last reason `f` gave.
pub async fn wait_until<T>(
    what: &str,
    deadline: Instant,
    mut f: impl AsyncFnMut() -> Result<T>,
) -> T {
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}; last: {last:#}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `now + d`.
pub fn deadline(d: Duration) -> Instant {
    Instant::now() + d
}

/// Runs a test body with an overall time bound.
pub async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(v) => v,
        Err(_) => panic!("test exceeded its overall bound of {limit:?}"),
    }
}

/// A cluster of `godel serve` processes, killed on drop.
pub struct Cluster {
    nodes: Vec<NodeProc>,
    started: Instant,
    /// The CA (PEM) of the nodes' API certificates, when the API serves TLS.
    api_ca: Option<String>,
}

impl Cluster {
    /// Starts `n` voters listed in each other's `[[cluster.members]]` and
    /// waits until they agree on a leader.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, "").await
    }

    /// Like `start`, with extra config tables for every node (a `[queue]`
    /// or `[raft]` table replaces the harness's own).
    pub async fn start_with(n: usize, extra: &str) -> Cluster {
        Self::launch(&vec![extra.to_owned(); n]).up().await
    }

    /// Like `start_with`, for `extra` that serves the API over TLS with
    /// certificates `api_ca` (PEM) signed: the harness speaks https.
    pub async fn start_with_api_tls(n: usize, extra: &str, api_ca: &str) -> Cluster {
        let mut c = Self::launch(&vec![extra.to_owned(); n]);
        c.api_ca = Some(api_ca.to_owned());
        c.up().await
    }

    /// Waits until the launched nodes agree on a leader and all of them are
    /// in the node registry.
    async fn up(self) -> Cluster {
        let c = self;
        let n = c.nodes.len();
        let leader = c.leader_within(START_TIMEOUT).await;
        // Up means every node has also recorded itself in the node registry,
        // and the leader the cluster's shard count, so no start-up write
        // lands in the middle of a test.
        // One call per poll: a test may give the admin key a small rate
        // limit, which two calls a poll would keep empty.
        let api = c.api();
        wait_until(
            "every node in the registry",
            deadline(START_TIMEOUT),
            async || {
                let nodes = api.get(leader, "/api/v1/nodes").await?;
                let count = nodes.body["items"].as_array().map_or(0, Vec::len);
                if count == n {
                    Ok(())
                } else {
                    Err(anyhow!("{count} of {n} nodes registered"))
                }
            },
        )
        .await;
        wait_until(
            "the shard count recorded",
            deadline(START_TIMEOUT),
            async || match api.cluster(leader).await?["shard_count"].as_u64() {
                Some(n) if n > 0 => Ok(()),
                _ => Err(anyhow!("shard count not recorded yet")),
            },
        )
        .await;
        // And every node knows a leader for each queue shard, so a test's
        // first write is not refused (503, "no leader known") while a
        // shard's first election runs late on a loaded machine. Not an
        // assertion: a test that starts shards that cannot elect goes on
        // after the wait and meets its own checks.
        let shards_led = deadline(START_TIMEOUT);
        for i in 0..n {
            while Instant::now() < shards_led {
                let led = match api.cluster(i).await {
                    Ok(v) => v["shards"]
                        .as_array()
                        .is_some_and(|s| s.iter().all(|g| g["leader"].as_u64().is_some())),
                    Err(_) => false,
                };
                if led {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        eprintln!("[harness] {n}-node cluster up in {:?}", c.started.elapsed());
        c
    }

    /// Like `start_with`, one node per entry of `regions`, in that region
    /// (`[node] region` and its `[[cluster.members]]` entry).
    pub async fn start_in_regions(regions: &[&str], extra: &str) -> Cluster {
        Self::launch_in_regions(&vec![extra.to_owned(); regions.len()], regions)
            .up()
            .await
    }

    /// Spawns one voter per entry of `extras` (that node's extra config
    /// tables), listed in each other's `[[cluster.members]]`; does not wait.
    pub fn launch(extras: &[String]) -> Cluster {
        Self::launch_in_regions(extras, &vec!["local"; extras.len()])
    }

    /// [`Cluster::launch`] with node `k` in region `regions[k]`.
    pub fn launch_in_regions(extras: &[String], regions: &[&str]) -> Cluster {
        assert_eq!(extras.len(), regions.len(), "one region per node");
        let mut nodes: Vec<NodeProc> = (1..=extras.len() as u64).map(NodeProc::new).collect();
        for ((p, extra), region) in nodes.iter_mut().zip(extras).zip(regions) {
            p.extra = extra.clone();
            p.region = (*region).to_owned();
        }
        let mut members = format!("[cluster]\nsecret = {}\n", toml_str(SECRET));
        for p in &nodes {
            members.push_str(&format!(
                "\n[[cluster.members]]\nid = {}\nraft_addr = \"{}\"\napi_addr = \"{}\"\nregion = {}\n",
                p.id,
                p.raft_addr,
                p.api_addr,
                toml_str(&p.region)
            ));
        }
        let mut c = Cluster {
            nodes,
            started: Instant::now(),
            api_ca: None,
        };
        for p in &mut c.nodes {
            p.write_config(&members);
            p.spawn();
        }
        c
    }

    /// Starts one more node with `[cluster] join = <api addr of node seed>`,
    /// no member list and node `seed`'s extra tables; returns its index.
    /// Does not wait.
    pub fn start_joining(&mut self, seed: usize) -> usize {
        let extra = self.nodes[seed].extra.clone();
        self.start_joining_with(seed, &extra)
    }

    /// [`Cluster::start_joining`] with this node's own extra tables.
    pub fn start_joining_with(&mut self, seed: usize, extra: &str) -> usize {
        let id = self.nodes.iter().map(|p| p.id).max().unwrap_or(0) + 1;
        let mut p = NodeProc::new(id);
        p.extra = extra.to_owned();
        p.write_config(&format!(
            "[cluster]\nsecret = {}\njoin = \"{}\"\n",
            toml_str(SECRET),
            self.nodes[seed].api_addr
        ));
        p.spawn();
        self.nodes.push(p);
        self.nodes.len() - 1
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NodeProc {
        &self.nodes[i]
    }

    /// Index of the node with Raft id `id`.
    pub fn index_of(&self, id: u64) -> usize {
        self.nodes
            .iter()
            .position(|p| p.id == id)
            .unwrap_or_else(|| panic!("no node with id {id}"))
    }

    /// A client for every node's API (dead ones just fail to connect).
    pub fn api(&self) -> Api {
        Api::new(
            self.nodes.iter().map(|p| p.api_addr).collect(),
            self.api_ca.as_deref(),
        )
    }

    /// Indices of nodes that run and are not paused.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running() && !self.nodes[i].paused)
            .collect()
    }

    /// Fails if a node the harness did not kill has exited.
    pub fn check_alive(&self) -> Result<()> {
        self.nodes.iter().try_for_each(NodeProc::check_alive)
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill();
        eprintln!("[harness] SIGKILL node {}", self.nodes[i].id);
    }

    /// SIGTERM node `i` and wait (bounded by `grace`) for it to exit; a
    /// node still running then is SIGKILLed. Whether it exited on its own.
    pub fn terminate(&mut self, i: usize, grace: Duration) -> bool {
        self.nodes[i].signal("-TERM");
        let clean = self.nodes[i].wait_exit(grace).is_some();
        self.nodes[i].kill();
        eprintln!(
            "[harness] SIGTERM node {}: {}",
            self.nodes[i].id,
            if clean {
                "exited"
            } else {
                "SIGKILLed after the grace"
            }
        );
        clean
    }

    /// Whether node `i` is stopped by SIGSTOP.
    pub fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].paused
    }

    /// SIGSTOP node `i`.
    pub fn pause(&mut self, i: usize) {
        self.nodes[i].signal("-STOP");
        self.nodes[i].paused = true;
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        self.nodes[i].signal("-CONT");
        self.nodes[i].paused = false;
    }

    /// Starts node `i` again with the same config and data directory.
    /// Rewrites node `i`'s config file through `f` (takes effect at its
    /// next start: stop it first).
    pub fn edit_config(&self, i: usize, f: impl FnOnce(String) -> String) {
        let path = &self.nodes[i].config;
        let text = std::fs::read_to_string(path).expect("read node config");
        std::fs::write(path, f(text)).expect("write node config");
    }

    /// Restarts node `i` (which must be stopped) with its config file.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].spawn();
        eprintln!("[harness] restarted node {}", self.nodes[i].id);
    }

    /// Waits (default bound) until every live node names the same leader,
    /// which is live and says it leads; returns its index.
    pub async fn leader(&self) -> usize {
        self.leader_within(Duration::from_secs(20)).await
    }

    /// [`Cluster::leader`] with an explicit bound.
    pub async fn leader_within(&self, limit: Duration) -> usize {
        let api = self.api();
        let live = self.live();
        wait_until("an agreed leader", deadline(limit), async || {
            self.check_alive()?;
            self.agreed_leader(&api, &live).await
        })
        .await
    }

    async fn agreed_leader(&self, api: &Api, live: &[usize]) -> Result<usize> {
        let mut leader = None;
        for &i in live {
            let s = api.cluster(i).await?;
            let l = s["leader"]
                .as_u64()
                .ok_or_else(|| anyhow!("node {} knows no leader", self.nodes[i].id))?;
            if leader.is_some_and(|x| x != l) {
                bail!("nodes disagree on the leader: {leader:?} vs {l}");
            }
            leader = Some(l);
        }
        let id = leader.ok_or_else(|| anyhow!("no live node"))?;
        let i = self.index_of(id);
        if !live.contains(&i) {
            bail!("leader {id} is not live");
        }
        let s = api.cluster(i).await?;
        if s["state"] != "leader" {
            bail!("node {id} is named leader but is {}", s["state"]);
        }
        Ok(i)
    }

    /// Waits until node `i` has applied at least what the leader has applied.
    pub async fn wait_caught_up(&self, i: usize, limit: Duration) {
        let api = self.api();
        wait_until(
            &format!("node {} to catch up", self.nodes[i].id),
            deadline(limit),
            async || {
                self.check_alive()?;
                let l = self.agreed_leader(&api, &self.live()).await?;
                let target = api.cluster(l).await?["applied_index"].as_u64();
                let mine = api.cluster(i).await?["applied_index"].as_u64();
                if mine.is_some() && mine >= target {
                    Ok(())
                } else {
                    bail!("applied {mine:?} < leader's {target:?}")
                }
            },
        )
        .await
    }

    fn dump_logs(&self) {
        for p in &self.nodes {
            eprintln!(
                "\n===== node {} ({}) log tail: {} =====\n{}",
                p.id,
                p.api_addr,
                p.log.display(),
                p.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.nodes {
            p.kill();
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os("GODEL_TEST_KEEP").is_some() {
            for p in &mut self.nodes {
                if let Some(d) = p.dir.take() {
                    eprintln!("[harness] kept {}", d.keep().display());
                }
            }
        }
    }
}

/// A submit body.
pub fn task_body(tenant: &str, priority: &str, n: usize, key: Option<&str>) -> Value {
    let mut b = json!({ "tenant": tenant, "priority": priority, "payload": { "n": n } });
    if let Some(k) = key {
        b["idempotency_key"] = json!(k);
    }
    b
}

/// An `http` gateway on 127.0.0.1 that answers every attempt `{"ok": true}`
/// and records each attempt's `traceparent` header (empty when none): its
/// `/run` URL and the record.
pub async fn traceparent_gateway() -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let record = std::sync::Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/run",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let record = std::sync::Arc::clone(&record);
            async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                record.lock().expect("record lock").push(tp);
                axum::Json(json!({"ok": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/run"), seen)
}
