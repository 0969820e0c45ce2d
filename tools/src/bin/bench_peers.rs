//! Peers benchmark: the same two-provider setup behind four gateways, measured in one run,
//! alternating between them round by round.
//!
//! ```text
//! bench_peers [--rounds N] [--conns N] [--throughput-s S] [--latency-s S] [--failover-s S]
//!             [--envoy-concurrency N] [--out-dir DIR] [--only KEY,...]
//!             [--litellm BIN --litellm-version V | --litellm-unavailable REASON]
//!             [--portkey SERVER_JS --portkey-version V --node-preload FILE
//!              | --portkey-unavailable REASON]
//! ```
//!
//! Gateways:
//! * `envoy`: Envoy alone, no filter, one route to provider `a` (baseline; its failover run
//!   goes through a second Envoy routing to the failing provider, with no retry policy);
//! * `envoy_mr`: Envoy with the market-router filter (`failover.mode: route`, `cheapest`
//!   strategy over static offers, so `a` is first and `b` second);
//! * `litellm`: LiteLLM proxy, one model group per model listing both deployments with
//!   `order` 1 and 2, one retry, cooldown after failures;
//! * `portkey`: Portkey's open-source gateway, an `x-portkey-config` header with strategy
//!   `fallback` over two `openai` targets whose `custom_host` points at the mocks.
//!
//! Four mock providers, all on 127.0.0.1: `a` and `b` answer 200 (model `bench-model`), `fa`
//! always answers 503 and `fb` answers 200 (model `failover-model`). Each gateway is configured
//! for both pairs, so the failover run never disturbs the healthy pair.
//!
//! Per gateway and round: a short warm-up, then requests per second at `--conns` keep-alive
//! connections for `--throughput-s`, then p50/p99 at one connection for `--latency-s`, then the
//! failover run at one connection for `--failover-s`: share of requests answered 200, p50 of
//! all requests, and the requests that reached `fa` and `fb` per client request (mock counters).
//! Rounds rotate the order of the gateways. Writes `peers.json` and `peers.md` to `--out-dir`.
//! A gateway that cannot be started or fails its first request is reported as unavailable,
//! with the reason, and the others are measured.

use market_router_testbed as common;

use clap::Parser;
use common::{
    crate_root, lock, request, unix_now, wait_ready_while, Conn, Envoy, EnvoyConfig, MockOpts,
    MockProvider, Proc, ProviderCluster, TempDir,
};
use market_router_tools::wrk::median_of;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Model the healthy pair (`a`, `b`) serves.
const MODEL: &str = "bench-model";
/// Model the failing pair (`fa` answers 503, `fb` serves) serves.
const FO_MODEL: &str = "failover-model";
/// Model id every provider gets after the gateways rewrite it.
const UPSTREAM_MODEL: &str = "gpt-4o-mini";
/// Client timeout of one request.
const REQ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer gets to start.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Warm-up before each gateway's throughput run.
const WARMUP: Duration = Duration::from_millis(1500);
const PATH: &str = "/v1/chat/completions";

struct Options {
    rounds: usize,
    conns: usize,
    throughput: Duration,
    latency: Duration,
    failover: Duration,
    envoy_concurrency: u32,
    out_dir: PathBuf,
    litellm: Result<(PathBuf, String), String>,
    portkey: Result<(PathBuf, String, PathBuf), String>,
    /// Gateways to measure (all when `None`).
    only: Option<Vec<String>>,
}

/// Seconds, 0.1..120.
fn secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(0.1..=120.0).contains(&v) {
        return Err(format!("{v} is outside 0.1..120"));
    }
    Ok(v)
}

