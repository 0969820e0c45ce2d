//! The upstream role's paths, attempt by attempt, as Envoy's router runs them (the real-host
//! suite is `crates/testbed/tests/native_failover.rs`): the provider found by cluster, each
//! attempt's credentials and model id, every way an attempt ends (a status, a reset, a refused
//! connection, a timeout, an SSE error event, a malformed or unholdable answer, a client that
//! went away), what is recorded for the downstream role, and route drift.

use super::*;
use crate::config::Config;
use crate::host::MockHost;
use crate::test_support::config;

const T0: u64 = 1_000_000;

/// What came out of a callback, owned.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Fx(Effect),
    Drift(String),
    Attempting(usize),
    FailingOver(usize, Outcome),
    Cut,
    Recorded(u64),
}

fn seen(into: &mut Vec<Seen>, o: Out<'_>) {
    into.push(match o {
        Out::Effect { effect, model, .. } => {
            // Every effect of a planned attempt is keyed by the client's model.
            if !matches!(effect, Effect::CountGlobal(_)) {
                assert_eq!(model, "m", "{effect:?}");
            }
            Seen::Fx(effect)
        }
        Out::Drift(w) => Seen::Drift(w),
        Out::Attempting { provider } => Seen::Attempting(provider),
        Out::FailingOver { provider, outcome } => Seen::FailingOver(provider, outcome),
        Out::Cut => Seen::Cut,
        Out::Recorded { now } => Seen::Recorded(now),
    });
}

fn plan(stream: bool, providers: &[(usize, &str)]) -> Plan {
    Plan {
        model: "m".into(),
        stream,
        per_try_ms: 3000,
        path: "/v1/chat/completions".into(),
        providers: providers.iter().map(|(p, m)| (*p, m.to_string())).collect(),
    }
}

/// The host of an attempt on `cluster` of a request planned so, after the attempts `tried`.
fn attempt_host(plan: &Plan, cluster: &str, tried: &[u8]) -> MockHost {
    let h = MockHost::envoy()
        .with_property(&[native::PLAN_PROPERTY], &plan.encode())
        .with_property(&["xds", "cluster_name"], cluster.as_bytes());
    if tried.is_empty() {
        h
    } else {
        h.with_property(&[native::TRIED_PROPERTY], tried)
    }
}

/// An attempt on `cluster` of a request planned so, after the attempts `tried`, its request
/// headers seen (`eos`: without a body) and its answer's headers `answer` waiting.
fn started(
    c: &Config,
    plan: &Plan,
    cluster: &str,
    tried: &[u8],
    answer: &[(&str, &str)],
    eos: bool,
) -> (Attempt, MockHost) {
    let mut h = attempt_host(plan, cluster, tried);
    for (k, v) in answer {
        h = h.with_response_header(k, v);
    }
    let mut a = Attempt::default();
    req(&mut a, &h, c, eos);
    (a, h)
}

/// The first attempt of a request planned `abc`, on a.
fn first(c: &Config, answer: &[(&str, &str)], eos: bool) -> (Attempt, MockHost) {
    started(c, &abc(), "a", b"", answer, eos)
}

fn abc() -> Plan {
    plan(false, &[(0, "m"), (1, "m"), (2, "m")])
}

fn req(a: &mut Attempt, h: &MockHost, c: &Config, eos: bool) -> (Flow, Vec<Seen>) {
    let mut out = Vec::new();
    let f = a.on_request_headers(h, c, eos, || T0, |o| seen(&mut out, o));
    (f, out)
}

fn resp(a: &mut Attempt, h: &MockHost, c: &Config, eos: bool, now: u64) -> (Flow, Vec<Seen>) {
    let mut out = Vec::new();
    let f = a.on_response_headers(h, c, eos, || now, |o| seen(&mut out, o));
    (f, out)
}

