//! Token and compute accounting: what each completed task reported using,
//! added up per tenant, day, model, gateway and agent, and how long tasks
//! waited for their first lease per tenant, day and priority.
//!
//! A driver reports tokens in its result, as a `usage` object: OpenClaw's
//! `{"input", "output"}` (the `openclaw` driver puts it there), or the
//! `input_tokens`/`output_tokens` and `prompt_tokens`/`completion_tokens`
//! names of the common model APIs, an `http` or `command` gateway's own
//! choice. A `model` next to the counts, or at the top of the result, names
//! the model (prices are per model: `GET /usage` turns tokens into cost
//! with the node's `[prices]`, so the ledger holds no money). Reading the
//! result is deterministic: every replica reads the same bytes.
//!
//! The ledger keeps days, not attempts: rows older than
//! [`Ledger::KEEP_DAYS`] are dropped when the first task of a new day is
//! counted, so it stays bounded by tenants x models x agents x days.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::registry::GatewayId;
use super::task::{AgentId, Priority, Tenant};

/// One day, in days since the Unix epoch (UTC).
pub type Day = u32;

/// The day `ms` (since the epoch) falls in.
pub fn day_of(ms: u64) -> Day {
    (ms / 86_400_000) as Day
}

/// The calendar month (UTC) `day` falls in: its first day, and the first
/// day of the next.
pub fn month_of(day: Day) -> (Day, Day) {
    let (y, m, _) = civil_from_days(i64::from(day));
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (
        days_from_civil(y, m, 1) as Day,
        days_from_civil(ny, nm, 1) as Day,
    )
}

/// Year, month (1-12) and day (1-31) of day `z` since 1970-01-01 (H.
/// Hinnant's algorithm, proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of `y`-`m`-`d`.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Which period a budget limit covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BudgetPeriod {
    /// The UTC day.
    Day,
    /// The calendar month (UTC).
    Month,
}

impl BudgetPeriod {
    /// Its name, as metric labels, events and error messages say it.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }
}

/// What a budget limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BudgetUnit {
    /// Tokens in and out.
    Tokens,
    /// Cost, in millionths of a USD.
    Cost,
}

impl BudgetUnit {
    /// Its name, as metric labels and events say it.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetUnit::Tokens => "tokens",
            BudgetUnit::Cost => "cost",
        }
    }
}

/// How far a budget limit is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BudgetLevel {
    /// Past its soft share.
    Soft,
    /// Used up: the tenant's new tasks are refused.
    Exhausted,
}

impl BudgetLevel {
    /// Its name, as events say it.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetLevel::Soft => "soft_limit",
            BudgetLevel::Exhausted => "exhausted",
        }
    }
}

/// A budget limit crossed a level in a period ([`super::Command::BudgetAlert`]):
/// recorded once per tenant, period, unit and level, with an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetAlert {
    /// The tenant.
    pub tenant: Tenant,
    /// The period the limit covers.
    pub period: BudgetPeriod,
    /// The first day of that period.
    pub start_day: Day,
    /// What the limit counts.
    pub unit: BudgetUnit,
    /// The level crossed.
    pub level: BudgetLevel,
    /// Used when it was seen (tokens, or millionths of a USD).
    pub used: u64,
    /// The limit.
    pub limit: u64,
}

/// Longest model name kept; a longer one is cut.
const MAX_MODEL_BYTES: usize = 128;

/// What one task's completed attempt used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUsage {
    /// Tokens in (prompt), as the driver reported.
    pub input_tokens: u64,
    /// Tokens out (completion).
    pub output_tokens: u64,
    /// The model, when the result named one.
    pub model: Option<String>,
    /// The completed attempt's time from lease to completion, in ms.
    pub compute_ms: u64,
}

/// Largest token count taken from one result; a larger one counts as
/// this (a worker's report must not overflow the sums, nor a budget
/// wrap round).
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000_000;

/// The parts of a result that name usage. Everything else in it (the
/// text, which may be large) is skipped, not kept.
#[derive(Deserialize)]
struct Reported {
    usage: Option<UsageObject>,
    model: Option<serde_json::Value>,
}

/// A result's `usage` object, under any of the names it may use. A count
/// that is not a whole number is ignored.
#[derive(Deserialize)]
struct UsageObject {
    input: Option<serde_json::Value>,
    input_tokens: Option<serde_json::Value>,
    prompt_tokens: Option<serde_json::Value>,
    output: Option<serde_json::Value>,
    output_tokens: Option<serde_json::Value>,
    completion_tokens: Option<serde_json::Value>,
    model: Option<serde_json::Value>,
}

