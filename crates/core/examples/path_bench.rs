//! Micro-benchmark: the core's part of one routed request in route mode, step by step, the way
//! the filter's callbacks call it (`crates/filter/src/http.rs`): the request headers'
//! step, the body read, the decision (ranking), the first attempt's routing, the response
//! headers' step and the verdict, our response headers, the counters and the decision
//! record. Built for wasm32-wasip1 and run under Node's WASI like `make bench-json`, so the
//! same code can be timed at two opt-levels:
//!
//!     cargo build --release --target wasm32-wasip1 -p market-router-core --example path_bench
//!     node scripts/wasi-run.mjs target/wasm32-wasip1/release/examples/path_bench.wasm
//!
//! The configuration is the one `bench_envoy_mode` gives route mode (two providers with
//! static offers, response headers and the decision record on). Each step runs `--samples`
//! timed samples of about `--sample-ms` each; the figure is the fastest sample, ns per call.

use market_router_core::attempt::Outcome;
use market_router_core::config::Config;
use market_router_core::exchange::{Exchange, OnHeaders, Phase, ResponseView};
use market_router_core::health::HealthTable;
use market_router_core::host::MockHost;
use market_router_core::outbound::{self, Outgoing};
use market_router_core::rng::Rng;
use market_router_core::routing::{self, Books};
use market_router_core::served::Served;
use market_router_core::walk::{Effect, Walk};
use std::hint::black_box;
use std::time::Instant;

const CONFIG: &str = r#"{"providers":[
 {"name":"alpha","cluster":"provider_a","models":{"gpt-4o-mini":"gpt-4o-mini"},
  "static_offer":{"price":{"input_per_mtok":0.15,"output_per_mtok":0.6},"latency_ms":{"ttft_p50":400},"uptime":0.995}},
 {"name":"beta","cluster":"provider_b","models":{"gpt-4o-mini":"gpt-4o-mini"},
  "static_offer":{"price":{"input_per_mtok":0.3,"output_per_mtok":1.2},"latency_ms":{"ttft_p50":300},"uptime":0.999}}],
 "routing":{"strategy":"balanced"},"failover":{"mode":"route"}}"#;

fn chat_body(size: usize) -> Vec<u8> {
    let head = r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":""#;
    let tail = r#""}]}"#;
    let words = "lorem ipsum dolor sit amet consectetur adipiscing elit ";
    let mut content = String::new();
    while content.len() < size - head.len() - tail.len() {
        content.push_str(words);
    }
    content.truncate(size - head.len() - tail.len());
    format!("{head}{content}{tail}").into_bytes()
}

