//! Scripted golden tests for the state machine, in the style of toydb's
//! goldenscripts: one file per behaviour under `tests/fsm_scripts/`.
//!
//! A script is a list of blocks. A block is one or more command lines, a `---`
//! line, then the output those commands produced; a blank line ends it.
//! Comment lines (`#`) and blank lines before a block are kept as they are.
//!
//! ```text
//! # Task 1 is leased by the only agent.
//! submit tenant=a priority=high
//! lease agent=w1
//! ---
//! created #1 pending high a attempts=0/3
//! event: #1 submitted
//! leased #1 token=1 expires=30000
//! event: #1 leased token=1 agent=w1
//! ```
//!
//! Every command that changes the state is applied alone as one Raft batch,
//! stamped with the script's leader clock (starts at 0; `time` moves it) and a
//! seed that counts batches, so a script replays identically.
//!
//! Regenerate the expected output with
//! `UPDATE_GOLDEN=1 cargo test --test fsm_scripts`, then review the diff: the
//! point of a golden file is that a person checked every line of it. Without
//! the variable a mismatch fails, naming the file, line and command, with a
//! line diff.
//!
//! Verbs (values hold no spaces; lists are comma-separated):
//!
//! - `submit [tenant=a] [priority=P] [caps=x,y] [payload=JSON | payload_bytes=N]
//!   [key=K] [at=N|+N] [attempts=N] [timeout=MS] [backoff=INITIAL,MULT,MAX]
//!   [parent=ID] [session=S] [region=R [required=true]] [deps=ID,ID
//!   [on_dep_fail=cancel|block]] [approval=true [approval_expires=MS]]`
//! - `approve id=N [by=B] [reason=R]`, `reject id=N [by=B] [reason=R]`
//! - `switch name=N [tenant=T] [cap=C] [kind=K] [model=M] [percent=P]
//!   [cancel_leased=true]` (a kill switch), `unswitch name=N`
//! - `flag name=N [on=false] [tenant=T] [cap=C] [kind=K] [model=M]
//!   [percent=P] [desc=D]` (a feature flag), `unflag name=N`; read with
//!   `flags` and `flags_on id=N [kind=K] [model=M]` (the flags on for a
//!   task on an agent of such a gateway; neither: an external worker)
//! - `lease [agent=w1] [caps=x,y] [max=1] [lease=30000]`
//! - `renew token=T [lease=30000]`, `complete token=T [result=JSON | result_bytes=N]`,
//!   `fail token=T [error=boom] [retryable=true] [used=IN,OUT[:MODEL]]`
//! - `cancel id=N [reason=R] [keep_children=true]`, `retry id=N`, `weight tenant=a w=N`
//! - `replay ids=1,2 [limit=100]` or `replay [tenant=a] [priority=P] [error=E] [limit=100]`
//! - `tick` (apply an empty batch: fires due timers)
//! - `purge before=MS [keep=N] [max=1000] [dead_before=MS]` (forget
//!   finished tasks: those that finished before MS, then the oldest while
//!   more than N remain; then dead letters dead-lettered before
//!   `dead_before`); `purge_due before=MS [keep=N] [dead_before=MS]`
//!   reads whether one would forget any
//! - `shards count=N [placement=auto|every|spread|regional]` (record the
//!   cluster's queue-shard count and placement)
//! - `define_group group=N` (make the state queue shard N's; read with `group`)
//! - `grow_shards count=N [voters=1,2]` (the cluster's shards grow to N;
//!   the voters the added groups start with, read with `growth`), `open_route
//!   epoch=E count=N [sync_rev=R]` (the meta group opens routing epoch E,
//!   the added shards synced to revision R, default 0; a shard
//!   records it), read with `routes`; `submit ... epoch=E [lookback=true]`
//!   is a routed submission (`SubmitRouted`)
//! - `sync_weight tenant=T [w=N] rev=R`, `sync_switch name=N rev=R
//!   [tenant=T] [cap=C] [kind=K] [model=M] [percent=P] [gateways=G,H]
//!   [cancel_leased=true] [lift=true]` (a queue shard
//!   takes the meta group's copy of one item at revision R); `revs` reads
//!   the revisions a state holds
//! - `usage` reads the ledger (tokens, compute time, first-lease waits);
//!   `budget_alert tenant=T [period=day|month] start=DAY [unit=tokens|cost]
//!   [level=soft|exhausted] used=N limit=N` records a budget alert
//! - `place_shard shard=N [placement=P [home=R]]` (a shard's own placement;
//!   none: the cluster's again), read with `shard_rule shard=N`
//! - `time +N`, `time -N`, `time N`: move the leader clock (applies nothing)
//! - registry: `node id=N [region=eu] [api=127.0.0.1:1]` (a heartbeat at the
//!   script clock), `drain id=N [on=true]`,
//!   `gateway id=G [caps=x,y] [max=100] [region=eu] [kind=sim] [model=M]
//!   [managed=true]`, `report_managed gateway=G node=N
//!   state=starting|running|backoff|failed [pid=P] [restarts=R] [exit=E]`
//!   (a managed gateway's process, read with `process gateway=G`),
//!   `place gateway=G [node=N]` (no node: unplace),
//!   `report gateway=G health=healthy|degraded|unhealthy|unknown
//!   circuit=closed|open|half_open`,
//!   `agent id=A gateway=G [caps=x,y] [capacity=1] [role=worker] [tools=a,b]
//!   [prompt=P]`, `unagent id=A`,
//!   `report_agent agent=A node=N [circuit=closed|open|half_open]
//!   [silent=true|false]` (an agent's own breaker, or its actor silent),
//!   `ungateway id=G`,
//!   `online agent=A node=N [release=1,2]`. As the runtime does (the owner's agent actors announce
//!   themselves), `agent` and `place` also bring the agents of a placed
//!   gateway online on its owner; that `AgentOnline` prints nothing unless
//!   it fails or emits events. `place` to a new owner takes them offline
//!   first, so a script sees exactly what the move does.
//! - `dispatch [max=100] [lease=30000] [policy=least_loaded|round_robin]
//!   [dead_after=3000] [limit=0] [idle=0] [checkpoint_every=0]` (`limit`,
//!   `idle` and `checkpoint_every`: the time limit, idle close and
//!   checkpoint period in turns of the sessions it opens, 0 for none); its
//!   grants name the agent
//! - `pull node=N agents=a,b:FREE,c:FREE:MIN [max=..] [lease=..] ...` (the
//!   `dispatch` settings): node N's pull for the agents it names, each with
//!   its free capacity (default 100) and lowest priority (default low);
//!   each carries the profile `profile agent=A gateway=G [caps=x,y]
//!   [region=eu] [capacity=1] [room=100] [token=1] [kind=sim] [model=M]`
//!   kept for it, as a pull
//!   from a queue shard does
//! - `renew_many tokens=1,2 [lease=30000]`, `release tokens=1,2`,
//!   `kill_session id=N [reason=R]`, `pause_session id=N`,
//!   `resume_session id=N`, `checkpoint_session id=N [name=N]`,
//!   `migrate_session id=N [gateway=G]` (read with `checkpoints id=N`),
//!   `move_sessions_off gateway=G [why=W]` (a shard's sessions leave a
//!   gateway the meta group found unusable), `release_agent agent=A` (a shard lets
//!   a deregistered agent go)
//! - reads: `dump`, `task id=N`, `depth`, `clock`, `shard_count`, `sessions` (one line per
//!   session, oldest first: state, key, agent, gateway, task, deadline, idle
//!   close, reason), `load agent=A` (live leases against capacity),
//!   `why id=N [dead_after=3000]` (why a ready task waits, as its API view says),
//!   `switches` (the kill switches, one line each), `agent_info id=A` (its
//!   registration and own state)
//! - `snapshot` remembers the encoded state; `unchanged` says whether the
//!   state is byte-for-byte what `snapshot` saw.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;

use godel::codec;
use godel::fsm::{
    AfterTask, AgentId, AgentProfile, AgentRegistration, ApiKeyId, Audit, AuditCaller, AuditFilter,
    AuditRecord, AuditTarget, Backoff, Batch, Budget, BudgetAlert, BudgetLevel, BudgetPeriod,
    BudgetUnit, Checkpoint, Circuit, Command, DeadLetterFilter, DependencyFailure, DispatchPolicy,
    DispatchSpec, Event, EventKind, FeatureFlag, FencingToken, GatewayChange, GatewayId,
    GatewayRegistration, Health, KillSwitch, LeaseGrant, ManagedState, ManagedStatus, Member,
    NewApiKey, Outcome, Priority, PullSlot, PullSpec, Rejection, ReplaySelector, Reply, Request,
    Role, SessionKey, SessionRecord, SessionState, State, SubmitTask, SyncSwitch, SyncWeight,
    Synced, Task, TaskFilter, TaskId, TaskRegion, TaskStatus, Tenant, TenantPatch, TenantRecord,
    What, Write, verify_audit_chain,
};
use godel::trace::TraceContext;

const SCRIPT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fsm_scripts");

/// One `#[test]` per script, so failures are reported (and run) separately.
macro_rules! scripts {
    ($($name:ident),* $(,)?) => {
        const LISTED: &[&str] = &[$(stringify!($name)),*];
        $(
            #[test]
            fn $name() {
                run_script(stringify!($name));
            }
        )*
    };
}

