//! Region faults, on the regions-3x3 shape (three regions of three nodes):
//! one region cut off from the other two, and one region killed. Either way
//! six of nine voters remain, a majority, which must go on dispatching.
//!
//! - **region-partition** tells every node of the region to drop the other
//!   regions' nodes, then every other node to drop the region's nodes (the
//!   fault-injection endpoints), so the cut is symmetric; for `hold` it
//!   asks every node of the cut-off region for leases, each on its own loop
//!   (a cut-off leader answers a write only when it times out), then heals
//!   every node. A node that blocks a peer neither sends to it nor answers
//!   it, so the cut is whole once the region's own nodes are told: they are
//!   told first, one by one, the leader last (each call commits an audit
//!   entry before it blocks, which a cut-off leader could not), and that
//!   moment is when the fault is in place. The other side's calls follow
//!   at once; theirs commit on the new leader, so they return later.
//! - **region-loss** SIGKILLs the region's three nodes one after the other
//!   (no await between them), restarts them after `hold`.
//!
//! After either, the drill waits (bounded) until each node of the region
//! has caught up. The record's `in_place_ms` is when the fault was fully in
//! place: recovery is measured from the injection to the first dispatch of
//! a task submitted after that moment, which only the majority can have
//! committed (`verdict.rs`).

use anyhow::{Result, bail};
use futures_util::future::join_all;
use serde_json::json;
use tokio::time::Instant;

use crate::drill::{FaultSpec, Target};
use crate::fleet::now_ms;
use crate::inject::{CATCH_UP, Injector, PROBE_EVERY, Probes, probe_once};
use crate::support::Api;

impl Injector<'_> {
    /// The region `t` names (the leader's, another drawn from the seed, or
    /// any), the indices of its nodes, and whether it holds the leader.
    async fn pick_region(&mut self, t: Target) -> (String, Vec<usize>, bool) {
        let leader = self.c.leader().await;
        let mut regions: Vec<String> = Vec::new();
        for i in 0..self.c.len() {
            let r = self.c.node(i).region();
            if !regions.iter().any(|x| x == r) {
                regions.push(r.to_owned());
            }
        }
        let leaders = self.c.node(leader).region().to_owned();
        let region = match t {
            Target::Leader => leaders.clone(),
            Target::Follower => {
                let others: Vec<String> = regions.into_iter().filter(|r| *r != leaders).collect();
                others[self.draw(others.len())].clone()
            }
            Target::Random => regions[self.draw(regions.len())].clone(),
        };
        let nodes = (0..self.c.len())
            .filter(|i| self.c.node(*i).region() == region)
            .collect();
        let held = region == leaders;
        (region, nodes, held)
    }

    fn ids(&self, nodes: &[usize]) -> Vec<u64> {
        let mut ids: Vec<u64> = nodes.iter().map(|i| self.c.node(*i).id).collect();
        ids.sort_unstable();
        ids
    }

    fn region_record(
        &mut self,
        label: String,
        region: &str,
        hit: &[usize],
        at: (u64, u64),
        note: String,
    ) {
        let ids: Vec<String> = self.ids(hit).iter().map(u64::to_string).collect();
        let hit = format!("region {region} (nodes {})", ids.join(", "));
        self.record_hit(label, hit, None, at, note);
    }

    /// Cuts the region off from the others (both directions), probes
    /// leases through each of its nodes for `hold`, heals.
    pub async fn region_partition(&mut self, spec: &FaultSpec) -> Result<()> {
        let (region, cut, held) = self.pick_region(spec.target).await;
        let rest: Vec<usize> = (0..self.c.len()).filter(|i| !cut.contains(i)).collect();
        let (cut_ids, rest_ids) = (self.ids(&cut), self.ids(&rest));
        let leader = self.c.leader().await;
        let at = now_ms();
        // The leader last: each call records an audit entry (a Raft write)
        // before it blocks, which a leader already cut off could not commit.
        for i in cut
            .iter()
            .filter(|i| **i != leader)
            .chain(cut.iter().filter(|i| **i == leader))
        {
            self.set_blocked(*i, &rest_ids).await?;
        }
        let in_place = now_ms();
        let sets = join_all(rest.iter().map(|j| self.set_blocked(*j, &cut_ids))).await;
        sets.into_iter().collect::<Result<Vec<()>>>()?;
        let both = now_ms();
        let until = Instant::now() + spec.hold;
        let loops = cut.iter().map(|i| probe_until(self.api.clone(), *i, until));
        for p in join_all(loops).await {
            self.probes.merge(p);
        }
        let heals = (0..self.c.len()).map(|j| {
            let api = self.api.clone();
            async move {
                let r = api.post(j, "/api/v1/admin/faults/heal", &json!({})).await?;
                if r.status != 200 {
                    bail!("heal on node index {j}: {r:?}");
                }
                Ok(())
            }
        });
        join_all(heals)
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        let whose = if held { "the leader's" } else { "a follower" };
        let label = format!("{whose} region cut off for {:?}", spec.hold);
        let note = format!(
            "cut in place after {} ms (the region's side), {} ms (both sides)",
            in_place - at,
            both - at
        );
        self.region_record(label, &region, &cut, (at, in_place), note);
        for i in cut {
            self.c.wait_caught_up(i, CATCH_UP).await;
        }
        Ok(())
    }

    /// SIGKILLs every node of the region, restarts them after `hold`.
    pub async fn region_loss(&mut self, spec: &FaultSpec) -> Result<()> {
        let (region, hit, held) = self.pick_region(spec.target).await;
        let at = now_ms();
        for i in &hit {
            self.c.kill9(*i);
        }
        let in_place = now_ms();
        tokio::time::sleep(spec.hold).await;
        for i in &hit {
            self.c.restart(*i);
        }
        let whose = if held { "the leader's" } else { "a follower" };
        let label = format!("kill -9 {whose} region, down {:?}", spec.hold);
        let note = format!("all three killed after {} ms", in_place - at);
        self.region_record(label, &region, &hit, (at, in_place), note);
        for i in hit {
            self.c.wait_caught_up(i, CATCH_UP).await;
        }
        Ok(())
    }
}

/// Asks node `i` for leases every [`PROBE_EVERY`] until `until`.
async fn probe_until(api: Api, i: usize, until: Instant) -> Probes {
    let mut p = Probes::default();
    while Instant::now() < until {
        let agent = format!("chaos-probe-i{i}-{}", p.sent);
        probe_once(&api, i, &agent, &mut p).await;
        tokio::time::sleep(PROBE_EVERY).await;
    }
    p
}
