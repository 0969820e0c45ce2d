//! Pre-route transparency: what is on offer and how one model's providers rank right now,
//! answered from the VM's snapshot without calling any provider.
//!
//! `GET <prefix>/models` lists the models and their providers; `GET <prefix>/route?model=X`
//! (optional `input_tokens`, `output_tokens`) shows the ranked candidates with their numbers
//! and score, and each excluded provider with the reason.

use crate::config::Config;
use crate::health::HealthTable;
use crate::market::MarketView;
use crate::request::RequestInfo;
use crate::rng::Rng;
use crate::select::{self, NoRoute, Prefs};
use serde_json::{json, Value};

/// A transparency request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// `GET <prefix>/models`.
    Models,
    /// `GET <prefix>/route?model=…`.
    Route {
        /// Model asked about (empty when missing).
        model: String,
        /// Assumed prompt tokens.
        input_tokens: u64,
        /// Assumed completion tokens (none = configured default).
        output_tokens: Option<u64>,
    },
    /// Under the prefix, but no such endpoint (or not GET).
    NotFound,
}

/// The answer to `q` at `now_ms`: its status and JSON body.
pub fn answer(
    config: &Config,
    market: Option<&MarketView>,
    health: &HealthTable,
    q: Query,
    now_ms: u64,
) -> (u32, Value) {
    match q {
        Query::Models => (200, models(config, market, now_ms)),
        Query::Route {
            model,
            input_tokens,
            output_tokens,
        } => route(
            config,
            market,
            health,
            &model,
            input_tokens,
            output_tokens,
            now_ms,
        ),
        Query::NotFound => (
            404,
            json!({"error": {"message": "unknown market-router endpoint; try GET <prefix>/models or <prefix>/route?model=…", "type": "invalid_request_error", "code": "not_found"}}),
        ),
    }
}

/// Recognizes a transparency request under `prefix`.
pub fn parse(prefix: &str, method: &str, path: &str) -> Option<Query> {
    let rest = path.strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
        return None;
    }
    let (p, q) = rest.split_once('?').unwrap_or((rest, ""));
    if method != "GET" {
        return Some(Query::NotFound);
    }
    match p {
        "/models" => Some(Query::Models),
        "/route" => {
            let mut model = String::new();
            let mut input_tokens = 1000;
            let mut output_tokens = None;
            for pair in q.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = percent_decode(v);
                match k {
                    "model" => model = v,
                    "input_tokens" => input_tokens = v.parse().unwrap_or(input_tokens),
                    "output_tokens" => output_tokens = v.parse().ok(),
                    _ => {}
                }
            }
            Some(Query::Route {
                model,
                input_tokens,
                output_tokens,
            })
        }
        _ => Some(Query::NotFound),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1e6).round() / 1e6)
    } else {
        Value::Null
    }
}

/// Adds `provenance` (each figure's source and age) when the market offer has one.
fn with_provenance(v: &mut Value, offer: Option<&crate::market::Offer>, now_ms: u64) {
    if let (Some(o), Value::Object(map)) = (offer, v) {
        if !o.provenance.is_empty() {
            map.insert(
                "provenance".into(),
                crate::market::provenance_json(o, now_ms),
            );
        }
    }
}

fn snapshot_json(config: &Config, market: Option<&MarketView>, now_ms: u64) -> Value {
    match (market, &config.market) {
        (Some(m), Some(mc)) => json!({
            "generated_at_ms": m.generated_at_ms,
            "age_ms": m.age_ms(now_ms),
            "offers": m.offers,
            "stale": m.age_ms(now_ms) > mc.max_age_ms,
        }),
        (None, Some(_)) => json!({"offers": 0, "note": "no snapshot received yet"}),
        _ => json!({"offers": 0, "note": "no market configured; static offers only"}),
    }
}

