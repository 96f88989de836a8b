//! TLS for Godel's three listeners, from PEM files: mutual TLS between
//! nodes (the transport's `[cluster.tls]`, the fabric's `[fabric.tls]`) and
//! server-only TLS for the HTTP API (`api.tls_cert`, `api.tls_key`).
//!
//! Mutual TLS works both ways: the listener requires a client certificate
//! that chains to the CA, and the dialer checks the listener's certificate
//! against the name it dialed (the host of the peer's address, an IP or a
//! DNS name, which must be among the certificate's subject alternative
//! names). Every failure to load names the config key and the file, never
//! key material; a node whose files are unusable refuses to start rather
//! than fall back to plain TCP.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TlsFiles;

/// Both halves of a node's mutual TLS: what its listener accepts with and
/// what its dialer connects with.
#[derive(Clone)]
pub struct MutualTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for MutualTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MutualTls { .. }")
    }
}

impl MutualTls {
    /// Reads and checks the PEM files of the config table `table`
    /// (`cluster.tls`, `fabric.tls`).
    pub fn load(files: &TlsFiles, table: &str) -> anyhow::Result<MutualTls> {
        let certs = read_certs(&files.cert, &format!("{table}.cert"))?;
        let key = read_key(&files.key, &format!("{table}.key"))?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca, &format!("{table}.ca"))? {
            roots.add(ca).with_context(|| {
                format!("{table}.ca {}: not a CA certificate", files.ca.display())
            })?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder(roots.clone())
            .build()
            .with_context(|| format!("{table}.ca: cannot verify peers with it"))?;
        let server = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .with_context(|| {
                format!(
                    "{table}.cert {} and {table}.key {} do not make a usable pair",
                    files.cert.display(),
                    files.key.display()
                )
            })?;
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .with_context(|| {
                format!("{table}.cert/key cannot authenticate this node to its peers")
            })?;
        Ok(MutualTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// What the listener accepts with.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// What the dialer connects with.
    pub fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }
}

/// Server-only TLS (no client certificates): the HTTP API's.
pub fn server_only(cert: &Path, key: &Path, table: &str) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(cert, &format!("{table}.tls_cert"))?;
    let key_der = read_key(key, &format!("{table}.tls_key"))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!(
                "{table}.tls_cert {} and {table}.tls_key {} do not make a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client connector for a server-only TLS peer (an https API): the
/// system's roots, plus those of `extra_ca` (PEM) when given.
pub fn client_connector(extra_ca: Option<&Path>) -> anyhow::Result<TlsConnector> {
    let extra = match extra_ca {
        Some(path) => read_certs(path, "--ca-cert")?,
        None => Vec::new(),
    };
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .context("the system's TLS roots")?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name a dialer expects on the certificate of the peer at `addr`
/// (`host:port`, `[v6]:port`): its host, as an IP address or a DNS name.
pub fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let (host, _) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
}

fn read_key(path: &Path, field: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow!("{field} {}: no usable private key ({e})", path.display()))
}

fn read_certs(path: &Path, field: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("{field} {}: cannot read ({e})", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{field} {}: bad PEM ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "{field} {}: no CERTIFICATE block in the file",
            path.display()
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA and one node certificate for 127.0.0.1 it signed, as PEM files
    /// in `dir` (prefix `name`).
    pub(crate) fn issue(dir: &Path, name: &str) -> TlsFiles {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} ca"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let node_key = KeyPair::generate().unwrap();
        let node = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&node_key, &issuer)
            .unwrap();
        let tls = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        };
        std::fs::write(&tls.cert, node.pem()).unwrap();
        std::fs::write(&tls.key, node_key.serialize_pem()).unwrap();
        std::fs::write(&tls.ca, ca_cert.pem()).unwrap();
        tls
    }

    /// Whether a client with `client` can talk to a listener with `server`.
    async fn handshake(server: &MutualTls, client: &MutualTls) -> bool {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = server.acceptor();
        let serve = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.ok()?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            tls.write_all(&buf).await.ok()?;
            tls.flush().await.ok()?;
            Some(buf)
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = server_name(&addr.to_string()).unwrap();
        let talked = async {
            let mut tls = client.connector().connect(name, tcp).await.ok()?;
            tls.write_all(b"ping").await.ok()?;
            tls.flush().await.ok()?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            Some(buf)
        }
        .await;
        let served = serve.await.unwrap();
        talked == Some(*b"ping") && served == Some(*b"ping")
    }

    #[tokio::test]
    async fn peers_of_one_ca_talk_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ours = MutualTls::load(&issue(dir.path(), "ours"), "fabric.tls").unwrap();
        let theirs = MutualTls::load(&issue(dir.path(), "theirs"), "fabric.tls").unwrap();
        assert!(handshake(&ours, &ours).await, "same CA must connect");
        assert!(
            !handshake(&ours, &theirs).await,
            "a client from another CA must be refused"
        );
        assert!(
            !handshake(&theirs, &ours).await,
            "a listener from another CA must be refused"
        );
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = issue(dir.path(), "n");
        let missing = TlsFiles {
            cert: dir.path().join("nope.crt"),
            ..good.clone()
        };
        let e = MutualTls::load(&missing, "fabric.tls")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fabric.tls.cert") && e.contains("nope.crt"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let e = MutualTls::load(
            &TlsFiles {
                key: junk.clone(),
                ..good.clone()
            },
            "fabric.tls",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fabric.tls.key"), "{e}");
        let e = MutualTls::load(
            &TlsFiles {
                ca: junk,
                ..good.clone()
            },
            "fabric.tls",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("fabric.tls.ca") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        // A key that does not belong to the certificate.
        let other = issue(dir.path(), "other");
        let e = MutualTls::load(
            &TlsFiles {
                key: other.key,
                ..good
            },
            "fabric.tls",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("do not make a usable pair"), "{e}");
    }

    #[test]
    fn server_names_from_member_addresses() {
        assert!(matches!(
            server_name("127.0.0.1:7574"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:7574"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("node-2.internal:7574"),
            Some(ServerName::DnsName(_))
        ));
        assert!(server_name("nohost").is_none());
    }
}