scripts! {
    api_keys_bootstrap_once,
    audit_chain_verifies_and_names_tampering,
    cancel_from_every_non_terminal_state,
    cancel_terminal_rejected,
    capability_match,
    child_inherits_parent_priority,
    clock_never_goes_back,
    dead_letter_replay_by_ids_and_filter,
    dispatch_backpressure,
    dispatch_invalid_input_changes_nothing,
    dispatch_least_loaded_spreads_work,
    dispatch_round_robin,
    dispatch_session_affinity,
    dispatch_skips_ineligible_agents,
    fail_retries_with_backoff_then_dead_letter,
    fencing_tokens_only_grow,
    fifo_within_priority,
    gateway_placement_token_rises,
    region_preferred_and_required,
    idempotency_key_returns_first,
    invalid_input_changes_nothing,
    jwt_revocations_expire,
    lease_expiry_returns_without_attempt,
    manual_retry,
    not_retryable_goes_to_dead_letter,
    priority_blocks_lower_until_drained,
    pull_from_a_shard_uses_the_nodes_profiles,
    pull_leases_to_the_nodes_own_agents,
    release_and_renew_many,
    shard_lets_a_deregistered_agent_go,
    shards_grow_then_a_route_opens,
    one_shard_cluster_does_not_grow,
    routed_submission_epoch_fence,
    lookback_submission_finds_key_or_session,
    a_shard_placed_apart,
    a_dead_letter_keeps_its_session_in_its_shard,
    dependencies_wait_until_completed,
    dependency_failure_cancels_or_blocks,
    cancel_cascades_to_children,
    approval_gates_a_task,
    budget_alerts_once_per_period,
    kill_switch_holds_matching_work,
    kill_switch_on_gateway_kind_and_model,
    feature_flags,
    agent_breaker_and_silence,
    agent_role_in_its_registration,
    managed_gateway_process,
    shard_kill_switch_on_gateway_kind_and_model,
    meta_revisions_for_shard_copies,
    dispatch_by_role,
    scheduled_becomes_ready,
    session_time_limit_and_lease_expiry,
    sessions_are_per_tenant,
    sessions_leave_an_unusable_gateway,
    shard_copy_takes_only_newer_revisions,
    shard_count_recorded_once,
    shard_ids_carry_the_group,
    stale_token_rejected,
    tenant_quota_and_settings,
    tenant_round_robin_weighted,
    tenant_scope_confines_commands,
    timeout_counts_as_failure,
    trace_context_is_kept,
    usage_is_counted_per_day_model_and_agent,
    usage_counts_every_attempt_end,
    durable_sessions,
    retention_purges_finished_tasks,
    retention_purges_old_dead_letters,
}

#[test]
fn every_script_file_is_listed() {
    for entry in std::fs::read_dir(SCRIPT_DIR).expect("script directory exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_some_and(|e| e == "txt") {
            let stem = path.file_stem().expect("file name").to_string_lossy();
            assert!(
                LISTED.contains(&stem.as_ref()),
                "{} is not listed in scripts! in tests/fsm_scripts.rs, so it never runs",
                path.display()
            );
        }
    }
}

/// Runs one script; rewrites it under `UPDATE_GOLDEN`, else compares.
fn run_script(name: &str) {
    let path = format!("{SCRIPT_DIR}/{name}.txt");
    let shown = format!("tests/fsm_scripts/{name}.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{shown}: {e}"));
    let script = parse(&shown, &text);
    let mut runner = Runner::default();
    let mut outputs = Vec::new();
    for block in &script.blocks {
        let mut out = Vec::new();
        for (line, command) in &block.commands {
            if command.starts_with('#') {
                continue;
            }
            let lines = runner
                .execute(command)
                .unwrap_or_else(|e| panic!("{shown}:{line}: bad command `{command}`: {e}"));
            out.extend(lines);
        }
        outputs.push(out);
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let rendered = render(&script, &outputs);
        if rendered != text {
            std::fs::write(&path, rendered).unwrap_or_else(|e| panic!("{shown}: {e}"));
            eprintln!("updated {shown}: review the diff");
        }
        return;
    }
    check(&shown, &script, &outputs);
}

/// Fails with a diff of the first block whose output differs.
fn check(shown: &str, script: &Script, outputs: &[Vec<String>]) {
    let differing: Vec<usize> = script
        .blocks
        .iter()
        .zip(outputs)
        .enumerate()
        .filter(|(_, (block, actual))| block.expected != **actual)
        .map(|(i, _)| i)
        .collect();
    let Some(&first) = differing.first() else {
        return;
    };
    let block = &script.blocks[first];
    let (line, command) = &block.commands[0];
    let others: Vec<String> = differing[1..]
        .iter()
        .map(|&i| script.blocks[i].commands[0].0.to_string())
        .collect();
    panic!(
        "{shown}:{line}: output of `{command}` differs (-expected +actual):\n{}\n\
         blocks after it that also differ start at lines: [{}]\n\
         if the new output is right, rerun with UPDATE_GOLDEN=1 and review the diff",
        line_diff(&block.expected, &outputs[first]),
        others.join(", ")
    );
}

/// A minimal LCS line diff: ` ` kept, `-` expected only, `+` actual only.
fn line_diff(expected: &[String], actual: &[String]) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i] == actual[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            out.push(format!("  {}", expected[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+ {}", actual[j]));
            j += 1;
        } else {
            out.push(format!("- {}", expected[i]));
            i += 1;
        }
    }
    out.join("\n")
}

/// A parsed script file.
struct Script {
    blocks: Vec<Block>,
    /// Comments after the last block.
    trailer: Vec<String>,
}

struct Block {
    /// Comments and blank lines before the commands, verbatim.
    preamble: Vec<String>,
    /// The commands, with their 1-based line numbers.
    commands: Vec<(usize, String)>,
    /// The output recorded in the file.
    expected: Vec<String>,
}

fn parse(shown: &str, text: &str) -> Script {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).peekable();
    let mut blocks = Vec::new();
    loop {
        let mut preamble = Vec::new();
        while let Some(&(_, l)) = lines.peek() {
            if !(l.trim().is_empty() || l.starts_with('#')) {
                break;
            }
            preamble.push(l.to_owned());
            lines.next();
        }
        if lines.peek().is_none() {
            return Script {
                blocks,
                trailer: preamble,
            };
        }
        let mut commands = Vec::new();
        loop {
            match lines.next() {
                Some((_, "---")) => break,
                Some((n, l)) if l.trim().is_empty() => {
                    panic!("{shown}:{n}: blank line between commands and `---`")
                }
                Some((n, l)) => commands.push((n, l.trim().to_owned())),
                None => panic!("{shown}: the last block has no `---` line"),
            }
        }
        let expected = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        blocks.push(Block {
            preamble,
            commands,
            expected,
        });
    }
}

fn render(script: &Script, outputs: &[Vec<String>]) -> String {
    let mut out = Vec::new();
    for (i, (block, output)) in script.blocks.iter().zip(outputs).enumerate() {
        if i > 0 {
            out.push(String::new());
        }
        out.extend(block.preamble.iter().cloned());
        out.extend(block.commands.iter().map(|(_, c)| c.clone()));
        out.push("---".into());
        out.extend(output.iter().cloned());
    }
    if !script.trailer.is_empty() {
        out.push(String::new());
        out.extend(script.trailer.iter().cloned());
    }
    out.join("\n") + "\n"
}

/// The state under test plus the script's leader.
#[derive(Default)]
struct Runner {
    state: State,
    /// The leader's clock, stamped into each batch.
    now_ms: u64,
    /// Batches applied so far; the next batch's seed.
    batches: u64,
    /// The state encoded by the last `snapshot`.
    saved: Option<Vec<u8>>,
    /// Agent profiles `pull` sends to a queue shard (`profile`).
    profiles: BTreeMap<AgentId, AgentProfile>,
}

impl Runner {
    fn execute(&mut self, line: &str) -> Result<Vec<String>, String> {
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        if verb == "time" {
            return self.move_clock(rest.trim());
        }
        if verb == "as" {
            return self.execute_as(rest);
        }
        let mut args = Args::parse(rest)?;
        let out = match verb {
            "place" => {
                let gateway = GatewayId(args.require("gateway")?);
                let mut out = self.apply(Command::PlaceGateway {
                    id: gateway.clone(),
                    owner: args.parsed("node")?,
                });
                out.extend(self.bring_online(|a| a.reg.gateway == gateway));
                out
            }
            "agent" => {
                let id = AgentId(args.require("id")?);
                let mut out = self.apply(Command::RegisterAgent(AgentRegistration {
                    id: id.clone(),
                    gateway: GatewayId(args.require("gateway")?),
                    capabilities: list(args.take("caps")),
                    role: args.take("role").unwrap_or_else(|| "worker".into()),
                    capacity: args.parsed("capacity")?.unwrap_or(1),
                    tools: args.take("tools").map(|t| list(Some(t))),
                    prompt: args.take("prompt"),
                }));
                out.extend(self.bring_online(|a| a.reg.id == id));
                out
            }
            "tamper" => self.tamper(&mut args)?,
            "profile" => {
                let agent = AgentId(args.require("agent")?);
                let profile = AgentProfile {
                    capabilities: list(args.take("caps")),
                    gateway: GatewayId(args.require("gateway")?),
                    region: args.take("region").unwrap_or_else(|| "eu".into()),
                    capacity: args.parsed("capacity")?.unwrap_or(1),
                    session_room: args.parsed("room")?.unwrap_or(100),
                    placement_token: args.parsed("token")?.unwrap_or(1),
                    kind: args.take("kind").unwrap_or_else(|| "sim".into()),
                    model: args.take("model"),
                };
                self.profiles.insert(agent, profile);
                vec!["profile kept".into()]
            }
            "pull" if !self.profiles.is_empty() => {
                let Some(Command::Pull(mut spec)) = build_command(verb, &mut args, self.now_ms)?
                else {
                    unreachable!("`pull` builds a pull");
                };
                for slot in &mut spec.slots {
                    slot.profile = self.profiles.get(&slot.agent).cloned();
                }
                self.apply(Command::Pull(spec))
            }
            _ => match build_command(verb, &mut args, self.now_ms)? {
                Some(cmd) => self.apply(cmd),
                None => self.read(verb, &mut args)?,
            },
        };
        args.finish()?;
        Ok(out)
    }

