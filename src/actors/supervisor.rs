//! [`Supervisor`]: the one reusable supervisor actor. It owns named children,
//! restarts failed ones per its [`RestartPolicy`], forgets cleanly stopped
//! ones, and fails (escalates) when a child trips the intensity limit.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort,
    SupervisionEvent,
};

use super::error::{Error, Result};
use super::events::{Observer, SupervisorEvent};
use super::policy::{Decision, RestartPolicy, RestartTracker, Strategy};
use super::spec::ChildSpec;

/// How long [`SupervisorRef`] waits for a supervisor to answer a request.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The supervisor actor. Stateless: everything lives in [`SupervisorState`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Supervisor;

/// What a supervisor is started with.
#[derive(Clone, Debug)]
pub struct SupervisorArgs {
    /// The supervisor's name: a role (`gateways`), used in events, logs and
    /// as the metrics label, so keep the set of names bounded.
    pub name: String,
    /// The restart policy for its children.
    pub policy: RestartPolicy,
    /// Where its events go.
    pub observer: Observer,
    /// Children started in `post_start`, in order (more can be added later).
    pub children: Vec<ChildSpec>,
}

impl SupervisorArgs {
    /// A supervisor called `name` with no initial children.
    pub fn new(name: impl Into<String>, policy: RestartPolicy, observer: Observer) -> Self {
        Self {
            name: name.into(),
            policy,
            observer,
            children: Vec::new(),
        }
    }

    /// Adds an initial child.
    pub fn with_child(mut self, spec: ChildSpec) -> Self {
        self.children.push(spec);
        self
    }
}

/// Requests a supervisor handles. Use [`SupervisorRef`] rather than sending
/// these by hand.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start a child and supervise it; replies with its cell.
    AddChild(ChildSpec, RpcReplyPort<Result<ActorCell>>),
    /// Stop a child and forget it; replies with the stopping cell (`None` if
    /// there was no running child by that name).
    RemoveChild(String, RpcReplyPort<Option<ActorCell>>),
    /// Look up a running child by name.
    GetChild(String, RpcReplyPort<Option<ActorCell>>),
    /// Names of all children, running or awaiting restart.
    ListChildren(RpcReplyPort<Vec<String>>),
    /// Timer: a child's backoff is over (sent by the supervisor to itself).
    RestartChild {
        /// The child's name.
        child: String,
        /// Which scheduled restart this is; stale ones are ignored.
        generation: u64,
    },
}

// Local only: never sent to another node.
impl ractor::Message for SupervisorMsg {}

/// Aborts a scheduled restart when dropped (child removed, supervisor gone).
#[derive(Debug)]
struct Timer(JoinHandle<std::result::Result<(), MessagingErr<SupervisorMsg>>>);

impl Drop for Timer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
enum Status {
    Running(ActorCell),
    Pending {
        generation: u64,
        attempt: u32,
        _timer: Timer,
    },
}

#[derive(Debug)]
struct Child {
    spec: ChildSpec,
    tracker: RestartTracker,
    status: Status,
}

/// A supervisor's children and policy.
#[derive(Debug)]
pub struct SupervisorState {
    name: String,
    policy: RestartPolicy,
    observer: Observer,
    initial: Vec<ChildSpec>,
    children: BTreeMap<String, Child>,
    by_id: HashMap<ActorId, String>,
    next_generation: u64,
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> std::result::Result<SupervisorState, ActorProcessingErr> {
        args.policy.validate().map_err(Error::InvalidPolicy)?;
        Ok(SupervisorState {
            name: args.name,
            policy: args.policy,
            observer: args.observer,
            initial: args.children,
            children: BTreeMap::new(),
            by_id: HashMap::new(),
            next_generation: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        for spec in std::mem::take(&mut state.initial) {
            state.add(&myself, spec).await?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::AddChild(spec, reply) => {
                let _ = reply.send(state.add(&myself, spec).await);
            }
            SupervisorMsg::RemoveChild(name, reply) => {
                let _ = reply.send(state.remove(&name));
            }
            SupervisorMsg::GetChild(name, reply) => {
                let _ = reply.send(state.running(&name));
            }
            SupervisorMsg::ListChildren(reply) => {
                let _ = reply.send(state.children.keys().cloned().collect());
            }
            SupervisorMsg::RestartChild { child, generation } => {
                state.restart(&myself, &child, generation).await?;
            }
        }
        Ok(())
    }

    /// Overrides ractor's default, which stops the supervisor whenever any
    /// child exits (CRATES.md pitfall 6).
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                state.on_failed(&myself, &cell, err.to_string())?;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                state.on_terminated(&cell, reason);
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        stop_children(
            &myself.get_cell(),
            &state.name,
            state.policy.shutdown_timeout,
        )
        .await;
        Ok(())
    }
}

/// Stops `supervisor`'s children gracefully, waiting up to `timeout`, then
/// kills the stragglers with their whole subtrees. Needed because ractor's
/// own teardown only kills children that are not already stopping: a child
/// stuck in `post_stop`, or the children of a supervisor killed in its own
/// `post_stop`, would outlive their supervisor.
async fn stop_children(supervisor: &ActorCell, name: &str, timeout: Duration) {
    let reason = format!("supervisor `{name}` stopping");
    supervisor
        .stop_children_and_wait(Some(reason), Some(timeout))
        .await;
    let stragglers = supervisor.get_children();
    for child in &stragglers {
        tracing::warn!(supervisor = name, child = %child.get_id(), ?timeout, "child did not stop in time; killing");
        kill_tree(child);
    }
    for child in &stragglers {
        let _ = child.wait(Some(timeout)).await;
    }
}

impl SupervisorState {
    fn running(&self, name: &str) -> Option<ActorCell> {
        match self.children.get(name).map(|c| &c.status) {
            Some(Status::Running(cell)) => Some(cell.clone()),
            _ => None,
        }
    }

