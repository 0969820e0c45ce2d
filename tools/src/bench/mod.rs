//! `make bench`: what the market-router filter costs and how it behaves under load, measured
//! in a real Envoy on loopback. Writes `bench/results/latest.json` and `latest.md`.
//!
//! ```text
//! cargo run --release -p market-router-tools --bin bench -- [--quick] [--rounds N] [--sat-secs S] [--lat-secs S]
//!     [--failover-secs S] [--sections overhead,streaming,failover,memory] [--no-knobs] [--perf|--no-perf] [--out DIR]
//!     [--wrk PATH] [--nginx PATH] [--empty-wasm PATH]
//! ```
//!
//! One module a section, each returning its typed results ([`overhead::Overhead`],
//! [`streaming::Streaming`], [`failover::Failover`], [`memory::Memory`]), serialized together
//! as [`Results`] into `latest.json`, and rendered from the same structs into `latest.md`.
//!
//! 1. Overhead ([`overhead`]): one fast upstream (nginx answering a fixed chat completion, or
//!    the mock provider when nginx is missing) behind Envoy `--concurrency 1` with (a) no filter,
//!    (b) an empty proxy-wasm filter (`bench/empty-filter`), (c) market-router in route mode, (d)
//!    in dispatch mode, (n) in envoy mode. `wrk` measures req/s at 16 connections (and Envoy's
//!    CPU per request) and p50/p99 at one connection, for a 200-byte and a 64 KiB request, in
//!    alternating runs. Knob variants split (c)'s cost (200-byte body, saturation only): (e) (c)
//!    without holding the response, (f) (c) without a market, (g) (c) on a path it passes
//!    through, (h) the empty filter pausing as (c) does, (i) the empty filter replaying (c)'s
//!    host calls, (j) the least body-routing filter, (k), (l), and (m), (o) with Envoy's
//!    compressors. Every variant has its own key ([`overhead::plan`]). With `perf`, one more run
//!    per main variant splits Envoy's CPU into wasm JIT code, the Envoy binary and the kernel.
//! 2. Failover under load ([`failover`]): 8 client threads for a fixed time; provider `a`
//!    turns to 503 half-way; market-router (route mode, circuit breaker; envoy mode) against
//!    Envoy's own retry with outlier detection over the same two mock providers.
//! 3. Memory ([`memory`]): Envoy's RSS, tcmalloc and wasm linear memory with 0 to 10,000 market
//!    offers, after the snapshot is loaded and after traffic; time to apply a 10,000-offer
//!    refresh.
//! 4. Streaming ([`streaming`]): what a streamed answer costs in Envoy CPU per request.
//!
//! Every process it starts is killed on drop; all traffic stays on 127.0.0.1; every loop is
//! bounded in time.

mod failover;
mod load;
mod market;
mod memory;
mod overhead;
mod streaming;
mod upstream;
mod util;

use clap::Parser;
use market_router_testbed::{crate_root, envoy_bin, wasm_path};
use serde::Serialize;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};
use util::{git_commit, git_dirty, loadavg, log, round_to, tool_version, utc_now, which};

// What `bench_envoy_mode` shares with the overhead section: the nginx upstream, the wrk script
// and run, the request body and the filter configuration.
pub use load::{Wrk, WrkOut};
pub use market::overhead_config;
pub use upstream::{start_nginx, Upstream};
pub use util::chat_body;

/// Model every benchmark request asks for.
pub(crate) const MODEL: &str = "gpt-4o-mini";
/// Path of the chat endpoint.
pub(crate) const CHAT_PATH: &str = "/v1/chat/completions";
/// Header the route takes its cluster from (sent by the client too, for the empty filter).
pub(crate) const CLUSTER_HEADER: &str = "x-market-router-cluster";
/// A path the filter passes through, routed to one cluster by an explicit route.
pub(crate) const PASSTHROUGH_PATH: &str = "/v1/passthrough";
/// Small request body, bytes.
pub(crate) const SMALL_BODY: usize = 200;
/// Large request body, bytes.
pub(crate) const LARGE_BODY: usize = 64 * 1024;
/// What the fast upstream answers: a chat completion with usage.
pub(crate) const UPSTREAM_ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":50,"completion_tokens":8,"total_tokens":58}}"#;
/// Timeout of one request of the Rust load loops.
pub(crate) const REQ_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a snapshot to show up on the route endpoint.
pub(crate) const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The sections `--sections` accepts, in the order they run.
const SECTIONS: [&str; 4] = ["overhead", "streaming", "failover", "memory"];