    /// `as ACTOR TENANT [scoped] VERB ARGS...`: the verb's command, proposed
    /// on behalf of an API caller (audited; confined to TENANT if `scoped`).
    fn execute_as(&mut self, rest: &str) -> Result<Vec<String>, String> {
        let mut words = rest.splitn(3, ' ');
        let (Some(actor), Some(tenant), Some(mut rest)) =
            (words.next(), words.next(), words.next())
        else {
            return Err("give `as ACTOR TENANT [scoped] VERB ARGS...`".into());
        };
        let scoped = match rest.strip_prefix("scoped ") {
            Some(r) => {
                rest = r;
                true
            }
            None => false,
        };
        let (verb, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut args = Args::parse(rest)?;
        let target = args.take("target").map(AuditTarget::text);
        let command = build_command(verb, &mut args, self.now_ms)?
            .ok_or_else(|| format!("`{verb}` is not a command"))?;
        args.finish()?;
        let audit = Audit {
            caller: AuditCaller {
                actor: actor.into(),
                tenant: tenant.into(),
                action: verb.to_owned().into(),
            },
            scoped,
            target,
        };
        Ok(self.apply_write(Write {
            command,
            audit: Some(audit),
        }))
    }

    /// The read-only verbs.
    fn read(&mut self, verb: &str, args: &mut Args) -> Result<Vec<String>, String> {
        Ok(match verb {
            "dump" => self.dump(),
            "task" => self.task(TaskId(args.require("id")?)),
            "why" => {
                let id = TaskId(args.require("id")?);
                let dead_after = args.parsed("dead_after")?.unwrap_or(3000);
                vec![match self.state.task(id) {
                    Some(t) if t.status == TaskStatus::Pending && self.state.switch_holding(t).is_some() => {
                        let name = self.state.switch_holding(t).unwrap_or_default();
                        format!("#{id} held by kill switch {name}")
                    }
                    Some(t) => match self.state.region_wait_reason(t, dead_after) {
                        Some(why) => format!("#{id} waits: {why}"),
                        None => format!("#{id} waits for nothing but its turn"),
                    },
                    None => format!("#{id} not found"),
                }]
            }
            "depth" => depth_lines(&self.state),
            "purge_due" => {
                let horizon = godel::fsm::Horizon {
                    finished_before_ms: args.require("before")?,
                    keep: args.parsed("keep")?.unwrap_or(u64::MAX),
                    dead_before_ms: args.parsed("dead_before")?.unwrap_or(0),
                };
                vec![format!("purge due: {}", self.state.purge_due(horizon))]
            }
            "process" => {
                let id = GatewayId(args.require("gateway")?);
                vec![match self.state.registry().gateway(&id) {
                    Some(g) => format!("gateway {id} owner={:?} process={:?}", g.owner, g.managed),
                    None => format!("gateway {id} not found"),
                }]
            }
            "agent_info" => {
                let id = AgentId(args.require("id")?);
                vec![match self.state.registry().agent(&id) {
                    Some(a) => format!(
                        "agent {id}: gateway={} role={} caps=[{}] capacity={} tools={:?} prompt={:?} circuit={:?} silent_since={:?} online_on={:?}",
                        a.reg.gateway.0,
                        a.reg.role,
                        a.reg.capabilities.join(","),
                        a.reg.capacity,
                        a.reg.tools,
                        a.reg.prompt,
                        a.circuit,
                        a.silent_since_ms,
                        a.online_on
                    ),
                    None => format!("agent {id} not found"),
                }]
            }
            "flags" => self
                .state
                .flags()
                .iter()
                .map(|(name, f)| {
                    format!(
                        "flag {name}: enabled={} tenant={:?} cap={:?} kind={:?} model={:?} percent={:?} by={} at={}",
                        f.enabled,
                        f.tenant.as_ref().map(|t| t.as_str()),
                        f.capability,
                        f.gateway_kind,
                        f.model,
                        f.percent,
                        f.by,
                        f.at_ms
                    )
                })
                .collect(),
            "flags_on" => {
                let id = TaskId(args.require("id")?);
                let kind = args.take("kind");
                let model = args.take("model");
                let Some(t) = self.state.task(id) else {
                    return Ok(vec![format!("#{id} not found")]);
                };
                let on = self.state.flags_on(t, kind.as_deref(), model.as_deref());
                vec![format!("#{id} flags on: [{}]", on.join(","))]
            }
            "switches" => self
                .state
                .switches()
                .iter()
                .map(|(name, sw)| {
                    let gateways: Vec<&str> = sw.gateways.iter().map(|g| g.0.as_str()).collect();
                    format!(
                        "switch {name}: tenant={:?} cap={:?} kind={:?} model={:?} percent={:?} cancel_leased={} gateways=[{}] reason={:?}",
                        sw.tenant.as_ref().map(|t| t.as_str()),
                        sw.capability,
                        sw.gateway_kind,
                        sw.model,
                        sw.percent,
                        sw.cancel_leased,
                        gateways.join(","),
                        sw.reason
                    )
                })
                .collect(),
            "clock" => vec![self.clock_line()],
            "shard_count" => vec![format!(
                "shard count {} placement {}",
                self.state.shard_count(),
                self.state.shard_placement()
            )],
            "group" => vec![format!("group {}", self.state.group())],
            "shard_rule" => {
                let shard = args.require("shard")?;
                let rule = self.state.shard_rule(shard);
                vec![format!(
                    "shard {shard} placement {} home {} own={}",
                    rule.placement,
                    rule.home.as_deref().unwrap_or("-"),
                    self.state.shard_placed_apart(shard)
                )]
            }
            "routes" => {
                let counts: Vec<String> =
                    self.state.routes().iter().map(|c| c.to_string()).collect();
                vec![format!(
                    "routes [{}] seen epoch {}",
                    counts.join(","),
                    self.state.route_epoch()
                )]
            }
            "sessions" => self.sessions(),
            "checkpoints" => {
                let id = args.require("id")?;
                let lines: Vec<String> = self
                    .state
                    .sessions()
                    .checkpoints(id)
                    .iter()
                    .map(|c| checkpoint_line(c))
                    .collect();
                if lines.is_empty() {
                    vec![format!("session {id}: no checkpoints")]
                } else {
                    lines
                }
            }
            "load" => self.load(AgentId(args.require("agent")?)),
            "keys" => key_lines(&self.state),
            "tenants" => tenant_lines(&self.state),
            "growth" => {
                let ids: Vec<String> = self
                    .state
                    .growth_voters()
                    .keys()
                    .map(|id| id.to_string())
                    .collect();
                vec![format!("growth voters [{}]", ids.join(","))]
            }
            "revs" => rev_lines(&self.state),
            "usage" => usage_lines(&self.state),
            "jtis" => jti_lines(&self.state),
            "audit" => audit_lines(&self.state, args.parsed("after")?.unwrap_or(0)),
            "verify" => vec![match verify_audit_chain(
                self.state.audit().anchor(),
                self.state.audit().entries(),
            ) {
                Ok(n) => format!("audit chain verifies: {n} entries"),
                Err(e) => e.to_string(),
            }],
            "snapshot" => {
                self.saved = Some(encode(&self.state));
                vec!["saved".into()]
            }
            "unchanged" => self.unchanged()?,
            other => return Err(format!("unknown verb `{other}`")),
        })
    }

    /// `tamper seq=N`: flips one byte of a stored audit entry (its actor),
    /// as a corrupted disk or a forger would.
    fn tamper(&mut self, args: &mut Args) -> Result<Vec<String>, String> {
        let seq: u64 = args.require("seq")?;
        let flipped = self.state.audit_mut().tamper(seq, |e| {
            let mut bytes = e.actor.as_bytes().to_vec();
            bytes[0] ^= 0x20; // an ASCII letter changes case
            e.actor = String::from_utf8_lossy(&bytes).into();
        });
        if !flipped {
            return Err(format!("no audit entry {seq}"));
        }
        Ok(vec![format!("tampered with audit entry {seq}")])
    }

    fn move_clock(&mut self, arg: &str) -> Result<Vec<String>, String> {
        let bad = || format!("`time` takes +N, -N or N, got `{arg}`");
        let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
        self.now_ms = if let Some(d) = arg.strip_prefix('+') {
            self.now_ms + n(d)?
        } else if let Some(d) = arg.strip_prefix('-') {
            self.now_ms.checked_sub(n(d)?).ok_or_else(bad)?
        } else {
            n(arg)?
        };
        Ok(vec![format!("now={}", self.now_ms)])
    }

    /// Applies one command as its own batch; prints its outcome, then every event.
    fn apply(&mut self, command: Command) -> Vec<String> {
        self.apply_write(command.into())
    }

    /// Applies one write (a command, maybe audited) as its own batch.
    fn apply_write(&mut self, write: Write) -> Vec<String> {
        self.batches += 1;
        let request = Request::Batch(Batch::of(self.now_ms, self.batches, vec![write]));
        let (response, events) = self.state.apply(&request);
        assert_eq!(response.outcomes.len(), 1, "one outcome per command");
        let mut out = outcome_lines(&response.outcomes[0]);
        out.extend(events.iter().map(event_line));
        out
    }

    /// Brings the chosen agents of placed gateways online on the owner (as
    /// their actors would), printing only failures and events.
    fn bring_online(&mut self, which: impl Fn(&godel::fsm::AgentRecord) -> bool) -> Vec<String> {
        let reg = self.state.registry();
        let due: Vec<(AgentId, u64)> = reg
            .agents()
            .filter(|a| which(a))
            .filter_map(|a| {
                let owner = reg.gateway(&a.reg.gateway)?.owner?;
                (a.online_on != Some(owner)).then(|| (a.reg.id.clone(), owner))
            })
            .collect();
        let mut out = Vec::new();
        for (agent, node) in due {
            let lines = self.apply(Command::AgentOnline {
                agent,
                node,
                release: Vec::new(),
            });
            out.extend(lines.into_iter().filter(|l| l != "ok"));
        }
        out
    }

    fn dump(&self) -> Vec<String> {
        let page = self
            .state
            .list(&TaskFilter::default(), None, usize::MAX, usize::MAX);
        if page.items.is_empty() {
            return vec!["no tasks".into()];
        }
        page.items.iter().map(|t| task_line(t)).collect()
    }

    fn task(&self, id: TaskId) -> Vec<String> {
        vec![match self.state.task(id) {
            Some(t) => task_line(t),
            None => format!("#{id} not found"),
        }]
    }

    fn sessions(&self) -> Vec<String> {
        let lines: Vec<String> = self
            .state
            .sessions()
            .iter()
            .map(|s| session_line(s))
            .collect();
        if lines.is_empty() {
            return vec!["no sessions".into()];
        }
        lines
    }

    /// An agent's live leases against its capacity (`-` if not registered).
    fn load(&self, agent: AgentId) -> Vec<String> {
        let capacity = self
            .state
            .registry()
            .agent(&agent)
            .map_or("-".into(), |a| a.reg.capacity.to_string());
        let held: Vec<String> = self
            .state
            .agent_leases(&agent)
            .iter()
            .map(|(token, id)| format!("#{id}(token={token})"))
            .collect();
        vec![format!(
            "{agent} load={}/{capacity} holds=[{}]",
            self.state.agent_load(&agent),
            held.join(" ")
        )]
    }

    fn clock_line(&self) -> String {
        let next = self
            .state
            .next_due_ms()
            .map_or("-".into(), |t| t.to_string());
        format!(
            "clock={} next_due={next} last_token={} tasks={}",
            self.state.clock_ms(),
            self.state.last_token(),
            self.state.task_count()
        )
    }

    fn unchanged(&self) -> Result<Vec<String>, String> {
        let saved = self.saved.as_ref().ok_or("`unchanged` before `snapshot`")?;
        let same = *saved == encode(&self.state);
        Ok(vec![
            if same {
                "state unchanged"
            } else {
                "state CHANGED"
            }
            .into(),
        ])
    }
}

fn encode(state: &State) -> Vec<u8> {
    codec::encode(state).expect("a state always encodes")
}

/// `key=value` arguments; every one must be used by the verb.
struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(rest: &str) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for word in rest.split_whitespace() {
            let (k, v) = word
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got `{word}`"))?;
            if map.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(format!("`{k}` given twice"));
            }
        }
        Ok(Args(map))
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    fn parsed<T: FromStr>(&mut self, key: &str) -> Result<Option<T>, String>
    where
        T::Err: Display,
    {
        self.take(key)
            .map(|v| v.parse().map_err(|e| format!("`{key}={v}`: {e}")))
            .transpose()
    }

    fn require<T: FromStr>(&mut self, key: &str) -> Result<T, String>
    where
        T::Err: Display,
    {
        self.parsed(key)?
            .ok_or_else(|| format!("`{key}=` is required"))
    }

    fn finish(self) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = self.0.keys().map(String::as_str).collect();
        Err(format!("unknown argument(s): {}", keys.join(", ")))
    }
}

