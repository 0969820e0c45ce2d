//! One market for the fleet: real gateways report what they see to one market service
//! (`POST /v1/market/reports`), and a provider that fails for one of them is avoided by the
//! other without it ever sending that provider a request. Each scenario runs with Envoys and
//! with Kong's wasm host as one of the gateways (Kong's host has no stats endpoint: there the
//! filter's log lines in nginx's error log stand in for Envoy's counters).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::fleet::{self, offer, MODEL};
use common::{get, post_json, Gateway, Kong, MarketService, MockOpts, MockProvider, TempDir};
use serde_json::{json, Value};
use std::thread;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(30);
/// The filters' market period.
const REFRESH_MS: u64 = 500;

/// The host a fleet gateway runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    Envoy,
    Kong,
}

/// A gateway with two workers on the fleet plugin (`market.report` as given) whose `cheap`
/// and `other` are the mocks on these ports.
fn gateway(
    host: Host,
    service: &MarketService,
    cheap_port: u16,
    other_port: u16,
    report: Option<bool>,
) -> Gateway {
    let plugin = fleet::plugin(REFRESH_MS, report);
    match host {
        Host::Envoy => Gateway::Envoy(
            fleet::envoy(service.port(), cheap_port, other_port, &plugin, 2).unwrap(),
        ),
        Host::Kong => {
            Gateway::Kong(fleet::kong(service.port(), cheap_port, other_port, &plugin, 2).unwrap())
        }
    }
}

fn route(g: &Gateway) -> Value {
    fleet::route_on(g).unwrap()
}

fn chat(g: &Gateway) -> String {
    fleet::chat_on(g).unwrap()
}

