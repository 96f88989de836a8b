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
use super::registry::{GatewayId, not_found};
use super::state::State;
use super::task::{AgentId, SessionKey, TaskId};

/// A session's identity, from a counter.
pub type SessionId = u64;

/// Where a session is in its life. Every legal move is in
/// [`SessionState::can_become`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
}

impl SessionState {
    /// The one table of legal session transitions.
    pub fn can_become(self, to: SessionState) -> bool {
        use SessionState::*;
        if self.is_terminal() {
            return false;
        }
        matches!(
            (self, to),
            (Created, Initializing)
                | (Initializing, Ready)
                | (Ready, Running | Completing)
                | (Running, Ready | Completing)
                | (Completing, Completed)
        ) || matches!(to, Failed | Cancelled | Timeout | Error)
    }

    /// Whether the session has ended.
    pub fn is_terminal(self) -> bool {
        use SessionState::*;
        matches!(self, Completed | Failed | Cancelled | Timeout | Error)
    }
}

/// What the state knows about a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Its id.
    pub id: SessionId,
    /// The gateway it runs on.
    pub gateway: GatewayId,
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
    /// Creation time.
    pub created_at_ms: u64,
    /// Time of the last change.
    pub updated_at_ms: u64,
}

/// Sessions and their indexes, part of [`State`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    last_id: SessionId,
    records: BTreeMap<SessionId, Arc<SessionRecord>>,
    /// Live sessions by key (affinity).
    by_key: BTreeMap<SessionKey, SessionId>,
    /// Live sessions with a time limit, by deadline.
    deadlines: BTreeSet<(u64, SessionId)>,
}

/// A session to open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    /// The gateway (must be registered).
    pub gateway: GatewayId,
    /// Affinity key: refused while another live session holds it.
    pub session_key: Option<SessionKey>,
    /// The agent driving it.
    pub agent: Option<AgentId>,
    /// Longest life, in ms.
    pub time_limit_ms: Option<u64>,
}

/// Longest reason kept, in bytes.
const MAX_REASON_BYTES: usize = 1024;

impl Sessions {
    /// One session.
    pub fn get(&self, id: SessionId) -> Option<&Arc<SessionRecord>> {
        self.records.get(&id)
    }

    /// All sessions, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<SessionRecord>> {
        self.records.values()
    }

    /// The live session holding `key`.
    pub fn by_key(&self, key: &SessionKey) -> Option<&Arc<SessionRecord>> {
        self.by_key.get(key).and_then(|id| self.records.get(id))
    }

    /// The earliest session deadline.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(at, _)| *at)
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
            if let Some(live) = self.sessions.by_key.get(key) {
                return Err(Rejection::invalid(
                    "session_key",
                    format!("`{key}` is held by live session {live}"),
                ));
            }
        }
        let now = self.clock_ms;
        self.sessions.last_id += 1;
        let id = self.sessions.last_id;
        let deadline_ms = open.time_limit_ms.map(|ms| now.saturating_add(ms));
        let rec = SessionRecord {
            id,
            gateway: open.gateway.clone(),
            session_key: open.session_key.clone(),
            agent: open.agent.clone(),
            state: SessionState::Created,
            task: None,
            deadline_ms,
            reason: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        if let Some(key) = &rec.session_key {
            self.sessions.by_key.insert(key.clone(), id);
        }
        if let Some(at) = deadline_ms {
            self.sessions.deadlines.insert((at, id));
        }
        let rec = Arc::new(rec);
        self.sessions.records.insert(id, Arc::clone(&rec));
        Ok(Reply::Session(rec))
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
        if !slot.state.can_become(to) {
            let problem = format!("session {id} is {:?} and cannot become {to:?}", slot.state);
            return Err(Rejection::invalid("state", problem));
        }
        let rec = Arc::make_mut(slot);
        rec.state = to;
        rec.task = if to == SessionState::Running {
            task
        } else {
            None
        };
        rec.updated_at_ms = now;
        if let Some(r) = reason {
            rec.reason = Some(super::state::truncate(r, MAX_REASON_BYTES));
        }
        let rec = Arc::clone(slot);
        if to.is_terminal() {
            if let Some(key) = &rec.session_key {
                self.sessions.by_key.remove(key);
            }
            if let Some(at) = rec.deadline_ms {
                self.sessions.deadlines.remove(&(at, id));
            }
        }
        Ok(Reply::Session(rec))
    }

    /// Ends every live session whose deadline has passed, as `timeout`.
    pub(crate) fn expire_sessions(&mut self) {
        while let Some(&(at, id)) = self.sessions.deadlines.first() {
            if at > self.clock_ms {
                break;
            }
            self.move_session(id, SessionState::Timeout, None, Some("time limit reached"))
                .expect("invariant: sessions with deadlines are live");
        }
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
        };
        apply(&mut s, 0, Command::RegisterGateway(reg)).unwrap();
        s
    }

    fn open(key: Option<&str>, limit: Option<u64>) -> Command {
        Command::OpenSession(OpenSession {
            gateway: GatewayId("gw".into()),
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
            s.sessions().by_key(&SessionKey("k1".into())).unwrap().task,
            Some(TaskId(7))
        );
        apply(&mut s, 15, mv(SessionState::Completing, None)).unwrap();
        apply(&mut s, 16, mv(SessionState::Completed, None)).unwrap();
        assert!(
            s.sessions().by_key(&SessionKey("k1".into())).is_none(),
            "ended sessions free their key"
        );
        assert!(apply(&mut s, 17, open(Some("k1"), None)).is_ok());
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
        assert!(s.sessions().by_key(&SessionKey("k".into())).is_none());
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
    }
}
