//! JWT verification: HS256 only, with the configured issuer and audience.
//!
//! Tokens are verified with `jsonwebtoken`, pinned to HS256 (a token whose
//! header names any other algorithm, `none` included, is refused before
//! any signature check), with `exp` required and `nbf` checked, both with
//! the configured leeway (at most 60 s). Godel never issues JWTs: an
//! identity provider signs them with the shared secret in
//! `auth.jwt_secret_file`. During a rotation the previous secret
//! (`auth.jwt_previous_secret_file`) is tried when the current one does not
//! match.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthConfig, MIN_JWT_SECRET_BYTES, read_secret_file};
use crate::fsm::Role;

/// The claims Godel reads.
#[derive(Clone, Debug, Deserialize)]
pub struct Claims {
    /// Who: recorded as the actor `jwt:<sub>`.
    pub sub: String,
    /// `admin`, `operator`, `developer` or `viewer`.
    pub role: String,
    /// The tenant the token acts in.
    pub tenant_id: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// An id that can be revoked (`POST /api/v1/jwt/revocations`).
    #[serde(default)]
    pub jti: Option<String>,
}

/// Verifies tokens against the configured secret(s).
pub struct JwtVerifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
    leeway_s: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtVerifier { .. }")
    }
}

impl JwtVerifier {
    /// Reads the secrets `auth` names; `None` when JWTs are not configured.
    /// A secret shorter than [`MIN_JWT_SECRET_BYTES`] is an error naming the
    /// key, so the node refuses to start.
    pub fn from_config(auth: &AuthConfig) -> anyhow::Result<Option<JwtVerifier>> {
        let Some(current) = &auth.jwt_secret_file else {
            return Ok(None);
        };
        let mut keys = Vec::new();
        for (key, path) in [
            ("auth.jwt_secret_file", Some(current)),
            (
                "auth.jwt_previous_secret_file",
                auth.jwt_previous_secret_file.as_ref(),
            ),
        ] {
            let Some(path) = path else { continue };
            let secret = read_secret_file(key, path)?;
            if secret.len() < MIN_JWT_SECRET_BYTES {
                anyhow::bail!(
                    "{key}: the secret in {} is {} bytes; HS256 needs at least {MIN_JWT_SECRET_BYTES}",
                    path.display(),
                    secret.len()
                );
            }
            keys.push(
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| anyhow::anyhow!("{key}: unusable secret: {e}"))?,
            );
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = auth.jwt_leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[auth.jwt_issuer.as_str()]);
        validation.set_audience(&[auth.jwt_audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Ok(Some(JwtVerifier {
            keys,
            validation,
            leeway_s: auth.jwt_leeway.as_secs(),
        }))
    }

    /// The token's claims, or why it is refused (for the 401's message:
    /// says what is wrong, never echoes the token).
    pub fn verify(&self, token: &str) -> Result<(Claims, Role), String> {
        let mut last = String::from("no key");
        for key in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    let c = data.claims;
                    let role = c
                        .role
                        .parse::<Role>()
                        .map_err(|e| format!("claim `role`: {e}"))?;
                    if c.sub.is_empty() || c.sub.len() > 256 {
                        return Err("claim `sub` must be 1..=256 bytes".into());
                    }
                    crate::fsm::Tenant::from(c.tenant_id.as_str())
                        .validate()
                        .map_err(|p| format!("claim `tenant_id`: {p}"))?;
                    return Ok((c, role));
                }
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    last = "bad signature".into();
                }
                Err(e) => return Err(describe(e.kind())),
            }
        }
        Err(last)
    }

    /// How long past `exp` a token is still accepted, in seconds.
    pub fn leeway_s(&self) -> u64 {
        self.leeway_s
    }
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "algorithm not accepted (only HS256)".into()
        }
        ErrorKind::MissingRequiredClaim(c) => format!("claim `{c}` missing"),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::Json(_) => {
            "claims are not what Godel expects (sub, role, tenant_id, exp)".into()
        }
        _ => "malformed token".into(),
    }
}
