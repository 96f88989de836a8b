//! Gateway policies with no I/O: the circuit breaker's transitions,
//! backpressure at its edges, and spec validation.

use std::time::{Duration, Instant};

use godel::gateway::{
    BreakerConfig, BreakerState, CircuitBreaker, DriverError, DriverSpec, GatewaySpec, LatencySpec,
    SecretRef, Transition, accepts_new_session, driver_for,
};

use BreakerState::{Closed, HalfOpen, Open};

fn config() -> BreakerConfig {
    BreakerConfig {
        failure_threshold: 3,
        cool_down: Duration::from_secs(10),
        half_open_max_calls: 2,
        success_threshold: 2,
    }
}

fn t(from: BreakerState, to: BreakerState) -> Option<Transition> {
    Some(Transition { from, to })
}

/// One step of a breaker script and what it must return.
enum Step {
    Admit(u64, bool, Option<Transition>),
    Ok(u64, Option<Transition>),
    Fail(u64, Option<Transition>),
    Neutral(u64),
    Poll(u64, Option<Transition>),
    State(BreakerState),
}

fn run_script(steps: &[Step]) {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut b = CircuitBreaker::new(config());
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Admit(s, allowed, tr) => assert_eq!(b.admit(at(s)), (allowed, tr), "step {i}"),
            Step::Ok(s, tr) => assert_eq!(b.on_success(at(s)), tr, "step {i}"),
            Step::Fail(s, tr) => assert_eq!(b.on_failure(at(s)), tr, "step {i}"),
            Step::Neutral(s) => b.on_neutral(at(s)),
            Step::Poll(s, tr) => assert_eq!(b.poll(at(s)), tr, "step {i}"),
            Step::State(st) => assert_eq!(b.state(), st, "step {i}"),
        }
    }
}

#[test]
fn breaker_opens_after_consecutive_failures_only() {
    use Step::*;
    run_script(&[
        Fail(0, None),
        Fail(0, None),
        Ok(0, None), // resets the count
        Fail(1, None),
        Fail(1, None),
        State(Closed),
        Fail(1, t(Closed, Open)),
        Admit(2, false, None),
        Fail(2, None), // late results change nothing while open
        Ok(2, None),
        State(Open),
    ]);
}

#[test]
fn breaker_half_opens_after_cool_down_and_closes_after_successes() {
    use Step::*;
    run_script(&[
        Fail(0, None),
        Fail(0, None),
        Fail(0, t(Closed, Open)),
        Poll(9, None),
        Admit(9, false, None),
        Admit(10, true, t(Open, HalfOpen)),
        Admit(10, true, None),
        Admit(10, false, None), // only two trial calls at once
        Ok(11, None),
        Admit(11, true, None), // a slot freed
        Ok(12, t(HalfOpen, Closed)),
        State(Closed),
        Admit(12, true, None),
    ]);
}

#[test]
fn breaker_reopens_on_a_half_open_failure_with_a_fresh_cool_down() {
    use Step::*;
    run_script(&[
        Fail(0, None),
        Fail(0, None),
        Fail(0, t(Closed, Open)),
        Poll(10, t(Open, HalfOpen)),
        Admit(10, true, None),
        Fail(15, t(HalfOpen, Open)),
        Admit(24, false, None),
        Admit(25, true, t(Open, HalfOpen)),
    ]);
}

#[test]
fn breaker_neutral_results_free_trial_slots_without_a_verdict() {
    use Step::*;
    run_script(&[
        Fail(0, None),
        Fail(0, None),
        Fail(0, t(Closed, Open)),
        Admit(10, true, t(Open, HalfOpen)),
        Admit(10, true, None),
        Admit(10, false, None),
        Neutral(11),
        Neutral(11),
        State(HalfOpen),
        Admit(11, true, None),
        Admit(11, true, None),
        Ok(12, None),
        Ok(12, t(HalfOpen, Closed)),
    ]);
}

#[test]
fn breaker_retry_after_counts_down() {
    let t0 = Instant::now();
    let mut b = CircuitBreaker::new(BreakerConfig {
        failure_threshold: 1,
        ..config()
    });
    assert_eq!(b.retry_after(t0), None);
    assert_eq!(b.on_failure(t0), t(Closed, Open));
    assert_eq!(
        b.retry_after(t0 + Duration::from_secs(4)),
        Some(Duration::from_secs(6))
    );
    assert_eq!(
        b.retry_after(t0 + Duration::from_secs(40)),
        Some(Duration::ZERO)
    );
}

