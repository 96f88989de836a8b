//! What the cluster itself reports: every node logs each task event it
//! applies (`godel::metrics` at debug: `task event task_id=.. event=..
//! detail=..`), with a timestamp. The drill reads those logs back after the
//! run:
//!
//! - **dispatches**: the first time any node applied each `leased` event
//!   (fencing tokens are unique cluster-wide);
//! - **completions by lease**: a node applies a task's events in log order,
//!   so a `completed` event belongs to the last `leased` token it applied for
//!   that task. A completion whose lease the node never saw (it caught up by
//!   snapshot, or its event observer lagged) is not attributed. A restarted
//!   node replays entries and logs their events again; replays carry the
//!   same tokens, so they add nothing.
//! - **grants**: every `(token, task)` pair; a token granted for two tasks
//!   means two nodes applied different entries at one index.
//! - **leaders**: each term whose leader committed its first entry
//!   (`node.leader_changed`), when it was first applied and which node led.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// Task events gathered from every node's log.
#[derive(Debug, Default)]
pub struct Events {
    /// Token -> (first time applied on any node, task).
    pub grants: BTreeMap<u64, (u64, u64)>,
    /// Tokens that some node applied for another task than the first.
    pub conflicts: BTreeSet<u64>,
    /// Task -> the lease tokens its applied completions belong to.
    pub completions: BTreeMap<u64, BTreeSet<u64>>,
    /// Completions applied with no lease seen before them on that node.
    pub unattributed: usize,
    /// Log lines read that were task events.
    pub lines: usize,
    /// Term -> (first time applied on any node, its leader).
    pub leaders: BTreeMap<u64, (u64, u64)>,
}

impl Events {
    /// Reads the logs of every node.
    pub fn read(logs: &[&Path]) -> Events {
        let mut ev = Events::default();
        for log in logs {
            let text = std::fs::read(log).unwrap_or_default();
            ev.read_one(&String::from_utf8_lossy(&text));
        }
        ev
    }

    fn read_one(&mut self, text: &str) {
        // Task -> the token of the last lease this node applied for it.
        let mut last_lease: HashMap<u64, u64> = HashMap::new();
        for line in text.lines() {
            if line.contains("event observer lagged") || line.contains("harness: starting node") {
                // Events were skipped, or a new process replays from its
                // snapshot: what came before no longer says which lease a
                // completion belongs to.
                last_lease.clear();
                continue;
            }
            if let Some((at, leader, term)) = parse_leader(line) {
                let first = self.leaders.entry(term).or_insert((at, leader));
                first.0 = first.0.min(at);
                continue;
            }
            let Some(e) = parse(line) else { continue };
            self.lines += 1;
            match e.event {
                "leased" => {
                    let Some(token) = e.token else { continue };
                    last_lease.insert(e.task, token);
                    let first = self.grants.entry(token).or_insert((e.at_ms, e.task));
                    first.0 = first.0.min(e.at_ms);
                    if first.1 != e.task {
                        self.conflicts.insert(token);
                    }
                }
                "completed" => match last_lease.get(&e.task) {
                    Some(t) => {
                        self.completions.entry(e.task).or_default().insert(*t);
                    }
                    None => self.unattributed += 1,
                },
                _ => {}
            }
        }
    }

    /// Tasks whose applied completions belong to more than one lease.
    pub fn completed_twice(&self) -> Vec<(u64, Vec<u64>)> {
        self.completions
            .iter()
            .filter(|(_, tokens)| tokens.len() > 1)
            .map(|(task, tokens)| (*task, tokens.iter().copied().collect()))
            .collect()
    }

    /// Dispatch times (ms), sorted.
    pub fn dispatch_times(&self) -> Vec<u64> {
        let mut t: Vec<u64> = self.grants.values().map(|(at, _)| *at).collect();
        t.sort_unstable();
        t
    }
}

struct Line<'a> {
    at_ms: u64,
    task: u64,
    event: &'a str,
    token: Option<u64>,
}

/// `2026-11-22T00:33:12.123456Z DEBUG godel::metrics: task event task_id=5
/// priority="medium" event="leased" detail=Leased { token: FencingToken(12), .. }`
fn parse(line: &str) -> Option<Line<'_>> {
    if !line.contains("task event") {
        return None;
    }
    let stamp = line.split_whitespace().next()?;
    let at_ms = godel::clock::parse_rfc3339(stamp).ok()?;
    let task = number_after(line, "task_id=")?;
    let rest = &line[line.find(" event=")? + 7..];
    let rest = rest.trim_start_matches('"');
    let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
    let event = &rest[..end];
    let token = number_after(line, "FencingToken(");
    Some(Line {
        at_ms,
        task,
        event,
        token,
    })
}

/// `2026-11-22T00:33:12.123456Z DEBUG godel::metrics: event seq=386
/// event="node.leader_changed" detail=Node { id: 8, change: LeaderChanged {
/// term: 2 } }`: (ms, leader, term).
fn parse_leader(line: &str) -> Option<(u64, u64, u64)> {
    if !line.contains("event=\"node.leader_changed\"") {
        return None;
    }
    let stamp = line.split_whitespace().next()?;
    let at_ms = godel::clock::parse_rfc3339(stamp).ok()?;
    Some((
        at_ms,
        number_after(line, "Node { id: ")?,
        number_after(line, "term: ")?,
    ))
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Checks the parser on a known log before a drill trusts it (a harness
/// without libtest runs no `#[test]`s, so every drill run does this).
pub fn self_check() {
    {
        let log = "\
2026-01-01T00:00:00.100Z DEBUG godel::metrics: task event task_id=5 priority=\"low\" event=\"leased\" detail=Leased { token: FencingToken(7), agent: AgentId(\"a\") }
2026-01-01T00:00:00.200Z DEBUG godel::metrics: task event task_id=5 priority=\"low\" event=\"completed\" detail=Completed
===== harness: starting node 1 =====
2026-01-01T00:00:01.000Z DEBUG godel::metrics: task event task_id=5 priority=\"low\" event=\"completed\" detail=Completed
2026-01-01T00:00:01.100Z DEBUG godel::metrics: task event task_id=5 priority=\"low\" event=\"leased\" detail=Leased { token: FencingToken(9), agent: AgentId(\"a\") }
2026-01-01T00:00:01.200Z DEBUG godel::metrics: task event task_id=5 priority=\"low\" event=\"completed\" detail=Completed
2026-01-01T00:00:01.300Z DEBUG godel::metrics: task event task_id=6 priority=\"low\" event=\"leased\" detail=Leased { token: FencingToken(9), agent: AgentId(\"a\") }
2026-01-01T00:00:01.400Z DEBUG godel::metrics: event seq=38 event=\"node.leader_changed\" detail=Node { id: 8, change: LeaderChanged { term: 2 } }
";
        let mut ev = Events::default();
        ev.read_one(log);
        assert_eq!(ev.unattributed, 1);
        assert_eq!(ev.completed_twice(), vec![(5, vec![7, 9])]);
        assert_eq!(ev.conflicts, BTreeSet::from([9]));
        assert_eq!(ev.dispatch_times().len(), 2);
        assert_eq!(ev.leaders, BTreeMap::from([(2, (1_767_225_601_400, 8))]));
    }
}
