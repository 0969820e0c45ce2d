//! Where envoy mode's healthy-path cost is: each variant runs **at the same time** as the empty
//! filter (b), each Envoy (`--concurrency 1`) pinned to the first core, nginx and the two wrk
//! on the second, so whatever else the machine does hits both alike. Per round and variant:
//! Envoy CPU µs per request of the variant and of b, their difference and their ratio
//! (requests per CPU second, b over the variant: the capacity ratio), and the upstream
//! connections opened per request. Medians over the rounds.
//!
//! ```text
//! cargo run --release -p market-router-tools --bin bench_envoy_mode -- [--rounds N] [--secs S]
//!     [--body BYTES] [--variants a,c,n,q,...] [--out FILE.md] [--nginx PATH] [--wrk PATH] [--empty-wasm PATH]
//! ```
//!
//! Variants (b is always there, as the reference):
//! - a: Envoy, no filter
//! - b: the empty proxy-wasm filter (`bench/empty-filter`), cluster-header route
//! - c: market-router, route mode
//! - n: market-router, envoy mode (the generated filter chain, route and clusters)
//! - nl: (n) lean: response_headers and decision_record off, no malformed check
//! - q: envoy mode's floor: the generated envoy-mode bootstrap with the module swapped for the
//!   empty filter, which holds the request until its body is complete, reads it and sets a
//!   fixed order header (downstream) and does nothing as the clusters' upstream filter
//! - p: (q) without the clusters' upstream wasm filter
//! - qh: (q) with the empty filter holding the response until its body is complete upstream
//!   too (what the upstream role does to check a non-streaming answer)
//!
//! Needs wrk, nginx, taskset (util-linux) and two cores. All traffic on 127.0.0.1; every
//! process it starts is killed on drop.

use market_router_testbed as common;

use clap::Parser;
use common::{crate_root, envoy_bin, get, wasm_path, Envoy, EnvoyConfig, Filter, ProviderCluster};
use market_router_tools::bench::{chat_body, overhead_config, start_nginx, Wrk};
use market_router_tools::wrk::{self, clock_ticks_per_sec, cpu_ticks};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

const ABOUT: &[(&str, &str)] = &[
    ("a", "Envoy, no filter"),
    ("b", "the empty proxy-wasm filter, cluster-header route"),
    ("c", "market-router, route mode"),
    ("n", "market-router, envoy mode"),
    (
        "nl",
        "(n) lean: response_headers and decision_record off, no malformed check",
    ),
    (
        "q",
        "envoy mode's floor: its route, retry policy, header_to_metadata and Lua refresh, the empty filter setting a fixed order downstream and doing nothing upstream",
    ),
    (
        "p",
        "(q) without the clusters' upstream wasm filter",
    ),
    (
        "qh",
        "(q) with the empty filter holding the response until its body is complete upstream",
    ),
];

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_envoy_mode: error: {e}");
        std::process::exit(1);
    }
}

fn log(msg: &str) {
    eprintln!("bench_envoy_mode: {msg}");
}

