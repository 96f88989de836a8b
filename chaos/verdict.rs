//! The verdict: counts computed from what the cluster reports (the final
//! task list, every node's applied task events, each node's view after
//! catch-up) and what the workers report (the `command` gateways'
//! side-effect log), plus what the load generator saw. Counts marked
//! "must be 0" fail the drill; among them the faults whose drill bounds the
//! recovery (`recover_within`) and that recovered later, or never.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::Value;

use crate::events::Events;
use crate::fleet::{Exec, result_problem, two_owner_gateways};
use crate::inject::{Probes, Record};
use crate::load::Submissions;

/// Everything a drill measured.
#[derive(Debug, Default)]
pub struct Verdict {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub wall_s: f64,
    pub submitted: usize,
    pub skipped: usize,
    pub acknowledged: usize,
    pub unacknowledged: usize,
    pub rejected: usize,
    pub completed: usize,
    pub dead_lettered: usize,
    pub cancelled: usize,
    /// Acknowledged, never terminal (or missing): task ids.
    pub lost: Vec<u64>,
    /// Tasks whose applied completions belong to two leases, and submissions
    /// that became two tasks.
    pub completed_twice: Vec<String>,
    pub executions: usize,
    /// Tasks executed more than once, each time on a new lease.
    pub duplicate_executions: usize,
    /// One lease executed twice: the executions.
    pub same_lease_twice: Vec<String>,
    /// A token granted (applied or executed) for two tasks.
    pub token_conflicts: Vec<u64>,
    /// Completed with a result their own execution did not produce.
    pub wrong_results: Vec<String>,
    /// Nodes whose view differs from the leader's after catch-up.
    pub replica_mismatches: Vec<String>,
    /// Gateways driven by two owners, and the call that shows it.
    pub two_owners: BTreeMap<String, String>,
    /// Executions whose node passed the gateway's id, owner and token.
    pub fenced_calls: usize,
    /// Gateway -> the (token, owner) placements its calls carried.
    pub placements: BTreeMap<String, BTreeSet<(u64, u64)>>,
    /// Faults with a recovery bound that recovered later or not at all.
    pub slow_recoveries: Vec<String>,
    pub probes: Probes,
    pub quiesced: bool,
    pub event_lines: usize,
    pub unattributed_completions: usize,
    /// Longest window without a dispatch during the load: (ms, starting at
    /// ms after the load started).
    pub longest_no_dispatch: (u64, u64),
    pub faults: Vec<Fault>,
    /// Terms whose leader committed an entry, and the highest term.
    pub terms: (usize, u64),
    /// Leaders that took office during the load but while no fault was
    /// held: (ms after the load started, node, term).
    pub other_elections: Vec<(u64, u64, u64)>,
    /// When the load started (ms since the epoch).
    pub load_start_ms: u64,
}

/// One fault as measured.
#[derive(Debug)]
pub struct Fault {
    /// What the injector did.
    pub record: Record,
    /// Its recovery (ms after the injection).
    pub recovery: Option<u64>,
    /// The first leader that took office while it lasted: ms after the
    /// injection, node.
    pub elected: Option<(u64, u64)>,
}

impl Fault {
    /// One line: when, what, on which nodes, how long it recovered in.
    fn render(&self, load_start_ms: u64) -> String {
        let r = &self.record;
        let rec = match self.recovery {
            _ if r.skipped => "SKIPPED".to_owned(),
            Some(ms) => format!("recovered in {ms} ms"),
            None => "no recovery seen".to_owned(),
        };
        let held = r.cleared_ms.saturating_sub(r.injected_ms);
        let note = if r.note.is_empty() {
            String::new()
        } else {
            format!("; {}", r.note)
        };
        let pid = r.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
        let bound = r
            .recover_within
            .map_or_else(String::new, |b| format!(" (bound {b:?})"));
        let elected = self.elected.map_or_else(String::new, |(ms, node)| {
            format!("; node {node} took office as leader after {ms} ms")
        });
        let start = r.injected_ms.saturating_sub(load_start_ms) as f64 / 1000.0;
        format!(
            "+{start:.1} s {} on {}{pid} (held {held} ms): {rec}{bound}{elected}{note}",
            r.label, r.hit
        )
    }
}

impl Verdict {
    /// Counts every acknowledged task by its final status; `tasks` is the
    /// final task list by id.
    pub fn tally_tasks(&mut self, subs: &Submissions, tasks: &BTreeMap<u64, Value>) {
        self.submitted = subs.submitted;
        self.skipped = subs.skipped;
        self.acknowledged = subs.acked.len() + subs.id_reused.len();
        self.unacknowledged = subs.unacked.len();
        self.rejected = subs.rejected.len();
        for (id, t) in subs.acked.keys().map(|id| (id, tasks.get(id))) {
            match t.and_then(|t| t["status"].as_str()) {
                Some("completed") => self.completed += 1,
                Some("dead_letter") => self.dead_lettered += 1,
                Some("cancelled") => self.cancelled += 1,
                _ => self.lost.push(*id),
            }
        }
        let mut by_marker: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (id, t) in tasks {
            if let Some(m) = t["payload"]["marker"].as_str() {
                by_marker.entry(m).or_default().push(*id);
            }
        }
        for (m, ids) in by_marker.iter().filter(|(_, ids)| ids.len() > 1) {
            self.completed_twice
                .push(format!("submission {m} became tasks {ids:?}"));
        }
        for m in &subs.id_reused {
            self.completed_twice
                .push(format!("submission {m} acknowledged as another's task"));
        }
    }

