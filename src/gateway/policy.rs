//! What a node lets gateway drivers do: which programs run, in which
//! directories, which secrets resolve, which hosts are called. Built from
//! the node's own config (`[gateways]`, `[secrets]`, the data directory),
//! so a node runs only what its operator allowed, whatever the replicated
//! spec says.
//!
//! The same check runs twice: on the node that takes a registration (so a
//! refused spec never reaches the log, with every problem named) and on the
//! node that builds the driver (whose config may be stricter). Secret
//! references are checked a third time when they are read.

use std::path::{Component, Path, PathBuf};

use super::spec::{DriverSpec, GatewaySpec, SecretRef};
use super::{DriverError, Result};
use crate::config::Config;

/// The cluster secret's variable, never resolvable by a spec.
const CLUSTER_SECRET_VAR: &str = "GODEL_CLUSTER_SECRET";

/// What drivers on this node may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverPolicy {
    /// Programs a `command` gateway may run (absolute, matched exactly).
    pub programs: Vec<PathBuf>,
    /// Directories a `command` gateway's `working_dir` must sit under.
    pub working_dirs: Vec<PathBuf>,
    /// Hosts `http` and `openclaw` gateways may call (lower case); empty:
    /// any.
    pub hosts: Vec<String>,
    /// `{"env": NAME}` resolves only NAMEs with this prefix.
    pub env_prefix: String,
    /// `{"file": PATH}` resolves only under this directory; none: never.
    pub secrets_dir: Option<PathBuf>,
    /// Where node-wide driver files (the OpenClaw device key) must live.
    pub data_dir: Option<PathBuf>,
}

impl Default for DriverPolicy {
    /// The closed default, as a node with no config has it: no program, no
    /// secret file, env secrets with the `GODEL_SECRET_` prefix, any host.
    fn default() -> Self {
        DriverPolicy::from_config(&Config::default())
    }
}

impl DriverPolicy {
    /// The policy `config` sets.
    pub fn from_config(config: &Config) -> Self {
        let g = &config.gateways;
        DriverPolicy {
            programs: g.command.allow.clone(),
            working_dirs: g.command.working_dirs.clone(),
            hosts: g
                .allow_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            env_prefix: config.secrets.env_prefix.clone(),
            secrets_dir: config.secrets.dir.clone(),
            data_dir: Some(config.node.data_dir.clone()),
        }
    }