/// Tokens a worker reports a failed attempt used (`POST
/// /leases/{token}/fail`'s `usage`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedUsage {
    /// Tokens in.
    pub input_tokens: u64,
    /// Tokens out.
    pub output_tokens: u64,
    /// The model.
    pub model: Option<String>,
}

impl ReportedUsage {
    /// The counts capped at [`MAX_REPORTED_TOKENS`], and the model cut
    /// to its longest kept length (an empty one: not named).
    pub fn bounded(&self) -> (u64, u64, Option<String>) {
        (
            self.input_tokens.min(MAX_REPORTED_TOKENS),
            self.output_tokens.min(MAX_REPORTED_TOKENS),
            self.model
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(|m| super::state::truncate(m, MAX_MODEL_BYTES)),
        )
    }
}

/// Tokens and model read from a result (`None`: it reports no usage).
/// Each count is capped at [`MAX_REPORTED_TOKENS`].
pub fn parse_usage(result: &str) -> Option<(u64, u64, Option<String>)> {
    if !result.contains("\"usage\"") {
        return None;
    }
    let r: Reported = serde_json::from_str(result).ok()?;
    let u = r.usage?;
    let count = |names: [&Option<serde_json::Value>; 3]| {
        names
            .into_iter()
            .find_map(|v| v.as_ref().and_then(serde_json::Value::as_u64))
            .map(|n| n.min(MAX_REPORTED_TOKENS))
    };
    let input = count([&u.input, &u.input_tokens, &u.prompt_tokens]);
    let output = count([&u.output, &u.output_tokens, &u.completion_tokens]);
    if input.is_none() && output.is_none() {
        return None;
    }
    let model = u
        .model
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .or_else(|| r.model.as_ref().and_then(serde_json::Value::as_str))
        .filter(|m| !m.is_empty())
        .map(|m| super::state::truncate(m, MAX_MODEL_BYTES));
    Some((input.unwrap_or(0), output.unwrap_or(0), model))
}

/// What one ledger row adds up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UsageKey {
    /// Whose tasks.
    pub tenant: Tenant,
    /// The day they completed on.
    pub day: Day,
    /// The model their results named (none: not named).
    pub model: Option<String>,
    /// The gateway of the agent that ran them (none: a worker that leased
    /// by itself and is not registered on one).
    pub gateway: Option<GatewayId>,
    /// The agent that ran them.
    pub agent: AgentId,
}

/// A ledger row's sums.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Tasks completed.
    pub completed: u64,
    /// Attempts that failed: reported failures, timeouts, sessions that
    /// ended under them (their compute time counts; tokens are not
    /// reported by a failure).
    pub failed_attempts: u64,
    /// Attempts that ended with no report: the lease expired or was given
    /// back, or the task was cancelled (by an operator, its parent or a
    /// kill switch) while it ran. Their compute time counts.
    pub lost_attempts: u64,
    /// Tokens in.
    pub input_tokens: u64,
    /// Tokens out.
    pub output_tokens: u64,
    /// Time from lease to the attempt's end, summed, in ms.
    pub compute_ms: u64,
}

impl UsageTotals {
    /// Adds `other` in.
    pub fn add(&mut self, other: &UsageTotals) {
        self.completed = self.completed.saturating_add(other.completed);
        self.failed_attempts = self.failed_attempts.saturating_add(other.failed_attempts);
        self.lost_attempts = self.lost_attempts.saturating_add(other.lost_attempts);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.compute_ms = self.compute_ms.saturating_add(other.compute_ms);
    }
}

/// How long tasks waited for their first lease, per tenant, day (of the
/// lease) and priority.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WaitKey {
    /// Whose tasks.
    pub tenant: Tenant,
    /// The day of their first lease.
    pub day: Day,
    /// Their priority.
    pub priority: Priority,
}

/// A wait row's sums.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitTotals {
    /// Tasks leased for the first time.
    pub tasks: u64,
    /// Their waits (from when they were ready: submission, scheduled time,
    /// approval or dependencies met; to the first lease), summed, in ms.
    pub wait_ms: u64,
    /// The longest of them, in ms.
    pub max_wait_ms: u64,
}

