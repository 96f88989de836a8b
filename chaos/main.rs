//! Chaos drills: a real `godel` cluster on 127.0.0.1 under a steady load of
//! task submissions, run through `sim` and `command` gateways, with faults
//! injected on a schedule; the drill ends in a verdict computed from what
//! the cluster and the workers report, and exits non-zero when a
//! must-be-zero count is not zero.
//!
//! ```sh
//! cargo test --test chaos                  # the CI tier (also part of `cargo test`)
//! cargo test --test chaos -- leader-kill   # drills by name
//! cargo test --test chaos -- all           # every full drill (`ci`: the CI tier)
//! cargo test --test chaos -- --list        # the drills
//! ```
//!
//! Drills are the TOML files in `chaos/drills/` (format in `drill.rs`);
//! `chaos/README.md` lists them with their last verdicts. The cluster
//! harness (`tests/support`) and the gateway fleet and its side-effect log
//! (`tests/runtime/fleet.rs`) are shared with the runtime tests.
//!
//! The CI tier is the drills marked `tier = "ci"`: the smoke drill and
//! short versions of leader-kill, partition and region-partition. With no
//! drill named the harness runs them, which is what `cargo test` does;
//! `all` runs the others, the full drills.
//!
//! Arguments that start with `-` are libtest's (`--test-threads=2` from the
//! README's test command) and are ignored; names that match no drill run
//! nothing, as a libtest filter that matches no test.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "../tests/runtime/fleet.rs"]
#[allow(dead_code)]
mod fleet;

mod drill;
mod events;
mod inject;
mod load;
mod region;
mod run;
mod storage;
mod verdict;

use std::process::ExitCode;

/// The nodes' log filter: `godel::metrics` at debug logs every applied task
/// event, which the verdict reads back.
const NODE_LOG: &str = "info,openraft=warn,sled=warn,godel::metrics=debug";
/// libtest flags that take a separate value.
const VALUED_FLAGS: [&str; 6] = [
    "--test-threads",
    "--skip",
    "--format",
    "--color",
    "--logfile",
    "-Z",
];

fn main() -> ExitCode {
    let mut names = Vec::new();
    let mut list = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if VALUED_FLAGS.contains(&a.as_str()) {
            args.next();
        } else if a == "--list" {
            list = true;
        } else if !a.starts_with('-') {
            names.push(a);
        }
    }
    events::self_check();
    fleet::two_owner_self_check();
    let drills = match drill::all() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if list {
        for d in &drills {
            println!("{}: test", d.name);
        }
        return ExitCode::SUCCESS;
    }
    if names.is_empty() {
        names.push("ci".into());
    }
    let has = |n: &str| names.iter().any(|x| x == n);
    let chosen: Vec<_> = drills
        .into_iter()
        .filter(|d| match d.tier {
            drill::Tier::Full => has("all") || has(&d.name),
            drill::Tier::Ci => has("ci") || has(&d.name),
        })
        .collect();
    if chosen.is_empty() {
        println!("chaos: no drill named {names:?}; nothing run (`--list` lists them)");
        return ExitCode::SUCCESS;
    }
    let filter = match std::env::var("GODEL_TEST_LOG") {
        Ok(f) => format!("{f},godel::metrics=debug"),
        Err(_) => NODE_LOG.to_owned(),
    };
    // SAFETY: no other thread runs yet (the runtime starts below).
    unsafe { std::env::set_var("GODEL_TEST_LOG", filter) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    let count = chosen.len();
    for d in chosen {
        let name = d.name.clone();
        if !run_one(&rt, d) {
            failed.push(name);
        }
    }
    println!(
        "chaos: {count} drills in {:.0} s; failed: {failed:?}",
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one drill and prints its verdict; whether it passed.
fn run_one(rt: &tokio::runtime::Runtime, d: drill::Drill) -> bool {
    let name = d.name.clone();
    let seed = d.seed.unwrap_or_else(fleet::now_ms);
    println!("chaos: drill {name} (seed {seed}): {}", d.description);
    let run = std::panic::AssertUnwindSafe(|| rt.block_on(run::run(d, seed)));
    match std::panic::catch_unwind(run) {
        Ok(Ok(v)) => {
            println!("{}", v.render());
            v.passed()
        }
        Ok(Err(e)) => {
            println!("\n===== drill {name}: ABORTED =====\n{e:#}");
            false
        }
        Err(_) => {
            println!(
                "\n===== drill {name}: ABORTED (a bounded wait ran out; the panic is above) ====="
            );
            false
        }
    }
}
