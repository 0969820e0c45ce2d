//! Plugin configuration v1: JSON → validated [`Config`], in two steps.
//!
//! 1. [`raw`]: serde types of the document (`deny_unknown_fields`), whose leaf types
//!    ([`leaf`]) refuse a bad value with what is allowed; the JSON Schema is generated from
//!    them (`schema` feature, see [`json_schema`]).
//! 2. The validation pass ([`RawConfig::validate`]): defaults ([`defaults`]) and the rules
//!    that span fields (unique provider names, `routing.default_provider`, deadlines).
//!
//! Either step's error names the field path, the bad value and what is allowed, e.g.
//! ``field `routing.strategy` = "fastes": expected one of value, cheapest, fastest,
//! most_reliable, balanced, weighted``. Unknown fields are refused the same way (their value not shown, it
//! may be a credential), so a typo never silently falls back to a default.

pub mod leaf;
pub mod raw;

use leaf::Wire;
use raw::RawConfig;
use serde_json::Value;
use serde_path_to_error::Segment;
use std::fmt;

/// Provider categories, as in the market snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    /// A company running inference as a business.
    Company,
    /// Community-run capacity.
    Community,
    /// The operator's own deployment.
    SelfHosted,
}

impl ProviderType {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Company => "company",
            Self::Community => "community",
            Self::SelfHosted => "self_hosted",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        <Self as Wire>::parse(s)
    }
}

impl Wire for ProviderType {
    const ALL: &'static [Self] = &[Self::Company, Self::Community, Self::SelfHosted];
    fn as_str(self) -> &'static str {
        ProviderType::as_str(self)
    }
}

/// Routing strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Lowest expected cost per answer: the request's expected cost × (1 + the provider's
    /// expected failure share), raised in proportion for providers whose median time to first
    /// token is over 1.3× the target (`routing.ttft_target_ms`, else the median of the model's
    /// offers). The default.
    Value,
    /// Lowest expected cost of this request.
    Cheapest,
    /// Lowest time to first token.
    Fastest,
    /// Highest uptime and availability.
    MostReliable,
    /// Weighted, normalized blend of price, latency and reliability.
    Balanced,
    /// Random spread biased towards better balanced scores.
    Weighted,
}

impl Strategy {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Value => "value",
            Self::Cheapest => "cheapest",
            Self::Fastest => "fastest",
            Self::MostReliable => "most_reliable",
            Self::Balanced => "balanced",
            Self::Weighted => "weighted",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        <Self as Wire>::parse(s)
    }
}

impl Wire for Strategy {
    const ALL: &'static [Self] = &[
        Self::Value,
        Self::Cheapest,
        Self::Fastest,
        Self::MostReliable,
        Self::Balanced,
        Self::Weighted,
    ];
    fn as_str(self) -> &'static str {
        Strategy::as_str(self)
    }
}

/// Prices and latency a provider is known for when the market has no fresh data.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticOffer {
    /// USD per million input tokens.
    pub input_per_mtok: f64,
    /// USD per million output tokens.
    pub output_per_mtok: f64,
    /// Median time to first token, ms.
    pub ttft_p50_ms: f64,
    /// 95th percentile time to first token, ms, if known (bounds an attempt in envoy mode).
    pub ttft_p95_ms: Option<f64>,
    /// Share of successful requests, 0..1.
    pub uptime: f64,
    /// Max context tokens, if known.
    pub context_window: Option<u64>,
}

/// One configured provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    /// Id used in the market snapshot and in response headers.
    pub name: String,
    /// Host cluster the provider is reached through.
    pub cluster: String,
    /// `:authority` used on dispatched calls.
    pub authority: String,
    /// Client model name → provider's own model id, in configuration order.
    pub models: Vec<(String, String)>,
    /// Provider category.
    pub provider_type: ProviderType,
    /// Region tag.
    pub region: Option<String>,
    /// Offer used without fresh market data.
    pub static_offer: Option<StaticOffer>,
    /// `:scheme` of dispatched attempts (`https` where the host reaches the provider itself, as on Kong).
    pub scheme: String,
    /// Headers added to every attempt sent to this provider (for hosts that cannot inject
    /// per-provider credentials themselves). Values are never logged.
    pub headers: Vec<(String, String)>,
}

impl Provider {
    /// The provider's id for a client model name, if it serves it.
    pub fn model_id(&self, model: &str) -> Option<&str> {
        self.models
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, id)| id.as_str())
    }
}

/// Where the market snapshot comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Market {
    /// Host cluster of the stats sidecar.
    pub cluster: String,
    /// `:authority` of the snapshot request.
    pub authority: String,
    /// Path of the snapshot.
    pub path: String,
    /// Refresh period, ms.
    pub refresh_ms: u64,
    /// Snapshot age after which it counts as stale, ms.
    pub max_age_ms: u64,
    /// Timeout of one snapshot fetch, ms.
    pub timeout_ms: u64,
    /// Post fleet reports (`market.report`).
    pub report: bool,
}

/// Weights of the balanced score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Weight of price.
    pub price: f64,
    /// Weight of latency.
    pub latency: f64,
    /// Weight of reliability.
    pub reliability: f64,
}

impl Default for Weights {
    fn default() -> Self {
        defaults::WEIGHTS
    }
}

