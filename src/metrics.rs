//! Every metric, declared in one place, and the one function that turns
//! state-machine events into log lines and metrics (so they cannot drift).
//!
//! Names follow `godel_<area>_<thing>_<unit>`; labels are bounded (priority,
//! status, event kind), never task, agent or session ids.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::fsm::{Event, EventKind, Priority, TaskStatus, What};
use crate::node::Node;

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    /// Task events applied on this node, by kind and priority.
    pub task_events: IntCounterVec,
    /// Raft entries proposed by this node as leader, by outcome.
    pub proposals: IntCounterVec,
    /// Commands per proposed Raft entry.
    pub batch_commands: Histogram,
    /// Seconds from proposal to applied, per entry.
    pub commit_seconds: Histogram,
    /// Leases granted by this node's dispatch rounds, as leader.
    pub dispatch_leases: prometheus::IntCounter,
    /// Finished tasks forgotten by purges this node proposed, as leader
    /// (retention, `queue.retain_finished`).
    pub tasks_purged: prometheus::IntCounter,
    /// Snapshots this node wrote, by how (`built` from its own state,
    /// `installed` from its leader).
    pub snapshots: IntCounterVec,
    /// The size of the last snapshot this node wrote, in bytes.
    pub snapshot_bytes: prometheus::IntGauge,
    /// Dispatch rounds proposed by this node, by outcome.
    pub dispatch_rounds: IntCounterVec,
    /// Seconds from a task's submission (leader time) to its attempt
    /// starting on an agent of this node.
    pub dispatch_seconds: Histogram,
    /// Attempts ended on this node's agents, by outcome.
    pub attempts: IntCounterVec,
    /// Lease hints this node (as leader) sent over the fabric.
    pub hints_sent: prometheus::IntCounter,
    /// Lease hints this node received over the fabric.
    pub hints_received: prometheus::IntCounter,
    /// Lease hints dropped, by reason (`no_peer`, `send_failed`,
    /// `unreadable`, `no_agent`).
    pub hints_dropped: IntCounterVec,
    /// Hinted leases an agent of this node started before its replica
    /// applied them.
    pub hints_started: prometheus::IntCounter,
    /// Peers with an authenticated fabric session.
    pub fabric_peers: IntGauge,
    /// Gateway-side sessions opened and closed by session actors, by event
    /// (`opened`, `open_failed`, `closed`, `close_failed`).
    pub gateway_sessions: IntCounterVec,
    /// Connections this node's `openclaw` drivers tried to open, by outcome
    /// (`ok`, `not_ready`, `rejected`).
    pub openclaw_connects: IntCounterVec,
    /// Events received from OpenClaw gateways, by event name (the known
    /// ones, else `other`; `unparsed` for frames that were not JSON).
    pub openclaw_events: IntCounterVec,
    /// Warm OpenClaw sessions (ephemeral workers), by what happened:
    /// `created` ahead of need, `taken` by a one-shot task, `missed` (none
    /// was ready: the task made its own).
    pub openclaw_warm_sessions: IntCounterVec,
    /// OpenClaw runs that ended or were interrupted, by outcome (`ok`,
    /// `error`, `timeout`, `aborted`, `connection_lost`).
    pub openclaw_runs: IntCounterVec,
    /// API calls refused before their handler, by reason
    /// (`unauthenticated`, `forbidden`, `rate_limited`, `auth_rate_limited`).
    pub api_denials: IntCounterVec,
    /// Denied calls that could not be written to the audit log (too many
    /// pending, or no quorum).
    pub api_denials_unaudited: prometheus::IntCounter,
    /// Event-stream connections open on this node.
    pub event_subscribers: IntGauge,
    /// 1 while this node counts itself cut off from the majority (and so
    /// runs no gateway or agent actors).
    pub node_cut_off: IntGauge,
    /// Events sent to event-stream subscribers.
    pub events_sent: prometheus::IntCounter,
    /// Event-stream subscribers ended, by reason (`lagged`, `slow`,
    /// `closed`, `unauthenticated`).
    pub event_disconnects: IntCounterVec,
    /// Events this node's stream buffer missed (it fell behind the state
    /// machine, or a snapshot replaced the state).
    pub events_missed: prometheus::IntCounter,
    /// Backups this node streamed, by outcome (`ok`, `interrupted`: the
    /// client went away, stalled or the node shut down; `failed`).
    pub backups: IntCounterVec,
    /// Bytes of backups this node streamed to the end.
    pub backup_bytes: prometheus::IntCounter,
    tasks: IntGaugeVec,
    raft_term: IntGauge,
    raft_leader: IntGauge,
    raft_applied: IntGauge,
    group_leader: IntGaugeVec,
    group_applied: IntGaugeVec,
    /// Per tenant with a budget: each limit's use over the limit.
    budget_used: prometheus::GaugeVec,
    /// Per tenant with a budget: the share of each limit it alerts from.
    budget_soft: prometheus::GaugeVec,
    prevotes: IntCounterVec,
}

