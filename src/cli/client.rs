//! Client commands: one HTTP call each, output as text or the API's JSON.

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Prints a line to stdout, ignoring a closed pipe (`godel ... | head`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

use super::security::{self, AuditCmd};
use super::text::{self, View};
use super::{
    AgentCmd, ClusterCmd, Command, DlqCmd, FlagCmd, GatewayCmd, LeaseCmd, ListArgs, NodeCmd,
    Output, QueueCmd, RoleCmd, SessionCmd, SessionListArgs, SwitchCmd, TaskCmd,
};

/// Runs a client command against `api` with `api_key` (else the key in
/// `./data/admin.key`), trusting `ca_cert` too for https; returns the
/// process exit code.
pub async fn run_client(
    api: &str,
    api_key: Option<String>,
    ca_cert: Option<std::path::PathBuf>,
    output: Output,
    cmd: Command,
) -> anyhow::Result<i32> {
    if let Command::Audit(AuditCmd::Verify {
        data_dir: Some(dir),
    }) = &cmd
    {
        return security::verify_offline(dir);
    }
    if let Command::Key(super::KeyCmd::Generate { test }) = &cmd {
        out!("{}", crate::api::auth::generate_key(*test));
        return Ok(0);
    }
    if let Command::Restore(args) = cmd {
        return super::backup::restore(output, args).await;
    }
    if let Command::Backup(args) = cmd {
        let key = security::credential(api_key)?;
        return super::backup::backup(api, key, ca_cert.as_deref(), output, args).await;
    }
    if let Command::Events(args) = cmd {
        let key = security::credential(api_key)?;
        return super::events::tail(api, key, ca_cert.as_deref(), output, args).await;
    }
    let client = Client {
        base: api.trim_end_matches('/').to_owned(),
        key: security::credential(api_key)?,
        http: http_client(ca_cert.as_deref())?,
    };
    if let Command::Audit(AuditCmd::Verify { data_dir: None }) = cmd {
        return verify_over_api(&client).await;
    }
    if let Command::Status = cmd {
        return status(&client, output).await;
    }
    let view = view_of(&cmd);
    let (method, path, body) = request(cmd)?;
    let (status, value) = client.call(method, &path, body).await?;
    if !status.is_success() {
        let msg = value["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string());
        let code = value["error"]["code"].as_str().unwrap_or("error");
        match output {
            Output::Json => out!("{value}"),
            Output::Text => {
                eprintln!("error: {code} ({status}): {msg}");
                if status == reqwest::StatusCode::UNAUTHORIZED && client.key.is_none() {
                    eprintln!(
                        "hint: pass --api-key, set GODEL_API_KEY, or run from the directory holding {}",
                        security::DEFAULT_KEY_FILE
                    );
                }
            }
        }
        return Ok(1);
    }
    match output {
        Output::Json => out!("{}", serde_json::to_string_pretty(&value)?),
        Output::Text => print!("{}", text::render(view, &value)),
    }
    // A batch whose items were refused in part: exit 2, so scripts notice.
    if view == View::Batch && value["failed"].as_u64().is_some_and(|n| n > 0) {
        return Ok(2);
    }
    Ok(0)
}

/// How a command's answer reads as text.
fn view_of(cmd: &Command) -> View {
    match cmd {
        Command::Task(TaskCmd::SubmitBatch { .. }) | Command::Lease(LeaseCmd::Report { .. }) => {
            View::Batch
        }
        Command::Task(_) | Command::Dlq(DlqCmd::Ls(_)) => View::Tasks,
        Command::Lease(LeaseCmd::Acquire { .. }) => View::Leases,
        Command::Queue(_) => View::Queue,
        Command::Usage(_) => View::Usage,
        Command::Cluster(ClusterCmd::Status) => View::Cluster,
        Command::Gateway(_) => View::Gateways,
        Command::Agent(_) => View::Agents,
        Command::Session(SessionCmd::Checkpoint { .. } | SessionCmd::Checkpoints { .. }) => {
            View::Fields
        }
        Command::Session(_) => View::Sessions,
        Command::Node(NodeCmd::Ls) => View::Nodes,
        Command::Key(_) => View::Keys,
        Command::Tenant(_) => View::Tenants,
        Command::Jwt(_) => View::Jwts,
        Command::Audit(_) => View::Audit,
        _ => View::Fields,
    }
}

/// `godel status`: the cluster on one screen, from five reads.
async fn status(client: &Client, output: Output) -> anyhow::Result<i32> {
    let mut parts = serde_json::Map::new();
    for (name, path) in [
        ("cluster", "/api/v1/cluster"),
        ("nodes", "/api/v1/nodes"),
        ("queue", "/api/v1/queue/depth"),
        ("gateways", "/api/v1/gateways"),
        ("agents", "/api/v1/agents"),
    ] {
        let (code, value) = client.call("GET", path, None).await?;
        if !code.is_success() {
            eprintln!(
                "error: {} ({code}) from GET {path}: {}",
                value["error"]["code"].as_str().unwrap_or("error"),
                value["error"]["message"].as_str().unwrap_or("")
            );
            return Ok(1);
        }
        parts.insert(name.to_owned(), value);
    }
    let all = Value::Object(parts);
    match output {
        Output::Json => out!("{}", serde_json::to_string_pretty(&all)?),
        Output::Text => print!("{}", text::summary(&all)),
    }
    Ok(0)
}

/// The HTTP client, trusting `ca_cert` besides the system's roots.
pub(super) fn http_client(ca_cert: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("--ca-cert {}: cannot read", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-cert {}: bad PEM", path.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().context("HTTP client")
}

/// The API client of one CLI run.
struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// One call; the status and the body (JSON, or the text as a string).
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(method.clone(), &url);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
            req = req.json(&body.unwrap_or(json!({})));
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }
}

/// `godel audit verify`: every group's chain (the meta group's, and each
/// queue shard's when the cluster has several: `GET /cluster` names the
/// count); 1 when any is broken.
async fn verify_over_api(client: &Client) -> anyhow::Result<i32> {
    let (status, cluster) = client.call("GET", "/api/v1/cluster", None).await?;
    let shards = if status.is_success() {
        cluster["shard_count"].as_u64().unwrap_or(1)
    } else {
        1
    };
    let groups = if shards > 1 { shards } else { 0 };
    let mut code = 0;
    for g in 0..=groups {
        if groups > 0 {
            println!("group {g}:");
        }
        code = code.max(verify_group(client, g).await?);
    }
    Ok(code)
}

/// Pages through `GET /audit?group=G` from the start and walks the chain
/// from the anchor the first page names.
async fn verify_group(client: &Client, group: u64) -> anyhow::Result<i32> {
    let mut entries = Vec::new();
    let mut anchor = None;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/audit?limit=1000&group={group}&cursor={c}"),
            None => format!("/api/v1/audit?limit=1000&group={group}"),
        };
        let (status, page) = client.call("GET", &path, None).await?;
        if !status.is_success() {
            bail!(
                "GET /api/v1/audit: {status}: {}",
                page["error"]["message"].as_str().unwrap_or("")
            );
        }
        if cursor.is_none() && !page["anchor"].is_null() {
            anchor = Some(crate::fsm::AuditAnchor {
                seq: page["anchor"]["seq"].as_u64().context("anchor seq")?,
                hash: security::unhex(page["anchor"]["hash"].as_str().context("anchor hash")?)?,
            });
        }
        for item in page["items"].as_array().context("page without items")? {
            entries.push(security::entry_from_json(item)?);
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    Ok(security::report(anchor, &entries))
}

pub(super) type Req = (&'static str, String, Option<Value>);

fn request(cmd: Command) -> anyhow::Result<Req> {
    Ok(match cmd {
        Command::Serve(_)
        | Command::Status
        | Command::Events(_)
        | Command::Backup(_)
        | Command::Restore(_) => {
            bail!("not a single-call client command")
        }
        Command::Task(t) => task_request(t)?,
        Command::Lease(l) => lease_request(l)?,
        Command::Queue(QueueCmd::Depth) => ("GET", "/api/v1/queue/depth".into(), None),
        Command::Dlq(DlqCmd::Ls(a)) => ("GET", format!("/api/v1/dead-letter{}", query(&a)), None),
        Command::Dlq(DlqCmd::Export) => ("GET", "/api/v1/dead-letter/export".into(), None),
        Command::Dlq(DlqCmd::Replay {
            ids,
            tenant,
            priority,
            error_contains,
            limit,
        }) => {
            let body = if ids.is_empty() {
                json!({ "tenant": tenant, "priority": priority, "error_contains": error_contains, "limit": limit })
            } else {
                json!({ "ids": ids, "limit": limit })
            };
            (
                "POST",
                "/api/v1/dead-letter/replay".into(),
                Some(strip_nulls(body)),
            )
        }
        Command::Key(k) => security::key_request(k)?,
        Command::Tenant(t) => security::tenant_request(t)?,
        Command::Jwt(j) => security::jwt_request(j),
        Command::Usage(u) => {
            let q = query_string([
                ("tenant", u.tenant),
                ("from", u.from),
                ("to", u.to),
                ("group_by", u.group_by),
            ]);
            let path = if u.csv {
                "/api/v1/usage/export"
            } else {
                "/api/v1/usage"
            };
            ("GET", format!("{path}{q}"), None)
        }
        Command::Role(RoleCmd::Ls) => ("GET", "/api/v1/roles".into(), None),
        Command::Flag(FlagCmd::Ls) => ("GET", "/api/v1/flags".into(), None),
        Command::Flag(FlagCmd::Set {
            name,
            off,
            tenant,
            capability,
            gateway_kind,
            model,
            percent,
            description,
        }) => (
            "PUT",
            format!("/api/v1/flags/{name}"),
            Some(strip_nulls(json!({
                "enabled": !off, "tenant": tenant, "capability": capability,
                "gateway_kind": gateway_kind, "model": model, "percent": percent,
                "description": description,
            }))),
        ),
        Command::Flag(FlagCmd::Rm { name }) => ("DELETE", format!("/api/v1/flags/{name}"), None),
        Command::Switch(SwitchCmd::Ls) => ("GET", "/api/v1/switches".into(), None),
        Command::Switch(SwitchCmd::Set {
            name,
            tenant,
            capability,
            gateway_kind,
            model,
            percent,
            all,
            cancel_leased,
            reason,
        }) => (
            "PUT",
            format!("/api/v1/switches/{name}"),
            Some(strip_nulls(json!({
                "tenant": tenant, "capability": capability,
                "gateway_kind": gateway_kind, "model": model, "percent": percent,
                "all": all, "cancel_leased": cancel_leased, "reason": reason,
            }))),
        ),
        Command::Switch(SwitchCmd::Lift { name }) => {
            ("DELETE", format!("/api/v1/switches/{name}"), None)
        }
        Command::Audit(a) => security::audit_ls_request(a)?,
        Command::Agent(a) => agent_request(a),
        Command::Session(s) => session_request(s),
        Command::Gateway(g) => gateway_request(g)?,
        Command::Node(NodeCmd::Ls) => ("GET", "/api/v1/nodes".into(), None),
        Command::Node(NodeCmd::Drain { id, force }) => (
            "POST",
            format!("/api/v1/admin/nodes/{id}/drain"),
            Some(json!({ "force": force })),
        ),
        Command::Node(NodeCmd::Undrain { id }) => {
            ("POST", format!("/api/v1/admin/nodes/{id}/undrain"), None)
        }
        Command::Node(NodeCmd::DrainStatus { id }) => {
            ("GET", format!("/api/v1/admin/nodes/{id}/drain"), None)
        }
        Command::Cluster(c) => match c {
            ClusterCmd::Status => ("GET", "/api/v1/cluster".into(), None),
            ClusterCmd::Join {
                id,
                raft_addr,
                api_addr,
                region,
            } => (
                "POST",
                "/api/v1/cluster/join".into(),
                Some(
                    json!({ "id": id, "raft_addr": raft_addr, "api_addr": api_addr, "region": region }),
                ),
            ),
            ClusterCmd::Leave { id } => (
                "POST",
                "/api/v1/cluster/leave".into(),
                Some(json!({ "id": id })),
            ),
            ClusterCmd::Transfer { to } => (
                "POST",
                "/api/v1/cluster/transfer-leader".into(),
                Some(json!({ "to": to })),
            ),
            ClusterCmd::PlaceShard {
                shard,
                placement,
                home,
            } => {
                let mut body = json!({ "placement": placement });
                if let Some(h) = home {
                    body["home"] = json!(h);
                }
                (
                    "PUT",
                    format!("/api/v1/shards/{shard}/placement"),
                    Some(body),
                )
            }
            ClusterCmd::UnplaceShard { shard } => {
                ("DELETE", format!("/api/v1/shards/{shard}/placement"), None)
            }
        },
    })
}

fn gateway_request(g: GatewayCmd) -> anyhow::Result<Req> {
    Ok(match g {
        GatewayCmd::Add {
            id,
            region,
            caps,
            max_sessions,
            model,
            driver,
        } => {
            let driver: Value = serde_json::from_str(&driver).context("--driver is not JSON")?;
            let body = strip_nulls(json!({
                "id": id, "region": region, "capabilities": caps,
                "max_sessions": max_sessions, "model": model, "driver": driver,
            }));
            ("POST", "/api/v1/gateways".into(), Some(body))
        }
        GatewayCmd::Ls => ("GET", "/api/v1/gateways".into(), None),
        GatewayCmd::Get { id } => ("GET", format!("/api/v1/gateways/{id}"), None),
        GatewayCmd::Rm { id } => ("DELETE", format!("/api/v1/gateways/{id}"), None),
    })
}

fn agent_request(a: AgentCmd) -> Req {
    match a {
        AgentCmd::Add {
            id,
            gateway,
            caps,
            role,
            capacity,
        } => (
            "POST",
            "/api/v1/agents".into(),
            Some(
                json!({ "id": id, "gateway": gateway, "capabilities": caps, "role": role, "capacity": capacity }),
            ),
        ),
        AgentCmd::Ls => ("GET", "/api/v1/agents".into(), None),
        AgentCmd::Get { id } => ("GET", format!("/api/v1/agents/{id}"), None),
        AgentCmd::Status { id } => ("GET", format!("/api/v1/agents/{id}/status"), None),
        AgentCmd::Rm { id } => ("DELETE", format!("/api/v1/agents/{id}"), None),
    }
}

fn session_request(s: SessionCmd) -> Req {
    match s {
        SessionCmd::Ls(a) => (
            "GET",
            format!("/api/v1/sessions{}", session_query(&a)),
            None,
        ),
        SessionCmd::Get { id } => ("GET", format!("/api/v1/sessions/{id}"), None),
        SessionCmd::Kill { id, reason } => (
            "POST",
            format!("/api/v1/sessions/{id}/kill"),
            Some(strip_nulls(json!({ "reason": reason }))),
        ),
        SessionCmd::Pause { id } => ("POST", format!("/api/v1/sessions/{id}/pause"), None),
        SessionCmd::Resume { id } => ("POST", format!("/api/v1/sessions/{id}/resume"), None),
        SessionCmd::Checkpoint { id, name } => (
            "POST",
            format!("/api/v1/sessions/{id}/checkpoint"),
            Some(strip_nulls(json!({ "name": name }))),
        ),
        SessionCmd::Migrate { id, gateway } => (
            "POST",
            format!("/api/v1/sessions/{id}/migrate"),
            Some(strip_nulls(json!({ "gateway": gateway }))),
        ),
        SessionCmd::Checkpoints { id } => {
            ("GET", format!("/api/v1/sessions/{id}/checkpoints"), None)
        }
    }
}

fn task_request(t: TaskCmd) -> anyhow::Result<Req> {
    Ok(match t {
        TaskCmd::Submit {
            payload,
            priority,
            tenant,
            caps,
            session_key,
            scheduled_at,
            max_attempts,
            timeout_ms,
            idempotency_key,
            parent_id,
            region,
            region_required,
            depends_on,
            on_dependency_failure,
            requires_approval,
            approval_expires_in_ms,
        } => {
            let payload: Value = serde_json::from_str(&payload).context("--payload is not JSON")?;
            let body = json!({
                "payload": payload, "priority": priority, "tenant": tenant, "capabilities": caps,
                "session_key": session_key, "scheduled_at": scheduled_at, "max_attempts": max_attempts,
                "timeout_ms": timeout_ms, "idempotency_key": idempotency_key, "parent_id": parent_id,
                "region": region, "region_required": region_required.then_some(true),
                "depends_on": (!depends_on.is_empty()).then_some(depends_on),
                "on_dependency_failure": on_dependency_failure,
                "requires_approval": requires_approval.then_some(true),
                "approval_expires_in_ms": approval_expires_in_ms,
            });
            ("POST", "/api/v1/tasks".into(), Some(strip_nulls(body)))
        }
        TaskCmd::SubmitBatch { file } => (
            "POST",
            "/api/v1/tasks:batch".into(),
            Some(json!({ "tasks": json_items(&file)? })),
        ),
        TaskCmd::Get { id } => ("GET", format!("/api/v1/tasks/{id}"), None),
        TaskCmd::Ls(a) => ("GET", format!("/api/v1/tasks{}", query(&a)), None),
        TaskCmd::Cancel {
            id,
            reason,
            keep_children,
        } => (
            "POST",
            format!("/api/v1/tasks/{id}/cancel"),
            Some(strip_nulls(json!({
                "reason": reason,
                "keep_children": keep_children.then_some(true),
            }))),
        ),
        TaskCmd::Retry { id } => ("POST", format!("/api/v1/tasks/{id}/retry"), None),
        TaskCmd::Approve { id, reason } => (
            "POST",
            format!("/api/v1/tasks/{id}/approve"),
            Some(strip_nulls(json!({ "reason": reason }))),
        ),
        TaskCmd::Reject { id, reason } => (
            "POST",
            format!("/api/v1/tasks/{id}/reject"),
            Some(json!({ "reason": reason })),
        ),
    })
}

fn lease_request(l: LeaseCmd) -> anyhow::Result<Req> {
    Ok(match l {
        LeaseCmd::Acquire {
            agent,
            caps,
            max,
            lease_ms,
        } => (
            "POST",
            "/api/v1/leases".into(),
            Some(strip_nulls(
                json!({ "agent_id": agent, "capabilities": caps, "max": max, "lease_ms": lease_ms }),
            )),
        ),
        LeaseCmd::Renew { token } => ("POST", format!("/api/v1/leases/{token}/renew"), None),
        LeaseCmd::Complete { token, result } => {
            let result: Value = serde_json::from_str(&result).context("--result is not JSON")?;
            (
                "POST",
                format!("/api/v1/leases/{token}/complete"),
                Some(json!({ "result": result })),
            )
        }
        LeaseCmd::Report { file } => (
            "POST",
            "/api/v1/leases:batch".into(),
            Some(json!({ "results": json_items(&file)? })),
        ),
        LeaseCmd::Fail {
            token,
            error,
            no_retry,
        } => (
            "POST",
            format!("/api/v1/leases/{token}/fail"),
            Some(json!({ "error": error, "retryable": !no_retry })),
        ),
    })
}

/// The JSON values of `file` (`-`: standard input) for a batch call: one
/// JSON array, or one value per line (blank lines skipped).
fn json_items(file: &str) -> anyhow::Result<Vec<Value>> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    let items: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).with_context(|| format!("{file} is not a JSON array"))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| format!("{file}, line {}: not JSON", i + 1))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let most = crate::api::MAX_BATCH_ITEMS;
    anyhow::ensure!(
        (1..=most).contains(&items.len()),
        "{file} holds {} items; a batch takes 1 to {most} (split the file)",
        items.len()
    );
    Ok(items)
}

fn query(a: &ListArgs) -> String {
    query_string([
        ("status", a.status.clone()),
        ("priority", a.priority.clone()),
        ("tenant", a.tenant.clone()),
        ("limit", a.limit.map(|l| l.to_string())),
        ("cursor", a.cursor.clone()),
    ])
}

fn session_query(a: &SessionListArgs) -> String {
    query_string([
        ("gateway", a.gateway.clone()),
        ("state", a.state.clone()),
        ("key", a.key.clone()),
        ("live", a.live.map(|l| l.to_string())),
        ("limit", a.limit.map(|l| l.to_string())),
        ("cursor", a.cursor.clone()),
    ])
}

/// `?k=v&...` of the parameters that are set (empty if none), values
/// percent-encoded.
pub(super) fn query_string<const N: usize>(params: [(&str, Option<String>); N]) -> String {
    let pairs: Vec<String> = params
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(&v))))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(super) fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => other,
    }
}
