//! The accept loop and one task per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, field, info, info_span, warn};

use crate::raft::NodeId;

use super::config::TransportConfig;
use super::conn::{self, Conn};
use super::error::TransportError;
use super::faults::Faults;
use super::handshake::{self, PROTOCOL_VERSION, ServerError};
use super::wire::{self, FrameError};

/// Pause after a failed `accept` (for example out of file descriptors) before
/// trying again, so the loop does not spin: 100 ms.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Extra time `serve` waits for connection tasks beyond `shutdown_grace`
/// before it gives up on them and returns: 1 s.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(1);

/// Answers requests from authenticated peers.
///
/// One call per request; a connection never has two in flight. The future
/// must be cancel-safe: it is dropped if the caller hangs up or the shutdown
/// grace elapses.
pub trait Handler: Send + Sync + 'static {
    /// Answers `request` from node `peer` (authenticated by the handshake).
    fn handle(&self, peer: NodeId, request: Vec<u8>) -> impl Future<Output = Vec<u8>> + Send;

    /// Told when an authenticated connection from `peer` ends for any reason
    /// but this server's shutdown: the peer closed it (or died), it broke,
    /// or it idled out. A hint only; the default ignores it.
    fn disconnected(&self, peer: NodeId) -> impl Future<Output = ()> + Send {
        let _ = peer;
        std::future::ready(())
    }
}

/// Everything a connection task needs, shared by all of them.
struct Shared<H> {
    config: TransportConfig,
    faults: Faults,
    handler: Arc<H>,
    shutdown: CancellationToken,
}

/// Serves the transport on `listener` until `shutdown` is cancelled.
///
/// Each connection runs in its own task, at most `config.max_connections` at
/// once (a connection past that is closed on accept). On shutdown it stops
/// accepting, closes idle connections, gives in-flight handlers
/// `config.shutdown_grace` to finish, and returns once every connection task
/// has ended (or, if a handler blocks its thread, after one more second with
/// an error logged). Fails only if `config` is invalid.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    config: TransportConfig,
    faults: Faults,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), TransportError> {
    config.validate()?;
    let local_addr = listener.local_addr().ok();
    info!(node = config.node_id, addr = ?local_addr, "transport: serving");
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let grace = config.shutdown_grace;
    let shared = Arc::new(Shared {
        config,
        faults,
        handler,
        shutdown,
    });
    let tracker = TaskTracker::new();
    accept_loop(&listener, &shared, &permits, &tracker).await;
    drop(listener);
    tracker.close();
    let open = tracker.len();
    debug!(
        open,
        "transport: stopped accepting; waiting for connections"
    );
    if tokio::time::timeout(grace.saturating_add(SHUTDOWN_SLACK), tracker.wait())
        .await
        .is_err()
    {
        error!(
            remaining = tracker.len(),
            "transport: connection tasks outlived the shutdown grace (a handler blocks its thread?)"
        );
    }
    info!(addr = ?local_addr, "transport: stopped");
    Ok(())
}

async fn accept_loop<H: Handler>(
    listener: &TcpListener,
    shared: &Arc<Shared<H>>,
    permits: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => admit(stream, addr, shared, permits, tracker),
            Err(e) => {
                warn!(error = %e, "transport: accept failed; backing off");
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
}

/// Starts a connection task if a connection slot is free; otherwise closes
/// the connection at once (the peer sees it break off in the handshake).
fn admit<H: Handler>(
    stream: TcpStream,
    addr: SocketAddr,
    shared: &Arc<Shared<H>>,
    permits: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    let Ok(permit) = Arc::clone(permits).try_acquire_owned() else {
        warn!(
            peer_addr = %addr,
            limit = shared.config.max_connections,
            "transport: connection limit reached; closing new connection"
        );
        return;
    };
    let span = info_span!("transport.conn", peer_addr = %addr, peer = field::Empty);
    tracker.spawn(connection(stream, addr, Arc::clone(shared), permit).instrument(span));
}

/// One connection: handshake, then requests until the peer leaves, the
/// connection idles out, something breaks or shutdown.
async fn connection<H: Handler>(
    tcp: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared<H>>,
    _permit: OwnedSemaphorePermit,
) {
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "transport: could not set TCP_NODELAY");
    }
    let Some((stream, peer)) = authenticate(tcp, addr, &shared).await else {
        return;
    };
    tracing::Span::current().record("peer", peer);
    debug!("transport: peer authenticated");
    serve_requests(stream, peer, &shared).await;
    debug!("transport: connection closed");
    if !shared.shutdown.is_cancelled() {
        shared.handler.disconnected(peer).await;
    }
}

