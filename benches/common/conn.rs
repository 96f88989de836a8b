//! A lean HTTP/1.1 client for closed-loop load: one keep-alive connection
//! per simulated client, reconnected when it drops. It sends exactly what
//! reqwest would (a POST with a JSON body, `TCP_NODELAY` on) and reads the
//! whole answer, but skips reqwest's connection pool, URL parsing and
//! header bookkeeping: the generator shares the machine's 2 cores with the
//! three nodes, so every microsecond it spends is taken from the cluster.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;

/// One client's connection to one node's API.
pub struct Conn {
    addr: String,
    /// `Bearer <admin key>`: every request authenticates, as a real
    /// client's would.
    authorization: String,
    tx: Option<SendRequest<Full<Bytes>>>,
    timeout: Duration,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum ConnError {
    /// Connecting failed.
    Connect(String),
    /// No answer within the timeout.
    Timeout,
    /// The connection failed mid-request.
    Request(String),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Connect(e) => write!(f, "connect: {e}"),
            ConnError::Timeout => write!(f, "timeout"),
            ConnError::Request(e) => write!(f, "request: {e}"),
        }
    }
}

impl Conn {
    /// A connection to `addr` (`host:port`), opened on first use; each
    /// request waits at most `timeout`.
    pub fn new(addr: std::net::SocketAddr, timeout: Duration) -> Self {
        Conn {
            addr: addr.to_string(),
            authorization: format!("Bearer {}", super::support::ADMIN_KEY),
            tx: None,
            timeout,
        }
    }

    /// POSTs `body` (JSON) to `path`; returns the status and the body.
    pub async fn post_json(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ConnError> {
        match tokio::time::timeout(self.timeout, self.exchange(path, body)).await {
            Ok(r) => r,
            Err(_) => {
                // The answer may still come on this connection: start over.
                self.tx = None;
                Err(ConnError::Timeout)
            }
        }
    }

    async fn exchange(&mut self, path: &str, body: Vec<u8>) -> Result<(u16, Bytes), ConnError> {
        let req = hyper::Request::post(path)
            .header(HOST, &self.addr)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, &self.authorization)
            .body(Full::new(Bytes::from(body)))
            .expect("request parts are valid");
        let tx = self.ready().await?;
        let answer = async {
            let resp = tx.send_request(req).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, bytes))
        }
        .await;
        answer.map_err(|e| {
            self.tx = None;
            ConnError::Request(e.to_string())
        })
    }

    /// The connection, opened (or reopened) and ready for a request.
    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ConnError> {
        if let Some(tx) = &mut self.tx
            && tx.ready().await.is_err()
        {
            self.tx = None;
        }
        if self.tx.is_none() {
            let stream = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|e| ConnError::Connect(e.to_string()))?;
            stream
                .set_nodelay(true)
                .map_err(|e| ConnError::Connect(e.to_string()))?;
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ConnError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                // Ends when the connection closes; the next request reconnects.
                let _ = conn.await;
            });
            self.tx = Some(tx);
        }
        Ok(self.tx.as_mut().expect("just set"))
    }
}
