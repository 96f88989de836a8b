//! Gateway drivers against the real thing: simulated attempts, real
//! processes, and a real HTTP server on 127.0.0.1. Every wait is bounded.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use godel::fsm::{FencingToken, GatewayId, SessionKey, TaskId};
use godel::gateway::{
    CommandDriver, CommandSpec, DriverError, FENCED_HEADER, GatewayDriver, GatewayFence,
    HttpDriver, HttpSpec, LatencySpec, MAX_RESULT_BYTES, RunOutput, RunRequest, SecretRef,
    SimDriver, SimSpec,
};
use tokio_util::sync::CancellationToken;

/// Longest any single attempt in these tests may take before the test fails.
const TEST_BOUND: Duration = Duration::from_secs(20);

fn req(payload: &str, timeout: Duration) -> RunRequest {
    RunRequest {
        task_id: TaskId(7),
        fencing_token: FencingToken(42),
        session_key: Some(SessionKey("s-1".into())),
        payload: payload.into(),
        timeout,
        trace: None,
        fence: GatewayFence {
            gateway: GatewayId("g-test".into()),
            owner: 3,
            token: 9,
        },
        guard: Default::default(),
        context: None,
        flags: Vec::new(),
        role: None,
    }
}

async fn run(d: &dyn GatewayDriver, r: RunRequest) -> Result<RunOutput, DriverError> {
    run_with(d, r, CancellationToken::new()).await
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

// ---------------------------------------------------------------- sim

fn sim(latency: LatencySpec, failure_rate: f64, hang_rate: f64) -> Arc<SimDriver> {
    Arc::new(SimDriver::new(SimSpec {
        latency,
        failure_rate,
        hang_rate,
        seed: Some(2026),
        usage: None,
    }))
}

/// Runs `n` attempts at once and returns each outcome with the latency the
/// simulator reported, in order of start.
async fn sim_batch(
    d: &Arc<SimDriver>,
    n: usize,
    timeout: Duration,
) -> Vec<Result<u64, DriverError>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let fut = {
            let d = Arc::clone(d);
            async move {
                let out = d.run(req("{}", timeout), CancellationToken::new()).await?;
                let v: serde_json::Value = serde_json::from_str(&out.result_json).unwrap();
                let us = v["latency_us"].as_u64().unwrap();
                // The latency was really waited for (timer granularity: 1 ms).
                assert!(out.elapsed + Duration::from_millis(1) >= Duration::from_micros(us));
                Ok(us)
            }
        };
        tasks.push(tokio::spawn(fut));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(tokio::time::timeout(TEST_BOUND, t).await.unwrap().unwrap());
    }
    out
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test]
async fn sim_latency_distributions_are_roughly_right() {
    let ms = Duration::from_millis;
    let fixed = sim_batch(
        &sim(LatencySpec::Fixed { value: ms(3) }, 0.0, 0.0),
        200,
        ms(5000),
    )
    .await;
    assert!(fixed.iter().all(|r| *r.as_ref().unwrap() == 3000));

    let uniform = LatencySpec::Uniform {
        min: ms(2),
        max: ms(10),
    };
    let mut u: Vec<u64> = sim_batch(&sim(uniform, 0.0, 0.0), 2000, ms(5000))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    u.sort_unstable();
    assert!(
        u[0] >= 2000 && u[u.len() - 1] <= 10_000,
        "{} {}",
        u[0],
        u[u.len() - 1]
    );
    let median = percentile(&u, 0.5);
    assert!((5_500..=6_500).contains(&median), "uniform median {median}");

    let lognormal = LatencySpec::LogNormal {
        p50: ms(4),
        p99: ms(40),
    };
    let mut l: Vec<u64> = sim_batch(&sim(lognormal, 0.0, 0.0), 2000, ms(5000))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    l.sort_unstable();
    let (p50, p99) = (percentile(&l, 0.5), percentile(&l, 0.99));
    assert!((3_400..=4_600).contains(&p50), "log-normal p50 {p50}us");
    assert!((28_000..=56_000).contains(&p99), "log-normal p99 {p99}us");
}

