//! What the client and the counters learn about an answer, on the paths the real-host suites
//! check it (promises.rs: our headers, `response_headers: false`, the soonest retry-after;
//! traffic.rs: providers that always compress are not charged; observability.rs: the record).

use super::*;
use crate::attempt::{Attempts, Outcome};
use crate::config::Strategy;
use crate::select::{Candidate, Ranking};
use crate::test_support;

const T0: u64 = 1_000_000;

fn cand(provider: usize, expected_cost_usd: f64) -> Candidate {
    Candidate {
        input_per_mtok: 2.0,
        output_per_mtok: 8.0,
        expected_cost_usd,
        score: 0.123_456,
        ..test_support::cand(provider)
    }
}

fn config(extra: &str) -> Config {
    test_support::config(2, extra)
}

/// A walk whose attempts ended so, in order (provider 0 first).
fn walk(config: &Config, outcomes: &[Outcome]) -> Walk {
    let mut w = Walk::default();
    w.begin(
        Ranking {
            strategy: Strategy::Value,
            candidates: vec![cand(0, 0.001), cand(1, 0.002)],
            excluded: Vec::new(),
            stale: false,
            last_resort: false,
            ttft_target_ms: None,
            ttft_target_source: None,
        },
        Attempts::new(config, T0),
    );
    for o in outcomes {
        let a = w.next(T0, |_| true).unwrap();
        w.started(a.provider, T0, |_| {});
        w.answered(*o, T0 + 5, false, &config.failover, true, |_| {});
    }
    w
}

fn served<'a>(config: &'a Config, walk: &'a Walk, usage: Option<Usage>) -> Served<'a> {
    Served {
        config,
        walk,
        model: Some("m"),
        usage,
        snapshot_age_ms: Some(1500),
        provider_error: None,
    }
}

const USAGE: Usage = Usage {
    prompt_tokens: 1000,
    completion_tokens: 500,
};

fn headers_of(s: &Served<'_>, provider: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    s.headers(provider, |k, v| out.push((k.to_string(), v.to_string())));
    out
}

