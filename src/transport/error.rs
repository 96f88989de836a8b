//! What can go wrong with a call, and whether trying again makes sense.

use std::io;
use std::time::Duration;

use crate::raft::NodeId;

/// `Result` with a [`TransportError`].
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Why a transport call (or configuration) failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached: connect refused, failed or timed out,
    /// the handshake broke off, the peer refused us, or fault injection
    /// blocks it. Nothing was sent.
    #[error("node {peer} at {addr} is unreachable: {reason}")]
    Unreachable {
        /// The node called.
        peer: NodeId,
        /// The address called.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// No response within the call's timeout (connection slot, connect or
    /// request). The request may or may not have been processed.
    #[error("call to node {peer} timed out after {after:?}")]
    Timeout {
        /// The node called.
        peer: NodeId,
        /// The call's timeout.
        after: Duration,
    },
    /// Mutual authentication failed: the two sides do not share the cluster
    /// secret (or the peer is an impostor).
    #[error("authentication with node {peer} at {addr} failed: {reason}")]
    Auth {
        /// The node called.
        peer: NodeId,
        /// The address called.
        addr: String,
        /// Which side rejected which proof.
        reason: &'static str,
    },
    /// The TLS handshake failed (`[cluster.tls]`): the peer's certificate
    /// does not chain to our CA or does not name the address dialed, or the
    /// peer refused ours, or the peer does not speak TLS.
    #[error("TLS with node {peer} at {addr} failed: {reason}")]
    Tls {
        /// The node called.
        peer: NodeId,
        /// The address called.
        addr: String,
        /// What TLS reported.
        reason: String,
    },
    /// The peer speaks another version of this protocol.
    #[error("protocol version mismatch with {addr}: this node speaks {local}, the peer {remote}")]
    Version {
        /// The address called.
        addr: String,
        /// This build's [`super::PROTOCOL_VERSION`].
        local: u8,
        /// The peer's.
        remote: u8,
    },
    /// The peer does not speak this protocol at all.
    #[error("{addr} is not a Godel transport endpoint: {reason}")]
    Protocol {
        /// The address called.
        addr: String,
        /// What was wrong.
        reason: String,
    },
    /// The address answered, authenticated, as a different node.
    #[error("{addr} is node {actual}, not node {expected}")]
    WrongPeer {
        /// The address called.
        addr: String,
        /// The node the caller meant.
        expected: NodeId,
        /// The node that answered.
        actual: NodeId,
    },
    /// The peer closed the connection before the response arrived. The
    /// request may or may not have been processed.
    #[error("node {peer} closed the connection mid-request")]
    Closed {
        /// The node called.
        peer: NodeId,
    },
    /// Another I/O error mid-request.
    #[error("I/O error talking to node {peer}: {source}")]
    Io {
        /// The node called.
        peer: NodeId,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A request or response is longer than `max_frame_bytes`.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's length in bytes.
        len: u64,
        /// The limit in bytes.
        max: u32,
    },
    /// The [`super::TransportConfig`] is unusable; every problem is listed.
    #[error("invalid transport config: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
}

impl TransportError {
    /// Whether the same call may succeed if tried again later (transient
    /// network trouble), as opposed to a misconfiguration or a request that
    /// can never fit.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::Closed { .. } => true,
            Self::Io { .. } => true,
            Self::Auth { .. }
            | Self::Tls { .. }
            | Self::Version { .. }
            | Self::Protocol { .. }
            | Self::WrongPeer { .. }
            | Self::FrameTooLarge { .. }
            | Self::InvalidConfig(_) => false,
        }
    }

    /// A stable snake_case name for logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::Timeout { .. } => "timeout",
            Self::Auth { .. } => "auth",
            Self::Tls { .. } => "tls",
            Self::Version { .. } => "version",
            Self::Protocol { .. } => "protocol",
            Self::WrongPeer { .. } => "wrong_peer",
            Self::Closed { .. } => "closed",
            Self::Io { .. } => "io",
            Self::FrameTooLarge { .. } => "frame_too_large",
            Self::InvalidConfig(_) => "invalid_config",
        }
    }
}