/// Runs the TLS handshake (with `[cluster.tls]`) and the secret handshake
/// within `connect_timeout`, logging any rejection.
async fn authenticate<H: Handler>(
    tcp: TcpStream,
    addr: SocketAddr,
    shared: &Shared<H>,
) -> Option<(Conn, NodeId)> {
    let config = &shared.config;
    let handshake = async {
        let mut stream = match &config.tls {
            None => Conn::Plain(tcp),
            Some(tls) => match tls.acceptor().accept(tcp).await {
                Ok(stream) => Conn::Tls(Box::new(stream.into())),
                Err(e) => return Err(ServerError::Io(e)),
            },
        };
        let peer =
            handshake::server(&mut stream, &config.secret, config.node_id, &shared.faults).await?;
        Ok((stream, peer))
    };
    let result = tokio::select! {
        () = shared.shutdown.cancelled() => return None,
        result = tokio::time::timeout(config.connect_timeout, handshake) => result,
    };
    let error = match result {
        Ok(Ok(authenticated)) => return Some(authenticated),
        Ok(Err(error)) => error,
        Err(_) => {
            warn!(peer_addr = %addr, timeout = ?config.connect_timeout, "transport: handshake timed out; closing connection");
            return None;
        }
    };
    match error {
        ServerError::AuthFailed(claimed) => warn!(
            peer_addr = %addr,
            claimed_peer = claimed,
            "transport: peer failed authentication (wrong cluster secret?); closing connection"
        ),
        ServerError::Version(remote) => warn!(
            peer_addr = %addr,
            local_version = PROTOCOL_VERSION,
            remote_version = remote,
            "transport: protocol version mismatch; closing connection"
        ),
        ServerError::BadMagic => warn!(
            peer_addr = %addr,
            "transport: peer does not speak the Godel transport protocol; closing connection"
        ),
        ServerError::Blocked(peer) => debug!(
            peer_addr = %addr,
            peer,
            "transport: refusing blocked peer (fault injection)"
        ),
        ServerError::Io(e) => match conn::tls_cause(&e) {
            Some(reason) => warn!(
                peer_addr = %addr,
                error = %reason,
                "transport: TLS handshake failed (certificate not from the cluster CA, or not TLS?); closing connection"
            ),
            None => debug!(peer_addr = %addr, error = %e, "transport: handshake broke off"),
        },
    }
    None
}

/// The request loop of an authenticated connection. Every exit closes it.
async fn serve_requests<H: Handler>(mut stream: Conn, peer: NodeId, shared: &Shared<H>) {
    loop {
        let Some(request) = next_request(&mut stream, shared).await else {
            return;
        };
        if shared.faults.is_blocked(peer) {
            debug!("transport: dropping request from blocked peer (fault injection)");
            return;
        }
        let Some(response) = run_handler(&mut stream, peer, request, shared).await else {
            return;
        };
        if shared.faults.is_blocked(peer) {
            debug!("transport: dropping response to blocked peer (fault injection)");
            return;
        }
        if !send_response(&mut stream, &response, shared).await {
            return;
        }
    }
}

/// Waits for the next request; `None` (logged) when the connection should
/// close: shutdown, idle timeout, hangup, oversize frame or I/O error.
async fn next_request<H>(stream: &mut Conn, shared: &Shared<H>) -> Option<Vec<u8>> {
    let config = &shared.config;
    let read = wire::read_frame(stream, config.max_frame_bytes);
    let read = tokio::select! {
        biased;
        () = shared.shutdown.cancelled() => return None,
        read = tokio::time::timeout(config.idle_timeout, read) => read,
    };
    match read {
        Ok(Ok(request)) => return Some(request),
        Err(_) => debug!("transport: connection idle; closing"),
        Ok(Err(FrameError::Eof)) => debug!("transport: peer closed the connection"),
        Ok(Err(FrameError::TooLarge { len, max })) => warn!(
            len,
            max, "transport: request frame exceeds max_frame_bytes; closing connection"
        ),
        Ok(Err(FrameError::Io(e))) => debug!(error = %e, "transport: read failed"),
    }
    None
}

/// Writes a response within `idle_timeout` (and the shutdown grace); whether
/// the connection can carry another request.
async fn send_response<H>(stream: &mut Conn, response: &[u8], shared: &Shared<H>) -> bool {
    let config = &shared.config;
    let write = wire::write_frame(stream, response, config.max_frame_bytes);
    let written = tokio::select! {
        () = grace_elapsed(shared) => return false,
        written = tokio::time::timeout(config.idle_timeout, write) => written,
    };
    match written {
        Ok(Ok(())) => return true,
        Err(_) => debug!("transport: peer did not take the response in time; closing"),
        Ok(Err(FrameError::TooLarge { len, max })) => error!(
            len,
            max, "transport: handler response exceeds max_frame_bytes; closing connection"
        ),
        Ok(Err(e)) => debug!(error = ?e, "transport: could not write response"),
    }
    false
}

/// Runs the handler, unless the caller hangs up or the shutdown grace
/// elapses first (then the handler's future is dropped).
async fn run_handler<H: Handler>(
    stream: &mut Conn,
    peer: NodeId,
    request: Vec<u8>,
    shared: &Shared<H>,
) -> Option<Vec<u8>> {
    tokio::select! {
        response = shared.handler.handle(peer, request) => Some(response),
        () = stream.hangup() => {
            debug!("transport: caller hung up; dropping its request");
            None
        }
        () = grace_elapsed(shared) => {
            warn!("transport: shutdown grace elapsed; dropping an in-flight request");
            None
        }
    }
}

/// Completes `shutdown_grace` after shutdown starts.
async fn grace_elapsed<H>(shared: &Shared<H>) {
    shared.shutdown.cancelled().await;
    tokio::time::sleep(shared.config.shutdown_grace).await;
}
