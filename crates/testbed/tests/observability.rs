//! Observability through a real Envoy: Prometheus counters and the decision-time histogram,
//! response headers (provider, attempts, strategy, cost, snapshot age), the decision record in
//! the access log, what the filter logs (and never logs), the transparency endpoints, gradual
//! rollout counters, and the `report` example against a live Envoy. The response headers,
//! the market-fed headers and the transparency endpoints are checked in Kong's wasm host too
//! (dispatch mode), in the same test bodies ([`Host`]); Prometheus, the access log and
//! Envoy's own 404s are Envoy's.
//!
//! Needs the wasm module (`make build`), the example binaries (`cargo build --examples`) and
//! Envoy (`make envoy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const T: Duration = Duration::from_secs(5);
const CHAT: &str = "/v1/chat/completions";

/// Static prices (USD per million tokens) of the two providers most tests use: `a` is the
/// cheapest, `b` serves a model `a` does not and renames `m` to `m-b`.
const A_IN: f64 = 1.0;
const A_OUT: f64 = 2.0;
const B_IN: f64 = 3.0;
const B_OUT: f64 = 12.0;

fn base_config() -> Value {
    json!({
        "providers": [
            {"name": "a", "cluster": "provider_a", "models": {"m": "m"},
             "static_offer": {"price": {"input_per_mtok": A_IN, "output_per_mtok": A_OUT}}},
            {"name": "b", "cluster": "provider_b", "models": {"m": "m-b", "only-b": "ob"},
             "static_offer": {"price": {"input_per_mtok": B_IN, "output_per_mtok": B_OUT}}}
        ],
        "routing": {"strategy": "cheapest"},
        "failover": {"attempt_timeout_ms": 3000, "deadline_ms": 8000,
                     "circuit": {"failure_threshold": 3, "cooldown_ms": 60000}}
    })
}

/// Two mocks and an Envoy running the filter with `config` (access log and fast stats flushes
/// as asked).
struct Bed {
    a: MockProvider,
    b: MockProvider,
    envoy: Envoy,
}

/// The host a scenario runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    /// Envoy, in the configuration's failover mode (route by default).
    Envoy,
    /// Kong's wasm host, dispatch mode.
    Kong,
}

/// Where requests go: Envoy's listener or a [`Gateway`]'s.
trait Listener {
    fn url(&self, path: &str) -> String;
}

impl Listener for Envoy {
    fn url(&self, path: &str) -> String {
        Envoy::url(self, path)
    }
}

impl Listener for Gateway {
    fn url(&self, path: &str) -> String {
        Gateway::url(self, path)
    }
}

impl<T: Listener> Listener for &T {
    fn url(&self, path: &str) -> String {
        (*self).url(path)
    }
}

/// Two mocks and `host` running the filter with `config`; on Kong the clusters become the
/// mocks' (and the sidecar's) `127.0.0.1:<port>` and the failover mode `dispatch`.
fn bed_on(
    host: Host,
    config: &Value,
    sidecar: Option<u16>,
) -> (MockProvider, MockProvider, Gateway) {
    if host == Host::Envoy {
        let Bed { a, b, envoy } = bed(config, |c| match sidecar {
            Some(port) => c.sidecar("market_sidecar", port),
            None => c,
        });
        return (a, b, Gateway::Envoy(envoy));
    }
    let a = MockProvider::start("a", &MockOpts::default()).unwrap();
    let b = MockProvider::start("b", &MockOpts::default()).unwrap();
    let mut config = config.clone();
    config["providers"][0]["cluster"] = json!(format!("127.0.0.1:{}", a.port()));
    config["providers"][1]["cluster"] = json!(format!("127.0.0.1:{}", b.port()));
    if let Some(port) = sidecar {
        config["market"]["cluster"] = json!(format!("127.0.0.1:{port}"));
    }
    config["failover"]["mode"] = json!("dispatch");
    let kong = Kong::start(&KongConfig::new().market_router(&config.to_string())).unwrap();
    (a, b, Gateway::Kong(kong))
}

fn bed(config: &Value, tune: impl FnOnce(EnvoyConfig) -> EnvoyConfig) -> Bed {
    let a = MockProvider::start("a", &MockOpts::default()).unwrap();
    let b = MockProvider::start("b", &MockOpts::default()).unwrap();
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", a.port()))
        .provider(ProviderCluster::new("provider_b", b.port()))
        .market_router(&config.to_string());
    let envoy = Envoy::start(&tune(cfg), 1).unwrap();
    Bed { a, b, envoy }
}

fn chat(model: &str, text: &str, max_tokens: Option<u64>) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    if let Some(n) = max_tokens {
        v["max_tokens"] = json!(n);
    }
    v
}

fn post(host: &impl Listener, body: &Value, headers: &[(&str, &str)]) -> Response {
    post_json(&host.url(CHAT), headers, body, T).unwrap()
}

