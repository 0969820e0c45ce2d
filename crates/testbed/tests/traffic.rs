//! Traffic shaped like real clients' and real providers', through a real Envoy, in both
//! failover modes: clients that accept compressed answers, providers that compress (when
//! asked, and when not), answers bigger than Envoy's buffer, chunked answers without a length,
//! what the client hears when every attempt fails, and routing headers a client must not be
//! able to use to pick a cluster. The `_kong` twins run the dispatch scenarios in Kong's wasm
//! host, nginx's gzip filter (gzip only) as the compressor in front.
//!
//! Needs the filter module (`make build`), the example binaries (`cargo build --examples`) and
//! Envoy (`make envoy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::encoding;
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const MODEL: &str = "gpt-4o-mini";
/// What httpx (and so the OpenAI Python SDK) sends by default.
const HTTPX_ACCEPT: &str = "gzip, deflate";
/// An embeddings answer bigger than Envoy's default 1 MiB buffer.
const BIG: u64 = 1_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Route,
    Dispatch,
    /// Dispatch mode in Kong's wasm host (nginx's gzip filter as the compressor: gzip only).
    Kong,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Route => "route",
            Mode::Dispatch | Mode::Kong => "dispatch",
        }
    }
}

/// `ports`: the mocks' ports, the providers' addresses on Kong.
fn config(mode: Mode, max_attempts: u32, ports: &[u16]) -> String {
    let provider = |name: &str, input: f64| {
        let i = ["a", "b", "c"].iter().position(|n| *n == name).unwrap_or(0);
        let cluster = match mode {
            Mode::Kong => format!("127.0.0.1:{}", ports[i]),
            _ => format!("provider_{name}"),
        };
        json!({
            "name": name,
            "cluster": cluster,
            "models": {MODEL: MODEL, "text-embedding-3-small": "text-embedding-3-small"},
            "static_offer": {
                "price": {"input_per_mtok": input, "output_per_mtok": input * 2.0},
                "latency_ms": {"ttft_p50": 300},
                "uptime": 0.99
            }
        })
    };
    json!({
        "providers": [provider("a", 0.1), provider("b", 0.5), provider("c", 2.0)],
        "routing": {"strategy": "cheapest"},
        "failover": {"mode": mode.as_str(), "max_attempts": max_attempts,
                     "attempt_timeout_ms": 20000, "deadline_ms": 50000}
    })
    .to_string()
}

/// Counts every request that reaches it, whatever the path: stands in for the market
/// service's cluster.
struct Counter {
    server: Server,
    hits: Arc<AtomicU64>,
}

impl Counter {
    fn start() -> Counter {
        let hits = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hits);
        let server = Server::spawn(
            "127.0.0.1:0",
            handler(move |_req: &Request| {
                h.fetch_add(1, Ordering::SeqCst);
                Reply::json(200, &json!({"reached": "market_sidecar"}))
            }),
        )
        .unwrap();
        Counter { server, hits }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

struct Bed {
    mocks: Vec<MockProvider>,
    sidecar: Counter,
    gateway: Gateway,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.gateway.assert_no_crash();
    }
}

impl Bed {
    /// Mocks a, b, c (a cheapest) and Envoy with the filter; `compression`: Envoy's
    /// compressors and decompressors around it, as the shipped configurations have them.
    fn start(mode: Mode, compression: bool, opts: [MockOpts; 3]) -> Bed {
        Bed::start_with(mode, compression, opts, 3)
    }

