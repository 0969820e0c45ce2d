//! The request phase's paths, one by one: what each request callback leads to, and every way
//! a decision goes (preferences allowed or not, rollout in and out, affinity pinned, unknown,
//! taken by another session, refused; unknown model, everything excluded, stale market).

use super::*;
use crate::host::{HostError, MockHost};
use crate::market::validate;
use crate::test_support::config;

fn hs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An LLM request's headers plus `extra`.
fn llm(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut h = hs(&[(":method", "POST"), (":path", "/v1/chat/completions")]);
    h.extend(hs(extra));
    h
}

/// Request header edits: name, and the new value (`None`: removed).
type Edits = Vec<(String, Option<String>)>;

/// The request headers callback on `client`: its step, the phase after it, the header edits
/// and the effects.
fn headers_step(
    c: &Config,
    client: &[(String, String)],
    end_of_stream: bool,
    pause: bool,
) -> (OnRequest, Phase, Edits, Vec<Effect>) {
    let host = MockHost::envoy();
    let mut phase = Phase::Passthrough;
    let mut fx = Vec::new();
    let step = on_request_headers(&host, c, client, end_of_stream, pause, &mut phase, |e| {
        fx.push(e)
    });
    (step, phase, host.request_edits(), fx)
}

fn removed(name: &str) -> (String, Option<String>) {
    (name.to_string(), None)
}

const REQUESTS: Effect = Effect::CountGlobal(Global::Requests);

