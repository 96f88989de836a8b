//! Agent roles: what an agent is for, what it may run, and what it is told.
//!
//! Four roles are built in; `[roles.<name>]` in the config adds others or
//! replaces a built-in one. A role gives its agents capabilities (added to
//! their own, so tasks that need them go to agents of the role; every agent
//! also has `role:<name>`, which a task's `agent_role` asks for), the tools
//! they may call (`None`: all; the OpenClaw driver stops a run that calls
//! another, and `http`/`command` gateways are told), and a prompt given
//! ahead of each task's message.
//!
//! An agent's registration copies its role's definition from the config of
//! the node that registers it, so every node runs it alike; after changing
//! a role, register its agents again. Keep `[roles]` the same on every
//! node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One role's definition (`[roles.<name>]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RoleSpec {
    /// What the role is for.
    pub description: String,
    /// Capabilities every agent of the role has.
    pub capabilities: Vec<String>,
    /// The tools its agents may call (`None`: any).
    pub tools: Option<Vec<String>>,
    /// Given to the model ahead of each task's message (`None`: nothing).
    pub prompt: Option<String>,
}

/// Most bytes of a role's prompt.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
/// Most tools a role lists.
pub const MAX_TOOLS: usize = 64;

/// The built-in roles. OpenClaw's default agent tools are `exec`, `read`,
/// `write`, `edit`, `apply_patch`, `ls` and `process`.
pub fn builtin() -> BTreeMap<String, RoleSpec> {
    let read_only = || Some(vec!["read".to_owned(), "ls".to_owned()]);
    [
        (
            "coordinator",
            RoleSpec {
                description:
                    "plans and hands work to other agents through tasks; runs no host tools".into(),
                tools: Some(Vec::new()),
                ..RoleSpec::default()
            },
        ),
        (
            "worker",
            RoleSpec {
                description: "does the work: every tool".into(),
                ..RoleSpec::default()
            },
        ),
        (
            "reviewer",
            RoleSpec {
                description: "reads and judges work; may read files, not change them".into(),
                tools: read_only(),
                ..RoleSpec::default()
            },
        ),
        (
            "monitor",
            RoleSpec {
                description: "watches and reports; may read files, not change them".into(),
                tools: read_only(),
                ..RoleSpec::default()
            },
        ),
    ]
    .into_iter()
    .map(|(n, r)| (n.to_owned(), r))
    .collect()
}

/// The roles a node knows: the built-in ones, then its `[roles]` (which
/// replace a built-in one of the same name).
pub fn all(configured: &BTreeMap<String, RoleSpec>) -> BTreeMap<String, RoleSpec> {
    let mut roles = builtin();
    roles.extend(configured.iter().map(|(n, r)| (n.clone(), r.clone())));
    roles
}

/// An agent's registration in role `role` of `roles` (see [`all`]): the
/// role's capabilities join the agent's own, and its tools and prompt are
/// copied in. An unknown role is an error naming the known ones.
pub fn registration(
    id: crate::fsm::AgentId,
    gateway: crate::fsm::GatewayId,
    mut capabilities: Vec<String>,
    role: &str,
    capacity: u32,
    roles: &BTreeMap<String, RoleSpec>,
) -> Result<crate::fsm::AgentRegistration, String> {
    let Some(spec) = roles.get(role) else {
        let known: Vec<&str> = roles.keys().map(String::as_str).collect();
        return Err(format!(
            "no role `{role}`: one of {} (`[roles.<name>]` in the config adds one)",
            known.join(", ")
        ));
    };
    capabilities.extend(spec.capabilities.iter().cloned());
    Ok(crate::fsm::AgentRegistration {
        id,
        gateway,
        capabilities,
        role: role.to_owned(),
        capacity,
        tools: spec.tools.clone(),
        prompt: spec.prompt.clone(),
    })
}

/// Every problem with the configured roles, each naming its field.
pub fn problems(configured: &BTreeMap<String, RoleSpec>) -> Vec<String> {
    let mut p = Vec::new();
    let name_ok = |s: &str| crate::fsm::check_name("role", s, false).is_ok();
    for (name, r) in configured {
        if !name_ok(name) {
            p.push(format!(
                "roles.{name:?}: a role name is 1 to 256 of A-Z a-z 0-9 - _ . : /"
            ));
        }
        for c in &r.capabilities {
            if !name_ok(c) {
                p.push(format!(
                    "roles.{name}.capabilities: {c:?} is not a capability name"
                ));
            }
        }
        if let Some(tools) = &r.tools {
            if tools.len() > MAX_TOOLS {
                p.push(format!("roles.{name}.tools: at most {MAX_TOOLS}"));
            }
            for t in tools {
                if !name_ok(t) {
                    p.push(format!("roles.{name}.tools: {t:?} is not a tool name"));
                }
            }
        }
        if r.prompt
            .as_ref()
            .is_some_and(|s| s.len() > MAX_PROMPT_BYTES)
        {
            p.push(format!(
                "roles.{name}.prompt: at most {MAX_PROMPT_BYTES} bytes"
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_roles_and_a_configured_one_that_replaces_one() {
        let mut conf = BTreeMap::new();
        conf.insert(
            "reviewer".to_owned(),
            RoleSpec {
                tools: Some(vec!["read".into()]),
                ..RoleSpec::default()
            },
        );
        conf.insert("triager".to_owned(), RoleSpec::default());
        let roles = all(&conf);
        let names: Vec<&str> = roles.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["coordinator", "monitor", "reviewer", "triager", "worker"]
        );
        assert_eq!(roles["reviewer"].tools, Some(vec!["read".to_owned()]));
        assert_eq!(roles["worker"].tools, None);
        assert_eq!(roles["coordinator"].tools, Some(vec![]));
        assert!(problems(&conf).is_empty());
        conf.insert(
            "bad name".to_owned(),
            RoleSpec {
                tools: Some(vec!["has space".into()]),
                ..RoleSpec::default()
            },
        );
        assert_eq!(problems(&conf).len(), 2, "{:?}", problems(&conf));
    }
}
