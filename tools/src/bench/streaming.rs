//! The streaming section: what a streamed answer costs, Envoy alone, the empty filter, route
//! mode and envoy mode in front of the mock provider streaming one event per body chunk.

use super::load::{Wrk, WrkOut};
use super::market::overhead_config;
use super::overhead::{empty_filter, start_variant, timed_run, Variant, VariantInfo};
use super::util::{clock_ticks_per_sec, fmt_num, fmt_signed, log, median, round_to, variant_list};
use super::{Opts, CHAT_PATH, CLUSTER_HEADER, MODEL, REQ_TIMEOUT};
use market_router_testbed::{request, Filter, MockOpts, MockProvider};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The streaming section of `latest.json`.
#[derive(Debug, Serialize)]
pub struct Streaming {
    pub upstream: String,
    pub events_per_answer: usize,
    pub connections: u32,
    pub secs: u64,
    pub rounds: usize,
    pub variants: Vec<VariantInfo>,
    pub table: Vec<StreamRow>,
    /// Request kind (`usage`, `plain`) → `x/y` → paired medians.
    pub comparisons: BTreeMap<String, BTreeMap<String, StreamComparison>>,
}

#[derive(Debug, Serialize)]
pub struct StreamRow {
    pub kind: &'static str,
    pub variant: &'static str,
    pub rps: f64,
    pub cpu_us_per_req: f64,
}

#[derive(Debug, Serialize)]
pub struct StreamComparison {
    pub added_cpu_us_per_req: f64,
    pub cpu_capacity_ratio: f64,
}

/// SSE events of the mock's streamed answer arrive this far apart, ms: one body chunk each.
pub(crate) const STREAM_CHUNK_MS: u64 = 1;

/// A streamed chat request, asking for the final usage chunk or not.
fn stream_body(include_usage: bool) -> Vec<u8> {
    json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": include_usage},
           "max_tokens": 64, "messages": [{"role": "user", "content": "a short streamed answer"}]})
    .to_string()
    .into_bytes()
}

