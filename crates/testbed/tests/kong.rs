//! market-router in Kong's proxy-wasm host: nginx with ngx_wasm_module on wasmtime, the host
//! Kong Gateway embeds, built by `scripts/kong-host.sh` (`make kong-host`). The twins of the
//! Envoy scenarios that apply to dispatch mode (the only mode Kong's host can run: it cannot
//! pause a response), with real sockets, the mock providers and the market sidecar.
//!
//! Providers are addressed `127.0.0.1:<port>` (Kong's host has no clusters); each nginx has the
//! `mr` shm_kv zone and `client_body_buffer_size 1m` (= the default `limits.max_body_bytes`).
//! A missing host fails every test: run `make kong-host` (or set MR_KONG_NGINX).
//!
//! Needs the filter module (`make build`), the example binaries (`cargo build --examples`) and
//! the host (`make kong-host`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::kong::{self_signed_cert, tls_front};
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Client timeout of one request.
const T: Duration = Duration::from_secs(10);
const MODEL: &str = "gpt-4o-mini";
const CHAT: &str = "/v1/chat/completions";
const ATTEMPT_TIMEOUT_MS: u64 = 800;
const DEADLINE_MS: u64 = 3000;
/// Bound of polls for something the filter does in the background.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100})
}

fn stream_body(model: &str) -> Value {
    let mut b = chat_body(model);
    b["stream"] = json!(true);
    b
}

/// A provider entry at `127.0.0.1:<port>` with a static offer (`price` per Mtok in and out).
fn provider(name: &str, port: u16, price: f64) -> Value {
    json!({
        "name": name,
        "cluster": format!("127.0.0.1:{port}"),
        "models": {MODEL: MODEL},
        "static_offer": {
            "price": {"input_per_mtok": price, "output_per_mtok": price * 2.0},
            "latency_ms": {"ttft_p50": 300},
            "uptime": 0.99
        }
    })
}

/// Dispatch mode, cheapest first, the failover knobs of the Envoy suite.
fn dispatch_config(providers: Vec<Value>, extra: Value) -> Value {
    let mut c = json!({
        "providers": providers,
        "routing": {"strategy": "cheapest"},
        "failover": {
            "mode": "dispatch",
            "max_attempts": 3,
            "attempt_timeout_ms": ATTEMPT_TIMEOUT_MS,
            "deadline_ms": DEADLINE_MS,
            "circuit": {"failure_threshold": 3, "cooldown_ms": 1000}
        }
    });
    merge(&mut c, extra);
    c
}

/// Merges `extra`'s members into `base`, objects recursively.
fn merge(base: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            match b.get_mut(&k) {
                Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                _ => {
                    b.insert(k, v);
                }
            }
        }
    }
}

fn show(r: &Response) -> String {
    format!(
        "status {} provider {:?} attempts {:?} body {}",
        r.status,
        r.header("x-market-router-provider"),
        r.header("x-market-router-attempts"),
        r.text()
    )
}

/// Kong's host with the filter, in front of mocks `a`, `b`, `c` (cheapest first).
struct Bed {
    // Dropped first, so nginx never sees its upstreams vanish mid-test.
    kong: Kong,
    mocks: Vec<(String, Option<MockProvider>)>,
}

/// What stands behind one provider.
enum Up {
    Mock(MockOpts),
}

fn ok() -> Up {
    Up::Mock(MockOpts::default())
}

impl Bed {
    fn start(ups: Vec<Up>, extra: Value, workers: usize) -> Bed {
        let names = ["a", "b", "c"];
        let mut mocks = Vec::new();
        let mut providers = Vec::new();
        for (i, up) in ups.into_iter().enumerate() {
            let name = names[i];
            let Up::Mock(opts) = up;
            let m = MockProvider::start(name, &opts).unwrap();
            let (port, mock) = (m.port(), Some(m));
            providers.push(provider(name, port, 0.1 * 5f64.powi(i as i32)));
            mocks.push((name.to_string(), mock));
        }
        let config = dispatch_config(providers, extra);
        let kong = Kong::start(
            &KongConfig::new()
                .workers(workers)
                .market_router(&config.to_string()),
        )
        .unwrap();
        Bed { kong, mocks }
    }

