//! Mutual authentication: hellos with fresh nonces, then HMAC-SHA256 proofs.
//!
//! See the wire format in the module essay. Both functions work on any byte
//! stream so they can be tested over an in-memory pipe; the caller bounds them
//! with a timeout.

use std::io;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::raft::NodeId;

use super::config::Secret;
use super::faults::Faults;

/// The four bytes every Godel transport connection starts with, both ways.
pub const PROTOCOL_MAGIC: [u8; 4] = *b"GDLN";
/// The protocol version this build speaks; sent right after the magic.
pub const PROTOCOL_VERSION: u8 = 1;

const PREFIX_LEN: usize = PROTOCOL_MAGIC.len() + 1;
const NONCE_LEN: usize = 32;
const HELLO_LEN: usize = PREFIX_LEN + size_of::<NodeId>() + NONCE_LEN;
const MAC_LEN: usize = 32;
const CLIENT_LABEL: &[u8] = b"godel-transport/v1/client";
const SERVER_LABEL: &[u8] = b"godel-transport/v1/server";
const VERDICT_ACCEPTED: u8 = 1;
const VERDICT_AUTH_FAILED: u8 = 2;
const VERDICT_REFUSED: u8 = 3;
/// Most bytes read and discarded from a peer of another version before
/// closing: 4 KiB (more than any hello).
const VERSION_REJECT_DRAIN_BYTES: u64 = 4 * 1024;

type Hello = [u8; HELLO_LEN];
type HmacSha256 = Hmac<Sha256>;

/// Why the client side of a handshake failed.
#[derive(Debug)]
pub(super) enum ClientError {
    /// The connection broke off (includes a server at its connection limit).
    Io(io::Error),
    /// The peer's first bytes are not [`PROTOCOL_MAGIC`].
    BadMagic,
    /// The peer speaks this other version.
    Version(u8),
    /// The server rejected our MAC.
    Rejected,
    /// The server's MAC is wrong: it does not know the secret.
    ServerUnproven,
    /// The server refused us after authentication (it blocks us).
    Refused,
    /// An unknown verdict byte.
    BadVerdict(u8),
    /// The server authenticated as this node, not the expected one.
    WrongPeer(NodeId),
}

/// Why the server side of a handshake failed.
#[derive(Debug)]
pub(super) enum ServerError {
    /// The connection broke off.
    Io(io::Error),
    /// The peer's first bytes are not [`PROTOCOL_MAGIC`].
    BadMagic,
    /// The peer speaks this other version (it was told ours).
    Version(u8),
    /// The peer's MAC is wrong; it claimed to be this node.
    AuthFailed(NodeId),
    /// The authenticated peer is blocked by fault injection.
    Blocked(NodeId),
}

/// What went wrong reading the peer's hello.
enum HelloError {
    Io(io::Error),
    BadMagic,
    Version(u8),
}

/// Runs the client side: proves our identity, checks the server's, and that
/// the server is `expected`.
pub(super) async fn client<S>(
    stream: &mut S,
    secret: &Secret,
    own_id: NodeId,
    expected: NodeId,
) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ours = hello(own_id);
    stream.write_all(&ours).await.map_err(ClientError::Io)?;
    let (theirs, server_id) = read_hello(stream).await.map_err(|e| match e {
        HelloError::Io(e) => ClientError::Io(e),
        HelloError::BadMagic => ClientError::BadMagic,
        HelloError::Version(v) => ClientError::Version(v),
    })?;
    let proof = mac(secret, CLIENT_LABEL, &ours, &theirs)
        .finalize()
        .into_bytes();
    stream.write_all(&proof).await.map_err(ClientError::Io)?;
    match stream.read_u8().await.map_err(ClientError::Io)? {
        VERDICT_ACCEPTED => {}
        VERDICT_AUTH_FAILED => return Err(ClientError::Rejected),
        VERDICT_REFUSED => return Err(ClientError::Refused),
        other => return Err(ClientError::BadVerdict(other)),
    }
    let mut server_proof = [0u8; MAC_LEN];
    stream
        .read_exact(&mut server_proof)
        .await
        .map_err(ClientError::Io)?;
    mac(secret, SERVER_LABEL, &ours, &theirs)
        .verify_slice(&server_proof)
        .map_err(|_| ClientError::ServerUnproven)?;
    if server_id != expected {
        return Err(ClientError::WrongPeer(server_id));
    }
    Ok(())
}

