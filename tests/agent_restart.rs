//! A node killed with SIGKILL and restarted at once, before it counts as
//! dead, keeps its gateways; its new agent actors must never run a lease its
//! previous process had started. Found by the `smoke` chaos drill: a killed
//! leader's replica restarts behind the committed log (its last commit index
//! was not yet durable), so the new agent read its leases from a replica
//! that did not show the one the old process was running, announced itself
//! without giving it back, and ran it again, with the same fencing token,
//! once the replica applied the grant.

#[allow(dead_code)]
mod support;

#[allow(dead_code)]
#[path = "runtime/fleet.rs"]
mod fleet;

use std::time::Duration;

use anyhow::bail;
use fleet::{Work, all_tasks, marked_task, register_agents, wait_placed};
use serde_json::json;
use support::{Cluster, bounded, deadline, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_leader_never_reruns_a_lease_its_previous_process_started() {
    let work = Work::new();
    let mut c = Cluster::start_with(3, &work.policy_toml()).await;
    bounded(Duration::from_secs(120), body(&mut c, &work)).await;
}

async fn body(c: &mut Cluster, work: &Work) {
    let api = c.api();
    let first = c.leader().await;
    let spec = work.command_gateway("cmd-0", "2");
    let r = api
        .post_retrying(
            first,
            "/api/v1/gateways",
            &spec,
            deadline(Duration::from_secs(20)),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    register_agents(&api, first, "cmd-0", 1, 1).await;
    let owner = wait_placed(&api, first, &["cmd-0".to_owned()]).await["cmd-0"];
    let owner = c.index_of(owner);
    // The gateway's owner leads, so the grant is its own latest entry.
    let body = json!({ "to": c.node(owner).id });
    let until = deadline(Duration::from_secs(20));
    let r = api
        .post_retrying(first, "/api/v1/cluster/transfer-leader", &body, until)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    wait_until(
        "the owner to lead",
        deadline(Duration::from_secs(20)),
        async || match c.leader().await {
            l if l == owner => Ok(()),
            l => bail!("node index {l} leads"),
        },
    )
    .await;
    let r = api
        .post_retrying(
            owner,
            "/api/v1/tasks",
            &marked_task("once-0", 0, "high"),
            until,
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    wait_until(
        "the attempt to start",
        deadline(Duration::from_secs(20)),
        async || match work.execs().len() {
            0 => bail!("not started"),
            _ => Ok(()),
        },
    )
    .await;
    c.kill9(owner);
    c.restart(owner);
    let tasks = wait_until(
        "the task to complete",
        deadline(Duration::from_secs(60)),
        async || {
            let tasks = all_tasks(&api, owner).await;
            match tasks.values().all(|t| t["status"] == "completed") {
                true => Ok(tasks),
                false => bail!("not completed: {tasks:?}"),
            }
        },
    )
    .await;
    let execs = work.execs();
    let tokens: Vec<u64> = execs.iter().map(|e| e.token).collect();
    let mut distinct = tokens.clone();
    distinct.dedup();
    assert_eq!(tokens, distinct, "a lease ran twice: {execs:?} {tasks:?}");
}
