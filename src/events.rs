//! The event stream's hub on one node: the events the state machine
//! applies, kept in a bounded buffer for resuming and fanned out to live
//! subscribers (`GET /api/v1/events`, `api::events`).
//!
//! - **Cluster-wide, once, in order.** Every node applies the same log and
//!   so makes the same events with the same `seq` (`fsm::Event`); the hub
//!   of any node serves the whole cluster's events, each once, in commit
//!   order, and a client may resume on another node with the seq it saw.
//! - **Bounded.** The buffer keeps the last `api.events_buffer` events;
//!   the live channel holds `api.events_queue` per subscriber before the slowest one
//!   is told it lagged. Neither blocks the state machine nor grows.
//! - **Honest about holes.** When the hub misses events (it fell behind
//!   the state machine's channel, or a snapshot replaced the state), it
//!   says so: resuming from before what the buffer holds, or being live
//!   across a hole, yields a `Gap`.
//! - **Patterns** are NATS subjects: `task.*` matches one segment, `>` the
//!   rest (`gateway.>`, `>`).
//!
//! The buffer holds the state machine's own published entries (no copy
//! per event); JSON is rendered once per event, by the first subscriber
//! that sends it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde_json::{Value, json};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use crate::fsm::{AgentChange, Event, EventKind, GatewayChange, NodeChange, What};
use crate::store::AppliedEvents;

/// Events kept for resuming, by default (`api.events_buffer`).
pub const DEFAULT_CAPACITY: usize = 32_768;
/// Events queued per live subscriber before it is told it lagged, by
/// default (`api.events_queue`).
pub const LIVE_CAPACITY: usize = 16_384;
/// Most event-stream connections open on one node at once.
pub const MAX_SUBSCRIBERS: usize = 1024;
/// Most patterns one subscriber holds.
pub const MAX_PATTERNS: usize = 64;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 128;

/// The events of one applied log entry, kept as the state machine
/// published them (no copy per event), with each event's JSON rendered
/// the first time a subscriber sends it.
#[derive(Debug)]
pub struct Batch {
    /// The group that applied it: events of a queue shard say so.
    group: u32,
    applied: Arc<AppliedEvents>,
    json: Box<[OnceLock<String>]>,
}

/// One event of a [`Batch`]: what the stream sends.
#[derive(Clone, Debug)]
pub struct StreamEvent {
    batch: Arc<Batch>,
    i: usize,
}

impl StreamEvent {
    fn event(&self) -> &Event {
        &self.batch.applied.events[self.i]
    }

    /// Its place in the cluster's history.
    pub fn seq(&self) -> u64 {
        self.event().seq
    }

    /// What happened.
    pub fn what(&self) -> &What {
        &self.event().what
    }

    /// When it happened (the state's clock), ms since the epoch.
    pub fn time_ms(&self) -> u64 {
        self.batch.applied.time_ms
    }

    /// `{"seq", "type", "time", "tenant", "data"}`, and `"group"` for a
    /// queue shard's event (its `seq` counts in that group), rendered once.
    pub fn json(&self) -> &str {
        self.batch.json[self.i].get_or_init(|| {
            let what = self.what();
            let mut v = json!({
                "seq": self.seq(),
                "type": what.name(),
                "time": self.time_ms(),
                "tenant": what.tenant(),
                "data": data(what),
            });
            if self.batch.group > 0 {
                v["group"] = json!(self.batch.group);
            }
            v.to_string()
        })
    }
}

