//! The market refresh on every path the real-host suites drive it (selection, market-sidecar,
//! fleet): the slot taken by one VM of the process, the fetch and its answers, the failure
//! streak, staleness, the report and its answer, on Envoy's and Kong's CAS rules.

use super::*;
use crate::host::{HostError, MockHost};
use crate::shared;
use crate::test_support;
use std::cell::Cell;

const T0: u64 = 1_800_000_000_000;
const OBS: &str = "mr/obs";

const KEYS: Keys<'static> = Keys {
    market: "mr/market",
    market_gen: "mr/market_gen",
    market_due: "mr/market_due",
    market_status: "mr/market_status",
    market_stale: "mr/market_stale",
};

fn config(extra: &str) -> Config {
    test_support::config(
        2,
        &format!(
            r#","market":{{"cluster":"s","authority":"mkt","path":"/snap","refresh_ms":1000,"max_age_ms":5000,"timeout_ms":700{extra}}}"#
        ),
    )
}

fn hosts() -> [MockHost; 2] {
    [MockHost::envoy(), MockHost::kong()]
}

/// A snapshot document with one offer of provider `a` and one of an unconfigured provider.
fn snapshot(generated_at_ms: u64) -> Vec<u8> {
    let offer = |p: &str| {
        format!(
            r#"{{"provider":"{p}","model":"m","price":{{"input_per_mtok":1,"output_per_mtok":2}},"latency_ms":{{"ttft_p50":300}},"uptime":0.99,"availability":"online","provider_type":"company"}}"#
        )
    };
    format!(
        r#"{{"version":1,"generated_at_ms":{generated_at_ms},"offers":[{},{}]}}"#,
        offer("a"),
        offer("zz")
    )
    .into_bytes()
}

fn status(s: &str) -> Vec<(String, String)> {
    vec![(":status".to_string(), s.to_string())]
}

fn generation(h: &MockHost) -> u64 {
    read_u64(&h.value(KEYS.market_gen).unwrap_or_default())
}

/// A tick with no snapshot held and nothing to report; its effects.
fn tick(r: &mut Refresh, h: &MockHost, c: &Config, now: u64) -> (bool, Vec<Effect>) {
    let mut fx = Vec::new();
    let took = r.tick(h, c, &KEYS, now, None, || None, &mut |e| fx.push(e));
    (took, fx)
}

/// The snapshot answer `headers` with `body` at T0; its effects and whether the body was read.
fn answer(h: &MockHost, c: &Config, a: Answer<'_>, body: &[u8]) -> (Vec<Effect>, bool) {
    let read = Cell::new(false);
    let mut fx = Vec::new();
    on_snapshot(
        h,
        c,
        &KEYS,
        &a,
        |n| {
            read.set(true);
            assert_eq!(n, a.body_size);
            Some(body.to_vec())
        },
        T0,
        &mut |e| fx.push(e),
    );
    (fx, read.get())
}

/// An answer of status `s` announcing `body_size` bytes, with `body`.
fn answer_with(
    h: &MockHost,
    c: &Config,
    s: &str,
    body_size: usize,
    body: &[u8],
) -> (Vec<Effect>, bool) {
    let headers = status(s);
    let a = Answer {
        headers: &headers,
        body_size,
        ..Answer::default()
    };
    answer(h, c, a, body)
}

fn ok(h: &MockHost, c: &Config, body: &[u8]) -> Vec<Effect> {
    answer_with(h, c, "200", body.len(), body).0
}

fn logs(fx: &[Effect]) -> Vec<(Level, &str)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Log(l, s) => Some((*l, s.as_str())),
            Effect::Count(..) => None,
        })
        .collect()
}

fn count(fx: &[Effect], g: Global) -> u64 {
    fx.iter()
        .map(|e| match e {
            Effect::Count(c, n) if *c == g => *n,
            _ => 0,
        })
        .sum()
}

