//! Mutual TLS for fabric sessions (`[fabric.tls]`).
//!
//! Every node presents the certificate in `cert` (with its key in `key`)
//! and accepts only peers whose certificate chains to the CA in `ca`, in
//! both directions: the listener requires a client certificate, and the
//! dialer checks the listener's certificate against the name it dialed (the
//! host part of the member's `raft_addr`, an IP address or a DNS name, which
//! must therefore be among the certificate's subject alternative names).
//! The cookie handshake still runs inside the TLS session, so a peer needs
//! both a certificate from the cluster's CA and the cluster secret.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use ractor_cluster::IncomingEncryptionMode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::FabricTls;

/// The two halves of a node's fabric TLS: what its listener accepts with and
/// what its dialer connects with.
#[derive(Clone)]
pub struct FabricTlsConfig {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for FabricTlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FabricTlsConfig { .. }")
    }
}

impl FabricTlsConfig {
    /// Reads and checks the PEM files `tls` names. Every failure names the
    /// file and what is wrong with it; key material is never printed.
    pub fn load(tls: &FabricTls) -> anyhow::Result<FabricTlsConfig> {
        let certs = read_certs(&tls.cert, "fabric.tls.cert")?;
        let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| {
            anyhow!(
                "fabric.tls.key {}: no usable private key ({e})",
                tls.key.display()
            )
        })?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&tls.ca, "fabric.tls.ca")? {
            roots.add(ca).with_context(|| {
                format!("fabric.tls.ca {}: not a CA certificate", tls.ca.display())
            })?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder(roots.clone())
            .build()
            .context("fabric.tls.ca: cannot verify peers with it")?;
        let server = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .with_context(|| {
                format!(
                    "fabric.tls.cert {} and fabric.tls.key {} do not make a usable pair",
                    tls.cert.display(),
                    tls.key.display()
                )
            })?;
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .context("fabric.tls.cert/key cannot authenticate this node to its peers")?;
        Ok(FabricTlsConfig {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// What the node server accepts sessions with.
    pub fn incoming(&self) -> IncomingEncryptionMode {
        IncomingEncryptionMode::Tls(self.acceptor.clone())
    }

    /// What the dialer connects with.
    pub fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }
}

/// The name a dialer expects on the certificate of the peer at `addr`
/// (`host:port`, `[v6]:port`): its host, as an IP address or a DNS name.
pub fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let (host, _) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
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
    fn issue(dir: &Path, name: &str) -> FabricTls {
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
        let tls = FabricTls {
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
    async fn handshake(server: &FabricTlsConfig, client: &FabricTlsConfig) -> bool {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = server.acceptor.clone();
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
            let mut tls = client.connector.connect(name, tcp).await.ok()?;
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
        let ours = FabricTlsConfig::load(&issue(dir.path(), "ours")).unwrap();
        let theirs = FabricTlsConfig::load(&issue(dir.path(), "theirs")).unwrap();
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
        let missing = FabricTls {
            cert: dir.path().join("nope.crt"),
            ..good.clone()
        };
        let e = FabricTlsConfig::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("fabric.tls.cert") && e.contains("nope.crt"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let e = FabricTlsConfig::load(&FabricTls {
            key: junk.clone(),
            ..good.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("fabric.tls.key"), "{e}");
        let e = FabricTlsConfig::load(&FabricTls {
            ca: junk,
            ..good.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("fabric.tls.ca") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        // A key that does not belong to the certificate.
        let other = issue(dir.path(), "other");
        let e = FabricTlsConfig::load(&FabricTls {
            key: other.key,
            ..good
        })
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