/// The `data` of an event.
fn data(what: &What) -> Value {
    match what {
        What::Task {
            task,
            priority,
            kind,
            ..
        } => {
            let mut d = json!({"id": task.0, "priority": priority});
            match kind {
                EventKind::Leased { token, agent } => {
                    d["token"] = json!(token.0);
                    d["agent"] = json!(agent.0);
                }
                EventKind::Failed { retry_at_ms } => d["retry_at_ms"] = json!(retry_at_ms),
                EventKind::LeaseExpired { token }
                | EventKind::TimedOut { token }
                | EventKind::Released { token } => d["token"] = json!(token.0),
                _ => {}
            }
            d
        }
        What::Session {
            id,
            gateway,
            state,
            reason,
            ..
        } => json!({"id": id, "gateway": gateway.0, "state": state, "reason": reason}),
        What::Checkpoint {
            session, seq, name, ..
        } => {
            json!({"id": session, "seq": seq, "name": name})
        }
        What::Gateway { id, change } => match change {
            GatewayChange::Health { health, circuit } => {
                json!({"id": id.0, "health": health, "circuit": circuit})
            }
            GatewayChange::Placed { owner, token } => {
                json!({"id": id.0, "owner": owner, "placement_token": token})
            }
            GatewayChange::Process { state } => json!({"id": id.0, "process": state}),
            _ => json!({"id": id.0}),
        },
        What::Agent { id, change } => match change {
            AgentChange::Registered { gateway } | AgentChange::Updated { gateway } => {
                json!({"id": id.0, "gateway": gateway.0})
            }
            AgentChange::Online { node } => json!({"id": id.0, "node": node}),
            AgentChange::Circuit { circuit } => json!({"id": id.0, "circuit": circuit}),
            AgentChange::Deregistered | AgentChange::Silent | AgentChange::Heard => {
                json!({"id": id.0})
            }
        },
        What::Node { id, change } => match change {
            NodeChange::Joined { voter } => json!({"id": id, "voter": voter}),
            NodeChange::LeaderChanged { term } => json!({"id": id, "term": term}),
            NodeChange::Left | NodeChange::Draining | NodeChange::Undrained => json!({"id": id}),
        },
        What::Budget(a) => json!({
            "period": a.period.as_str(),
            "unit": a.unit.as_str(),
            "used": a.used,
            "limit": a.limit,
        }),
        What::Audit(a) => json!({
            "seq": a.seq,
            "actor": &*a.actor,
            "action": &*a.action,
            "target": a.target.to_string(),
            "outcome": &*a.outcome,
        }),
    }
}

/// What a live subscriber receives.
#[derive(Clone, Debug)]
pub enum Live {
    /// The next event.
    Event(StreamEvent),
    /// The hub missed events `from..=to`.
    Gap {
        /// First missed seq.
        from: u64,
        /// Last missed seq.
        to: u64,
    },
}

/// The hub of one node.
#[derive(Debug)]
pub struct EventHub {
    /// The Raft group whose events it holds (0: the meta group).
    group: u32,
    ring: Mutex<Ring>,
    live: broadcast::Sender<Live>,
    subscribers: AtomicUsize,
}

/// The buffer: every event after `complete_after` up to `last_seq`, in
/// the entries that carried them.
#[derive(Debug)]
struct Ring {
    batches: VecDeque<Arc<Batch>>,
    /// Events in `batches`.
    events: usize,
    capacity: usize,
    complete_after: u64,
    last_seq: u64,
}

/// Where a new subscriber starts.
#[derive(Debug)]
pub struct Subscription {
    /// Buffered events after the seq asked for, oldest first.
    pub replay: Vec<StreamEvent>,
    /// Events after the seq asked for that the buffer no longer holds.
    pub gap: Option<(u64, u64)>,
    /// Later events.
    pub live: broadcast::Receiver<Live>,
    /// Live events up to this seq were replayed (or are older than what
    /// was asked for): skip them.
    pub skip_through: u64,
}

impl EventHub {
    /// A hub keeping `capacity` events, queueing `queue` per subscriber,
    /// whose history starts after `last_seq`.
    pub fn new(capacity: usize, queue: usize, last_seq: u64) -> EventHub {
        Self::for_group(0, capacity, queue, last_seq)
    }

