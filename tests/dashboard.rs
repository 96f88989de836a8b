//! The web dashboard (`GET /`): served by every node without a credential,
//! with strict headers and nothing from elsewhere; and, in headless
//! Chromium driven over WebDriver, a page that signs in with a key and
//! follows the cluster live: a task submitted through the API appears and
//! completes, a task awaiting approval is approved from its detail, a dead
//! letter appears and is replayed, gateways and agents
//! are listed, and a drained node is marked so, without a reload.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver`; it is
//! skipped loudly without them, except under `CI`, where it fails.
//! `chromedriver` runs as a child in its own process group, which is killed
//! by its id when the test ends (so the browser it started goes too). The
//! test leaves a screenshot in `target/dashboard.png`.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use support::{ADMIN_KEY, Api, Cluster, bounded, deadline};

/// The browser, as Debian installs it.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest one step (a page update, the driver starting) may take.
const STEP: Duration = Duration::from_secs(20);
/// Longest the browser test may take as a whole.
const BROWSER_TEST_BOUND: Duration = Duration::from_secs(120);
/// Pause between two looks at the page.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// `GET /` and its assets answer without a credential, with the headers a
/// page needs, and name nothing outside this origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_with_strict_headers() {
    let c = Cluster::start(1).await;
    bounded(Duration::from_secs(60), async {
        let anon = c.api().anonymous();
        for (path, kind) in [
            ("/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/style.css", "text/css"),
        ] {
            let r = anon.get(0, path).await.unwrap();
            assert_eq!(r.status, 200, "{path}: {r:?}");
            let ct = r.header("content-type").unwrap_or("");
            assert!(ct.starts_with(kind), "{path}: content-type {ct}");
            let csp = r.header("content-security-policy").unwrap_or("");
            for want in [
                "default-src 'self'",
                "script-src 'self'",
                "connect-src 'self' ws: wss:",
                "frame-ancestors 'none'",
            ] {
                assert!(csp.contains(want), "{path}: CSP `{csp}` lacks `{want}`");
            }
            assert!(!csp.contains("unsafe"), "{path}: CSP `{csp}`");
            assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(r.header("cache-control"), Some("no-cache"));
            let body = r.body.as_str().expect("a text body");
            for external in ["http://", "https://"] {
                assert!(!body.contains(external), "{path} names {external}");
            }
            if path == "/" {
                assert!(body.contains("src=\"/ui/app.js\""), "{body}");
                assert!(body.contains("href=\"/ui/style.css\""), "{body}");
            }
        }
        anon.get(0, "/ui/nothing.js")
            .await
            .unwrap()
            .assert_error(404, "not_found");
    })
    .await;
}

/// The page signs in, then follows the cluster from the event stream: a
/// task appears and completes, a drained follower is marked draining, and
/// the page is never reloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_the_cluster_live_in_a_browser() {
    let Some(chromedriver) = browser_tools() else {
        return;
    };
    bounded(BROWSER_TEST_BOUND, async {
        let c = Cluster::start(3).await;
        let api = c.api();
        let leader = c.leader().await;
        let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        sim_gateway(&api, leader).await;
        let (page_node, drained) = (followers[0], followers[1]);

        let driver = Driver::start(&chromedriver).await;
        let b = driver.browser().await;
        b.goto(&format!("http://{}/", api.addr(page_node)))
            .await
            .unwrap();
        let key = b
            .wait()
            .at_most(STEP)
            .for_element(Locator::Css("#key"))
            .await
            .unwrap();
        key.send_keys(ADMIN_KEY).await.unwrap();
        b.find(Locator::Css("#login-form button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_text(&b, "#conn", "the event stream to be live", |t| t == "live").await;
        // A mark that a reload (or navigation) would wipe.
        b.execute("window.testMark = 'kept'; return true;", vec![])
            .await
            .unwrap();
        for i in 0..3 {
            let css = format!("tr[data-node=\"{}\"] .drain", c.node(i).id);
            wait_text(&b, &css, "every node listed, none draining", |t| t == "no").await;
        }

        // The tasks tab is open before the task exists: it can only learn
        // of it from the event stream.
        click(&b, "#tabs a[data-tab=\"tasks\"]").await;
        let body = json!({"payload": {"prompt": "shown live"}, "priority": "high"});
        let r = api.post(leader, "/api/v1/tasks", &body).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().unwrap();
        let css = format!("tr[data-task=\"{id}\"] .status");
        wait_text(&b, &css, "the task to complete on the page", |t| {
            t == "completed"
        })
        .await;
        click(&b, &format!("tr[data-task=\"{id}\"]")).await;
        wait_text(&b, "#detail-status", "the task's detail", |t| {
            t == "completed"
        })
        .await;
        screenshot(&b, "dashboard-tasks.png").await;

        // A task awaiting approval is listed so, and approved from its
        // detail.
        let body = json!({"payload": {"prompt": "risky"}, "requires_approval": true});
        let r = api.post(leader, "/api/v1/tasks", &body).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let gated = r.body["id"].as_u64().unwrap();
        let css = format!("tr[data-task=\"{gated}\"] .status");
        wait_text(&b, &css, "the task awaiting approval", |t| {
            t == "awaiting_approval"
        })
        .await;
        click(&b, &format!("tr[data-task=\"{gated}\"]")).await;
        click(&b, "#detail-approve").await;
        wait_text(&b, "#notices", "the approval's notice", |t| {
            t.contains(&format!("Task {gated}: approve accepted"))
        })
        .await;
        let r = api.get(leader, &format!("/api/v1/tasks/{gated}")).await;
        let t = r.unwrap().body;
        assert_eq!(t["approval"]["decision"]["approved"], true, "{t}");

        // A dead letter shows up live and is replayed from the page.
        click(&b, "#tabs a[data-tab=\"dead\"]").await;
        let dead = dead_letter(&api, leader).await;
        let css = format!("#dead tr[data-task=\"{dead}\"] button");
        click(&b, &css).await;
        wait_text(&b, "#notices", "the replay's notice", |t| {
            t.contains(&format!("Replayed 1 task(s): {dead}"))
        })
        .await;
        let r = api.get(leader, &format!("/api/v1/tasks/{dead}")).await;
        assert_eq!(r.unwrap().body["status"], "pending");

        // Gateways and agents, with health and load.
        click(&b, "#tabs a[data-tab=\"fleet\"]").await;
        wait_text(&b, "tr[data-gateway=\"sim\"] .health", "the gateway", |t| {
            !t.is_empty()
        })
        .await;
        wait_text(&b, "tr[data-agent=\"sim-a\"]", "the agent", |t| {
            t.contains("8")
        })
        .await;
        screenshot(&b, "dashboard-fleet.png").await;

        click(&b, "#tabs a[data-tab=\"overview\"]").await;
        let node_id = c.node(drained).id;
        let r = api
            .post(
                leader,
                &format!("/api/v1/admin/nodes/{node_id}/drain"),
                &json!({}),
            )
            .await
            .unwrap();
        assert!(r.status < 300, "{r:?}");
        let css = format!("tr[data-node=\"{node_id}\"] .drain");
        wait_text(&b, &css, "the drained node marked draining", |t| {
            t == "draining"
        })
        .await;
        wait_text(&b, "#feed-short", "the drain in the event feed", |t| {
            t.contains("node.draining")
        })
        .await;
        let mark = b.execute("return window.testMark;", vec![]).await.unwrap();
        assert_eq!(mark, json!("kept"), "the page was reloaded");
        screenshot(&b, "dashboard.png").await;
        b.close().await.unwrap();
    })
    .await;
}

/// `chromedriver`'s path, if it and Chromium are installed; otherwise a
/// loud skip, or a failure under `CI`.
fn browser_tools() -> Option<PathBuf> {
    let driver = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromedriver"))
            .find(|p| p.is_file())
    });
    let missing = match (&driver, Path::new(CHROMIUM).is_file()) {
        (Some(_), true) => return driver,
        (None, _) => "chromedriver is not on PATH",
        (_, false) => "/usr/bin/chromium is missing",
    };
    let msg = format!("{missing}: apt-get install chromium chromium-driver");
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!("{msg}\n(CI is set, so this fails instead of skipping)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
    None
}

