//! Parsers of the source formats into plain entries: one (external provider, external model)
//! with the figures that source publishes. Field names and units are those of the real feeds
//! and catalogs (see the README's market service section).
//!
//! An entry with an impossible value (negative or non-numeric price, uptime outside 0..100,
//! latency ≤ 0, ...) is dropped whole and counted; a document that is not of the expected
//! shape is an error, and the caller keeps the source's last good entries.

use crate::config::Kind;
use market_router_core::config::ProviderType;
use market_router_core::market::{self, Availability};
use serde_json::Value;
use std::collections::BTreeMap;

/// Figures one source publishes for one offer; `None` = the source does not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// USD per million input and output tokens.
    pub price: Option<(f64, f64)>,
    /// Median time to first token, ms.
    pub ttft_p50: Option<f64>,
    /// High percentile of time to first token, ms.
    pub ttft_p95: Option<f64>,
    /// Median total latency, ms.
    pub total_p50: Option<f64>,
    /// Output tokens per second.
    pub throughput: Option<f64>,
    /// Share of successful requests, 0..1.
    pub uptime: Option<f64>,
    /// Availability now.
    pub availability: Option<Availability>,
    /// Max context tokens.
    pub context_window: Option<u64>,
    /// Provider category.
    pub provider_type: Option<ProviderType>,
    /// Region tag.
    pub region: Option<String>,
    /// Provider's own model id.
    pub provider_model: Option<String>,
}

/// One offer as a source names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The source's provider id.
    pub provider: String,
    /// Another id of the same provider in that source (OpenRouter's tag prefix).
    pub provider_alt: Option<String>,
    /// The source's model id.
    pub model: String,
    /// Figures.
    pub figures: Figures,
}

/// A parsed document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    /// Usable entries.
    pub entries: Vec<Entry>,
    /// Entries dropped for impossible values, with the first reason.
    pub dropped: u64,
    /// First drop reason, for the log.
    pub first_drop: Option<String>,
}

impl Parsed {
    fn drop_entry(&mut self, why: String) {
        self.dropped += 1;
        if self.first_drop.is_none() {
            self.first_drop = Some(why);
        }
    }

    /// Keeps an entry whose figures read well, else drops and counts it.
    fn add(
        &mut self,
        provider: &str,
        alt: Option<String>,
        model: &str,
        figures: Result<Figures, String>,
    ) {
        match figures {
            Ok(figures) => self.entries.push(Entry {
                provider: provider.to_string(),
                provider_alt: alt,
                model: model.to_string(),
                figures,
            }),
            Err(why) => self.drop_entry(format!("{provider} {model}: {why}")),
        }
    }
}

/// Parses a document of `kind`.
pub fn parse(kind: Kind, body: &[u8]) -> Result<Parsed, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match kind {
        Kind::Openrouter => openrouter(&doc),
        Kind::Huggingface => huggingface(&doc),
        Kind::ModelsDev => models_dev(&doc),
        Kind::Litellm => litellm(&doc),
        Kind::Snapshot => snapshot(body),
    }
}

/// A number that may be sent as a JSON number or a decimal string (OpenRouter prices).
/// `Ok(None)` when absent or null; `Err` when present but not a finite number.
fn number(v: Option<&Value>, what: &str) -> Result<Option<f64>, String> {
    let x = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match x {
        Some(x) if x.is_finite() => Ok(Some(x)),
        _ => Err(format!("`{what}` is not a number")),
    }
}

fn at_least(x: Option<f64>, min: f64, strict: bool, what: &str) -> Result<Option<f64>, String> {
    match x {
        Some(v) if v < min || (strict && v == min) => Err(format!(
            "`{what}` = {v}: must be {}{min}",
            if strict { "> " } else { "≥ " }
        )),
        other => Ok(other),
    }
}

fn price_pair(
    input: Option<f64>,
    output: Option<f64>,
    scale: f64,
    what: &str,
) -> Result<Option<(f64, f64)>, String> {
    let input = at_least(input, 0.0, false, &format!("{what} input"))?;
    let output = at_least(output, 0.0, false, &format!("{what} output"))?;
    Ok(match (input, output) {
        (Some(i), Some(o)) => Some((i * scale, o * scale)),
        _ => None,
    })
}

fn context(v: Option<&Value>, what: &str) -> Result<Option<u64>, String> {
    match number(v, what)? {
        None => Ok(None),
        Some(x) if x >= 1.0 && x.fract() == 0.0 && x < 1e12 => Ok(Some(x as u64)),
        Some(x) => Err(format!("`{what}` = {x}: must be a positive integer")),
    }
}

