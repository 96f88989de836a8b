//! The `command` driver: one local program per attempt, payload on stdin,
//! result on stdout, in its own process group so that a timeout or a cancel
//! kills everything it started.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio_util::sync::CancellationToken;

use super::spec::{CommandSpec, GatewayKind};
use super::{
    BoxFuture, DriverError, GatewayDriver, Health, MAX_RESULT_BYTES, MAX_STDERR_TAIL_BYTES, Result,
    RunOutput, RunRequest,
};

/// How long to wait for a killed program to be reaped before leaving it to
/// tokio's orphan reaper (a process stuck in the kernel can outlive SIGKILL
/// for a while).
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of one read from a program's stdout or stderr, in bytes.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// The `command` driver.
#[derive(Debug)]
pub struct CommandDriver {
    spec: CommandSpec,
}

impl CommandDriver {
    /// A driver running the program `spec` names (assumed validated).
    pub fn new(spec: CommandSpec) -> Self {
        Self { spec }
    }

    fn command(&self, req: &RunRequest) -> Command {
        let s = &self.spec;
        let mut cmd = Command::new(&s.program);
        cmd.args(&s.args).env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(&s.env)
            .env("GODEL_TASK_ID", req.task_id.to_string())
            .env("GODEL_FENCING_TOKEN", req.fencing_token.to_string())
            .env("GODEL_GATEWAY_ID", &req.fence.gateway.0)
            .env("GODEL_GATEWAY_OWNER", req.fence.owner.to_string())
            .env("GODEL_GATEWAY_TOKEN", req.fence.token.to_string());
        if let Some(key) = &req.session_key {
            cmd.env("GODEL_SESSION_KEY", &key.0);
        }
        if let Some(context) = &req.context {
            // A session's earlier turns, carried to this gateway.
            cmd.env("GODEL_SESSION_CONTEXT", &**context);
        }
        if let Some(role) = &req.role {
            // The agent's role: its name, prompt and the tools it may call
            // (absent: any; empty: none).
            cmd.env("GODEL_ROLE", &role.name);
            if let Some(prompt) = &role.prompt {
                cmd.env("GODEL_ROLE_PROMPT", prompt);
            }
            if let Some(tools) = &role.tools {
                cmd.env("GODEL_ALLOWED_TOOLS", tools.join(","));
            }
        }
        if !req.flags.is_empty() {
            // The feature flags on for this task.
            cmd.env("GODEL_FLAGS", req.flags.join(","));
        }
        if let Some(dir) = &s.working_dir {
            cmd.current_dir(dir);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        die_with_this_process(&mut cmd);
        cmd
    }

    async fn attempt(&self, req: RunRequest, cancel: CancellationToken) -> Result<RunOutput> {
        let started = tokio::time::Instant::now();
        let mut command = self.command(&req);
        req.guard.check()?;
        let mut child = command.spawn().map_err(|e| DriverError::Unavailable {
            reason: format!("cannot start `{}`: {e}", self.spec.program),
        })?;
        let mut group = GroupGuard(child.id());
        let outcome = super::bounded(
            req.timeout,
            &cancel,
            communicate(&mut child, Arc::clone(&req.payload)),
        )
        .await;
        match outcome {
            Ok((status, stdout, stderr_tail)) => {
                // The leader is reaped: its id may be reused, so never
                // signal the group from here on.
                group.disarm();
                finish(status, &stdout, &stderr_tail, started)
            }
            Err(e) => {
                group.kill();
                reap(&mut child).await;
                group.disarm();
                Err(e)
            }
        }
    }
}

/// Feeds stdin, collects stdout (bounded) and the tail of stderr, and waits
/// for the exit. Fails early, without waiting, when stdout overflows.
async fn communicate(
    child: &mut Child,
    payload: Arc<str>,
) -> Result<(ExitStatus, Vec<u8>, Vec<u8>)> {
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (_, out, err) = tokio::try_join!(
        feed(stdin, payload),
        read_bounded(stdout, MAX_RESULT_BYTES),
        read_tail(stderr, MAX_STDERR_TAIL_BYTES),
    )?;
    let status = child.wait().await.map_err(|e| DriverError::Unavailable {
        reason: format!("cannot wait for the program: {e}"),
    })?;
    Ok((status, out, err))
}

fn finish(
    status: ExitStatus,
    stdout: &[u8],
    stderr_tail: &[u8],
    started: tokio::time::Instant,
) -> Result<RunOutput> {
    if status.success() {
        return Ok(RunOutput {
            result_json: super::result_json(stdout)?,
            elapsed: started.elapsed(),
        });
    }
    let tail = String::from_utf8_lossy(stderr_tail);
    let tail = tail.trim();
    if status.code() == Some(super::FENCED_EXIT_CODE) {
        return Err(DriverError::Fenced {
            reason: if tail.is_empty() {
                format!("exit code {}", super::FENCED_EXIT_CODE)
            } else {
                tail.to_owned()
            },
        });
    }
    let how = match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status}"),
    };
    Err(DriverError::TaskFailed {
        reason: if tail.is_empty() {
            how
        } else {
            format!("{how}; stderr: {tail}")
        },
        retryable: true,
    })
}