/// Bytes of `body` as the provider receives it: the client's JSON with `model` rewritten.
fn provider_body_len(body: &Value, provider_model: &str) -> usize {
    let model = body["model"].as_str().unwrap();
    body.to_string().len() - json!(model).to_string().len()
        + json!(provider_model).to_string().len()
}

/// The mock's usage rule: prompt tokens = body bytes / 4 (at least 1); completion tokens = 8,
/// or `max_tokens` when that is smaller.
fn mock_usage(body: &Value, provider_model: &str) -> (u64, u64) {
    let prompt = (provider_body_len(body, provider_model) as u64 / 4).max(1);
    let completion = body["max_tokens"].as_u64().map_or(8, |m| m.min(8));
    (prompt, completion)
}

/// Cost in USD as the filter computes it.
fn cost_usd(usage: (u64, u64), input: f64, output: f64) -> f64 {
    (usage.0 as f64 * input + usage.1 as f64 * output) / 1e6
}

/// What one answer adds to `cost_micro_usd`.
fn micro_usd(usage: (u64, u64), input: f64, output: f64) -> u64 {
    (cost_usd(usage, input, output) * 1e6).round() as u64
}

/// Admin `/stats/prometheus` as `series → value`; a series is the metric name plus its labels
/// as printed (`name` alone when there are none).
/// Envoy's Prometheus page once the filter's batched counters (written at least every
/// 250 ms) have settled: scrapes until two scrapes 300 ms apart agree on every
/// `market_router_` series, for at most 5 s.
fn prom(envoy: &Envoy) -> BTreeMap<String, f64> {
    let ours = |m: &BTreeMap<String, f64>| -> Vec<(String, f64)> {
        m.iter()
            .filter(|(k, _)| k.starts_with("market_router_"))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = scrape(envoy);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = scrape(envoy);
        if ours(&now) == ours(&last) || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

fn scrape(envoy: &Envoy) -> BTreeMap<String, f64> {
    let r = get(&envoy.admin_url("/stats/prometheus"), T).unwrap();
    assert_eq!(r.status, 200, "admin /stats/prometheus");
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let series = series.strip_suffix("{}").unwrap_or(series);
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn val(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| {
        let near: Vec<&String> = m.keys().filter(|k| k.contains("market_router")).collect();
        panic!("no series {series} in /stats/prometheus; market_router series: {near:?}")
    })
}

/// Provider counter as Envoy 1.40 renders `wasmcustom.market_router.provider.<p>.<c>`.
fn pc(provider: &str, counter: &str) -> String {
    format!("market_router_provider_{provider}_{counter}")
}

/// Change of every series between two scrapes (series absent before count from 0).
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    val(after, series) - before.get(series).copied().unwrap_or(0.0)
}

/// Polls `cond` every 25 ms until it holds; panics with `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

fn header<'a>(r: &'a Response, name: &str) -> &'a str {
    r.header(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[test]
fn prometheus_counters_move_by_exactly_the_traffic() {
    let Bed { a, b, envoy } = bed(&base_config(), |c| {
        c.stats_flush_interval(Duration::from_millis(100))
    });
    let before = prom(&envoy);

    // 5 answers from b alone (only b serves `only-b`, renamed `ob`).
    let mut b_usage = Vec::new();
    for i in 0..5 {
        let body = chat("only-b", &"hello there ".repeat(i + 1), None);
        let r = post(&envoy, &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(header(&r, "x-market-router-provider"), "b");
        let usage = mock_usage(&body, "ob");
        let got = &r.json().unwrap()["usage"];
        assert_eq!(
            (
                got["prompt_tokens"].as_u64(),
                got["completion_tokens"].as_u64()
            ),
            (Some(usage.0), Some(usage.1)),
            "the mock's usage rule"
        );
        assert_eq!(
            b.last_request().unwrap()["body_bytes"].as_u64(),
            Some(provider_body_len(&body, "ob") as u64)
        );
        b_usage.push(usage);
    }

    // 3 answers where a fails with 503 and b serves; the third failure opens a's circuit.
    a.set_behavior(&json!({"status": 503})).unwrap();
    for i in 0..3 {
        let body = chat("m", &format!("failover number {i}"), Some(3));
        let r = post(&envoy, &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(header(&r, "x-market-router-provider"), "b");
        assert_eq!(header(&r, "x-market-router-attempts"), "2");
        assert_eq!(r.json().unwrap()["model"], "m-b");
        b_usage.push(mock_usage(&body, "m-b"));
    }

    // One unknown model, one body that is not JSON.
    let r = post(&envoy, &chat("no-such-model", "hi", None), &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "model_not_found");
    let r = request(
        "POST",
        &envoy.url(CHAT),
        &[("content-type", "application/json")],
        b"{not json",
        T,
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "invalid_json");
    assert_eq!((a.hits().unwrap(), b.hits().unwrap()), (3, 8));

    // The histogram shows up after a stats flush; counters are immediate.
    let routed = 8.0;
    let mut after = prom(&envoy);
    wait_for("decision_us samples", Duration::from_secs(5), || {
        after = prom(&envoy);
        after.get("market_router_decision_us_count").copied() >= Some(routed)
    });
    let d = |s: &str| delta(&before, &after, s);
    let tokens_in: u64 = b_usage.iter().map(|u| u.0).sum();
    let tokens_out: u64 = b_usage.iter().map(|u| u.1).sum();
    assert_eq!(tokens_out, 5 * 8 + 3 * 3);
    let micro: u64 = b_usage.iter().map(|u| micro_usd(*u, B_IN, B_OUT)).sum();
    let expected: Vec<(String, f64)> = vec![
        ("market_router_requests".into(), 10.0),
        ("market_router_rejected_unknown_model".into(), 1.0),
        ("market_router_rejected_bad_request".into(), 1.0),
        ("market_router_rejected_no_provider".into(), 0.0),
        ("market_router_all_failed".into(), 0.0),
        ("market_router_recovered_by_failover".into(), 3.0),
        (pc("a", "attempts"), 3.0),
        (pc("a", "success"), 0.0),
        (pc("a", "failure"), 3.0),
        (pc("a", "failover"), 3.0),
        (pc("a", "circuit_open"), 1.0),
        (pc("a", "tokens_in"), 0.0),
        (pc("a", "tokens_out"), 0.0),
        (pc("a", "cost_micro_usd"), 0.0),
        (pc("b", "attempts"), 8.0),
        (pc("b", "success"), 8.0),
        (pc("b", "failure"), 0.0),
        (pc("b", "failover"), 0.0),
        (pc("b", "circuit_open"), 0.0),
        (pc("b", "tokens_in"), tokens_in as f64),
        (pc("b", "tokens_out"), tokens_out as f64),
        (pc("b", "cost_micro_usd"), micro as f64),
        ("market_router_decision_us_count".into(), routed),
        (
            "market_router_decision_us_bucket{le=\"+Inf\"}".into(),
            routed,
        ),
    ];
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(s, want)| d(s) != *want)
        .map(|(s, want)| format!("{s}: moved by {}, expected {want}", d(s)))
        .collect();
    assert!(wrong.is_empty(), "counters off:\n{}", wrong.join("\n"));
    // Buckets are cumulative and end at the count.
    let buckets: Vec<f64> = after
        .iter()
        .filter(|(k, _)| k.starts_with("market_router_decision_us_bucket{"))
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.len() > 5, "decision_us buckets: {buckets:?}");
    assert!(val(&after, "market_router_decision_us_sum") > 0.0);
}

#[test]
fn response_headers_carry_provider_attempts_strategy_and_cost() {
    response_headers_carry_provider_attempts_strategy_and_cost_on(Host::Envoy);
}

#[test]
fn response_headers_carry_provider_attempts_strategy_and_cost_kong() {
    response_headers_carry_provider_attempts_strategy_and_cost_on(Host::Kong);
}

fn response_headers_carry_provider_attempts_strategy_and_cost_on(host: Host) {
    let (a, _b, gateway) = bed_on(host, &base_config(), None);
    let envoy = &gateway;

    // Non-streaming: the exact cost of the answer's usage at a's price.
    let body = chat("m", "what does this cost", Some(5));
    let r = post(&envoy, &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = mock_usage(&body, "m");
    let got = &r.json().unwrap()["usage"];
    assert_eq!(
        (
            got["prompt_tokens"].as_u64(),
            got["completion_tokens"].as_u64()
        ),
        (Some(usage.0), Some(usage.1))
    );
    assert_eq!(header(&r, "x-market-router-provider"), "a");
    assert_eq!(header(&r, "x-market-router-attempts"), "1");
    assert_eq!(header(&r, "x-market-router-strategy"), "cheapest");
    assert_eq!(
        header(&r, "x-market-router-cost-usd"),
        format!("{:.8}", cost_usd(usage, A_IN, A_OUT))
    );
    assert_eq!(r.header("x-market-router-cost-estimated"), None);
    assert_eq!(
        r.header("x-market-router-snapshot-age-ms"),
        None,
        "no market configured"
    );

    // Streaming with include_usage: in route mode the header can only be an estimate, but the
    // counters take the real usage from the final chunk (Envoy's Prometheus page; Kong's host
    // has none).
    let before = gateway.envoy().map(prom);
    let mut body = chat("m", "stream me a few words please", Some(6));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&envoy, &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    assert_eq!(header(&r, "x-market-router-provider"), "a");
    assert_eq!(header(&r, "x-market-router-attempts"), "1");
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let final_usage = data
        .iter()
        .rev()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("a final usage chunk");
    let streamed = (
        final_usage["usage"]["prompt_tokens"].as_u64().unwrap(),
        final_usage["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(streamed, mock_usage(&body, "m"));
    if host == Host::Kong {
        // Dispatch mode holds the whole stream before it answers: the cost is the usage's.
        assert_eq!(r.header("x-market-router-cost-estimated"), None);
        assert_eq!(
            header(&r, "x-market-router-cost-usd"),
            format!("{:.8}", cost_usd(streamed, A_IN, A_OUT))
        );
    } else {
        assert_eq!(header(&r, "x-market-router-cost-estimated"), "true");
        let estimate: f64 = header(&r, "x-market-router-cost-usd").parse().unwrap();
        assert!(estimate > 0.0 && estimate < 1.0, "estimate {estimate}");
    }
    assert_eq!(a.hits().unwrap(), 2);
    let (Some(before), Some(envoy)) = (before, gateway.envoy()) else {
        gateway.assert_no_crash();
        return;
    };
    let mut after = prom(envoy);
    wait_for("the stream's usage in the counters", T, || {
        after = prom(envoy);
        delta(&before, &after, &pc("a", "tokens_in")) > 0.0
    });
    assert_eq!(
        delta(&before, &after, &pc("a", "tokens_in")),
        streamed.0 as f64
    );
    assert_eq!(
        delta(&before, &after, &pc("a", "tokens_out")),
        streamed.1 as f64
    );
    assert_eq!(
        delta(&before, &after, &pc("a", "cost_micro_usd")),
        micro_usd(streamed, A_IN, A_OUT) as f64
    );
    assert_eq!(delta(&before, &after, &pc("a", "success")), 1.0);
}

#[test]
fn market_fed_answers_carry_snapshot_age_and_market_price() {
    market_fed_answers_carry_snapshot_age_and_market_price_on(Host::Envoy);
}

#[test]
fn market_fed_answers_carry_snapshot_age_and_market_price_kong() {
    market_fed_answers_carry_snapshot_age_and_market_price_on(Host::Kong);
}

fn market_fed_answers_carry_snapshot_age_and_market_price_on(host: Host) {
    let dir = TempDir::new("obs-market").unwrap();
    let file = dir.join("snapshot.json");
    let generated = now_ms() - 2000;
    let offer = |provider: &str, model: &str, input: f64, output: f64| {
        json!({"provider": provider, "model": model,
               "price": {"input_per_mtok": input, "output_per_mtok": output},
               "latency_ms": {"ttft_p50": 300}, "uptime": 0.99, "availability": "online",
               "provider_type": "company"})
    };
    let snapshot = json!({"version": 1, "generated_at_ms": generated, "offers": [
        offer("a", "m", 0.5, 1.0),
        offer("b", "m", 3.0, 12.0),
    ]});
    std::fs::write(&file, snapshot.to_string()).unwrap();
    let sidecar = Sidecar::start(&file).unwrap();
    let mut config = base_config();
    config["market"] = json!({"cluster": "market_sidecar", "refresh_ms": 200,
                              "max_age_ms": 60000, "timeout_ms": 1000});
    let (_a, _b, envoy) = bed_on(host, &config, Some(sidecar.port()));
    wait_for(
        "the snapshot in the filter",
        Duration::from_secs(10),
        || {
            get(&envoy.url("/market-router/v1/models"), T)
                .ok()
                .and_then(|r| r.json().ok())
                .is_some_and(|v| v["snapshot"]["offers"] == 2)
        },
    );

    let body = chat("m", "priced by the market", Some(4));
    let sent = now_ms();
    let r = post(&envoy, &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "x-market-router-provider"), "a");
    let age: u64 = header(&r, "x-market-router-snapshot-age-ms")
        .parse()
        .unwrap();
    let upper = now_ms() - generated;
    assert!(
        age + 5 >= sent - generated && age <= upper + 5,
        "snapshot age {age} ms outside [{}, {upper}]",
        sent - generated
    );
    assert_eq!(
        header(&r, "x-market-router-cost-usd"),
        format!("{:.8}", cost_usd(mock_usage(&body, "m"), 0.5, 1.0)),
        "priced at the market's price, not the static one"
    );
    assert!(sidecar.hits().unwrap() >= 1);
    envoy.assert_no_crash();
}

/// Access log line prefix used by the decision-record test.
const DECISION_PREFIX: &str = "MR-DECISION ";

fn decision_lines(envoy: &Envoy) -> Vec<(u16, String)> {
    envoy
        .log_contents()
        .lines()
        .filter_map(|l| l.strip_prefix(DECISION_PREFIX))
        .filter_map(|l| {
            let (status, record) = l.split_once(' ')?;
            Some((status.parse().ok()?, record.to_string()))
        })
        .collect()
}

#[test]
fn decision_record_reaches_the_access_log() {
    let format = format!(
        "{DECISION_PREFIX}%RESPONSE_CODE% %FILTER_STATE(wasm.market_router.decision:PLAIN)%\n"
    );
    let Bed { a, b: _b, envoy } = bed(&base_config(), |c| {
        c.access_log(true)
            .access_log_format(&format)
            .file_flush_interval(Duration::from_millis(100))
    });

    let healthy = chat("m", "first", Some(2));
    assert_eq!(post(&envoy, &healthy, &[]).status, 200);
    let mut streaming = chat("m", "a stream, priced at its end", Some(7));
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let r = post(&envoy, &streaming, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "x-market-router-cost-estimated"), "true");
    a.set_behavior(&json!({"status": 503})).unwrap();
    let failed_over = chat("m", "second, failed over", Some(4));
    let r = post(&envoy, &failed_over, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "x-market-router-attempts"), "2");
    assert_eq!(post(&envoy, &chat("nope", "x", None), &[]).status, 404);

    // The access log is written out on a timer: poll.
    let mut lines = Vec::new();
    wait_for("four access log lines", Duration::from_secs(10), || {
        lines = decision_lines(&envoy);
        lines.len() >= 4
    });
    assert_eq!(lines.len(), 4, "{lines:?}");
    let records: Vec<(u16, Value)> = lines
        .iter()
        .map(|(s, rec)| {
            let v = serde_json::from_str(rec)
                .unwrap_or_else(|e| panic!("decision record is not JSON ({e}): {rec}"));
            (*s, v)
        })
        .collect();

    let (status, first) = &records[0];
    assert_eq!(*status, 200);
    assert_eq!(first["provider"], "a");
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["tried"], json!([["a", "success"]]));

    // The stream's record is completed at its end, with the usage of its final chunk.
    let (status, streamed) = &records[1];
    let usage = mock_usage(&streaming, "m");
    assert_eq!(*status, 200);
    assert_eq!(streamed["provider"], "a");
    assert_eq!(streamed["tried"], json!([["a", "success"]]));
    assert_eq!(
        (
            streamed["prompt_tokens"].as_u64(),
            streamed["completion_tokens"].as_u64()
        ),
        (Some(usage.0), Some(usage.1))
    );
    assert_eq!(streamed["cost_estimated"], false, "{streamed}");
    let cost = streamed["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - cost_usd(usage, A_IN, A_OUT)).abs() < 1e-12,
        "{streamed}"
    );

    let (status, rec) = &records[2];
    let usage = mock_usage(&failed_over, "m-b");
    assert_eq!(*status, 200);
    assert_eq!(rec["provider"], "b", "{rec}");
    assert_eq!(rec["model"], "m");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["attempts"], 2);
    assert_eq!(rec["tried"], json!([["a", "5xx"], ["b", "success"]]));
    assert_eq!(rec["strategy"], "cheapest");
    let score = rec["score"].as_f64().expect("a numeric score");
    assert!((0.0..=1.0).contains(&score), "score {score}");
    let cost = rec["cost_usd"].as_f64().expect("a numeric cost_usd");
    assert!(
        (cost - cost_usd(usage, B_IN, B_OUT)).abs() < 1e-12,
        "cost_usd {cost}"
    );
    assert_eq!(rec["cost_estimated"], false);
    assert_eq!(
        (
            rec["prompt_tokens"].as_u64(),
            rec["completion_tokens"].as_u64()
        ),
        (Some(usage.0), Some(usage.1))
    );

    let (status, rejected) = &records[3];
    assert_eq!(*status, 404);
    assert_eq!(rejected["status"], 404);
    assert_eq!(rejected["provider"], Value::Null);
    assert_eq!(rejected["attempts"], 0);
}

