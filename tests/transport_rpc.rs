//! The node-to-node transport over real sockets on 127.0.0.1.
//!
//! Every test is bounded in time: calls carry timeouts and each test body runs
//! under [`within`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godel::transport::{
    Client, Faults, Handler, PROTOCOL_MAGIC, PROTOCOL_VERSION, Secret, TransportConfig,
    TransportError, serve,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-cluster-secret-0123456789";
const CALL: Duration = Duration::from_secs(2);
const TEST_DEADLINE: Duration = Duration::from_secs(20);

/// Requests: `sleep:<ms>` answers `slept` after that long, `hang` never
/// answers, `big:<n>` answers n bytes, anything else is echoed as
/// `<peer>:<request>`.
#[derive(Default)]
struct TestHandler {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Handler futures dropped before they finished.
    abandoned: AtomicUsize,
}

/// Counts a handler run as in flight until dropped; as abandoned if dropped
/// before `finish`.
struct InFlight<'a> {
    handler: &'a TestHandler,
    finished: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.handler.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.handler.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Handler for TestHandler {
    async fn handle(&self, peer: u64, request: Vec<u8>) -> Vec<u8> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut guard = InFlight {
            handler: self,
            finished: false,
        };
        let text = String::from_utf8_lossy(&request).into_owned();
        let response = if let Some(ms) = text.strip_prefix("sleep:") {
            let ms = ms.parse().unwrap();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            b"slept".to_vec()
        } else if text == "hang" {
            std::future::pending::<()>().await;
            unreachable!()
        } else if let Some(n) = text.strip_prefix("big:") {
            vec![b'x'; n.parse().unwrap()]
        } else {
            format!("{peer}:{text}").into_bytes()
        };
        guard.finished = true;
        response
    }
}

fn config(node_id: u64) -> TransportConfig {
    let mut config = TransportConfig::new(node_id, Secret::new(SECRET));
    config.connect_timeout = Duration::from_secs(1);
    config.shutdown_grace = Duration::from_millis(300);
    config
}

/// One node's server and client, sharing a `Faults`.
struct Node {
    id: u64,
    addr: String,
    faults: Faults,
    client: Client,
    handler: Arc<TestHandler>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), TransportError>>,
}

impl Node {
    async fn start(config: TransportConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, config)
    }

    fn start_on(listener: TcpListener, config: TransportConfig) -> Self {
        let addr = listener.local_addr().unwrap().to_string();
        let faults = Faults::new();
        let handler = Arc::new(TestHandler::default());
        let shutdown = CancellationToken::new();
        let client = Client::new(config.clone(), faults.clone()).unwrap();
        let server = tokio::spawn(serve(
            listener,
            config.clone(),
            faults.clone(),
            Arc::clone(&handler),
            shutdown.clone(),
        ));
        Node {
            id: config.node_id,
            addr,
            faults,
            client,
            handler,
            shutdown,
            server,
        }
    }

    /// Cancels the server and waits (bounded) for `serve` to return.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(3), self.server)
            .await
            .expect("serve returns within the shutdown bound")
            .unwrap()
            .unwrap();
    }

    fn calls(&self) -> usize {
        self.handler.calls.load(Ordering::SeqCst)
    }
}

async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(TEST_DEADLINE, future)
        .await
        .expect("test exceeded its deadline")
}

