//! The built-in simulated gateway: latency, failures and hangs drawn from a
//! configurable distribution, with no I/O, for demos, benchmarks and drills.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::spec::{GatewayKind, LatencySpec, SimSpec};
use super::{BoxFuture, DriverError, GatewayDriver, Health, Result, RunOutput, RunRequest};

/// The standard normal's 99th percentile, used to fit a log-normal to p50/p99.
const Z_P99: f64 = 2.326_347_874_040_840_8;
/// Longest latency a draw may yield (the log-normal's tail is unbounded).
const MAX_DRAW: Duration = Duration::from_secs(3600);

/// What one attempt will do, decided when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Succeed(Duration),
    Fail(Duration),
    Hang,
}

/// The `sim` driver. Outcomes come from one random stream shared by all
/// attempts, so with a seed and attempts started in a fixed order the
/// sequence of outcomes is reproducible.
#[derive(Debug)]
pub struct SimDriver {
    spec: SimSpec,
    /// Whether every attempt succeeds at once: then no lock, no draw, no timer.
    instant: bool,
    rng: Mutex<SmallRng>,
}

impl SimDriver {
    /// A simulator with these settings (assumed validated).
    pub fn new(spec: SimSpec) -> Self {
        let rng = match spec.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        let instant = spec.failure_rate <= 0.0
            && spec.hang_rate <= 0.0
            && spec.latency == LatencySpec::default();
        Self {
            spec,
            instant,
            rng: Mutex::new(rng),
        }
    }

    fn draw(&self) -> Fate {
        if self.instant {
            return Fate::Succeed(Duration::ZERO);
        }
        // A poisoned lock only means another attempt panicked mid-draw; the
        // generator's state is still a valid state.
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let u: f64 = rng.random();
        if u < self.spec.hang_rate {
            return Fate::Hang;
        }
        let latency = draw_latency(&self.spec.latency, &mut rng);
        if u < self.spec.hang_rate + self.spec.failure_rate {
            Fate::Fail(latency)
        } else {
            Fate::Succeed(latency)
        }
    }
}

fn draw_latency(spec: &LatencySpec, rng: &mut SmallRng) -> Duration {
    match *spec {
        LatencySpec::Fixed { value } => value,
        LatencySpec::Uniform { min, max } if min >= max => min,
        LatencySpec::Uniform { min, max } => rng.random_range(min..=max),
        LatencySpec::LogNormal { p50, p99 } => {
            let median = p50.as_secs_f64();
            let sigma = (p99.as_secs_f64() / median).ln().max(0.0) / Z_P99;
            // Box-Muller; 1 - u keeps the logarithm's argument in (0, 1].
            let (u1, u2): (f64, f64) = (rng.random(), rng.random());
            let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            let secs = median * (sigma * z).exp();
            Duration::try_from_secs_f64(secs)
                .unwrap_or(MAX_DRAW)
                .min(MAX_DRAW)
        }
    }
}

impl GatewayDriver for SimDriver {
    fn kind(&self) -> GatewayKind {
        GatewayKind::Sim
    }

    fn run(&self, req: RunRequest, cancel: CancellationToken) -> BoxFuture<'_, Result<RunOutput>> {
        let fate = self.draw();
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            // Wall-clock start, so a benchmark can measure dispatch latency
            // (submission to attempt start) from results alone.
            let started_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let usage = self.spec.usage.as_ref().map_or_else(String::new, |u| {
                let model = u.model.as_ref().map_or_else(String::new, |m| {
                    format!(r#","model":{}"#, serde_json::Value::from(m.as_str()))
                });
                format!(
                    r#","usage":{{"input":{},"output":{}}}{model}"#,
                    u.input_tokens, u.output_tokens
                )
            });
            // In a session: the conversation's key, and the turns carried
            // to it from another gateway, so tests see what a model would.
            let session = req.session_key.as_ref().map_or_else(String::new, |k| {
                format!(
                    r#","text":"sim reply to task {}","session_key":{}"#,
                    req.task_id.0,
                    serde_json::Value::from(k.0.as_str())
                )
            });
            let carried = req.context.as_deref().map_or_else(String::new, |c| {
                format!(r#","context":{}"#, serde_json::Value::from(c))
            });
            // The feature flags on for the task and the agent's role, so a
            // test sees them.
            let flags = if req.flags.is_empty() {
                String::new()
            } else {
                format!(r#","flags":{}"#, serde_json::Value::from(req.flags.clone()))
            };
            let flags = match &req.role {
                Some(r) => format!(
                    r#"{flags},"role":{}"#,
                    serde_json::Value::from(r.name.as_str())
                ),
                None => flags,
            };
            let done = |latency: Duration| RunOutput {
                result_json: format!(
                    r#"{{"sim":true,"task_id":{},"latency_us":{},"started_us":{started_us}{usage}{session}{carried}{flags}}}"#,
                    req.task_id.0,
                    latency.as_micros()
                ),
                elapsed: started.elapsed(),
            };
            if cancel.is_cancelled() {
                return Err(DriverError::Cancelled);
            }
            match fate {
                Fate::Succeed(Duration::ZERO) => Ok(done(Duration::ZERO)),
                Fate::Succeed(d) => {
                    super::bounded(req.timeout, &cancel, async {
                        tokio::time::sleep(d).await;
                        Ok(done(d))
                    })
                    .await
                }
                Fate::Fail(d) => {
                    super::bounded(req.timeout, &cancel, async {
                        tokio::time::sleep(d).await;
                        Err(DriverError::TaskFailed {
                            reason: format!("simulated failure after {d:?}"),
                            retryable: true,
                        })
                    })
                    .await
                }
                Fate::Hang => super::bounded(req.timeout, &cancel, std::future::pending()).await,
            }
        })
    }

    fn probe(&self) -> BoxFuture<'_, Health> {
        Box::pin(async { Health::Healthy })
    }
}
