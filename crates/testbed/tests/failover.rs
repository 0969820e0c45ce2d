//! Failover and live health through a real Envoy, in every failover mode (`route`: first
//! attempt through the host's route, re-dispatch on failure; `dispatch`: every attempt by
//! `dispatch_http_call`; `envoy`: Envoy's router makes every attempt in the filter's order),
//! and through Kong's wasm host (nginx + ngx_wasm_module, `make kong-host`) in dispatch mode,
//! the one mode it runs.
//!
//! Every scenario is written once as a function taking the mode and run by a test per mode,
//! `<scenario>::<mode>` (see [`twins!`]; the `::kong` tests are the dispatch scenarios' twins
//! in Kong's host: providers addressed
//! `127.0.0.1:<port>`, keys from `providers[].headers`; Kong's host has no stats endpoint, so
//! the filter's counters are checked on Envoy only). The
//! providers have static offers and the `cheapest` strategy, so the ranking is fixed: `a`
//! (cheapest) first, then `b`, then `c`.
//!
//! Needs the filter module (`make build`), the example binaries (`cargo build --examples`) and
//! Envoy (`make envoy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

/// Client timeout of one request.
const T: Duration = Duration::from_secs(8);
/// Model every provider serves.
const MODEL: &str = "gpt-4o-mini";
/// Model only `a` and `b` serve.
const DUO: &str = "duo-model";
const ATTEMPT_TIMEOUT_MS: u64 = 800;
const DEADLINE_MS: u64 = 3000;
const COOLDOWN_MS: u64 = 1000;
/// The filter reads the host's clock in whole milliseconds: a window it ends may end up to
/// this much before the same span measured here (never more: the lower bounds below are exact).
const FILTER_CLOCK: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Route,
    Dispatch,
    /// Envoy's router makes every attempt in the filter's order (`failover.mode: envoy`).
    Envoy,
    /// Dispatch mode in Kong's wasm host.
    Kong,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Route => "route",
            Mode::Dispatch | Mode::Kong => "dispatch",
            Mode::Envoy => "envoy",
        }
    }

    /// Every attempt is a `dispatch_http_call`.
    fn dispatched(self) -> bool {
        matches!(self, Mode::Dispatch | Mode::Kong)
    }

    /// The mode a [`twins!`] test is named after.
    fn named(name: &str) -> Mode {
        match name {
            "route" => Mode::Route,
            "dispatch" => Mode::Dispatch,
            "envoy" => Mode::Envoy,
            "kong" => Mode::Kong,
            other => panic!("no mode {other}"),
        }
    }
}

/// One `#[test]` per mode running scenario `$scenario` (a function taking the mode), named
/// `<scenario>::<mode>`: `primary_503_fails_over::kong` is that scenario's Kong twin.
macro_rules! twins {
    ($scenario:ident: $($mode:ident),+ $(,)?) => {
        mod $scenario {
            $(
                #[test]
                fn $mode() {
                    super::$scenario(super::Mode::named(stringify!($mode)));
                }
            )+
        }
    };
}

/// Settings that vary between scenarios.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    max_attempts: u32,
    failure_threshold: u32,
    /// The route's `idle_timeout` (what bounds a streaming first attempt in route mode).
    route_idle_timeout: Option<Duration>,
    /// The circuit's cooldown.
    cooldown_ms: u64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            max_attempts: 3,
            failure_threshold: 3,
            route_idle_timeout: None,
            cooldown_ms: COOLDOWN_MS,
        }
    }
}

/// The filter configuration: three providers with static offers, `a` cheapest. On Kong each
/// provider is its mock's `127.0.0.1:<port>` (`ports`) and carries its key (`keys`) in
/// `headers`; on Envoy it is cluster `provider_<name>`, which injects the key itself.
fn config(mode: Mode, k: Knobs, ports: [u16; 3], keys: [Option<&str>; 3]) -> String {
    let provider = |i: usize, input: f64, output: f64, duo: bool| {
        let name = ["a", "b", "c"][i];
        let mut models = json!({ MODEL: MODEL });
        if duo {
            models[DUO] = json!(DUO);
        }
        let mut p = json!({
            "name": name,
            "cluster": format!("provider_{name}"),
            "models": models,
            "static_offer": {
                "price": {"input_per_mtok": input, "output_per_mtok": output},
                "latency_ms": {"ttft_p50": 300},
                "uptime": 0.99
            }
        });
        if mode == Mode::Kong {
            p["cluster"] = json!(format!("127.0.0.1:{}", ports[i]));
            if let Some(key) = keys[i] {
                p["headers"] = json!({"authorization": format!("Bearer {key}")});
            }
        }
        p
    };
    json!({
        "providers": [
            provider(0, 0.1, 0.2, true),
            provider(1, 0.5, 1.0, true),
            provider(2, 2.0, 4.0, false),
        ],
        "routing": {"strategy": "cheapest"},
        "failover": {
            "mode": mode.as_str(),
            "max_attempts": k.max_attempts,
            "attempt_timeout_ms": ATTEMPT_TIMEOUT_MS,
            "deadline_ms": DEADLINE_MS,
            "circuit": {"failure_threshold": k.failure_threshold, "cooldown_ms": k.cooldown_ms}
        }
    })
    .to_string()
}

