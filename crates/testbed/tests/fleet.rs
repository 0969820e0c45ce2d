//! One market for the fleet: two real Envoys report what they see to one market service
//! (`POST /v1/market/reports`), and a provider that fails for one of them is avoided by the
//! other without it ever sending that provider a request. Kong's wasm host reports the same way.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::fleet::{self, offer, Pair, MODEL};
use common::{
    get, post_json, Envoy, Kong, KongConfig, MarketService, MockOpts, MockProvider, TempDir,
};
use serde_json::{json, Value};
use std::thread;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(30);
/// The filters' market period.
const REFRESH_MS: u64 = 500;

fn envoy(service: &MarketService, cheap_port: u16, other_port: u16) -> Envoy {
    let plugin = fleet::plugin(REFRESH_MS, None);
    fleet::envoy(service.port(), cheap_port, other_port, &plugin, 2).unwrap()
}

/// A and B on `service_a` and `service_b`; A's `cheap` answers 503.
fn pair(service_a: &MarketService, service_b: &MarketService) -> Pair {
    let plugin = fleet::plugin(REFRESH_MS, None);
    let broken = MockOpts::default().status(503);
    Pair::start(service_a.port(), service_b.port(), &broken, &plugin, 2).unwrap()
}

fn route(e: &Envoy) -> Value {
    fleet::route(e).unwrap()
}

fn chat(e: &Envoy) -> String {
    fleet::chat(e).unwrap()
}

#[test]
fn a_provider_failing_for_envoy_a_is_avoided_by_envoy_b_without_a_request() {
    let dir = TempDir::new("fleet").unwrap();
    // The feeds' view: `cheap` is cheapest and online, so every gateway picks it first.
    fleet::service_config(&dir, 0.2).unwrap();
    let service = MarketService::start(&dir.join("service.json")).unwrap();

    // Envoy A reaches a `cheap` that fails; Envoy B's `cheap` is healthy and counts every
    // request it gets, so any request B sends to `cheap` shows.
    let Pair {
        cheap_a: broken_for_a,
        cheap_b: cheap_for_b,
        other: _other,
        a,
        b,
    } = pair(&service, &service);

    // Both start from the feeds' view: `cheap` first.
    for e in [&a, &b] {
        let deadline = Instant::now() + WAIT;
        while route(e)["candidates"][0]["provider"] != "cheap" {
            assert!(Instant::now() < deadline, "{:#}", route(e));
            thread::sleep(Duration::from_millis(50));
        }
    }

    // A's traffic: `cheap` fails, A fails over to `other`; nothing is lost.
    let outage = Instant::now();
    for _ in 0..4 {
        assert_eq!(chat(&a), "other");
    }
    assert!(broken_for_a.hits().unwrap() >= 3);

    // B sends nothing; it learns from the market within two periods of A's report.
    let deadline = Instant::now() + WAIT;
    let seen = loop {
        let v = route(&b);
        if v["candidates"][0]["provider"] == "other" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "B still ranks cheap first: {v:#}\nservice snapshot: {:#}\nA log: {}",
            service.snapshot().unwrap(),
            a.log_tail(30)
        );
        thread::sleep(Duration::from_millis(20));
    };
    let took = outage.elapsed();
    eprintln!(
        "fleet-wide avoidance {} ms after A's first failure (market period {REFRESH_MS} ms)",
        took.as_millis()
    );
    // The bound has room for a loaded machine; the figure above is what was measured.
    assert!(took < Duration::from_millis(2 * REFRESH_MS) + Duration::from_secs(10));
    let excluded = seen["excluded"].as_array().cloned().unwrap_or_default();
    let cheap_ex = excluded.iter().find(|x| x["provider"] == "cheap");
    assert_eq!(
        cheap_ex.map(|x| x["constraint"].clone()),
        Some(json!("offline")),
        "{seen:#}"
    );

    // The service says where the figure came from.
    let snap = service.snapshot().unwrap();
    let c = offer(&snap, "cheap");
    assert_eq!(c["availability"], "offline", "{c:#}");
    assert_eq!(c["provenance"]["availability"]["source"], "observed");
    assert!(c["uptime"].as_f64().unwrap() < 0.99, "{c:#}");
    assert_eq!(offer(&snap, "other")["availability"], "online");
    assert!(
        service
            .metric("market_sidecar_reports_total{result=\"accepted\"}")
            .unwrap()
            .unwrap()
            >= 1.0
    );
    assert!(
        a.stat_settled("wasmcustom.market_router.report.sent")
            .unwrap()
            .unwrap_or(0)
            >= 1
    );

    // B's traffic goes to `other` at once; B never sent `cheap` a request.
    for _ in 0..3 {
        assert_eq!(chat(&b), "other");
    }
    assert_eq!(cheap_for_b.hits().unwrap(), 0);
}

#[test]
fn reports_are_dropped_and_counted_when_the_service_is_down_and_requests_never_suffer() {
    let dir = TempDir::new("fleet-down").unwrap();
    fleet::service_config(&dir, 0.2).unwrap();
    let mut service = Some(MarketService::start(&dir.join("service.json")).unwrap());
    let cheap = MockProvider::start("cheap", &MockOpts::default()).unwrap();
    let other = MockProvider::start("other", &MockOpts::default()).unwrap();
    let e = envoy(service.as_ref().unwrap(), cheap.port(), other.port());
    let deadline = Instant::now() + WAIT;
    while route(&e)["candidates"][0]["provider"] != "cheap" {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(50));
    }
    // The service goes away: requests keep being served on the last good snapshot, and
    // each period's report is dropped and counted.
    service.take();
    let deadline = Instant::now() + WAIT;
    let mut served = 0;
    loop {
        chat(&e);
        served += 1;
        let dropped = e
            .stat("wasmcustom.market_router.report.dropped")
            .unwrap()
            .unwrap_or(0);
        if dropped >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no report counted as dropped");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cheap.hits().unwrap() + other.hits().unwrap(), served);
}

