//! Market snapshot v1: validation of what the sidecar serves, the compact form kept in shared
//! data, and the per-VM index used on the request path.
//!
//! Flow: the refreshing VM validates the sidecar's JSON once ([`validate`]), keeping only
//! valid offers of configured providers, and stores the result ([`Stored::encode`]). Every VM
//! decodes the stored form when its generation changes ([`Stored::decode`]) and indexes it by
//! model ([`MarketView::new`]); requests only look up that index.

use crate::config::{Config, ProviderType};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Availability of an offer right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    /// Serving normally.
    Online,
    /// Serving with problems.
    Degraded,
    /// Not serving: never routed to.
    Offline,
}

impl Availability {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Degraded => "degraded",
            Self::Offline => "offline",
        }
    }
}

/// One validated offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Provider id.
    #[serde(rename = "p")]
    pub provider: String,
    /// Client model name.
    #[serde(rename = "m")]
    pub model: String,
    /// Provider's own model id, if it differs from the configured one.
    #[serde(rename = "pm", default, skip_serializing_if = "Option::is_none")]
    pub provider_model: Option<String>,
    /// USD per million input tokens.
    #[serde(rename = "i")]
    pub input_per_mtok: f64,
    /// USD per million output tokens.
    #[serde(rename = "o")]
    pub output_per_mtok: f64,
    /// Median time to first token, ms.
    #[serde(rename = "t")]
    pub ttft_p50_ms: f64,
    /// 95th percentile time to first token, ms, if the market gives it.
    #[serde(rename = "t95", default, skip_serializing_if = "Option::is_none")]
    pub ttft_p95_ms: Option<f64>,
    /// Share of successful requests, 0..1.
    #[serde(rename = "u")]
    pub uptime: f64,
    /// Availability now.
    #[serde(rename = "a")]
    pub availability: Availability,
    /// Provider category.
    #[serde(rename = "k")]
    pub provider_type: ProviderType,
    /// Region tag.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Max context tokens.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
    /// Output tokens per second.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub throughput_tps: Option<f64>,
    /// Where the producer took each figure from, when it says (`offers[].provenance`).
    #[serde(rename = "v", default, skip_serializing_if = "Vec::is_empty")]
    pub provenance: Vec<Provenance>,
}

/// Where one figure of an offer came from: `offers[].provenance.<figure>` in snapshot v1.
/// Routing ignores it; the transparency endpoints show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Figure name (`price`, `ttft`, `uptime`, `availability`, ...).
    #[serde(rename = "f")]
    pub figure: String,
    /// Source name (a feed or catalog, `override`, `config`, `default`).
    #[serde(rename = "s")]
    pub source: String,
    /// When the source last confirmed the figure, ms since the epoch.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub as_of_ms: Option<u64>,
    /// The source has not confirmed it within its maximum age.
    #[serde(rename = "x", default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

/// At most this many provenance entries are kept per offer, names clipped to 40 bytes.
const MAX_PROVENANCE: usize = 16;

/// Why a snapshot was rejected whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// Not JSON.
    NotJson,
    /// `version` missing or not 1.
    Version(String),
    /// A required top-level field is missing or has the wrong type.
    Field(&'static str),
    /// Every offer was invalid.
    NoValidOffers(usize),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotJson => write!(f, "snapshot is not valid JSON"),
            Self::Version(v) => write!(f, "snapshot version is {v}, expected 1"),
            Self::Field(name) => write!(f, "snapshot field `{name}` is missing or invalid"),
            Self::NoValidOffers(n) => write!(f, "all {n} offers in the snapshot are invalid"),
        }
    }
}

/// The result of validating a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// What gets stored.
    pub stored: Stored,
    /// Offers dropped because they broke a rule, with the first reason.
    pub invalid: Vec<(usize, String)>,
    /// Offers ignored because their provider is not configured.
    pub unknown_providers: usize,
}

