//! Metric names and the cost arithmetic behind them. The glue defines each name once per VM
//! and keeps the ids; Envoy shows them under `wasmcustom.` in `/stats` and `/stats/prometheus`.

use crate::errors::Reason;
use crate::json;

/// Counters not tied to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// LLM requests seen (routed paths only).
    Requests,
    /// Answered 400: body not routable.
    RejectedBadRequest,
    /// Answered 404: unknown model.
    RejectedUnknownModel,
    /// Answered 413: body too large.
    RejectedTooLarge,
    /// Answered 503: no provider met the constraints.
    RejectedNoProvider,
    /// Every attempt failed.
    AllFailed,
    /// Requests that needed more than one attempt and succeeded.
    RecoveredByFailover,
    /// Snapshot refreshes that stored new data.
    RefreshOk,
    /// Snapshot refreshes answered 304.
    RefreshNotModified,
    /// Snapshot refreshes that failed (sidecar down, non-200, invalid).
    RefreshFailed,
    /// Offers dropped as invalid.
    OffersInvalid,
    /// Decisions made on stale market data.
    StaleDecisions,
    /// Requests sent through market routing under `rollout_percent`.
    RolloutMarket,
    /// Requests sent to `default_provider` under `rollout_percent`.
    RolloutDefault,
    /// Streams that failed after bytes reached the client (not recoverable).
    StreamFailedMidway,
    /// Reports of what this process saw accepted by the market service.
    ReportsSent,
    /// Reports dropped: the market service down, refusing, or not answering.
    ReportsDropped,
    /// Envoy mode: an attempt or an answer showing that the route's priority groups and
    /// clusters do not match the plugin's providers (see `market-router-envoy-config`).
    RouteDrift,
}

impl Global {
    /// All global counters.
    pub const ALL: [Global; 18] = [
        Global::Requests,
        Global::RejectedBadRequest,
        Global::RejectedUnknownModel,
        Global::RejectedTooLarge,
        Global::RejectedNoProvider,
        Global::AllFailed,
        Global::RecoveredByFailover,
        Global::RefreshOk,
        Global::RefreshNotModified,
        Global::RefreshFailed,
        Global::OffersInvalid,
        Global::StaleDecisions,
        Global::RolloutMarket,
        Global::RolloutDefault,
        Global::StreamFailedMidway,
        Global::ReportsSent,
        Global::ReportsDropped,
        Global::RouteDrift,
    ];

    /// The counter of the answers the filter gives itself for `reason`, if one counts them.
    pub fn rejected(reason: Reason) -> Option<Global> {
        match reason {
            Reason::BadRequest => Some(Global::RejectedBadRequest),
            Reason::UnknownModel => Some(Global::RejectedUnknownModel),
            Reason::TooLarge => Some(Global::RejectedTooLarge),
            Reason::NoProvider => Some(Global::RejectedNoProvider),
            Reason::AllFailed => Some(Global::AllFailed),
            Reason::Internal => None,
        }
    }

    /// Metric name.
    pub fn name(self) -> &'static str {
        match self {
            Global::Requests => "market_router.requests",
            Global::RejectedBadRequest => "market_router.rejected.bad_request",
            Global::RejectedUnknownModel => "market_router.rejected.unknown_model",
            Global::RejectedTooLarge => "market_router.rejected.too_large",
            Global::RejectedNoProvider => "market_router.rejected.no_provider",
            Global::AllFailed => "market_router.all_failed",
            Global::RecoveredByFailover => "market_router.recovered_by_failover",
            Global::RefreshOk => "market_router.snapshot.refresh_ok",
            Global::RefreshNotModified => "market_router.snapshot.refresh_not_modified",
            Global::RefreshFailed => "market_router.snapshot.refresh_failed",
            Global::OffersInvalid => "market_router.snapshot.offers_invalid",
            Global::StaleDecisions => "market_router.snapshot.stale_decisions",
            Global::RolloutMarket => "market_router.rollout.market",
            Global::RolloutDefault => "market_router.rollout.default",
            Global::StreamFailedMidway => "market_router.stream_failed_midway",
            Global::ReportsSent => "market_router.report.sent",
            Global::ReportsDropped => "market_router.report.dropped",
            Global::RouteDrift => "market_router.route_drift",
        }
    }
}

