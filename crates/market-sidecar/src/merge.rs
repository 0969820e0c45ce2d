//! The merge: every source's last good entries, mapped to the plugin's provider and model
//! names, into snapshot v1 offers, one figure at a time.
//!
//! Per figure the value comes from the first source that has it, in precedence order: live
//! feeds, then catalogs (config order within each), a stale source only when no fresh one has
//! the figure. Operator configuration (`providers.*.provider_type`/`region`) and `overrides`
//! win over every source; `defaults` fill what nobody says. Each figure records where it came
//! from and when that source last confirmed it (`offers[].provenance`).

use crate::config::{Config, Kind, Source};
use crate::sources::Entry;
use market_router_core::market;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One source's current data, as the merge sees it.
pub struct SourceData<'a> {
    /// The source.
    pub source: &'a Source,
    /// Its last good entries.
    pub entries: &'a [Entry],
    /// When the source last confirmed them (a good fetch or a 304), ms since the epoch.
    pub as_of_ms: u64,
    /// Not confirmed within the source's `max_age`.
    pub stale: bool,
}

/// What one build did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildStats {
    /// Offers in the snapshot.
    pub offers: usize,
    /// Of which have at least one stale figure.
    pub stale_offers: usize,
    /// Offers dropped because they broke a snapshot v1 rule.
    pub invalid: u64,
    /// Mapped offers without a price from any source: not published.
    pub unpriced: u64,
    /// Offers beyond `limits.max_offers`.
    pub over_limit: u64,
    /// Per source: distinct external provider ids and (for mapped providers) model ids that
    /// map to nothing.
    pub unmapped: BTreeMap<String, (usize, usize)>,
}

/// External ids → plugin names.
pub struct Mapper {
    providers: HashMap<String, String>,
    models: HashMap<String, String>,
}

