//! Feature flags: runtime switches an operator turns on for part of the
//! work (a tenant, a capability, a gateway kind or model, a share of the
//! tasks) without a deploy. The meta group keeps them ([`Command::SetFlag`],
//! audited through the API); an agent reads its node's replica when an
//! attempt starts and hands the names of the flags on for that task to the
//! gateway (`flags` in an `http` body and a simulator's result,
//! `GODEL_FLAGS` for a `command` program); an external worker gets them
//! with its lease. A change reaches every node as fast as the meta group
//! replicates (well under a second on a healthy cluster).
//!
//! A share (`percent`) is taken by a hash of the flag's name and the task's
//! session (its tenant and key) or, without a session key, its id: every
//! turn of a conversation sees the same flags, and every replica the same
//! answer.
//!
//! [`Command::SetFlag`]: super::Command::SetFlag

use serde::{Deserialize, Serialize};

use super::command::{Rejection, check_name, check_scope, fnv1a, rollout_bucket};
use super::task::{Limits, Task, Tenant};

/// Most flags the cluster keeps.
pub const MAX_FLAGS: usize = 1000;

/// One feature flag.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureFlag {
    /// On or off (an off flag is kept, with its scope, to turn on again).
    pub enabled: bool,
    /// Only this tenant's tasks (none: every tenant's).
    pub tenant: Option<Tenant>,
    /// Only tasks that need this capability (none: any).
    pub capability: Option<String>,
    /// Only on agents of gateways of this driver kind (none: any).
    pub gateway_kind: Option<String>,
    /// Only on agents of gateways that declare this model (none: any).
    pub model: Option<String>,
    /// Only this share of the matching work, 1 to 100 (none: all).
    pub percent: Option<u8>,
    /// What it is for.
    pub description: Option<String>,
    /// Who set it last (the caller's audit name).
    pub by: String,
    /// When (ms since the epoch; set by the state machine).
    pub at_ms: u64,
}

impl FeatureFlag {
    /// Whether flag `name` is on for `task` run on an agent of a gateway of
    /// `kind` declaring `model` (`None` for both: an external worker, which
    /// no kind- or model-scoped flag reaches).
    pub fn on_for(&self, name: &str, task: &Task, kind: Option<&str>, model: Option<&str>) -> bool {
        self.enabled
            && self.tenant.as_ref().is_none_or(|t| *t == task.tenant)
            && self
                .capability
                .as_ref()
                .is_none_or(|c| task.capabilities.contains(c))
            && self.gateway_kind.as_deref().is_none_or(|k| Some(k) == kind)
            && self.model.as_deref().is_none_or(|m| Some(m) == model)
            && self
                .percent
                .is_none_or(|p| rollout_bucket(name, rollout_unit(task)) < p)
    }

    /// Checks a flag and its name.
    pub(crate) fn check(name: &str, flag: Option<&FeatureFlag>) -> Result<(), Rejection> {
        let bad = |(f, p): (&'static str, String)| Rejection::invalid(f, p);
        check_name("name", name, false).map_err(bad)?;
        let Some(f) = flag else {
            return Ok(());
        };
        check_scope(
            f.tenant.as_ref(),
            f.capability.as_deref(),
            f.gateway_kind.as_deref(),
            f.model.as_deref(),
            f.percent,
        )?;
        if f.description
            .as_ref()
            .is_some_and(|d| d.len() > Limits::MAX_ERROR_BYTES)
        {
            let problem = format!("at most {} bytes", Limits::MAX_ERROR_BYTES);
            return Err(Rejection::invalid("description", problem));
        }
        Ok(())
    }
}

/// What a share of a rollout is drawn by: the task's session (its tenant
/// and key, FNV-1a) when it has a key, else its id.
fn rollout_unit(task: &Task) -> u64 {
    match &task.session_key {
        Some(key) => fnv1a(task.tenant.0.bytes().chain([0]).chain(key.0.bytes())),
        None => task.id.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{SessionKey, TaskId};

    fn task(id: u64, tenant: &str, key: Option<&str>) -> Task {
        thread_local! {
            static TEMPLATE: Task = {
                let mut s = crate::fsm::State::default();
                let submit = crate::fsm::SubmitTask {
                    tenant: Tenant("t".into()),
                    payload: "{}".into(),
                    ..Default::default()
                };
                s.apply_one(1, crate::fsm::Command::Submit(submit)).unwrap();
                s.task(TaskId(1)).unwrap().clone()
            };
        }
        let mut t = TEMPLATE.with(Clone::clone);
        t.id = TaskId(id);
        t.tenant = Tenant(tenant.into());
        t.session_key = key.map(|k| SessionKey(k.into()));
        t
    }

    #[test]
    fn a_share_is_about_its_percent_and_a_session_sees_one_answer() {
        let flag = FeatureFlag {
            enabled: true,
            percent: Some(30),
            ..FeatureFlag::default()
        };
        let on = (0..10_000u64)
            .filter(|i| flag.on_for("new-prompt", &task(*i, "a", None), None, None))
            .count();
        assert!((2_700..=3_300).contains(&on), "{on} of 10000 at 30%");
        // Every task of one session: the same answer.
        for k in 0..50 {
            let key = format!("s{k}");
            let first = flag.on_for("new-prompt", &task(1, "a", Some(&key)), None, None);
            for id in 2..20 {
                assert_eq!(
                    flag.on_for("new-prompt", &task(id, "a", Some(&key)), None, None),
                    first
                );
            }
        }
        // Off, or out of scope: never.
        let off = FeatureFlag {
            enabled: false,
            ..flag.clone()
        };
        assert!(!(0..100).any(|i| off.on_for("x", &task(i, "a", None), None, None)));
        let on_openclaw = FeatureFlag {
            enabled: true,
            gateway_kind: Some("openclaw".into()),
            ..FeatureFlag::default()
        };
        assert!(on_openclaw.on_for("x", &task(1, "a", None), Some("openclaw"), None));
        assert!(!on_openclaw.on_for("x", &task(1, "a", None), Some("sim"), None));
        assert!(!on_openclaw.on_for("x", &task(1, "a", None), None, None));
    }
}
