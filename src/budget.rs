//! Budgets: how much of each limit a tenant has used this UTC day and
//! calendar month (`fsm::Budget`, set on its tenant record). Tokens are
//! summed from the queue groups' ledgers on this node's replicas; cost is
//! those tokens at this node's `[prices]`, in millionths of a USD, so
//! every node should have the same prices. The API refuses a tenant's new
//! tasks while any limit is used up, and `/metrics` shows each limit's use
//! for the shipped alert rules.

use crate::config::Config;
use crate::fsm::{Budget, Day, State, Tenant, day_of, month_of};

pub use crate::fsm::{BudgetPeriod as Period, BudgetUnit as Unit};

/// One limit and how much of it is used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Use {
    /// Its period.
    pub period: Period,
    /// What it counts.
    pub unit: Unit,
    /// Used so far in the period.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// From which share of it, in percent, it alerts.
    pub soft_percent: u8,
    /// The period's first day.
    pub start_day: Day,
    /// When the period ends (ms since the epoch).
    pub resets_at_ms: u64,
}

impl Use {
    /// Used over the limit, 0 and up (1: the limit).
    pub fn ratio(&self) -> f64 {
        self.used as f64 / self.limit as f64
    }

    /// Whether the limit is used up.
    pub fn exhausted(&self) -> bool {
        self.used >= self.limit
    }

    /// The highest level it has reached, if any.
    pub fn level(&self) -> Option<crate::fsm::BudgetLevel> {
        if self.exhausted() {
            Some(crate::fsm::BudgetLevel::Exhausted)
        } else if self.used.saturating_mul(100)
            >= self.limit.saturating_mul(u64::from(self.soft_percent))
        {
            Some(crate::fsm::BudgetLevel::Soft)
        } else {
            None
        }
    }
}

/// On the meta leader: records an alert (with its event) for each budget
/// level a tenant's limit has reached in its period and that has not been
/// alerted yet. A limit found used up records its soft level too.
pub async fn alert(node: &crate::node::Node) {
    let budgets: Vec<(Tenant, Budget)> = node.state().read(|s| {
        s.auth()
            .tenants()
            .filter_map(|r| Some((r.name.clone(), r.settings.budget.clone()?)))
            .collect()
    });
    let now = crate::clock::now_ms();
    for (tenant, budget) in budgets {
        let visit = |f: &mut dyn FnMut(&State)| for_groups(node, f);
        for u in uses(&visit, node.config(), &tenant, &budget, now) {
            let levels: &[crate::fsm::BudgetLevel] = match u.level() {
                None => &[],
                Some(crate::fsm::BudgetLevel::Soft) => &[crate::fsm::BudgetLevel::Soft],
                Some(crate::fsm::BudgetLevel::Exhausted) => &[
                    crate::fsm::BudgetLevel::Soft,
                    crate::fsm::BudgetLevel::Exhausted,
                ],
            };
            for level in levels {
                let seen = node.state().read(|s| {
                    s.budget_alerted(&tenant, u.period, u.start_day, u.unit, *level, u.limit)
                });
                if seen {
                    continue;
                }
                let cmd = crate::fsm::Command::BudgetAlert(crate::fsm::BudgetAlert {
                    tenant: tenant.clone(),
                    period: u.period,
                    start_day: u.start_day,
                    unit: u.unit,
                    level: *level,
                    used: u.used,
                    limit: u.limit,
                });
                match node.write(cmd).await {
                    Ok(Ok(_)) => tracing::warn!(
                        tenant = %tenant,
                        period = u.period.as_str(),
                        unit = u.unit.as_str(),
                        level = level.as_str(),
                        used = u.used,
                        limit = u.limit,
                        "a tenant's budget crossed a level"
                    ),
                    Ok(Err(rejected)) => tracing::error!(error = %rejected, "budget alert refused"),
                    Err(e) => tracing::debug!(error = %e, "budget alert not recorded yet"),
                }
            }
        }
    }
}

/// Each queue group's replica, handed to a visitor in turn (they sit
/// behind locks: [`for_groups`] on a node).
pub type Visit<'a> = &'a dyn Fn(&mut dyn FnMut(&State));

/// [`Visit`] over a node's queue groups.
pub fn for_groups(node: &crate::node::Node, f: &mut dyn FnMut(&State)) {
    for g in node.queue_groups() {
        g.state().read(|s| f(s));
    }
}

