//! Scriptable market endpoint for the tests: serves a file with an ETag and can be told to
//! fail, hang or answer garbage. The market service itself is `crates/market-sidecar`; the
//! tests also use this program to serve recorded source documents (an OpenRouter feed) to it.
//!
//! ```text
//! market_sidecar --port P --file snapshot.json [--path /v1/market/snapshot] [--bind ADDR]
//! ```
//!
//! `GET <path>` answers the file's bytes verbatim (read on every request, so edits show up at
//! once) with `ETag: "<FNV-1a 64 hex>"`; a matching `If-None-Match` gets 304. A missing file
//! gets 503. Admin: `GET /__sidecar/health`, `GET /__sidecar/stats`,
//! `POST /__sidecar/behavior` (`{"status":500,"latency_ms":0,"body":"..."}`, full
//! replacement; `{}` serves the file again), `POST /__sidecar/reset`. With `--port 0` the first
//! output line reports the port picked.

use market_router_testbed as common;

use clap::Parser;
use common::{fnv1a64, lock, Reply, Request};
use serde_json::{json, Value};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Fault behaviour; replaced as a whole by `POST /__sidecar/behavior`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Behavior {
    /// Status to answer instead of serving the file (200 or none = serve normally).
    status: Option<u16>,
    latency_ms: u64,
    /// Served instead of the file's content.
    body: Option<String>,
}

impl Behavior {
    fn from_json(v: &Value) -> Result<Behavior, String> {
        let obj = match v {
            Value::Object(o) => o,
            Value::Null => return Ok(Behavior::default()),
            _ => return Err("expected a JSON object".into()),
        };
        let mut b = Behavior::default();
        for (k, val) in obj {
            match k.as_str() {
                "status" => {
                    let s = val
                        .as_u64()
                        .and_then(|s| u16::try_from(s).ok())
                        .filter(|s| (200..=599).contains(s))
                        .ok_or_else(|| format!("`status`: expected 200..599, got {val}"))?;
                    b.status = Some(s);
                }
                "latency_ms" => {
                    b.latency_ms = val
                        .as_u64()
                        .ok_or_else(|| format!("`latency_ms`: expected an integer, got {val}"))?
                }
                "body" => {
                    b.body = match val {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        _ => return Err(format!("`body`: expected a string, got {val}")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown field `{k}`; allowed: status, latency_ms, body"
                    ))
                }
            }
        }
        Ok(b)
    }

    fn to_json(&self) -> Value {
        json!({"status": self.status, "latency_ms": self.latency_ms, "body": self.body})
    }
}

#[derive(Debug, Default)]
struct Stats {
    requests: u64,
    not_modified: u64,
    last_headers: Value,
}

struct Sidecar {
    file: PathBuf,
    path: String,
    behavior: Mutex<Behavior>,
    stats: Mutex<Stats>,
}

fn etag_of(bytes: &[u8]) -> String {
    format!("\"{:016x}\"", fnv1a64(bytes))
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, `*` matches anything).
fn matches_etag(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

fn error(status: u16, message: &str) -> Reply {
    Reply::json(
        status,
        &json!({"error": {"message": message, "status": status}}),
    )
}

impl Sidecar {
    fn handle(&self, req: &Request) -> Reply {
        let path = req.path();
        let reply = if path == self.path {
            if req.method == "GET" || req.method == "HEAD" {
                self.snapshot(req)
            } else {
                error(405, "use GET")
            }
        } else {
            match (req.method.as_str(), path) {
                (_, "/__sidecar/health") => Reply::json(200, &json!({"ok": true})),
                ("GET", "/__sidecar/stats") => {
                    let s = lock(&self.stats);
                    Reply::json(
                        200,
                        &json!({
                            "requests": s.requests,
                            "not_modified": s.not_modified,
                            "last_headers": s.last_headers,
                            "behavior": lock(&self.behavior).to_json(),
                        }),
                    )
                }
                ("POST", "/__sidecar/behavior") => {
                    let parsed = req.json_or_null();
                    match parsed.and_then(|v| Behavior::from_json(&v)) {
                        Ok(b) => {
                            let j = b.to_json();
                            *lock(&self.behavior) = b;
                            Reply::json(200, &json!({"ok": true, "behavior": j}))
                        }
                        Err(e) => error(400, &format!("bad behavior: {e}")),
                    }
                }
                ("POST", "/__sidecar/reset") => {
                    *lock(&self.stats) = Stats::default();
                    Reply::json(200, &json!({"ok": true}))
                }
                _ => error(404, &format!("no route for {} {path}", req.method)),
            }
        };
        let status = reply
            .status()
            .map_or_else(|| "-".to_string(), |s| s.to_string());
        println!("{} {} status={status}", req.method, path);
        reply
    }

    fn snapshot(&self, req: &Request) -> Reply {
        let headers: serde_json::Map<String, Value> = req
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        {
            let mut s = lock(&self.stats);
            s.requests += 1;
            s.last_headers = Value::Object(headers);
        }
        let b = lock(&self.behavior).clone();
        if b.latency_ms > 0 {
            thread::sleep(Duration::from_millis(b.latency_ms));
        }
        if let Some(status) = b.status.filter(|s| *s != 200) {
            return match &b.body {
                Some(body) => Reply::bytes(status, "application/json", body.clone().into_bytes()),
                None => error(status, &format!("simulated {status}")),
            };
        }
        let content = match &b.body {
            Some(body) => body.clone().into_bytes(),
            None => match fs::read(&self.file) {
                Ok(c) => c,
                Err(e) => return error(503, &format!("snapshot unavailable: {e}")),
            },
        };
        let etag = etag_of(&content);
        if req
            .header("if-none-match")
            .is_some_and(|inm| matches_etag(inm, &etag))
        {
            lock(&self.stats).not_modified += 1;
            return Reply::empty(304).with_header("etag", &etag);
        }
        Reply::bytes(200, "application/json", content)
            .with_header("etag", &etag)
            .with_header("cache-control", "no-cache")
    }
}

/// `market_sidecar`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "market_sidecar",
    about = "The example market sidecar: serves a snapshot file (ETag, 304), with faults the tests set"
)]
struct Cli {
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, value_name = "P", default_value_t = 0)]
    port: u16,
    /// The snapshot file, read on every request
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    /// The path it serves the snapshot at
    #[arg(long, value_name = "PATH", default_value = "/v1/market/snapshot")]
    path: String,
    /// Address to bind
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    bind: String,
}

fn run(cli: Cli) -> Result<(), String> {
    let port = cli.port;
    let bind = cli.bind;
    let file = cli.file;
    let path = cli.path;
    if !path.starts_with('/') {
        return Err(format!("--path {path:?}: expected a path starting with /"));
    }
    let sidecar = Arc::new(Sidecar {
        file,
        path,
        behavior: Mutex::new(Behavior::default()),
        stats: Mutex::new(Stats::default()),
    });
    let h = common::handler(move |req| sidecar.handle(req));
    common::bind_and_serve(&bind, port, "market_sidecar", h)
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("market_sidecar: {e}");
        std::process::exit(2);
    }
}
