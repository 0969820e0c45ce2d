//! Unit tests pinning `config`'s defaults and cross-field rules at their edges (each kills a
//! mutant `make mutants` found surviving the tests in `config.rs`).

use super::*;

fn parse(extra: &str) -> Result<Config, ConfigError> {
    let doc =
        format!(r#"{{"providers":[{{"name":"a","cluster":"ca","models":{{"m":"m"}}}}]{extra}}}"#);
    Config::parse(doc.as_bytes())
}

#[test]
fn limits_default_to_one_and_four_mebibytes() {
    let c = parse("").unwrap();
    assert_eq!(c.max_body_bytes, 1_048_576);
    assert_eq!(c.max_snapshot_bytes, 4_194_304);
}

#[test]
fn max_age_defaults_to_a_minute_or_two_refresh_periods() {
    let market = |m: &str| {
        parse(&format!(r#","market":{{"cluster":"x"{m}}}"#))
            .unwrap()
            .market
            .unwrap()
    };
    assert_eq!(market("").max_age_ms, 60_000);
    assert_eq!(market(r#","refresh_ms":20000"#).max_age_ms, 60_000);
    assert_eq!(market(r#","refresh_ms":45000"#).max_age_ms, 90_000);
    // At least one refresh period: equal is allowed, less is refused.
    assert_eq!(
        market(r#","refresh_ms":5000,"max_age_ms":5000"#).max_age_ms,
        5000
    );
    let e = parse(r#","market":{"cluster":"x","refresh_ms":5000,"max_age_ms":4999}"#).unwrap_err();
    assert_eq!(e.field, "market.max_age_ms");
    assert_eq!(e.expected, "expected at least market.refresh_ms (5000)");
}

#[test]
fn the_deadline_must_hold_one_attempt() {
    let f = |x: &str| parse(&format!(r#","failover":{{{x}}}"#));
    assert_eq!(
        f(r#""attempt_timeout_ms":2000,"deadline_ms":2000"#)
            .unwrap()
            .failover
            .deadline_ms,
        2000
    );
    let e = f(r#""attempt_timeout_ms":2000,"deadline_ms":1999"#).unwrap_err();
    assert_eq!(e.field, "failover.deadline_ms");
    let e = f(r#""attempt_timeout_ms":2000,"deadline_ms":1000"#).unwrap_err();
    assert_eq!(e.field, "failover.deadline_ms");
    // Omitted: the larger of 90 s and the attempt timeout.
    assert_eq!(f("").unwrap().failover.deadline_ms, 90_000);
    assert_eq!(
        f(r#""attempt_timeout_ms":120000"#)
            .unwrap()
            .failover
            .deadline_ms,
        120_000
    );
}

#[test]
fn weights_are_normalized_to_sum_one() {
    let w = parse(r#","routing":{"weights":{"price":1,"latency":1,"reliability":2}}"#)
        .unwrap()
        .routing
        .weights;
    assert_eq!((w.price, w.latency, w.reliability), (0.25, 0.25, 0.5));
    let w = parse(r#","routing":{"weights":{"latency":0.5}}"#)
        .unwrap()
        .routing
        .weights;
    // price 0.5 and reliability 0.2 by default, latency 0.5: sum 1.2.
    assert!((w.latency - 0.5 / 1.2).abs() < 1e-12);
    assert!((w.price - 0.5 / 1.2).abs() < 1e-12);
    assert!((w.reliability - 0.2 / 1.2).abs() < 1e-12);
}

#[test]
fn refused_values_are_shown_whole_up_to_80_bytes() {
    // A JSON string of 80 bytes (78 characters and its quotes) is shown as it is.
    let at = |n: usize| {
        let e = parse(&format!(r#","routing":{{"strategy":"{}"}}"#, "x".repeat(n))).unwrap_err();
        e.value
    };
    assert_eq!(at(78), format!("\"{}\"", "x".repeat(78)));
    assert_eq!(at(79), format!("\"{}…", "x".repeat(79)));
    assert_eq!(shown(None), "(missing)");
}

#[test]
fn model_names_and_ids_must_both_be_non_empty() {
    let models = |m: &str| {
        Config::parse(
            format!(r#"{{"providers":[{{"name":"a","cluster":"ca","models":{m}}}]}}"#).as_bytes(),
        )
    };
    assert!(models(r#"{"m":"id"}"#).is_ok());
    let e = models(r#"{"":"id"}"#).unwrap_err();
    assert_eq!(e.field, "providers[0].models.");
    let e = models(r#"{"m":""}"#).unwrap_err();
    assert_eq!(e.field, "providers[0].models.m");
    assert!(models(r#"{"m":7}"#).is_err());
    assert!(models(r#"{}"#).is_err());
}
