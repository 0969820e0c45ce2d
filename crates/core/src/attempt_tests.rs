//! Unit tests pinning outcome labels and the 4xx retry switch (each kills mutants
//! `make mutants` found surviving the original tests).

use super::*;

fn status(s: u32) -> Outcome {
    Outcome::Status {
        status: s,
        retry_after_ms: None,
    }
}

#[test]
fn every_outcome_has_its_label() {
    let cases = [
        (Outcome::Success(200), "success"),
        (status(429), "429"),
        (status(500), "5xx"),
        (status(503), "5xx"),
        (status(499), "4xx"),
        (status(404), "4xx"),
        (Outcome::ConnectFailure, "connect_failure"),
        (Outcome::Reset, "reset"),
        (Outcome::Timeout, "timeout"),
        (Outcome::Malformed, "malformed"),
    ];
    for (o, label) in cases {
        assert_eq!(o.label(), label, "{o:?}");
    }
}

#[test]
fn client_errors_are_retried_only_with_4xx_in_retry_on() {
    let off = RetryOn::default();
    let on = RetryOn {
        status_4xx: true,
        ..RetryOn::default()
    };
    for s in [400, 404, 422, 499] {
        assert!(!status(s).retryable(&off, &[]), "{s} with the defaults");
        assert!(status(s).retryable(&on, &[]), "{s} with 4xx");
        assert!(
            status(s).retryable(&off, &[s]),
            "{s} listed in retry_on_status"
        );
    }
    // 4xx does not reach into 429 or 5xx: those have their own switches.
    let only_4xx = RetryOn {
        status_4xx: true,
        status_429: false,
        status_5xx: false,
        ..RetryOn::default()
    };
    assert!(!status(429).retryable(&only_4xx, &[]));
    assert!(!status(503).retryable(&only_4xx, &[]));
    assert!(!status(302).retryable(&on, &[]));
}

#[test]
fn only_the_providers_own_answers_come_from_the_provider() {
    for o in [
        Outcome::Success(200),
        status(503),
        status(400),
        Outcome::Malformed,
    ] {
        assert!(o.from_provider(), "{o:?}");
    }
    for o in [Outcome::ConnectFailure, Outcome::Reset, Outcome::Timeout] {
        assert!(!o.from_provider(), "{o:?}");
    }
}

#[test]
fn routed_local_replies_without_a_provider_are_connect_failures() {
    for d in [
        "cluster_not_found",
        "no_healthy_upstream",
        "upstream_connect_error",
    ] {
        assert_eq!(
            classify_routed(503, Some(d), None),
            Outcome::ConnectFailure,
            "{d}"
        );
    }
    // The provider's own answer keeps its status and Retry-After.
    assert_eq!(
        classify_routed(503, Some("via_upstream"), Some("2")),
        Outcome::Status {
            status: 503,
            retry_after_ms: Some(2000)
        }
    );
}

#[test]
fn the_attempt_in_flight_counts() {
    let config = Config::parse(
        br#"{"providers":[{"name":"a","cluster":"a","models":{"m":"m"}}],"failover":{"max_attempts":2}}"#,
    )
    .unwrap();
    assert_eq!(Attempts::new(&config, 1234).started_ms(), 1234);
    let mut a = Attempts::new(&config, 0);
    assert_eq!(a.count(), 0);
    a.start(0);
    assert_eq!(a.count(), 1);
    a.finish(Outcome::Timeout);
    assert_eq!(a.count(), 1);
    a.start(1);
    assert_eq!(a.count(), 2);
    a.finish(Outcome::Reset);
    assert_eq!(a.count(), 2);
    assert_eq!(a.tried, vec![(0, Outcome::Timeout), (1, Outcome::Reset)]);
}

