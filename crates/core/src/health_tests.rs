//! Unit tests that pin the exact arithmetic and boundaries of `health` (each kills mutants
//! `make mutants` found surviving the original tests).

use super::*;

const C: Circuit = Circuit {
    failure_threshold: 3,
    cooldown_ms: 1000,
};
const OK: Observation = Observation::Success { ttfb_ms: None };

fn ok_after(ttfb: f64) -> Observation {
    Observation::Success {
        ttfb_ms: Some(ttfb),
    }
}

/// A success on a record that is not clean is shared, whichever part is not clean.
#[test]
fn a_success_is_shared_unless_the_record_was_clean() {
    let cases = [
        (
            "failures, circuit closed, no error rate",
            2,
            CircuitState::Closed,
            0.0,
        ),
        (
            "no failures, circuit open, no error rate",
            0,
            CircuitState::Open { until: 9 },
            0.0,
        ),
        (
            "no failures, circuit closed, high error rate",
            0,
            CircuitState::Closed,
            0.5,
        ),
        (
            "no failures, circuit closed, error rate at 0.01",
            0,
            CircuitState::Closed,
            0.01,
        ),
    ];
    for (what, failures, circuit, error_rate) in cases {
        let mut h = ProviderHealth {
            consecutive_failures: failures,
            circuit,
            error_rate,
            ..Default::default()
        };
        assert!(h.observe(OK, 0, &C), "{what}");
    }
    let mut clean = ProviderHealth {
        error_rate: 0.009,
        ..Default::default()
    };
    assert!(!clean.observe(OK, 0, &C));
}

#[test]
fn a_success_decays_the_error_rate_by_alpha() {
    let mut h = ProviderHealth {
        error_rate: 0.5,
        ..Default::default()
    };
    h.observe(OK, 0, &C);
    assert!((h.error_rate - 0.4).abs() < 1e-12, "{}", h.error_rate);
    // Below 1e-4 it is rounded to zero; at exactly 1e-4 it is kept.
    let mut tiny = ProviderHealth {
        error_rate: 5e-5,
        ..Default::default()
    };
    tiny.observe(OK, 0, &C);
    assert_eq!(tiny.error_rate, 0.0);
    let mut edge = ProviderHealth {
        error_rate: 1.25e-4,
        ..Default::default()
    };
    edge.observe(OK, 0, &C);
    assert_eq!(edge.error_rate, 1e-4);
}

#[test]
fn time_to_first_byte_is_an_ewma_and_small_moves_are_not_shared() {
    let mut h = ProviderHealth::default();
    assert!(
        h.observe(ok_after(100.0), 0, &C),
        "the first sample is shared"
    );
    assert_eq!((h.ttfb_ms, h.samples), (100.0, 1));
    // 100 + 0.2 × (150 − 100) = 110: a move of exactly the 10 % threshold is not shared.
    assert!(!h.observe(ok_after(150.0), 0, &C));
    assert_eq!((h.ttfb_ms, h.samples), (110.0, 2));
    // 110 + 0.2 × (210 − 110) = 130: over it.
    assert!(h.observe(ok_after(210.0), 0, &C));
    assert!((h.ttfb_ms - 130.0).abs() < 1e-9, "{}", h.ttfb_ms);
    // Slow answers: the threshold is 10 % of the average (100 ms at 1000), not 10 ms.
    let mut slow = ProviderHealth::default();
    slow.observe(ok_after(1000.0), 0, &C);
    assert!(
        !slow.observe(ok_after(1250.0), 0, &C),
        "a 50 ms move at 1000 ms"
    );
    assert!(
        slow.observe(ok_after(2000.0), 0, &C),
        "a 190 ms move at 1050 ms"
    );
}

#[test]
fn a_failure_raises_the_error_rate_towards_one() {
    let fail = Observation::Failure {
        retry_after_ms: None,
    };
    let mut h = ProviderHealth::default();
    h.observe(fail, 0, &C);
    assert!((h.error_rate - 0.2).abs() < 1e-12, "{}", h.error_rate);
    h.observe(fail, 0, &C);
    assert!((h.error_rate - 0.36).abs() < 1e-12, "{}", h.error_rate);
}

#[test]
fn the_table_hands_back_what_was_recorded() {
    let mut t = HealthTable::default();
    t.entry("a").observe(
        Observation::Failure {
            retry_after_ms: None,
        },
        0,
        &C,
    );
    assert_eq!(t.get("a").consecutive_failures, 1);
    assert_eq!(t.get("b"), ProviderHealth::default());
}
