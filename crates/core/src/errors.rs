//! OpenAI-style error bodies for the answers the filter gives itself.
//!
//! Shape: `{"error": {"message": "...", "type": "...", "code": "..."}}`, always served with
//! `content-type: application/json`.

use serde_json::json;

/// Why the filter answered a request itself: what its counters count (`code` is the same
/// fact as the client reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// 400: the body cannot be routed.
    BadRequest,
    /// 404: no configured provider serves the model.
    UnknownModel,
    /// 413: the body is over the limit.
    TooLarge,
    /// 503: no candidate meets the constraints or is healthy.
    NoProvider,
    /// Every attempt failed.
    AllFailed,
    /// A host call failed.
    Internal,
}

/// An error the filter answers on its own, without (or after) reaching a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Why, for the counters.
    pub reason: Reason,
    /// HTTP status of the local reply.
    pub status: u32,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// OpenAI error `code`.
    pub code: &'static str,
    /// A message a person can act on.
    pub message: String,
}

impl ApiError {
    /// 400: the request body cannot be routed (not JSON, no `model`).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason: Reason::BadRequest,
            status: 400,
            kind: "invalid_request_error",
            code,
            message: message.into(),
        }
    }

    /// 404: no configured provider serves the model.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            reason: Reason::UnknownModel,
            status: 404,
            kind: "invalid_request_error",
            code: "model_not_found",
            message: format!(
                "model `{}` is not served by any provider configured in market-router",
                clip(model, 200)
            ),
        }
    }

    /// 413: the body is larger than `limits.max_body_bytes`.
    pub fn body_too_large(limit: usize) -> Self {
        Self {
            reason: Reason::TooLarge,
            status: 413,
            kind: "invalid_request_error",
            code: "request_too_large",
            message: format!("request body exceeds limits.max_body_bytes ({limit} bytes)"),
        }
    }

    /// 503: candidates exist but none meets the constraints or is healthy.
    pub fn no_provider(message: impl Into<String>) -> Self {
        Self {
            reason: Reason::NoProvider,
            status: 503,
            kind: "service_unavailable",
            code: "no_provider_available",
            message: message.into(),
        }
    }

    /// 502/503/504: every attempt failed.
    pub fn all_failed(status: u32, message: impl Into<String>) -> Self {
        Self {
            reason: Reason::AllFailed,
            status,
            kind: "upstream_error",
            code: "all_providers_failed",
            message: message.into(),
        }
    }

    /// 500: the filter itself could not proceed (a host call failed).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            reason: Reason::Internal,
            status: 500,
            kind: "internal_error",
            code: "market_router_internal",
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
            .to_string()
            .into_bytes()
    }
}

/// Cuts a client-supplied string for use in a message, on a char boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = ApiError::unknown_model("gpt-x");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-x"));
        assert_eq!(e.status, 404);
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("añb", 2), "a");
        assert_eq!(clip("abc", 5), "abc");
    }
}

#[cfg(test)]
#[path = "errors_tests.rs"]
mod exact_tests;
