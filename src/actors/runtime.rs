//! The node's runtime reconciler: keeps the queue-shard actor running, one
//! Gateway actor for every gateway placed on this node, and one Agent actor
//! for every registered agent of those gateways, and none other.
//!
//! It reads the committed registry on a timer (and so after every leader
//! change), compares it with the supervisors' children and adds or removes
//! actors. Each placed gateway gets one guarded driver (its driver behind
//! its circuit breaker), built from its spec and shared by its gateway actor
//! and its agents, and one [`SessionHost`] through which its agents reach
//! the session actors its gateway actor supervises; when the spec changes,
//! the gateway's actors are stopped and started again with a driver built
//! from the new spec.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::agent::{AgentActor, AgentArgs};
use super::gateway::{GatewayActor, GatewayArgs, GatewayRegistry};
use super::router::AgentDirectory;
use super::session::SessionHost;
use super::shard::{QueueShardActor, SHARD};
use super::{
    AGENTS, ChildSpec, Error, GATEWAYS, Observer, QUEUE_SHARDS, RestartPolicy, SupervisorRef,
};
use crate::fsm::{AgentId, Command, GatewayId};
use crate::gateway::{DriverContext, GatewayDriver, GatewaySpec, GuardedDriver, driver_for};
use crate::node::Node;

/// How often the reconciler compares the registry with the running actors.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(250);
/// How long removing an actor waits for it to stop.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// A driver built from one version of a gateway's spec.
struct Built {
    spec: String,
    driver: Arc<GuardedDriver>,
    sessions: SessionHost,
}

/// What this node should run, from the committed registry.
struct Desired {
    /// Placed gateways here, with their spec text.
    gateways: BTreeMap<GatewayId, String>,
    /// Their agents, with their gateway.
    agents: BTreeMap<AgentId, GatewayId>,
}

fn gateway_actor(id: &GatewayId) -> String {
    format!("gateway:{id}")
}

fn agent_actor(id: &AgentId) -> String {
    format!("agent:{id}")
}

/// Runs until the node shuts down.
pub async fn reconcile_loop(
    node: Node,
    root: SupervisorRef,
    directory: AgentDirectory,
    policy: RestartPolicy,
    observer: Observer,
) {
    let shutdown = node.shutdown_token().clone();
    let mut drivers: BTreeMap<GatewayId, Built> = BTreeMap::new();
    let mut first = true;
    // A node starts cut off: nothing runs here until its first heartbeat
    // commits, which is then logged as contact, not as a loss.
    let mut was_cut_off = true;
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
        let cut_off = node.cut_off();
        crate::metrics::global()
            .node_cut_off
            .set(i64::from(cut_off));
        if cut_off != was_cut_off {
            if cut_off {
                tracing::warn!(
                    dead_after = ?node.queue_config().node_dead_after,
                    "cut off from the majority: no heartbeat sent within node_dead_after has committed; \
                     stopping this node's gateway and agent actors (the majority places its gateways elsewhere)"
                );
            } else {
                tracing::info!(
                    "in contact with the majority again: running what the registry places here"
                );
            }
        }
        was_cut_off = cut_off;
        let tree = Tree {
            root: &root,
            directory: &directory,
            policy: &policy,
            observer: &observer,
        };
        if let Err(e) = reconcile(&node, &tree, &mut drivers, cut_off).await {
            tracing::warn!(error = %e, "runtime reconcile failed; retrying");
        }
        if !cut_off {
            watch_agents(&node, &directory).await;
        }
    }
}

/// Takes out of dispatch the agents online here whose actor has not beaten
/// for `runtime.agent_silent_after` (stuck in a handler, or starved), and
/// puts back those heard again: a `ReportAgent` for each that changed.
async fn watch_agents(node: &Node, directory: &AgentDirectory) {
    let me = node.id();
    let after = node.config().runtime.agent_silent_after;
    let online: Vec<(AgentId, bool)> = node.state().read(|s| {
        s.registry()
            .agents()
            .filter(|a| a.online_on == Some(me))
            .map(|a| (a.reg.id.clone(), a.silent_since_ms.is_some()))
            .collect()
    });
    directory.retain_beats(|a| online.iter().any(|(id, _)| id == a));
    for (agent, _) in &online {
        directory.beat_if_unheard(agent);
    }
    for (agent, shown_silent) in online {
        let Some(quiet) = directory.silent_for(&agent) else {
            continue;
        };
        let silent = quiet > after;
        if silent == shown_silent {
            continue;
        }
        if silent {
            tracing::warn!(%agent, quiet = ?quiet, "agent silent: its actor has not beaten; taken out of dispatch");
        } else {
            tracing::info!(%agent, "agent heard again: back in dispatch");
        }
        let cmd = Command::ReportAgent {
            agent: agent.clone(),
            node: me,
            circuit: None,
            silent: Some(silent),
        };
        match tokio::time::timeout(Duration::from_secs(1), node.write(cmd)).await {
            Ok(Ok(Ok(_))) => {}
            other => {
                tracing::debug!(%agent, outcome = ?other.map(|r| r.map(|_| ())), "agent silence not recorded yet; retrying");
            }
        }
    }
}

