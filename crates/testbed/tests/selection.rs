//! Market-driven selection through the real Envoy with the market sidecar: strategies on a
//! fixture catalog, snapshot changes, availability, the refresh slot across workers, a broken
//! sidecar, stale data, constraints, client overrides, session affinity and the transparency
//! endpoints. The scenarios that hold in dispatch mode run in Kong's wasm host too, in the
//! same test body ([`HOSTS`]: Envoy in route mode, Kong's host in dispatch mode; Kong has no
//! stats endpoint, so counters are checked on Envoy only).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::{
    fnv1a64, get, post_json, Envoy, EnvoyConfig, Gateway, Kong, KongConfig, MockOpts, MockProvider,
    ProviderCluster, Response, Sidecar, TempDir,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Failover mode that runs a bed in Kong's wasm host (dispatch mode there).
const KONG: &str = "kong";
/// The hosts a selection scenario runs in: Envoy (route mode) and Kong's host.
const HOSTS: [&str; 2] = ["route", KONG];

/// `config` with failover mode `mode` (`route`, `dispatch` or [`KONG`]).
fn in_mode(mut config: Value, mode: &str) -> Value {
    config["failover"]["mode"] = json!(mode);
    config
}

/// Timeout of one client call.
const T: Duration = Duration::from_secs(10);
/// Bound of every "wait until" loop.
const WAIT: Duration = Duration::from_secs(10);
/// Pause between polls.
const POLL: Duration = Duration::from_millis(25);
/// The model every fixture offers.
const MODEL: &str = "llama";
/// Cluster name of the sidecar in every Envoy config.
const SIDECAR_CLUSTER: &str = "market_sidecar";
/// The five client preference headers.
const PREF_HEADERS: [&str; 5] = [
    "x-market-router-strategy",
    "x-market-router-exclude",
    "x-market-router-max-price",
    "x-market-router-provider-type",
    "x-market-router-region",
];

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One market offer for `MODEL`.
#[allow(clippy::too_many_arguments)]
fn offer(
    provider: &str,
    input: f64,
    output: f64,
    ttft: f64,
    uptime: f64,
    availability: &str,
    provider_type: &str,
    region: &str,
) -> Value {
    json!({
        "provider": provider,
        "model": MODEL,
        "price": {"input_per_mtok": input, "output_per_mtok": output},
        "latency_ms": {"ttft_p50": ttft, "ttft_p95": ttft * 2.0},
        "uptime": uptime,
        "availability": availability,
        "provider_type": provider_type,
        "region": region,
    })
}

/// The fixture catalog: four providers of `MODEL` with clearly different numbers.
/// - cheap: lowest price, slowest, least reliable (community, eu-west);
/// - fast: lowest time to first token (company, us-east);
/// - solid: highest uptime, priciest (company, us-east);
/// - mid: second on every axis, the best blend under equal weights (self_hosted, ap-south).
///
/// For the test request (~20 prompt tokens, max_tokens 100) the normalized sub-scores are
/// price cheap 1.0 / fast 0.21 / solid 0.16 / mid 0.67, latency 0.17 / 1.0 / 0.3 / 0.75,
/// reliability 0.46 / 0.61 / 1.0 / 0.82; with equal weights the balanced scores are
/// 0.54 / 0.61 / 0.49 / 0.75, so `weighted` (score⁴) gives mid ~52 %, fast ~23 %,
/// cheap ~15 %, solid ~10 % of first places.
#[rustfmt::skip]
fn catalog() -> Vec<Value> {
    vec![
        //     provider  in    out   ttft   uptime  availability type           region
        offer("cheap",  0.10, 0.20, 900.0, 0.97,   "online",    "community",   "eu-west"),
        offer("fast",   0.60, 0.90, 150.0, 0.99,   "online",    "company",     "us-east"),
        offer("solid",  0.80, 1.20, 500.0, 0.9995, "online",    "company",     "us-east"),
        offer("mid",    0.15, 0.30, 200.0, 0.998,  "online",    "self_hosted", "ap-south"),
    ]
}

const CATALOG_NAMES: [&str; 4] = ["cheap", "fast", "solid", "mid"];

/// A fresh snapshot document.
fn snapshot(offers: &[Value]) -> Value {
    json!({"version": 1, "generated_at_ms": now_ms(), "offers": offers})
}

fn cluster(name: &str) -> String {
    format!("provider_{name}")
}

/// Provider entries of the plugin configuration: each serves `MODEL` under the same id.
fn providers(names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .map(|n| json!({"name": n, "cluster": cluster(n), "models": {MODEL: MODEL}}))
        .collect()
}

/// A plugin configuration with the market on the sidecar.
fn plugin_config(providers: Vec<Value>, refresh_ms: u64, routing: Value) -> Value {
    json!({
        "providers": providers,
        "market": {
            "cluster": SIDECAR_CLUSTER,
            "refresh_ms": refresh_ms,
            "max_age_ms": 60_000,
            // Room for a sidecar answering slowly on a loaded machine: the tests that count
            // refresh failures must not see timeouts of a healthy sidecar.
            "timeout_ms": 2000
        },
        "routing": routing,
    })
}

/// Replaces the snapshot file atomically (the sidecar reads it on every request: a partly
/// written file would be served as broken JSON).
fn write_snapshot(path: &Path, doc: &Value) {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Mock providers, the sidecar and Envoy with the market-router filter.
struct Bed {
    // Dropped in this order: the host first, so it never sees its upstreams vanish mid-test.
    gateway: Gateway,
    sidecar: Option<Sidecar>,
    mocks: Vec<MockProvider>,
    snapshot: PathBuf,
    _dir: TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.gateway.assert_no_crash();
    }
}

impl Bed {
    fn start(names: &[&str], snap: &Value, config: &Value, concurrency: u32) -> Bed {
        Bed::start_with(names, snap, config, concurrency, |c| c)
    }

    /// [`Bed::start`] with `config` in failover mode `mode` ([`KONG`]: in Kong's host).
    fn start_in(mode: &str, names: &[&str], snap: &Value, config: &Value, concurrency: u32) -> Bed {
        Bed::start(names, snap, &in_mode(config.clone(), mode), concurrency)
    }

    fn start_with(
        names: &[&str],
        snap: &Value,
        config: &Value,
        concurrency: u32,
        tweak: impl FnOnce(EnvoyConfig) -> EnvoyConfig,
    ) -> Bed {
        let dir = TempDir::new("selection").unwrap();
        let snapshot = dir.join("snapshot.json");
        write_snapshot(&snapshot, snap);
        let mocks: Vec<MockProvider> = names
            .iter()
            .map(|n| MockProvider::start(n, &MockOpts::default()).unwrap())
            .collect();
        let sidecar = Sidecar::start(&snapshot).unwrap();
        let gateway = Bed::gateway(&mocks, sidecar.port(), config, concurrency, tweak);
        Bed {
            gateway,
            sidecar: Some(sidecar),
            mocks,
            snapshot,
            _dir: dir,
        }
    }