/// Hard constraints: an offer that breaks one is not a candidate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    /// Max USD per million tokens, applied to the input and to the output price.
    pub max_price_per_mtok: Option<f64>,
    /// Min uptime, 0..1.
    pub min_uptime: Option<f64>,
    /// Max median time to first token, ms.
    pub max_ttft_ms: Option<f64>,
    /// Allowed provider types (empty = all).
    pub provider_types: Vec<ProviderType>,
    /// Allowed regions (empty = all).
    pub regions: Vec<String>,
}

/// Routing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Default strategy.
    pub strategy: Strategy,
    /// Balanced weights (normalized to sum 1).
    pub weights: Weights,
    /// Hard constraints.
    pub constraints: Constraints,
    /// Soft latency target: candidates whose median time to first token is within it are tried
    /// before the others (each group in strategy order); nobody is excluded for it.
    pub ttft_target_ms: Option<f64>,
    /// Request header the route's `cluster_header` reads.
    pub cluster_header: String,
    /// Request header carrying a session id for provider affinity.
    pub affinity_header: Option<String>,
    /// Whether clients may send `x-market-router-*` preference headers.
    pub client_overrides: bool,
    /// Output tokens assumed when the request sets no `max_tokens`.
    pub default_output_tokens: u64,
    /// Fixed random seed (tests, reproducible benchmarks); none = seeded from the clock.
    pub seed: Option<u64>,
    /// Share of eligible requests (0-100) routed by the market; the rest go to `default_provider`.
    pub rollout_percent: u8,
    /// Provider index that takes the requests outside the rollout.
    pub default_provider: Option<usize>,
}

/// How attempts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMode {
    /// First attempt through the host's route; fallbacks by `dispatch_http_call`.
    Route,
    /// Every attempt by `dispatch_http_call`.
    Dispatch,
    /// Every attempt by Envoy's router, in the filter's order (priority-group cluster specifier
    /// with `refresh_cluster_on_retry`); the same module runs as an upstream filter per attempt.
    Envoy,
}

impl FailoverMode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Route => "route",
            Self::Dispatch => "dispatch",
            Self::Envoy => "envoy",
        }
    }
}

impl Wire for FailoverMode {
    const ALL: &'static [Self] = &[Self::Route, Self::Dispatch, Self::Envoy];
    fn as_str(self) -> &'static str {
        FailoverMode::as_str(self)
    }
}

/// `:scheme` of dispatched attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (the host adds TLS where its cluster says so).
    Http,
    /// HTTPS.
    Https,
}

impl Wire for Scheme {
    const ALL: &'static [Self] = &[Self::Http, Self::Https];
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// One `failover.retry_on` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// `connect-failure`
    ConnectFailure,
    /// `reset`
    Reset,
    /// `timeout`
    Timeout,
    /// `5xx`
    Status5xx,
    /// `429`
    Status429,
    /// `4xx`
    Status4xx,
    /// `malformed`
    Malformed,
}

impl Wire for RetryKind {
    const ALL: &'static [Self] = &[
        Self::ConnectFailure,
        Self::Reset,
        Self::Timeout,
        Self::Status5xx,
        Self::Status429,
        Self::Status4xx,
        Self::Malformed,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Self::ConnectFailure => "connect-failure",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::Status5xx => "5xx",
            Self::Status429 => "429",
            Self::Status4xx => "4xx",
            Self::Malformed => "malformed",
        }
    }
}

/// Which outcomes move a request on to the next provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Connection refused or failed.
    pub connect_failure: bool,
    /// Connection reset before a response.
    pub reset: bool,
    /// Attempt timed out.
    pub timeout: bool,
    /// Any 5xx status.
    pub status_5xx: bool,
    /// 429 Too Many Requests.
    pub status_429: bool,
    /// Any 4xx status other than 429 (client errors are not retried by default).
    pub status_4xx: bool,
    /// 200 whose JSON body does not parse (non-streaming answers only).
    pub malformed: bool,
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Circuit {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long an open circuit keeps the provider out, ms.
    pub cooldown_ms: u64,
}

/// Failover settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    /// Route or dispatch.
    pub mode: FailoverMode,
    /// Max providers tried per request.
    pub max_attempts: u32,
    /// Timeout of one attempt, ms.
    pub attempt_timeout_ms: u64,
    /// Overall time budget of a request, ms.
    pub deadline_ms: u64,
    /// Retryable outcomes.
    pub retry_on: RetryOn,
    /// Extra statuses that are retried.
    pub retry_on_status: Vec<u32>,
    /// Circuit breaker.
    pub circuit: Circuit,
    /// Whether the client's own `authorization` header is sent to providers.
    pub forward_client_authorization: bool,
    /// Envoy mode: an attempt's time to first byte is bounded by the offer's `ttft_p95` times
    /// this factor (within `attempt_timeout_ms`).
    pub ttft_timeout_factor: f64,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Providers, in configuration order.
    pub providers: Vec<Provider>,
    /// Market source; none = static offers only.
    pub market: Option<Market>,
    /// Routing settings.
    pub routing: Routing,
    /// Failover settings.
    pub failover: Failover,
    /// Max request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Largest encoded snapshot stored in shared data; bigger ones are refused (the last good
    /// one stays), so a bounded store (Kong's shm_kv zone) is never overfilled by the market.
    pub max_snapshot_bytes: usize,
    /// Whether `x-market-router-*` response headers are added.
    pub response_headers: bool,
    /// Whether the per-request decision record is written (Envoy filter state
    /// `wasm.market_router.decision`).
    pub decision_record: bool,
    /// Prefix of shared-data keys (`<prefix>/market`, …); on Kong it names the shm_kv zone.
    pub shared_data_prefix: String,
    /// Path prefix of the transparency endpoints (`<prefix>/models`, `<prefix>/route`); none = off.
    pub explain_path_prefix: Option<String>,
}

