//! Usage: `GET /usage` and `GET /usage/export` (CSV). Tokens in and out,
//! compute time and tasks from each queue group's ledger
//! ([`crate::fsm::Ledger`]), added up over a range of days and grouped by
//! any of tenant, day, model, gateway and agent, with their cost at this
//! node's `[prices]`; and how long tasks waited for their first lease, by
//! tenant and priority. A developer or viewer sees its own tenant's.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Params;
use crate::clock;
use crate::fsm::{Day, Tenant, UsageKey, UsageTotals, WaitTotals, day_of};

/// The sums of a usage row, in the order the CSV export and the CLI's
/// table show them (after the columns grouped by).
pub const SUMS: [&str; 8] = [
    "completed",
    "failed_attempts",
    "lost_attempts",
    "input_tokens",
    "output_tokens",
    "compute_ms",
    "cost_usd",
    "unpriced_tokens",
];

/// Days a range may span.
const MAX_DAYS: u32 = 400;

/// Query parameters of `GET /usage` and `GET /usage/export`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only this tenant's (a developer or viewer may name only its own).
    tenant: Option<String>,
    /// First day (UTC), `YYYY-MM-DD`; default: 29 days before `to`.
    #[param(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    from: Option<String>,
    /// Last day (UTC), included, `YYYY-MM-DD`; default: today.
    #[param(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    to: Option<String>,
    /// What each row adds up by: a comma-separated list of `tenant`,
    /// `day`, `model`, `gateway`, `agent` (default `tenant`; empty: one
    /// row for everything).
    group_by: Option<String>,
}

/// One thing rows may be grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum By {
    Tenant,
    Day,
    Model,
    Gateway,
    Agent,
}

impl By {
    const ALL: [By; 5] = [By::Tenant, By::Day, By::Model, By::Gateway, By::Agent];

    fn name(self) -> &'static str {
        match self {
            By::Tenant => "tenant",
            By::Day => "day",
            By::Model => "model",
            By::Gateway => "gateway",
            By::Agent => "agent",
        }
    }
}

/// A parsed query.
struct Range {
    tenant: Option<Tenant>,
    from: Day,
    to: Day,
    by: Vec<By>,
}

fn parse_day(field: &str, s: &str) -> ApiResult<Day> {
    let bad = || {
        ApiError::invalid(format!(
            "invalid `{field}`: `{s}` is not a date (YYYY-MM-DD)"
        ))
    };
    if s.len() != 10 {
        return Err(bad());
    }
    let ms = clock::parse_rfc3339(&format!("{s}T00:00:00Z")).map_err(|_| bad())?;
    Ok(day_of(ms))
}

fn day_text(day: Day) -> String {
    clock::rfc3339(u64::from(day) * 86_400_000)[..10].to_owned()
}

impl UsageQuery {
    fn range(&self, caller: &Caller) -> ApiResult<Range> {
        let tenant = caller.tenant_filter(self.tenant.clone())?;
        let to = match &self.to {
            Some(s) => parse_day("to", s)?,
            None => day_of(clock::now_ms()),
        };
        let from = match &self.from {
            Some(s) => parse_day("from", s)?,
            None => to.saturating_sub(29),
        };
        if from > to {
            return Err(ApiError::invalid("invalid `from`: after `to`"));
        }
        if to - from >= MAX_DAYS {
            return Err(ApiError::invalid(format!(
                "invalid `from`: a range spans at most {MAX_DAYS} days"
            )));
        }
        let mut by = Vec::new();
        for name in self
            .group_by
            .as_deref()
            .unwrap_or("tenant")
            .split(',')
            .filter(|n| !n.is_empty())
        {
            let b = By::ALL.into_iter().find(|b| b.name() == name).ok_or_else(|| {
                ApiError::invalid(format!(
                    "invalid `group_by`: `{name}` is not one of tenant, day, model, gateway, agent"
                ))
            })?;
            if !by.contains(&b) {
                by.push(b);
            }
        }
        by.sort();
        Ok(Range {
            tenant,
            from,
            to,
            by,
        })
    }
}

/// A row's group: the values of the columns grouped by (`None` for the
/// others, and for a model or gateway not named).
type Group = [Option<String>; 5];

