//! One end-to-end test per README promise that had none: each runs the filter in a real
//! Envoy with mock providers (and the market sidecar where the promise is about market data)
//! and fails when the promised behaviour is removed. Each promise that holds in dispatch mode
//! runs in Kong's wasm host too, in the same test body (mode [`KONG`]); Kong's host has no
//! stats endpoint, so counters and gauges are checked on Envoy only.
//!
//! Needs the filter module (`make build`), the example binaries (`cargo build --examples`) and
//! Envoy (`make envoy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/bed.rs"]
mod bed;
use market_router_testbed as common;

use bed::*;
use common::MockOpts;
use serde_json::{json, Value};
use std::thread;
use std::time::{Duration, Instant};

const MODEL: &str = "gpt-4o-mini";
/// Every failover mode a promise about failover is checked in (the last: Kong's host).
const MODES: [&str; 3] = ["route", "dispatch", KONG];
/// The hosts a promise about the answer or the ranking is checked in: Envoy (route mode) and
/// Kong's (dispatch mode).
const HOSTS: [&str; 2] = ["route", KONG];

/// Providers `a` (cheapest), `b`, `c` with static offers, `cheapest`, the given failover
/// section merged over a default one.
fn config(names: &[&str], failover: Value) -> Value {
    let providers: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| static_provider(n, MODEL, 0.1 * (1 + 4 * i) as f64))
        .collect();
    let mut f = json!({
        "mode": "route", "max_attempts": 3, "attempt_timeout_ms": 3000, "deadline_ms": 9000,
        "circuit": {"failure_threshold": 5, "cooldown_ms": 30_000}
    });
    for (k, v) in failover.as_object().unwrap() {
        f[k] = v.clone();
    }
    json!({"providers": providers, "routing": {"strategy": "cheapest"}, "failover": f})
}

fn our_headers(r: &common::Response) -> Vec<String> {
    r.headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .filter(|k| k.starts_with("x-market-router-"))
        .collect()
}

fn route_json(bed: &Bed, query: &str) -> Value {
    let r = bed.get(&format!("/market-router/v1/route?{query}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

fn provider_of(r: &common::Response) -> Option<&str> {
    r.header("x-market-router-provider")
}

// ---------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------

/// `response_headers: false`: no x-market-router-* header on an answer or on the filter's own
/// error, while the answer itself and a provider's Retry-After (standard HTTP) stay.
#[test]
fn response_headers_false_leaves_out_our_headers_only() {
    for mode in HOSTS {
        let mut cfg = config(&["a", "b"], json!({"mode": mode}));
        cfg["response_headers"] = json!(false);
        let bed = Bed::start(&["a", "b"], cfg, 1);
        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 200, "{mode}: {}", show(&r));
        assert_eq!(r.json().unwrap()["provider"], "a", "{mode}");
        assert_eq!(
            our_headers(&r),
            Vec::<String>::new(),
            "{mode}: {:?}",
            r.headers
        );

        bed.behave("a", json!({"status": 503, "retry_after": 7}));
        bed.behave("b", json!({"status": 503, "retry_after": 9}));
        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 503, "{mode}: {}", show(&r));
        assert_eq!(r.json().unwrap()["error"]["code"], "all_providers_failed");
        assert_eq!(
            our_headers(&r),
            Vec::<String>::new(),
            "{mode}: {:?}",
            r.headers
        );
        assert_eq!(
            r.header("retry-after"),
            Some("7"),
            "{mode}: {:?}",
            r.headers
        );
    }
}

/// The `all_providers_failed` answer carries the soonest `Retry-After` a provider sent.
#[test]
fn all_providers_failed_carries_the_soonest_retry_after() {
    for mode in MODES {
        let bed = Bed::start(&["a", "b"], config(&["a", "b"], json!({"mode": mode})), 1);
        bed.behave("a", json!({"status": 503, "retry_after": 9}));
        bed.behave("b", json!({"status": 429, "retry_after": 4}));
        let r = bed.chat(MODEL, &[]);
        // The last provider's status (its 429) with the soonest Retry-After.
        assert_eq!(r.status, 429, "{mode}: {}", show(&r));
        assert_eq!(r.json().unwrap()["error"]["code"], "all_providers_failed");
        assert_eq!(
            r.header("retry-after"),
            Some("4"),
            "{mode}: {:?}",
            r.headers
        );
        assert_eq!(r.header("x-market-router-attempts"), Some("2"), "{mode}");
        drop(bed);

        // Without a Retry-After from anyone, none is made up.
        let bed = Bed::start(&["a", "b"], config(&["a", "b"], json!({"mode": mode})), 1);
        bed.behave("a", json!({"status": 503}));
        bed.behave("b", json!({"status": 502}));
        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 502, "{mode}: {}", show(&r));
        assert_eq!(r.header("retry-after"), None, "{mode}: {:?}", r.headers);
    }
}

