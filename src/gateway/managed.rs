//! Managed gateways: the owning node runs the gateway's process itself
//! (`managed` in its spec, [`ManagedSpec`]). [`ManagedProcess`] starts it,
//! starts it again with backoff when it exits (1 s, doubling, at most
//! 30 s), gives up after `max_retries` exits in a row of runs shorter than
//! a minute, and stops it (SIGTERM to its process group, SIGKILL after
//! 5 s) when dropped: the gateway actor holds it, so it stops when the
//! gateway leaves the node (drain, a move, the node's shutdown). The
//! process also dies with the node (`PR_SET_PDEATHSIG`), so a node killed
//! with SIGKILL leaves none behind for the new owner to collide with. Its
//! output goes to the node's log, a line at a time.

use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::spec::ManagedSpec;
use crate::fsm::{GatewayId, ManagedState, ManagedStatus};

/// A run at least this long resets the count of exits in a row.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// First pause before starting again; it doubles per exit in a row.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause before starting again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a stopped process has after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest output line logged (the rest is cut).
const MAX_LINE: usize = 2048;

/// A gateway process this node runs; stopped when dropped.
pub struct ManagedProcess {
    status: Arc<Mutex<Local>>,
    _stop: DropGuard,
}

/// The process as the supervisor sees it.
#[derive(Clone, Debug, Default)]
struct Local {
    status: ManagedStatus,
    /// Counts the runs started: a probe answered during run `n` says run
    /// `n` answers.
    run: u64,
}

impl ManagedProcess {
    /// Starts supervising `spec`'s process for `gateway`.
    pub fn start(gateway: GatewayId, spec: ManagedSpec) -> Self {
        let status = Arc::new(Mutex::new(Local::default()));
        let stop = CancellationToken::new();
        tokio::spawn(supervise(gateway, spec, Arc::clone(&status), stop.clone()));
        ManagedProcess {
            status,
            _stop: stop.drop_guard(),
        }
    }

    /// The process's status now (`Running` while it runs: whether it
    /// answers is the probe's to say), and which run it is.
    pub fn status(&self) -> (ManagedStatus, u64) {
        let l = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        (l.status.clone(), l.run)
    }
}

fn set(status: &Mutex<Local>, edit: impl FnOnce(&mut Local)) {
    edit(&mut status.lock().unwrap_or_else(PoisonError::into_inner));
}

async fn supervise(
    gateway: GatewayId,
    spec: ManagedSpec,
    status: Arc<Mutex<Local>>,
    stop: CancellationToken,
) {
    // One process per gateway on this node at a time: a new supervisor
    // (the gateway actor restarted) waits for the last one to finish
    // stopping its process, which may still be in its grace period.
    let _turn = tokio::select! {
        turn = turn_of(&gateway).lock_owned() => turn,
        () = stop.cancelled() => return,
    };
    let mut in_a_row: u32 = 0;
    loop {
        set(&status, |l| {
            l.status.state = ManagedState::Starting;
            l.status.pid = None;
        });
        let started = Instant::now();
        let ended = match spawn(&gateway, &spec) {
            Err(e) => format!("cannot start {:?}: {e}", spec.command.first()),
            Ok(mut child) => {
                let pid = child.id();
                set(&status, |l| {
                    l.run += 1;
                    l.status.state = ManagedState::Running;
                    l.status.pid = pid;
                });
                tracing::info!(%gateway, pid, "managed gateway process started");
                tokio::select! {
                    exit = child.wait() => {
                        // What it started may live on (and hold its port):
                        // the rest of its process group goes with it.
                        kill_group(pid, libc::SIGKILL);
                        match exit {
                            Ok(s) => s.to_string(),
                            Err(e) => format!("cannot wait for it: {e}"),
                        }
                    }
                    () = stop.cancelled() => {
                        terminate(&gateway, &mut child).await;
                        return;
                    }
                }
            }
        };
        if started.elapsed() >= STABLE_RUN {
            in_a_row = 0;
        }
        in_a_row += 1;
        tracing::warn!(%gateway, ended = %ended, in_a_row, "managed gateway process ended");
        let give_up = in_a_row > spec.max_retries;
        set(&status, |l| {
            l.status.pid = None;
            l.status.last_exit = Some(ended.clone());
            l.status.state = if give_up {
                ManagedState::Failed
            } else {
                ManagedState::Backoff
            };
        });
        if give_up {
            tracing::error!(%gateway, max_retries = spec.max_retries, "managed gateway process keeps exiting; not started again until the gateway is placed again");
            return;
        }
        let pause = FIRST_BACKOFF
            .saturating_mul(1 << (in_a_row - 1).min(5))
            .min(MAX_BACKOFF);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
        set(&status, |l| l.status.restarts += 1);
    }
}

fn spawn(gateway: &GatewayId, spec: &ManagedSpec) -> std::io::Result<Child> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(&spec.env);
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    super::command::die_with_this_process(&mut cmd);
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(gateway.clone(), "stdout", out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(gateway.clone(), "stderr", err));
    }
    Ok(child)
}

async fn log_lines(gateway: GatewayId, stream: &'static str, from: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = crate::fsm::truncate(&line, MAX_LINE);
        tracing::info!(%gateway, stream, "managed gateway: {line}");
    }
}

/// The lock a gateway's supervisor holds while it runs (see `supervise`).
fn turn_of(gateway: &GatewayId) -> Arc<tokio::sync::Mutex<()>> {
    static TURNS: Mutex<std::collections::BTreeMap<GatewayId, Arc<tokio::sync::Mutex<()>>>> =
        Mutex::new(std::collections::BTreeMap::new());
    let mut turns = TURNS.lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(turns.entry(gateway.clone()).or_default())
}

/// Sends `signal` to the process group the child `pid` leads.
fn kill_group(pid: Option<u32>, signal: i32) {
    let Some(pid) = pid else {
        return;
    };
    // SAFETY: kill(2) on the process group this node made for the child
    // (`process_group(0)`: its id is the child's pid).
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

/// SIGTERM to the process group, SIGKILL after [`STOP_GRACE`].
async fn terminate(gateway: &GatewayId, child: &mut Child) {
    let pid = child.id();
    kill_group(pid, libc::SIGTERM);
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }
    // Whatever it started goes too.
    kill_group(pid, libc::SIGKILL);
    tracing::info!(%gateway, pid, "managed gateway process stopped");
}
