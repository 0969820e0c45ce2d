//! Envoy mode's downstream paths (the real-host suite is
//! `crates/testbed/tests/native_failover.rs`): the order within `max_attempts` with probes
//! claimed, the per-try bound (a stream's from the offers' p95, a whole answer's the attempt
//! timeout), the client's retry headers and credentials removed, refusals; then the answer
//! Envoy settled on: a provider's, delivered, held or flowing; Envoy's own after the last
//! attempt; every attempt failed; and the drift of a route that tried nothing or recorded
//! nothing.

use super::*;
use crate::attempt::Outcome;
use crate::host::{HostError, MockHost};
use crate::select::Candidate;
use crate::test_support::{self, cand, config};

const T0: u64 = 1_000_000;

fn envoy(extra: &str) -> Config {
    config(4, &format!(r#","failover":{{"mode":"envoy"{extra}}}"#))
}

fn walk(config: &Config, candidates: Vec<Candidate>) -> Walk {
    test_support::walk(config, candidates, T0)
}

fn info(stream: bool) -> RequestInfo {
    RequestInfo {
        model: "m".into(),
        model_span: 9..12,
        stream,
        include_usage: false,
        max_tokens: None,
        body_len: 40,
    }
}

fn hs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn set(k: &str, v: &str) -> (String, Option<String>) {
    (k.to_string(), Some(v.to_string()))
}

fn unset(k: &str) -> (String, Option<String>) {
    (k.to_string(), None)
}

fn plan_of(h: &MockHost) -> Plan {
    Plan::decode(&h.property_value(&[native::PLAN_PROPERTY]).unwrap()).unwrap()
}

fn client() -> Vec<(String, String)> {
    hs(&[(":method", "POST"), (":path", "/v1/chat/completions")])
}

#[test]
fn the_order_is_the_ranking_within_max_attempts() {
    let c = envoy(r#","max_attempts":3"#);
    let mut w = walk(&c, (0..4).map(cand).collect());
    let h = MockHost::envoy();
    let r = hand_over(&h, &c, &mut w, Some(&info(false)), &client(), |_| true);
    assert_eq!(r, Ok(()));
    assert_eq!(
        h.request_edits(),
        [
            set(
                native::ORDER_HEADER,
                &native::order_header(&["a", "b", "c"])
            ),
            set("x-envoy-max-retries", "2"),
            set("x-envoy-upstream-rq-per-try-timeout-ms", "30000"),
            set("x-envoy-upstream-rq-timeout-ms", "90000"),
        ]
    );
    let p = plan_of(&h);
    assert_eq!(
        p,
        Plan {
            model: "m".into(),
            stream: false,
            per_try_ms: 30_000,
            path: "/v1/chat/completions".into(),
            providers: vec![(0, "m".into()), (1, "m".into()), (2, "m".into())],
        }
    );
}

#[test]
fn a_probe_goes_only_when_claimed_and_is_dropped_otherwise() {
    let c = envoy(r#","max_attempts":2"#);
    let probe = |p| Candidate {
        probe: true,
        ..cand(p)
    };
    let mut claims = Vec::new();
    let mut w = walk(&c, vec![probe(0), probe(1), cand(2), cand(3)]);
    let h = MockHost::envoy();
    let r = hand_over(&h, &c, &mut w, Some(&info(false)), &client(), |p| {
        claims.push(p);
        p == 1
    });
    assert_eq!(r, Ok(()));
    assert_eq!(claims, [0, 1], "past the bound nothing is claimed");
    assert_eq!(plan_of(&h).providers, [(1, "m".into()), (2, "m".into())]);
    let left: Vec<usize> = w
        .ranking
        .as_ref()
        .unwrap()
        .candidates
        .iter()
        .map(|c| c.provider)
        .collect();
    assert_eq!(left, [1, 2, 3], "the lost probe left the ranking");
    // Every candidate a probe another request holds: the final error.
    let mut w = walk(&c, vec![probe(0)]);
    let h = MockHost::envoy();
    let r = hand_over(&h, &c, &mut w, Some(&info(false)), &client(), |_| false);
    assert_eq!(r, Err(NotHanded::NoneLeft));
    assert!(h.request_edits().is_empty());
}

#[test]
fn a_streams_per_try_bound_is_the_largest_of_its_providers_ttft_bounds() {
    let c = envoy(r#","max_attempts":2,"ttft_timeout_factor":2.0,"attempt_timeout_ms":3000"#);
    let p95 = |p, ms| Candidate {
        ttft_p95_ms: ms,
        ..cand(p)
    };
    // c's 5000 ms is past the bound, but c is not in the order.
    let mut w = walk(&c, vec![p95(0, 150.0), p95(1, 400.0), p95(2, 5000.0)]);
    let h = MockHost::envoy();
    hand_over(&h, &c, &mut w, Some(&info(true)), &client(), |_| true).unwrap();
    assert_eq!(
        h.request_edits(),
        [
            set(native::ORDER_HEADER, &native::order_header(&["a", "b"])),
            set("x-envoy-max-retries", "1"),
            set("x-envoy-upstream-rq-per-try-timeout-ms", "800"),
        ],
        "a stream has no overall timeout: it flows as long as it takes"
    );
    assert_eq!(plan_of(&h).per_try_ms, 800);
    assert!(plan_of(&h).stream);
    // A whole answer's first byte is all of it: bounded by the attempt timeout.
    let mut w = walk(&c, vec![p95(0, 50.0), p95(1, 50.0)]);
    let h = MockHost::envoy();
    hand_over(&h, &c, &mut w, Some(&info(false)), &client(), |_| true).unwrap();
    assert_eq!(plan_of(&h).per_try_ms, 3000);
    assert_eq!(
        h.request_edits()[2],
        set("x-envoy-upstream-rq-per-try-timeout-ms", "3000")
    );
}

#[test]
fn the_clients_retry_headers_preferences_and_credentials_go() {
    let doc = r#"{"providers":[{"name":"a","cluster":"a","models":{"m":"m"},"headers":{"x-goog-api-key":"k"}}],
        "failover":{"mode":"envoy"}}"#;
    let c = Config::parse(doc.as_bytes()).unwrap();
    let mut sent = client();
    sent.extend(hs(&[
        ("x-envoy-max-retries", "10"),
        ("x-envoy-retry-on", "retriable-4xx"),
        ("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
        ("x-envoy-attempt-count", "3"),
        (headers::PREF_EXCLUDE, "a"),
        ("authorization", "Bearer client"),
        ("proxy-authorization", "Basic x"),
        ("x-api-key", "client-x"),
        ("x-goog-api-key", "client-g"),
        ("x-other", "kept"),
    ]));
    let removed = [
        "x-envoy-max-retries",
        "x-envoy-retry-on",
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "x-envoy-attempt-count",
        headers::PREF_EXCLUDE,
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "x-goog-api-key",
    ];
    let mut w = walk(&c, vec![cand(0)]);
    let h = MockHost::envoy();
    hand_over(&h, &c, &mut w, Some(&info(false)), &sent, |_| true).unwrap();
    let edits = h.request_edits();
    let want: Vec<_> = removed.iter().map(|k| unset(k)).collect();
    assert_eq!(edits[..removed.len()], want[..]);
    // Then ours, the client's retry bound among them.
    assert_eq!(edits[removed.len() + 1], set("x-envoy-max-retries", "0"));
    // The client's authorization stays when it is forwarded.
    let doc = doc.replace(
        r#""mode":"envoy""#,
        r#""mode":"envoy","forward_client_authorization":true"#,
    );
    let c = Config::parse(doc.as_bytes()).unwrap();
    let mut w = walk(&c, vec![cand(0)]);
    let h = MockHost::envoy();
    hand_over(&h, &c, &mut w, Some(&info(false)), &sent, |_| true).unwrap();
    assert!(!h.request_edits().contains(&unset("authorization")));
    assert!(h.request_edits().contains(&unset("x-api-key")));
}

#[test]
fn a_refused_hand_over_or_a_lost_request_is_an_error() {
    let c = envoy("");
    let mut w = walk(&c, vec![cand(0)]);
    let h = MockHost::envoy().refusing_request_headers(HostError::BadArgument);
    let r = hand_over(&h, &c, &mut w, Some(&info(false)), &client(), |_| true);
    assert_eq!(r, Err(NotHanded::Refused));
    let mut w = walk(&c, vec![cand(0)]);
    let h = MockHost::envoy().refusing_properties(HostError::NotFound);
    let r = hand_over(&h, &c, &mut w, Some(&info(false)), &client(), |_| true);
    assert_eq!(r, Err(NotHanded::Refused), "no plan, no attempt");
    let h = MockHost::envoy();
    let r = hand_over(
        &h,
        &c,
        &mut Walk::default(),
        Some(&info(false)),
        &client(),
        |_| true,
    );
    assert_eq!(r, Err(NotHanded::Lost));
    let r = hand_over(
        &h,
        &c,
        &mut walk(&c, vec![cand(0)]),
        None,
        &client(),
        |_| true,
    );
    assert_eq!(r, Err(NotHanded::Lost));
}

// ---------------------------------------------------------------------------------------------
// The answer
// ---------------------------------------------------------------------------------------------

/// The downstream side after the attempts `tried` (the upstream role's list) and an answer
/// with `headers`: the read-back, the step, the notes and the exchange after it.
struct Answered {
    back: ReadBack,
    step: OnAnswer,
    notes: Vec<Note>,
    ex: Exchange,
    walk: Walk,
}

fn answer(c: &Config, tried: &str, headers: &[(&str, &str)], stream: bool, eos: bool) -> Answered {
    let mut h = MockHost::envoy()
        .with_property(&[native::TRIED_PROPERTY], tried.as_bytes())
        .with_property(&[native::SAID_PROPERTY], b"a: simulated 503");
    for (k, v) in headers {
        h = if *k == "code_details" {
            h.with_property(&["response", "code_details"], v.as_bytes())
        } else {
            h.with_response_header(k, v)
        };
    }
    let mut w = walk(c, (0..3).map(cand).collect());
    let back = read_back(&h, &mut w);
    let mut ex = Exchange {
        phase: Phase::Native,
        ..Exchange::default()
    };
    let mut notes = Vec::new();
    let priced = back.usage.is_some();
    let step = on_answer(
        &h,
        c,
        &mut ex,
        &w,
        stream,
        priced,
        eos,
        || T0 + 7,
        |n| notes.push(n),
    );
    Answered {
        back,
        step,
        notes,
        ex,
        walk: w,
    }
}

fn fx(e: Effect) -> Note {
    Note::Effect(e)
}

#[test]
fn the_attempts_and_what_a_failed_provider_said_are_read_back() {
    let c = envoy("");
    let a = answer(
        &c,
        "0:h503,1:s200:u18/8",
        &[(":status", "200")],
        false,
        false,
    );
    let tried = &a.walk.attempts.as_ref().unwrap().tried;
    assert_eq!(
        tried[..],
        [
            (
                0,
                Outcome::Status {
                    status: 503,
                    retry_after_ms: None
                }
            ),
            (1, Outcome::Success(200))
        ]
    );
    assert_eq!(
        a.back,
        ReadBack {
            usage: Some(Usage {
                prompt_tokens: 18,
                completion_tokens: 8
            }),
            failed: true,
            said: Some("a: simulated 503".into()),
        }
    );
    // Priced already: delivered at once, not held.
    assert_eq!(a.step, OnAnswer::Deliver(200));
    assert_eq!(a.ex.phase, Phase::Done);
    assert_eq!(
        a.notes,
        [
            fx(Effect::CountGlobal(Global::RecoveredByFailover)),
            fx(Effect::Remember { provider: 1 }),
        ]
    );
    // No failure: what is stored of an earlier request is not read.
    let a = answer(&c, "0:s200", &[(":status", "200")], false, true);
    assert_eq!((a.back.failed, a.back.said), (false, None));
    assert_eq!(
        a.notes,
        [fx(Effect::Remember { provider: 0 })],
        "one attempt: no recovery"
    );
}

#[test]
fn a_whole_answer_is_held_to_price_it_unless_it_cannot_be() {
    let c = envoy("");
    let a = answer(&c, "0:s200", &[(":status", "200")], false, false);
    assert_eq!(a.step, OnAnswer::Hold);
    assert_eq!(
        (a.ex.phase, a.ex.held),
        (Phase::NativeHolding, Some((200, T0 + 7)))
    );
    for (k, v) in [("content-length", "700000"), ("content-encoding", "br")] {
        let a = answer(&c, "0:s200", &[(":status", "200"), (k, v)], false, false);
        assert_eq!(a.step, OnAnswer::Deliver(200), "{k}");
        assert_eq!((a.ex.phase, a.ex.unheld), (Phase::Unheld, true), "{k}");
        assert_eq!(a.ex.encoded, k == "content-encoding");
    }
    // Without our response headers there is nothing to price it for before it goes.
    let c = config(
        3,
        r#","failover":{"mode":"envoy"},"response_headers":false"#,
    );
    let a = answer(&c, "0:s200", &[(":status", "200")], false, false);
    assert_eq!(
        (a.step, a.ex.phase),
        (OnAnswer::Deliver(200), Phase::Unheld)
    );
    // A stream flows.
    let c = envoy("");
    let a = answer(&c, "0:s200", &[(":status", "200")], true, false);
    assert_eq!(
        (a.step, a.ex.phase),
        (OnAnswer::Deliver(200), Phase::Streaming)
    );
}

#[test]
fn a_held_answer_is_priced_when_complete_or_flows_past_the_limit() {
    let mut ex = Exchange {
        phase: Phase::NativeHolding,
        held: Some((201, T0)),
        ..Exchange::default()
    };
    let limit = answer::HOLD_LIMIT_BYTES;
    assert_eq!(on_held_body(&mut ex, limit, false), OnHeldBody::Pause);
    assert_eq!(ex.phase, Phase::NativeHolding);
    assert_eq!(
        on_held_body(&mut ex.clone(), 10, true),
        OnHeldBody::Complete(201)
    );
    assert_eq!(
        on_held_body(&mut ex, limit + 1, false),
        OnHeldBody::Overflow(201)
    );
    assert_eq!((ex.phase, ex.unheld), (Phase::Unheld, true));
    let mut done = Exchange {
        phase: Phase::NativeHolding,
        held: Some((200, T0)),
        ..Exchange::default()
    };
    on_held_body(&mut done, 10, true);
    assert_eq!(done.phase, Phase::Done);
}

#[test]
fn every_attempt_failing_gives_the_last_providers_own_answer_counted() {
    let c = envoy("");
    let a = answer(
        &c,
        "0:h429/5000,1:h429/7000,2:h429/9000",
        &[(":status", "429"), ("code_details", "via_upstream")],
        false,
        true,
    );
    assert_eq!(a.step, OnAnswer::Deliver(429));
    assert_eq!(a.ex.phase, Phase::Done);
    assert_eq!(
        a.notes,
        [
            fx(Effect::CountGlobal(Global::AllFailed)),
            Note::AllFailed {
                tried: 3,
                status: 429
            }
        ]
    );
    // A client error is the provider's answer, not a failure of all.
    let a = answer(&c, "0:h400", &[(":status", "400")], false, true);
    assert_eq!((a.step, a.notes), (OnAnswer::Deliver(400), vec![]));
}

#[test]
fn envoys_own_reply_after_the_attempts_is_replaced_by_the_final_error() {
    let c = envoy("");
    let a = answer(
        &c,
        "0:h503,1:h503,2:t",
        &[
            (":status", "504"),
            ("code_details", "upstream_per_try_timeout"),
        ],
        false,
        true,
    );
    assert_eq!((a.step, a.notes), (OnAnswer::FinalError, vec![]));
}

#[test]
fn a_route_that_tried_nothing_or_recorded_nothing_is_drift() {
    let c = envoy("");
    let a = answer(
        &c,
        "",
        &[(":status", "503"), ("code_details", "no_healthy_upstream")],
        false,
        true,
    );
    assert_eq!(a.step, OnAnswer::FinalError);
    assert_eq!(
        a.notes,
        [
            fx(Effect::CountGlobal(Global::RouteDrift)),
            Note::Drift("Envoy answered 503 (no_healthy_upstream) without trying any provider (the route's priority groups lack the order's providers, or the clusters lack the upstream role)".into()),
        ]
    );
    // A provider's answer, but no attempt recorded: let through untouched.
    let a = answer(&c, "", &[(":status", "200")], false, false);
    assert_eq!((a.step, a.ex.phase), (OnAnswer::Pass, Phase::Done));
    assert_eq!(
        a.notes,
        [
            fx(Effect::CountGlobal(Global::RouteDrift)),
            Note::Drift("an answer arrived but no attempt was recorded: the provider clusters lack the market-router upstream filter (root id market_router_upstream)".into()),
        ]
    );
}

#[test]
fn roles_are_checked_against_the_vms_other_plugins() {
    use crate::config::FailoverMode::*;
    use native::{Refused, Role, Roles};
    let up = Role {
        upstream: true,
        mode: Envoy,
    };
    let down = |mode| Role {
        upstream: false,
        mode,
    };
    let mut roles = Roles::new();
    assert_eq!(roles.register(1, up), Ok(()));
    let e = roles.register(2, down(Route)).unwrap_err().to_string();
    assert!(e.contains("this VM also runs the upstream role"), "{e}");
    assert_eq!(roles.register(2, down(Envoy)), Ok(()));
    // Re-configured, a plugin replaces its own role: the upstream role's plugin may turn
    // into a route-mode listener filter only once it is the only upstream one left.
    assert!(roles.register(2, down(Route)).is_err());
    roles.unregister(1);
    assert_eq!(roles.register(2, down(Route)), Ok(()));
    assert!(roles.register(3, up).is_err());
    assert_eq!(
        roles.register(2, up),
        Ok(()),
        "its own earlier role is not in the way"
    );
    assert_eq!(up.refused(), Refused::Configuration);
    assert_eq!(down(Route).refused(), Refused::Requests);
}