    /// [`EventHub::new`] for the events of Raft group `group`.
    pub fn for_group(group: u32, capacity: usize, queue: usize, last_seq: u64) -> EventHub {
        EventHub {
            group,
            ring: Mutex::new(Ring {
                batches: VecDeque::new(),
                events: 0,
                capacity: capacity.max(1),
                complete_after: last_seq,
                last_seq,
            }),
            live: broadcast::channel(queue.max(1)).0,
            subscribers: AtomicUsize::new(0),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last seq seen, and the first one the buffer still holds.
    pub fn position(&self) -> (u64, u64) {
        let ring = self.ring();
        (ring.last_seq, ring.complete_after + 1)
    }

    /// Takes in what one log entry (or a snapshot) applied. One entry's
    /// events are numbered one after another, so an entry is either new
    /// or seen already (replayed at start-up).
    pub fn ingest(&self, applied: &Arc<AppliedEvents>) {
        let mut ring = self.ring();
        if applied.snapshot_installed {
            if applied.last_seq > ring.last_seq {
                self.hole(&mut ring, applied.last_seq);
            }
            return;
        }
        let Some(first) = applied.events.first().map(|e| e.seq) else {
            return;
        };
        if first <= ring.last_seq {
            return;
        }
        if first > ring.last_seq + 1 {
            self.hole(&mut ring, first - 1);
        }
        let n = applied.events.len();
        let batch = Arc::new(Batch {
            group: self.group,
            applied: Arc::clone(applied),
            json: (0..n).map(|_| OnceLock::new()).collect(),
        });
        ring.batches.push_back(Arc::clone(&batch));
        ring.events += n;
        while ring.events > ring.capacity && ring.batches.len() > 1 {
            let Some(old) = ring.batches.pop_front() else {
                break;
            };
            ring.events -= old.applied.events.len();
            ring.complete_after = old
                .applied
                .events
                .last()
                .map_or(ring.complete_after, |e| e.seq);
        }
        ring.last_seq = applied.events[n - 1].seq;
        // Sent under the lock, so a subscriber that took the buffer under
        // it sees every later event live; not at all when nobody listens.
        if self.live.receiver_count() > 0 {
            for i in 0..n {
                let e = StreamEvent {
                    batch: Arc::clone(&batch),
                    i,
                };
                let _ = self.live.send(Live::Event(e));
            }
        }
    }

    /// Records that events after `last_seq` up to `to` were missed.
    fn hole(&self, ring: &mut Ring, to: u64) {
        let from = ring.last_seq + 1;
        crate::metrics::global()
            .events_missed
            .inc_by(to - ring.last_seq);
        tracing::warn!(from, to, "event stream buffer missed events");
        ring.batches.clear();
        ring.events = 0;
        ring.complete_after = to;
        ring.last_seq = to;
        let _ = self.live.send(Live::Gap { from, to });
    }

    /// Starts a subscriber: live from now, or replaying from after `since`.
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let ring = self.ring();
        let live = self.live.subscribe();
        let Some(since) = since else {
            return Subscription {
                replay: Vec::new(),
                gap: None,
                live,
                skip_through: ring.last_seq,
            };
        };
        let gap = (since < ring.complete_after).then_some((since + 1, ring.complete_after));
        let replay = ring
            .batches
            .iter()
            .filter(|b| b.applied.events.last().is_some_and(|e| e.seq > since))
            .flat_map(|b| {
                (0..b.applied.events.len()).map(|i| StreamEvent {
                    batch: Arc::clone(b),
                    i,
                })
            })
            .filter(|e| e.seq() > since)
            .collect();
        Subscription {
            replay,
            gap,
            live,
            skip_through: ring.last_seq.max(since),
        }
    }

    /// Counts a subscriber in, unless `MAX_SUBSCRIBERS` are open.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut n = self.subscribers.load(Ordering::Relaxed);
        loop {
            if n >= MAX_SUBSCRIBERS {
                return None;
            }
            match self.subscribers.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    crate::metrics::global().event_subscribers.inc();
                    return Some(Admitted(Arc::clone(self)));
                }
                Err(now) => n = now,
            }
        }
    }
}

/// An open subscriber, counted until dropped.
#[derive(Debug)]
pub struct Admitted(Arc<EventHub>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::global().event_subscribers.dec();
    }
}