fn body(
    a: &mut Attempt,
    h: &MockHost,
    c: &Config,
    bytes: &[u8],
    size: usize,
    eos: bool,
    now: u64,
) -> (Flow, Vec<Seen>) {
    let mut out = Vec::new();
    let read = |n: usize| Some(bytes[..n.min(bytes.len())].to_vec());
    let f = a.on_response_body(h, c, size, eos, || now, read, |o| seen(&mut out, o));
    (f, out)
}

fn done(a: &mut Attempt, h: &MockHost, c: &Config, now: u64) -> Vec<Seen> {
    let mut out = Vec::new();
    a.on_done(h, c, || now, |o| seen(&mut out, o));
    out
}

fn tried(h: &MockHost) -> String {
    String::from_utf8(
        h.property_value(&[native::TRIED_PROPERTY])
            .unwrap_or_default(),
    )
    .unwrap()
}

fn count(provider: usize, counter: PerProvider) -> Seen {
    Seen::Fx(Effect::Count { provider, counter })
}

fn tally(provider: usize, outcome: Outcome, ttfb_ms: Option<u64>) -> Seen {
    Seen::Fx(Effect::Tally {
        provider,
        outcome,
        ttfb_ms,
    })
}

fn observe(provider: usize, observation: Observation) -> Seen {
    Seen::Fx(Effect::Observe {
        provider,
        observation,
    })
}

const S503: Outcome = Status {
    status: 503,
    retry_after_ms: None,
};

fn failed(retry_after_ms: Option<u64>) -> Observation {
    Observation::Failure { retry_after_ms }
}

#[test]
fn a_first_attempt_is_counted_and_leaves_the_clients_headers_alone() {
    let c = config(3, "");
    let h = attempt_host(&abc(), "a", b"");
    let mut a = Attempt::default();
    let (f, out) = req(&mut a, &h, &c, false);
    assert_eq!(
        f,
        Flow::Continue,
        "no model to write in: the body is not held"
    );
    assert_eq!(out, [count(0, PerProvider::Attempts), Seen::Attempting(0)]);
    assert_eq!(a.provider(), Some(0));
    assert_eq!(
        h.request_edits(),
        [("accept-encoding".to_string(), Some("identity".to_string()))]
    );
}

#[test]
fn a_503_is_recorded_for_the_next_attempt_and_its_message_for_the_record() {
    let c = config(3, "");
    let (mut a, h) = first(&c, &[(":status", "503")], false);
    let (f, out) = resp(&mut a, &h, &c, false, T0 + 40);
    assert_eq!(f, Flow::Pause, "held until its body says why");
    assert_eq!(
        out,
        [
            tally(0, S503, None),
            count(0, PerProvider::Failure),
            observe(0, failed(None)),
            count(0, PerProvider::Failover),
            Seen::FailingOver(0, S503),
            Seen::Recorded(T0 + 40),
        ]
    );
    assert_eq!(tried(&h), "0:h503");
    let said = br#"{"error":{"message":"a: simulated 503 Service Unavailable"}}"#;
    // A part of it: held on.
    let (f, out) = body(&mut a, &h, &c, said, 10, false, T0 + 41);
    assert_eq!((f, out), (Flow::Pause, vec![]));
    let (f, out) = body(&mut a, &h, &c, said, said.len(), true, T0 + 41);
    assert_eq!((f, out), (Flow::Continue, vec![]));
    assert_eq!(
        h.property_value(&[native::SAID_PROPERTY]).as_deref(),
        Some(&b"a: simulated 503 Service Unavailable"[..])
    );
    // Recorded once: the end of the attempt adds nothing.
    assert_eq!(done(&mut a, &h, &c, T0 + 50), []);
    assert_eq!(tried(&h), "0:h503");
}

#[test]
fn a_compressed_error_body_is_not_held() {
    let c = config(3, "");
    let (mut a, h) = first(
        &c,
        &[(":status", "503"), ("content-encoding", "gzip")],
        false,
    );
    assert_eq!(resp(&mut a, &h, &c, false, T0).0, Flow::Continue);
}

