//! What a queued task costs in memory, in the state machine alone: no
//! network or Raft. Builds the replicated state with N pending tasks
//! through `State::apply` (entries of 1,000 submits, as the batch API makes
//! them), then measures what a node holds for it and what its snapshot
//! costs (encoded into a file and decoded from it, as a node does).
//!
//! `cargo bench --bench memory -- [--tasks N] [--size BYTES] [--no-keys]
//! [--held]` (default 1,000,000 tasks of 256-byte payloads, each with an
//! idempotency key, parked under a capability no agent has, as the cluster
//! bench's `depth` phase parks them). By default the payloads leave the
//! state as a node's store takes them (`State::keep_payloads_out`; the
//! store's own cost is not counted here: the `peers` bench's depth phase
//! measures a whole node); `--held` keeps them in the state.
//!
//! Heap figures count the bytes asked of the allocator (a counting wrapper
//! around mimalloc, the node's allocator), so they leave out the
//! allocator's own rounding and free pages; the resident figure (VmRSS)
//! includes them. Not a test: it asserts nothing.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use godel::fsm::{Batch, Command, Priority, Request, State, SubmitTask};

#[allow(dead_code)] // each benchmark uses part of the shared helpers
mod common;

/// mimalloc with a count of the bytes live and the most ever live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn grew(by: isize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call goes to mimalloc unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { INNER.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NOW: u64 = 1_800_000_000_000;

struct Opts {
    tasks: u64,
    size: usize,
    keys: bool,
    held: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        tasks: 1_000_000,
        size: 256,
        keys: true,
        held: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tasks" => o.tasks = args.next().and_then(|v| v.parse().ok()).expect("--tasks N"),
            "--size" => o.size = args.next().and_then(|v| v.parse().ok()).expect("--size B"),
            "--no-keys" => o.keys = false,
            "--held" => o.held = true,
            // cargo bench passes --bench; anything else is a mistake.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

/// Task `i` as the cluster bench's depth phase submits it: a JSON payload
/// of `size` bytes, priorities in turn, eight tenants, parked.
fn submit(i: u64, o: &Opts) -> Command {
    let head = format!(r#"{{"n":{i},"t":1800000000000000,"pad":""}}"#);
    let pad = "x".repeat(o.size.saturating_sub(head.len()));
    Command::Submit(SubmitTask {
        tenant: format!("tenant-{}", i % 8).as_str().into(),
        priority: Some(Priority::URGENT_FIRST[(i % 4) as usize]),
        payload: format!(r#"{{"n":{i},"t":1800000000000000,"pad":"{pad}"}}"#),
        capabilities: vec!["parked".into()],
        idempotency_key: o.keys.then(|| format!("p{i}")),
        ..Default::default()
    })
}

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn rss_mib() -> f64 {
    common::rss_mib(std::process::id())
}

/// Applies `command(i)` for every `i` in `0..n`, in entries of 1,000 at
/// `now_ms`; each must be accepted (`what` names them if not).
fn apply_in_entries(
    state: &mut State,
    n: u64,
    now_ms: u64,
    what: &str,
    command: impl Fn(u64) -> Command,
) {
    let mut i = 0;
    while i < n {
        let commands = (i..(i + 1000).min(n)).map(&command).collect();
        let request = Request::Batch(Batch::unaudited(now_ms, 7, commands));
        let (response, _) = state.apply(&request);
        assert!(
            response.outcomes.iter().all(|r| r.is_ok()),
            "a {what} was refused"
        );
        // What a node's store would write to its payloads tree.
        drop(state.take_stored_payloads());
        i += 1000;
    }
}

fn main() {
    let o = opts();
    let n = o.tasks;
    println!(
        "memory: {n} pending tasks, {}-byte payloads {}, {} keys",
        o.size,
        if o.held {
            "held in the state"
        } else {
            "stored apart"
        },
        if o.keys { "with" } else { "without" }
    );
    {
        use godel::fsm::{LeaseInfo, Task, TaskExtras, TaskOutcome};
        use std::mem::size_of;
        println!(
            "  sizes: Task {} bytes inline (boxed apart when set: TaskExtras {}, TaskOutcome {}, LeaseInfo {})",
            size_of::<Task>(),
            size_of::<TaskExtras>(),
            size_of::<TaskOutcome>(),
            size_of::<LeaseInfo>(),
        );
    }
    let base = LIVE.load(Ordering::Relaxed);
    let mut state = State::default();
    if !o.held {
        state.keep_payloads_out();
    }
    let t0 = Instant::now();
    apply_in_entries(&mut state, n, NOW, "submit", |i| submit(i, &o));
    let built = t0.elapsed();
    let live = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "  state: {:.0} MiB of heap, {:.0} bytes per task (applied in {:.2} s, {:.0} tasks/s); resident {:.0} MiB",
        mib(live),
        live as f64 / n as f64,
        built.as_secs_f64(),
        n as f64 / built.as_secs_f64(),
        rss_mib()
    );

    // A snapshot: the builder's copy of the state, then its encoding.
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let t0 = Instant::now();
    let copy = state.clone();
    let cloned = t0.elapsed();
    let copy_bytes = LIVE.load(Ordering::Relaxed) - before;
    // Encoded into a file through a 1 MiB buffer, as a node builds one.
    let file = tempfile::NamedTempFile::new().expect("temporary file");
    let t0 = Instant::now();
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file.as_file());
        godel::codec::encode_to_writer(&copy, &mut out).expect("encode");
        std::io::Write::flush(&mut out).expect("write");
    }
    file.as_file().sync_all().expect("fsync");
    let encoded = t0.elapsed();
    let size = file.as_file().metadata().expect("stat").len() as isize;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    println!(
        "  snapshot: copy {:.0} MiB ({:.0} bytes per task, {:.2} s); encoded into a file {:.0} MiB ({:.0} bytes per task, {:.2} s with its fsync); peak heap above the state {:.0} MiB",
        mib(copy_bytes),
        copy_bytes as f64 / n as f64,
        cloned.as_secs_f64(),
        mib(size),
        size as f64 / n as f64,
        encoded.as_secs_f64(),
        mib(peak)
    );
    drop(copy);
    drop(state);

