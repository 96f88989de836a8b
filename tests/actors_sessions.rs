//! Session actors under a gateway actor, in process: attempts of one session
//! run in its actor, which opens the gateway-side session once; an ended
//! session's actor is stopped and its gateway-side session closed; a
//! session actor that fails mid-attempt is restarted (the attempt fails as
//! retryable and the next one opens the session again); one that keeps
//! failing escalates through the gateway actor.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use godel::actors::{
    ChildSpec, GatewayActor, GatewayArgs, GatewayRegistry, Observer, OnExhausted, RestartPolicy,
    SessionHost, SessionMsg, SupervisorArgs, SupervisorEvent, SupervisorRef, session_actor,
};
use godel::fsm::{
    Circuit, FencingToken, GatewayId, Health as Recorded, SessionId, SessionKey, TaskId,
};
use godel::gateway::{
    BoxFuture, BreakerConfig, DriverError, GatewayDriver, GatewayFence, GatewayKind, GuardedDriver,
    Health, RunOutput, RunRequest,
};
use ractor::ActorRef;
use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

/// A driver that records sessions opened and closed and runs each attempt
/// for `latency`.
#[derive(Debug, Default)]
struct Recording {
    opened: Mutex<Vec<String>>,
    closed: Mutex<Vec<String>>,
    runs: AtomicU64,
    latency: Duration,
}

impl GatewayDriver for Recording {
    fn kind(&self) -> GatewayKind {
        GatewayKind::Sim
    }
    fn run(
        &self,
        req: RunRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, godel::gateway::Result<RunOutput>> {
        Box::pin(async move {
            self.runs.fetch_add(1, Ordering::SeqCst);
            tokio::select! {
                () = cancel.cancelled() => Err(DriverError::Cancelled),
                () = sleep(self.latency) => Ok(RunOutput {
                    result_json: format!("{{\"task\":{}}}", req.task_id.0),
                    elapsed: self.latency,
                }),
            }
        })
    }
    fn probe(&self) -> BoxFuture<'_, Health> {
        Box::pin(async { Health::Healthy })
    }
    fn open_session(&self, key: &SessionKey) -> BoxFuture<'_, godel::gateway::Result<()>> {
        self.opened.lock().unwrap().push(key.0.clone());
        Box::pin(async { Ok(()) })
    }
    fn close_session(&self, key: &SessionKey) -> BoxFuture<'_, godel::gateway::Result<()>> {
        self.closed.lock().unwrap().push(key.0.clone());
        Box::pin(async { Ok(()) })
    }
}

/// A registry in which the test decides which sessions have ended.
#[derive(Default)]
struct Registry {
    ended: Mutex<BTreeSet<SessionId>>,
}

impl GatewayRegistry for Registry {
    fn committed(&self, _: &GatewayId) -> Option<(Recorded, Circuit)> {
        Some((Recorded::Healthy, Circuit::Closed))
    }
    fn report(&self, _: &GatewayId, _: Recorded, _: Circuit) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
    fn ended_sessions(
        &self,
        _: &GatewayId,
        sessions: &[(SessionId, u32)],
    ) -> Vec<(SessionId, u32, Option<SessionKey>)> {
        let ended = self.ended.lock().unwrap();
        sessions
            .iter()
            .filter(|(s, _)| ended.contains(s))
            .map(|&(s, g)| (s, g, Some(key(s))))
            .collect()
    }
}

fn key(id: SessionId) -> SessionKey {
    SessionKey(format!("conv-{id}"))
}

fn request(task: u64) -> RunRequest {
    RunRequest {
        task_id: TaskId(task),
        fencing_token: FencingToken(task),
        session_key: None,
        payload: Arc::from("{}"),
        timeout: Duration::from_secs(30),
        trace: None,
        fence: GatewayFence::default(),
        guard: Default::default(),
        context: None,
        flags: Vec::new(),
        role: None,
    }
}

fn policy(max_restarts: u32) -> RestartPolicy {
    RestartPolicy {
        initial_backoff: Duration::from_millis(50),
        multiplier: 2.0,
        max_backoff: Duration::from_millis(200),
        max_restarts,
        window: Duration::from_secs(10),
        shutdown_timeout: Duration::from_millis(500),
        ..RestartPolicy::default()
    }
}

struct Fixture {
    driver: Arc<Recording>,
    registry: Arc<Registry>,
    host: SessionHost,
    root: SupervisorRef,
    events: Receiver<SupervisorEvent>,
}

