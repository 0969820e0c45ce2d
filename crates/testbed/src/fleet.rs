//! The fleet test bed: one market service fed a fixed snapshot in which `cheap` is the
//! cheapest offer and `other` the next, and gateways (Envoys, Kong's wasm host) routing
//! `MODEL` between a `cheap` and an `other` provider through that market ([`Pair`]: two
//! Envoys, each with its own `cheap`). Shared by the fleet suites (`tests/fleet.rs`,
//! `tests/fleet_redis.rs`) and `bench_fleet`.

use crate::{
    get, post_json, Envoy, EnvoyConfig, Gateway, Kong, KongConfig, MockOpts, MockProvider,
    ProviderCluster, TempDir,
};
use serde_json::{json, Value};
use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

/// The model every fleet request asks for.
pub const MODEL: &str = "gpt-oss-120b";
/// The market service's cluster in the Envoys.
pub const CLUSTER: &str = "market_service";
/// Timeout of one request to an Envoy.
const T: Duration = Duration::from_secs(10);

/// Writes the feed (`cheap` cheapest and online, `other` ten times its price) and a market
/// service configuration reading it every `period_s` seconds into `dir`; returns the
/// configuration's path.
pub fn service_config(dir: &TempDir, period_s: f64) -> Result<PathBuf, String> {
    let snapshot = json!({"version": 1, "generated_at_ms": 1, "offers": [
        {"provider": "cheap", "model": MODEL, "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.2},
         "latency_ms": {"ttft_p50": 300}, "uptime": 0.99, "availability": "online", "provider_type": "company"},
        {"provider": "other", "model": MODEL, "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
         "latency_ms": {"ttft_p50": 300}, "uptime": 0.99, "availability": "online", "provider_type": "company"}
    ]});
    fs::write(dir.join("feed.json"), snapshot.to_string())
        .map_err(|e| format!("cannot write feed.json: {e}"))?;
    let config = json!({
        "sources": [{"name": "feed", "kind": "snapshot", "file": "feed.json", "period_s": period_s}],
        "providers": {"cheap": {}, "other": {}},
        "models": {MODEL: {}},
    });
    fs::write(dir.join("service.json"), config.to_string())
        .map_err(|e| format!("cannot write service.json: {e}"))?;
    Ok(dir.join("service.json"))
}

/// The plugin configuration: `cheap` and `other` on clusters `provider_cheap` and
/// `provider_other`, the market at [`CLUSTER`] every `refresh_ms`, `market.report` as given
/// (absent: the default), strategy `cheapest`.
pub fn plugin(refresh_ms: u64, report: Option<bool>) -> Value {
    let mut plugin = json!({
        "providers": [
            {"name": "cheap", "cluster": "provider_cheap", "models": {MODEL: MODEL}},
            {"name": "other", "cluster": "provider_other", "models": {MODEL: MODEL}},
        ],
        "market": {"cluster": CLUSTER, "refresh_ms": refresh_ms, "max_age_ms": 60_000, "timeout_ms": 1000},
        "routing": {"strategy": "cheapest"},
    });
    if let Some(report) = report {
        plugin["market"]["report"] = json!(report);
    }
    plugin
}

/// An Envoy with `plugin` whose `cheap` and `other` are the mocks on `cheap_port` and
/// `other_port`, and whose market is the service on `service_port`.
pub fn envoy(
    service_port: u16,
    cheap_port: u16,
    other_port: u16,
    plugin: &Value,
    workers: u32,
) -> Result<Envoy, String> {
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_cheap", cheap_port))
        .provider(ProviderCluster::new("provider_other", other_port))
        .sidecar(CLUSTER, service_port)
        .market_router(&plugin.to_string());
    Envoy::start(&cfg, workers)
}

/// Two gateways on one market: Envoy A and Envoy B with the same `plugin`, each with its own
/// `cheap` mock (A's behaving as `cheap_a` says, B's healthy: it counts every request B sends
/// it), and one `other` mock for both; A's market is the service on `service_a`, B's the one on
/// `service_b` (the same service, or another replica). Fields drop in order: the Envoys first.
pub struct Pair {
    pub a: Envoy,
    pub b: Envoy,
    pub cheap_a: MockProvider,
    pub cheap_b: MockProvider,
    pub other: MockProvider,
}

