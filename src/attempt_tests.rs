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