/// `bench`'s command line. Defaults that depend on `--quick` are resolved in [`Opts::from_cli`].
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "What the market-router filter costs and how it behaves under load, in a real Envoy on loopback",
    long_about = "What the market-router filter costs and how it behaves under load, measured in a real Envoy on \
loopback: overhead (throughput, latency, Envoy CPU per request against Envoy alone and an empty filter), \
streaming, failover under load, memory. Writes latest.json and latest.md to --out."
)]
pub struct Cli {
    /// About a minute: one round, short runs, no knobs, no perf, fewer snapshot sizes
    #[arg(long)]
    quick: bool,
    /// Alternating rounds of the overhead and streaming runs, 1..20 [default: 3, 1 with --quick]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// Seconds of each saturation run, 1..60 [default: 3, 2 with --quick]
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=60))]
    sat_secs: Option<u64>,
    /// Seconds of each one-connection latency run, 1..60 [default: 2, 1 with --quick]
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=60))]
    lat_secs: Option<u64>,
    /// Seconds of each failover scenario, 4..120 [default: 10, 5 with --quick]
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(4..=120))]
    failover_secs: Option<u64>,
    /// Sections to run, comma-separated
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        value_parser = SECTIONS,
        default_value = "overhead,streaming,failover,memory"
    )]
    sections: Vec<String>,
    /// Skip the knob variants (e to o) of the overhead section (--quick skips them too)
    #[arg(long)]
    no_knobs: bool,
    /// Profile Envoy with perf in the overhead section (the default without --quick, when perf is found)
    #[arg(long, conflicts_with = "no_perf")]
    perf: bool,
    /// Do not profile Envoy with perf
    #[arg(long)]
    no_perf: bool,
    /// Where latest.json and latest.md go [default: bench/results]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The wrk binary [default: wrk on PATH]
    #[arg(long, value_name = "PATH")]
    wrk: Option<PathBuf>,
    /// The nginx binary of the fast upstream [default: nginx on PATH or in /usr/sbin; without it the mock provider]
    #[arg(long, value_name = "PATH")]
    nginx: Option<PathBuf>,
    /// The empty comparison filter [default: bench/empty-filter/target/wasm32-wasip1/release/empty_filter.wasm]
    #[arg(long, value_name = "PATH")]
    empty_wasm: Option<PathBuf>,
}

/// The options every section reads.
pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) rounds: usize,
    pub(crate) sat_secs: u64,
    pub(crate) lat_secs: u64,
    pub(crate) warmup_secs: u64,
    pub(crate) failover_secs: u64,
    pub(crate) knobs: bool,
    pub(crate) perf: Option<PathBuf>,
    pub(crate) sections: Vec<String>,
    pub(crate) out: PathBuf,
    pub(crate) wrk: Option<PathBuf>,
    pub(crate) nginx: Option<PathBuf>,
    pub(crate) empty_wasm: PathBuf,
    pub(crate) memory_sizes: Vec<usize>,
    pub(crate) refresh_reps: usize,
    pub(crate) args: Vec<String>,
}

impl Opts {
    fn from_cli(cli: Cli, args: Vec<String>) -> Opts {
        let quick = cli.quick;
        let root = crate_root();
        Opts {
            quick,
            rounds: cli.rounds.map_or(if quick { 1 } else { 3 }, |r| r as usize),
            sat_secs: cli.sat_secs.unwrap_or(if quick { 2 } else { 3 }),
            lat_secs: cli.lat_secs.unwrap_or(if quick { 1 } else { 2 }),
            warmup_secs: 1,
            failover_secs: cli.failover_secs.unwrap_or(if quick { 5 } else { 10 }),
            knobs: !quick && !cli.no_knobs,
            perf: if cli.perf || (!quick && !cli.no_perf) {
                which("perf")
            } else {
                None
            },
            sections: cli.sections,
            out: cli
                .out
                .unwrap_or_else(|| root.join("bench").join("results")),
            wrk: cli.wrk.or_else(|| which("wrk")),
            nginx: cli.nginx.or_else(|| which("nginx")),
            empty_wasm: cli.empty_wasm.unwrap_or_else(|| {
                root.join("bench/empty-filter/target/wasm32-wasip1/release/empty_filter.wasm")
            }),
            memory_sizes: if quick {
                vec![10, 10_000]
            } else {
                vec![0, 10, 1_000, 10_000]
            },
            refresh_reps: if quick { 1 } else { 3 },
            args,
        }
    }
}

/// Who ran the benchmark where: the `meta` object of `latest.json`.
#[derive(Debug, Serialize)]
pub struct Meta {
    pub date: String,
    pub commit: String,
    pub dirty: bool,
    pub envoy: String,
    pub cores: usize,
    pub quick: bool,
    pub args: Vec<String>,
    pub wasm_bytes: u64,
    pub loadavg_start: String,
    pub runtime_s: f64,
    pub loadavg_end: String,
}

/// `latest.json`: a section that did not run is null.
#[derive(Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    pub overhead: Option<overhead::Overhead>,
    pub streaming: Option<streaming::Streaming>,
    pub failover: Option<failover::Failover>,
    pub memory: Option<memory::Memory>,
}

/// `bench`'s main: parses the command line, runs the sections asked for, writes the results.
pub fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli, std::env::args().skip(1).collect()) {
        eprintln!("bench: error: {e}");
        std::process::exit(1);
    }
}