impl Config {
    /// Index of a provider by name.
    pub fn provider_index(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.name == name)
    }
}

/// A configuration error: which field, which value, what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Field path, e.g. `providers[1].cluster`.
    pub field: String,
    /// The offending value as JSON (clipped), or `(missing)`.
    pub value: String,
    /// What is allowed.
    pub expected: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "field `{}` = {}: {}",
            self.field, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

impl RetryOn {
    /// The set named by a `failover.retry_on` list.
    pub fn from_kinds(kinds: &[RetryKind]) -> Self {
        let has = |k| kinds.contains(&k);
        Self {
            connect_failure: has(RetryKind::ConnectFailure),
            reset: has(RetryKind::Reset),
            timeout: has(RetryKind::Timeout),
            status_5xx: has(RetryKind::Status5xx),
            status_429: has(RetryKind::Status429),
            status_4xx: has(RetryKind::Status4xx),
            malformed: has(RetryKind::Malformed),
        }
    }
}

/// Defaults of the optional fields: the validation pass applies them and the schema shows
/// them (each is written once, here).
pub mod defaults {
    use super::{Circuit, FailoverMode, ProviderType, RetryKind, Scheme, Strategy, Weights};

    /// `providers[].provider_type`
    pub const PROVIDER_TYPE: ProviderType = ProviderType::Company;
    /// `providers[].scheme`
    pub const SCHEME: Scheme = Scheme::Http;
    /// `providers[].static_offer.uptime`
    pub const OFFER_UPTIME: f64 = 0.99;
    /// `providers[].static_offer.latency_ms.ttft_p50`
    pub const OFFER_TTFT_P50_MS: f64 = 1000.0;
    /// `market.authority`
    pub const MARKET_AUTHORITY: &str = "market";
    /// `market.path`
    pub const MARKET_PATH: &str = "/v1/market/snapshot";
    /// `market.refresh_ms`
    pub const MARKET_REFRESH_MS: u64 = 5000;
    /// `market.max_age_ms`, when twice `refresh_ms` is not more.
    pub const MARKET_MAX_AGE_MS: u64 = 60_000;
    /// `market.timeout_ms`
    pub const MARKET_TIMEOUT_MS: u64 = 1000;
    /// `market.report`
    pub const MARKET_REPORT: bool = true;
    /// `routing.strategy`
    pub const STRATEGY: Strategy = Strategy::Value;
    /// `routing.weights`
    pub const WEIGHTS: Weights = Weights {
        price: 0.5,
        latency: 0.3,
        reliability: 0.2,
    };
    /// `routing.cluster_header`
    pub const CLUSTER_HEADER: &str = "x-market-router-cluster";
    /// `routing.client_overrides`
    pub const CLIENT_OVERRIDES: bool = false;
    /// `routing.default_output_tokens`
    pub const DEFAULT_OUTPUT_TOKENS: u64 = 256;
    /// `routing.rollout_percent`
    pub const ROLLOUT_PERCENT: u64 = 100;
    /// `failover.mode`
    pub const FAILOVER_MODE: FailoverMode = FailoverMode::Route;
    /// `failover.max_attempts`
    pub const MAX_ATTEMPTS: u64 = 3;
    /// `failover.attempt_timeout_ms`
    pub const ATTEMPT_TIMEOUT_MS: u64 = 30_000;
    /// `failover.deadline_ms`, when `attempt_timeout_ms` is not more.
    pub const DEADLINE_MS: u64 = 90_000;
    /// `failover.retry_on`
    pub const RETRY_ON: &[RetryKind] = &[
        RetryKind::ConnectFailure,
        RetryKind::Reset,
        RetryKind::Timeout,
        RetryKind::Status5xx,
        RetryKind::Status429,
        RetryKind::Malformed,
    ];
    /// `failover.circuit`
    pub const CIRCUIT: Circuit = Circuit {
        failure_threshold: 3,
        cooldown_ms: 30_000,
    };
    /// `failover.forward_client_authorization`
    pub const FORWARD_CLIENT_AUTHORIZATION: bool = false;
    /// `failover.ttft_timeout_factor`
    pub const TTFT_TIMEOUT_FACTOR: f64 = 2.0;
    /// `limits.max_body_bytes`
    pub const MAX_BODY_BYTES: u64 = 1 << 20;
    /// `limits.max_snapshot_bytes`
    pub const MAX_SNAPSHOT_BYTES: u64 = 4 << 20;
    /// `response_headers`
    pub const RESPONSE_HEADERS: bool = true;
    /// `decision_record`
    pub const DECISION_RECORD: bool = true;
    /// `shared_data_prefix`
    pub const SHARED_DATA_PREFIX: &str = "mr";
    /// `explain.enabled`
    pub const EXPLAIN_ENABLED: bool = true;
    /// `explain.path_prefix`
    pub const EXPLAIN_PATH_PREFIX: &str = "/market-router/v1";
}

/// `value` as the refusal line shows it: JSON, clipped; absent is `(missing)`.
fn shown(value: Option<&Value>) -> String {
    match value {
        None => "(missing)".to_string(),
        Some(v) => {
            let s = v.to_string();
            if s.len() > 80 {
                format!("{}…", crate::errors::clip(&s, 80))
            } else {
                s
            }
        }
    }
}