#[test]
fn the_last_planned_attempt_and_a_client_error_are_not_failovers() {
    let c = config(3, "");
    // The third of three: nothing is left for Envoy to try.
    let (mut a, h) = started(
        &c,
        &abc(),
        "c",
        b"0:h503,1:h503",
        &[(":status", "503")],
        true,
    );
    let (_, out) = resp(&mut a, &h, &c, true, T0);
    assert_eq!(
        out,
        [
            tally(2, S503, None),
            count(2, PerProvider::Failure),
            observe(2, failed(None)),
            Seen::Recorded(T0),
        ]
    );
    assert_eq!(tried(&h), "0:h503,1:h503,2:h503");
    // A 400 is the client's: no failure, no failover.
    let (mut a, h) = first(&c, &[(":status", "400")], true);
    let bad = Status {
        status: 400,
        retry_after_ms: None,
    };
    let (_, out) = resp(&mut a, &h, &c, true, T0);
    assert_eq!(out, [tally(0, bad, None), Seen::Recorded(T0)]);
}

#[test]
fn retry_after_reaches_health_and_the_attempt_list() {
    let c = config(3, "");
    let (mut a, h) = first(&c, &[(":status", "429"), ("retry-after", "2")], true);
    let (_, out) = resp(&mut a, &h, &c, true, T0);
    assert!(out.contains(&observe(0, failed(Some(2000)))), "{out:?}");
    assert_eq!(tried(&h), "0:h429/2000");
}

/// Providers a, b, c with a key each, in a header of its own kind, and their own model ids.
fn keyed(extra: &str) -> Config {
    let doc = format!(
        r#"{{"providers":[
        {{"name":"a","cluster":"a","models":{{"m":"m-a"}},"headers":{{"x-api-key":"ka"}}}},
        {{"name":"b","cluster":"b","models":{{"m":"m-b"}},"headers":{{"authorization":"Bearer kb"}}}},
        {{"name":"c","cluster":"c","authority":"c.example","models":{{"m":"m-c"}},"headers":{{"api-key":"kc"}}}}],
        "failover":{{"mode":"envoy"{extra}}}}}"#
    );
    Config::parse(doc.as_bytes()).unwrap()
}

fn set(k: &str, v: &str) -> (String, Option<String>) {
    (k.to_string(), Some(v.to_string()))
}

fn unset(k: &str) -> (String, Option<String>) {
    (k.to_string(), None)
}