#[test]
fn ticks_are_a_quarter_of_the_refresh_period_within_50_to_250_ms() {
    let period = |extra: &str| tick_period_ms(&test_support::config(1, extra));
    assert_eq!(period(""), 250);
    assert_eq!(period(r#","market":{"cluster":"s","refresh_ms":400}"#), 100);
    assert_eq!(period(r#","market":{"cluster":"s","refresh_ms":100}"#), 50);
    assert_eq!(
        period(r#","market":{"cluster":"s","refresh_ms":5000}"#),
        250
    );
    assert_eq!(
        period(r#","market":{"cluster":"s","refresh_ms":1003}"#),
        250
    );
    assert_eq!(period(r#","market":{"cluster":"s","refresh_ms":999}"#), 249);
}

#[test]
fn the_slot_is_created_due_at_once_and_never_reset() {
    for h in hosts() {
        create_slot(&h, &KEYS);
        assert_eq!(h.value(KEYS.market_due).unwrap(), 0u64.to_le_bytes());
        let later = (T0 + 5).to_le_bytes();
        shared_set(&h, KEYS.market_due, &later, None).unwrap();
        create_slot(&h, &KEYS);
        assert_eq!(h.value(KEYS.market_due).unwrap(), later);
    }
}

#[test]
fn one_vm_takes_the_slot_and_fetches_the_others_wait_for_the_next_period() {
    let c = config("");
    for h in hosts() {
        create_slot(&h, &KEYS);
        let (mut first, mut second) = (Refresh::default(), Refresh::default());
        let (took, fx) = tick(&mut first, &h, &c, T0);
        assert!(took && fx.is_empty() && first.fetching());
        assert_eq!(h.value(KEYS.market_due).unwrap(), (T0 + 1000).to_le_bytes());
        let calls = h.dispatched();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].cluster, "s");
        assert_eq!(calls[0].timeout_ms, 700);
        assert!(calls[0].body.is_empty());
        let want: Vec<(String, String)> = [
            (":method", "GET"),
            (":path", "/snap"),
            (":authority", "mkt"),
            ("accept", "application/json"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(calls[0].headers, want);
        // Another worker in the same period: the slot is taken.
        assert!(!tick(&mut second, &h, &c, T0 + 999).0);
        assert_eq!(h.dispatched().len(), 1);
        // Due again at exactly refresh_ms later: the first to tick takes it.
        assert!(tick(&mut second, &h, &c, T0 + 1000).0);
        assert_eq!(h.dispatched().len(), 2);
        assert_eq!(h.value(KEYS.market_due).unwrap(), (T0 + 2000).to_le_bytes());
    }
}

#[test]
fn a_slot_lost_to_a_concurrent_write_is_no_fetch() {
    let c = config("");
    let h = MockHost::envoy()
        .with_value(KEYS.market_due, &0u64.to_le_bytes())
        .with_conflicts(1);
    let mut r = Refresh::default();
    assert!(!tick(&mut r, &h, &c, T0).0);
    assert!(h.dispatched().is_empty() && !r.fetching());
    // Unreadable slot: no fetch either.
    let h = MockHost::envoy().refusing_reads(HostError::InternalFailure);
    assert!(!tick(&mut r, &h, &c, T0).0);
    assert!(h.dispatched().is_empty());
}

#[test]
fn no_new_fetch_while_one_is_in_flight_and_none_without_a_market() {
    let c = config("");
    let h = MockHost::envoy();
    create_slot(&h, &KEYS);
    let mut r = Refresh::default();
    assert!(tick(&mut r, &h, &c, T0).0);
    assert!(!tick(&mut r, &h, &c, T0 + 5000).0);
    assert_eq!(h.dispatched().len(), 1);
    // The slot stays due for whoever ticks next.
    assert_eq!(h.value(KEYS.market_due).unwrap(), (T0 + 1000).to_le_bytes());
    assert_eq!(r.answered(1), Call::Snapshot);
    assert!(!r.fetching());
    assert!(tick(&mut r, &h, &c, T0 + 5000).0);

    let none = test_support::config(1, "");
    let h = MockHost::envoy();
    create_slot(&h, &KEYS);
    assert!(!tick(&mut Refresh::default(), &h, &none, T0).0);
    assert!(h.dispatched().is_empty());
}

#[test]
fn the_fetch_is_conditional_on_the_held_snapshots_etag() {
    let c = config("");
    let h = MockHost::envoy();
    create_slot(&h, &KEYS);
    let held = Held {
        age_ms: 10,
        etag: Some("\"v7\""),
    };
    let mut r = Refresh::default();
    assert!(r.tick(&h, &c, &KEYS, T0, Some(held), || None, &mut |_| {}));
    let call = &h.dispatched()[0];
    assert_eq!(
        call.headers.last().unwrap(),
        &("if-none-match".to_string(), "\"v7\"".to_string())
    );
}

#[test]
fn a_good_snapshot_is_stored_and_its_generation_bumped() {
    let c = config("");
    for h in hosts() {
        let fx = ok(&h, &c, &snapshot(T0 - 100));
        let stored = Stored::decode(&h.value(KEYS.market).unwrap()).unwrap();
        assert_eq!(stored.offers.len(), 1);
        assert_eq!(stored.offers[0].provider, "a");
        assert_eq!(
            (stored.generated_at_ms, stored.fetched_at_ms),
            (T0 - 100, T0)
        );
        assert_eq!(generation(&h), 1);
        assert_eq!(h.value(KEYS.market_status).unwrap(), b"ok");
        assert_eq!(count(&fx, Global::RefreshOk), 1);
        assert_eq!(count(&fx, Global::RefreshFailed), 0);
        assert_eq!(
            logs(&fx),
            [
                (
                    Level::Debug,
                    "market-router: ignored 1 offer(s) of unconfigured providers"
                ),
                (
                    Level::Info,
                    &*format!(
                        "market-router: market snapshot updated: 1 offers, generated_at_ms {}",
                        T0 - 100
                    )
                ),
            ]
        );
        // Each stored snapshot moves the generation on by one.
        ok(&h, &c, &snapshot(T0));
        ok(&h, &c, &snapshot(T0 + 1));
        assert_eq!(generation(&h), 3);
    }
}

#[test]
fn the_etag_of_a_stored_snapshot_is_kept_for_the_next_fetch() {
    let c = config("");
    let h = MockHost::envoy();
    let mut headers = status("200");
    headers.push(("etag".to_string(), "\"g1\"".to_string()));
    let body = snapshot(T0);
    let a = Answer {
        headers: &headers,
        body_size: body.len(),
        ..Answer::default()
    };
    let (_, read) = answer(&h, &c, a, &body);
    assert!(read);
    let stored = Stored::decode(&h.value(KEYS.market).unwrap()).unwrap();
    assert_eq!(stored.etag.as_deref(), Some("\"g1\""));
}

#[test]
fn invalid_offers_are_dropped_counted_and_the_first_named() {
    let c = config("");
    let h = MockHost::envoy();
    let body = String::from_utf8(snapshot(T0))
        .unwrap()
        .replace(r#""uptime":0.99"#, r#""uptime":7"#);
    let good = String::from_utf8(snapshot(T0)).unwrap();
    let offers = good.split_once(r#""offers":["#).unwrap().1;
    let body = body.replace(
        r#""offers":["#,
        &format!(r#""offers":[{},"#, &offers[..offers.len() - 2]),
    );
    let fx = ok(&h, &c, body.as_bytes());
    assert_eq!(count(&fx, Global::OffersInvalid), 2);
    assert!(logs(&fx).contains(&(
        Level::Warn,
        "market-router: dropped 2 invalid offer(s) from the snapshot (first: offers[2]: `uptime` must be in 0..1)"
    )), "{fx:?}");
    assert_eq!(generation(&h), 1);
}

#[test]
fn a_failure_keeps_the_last_good_snapshot_and_is_logged_once_per_streak() {
    let c = config("");
    for h in hosts() {
        ok(&h, &c, &snapshot(T0));
        let good = h.value(KEYS.market).unwrap();
        let fail_503 = status("503");
        let cases: [(Answer<'_>, &str); 4] = [
            (
                Answer {
                    headers: &fail_503,
                    body_size: 3,
                    ..Answer::default()
                },
                "sidecar answered status 503",
            ),
            (
                Answer::default(),
                "no answer (connection failed, reset or timed out)",
            ),
            (
                Answer {
                    failure: Some("timeout"),
                    body_size: 10,
                    ..Answer::default()
                },
                "the answer broke off (timeout)",
            ),
            (
                Answer {
                    failure: Some("broken connection"),
                    ..Answer::default()
                },
                "the answer broke off (broken connection)",
            ),
        ];
        for (i, (a, why)) in cases.into_iter().enumerate() {
            let (fx, read) = answer(&h, &c, a, b"{}");
            assert!(!read, "{why}: the body of a failed answer is not read");
            assert_eq!(count(&fx, Global::RefreshFailed), 1);
            let line = if i == 0 {
                (
                    Level::Warn,
                    format!(
                        "market-router: market refresh failed: {why}; keeping the last good snapshot"
                    ),
                )
            } else {
                (
                    Level::Debug,
                    format!("market-router: market refresh failed again: {why}"),
                )
            };
            assert_eq!(fx.last(), Some(&Effect::Log(line.0, line.1)));
            assert_eq!(h.value(KEYS.market_status).unwrap(), b"fail");
            assert_eq!(h.value(KEYS.market).unwrap(), good);
            assert_eq!(generation(&h), 1);
        }
        // A bad body is a failure of the same streak.
        let (fx, read) = answer_with(&h, &c, "200", 5, b"nope!");
        assert!(read);
        assert_eq!(
            logs(&fx),
            [(
                Level::Debug,
                "market-router: market refresh failed again: snapshot is not valid JSON"
            )]
        );
        assert_eq!(
            (generation(&h), h.value(KEYS.market).unwrap()),
            (1, good.clone())
        );
        // The next good one ends the streak, once.
        let fx = ok(&h, &c, &snapshot(T0 + 1));
        assert_eq!(
            logs(&fx)[2],
            (Level::Info, "market-router: market refresh recovered")
        );
        assert_eq!(h.value(KEYS.market_status).unwrap(), b"ok");
        let fx = ok(&h, &c, &snapshot(T0 + 2));
        assert!(!logs(&fx).iter().any(|(_, l)| l.contains("recovered")));
        // And a new failure starts a new streak: logged at warn again.
        let (fx, _) = answer(&h, &c, Answer::default(), b"");
        assert_eq!(logs(&fx)[0].0, Level::Warn);
    }
}

#[test]
fn a_bad_first_snapshot_stores_nothing() {
    let c = config("");
    let h = MockHost::envoy();
    let (fx, _) = answer_with(&h, &c, "200", 28, br#"{"version":2,"offers":[]}"#);
    assert_eq!(
        logs(&fx),
        [(
            Level::Warn,
            "market-router: market refresh failed: snapshot version is 2, expected 1; keeping the last good snapshot"
        )]
    );
    assert_eq!(h.value(KEYS.market), None);
    assert_eq!(h.value(KEYS.market_gen), None);
    // The host refusing the body reads as an empty one: a failure, nothing stored.
    let mut fx = Vec::new();
    on_snapshot(
        &h,
        &c,
        &KEYS,
        &Answer {
            headers: &status("200"),
            body_size: 9,
            ..Answer::default()
        },
        |_| None,
        T0,
        &mut |e| fx.push(e),
    );
    assert_eq!(count(&fx, Global::RefreshFailed), 1);
    assert_eq!(h.value(KEYS.market), None);
}

#[test]
fn not_modified_keeps_the_snapshot_and_ends_a_streak() {
    let c = config("");
    let h = MockHost::envoy().with_value(KEYS.market_status, b"fail");
    let (fx, read) = answer_with(&h, &c, "304", 0, b"");
    assert!(!read);
    assert_eq!(
        fx,
        [
            Effect::Log(
                Level::Debug,
                "market-router: market snapshot not modified".into()
            ),
            Effect::Count(Global::RefreshNotModified, 1),
            Effect::Log(
                Level::Info,
                "market-router: market refresh recovered".into()
            ),
        ]
    );
    assert_eq!(h.value(KEYS.market_status).unwrap(), b"ok");
    assert_eq!(h.value(KEYS.market_gen), None);
    // Already ok: nothing written.
    let writes = h.writes();
    answer_with(&h, &c, "304", 0, b"");
    assert_eq!(h.writes(), writes);
}

#[test]
fn an_oversized_answer_is_not_read_and_an_oversized_snapshot_not_stored() {
    let c = config(r#"}, "limits": {"max_snapshot_bytes": 1024"#);
    assert_eq!(c.max_snapshot_bytes, 1024);
    let h = MockHost::envoy();
    let (fx, read) = answer_with(&h, &c, "200", 8193, b"");
    assert!(!read);
    assert_eq!(
        logs(&fx)[0].1,
        "market-router: market refresh failed: snapshot answer of 8193 bytes is over 8 x limits.max_snapshot_bytes (1024); not read; keeping the last good snapshot"
    );
    // At exactly 8 x the limit it is read.
    let (_, read) = answer_with(&h, &c, "200", 8192, b"");
    assert!(read);
    // Valid, but its stored form is over the limit.
    let offer = String::from_utf8(snapshot(T0)).unwrap();
    let one = offer.split_once(r#""offers":["#).unwrap().1;
    let one = &one[..one.find("},{").unwrap() + 1];
    let many = [one; 12].join(",");
    let body = format!(r#"{{"version":1,"generated_at_ms":{T0},"offers":[{many}]}}"#);
    let fx = ok(&h, &c, body.as_bytes());
    let line = logs(&fx).last().unwrap().1.to_string();
    assert!(
        line.starts_with(
            "market-router: market refresh failed again: snapshot of 12 offers takes "
        ) && line.ends_with(" bytes, over limits.max_snapshot_bytes (1024)"),
        "{line}"
    );
    assert_eq!(count(&fx, Global::RefreshOk), 0);
    assert_eq!(
        (h.value(KEYS.market), h.value(KEYS.market_gen)),
        (None, None)
    );
}

#[test]
fn a_refused_store_keeps_the_previous_snapshot() {
    let c = config("");
    let h = MockHost::kong().refusing_writes(HostError::InternalFailure);
    let fx = ok(&h, &c, &snapshot(T0));
    assert!(logs(&fx).contains(&(
        Level::Warn,
        "market-router: cannot store the market snapshot (Refused(InternalFailure)); keeping the previous one"
    )));
    assert_eq!(count(&fx, Global::RefreshOk), 0);
    assert_eq!(h.value(KEYS.market), None);
}

#[test]
fn a_generation_that_cannot_be_bumped_still_counts_the_snapshot_stored() {
    let c = config("");
    // Every conditional write loses (the snapshot's own write is unconditional).
    let h = MockHost::envoy()
        .with_value(KEYS.market_gen, &4u64.to_le_bytes())
        .with_conflicts(CAS_TRIES);
    let fx = ok(&h, &c, &snapshot(T0));
    assert!(h.value(KEYS.market).is_some());
    assert_eq!(generation(&h), 4);
    assert_eq!(
        logs(&fx).last().unwrap(),
        &(
            Level::Warn,
            "market-router: stored a snapshot but could not bump its generation; workers pick it up after the next refresh"
        )
    );
    assert_eq!(count(&fx, Global::RefreshOk), 1);
    // One conflict fewer than the tries: the last try bumps it.
    let h = MockHost::kong()
        .with_value(KEYS.market_gen, &4u64.to_le_bytes())
        .with_conflicts(CAS_TRIES - 1);
    ok(&h, &c, &snapshot(T0));
    assert_eq!(generation(&h), 5);
}

#[test]
fn staleness_is_said_once_after_max_age_and_once_when_fresh_again() {
    let c = config("");
    for h in hosts() {
        let mut r = Refresh::default();
        let mut at = |now: u64, age_ms: u64| {
            shared_set(&h, KEYS.market_due, &0u64.to_le_bytes(), None).unwrap();
            r = Refresh::default();
            let held = Held { age_ms, etag: None };
            let mut fx = Vec::new();
            assert!(r.tick(&h, &c, &KEYS, now, Some(held), || None, &mut |e| fx.push(e)));
            (fx, h.value(KEYS.market_stale))
        };
        // At max_age_ms it is still fresh.
        assert_eq!(at(T0, 5000), (vec![], None));
        let (fx, flag) = at(T0 + 1, 5001);
        assert_eq!(
            fx,
            [Effect::Log(
                Level::Warn,
                "market-router: market data is 5001 ms old (market.max_age_ms 5000); routing on the last good snapshot (static offers only where it has none)".into()
            )]
        );
        assert_eq!(flag.unwrap(), b"1");
        assert_eq!(at(T0 + 2, 9000).0, vec![]);
        let (fx, flag) = at(T0 + 3, 20);
        assert_eq!(
            fx,
            [Effect::Log(
                Level::Info,
                "market-router: market data is fresh again (20 ms old)".into()
            )]
        );
        assert_eq!(flag.unwrap(), b"0");
        assert_eq!(at(T0 + 4, 30).0, vec![]);
    }
}

#[test]
fn a_refused_fetch_is_a_failure_and_a_refused_report_is_dropped() {
    let c = config(r#","report":true"#);
    let h = MockHost::kong().refusing_dispatch_to("s", HostError::BadArgument);
    create_slot(&h, &KEYS);
    let mut r = Refresh::default();
    let mut fx = Vec::new();
    let tally = || {
        let mut t = Tallies::default();
        t.record("a", "m", &crate::attempt::Outcome::Success(200), Some(5));
        Some(t)
    };
    assert!(r.tick(&h, &c, &KEYS, T0, None, tally, &mut |e| fx.push(e)));
    assert!(!r.fetching() && !r.reporting());
    assert_eq!(
        fx,
        [
            Effect::Count(Global::RefreshFailed, 1),
            Effect::Log(
                Level::Warn,
                "market-router: market refresh failed: cannot call cluster `s` (BadArgument); keeping the last good snapshot".into()
            ),
            Effect::Count(Global::ReportsDropped, 1),
            Effect::Log(
                Level::Debug,
                "market-router: market report dropped: cannot call cluster `s` (BadArgument)"
                    .into()
            ),
        ]
    );
}

/// A process-wide tally of one success, as the VMs' ticks merge it.
fn obs_host() -> MockHost {
    let h = MockHost::envoy();
    let mut t = Tallies::default();
    t.record("a", "m", &crate::attempt::Outcome::Success(200), Some(5));
    assert!(matches!(
        shared::merge_tally(&h, OBS, &t),
        Update::Written(_)
    ));
    h
}

#[test]
fn the_report_is_posted_on_the_slot_and_its_answer_counted() {
    let c = config(r#","report":true"#);
    for h in hosts() {
        create_slot(&h, &KEYS);
        let obs = obs_host();
        let want = Tallies::decode(&obs.value(OBS).unwrap()).report_json();
        let mut r = Refresh::default();
        let take = || shared::take_tally(&obs, OBS);
        assert!(r.tick(&h, &c, &KEYS, T0, None, take, &mut |_| {}));
        assert!(r.fetching() && r.reporting());
        let calls = h.dispatched();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].cluster, "s");
        assert_eq!(calls[1].body, want);
        assert_eq!(calls[1].headers[1], (":path".into(), REPORTS_PATH.into()));
        assert_eq!(
            calls[1].headers[3],
            ("content-type".into(), "application/json".into())
        );
        // Taken: the process-wide tally is empty now.
        assert_eq!(obs.value(OBS).unwrap(), b"");
        // The report's answer is the report's, the fetch stays in flight.
        assert_eq!(r.answered(99), Call::Other);
        assert_eq!(r.answered(2), Call::Report);
        assert!(r.fetching() && !r.reporting());
        assert_eq!(r.answered(2), Call::Other);
        assert_eq!(r.answered(1), Call::Snapshot);
        assert_eq!(r, Refresh::default());
    }
}

#[test]
fn a_report_answer_counts_sent_on_2xx_and_dropped_otherwise() {
    let run = |a: Answer<'_>| {
        let mut fx = Vec::new();
        on_report(&a, &mut |e| fx.push(e));
        fx
    };
    let sent = |s: &str| {
        run(Answer {
            headers: &status(s),
            ..Answer::default()
        })
    };
    assert_eq!(sent("202"), [Effect::Count(Global::ReportsSent, 1)]);
    assert_eq!(sent("200"), [Effect::Count(Global::ReportsSent, 1)]);
    assert_eq!(
        sent("503"),
        [
            Effect::Count(Global::ReportsDropped, 1),
            Effect::Log(
                Level::Debug,
                "market-router: market report dropped (answer Some(\"503\"))".into()
            )
        ]
    );
    assert_eq!(
        run(Answer::default())[1],
        Effect::Log(
            Level::Debug,
            "market-router: market report dropped (answer None)".into()
        )
    );
    let cut = status("200");
    assert_eq!(
        run(Answer {
            failure: Some("broken connection"),
            headers: &cut,
            body_size: 0
        })[0],
        Effect::Count(Global::ReportsDropped, 1)
    );
}

#[test]
fn no_report_without_a_tally_or_while_one_is_in_flight_or_when_off() {
    for (extra, tally, reports) in [
        (r#","report":true"#, true, 1),
        (r#","report":true"#, false, 0),
        (r#","report":false"#, true, 0),
    ] {
        let c = config(extra);
        let h = MockHost::envoy();
        create_slot(&h, &KEYS);
        let obs = if tally { obs_host() } else { MockHost::envoy() };
        let mut r = Refresh::default();
        let took = r.tick(
            &h,
            &c,
            &KEYS,
            T0,
            None,
            || shared::take_tally(&obs, OBS),
            &mut |_| {},
        );
        assert!(took);
        assert_eq!(h.dispatched().len(), 1 + reports, "{extra} {tally}");
        // The next period, with the report still unanswered: a fetch, no second report.
        r.answered(1);
        let obs = obs_host();
        r.tick(
            &h,
            &c,
            &KEYS,
            T0 + 1000,
            None,
            || shared::take_tally(&obs, OBS),
            &mut |_| {},
        );
        let calls = h.dispatched();
        let posts = calls.iter().filter(|d| d.headers[0].1 == "POST").count();
        assert_eq!(
            posts,
            if extra.contains("false") { 0 } else { 1 },
            "{extra} {tally}"
        );
    }
}

#[test]
fn a_tally_that_cannot_be_taken_stays_for_the_next_report() {
    let c = config(r#","report":true"#);
    let h = MockHost::envoy();
    create_slot(&h, &KEYS);
    let before = obs_host().value(OBS).unwrap();
    let obs = MockHost::envoy()
        .with_value(OBS, &before)
        .with_conflicts(CAS_TRIES);
    let mut r = Refresh::default();
    let mut fx = Vec::new();
    assert!(r.tick(
        &h,
        &c,
        &KEYS,
        T0,
        None,
        || shared::take_tally(&obs, OBS),
        &mut |e| fx.push(e)
    ));
    assert!(!r.reporting() && fx.is_empty());
    assert_eq!(h.dispatched().len(), 1);
    assert_eq!(obs.value(OBS).unwrap(), before);
    // Next period it is taken and reported.
    r.answered(1);
    assert!(r.tick(
        &h,
        &c,
        &KEYS,
        T0 + 1000,
        None,
        || shared::take_tally(&obs, OBS),
        &mut |_| {}
    ));
    assert!(r.reporting());
    assert_eq!(obs.value(OBS).unwrap(), b"");
}
