//! Calls a node makes to another node's HTTP API: the probe for a running
//! cluster at bootstrap, joins, and the relay of a leader transfer. They
//! speak https when this node's API does (`api.tls_cert`: the cluster's
//! API runs TLS on every node or on none) and then trust only `api.tls_ca`
//! if it is set, else the system's roots.

use anyhow::Context;

use crate::config::Config;

/// An HTTP client for peers' APIs and the scheme to reach them with.
#[derive(Clone, Debug)]
pub struct PeerApi {
    http: reqwest::Client,
    scheme: &'static str,
}

impl PeerApi {
    /// The client for this node's config (one per node: it pools its
    /// connections). Callers bound each call with `RequestBuilder::timeout`.
    pub fn new(config: &Config) -> anyhow::Result<PeerApi> {
        let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &config.api.tls_ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("api.tls_ca {}: cannot read", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("api.tls_ca {}: bad PEM", ca.display()))?;
            builder = builder.tls_certs_only(certs);
        }
        let scheme = if config.api.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(PeerApi {
            http: builder.build().context("HTTP client for peer APIs")?,
            scheme,
        })
    }

    /// The URL of `path` on the node whose API listens at `api_addr`.
    pub fn url(&self, api_addr: &str, path: &str) -> String {
        format!("{}://{api_addr}{path}", self.scheme)
    }

    /// The client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}