    fn start_with(mode: Mode, compression: bool, opts: [MockOpts; 3], attempts: u32) -> Bed {
        let mocks: Vec<MockProvider> = ["a", "b", "c"]
            .iter()
            .zip(opts.iter())
            .map(|(n, o)| MockProvider::start(n, o).unwrap())
            .collect();
        let sidecar = Counter::start();
        let ports: Vec<u16> = mocks.iter().map(|m| m.port()).collect();
        if mode == Mode::Kong {
            let kong = Kong::start(
                &KongConfig::new()
                    .market_router(&config(mode, attempts, &ports))
                    .compression(compression),
            )
            .unwrap();
            return Bed {
                mocks,
                sidecar,
                gateway: Gateway::Kong(kong),
            };
        }
        let mut cfg = EnvoyConfig::new()
            .market_router(&config(mode, attempts, &ports))
            .compression(compression)
            .sidecar("market_sidecar", sidecar.server.port());
        for m in &mocks {
            cfg = cfg.provider(ProviderCluster::new(
                &format!("provider_{}", m.name()),
                m.port(),
            ));
        }
        let envoy = Envoy::start(&cfg, 1).unwrap();
        Bed {
            mocks,
            sidecar,
            gateway: Gateway::Envoy(envoy),
        }
    }

    fn mock(&self, name: &str) -> &MockProvider {
        self.mocks.iter().find(|m| m.name() == name).unwrap()
    }

    fn hits(&self) -> Vec<u64> {
        self.mocks.iter().map(|m| m.hits().unwrap()).collect()
    }

    /// The filter's counter `market_router.<name>`, settled; `None` on Kong (no stats
    /// endpoint), where the counter checks are left out.
    fn counter(&self, name: &str) -> Option<u64> {
        let full = format!("wasmcustom.market_router.{name}");
        let envoy = self.gateway.envoy()?;
        Some(envoy.counter(&full).unwrap_or_else(|e| panic!("{e}")))
    }

    /// Asserts counter `name` is `want` (Envoy only, see [`Bed::counter`]).
    fn check_counter(&self, name: &str, want: u64) {
        if let Some(v) = self.counter(name) {
            assert_eq!(v, want, "counter {name}");
        }
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
        post_json(&self.gateway.url(path), headers, body, T)
            .unwrap_or_else(|e| panic!("{e}\nhost log:\n{}", self.gateway.log_tail(30)))
    }
}

fn chat() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]})
}

fn embeddings() -> Value {
    json!({"model": "text-embedding-3-small", "input": "hello"})
}

fn show(r: &Response) -> String {
    format!(
        "{} {:?} {}",
        r.status,
        r.headers,
        String::from_utf8_lossy(&r.body[..r.body.len().min(400)])
    )
}

/// The body as the client decodes it, by its content-encoding.
fn decoded(r: &Response) -> Vec<u8> {
    encoding::decode(r.header("content-encoding").unwrap_or(""), &r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", show(r)))
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&decoded(r)).unwrap_or_else(|e| panic!("{e}: {}", show(r)))
}

// ---------------------------------------------------------------------------------------------
// Compressed answers
// ---------------------------------------------------------------------------------------------