impl Pair {
    /// Starts the mocks (`cheap_a`, `cheap_b`, `other`), then Envoy A, then Envoy B.
    pub fn start(
        service_a: u16,
        service_b: u16,
        cheap_a: &MockOpts,
        plugin: &Value,
        workers: u32,
    ) -> Result<Pair, String> {
        let cheap_a = MockProvider::start("cheap", cheap_a)?;
        let cheap_b = MockProvider::start("cheap", &MockOpts::default())?;
        let other = MockProvider::start("other", &MockOpts::default())?;
        let a = envoy(service_a, cheap_a.port(), other.port(), plugin, workers)?;
        let b = envoy(service_b, cheap_b.port(), other.port(), plugin, workers)?;
        Ok(Pair {
            a,
            b,
            cheap_a,
            cheap_b,
            other,
        })
    }
}

/// `plugin` as Kong's host needs it (no clusters): `cheap`, `other` and the market service at
/// their `127.0.0.1:<port>`, failover in dispatch mode.
pub fn kong_plugin(service_port: u16, cheap_port: u16, other_port: u16, plugin: &Value) -> Value {
    let mut plugin = plugin.clone();
    for p in plugin["providers"].as_array_mut().into_iter().flatten() {
        let port = if p["name"] == "cheap" {
            cheap_port
        } else {
            other_port
        };
        p["cluster"] = json!(format!("127.0.0.1:{port}"));
    }
    plugin["market"]["cluster"] = json!(format!("127.0.0.1:{service_port}"));
    plugin["market"]["authority"] = json!("127.0.0.1");
    plugin["failover"]["mode"] = json!("dispatch");
    plugin
}

/// Kong's wasm host with [`kong_plugin`] of `plugin` and `workers` nginx workers. Its error
/// log is at `debug`, so the filter's lines on each market refresh and each dropped report
/// are there (Kong's host has no stats endpoint).
pub fn kong(
    service_port: u16,
    cheap_port: u16,
    other_port: u16,
    plugin: &Value,
    workers: usize,
) -> Result<Kong, String> {
    let plugin = kong_plugin(service_port, cheap_port, other_port, plugin);
    let mut cfg = KongConfig::new()
        .workers(workers)
        .market_router(&plugin.to_string());
    cfg.log_level = "debug".to_string();
    Kong::start(&cfg)
}

/// The Envoy's ranking for [`MODEL`] (`/market-router/v1/route`); an error unless 200.
pub fn route(e: &Envoy) -> Result<Value, String> {
    route_at(&e.url(&format!("/market-router/v1/route?model={MODEL}")))
}

/// [`route`] on either host.
pub fn route_on(g: &Gateway) -> Result<Value, String> {
    route_at(&g.url(&format!("/market-router/v1/route?model={MODEL}")))
}

fn route_at(url: &str) -> Result<Value, String> {
    let r = get(url, T)?;
    if r.status != 200 {
        return Err(format!("route: status {}: {}", r.status, r.text()));
    }
    r.json()
}

/// A chat request through the Envoy: the provider that answered (`x-market-router-provider`);
/// an error (with the Envoy's log tail) unless 200 with that header.
pub fn chat(e: &Envoy) -> Result<String, String> {
    chat_at(&e.url("/v1/chat/completions"), || e.log_tail(30))
}

/// [`chat`] on either host.
pub fn chat_on(g: &Gateway) -> Result<String, String> {
    chat_at(&g.url("/v1/chat/completions"), || g.log_tail(30))
}

fn chat_at(url: &str, log_tail: impl Fn() -> String) -> Result<String, String> {
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
    let r = post_json(url, &[], &body, T)?;
    match r.header("x-market-router-provider") {
        Some(p) if r.status == 200 => Ok(p.to_string()),
        p => Err(format!(
            "chat: status {}, provider {p:?}: {}\n{}",
            r.status,
            r.text(),
            log_tail()
        )),
    }
}

/// The offer of `provider` in a snapshot; null when there is none.
pub fn offer(snap: &Value, provider: &str) -> Value {
    snap["offers"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["provider"] == provider))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until every answer of `ranks_first` over one whole `period` is true: a gateway's
/// workers re-read the shared snapshot on their own ticks, and a fresh connection per request
/// lands on any of them, so the first true answer only shows that one worker has the new
/// snapshot. A false answer starts the period again; an error when `within` passes first.
pub fn every_worker_for(
    period: Duration,
    within: Duration,
    mut ranks_first: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut since = Instant::now();
    while since.elapsed() < period {
        if !ranks_first()? {
            since = Instant::now();
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not every worker agreed over {period:?} within {within:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
