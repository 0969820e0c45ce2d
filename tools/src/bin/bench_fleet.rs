//! `make bench`, the fleet part (scripts/bench.sh runs it): writes bench/results/fleet.json and
//! fleet.md.
//!
//! 1. **What market reporting costs on the request path.** Two Envoys with the same binary and
//!    the same configuration but `market.report` (true / false), both fed by one market service,
//!    one mock upstream; `wrk` saturates one of them at a time, in paired rounds whose order
//!    alternates (on, off, then off, on, ...). Reported: per-round throughput and p50 latency
//!    ratios on/off, and their medians (≈ 1 expected: the request path only adds to a tally in
//!    VM memory; the tick merges it, the refresh slot posts it).
//! 2. **From a provider's outage to fleet-wide avoidance.** Envoy A and Envoy B, each with its
//!    own `cheap` upstream (the cheapest offer), A sending a steady trickle of requests. At t0
//!    A's `cheap` starts answering 503 (it had answered well until then); the time until B
//!    (which sends nothing) ranks `cheap` out, in milliseconds and in market periods, over
//!    several runs: with one market service, and with two replicas on Redis (A on replica 1, B
//!    on replica 2). B's `cheap` counts any request it gets (none expected).
//!
//! ```text
//! bench_fleet [--quick] [--rounds N] [--secs S] [--runs K] [--out DIR]
//! ```

use market_router_testbed as common;

use clap::Parser;
use common::fleet::{self, MODEL};
use common::{get, post_json, Envoy, MarketService, MockOpts, MockProvider, RedisServer, TempDir};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The filters' market period in the outage runs.
const REFRESH_MS: u64 = 500;
const T: Duration = Duration::from_secs(10);

fn log(msg: &str) {
    eprintln!("bench_fleet: {msg}");
}

use market_router_tools::cli::{self, RunArgs, RunHelp};
use market_router_tools::wrk::{git_commit, median, which};

fn r3(x: f64) -> Value {
    json!((x * 1000.0).round() / 1000.0)
}

struct Opts {
    rounds: usize,
    secs: u64,
    runs: usize,
    out: PathBuf,
}

/// `bench_fleet`'s command line; defaults that depend on `--quick` are resolved in
/// [`parse_opts`].
#[derive(Debug, Parser)]
#[command(
    name = "bench_fleet",
    about = "The fleet market: what market reporting costs on the request path, and the time from a provider's outage to fleet-wide avoidance (writes fleet.json, fleet.md)"
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    /// Seconds of each wrk run [default: 5, 2 with --quick]
    #[arg(long, value_name = "S")]
    secs: Option<u64>,
    /// Outage runs per setup [default: 5, 3 with --quick]
    #[arg(long, value_name = "K")]
    runs: Option<usize>,
}

fn parse_opts() -> Result<Opts, String> {
    let cli: Cli = cli::parse(&RunHelp {
        quick: "Fewer, shorter rounds and runs",
        rounds: "Paired report-on/off rounds [default: 6, 2 with --quick]",
        out: "Where fleet.json and fleet.md go [default: bench/results]",
    });
    let run = &cli.run;
    Ok(Opts {
        rounds: run.rounds(6, 2),
        secs: cli.secs.unwrap_or(run.pick(5, 2)),
        runs: cli.runs.unwrap_or(run.pick(5, 3)),
        out: run.out(),
    })
}

/// The feeds' view: `cheap` first for everyone.
fn service_config(dir: &TempDir) -> Result<PathBuf, String> {
    fleet::service_config(dir, 600.0)
}

fn envoy(
    service: &MarketService,
    cheap_port: u16,
    other_port: u16,
    refresh_ms: u64,
    report: bool,
    workers: u32,
) -> Result<Envoy, String> {
    let plugin = fleet::plugin(refresh_ms, Some(report));
    fleet::envoy(service.port(), cheap_port, other_port, &plugin, workers)
}

fn first_choice(e: &Envoy) -> Result<String, String> {
    let r = get(&e.url(&format!("/market-router/v1/route?model={MODEL}")), T)?;
    Ok(r.json()?["candidates"][0]["provider"]
        .as_str()
        .unwrap_or("")
        .to_string())
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn chat_body() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
}

