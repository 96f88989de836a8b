//! Supervision events: the one function ([`Observer::emit`]) that turns each
//! into a log line, a metric and an observer message, so they cannot drift
//! (CONVENTIONS 13).

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;

/// Counter: children restarted (respawned after a failure), by supervisor.
pub const METRIC_RESTARTS: &str = "godel_actor_restarts_total";
/// Counter: supervisors that escalated (failed) after a child tripped the
/// intensity limit, by supervisor.
pub const METRIC_ESCALATIONS: &str = "godel_actor_escalations_total";
/// Counter: children dropped after tripping the intensity limit under
/// `OnExhausted::GiveUp`, by supervisor.
pub const METRIC_GIVE_UPS: &str = "godel_actor_give_ups_total";
/// Counter: supervision events the observer channel was too full to take.
pub const METRIC_EVENTS_DROPPED: &str = "godel_actor_events_dropped_total";
/// The one label of the supervision counters: the supervisor's name. Names are
/// roles (`node`, `gateways`), never ids, so the label stays bounded.
pub const LABEL_SUPERVISOR: &str = "supervisor";

/// Something a supervisor did about a child. Every variant names the
/// supervisor and the child (the child's name within its supervisor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SupervisorEvent {
    /// A child was added and started.
    Started {
        /// Supervisor name.
        supervisor: String,
        /// Child name.
        child: String,
    },
    /// A child failed (or a sibling failed, under one-for-all) and will be
    /// restarted after `after`.
    Restarting {
        /// Supervisor name.
        supervisor: String,
        /// Child name.
        child: String,
        /// Failure number within the policy window, 1-based.
        attempt: u32,
        /// Backoff before the restart.
        after: Duration,
        /// Why the child went down.
        error: String,
    },
    /// A restarted child is running again.
    Restarted {
        /// Supervisor name.
        supervisor: String,
        /// Child name.
        child: String,
        /// Failure number within the policy window, 1-based.
        attempt: u32,
    },
    /// A child tripped the intensity limit; the supervisor fails so its parent
    /// sees the failure.
    Escalated {
        /// Supervisor name.
        supervisor: String,
        /// Child name.
        child: String,
        /// The child's last failure.
        error: String,
    },
    /// A child tripped the intensity limit and was dropped.
    GaveUp {
        /// Supervisor name.
        supervisor: String,
        /// Child name.
        child: String,
        /// The child's last failure.
        error: String,
    },
    /// A child stopped cleanly and was forgotten (not restarted).
    Stopped {
        /// Supervisor name.
        supervisor: String,
        /// Child name.
        child: String,
        /// The stop reason, if the child gave one.
        reason: Option<String>,
    },
    /// A child was removed on request and told to stop.
    Removed {
        /// Supervisor name.
        supervisor: String,
        /// Child name.
        child: String,
    },
}

impl SupervisorEvent {
    /// The event's name for logs and labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::Restarting { .. } => "restarting",
            Self::Restarted { .. } => "restarted",
            Self::Escalated { .. } => "escalated",
            Self::GaveUp { .. } => "gave_up",
            Self::Stopped { .. } => "stopped",
            Self::Removed { .. } => "removed",
        }
    }

    /// The supervisor that emitted the event.
    pub fn supervisor(&self) -> &str {
        match self {
            Self::Started { supervisor, .. }
            | Self::Restarting { supervisor, .. }
            | Self::Restarted { supervisor, .. }
            | Self::Escalated { supervisor, .. }
            | Self::GaveUp { supervisor, .. }
            | Self::Stopped { supervisor, .. }
            | Self::Removed { supervisor, .. } => supervisor,
        }
    }

    /// The child the event is about.
    pub fn child(&self) -> &str {
        match self {
            Self::Started { child, .. }
            | Self::Restarting { child, .. }
            | Self::Restarted { child, .. }
            | Self::Escalated { child, .. }
            | Self::GaveUp { child, .. }
            | Self::Stopped { child, .. }
            | Self::Removed { child, .. } => child,
        }
    }
}

/// The supervision counters. Register them with [`register_metrics`].
pub struct SupervisionMetrics {
    /// [`METRIC_RESTARTS`].
    pub restarts: IntCounterVec,
    /// [`METRIC_ESCALATIONS`].
    pub escalations: IntCounterVec,
    /// [`METRIC_GIVE_UPS`].
    pub give_ups: IntCounterVec,
    /// [`METRIC_EVENTS_DROPPED`].
    pub events_dropped: IntCounterVec,
}

fn counter(name: &str, help: &str) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), &[LABEL_SUPERVISOR])
}