#[test]
fn decision_record_can_be_turned_off() {
    let format = format!(
        "{DECISION_PREFIX}%RESPONSE_CODE% %FILTER_STATE(wasm.market_router.decision:PLAIN)%\n"
    );
    let mut config = base_config();
    config["decision_record"] = json!(false);
    let Bed {
        a: _a,
        b: _b,
        envoy,
    } = bed(&config, |c| {
        c.access_log(true)
            .access_log_format(&format)
            .file_flush_interval(Duration::from_millis(100))
    });
    let r = post(&envoy, &chat("m", "no record", Some(2)), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "x-market-router-provider"), "a");
    let mut lines = Vec::new();
    wait_for("one access log line", Duration::from_secs(10), || {
        lines = decision_lines(&envoy);
        !lines.is_empty()
    });
    // Envoy prints `-` for filter state that was never set.
    assert_eq!(lines, vec![(200, "-".to_string())]);
}

#[test]
fn logs_tell_the_story_without_prompts_or_keys() {
    const PROMPT: &str = "PROMPT-CANARY-7f3a";
    const CLIENT_KEY: &str = "sk-CANARY-client";
    const CLUSTER_KEY: &str = "sk-CANARY-cluster-a";
    let a = MockProvider::start("a", &MockOpts::default().api_key(CLUSTER_KEY)).unwrap();
    let b = MockProvider::start("b", &MockOpts::default()).unwrap();
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", a.port()).with_key(CLUSTER_KEY))
        .provider(ProviderCluster::new("provider_b", b.port()))
        .component_log_level("wasm:debug")
        .market_router(&base_config().to_string());
    let envoy = Envoy::start(&cfg, 1).unwrap();
    let client_auth = format!("Bearer {CLIENT_KEY}");
    let auth: &[(&str, &str)] = &[("authorization", client_auth.as_str())];
    let prompt = format!("my secret is {PROMPT}, keep it");

    // Served by a with the cluster's key, not the client's.
    let r = post(&envoy, &chat("m", &prompt, None), auth);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = a.last_request().unwrap()["headers"]["authorization"].clone();
    assert!(
        seen.as_str() == Some(format!("Bearer {CLUSTER_KEY}").as_str()),
        "provider a did not receive the cluster's key"
    );

    // A failover (non-streaming and streaming), a 400 and a 404 carrying the canary too.
    a.set_behavior(&json!({"status": 503})).unwrap();
    let r = post(&envoy, &chat("m", &prompt, None), auth);
    assert_eq!(
        (r.status, header(&r, "x-market-router-provider")),
        (200, "b")
    );
    let mut streaming = chat("m", &prompt, None);
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let r = post(&envoy, &streaming, auth);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen_b = b.last_request().unwrap()["headers"]["authorization"].clone();
    assert!(
        !seen_b.to_string().contains("CANARY"),
        "the client's key reached provider b"
    );
    let bad = format!("{{\"model\": \"m\", \"messages\": [\"{PROMPT}\"");
    let r = request(
        "POST",
        &envoy.url(CHAT),
        &[("content-type", "application/json"), auth[0]],
        bad.as_bytes(),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        post(&envoy, &chat("no-such-model", &prompt, None), auth).status,
        404
    );

    let log = envoy.log_contents();
    for (label, canary) in [
        ("prompt", PROMPT),
        ("client key", CLIENT_KEY),
        ("cluster key", CLUSTER_KEY),
        ("any", "CANARY"),
    ] {
        let lines: Vec<usize> = log
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(canary))
            .map(|(i, _)| i + 1)
            .collect();
        assert!(
            lines.is_empty(),
            "Envoy's log contains the {label} canary on line(s) {lines:?}"
        );
    }
    let has = |level: &str, text: &str| {
        log.lines()
            .any(|l| l.contains(&format!("[{level}][wasm]")) && l.contains(text))
    };
    assert!(
        has("info", "VM started") && has("info", "market-router configured"),
        "no info lifecycle lines:\n{log}"
    );
    assert!(has("debug", "ranked ["), "no debug decision line:\n{log}");
    assert!(
        has("warning", "provider a failed (status 503); failing over"),
        "no warn failover line:\n{log}"
    );
}