    fn mock(&self, name: &str) -> &MockProvider {
        self.mocks
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, m)| m.as_ref())
            .unwrap_or_else(|| panic!("provider {name} has no mock"))
    }

    fn hits(&self) -> Vec<Option<u64>> {
        self.mocks
            .iter()
            .map(|(_, m)| m.as_ref().map(|m| m.hits().unwrap()))
            .collect()
    }

    fn post(&self, headers: &[(&str, &str)], body: &Value) -> Response {
        post_json(&self.kong.url(CHAT), headers, body, T)
            .unwrap_or_else(|e| panic!("request failed: {e}\n{}", self.log_tail()))
    }

    fn chat(&self) -> Response {
        self.post(&[], &chat_body(MODEL))
    }

    fn log_tail(&self) -> String {
        let log = self.kong.error_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// No trap, panic or crashed worker in the error log.
    fn assert_no_crash(&self) {
        let crashes = self.kong.crashes();
        assert!(crashes.is_empty(), "{}", crashes.join("\n"));
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.assert_no_crash();
        }
    }
}

/// The client got `provider`'s JSON chat answer after `attempts` attempts.
fn assert_answer_from(r: &Response, provider: &str, attempts: u32) {
    assert_eq!(r.status, 200, "{}", show(r));
    assert_eq!(
        r.header("x-market-router-provider"),
        Some(provider),
        "{}",
        show(r)
    );
    assert_eq!(
        r.header("x-market-router-attempts"),
        Some(attempts.to_string().as_str()),
        "{}",
        show(r)
    );
    let v = r.json().unwrap();
    assert_eq!(v["object"], "chat.completion", "{}", show(r));
    assert_eq!(v["provider"], provider, "{}", show(r));
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
}

fn assert_api_error(r: &Response, status: u16, code: &str, what: &str) -> String {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: content type"
    );
    let v = r.json().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    assert!(
        v["error"]["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{what}: {v}"
    );
    let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
    assert!(!msg.is_empty(), "{what}: {v}");
    msg
}

