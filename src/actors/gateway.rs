//! The Gateway actor: one per gateway placed on this node. It probes the
//! gateway's health on a timer and watches its circuit breaker, and records
//! both in the replicated registry whenever they differ from what is
//! committed there, which is what dispatch reads: an open breaker or an
//! unhealthy probe takes the gateway's agents out of dispatch until they
//! recover. It compares with the committed record, not with a cache, so a
//! report lost to a leader change is made again on the next check.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::fsm::{Circuit, Command, GatewayId, Health};
use crate::gateway::{BoxFuture, GatewayDriver, GuardedDriver, PROBE_TIMEOUT};
use crate::node::Node;

/// How often the breaker's state is compared with the registry.
pub const CIRCUIT_CHECK: Duration = Duration::from_millis(500);

/// Where a gateway actor reads and writes its registry record: the node in
/// production; tests may supply their own.
pub trait GatewayRegistry: Send + Sync + 'static {
    /// The committed health and circuit of `id`, if registered.
    fn committed(&self, id: &GatewayId) -> Option<(Health, Circuit)>;
    /// Proposes a new health and circuit; true once committed.
    fn report(&self, id: &GatewayId, health: Health, circuit: Circuit) -> BoxFuture<'_, bool>;
}

impl GatewayRegistry for Node {
    fn committed(&self, id: &GatewayId) -> Option<(Health, Circuit)> {
        self.state()
            .read(|s| s.registry().gateway(id).map(|g| (g.health, g.circuit)))
    }

    fn report(&self, id: &GatewayId, health: Health, circuit: Circuit) -> BoxFuture<'_, bool> {
        let cmd = Command::ReportGateway {
            id: id.clone(),
            health,
            circuit,
        };
        Box::pin(async move { matches!(self.write(cmd).await, Ok(Ok(_))) })
    }
}

/// The gateway actor.
pub struct GatewayActor;

/// What a gateway actor starts with.
#[derive(Clone)]
pub struct GatewayArgs {
    /// The gateway.
    pub id: GatewayId,
    /// Its guarded driver (shared with its agents).
    pub driver: Arc<GuardedDriver>,
    /// Where its record lives.
    pub registry: Arc<dyn GatewayRegistry>,
    /// How often to probe.
    pub probe_every: Duration,
}

/// Messages.
pub enum GatewayMsg {
    /// Probe health now.
    Probe,
    /// Compare the breaker's state with the registry.
    Check,
}

// Local only: never sent to another node.
impl ractor::Message for GatewayMsg {}

/// The actor's state.
pub struct GatewayState {
    args: GatewayArgs,
    /// Last probe result (unknown until the first probe).
    health: Health,
}

impl Actor for GatewayActor {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GatewayMsg>,
        args: GatewayArgs,
    ) -> Result<GatewayState, ActorProcessingErr> {
        myself.send_message(GatewayMsg::Probe)?;
        myself.send_interval(args.probe_every, || GatewayMsg::Probe);
        myself.send_interval(CIRCUIT_CHECK, || GatewayMsg::Check);
        Ok(GatewayState {
            args,
            health: Health::Unknown,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Probe => {
                let found = tokio::time::timeout(
                    PROBE_TIMEOUT + Duration::from_millis(500),
                    state.args.driver.probe(),
                )
                .await;
                state.health = match found {
                    Ok(h) if h.is_healthy() => Health::Healthy,
                    Ok(h) => {
                        tracing::info!(gateway = %state.args.id, probe = ?h, "gateway probe failed");
                        Health::Unhealthy
                    }
                    Err(_) => Health::Unhealthy,
                };
                sync_record(state).await;
            }
            GatewayMsg::Check => sync_record(state).await,
        }
        Ok(())
    }
}

/// Reports health and circuit if the committed record says otherwise.
async fn sync_record(state: &GatewayState) {
    let a = &state.args;
    let circuit = Circuit::from(a.driver.circuit());
    let Some((health, committed_circuit)) = a.registry.committed(&a.id) else {
        return;
    };
    let want = if state.health == Health::Unknown {
        health
    } else {
        state.health
    };
    if (want, circuit) != (health, committed_circuit) {
        tracing::info!(gateway = %a.id, health = ?want, circuit = ?circuit, "reporting gateway state");
        if !a.registry.report(&a.id, want, circuit).await {
            tracing::debug!(gateway = %a.id, "gateway report not committed; next check retries");
        }
    }
}
