//! The calling side: a pool of authenticated connections per peer address.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tracing::{Instrument, debug, debug_span};

use crate::raft::NodeId;

use super::config::TransportConfig;
use super::conn::{self, Conn};
use super::error::TransportError;
use super::faults::Faults;
use super::handshake::{self, ClientError, PROTOCOL_VERSION};
use super::wire::{self, FrameError};

/// Longest wait a deadline is computed for (a call's `timeout` or the
/// `connect_timeout`); longer ones are cut to it: one day.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Calls peers. Cheap to clone (one `Arc`); clones share the pool.
///
/// Per `(peer, address)` it keeps up to `max_idle_per_peer` idle
/// authenticated connections and makes at most `max_conns_per_peer` calls at
/// once. A connection goes back to the pool only after a clean round trip;
/// any error, timeout or cancelled call drops it. Spawns no tasks: idle
/// connections close when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: TransportConfig,
    faults: Faults,
    pools: Mutex<HashMap<(NodeId, String), Pool>>,
}

/// The connections to one `(peer, address)`.
#[derive(Debug)]
struct Pool {
    /// Idle connections, most recently used last.
    idle: Vec<Idle>,
    /// One permit per concurrent call.
    calls: Arc<Semaphore>,
}

#[derive(Debug)]
struct Idle {
    stream: Conn,
    since: Instant,
}

impl Client {
    /// A client for this node, with its own empty pool. Fails only if
    /// `config` is invalid.
    pub fn new(config: TransportConfig, faults: Faults) -> Result<Self, TransportError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                faults,
                pools: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Sends `request` to node `peer` at `addr` and waits for its response.
    ///
    /// `timeout` (capped at one day) bounds the whole call: waiting for a
    /// connection slot, connecting and the round trip. Connecting is also bounded by
    /// `connect_timeout`; a connect that exceeds it is
    /// [`TransportError::Unreachable`], a call that exceeds `timeout` is
    /// [`TransportError::Timeout`]. A blocked peer (see [`Faults`]) fails at
    /// once, a request over `max_frame_bytes` too, before any I/O.
    pub async fn call(
        &self,
        peer: NodeId,
        addr: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let span = debug_span!("transport.call", peer, addr, len = request.len());
        self.call_inner(peer, addr, request, timeout)
            .instrument(span)
            .await
            .inspect_err(|e| debug!(error = %e, code = e.code(), "transport: call failed"))
    }

    /// The largest request this client sends (`max_frame_bytes`).
    pub fn max_frame_bytes(&self) -> usize {
        self.inner.config.max_frame_bytes as usize
    }

    /// The number of idle pooled connections to `(peer, addr)`.
    pub fn idle_connections(&self, peer: NodeId, addr: &str) -> usize {
        self.pools()
            .get(&(peer, addr.to_owned()))
            .map_or(0, |pool| pool.idle.len())
    }

