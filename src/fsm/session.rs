//! Gateway sessions in the replicated state: one record per conversation on
//! a gateway, keyed for affinity by its session key while it lives.
//!
//! A session is opened by the node that owns its gateway, moves through the
//! lifecycle table ([`SessionState::can_become`]) by commands, and ends in a
//! terminal state. A session with a time limit is ended as `timeout` by the
//! state machine's clock, like a lease. While a session lives, its key maps
//! to it, so tasks with that key go to the same session.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::command::{Outcome, Rejection, Reply, check_name};
use super::event::{Event, EventKind, What};
use super::registry::{GatewayId, not_found};
use super::retry::mix;
use super::state::State;
use super::task::{AgentId, SessionKey, Task, TaskId, Tenant};

/// A session's identity, from a counter.
pub type SessionId = u64;

/// The key a gateway knows a tenant's session by: `<tenant>~<key>`.
/// Affinity keys are per tenant, so the gateway-side conversation must be
/// too; `~` is outside the tenant alphabet, so no two (tenant, key) pairs
/// give the same name.
pub fn gateway_session_key(tenant: &Tenant, key: &SessionKey) -> SessionKey {
    SessionKey(format!("{tenant}~{key}"))
}

/// Where a session is in its life. Every legal move is in
/// [`SessionState::can_become`].
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Recorded, nothing opened yet.
    Created,
    /// Being opened on the gateway.
    Initializing,
    /// Open and idle; takes the next task with its session key.
    Ready,
    /// Running a task.
    Running,
    /// Closing after its last task.
    Completing,
    /// Closed normally. Terminal.
    Completed,
    /// The gateway reported a failure. Terminal.
    Failed,
    /// Killed by an operator or a cancelled task. Terminal.
    Cancelled,
    /// Ran past its time limit. Terminal.
    Timeout,
    /// Lost (gateway gone, node dead). Terminal.
    Error,
    /// Held by an operator: no task runs in it until it is resumed (its
    /// conversation and checkpoints stay).
    Paused,
    /// Resumed: its next task continues it where it was.
    Resuming,
    /// To continue on another gateway (its own failed, or an operator
    /// moved it): its next task opens it there, carrying its last
    /// checkpoint's turns.
    Migrating,
    /// Ended a day ago and compacted: its turns and checkpoints are
    /// dropped; `ended_as` says how it ended. Its record goes 30 days
    /// later. Terminal.
    Archived,
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SessionState {
    /// The state's name in the API (snake_case).
    pub fn as_str(self) -> &'static str {
        use SessionState::*;
        match self {
            Created => "created",
            Initializing => "initializing",
            Ready => "ready",
            Running => "running",
            Completing => "completing",
            Completed => "completed",
            Failed => "failed",
            Cancelled => "cancelled",
            Timeout => "timeout",
            Error => "error",
            Paused => "paused",
            Resuming => "resuming",
            Migrating => "migrating",
            Archived => "archived",
        }
    }

    /// The one table of legal session transitions.
    pub fn can_become(self, to: SessionState) -> bool {
        use SessionState::*;
        if self.is_terminal() {
            // An ended session is only archived, once.
            return self != Archived && to == Archived;
        }
        matches!(
            (self, to),
            (Created, Initializing | Paused | Migrating)
                | (Initializing, Ready | Paused | Migrating)
                | (Ready, Running | Completing | Paused | Migrating)
                | (Running, Ready | Completing | Paused | Migrating)
                | (Paused, Resuming | Migrating)
                | (Resuming, Running | Completing | Paused | Migrating)
                | (Migrating, Initializing | Paused | Completing)
                | (Completing, Completed)
        ) || matches!(to, Failed | Cancelled | Timeout | Error)
    }

    /// Whether the session has ended.
    pub fn is_terminal(self) -> bool {
        use SessionState::*;
        matches!(
            self,
            Completed | Failed | Cancelled | Timeout | Error | Archived
        )
    }

    /// Whether its next task with its key may be leased to an agent now
    /// (subject to which agent: [`Sessions::admits`]).
    fn takes_a_task(self) -> bool {
        matches!(
            self,
            SessionState::Ready | SessionState::Resuming | SessionState::Migrating
        )
    }
}

/// What the state knows about a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Its id.
    pub id: SessionId,
    /// The gateway it runs on.
    pub gateway: GatewayId,
    /// The tenant whose tasks run in it: affinity keys are per tenant, so
    /// two tenants using the same key never share a conversation.
    pub tenant: Tenant,
    /// The affinity key, if any.
    pub session_key: Option<SessionKey>,
    /// The agent driving it.
    pub agent: Option<AgentId>,
    /// Where it is in its life.
    pub state: SessionState,
    /// The task it runs now.
    pub task: Option<TaskId>,
    /// When it is ended as `timeout`, ms since the epoch.
    pub deadline_ms: Option<u64>,
    /// Why it ended, when it did not complete.
    pub reason: Option<String>,
    /// Closed after this long `ready` with no task, in ms (0: never).
    pub idle_ms: u64,
    /// Creation time.
    pub created_at_ms: u64,
    /// Time of the last change.
    pub updated_at_ms: u64,
    /// Its gateway-side conversations so far, less one: each move to
    /// another gateway starts the next under a key of its own
    /// ([`SessionRecord::gateway_key`]).
    pub generation: u32,
    /// Tasks completed in it.
    pub turns: u64,
    /// Tokens in its tasks' attempts reported, in.
    pub input_tokens: u64,
    /// Tokens out.
    pub output_tokens: u64,
    /// Its latest turns (at most [`Sessions::MAX_TAIL`]): what a
    /// checkpoint keeps.
    pub tail: Vec<Arc<Turn>>,
    /// Its last checkpoint's number (0: none yet).
    pub checkpoint_seq: u64,
    /// A checkpoint after every this many turns (0: named ones only).
    pub checkpoint_every: u32,
    /// On a gateway that does not hold its conversation yet: the
    /// checkpoint whose turns its next task carries there. Cleared by the
    /// first task completed on the new gateway.
    pub carry: Option<u64>,
    /// Asked while a task ran in it: done when that task's attempt ends.
    pub after_task: Option<AfterTask>,
    /// Whether it must continue on a gateway that does not hold its
    /// conversation (it is migrating, or paused while it was): its next
    /// task opens it there.
    pub moving: bool,
    /// While moving: the gateway it must go to (none: any that can run
    /// its next task).
    pub target: Option<GatewayId>,
    /// Once archived: the state it ended in.
    pub ended_as: Option<SessionState>,
}

impl SessionRecord {
    /// The key of its gateway-side conversation: `<tenant>~<key>`, then
    /// `~<generation>` from its first move on (`~` is outside both
    /// alphabets, so keys never collide). `None` without a session key.
    pub fn gateway_key(&self) -> Option<SessionKey> {
        self.gateway_key_at(self.generation)
    }

    /// The key of its conversation `generation` (see
    /// [`SessionRecord::gateway_key`]).
    pub fn gateway_key_at(&self, generation: u32) -> Option<SessionKey> {
        let base = gateway_session_key(&self.tenant, self.session_key.as_ref()?);
        Some(match generation {
            0 => base,
            g => SessionKey(format!("{base}~{g}")),
        })
    }
}

/// What a session does once the task it runs ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AfterTask {
    /// It pauses.
    Pause,
    /// It migrates (to the gateway named, or any).
    Migrate(Option<GatewayId>),
}

/// One task's turn in a session, as a checkpoint keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// The task.
    pub task: TaskId,
    /// When it completed.
    pub at_ms: u64,
    /// What it asked (its payload's `message`, or the payload), cut to
    /// [`Sessions::MAX_TURN_BYTES`].
    pub prompt: String,
    /// What it answered (its result's `text`, or the result), cut the
    /// same way.
    pub reply: String,
}

