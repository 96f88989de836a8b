//! `godel backup` (streamed from any node over the API, or copied from a
//! stopped node's data directory), `godel backup verify` and `godel
//! restore`. See `crate::backup` for the format and what a restore makes.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use clap::{Args, Subcommand};
use serde_json::json;

use super::{Output, ServeArgs};
use crate::backup::{self, BackupError, PartialFile, Through, Verified};
use crate::raft::NodeInfo;

/// How long a download waits for the next bytes before it gives up.
const DOWNLOAD_STALL: Duration = Duration::from_secs(120);
/// Pieces of a download queued for the checker and the file.
const DOWNLOAD_QUEUE: usize = 8;

/// `godel backup` flags.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    /// `verify FILE`: check a backup offline.
    #[command(subcommand)]
    pub command: Option<BackupCmd>,
    /// The file to write (never replaced: it must not exist).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Copy a stopped node's data directory instead of calling a node
    /// (unsafe recovery: docs/recovery.md).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// With --data-dir: stop at the commit index the node knew, leaving
    /// out the entries after it (default: its whole log).
    #[arg(long, requires = "data_dir")]
    pub committed_only: bool,
}

/// `godel backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Check every frame and checksum of a backup file, then decode every
    /// group's state as a restore would and check it against its section
    /// (no node needed).
    Verify {
        /// The backup.
        file: PathBuf,
    },
}

/// `godel restore` flags: the backup, and the new node's config (as for
/// `godel serve`: file, then `GODEL_*` environment, then flags).
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup.
    pub file: PathBuf,
    /// The new node's TOML config file.
    #[arg(long, short, env = "GODEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// The new node's id.
    #[arg(long)]
    pub node_id: Option<u64>,
    /// The data directory to create (missing or empty).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The new node's HTTP API address.
    #[arg(long)]
    pub api_addr: Option<std::net::SocketAddr>,
    /// The new node's node-to-node address.
    #[arg(long)]
    pub raft_addr: Option<std::net::SocketAddr>,
}

/// `godel backup ...`; the exit code.
pub async fn backup(
    api: &str,
    key: Option<String>,
    ca_cert: Option<&Path>,
    output: Output,
    args: BackupArgs,
) -> anyhow::Result<i32> {
    let outcome = match (args.command, args.out, args.data_dir) {
        (Some(BackupCmd::Verify { file }), _, _) => {
            let path = file.clone();
            blocking(move || backup::verify_file_deep(&path))
                .await
                .map(|v| (file, v))
        }
        (None, Some(out), Some(dir)) => {
            let through = if args.committed_only {
                Through::Committed
            } else {
                Through::LogEnd
            };
            offline(dir, out, through).await
        }
        (None, Some(out), None) => {
            let http = super::client::http_client(ca_cert)?;
            download(&http, api, key, &out).await.map(|v| (out, v))
        }
        (None, None, _) => anyhow::bail!("give --out FILE, or `backup verify FILE`"),
    };
    match outcome {
        Ok((file, v)) => {
            print_verified(output, &file, &v);
            Ok(0)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(1)
        }
    }
}

/// Runs blocking backup work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> backup::Result<T> + Send + 'static,
) -> backup::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Interrupted(format!("worker thread: {e}")))?
}

/// Copies a stopped node's store into `out`, then reads it back.
async fn offline(
    dir: PathBuf,
    out: PathBuf,
    through: Through,
) -> backup::Result<(PathBuf, Verified)> {
    blocking(move || {
        // The store's temporary copy goes beside the output.
        let scratch = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let (header, groups) = backup::offline_backup(&dir, through, &scratch)?;
        backup::write_file(&out, &header, &groups)?;
        let verified = backup::verify_file(&out)?;
        Ok((out, verified))
    })
    .await
}

