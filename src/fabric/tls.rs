//! Mutual TLS for fabric sessions (`[fabric.tls]`), with the node's
//! shared TLS loading (`crate::tls`): the cookie handshake still runs inside
//! the TLS session, so a peer needs both a certificate from the cluster's
//! CA and the cluster secret.

use ractor_cluster::IncomingEncryptionMode;
use tokio_rustls::TlsConnector;

use crate::config::FabricTls;
use crate::tls::MutualTls;

pub use crate::tls::server_name;

/// The two halves of a node's fabric TLS.
#[derive(Clone, Debug)]
pub struct FabricTlsConfig(MutualTls);

impl FabricTlsConfig {
    /// Reads and checks the PEM files `tls` names; every failure names the
    /// `fabric.tls.*` key and the file.
    pub fn load(tls: &FabricTls) -> anyhow::Result<FabricTlsConfig> {
        MutualTls::load(tls, "fabric.tls").map(FabricTlsConfig)
    }

    /// What the node server accepts sessions with.
    pub fn incoming(&self) -> IncomingEncryptionMode {
        IncomingEncryptionMode::Tls(self.0.acceptor())
    }

    /// What the dialer connects with.
    pub fn connector(&self) -> TlsConnector {
        self.0.connector()
    }
}
