//! The node's runtime reconciler: keeps the queue-shard actor running, and
//! one Agent actor for every registered agent whose gateway is placed on
//! this node, and none other.
//!
//! It reads the committed registry on a timer (and so after every leader
//! change), compares it with the agent supervisor's children and adds or
//! removes actors. Drivers are built once per gateway spec and shared by the
//! gateway's agents.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::agent::{AgentActor, AgentArgs};
use super::router::AgentDirectory;
use super::shard::{QueueShardActor, SHARD};
use super::{AGENTS, ChildSpec, Error, QUEUE_SHARDS, SupervisorRef};
use crate::fsm::{AgentRecord, GatewayId};
use crate::gateway::{GatewayDriver, GatewaySpec, driver_for};
use crate::node::Node;

/// How often the reconciler compares the registry with the running actors.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(250);
/// How long removing an agent actor waits for it to stop.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// A driver built from one version of a gateway's spec.
struct Built {
    spec: String,
    driver: Arc<dyn GatewayDriver>,
}

/// Runs until the node shuts down.
pub async fn reconcile_loop(node: Node, root: SupervisorRef, directory: AgentDirectory) {
    let shutdown = node.shutdown_token().clone();
    let mut drivers: BTreeMap<GatewayId, Built> = BTreeMap::new();
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            }
        }
        first = false;
        if let Err(e) = ensure_shard(&node, &root).await {
            tracing::warn!(error = %e, "cannot start the queue-shard actor; retrying");
        }
        if let Err(e) = reconcile(&node, &root, &directory, &mut drivers).await {
            tracing::warn!(error = %e, "runtime reconcile failed; retrying");
        }
    }
}

/// The agents this node should run, with their gateway's spec text.
fn desired(node: &Node) -> BTreeMap<String, (AgentRecord, GatewayId, String)> {
    let me = node.id();
    node.state().read(|s| {
        let reg = s.registry();
        let here: BTreeMap<&GatewayId, &String> = reg
            .gateways()
            .filter(|g| g.owner == Some(me))
            .map(|g| (&g.reg.id, &g.reg.spec))
            .collect();
        reg.agents()
            .filter_map(|a| {
                let spec = here.get(&a.reg.gateway)?;
                Some((
                    format!("agent:{}", a.reg.id),
                    (a.clone(), a.reg.gateway.clone(), (*spec).clone()),
                ))
            })
            .collect()
    })
}

/// Starts the queue-shard actor if its supervisor lacks it (first start, or
/// the supervisor was restarted and forgot its runtime children).
async fn ensure_shard(node: &Node, root: &SupervisorRef) -> super::Result<()> {
    let cell = root
        .child(QUEUE_SHARDS)
        .await?
        .ok_or_else(|| Error::Unavailable(QUEUE_SHARDS.to_string()))?;
    let shards = SupervisorRef::from_cell(QUEUE_SHARDS, cell);
    if !shards.children().await?.iter().any(|c| c == SHARD) {
        let node = node.clone();
        shards
            .add_child(ChildSpec::new(SHARD, move || {
                (QueueShardActor, node.clone())
            }))
            .await?;
    }
    Ok(())
}

async fn reconcile(
    node: &Node,
    root: &SupervisorRef,
    directory: &AgentDirectory,
    drivers: &mut BTreeMap<GatewayId, Built>,
) -> super::Result<()> {
    let want = desired(node);
    // Looked up each time: the agent supervisor may have been restarted.
    let cell = root
        .child(AGENTS)
        .await?
        .ok_or_else(|| Error::Unavailable(AGENTS.to_string()))?;
    let agents = SupervisorRef::from_cell(AGENTS, cell);
    let have: BTreeSet<String> = agents.children().await?.into_iter().collect();
    for name in have.iter().filter(|n| !want.contains_key(*n)) {
        tracing::info!(actor = %name, "stopping agent: its gateway left this node or it was deregistered");
        agents.remove_child(name, REMOVE_WAIT).await?;
    }
    let live: BTreeSet<&GatewayId> = want.values().map(|(_, g, _)| g).collect();
    drivers.retain(|g, _| live.contains(g));
    for (name, (agent, gateway, spec)) in want.iter().filter(|(n, _)| !have.contains(*n)) {
        let Some(driver) = driver(drivers, gateway, spec) else {
            continue;
        };
        let args = AgentArgs {
            node: node.clone(),
            id: agent.reg.id.clone(),
            driver,
            directory: directory.clone(),
        };
        agents
            .add_child(ChildSpec::new(name.clone(), move || {
                (AgentActor, args.clone())
            }))
            .await?;
        tracing::info!(actor = %name, %gateway, "agent started");
    }
    Ok(())
}

/// The gateway's driver, built (or rebuilt when its spec changed).
fn driver(
    drivers: &mut BTreeMap<GatewayId, Built>,
    gateway: &GatewayId,
    spec: &str,
) -> Option<Arc<dyn GatewayDriver>> {
    if let Some(b) = drivers.get(gateway).filter(|b| b.spec == spec) {
        return Some(Arc::clone(&b.driver));
    }
    let built = serde_json::from_str::<GatewaySpec>(spec)
        .map_err(|e| e.to_string())
        .and_then(|s| driver_for(&s).map_err(|e| e.to_string()));
    match built {
        Ok(driver) => {
            drivers.insert(
                gateway.clone(),
                Built {
                    spec: spec.to_owned(),
                    driver: Arc::clone(&driver),
                },
            );
            Some(driver)
        }
        Err(e) => {
            tracing::warn!(%gateway, error = %e, "cannot build the gateway's driver; its agents wait");
            None
        }
    }
}
