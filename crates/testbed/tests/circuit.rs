//! The circuit breaker's half-open state through a real Envoy, in both failover modes, on one
//! worker and on four, and in Kong's wasm host (dispatch mode, one nginx worker and two: the
//! `_kong` twins): after the cooldown exactly one request probes the provider however many
//! arrive at once, and a failed probe opens the circuit again for a whole cooldown.
//!
//! Needs the filter module (`make build`), the example binaries (`cargo build --examples`) and
//! Envoy (`make envoy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/bed.rs"]
mod bed;
use market_router_testbed as common;

use bed::*;
use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const MODEL: &str = "gpt-4o-mini";

/// Three providers, `a` cheapest, then `b`, then `c`; the `cheapest` strategy.
fn config(mode: &str, attempt_timeout_ms: u64, threshold: u32, cooldown_ms: u64) -> Value {
    json!({
        "providers": [
            static_provider("a", MODEL, 0.1),
            static_provider("b", MODEL, 0.5),
            static_provider("c", MODEL, 2.0),
        ],
        "routing": {"strategy": "cheapest"},
        "failover": {
            "mode": mode,
            "max_attempts": 3,
            "attempt_timeout_ms": attempt_timeout_ms,
            "deadline_ms": attempt_timeout_ms * 3,
            "circuit": {"failure_threshold": threshold, "cooldown_ms": cooldown_ms}
        }
    })
}

/// Opens `a`'s circuit with `threshold` failed requests (each answered by `b`); returns when
/// the last one was sent and when it was answered.
fn open_circuit(bed: &Bed, threshold: u64) -> Opened {
    bed.behave("a", json!({"status": 503}));
    let mut from = Instant::now();
    for _ in 0..threshold {
        from = Instant::now();
        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(
            r.header("x-market-router-provider"),
            Some("b"),
            "{}",
            show(&r)
        );
    }
    let by = Instant::now();
    assert_eq!(bed.hits("a"), threshold);
    assert_eq!(bed.wait_circuit_opened("a", 1), 1);
    // Other workers re-read the shared health table at most every 20 ms (HEALTH_CHECK_MS):
    // give them that before the next request, which any worker may take.
    thread::sleep(Duration::from_millis(60));
    Opened { from, by }
}

/// When a circuit opened, as seen from here: while the request that opened it was in flight.
struct Opened {
    /// Before that request was sent: the cooldown ends no sooner than this + the cooldown.
    from: Instant,
    /// After its answer came back: the cooldown ends no later than this + the cooldown.
    by: Instant,
}

/// The filter reads the host's clock in whole milliseconds: a cooldown it ends may end up to
/// this much before the same span measured here.
const FILTER_CLOCK: Duration = Duration::from_millis(2);

/// `mode` in Envoy with `workers` worker threads, or (`kong`) dispatch mode in Kong's wasm
/// host with `workers` nginx workers.
fn start(mode: &str, config: Value, workers: u32) -> Bed {
    if mode == "kong" {
        Bed::start_kong(&["a", "b", "c"], config, workers as usize)
    } else {
        Bed::start(&["a", "b", "c"], config, workers)
    }
}

/// One request of a burst: when it was sent, when it was answered, who answered.
struct Shot {
    sent: Instant,
    done: Instant,
    provider: String,
    attempts: String,
}