    /// Checks the side-effect log and the results against the final tasks.
    pub fn tally_executions(&mut self, tasks: &BTreeMap<u64, Value>, execs: &[Exec]) {
        self.executions = execs.len();
        let mut by_token: BTreeMap<u64, Vec<&Exec>> = BTreeMap::new();
        let mut by_task: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for e in execs {
            by_token.entry(e.token).or_default().push(e);
            by_task.entry(e.task).or_default().push(e.token);
        }
        for (token, es) in &by_token {
            if es.iter().any(|e| e.task != es[0].task) {
                self.token_conflicts.push(*token);
            } else if es.len() > 1 {
                self.same_lease_twice.push(format!("token {token}: {es:?}"));
            }
        }
        self.duplicate_executions = by_task.values().filter(|ts| ts.len() > 1).count();
        self.two_owners = two_owner_gateways(execs);
        self.fenced_calls = execs.iter().filter(|e| e.call.is_some()).count();
        for c in execs.iter().filter_map(|e| e.call.as_ref()) {
            let seen = self.placements.entry(c.gateway.clone()).or_default();
            seen.insert((c.token, c.owner));
        }
        for (id, t) in tasks.iter().filter(|(_, t)| t["status"] == "completed") {
            let marker = t["payload"]["marker"].as_str().unwrap_or_default();
            let agent = t["agent_id"].as_str().unwrap_or(".");
            let ran = by_task.get(id).map_or(&[][..], Vec::as_slice);
            if let Some(p) = result_problem(*id, marker, agent, t, ran) {
                self.wrong_results.push(format!("task {id}: {p}"));
            }
        }
    }

    /// Adds what the nodes' event logs say; times relative to the load.
    pub fn tally_events(
        &mut self,
        ev: &Events,
        load: (u64, u64),
        records: Vec<Record>,
        subs: &Submissions,
    ) {
        self.event_lines = ev.lines;
        self.load_start_ms = load.0;
        self.unattributed_completions = ev.unattributed;
        for (task, tokens) in ev.completed_twice() {
            self.completed_twice
                .push(format!("task {task} completed under leases {tokens:?}"));
        }
        let conflicts: BTreeSet<u64> = ev.conflicts.iter().copied().collect();
        self.token_conflicts.extend(conflicts);
        let times: Vec<u64> = ev
            .dispatch_times()
            .into_iter()
            .filter(|t| (load.0..=load.1).contains(t))
            .collect();
        let mut prev = load.0;
        for t in times.iter().copied().chain([load.1]) {
            if t - prev > self.longest_no_dispatch.0 {
                self.longest_no_dispatch = (t - prev, prev - load.0);
            }
            prev = t;
        }
        self.measure_faults(ev, load, records, subs);
    }

    /// Each fault's recovery (against its bound) and the leader elected
    /// during it; the leaders elected while no fault was held.
    fn measure_faults(
        &mut self,
        ev: &Events,
        load: (u64, u64),
        records: Vec<Record>,
        subs: &Submissions,
    ) {
        // Task -> when it was first dispatched.
        let mut first: BTreeMap<u64, u64> = BTreeMap::new();
        for (at, task) in ev.grants.values() {
            let t = first.entry(*task).or_insert(*at);
            *t = (*t).min(*at);
        }
        for r in records {
            let rec = subs
                .sent_ms
                .iter()
                .filter(|(_, sent)| **sent > r.in_place_ms)
                .filter_map(|(task, _)| first.get(task))
                .min()
                .map(|d| d - r.injected_ms);
            if let Some(bound) = r.recover_within
                && rec.is_none_or(|ms| u128::from(ms) > bound.as_millis())
            {
                let took = rec.map_or_else(|| "no recovery seen".into(), |ms| format!("{ms} ms"));
                self.slow_recoveries
                    .push(format!("{} on {}: {took} > {bound:?}", r.label, r.hit));
            }
            let elected = ev
                .leaders
                .values()
                .filter(|(at, _)| (r.injected_ms..=r.cleared_ms).contains(at))
                .min()
                .map(|(at, node)| (at - r.injected_ms, *node));
            self.faults.push(Fault {
                record: r,
                recovery: rec,
                elected,
            });
        }
        self.terms = (
            ev.leaders.len(),
            ev.leaders.keys().max().copied().unwrap_or(0),
        );
        for (term, (at, node)) in &ev.leaders {
            let in_fault = self
                .faults
                .iter()
                .any(|f| (f.record.injected_ms..=f.record.cleared_ms).contains(at));
            if (load.0..=load.1).contains(at) && !in_fault {
                self.other_elections.push((at - load.0, *node, *term));
            }
        }
    }