/// Provider ids compare case-insensitively, ignoring punctuation (`together_ai` = `TogetherAI`).
pub fn norm_provider(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl Mapper {
    /// From the configuration's `providers` and `models`.
    pub fn new(cfg: &Config) -> Mapper {
        let mut providers = HashMap::new();
        for (name, p) in &cfg.providers {
            for alias in std::iter::once(name).chain(&p.aliases) {
                providers
                    .entry(norm_provider(alias))
                    .or_insert_with(|| name.clone());
            }
        }
        let mut models = HashMap::new();
        for (name, m) in &cfg.models {
            for alias in std::iter::once(name).chain(&m.aliases) {
                models
                    .entry(alias.to_lowercase())
                    .or_insert_with(|| name.clone());
            }
        }
        Mapper { providers, models }
    }

    /// The plugin provider an entry belongs to.
    pub fn provider(&self, e: &Entry) -> Option<&str> {
        std::iter::once(&e.provider)
            .chain(e.provider_alt.as_ref())
            .find_map(|id| self.providers.get(&norm_provider(id)))
            .map(String::as_str)
    }

    /// The client model an external model id means, with the quality of the match (0 = the
    /// whole id, 1 = without the provider prefix, 2 = the last path segment).
    pub fn model(&self, id: &str, provider_id: &str) -> Option<(&str, u8)> {
        let lower = id.to_lowercase();
        if let Some(m) = self.models.get(&lower) {
            return Some((m, 0));
        }
        let prefix = format!("{}/", provider_id.to_lowercase());
        if let Some(m) = lower
            .strip_prefix(&prefix)
            .and_then(|rest| self.models.get(rest))
        {
            return Some((m, 1));
        }
        let last = lower.rsplit('/').next().unwrap_or(&lower);
        self.models.get(last).map(|m| (m.as_str(), 2))
    }
}

/// A figure and where it came from.
#[derive(Debug, Clone)]
struct Slot<T> {
    value: T,
    source: String,
    as_of: Option<u64>,
    stale: bool,
}

#[derive(Debug, Clone, Default)]
struct Acc {
    price: Option<Slot<(f64, f64)>>,
    ttft_p50: Option<Slot<f64>>,
    ttft_p95: Option<Slot<f64>>,
    total_p50: Option<Slot<f64>>,
    throughput: Option<Slot<f64>>,
    uptime: Option<Slot<f64>>,
    availability: Option<Slot<market::Availability>>,
    context_window: Option<Slot<u64>>,
    provider_type: Option<Slot<market_router_core::config::ProviderType>>,
    region: Option<Slot<String>>,
    provider_model: Option<Slot<String>>,
}

/// Fills an empty slot, or replaces a stale one with a fresh value.
fn offer<T>(slot: &mut Option<Slot<T>>, v: Option<T>, source: &str, as_of: u64, stale: bool) {
    let Some(value) = v else { return };
    if slot.as_ref().is_none_or(|s| s.stale && !stale) {
        *slot = Some(Slot {
            value,
            source: source.to_string(),
            as_of: Some(as_of),
            stale,
        });
    }
}

/// Sets a slot whatever it held (operator figures).
fn force<T>(slot: &mut Option<Slot<T>>, v: Option<T>, source: &str) {
    if let Some(value) = v {
        *slot = Some(Slot {
            value,
            source: source.to_string(),
            as_of: None,
            stale: false,
        });
    }
}

/// Builds the offers of snapshot v1, each checked by the filter's own offer rules.
/// `data` is in precedence order within each tier (the configuration's order).
pub fn build(cfg: &Config, data: &[SourceData<'_>]) -> (Vec<Value>, BuildStats) {
    let mapper = Mapper::new(cfg);
    let mut stats = BuildStats::default();
    let mut order: Vec<&SourceData<'_>> = data.iter().collect();
    order.sort_by_key(|d| d.source.tier);
    let mut accs: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for d in order {
        let passthrough = d.source.kind == Kind::Snapshot;
        let mut unmapped_p = BTreeSet::new();
        let mut unmapped_m = BTreeSet::new();
        // One entry per offer and source: the best model match, online before not.
        let mut chosen: BTreeMap<(String, String), (u8, &Entry)> = BTreeMap::new();
        for e in d.entries {
            let provider = match (mapper.provider(e), passthrough) {
                (Some(p), _) => p.to_string(),
                (None, true) => e.provider.clone(),
                (None, false) => {
                    if unmapped_p.len() < 100_000 {
                        unmapped_p.insert(e.provider.as_str());
                    }
                    continue;
                }
            };
            let (model, quality) = match (mapper.model(&e.model, &e.provider), passthrough) {
                (Some((m, q)), _) => (m.to_string(), q),
                (None, true) => (e.model.clone(), 0),
                (None, false) => {
                    if unmapped_m.len() < 100_000 {
                        unmapped_m.insert(e.model.as_str());
                    }
                    continue;
                }
            };
            let online = |x: &Entry| x.figures.availability == Some(market::Availability::Online);
            match chosen.get(&(provider.clone(), model.clone())) {
                Some((q, prev))
                    if *q < quality || (*q == quality && (online(prev) || !online(e))) => {}
                _ => {
                    chosen.insert((provider, model), (quality, e));
                }
            }
        }
        stats
            .unmapped
            .insert(d.source.name.clone(), (unmapped_p.len(), unmapped_m.len()));
        let (src, t, st) = (d.source.name.as_str(), d.as_of_ms, d.stale);
        for (key, (_, e)) in chosen {
            let f = &e.figures;
            let a = accs.entry(key).or_default();
            offer(&mut a.price, f.price, src, t, st);
            offer(&mut a.ttft_p50, f.ttft_p50, src, t, st);
            offer(&mut a.ttft_p95, f.ttft_p95, src, t, st);
            offer(&mut a.total_p50, f.total_p50, src, t, st);
            offer(&mut a.throughput, f.throughput, src, t, st);
            offer(&mut a.uptime, f.uptime, src, t, st);
            offer(&mut a.availability, f.availability, src, t, st);
            offer(&mut a.context_window, f.context_window, src, t, st);
            offer(&mut a.provider_type, f.provider_type, src, t, st);
            offer(&mut a.region, f.region.clone(), src, t, st);
            offer(&mut a.provider_model, f.provider_model.clone(), src, t, st);
        }
    }
    // Operator figures: provider configuration, then overrides (exact model after
    // provider-wide, so the narrower one wins).
    for ((provider, _), a) in accs.iter_mut() {
        if let Some(p) = cfg.providers.get(provider) {
            force(&mut a.provider_type, p.provider_type, "config");
            force(&mut a.region, p.region.clone(), "config");
        }
    }
    let mut overrides: Vec<_> = cfg.overrides.iter().collect();
    overrides.sort_by_key(|o| o.model.is_some());
    for o in overrides {
        let keys: Vec<(String, String)> = match &o.model {
            Some(m) => vec![(o.provider.clone(), m.clone())],
            None => accs
                .keys()
                .filter(|(p, _)| *p == o.provider)
                .cloned()
                .collect(),
        };
        for k in keys {
            let a = accs.entry(k).or_default();
            force(
                &mut a.price,
                o.price.map(|p| (p.input_per_mtok, p.output_per_mtok)),
                "override",
            );
            force(&mut a.ttft_p50, o.ttft_p50_ms, "override");
            force(&mut a.ttft_p95, o.ttft_p95_ms, "override");
            force(&mut a.throughput, o.throughput_tps, "override");
            force(&mut a.uptime, o.uptime, "override");
            force(&mut a.availability, o.availability, "override");
            force(&mut a.context_window, o.context_window, "override");
            force(&mut a.provider_model, o.provider_model.clone(), "override");
        }
    }
    let mut offers = Vec::with_capacity(accs.len().min(cfg.limits.max_offers));
    for ((provider, model), mut a) in accs {
        let Some(price) = a.price.take() else {
            stats.unpriced += 1;
            continue;
        };
        let d = &cfg.defaults;
        force_if_none(&mut a.ttft_p50, d.ttft_p50_ms);
        force_if_none(&mut a.uptime, d.uptime);
        force_if_none(&mut a.availability, d.availability);
        force_if_none(&mut a.provider_type, d.provider_type);
        let v = offer_json(&provider, &model, &price, &a);
        match market::check_offer(&v) {
            Ok(_) if offers.len() >= cfg.limits.max_offers => stats.over_limit += 1,
            Ok(_) => {
                if v.get("stale") == Some(&Value::Bool(true)) {
                    stats.stale_offers += 1;
                }
                offers.push(v);
            }
            Err(why) => {
                stats.invalid += 1;
                tracing::debug!(provider, model, why, "offer dropped");
            }
        }
    }
    stats.offers = offers.len();
    (offers, stats)
}

fn force_if_none<T>(slot: &mut Option<Slot<T>>, v: T) {
    if slot.is_none() {
        *slot = Some(Slot {
            value: v,
            source: "default".into(),
            as_of: None,
            stale: false,
        });
    }
}

fn prov<T>(out: &mut Map<String, Value>, stale: &mut bool, name: &str, slot: &Option<Slot<T>>) {
    if let Some(s) = slot {
        let mut e = Map::new();
        e.insert("source".into(), Value::String(s.source.clone()));
        if let Some(t) = s.as_of {
            e.insert("as_of_ms".into(), Value::from(t));
        }
        if s.stale {
            e.insert("stale".into(), Value::Bool(true));
            *stale = true;
        }
        out.insert(name.into(), Value::Object(e));
    }
}

fn round(x: f64) -> Value {
    json!((x * 1e9).round() / 1e9)
}

fn offer_json(provider: &str, model: &str, price: &Slot<(f64, f64)>, a: &Acc) -> Value {
    let mut o = Map::new();
    o.insert("provider".into(), json!(provider));
    o.insert("model".into(), json!(model));
    if let Some(pm) = &a.provider_model {
        o.insert("provider_model".into(), json!(pm.value));
    }
    o.insert(
        "price".into(),
        json!({"input_per_mtok": round(price.value.0), "output_per_mtok": round(price.value.1)}),
    );
    let mut lat = Map::new();
    if let Some(t) = &a.ttft_p50 {
        lat.insert("ttft_p50".into(), round(t.value));
    }
    if let Some(t) = &a.ttft_p95 {
        lat.insert("ttft_p95".into(), round(t.value));
    }
    if let Some(t) = &a.total_p50 {
        lat.insert("total_p50".into(), round(t.value));
    }
    o.insert("latency_ms".into(), Value::Object(lat));
    if let Some(t) = &a.throughput {
        o.insert("throughput_tps".into(), round(t.value));
    }
    if let Some(u) = &a.uptime {
        o.insert("uptime".into(), round(u.value));
    }
    if let Some(av) = &a.availability {
        o.insert("availability".into(), json!(av.value.as_str()));
    }
    if let Some(pt) = &a.provider_type {
        o.insert("provider_type".into(), json!(pt.value.as_str()));
    }
    if let Some(r) = &a.region {
        o.insert("region".into(), json!(r.value));
    }
    if let Some(c) = &a.context_window {
        o.insert("context_window".into(), json!(c.value));
    }
    let mut p = Map::new();
    let mut stale = false;
    prov(&mut p, &mut stale, "price", &Some(price.clone()));
    prov(&mut p, &mut stale, "ttft", &a.ttft_p50);
    prov(&mut p, &mut stale, "throughput", &a.throughput);
    prov(&mut p, &mut stale, "uptime", &a.uptime);
    prov(&mut p, &mut stale, "availability", &a.availability);
    prov(&mut p, &mut stale, "context_window", &a.context_window);
    prov(&mut p, &mut stale, "provider_type", &a.provider_type);
    o.insert("provenance".into(), Value::Object(p));
    if stale {
        o.insert("stale".into(), Value::Bool(true));
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Figures;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        Config::parse(
            &format!(
                r#"{{"sources":[
                    {{"name":"or","kind":"openrouter","file":"{{model}}.json","models":["openai/gpt-oss-120b"]}},
                    {{"name":"ll","kind":"litellm","file":"ll.json"}},
                    {{"name":"md","kind":"models_dev","file":"md.json"}}],
                  "providers":{{"deepinfra":{{"provider_type":"community"}},
                               "together":{{"aliases":["together_ai","togetherai"],"region":"us"}}}},
                  "models":{{"gpt-oss-120b":{{}}}}{extra}}}"#
            ),
            Path::new("."),
        )
        .unwrap()
    }

    fn entry(provider: &str, model: &str, f: Figures) -> Entry {
        Entry {
            provider: provider.into(),
            provider_alt: None,
            model: model.into(),
            figures: f,
        }
    }

    fn price(i: f64, o: f64) -> Figures {
        Figures {
            price: Some((i, o)),
            ..Figures::default()
        }
    }

    #[test]
    fn live_beats_catalogs_per_figure_and_says_where_from() {
        let c = cfg("");
        let live = [entry(
            "DeepInfra",
            "openai/gpt-oss-120b",
            Figures {
                ttft_p50: Some(787.0),
                uptime: Some(0.98),
                ..price(0.05, 0.24)
            },
        )];
        let ll = [
            entry(
                "deepinfra",
                "openai/gpt-oss-120b",
                Figures {
                    context_window: Some(131072),
                    ..price(0.037, 0.17)
                },
            ),
            entry("together_ai", "openai/gpt-oss-120b", price(0.15, 0.6)),
            entry("unknownco", "gpt-oss-120b", price(0.01, 0.01)),
            entry("deepinfra", "some/other-model", price(0.01, 0.01)),
        ];
        let data = [
            SourceData {
                source: &c.sources[1],
                entries: &ll,
                as_of_ms: 500,
                stale: false,
            },
            SourceData {
                source: &c.sources[0],
                entries: &live,
                as_of_ms: 900,
                stale: false,
            },
        ];
        let (offers, stats) = build(&c, &data);
        assert_eq!(stats.offers, 2);
        assert_eq!(stats.unmapped["ll"], (1, 1));
        let di = &offers[0];
        assert_eq!(di["provider"], "deepinfra");
        assert_eq!(di["model"], "gpt-oss-120b");
        assert_eq!(di["price"]["input_per_mtok"], 0.05);
        assert_eq!(di["provenance"]["price"]["source"], "or");
        assert_eq!(di["provenance"]["price"]["as_of_ms"], 900);
        assert_eq!(di["context_window"], 131072);
        assert_eq!(di["provenance"]["context_window"]["source"], "ll");
        assert_eq!(di["provider_type"], "community");
        assert_eq!(di["provenance"]["provider_type"]["source"], "config");
        let t = &offers[1];
        assert_eq!(t["provider"], "together");
        assert_eq!(t["region"], "us");
        assert_eq!(t["provenance"]["ttft"]["source"], "default");
        assert_eq!(t["latency_ms"]["ttft_p50"], 1000.0);
        assert_eq!(t["provider_type"], "company");
    }

    #[test]
    fn stale_figures_yield_to_fresh_ones_and_are_marked() {
        let c = cfg("");
        let live = [entry(
            "deepinfra",
            "gpt-oss-120b",
            Figures {
                ttft_p50: Some(300.0),
                ..price(9.0, 9.0)
            },
        )];
        let ll = [entry("deepinfra", "gpt-oss-120b", price(0.04, 0.17))];
        let data = [
            SourceData {
                source: &c.sources[0],
                entries: &live,
                as_of_ms: 100,
                stale: true,
            },
            SourceData {
                source: &c.sources[1],
                entries: &ll,
                as_of_ms: 500,
                stale: false,
            },
        ];
        let (offers, stats) = build(&c, &data);
        let o = &offers[0];
        assert_eq!(o["provenance"]["price"]["source"], "ll");
        assert_eq!(o["provenance"]["ttft"]["source"], "or");
        assert_eq!(o["provenance"]["ttft"]["stale"], true);
        assert_eq!(o["stale"], true);
        assert_eq!(stats.stale_offers, 1);
    }

    #[test]
    fn overrides_win_and_can_add_an_offer() {
        let c = cfg(
            r#","overrides":[{"provider":"deepinfra","availability":"offline"},
                             {"provider":"together","model":"gpt-oss-120b","price":{"input_per_mtok":0.1,"output_per_mtok":0.2},"uptime":0.9}]"#,
        );
        let ll = [entry("deepinfra", "gpt-oss-120b", price(0.04, 0.17))];
        let data = [SourceData {
            source: &c.sources[1],
            entries: &ll,
            as_of_ms: 1,
            stale: false,
        }];
        let (offers, _) = build(&c, &data);
        assert_eq!(offers.len(), 2);
        assert_eq!(offers[0]["availability"], "offline");
        assert_eq!(
            offers[0]["provenance"]["availability"]["source"],
            "override"
        );
        assert_eq!(offers[1]["price"]["output_per_mtok"], 0.2);
        assert_eq!(offers[1]["provenance"]["uptime"]["source"], "override");
    }

    #[test]
    fn impossible_and_unpriced_offers_are_counted_not_served() {
        let c = cfg(r#","limits":{"max_offers":1}"#);
        let ll = [
            entry(
                "deepinfra",
                "gpt-oss-120b",
                Figures {
                    uptime: Some(7.0),
                    ..price(0.04, 0.17)
                },
            ),
            entry(
                "together_ai",
                "gpt-oss-120b",
                Figures {
                    context_window: Some(1000),
                    ..Figures::default()
                },
            ),
        ];
        let data = [SourceData {
            source: &c.sources[1],
            entries: &ll,
            as_of_ms: 1,
            stale: false,
        }];
        let (offers, stats) = build(&c, &data);
        assert!(offers.is_empty());
        assert_eq!(stats.invalid, 1);
        assert_eq!(stats.unpriced, 1);
    }

    #[test]
    fn model_matching_prefers_whole_ids() {
        let c = cfg("");
        let m = Mapper::new(&c);
        assert_eq!(
            m.model("deepinfra/openai/gpt-oss-120b", "x"),
            Some(("gpt-oss-120b", 2))
        );
        assert_eq!(m.model("GPT-OSS-120B", "x"), Some(("gpt-oss-120b", 0)));
        assert_eq!(
            m.model("groq/gpt-oss-120b", "groq"),
            Some(("gpt-oss-120b", 1))
        );
        assert_eq!(m.model("gpt-oss-120b:free", "x"), None);
        assert_eq!(norm_provider("Together_AI"), "togetherai");
    }
}
