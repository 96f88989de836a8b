//! `godel serve`: load the config, start the node and the API, and shut
//! down in order on SIGTERM or Ctrl-C (stop accepting, finish in-flight
//! requests, stop Raft, wait a bounded time for background tasks).

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use super::ServeArgs;
use crate::config::Config;
use crate::node::Node;

/// How long shutdown waits for background tasks.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Loads the layered config for `serve`.
pub fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_env(|k| std::env::var(k).ok())?;
    if let Some(id) = args.node_id {
        config.node.id = id;
    }
    if let Some(d) = &args.data_dir {
        config.node.data_dir = d.clone();
    }
    if let Some(a) = args.api_addr {
        config.node.api_addr = a;
    }
    if let Some(a) = args.raft_addr {
        config.node.raft_addr = a;
    }
    config.validate()?;
    Ok(config)
}

/// Logs to stderr (JSON lines with `--log-json`, each with its span's
/// fields: a request's `trace_id` and `span_id`), and spans to an OTLP
/// collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`crate::otel`).
fn init_tracing(json: bool) -> anyhow::Result<()> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        fmt.json().with_current_span(true).boxed()
    } else {
        fmt.boxed()
    };
    let registry = tracing_subscriber::registry().with(filter).with(logs);
    let otel = crate::otel::layer().context("OTLP export (OTEL_EXPORTER_OTLP_*)")?;
    let _ = registry.with(otel).try_init();
    std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panic")));
    Ok(())
}

/// Runs a node until SIGTERM or Ctrl-C.
pub async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_json)?;
    let config = load_config(&args)?;
    crate::api::check_config(&config)?;
    let api_addr = config.node.api_addr;
    let api_config = config.api.clone();
    // Unusable TLS files stop the node before it starts anything.
    let api_tls = match (&config.api.tls_cert, &config.api.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_only(cert, key, "api")?),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    let node = Node::start(config, shutdown.clone())
        .await
        .context("starting the node")?;
    let listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .with_context(|| format!("binding the API on {api_addr}"))?;
    tracing::info!(node = node.id(), %api_addr, raft_addr = %node.info().raft_addr, "godel is serving");
    if args.config.is_none() {
        tokio::spawn(seed_simulated_gateway(node.clone()));
    }
    let app = crate::api::router(node.clone())?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    // A node whose Raft has stopped (storage failed: disk full, I/O error)
    // can neither commit nor recover in place; it exits non-zero so that
    // its supervisor (systemd, Kubernetes) restarts it, rather than staying
    // up answering 503 and claiming a role it no longer has.
    let fatal = tokio::spawn(raft_stopped(node.clone(), shutdown.clone()));
    let graceful = shutdown.clone();
    crate::api::serve(listener, app, &api_config, api_tls, graceful).await?;
    node.stop(SHUTDOWN_DEADLINE).await;
    // Spans still batched go out (a blocking call: off the async workers).
    let _ = tokio::task::spawn_blocking(crate::otel::flush).await;
    if fatal.is_finished()
        && let Ok(Some(why)) = fatal.await
    {
        anyhow::bail!("Raft stopped: {why}; the node exits so that it can be restarted");
    }
    Ok(())
}

/// Resolves with the reason once the node's Raft core has stopped with a
/// fatal error, after asking the node to shut down; `None` if the node shut
/// down first.
async fn raft_stopped(node: Node, shutdown: CancellationToken) -> Option<String> {
    // The server metrics change rarely (vote, role, leader, membership) and
    // their channel closes when the core exits, after it has recorded why
    // in `metrics().running_state`; watching them instead of `metrics()`
    // spares a wake-up on every append and apply.
    let mut server = node.raft().server_metrics();
    let mut core_gone = false;
    loop {
        if let Err(fatal) = &node.raft().metrics().borrow().running_state {
            let why = fatal.to_string();
            tracing::error!(error = %why, "Raft stopped; shutting the node down");
            shutdown.cancel();
            return Some(why);
        }
        if core_gone {
            // The core is gone without a recorded error.
            if shutdown.is_cancelled() {
                return None;
            }
            shutdown.cancel();
            return Some("the Raft core exited".to_owned());
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            changed = server.changed() => core_gone = changed.is_err(),
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// With no config at all, a fresh node registers one simulated gateway and
/// three agents, so a newcomer's first tasks complete. Skipped when any
/// gateway is already registered (a restart, or one the operator added).
async fn seed_simulated_gateway(node: Node) {
    use crate::fsm::{AgentId, Command};
    use crate::gateway::GatewaySpec;
    let spec: GatewaySpec = match serde_json::from_value(serde_json::json!({
        "id": "sim", "region": node.info().region, "max_sessions": 16, "driver": { "kind": "sim" },
    })) {
        Ok(spec) => spec,
        Err(e) => return tracing::error!(error = %e, "built-in simulated gateway spec"),
    };
    let mut commands = vec![Command::RegisterGateway(spec.to_registration())];
    for i in 1..=3 {
        let roles = crate::roles::all(&node.config().roles);
        match crate::roles::registration(
            AgentId(format!("sim-agent-{i}")),
            spec.id.clone(),
            vec![],
            "worker",
            4,
            &roles,
        ) {
            Ok(reg) => commands.push(Command::RegisterAgent(reg)),
            Err(e) => return tracing::error!(error = %e, "built-in simulated agents"),
        }
    }
    for _ in 0..100 {
        if node.read_barrier().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if node
        .state()
        .read(|s| s.registry().gateways().next().is_some())
    {
        return;
    }
    for _ in 0..100 {
        let mut ok = true;
        for cmd in &commands {
            ok &= matches!(node.write(cmd.clone()).await, Ok(Ok(_)));
        }
        if ok {
            return tracing::info!("registered the built-in simulated gateway `sim` with 3 agents");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!("could not register the built-in simulated gateway");
}