/// `bench_peers`' command line.
#[derive(Debug, Parser)]
#[command(
    name = "bench_peers",
    about = "Envoy alone, market-router in Envoy, LiteLLM and Portkey in one run: throughput, latency, failover (writes peers.json, peers.md)"
)]
struct Cli {
    /// Alternating rounds, 1..20
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    rounds: u64,
    /// Connections of the throughput runs, 1..256
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    conns: u64,
    /// Seconds of each throughput run, 0.1..120
    #[arg(long = "throughput-s", value_name = "S", default_value_t = 5.0, value_parser = secs)]
    throughput_s: f64,
    /// Seconds of each latency run, 0.1..120
    #[arg(long = "latency-s", value_name = "S", default_value_t = 3.0, value_parser = secs)]
    latency_s: f64,
    /// Seconds of each failover run, 0.1..120
    #[arg(long = "failover-s", value_name = "S", default_value_t = 3.0, value_parser = secs)]
    failover_s: f64,
    /// Envoy's --concurrency
    #[arg(long, value_name = "N", default_value_t = 1)]
    envoy_concurrency: u32,
    /// Where peers.json and peers.md go [default: bench/results]
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Gateways to measure, comma-separated (envoy, envoy_mr, litellm, portkey) [default: all]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// The LiteLLM proxy binary
    #[arg(long, value_name = "BIN")]
    litellm: Option<PathBuf>,
    /// LiteLLM's version, for the report
    #[arg(long, value_name = "V")]
    litellm_version: Option<String>,
    /// Why LiteLLM is not measured (reported instead of its figures)
    #[arg(long, value_name = "REASON")]
    litellm_unavailable: Option<String>,
    /// Portkey's server JS file (needs --node-preload)
    #[arg(long, value_name = "SERVER_JS", requires = "node_preload")]
    portkey: Option<PathBuf>,
    /// Portkey's version, for the report
    #[arg(long, value_name = "V")]
    portkey_version: Option<String>,
    /// The file node preloads for Portkey
    #[arg(long, value_name = "FILE")]
    node_preload: Option<PathBuf>,
    /// Why Portkey is not measured (reported instead of its figures)
    #[arg(long, value_name = "REASON")]
    portkey_unavailable: Option<String>,
}

fn parse_options() -> Result<Options, String> {
    let a = Cli::parse();
    let litellm = match (a.litellm, a.litellm_unavailable) {
        (Some(bin), _) => Ok((bin, a.litellm_version.unwrap_or_default())),
        (None, Some(reason)) => Err(reason),
        (None, None) => Err("not requested (no --litellm)".to_string()),
    };
    let portkey = match (a.portkey, a.portkey_unavailable) {
        (Some(js), _) => {
            let preload = a.node_preload.ok_or("--portkey needs --node-preload")?;
            Ok((js, a.portkey_version.unwrap_or_default(), preload))
        }
        (None, Some(reason)) => Err(reason),
        (None, None) => Err("not requested (no --portkey)".to_string()),
    };
    Ok(Options {
        rounds: a.rounds as usize,
        conns: a.conns as usize,
        throughput: Duration::from_secs_f64(a.throughput_s),
        latency: Duration::from_secs_f64(a.latency_s),
        failover: Duration::from_secs_f64(a.failover_s),
        envoy_concurrency: a.envoy_concurrency,
        out_dir: a
            .out_dir
            .unwrap_or_else(|| crate_root().join("bench").join("results")),
        litellm,
        portkey,
        only: a
            .only
            .map(|v| v.iter().map(|k| k.trim().to_string()).collect()),
    })
}

// ---------------------------------------------------------------------------------------------
// Load loop
// ---------------------------------------------------------------------------------------------

/// Where a phase sends its requests.
#[derive(Clone)]
struct Endpoint {
    authority: String,
    headers: Vec<(String, String)>,
    model: &'static str,
}

impl Endpoint {
    fn body(&self) -> Vec<u8> {
        json!({
            "model": self.model,
            "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 8
        })
        .to_string()
        .into_bytes()
    }
}

/// What one phase measured.
#[derive(Default)]
struct Sample {
    ok: u64,
    total: u64,
    /// Status code (or `error`) → count.
    statuses: BTreeMap<String, u64>,
    /// Latency of every request, microseconds.
    all_us: Vec<u64>,
    /// Latency of the requests answered 200, microseconds.
    ok_us: Vec<u64>,
    elapsed: Duration,
}

impl Sample {
    fn merge(&mut self, o: Sample) {
        self.ok += o.ok;
        self.total += o.total;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_insert(0) += v;
        }
        self.all_us.extend(o.all_us);
        self.ok_us.extend(o.ok_us);
        self.elapsed += o.elapsed;
    }
}