/// OpenRouter endpoint `status`: 0 is normal; negative values are undocumented degradations,
/// read as degraded down to -9 and offline from -10.
fn openrouter_status(v: Option<&Value>) -> Result<Option<Availability>, String> {
    Ok(number(v, "status")?.map(|s| {
        if s >= 0.0 {
            Availability::Online
        } else if s > -10.0 {
            Availability::Degraded
        } else {
            Availability::Offline
        }
    }))
}

/// OpenRouter `GET /api/v1/models/{author}/{slug}/endpoints`:
/// `data.{id, endpoints[]}`; prices in USD per token as strings, uptime in percent, latency in
/// ms, throughput in tokens/s.
fn openrouter(doc: &Value) -> Result<Parsed, String> {
    let data = doc.get("data").ok_or("no `data` object")?;
    let model = data
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("no `data.id`")?;
    let endpoints = data
        .get("endpoints")
        .and_then(Value::as_array)
        .ok_or("no `data.endpoints` array")?;
    let mut out = Parsed::default();
    for (i, e) in endpoints.iter().enumerate() {
        let Some(provider) = e.get("provider_name").and_then(Value::as_str) else {
            out.drop_entry(format!("endpoints[{i}]: no `provider_name`"));
            continue;
        };
        let tag_prefix = e
            .get("tag")
            .and_then(Value::as_str)
            .and_then(|t| t.split('/').next())
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let figures = (|| -> Result<Figures, String> {
            let p = e.get("pricing");
            let price = price_pair(
                number(p.and_then(|p| p.get("prompt")), "pricing.prompt")?,
                number(p.and_then(|p| p.get("completion")), "pricing.completion")?,
                1e6,
                "pricing",
            )?;
            let lat = e.get("latency_last_30m");
            let ttft_p50 = at_least(
                number(lat.and_then(|l| l.get("p50")), "latency_last_30m.p50")?,
                0.0,
                true,
                "latency_last_30m.p50",
            )?;
            let ttft_p95 = at_least(
                number(lat.and_then(|l| l.get("p90")), "latency_last_30m.p90")?,
                0.0,
                true,
                "latency_last_30m.p90",
            )?;
            let throughput = at_least(
                number(
                    e.get("throughput_last_30m").and_then(|t| t.get("p50")),
                    "throughput_last_30m.p50",
                )?,
                0.0,
                false,
                "throughput_last_30m.p50",
            )?;
            let mut uptime = None;
            for k in ["uptime_last_30m", "uptime_last_5m", "uptime_last_1d"] {
                if let Some(u) = number(e.get(k), k)? {
                    if !(0.0..=100.0).contains(&u) {
                        return Err(format!("`{k}` = {u}: must be a percentage 0..100"));
                    }
                    uptime = Some(u / 100.0);
                    break;
                }
            }
            Ok(Figures {
                price,
                ttft_p50,
                ttft_p95,
                throughput,
                uptime,
                availability: openrouter_status(e.get("status"))?,
                context_window: context(e.get("context_length"), "context_length")?,
                ..Figures::default()
            })
        })();
        out.add(provider, tag_prefix, model, figures);
    }
    Ok(out)
}

/// Hugging Face router `GET /v1/models`: `data[].{id, providers[]}`; prices in USD per Mtok,
/// `first_token_latency_ms`, `throughput`, `status` live/error.
fn huggingface(doc: &Value) -> Result<Parsed, String> {
    let data = doc
        .get("data")
        .and_then(Value::as_array)
        .ok_or("no `data` array")?;
    let mut out = Parsed::default();
    for m in data {
        let Some(model) = m.get("id").and_then(Value::as_str) else {
            out.drop_entry("a model without `id`".into());
            continue;
        };
        let Some(providers) = m.get("providers").and_then(Value::as_array) else {
            continue;
        };
        for p in providers {
            let Some(provider) = p.get("provider").and_then(Value::as_str) else {
                out.drop_entry(format!("{model}: a provider without `provider`"));
                continue;
            };
            let figures = (|| -> Result<Figures, String> {
                let pr = p.get("pricing");
                Ok(Figures {
                    price: price_pair(
                        number(pr.and_then(|x| x.get("input")), "pricing.input")?,
                        number(pr.and_then(|x| x.get("output")), "pricing.output")?,
                        1.0,
                        "pricing",
                    )?,
                    ttft_p50: at_least(
                        number(p.get("first_token_latency_ms"), "first_token_latency_ms")?,
                        0.0,
                        true,
                        "first_token_latency_ms",
                    )?,
                    throughput: at_least(
                        number(p.get("throughput"), "throughput")?,
                        0.0,
                        false,
                        "throughput",
                    )?,
                    availability: match p.get("status").and_then(Value::as_str) {
                        Some("live") => Some(Availability::Online),
                        Some("error") => Some(Availability::Offline),
                        Some(_) => Some(Availability::Degraded),
                        None => None,
                    },
                    context_window: context(p.get("context_length"), "context_length")?,
                    ..Figures::default()
                })
            })();
            out.add(provider, None, model, figures);
        }
    }
    Ok(out)
}

