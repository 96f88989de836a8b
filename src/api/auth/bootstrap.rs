//! The first admin key of a cluster that has never had one.
//!
//! Once the node sees current state (a read barrier passes) and the state
//! says no key was ever made, it proposes [`Command::BootstrapApiKey`],
//! which the state machine applies only while that is still true, so
//! however many nodes try, one key is made, once, ever.
//!
//! - With `auth.bootstrap_key_file`, every node proposes the key in that
//!   file (the operator made it; tests and compose files do this).
//! - Otherwise only the leader proposes, with a key it generates and
//!   writes to `<data_dir>/admin.key` (mode 0600) *before* proposing, so a
//!   crash in between leaves a key on disk that the next attempt reuses,
//!   never a committed key nobody holds. If another node's key won, the
//!   file written here is removed.
//!
//! The log names the file, never the key.

use std::path::PathBuf;
use std::time::Duration;

use crate::fsm::{ApiKeyId, Command, NewApiKey, Reply, Role, Tenant};
use crate::node::Node;

/// The file a generated bootstrap key is written to, in the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Pause between attempts while the cluster has no leader or quorum.
const RETRY: Duration = Duration::from_millis(300);

/// Where the bootstrap key comes from.
enum Source {
    /// `auth.bootstrap_key_file`: the operator's key.
    Configured(PathBuf),
    /// Generated here, into `<data_dir>/admin.key`.
    Generated(PathBuf),
}

/// Checks `auth.bootstrap_key_file`, if set: readable and an API key.
pub fn check_configured_key(config: &crate::config::Config) -> anyhow::Result<()> {
    if let Some(path) = &config.auth.bootstrap_key_file {
        let key = crate::config::read_secret_file("auth.bootstrap_key_file", path)?;
        if !super::is_key_shaped(&key) {
            anyhow::bail!(
                "auth.bootstrap_key_file {}: not an API key (dk_live_ or dk_test_ and at least 32 random bytes, base64url)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Makes the first admin key if the cluster never had one; returns once
/// some node did (or the node shuts down).
pub async fn bootstrap_admin_key(node: Node) {
    let source = match &node.config().auth.bootstrap_key_file {
        Some(p) => Source::Configured(p.clone()),
        None => Source::Generated(node.config().node.data_dir.join(ADMIN_KEY_FILE)),
    };
    let shutdown = node.shutdown_token().clone();
    loop {
        if node.read_barrier().await.is_ok() {
            if node.state().read(|s| s.auth().bootstrapped()) {
                return;
            }
            let mine = matches!(source, Source::Configured(_)) || node.is_leader();
            if mine {
                match attempt(&node, &source).await {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "bootstrap admin key: will retry"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One try; `Ok(true)` once the cluster has its first key.
async fn attempt(node: &Node, source: &Source) -> anyhow::Result<bool> {
    let (key, path, generated) = match source {
        Source::Configured(p) => (
            crate::config::read_secret_file("auth.bootstrap_key_file", p)?,
            p.clone(),
            false,
        ),
        Source::Generated(p) => (generated_key(p)?, p.clone(), true),
    };
    let new = NewApiKey {
        id: ApiKeyId("k_bootstrap".into()),
        name: "bootstrap admin".into(),
        role: Role::Admin,
        tenant: Tenant::from("default"),
        hash: super::hash_key(&key),
        prefix: super::key_prefix(&key),
        expires_at_ms: None,
        created_by: "bootstrap".into(),
    };
    let hash = new.hash;
    match node.write(Command::BootstrapApiKey(new)).await {
        Ok(Ok(Reply::ApiKey(_))) => {
            tracing::info!(
                file = %path.display(),
                "created the first admin API key; it is in this file (the CLI reads ./data/admin.key by itself)"
            );
            Ok(true)
        }
        Ok(Ok(_)) => {
            let ours = node.state().read(|s| s.auth().key_by_hash(&hash).is_some());
            if generated && !ours {
                let _ = std::fs::remove_file(&path);
            }
            Ok(true)
        }
        Ok(Err(r)) => anyhow::bail!("refused: {r}"),
        Err(e) => anyhow::bail!("{e}"),
    }
}

/// The key in `path` if a previous attempt left one, else a new one
/// written there (0600) first.
fn generated_key(path: &std::path::Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let key = text.trim();
        if super::is_key_shaped(key) {
            return Ok(key.to_owned());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let key = super::generate_key(false);
    crate::config::write_private_file(path, format!("{key}\n").as_bytes())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(key)
}
