//! Supervision tree behaviour: restart after backoff, intensity escalation,
//! clean stops, removal, one-for-all, and bounded node shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use godel::actors::{
    ChildSpec, NodeSupervisor, Observer, OnExhausted, RestartPolicy, Strategy, SupervisorArgs,
    SupervisorEvent, SupervisorRef,
};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort};
use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, timeout};

/// A test child: answers with its incarnation number, and fails on demand.
struct Worker;

enum WorkerMsg {
    Incarnation(RpcReplyPort<u64>),
    Panic,
    Stop,
}

// Local only: never sent to another node.
impl ractor::Message for WorkerMsg {}

#[derive(Clone, Copy, Default)]
struct Behaviour {
    fail_on_start: bool,
    hang_on_stop: bool,
}

struct WorkerState {
    incarnation: u64,
    hang_on_stop: bool,
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = (u64, Behaviour);

    async fn pre_start(
        &self,
        _: ActorRef<WorkerMsg>,
        (incarnation, b): (u64, Behaviour),
    ) -> Result<WorkerState, ActorProcessingErr> {
        Ok(WorkerState {
            incarnation: if b.fail_on_start { 0 } else { incarnation },
            hang_on_stop: b.hang_on_stop,
        })
    }

    async fn post_start(
        &self,
        _: ActorRef<WorkerMsg>,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        if state.incarnation == 0 {
            return Err("worker refuses to run".into());
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Incarnation(reply) => {
                let _ = reply.send(state.incarnation);
            }
            WorkerMsg::Panic => panic!("worker told to panic"),
            WorkerMsg::Stop => myself.stop(Some("done".into())),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<WorkerMsg>,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        if state.hang_on_stop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(())
    }
}

/// A spec whose every spawn gets the next incarnation number from `counter`.
fn worker(name: &str, counter: Arc<AtomicU64>, b: Behaviour) -> ChildSpec {
    ChildSpec::new(name, move || {
        (Worker, (counter.fetch_add(1, Ordering::SeqCst) + 1, b))
    })
}

fn policy(max_restarts: u32) -> RestartPolicy {
    RestartPolicy {
        initial_backoff: Duration::from_millis(100),
        multiplier: 2.0,
        max_backoff: Duration::from_secs(1),
        max_restarts,
        window: Duration::from_secs(10),
        shutdown_timeout: Duration::from_millis(200),
        ..RestartPolicy::default()
    }
}

async fn incarnation(cell: ActorCell) -> u64 {
    let actor: ActorRef<WorkerMsg> = cell.into();
    ractor::call_t!(actor, WorkerMsg::Incarnation, 1000).unwrap()
}

async fn next_event(rx: &mut Receiver<SupervisorEvent>) -> SupervisorEvent {
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("observer open")
}

/// Events until (and including) the first one matching `last`; fails if that
/// takes more than 10 s in all (a restart loop must not hang the test).
async fn events_until(
    rx: &mut Receiver<SupervisorEvent>,
    last: impl Fn(&SupervisorEvent) -> bool,
) -> Vec<SupervisorEvent> {
    let mut out = Vec::new();
    let collect = async {
        loop {
            let e = next_event(rx).await;
            let done = last(&e);
            out.push(e);
            if done {
                return;
            }
        }
    };
    if timeout(Duration::from_secs(10), collect).await.is_err() {
        panic!("expected event not seen within 10 s; got {out:?}");
    }
    out
}

fn names(events: &[SupervisorEvent], supervisor: &str) -> Vec<&'static str> {
    events
        .iter()
        .filter(|e| e.supervisor() == supervisor)
        .map(SupervisorEvent::name)
        .collect()
}

#[tokio::test]
async fn panicking_child_is_restarted_after_backoff() {
    let (obs, mut rx) = Observer::channel(64);
    let (sup, _join) = SupervisorRef::spawn(SupervisorArgs::new("s", policy(3), obs))
        .await
        .unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let first = sup
        .add_child(worker("w", counter.clone(), Behaviour::default()))
        .await
        .unwrap();
    assert_eq!(incarnation(first.clone()).await, 1);

    first.send_message(WorkerMsg::Panic).unwrap();
    let evs = events_until(&mut rx, |e| e.name() == "restarted").await;
    assert_eq!(names(&evs, "s"), ["started", "restarting", "restarted"]);
    assert!(
        matches!(&evs[1], SupervisorEvent::Restarting { attempt: 1, after, error, .. }
        if *after == Duration::from_millis(100) && error.contains("panic"))
    );

    let second = sup.child("w").await.unwrap().expect("restarted child");
    assert_ne!(first.get_id(), second.get_id());
    first.wait(Some(Duration::from_secs(1))).await.unwrap();
    assert_eq!(first.get_status(), ActorStatus::Stopped);
    assert_eq!(incarnation(second).await, 2);
    sup.cell().stop(None);
}