#[tokio::test]
async fn sim_failure_and_hang_rates_are_roughly_right() {
    let d = sim(LatencySpec::default(), 0.2, 0.1);
    let outcomes = sim_batch(&d, 2000, Duration::from_millis(100)).await;
    let count =
        |f: &dyn Fn(&Result<u64, DriverError>) -> bool| outcomes.iter().filter(|r| f(r)).count();
    let ok = count(&|r| r.is_ok());
    let failed = count(&|r| {
        matches!(
            r,
            Err(DriverError::TaskFailed {
                retryable: true,
                ..
            })
        )
    });
    let hung = count(&|r| matches!(r, Err(DriverError::Timeout { .. })));
    assert_eq!(ok + failed + hung, 2000);
    assert!((1320..=1480).contains(&ok), "ok {ok}");
    assert!((330..=470).contains(&failed), "failed {failed}");
    assert!((140..=260).contains(&hung), "hung {hung}");
}

#[tokio::test]
async fn sim_same_seed_same_outcomes() {
    let spec = || LatencySpec::Uniform {
        min: Duration::ZERO,
        max: Duration::from_millis(2),
    };
    let a = sim_batch(&sim(spec(), 0.3, 0.0), 300, Duration::from_secs(5)).await;
    let b = sim_batch(&sim(spec(), 0.3, 0.0), 300, Duration::from_secs(5)).await;
    assert_eq!(a, b);
}

#[test]
fn sim_zero_latency_needs_no_timer() {
    // A runtime without a timer panics if an attempt touches one.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let d = SimDriver::new(SimSpec::default());
    rt.block_on(async {
        for i in 0..10_000 {
            let mut r = req("{}", Duration::from_secs(1));
            r.task_id = TaskId(i);
            let out = d.run(r, CancellationToken::new()).await.unwrap();
            assert!(out.result_json.contains(&format!("\"task_id\":{i}")));
        }
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        let r = d.run(req("{}", Duration::from_secs(1)), cancelled).await;
        assert_eq!(r, Err(DriverError::Cancelled));
    });
}

#[tokio::test]
async fn sim_hang_ends_by_cancel_or_timeout() {
    let d = sim(LatencySpec::default(), 0.0, 1.0);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.cancel();
    });
    let started = Instant::now();
    let r = run_with(d.as_ref(), req("{}", Duration::from_secs(3600)), cancel).await;
    assert_eq!(r, Err(DriverError::Cancelled));
    assert!(started.elapsed() < Duration::from_secs(5));

    let r = run(d.as_ref(), req("{}", Duration::from_millis(50))).await;
    assert_eq!(
        r,
        Err(DriverError::Timeout {
            after: Duration::from_millis(50)
        })
    );
    assert!(r.unwrap_err().is_retryable());
}

// ---------------------------------------------------------------- command

fn command(program: &str, args: &[&str]) -> CommandDriver {
    CommandDriver::new(CommandSpec {
        program: program.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
}

fn sh(script: &str) -> CommandDriver {
    command("sh", &["-c", script])
}

/// Whether a process is alive (a zombie waiting for its reaper is not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
    }
}

