//! Plugin configuration v1: JSON → validated [`Config`].
//!
//! Validation walks the JSON by hand so that every error names the field path, the bad value
//! and what is allowed, e.g. ``field `routing.strategy` = "fastes": expected one of cheapest,
//! fastest, most_reliable, balanced, weighted``. Unknown fields are refused the same way, so a
//! typo never silently falls back to a default.

use serde_json::{Map, Value};
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
        match s {
            "company" => Some(Self::Company),
            "community" => Some(Self::Community),
            "self_hosted" => Some(Self::SelfHosted),
            _ => None,
        }
    }
}

/// Routing strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
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
            Self::Cheapest => "cheapest",
            Self::Fastest => "fastest",
            Self::MostReliable => "most_reliable",
            Self::Balanced => "balanced",
            Self::Weighted => "weighted",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cheapest" => Some(Self::Cheapest),
            "fastest" => Some(Self::Fastest),
            "most_reliable" => Some(Self::MostReliable),
            "balanced" => Some(Self::Balanced),
            "weighted" => Some(Self::Weighted),
            _ => None,
        }
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
        Self {
            price: 0.5,
            latency: 0.3,
            reliability: 0.2,
        }
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
}

impl FailoverMode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Route => "route",
            Self::Dispatch => "dispatch",
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

    /// Whether any configured provider serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.providers.iter().any(|p| p.model_id(model).is_some())
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

fn err(field: &str, value: Option<&Value>, expected: impl Into<String>) -> ConfigError {
    let value = match value {
        None => "(missing)".to_string(),
        Some(v) => {
            let s = v.to_string();
            if s.len() > 80 {
                format!("{}…", crate::errors::clip(&s, 80))
            } else {
                s
            }
        }
    };
    ConfigError {
        field: field.to_string(),
        value,
        expected: expected.into(),
    }
}