/// A `chromedriver` child in its own process group, killed (group and
/// all, by its id) on drop.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Driver {
    async fn start(path: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let driver = Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let until = deadline(STEP);
        while TcpStream::connect_timeout(&driver.addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < until,
                "chromedriver did not listen in time"
            );
            tokio::time::sleep(LOOK_EVERY).await;
        }
        driver
    }

    /// A headless Chromium session.
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ];
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = ClientBuilder::new(connector);
        builder.capabilities(caps);
        let url = format!("http://{}", self.addr);
        tokio::time::timeout(STEP, builder.connect(&url))
            .await
            .expect("a browser session in time")
            .expect("a browser session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group: chromedriver and the browser it started.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the text of the element `css` satisfies `ok`; panics after
/// [`STEP`] with what the page showed.
async fn wait_text(b: &Client, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let until = deadline(STEP);
    let mut last = String::from("(no such element)");
    loop {
        if let Ok(e) = b.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            let t = t.trim().to_owned();
            if ok(&t) {
                return t;
            }
            last = t;
        }
        if Instant::now() >= until {
            let notices = match b.find(Locator::Css("#notices")).await {
                Ok(n) => n.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            screenshot(b, "dashboard-failure.png").await;
            panic!("timed out waiting for {what} (`{css}`): last `{last}`; notices: `{notices}`");
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

async fn click(b: &Client, css: &str) {
    let e = b
        .wait()
        .at_most(STEP)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("`{css}` in time: {e}"));
    e.click().await.unwrap();
}

/// Saves a screenshot as `target/<name>`.
async fn screenshot(b: &Client, name: &str) {
    let png = b.screenshot().await.expect("a screenshot");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

/// A task no agent of the cluster can run, leased and failed by hand
/// until it is a dead letter; its id.
async fn dead_letter(api: &Api, leader: usize) -> u64 {
    let body = json!({"payload": {}, "capabilities": ["by-hand"], "max_attempts": 1});
    let r = api.post(leader, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_u64().unwrap();
    let lease = json!({"agent_id": "hand", "capabilities": ["by-hand"], "max": 1});
    let r = api.post(leader, "/api/v1/leases", &lease).await.unwrap();
    assert_eq!(r.body["leases"][0]["task_id"], id, "{r:?}");
    let token = r.body["leases"][0]["fencing_token"].as_u64().unwrap();
    let fail = json!({"error": "failed by hand", "retryable": false});
    let path = format!("/api/v1/leases/{token}/fail");
    let r = api.post(leader, &path, &fail).await.unwrap();
    assert!(r.status < 300, "{r:?}");
    let r = api
        .get(leader, &format!("/api/v1/tasks/{id}"))
        .await
        .unwrap();
    assert_eq!(r.body["status"], "dead_letter", "{r:?}");
    id
}

/// Registers a simulated gateway with one agent on `leader`.
async fn sim_gateway(api: &Api, leader: usize) {
    let gw = json!({"id": "sim", "region": "local", "max_sessions": 16, "driver": {"kind": "sim"}});
    let r = api
        .post_retrying(leader, "/api/v1/gateways", &gw, deadline(STEP))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let agent = json!({"id": "sim-a", "gateway": "sim", "capacity": 8});
    let r = api.post(leader, "/api/v1/agents", &agent).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
}