#[test]
fn the_final_error_lists_each_attempt_and_picks_the_status() {
    let config = Config::parse(
        br#"{"providers":[{"name":"a","cluster":"a","models":{"m":"m"}},{"name":"b","cluster":"b","models":{"m":"m"}}]}"#,
    )
    .unwrap();
    let with = |tried: Vec<(usize, Outcome)>| {
        let mut a = Attempts::new(&config, 0);
        a.tried = tried;
        a.final_error(&config, "m", None)
    };
    // The last attempt got an error answer: its status is kept.
    let e = with(vec![(0, Outcome::Timeout), (1, status(503))]);
    assert_eq!(e.status, 503);
    assert_eq!(e.code, "all_providers_failed");
    assert_eq!(
        e.message,
        "all 2 attempt(s) for model `m` failed: a: timeout; b: status 503"
    );
    // It got none: mixed failures are a bad gateway.
    let e = with(vec![(0, status(503)), (1, Outcome::Timeout)]);
    assert_eq!(e.status, 502);
    assert_eq!(
        e.message,
        "all 2 attempt(s) for model `m` failed: a: status 503; b: timeout"
    );
    let e = with(vec![(1, Outcome::ConnectFailure)]);
    assert_eq!(e.status, 503);
    assert_eq!(
        e.message,
        "all 1 attempt(s) for model `m` failed: b: connect failure"
    );
    assert_eq!(
        with(vec![(0, Outcome::Timeout), (1, Outcome::Timeout)]).status,
        504
    );
    assert_eq!(with(vec![(0, status(429)), (1, status(503))]).status, 503);
}

fn walk_config(extra: &str) -> Config {
    crate::test_support::config(3, extra)
}

/// 3000 ms attempts under a 3500 ms deadline: the second attempt gets the last 500 ms; once
/// it times out the deadline is spent, even when the timeout is reported a millisecond early
/// by the host's clock.
#[test]
fn an_attempt_given_the_rest_of_the_deadline_ends_the_walk_when_it_times_out() {
    let c = walk_config(r#","failover":{"attempt_timeout_ms":3000,"deadline_ms":3500}"#);
    let mut cands: Vec<Candidate> = (0..3).map(crate::test_support::cand).collect();
    let mut a = Attempts::new(&c, 0);
    assert_eq!(a.pick(&mut cands, 0, |_| true), Some((0, 3000)));
    a.start(0);
    a.finish(Outcome::Timeout);
    // The first attempt ended before the deadline: the walk goes on.
    assert_eq!(a.pick(&mut cands, 2999, |_| true), Some((1, 501)));
    a.start(1);
    a.finish(Outcome::Timeout);
    assert_eq!(a.next(&cands, 3499), Next::GiveUp);
    assert_eq!(a.pick(&mut cands, 3499, |_| true), None);
    assert_eq!(a.count(), 2);
}

/// An attempt given the rest of the deadline that fails in another way (a 503, a refused
/// connection) leaves the rest of the deadline to the next one.
#[test]
fn an_attempt_to_the_deadline_that_fails_early_leaves_the_rest() {
    let c = walk_config(r#","failover":{"attempt_timeout_ms":3000,"deadline_ms":3500}"#);
    let mut cands: Vec<Candidate> = (0..3).map(crate::test_support::cand).collect();
    let mut a = Attempts::new(&c, 0);
    assert_eq!(a.pick(&mut cands, 0, |_| true), Some((0, 3000)));
    a.start(0);
    a.finish(Outcome::Timeout);
    assert_eq!(a.pick(&mut cands, 3000, |_| true), Some((1, 500)));
    a.start(1);
    a.finish(Outcome::ConnectFailure);
    assert_eq!(a.pick(&mut cands, 3100, |_| true), Some((2, 400)));
}

/// A timeout of an attempt that did not run to the deadline does not spend it, and neither
/// does one whose timeout the host bounded in its own way (`unbounded`).
#[test]
fn only_an_attempt_bounded_by_the_deadline_spends_it() {
    let c = walk_config(r#","failover":{"attempt_timeout_ms":1000,"deadline_ms":1000}"#);
    let mut cands: Vec<Candidate> = (0..3).map(crate::test_support::cand).collect();
    let mut a = Attempts::new(&c, 0);
    // The first attempt's timeout is the whole deadline.
    assert_eq!(a.pick(&mut cands, 0, |_| true), Some((0, 1000)));
    a.start(0);
    a.unbounded();
    // A streaming first attempt cut by the route's idle timeout at 400 ms.
    a.finish(Outcome::Timeout);
    assert_eq!(a.pick(&mut cands, 400, |_| true), Some((1, 600)));
    a.start(1);
    a.finish(Outcome::Timeout);
    assert_eq!(a.pick(&mut cands, 999, |_| true), None);

    let c = walk_config(r#","failover":{"attempt_timeout_ms":1000,"deadline_ms":5000}"#);
    let mut a = Attempts::new(&c, 0);
    assert_eq!(a.pick(&mut cands, 0, |_| true), Some((0, 1000)));
    a.start(0);
    a.finish(Outcome::Timeout);
    assert_eq!(a.pick(&mut cands, 1000, |_| true), Some((1, 1000)));
}