fn burst(bed: &Bed, n: usize) -> Vec<Shot> {
    let url = bed.gateway.url("/v1/chat/completions");
    let go = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (url, go) = (url.clone(), Arc::clone(&go));
            thread::spawn(move || {
                go.wait();
                let sent = Instant::now();
                let r = common::post_json(&url, &[], &chat_body(MODEL), T).unwrap();
                let done = Instant::now();
                assert_eq!(r.status, 200, "{}", show(&r));
                Shot {
                    sent,
                    done,
                    provider: r.header("x-market-router-provider").unwrap().to_string(),
                    attempts: r.header("x-market-router-attempts").unwrap().to_string(),
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// After the cooldown, a burst of concurrent requests: one probes `a` (slow but healthy
/// now), every other request sent while the probe is in flight goes to `b`, and once the
/// probe succeeded the circuit is closed.
fn one_request_probes_a_half_open_circuit(mode: &str, workers: u32) {
    const COOLDOWN_MS: u64 = 1500;
    const PROBE_LATENCY_MS: u64 = 1500;
    const BURST: usize = 8;
    let bed = start(mode, config(mode, 4000, 2, COOLDOWN_MS), workers);
    let opened = open_circuit(&bed, 2).by;

    // Healthy again, but slow: the probe stays in flight while the burst arrives.
    bed.behave("a", json!({"latency_ms": PROBE_LATENCY_MS}));
    let wait = Duration::from_millis(COOLDOWN_MS + 200).saturating_sub(opened.elapsed());
    thread::sleep(wait);
    let shots = burst(&bed, BURST);

    let probes: Vec<&Shot> = shots.iter().filter(|s| s.provider == "a").collect();
    assert!(!probes.is_empty(), "nobody probed a after the cooldown");
    let probe_done = probes.iter().map(|s| s.done).min().unwrap();
    // Requests sent before the probe's answer came back: only the probe itself may reach a.
    let during: Vec<&Shot> = shots.iter().filter(|s| s.sent < probe_done).collect();
    let to_a = during.iter().filter(|s| s.provider == "a").count();
    let summary: Vec<(String, String)> = shots
        .iter()
        .map(|s| (s.provider.clone(), s.attempts.clone()))
        .collect();
    assert!(
        during.len() >= BURST / 2,
        "only {} of {BURST} requests were sent while the probe was in flight: {summary:?}",
        during.len()
    );
    assert_eq!(
        to_a, 1,
        "{to_a} requests reached a while its circuit was half-open: {summary:?}"
    );
    for s in during.iter().filter(|s| s.provider != "a") {
        assert_eq!(
            (s.provider.as_str(), s.attempts.as_str()),
            ("b", "1"),
            "{summary:?}"
        );
    }
    // The mock agrees: two failures, then one probe (and whatever was sent after it).
    let later_to_a = shots
        .iter()
        .filter(|s| s.sent >= probe_done && s.provider == "a");
    assert_eq!(bed.hits("a"), 3 + later_to_a.count() as u64, "{summary:?}");

    // The probe succeeded: the circuit is closed, `a` is the primary again.
    let r = bed.chat(MODEL, &[]);
    assert_eq!(
        r.header("x-market-router-provider"),
        Some("a"),
        "{}",
        show(&r)
    );
    assert_eq!(bed.wait_circuit_opened("a", 1), 1);
    assert_eq!(bed.hits("c"), 0);
}

#[test]
fn one_request_probes_a_half_open_circuit_route() {
    one_request_probes_a_half_open_circuit("route", 1);
}

#[test]
fn one_request_probes_a_half_open_circuit_dispatch() {
    one_request_probes_a_half_open_circuit("dispatch", 1);
}

#[test]
fn one_request_probes_a_half_open_circuit_kong() {
    one_request_probes_a_half_open_circuit("kong", 1);
}

#[test]
fn one_request_probes_a_half_open_circuit_across_two_kong_workers() {
    one_request_probes_a_half_open_circuit("kong", 2);
}

#[test]
fn one_request_probes_a_half_open_circuit_across_four_workers() {
    one_request_probes_a_half_open_circuit("route", 4);
}

/// `a` keeps failing: the probe after the cooldown fails (the request is answered by `b`),
/// the circuit opens again (counted and logged a second time), and `a` is left alone for
/// another whole cooldown before the next probe.
fn a_failed_probe_reopens_the_circuit(mode: &str, workers: u32) {
    // Long enough that a loaded machine answers a request or two inside the second cooldown.
    const COOLDOWN_MS: u64 = 4000;
    let bed = start(mode, config(mode, 500, 2, COOLDOWN_MS), workers);
    let opened = open_circuit(&bed, 2).from;

    // Requests until one probes `a` (a third hit), answered by `b` after failing over.
    let mut probe = None;
    let probed = eventually(Duration::from_millis(COOLDOWN_MS + 5000), || {
        let sent = Instant::now();
        let r = bed.chat(MODEL, &[]);
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(
            r.header("x-market-router-provider"),
            Some("b"),
            "{}",
            show(&r)
        );
        if bed.hits("a") == 3 {
            probe = Some((sent, opened.elapsed(), r));
            true
        } else {
            false
        }
    });
    assert!(probed, "a was never probed after its cooldown");
    let (probe_sent, after, r) = probe.unwrap();
    assert!(
        // Handled after the cooldown, which began after `opened`; answered later still.
        after >= Duration::from_millis(COOLDOWN_MS) - FILTER_CLOCK,
        "a was probed {} ms after its circuit opened (cooldown {COOLDOWN_MS} ms)",
        after.as_millis()
    );
    assert_eq!(
        r.header("x-market-router-attempts"),
        Some("2"),
        "{}",
        show(&r)
    );

    // Reopened while the probe was in flight, so until at least `probe_sent` + a cooldown:
    // every request answered before that skips `a` (one attempt, at `b`), however loaded the
    // machine.
    let cooldown = Duration::from_millis(COOLDOWN_MS) - FILTER_CLOCK;
    let mut skipped = 0;
    let late = loop {
        let r = bed.chat(MODEL, &[]);
        if probe_sent.elapsed() >= cooldown {
            break r;
        }
        assert_eq!(
            r.header("x-market-router-provider"),
            Some("b"),
            "{}",
            show(&r)
        );
        assert_eq!(
            r.header("x-market-router-attempts"),
            Some("1"),
            "{}",
            show(&r)
        );
        skipped += 1;
        thread::sleep(Duration::from_millis(50));
    };
    assert!(skipped >= 1, "no request while the circuit was open again");
    // The mock agrees: nothing reached `a` but the probe, and perhaps the last request (sent
    // near the end of the new cooldown: a second probe, failing over to `b`).
    assert_eq!(late.status, 200, "{}", show(&late));
    let second_probe = u64::from(late.header("x-market-router-attempts") == Some("2"));
    assert_eq!(
        bed.hits("a"),
        3 + second_probe,
        "a was tried again before a new cooldown passed"
    );
    // Opened twice (and once more if the last request's probe failed).
    let opens = 2 + second_probe;
    assert_eq!(bed.wait_circuit_opened("a", opens), opens);
    let warnings = bed.log_lines("circuit opened for provider a");
    assert_eq!(warnings.len() as u64, opens, "{warnings:#?}");
    let level = if bed.is_kong() { "[warn]" } else { "[warning]" };
    assert!(warnings.iter().all(|l| l.contains(level)), "{warnings:#?}");
    assert_eq!(bed.hits("c"), 0);
}

#[test]
fn a_failed_probe_reopens_the_circuit_route() {
    a_failed_probe_reopens_the_circuit("route", 1);
}

#[test]
fn a_failed_probe_reopens_the_circuit_dispatch() {
    a_failed_probe_reopens_the_circuit("dispatch", 1);
}

#[test]
fn a_failed_probe_reopens_the_circuit_across_four_workers() {
    a_failed_probe_reopens_the_circuit("dispatch", 4);
}

#[test]
fn a_failed_probe_reopens_the_circuit_kong() {
    a_failed_probe_reopens_the_circuit("kong", 1);
}

#[test]
fn a_failed_probe_reopens_the_circuit_across_two_kong_workers() {
    a_failed_probe_reopens_the_circuit("kong", 2);
}
