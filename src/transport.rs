//! The node-to-node transport: authenticated request/response over TCP for
//! Raft RPCs (append entries, vote, install snapshot) and write forwarding.
//!
//! This layer moves opaque bytes. A [`Client`] sends one request to a peer and
//! waits for one response; [`serve`] accepts connections and hands each
//! request to a [`Handler`]. The typed layer above encodes with
//! [`crate::codec`] and maps [`TransportError`]s onto openraft's errors:
//! `Unreachable` to `Unreachable` (openraft backs off), `Timeout` to
//! `Timeout`, the rest to a network error; [`TransportError::is_retryable`]
//! says which failures are transient. Raft never rides on ractor_cluster
//! (see DESIGN.md "Writes from any node").
//!
//! # Wire format
//!
//! All integers are big-endian. With `[cluster.tls]` every byte below
//! travels inside mutual TLS (see [`crate::tls`]): the dialer checks that the
//! listener's certificate chains to the cluster CA and names the address
//! dialed, the listener requires a client certificate from the same CA, and
//! only then does the secret handshake start. A connection starts with a
//! handshake of fixed-size messages, then carries frames.
//!
//! ```text
//! hello   (45 B, both ways)  magic "GDLN" (4) | version u8 | node id u64 | nonce [32]
//! C -> S  hello(client)
//! S -> C  hello(server)           (on a version mismatch: only magic+version, then close)
//! C -> S  client MAC [32]         HMAC-SHA256(secret, "godel-transport/v1/client" | hello(C) | hello(S))
//! S -> C  verdict u8              1 accepted, 2 authentication failed, 3 refused (peer blocked)
//! S -> C  server MAC [32]         only after "accepted":
//!                                 HMAC-SHA256(secret, "godel-transport/v1/server" | hello(C) | hello(S))
//! frame                           length u32 | payload [length]      (length <= max_frame_bytes)
//! C -> S  request frame, S -> C response frame, repeated; one request at a time.
//! ```
//!
//! The first five bytes each side sends, magic and version, keep this layout
//! in every future version, so a mismatched peer always gets a clear
//! [`TransportError::Version`] instead of garbage.
//!
//! # Invariants
//!
//! - **The secret never crosses the wire.** Each side proves it knows the
//!   cluster secret by a MAC over both fresh 32-byte nonces and both node ids;
//!   MACs are compared in constant time (`hmac`'s `verify_slice`). The client
//!   proves itself first, so the server never produces a MAC for an
//!   unauthenticated peer, and the two directions use distinct labels, so a
//!   MAC cannot be reflected. The node ids ride inside the MACed hellos: the
//!   `peer` a [`Handler`] sees is authenticated, and a client whose address
//!   answers as another node fails with [`TransportError::WrongPeer`].
//! - **Bounded memory per frame.** A length above `max_frame_bytes` is an
//!   error that closes the connection before anything is allocated; a frame
//!   within the limit is read into a buffer that grows as bytes arrive, so a
//!   peer must send the bytes it claims.
//! - **A connection is reused only after a clean round trip.** Any error,
//!   timeout or cancellation drops it (the caller's future owns it), and the
//!   next call connects afresh. Idle connections are probed for a peer hangup
//!   before reuse (one non-waiting read, through TLS when it is on), so a
//!   peer that restarted (closing its end) costs no failed
//!   call; one that vanished without closing costs one failed call.
//! - **Everything is bounded** by [`TransportConfig`]: inbound connections
//!   (and so in-flight handlers, one per connection), outbound connections and
//!   idle connections per peer, frame size, handshake, idle and shutdown time.
//! - **Every task has an owner.** [`serve`] owns one task per connection in a
//!   `TaskTracker`; on shutdown it stops accepting, idle connections close at
//!   once, in-flight handlers get `shutdown_grace` to finish, and `serve`
//!   returns once every connection task has ended. The client spawns nothing.
//! - **No secret in logs.** [`Secret`]'s `Debug` is redacted, so is every
//!   struct that holds it.
//!
//! # Fault injection
//!
//! [`Faults`] is a shared set of blocked node ids for chaos drills, handed to
//! both the client and the server of a node. A call to a blocked peer fails at
//! once with [`TransportError::Unreachable`]; the server refuses the handshake
//! of a blocked peer and closes a connection on which a blocked peer sends a
//! request (or would receive a response). An empty set costs one atomic load.
//!
//! # Shortcuts taken on purpose
//!
//! - **Encryption only with `[cluster.tls]`.** Without it, frames after the
//!   handshake carry no MAC and are not encrypted: an on-path attacker could
//!   read or alter them, so the cluster network must be private. With it,
//!   TLS protects every frame and a peer needs both a certificate from the
//!   cluster CA and the secret; a TLS failure is [`TransportError::Tls`]
//!   (not retryable: a certificate does not fix itself). The whole cluster
//!   runs TLS or none of it: a plaintext peer on a TLS port fails its
//!   handshake at once, and so does the reverse.
//! - **No automatic retry.** A request may have been processed when its
//!   connection dies, and forwarded writes are not all idempotent, so the
//!   caller decides (with [`TransportError::is_retryable`]).
//! - **Handlers must be cancel-safe.** The server drops a handler's future
//!   when its caller hangs up (for example after a client timeout) and when
//!   the shutdown grace elapses.
//! - **No per-frame streaming.** A snapshot travels as one frame, so
//!   `max_frame_bytes` must exceed the largest snapshot chunk the Raft layer
//!   sends.
//! - **The client's pool map keeps one entry per `(peer, address)` ever
//!   called.** Addresses come from the membership, so this grows only with
//!   membership changes.
//! - **Metrics** are not recorded yet: there is no metrics module to declare
//!   them in. The log lines carry the peer ids and addresses.

mod client;
mod config;
mod conn;
mod error;
mod faults;
mod handshake;
mod server;
mod wire;

pub use client::Client;
pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNS_PER_PEER, DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_IDLE_PER_PEER,
    DEFAULT_SHUTDOWN_GRACE, MIN_SECRET_BYTES, Secret, TransportConfig,
};
pub use error::{Result, TransportError};
pub use faults::Faults;
pub use handshake::{PROTOCOL_MAGIC, PROTOCOL_VERSION};
pub use server::{Handler, serve};