/// models.dev: `{<provider id>: {id, name, models: {<model id>: {cost{input,output},
/// limit{context,output}}}}}`, cost in USD per Mtok.
fn models_dev(doc: &Value) -> Result<Parsed, String> {
    let providers = doc.as_object().ok_or("not an object of providers")?;
    let mut out = Parsed::default();
    for (pid, p) in providers {
        let Some(models) = p.get("models").and_then(Value::as_object) else {
            continue;
        };
        for (mid, m) in models {
            let figures = (|| -> Result<Figures, String> {
                let cost = m.get("cost");
                Ok(Figures {
                    price: price_pair(
                        number(cost.and_then(|c| c.get("input")), "cost.input")?,
                        number(cost.and_then(|c| c.get("output")), "cost.output")?,
                        1.0,
                        "cost",
                    )?,
                    context_window: context(
                        m.get("limit").and_then(|l| l.get("context")),
                        "limit.context",
                    )?,
                    ..Figures::default()
                })
            })();
            out.add(pid, None, mid, figures);
        }
    }
    Ok(out)
}

/// LiteLLM price map: `{<model key>: {litellm_provider, input_cost_per_token,
/// output_cost_per_token, max_input_tokens, mode}}`, cost in USD per token. Only chat-style
/// modes are offers; the key loses its `<provider>/` prefix.
fn litellm(doc: &Value) -> Result<Parsed, String> {
    let map = doc.as_object().ok_or("not an object of models")?;
    let mut out = Parsed::default();
    for (key, v) in map {
        if key == "sample_spec" {
            continue;
        }
        let mode = v.get("mode").and_then(Value::as_str);
        if !matches!(mode, None | Some("chat" | "completion" | "responses")) {
            continue;
        }
        let Some(provider) = v.get("litellm_provider").and_then(Value::as_str) else {
            continue;
        };
        let model = key
            .strip_prefix(provider)
            .and_then(|k| k.strip_prefix('/'))
            .unwrap_or(key);
        let figures = (|| -> Result<Figures, String> {
            Ok(Figures {
                price: price_pair(
                    number(v.get("input_cost_per_token"), "input_cost_per_token")?,
                    number(v.get("output_cost_per_token"), "output_cost_per_token")?,
                    1e6,
                    "cost_per_token",
                )?,
                context_window: context(v.get("max_input_tokens"), "max_input_tokens")?,
                ..Figures::default()
            })
        })();
        out.add(provider, None, model, figures);
    }
    Ok(out)
}