/// A session's checkpoint: what another gateway needs to continue it. Only
/// a live session's latest checkpoint keeps its turns; older ones, and an
/// ended session's, keep the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Its number in the session, from 1.
    pub seq: u64,
    /// The name an operator gave it (none: taken automatically).
    pub name: Option<String>,
    /// When it was taken.
    pub at_ms: u64,
    /// The session's turns then.
    pub turns: u64,
    /// Its tokens then, in.
    pub input_tokens: u64,
    /// And out.
    pub output_tokens: u64,
    /// The gateway it ran on.
    pub gateway: GatewayId,
    /// Where the gateway keeps the conversation: its gateway-side session
    /// key (for OpenClaw, the key of its transcript).
    pub transcript_ref: Option<SessionKey>,
    /// Its latest turns, oldest first.
    pub transcript: Vec<Arc<Turn>>,
}

/// Sessions and their indexes, part of [`State`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    last_id: SessionId,
    records: BTreeMap<SessionId, Arc<SessionRecord>>,
    /// Live sessions by tenant and key (affinity).
    by_key: BTreeMap<(Tenant, SessionKey), SessionId>,
    /// Live sessions with a time limit, by deadline.
    deadlines: BTreeSet<(u64, SessionId)>,
    /// Idle sessions that close for idleness, by closing time.
    idle: BTreeSet<(u64, SessionId)>,
    /// Live sessions per gateway (backpressure).
    live_by_gateway: BTreeMap<GatewayId, u32>,
    /// Each session's latest checkpoints (at most
    /// [`Sessions::MAX_CHECKPOINTS`]), oldest first.
    checkpoints: BTreeMap<SessionId, Vec<Arc<Checkpoint>>>,
    /// Ended sessions by the time they are archived, and archived ones by
    /// the time their record goes.
    archive: BTreeSet<(u64, SessionId)>,
}

/// A session to open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    /// The gateway (must be registered).
    pub gateway: GatewayId,
    /// Whose session it is.
    pub tenant: Tenant,
    /// Affinity key: refused while another live session of the tenant holds it.
    pub session_key: Option<SessionKey>,
    /// The agent driving it.
    pub agent: Option<AgentId>,
    /// Longest life, in ms.
    pub time_limit_ms: Option<u64>,
}

/// Longest reason kept, in bytes.
const MAX_REASON_BYTES: usize = 1024;

impl Sessions {
    /// Turns a session (and a checkpoint) keeps.
    pub const MAX_TAIL: usize = 8;
    /// Longest prompt or reply a turn keeps, in bytes.
    pub const MAX_TURN_BYTES: usize = 1024;
    /// Checkpoints a session keeps (the oldest go first).
    pub const MAX_CHECKPOINTS: usize = 8;
    /// How long an ended session stays as it ended before it is archived.
    pub const ARCHIVE_AFTER_MS: u64 = 86_400_000;
    /// How long an archived session is kept before its record goes.
    pub const KEEP_ARCHIVED_MS: u64 = 30 * 86_400_000;

    /// One live session fewer on `gateway`.
    fn leave_gateway(&mut self, gateway: &GatewayId) {
        if let Some(n) = self.live_by_gateway.get_mut(gateway) {
            *n -= 1;
            if *n == 0 {
                self.live_by_gateway.remove(gateway);
            }
        }
    }

    /// Session `id`'s checkpoints, oldest first.
    pub fn checkpoints(&self, id: SessionId) -> &[Arc<Checkpoint>] {
        self.checkpoints.get(&id).map_or(&[], Vec::as_slice)
    }

    /// The last session id handed out (0: none yet).
    pub(crate) fn last_id(&self) -> SessionId {
        self.last_id
    }

    /// One session.
    pub fn get(&self, id: SessionId) -> Option<&Arc<SessionRecord>> {
        self.records.get(&id)
    }

    /// All sessions, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<SessionRecord>> {
        self.records.values()
    }

    /// The live session of `tenant` holding `key`.
    pub fn by_key(&self, tenant: &Tenant, key: &SessionKey) -> Option<&Arc<SessionRecord>> {
        // The map is keyed by owned pairs; lookups build one (two short
        // strings), which is cheaper than a second index.
        self.by_key
            .get(&(tenant.clone(), key.clone()))
            .and_then(|id| self.records.get(id))
    }

    /// The earliest session deadline, idle close or archiving.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.next_due().map(|(at, _)| at)
    }

    /// The earliest session timer: `(time, session)`.
    pub(crate) fn next_due(&self) -> Option<(u64, SessionId)> {
        [
            self.deadlines.first(),
            self.idle.first(),
            self.archive.first(),
        ]
        .into_iter()
        .flatten()
        .copied()
        .min()
    }

    /// Live sessions on `gateway`.
    pub fn live_on(&self, gateway: &GatewayId) -> u32 {
        self.live_by_gateway.get(gateway).copied().unwrap_or(0)
    }

    /// Whether a task with `key` may go to `agent` (on `gateway`) now: no
    /// live session holds the key, or the one that does is idle and takes
    /// it there: ready or resumed, on its gateway and driven by `agent` (or
    /// by no agent yet); or moving, to `gateway` if it must go there.
    pub(crate) fn admits(
        &self,
        tenant: &Tenant,
        key: &SessionKey,
        agent: &AgentId,
        gateway: &GatewayId,
    ) -> bool {
        self.by_key(tenant, key)
            .is_none_or(|s| Self::admits_in(s, agent, gateway))
    }

    /// Whether live session `s` takes its next task on `agent` (on
    /// `gateway`) now (see [`Sessions::admits`]).
    fn admits_in(s: &SessionRecord, agent: &AgentId, gateway: &GatewayId) -> bool {
        if s.task.is_some() || !s.state.takes_a_task() {
            return false;
        }
        if s.moving {
            s.target.as_ref().is_none_or(|t| t == gateway)
        } else {
            s.gateway == *gateway && s.agent.as_ref().is_none_or(|a| a == agent)
        }
    }

    /// Whether `task` may go to `agent` (on `gateway`) now, `may_open`
    /// saying whether the gateway has room for a session it would open: a
    /// task without a key, or whose key no live session holds, opens one;
    /// a live session must admit the agent, and a moving one opens anew
    /// there, so it needs the room too.
    pub(crate) fn may_take(
        &self,
        task: &super::task::Task,
        agent: &AgentId,
        gateway: &GatewayId,
        may_open: bool,
    ) -> bool {
        let Some(key) = &task.session_key else {
            return may_open;
        };
        match self.by_key(&task.tenant, key) {
            None => may_open,
            Some(s) => Self::admits_in(s, agent, gateway) && (!s.moving || may_open),
        }
    }
}

impl State {
    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub(crate) fn open_session(&mut self, open: &OpenSession) -> Outcome {
        if self.registry.gateway(&open.gateway).is_none() {
            return Err(not_found("gateway", &open.gateway));
        }
        if let Some(key) = &open.session_key {
            check_name("session_key", &key.0, true).map_err(|(f, p)| Rejection::invalid(f, p))?;
            let owned = (open.tenant.clone(), key.clone());
            if let Some(live) = self.sessions.by_key.get(&owned) {
                return Err(Rejection::invalid(
                    "session_key",
                    format!("`{key}` is held by live session {live}"),
                ));
            }
        }
        Ok(Reply::Session(self.insert_session(open, 0, 1)))
    }

