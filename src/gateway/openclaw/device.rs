//! The node's OpenClaw device identity: an Ed25519 key, kept in a file
//! (created on first use, mode 0600), that signs each handshake's challenge.
//!
//! What the gateway checks (PROTOCOL.md 5.2): `device.id` is the lowercase
//! hex SHA-256 of the raw 32-byte public key; `publicKey` and `signature`
//! are base64url without padding; the signed bytes are the `|`-joined
//! `v3|id|client id|client mode|role|scopes|signedAt|token|nonce|platform|family`.

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use super::super::{DriverError, Result};

/// A device identity: the signing key and the id derived from it.
pub(crate) struct Device {
    key: SigningKey,
    id: String,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").field("id", &self.id).finish()
    }
}

/// What one handshake signs, besides the device id.
pub(crate) struct Proof<'a> {
    pub client_id: &'a str,
    pub client_mode: &'a str,
    pub role: &'a str,
    pub scopes: &'a [&'a str],
    pub signed_at: u64,
    pub token: &'a str,
    pub nonce: &'a str,
    pub platform: &'a str,
}

impl Device {
    /// A device from a 32-byte secret.
    pub(crate) fn from_secret(secret: [u8; 32]) -> Device {
        let key = SigningKey::from_bytes(&secret);
        let id = hex(&Sha256::digest(key.verifying_key().as_bytes()));
        Device { key, id }
    }

    /// A fresh device that lives only in memory (no data directory and no
    /// configured key file: tools and tests).
    pub(crate) fn ephemeral() -> Device {
        Device::from_secret(rand::random())
    }

    /// Loads the key in `path`, or creates it (0600, parent directories
    /// included) when the file does not exist.
    pub(crate) fn load_or_create(path: &Path) -> Result<Device> {
        let fail = |reason: String| DriverError::Secret {
            reference: format!("file:{}", path.display()),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                return parse_secret(text.trim())
                    .map(Device::from_secret)
                    .map_err(fail);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let secret: [u8; 32] = rand::random();
        let created = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
        };
        match created {
            Ok(mut f) => {
                f.write_all(format!("{}\n", hex(&secret)).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| fail(e.to_string()))?;
                tracing::info!(path = %path.display(), "created the node's OpenClaw device key");
                Ok(Device::from_secret(secret))
            }
            // Another driver of this node created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
                parse_secret(text.trim())
                    .map(Device::from_secret)
                    .map_err(fail)
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The device id (hex SHA-256 of the public key).
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The raw public key, base64url.
    pub(crate) fn public_key(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.verifying_key().as_bytes())
    }

    /// The text a handshake signs.
    pub(crate) fn payload(&self, p: &Proof<'_>) -> String {
        [
            "v3",
            &self.id,
            p.client_id,
            p.client_mode,
            p.role,
            &p.scopes.join(","),
            &p.signed_at.to_string(),
            p.token,
            p.nonce,
            &p.platform.trim().to_lowercase(),
            "",
        ]
        .join("|")
    }

    /// The signature of [`Device::payload`], base64url.
    pub(crate) fn sign(&self, p: &Proof<'_>) -> String {
        URL_SAFE_NO_PAD.encode(self.key.sign(self.payload(p).as_bytes()).to_bytes())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_secret(text: &str) -> std::result::Result<[u8; 32], String> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("not a device key (64 hex digits expected)".into());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| "not a device key (64 hex digits expected)".to_owned())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};

    #[test]
    fn key_file_is_created_once_and_signatures_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/device.key");
        let a = Device::load_or_create(&path).unwrap();
        let b = Device::load_or_create(&path).unwrap();
        assert_eq!(a.id(), b.id(), "the same key is loaded again");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let proof = Proof {
            client_id: "gateway-client",
            client_mode: "backend",
            role: "operator",
            scopes: &["operator.read", "operator.write"],
            signed_at: 17,
            token: "t",
            nonce: "n",
            platform: "Linux",
        };
        assert_eq!(
            a.payload(&proof),
            format!(
                "v3|{}|gateway-client|backend|operator|operator.read,operator.write|17|t|n|linux|",
                a.id()
            )
        );
        let pk: [u8; 32] = URL_SAFE_NO_PAD
            .decode(a.public_key())
            .unwrap()
            .try_into()
            .unwrap();
        let sig: [u8; 64] = URL_SAFE_NO_PAD
            .decode(a.sign(&proof))
            .unwrap()
            .try_into()
            .unwrap();
        let vk = VerifyingKey::from_bytes(&pk).unwrap();
        assert_eq!(hex(&Sha256::digest(pk)), a.id());
        vk.verify(a.payload(&proof).as_bytes(), &Signature::from_bytes(&sig))
            .unwrap();
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        std::fs::write(&path, "not hex").unwrap();
        let e = Device::load_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("device.key"), "{e}");
        assert!(e.to_string().contains("64 hex digits"), "{e}");
    }
}