    // A restart: decode the snapshot file as it is read.
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let t0 = Instant::now();
    let input = std::fs::File::open(file.path()).expect("open");
    let mut input = std::io::BufReader::with_capacity(1 << 20, input);
    let mut restored: State = godel::codec::decode_state_from_reader(&mut input).expect("decode");
    let decoded = t0.elapsed();
    // What a node runs on a decoded state (derived counts, shared tenant
    // names).
    let t0 = Instant::now();
    restored.decoded();
    let settled = t0.elapsed();
    let restored_bytes = LIVE.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    println!(
        "  restore: decoded from the file in {:.2} s, then {:.2} s to share tenant names and capability sets and recount; {:.0} MiB of heap ({:.0} bytes per task), peak {:.0} MiB; resident {:.0} MiB",
        decoded.as_secs_f64(),
        settled.as_secs_f64(),
        mib(restored_bytes),
        restored_bytes as f64 / n as f64,
        mib(peak),
        rss_mib()
    );
    drop(input);
    drop(file);

    // Retention: every task cancelled, then purged in entries of the most
    // one purge forgets, as a leader proposes them.
    let mut state = restored;
    apply_in_entries(&mut state, n, NOW + 1, "cancel", |i| Command::Cancel {
        id: godel::fsm::TaskId(i + 1),
        reason: None,
        keep_children: true,
    });
    let before = LIVE.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut entries = 0;
    loop {
        let purge = Command::Purge {
            finished_before_ms: NOW + 2,
            keep: 0,
            max: godel::fsm::Limits::MAX_PURGE,
            dead_before_ms: 0,
        };
        let request = Request::Batch(Batch::unaudited(NOW + 2, 7, vec![purge]));
        let (response, _) = state.apply(&request);
        entries += 1;
        if matches!(response.outcomes[0], Ok(godel::fsm::Reply::Purged(0))) {
            break;
        }
    }
    let purged = t0.elapsed();
    let freed = before - LIVE.load(Ordering::Relaxed);
    println!(
        "  purge: {n} cancelled tasks forgotten in {entries} entries, {:.2} s ({:.2} µs per task, {:.1} ms per entry of {}); {:.0} MiB freed, {:.0} MiB of heap left",
        purged.as_secs_f64(),
        purged.as_secs_f64() * 1e6 / n as f64,
        purged.as_secs_f64() * 1e3 / entries as f64,
        godel::fsm::Limits::MAX_PURGE,
        mib(freed),
        mib(LIVE.load(Ordering::Relaxed) - base)
    );
    black_box(state);
}