    /// Records a new session (the caller checked gateway and key).
    fn insert_session(
        &mut self,
        open: &OpenSession,
        idle_ms: u64,
        checkpoint_every: u32,
    ) -> Arc<SessionRecord> {
        let now = self.clock_ms;
        self.sessions.last_id = super::state::mint(self.sessions.last_id, self.group);
        let id = self.sessions.last_id;
        let deadline_ms = open.time_limit_ms.map(|ms| now.saturating_add(ms));
        let rec = SessionRecord {
            id,
            gateway: open.gateway.clone(),
            tenant: open.tenant.clone(),
            session_key: open.session_key.clone(),
            agent: open.agent.clone(),
            state: SessionState::Created,
            task: None,
            deadline_ms,
            reason: None,
            idle_ms,
            created_at_ms: now,
            updated_at_ms: now,
            generation: 0,
            turns: 0,
            input_tokens: 0,
            output_tokens: 0,
            tail: Vec::new(),
            checkpoint_seq: 0,
            checkpoint_every,
            carry: None,
            after_task: None,
            moving: false,
            target: None,
            ended_as: None,
        };
        if let Some(key) = &rec.session_key {
            self.sessions
                .by_key
                .insert((rec.tenant.clone(), key.clone()), id);
        }
        if let Some(at) = deadline_ms {
            self.sessions.deadlines.insert((at, id));
        }
        *self
            .sessions
            .live_by_gateway
            .entry(rec.gateway.clone())
            .or_default() += 1;
        let rec = Arc::new(rec);
        self.sessions.records.insert(id, Arc::clone(&rec));
        self.notice_session(&rec);
        rec
    }

    /// Records that session `rec` is now in its state (with the reason of
    /// an end).
    fn notice_session(&mut self, rec: &SessionRecord) {
        self.notice(What::Session {
            id: rec.id,
            tenant: rec.tenant.clone(),
            gateway: rec.gateway.clone(),
            state: rec.state,
            reason: (rec.state.is_terminal() || rec.state == SessionState::Migrating)
                .then(|| rec.reason.clone())
                .flatten(),
        });
    }

    /// Moves a session along its lifecycle; terminal states free its key.
    pub(crate) fn move_session(
        &mut self,
        id: SessionId,
        to: SessionState,
        task: Option<TaskId>,
        reason: Option<&str>,
    ) -> Outcome {
        let now = self.clock_ms;
        let slot = self
            .sessions
            .records
            .get_mut(&id)
            .ok_or_else(|| not_found("session", id))?;
        let from = slot.state;
        let was_moving = slot.moving;
        if !from.can_become(to) {
            return Err(Rejection::SessionTransition { id, from, to });
        }
        if from.takes_a_task() && slot.idle_ms > 0 {
            let at = slot.updated_at_ms.saturating_add(slot.idle_ms);
            self.sessions.idle.remove(&(at, id));
        }
        let rec = Arc::make_mut(slot);
        rec.state = to;
        rec.task = if matches!(to, SessionState::Running | SessionState::Initializing) {
            task
        } else {
            None
        };
        rec.updated_at_ms = now;
        if to.takes_a_task() && rec.idle_ms > 0 {
            self.sessions
                .idle
                .insert((now.saturating_add(rec.idle_ms), id));
        }
        if to.is_terminal() {
            rec.after_task = None;
            rec.moving = false;
            rec.target = None;
            rec.carry = None;
        }
        if to == SessionState::Archived {
            rec.ended_as = Some(from);
            rec.tail.clear();
            rec.carry = None;
        }
        if let Some(r) = reason {
            rec.reason = Some(super::state::truncate(r, MAX_REASON_BYTES));
        }
        let rec = Arc::clone(slot);
        self.notice_session(&rec);
        if to == SessionState::Archived {
            self.sessions.checkpoints.remove(&id);
        } else if to.is_terminal() {
            // Nothing can continue it: its latest checkpoint's turns go.
            if let Some(last) = self
                .sessions
                .checkpoints
                .get_mut(&id)
                .and_then(|l| l.last_mut())
            {
                Arc::make_mut(last).transcript.clear();
            }
            // It ends: its key, time limit and room on its gateway are free.
            self.sessions
                .archive
                .insert((now.saturating_add(Sessions::ARCHIVE_AFTER_MS), id));
            if let Some(key) = &rec.session_key {
                self.sessions
                    .by_key
                    .remove(&(rec.tenant.clone(), key.clone()));
            }
            if let Some(at) = rec.deadline_ms {
                self.sessions.deadlines.remove(&(at, id));
            }
            if !was_moving {
                self.sessions.leave_gateway(&rec.gateway);
            }
        }
        Ok(Reply::Session(rec))
    }

    /// Fires the earliest session timer (the caller checked it is due): a
    /// time limit ends the session as `timeout`, failing the attempt it was
    /// running (which frees the agent); an idle session closes as
    /// `completed`; a session ended a day ago is archived.
    pub(crate) fn fire_session_timer(&mut self, seed: u64, events: &mut Vec<Event>) {
        let Some(due) = self.sessions.next_due() else {
            return;
        };
        let id = due.1;
        if self.sessions.deadlines.first() == Some(&due) {
            let entropy = mix(seed ^ id.rotate_left(17));
            self.end_session(
                id,
                SessionState::Timeout,
                "time limit reached",
                entropy,
                events,
            )
            .expect("invariant: sessions with deadlines are live");
        } else if self.sessions.idle.first() == Some(&due) {
            for to in [SessionState::Completing, SessionState::Completed] {
                self.move_session(id, to, None, None)
                    .expect("invariant: idle sessions take tasks");
            }
        } else {
            self.sessions.archive.remove(&due);
            if self.sessions.records[&id].state == SessionState::Archived {
                // Archived a month ago: the record goes.
                self.sessions.records.remove(&id);
                return;
            }
            self.move_session(id, SessionState::Archived, None, None)
                .expect("invariant: sessions to archive have ended");
            self.sessions
                .archive
                .insert((self.clock_ms.saturating_add(Sessions::KEEP_ARCHIVED_MS), id));
        }
    }

    /// Moves the live sessions driven by `agent` on (the agent was
    /// deregistered or moved to another gateway): each continues from its
    /// last checkpoint with the next agent that takes its next task; a
    /// paused one does so once resumed.
    pub(crate) fn end_agent_sessions(&mut self, agent: &AgentId, why: &str) {
        let ids: Vec<SessionId> = self
            .sessions
            .by_key
            .values()
            .copied()
            .filter(|id| self.sessions.records[id].agent.as_ref() == Some(agent))
            .collect();
        for id in ids {
            self.migrate(id, None, why, false);
        }
    }

    /// Sends live session `id` on to another gateway (`target`, or any),
    /// from its last checkpoint: it migrates now if no task runs in it,
    /// after its task if one does; a paused one stays paused and moves
    /// once resumed (`resumed`: it is being resumed now). An ended or
    /// completing one is left as it is.
    fn migrate(&mut self, id: SessionId, target: Option<GatewayId>, why: &str, resumed: bool) {
        let Some(rec) = self.sessions.records.get(&id) else {
            return;
        };
        let state = rec.state;
        if state.is_terminal() || state == SessionState::Completing {
            return;
        }
        if rec.task.is_some() {
            if rec.after_task == Some(AfterTask::Pause) {
                // The pause asked first wins; a gateway that cannot serve
                // it still moves it once resumed.
                return;
            }
            let why = super::state::truncate(why, MAX_REASON_BYTES);
            self.edit_session(id, |r| {
                r.after_task = Some(AfterTask::Migrate(target));
                r.reason = Some(why);
            });
            return;
        }
        // It carries its latest turns: a checkpoint of them first if the
        // last one is older (turns since it, or none yet).
        let checkpointed = self.sessions.checkpoints(id).last().map_or(0, |c| c.turns);
        if rec.turns > checkpointed {
            self.take_checkpoint(id, None);
        }
        let rec = &self.sessions.records[&id];
        let carry = (rec.checkpoint_seq > 0).then_some(rec.checkpoint_seq);
        if !rec.moving {
            // It no longer counts on its gateway; it counts again where it
            // lands ([`State::rehome`]).
            let gateway = rec.gateway.clone();
            self.sessions.leave_gateway(&gateway);
        }
        self.edit_session(id, |r| {
            r.moving = true;
            r.target = target;
            r.agent = None;
            r.carry = carry;
            r.reason = Some(super::state::truncate(why, MAX_REASON_BYTES));
        });
        if state != SessionState::Migrating && (state != SessionState::Paused || resumed) {
            self.move_session(id, SessionState::Migrating, None, None)
                .expect("invariant: an idle live session may migrate");
        }
    }

