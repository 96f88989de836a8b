//! `godel events [PATTERN]...`: tails the cluster's event stream
//! (`GET /api/v1/events`) over ws:// or wss://, one line per event.
//!
//! A lagged stream (the node closed it with `lagged`) is resumed at once
//! from the seq the node gave, so a tail loses nothing the node's buffer
//! still holds; a gap is reported on stderr. With `--count N` it exits
//! after N events (scripts, tests).

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::{EventsArgs, Output};

/// What one connection ended with.
enum Ended {
    /// `--count` events were printed.
    Done,
    /// The node said the stream lagged: resume after this seq (or
    /// per-group position).
    Lagged(String),
}

/// Runs `godel events`; returns the exit code.
pub async fn tail(
    api: &str,
    key: Option<String>,
    ca_cert: Option<&std::path::Path>,
    output: Output,
    args: EventsArgs,
) -> anyhow::Result<i32> {
    let patterns = if args.patterns.is_empty() {
        vec![">".to_owned()]
    } else {
        args.patterns.clone()
    };
    let mut since = args.since;
    let mut left = args.count;
    loop {
        match connect_and_tail(
            api,
            key.as_deref(),
            ca_cert,
            output,
            &patterns,
            since.as_deref(),
            &mut left,
        )
        .await?
        {
            Ended::Done => return Ok(0),
            Ended::Lagged(resume) => {
                eprintln!("note: the stream lagged; resuming after {resume}");
                since = Some(resume);
            }
        }
    }
}

async fn connect_and_tail(
    api: &str,
    key: Option<&str>,
    ca_cert: Option<&std::path::Path>,
    output: Output,
    patterns: &[String],
    since: Option<&str>,
    left: &mut Option<u64>,
) -> anyhow::Result<Ended> {
    let base = api.trim_end_matches('/');
    let (secure, rest) = if let Some(rest) = base.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = base.strip_prefix("http://") {
        (false, rest)
    } else {
        bail!("--api {api}: expected http://host:port or https://host:port");
    };
    let host = rest.split('/').next().unwrap_or(rest);
    let mut url = format!(
        "{}://{rest}/api/v1/events",
        if secure { "wss" } else { "ws" }
    );
    if let Some(s) = since {
        url.push_str(&format!("?since={s}"));
    }
    let mut req = url
        .as_str()
        .into_client_request()
        .context("event stream URL")?;
    if let Some(k) = key {
        let v = HeaderValue::from_str(&format!("Bearer {k}")).context("API key")?;
        req.headers_mut().insert("authorization", v);
    }
    let addr = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{}", if secure { 443 } else { 80 })
    };
    let tcp = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("cannot reach {addr}"))?;
    let _ = tcp.set_nodelay(true);
    if secure {
        let connector = crate::tls::client_connector(ca_cert)?;
        let name = crate::tls::server_name(&addr).context("server name")?;
        let tls = connector
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {addr}"))?;
        let (ws, _) = tokio_tungstenite::client_async(req, tls)
            .await
            .context("event stream upgrade")?;
        run(ws, output, patterns, left).await
    } else {
        let (ws, _) = tokio_tungstenite::client_async(req, tcp)
            .await
            .context("event stream upgrade")?;
        run(ws, output, patterns, left).await
    }
}

/// Subscribes and prints until done, lagged, or closed.
async fn run<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    output: Output,
    patterns: &[String],
    left: &mut Option<u64>,
) -> anyhow::Result<Ended>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let subscribe = json!({ "subscribe": patterns }).to_string();
    ws.send(Message::Text(subscribe.into())).await?;
    if *left == Some(0) {
        return Ok(Ended::Done);
    }
    while let Some(msg) = ws.next().await {
        let text = match msg.context("event stream")? {
            Message::Text(t) => t,
            Message::Close(frame) => {
                let why = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason));
                bail!("the node closed the stream: {}", why.unwrap_or_default());
            }
            _ => continue,
        };
        let v: Value = serde_json::from_str(&text).context("event stream message")?;
        if v.get("seq").is_some() {
            match output {
                Output::Json => println!("{text}"),
                Output::Text => println!("{}", line(&v)),
            }
            if let Some(n) = left {
                *n -= 1;
                if *n == 0 {
                    let _ = ws.close(None).await;
                    return Ok(Ended::Done);
                }
            }
        } else if let Some(e) = v.get("error") {
            bail!(
                "error: {} : {}",
                e["code"].as_str().unwrap_or("error"),
                e["message"].as_str().unwrap_or("")
            );
        } else if let Some(g) = v.get("gap") {
            let of = g["group"]
                .as_u64()
                .map_or_else(String::new, |n| format!(" of group {n}"));
            eprintln!(
                "note: events {} to {}{of} are no longer available",
                g["from"], g["to"]
            );
        } else if let Some(l) = v.get("lagged") {
            let resume = match &l["resume"] {
                Value::String(position) => position.clone(),
                other => other.as_u64().unwrap_or(0).to_string(),
            };
            return Ok(Ended::Lagged(resume));
        }
    }
    bail!("the event stream ended")
}

/// `seq  time  type  tenant  key=value ...`
pub fn line(v: &Value) -> String {
    let time = v["time"].as_u64().map_or_else(String::new, clock);
    let tenant = v["tenant"].as_str().unwrap_or("-");
    let mut data = String::new();
    if let Some(map) = v["data"].as_object() {
        for (k, val) in map {
            if val.is_null() {
                continue;
            }
            let shown = val.as_str().map_or_else(|| val.to_string(), str::to_owned);
            data.push_str(&format!(" {k}={shown}"));
        }
    }
    // A queue shard's event counts in its group: `group:seq`.
    let seq = v["seq"].as_u64().unwrap_or(0);
    let seq = match v["group"].as_u64() {
        Some(g) => format!("{g}:{seq}"),
        None => seq.to_string(),
    };
    format!(
        "{seq:>8}  {time}  {:<20}  {tenant:<10}{data}",
        v["type"].as_str().unwrap_or("?")
    )
}

/// `HH:MM:SS.mmm` (UTC) of a time in ms since the epoch.
fn clock(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_one_line() {
        let v = json!({"seq": 42, "type": "task.leased", "time": 1_700_000_123_456u64,
                       "tenant": "acme", "data": {"id": 7, "agent": "a-1", "token": 9, "reason": null}});
        assert_eq!(
            line(&v),
            "      42  22:15:23.456  task.leased           acme       agent=a-1 id=7 token=9"
        );
    }
}
