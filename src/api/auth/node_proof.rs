//! Node proofs: how a node that is not yet a member (or not yet sure there
//! is a cluster) calls another node's API with the cluster secret instead
//! of an API key.
//!
//! `Authorization: GodelNode <node id>.<unix ms>.<hex MAC>`, where the MAC
//! is HMAC-SHA256 under a key derived from the cluster secret (label
//! [`LABEL`]) over the method, the path, the node id, the time and the
//! SHA-256 of the body. A proof is accepted within [`WINDOW_MS`] of its
//! time and only for the two calls a node makes on its own: `GET
//! /api/v1/cluster` (is a cluster running?) and `POST /api/v1/cluster/join`.
//! Binding the body means an observed proof cannot join another node; a
//! replay inside the window can only repeat the same, idempotent join.

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Key derivation label.
pub const LABEL: &str = "godel-node-api/v1";
/// How far a proof's time may be from the receiver's clock: 60 s.
pub const WINDOW_MS: u64 = 60_000;
/// The `Authorization` scheme.
pub const SCHEME: &str = "GodelNode ";

/// The key proofs are made with, from the cluster secret.
pub fn key(cluster_secret: &[u8]) -> Vec<u8> {
    crate::transport::Secret::new(cluster_secret.to_vec())
        .derive_hex(LABEL)
        .into_bytes()
}

fn mac(key: &[u8], method: &str, path: &str, node: u64, at_ms: u64, body: &[u8]) -> [u8; 32] {
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(key)
        .expect("invariant: HMAC accepts keys of any length");
    let body_hash: [u8; 32] = Sha256::digest(body).into();
    m.update(format!("{LABEL}\n{method}\n{path}\n{node}\n{at_ms}\n").as_bytes());
    m.update(&body_hash);
    m.finalize().into_bytes().into()
}

/// The `Authorization` header value for a call by `node` at `at_ms`.
pub fn header(key: &[u8], method: &str, path: &str, node: u64, at_ms: u64, body: &[u8]) -> String {
    let mac: String = mac(key, method, path, node, at_ms, body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{SCHEME}{node}.{at_ms}.{mac}")
}

/// Checks a proof (the header value after [`SCHEME`]); returns the node id.
pub fn verify(
    key: &[u8],
    proof: &str,
    method: &str,
    path: &str,
    now_ms: u64,
    body: &[u8],
) -> Result<u64, &'static str> {
    let mut parts = proof.splitn(3, '.');
    let (Some(node), Some(at), Some(hex)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("malformed node proof");
    };
    let node: u64 = node.parse().map_err(|_| "malformed node proof")?;
    let at: u64 = at.parse().map_err(|_| "malformed node proof")?;
    if now_ms.abs_diff(at) > WINDOW_MS {
        return Err("node proof outside its time window (check the clocks)");
    }
    let given = decode_hex(hex).ok_or("malformed node proof")?;
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(key)
        .expect("invariant: HMAC accepts keys of any length");
    let body_hash: [u8; 32] = Sha256::digest(body).into();
    m.update(format!("{LABEL}\n{method}\n{path}\n{node}\n{at}\n").as_bytes());
    m.update(&body_hash);
    m.verify_slice(&given).map_err(|_| "bad node proof")?;
    Ok(node)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_binds_method_path_time_and_body() {
        let k = key(b"secret");
        let h = header(
            &k,
            "POST",
            "/api/v1/cluster/join",
            4,
            1_000_000,
            b"{\"id\":4}",
        );
        let p = h.strip_prefix(SCHEME).unwrap();
        let ok = |m, path, now, body: &[u8]| verify(&k, p, m, path, now, body);
        assert_eq!(
            ok("POST", "/api/v1/cluster/join", 1_000_500, b"{\"id\":4}"),
            Ok(4)
        );
        assert!(ok("POST", "/api/v1/cluster/join", 1_000_500, b"{\"id\":5}").is_err());
        assert!(ok("GET", "/api/v1/cluster/join", 1_000_500, b"{\"id\":4}").is_err());
        assert!(ok("POST", "/api/v1/cluster/leave", 1_000_500, b"{\"id\":4}").is_err());
        assert!(ok("POST", "/api/v1/cluster/join", 1_070_001, b"{\"id\":4}").is_err());
        assert!(
            verify(
                &key(b"other"),
                p,
                "POST",
                "/api/v1/cluster/join",
                1_000_000,
                b"{\"id\":4}"
            )
            .is_err()
        );
        assert!(verify(&k, "4.1000000.zz", "POST", "/", 1_000_000, b"").is_err());
    }
}