    /// Every problem with running `spec` here, each starting with the
    /// field and naming the config key that decides it.
    pub fn problems(&self, spec: &GatewaySpec) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(m) = &spec.managed {
            if let Some(program) = m.command.first() {
                self.check_program_at(&mut p, "managed.command", program);
            }
            if let Some(dir) = &m.working_dir {
                self.check_working_dir(&mut p, dir);
            }
        }
        match &spec.driver {
            DriverSpec::Sim(_) => {}
            DriverSpec::Command(c) => {
                self.check_program(&mut p, &c.program);
                if let Some(dir) = &c.working_dir {
                    self.check_working_dir(&mut p, dir);
                }
            }
            DriverSpec::Http(h) => {
                self.check_host(&mut p, "driver.url", &h.url);
                if let Some(u) = &h.health_url {
                    self.check_host(&mut p, "driver.health_url", u);
                }
                if let Some(r) = &h.auth_header {
                    self.check_secret(&mut p, "driver.auth_header", r);
                }
            }
            DriverSpec::Openclaw(o) => {
                self.check_host(&mut p, "driver.url", &o.url);
                self.check_secret(&mut p, "driver.token", &o.token);
                if let Some(key) = &o.device_key {
                    self.check_device_key(&mut p, key);
                }
            }
        }
        p
    }

    /// `Ok` if `spec` may run here, else every problem.
    pub fn check(&self, spec: &GatewaySpec) -> Result<()> {
        let p = self.problems(spec);
        if p.is_empty() {
            Ok(())
        } else {
            Err(DriverError::InvalidSpec(p))
        }
    }

    fn check_program(&self, p: &mut Vec<String>, program: &str) {
        self.check_program_at(p, "driver.program", program);
    }

    /// A program a gateway runs (a `command` driver's, a managed gateway's
    /// process), named by `field`.
    fn check_program_at(&self, p: &mut Vec<String>, field: &str, program: &str) {
        if self.programs.is_empty() {
            p.push(format!(
                "{field}: `{program}`: running programs is disabled on this node; \
                 list the programs gateways may run in [gateways.command] allow"
            ));
        } else if !Path::new(program).is_absolute() {
            p.push(format!(
                "{field}: `{program}` must be an absolute path listed in [gateways.command] allow"
            ));
        } else if !self.programs.iter().any(|a| a.as_os_str() == program) {
            p.push(format!(
                "{field}: `{program}` is not in this node's [gateways.command] allow list"
            ));
        }
    }

    fn check_working_dir(&self, p: &mut Vec<String>, dir: &Path) {
        if !dir.is_absolute() || has_parent_step(dir) {
            p.push(format!(
                "driver.working_dir: `{}` must be an absolute path without `..`",
                dir.display()
            ));
        } else if !self.working_dirs.iter().any(|root| dir.starts_with(root)) {
            p.push(format!(
                "driver.working_dir: `{}` is not under any of this node's [gateways.command] working_dirs",
                dir.display()
            ));
        }
    }

    fn check_host(&self, p: &mut Vec<String>, field: &str, url: &str) {
        if self.hosts.is_empty() {
            return;
        }
        let Some(host) = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        else {
            return; // not a URL: `validate` names it
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if !self
            .hosts
            .iter()
            .any(|h| h.trim_start_matches('[').trim_end_matches(']') == bare)
        {
            p.push(format!(
                "{field}: host `{host}` is not in this node's [gateways] allow_hosts"
            ));
        }
    }

    fn check_secret(&self, p: &mut Vec<String>, field: &str, r: &SecretRef) {
        if let Err(why) = self.secret_allowed(r) {
            p.push(format!("{field}: {why}"));
        }
    }

    /// Whether a reference may be read here; why not, naming the config key.
    pub(super) fn secret_allowed(&self, r: &SecretRef) -> std::result::Result<(), String> {
        match r {
            SecretRef::Env(name) if name == CLUSTER_SECRET_VAR => Err(format!(
                "`{name}` is the cluster secret and never resolves for a gateway"
            )),
            SecretRef::Env(name) if !name.starts_with(&self.env_prefix) => Err(format!(
                "`{name}` does not start with [secrets] env_prefix `{}`",
                self.env_prefix
            )),
            SecretRef::Env(_) => Ok(()),
            SecretRef::File(path) => match &self.secrets_dir {
                None => Err(format!(
                    "`{}`: file secrets are disabled on this node; set [secrets] dir",
                    path.display()
                )),
                Some(dir)
                    if !path.is_absolute() || has_parent_step(path) || !path.starts_with(dir) =>
                {
                    Err(format!(
                        "`{}` must be an absolute path without `..` under [secrets] dir `{}`",
                        path.display(),
                        dir.display()
                    ))
                }
                Some(_) => Ok(()),
            },
        }
    }

    /// The file a `{"file"}` reference may be read from: the path with
    /// links resolved, still under `[secrets] dir` (so a link placed there
    /// cannot point elsewhere).
    pub(super) fn secret_file(&self, path: &Path) -> std::result::Result<PathBuf, String> {
        let dir = self
            .secrets_dir
            .as_ref()
            .ok_or("file secrets are disabled on this node; set [secrets] dir")?;
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("[secrets] dir `{}`: {e}", dir.display()))?;
        let real = path.canonicalize().map_err(|e| e.to_string())?;
        if !real.starts_with(&dir) {
            return Err(format!(
                "resolves to `{}`, outside [secrets] dir `{}`",
                real.display(),
                dir.display()
            ));
        }
        Ok(real)
    }

    fn check_device_key(&self, p: &mut Vec<String>, key: &Path) {
        let under = self
            .data_dir
            .as_ref()
            .is_some_and(|d| key.starts_with(d) && !has_parent_step(key));
        if !under {
            p.push(format!(
                "driver.device_key: `{}` must be under this node's data directory",
                key.display()
            ));
        }
    }
}