/// A JSON object being read field by field; `finish` refuses fields nobody read.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    known: &'static [&'static str],
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str, known: &'static [&'static str]) -> Result<Self, ConfigError> {
        match v {
            Value::Object(map) => {
                for k in map.keys() {
                    if !known.contains(&k.as_str()) {
                        // The value of an unknown field is not shown: it may be a credential.
                        return Err(ConfigError {
                            field: join(path, k),
                            value: "(not shown)".into(),
                            expected: format!("unknown field; allowed: {}", known.join(", ")),
                        });
                    }
                }
                Ok(Self {
                    map,
                    path: path.to_string(),
                    known,
                })
            }
            other => Err(err(display_path(path), Some(other), "expected an object")),
        }
    }

    fn field(&self, k: &str) -> String {
        debug_assert!(self.known.contains(&k));
        join(&self.path, k)
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    fn req(&self, k: &str) -> Result<&'a Value, ConfigError> {
        self.get(k)
            .ok_or_else(|| err(&self.field(k), None, "required"))
    }

    fn string(&self, k: &str) -> Result<Option<String>, ConfigError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(v) => Err(err(&self.field(k), Some(v), "expected a non-empty string")),
        }
    }

    fn req_string(&self, k: &str) -> Result<String, ConfigError> {
        self.req(k)?;
        self.string(k)
            .and_then(|s| s.ok_or_else(|| err(&self.field(k), None, "required")))
    }

    fn bool(&self, k: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(k) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(&self.field(k), Some(v), "expected true or false")),
        }
    }

    fn num(&self, k: &str, min: f64, max: f64) -> Result<Option<f64>, ConfigError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x >= min && x <= max => Ok(Some(x)),
                _ => Err(err(
                    &self.field(k),
                    Some(v),
                    format!("expected a number in {min}..={max}"),
                )),
            },
        }
    }

    fn int(&self, k: &str, min: u64, max: u64, default: u64) -> Result<u64, ConfigError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(x) if x >= min && x <= max => Ok(x),
                _ => Err(err(
                    &self.field(k),
                    Some(v),
                    format!("expected an integer in {min}..={max}"),
                )),
            },
        }
    }

    fn obj(&self, k: &str, known: &'static [&'static str]) -> Result<Option<Obj<'a>>, ConfigError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => Obj::new(v, &self.field(k), known).map(Some),
        }
    }

    fn array(&self, k: &str) -> Result<Option<&'a Vec<Value>>, ConfigError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(err(&self.field(k), Some(v), "expected an array")),
        }
    }

    /// An array of strings, each accepted by `parse`.
    fn strings<T>(
        &self,
        k: &str,
        allowed: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, ConfigError> {
        let Some(items) = self.array(k)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item.as_str().and_then(&parse) {
                Some(t) => out.push(t),
                None => {
                    return Err(err(
                        &format!("{}[{i}]", self.field(k)),
                        Some(item),
                        allowed.to_string(),
                    ))
                }
            }
        }
        Ok(out)
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(root)"
    } else {
        path
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

const TOP: &[&str] = &[
    "providers",
    "market",
    "routing",
    "failover",
    "limits",
    "response_headers",
    "decision_record",
    "shared_data_prefix",
    "explain",
];
const EXPLAIN: &[&str] = &["enabled", "path_prefix"];
const PROVIDER: &[&str] = &[
    "name",
    "cluster",
    "authority",
    "models",
    "provider_type",
    "region",
    "static_offer",
    "scheme",
    "headers",
];
const OFFER: &[&str] = &["price", "latency_ms", "uptime", "context_window"];
const PRICE: &[&str] = &["input_per_mtok", "output_per_mtok"];
const LATENCY: &[&str] = &["ttft_p50"];
const MARKET: &[&str] = &[
    "cluster",
    "authority",
    "path",
    "refresh_ms",
    "max_age_ms",
    "timeout_ms",
];
const ROUTING: &[&str] = &[
    "strategy",
    "weights",
    "constraints",
    "ttft_target_ms",
    "cluster_header",
    "affinity_header",
    "client_overrides",
    "default_output_tokens",
    "seed",
    "rollout_percent",
    "default_provider",
];
const WEIGHTS: &[&str] = &["price", "latency", "reliability"];
const CONSTRAINTS: &[&str] = &[
    "max_price_per_mtok",
    "min_uptime",
    "max_ttft_ms",
    "provider_types",
    "regions",
];
const FAILOVER: &[&str] = &[
    "mode",
    "max_attempts",
    "attempt_timeout_ms",
    "deadline_ms",
    "retry_on",
    "retry_on_status",
    "circuit",
    "forward_client_authorization",
];
const CIRCUIT: &[&str] = &["failure_threshold", "cooldown_ms"];
const LIMITS: &[&str] = &["max_body_bytes", "max_snapshot_bytes"];

/// Allowed `failover.retry_on` values.
pub const RETRY_ON_VALUES: &[&str] = &[
    "connect-failure",
    "reset",
    "timeout",
    "5xx",
    "429",
    "4xx",
    "malformed",
];

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
        let top = Obj::new(v, "", TOP)?;
        let providers = parse_providers(&top)?;
        let market = top
            .obj("market", MARKET)?
            .map(|m| parse_market(&m))
            .transpose()?;
        let mut routing = parse_routing(top.obj("routing", ROUTING)?)?;
        if let Some(r) = top.obj("routing", ROUTING)? {
            let rollout = r.int("rollout_percent", 0, 100, 100)? as u8;
            let default = r.string("default_provider")?;
            routing.rollout_percent = rollout;
            routing.default_provider = match default {
                None if rollout < 100 => {
                    return Err(err(
                        "routing.default_provider",
                        None,
                        "required when routing.rollout_percent is below 100",
                    ))
                }
                None => None,
                Some(name) => Some(providers.iter().position(|p| p.name == name).ok_or_else(
                    || {
                        err(
                            "routing.default_provider",
                            r.get("default_provider"),
                            "expected the name of a configured provider",
                        )
                    },
                )?),
            };
        }
        let explain_path_prefix = match top.obj("explain", EXPLAIN)? {
            None => Some("/market-router/v1".to_string()),
            Some(e) => {
                let prefix = e
                    .string("path_prefix")?
                    .unwrap_or_else(|| "/market-router/v1".to_string());
                if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains('?') {
                    return Err(err(
                        "explain.path_prefix",
                        e.get("path_prefix"),
                        "expected a path starting with / and not ending with /",
                    ));
                }
                e.bool("enabled", true)?.then_some(prefix)
            }
        };
        let failover = parse_failover(top.obj("failover", FAILOVER)?)?;
        let limits = top.obj("limits", LIMITS)?;
        let max_body_bytes = match &limits {
            Some(l) => l.int("max_body_bytes", 1, 64 << 20, 1 << 20)?,
            None => 1 << 20,
        } as usize;
        let max_snapshot_bytes = match &limits {
            Some(l) => l.int("max_snapshot_bytes", 1024, 1 << 30, 4 << 20)?,
            None => 4 << 20,
        } as usize;
        let prefix = top
            .string("shared_data_prefix")?
            .unwrap_or_else(|| "mr".to_string());
        if !is_name(&prefix) {
            return Err(err(
                "shared_data_prefix",
                top.get("shared_data_prefix"),
                "expected 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        Ok(Config {
            providers,
            market,
            routing,
            failover,
            max_body_bytes,
            max_snapshot_bytes,
            response_headers: top.bool("response_headers", true)?,
            decision_record: top.bool("decision_record", true)?,
            shared_data_prefix: prefix,
            explain_path_prefix,
        })
    }
}

