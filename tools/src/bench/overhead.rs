//! The overhead section: what the filter costs per request against Envoy alone and an empty
//! filter, with knob variants that split route mode's cost. Every variant is planned in [`plan`] under
//! a key of its own; the comparisons ([`pairs`]) name variants by key.

use super::load::{Wrk, WrkOut};
use super::market::{offer, overhead_config, snapshot, wait_snapshot};
use super::upstream::{start_nginx, Upstream};
use super::util::{
    chat_body, clock_ticks_per_sec, cpu_ticks, fmt_num, fmt_signed, histogram, json_num, log,
    median, now_ms, pass, round_to, stats_map, tool_version, variant_list,
};
use super::{
    Opts, CHAT_PATH, CLUSTER_HEADER, LARGE_BODY, LOAD_TIMEOUT, MODEL, PASSTHROUGH_PATH,
    REQ_TIMEOUT, SMALL_BODY,
};
use market_router_testbed::{
    request, Envoy, EnvoyConfig, Filter, MockOpts, MockProvider, ProviderCluster, Sidecar, TempDir,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::thread;
use std::time::{Duration, Instant};

/// Histogram quantiles by name (`p50`, `p90`, ...), µs.
pub type Quantiles = BTreeMap<String, f64>;

/// The overhead section of `latest.json`.
#[derive(Debug, Serialize)]
pub struct Overhead {
    pub upstream: String,
    pub load_generator: String,
    pub envoy_concurrency: u32,
    pub bodies: Bodies,
    pub saturation: LoadShape,
    pub latency: LoadShape,
    pub rounds: usize,
    pub variants: Vec<VariantInfo>,
    /// Medians per body and variant.
    pub table: Vec<TableRow>,
    /// Body → `x/y` → the median of each round's paired ratio or difference.
    pub comparisons: BTreeMap<String, BTreeMap<String, Comparison>>,
    pub goals: Vec<Goal>,
    /// Knob (j) against the goals' measures; null without knobs.
    pub floor: Option<Floor>,
    /// Variant → `market_router.decision_us` over the whole run (null when Envoy has none).
    pub decision_us: BTreeMap<String, Option<Quantiles>>,
    /// `variant/body` → `market_router.decision_us` over the last stats interval.
    pub decision_us_by_body: BTreeMap<String, Quantiles>,
    /// Variant → where Envoy's CPU goes (with perf only).
    pub cpu_split: BTreeMap<String, CpuSplit>,
    pub filter_counters: BTreeMap<String, BTreeMap<String, u64>>,
    pub wasm_stats: BTreeMap<String, BTreeMap<String, u64>>,
    pub runs: Vec<RunRow>,
}

#[derive(Debug, Serialize)]
pub struct Bodies {
    pub small: usize,
    pub large: usize,
}

#[derive(Debug, Serialize)]
pub struct LoadShape {
    pub connections: u32,
    pub threads: u32,
    pub secs: u64,
}

#[derive(Debug, Serialize)]
pub struct VariantInfo {
    pub key: &'static str,
    pub about: &'static str,
}

#[derive(Debug, Serialize)]
pub struct TableRow {
    pub body: &'static str,
    pub variant: &'static str,
    pub about: &'static str,
    pub rps: f64,
    pub cpu_us_per_req: f64,
    pub sat_p50_us: f64,
    pub sat_p99_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    pub rps_ratio: f64,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    pub added_cpu_us_per_req: f64,
}

#[derive(Debug, Serialize)]
pub struct Goal {
    pub goal: &'static str,
    pub value: f64,
    pub target: f64,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct Floor {
    pub rps_ratio_vs_b: f64,
    pub added_p50_us_vs_a: f64,
}

/// One wrk run.
#[derive(Debug, Serialize)]
pub struct RunRow {
    /// 1-based.
    pub round: usize,
    pub body: &'static str,
    pub kind: &'static str,
    pub variant: &'static str,
    pub requests: u64,
    pub secs: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub envoy_cpu_us_per_req: f64,
}

/// A perf profile, or why there is none (`{"error": ...}`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum CpuSplit {
    Profile(PerfSplit),
    Failed { error: String },
}

#[derive(Debug, Serialize)]
pub struct PerfSplit {
    pub requests: u64,
    pub cpu_us_per_req: f64,
    pub samples: u64,
    /// Mapping group → share and CPU µs per request.
    pub groups: BTreeMap<String, CpuGroup>,
    /// The eight largest mappings.
    pub by_dso: Vec<Dso>,
}

#[derive(Debug, Serialize)]
pub struct CpuGroup {
    pub share_pct: f64,
    pub cpu_us_per_req: f64,
}

#[derive(Debug, Serialize)]
pub struct Dso {
    pub dso: String,
    pub share_pct: f64,
    pub samples: u64,
}

/// How a planned variant's Envoy is set up.
pub(crate) enum Setup {
    /// An Envoy of its own with `filter`; `gzip`: Envoy's compressors in front, and the client
    /// accepts gzip.
    Own { filter: Filter, gzip: bool },
    /// The Envoy of the variant with this key (planned before), posting to a path the filter
    /// passes through.
    PassthroughOf(&'static str),
}

/// One overhead variant before it is started.
pub(crate) struct Plan {
    pub(crate) key: &'static str,
    pub(crate) about: &'static str,
    pub(crate) setup: Setup,
    /// Knob variants run on the small body, at saturation only unless `knob_latency`.
    pub(crate) knob: bool,
    pub(crate) knob_latency: bool,
    /// Whether answers carry `x-market-router-provider`; `None`: when it is market-router.
    pub(crate) provider_header: Option<bool>,
    /// Whether to wait for the market's offers before measuring (market-router variants).
    pub(crate) market: bool,
}

impl Plan {
    fn main(key: &'static str, about: &'static str, filter: Filter) -> Plan {
        Plan {
            key,
            about,
            setup: Setup::Own {
                filter,
                gzip: false,
            },
            knob: false,
            knob_latency: false,
            provider_header: None,
            market: true,
        }
    }

    fn knob(key: &'static str, about: &'static str, filter: Filter) -> Plan {
        Plan {
            knob: true,
            ..Plan::main(key, about, filter)
        }
    }
}

/// The overhead variants in the order they run: the main ones (a, b, c, d, n), then with
/// `knobs` the knob variants (e to o). Every key is its own: the runs, tables and comparisons
/// are keyed by it.
pub(crate) fn plan(knobs: bool, empty_wasm: &Path) -> Vec<Plan> {
    let mr = |mode: &str, full: bool, market: bool| Filter::MarketRouter {
        config_json: overhead_config(mode, full, market),
    };
    let mut plans = vec![
        Plan::main("a", "Envoy, no filter", Filter::None),
        Plan::main(
            "b",
            "Envoy + empty proxy-wasm filter",
            empty_filter(empty_wasm, "{}"),
        ),
        Plan::main("c", "market-router, route mode", mr("route", true, true)),
        Plan::main("d", "market-router, dispatch mode", mr("dispatch", true, true)),
        Plan::main(
            "n",
            "market-router, envoy mode (Envoy's router makes the attempts; the module also runs as the clusters' upstream filter)",
            Filter::MarketRouterEnvoy {
                config_json: overhead_config("envoy", true, true),
            },
        ),
    ];
    if !knobs {
        return plans;
    }
    plans.push(Plan {
        knob_latency: true,
        provider_header: Some(false),
        ..Plan::knob(
            "e",
            "knob: (c) lean: response_headers and decision_record off, no malformed check (so the response is not held)",
            mr("route", false, true),
        )
    });
    plans.push(Plan {
        market: false,
        ..Plan::knob(
            "f",
            "knob: (c) without a market sidecar (static offers)",
            mr("route", true, false),
        )
    });
    plans.push(Plan {
        setup: Setup::PassthroughOf("c"),
        provider_header: Some(false),
        ..Plan::knob(
            "g",
            "knob: (c)'s Envoy, POST to a path the filter passes through (reads the headers, routes nothing)",
            Filter::None,
        )
    });
    // What compression costs: the client accepts gzip, Envoy's compressors encode the
    // answer (the filter asks the upstream for identity).
    for (key, about, filter) in [
        (
            "m",
            "knob: (a) with Envoy's compressors and a gzip-accepting client (httpx's default accept-encoding)",
            Filter::None,
        ),
        (
            "o",
            "knob: (c) with Envoy's compressors in front and a gzip-accepting client (the shipped configuration)",
            mr("route", true, true),
        ),
    ] {
        plans.push(Plan {
            setup: Setup::Own { filter, gzip: true },
            ..Plan::knob(key, about, Filter::None)
        });
    }
    // Empty-filter knobs: (key, about, the empty filter's knobs, also run at one
    // connection, answers carry x-market-router-provider).
    let empty_knobs: [(&str, &str, &str, bool, bool); 5] = [
        (
            "h",
            "knob: the empty filter pausing like (c) does (request headers until the body is complete, response until its body is complete), reading nothing",
            "pause_request,hold_response",
            false,
            false,
        ),
        (
            "i",
            "knob: the empty filter pausing like (h) and making the host calls (c) makes on such a request (headers and bodies read, cluster, timeout and 5 response headers set, status read, clock, 1 histogram, the decision property), with fixed values and none of (c)'s logic",
            "replay",
            false,
            true,
        ),
        (
            "j",
            "knob: the empty filter doing the least body-based routing with response-phase failover needs: request headers held until the body is complete, body read, cluster header set, response status read",
            "floor",
            true,
            false,
        ),
        (
            "k",
            "knob: the empty filter pausing like (h) and reading one request header once the body is complete, nothing else",
            "pause_request,hold_response,read_one",
            false,
            false,
        ),
        (
            "l",
            "knob: a second Envoy identical to (b): how far two processes of the same build differ, the resolution of these comparisons",
            "{}",
            false,
            false,
        ),
    ];
    for (key, about, knobs, latency, provider_header) in empty_knobs {
        plans.push(Plan {
            knob_latency: latency,
            provider_header: Some(provider_header),
            ..Plan::knob(key, about, empty_filter(empty_wasm, knobs))
        });
    }
    plans
}

/// Starts a planned variant; `started` holds the variants started before it.
fn start_planned(
    p: Plan,
    started: &[Variant],
    upstream_port: u16,
    sidecar_port: u16,
) -> Result<Variant, String> {
    match p.setup {
        Setup::Own { filter, gzip } => {
            let mut v =
                start_variant_with(p.key, p.about, upstream_port, sidecar_port, filter, gzip)?;
            v.knob = p.knob;
            v.knob_latency = p.knob_latency;
            if let Some(h) = p.provider_header {
                v.provider_header = h;
            }
            if !p.market {
                v.offers = None;
            }
            Ok(v)
        }
        Setup::PassthroughOf(of) => {
            let base = started
                .iter()
                .find(|v| v.key == of)
                .ok_or_else(|| format!("variant {}: variant {of} is not started", p.key))?;
            Ok(Variant {
                key: p.key,
                about: p.about,
                envoy: Rc::clone(&base.envoy),
                path: PASSTHROUGH_PATH,
                market_router: false,
                provider_header: p.provider_header.unwrap_or(false),
                offers: None,
                knob: p.knob,
                knob_latency: p.knob_latency,
                gzip: false,
            })
        }
    }
}

/// The comparisons `x/y` made for a body: with knobs, the small body's include the knobs'.
pub(crate) fn pairs(body: &str, knobs: bool) -> &'static [(&'static str, &'static str)] {
    if body == "small" && knobs {
        &[
            ("c", "a"),
            ("c", "b"),
            ("d", "a"),
            ("b", "a"),
            ("c", "e"),
            ("c", "f"),
            ("g", "b"),
            ("c", "g"),
            ("h", "b"),
            ("i", "h"),
            ("c", "i"),
            ("j", "b"),
            ("j", "a"),
            ("c", "j"),
            ("e", "j"),
            ("e", "a"),
            ("k", "h"),
            ("l", "b"),
            ("n", "b"),
            ("n", "a"),
            ("n", "c"),
            ("n", "j"),
        ]
    } else {
        &[
            ("c", "a"),
            ("c", "b"),
            ("d", "a"),
            ("b", "a"),
            ("n", "b"),
            ("n", "a"),
            ("n", "c"),
        ]
    }
}

pub(crate) struct Variant {
    pub(crate) key: &'static str,
    pub(crate) about: &'static str,
    pub(crate) envoy: Rc<Envoy>,
    /// Request path (a knob variant posts to a path the filter passes through).
    path: &'static str,
    market_router: bool,
    /// Whether answers carry `x-market-router-provider`.
    provider_header: bool,
    /// Market offers to wait for before measuring.
    offers: Option<usize>,
    /// Knob variants run on the small body only.
    knob: bool,
    /// A knob variant that also runs at one connection (latency).
    knob_latency: bool,
    /// The client accepts gzip (`accept-encoding: gzip, deflate`, httpx's default) and Envoy
    /// runs its compressors in front of the filter.
    gzip: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Run {
    round: usize,
    body: &'static str,
    kind: &'static str,
    variant: &'static str,
    out: WrkOut,
    cpu_us_per_req: f64,
}

impl Run {
    fn rps(&self) -> f64 {
        if self.out.secs > 0.0 {
            self.out.requests as f64 / self.out.secs
        } else {
            f64::NAN
        }
    }
}

pub(crate) fn start_variant(
    key: &'static str,
    about: &'static str,
    upstream_port: u16,
    sidecar_port: u16,
    filter: Filter,
) -> Result<Variant, String> {
    start_variant_with(key, about, upstream_port, sidecar_port, filter, false)
}

/// As [`start_variant`]; `gzip`: Envoy's compressors in front, and the client accepts gzip.
pub(crate) fn start_variant_with(
    key: &'static str,
    about: &'static str,
    upstream_port: u16,
    sidecar_port: u16,
    filter: Filter,
    gzip: bool,
) -> Result<Variant, String> {
    let market_router = matches!(
        filter,
        Filter::MarketRouter { .. } | Filter::MarketRouterEnvoy { .. }
    );
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", upstream_port))
        .provider(ProviderCluster::new("provider_b", upstream_port))
        .sidecar("market_sidecar", sidecar_port)
        .explicit_route(PASSTHROUGH_PATH, "provider_a")
        .compression(gzip)
        .filter(filter)
        .log_level("warning")
        .component_log_level("")
        .stats_flush_interval(Duration::from_secs(1));
    let envoy = Envoy::start(&cfg, 1).map_err(|e| format!("variant {key}: {e}"))?;
    Ok(Variant {
        key,
        about,
        envoy: Rc::new(envoy),
        path: CHAT_PATH,
        market_router,
        provider_header: market_router,
        offers: market_router.then_some(2),
        knob: false,
        knob_latency: false,
        gzip,
    })
}

/// The empty comparison filter with `knobs` as its configuration.
pub(crate) fn empty_filter(empty_wasm: &Path, knobs: &str) -> Filter {
    Filter::Wasm {
        path: empty_wasm.to_path_buf(),
        config_json: knobs.into(),
        root_id: "empty".into(),
    }
}

/// One wrk run against a variant, with Envoy's CPU time per request (µs) over the run.
pub(crate) fn timed_run(
    wrk: &Wrk,
    v: &Variant,
    script: &Path,
    (threads, conns): (u32, u32),
    secs: u64,
    ticks: f64,
) -> Result<(WrkOut, f64), String> {
    let c0 = cpu_ticks(v.envoy.pid());
    let out = wrk.run(script, &v.envoy.url(v.path), threads, conns, secs)?;
    let c1 = cpu_ticks(v.envoy.pid());
    let cpu = match (c0, c1) {
        (Some(a), Some(b)) if out.requests > 0 => {
            (b - a) as f64 / ticks * 1e6 / out.requests as f64
        }
        _ => f64::NAN,
    };
    Ok((out, cpu))
}

/// Runs the overhead section.
pub(crate) fn run(opts: &Opts) -> Result<Overhead, String> {
    let wrk_bin = opts
        .wrk
        .clone()
        .ok_or("wrk not found (bench.sh installs it; or pass --wrk PATH)")?;
    let wrk = Wrk::new(wrk_bin.clone())?;
    if !opts.empty_wasm.is_file() {
        return Err(format!(
            "the empty filter {} is missing (bench.sh builds it)",
            opts.empty_wasm.display()
        ));
    }
    let upstream = match &opts.nginx {
        Some(n) => match start_nginx(n) {
            Ok(u) => u,
            Err(e) => {
                log(&format!("{e}; using the mock provider instead"));
                Upstream::Mock(MockProvider::start(
                    "fast",
                    &MockOpts {
                        quiet: true,
                        ..MockOpts::default()
                    },
                )?)
            }
        },
        None => Upstream::Mock(MockProvider::start(
            "fast",
            &MockOpts {
                quiet: true,
                ..MockOpts::default()
            },
        )?),
    };
    let up_port = upstream.port();
    let dir = TempDir::new("bench-overhead")?;
    let snap_path = dir.join("snapshot.json");
    let snap = snapshot(
        vec![offer("alpha", MODEL, 0), offer("beta", MODEL, 1)],
        now_ms(),
    );
    fs::write(&snap_path, snap.to_string()).map_err(|e| format!("cannot write snapshot: {e}"))?;
    let sidecar = Sidecar::start(&snap_path)?;
    let sc = sidecar.port();

    log("overhead: starting Envoy variants");
    let mut variants: Vec<Variant> = Vec::new();
    for p in plan(opts.knobs, &opts.empty_wasm) {
        let v = start_planned(p, &variants, up_port, sc)?;
        variants.push(v);
    }

    // Pre-flight: every variant answers the chat request as expected.
    let small = chat_body(SMALL_BODY)?;
    let large = chat_body(LARGE_BODY)?;
    for v in &variants {
        if let Some(offers) = v.offers {
            wait_snapshot(
                &v.envoy
                    .url(&format!("/market-router/v1/route?model={MODEL}")),
                offers,
                None,
                LOAD_TIMEOUT,
                Duration::from_millis(50),
            )?;
        }
        for body in [&small, &large] {
            let r = request(
                "POST",
                &v.envoy.url(v.path),
                &[
                    ("content-type", "application/json"),
                    (CLUSTER_HEADER, "provider_a"),
                ],
                body,
                REQ_TIMEOUT,
            )?;
            if r.status != 200 || !r.text().contains("chat.completion") {
                return Err(format!(
                    "variant {}: pre-flight answered {}: {}",
                    v.key,
                    r.status,
                    r.text()
                ));
            }
            let provider = r.header("x-market-router-provider");
            let expect_header = v.provider_header;
            if expect_header != provider.is_some() {
                return Err(format!(
                    "variant {}: x-market-router-provider = {provider:?}, expected it {}",
                    v.key,
                    if expect_header { "set" } else { "absent" }
                ));
            }
        }
    }

    let scripts = [
        ("small", wrk.script("small", &small)?),
        ("large", wrk.script("large", &large)?),
    ];
    let ticks = clock_ticks_per_sec();
    let run_one = |v: &Variant,
                   script: &Path,
                   kind: &'static str,
                   secs: u64|
     -> Result<(WrkOut, f64), String> {
        let (threads, conns) = if kind == "sat" { (2, 16) } else { (1, 1) };
        let script = if v.gzip {
            Wrk::gzip_twin(script)
        } else {
            script.to_path_buf()
        };
        timed_run(&wrk, v, &script, (threads, conns), secs, ticks)
    };

    log("overhead: warm-up");
    for v in &variants {
        for (body, script) in &scripts {
            if *body == "small" || !v.knob {
                run_one(v, script, "sat", opts.warmup_secs)?;
            }
        }
    }

    let mut runs: Vec<Run> = Vec::new();
    let mut decision_by_body: BTreeMap<String, Quantiles> = BTreeMap::new();
    let mut invalid: Vec<String> = Vec::new();
    for round in 0..opts.rounds {
        for (body, script) in &scripts {
            for kind in ["sat", "lat"] {
                let secs = if kind == "sat" {
                    opts.sat_secs
                } else {
                    opts.lat_secs
                };
                for v in &variants {
                    // Knob variants: small body, throughput and CPU (some also latency).
                    if v.knob && (*body == "large" || (kind == "lat" && !v.knob_latency)) {
                        continue;
                    }
                    let (out, cpu) = run_one(v, script, kind, secs)?;
                    if out.non2xx > 0 || out.errors > 0 || out.requests == 0 {
                        invalid.push(format!(
                            "round {round} {body} {kind} {}: {} requests, {} non-2xx, {} socket errors",
                            v.key, out.requests, out.non2xx, out.errors
                        ));
                    }
                    let run = Run {
                        round,
                        body,
                        kind,
                        variant: v.key,
                        out,
                        cpu_us_per_req: cpu,
                    };
                    log(&format!(
                        "overhead: round {} {body:5} {kind} {}: {:>8.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs  envoy cpu {:>5.1} µs/req",
                        round + 1,
                        v.key,
                        run.rps(),
                        run.out.p50_us,
                        run.out.p99_us,
                        run.cpu_us_per_req
                    ));
                    runs.push(run);
                    // The filter's decision time for this body alone: the samples of the
                    // last stats flush interval (1 s) of this run.
                    if v.market_router && kind == "sat" && round + 1 == opts.rounds {
                        thread::sleep(Duration::from_millis(500));
                        if let Some(h) = histogram(v.envoy.admin_port(), "decision_us", "interval")?
                        {
                            decision_by_body.insert(format!("{}/{body}", v.key), h);
                        }
                    }
                }
            }
        }
    }
    if !invalid.is_empty() {
        return Err(format!("runs with failed requests: {}", invalid.join("; ")));
    }

    // Where Envoy's CPU goes (stripped binary: by mapping only), sampled in one more
    // saturation run per main variant.
    let mut cpu_split: BTreeMap<String, CpuSplit> = BTreeMap::new();
    if let Some(perf) = &opts.perf {
        for v in variants.iter().filter(|v| !v.knob) {
            log(&format!("overhead: perf profile of variant {}", v.key));
            let split = perf_profile(perf, &wrk, v, &scripts[0].1, opts.sat_secs, ticks)
                .map_or_else(|error| CpuSplit::Failed { error }, CpuSplit::Profile);
            cpu_split.insert(v.key.into(), split);
        }
    }

    // Filter-side numbers after the runs (stats flush every second).
    thread::sleep(Duration::from_millis(1500));
    let mut decision: BTreeMap<String, Option<Quantiles>> = BTreeMap::new();
    let mut counters: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for v in variants.iter().filter(|v| v.market_router) {
        let h = histogram(v.envoy.admin_port(), "decision_us", "cumulative")?;
        decision.insert(v.key.into(), h);
        let c = stats_map(v.envoy.admin_port(), "market_router")?;
        if c.get("wasmcustom.market_router.all_failed")
            .or(c.get("wasmcustom.market_router.rejected.no_provider"))
            .copied()
            .unwrap_or(0)
            > 0
        {
            return Err(format!(
                "variant {}: requests failed inside the filter: {c:?}",
                v.key
            ));
        }
        counters.insert(v.key.into(), c);
    }
    let mut wasm_stats: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for v in variants.iter().filter(|v| v.key != "g") {
        wasm_stats.insert(v.key.into(), stats_map(v.envoy.admin_port(), "^wasm[.]")?);
    }

    // Medians and paired per-round comparisons.
    let get_runs = |body: &str, kind: &str, key: &str| -> Vec<&Run> {
        runs.iter()
            .filter(|r| r.body == body && r.kind == kind && r.variant == key)
            .collect()
    };
    let med = |body: &str, kind: &str, key: &str, f: &dyn Fn(&Run) -> f64| -> f64 {
        median(
            &get_runs(body, kind, key)
                .iter()
                .map(|r| f(r))
                .collect::<Vec<_>>(),
        )
    };
    let paired = |body: &str, kind: &str, x: &str, y: &str, f: &dyn Fn(&Run, &Run) -> f64| -> f64 {
        let xs = get_runs(body, kind, x);
        let ys = get_runs(body, kind, y);
        let vals: Vec<f64> = xs
            .iter()
            .filter_map(|rx| {
                ys.iter()
                    .find(|ry| ry.round == rx.round)
                    .map(|ry| f(rx, ry))
            })
            .collect();
        median(&vals)
    };
    let ratio = |a: &Run, b: &Run| a.rps() / b.rps();
    let d50 = |a: &Run, b: &Run| a.out.p50_us - b.out.p50_us;
    let d99 = |a: &Run, b: &Run| a.out.p99_us - b.out.p99_us;
    let dcpu = |a: &Run, b: &Run| a.cpu_us_per_req - b.cpu_us_per_req;

    let mut table = Vec::new();
    let mut comparisons: BTreeMap<String, BTreeMap<String, Comparison>> = BTreeMap::new();
    for (body, _) in &scripts {
        for v in &variants {
            if get_runs(body, "sat", v.key).is_empty() {
                continue;
            }
            table.push(TableRow {
                body,
                variant: v.key,
                about: v.about,
                rps: round_to(med(body, "sat", v.key, &|r| r.rps()), 0),
                cpu_us_per_req: round_to(med(body, "sat", v.key, &|r| r.cpu_us_per_req), 1),
                sat_p50_us: round_to(med(body, "sat", v.key, &|r| r.out.p50_us), 0),
                sat_p99_us: round_to(med(body, "sat", v.key, &|r| r.out.p99_us), 0),
                p50_us: round_to(med(body, "lat", v.key, &|r| r.out.p50_us), 0),
                p99_us: round_to(med(body, "lat", v.key, &|r| r.out.p99_us), 0),
            });
        }
        let mut cmp: BTreeMap<String, Comparison> = BTreeMap::new();
        let pairs = pairs(body, opts.knobs);
        for (x, y) in pairs {
            cmp.insert(
                format!("{x}/{y}"),
                Comparison {
                    rps_ratio: round_to(paired(body, "sat", x, y, &ratio), 3),
                    added_p50_us: round_to(paired(body, "lat", x, y, &d50), 1),
                    added_p99_us: round_to(paired(body, "lat", x, y, &d99), 1),
                    added_cpu_us_per_req: round_to(paired(body, "sat", x, y, &dcpu), 1),
                },
            );
        }
        comparisons.insert((*body).into(), cmp);
    }

    let c_b = paired("small", "sat", "c", "b", &ratio);
    let c_a_p50 = paired("small", "lat", "c", "a", &d50);
    let floor_b = paired("small", "sat", "j", "b", &ratio);
    let floor_a_p50 = paired("small", "lat", "j", "a", &d50);
    let n_b = paired("small", "sat", "n", "b", &ratio);
    let n_b_large = paired("large", "sat", "n", "b", &ratio);
    let goal = |goal: &'static str, value: f64, target: f64, pass: bool| Goal {
        goal,
        value,
        target,
        pass,
    };
    let goals = vec![
        goal("envoy-mode throughput ≥ 0.8× the empty wasm filter's (n/b, 200-byte body, 16 connections)",
             round_to(n_b, 3), 0.8, n_b >= 0.8),
        goal("envoy-mode throughput ≥ 0.8× the empty wasm filter's (n/b, 64 KiB body, 16 connections)",
             round_to(n_b_large, 3), 0.8, n_b_large >= 0.8),
        goal("route-mode throughput ≥ 0.95× the empty wasm filter's (c/b, 200-byte body, 16 connections)",
             round_to(c_b, 3), 0.95, c_b >= 0.95),
        goal("route mode adds ≤ 20 µs p50 over Envoy without a filter (c−a, 200-byte body, 1 connection)",
             round_to(c_a_p50, 1), 20.0, c_a_p50 <= 20.0),
    ];
    // What the least body-routing filter (knob j) measures against the same goals.
    let floor = (opts.knobs).then(|| Floor {
        rps_ratio_vs_b: round_to(floor_b, 3),
        added_p50_us_vs_a: round_to(floor_a_p50, 1),
    });

    let runs_json: Vec<RunRow> = runs
        .iter()
        .map(|r| RunRow {
            round: r.round + 1,
            body: r.body,
            kind: r.kind,
            variant: r.variant,
            requests: r.out.requests,
            secs: round_to(r.out.secs, 3),
            rps: round_to(r.rps(), 0),
            p50_us: r.out.p50_us,
            p90_us: r.out.p90_us,
            p99_us: r.out.p99_us,
            max_us: r.out.max_us,
            envoy_cpu_us_per_req: round_to(r.cpu_us_per_req, 1),
        })
        .collect();
    let variants_json: Vec<VariantInfo> = variants
        .iter()
        .map(|v| VariantInfo {
            key: v.key,
            about: v.about,
        })
        .collect();
    Ok(Overhead {
        upstream: upstream.describe(opts.nginx.as_deref()),
        load_generator: tool_version(&wrk_bin, "-v")
            .split(" [")
            .next()
            .unwrap_or("wrk")
            .to_string(),
        envoy_concurrency: 1,
        bodies: Bodies {
            small: SMALL_BODY,
            large: LARGE_BODY,
        },
        saturation: LoadShape {
            connections: 16,
            threads: 2,
            secs: opts.sat_secs,
        },
        latency: LoadShape {
            connections: 1,
            threads: 1,
            secs: opts.lat_secs,
        },
        rounds: opts.rounds,
        variants: variants_json,
        table,
        comparisons,
        goals,
        floor,
        decision_us: decision,
        decision_us_by_body: decision_by_body,
        cpu_split,
        filter_counters: counters,
        wasm_stats,
        runs: runs_json,
    })
}

/// Samples Envoy's CPU (`perf record -e cpu-clock`) during a saturation run and splits the
/// CPU time per request by mapping: the Envoy binary (C++ and V8's runtime), anonymous
/// executable memory (V8's JIT code: the wasm filter itself), the kernel and libraries.
fn perf_profile(
    perf: &Path,
    wrk: &Wrk,
    v: &Variant,
    script: &Path,
    secs: u64,
    ticks: f64,
) -> Result<PerfSplit, String> {
    let dir = TempDir::new("perf")?;
    let data = dir.join("perf.data");
    let pid = v.envoy.pid();
    let mut rec = Command::new(perf)
        .arg("record")
        .arg("-q")
        .args(["-e", "cpu-clock", "-F", "1999", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&data)
        .arg("--")
        .arg("sleep")
        .arg(secs.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run perf: {e}"))?;
    thread::sleep(Duration::from_millis(200));
    let c0 = cpu_ticks(pid);
    let out = wrk.run(script, &v.envoy.url(v.path), 2, 16, secs);
    let c1 = cpu_ticks(pid);
    let deadline = Instant::now() + Duration::from_secs(secs + 20);
    loop {
        match rec.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = rec.kill();
                let _ = rec.wait();
                return Err("perf record did not finish".into());
            }
        }
    }
    let out = out?;
    let cpu_us = match (c0, c1) {
        (Some(a), Some(b)) if out.requests > 0 => {
            (b - a) as f64 / ticks * 1e6 / out.requests as f64
        }
        _ => f64::NAN,
    };
    let report = Command::new(perf)
        .arg("report")
        .arg("-i")
        .arg(&data)
        .args(["--stdio", "--sort", "dso", "-n", "-q"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run perf report: {e}"))?;
    let text = String::from_utf8_lossy(&report.stdout);
    let mut by_dso: Vec<(String, f64, u64)> = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(p), Some(n)) = (it.next(), it.next()) else {
            continue;
        };
        let (Some(share), Ok(n)) = (
            p.strip_suffix('%').and_then(|x| x.parse::<f64>().ok()),
            n.parse::<u64>(),
        ) else {
            continue;
        };
        let dso = it.collect::<Vec<_>>().join(" ");
        by_dso.push((dso, share, n));
    }
    if by_dso.is_empty() {
        return Err(format!("perf report gave no samples: {}", text.trim()));
    }
    let group = |dso: &str| -> &'static str {
        if dso == "envoy" {
            "envoy binary (C++, V8 runtime)"
        } else if dso.contains("kernel") {
            "kernel"
        } else if dso.contains("JIT") || dso.contains("anon") || dso.contains("unknown") {
            "JIT code (wasm filter, V8 stubs)"
        } else {
            "libraries"
        }
    };
    let mut groups: BTreeMap<&str, f64> = BTreeMap::new();
    for (dso, share, _) in &by_dso {
        *groups.entry(group(dso)).or_insert(0.0) += share;
    }
    let groups_json: BTreeMap<String, CpuGroup> = groups
        .iter()
        .map(|(k, share)| {
            (
                (*k).to_string(),
                CpuGroup {
                    share_pct: round_to(*share, 1),
                    cpu_us_per_req: round_to(share / 100.0 * cpu_us, 1),
                },
            )
        })
        .collect();
    Ok(PerfSplit {
        requests: out.requests,
        cpu_us_per_req: round_to(cpu_us, 1),
        samples: by_dso.iter().map(|d| d.2).sum::<u64>(),
        groups: groups_json,
        by_dso: by_dso
            .iter()
            .take(8)
            .map(|(d, s, n)| Dso {
                dso: d.clone(),
                share_pct: *s,
                samples: *n,
            })
            .collect(),
    })
}