fn build() -> prometheus::Result<Metrics> {
    let registry = Registry::new();
    let m = Metrics {
        task_events: IntCounterVec::new(
            Opts::new(
                "godel_task_events_total",
                "Task events applied on this node",
            ),
            &["kind", "priority"],
        )?,
        proposals: IntCounterVec::new(
            Opts::new(
                "godel_raft_proposals_total",
                "Raft entries proposed by this node as leader",
            ),
            &["outcome"],
        )?,
        batch_commands: Histogram::with_opts(
            HistogramOpts::new(
                "godel_raft_batch_commands",
                "Commands per proposed Raft entry",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
            ]),
        )?,
        commit_seconds: Histogram::with_opts(
            HistogramOpts::new(
                "godel_raft_commit_seconds",
                "Seconds from proposal to applied",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
        )?,
        dispatch_leases: prometheus::IntCounter::new(
            "godel_dispatch_leases_total",
            "Leases granted by this node's dispatch rounds",
        )?,
        tasks_purged: prometheus::IntCounter::new(
            "godel_tasks_purged_total",
            "Finished tasks and dead letters forgotten by the retention purges this node proposed as leader",
        )?,
        snapshots: IntCounterVec::new(
            Opts::new(
                "godel_raft_snapshots_total",
                "Snapshots this node wrote, by how (built, installed from the leader)",
            ),
            &["how"],
        )?,
        snapshot_bytes: prometheus::IntGauge::new(
            "godel_raft_snapshot_bytes",
            "Size of the last snapshot this node wrote",
        )?,
        dispatch_rounds: IntCounterVec::new(
            Opts::new(
                "godel_dispatch_rounds_total",
                "Dispatch rounds proposed by this node",
            ),
            &["outcome"],
        )?,
        dispatch_seconds: Histogram::with_opts(
            HistogramOpts::new(
                "godel_dispatch_seconds",
                "Seconds from submission to the attempt starting on an agent",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
        )?,
        attempts: IntCounterVec::new(
            Opts::new(
                "godel_agent_attempts_total",
                "Attempts ended on this node's agents",
            ),
            &["outcome"],
        )?,
        hints_sent: prometheus::IntCounter::new(
            "godel_fabric_hints_sent_total",
            "Lease hints sent over the fabric by this node as leader",
        )?,
        hints_received: prometheus::IntCounter::new(
            "godel_fabric_hints_received_total",
            "Lease hints received over the fabric",
        )?,
        hints_dropped: IntCounterVec::new(
            Opts::new(
                "godel_fabric_hints_dropped_total",
                "Lease hints dropped, by reason",
            ),
            &["reason"],
        )?,
        hints_started: prometheus::IntCounter::new(
            "godel_fabric_hinted_attempts_total",
            "Attempts started from a hint before the local replica applied the lease",
        )?,
        fabric_peers: IntGauge::new(
            "godel_fabric_peers",
            "Peers with an authenticated fabric session",
        )?,
        gateway_sessions: IntCounterVec::new(
            Opts::new(
                "godel_gateway_sessions_total",
                "Gateway-side sessions opened and closed by session actors, by event",
            ),
            &["event"],
        )?,
        openclaw_connects: IntCounterVec::new(
            Opts::new(
                "godel_openclaw_connects_total",
                "Connections to OpenClaw gateways tried, by outcome",
            ),
            &["outcome"],
        )?,
        openclaw_events: IntCounterVec::new(
            Opts::new(
                "godel_openclaw_events_total",
                "Events received from OpenClaw gateways, by event name",
            ),
            &["event"],
        )?,
        openclaw_warm_sessions: IntCounterVec::new(
            Opts::new(
                "godel_openclaw_warm_sessions_total",
                "Warm OpenClaw sessions for one-shot tasks: created, taken, missed",
            ),
            &["outcome"],
        )?,
        openclaw_runs: IntCounterVec::new(
            Opts::new(
                "godel_openclaw_runs_total",
                "OpenClaw runs ended or interrupted, by outcome",
            ),
            &["outcome"],
        )?,
        api_denials: IntCounterVec::new(
            Opts::new(
                "godel_api_denials_total",
                "API calls refused before their handler, by reason",
            ),
            &["reason"],
        )?,
        api_denials_unaudited: prometheus::IntCounter::new(
            "godel_api_denials_unaudited_total",
            "Denied API calls that could not be written to the audit log",
        )?,
        node_cut_off: IntGauge::new(
            "godel_node_cut_off",
            "1 while no heartbeat this node sent within node_dead_after has committed: it runs no gateway or agent actors",
        )?,
        event_subscribers: IntGauge::new(
            "godel_event_subscribers",
            "Event-stream connections open on this node",
        )?,
        events_sent: prometheus::IntCounter::new(
            "godel_events_sent_total",
            "Events sent to event-stream subscribers",
        )?,
        event_disconnects: IntCounterVec::new(
            Opts::new(
                "godel_event_disconnects_total",
                "Event-stream subscribers ended, by reason",
            ),
            &["reason"],
        )?,
        events_missed: prometheus::IntCounter::new(
            "godel_events_missed_total",
            "Events the node's stream buffer missed (fell behind, or a snapshot was installed)",
        )?,
        backups: IntCounterVec::new(
            Opts::new(
                "godel_backups_total",
                "Backups this node streamed, by outcome",
            ),
            &["outcome"],
        )?,
        backup_bytes: prometheus::IntCounter::new(
            "godel_backup_bytes_total",
            "Bytes of backups this node streamed to the end",
        )?,
        tasks: IntGaugeVec::new(
            Opts::new("godel_queue_tasks", "Tasks by priority and status"),
            &["priority", "status"],
        )?,
        raft_term: IntGauge::new("godel_raft_term", "Current Raft term")?,
        raft_leader: IntGauge::new("godel_raft_is_leader", "1 when this node is the leader")?,
        raft_applied: IntGauge::new("godel_raft_applied_index", "Last applied log index")?,
        group_leader: IntGaugeVec::new(
            Opts::new(
                "godel_raft_group_is_leader",
                "1 when this node leads the Raft group (0: meta, 1 and up: queue shards)",
            ),
            &["group"],
        )?,
        budget_used: prometheus::GaugeVec::new(
            Opts::new(
                "godel_tenant_budget_used_ratio",
                "Per tenant with a budget: used over limit, per period (day, month) and unit (tokens, cost); 1 and up: new tasks refused",
            ),
            &["tenant", "period", "unit"],
        )?,
        budget_soft: prometheus::GaugeVec::new(
            Opts::new(
                "godel_tenant_budget_soft_ratio",
                "Per tenant with a budget: the share of each limit from which it alerts",
            ),
            &["tenant", "period", "unit"],
        )?,
        group_applied: IntGaugeVec::new(
            Opts::new(
                "godel_raft_group_applied_index",
                "Last log index this node applied in the Raft group",
            ),
            &["group"],
        )?,
        prevotes: IntCounterVec::new(
            Opts::new(
                "godel_raft_prevotes_total",
                "Pre-votes this node held because it heard from no leader: granted (a majority has no leader either: it may campaign) or denied (it is cut off, or the others still follow a leader)",
            ),
            &["result"],
        )?,
        registry,
    };
    m.registry.register(Box::new(m.task_events.clone()))?;
    m.registry.register(Box::new(m.proposals.clone()))?;
    m.registry.register(Box::new(m.batch_commands.clone()))?;
    m.registry.register(Box::new(m.commit_seconds.clone()))?;
    m.registry.register(Box::new(m.tasks.clone()))?;
    m.registry.register(Box::new(m.dispatch_leases.clone()))?;
    m.registry.register(Box::new(m.tasks_purged.clone()))?;
    m.registry.register(Box::new(m.snapshots.clone()))?;
    m.registry.register(Box::new(m.snapshot_bytes.clone()))?;
    m.registry.register(Box::new(m.dispatch_rounds.clone()))?;
    m.registry.register(Box::new(m.dispatch_seconds.clone()))?;
    m.registry.register(Box::new(m.attempts.clone()))?;
    m.registry.register(Box::new(m.hints_sent.clone()))?;
    m.registry.register(Box::new(m.hints_received.clone()))?;
    m.registry.register(Box::new(m.hints_dropped.clone()))?;
    m.registry.register(Box::new(m.hints_started.clone()))?;
    m.registry.register(Box::new(m.fabric_peers.clone()))?;
    m.registry.register(Box::new(m.gateway_sessions.clone()))?;
    m.registry.register(Box::new(m.openclaw_connects.clone()))?;
    m.registry.register(Box::new(m.openclaw_events.clone()))?;
    m.registry
        .register(Box::new(m.openclaw_warm_sessions.clone()))?;
    m.registry.register(Box::new(m.openclaw_runs.clone()))?;
    m.registry.register(Box::new(m.api_denials.clone()))?;
    m.registry
        .register(Box::new(m.api_denials_unaudited.clone()))?;
    m.registry.register(Box::new(m.event_subscribers.clone()))?;
    m.registry.register(Box::new(m.node_cut_off.clone()))?;
    m.registry.register(Box::new(m.events_sent.clone()))?;
    m.registry.register(Box::new(m.event_disconnects.clone()))?;
    m.registry.register(Box::new(m.events_missed.clone()))?;
    m.registry.register(Box::new(m.backups.clone()))?;
    m.registry.register(Box::new(m.backup_bytes.clone()))?;
    m.registry.register(Box::new(m.raft_term.clone()))?;
    m.registry.register(Box::new(m.raft_leader.clone()))?;
    m.registry.register(Box::new(m.group_leader.clone()))?;
    m.registry.register(Box::new(m.group_applied.clone()))?;
    m.registry.register(Box::new(m.budget_used.clone()))?;
    m.registry.register(Box::new(m.budget_soft.clone()))?;
    m.registry.register(Box::new(m.prevotes.clone()))?;
    m.registry.register(Box::new(m.raft_applied.clone()))?;
    crate::actors::register_metrics(&m.registry)?;
    Ok(m)
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| build().expect("invariant: metric definitions are valid and unique"))
}