/// What stands behind one provider cluster.
enum Up {
    /// A mock provider started with these options.
    Mock(MockOpts),
    /// A port nothing listens on: connections are refused.
    Dead,
}

fn ok() -> Up {
    Up::Mock(MockOpts::default())
}

fn failing(status: u16) -> Up {
    Up::Mock(MockOpts::default().status(status))
}

fn hanging() -> Up {
    Up::Mock(MockOpts {
        hang: true,
        ..MockOpts::default()
    })
}

/// Envoy or Kong's host with the filter in front of providers `a`, `b`, `c`.
struct Bed {
    mocks: [Option<MockProvider>; 3],
    gateway: Gateway,
    /// The ports of `Up::Dead` providers, held (bound, never listening) for the test's life.
    _dead: Vec<RefusingPort>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.gateway.assert_no_crash();
    }
}

impl Bed {
    fn start(mode: Mode, k: Knobs, ups: [Up; 3]) -> Bed {
        Bed::start_with(mode, k, ups, [None, None, None])
    }

    /// `keys`: the api key each cluster injects (None = no credentials).
    fn start_with(mode: Mode, k: Knobs, ups: [Up; 3], keys: [Option<&str>; 3]) -> Bed {
        let names = ["a", "b", "c"];
        let mut mocks: [Option<MockProvider>; 3] = [None, None, None];
        let mut dead = Vec::new();
        let mut cfg = EnvoyConfig::new();
        let mut ports = [0u16; 3];
        for (i, up) in ups.into_iter().enumerate() {
            let port = match up {
                Up::Mock(opts) => {
                    let m = MockProvider::start(names[i], &opts).unwrap();
                    let port = m.port();
                    mocks[i] = Some(m);
                    port
                }
                Up::Dead => {
                    let refusing = RefusingPort::bind().unwrap();
                    let port = refusing.port();
                    dead.push(refusing);
                    port
                }
            };
            ports[i] = port;
            let mut cluster = ProviderCluster::new(&format!("provider_{}", names[i]), port);
            if let Some(key) = keys[i] {
                cluster = cluster.with_key(key);
            }
            cfg = cfg.provider(cluster);
        }
        if let Some(idle) = k.route_idle_timeout {
            cfg = cfg.route_idle_timeout(idle);
        }
        let filter = config(mode, k, ports, keys);
        let gateway = match mode {
            Mode::Kong => {
                Gateway::Kong(Kong::start(&KongConfig::new().market_router(&filter)).unwrap())
            }
            Mode::Envoy => {
                Gateway::Envoy(Envoy::start(&cfg.market_router_envoy(&filter), 1).unwrap())
            }
            _ => Gateway::Envoy(Envoy::start(&cfg.market_router(&filter), 1).unwrap()),
        };
        Bed {
            mocks,
            gateway,
            _dead: dead,
        }
    }

    fn mock(&self, name: &str) -> &MockProvider {
        let i = match name {
            "a" => 0,
            "b" => 1,
            "c" => 2,
            _ => panic!("no provider {name}"),
        };
        self.mocks[i]
            .as_ref()
            .unwrap_or_else(|| panic!("provider {name} has no mock (dead port)"))
    }

    fn hits(&self, name: &str) -> u64 {
        self.mock(name).hits().unwrap()
    }

    /// Hits of the providers that have a mock, as `[a, b, c]` (None for dead ports).
    fn all_hits(&self) -> [Option<u64>; 3] {
        [0, 1, 2].map(|i| self.mocks[i].as_ref().map(|m| m.hits().unwrap()))
    }

