//! Unit tests pinning the leaf types' bounds and string rules (each kills a mutant
//! `make mutants` found surviving the tests of the configuration).

use super::*;
use serde_json::json;

fn de<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

#[test]
fn number_bounds_are_in_thousandths() {
    assert_eq!(Num::<1, 3_600_000_000>::MIN, 0.001);
    assert_eq!(Num::<1, 3_600_000_000>::MAX, 3_600_000.0);
    assert_eq!(Num::<0, 1000>::MAX, 1.0);
    assert!(de::<Num<1, 3_600_000_000>>(json!(0.001)).is_ok());
    assert!(de::<Num<1, 3_600_000_000>>(json!(0.0009)).is_err());
    assert!(de::<Num<1, 3_600_000_000>>(json!(3_600_000.0)).is_ok());
    assert!(de::<Num<1, 3_600_000_000>>(json!(3_600_000.1)).is_err());
    assert_eq!(
        de::<Num<0, 1000>>(json!(2)).unwrap_err(),
        "expected a number in 0..=1"
    );
}

#[test]
fn integers_stay_within_their_bounds() {
    assert!(de::<Int<1, 10>>(json!(1)).is_ok());
    assert!(de::<Int<1, 10>>(json!(10)).is_ok());
    assert!(de::<Int<1, 10>>(json!(0)).is_err());
    assert!(de::<Int<1, 10>>(json!(11)).is_err());
    assert!(de::<Int<1, 10>>(json!(2.5)).is_err());
}

#[test]
fn retried_statuses_are_400_to_599() {
    for ok in [400, 429, 599] {
        assert_eq!(de::<ErrorStatus>(json!(ok)).unwrap().0, ok as u32);
    }
    for bad in [399, 600, 200, 302] {
        assert_eq!(
            de::<ErrorStatus>(json!(bad)).unwrap_err(),
            "expected an HTTP status in 400..=599"
        );
    }
}

#[test]
fn strings_must_be_non_empty_and_pass_their_rule() {
    assert_eq!(
        de::<Str<Text>>(json!("")).unwrap_err(),
        "expected a non-empty string"
    );
    assert!(de::<Str<Text>>(json!("x")).is_ok());
    // Names: 1-64 of A-Z a-z 0-9 - _ .
    assert!(de::<Str<NameRule>>(json!("acme.eu-1_x")).is_ok());
    assert!(de::<Str<NameRule>>(json!("a".repeat(64))).is_ok());
    assert_eq!(
        de::<Str<NameRule>>(json!("a".repeat(65))).unwrap_err(),
        NameRule::EXPECTED
    );
    assert!(de::<Str<NameRule>>(json!("a b")).is_err());
    assert!(de::<Str<NameRule>>(json!("a/b")).is_err());
    assert!(!is_name("") && is_name("A9") && !is_name("ä"));
    // Paths start with /.
    assert!(de::<Str<PathRule>>(json!("/v1/market")).is_ok());
    assert_eq!(
        de::<Str<PathRule>>(json!("v1/market")).unwrap_err(),
        PathRule::EXPECTED
    );
    // Prefixes: start with /, do not end with /, no ?.
    assert!(de::<Str<PrefixRule>>(json!("/mr/v1")).is_ok());
    for bad in ["mr/v1", "/mr/v1/", "/mr?x", "/"] {
        assert_eq!(
            de::<Str<PrefixRule>>(json!(bad)).unwrap_err(),
            PrefixRule::EXPECTED,
            "{bad}"
        );
    }
}
