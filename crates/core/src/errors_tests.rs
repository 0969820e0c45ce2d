//! Unit tests pinning every error the filter answers itself: status, OpenAI `type` and `code`,
//! the counter's reason and the message (each kills a mutant `make mutants` would otherwise
//! leave alive in `errors.rs`).

use super::*;

#[test]
fn every_error_has_its_status_type_code_and_reason() {
    let long = "m".repeat(300);
    let cases = [
        (
            ApiError::bad_request("invalid_json", "not json"),
            (
                Reason::BadRequest,
                400,
                "invalid_request_error",
                "invalid_json",
                "not json".to_string(),
            ),
        ),
        (
            ApiError::unknown_model(&long),
            (
                Reason::UnknownModel,
                404,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "model `{}` is not served by any provider configured in market-router",
                    "m".repeat(200)
                ),
            ),
        ),
        (
            ApiError::body_too_large(1024),
            (
                Reason::TooLarge,
                413,
                "invalid_request_error",
                "request_too_large",
                "request body exceeds limits.max_body_bytes (1024 bytes)".to_string(),
            ),
        ),
        (
            ApiError::no_provider("none fits"),
            (
                Reason::NoProvider,
                503,
                "service_unavailable",
                "no_provider_available",
                "none fits".to_string(),
            ),
        ),
        (
            ApiError::all_failed(429, "all failed"),
            (
                Reason::AllFailed,
                429,
                "upstream_error",
                "all_providers_failed",
                "all failed".to_string(),
            ),
        ),
        (
            ApiError::internal("host refused"),
            (
                Reason::Internal,
                500,
                "internal_error",
                "market_router_internal",
                "host refused".to_string(),
            ),
        ),
    ];
    for (e, (reason, status, kind, code, message)) in cases {
        assert_eq!(
            (e.reason, e.status, e.kind, e.code, e.message.clone()),
            (reason, status, kind, code, message)
        );
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": e.message, "type": kind, "code": code}})
        );
    }
}

#[test]
fn clip_keeps_strings_up_to_the_limit_and_cuts_on_a_char_boundary() {
    assert_eq!(clip("abc", 3), "abc");
    assert_eq!(clip("abcd", 3), "abc");
    assert_eq!(clip("", 0), "");
    // "é" is two bytes: a cut inside it moves back before it.
    assert_eq!(clip("aéb", 2), "a");
    assert_eq!(clip("aéb", 3), "aé");
    assert_eq!(clip("ééé", 5), "éé");
}