    fn chat_with(&self, headers: &[(&str, &str)], body: &Value) -> Response {
        post_json(&self.gateway.url("/v1/chat/completions"), headers, body, T)
            .unwrap_or_else(|e| panic!("request failed: {e}\n{}", self.gateway.log_tail(30)))
    }

    fn chat(&self) -> Response {
        self.chat_with(&[], &chat_body(MODEL))
    }

    /// Polls a counter until it equals `want` (on_log may run just after the client's answer).
    /// Makes provider `name` behave as `behavior` says (see the mock provider).
    fn behave(&self, name: &str, behavior: Value) {
        self.mock(name).set_behavior(&behavior).unwrap();
    }

    /// Asserts that the filter's counter `market_router.<counter>` reaches `want` (Envoy;
    /// Kong's host has no stats endpoint).
    fn assert_counter(&self, counter: &str, want: u64) {
        if self.gateway.envoy().is_none() {
            return;
        }
        assert_eq!(
            self.wait_stat(&format!("wasmcustom.market_router.{counter}"), want),
            Some(want),
            "counter {counter}"
        );
    }

    /// Asserts the settled value of the filter's counter `market_router.<counter>` (Envoy).
    fn assert_settled(&self, counter: &str, want: u64) {
        let Some(envoy) = self.gateway.envoy() else {
            return;
        };
        assert_eq!(
            envoy
                .stat_settled(&format!("wasmcustom.market_router.{counter}"))
                .unwrap(),
            Some(want),
            "counter {counter}"
        );
    }

    fn wait_stat(&self, name: &str, want: u64) -> Option<u64> {
        let envoy = self.gateway.envoy()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = envoy.stat(name).unwrap();
            if v == Some(want) || Instant::now() >= deadline {
                return v;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

fn stream_body(model: &str) -> Value {
    let mut b = chat_body(model);
    b["stream"] = json!(true);
    b
}

/// Context for assertion messages: status, our headers, body.
fn show(r: &Response) -> String {
    format!(
        "status {} provider {:?} attempts {:?} body {}",
        r.status,
        r.header("x-market-router-provider"),
        r.header("x-market-router-attempts"),
        r.text()
    )
}

/// Status, and our headers naming `provider` and the number of attempts.
fn assert_from(r: &Response, status: u16, provider: &str, attempts: u32) {
    assert_eq!(r.status, status, "{}", show(r));
    assert_eq!(
        r.header("x-market-router-provider"),
        Some(provider),
        "{}",
        show(r)
    );
    let want_attempts = attempts.to_string();
    assert_eq!(
        r.header("x-market-router-attempts"),
        Some(want_attempts.as_str()),
        "{}",
        show(r)
    );
}

/// The client got `provider`'s JSON chat answer after `attempts` attempts.
fn assert_answer_from(r: &Response, provider: &str, attempts: u32) {
    assert_from(r, 200, provider, attempts);
    let v = r.json().unwrap();
    assert_eq!(v["object"], "chat.completion", "{}", show(r));
    assert_eq!(v["provider"], provider, "{}", show(r));
    assert_eq!(
        v["choices"][0]["message"]["content"],
        format!("Hello from {provider} (model {MODEL})"),
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
}

/// The filter's own `all_providers_failed` error: status, JSON shape, attempts header, and a
/// message naming each attempt with its outcome.
fn assert_all_failed(r: &Response, status: u16, attempts: &[(&str, &str)]) {
    assert_eq!(r.status, status, "{}", show(r));
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{:?}",
        r.headers
    );
    let n = attempts.len().to_string();
    assert_eq!(
        r.header("x-market-router-attempts"),
        Some(n.as_str()),
        "{}",
        show(r)
    );
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], "all_providers_failed", "{}", show(r));
    assert_eq!(v["error"]["type"], "upstream_error", "{}", show(r));
    let msg = v["error"]["message"].as_str().unwrap();
    let listed: Vec<String> = attempts.iter().map(|(p, o)| format!("{p}: {o}")).collect();
    let mut want = format!(
        "all {} attempt(s) for model `{MODEL}` failed: {}",
        attempts.len(),
        listed.join("; ")
    );
    // When the last attempt got an error answer, what its provider said follows.
    if let Some((p, o)) = attempts.last().filter(|(_, o)| o.starts_with("status ")) {
        let status: u16 = o["status ".len()..].parse().unwrap();
        want.push_str(&format!(
            "; {p} answered: {p}: simulated {status} {}",
            common::http::reason(status)
        ));
    }
    assert_eq!(msg, want);
}

/// Envoy mode, every attempt failed with a provider's answer: the client gets the last
/// provider's own answer (status, body, `Retry-After`), with our headers counting the attempts.
fn assert_last_providers_answer(r: &Response, status: u16, provider: &str, attempts: u32) {
    assert_from(r, status, provider, attempts);
    let v = r.json().unwrap();
    assert_eq!(
        v["error"]["message"],
        format!(
            "{provider}: simulated {status} {}",
            common::http::reason(status)
        ),
        "{}",
        show(r)
    );
}

/// Polls until `cond` holds or `within` passes; returns whether it held.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(30));
    }
}