fn group_of(key: &UsageKey, by: &[By]) -> Group {
    let mut g: Group = Default::default();
    for b in by {
        g[*b as usize] = match b {
            By::Tenant => Some(key.tenant.to_string()),
            By::Day => Some(day_text(key.day)),
            By::Model => key.model.clone(),
            By::Gateway => key.gateway.as_ref().map(|g| g.0.clone()),
            By::Agent => Some(key.agent.0.clone()),
        };
    }
    g
}

/// One row of `GET /usage`.
#[derive(Serialize, ToSchema)]
pub struct UsageRow {
    /// With `group_by=tenant`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    /// With `group_by=day`: `YYYY-MM-DD`.
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<String>,
    /// With `group_by=model`: the model results named (`null`: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<Option<String>>,
    /// With `group_by=gateway`: the agents' gateway (`null`: workers that
    /// lease by themselves).
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<Option<String>>,
    /// With `group_by=agent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    /// Tasks completed.
    completed: u64,
    /// Attempts that failed (reported failures, timeouts, sessions that
    /// ended under them).
    failed_attempts: u64,
    /// Attempts that ended with no report (lease expired or given back,
    /// cancelled while running).
    lost_attempts: u64,
    /// Tokens in.
    input_tokens: u64,
    /// Tokens out.
    output_tokens: u64,
    /// Time from lease to each attempt's end, summed, in ms.
    compute_ms: u64,
    /// Cost in USD of the tokens with a price (`[prices]`).
    cost_usd: f64,
    /// Tokens (in and out) of models with no price, not in `cost_usd`.
    unpriced_tokens: u64,
}

/// Waits for a first lease, per tenant and priority, over the range.
#[derive(Serialize, ToSchema)]
pub struct WaitRow {
    tenant: String,
    #[schema(value_type = crate::fsm::Priority)]
    priority: &'static str,
    /// Tasks leased for the first time.
    tasks: u64,
    /// Their mean wait (from when they were ready: submission, scheduled
    /// time, approval or dependencies met; a kill switch's hold counts), in ms.
    mean_wait_ms: u64,
    /// The longest, in ms.
    max_wait_ms: u64,
}

/// `GET /usage` answer.
#[derive(Serialize, ToSchema)]
pub struct UsageView {
    /// First day, `YYYY-MM-DD`.
    from: String,
    /// Last day, included.
    to: String,
    /// What the rows are grouped by.
    group_by: Vec<&'static str>,
    /// One per group, in group order.
    items: Vec<UsageRow>,
    /// Queue waits.
    waits: Vec<WaitRow>,
}

/// Sums of a group, with its cost.
#[derive(Default)]
struct Sum {
    totals: UsageTotals,
    cost_usd: f64,
    unpriced_tokens: u64,
}

async fn gather(api: &Api, r: &Range) -> ApiResult<(Vec<(Group, Sum)>, Vec<WaitRow>)> {
    let seen = |t: &Tenant, day: Day| {
        (r.from..=r.to).contains(&day) && r.tenant.as_ref().is_none_or(|x| x == t)
    };
    let parts = api
        .read_queue(|s| {
            let rows: Vec<(UsageKey, UsageTotals)> = s
                .ledger()
                .rows()
                .iter()
                .filter(|(k, _)| seen(&k.tenant, k.day))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let waits: Vec<(Tenant, crate::fsm::Priority, WaitTotals)> = s
                .ledger()
                .waits()
                .iter()
                .filter(|(k, _)| seen(&k.tenant, k.day))
                .map(|(k, v)| (k.tenant.clone(), k.priority, v.clone()))
                .collect();
            (rows, waits)
        })
        .await?;
    let config = api.node.config();
    let mut groups: BTreeMap<Group, Sum> = BTreeMap::new();
    let mut waits: BTreeMap<(Tenant, std::cmp::Reverse<crate::fsm::Priority>), WaitTotals> =
        BTreeMap::new();
    for (rows, part_waits) in parts {
        for (key, totals) in rows {
            let sum = groups.entry(group_of(&key, &r.by)).or_default();
            sum.totals.add(&totals);
            match config.price_of(key.model.as_deref()) {
                Some(p) => {
                    sum.cost_usd += (totals.input_tokens as f64 * p.input_per_mtok
                        + totals.output_tokens as f64 * p.output_per_mtok)
                        / 1e6;
                }
                None => {
                    sum.unpriced_tokens = sum
                        .unpriced_tokens
                        .saturating_add(totals.input_tokens)
                        .saturating_add(totals.output_tokens);
                }
            }
        }
        for (tenant, priority, w) in part_waits {
            let e = waits
                .entry((tenant, std::cmp::Reverse(priority)))
                .or_default();
            e.add(&w);
        }
    }
    let waits = waits
        .into_iter()
        .map(|((tenant, p), w)| WaitRow {
            tenant: tenant.to_string(),
            priority: p.0.as_str(),
            tasks: w.tasks,
            mean_wait_ms: w.wait_ms.checked_div(w.tasks).unwrap_or(0),
            max_wait_ms: w.max_wait_ms,
        })
        .collect();
    Ok((groups.into_iter().collect(), waits))
}