#[test]
fn transparency_endpoints_answer_from_the_snapshot_alone() {
    transparency_endpoints_answer_from_the_snapshot_alone_on(Host::Envoy);
}

#[test]
fn transparency_endpoints_answer_from_the_snapshot_alone_kong() {
    transparency_endpoints_answer_from_the_snapshot_alone_on(Host::Kong);
}

fn transparency_endpoints_answer_from_the_snapshot_alone_on(host: Host) {
    let (a, b, envoy) = bed_on(host, &base_config(), None);

    let r = get(&envoy.url("/market-router/v1/models"), T).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "content-type"), "application/json");
    let v = r.json().unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m", "only-b"]);
    let m = &v["data"][0];
    assert_eq!(m["object"], "model");
    assert_eq!(
        m["providers"],
        json!([
            {"provider": "a", "provider_type": "company", "availability": null,
             "input_per_mtok": A_IN, "output_per_mtok": A_OUT, "source": "static"},
            {"provider": "b", "provider_type": "company", "availability": null,
             "input_per_mtok": B_IN, "output_per_mtok": B_OUT, "source": "static"}
        ])
    );
    assert_eq!(v["data"][1]["providers"][0]["provider"], "b");
    assert_eq!(v["snapshot"]["offers"], 0);

    let r = get(
        &envoy.url("/market-router/v1/route?model=m&input_tokens=100&output_tokens=10"),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["model"], "m");
    assert_eq!(v["strategy"], "cheapest");
    assert_eq!(v["assumed_tokens"], json!({"input": 100, "output": 10}));
    let cands = v["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 2);
    assert_eq!(
        (cands[0]["rank"].as_u64(), cands[0]["provider"].as_str()),
        (Some(1), Some("a"))
    );
    assert_eq!(
        (cands[1]["rank"].as_u64(), cands[1]["provider"].as_str()),
        (Some(2), Some("b"))
    );
    assert_eq!(cands[1]["provider_model"], "m-b");
    assert_eq!(cands[0]["source"], "static");
    let expected_a = cost_usd((100, 10), A_IN, A_OUT);
    let expected_b = cost_usd((100, 10), B_IN, B_OUT);
    assert!((cands[0]["expected_cost_usd"].as_f64().unwrap() - expected_a).abs() < 1e-9);
    assert!((cands[1]["expected_cost_usd"].as_f64().unwrap() - expected_b).abs() < 1e-9);
    assert!(cands[0]["score"].is_number());
    assert_eq!(v["excluded"], json!([]));

    let r = get(&envoy.url("/market-router/v1/route?model=nope"), T).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json().unwrap()["error"]["code"], "model_not_found");
    let r = get(&envoy.url("/market-router/v1/route"), T).unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json().unwrap()["error"]["code"], "model_missing");
    let r = get(&envoy.url("/market-router/v1/elsewhere"), T).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json().unwrap()["error"]["code"], "not_found");
    assert_eq!(
        (a.hits().unwrap(), b.hits().unwrap()),
        (0, 0),
        "no provider is asked"
    );
    envoy.assert_no_crash();
    let Some(e) = envoy.envoy() else {
        // Kong: the rest (Envoy's stats and its own 404 once disabled) is Envoy's.
        return;
    };
    assert_eq!(
        e.stat("cluster.provider_a.upstream_rq_total").unwrap(),
        Some(0)
    );
    drop(envoy);

    // Disabled: the path is not the filter's any more; it is no LLM path, so the catch-all
    // route answers Envoy's own 404.
    let mut config = base_config();
    config["explain"] = json!({"enabled": false});
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", a.port()))
        .provider(ProviderCluster::new("provider_b", b.port()))
        .market_router(&config.to_string());
    let envoy = Envoy::start(&cfg, 1).unwrap();
    let r = get(&envoy.url("/market-router/v1/models"), T).unwrap();
    assert!(
        r.status == 503 || r.status == 404,
        "status {}: {}",
        r.status,
        r.text()
    );
    assert!(
        r.json().map_or(true, |v| v.get("data").is_none()),
        "the filter answered: {}",
        r.text()
    );
    assert_eq!((a.hits().unwrap(), b.hits().unwrap()), (0, 0));
}

