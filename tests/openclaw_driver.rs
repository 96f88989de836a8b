//! The `openclaw` driver against an in-process fake gateway (see
//! `openclaw_driver/fake.rs`): handshake and device proof, the two-phase
//! `agent` reply, responses out of order on one shared connection, lenient
//! parsing, abort on cancel and on timeout, a socket closed mid-run, a
//! restarted or vanished gateway, auth rejected, not ready yet, and the
//! `shutdown` event. The real gateway is exercised by `tests/openclaw.rs`.
//! Every wait is bounded.

#[path = "openclaw_driver/fake.rs"]
mod fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake::Fake;
use godel::fsm::{FencingToken, GatewayId, SessionKey, TaskId};
use godel::gateway::{
    BreakerConfig, BreakerState, DriverContext, DriverError, GatewayDriver, GatewayFence,
    GatewaySpec, GuardedDriver, Health, RunOutput, RunRequest, driver_for,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Longest any one attempt may take before the test fails.
const TEST_BOUND: Duration = Duration::from_secs(20);
const TOKEN: &str = "fake-token-hunter2";

struct Setup {
    fake: Fake,
    driver: Arc<dyn GatewayDriver>,
    _dir: tempfile::TempDir,
}

/// A fake gateway and a driver for it (token from a file, device key in a
/// temporary data dir); `extra` is merged into the driver spec.
async fn setup(token_in_file: &str, extra: Value) -> Setup {
    let fake = Fake::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{token_in_file}\n")).unwrap();
    let mut driver = json!({"kind": "openclaw", "url": fake.url(), "token": {"file": token},
                            "reconnect_window": "3s"});
    for (k, v) in extra.as_object().unwrap() {
        driver[k] = v.clone();
    }
    let spec: GatewaySpec = serde_json::from_value(
        json!({"id": "oc", "region": "r", "max_sessions": 8, "driver": driver}),
    )
    .unwrap();
    let ctx = DriverContext {
        data_dir: Some(dir.path().to_path_buf()),
        policy: godel::gateway::DriverPolicy {
            secrets_dir: Some(dir.path().to_path_buf()),
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    };
    let driver = driver_for(&spec, &ctx).unwrap();
    Setup {
        fake,
        driver,
        _dir: dir,
    }
}

fn req(task: u64, message: &str, key: Option<&str>, timeout: Duration) -> RunRequest {
    RunRequest {
        task_id: TaskId(task),
        fencing_token: FencingToken(42),
        session_key: key.map(|k| SessionKey(k.into())),
        payload: json!({ "message": message }).to_string().into(),
        timeout,
        trace: None,
        fence: GatewayFence {
            gateway: GatewayId("oc".into()),
            owner: 1,
            token: 5,
        },
        guard: Default::default(),
        context: None,
        flags: Vec::new(),
        role: None,
    }
}

async fn run_with(
    d: &dyn GatewayDriver,
    r: RunRequest,
    cancel: CancellationToken,
) -> Result<RunOutput, DriverError> {
    tokio::time::timeout(TEST_BOUND, d.run(r, cancel))
        .await
        .expect("attempt outlived the test bound")
}

async fn run(d: &dyn GatewayDriver, r: RunRequest) -> Result<RunOutput, DriverError> {
    run_with(d, r, CancellationToken::new()).await
}

fn result(out: &RunOutput) -> Value {
    serde_json::from_str(&out.result_json).unwrap()
}

#[tokio::test]
async fn a_turn_signs_in_runs_in_its_session_and_returns_text_and_usage() {
    let s = setup(TOKEN, json!({"turn_timeout": "30s"})).await;
    let out = run(
        &*s.driver,
        req(7, "ok hello", Some("s-1"), Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let r = result(&out);
    assert_eq!(r["text"], "REPLY: hello");
    assert_eq!(r["usage"], json!({"input": 10, "output": 5, "total": 15}));
    assert_eq!(r["run_id"], "godel-7-42-5");
    assert_eq!(r["session_key"], "agent:main:godel-s-s-1");
    assert_eq!(r["stop_reason"], "stop");

    // The handshake: protocol 4, the closed-set client id, token, device
    // proof (the fake verified the signature or it would have refused).
    let connect = s.fake.seen("connect").pop().unwrap();
    assert_eq!(connect.params["minProtocol"], 4);
    assert_eq!(connect.params["client"]["id"], "gateway-client");
    assert_eq!(connect.params["client"]["mode"], "backend");
    assert_eq!(connect.params["device"]["nonce"], "nonce-1");
    // The session is created before the turn; the turn is bounded.
    let methods: Vec<String> = s
        .fake
        .state
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|x| x.method.clone())
        .collect();
    assert_eq!(methods, ["connect", "sessions.create", "agent"]);
    let create = s.fake.seen("sessions.create").pop().unwrap();
    assert_eq!(create.params["key"], "agent:main:godel-s-s-1");
    let agent = s.fake.seen("agent").pop().unwrap();
    assert_eq!(agent.params["message"], "ok hello");
    assert_eq!(agent.params["idempotencyKey"], "godel-7-42-5");
    assert_eq!(agent.params["sessionKey"], "agent:main:godel-s-s-1");
    assert_eq!(
        agent.params["timeout"], 30,
        "the smaller of turn_timeout and the task's timeout"
    );
    let tp = agent.traceparent.unwrap();
    assert!(
        tp.len() == 55 && tp.starts_with("00-") && tp.ends_with("-01"),
        "{tp}"
    );

    // A second turn in the same session reuses the connection and the session.
    let out = run(
        &*s.driver,
        req(8, "ok again", Some("s-1"), Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert_eq!(result(&out)["text"], "REPLY: again");
    assert_eq!(s.fake.seen("sessions.create").len(), 1);
    assert_eq!(s.fake.seen("agent").pop().unwrap().params["timeout"], 5);
    // A task without a session key gets a session of its own.
    run(&*s.driver, req(9, "ok solo", None, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        s.fake.seen("sessions.create").pop().unwrap().params["key"],
        "agent:main:godel-t-9"
    );
    assert_eq!(
        s.fake.state.conns.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn responses_out_of_order_reach_their_own_attempts_on_one_connection() {
    let s = setup(TOKEN, json!({})).await;
    let d = &s.driver;
    // Warm the connection so both turns share it.
    assert!(d.probe().await.is_healthy());
    let slow = run(&**d, req(1, "ok@400 first", None, Duration::from_secs(10)));
    let fast = run(&**d, req(2, "ok@10 second", None, Duration::from_secs(10)));
    let started = Instant::now();
    let (a, b) = tokio::join!(slow, fast);
    assert_eq!(result(&a.unwrap())["text"], "REPLY: first");
    assert_eq!(result(&b.unwrap())["text"], "REPLY: second");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        s.fake.state.conns.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn cancelling_an_attempt_aborts_its_run_on_the_gateway() {
    let s = setup(TOKEN, json!({})).await;
    let cancel = CancellationToken::new();
    let d = Arc::clone(&s.driver);
    let c = cancel.clone();
    let attempt = tokio::spawn(async move {
        run_with(&*d, req(3, "slow", Some("k"), Duration::from_secs(60)), c).await
    });
    s.fake.wait_seen("agent", Duration::from_secs(5)).await;
    cancel.cancel();
    let e = attempt.await.unwrap().unwrap_err();
    assert_eq!(e, DriverError::Cancelled);
    let abort = s
        .fake
        .wait_seen("sessions.abort", Duration::from_secs(5))
        .await;
    assert_eq!(abort.params["key"], "agent:main:godel-s-k");
    assert_eq!(abort.params["runId"], "godel-3-42-5");
}

#[tokio::test]
async fn a_dropped_attempt_and_a_timed_out_one_abort_their_runs_too() {
    let s = setup(TOKEN, json!({})).await;
    // Timeout: Godel's own bound ends the attempt first.
    let e = run(&*s.driver, req(4, "slow", None, Duration::from_millis(700)))
        .await
        .unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    let abort = s
        .fake
        .wait_seen("sessions.abort", Duration::from_secs(5))
        .await;
    assert_eq!(abort.params["runId"], "godel-4-42-5");
    // Dropped: the agent's select drops the run future when its lease is lost.
    let d = Arc::clone(&s.driver);
    let attempt = tokio::spawn(async move {
        d.run(
            req(5, "slow", None, Duration::from_secs(60)),
            CancellationToken::new(),
        )
        .await
    });
    let until = Instant::now() + Duration::from_secs(5);
    while s.fake.seen("agent").len() < 2 {
        assert!(Instant::now() < until, "second turn never sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    attempt.abort();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if s.fake
            .seen("sessions.abort")
            .iter()
            .any(|a| a.params["runId"] == "godel-5-42-5")
        {
            break;
        }
        assert!(Instant::now() < until, "no abort for the dropped attempt");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_socket_closed_mid_run_is_followed_by_run_id_on_a_new_connection() {
    let s = setup(TOKEN, json!({})).await;
    let out = run(
        &*s.driver,
        req(6, "drop survived", None, Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(result(&out)["text"], "REPLY: survived");
    assert_eq!(
        s.fake.state.conns.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    let wait = s.fake.seen("agent.wait").pop().unwrap();
    assert_eq!(wait.params["runId"], "godel-6-42-5");
    assert_eq!(wait.conn, 2);
    assert!(s.fake.seen("sessions.abort").is_empty());
}

#[tokio::test]
async fn a_gateway_restarted_mid_run_gets_the_session_aborted_and_the_attempt_retried() {
    let s = setup(TOKEN, json!({})).await;
    let e = run(
        &*s.driver,
        req(10, "restart", Some("r"), Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DriverError::Unavailable { .. }), "{e}");
    assert!(e.is_retryable() && e.is_gateway_fault());
    assert!(e.to_string().contains("restarted"), "{e}");
    // Tracked by session key: described, then aborted, on the new boot.
    assert!(
        e.to_string().contains("running (last run recovery-run-1)"),
        "{e}"
    );
    assert_eq!(s.fake.seen("sessions.describe").pop().unwrap().conn, 2);
    let abort = s
        .fake
        .wait_seen("sessions.abort", Duration::from_secs(5))
        .await;
    assert_eq!(abort.params["key"], "agent:main:godel-s-r");
    assert_eq!(abort.conn, 2);
}

#[tokio::test]
async fn a_vanished_gateway_is_unavailable_after_the_reconnect_window() {
    let s = setup(TOKEN, json!({"reconnect_window": "1s"})).await;
    let started = Instant::now();
    let e = run(&*s.driver, req(11, "vanish", None, Duration::from_secs(15)))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, DriverError::Unavailable { .. }), "{e}");
    assert!(e.is_retryable() && e.is_gateway_fault());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    match s.driver.probe().await {
        Health::Unhealthy { reason } => assert!(reason.contains("readyz"), "{reason}"),
        h => panic!("{h:?}"),
    }
}

#[tokio::test]
async fn a_wrong_token_is_rejected_trips_the_breaker_and_is_never_shown() {
    let s = setup("wrong-token-hunter3", json!({})).await;
    let e = run(&*s.driver, req(12, "ok x", None, Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(matches!(e, DriverError::Rejected { .. }), "{e}");
    // Not the task's fault: another gateway may run it.
    assert!(e.is_retryable());
    assert!(e.is_gateway_fault());
    assert_eq!(e.code(), "gateway_rejected");
    let shown = e.to_string();
    assert!(shown.contains("AUTH_TOKEN_MISMATCH"), "{shown}");
    assert!(!shown.contains("hunter"), "{shown}");
    match s.driver.probe().await {
        Health::Unhealthy { reason } => {
            assert!(reason.contains("AUTH_TOKEN_MISMATCH"), "{reason}");
            assert!(!reason.contains("hunter"), "{reason}");
        }
        h => panic!("{h:?}"),
    }
    let guarded = GuardedDriver::new(
        Arc::clone(&s.driver),
        BreakerConfig {
            failure_threshold: 2,
            ..BreakerConfig::default()
        },
    );
    for task in [13, 14] {
        let e = run(&guarded, req(task, "ok x", None, Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(matches!(e, DriverError::Rejected { .. }), "{e}");
    }
    assert_eq!(guarded.circuit(), BreakerState::Open);
    assert!(s.fake.seen("agent").is_empty());
}

#[tokio::test]
async fn a_gateway_still_starting_is_retried_within_the_attempts_budget() {
    let s = setup(TOKEN, json!({})).await;
    s.fake
        .state
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    match s.driver.probe().await {
        Health::Unhealthy { reason } => assert!(reason.contains("503"), "{reason}"),
        h => panic!("{h:?}"),
    }
    s.fake
        .state
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    s.fake
        .state
        .not_ready_connects
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let out = run(
        &*s.driver,
        req(15, "ok late", None, Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(result(&out)["text"], "REPLY: late");
    assert_eq!(s.fake.seen("connect").len(), 4);
    // Not ready for longer than the attempt may take: unavailable, retryable.
    let s = setup(TOKEN, json!({})).await;
    s.fake
        .state
        .not_ready_connects
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    let e = run(
        &*s.driver,
        req(16, "ok never", None, Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert!(e.is_retryable() && e.is_gateway_fault(), "{e}");
}

#[tokio::test]
async fn a_model_error_fails_the_task_with_the_gateways_text() {
    let s = setup(TOKEN, json!({})).await;
    let e = run(&*s.driver, req(17, "fail", None, Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            DriverError::TaskFailed {
                retryable: true,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_gateway_fault());
    assert!(
        e.to_string()
            .contains("provider rejected the request schema"),
        "{e}"
    );
    assert!(s.fake.seen("sessions.abort").is_empty());
    // A run refused at once with its outcome is the same failure, not a
    // busy gateway to try again.
    let e = run(
        &*s.driver,
        req(20, "failnow", None, Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            DriverError::TaskFailed {
                retryable: true,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("model disabled for a minute"), "{e}");
    assert_eq!(s.fake.seen("agent").len(), 2, "not sent again");
}

#[tokio::test]
async fn a_draining_gateway_finishes_the_turn_and_reports_unhealthy_until_it_is_back() {
    let s = setup(TOKEN, json!({})).await;
    let out = run(
        &*s.driver,
        req(18, "shutdown finished", None, Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(result(&out)["text"], "REPLY: finished");
    match s.driver.probe().await {
        Health::Unhealthy { reason } => assert!(reason.contains("shutting down"), "{reason}"),
        h => panic!("{h:?}"),
    }
    // Nothing new goes to a draining gateway.
    let e = run(
        &*s.driver,
        req(21, "ok late", None, Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(e.is_retryable() && e.is_gateway_fault(), "{e}");
    assert!(e.to_string().contains("shutting down"), "{e}");
    assert_eq!(s.fake.seen("agent").len(), 1);
    // The gateway closes with 1012 and comes back: the next turn reconnects.
    s.fake.close_draining();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if s.driver.probe().await.is_healthy() {
            break;
        }
        assert!(Instant::now() < until, "never healthy again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = run(
        &*s.driver,
        req(19, "ok back", None, Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(result(&out)["text"], "REPLY: back");
    assert_eq!(
        s.fake.state.conns.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test]
async fn open_and_close_session_create_and_abort_on_the_gateway() {
    let s = setup(TOKEN, json!({"agent_id": "coder"})).await;
    let key = SessionKey("conv-9".into());
    s.driver.open_session(&key).await.unwrap();
    s.driver.open_session(&key).await.unwrap();
    let creates = s.fake.seen("sessions.create");
    assert_eq!(creates.len(), 1, "known sessions are not created again");
    assert_eq!(creates[0].params["key"], "agent:coder:godel-s-conv-9");
    assert_eq!(creates[0].params["agentId"], "coder");
    s.driver.close_session(&key).await.unwrap();
    let abort = s.fake.seen("sessions.abort").pop().unwrap();
    assert_eq!(abort.params["key"], "agent:coder:godel-s-conv-9");
}

/// The keys of the sessions the fake was asked to create.
fn created(s: &Setup) -> Vec<String> {
    s.fake
        .seen("sessions.create")
        .iter()
        .map(|c| c.params["key"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits (bounded) until `n` warm sessions were created.
async fn warm_created(s: &Setup, n: usize) -> Vec<String> {
    let end = Instant::now() + TEST_BOUND;
    loop {
        let warm: Vec<String> = created(s)
            .into_iter()
            .filter(|k| k.contains(":godel-w-"))
            .collect();
        if warm.len() >= n {
            return warm;
        }
        assert!(Instant::now() < end, "only {warm:?} warm sessions created");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn one_shot_tasks_take_warm_sessions_that_are_retired_and_replaced() {
    let s = setup(TOKEN, json!({"warm_sessions": 2})).await;
    // A healthy probe fills the pool ahead of any task.
    assert!(s.driver.probe().await.is_healthy());
    let warm = warm_created(&s, 2).await;
    assert_eq!(warm.len(), 2, "{warm:?}");

    // A task without a session key runs in a warm session (no session
    // of its own is created), and a fresh one takes its place.
    run(&*s.driver, req(11, "ok one", None, Duration::from_secs(30)))
        .await
        .unwrap();
    let agent = s.fake.seen("agent");
    let first = agent.last().unwrap().params["sessionKey"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(warm.contains(&first), "{first} is one of {warm:?}");
    assert!(
        !created(&s).iter().any(|k| k.contains("godel-t-11")),
        "no session of its own: {:?}",
        created(&s)
    );
    let after = warm_created(&s, 3).await;
    assert_eq!(
        after.len(),
        3,
        "one made to replace the one taken: {after:?}"
    );

    // The next one-shot task gets another warm session: each is used once.
    run(&*s.driver, req(12, "ok two", None, Duration::from_secs(30)))
        .await
        .unwrap();
    let second = s.fake.seen("agent").last().unwrap().params["sessionKey"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        after.contains(&second) && second != first,
        "{second} vs {first}"
    );

    // A task of a Godel session keeps its own conversation.
    run(
        &*s.driver,
        req(13, "ok three", Some("conv"), Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let third = s.fake.seen("agent").last().unwrap().params["sessionKey"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(third.ends_with("godel-s-conv"), "{third}");
}

#[tokio::test]
async fn without_warm_sessions_a_one_shot_task_makes_its_own() {
    let s = setup(TOKEN, json!({})).await;
    assert!(s.driver.probe().await.is_healthy());
    run(&*s.driver, req(21, "ok", None, Duration::from_secs(30)))
        .await
        .unwrap();
    let keys = created(&s);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with("godel-t-21"), "{keys:?}");
}