fn client_headers() -> Vec<(String, String)> {
    [
        (":authority", "localhost:10000"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("content-length", "200"),
        ("user-agent", "wrk"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "0b5d6c1e-6f0e-4d8e-9a3c-2d0f7e4b1a9c"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

struct Answer;

impl ResponseView for Answer {
    fn header(&self, name: &str) -> Option<String> {
        (name == "content-type").then(|| "application/json".to_string())
    }
    fn code_details(&self) -> Option<String> {
        None
    }
}

/// Fastest of `samples` samples of about `sample_ms` each, ns per call.
fn time(samples: usize, sample_ms: u64, mut f: impl FnMut()) -> f64 {
    let mut n = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        if t.elapsed().as_millis() as u64 >= sample_ms / 4 || n > 1 << 30 {
            break;
        }
        n *= 2;
    }
    let n = n * 4;
    (0..samples)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::INFINITY, f64::min)
}

struct Request {
    walk: Walk,
    ex: Exchange,
    info: Option<market_router_core::request::RequestInfo>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let samples = value("--samples", 15) as usize;
    let sample_ms = value("--sample-ms", 40);
    let config = match Config::parse(CONFIG.as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config: {e:?}");
            std::process::exit(1);
        }
    };
    let client = client_headers();
    let mut health = HealthTable::default();
    let mut rng = Rng::new(7);
    let circuit = config.failover.circuit;
    let now = 1_000_000u64;

    for size in [200usize, 65536] {
        let body = chat_body(size);
        let host = MockHost::envoy();
        let headers_ns = time(samples, sample_ms, || {
            let mut phase = Phase::default();
            let step = routing::on_request_headers(
                &host,
                &config,
                black_box(&client),
                false,
                true,
                &mut phase,
                |_| {},
            );
            black_box(step);
        });
        let read_ns = time(samples, sample_ms, || {
            black_box(routing::read(black_box(&body)).ok());
        });
        let info = routing::read(&body).ok();
        let Some(info) = info else {
            eprintln!("the body did not parse");
            std::process::exit(1);
        };
        let decide_ns = time(samples, sample_ms, || {
            let mut walk = Walk::default();
            let books = Books {
                market: None,
                health: &health,
                rng: &mut rng,
            };
            let r = routing::decide(
                &host,
                &config,
                "mr/aff/",
                books,
                &client,
                &info,
                now,
                &mut walk,
                |_| {},
            );
            black_box((r.ok(), walk));
        });
        // One whole request: decision, route, response headers' step, verdict, our
        // headers, counters, decision record.
        let one = |health: &mut HealthTable, rng: &mut Rng, parts: &mut [f64; 4], timed: bool| {
            let t0 = Instant::now();
            let info = routing::read(black_box(&body)).ok();
            let mut r = Request {
                walk: Walk::default(),
                ex: Exchange::default(),
                info,
            };
            let Some(info) = &r.info else { return };
            let books = Books {
                market: None,
                health,
                rng,
            };
            let _ = routing::decide(
                &host,
                &config,
                "mr/aff/",
                books,
                &client,
                info,
                now,
                &mut r.walk,
                |_| {},
            );
            let req = Outgoing {
                config: &config,
                info,
                body: &body,
                client: &client,
            };
            let routed = outbound::route_first(&host, &mut r.walk, &req, now, |_| false, |_| {});
            black_box(routed.ok());
            r.ex.phase = Phase::Routed;
            let t1 = Instant::now();
            let step =
                r.ex.on_headers(200, false, false, false, &config, now + 50, &Answer);
            if let OnHeaders::Judge { outcome, status } = step {
                let v = r
                    .walk
                    .answered(outcome, now + 50, false, &config.failover, true, |e| {
                        if let Effect::Observe {
                            provider,
                            observation,
                        } = e
                        {
                            health.observe_locally(
                                &config.providers[provider].name,
                                observation,
                                now,
                                &circuit,
                            );
                        }
                    });
                black_box(r.ex.after_verdict(
                    v.map(|v| matches!(v, market_router_core::walk::Verdict::Deliver)),
                    status,
                    false,
                ));
            } else {
                black_box(Outcome::Success(200));
            }
            let t2 = Instant::now();
            let served = Served {
                config: &config,
                walk: &r.walk,
                model: Some(info.model.as_str()),
                usage: None,
                snapshot_age_ms: None,
                provider_error: None,
            };
            let p = served.provider().unwrap_or(0);
            let mut n = 0usize;
            served.headers(p, |k, v| n += k.len() + v.len());
            black_box(served.counts(p));
            black_box(n);
            let t3 = Instant::now();
            let record = served.decision(Some(p), Some(200)).to_json();
            black_box(record);
            let t4 = Instant::now();
            if timed {
                for (part, (a, b)) in parts
                    .iter_mut()
                    .zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)])
                {
                    *part = part.min(b.duration_since(a).as_nanos() as f64);
                }
            }
        };
        let whole_ns = time(samples, sample_ms, || {
            let mut parts = [0.0; 4];
            one(&mut health, &mut rng, &mut parts, false);
        });
        // The same request's steps, each the fastest of many single timings.
        let mut parts = [f64::INFINITY; 4];
        for _ in 0..20_000 {
            one(&mut health, &mut rng, &mut parts, true);
        }
        println!(
            "{size} B: request headers {headers_ns:.0} | body read {read_ns:.0} | decide {decide_ns:.0} | whole request {whole_ns:.0} ns \
             (of it, fastest single: read+decide+route {:.0}, response step+verdict {:.0}, our headers+counts {:.0}, decision record {:.0})",
            parts[0], parts[1], parts[2], parts[3]
        );
    }
}