#[test]
fn an_answer_with_usage_is_priced_from_it_and_counted() {
    let c = config("");
    let w = walk(&c, &[Outcome::Success(200)]);
    let s = served(&c, &w, Some(USAGE));
    assert_eq!(s.provider(), Some(0));
    // 1000 * 2 + 500 * 8 per million tokens.
    assert_eq!(s.cost(0), Some((0.006, false)));
    assert_eq!(
        s.counts(0),
        [
            Some((PerProvider::TokensIn, 1000)),
            Some((PerProvider::TokensOut, 500)),
            Some((PerProvider::CostMicroUsd, 6000)),
        ]
    );
    let hs = headers_of(&s, 0);
    let want: Vec<(String, String)> = [
        ("x-market-router-provider", "a"),
        ("x-market-router-attempts", "1"),
        ("x-market-router-strategy", "value"),
        ("x-market-router-snapshot-age-ms", "1500"),
        ("x-market-router-cost-usd", "0.00600000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(hs, want);
}

#[test]
fn an_answer_without_usage_is_priced_from_the_estimate_and_not_charged() {
    let c = config("");
    let w = walk(
        &c,
        &[
            Outcome::Status {
                status: 503,
                retry_after_ms: None,
            },
            Outcome::Success(200),
        ],
    );
    let s = served(&c, &w, None);
    assert_eq!(s.provider(), Some(1));
    assert_eq!(s.cost(1), Some((0.002, true)));
    assert_eq!(s.counts(1), [None, None, None]);
    let hs = headers_of(&s, 1);
    assert!(hs.contains(&("x-market-router-attempts".into(), "2".into())));
    assert!(hs.contains(&("x-market-router-cost-estimated".into(), "true".into())));
    // With usage but no per-token price, the estimate stands and nothing is charged.
    let mut w2 = walk(&c, &[Outcome::Success(200)]);
    if let Some(r) = w2.ranking.as_mut() {
        r.candidates[0].input_per_mtok = f64::NAN;
    }
    let s2 = served(&c, &w2, Some(USAGE));
    assert_eq!(s2.cost(0), Some((0.001, true)));
    assert_eq!(s2.counts(0)[2], None);
}

#[test]
fn response_headers_off_leaves_out_our_headers_only() {
    let c = config(r#","response_headers":false"#);
    let w = walk(
        &c,
        &[Outcome::Status {
            status: 429,
            retry_after_ms: Some(3000),
        }],
    );
    let s = served(&c, &w, None);
    assert!(headers_of(&s, 0).is_empty());
    // The standard retry-after still goes out.
    assert_eq!(
        s.error_headers(),
        [
            ("content-type".to_string(), "application/json".to_string()),
            ("retry-after".to_string(), "3".to_string()),
        ]
    );
}

#[test]
fn an_error_answer_carries_the_attempts_and_the_soonest_retry_after() {
    let c = config(r#","failover":{"max_attempts":2}"#);
    let w = walk(
        &c,
        &[
            Outcome::Status {
                status: 429,
                retry_after_ms: Some(9000),
            },
            Outcome::Status {
                status: 429,
                retry_after_ms: Some(2000),
            },
        ],
    );
    let s = served(&c, &w, None);
    let hs = s.error_headers();
    assert!(hs.contains(&("x-market-router-attempts".into(), "2".into())));
    assert!(hs.contains(&("retry-after".into(), "2".into())));
    let e = s.final_error(Some("slow down"));
    assert_eq!(e.status, 429);
}

#[test]
fn nothing_tried_is_a_no_provider_error() {
    let c = config("");
    let w = Walk::default();
    let s = served(&c, &w, None);
    let e = s.final_error(None);
    assert_eq!(e.status, 503);
    assert!(e
        .message
        .contains("no provider for model `m` could be tried"));
    assert_eq!(s.error_headers().len(), 1);
    assert_eq!(s.provider(), None);
}

#[test]
fn the_decision_record_lists_every_attempt_and_who_answered() {
    let c = config("");
    let w = walk(&c, &[Outcome::Timeout, Outcome::Success(200)]);
    let s = served(&c, &w, Some(USAGE));
    let d = s.decision(Some(1), Some(200));
    assert_eq!(d.model, Some("m"));
    assert_eq!(d.provider, Some("b"));
    assert_eq!(d.status, Some(200));
    assert_eq!(d.tried, [("a", "timeout"), ("b", "success")]);
    assert_eq!(d.strategy, Some("value"));
    assert_eq!(d.score, Some(0.1235));
    assert_eq!(d.cost_usd, Some(0.006));
    assert_eq!(d.cost_estimated, Some(false));
    assert_eq!(
        (d.prompt_tokens, d.completion_tokens),
        (Some(1000), Some(500))
    );
    assert_eq!(d.snapshot_age_ms, Some(1500));
    // A local reply names no provider, score or cost.
    let d = s.decision(None, Some(503));
    assert_eq!((d.provider, d.score, d.cost_usd), (None, None, None));
    assert_eq!(d.tried.len(), 2);
}

#[test]
fn an_answer_without_usage_or_a_finite_estimate_has_no_cost() {
    let c = config("");
    let mut w = walk(&c, &[Outcome::Success(200)]);
    if let Some(r) = w.ranking.as_mut() {
        r.candidates[0].expected_cost_usd = f64::NAN;
        r.candidates[1].expected_cost_usd = f64::INFINITY;
    }
    let s = served(&c, &w, None);
    assert_eq!((s.cost(0), s.cost(1)), (None, None));
    assert!(!headers_of(&s, 0)
        .iter()
        .any(|(k, _)| k.starts_with("x-market-router-cost")));
    let d = s.decision(Some(0), Some(200));
    assert_eq!((d.cost_usd, d.cost_estimated), (None, None));
}

#[test]
fn the_decision_record_scores_the_provider_that_answered() {
    let c = config("");
    let mut w = walk(&c, &[Outcome::Success(200)]);
    if let Some(r) = w.ranking.as_mut() {
        r.candidates[1].score = 0.5;
    }
    let s = served(&c, &w, Some(USAGE));
    assert_eq!(s.decision(Some(1), Some(200)).score, Some(0.5));
    assert_eq!(s.decision(Some(0), Some(200)).score, Some(0.1235));
}

#[test]
fn a_walk_begun_with_nothing_tried_is_a_no_provider_error() {
    let c = config("");
    let w = walk(&c, &[]);
    let e = served(&c, &w, None).final_error(None);
    assert_eq!(e.status, 503);
    assert!(e
        .message
        .contains("no provider for model `m` could be tried"));
}
