//! What routing needs from an OpenAI-style request body, read in one pass without building a
//! JSON tree: `model` (and where it sits, for the rewrite), `stream`, `max_tokens`.
//!
//! The scanner validates the whole document's syntax (so a truncated or non-JSON body gets a
//! 400 here instead of an error from the provider) but only decodes the few top-level fields
//! it needs; everything else is skipped byte by byte.

use crate::json;
use std::ops::Range;

/// Facts about one request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// Requested model, decoded.
    pub model: String,
    /// Byte range of the `model` value in the body, quotes included.
    pub model_span: Range<usize>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// `max_tokens` or `max_completion_tokens`.
    pub max_tokens: Option<u64>,
    /// Body size in bytes.
    pub body_len: usize,
}

impl RequestInfo {
    /// Rough input token count: about four bytes of JSON per token.
    pub fn estimated_input_tokens(&self) -> u64 {
        (self.body_len as u64 / 4).max(1)
    }

    /// Output tokens: `max_tokens` when set, else the configured default.
    pub fn estimated_output_tokens(&self, default: u64) -> u64 {
        self.max_tokens.unwrap_or(default)
    }
}

/// Why a body cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Empty body.
    Empty,
    /// Not a JSON object (syntax error at byte offset).
    NotJson(usize),
    /// Top level is JSON but not an object.
    NotObject,
    /// No `model` field.
    NoModel,
    /// `model` is not a non-empty string.
    BadModel,
}

impl BodyError {
    /// Message for the 400 answer.
    pub fn message(&self) -> String {
        match self {
            Self::Empty => {
                "request body is empty; expected a JSON object with a `model` field".into()
            }
            Self::NotJson(at) => {
                format!("request body is not valid JSON (syntax error at byte {at})")
            }
            Self::NotObject => "request body must be a JSON object".into(),
            Self::NoModel => "request body has no `model` field".into(),
            Self::BadModel => "`model` must be a non-empty string".into(),
        }
    }

    /// OpenAI error code for the 400 answer.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty | Self::NotJson(_) | Self::NotObject => "invalid_json",
            Self::NoModel | Self::BadModel => "model_missing",
        }
    }
}

/// Scans a request body.
pub fn parse(body: &[u8]) -> Result<RequestInfo, BodyError> {
    let mut model: Option<(String, Range<usize>)> = None;
    let mut model_bad = false;
    let mut stream = false;
    let mut include_usage = false;
    let mut max_tokens = None;
    json::object_fields(body, |key, value| {
        let v = &body[value.clone()];
        match key {
            b"model" => match v.first() {
                Some(b'"') => match json::decode_string(v) {
                    Some(m) if !m.is_empty() => model = Some((m, value)),
                    _ => model_bad = true,
                },
                _ => model_bad = true,
            },
            b"stream" => stream = v == b"true",
            b"max_tokens" | b"max_completion_tokens" => {
                if let Some(n) = json::unsigned(v) {
                    max_tokens = Some(n);
                }
            }
            b"stream_options" => include_usage = stream_options_include_usage(v),
            _ => {}
        }
    })
    .map_err(|e| match e {
        json::ObjectError::Empty => BodyError::Empty,
        json::ObjectError::NotJson(at) => BodyError::NotJson(at),
        json::ObjectError::NotObject => BodyError::NotObject,
    })?;
    match model {
        Some((model, model_span)) if !model_bad => Ok(RequestInfo {
            model,
            model_span,
            stream,
            include_usage,
            max_tokens,
            body_len: body.len(),
        }),
        _ if model_bad => Err(BodyError::BadModel),
        _ => Err(BodyError::NoModel),
    }
}

/// The body with `model` replaced by `new_model`; `None` when no rewrite is needed.
pub fn rewrite_model(body: &[u8], info: &RequestInfo, new_model: &str) -> Option<Vec<u8>> {
    if new_model == info.model {
        return None;
    }
    let quoted = serde_json::to_string(new_model).ok()?;
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..info.model_span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[info.model_span.end..]);
    Some(out)
}