    /// The host running `config` in front of `mocks` and the sidecar on `sidecar_port`: Kong's
    /// host with `concurrency` workers when its failover mode is [`KONG`], else Envoy.
    fn gateway(
        mocks: &[MockProvider],
        sidecar_port: u16,
        config: &Value,
        concurrency: u32,
        tweak: impl FnOnce(EnvoyConfig) -> EnvoyConfig,
    ) -> Gateway {
        if config["failover"]["mode"] == KONG {
            let kong_config = Bed::kong_config(mocks, sidecar_port, config);
            Gateway::Kong(
                Kong::start(
                    &KongConfig::new()
                        .workers(concurrency as usize)
                        .market_router(&kong_config.to_string()),
                )
                .unwrap(),
            )
        } else {
            Gateway::Envoy(
                Envoy::start(
                    &tweak(Bed::envoy_config(mocks, sidecar_port, config)),
                    concurrency,
                )
                .unwrap(),
            )
        }
    }

    fn envoy_config(mocks: &[MockProvider], sidecar_port: u16, config: &Value) -> EnvoyConfig {
        let mut cfg = EnvoyConfig::new();
        for m in mocks {
            cfg = cfg.provider(ProviderCluster::new(&cluster(m.name()), m.port()));
        }
        cfg.sidecar(SIDECAR_CLUSTER, sidecar_port)
            .market_router(&config.to_string())
    }

    /// `config` for Kong's host (no clusters): providers and the sidecar at their
    /// `127.0.0.1:<port>`, dispatch mode.
    fn kong_config(mocks: &[MockProvider], sidecar_port: u16, config: &Value) -> Value {
        let mut config = config.clone();
        for p in config["providers"].as_array_mut().into_iter().flatten() {
            if let Some(m) = mocks.iter().find(|m| p["cluster"] == cluster(m.name())) {
                p["cluster"] = json!(format!("127.0.0.1:{}", m.port()));
            }
        }
        config["market"]["cluster"] = json!(format!("127.0.0.1:{sidecar_port}"));
        config["failover"]["mode"] = json!("dispatch");
        config
    }

    /// The Envoy this bed runs (fails on a Kong bed).
    fn envoy(&self) -> &Envoy {
        self.gateway
            .envoy()
            .unwrap_or_else(|| panic!("this bed runs Kong's wasm host, not Envoy"))
    }

    /// Replaces the host with one running `config` (same mocks, same sidecar; Kong's host
    /// when its failover mode is [`KONG`]). The old host's log is checked first.
    fn restart(&mut self, config: &Value) {
        self.gateway.assert_no_crash();
        let port = self.sidecar().port();
        self.gateway = Bed::gateway(&self.mocks, port, config, 1, |c| c);
    }

    /// Replaces the sidecar and the host (same mocks) with a new sidecar and a host on
    /// `config`.
    fn restart_with_sidecar(&mut self, sidecar: Sidecar, config: &Value) {
        self.gateway.assert_no_crash();
        let gateway = Bed::gateway(&self.mocks, sidecar.port(), config, 1, |c| c);
        self.sidecar = Some(sidecar);
        self.gateway = gateway;
    }

    /// The host's whole log (Envoy's output, nginx's error.log with the filter's lines).
    fn log(&self) -> String {
        match &self.gateway {
            Gateway::Envoy(e) => e.log_contents(),
            Gateway::Kong(k) => k.error_log(),
        }
    }

    fn sidecar(&self) -> &Sidecar {
        self.sidecar.as_ref().expect("sidecar still running")
    }

    fn mock(&self, name: &str) -> &MockProvider {
        self.mocks
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no mock {name}"))
    }

    /// LLM requests each mock received.
    fn hits(&self) -> BTreeMap<String, u64> {
        self.mocks
            .iter()
            .map(|m| (m.name().to_string(), m.hits().unwrap()))
            .collect()
    }

    fn reset_mocks(&self) {
        for m in &self.mocks {
            m.reset().unwrap();
        }
    }

    fn write(&self, doc: &Value) {
        write_snapshot(&self.snapshot, doc);
    }