    fn event_started(&self, child: &str) -> SupervisorEvent {
        SupervisorEvent::Started {
            supervisor: self.name.clone(),
            child: child.to_string(),
        }
    }

    async fn add(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        spec: ChildSpec,
    ) -> Result<ActorCell> {
        let name = spec.name().to_string();
        if self.children.contains_key(&name) {
            return Err(Error::DuplicateChild(name));
        }
        let cell = spec
            .start(myself.get_cell())
            .await
            .map_err(|e| Error::Spawn {
                child: name.clone(),
                reason: e.to_string(),
            })?;
        let policy = spec.policy().unwrap_or(&self.policy).clone();
        self.by_id.insert(cell.get_id(), name.clone());
        self.children.insert(
            name.clone(),
            Child {
                spec,
                tracker: RestartTracker::new(policy),
                status: Status::Running(cell.clone()),
            },
        );
        self.observer.emit(self.event_started(&name));
        Ok(cell)
    }

    fn remove(&mut self, name: &str) -> Option<ActorCell> {
        let child = self.children.remove(name)?;
        self.observer.emit(SupervisorEvent::Removed {
            supervisor: self.name.clone(),
            child: name.to_string(),
        });
        match child.status {
            Status::Running(cell) => {
                self.by_id.remove(&cell.get_id());
                cell.stop(Some(format!("removed from `{}`", self.name)));
                Some(cell)
            }
            Status::Pending { .. } => None,
        }
    }

    fn on_terminated(&mut self, cell: &ActorCell, reason: Option<String>) {
        let Some(name) = self.by_id.remove(&cell.get_id()) else {
            return; // removed, or stopped by a one-for-all restart
        };
        self.children.remove(&name);
        self.observer.emit(SupervisorEvent::Stopped {
            supervisor: self.name.clone(),
            child: name,
            reason,
        });
    }

    fn on_failed(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        cell: &ActorCell,
        error: String,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let Some(name) = self.by_id.remove(&cell.get_id()) else {
            tracing::debug!(supervisor = %self.name, error = %error, "failure of a child no longer supervised");
            return Ok(());
        };
        self.on_child_down(myself, &name, error)
    }

    /// The one place a child failure becomes a restart, an escalation or a
    /// give-up.
    fn on_child_down(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: &str,
        error: String,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let now = tokio::time::Instant::now().into_std();
        let Some(child) = self.children.get_mut(name) else {
            return Ok(());
        };
        match child.tracker.on_failure(now) {
            Decision::Restart { after, attempt } => {
                self.schedule(myself, name, attempt, after, error);
                if self.policy.strategy == Strategy::OneForAll {
                    self.restart_siblings(myself, name, attempt, after);
                }
                Ok(())
            }
            Decision::Escalate => {
                self.children.remove(name);
                self.observer.emit(SupervisorEvent::Escalated {
                    supervisor: self.name.clone(),
                    child: name.to_string(),
                    error: error.clone(),
                });
                Err(format!(
                    "supervisor `{}`: child `{name}` exceeded its restart intensity; last error: {error}",
                    self.name
                )
                .into())
            }
            Decision::GiveUp => {
                self.children.remove(name);
                self.observer.emit(SupervisorEvent::GaveUp {
                    supervisor: self.name.clone(),
                    child: name.to_string(),
                    error,
                });
                Ok(())
            }
        }
    }

    /// One-for-all: stop every running sibling of `failed` and schedule it
    /// with the failed child's backoff. Their `ActorTerminated` is ignored
    /// because they leave `by_id` here.
    fn restart_siblings(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        failed: &str,
        attempt: u32,
        after: Duration,
    ) {
        let running: Vec<(String, ActorCell)> = self
            .children
            .iter()
            .filter(|(n, _)| n.as_str() != failed)
            .filter_map(|(n, c)| match &c.status {
                Status::Running(cell) => Some((n.clone(), cell.clone())),
                Status::Pending { .. } => None,
            })
            .collect();
        for (name, cell) in running {
            self.by_id.remove(&cell.get_id());
            cell.stop(Some(format!("one-for-all restart after `{failed}` failed")));
            let why = format!("sibling `{failed}` failed (one-for-all)");
            self.schedule(myself, &name, attempt, after, why);
        }
    }