/// Tokens and cost (millionths of a USD) `tenant` used on days
/// `from..=to`, and on day `to` alone, over the states `visit` hands out
/// (one pass over the month's rows serves both periods).
fn spent(
    visit: Visit<'_>,
    config: &Config,
    tenant: &Tenant,
    from: Day,
    to: Day,
) -> ((u64, u64), (u64, u64)) {
    let (mut tokens, mut cost) = ([0u64; 2], [0f64; 2]);
    visit(&mut |s: &State| {
        for (k, v) in s.ledger().tenant_rows(tenant, from, to) {
            let t = v.input_tokens.saturating_add(v.output_tokens);
            let c = config.price_of(k.model.as_deref()).map_or(0.0, |p| {
                v.input_tokens as f64 * p.input_per_mtok
                    + v.output_tokens as f64 * p.output_per_mtok
            });
            for i in 0..=usize::from(k.day == to) {
                tokens[i] = tokens[i].saturating_add(t);
                cost[i] += c;
            }
        }
    });
    // `as` saturates a float past u64::MAX.
    (
        (tokens[0], cost[0].round() as u64),
        (tokens[1], cost[1].round() as u64),
    )
}

/// Each limit of `budget` and its use at `now_ms`, over the states
/// `visit` hands out.
pub fn uses(
    visit: Visit<'_>,
    config: &Config,
    tenant: &Tenant,
    budget: &Budget,
    now_ms: u64,
) -> Vec<Use> {
    let today = day_of(now_ms);
    let (month_start, next_month) = month_of(today);
    let ms = |day: Day| u64::from(day) * 86_400_000;
    let ((month_tokens, month_cost), (day_tokens, day_cost)) =
        spent(visit, config, tenant, month_start, today);
    let limits = [
        (Period::Day, Unit::Tokens, budget.daily_tokens, day_tokens),
        (
            Period::Month,
            Unit::Tokens,
            budget.monthly_tokens,
            month_tokens,
        ),
        (Period::Day, Unit::Cost, budget.daily_cost_micros, day_cost),
        (
            Period::Month,
            Unit::Cost,
            budget.monthly_cost_micros,
            month_cost,
        ),
    ];
    limits
        .into_iter()
        .filter_map(|(period, unit, limit, used)| {
            let limit = limit?;
            let (start_day, resets_at_ms) = match period {
                Period::Day => (today, ms(today + 1)),
                Period::Month => (month_start, ms(next_month)),
            };
            Some(Use {
                period,
                unit,
                used,
                limit,
                soft_percent: budget.soft_percent,
                start_day,
                resets_at_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Command, FencingToken, SubmitTask};

    /// A state where tenant `a` completed one task using 1000 tokens in
    /// and 200 out of model `m` at `at_ms`.
    fn state_with_usage(at_ms: u64) -> State {
        let mut s = State::default();
        let spec = SubmitTask {
            tenant: Tenant("a".into()),
            payload: "{}".into(),
            ..SubmitTask::default()
        };
        s.apply_one(at_ms, Command::Submit(spec)).unwrap();
        s.apply_one(
            at_ms,
            Command::Lease {
                agent_id: crate::fsm::AgentId("w".into()),
                capabilities: vec![],
                max: 1,
                lease_ms: 30_000,
            },
        )
        .unwrap();
        s.apply_one(
            at_ms,
            Command::Complete {
                token: FencingToken(1),
                result: r#"{"usage":{"input":1000,"output":200},"model":"m"}"#.into(),
            },
        )
        .unwrap();
        s
    }

    #[test]
    fn limits_count_the_day_and_the_month() {
        let config =
            Config::from_toml("[prices.m]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n")
                .unwrap();
        // 2026-12-01 and 2026-12-05, noon.
        let dec1 = 20_788 * 86_400_000 + 43_200_000;
        let dec5 = 20_792 * 86_400_000 + 43_200_000;
        let states = [state_with_usage(dec1), state_with_usage(dec5)];
        let budget = Budget {
            daily_tokens: Some(2000),
            monthly_tokens: Some(2400),
            daily_cost_micros: None,
            monthly_cost_micros: Some(10_000),
            soft_percent: 80,
        };
        let visit = |f: &mut dyn FnMut(&State)| states.iter().for_each(&mut *f);
        let u = uses(&visit, &config, &Tenant("a".into()), &budget, dec5);
        let got: Vec<(&str, &str, u64, u64, bool)> = u
            .iter()
            .map(|u| {
                (
                    u.period.as_str(),
                    u.unit.as_str(),
                    u.used,
                    u.limit,
                    u.exhausted(),
                )
            })
            .collect();
        // Cost: 1000 x $3/M + 200 x $15/M = $0.006 = 6000 micros per task.
        assert_eq!(
            got,
            [
                ("day", "tokens", 1200, 2000, false),
                ("month", "tokens", 2400, 2400, true),
                ("month", "cost", 12_000, 10_000, true),
            ]
        );
        assert_eq!(u[0].resets_at_ms, 20_793 * 86_400_000);
        assert_eq!(u[1].resets_at_ms, 20_819 * 86_400_000);
        let other = uses(&visit, &config, &Tenant("b".into()), &budget, dec5);
        assert!(other.iter().all(|u| u.used == 0));
    }
}
