//! The steady load: an open loop of task submissions at the drill's rate,
//! round robin over every node's API, one task per `POST /tasks` or, with
//! the drill's `batch`, that many per `POST /tasks:batch` (what a batch
//! did not get acknowledged is sent again, and each task counts as a
//! submission, its first acknowledged id the one checked). Each task
//! carries a unique marker, also its idempotency key, so retrying one
//! whose answer was lost cannot create a second task. A submission is retried on other nodes
//! (503, 429, 504, no connection, no answer in [`REQUEST_TIMEOUT`]) until
//! acknowledged or [`SUBMIT_DEADLINE`]; at most [`MAX_IN_FLIGHT`] run at
//! once, and a tick that finds them all busy is counted as skipped, so the
//! offered load never waits on the cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::fleet::{marked_task, now_ms};

/// Longest one HTTP request may take: a SIGSTOPped node accepts the
/// connection and never answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one submission is retried.
pub const SUBMIT_DEADLINE: Duration = Duration::from_secs(30);
/// Submissions in flight at once.
const MAX_IN_FLIGHT: usize = 128;
/// Pause between two tries of a submission.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// The priorities submissions cycle through.
const PRIORITIES: [&str; 4] = ["critical", "high", "medium", "low"];

/// What the load generator saw.
#[derive(Debug, Default)]
pub struct Submissions {
    /// Submissions started (each a distinct marker).
    pub submitted: usize,
    /// Ticks skipped because every slot was busy.
    pub skipped: usize,
    /// Acknowledged task id -> marker.
    pub acked: BTreeMap<u64, String>,
    /// When each acknowledgement arrived (ms since the epoch), in order.
    pub ack_times: Vec<u64>,
    /// Acknowledged task id -> when its submission was first sent (ms since
    /// the epoch).
    pub sent_ms: BTreeMap<u64, u64>,
    /// Markers never acknowledged within the deadline.
    pub unacked: Vec<String>,
    /// Markers refused with a non-retryable answer, and the answer.
    pub rejected: Vec<(String, String)>,
    /// Markers acknowledged as a task id another marker already had.
    pub id_reused: Vec<String>,
}

#[derive(Default)]
struct Shared {
    subs: Mutex<Submissions>,
}

/// A running load; [`Load::finish`] stops it and returns what it saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

enum Outcome {
    Acked(u64),
    Rejected(String),
    GaveUp,
}

impl Load {
    /// Starts submitting `rate` tasks a second to `addrs`, `batch` per
    /// request, markers `<prefix>-<k>`.
    pub fn start(addrs: Vec<SocketAddr>, rate: u32, batch: u32, prefix: String) -> Load {
        let http = reqwest::Client::builder()
            .default_headers(crate::support::auth_headers())
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_millis(500))
            .build()
            .expect("http client");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let (s, sh) = (stop.clone(), shared.clone());
        let batch = batch.max(1) as usize;
        let handle = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            let addrs = Arc::new(addrs);
            let mut tick = tokio::time::interval(Duration::from_secs(batch as u64) / rate);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut running = JoinSet::new();
            let mut k = 0usize;
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    sh.subs.lock().expect("lock").skipped += batch;
                    continue;
                };
                let tasks: Vec<(String, Value)> = (k..k + batch)
                    .map(|k| {
                        let marker = format!("{prefix}-{k}");
                        let body = marked_task(&marker, k, PRIORITIES[k % PRIORITIES.len()]);
                        (marker, body)
                    })
                    .collect();
                sh.subs.lock().expect("lock").submitted += batch;
                let (http, addrs, sh) = (http.clone(), addrs.clone(), sh.clone());
                running.spawn(async move {
                    let sent = now_ms();
                    let bodies: Vec<&Value> = tasks.iter().map(|(_, b)| b).collect();
                    let outcomes = if batch == 1 {
                        vec![submit(&http, &addrs, k, bodies[0]).await]
                    } else {
                        submit_batch(&http, &addrs, k, &bodies).await
                    };
                    for ((marker, _), outcome) in tasks.into_iter().zip(outcomes) {
                        sh.record(marker, sent, outcome);
                    }
                    drop(permit);
                });
                k += batch;
                while running.try_join_next().is_some() {}
            }
            while running.join_next().await.is_some() {}
        });
        Load {
            stop,
            handle,
            shared,
        }
    }

    /// Stops submitting, waits (at most [`SUBMIT_DEADLINE`] plus a request)
    /// for the submissions in flight, and returns the tally.
    pub async fn finish(self) -> Submissions {
        self.stop.store(true, Ordering::Relaxed);
        let bound = SUBMIT_DEADLINE + REQUEST_TIMEOUT * 2;
        if tokio::time::timeout(bound, self.handle).await.is_err() {
            panic!("load generator did not stop within {bound:?}");
        }
        let mut subs = self.shared.subs.lock().expect("lock");
        std::mem::take(&mut *subs)
    }
}