    /// A counter that must exist (a missing one fails the test, naming it).
    fn stat(&self, name: &str) -> u64 {
        self.envoy().counter(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Bed::stat`] on Envoy; `None` on Kong's host (no stats endpoint).
    fn stat_on_envoy(&self, name: &str) -> Option<u64> {
        (!self.is_kong()).then(|| self.stat(name))
    }

    fn is_kong(&self) -> bool {
        self.gateway.envoy().is_none()
    }

    /// Sends the test chat request.
    fn chat(&self, headers: &[(&str, &str)]) -> Response {
        post_json(
            &self.gateway.url("/v1/chat/completions"),
            headers,
            &chat_body(),
            T,
        )
        .unwrap()
    }

    /// Sends the test chat request, expects a 200 and returns the provider that answered
    /// (checked against the mock's own answer).
    fn routed(&self, headers: &[(&str, &str)]) -> String {
        let r = self.chat(headers);
        assert_eq!(
            r.status,
            200,
            "body: {}\nEnvoy log tail:\n{}",
            r.text(),
            self.gateway.log_tail(30)
        );
        let name = r
            .header("x-market-router-provider")
            .expect("x-market-router-provider header")
            .to_string();
        assert_eq!(
            r.json().unwrap()["provider"],
            name.as_str(),
            "the header names the mock that answered"
        );
        name
    }

    /// GET `/market-router/v1/route?<query>`.
    fn route_query(&self, query: &str) -> (u16, Value) {
        let r = get(
            &self
                .gateway
                .url(&format!("/market-router/v1/route?{query}")),
            T,
        )
        .unwrap();
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{}",
            r.text()
        );
        (r.status, r.json().unwrap())
    }

    /// The ranking of `MODEL` for the test request's size.
    fn explain(&self) -> Value {
        let (status, v) =
            self.route_query(&format!("model={MODEL}&input_tokens=20&output_tokens=100"));
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Polls `/route` until `pred` holds (bounded).
    fn wait_route(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.explain();
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last /route: {v}\nEnvoy log tail:\n{}",
                self.gateway.log_tail(30)
            );
            thread::sleep(POLL);
        }
    }

    /// Waits until the filter has loaded a snapshot.
    fn wait_snapshot(&self) -> Value {
        self.wait_route("a loaded snapshot", |v| {
            v["snapshot"]["offers"].as_u64().unwrap_or(0) > 0
        })
    }
}

/// The test request: ~20 prompt tokens, 100 completion tokens.
fn chat_body() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100})
}

/// Provider names of the ranked candidates, best first.
fn ranked(v: &Value) -> Vec<String> {
    v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["provider"].as_str().unwrap().to_string())
        .collect()
}

/// `(provider, constraint)` of the excluded providers.
fn excluded(v: &Value) -> Vec<(String, String)> {
    v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["provider"].as_str().unwrap().to_string(),
                e["constraint"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn candidate<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["provider"] == name)
        .unwrap_or_else(|| panic!("{name} is not a candidate: {v}"))
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn counts(items: &[(&str, u64)]) -> BTreeMap<String, u64> {
    items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Strategies on the fixture catalog
// ---------------------------------------------------------------------------------------------

/// Starts the catalog under `routing`, checks `/route` ranks `expected` first and that 5
/// requests all go to it (header, answer and mock hit counts).
fn strategy_picks(routing: Value, expected: &str, strategy: &str) {
    for mode in HOSTS {
        strategy_picks_in(mode, routing.clone(), expected, strategy);
    }
}

fn strategy_picks_in(mode: &str, routing: Value, expected: &str, strategy: &str) {
    let config = plugin_config(providers(&CATALOG_NAMES), 300, routing);
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    let v = bed.wait_snapshot();
    assert_eq!(v["strategy"], strategy, "{mode}: {v}");
    assert_eq!(ranked(&v)[0], expected, "{mode}: {v}");
    for _ in 0..5 {
        let r = bed.chat(&[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-market-router-provider"), Some(expected));
        assert_eq!(r.header("x-market-router-strategy"), Some(strategy));
        assert_eq!(r.header("x-market-router-attempts"), Some("1"));
    }
    let mut want = counts(&CATALOG_NAMES.map(|n| (n, 0)));
    want.insert(expected.to_string(), 5);
    assert_eq!(bed.hits(), want);
}

#[test]
fn the_default_weighs_price_failures_and_latency_against_the_market_median() {
    // No strategy set: value. The target is the median of 900, 150, 500 and 200 ms (350);
    // cheap (900 ms, over 1.3 × 350) counts 900 / 455 ≈ 2× its price, so mid, 1.5× cheap's
    // price and within the bar, goes first.
    strategy_picks(json!({}), "mid", "value");
    let config = plugin_config(providers(&CATALOG_NAMES), 300, json!({}));
    let bed = Bed::start(&CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    let v = bed.wait_snapshot();
    assert_eq!(v["ttft_target_ms"], 350.0, "{v}");
    assert_eq!(v["ttft_target_source"], "market_median", "{v}");
    assert_eq!(ranked(&v), ["mid", "cheap", "fast", "solid"], "{v}");
    let cheap = candidate(&v, "cheap");
    assert_eq!(cheap["beyond_ttft_target"], true, "{v}");
    let factor =
        cheap["value_usd"].as_f64().unwrap() / cheap["expected_cost_usd"].as_f64().unwrap();
    // (1 + 1 − 0.97) × 900 / (1.3 × 350)
    assert!((factor - 1.03 * 900.0 / 455.0).abs() < 0.01, "{v}");
    assert_eq!(candidate(&v, "mid")["score"], 1.0, "{v}");
}

#[test]
fn cheapest_picks_the_lowest_price() {
    strategy_picks(json!({"strategy": "cheapest"}), "cheap", "cheapest");
}

#[test]
fn fastest_picks_the_lowest_ttft() {
    strategy_picks(json!({"strategy": "fastest"}), "fast", "fastest");
}

#[test]
fn most_reliable_picks_the_highest_uptime() {
    strategy_picks(
        json!({"strategy": "most_reliable"}),
        "solid",
        "most_reliable",
    );
}

#[test]
fn balanced_with_equal_weights_picks_the_best_blend() {
    // mid is never first on one axis but wins the blend (0.75 vs fast 0.61).
    strategy_picks(
        json!({"strategy": "balanced", "weights": {"price": 1, "latency": 1, "reliability": 1}}),
        "mid",
        "balanced",
    );
}

#[test]
fn balanced_with_latency_heavy_weights_picks_the_fastest() {
    // 0.1 / 0.8 / 0.1: fast 0.88 vs mid 0.75.
    strategy_picks(
        json!({"strategy": "balanced", "weights": {"price": 0.1, "latency": 0.8, "reliability": 0.1}}),
        "fast",
        "balanced",
    );
}

#[test]
fn a_ttft_target_puts_the_cheapest_fast_enough_provider_first() {
    for mode in HOSTS {
        a_ttft_target_puts_the_cheapest_fast_enough_provider_first_in(mode);
    }
}

fn a_ttft_target_puts_the_cheapest_fast_enough_provider_first_in(mode: &str) {
    // Within 300 ms: fast (150) and mid (200); mid is the cheaper of the two.
    let routing = json!({"strategy": "cheapest", "ttft_target_ms": 300});
    strategy_picks_in(mode, routing.clone(), "mid", "cheapest");
    let config = plugin_config(providers(&CATALOG_NAMES), 300, routing);
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    let v = bed.wait_snapshot();
    assert_eq!(ranked(&v), ["mid", "fast", "cheap", "solid"], "{v}");
    assert_eq!(v["ttft_target_ms"], 300.0, "{v}");
    for (name, beyond) in [
        ("mid", false),
        ("fast", false),
        ("cheap", true),
        ("solid", true),
    ] {
        assert_eq!(candidate(&v, name)["beyond_ttft_target"], beyond, "{v}");
    }
}

#[test]
fn a_ttft_target_nobody_meets_still_routes() {
    // The same 100 ms as the constraint that answers 503 below: as a target it excludes no one.
    strategy_picks(
        json!({"strategy": "cheapest", "ttft_target_ms": 100}),
        "cheap",
        "cheapest",
    );
}

#[test]
fn weighted_spreads_traffic_by_balanced_score() {
    for mode in HOSTS {
        weighted_spreads_traffic_by_balanced_score_in(mode);
    }
}

fn weighted_spreads_traffic_by_balanced_score_in(mode: &str) {
    let routing = json!({
        "strategy": "weighted",
        "weights": {"price": 1, "latency": 1, "reliability": 1},
        "seed": 7
    });
    let config = plugin_config(providers(&CATALOG_NAMES), 300, routing);
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    let v = bed.wait_snapshot();
    // The balanced order under these weights; every score is positive.
    assert_eq!(ranked(&v)[0], "mid", "{v}");
    for n in CATALOG_NAMES {
        assert!(candidate(&v, n)["score"].as_f64().unwrap() > 0.0, "{v}");
    }

    const N: u64 = 60;
    let mut by_header: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..N {
        *by_header.entry(bed.routed(&[])).or_default() += 1;
    }
    let hits = bed.hits();
    let mut expected_hits = by_header.clone();
    for n in CATALOG_NAMES {
        expected_hits.entry(n.to_string()).or_insert(0);
    }
    eprintln!("weighted, {N} requests: {hits:?}");
    assert_eq!(hits, expected_hits, "headers and mock hits agree");
    assert_eq!(hits.values().sum::<u64>(), N);
    // Shares, not exact counts: the best blend (expected ~52 %) gets the most but not all,
    // every provider with a positive score gets some.
    let best = hits["mid"];
    for n in ["cheap", "fast", "solid"] {
        assert!(hits[n] >= 1, "{n} got no traffic: {hits:?}");
        assert!(hits[n] < best, "mid must get the most: {hits:?}");
    }
    assert!(
        (N * 35 / 100..=N * 75 / 100).contains(&best),
        "mid's share is off: {hits:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A snapshot change moves traffic within two refresh periods
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_change_moves_traffic_within_two_refresh_periods() {
    // Long enough that the slack below (three ticks) is room for a loaded 2-core machine.
    const REFRESH_MS: u64 = 1000;
    // The filter ticks every refresh_ms / 4 (`refresh::tick_period_ms` in the core) and takes the refresh slot on
    // the first tick after the due time.
    const TICK_MS: u64 = REFRESH_MS / 4;
    let names = ["cheap", "fast"];
    let offers = |cheap_price: f64, fast_price: f64| {
        vec![
            offer(
                "cheap",
                cheap_price,
                cheap_price,
                900.0,
                0.99,
                "online",
                "community",
                "eu-west",
            ),
            offer(
                "fast", fast_price, fast_price, 150.0, 0.99, "online", "company", "us-east",
            ),
        ]
    };
    let config = plugin_config(
        providers(&names),
        REFRESH_MS,
        json!({"strategy": "cheapest"}),
    );
    let bed = Bed::start(&names, &snapshot(&offers(0.1, 1.0)), &config, 1);
    bed.wait_snapshot();
    for _ in 0..3 {
        assert_eq!(bed.routed(&[]), "cheap");
    }

    // Worst case after the write: a fetch that read the old file just before the write, the
    // next fetch one period later plus up to one tick of claim delay, then up to one more
    // tick until the worker adopts the new generation — refresh + 2 ticks. The bound allowed
    // is 2 × refresh + 1 tick (= refresh + 5 ticks): three ticks (750 ms) of slack for timer
    // and scheduling delays on a loaded 2-core machine. A request is handled after it is
    // sent: one sent after the bound that still goes to the old provider shows the switch
    // late for sure; a slow answer alone (the machine, not the filter) shows nothing. The
    // polls run on to a later deadline so that a late switch is reported with its time.
    let bound = Duration::from_millis(2 * REFRESH_MS + TICK_MS);
    let deadline = bound + Duration::from_secs(2);
    // Three moves (cheap → fast → cheap → fast). The first write lands at an arbitrary phase
    // of the refresh cycle; the next ones right after a switch was seen, i.e. just after a
    // fetch: the worst phase, a whole period before the next fetch.
    let mut times = Vec::new();
    for (from, to, prices) in [
        ("cheap", "fast", (1.0, 0.1)),
        ("fast", "cheap", (0.1, 1.0)),
        ("cheap", "fast", (1.0, 0.1)),
    ] {
        let written = Instant::now();
        bed.write(&snapshot(&offers(prices.0, prices.1)));
        let mut seen = Vec::new();
        // When the last request that still went to `from` was sent.
        let mut last_old = Duration::ZERO;
        let switched = loop {
            let sent = written.elapsed();
            let who = bed.routed(&[]);
            let at = written.elapsed();
            if who == to {
                break at;
            }
            last_old = sent;
            seen.push(who);
            assert!(
                at < deadline,
                "traffic did not move to {to} within {deadline:?}; Envoy log tail:\n{}",
                bed.gateway.log_tail(30)
            );
            thread::sleep(Duration::from_millis(20));
        };
        times.push((last_old, switched));
        assert!(
            last_old < bound,
            "a request sent {last_old:?} after the write still went to {from}: the switch came \
             later than 2 refresh periods + 1 tick ({bound:?})"
        );
        assert!(seen.iter().all(|w| w == from), "{seen:?}");
        // It stays there.
        for _ in 0..3 {
            assert_eq!(bed.routed(&[]), to);
        }
    }
    eprintln!("last request to the old provider sent, first answer from the new one, after the write: {times:?} (bound {bound:?})");
}

// ---------------------------------------------------------------------------------------------
// 3. Availability
// ---------------------------------------------------------------------------------------------

#[test]
fn offline_offers_are_skipped_and_degraded_ones_rank_lower() {
    for mode in HOSTS {
        offline_offers_are_skipped_and_degraded_ones_rank_lower_in(mode);
    }
}

fn offline_offers_are_skipped_and_degraded_ones_rank_lower_in(mode: &str) {
    let names = ["down", "shaky", "steady"];
    // `down` would win on every axis; `shaky` and `steady` are equal but for availability.
    let offers = vec![
        offer(
            "down", 0.01, 0.01, 50.0, 0.9999, "offline", "company", "us-east",
        ),
        offer(
            "shaky", 0.5, 0.5, 300.0, 0.99, "degraded", "company", "us-east",
        ),
        offer(
            "steady", 0.5, 0.5, 300.0, 0.99, "online", "company", "us-east",
        ),
    ];
    for strategy in ["balanced", "most_reliable"] {
        let config = plugin_config(providers(&names), 300, json!({"strategy": strategy}));
        let bed = Bed::start_in(mode, &names, &snapshot(&offers), &config, 1);
        let v = bed.wait_snapshot();
        assert_eq!(excluded(&v), pairs(&[("down", "offline")]), "{v}");
        assert_eq!(ranked(&v), ["steady", "shaky"], "{v}");
        let (shaky, steady) = (candidate(&v, "shaky"), candidate(&v, "steady"));
        assert_eq!(shaky["availability"], "degraded");
        assert_eq!(steady["availability"], "online");
        assert!(
            shaky["score"].as_f64().unwrap() < steady["score"].as_f64().unwrap(),
            "{v}"
        );
        assert!(
            shaky["reliability"].as_f64().unwrap() < steady["reliability"].as_f64().unwrap(),
            "{v}"
        );
        // Equal offers would split a tie at random; the degraded one gets nothing.
        for _ in 0..10 {
            assert_eq!(bed.routed(&[]), "steady", "strategy {strategy}");
        }
        assert_eq!(
            bed.hits(),
            counts(&[("down", 0), ("shaky", 0), ("steady", 10)]),
            "strategy {strategy}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. One sidecar call per refresh period per process, ETag / 304
// ---------------------------------------------------------------------------------------------

#[test]
fn one_sidecar_call_per_period_whatever_the_worker_count() {
    const REFRESH_MS: u64 = 300;
    const WORKERS: u32 = 4;
    let config = plugin_config(
        providers(&CATALOG_NAMES),
        REFRESH_MS,
        json!({"strategy": "cheapest"}),
    );
    let snap = snapshot(&catalog());
    let bed = Bed::start(&CATALOG_NAMES, &snap, &config, WORKERS);
    assert_eq!(
        bed.envoy().stat("server.concurrency").unwrap(),
        Some(u64::from(WORKERS))
    );
    bed.wait_snapshot();
    assert_eq!(bed.routed(&[]), "cheap");

    // Watch the sidecar's request count for ~3 s, noting when each request arrived.
    let sc = bed.sidecar();
    sc.reset().unwrap();
    let start = Instant::now();
    let mut events: Vec<(Duration, u64)> = Vec::new();
    let mut last = 0;
    while start.elapsed() < Duration::from_millis(3000) {
        let n = sc.hits().unwrap();
        if n != last {
            events.push((start.elapsed(), n));
            last = n;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let (first_at, first_n) = *events.first().expect("the sidecar was called");
    let (last_at, last_n) = *events.last().unwrap();
    // Requests from the first to the last seen, and the time between them.
    let calls = last_n - first_n + 1;
    let t_ms = (last_at - first_at).as_millis() as u64;
    eprintln!("{calls} sidecar calls in {t_ms} ms: {events:?}");
    // The upper bound is the promise (one call per period, not one per worker); the lower one
    // only says the refresh runs, at no less than half its rate on a loaded machine.
    let lo = (t_ms / REFRESH_MS / 2).saturating_sub(1);
    let hi = t_ms / REFRESH_MS + 2;
    assert!(
        (lo..=hi).contains(&calls),
        "{calls} sidecar calls in {t_ms} ms with refresh_ms {REFRESH_MS} and {WORKERS} workers \
         (allowed {lo}..={hi}; one call per worker would be ~{}); events: {events:?}",
        u64::from(WORKERS) * t_ms / REFRESH_MS
    );
    assert!(calls >= 6, "too few calls to judge: {events:?}");

    // The file did not change: the filter sent If-None-Match with the snapshot's ETag and got
    // 304s.
    let stats = sc.stats().unwrap();
    let body = fs::read(&bed.snapshot).unwrap();
    let etag = format!("\"{:016x}\"", fnv1a64(&body));
    assert_eq!(
        stats["last_headers"]["if-none-match"],
        etag.as_str(),
        "{stats}"
    );
    assert_eq!(
        stats["not_modified"].as_u64(),
        stats["requests"].as_u64(),
        "every call since the reset was answered 304: {stats}"
    );
    assert!(bed.stat("wasmcustom.market_router.snapshot.refresh_not_modified") >= calls);
    assert_eq!(bed.stat("wasmcustom.market_router.snapshot.refresh_ok"), 1);
    assert_eq!(
        bed.stat("wasmcustom.market_router.snapshot.refresh_failed"),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// 5. A broken sidecar does not stop routing; invalid offers are dropped
// ---------------------------------------------------------------------------------------------

#[test]
fn broken_sidecar_keeps_the_last_good_snapshot() {
    const REFRESH_MS: u64 = 200;
    let config = plugin_config(
        providers(&CATALOG_NAMES),
        REFRESH_MS,
        json!({"strategy": "cheapest"}),
    );
    // wasm at info: the filter's per-failure debug lines stay out of the log.
    let mut bed = Bed::start_with(&CATALOG_NAMES, &snapshot(&catalog()), &config, 1, |c| {
        c.component_log_level("wasm:info")
    });
    bed.wait_snapshot();
    assert_eq!(bed.routed(&[]), "cheap");
    let failures_before = bed.stat("wasmcustom.market_router.snapshot.refresh_failed");
    assert_eq!(failures_before, 0);

    // A version-2 document whose offers, were they taken, would move traffic to `mid`:
    // cheap's price goes up tenfold. (With the same catalog, accepting it would change
    // nothing.)
    let mut wrong_version = snapshot(
        &catalog()
            .into_iter()
            .map(|mut o| {
                if o["provider"] == "cheap" {
                    o["price"] = json!({"input_per_mtok": 1.0, "output_per_mtok": 2.0});
                }
                o
            })
            .collect::<Vec<_>>(),
    );
    let mut as_v1 = wrong_version.clone();
    wrong_version["version"] = json!(2);
    let phases = [
        ("500", json!({"status": 500})),
        ("not JSON", json!({"body": "this is not json {"})),
        ("wrong version", json!({"body": wrong_version.to_string()})),
    ];
    let mut routed = 0;
    let mut failed_so_far = failures_before;
    for (what, behavior) in phases {
        let sc = bed.sidecar();
        sc.set_behavior(&behavior).unwrap();
        let h0 = sc.hits().unwrap();
        // Keep routing while the sidecar answers badly twice.
        let deadline = Instant::now() + WAIT;
        while sc.hits().unwrap() < h0 + 2 {
            assert_eq!(bed.routed(&[]), "cheap", "phase {what}");
            routed += 1;
            assert!(
                Instant::now() < deadline,
                "phase {what}: the sidecar is not polled"
            );
            thread::sleep(Duration::from_millis(30));
        }
        // Each bad phase counts as failed refreshes (at least the one answered before the
        // second poll above).
        let failed = bed.stat("wasmcustom.market_router.snapshot.refresh_failed");
        assert!(
            failed > failed_so_far,
            "phase {what}: refresh_failed stayed at {failed}"
        );
        failed_so_far = failed;
    }
    // Gone altogether: at least three more periods of connection failures, and routing on
    // until the count shows 6 failed refreshes (2 per phase) plus the dead sidecar's: a
    // streak of >= 7 periods (a wait: a loaded machine may take longer than 3 periods).
    drop(bed.sidecar.take());
    let gone = Instant::now();
    let deadline = gone + WAIT;
    let failed = loop {
        assert_eq!(bed.routed(&[]), "cheap", "sidecar gone");
        routed += 1;
        let failed = bed.stat("wasmcustom.market_router.snapshot.refresh_failed");
        if gone.elapsed() >= Duration::from_millis(3 * REFRESH_MS) && failed >= 7 {
            break failed;
        }
        assert!(
            Instant::now() < deadline,
            "refresh_failed = {failed} after {:?} without the sidecar",
            gone.elapsed()
        );
        thread::sleep(Duration::from_millis(30));
    };
    assert_eq!(bed.hits()["cheap"], routed + 1);
    // The warning is logged once per streak per process; a change of failure kind does not
    // start a new streak.
    let log = bed.envoy().log_contents();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("market refresh failed"))
        .collect();
    eprintln!(
        "{failed} failed refreshes, {} warning line(s)",
        warnings.len()
    );
    assert!(
        (1..=2).contains(&warnings.len()),
        "{} warning lines for one streak of {failed} failures:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(
        warnings[0].contains("sidecar answered status 500"),
        "{}",
        warnings[0]
    );
    // The last good snapshot is still the one in use.
    let v = bed.explain();
    assert_eq!(v["snapshot"]["offers"], 4, "{v}");
    assert_eq!(ranked(&v)[0], "cheap");
    assert_eq!(candidate(&v, "cheap")["input_per_mtok"], 0.1, "{v}");

    // The same offers as version 1 are taken: the wrong-version phase kept traffic put
    // because of the version alone.
    let sc = Sidecar::start(&bed.snapshot).unwrap();
    as_v1["generated_at_ms"] = json!(now_ms());
    bed.write(&as_v1);
    bed.restart_with_sidecar(sc, &config);
    // Wait for the copy itself (its price of `cheap`), not only for `mid` first: before any
    // snapshot is loaded no provider has figures, and /route's fixed tie-break seed happens
    // to put `mid` first too, while a request's own seed picks any of them.
    bed.wait_route("the version-1 copy", |v| {
        v["snapshot"]["offers"] == 4
            && candidate(v, "cheap")["input_per_mtok"] == 1.0
            && ranked(v)[0] == "mid"
    });
    assert_eq!(bed.routed(&[]), "mid");
}

#[test]
fn invalid_offers_are_dropped_and_the_rest_used() {
    for mode in HOSTS {
        invalid_offers_are_dropped_and_the_rest_used_in(mode);
    }
}

fn invalid_offers_are_dropped_and_the_rest_used_in(mode: &str) {
    let names = ["cheap", "fast"];
    let mut bad = offer(
        "cheap",
        0.1,
        0.2,
        900.0,
        0.97,
        "online",
        "community",
        "eu-west",
    );
    bad["uptime"] = json!(1.5);
    let good = offer(
        "fast", 0.6, 0.9, 150.0, 0.99, "online", "company", "us-east",
    );
    let config = plugin_config(providers(&names), 300, json!({"strategy": "cheapest"}));
    let bed = Bed::start_in(mode, &names, &snapshot(&[bad, good]), &config, 1);
    let v = bed.wait_snapshot();
    assert_eq!(v["snapshot"]["offers"], 1, "{mode}: {v}");
    // cheap has no valid market data (and no static offer): it ranks after fast, as unknown.
    assert_eq!(ranked(&v), ["fast", "cheap"], "{v}");
    assert_eq!(candidate(&v, "cheap")["source"], "unknown");
    assert_eq!(candidate(&v, "fast")["source"], "market");
    for _ in 0..5 {
        assert_eq!(bed.routed(&[]), "fast");
    }
    assert_eq!(bed.hits(), counts(&[("cheap", 0), ("fast", 5)]));

    if !bed.is_kong() {
        // The counter's exact name in /stats (Kong's host has none).
        let stats = get(&bed.envoy().admin_url("/stats?filter=offers_invalid"), T)
            .unwrap()
            .text();
        assert!(
            stats.contains("wasmcustom.market_router.snapshot.offers_invalid:"),
            "{stats}"
        );
        assert!(bed.stat("wasmcustom.market_router.snapshot.offers_invalid") >= 1);
    }
    // The log line names the count and the first offer dropped, on every host.
    let log = bed.log();
    assert!(
        log.contains("dropped 1 invalid offer(s)") && log.contains("offers[0]"),
        "{mode}: {}",
        bed.gateway.log_tail(30)
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Stale data: the last market figures still rank, ahead of static offers
// ---------------------------------------------------------------------------------------------

#[test]
fn stale_snapshot_still_ranks_on_its_figures() {
    for mode in HOSTS {
        stale_snapshot_still_ranks_on_its_figures_in(mode);
    }
}

fn stale_snapshot_still_ranks_on_its_figures_in(mode: &str) {
    let names = ["cheap", "fast"];
    let mut ps = providers(&names);
    // cheap's own list price is far above its market price; fast has no static offer.
    ps[0]["static_offer"] = json!({
        "price": {"input_per_mtok": 2.0, "output_per_mtok": 3.0},
        "latency_ms": {"ttft_p50": 800},
        "uptime": 0.99
    });
    let mut config = plugin_config(ps, 200, json!({"strategy": "cheapest"}));
    // Room for a bed that starts slowly on a loaded machine: the first snapshot must still be
    // fresh when first looked at.
    config["market"]["max_age_ms"] = json!(30_000);
    let offers = vec![
        offer(
            "cheap",
            0.1,
            0.2,
            900.0,
            0.97,
            "online",
            "community",
            "eu-west",
        ),
        offer(
            "fast", 0.6, 0.9, 150.0, 0.99, "online", "company", "us-east",
        ),
    ];
    let bed = Bed::start_in(mode, &names, &snapshot(&offers), &config, 1);
    let v = bed.wait_snapshot();
    assert_eq!(v["snapshot"]["stale"], false, "{mode}: {v}");
    assert_eq!(ranked(&v), ["cheap", "fast"], "{mode}");
    assert_eq!(bed.routed(&[]), "cheap");
    assert_eq!(
        bed.stat_on_envoy("wasmcustom.market_router.snapshot.stale_decisions"),
        (!bed.is_kong()).then_some(0)
    );

    // An hour old: older than max_age_ms, and saying cheap was offline then. The last market
    // price (0.1) is still a better guess than cheap's static offer (2.0), and an `offline`
    // an hour old no longer excludes: cheap ranks as degraded, health judges its answers.
    let mut old = snapshot(&offers);
    let generated = now_ms() - 3_600_000;
    old["generated_at_ms"] = json!(generated);
    old["offers"][0]["availability"] = json!("offline");
    bed.write(&old);
    let v = bed.wait_route("the stale snapshot", |v| {
        v["snapshot"]["generated_at_ms"] == generated
    });
    assert_eq!(v["snapshot"]["stale"], true, "{v}");
    assert_eq!(ranked(&v), ["cheap", "fast"], "{v}");
    let c = candidate(&v, "cheap");
    assert_eq!(c["source"], "stale_market");
    assert_eq!(c["input_per_mtok"], 0.1);
    assert_eq!(c["output_per_mtok"], 0.2);
    assert_eq!(c["availability"], "degraded");
    assert_eq!(candidate(&v, "fast")["source"], "stale_market");

    bed.reset_mocks();
    for _ in 0..4 {
        let r = bed.chat(&[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-market-router-provider"), Some("cheap"));
        let age: u64 = r
            .header("x-market-router-snapshot-age-ms")
            .unwrap()
            .parse()
            .unwrap();
        assert!(age >= 3_600_000, "snapshot age {age}");
    }
    assert_eq!(bed.hits(), counts(&[("cheap", 4), ("fast", 0)]));
    assert_eq!(
        bed.stat_on_envoy("wasmcustom.market_router.snapshot.stale_decisions"),
        (!bed.is_kong()).then_some(4)
    );
    // Said once per streak, by the process, not once per period or per worker: wait until
    // several refresh periods (200 ms) have passed since the stale snapshot arrived.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stale_lines = || {
        bed.gateway
            .log_tail(usize::MAX)
            .lines()
            .filter(|l| {
                l.contains("market data is") && l.contains("routing on the last good snapshot")
            })
            .count()
    };
    while stale_lines() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(stale_lines(), 1, "one stale warning per streak");
}

// ---------------------------------------------------------------------------------------------
// 7. Constraints
// ---------------------------------------------------------------------------------------------

#[test]
fn constraints_that_exclude_everyone_answer_503_with_reasons() {
    for mode in HOSTS {
        constraints_that_exclude_everyone_answer_503_with_reasons_in(mode);
    }
}

fn constraints_that_exclude_everyone_answer_503_with_reasons_in(mode: &str) {
    let config = plugin_config(
        providers(&CATALOG_NAMES),
        300,
        json!({"strategy": "cheapest", "constraints": {"max_ttft_ms": 100}}),
    );
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    let v = bed.wait_snapshot();
    assert!(ranked(&v).is_empty(), "{v}");
    assert_eq!(
        excluded(&v),
        pairs(&CATALOG_NAMES.map(|n| (n, "max_ttft_ms"))),
        "{v}"
    );

    let r = bed.chat(&[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let e = r.json().unwrap();
    assert_eq!(e["error"]["code"], "no_provider_available", "{e}");
    assert_eq!(e["error"]["type"], "service_unavailable", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("`{MODEL}`")), "{msg}");
    for (name, ttft) in [("cheap", 900), ("fast", 150), ("solid", 500), ("mid", 200)] {
        assert!(
            msg.contains(&format!(
                "{name}: ttft {ttft} ms over max_ttft_ms 100 [max_ttft_ms]"
            )),
            "{msg}"
        );
    }
    assert_eq!(bed.hits(), counts(&CATALOG_NAMES.map(|n| (n, 0))));
    assert_eq!(
        bed.stat_on_envoy("wasmcustom.market_router.rejected.no_provider"),
        (!bed.is_kong()).then_some(1)
    );
}

#[test]
fn each_constraint_excludes_the_expected_provider() {
    for mode in HOSTS {
        each_constraint_excludes_the_expected_provider_in(mode);
    }
}

/// One bed per host; each constraint restarts the host (Envoy or Kong's) on the same mocks
/// and sidecar.
fn each_constraint_excludes_the_expected_provider_in(mode: &str) {
    // (constraint, strategy, excluded providers with the reason given, who takes the traffic
    // instead). Each case excludes the provider the strategy picks without constraints (see
    // the strategy tests above).
    type Case<'a> = (Value, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (
            json!({"min_uptime": 0.98}),
            "cheapest",
            &[("cheap", "uptime 0.97 under min_uptime 0.98")],
            "mid",
        ),
        (
            json!({"max_price_per_mtok": 1.0}),
            "most_reliable",
            &[("solid", "price 1.2/Mtok over max_price_per_mtok 1")],
            "mid",
        ),
        (
            json!({"provider_types": ["community", "self_hosted"]}),
            "fastest",
            &[
                ("fast", "provider type company not allowed"),
                ("solid", "provider type company not allowed"),
            ],
            "mid",
        ),
        (
            json!({"regions": ["us-east"]}),
            "cheapest",
            &[
                ("cheap", "region eu-west not allowed"),
                ("mid", "region ap-south not allowed"),
            ],
            "fast",
        ),
    ];
    let mut bed: Option<Bed> = None;
    for (constraint, strategy, out, winner) in cases {
        let code = constraint
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        let config = in_mode(
            plugin_config(
                providers(&CATALOG_NAMES),
                300,
                json!({"strategy": strategy, "constraints": constraint}),
            ),
            mode,
        );
        let what = format!("{mode}: {code}");
        match bed.as_mut() {
            None => {
                bed = Some(Bed::start(
                    &CATALOG_NAMES,
                    &snapshot(&catalog()),
                    &config,
                    1,
                ))
            }
            Some(b) => {
                b.restart(&config);
                b.reset_mocks();
            }
        }
        let b = bed.as_ref().unwrap();
        let v = b.wait_snapshot();
        let want: Vec<Value> = out
            .iter()
            .map(|(n, why)| json!({"provider": n, "constraint": code, "reason": why}))
            .collect();
        assert_eq!(v["excluded"], json!(want), "{what}: {v}");
        assert_eq!(ranked(&v)[0], winner, "{what}: {v}");
        for _ in 0..3 {
            assert_eq!(b.routed(&[]), winner, "{what}");
        }
        let hits = b.hits();
        assert_eq!(hits[winner], 3, "{what}: {hits:?}");
        for (n, _) in out {
            assert_eq!(hits[*n], 0, "{what}: {hits:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Client overrides
// ---------------------------------------------------------------------------------------------

/// Asserts none of the preference headers reached `mock`, while an ordinary header did.
fn assert_prefs_stripped(mock: &MockProvider, request_id: &str) {
    let last = mock.last_request().unwrap();
    let headers = last["headers"].as_object().unwrap();
    assert_eq!(
        headers.get("x-request-id").and_then(Value::as_str),
        Some(request_id),
        "ordinary headers pass: {last}"
    );
    for h in PREF_HEADERS {
        assert!(
            !headers.contains_key(h),
            "{h} reached {}: {last}",
            mock.name()
        );
    }
}

#[test]
fn client_overrides_off_are_ignored_and_stripped() {
    for mode in HOSTS {
        client_overrides_off_are_ignored_and_stripped_in(mode);
    }
}

fn client_overrides_off_are_ignored_and_stripped_in(mode: &str) {
    let config = plugin_config(
        providers(&CATALOG_NAMES),
        300,
        json!({"strategy": "cheapest"}),
    );
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    bed.wait_snapshot();
    let r = bed.chat(&[
        ("x-request-id", "req-off"),
        ("x-market-router-strategy", "fastest"),
        ("x-market-router-exclude", "cheap"),
        ("x-market-router-max-price", "0.01"),
        ("x-market-router-provider-type", "company"),
        ("x-market-router-region", "us-east"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-market-router-provider"), Some("cheap"));
    assert_eq!(r.header("x-market-router-strategy"), Some("cheapest"));
    assert_prefs_stripped(bed.mock("cheap"), "req-off");
    assert_eq!(
        bed.hits(),
        counts(&[("cheap", 1), ("fast", 0), ("solid", 0), ("mid", 0)])
    );
}

#[test]
fn client_overrides_on_take_effect_and_are_stripped() {
    for mode in HOSTS {
        client_overrides_on_take_effect_and_are_stripped_in(mode);
    }
}

fn client_overrides_on_take_effect_and_are_stripped_in(mode: &str) {
    let config = plugin_config(
        providers(&CATALOG_NAMES),
        300,
        json!({"strategy": "cheapest", "client_overrides": true}),
    );
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    bed.wait_snapshot();
    // (preference headers, provider that answers, strategy used)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 6] = [
        (&[], "cheap", "cheapest"),
        (
            &[("x-market-router-strategy", "fastest")],
            "fast",
            "fastest",
        ),
        (&[("x-market-router-exclude", "cheap")], "mid", "cheapest"),
        // fastest under 0.5 USD/Mtok: fast (0.9) and solid (1.2) are over the cap.
        (
            &[
                ("x-market-router-strategy", "fastest"),
                ("x-market-router-max-price", "0.5"),
            ],
            "mid",
            "fastest",
        ),
        // companies only: cheap (community) and mid (self_hosted) are out; fast is cheaper than solid.
        (
            &[("x-market-router-provider-type", "company")],
            "fast",
            "cheapest",
        ),
        (&[("x-market-router-region", "ap-south")], "mid", "cheapest"),
    ];
    for (i, (prefs, winner, strategy)) in cases.iter().enumerate() {
        let id = format!("req-on-{i}");
        let mut hs = vec![("x-request-id", id.as_str())];
        hs.extend_from_slice(prefs);
        bed.reset_mocks();
        let r = bed.chat(&hs);
        assert_eq!(r.status, 200, "{prefs:?}: {}", r.text());
        assert_eq!(
            r.header("x-market-router-provider"),
            Some(*winner),
            "{prefs:?}"
        );
        assert_eq!(
            r.header("x-market-router-strategy"),
            Some(*strategy),
            "{prefs:?}"
        );
        assert_eq!(bed.mock(winner).hits().unwrap(), 1, "{prefs:?}");
        assert_prefs_stripped(bed.mock(winner), &id);
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Session affinity
// ---------------------------------------------------------------------------------------------

#[test]
fn session_affinity_sticks_and_moves_when_the_provider_goes_offline() {
    for mode in HOSTS {
        session_affinity_sticks_and_moves_when_the_provider_goes_offline_in(mode);
    }
}

fn session_affinity_sticks_and_moves_when_the_provider_goes_offline_in(mode: &str) {
    let config = plugin_config(
        providers(&CATALOG_NAMES),
        200,
        json!({
            "strategy": "weighted",
            "weights": {"price": 1, "latency": 1, "reliability": 1},
            "affinity_header": "x-session-id",
            "seed": 11
        }),
    );
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&catalog()), &config, 1);
    bed.wait_snapshot();

    let session = |id: &str| bed.routed(&[("x-session-id", id)]);
    let sticky = session("conv-main");
    for _ in 0..9 {
        assert_eq!(session("conv-main"), sticky, "{mode}");
    }
    // Other sessions spread (weighted draws), each sticking to its own provider.
    let mut used = BTreeSet::new();
    for i in 0..12 {
        let id = format!("conv-{i}");
        let first = session(&id);
        assert_eq!(session(&id), first, "{mode}: session {id}");
        used.insert(first);
    }
    assert!(used.len() >= 2, "{mode}: all sessions went to {used:?}");

    // The sticky provider goes offline: the session moves, and sticks to its new provider.
    let offers: Vec<Value> = catalog()
        .into_iter()
        .map(|mut o| {
            if o["provider"] == sticky.as_str() {
                o["availability"] = json!("offline");
            }
            o
        })
        .collect();
    bed.write(&snapshot(&offers));
    bed.wait_route("the offline snapshot", |v| {
        excluded(v).contains(&(sticky.clone(), "offline".to_string()))
    });
    let before = bed.mock(&sticky).hits().unwrap();
    let moved = session("conv-main");
    assert_ne!(moved, sticky, "{mode}");
    for _ in 0..5 {
        assert_eq!(session("conv-main"), moved, "{mode}");
    }
    assert_eq!(bed.mock(&sticky).hits().unwrap(), before, "{mode}");
}

// ---------------------------------------------------------------------------------------------
// 10. Transparency endpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn models_and_route_endpoints_explain_the_market() {
    for mode in HOSTS {
        models_and_route_endpoints_explain_the_market_in(mode);
    }
}

fn models_and_route_endpoints_explain_the_market_in(mode: &str) {
    let mut ps = providers(&CATALOG_NAMES);
    // cheap and solid also serve mixtral.
    for i in [0, 2] {
        ps[i]["models"]["mixtral"] = json!("mixtral-8x7b");
    }
    let config = plugin_config(
        ps,
        300,
        json!({"strategy": "cheapest", "constraints": {"min_uptime": 0.98}}),
    );
    let mut offers = catalog();
    let mut mixtral = offer(
        "solid", 0.4, 0.5, 400.0, 0.999, "online", "company", "us-east",
    );
    mixtral["model"] = json!("mixtral");
    offers.push(mixtral);
    let bed = Bed::start_in(mode, &CATALOG_NAMES, &snapshot(&offers), &config, 1);
    bed.wait_snapshot();

    // /models: every model with its providers.
    let r = get(&bed.gateway.url("/market-router/v1/models"), T).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let m = r.json().unwrap();
    assert_eq!(m["object"], "list");
    let models: BTreeMap<String, Vec<String>> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let ps = d["providers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["provider"].as_str().unwrap().to_string())
                .collect();
            (d["id"].as_str().unwrap().to_string(), ps)
        })
        .collect();
    let want: BTreeMap<String, Vec<String>> = [
        (MODEL.to_string(), CATALOG_NAMES.map(String::from).to_vec()),
        ("mixtral".to_string(), vec!["cheap".into(), "solid".into()]),
    ]
    .into_iter()
    .collect();
    assert_eq!(models, want, "{m}");
    let llama = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == MODEL)
        .unwrap();
    let mid = llama["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "mid")
        .unwrap();
    assert_eq!(mid["provider_type"], "self_hosted", "{mid}");
    assert_eq!(mid["availability"], "online", "{mid}");
    assert_eq!(mid["input_per_mtok"], 0.15, "{mid}");
    assert_eq!(mid["source"], "market", "{mid}");
    let mixtral_cheap = &m["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "mixtral")
        .unwrap()["providers"][0];
    assert_eq!(
        mixtral_cheap["source"], "unknown",
        "no mixtral offer from cheap"
    );
    assert_eq!(m["snapshot"]["offers"], 5, "{m}");

    // /route: ranked candidates with their numbers, excluded providers with reasons.
    let v = bed.explain();
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["strategy"], "cheapest");
    assert_eq!(ranked(&v), ["mid", "fast", "solid"], "{v}");
    let cands = v["candidates"].as_array().unwrap();
    for (i, c) in cands.iter().enumerate() {
        assert_eq!(c["rank"], i + 1, "{c}");
        for field in [
            "input_per_mtok",
            "output_per_mtok",
            "ttft_ms",
            "uptime",
            "score",
            "expected_cost_usd",
        ] {
            assert!(c[field].is_f64() || c[field].is_u64(), "{field} in {c}");
        }
        assert_eq!(c["source"], "market", "{c}");
        if i > 0 {
            assert!(
                cands[i - 1]["score"].as_f64().unwrap() >= c["score"].as_f64().unwrap(),
                "ranked by score: {v}"
            );
        }
    }
    let fast = candidate(&v, "fast");
    assert_eq!(
        (
            fast["input_per_mtok"].as_f64(),
            fast["output_per_mtok"].as_f64(),
            fast["ttft_ms"].as_f64(),
            fast["uptime"].as_f64(),
        ),
        (Some(0.6), Some(0.9), Some(150.0), Some(0.99))
    );
    assert_eq!(fast["availability"], "online");
    assert_eq!(fast["provider_type"], "company");
    assert_eq!(fast["region"], "us-east");
    assert_eq!(candidate(&v, "mid")["provider_type"], "self_hosted");
    assert_eq!(candidate(&v, "mid")["score"], 1.0, "the cheapest scores 1");
    let ex = v["excluded"].as_array().unwrap();
    assert_eq!(ex.len(), 1, "{v}");
    assert_eq!(ex[0]["provider"], "cheap");
    assert_eq!(ex[0]["constraint"], "min_uptime");
    assert_eq!(ex[0]["reason"], "uptime 0.97 under min_uptime 0.98");
    assert_eq!(v["snapshot"]["stale"], false);

    // The other model ranks its own providers.
    let (status, mv) = bed.route_query("model=mixtral");
    assert_eq!(status, 200, "{mv}");
    assert_eq!(ranked(&mv), ["solid"], "{mv}");
    assert_eq!(candidate(&mv, "solid")["provider_model"], "mixtral-8x7b");
    assert_eq!(excluded(&mv), pairs(&[("cheap", "no_data")]), "{mv}");

    // Unknown model: 404 JSON, from the endpoint and from a real request.
    let (status, e) = bed.route_query("model=gpt-9");
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("gpt-9"),
        "{e}"
    );
    let r = post_json(
        &bed.gateway.url("/v1/chat/completions"),
        &[],
        &json!({"model": "gpt-9", "messages": []}),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "model_not_found");
    let (status, e) = bed.route_query("input_tokens=5");
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "model_missing", "{e}");
    assert_eq!(bed.hits(), counts(&CATALOG_NAMES.map(|n| (n, 0))));
}
