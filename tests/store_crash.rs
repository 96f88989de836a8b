//! Fsync before ack, checked the hard way: a child process appends to the log
//! and prints each index once `append`'s callback has fired; the parent
//! kills it with SIGKILL mid-stream, reopens the store and requires every
//! acknowledged entry, with no hole. (A `kill -9` cannot test power loss;
//! it does catch acknowledging before sled's flush, which CRATES.md measured
//! losing writes.)

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use godel::fsm::{Batch, Command as FsmCommand, Request, SubmitTask, Tenant};
use godel::raft::TypeConfig;
use godel::store::Store;
use openraft::storage::RaftLogStorageExt;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};

/// Set only in the child: where its store lives.
const CHILD_DIR: &str = "GODEL_STORE_CRASH_CHILD_DIR";
/// Acknowledgements the parent waits for before each kill, one per round.
const KILL_AFTER: [u64; 3] = [50, 200, 500];
/// Longest a round may take.
const ROUND_DEADLINE: Duration = Duration::from_secs(60);

fn entry(index: u64) -> Entry<TypeConfig> {
    let submit = SubmitTask {
        tenant: Tenant::from("crash"),
        payload: format!("{{\"i\":{index},\"pad\":\"{}\"}}", "x".repeat(512)),
        ..SubmitTask::default()
    };
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request::Batch(Batch::unaudited(
            index,
            index,
            vec![FsmCommand::Submit(submit)],
        ))),
    }
}

/// The child: appends forever, printing `acked N` after each acknowledgement.
/// A no-op in a normal test run.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut log, _sm) = Store::open(Path::new(&dir)).unwrap();
        for index in 1.. {
            log.blocking_append([entry(index)]).await.unwrap();
            println!("acked {index}"); // stdout is line-buffered: one write per line
        }
    });
}

/// Runs one child until it has acknowledged `kill_after` entries, kills it,
/// and returns the highest index it acknowledged.
fn run_and_kill(dir: &Path, kill_after: u64) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let started = Instant::now();
    let mut acked = 0;
    let mut killed = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("acked ") {
            acked = n.parse().unwrap();
        }
        if !killed && (acked >= kill_after || started.elapsed() > ROUND_DEADLINE) {
            child.kill().unwrap(); // SIGKILL; keep reading what it printed before
            killed = true;
        }
    }
    if !killed {
        child.kill().ok();
    }
    child.wait().unwrap();
    acked
}

#[tokio::test]
async fn acknowledged_appends_survive_kill_9() {
    if std::env::var_os(CHILD_DIR).is_some() {
        return;
    }
    for kill_after in KILL_AFTER {
        let dir = tempfile::tempdir().unwrap();
        let acked = run_and_kill(dir.path(), kill_after);
        assert!(acked >= kill_after, "child stopped early at {acked}");

        let (mut log, _sm) = Store::open(dir.path()).unwrap();
        let entries = log.try_get_log_entries(..).await.unwrap();
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        let expected: Vec<u64> = (1..=indexes.len() as u64).collect();
        assert_eq!(indexes, expected, "the log has a hole");
        eprintln!(
            "kill -9 after {acked} acks: {} entries survived",
            indexes.len()
        );
        assert!(
            indexes.len() as u64 >= acked,
            "acknowledged {acked} entries, only {} survived kill -9",
            indexes.len()
        );
    }
}
