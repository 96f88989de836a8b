//! Bad input at the HTTP level: a declared body over the limit is refused
//! before it is read, slow headers and stalled bodies time out, deep JSON
//! is refused, and after all of it nothing acknowledged is lost and the
//! node is ready. Also the API over TLS, and a plaintext client on it.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use serde_json::json;
use support::{ADMIN_KEY, BIN, Cluster, bounded, deadline, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEST_BOUND: Duration = Duration::from_secs(120);

const LIMITS: &str =
    "[api]\nmax_body_bytes = 65536\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\n";

/// Sends `head` (and `body`) on a fresh connection; returns what came back
/// before the server closed it or `wait` passed.
async fn raw(addr: SocketAddr, head: &str, body: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    read_some(&mut s, wait).await
}

async fn read_some(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n")
                    && String::from_utf8_lossy(&out).contains("\"error\"")
                {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_nothing_is_lost() {
    let c = Cluster::start_with(1, LIMITS).await;
    let addr = c.node(0).api_addr;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let mut acked = Vec::new();
        for i in 0..5 {
            let r = api
                .post(
                    0,
                    "/api/v1/tasks",
                    &json!({"payload": {"i": i}, "capabilities": ["none"]}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{r:?}");
            acked.push(r.body["id"].as_u64().unwrap());
        }

        // A declared 20 MiB body, 64 KiB of it sent: 413 at once.
        let head = format!(
            "POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 20971520\r\n\r\n"
        );
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let _ = s.write_all(&vec![b' '; 64 * 1024]).await;
        let answer = read_some(&mut s, Duration::from_secs(5)).await;
        let took = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
        assert!(took < Duration::from_millis(100), "413 after {took:?}");

        // Headers trickled slower than header_timeout: the connection is cut.
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let answer = read_some(&mut s, Duration::from_secs(10)).await;
        assert!(!answer.contains("alive"), "{answer}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );

        // A body that stalls: 408.
        let head = format!(
            "POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"payload\":"
        );
        let answer = raw(addr, &head, b"", Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");

        // JSON nested 100 deep: 400, naming the limit.
        let deep = format!(
            "{{\"payload\":{{\"x\":{}{}}}}}",
            "[".repeat(100),
            "]".repeat(100)
        );
        let r = api
            .post_raw(0, "/api/v1/tasks", deep.into_bytes())
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        assert!(r.message().contains("deeper than 32"), "{r:?}");

        // Nothing acknowledged is lost; the node is ready.
        for id in acked {
            let t = api.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
            assert_eq!(t["status"], "pending", "{t}");
        }
        let ready = api.anonymous().get(0, "/health/ready").await.unwrap();
        assert_eq!(ready.status, 200, "{ready:?}");
    })
    .await;
}

/// A CA-signed certificate for 127.0.0.1, and the CA, as PEM files.
fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let ca = support::certs::Ca::new(dir, "api");
    let files = ca.issue("node", &["127.0.0.1"]);
    (files.cert, files.key, ca.pem().to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The API over TLS answers HTTPS; a plaintext client gets no HTTP answer,
/// and the node serves TLS clients after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_and_refuses_plaintext_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca_pem) = certificates(dir.path());
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, ADMIN_KEY).unwrap();
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let raft = loop {
        let p = free_port();
        if p < 65_000 && TcpListener::bind(("127.0.0.1", p + 100)).is_ok() {
            break p;
        }
    };
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ndata_dir = {:?}\napi_addr = \"{api}\"\nraft_addr = \"127.0.0.1:{raft}\"\n\
             [api]\ntls_cert = {:?}\ntls_key = {:?}\n[auth]\nbootstrap_key_file = {:?}\n",
            dir.path().join("data"),
            cert,
            key,
            key_file
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let _node = Node(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let https = async |path: &str| -> Option<String> {
        let tcp = TcpStream::connect(api).await.ok()?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        tls.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    bounded(TEST_BOUND, async {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            // Ready, and the bootstrap key committed: an authenticated 200.
            match https("/api/v1/tasks").await {
                Some(a) if a.starts_with("HTTP/1.1 200") => break,
                other => assert!(Instant::now() < until, "never ready over TLS: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Plaintext HTTP on the TLS port: no HTTP answer, a closed connection.
        let started = Instant::now();
        let answer = raw(
            api,
            "GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n",
            b"",
            Duration::from_secs(15),
        )
        .await;
        assert!(!answer.starts_with("HTTP/"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{:?}",
            started.elapsed()
        );
        let again = https("/health/live").await.unwrap();
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    })
    .await;
}

/// A cluster whose API serves TLS: it forms (the bootstrap probe speaks
/// https), a node joins through a peer's https API, a follower relays a
/// leader transfer over https, and the CLI reaches it with `--ca-cert`
/// (and refuses it without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_an_https_api_forms_joins_and_relays() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca_pem) = certificates(dir.path());
    let ca = dir.path().join("api-ca.crt");
    std::fs::write(&ca, &ca_pem).unwrap();
    let extra = format!("[api]\ntls_cert = {cert:?}\ntls_key = {key:?}\ntls_ca = {ca:?}\n");
    bounded(Duration::from_secs(120), async {
        let mut c = Cluster::start_with_api_tls(2, &extra, &ca_pem).await;
        let api = c.api();
        let j = c.start_joining(0);
        let joined = c.node(j).id;
        wait_until(
            "the joining node to become a voter",
            deadline(Duration::from_secs(40)),
            async || {
                let s = api.cluster(0).await?;
                let voter = s["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["id"] == joined && m["role"] == "voter");
                if voter {
                    Ok(())
                } else {
                    anyhow::bail!("not yet a voter: {s}")
                }
            },
        )
        .await;
        let leader = c.leader().await;
        let follower = (leader + 1) % c.len();
        let to = c.node(follower).id;
        // A follower that has not caught up yet answers a retryable 503.
        let r = api
            .post_retrying(
                follower,
                "/api/v1/cluster/transfer-leader",
                &json!({ "to": to }),
                deadline(Duration::from_secs(20)),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(c.leader().await, follower);

        let cli = |ca: Option<&std::path::Path>| {
            let mut cmd = Command::new(BIN);
            cmd.args(["--api", &format!("https://{}", c.node(0).api_addr)])
                .args(["--api-key", ADMIN_KEY]);
            if let Some(ca) = ca {
                cmd.arg("--ca-cert").arg(ca);
            }
            cmd.args(["cluster", "status"])
                .env_remove("GODEL_CA_CERT")
                .env_remove("GODEL_API_KEY")
                .output()
                .unwrap()
        };
        let ok = cli(Some(&ca));
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let refused = cli(None);
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr).to_lowercase();
        assert!(
            err.contains("certificate") || err.contains("error sending request"),
            "{err}"
        );
    })
    .await;
}
