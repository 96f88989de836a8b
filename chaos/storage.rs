//! Storage faults: a damaged last log entry, and a full disk. Both start by
//! SIGKILLing the node, change what is on its disk, and restart it; the node
//! must then refuse to start or come back in step with the others (the
//! replica check at the end compares what it serves). A node that refuses
//! is replaced the way an operator would: removed from the membership, and a
//! fresh node with a new id joins in its place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::drill::FaultSpec;
use crate::fleet::now_ms;
use crate::inject::{Injector, Record, damage_log, is_root, raft_dir};
use crate::support::Api;

/// Longest a node restarted on damaged storage is watched: it must exit
/// (refuse) or catch up (repair) within it.
const WATCH: Duration = Duration::from_secs(30);
/// A node that caught up must still run this long later.
const STILL_UP: Duration = Duration::from_secs(3);
/// Longest a node may take to catch up once its disk has room again.
const AFTER_SPACE: Duration = Duration::from_secs(15);

/// What a node did on damaged storage.
enum Outcome {
    Refused(String),
    Repaired,
}

impl Injector<'_> {
    /// SIGKILL, damage the last log entry, restart; refuse or repair.
    pub async fn corrupt(&mut self, spec: &FaultSpec) -> Result<()> {
        let mode = spec.mode.context("corrupt-log needs a mode")?;
        let i = self.pick(spec.target).await;
        self.c.kill9(i);
        let at = now_ms();
        let dir = raft_dir(&self.c.node(i).data_dir());
        let what = tokio::task::spawn_blocking(move || damage_log(&dir, mode)).await??;
        eprintln!("[chaos] {what}");
        tokio::time::sleep(spec.hold).await;
        self.c.restart(i);
        let note = match self.watch(i).await? {
            Outcome::Repaired => format!("{what}; node started and caught up"),
            Outcome::Refused(why) => {
                self.c.kill9(i);
                let new = self.replace(i).await?;
                format!("{what}; node refused to start ({why}); replaced by node {new}")
            }
        };
        self.record(format!("corrupt log ({mode:?})"), i, (at, at), note);
        Ok(())
    }

    /// Waits until node `i` exits or catches up with the leader.
    async fn watch(&mut self, i: usize) -> Result<Outcome> {
        let until = tokio::time::Instant::now() + WATCH;
        let api = self.c.api();
        while tokio::time::Instant::now() < until {
            if let Some(status) = self.c.node(i).wait_exit(Duration::from_millis(200)) {
                let why = last_error(&self.c.node(i).log_tail(400));
                return Ok(Outcome::Refused(format!("{status}: {why}")));
            }
            if caught_up(&api, i).await {
                if let Some(status) = self.c.node(i).wait_exit(STILL_UP) {
                    let why = last_error(&self.c.node(i).log_tail(400));
                    return Ok(Outcome::Refused(format!(
                        "after catching up, {status}: {why}"
                    )));
                }
                return Ok(Outcome::Repaired);
            }
        }
        bail!(
            "node {} neither refused nor caught up within {WATCH:?}",
            self.c.node(i).id
        )
    }

    /// Removes node `i` (stopped) from the membership and starts a fresh
    /// node in its place; the new node's id.
    async fn replace(&mut self, i: usize) -> Result<u64> {
        let leader = self.c.leader().await;
        let id = self.c.node(i).id;
        let until = crate::support::deadline(Duration::from_secs(30));
        let r = self
            .api
            .post_retrying(leader, "/api/v1/cluster/leave", &json!({ "id": id }), until)
            .await;
        if r.status != 200 {
            bail!("removing node {id}: {r:?}");
        }
        let j = self.c.start_joining(leader);
        self.api = self.c.api();
        self.c.wait_caught_up(j, Duration::from_secs(60)).await;
        Ok(self.c.node(j).id)
    }

    /// SIGKILL, move the node's data onto a nearly full tmpfs, restart;
    /// after `hold` free the space and check it comes back in step.
    pub async fn disk_full(&mut self, spec: &FaultSpec) -> Result<()> {
        if !is_root() || Command::new("mount").arg("--version").output().is_err() {
            eprintln!("[chaos] disk-full needs root and mount(8) to make a tmpfs; SKIPPED");
            self.records.push(Record {
                label: "disk full".into(),
                hit: "no node".into(),
                pid: None,
                injected_ms: now_ms(),
                cleared_ms: now_ms(),
                note: "needs root and mount(8) to mount a small tmpfs; not run".into(),
                skipped: true,
                in_place_ms: now_ms(),
                recover_within: None,
            });
            return Ok(());
        }
        let i = self.pick(spec.target).await;
        let data = self.c.node(i).data_dir();
        let size = spec.size_mib.unwrap_or(64);
        let headroom = spec.headroom_kib.unwrap_or(64) * 1024;
        // Onto the tmpfs first (with room), then fill it while it runs.
        self.c.kill9(i);
        self.mounts.0.push(data.clone());
        let d = data.clone();
        tokio::task::spawn_blocking(move || move_to_tmpfs(&d, size)).await??;
        self.c.restart(i);
        self.c.wait_caught_up(i, Duration::from_secs(60)).await;
        let d = data.clone();
        let filler = tokio::task::spawn_blocking(move || fill(&d, headroom)).await??;
        let at = now_ms();
        let exited = self.c.node(i).wait_exit(spec.hold);
        let enospc = count(&self.c.node(i).log_tail(100_000), "No space left");
        let free = free_kib(&data);
        std::fs::remove_file(&filler)?;
        let api = self.c.api();
        let note = match exited {
            Some(status) => {
                let why = last_error(&self.c.node(i).log_tail(400));
                self.c.kill9(i);
                self.c.restart(i);
                format!("node exited ({status}: {why}); restarted once space was freed")
            }
            None if wait_caught_up(&api, i, AFTER_SPACE).await => {
                "node kept running and caught up once space was freed".to_owned()
            }
            None => {
                let log = self.c.node(i).log_tail(100_000);
                let first_enospc = log.lines().find(|l| l.contains("No space left"));
                let why = first_enospc
                    .map_or_else(|| last_error(&log), |l| l.chars().take(240).collect());
                self.c.kill9(i);
                self.c.restart(i);
                format!(
                    "node kept running but had not caught up {AFTER_SPACE:?} after space was \
                     freed ({why}); restarted"
                )
            }
        };
        let note = format!(
            "{size} MiB tmpfs filled to {} KiB free, {free} KiB free at the end; \
             {enospc} log lines with ENOSPC; {note}",
            headroom / 1024
        );
        self.record("disk full".into(), i, (at, at), note);
        self.c.wait_caught_up(i, Duration::from_secs(60)).await;
        Ok(())
    }
}