/// Gauges and histograms.
pub const SNAPSHOT_AGE_MS: &str = "market_router.snapshot.age_ms";
/// Offers in the VM's current snapshot.
pub const SNAPSHOT_OFFERS: &str = "market_router.snapshot.offers";
/// The filter's own decision time (parse, rank, rewrite), microseconds.
pub const DECISION_US: &str = "market_router.decision_us";

/// Per-provider counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerProvider {
    /// Attempts sent to the provider.
    Attempts,
    /// Attempts it answered well.
    Success,
    /// Attempts that failed (any retryable or provider-side failure).
    Failure,
    /// Failures after which the request moved on to another provider.
    Failover,
    /// Times its circuit opened.
    CircuitOpen,
    /// Prompt tokens it billed.
    TokensIn,
    /// Completion tokens it billed.
    TokensOut,
    /// Cost of its answers, micro-USD.
    CostMicroUsd,
}

impl PerProvider {
    /// All per-provider counters.
    pub const ALL: [PerProvider; 8] = [
        PerProvider::Attempts,
        PerProvider::Success,
        PerProvider::Failure,
        PerProvider::Failover,
        PerProvider::CircuitOpen,
        PerProvider::TokensIn,
        PerProvider::TokensOut,
        PerProvider::CostMicroUsd,
    ];

    fn suffix(self) -> &'static str {
        match self {
            PerProvider::Attempts => "attempts",
            PerProvider::Success => "success",
            PerProvider::Failure => "failure",
            PerProvider::Failover => "failover",
            PerProvider::CircuitOpen => "circuit_open",
            PerProvider::TokensIn => "tokens_in",
            PerProvider::TokensOut => "tokens_out",
            PerProvider::CostMicroUsd => "cost_micro_usd",
        }
    }

    /// Metric name for `provider`.
    pub fn name(self, provider: &str) -> String {
        format!(
            "market_router.provider.{}.{}",
            sanitize(provider),
            self.suffix()
        )
    }
}

/// A provider name made safe as one stats path segment.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Token usage of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

impl Usage {
    /// Cost in USD at the given per-million prices.
    pub fn cost_usd(&self, input_per_mtok: f64, output_per_mtok: f64) -> f64 {
        (self.prompt_tokens as f64 * input_per_mtok
            + self.completion_tokens as f64 * output_per_mtok)
            / 1e6
    }
}

/// A 2xx answer whose body is not a JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Checks a non-streaming answer in one pass: `Err(Malformed)` when it is not a JSON object,
/// else its `usage` if it has a readable one.
pub fn inspect_answer(body: &[u8]) -> Result<Option<Usage>, Malformed> {
    // JSON text is UTF-8; the walker checks the syntax only.
    if std::str::from_utf8(body).is_err() {
        return Err(Malformed);
    }
    let mut usage = None;
    json::object_fields(body, |k, v| {
        if k == b"usage" {
            usage = Some(v);
        }
    })
    .map_err(|_| Malformed)?;
    Ok(usage.and_then(|v| usage_of_object(&body[v])))
}

/// `usage` of a non-streaming answer body.
pub fn usage_of_answer(body: &[u8]) -> Option<Usage> {
    inspect_answer(body).ok().flatten()
}

/// Token counts of a `usage` object; `None` when it has neither.
pub fn usage_of_object(usage: &[u8]) -> Option<Usage> {
    let (mut prompt, mut completion) = (None, None);
    json::object_fields(usage, |k, v| match k {
        b"prompt_tokens" => prompt = json::unsigned(&usage[v]),
        b"completion_tokens" => completion = json::unsigned(&usage[v]),
        _ => {}
    })
    .ok()?;
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    Some(Usage {
        prompt_tokens: prompt.unwrap_or(0),
        completion_tokens: completion.unwrap_or(0),
    })
}