/// A client that accepts gzip (httpx's default), providers that compress when asked: the
/// first provider serves, nobody is charged a failure, the answer reaches the client in an
/// encoding it accepted, and its cost comes from its usage.
fn compressing_providers_serve_gzip_clients(mode: Mode) {
    let bed = Bed::start(mode, true, Default::default());
    // Envoy's compressors do gzip, br and zstd; nginx's gzip filter (Kong) gzip only, so a
    // client asking for br or zstd alone gets plain bytes there (which it accepts too).
    let (br, zstd, br_over_gzip) = match mode {
        Mode::Kong => (None, None, Some("gzip")),
        _ => (Some("br"), Some("zstd"), Some("br")),
    };
    for (accept, want) in [
        (HTTPX_ACCEPT, Some("gzip")),
        ("br", br),
        ("zstd", zstd),
        ("gzip;q=0.5, br;q=1.0", br_over_gzip),
        ("identity", None),
    ] {
        let r = bed.post(
            "/v1/chat/completions",
            &[("accept-encoding", accept)],
            &chat(),
        );
        assert_eq!(r.status, 200, "{accept}: {}", show(&r));
        assert_eq!(r.header("x-market-router-provider"), Some("a"), "{accept}");
        assert_eq!(r.header("x-market-router-attempts"), Some("1"), "{accept}");
        assert_eq!(r.header("content-encoding"), want, "{accept}: {}", show(&r));
        let v = json_of(&r);
        assert_eq!(v["object"], "chat.completion", "{accept}");
        assert!(r.header("x-market-router-cost-usd").is_some(), "{accept}");
        assert_eq!(
            r.header("x-market-router-cost-estimated"),
            None,
            "{accept}: priced from usage"
        );
        // The provider was asked for plain bytes, and sent them.
        let last = bed.mock("a").last_request().unwrap();
        assert_eq!(last["headers"]["accept-encoding"], "identity", "{accept}");
    }
    assert_eq!(bed.hits(), [5, 0, 0]);
    let stats = bed.mock("a").stats().unwrap();
    assert_eq!(stats["by_encoding"], json!({"identity": 5}), "{stats}");
    bed.check_counter("provider.a.failure", 0);
    bed.check_counter("all_failed", 0);

    // A local reply (here an unknown model's 404) reaches the client compressed too.
    let r = bed.post(
        "/v1/chat/completions",
        &[("accept-encoding", HTTPX_ACCEPT)],
        &json!({"model": "no-such-model", "messages": []}),
    );
    assert_eq!(r.status, 404, "{}", show(&r));
    assert_eq!(r.header("content-encoding"), Some("gzip"), "{}", show(&r));
    assert_eq!(json_of(&r)["error"]["code"], "model_not_found");
}

/// A fallback's answer reaches a gzip client compressed too (in route mode it takes the held
/// routed answer's place instead of being sent as a local reply past the compressor).
fn fallback_answers_reach_the_client_compressed(mode: Mode) {
    let bed = Bed::start(
        mode,
        true,
        [failing(503, None), MockOpts::default(), MockOpts::default()],
    );
    for _ in 0..2 {
        let r = bed.post(
            "/v1/chat/completions",
            &[("accept-encoding", HTTPX_ACCEPT)],
            &chat(),
        );
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(
            r.header("x-market-router-provider"),
            Some("b"),
            "{}",
            show(&r)
        );
        assert_eq!(r.header("x-market-router-attempts"), Some("2"));
        assert_eq!(r.header("content-encoding"), Some("gzip"), "{}", show(&r));
        assert_eq!(r.header("x-mock-provider"), Some("b"), "{}", show(&r));
        assert_eq!(json_of(&r)["provider"], "b");
    }
    assert_eq!(bed.hits(), [2, 2, 0]);
}

#[test]
fn fallback_answers_reach_the_client_compressed_route() {
    fallback_answers_reach_the_client_compressed(Mode::Route);
}

#[test]
fn fallback_answers_reach_the_client_compressed_dispatch() {
    fallback_answers_reach_the_client_compressed(Mode::Dispatch);
}

#[test]
fn fallback_answers_reach_the_client_compressed_kong() {
    fallback_answers_reach_the_client_compressed(Mode::Kong);
}

#[test]
fn compressing_providers_serve_gzip_clients_route() {
    compressing_providers_serve_gzip_clients(Mode::Route);
}

#[test]
fn compressing_providers_serve_gzip_clients_dispatch() {
    compressing_providers_serve_gzip_clients(Mode::Dispatch);
}

#[test]
fn compressing_providers_serve_gzip_clients_kong() {
    compressing_providers_serve_gzip_clients(Mode::Kong);
}