/// Polls `condition` every 10 ms until it holds, failing after 5 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn echo_round_trip_reuses_one_connection() {
    within(async {
        let server = Node::start(config(2)).await;
        let client = Client::new(config(1), Faults::new()).unwrap();
        for i in 0..10 {
            let request = format!("hello {i}").into_bytes();
            let response = client.call(2, &server.addr, request, CALL).await.unwrap();
            assert_eq!(response, format!("1:hello {i}").into_bytes());
        }
        let empty = client
            .call(2, &server.addr, Vec::new(), Duration::MAX)
            .await
            .unwrap();
        assert_eq!(empty, b"1:");
        assert_eq!(server.calls(), 11);
        // sequential calls reuse one connection instead of filling the pool
        assert_eq!(client.idle_connections(2, &server.addr), 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_are_bounded_per_peer() {
    within(async {
        let server = Node::start(config(2)).await;
        let mut client_config = config(1);
        client_config.max_conns_per_peer = 8;
        let client = Client::new(client_config, Faults::new()).unwrap();
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let (client, addr) = (client.clone(), server.addr.clone());
                tokio::spawn(async move {
                    let request = if i % 2 == 0 {
                        "sleep:5".to_owned()
                    } else {
                        format!("n{i}")
                    };
                    let response = client
                        .call(2, &addr, request.into_bytes(), Duration::from_secs(10))
                        .await
                        .unwrap();
                    let expected = if i % 2 == 0 {
                        "slept".to_owned()
                    } else {
                        format!("1:n{i}")
                    };
                    assert_eq!(response, expected.into_bytes());
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        assert_eq!(server.calls(), 200);
        let max = server.handler.max_in_flight.load(Ordering::SeqCst);
        assert!((2..=8).contains(&max), "max in flight {max}");
        assert!(client.idle_connections(2, &server.addr) <= 4);
        server.stop().await;
    })
    .await;
}

/// Collects everything logged on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test] // current-thread: the spawned server logs into the capture
async fn wrong_secret_is_rejected_on_both_sides() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    within(async {
        let server = Node::start(config(2)).await;
        let mut intruder_config = config(1);
        intruder_config.secret = Secret::new("not-the-cluster-secret-987654");
        let intruder = Client::new(intruder_config, Faults::new()).unwrap();
        let err = intruder
            .call(2, &server.addr, b"hi".to_vec(), CALL)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Auth { peer: 2, .. }),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "auth");
        assert_eq!(intruder.idle_connections(2, &server.addr), 0);
        // the server still serves nodes that know the secret
        let friend = Client::new(config(3), Faults::new()).unwrap();
        assert_eq!(
            friend
                .call(2, &server.addr, b"hi".to_vec(), CALL)
                .await
                .unwrap(),
            b"3:hi"
        );
        assert_eq!(server.calls(), 1, "the handler never saw the intruder");
        server.stop().await;
    })
    .await;
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warning = logs
        .lines()
        .find(|line| line.contains("WARN") && line.contains("failed authentication"))
        .unwrap_or_else(|| panic!("no authentication warning in:\n{logs}"));
    assert!(warning.contains("peer_addr=127.0.0.1:"), "{warning}");
    assert!(
        !logs.contains(SECRET) && !logs.contains("not-the-cluster-secret"),
        "{logs}"
    );
}

#[tokio::test]
async fn version_mismatch_is_reported_both_ways() {
    within(async {
        let server = Node::start(config(2)).await;
        // an older or newer client: the server answers its own version and closes
        let mut raw = TcpStream::connect(&server.addr).await.unwrap();
        raw.write_all(&PROTOCOL_MAGIC).await.unwrap();
        raw.write_all(&[PROTOCOL_VERSION + 1]).await.unwrap();
        raw.write_all(&[0u8; 40]).await.unwrap();
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).await.unwrap();
        let mut expected = PROTOCOL_MAGIC.to_vec();
        expected.push(PROTOCOL_VERSION);
        assert_eq!(reply, expected);
        assert_eq!(server.calls(), 0);
        server.stop().await;

        // an older or newer server
        let (addr, fake) = fake_server(|mut s| async move {
            let mut hello = [0u8; 45];
            s.read_exact(&mut hello).await.unwrap();
            s.write_all(&PROTOCOL_MAGIC).await.unwrap();
            s.write_all(&[PROTOCOL_VERSION + 1]).await.unwrap();
        })
        .await;
        let client = Client::new(config(1), Faults::new()).unwrap();
        let err = client.call(2, &addr, b"hi".to_vec(), CALL).await.unwrap_err();
        let remote = PROTOCOL_VERSION + 1;
        assert!(
            matches!(err, TransportError::Version { local: PROTOCOL_VERSION, remote: r, .. } if r == remote),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        fake.await.unwrap();

        // something else entirely
        let (addr, fake) = fake_server(|mut s| async move {
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
        })
        .await;
        let err = client.call(2, &addr, b"hi".to_vec(), CALL).await.unwrap_err();
        assert!(matches!(err, TransportError::Protocol { .. }), "{err:?}");
        fake.await.unwrap();
    })
    .await;
}

/// A listener that runs `script` on its first connection.
async fn fake_server<F, Fut>(script: F) -> (String, JoinHandle<()>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        script(stream).await;
    });
    (addr, task)
}