/// The snapshot as kept in shared data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Producer's timestamp, ms since the epoch.
    pub generated_at_ms: u64,
    /// When the filter fetched it, ms since the epoch.
    pub fetched_at_ms: u64,
    /// ETag the sidecar sent, for `If-None-Match`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Valid offers of configured providers.
    pub offers: Vec<Offer>,
}

impl Stored {
    /// Shared-data encoding.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes the shared-data encoding.
    pub fn decode(bytes: &[u8]) -> Option<Stored> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Validates a snapshot document against the rules of market-snapshot.md.
pub fn validate(
    body: &[u8],
    config: &Config,
    fetched_at_ms: u64,
    etag: Option<String>,
) -> Result<Validated, SnapshotError> {
    validate_for(body, fetched_at_ms, etag, &|p| {
        config.provider_index(p).is_some()
    })
}

/// Validates a snapshot document by the same rules for any set of providers: the producer's
/// check before it serves a document (every provider counts as configured).
pub fn validate_any(body: &[u8], fetched_at_ms: u64) -> Result<Validated, SnapshotError> {
    validate_for(body, fetched_at_ms, None, &|_| true)
}

fn validate_for(
    body: &[u8],
    fetched_at_ms: u64,
    etag: Option<String>,
    configured: &dyn Fn(&str) -> bool,
) -> Result<Validated, SnapshotError> {
    // Offers are parsed one at a time from borrowed raw text, so validating a large snapshot
    // never holds a JSON tree of the whole document.
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(default)]
        version: Option<Value>,
        #[serde(default)]
        generated_at_ms: Option<Value>,
        #[serde(borrow, default)]
        offers: Option<&'a RawValue>,
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
                SnapshotError::Field("(root)")
            } else {
                SnapshotError::NotJson
            },
        );
    }
    let top: Top<'_> = serde_json::from_slice(body).map_err(|_| SnapshotError::NotJson)?;
    match &top.version {
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(other) => {
            return Err(SnapshotError::Version(
                crate::errors::clip(&other.to_string(), 20).into(),
            ))
        }
        None => return Err(SnapshotError::Version("missing".into())),
    }
    let generated_at_ms = top
        .generated_at_ms
        .as_ref()
        .and_then(Value::as_u64)
        .ok_or(SnapshotError::Field("generated_at_ms"))?;
    let items: Vec<&RawValue> = top
        .offers
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .ok_or(SnapshotError::Field("offers"))?;
    let mut offers = Vec::with_capacity(items.len());
    let mut invalid = Vec::new();
    let mut unknown_providers = 0;
    for (i, raw) in items.iter().enumerate() {
        let parsed = serde_json::from_str::<Value>(raw.get()).map_err(|e| e.to_string());
        match parsed.and_then(|item| check_offer(&item)) {
            Ok(o) => {
                if configured(&o.provider) {
                    offers.push(o);
                } else {
                    unknown_providers += 1;
                }
            }
            Err(why) => invalid.push((i, why)),
        }
    }
    if offers.is_empty() && !invalid.is_empty() && unknown_providers == 0 {
        return Err(SnapshotError::NoValidOffers(invalid.len()));
    }
    Ok(Validated {
        stored: Stored {
            generated_at_ms,
            fetched_at_ms,
            etag,
            offers,
        },
        invalid,
        unknown_providers,
    })
}