fn parse_providers(top: &Obj<'_>) -> Result<Vec<Provider>, ConfigError> {
    let items = top
        .array("providers")?
        .ok_or_else(|| err("providers", None, "required"))?;
    if items.is_empty() {
        return Err(err(
            "providers",
            top.get("providers"),
            "expected at least one provider",
        ));
    }
    let mut out: Vec<Provider> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("providers[{i}]");
        let p = Obj::new(item, &path, PROVIDER)?;
        let name = p.req_string("name")?;
        if !is_name(&name) {
            return Err(err(
                &p.field("name"),
                p.get("name"),
                "expected 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        if out.iter().any(|q| q.name == name) {
            return Err(err(
                &p.field("name"),
                p.get("name"),
                "expected a name no other provider uses",
            ));
        }
        let cluster = p.req_string("cluster")?;
        let authority = p.string("authority")?.unwrap_or_else(|| cluster.clone());
        let models_v = p.req("models")?;
        let models =
            match models_v {
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
                other => return Err(err(
                    &p.field("models"),
                    Some(other),
                    "expected a non-empty object mapping client model names to provider model ids",
                )),
            };
        let provider_type = match p.get("provider_type") {
            None => ProviderType::Company,
            Some(v) => v.as_str().and_then(ProviderType::parse).ok_or_else(|| {
                err(
                    &p.field("provider_type"),
                    Some(v),
                    "expected one of company, community, self_hosted",
                )
            })?,
        };
        let region = p.string("region")?;
        let static_offer = p
            .obj("static_offer", OFFER)?
            .map(|o| parse_static_offer(&o))
            .transpose()?;
        let scheme = match p.get("scheme") {
            None => "http".to_string(),
            Some(Value::String(s)) if s == "http" || s == "https" => s.clone(),
            Some(v) => {
                return Err(err(
                    &p.field("scheme"),
                    Some(v),
                    "expected one of http, https",
                ))
            }
        };
        let headers = match p.get("headers") {
            None => Vec::new(),
            Some(Value::Object(m)) => {
                let mut hs = Vec::with_capacity(m.len());
                for (k, v) in m {
                    let ok_name = is_header_name(k)
                        && !matches!(k.as_str(), "host" | "content-length" | "transfer-encoding");
                    match v.as_str() {
                        // Values may be credentials: errors name the header, never the value.
                        Some(val) if ok_name && !val.contains(['\r', '\n']) => {
                            hs.push((k.clone(), val.to_string()))
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
                    field: p.field("headers"),
                    value: "(redacted)".into(),
                    expected: "expected an object of header name to value".into(),
                })
            }
        };
        out.push(Provider {
            name,
            cluster,
            authority,
            models,
            provider_type,
            region,
            static_offer,
            scheme,
            headers,
        });
    }
    Ok(out)
}

fn parse_static_offer(o: &Obj<'_>) -> Result<StaticOffer, ConfigError> {
    let price = o
        .obj("price", PRICE)?
        .ok_or_else(|| err(&o.field("price"), None, "required"))?;
    let input = price.num("input_per_mtok", 0.0, 1e6)?;
    let output = price.num("output_per_mtok", 0.0, 1e6)?;
    let input = input.ok_or_else(|| err(&price.field("input_per_mtok"), None, "required"))?;
    let output = output.ok_or_else(|| err(&price.field("output_per_mtok"), None, "required"))?;
    let ttft = match o.obj("latency_ms", LATENCY)? {
        Some(l) => l.num("ttft_p50", 0.001, 3.6e6)?,
        None => None,
    };
    Ok(StaticOffer {
        input_per_mtok: input,
        output_per_mtok: output,
        ttft_p50_ms: ttft.unwrap_or(1000.0),
        uptime: o.num("uptime", 0.0, 1.0)?.unwrap_or(0.99),
        context_window: match o.get("context_window") {
            None => None,
            Some(_) => Some(o.int("context_window", 1, u64::MAX, 0)?),
        },
    })
}

fn parse_market(m: &Obj<'_>) -> Result<Market, ConfigError> {
    let cluster = m.req_string("cluster")?;
    let path = m
        .string("path")?
        .unwrap_or_else(|| "/v1/market/snapshot".to_string());
    if !path.starts_with('/') {
        return Err(err(
            &m.field("path"),
            m.get("path"),
            "expected a path starting with /",
        ));
    }
    let refresh_ms = m.int("refresh_ms", 100, 86_400_000, 5000)?;
    let max_age_ms = m.int("max_age_ms", 1, u64::MAX / 4, 60_000.max(refresh_ms * 2))?;
    if max_age_ms < refresh_ms {
        return Err(err(
            &m.field("max_age_ms"),
            m.get("max_age_ms"),
            format!("expected at least market.refresh_ms ({refresh_ms})"),
        ));
    }
    Ok(Market {
        cluster,
        authority: m
            .string("authority")?
            .unwrap_or_else(|| "market".to_string()),
        path,
        refresh_ms,
        max_age_ms,
        timeout_ms: m.int("timeout_ms", 1, 60_000, 1000)?,
    })
}

fn parse_routing(r: Option<Obj<'_>>) -> Result<Routing, ConfigError> {
    let Some(r) = r else {
        return Ok(Routing {
            strategy: Strategy::Balanced,
            weights: Weights::default(),
            constraints: Constraints::default(),
            ttft_target_ms: None,
            cluster_header: "x-market-router-cluster".into(),
            affinity_header: None,
            client_overrides: false,
            default_output_tokens: 256,
            seed: None,
            rollout_percent: 100,
            default_provider: None,
        });
    };
    let strategy = match r.get("strategy") {
        None => Strategy::Balanced,
        Some(v) => v.as_str().and_then(Strategy::parse).ok_or_else(|| {
            err(
                &r.field("strategy"),
                Some(v),
                "expected one of cheapest, fastest, most_reliable, balanced, weighted",
            )
        })?,
    };
    let weights = match r.obj("weights", WEIGHTS)? {
        None => Weights::default(),
        Some(w) => {
            let d = Weights::default();
            let price = w.num("price", 0.0, 1e6)?.unwrap_or(d.price);
            let latency = w.num("latency", 0.0, 1e6)?.unwrap_or(d.latency);
            let reliability = w.num("reliability", 0.0, 1e6)?.unwrap_or(d.reliability);
            let sum = price + latency + reliability;
            if sum <= 0.0 {
                return Err(err(
                    &r.field("weights"),
                    r.get("weights"),
                    "expected weights whose sum is > 0",
                ));
            }
            Weights {
                price: price / sum,
                latency: latency / sum,
                reliability: reliability / sum,
            }
        }
    };
    let constraints = match r.obj("constraints", CONSTRAINTS)? {
        None => Constraints::default(),
        Some(c) => Constraints {
            max_price_per_mtok: c.num("max_price_per_mtok", 0.0, 1e6)?,
            min_uptime: c.num("min_uptime", 0.0, 1.0)?,
            max_ttft_ms: c.num("max_ttft_ms", 0.001, 3.6e6)?,
            provider_types: c.strings(
                "provider_types",
                "expected one of company, community, self_hosted",
                ProviderType::parse,
            )?,
            regions: c.strings("regions", "expected a non-empty string", |s| {
                (!s.is_empty()).then(|| s.to_string())
            })?,
        },
    };
    let cluster_header = r
        .string("cluster_header")?
        .unwrap_or_else(|| "x-market-router-cluster".to_string());
    if !is_header_name(&cluster_header) {
        return Err(err(
            &r.field("cluster_header"),
            r.get("cluster_header"),
            "expected a lowercase header name (a-z 0-9 - _)",
        ));
    }
    let affinity_header = r.string("affinity_header")?;
    if let Some(h) = &affinity_header {
        if !is_header_name(h) {
            return Err(err(
                &r.field("affinity_header"),
                r.get("affinity_header"),
                "expected a lowercase header name (a-z 0-9 - _)",
            ));
        }
    }
    Ok(Routing {
        strategy,
        weights,
        constraints,
        ttft_target_ms: r.num("ttft_target_ms", 0.001, 3.6e6)?,
        cluster_header,
        affinity_header,
        client_overrides: r.bool("client_overrides", false)?,
        default_output_tokens: r.int("default_output_tokens", 1, 10_000_000, 256)?,
        seed: match r.get("seed") {
            None => None,
            Some(_) => Some(r.int("seed", 0, u64::MAX, 0)?),
        },
        rollout_percent: 100,
        default_provider: None,
    })
}

fn parse_failover(f: Option<Obj<'_>>) -> Result<Failover, ConfigError> {
    let default_retry = RetryOn {
        connect_failure: true,
        reset: true,
        timeout: true,
        status_5xx: true,
        status_429: true,
        status_4xx: false,
        malformed: true,
    };
    let default_circuit = Circuit {
        failure_threshold: 3,
        cooldown_ms: 30_000,
    };
    let Some(f) = f else {
        return Ok(Failover {
            mode: FailoverMode::Route,
            max_attempts: 3,
            attempt_timeout_ms: 30_000,
            deadline_ms: 90_000,
            retry_on: default_retry,
            retry_on_status: Vec::new(),
            circuit: default_circuit,
            forward_client_authorization: false,
        });
    };
    let mode = match f.get("mode") {
        None => FailoverMode::Route,
        Some(v) => match v.as_str() {
            Some("route") => FailoverMode::Route,
            Some("dispatch") => FailoverMode::Dispatch,
            _ => {
                return Err(err(
                    &f.field("mode"),
                    Some(v),
                    "expected one of route, dispatch",
                ))
            }
        },
    };
    let retry_on = match f.array("retry_on")? {
        None => default_retry,
        Some(_) => {
            let names = f.strings(
                "retry_on",
                &format!("expected one of {}", RETRY_ON_VALUES.join(", ")),
                |s| RETRY_ON_VALUES.contains(&s).then(|| s.to_string()),
            )?;
            let has = |n: &str| names.iter().any(|x| x == n);
            RetryOn {
                connect_failure: has("connect-failure"),
                reset: has("reset"),
                timeout: has("timeout"),
                status_5xx: has("5xx"),
                status_429: has("429"),
                status_4xx: has("4xx"),
                malformed: has("malformed"),
            }
        }
    };
    let retry_on_status = match f.array("retry_on_status")? {
        None => Vec::new(),
        Some(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                match it.as_u64() {
                    Some(s) if (400..=599).contains(&s) => out.push(s as u32),
                    _ => {
                        return Err(err(
                            &format!("{}[{i}]", f.field("retry_on_status")),
                            Some(it),
                            "expected an HTTP status in 400..=599",
                        ))
                    }
                }
            }
            out
        }
    };
    let circuit = match f.obj("circuit", CIRCUIT)? {
        None => default_circuit,
        Some(c) => Circuit {
            failure_threshold: c.int("failure_threshold", 1, 1_000_000, 3)? as u32,
            cooldown_ms: c.int("cooldown_ms", 1, 86_400_000, 30_000)?,
        },
    };
    let attempt_timeout_ms = f.int("attempt_timeout_ms", 1, 3_600_000, 30_000)?;
    let deadline_ms = f.int("deadline_ms", 1, 3_600_000, 90_000.max(attempt_timeout_ms))?;
    if deadline_ms < attempt_timeout_ms {
        return Err(err(
            &f.field("deadline_ms"),
            f.get("deadline_ms"),
            format!("expected at least failover.attempt_timeout_ms ({attempt_timeout_ms})"),
        ));
    }
    Ok(Failover {
        mode,
        max_attempts: f.int("max_attempts", 1, 10, 3)? as u32,
        attempt_timeout_ms,
        deadline_ms,
        retry_on,
        retry_on_status,
        circuit,
        forward_client_authorization: f.bool("forward_client_authorization", false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"providers":[{"name":"a","cluster":"ca","models":{"m":"m-id"}}]}"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN.as_bytes()).unwrap();
        assert_eq!(c.providers[0].authority, "ca");
        assert_eq!(c.providers[0].model_id("m"), Some("m-id"));
        assert_eq!(c.routing.strategy, Strategy::Balanced);
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
                     "refresh_ms": 5000, "max_age_ms": 60000, "timeout_ms": 1000},
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
        assert_eq!(c.market.unwrap().refresh_ms, 5000);
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
                "field `routing.strategy` = \"fastes\": expected one of cheapest, fastest, most_reliable, balanced, weighted",
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
                "field `failover.mode` = \"hedge\": expected one of route, dispatch",
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

    #[test]
    fn weights_are_normalized() {
        let doc = r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],
                      "routing":{"weights":{"price":2,"latency":1,"reliability":1}}}"#;
        let w = Config::parse(doc.as_bytes()).unwrap().routing.weights;
        assert!((w.price - 0.5).abs() < 1e-9 && (w.latency - 0.25).abs() < 1e-9);
    }
}