fn build() -> prometheus::Result<SupervisionMetrics> {
    Ok(SupervisionMetrics {
        restarts: counter(METRIC_RESTARTS, "Children restarted after a failure")?,
        escalations: counter(
            METRIC_ESCALATIONS,
            "Supervisors that failed because a child tripped the restart intensity limit",
        )?,
        give_ups: counter(
            METRIC_GIVE_UPS,
            "Children dropped after tripping the restart intensity limit",
        )?,
        events_dropped: counter(
            METRIC_EVENTS_DROPPED,
            "Supervision events dropped because the observer channel was full",
        )?,
    })
}

/// The process-wide supervision counters.
pub fn metrics() -> &'static SupervisionMetrics {
    static M: OnceLock<SupervisionMetrics> = OnceLock::new();
    M.get_or_init(|| build().expect("invariant: supervision metric definitions are valid"))
}

/// Registers the supervision counters with `registry` (call once per
/// registry, e.g. from `metrics::build`).
pub fn register_metrics(registry: &Registry) -> prometheus::Result<()> {
    let m = metrics();
    registry.register(Box::new(m.restarts.clone()))?;
    registry.register(Box::new(m.escalations.clone()))?;
    registry.register(Box::new(m.give_ups.clone()))?;
    registry.register(Box::new(m.events_dropped.clone()))?;
    Ok(())
}

/// Where a supervision tree reports its [`SupervisorEvent`]s. Cloned into
/// every supervisor of the tree. The channel is bounded and never blocks a
/// supervisor: when it is full the event is dropped and counted
/// ([`METRIC_EVENTS_DROPPED`]); the log line and counters are always written.
#[derive(Clone, Debug, Default)]
pub struct Observer {
    tx: Option<mpsc::Sender<SupervisorEvent>>,
}

impl Observer {
    /// Logs and counts only; no channel.
    pub fn none() -> Self {
        Self { tx: None }
    }

    /// An observer with a channel holding up to `capacity` events (at least
    /// one), and its receiving end.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<SupervisorEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx: Some(tx) }, rx)
    }

    /// Logs, counts and forwards one event.
    pub fn emit(&self, event: SupervisorEvent) {
        log_and_count(&event);
        if let Some(tx) = &self.tx
            && let Err(mpsc::error::TrySendError::Full(e)) = tx.try_send(event)
        {
            metrics()
                .events_dropped
                .with_label_values(&[e.supervisor()])
                .inc();
        }
    }
}

fn log_and_count(event: &SupervisorEvent) {
    let m = metrics();
    let (sup, child, name) = (event.supervisor(), event.child(), event.name());
    match event {
        SupervisorEvent::Restarting {
            attempt,
            after,
            error,
            ..
        } => {
            tracing::warn!(supervisor = sup, child, event = name, attempt, after_ms = after.as_millis() as u64, error = %error, "child failed; restart scheduled");
        }
        SupervisorEvent::Restarted { attempt, .. } => {
            m.restarts.with_label_values(&[sup]).inc();
            tracing::info!(
                supervisor = sup,
                child,
                event = name,
                attempt,
                "child restarted"
            );
        }
        SupervisorEvent::Escalated { error, .. } => {
            m.escalations.with_label_values(&[sup]).inc();
            tracing::error!(supervisor = sup, child, event = name, error = %error, "restart intensity exceeded; escalating");
        }
        SupervisorEvent::GaveUp { error, .. } => {
            m.give_ups.with_label_values(&[sup]).inc();
            tracing::error!(supervisor = sup, child, event = name, error = %error, "restart intensity exceeded; child dropped");
        }
        SupervisorEvent::Stopped { reason, .. } => {
            tracing::info!(supervisor = sup, child, event = name, reason = ?reason, "child stopped");
        }
        SupervisorEvent::Started { .. } | SupervisorEvent::Removed { .. } => {
            tracing::debug!(supervisor = sup, child, event = name, "child lifecycle");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_channel_drops_and_counts() {
        let (obs, mut rx) = Observer::channel(1);
        let ev = |c: &str| SupervisorEvent::Removed {
            supervisor: "events-test".into(),
            child: c.into(),
        };
        obs.emit(ev("a"));
        obs.emit(ev("b"));
        assert_eq!(rx.try_recv().unwrap().child(), "a");
        assert!(rx.try_recv().is_err());
        let dropped = metrics()
            .events_dropped
            .with_label_values(&["events-test"])
            .get();
        assert_eq!(dropped, 1);
    }

    #[test]
    fn metrics_register_once_per_registry() {
        let r = Registry::new();
        register_metrics(&r).unwrap();
        assert!(register_metrics(&r).is_err());
    }
}