fn err(field: &str, value: Option<&Value>, expected: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        value: shown(value),
        expected: expected.into(),
    }
}

/// The value at a dotted field path (`providers[1].name`) of the document.
fn at<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = doc;
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            v = v.get(key)?;
        }
        while let Some((index, tail)) = rest.split_once(']') {
            v = v.get(index.parse::<usize>().ok()?)?;
            rest = tail.strip_prefix('[').unwrap_or(tail);
        }
    }
    Some(v)
}

/// The names between backticks in a serde message, after the first `skip` of them.
fn quoted(msg: &str, skip: usize) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).skip(skip).collect()
}

/// A serde error at `path` of `doc`, in the refusal line's terms.
fn refusal(doc: &Value, e: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = match e.path().to_string() {
        p if p == "." => String::new(),
        p => p,
    };
    // A field set to null counts as left out, as for the optional ones (`Option` reads null
    // as `None`): only a required field can fail on it.
    let null_field = matches!(e.path().iter().next_back(), Some(Segment::Map { .. }))
        && matches!(at(doc, &path), Some(Value::Null));
    let msg = e.into_inner().to_string();
    let field = if path.is_empty() { "(root)" } else { &path };
    if msg.starts_with("unknown field `") {
        // The value of an unknown field is not shown: it may be a credential.
        return ConfigError {
            field: field.to_string(),
            value: "(not shown)".into(),
            expected: format!("unknown field; allowed: {}", quoted(&msg, 1).join(", ")),
        };
    }
    if null_field {
        return err(field, None, "required");
    }
    if msg.starts_with("missing field `") {
        let key = quoted(&msg, 0).first().copied().unwrap_or_default();
        let field = if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        };
        return err(&field, None, "required");
    }
    let expected = if msg.starts_with("invalid type:") {
        if msg.ends_with("expected an object") || msg.ends_with("expected a map") {
            "expected an object".to_string()
        } else if msg.ends_with("expected a sequence") {
            "expected an array".to_string()
        } else {
            msg
        }
    } else {
        msg
    };
    err(field, at(doc, &path), expected)
}

impl Config {
    /// Parses and validates a configuration document.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| ConfigError {
            field: "(root)".into(),
            value: format!("{} bytes", bytes.len()),
            expected: format!("valid JSON ({e})"),
        })?;
        Self::from_value(&v)
    }

    /// Validates an already parsed document.
    pub fn from_value(v: &Value) -> Result<Config, ConfigError> {
        let raw: leaf::Obj<RawConfig> =
            serde_path_to_error::deserialize(v).map_err(|e| refusal(v, e))?;
        raw.0.validate(v)
    }
}

impl RawConfig {
    /// The validation pass: defaults, and the rules that span fields. `doc` is the document
    /// `self` was read from (errors show its values).
    pub fn validate(self, doc: &Value) -> Result<Config, ConfigError> {
        let refuse = |field: &str, expected: String| err(field, at(doc, field), expected);
        let providers = validate_providers(self.providers.into_iter().map(|p| p.0), doc)?;

        let market = match self.market {
            None => None,
            Some(leaf::Obj(m)) => {
                let refresh_ms = m.refresh_ms.map_or(defaults::MARKET_REFRESH_MS, |x| x.0);
                let max_age_ms = m
                    .max_age_ms
                    .map_or(defaults::MARKET_MAX_AGE_MS.max(refresh_ms * 2), |x| x.0);
                if max_age_ms < refresh_ms {
                    return Err(refuse(
                        "market.max_age_ms",
                        format!("expected at least market.refresh_ms ({refresh_ms})"),
                    ));
                }
                Some(Market {
                    cluster: m.cluster.0,
                    authority: m
                        .authority
                        .map_or_else(|| defaults::MARKET_AUTHORITY.to_string(), |s| s.0),
                    path: m
                        .path
                        .map_or_else(|| defaults::MARKET_PATH.to_string(), |s| s.0),
                    refresh_ms,
                    max_age_ms,
                    timeout_ms: m.timeout_ms.map_or(defaults::MARKET_TIMEOUT_MS, |x| x.0),
                    report: m.report.map_or(defaults::MARKET_REPORT, |x| x.0),
                })
            }
        };

        let r = self.routing.map_or(
            raw::RawRouting {
                strategy: None,
                weights: None,
                constraints: None,
                cluster_header: None,
                affinity_header: None,
                client_overrides: None,
                ttft_target_ms: None,
                default_output_tokens: None,
                seed: None,
                rollout_percent: None,
                default_provider: None,
            },
            |r| r.0,
        );
        let weights = match r.weights.map(|w| w.0) {
            None => defaults::WEIGHTS,
            Some(w) => {
                let d = defaults::WEIGHTS;
                let price = w.price.map_or(d.price, |x| x.0);
                let latency = w.latency.map_or(d.latency, |x| x.0);
                let reliability = w.reliability.map_or(d.reliability, |x| x.0);
                let sum = price + latency + reliability;
                if sum <= 0.0 {
                    return Err(refuse(
                        "routing.weights",
                        "expected weights whose sum is > 0".into(),
                    ));
                }
                Weights {
                    price: price / sum,
                    latency: latency / sum,
                    reliability: reliability / sum,
                }
            }
        };
        let constraints = match r.constraints.map(|c| c.0) {
            None => Constraints::default(),
            Some(c) => Constraints {
                max_price_per_mtok: c.max_price_per_mtok.map(|x| x.0),
                min_uptime: c.min_uptime.map(|x| x.0),
                max_ttft_ms: c.max_ttft_ms.map(|x| x.0),
                provider_types: c
                    .provider_types
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| t.0)
                    .collect(),
                regions: c
                    .regions
                    .unwrap_or_default()
                    .into_iter()
                    .map(|s| s.0)
                    .collect(),
            },
        };
        let rollout_percent = r.rollout_percent.map_or(defaults::ROLLOUT_PERCENT, |x| x.0) as u8;
        let default_provider = match r.default_provider {
            None if rollout_percent < 100 => {
                return Err(err(
                    "routing.default_provider",
                    None,
                    "required when routing.rollout_percent is below 100",
                ))
            }
            None => None,
            Some(name) => Some(providers.iter().position(|p| p.name == name.0).ok_or_else(
                || {
                    refuse(
                        "routing.default_provider",
                        "expected the name of a configured provider".into(),
                    )
                },
            )?),
        };
        let routing = Routing {
            strategy: r.strategy.map_or(defaults::STRATEGY, |s| s.0),
            weights,
            constraints,
            ttft_target_ms: r.ttft_target_ms.map(|x| x.0),
            cluster_header: r
                .cluster_header
                .map_or_else(|| defaults::CLUSTER_HEADER.to_string(), |s| s.0),
            affinity_header: r.affinity_header.map(|s| s.0),
            client_overrides: r
                .client_overrides
                .map_or(defaults::CLIENT_OVERRIDES, |b| b.0),
            default_output_tokens: r
                .default_output_tokens
                .map_or(defaults::DEFAULT_OUTPUT_TOKENS, |x| x.0),
            seed: r.seed.map(|x| x.0),
            rollout_percent,
            default_provider,
        };