/// A `gateways` supervisor (under a root that gives up) with one gateway
/// actor whose sessions restart under `session_restarts`.
async fn start(latency: Duration, session_restarts: u32) -> Fixture {
    let (observer, events) = Observer::channel(256);
    let driver = Arc::new(Recording {
        latency,
        ..Recording::default()
    });
    let guarded = Arc::new(GuardedDriver::new(
        driver.clone() as Arc<dyn GatewayDriver>,
        BreakerConfig::default(),
    ));
    let id = GatewayId("gw".into());
    let host = SessionHost::new(id.clone(), guarded.clone() as Arc<dyn GatewayDriver>);
    let registry = Arc::new(Registry::default());
    let args = GatewayArgs {
        id,
        driver: guarded,
        registry: registry.clone(),
        probe_every: Duration::from_secs(60),
        sessions: host.clone(),
        policy: policy(session_restarts),
        observer: observer.clone(),
        managed: None,
    };
    let gateways =
        SupervisorArgs::new("gateways", policy(0), observer.clone())
            .with_child(ChildSpec::new("gateway:gw", move || {
                (GatewayActor, args.clone())
            }));
    let root_policy = RestartPolicy {
        on_exhausted: OnExhausted::GiveUp,
        ..policy(0)
    };
    let root = SupervisorArgs::new("node", root_policy, observer)
        .with_child(ChildSpec::supervisor(gateways));
    let (root, _join) = SupervisorRef::spawn(root).await.unwrap();
    eventually("the gateway actor", async || host.supervisor().is_some()).await;
    Fixture {
        driver,
        registry,
        host,
        root,
        events,
    }
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_session_opens_once_runs_its_attempts_and_closes_when_it_ends() {
    let f = start(Duration::from_millis(5), 3).await;
    let cancel = CancellationToken::new();
    for task in 1..=3 {
        let out = f
            .host
            .run(7, key(7), request(task), cancel.clone())
            .await
            .expect("attempt in session 7");
        assert_eq!(out.result_json, format!("{{\"task\":{task}}}"));
    }
    f.host
        .run(8, key(8), request(4), cancel.clone())
        .await
        .unwrap();
    assert_eq!(*f.driver.opened.lock().unwrap(), ["conv-7", "conv-8"]);
    assert_eq!(f.driver.runs.load(Ordering::SeqCst), 4);
    let sessions = f.host.supervisor().expect("gateway actor running");
    assert!(sessions.child(&session_actor(7)).await.unwrap().is_some());

    // Session 7 ends in the committed state: its actor goes, its
    // gateway-side session is closed; session 8 is left alone.
    f.registry.ended.lock().unwrap().insert(7);
    eventually("session 7 closed", async || {
        f.driver.closed.lock().unwrap().as_slice() == ["conv-7"]
    })
    .await;
    assert!(sessions.child(&session_actor(7)).await.unwrap().is_none());
    assert!(sessions.child(&session_actor(8)).await.unwrap().is_some());
    f.root.cell().stop(None);
}

#[tokio::test]
async fn a_failed_session_actor_is_restarted_and_its_attempt_fails_retryably() {
    let f = start(Duration::from_secs(5), 3).await;
    let host = f.host.clone();
    let running = tokio::spawn(async move {
        host.run(3, key(3), request(1), CancellationToken::new())
            .await
    });
    eventually("the attempt to start", async || {
        f.driver.runs.load(Ordering::SeqCst) == 1
    })
    .await;
    let sessions = f.host.supervisor().unwrap();
    let cell = sessions.child(&session_actor(3)).await.unwrap().unwrap();
    ActorRef::<SessionMsg>::from(cell.clone())
        .send_message(SessionMsg::Crash)
        .unwrap();
    let err = timeout(Duration::from_secs(5), running)
        .await
        .expect("the attempt ends when its actor fails")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, DriverError::Unavailable { .. }) && err.is_retryable(),
        "{err:?}"
    );
    // The supervisor restarts it; the next attempt opens the session again.
    eventually("a new incarnation", async || {
        matches!(
            sessions.child(&session_actor(3)).await,
            Ok(Some(c)) if c.get_id() != cell.get_id()
        )
    })
    .await;
    let out = timeout(
        Duration::from_secs(10),
        f.host.run(3, key(3), request(2), CancellationToken::new()),
    )
    .await
    .unwrap();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(*f.driver.opened.lock().unwrap(), ["conv-3", "conv-3"]);
    f.root.cell().stop(None);
}

