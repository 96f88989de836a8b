//! A gateway's driver behind its circuit breaker: every attempt asks the
//! breaker first and tells it how the call went. One per placed gateway,
//! shared by the gateway's agents (who run attempts through it) and its
//! gateway actor (which reports the breaker's state and probes health).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::fsm::SessionKey;

use super::{
    BoxFuture, BreakerConfig, BreakerState, CircuitBreaker, DriverError, GatewayDriver,
    GatewayKind, Health, Result, RunOutput, RunRequest,
};

/// A driver guarded by a circuit breaker.
#[derive(Debug)]
pub struct GuardedDriver {
    inner: Arc<dyn GatewayDriver>,
    breaker: Mutex<CircuitBreaker>,
    /// Woken when the breaker opens, so its owner reports it at once:
    /// until dispatch sees the open circuit, every lease it grants on the
    /// gateway comes straight back.
    opened: tokio::sync::Notify,
}

impl GuardedDriver {
    /// Guards `inner` with a breaker of `config`.
    pub fn new(inner: Arc<dyn GatewayDriver>, config: BreakerConfig) -> Self {
        Self {
            inner,
            breaker: Mutex::new(CircuitBreaker::new(config)),
            opened: tokio::sync::Notify::new(),
        }
    }

    /// Resolves the next time the breaker opens (or at once if it opened
    /// since the last call resolved).
    pub async fn opened(&self) {
        self.opened.notified().await;
    }

    /// The breaker's state now (an open breaker whose cool-down has ended
    /// reads as half-open).
    pub fn circuit(&self) -> BreakerState {
        let mut b = self.lock();
        if let Some(t) = b.poll(Instant::now()) {
            log_transition(t);
        }
        b.state()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitBreaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, result: &Result<RunOutput>) {
        let now = Instant::now();
        let mut b = self.lock();
        let t = match result {
            Ok(_) => b.on_success(now),
            Err(e) if e.is_gateway_fault() => b.on_failure(now),
            // The gateway answered: the task failed for its own reasons.
            Err(DriverError::TaskFailed { .. } | DriverError::OutputTooLarge { .. }) => {
                b.on_success(now)
            }
            Err(_) => {
                b.on_neutral(now);
                None
            }
        };
        if let Some(t) = t {
            log_transition(t);
            if t.to == BreakerState::Open {
                self.opened.notify_one();
            }
        }
    }
}

fn log_transition(t: super::Transition) {
    tracing::info!(from = ?t.from, to = ?t.to, "gateway circuit breaker changed state");
}

impl GatewayDriver for GuardedDriver {
    fn kind(&self) -> GatewayKind {
        self.inner.kind()
    }

    fn run(&self, req: RunRequest, cancel: CancellationToken) -> BoxFuture<'_, Result<RunOutput>> {
        Box::pin(async move {
            let admitted = {
                let now = Instant::now();
                let mut b = self.lock();
                let (ok, t) = b.admit(now);
                if let Some(t) = t {
                    log_transition(t);
                }
                if ok { Ok(()) } else { Err(b.retry_after(now)) }
            };
            if let Err(retry_after) = admitted {
                return Err(DriverError::CircuitOpen { retry_after });
            }
            let result = self.inner.run(req, cancel).await;
            self.record(&result);
            result
        })
    }

    fn probe(&self) -> BoxFuture<'_, Health> {
        self.inner.probe()
    }

    fn open_session(&self, key: &SessionKey) -> BoxFuture<'_, Result<()>> {
        self.inner.open_session(key)
    }

    fn close_session(&self, key: &SessionKey) -> BoxFuture<'_, Result<()>> {
        self.inner.close_session(key)
    }
}