/// Whether node `i` has applied what the leader it names has applied.
async fn caught_up(api: &Api, i: usize) -> bool {
    let Ok(me) = api.cluster(i).await else {
        return false;
    };
    let Some(leader) = me["leader"].as_u64() else {
        return false;
    };
    let mine = me["applied_index"].as_u64();
    for j in 0..api.len() {
        if let Ok(s) = api.cluster(j).await
            && s["state"] == "leader"
            && s["node_id"].as_u64() == Some(leader)
        {
            return mine.is_some() && mine >= s["applied_index"].as_u64();
        }
    }
    false
}

async fn wait_caught_up(api: &Api, i: usize, limit: Duration) -> bool {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if caught_up(api, i).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Moves `data` (its node stopped) onto a fresh tmpfs of `size_mib`.
fn move_to_tmpfs(data: &Path, size_mib: u64) -> Result<()> {
    let before = data.with_extension("before-full");
    std::fs::rename(data, &before)?;
    std::fs::create_dir(data)?;
    let size = format!("size={size_mib}m");
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
        .arg(data))?;
    run(Command::new("cp").arg("-a").arg(before.join(".")).arg(data))
}

/// Fills the tmpfs at `data` until `headroom` bytes are left; the filler.
fn fill(data: &Path, headroom: u64) -> Result<PathBuf> {
    let filler = data.join("filler");
    let mut f = std::fs::File::create(&filler)?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    while f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    drop(f);
    let keep = written.saturating_sub(headroom);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)?
        .set_len(keep)?;
    eprintln!("[chaos] {} filled: {keep} filler bytes", data.display());
    Ok(filler)
}

/// Free space under `dir` in KiB, as df(1) reports it.
fn free_kib(dir: &Path) -> String {
    Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).map(|l| l.trim().to_owned()))
        .unwrap_or_else(|| "?".into())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The last error line of a log, shortened.
fn last_error(log: &str) -> String {
    let line = log
        .lines()
        .rev()
        .find(|l| {
            ["ERROR", "Error", "panic", "godel serve:", "No space"]
                .iter()
                .any(|k| l.contains(k))
        })
        .unwrap_or("no error logged");
    line.chars().take(480).collect()
}