/// Sends requests on `conns` keep-alive connections until `dur` has passed.
fn run_load(ep: &Endpoint, conns: usize, dur: Duration) -> Sample {
    let body = ep.body();
    let out = Mutex::new(Sample::default());
    let start = Instant::now();
    let deadline = start + dur;
    thread::scope(|s| {
        for _ in 0..conns {
            s.spawn(|| {
                let headers: Vec<(&str, &str)> =
                    std::iter::once(("content-type", "application/json"))
                        .chain(ep.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                        .collect();
                let mut local = Sample::default();
                let mut conn: Option<Conn> = None;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    if conn.as_ref().is_none_or(|c| !c.is_open()) {
                        conn = Conn::connect(&ep.authority, REQ_TIMEOUT).ok();
                    }
                    let result = match conn.as_mut() {
                        Some(c) => c.send("POST", PATH, &headers, &body, REQ_TIMEOUT),
                        None => Err("connect failed".to_string()),
                    };
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    local.total += 1;
                    local.all_us.push(us);
                    let key = match &result {
                        Ok(r) => r.status.to_string(),
                        Err(_) => {
                            conn = None;
                            "error".to_string()
                        }
                    };
                    if matches!(&result, Ok(r) if r.status == 200) {
                        local.ok += 1;
                        local.ok_us.push(us);
                    }
                    *local.statuses.entry(key).or_insert(0) += 1;
                    if result.is_err() {
                        // Do not spin on a dead endpoint.
                        thread::sleep(Duration::from_millis(20));
                    }
                }
                lock(&out).merge(local);
            });
        }
    });
    let mut sample = out.into_inner().unwrap_or_else(|e| e.into_inner());
    sample.elapsed = start.elapsed();
    sample
}