/// The event's name for logs and labels.
pub fn event_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::Submitted => "submitted",
        EventKind::Ready => "ready",
        EventKind::Leased { .. } => "leased",
        EventKind::Started => "started",
        EventKind::Completed => "completed",
        EventKind::Failed { .. } => "failed",
        EventKind::DeadLettered => "dead_lettered",
        EventKind::Cancelled => "cancelled",
        EventKind::LeaseExpired { .. } => "lease_expired",
        EventKind::TimedOut { .. } => "timed_out",
        EventKind::Requeued => "requeued",
        EventKind::Released { .. } => "released",
        EventKind::DependenciesMet => "dependencies_met",
        EventKind::Blocked { .. } => "blocked",
        EventKind::Approved { .. } => "approved",
        EventKind::Rejected { .. } => "rejected",
        EventKind::ApprovalExpired => "approval_expired",
    }
}

/// Turns applied events into metrics and log lines.
pub fn observe(events: &[Event]) {
    let m = global();
    // Counted per (kind, priority) first: one labelled-counter lookup per
    // pair and entry instead of one per event.
    let mut counts: Vec<((&'static str, &'static str), u64)> = Vec::new();
    for e in events {
        let What::Task {
            task,
            priority,
            kind,
            ..
        } = &e.what
        else {
            tracing::debug!(seq = e.seq, event = e.what.name(), detail = ?e.what, "event");
            continue;
        };
        let name = event_name(kind);
        let key = (name, priority.as_str());
        match counts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        }
        match kind {
            EventKind::DeadLettered
            | EventKind::TimedOut { .. }
            | EventKind::LeaseExpired { .. } => {
                tracing::info!(task_id = task.0, priority = priority.as_str(), event = name, detail = ?kind, "task event");
            }
            _ => {
                tracing::debug!(task_id = task.0, priority = priority.as_str(), event = name, detail = ?kind, "task event")
            }
        }
    }
    for ((name, priority), n) in counts {
        m.task_events.with_label_values(&[name, priority]).inc_by(n);
    }
}