fn chunk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out: Vec<u8> = body.chunks(piece).flat_map(chunk).collect();
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A chat body of at least `size` bytes.
fn big_chat(size: usize) -> Vec<u8> {
    let mut v = chat_body(MODEL);
    v["messages"][0]["content"] = json!("x".repeat(size));
    v.to_string().into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Loading and routing
// ---------------------------------------------------------------------------------------------

/// The module as `make build` makes it loads in wasmtime (no `proxy_get_log_level` import),
/// and each model reaches its provider under the provider's own id.
#[test]
fn loads_and_routes_each_model_to_its_provider() {
    let a = MockProvider::start("a", &MockOpts::default()).unwrap();
    let b = MockProvider::start("b", &MockOpts::default()).unwrap();
    let config = json!({
        "providers": [
            {"name": "a", "cluster": format!("127.0.0.1:{}", a.port()),
             "models": {"model-a": "a-internal-id", "shared": "shared"},
             "static_offer": {"price": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}},
            {"name": "b", "cluster": format!("127.0.0.1:{}", b.port()),
             "models": {"model-b": "model-b", "shared": "shared"},
             "static_offer": {"price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}}
        ],
        "routing": {"strategy": "cheapest"},
        "failover": {"mode": "dispatch"}
    });
    let kong = Kong::start(&KongConfig::new().market_router(&config.to_string())).unwrap();
    let log = kong.error_log();
    assert!(
        log.contains("market-router configured: 2 provider(s)"),
        "{log}"
    );
    let post = |model: &str| post_json(&kong.url(CHAT), &[], &chat_body(model), T).unwrap();

    let r = post("model-a");
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(r.header("x-market-router-provider"), Some("a"));
    assert_eq!(r.json().unwrap()["provider"], "a");
    assert_eq!(a.last_request().unwrap()["model"], "a-internal-id");

    let r = post("model-b");
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(r.header("x-market-router-provider"), Some("b"));
    assert_eq!(b.last_request().unwrap()["model"], "model-b");

    // Both serve `shared`: the cheaper one.
    let r = post("shared");
    assert_eq!(
        r.header("x-market-router-provider"),
        Some("a"),
        "{}",
        show(&r)
    );
    assert_eq!((a.hits().unwrap(), b.hits().unwrap()), (2, 1));

    // The filter found out which host it is in (one probe per worker).
    assert!(
        kong.error_log().contains("market-router: running in kong"),
        "{}",
        kong.error_log()
    );
    // Paths that are not LLM calls go to the location's proxy_pass untouched.
    let r = get(&kong.url("/health"), T).unwrap();
    assert_eq!(
        (r.status, r.text()),
        (404, r#"{"error":"fallthrough"}"#.to_string())
    );
    assert!(kong.crashes().is_empty(), "{:?}", kong.crashes());
}

/// A bad plugin configuration is refused with one error line naming the field, the value and
/// what is allowed; Kong's host then fails the worker ("on_configure failure", not
/// respawned), so no request is served unrouted: fail closed, as Envoy refuses to start.
#[test]
fn invalid_plugin_configuration_is_refused_with_one_line() {
    const LINE: &str = "market-router: invalid plugin configuration: field `routing.strategy` = \"fastes\": expected one of value, cheapest, fastest, most_reliable, balanced, weighted";
    let bad = json!({
        "providers": [{"name": "a", "cluster": "127.0.0.1:1", "models": {MODEL: MODEL}}],
        "routing": {"strategy": "fastes"},
        "failover": {"mode": "dispatch"}
    });
    let started = Instant::now();
    let err = match Kong::start(
        &KongConfig::new()
            .market_router(&bad.to_string())
            .expect_configured(0),
    ) {
        Ok(_) => panic!("Kong's host came up with a bad plugin configuration"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the bed waited for its timeout"
    );
    assert_eq!(err.matches(LINE).count(), 1, "{err}");
    assert_eq!(
        err.matches("invalid plugin configuration").count(),
        1,
        "{err}"
    );
    assert!(err.contains("on_configure failure"), "{err}");
}

/// Every bad request gets its OpenAI-style error from the filter and reaches no provider.
#[test]
fn bad_requests_get_openai_errors_and_reach_no_provider() {
    let bed = Bed::start(
        vec![ok(), ok()],
        json!({"limits": {"max_body_bytes": 1024}, "routing": {"client_overrides": true}}),
        1,
    );
    let url = bed.kong.url(CHAT);
    let json_ct = [("content-type", "application/json")];
    let send = |body: &[u8]| request("POST", &url, &json_ct, body, T).unwrap();

    let r = send(b"{\"model\": \"gpt-4o-mini\", \"messages\": [");
    assert_api_error(&r, 400, "invalid_json", "truncated JSON");
    let r = send(b"model=gpt-4o-mini");
    assert_api_error(&r, 400, "invalid_json", "form body");
    let r = send(br#"{"messages": [{"role": "user", "content": "hi"}]}"#);
    assert_api_error(&r, 400, "model_missing", "no model");
    let r = send(br#"{"model": 42, "messages": []}"#);
    assert_api_error(&r, 400, "model_missing", "model is a number");
    let r = send(b"");
    assert_api_error(&r, 400, "invalid_json", "empty body");
    let r = send(chat_body("gpt-5-imaginary").to_string().as_bytes());
    let msg = assert_api_error(&r, 404, "model_not_found", "unknown model");
    assert!(msg.contains("gpt-5-imaginary"), "{msg}");

    // Over limits.max_body_bytes, by Content-Length and chunked.
    let big = big_chat(2000);
    let r = send(&big);
    let msg = assert_api_error(&r, 413, "request_too_large", "Content-Length body");
    assert!(msg.contains("1024"), "{msg}");
    let hs = [
        ("content-type", "application/json"),
        ("transfer-encoding", "chunked"),
    ];
    let r = request("POST", &url, &hs, &chunked(&big, 300), T).unwrap();
    assert_api_error(&r, 413, "request_too_large", "chunked body");

    // Every provider excluded by the client: 503 with the reasons.
    let r = bed.post(&[("x-market-router-exclude", "a,b")], &chat_body(MODEL));
    let msg = assert_api_error(&r, 503, "no_provider_available", "all excluded");
    assert!(msg.contains('a') && msg.contains('b'), "{msg}");

    assert_eq!(
        bed.hits(),
        vec![Some(0), Some(0)],
        "no provider saw a bad request"
    );

    // Control: a chunked body under the limit is routed.
    let small = chat_body(MODEL).to_string().into_bytes();
    let r = request("POST", &url, &hs, &chunked(&small, 16), T).unwrap();
    assert_answer_from(&r, "a", 1);
    assert_eq!(
        bed.mock("a").last_request().unwrap()["body_bytes"],
        small.len()
    );
}

/// Bodies up to `limits.max_body_bytes` (1 MiB by default) reach the provider whole when
/// `client_body_buffer_size` is at least that (the documented setting); one byte over the
/// limit is a 413 from the filter.
#[test]
fn bodies_up_to_the_limit_reach_the_provider_whole() {
    let bed = Bed::start(vec![ok()], json!({}), 1);
    let limit = 1 << 20;
    let mut body = big_chat(0);
    let pad = limit - body.len();
    body = big_chat(pad);
    assert_eq!(body.len(), limit);
    let r = request(
        "POST",
        &bed.kong.url(CHAT),
        &[("content-type", "application/json")],
        &body,
        T,
    )
    .unwrap();
    assert_answer_from(&r, "a", 1);
    assert_eq!(bed.mock("a").last_request().unwrap()["body_bytes"], limit);

    let over = big_chat(pad + 1);
    let r = request(
        "POST",
        &bed.kong.url(CHAT),
        &[("content-type", "application/json")],
        &over,
        T,
    )
    .unwrap();
    assert_api_error(&r, 413, "request_too_large", "one byte over");
    assert_eq!(bed.mock("a").hits().unwrap(), 1);
}

// ---------------------------------------------------------------------------------------------
// Failover (dispatch mode)
// ---------------------------------------------------------------------------------------------

// The dispatch-mode failover scenarios (503, 429 with Retry-After, refused, hang, cut
// mid-body, malformed, all failing, streaming, client errors, the circuit, credentials and
// headers, bounded attempts) run in Kong's host as the `<scenario>::kong` twins of
// tests/failover.rs.

/// Two nginx workers share one health table: after `failure_threshold` failures seen by
/// either worker, neither sends to the provider until its cooldown ends.
#[test]
fn a_circuit_is_shared_by_two_workers() {
    let bed = Bed::start(
        vec![Up::Mock(MockOpts::default().status(503)), ok()],
        json!({"failover": {"circuit": {"failure_threshold": 3, "cooldown_ms": 30000}}}),
        2,
    );
    assert_eq!(
        bed.kong.worker_pids().len(),
        2,
        "{:?}",
        bed.kong.worker_pids()
    );
    let mut served_by = BTreeMap::<String, u64>::new();
    let mut after_open = BTreeSet::new();
    for i in 0..40 {
        let r = bed.chat();
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(r.header("x-market-router-provider"), Some("b"));
        let worker = r.header("x-kong-worker").unwrap_or("?").to_string();
        *served_by.entry(worker.clone()).or_default() += 1;
        if i >= 3 {
            after_open.insert(worker);
        }
        // Each request on a new connection; reuseport spreads them over the workers.
        thread::sleep(Duration::from_millis(30));
    }
    assert!(
        after_open.len() == 2,
        "one worker served every request after the circuit opened: {served_by:?}"
    );
    assert_eq!(
        bed.mock("a").hits().unwrap(),
        3,
        "a was tried after its circuit opened (served by {served_by:?})"
    );
    assert!(bed
        .kong
        .error_log()
        .contains("circuit opened for provider a"));
}

/// A session sticks to its provider across both workers (the affinity slot is overwritten
/// through CAS on Kong's shm_kv).
#[test]
fn session_affinity_sticks_across_workers() {
    let bed = Bed::start(
        vec![ok(), ok(), ok()],
        json!({"routing": {"strategy": "weighted", "weights": {"price": 1, "latency": 1, "reliability": 1},
                           "affinity_header": "x-session-id", "seed": 11}}),
        2,
    );
    let routed = |id: &str| {
        let r = bed.post(&[("x-session-id", id)], &chat_body(MODEL));
        assert_eq!(r.status, 200, "{}", show(&r));
        (
            r.header("x-market-router-provider").unwrap().to_string(),
            r.header("x-kong-worker").unwrap_or("?").to_string(),
        )
    };
    let mut used = BTreeSet::new();
    let mut workers = BTreeSet::new();
    for i in 0..12 {
        let id = format!("conv-{i}");
        let (first, w) = routed(&id);
        workers.insert(w);
        for _ in 0..4 {
            let (again, w) = routed(&id);
            workers.insert(w);
            assert_eq!(again, first, "session {id} moved");
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "all sessions went to {used:?}");
    assert_eq!(
        workers.len(),
        2,
        "one worker served everything: {workers:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Market data
// ---------------------------------------------------------------------------------------------

fn offer(provider: &str, price: f64) -> Value {
    json!({
        "provider": provider,
        "model": MODEL,
        "price": {"input_per_mtok": price, "output_per_mtok": price},
        "latency_ms": {"ttft_p50": 300.0, "ttft_p95": 600.0},
        "uptime": 0.99,
        "availability": "online",
        "provider_type": "company",
        "region": "us-east",
    })
}

fn snapshot(offers: &[Value]) -> Value {
    json!({"version": 1, "generated_at_ms": now_ms(), "offers": offers})
}

fn write_snapshot(path: &Path, doc: &Value) {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Kong with the filter fed by the market sidecar, providers `cheap` and `fast`.
struct MarketBed {
    kong: Kong,
    sidecar: Option<Sidecar>,
    _mocks: Vec<MockProvider>,
    snapshot: PathBuf,
    _dir: TempDir,
}

impl MarketBed {
    fn start(refresh_ms: u64, snap: &Value, workers: usize) -> MarketBed {
        let dir = TempDir::new("kong-market").unwrap();
        let snapshot = dir.join("snapshot.json");
        write_snapshot(&snapshot, snap);
        let mocks: Vec<MockProvider> = ["cheap", "fast"]
            .iter()
            .map(|n| MockProvider::start(n, &MockOpts::default()).unwrap())
            .collect();
        let sidecar = Sidecar::start(&snapshot).unwrap();
        let providers: Vec<Value> = mocks
            .iter()
            .map(|m| {
                json!({"name": m.name(), "cluster": format!("127.0.0.1:{}", m.port()),
                       "models": {MODEL: MODEL}})
            })
            .collect();
        let config = json!({
            "providers": providers,
            "market": {"cluster": format!("127.0.0.1:{}", sidecar.port()), "authority": "127.0.0.1",
                       "refresh_ms": refresh_ms, "max_age_ms": 60000, "timeout_ms": 500},
            "routing": {"strategy": "cheapest"},
            "failover": {"mode": "dispatch"}
        });
        let kong = Kong::start(
            &KongConfig::new()
                .workers(workers)
                .market_router(&config.to_string()),
        )
        .unwrap();
        MarketBed {
            kong,
            sidecar: Some(sidecar),
            _mocks: mocks,
            snapshot,
            _dir: dir,
        }
    }

    fn sidecar(&self) -> &Sidecar {
        self.sidecar.as_ref().unwrap()
    }

    fn routed(&self) -> String {
        let r = post_json(&self.kong.url(CHAT), &[], &chat_body(MODEL), T).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", show(&r), self.kong.error_log());
        let name = r.header("x-market-router-provider").unwrap().to_string();
        assert_eq!(r.json().unwrap()["provider"], name.as_str());
        name
    }

    fn explain(&self) -> Value {
        let r = get(
            &self.kong.url(&format!(
                "/market-router/v1/route?model={MODEL}&input_tokens=20&output_tokens=100"
            )),
            T,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json().unwrap()
    }

    fn wait_until(&self, what: &str, mut pred: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !pred(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.kong.error_log()
            );
            thread::sleep(Duration::from_millis(30));
        }
    }
}

impl Drop for MarketBed {
    fn drop(&mut self) {
        if !thread::panicking() {
            let crashes = self.kong.crashes();
            assert!(crashes.is_empty(), "{}", crashes.join("\n"));
        }
    }
}

fn ranked(v: &Value) -> Vec<String> {
    v["candidates"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["provider"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The snapshot is refreshed every period (each refresh after the first is a CAS overwrite,
/// which Kong's shm_kv refuses with CAS 0) and traffic follows it through three changes,
/// with two workers sharing one fetch per period.
#[test]
fn market_refresh_follows_the_snapshot_across_periods() {
    const REFRESH_MS: u64 = 400;
    let bed = MarketBed::start(
        REFRESH_MS,
        &snapshot(&[offer("cheap", 0.1), offer("fast", 1.0)]),
        2,
    );
    bed.wait_until("a loaded snapshot", |b| {
        b.explain()["snapshot"]["offers"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(bed.routed(), "cheap");
    let started = Instant::now();
    let h0 = bed.sidecar().hits().unwrap();
    for (to, prices) in [
        ("fast", (1.0, 0.1)),
        ("cheap", (0.1, 1.0)),
        ("fast", (1.0, 0.1)),
    ] {
        write_snapshot(
            &bed.snapshot,
            &snapshot(&[offer("cheap", prices.0), offer("fast", prices.1)]),
        );
        let written = Instant::now();
        // Each worker adopts the new generation on its own next check (at most every 250 ms):
        // wait until six answers in a row agree.
        let mut streak = 0;
        bed.wait_until(&format!("traffic on {to}"), |b| {
            streak = if b.routed() == to { streak + 1 } else { 0 };
            streak >= 6
        });
        eprintln!("moved to {to} after {:?}", written.elapsed());
        assert_eq!(ranked(&bed.explain())[0], to);
    }
    // One fetch per period per process (not per worker): polls stay near elapsed / period.
    let polls = bed.sidecar().hits().unwrap() - h0;
    let periods = started.elapsed().as_millis() as u64 / REFRESH_MS;
    assert!(polls >= 3, "{polls} polls in {periods} periods");
    assert!(
        polls <= periods + 2,
        "{polls} sidecar polls in {periods} periods: more than one fetch per period"
    );
    assert!(
        bed.kong
            .error_log()
            .matches("market snapshot updated")
            .count()
            >= 4
    );
}

/// A sidecar that answers 500, then garbage, then is gone: the last good snapshot stays in
/// use and routing goes on.
#[test]
fn broken_sidecar_keeps_the_last_good_snapshot() {
    let mut bed = MarketBed::start(
        200,
        &snapshot(&[offer("cheap", 0.1), offer("fast", 1.0)]),
        1,
    );
    bed.wait_until("a loaded snapshot", |b| {
        b.explain()["snapshot"]["offers"].as_u64() == Some(2)
    });
    for behavior in [
        json!({"status": 500}),
        json!({"body": "this is not json {"}),
    ] {
        let sc = bed.sidecar();
        sc.set_behavior(&behavior).unwrap();
        let h0 = sc.hits().unwrap();
        let deadline = Instant::now() + WAIT;
        while sc.hits().unwrap() < h0 + 2 {
            assert_eq!(bed.routed(), "cheap", "{behavior}");
            assert!(Instant::now() < deadline, "the sidecar is not polled");
            thread::sleep(Duration::from_millis(30));
        }
    }
    drop(bed.sidecar.take());
    let gone = Instant::now();
    while gone.elapsed() < Duration::from_millis(800) {
        assert_eq!(bed.routed(), "cheap", "sidecar gone");
        thread::sleep(Duration::from_millis(30));
    }
    let v = bed.explain();
    assert_eq!(v["snapshot"]["offers"], 2, "{v}");
    let log = bed.kong.error_log();
    let warnings = log.matches("market refresh failed").count();
    assert!((1..=2).contains(&warnings), "{warnings} warnings:\n{log}");
    assert!(log.contains("sidecar answered status 500"), "{log}");
}

/// `/models` and `/route` answer from the filter.
#[test]
fn explain_endpoints_answer() {
    let bed = MarketBed::start(
        300,
        &snapshot(&[offer("cheap", 0.1), offer("fast", 1.0)]),
        1,
    );
    bed.wait_until("a loaded snapshot", |b| {
        b.explain()["snapshot"]["offers"].as_u64() == Some(2)
    });
    let r = get(&bed.kong.url("/market-router/v1/models"), T).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let m = r.json().unwrap();
    assert_eq!(m["object"], "list");
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, vec![MODEL]);
    let v = bed.explain();
    assert_eq!(ranked(&v), vec!["cheap", "fast"], "{v}");
    let r = get(&bed.kong.url("/market-router/v1/route?model=nope"), T).unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    let r = get(&bed.kong.url("/market-router/v1/nothing"), T).unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "not_found");
}

// ---------------------------------------------------------------------------------------------
// TLS, and a bounded soak
// ---------------------------------------------------------------------------------------------

/// A provider behind TLS (a TLS front on a second nginx, certificate verified against its
/// CA), reached with the key from `providers[].headers`; the client's own key never leaves.
#[test]
fn tls_provider_with_the_key_from_headers() {
    const KEY: &str = "sk-kong-tls-test";
    let dir = TempDir::new("kong-tls").unwrap();
    let (cert, key) = self_signed_cert(dir.path()).unwrap();
    let mock = MockProvider::start("secure", &MockOpts::default().api_key(KEY)).unwrap();
    let tls_port = free_port();
    let _front =
        Kong::start(&KongConfig::new().server(&tls_front(tls_port, &cert, &key, mock.port())))
            .unwrap();
    let config = json!({
        "providers": [{
            "name": "secure", "cluster": format!("127.0.0.1:{tls_port}"), "authority": "localhost",
            "scheme": "https", "headers": {"authorization": format!("Bearer {KEY}")},
            "models": {MODEL: MODEL}
        }],
        "failover": {"mode": "dispatch", "attempt_timeout_ms": 3000}
    });
    let kong = Kong::start(
        &KongConfig::new()
            .trust(&cert)
            .market_router(&config.to_string()),
    )
    .unwrap();
    let r = post_json(
        &kong.url(CHAT),
        &[("authorization", "Bearer sk-client-own")],
        &chat_body(MODEL),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", show(&r), kong.error_log());
    assert_eq!(r.header("x-market-router-provider"), Some("secure"));
    let seen = mock.last_request().unwrap()["headers"]["authorization"].clone();
    assert_eq!(seen, format!("Bearer {KEY}"));
    assert!(!kong.error_log().contains(KEY), "the key reached the log");
    let r = post_json(&kong.url(CHAT), &[], &stream_body(MODEL), T).unwrap();
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    assert!(kong.crashes().is_empty(), "{:?}", kong.crashes());
}

/// 300 requests of every kind (routed, failed over, streamed, bad, explained) over two
/// workers while a provider flaps (503, cut mid-body, healthy): every one answered, no trap or
/// panic logged, no worker lost.
#[test]
fn no_trap_or_panic_over_a_bounded_loop() {
    let bed = Bed::start(
        vec![ok(), ok()],
        json!({"limits": {"max_body_bytes": 4096}}),
        2,
    );
    let workers: BTreeSet<u32> = bed.kong.worker_pids().iter().copied().collect();
    let url = bed.kong.url(CHAT);
    let mut statuses = BTreeMap::<u16, u32>::new();
    for i in 0..300u32 {
        if i % 50 == 0 {
            // Failing with an answer, cut mid-body (failed over through a bounce call), healthy.
            let flap = match (i / 50) % 3 {
                0 => json!({"status": 503}),
                1 => json!({"reset_mid": true}),
                _ => json!({}),
            };
            bed.mock("a").set_behavior(&flap).unwrap();
        }
        let r = match i % 6 {
            0 | 1 => bed.chat(),
            2 => bed.post(&[("x-session-id", "s")], &stream_body(MODEL)),
            3 => request(
                "POST",
                &url,
                &[("content-type", "application/json")],
                b"{nope",
                T,
            )
            .unwrap(),
            4 => get(&bed.kong.url("/market-router/v1/models"), T).unwrap(),
            _ => request(
                "POST",
                &url,
                &[("content-type", "application/json")],
                &big_chat(5000),
                T,
            )
            .unwrap(),
        };
        *statuses.entry(r.status).or_default() += 1;
        let want = match i % 6 {
            3 => 400,
            5 => 413,
            _ => 200,
        };
        assert_eq!(r.status, want, "request {i}: {}", show(&r));
    }
    eprintln!("statuses: {statuses:?}");
    bed.assert_no_crash();
    let now: BTreeSet<u32> = workers
        .iter()
        .copied()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert_eq!(now, workers, "a worker died");
}