// ---------------------------------------------------------------------------------------------
// Failover and health
// ---------------------------------------------------------------------------------------------

/// A 503 with `Retry-After: 2` keeps the provider out of rotation for every request for 2 s.
#[test]
fn retry_after_on_a_503_keeps_the_provider_out() {
    for mode in MODES {
        let bed = Bed::start(&["a", "b"], config(&["a", "b"], json!({"mode": mode})), 1);
        bed.behave("a", json!({"status": 503, "retry_after": 2}));
        let sent = Instant::now();
        let r = bed.chat(MODEL, &[]);
        assert_eq!(provider_of(&r), Some("b"), "{mode}: {}", show(&r));
        // The window starts when the 503 comes back, after `sent`: a request answered before
        // `sent` + 2 s was surely handled inside it, however loaded the machine (one answered
        // later only has to succeed), and one that reaches `a` is answered after it.
        bed.behave("a", json!({}));
        let window = Duration::from_millis(2000);
        let mut inside = 0;
        let mut back_at = None;
        loop {
            let r = bed.chat(MODEL, &[]);
            let at = sent.elapsed();
            if provider_of(&r) == Some("a") {
                back_at = Some(at);
                break;
            }
            assert_eq!(provider_of(&r), Some("b"), "{mode}: {}", show(&r));
            if at >= window {
                break;
            }
            assert_eq!(r.header("x-market-router-attempts"), Some("1"), "{mode}");
            inside += 1;
            thread::sleep(Duration::from_millis(100));
        }
        assert!(inside >= 1, "{mode}: no request inside the window");
        assert!(
            back_at.is_some()
                || eventually(Duration::from_secs(6), || {
                    let ok = provider_of(&bed.chat(MODEL, &[])) == Some("a");
                    if ok {
                        back_at = Some(sent.elapsed());
                    }
                    ok
                }),
            "{mode}: a never came back"
        );
        let at = back_at.unwrap();
        // The filter's clock counts whole milliseconds: 2 ms of room for that alone.
        assert!(
            at >= window - Duration::from_millis(2),
            "{mode}: a answered {at:?} after the 503 that asked for 2 s was sent"
        );
        assert_eq!(
            bed.hits("a"),
            2,
            "{mode}: a was tried inside its Retry-After window"
        );
    }
}

/// When health holds back every provider, they are tried anyway, the one free soonest first:
/// logged at warn, and `/route` says `last_resort`.
#[test]
fn last_resort_tries_held_back_providers_soonest_free_first() {
    for mode in HOSTS {
        let bed = Bed::start(&["a", "b"], config(&["a", "b"], json!({"mode": mode})), 1);
        // Both ask for quiet, b for longer.
        bed.behave("a", json!({"status": 503, "retry_after": 30}));
        bed.behave("b", json!({"status": 503, "retry_after": 60}));
        assert_eq!(bed.chat(MODEL, &[]).status, 503, "{mode}");
        bed.behave("a", json!({}));
        bed.behave("b", json!({}));

        let v = route_json(&bed, &format!("model={MODEL}"));
        assert_eq!(v["last_resort"], true, "{mode}: {v}");
        let ranked: Vec<&str> = v["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["provider"].as_str().unwrap())
            .collect();
        assert_eq!(ranked.first(), Some(&"a"), "{mode}: a is free soonest: {v}");

        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 200, "{mode}: {}", show(&r));
        assert_eq!(provider_of(&r), Some("a"), "{mode}: {}", show(&r));
        let warn = bed.log_lines("every provider is held back by health; trying them anyway");
        assert!(!warn.is_empty(), "{mode}: {}", bed.gateway.log_tail(20));
        // The host's word for the level: Envoy's `[warning]`, nginx's `[warn]`.
        let level = if bed.is_kong() { "[warn]" } else { "[warning]" };
        assert!(warn.iter().all(|l| l.contains(level)), "{mode}: {warn:#?}");
    }
}

