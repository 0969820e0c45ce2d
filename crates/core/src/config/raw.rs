//! The configuration document as serde types: what may be written and where. Field docs are
//! the descriptions of the JSON Schema (`schema` feature), bounds are in the leaf types, and
//! defaults are the constants of [`super::defaults`]; the validation pass
//! ([`RawConfig::validate`](super)) applies those defaults and checks what spans fields.
//!
//! Adding a field: a field here (type, doc, `default` extension) and a line in the validation
//! pass that puts it into [`super::Config`].

#![allow(missing_docs)] // the field docs are the schema's descriptions, the structs are plain

#[cfg(feature = "schema")]
use super::defaults as d;
use super::leaf::{
    Choice, ErrorStatus, Flag, HeaderRule, HeadersKind, Int, Json, ModelsKind, NameRule, Num, Obj,
    PathRule, PrefixRule, Str, Text,
};
use super::{FailoverMode, ProviderType, RetryKind, Scheme, Strategy};
use serde::Deserialize;

#[cfg(feature = "schema")]
use super::leaf::Wire;
#[cfg(feature = "schema")]
fn names<T: Wire>(values: &[T]) -> Vec<&'static str> {
    values.iter().map(|v| v.as_str()).collect()
}

/// The whole document.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "schema",
    schemars(
        title = "market-router plugin configuration (v1)",
        description = "Configuration of the market-router proxy-wasm filter: the Envoy wasm filter's configuration string or the Kong filter's config. Write integers without a decimal point (3, not 3.0) and leave optional fields out rather than setting them to null. Rules no schema keyword expresses (unique provider names, routing.default_provider naming a configured provider, market.max_age_ms >= market.refresh_ms, failover.deadline_ms >= failover.attempt_timeout_ms) are checked by the filter when it loads the configuration.",
        extend("$id" = "urn:market-router:config:v1")
    )
)]
pub struct RawConfig {
    /// Providers the filter may route to; ties in ranking are broken at random (seeded by
    /// routing.seed when set).
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub providers: Vec<Obj<RawProvider>>,
    /// Where the live market snapshot is fetched from; leave it out to route on static offers
    /// only.
    #[serde(default)]
    pub market: Option<Obj<RawMarket>>,
    /// How providers are ranked and how the chosen one is handed to the host.
    #[serde(default)]
    pub routing: Option<Obj<RawRouting>>,
    /// How attempts are made and when the next provider is tried.
    #[serde(default)]
    pub failover: Option<Obj<RawFailover>>,
    /// Request limits.
    #[serde(default)]
    pub limits: Option<Obj<RawLimits>>,
    /// Whether the filter adds its x-market-router-* response headers (provider, attempts,
    /// strategy, cost, snapshot age).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::RESPONSE_HEADERS)))]
    pub response_headers: Option<Flag>,
    /// Whether the filter writes each request's decision record (model, providers tried and
    /// how each attempt ended, who answered, score, cost, tokens) to Envoy's filter state
    /// wasm.market_router.decision, for access logs. Off saves a few microseconds per request
    /// when nothing logs it.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::DECISION_RECORD)))]
    pub decision_record: Option<Flag>,
    /// Prefix of the filter's shared-data keys (<prefix>/market, <prefix>/health, ...); on
    /// Kong it must name a declared shm_kv zone.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::SHARED_DATA_PREFIX)))]
    pub shared_data_prefix: Option<Str<NameRule>>,
    /// Transparency endpoints answered by the filter itself (GET <path_prefix>/models,
    /// <path_prefix>/route).
    #[serde(default)]
    pub explain: Option<Obj<RawExplain>>,
}