#[tokio::test]
async fn wrong_peer_at_an_address_is_detected() {
    within(async {
        let server = Node::start(config(2)).await;
        let client = Client::new(config(1), Faults::new()).unwrap();
        let err = client
            .call(9, &server.addr, b"hi".to_vec(), CALL)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::WrongPeer {
                    expected: 9,
                    actual: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(server.calls(), 0);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn client_reconnects_after_server_restart() {
    within(async {
        let server = Node::start(config(2)).await;
        let addr = server.addr.clone();
        let client = Client::new(config(1), Faults::new()).unwrap();
        assert_eq!(
            client.call(2, &addr, b"a".to_vec(), CALL).await.unwrap(),
            b"1:a"
        );
        assert_eq!(client.idle_connections(2, &addr), 1);
        server.stop().await;

        let err = client
            .call(2, &addr, b"b".to_vec(), CALL)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
        assert!(err.is_retryable());

        let listener = TcpListener::bind(&addr).await.unwrap();
        let restarted = Node::start_on(listener, config(2));
        assert_eq!(
            client.call(2, &addr, b"c".to_vec(), CALL).await.unwrap(),
            b"1:c"
        );
        assert_eq!(restarted.calls(), 1);
        restarted.stop().await;
    })
    .await;
}

#[tokio::test]
async fn idle_pooled_connection_survives_restart_without_a_failed_call() {
    within(async {
        let server = Node::start(config(2)).await;
        let addr = server.addr.clone();
        let client = Client::new(config(1), Faults::new()).unwrap();
        client.call(2, &addr, b"a".to_vec(), CALL).await.unwrap();
        server.stop().await;
        let restarted = Node::start_on(TcpListener::bind(&addr).await.unwrap(), config(2));
        // the pooled connection saw the old server hang up: it is not reused
        assert_eq!(
            client.call(2, &addr, b"b".to_vec(), CALL).await.unwrap(),
            b"1:b"
        );
        restarted.stop().await;
    })
    .await;
}

#[tokio::test]
async fn slow_handler_times_out_and_its_connection_is_dropped() {
    within(async {
        let server = Node::start(config(2)).await;
        let client = Client::new(config(1), Faults::new()).unwrap();
        client
            .call(2, &server.addr, b"warm".to_vec(), CALL)
            .await
            .unwrap();
        let started = Instant::now();
        let err = client
            .call(
                2,
                &server.addr,
                b"sleep:3000".to_vec(),
                Duration::from_millis(200),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Timeout { peer: 2, .. }),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(client.idle_connections(2, &server.addr), 0);
        // the client closed that connection, so the server dropped the handler
        eventually("server drops the abandoned request", || {
            server.handler.abandoned.load(Ordering::SeqCst) == 1
        })
        .await;
        // a reused connection would deliver "slept" late; a fresh one answers now
        let response = client
            .call(2, &server.addr, b"next".to_vec(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(response, b"1:next");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn oversize_frames_are_rejected() {
    within(async {
        let mut server_config = config(2);
        server_config.max_frame_bytes = 1024;
        let server = Node::start(server_config).await;
        let mut small = config(1);
        small.max_frame_bytes = 1024;
        let small = Client::new(small, Faults::new()).unwrap();
        let mut large = config(3);
        large.max_frame_bytes = 1 << 20;
        let large = Client::new(large, Faults::new()).unwrap();

        // the sender refuses before any I/O
        let err = small
            .call(2, &server.addr, vec![0u8; 1025], CALL)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::FrameTooLarge {
                    len: 1025,
                    max: 1024
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert_eq!(small.idle_connections(2, &server.addr), 0);

        // the receiving server closes the connection without calling the handler
        let err = large
            .call(2, &server.addr, vec![0u8; 4096], CALL)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Closed { peer: 2 }), "{err:?}");
        assert_eq!(server.calls(), 0);
        assert_eq!(
            large
                .call(2, &server.addr, b"ok".to_vec(), CALL)
                .await
                .unwrap(),
            b"3:ok"
        );

        // a response over the client's limit fails and the connection is dropped
        let err = small
            .call(2, &server.addr, b"big:2048".to_vec(), CALL)
            .await;
        // the server's own limit is 1024 too: it refuses to send 2048 and closes
        assert!(matches!(err, Err(TransportError::Closed { .. })), "{err:?}");
        server.stop().await;

        let mut roomy = config(2);
        roomy.max_frame_bytes = 1 << 20;
        let server = Node::start(roomy).await;
        let err = small
            .call(2, &server.addr, b"big:2048".to_vec(), CALL)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::FrameTooLarge {
                    len: 2048,
                    max: 1024
                }
            ),
            "{err:?}"
        );
        assert_eq!(small.idle_connections(2, &server.addr), 0);
        assert_eq!(
            small
                .call(2, &server.addr, b"big:1024".to_vec(), CALL)
                .await
                .unwrap()
                .len(),
            1024
        );
        server.stop().await;
    })
    .await;
}

/// Asserts a call fails fast with a retryable, network-ish error.
async fn assert_cut_off(from: &Node, to: &Node) -> TransportError {
    let started = Instant::now();
    let err = from
        .client
        .call(to.id, &to.addr, b"x".to_vec(), CALL)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "slow failure: {:?}",
        started.elapsed()
    );
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        matches!(
            err,
            TransportError::Unreachable { .. } | TransportError::Closed { .. }
        ),
        "{err:?}"
    );
    err
}

#[tokio::test]
async fn blocked_peer_fails_fast_both_ways_until_unblocked() {
    within(async {
        let a = Node::start(config(1)).await;
        let b = Node::start(config(2)).await;
        assert_eq!(
            a.client
                .call(2, &b.addr, b"x".to_vec(), CALL)
                .await
                .unwrap(),
            b"1:x"
        );
        assert_eq!(
            b.client
                .call(1, &a.addr, b"x".to_vec(), CALL)
                .await
                .unwrap(),
            b"2:x"
        );

        // a cuts itself off from b; b's faults stay empty
        a.faults.block(2);
        let err = assert_cut_off(&a, &b).await;
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
        // b's pooled connection: a's server drops the request and closes it
        assert_cut_off(&b, &a).await;
        // a fresh connection: a's server refuses b after authenticating it
        let err = assert_cut_off(&b, &a).await;
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
        assert_eq!(a.calls(), 1);
        assert_eq!(b.calls(), 1);

        a.faults.unblock(2);
        assert_eq!(
            a.client
                .call(2, &b.addr, b"y".to_vec(), CALL)
                .await
                .unwrap(),
            b"1:y"
        );
        assert_eq!(
            b.client
                .call(1, &a.addr, b"y".to_vec(), CALL)
                .await
                .unwrap(),
            b"2:y"
        );
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_connection_task() {
    within(async {
        let server = Node::start(config(2)).await;
        let client = Client::new(config(1), Faults::new()).unwrap();
        // an idle pooled connection, a connection stuck before its handshake,
        // and one with a request that never finishes
        client
            .call(2, &server.addr, b"warm".to_vec(), CALL)
            .await
            .unwrap();
        let mut silent = TcpStream::connect(&server.addr).await.unwrap();
        let (hung_client, addr) = (client.clone(), server.addr.clone());
        let hung = tokio::spawn(async move {
            hung_client
                .call(2, &addr, b"hang".to_vec(), Duration::from_secs(10))
                .await
        });
        eventually("the hanging request is in flight", || {
            server.handler.in_flight.load(Ordering::SeqCst) == 1
        })
        .await;

        let started = Instant::now();
        let addr = server.addr.clone();
        let handler = Arc::clone(&server.handler);
        server.stop().await; // fails unless serve returns within 3 s
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(handler.abandoned.load(Ordering::SeqCst), 1);
        assert_eq!(handler.in_flight.load(Ordering::SeqCst), 0);
        let err = hung.await.unwrap().unwrap_err();
        assert!(matches!(err, TransportError::Closed { peer: 2 }), "{err:?}");
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(1), silent.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        let err = client
            .call(2, &addr, b"after".to_vec(), CALL)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused() {
    within(async {
        let mut server_config = config(2);
        server_config.max_connections = 2;
        let server = Node::start(server_config).await;
        let client = Client::new(config(1), Faults::new()).unwrap();
        let hanging: Vec<_> = (0..2)
            .map(|_| {
                let (client, addr) = (client.clone(), server.addr.clone());
                tokio::spawn(async move {
                    client
                        .call(2, &addr, b"hang".to_vec(), Duration::from_secs(10))
                        .await
                })
            })
            .collect();
        eventually("two requests in flight", || {
            server.handler.in_flight.load(Ordering::SeqCst) == 2
        })
        .await;
        let err = client
            .call(2, &server.addr, b"third".to_vec(), CALL)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
        assert_eq!(server.calls(), 2);

        // once the callers give up, their slots free up
        for call in hanging {
            call.abort();
        }
        eventually("handlers dropped", || {
            server.handler.abandoned.load(Ordering::SeqCst) == 2
        })
        .await;
        // a slot frees when its connection task ends, just after the handler
        // is dropped: poll with a deadline
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match client.call(2, &server.addr, b"fourth".to_vec(), CALL).await {
                Ok(response) => break assert_eq!(response, b"1:fourth"),
                Err(e) => assert!(Instant::now() < deadline, "still refused: {e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let mut bad = config(1);
    bad.secret = Secret::new("short");
    bad.max_conns_per_peer = 0;
    let err = Client::new(bad.clone(), Faults::new()).unwrap_err();
    assert!(
        matches!(&err, TransportError::InvalidConfig(p) if p.len() == 2),
        "{err:?}"
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = serve(
        listener,
        bad,
        Faults::new(),
        Arc::new(TestHandler::default()),
        CancellationToken::new(),
    )
    .await;
    assert!(matches!(result, Err(TransportError::InvalidConfig(_))));
}
