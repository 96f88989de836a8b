//! Test certificates: a CA that signs node certificates into a directory,
//! as the PEM files `[cluster.tls]`, `[fabric.tls]` and `[api]` name.

use std::path::{Path, PathBuf};

use godel::config::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA that signs node certificates into a directory.
pub struct Ca {
    name: String,
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    /// A new CA named `<name> ca`, writing its files into `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} ca"));
        let cert = params.self_signed(&key).unwrap();
        Ca {
            name: name.to_owned(),
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A node certificate for `names` (IPs or DNS names), as files: the
    /// certificate, its key and the CA.
    pub fn issue(&self, node: &str, names: &[&str]) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let files = TlsFiles {
            cert: self.dir.join(format!("{}-{node}.crt", self.name)),
            key: self.dir.join(format!("{}-{node}.key", self.name)),
            ca: self.dir.join(format!("{}-ca.crt", self.name)),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, &self.pem).unwrap();
        files
    }
}