/// Feeds `hub` from `rx` (the state machine's applied events, subscribed
/// to before the hub's `last_seq` was read, so nothing falls between the
/// two: what was applied in between is skipped as already counted) until
/// `shutdown`.
pub async fn run(
    hub: Arc<EventHub>,
    mut rx: broadcast::Receiver<Arc<AppliedEvents>>,
    shutdown: CancellationToken,
) {
    loop {
        let applied = tokio::select! {
            () = shutdown.cancelled() => return,
            applied = rx.recv() => applied,
        };
        match applied {
            Ok(applied) => hub.ingest(&applied),
            // The next entry's first seq shows the hole.
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(entries = n, "event stream fell behind the state machine");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// A subscription pattern: dot-separated segments, `*` for any one
/// segment, `>` (last only) for one or more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Checks `s`; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() || s.len() > MAX_PATTERN_BYTES {
            return Err(format!(
                "pattern `{s}` must be 1 to {MAX_PATTERN_BYTES} bytes"
            ));
        }
        let segments: Vec<&str> = s.split('.').collect();
        for (i, seg) in segments.iter().enumerate() {
            let ok = match *seg {
                "" => false,
                ">" => i == segments.len() - 1,
                "*" => true,
                seg => seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            };
            if !ok {
                return Err(format!(
                    "pattern `{s}`: segment `{seg}` must be a lowercase name, `*`, or a final `>`"
                ));
            }
        }
        Ok(Pattern(s.to_owned()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether event type `name` (`task.completed`) matches.
    pub fn matches(&self, name: &str) -> bool {
        let mut want = self.0.split('.');
        let mut have = name.split('.');
        loop {
            match (want.next(), have.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(w), Some(h)) if w == h => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Priority, TaskId, Tenant};

    fn task_event(seq: u64) -> Event {
        Event {
            seq,
            what: What::Task {
                task: TaskId(seq),
                tenant: Tenant::from("acme"),
                priority: Priority::High,
                kind: EventKind::Completed,
            },
        }
    }

    fn applied(seqs: std::ops::RangeInclusive<u64>) -> Arc<AppliedEvents> {
        Arc::new(AppliedEvents {
            index: *seqs.end(),
            last_seq: *seqs.end(),
            events: seqs.map(task_event).collect(),
            time_ms: 7,
            snapshot_installed: false,
        })
    }

    #[test]
    fn patterns_match_like_nats_subjects() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("task.*").matches("task.created"));
        assert!(!p("task.*").matches("gateway.health"));
        assert!(p("gateway.>").matches("gateway.health"));
        assert!(!p("gateway.>").matches("gateway"));
        assert!(p(">").matches("node.leader_changed"));
        assert!(p("node.leader_changed").matches("node.leader_changed"));
        assert!(!p("node.leader_changed").matches("node.left"));
        assert!(p("*.completed").matches("task.completed"));
        assert!(!p("task").matches("task.created"));
        for bad in [
            "",
            "task.",
            ".task",
            "task.>.x",
            "Task.*",
            "task.cre ated",
            "a..b",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Pattern::parse(&"a".repeat(MAX_PATTERN_BYTES + 1)).is_err());
    }

    #[test]
    fn a_subscriber_resumes_from_the_buffer_or_is_told_of_the_gap() {
        let hub = EventHub::new(4, 16, 0);
        for seq in 1..=6 {
            hub.ingest(&applied(seq..=seq));
        }
        assert_eq!(hub.position(), (6, 3), "the buffer holds seqs 3..=6");
        let sub = hub.subscribe(Some(4));
        assert_eq!(sub.gap, None);
        let seqs: Vec<u64> = sub.replay.iter().map(StreamEvent::seq).collect();
        assert_eq!(seqs, [5, 6]);
        let sub = hub.subscribe(Some(0));
        assert_eq!(sub.gap, Some((1, 2)));
        assert_eq!(sub.replay.len(), 4);
        // Ahead of this node (seen on another): nothing to replay, and
        // live events up to it are skipped.
        let sub = hub.subscribe(Some(9));
        assert!(sub.replay.is_empty() && sub.gap.is_none());
        assert_eq!(sub.skip_through, 9);
    }

    #[test]
    fn live_subscribers_see_each_event_once_and_holes_as_gaps() {
        let hub = EventHub::new(100, 16, 0);
        let mut sub = hub.subscribe(None);
        hub.ingest(&applied(1..=2));
        hub.ingest(&applied(1..=2)); // a replayed entry
        hub.ingest(&applied(3..=3));
        hub.ingest(&applied(6..=6)); // 4 and 5 missed
        let mut got = Vec::new();
        while let Ok(live) = sub.live.try_recv() {
            got.push(match live {
                Live::Event(e) => format!("{}", e.seq()),
                Live::Gap { from, to } => format!("gap {from}-{to}"),
            });
        }
        assert_eq!(got, ["1", "2", "3", "gap 4-5", "6"]);
        let snapshot = Arc::new(AppliedEvents {
            index: 1,
            events: Vec::new(),
            time_ms: 7,
            last_seq: 10,
            snapshot_installed: true,
        });
        hub.ingest(&snapshot);
        assert!(matches!(
            sub.live.try_recv(),
            Ok(Live::Gap { from: 7, to: 10 })
        ));
        assert_eq!(hub.position(), (10, 11));
    }

    #[test]
    fn json_has_the_documented_shape() {
        let mut one = Arc::unwrap_or_clone(applied(3..=3));
        one.time_ms = 1_700_000_000_000;
        let hub = EventHub::new(4, 4, 2);
        hub.ingest(&Arc::new(one));
        let e = hub.subscribe(Some(2)).replay.remove(0);
        let v: Value = serde_json::from_str(e.json()).unwrap();
        assert_eq!(
            v,
            json!({"seq": 3, "type": "task.completed", "time": 1_700_000_000_000u64,
                   "tenant": "acme", "data": {"id": 3, "priority": "high"}})
        );
    }

    #[test]
    fn subscribers_are_bounded() {
        let hub = Arc::new(EventHub::new(1, 1, 0));
        let held: Vec<Admitted> = (0..MAX_SUBSCRIBERS).map_while(|_| hub.admit()).collect();
        assert_eq!(held.len(), MAX_SUBSCRIBERS);
        assert!(hub.admit().is_none());
        drop(held);
        assert!(hub.admit().is_some());
    }
}
