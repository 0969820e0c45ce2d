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
