//! The decision record: one JSON object per request saying what was asked, which providers were
//! tried and how each attempt ended, who answered, and at what price. The glue writes it to
//! Envoy's filter state (`wasm.market_router.decision`), where access logs can print it.
//! Written by hand into one buffer: it is built on every request.

use crate::json;
use std::io::Write;

/// What one request's record says.
#[derive(Debug, Clone, Default)]
pub struct Decision<'a> {
    /// Requested model.
    pub model: Option<&'a str>,
    /// Provider whose answer the client received.
    pub provider: Option<&'a str>,
    /// Status the client received.
    pub status: Option<u32>,
    /// Providers tried, in order, with how each attempt ended.
    pub tried: Vec<(&'a str, &'static str)>,
    /// Strategy that ranked the providers.
    pub strategy: Option<&'static str>,
    /// Score of the answering provider.
    pub score: Option<f64>,
    /// Cost of the answer, USD.
    pub cost_usd: Option<f64>,
    /// Whether the cost is an estimate (no usage in the answer).
    pub cost_estimated: Option<bool>,
    /// Prompt tokens from the answer's usage.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens from the answer's usage.
    pub completion_tokens: Option<u64>,
    /// Age of the market snapshot at decision time, ms.
    pub snapshot_age_ms: Option<u64>,
    /// What the last provider that answered with an error said (its error message, cleaned
    /// and clipped), when one did.
    pub provider_error: Option<&'a str>,
}

impl Decision<'_> {
    /// The record as a JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"model\":");
        string(&mut out, self.model);
        out.extend_from_slice(b",\"provider\":");
        string(&mut out, self.provider);
        out.extend_from_slice(b",\"status\":");
        integer(&mut out, self.status.map(u64::from));
        let _ = write!(out, ",\"attempts\":{},\"tried\":[", self.tried.len());
        for (i, (provider, outcome)) in self.tried.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'[');
            json::push_string(&mut out, provider);
            out.push(b',');
            json::push_string(&mut out, outcome);
            out.push(b']');
        }
        out.extend_from_slice(b"],\"strategy\":");
        string(&mut out, self.strategy);
        out.extend_from_slice(b",\"score\":");
        float(&mut out, self.score);
        out.extend_from_slice(b",\"cost_usd\":");
        float(&mut out, self.cost_usd);
        out.extend_from_slice(b",\"cost_estimated\":");
        out.extend_from_slice(match self.cost_estimated {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        });
        out.extend_from_slice(b",\"prompt_tokens\":");
        integer(&mut out, self.prompt_tokens);
        out.extend_from_slice(b",\"completion_tokens\":");
        integer(&mut out, self.completion_tokens);
        out.extend_from_slice(b",\"snapshot_age_ms\":");
        integer(&mut out, self.snapshot_age_ms);
        out.extend_from_slice(b",\"provider_error\":");
        string(&mut out, self.provider_error);
        out.push(b'}');
        out
    }
}

fn string(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(s) => json::push_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn integer(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.extend_from_slice(b"null"),
    }
}

fn float(out: &mut Vec<u8>, v: Option<f64>) {
    match v {
        // Display never uses an exponent and always gives a valid JSON number for finite values.
        Some(x) if x.is_finite() => {
            let _ = write!(out, "{x}");
        }
        _ => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn record_is_json_with_every_field() {
        let d = Decision {
            model: Some("gpt-4o-mini \"x\""),
            provider: Some("alpha"),
            status: Some(200),
            tried: vec![("beta", "503"), ("alpha", "ok")],
            strategy: Some("balanced"),
            score: Some(0.8123),
            cost_usd: Some(0.0000123),
            cost_estimated: Some(false),
            prompt_tokens: Some(50),
            completion_tokens: Some(8),
            snapshot_age_ms: Some(1234),
            provider_error: Some("beta: overloaded"),
        };
        let v: Value = serde_json::from_slice(&d.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"model": "gpt-4o-mini \"x\"", "provider": "alpha", "status": 200,
                   "attempts": 2, "tried": [["beta", "503"], ["alpha", "ok"]],
                   "strategy": "balanced", "score": 0.8123, "cost_usd": 0.0000123,
                   "cost_estimated": false, "prompt_tokens": 50, "completion_tokens": 8,
                   "snapshot_age_ms": 1234, "provider_error": "beta: overloaded"})
        );
    }

    #[test]
    fn missing_and_non_finite_values_are_null() {
        let d = Decision {
            score: Some(f64::NAN),
            cost_usd: Some(1e-12),
            ..Decision::default()
        };
        let v: Value = serde_json::from_slice(&d.to_json()).unwrap();
        assert_eq!(v["model"], Value::Null);
        assert_eq!(v["score"], Value::Null);
        assert_eq!(v["attempts"], 0);
        assert_eq!(v["tried"], json!([]));
        assert_eq!(v["provider_error"], Value::Null);
        assert!((v["cost_usd"].as_f64().unwrap() - 1e-12).abs() < 1e-24);
    }
}