/// `retry_on: ["4xx"]` fails over on a provider's client error; `retry_on_status` on the
/// listed statuses only.
#[test]
fn retry_on_4xx_and_retry_on_status_fail_over() {
    for mode in MODES {
        let bed = Bed::start(
            &["a", "b"],
            config(
                &["a", "b"],
                json!({"mode": mode, "retry_on": ["5xx", "4xx"]}),
            ),
            1,
        );
        bed.behave("a", json!({"status": 404}));
        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 200, "{mode}: {}", show(&r));
        assert_eq!(provider_of(&r), Some("b"), "{mode}");
        assert_eq!(r.header("x-market-router-attempts"), Some("2"), "{mode}");
        drop(bed);

        let bed = Bed::start(
            &["a", "b"],
            config(&["a", "b"], json!({"mode": mode, "retry_on_status": [409]})),
            1,
        );
        bed.behave("a", json!({"status": 409}));
        let r = bed.chat(MODEL, &[]);
        assert_eq!(provider_of(&r), Some("b"), "{mode}: {}", show(&r));
        assert_eq!(r.header("x-market-router-attempts"), Some("2"), "{mode}");
        // 404 is not listed: a's own error, untouched.
        bed.behave("a", json!({"status": 404}));
        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 404, "{mode}: {}", show(&r));
        assert_eq!(provider_of(&r), Some("a"), "{mode}");
        assert_eq!(bed.hits("b"), 1, "{mode}");
    }
}

/// `forward_client_authorization: true`: the fallback gets the client's authorization.
#[test]
fn forward_client_authorization_reaches_the_fallback() {
    for mode in MODES {
        let cfg = config(
            &["a", "b"],
            json!({"mode": mode, "forward_client_authorization": true}),
        );
        let bed = Bed::start(&["a", "b"], cfg, 1);
        bed.behave("a", json!({"status": 503}));
        let r = bed.chat(MODEL, &[("authorization", "Bearer client-key-42")]);
        assert_eq!(provider_of(&r), Some("b"), "{mode}: {}", show(&r));
        let last = bed.mock("b").last_request().unwrap();
        assert_eq!(
            last["headers"]["authorization"], "Bearer client-key-42",
            "{mode}: the fallback did not get the client's authorization"
        );
        drop(bed);

        // The default: the re-dispatched attempt does not carry it.
        let bed = Bed::start(&["a", "b"], config(&["a", "b"], json!({"mode": mode})), 1);
        bed.behave("a", json!({"status": 503}));
        let r = bed.chat(MODEL, &[("authorization", "Bearer client-key-42")]);
        assert_eq!(provider_of(&r), Some("b"), "{mode}: {}", show(&r));
        let last = bed.mock("b").last_request().unwrap();
        assert!(
            last["headers"].get("authorization").is_none(),
            "{mode}: {last}"
        );
    }
}

/// Route mode: a provider that keeps cutting its answers mid-body trips its circuit.
#[test]
fn repeated_mid_body_cuts_trip_the_circuit_route() {
    let cfg = config(
        &["a", "b"],
        json!({"circuit": {"failure_threshold": 2, "cooldown_ms": 30_000}}),
    );
    let bed = Bed::start(&["a", "b"], cfg, 1);
    bed.behave("a", json!({"reset_mid": true}));
    for _ in 0..2 {
        assert_eq!(bed.chat(MODEL, &[]).status, 502);
    }
    assert_eq!(bed.wait_counter("provider.a.circuit_open", 1), 1);
    let r = bed.chat(MODEL, &[]);
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(provider_of(&r), Some("b"));
    assert_eq!(r.header("x-market-router-attempts"), Some("1"));
    assert_eq!(bed.hits("a"), 2);
}