#[test]
fn backpressure_edges() {
    // 90% of 10 is 9: the ninth session opens, the tenth does not.
    assert!(accepts_new_session(8, 10));
    assert!(!accepts_new_session(9, 10));
    assert!(!accepts_new_session(10, 10));
    assert!(!accepts_new_session(11, 10));
    // 90% of 100 is 90.
    assert!(accepts_new_session(89, 100));
    assert!(!accepts_new_session(90, 100));
    // Small gateways: 1 session opens on a gateway of 1; 5 fill to 5.
    assert!(accepts_new_session(0, 1));
    assert!(!accepts_new_session(1, 1));
    assert!(accepts_new_session(4, 5));
    assert!(!accepts_new_session(5, 5));
    // No capacity, no sessions; no overflow at the top.
    assert!(!accepts_new_session(0, 0));
    // 90% of u32::MAX is 3_865_470_565.5.
    assert!(accepts_new_session(3_865_470_565, u32::MAX));
    assert!(!accepts_new_session(3_865_470_566, u32::MAX));
    assert!(!accepts_new_session(u32::MAX, u32::MAX));
}

fn spec(json: &str) -> GatewaySpec {
    serde_json::from_str(json).unwrap()
}

#[test]
fn spec_parses_each_kind_with_defaults() {
    let s = spec(
        r#"{"id":"gw-1","region":"eu","max_sessions":4,
            "driver":{"kind":"sim","latency":{"dist":"uniform","min":"5ms","max":"20ms"}}}"#,
    );
    s.validate().unwrap();
    assert_eq!(s.breaker, BreakerConfig::default());
    let DriverSpec::Sim(sim) = &s.driver else {
        panic!("{s:?}")
    };
    assert_eq!(
        sim.latency,
        LatencySpec::Uniform {
            min: Duration::from_millis(5),
            max: Duration::from_millis(20)
        }
    );
    let c = spec(
        r#"{"id":"c","region":"eu","max_sessions":1,"capabilities":["rust","lang:rust"],
            "breaker":{"failure_threshold":2,"cool_down":"1s"},
            "driver":{"kind":"command","program":"cat"}}"#,
    );
    c.validate().unwrap();
    assert_eq!(c.breaker.failure_threshold, 2);
    assert_eq!(c.breaker.half_open_max_calls, 2);
    let h = spec(
        r#"{"id":"h","region":"eu","max_sessions":1,
            "driver":{"kind":"http","url":"http://127.0.0.1:9/run","auth_header":{"env":"GW_TOKEN"}}}"#,
    );
    h.validate().unwrap();
    let DriverSpec::Http(http) = &h.driver else {
        panic!()
    };
    assert_eq!(http.auth_header, Some(SecretRef::Env("GW_TOKEN".into())));
    // Round trip.
    let again: GatewaySpec = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
    assert_eq!(again, h);
}