/// `GET <prefix>/models`.
pub fn models(config: &Config, market: Option<&MarketView>, now_ms: u64) -> Value {
    let mut names: Vec<&str> = config
        .providers
        .iter()
        .flat_map(|p| p.models.iter().map(|(m, _)| m.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let data: Vec<Value> = names
        .iter()
        .map(|m| {
            let providers: Vec<Value> = config
                .providers
                .iter()
                .enumerate()
                .filter(|(_, p)| p.model_id(m).is_some())
                .map(|(i, p)| {
                    let offer = market.and_then(|mv| mv.offer(m, i));
                    let mut entry = json!({
                        "provider": p.name,
                        "provider_type": offer.map_or(p.provider_type, |o| o.provider_type).as_str(),
                        "availability": offer.map(|o| o.availability.as_str()),
                        "input_per_mtok": offer.map(|o| o.input_per_mtok).or(p.static_offer.as_ref().map(|s| s.input_per_mtok)),
                        "output_per_mtok": offer.map(|o| o.output_per_mtok).or(p.static_offer.as_ref().map(|s| s.output_per_mtok)),
                        "source": if offer.is_some() { "market" } else if p.static_offer.is_some() { "static" } else { "unknown" },
                    });
                    with_provenance(&mut entry, offer, now_ms);
                    entry
                })
                .collect();
            json!({"id": m, "object": "model", "owned_by": "market-router", "providers": providers})
        })
        .collect();
    json!({"object": "list", "data": data, "snapshot": snapshot_json(config, market, now_ms)})
}

/// `GET <prefix>/route?model=…`: status and body.
pub fn route(
    config: &Config,
    market: Option<&MarketView>,
    health: &HealthTable,
    model: &str,
    input_tokens: u64,
    output_tokens: Option<u64>,
    now_ms: u64,
) -> (u32, Value) {
    if model.is_empty() {
        return (
            400,
            json!({"error": {"message": "query parameter `model` is required", "type": "invalid_request_error", "code": "model_missing"}}),
        );
    }
    let req = RequestInfo {
        model: model.to_string(),
        model_span: 0..0,
        stream: false,
        include_usage: false,
        max_tokens: Some(output_tokens.unwrap_or(config.routing.default_output_tokens)),
        body_len: (input_tokens.saturating_mul(4)) as usize,
    };
    // A fixed seed: the same state explains the same way.
    let ranked = select::rank(
        config,
        market,
        health,
        &req,
        &Prefs::default(),
        now_ms,
        &mut Rng::new(0),
    );
    let excluded_json = |ex: &[(usize, select::Reason)]| -> Vec<Value> {
        ex.iter()
            .map(|(i, r)| json!({"provider": config.providers[*i].name, "constraint": r.code(), "reason": r.to_string()}))
            .collect()
    };
    match ranked {
        Err(NoRoute::UnknownModel) => (
            404,
            json!({"error": {"message": format!("model `{}` is not served by any configured provider", crate::errors::clip(model, 200)), "type": "invalid_request_error", "code": "model_not_found"}}),
        ),
        Err(NoRoute::AllExcluded(ex)) => (
            200,
            json!({"model": model, "strategy": config.routing.strategy.as_str(), "candidates": [], "excluded": excluded_json(&ex), "snapshot": snapshot_json(config, market, now_ms)}),
        ),
        Ok(r) => {
            let cands: Vec<Value> = r
                .candidates
                .iter()
                .enumerate()
                .map(|(rank, c)| {
                    let p = &config.providers[c.provider];
                    let mut cand = json!({
                        "rank": rank + 1,
                        "provider": p.name,
                        "provider_model": c.provider_model,
                        "source": c.source.as_str(),
                        "input_per_mtok": num(c.input_per_mtok),
                        "output_per_mtok": num(c.output_per_mtok),
                        "ttft_ms": num(c.ttft_ms),
                        "ttft_p50_ms": num(c.ttft_p50_ms),
                        "uptime": num(c.uptime),
                        "reliability": num(c.reliability),
                        "availability": c.availability.as_str(),
                        "provider_type": c.provider_type.as_str(),
                        "region": market.and_then(|m| m.offer(model, c.provider)).and_then(|o| o.region.clone()).or(p.region.clone()),
                        "expected_cost_usd": num(c.expected_cost_usd),
                        "value_usd": num(c.value_usd),
                        "score": num(c.score),
                        "probe": c.probe,
                        "beyond_ttft_target": c.beyond_ttft_target,
                    });
                    with_provenance(&mut cand, market.and_then(|m| m.offer(model, c.provider)), now_ms);
                    cand
                })
                .collect();
            (
                200,
                json!({
                    "model": model,
                    "strategy": r.strategy.as_str(),
                    "ttft_target_ms": r.ttft_target_ms,
                    "ttft_target_source": r.ttft_target_source,
                    "last_resort": r.last_resort,
                    "assumed_tokens": {"input": input_tokens, "output": req.max_tokens},
                    "candidates": cands,
                    "excluded": excluded_json(&r.excluded),
                    "snapshot": snapshot_json(config, market, now_ms),
                }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            br#"{"providers":[
              {"name":"a","cluster":"ca","models":{"m":"m"},"static_offer":{"price":{"input_per_mtok":1,"output_per_mtok":2}}},
              {"name":"b","cluster":"cb","models":{"m":"m","n":"n"},"static_offer":{"price":{"input_per_mtok":0.5,"output_per_mtok":0.5},"uptime":0.9}}],
              "routing":{"strategy":"cheapest","constraints":{"min_uptime":0.95}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn each_query_gets_its_answer() {
        let (c, h) = (config(), HealthTable::default());
        assert_eq!(
            answer(&c, None, &h, Query::Models, 5),
            (200, models(&c, None, 5))
        );
        let q = Query::Route {
            model: "m".into(),
            input_tokens: 10,
            output_tokens: Some(20),
        };
        let (status, body) = answer(&c, None, &h, q, 5);
        assert_eq!((status, body), route(&c, None, &h, "m", 10, Some(20), 5));
        assert_eq!(status, 200);
        let (status, body) = answer(&c, None, &h, Query::NotFound, 5);
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn the_snapshot_part_says_whether_a_market_is_configured_and_has_answered() {
        let none = config();
        let body = models(&none, None, 5);
        assert_eq!(
            body["snapshot"]["note"],
            "no market configured; static offers only"
        );
        let with = Config::parse(
            br#"{"providers":[{"name":"a","cluster":"ca","models":{"m":"m"}}],
              "market":{"cluster":"x","refresh_ms":1000,"max_age_ms":1000}}"#,
        )
        .unwrap();
        let body = models(&with, None, 5);
        assert_eq!(body["snapshot"]["note"], "no snapshot received yet");
        let mut view = MarketView::default();
        view.generated_at_ms = 100;
        view.fetched_at_ms = 150;
        let fresh = models(&with, Some(&view), 600);
        assert_eq!(fresh["snapshot"]["generated_at_ms"], 100);
        assert_eq!(fresh["snapshot"]["age_ms"], 500);
        assert_eq!(fresh["snapshot"]["stale"], false);
        assert_eq!(models(&with, Some(&view), 1200)["snapshot"]["stale"], true);
    }

    #[test]
    fn an_offer_that_says_where_its_figures_came_from_shows_it_and_one_that_does_not_shows_nothing()
    {
        let c = Config::parse(
            br#"{"providers":[{"name":"a","cluster":"ca","models":{"m":"m"}},
              {"name":"b","cluster":"cb","models":{"m":"m"}}],
              "market":{"cluster":"x","refresh_ms":1000,"max_age_ms":60000}}"#,
        )
        .unwrap();
        let offer = |p: &str, extra: &str| {
            format!(
                r#"{{"provider":"{p}","model":"m","price":{{"input_per_mtok":1,"output_per_mtok":1}},
                  "latency_ms":{{"ttft_p50":100}},"uptime":0.99,"availability":"online","provider_type":"company"{extra}}}"#
            )
        };
        let doc = format!(
            r#"{{"version":1,"generated_at_ms":1000,"offers":[{},{}]}}"#,
            offer(
                "a",
                r#","provenance":{"price":{"source":"litellm","as_of_ms":400,"stale":true}}"#
            ),
            offer("b", "")
        );
        let view = MarketView::new(
            crate::market::validate(doc.as_bytes(), &c, 0, None)
                .unwrap()
                .stored,
            &c,
        );
        let shown = json!({"price": {"source": "litellm", "age_ms": 1600, "stale": true}});
        let listed = models(&c, Some(&view), 2000);
        let providers = &listed["data"][0]["providers"];
        assert_eq!(providers[0]["provider"], "a", "{listed}");
        assert_eq!(providers[0]["provenance"], shown, "{listed}");
        assert_eq!(providers[1]["provider"], "b", "{listed}");
        assert!(providers[1].get("provenance").is_none(), "{listed}");
        let (status, v) = route(
            &c,
            Some(&view),
            &HealthTable::default(),
            "m",
            10,
            Some(10),
            2000,
        );
        assert_eq!(status, 200, "{v}");
        let cands = v["candidates"].as_array().unwrap();
        assert_eq!(cands.len(), 2, "{v}");
        for cand in cands {
            match cand["provider"].as_str() {
                Some("a") => assert_eq!(cand["provenance"], shown, "{v}"),
                _ => assert!(cand.get("provenance").is_none(), "{v}"),
            }
        }
    }

    #[test]
    fn route_queries_read_their_numbers_and_decode_percent_escapes() {
        let p = "/market-router/v1";
        let route = |path: &str| parse(p, "GET", &format!("{p}/route?{path}"));
        assert_eq!(
            route("model=gpt%2Doss&input_tokens=5&output_tokens=7"),
            Some(Query::Route {
                model: "gpt-oss".into(),
                input_tokens: 5,
                output_tokens: Some(7),
            })
        );
        let model = |path: &str| match route(path) {
            Some(Query::Route { model, .. }) => model,
            other => panic!("{other:?}"),
        };
        // An escape needs two hex digits after `%`; a short or bad one stays as written.
        assert_eq!(model("model=a%41"), "aA");
        assert_eq!(model("model=a%4"), "a%4");
        assert_eq!(model("model=a%"), "a%");
        assert_eq!(model("model=a%zzb"), "a%zzb");
        assert_eq!(model("model=a+b"), "a b");
    }

    #[test]
    fn parses_endpoints_under_the_prefix() {
        let p = "/market-router/v1";
        assert_eq!(
            parse(p, "GET", "/market-router/v1/models"),
            Some(Query::Models)
        );
        assert_eq!(
            parse(
                p,
                "GET",
                "/market-router/v1/route?model=llama%203&input_tokens=50"
            ),
            Some(Query::Route {
                model: "llama 3".into(),
                input_tokens: 50,
                output_tokens: None
            })
        );
        assert_eq!(
            parse(p, "POST", "/market-router/v1/models"),
            Some(Query::NotFound)
        );
        assert_eq!(
            parse(p, "GET", "/market-router/v1/nope"),
            Some(Query::NotFound)
        );
        assert_eq!(parse(p, "GET", "/market-router/v10/models"), None);
        assert_eq!(parse(p, "GET", "/v1/models"), None);
    }

    #[test]
    fn models_lists_each_model_with_its_providers() {
        let v = models(&config(), None, 0);
        assert_eq!(v["data"][0]["id"], "m");
        assert_eq!(v["data"][0]["providers"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"][1]["id"], "n");
        assert_eq!(v["data"][1]["providers"][0]["source"], "static");
    }

    #[test]
    fn route_shows_the_target_the_default_derived() {
        let c = Config::parse(
            br#"{"providers":[
              {"name":"slow","cluster":"c1","models":{"m":"m"},"static_offer":{"price":{"input_per_mtok":0.1,"output_per_mtok":0.1},"latency_ms":{"ttft_p50":1300}}},
              {"name":"mid","cluster":"c2","models":{"m":"m"},"static_offer":{"price":{"input_per_mtok":0.12,"output_per_mtok":0.12},"latency_ms":{"ttft_p50":400}}},
              {"name":"fast","cluster":"c3","models":{"m":"m"},"static_offer":{"price":{"input_per_mtok":1,"output_per_mtok":1},"latency_ms":{"ttft_p50":200}}}]}"#,
        )
        .unwrap();
        let (status, v) = route(&c, None, &HealthTable::default(), "m", 1000, Some(200), 0);
        assert_eq!(status, 200);
        assert_eq!(v["strategy"], "value");
        // The median of 1300, 400 and 200 ms; slow is 1300 / (1.3 × 400) = 2.5× over the bar.
        assert_eq!(v["ttft_target_ms"], 400.0, "{v}");
        assert_eq!(v["ttft_target_source"], "market_median");
        assert_eq!(v["candidates"][0]["provider"], "mid", "{v}");
        assert_eq!(v["candidates"][1]["provider"], "slow", "{v}");
        let slow = &v["candidates"][1];
        let ratio =
            slow["value_usd"].as_f64().unwrap() / slow["expected_cost_usd"].as_f64().unwrap();
        // × (1 + 1 − 0.99): the static offers' default uptime.
        assert!((ratio - 2.5 * 1.01).abs() < 0.005, "{v}");
        assert_eq!(slow["beyond_ttft_target"], true);
        assert_eq!(v["candidates"][0]["score"], 1.0);
    }

    #[test]
    fn route_explains_ranking_and_exclusions() {
        let (status, v) = route(
            &config(),
            None,
            &HealthTable::default(),
            "m",
            100,
            Some(10),
            0,
        );
        assert_eq!(status, 200);
        assert_eq!(v["candidates"][0]["provider"], "a");
        assert_eq!(v["candidates"][0]["rank"], 1);
        assert_eq!(v["excluded"][0]["provider"], "b");
        assert_eq!(v["excluded"][0]["constraint"], "min_uptime");
        assert_eq!(
            route(&config(), None, &HealthTable::default(), "zz", 1, None, 0).0,
            404
        );
        assert_eq!(
            route(&config(), None, &HealthTable::default(), "", 1, None, 0).0,
            400
        );
    }
}