/// Pins `pid` (every thread with `all`) to `cpus`.
fn pin(pid: u32, cpus: &str, all: bool) -> Result<(), String> {
    let mut cmd = Command::new("taskset");
    if all {
        cmd.arg("-a");
    }
    let out = cmd
        .args(["-p", "-c", cpus, &pid.to_string()])
        .output()
        .map_err(|e| format!("cannot run taskset: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "taskset {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn base(up: u16) -> EnvoyConfig {
    EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", up))
        .provider(ProviderCluster::new("provider_b", up))
        .log_level("warning")
        .component_log_level("")
}

/// The bootstrap of variant `key`; `<key>=<module path>` runs it with another build of the
/// module (to compare two builds in one run).
fn bootstrap(key: &str, up: u16, empty: &Path) -> Result<String, String> {
    if let Some((key, module)) = key.split_once('=') {
        let yaml = bootstrap(key, up, empty)?;
        return Ok(yaml.replace(&wasm_path().to_string_lossy().into_owned(), module));
    }
    let empty_filter = |knobs: &str| Filter::Wasm {
        path: empty.to_path_buf(),
        config_json: knobs.into(),
        root_id: "empty".into(),
    };
    Ok(match key {
        "a" => base(up).filter(Filter::None).to_yaml(),
        "b" => base(up).filter(empty_filter("{}")).to_yaml(),
        "c" => base(up)
            .market_router(&overhead_config("route", true, false))
            .to_yaml(),
        "n" => base(up)
            .market_router_envoy(&overhead_config("envoy", true, false))
            .to_yaml(),
        "nl" => base(up)
            .market_router_envoy(&overhead_config("envoy", false, false))
            .to_yaml(),
        "p" => {
            // (q) without the clusters' upstream wasm filter.
            let q = bootstrap("q", up, empty)?;
            let mut y = String::with_capacity(q.len());
            for line in q.lines() {
                match line.strip_prefix("        http_filters: ") {
                    Some(list) => {
                        let mut v: Value = serde_json::from_str(list)
                            .map_err(|e| format!("cluster http_filters: {e}"))?;
                        if let Some(a) = v.as_array_mut() {
                            a.retain(|f| f["name"] != "envoy.filters.http.wasm");
                        }
                        let _ = writeln!(y, "        http_filters: {v}");
                    }
                    None => {
                        y.push_str(line);
                        y.push('\n');
                    }
                }
            }
            y
        }
        "q" | "qh" => {
            // The envoy-mode bootstrap, the module and its configuration swapped for the
            // empty filter's (both roles: the empty filter tells them apart by root id).
            let config = overhead_config("envoy", true, false);
            let yaml = base(up).market_router_envoy(&config).to_yaml();
            let order = market_router_core::native::order_header(&["alpha", "beta"]);
            let down = format!("order={order}");
            let upstream = if key == "qh" { "hold_response" } else { "{}" };
            let quoted = Value::from(config.as_str()).to_string();
            let first = yaml
                .find(&quoted)
                .ok_or("the envoy-mode bootstrap does not embed the plugin configuration")?;
            let mut y = String::with_capacity(yaml.len());
            y.push_str(&yaml[..first]);
            y.push_str(&Value::from(down).to_string());
            y.push_str(
                &yaml[first + quoted.len()..].replace(&quoted, &Value::from(upstream).to_string()),
            );
            let module = wasm_path().to_string_lossy().into_owned();
            y.replace(&module, &empty.to_string_lossy())
        }
        other => return Err(format!("unknown variant `{other}`")),
    })
}

/// Sum of the provider clusters' `upstream_cx_total` and `upstream_rq_total`.
fn upstream_counts(envoy: &Envoy) -> (u64, u64) {
    let text = get(
        &envoy.admin_url("/stats?filter=cluster\\.provider_.*\\.upstream_(cx|rq)_total$"),
        Duration::from_secs(5),
    )
    .map(|r| r.text())
    .unwrap_or_default();
    let mut cx = 0;
    let mut rq = 0;
    for line in text.lines() {
        let Some((name, v)) = line.split_once(": ") else {
            continue;
        };
        let v: u64 = v.trim().parse().unwrap_or(0);
        if name.ends_with("upstream_cx_total") {
            cx += v;
        } else {
            rq += v;
        }
    }
    (cx, rq)
}

struct Run {
    requests: u64,
    cpu_us: f64,
    cx_per_rq: f64,
    bad: u64,
}

/// One wrk against `envoy` for `secs`, with its CPU and upstream connections per request.
fn measure(wrk: &Wrk, envoy: &Envoy, script: &Path, secs: u64, ticks: f64) -> Result<Run, String> {
    let (cx0, rq0) = upstream_counts(envoy);
    let c0 = cpu_ticks(envoy.pid());
    let out = wrk.run(script, &envoy.url("/v1/chat/completions"), 1, 8, secs)?;
    let c1 = cpu_ticks(envoy.pid());
    let (cx1, rq1) = upstream_counts(envoy);
    let requests = out.requests;
    let cpu_us = match (c0, c1) {
        (Some(a), Some(b)) if requests > 0 => (b - a) as f64 / ticks * 1e6 / requests as f64,
        _ => f64::NAN,
    };
    Ok(Run {
        requests,
        cpu_us,
        cx_per_rq: (cx1 - cx0) as f64 / (rq1 - rq0).max(1) as f64,
        bad: out.non2xx + out.errors,
    })
}

/// `bench_envoy_mode`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "bench_envoy_mode",
    about = "Envoy mode's healthy-path cost in paired simultaneous runs against the empty filter: the floor of Envoy's mechanism, route mode, envoy mode (prints a Markdown table)"
)]
struct Cli {
    /// Rounds of paired runs
    #[arg(long, value_name = "N", default_value_t = 5)]
    rounds: usize,
    /// Seconds of each run
    #[arg(long, value_name = "S", default_value_t = 3)]
    secs: u64,
    /// Request body size, bytes
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    body: usize,
    /// Variants besides b: a, c, n, nl, p, q, qh; `<key>=<module path>` runs one with another build of the module
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "q,c,n"
    )]
    variants: Vec<String>,
    /// Also write the table here (and its JSON beside it)
    #[arg(long, value_name = "FILE.md")]
    out: Option<PathBuf>,
    /// A CPU profile (perf record) of each variant's Envoy under load into this directory
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// nginx binary (default: from PATH)
    #[arg(long, value_name = "PATH")]
    nginx: Option<PathBuf>,
    /// wrk binary (default: from PATH)
    #[arg(long, value_name = "PATH")]
    wrk: Option<PathBuf>,
    /// The empty filter's module (default: bench/empty-filter's release build)
    #[arg(long = "empty-wasm", value_name = "PATH")]
    empty_wasm: Option<PathBuf>,
}

