//! A node started on a data directory prepared before its first start
//! (`godel restore` made it): the node holds a cluster already, so it
//! gets no member list and bootstraps nothing.

use std::path::Path;
use std::time::Instant;

use super::{Cluster, NodeProc, SECRET, START_TIMEOUT, toml_str};

impl Cluster {
    /// Writes node `id`'s config (the harness's tables plus `extra`, the
    /// cluster secret, no members), runs `prepare` on the node (its
    /// `config_path` and `data_dir` are set; nothing runs yet), then starts
    /// it and waits until it leads.
    pub async fn start_prepared(id: u64, extra: &str, prepare: impl FnOnce(&NodeProc)) -> Cluster {
        let mut p = NodeProc::new(id);
        p.extra = extra.to_owned();
        p.write_config(&format!("[cluster]\nsecret = {}\n", toml_str(SECRET)));
        prepare(&p);
        p.spawn();
        let c = Cluster {
            nodes: vec![p],
            started: Instant::now(),
            api_ca: None,
        };
        c.leader_within(START_TIMEOUT).await;
        eprintln!("[harness] prepared node {id} leads");
        c
    }
}

impl NodeProc {
    /// The node's config file (`godel serve --config` reads it).
    pub fn config_path(&self) -> &Path {
        &self.config
    }
}