    /// The must-be-zero counts.
    pub fn must_be_zero(&self) -> Vec<(&'static str, usize)> {
        vec![
            ("lost", self.lost.len()),
            ("completed twice", self.completed_twice.len()),
            ("same lease executed twice", self.same_lease_twice.len()),
            (
                "fencing token granted for two tasks",
                self.token_conflicts.len(),
            ),
            ("wrong results", self.wrong_results.len()),
            ("replica mismatches", self.replica_mismatches.len()),
            ("leases granted by a cut-off minority", self.probes.granted),
            ("gateways with two owners", self.two_owners.len()),
            (
                "faults not recovered within their bound",
                self.slow_recoveries.len(),
            ),
        ]
    }

    /// Whether every must-be-zero count is zero.
    pub fn passed(&self) -> bool {
        self.must_be_zero().iter().all(|(_, n)| *n == 0)
    }

    /// The printed verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(s, "\n===== drill {}: {verdict} =====", self.name);
        let _ = writeln!(
            s,
            "{} (seed {}, {:.0} s)",
            self.description, self.seed, self.wall_s
        );
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "  {k:<38} {v}");
        };
        row("submitted", self.submitted.to_string());
        row("  skipped ticks (all slots busy)", self.skipped.to_string());
        row("acknowledged", self.acknowledged.to_string());
        row(
            "  not acknowledged within 30 s",
            self.unacknowledged.to_string(),
        );
        row("  rejected (4xx)", self.rejected.to_string());
        row("completed", self.completed.to_string());
        row("dead-lettered", self.dead_lettered.to_string());
        row("cancelled", self.cancelled.to_string());
        for (k, n) in self.must_be_zero() {
            row(k, format!("{n}   (must be 0)"));
        }
        row("command executions", self.executions.to_string());
        row(
            "  with the gateway's owner and token",
            format!(
                "{} (only these are checked for two owners)",
                self.fenced_calls
            ),
        );
        let placed: Vec<String> = self
            .placements
            .iter()
            .map(|(g, ps)| {
                let ps: Vec<String> = ps.iter().map(|(t, n)| format!("{t}@n{n}")).collect();
                format!("{g} {}", ps.join(" "))
            })
            .collect();
        row("  placements in calls (token@node)", placed.join("; "));
        row(
            "tasks executed again after a lease loss",
            self.duplicate_executions.to_string(),
        );
        let (gap, at) = self.longest_no_dispatch;
        row(
            "longest window with no dispatch",
            format!("{gap} ms (from +{:.1} s)", at as f64 / 1000.0),
        );
        if self.probes.sent > 0 {
            row(
                "lease probes through the minority",
                format!("{} {:?}", self.probes.sent, self.probes.statuses),
            );
        }
        row(
            "Raft terms that elected a leader",
            format!("{} (highest term {})", self.terms.0, self.terms.1),
        );
        let others: Vec<String> = self
            .other_elections
            .iter()
            .map(|(at, node, term)| {
                format!("+{:.1} s node {node} term {term}", *at as f64 / 1000.0)
            })
            .collect();
        row(
            "  leaders elected while no fault was held",
            format!("{} {others:?}", others.len()),
        );
        row("quiesced", self.quiesced.to_string());
        row(
            "task events read from node logs",
            format!(
                "{} ({} completions not attributable)",
                self.event_lines, self.unattributed_completions
            ),
        );
        let _ = writeln!(
            s,
            "  faults (recovery = from the injection until the first dispatch of a task \
             submitted after the fault was in place):"
        );
        for f in &self.faults {
            let _ = writeln!(s, "    {}", f.render(self.load_start_ms));
        }
        self.render_details(&mut s);
        s
    }

    /// The ids behind each must-be-zero count that is not zero.
    fn render_details(&self, s: &mut String) {
        let details = [
            (
                "lost",
                self.lost.iter().map(u64::to_string).collect::<Vec<_>>(),
            ),
            ("completed twice", self.completed_twice.clone()),
            ("same lease twice", self.same_lease_twice.clone()),
            (
                "token conflicts",
                self.token_conflicts.iter().map(u64::to_string).collect(),
            ),
            ("wrong results", self.wrong_results.clone()),
            ("replica mismatches", self.replica_mismatches.clone()),
            (
                "gateways with two owners",
                self.two_owners
                    .iter()
                    .map(|(g, why)| format!("{g}: {why}"))
                    .collect(),
            ),
            ("slow recoveries", self.slow_recoveries.clone()),
        ];
        for (k, v) in details.iter().filter(|(_, v)| !v.is_empty()) {
            let _ = writeln!(
                s,
                "  {k}: {}",
                v.iter().take(20).cloned().collect::<Vec<_>>().join("; ")
            );
        }
    }
}