/// Waits until `g` ranks `provider` first on market data (with none, every provider is
/// `unknown` and the configuration's order ranks `cheap` first anyway).
fn wait_first(g: &Gateway, provider: &str) {
    let deadline = Instant::now() + WAIT;
    let first = |v: &Value| {
        v["candidates"][0]["provider"] == provider && v["candidates"][0]["source"] == "market"
    };
    while !first(&route(g)) {
        assert!(
            Instant::now() < deadline,
            "{:#}\n{}",
            route(g),
            g.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// An Envoy counter (0 when absent).
fn counter(e: &common::Envoy, name: &str) -> u64 {
    e.stat(name).unwrap().unwrap_or(0)
}

/// Reports `g` dropped: Envoy's counter; on Kong the filter's "market report dropped" lines.
fn reports_dropped(g: &Gateway) -> u64 {
    match g {
        Gateway::Envoy(e) => counter(e, "wasmcustom.market_router.report.dropped"),
        Gateway::Kong(k) => k.error_log().matches("market report dropped").count() as u64,
    }
}

/// Market refreshes `g` completed (a new snapshot stored or a 304): Envoy's counters; on Kong
/// the filter's lines for each.
fn refreshes(g: &Gateway) -> u64 {
    match g {
        Gateway::Envoy(e) => {
            counter(e, "wasmcustom.market_router.snapshot.refresh_ok")
                + counter(e, "wasmcustom.market_router.snapshot.refresh_not_modified")
        }
        Gateway::Kong(k) => {
            let log = k.error_log();
            (log.matches("market snapshot updated").count()
                + log.matches("market snapshot not modified").count()) as u64
        }
    }
}

/// Reports the market service accepted.
fn accepted(service: &MarketService) -> f64 {
    service
        .metric("market_sidecar_reports_total{result=\"accepted\"}")
        .unwrap()
        .unwrap_or(0.0)
}

#[test]
fn a_provider_failing_for_envoy_a_is_avoided_by_envoy_b_without_a_request() {
    avoided_by_another_gateway(Host::Envoy, Host::Envoy);
}

/// Kong's host reports the failures; an Envoy beside it avoids the provider.
#[test]
fn a_provider_failing_for_kong_is_avoided_by_envoy_without_a_request() {
    avoided_by_another_gateway(Host::Kong, Host::Envoy);
}

/// An Envoy reports the failures; Kong's host beside it avoids the provider.
#[test]
fn a_provider_failing_for_envoy_is_avoided_by_kong_without_a_request() {
    avoided_by_another_gateway(Host::Envoy, Host::Kong);
}

/// Gateway A (in `host_a`) reaches a failing `cheap`; gateway B (in `host_b`) learns it from
/// the market and never sends `cheap` a request.
fn avoided_by_another_gateway(host_a: Host, host_b: Host) {
    let what = format!("A {host_a:?}, B {host_b:?}");
    let dir = TempDir::new("fleet").unwrap();
    // The feeds' view: `cheap` is cheapest and online, so every gateway picks it first.
    fleet::service_config(&dir, 0.2).unwrap();
    let service = MarketService::start(&dir.join("service.json")).unwrap();

    // Gateway A reaches a `cheap` that fails; B's `cheap` is healthy and counts every
    // request it gets, so any request B sends to `cheap` shows.
    let broken_for_a = MockProvider::start("cheap", &MockOpts::default().status(503)).unwrap();
    let cheap_for_b = MockProvider::start("cheap", &MockOpts::default()).unwrap();
    let other = MockProvider::start("other", &MockOpts::default()).unwrap();
    let a = gateway(host_a, &service, broken_for_a.port(), other.port(), None);
    let b = gateway(host_b, &service, cheap_for_b.port(), other.port(), None);

    // Both start from the feeds' view: `cheap` first.
    wait_first(&a, "cheap");
    wait_first(&b, "cheap");

    // A's traffic: `cheap` fails, A fails over to `other`; nothing is lost.
    let outage = Instant::now();
    for _ in 0..4 {
        assert_eq!(chat(&a), "other", "{what}");
    }
    assert!(broken_for_a.hits().unwrap() >= 3, "{what}");

    // B sends nothing; it learns from the market within two periods of A's report.
    let deadline = Instant::now() + WAIT;
    let seen = loop {
        let v = route(&b);
        if v["candidates"][0]["provider"] == "other" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: B still ranks cheap first: {v:#}\nservice snapshot: {:#}\nA log: {}",
            service.snapshot().unwrap(),
            a.log_tail(30)
        );
        thread::sleep(Duration::from_millis(20));
    };
    let took = outage.elapsed();
    // B's other worker may not have re-read the snapshot yet: wait until every answer over a
    // whole market period ranks `other` first before B's traffic is checked.
    fleet::every_worker_for(Duration::from_millis(REFRESH_MS), WAIT, || {
        Ok(route(&b)["candidates"][0]["provider"] == "other")
    })
    .unwrap_or_else(|e| panic!("{what}: {e}: {:#}", route(&b)));
    eprintln!(
        "{what}: fleet-wide avoidance {} ms after A's first failure (market period {REFRESH_MS} ms)",
        took.as_millis()
    );
    // The bound has room for a loaded machine; the figure above is what was measured.
    assert!(took < Duration::from_millis(2 * REFRESH_MS) + Duration::from_secs(10));
    let excluded = seen["excluded"].as_array().cloned().unwrap_or_default();
    let cheap_ex = excluded.iter().find(|x| x["provider"] == "cheap");
    assert_eq!(
        cheap_ex.map(|x| x["constraint"].clone()),
        Some(json!("offline")),
        "{what}: {seen:#}"
    );

    // The service says where the figure came from.
    let snap = service.snapshot().unwrap();
    let c = offer(&snap, "cheap");
    assert_eq!(c["availability"], "offline", "{what}: {c:#}");
    assert_eq!(c["provenance"]["availability"]["source"], "observed");
    assert!(c["uptime"].as_f64().unwrap() < 0.99, "{what}: {c:#}");
    assert_eq!(offer(&snap, "other")["availability"], "online");
    assert!(accepted(&service) >= 1.0, "{what}");
    if let Some(e) = a.envoy() {
        assert!(
            e.stat_settled("wasmcustom.market_router.report.sent")
                .unwrap()
                .unwrap_or(0)
                >= 1
        );
    }

    // B's traffic goes to `other` at once; B never sent `cheap` a request.
    for _ in 0..3 {
        assert_eq!(chat(&b), "other", "{what}");
    }
    assert_eq!(cheap_for_b.hits().unwrap(), 0, "{what}");
    a.assert_no_crash();
    b.assert_no_crash();
}

#[test]
fn reports_are_dropped_and_counted_when_the_service_is_down_and_requests_never_suffer() {
    reports_dropped_when_the_service_is_down(Host::Envoy);
}

#[test]
fn kong_drops_reports_when_the_service_is_down_and_requests_never_suffer() {
    reports_dropped_when_the_service_is_down(Host::Kong);
}

fn reports_dropped_when_the_service_is_down(host: Host) {
    let dir = TempDir::new("fleet-down").unwrap();
    fleet::service_config(&dir, 0.2).unwrap();
    let mut service = Some(MarketService::start(&dir.join("service.json")).unwrap());
    let cheap = MockProvider::start("cheap", &MockOpts::default()).unwrap();
    let other = MockProvider::start("other", &MockOpts::default()).unwrap();
    let g = gateway(
        host,
        service.as_ref().unwrap(),
        cheap.port(),
        other.port(),
        None,
    );
    wait_first(&g, "cheap");
    // The service goes away: requests keep being served on the last good snapshot, and
    // each period's report is dropped and counted (on Kong: logged).
    service.take();
    let deadline = Instant::now() + WAIT;
    let mut served = 0;
    loop {
        assert_eq!(chat(&g), "cheap", "{host:?}: the last good snapshot ranks");
        served += 1;
        if reports_dropped(&g) >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{host:?}: no report counted as dropped\n{}",
            g.log_tail(30)
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cheap.hits().unwrap() + other.hits().unwrap(), served);
    g.assert_no_crash();
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
    let kong = fleet::kong(
        service.port(),
        broken.port(),
        other.port(),
        &fleet::plugin(REFRESH_MS, None),
        2,
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
/// no report), while a reporting gateway that joins it later posts every period.
#[test]
fn a_gateway_with_report_false_posts_nothing() {
    report_false_posts_nothing(Host::Envoy);
}

#[test]
fn kong_with_report_false_posts_nothing() {
    report_false_posts_nothing(Host::Kong);
}

fn report_false_posts_nothing(host: Host) {
    let dir = TempDir::new("fleet-noreport").unwrap();
    fleet::service_config(&dir, 0.2).unwrap();
    let service = MarketService::start(&dir.join("service.json")).unwrap();
    let broken = MockProvider::start("cheap", &MockOpts::default().status(503)).unwrap();
    let other = MockProvider::start("other", &MockOpts::default()).unwrap();
    let silent = gateway(host, &service, broken.port(), other.port(), Some(false));
    wait_first(&silent, "cheap");
    // The silent gateway fails over from its broken `cheap` until `cheap` has failed three
    // times (the fleet's threshold for `offline`, had it been told)...
    let deadline = Instant::now() + WAIT;
    while broken.hits().unwrap() < 3 {
        assert_eq!(chat(&silent), "other", "{host:?}");
        assert!(
            Instant::now() < deadline,
            "{host:?}: cheap was tried {} times",
            broken.hits().unwrap()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // ...and keeps reading the market for three more periods...
    let before = refreshes(&silent);
    let deadline = Instant::now() + WAIT;
    while refreshes(&silent) < before + 3 {
        assert!(
            Instant::now() < deadline,
            "{host:?}: the silent gateway stopped reading the market\n{}",
            silent.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    // ...while the service, which only it could tell, heard nothing at all.
    assert_eq!(accepted(&service), 0.0, "{host:?}");
    assert_eq!(reports_dropped(&silent), 0, "{host:?}");
    if let Some(e) = silent.envoy() {
        assert_eq!(counter(e, "wasmcustom.market_router.report.sent"), 0);
    }
    let c = offer(&service.snapshot().unwrap(), "cheap");
    assert_eq!(c["availability"], "online", "{host:?}: {c:#}");

    // A reporting gateway (whose `cheap` is healthy) joins and posts twice: the service
    // counts reports, and hears only of `cheap` answering well, never of it failing.
    let reporting = gateway(Host::Envoy, &service, other.port(), other.port(), None);
    wait_first(&reporting, "cheap");
    let deadline = Instant::now() + WAIT;
    while accepted(&service) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the reporting gateway never posted"
        );
        chat(&reporting);
        chat(&silent);
        thread::sleep(Duration::from_millis(50));
    }
    let c = offer(&service.snapshot().unwrap(), "cheap");
    assert_eq!(c["availability"], "online", "{host:?}: {c:#}");
    assert_eq!(c["provenance"]["uptime"]["source"], "observed", "{c:#}");
    assert!(c["uptime"].as_f64().unwrap() >= 0.99, "{host:?}: {c:#}");
    assert_eq!(reports_dropped(&silent), 0, "{host:?}");
    if let Some(e) = silent.envoy() {
        assert_eq!(counter(e, "wasmcustom.market_router.report.sent"), 0);
    }
    silent.assert_no_crash();
}