#[test]
fn spec_rejects_unknown_fields_at_every_level() {
    let base = |inner: &str| {
        format!(r#"{{"id":"g","region":"r","max_sessions":1,"driver":{{"kind":"sim"{inner}}}}}"#)
    };
    serde_json::from_str::<GatewaySpec>(&base("")).unwrap();
    for (json, word) in [
        (base(r#","failure_rat":0.1"#), "failure_rat"),
        (
            r#"{"id":"g","region":"r","max_sessions":1,"colour":1,"driver":{"kind":"sim"}}"#.into(),
            "colour",
        ),
        (base(r#","latency":{"dist":"fixed","value":"1ms","jitter":1}"#), "jitter"),
        (
            r#"{"id":"g","region":"r","max_sessions":1,"driver":{"kind":"ftp"}}"#.into(),
            "ftp",
        ),
        (
            r#"{"id":"g","region":"r","max_sessions":1,"breaker":{"threshold":1},"driver":{"kind":"sim"}}"#.into(),
            "threshold",
        ),
    ] {
        let e = serde_json::from_str::<GatewaySpec>(&json).unwrap_err();
        assert!(e.to_string().contains(word), "{json}: {e}");
    }
}

fn problems(json: &str) -> Vec<String> {
    match spec(json).validate() {
        Err(DriverError::InvalidSpec(p)) => p,
        other => panic!("{json}: {other:?}"),
    }
}

#[test]
fn validate_reports_every_problem_by_field() {
    let p = problems(
        r#"{"id":"bad id!","region":"","max_sessions":0,"capabilities":[""],
            "breaker":{"failure_threshold":0,"cool_down":"0s"},
            "driver":{"kind":"sim","failure_rate":0.7,"hang_rate":1.5,
                      "latency":{"dist":"log_normal","p50":"2s","p99":"1s"}}}"#,
    );
    for field in [
        "id:",
        "region:",
        "capabilities:",
        "max_sessions:",
        "breaker.failure_threshold:",
        "breaker.cool_down:",
        "driver.hang_rate: 1.5",
        "driver.hang_rate: failure_rate + hang_rate",
        "driver.latency:",
    ] {
        assert!(
            p.iter().any(|m| m.starts_with(field)),
            "no problem for {field}: {p:#?}"
        );
    }
    assert_eq!(p.len(), 9, "{p:#?}");
}

#[test]
fn validate_command_and_http_settings() {
    let p = problems(
        r#"{"id":"c","region":"r","max_sessions":1,
            "driver":{"kind":"command","program":" ","env":{"GODEL_TASK_ID":"x","A=B":"y"}}}"#,
    );
    assert!(p.iter().any(|m| m.starts_with("driver.program:")), "{p:?}");
    assert!(
        p.iter()
            .any(|m| m.contains("GODEL_TASK_ID") && m.contains("reserved")),
        "{p:?}"
    );
    assert!(p.iter().any(|m| m.contains("`A=B`")), "{p:?}");
    assert_eq!(p.len(), 3, "{p:#?}");

    let p = problems(
        r#"{"id":"h","region":"r","max_sessions":1,
            "driver":{"kind":"http","url":"ftp://x/","health_url":"not a url",
                      "auth_header":{"file":"relative/token"}}}"#,
    );
    for field in [
        "driver.url:",
        "driver.health_url:",
        "driver.auth_header.file:",
    ] {
        assert!(p.iter().any(|m| m.starts_with(field)), "{field}: {p:#?}");
    }
    assert_eq!(p.len(), 3, "{p:#?}");
}

/// Builds with the default policy, secret files allowed under `secrets`.
fn driver_for_test(
    s: &GatewaySpec,
    secrets: &std::path::Path,
) -> Result<std::sync::Arc<dyn godel::gateway::GatewayDriver>, DriverError> {
    let ctx = godel::gateway::DriverContext {
        data_dir: None,
        policy: godel::gateway::DriverPolicy {
            secrets_dir: Some(secrets.to_path_buf()),
            ..Default::default()
        },
    };
    driver_for(s, &ctx)
}

#[test]
fn openclaw_specs_are_checked_whole() {
    let ok = spec(
        r#"{"id":"oc","region":"r","max_sessions":4,
            "driver":{"kind":"openclaw","url":"ws://127.0.0.1:18789","token":{"env":"OC_TOKEN"}}}"#,
    );
    assert!(ok.validate().is_ok());
    let DriverSpec::Openclaw(o) = &ok.driver else {
        panic!("kind")
    };
    assert_eq!(o.agent_id, "main");
    assert_eq!(o.turn_timeout, Duration::from_secs(600));
    // Round trip through the registry's text: the token stays a reference.
    let reg = ok.to_registration();
    assert_eq!(reg.kind, "openclaw");
    assert!(
        reg.spec.contains(r#""token":{"env":"OC_TOKEN"}"#),
        "{}",
        reg.spec
    );
    assert_eq!(spec(&reg.spec), ok);

    let p = problems(
        r#"{"id":"oc","region":"r","max_sessions":4,
            "driver":{"kind":"openclaw","url":"wss://gw.example:443","token":{"file":"rel/token"},
                      "agent_id":"no spaces","turn_timeout":"0s","reconnect_window":"2h",
                      "device_key":"rel.key"}}"#,
    );
    for field in [
        "driver.url:",
        "driver.token.file:",
        "driver.agent_id:",
        "driver.turn_timeout:",
        "driver.reconnect_window:",
        "driver.device_key:",
    ] {
        assert!(p.iter().any(|m| m.starts_with(field)), "{field}: {p:#?}");
    }
    assert_eq!(p.len(), 6, "{p:#?}");
    assert!(p[0].contains("wss://"), "{p:#?}");
    let p = problems(
        r#"{"id":"oc","region":"r","max_sessions":4,
            "driver":{"kind":"openclaw","url":"http://127.0.0.1:18789","token":{"env":""}}}"#,
    );
    assert_eq!(p.len(), 2, "{p:#?}");
    // A token given inline is not a reference: refused at parse time.
    let inline = serde_json::from_str::<GatewaySpec>(
        r#"{"id":"oc","region":"r","max_sessions":4,
            "driver":{"kind":"openclaw","url":"ws://127.0.0.1:1","token":"hunter2"}}"#,
    );
    assert!(inline.is_err());
}