/// The overhead part of `latest.md` (with the perf split).
pub(crate) fn markdown_part(overhead: Option<&Overhead>) -> String {
    let mut md = String::new();
    let Some(o) = overhead else {
        return md;
    };
    let _ = writeln!(md, "## 1. Overhead\n");
    let _ = writeln!(
        md,
        "Upstream: {}. Load: {}, req/s at {} connections ({} threads, {} s runs), latency at 1 connection ({} s runs). Envoy `--concurrency 1`, wasm log level warning. {} rounds of alternating runs ({}); the table shows medians, the comparisons the median over rounds of each round's paired ratio or difference. Envoy CPU µs/req: Envoy's user+system CPU time during a saturation run over its requests. Knob variants run on the 200-byte body, at saturation only except (e) and (j), which also run at one connection.\n",
        o.upstream,
        o.load_generator,
        o.saturation.connections,
        o.saturation.threads,
        o.saturation.secs,
        o.latency.secs,
        o.rounds,
        o.variants.iter().map(|v| v.key).collect::<Vec<_>>().join(", "),
    );
    let _ = writeln!(md, "Variants:\n");
    variant_list(&mut md, &o.variants);
    let _ = writeln!(
        md,
        "\n| body | variant | req/s (16 conn) | Envoy CPU µs/req | p50 µs (1 conn) | p99 µs (1 conn) |\n|---|---|---:|---:|---:|---:|"
    );
    for r in &o.table {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            body_label(r.body),
            r.variant,
            fmt_num(r.rps, 0),
            fmt_num(r.cpu_us_per_req, 1),
            fmt_num(r.p50_us, 0),
            fmt_num(r.p99_us, 0),
        );
    }
    let _ = writeln!(
        md,
        "\n| body | pair | req/s ratio | added p50 µs (1 conn) | added p99 µs (1 conn) | added Envoy CPU µs/req |\n|---|---|---:|---:|---:|---:|"
    );
    for body in ["small", "large"] {
        for (pair, c) in o.comparisons.get(body).into_iter().flatten() {
            let (x, y) = pair.split_once('/').unwrap_or((pair, ""));
            let _ = writeln!(
                md,
                "| {} | {x} vs {y} | {} | {} | {} | {} |",
                body_label(body),
                fmt_num(c.rps_ratio, 3),
                fmt_signed(c.added_p50_us, 0),
                fmt_signed(c.added_p99_us, 0),
                fmt_signed(c.added_cpu_us_per_req, 1),
            );
        }
    }
    let _ = writeln!(md, "\nGoals:\n");
    for g in &o.goals {
        let _ = writeln!(
            md,
            "- {} — measured {} (target {}): **{}**",
            g.goal,
            json_num(g.value),
            json_num(g.target),
            pass(g.pass)
        );
    }
    if let Some(fl) = &o.floor {
        let _ = writeln!(
            md,
            "\nThe same two measures for knob (j), the least a body-routing filter with response-phase failover does (hold the request until its body is complete, read the body, set the cluster header, read the response status) and no logic at all: {}× the empty filter's throughput, {} µs p50 over Envoy alone. Knob (k) against (h) is what reading a single value from the host costs.",
            fmt_num(fl.rps_ratio_vs_b, 3),
            fmt_signed(fl.added_p50_us_vs_a, 0),
        );
    }
    let _ = writeln!(
        md,
        "\nThe filter's own decision time (`market_router.decision_us`: from the complete body to the route set or the attempt dispatched; Envoy histogram quantiles over the last 1 s stats interval of the last round's saturation run for each body, and over every request of the benchmark):\n"
    );
    let _ = writeln!(
        md,
        "| variant | body | p50 µs | p90 µs | p99 µs |\n|---|---|---:|---:|---:|"
    );
    for (k, h) in &o.decision_us_by_body {
        let (v, body) = k.split_once('/').unwrap_or((k, ""));
        let _ = writeln!(
            md,
            "| {v} | {} | {} |",
            body_label(body),
            quantile_cells(Some(h))
        );
    }
    for (k, h) in &o.decision_us {
        let _ = writeln!(
            md,
            "| {k} | all, whole run | {} |",
            quantile_cells(h.as_ref())
        );
    }
    if o.cpu_split.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "\nWhere Envoy's CPU goes (`perf record -e cpu-clock` on Envoy during one more 200-byte saturation run per variant; the Envoy binary is stripped, so samples are grouped by mapping; Envoy CPU µs per request, share in parentheses):\n"
    );
    let names = [
        "JIT code (wasm filter, V8 stubs)",
        "envoy binary (C++, V8 runtime)",
        "kernel",
        "libraries",
    ];
    let _ = writeln!(
        md,
        "| variant | total µs/req | wasm JIT code | Envoy binary (C++, V8 runtime) | kernel | libraries |\n|---|---:|---:|---:|---:|---:|"
    );
    for (k, v) in &o.cpu_split {
        let split = match v {
            CpuSplit::Failed { error } => {
                let _ = writeln!(md, "| {k} | perf failed: {error} | | | | |");
                continue;
            }
            CpuSplit::Profile(split) => split,
        };
        let cells: Vec<String> = names
            .iter()
            .map(|n| match split.groups.get(*n) {
                None => "0".into(),
                Some(g) => format!(
                    "{} ({} %)",
                    fmt_num(g.cpu_us_per_req, 1),
                    fmt_num(g.share_pct, 0)
                ),
            })
            .collect();
        let _ = writeln!(
            md,
            "| {k} | {} | {} |",
            fmt_num(split.cpu_us_per_req, 1),
            cells.join(" | ")
        );
    }
    md
}