/// The command a state-changing verb stands for; `None` for other verbs.
fn build_command(verb: &str, args: &mut Args, now_ms: u64) -> Result<Option<Command>, String> {
    Ok(Some(match verb {
        "submit" => submit_command(args, now_ms)?,
        "lease" => lease_command(args)?,
        "renew" => Command::Renew {
            token: FencingToken(args.require("token")?),
            lease_ms: args.parsed("lease")?.unwrap_or(30_000),
        },
        "complete" => Command::Complete {
            token: FencingToken(args.require("token")?),
            result: match args.parsed::<usize>("result_bytes")? {
                Some(n) => sized_json(n),
                None => args.take("result").unwrap_or_else(|| "{}".into()),
            },
        },
        "fail" => Command::Fail {
            token: FencingToken(args.require("token")?),
            error: args.take("error").unwrap_or_else(|| "boom".into()),
            retryable: args.parsed("retryable")?.unwrap_or(true),
            usage: args.take("used").map(|u| {
                let (io, model) = u
                    .split_once(':')
                    .map_or((u.as_str(), None), |(a, b)| (a, Some(b.to_owned())));
                let (i, o) = io.split_once(',').unwrap_or((io, "0"));
                godel::fsm::ReportedUsage {
                    input_tokens: i.parse().expect("used=IN,OUT[:MODEL]"),
                    output_tokens: o.parse().expect("used=IN,OUT[:MODEL]"),
                    model,
                }
            }),
        },
        "cancel" => Command::Cancel {
            id: TaskId(args.require("id")?),
            reason: args.take("reason"),
            keep_children: args.parsed("keep_children")?.unwrap_or(false),
        },
        "switch" => Command::SetSwitch {
            name: args.require::<String>("name")?,
            switch: Some(kill_switch(args)?),
        },
        "unswitch" => Command::SetSwitch {
            name: args.require::<String>("name")?,
            switch: None,
        },
        "flag" => Command::SetFlag {
            name: args.require::<String>("name")?,
            flag: Some(FeatureFlag {
                enabled: args.parsed("on")?.unwrap_or(true),
                tenant: args.take("tenant").map(Tenant::from),
                capability: args.take("cap"),
                gateway_kind: args.take("kind"),
                model: args.take("model"),
                percent: args.parsed("percent")?,
                description: args.take("desc"),
                by: "key:op".into(),
                at_ms: 0,
            }),
        },
        "unflag" => Command::SetFlag {
            name: args.require::<String>("name")?,
            flag: None,
        },
        "approve" => Command::Approve {
            id: TaskId(args.require("id")?),
            by: args.take("by").unwrap_or_else(|| "key:op".into()),
            reason: args.take("reason"),
        },
        "reject" => Command::Reject {
            id: TaskId(args.require("id")?),
            by: args.take("by").unwrap_or_else(|| "key:op".into()),
            reason: args.take("reason").unwrap_or_default(),
        },
        "retry" => Command::Retry {
            id: TaskId(args.require("id")?),
        },
        "replay" => replay_command(args)?,
        "weight" => Command::SetTenantWeight {
            tenant: Tenant::from(args.require::<String>("tenant")?),
            weight: args.require("w")?,
        },
        "tick" => Command::Tick,
        "purge" => Command::Purge {
            finished_before_ms: args.require("before")?,
            keep: args.parsed("keep")?.unwrap_or(u64::MAX),
            max: args.parsed("max")?.unwrap_or(1000),
            dead_before_ms: args.parsed("dead_before")?.unwrap_or(0),
        },
        "shards" => Command::DefineShards {
            count: args.require("count")?,
            placement: args.parsed("placement")?.unwrap_or_default(),
        },
        "define_group" => Command::DefineGroup {
            group: args.require("group")?,
        },
        "grow_shards" => Command::GrowShards {
            count: args.require("count")?,
            voters: list(args.take("voters").or_else(|| Some("1".into())))
                .iter()
                .map(|id| {
                    let id: u64 = id.parse().map_err(|e| format!("voters: {e}"))?;
                    let member = Member {
                        raft_addr: format!("127.0.0.1:{}", 7000 + id),
                        api_addr: format!("127.0.0.1:{}", 8000 + id),
                        region: "eu".into(),
                    };
                    Ok((id, member))
                })
                .collect::<Result<_, String>>()?,
        },
        "budget_alert" => Command::BudgetAlert(BudgetAlert {
            tenant: Tenant::from(args.require::<String>("tenant")?),
            period: match args.take("period").as_deref() {
                Some("month") => BudgetPeriod::Month,
                _ => BudgetPeriod::Day,
            },
            start_day: args.require("start")?,
            unit: match args.take("unit").as_deref() {
                Some("cost") => BudgetUnit::Cost,
                _ => BudgetUnit::Tokens,
            },
            level: match args.take("level").as_deref() {
                Some("exhausted") => BudgetLevel::Exhausted,
                _ => BudgetLevel::Soft,
            },
            used: args.require("used")?,
            limit: args.require("limit")?,
        }),
        "sync_weight" => Command::SyncShard {
            weights: vec![SyncWeight {
                tenant: Tenant::from(args.require::<String>("tenant")?),
                weight: args.parsed("w")?,
                rev: args.require("rev")?,
            }],
            switches: vec![],
        },
        "sync_switch" => {
            let name = args.require::<String>("name")?;
            let rev = args.require("rev")?;
            let switch = if args.parsed("lift")?.unwrap_or(false) {
                None
            } else {
                Some(kill_switch(args)?)
            };
            Command::SyncShard {
                weights: vec![],
                switches: vec![SyncSwitch { name, switch, rev }],
            }
        }
        "place_shard" => Command::PlaceShard {
            shard: args.require("shard")?,
            rule: args
                .parsed("placement")?
                .map(|placement| godel::fsm::ShardRule {
                    placement,
                    home: args.take("home"),
                }),
        },
        "open_route" => Command::OpenRoute {
            epoch: args.require("epoch")?,
            count: args.require("count")?,
            sync_rev: args.parsed("sync_rev")?.unwrap_or(0),
        },
        "node" => Command::NodeHeartbeat {
            id: args.require("id")?,
            region: args.take("region").unwrap_or_else(|| "eu".into()),
            api_addr: args.take("api").unwrap_or_else(|| "127.0.0.1:1".into()),
        },
        "drain" => Command::SetDrain {
            id: args.require("id")?,
            draining: args.parsed("on")?.unwrap_or(true),
        },
        "gateway" => Command::RegisterGateway(GatewayRegistration {
            id: GatewayId(args.require("id")?),
            kind: args.take("kind").unwrap_or_else(|| "sim".into()),
            spec: "{}".into(),
            region: args.take("region").unwrap_or_else(|| "eu".into()),
            capabilities: list(args.take("caps")),
            max_sessions: args.parsed("max")?.unwrap_or(100),
            model: args.take("model"),
            managed: args.parsed("managed")?.unwrap_or(false),
        }),
        "online" => Command::AgentOnline {
            agent: AgentId(args.require("agent")?),
            node: args.require("node")?,
            release: tokens_or_none(args)?,
        },
        "report_agent" => Command::ReportAgent {
            agent: AgentId(args.require("agent")?),
            node: args.require("node")?,
            circuit: args.take("circuit").map(|c| circuit(&c)).transpose()?,
            silent: args.parsed("silent")?,
        },
        "report_managed" => Command::ReportManaged {
            id: GatewayId(args.require("gateway")?),
            node: args.require("node")?,
            status: ManagedStatus {
                state: match args.require::<String>("state")?.as_str() {
                    "starting" => ManagedState::Starting,
                    "running" => ManagedState::Running,
                    "backoff" => ManagedState::Backoff,
                    "failed" => ManagedState::Failed,
                    other => return Err(format!("`state={other}`: unknown process state")),
                },
                pid: args.parsed("pid")?,
                restarts: args.parsed("restarts")?.unwrap_or(0),
                last_exit: args.take("exit"),
            },
        },
        "report" => Command::ReportGateway {
            id: GatewayId(args.require("gateway")?),
            health: health(&args.require::<String>("health")?)?,
            circuit: circuit(&args.require::<String>("circuit")?)?,
        },
        "unagent" => Command::DeregisterAgent {
            id: AgentId(args.require("id")?),
        },
        "ungateway" => Command::DeregisterGateway {
            id: GatewayId(args.require("id")?),
        },
        "dispatch" => Command::Dispatch(dispatch_spec(args)?),
        "pull" => Command::Pull(PullSpec {
            node: args.require("node")?,
            slots: pull_slots(args)?,
            round: dispatch_spec(args)?,
        }),
        "renew_many" => Command::RenewMany {
            tokens: tokens(args)?,
            lease_ms: args.parsed("lease")?.unwrap_or(30_000),
        },
        "release" => Command::Release {
            tokens: tokens(args)?,
        },
        "release_agent" => Command::ReleaseAgent {
            agent: AgentId(args.require("agent")?),
        },
        "kill_session" => Command::KillSession {
            id: args.require("id")?,
            reason: args.take("reason"),
        },
        "pause_session" => Command::PauseSession {
            id: args.require("id")?,
        },
        "resume_session" => Command::ResumeSession {
            id: args.require("id")?,
        },
        "checkpoint_session" => Command::CheckpointSession {
            id: args.require("id")?,
            name: args.take("name"),
        },
        "migrate_session" => Command::MigrateSession {
            id: args.require("id")?,
            gateway: args.take("gateway").map(GatewayId),
        },
        "move_sessions_off" => Command::MoveSessionsOff {
            gateway: GatewayId(args.require("gateway")?),
            why: args.take("why").unwrap_or_else(|| "unusable".into()),
        },
        "key" => {
            let new = new_key(args, now_ms)?;
            if args.parsed("bootstrap")?.unwrap_or(false) {
                Command::BootstrapApiKey(new)
            } else {
                Command::CreateApiKey(new)
            }
        }
        "revoke_key" => Command::RevokeApiKey {
            id: ApiKeyId(args.require("id")?),
        },
        "touch" => Command::TouchApiKeys {
            ids: list(args.take("keys")).into_iter().map(ApiKeyId).collect(),
        },
        "tenant" => Command::CreateTenant {
            tenant: Tenant::from(args.require::<String>("name")?),
            patch: tenant_patch(args)?,
        },
        "tenant_update" => Command::UpdateTenant {
            tenant: Tenant::from(args.require::<String>("name")?),
            patch: tenant_patch(args)?,
        },
        "tenant_delete" => Command::DeleteTenant {
            tenant: Tenant::from(args.require::<String>("name")?),
        },
        "revoke_jti" => Command::RevokeJti {
            jti: args.require("jti")?,
            until_ms: args.require("until")?,
        },
        "deny" => Command::Audit(AuditRecord {
            caller: AuditCaller {
                actor: args.require::<String>("actor")?.into(),
                tenant: args.take("tenant").unwrap_or_else(|| "a".into()).into(),
                action: args.require::<String>("action")?.into(),
            },
            target: args.take("target").map(AuditTarget::text),
            outcome: args
                .take("outcome")
                .unwrap_or_else(|| "denied:forbidden".into()),
        }),
        _ => return Ok(None),
    }))
}