impl WaitTotals {
    /// Adds `other` in.
    pub fn add(&mut self, other: &WaitTotals) {
        self.tasks = self.tasks.saturating_add(other.tasks);
        self.wait_ms = self.wait_ms.saturating_add(other.wait_ms);
        self.max_wait_ms = self.max_wait_ms.max(other.max_wait_ms);
    }
}

/// The accounting, part of the state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    rows: BTreeMap<UsageKey, UsageTotals>,
    waits: BTreeMap<WaitKey, WaitTotals>,
    /// The latest day counted (pruning runs when it moves).
    last_day: Day,
}

impl Ledger {
    /// Days kept, counting today.
    pub const KEEP_DAYS: Day = 400;

    /// The rows, in key order.
    pub fn rows(&self) -> &BTreeMap<UsageKey, UsageTotals> {
        &self.rows
    }

    /// Tenant `tenant`'s rows of days `from..=to`.
    pub fn tenant_rows<'a>(
        &'a self,
        tenant: &'a Tenant,
        from: Day,
        to: Day,
    ) -> impl Iterator<Item = (&'a UsageKey, &'a UsageTotals)> + 'a {
        let start = UsageKey {
            tenant: tenant.clone(),
            day: from,
            model: None,
            gateway: None,
            agent: AgentId(String::new()),
        };
        self.rows
            .range(start..)
            .take_while(move |(k, _)| k.tenant == *tenant && k.day <= to)
    }

    /// The wait rows, in key order.
    pub fn waits(&self) -> &BTreeMap<WaitKey, WaitTotals> {
        &self.waits
    }

    /// Most rows one tenant has in one day; past it, a new model, gateway
    /// and agent combination is counted in the day's [`Ledger::OTHER`]
    /// row (a worker that leases under ever new agent ids, or results
    /// naming ever new models, cannot grow the state without bound).
    pub const MAX_ROWS_PER_TENANT_DAY: usize = 1_000;

    /// The model and agent name of a tenant's row for the combinations
    /// past [`Ledger::MAX_ROWS_PER_TENANT_DAY`].
    pub const OTHER: &'static str = "(other)";

    /// Adds `totals` to row `key`.
    pub(crate) fn add(&mut self, key: UsageKey, totals: &UsageTotals) {
        self.roll(key.day);
        if let Some(row) = self.rows.get_mut(&key) {
            row.add(totals);
            return;
        }
        let key = if self.tenant_rows(&key.tenant, key.day, key.day).count()
            >= Self::MAX_ROWS_PER_TENANT_DAY
        {
            UsageKey {
                model: Some(Self::OTHER.into()),
                gateway: None,
                agent: AgentId(Self::OTHER.into()),
                ..key
            }
        } else {
            key
        };
        self.rows.entry(key).or_default().add(totals);
    }

    /// Counts one first lease after `wait_ms`.
    pub(crate) fn waited(&mut self, key: WaitKey, wait_ms: u64) {
        self.roll(key.day);
        let w = self.waits.entry(key).or_default();
        w.add(&WaitTotals {
            tasks: 1,
            wait_ms,
            max_wait_ms: wait_ms,
        });
    }

    /// On a new day, drops the rows older than [`Ledger::KEEP_DAYS`].
    fn roll(&mut self, day: Day) {
        if day <= self.last_day {
            return;
        }
        self.last_day = day;
        let oldest = day.saturating_sub(Self::KEEP_DAYS - 1);
        self.rows.retain(|k, _| k.day >= oldest);
        self.waits.retain(|k, _| k.day >= oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_under_the_common_names() {
        let r = |s: &str| parse_usage(s);
        assert_eq!(
            r(r#"{"text":"hi","usage":{"input":10,"output":5,"total":15}}"#),
            Some((10, 5, None))
        );
        assert_eq!(
            r(r#"{"model":"m-1","usage":{"prompt_tokens":7,"completion_tokens":2}}"#),
            Some((7, 2, Some("m-1".into())))
        );
        assert_eq!(
            r(r#"{"usage":{"input_tokens":3,"model":"m-2"}}"#),
            Some((3, 0, Some("m-2".into())))
        );
        // Nothing usable: no usage, counts that are not counts, not JSON.
        assert_eq!(r(r#"{"text":"usage"}"#), None);
        assert_eq!(r(r#"{"usage":{"input":-1,"output":"5"}}"#), None);
        assert_eq!(r(r#"{"usage": 12}"#), None);
        assert_eq!(r(r#"not json "usage""#), None);
        // A count that is not a whole number is ignored; a model that is
        // not a string is not named.
        assert_eq!(
            r(r#"{"usage":{"input":1.5,"prompt_tokens":4,"output":2},"model":7}"#),
            Some((4, 2, None))
        );
        // Counts past the cap are capped (u64::MAX included).
        assert_eq!(
            r(r#"{"usage":{"input":18446744073709551615,"output":1000000000001}}"#),
            Some((MAX_REPORTED_TOKENS, MAX_REPORTED_TOKENS, None))
        );
    }

    #[test]
    fn sums_saturate() {
        let mut l = Ledger::default();
        let key = UsageKey {
            tenant: Tenant("a".into()),
            day: 1,
            model: None,
            gateway: None,
            agent: AgentId("w".into()),
        };
        let huge = UsageTotals {
            completed: u64::MAX,
            failed_attempts: u64::MAX,
            lost_attempts: u64::MAX,
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
            compute_ms: u64::MAX,
        };
        l.add(key.clone(), &huge);
        l.add(key.clone(), &huge);
        assert_eq!(l.rows()[&key], huge);
        let wait = WaitKey {
            tenant: Tenant("a".into()),
            day: 1,
            priority: Priority::High,
        };
        l.waited(wait.clone(), u64::MAX);
        l.waited(wait.clone(), 5);
        let w = &l.waits()[&wait];
        assert_eq!((w.tasks, w.wait_ms, w.max_wait_ms), (2, u64::MAX, u64::MAX));
    }

    #[test]
    fn a_tenant_day_holds_a_bounded_number_of_rows() {
        let mut l = Ledger::default();
        let one = UsageTotals {
            completed: 1,
            ..UsageTotals::default()
        };
        let key = |tenant: &str, agent: usize| UsageKey {
            tenant: Tenant(tenant.into()),
            day: 3,
            model: Some(format!("m{agent}")),
            gateway: None,
            agent: AgentId(format!("w{agent}")),
        };
        let n = Ledger::MAX_ROWS_PER_TENANT_DAY;
        for i in 0..n + 50 {
            l.add(key("a", i), &one);
        }
        // A known row still counts under its own key.
        l.add(key("a", 0), &one);
        l.add(key("b", 0), &one);
        let tenant = Tenant("a".into());
        let a: Vec<_> = l.tenant_rows(&tenant, 3, 3).collect();
        assert_eq!(a.len(), n + 1, "the rows kept, then one (other) row");
        assert_eq!(l.rows()[&key("a", 0)].completed, 2);
        let other = UsageKey {
            model: Some(Ledger::OTHER.into()),
            agent: AgentId(Ledger::OTHER.into()),
            ..key("a", 0)
        };
        assert_eq!(l.rows()[&other].completed, 50);
        assert_eq!(
            l.rows()[&key("b", 0)].completed,
            1,
            "another tenant has its own"
        );
        let total: u64 = a.iter().map(|(_, v)| v.completed).sum();
        assert_eq!(total, n as u64 + 51, "nothing is lost");
    }

    #[test]
    fn months_start_on_their_first_day() {
        // 2026-12-05 is day 20_792.
        assert_eq!(civil_from_days(20_792), (2026, 12, 5));
        assert_eq!(month_of(20_792), (20_788, 20_819));
        assert_eq!(civil_from_days(20_819), (2027, 1, 1));
        // February of a leap year.
        let feb = days_from_civil(2028, 2, 10) as Day;
        let (start, next) = month_of(feb);
        assert_eq!(next - start, 29);
        assert_eq!(civil_from_days(i64::from(start)), (2028, 2, 1));
        for day in 0..30_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn old_days_are_dropped_when_a_new_day_is_counted() {
        let mut l = Ledger::default();
        let key = |day| UsageKey {
            tenant: Tenant("a".into()),
            day,
            model: None,
            gateway: None,
            agent: AgentId("w".into()),
        };
        let one = UsageTotals {
            completed: 1,
            ..UsageTotals::default()
        };
        l.add(key(1), &one);
        l.add(key(1), &one);
        l.add(key(Ledger::KEEP_DAYS), &one);
        assert_eq!(l.rows().len(), 2, "day 1 is still within the days kept");
        assert_eq!(l.rows()[&key(1)].completed, 2);
        l.add(key(Ledger::KEEP_DAYS + 1), &one);
        assert!(!l.rows().contains_key(&key(1)), "day 1 dropped");
        assert_eq!(l.rows().len(), 2);
    }
}