    /// Edits session `id`'s record in place (no change of state).
    fn edit_session(&mut self, id: SessionId, edit: impl FnOnce(&mut SessionRecord)) {
        if let Some(slot) = self.sessions.records.get_mut(&id) {
            edit(Arc::make_mut(slot));
        }
    }

    /// `POST /sessions/{id}/pause`: an idle session is paused now, one
    /// running a task once the task's attempt ends.
    pub(crate) fn pause_session(&mut self, id: SessionId) -> Outcome {
        let s = self.live_session(id, SessionState::Paused)?;
        if s.state == SessionState::Paused {
            return Ok(Reply::Session(s));
        }
        if s.task.is_some() {
            if let Some(AfterTask::Migrate(_)) = s.after_task {
                return Err(Rejection::Conflict(format!(
                    "session {id} migrates when its task ends: pause it after that"
                )));
            }
            self.edit_session(id, |r| r.after_task = Some(AfterTask::Pause));
            return Ok(Reply::Session(Arc::clone(&self.sessions.records[&id])));
        }
        self.move_session(id, SessionState::Paused, None, None)
    }

    /// `POST /sessions/{id}/resume`: a paused session takes tasks again,
    /// where it was, or from its last checkpoint on another gateway if it
    /// was moving or its gateway cannot serve it; a pause asked while a
    /// task runs is called off.
    pub(crate) fn resume_session(&mut self, id: SessionId) -> Outcome {
        let s = self.live_session(id, SessionState::Resuming)?;
        if s.after_task == Some(AfterTask::Pause) {
            self.edit_session(id, |r| r.after_task = None);
            return Ok(Reply::Session(Arc::clone(&self.sessions.records[&id])));
        }
        if s.state != SessionState::Paused {
            return Err(Rejection::SessionTransition {
                id,
                from: s.state,
                to: SessionState::Resuming,
            });
        }
        let unusable = self.gateway_unusable(&s.gateway);
        if s.moving || unusable.is_some() {
            let why = unusable
                .or_else(|| s.reason.clone())
                .unwrap_or_else(|| "resumed on another gateway".into());
            self.migrate(id, s.target.clone(), &why, true);
            return Ok(Reply::Session(Arc::clone(&self.sessions.records[&id])));
        }
        self.move_session(id, SessionState::Resuming, None, None)
    }

    /// `POST /sessions/{id}/migrate`: the session continues on `target`
    /// (or any gateway that takes its next task) from its last checkpoint.
    pub(crate) fn migrate_session(&mut self, id: SessionId, target: Option<&GatewayId>) -> Outcome {
        let s = self.live_session(id, SessionState::Migrating)?;
        if let Some(g) = target
            && self.group == 0
            && self.registry.gateway(g).is_none()
        {
            return Err(not_found("gateway", g));
        }
        if s.state == SessionState::Completing {
            return Err(Rejection::SessionTransition {
                id,
                from: s.state,
                to: SessionState::Migrating,
            });
        }
        if s.after_task == Some(AfterTask::Pause) {
            return Err(Rejection::Conflict(format!(
                "session {id} pauses when its task ends: migrate it after that, or resume it first"
            )));
        }
        let why = match target {
            Some(g) => format!("moved to gateway {g} by an operator"),
            None => "moved by an operator".to_owned(),
        };
        self.migrate(id, target.cloned(), &why, false);
        Ok(Reply::Session(Arc::clone(&self.sessions.records[&id])))
    }

    /// `POST /sessions/{id}/checkpoint`: takes a checkpoint named `name`
    /// (free text, not empty, cut to 256 bytes).
    pub(crate) fn checkpoint_session(&mut self, id: SessionId, name: Option<&str>) -> Outcome {
        if name.is_some_and(str::is_empty) {
            return Err(Rejection::invalid("name", "must not be empty"));
        }
        self.live_session(id, SessionState::Running)?;
        let name = name.map(|n| super::state::truncate(n, super::task::Limits::MAX_NAME_BYTES));
        let cp = self.take_checkpoint(id, name);
        Ok(Reply::Checkpoint(cp))
    }

    /// Session `id`, if it has not ended; else why `to` cannot be reached.
    fn live_session(
        &self,
        id: SessionId,
        to: SessionState,
    ) -> Result<Arc<SessionRecord>, Rejection> {
        let s = self
            .sessions
            .records
            .get(&id)
            .ok_or_else(|| not_found("session", id))?;
        if s.state.is_terminal() {
            return Err(Rejection::SessionTransition {
                id,
                from: s.state,
                to,
            });
        }
        Ok(Arc::clone(s))
    }

    /// Takes a checkpoint of session `id` now: its turns and tokens, the
    /// gateway and gateway-side conversation they are in.
    fn take_checkpoint(&mut self, id: SessionId, name: Option<String>) -> Arc<Checkpoint> {
        let now = self.clock_ms;
        let s = &self.sessions.records[&id];
        let cp = Arc::new(Checkpoint {
            seq: s.checkpoint_seq + 1,
            name,
            at_ms: now,
            turns: s.turns,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            gateway: s.gateway.clone(),
            transcript_ref: s.gateway_key(),
            transcript: s.tail.clone(),
        });
        let seq = cp.seq;
        self.edit_session(id, |r| r.checkpoint_seq = seq);
        let list = self.sessions.checkpoints.entry(id).or_default();
        // Only the latest keeps its turns (what a move carries): the
        // state holds each session's turns at most twice, its tail and
        // its latest checkpoint, however many checkpoints it has.
        if let Some(last) = list.last_mut() {
            Arc::make_mut(last).transcript.clear();
        }
        list.push(Arc::clone(&cp));
        if list.len() > Sessions::MAX_CHECKPOINTS {
            list.remove(0);
        }
        self.notice(What::Checkpoint {
            session: id,
            tenant: self.sessions.records[&id].tenant.clone(),
            seq,
            name: cp.name.clone(),
        });
        cp
    }