/// The first answer from `a` with when it came back (since `since`): `late`, the answer
/// that ended a window (with its time), or one of the requests sent after it for up to
/// `within`. Every answer must be a 200.
fn first_from_a(
    bed: &Bed,
    since: Instant,
    within: Duration,
    late: (Duration, Response),
) -> Option<(Duration, Response)> {
    let mut next = Some(late);
    let mut back = None;
    eventually(within, || {
        let (at, r) = next.take().unwrap_or_else(|| {
            let r = bed.chat();
            (since.elapsed(), r)
        });
        assert_eq!(r.status, 200, "{}", show(&r));
        let from_a = r.header("x-market-router-provider") == Some("a");
        if from_a {
            back = Some((at, r));
        }
        from_a
    });
    back
}

// ---------------------------------------------------------------------------------------------
// 1-6: one failure of the primary, answered by the fallback
// ---------------------------------------------------------------------------------------------

fn primary_503_fails_over(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [failing(503), ok(), ok()]);
    let r = bed.chat();
    assert_answer_from(&r, "b", 2);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
    bed.assert_counter("recovered_by_failover", 1);
    bed.assert_settled("provider.a.failover", 1);
}

twins!(primary_503_fails_over: route, dispatch, kong, envoy);

fn primary_429_retry_after_keeps_it_out(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [ok(), ok(), ok()]);
    bed.behave("a", json!({"status": 429, "retry_after": 3}));
    let sent = Instant::now();
    let r = bed.chat();
    assert_answer_from(&r, "b", 2);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);

    // `a` is healthy again, but asked for 3 s (room for a loaded machine to answer a few
    // requests): every request within the window skips it. The filter starts the window when
    // the 429 comes back, after `sent`: a request answered before `sent` + 3 s was surely
    // handled inside it, however loaded the machine; one answered later may have been handled
    // after it, so it only has to succeed.
    bed.behave("a", json!({}));
    let window = Duration::from_millis(3000);
    let mut inside = 0;
    let late = loop {
        let r = bed.chat();
        let at = sent.elapsed();
        if at >= window {
            break (at, r);
        }
        assert_answer_from(&r, "b", 1);
        inside += 1;
        thread::sleep(Duration::from_millis(100));
    };
    // A count, not a rate: a loaded machine may fit only a few requests in the window.
    assert!(inside >= 2, "only {inside} requests inside the window");

    // After the window `a` is the primary again (bounded wait). Whenever it is used, its
    // answer comes back after the window: handled at or after its end, answered later still.
    let back = first_from_a(&bed, sent, Duration::from_secs(5), late);
    let (at, r) = back.expect("a never came back after its Retry-After window");
    assert!(
        at >= window - FILTER_CLOCK,
        "a answered {} ms after the 429 that asked for 3 s was sent",
        at.as_millis()
    );
    assert_answer_from(&r, "a", 1);
    assert_eq!(
        bed.hits("a"),
        2,
        "a was tried inside its Retry-After window"
    );
    assert_eq!(bed.hits("c"), 0);
}

twins!(primary_429_retry_after_keeps_it_out: route, dispatch, kong, envoy);

fn primary_refused_fails_over(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [Up::Dead, ok(), ok()]);
    let r = bed.chat();
    assert_answer_from(&r, "b", 2);
    assert_eq!(bed.all_hits(), [None, Some(1), Some(0)]);
    bed.assert_settled("provider.a.failure", 1);
}

twins!(primary_refused_fails_over: route, dispatch, kong, envoy);