        let explain_path_prefix = match self.explain.map(|e| e.0) {
            None => Some(defaults::EXPLAIN_PATH_PREFIX.to_string()),
            Some(e) => e
                .enabled
                .map_or(defaults::EXPLAIN_ENABLED, |b| b.0)
                .then(|| {
                    e.path_prefix
                        .map_or_else(|| defaults::EXPLAIN_PATH_PREFIX.to_string(), |s| s.0)
                }),
        };

        let failover = match self.failover.map(|f| f.0) {
            None => Failover {
                mode: defaults::FAILOVER_MODE,
                max_attempts: defaults::MAX_ATTEMPTS as u32,
                attempt_timeout_ms: defaults::ATTEMPT_TIMEOUT_MS,
                deadline_ms: defaults::DEADLINE_MS.max(defaults::ATTEMPT_TIMEOUT_MS),
                retry_on: RetryOn::from_kinds(defaults::RETRY_ON),
                retry_on_status: Vec::new(),
                circuit: defaults::CIRCUIT,
                forward_client_authorization: defaults::FORWARD_CLIENT_AUTHORIZATION,
                ttft_timeout_factor: defaults::TTFT_TIMEOUT_FACTOR,
            },
            Some(f) => {
                let attempt_timeout_ms = f
                    .attempt_timeout_ms
                    .map_or(defaults::ATTEMPT_TIMEOUT_MS, |x| x.0);
                let deadline_ms = f
                    .deadline_ms
                    .map_or(defaults::DEADLINE_MS.max(attempt_timeout_ms), |x| x.0);
                if deadline_ms < attempt_timeout_ms {
                    return Err(refuse(
                        "failover.deadline_ms",
                        format!(
                            "expected at least failover.attempt_timeout_ms ({attempt_timeout_ms})"
                        ),
                    ));
                }
                Failover {
                    mode: f.mode.map_or(defaults::FAILOVER_MODE, |m| m.0),
                    max_attempts: f.max_attempts.map_or(defaults::MAX_ATTEMPTS, |x| x.0) as u32,
                    attempt_timeout_ms,
                    deadline_ms,
                    retry_on: match f.retry_on {
                        None => RetryOn::from_kinds(defaults::RETRY_ON),
                        Some(kinds) => {
                            let kinds: Vec<RetryKind> = kinds.into_iter().map(|k| k.0).collect();
                            RetryOn::from_kinds(&kinds)
                        }
                    },
                    retry_on_status: f
                        .retry_on_status
                        .unwrap_or_default()
                        .into_iter()
                        .map(|s| s.0)
                        .collect(),
                    circuit: match f.circuit.map(|c| c.0) {
                        None => defaults::CIRCUIT,
                        Some(c) => Circuit {
                            failure_threshold: c
                                .failure_threshold
                                .map_or(defaults::CIRCUIT.failure_threshold, |x| x.0 as u32),
                            cooldown_ms: c
                                .cooldown_ms
                                .map_or(defaults::CIRCUIT.cooldown_ms, |x| x.0),
                        },
                    },
                    forward_client_authorization: f
                        .forward_client_authorization
                        .map_or(defaults::FORWARD_CLIENT_AUTHORIZATION, |b| b.0),
                    ttft_timeout_factor: f
                        .ttft_timeout_factor
                        .map_or(defaults::TTFT_TIMEOUT_FACTOR, |x| x.0),
                }
            }
        };

        if failover.mode == FailoverMode::Envoy {
            // The upstream role tells providers apart by the attempt's cluster.
            for (i, p) in providers.iter().enumerate() {
                if providers[..i].iter().any(|q| q.cluster == p.cluster) {
                    return Err(ConfigError {
                        field: format!("providers[{i}].cluster"),
                        value: Value::from(p.cluster.as_str()).to_string(),
                        expected: "expected a cluster no other provider uses (failover.mode envoy)"
                            .into(),
                    });
                }
            }
        }