/// Whether `path` has a `..` step (refused rather than normalized: a spec
/// has no reason to climb).
fn has_parent_step(path: &Path) -> bool {
    path.components().any(|c| matches!(c, Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(driver: serde_json::Value) -> GatewaySpec {
        serde_json::from_value(serde_json::json!({
            "id": "g", "region": "r", "max_sessions": 1, "driver": driver
        }))
        .unwrap()
    }

    fn open() -> DriverPolicy {
        DriverPolicy {
            programs: vec!["/bin/sh".into()],
            working_dirs: vec!["/srv/work".into()],
            hosts: vec!["gw.internal".into(), "127.0.0.1".into()],
            env_prefix: "GODEL_SECRET_".into(),
            secrets_dir: Some("/etc/godel/secrets".into()),
            data_dir: Some("/var/lib/godel".into()),
        }
    }

    fn problems(p: &DriverPolicy, driver: serde_json::Value) -> Vec<String> {
        p.problems(&spec(driver))
    }

    #[test]
    fn the_default_runs_no_program_and_reads_no_file() {
        let d = DriverPolicy::default();
        let p = problems(
            &d,
            serde_json::json!({"kind": "command", "program": "/bin/sh"}),
        );
        assert!(p[0].contains("[gateways.command] allow"), "{p:?}");
        let p = problems(
            &d,
            serde_json::json!({"kind": "http", "url": "http://x/", "auth_header": {"file": "/etc/passwd"}}),
        );
        assert!(p[0].contains("[secrets] dir"), "{p:?}");
        assert!(problems(&d, serde_json::json!({"kind": "sim"})).is_empty());
    }

    #[test]
    fn programs_must_be_listed_exactly_and_absolute() {
        let p = open();
        assert!(
            problems(
                &p,
                serde_json::json!({"kind": "command", "program": "/bin/sh"})
            )
            .is_empty()
        );
        for program in ["sh", "/bin/bash", "/bin/sh/", "/bin/../bin/sh"] {
            let got = problems(
                &p,
                serde_json::json!({"kind": "command", "program": program}),
            );
            assert_eq!(got.len(), 1, "{program}: {got:?}");
            assert!(got[0].starts_with("driver.program:"), "{got:?}");
        }
        let ok = serde_json::json!({"kind": "command", "program": "/bin/sh", "working_dir": "/srv/work/a"});
        assert!(problems(&p, ok).is_empty());
        for dir in ["/srv", "/srv/work/../../etc", "relative", "/tmp"] {
            let got = problems(
                &p,
                serde_json::json!({"kind": "command", "program": "/bin/sh", "working_dir": dir}),
            );
            assert!(got[0].starts_with("driver.working_dir:"), "{dir}: {got:?}");
        }
    }

    #[test]
    fn secrets_resolve_only_with_the_prefix_or_under_the_directory() {
        let p = open();
        let http = |auth: serde_json::Value| serde_json::json!({"kind": "http", "url": "http://gw.internal/run", "auth_header": auth});
        assert!(problems(&p, http(serde_json::json!({"env": "GODEL_SECRET_TOKEN"}))).is_empty());
        assert!(
            problems(
                &p,
                http(serde_json::json!({"file": "/etc/godel/secrets/t"}))
            )
            .is_empty()
        );
        for (auth, needle) in [
            (
                serde_json::json!({"env": "GODEL_CLUSTER_SECRET"}),
                "cluster secret",
            ),
            (serde_json::json!({"env": "HOME"}), "env_prefix"),
            (serde_json::json!({"file": "/etc/passwd"}), "[secrets] dir"),
            (
                serde_json::json!({"file": "/etc/godel/secrets/../../passwd"}),
                "`..`",
            ),
        ] {
            let got = problems(&p, http(auth.clone()));
            assert!(got.len() == 1 && got[0].contains(needle), "{auth}: {got:?}");
        }
        // Even a prefix that would match cannot reach the cluster secret.
        let wide = DriverPolicy {
            env_prefix: "GODEL_".into(),
            ..open()
        };
        assert!(
            wide.secret_allowed(&SecretRef::Env(CLUSTER_SECRET_VAR.into()))
                .is_err()
        );
    }

    #[test]
    fn hosts_are_matched_when_listed() {
        let p = open();
        let oc = |url: &str| serde_json::json!({"kind": "openclaw", "url": url, "token": {"env": "GODEL_SECRET_OC"}});
        assert!(problems(&p, oc("ws://GW.internal:18789")).is_empty());
        assert!(problems(&p, oc("ws://127.0.0.1:18789")).is_empty());
        let got = problems(&p, oc("ws://evil.example:18789"));
        assert!(got[0].contains("allow_hosts"), "{got:?}");
        let any = DriverPolicy {
            hosts: vec![],
            ..open()
        };
        assert!(problems(&any, oc("ws://evil.example:18789")).is_empty());
    }

    #[test]
    fn the_device_key_stays_in_the_data_directory() {
        let p = open();
        let oc = |key: &str| serde_json::json!({"kind": "openclaw", "url": "ws://127.0.0.1:1", "token": {"env": "GODEL_SECRET_OC"}, "device_key": key});
        assert!(problems(&p, oc("/var/lib/godel/device.key")).is_empty());
        assert!(problems(&p, oc("/root/.ssh/id_ed25519"))[0].contains("data directory"));
        assert!(problems(&p, oc("/var/lib/godel/../../etc/x"))[0].contains("data directory"));
    }

    #[test]
    fn a_link_in_the_secrets_directory_cannot_point_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(dir.path().join("outside"), "x").unwrap();
        std::fs::write(secrets.join("inside"), "y").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), secrets.join("link")).unwrap();
        let p = DriverPolicy {
            secrets_dir: Some(secrets.clone()),
            ..open()
        };
        assert!(p.secret_file(&secrets.join("inside")).is_ok());
        let err = p.secret_file(&secrets.join("link")).unwrap_err();
        assert!(err.contains("outside [secrets] dir"), "{err}");
    }
}
