//! [`NodeSupervisor`]: the root of one node's actor tree (DESIGN "Runtime
//! shape"), with one child supervisor each for queue shards, gateways and
//! agents, started and stopped as one unit.

use std::time::Duration;

use ractor::concurrency::JoinHandle;

use super::error::{Error, Result};
use super::events::Observer;
use super::policy::RestartPolicy;
use super::spec::ChildSpec;
use super::supervisor::{SupervisorArgs, SupervisorRef, kill_tree};

/// Name of the root supervisor.
pub const NODE: &str = "node";
/// Name of the supervisor of the queue-shard actors.
pub const QUEUE_SHARDS: &str = "queue_shards";
/// Name of the supervisor of the gateway actors.
pub const GATEWAYS: &str = "gateways";
/// Name of the supervisor of the agent actors.
pub const AGENTS: &str = "agents";

/// A running node actor tree. Dropping it does not stop the tree: call
/// [`NodeSupervisor::stop`].
#[derive(Debug)]
pub struct NodeSupervisor {
    root: SupervisorRef,
    join: JoinHandle<()>,
}

impl NodeSupervisor {
    /// Starts the root and its three child supervisors, all under `policy`
    /// and reporting to `observer`. The root has no parent: if it escalates
    /// it stops, which the observer sees as an `Escalated` event from
    /// [`NODE`] and [`NodeSupervisor::is_running`] as `false`.
    pub async fn start(policy: RestartPolicy, observer: Observer) -> Result<Self> {
        policy.validate().map_err(Error::InvalidPolicy)?;
        let child = |name: &str| {
            ChildSpec::supervisor(SupervisorArgs::new(name, policy.clone(), observer.clone()))
        };
        let args = SupervisorArgs::new(NODE, policy.clone(), observer.clone())
            .with_child(child(QUEUE_SHARDS))
            .with_child(child(GATEWAYS))
            .with_child(child(AGENTS));
        let (root, join) = SupervisorRef::spawn(args).await?;
        Ok(Self { root, join })
    }

    /// The root supervisor.
    pub fn root(&self) -> &SupervisorRef {
        &self.root
    }

    /// Whether the root is still running.
    pub fn is_running(&self) -> bool {
        !self.join.is_finished()
    }

    async fn sub(&self, name: &str) -> Result<SupervisorRef> {
        match self.root.child(name).await? {
            Some(cell) => Ok(SupervisorRef::from_cell(name, cell)),
            // Between a failure and its restart the child supervisor is gone.
            None => Err(Error::Unavailable(name.to_string())),
        }
    }

    /// The queue-shard supervisor, as currently running (it may have been
    /// restarted since the last call, so do not cache the handle for long).
    pub async fn queue_shards(&self) -> Result<SupervisorRef> {
        self.sub(QUEUE_SHARDS).await
    }

    /// The gateway supervisor, as currently running.
    pub async fn gateways(&self) -> Result<SupervisorRef> {
        self.sub(GATEWAYS).await
    }

    /// The agent supervisor, as currently running.
    pub async fn agents(&self) -> Result<SupervisorRef> {
        self.sub(AGENTS).await
    }

    /// Stops the whole tree gracefully (children first, each level waiting
    /// up to the policy's `shutdown_timeout`) and waits up to `deadline`;
    /// past it the tree is killed and [`Error::StopTimeout`] returned.
    pub async fn stop(self, deadline: Duration) -> Result<()> {
        let cell = self.root.cell();
        cell.stop(Some("node stopping".to_string()));
        match tokio::time::timeout(deadline, self.join).await {
            Ok(_) => Ok(()),
            Err(_) => {
                kill_tree(&cell);
                Err(Error::StopTimeout(deadline))
            }
        }
    }
}