    async fn call_inner(
        &self,
        peer: NodeId,
        addr: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let config = &self.inner.config;
        let max = config.max_frame_bytes;
        if request.len() > max as usize {
            return Err(TransportError::FrameTooLarge {
                len: request.len() as u64,
                max,
            });
        }
        if self.inner.faults.is_blocked(peer) {
            self.drop_idle(peer, addr);
            return Err(unreachable(peer, addr, "blocked by fault injection"));
        }
        let deadline = deadline_after(timeout);
        let timed_out = || TransportError::Timeout {
            peer,
            after: timeout,
        };
        let calls = self.call_slots(peer, addr);
        let _slot = timeout_at(deadline, calls.acquire_owned())
            .await
            .map_err(|_| timed_out())?
            .expect("invariant: the call semaphore is never closed");
        let mut stream = match self.checkout(peer, addr) {
            Some(stream) => stream,
            None => self.connect(peer, addr, deadline, timeout).await?,
        };
        let response = timeout_at(deadline, round_trip(&mut stream, &request, max))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| frame_error(peer, e))?;
        self.checkin(peer, addr, stream);
        Ok(response)
    }

    /// Opens and authenticates a new connection.
    async fn connect(
        &self,
        peer: NodeId,
        addr: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Conn, TransportError> {
        let config = &self.inner.config;
        let connect_deadline = deadline.min(deadline_after(config.connect_timeout));
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(peer, addr, format!("connect failed: {e}")))?;
            tcp.set_nodelay(true)
                .map_err(|e| unreachable(peer, addr, format!("connect failed: {e}")))?;
            let mut stream = match &config.tls {
                None => Conn::Plain(tcp),
                Some(tls) => {
                    let name =
                        crate::tls::server_name(addr).ok_or_else(|| TransportError::Tls {
                            peer,
                            addr: addr.to_owned(),
                            reason: "the address has no host to check the certificate against"
                                .to_owned(),
                        })?;
                    let stream = tls
                        .connector()
                        .connect(name, tcp)
                        .await
                        .map_err(|e| tls_error(peer, addr, &e))?;
                    Conn::Tls(Box::new(stream.into()))
                }
            };
            handshake::client(&mut stream, &config.secret, config.node_id, peer)
                .await
                .map_err(|e| handshake_error(peer, addr, e))?;
            debug!("transport: connected and authenticated");
            Ok(stream)
        };
        match timeout_at(connect_deadline, attempt).await {
            Ok(result) => result,
            Err(_) if connect_deadline < deadline => Err(unreachable(
                peer,
                addr,
                format!("no connection within {:?}", config.connect_timeout),
            )),
            Err(_) => Err(TransportError::Timeout {
                peer,
                after: timeout,
            }),
        }
    }

    /// The call slots for `(peer, addr)`, creating its pool on first use.
    fn call_slots(&self, peer: NodeId, addr: &str) -> Arc<Semaphore> {
        let max = self.inner.config.max_conns_per_peer;
        let mut pools = self.pools();
        let pool = pools
            .entry((peer, addr.to_owned()))
            .or_insert_with(|| Pool {
                idle: Vec::new(),
                calls: Arc::new(Semaphore::new(max)),
            });
        Arc::clone(&pool.calls)
    }

    /// The freshest idle connection that is still usable, dropping stale ones.
    fn checkout(&self, peer: NodeId, addr: &str) -> Option<Conn> {
        let max_idle = self.inner.config.idle_timeout / 2;
        let mut pools = self.pools();
        let pool = pools.get_mut(&(peer, addr.to_owned()))?;
        while let Some(mut idle) = pool.idle.pop() {
            if idle.since.elapsed() < max_idle && idle.stream.is_silent() {
                return Some(idle.stream);
            }
            debug!("transport: discarding a stale pooled connection");
        }
        None
    }

    /// Returns a connection after a clean round trip, if the pool has room.
    fn checkin(&self, peer: NodeId, addr: &str, stream: Conn) {
        let max_idle = self.inner.config.max_idle_per_peer;
        let mut pools = self.pools();
        if let Some(pool) = pools.get_mut(&(peer, addr.to_owned()))
            && pool.idle.len() < max_idle
        {
            pool.idle.push(Idle {
                stream,
                since: Instant::now(),
            });
        }
    }

    fn drop_idle(&self, peer: NodeId, addr: &str) {
        if let Some(pool) = self.pools().get_mut(&(peer, addr.to_owned())) {
            pool.idle.clear();
        }
    }

    fn pools(&self) -> MutexGuard<'_, HashMap<(NodeId, String), Pool>> {
        // Sections under this lock only move connections in and out of
        // vectors, so a poisoned map is still consistent.
        self.inner
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// `now + wait`, with `wait` capped at [`MAX_WAIT`] so that it cannot
/// overflow.
fn deadline_after(wait: Duration) -> Instant {
    Instant::now() + wait.min(MAX_WAIT)
}

/// Sends one request frame and reads one response frame.
async fn round_trip(stream: &mut Conn, request: &[u8], max: u32) -> Result<Vec<u8>, FrameError> {
    wire::write_frame(stream, request, max).await?;
    wire::read_frame(stream, max).await
}

fn unreachable(peer: NodeId, addr: &str, reason: impl Into<String>) -> TransportError {
    TransportError::Unreachable {
        peer,
        addr: addr.to_owned(),
        reason: reason.into(),
    }
}

fn frame_error(peer: NodeId, error: FrameError) -> TransportError {
    match error {
        FrameError::Eof => TransportError::Closed { peer },
        FrameError::TooLarge { len, max } => TransportError::FrameTooLarge { len, max },
        FrameError::Io(source) => TransportError::Io { peer, source },
    }
}

/// A failed TLS handshake: our certificate refused by the peer (the alert
/// arrives on the first read, so it may also surface in the secret
/// handshake), or the peer's refused by us.
fn tls_error(peer: NodeId, addr: &str, error: &io::Error) -> TransportError {
    match conn::tls_cause(error) {
        Some(reason) => TransportError::Tls {
            peer,
            addr: addr.to_owned(),
            reason,
        },
        None => unreachable(peer, addr, format!("TLS handshake broke off: {error}")),
    }
}

fn handshake_error(peer: NodeId, addr: &str, error: ClientError) -> TransportError {
    let auth = |reason| TransportError::Auth {
        peer,
        addr: addr.to_owned(),
        reason,
    };
    let protocol = |reason: String| TransportError::Protocol {
        addr: addr.to_owned(),
        reason,
    };
    match error {
        ClientError::Io(e) if conn::tls_cause(&e).is_some() => tls_error(peer, addr, &e),
        ClientError::Io(e) => unreachable(peer, addr, format!("handshake broke off: {e}")),
        ClientError::Refused => {
            unreachable(peer, addr, "the peer refused this node (it blocks it)")
        }
        ClientError::Rejected => {
            auth("the peer rejected this node's proof (cluster secret mismatch?)")
        }
        ClientError::ServerUnproven => auth("the peer could not prove it knows the cluster secret"),
        ClientError::Version(remote) => TransportError::Version {
            addr: addr.to_owned(),
            local: PROTOCOL_VERSION,
            remote,
        },
        ClientError::BadMagic => protocol("unexpected greeting".to_owned()),
        ClientError::BadVerdict(v) => protocol(format!("unknown handshake verdict {v}")),
        ClientError::WrongPeer(actual) => TransportError::WrongPeer {
            addr: addr.to_owned(),
            expected: peer,
            actual,
        },
    }
}