/// What a streamed answer costs: Envoy alone, the empty filter and route mode in front of the
/// mock provider streaming its answer one event per body chunk.
pub(crate) fn run(opts: &Opts) -> Result<Streaming, String> {
    let wrk_bin = opts
        .wrk
        .clone()
        .ok_or("wrk not found (bench.sh installs it; or pass --wrk PATH)")?;
    let wrk = Wrk::new(wrk_bin)?;
    let mock = MockProvider::start(
        "alpha",
        &MockOpts {
            quiet: true,
            chunk_ms: STREAM_CHUNK_MS,
            ..MockOpts::default()
        },
    )?;
    let port = mock.port();
    log("streaming: starting Envoy variants");
    let variants = [
        start_variant("a", "Envoy, no filter", port, port, Filter::None)?,
        start_variant(
            "b",
            "Envoy + empty proxy-wasm filter",
            port,
            port,
            empty_filter(&opts.empty_wasm, "{}"),
        )?,
        start_variant(
            "c",
            "market-router, route mode (static offers)",
            port,
            port,
            Filter::MarketRouter {
                config_json: overhead_config("route", true, false),
            },
        )?,
        start_variant(
            "n",
            "market-router, envoy mode (static offers)",
            port,
            port,
            Filter::MarketRouterEnvoy {
                config_json: overhead_config("envoy", true, false),
            },
        )?,
    ];
    let kinds = [("usage", true), ("plain", false)];
    // Pre-flight: a real stream, through the filter, with the usage chunk when asked.
    let mut events = 0;
    for (_, usage) in kinds {
        let r = request(
            "POST",
            &variants[2].envoy.url(CHAT_PATH),
            &[
                ("content-type", "application/json"),
                (CLUSTER_HEADER, "provider_a"),
            ],
            &stream_body(usage),
            REQ_TIMEOUT,
        )?;
        let text = r.text();
        if r.status != 200 || r.header("x-market-router-provider") != Some("alpha") {
            return Err(format!("streaming pre-flight: {} {text}", r.status));
        }
        events = text.matches("data: ").count();
        if events < 5 || text.contains("\"usage\"") != usage {
            return Err(format!("streaming pre-flight: unexpected stream: {text}"));
        }
    }
    let scripts = kinds
        .iter()
        .map(|(k, usage)| {
            Ok((
                *k,
                wrk.script(&format!("stream-{k}"), &stream_body(*usage))?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let ticks = clock_ticks_per_sec();
    let run_one = |v: &Variant, script: &Path, secs: u64| -> Result<(WrkOut, f64), String> {
        let (out, cpu) = timed_run(&wrk, v, script, (2, 16), secs, ticks)?;
        if out.non2xx > 0 || out.errors > 0 || out.requests == 0 {
            return Err(format!(
                "streaming {}: {} requests, {} non-2xx, {} socket errors",
                v.key, out.requests, out.non2xx, out.errors
            ));
        }
        Ok((out, cpu))
    };
    for v in &variants {
        run_one(v, &scripts[0].1, opts.warmup_secs)?;
    }
    // (kind, variant) → per-round (req/s, CPU µs per request).
    let mut runs: BTreeMap<(&str, &str), Vec<(f64, f64)>> = BTreeMap::new();
    for round in 0..opts.rounds {
        for (kind, script) in &scripts {
            for v in &variants {
                let (out, cpu) = run_one(v, script, opts.sat_secs)?;
                let rps = out.requests as f64 / out.secs.max(1e-9);
                log(&format!(
                    "streaming: round {} {kind:5} {}: {rps:>8.0} req/s  envoy cpu {cpu:>6.1} µs/req",
                    round + 1,
                    v.key
                ));
                runs.entry((kind, v.key)).or_default().push((rps, cpu));
            }
        }
    }
    let mut table = Vec::new();
    let mut comparisons: BTreeMap<String, BTreeMap<String, StreamComparison>> = BTreeMap::new();
    for (kind, _) in &scripts {
        let series = |v: &str| runs.get(&(*kind, v)).cloned().unwrap_or_default();
        for v in &variants {
            let r = series(v.key);
            table.push(StreamRow {
                kind,
                variant: v.key,
                rps: round_to(median(&r.iter().map(|x| x.0).collect::<Vec<_>>()), 0),
                cpu_us_per_req: round_to(median(&r.iter().map(|x| x.1).collect::<Vec<_>>()), 1),
            });
        }
        let mut cmp: BTreeMap<String, StreamComparison> = BTreeMap::new();
        for (x, y) in [("b", "a"), ("c", "a"), ("c", "b"), ("n", "b"), ("n", "c")] {
            let (sx, sy) = (series(x), series(y));
            let added: Vec<f64> = sx.iter().zip(&sy).map(|(p, q)| p.1 - q.1).collect();
            let cpu_ratio: Vec<f64> = sx.iter().zip(&sy).map(|(p, q)| q.1 / p.1).collect();
            cmp.insert(
                format!("{x}/{y}"),
                StreamComparison {
                    added_cpu_us_per_req: round_to(median(&added), 1),
                    cpu_capacity_ratio: round_to(median(&cpu_ratio), 3),
                },
            );
        }
        comparisons.insert((*kind).into(), cmp);
    }
    Ok(Streaming {
        upstream: format!("mock provider (crates/testbed/src/bin/mock_provider.rs), {events} SSE events per answer (one more with the usage chunk), {STREAM_CHUNK_MS} ms apart"),
        events_per_answer: events,
        connections: 16,
        secs: opts.sat_secs,
        rounds: opts.rounds,
        variants: variants
            .iter()
            .map(|v| VariantInfo {
                key: v.key,
                about: v.about,
            })
            .collect(),
        table,
        comparisons,
    })
}

/// The streaming part of `latest.md`.
pub(crate) fn markdown(streaming: Option<&Streaming>) -> String {
    let mut md = String::new();
    let Some(st) = streaming else {
        return md;
    };
    let _ = writeln!(md, "\n## 4. Streaming\n");
    let _ = writeln!(
        md,
        "Upstream: {}. Load: wrk, 16 connections, {} s runs, variants alternating, rounds: {}; medians (comparisons: the median of each round's paired difference or ratio). Requests stream (`stream: true`) with `stream_options.include_usage` true (usage: the filter reads the chunks to find the final usage chunk and prices the answer from it) or false (plain: no chunk is read and the cost stays the estimate). The mock paces the events, so req/s is the same for every variant; what differs is Envoy's CPU per streamed request.\n",
        st.upstream, st.secs, st.rounds,
    );
    variant_list(&mut md, &st.variants);
    let _ = writeln!(
        md,
        "\n| request | variant | req/s | Envoy CPU µs/req |\n|---|---|---:|---:|"
    );
    for r in &st.table {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r.kind,
            r.variant,
            fmt_num(r.rps, 0),
            fmt_num(r.cpu_us_per_req, 1),
        );
    }
    let _ = writeln!(
        md,
        "\n| request | pair | added Envoy CPU µs/req | CPU capacity ratio (requests per CPU second, x over y) |\n|---|---|---:|---:|"
    );
    for (kind, c) in &st.comparisons {
        for (pair, v) in c {
            let (x, y) = pair.split_once('/').unwrap_or((pair, ""));
            let _ = writeln!(
                md,
                "| {kind} | {x} vs {y} | {} | {} |",
                fmt_signed(v.added_cpu_us_per_req, 1),
                fmt_num(v.cpu_capacity_ratio, 3),
            );
        }
    }
    md
}
