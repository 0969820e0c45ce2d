//! The configuration tables of `schema/config-cases.json` through the filter's own validator,
//! `Config::parse`: `scripts/check-schema.py` checks the same tables against the JSON Schema,
//! so the schema and the filter agree on every case (and the filter also refuses the cases
//! only it can judge). Needs nothing but the crate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_core::config::Config;
use serde_json::Value;

/// `(label, configuration)` of one table.
fn table(name: &str) -> Vec<(String, Value)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schema/config-cases.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let cases = doc[name]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no `{name}` table"));
    assert!(!cases.is_empty(), "{path}: `{name}` is empty");
    cases
        .iter()
        .map(|c| {
            let label = c["label"]
                .as_str()
                .unwrap_or_else(|| panic!("{path}: a `{name}` case without a label: {c}"));
            (label.to_string(), c["config"].clone())
        })
        .collect()
}

/// Parses through the public entry point, from bytes, as the host hands them over.
fn parse(config: &Value) -> Result<Config, String> {
    Config::parse(config.to_string().as_bytes()).map_err(|e| e.to_string())
}

fn assert_all_rejected(name: &str) {
    let mut wrong = Vec::new();
    for (label, config) in table(name) {
        match parse(&config) {
            Ok(_) => wrong.push(format!("{label}: accepted {config}")),
            Err(e) => eprintln!("rejects {label}: {e}"),
        }
    }
    assert!(
        wrong.is_empty(),
        "{name}: Config::parse accepts:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn config_parse_rejects_every_must_reject_case() {
    assert_all_rejected("must_reject");
}

#[test]
fn config_parse_rejects_the_rules_the_schema_cannot_express() {
    assert_all_rejected("filter_only_reject");
}

#[test]
fn config_parse_accepts_every_must_accept_case() {
    let mut wrong = Vec::new();
    for (label, config) in table("must_accept") {
        if let Err(e) = parse(&config) {
            wrong.push(format!("{label}: {e}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "Config::parse rejects:\n{}",
        wrong.join("\n")
    );
}

/// A refusal names the field it is about (the one log line an operator gets).
#[test]
fn every_refusal_names_a_field() {
    for name in ["must_reject", "filter_only_reject"] {
        for (label, config) in table(name) {
            let e = parse(&config).expect_err(&label);
            assert!(e.contains("field `"), "{label}: {e}");
        }
    }
}