/// How `latest.md` names a request body.
fn body_label(body: &str) -> &'static str {
    if body == "small" {
        "200 B"
    } else {
        "64 KiB"
    }
}

/// The p50, p90 and p99 cells of a decision-time row (n/a where unknown).
fn quantile_cells(h: Option<&Quantiles>) -> String {
    let q = |name: &str| h.and_then(|h| h.get(name)).copied().unwrap_or(f64::NAN);
    format!(
        "{} | {} | {}",
        fmt_num(q("p50"), 1),
        fmt_num(q("p90"), 1),
        fmt_num(q("p99"), 1)
    )
}

#[cfg(test)]
mod tests {
    use super::{pairs, plan, Setup};
    use std::collections::BTreeSet;
    use std::path::Path;

    #[test]
    fn every_overhead_variant_has_a_key_of_its_own() {
        for knobs in [false, true] {
            let plans = plan(knobs, Path::new("empty.wasm"));
            let keys: Vec<&str> = plans.iter().map(|p| p.key).collect();
            let unique: BTreeSet<&str> = keys.iter().copied().collect();
            assert_eq!(unique.len(), keys.len(), "duplicate keys in {keys:?}");
            // Each comparison names planned variants; a shared Envoy is planned before.
            for body in ["small", "large"] {
                for (x, y) in pairs(body, knobs) {
                    assert!(
                        unique.contains(x) && unique.contains(y),
                        "{x}/{y} with {keys:?}"
                    );
                }
            }
            for (i, p) in plans.iter().enumerate() {
                if let Setup::PassthroughOf(of) = p.setup {
                    assert!(
                        keys[..i].contains(&of),
                        "{} shares {of}, not planned before",
                        p.key
                    );
                }
            }
        }
        // Envoy mode is n; the knobs are the rest, in their own letters.
        let knobs = plan(true, Path::new("empty.wasm"));
        let keys: Vec<&str> = knobs.iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            ["a", "b", "c", "d", "n", "e", "f", "g", "m", "o", "h", "i", "j", "k", "l"]
        );
        assert!(knobs.iter().filter(|p| p.knob).all(|p| p.key != "n"));
    }
}
