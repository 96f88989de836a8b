//! [`ChildSpec`]: how a supervisor (re)starts one child.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ractor::{Actor, ActorCell, SpawnErr};

use super::policy::RestartPolicy;

type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;
type StartFn = dyn Fn(ActorCell) -> StartFuture + Send + Sync;

/// A named child and the factory that spawns it, linked to a supervisor.
/// The factory runs again on every restart, so each incarnation starts from
/// fresh arguments (actors cache; the committed state is the truth).
#[derive(Clone)]
pub struct ChildSpec {
    name: String,
    policy: Option<RestartPolicy>,
    start: Arc<StartFn>,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ChildSpec {
    /// A child called `name` (unique among its siblings), built by `make`,
    /// which returns the actor and its start arguments. The actor is spawned
    /// unregistered (ractor's registry is process-global; names here are
    /// local to the supervisor).
    pub fn new<A, F>(name: impl Into<String>, make: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let start = move |supervisor: ActorCell| -> StartFuture {
            let (actor, args) = make();
            Box::pin(async move {
                let (actor_ref, _join) = A::spawn_linked(None, actor, args, supervisor).await?;
                Ok(actor_ref.get_cell())
            })
        };
        Self {
            name: name.into(),
            policy: None,
            start: Arc::new(start),
        }
    }

    /// Uses `policy` for this child's backoff and intensity limit instead of
    /// its supervisor's (the strategy and shutdown timeout stay the
    /// supervisor's).
    pub fn with_policy(mut self, policy: RestartPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The child's name within its supervisor.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The per-child policy override, if any.
    pub fn policy(&self) -> Option<&RestartPolicy> {
        self.policy.as_ref()
    }

    /// Spawns one incarnation linked to `supervisor`.
    pub(crate) async fn start(&self, supervisor: ActorCell) -> Result<ActorCell, SpawnErr> {
        (self.start)(supervisor).await
    }
}
