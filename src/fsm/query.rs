//! Reads: one task, pages of tasks, dead letters, queue depth.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use serde::Serialize;

use super::command::DeadLetterFilter;
use super::queue::normalize_caps;
use super::state::{Counts, State};
use super::task::{Priority, Task, TaskId, TaskStatus, Tenant};

/// Filters for listing tasks; `None` matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only this status.
    pub status: Option<TaskStatus>,
    /// Only this priority.
    pub priority: Option<Priority>,
    /// Only this tenant.
    pub tenant: Option<Tenant>,
}

impl TaskFilter {
    fn matches(&self, t: &Task) -> bool {
        self.status.is_none_or(|s| s == t.status)
            && self.priority.is_none_or(|p| p == t.priority)
            && self.tenant.as_ref().is_none_or(|x| *x == t.tenant)
    }
}

/// One page of a listing, in id order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskPage {
    /// The tasks (shared with the state: cheap to take).
    pub items: Vec<Arc<Task>>,
    /// Pass as `after` to get the next page; `None` at the end.
    pub next: Option<TaskId>,
}

impl TaskPage {
    /// One page of `limit` out of pages read from several queue shards with
    /// the same filter and cursor ([`merge_pages`]).
    pub fn merge(pages: Vec<TaskPage>, limit: usize) -> TaskPage {
        let pages = pages.into_iter().map(|p| (p.items, p.next)).collect();
        let (items, next) = merge_pages(pages, limit, |t: &Arc<Task>| t.id);
        TaskPage { items, next }
    }
}

/// One page of `limit` out of pages (items and next cursor) read from
/// several queue shards with the same filter and cursor. Ids order items
/// across shards (each shard's page is in id order), so the merged page is
/// the `limit` smallest ids, cut at the first shard's horizon: a shard page
/// with a `next` has shown every match up to it, and nothing past it. The
/// cursor stays one id.
pub fn merge_pages<T, K: Ord + Copy>(
    pages: Vec<(Vec<T>, Option<K>)>,
    limit: usize,
    id: impl Fn(&T) -> K,
) -> (Vec<T>, Option<K>) {
    let horizon = pages.iter().filter_map(|(_, next)| *next).min();
    let mut items: Vec<T> = pages
        .into_iter()
        .flat_map(|(items, _)| items)
        .filter(|t| horizon.is_none_or(|h| id(t) <= h))
        .collect();
    items.sort_by_key(|t| id(t));
    if items.len() > limit {
        items.truncate(limit);
        let next = items.last().map(&id);
        return (items, next);
    }
    (items, horizon)
}

/// Exact task counts, per tenant, priority and status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Depth {
    /// Per tenant: per priority (rank order), per status (declaration order).
    pub by_tenant: BTreeMap<Tenant, Counts>,
}

impl Depth {
    /// Tasks with `status` at priority `p`, over all tenants.
    pub fn count(&self, p: Option<Priority>, status: TaskStatus, tenant: Option<&Tenant>) -> u64 {
        self.by_tenant
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|x| x == *t))
            .flat_map(|(_, c)| c.iter().enumerate())
            .filter(|(rank, _)| p.is_none_or(|p| p.rank() == *rank))
            .map(|(_, per_status)| per_status[status.index()])
            .sum()
    }

    /// Adds `other`'s counts (another shard's) to these.
    pub fn add(&mut self, other: Depth) {
        for (tenant, counts) in other.by_tenant {
            let mine = self.by_tenant.entry(tenant).or_default();
            for (m, o) in mine.iter_mut().zip(counts.iter()) {
                for (a, b) in m.iter_mut().zip(o.iter()) {
                    *a += b;
                }
            }
        }
    }

    /// Pending tasks over everything: the queue depth.
    pub fn pending(&self) -> u64 {
        self.count(None, TaskStatus::Pending, None)
    }
}

impl State {
    /// One task.
    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id).map(|t| &**t)
    }

    /// One task, shared with the state (cheap to keep after the read).
    pub fn task_shared(&self, id: TaskId) -> Option<Arc<Task>> {
        self.tasks.get(&id).cloned()
    }

    /// Whether a pending task matches an agent with these capabilities.
    pub fn has_ready_for(&self, capabilities: &[String]) -> bool {
        self.ready.any_match(&normalize_caps(capabilities))
    }

    /// Number of tasks held (all statuses).
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The last fencing token handed out.
    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Up to `limit` tasks after `after` that match `filter`, scanning at most
    /// `scan_budget` tasks (a page may come back short but with a cursor).
    pub fn list(
        &self,
        filter: &TaskFilter,
        after: Option<TaskId>,
        limit: usize,
        scan_budget: usize,
    ) -> TaskPage {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut items = Vec::new();
        let mut last = None;
        for (scanned, (id, task)) in self.tasks.range((start, Bound::Unbounded)).enumerate() {
            if items.len() == limit || scanned == scan_budget {
                return TaskPage { items, next: last };
            }
            last = Some(*id);
            if filter.matches(task) {
                items.push(Arc::clone(task));
            }
        }
        TaskPage { items, next: None }
    }

    /// Up to `limit` dead letters after `after` matching `filter`, oldest first.
    pub fn dead_letter_page(
        &self,
        filter: &DeadLetterFilter,
        after: Option<TaskId>,
        limit: usize,
    ) -> TaskPage {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut ids = self
            .dead_letters
            .range((start, Bound::Unbounded))
            .filter(|id| filter.matches(&self.tasks[id]));
        let items: Vec<Arc<Task>> = ids
            .by_ref()
            .take(limit)
            .map(|id| Arc::clone(&self.tasks[id]))
            .collect();
        let next = if ids.next().is_some() {
            items.last().map(|t| t.id)
        } else {
            None
        };
        TaskPage { items, next }
    }

    /// Exact counts.
    pub fn depth(&self) -> Depth {
        Depth {
            by_tenant: self.counts.clone(),
        }
    }

    /// Tenants' round-robin weights that differ from the default of 1.
    pub fn tenant_weights(&self) -> &BTreeMap<Tenant, u32> {
        &self.weights
    }
}