/// Counts one pre-vote this node held (`node/prevote.rs`).
pub fn prevote(granted: bool) {
    global()
        .prevotes
        .with_label_values(&[if granted { "granted" } else { "denied" }])
        .inc();
}

/// The budget gauges, from this node's replicas: one series per limit of
/// each tenant record with a budget (a tenant label, bounded by the
/// records an admin made).
fn budgets(node: &Node, m: &Metrics) {
    m.budget_used.reset();
    m.budget_soft.reset();
    let budgets: Vec<(crate::fsm::Tenant, crate::fsm::Budget)> = node.state().read(|s| {
        s.auth()
            .tenants()
            .filter_map(|r| Some((r.name.clone(), r.settings.budget.clone()?)))
            .collect()
    });
    let now = crate::clock::now_ms();
    let visit = |f: &mut dyn FnMut(&crate::fsm::State)| crate::budget::for_groups(node, f);
    for (tenant, budget) in budgets {
        for u in crate::budget::uses(&visit, node.config(), &tenant, &budget, now) {
            let labels = [tenant.as_str(), u.period.as_str(), u.unit.as_str()];
            m.budget_used.with_label_values(&labels).set(u.ratio());
            m.budget_soft
                .with_label_values(&labels)
                .set(f64::from(u.soft_percent) / 100.0);
        }
    }
}