    /// Counts what task `task`'s attempt used in its session, if it runs
    /// in one, and with `result` (it completed) adds a turn (its prompt
    /// and reply), taking a checkpoint every `checkpoint_every` turns. The
    /// first turn completed on a new gateway means that gateway holds the
    /// conversation now.
    pub(crate) fn session_turn(
        &mut self,
        task: TaskId,
        result: Option<&str>,
        input_tokens: u64,
        output_tokens: u64,
    ) {
        let Some(s) = self.session_of(task) else {
            return;
        };
        // A task in a session holds its payload (`State::keep_payloads_out`).
        let prompt = |t: &Task| t.payload.held().map_or_else(String::new, prompt_of);
        let turn = result.map(|r| (prompt(&self.tasks[&task]), reply_of(r)));
        let now = self.clock_ms;
        let mut checkpoint = false;
        self.edit_session(s.id, |r| {
            r.input_tokens = r.input_tokens.saturating_add(input_tokens);
            r.output_tokens = r.output_tokens.saturating_add(output_tokens);
            let Some((prompt, reply)) = turn else {
                return;
            };
            r.turns += 1;
            r.carry = None;
            r.tail.push(Arc::new(Turn {
                task,
                at_ms: now,
                prompt,
                reply,
            }));
            if r.tail.len() > Sessions::MAX_TAIL {
                r.tail.remove(0);
            }
            checkpoint = r.checkpoint_every > 0 && r.turns % u64::from(r.checkpoint_every) == 0;
        });
        if checkpoint {
            self.take_checkpoint(s.id, None);
        }
    }

    /// An operator ends a live session as `cancelled`.
    pub(crate) fn kill_session(
        &mut self,
        id: SessionId,
        reason: Option<&str>,
        entropy: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let reason = reason.unwrap_or("killed by an operator");
        self.end_session(id, SessionState::Cancelled, reason, entropy, events)
    }

    /// Ends a session in terminal state `to`; the attempt it was running
    /// fails (retryable) with `reason`, freeing the agent's capacity.
    fn end_session(
        &mut self,
        id: SessionId,
        to: SessionState,
        reason: &str,
        entropy: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let task = self.sessions.get(id).and_then(|s| s.task);
        let reply = self.move_session(id, to, None, Some(reason))?;
        if let Some(task) = task
            && self.tasks.get(&task).is_some_and(|t| t.status.is_leased())
        {
            let token = self.live_token(task);
            if to == SessionState::Timeout {
                self.emit(events, task, EventKind::TimedOut { token });
            }
            self.fail_attempt(
                task,
                format!("session {id} ended: {reason}"),
                true,
                entropy,
                events,
            );
        }
        Ok(reply)
    }

    /// Binds a just-leased task to its session: the idle live session for
    /// its key (which [`Sessions::admits`] checked is the agent's), or a new
    /// one on the agent's gateway. Tasks without a key have no session.
    pub(crate) fn session_for_grant(
        &mut self,
        task: TaskId,
        agent: &AgentId,
        gateway: &GatewayId,
        spec: &super::command::DispatchSpec,
    ) {
        let t = &self.tasks[&task];
        let Some(key) = t.session_key.clone() else {
            return;
        };
        let tenant = t.tenant.clone();
        if let Some(s) = self.sessions.by_key(&tenant, &key).cloned() {
            if s.moving {
                self.rehome(&s, agent, gateway);
                self.move_session(s.id, SessionState::Initializing, Some(task), None)
                    .expect("invariant: dispatch admits only idle moving sessions");
            } else {
                if s.agent.is_none() {
                    self.edit_session(s.id, |r| r.agent = Some(agent.clone()));
                }
                self.move_session(s.id, SessionState::Running, Some(task), None)
                    .expect("invariant: dispatch admits only idle sessions of the agent");
            }
            return;
        }
        let limit_ms = spec.session_limit_ms;
        let open = OpenSession {
            gateway: gateway.clone(),
            tenant,
            session_key: Some(key),
            agent: Some(agent.clone()),
            time_limit_ms: (limit_ms > 0).then_some(limit_ms),
        };
        let id = self
            .insert_session(&open, spec.session_idle_ms, spec.session_checkpoint_every)
            .id;
        self.move_session(id, SessionState::Initializing, Some(task), None)
            .expect("invariant: new sessions can initialize");
    }

    /// Moving session `s` lands on `gateway`, driven by `agent`: a new
    /// gateway-side conversation (the next generation), which its next
    /// task seeds with the carried checkpoint's turns.
    fn rehome(&mut self, s: &SessionRecord, agent: &AgentId, gateway: &GatewayId) {
        *self
            .sessions
            .live_by_gateway
            .entry(gateway.clone())
            .or_default() += 1;
        self.edit_session(s.id, |r| {
            r.gateway = gateway.clone();
            r.agent = Some(agent.clone());
            r.generation += 1;
            r.moving = false;
            r.target = None;
            r.reason = None;
        });
    }

    /// The task's attempt started: its session, if opening, is now open and
    /// running it.
    pub(crate) fn session_task_started(&mut self, task: TaskId) {
        let Some(s) = self.session_of(task) else {
            return;
        };
        if s.state == SessionState::Initializing {
            for (to, t) in [
                (SessionState::Ready, None),
                (SessionState::Running, Some(task)),
            ] {
                self.move_session(s.id, to, t, None)
                    .expect("invariant: an opening session becomes ready, then runs");
            }
        }
    }

    /// The task's attempt ended (any way): its session is idle again; or
    /// it pauses or migrates, as asked while the task ran; or it migrates
    /// from its last checkpoint if its gateway is unusable (see
    /// [`State::end_idle_sessions_on`]).
    pub(crate) fn session_task_ended(&mut self, task: TaskId) {
        let Some(s) = self.session_of(task) else {
            return;
        };
        self.edit_session(s.id, |r| r.after_task = None);
        // Idle first (paused if asked), then on if its gateway cannot
        // serve it or an operator moved it.
        let pause = s.after_task == Some(AfterTask::Pause);
        let idle = if pause {
            SessionState::Paused
        } else {
            SessionState::Ready
        };
        self.move_session(s.id, idle, None, None)
            .expect("invariant: a session's task ended: it may idle or pause");
        let target = match &s.after_task {
            Some(AfterTask::Migrate(t)) => Some(t.clone()),
            _ => None,
        };
        if let Some(why) = self.gateway_unusable(&s.gateway) {
            self.migrate(s.id, target.flatten(), &why, false);
        } else if let Some(t) = target {
            // Why it was asked to move, recorded when it was.
            let why = s
                .reason
                .clone()
                .unwrap_or_else(|| "moved by an operator".into());
            self.migrate(s.id, t, &why, false);
        }
    }