/// One upstream provider the filter may route to.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    /// Unique provider id (1-64 of A-Z a-z 0-9 . _ -) used in the market snapshot and in the
    /// x-market-router-provider response header; no two providers may share it.
    #[cfg_attr(feature = "schema", schemars(example = &"openai"))]
    pub name: Str<NameRule>,
    /// Where the provider is reached: the Envoy cluster name (route and dispatch mode), or
    /// host:port on Kong.
    #[cfg_attr(
        feature = "schema",
        schemars(example = &"provider_openai", example = &"api.openai.com:443")
    )]
    pub cluster: Str<Text>,
    /// The :authority sent on dispatched attempts, and in envoy mode on each attempt when it
    /// differs from cluster; defaults to the value of cluster.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(example = &"api.openai.com"))]
    pub authority: Option<Str<Text>>,
    /// Client model name to the provider's own model id (use the same string when no rewrite
    /// is needed); at least one entry, no empty names or ids.
    #[cfg_attr(
        feature = "schema",
        schemars(example = serde_json::json!({"gpt-4o-mini": "gpt-4o-mini"}))
    )]
    pub models: Json<ModelsKind>,
    /// Provider category, matched by routing.constraints.provider_types.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::PROVIDER_TYPE.as_str())))]
    pub provider_type: Option<Choice<ProviderType>>,
    /// Region tag, matched by routing.constraints.regions.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(example = &"us-east"))]
    pub region: Option<Str<Text>>,
    /// Price, latency and uptime used when the market has no fresh data for this provider and
    /// model.
    #[serde(default)]
    pub static_offer: Option<Obj<RawOffer>>,
    /// The :scheme of attempts the filter dispatches itself; https where the host reaches the
    /// provider directly (Kong, with providers addressed as host:443).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::SCHEME.as_str())))]
    pub scheme: Option<Choice<Scheme>>,
    /// Headers added to every attempt sent to this provider, for hosts that cannot inject
    /// per-provider credentials themselves (Kong). Prefer host-side injection on Envoy. Values
    /// are never logged. Names are lowercase (a-z 0-9 - _), not host, content-length or
    /// transfer-encoding.
    #[serde(default)]
    pub headers: Option<Json<HeadersKind>>,
}

/// `providers[].static_offer`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawOffer {
    /// Token prices of the offer.
    pub price: Obj<RawPrice>,
    /// Latency of the offer.
    #[serde(default)]
    pub latency_ms: Option<Obj<RawLatency>>,
    /// Share of successful requests, from 0 to 1.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::OFFER_UPTIME)))]
    pub uptime: Option<Num<0, 1_000>>,
    /// Largest context the provider accepts, in tokens; unset means unknown.
    #[serde(default)]
    pub context_window: Option<Int<1, { u64::MAX }>>,
}

/// `providers[].static_offer.price`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// USD per million input tokens.
    pub input_per_mtok: Num<0, 1_000_000_000>,
    /// USD per million output tokens.
    pub output_per_mtok: Num<0, 1_000_000_000>,
}

/// `providers[].static_offer.latency_ms`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawLatency {
    /// Median time to first token in milliseconds.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::OFFER_TTFT_P50_MS)))]
    pub ttft_p50: Option<Num<1, 3_600_000_000>>,
    /// 95th percentile time to first token in milliseconds; in envoy mode it bounds an
    /// attempt's wait for its first byte (times failover.ttft_timeout_factor).
    #[serde(default)]
    pub ttft_p95: Option<Num<1, 3_600_000_000>>,
}

/// `market`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawMarket {
    /// Cluster (Envoy) or host:port (Kong) of the market stats service.
    #[cfg_attr(
        feature = "schema",
        schemars(example = &"market_sidecar", example = &"127.0.0.1:8090")
    )]
    pub cluster: Str<Text>,
    /// The :authority of the snapshot request.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MARKET_AUTHORITY)))]
    pub authority: Option<Str<Text>>,
    /// Path of the snapshot request; must start with /.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MARKET_PATH)))]
    pub path: Option<Str<PathRule>>,
    /// How often the snapshot is fetched, in milliseconds.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MARKET_REFRESH_MS)))]
    pub refresh_ms: Option<Int<100, 86_400_000>>,
    /// Snapshot age in milliseconds after which its data counts as stale; must be at least
    /// refresh_ms and defaults to the larger of 60000 and twice refresh_ms.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MARKET_MAX_AGE_MS)))]
    pub max_age_ms: Option<Int<1, { u64::MAX / 4 }>>,
    /// Timeout of one snapshot fetch, in milliseconds.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MARKET_TIMEOUT_MS)))]
    pub timeout_ms: Option<Int<1, 60_000>>,
    /// Whether this gateway posts what it sees of each provider (attempts, failures, 429s,
    /// time to first byte) to the market service once per refresh_ms (POST
    /// /v1/market/reports on the same cluster), so that the fleet avoids a provider one gateway
    /// sees failing. false keeps observations local: nothing is tallied or posted.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MARKET_REPORT)))]
    pub report: Option<Flag>,
}