/// Prometheus text for `GET /metrics`.
pub fn encode(node: &Node) -> String {
    let m = global();
    let raft = node.raft().metrics().borrow().clone();
    m.raft_term.set(raft.current_term as i64);
    m.raft_leader.set(i64::from(node.is_leader()));
    m.raft_applied
        .set(raft.last_applied.map_or(0, |l| l.index) as i64);
    for group in node.groups() {
        let label = group.id().to_string();
        let g = group.raft().metrics().borrow().last_applied;
        m.group_leader
            .with_label_values(&[label.as_str()])
            .set(i64::from(group.is_leader()));
        m.group_applied
            .with_label_values(&[label.as_str()])
            .set(g.map_or(0, |l| l.index) as i64);
    }
    let mut depth = crate::fsm::Depth::default();
    for group in node.queue_groups() {
        depth.add(group.state().read(|s| s.depth()));
    }
    for p in Priority::URGENT_FIRST {
        for s in TaskStatus::ALL {
            m.tasks
                .with_label_values(&[p.as_str(), s.as_str()])
                .set(depth.count(Some(p), s, None) as i64);
        }
    }
    budgets(node, m);
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut buf) {
        tracing::error!(error = %e, "metrics encoding");
    }
    String::from_utf8(buf).unwrap_or_default()
}