fn primary_hang_times_out_and_fails_over(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [hanging(), ok(), ok()]);
    let start = Instant::now();
    let r = bed.chat();
    let elapsed = start.elapsed();
    assert_answer_from(&r, "b", 2);
    let timeout = Duration::from_millis(ATTEMPT_TIMEOUT_MS);
    assert!(
        elapsed >= timeout - Duration::from_millis(50),
        "answered after {} ms: a was not waited for",
        elapsed.as_millis()
    );
    // Upper bound with room for a loaded machine: far below the route's 120 s timeout and
    // the client's 8 s, so it is the attempt timeout that cut `a`.
    assert!(
        elapsed < timeout + Duration::from_secs(4),
        "answered after {} ms, attempt timeout {} ms",
        elapsed.as_millis(),
        ATTEMPT_TIMEOUT_MS
    );
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
}

twins!(primary_hang_times_out_and_fails_over: route, dispatch, kong, envoy);

fn primary_reset_mid_response_fails_over(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [ok(), ok(), ok()]);
    bed.behave("a", json!({"reset_mid": true}));
    let r = bed.chat();
    assert_answer_from(&r, "b", 2);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
    // The cut answer counts against `a`.
    bed.assert_counter("provider.a.failure", 1);
}

/// Route mode limit: once the provider's 2xx headers are in Envoy's encoder chain, a cut body
/// makes Envoy answer 502 straight to the client, past the filter, so there is nothing to
/// replace. The filter counts the cut against the provider (health and failure counter), so
/// a provider that keeps cutting answers trips its circuit; dispatch mode fails over.
#[test]
fn primary_reset_mid_response_is_counted_route() {
    let bed = Bed::start(Mode::Route, Knobs::default(), [ok(), ok(), ok()]);
    bed.behave("a", json!({"reset_mid": true}));
    let r = bed.chat();
    assert_eq!(r.status, 502);
    assert_eq!(bed.all_hits(), [Some(1), Some(0), Some(0)]);
    bed.assert_counter("provider.a.failure", 1);
}

twins!(primary_reset_mid_response_fails_over: dispatch, kong, envoy);

fn primary_malformed_200_fails_over(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [ok(), ok(), ok()]);
    bed.behave("a", json!({"malformed": true}));
    let r = bed.chat();
    assert_answer_from(&r, "b", 2);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
}

twins!(primary_malformed_200_fails_over: route, dispatch, kong, envoy);

// ---------------------------------------------------------------------------------------------
// 7: every provider down
// ---------------------------------------------------------------------------------------------

fn all_503_is_a_503_listing_each_attempt(mode: Mode) {
    let bed = Bed::start(
        mode,
        Knobs::default(),
        [failing(503), failing(503), failing(503)],
    );
    let r = bed.chat();
    if mode == Mode::Envoy {
        assert_last_providers_answer(&r, 503, "c", 3);
    } else {
        assert_all_failed(
            &r,
            503,
            &[
                ("a", "status 503"),
                ("b", "status 503"),
                ("c", "status 503"),
            ],
        );
    }
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(1)]);
    bed.assert_counter("all_failed", 1);
}

twins!(all_503_is_a_503_listing_each_attempt: route, dispatch, kong, envoy);

fn all_refused_is_a_503(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [Up::Dead, Up::Dead, Up::Dead]);
    let r = bed.chat();
    assert_all_failed(
        &r,
        503,
        &[
            ("a", "connect failure"),
            ("b", "connect failure"),
            ("c", "connect failure"),
        ],
    );
}

twins!(all_refused_is_a_503: route, dispatch, kong, envoy);

fn all_hanging_is_a_504_within_the_deadline(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [hanging(), hanging(), hanging()]);
    let start = Instant::now();
    let r = bed.chat();
    let elapsed = start.elapsed();
    assert_all_failed(
        &r,
        504,
        &[("a", "timeout"), ("b", "timeout"), ("c", "timeout")],
    );
    // Three attempts of 800 ms fit in the 3 s deadline.
    assert!(
        elapsed >= Duration::from_millis(3 * ATTEMPT_TIMEOUT_MS - 100),
        "gave up after {} ms",
        elapsed.as_millis()
    );
    // With room for a loaded machine; the client waits 8 s.
    assert!(
        elapsed < Duration::from_millis(DEADLINE_MS + 3000),
        "answered after {} ms, deadline {DEADLINE_MS} ms",
        elapsed.as_millis()
    );
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(1)]);
}

twins!(all_hanging_is_a_504_within_the_deadline: route, dispatch, kong, envoy);

// ---------------------------------------------------------------------------------------------
// 8: streaming request whose primary is down
// ---------------------------------------------------------------------------------------------