/// A snapshot v1 document, checked by the filter's own rules.
fn snapshot(body: &[u8]) -> Result<Parsed, String> {
    let v = market::validate_any(body, 0).map_err(|e| e.to_string())?;
    let mut out = Parsed {
        dropped: v.invalid.len() as u64,
        first_drop: v.invalid.first().map(|(i, w)| format!("offers[{i}]: {w}")),
        ..Parsed::default()
    };
    // The stored form drops ttft_p95 and total_p50; read them from the document.
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut extra: BTreeMap<(String, String), (Option<f64>, Option<f64>)> = BTreeMap::new();
    if let Some(offers) = doc.get("offers").and_then(Value::as_array) {
        for o in offers {
            let key = (
                o.get("provider").and_then(Value::as_str).unwrap_or(""),
                o.get("model").and_then(Value::as_str).unwrap_or(""),
            );
            let lat = o.get("latency_ms");
            let get = |k: &str| {
                lat.and_then(|l| l.get(k))
                    .and_then(Value::as_f64)
                    .filter(|x| x.is_finite() && *x > 0.0)
            };
            extra
                .entry((key.0.to_string(), key.1.to_string()))
                .or_insert((get("ttft_p95"), get("total_p50")));
        }
    }
    for o in v.stored.offers {
        let (p95, total) = extra
            .get(&(o.provider.clone(), o.model.clone()))
            .copied()
            .unwrap_or((None, None));
        out.entries.push(Entry {
            figures: Figures {
                price: Some((o.input_per_mtok, o.output_per_mtok)),
                ttft_p50: Some(o.ttft_p50_ms),
                ttft_p95: p95,
                total_p50: total,
                throughput: o.throughput_tps,
                uptime: Some(o.uptime),
                availability: Some(o.availability),
                context_window: o.context_window,
                provider_type: Some(o.provider_type),
                region: o.region,
                provider_model: o.provider_model,
            },
            provider: o.provider,
            provider_alt: None,
            model: o.model,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openrouter_endpoints_fixture() {
        let p = parse(
            Kind::Openrouter,
            include_bytes!("../fixtures/openrouter/openai/gpt-oss-120b.json"),
        )
        .unwrap();
        let di = p
            .entries
            .iter()
            .find(|e| e.provider == "DeepInfra")
            .unwrap();
        assert_eq!(di.model, "openai/gpt-oss-120b");
        assert_eq!(di.provider_alt.as_deref(), Some("deepinfra"));
        let (i, o) = di.figures.price.unwrap();
        assert!(
            (i - 0.05).abs() < 1e-9 && (o - 0.24).abs() < 1e-9,
            "{i} {o}"
        );
        assert_eq!(di.figures.ttft_p50, Some(787.0));
        assert_eq!(di.figures.ttft_p95, Some(2382.9));
        assert_eq!(di.figures.throughput, Some(118.0));
        assert_eq!(di.figures.availability, Some(Availability::Degraded));
        assert!(di.figures.uptime.unwrap() > 0.9);
        // The endpoint with a negative price is dropped and counted.
        assert_eq!(p.dropped, 1);
        assert!(p.first_drop.unwrap().contains("pricing"));
    }

    #[test]
    fn huggingface_router_fixture() {
        let p = parse(
            Kind::Huggingface,
            include_bytes!("../fixtures/huggingface/models.json"),
        )
        .unwrap();
        let t = p
            .entries
            .iter()
            .find(|e| e.provider == "together" && e.model == "deepseek-ai/DeepSeek-V4-Pro")
            .unwrap();
        assert_eq!(t.figures.price, Some((2.1, 4.4)));
        assert_eq!(t.figures.ttft_p50, Some(611.0));
        assert_eq!(t.figures.context_window, Some(512_000));
        assert_eq!(t.figures.availability, Some(Availability::Online));
        assert!(p
            .entries
            .iter()
            .any(|e| e.figures.availability == Some(Availability::Offline)));
    }

    #[test]
    fn catalogs_in_their_units() {
        let md = parse(
            Kind::ModelsDev,
            br#"{"deepinfra":{"id":"deepinfra","models":{"openai/gpt-oss-120b":{"cost":{"input":0.05,"output":0.24},"limit":{"context":131072}}}},
                 "bad":{"models":{"m":{"cost":{"input":-1,"output":1}}}}}"#,
        )
        .unwrap();
        assert_eq!(md.entries.len(), 1);
        assert_eq!(md.entries[0].figures.price, Some((0.05, 0.24)));
        assert_eq!(md.dropped, 1);
        let ll = parse(
            Kind::Litellm,
            br#"{"sample_spec":{"litellm_provider":"x"},
                 "deepinfra/openai/gpt-oss-120b":{"litellm_provider":"deepinfra","mode":"chat","input_cost_per_token":3.7e-08,"output_cost_per_token":1.7e-07,"max_input_tokens":131072},
                 "text-embedding-3-small":{"litellm_provider":"openai","mode":"embedding","input_cost_per_token":2e-08},
                 "groq/x":{"litellm_provider":"groq","mode":"chat","input_cost_per_token":"lots","output_cost_per_token":1e-7}}"#,
        )
        .unwrap();
        assert_eq!(ll.entries.len(), 1);
        assert_eq!(ll.entries[0].model, "openai/gpt-oss-120b");
        let (i, o) = ll.entries[0].figures.price.unwrap();
        assert!((i - 0.037).abs() < 1e-9 && (o - 0.17).abs() < 1e-9);
        assert_eq!(ll.dropped, 1);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse(Kind::Litellm, b"<html>").is_err());
        assert!(parse(Kind::Openrouter, br#"{"data":{"id":"x"}}"#).is_err());
        assert!(parse(Kind::Huggingface, br#"{"data":{}}"#).is_err());
        assert!(parse(
            Kind::Snapshot,
            br#"{"version":2,"generated_at_ms":1,"offers":[]}"#
        )
        .is_err());
    }

    #[test]
    fn snapshot_keeps_every_figure() {
        let p = parse(
            Kind::Snapshot,
            include_bytes!("../../../examples/snapshots/demo.json"),
        )
        .unwrap();
        assert_eq!(p.entries.len(), 5);
        let acme = &p.entries[0];
        assert_eq!(acme.figures.ttft_p95, Some(900.0));
        assert_eq!(acme.figures.provider_type, Some(ProviderType::Company));
        assert_eq!(
            acme.figures.provider_model.as_deref(),
            Some("meta-llama/Llama-3.1-70B-Instruct")
        );
    }
}