#[test]
fn each_attempt_carries_only_its_providers_key_and_model_id() {
    let c = keyed("");
    let p = plan(false, &[(0, "m-a"), (1, "m-b"), (2, "m-c")]);
    // The first attempt: its key set (the client's were removed downstream).
    let h = attempt_host(&p, "a", b"");
    let mut a = Attempt::default();
    assert_eq!(req(&mut a, &h, &c, false).0, Flow::Pause, "the body waits");
    assert_eq!(
        h.request_edits(),
        [set("x-api-key", "ka"), set("accept-encoding", "identity")]
    );
    // A retry on b: the client's path again, every other provider's key removed, b's set.
    let (mut a, h) = started(&c, &p, "b", b"0:h503", &[], false);
    assert_eq!(
        h.request_edits(),
        [
            set(":path", "/v1/chat/completions"),
            unset("x-api-key"),
            unset("api-key"),
            set("authorization", "Bearer kb"),
            set("accept-encoding", "identity"),
        ]
    );
    let req_body = br#"{"model":"m","messages":[]}"#;
    let read = |n: usize| Some(req_body[..n].to_vec());
    assert_eq!(a.on_request_body(&h, 5, false, read), Flow::Pause);
    assert_eq!(
        a.on_request_body(&h, req_body.len(), true, read),
        Flow::Continue
    );
    let new_body = h.request_body().unwrap();
    assert_eq!(new_body, br#"{"model":"m-b","messages":[]}"#);
    assert_eq!(
        h.request_edits().last(),
        Some(&set("content-length", &new_body.len().to_string()))
    );
    // Written once: a later body callback leaves it.
    assert_eq!(a.on_request_body(&h, 1, true, |_| None), Flow::Continue);
    // On c (its own authority): b's authorization goes too, unless the client's is forwarded.
    for (extra, removed) in [
        ("", vec!["authorization", "x-api-key"]),
        (r#","forward_client_authorization":true"#, vec!["x-api-key"]),
    ] {
        let c = keyed(extra);
        let h = attempt_host(&p, "c", b"0:h503,1:h503");
        req(&mut Attempt::default(), &h, &c, true);
        let mut want = vec![
            set(":authority", "c.example"),
            set(":path", "/v1/chat/completions"),
        ];
        want.extend(removed.iter().map(|k| unset(k)));
        want.extend([set("api-key", "kc"), set("accept-encoding", "identity")]);
        assert_eq!(h.request_edits(), want, "{extra}");
    }
}

#[test]
fn a_body_that_comes_with_the_headers_is_rewritten_without_a_pause() {
    let c = keyed("");
    let p = plan(false, &[(0, "m-a")]);
    let h = attempt_host(&p, "a", b"");
    let mut a = Attempt::default();
    assert_eq!(req(&mut a, &h, &c, true).0, Flow::Continue);
}

#[test]
fn a_stream_is_held_until_its_first_chunk_which_decides() {
    let c = config(3, "");
    let p = plan(true, &[(0, "m"), (1, "m"), (2, "m")]);
    let (mut a, h) = started(&c, &p, "a", b"", &[(":status", "200")], true);
    assert_eq!(resp(&mut a, &h, &c, false, T0 + 5), (Flow::Pause, vec![]));
    // An empty chunk decides nothing.
    assert_eq!(
        body(&mut a, &h, &c, b"", 0, false, T0 + 6),
        (Flow::Pause, vec![])
    );
    let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    let (f, out) = body(&mut a, &h, &c, chunk, chunk.len(), false, T0 + 120);
    assert_eq!(f, Flow::Continue);
    assert_eq!(
        out,
        [
            tally(0, Success(200), Some(120)),
            observe(
                0,
                Observation::Success {
                    ttfb_ms: Some(120.0)
                }
            ),
            count(0, PerProvider::Success),
            Seen::Recorded(T0 + 120),
        ]
    );
    assert_eq!(tried(&h), "0:s200");
    assert_eq!(h.response_value(":status").as_deref(), Some("200"));
    // Later chunks flow.
    assert_eq!(
        body(&mut a, &h, &c, chunk, 999, false, T0 + 130),
        (Flow::Continue, vec![])
    );
}

#[test]
fn an_sse_error_event_first_is_a_503_envoy_retries() {
    let c = config(3, "");
    let p = plan(true, &[(0, "m"), (1, "m"), (2, "m")]);
    let (mut a, h) = started(&c, &p, "a", b"", &[(":status", "200")], true);
    resp(&mut a, &h, &c, false, T0);
    let chunk = b"event: error\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\n";
    let (f, out) = body(&mut a, &h, &c, chunk, chunk.len(), false, T0 + 30);
    assert_eq!(f, Flow::Continue);
    assert_eq!(h.response_value(":status").as_deref(), Some("503"));
    assert!(out.contains(&Seen::FailingOver(0, S503)), "{out:?}");
    assert_eq!(tried(&h), "0:h503");
}

#[test]
fn an_attempt_without_an_answer_is_a_refusal_a_timeout_or_a_reset() {
    let c = config(3, "");
    // per_try 3000: within 5 ms of it is the per-try timeout.
    for (transport, at, want) in [
        ("delayed connect error: 111", T0 + 2, ConnectFailure),
        ("", T0 + 2995, Timeout),
        ("", T0 + 2994, Reset),
    ] {
        let mut h = attempt_host(&abc(), "a", b"");
        if !transport.is_empty() {
            h = h.with_property(
                &["upstream", "transport_failure_reason"],
                transport.as_bytes(),
            );
        }
        let mut a = Attempt::default();
        req(&mut a, &h, &c, true);
        let out = done(&mut a, &h, &c, at);
        assert_eq!(out[0], tally(0, want, None), "{transport:?} at {at}");
        assert!(out.contains(&Seen::FailingOver(0, want)), "{out:?}");
        assert_eq!(tried(&h), format!("0:{}", &native_code(want)));
    }
}

/// The attempt list's code of an outcome.
fn native_code(o: Outcome) -> String {
    let mut list = Vec::new();
    native::push_tried(
        &mut list,
        Tried {
            provider: 0,
            outcome: o,
            usage: None,
        },
    );
    String::from_utf8(list).unwrap()[2..].to_string()
}

#[test]
fn a_client_going_away_first_says_nothing_about_the_provider() {
    let c = config(3, "");
    let h = attempt_host(&abc(), "a", b"").with_property(
        &["response", "code_details"],
        b"downstream_remote_disconnect",
    );
    let mut a = Attempt::default();
    req(&mut a, &h, &c, true);
    assert_eq!(done(&mut a, &h, &c, T0 + 5000), [Seen::Cut]);
    assert_eq!(h.property_value(&[native::TRIED_PROPERTY]), None);
    // Nor twice.
    assert_eq!(done(&mut a, &h, &c, T0 + 5000), []);
}

#[test]
fn a_non_streaming_answer_is_held_whole_and_checked() {
    let c = config(3, "");
    let (mut a, h) = first(&c, &[(":status", "200")], true);
    assert_eq!(resp(&mut a, &h, &c, false, T0), (Flow::Pause, vec![]));
    let answer = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":18,"completion_tokens":8}}"#;
    assert_eq!(
        body(&mut a, &h, &c, answer, 10, false, T0),
        (Flow::Pause, vec![])
    );
    let (f, out) = body(&mut a, &h, &c, answer, answer.len(), true, T0 + 9);
    assert_eq!(f, Flow::Continue);
    assert!(out.contains(&count(0, PerProvider::Success)), "{out:?}");
    assert_eq!(
        tried(&h),
        "0:s200:u18/8",
        "its usage, for the downstream role"
    );
    // Malformed: a 502 Envoy retries.
    let (mut a, h) = first(&c, &[(":status", "200")], true);
    resp(&mut a, &h, &c, false, T0);
    let (_, out) = body(&mut a, &h, &c, b"<html>", 6, true, T0);
    assert_eq!(h.response_value(":status").as_deref(), Some("502"));
    assert!(out.contains(&Seen::FailingOver(0, Malformed)), "{out:?}");
    assert_eq!(tried(&h), "0:m");
    // A 2xx without a body is no answer.
    let (mut a, h) = first(&c, &[(":status", "200")], true);
    assert_eq!(resp(&mut a, &h, &c, true, T0).0, Flow::Continue);
    assert_eq!(h.response_value(":status").as_deref(), Some("502"));
    assert_eq!(tried(&h), "0:m");
}

#[test]
fn without_the_malformed_check_a_2xx_is_a_success_at_its_headers() {
    let c = config(3, r#","failover":{"mode":"envoy","retry_on":["5xx"]}"#);
    let (mut a, h) = first(&c, &[(":status", "200")], true);
    assert_eq!(resp(&mut a, &h, &c, false, T0).0, Flow::Continue);
    assert_eq!(tried(&h), "0:s200");
}

#[test]
fn an_answer_too_big_to_hold_or_compressed_flows_as_a_success() {
    let c = config(3, "");
    for (name, value) in [("content-length", "700000"), ("content-encoding", "gzip")] {
        let h = attempt_host(&abc(), "a", b"")
            .with_response_header(":status", "200")
            .with_response_header(name, value);
        let mut a = Attempt::default();
        req(&mut a, &h, &c, true);
        assert_eq!(resp(&mut a, &h, &c, false, T0).0, Flow::Continue, "{name}");
        assert_eq!(tried(&h), "0:s200", "{name}");
    }
    // Chunked, it grows past the hold limit while held: from there it flows, unchecked.
    let (mut a, h) = first(&c, &[(":status", "200")], true);
    resp(&mut a, &h, &c, false, T0);
    let limit = answer::HOLD_LIMIT_BYTES;
    assert_eq!(body(&mut a, &h, &c, b"", limit, false, T0).0, Flow::Pause);
    assert_eq!(
        body(&mut a, &h, &c, b"", limit + 1, false, T0).0,
        Flow::Continue
    );
    assert_eq!(tried(&h), "0:s200");
}

#[test]
fn an_attempt_on_a_cluster_no_provider_uses_is_drift_and_left_alone() {
    let c = config(3, "");
    let h = attempt_host(&abc(), "provider_other", b"").with_response_header(":status", "503");
    let mut a = Attempt::default();
    let (f, out) = req(&mut a, &h, &c, true);
    assert_eq!(f, Flow::Continue);
    assert_eq!(
        out,
        [
            Seen::Fx(Effect::CountGlobal(Global::RouteDrift)),
            Seen::Drift("the route sent an attempt to cluster `provider_other`, which no provider in the plugin configuration uses".into()),
        ]
    );
    assert_eq!(a.provider(), None);
    assert!(h.request_edits().is_empty());
    assert_eq!(resp(&mut a, &h, &c, true, T0), (Flow::Continue, vec![]));
    assert_eq!(done(&mut a, &h, &c, T0), []);
}

#[test]
fn an_attempt_on_another_provider_than_the_orders_next_is_drift_but_made() {
    let c = config(3, "");
    let h = attempt_host(&abc(), "b", b"");
    let mut a = Attempt::default();
    let (_, out) = req(&mut a, &h, &c, true);
    assert_eq!(
        out,
        [
            Seen::Fx(Effect::CountGlobal(Global::RouteDrift)),
            Seen::Drift("attempt 1 of a request went to cluster `b` (provider b) where the order named provider a (cluster `a`)".into()),
            count(1, PerProvider::Attempts),
            Seen::Attempting(1),
        ]
    );
    // The second attempt on the order's second: no drift; past the order, the last one's.
    for (tried, cluster) in [(&b"0:h503"[..], "b"), (b"0:h503,1:h503,2:h503", "c")] {
        let h = attempt_host(&abc(), cluster, tried);
        let (_, out) = req(&mut Attempt::default(), &h, &c, true);
        assert!(!out.iter().any(|o| matches!(o, Seen::Drift(_))), "{out:?}");
    }
}

#[test]
fn a_request_without_a_plan_is_not_the_upstream_roles() {
    let c = config(3, "");
    for h in [
        MockHost::envoy().with_property(&["xds", "cluster_name"], b"a"),
        MockHost::envoy().with_property(&[native::PLAN_PROPERTY], b"{not a plan"),
    ] {
        let h = h.with_response_header(":status", "503");
        let mut a = Attempt::default();
        assert_eq!(req(&mut a, &h, &c, false), (Flow::Continue, vec![]));
        assert_eq!(resp(&mut a, &h, &c, false, T0), (Flow::Continue, vec![]));
        assert_eq!(done(&mut a, &h, &c, T0), []);
        assert!(h.request_edits().is_empty());
    }
}

#[test]
fn a_drift_is_logged_once_a_minute() {
    let mut log = DriftLog::NEVER;
    assert!(log.due(0), "the first, even at time 0");
    assert!(!log.due(DRIFT_LOG_EVERY_MS), "time 0 counts as 1 ms");
    assert!(log.due(DRIFT_LOG_EVERY_MS + 1));
    assert!(!log.due(2 * DRIFT_LOG_EVERY_MS));
    assert!(log.due(2 * DRIFT_LOG_EVERY_MS + 1));
    let line = drift_line("attempt 1 went elsewhere");
    assert!(line.starts_with("market-router: envoy mode: attempt 1 went elsewhere; the route's priority groups and clusters do not match the plugin's providers: regenerate them"), "{line}");
    assert!(line.contains("market-router-envoy-config"), "{line}");
}