fn assert_sse_from_b(bed: &Bed, r: &Response) {
    assert_eq!(r.status, 200, "{}", show(r));
    assert_eq!(
        r.header("x-market-router-provider"),
        Some("b"),
        "{}",
        show(r)
    );
    assert_eq!(
        r.header("x-market-router-attempts"),
        Some("2"),
        "{}",
        show(r)
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        r.headers
    );
    let data = r.sse_data();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    assert!(
        r.text().trim_end().ends_with("data: [DONE]"),
        "{}",
        r.text()
    );
    assert_eq!(r.sse_content(), format!("Hello from b (model {MODEL})"));
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["provider"], "b");
    let last = bed.mock("b").last_request().unwrap();
    assert_eq!(last["stream"], true, "b got the streaming request");
}

fn stream_with_primary_down_gets_complete_sse(mode: Mode) {
    // Primary answers 503.
    let bed = Bed::start(mode, Knobs::default(), [failing(503), ok(), ok()]);
    let r = bed.chat_with(&[], &stream_body(MODEL));
    assert_sse_from_b(&bed, &r);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
    drop(bed);

    // Primary refuses connections.
    let bed = Bed::start(mode, Knobs::default(), [Up::Dead, ok(), ok()]);
    let r = bed.chat_with(&[], &stream_body(MODEL));
    assert_sse_from_b(&bed, &r);
    assert_eq!(bed.all_hits(), [None, Some(1), Some(0)]);
}

/// A streaming first attempt in route mode has no per-attempt timeout (a long answer may
/// outlast it); the route's `idle_timeout` bounds a provider that never sends a byte, and the
/// request fails over.
#[test]
fn stream_with_hanging_primary_fails_over_at_the_route_idle_timeout_route() {
    let knobs = Knobs {
        route_idle_timeout: Some(Duration::from_millis(1000)),
        ..Knobs::default()
    };
    let bed = Bed::start(Mode::Route, knobs, [hanging(), ok(), ok()]);
    let start = Instant::now();
    let r = bed.chat_with(&[], &stream_body(MODEL));
    let elapsed = start.elapsed();
    assert_sse_from_b(&bed, &r);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
    assert!(
        // Lower bound exact, upper with room for a loaded machine (the client waits 8 s).
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_millis(6000),
        "answered after {} ms with a 1000 ms idle timeout",
        elapsed.as_millis()
    );
}

twins!(stream_with_primary_down_gets_complete_sse: route, dispatch, kong, envoy);

// ---------------------------------------------------------------------------------------------
// 9: client errors are not retried
// ---------------------------------------------------------------------------------------------

fn client_error_is_not_retried(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [failing(400), ok(), ok()]);
    let r = bed.chat();
    assert_eq!(r.status, 400, "{}", show(&r));
    assert_eq!(
        r.header("x-market-router-provider"),
        Some("a"),
        "{}",
        show(&r)
    );
    assert_eq!(
        r.header("x-market-router-attempts"),
        Some("1"),
        "{}",
        show(&r)
    );
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], "simulated_error", "a's own error body");
    assert_eq!(v["error"]["message"], "a: simulated 400 Bad Request");
    assert_eq!(bed.all_hits(), [Some(1), Some(0), Some(0)]);
    // A client error says nothing about the provider.
    bed.assert_settled("provider.a.failure", 0);
}

twins!(client_error_is_not_retried: route, dispatch, kong, envoy);

// ---------------------------------------------------------------------------------------------
// 10: circuit breaker
// ---------------------------------------------------------------------------------------------