/// Streams `GET /api/v1/admin/backup` into a temporary file next to
/// `out`, checking every checksum as the bytes arrive, and renames it to
/// `out` only once the trailer verified. Anything else leaves no file.
async fn download(
    http: &reqwest::Client,
    api: &str,
    key: Option<String>,
    out: &Path,
) -> backup::Result<Verified> {
    let mut partial = PartialFile::create(out)?;
    let url = format!("{}/api/v1/admin/backup", api.trim_end_matches('/'));
    let mut req = http.get(&url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let refused = |why: String| BackupError::Refused(format!("{why}; no file written"));
    let mut resp = req
        .send()
        .await
        .map_err(|e| refused(format!("cannot reach {url}: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let code = body["error"]["code"].as_str().unwrap_or("error");
        let msg = body["error"]["message"].as_str().unwrap_or("");
        return Err(refused(format!("{code} ({status}): {msg}")));
    }
    let file = partial
        .file()
        .try_clone()
        .map_err(BackupError::io("duplicate the file handle"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(DOWNLOAD_QUEUE);
    let checker = tokio::task::spawn_blocking(move || {
        let mut tee = Tee {
            rx,
            pending: Bytes::new(),
            out: BufWriter::new(file),
        };
        let verified = backup::verify(&mut tee)?;
        tee.out
            .flush()
            .map_err(BackupError::io("write the backup file"))?;
        Ok::<_, BackupError>(verified)
    });
    let mut failed = None;
    loop {
        match tokio::time::timeout(DOWNLOAD_STALL, resp.chunk()).await {
            Err(_) => failed = Some(format!("no data for {DOWNLOAD_STALL:?}")),
            Ok(Err(e)) => failed = Some(format!("the download broke off: {e}")),
            Ok(Ok(None)) => {}
            Ok(Ok(Some(piece))) => {
                if tx.send(piece).await.is_ok() {
                    continue;
                }
                // The checker stopped: its error says why.
            }
        }
        break;
    }
    drop(tx);
    let checked = checker
        .await
        .map_err(|e| BackupError::Interrupted(format!("checker thread: {e}")))?;
    match (failed, checked) {
        (None, Ok(verified)) => {
            partial.commit()?;
            Ok(verified)
        }
        (Some(why), Err(e)) => Err(refused(format!("{why} ({e})"))),
        (Some(why), Ok(_)) => Err(refused(why)),
        (None, Err(e)) => Err(refused(e.to_string())),
    }
}

/// Reads the download's pieces and writes each to the file as it is read:
/// the checker sees exactly the bytes the file gets.
struct Tee {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    pending: Bytes,
    out: BufWriter<std::fs::File>,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.is_empty() {
            match self.rx.blocking_recv() {
                Some(piece) => self.pending = piece,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        let piece = self.pending.split_to(n);
        self.out.write_all(&piece).map_err(|e| {
            BackupError::Io {
                what: "write the backup file".into(),
                source: e,
            }
            .into_io()
        })?;
        buf[..n].copy_from_slice(&piece);
        Ok(n)
    }
}

fn print_verified(output: Output, file: &Path, v: &Verified) {
    if output == Output::Json {
        let value = json!({ "file": file, "backup": v });
        println!("{value:#}");
        return;
    }
    println!(
        "backup {}: verified, {} bytes, sha256 {}",
        file.display(),
        v.bytes,
        v.sha256
    );
    let c = &v.header.cluster;
    println!(
        "  made {} by godel {} ({} source{}), format {}",
        v.header.created_at,
        v.header.godel_version,
        c.source,
        c.node.map_or(String::new(), |n| format!(", node {n}")),
        v.header.format
    );
    for s in &v.sections {
        let (m, sum) = (&s.meta, &s.meta.summary);
        println!(
            "  group {} ({}): log index {} (term {}), {} state bytes",
            m.group, m.name, m.applied.index, m.applied.leader_id.term, s.state_bytes
        );
        println!(
            "    {} tasks, {} dead letters, {} gateways, {} agents; audit seq {}, head {}",
            sum.tasks,
            sum.dead_letters,
            sum.gateways,
            sum.agents,
            sum.audit_last_seq,
            sum.audit_head
        );
    }
}

/// `godel restore FILE`; the exit code.
pub async fn restore(output: Output, args: RestoreArgs) -> anyhow::Result<i32> {
    let serve = ServeArgs {
        config: args.config.clone(),
        node_id: args.node_id,
        data_dir: args.data_dir,
        api_addr: args.api_addr,
        raft_addr: args.raft_addr,
        log_json: false,
    };
    let config = super::serve::load_config(&serve).context("the new node's config")?;
    let r = backup::Restore {
        file: args.file.clone(),
        data_dir: config.node.data_dir.clone(),
        node: config.node.id,
        info: NodeInfo {
            raft_addr: config.node.raft_addr.to_string(),
            api_addr: config.node.api_addr.to_string(),
            region: config.node.region.clone(),
        },
        shards: config.cluster.shards,
    };
    let api_addr = r.info.api_addr.clone();
    let report = match blocking(move || backup::restore_into(&r)).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!(
                "error: cannot restore {}: {e}; nothing was created",
                args.file.display()
            );
            return Ok(1);
        }
    };
    if output == Output::Json {
        println!("{:#}", json!(report));
        return Ok(0);
    }
    let s = &report.summary;
    println!(
        "restored {} into {} for node {}: group {} at log index {} (term {}); {} tasks, {} dead \
         letters, {} gateways, {} agents, audit seq {}",
        args.file.display(),
        report.data_dir.display(),
        report.node,
        report.group,
        report.applied.index,
        report.applied.leader_id.term,
        s.tasks,
        s.dead_letters,
        s.gateways,
        s.agents,
        s.audit_last_seq
    );
    for (group, applied, s) in report.groups.iter().skip(1) {
        println!(
            "  and shard group {group} at log index {} (term {}); {} tasks, {} dead letters",
            applied.index, applied.leader_id.term, s.tasks, s.dead_letters
        );
    }
    let config = args
        .config
        .map_or(String::new(), |c| format!(" --config {}", c.display()));
    println!(
        "next: `godel serve{config}` starts a one-node cluster with this state; add nodes with \
         `[cluster] join = \"{api_addr}\"` (each with a fresh data directory)"
    );
    Ok(0)
}