    /// [`Command::MoveSessionsOff`](super::Command::MoveSessionsOff): every
    /// live session on `gateway` that is not moving yet moves on (idle ones
    /// now, busy ones when their task ends, paused ones once resumed).
    pub(crate) fn move_sessions_off(&mut self, gateway: &GatewayId, why: &str) -> Outcome {
        check_name("gateway", &gateway.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        let ids = self.sessions_on(gateway);
        let why = super::state::truncate(why, MAX_REASON_BYTES);
        for id in ids {
            if self.sessions.records[&id].moving {
                self.untarget(id);
            } else {
                self.migrate(id, None, &why, false);
            }
        }
        Ok(Reply::Done)
    }

    /// A moving session bound for a gateway that went down goes to any
    /// gateway instead (it would wait for that one for good).
    fn untarget(&mut self, id: SessionId) {
        self.edit_session(id, |r| r.target = None);
    }

    /// The live sessions that `gateway` going down concerns: those on it
    /// that are not moving yet (nor asked to after their task), and those
    /// moving to it.
    pub fn sessions_on(&self, gateway: &GatewayId) -> Vec<SessionId> {
        self.sessions
            .by_key
            .values()
            .copied()
            .filter(|id| {
                let s = &self.sessions.records[id];
                if s.moving {
                    s.target.as_ref() == Some(gateway)
                } else {
                    s.gateway == *gateway && s.after_task.is_none()
                }
            })
            .collect()
    }

    /// Sends the idle live sessions on `gateway` (no task; not paused) on
    /// to another gateway from their last checkpoint, with `why`: the
    /// gateway cannot serve them, and a task with one of their keys would
    /// otherwise wait for it. A paused one moves once resumed.
    pub(crate) fn end_idle_sessions_on(&mut self, gateway: &GatewayId, why: &str) {
        let ids: Vec<SessionId> = self
            .sessions
            .by_key
            .values()
            .copied()
            .filter(|id| {
                let s = &self.sessions.records[id];
                (s.gateway == *gateway && s.task.is_none() && !s.moving)
                    || (s.moving && s.target.as_ref() == Some(gateway))
            })
            .collect();
        for id in ids {
            if self.sessions.records[&id].moving {
                self.untarget(id);
            } else {
                self.migrate(id, None, why, false);
            }
        }
    }

    /// The live session whose current task is `task`.
    fn session_of(&self, task: TaskId) -> Option<Arc<SessionRecord>> {
        let t = self.tasks.get(&task)?;
        self.sessions
            .by_key(&t.tenant, t.session_key.as_ref()?)
            .filter(|s| s.task == Some(task))
            .cloned()
    }
}

/// A checkpoint's turns as text for a model that has not seen them (a
/// session continuing on another gateway); `None` without turns.
pub fn carried_context(cp: &Checkpoint) -> Option<String> {
    if cp.transcript.is_empty() {
        return None;
    }
    let mut out = format!(
        "[Earlier turns of this conversation, carried over from gateway {} (checkpoint {}):]\n",
        cp.gateway, cp.seq
    );
    for t in &cp.transcript {
        out.push_str(&format!("User: {}\nAssistant: {}\n", t.prompt, t.reply));
    }
    out.push_str("[End of earlier turns.]");
    Some(out)
}

/// The message a task's payload carries for a model: the payload itself
/// when it is a JSON string, an object's `message` string; `None` for any
/// other payload (a driver then sends the payload's JSON text). The one
/// rule for the OpenClaw driver's turn and a session's turn record.
pub fn payload_message(payload: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct WithMessage {
        message: Option<serde_json::Value>,
    }
    if let Ok(s) = serde_json::from_str::<String>(payload) {
        return Some(s);
    }
    match serde_json::from_str::<WithMessage>(payload) {
        Ok(WithMessage {
            message: Some(serde_json::Value::String(m)),
        }) => Some(m),
        _ => None,
    }
}

/// What a task asked, as a turn keeps it: its [`payload_message`], or the
/// payload itself.
pub(crate) fn prompt_of(payload: &str) -> String {
    let message = payload_message(payload);
    super::state::truncate(
        message.as_deref().unwrap_or(payload),
        Sessions::MAX_TURN_BYTES,
    )
}

/// What a task answered, as a turn keeps it: its result's `text` (as the
/// OpenClaw driver reports it), or the result itself.
pub(crate) fn reply_of(result: &str) -> String {
    #[derive(Deserialize)]
    struct WithText {
        text: Option<serde_json::Value>,
    }
    let cut = |s: &str| super::state::truncate(s, Sessions::MAX_TURN_BYTES);
    match serde_json::from_str::<WithText>(result) {
        Ok(WithText {
            text: Some(serde_json::Value::String(t)),
        }) => cut(&t),
        _ => cut(result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Command, GatewayRegistration};

    fn apply(state: &mut State, now_ms: u64, cmd: Command) -> Outcome {
        state.apply_one(now_ms, cmd)
    }

    fn with_gateway() -> State {
        let mut s = State::default();
        let reg = GatewayRegistration {
            id: GatewayId("gw".into()),
            kind: "sim".into(),
            spec: "{}".into(),
            region: "eu".into(),
            capabilities: vec![],
            max_sessions: 4,
            model: None,
            managed: false,
        };
        apply(&mut s, 0, Command::RegisterGateway(reg)).unwrap();
        s
    }

    fn open(key: Option<&str>, limit: Option<u64>) -> Command {
        Command::OpenSession(OpenSession {
            gateway: GatewayId("gw".into()),
            tenant: Tenant::from("a"),
            session_key: key.map(|k| SessionKey(k.into())),
            agent: None,
            time_limit_ms: limit,
        })
    }

    fn state_of(s: &State, id: SessionId) -> SessionState {
        s.sessions().get(id).unwrap().state
    }

    #[test]
    fn lifecycle_and_affinity() {
        let mut s = with_gateway();
        let Ok(Reply::Session(r)) = apply(&mut s, 10, open(Some("k1"), None)) else {
            panic!()
        };
        assert!(
            apply(&mut s, 11, open(Some("k1"), None)).is_err(),
            "key held by a live session"
        );
        let mv = |to, task| Command::MoveSession {
            id: r.id,
            to,
            task,
            reason: None,
        };
        apply(&mut s, 12, mv(SessionState::Initializing, None)).unwrap();
        assert!(
            apply(&mut s, 12, mv(SessionState::Running, None)).is_err(),
            "must be ready first"
        );
        apply(&mut s, 13, mv(SessionState::Ready, None)).unwrap();
        apply(&mut s, 14, mv(SessionState::Running, Some(TaskId(7)))).unwrap();
        assert_eq!(
            s.sessions()
                .by_key(&"a".into(), &SessionKey("k1".into()))
                .unwrap()
                .task,
            Some(TaskId(7))
        );
        apply(&mut s, 15, mv(SessionState::Completing, None)).unwrap();
        apply(&mut s, 16, mv(SessionState::Completed, None)).unwrap();
        assert!(
            s.sessions()
                .by_key(&"a".into(), &SessionKey("k1".into()))
                .is_none(),
            "ended sessions free their key"
        );
        assert!(apply(&mut s, 17, open(Some("k1"), None)).is_ok());
        let mut other = OpenSession {
            gateway: GatewayId("gw".into()),
            tenant: Tenant::from("b"),
            session_key: Some(SessionKey("k1".into())),
            agent: None,
            time_limit_ms: None,
        };
        let Ok(Reply::Session(b)) = apply(&mut s, 17, Command::OpenSession(other.clone())) else {
            panic!("another tenant's key k1 is a different session")
        };
        assert_eq!(b.tenant, Tenant::from("b"));
        assert!(apply(&mut s, 17, Command::OpenSession(other.clone())).is_err());
        other.tenant = Tenant::from("c");
        assert!(apply(&mut s, 17, Command::OpenSession(other)).is_ok());
        assert!(
            apply(&mut s, 18, mv(SessionState::Error, None)).is_err(),
            "terminal stays terminal"
        );
    }

    #[test]
    fn time_limit_ends_a_session_as_timeout() {
        let mut s = with_gateway();
        let Ok(Reply::Session(r)) = apply(&mut s, 100, open(Some("k"), Some(1000))) else {
            panic!()
        };
        assert_eq!(s.next_due_ms(), Some(1100));
        apply(&mut s, 1099, Command::Tick).unwrap();
        assert_eq!(state_of(&s, r.id), SessionState::Created);
        apply(&mut s, 1100, Command::Tick).unwrap();
        assert_eq!(state_of(&s, r.id), SessionState::Timeout);
        assert_eq!(
            s.sessions().get(r.id).unwrap().reason.as_deref(),
            Some("time limit reached")
        );
        assert!(
            s.sessions()
                .by_key(&"a".into(), &SessionKey("k".into()))
                .is_none()
        );
    }

    #[test]
    fn dispatch_waits_for_a_session_that_is_not_ready() {
        use crate::fsm::{AgentRegistration, DispatchPolicy, DispatchSpec, Reply, SubmitTask};
        let mut s = with_gateway();
        apply(
            &mut s,
            0,
            Command::NodeHeartbeat {
                id: 1,
                region: "eu".into(),
                api_addr: "a".into(),
            },
        )
        .unwrap();
        apply(
            &mut s,
            0,
            Command::PlaceGateway {
                id: GatewayId("gw".into()),
                owner: Some(1),
            },
        )
        .unwrap();
        let agent = AgentRegistration {
            id: AgentId("a".into()),
            gateway: GatewayId("gw".into()),
            capacity: 2,
            role: "r".into(),
            ..Default::default()
        };
        apply(&mut s, 0, Command::RegisterAgent(agent)).unwrap();
        let online = Command::AgentOnline {
            agent: AgentId("a".into()),
            node: 1,
            release: vec![],
        };
        apply(&mut s, 0, online).unwrap();
        // An operator opened the session: created, not ready, no agent.
        apply(&mut s, 0, open(Some("k"), None)).unwrap();
        let submit = SubmitTask {
            tenant: "a".into(),
            payload: "{}".into(),
            session_key: Some(SessionKey("k".into())),
            ..Default::default()
        };
        apply(&mut s, 0, Command::Submit(submit)).unwrap();
        let dispatch = Command::Dispatch(DispatchSpec {
            lease_ms: 30_000,
            max: 10,
            policy: DispatchPolicy::LeastLoaded,
            node_dead_after_ms: 3_000,
            session_limit_ms: 0,
            session_idle_ms: 0,
            session_checkpoint_every: 0,
        });
        let out = apply(&mut s, 1, dispatch.clone());
        assert_eq!(out, Ok(Reply::Dispatched(vec![])), "waits for the session");
        for to in [SessionState::Initializing, SessionState::Ready] {
            let mv = Command::MoveSession {
                id: 1,
                to,
                task: None,
                reason: None,
            };
            apply(&mut s, 2, mv).unwrap();
        }
        let Ok(Reply::Dispatched(grants)) = apply(&mut s, 3, dispatch) else {
            panic!()
        };
        assert_eq!(grants.len(), 1, "a ready session takes its key's task");
        let rec = s.sessions().get(1).unwrap();
        assert_eq!(
            (rec.state, rec.agent.clone()),
            (SessionState::Running, Some(AgentId("a".into())))
        );
    }

    #[test]
    fn session_lifecycle_table() {
        use SessionState::*;
        let path = [
            Created,
            Initializing,
            Ready,
            Running,
            Ready,
            Running,
            Completing,
            Completed,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{:?} -> {:?}", w[0], w[1]);
        }
        assert!(!Created.can_become(Running), "must initialize first");
        assert!(!Ready.can_become(Completed), "completes through completing");
        for end in [Failed, Cancelled, Timeout, Error] {
            assert!(Running.can_become(end));
            assert!(
                !end.can_become(Ready) && !end.can_become(Failed),
                "{end:?} is terminal"
            );
        }
        assert!(!Completed.can_become(Error));
        // Durable sessions: paused, resumed, migrated, archived.
        let durable = [
            Created,
            Initializing,
            Ready,
            Running,
            Paused,
            Resuming,
            Running,
            Migrating,
            Initializing,
            Ready,
            Migrating,
            Paused,
            Migrating,
            Initializing,
            Ready,
            Paused,
            Resuming,
            Completing,
            Completed,
            Archived,
        ];
        for w in durable.windows(2) {
            assert!(w[0].can_become(w[1]), "{:?} -> {:?}", w[0], w[1]);
        }
        assert!(
            !Paused.can_become(Running),
            "a paused session resumes first"
        );
        assert!(!Paused.can_become(Ready), "resuming is its own state");
        assert!(
            !Migrating.can_become(Running),
            "it opens on the new gateway first"
        );
        assert!(!Migrating.can_become(Resuming));
        assert!(!Running.can_become(Resuming));
        assert!(
            !Ready.can_become(Archived),
            "only an ended session is archived"
        );
        assert!(!Archived.can_become(Archived) && !Archived.can_become(Error));
        for end in [Completed, Failed, Cancelled, Timeout, Error] {
            assert!(end.can_become(Archived), "{end:?} is archived");
            assert!(!end.can_become(Paused) && !end.can_become(Migrating));
        }
        for live in [
            Created,
            Initializing,
            Ready,
            Running,
            Paused,
            Resuming,
            Migrating,
            Completing,
        ] {
            assert!(
                !live.is_terminal() && live.can_become(Cancelled),
                "{live:?}"
            );
        }
        // Every pair: a terminal state reaches only Archived, and nothing
        // reaches Created.
        let all = [
            Created,
            Initializing,
            Ready,
            Running,
            Completing,
            Completed,
            Failed,
            Cancelled,
            Timeout,
            Error,
            Paused,
            Resuming,
            Migrating,
            Archived,
        ];
        for from in all {
            for to in all {
                if from.is_terminal() && from.can_become(to) {
                    assert_eq!(to, Archived, "{from:?} -> {to:?}");
                }
                assert!(!from.can_become(Created), "{from:?} -> Created");
            }
        }
    }
}

#[cfg(test)]
mod random_ops {
    use super::*;
    use crate::fsm::{
        AgentRegistration, Circuit, Command, DispatchPolicy, DispatchSpec, FencingToken,
        GatewayRegistration, Health, Reply, SubmitTask,
    };
    use std::panic::{AssertUnwindSafe, catch_unwind};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    fn check(s: &State) -> Result<(), String> {
        let ss = &s.sessions;
        let mut by_key = BTreeMap::new();
        let mut live = BTreeMap::<GatewayId, u32>::new();
        let mut deadlines = BTreeSet::new();
        let mut idle = BTreeSet::new();
        let mut archive = 0usize;
        for r in ss.records.values() {
            let l = !r.state.is_terminal();
            if l {
                if let Some(k) = &r.session_key {
                    by_key.insert((r.tenant.clone(), k.clone()), r.id);
                }
                if !r.moving {
                    *live.entry(r.gateway.clone()).or_default() += 1;
                }
                if let Some(d) = r.deadline_ms {
                    deadlines.insert((d, r.id));
                }
                if r.state.takes_a_task() && r.idle_ms > 0 {
                    idle.insert((r.updated_at_ms + r.idle_ms, r.id));
                }
                if r.moving
                    && !matches!(
                        r.state,
                        SessionState::Migrating | SessionState::Paused | SessionState::Completing
                    )
                {
                    return Err(format!("moving session {} in {:?}", r.id, r.state));
                }
                if !r.moving && r.state == SessionState::Migrating {
                    return Err(format!("migrating session {} not moving", r.id));
                }
                if r.task.is_some()
                    != matches!(r.state, SessionState::Running | SessionState::Initializing)
                {
                    // Initializing without a task is fine only for opened ones
                    if !(r.state == SessionState::Initializing && r.task.is_none()) {
                        return Err(format!(
                            "session {} task {:?} in {:?}",
                            r.id, r.task, r.state
                        ));
                    }
                }
                if let Some(t) = r.task {
                    let task = &s.tasks[&t];
                    if !task.status.is_leased() {
                        return Err(format!(
                            "session {} holds task {t:?} {:?}",
                            r.id, task.status
                        ));
                    }
                }
            } else {
                // Ended: a timer archives it; archived: one removes it.
                archive += 1;
            }
            if r.tail.len() > Sessions::MAX_TAIL {
                return Err("tail".into());
            }
        }
        if by_key != ss.by_key {
            return Err(format!("by_key {:?} != {:?}", ss.by_key, by_key));
        }
        if live != ss.live_by_gateway {
            return Err(format!(
                "live_by_gateway {:?} != {:?}",
                ss.live_by_gateway, live
            ));
        }
        if deadlines != ss.deadlines {
            return Err(format!("deadlines {:?} != {:?}", ss.deadlines, deadlines));
        }
        if idle != ss.idle {
            return Err(format!("idle {:?} != {:?}", ss.idle, idle));
        }
        if archive != ss.archive.len() {
            return Err(format!("archive {} != {}", ss.archive.len(), archive));
        }
        // Every leased keyed task runs in its key's session.
        for t in s.tasks.values() {
            if t.status.is_leased()
                && let Some(k) = &t.session_key
            {
                let ok = ss
                    .by_key(&t.tenant, k)
                    .is_some_and(|r| r.task == Some(t.id));
                if !ok {
                    return Err(format!("leased task {:?} not in its session", t.id));
                }
            }
        }
        Ok(())
    }

    fn gw(i: u64) -> GatewayId {
        GatewayId(format!("g{i}"))
    }

    fn run(seed: u64, steps: usize) -> Result<(), String> {
        let mut r = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
        let mut s = State::default();
        let mut now = 1_000u64;
        let mut log: Vec<String> = Vec::new();
        let mut tokens: Vec<FencingToken> = Vec::new();
        let mut setup = vec![Command::NodeHeartbeat {
            id: 1,
            region: "eu".into(),
            api_addr: "a".into(),
        }];
        for g in 0..3 {
            setup.push(Command::RegisterGateway(GatewayRegistration {
                id: gw(g),
                kind: "sim".into(),
                spec: "{}".into(),
                region: "eu".into(),
                capabilities: vec![],
                max_sessions: 3,
                model: None,
                managed: false,
            }));
            setup.push(Command::PlaceGateway {
                id: gw(g),
                owner: Some(1),
            });
        }
        for c in setup {
            s.apply_one(now, c).map_err(|e| format!("{e:?}"))?;
        }
        let agent_up = |s: &mut State, a: u64, now: u64| {
            let _ = s.apply_one(
                now,
                Command::RegisterAgent(AgentRegistration {
                    id: AgentId(format!("a{a}")),
                    gateway: gw(a % 3),
                    capacity: 2,
                    role: "r".into(),
                    ..Default::default()
                }),
            );
            let _ = s.apply_one(
                now,
                Command::AgentOnline {
                    agent: AgentId(format!("a{a}")),
                    node: 1,
                    release: vec![],
                },
            );
        };
        for a in 0..4 {
            agent_up(&mut s, a, now);
        }
        for _ in 0..steps {
            let ids: Vec<SessionId> = s.sessions.records.keys().copied().collect();
            let sid = if ids.is_empty() {
                1
            } else {
                ids[r.next(ids.len() as u64) as usize]
            };
            let tok = if tokens.is_empty() {
                FencingToken(1)
            } else {
                tokens[r.next(tokens.len() as u64) as usize]
            };
            let op = r.next(22);
            now += r.next(400);
            let cmd = match op {
                0..=2 => Command::Submit(SubmitTask {
                    tenant: "a".into(),
                    payload: r#"{"message":"hi"}"#.into(),
                    session_key: (r.next(5) > 0).then(|| SessionKey(format!("k{}", r.next(4)))),
                    ..Default::default()
                }),
                3..=4 => Command::Dispatch(DispatchSpec {
                    lease_ms: 5_000,
                    max: 4,
                    policy: DispatchPolicy::LeastLoaded,
                    node_dead_after_ms: u64::MAX / 4,
                    session_limit_ms: [0, 20_000][r.next(2) as usize],
                    session_idle_ms: [0, 3_000][r.next(2) as usize],
                    session_checkpoint_every: r.next(3) as u32,
                }),
                5..=6 => Command::Renew {
                    token: tok,
                    lease_ms: 5_000,
                },
                7..=8 => Command::Complete {
                    token: tok,
                    result: r#"{"text":"ok","usage":{"input":3,"output":4}}"#.into(),
                },
                9 => Command::Fail {
                    token: tok,
                    error: "e".into(),
                    retryable: r.next(3) > 0,
                    usage: None,
                },
                10 => Command::Release { tokens: vec![tok] },
                11 => {
                    now += [0, 6_000, 90_000_000][r.next(3) as usize];
                    Command::Tick
                }
                12 => Command::KillSession {
                    id: sid,
                    reason: None,
                },
                13 => Command::PauseSession { id: sid },
                14 => Command::ResumeSession { id: sid },
                15 => Command::CheckpointSession {
                    id: sid,
                    name: None,
                },
                16 => Command::MigrateSession {
                    id: sid,
                    gateway: (r.next(2) == 0).then(|| gw(r.next(3))),
                },
                17 => Command::MoveSessionsOff {
                    gateway: gw(r.next(3)),
                    why: "down".into(),
                },
                18 => Command::ReportGateway {
                    id: gw(r.next(3)),
                    health: [Health::Healthy, Health::Unhealthy][r.next(2) as usize],
                    circuit: [Circuit::Closed, Circuit::Open, Circuit::Closed][r.next(3) as usize],
                },
                19 => {
                    let a = r.next(4);
                    log.push(format!("re-register agent a{a}"));
                    let _ = s.apply_one(
                        now,
                        Command::DeregisterAgent {
                            id: AgentId(format!("a{a}")),
                        },
                    );
                    agent_up(&mut s, a, now);
                    Command::Tick
                }
                20 => {
                    let ids: Vec<_> = s.tasks.keys().copied().collect();
                    if ids.is_empty() {
                        Command::Tick
                    } else {
                        Command::Cancel {
                            id: ids[r.next(ids.len() as u64) as usize],
                            reason: None,
                            keep_children: false,
                        }
                    }
                }
                _ => Command::Tick,
            };
            log.push(format!("t={now} {cmd:?}"));
            let out = catch_unwind(AssertUnwindSafe(|| s.apply_one(now, cmd.clone())));
            let out = match out {
                Ok(o) => o,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let tail = log.iter().rev().take(40).rev().cloned().collect::<Vec<_>>();
                    return Err(format!("PANIC {msg}\n{}", tail.join("\n")));
                }
            };
            if let Ok(Reply::Dispatched(g)) = &out {
                tokens.extend(g.iter().map(|g| g.token));
            }
            if let Command::MoveSessionsOff { gateway, .. } = &cmd {
                let left: Vec<_> = s
                    .sessions_on(gateway)
                    .into_iter()
                    .filter(|id| s.sessions.records[id].state != SessionState::Completing)
                    .collect();
                if !left.is_empty() {
                    return Err(format!(
                        "sessions_on({gateway}) still {left:?} after MoveSessionsOff"
                    ));
                }
            }
            if let Err(e) = check(&s) {
                let tail = log.iter().rev().take(40).rev().cloned().collect::<Vec<_>>();
                let sess: Vec<String> = s
                    .sessions
                    .records
                    .values()
                    .map(|r| {
                        format!(
                            "{} {:?} gw={} mv={} task={:?} after={:?}",
                            r.id, r.state, r.gateway, r.moving, r.task, r.after_task
                        )
                    })
                    .collect();
                return Err(format!(
                    "{e}\nsessions:\n{}\nlog:\n{}",
                    sess.join("\n"),
                    tail.join("\n")
                ));
            }
        }
        Ok(())
    }

    /// Random commands (tasks, dispatch, reports, pauses, resumes,
    /// checkpoints, moves, gateways going down, agents leaving, days
    /// passing) keep every session index equal to what the records say,
    /// and never panic in apply.
    #[test]
    fn random_session_commands_keep_the_indexes_true() {
        let mut failures = Vec::new();
        for seed in 1..=150 {
            if let Err(e) = run(seed, 300) {
                failures.push(format!("seed {seed}: {e}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }
}