    fn schedule(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: &str,
        attempt: u32,
        after: Duration,
        error: String,
    ) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let child = name.to_string();
        let timer = Timer(
            myself.send_after(after, move || SupervisorMsg::RestartChild {
                child,
                generation,
            }),
        );
        if let Some(c) = self.children.get_mut(name) {
            c.status = Status::Pending {
                generation,
                attempt,
                _timer: timer,
            };
        }
        self.observer.emit(SupervisorEvent::Restarting {
            supervisor: self.name.clone(),
            child: name.to_string(),
            attempt,
            after,
            error,
        });
    }

    async fn restart(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: &str,
        generation: u64,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let (spec, attempt) = match self.children.get(name) {
            Some(Child {
                spec,
                status:
                    Status::Pending {
                        generation: g,
                        attempt,
                        ..
                    },
                ..
            }) if *g == generation => (spec.clone(), *attempt),
            _ => return Ok(()), // removed meanwhile, or a stale timer
        };
        match spec.start(myself.get_cell()).await {
            Ok(cell) => {
                self.by_id.insert(cell.get_id(), name.to_string());
                if let Some(c) = self.children.get_mut(name) {
                    c.status = Status::Running(cell);
                }
                self.observer.emit(SupervisorEvent::Restarted {
                    supervisor: self.name.clone(),
                    child: name.to_string(),
                    attempt,
                });
                Ok(())
            }
            Err(e) => self.on_child_down(myself, name, format!("restart failed: {e}")),
        }
    }
}

/// Kills `root` and every actor below it (a Kill signal also interrupts a
/// `post_stop` in progress, at its next `.await`).
pub(crate) fn kill_tree(root: &ActorCell) {
    let mut stack = vec![root.clone()];
    while let Some(cell) = stack.pop() {
        stack.extend(cell.get_children());
        cell.kill();
    }
}

/// A typed handle to a running [`Supervisor`].
#[derive(Clone, Debug)]
pub struct SupervisorRef {
    name: String,
    actor: ActorRef<SupervisorMsg>,
}

impl SupervisorRef {
    /// Spawns an unsupervised (root) supervisor. The join handle completes
    /// when it exits.
    pub async fn spawn(args: SupervisorArgs) -> Result<(Self, JoinHandle<()>)> {
        let name = args.name.clone();
        let (actor, join) =
            Actor::spawn(None, Supervisor, args)
                .await
                .map_err(|e| Error::Spawn {
                    child: name.clone(),
                    reason: e.to_string(),
                })?;
        Ok((Self { name, actor }, join))
    }

    /// Wraps the cell of a running supervisor called `name`.
    pub fn from_cell(name: impl Into<String>, cell: ActorCell) -> Self {
        Self {
            name: name.into(),
            actor: ActorRef::from(cell),
        }
    }

    /// The supervisor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The supervisor's cell (to stop, wait for, or link to it).
    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    async fn call<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<T>) -> SupervisorMsg,
    ) -> Result<T> {
        match self.actor.call(build, Some(CALL_TIMEOUT)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => Err(Error::Timeout(self.name.clone(), CALL_TIMEOUT)),
            Ok(CallResult::SenderError) | Err(_) => Err(Error::Unavailable(self.name.clone())),
        }
    }

    /// Starts `spec` under this supervisor.
    pub async fn add_child(&self, spec: ChildSpec) -> Result<ActorCell> {
        self.call(|r| SupervisorMsg::AddChild(spec, r)).await?
    }

    /// Stops the child called `name` and forgets it, waiting up to `wait`
    /// for it to exit (then it is killed, with any actors below it). Returns
    /// whether it was running.
    pub async fn remove_child(&self, name: &str, wait: Duration) -> Result<bool> {
        let name = name.to_string();
        let Some(cell) = self.call(|r| SupervisorMsg::RemoveChild(name, r)).await? else {
            return Ok(false);
        };
        if cell.wait(Some(wait)).await.is_err() {
            kill_tree(&cell);
        }
        Ok(true)
    }

    /// The running child called `name`, if any.
    pub async fn child(&self, name: &str) -> Result<Option<ActorCell>> {
        let name = name.to_string();
        self.call(|r| SupervisorMsg::GetChild(name, r)).await
    }

    /// Names of all children, running or awaiting restart.
    pub async fn children(&self) -> Result<Vec<String>> {
        self.call(SupervisorMsg::ListChildren).await
    }
}

impl ChildSpec {
    /// A child that is itself a [`Supervisor`] started with `args` (named
    /// `args.name`). A restarted supervisor starts with `args.children` only:
    /// children added at runtime are re-added by whoever owns them.
    pub fn supervisor(args: SupervisorArgs) -> Self {
        let name = args.name.clone();
        ChildSpec::new(name, move || (Supervisor, args.clone()))
    }
}