/// `latest.md`, from [`Results`].
fn markdown(all: &Results) -> String {
    let meta = &all.meta;
    let mut md = String::new();
    let _ = writeln!(md, "# market-router benchmark\n");
    let _ = writeln!(
        md,
        "{} · commit `{}`{} · Envoy {} · {} cores, shared machine · loopback only · `make bench{}`\n",
        meta.date,
        meta.commit,
        if meta.dirty { " (with uncommitted changes)" } else { "" },
        meta.envoy,
        meta.cores,
        if meta.quick { " ARGS=--quick" } else { "" },
    );
    let _ = writeln!(
        md,
        "Load average (1/5/15 min) {} at the start, {} at the end: other work on this machine adds noise; runs alternate so it hits all variants alike.\n",
        meta.loadavg_start, meta.loadavg_end,
    );
    md.push_str(&overhead::markdown_part(all.overhead.as_ref()));
    md.push_str(&failover::markdown_part(all.failover.as_ref()));
    md.push_str(&memory::markdown_part(all.memory.as_ref()));
    md.push_str(&streaming::markdown(all.streaming.as_ref()));
    md
}

fn run(cli: Cli, args: Vec<String>) -> Result<(), String> {
    let opts = Opts::from_cli(cli, args);
    let started = Instant::now();
    fs::create_dir_all(&opts.out)
        .map_err(|e| format!("cannot create {}: {e}", opts.out.display()))?;
    let wasm = wasm_path();
    if !wasm.is_file() {
        return Err(format!("{} is missing (make build)", wasm.display()));
    }
    let envoy = envoy_bin()?;
    let mut meta = Meta {
        date: utc_now(),
        commit: git_commit(),
        dirty: git_dirty(),
        envoy: tool_version(&envoy, "--version")
            .split("version: ")
            .nth(1)
            .unwrap_or("")
            .split('/')
            .nth(1)
            .unwrap_or("")
            .to_string(),
        cores: thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        quick: opts.quick,
        args: opts.args.clone(),
        wasm_bytes: fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0),
        loadavg_start: loadavg(),
        runtime_s: f64::NAN,
        loadavg_end: String::new(),
    };
    // A section runs when asked for; otherwise its results are null.
    let wants = |name: &str| opts.sections.iter().any(|x| x == name);
    let overhead = wants("overhead")
        .then(|| overhead::run(&opts))
        .transpose()?;
    let streaming = wants("streaming")
        .then(|| streaming::run(&opts))
        .transpose()?;
    let failover = wants("failover")
        .then(|| failover::run(&opts))
        .transpose()?;
    let memory = wants("memory").then(|| memory::run(&opts)).transpose()?;
    meta.runtime_s = round_to(started.elapsed().as_secs_f64(), 1);
    meta.loadavg_end = loadavg();
    let all = Results {
        meta,
        overhead,
        streaming,
        failover,
        memory,
    };
    let json_path = opts.out.join("latest.json");
    let md_path = opts.out.join("latest.md");
    let md = markdown(&all);
    let all = serde_json::to_value(&all).map_err(|e| e.to_string())?;
    let text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
    fs::write(&json_path, text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    fs::write(&md_path, &md).map_err(|e| format!("cannot write {}: {e}", md_path.display()))?;
    println!("{md}");
    log(&format!(
        "wrote {} and {} in {:.0} s",
        json_path.display(),
        md_path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_keeps_its_flags_and_quick_defaults() -> Result<(), String> {
        let cli = Cli::try_parse_from([
            "bench",
            "--quick",
            "--rounds",
            "1",
            "--sat-secs",
            "1",
            "--lat-secs",
            "1",
            "--sections",
            "overhead",
            "--no-knobs",
            "--no-perf",
            "--out",
            "dir",
        ])
        .map_err(|e| e.to_string())?;
        let opts = Opts::from_cli(cli, vec![]);
        assert_eq!((opts.rounds, opts.sat_secs, opts.lat_secs), (1, 1, 1));
        assert_eq!(opts.failover_secs, 5);
        assert_eq!(opts.sections, ["overhead"]);
        assert!(!opts.knobs && opts.perf.is_none());
        assert_eq!(opts.out, PathBuf::from("dir"));
        let full = Opts::from_cli(Cli::parse_from(["bench", "--no-perf"]), vec![]);
        assert_eq!(
            (
                full.rounds,
                full.sat_secs,
                full.lat_secs,
                full.failover_secs
            ),
            (3, 3, 2, 10)
        );
        assert_eq!(full.sections, SECTIONS);
        assert!(full.knobs);
        for bad in [
            &["bench", "--rounds", "0"][..],
            &["bench", "--sat-secs", "61"],
            &["bench", "--failover-secs", "3"],
            &["bench", "--sections", "overhead,nope"],
            &["bench", "--perf", "--no-perf"],
            &["bench", "--frobnicate"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "latest_md_tests.rs"]
mod latest_md_tests;