/// `routing`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "schema",
    schemars(extend("anyOf" = [
        {
            "description": "Full rollout: rollout_percent is omitted or 100.",
            "properties": {"rollout_percent": {"minimum": 100}}
        },
        {
            "description": "A partial rollout names its default_provider.",
            "required": ["default_provider"]
        }
    ]))
)]
pub struct RawRouting {
    /// Default ranking strategy. value: lowest expected cost per answer (expected cost x (1 +
    /// expected failure share)), raised in proportion for providers whose median time to first
    /// token is over 1.3x the target (ttft_target_ms, else the median of the model's offers).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::STRATEGY.as_str())))]
    pub strategy: Option<Choice<Strategy>>,
    /// Weights of the balanced and weighted strategies; an omitted weight takes its default,
    /// and the three must not all be zero.
    #[serde(default)]
    pub weights: Option<Obj<RawWeights>>,
    /// Hard limits: an offer that breaks one is never chosen; an omitted constraint does not
    /// apply.
    #[serde(default)]
    pub constraints: Option<Obj<RawConstraints>>,
    /// Soft latency target, in milliseconds: providers whose median time to first token is
    /// within it are tried before the others, each group in strategy order (value instead
    /// weighs it into its figure, and without this field derives it from the market). Unlike
    /// constraints.max_ttft_ms nobody is excluded, so slow providers still serve when no fast
    /// one can.
    #[serde(default)]
    pub ttft_target_ms: Option<Num<1, 3_600_000_000>>,
    /// Request header the filter sets to the chosen provider's cluster; the host's route must
    /// read the same header (Envoy: RouteAction.cluster_header).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::CLUSTER_HEADER)))]
    pub cluster_header: Option<Str<HeaderRule>>,
    /// Request header carrying a session id; requests with the same id prefer the provider
    /// that last served it.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(example = &"x-session-id"))]
    pub affinity_header: Option<Str<HeaderRule>>,
    /// Whether clients may narrow the choice with x-market-router-* request headers
    /// (strategy, max price, provider type, region, exclude).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::CLIENT_OVERRIDES)))]
    pub client_overrides: Option<Flag>,
    /// Output tokens assumed when pricing a request that sets no max_tokens.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::DEFAULT_OUTPUT_TOKENS)))]
    pub default_output_tokens: Option<Int<1, 10_000_000>>,
    /// Fixed random seed for reproducible tests and benchmarks; omitted seeds from the clock.
    #[serde(default)]
    pub seed: Option<Int<0, { u64::MAX }>>,
    /// Share of requests (0-100) routed by the market; the rest go to default_provider, which
    /// is then required.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::ROLLOUT_PERCENT)))]
    pub rollout_percent: Option<Int<0, 100>>,
    /// Name of a configured provider that takes the requests outside rollout_percent.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(example = &"openai"))]
    pub default_provider: Option<Str<Text>>,
}

/// `routing.weights`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "schema",
    schemars(extend("not" = {
        "description": "All three weights zero.",
        "required": ["price", "latency", "reliability"],
        "properties": {
            "price": {"enum": [0]},
            "latency": {"enum": [0]},
            "reliability": {"enum": [0]}
        }
    }))
)]
pub struct RawWeights {
    /// Relative weight of price in the balanced score (weights are normalized to sum 1).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::WEIGHTS.price)))]
    pub price: Option<Num<0, 1_000_000_000>>,
    /// Relative weight of latency in the balanced score (weights are normalized to sum 1).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::WEIGHTS.latency)))]
    pub latency: Option<Num<0, 1_000_000_000>>,
    /// Relative weight of reliability in the balanced score (weights are normalized to sum
    /// 1).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::WEIGHTS.reliability)))]
    pub reliability: Option<Num<0, 1_000_000_000>>,
}

