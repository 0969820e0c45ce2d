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

/// `tidy` reaches into arrays (the members of `anyOf`, `allOf`, `oneOf`), whether or not the
/// shipped schema has an array member that needs it.
#[test]
fn tidy_reaches_objects_inside_arrays() {
    let mut v = serde_json::json!([{"description": "one\n  two", "type": ["integer", "null"]}]);
    super::tidy(&mut v);
    assert_eq!(
        v,
        serde_json::json!([{"description": "one two", "type": "integer"}])
    );
}

/// Whole floats become integers below 9e15 only (past it an f64 no longer holds every integer).
#[test]
fn tidy_turns_whole_floats_into_integers_below_9e15() {
    let tidied = |x: f64| {
        let mut v = serde_json::json!(x);
        super::tidy(&mut v);
        v
    };
    assert!(tidied(8.0e15).is_i64());
    assert!(tidied(9.0e15).is_f64());
    assert!(tidied(2.5).is_f64());
    assert_eq!(tidied(-3.0), serde_json::json!(-3));
}