#[tokio::test]
async fn a_session_actor_that_keeps_failing_escalates_through_its_gateway_actor() {
    let mut f = start(Duration::from_millis(5), 1).await;
    let sessions = f.host.supervisor().unwrap();
    // Crash the session's actor as soon as each incarnation exists (the
    // first is started by an attempt, the next by its supervisor), until
    // the gateway actor is gone; bounded.
    let _ = f
        .host
        .run(5, key(5), request(1), CancellationToken::new())
        .await;
    let until = Instant::now() + Duration::from_secs(10);
    let mut crashed = BTreeSet::new();
    while f.host.supervisor().is_some() && Instant::now() < until {
        if let Ok(Some(c)) = sessions.child(&session_actor(5)).await
            && crashed.insert(c.get_id())
        {
            let _ = ActorRef::<SessionMsg>::from(c).send_message(SessionMsg::Crash);
        }
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        crashed.len(),
        2,
        "one start and one restart before escalating"
    );
    let mut seen = Vec::new();
    let found = timeout(Duration::from_secs(10), async {
        loop {
            let e = f.events.recv().await.expect("observer open");
            seen.push(format!("{}:{}", e.supervisor(), e.name()));
            if e.supervisor() == "gateways" && e.name() == "escalated" {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no escalation through the gateway: {seen:?}");
    assert!(
        seen.contains(&"sessions:escalated".to_owned()),
        "the session supervisor did not escalate first: {seen:?}"
    );
    f.root.cell().stop(None);
}

/// A gateway actor reports its gateway unhealthy only after several probes
/// in a row fail (one slow answer is not a dead gateway), and healthy again
/// after one good probe.
#[tokio::test]
async fn a_gateway_is_reported_unhealthy_only_after_several_failed_probes() {
    use godel::actors::UNHEALTHY_AFTER;
    use std::sync::atomic::AtomicBool;

    #[derive(Debug)]
    struct Flaky {
        probes: AtomicU64,
        down: AtomicBool,
    }
    impl GatewayDriver for Flaky {
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
            self.probes.fetch_add(1, Ordering::SeqCst);
            let down = self.down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    Health::Unhealthy {
                        reason: "down".into(),
                    }
                } else {
                    Health::Healthy
                }
            })
        }
    }
    /// Records every report, with the probe count when it was made.
    struct Reports {
        driver: Arc<Flaky>,
        committed: Mutex<Recorded>,
        seen: Mutex<Vec<(Recorded, u64)>>,
    }
    impl GatewayRegistry for Reports {
        fn committed(&self, _: &GatewayId) -> Option<(Recorded, Circuit)> {
            Some((*self.committed.lock().unwrap(), Circuit::Closed))
        }
        fn report(&self, _: &GatewayId, h: Recorded, _: Circuit) -> BoxFuture<'_, bool> {
            *self.committed.lock().unwrap() = h;
            let probes = self.driver.probes.load(Ordering::SeqCst);
            self.seen.lock().unwrap().push((h, probes));
            Box::pin(async { true })
        }
        fn ended_sessions(
            &self,
            _: &GatewayId,
            _: &[(SessionId, u32)],
        ) -> Vec<(SessionId, u32, Option<SessionKey>)> {
            Vec::new()
        }
    }

    let driver = Arc::new(Flaky {
        probes: AtomicU64::new(0),
        down: AtomicBool::new(false),
    });
    let reports = Arc::new(Reports {
        driver: driver.clone(),
        committed: Mutex::new(Recorded::Unknown),
        seen: Mutex::new(Vec::new()),
    });
    let (observer, _events) = Observer::channel(64);
    let guarded = Arc::new(GuardedDriver::new(
        driver.clone() as Arc<dyn GatewayDriver>,
        BreakerConfig::default(),
    ));
    let id = GatewayId("flaky".into());
    let args = GatewayArgs {
        id: id.clone(),
        driver: guarded.clone(),
        registry: reports.clone(),
        probe_every: Duration::from_millis(30),
        sessions: SessionHost::new(id, guarded as Arc<dyn GatewayDriver>),
        policy: policy(0),
        observer,
        managed: None,
    };
    let (actor, _join) = ractor::Actor::spawn(None, GatewayActor, args)
        .await
        .unwrap();
    eventually("healthy", async || {
        reports.seen.lock().unwrap().last().map(|r| r.0) == Some(Recorded::Healthy)
    })
    .await;
    let went_down = driver.probes.load(Ordering::SeqCst);
    driver.down.store(true, Ordering::SeqCst);
    eventually("unhealthy", async || {
        reports.seen.lock().unwrap().last().map(|r| r.0) == Some(Recorded::Unhealthy)
    })
    .await;
    let (_, at) = *reports.seen.lock().unwrap().last().unwrap();
    assert!(
        at >= went_down + u64::from(UNHEALTHY_AFTER),
        "reported unhealthy at probe {at}, the first failing probe was {}",
        went_down + 1
    );
    driver.down.store(false, Ordering::SeqCst);
    eventually("healthy again", async || {
        reports.seen.lock().unwrap().last().map(|r| r.0) == Some(Recorded::Healthy)
    })
    .await;
    actor.stop(None);
}