/// `routing.constraints`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawConstraints {
    /// Highest accepted price in USD per million tokens, applied to the input and to the
    /// output price.
    #[serde(default)]
    pub max_price_per_mtok: Option<Num<0, 1_000_000_000>>,
    /// Lowest accepted uptime, from 0 to 1.
    #[serde(default)]
    pub min_uptime: Option<Num<0, 1_000>>,
    /// Highest accepted median time to first token, in milliseconds.
    #[serde(default)]
    pub max_ttft_ms: Option<Num<1, 3_600_000_000>>,
    /// Provider types allowed; empty or omitted allows all.
    #[serde(default)]
    pub provider_types: Option<Vec<Choice<ProviderType>>>,
    /// Regions allowed; empty or omitted allows all.
    #[serde(default)]
    pub regions: Option<Vec<Str<Text>>>,
}

/// `failover`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawFailover {
    /// route: the first attempt goes through the host's route and fallbacks are
    /// re-dispatched; dispatch: every attempt is a dispatch_http_call (required on Kong);
    /// envoy: Envoy's router makes every attempt in the filter's order, so a streaming
    /// fallback streams (needs the pieces market-router-envoy-config prints).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::FAILOVER_MODE.as_str())))]
    pub mode: Option<Choice<FailoverMode>>,
    /// Most providers tried for one request.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MAX_ATTEMPTS)))]
    pub max_attempts: Option<Int<1, 10>>,
    /// Timeout of one attempt, in milliseconds.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::ATTEMPT_TIMEOUT_MS)))]
    pub attempt_timeout_ms: Option<Int<1, 3_600_000>>,
    /// Time budget of the whole request across attempts, in milliseconds; must be at least
    /// attempt_timeout_ms and defaults to the larger of 90000 and attempt_timeout_ms.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::DEADLINE_MS)))]
    pub deadline_ms: Option<Int<1, 3_600_000>>,
    /// Outcomes that move the request on to the next provider; omitted means all except 4xx.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = names(d::RETRY_ON))))]
    pub retry_on: Option<Vec<Choice<RetryKind>>>,
    /// Extra HTTP statuses (400-599) that are retried.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = [])))]
    pub retry_on_status: Option<Vec<ErrorStatus>>,
    /// Per-provider circuit breaker shared by all workers.
    #[serde(default)]
    pub circuit: Option<Obj<RawCircuit>>,
    /// Whether the client's own authorization header is sent to providers (by default it is
    /// removed and the host injects each provider's key).
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schemars(extend("default" = d::FORWARD_CLIENT_AUTHORIZATION))
    )]
    pub forward_client_authorization: Option<Flag>,
    /// Envoy mode: each attempt's wait for its first byte is bounded by the offer's ttft_p95
    /// times this factor, within attempt_timeout_ms (Envoy takes one per-try timeout per
    /// request: the largest bound among the providers in the order).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::TTFT_TIMEOUT_FACTOR)))]
    pub ttft_timeout_factor: Option<Num<1_000, 100_000>>,
}

/// `failover.circuit`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawCircuit {
    /// Consecutive failures that open the circuit.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::CIRCUIT.failure_threshold)))]
    pub failure_threshold: Option<Int<1, 1_000_000>>,
    /// How long an open circuit keeps the provider out, in milliseconds.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::CIRCUIT.cooldown_ms)))]
    pub cooldown_ms: Option<Int<1, 86_400_000>>,
}

/// `limits`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest request body accepted, in bytes; larger requests get a 413.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MAX_BODY_BYTES)))]
    pub max_body_bytes: Option<Int<1, { 64 << 20 }>>,
    /// Largest encoded market snapshot kept in shared data; a bigger one is refused and the
    /// last good one stays, so a bounded store (Kong's shm_kv zone: size it at least twice
    /// this) never fills up from market data. About 120 bytes per offer, 400-500 with the
    /// per-figure provenance the market service sends.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::MAX_SNAPSHOT_BYTES)))]
    pub max_snapshot_bytes: Option<Int<1024, { 1 << 30 }>>,
}

/// `explain`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawExplain {
    /// Whether the endpoints are served.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::EXPLAIN_ENABLED)))]
    pub enabled: Option<Flag>,
    /// Path prefix of the endpoints: starts with /, does not end with /, no ?.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("default" = d::EXPLAIN_PATH_PREFIX)))]
    pub path_prefix: Option<Str<PrefixRule>>,
}