fn stream_options_include_usage(v: &[u8]) -> bool {
    let mut on = false;
    let _ = json::object_fields(v, |k, r| {
        if k == b"include_usage" {
            on = &v[r] == b"true";
        }
    });
    on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_stream_and_max_tokens() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"there\" {"}],"model":"gpt-4o-mini","stream":true,"max_tokens":64,"stream_options":{"include_usage":true}}"#;
        let info = parse(body).unwrap();
        assert_eq!(info.model, "gpt-4o-mini");
        assert!(info.stream && info.include_usage);
        assert_eq!(info.max_tokens, Some(64));
        assert_eq!(&body[info.model_span.clone()], br#""gpt-4o-mini""#);
    }

    #[test]
    fn nested_model_keys_are_not_the_model() {
        let body = br#"{"metadata":{"model":"nested"},"model":"top"}"#;
        assert_eq!(parse(body).unwrap().model, "top");
        let body = br#"{"metadata":{"model":"nested"}}"#;
        assert_eq!(parse(body), Err(BodyError::NoModel));
    }

    #[test]
    fn bad_bodies_are_classified() {
        assert_eq!(parse(b""), Err(BodyError::Empty));
        assert_eq!(parse(b"   "), Err(BodyError::Empty));
        assert!(matches!(parse(b"not json"), Err(BodyError::NotJson(0))));
        assert!(matches!(
            parse(br#"{"model":"a""#),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(
            parse(br#"{"model":"a"} x"#),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(
            parse(br#"{"model":"a","x":[1,2,}"#),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(
            parse(br#"{"model":"a","x":01.}"#),
            Err(BodyError::NotJson(_))
        ));
        assert_eq!(parse(b"[1,2]"), Err(BodyError::NotObject));
        assert_eq!(parse(br#"{"messages":[]}"#), Err(BodyError::NoModel));
        assert_eq!(parse(br#"{"model":7}"#), Err(BodyError::BadModel));
        assert_eq!(parse(br#"{"model":""}"#), Err(BodyError::BadModel));
        assert!(matches!(parse(&[b'['; 500]), Err(BodyError::NotJson(_))));
    }

    #[test]
    fn long_strings_are_skipped_word_by_word_without_missing_anything() {
        let filler = "x".repeat(1000) + "é漢字";
        let ok = format!(r#"{{"messages":[{{"content":"{filler}\\\"{filler}"}}],"model":"m"}}"#);
        assert_eq!(parse(ok.as_bytes()).unwrap().model, "m");
        // A control byte or an unterminated string deep in a long run is still caught.
        let bad = format!("{{\"messages\":\"{filler}\u{1}{filler}\",\"model\":\"m\"}}");
        assert!(matches!(parse(bad.as_bytes()), Err(BodyError::NotJson(_))));
        let cut = format!(r#"{{"model":"m","content":"{filler}"#);
        assert!(matches!(parse(cut.as_bytes()), Err(BodyError::NotJson(_))));
        for k in 0..16 {
            let s = format!(r#"{{"model":"m","c":"{}"}}"#, "y".repeat(k));
            assert!(parse(s.as_bytes()).is_ok(), "{k}");
        }
    }

    #[test]
    fn escaped_model_is_decoded() {
        let info = parse(br#"{"model":"a\/b\u0041"}"#).unwrap();
        assert_eq!(info.model, "a/bA");
    }

    #[test]
    fn rewrite_replaces_only_the_model_value() {
        let body = br#"{ "model" : "llama" , "messages":[{"content":"model llama"}]}"#;
        let info = parse(body).unwrap();
        let out = rewrite_model(body, &info, "meta/Llama-3 \"x\"").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "meta/Llama-3 \"x\"");
        assert_eq!(v["messages"][0]["content"], "model llama");
        assert!(rewrite_model(body, &info, "llama").is_none());
    }

    #[test]
    fn agrees_with_serde_json_on_validity() {
        let docs: &[&[u8]] = &[
            br#"{"model":"m","a":1e5,"b":-0.5,"c":[true,false,null],"d":{}}"#,
            br#"{"model":"m","a":1e}"#,
            br#"{"model":"m","a":"\x"}"#,
            br#"{"model":"m",}"#,
            br#"{"model":"m","a":[]}"#,
            br#"{"model":"m","a":01}"#,
            br#"{"model":"m","a":-0}"#,
            "{\"model\":\"m\",\"a\":\"tab\there\"}".as_bytes(),
        ];
        for d in docs {
            let ours = parse(d).is_ok();
            let theirs = serde_json::from_slice::<serde_json::Value>(d).is_ok();
            assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(d));
        }
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod exact_tests;