#[test]
fn rollout_sends_the_configured_share_to_the_market() {
    let mut config = base_config();
    config["routing"] = json!({"strategy": "cheapest", "rollout_percent": 30,
                               "default_provider": "b", "seed": 7,
                               "affinity_header": "x-session-id"});
    let Bed { a, b, envoy } = bed(&config, |c| c);
    let before = prom(&envoy);

    let mut to_a = 0;
    for i in 0..100 {
        let r = post(&envoy, &chat("m", &format!("rollout {i}"), Some(1)), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        match header(&r, "x-market-router-provider") {
            "a" => to_a += 1,
            "b" => {}
            other => panic!("answered by {other}"),
        }
    }
    // Binomial(100, 0.3): mean 30, sd 4.6; the seed makes it repeatable, the band keeps the
    // assertion about the share rather than one draw.
    assert!(
        (15..=45).contains(&to_a),
        "{to_a} of 100 went to the market's pick"
    );
    assert_eq!((a.hits().unwrap(), b.hits().unwrap()), (to_a, 100 - to_a));

    // With a session id, a session always lands on the same side.
    let mut sides = BTreeMap::new();
    for s in 0..20 {
        let session = format!("session-{s}");
        let mut seen = Vec::new();
        for i in 0..3 {
            let r = post(
                &envoy,
                &chat("m", &format!("turn {i}"), Some(1)),
                &[("x-session-id", session.as_str())],
            );
            assert_eq!(r.status, 200, "{}", r.text());
            seen.push(header(&r, "x-market-router-provider").to_string());
        }
        assert!(
            seen.iter().all(|p| *p == seen[0]),
            "{session} moved: {seen:?}"
        );
        *sides.entry(seen[0].clone()).or_insert(0) += 1;
    }
    assert_eq!(sides.len(), 2, "20 sessions all on one side: {sides:?}");

    let after = prom(&envoy);
    let market = delta(&before, &after, "market_router_rollout_market");
    let default = delta(&before, &after, "market_router_rollout_default");
    assert_eq!(market + default, 160.0);
    let to_a_total = to_a + 3 * sides.get("a").copied().unwrap_or(0);
    assert_eq!(
        market, to_a_total as f64,
        "market decisions are a's answers"
    );
    assert_eq!(delta(&before, &after, "market_router_requests"), 160.0);
}

/// Runs the `report` example and returns its stdout.
fn run_report(args: &[&str]) -> String {
    let bin = example_bin("report").unwrap();
    let out = Command::new(&bin).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "report failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The report's table as `provider → column → cell`.
fn report_table(stdout: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("provider "));
    let header: Vec<String> = lines
        .next()
        .expect("a table header")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cells.len(), header.len(), "row {l:?}");
            let row = header
                .iter()
                .cloned()
                .zip(cells.iter().map(|c| c.to_string()))
                .collect();
            (cells[0].to_string(), row)
        })
        .collect()
}