/// Runs the server side: checks the client's proof, refuses blocked peers,
/// then proves our identity. Returns the authenticated client node id.
pub(super) async fn server<S>(
    stream: &mut S,
    secret: &Secret,
    own_id: NodeId,
    faults: &Faults,
) -> Result<NodeId, ServerError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (theirs, client_id) = match read_hello(stream).await {
        Ok(hello) => hello,
        Err(HelloError::Io(e)) => return Err(ServerError::Io(e)),
        Err(HelloError::BadMagic) => return Err(ServerError::BadMagic),
        Err(HelloError::Version(v)) => {
            tell_version_and_close(stream).await;
            return Err(ServerError::Version(v));
        }
    };
    let ours = hello(own_id);
    stream.write_all(&ours).await.map_err(ServerError::Io)?;
    let mut proof = [0u8; MAC_LEN];
    stream
        .read_exact(&mut proof)
        .await
        .map_err(ServerError::Io)?;
    if mac(secret, CLIENT_LABEL, &theirs, &ours)
        .verify_slice(&proof)
        .is_err()
    {
        let _ = stream.write_all(&[VERDICT_AUTH_FAILED]).await;
        return Err(ServerError::AuthFailed(client_id));
    }
    if faults.is_blocked(client_id) {
        let _ = stream.write_all(&[VERDICT_REFUSED]).await;
        return Err(ServerError::Blocked(client_id));
    }
    let server_proof = mac(secret, SERVER_LABEL, &theirs, &ours)
        .finalize()
        .into_bytes();
    let mut reply = [0u8; 1 + MAC_LEN];
    reply[0] = VERDICT_ACCEPTED;
    reply[1..].copy_from_slice(&server_proof);
    stream.write_all(&reply).await.map_err(ServerError::Io)?;
    Ok(client_id)
}

/// Tells a peer of another version ours, so it can report the mismatch.
///
/// Closing with the rest of its hello unread would make the kernel reset the
/// connection, and the peer might see the reset instead of our version; so
/// this half-closes and reads what the peer still sends (at most
/// [`VERSION_REJECT_DRAIN_BYTES`]) until it closes too.
async fn tell_version_and_close<S>(stream: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if stream.write_all(&prefix()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut rest = (&mut *stream).take(VERSION_REJECT_DRAIN_BYTES);
    let _ = tokio::io::copy(&mut rest, &mut tokio::io::sink()).await;
}

fn prefix() -> [u8; PREFIX_LEN] {
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[..PROTOCOL_MAGIC.len()].copy_from_slice(&PROTOCOL_MAGIC);
    prefix[PROTOCOL_MAGIC.len()] = PROTOCOL_VERSION;
    prefix
}

/// Our hello: magic, version, node id and a fresh nonce from the OS-seeded
/// CSPRNG (`rand`'s thread generator, ChaCha12).
fn hello(own_id: NodeId) -> Hello {
    let mut hello = [0u8; HELLO_LEN];
    hello[..PREFIX_LEN].copy_from_slice(&prefix());
    let id_end = PREFIX_LEN + size_of::<NodeId>();
    hello[PREFIX_LEN..id_end].copy_from_slice(&own_id.to_be_bytes());
    rand::fill(&mut hello[id_end..]);
    hello
}

/// Reads the peer's hello, checking the prefix before the rest so that a peer
/// of another version (whose hello may be longer) is recognised.
async fn read_hello<S>(stream: &mut S) -> Result<(Hello, NodeId), HelloError>
where
    S: AsyncRead + Unpin,
{
    let mut hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut hello[..PREFIX_LEN])
        .await
        .map_err(HelloError::Io)?;
    if hello[..PROTOCOL_MAGIC.len()] != PROTOCOL_MAGIC {
        return Err(HelloError::BadMagic);
    }
    let version = hello[PROTOCOL_MAGIC.len()];
    if version != PROTOCOL_VERSION {
        return Err(HelloError::Version(version));
    }
    stream
        .read_exact(&mut hello[PREFIX_LEN..])
        .await
        .map_err(HelloError::Io)?;
    let mut id = [0u8; size_of::<NodeId>()];
    id.copy_from_slice(&hello[PREFIX_LEN..PREFIX_LEN + size_of::<NodeId>()]);
    Ok((hello, NodeId::from_be_bytes(id)))
}