/// What the registry places here; nothing while the node is cut off from
/// the majority (see `node/contact.rs`).
fn desired(node: &Node, cut_off: bool) -> Desired {
    if cut_off {
        return Desired {
            gateways: BTreeMap::new(),
            agents: BTreeMap::new(),
        };
    }
    let me = node.id();
    node.state().read(|s| {
        let reg = s.registry();
        let gateways: BTreeMap<GatewayId, String> = reg
            .gateways()
            .filter(|g| g.owner == Some(me))
            .map(|g| (g.reg.id.clone(), g.reg.spec.clone()))
            .collect();
        let agents = reg
            .agents()
            .filter(|a| gateways.contains_key(&a.reg.gateway))
            .map(|a| (a.reg.id.clone(), a.reg.gateway.clone()))
            .collect();
        Desired { gateways, agents }
    })
}

async fn sub(root: &SupervisorRef, name: &str) -> super::Result<SupervisorRef> {
    // Looked up each time: the child supervisor may have been restarted.
    let cell = root
        .child(name)
        .await?
        .ok_or_else(|| Error::Unavailable(name.to_string()))?;
    Ok(SupervisorRef::from_cell(name, cell))
}

/// Starts the queue-shard actor if its supervisor lacks it (first start, or
/// the supervisor was restarted and forgot its runtime children); and,
/// with several shards, a keeper (`actors/keeper.rs`) for each shard this
/// node leads, stopping those of shards it no longer leads.
async fn ensure_shard(node: &Node, root: &SupervisorRef) -> super::Result<()> {
    let shards = sub(root, QUEUE_SHARDS).await?;
    let have = shards.children().await?;
    if !have.iter().any(|c| c == SHARD) {
        let node = node.clone();
        shards
            .add_child(ChildSpec::new(SHARD, move || {
                (QueueShardActor, node.clone())
            }))
            .await?;
    }
    let led: BTreeSet<String> = if node.shard_groups().is_empty() {
        BTreeSet::new()
    } else {
        node.queue_groups()
            .iter()
            .filter(|g| g.is_leader())
            .map(|g| super::keeper_name(g.id()))
            .collect()
    };
    // One keeper that does not stop in time keeps neither the others from
    // stopping nor the led shards' keepers from starting; it is tried again
    // at the next pass.
    let mut first_error = None;
    let unled = have
        .iter()
        .filter(|c| c.starts_with("keeper-") && !led.contains(*c));
    for name in unled {
        if let Err(e) = shards.remove_child(name, REMOVE_WAIT).await {
            tracing::warn!(keeper = %name, error = %e, "a queue-shard keeper did not stop; tried again");
            first_error.get_or_insert(e);
        }
    }
    for g in node.queue_groups() {
        let name = super::keeper_name(g.id());
        if led.contains(&name) && !have.contains(&name) {
            let (node, id) = (node.clone(), g.id());
            shards
                .add_child(ChildSpec::new(name, move || {
                    (super::ShardKeeper, (node.clone(), id))
                }))
                .await?;
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What the reconciler starts actors under, and with.
struct Tree<'a> {
    root: &'a SupervisorRef,
    directory: &'a AgentDirectory,
    policy: &'a RestartPolicy,
    observer: &'a Observer,
}

async fn reconcile(
    node: &Node,
    tree: &Tree<'_>,
    drivers: &mut BTreeMap<GatewayId, Built>,
    cut_off: bool,
) -> super::Result<()> {
    let (root, directory) = (tree.root, tree.directory);
    let want = desired(node, cut_off);
    let gateways = sub(root, GATEWAYS).await?;
    let agents = sub(root, AGENTS).await?;
    // Gateways whose spec changed: their actors restart with a new driver.
    let changed: BTreeSet<GatewayId> = drivers
        .iter()
        .filter(|(g, b)| want.gateways.get(*g).is_some_and(|spec| *spec != b.spec))
        .map(|(g, _)| g.clone())
        .collect();
    drivers.retain(|g, _| want.gateways.contains_key(g) && !changed.contains(g));

    let have_agents: BTreeSet<String> = agents.children().await?.into_iter().collect();
    for name in &have_agents {
        let keep = want
            .agents
            .iter()
            .any(|(a, g)| agent_actor(a) == *name && !changed.contains(g));
        if !keep {
            tracing::info!(actor = %name, cut_off, "stopping agent: its gateway left this node, changed, or it was deregistered, or the node is cut off");
            agents.remove_child(name, REMOVE_WAIT).await?;
        }
    }
    let have_gateways: BTreeSet<String> = gateways.children().await?.into_iter().collect();
    for name in &have_gateways {
        let keep = want
            .gateways
            .keys()
            .any(|g| gateway_actor(g) == *name && !changed.contains(g));
        if !keep {
            tracing::info!(actor = %name, cut_off, "stopping gateway actor: it left this node or changed, or the node is cut off");
            gateways.remove_child(name, REMOVE_WAIT).await?;
        }
    }
    if !changed.is_empty() {
        // Started again on the next pass, from the new spec.
        return Ok(());
    }

    let registry: Arc<dyn GatewayRegistry> = Arc::new(node.clone());
    let ctx = DriverContext::for_node(node.config());
    let probe_every = node.config().runtime.gateway_probe_interval;
    for (gateway, spec) in &want.gateways {
        let name = gateway_actor(gateway);
        if have_gateways.contains(&name) {
            continue;
        }
        let Some((driver, sessions)) = driver(drivers, gateway, spec, &ctx) else {
            continue;
        };
        // Built above, so it parses.
        let managed = serde_json::from_str::<GatewaySpec>(spec)
            .ok()
            .and_then(|s| s.managed);
        let args = GatewayArgs {
            id: gateway.clone(),
            driver,
            registry: Arc::clone(&registry),
            probe_every: managed.as_ref().map_or(probe_every, |m| m.probe_interval),
            sessions,
            policy: tree.policy.clone(),
            observer: tree.observer.clone(),
            managed,
        };
        gateways
            .add_child(ChildSpec::new(name.clone(), move || {
                (GatewayActor, args.clone())
            }))
            .await?;
        tracing::info!(actor = %name, "gateway actor started");
    }
    for (agent, gateway) in &want.agents {
        let name = agent_actor(agent);
        if have_agents.contains(&name) {
            continue;
        }
        let Some(spec) = want.gateways.get(gateway) else {
            continue;
        };
        let Some((driver, sessions)) = driver(drivers, gateway, spec, &ctx) else {
            continue;
        };
        let args = AgentArgs {
            node: node.clone(),
            id: agent.clone(),
            driver: driver as Arc<dyn GatewayDriver>,
            directory: directory.clone(),
            sessions,
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

/// The gateway's guarded driver and session host, built from `spec` if not
/// built yet.
fn driver(
    drivers: &mut BTreeMap<GatewayId, Built>,
    gateway: &GatewayId,
    spec: &str,
    ctx: &DriverContext,
) -> Option<(Arc<GuardedDriver>, SessionHost)> {
    if let Some(b) = drivers.get(gateway) {
        return Some((Arc::clone(&b.driver), b.sessions.clone()));
    }
    let built = serde_json::from_str::<GatewaySpec>(spec)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            let breaker = s.breaker.clone();
            driver_for(&s, ctx)
                .map(|d| Arc::new(GuardedDriver::new(d, breaker)))
                .map_err(|e| e.to_string())
        });
    match built {
        Ok(driver) => {
            let sessions = SessionHost::new(
                gateway.clone(),
                Arc::clone(&driver) as Arc<dyn GatewayDriver>,
            );
            drivers.insert(
                gateway.clone(),
                Built {
                    spec: spec.to_owned(),
                    driver: Arc::clone(&driver),
                    sessions: sessions.clone(),
                },
            );
            Some((driver, sessions))
        }
        Err(e) => {
            refused(gateway, spec, &e);
            None
        }
    }
}

/// The spec each gateway's driver was last refused for on this node.
static REFUSED: std::sync::Mutex<BTreeMap<GatewayId, String>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Says once per spec (not on every reconcile pass) that a gateway's
/// driver cannot be built here: an invalid spec, a secret that does not
/// resolve, or a spec this node's policy refuses (a program not in
/// `[gateways.command] allow`, ...). Its actors wait, and nothing runs.
fn refused(gateway: &GatewayId, spec: &str, why: &str) {
    let mut seen = REFUSED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.get(gateway).is_some_and(|s| s == spec) {
        tracing::debug!(%gateway, error = %why, "gateway's driver still refused");
        return;
    }
    seen.insert(gateway.clone(), spec.to_owned());
    tracing::warn!(%gateway, error = %why, "cannot build the gateway's driver on this node; nothing of it runs here");
}