/// `key id=K [tenant=a] [role=developer] [name=K] [hash=N] [expires=+N|N]
/// [by=admin]`: a key whose hash is 32 bytes of N (default: the id's length).
fn new_key(args: &mut Args, now_ms: u64) -> Result<NewApiKey, String> {
    let id: String = args.require("id")?;
    let hash_byte: u8 = args.parsed("hash")?.unwrap_or(id.len() as u8);
    let expires_at_ms = match args.take("expires") {
        Some(v) => Some(match v.strip_prefix('+') {
            Some(d) => {
                now_ms
                    + d.parse::<u64>()
                        .map_err(|e| format!("`expires={v}`: {e}"))?
            }
            None => v.parse().map_err(|e| format!("`expires={v}`: {e}"))?,
        }),
        None => None,
    };
    Ok(NewApiKey {
        name: args.take("name").unwrap_or_else(|| id.clone()),
        role: args.parsed("role")?.unwrap_or(Role::Developer),
        tenant: Tenant::from(args.take("tenant").unwrap_or_else(|| "a".into())),
        hash: [hash_byte; 32],
        prefix: args.take("prefix").unwrap_or_else(|| "dk_test_AbCd".into()),
        expires_at_ms,
        created_by: args.take("by").unwrap_or_else(|| "admin".into()),
        id: ApiKeyId(id),
    })
}

/// `[weight=N] [max_queued=N|none] [rate=N|none] [burst=N|none]`.
fn tenant_patch(args: &mut Args) -> Result<TenantPatch, String> {
    fn limit<T: FromStr>(args: &mut Args, key: &str) -> Result<Option<Option<T>>, String>
    where
        T::Err: Display,
    {
        match args.take(key).as_deref() {
            None => Ok(None),
            Some("none") => Ok(Some(None)),
            Some(v) => v
                .parse()
                .map(|n| Some(Some(n)))
                .map_err(|e| format!("`{key}={v}`: {e}")),
        }
    }
    Ok(TenantPatch {
        weight: args.parsed("weight")?,
        max_queued: limit(args, "max_queued")?,
        rate_per_second: limit(args, "rate")?,
        burst: limit(args, "burst")?,
        budget: match args.take("budget").as_deref() {
            None => None,
            Some("none") => Some(None),
            Some(v) => Some(Some(budget(v)?)),
        },
    })
}

/// The kill switch of a `switch` or `sync_switch` line.
fn kill_switch(args: &mut Args) -> Result<KillSwitch, String> {
    Ok(KillSwitch {
        tenant: args.take("tenant").map(Tenant::from),
        capability: args.take("cap"),
        cancel_leased: args.parsed("cancel_leased")?.unwrap_or(false),
        reason: args.take("reason"),
        by: "key:op".into(),
        at_ms: 0,
        gateway_kind: args.take("kind"),
        model: args.take("model"),
        percent: args.parsed("percent")?,
        gateways: list(args.take("gateways"))
            .into_iter()
            .map(GatewayId)
            .collect(),
    })
}