#[test]
fn report_summarizes_a_live_envoy() {
    let acme = MockProvider::start("acme", &MockOpts::default()).unwrap();
    let commons = MockProvider::start("commons", &MockOpts::default()).unwrap();
    let config = json!({
        "providers": [
            {"name": "acme", "cluster": "provider_acme", "models": {"m": "m"},
             "static_offer": {"price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}},
            {"name": "commons", "cluster": "provider_commons", "models": {"m": "m", "c": "c"},
             "static_offer": {"price": {"input_per_mtok": 3.0, "output_per_mtok": 12.0}}}
        ],
        "routing": {"strategy": "cheapest"},
        "failover": {"attempt_timeout_ms": 3000}
    });
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_acme", acme.port()))
        .provider(ProviderCluster::new("provider_commons", commons.port()))
        .stats_flush_interval(Duration::from_millis(100))
        .market_router(&config.to_string());
    let envoy = Envoy::start(&cfg, 1).unwrap();

    // acme: 4 answers, then 2 failures that fail over to commons; commons: 2 + 3 answers.
    let mut usage = BTreeMap::<&str, (u64, u64)>::new();
    for i in 0..4 {
        let body = chat("m", &format!("report {i}"), None);
        assert_eq!(post(&envoy, &body, &[]).status, 200);
        let u = mock_usage(&body, "m");
        let e = usage.entry("acme").or_default();
        *e = (e.0 + u.0, e.1 + u.1);
    }
    acme.set_behavior(&json!({"status": 500})).unwrap();
    for i in 0..2 {
        let body = chat("m", &format!("failing over {i}"), Some(3));
        let r = post(&envoy, &body, &[]);
        assert_eq!(header(&r, "x-market-router-provider"), "commons");
        let u = mock_usage(&body, "m");
        let e = usage.entry("commons").or_default();
        *e = (e.0 + u.0, e.1 + u.1);
    }
    for i in 0..3 {
        let body = chat("c", &format!("commons only {i}"), None);
        assert_eq!(post(&envoy, &body, &[]).status, 200);
        let u = mock_usage(&body, "c");
        let e = usage.entry("commons").or_default();
        *e = (e.0 + u.0, e.1 + u.1);
    }
    // Latency comes from histograms: wait for the flush that carries all 11 upstream requests.
    wait_for("upstream_rq_time samples", Duration::from_secs(5), || {
        let m = prom(&envoy);
        let n = |c: &str| {
            m.get(&format!(
                "envoy_cluster_upstream_rq_time_count{{envoy_cluster_name=\"{c}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
        };
        n("provider_acme") >= 6.0 && n("provider_commons") >= 5.0
    });

    let dir = TempDir::new("obs-report").unwrap();
    let svg_path = dir.join("report.svg");
    let admin = envoy.admin_url("");
    let stdout = run_report(&["--admin", &admin, "--out", svg_path.to_str().unwrap()]);
    println!("{stdout}");
    let table = report_table(&stdout);
    assert_eq!(
        table.keys().map(String::as_str).collect::<Vec<_>>(),
        ["acme", "commons"],
        "{stdout}"
    );
    let cell = |p: &str, c: &str| table[p][c].clone();
    let expect = [
        ("acme", "cluster", "provider_acme".to_string()),
        ("acme", "attempts", "6".into()),
        ("acme", "success", "4".into()),
        ("acme", "failure", "2".into()),
        ("acme", "fail_rate", "33.3%".into()),
        ("acme", "failover", "2".into()),
        ("acme", "tokens_in", usage["acme"].0.to_string()),
        ("acme", "tokens_out", usage["acme"].1.to_string()),
        ("acme", "retry_rate", "0.500".into()),
        ("commons", "cluster", "provider_commons".into()),
        ("commons", "attempts", "5".into()),
        ("commons", "success", "5".into()),
        ("commons", "failure", "0".into()),
        ("commons", "fail_rate", "0.0%".into()),
        ("commons", "tokens_in", usage["commons"].0.to_string()),
        ("commons", "tokens_out", usage["commons"].1.to_string()),
        ("commons", "retry_rate", "0.000".into()),
    ];
    for (p, c, want) in &expect {
        assert_eq!(&cell(p, c), want, "{p} {c} in\n{stdout}");
    }
    let acme_cost = micro_usd(usage["acme"], 1.0, 2.0) as f64 / 1e6;
    assert_eq!(cell("acme", "cost_usd"), format!("{acme_cost:.6}"));
    assert_eq!(
        cell("acme", "effective_usd"),
        format!("{:.6}", acme_cost * 1.5)
    );
    for p in ["acme", "commons"] {
        let p50: f64 = cell(p, "p50_ms")
            .parse()
            .unwrap_or_else(|_| panic!("{p} p50 in\n{stdout}"));
        assert!((0.0..3000.0).contains(&p50), "{p} p50 {p50}");
    }
    assert!(stdout.contains("requests=9"), "{stdout}");

    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(">acme<") && svg.contains(">commons<"), "{svg}");
    assert!(svg.contains("provider_acme") && svg.contains("provider_commons"));
    assert_eq!(svg.matches("<svg").count(), 1);
    assert!(svg.matches("<rect").count() >= 2 + 3 * 2 + 2);

    // The provider → cluster map can come from a file instead of /config_dump.
    let config_file = dir.join("plugin.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let svg2 = dir.join("report2.svg");
    let stdout2 = run_report(&[
        "--admin",
        &admin,
        "--config",
        config_file.to_str().unwrap(),
        "--out",
        svg2.to_str().unwrap(),
    ]);
    let table2 = report_table(&stdout2);
    assert_eq!(table2["acme"]["attempts"], "6");
    assert_eq!(table2["commons"]["cluster"], "provider_commons");
    assert!(svg2.is_file());
}