        let (max_body_bytes, max_snapshot_bytes) = match self.limits.map(|l| l.0) {
            None => (defaults::MAX_BODY_BYTES, defaults::MAX_SNAPSHOT_BYTES),
            Some(l) => (
                l.max_body_bytes.map_or(defaults::MAX_BODY_BYTES, |x| x.0),
                l.max_snapshot_bytes
                    .map_or(defaults::MAX_SNAPSHOT_BYTES, |x| x.0),
            ),
        };

        Ok(Config {
            providers,
            market,
            routing,
            failover,
            max_body_bytes: max_body_bytes as usize,
            max_snapshot_bytes: max_snapshot_bytes as usize,
            response_headers: self
                .response_headers
                .map_or(defaults::RESPONSE_HEADERS, |b| b.0),
            decision_record: self
                .decision_record
                .map_or(defaults::DECISION_RECORD, |b| b.0),
            shared_data_prefix: self
                .shared_data_prefix
                .map_or_else(|| defaults::SHARED_DATA_PREFIX.to_string(), |s| s.0),
            explain_path_prefix,
        })
    }
}

fn validate_providers(
    items: impl ExactSizeIterator<Item = raw::RawProvider>,
    doc: &Value,
) -> Result<Vec<Provider>, ConfigError> {
    if items.len() == 0 {
        return Err(err(
            "providers",
            at(doc, "providers"),
            "expected at least one provider",
        ));
    }
    let mut out: Vec<Provider> = Vec::with_capacity(items.len());
    for (i, p) in items.enumerate() {
        let path = format!("providers[{i}]");
        let name = p.name.0;
        if out.iter().any(|q| q.name == name) {
            let field = format!("{path}.name");
            return Err(err(
                &field,
                at(doc, &field),
                "expected a name no other provider uses",
            ));
        }
        let models =
            match &p.models.0 {
                Value::Object(m) if !m.is_empty() => {
                    let mut models = Vec::with_capacity(m.len());
                    for (k, v) in m {
                        match v.as_str() {
                            Some(id) if !id.is_empty() && !k.is_empty() => {
                                models.push((k.clone(), id.to_string()))
                            }
                            _ => {
                                return Err(err(
                                    &format!("{path}.models.{k}"),
                                    Some(v),
                                    "expected the provider's model id, a non-empty string",
                                ))
                            }
                        }
                    }
                    models
                }
                Value::Null => return Err(err(&format!("{path}.models"), None, "required")),
                other => return Err(err(
                    &format!("{path}.models"),
                    Some(other),
                    "expected a non-empty object mapping client model names to provider model ids",
                )),
            };
        let headers = match p.headers.map(|h| h.0) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => {
                let mut hs = Vec::with_capacity(m.len());
                for (k, v) in m {
                    let ok_name = leaf::is_header_name(&k)
                        && !matches!(k.as_str(), "host" | "content-length" | "transfer-encoding");
                    match v.as_str() {
                        // Values may be credentials: errors name the header, never the value.
                        Some(val) if ok_name && !val.contains(['\r', '\n']) => {
                            hs.push((k, val.to_string()))
                        }
                        _ => {
                            return Err(ConfigError {
                                field: format!("{path}.headers.{k}"),
                                value: "(redacted)".into(),
                                expected:
                                    "expected a lowercase header name (not host, content-length, \
                                           transfer-encoding) with a single-line string value"
                                        .into(),
                            })
                        }
                    }
                }
                hs
            }
            Some(_) => {
                return Err(ConfigError {
                    field: format!("{path}.headers"),
                    value: "(redacted)".into(),
                    expected: "expected an object of header name to value".into(),
                })
            }
        };
        let cluster = p.cluster.0;
        out.push(Provider {
            name,
            authority: p.authority.map_or_else(|| cluster.clone(), |s| s.0),
            cluster,
            models,
            provider_type: p.provider_type.map_or(defaults::PROVIDER_TYPE, |t| t.0),
            region: p.region.map(|s| s.0),
            static_offer: p.static_offer.map(|leaf::Obj(o)| StaticOffer {
                input_per_mtok: o.price.0.input_per_mtok.0,
                output_per_mtok: o.price.0.output_per_mtok.0,
                ttft_p50_ms: o
                    .latency_ms
                    .as_ref()
                    .and_then(|l| l.0.ttft_p50)
                    .map_or(defaults::OFFER_TTFT_P50_MS, |x| x.0),
                ttft_p95_ms: o
                    .latency_ms
                    .as_ref()
                    .and_then(|l| l.0.ttft_p95)
                    .map(|x| x.0),
                uptime: o.uptime.map_or(defaults::OFFER_UPTIME, |x| x.0),
                context_window: o.context_window.map(|x| x.0),
            }),
            scheme: p
                .scheme
                .map_or(defaults::SCHEME, |s| s.0)
                .as_str()
                .to_string(),
            headers,
        });
    }
    Ok(out)
}

/// The JSON Schema of the configuration, generated from [`raw`]'s types (`schema` feature;
/// `make schema` (crates/core/examples/gen_schema.rs) writes it to
/// `schema/market-router.schema.json`).
#[cfg(feature = "schema")]
pub fn json_schema() -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.inline_subschemas = true;
    let schema = settings
        .into_generator()
        .into_root_schema_for::<RawConfig>();
    let mut v = schema.to_value();
    tidy(&mut v);
    // The keywords that say what the document is come first.
    let mut out = serde_json::Map::new();
    if let Value::Object(mut m) = v {
        for k in ["$schema", "$id", "title", "description"] {
            if let Some(x) = m.remove(k) {
                out.insert(k.to_string(), x);
            }
        }
        out.extend(m);
    }
    Value::Object(out)
}

