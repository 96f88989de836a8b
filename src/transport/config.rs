//! Transport settings and the cluster secret.

use std::fmt;
use std::time::Duration;

use crate::raft::NodeId;

use super::error::TransportError;

/// Default time to open a TCP connection and finish the handshake (client),
/// and for a new inbound connection to finish its handshake (server): 2 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default idle time after which the server closes a connection: 60 s. The
/// client reuses a pooled connection only while it has been idle for less than
/// half of this.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default largest frame payload, in bytes: 64 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 64 * 1024 * 1024;
/// Default number of idle connections the client keeps per peer address: 4.
pub const DEFAULT_MAX_IDLE_PER_PEER: usize = 4;
/// Default number of concurrent calls (so open, busy connections) the client
/// makes to one peer address: 32. Further calls wait for a slot.
pub const DEFAULT_MAX_CONNS_PER_PEER: usize = 32;
/// Default number of inbound connections a server holds at once: 512.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default time in-flight handlers get to finish once shutdown starts: 5 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Shortest cluster secret accepted, in bytes: 16.
pub const MIN_SECRET_BYTES: usize = 16;

/// The shared cluster secret. Its `Debug` output is redacted, and it is never
/// logged or sent: the handshake proves knowledge of it with MACs.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps the secret bytes (at least [`MIN_SECRET_BYTES`] to pass
    /// [`TransportConfig::validate`]).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The raw bytes, for the MAC key only.
    pub(super) fn expose(&self) -> &[u8] {
        &self.0
    }

    /// A key for another purpose, derived from the secret so that the
    /// secret itself never leaves this type: HMAC-SHA256 keyed with the
    /// secret over `label`, as lowercase hex (64 characters). Knowing one
    /// derived key reveals neither the secret nor another label's key.
    pub fn derive_hex(&self, label: &str) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0)
            .expect("invariant: HMAC accepts keys of any length");
        mac.update(label.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How a node's transport client and server behave. Build with
/// [`TransportConfig::new`] (defaults for everything but the identity) and
/// adjust the public fields.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// This node's id, sent (authenticated) in every handshake.
    pub node_id: NodeId,
    /// The cluster secret shared by every node.
    pub secret: Secret,
    /// Client: bound on TCP connect plus handshake. Server: time a new
    /// connection has to finish its handshake. Default
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Server: a connection idle this long is closed; it is also the bound on
    /// writing one response. Client: pooled connections idle for half of this
    /// are discarded rather than reused. Default [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Largest request or response payload, in bytes; past it the sender
    /// fails with [`TransportError::FrameTooLarge`] and a receiver closes the
    /// connection. Default [`DEFAULT_MAX_FRAME_BYTES`].
    pub max_frame_bytes: u32,
    /// Client: idle connections kept per `(peer, address)`; 0 disables
    /// pooling. Default [`DEFAULT_MAX_IDLE_PER_PEER`].
    pub max_idle_per_peer: usize,
    /// Client: concurrent calls per `(peer, address)`; a call past it waits
    /// for a slot within its own timeout. Default
    /// [`DEFAULT_MAX_CONNS_PER_PEER`].
    pub max_conns_per_peer: usize,
    /// Server: inbound connections held at once, and so in-flight handlers
    /// (one per connection); a connection past it is closed on accept.
    /// Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Server: how long in-flight handlers may run once shutdown starts
    /// before they are dropped. Default [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// Mutual TLS (`[cluster.tls]`): the server accepts and the client
    /// dials only inside TLS with a certificate from the cluster's CA, and
    /// the secret handshake runs inside it. `None`: plain TCP.
    pub tls: Option<crate::tls::MutualTls>,
}

impl TransportConfig {
    /// The defaults, for node `node_id` of the cluster sharing `secret`.
    pub fn new(node_id: NodeId, secret: Secret) -> Self {
        Self {
            node_id,
            secret,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_idle_per_peer: DEFAULT_MAX_IDLE_PER_PEER,
            max_conns_per_peer: DEFAULT_MAX_CONNS_PER_PEER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            tls: None,
        }
    }

    /// Checks every setting and reports every problem at once as
    /// [`TransportError::InvalidConfig`].
    pub fn validate(&self) -> Result<(), TransportError> {
        let mut problems = Vec::new();
        if self.secret.expose().len() < MIN_SECRET_BYTES {
            problems.push(format!(
                "secret must be at least {MIN_SECRET_BYTES} bytes long"
            ));
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{name} must be greater than zero"));
            }
        }
        for (name, value) in [
            ("max_frame_bytes", self.max_frame_bytes as usize),
            ("max_conns_per_peer", self.max_conns_per_peer),
            ("max_connections", self.max_connections),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TransportError::InvalidConfig(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_depend_on_secret_and_label() {
        let a = Secret::new("hunter2-hunter2-hunter2");
        let k = a.derive_hex("godel fabric cookie");
        assert_eq!(k.len(), 64);
        assert_eq!(k, a.derive_hex("godel fabric cookie"));
        assert_ne!(k, a.derive_hex("another purpose"));
        assert_ne!(
            k,
            Secret::new("hunter3-hunter3-hunter3").derive_hex("godel fabric cookie")
        );
        assert!(!k.contains("hunter2"));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let config = TransportConfig::new(7, Secret::new("hunter2-hunter2-hunter2"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut config = TransportConfig::new(1, Secret::new("short"));
        config.connect_timeout = Duration::ZERO;
        config.max_connections = 0;
        let Err(TransportError::InvalidConfig(problems)) = config.validate() else {
            panic!("expected InvalidConfig");
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        let ok = TransportConfig::new(1, Secret::new([7u8; MIN_SECRET_BYTES]));
        assert!(ok.validate().is_ok());
    }
}