fn circuit_opens_then_recovers(mode: Mode) {
    // Long enough that a loaded machine answers a request or two inside it.
    const COOLDOWN_MS: u64 = 2500;
    let knobs = Knobs {
        failure_threshold: 2,
        cooldown_ms: COOLDOWN_MS,
        ..Knobs::default()
    };
    let bed = Bed::start(mode, knobs, [failing(503), ok(), ok()]);
    assert_answer_from(&bed.chat(), "b", 2);
    let opened = Instant::now();
    assert_answer_from(&bed.chat(), "b", 2);
    assert_eq!(bed.hits("a"), 2);
    bed.assert_counter("provider.a.circuit_open", 1);

    // Open: new requests skip `a` entirely, even once it is healthy again. The circuit opened
    // while the second request was handled, after `opened`: a request answered before
    // `opened` + the cooldown was surely handled while it was open, however loaded the machine.
    bed.behave("a", json!({}));
    let cooldown = Duration::from_millis(COOLDOWN_MS);
    let mut skipped = 0;
    let late = loop {
        let r = bed.chat();
        let at = opened.elapsed();
        if at >= cooldown {
            break (at, r);
        }
        assert_answer_from(&r, "b", 1);
        skipped += 1;
        thread::sleep(Duration::from_millis(50));
    };
    assert!(skipped >= 1, "no request while open");

    // After the cooldown `a` is probed and, healthy, used again: its answer comes back after
    // the cooldown (handled at or after its end, answered later still).
    let back = first_from_a(
        &bed,
        opened,
        Duration::from_millis(COOLDOWN_MS + 4000),
        late,
    );
    let (at, r) = back.expect("a was never probed after the cooldown");
    assert!(
        at >= cooldown - FILTER_CLOCK,
        "a answered {} ms after its circuit opened (cooldown {COOLDOWN_MS} ms)",
        at.as_millis()
    );
    assert_answer_from(&r, "a", 1);
    assert_eq!(bed.hits("a"), 3);
    // Closed again: the next request goes to `a` as usual.
    assert_answer_from(&bed.chat(), "a", 1);
    assert_eq!(bed.hits("a"), 4);
    assert_eq!(bed.hits("c"), 0);
}

twins!(circuit_opens_then_recovers: route, dispatch, kong, envoy);

// ---------------------------------------------------------------------------------------------
// 11: credentials stay with the host; end-to-end headers follow the request
// ---------------------------------------------------------------------------------------------

const KEY_A: &str = "sk-provider-a-0001";
const KEY_B: &str = "sk-provider-b-0002";
const KEY_C: &str = "sk-provider-c-0003";

/// Whether `last_request` carried `authorization: Bearer <key>` (never prints the value).
fn carried_key(last: &Value, key: &str) -> bool {
    last["headers"]["authorization"].as_str() == Some(format!("Bearer {key}").as_str())
}

fn auth_and_headers_follow_the_fallback(mode: Mode) {
    let keyed = |k: &str| Up::Mock(MockOpts::default().api_key(k));
    let bed = Bed::start_with(
        mode,
        Knobs::default(),
        [keyed(KEY_A), keyed(KEY_B), keyed(KEY_C)],
        [Some(KEY_A), Some(KEY_B), Some(KEY_C)],
    );
    bed.behave("a", json!({"status": 503}));
    let sent: [(&str, &str); 9] = [
        ("authorization", "Bearer client-key"),
        ("x-request-id", "rid-failover-11"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "vendor=opaque"),
        ("x-team", "blue"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
        ("upgrade", "h2c"),
    ];
    let r = bed.chat_with(&sent, &chat_body(MODEL));
    assert_answer_from(&r, "b", 2);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);

    // `a` got its own key (it answered 503, not 401).
    let last_a = bed.mock("a").last_request().unwrap();
    assert!(carried_key(&last_a, KEY_A), "a did not receive its own key");
    if !mode.dispatched() {
        // Envoy passes `te` on the routed attempt, so its absence at b below is the filter's
        // doing; the filter strips `proxy-authorization` from the routed attempt too, and the
        // route drops the cluster header once the router has read it.
        assert!(last_a["headers"].get("te").is_some(), "te did not reach a");
        for h in ["proxy-authorization", "x-market-router-cluster"] {
            assert!(last_a["headers"].get(h).is_none(), "{h} reached a");
        }
    }
    let stats_a = bed.mock("a").stats().unwrap();
    assert_eq!(stats_a["by_status"], json!({"503": 1}));

    // `b` answered 200 with its own key: not the client's, not a's.
    let stats_b = bed.mock("b").stats().unwrap();
    assert_eq!(stats_b["by_status"], json!({"200": 1}));
    let last = &stats_b["last_request"];
    assert!(carried_key(last, KEY_B), "b did not receive b's key");
    assert!(!carried_key(last, KEY_A), "b received a's key");
    assert!(
        last["headers"]["authorization"].as_str() != Some("Bearer client-key"),
        "b received the client's key"
    );
    let h = &last["headers"];
    assert_eq!(h["x-request-id"], "rid-failover-11");
    assert_eq!(
        h["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(h["tracestate"], "vendor=opaque");
    assert_eq!(h["x-team"], "blue");
    assert_eq!(h["content-type"], "application/json");
    // Envoy's router passes `te: trailers` on the attempts it makes itself.
    let te = (mode == Mode::Envoy).then_some("te");
    for hop in ["keep-alive", "te", "proxy-authorization", "upgrade"]
        .into_iter()
        .filter(|h| Some(*h) != te)
    {
        assert!(
            h.get(hop).is_none(),
            "hop-by-hop header {hop} reached b; b got {:?}",
            h.as_object().map(|o| o.keys().collect::<Vec<_>>())
        );
    }
    assert_eq!(last["model"], MODEL);
}

twins!(auth_and_headers_follow_the_fallback: route, dispatch, kong, envoy);

// ---------------------------------------------------------------------------------------------
// 12: attempts are bounded; a provider is never tried twice
// ---------------------------------------------------------------------------------------------

fn attempts_are_bounded(mode: Mode) {
    // max_attempts 2: `c` is healthy but never reached.
    let knobs = Knobs {
        max_attempts: 2,
        ..Knobs::default()
    };
    let bed = Bed::start(mode, knobs, [failing(503), failing(502), ok()]);
    let r = bed.chat();
    if mode == Mode::Envoy {
        assert_last_providers_answer(&r, 502, "b", 2);
    } else {
        assert_all_failed(&r, 502, &[("a", "status 503"), ("b", "status 502")]);
    }
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
    drop(bed);

    // max_attempts 3 but only `a` and `b` serve the model: two attempts, one each.
    let bed = Bed::start(mode, Knobs::default(), [failing(503), failing(503), ok()]);
    let r = bed.chat_with(&[], &chat_body(DUO));
    assert_eq!(r.status, 503, "{}", show(&r));
    assert_eq!(
        r.header("x-market-router-attempts"),
        Some("2"),
        "{}",
        show(&r)
    );
    if mode == Mode::Envoy {
        assert_last_providers_answer(&r, 503, "b", 2);
        assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
        return;
    }
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], "all_providers_failed");
    assert_eq!(
        v["error"]["message"],
        format!("all 2 attempt(s) for model `{DUO}` failed: a: status 503; b: status 503; b answered: b: simulated 503 Service Unavailable")
    );
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
}

