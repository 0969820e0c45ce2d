//! `make bench`, Kong's wasm host section: nginx with ngx_wasm_module (the host Kong embeds,
//! built by `scripts/kong-host.sh`) doing `proxy_pass` alone, against the same nginx with
//! market-router in dispatch mode in front of the same upstream. One run, alternating rounds,
//! medians and ratios; writes `bench/results/kong.json` and `bench/results/kong.md`.
//!
//! usage: bench_kong [--quick] [--rounds N] [--sat-secs S] [--lat-secs S] [--out DIR]
//!
//! The upstream is a third nginx answering a fixed chat completion (`return 200`). Load comes
//! from wrk on 127.0.0.1: 16 connections for throughput, 1 for latency. CPU is the nginx
//! worker's user+system time per request over the run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use market_router_testbed as common;

use clap::Parser;
use common::{Kong, KongConfig, TempDir};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":50,"completion_tokens":8,"total_tokens":58}}"#;
const MODEL: &str = "gpt-4o-mini";

/// `bench_kong`'s command line; defaults that depend on `--quick` are resolved in [`run`].
#[derive(Debug, Parser)]
#[command(
    name = "bench_kong",
    about = "Kong's wasm host: nginx proxy_pass alone against market-router in dispatch mode (writes kong.json, kong.md)"
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    /// Seconds of each saturation run [default: 3, 2 with --quick]
    #[arg(long, value_name = "S")]
    sat_secs: Option<u64>,
    /// Seconds of each one-connection latency run [default: 2, 1 with --quick]
    #[arg(long, value_name = "S")]
    lat_secs: Option<u64>,
}

fn main() {
    let cli: Cli = cli::parse(&RunHelp {
        quick: "One round of short runs",
        rounds: "Alternating rounds [default: 3, 1 with --quick]",
        out: "Where kong.json and kong.md go [default: bench/results]",
    });
    if let Err(e) = run(cli) {
        eprintln!("bench_kong: error: {e}");
        std::process::exit(1);
    }
}

use market_router_tools::cli::{self, RunArgs, RunHelp};
use market_router_tools::wrk::{clock_ticks_per_sec, cpu_ticks, median, which};

struct WrkOut {
    rps: f64,
    p50_us: f64,
    requests: u64,
    bad: u64,
}

fn wrk_script(dir: &Path) -> Result<PathBuf, String> {
    let body = json!({"model": MODEL, "max_tokens": 16,
        "messages": [{"role": "user", "content": "x".repeat(120)}]})
    .to_string();
    let body_path = dir.join("body.json");
    fs::write(&body_path, &body).map_err(|e| e.to_string())?;
    let lua = format!(
        r#"wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local f = assert(io.open({path}, "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCHJSON {{\"requests\":%d,\"duration_us\":%d,\"bad\":%d,\"p50\":%d}}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50)))
end
"#,
        path = Value::from(body_path.to_string_lossy().into_owned())
    );
    let script = dir.join("post.lua");
    fs::write(&script, lua).map_err(|e| e.to_string())?;
    Ok(script)
}

fn wrk(bin: &Path, script: &Path, url: &str, conns: u32, secs: u64) -> Result<WrkOut, String> {
    let v = market_router_tools::wrk::run(bin, 1, conns, secs, script, url, "BENCHJSON ")?;
    let requests = v["requests"].as_u64().unwrap_or(0);
    let secs = v["duration_us"].as_f64().unwrap_or(f64::NAN) / 1e6;
    Ok(WrkOut {
        rps: requests as f64 / secs,
        p50_us: v["p50"].as_f64().unwrap_or(f64::NAN),
        requests,
        bad: v["bad"].as_u64().unwrap_or(0),
    })
}