fn run() -> Result<(), String> {
    let cli = Cli::parse();
    let (rounds, secs, body) = (cli.rounds, cli.secs, cli.body);
    let keys: Vec<String> = cli
        .variants
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s != "b")
        .collect();
    let nginx = cli
        .nginx
        .clone()
        .or_else(|| wrk::which("nginx"))
        .ok_or("nginx not found (apt-get install nginx-light, or --nginx PATH)")?;
    let wrk_bin = cli
        .wrk
        .clone()
        .or_else(|| wrk::which("wrk"))
        .ok_or("wrk not found (apt-get install wrk, or --wrk PATH)")?;
    let empty = cli.empty_wasm.clone().unwrap_or_else(|| {
        crate_root().join("bench/empty-filter/target/wasm32-wasip1/release/empty_filter.wasm")
    });
    if !empty.is_file() {
        return Err(format!(
            "the empty filter {} is missing (cargo build --release --target wasm32-wasip1 --manifest-path bench/empty-filter/Cargo.toml)",
            empty.display()
        ));
    }
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return Err("needs two cores (Envoys on one, nginx and wrk on the other)".into());
    }
    // This process and what it starts on the second core; the Envoys are moved to the first.
    pin(std::process::id(), "1", true)?;
    let envoy = envoy_bin()?;
    let version = Command::new(&envoy)
        .arg("--version")
        .output()
        .map(|o| {
            // `<path>  version: <sha>/<version>/...`: the path is this machine's, not kept.
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let v = text.split("version: ").nth(1).unwrap_or("").trim();
            format!("Envoy {}", v.split('/').nth(1).unwrap_or(v))
        })
        .unwrap_or_default();
    let upstream = start_nginx(&nginx)?;
    let up = upstream.port();
    let wrk = Wrk::new(wrk_bin)?;
    let script = wrk.script("post", &chat_body(body)?)?;
    let ticks = clock_ticks_per_sec();
    let start = |key: &str| -> Result<Envoy, String> {
        let e = Envoy::start_bootstrap(&bootstrap(key, up, &empty)?, 1)
            .map_err(|e| format!("variant {key}: {e}"))?;
        pin(e.pid(), "0", true)?;
        Ok(e)
    };
    let b = start("b")?;
    let mut variants = Vec::new();
    for k in &keys {
        variants.push((k.clone(), start(k)?));
    }
    // Warm-up: every variant answers, with a short run each.
    for (k, e) in variants
        .iter()
        .map(|(k, e)| (k.as_str(), e))
        .chain(std::iter::once(("b", &b)))
    {
        let r = measure(&wrk, e, &script, 1, ticks)?;
        if r.requests == 0 || r.bad > 0 {
            return Err(format!(
                "variant {k}: {} requests, {} failed in the warm-up; log: {}",
                r.requests,
                r.bad,
                e.log_tail(20)
            ));
        }
    }
    // With --perf DIR: a CPU profile of each variant's Envoy under load (not timed).
    if let Some(pdir) = &cli.perf {
        for (k, e) in variants
            .iter()
            .map(|(k, e)| (k.as_str(), e))
            .chain(std::iter::once(("b", &b)))
        {
            let data = pdir.join(format!("{k}.data"));
            let mut perf = Command::new("perf")
                .args(["record", "-q", "-e", "cpu-clock", "-F", "4000", "-g", "-o"])
                .arg(&data)
                .args(["-p", &e.pid().to_string(), "--", "sleep", &secs.to_string()])
                .spawn()
                .map_err(|err| format!("cannot run perf: {err}"))?;
            let _ = measure(&wrk, e, &script, secs, ticks)?;
            let _ = perf.wait();
        }
    }
    let load0 = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // Per variant: (cpu diff, capacity ratio, req/s ratio, cx per request) per round.
    let mut rows: Vec<(String, Vec<[f64; 5]>)> =
        keys.iter().map(|k| (k.clone(), Vec::new())).collect();
    for round in 0..rounds {
        for (i, (k, e)) in variants.iter().enumerate() {
            let (x, y) = thread::scope(|s| {
                let hx = s.spawn(|| measure(&wrk, e, &script, secs, ticks));
                let hy = s.spawn(|| measure(&wrk, &b, &script, secs, ticks));
                (
                    hx.join()
                        .unwrap_or_else(|_| Err("wrk thread panicked".into())),
                    hy.join()
                        .unwrap_or_else(|_| Err("wrk thread panicked".into())),
                )
            });
            let (x, y) = (x?, y?);
            if x.bad > 0 || y.bad > 0 {
                log(&format!(
                    "round {round} {k}: {} / {} failed answers",
                    x.bad, y.bad
                ));
            }
            log(&format!(
                "round {}: {k} {:.1} µs/req ({} req), b {:.1} µs/req ({} req), {:.3} cx/rq",
                round + 1,
                x.cpu_us,
                x.requests,
                y.cpu_us,
                y.requests,
                x.cx_per_rq
            ));
            rows[i].1.push([
                x.cpu_us - y.cpu_us,
                y.cpu_us / x.cpu_us,
                x.requests as f64 / y.requests.max(1) as f64,
                x.cx_per_rq,
                x.cpu_us,
            ]);
        }
    }
    let load1 = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Paired simultaneous runs against the empty filter (b): {version}; {body}-byte body; {rounds} rounds of {secs} s; wrk 1 thread, 8 connections each; Envoys `--concurrency 1` pinned to core 0, nginx and wrk on core 1. Load average {} at the start, {} at the end.\n",
        load0.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load1.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    md.push_str("| variant | added Envoy CPU µs/req (median) | per round | capacity ratio vs b (CPU) | req/s ratio vs b | upstream connections per request |\n|---|---:|---|---:|---:|---:|\n");
    let mut json_rows = Vec::new();
    for (k, r) in &rows {
        let col = |j: usize| r.iter().map(|v| v[j]).collect::<Vec<f64>>();
        let diffs = col(0);
        let lo = diffs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = diffs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let base_key = k.split_once('=').map_or(k.as_str(), |(b, _)| b);
        let about = ABOUT
            .iter()
            .find(|(a, _)| *a == base_key)
            .map_or("", |(_, d)| d);
        let _ = writeln!(
            md,
            "| {k}: {about} | {:+.1} | {lo:+.0} … {hi:+.0} | {:.2} | {:.2} | {:.3} |",
            wrk::median(&diffs),
            wrk::median(&col(1)),
            wrk::median(&col(2)),
            wrk::median(&col(3)),
        );
        json_rows.push(json!({
            "variant": k, "about": about,
            "added_cpu_us": wrk::median(&diffs), "per_round_added_cpu_us": diffs,
            "capacity_ratio": wrk::median(&col(1)), "rps_ratio": wrk::median(&col(2)),
            "cx_per_rq": wrk::median(&col(3)), "cpu_us": wrk::median(&col(4)),
        }));
    }
    print!("{md}");
    if let Some(out) = &cli.out {
        fs::write(out, &md).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        let j = json!({"envoy": version, "body_bytes": body, "rounds": rounds, "secs": secs, "variants": json_rows});
        fs::write(
            out.with_extension("json"),
            serde_json::to_string_pretty(&j).unwrap_or_default(),
        )
        .map_err(|e| format!("cannot write the JSON: {e}"))?;
    }
    Ok(())
}