/// Without Envoy's compressor configured, a gzip-accepting client still gets its answer (plain,
/// which it accepts too) from the first provider.
fn gzip_clients_are_served_without_a_compressor(mode: Mode) {
    let bed = Bed::start(mode, false, Default::default());
    for (path, body) in [
        ("/v1/chat/completions", chat()),
        ("/v1/embeddings", embeddings()),
    ] {
        let r = bed.post(path, &[("accept-encoding", HTTPX_ACCEPT)], &body);
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(r.header("x-market-router-provider"), Some("a"));
        assert_eq!(r.header("x-market-router-attempts"), Some("1"));
        json_of(&r);
    }
    // Streaming with usage: the usage chunk is read, so it must arrive plain too.
    let mut body = chat();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = bed.post(
        "/v1/chat/completions",
        &[("accept-encoding", HTTPX_ACCEPT)],
        &body,
    );
    assert_eq!(r.status, 200, "{}", show(&r));
    let text = String::from_utf8(decoded(&r)).unwrap();
    assert!(text.contains("\"usage\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(bed.hits(), [3, 0, 0]);
    bed.check_counter("provider.a.failure", 0);
}

#[test]
fn gzip_clients_are_served_without_a_compressor_route() {
    gzip_clients_are_served_without_a_compressor(Mode::Route);
}

#[test]
fn gzip_clients_are_served_without_a_compressor_dispatch() {
    gzip_clients_are_served_without_a_compressor(Mode::Dispatch);
}

#[test]
fn gzip_clients_are_served_without_a_compressor_kong() {
    gzip_clients_are_served_without_a_compressor(Mode::Kong);
}

/// A provider that compresses whatever it is asked (gzip, br or zstd) serves, is not charged a
/// failure, and the client can read what it gets: its answer is not read (it flows unheld in
/// route mode, and is passed on as it came in dispatch mode), so it is priced from the
/// estimate. Its body reaches the client byte for byte: framed by its length (or chunked),
/// nothing added (Kong's host adds a newline to every local reply, which the filter cuts off
/// again for these: a gzip, br or zstd decoder refuses a trailing byte).
fn providers_that_always_compress_are_not_charged(mode: Mode, compression: bool) {
    let always = |c: &str| MockOpts {
        compress_always: Some(c.to_string()),
        ..MockOpts::default()
    };
    let bed = Bed::start(
        mode,
        compression,
        [always("gzip"), always("br"), always("zstd")],
    );
    for coding in ["gzip", "br", "zstd"] {
        bed.mock("a")
            .set_behavior(&json!({ "compress_always": coding }))
            .unwrap();
        for (path, body) in [
            ("/v1/chat/completions", chat()),
            ("/v1/embeddings", embeddings()),
        ] {
            let what = format!("{coding} {path}");
            let r = bed.post(path, &[("accept-encoding", "gzip, br, zstd")], &body);
            assert_eq!(r.status, 200, "{what}: {}", show(&r));
            assert_eq!(
                r.header("x-market-router-provider"),
                Some("a"),
                "{what}: {}",
                show(&r)
            );
            assert_eq!(r.header("x-market-router-attempts"), Some("1"), "{what}");
            assert_eq!(
                r.header("content-encoding"),
                Some(coding),
                "{what}: as it came"
            );
            if let Some(len) = r.header("content-length") {
                assert_eq!(len, r.body.len().to_string(), "{what}: {}", show(&r));
            }
            let v = json_of(&r);
            assert!(v["usage"].is_object(), "{what}: {v}");
            assert_eq!(
                r.header("x-market-router-cost-estimated"),
                Some("true"),
                "{what}"
            );
        }
    }
    assert_eq!(bed.hits(), [6, 0, 0]);
    bed.check_counter("provider.a.failure", 0);
    bed.check_counter("provider.a.success", 6);
}

#[test]
fn providers_that_always_compress_are_not_charged_route() {
    providers_that_always_compress_are_not_charged(Mode::Route, true);
}

#[test]
fn providers_that_always_compress_are_not_charged_dispatch() {
    providers_that_always_compress_are_not_charged(Mode::Dispatch, true);
}

#[test]
fn providers_that_always_compress_are_not_charged_kong() {
    providers_that_always_compress_are_not_charged(Mode::Kong, true);
}

// ---------------------------------------------------------------------------------------------
// Answers bigger than the host's buffer
// ---------------------------------------------------------------------------------------------

/// A 1.4 MB embeddings answer (with a length, and chunked without one) reaches the client
/// whole, from the first provider, priced; a gzip client gets it compressed.
fn big_answers_reach_the_client_whole(mode: Mode) {
    let big = |chunked: bool| MockOpts {
        answer_bytes: BIG,
        chunked,
        ..MockOpts::default()
    };
    for chunked in [false, true] {
        let bed = Bed::start(mode, true, [big(chunked), big(chunked), big(chunked)]);
        for accept in ["identity", HTTPX_ACCEPT] {
            let what = format!("chunked {chunked}, accept {accept}");
            let r = bed.post(
                "/v1/embeddings",
                &[("accept-encoding", accept)],
                &embeddings(),
            );
            assert_eq!(r.status, 200, "{what}: {}", show(&r));
            assert_eq!(r.header("x-market-router-provider"), Some("a"), "{what}");
            assert_eq!(r.header("x-market-router-attempts"), Some("1"), "{what}");
            let body = decoded(&r);
            assert!(body.len() as u64 >= BIG, "{what}: {} bytes", body.len());
            let v: Value = serde_json::from_slice(&body).unwrap();
            let dims = v["data"][0]["embedding"].as_array().unwrap().len();
            assert!(dims as u64 >= BIG / 7, "{what}: {dims}");
            assert!(r.header("x-market-router-cost-usd").is_some(), "{what}");
        }
        // Small answers on the same Envoy are still held and checked.
        bed.mock("a")
            .set_behavior(&json!({ "chunked": chunked }))
            .unwrap();
        let r = bed.post("/v1/chat/completions", &[], &chat());
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(r.header("x-market-router-cost-estimated"), None);
        assert_eq!(bed.hits(), [3, 0, 0], "chunked {chunked}");
        bed.check_counter("provider.a.failure", 0);
        // The unheld answers were priced from the usage at their end: tokens were counted.
        assert!(bed.counter("provider.a.tokens_in").is_none_or(|n| n > 0));
    }
}

#[test]
fn big_answers_reach_the_client_whole_route() {
    big_answers_reach_the_client_whole(Mode::Route);
}

#[test]
fn big_answers_reach_the_client_whole_dispatch() {
    big_answers_reach_the_client_whole(Mode::Dispatch);
}

#[test]
fn big_answers_reach_the_client_whole_kong() {
    big_answers_reach_the_client_whole(Mode::Kong);
}

// ---------------------------------------------------------------------------------------------
// Every attempt failed: the client hears what the last provider said
// ---------------------------------------------------------------------------------------------

fn failing(status: u16, retry_after: Option<u64>) -> MockOpts {
    MockOpts {
        status: Some(status),
        retry_after,
        ..MockOpts::default()
    }
}

fn all_failed_keeps_the_last_providers_answer(mode: Mode) {
    let bed = Bed::start(
        mode,
        true,
        [
            failing(503, Some(30)),
            failing(502, None),
            failing(429, Some(7)),
        ],
    );
    let r = bed.post("/v1/chat/completions", &[], &chat());
    assert_eq!(r.status, 429, "the last provider's status: {}", show(&r));
    assert_eq!(r.header("retry-after"), Some("7"), "{}", show(&r));
    assert_eq!(r.header("x-market-router-attempts"), Some("3"));
    let v = json_of(&r);
    assert_eq!(v["error"]["code"], "all_providers_failed");
    let msg = v["error"]["message"].as_str().unwrap();
    assert_eq!(
        msg,
        format!(
            "all 3 attempt(s) for model `{MODEL}` failed: a: status 503; b: status 502; c: status 429; c answered: c: simulated 429 Too Many Requests"
        )
    );
    assert_eq!(bed.hits(), [1, 1, 1]);
    drop(bed);

    // One attempt only: the routed attempt's own error answer is read (route mode) or the
    // dispatched one's (dispatch mode).
    let bed = Bed::start_with(
        mode,
        true,
        [
            failing(503, Some(2)),
            failing(503, None),
            Default::default(),
        ],
        1,
    );
    let r = bed.post(
        "/v1/chat/completions",
        &[("accept-encoding", HTTPX_ACCEPT)],
        &chat(),
    );
    assert_eq!(r.status, 503, "{}", show(&r));
    assert_eq!(r.header("retry-after"), Some("2"), "{}", show(&r));
    // nginx's gzip filter (Kong) compresses 200, 403 and 404 answers only.
    let gzip = (mode != Mode::Kong).then_some("gzip");
    assert_eq!(r.header("content-encoding"), gzip, "{}", show(&r));
    let v = json_of(&r);
    assert_eq!(
        v["error"]["message"],
        format!("all 1 attempt(s) for model `{MODEL}` failed: a: status 503; a answered: a: simulated 503 Service Unavailable")
    );
    assert_eq!(bed.hits(), [1, 0, 0]);
}

#[test]
fn all_failed_keeps_the_last_providers_answer_route() {
    all_failed_keeps_the_last_providers_answer(Mode::Route);
}

#[test]
fn all_failed_keeps_the_last_providers_answer_dispatch() {
    all_failed_keeps_the_last_providers_answer(Mode::Dispatch);
}

#[test]
fn all_failed_keeps_the_last_providers_answer_kong() {
    all_failed_keeps_the_last_providers_answer(Mode::Kong);
}

// ---------------------------------------------------------------------------------------------
// No client picks a cluster
// ---------------------------------------------------------------------------------------------

const CLUSTERS: [&str; 4] = ["provider_a", "provider_b", "provider_c", "market_sidecar"];

/// Every method and path a client might try, LLM paths included.
const PATHS: [(&str, &str); 12] = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/gpt-4o-mini"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/market/snapshot"),
    ("GET", "/"),
    ("DELETE", "/anything/else?x=1"),
    ("GET", "/v1/chat/completions"),
    ("PUT", "/v1/embeddings"),
    ("POST", "/v1/chat/completions/extra"),
    ("POST", "/V1/CHAT/COMPLETIONS"),
];

