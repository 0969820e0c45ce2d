//! The configuration tables of `schema/config-cases.json` through `Config::parse`, as unit
//! tests (native and wasm): every must-reject and filter-only-reject case is refused naming a
//! field, every must-accept case parses. `scripts/check-schema.py` checks the same tables
//! against the JSON Schema, so the schema and the filter agree on every case.

use super::Config;
use serde_json::Value;

const CASES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../schema/config-cases.json"
));

/// `(label, configuration)` of one table.
fn table(name: &str) -> Vec<(String, Value)> {
    let doc: Value = serde_json::from_str(CASES).unwrap();
    let cases = doc[name].as_array().unwrap();
    assert!(!cases.is_empty(), "`{name}` is empty");
    cases
        .iter()
        .map(|c| {
            (
                c["label"].as_str().unwrap().to_string(),
                c["config"].clone(),
            )
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
            // The one log line an operator gets names the field.
            Err(e) if !e.contains("field `") => wrong.push(format!("{label}: no field in {e}")),
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
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
    let wrong: Vec<String> = table("must_accept")
        .into_iter()
        .filter_map(|(label, config)| parse(&config).err().map(|e| format!("{label}: {e}")))
        .collect();
    assert!(
        wrong.is_empty(),
        "Config::parse rejects:\n{}",
        wrong.join("\n")
    );
}