/// The same reports from Kong's wasm host (two nginx workers, one report per period for the
/// process): the service sees what Kong saw.
#[test]
fn kong_reports_what_it_sees_to_the_market_service() {
    let dir = TempDir::new("fleet-kong").unwrap();
    fleet::service_config(&dir, 0.2).unwrap();
    let service = MarketService::start(&dir.join("service.json")).unwrap();
    let broken = MockProvider::start("cheap", &MockOpts::default().status(503)).unwrap();
    let other = MockProvider::start("other", &MockOpts::default()).unwrap();
    let plugin = json!({
        "providers": [
            {"name": "cheap", "cluster": format!("127.0.0.1:{}", broken.port()), "models": {MODEL: MODEL}},
            {"name": "other", "cluster": format!("127.0.0.1:{}", other.port()), "models": {MODEL: MODEL}},
        ],
        "market": {"cluster": format!("127.0.0.1:{}", service.port()), "authority": "127.0.0.1",
                   "refresh_ms": REFRESH_MS, "max_age_ms": 60_000, "timeout_ms": 1000},
        "routing": {"strategy": "cheapest"},
        "failover": {"mode": "dispatch"}
    });
    let kong = Kong::start(
        &KongConfig::new()
            .workers(2)
            .market_router(&plugin.to_string()),
    )
    .unwrap();
    let routed = |k: &Kong| -> Value {
        let r = get(&k.url(&format!("/market-router/v1/route?model={MODEL}")), T).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().unwrap()
    };
    let deadline = Instant::now() + WAIT;
    while routed(&kong)["candidates"][0]["provider"] != "cheap" {
        assert!(Instant::now() < deadline, "{}", kong.error_log());
        thread::sleep(Duration::from_millis(50));
    }
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
    // Until `cheap` has failed three times (the fleet's threshold for `offline`); every
    // request is answered by `other` meanwhile.
    for sent in 0.. {
        let r = post_json(&kong.url("/v1/chat/completions"), &[], &body, T).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), kong.error_log());
        if broken.hits().unwrap() >= 3 {
            break;
        }
        assert!(
            sent < 20,
            "cheap was tried {} times",
            broken.hits().unwrap()
        );
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let c = offer(&service.snapshot().unwrap(), "cheap");
        if c["availability"] == "offline" {
            assert_eq!(c["provenance"]["availability"]["source"], "observed");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service never saw Kong's failures: {c:#}\n{}",
            kong.error_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Kong itself then ranks `cheap` out from the market, like every other gateway.
    let deadline = Instant::now() + WAIT;
    while routed(&kong)["candidates"][0]["provider"] != "other" {
        assert!(Instant::now() < deadline, "{:#}", routed(&kong));
        thread::sleep(Duration::from_millis(50));
    }
    assert!(kong.crashes().is_empty(), "{}", kong.crashes().join("\n"));
}

/// `market.report: false`: the gateway still reads the market but tells it nothing (no tally,
/// no report), while a reporting gateway beside it posts every period.
#[test]
fn a_gateway_with_report_false_posts_nothing() {
    let dir = TempDir::new("fleet-noreport").unwrap();
    fleet::service_config(&dir, 0.2).unwrap();
    let service = MarketService::start(&dir.join("service.json")).unwrap();
    let broken = MockProvider::start("cheap", &MockOpts::default().status(503)).unwrap();
    let other = MockProvider::start("other", &MockOpts::default()).unwrap();
    let silent = fleet::envoy(
        service.port(),
        broken.port(),
        other.port(),
        &fleet::plugin(REFRESH_MS, Some(false)),
        2,
    )
    .unwrap();
    let reporting = envoy(&service, other.port(), other.port());
    let deadline = Instant::now() + WAIT;
    while route(&silent)["candidates"][0]["provider"] != "cheap" {
        assert!(Instant::now() < deadline, "{:#}", route(&silent));
        thread::sleep(Duration::from_millis(50));
    }
    // The silent gateway fails over from its broken `cheap`; the reporting one is healthy.
    for _ in 0..4 {
        assert_eq!(chat(&silent), "other");
        chat(&reporting);
    }
    // Several periods pass (the reporting gateway posts twice more)...
    let sent = |e: &Envoy| {
        e.stat("wasmcustom.market_router.report.sent")
            .unwrap()
            .unwrap_or(0)
    };
    let before = sent(&reporting);
    let deadline = Instant::now() + WAIT;
    while sent(&reporting) < before + 2 {
        assert!(
            Instant::now() < deadline,
            "the reporting gateway stopped posting"
        );
        chat(&reporting);
        thread::sleep(Duration::from_millis(50));
    }
    // ...and the silent one posted nothing: the service heard only of `cheap` answering well
    // (the reporting gateway's), never of it failing.
    assert_eq!(sent(&silent), 0);
    assert_eq!(
        silent
            .stat("wasmcustom.market_router.report.dropped")
            .unwrap()
            .unwrap_or(0),
        0
    );
    let c = offer(&service.snapshot().unwrap(), "cheap");
    assert_eq!(c["availability"], "online", "{c:#}");
    assert_eq!(c["provenance"]["uptime"]["source"], "observed", "{c:#}");
    assert!(c["uptime"].as_f64().unwrap() >= 0.99, "{c:#}");
    assert!(broken.hits().unwrap() >= 3);
}
