//! Unit tests pinning the request scanner's estimates, error texts and edge cases (each kills
//! a mutant `make mutants` found surviving the tests in `request.rs`).

use super::*;

fn info(body_len: usize, max_tokens: Option<u64>) -> RequestInfo {
    RequestInfo {
        model: "m".into(),
        model_span: 0..0,
        stream: false,
        include_usage: false,
        max_tokens,
        body_len,
    }
}

#[test]
fn input_tokens_are_a_quarter_of_the_body_and_at_least_one() {
    assert_eq!(info(400, None).estimated_input_tokens(), 100);
    assert_eq!(info(403, None).estimated_input_tokens(), 100);
    assert_eq!(info(3, None).estimated_input_tokens(), 1);
    assert_eq!(info(0, None).estimated_input_tokens(), 1);
}

#[test]
fn output_tokens_are_max_tokens_else_the_default() {
    assert_eq!(info(10, Some(64)).estimated_output_tokens(256), 64);
    assert_eq!(info(10, None).estimated_output_tokens(256), 256);
}

#[test]
fn body_errors_have_their_message_and_code() {
    let cases = [
        (
            BodyError::Empty,
            "request body is empty; expected a JSON object with a `model` field",
            "invalid_json",
        ),
        (
            BodyError::NotJson(7),
            "request body is not valid JSON (syntax error at byte 7)",
            "invalid_json",
        ),
        (
            BodyError::NotObject,
            "request body must be a JSON object",
            "invalid_json",
        ),
        (
            BodyError::NoModel,
            "request body has no `model` field",
            "model_missing",
        ),
        (
            BodyError::BadModel,
            "`model` must be a non-empty string",
            "model_missing",
        ),
    ];
    for (e, message, code) in cases {
        assert_eq!(e.message(), message, "{e:?}");
        assert_eq!(e.code(), code, "{e:?}");
    }
}

#[test]
fn a_bad_model_anywhere_is_refused_even_beside_a_good_one() {
    assert_eq!(
        parse(br#"{"model":"a","model":7}"#),
        Err(BodyError::BadModel)
    );
    assert_eq!(
        parse(br#"{"model":7,"model":"a"}"#),
        Err(BodyError::BadModel)
    );
}

#[test]
fn include_usage_needs_a_literal_true() {
    for (stream_options, on) in [
        (r#"{"include_usage":true}"#, true),
        (r#"{"include_usage":false}"#, false),
        (r#"{"include_usage":"true"}"#, false),
        (r#"{}"#, false),
        (r#"{"other":true}"#, false),
        (r#"null"#, false),
    ] {
        let body = format!(r#"{{"model":"m","stream":true,"stream_options":{stream_options}}}"#);
        assert_eq!(parse(body.as_bytes()).unwrap().include_usage, on, "{body}");
    }
    assert!(
        !parse(br#"{"model":"m","stream":true}"#)
            .unwrap()
            .include_usage
    );
}

#[test]
fn stream_needs_a_literal_true_and_max_tokens_a_number() {
    let p = |b: &str| parse(b.as_bytes()).unwrap();
    assert!(!p(r#"{"model":"m","stream":"true"}"#).stream);
    assert!(!p(r#"{"model":"m","stream":false}"#).stream);
    assert_eq!(
        p(r#"{"model":"m","max_completion_tokens":9}"#).max_tokens,
        Some(9)
    );
    assert_eq!(p(r#"{"model":"m","max_tokens":"9"}"#).max_tokens, None);
    assert_eq!(p(r#"{"model":"m","max_tokens":-1}"#).max_tokens, None);
    assert_eq!(p(r#"{"model":"m"}"#).body_len, 13);
}