/// Nearest-rank percentile in milliseconds (`None` without samples).
fn pct_ms(samples: &[u64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, v.len()) - 1;
    Some(v[idx] as f64 / 1000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Gateways
// ---------------------------------------------------------------------------------------------

/// Processes a gateway needs, kept alive for the whole run (held only to be dropped).
#[allow(dead_code)]
enum Holder {
    Envoy(Envoy),
    Proc(Proc),
}

struct Gateway {
    key: &'static str,
    label: String,
    version: String,
    notes: String,
    healthy: Endpoint,
    failover: Endpoint,
    _procs: Vec<Holder>,
}

struct Mocks {
    a: MockProvider,
    b: MockProvider,
    fa: MockProvider,
    fb: MockProvider,
}

fn start_mocks() -> Result<Mocks, String> {
    let quiet = MockOpts {
        quiet: true,
        ..MockOpts::default()
    };
    let dead = MockOpts {
        quiet: true,
        ..MockOpts::default().status(503)
    };
    Ok(Mocks {
        a: MockProvider::start("a", &quiet)?,
        b: MockProvider::start("b", &quiet)?,
        fa: MockProvider::start("fa", &dead)?,
        fb: MockProvider::start("fb", &quiet)?,
    })
}

fn envoy_version() -> String {
    common::envoy_bin()
        .ok()
        .and_then(|b| Command::new(b).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .and_then(|s| {
            s.split("version: ")
                .nth(1)
                .map(|v| v.split('/').nth(1).unwrap_or(v).trim().to_string())
        })
        .unwrap_or_default()
}

fn envoy_alone(m: &Mocks, conc: u32) -> Result<Gateway, String> {
    let ea = Envoy::start(
        &EnvoyConfig::new().provider(ProviderCluster::new("provider_a", m.a.port())),
        conc,
    )?;
    let efa = Envoy::start(
        &EnvoyConfig::new().provider(ProviderCluster::new("provider_fa", m.fa.port())),
        conc,
    )?;
    let ep = |e: &Envoy, model| Endpoint {
        authority: format!("127.0.0.1:{}", e.port()),
        headers: Vec::new(),
        model,
    };
    Ok(Gateway {
        key: "envoy",
        label: "Envoy alone (no filter, route to a)".into(),
        version: envoy_version(),
        notes: format!(
            "--concurrency {conc}; no retry policy: the failover run goes through a second \
             Envoy whose only route is the failing provider"
        ),
        healthy: ep(&ea, MODEL),
        failover: ep(&efa, FO_MODEL),
        _procs: vec![Holder::Envoy(ea), Holder::Envoy(efa)],
    })
}

/// The filter configuration: `a` cheaper than `b`, `fa` cheaper than `fb`.
fn market_router_config() -> String {
    let p = |name: &str, model: &str, input: f64| {
        json!({
            "name": name,
            "cluster": format!("provider_{name}"),
            "models": { model: UPSTREAM_MODEL },
            "static_offer": {
                "price": {"input_per_mtok": input, "output_per_mtok": input * 2.0},
                "latency_ms": {"ttft_p50": 300},
                "uptime": 0.99
            }
        })
    };
    json!({
        "providers": [p("a", MODEL, 0.1), p("b", MODEL, 0.5), p("fa", FO_MODEL, 0.1), p("fb", FO_MODEL, 0.5)],
        "routing": {"strategy": "cheapest"},
        "failover": {"mode": "route", "max_attempts": 2}
    })
    .to_string()
}

fn envoy_market_router(m: &Mocks, conc: u32) -> Result<Gateway, String> {
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", m.a.port()))
        .provider(ProviderCluster::new("provider_b", m.b.port()))
        .provider(ProviderCluster::new("provider_fa", m.fa.port()))
        .provider(ProviderCluster::new("provider_fb", m.fb.port()))
        .market_router(&market_router_config())
        .component_log_level("");
    let e = Envoy::start(&cfg, conc)?;
    let ep = |model| Endpoint {
        authority: format!("127.0.0.1:{}", e.port()),
        headers: Vec::new(),
        model,
    };
    Ok(Gateway {
        key: "envoy_mr",
        label: "Envoy + market-router (route mode)".into(),
        version: envoy_version(),
        notes: format!(
            "--concurrency {conc}; strategy cheapest over static offers, failover.mode route, \
             max_attempts 2, circuit breaker defaults (3 failures, 30 s cooldown)"
        ),
        healthy: ep(MODEL),
        failover: ep(FO_MODEL),
        _procs: vec![Holder::Envoy(e)],
    })
}

/// 16 random bytes as hex, from the OS.
fn random_hex() -> Result<String, String> {
    let mut buf = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

fn litellm_yaml(m: &Mocks) -> String {
    let dep = |group: &str, mock: &MockProvider, order: u32| {
        format!(
            "  - model_name: {group}\n    litellm_params:\n      model: openai/{UPSTREAM_MODEL}\n      \
             api_base: http://127.0.0.1:{port}/v1\n      api_key: bench-key-{name}\n      order: {order}\n",
            port = mock.port(),
            name = mock.name(),
        )
    };
    let mut y = String::from("model_list:\n");
    y.push_str(&dep(MODEL, &m.a, 1));
    y.push_str(&dep(MODEL, &m.b, 2));
    y.push_str(&dep(FO_MODEL, &m.fa, 1));
    y.push_str(&dep(FO_MODEL, &m.fb, 2));
    y.push_str(
        "router_settings:\n  routing_strategy: simple-shuffle\n  enable_pre_call_checks: true\n  \
         num_retries: 1\n  allowed_fails: 3\n  cooldown_time: 30\n\
         litellm_settings:\n  telemetry: false\n",
    );
    y
}

fn wait_http(url: &str, proc: &mut Proc) -> Result<(), String> {
    wait_ready_while(url, START_TIMEOUT, || proc.check_running())
}

fn litellm(m: &Mocks, bin: &Path, version: &str) -> Result<Gateway, String> {
    let dir = TempDir::new("litellm")?;
    let cfg = dir.join("litellm.yaml");
    fs::write(&cfg, litellm_yaml(m)).map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
    let port = common::free_port();
    let key = format!("sk-{}", random_hex()?);
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(port.to_string())
        .current_dir(dir.path())
        .env("LITELLM_MASTER_KEY", &key)
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY", "False")
        .env("NO_DOCS", "True");
    let mut proc = Proc::spawn_in("litellm", &mut cmd, dir)?;
    wait_http(
        &format!("http://127.0.0.1:{port}/health/liveliness"),
        &mut proc,
    )
    .map_err(|e| format!("LiteLLM did not start: {e}\n{}", proc.log_tail(15)))?;
    let ep = |model| Endpoint {
        authority: format!("127.0.0.1:{port}"),
        headers: vec![("authorization".into(), format!("Bearer {key}"))],
        model,
    };
    Ok(Gateway {
        key: "litellm",
        label: "LiteLLM proxy (router, order 1/2, retries)".into(),
        version: version.to_string(),
        notes: "1 uvicorn worker (default); model group with both deployments, order 1/2 \
                (enable_pre_call_checks), num_retries 1, allowed_fails 3, cooldown_time 30 s; \
                master key set (LiteLLM refuses to start without one)"
            .into(),
        healthy: ep(MODEL),
        failover: ep(FO_MODEL),
        _procs: vec![Holder::Proc(proc)],
    })
}

/// The `x-portkey-config` value: fallback from the first mock to the second.
fn portkey_config(first: &MockProvider, second: &MockProvider) -> String {
    let target = |mock: &MockProvider| {
        json!({
            "provider": "openai",
            "api_key": format!("bench-key-{}", mock.name()),
            "custom_host": format!("http://127.0.0.1:{}/v1", mock.port()),
            "override_params": {"model": UPSTREAM_MODEL}
        })
    };
    json!({
        "strategy": {"mode": "fallback"},
        "targets": [target(first), target(second)]
    })
    .to_string()
}

fn portkey(m: &Mocks, server_js: &Path, version: &str, preload: &Path) -> Result<Gateway, String> {
    let (proc, port) = common::start_portkey(server_js, preload, START_TIMEOUT)?;
    let ep = |model, cfg: String| Endpoint {
        authority: format!("127.0.0.1:{port}"),
        headers: vec![("x-portkey-config".into(), cfg)],
        model,
    };
    Ok(Gateway {
        key: "portkey",
        label: "Portkey gateway (x-portkey-config fallback)".into(),
        version: version.to_string(),
        notes: "one Node process (node build/start-server.js --headless), listening on \
                127.0.0.1 only; strategy fallback over two openai targets with custom_host"
            .into(),
        healthy: ep(MODEL, portkey_config(&m.a, &m.b)),
        failover: ep(FO_MODEL, portkey_config(&m.fa, &m.fb)),
        _procs: vec![Holder::Proc(proc)],
    })
}

/// One request on a fresh connection; the answering mock's name from the body.
fn probe(ep: &Endpoint) -> Result<(u16, String), String> {
    let headers: Vec<(&str, &str)> = std::iter::once(("content-type", "application/json"))
        .chain(ep.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();
    let r = request(
        "POST",
        &format!("http://{}{PATH}", ep.authority),
        &headers,
        &ep.body(),
        REQ_TIMEOUT,
    )?;
    let provider = r
        .json()
        .ok()
        .and_then(|v| v["provider"].as_str().map(str::to_string))
        .unwrap_or_default();
    Ok((r.status, provider))
}

/// The first requests: the healthy pair must answer from `a`, the failover pair from `fb`
/// (Envoy alone passes `fa`'s 503 through).
fn sanity(g: &Gateway) -> Result<(), String> {
    let (s, p) = probe(&g.healthy)?;
    if s != 200 || p != "a" {
        return Err(format!(
            "first request: status {s}, provider {p:?}; expected 200 from a"
        ));
    }
    let (s, p) = probe(&g.failover)?;
    let want: (u16, &str) = if g.key == "envoy" {
        (503, "")
    } else {
        (200, "fb")
    };
    if (s, p.as_str()) != want {
        return Err(format!(
            "first failover request: status {s}, provider {p:?}; expected {} from {:?}",
            want.0, want.1
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Run
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Results {
    rps: Vec<f64>,
    throughput: Sample,
    latency: Sample,
    failover: Sample,
    fa_hits: u64,
    fb_hits: u64,
}

fn measure(g: &Gateway, m: &Mocks, o: &Options, r: &mut Results) -> Result<(), String> {
    let _ = run_load(&g.healthy, o.conns, WARMUP);
    let t = run_load(&g.healthy, o.conns, o.throughput);
    let rps = t.ok as f64 / t.elapsed.as_secs_f64();
    r.rps.push(rps);
    let l = run_load(&g.healthy, 1, o.latency);
    let (fa0, fb0) = (m.fa.hits()?, m.fb.hits()?);
    let f = run_load(&g.failover, 1, o.failover);
    let (fa1, fb1) = (m.fa.hits()?, m.fb.hits()?);
    r.fa_hits += fa1.saturating_sub(fa0);
    r.fb_hits += fb1.saturating_sub(fb0);
    println!(
        "  {:<9} {:>8.0} req/s @{} (non-200: {}), p50 {:.2} ms p99 {:.2} ms @1, failover ok {}/{}",
        g.key,
        rps,
        o.conns,
        t.total - t.ok,
        pct_ms(&l.ok_us, 50.0).unwrap_or(f64::NAN),
        pct_ms(&l.ok_us, 99.0).unwrap_or(f64::NAN),
        f.ok,
        f.total
    );
    r.throughput.merge(t);
    r.latency.merge(l);
    r.failover.merge(f);
    Ok(())
}

fn opt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |v| json!(round3(v)))
}

fn results_json(g: &Gateway, r: &Results) -> Value {
    let fo = &r.failover;
    let per_req = |n: u64| {
        if fo.total == 0 {
            Value::Null
        } else {
            json!((n as f64 / fo.total as f64 * 1e4).round() / 1e4)
        }
    };
    json!({
        "available": true,
        "label": g.label,
        "version": g.version,
        "notes": g.notes,
        "throughput": {
            "rps_median": opt(median_of(&r.rps)),
            "rps_per_round": r.rps.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
            "requests": r.throughput.total,
            "statuses": r.throughput.statuses,
        },
        "latency_1conn": {
            "p50_ms": opt(pct_ms(&r.latency.ok_us, 50.0)),
            "p99_ms": opt(pct_ms(&r.latency.ok_us, 99.0)),
            "max_ms": opt(pct_ms(&r.latency.all_us, 100.0)),
            "requests": r.latency.total,
            "statuses": r.latency.statuses,
        },
        "failover": {
            "requests": fo.total,
            "success_ratio": if fo.total == 0 { Value::Null } else { json!(round3(fo.ok as f64 / fo.total as f64)) },
            "p50_ms": opt(pct_ms(&fo.all_us, 50.0)),
            "p50_ok_ms": opt(pct_ms(&fo.ok_us, 50.0)),
            "max_ms": opt(pct_ms(&fo.all_us, 100.0)),
            "dead_provider_attempts_per_request": per_req(r.fa_hits),
            "dead_provider_hits": r.fa_hits,
            "backup_provider_requests_per_request": per_req(r.fb_hits),
            "statuses": fo.statuses,
        }
    })
}

fn fmt_num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "–".to_string(), |x| format!("{x:.digits$}"))
}

fn markdown(report: &Value, order: &[&str]) -> String {
    let s = &report["settings"];
    let mut md = String::new();
    let _ = writeln!(md, "# market-router vs. peers (loopback)\n");
    let _ = writeln!(
        md,
        "Generated by `make bench-peers` (scripts/bench-peers.sh, tools/src/bin/bench_peers.rs). \
         Same two-provider setup behind every gateway; {} rounds, gateways alternating. \
         Throughput: {} keep-alive connections for {} s after a {} s warm-up, 200 answers only. Latency: one \
         connection for {} s. Failover: one connection for {} s while the preferred provider \
         answers every request with 503.\n",
        s["rounds"],
        s["conns"],
        s["throughput_s"],
        s["warmup_s"],
        s["latency_s"],
        s["failover_s"]
    );
    let _ = writeln!(
        md,
        "| gateway | version | req/s @{} | p50 ms @1 | p99 ms @1 | failover success | failover p50 ms | dead-provider attempts / req |",
        s["conns"]
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    let mut missing = Vec::new();
    for key in order {
        let p = &report["peers"][key];
        if p["available"] != true {
            missing.push(format!(
                "- **{key}**: not measured: {}",
                p["reason"].as_str().unwrap_or("?")
            ));
            continue;
        }
        let fo = &p["failover"];
        let success = fo["success_ratio"]
            .as_f64()
            .map_or_else(|| "–".to_string(), |x| format!("{:.1} %", x * 100.0));
        let dead = match (fo["dead_provider_hits"].as_u64(), fo["requests"].as_u64()) {
            (Some(h), Some(n)) if n > 0 => format!("{:.4} ({h}/{n})", h as f64 / n as f64),
            _ => "–".to_string(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p["label"].as_str().unwrap_or(key),
            p["version"].as_str().unwrap_or(""),
            fmt_num(&p["throughput"]["rps_median"], 0),
            fmt_num(&p["latency_1conn"]["p50_ms"], 2),
            fmt_num(&p["latency_1conn"]["p99_ms"], 2),
            success,
            fmt_num(&fo["p50_ms"], 2),
            dead,
        );
    }
    if !missing.is_empty() {
        let _ = writeln!(md, "\n{}", missing.join("\n"));
    }
    let _ = writeln!(md, "\nSettings per gateway:\n");
    for key in order {
        let p = &report["peers"][key];
        if p["available"] == true {
            let _ = writeln!(md, "- **{key}**: {}", p["notes"].as_str().unwrap_or(""));
        }
    }
    let _ = writeln!(
        md,
        "\nReading the numbers: req/s is the median over rounds; p50/p99 pool all rounds. \
         \"dead-provider attempts / req\" counts the requests the failing provider received \
         per client request (mock counter): 1.0 means every request tried it first, lower \
         means the gateway learned to skip it (circuit breaker / cooldown). The mocks answer \
         at once, so the numbers are the gateways' own overhead on this machine ({} CPUs, \
         load average {} at start) with the load generator on the same cores; compare them \
         with each other, not with other machines.",
        report["machine"]["cpus"], report["machine"]["loadavg_at_start"]
    );
    md
}

fn run() -> Result<(), String> {
    let o = parse_options()?;
    let started = Instant::now();
    let loadavg: Option<f64> = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()));
    let m = start_mocks()?;
    let mut gateways: Vec<Gateway> = Vec::new();
    let mut unavailable: BTreeMap<&'static str, String> = BTreeMap::new();
    type Make<'a> = Box<dyn Fn() -> Result<Gateway, String> + 'a>;
    let makers: Vec<(&'static str, Make)> = vec![
        ("envoy", Box::new(|| envoy_alone(&m, o.envoy_concurrency))),
        (
            "envoy_mr",
            Box::new(|| envoy_market_router(&m, o.envoy_concurrency)),
        ),
        (
            "litellm",
            Box::new(|| o.litellm.clone().and_then(|(bin, v)| litellm(&m, &bin, &v))),
        ),
        (
            "portkey",
            Box::new(|| {
                o.portkey
                    .clone()
                    .and_then(|(js, v, pre)| portkey(&m, &js, &v, &pre))
            }),
        ),
    ];
    for (key, make) in &makers {
        if o.only.as_ref().is_some_and(|l| !l.iter().any(|k| k == key)) {
            unavailable.insert(key, "skipped (not in --only)".to_string());
            continue;
        }
        match make().and_then(|g| sanity(&g).map(|()| g)) {
            Ok(g) => {
                println!("bench-peers: {key}: ready");
                gateways.push(g);
            }
            Err(e) => {
                println!("bench-peers: {key}: NOT MEASURED: {e}");
                unavailable.insert(key, e);
            }
        }
    }
    if gateways.is_empty() {
        return Err("no gateway could be started".into());
    }
    let mut results: Vec<Results> = gateways.iter().map(|_| Results::default()).collect();
    for round in 0..o.rounds {
        println!("bench-peers: round {} of {}", round + 1, o.rounds);
        for i in 0..gateways.len() {
            let idx = (i + round) % gateways.len();
            measure(&gateways[idx], &m, &o, &mut results[idx])?;
        }
    }
    let order = ["envoy", "envoy_mr", "litellm", "portkey"];
    let mut peers = serde_json::Map::new();
    for key in order {
        if let Some(i) = gateways.iter().position(|g| g.key == key) {
            peers.insert(key.into(), results_json(&gateways[i], &results[i]));
        } else {
            peers.insert(
                key.into(),
                json!({"available": false, "reason": unavailable.get(key).cloned().unwrap_or_default()}),
            );
        }
    }
    let report = json!({
        "generated_at_unix": unix_now(),
        "tool": "make bench-peers",
        "machine": {
            "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_at_start": loadavg,
        },
        "settings": {
            "rounds": o.rounds,
            "conns": o.conns,
            "throughput_s": o.throughput.as_secs_f64(),
            "warmup_s": WARMUP.as_secs_f64(),
            "latency_s": o.latency.as_secs_f64(),
            "failover_s": o.failover.as_secs_f64(),
            "envoy_concurrency": o.envoy_concurrency,
            "mock_latency_ms": 0,
            "path": PATH,
            "models": {"healthy": MODEL, "failover": FO_MODEL},
        },
        "peers": peers,
        "wall_time_s": round3(started.elapsed().as_secs_f64()),
    });
    fs::create_dir_all(&o.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", o.out_dir.display()))?;
    let json_path = o.out_dir.join("peers.json");
    let md_path = o.out_dir.join("peers.md");
    let pretty = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    fs::write(&json_path, pretty + "\n")
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    let md = markdown(&report, &order);
    fs::write(&md_path, &md).map_err(|e| format!("cannot write {}: {e}", md_path.display()))?;
    println!("\n{md}");
    println!(
        "bench-peers: wrote {} and {} in {:.0} s",
        json_path.display(),
        md_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_peers: {e}");
            ExitCode::FAILURE
        }
    }
}