/// `deadline_ms` cuts the walk: 3000 ms attempts under a 3500 ms deadline, three hanging
/// providers: `a` times out, `b` gets the last 500 ms and is cut at the deadline, `c` is never
/// tried (an attempt given the rest of the deadline that times out spends it, even when the
/// host reports its timeout a millisecond early), and the answer comes at ~3.5 s, not after
/// three whole attempts (9 s).
#[test]
fn the_deadline_cuts_attempts_short() {
    for mode in MODES {
        let hang = || {
            Up::Mock(MockOpts {
                hang: true,
                ..MockOpts::default()
            })
        };
        let bed = Bed::start_spec(
            Spec {
                ups: vec![("a", hang()), ("b", hang()), ("c", hang())],
                config: config(
                    &["a", "b", "c"],
                    json!({"mode": mode, "attempt_timeout_ms": 3000, "deadline_ms": 3500}),
                ),
                snapshot: None,
                concurrency: 1,
                sidecar_path: None,
            },
            |c| c,
        );
        let start = Instant::now();
        let r = bed.chat(MODEL, &[]);
        let took = start.elapsed();
        assert_eq!(r.status, 504, "{mode}: {}", show(&r));
        let msg = r.json().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            msg,
            format!("all 2 attempt(s) for model `{MODEL}` failed: a: timeout; b: timeout"),
            "{mode}"
        );
        assert!(took >= Duration::from_millis(3400), "{mode}: {took:?}");
        // Three whole attempts would take 9 s; 3.5 s of room for a loaded machine.
        assert!(took < Duration::from_millis(7000), "{mode}: {took:?}");
        assert_eq!(
            (bed.hits("a"), bed.hits("b"), bed.hits("c")),
            (1, 1, 0),
            "{mode}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

/// `fastest` ranks on the market median, raised to the observed time to first byte of
/// streaming answers once that is worse.
#[test]
fn fastest_is_raised_by_the_observed_streaming_ttfb() {
    for mode in HOSTS {
        fastest_is_raised_by_the_observed_streaming_ttfb_in(mode);
    }
}

fn fastest_is_raised_by_the_observed_streaming_ttfb_in(mode: &str) {
    let mut fast = static_provider("f", MODEL, 1.0);
    fast["static_offer"]["latency_ms"]["ttft_p50"] = json!(100);
    let mut slow = static_provider("s", MODEL, 1.0);
    slow["static_offer"]["latency_ms"]["ttft_p50"] = json!(400);
    let cfg = json!({"providers": [fast, slow], "routing": {"strategy": "fastest"},
                     "failover": {"mode": mode}});
    let bed = Bed::start_spec(
        Spec {
            ups: vec![
                // Headers (the first byte) after 900 ms.
                ("f", Up::Mock(MockOpts::default().latency_ms(900))),
                ("s", Up::Mock(MockOpts::default())),
            ],
            config: cfg,
            snapshot: None,
            concurrency: 1,
            sidecar_path: None,
        },
        |c| c,
    );
    let mut body = chat_body(MODEL);
    body["stream"] = json!(true);
    // On the medians, f first; its answers start after 900 ms.
    for _ in 0..3 {
        let r = bed.post("/v1/chat/completions", &[], &body);
        assert_eq!(provider_of(&r), Some("f"), "{mode}: {}", show(&r));
    }
    let v = route_json(&bed, &format!("model={MODEL}"));
    let first = &v["candidates"][0];
    assert_eq!(first["provider"], "s", "{mode}: {v}");
    let f = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["provider"] == "f")
        .unwrap();
    let ttft = f["ttft_ms"].as_f64().unwrap();
    assert!(
        ttft >= 800.0,
        "{mode}: f's ttft_ms {ttft} is not the observed ~900: {v}"
    );
    let r = bed.post("/v1/chat/completions", &[], &body);
    assert_eq!(provider_of(&r), Some("s"), "{mode}: {}", show(&r));
}

/// `routing.default_output_tokens` prices a request without `max_tokens`: with few output
/// tokens assumed the cheap-input provider wins, with many the cheap-output one.
#[test]
fn default_output_tokens_prices_requests_without_max_tokens() {
    let priced = |name: &str, input: f64, output: f64| {
        let mut p = static_provider(name, MODEL, 1.0);
        p["static_offer"]["price"] = json!({"input_per_mtok": input, "output_per_mtok": output});
        p
    };
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]});
    for (mode, tokens, winner) in [
        ("route", 1, "x"),
        ("route", 1000, "y"),
        (KONG, 1, "x"),
        (KONG, 1000, "y"),
    ] {
        let cfg = json!({
            "providers": [priced("x", 0.1, 10.0), priced("y", 10.0, 1.0)],
            "routing": {"strategy": "cheapest", "default_output_tokens": tokens},
            "failover": {"mode": mode}
        });
        let bed = Bed::start(&["x", "y"], cfg, 1);
        let v = route_json(&bed, &format!("model={MODEL}&input_tokens=10"));
        assert_eq!(v["assumed_tokens"]["output"], tokens, "{v}");
        let r = bed.post("/v1/chat/completions", &[], &body);
        assert_eq!(
            provider_of(&r),
            Some(winner),
            "{mode}: default_output_tokens {tokens}: {}",
            show(&r)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Market data
// ---------------------------------------------------------------------------------------------

/// A market bed: providers `a` and `b` serving `models`, the sidecar serving `snap`, the
/// filter in failover mode `mode`.
fn market_bed(
    mode: &str,
    models: &[&str],
    snap: Value,
    extra: Value,
    sidecar_path: Option<&str>,
) -> Bed {
    let mut cfg = json!({
        "providers": [market_provider("a", models), market_provider("b", models)],
        "market": market_section(200),
        "routing": {"strategy": "cheapest"},
        "failover": {"mode": mode}
    });
    for (k, v) in extra.as_object().unwrap() {
        if k == "market" {
            for (mk, mv) in v.as_object().unwrap() {
                cfg["market"][mk] = mv.clone();
            }
        } else {
            cfg[k] = v.clone();
        }
    }
    Bed::start_spec(
        Spec {
            ups: vec![
                ("a", Up::Mock(MockOpts::default())),
                ("b", Up::Mock(MockOpts::default())),
            ],
            config: cfg,
            snapshot: Some(snap),
            concurrency: 1,
            sidecar_path,
        },
        |c| c,
    )
}

fn wait_offers(bed: &Bed, prefix: &str, n: u64) -> Value {
    let mut last = Value::Null;
    let ok = eventually(Duration::from_secs(10), || {
        last = bed
            .get(&format!("{prefix}/route?model={MODEL}"))
            .json()
            .unwrap_or(Value::Null);
        last["snapshot"]["offers"] == n
    });
    assert!(
        ok,
        "no snapshot of {n} offers: {last}\n{}",
        bed.gateway.log_tail(20)
    );
    last
}

/// A snapshot over `limits.max_snapshot_bytes` is refused: counted, logged, last good kept.
#[test]
fn max_snapshot_bytes_refuses_a_big_snapshot() {
    for mode in HOSTS {
        max_snapshot_bytes_refuses_a_big_snapshot_in(mode);
    }
}

fn max_snapshot_bytes_refuses_a_big_snapshot_in(mode: &str) {
    let extra: Vec<String> = (0..40).map(|i| format!("extra-model-{i}")).collect();
    let mut models = vec![MODEL];
    models.extend(extra.iter().map(String::as_str));
    let small = snapshot(&[offer("a", MODEL, 0.1, 0.1), offer("b", MODEL, 1.0, 1.0)]);
    let bed = market_bed(
        mode,
        &models,
        small,
        json!({"limits": {"max_snapshot_bytes": 2048}}),
        None,
    );
    wait_offers(&bed, "/market-router/v1", 2);
    assert_eq!(bed.routed(MODEL, &[]), "a", "{mode}");
    let failed_before = bed.counter_on_envoy("snapshot.refresh_failed");

    // 82 offers, b now cheapest: far over 2048 bytes once stored.
    let mut offers = vec![offer("a", MODEL, 5.0, 5.0), offer("b", MODEL, 0.1, 0.1)];
    for m in &extra {
        offers.push(offer("a", m, 1.0, 1.0));
        offers.push(offer("b", m, 1.0, 1.0));
    }
    bed.write(&snapshot(&offers));
    assert!(
        eventually(Duration::from_secs(10), || {
            // Refused once stored, or (over 8x the limit) before it is read.
            !bed.log_lines("limits.max_snapshot_bytes (2048)").is_empty()
        }),
        "no refusal logged: {}",
        bed.gateway.log_tail(20)
    );
    if let (Some(after), Some(before)) = (
        bed.counter_on_envoy("snapshot.refresh_failed"),
        failed_before,
    ) {
        assert!(
            after > before,
            "{mode}: snapshot.refresh_failed {before} -> {after}"
        );
    }
    let v = route_json(&bed, &format!("model={MODEL}"));
    assert_eq!(v["snapshot"]["offers"], 2, "{mode}: {v}");
    assert_eq!(
        bed.routed(MODEL, &[]),
        "a",
        "{mode}: the refused snapshot moved traffic"
    );
}

/// The gauges `snapshot.offers` and `snapshot.age_ms` describe the snapshot in use.
#[test]
fn snapshot_gauges_report_offers_and_age() {
    let mut snap = snapshot(&[
        offer("a", MODEL, 0.1, 0.1),
        offer("b", MODEL, 1.0, 1.0),
        offer("b", "other-model", 1.0, 1.0),
    ]);
    snap["generated_at_ms"] = json!(now_ms() - 60_000);
    let bed = market_bed("route", &[MODEL, "other-model"], snap, json!({}), None);
    wait_offers(&bed, "/market-router/v1", 3);
    let gauge = |name: &str| {
        bed.envoy()
            .stat(&format!("wasmcustom.market_router.snapshot.{name}"))
            .unwrap()
            .unwrap_or_else(|| panic!("no gauge snapshot.{name}"))
    };
    assert!(
        eventually(Duration::from_secs(5), || gauge("offers") == 3),
        "snapshot.offers = {}",
        gauge("offers")
    );
    let age = gauge("age_ms");
    assert!((60_000..600_000).contains(&age), "snapshot.age_ms = {age}");
}

/// `market.path` and `market.authority` shape the snapshot request; `shared_data_prefix`
/// renames the keys the fetching VM writes and the workers read (two workers route on it).
#[test]
fn market_path_authority_and_shared_data_prefix_are_used() {
    for mode in HOSTS {
        market_path_authority_and_shared_data_prefix_are_used_in(mode);
    }
}

fn market_path_authority_and_shared_data_prefix_are_used_in(mode: &str) {
    let snap = snapshot(&[offer("a", MODEL, 1.0, 1.0), offer("b", MODEL, 0.1, 0.1)]);
    let extra = json!({
        "market": {"path": "/feeds/llm-market.json", "authority": "market.internal"},
        "shared_data_prefix": "edge-7"
    });
    let mut bed = market_bed(mode, &[MODEL], snap, extra, Some("/feeds/llm-market.json"));
    wait_offers(&bed, "/market-router/v1", 2);
    let stats = bed.sidecar.as_ref().unwrap().stats().unwrap();
    assert_eq!(stats["last_headers"]["host"], "market.internal", "{stats}");
    for _ in 0..6 {
        assert_eq!(bed.routed(MODEL, &[]), "b");
    }
    // The sidecar at the default path only: nothing is loaded.
    drop(bed.sidecar.take());
    let snap = snapshot(&[offer("a", MODEL, 1.0, 1.0), offer("b", MODEL, 0.1, 0.1)]);
    let other = market_bed(
        mode,
        &[MODEL],
        snap,
        json!({"market": {"path": "/feeds/llm-market.json"}}),
        None,
    );
    // The filter says why it has no snapshot: Envoy's counter, the log line on both hosts.
    assert!(
        eventually(Duration::from_secs(10), || {
            !other.log_lines("market refresh failed").is_empty()
        }),
        "{mode}: no refresh failure logged: {}",
        other.gateway.log_tail(20)
    );
    let v = route_json(&other, &format!("model={MODEL}"));
    assert_eq!(v["snapshot"]["offers"], 0, "{mode}: {v}");
    assert!(other
        .counter_on_envoy("snapshot.refresh_failed")
        .is_none_or(|n| n >= 1));
}

// ---------------------------------------------------------------------------------------------
// Host wiring
// ---------------------------------------------------------------------------------------------

/// A custom `explain.path_prefix` serves the endpoints there, and the default prefix is then
/// an ordinary path.
#[test]
fn custom_explain_path_prefix() {
    for mode in HOSTS {
        let mut cfg = config(&["a", "b"], json!({"mode": mode}));
        cfg["explain"] = json!({"path_prefix": "/ops/router"});
        let bed = Bed::start(&["a", "b"], cfg, 1);
        let r = bed.get("/ops/router/models");
        assert_eq!(r.status, 200, "{mode}: {}", r.text());
        let m = r.json().unwrap();
        assert_eq!(m["object"], "list", "{mode}: {m}");
        assert_eq!(m["data"][0]["id"], MODEL, "{mode}: {m}");
        let v = route_json_at(&bed, "/ops/router", &format!("model={MODEL}"));
        assert_eq!(v["candidates"][0]["provider"], "a", "{mode}: {v}");
        let r = bed.get("/market-router/v1/models");
        let answered_by_filter = r
            .json()
            .map(|v| v["object"] == "list" && v["data"].is_array())
            .unwrap_or(false);
        assert!(
            !answered_by_filter,
            "{mode}: the default prefix still answers: {}",
            r.text()
        );
    }
}

fn route_json_at(bed: &Bed, prefix: &str, query: &str) -> Value {
    let r = bed.get(&format!("{prefix}/route?{query}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

/// `routing.cluster_header` names the header the host's route reads.
#[test]
fn custom_cluster_header_routes() {
    let mut cfg = config(&["a", "b"], json!({}));
    cfg["routing"]["cluster_header"] = json!("x-upstream-pick");
    let bed = Bed::start_spec(
        Spec {
            ups: vec![
                ("a", Up::Mock(MockOpts::default())),
                ("b", Up::Mock(MockOpts::default())),
            ],
            config: cfg,
            snapshot: None,
            concurrency: 1,
            sidecar_path: None,
        },
        |c| c.cluster_header("x-upstream-pick"),
    );
    assert_eq!(bed.routed(MODEL, &[]), "a");
    // The filter sets the header the route reads: the client's own value does not win.
    assert_eq!(bed.routed(MODEL, &[("x-upstream-pick", "provider_b")]), "a");
    assert_eq!((bed.hits("a"), bed.hits("b")), (2, 0));
}

/// Dispatch mode sends `providers[].headers` and `providers[].authority` with every attempt.
#[test]
fn provider_headers_and_authority_in_dispatch_mode() {
    for mode in ["dispatch", KONG] {
        let mut cfg = config(&["a", "b"], json!({"mode": mode}));
        cfg["providers"][0]["headers"] = json!({"x-tenant": "t-17", "api-key": "k-a"});
        cfg["providers"][0]["authority"] = json!("api.a.example");
        cfg["providers"][1]["headers"] = json!({"x-tenant": "t-18"});
        let bed = Bed::start(&["a", "b"], cfg, 1);
        assert_eq!(bed.routed(MODEL, &[]), "a", "{mode}");
        let h = bed.mock("a").last_request().unwrap()["headers"].clone();
        assert_eq!(h["x-tenant"], "t-17", "{mode}: {h}");
        assert_eq!(h["api-key"], "k-a", "{mode}: {h}");
        assert_eq!(h["host"], "api.a.example", "{mode}: {h}");
        // The fallback gets its own headers, not a's.
        bed.behave("a", json!({"status": 503}));
        assert_eq!(bed.routed(MODEL, &[]), "b", "{mode}");
        let h = bed.mock("b").last_request().unwrap()["headers"].clone();
        assert_eq!(h["x-tenant"], "t-18", "{mode}: {h}");
        assert!(h.get("api-key").is_none(), "{mode}: {h}");
        // The cluster: Envoy's name for it, the provider's address on Kong.
        let cluster = if bed.is_kong() {
            format!("127.0.0.1:{}", bed.mock("b").port())
        } else {
            "provider_b".to_string()
        };
        assert_eq!(
            h["host"], cluster,
            "{mode}: authority defaults to the cluster: {h}"
        );
    }
}

/// Dispatch mode sends `providers[].scheme` as the attempt's `:scheme` (seen by a provider
/// reached over HTTP/2, where the pseudo-header travels); `http` when not set.
#[test]
fn provider_scheme_in_dispatch_mode() {
    let mut cfg = config(&["a", "b"], json!({"mode": "dispatch"}));
    cfg["providers"][0]["scheme"] = json!("https");
    let bed = Bed::start_spec(
        Spec {
            ups: vec![
                ("a", Up::MockH2c(MockOpts::default())),
                ("b", Up::MockH2c(MockOpts::default())),
            ],
            config: cfg,
            snapshot: None,
            concurrency: 1,
            sidecar_path: None,
        },
        |c| c,
    );
    assert_eq!(bed.routed(MODEL, &[]), "a");
    let last = bed.mock("a").last_request().unwrap();
    assert_eq!(last["http2"], true, "{last}");
    assert_eq!(last["scheme"], "https", "{last}");
    // The fallback's attempt carries its own scheme.
    bed.behave("a", json!({"status": 503}));
    assert_eq!(bed.routed(MODEL, &[]), "b");
    let last = bed.mock("b").last_request().unwrap();
    assert_eq!(last["http2"], true, "{last}");
    assert_eq!(last["scheme"], "http", "{last}");
}