/// Whether `hay` contains `"usage"`. Keys of streamed chunks have no `g`, so this looks for
/// that byte first and compares around it: one quick pass over most chunks.
fn mentions_usage(hay: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"\"usage\"";
    let mut from = 4;
    while let Some(at) = hay
        .get(from..)
        .and_then(|h| h.iter().position(|&c| c == b'g'))
    {
        let g = from + at;
        if hay.get(g - 4..g + 3) == Some(NEEDLE) {
            return true;
        }
        from = g + 1;
    }
    false
}

/// The last `usage` carried by server-sent events in `chunk` (the final usage chunk of an
/// OpenAI stream with `stream_options.include_usage`). Only chunks, and then lines, that
/// mention usage are parsed.
pub fn usage_in_sse(chunk: &[u8]) -> Option<Usage> {
    if !mentions_usage(chunk) {
        return None;
    }
    let mut found = None;
    for line in chunk.split(|b| *b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        if !mentions_usage(data) {
            continue;
        }
        if let Ok(Some(u)) = inspect_answer(data.trim_ascii()) {
            found = Some(u);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::ApiError;

    #[test]
    fn local_answers_count_by_reason() {
        let counted = |e: ApiError| Global::rejected(e.reason).map(Global::name);
        assert_eq!(
            counted(ApiError::bad_request("invalid_json", "x")),
            Some("market_router.rejected.bad_request")
        );
        assert_eq!(
            counted(ApiError::bad_request("model_missing", "x")),
            Some("market_router.rejected.bad_request")
        );
        assert_eq!(
            counted(ApiError::unknown_model("m")),
            Some("market_router.rejected.unknown_model")
        );
        assert_eq!(
            counted(ApiError::body_too_large(1)),
            Some("market_router.rejected.too_large")
        );
        assert_eq!(
            counted(ApiError::no_provider("x")),
            Some("market_router.rejected.no_provider")
        );
        assert_eq!(
            counted(ApiError::all_failed(502, "x")),
            Some("market_router.all_failed")
        );
        assert_eq!(counted(ApiError::internal("x")), None);
    }

    #[test]
    fn names_are_stable_and_safe() {
        assert_eq!(
            PerProvider::CostMicroUsd.name("acme.io"),
            "market_router.provider.acme_io.cost_micro_usd"
        );
        assert_eq!(Global::Requests.name(), "market_router.requests");
        let mut names: Vec<&str> = Global::ALL.iter().map(|g| g.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Global::ALL.len());
    }

    #[test]
    fn usage_from_answer_and_stream() {
        let u = usage_of_answer(br#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#);
        assert_eq!(
            u,
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 5
            })
        );
        assert_eq!(usage_of_answer(b"{}"), None);
        assert_eq!(inspect_answer(b"{\"id\": ["), Err(Malformed));
        assert_eq!(inspect_answer(b"[1]"), Err(Malformed));
        assert_eq!(inspect_answer(b"{\"id\":\"\xff\"}"), Err(Malformed));
        assert_eq!(
            inspect_answer(br#"{"usage":{"prompt_tokens":"x"}}"#),
            Ok(None)
        );
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            usage_in_sse(sse),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 7
            })
        );
        assert_eq!(usage_in_sse(b"data: [DONE]\n"), None);
        let cost = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 500_000,
        }
        .cost_usd(0.5, 1.5);
        assert!((cost - 1.25).abs() < 1e-12);
    }

    #[test]
    fn usage_is_found_wherever_it_sits() {
        assert!(mentions_usage(br#""usage""#));
        assert!(mentions_usage(br#"{"a":1,"usage":{}}"#));
        assert!(!mentions_usage(br#"{"a":"usag","b":"sage","usage_x":1}"#));
        assert!(!mentions_usage(b"usage"));
        assert!(!mentions_usage(b"gggg\"usag"));
        assert!(!mentions_usage(b""));
        let event = br#"data: {"choices":[{"delta":{"content":"go go"}}],"model":"m"}"#;
        assert_eq!(usage_in_sse(event), None);
    }
}