/// The MAC over the transcript, the client's hello always first.
fn mac(secret: &Secret, label: &[u8], client_hello: &Hello, server_hello: &Hello) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.expose())
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(label);
    mac.update(client_hello);
    mac.update(server_hello);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    async fn run(
        client_secret: &str,
        server_secret: &str,
        expected: NodeId,
        faults: Faults,
    ) -> (Result<(), ClientError>, Result<NodeId, ServerError>) {
        let (mut c, mut s) = tokio::io::duplex(1024);
        let (cs, ss) = (secret(client_secret), secret(server_secret));
        let server = tokio::spawn(async move { server(&mut s, &ss, 2, &faults).await });
        let client = client(&mut c, &cs, 1, expected).await;
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn matching_secrets_authenticate_both_ids() {
        let (c, s) = run("the-secret-is-long", "the-secret-is-long", 2, Faults::new()).await;
        c.unwrap();
        assert_eq!(s.unwrap(), 1);
    }

    #[tokio::test]
    async fn wrong_secret_fails_on_both_sides() {
        let (c, s) = run("the-secret-is-long", "another-secret-xx", 2, Faults::new()).await;
        assert!(matches!(c, Err(ClientError::Rejected)), "{c:?}");
        assert!(matches!(s, Err(ServerError::AuthFailed(1))), "{s:?}");
    }

    #[tokio::test]
    async fn blocked_client_is_refused_and_wrong_peer_is_noticed() {
        let faults = Faults::new();
        faults.block(1);
        let (c, s) = run("the-secret-is-long", "the-secret-is-long", 2, faults).await;
        assert!(matches!(c, Err(ClientError::Refused)), "{c:?}");
        assert!(matches!(s, Err(ServerError::Blocked(1))), "{s:?}");
        let (c, _) = run("the-secret-is-long", "the-secret-is-long", 9, Faults::new()).await;
        assert!(matches!(c, Err(ClientError::WrongPeer(2))), "{c:?}");
    }

    /// An impostor that accepts any client and answers with a made-up MAC.
    #[tokio::test]
    async fn impostor_server_is_detected() {
        let (mut c, mut s) = tokio::io::duplex(1024);
        let impostor = tokio::spawn(async move {
            let mut buf = [0u8; HELLO_LEN];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&hello(2)).await.unwrap();
            let mut proof = [0u8; MAC_LEN];
            s.read_exact(&mut proof).await.unwrap();
            s.write_all(&[VERDICT_ACCEPTED]).await.unwrap();
            s.write_all(&proof).await.unwrap(); // replays the client's own MAC
            s
        });
        let result = client(&mut c, &secret("the-secret-is-long"), 1, 2).await;
        assert!(
            matches!(result, Err(ClientError::ServerUnproven)),
            "{result:?}"
        );
        drop(impostor.await.unwrap());
    }

    #[tokio::test]
    async fn nonces_are_fresh() {
        assert_ne!(hello(1)[PREFIX_LEN + 8..], hello(1)[PREFIX_LEN + 8..]);
    }
}