impl Shared {
    fn record(&self, marker: String, sent: u64, outcome: Outcome) {
        let mut subs = self.subs.lock().expect("lock");
        match outcome {
            Outcome::Acked(id) => {
                subs.ack_times.push(now_ms());
                subs.sent_ms.insert(id, sent);
                if subs.acked.insert(id, marker.clone()).is_some() {
                    subs.id_reused.push(marker);
                }
            }
            Outcome::Rejected(why) => subs.rejected.push((marker, why)),
            Outcome::GaveUp => subs.unacked.push(marker),
        }
    }
}

/// One submission, retried on the next node until acknowledged.
async fn submit(http: &reqwest::Client, addrs: &[SocketAddr], k: usize, body: &Value) -> Outcome {
    let until = Instant::now() + SUBMIT_DEADLINE;
    let mut attempt = 0;
    while Instant::now() < until {
        let addr = addrs[(k + attempt) % addrs.len()];
        attempt += 1;
        let url = format!("http://{addr}/api/v1/tasks");
        if let Ok(r) = http.post(&url).json(body).send().await {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            match status {
                200 | 201 => {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if let Some(id) = v["id"].as_u64() {
                        return Outcome::Acked(id);
                    }
                }
                429 | 503 | 504 => {}
                _ => return Outcome::Rejected(format!("{status} {text}")),
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    Outcome::GaveUp
}

/// One batch of submissions, sent again on the next node until every task
/// is acknowledged or refused for good, or [`SUBMIT_DEADLINE`]. Only the
/// tasks not yet acknowledged are sent again (their keys make a resend
/// safe), and the first id acknowledged for a task is the one recorded, so
/// a task lost after its acknowledgement cannot hide behind a resend that
/// creates it afresh.
async fn submit_batch(
    http: &reqwest::Client,
    addrs: &[SocketAddr],
    k: usize,
    bodies: &[&Value],
) -> Vec<Outcome> {
    let until = Instant::now() + SUBMIT_DEADLINE;
    let mut outcomes: Vec<Option<Outcome>> = bodies.iter().map(|_| None).collect();
    let mut attempt = 0;
    while Instant::now() < until {
        let open: Vec<usize> = (0..bodies.len())
            .filter(|&i| outcomes[i].is_none())
            .collect();
        if open.is_empty() {
            break;
        }
        let addr = addrs[(k + attempt) % addrs.len()];
        attempt += 1;
        let url = format!("http://{addr}/api/v1/tasks:batch");
        let tasks: Vec<&Value> = open.iter().map(|&i| bodies[i]).collect();
        let body = serde_json::json!({ "tasks": tasks });
        if let Ok(r) = http.post(&url).json(&body).send().await {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            match status {
                200 => {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let items = v["items"].as_array().cloned().unwrap_or_default();
                    if items.len() == open.len() {
                        for (&i, item) in open.iter().zip(&items) {
                            if let Some(id) = item["task"]["id"].as_u64() {
                                outcomes[i] = Some(Outcome::Acked(id));
                            } else if item["error"]["retryable"] != true {
                                outcomes[i] = Some(Outcome::Rejected(item["error"].to_string()));
                            }
                        }
                        if outcomes.iter().all(Option::is_some) {
                            break;
                        }
                    }
                }
                429 | 503 | 504 => {}
                _ => {
                    let why = format!("{status} {text}");
                    for &i in &open {
                        outcomes[i] = Some(Outcome::Rejected(why.clone()));
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::GaveUp))
        .collect()
}