/// Sends the cluster header naming every cluster on every path; none of them is reached (the
/// mocks count every request on any path, the market service's stand-in too). An LLM request
/// carrying it goes where the ranking says, and the header does not reach the provider.
fn assert_no_client_picks_a_cluster(
    envoy_url: &dyn Fn(&str) -> String,
    mocks: &[&MockProvider],
    sidecar: &Counter,
) {
    let seen = |m: &[&MockProvider]| -> Vec<u64> { m.iter().map(|m| m.seen().unwrap()).collect() };
    for cluster in CLUSTERS {
        for (method, path) in PATHS {
            let hs = [
                ("x-market-router-cluster", cluster),
                ("x-market-router-exclude", "a"),
                ("content-type", "application/json"),
            ];
            let body = serde_json::to_vec(&chat()).unwrap();
            let r = request(method, &envoy_url(path), &hs, &body, T).unwrap();
            assert!(
                r.status >= 400,
                "{method} {path} with {cluster}: {}",
                show(&r)
            );
            assert_eq!(
                seen(mocks),
                vec![0; mocks.len()],
                "{method} {path} with {cluster} reached a provider: {}",
                show(&r)
            );
            assert_eq!(sidecar.hits(), 0, "{method} {path} with {cluster}");
        }
    }
    // The LLM path itself: routed by the ranking (a, cheapest), not by the header.
    for cluster in CLUSTERS {
        let r = post_json(
            &envoy_url("/v1/chat/completions"),
            &[("x-market-router-cluster", cluster)],
            &chat(),
            T,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{cluster}: {}", show(&r));
        assert_eq!(r.header("x-market-router-provider"), Some("a"), "{cluster}");
        let last = mocks[0].last_request().unwrap();
        assert!(
            last["headers"].get("x-market-router-cluster").is_none(),
            "{last}"
        );
    }
    assert_eq!(seen(mocks), [4, 0, 0]);
    assert_eq!(sidecar.hits(), 0);
}

fn no_client_picks_a_cluster(mode: Mode) {
    let bed = Bed::start(mode, true, Default::default());
    let mocks: Vec<&MockProvider> = bed.mocks.iter().collect();
    assert_no_client_picks_a_cluster(&|p| bed.gateway.url(p), &mocks, &bed.sidecar);
}

#[test]
fn no_client_picks_a_cluster_route() {
    no_client_picks_a_cluster(Mode::Route);
}

#[test]
fn no_client_picks_a_cluster_dispatch() {
    no_client_picks_a_cluster(Mode::Dispatch);
}

/// Kong's host routes by its location, not by a header: what the filter lets through reaches
/// the location's `proxy_pass` (a 404 server), never a provider.
#[test]
fn no_client_picks_a_cluster_kong() {
    no_client_picks_a_cluster(Mode::Kong);
}

/// The shipped `envoy/envoy.yaml` (envoy mode), as it is but for its ports, the module's path
/// and (`mode` other than `envoy`) the failover mode.
fn shipped_envoy_yaml(mode: &str, ports: &[(u16, u16)]) -> String {
    let path = crate_root().join("envoy/envoy.yaml");
    let mut yaml = std::fs::read_to_string(&path).unwrap();
    let mut swap = |from: &str, to: &str| {
        assert!(yaml.contains(from), "envoy/envoy.yaml has no {from:?}");
        yaml = yaml.replace(from, to);
    };
    swap("port_value: 9901", "port_value: 0");
    swap("port_value: 10000", "port_value: 0");
    swap("- name: llm\n", "- name: ingress\n");
    for (from, to) in ports {
        swap(&format!("port_value: {from}"), &format!("port_value: {to}"));
    }
    swap(
        "filename: target/wasm32-wasip1/release/market_router.wasm",
        &format!("filename: {}", wasm_path().display()),
    );
    // The shipped file fetches a market snapshot: the stand-in answers it with no JSON worth
    // keeping, so count only what is not a snapshot fetch.
    swap(
        "\"market\": {\"cluster\": \"market_sidecar\", \"path\": \"/v1/market/snapshot\", \"refresh_ms\": 5000, \"max_age_ms\": 60000},\n",
        "",
    );
    if mode != "envoy" {
        swap("\"mode\": \"envoy\"", &format!("\"mode\": \"{mode}\""));
    }
    yaml
}

fn shipped_config_lets_no_client_pick_a_cluster(mode: &str) {
    let mocks: Vec<MockProvider> = ["acme", "bolt", "cirrus"]
        .iter()
        .map(|n| MockProvider::start(n, &MockOpts::default()).unwrap())
        .collect();
    let sidecar = Counter::start();
    let ports = [
        (18081, mocks[0].port()),
        (18082, mocks[1].port()),
        (18083, mocks[2].port()),
        (18090, sidecar.server.port()),
    ];
    let envoy = Envoy::start_bootstrap(&shipped_envoy_yaml(mode, &ports), 1).unwrap();
    let refs: Vec<&MockProvider> = mocks.iter().collect();
    // bolt is the cheapest for llama; gpt-4o-mini: acme and cirrus (acme has the offer).
    let url = |p: &str| envoy.url(p);
    let clusters = [
        "provider_acme",
        "provider_bolt",
        "provider_cirrus",
        "market_sidecar",
    ];
    for cluster in clusters {
        for (method, path) in PATHS {
            let r = request(
                method,
                &url(path),
                &[("x-market-router-cluster", cluster)],
                b"{}",
                T,
            )
            .unwrap();
            assert!(r.status >= 400, "{method} {path} {cluster}: {}", show(&r));
            let seen: Vec<u64> = refs.iter().map(|m| m.seen().unwrap()).collect();
            assert_eq!(seen, [0, 0, 0], "{method} {path} {cluster}: {}", show(&r));
            assert_eq!(sidecar.hits(), 0, "{method} {path} {cluster}");
        }
    }
    let r = post_json(
        &url("/v1/chat/completions"),
        &[("x-market-router-cluster", "market_sidecar")],
        &chat(),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", show(&r), envoy.log_tail(30));
    assert_eq!(sidecar.hits(), 0);
    let served: u64 = refs.iter().map(|m| m.seen().unwrap()).sum();
    assert_eq!(served, 1);
}

// Only as shipped: the file's provider clusters run the module's upstream role, which a
// dispatched call (dispatch mode, route mode's fallbacks) cannot pass in the same VM.
#[test]
fn shipped_config_lets_no_client_pick_a_cluster_envoy() {
    shipped_config_lets_no_client_pick_a_cluster("envoy");
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 towards the providers
// ---------------------------------------------------------------------------------------------

/// Providers reached over HTTP/2 without TLS (h2c), as gateways often reach providers inside a
/// network: plain, compressed, streamed and big answers, and a failover after a 503 and after a
/// stream reset mid-answer.
fn h2c_providers_serve(mode: Mode) {
    let mocks: Vec<MockProvider> = ["a", "b", "c"]
        .iter()
        .map(|n| MockProvider::start(n, &MockOpts::default()).unwrap())
        .collect();
    let mut cfg = EnvoyConfig::new()
        .market_router(&config(mode, 3, &[]))
        .compression(true);
    for m in &mocks {
        cfg = cfg.provider(ProviderCluster::new(&format!("provider_{}", m.name()), m.port()).h2c());
    }
    let envoy = Envoy::start(&cfg, 1).unwrap();
    let post = |path: &str, hs: &[(&str, &str)], body: &Value| {
        post_json(&envoy.url(path), hs, body, T)
            .unwrap_or_else(|e| panic!("{e}\nEnvoy log:\n{}", envoy.log_tail(30)))
    };
    let r = post(
        "/v1/chat/completions",
        &[("accept-encoding", HTTPX_ACCEPT)],
        &chat(),
    );
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(r.header("x-market-router-provider"), Some("a"));
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(json_of(&r)["object"], "chat.completion");
    let last = mocks[0].last_request().unwrap();
    assert_eq!(last["http2"], true, "reached over HTTP/2: {last}");
    assert_eq!(last["headers"]["accept-encoding"], "identity", "{last}");

    let mut stream = chat();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let r = post("/v1/chat/completions", &[], &stream);
    assert_eq!(r.status, 200, "{}", show(&r));
    let text = String::from_utf8(decoded(&r)).unwrap();
    assert!(
        text.contains("\"usage\"") && text.contains("[DONE]"),
        "{text}"
    );

    mocks[0]
        .set_behavior(&json!({"answer_bytes": BIG, "chunked": true}))
        .unwrap();
    let r = post("/v1/embeddings", &[], &embeddings());
    assert_eq!(r.status, 200, "{}", show(&r));
    assert!(r.body.len() as u64 >= BIG, "{}", r.body.len());

    mocks[0].set_behavior(&json!({"status": 503})).unwrap();
    let r = post(
        "/v1/chat/completions",
        &[("accept-encoding", HTTPX_ACCEPT)],
        &chat(),
    );
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(r.header("x-market-router-provider"), Some("b"));
    assert_eq!(r.header("content-encoding"), Some("gzip"));

    // A stream reset after the first events: dispatch mode fails over (route mode cannot: the
    // client already has bytes).
    mocks[0].set_behavior(&json!({"reset_mid": true})).unwrap();
    let r = post_json(&envoy.url("/v1/embeddings"), &[], &embeddings(), T);
    if mode == Mode::Dispatch {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(r.header("x-market-router-provider"), Some("b"));
    }
    for m in &mocks[..2] {
        assert_eq!(m.last_request().unwrap()["http2"], true, "{}", m.name());
    }
}

#[test]
fn h2c_providers_serve_route() {
    h2c_providers_serve(Mode::Route);
}

#[test]
fn h2c_providers_serve_dispatch() {
    h2c_providers_serve(Mode::Dispatch);
}