/// `daily_tokens:N,monthly_tokens:N,daily_cost:MICROS,monthly_cost:MICROS,soft:P`
/// (any of them; soft defaults to 80).
fn budget(v: &str) -> Result<Budget, String> {
    let mut b = Budget {
        soft_percent: 80,
        ..Budget::default()
    };
    for pair in v.split(',') {
        let (k, n) = pair
            .split_once(':')
            .ok_or_else(|| format!("`{pair}`: want key:value"))?;
        let n: u64 = n.parse().map_err(|e| format!("`{pair}`: {e}"))?;
        match k {
            "daily_tokens" => b.daily_tokens = Some(n),
            "monthly_tokens" => b.monthly_tokens = Some(n),
            "daily_cost" => b.daily_cost_micros = Some(n),
            "monthly_cost" => b.monthly_cost_micros = Some(n),
            "soft" => b.soft_percent = n.try_into().map_err(|_| format!("`{pair}`: too big"))?,
            _ => return Err(format!("`{k}`: not a budget field")),
        }
    }
    Ok(b)
}

fn key_lines(state: &State) -> Vec<String> {
    let now = state.clock_ms();
    let lines: Vec<String> = state
        .auth()
        .keys()
        .map(|k| {
            let mut l = format!(
                "key {} {} {} hash={:02x} created={}",
                k.id, k.role, k.tenant, k.hash[0], k.created_at_ms
            );
            if let Some(at) = k.expires_at_ms {
                l += &format!(" expires={at}");
            }
            if let Some(at) = k.revoked_at_ms {
                l += &format!(" revoked={at}");
            }
            if let Some(at) = k.last_used_ms {
                l += &format!(" used={at}");
            }
            l += if k.is_live(now) { " live" } else { " dead" };
            l
        })
        .collect();
    let mut out = vec![format!("bootstrapped={}", state.auth().bootstrapped())];
    out.extend(lines);
    out
}

/// What the state holds of the copies every queue shard keeps (weights,
/// kill switches), with their revisions: what `sync_for` sends an empty
/// shard, one line per item.
fn rev_lines(state: &State) -> Vec<String> {
    let Some(Command::SyncShard { weights, switches }) = state.sync_for(&Synced::default()) else {
        return vec!["no revisions".into()];
    };
    let weights = weights.iter().map(|w| {
        let shown = w.weight.map_or_else(|| "-".into(), |v| v.to_string());
        format!("weight {} rev={} w={shown}", w.tenant, w.rev)
    });
    let switches = switches.iter().map(|sw| {
        let shown = if sw.switch.is_some() { "on" } else { "lifted" };
        format!("switch {} rev={} {shown}", sw.name, sw.rev)
    });
    weights.chain(switches).collect()
}

/// The ledger: one line per row, then one per wait row.
fn usage_lines(state: &State) -> Vec<String> {
    let ledger = state.ledger();
    let rows = ledger.rows().iter().map(|(k, v)| {
        format!(
            "usage {} day={} model={} gateway={} agent={}: completed={} failed={} lost={} in={} out={} compute={}ms",
            k.tenant,
            k.day,
            k.model.as_deref().unwrap_or("-"),
            k.gateway.as_ref().map_or("-", |g| g.0.as_str()),
            k.agent,
            v.completed,
            v.failed_attempts,
            v.lost_attempts,
            v.input_tokens,
            v.output_tokens,
            v.compute_ms
        )
    });
    let waits = ledger.waits().iter().map(|(k, v)| {
        format!(
            "wait {} day={} {}: tasks={} total={}ms max={}ms",
            k.tenant,
            k.day,
            k.priority.as_str(),
            v.tasks,
            v.wait_ms,
            v.max_wait_ms
        )
    });
    let lines: Vec<String> = rows.chain(waits).collect();
    if lines.is_empty() {
        return vec!["no usage".into()];
    }
    lines
}

fn tenant_lines(state: &State) -> Vec<String> {
    let lines: Vec<String> = state
        .auth()
        .tenants()
        .map(|t| tenant_line(t, state))
        .collect();
    if lines.is_empty() {
        return vec!["no tenant records".into()];
    }
    lines
}

fn tenant_line(t: &TenantRecord, state: &State) -> String {
    let show = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "tenant {} weight={} max_queued={} rate={} burst={} queued={}",
        t.name,
        state.tenant_weights().get(&t.name).copied().unwrap_or(1),
        show(t.settings.max_queued.map(|v| v.to_string())),
        show(t.settings.rate_per_second.map(|v| v.to_string())),
        show(t.settings.burst.map(|v| v.to_string())),
        state.queued_of(&t.name)
    ) + &t.settings.budget.as_ref().map_or_else(String::new, |b| {
        let part = |name: &str, v: Option<u64>| v.map(|v| format!("{name}:{v},"));
        let parts: String = [
            part("daily_tokens", b.daily_tokens),
            part("monthly_tokens", b.monthly_tokens),
            part("daily_cost", b.daily_cost_micros),
            part("monthly_cost", b.monthly_cost_micros),
        ]
        .into_iter()
        .flatten()
        .collect();
        format!(" budget={parts}soft:{}", b.soft_percent)
    })
}

fn jti_lines(state: &State) -> Vec<String> {
    let lines: Vec<String> = state
        .auth()
        .revoked_jtis()
        .map(|(jti, until)| format!("jti {jti} revoked until={until}"))
        .collect();
    if lines.is_empty() {
        return vec!["no revoked jtis".into()];
    }
    lines
}

/// One line per audit entry after `after`: seq, time, who, what, outcome,
/// and the first bytes of its hash and link.
fn audit_lines(state: &State, after: u64) -> Vec<String> {
    let (items, _) = state
        .audit()
        .page(&AuditFilter::default(), after, usize::MAX);
    if items.is_empty() {
        return vec!["no audit entries".into()];
    }
    items
        .iter()
        .map(|e| {
            format!(
                "audit {} t={} {} {} {} {} {} hash={} prev={}",
                e.seq,
                e.time_ms,
                e.actor,
                e.tenant,
                e.action,
                match &e.target {
                    AuditTarget::None => "-".to_owned(),
                    t => t.to_string(),
                },
                e.outcome,
                hex4(&e.hash),
                hex4(&e.prev_hash)
            )
        })
        .collect()
}