// ---------------------------------------------------------------------------------------------
// 1. Reporting on vs off
// ---------------------------------------------------------------------------------------------

struct WrkRun {
    rps: f64,
    p50_us: f64,
    bad: u64,
}

fn wrk(bin: &Path, script: &Path, url: &str, secs: u64) -> Result<WrkRun, String> {
    let v = market_router_tools::wrk::run(bin, 1, 16, secs, script, url, "FLEETJSON ")?;
    let n = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(WrkRun {
        rps: n("requests") / (n("duration_us") / 1e6),
        p50_us: n("p50"),
        bad: v["status"].as_u64().unwrap_or(0) + v["errors"].as_u64().unwrap_or(0),
    })
}

fn reporting_cost(opts: &Opts, dir: &TempDir) -> Result<Value, String> {
    let wrk_bin = which("wrk").ok_or("wrk not found (scripts/bench.sh installs it)")?;
    let service = MarketService::start(&service_config(dir)?)?;
    let upstream = MockProvider::start(
        "cheap",
        &MockOpts {
            quiet: true,
            ..MockOpts::default()
        },
    )?;
    // One worker each: the filter's share of a request is what is compared.
    let on = envoy(&service, upstream.port(), upstream.port(), 1000, true, 1)?;
    let off = envoy(&service, upstream.port(), upstream.port(), 1000, false, 1)?;
    for e in [&on, &off] {
        wait_for("the snapshot", T * 3, || {
            first_choice(e).is_ok_and(|p| p == "cheap")
        })?;
    }
    let body_path = dir.join("body.json");
    fs::write(&body_path, chat_body().to_string()).map_err(|e| e.to_string())?;
    let script = dir.join("chat.lua");
    fs::write(
        &script,
        format!(
            r#"wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local f = assert(io.open({path}, "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FLEETJSON {{\"requests\":%d,\"duration_us\":%d,\"status\":%d,\"errors\":%d,\"p50\":%d}}\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50)))
end
"#,
            path = Value::from(body_path.to_string_lossy().into_owned())
        ),
    )
    .map_err(|e| e.to_string())?;
    // Warm both up.
    for e in [&on, &off] {
        wrk(&wrk_bin, &script, &e.url("/v1/chat/completions"), 1)?;
    }
    let sent_before = on
        .stat("wasmcustom.market_router.report.sent")?
        .unwrap_or(0);
    let mut rounds = Vec::new();
    for r in 0..opts.rounds {
        let order: [(&str, &Envoy); 2] = if r % 2 == 0 {
            [("on", &on), ("off", &off)]
        } else {
            [("off", &off), ("on", &on)]
        };
        let mut got = serde_json::Map::new();
        for (name, e) in order {
            let w = wrk(&wrk_bin, &script, &e.url("/v1/chat/completions"), opts.secs)?;
            if w.bad > 0 {
                return Err(format!("reporting {name}: {} failed requests", w.bad));
            }
            got.insert(
                name.into(),
                json!({"rps": w.rps.round() as u64, "p50_us": w.p50_us as u64}),
            );
        }
        let f = |k: &str, m: &str| got[k][m].as_f64().unwrap_or(f64::NAN);
        let row = json!({
            "round": r + 1, "order": order.map(|o| o.0), "on": got["on"], "off": got["off"],
            "rps_ratio": r3(f("on", "rps") / f("off", "rps")),
            "p50_ratio": r3(f("on", "p50_us") / f("off", "p50_us")),
        });
        log(&format!("reporting round {}: {row}", r + 1));
        rounds.push(row);
    }
    let sent = on
        .stat("wasmcustom.market_router.report.sent")?
        .unwrap_or(0)
        - sent_before;
    let sent_off = off
        .stat("wasmcustom.market_router.report.sent")?
        .unwrap_or(0);
    let col = |k: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[k].as_f64()).collect() };
    Ok(json!({
        "rounds": rounds,
        "median_rps_ratio": r3(median(&col("rps_ratio"))),
        "median_p50_ratio": r3(median(&col("p50_ratio"))),
        "reports_sent_on": sent,
        "reports_sent_off": sent_off,
        "secs_per_run": opts.secs,
        "setup": "Envoy --concurrency 1 each, wrk -t1 -c16, POST /v1/chat/completions (small body), one mock upstream, market refresh_ms 1000",
    }))
}