fn run(cli: Cli) -> Result<(), String> {
    let rounds: usize = cli.run.rounds(3, 1);
    let sat_secs: u64 = cli.sat_secs.unwrap_or(cli.run.pick(3, 2));
    let lat_secs: u64 = cli.lat_secs.unwrap_or(cli.run.pick(2, 1));
    let out_dir = cli.run.out();
    let wrk_bin = which("wrk").ok_or("wrk is not installed (scripts/bench.sh installs it)")?;
    let dir = TempDir::new("bench-kong")?;
    let script = wrk_script(dir.path())?;
    let ticks = clock_ticks_per_sec();

    // The upstream: the same nginx binary without the filter, answering a fixed completion.
    let up_port = common::free_port();
    let upstream = Kong::start(&KongConfig::new().server(&format!(
        "server {{ listen 127.0.0.1:{up_port}; keepalive_requests 10000000; \
         location / {{ default_type application/json; return 200 '{ANSWER}'; }} }}"
    )))?;
    let config = json!({
        "providers": [{"name": "a", "cluster": format!("127.0.0.1:{up_port}"),
                       "models": {MODEL: MODEL},
                       "static_offer": {"price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}}],
        "failover": {"mode": "dispatch"}
    });
    // Client keep-alive bounded as kong/kong.conf advises (the host's per-connection pool).
    let keepalive: u32 = std::env::var("MR_KONG_KEEPALIVE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let variants = [
        (
            "k0",
            "nginx + ngx_wasm_module, proxy_pass alone",
            KongConfig::new()
                .upstream(up_port)
                .keepalive_requests(keepalive),
        ),
        (
            "k1",
            "the same + market-router, dispatch mode",
            KongConfig::new()
                .upstream(up_port)
                .keepalive_requests(keepalive)
                .market_router(&config.to_string()),
        ),
    ];
    let hosts: Vec<Kong> = variants
        .iter()
        .map(|(_, _, c)| Kong::start(c))
        .collect::<Result<_, _>>()?;
    let url = |k: &Kong| k.url("/v1/chat/completions");
    // Warm-up, and a check that the filter routed (our header on the answer).
    for (k, (id, _, _)) in hosts.iter().zip(&variants) {
        let r = common::post_json(
            &url(k),
            &[],
            &json!({"model": MODEL, "messages": []}),
            Duration::from_secs(5),
        )?;
        if r.status != 200 || (*id == "k1" && r.header("x-market-router-provider") != Some("a")) {
            return Err(format!("{id}: warm-up answer {} {}", r.status, r.text()));
        }
        wrk(&wrk_bin, &script, &url(k), 8, 1)?;
    }
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); hosts.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); hosts.len()];
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); hosts.len()];
    let mut bad = 0u64;
    for round in 0..rounds {
        for (i, k) in hosts.iter().enumerate() {
            let worker = *k.worker_pids().first().ok_or("no nginx worker")?;
            let c0 = cpu_ticks(worker);
            let s = wrk(&wrk_bin, &script, &url(k), 16, sat_secs)?;
            let c1 = cpu_ticks(worker);
            if let (Some(a), Some(b)) = (c0, c1) {
                cpu[i].push((b - a) as f64 / ticks * 1e6 / s.requests.max(1) as f64);
            }
            rps[i].push(s.rps);
            let l = wrk(&wrk_bin, &script, &url(k), 1, lat_secs)?;
            p50[i].push(l.p50_us);
            bad += s.bad + l.bad;
            eprintln!(
                "bench_kong: round {} {}: {:.0} req/s, p50 {:.0} us",
                round + 1,
                variants[i].0,
                s.rps,
                l.p50_us
            );
        }
    }
    for (k, (id, _, _)) in hosts.iter().zip(&variants) {
        let crashes = k.crashes();
        if !crashes.is_empty() {
            return Err(format!("{id}: {}", crashes.join("\n")));
        }
    }
    drop(upstream);
    let m = |v: &[Vec<f64>], i: usize| median(&v[i]);
    let result = json!({
        "rounds": rounds, "sat_secs": sat_secs, "lat_secs": lat_secs, "errors_or_non2xx": bad,
        "variants": variants.iter().enumerate().map(|(i, (id, what, _))| json!({
            "id": id, "what": what, "rps": m(&rps, i).round(), "cpu_us_per_req": (m(&cpu, i) * 10.0).round() / 10.0,
            "p50_us": m(&p50, i).round()
        })).collect::<Vec<_>>(),
        "ratio_rps_k1_k0": ((m(&rps, 1) / m(&rps, 0)) * 100.0).round() / 100.0,
        "added_p50_us": (m(&p50, 1) - m(&p50, 0)).round(),
        "added_cpu_us": ((m(&cpu, 1) - m(&cpu, 0)) * 10.0).round() / 10.0,
    });
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Kong's wasm host (nginx 1.22 + ngx_wasm_module + wasmtime 26)\n"
    );
    let _ = writeln!(
        md,
        "{rounds} alternating round(s), 1 nginx worker each, keepalive_requests {keepalive}, wrk on loopback, 200-byte chat body, medians.\n"
    );
    let _ = writeln!(
        md,
        "| variant | req/s at 16 conn | worker CPU µs/req | p50 µs at 1 conn |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (i, (id, what, _)) in variants.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {id}. {what} | {:.0} | {:.1} | {:.0} |",
            m(&rps, i),
            m(&cpu, i),
            m(&p50, i)
        );
    }
    let _ = writeln!(
        md,
        "\nmarket-router in dispatch mode: {:.2}× the throughput of proxy_pass alone, {:+.0} µs p50, {:+.1} µs worker CPU per request; {bad} errors or non-2xx.",
        m(&rps, 1) / m(&rps, 0),
        m(&p50, 1) - m(&p50, 0),
        m(&cpu, 1) - m(&cpu, 0)
    );
    fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    fs::write(
        out_dir.join("kong.json"),
        serde_json::to_string_pretty(&result).map_err(|e| e.to_string())? + "\n",
    )
    .map_err(|e| e.to_string())?;
    fs::write(out_dir.join("kong.md"), &md).map_err(|e| e.to_string())?;
    println!("{md}");
    Ok(())
}