/// Checks one offer of a snapshot document against the rules of market-snapshot.md.
pub fn check_offer(v: &Value) -> Result<Offer, String> {
    let o = v.as_object().ok_or("offer is not an object")?;
    let text = |k: &'static str| -> Result<String, String> {
        match o.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(format!("`{k}` must be a non-empty string")),
        }
    };
    let opt_text = |k: &'static str| -> Result<Option<String>, String> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            _ => Err(format!("`{k}` must be a non-empty string")),
        }
    };
    let num = |parent: &'static str, k: &'static str| -> Option<f64> {
        o.get(parent)
            .and_then(|p| p.get(k))
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite())
    };
    let input = num("price", "input_per_mtok")
        .filter(|x| *x >= 0.0)
        .ok_or("`price.input_per_mtok` must be ≥ 0")?;
    let output = num("price", "output_per_mtok")
        .filter(|x| *x >= 0.0)
        .ok_or("`price.output_per_mtok` must be ≥ 0")?;
    let ttft = num("latency_ms", "ttft_p50")
        .filter(|x| *x > 0.0)
        .ok_or("`latency_ms.ttft_p50` must be > 0")?;
    let uptime = o
        .get("uptime")
        .and_then(Value::as_f64)
        .filter(|x| (0.0..=1.0).contains(x))
        .ok_or("`uptime` must be in 0..1")?;
    let availability = match o.get("availability").and_then(Value::as_str) {
        Some("online") => Availability::Online,
        Some("degraded") => Availability::Degraded,
        Some("offline") => Availability::Offline,
        _ => return Err("`availability` must be online, degraded or offline".into()),
    };
    let provider_type = o
        .get("provider_type")
        .and_then(Value::as_str)
        .and_then(ProviderType::parse)
        .ok_or("`provider_type` must be company, community or self_hosted")?;
    let context_window = match o.get("context_window") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0)
                .ok_or("`context_window` must be a positive integer")?,
        ),
    };
    let throughput_tps = match o.get("throughput_tps") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or("`throughput_tps` must be ≥ 0")?,
        ),
    };
    Ok(Offer {
        provider: text("provider")?,
        model: text("model")?,
        provider_model: opt_text("provider_model")?,
        input_per_mtok: input,
        output_per_mtok: output,
        ttft_p50_ms: ttft,
        ttft_p95_ms: num("latency_ms", "ttft_p95").filter(|x| *x > 0.0),
        uptime,
        availability,
        provider_type,
        region: opt_text("region")?,
        context_window,
        throughput_tps,
        provenance: o.get("provenance").map(provenance).unwrap_or_default(),
    })
}