// ---------------------------------------------------------------------------------------------
// 2. Outage → fleet-wide avoidance
// ---------------------------------------------------------------------------------------------

fn outage_run(redis: Option<&mut RedisServer>, dir: &TempDir) -> Result<Value, String> {
    let config = service_config(dir)?;
    let (s1, s2) = match redis {
        None => (MarketService::start(&config)?, None),
        Some(r) => {
            r.restart()?;
            let args = |name: &str| {
                vec![
                    "--redis-url".to_string(),
                    r.url(),
                    "--replica-id".into(),
                    name.to_string(),
                ]
            };
            (
                MarketService::start_with(&config, 0, &args("r1"))?,
                Some(MarketService::start_with(&config, 0, &args("r2"))?),
            )
        }
    };
    let fleet::Pair {
        cheap_a,
        cheap_b,
        other: _other,
        a,
        b,
    } = fleet::Pair::start(
        s1.port(),
        s2.as_ref().unwrap_or(&s1).port(),
        &MockOpts::default(),
        &fleet::plugin(REFRESH_MS, Some(true)),
        1,
    )?;
    for e in [&a, &b] {
        wait_for("cheap ranked first", T * 3, || {
            first_choice(e).is_ok_and(|p| p == "cheap")
        })?;
    }
    // A's steady traffic: one request every 20 ms; every answer must be a 200.
    let stop = AtomicBool::new(false);
    let failed = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let url = a.url("/v1/chat/completions");
    let result = thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match post_json(&url, &[], &chat_body(), T) {
                    Ok(r) if r.status == 200 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(20));
            }
        });
        let run = || -> Result<Value, String> {
            // Healthy for two periods (the fleet has seen `cheap` answer well), then the outage.
            thread::sleep(Duration::from_millis(2 * REFRESH_MS + 200));
            let b_hits = cheap_b.hits()?;
            cheap_a.set_behavior(&json!({"status": 503}))?;
            let t0 = Instant::now();
            wait_for("B avoiding cheap", Duration::from_secs(60), || {
                first_choice(&b).is_ok_and(|p| p == "other")
            })?;
            let took = t0.elapsed().as_secs_f64() * 1000.0;
            Ok(json!({
                "ms": took.round() as u64,
                "periods": r3(took / REFRESH_MS as f64),
                "b_requests_to_cheap": cheap_b.hits()? - b_hits,
            }))
        };
        let r = run();
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    let mut result = result;
    result["a_requests"] = json!(sent.load(Ordering::Relaxed));
    result["a_failed"] = json!(failed.load(Ordering::Relaxed));
    Ok(result)
}

fn outage(opts: &Opts, dir: &TempDir) -> Result<Value, String> {
    let mut out = serde_json::Map::new();
    let mut redis = RedisServer::start()?;
    for mode in ["one service", "two replicas on Redis"] {
        let mut runs = Vec::new();
        for i in 0..opts.runs {
            let d = TempDir::new(&format!("fleet-outage-{i}"))?;
            let r = if mode == "one service" {
                outage_run(None, &d)?
            } else {
                outage_run(Some(&mut redis), &d)?
            };
            log(&format!("outage, {mode}, run {}: {r}", i + 1));
            runs.push(r);
        }
        let col = |k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[k].as_f64()).collect() };
        let ms = col("ms");
        out.insert(
            mode.into(),
            json!({
                "runs": runs,
                "median_ms": median(&ms).round() as u64,
                "median_periods": r3(median(&col("periods"))),
                "min_ms": ms.iter().copied().fold(f64::INFINITY, f64::min).round() as u64,
                "max_ms": ms.iter().copied().fold(0.0, f64::max).round() as u64,
                "b_requests_to_cheap": runs.iter().filter_map(|r| r["b_requests_to_cheap"].as_u64()).sum::<u64>(),
                "a_failed": runs.iter().filter_map(|r| r["a_failed"].as_u64()).sum::<u64>(),
            }),
        );
    }
    let _ = dir;
    Ok(json!({"refresh_ms": REFRESH_MS, "modes": out}))
}