fn hex4(h: &[u8; 32]) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// `a,b` as a list; an empty value is an empty list.
fn list(value: Option<String>) -> Vec<String> {
    value.map_or_else(Vec::new, |v| {
        v.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// A JSON object of exactly `n >= 8` bytes.
fn sized_json(n: usize) -> String {
    format!("{{\"p\":\"{}\"}}", "x".repeat(n.saturating_sub(8)))
}

fn submit_command(args: &mut Args, now_ms: u64) -> Result<Command, String> {
    let payload = match args.parsed::<usize>("payload_bytes")? {
        Some(n) => sized_json(n),
        None => args.take("payload").unwrap_or_else(|| "{}".into()),
    };
    let scheduled_at_ms = match args.take("at") {
        Some(v) => Some(match v.strip_prefix('+') {
            Some(d) => now_ms + d.parse::<u64>().map_err(|e| format!("`at={v}`: {e}"))?,
            None => v.parse().map_err(|e| format!("`at={v}`: {e}"))?,
        }),
        None => None,
    };
    let backoff = match args.take("backoff") {
        Some(v) => {
            let parts: Vec<u64> = v
                .split(',')
                .map(|p| p.parse::<u64>().map_err(|e| format!("`backoff={v}`: {e}")))
                .collect::<Result<_, _>>()?;
            let [initial_ms, multiplier, max_ms] = parts[..] else {
                return Err(format!("`backoff={v}`: give INITIAL,MULT,MAX"));
            };
            let multiplier = u32::try_from(multiplier).map_err(|e| e.to_string())?;
            Some(Backoff {
                initial_ms,
                multiplier,
                max_ms,
            })
        }
        None => None,
    };
    let routed: Option<u32> = args.parsed("epoch")?;
    let lookback = args.parsed("lookback")?.unwrap_or(false);
    let task = SubmitTask {
        tenant: Tenant::from(args.take("tenant").unwrap_or_else(|| "a".into())),
        priority: args.parsed("priority")?,
        payload,
        capabilities: list(args.take("caps")),
        session_key: args.take("session").map(SessionKey),
        scheduled_at_ms,
        max_attempts: args.parsed("attempts")?,
        timeout_ms: args.parsed("timeout")?,
        backoff,
        idempotency_key: args.take("key"),
        parent_id: args.parsed::<u64>("parent")?.map(TaskId),
        trace: match args.take("trace") {
            Some(t) => {
                Some(TraceContext::parse(&t).ok_or(format!("`trace={t}`: not a traceparent"))?)
            }
            None => None,
        },
        region: match args.take("region") {
            Some(name) => Some(TaskRegion {
                name,
                required: args.parsed("required")?.unwrap_or(false),
            }),
            None => None,
        },
        depends_on: list(args.take("deps"))
            .iter()
            .map(|d| {
                d.parse::<u64>()
                    .map(TaskId)
                    .map_err(|e| format!("`deps`: {e}"))
            })
            .collect::<Result<_, _>>()?,
        on_dependency_failure: match args.take("on_dep_fail").as_deref() {
            None => None,
            Some("cancel") => Some(DependencyFailure::Cancel),
            Some("block") => Some(DependencyFailure::Block),
            Some(other) => return Err(format!("`on_dep_fail={other}`: cancel or block")),
        },
        requires_approval: args.parsed("approval")?.unwrap_or(false),
        approval_expires_in_ms: args.parsed("approval_expires")?,
    };
    Ok(match routed {
        Some(epoch) => Command::SubmitRouted {
            epoch,
            lookback,
            task,
        },
        None => Command::Submit(task),
    })
}

fn lease_command(args: &mut Args) -> Result<Command, String> {
    Ok(Command::Lease {
        agent_id: AgentId(args.take("agent").unwrap_or_else(|| "w1".into())),
        capabilities: list(args.take("caps")),
        max: args.parsed("max")?.unwrap_or(1),
        lease_ms: args.parsed("lease")?.unwrap_or(30_000),
    })
}

fn dispatch_spec(args: &mut Args) -> Result<DispatchSpec, String> {
    let policy = match args.take("policy").as_deref() {
        None | Some("least_loaded") => DispatchPolicy::LeastLoaded,
        Some("round_robin") => DispatchPolicy::RoundRobin,
        Some(other) => {
            return Err(format!(
                "`policy={other}`: give least_loaded or round_robin"
            ));
        }
    };
    Ok(DispatchSpec {
        lease_ms: args.parsed("lease")?.unwrap_or(30_000),
        max: args.parsed("max")?.unwrap_or(100),
        policy,
        node_dead_after_ms: args.parsed("dead_after")?.unwrap_or(3_000),
        session_limit_ms: args.parsed("limit")?.unwrap_or(0),
        session_idle_ms: args.parsed("idle")?.unwrap_or(0),
        session_checkpoint_every: args.parsed("checkpoint_every")?.unwrap_or(0),
    })
}

/// `agents=a,b:1,c:2:high`: each agent, with its free capacity (default
/// 100) and the lowest priority it may take (default low).
fn pull_slots(args: &mut Args) -> Result<Vec<PullSlot>, String> {
    let value = args.take("agents").ok_or("`agents=` is required")?;
    list(Some(value))
        .iter()
        .map(|item| {
            let mut parts = item.split(':');
            let agent = AgentId(parts.next().unwrap_or_default().to_owned());
            let free = match parts.next() {
                None => 100,
                Some(n) => n
                    .parse()
                    .map_err(|_| format!("`{item}`: free is a number"))?,
            };
            let min_priority = match parts.next() {
                None => Priority::Low,
                Some(p) => p.parse().map_err(|e| format!("`{item}`: {e}"))?,
            };
            Ok(PullSlot {
                agent,
                free,
                min_priority,
                profile: None,
            })
        })
        .collect()
}

/// `tokens=1,2` as fencing tokens (required; `tokens=` is an empty list).
fn tokens(args: &mut Args) -> Result<Vec<FencingToken>, String> {
    let value = args.take("tokens").ok_or("`tokens=` is required")?;
    list(Some(value))
        .iter()
        .map(|s| {
            s.parse()
                .map(FencingToken)
                .map_err(|e| format!("`tokens`: {e}"))
        })
        .collect()
}

/// `release=1,2` as tokens; absent is none.
fn tokens_or_none(args: &mut Args) -> Result<Vec<FencingToken>, String> {
    list(args.take("release"))
        .iter()
        .map(|s| {
            s.parse()
                .map(FencingToken)
                .map_err(|e| format!("`release`: {e}"))
        })
        .collect()
}

fn health(s: &str) -> Result<Health, String> {
    Ok(match s {
        "unknown" => Health::Unknown,
        "healthy" => Health::Healthy,
        "degraded" => Health::Degraded,
        "unhealthy" => Health::Unhealthy,
        other => return Err(format!("`health={other}`: unknown health")),
    })
}

fn circuit(s: &str) -> Result<Circuit, String> {
    Ok(match s {
        "closed" => Circuit::Closed,
        "open" => Circuit::Open,
        "half_open" => Circuit::HalfOpen,
        other => return Err(format!("`circuit={other}`: unknown circuit state")),
    })
}

fn replay_command(args: &mut Args) -> Result<Command, String> {
    let limit = args.parsed("limit")?.unwrap_or(100);
    let selector = match args.take("ids") {
        Some(ids) => ReplaySelector::Ids(
            list(Some(ids))
                .iter()
                .map(|s| s.parse().map(TaskId).map_err(|e| format!("`ids`: {e}")))
                .collect::<Result<_, _>>()?,
        ),
        None => ReplaySelector::Filter(DeadLetterFilter {
            tenant: args.take("tenant").map(Tenant::from),
            priority: args.parsed("priority")?,
            error_contains: args.take("error"),
        }),
    };
    Ok(Command::Replay { selector, limit })
}

fn outcome_lines(outcome: &Outcome) -> Vec<String> {
    match outcome {
        Ok(Reply::Submitted { task, created }) => {
            let verb = if *created { "created" } else { "existing" };
            vec![format!("{verb} {}", task_line(task))]
        }
        Ok(Reply::Leased(grants)) if grants.is_empty() => vec!["leased none".into()],
        Ok(Reply::Leased(grants)) => grants.iter().map(grant_line).collect(),
        Ok(Reply::Task(task)) => vec![format!("ok {}", task_line(task))],
        Ok(Reply::Replayed(ids)) if ids.is_empty() => vec!["replayed none".into()],
        Ok(Reply::Replayed(ids)) => {
            let ids: Vec<String> = ids.iter().map(|id| format!("#{id}")).collect();
            vec![format!("replayed {}", ids.join(" "))]
        }
        Ok(Reply::Done) => vec!["ok".into()],
        Ok(Reply::NotHere) => vec!["not here".into()],
        Ok(Reply::Purged(n)) => vec![format!("purged {n}")],
        Ok(Reply::Session(s)) => vec![format!("ok {}", session_line(s))],
        Ok(Reply::Checkpoint(c)) => vec![format!("ok {}", checkpoint_line(c))],
        Ok(Reply::Dispatched(grants)) if grants.is_empty() => vec!["dispatched none".into()],
        Ok(Reply::Dispatched(grants)) => grants.iter().map(dispatch_grant_line).collect(),
        Ok(Reply::Renewed { stale }) => {
            let stale: Vec<String> = stale.iter().map(|t| t.to_string()).collect();
            vec![format!("renewed stale=[{}]", stale.join(","))]
        }
        Ok(Reply::Released(ids)) => {
            let ids: Vec<String> = ids.iter().map(|id| format!("#{id}")).collect();
            vec![format!("released [{}]", ids.join(" "))]
        }
        Ok(Reply::ApiKey(k)) => vec![format!(
            "ok key {} {} {} revoked={}",
            k.id,
            k.role,
            k.tenant,
            k.revoked_at_ms.map_or("-".into(), |t| t.to_string())
        )],
        Ok(Reply::Tenant { record, weight }) => vec![format!(
            "ok tenant {} weight={weight} max_queued={:?} rate={:?} burst={:?}",
            record.name,
            record.settings.max_queued,
            record.settings.rate_per_second,
            record.settings.burst
        )],
        Err(rejection) => vec![rejection_line(rejection)],
    }
}

fn grant_line(g: &LeaseGrant) -> String {
    format!(
        "leased #{} token={} expires={}",
        g.task.id, g.token, g.expires_at_ms
    )
}

/// A dispatched grant: as a lease grant, plus the agent it went to.
fn dispatch_grant_line(g: &LeaseGrant) -> String {
    let agent = g
        .task
        .lease
        .as_ref()
        .map_or("-".into(), |l| l.agent_id.to_string());
    format!(
        "leased #{} token={} agent={agent} expires={}",
        g.task.id, g.token, g.expires_at_ms
    )
}

/// One line per session: id and state, then where it runs and what it holds.
fn session_line(s: &SessionRecord) -> String {
    let mut line = format!(
        "session {} {} tenant={}",
        s.id,
        session_state(s.state),
        s.tenant
    );
    if let Some(k) = &s.session_key {
        line += &format!(" key={k}");
    }
    if let Some(a) = &s.agent {
        line += &format!(" agent={a}");
    }
    line += &format!(" gateway={}", s.gateway);
    if let Some(t) = s.task {
        line += &format!(" task=#{t}");
    }
    if let Some(d) = s.deadline_ms {
        line += &format!(" deadline={d}");
    }
    if s.idle_ms > 0 {
        line += &format!(" idle={}", s.idle_ms);
        if s.state == SessionState::Ready {
            line += &format!(" closes={}", s.updated_at_ms + s.idle_ms);
        }
    }
    if s.generation > 0 {
        line += &format!(" gen={}", s.generation);
    }
    if s.turns > 0 || s.input_tokens > 0 || s.output_tokens > 0 {
        line += &format!(
            " turns={} tokens={}/{}",
            s.turns, s.input_tokens, s.output_tokens
        );
    }
    if s.checkpoint_seq > 0 {
        line += &format!(" checkpoint={}", s.checkpoint_seq);
    }
    if let Some(c) = s.carry {
        line += &format!(" carry={c}");
    }
    if s.moving {
        match &s.target {
            Some(t) => line += &format!(" moving_to={t}"),
            None => line += " moving",
        }
    }
    match &s.after_task {
        Some(AfterTask::Pause) => line += " then=pause",
        Some(AfterTask::Migrate(t)) => {
            line += &format!(
                " then=migrate{}",
                t.as_ref().map(|g| format!(":{g}")).unwrap_or_default()
            );
        }
        None => {}
    }
    if let Some(e) = s.ended_as {
        line += &format!(" ended_as={}", session_state(e));
    }
    if let Some(r) = &s.reason {
        line += &format!(" reason={:?}", shorten(r));
    }
    line
}

fn session_state(s: SessionState) -> &'static str {
    match s {
        SessionState::Created => "created",
        SessionState::Initializing => "initializing",
        SessionState::Ready => "ready",
        SessionState::Running => "running",
        SessionState::Completing => "completing",
        SessionState::Completed => "completed",
        SessionState::Failed => "failed",
        SessionState::Cancelled => "cancelled",
        SessionState::Timeout => "timeout",
        SessionState::Error => "error",
        SessionState::Paused => "paused",
        SessionState::Resuming => "resuming",
        SessionState::Migrating => "migrating",
        SessionState::Archived => "archived",
    }
}

/// `checkpoint <seq> [name=N] turns=.. tokens=IN/OUT gateway=G ref=KEY
/// transcript=[#task "prompt" -> "reply", ...]`.
fn checkpoint_line(c: &Checkpoint) -> String {
    let mut line = format!("checkpoint {}", c.seq);
    if let Some(n) = &c.name {
        line += &format!(" name={n}");
    }
    line += &format!(
        " at={} turns={} tokens={}/{} gateway={}",
        c.at_ms, c.turns, c.input_tokens, c.output_tokens, c.gateway
    );
    if let Some(r) = &c.transcript_ref {
        line += &format!(" ref={r}");
    }
    let turns: Vec<String> = c
        .transcript
        .iter()
        .map(|t| {
            format!(
                "#{} {:?} -> {:?}",
                t.task,
                shorten(&t.prompt),
                shorten(&t.reply)
            )
        })
        .collect();
    line += &format!(" transcript=[{}]", turns.join(", "));
    line
}

fn rejection_line(r: &Rejection) -> String {
    let kind = match r {
        Rejection::NotFound(_) => "not_found",
        Rejection::StaleToken(_) => "stale_token",
        Rejection::IllegalTransition { .. } => "illegal_transition",
        Rejection::Invalid { .. } => "invalid",
        Rejection::TooLarge { .. } => "too_large",
        Rejection::Unknown { .. } => "unknown",
        Rejection::SessionTransition { .. } => "session_transition",
        Rejection::Conflict(_) => "conflict",
        Rejection::QuotaExceeded { .. } => "quota_exceeded",
        Rejection::Forbidden(_) => "forbidden",
        Rejection::StaleRoute { .. } => "stale_route",
    };
    format!("rejected {kind}: {r}")
}

/// `event <seq>: <subject> <what>`: task events as `#<id> <kind>`.
fn event_line(e: &Event) -> String {
    let what = match &e.what {
        What::Task { task, kind, .. } => format!("#{task} {}", task_kind(kind)),
        What::Session {
            id, state, reason, ..
        } => match reason {
            Some(r) => format!("session {id} {state} ({r})"),
            None => format!("session {id} {state}"),
        },
        What::Gateway { id, change } => match change {
            GatewayChange::Health { health, circuit } => {
                format!("gateway {id} health={health:?} circuit={circuit:?}")
            }
            GatewayChange::Placed { owner, token } => {
                format!("gateway {id} placed owner={owner:?} token={token}")
            }
            other => format!("gateway {id} {other:?}"),
        },
        What::Checkpoint {
            session, seq, name, ..
        } => match name {
            Some(n) => format!("session {session} checkpoint {seq} {n}"),
            None => format!("session {session} checkpoint {seq}"),
        },
        What::Agent { id, change } => format!("agent {id} {change:?}"),
        What::Node { id, change } => format!("node {id} {change:?}"),
        What::Budget(a) => format!(
            "tenant {} budget {} {} from day {} {}: {} of {}",
            a.tenant,
            a.period.as_str(),
            a.unit.as_str(),
            a.start_day,
            a.level.as_str(),
            a.used,
            a.limit
        ),
        What::Audit(a) => format!(
            "audit {} {} {} {} {}",
            a.seq, a.actor, a.action, a.target, a.outcome
        ),
    };
    format!("event {}: {what}", e.seq)
}

fn task_kind(kind: &EventKind) -> String {
    match kind {
        EventKind::Submitted => "submitted".into(),
        EventKind::Ready => "ready".into(),
        EventKind::Leased { token, agent } => format!("leased token={token} agent={agent}"),
        EventKind::Started => "started".into(),
        EventKind::Completed => "completed".into(),
        EventKind::Failed { retry_at_ms } => format!("failed retry_at={retry_at_ms}"),
        EventKind::DeadLettered => "dead_lettered".into(),
        EventKind::Cancelled => "cancelled".into(),
        EventKind::LeaseExpired { token } => format!("lease_expired token={token}"),
        EventKind::TimedOut { token } => format!("timed_out token={token}"),
        EventKind::Requeued => "requeued".into(),
        EventKind::Released { token } => format!("released token={token}"),
        EventKind::DependenciesMet => "dependencies_met".into(),
        EventKind::Blocked { dependency } => format!("blocked by #{dependency}"),
        EventKind::Approved { by } => format!("approved by {by}"),
        EventKind::Rejected { by } => format!("rejected by {by}"),
        EventKind::ApprovalExpired => "approval_expired".into(),
    }
}

/// One compact line per task: identity and queue position first, then only
/// the fields that are set.
fn task_line(t: &Task) -> String {
    let (x, o) = (t.extras(), t.outcome());
    let mut s = format!(
        "#{} {} {} {}",
        t.id,
        t.status.as_str(),
        t.priority.as_str(),
        t.tenant
    );
    let payload = t.payload.held().unwrap_or("(stored)");
    if payload != "{}" {
        s += &format!(" payload={}", shorten(payload));
    }
    if !t.capabilities.is_empty() {
        s += &format!(" caps={}", t.capabilities.join(","));
    }
    s += &format!(" attempts={}/{}", t.attempts, t.max_attempts);
    if t.lease_count > 0 {
        s += &format!(" leases={}", t.lease_count);
    }
    if let Some(l) = &t.lease {
        s += &format!(
            " token={} agent={} expires={}",
            l.token, l.agent_id, l.expires_at_ms
        );
    }
    if t.status == TaskStatus::Scheduled {
        s += &format!(" at={}", x.scheduled_at_ms.unwrap_or_default());
    }
    if let Some(next) = o.next_attempt_at_ms {
        s += &format!(" next={next}");
    }
    if t.timeout_ms != SubmitTask::DEFAULT_TIMEOUT_MS {
        s += &format!(" timeout={}", t.timeout_ms);
    }
    if let Some(p) = x.parent_id {
        s += &format!(" parent=#{p}");
    }
    if !x.depends_on.is_empty() {
        let ids: Vec<String> = x.depends_on.iter().map(|d| format!("#{d}")).collect();
        s += &format!(" deps={}", ids.join(","));
        if t.on_dependency_failure == DependencyFailure::Block {
            s += " on_dep_fail=block";
        }
    }
    if !x.waiting_on.is_empty() {
        let ids: Vec<String> = x.waiting_on.iter().map(|d| format!("#{d}")).collect();
        s += &format!(" waiting_on={}", ids.join(","));
    }
    if let Some(b) = &x.blocked {
        s += &format!(" blocked={b:?}");
    }
    if let Some(a) = &x.approval {
        match (&a.decision, a.expires_at_ms) {
            (Some(d), _) => {
                let how = if d.approved { "approved" } else { "rejected" };
                s += &format!(" {how}_by={}", d.by);
            }
            (None, Some(at)) => s += &format!(" approval_until={at}"),
            (None, None) => s += " approval=asked",
        }
    }
    if let Some(r) = &x.region {
        let how = if r.required { "required" } else { "preferred" };
        s += &format!(" region={}({how})", r.name);
    }
    if let Some(k) = &t.idempotency_key {
        s += &format!(" key={k}");
    }
    if let Some(trace) = &x.trace {
        s += &format!(" trace={}", trace.trace_hex());
    }
    if let Some(r) = &o.result {
        s += &format!(" result={}", shorten(r));
    }
    if let Some(e) = &o.last_error {
        s += &format!(" error={:?}", shorten(e));
    }
    s
}

fn shorten(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((end, _)) => format!("{}...({} bytes)", &s[..end], s.len()),
        None => s.to_owned(),
    }
}

/// The queue depth, then every non-zero count per tenant and priority.
fn depth_lines(state: &State) -> Vec<String> {
    let depth = state.depth();
    let mut head = format!("pending={}", depth.pending());
    for p in Priority::URGENT_FIRST {
        let n = depth.count(Some(p), TaskStatus::Pending, None);
        if n > 0 {
            head += &format!(" {}={n}", p.as_str());
        }
    }
    let mut out = vec![head];
    for (tenant, counts) in &depth.by_tenant {
        for p in Priority::URGENT_FIRST {
            let parts: Vec<String> = TaskStatus::ALL
                .into_iter()
                .filter(|s| counts[p.rank()][s.index()] > 0)
                .map(|s| format!("{}={}", s.as_str(), counts[p.rank()][s.index()]))
                .collect();
            if !parts.is_empty() {
                out.push(format!("{tenant} {}: {}", p.as_str(), parts.join(" ")));
            }
        }
    }
    out
}