#[test]
fn the_owned_headers_go_whatever_the_path() {
    let c = config(2, "");
    let owned = [
        (headers::DEFAULT_CLUSTER_HEADER, "evil"),
        (headers::PREF_EXCLUDE, "a"),
    ];
    for path in ["/v1/chat/completions", "/healthz"] {
        let mut client = hs(&[(":method", "POST"), (":path", path), ("x-other", "1")]);
        client.extend(hs(&owned));
        let (_, _, edits, _) = headers_step(&c, &client, false, true);
        assert_eq!(
            edits,
            vec![
                removed(headers::DEFAULT_CLUSTER_HEADER),
                removed(headers::PREF_EXCLUDE)
            ],
            "{path}"
        );
    }
    // A configured cluster header is owned instead of the default one.
    let c = config(2, r#","routing":{"cluster_header":"x-pick"}"#);
    let client = llm(&[("x-pick", "a"), (headers::DEFAULT_CLUSTER_HEADER, "b")]);
    let (_, _, edits, _) = headers_step(&c, &client, false, true);
    assert_eq!(edits, vec![removed("x-pick")]);
}

#[test]
fn only_envoy_mode_removes_a_client_order_header() {
    let client = llm(&[(native::ORDER_HEADER, "AAAA")]);
    let (_, _, edits, _) = headers_step(&config(2, ""), &client, false, true);
    assert!(edits.is_empty());
    let envoy = config(2, r#","failover":{"mode":"envoy"}"#);
    let (_, _, edits, _) = headers_step(&envoy, &client, false, true);
    assert_eq!(edits, vec![removed(native::ORDER_HEADER)]);
    // Without one, nothing is removed.
    let (_, _, edits, _) = headers_step(&envoy, &llm(&[]), false, true);
    assert!(edits.is_empty());
}

#[test]
fn other_requests_go_through_uncounted() {
    let c = config(2, "");
    for (method, path) in [
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/models"),
        ("PUT", "/v1/embeddings"),
    ] {
        let client = hs(&[(":method", method), (":path", path)]);
        let (step, phase, _, fx) = headers_step(&c, &client, false, true);
        assert_eq!((step, phase), (OnRequest::Continue, Phase::Passthrough));
        assert!(fx.is_empty());
    }
}

#[test]
fn an_explain_query_is_answered_unless_the_endpoints_are_off() {
    let client = hs(&[(":method", "GET"), (":path", "/market-router/v1/models")]);
    let (step, phase, _, fx) = headers_step(&config(2, ""), &client, true, true);
    assert_eq!(step, OnRequest::Explain(explain::Query::Models));
    assert_eq!((phase, fx.len()), (Phase::Passthrough, 0));
    // Another prefix.
    let c = config(2, r#","explain":{"path_prefix":"/mr"}"#);
    let (step, _, _, _) = headers_step(&c, &client, true, true);
    assert_eq!(step, OnRequest::Continue);
    let other = hs(&[(":method", "GET"), (":path", "/mr/nothing-here")]);
    let (step, _, _, _) = headers_step(&c, &other, true, true);
    assert_eq!(step, OnRequest::Explain(explain::Query::NotFound));
    // Turned off.
    let c = config(2, r#","explain":{"enabled":false}"#);
    let (step, _, _, _) = headers_step(&c, &client, true, true);
    assert_eq!(step, OnRequest::Continue);
}

#[test]
fn an_llm_request_is_counted_and_its_announced_length_checked() {
    let c = config(2, r#","limits":{"max_body_bytes":100}"#);
    let (step, _, _, fx) = headers_step(&c, &llm(&[("content-length", "101")]), false, true);
    assert_eq!(step, OnRequest::Refuse(ApiError::body_too_large(100)));
    assert_eq!(fx, vec![REQUESTS]);
    // At the limit, or unreadable: wait for the body.
    for len in ["100", "lots"] {
        let (step, phase, _, fx) = headers_step(&c, &llm(&[("content-length", len)]), false, true);
        assert_eq!((step, phase), (OnRequest::Pause, Phase::Reading), "{len}");
        assert_eq!(fx, vec![REQUESTS]);
    }
}

#[test]
fn a_request_without_a_body_is_decided_from_its_headers() {
    let c = config(2, "");
    let (step, phase, _, _) = headers_step(&c, &llm(&[]), true, true);
    assert_eq!((step, phase), (OnRequest::Decide(None), Phase::Passthrough));
    let (step, _, _, _) = headers_step(&c, &llm(&[("content-length", "0")]), false, true);
    assert_eq!(step, OnRequest::Decide(None));
}

#[test]
fn the_body_is_waited_for_by_pausing_only_where_the_host_waits() {
    let c = config(2, "");
    let (step, phase, _, _) = headers_step(&c, &llm(&[]), false, true);
    assert_eq!((step, phase), (OnRequest::Pause, Phase::Reading));
    let (step, phase, _, _) = headers_step(&c, &llm(&[]), false, false);
    assert_eq!((step, phase), (OnRequest::Continue, Phase::Reading));
}

#[test]
fn the_body_is_decided_once_complete_and_refused_past_the_limit() {
    let c = config(2, r#","limits":{"max_body_bytes":100}"#);
    assert_eq!(
        on_request_body(&c, Phase::Reading, 40, false),
        OnRequest::Pause
    );
    assert_eq!(
        on_request_body(&c, Phase::Reading, 100, true),
        OnRequest::Decide(Some(100))
    );
    assert_eq!(
        on_request_body(&c, Phase::Reading, 101, false),
        OnRequest::Refuse(ApiError::body_too_large(100))
    );
    // Outside the reading phase (passed through, already refused or decided): hands off.
    for phase in [Phase::Passthrough, Phase::Done, Phase::Routed] {
        assert_eq!(on_request_body(&c, phase, 101, true), OnRequest::Continue);
    }
}

#[test]
fn a_body_that_cannot_be_routed_is_a_400() {
    let e = read(b"not json").unwrap_err();
    assert_eq!(
        (e.status, e.reason),
        (400, crate::errors::Reason::BadRequest)
    );
    let e = read(br#"{"messages":[]}"#).unwrap_err();
    assert_eq!(e.status, 400);
    assert_eq!(read(br#"{"model":"m"}"#).unwrap().model, "m");
}

/// What a decision did: its result, the walk's ranking (provider names), the effects.
struct Decided {
    result: Result<Option<Affinity>, Unrouted>,
    order: Vec<String>,
    fx: Vec<Effect>,
    walk: Walk,
}

fn decide_on(
    host: &MockHost,
    c: &Config,
    market: Option<&MarketView>,
    client: &[(String, String)],
    model: &str,
    now: u64,
    seed: u64,
) -> Decided {
    let info = read(format!(r#"{{"model":"{model}"}}"#).as_bytes()).unwrap();
    let health = HealthTable::default();
    let mut rng = Rng::new(seed);
    let books = Books {
        market,
        health: &health,
        rng: &mut rng,
    };
    let mut walk = Walk::default();
    let mut fx = Vec::new();
    let result = decide(
        host,
        c,
        "mr/aff/",
        books,
        client,
        &info,
        now,
        &mut walk,
        |e| fx.push(e),
    );
    let order = walk.ranking.as_ref().map_or_else(Vec::new, |r| {
        r.candidates
            .iter()
            .map(|x| c.providers[x.provider].name.clone())
            .collect()
    });
    Decided {
        result,
        order,
        fx,
        walk,
    }
}

/// The order `select::rank` gives for model "m" with the client's preferences `prefs` and
/// the draws of `seed`: what a decision begins its walk on.
fn ranked(c: &Config, prefs: &Prefs, seed: u64) -> Vec<String> {
    let info = read(br#"{"model":"m"}"#).unwrap();
    let r = select::rank(
        c,
        None,
        &HealthTable::default(),
        &info,
        prefs,
        1_000,
        &mut Rng::new(seed),
    )
    .unwrap();
    r.candidates
        .iter()
        .map(|x| c.providers[x.provider].name.clone())
        .collect()
}

fn simple(c: &Config, client: &[(String, String)]) -> Decided {
    decide_on(&MockHost::envoy(), c, None, client, "m", 1_000, 7)
}

#[test]
fn a_decision_begins_the_walk_on_the_ranking() {
    let c = config(3, "");
    let d = simple(&c, &llm(&[]));
    assert_eq!(d.result, Ok(None));
    assert_eq!(d.order, ranked(&c, &Prefs::default(), 7));
    assert_eq!(d.order.len(), 3);
    assert!(d.fx.is_empty());
    let attempts = d.walk.attempts.as_ref().unwrap();
    assert_eq!(attempts.count(), 0);
    // Each candidate with its score, three decimals.
    let line = ranked_line(&c, &d.walk);
    assert_eq!(
        line,
        d.order
            .iter()
            .map(|n| format!("{n}:-1.000"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(ranked_line(&c, &Walk::default()), "");
}

#[test]
fn client_preferences_count_only_when_allowed() {
    let client = llm(&[(headers::PREF_EXCLUDE, "a")]);
    let c = config(3, "");
    let d = simple(&c, &client);
    assert_eq!(d.order, ranked(&c, &Prefs::default(), 7));
    assert_eq!(d.order.len(), 3);
    let allowed = config(3, r#","routing":{"client_overrides":true}"#);
    let d = simple(&allowed, &client);
    let prefs = headers::prefs_from_headers(&client);
    assert_eq!(d.order, ranked(&allowed, &prefs, 7));
    let mut order = d.order.clone();
    order.sort();
    assert_eq!(order, ["b", "c"].map(String::from));
}

#[test]
fn an_unknown_model_is_a_404() {
    let c = config(2, "");
    let d = decide_on(&MockHost::envoy(), &c, None, &llm(&[]), "nope", 0, 1);
    let u = d.result.unwrap_err();
    assert_eq!(u.error, ApiError::unknown_model("nope"));
    assert!(!u.excluded);
    assert!(d.walk.ranking.is_none());
}

#[test]
fn everything_excluded_is_a_503_saying_why() {
    let c = config(2, r#","routing":{"client_overrides":true}"#);
    let d = simple(&c, &llm(&[(headers::PREF_EXCLUDE, "a, b")]));
    let u = d.result.unwrap_err();
    assert!(u.excluded);
    assert_eq!(
        (u.error.status, u.error.code),
        (503, "no_provider_available")
    );
    assert!(u.error.message.contains("a: "), "{}", u.error.message);
    assert!(u.error.message.contains("b: "), "{}", u.error.message);
    assert!(d.walk.ranking.is_none());
}

#[test]
fn outside_the_rollout_the_default_provider_takes_the_request_alone() {
    let c = config(
        3,
        r#","routing":{"rollout_percent":0,"default_provider":"b"}"#,
    );
    let d = simple(&c, &llm(&[]));
    assert_eq!(d.order, vec!["b".to_string()]);
    assert_eq!(d.fx, vec![Effect::CountGlobal(Global::RolloutDefault)]);
    // Inside it: the market ranks, and the split is counted.
    let c = config(
        3,
        r#","routing":{"rollout_percent":99,"default_provider":"b","affinity_header":"x-s"}"#,
    );
    // A session whose bucket (fnv1a % 100) is under 99.
    let session = (0..100)
        .map(|i| format!("s{i}"))
        .find(|s| crate::rng::fnv1a(s.as_bytes()) % 100 < 99)
        .unwrap();
    let d = simple(&c, &llm(&[("x-s", &session)]));
    assert_eq!(d.order, ranked(&c, &Prefs::default(), 7));
    assert_eq!(d.order.len(), 3);
    assert_eq!(d.fx, vec![Effect::CountGlobal(Global::RolloutMarket)]);
    // A full rollout counts nothing.
    let d = simple(
        &config(3, r#","routing":{"default_provider":"b"}"#),
        &llm(&[]),
    );
    assert_eq!((d.order.len(), d.fx.len()), (3, 0));
}

#[test]
fn a_session_outside_the_rollout_stays_outside() {
    let c = config(
        3,
        r#","routing":{"rollout_percent":50,"default_provider":"c","affinity_header":"x-s"}"#,
    );
    let outside = (0..100)
        .map(|i| format!("s{i}"))
        .find(|s| crate::rng::fnv1a(s.as_bytes()) % 100 >= 50)
        .unwrap();
    for seed in 0..8 {
        let d = decide_on(
            &MockHost::envoy(),
            &c,
            None,
            &llm(&[("x-s", &outside)]),
            "m",
            0,
            seed,
        );
        assert_eq!(d.order, vec!["c".to_string()]);
    }
}

#[test]
fn a_pinned_session_goes_to_its_provider_first() {
    let c = config(3, r#","routing":{"affinity_header":"x-s"}"#);
    let (slot, tag) = headers::affinity_slot("u1");
    let key = format!("mr/aff/{slot}");
    let host = MockHost::envoy().with_value(&key, &headers::affinity_encode(&tag, "c"));
    let d = decide_on(&host, &c, None, &llm(&[("x-s", "u1")]), "m", 0, 1);
    let mut expected = ranked(&c, &Prefs::default(), 1);
    expected.retain(|n| n != "c");
    expected.insert(0, "c".into());
    assert_eq!(d.order, expected);
    let a = d.result.unwrap().unwrap();
    assert_eq!(
        a,
        Affinity {
            key: key.clone(),
            tag: tag.clone(),
            stored: Some("c".into())
        }
    );
    // Remembering the provider it is pinned to writes nothing; another one, the slot.
    a.remember(&host, "c");
    assert_eq!(host.tries(), 0);
    a.remember(&host, "a");
    assert_eq!(
        host.value(&key).unwrap(),
        headers::affinity_encode(&tag, "a")
    );
}

#[test]
fn a_slot_held_by_another_session_or_naming_no_candidate_pins_nothing() {
    let c = config(3, r#","routing":{"affinity_header":"x-s"}"#);
    let (slot, tag) = headers::affinity_slot("u1");
    let key = format!("mr/aff/{slot}");
    for value in [
        headers::affinity_encode("0000000000000000", "c"),
        headers::affinity_encode(&tag, "gone"),
        b"garbage".to_vec(),
    ] {
        let host = MockHost::envoy().with_value(&key, &value);
        let d = decide_on(&host, &c, None, &llm(&[("x-s", "u1")]), "m", 0, 1);
        assert_eq!(d.order, ranked(&c, &Prefs::default(), 1));
        let stored = d.result.unwrap().unwrap().stored;
        assert_ne!(stored.as_deref(), Some("c"));
    }
    // A refused read is no pin, and the session is still remembered.
    let host = MockHost::envoy().refusing_reads(HostError::InternalFailure);
    let d = decide_on(&host, &c, None, &llm(&[("x-s", "u1")]), "m", 0, 1);
    let a = d.result.unwrap().unwrap();
    assert_eq!((a.key, a.stored), (key, None));
}

#[test]
fn no_session_header_or_an_empty_one_keeps_no_slot() {
    let c = config(3, r#","routing":{"affinity_header":"x-s"}"#);
    for client in [llm(&[]), llm(&[("x-s", "")])] {
        let host = MockHost::envoy();
        let d = decide_on(&host, &c, None, &client, "m", 0, 1);
        assert_eq!(d.result, Ok(None));
    }
    // Without an affinity header configured, a session header means nothing.
    let d = simple(&config(3, ""), &llm(&[("x-s", "u1")]));
    assert_eq!(d.result, Ok(None));
}

#[test]
fn a_decision_on_stale_market_data_is_counted() {
    let c = config(
        2,
        r#","market":{"cluster":"x","max_age_ms":60000,"refresh_ms":1000}"#,
    );
    let doc = r#"{"version":1,"generated_at_ms":1000,"offers":[
        {"provider":"a","model":"m","price":{"input_per_mtok":1,"output_per_mtok":1},
         "latency_ms":{"ttft_p50":100},"uptime":0.99,"availability":"online","provider_type":"company"}]}"#;
    let view = MarketView::new(validate(doc.as_bytes(), &c, 0, None).unwrap().stored, &c);
    let host = MockHost::envoy();
    let fresh = decide_on(&host, &c, Some(&view), &llm(&[]), "m", 2_000, 1);
    assert!(fresh.result.is_ok());
    assert!(!fresh
        .fx
        .contains(&Effect::CountGlobal(Global::StaleDecisions)));
    let stale = decide_on(&host, &c, Some(&view), &llm(&[]), "m", 1_000 + 60_001, 1);
    assert!(stale.result.is_ok());
    assert_eq!(stale.fx, vec![Effect::CountGlobal(Global::StaleDecisions)]);
    assert!(stale.walk.ranking.as_ref().unwrap().stale);
}

#[test]
fn the_first_attempt_follows_the_mode_and_the_host() {
    let route = config(1, "");
    assert_eq!(first(&route, true), First::Route);
    // A host without route failover (Kong) dispatches route mode's attempts.
    assert_eq!(first(&route, false), First::Dispatch);
    let dispatch = config(1, r#","failover":{"mode":"dispatch"}"#);
    assert_eq!(first(&dispatch, true), First::Dispatch);
    assert_eq!(first(&dispatch, false), First::Dispatch);
    let envoy = config(1, r#","failover":{"mode":"envoy"}"#);
    assert_eq!(first(&envoy, true), First::Native);
    assert_eq!(first(&envoy, false), First::Native);
}