/// What the generated schema says beyond the document: optional fields are also allowed to
/// be null there (the filter treats null as absent, but the documented way is to leave a
/// field out), doc comments keep their line breaks, and bounds are floats.
#[cfg(feature = "schema")]
fn tidy(v: &mut Value) {
    match v {
        Value::Object(m) => {
            // `{anyOf: [X, {"type": "null"}], ...}` → X with the rest (description) added.
            let null = serde_json::json!({"type": "null"});
            if let Some(Value::Array(any)) = m.get("anyOf") {
                if let [Value::Object(inner), second] = any.as_slice() {
                    if *second == null {
                        let mut merged = inner.clone();
                        m.remove("anyOf");
                        merged.extend(std::mem::take(m));
                        *v = Value::Object(merged);
                        return tidy(v);
                    }
                }
            }
            if let Some(Value::Array(names)) = m.get_mut("enum") {
                names.retain(|n| !n.is_null());
            }
            if let Some(Value::Array(types)) = m.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let t = types.remove(0);
                    m.insert("type".into(), t);
                }
            }
            if let Some(Value::String(d)) = m.get_mut("description") {
                *d = d.split('\n').map(str::trim).collect::<Vec<_>>().join(" ");
            }
            for x in m.values_mut() {
                tidy(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(tidy),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *v = Value::from(f as i64);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
#[path = "config/config_tests.rs"]
mod exact_tests;

#[cfg(test)]
#[path = "config/cases_tests.rs"]
mod cases_tests;

#[cfg(all(test, feature = "schema"))]
#[path = "config/schema_tests.rs"]
mod schema_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"providers":[{"name":"a","cluster":"ca","models":{"m":"m-id"}}]}"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN.as_bytes()).unwrap();
        assert_eq!(c.providers[0].authority, "ca");
        assert_eq!(c.providers[0].model_id("m"), Some("m-id"));
        assert_eq!(c.routing.strategy, Strategy::Value);
        assert_eq!(c.routing.cluster_header, "x-market-router-cluster");
        assert_eq!(c.failover.mode, FailoverMode::Route);
        assert_eq!(c.failover.max_attempts, 3);
        assert!(c.failover.retry_on.status_5xx && !c.failover.retry_on.status_4xx);
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert!(c.response_headers);
        assert!(c.decision_record);
        assert!(c.market.is_none());
        assert_eq!(c.shared_data_prefix, "mr");
    }

    #[test]
    fn full_contract_example_parses() {
        let doc = r#"{
          "providers": [{"name": "acme", "cluster": "provider_acme", "authority": "api.acme.example",
            "models": {"llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct", "gpt-4o-mini": "gpt-4o-mini"},
            "provider_type": "company", "region": "us-east",
            "static_offer": {"price": {"input_per_mtok": 0.5, "output_per_mtok": 1.5},
                             "latency_ms": {"ttft_p50": 500}, "uptime": 0.99}}],
          "market": {"cluster": "market_sidecar", "authority": "market", "path": "/v1/market/snapshot",
                     "refresh_ms": 5000, "max_age_ms": 60000, "timeout_ms": 1000, "report": false},
          "routing": {"strategy": "balanced", "weights": {"price": 0.5, "latency": 0.3, "reliability": 0.2},
            "constraints": {"max_price_per_mtok": 5.0, "min_uptime": 0.95, "max_ttft_ms": 3000,
                            "provider_types": ["company", "community"], "regions": ["us-east", "eu-west"]},
            "cluster_header": "x-market-router-cluster", "affinity_header": "x-session-id", "client_overrides": false},
          "failover": {"mode": "route", "max_attempts": 3, "attempt_timeout_ms": 30000, "deadline_ms": 90000,
            "retry_on": ["connect-failure", "reset", "timeout", "5xx", "429"],
            "circuit": {"failure_threshold": 3, "cooldown_ms": 30000}},
          "limits": {"max_body_bytes": 1048576},
          "response_headers": true,
          "decision_record": false
        }"#;
        let c = Config::parse(doc.as_bytes()).unwrap();
        let p = &c.providers[0];
        assert_eq!(p.authority, "api.acme.example");
        assert_eq!(p.static_offer.as_ref().unwrap().ttft_p50_ms, 500.0);
        assert_eq!(c.routing.constraints.provider_types.len(), 2);
        assert_eq!(c.routing.affinity_header.as_deref(), Some("x-session-id"));
        assert!(!c.failover.retry_on.malformed);
        assert!(!c.decision_record);
        let m = c.market.unwrap();
        assert_eq!(m.refresh_ms, 5000);
        assert!(!m.report);
        let dflt = Config::parse(br#"{"providers": [{"name": "a", "cluster": "c", "models": {"m": "m"}}], "market": {"cluster": "s"}}"#).unwrap();
        assert!(dflt.market.unwrap().report);
    }

    /// Each bad document → the exact error line.
    #[test]
    fn bad_configs_name_field_value_and_allowed() {
        let cases: &[(&str, &str)] = &[
            ("nope", "field `(root)` = 4 bytes: valid JSON"),
            ("{}", "field `providers` = (missing): required"),
            (r#"{"providers":[]}"#, "field `providers` = []: expected at least one provider"),
            (
                r#"{"providers":[{"name":"a","cluster":42,"models":{"m":"m"}}]}"#,
                "field `providers[0].cluster` = 42: expected a non-empty string",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{}}]}"#,
                "field `providers[0].models` = {}: expected a non-empty object",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"strategy":"fastes"}}"#,
                "field `routing.strategy` = \"fastes\": expected one of value, cheapest, fastest, most_reliable, balanced, weighted",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"stratgy":"fastest"}}"#,
                "field `routing.stratgy` = (not shown): unknown field; allowed: strategy,",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"failover":{"max_attempts":0}}"#,
                "field `failover.max_attempts` = 0: expected an integer in 1..=10",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"failover":{"retry_on":["5xx","boom"]}}"#,
                "field `failover.retry_on[1]` = \"boom\": expected one of connect-failure,",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}},{"name":"a","cluster":"d","models":{"m":"m"}}]}"#,
                "field `providers[1].name` = \"a\": expected a name no other provider uses",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"},"provider_type":"corp"}]}"#,
                "field `providers[0].provider_type` = \"corp\": expected one of company, community, self_hosted",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"market":{"cluster":"s","refresh_ms":5000,"max_age_ms":10}}"#,
                "field `market.max_age_ms` = 10: expected at least market.refresh_ms (5000)",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"weights":{"price":0,"latency":0,"reliability":0}}}"#,
                "field `routing.weights`",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"constraints":{"min_uptime":1.5}}}"#,
                "field `routing.constraints.min_uptime` = 1.5: expected a number in 0..=1",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"cluster_header":"X Cluster"}}"#,
                "field `routing.cluster_header` = \"X Cluster\": expected a lowercase header name",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"},"static_offer":{"price":{"input_per_mtok":-1,"output_per_mtok":1}}}]}"#,
                "field `providers[0].static_offer.price.input_per_mtok` = -1: expected a number in 0..=1000000",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"failover":{"mode":"hedge"}}"#,
                "field `failover.mode` = \"hedge\": expected one of route, dispatch, envoy",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"limits":{"max_body_bytes":0}}"#,
                "field `limits.max_body_bytes` = 0: expected an integer in 1..=67108864",
            ),
            ("[1]", "field `(root)` = [1]: expected an object"),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"rollout_percent":50}}"#,
                "field `routing.default_provider` = (missing): required when routing.rollout_percent is below 100",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"rollout_percent":50,"default_provider":"zz"}}"#,
                "field `routing.default_provider` = \"zz\": expected the name of a configured provider",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"explain":{"path_prefix":"mr/"}}"#,
                "field `explain.path_prefix` = \"mr/\": expected a path starting with /",
            ),
        ];
        for (doc, want) in cases {
            let got = Config::parse(doc.as_bytes()).unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "doc {doc}\n got: {got}\nwant: {want}…"
            );
        }
    }

    #[test]
    fn provider_headers_never_echo_their_values() {
        let doc = r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"},"headers":{"Authorization":"Bearer sk-secret"}}]}"#;
        let e = Config::parse(doc.as_bytes()).unwrap_err().to_string();
        assert!(
            e.starts_with("field `providers[0].headers.Authorization` = (redacted)"),
            "{e}"
        );
        assert!(!e.contains("sk-secret"));
        let ok = r#"{"providers":[{"name":"a","cluster":"api.x:443","models":{"m":"m"},"scheme":"https","headers":{"authorization":"Bearer k"}}]}"#;
        let c = Config::parse(ok.as_bytes()).unwrap();
        assert_eq!(c.providers[0].scheme, "https");
        assert_eq!(
            c.providers[0].headers,
            vec![("authorization".to_string(), "Bearer k".to_string())]
        );
    }

    /// serde's derived structs read an array as fields by position; the document's objects
    /// must be objects. Null is "left out" for fields, a value for array items.
    #[test]
    fn objects_are_objects_and_null_is_left_out() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":["fastest"]}"#,
                "field `routing` = [\"fastest\"]: expected an object",
            ),
            (
                r#"{"providers":[["a","c",{"m":"m"}]]}"#,
                "field `providers[0]` = [\"a\",\"c\",{\"m\":\"m\"}]: expected an object",
            ),
            (
                r#"{"providers":[{"name":null,"cluster":"c","models":{"m":"m"}}]}"#,
                "field `providers[0].name` = (missing): required",
            ),
            (
                r#"{"providers":[null]}"#,
                "field `providers[0]` = null: expected an object",
            ),
            (
                r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"nope":null}"#,
                "field `nope` = (not shown): unknown field; allowed: providers, market,",
            ),
        ];
        for (doc, want) in cases {
            let got = Config::parse(doc.as_bytes()).unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "doc {doc}\n got: {got}\nwant: {want}…"
            );
        }
        let doc = r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],
                      "routing":{"strategy":null},"failover":{"max_attempts":null}}"#;
        let c = Config::parse(doc.as_bytes()).unwrap();
        assert_eq!(c.routing.strategy, defaults::STRATEGY);
        assert_eq!(c.failover.max_attempts, 3);
    }

    #[test]
    fn weights_are_normalized() {
        let doc = r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],
                      "routing":{"weights":{"price":2,"latency":1,"reliability":1}}}"#;
        let w = Config::parse(doc.as_bytes()).unwrap().routing.weights;
        assert!((w.price - 0.5).abs() < 1e-9 && (w.latency - 0.25).abs() < 1e-9);
    }
}