#[test]
fn openclaw_driver_reads_its_token_and_device_key_and_never_shows_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "oc-hunter2-token\n").unwrap();
    let s = spec(&format!(
        r#"{{"id":"oc","region":"r","max_sessions":1,
            "driver":{{"kind":"openclaw","url":"ws://127.0.0.1:9","token":{{"file":{:?}}}}}}}"#,
        token.display().to_string()
    ));
    let ctx = godel::gateway::DriverContext {
        data_dir: Some(dir.path().join("data")),
        policy: godel::gateway::DriverPolicy {
            secrets_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    };
    let d = driver_for(&s, &ctx).unwrap();
    let shown = format!("{d:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("file:"), "{shown}");
    let key = dir
        .path()
        .join("data")
        .join(godel::gateway::DEVICE_KEY_FILE);
    assert!(
        key.exists(),
        "the node's device key is created in its data dir"
    );
    let again = driver_for(&s, &ctx).unwrap();
    assert_eq!(
        format!("{again:?}").split("device").nth(1),
        shown.split("device").nth(1),
        "the same device identity is used again"
    );
    std::fs::remove_file(&token).unwrap();
    let e = driver_for(&s, &ctx).unwrap_err();
    assert_eq!(e.code(), "secret_unavailable");
}

#[test]
fn driver_for_validates_and_never_shows_the_secret() {
    let scratch = tempfile::tempdir().unwrap();
    let e = driver_for_test(
        &spec(r#"{"id":"g","region":"r","max_sessions":0,"driver":{"kind":"sim"}}"#),
        scratch.path(),
    )
    .unwrap_err();
    assert!(matches!(e, DriverError::InvalidSpec(_)), "{e}");
    assert!(!e.is_retryable());

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "Bearer hunter2-secret\n").unwrap();
    let h = spec(&format!(
        r#"{{"id":"h","region":"r","max_sessions":1,
            "driver":{{"kind":"http","url":"http://127.0.0.1:9/","auth_header":{{"file":{:?}}}}}}}"#,
        token.display().to_string()
    ));
    let d = driver_for_test(&h, dir.path()).unwrap();
    let shown = format!("{d:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("file:"), "{shown}");

    let missing = spec(
        r#"{"id":"h","region":"r","max_sessions":1,
            "driver":{"kind":"http","url":"http://127.0.0.1:9/","auth_header":{"env":"GODEL_SECRET_TEST_SURELY_UNSET_VAR"}}}"#,
    );
    let e = driver_for_test(&missing, dir.path()).unwrap_err();
    assert_eq!(e.code(), "secret_unavailable");
    assert!(
        e.to_string()
            .contains("env:GODEL_SECRET_TEST_SURELY_UNSET_VAR"),
        "{e}"
    );
}

#[test]
fn breaker_state_and_health_map_to_the_registry() {
    use godel::fsm;
    use godel::gateway::Health;
    assert_eq!(fsm::Circuit::from(Closed), fsm::Circuit::Closed);
    assert_eq!(fsm::Circuit::from(Open), fsm::Circuit::Open);
    assert_eq!(fsm::Circuit::from(HalfOpen), fsm::Circuit::HalfOpen);
    assert_eq!(fsm::Health::from(&Health::Healthy), fsm::Health::Healthy);
    let sick = Health::Unhealthy {
        reason: "refused".into(),
    };
    assert_eq!(fsm::Health::from(&sick), fsm::Health::Unhealthy);
}