/// Polls for a pid file written by a test program, with a deadline.
async fn pid_from(path: &Path) -> u32 {
    let deadline = Instant::now() + TEST_BOUND;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn assert_gone(pids: &[u32]) {
    // The group is killed and the leader reaped before the attempt returns;
    // an orphaned grandchild may need a moment to be reaped by init.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "still alive: {pids:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A program that records its pid and its child's, then waits forever.
fn sleeper(dir: &Path) -> CommandDriver {
    sh(&format!(
        "echo $$ > {0}/leader.tmp && mv {0}/leader.tmp {0}/leader; \
         sleep 300 & echo $! > {0}/child.tmp && mv {0}/child.tmp {0}/child; wait",
        dir.display()
    ))
}

#[tokio::test]
async fn command_echoes_the_payload_through_cat() {
    let d = command("cat", &[]);
    let out = run(&d, req(r#"{"a": [1, 2]}"#, Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out.result_json, r#"{"a": [1, 2]}"#);
    let out = run(&sh("echo hello world"), req("{}", Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out.result_json, r#""hello world""#);
    let out = run(&sh("true"), req("{}", Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out.result_json, "null");
}

#[tokio::test]
async fn command_sees_task_env_and_nothing_else_of_ours() {
    assert!(
        std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
        "cargo sets this for tests"
    );
    let d = CommandDriver::new(CommandSpec {
        program: "sh".into(),
        args: vec![
            "-c".into(),
            r#"printf '{"task":%s,"token":%s,"session":"%s","extra":"%s","cargo":"%s"}' "$GODEL_TASK_ID" "$GODEL_FENCING_TOKEN" "$GODEL_SESSION_KEY" "$EXTRA" "${CARGO_MANIFEST_DIR:-unset}""#.into(),
        ],
        env: [("EXTRA".to_string(), "x".to_string())].into(),
        working_dir: None,
    });
    let out = run(&d, req("{}", Duration::from_secs(10))).await.unwrap();
    assert_eq!(
        out.result_json,
        r#"{"task":7,"token":42,"session":"s-1","extra":"x","cargo":"unset"}"#
    );
}

#[tokio::test]
async fn command_and_http_gateways_get_the_flags_on_for_the_task() {
    let d = sh(r#"printf '{"flags":"%s"}' "${GODEL_FLAGS-unset}""#);
    let out = run(&d, req("{}", Duration::from_secs(10))).await.unwrap();
    assert_eq!(
        out.result_json, r#"{"flags":"unset"}"#,
        "none on: no variable"
    );
    let flagged = || RunRequest {
        flags: vec!["new-prompt".into(), "oc-tools".into()],
        ..req("{}", Duration::from_secs(10))
    };
    let out = run(&d, flagged()).await.unwrap();
    assert_eq!(out.result_json, r#"{"flags":"new-prompt,oc-tools"}"#);

    let base = webhook::start().await;
    let out = run(&http(format!("{base}/echo")), flagged()).await.unwrap();
    let sent: serde_json::Value = serde_json::from_str(&out.result_json).unwrap();
    assert_eq!(
        sent["flags"],
        serde_json::json!(["new-prompt", "oc-tools"]),
        "{sent}"
    );
}

#[tokio::test]
async fn command_and_http_gateways_are_told_the_agents_role() {
    let role = || {
        Some(std::sync::Arc::new(godel::gateway::RunRole {
            name: "reviewer".into(),
            tools: Some(vec!["read".into(), "ls".into()]),
            prompt: Some("You review.".into()),
        }))
    };
    let d = sh(
        r#"printf '{"role":"%s","prompt":"%s","tools":"%s"}' "$GODEL_ROLE" "$GODEL_ROLE_PROMPT" "${GODEL_ALLOWED_TOOLS-any}""#,
    );
    let with_role = RunRequest {
        role: role(),
        ..req("{}", Duration::from_secs(10))
    };
    let out = run(&d, with_role).await.unwrap();
    assert_eq!(
        out.result_json,
        r#"{"role":"reviewer","prompt":"You review.","tools":"read,ls"}"#
    );
    let any_tool = RunRequest {
        role: Some(std::sync::Arc::new(godel::gateway::RunRole {
            name: "worker".into(),
            ..Default::default()
        })),
        ..req("{}", Duration::from_secs(10))
    };
    let out = run(&d, any_tool).await.unwrap();
    assert_eq!(
        out.result_json,
        r#"{"role":"worker","prompt":"","tools":"any"}"#
    );

    let base = webhook::start().await;
    let with_role = RunRequest {
        role: role(),
        ..req("{}", Duration::from_secs(10))
    };
    let out = run(&http(format!("{base}/echo")), with_role).await.unwrap();
    let sent: serde_json::Value = serde_json::from_str(&out.result_json).unwrap();
    assert_eq!(
        sent["role"],
        serde_json::json!({"name": "reviewer", "tools": ["read", "ls"], "prompt": "You review."}),
        "{sent}"
    );
}

#[tokio::test]
async fn command_sees_the_gateway_fence_and_may_refuse_it() {
    let d = sh(
        r#"printf '{"gateway":"%s","owner":%s,"token":%s}' "$GODEL_GATEWAY_ID" "$GODEL_GATEWAY_OWNER" "$GODEL_GATEWAY_TOKEN""#,
    );
    let out = run(&d, req("{}", Duration::from_secs(10))).await.unwrap();
    assert_eq!(
        out.result_json,
        r#"{"gateway":"g-test","owner":3,"token":9}"#
    );

    // The documented exit status is a refused fence: not the task's fault,
    // not the gateway's.
    let d = sh(&format!(
        "echo 'token 9 < 12' >&2; exit {}",
        godel::gateway::FENCED_EXIT_CODE
    ));
    let e = run(&d, req("{}", Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, DriverError::Fenced { reason } if reason.contains("token 9 < 12")),
        "{e:?}"
    );
    assert!(
        e.is_gateway_fault(),
        "a gateway that keeps refusing trips its breaker"
    );
    assert_eq!(e.code(), "gateway_fenced");
}

/// A guard that says no at the last moment stops the call unmade: the
/// program never starts (it would leave a file behind), and the error is
/// neither the task's nor the gateway's.
#[tokio::test]
async fn command_is_not_started_when_its_guard_says_no() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("ran");
    let d = sh(&format!("touch {}; echo '{{}}'", mark.display()));
    let mut r = req("{}", Duration::from_secs(10));
    r.guard = godel::gateway::CallGuard::new(|| false);
    let e = run(&d, r).await.unwrap_err();
    assert!(matches!(e, DriverError::NotOwner), "{e:?}");
    assert!(!e.is_gateway_fault());
    assert_eq!(e.code(), "not_owner");
    assert!(!mark.exists(), "the program ran");
    // The same call with a guard that allows it runs.
    let mut r = req("{}", Duration::from_secs(10));
    r.guard = godel::gateway::CallGuard::new(|| true);
    run(&d, r).await.unwrap();
    assert!(mark.exists());
}

#[tokio::test]
async fn command_nonzero_exit_fails_with_the_stderr_tail() {
    let d = sh("echo partial; echo 'something broke' >&2; exit 3");
    let e = run(&d, req("{}", Duration::from_secs(10)))
        .await
        .unwrap_err();
    let DriverError::TaskFailed { reason, retryable } = &e else {
        panic!("{e:?}")
    };
    assert!(
        reason.contains("exit code 3") && reason.contains("something broke"),
        "{reason}"
    );
    assert!(*retryable && e.is_retryable() && !e.is_gateway_fault());

    // Only the tail of a long stderr is kept.
    let d = sh("i=0; while [ $i -lt 2000 ]; do echo line-$i >&2; i=$((i+1)); done; exit 1");
    let e = run(&d, req("{}", Duration::from_secs(10)))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("line-1999") && !msg.contains("line-10\n"),
        "{msg}"
    );
    assert!(
        msg.len() < godel::gateway::MAX_STDERR_TAIL_BYTES + 200,
        "{}",
        msg.len()
    );
}

#[tokio::test]
async fn command_timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = sleeper(dir.path());
    let started = Instant::now();
    let r = run(&d, req("{}", Duration::from_millis(500))).await;
    assert_eq!(
        r,
        Err(DriverError::Timeout {
            after: Duration::from_millis(500)
        })
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let leader = pid_from(&dir.path().join("leader")).await;
    let child = pid_from(&dir.path().join("child")).await;
    assert!(
        !alive(leader),
        "leader {leader} must be reaped when the attempt returns"
    );
    assert_gone(&[leader, child]).await;
}

#[tokio::test]
async fn command_cancel_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(sleeper(dir.path()));
    let cancel = CancellationToken::new();
    let attempt = {
        let (d, cancel) = (Arc::clone(&d), cancel.clone());
        tokio::spawn(async move {
            run_with(d.as_ref(), req("{}", Duration::from_secs(3600)), cancel).await
        })
    };
    let leader = pid_from(&dir.path().join("leader")).await;
    let child = pid_from(&dir.path().join("child")).await;
    assert!(alive(leader) && alive(child));
    cancel.cancel();
    let r = tokio::time::timeout(TEST_BOUND, attempt)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Err(DriverError::Cancelled));
    assert!(
        !alive(leader),
        "leader {leader} must be reaped when the attempt returns"
    );
    assert_gone(&[leader, child]).await;
}

#[tokio::test]
async fn command_dropped_attempt_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(sleeper(dir.path()));
    let attempt = {
        let d = Arc::clone(&d);
        tokio::spawn(async move { run(d.as_ref(), req("{}", Duration::from_secs(3600))).await })
    };
    let leader = pid_from(&dir.path().join("leader")).await;
    let child = pid_from(&dir.path().join("child")).await;
    attempt.abort();
    assert_gone(&[leader, child]).await;
}

#[tokio::test]
async fn command_output_is_bounded() {
    let too_large = Err(DriverError::OutputTooLarge {
        limit_bytes: MAX_RESULT_BYTES,
    });
    // Endless output: the attempt fails as soon as the bound is passed.
    assert_eq!(
        run(&command("yes", &[]), req("{}", Duration::from_secs(60))).await,
        too_large
    );
    // One byte over.
    let over = format!("head -c {} /dev/zero | tr '\\0' a", MAX_RESULT_BYTES + 1);
    assert_eq!(
        run(&sh(&over), req("{}", Duration::from_secs(60))).await,
        too_large
    );
    // Under the bound as text, over it once quoted as a JSON string.
    let quoted = format!("head -c {} /dev/zero | tr '\\0' a", MAX_RESULT_BYTES - 1);
    assert_eq!(
        run(&sh(&quoted), req("{}", Duration::from_secs(60))).await,
        too_large
    );
    // Big but within bounds.
    let fits = format!(
        "printf '\"'; head -c {} /dev/zero | tr '\\0' a; printf '\"'",
        MAX_RESULT_BYTES - 2
    );
    let out = run(&sh(&fits), req("{}", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(out.result_json.len(), MAX_RESULT_BYTES);
}

#[tokio::test]
async fn command_that_cannot_start_is_unavailable() {
    let d = command("/nonexistent/godel-test-program", &[]);
    let e = run(&d, req("{}", Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(matches!(e, DriverError::Unavailable { .. }), "{e:?}");
    assert!(e.is_retryable() && e.is_gateway_fault());
    assert!(!d.probe().await.is_healthy());
    assert!(command("cat", &[]).probe().await.is_healthy());
}

// ---------------------------------------------------------------- http

mod webhook {
    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::Redirect;
    use axum::routing::{get, post};
    use std::time::Duration;

    /// Starts the test webhook on 127.0.0.1:0; returns its base URL. The
    /// server lives as long as the test's runtime.
    pub async fn start() -> String {
        let app = Router::new()
            .route("/echo", post(|body: String| async move { body }))
            .route(
                "/auth",
                post(|h: HeaderMap| async move {
                    let auth = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    format!("{auth:?}")
                }),
            )
            .route("/text", post(|| async { "plain words" }))
            .route(
                "/fence",
                post(|h: HeaderMap| async move {
                    let get = |n: &str| {
                        h.get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let fence = format!(
                        "{}/{}/{}",
                        get("godel-gateway-id"),
                        get("godel-gateway-owner"),
                        get("godel-gateway-token")
                    );
                    serde_json::Value::String(fence).to_string()
                }),
            )
            .route(
                "/fenced",
                post(|| async {
                    (
                        StatusCode::CONFLICT,
                        [(super::FENCED_HEADER, "1")],
                        "seen token 12",
                    )
                }),
            )
            .route(
                "/conflict",
                post(|| async { (StatusCode::CONFLICT, "some other conflict") }),
            )
            .route(
                "/busy",
                post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "overloaded") }),
            )
            .route(
                "/bad",
                post(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "no such model") }),
            )
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route(
                "/big",
                post(|| async { "a".repeat(super::MAX_RESULT_BYTES + 10) }),
            )
            .route("/moved", post(|| async { Redirect::temporary("/echo") }))
            .route("/health", get(|| async { "ok" }))
            .route("/sick", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }
}

fn http(url: String) -> HttpDriver {
    HttpDriver::new(
        HttpSpec {
            url,
            ..Default::default()
        },
        &godel::gateway::DriverPolicy::default(),
    )
    .unwrap()
}

#[tokio::test]
async fn http_2xx_body_is_the_result_and_the_request_is_the_documented_shape() {
    let base = webhook::start().await;
    let out = run(
        &http(format!("{base}/echo")),
        req(r#"{"prompt":"hi"}"#, Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let sent: serde_json::Value = serde_json::from_str(&out.result_json).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"task_id": 7, "fencing_token": 42, "session_key": "s-1", "payload": {"prompt": "hi"}})
    );
    // A session that moved to this gateway: its earlier turns come along.
    let carried = RunRequest {
        context: Some("User: before\nAssistant: ok".into()),
        ..req(r#"{"prompt":"hi"}"#, Duration::from_secs(10))
    };
    let out = run(&http(format!("{base}/echo")), carried).await.unwrap();
    let sent: serde_json::Value = serde_json::from_str(&out.result_json).unwrap();
    assert_eq!(sent["context"], "User: before\nAssistant: ok", "{sent}");
    let out = run(
        &http(format!("{base}/text")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(out.result_json, r#""plain words""#);

    let e = run(
        &http(format!("{base}/echo")),
        req("not json", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            DriverError::TaskFailed {
                retryable: false,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn http_sends_the_auth_header_from_its_reference() {
    let base = webhook::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "Bearer s3cret\n").unwrap();
    let d = HttpDriver::new(
        HttpSpec {
            url: format!("{base}/auth"),
            health_url: None,
            auth_header: Some(SecretRef::File(token)),
        },
        &godel::gateway::DriverPolicy {
            secrets_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap();
    let out = run(&d, req("{}", Duration::from_secs(10))).await.unwrap();
    // The server answers `"<header>"`, which is JSON, so it is kept as is.
    assert_eq!(out.result_json, r#""Bearer s3cret""#);
    assert!(!format!("{d:?}").contains("s3cret"));
}

#[tokio::test]
async fn http_sends_the_gateway_fence_and_a_marked_409_refuses_it() {
    let base = webhook::start().await;
    let out = run(
        &http(format!("{base}/fence")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert_eq!(out.result_json, r#""g-test/3/9""#);

    let e = run(
        &http(format!("{base}/fenced")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, DriverError::Fenced { reason } if reason.contains("seen token 12")),
        "{e:?}"
    );
    // A 409 without the header is the task's own failure.
    let e = run(
        &http(format!("{base}/conflict")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DriverError::TaskFailed { .. }), "{e:?}");
}

#[tokio::test]
async fn http_status_classes_map_to_retryability() {
    let base = webhook::start().await;
    let e = run(
        &http(format!("{base}/busy")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, DriverError::Unavailable { .. }) && e.is_retryable(),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("503") && e.to_string().contains("overloaded"),
        "{e}"
    );

    let e = run(
        &http(format!("{base}/bad")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, DriverError::TaskFailed { .. }) && !e.is_retryable(),
        "{e:?}"
    );
    assert!(e.to_string().contains("no such model"), "{e}");

    let e = run(
        &http(format!("{base}/nowhere")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(!e.is_retryable(), "404: {e:?}");

    let e = run(
        &http(format!("{base}/moved")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, DriverError::TaskFailed { .. })
            && !e.is_retryable()
            && e.to_string().contains("307"),
        "redirects are not followed: {e:?}"
    );
}

#[tokio::test]
async fn http_timeout_refused_and_oversize() {
    let base = webhook::start().await;
    let started = Instant::now();
    let e = run(
        &http(format!("{base}/slow")),
        req("{}", Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e,
        DriverError::Timeout {
            after: Duration::from_millis(300)
        }
    );
    assert!(e.is_retryable() && started.elapsed() < Duration::from_secs(5));

    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = run(
        &http(format!("http://127.0.0.1:{port}/x")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, DriverError::Unavailable { .. }) && e.is_retryable(),
        "{e:?}"
    );

    let e = run(
        &http(format!("{base}/big")),
        req("{}", Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e,
        DriverError::OutputTooLarge {
            limit_bytes: MAX_RESULT_BYTES
        }
    );
}

#[tokio::test]
async fn http_cancel_ends_the_attempt() {
    let base = webhook::start().await;
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.cancel();
    });
    let r = run_with(
        &http(format!("{base}/slow")),
        req("{}", Duration::from_secs(60)),
        cancel,
    )
    .await;
    assert_eq!(r, Err(DriverError::Cancelled));
}

#[tokio::test]
async fn http_probe_uses_the_health_url() {
    let base = webhook::start().await;
    let probe = |health: Option<String>| {
        let d = HttpDriver::new(
            HttpSpec {
                url: format!("{base}/echo"),
                health_url: health,
                auth_header: None,
            },
            &godel::gateway::DriverPolicy::default(),
        )
        .unwrap();
        async move { d.probe().await }
    };
    assert!(probe(Some(format!("{base}/health"))).await.is_healthy());
    assert!(!probe(Some(format!("{base}/sick"))).await.is_healthy());
    assert!(probe(None).await.is_healthy());
}
