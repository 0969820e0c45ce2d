//! The JSON Schema generated from the serde types is the one shipped in
//! `schema/market-router.schema.json` (`make validate` checks the same; here it also runs
//! against every mutant of the schema code: `make mutants` with `--features schema`).

#[test]
fn the_generated_schema_is_the_shipped_one() {
    let shipped: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schema/market-router.schema.json"
    )))
    .unwrap();
    assert!(
        super::json_schema() == shipped,
        "schema/market-router.schema.json is stale: run make schema"
    );
}