#[tokio::test]
async fn backoff_is_respected_before_restart() {
    let (obs, mut rx) = Observer::channel(64);
    let (sup, _join) = SupervisorRef::spawn(SupervisorArgs::new("s", policy(3), obs))
        .await
        .unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let first = sup
        .add_child(worker("w", counter, Behaviour::default()))
        .await
        .unwrap();
    let _ = next_event(&mut rx).await; // started
    first.send_message(WorkerMsg::Panic).unwrap();
    assert_eq!(next_event(&mut rx).await.name(), "restarting");
    let t0 = Instant::now();
    // During the backoff the supervisor still answers, and has no child yet.
    assert!(sup.child("w").await.unwrap().is_none());
    assert_eq!(sup.children().await.unwrap(), ["w"]);
    assert_eq!(next_event(&mut rx).await.name(), "restarted");
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
    sup.cell().stop(None);
}

#[tokio::test]
async fn repeated_failures_escalate_to_the_parent() {
    let (obs, mut rx) = Observer::channel(64);
    let counter = Arc::new(AtomicU64::new(0));
    let flaky = Behaviour {
        fail_on_start: true,
        ..Behaviour::default()
    };
    let mid = SupervisorArgs::new("mid", policy(2), obs.clone()).with_child(worker(
        "flaky",
        counter.clone(),
        flaky,
    ));
    // The parent gives up on `mid` at its first failure, so the test ends.
    let parent_policy = RestartPolicy {
        on_exhausted: OnExhausted::GiveUp,
        ..policy(0)
    };
    let parent =
        SupervisorArgs::new("parent", parent_policy, obs).with_child(ChildSpec::supervisor(mid));
    let (parent, _join) = SupervisorRef::spawn(parent).await.unwrap();

    let evs = events_until(&mut rx, |e| {
        e.supervisor() == "parent" && e.name() == "gave_up"
    })
    .await;
    let mid_evs: Vec<_> = names(&evs, "mid")
        .into_iter()
        .filter(|n| ["restarting", "escalated"].contains(n))
        .collect();
    assert_eq!(mid_evs, ["restarting", "restarting", "escalated"]);
    match evs.last().unwrap() {
        SupervisorEvent::GaveUp { child, error, .. } => {
            assert_eq!(child, "mid");
            assert!(error.contains("exceeded its restart intensity"), "{error}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The initial spawn plus two restarts: three incarnations, no fourth.
    assert_eq!(counter.load(Ordering::SeqCst), 3);
    assert!(parent.children().await.unwrap().is_empty());
    parent.cell().stop(None);
}

#[tokio::test]
async fn cleanly_stopped_child_is_not_restarted() {
    let (obs, mut rx) = Observer::channel(64);
    let (sup, _join) = SupervisorRef::spawn(SupervisorArgs::new("s", policy(3), obs))
        .await
        .unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let cell = sup
        .add_child(worker("w", counter.clone(), Behaviour::default()))
        .await
        .unwrap();
    cell.send_message(WorkerMsg::Stop).unwrap();
    let evs = events_until(&mut rx, |e| e.name() == "stopped").await;
    assert!(
        matches!(evs.last(), Some(SupervisorEvent::Stopped { reason: Some(r), .. }) if r == "done")
    );
    // Well past any backoff: nothing restarted, nothing emitted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err());
    assert!(sup.children().await.unwrap().is_empty());
    assert_eq!(counter.load(Ordering::SeqCst), 1);
    // The supervisor survived its child's exit (ractor's default would stop it).
    assert_eq!(sup.cell().get_status(), ActorStatus::Running);
    sup.cell().stop(None);
}

#[tokio::test]
async fn removing_a_child_stops_it_without_restart() {
    let (obs, mut rx) = Observer::channel(64);
    let (sup, _join) = SupervisorRef::spawn(SupervisorArgs::new("s", policy(3), obs))
        .await
        .unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let cell = sup
        .add_child(worker("w", counter.clone(), Behaviour::default()))
        .await
        .unwrap();
    assert!(matches!(
        sup.add_child(worker("w", counter.clone(), Behaviour::default()))
            .await,
        Err(godel::actors::Error::DuplicateChild(_))
    ));
    assert!(sup.remove_child("w", Duration::from_secs(1)).await.unwrap());
    assert_eq!(cell.get_status(), ActorStatus::Stopped);
    assert!(!sup.remove_child("w", Duration::from_secs(1)).await.unwrap());
    let evs = events_until(&mut rx, |e| e.name() == "removed").await;
    assert_eq!(names(&evs, "s"), ["started", "removed"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.try_recv().is_err(),
        "no stop or restart event after removal"
    );
    assert!(sup.children().await.unwrap().is_empty());
    sup.cell().stop(None);
}

#[tokio::test]
async fn one_for_all_restarts_every_sibling() {
    let (obs, mut rx) = Observer::channel(64);
    let p = RestartPolicy {
        strategy: Strategy::OneForAll,
        ..policy(3)
    };
    let (sup, _join) = SupervisorRef::spawn(SupervisorArgs::new("s", p, obs))
        .await
        .unwrap();
    let (ca, cb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let a = sup
        .add_child(worker("a", ca, Behaviour::default()))
        .await
        .unwrap();
    let b = sup
        .add_child(worker("b", cb, Behaviour::default()))
        .await
        .unwrap();
    a.send_message(WorkerMsg::Panic).unwrap();
    let mut restarted = Vec::new();
    while restarted.len() < 2 {
        if let SupervisorEvent::Restarted { child, .. } = next_event(&mut rx).await {
            restarted.push(child);
        }
    }
    restarted.sort();
    assert_eq!(restarted, ["a", "b"]);
    b.wait(Some(Duration::from_secs(1))).await.unwrap();
    assert_eq!(b.get_status(), ActorStatus::Stopped);
    let b2 = sup.child("b").await.unwrap().unwrap();
    assert_eq!(incarnation(b2).await, 2);
    sup.cell().stop(None);
}

#[tokio::test]
async fn node_supervisor_stops_everything_within_its_deadline() {
    let (obs, _rx) = Observer::channel(64);
    let node = NodeSupervisor::start(policy(3), obs).await.unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let mut cells = Vec::new();
    for (i, sub) in [
        node.queue_shards().await.unwrap(),
        node.gateways().await.unwrap(),
        node.agents().await.unwrap(),
    ]
    .into_iter()
    .enumerate()
    {
        let normal = Behaviour::default();
        cells.push(
            sub.add_child(worker(&format!("w{i}"), counter.clone(), normal))
                .await
                .unwrap(),
        );
    }
    // One child that never finishes stopping: it is killed after the
    // policy's shutdown_timeout (200 ms), well inside the deadline.
    let hang = Behaviour {
        hang_on_stop: true,
        ..Behaviour::default()
    };
    let agents = node.agents().await.unwrap();
    cells.push(
        agents
            .add_child(worker("hang", counter, hang))
            .await
            .unwrap(),
    );
    let subs = node.root().children().await.unwrap();
    assert_eq!(subs, ["agents", "gateways", "queue_shards"]);
    let root = node.root().cell();

    let t0 = std::time::Instant::now();
    node.stop(Duration::from_secs(3)).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(root.get_status(), ActorStatus::Stopped);
    for c in cells {
        timeout(Duration::from_secs(1), c.wait(None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.get_status(), ActorStatus::Stopped);
    }
}

#[tokio::test]
async fn escalating_subtree_is_restarted_by_the_node() {
    let (obs, mut rx) = Observer::channel(256);
    let node = NodeSupervisor::start(policy(1), obs).await.unwrap();
    let gateways = node.gateways().await.unwrap();
    let cell = gateways
        .add_child(worker(
            "g",
            Arc::new(AtomicU64::new(0)),
            Behaviour::default(),
        ))
        .await
        .unwrap();
    cell.send_message(WorkerMsg::Panic).unwrap();
    let _ = events_until(&mut rx, |e| e.name() == "restarted").await;
    let again = gateways.child("g").await.unwrap().unwrap();
    again.send_message(WorkerMsg::Panic).unwrap();
    // Second failure within the window: `gateways` escalates and `node`
    // restarts it, empty (its owner re-adds runtime children).
    let evs = events_until(&mut rx, |e| {
        e.supervisor() == "node" && e.name() == "restarted"
    })
    .await;
    assert_eq!(names(&evs, "gateways"), ["escalated"]);
    assert_eq!(names(&evs, "node"), ["restarting", "restarted"]);
    let fresh = node.gateways().await.unwrap();
    assert!(fresh.children().await.unwrap().is_empty());
    assert_ne!(fresh.cell().get_id(), gateways.cell().get_id());
    node.stop(Duration::from_secs(3)).await.unwrap();
}

/// A gateway whose probe panics every time (a driver bug): the real
/// Gateway actor fails on each probe, its supervisor restarts it with
/// backoff, and after the intensity limit the supervisor escalates to its
/// parent, which here gives up on it.
#[tokio::test]
async fn failing_gateway_actor_trips_the_intensity_limit_and_escalates() {
    use godel::actors::{GatewayActor, GatewayArgs, GatewayRegistry};
    use godel::fsm::{Circuit, GatewayId, Health as Recorded};
    use godel::gateway::{
        BoxFuture, BreakerConfig, GatewayDriver, GatewayKind, GuardedDriver, Health, RunOutput,
        RunRequest,
    };
    use tokio_util::sync::CancellationToken;

    #[derive(Debug)]
    struct PanickingProbe(Arc<AtomicU64>);
    impl GatewayDriver for PanickingProbe {
        fn kind(&self) -> GatewayKind {
            GatewayKind::Sim
        }
        fn run(
            &self,
            _: RunRequest,
            _: CancellationToken,
        ) -> BoxFuture<'_, godel::gateway::Result<RunOutput>> {
            Box::pin(async { unreachable!("no attempt runs in this test") })
        }
        fn probe(&self) -> BoxFuture<'_, Health> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { panic!("probe bug") })
        }
    }
    struct Registry;
    impl GatewayRegistry for Registry {
        fn committed(&self, _: &GatewayId) -> Option<(Recorded, Circuit)> {
            Some((Recorded::Unknown, Circuit::Closed))
        }
        fn report(&self, _: &GatewayId, _: Recorded, _: Circuit) -> BoxFuture<'_, bool> {
            Box::pin(async { true })
        }
        fn ended_sessions(
            &self,
            _: &GatewayId,
            _: &[(godel::fsm::SessionId, u32)],
        ) -> Vec<(godel::fsm::SessionId, u32, Option<godel::fsm::SessionKey>)> {
            Vec::new()
        }
    }

    let (obs, mut rx) = Observer::channel(64);
    let probes = Arc::new(AtomicU64::new(0));
    let driver = Arc::new(GuardedDriver::new(
        Arc::new(PanickingProbe(probes.clone())),
        BreakerConfig::default(),
    ));
    let host = godel::actors::SessionHost::new(
        GatewayId("broken".into()),
        driver.clone() as Arc<dyn GatewayDriver>,
    );
    let args = GatewayArgs {
        id: GatewayId("broken".into()),
        driver,
        registry: Arc::new(Registry),
        probe_every: Duration::from_secs(60),
        sessions: host,
        policy: policy(2),
        observer: obs.clone(),
        managed: None,
    };
    let gateways =
        SupervisorArgs::new("gateways", policy(2), obs.clone())
            .with_child(ChildSpec::new("gateway:broken", move || {
                (GatewayActor, args.clone())
            }));
    let node_policy = RestartPolicy {
        on_exhausted: OnExhausted::GiveUp,
        ..policy(0)
    };
    let node =
        SupervisorArgs::new("node", node_policy, obs).with_child(ChildSpec::supervisor(gateways));
    let (node, _join) = SupervisorRef::spawn(node).await.unwrap();
    let evs = events_until(&mut rx, |e| {
        e.supervisor() == "node" && e.name() == "gave_up"
    })
    .await;
    let gateway_evs: Vec<_> = names(&evs, "gateways")
        .into_iter()
        .filter(|n| ["restarting", "escalated"].contains(n))
        .collect();
    assert_eq!(gateway_evs, ["restarting", "restarting", "escalated"]);
    // The first incarnation and two restarts each probed once, at start.
    assert_eq!(probes.load(Ordering::SeqCst), 3);
    node.cell().stop(None);
}