twins!(attempts_are_bounded: route, dispatch, kong, envoy);

// ---------------------------------------------------------------------------------------------
// Streaming limit: a stream that breaks after bytes reached the client
// ---------------------------------------------------------------------------------------------

/// Sends a request on a raw connection and reads until the peer closes (or `timeout`):
/// a broken chunked body is returned as received, not as an error.
fn raw_exchange(port: u16, path: &str, body: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the raw response: {e}; got so far: {}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}

#[test]
fn stream_broken_after_first_bytes_is_passed_through_route() {
    let bed = Bed::start(Mode::Route, Knobs::default(), [ok(), ok(), ok()]);
    bed.behave("a", json!({"reset_mid": true}));
    let body = stream_body(MODEL).to_string();
    let raw = raw_exchange(
        bed.gateway.port(),
        "/v1/chat/completions",
        body.as_bytes(),
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a response head");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{text}");
    assert!(head.contains("x-market-router-provider: a\r\n"), "{text}");
    assert!(head.contains("x-market-router-attempts: 1\r\n"), "{text}");
    assert!(head.contains("transfer-encoding: chunked"), "{text}");
    // The first events of a's stream arrived, then the stream broke: no [DONE], no final
    // zero-length chunk, and nothing from b.
    assert!(rest.contains("\"provider\":\"a\""), "{text}");
    assert!(!rest.contains("[DONE]"), "{text}");
    assert!(!rest.ends_with("0\r\n\r\n"), "{text}");
    assert!(!rest.contains("\"provider\":\"b\""), "{text}");
    assert_eq!(bed.all_hits(), [Some(1), Some(0), Some(0)]);
    bed.assert_counter("stream_failed_midway", 1);
    bed.assert_counter("provider.a.failure", 1);
}

/// In dispatch mode a stream is buffered whole, so the same break is an ordinary reset and
/// the request fails over.
fn stream_broken_after_first_bytes_fails_over(mode: Mode) {
    let bed = Bed::start(mode, Knobs::default(), [ok(), ok(), ok()]);
    bed.behave("a", json!({"reset_mid": true}));
    let r = bed.chat_with(&[], &stream_body(MODEL));
    assert_sse_from_b(&bed, &r);
    assert_eq!(bed.all_hits(), [Some(1), Some(1), Some(0)]);
    bed.assert_settled("stream_failed_midway", 0);
}

twins!(stream_broken_after_first_bytes_fails_over: dispatch, kong);
