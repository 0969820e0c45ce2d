//! Fixtures shared by the core's unit tests: a neutral candidate and a configuration of
//! interchangeable providers. Tests change what they test with struct update syntax
//! (`Candidate { probe: true, ..cand(1) }`) rather than keeping their own copies.

use crate::attempt::Attempts;
use crate::config::{Config, ProviderType, Strategy};
use crate::market::Availability;
use crate::select::{Candidate, Ranking, Source};
use crate::walk::Walk;

/// A candidate from static prices for provider `provider`, model "m": prices of 1 USD per
/// million tokens, 1 ms to first token, full uptime, online, score 1, no probe.
pub(crate) fn cand(provider: usize) -> Candidate {
    Candidate {
        provider,
        provider_model: "m".into(),
        source: Source::Static,
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        ttft_ms: 1.0,
        ttft_p50_ms: 1.0,
        ttft_p95_ms: f64::NAN,
        uptime: 1.0,
        reliability: 1.0,
        availability: Availability::Online,
        provider_type: ProviderType::Company,
        expected_cost_usd: 0.0,
        score: 1.0,
        probe: false,
        beyond_ttft_target: false,
        value_usd: 1.0,
    }
}

/// A configuration of `n` providers named a, b, c… (cluster = name), each serving "m" as "m",
/// followed by `extra`: more top-level members, starting with a comma, or nothing.
pub(crate) fn config(n: usize, extra: &str) -> Config {
    let providers: Vec<String> = (b'a'..)
        .take(n)
        .map(|c| {
            let name = char::from(c);
            format!(r#"{{"name":"{name}","cluster":"{name}","models":{{"m":"m"}}}}"#)
        })
        .collect();
    let doc = format!(r#"{{"providers":[{}]{extra}}}"#, providers.join(","));
    Config::parse(doc.as_bytes()).unwrap()
}

/// A walk begun at `now` on `candidates` (strategy `value`, nothing excluded, fresh market).
pub(crate) fn walk(config: &Config, candidates: Vec<Candidate>, now: u64) -> Walk {
    let mut w = Walk::default();
    w.begin(
        Ranking {
            strategy: Strategy::Value,
            candidates,
            excluded: Vec::new(),
            stale: false,
            last_resort: false,
            ttft_target_ms: None,
            ttft_target_source: None,
        },
        Attempts::new(config, now),
    );
    w
}