fn markdown(meta: &Value, cost: &Value, outage: &Value) -> String {
    let mut md = String::new();
    md.push_str("# Fleet market: reporting cost and outage → avoidance\n\n");
    md.push_str(&format!(
        "`make bench` (examples/bench_fleet.rs), commit {}, {} rounds × {} s, {} outage runs per mode. Machine: 2 shared cores; medians and ratios only.\n\n",
        meta["commit"].as_str().unwrap_or("?"),
        cost["rounds"].as_array().map_or(0, Vec::len),
        cost["secs_per_run"],
        meta["runs"]
    ));
    md.push_str("## What reporting costs on the request path\n\n");
    md.push_str(&format!(
        "{}; the same Envoy binary and configuration with `market.report` true (on) and false (off), alternating order per round.\n\n| round | order | on req/s | off req/s | req/s on/off | p50 on/off |\n|---:|---|---:|---:|---:|---:|\n",
        cost["setup"].as_str().unwrap_or("")
    ));
    for r in cost["rounds"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r["round"],
            r["order"].as_array().map_or(String::new(), |o| o
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")),
            r["on"]["rps"],
            r["off"]["rps"],
            r["rps_ratio"],
            r["p50_ratio"]
        ));
    }
    md.push_str(&format!(
        "\n**Median throughput ratio on/off: {}; median p50 ratio: {}.** Reports posted during the rounds: {} with reporting on, {} with it off.\n\n",
        cost["median_rps_ratio"], cost["median_p50_ratio"], cost["reports_sent_on"], cost["reports_sent_off"]
    ));
    md.push_str(&format!(
        "## From a provider's outage to fleet-wide avoidance\n\nEnvoy A sends one request every 20 ms; its `cheap` (the cheapest offer) answers well, then 503 from t0 on. Envoy B sends nothing; measured: t0 → B ranks `cheap` out. Market period (`refresh_ms`) {} ms.\n\n| setup | median | periods (median) | min | max | B's requests to `cheap` | A's failed requests |\n|---|---:|---:|---:|---:|---:|---:|\n",
        outage["refresh_ms"]
    ));
    for (mode, m) in outage["modes"].as_object().into_iter().flatten() {
        md.push_str(&format!(
            "| {mode} | {} ms | {} | {} ms | {} ms | {} | {} |\n",
            m["median_ms"],
            m["median_periods"],
            m["min_ms"],
            m["max_ms"],
            m["b_requests_to_cheap"],
            m["a_failed"]
        ));
    }
    md.push_str("\nTwo replicas: A reports to replica 1, B reads replica 2; the report travels through the Redis stream to the leader, whose snapshot the follower serves.\n");
    md
}

fn run() -> Result<(), String> {
    let opts = parse_opts()?;
    let dir = TempDir::new("bench-fleet")?;
    log("reporting on vs off");
    let cost = reporting_cost(&opts, &dir)?;
    log("outage → fleet-wide avoidance");
    let out = outage(&opts, &dir)?;
    let meta = json!({"commit": git_commit(), "unix_time": common::unix_now(), "runs": opts.runs});
    let doc = json!({"meta": meta, "reporting_cost": cost, "outage_to_avoidance": out});
    fs::create_dir_all(&opts.out).map_err(|e| e.to_string())?;
    let pretty = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    fs::write(opts.out.join("fleet.json"), pretty + "\n").map_err(|e| e.to_string())?;
    let md = markdown(&meta, &cost, &out);
    fs::write(opts.out.join("fleet.md"), &md).map_err(|e| e.to_string())?;
    println!("{md}");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_fleet: {e}");
        std::process::exit(1);
    }
}