fn row(by: &[By], g: Group, s: Sum) -> UsageRow {
    let has = |b: By| by.contains(&b);
    let [tenant, day, model, gateway, agent] = g;
    UsageRow {
        tenant: has(By::Tenant).then_some(tenant).flatten(),
        day: has(By::Day).then_some(day).flatten(),
        model: has(By::Model).then_some(model),
        gateway: has(By::Gateway).then_some(gateway),
        agent: has(By::Agent).then_some(agent).flatten(),
        completed: s.totals.completed,
        failed_attempts: s.totals.failed_attempts,
        lost_attempts: s.totals.lost_attempts,
        input_tokens: s.totals.input_tokens,
        output_tokens: s.totals.output_tokens,
        compute_ms: s.totals.compute_ms,
        cost_usd: (s.cost_usd * 1e6).round() / 1e6,
        unpriced_tokens: s.unpriced_tokens,
    }
}

/// `GET /usage`: tokens, compute time, cost and queue waits over a range
/// of days.
#[utoipa::path(
    get,
    path = "/usage",
    params(UsageQuery),
    responses(
        (status = 200, description = "Usage over the range", body = UsageView),
        (status = 400, description = "A bad date, range or group", body = super::error::ErrorBody),
    )
)]
pub async fn get(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<UsageQuery>,
) -> ApiResult<Json<UsageView>> {
    let r = q.range(&caller)?;
    let (groups, waits) = gather(&api, &r).await?;
    Ok(Json(UsageView {
        from: day_text(r.from),
        to: day_text(r.to),
        group_by: r.by.iter().map(|b| b.name()).collect(),
        items: groups.into_iter().map(|(g, s)| row(&r.by, g, s)).collect(),
        waits,
    }))
}

/// A CSV field: quoted when it holds a comma, quote or line break, and
/// led by `'` when it starts like a spreadsheet formula (`=`, `+`, `-`,
/// `@`, a tab or a carriage return), so that opening the export in a
/// spreadsheet cannot run a model or agent name someone chose.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// `GET /usage/export`: the rows of `GET /usage` as CSV, one header line
/// (the columns grouped by, then the sums).
#[utoipa::path(
    get,
    path = "/usage/export",
    params(UsageQuery),
    responses(
        (status = 200, description = "The rows as CSV", content_type = "text/csv", body = String),
        (status = 400, description = "A bad date, range or group", body = super::error::ErrorBody),
    )
)]
pub async fn export(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<UsageQuery>,
) -> ApiResult<impl IntoResponse> {
    let r = q.range(&caller)?;
    let (groups, _) = gather(&api, &r).await?;
    let mut head: Vec<&str> = r.by.iter().map(|b| b.name()).collect();
    head.extend(SUMS);
    let mut out = head.join(",");
    out.push('\n');
    for (g, s) in groups {
        let mut fields: Vec<String> =
            r.by.iter()
                .map(|b| csv_field(g[*b as usize].as_deref().unwrap_or("")))
                .collect();
        fields.extend([
            s.totals.completed.to_string(),
            s.totals.failed_attempts.to_string(),
            s.totals.lost_attempts.to_string(),
            s.totals.input_tokens.to_string(),
            s.totals.output_tokens.to_string(),
            s.totals.compute_ms.to_string(),
            format!("{:.6}", s.cost_usd),
            s.unpriced_tokens.to_string(),
        ]);
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out))
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("acme"), "acme");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-2"), "'-2");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("=1,2"), "\"'=1,2\"");
        assert_eq!(csv_field("m-1"), "m-1", "a dash inside is fine");
    }
}