/// Writes the payload and closes stdin. A program that does not read its
/// input is not an error (the write fails with a broken pipe).
async fn feed(stdin: Option<ChildStdin>, payload: Arc<str>) -> Result<()> {
    if let Some(mut stdin) = stdin {
        let _ = stdin.write_all(payload.as_bytes()).await;
        let _ = stdin.shutdown().await;
    }
    Ok(())
}

/// Reads everything, failing as soon as more than `limit` bytes arrive.
async fn read_bounded(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let Some(pipe) = pipe else { return Ok(out) };
    let mut pipe = pipe.take(limit as u64 + 1);
    // A read error ends the output, as EOF would.
    let _ = pipe.read_to_end(&mut out).await;
    if out.len() > limit {
        return Err(DriverError::OutputTooLarge { limit_bytes: limit });
    }
    Ok(out)
}

/// Reads everything, keeping only the last `limit` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Result<Vec<u8>> {
    let mut tail = Vec::new();
    let Some(mut pipe) = pipe else {
        return Ok(tail);
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => tail.extend_from_slice(&chunk[..n]),
        }
        if tail.len() > 2 * limit {
            tail.drain(..tail.len() - limit);
        }
    }
    if tail.len() > limit {
        tail.drain(..tail.len() - limit);
    }
    Ok(tail)
}

/// Waits (bounded) for a killed leader to be reaped.
async fn reap(child: &mut Child) {
    // Belt and braces: the group kill already hit it, unless its id was unknown.
    let _ = child.start_kill();
    if tokio::time::timeout(REAP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pid = child.id(),
            "killed gateway program not reaped within {REAP_TIMEOUT:?}; left to the orphan reaper"
        );
    }
}

/// Kills the attempt's process group if the attempt is dropped before it
/// ends (the future was dropped mid-run).
struct GroupGuard(Option<u32>);

impl GroupGuard {
    /// SIGKILL to every process of the group. Only while the leader is not
    /// reaped, so the group id still belongs to this attempt.
    fn kill(&self) {
        let Some(pgid) = self.0.and_then(|p| libc::pid_t::try_from(p).ok()) else {
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions; a negative id
        // addresses the process group this attempt created with
        // `process_group(0)`, whose leader has not been reaped yet.
        let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if rc != 0 {
            tracing::debug!(pgid, error = %std::io::Error::last_os_error(), "kill process group");
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

impl GatewayDriver for CommandDriver {
    fn kind(&self) -> GatewayKind {
        GatewayKind::Command
    }

    fn run(&self, req: RunRequest, cancel: CancellationToken) -> BoxFuture<'_, Result<RunOutput>> {
        Box::pin(self.attempt(req, cancel))
    }

    fn probe(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            if is_executable(&self.spec.program) {
                Health::Healthy
            } else {
                Health::Unhealthy {
                    reason: format!("`{}` is not an executable program", self.spec.program),
                }
            }
        })
    }
}

/// Whether `program` (a path, or a name looked up in `PATH`) is an
/// executable file.
fn is_executable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return ok(Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| ok(&dir.join(program))))
}

/// Makes the program die (SIGKILL) when the node that started it does, so a
/// node killed with SIGKILL leaves no program running on for a lease that
/// is about to be run elsewhere. Linux only (`PR_SET_PDEATHSIG`). The signal
/// follows the spawning thread, which is a runtime worker living as long as
/// the node; it reaches the program itself, not processes it started.
#[cfg(target_os = "linux")]
pub(crate) fn die_with_this_process(cmd: &mut Command) {
    let node = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (prctl, getppid), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The node may have died between fork and prctl.
            if libc::getppid() as u32 != node {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn die_with_this_process(_: &mut Command) {}