/// Reads `offers[].provenance`: `{"<figure>": {"source": "...", "as_of_ms": N, "stale": bool}}`.
/// Optional and informative only: entries that do not have this shape are skipped.
fn provenance(v: &Value) -> Vec<Provenance> {
    let Some(map) = v.as_object() else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(figure, p)| {
            let source = p.get("source")?.as_str().filter(|s| !s.is_empty())?;
            Some(Provenance {
                figure: crate::errors::clip(figure, 40).into(),
                source: crate::errors::clip(source, 40).into(),
                as_of_ms: p.get("as_of_ms").and_then(Value::as_u64),
                stale: p.get("stale").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .take(MAX_PROVENANCE)
        .collect()
}

/// The provenance of an offer as the transparency endpoints show it: figure → source, age.
pub fn provenance_json(offer: &Offer, now_ms: u64) -> Value {
    let mut out = serde_json::Map::new();
    for p in &offer.provenance {
        let mut e = serde_json::Map::new();
        e.insert("source".into(), Value::String(p.source.clone()));
        if let Some(t) = p.as_of_ms {
            e.insert("age_ms".into(), Value::from(now_ms.saturating_sub(t)));
        }
        if p.stale {
            e.insert("stale".into(), Value::Bool(true));
        }
        out.insert(p.figure.clone(), Value::Object(e));
    }
    Value::Object(out)
}

/// A VM's decoded, indexed view of the stored snapshot.
#[derive(Debug, Clone, Default)]
pub struct MarketView {
    /// Producer's timestamp.
    pub generated_at_ms: u64,
    /// Fetch time.
    pub fetched_at_ms: u64,
    /// Number of offers.
    pub offers: usize,
    /// ETag of the snapshot, for `If-None-Match`.
    pub etag: Option<String>,
    by_model: HashMap<String, Vec<(usize, Offer)>>,
}

impl MarketView {
    /// Indexes stored offers by model, resolving provider names against `config`.
    pub fn new(stored: Stored, config: &Config) -> Self {
        let mut by_model: HashMap<String, Vec<(usize, Offer)>> = HashMap::new();
        let offers = stored.offers.len();
        for o in stored.offers {
            if let Some(idx) = config.provider_index(&o.provider) {
                by_model.entry(o.model.clone()).or_default().push((idx, o));
            }
        }
        Self {
            generated_at_ms: stored.generated_at_ms,
            fetched_at_ms: stored.fetched_at_ms,
            offers,
            etag: stored.etag,
            by_model,
        }
    }

    /// The offer of provider `idx` for `model`.
    pub fn offer(&self, model: &str, idx: usize) -> Option<&Offer> {
        self.by_model
            .get(model)?
            .iter()
            .find(|(i, _)| *i == idx)
            .map(|(_, o)| o)
    }

    /// Models with at least one offer, sorted.
    pub fn models(&self) -> Vec<&str> {
        let mut m: Vec<&str> = self.by_model.keys().map(String::as_str).collect();
        m.sort_unstable();
        m
    }

    /// Age of the data at `now_ms`, by the producer's clock.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.generated_at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            br#"{"providers":[{"name":"acme","cluster":"c1","models":{"llama":"llama"}},
                              {"name":"beta","cluster":"c2","models":{"llama":"llama"}}]}"#,
        )
        .unwrap()
    }

    fn offer_json(provider: &str, extra: &str) -> String {
        format!(
            r#"{{"provider":"{provider}","model":"llama","price":{{"input_per_mtok":0.3,"output_per_mtok":0.4}},
               "latency_ms":{{"ttft_p50":300}},"uptime":0.99,"availability":"online","provider_type":"community"{extra}}}"#
        )
    }

    #[test]
    fn valid_snapshot_round_trips_through_storage() {
        let doc = format!(
            r#"{{"version":1,"generated_at_ms":1000,"offers":[{},{}]}}"#,
            offer_json(
                "acme",
                r#","region":"eu-west","context_window":8192,"provider_model":"meta/llama""#
            ),
            offer_json("ghost", "")
        );
        let v = validate(doc.as_bytes(), &config(), 2000, Some("\"e1\"".into())).unwrap();
        assert_eq!(v.unknown_providers, 1);
        assert!(v.invalid.is_empty());
        let decoded = Stored::decode(&v.stored.encode()).unwrap();
        assert_eq!(decoded, v.stored);
        let view = MarketView::new(decoded, &config());
        let o = view.offer("llama", 0).unwrap();
        assert_eq!(o.provider_model.as_deref(), Some("meta/llama"));
        assert_eq!(o.context_window, Some(8192));
        assert!(view.offer("llama", 1).is_none());
        assert_eq!(view.age_ms(1500), 500);
        assert_eq!(view.models(), vec!["llama"]);
    }

    #[test]
    fn shipped_sample_snapshot_is_valid() {
        let c = Config::parse(
            br#"{"providers":[{"name":"acme","cluster":"a","models":{"llama-3.1-70b-instruct":"x","gpt-4o-mini":"y"}},
                              {"name":"bolt","cluster":"b","models":{"llama-3.1-70b-instruct":"x"}},
                              {"name":"cirrus","cluster":"c","models":{"llama-3.1-70b-instruct":"x","gpt-4o-mini":"y"}}]}"#,
        )
        .unwrap();
        let v = validate(
            include_bytes!("../../../examples/snapshots/demo.json"),
            &c,
            0,
            None,
        )
        .unwrap();
        assert!(v.invalid.is_empty() && v.unknown_providers == 0);
        assert_eq!(v.stored.offers.len(), 5);
    }

    #[test]
    fn provenance_is_kept_and_shown_with_its_age() {
        let doc = format!(
            r#"{{"version":1,"generated_at_ms":1000,"offers":[{}]}}"#,
            offer_json(
                "acme",
                r#","provenance":{"price":{"source":"litellm","as_of_ms":400},
                    "uptime":{"source":"openrouter","as_of_ms":100,"stale":true},
                    "ttft":{"source":"default"},"bogus":{"as_of_ms":3},"junk":7}"#
            )
        );
        let v = validate(doc.as_bytes(), &config(), 2000, None).unwrap();
        let o = &Stored::decode(&v.stored.encode()).unwrap().offers[0];
        assert_eq!(o.provenance.len(), 3);
        let shown = provenance_json(o, 1000);
        assert_eq!(shown["price"]["source"], "litellm");
        assert_eq!(shown["price"]["age_ms"], 600);
        assert_eq!(shown["uptime"]["stale"], true);
        assert!(shown["ttft"].get("age_ms").is_none());
        assert!(shown.get("bogus").is_none());
        // A producer's check: any provider counts, the same offer rules hold.
        let any = validate_any(doc.replace("acme", "nobody-configured").as_bytes(), 0).unwrap();
        assert_eq!(any.stored.offers.len(), 1);
        assert_eq!(any.unknown_providers, 0);
    }

    #[test]
    fn invalid_offers_are_dropped_and_counted() {
        let doc = format!(
            r#"{{"version":1,"generated_at_ms":1,"offers":[{},{},{},{}]}}"#,
            offer_json("acme", ""),
            offer_json("beta", "").replace("0.99", "1.5"),
            offer_json("beta", "").replace("online", "sleeping"),
            offer_json("beta", "").replace("\"ttft_p50\":300", "\"ttft_p50\":0"),
        );
        let v = validate(doc.as_bytes(), &config(), 0, None).unwrap();
        assert_eq!(v.stored.offers.len(), 1);
        assert_eq!(v.invalid.len(), 3);
        assert!(v.invalid[0].1.contains("uptime"));
    }

    #[test]
    fn whole_snapshot_rejections() {
        let c = config();
        assert_eq!(validate(b"nope", &c, 0, None), Err(SnapshotError::NotJson));
        assert_eq!(
            validate(b"[1]", &c, 0, None),
            Err(SnapshotError::Field("(root)"))
        );
        assert_eq!(
            validate(
                br#"{"version":1,"generated_at_ms":1,"offers":{}}"#,
                &c,
                0,
                None
            ),
            Err(SnapshotError::Field("offers"))
        );
        assert_eq!(
            validate(
                br#"{"version":1,"generated_at_ms":1,"offers":[1,"#,
                &c,
                0,
                None
            ),
            Err(SnapshotError::NotJson)
        );
        assert_eq!(
            validate(
                br#"{"version":2,"generated_at_ms":1,"offers":[]}"#,
                &c,
                0,
                None
            ),
            Err(SnapshotError::Version("2".into()))
        );
        assert_eq!(
            validate(br#"{"generated_at_ms":1,"offers":[]}"#, &c, 0, None),
            Err(SnapshotError::Version("missing".into()))
        );
        assert_eq!(
            validate(br#"{"version":1,"offers":[]}"#, &c, 0, None),
            Err(SnapshotError::Field("generated_at_ms"))
        );
        let all_bad = format!(
            r#"{{"version":1,"generated_at_ms":1,"offers":[{}]}}"#,
            offer_json("acme", "").replace("community", "guild")
        );
        assert_eq!(
            validate(all_bad.as_bytes(), &c, 0, None),
            Err(SnapshotError::NoValidOffers(1))
        );
        // An empty market is valid: it says nobody offers anything right now.
        assert!(validate(
            br#"{"version":1,"generated_at_ms":1,"offers":[]}"#,
            &c,
            0,
            None
        )
        .is_ok());
    }
}

#[cfg(test)]
#[path = "market_tests.rs"]
mod exact_tests;
