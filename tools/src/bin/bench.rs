//! `make bench`: what the market-router filter costs and how it behaves under load, measured
//! in a real Envoy on loopback. Writes `bench/results/latest.json` and `latest.md`.
//!
//! ```text
//! cargo run --release -p market-router-tools --bin bench -- [--quick] [--rounds N] [--sat-secs S] [--lat-secs S]
//!     [--failover-secs S] [--sections overhead,streaming,failover,memory] [--no-knobs] [--perf|--no-perf] [--out DIR]
//!     [--wrk PATH] [--nginx PATH] [--empty-wasm PATH]
//! ```
//!
//! 1. Overhead: one fast upstream (nginx answering a fixed chat completion, or the mock
//!    provider when nginx is missing) behind Envoy `--concurrency 1` with (a) no filter, (b) an
//!    empty proxy-wasm filter (`bench/empty-filter`), (c) market-router in route mode, (d) in
//!    dispatch mode. `wrk` measures req/s at 16 connections (and Envoy's CPU per request) and
//!    p50/p99 at one connection, for a 200-byte and a 64 KiB request, in alternating runs.
//!    Knob variants split (c)'s cost (200-byte body, saturation only): (e) (c) without holding
//!    the response, (f) (c) without a market, (g) (c) on a path it passes through, (h) the
//!    empty filter pausing as (c) does, (i) the empty filter replaying (c)'s host calls. With
//!    `perf`, one more run per main variant splits Envoy's CPU into wasm JIT code, the Envoy
//!    binary and the kernel.
//! 2. Failover under load: 8 client threads for a fixed time; provider `a` turns to 503
//!    half-way; market-router (route mode, circuit breaker) against Envoy's own retry with
//!    outlier detection over the same two mock providers.
//! 3. Memory: Envoy's RSS, tcmalloc and wasm linear memory with 0 to 10,000 market offers,
//!    after the snapshot is loaded and after traffic; time to apply a 10,000-offer refresh.
//!
//! Every process it starts is killed on drop; all traffic stays on 127.0.0.1; every loop is
//! bounded in time.

use market_router_testbed as common;

use common::{
    crate_root, envoy_bin, get, listener_head, request, wait_ready_while, wasm_path, Args, Conn,
    Envoy, EnvoyConfig, Filter, MockOpts, MockProvider, Proc, ProviderCluster, Sidecar, TempDir,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: bench [--quick] [--rounds N] [--sat-secs S] [--lat-secs S] \
[--failover-secs S] [--sections overhead,streaming,failover,memory] [--no-knobs] [--perf|--no-perf] \
[--out DIR] [--wrk PATH] [--nginx PATH] [--empty-wasm PATH]";

/// Model every benchmark request asks for.
const MODEL: &str = "gpt-4o-mini";
/// Path of the chat endpoint.
const CHAT_PATH: &str = "/v1/chat/completions";
/// Header the route takes its cluster from (sent by the client too, for the empty filter).
const CLUSTER_HEADER: &str = "x-market-router-cluster";
/// A path the filter passes through, routed to one cluster by an explicit route.
const PASSTHROUGH_PATH: &str = "/v1/passthrough";
/// Small request body, bytes.
const SMALL_BODY: usize = 200;
/// Large request body, bytes.
const LARGE_BODY: usize = 64 * 1024;
/// What the fast upstream answers: a chat completion with usage.
const UPSTREAM_ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":50,"completion_tokens":8,"total_tokens":58}}"#;
/// Timeout of one request of the Rust load loops.
const REQ_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a snapshot to show up on the route endpoint.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: error: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

struct Opts {
    quick: bool,
    rounds: usize,
    sat_secs: u64,
    lat_secs: u64,
    warmup_secs: u64,
    failover_secs: u64,
    knobs: bool,
    perf: Option<PathBuf>,
    sections: Vec<String>,
    out: PathBuf,
    wrk: Option<PathBuf>,
    nginx: Option<PathBuf>,
    empty_wasm: PathBuf,
    memory_sizes: Vec<usize>,
    refresh_reps: usize,
    args: Vec<String>,
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn parse_opts() -> Result<Opts, String> {
    let args = Args::from_env();
    let valued = [
        "--rounds",
        "--sat-secs",
        "--lat-secs",
        "--failover-secs",
        "--sections",
        "--out",
        "--wrk",
        "--nginx",
        "--empty-wasm",
    ];
    if args.flag("--help") || args.flag("-h") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    args.check_known(&valued, &["--quick", "--no-knobs", "--perf", "--no-perf"])
        .map_err(|e| format!("{e}\n{USAGE}"))?;
    let quick = args.flag("--quick");
    let rounds: usize = args.parse_or("--rounds", if quick { 1 } else { 3 })?;
    let sat_secs: u64 = args.parse_or("--sat-secs", if quick { 2 } else { 3 })?;
    let lat_secs: u64 = args.parse_or("--lat-secs", if quick { 1 } else { 2 })?;
    let failover_secs: u64 = args.parse_or("--failover-secs", if quick { 5 } else { 10 })?;
    if rounds == 0
        || rounds > 20
        || sat_secs == 0
        || lat_secs == 0
        || sat_secs > 60
        || lat_secs > 60
    {
        return Err("--rounds must be 1..20, --sat-secs and --lat-secs 1..60".into());
    }
    if !(4..=120).contains(&failover_secs) {
        return Err("--failover-secs must be 4..120".into());
    }
    let sections: Vec<String> = args
        .value("--sections")?
        .unwrap_or_else(|| "overhead,streaming,failover,memory".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &sections {
        if !["overhead", "streaming", "failover", "memory"].contains(&s.as_str()) {
            return Err(format!(
                "--sections: unknown section {s:?} (overhead, streaming, failover, memory)"
            ));
        }
    }
    let root = crate_root();
    let out = args
        .value("--out")?
        .map_or_else(|| root.join("bench").join("results"), PathBuf::from);
    let empty_wasm = args.value("--empty-wasm")?.map_or_else(
        || root.join("bench/empty-filter/target/wasm32-wasip1/release/empty_filter.wasm"),
        PathBuf::from,
    );
    Ok(Opts {
        quick,
        rounds,
        sat_secs,
        lat_secs,
        warmup_secs: 1,
        failover_secs,
        knobs: !quick && !args.flag("--no-knobs"),
        perf: if args.flag("--perf") || (!quick && !args.flag("--no-perf")) {
            which("perf")
        } else {
            None
        },
        sections,
        out,
        wrk: args
            .value("--wrk")?
            .map(PathBuf::from)
            .or_else(|| which("wrk")),
        nginx: args
            .value("--nginx")?
            .map(PathBuf::from)
            .or_else(|| which("nginx")),
        empty_wasm,
        memory_sizes: if quick {
            vec![10, 10_000]
        } else {
            vec![0, 10, 1_000, 10_000]
        },
        refresh_reps: if quick { 1 } else { 3 },
        args: std::env::args().skip(1).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

use market_router_tools::wrk::median;

/// Percentile (nearest rank) of sorted values.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round_to(x: f64, digits: i32) -> Value {
    if x.is_finite() {
        let m = 10f64.powi(digits);
        json!((x * m).round() / m)
    } else {
        Value::Null
    }
}

fn fmt_num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "n/a".into()
    }
}

fn fmt_signed(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:+.digits$}")
    } else {
        "n/a".into()
    }
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn log(msg: &str) {
    eprintln!("bench: {msg}");
}

/// A chat request body of exactly `size` bytes.
fn chat_body(size: usize) -> Result<Vec<u8>, String> {
    let head =
        format!(r#"{{"model":"{MODEL}","max_tokens":64,"messages":[{{"role":"user","content":""#);
    let tail = r#""}]}"#;
    let fill = size
        .checked_sub(head.len() + tail.len())
        .ok_or_else(|| format!("a chat body cannot be as small as {size} bytes"))?;
    let words = "lorem ipsum dolor sit amet consectetur adipiscing elit ";
    let mut content = String::with_capacity(fill);
    while content.len() < fill {
        content.push_str(words);
    }
    content.truncate(fill);
    let body = format!("{head}{content}{tail}").into_bytes();
    serde_json::from_slice::<Value>(&body).map_err(|e| format!("chat body is not JSON: {e}"))?;
    Ok(body)
}

fn admin_json(admin_port: u16, path: &str) -> Result<Value, String> {
    let r = get(
        &format!("http://127.0.0.1:{admin_port}{path}"),
        Duration::from_secs(10),
    )?;
    if r.status != 200 {
        return Err(format!("admin {path}: status {}", r.status));
    }
    r.json()
}

fn admin_text(admin_port: u16, path: &str) -> Result<String, String> {
    let r = get(
        &format!("http://127.0.0.1:{admin_port}{path}"),
        Duration::from_secs(10),
    )?;
    if r.status != 200 {
        return Err(format!("admin {path}: status {}", r.status));
    }
    Ok(r.text())
}

/// Non-zero counters and gauges from admin `/stats?filter=<re>` as name → value.
fn stats_map(admin_port: u16, filter: &str) -> Result<BTreeMap<String, u64>, String> {
    let text = admin_text(admin_port, &format!("/stats?filter={filter}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse::<u64>().ok()?))
        })
        .filter(|(_, v)| *v > 0)
        .collect())
}

/// Cumulative quantiles of one histogram from admin `/stats?format=json`.
/// Quantiles of one histogram from admin `/stats?format=json`: `field` is `cumulative` (every
/// sample so far) or `interval` (the last flush interval's samples).
fn histogram(
    admin_port: u16,
    name_part: &str,
    field: &str,
) -> Result<Option<BTreeMap<String, f64>>, String> {
    let v = admin_json(
        admin_port,
        &format!("/stats?format=json&filter={name_part}"),
    )?;
    let Some(stats) = v["stats"].as_array() else {
        return Ok(None);
    };
    for s in stats {
        let h = &s["histograms"];
        let (Some(qs), Some(computed)) = (
            h["supported_quantiles"].as_array(),
            h["computed_quantiles"].as_array(),
        ) else {
            continue;
        };
        for c in computed {
            if !c["name"].as_str().is_some_and(|n| n.contains(name_part)) {
                continue;
            }
            let mut out = BTreeMap::new();
            if let Some(vals) = c["values"].as_array() {
                for (q, val) in qs.iter().zip(vals) {
                    if let (Some(q), Some(x)) = (q.as_f64(), val[field].as_f64()) {
                        out.insert(format!("p{q}"), x);
                    }
                }
            }
            return Ok(Some(out));
        }
    }
    Ok(None)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|x| *x > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `/proc/<pid>/status` field in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Wasm linear memories of a process, from `/proc/<pid>/smaps`: V8 reserves a region of at
/// least 4 GiB per linear memory (mostly inaccessible guard space) and maps the memory's
/// current pages read-write just below it. Returns (committed kB, resident kB) per memory.
fn wasm_memories(pid: u32) -> Option<Vec<(u64, u64)>> {
    struct Map {
        lo: u64,
        hi: u64,
        perms: String,
        anon: bool,
        rss_kb: u64,
    }
    let s = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut maps: Vec<Map> = Vec::new();
    for line in s.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let range = fields
            .first()
            .and_then(|r| r.split_once('-'))
            .and_then(|(lo, hi)| {
                Some((
                    u64::from_str_radix(lo, 16).ok()?,
                    u64::from_str_radix(hi, 16).ok()?,
                ))
            });
        match range {
            Some((lo, hi)) if fields.len() >= 5 => maps.push(Map {
                lo,
                hi,
                perms: fields[1].to_string(),
                anon: fields.len() == 5,
                rss_kb: 0,
            }),
            _ => {
                if let (Some(m), Some(v)) = (maps.last_mut(), line.strip_prefix("Rss:")) {
                    m.rss_kb = v
                        .split_whitespace()
                        .next()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    let mut out = Vec::new();
    for big in maps
        .iter()
        .filter(|m| m.anon && m.perms == "---p" && m.hi - m.lo >= 4 << 30)
    {
        if let Some(mem) = maps
            .iter()
            .find(|m| m.anon && m.hi == big.lo && m.perms.starts_with("rw"))
        {
            out.push(((mem.hi - mem.lo) / 1024, mem.rss_kb));
        }
    }
    out.sort_unstable();
    Some(out)
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(crate_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn git_dirty() -> bool {
    Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(crate_root())
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty())
}

fn tool_version(bin: &Path, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Processes: nginx, an Envoy from raw YAML
// ---------------------------------------------------------------------------------------------

/// The fast upstream of the overhead runs.
enum Upstream {
    /// The process is held to keep it running; killed on drop.
    Nginx {
        _proc: Proc,
        port: u16,
    },
    Mock(MockProvider),
}

impl Upstream {
    fn port(&self) -> u16 {
        match self {
            Upstream::Nginx { port, .. } => *port,
            Upstream::Mock(m) => m.port(),
        }
    }

    fn describe(&self, nginx: Option<&Path>) -> String {
        match self {
            Upstream::Nginx { .. } => format!(
                "{} (`return 200` fixed chat completion, 1 process, access log off)",
                nginx
                    .map(|n| tool_version(n, "-v"))
                    .unwrap_or_default()
                    .replace("nginx version: ", "")
            ),
            Upstream::Mock(_) => "mock_provider --quiet (nginx not available)".into(),
        }
    }
}

/// nginx as a single foreground process (no master/worker split, so killing our child ends
/// all of it) answering every request with [`UPSTREAM_ANSWER`].
fn start_nginx(bin: &Path) -> Result<Upstream, String> {
    let mut last_err = String::new();
    for _ in 0..3 {
        let port = common::free_port();
        if port == 0 {
            return Err("no free port for nginx".into());
        }
        let dir = TempDir::new("nginx")?;
        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 4m;
    client_body_buffer_size 128k;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{UPSTREAM_ANSWER}';
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).map_err(|e| format!("cannot write nginx.conf: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let mut proc = Proc::spawn_in("nginx", &mut cmd, dir)?;
        let url = format!("http://127.0.0.1:{port}/health");
        match wait_ready_while(&url, Duration::from_secs(10), || proc.check_running()) {
            Ok(()) => return Ok(Upstream::Nginx { _proc: proc, port }),
            Err(e) => {
                let errlog = fs::read_to_string(proc.dir().join("error.log")).unwrap_or_default();
                last_err = format!("{e}; nginx error.log: {}", errlog.trim());
            }
        }
    }
    Err(format!("nginx did not start: {last_err}"))
}

// ---------------------------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct WrkOut {
    requests: u64,
    secs: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    non2xx: u64,
    errors: u64,
}

struct Wrk {
    bin: PathBuf,
    dir: TempDir,
}

impl Wrk {
    fn new(bin: PathBuf) -> Result<Wrk, String> {
        Ok(Wrk {
            bin,
            dir: TempDir::new("wrk")?,
        })
    }

    /// A Lua script posting `body` with the cluster header, printing a JSON summary line.
    fn script(&self, name: &str, body: &[u8]) -> Result<PathBuf, String> {
        let body_path = self.dir.join(&format!("{name}.json"));
        fs::write(&body_path, body).map_err(|e| format!("cannot write a body file: {e}"))?;
        let lua = format!(
            r#"wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["{CLUSTER_HEADER}"] = "provider_a"
local f = assert(io.open({path}, "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {{\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"max\":%d}}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#,
            path = Value::from(body_path.to_string_lossy().into_owned()),
        );
        let script = self.dir.join(&format!("{name}.lua"));
        fs::write(&script, &lua).map_err(|e| format!("cannot write a wrk script: {e}"))?;
        // Its twin for a client that accepts compressed answers.
        let gz = lua.replacen(
            "wrk.headers[\"content-type\"]",
            "wrk.headers[\"accept-encoding\"] = \"gzip, deflate\"\nwrk.headers[\"content-type\"]",
            1,
        );
        fs::write(Self::gzip_twin(&script), gz)
            .map_err(|e| format!("cannot write a wrk script: {e}"))?;
        Ok(script)
    }

    /// The twin of `script` that sends `accept-encoding: gzip, deflate`.
    fn gzip_twin(script: &Path) -> PathBuf {
        let stem = script
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        script.with_file_name(format!("{stem}-gz.lua"))
    }

    fn run(
        &self,
        script: &Path,
        url: &str,
        threads: u32,
        conns: u32,
        secs: u64,
    ) -> Result<WrkOut, String> {
        let v = market_router_tools::wrk::run(
            &self.bin,
            threads,
            conns,
            secs,
            script,
            url,
            "BENCHJSON ",
        )?;
        let n = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let c = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(WrkOut {
            requests: c("requests"),
            secs: n("duration_us") / 1e6,
            p50_us: n("p50"),
            p90_us: n("p90"),
            p99_us: n("p99"),
            max_us: n("max"),
            non2xx: c("status"),
            errors: c("connect") + c("read") + c("write") + c("timeout"),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Rust load loop (per-request status and latency)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Start, µs after the load began.
    start_us: u64,
    /// Latency, µs.
    lat_us: u64,
    /// HTTP status; 0 for a transport error.
    status: u16,
}

/// Runs `threads` keep-alive clients posting `body` to `authority` until `until` (or `count`
/// requests per thread), with `during` running on the calling thread meanwhile.
fn load<F: FnOnce(Instant)>(
    authority: &str,
    body: &[u8],
    threads: usize,
    until: Duration,
    count: Option<usize>,
    during: F,
) -> Vec<Sample> {
    let t0 = Instant::now();
    let end = t0 + until;
    let headers: [(&str, &str); 1] = [("content-type", "application/json")];
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut conn: Option<Conn> = None;
                    while Instant::now() < end && count.is_none_or(|c| out.len() < c) {
                        let start = Instant::now();
                        if conn.as_ref().is_none_or(|c| !c.is_open()) {
                            conn = Conn::connect(authority, REQ_TIMEOUT).ok();
                        }
                        let status = match conn.as_mut() {
                            Some(c) => match c.send("POST", CHAT_PATH, &headers, body, REQ_TIMEOUT)
                            {
                                Ok(r) => r.status,
                                Err(_) => {
                                    conn = None;
                                    0
                                }
                            },
                            None => {
                                thread::sleep(Duration::from_millis(5));
                                0
                            }
                        };
                        out.push(Sample {
                            start_us: start.duration_since(t0).as_micros() as u64,
                            lat_us: start.elapsed().as_micros() as u64,
                            status,
                        });
                    }
                    out
                })
            })
            .collect();
        during(t0);
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Market snapshots and filter configurations
// ---------------------------------------------------------------------------------------------

fn offer(provider: &str, model: &str, i: usize) -> Value {
    let ttft = 200 + (i % 29) * 15;
    json!({
        "provider": provider,
        "model": model,
        "price": {
            "input_per_mtok": 0.1 + (i % 17) as f64 * 0.05,
            "output_per_mtok": 0.4 + (i % 13) as f64 * 0.1
        },
        "latency_ms": {"ttft_p50": ttft, "ttft_p95": ttft * 3, "total_p50": ttft * 6},
        "throughput_tps": 60.0 + (i % 7) as f64 * 10.0,
        "uptime": 0.99 - (i % 5) as f64 * 0.001,
        "availability": "online",
        "provider_type": if i % 3 == 0 { "community" } else { "company" },
        "region": if i % 2 == 0 { "us-east" } else { "eu-west" },
        "context_window": 131072
    })
}

fn snapshot(offers: Vec<Value>, generated_at_ms: u64) -> Value {
    json!({"version": 1, "generated_at_ms": generated_at_ms, "offers": offers})
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn static_offer(input: f64, output: f64, ttft: u64, uptime: f64) -> Value {
    json!({"price": {"input_per_mtok": input, "output_per_mtok": output},
           "latency_ms": {"ttft_p50": ttft}, "uptime": uptime})
}

/// The overhead runs' filter configuration: two providers (both reach the fast upstream).
fn overhead_config(mode: &str, full: bool, market: bool) -> String {
    let mut c = json!({
        "providers": [
            {"name": "alpha", "cluster": "provider_a", "models": {MODEL: MODEL},
             "static_offer": static_offer(0.15, 0.6, 400, 0.995)},
            {"name": "beta", "cluster": "provider_b", "models": {MODEL: MODEL},
             "static_offer": static_offer(0.3, 1.2, 300, 0.999)}
        ],
        "routing": {"strategy": "balanced"},
        "failover": {"mode": mode}
    });
    if market {
        c["market"] = json!({"cluster": "market_sidecar", "refresh_ms": 5000});
    }
    if !full {
        c["response_headers"] = json!(false);
        c["decision_record"] = json!(false);
        c["failover"]["retry_on"] = json!(["connect-failure", "reset", "timeout", "5xx", "429"]);
    }
    c.to_string()
}

/// Polls the route endpoint until the VM serving it reports `offers` offers (and, if given,
/// that `generated_at_ms`). Returns the elapsed time.
fn wait_snapshot(
    url: &str,
    offers: usize,
    generated_at_ms: Option<u64>,
    timeout: Duration,
    poll: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last;
    loop {
        match get(url, Duration::from_secs(5)).and_then(|r| r.json()) {
            Ok(v) => {
                let snap = &v["snapshot"];
                let n = snap["offers"].as_u64().unwrap_or(0) as usize;
                let g = snap["generated_at_ms"].as_u64();
                if n == offers && generated_at_ms.is_none_or(|want| g == Some(want)) {
                    return Ok(t0.elapsed());
                }
                last = snap.to_string();
            }
            Err(e) => last = e,
        }
        if t0.elapsed() >= timeout {
            return Err(format!(
                "{url}: snapshot with {offers} offers not seen within {} s (last: {last})",
                timeout.as_secs()
            ));
        }
        thread::sleep(poll);
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Overhead
// ---------------------------------------------------------------------------------------------

struct Variant {
    key: &'static str,
    about: &'static str,
    envoy: Rc<Envoy>,
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
struct Run {
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

fn start_variant(
    key: &'static str,
    about: &'static str,
    upstream_port: u16,
    sidecar_port: u16,
    filter: Filter,
) -> Result<Variant, String> {
    start_variant_with(key, about, upstream_port, sidecar_port, filter, false)
}

/// As [`start_variant`]; `gzip`: Envoy's compressors in front, and the client accepts gzip.
fn start_variant_with(
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
fn empty_filter(opts: &Opts, knobs: &str) -> Filter {
    Filter::Wasm {
        path: opts.empty_wasm.clone(),
        config_json: knobs.into(),
        root_id: "empty".into(),
    }
}

/// One wrk run against a variant, with Envoy's CPU time per request (µs) over the run.
fn timed_run(
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

fn overhead(opts: &Opts) -> Result<Value, String> {
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
    let mut variants = vec![
        start_variant("a", "Envoy, no filter", up_port, sc, Filter::None)?,
        start_variant(
            "b",
            "Envoy + empty proxy-wasm filter",
            up_port,
            sc,
            empty_filter(opts, "{}"),
        )?,
        start_variant(
            "c",
            "market-router, route mode",
            up_port,
            sc,
            Filter::MarketRouter {
                config_json: overhead_config("route", true, true),
            },
        )?,
        start_variant(
            "d",
            "market-router, dispatch mode",
            up_port,
            sc,
            Filter::MarketRouter {
                config_json: overhead_config("dispatch", true, true),
            },
        )?,
        start_variant(
            "n",
            "market-router, envoy mode (Envoy's router makes the attempts; the module also runs as the clusters' upstream filter)",
            up_port,
            sc,
            Filter::MarketRouterEnvoy {
                config_json: overhead_config("envoy", true, true),
            },
        )?,
    ];
    if opts.knobs {
        let mut e = start_variant(
            "e",
            "knob: (c) lean: response_headers and decision_record off, no malformed check (so the response is not held)",
            up_port,
            sc,
            Filter::MarketRouter {
                config_json: overhead_config("route", false, true),
            },
        )?;
        e.provider_header = false;
        e.knob = true;
        e.knob_latency = true;
        let mut f = start_variant(
            "f",
            "knob: (c) without a market sidecar (static offers)",
            up_port,
            sc,
            Filter::MarketRouter {
                config_json: overhead_config("route", true, false),
            },
        )?;
        f.offers = None;
        f.knob = true;
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
        let g = Variant {
            key: "g",
            about: "knob: (c)'s Envoy, POST to a path the filter passes through (reads the headers, routes nothing)",
            envoy: Rc::clone(&variants[2].envoy),
            path: PASSTHROUGH_PATH,
            market_router: false,
            provider_header: false,
            offers: None,
            knob: true,
            knob_latency: false,
            gzip: false,
        };
        variants.extend([e, f, g]);
        // What compression costs: the client accepts gzip, Envoy's compressors encode the
        // answer (the filter asks the upstream for identity).
        for (key, about, filter) in [
            (
                "m",
                "knob: (a) with Envoy's compressors and a gzip-accepting client (httpx's default accept-encoding)",
                Filter::None,
            ),
            (
                "n",
                "knob: (c) with Envoy's compressors in front and a gzip-accepting client (the shipped configuration)",
                Filter::MarketRouter {
                    config_json: overhead_config("route", true, true),
                },
            ),
        ] {
            let mut v = start_variant_with(key, about, up_port, sc, filter, true)?;
            v.knob = true;
            v.offers = v.market_router.then_some(2);
            variants.push(v);
        }
        for (key, about, knobs, latency, provider_header) in empty_knobs {
            let mut v = start_variant(key, about, up_port, sc, empty_filter(opts, knobs))?;
            v.knob = true;
            v.knob_latency = latency;
            v.provider_header = provider_header;
            variants.push(v);
        }
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
    let mut decision_by_body = serde_json::Map::new();
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
                            decision_by_body.insert(format!("{}/{body}", v.key), json!(h));
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
    let mut cpu_split = serde_json::Map::new();
    if let Some(perf) = &opts.perf {
        for v in variants.iter().filter(|v| !v.knob) {
            log(&format!("overhead: perf profile of variant {}", v.key));
            let split = perf_profile(perf, &wrk, v, &scripts[0].1, opts.sat_secs, ticks)
                .unwrap_or_else(|e| json!({"error": e}));
            cpu_split.insert(v.key.into(), split);
        }
    }

    // Filter-side numbers after the runs (stats flush every second).
    thread::sleep(Duration::from_millis(1500));
    let mut decision = serde_json::Map::new();
    let mut counters = serde_json::Map::new();
    for v in variants.iter().filter(|v| v.market_router) {
        let h = histogram(v.envoy.admin_port(), "decision_us", "cumulative")?;
        decision.insert(v.key.into(), json!(h));
        let c = stats_map(v.envoy.admin_port(), "market_router")?;
        counters.insert(v.key.into(), json!(c));
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
    }
    let mut wasm_stats = serde_json::Map::new();
    for v in variants.iter().filter(|v| v.key != "g") {
        wasm_stats.insert(
            v.key.into(),
            json!(stats_map(v.envoy.admin_port(), "^wasm[.]")?),
        );
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
    let mut comparisons = serde_json::Map::new();
    for (body, _) in &scripts {
        for v in &variants {
            if get_runs(body, "sat", v.key).is_empty() {
                continue;
            }
            table.push(json!({
                "body": body,
                "variant": v.key,
                "about": v.about,
                "rps": round_to(med(body, "sat", v.key, &|r| r.rps()), 0),
                "cpu_us_per_req": round_to(med(body, "sat", v.key, &|r| r.cpu_us_per_req), 1),
                "sat_p50_us": round_to(med(body, "sat", v.key, &|r| r.out.p50_us), 0),
                "sat_p99_us": round_to(med(body, "sat", v.key, &|r| r.out.p99_us), 0),
                "p50_us": round_to(med(body, "lat", v.key, &|r| r.out.p50_us), 0),
                "p99_us": round_to(med(body, "lat", v.key, &|r| r.out.p99_us), 0),
            }));
        }
        let mut cmp = serde_json::Map::new();
        let pairs: &[(&str, &str)] = if *body == "small" && opts.knobs {
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
        };
        for (x, y) in pairs {
            cmp.insert(
                format!("{x}/{y}"),
                json!({
                    "rps_ratio": round_to(paired(body, "sat", x, y, &ratio), 3),
                    "added_p50_us": round_to(paired(body, "lat", x, y, &d50), 1),
                    "added_p99_us": round_to(paired(body, "lat", x, y, &d99), 1),
                    "added_cpu_us_per_req": round_to(paired(body, "sat", x, y, &dcpu), 1),
                }),
            );
        }
        comparisons.insert((*body).into(), Value::Object(cmp));
    }

    let c_b = paired("small", "sat", "c", "b", &ratio);
    let c_a_p50 = paired("small", "lat", "c", "a", &d50);
    let floor_b = paired("small", "sat", "j", "b", &ratio);
    let floor_a_p50 = paired("small", "lat", "j", "a", &d50);
    let n_b = paired("small", "sat", "n", "b", &ratio);
    let n_b_large = paired("large", "sat", "n", "b", &ratio);
    let goals = json!([
        {"goal": "envoy-mode throughput ≥ 0.8× the empty wasm filter's (n/b, 200-byte body, 16 connections)",
         "value": round_to(n_b, 3), "target": 0.8, "pass": n_b >= 0.8},
        {"goal": "envoy-mode throughput ≥ 0.8× the empty wasm filter's (n/b, 64 KiB body, 16 connections)",
         "value": round_to(n_b_large, 3), "target": 0.8, "pass": n_b_large >= 0.8},
        {"goal": "route-mode throughput ≥ 0.95× the empty wasm filter's (c/b, 200-byte body, 16 connections)",
         "value": round_to(c_b, 3), "target": 0.95, "pass": c_b >= 0.95},
        {"goal": "route mode adds ≤ 20 µs p50 over Envoy without a filter (c−a, 200-byte body, 1 connection)",
         "value": round_to(c_a_p50, 1), "target": 20, "pass": c_a_p50 <= 20.0},
    ]);
    // What the least body-routing filter (knob j) measures against the same goals.
    let floor = (opts.knobs).then(|| {
        json!({
            "rps_ratio_vs_b": round_to(floor_b, 3),
            "added_p50_us_vs_a": round_to(floor_a_p50, 1),
        })
    });

    let runs_json: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "round": r.round + 1, "body": r.body, "kind": r.kind, "variant": r.variant,
                "requests": r.out.requests, "secs": round_to(r.out.secs, 3),
                "rps": round_to(r.rps(), 0), "p50_us": r.out.p50_us, "p90_us": r.out.p90_us,
                "p99_us": r.out.p99_us, "max_us": r.out.max_us,
                "envoy_cpu_us_per_req": round_to(r.cpu_us_per_req, 1),
            })
        })
        .collect();
    let variants_json: Vec<Value> = variants
        .iter()
        .map(|v| json!({"key": v.key, "about": v.about}))
        .collect();
    Ok(json!({
        "upstream": upstream.describe(opts.nginx.as_deref()),
        "load_generator": tool_version(&wrk_bin, "-v")
            .split(" [")
            .next()
            .unwrap_or("wrk")
            .to_string(),
        "envoy_concurrency": 1,
        "bodies": {"small": SMALL_BODY, "large": LARGE_BODY},
        "saturation": {"connections": 16, "threads": 2, "secs": opts.sat_secs},
        "latency": {"connections": 1, "threads": 1, "secs": opts.lat_secs},
        "rounds": opts.rounds,
        "variants": variants_json,
        "table": table,
        "comparisons": comparisons,
        "goals": goals,
        "floor": floor,
        "decision_us": decision,
        "decision_us_by_body": decision_by_body,
        "cpu_split": cpu_split,
        "filter_counters": counters,
        "wasm_stats": wasm_stats,
        "runs": runs_json,
    }))
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
) -> Result<Value, String> {
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
    let groups_json: serde_json::Map<String, Value> = groups
        .iter()
        .map(|(k, share)| {
            (
                (*k).to_string(),
                json!({"share_pct": round_to(*share, 1), "cpu_us_per_req": round_to(share / 100.0 * cpu_us, 1)}),
            )
        })
        .collect();
    Ok(json!({
        "requests": out.requests,
        "cpu_us_per_req": round_to(cpu_us, 1),
        "samples": by_dso.iter().map(|d| d.2).sum::<u64>(),
        "groups": groups_json,
        "by_dso": by_dso.iter().take(8).map(|(d, s, n)| json!({"dso": d, "share_pct": s, "samples": n})).collect::<Vec<_>>(),
    }))
}

// ---------------------------------------------------------------------------------------------
// 4. Streaming
// ---------------------------------------------------------------------------------------------

/// SSE events of the mock's streamed answer arrive this far apart, ms: one body chunk each.
const STREAM_CHUNK_MS: u64 = 1;

/// A streamed chat request, asking for the final usage chunk or not.
fn stream_body(include_usage: bool) -> Vec<u8> {
    json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": include_usage},
           "max_tokens": 64, "messages": [{"role": "user", "content": "a short streamed answer"}]})
    .to_string()
    .into_bytes()
}

/// What a streamed answer costs: Envoy alone, the empty filter and route mode in front of the
/// mock provider streaming its answer one event per body chunk.
fn streaming(opts: &Opts) -> Result<Value, String> {
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
            empty_filter(opts, "{}"),
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
    let mut comparisons = serde_json::Map::new();
    for (kind, _) in &scripts {
        let series = |v: &str| runs.get(&(*kind, v)).cloned().unwrap_or_default();
        for v in &variants {
            let r = series(v.key);
            table.push(json!({
                "kind": kind, "variant": v.key,
                "rps": round_to(median(&r.iter().map(|x| x.0).collect::<Vec<_>>()), 0),
                "cpu_us_per_req": round_to(median(&r.iter().map(|x| x.1).collect::<Vec<_>>()), 1),
            }));
        }
        let mut cmp = serde_json::Map::new();
        for (x, y) in [("b", "a"), ("c", "a"), ("c", "b"), ("n", "b"), ("n", "c")] {
            let (sx, sy) = (series(x), series(y));
            let added: Vec<f64> = sx.iter().zip(&sy).map(|(p, q)| p.1 - q.1).collect();
            let cpu_ratio: Vec<f64> = sx.iter().zip(&sy).map(|(p, q)| q.1 / p.1).collect();
            cmp.insert(
                format!("{x}/{y}"),
                json!({"added_cpu_us_per_req": round_to(median(&added), 1),
                       "cpu_capacity_ratio": round_to(median(&cpu_ratio), 3)}),
            );
        }
        comparisons.insert((*kind).into(), Value::Object(cmp));
    }
    Ok(json!({
        "upstream": format!("mock provider (crates/testbed/src/bin/mock_provider.rs), {events} SSE events per answer (one more with the usage chunk), {STREAM_CHUNK_MS} ms apart"),
        "events_per_answer": events,
        "connections": 16,
        "secs": opts.sat_secs,
        "rounds": opts.rounds,
        "variants": variants.iter().map(|v| json!({"key": v.key, "about": v.about})).collect::<Vec<_>>(),
        "table": table,
        "comparisons": comparisons,
    }))
}

/// `- **key**: about` for each variant.
fn variant_list(md: &mut String, variants: &Value) {
    for v in variants.as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "- **{}**: {}",
            v["key"].as_str().unwrap_or(""),
            v["about"].as_str().unwrap_or("")
        );
    }
}

fn streaming_markdown(st: &Value) -> String {
    let mut md = String::new();
    if st.is_null() {
        return md;
    }
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(md, "\n## 4. Streaming\n");
    let _ = writeln!(
        md,
        "Upstream: {}. Load: wrk, 16 connections, {} s runs, variants alternating, rounds: {}; medians (comparisons: the median of each round's paired difference or ratio). Requests stream (`stream: true`) with `stream_options.include_usage` true (usage: the filter reads the chunks to find the final usage chunk and prices the answer from it) or false (plain: no chunk is read and the cost stays the estimate). The mock paces the events, so req/s is the same for every variant; what differs is Envoy's CPU per streamed request.\n",
        st["upstream"].as_str().unwrap_or(""),
        st["secs"],
        st["rounds"],
    );
    variant_list(&mut md, &st["variants"]);
    let _ = writeln!(
        md,
        "\n| request | variant | req/s | Envoy CPU µs/req |\n|---|---|---:|---:|"
    );
    for r in st["table"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r["kind"].as_str().unwrap_or(""),
            r["variant"].as_str().unwrap_or(""),
            fmt_num(f(&r["rps"]), 0),
            fmt_num(f(&r["cpu_us_per_req"]), 1),
        );
    }
    let _ = writeln!(
        md,
        "\n| request | pair | added Envoy CPU µs/req | CPU capacity ratio (requests per CPU second, x over y) |\n|---|---|---:|---:|"
    );
    if let Some(m) = st["comparisons"].as_object() {
        for (kind, c) in m {
            for (pair, v) in c.as_object().into_iter().flatten() {
                let (x, y) = pair.split_once('/').unwrap_or((pair, ""));
                let _ = writeln!(
                    md,
                    "| {kind} | {x} vs {y} | {} | {} |",
                    fmt_signed(f(&v["added_cpu_us_per_req"]), 1),
                    fmt_num(f(&v["cpu_capacity_ratio"]), 3),
                );
            }
        }
    }
    md
}

// ---------------------------------------------------------------------------------------------
// 2. Failover under load
// ---------------------------------------------------------------------------------------------

fn failover_mr_config() -> String {
    failover_mr_config_in("route")
}

fn failover_mr_config_in(mode: &str) -> String {
    json!({
        "providers": [
            {"name": "a", "cluster": "provider_a", "models": {MODEL: MODEL},
             "static_offer": static_offer(0.1, 0.4, 300, 0.99)},
            {"name": "b", "cluster": "provider_b", "models": {MODEL: MODEL},
             "static_offer": static_offer(0.2, 0.8, 300, 0.99)}
        ],
        "routing": {"strategy": "cheapest"},
        "failover": {"mode": mode, "circuit": {"failure_threshold": 3, "cooldown_ms": 5000}}
    })
    .to_string()
}

/// Envoy's own answer to the same problem: one cluster, `a` at priority 0 and `b` at
/// priority 1, outlier detection on consecutive 5xx, and route retries on 5xx to another host
/// and priority.
fn failover_envoy_yaml(a: u16, b: u16) -> String {
    listener_head(0, 0)
        + &format!(
            r#"          route_config:
            name: local_route
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: providers
                  timeout: 30s
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 2
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 3
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: providers
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: providers
      endpoints:
      - priority: 0
        lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {a} }}
      - priority: 1
        lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {b} }}
    outlier_detection:
      consecutive_5xx: 3
      enforcing_consecutive_5xx: 100
      interval: 1s
      base_ejection_time: 5s
      max_ejection_percent: 100
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http_protocol_options: {{}}
"#
        )
}

struct Window {
    requests: usize,
    ok: usize,
    rps: f64,
    p50_us: u64,
    p99_us: u64,
}

fn window(samples: &[Sample], from_us: u64, to_us: u64) -> Window {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start_us >= from_us && s.start_us < to_us)
        .collect();
    let mut lats: Vec<u64> = inside.iter().map(|s| s.lat_us).collect();
    lats.sort_unstable();
    let secs = (to_us.saturating_sub(from_us)) as f64 / 1e6;
    Window {
        requests: inside.len(),
        ok: inside.iter().filter(|s| s.status == 200).count(),
        rps: if secs > 0.0 {
            inside.len() as f64 / secs
        } else {
            f64::NAN
        },
        p50_us: pct(&lats, 50.0),
        p99_us: pct(&lats, 99.0),
    }
}

fn failover_scenario(name: &str, opts: &Opts, body: &[u8], rtt_us: u64) -> Result<Value, String> {
    let quiet = MockOpts {
        quiet: true,
        ..MockOpts::default()
    };
    let a = MockProvider::start("a", &quiet)?;
    let b = MockProvider::start("b", &quiet)?;
    let concurrency = 2;
    let (_mr, _raw, port, admin_port) = if name.starts_with("market-router") {
        let cfg = EnvoyConfig::new()
            .provider(ProviderCluster::new("provider_a", a.port()))
            .provider(ProviderCluster::new("provider_b", b.port()));
        let cfg = if name == "market-router-envoy" {
            cfg.market_router_envoy(&failover_mr_config_in("envoy"))
        } else {
            cfg.market_router(&failover_mr_config())
        };
        let cfg = cfg
            .log_level("warning")
            .component_log_level("")
            .stats_flush_interval(Duration::from_secs(1));
        let e = Envoy::start(&cfg, concurrency)?;
        let (p, ap) = (e.port(), e.admin_port());
        (Some(e), None, p, ap)
    } else {
        let e = Envoy::start_bootstrap(&failover_envoy_yaml(a.port(), b.port()), concurrency)?;
        let (p, ap) = (e.port(), e.admin_port());
        (None, Some(e), p, ap)
    };
    let authority = format!("127.0.0.1:{port}");
    // Pre-flight: a serves while healthy.
    let r = request(
        "POST",
        &format!("http://{authority}{CHAT_PATH}"),
        &[("content-type", "application/json")],
        body,
        REQ_TIMEOUT,
    )?;
    if r.status != 200 || r.header("x-mock-provider") != Some("a") {
        return Err(format!(
            "{name}: pre-flight answered {} from {:?}",
            r.status,
            r.header("x-mock-provider")
        ));
    }

    let total = Duration::from_secs(opts.failover_secs);
    let switch = total / 2;
    let threads = 8;
    // Warm-up (V8 tiers the filter up, connections open), not measured.
    let warm = load(
        &authority,
        body,
        threads,
        Duration::from_secs(opts.warmup_secs * 2),
        None,
        |_| {},
    );
    if warm.iter().any(|s| s.status != 200) {
        return Err(format!("{name}: requests failed during the warm-up"));
    }
    a.reset()?;
    b.reset()?;
    let mut switch_err: Option<String> = None;
    let mut switched_at_us = 0u64;
    log(&format!(
        "failover: {name}: {threads} connections for {} s, provider a answers 503 from t={} s",
        total.as_secs(),
        switch.as_secs_f64()
    ));
    let samples = load(&authority, body, threads, total, None, |t0| {
        thread::sleep(switch.saturating_sub(t0.elapsed()));
        if let Err(e) = a.set_behavior(&json!({"status": 503})) {
            switch_err = Some(e);
        }
        switched_at_us = t0.elapsed().as_micros() as u64;
    });
    if let Some(e) = switch_err {
        return Err(format!("{name}: could not switch provider a: {e}"));
    }
    // Requests started per 500 ms, to see load bursts from elsewhere on the machine.
    let slots = (total.as_millis() / 500) as usize;
    let mut timeline = vec![0usize; slots];
    for x in &samples {
        if let Some(slot) = timeline.get_mut((x.start_us / 500_000) as usize) {
            *slot += 1;
        }
    }
    // Every 503 the mock answered went to a request during the outage: the dead attempts.
    let a_stats = a.stats()?;
    let dead = a_stats["by_status"]["503"].as_u64().unwrap_or(0);
    let a_end = a.hits()?;
    let b_end = b.hits()?;
    let end_us = total.as_micros() as u64;
    let healthy = window(&samples, 500_000, switched_at_us);
    let outage = window(&samples, switched_at_us, end_us);
    let all = window(&samples, 0, u64::MAX);
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for s in &samples {
        *by_status.entry(s.status.to_string()).or_insert(0) += 1;
    }
    let dead_per_req = dead as f64 / outage.requests.max(1) as f64;
    let success = all.ok as f64 / all.requests.max(1) as f64;
    let share = outage.rps / healthy.rps;
    let p99_budget = healthy.p99_us + rtt_us + 5_000;
    let counters =
        stats_map(admin_port, "market_router|outlier|retry|upstream_rq_5xx").unwrap_or_default();
    Ok(json!({
        "name": name,
        "envoy_concurrency": concurrency,
        "connections": threads,
        "secs": total.as_secs(),
        "switch_at_s": round_to(switched_at_us as f64 / 1e6, 3),
        "requests": all.requests,
        "by_status": by_status,
        "success_ratio": round_to(success, 5),
        "outage_requests": outage.requests,
        "outage_success_ratio": round_to(outage.ok as f64 / outage.requests.max(1) as f64, 5),
        "dead_attempts": dead,
        "dead_attempts_per_request": round_to(dead_per_req, 5),
        "a_hits": a_end,
        "b_hits": b_end,
        "healthy_rps": round_to(healthy.rps, 0),
        "outage_rps": round_to(outage.rps, 0),
        "outage_throughput_share": round_to(share, 3),
        "healthy_p50_us": healthy.p50_us,
        "healthy_p99_us": healthy.p99_us,
        "outage_p50_us": outage.p50_us,
        "outage_p99_us": outage.p99_us,
        "p99_us": all.p99_us,
        "p99_budget_us": p99_budget,
        "requests_per_500ms": timeline,
        "counters": counters,
        "goals": {
            "success_100pct": success >= 1.0,
            "dead_attempts_le_0_01": dead_per_req <= 0.01,
            "throughput_ge_0_9": share >= 0.9,
            "p99_within_budget": outage.p99_us <= p99_budget,
        },
    }))
}

fn failover(opts: &Opts) -> Result<Value, String> {
    let body = chat_body(SMALL_BODY)?;
    // One upstream round trip, measured directly against a mock.
    let probe = MockProvider::start(
        "rtt",
        &MockOpts {
            quiet: true,
            ..MockOpts::default()
        },
    )?;
    let samples = load(
        &format!("127.0.0.1:{}", probe.port()),
        &body,
        1,
        Duration::from_secs(5),
        Some(500),
        |_| {},
    );
    drop(probe);
    let mut lats: Vec<u64> = samples
        .iter()
        .filter(|s| s.status == 200)
        .map(|s| s.lat_us)
        .collect();
    lats.sort_unstable();
    if lats.len() < 100 {
        return Err("could not measure the mock's round trip".into());
    }
    let rtt = pct(&lats, 50.0);
    let mr = failover_scenario("market-router", opts, &body, rtt)?;
    let native = failover_scenario("market-router-envoy", opts, &body, rtt)?;
    let envoy = failover_scenario("envoy-retry", opts, &body, rtt)?;
    Ok(json!({
        "market_router_envoy_mode": native,
        "upstream": "mock_provider --quiet (a and b), behaviour switched at runtime",
        "upstream_rtt_p50_us": rtt,
        "market_router": mr,
        "envoy_retry": envoy,
        "market_router_config": serde_json::from_str::<Value>(&failover_mr_config()).unwrap_or(Value::Null),
        "envoy_retry_setup": "one cluster, a at priority 0 and b at priority 1; outlier_detection consecutive_5xx 3, base_ejection_time 5s; retry_on 5xx, num_retries 2, previous_hosts + previous_priorities (default retry back-off)",
    }))
}

// ---------------------------------------------------------------------------------------------
// 3. Memory
// ---------------------------------------------------------------------------------------------

const MEM_PROVIDERS: usize = 10;

fn memory_config() -> String {
    let providers: Vec<Value> = (0..MEM_PROVIDERS)
        .map(|i| {
            json!({"name": format!("p{i}"), "cluster": format!("provider_p{i}"),
                   "models": {MODEL: MODEL},
                   "static_offer": static_offer(0.2 + i as f64 * 0.01, 0.8, 400, 0.99)})
        })
        .collect();
    json!({
        "providers": providers,
        "market": {"cluster": "market_sidecar", "refresh_ms": 1000, "timeout_ms": 5000},
        "routing": {"strategy": "balanced"}
    })
    .to_string()
}

/// `n` offers: every provider offers `n / 10` models, the first of them the benchmark model.
fn memory_snapshot(n: usize, generated_at_ms: u64) -> Value {
    let per = n / MEM_PROVIDERS;
    let mut offers = Vec::with_capacity(n);
    for m in 0..per {
        let model = if m == 0 {
            MODEL.to_string()
        } else {
            format!("bench-model-{m:05}")
        };
        for p in 0..MEM_PROVIDERS {
            offers.push(offer(&format!("p{p}"), &model, m * MEM_PROVIDERS + p));
        }
    }
    snapshot(offers, generated_at_ms)
}

fn measure_memory(envoy: &Envoy) -> Result<Value, String> {
    let pid = envoy.pid();
    let mem = admin_json(envoy.admin_port(), "/memory").unwrap_or(Value::Null);
    let mib = |v: &Value| -> Value {
        v.as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .or_else(|| v.as_f64())
            .map_or(Value::Null, |b| round_to(b / 1048576.0, 1))
    };
    let memories = wasm_memories(pid).unwrap_or_default();
    let wasm_size_kb: u64 = memories.iter().map(|m| m.0).sum();
    let wasm_rss_kb: u64 = memories.iter().map(|m| m.1).sum();
    Ok(json!({
        "rss_mib": status_kb(pid, "VmRSS").map(|k| round_to(k as f64 / 1024.0, 1)),
        "hwm_mib": status_kb(pid, "VmHWM").map(|k| round_to(k as f64 / 1024.0, 1)),
        "tcmalloc_allocated_mib": mib(&mem["allocated"]),
        "tcmalloc_heap_mib": mib(&mem["heap_size"]),
        "wasm_linear_memories": memories.len(),
        "wasm_linear_per_vm_mib": memories
            .iter()
            .map(|(size, rss)| json!({"size": round_to(*size as f64 / 1024.0, 2), "resident": round_to(*rss as f64 / 1024.0, 2)}))
            .collect::<Vec<_>>(),
        "wasm_linear_size_mib": round_to(wasm_size_kb as f64 / 1024.0, 2),
        "wasm_linear_resident_mib": round_to(wasm_rss_kb as f64 / 1024.0, 2),
    }))
}

fn memory(opts: &Opts) -> Result<Value, String> {
    let up = MockProvider::start(
        "mem",
        &MockOpts {
            quiet: true,
            ..MockOpts::default()
        },
    )?;
    let body = chat_body(SMALL_BODY)?;
    let concurrency = 2;
    let max_n = opts.memory_sizes.iter().copied().max().unwrap_or(0);
    let mut rows = Vec::new();
    let mut refresh = Value::Null;
    let mut wasm_stat_names: Vec<String> = Vec::new();
    for &n in &opts.memory_sizes {
        let dir = TempDir::new("bench-memory")?;
        let snap_path = dir.join("snapshot.json");
        let generated = now_ms();
        let snap_text = memory_snapshot(n, generated).to_string();
        fs::write(&snap_path, &snap_text).map_err(|e| format!("cannot write snapshot: {e}"))?;
        let sidecar = Sidecar::start(&snap_path)?;
        let mut cfg = EnvoyConfig::new()
            .sidecar("market_sidecar", sidecar.port())
            .market_router(&memory_config())
            .log_level("warning")
            // Info: the filter logs each stored snapshot (and nothing per request).
            .component_log_level("wasm:info");
        for i in 0..MEM_PROVIDERS {
            cfg = cfg.provider(ProviderCluster::new(&format!("provider_p{i}"), up.port()));
        }
        let envoy = Envoy::start(&cfg, concurrency)?;
        let route_url = envoy.url(&format!("/market-router/v1/route?model={MODEL}"));
        let loaded = wait_snapshot(
            &route_url,
            n,
            Some(generated),
            LOAD_TIMEOUT,
            Duration::from_millis(20),
        )?;
        // Both workers: each decodes the shared snapshot on its next tick (250 ms here).
        for _ in 0..5 {
            wait_snapshot(
                &route_url,
                n,
                Some(generated),
                LOAD_TIMEOUT,
                Duration::from_millis(20),
            )?;
        }
        thread::sleep(Duration::from_millis(600));
        let after_load = measure_memory(&envoy)?;
        let samples = load(
            &format!("127.0.0.1:{}", envoy.port()),
            &body,
            2,
            Duration::from_secs(20),
            Some(if opts.quick { 250 } else { 1000 }),
            |_| {},
        );
        let ok = samples.iter().filter(|s| s.status == 200).count();
        if ok != samples.len() || ok == 0 {
            return Err(format!(
                "memory, {n} offers: {} of {} requests failed",
                samples.len() - ok,
                samples.len()
            ));
        }
        let after_traffic = measure_memory(&envoy)?;
        if wasm_stat_names.is_empty() {
            wasm_stat_names = stats_map(envoy.admin_port(), "^wasm[.]")?
                .into_iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
        }
        log(&format!(
            "memory: {n:>5} offers: loaded after {} ms; after load {after_load}; after {} requests {after_traffic}",
            loaded.as_millis(),
            samples.len()
        ));
        let mut row = json!({
            "offers": n,
            "snapshot_json_bytes": snap_text.len(),
            "loaded_after_ms": loaded.as_millis() as u64,
            "after_load": after_load,
            "requests": samples.len(),
            "after_traffic": after_traffic,
        });
        if n == max_n && n > 0 && opts.refresh_reps > 0 {
            refresh = measure_refresh(&envoy, &sidecar, &snap_path, n, opts.refresh_reps)?;
            row["after_refreshes"] = measure_memory(&envoy)?;
        }
        rows.push(row);
    }
    Ok(json!({
        "envoy_concurrency": concurrency,
        "providers": MEM_PROVIDERS,
        "rows": rows,
        "refresh": refresh,
        "wasm_stats": wasm_stat_names,
        "notes": "RSS from /proc/<pid>/status; tcmalloc from admin /memory; wasm linear memory = resident part of the ≥4 GiB anonymous reservations V8 makes per wasm memory (one per VM: the main thread's plus one per worker) in /proc/<pid>/smaps",
    }))
}

/// Replaces the sidecar's snapshot with a new generation of `n` offers and times, per try,
/// from the sidecar receiving the filter's fetch to the route endpoint showing the new
/// generation (polled every 5 ms).
fn measure_refresh(
    envoy: &Envoy,
    sidecar: &Sidecar,
    path: &Path,
    n: usize,
    reps: usize,
) -> Result<Value, String> {
    let route_url = envoy.url(&format!("/market-router/v1/route?model={MODEL}"));
    let mut served_to_visible = Vec::new();
    let mut write_to_visible = Vec::new();
    let mut served_to_stored = Vec::new();
    for rep in 0..reps {
        let generated = now_ms() + rep as u64;
        let text = memory_snapshot(n, generated).to_string();
        let hits0 = sidecar.hits()?;
        fs::write(path, &text).map_err(|e| format!("cannot rewrite snapshot: {e}"))?;
        let t_write = Instant::now();
        let mut t_served: Option<Instant> = None;
        let mut wall_served: u64 = 0;
        let deadline = t_write + Duration::from_secs(15);
        loop {
            if t_served.is_none() && sidecar.hits()? > hits0 {
                t_served = Some(Instant::now());
                wall_served = now_ms();
            }
            if t_served.is_some() {
                let seen = get(&route_url, Duration::from_secs(5))
                    .and_then(|r| r.json())
                    .ok()
                    .and_then(|v| v["snapshot"]["generated_at_ms"].as_u64());
                if seen == Some(generated) {
                    let now = Instant::now();
                    if let Some(ts) = t_served {
                        served_to_visible.push(now.duration_since(ts).as_secs_f64() * 1e3);
                    }
                    write_to_visible.push(now.duration_since(t_write).as_secs_f64() * 1e3);
                    // The fetching VM logs when it has validated and stored the snapshot.
                    let needle = format!("generated_at_ms {generated}");
                    if let Some(stored) = envoy
                        .log_contents()
                        .lines()
                        .find(|l| l.contains("market snapshot updated") && l.contains(&needle))
                        .and_then(log_time_ms)
                    {
                        let d = stored as f64 - wall_served as f64;
                        if d.abs() < 60_000.0 {
                            served_to_stored.push(d);
                        }
                    }
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "refresh {rep}: the new {n}-offer snapshot did not show up within 15 s"
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    log(&format!(
        "memory: refresh of {n} offers: sidecar fetch → visible {served_to_visible:?} ms"
    ));
    Ok(json!({
        "offers": n,
        "tries": reps,
        "fetch_to_visible_ms": served_to_visible.iter().map(|x| round_to(*x, 0)).collect::<Vec<_>>(),
        "fetch_to_visible_ms_median": round_to(median(&served_to_visible), 0),
        "fetch_to_stored_ms": served_to_stored.iter().map(|x| round_to(*x, 0)).collect::<Vec<_>>(),
        "fetch_to_stored_ms_median": round_to(median(&served_to_stored), 0),
        "file_write_to_visible_ms": write_to_visible.iter().map(|x| round_to(*x, 0)).collect::<Vec<_>>(),
        "note": "fetch = the sidecar counted the filter's request (polled every 5 ms); stored = the timestamp of the filter's `market snapshot updated` log line (transfer, validation, encoding and the shared-data write, ms resolution); visible = the route endpoint reports the new generated_at_ms (VMs that did not fetch decode it on their next check: each tick, every refresh_ms/4 = 250 ms here, and requests, at most every 250 ms); write → visible adds the wait for the next refresh slot (refresh_ms 1000)",
    }))
}

/// Unix ms of an Envoy log line's `[YYYY-MM-DD HH:MM:SS.mmm]` prefix, read as UTC.
fn log_time_ms(line: &str) -> Option<u64> {
    let stamp = line.strip_prefix('[')?.get(..23)?;
    let num = |r: std::ops::Range<usize>| stamp.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = ((days * 24 + hh) * 60 + mm) * 60 + ss;
    u64::try_from(t * 1000 + ms).ok()
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn markdown(meta: &Value, overhead: &Value, failover: &Value, memory: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# market-router benchmark\n");
    let _ = writeln!(
        md,
        "{} · commit `{}`{} · Envoy {} · {} cores, shared machine · loopback only · `make bench{}`\n",
        meta["date"].as_str().unwrap_or(""),
        meta["commit"].as_str().unwrap_or(""),
        if meta["dirty"] == true { " (with uncommitted changes)" } else { "" },
        meta["envoy"].as_str().unwrap_or(""),
        meta["cores"],
        if meta["quick"] == true { " ARGS=--quick" } else { "" },
    );
    let _ = writeln!(
        md,
        "Load average (1/5/15 min) {} at the start, {} at the end: other work on this machine adds noise; runs alternate so it hits all variants alike.\n",
        meta["loadavg_start"].as_str().unwrap_or(""),
        meta["loadavg_end"].as_str().unwrap_or(""),
    );
    if !overhead.is_null() {
        let _ = writeln!(md, "## 1. Overhead\n");
        let _ = writeln!(
            md,
            "Upstream: {}. Load: {}, req/s at {} connections ({} threads, {} s runs), latency at 1 connection ({} s runs). Envoy `--concurrency 1`, wasm log level warning. {} rounds of alternating runs ({}); the table shows medians, the comparisons the median over rounds of each round's paired ratio or difference. Envoy CPU µs/req: Envoy's user+system CPU time during a saturation run over its requests. Knob variants run on the 200-byte body, at saturation only except (e) and (j), which also run at one connection.\n",
            overhead["upstream"].as_str().unwrap_or(""),
            overhead["load_generator"].as_str().unwrap_or(""),
            overhead["saturation"]["connections"],
            overhead["saturation"]["threads"],
            overhead["saturation"]["secs"],
            overhead["latency"]["secs"],
            overhead["rounds"],
            overhead["variants"]
                .as_array()
                .map(|v| v.iter().filter_map(|x| x["key"].as_str()).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
        );
        let _ = writeln!(md, "Variants:\n");
        variant_list(&mut md, &overhead["variants"]);
        let _ = writeln!(
            md,
            "\n| body | variant | req/s (16 conn) | Envoy CPU µs/req | p50 µs (1 conn) | p99 µs (1 conn) |\n|---|---|---:|---:|---:|---:|"
        );
        for r in overhead["table"].as_array().into_iter().flatten() {
            let body = if r["body"] == "small" {
                "200 B"
            } else {
                "64 KiB"
            };
            let _ = writeln!(
                md,
                "| {body} | {} | {} | {} | {} | {} |",
                r["variant"].as_str().unwrap_or(""),
                fmt_num(f(&r["rps"]), 0),
                fmt_num(f(&r["cpu_us_per_req"]), 1),
                fmt_num(f(&r["p50_us"]), 0),
                fmt_num(f(&r["p99_us"]), 0),
            );
        }
        let _ = writeln!(
            md,
            "\n| body | pair | req/s ratio | added p50 µs (1 conn) | added p99 µs (1 conn) | added Envoy CPU µs/req |\n|---|---|---:|---:|---:|---:|"
        );
        for body in ["small", "large"] {
            if let Some(m) = overhead["comparisons"][body].as_object() {
                for (pair, c) in m {
                    let label = if body == "small" { "200 B" } else { "64 KiB" };
                    let (x, y) = pair.split_once('/').unwrap_or((pair, ""));
                    let _ = writeln!(
                        md,
                        "| {label} | {x} vs {y} | {} | {} | {} | {} |",
                        fmt_num(f(&c["rps_ratio"]), 3),
                        fmt_signed(f(&c["added_p50_us"]), 0),
                        fmt_signed(f(&c["added_p99_us"]), 0),
                        fmt_signed(f(&c["added_cpu_us_per_req"]), 1),
                    );
                }
            }
        }
        let _ = writeln!(md, "\nGoals:\n");
        for g in overhead["goals"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "- {} — measured {} (target {}): **{}**",
                g["goal"].as_str().unwrap_or(""),
                g["value"],
                g["target"],
                pass(g["pass"] == true)
            );
        }
        if let Some(fl) = overhead["floor"].as_object() {
            let _ = writeln!(
                md,
                "\nThe same two measures for knob (j), the least a body-routing filter with response-phase failover does (hold the request until its body is complete, read the body, set the cluster header, read the response status) and no logic at all: {}× the empty filter's throughput, {} µs p50 over Envoy alone. Knob (k) against (h) is what reading a single value from the host costs.",
                fmt_num(f(&fl["rps_ratio_vs_b"]), 3),
                fmt_signed(f(&fl["added_p50_us_vs_a"]), 0),
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
        if let Some(m) = overhead["decision_us_by_body"].as_object() {
            for (k, h) in m {
                let (v, body) = k.split_once('/').unwrap_or((k, ""));
                let body = if body == "small" { "200 B" } else { "64 KiB" };
                let _ = writeln!(
                    md,
                    "| {v} | {body} | {} | {} | {} |",
                    fmt_num(f(&h["p50"]), 1),
                    fmt_num(f(&h["p90"]), 1),
                    fmt_num(f(&h["p99"]), 1),
                );
            }
        }
        if let Some(m) = overhead["decision_us"].as_object() {
            for (k, h) in m {
                let _ = writeln!(
                    md,
                    "| {k} | all, whole run | {} | {} | {} |",
                    fmt_num(f(&h["p50"]), 1),
                    fmt_num(f(&h["p90"]), 1),
                    fmt_num(f(&h["p99"]), 1),
                );
            }
        }
    }
    if let Some(split) = overhead["cpu_split"].as_object().filter(|m| !m.is_empty()) {
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
        for (k, v) in split {
            if let Some(e) = v["error"].as_str() {
                let _ = writeln!(md, "| {k} | perf failed: {e} | | | | |");
                continue;
            }
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    let g = &v["groups"][*n];
                    if g.is_null() {
                        "0".into()
                    } else {
                        format!(
                            "{} ({} %)",
                            fmt_num(f(&g["cpu_us_per_req"]), 1),
                            fmt_num(f(&g["share_pct"]), 0)
                        )
                    }
                })
                .collect();
            let _ = writeln!(
                md,
                "| {k} | {} | {} |",
                fmt_num(f(&v["cpu_us_per_req"]), 1),
                cells.join(" | ")
            );
        }
    }
    if !failover.is_null() {
        let mr = &failover["market_router"];
        let nm = &failover["market_router_envoy_mode"];
        let ev = &failover["envoy_retry"];
        let _ = writeln!(md, "\n## 2. Failover under load\n");
        let _ = writeln!(
            md,
            "{} client connections (keep-alive, closed loop, 200-byte body) for {} s; provider `a` answers 503 from t = {} s on. Upstreams: two mock providers (`--quiet`), one round trip {} µs (p50, direct). Envoy `--concurrency {}`.\n\n- **market-router**: route mode, `cheapest` (a first, then b), circuit `failure_threshold` 3, `cooldown_ms` 5000; **envoy mode**: the same in `failover.mode: envoy`.\n- **Envoy retry**: {}.\n\nDead-provider attempts: the 503 answers provider `a` counted, over the requests started after the switch. Healthy: from 0.5 s to the switch; outage: from the switch to the end.\n",
            mr["connections"],
            mr["secs"],
            mr["switch_at_s"],
            failover["upstream_rtt_p50_us"],
            mr["envoy_concurrency"],
            failover["envoy_retry_setup"].as_str().unwrap_or(""),
        );
        let _ = writeln!(
            md,
            "| | market-router, route mode | market-router, envoy mode | Envoy retry + outlier detection | goal |\n|---|---:|---:|---:|---|"
        );
        // One row: the cell of each setup (route mode, envoy mode, Envoy retry) and the goal.
        let row = |md: &mut String, label: &str, cell: &dyn Fn(&Value) -> String, goal: &str| {
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {goal} |",
                cell(mr),
                cell(nm),
                cell(ev)
            );
        };
        row(&mut md, "requests", &|v| v["requests"].to_string(), "");
        row(
            &mut md,
            "success ratio",
            &|v| fmt_num(f(&v["success_ratio"]) * 100.0, 3) + " %",
            "100 %",
        );
        let failed = |v: &Value| -> String {
            let mut parts: Vec<String> = v["by_status"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| k.as_str() != "200")
                        .map(|(k, n)| {
                            let k = if k == "0" {
                                "transport error"
                            } else {
                                k.as_str()
                            };
                            format!("{n} × {k}")
                        })
                        .collect()
                })
                .unwrap_or_default();
            if parts.is_empty() {
                parts.push("none".into());
            }
            let overflow = v["counters"]["cluster.providers.upstream_rq_retry_overflow"]
                .as_u64()
                .unwrap_or(0);
            if overflow > 0 {
                parts.push(format!(
                    "({overflow} retries refused by the cluster's retry circuit breaker, max_retries 3 by default)"
                ));
            }
            parts.join(" ")
        };
        row(&mut md, "failed answers", &failed, "none");
        row(
            &mut md,
            "dead-provider attempts per request (outage)",
            &|v| {
                format!(
                    "{} ({} / {})",
                    fmt_num(f(&v["dead_attempts_per_request"]), 4),
                    v["dead_attempts"],
                    v["outage_requests"]
                )
            },
            "≤ 0.01",
        );
        row(
            &mut md,
            "req/s healthy → outage",
            &|v| {
                format!(
                    "{} → {}",
                    fmt_num(f(&v["healthy_rps"]), 0),
                    fmt_num(f(&v["outage_rps"]), 0)
                )
            },
            "",
        );
        row(
            &mut md,
            "outage throughput / healthy",
            &|v| fmt_num(f(&v["outage_throughput_share"]), 3),
            "≥ 0.9",
        );
        row(
            &mut md,
            "p50 µs healthy → outage",
            &|v| format!("{} → {}", v["healthy_p50_us"], v["outage_p50_us"]),
            "",
        );
        row(
            &mut md,
            "p99 µs healthy → outage",
            &|v| format!("{} → {}", v["healthy_p99_us"], v["outage_p99_us"]),
            "outage ≤ healthy + 1 round trip + 5 ms",
        );
        let goals = |v: &Value| -> String {
            let g = &v["goals"];
            format!(
                "success {} · dead attempts {} · throughput {} · p99 {}",
                pass(g["success_100pct"] == true),
                pass(g["dead_attempts_le_0_01"] == true),
                pass(g["throughput_ge_0_9"] == true),
                pass(g["p99_within_budget"] == true)
            )
        };
        row(&mut md, "goals", &goals, "");
    }
    if !memory.is_null() {
        let _ = writeln!(md, "\n## 3. Memory\n");
        let _ = writeln!(
            md,
            "Envoy `--concurrency {}` with market-router ({} providers, route mode), snapshots of N offers (every provider offers N/{} models). Measured once the route endpoint shows all N offers, and again after {} requests. Wasm linear memory: the read-write pages V8 maps below each linear memory's reservation in `/proc/<pid>/smaps` (Envoy has no stat for the V8 heap).\n",
            memory["envoy_concurrency"],
            memory["providers"],
            memory["providers"],
            memory["rows"][0]["requests"],
        );
        let _ = writeln!(
            md,
            "| offers | snapshot JSON | loaded after | Envoy RSS MiB | tcmalloc allocated MiB | wasm linear memory MiB, all VMs (resident) |\n|---:|---:|---:|---:|---:|---:|"
        );
        for r in memory["rows"].as_array().into_iter().flatten() {
            let (l, t) = (&r["after_load"], &r["after_traffic"]);
            let _ = writeln!(
                md,
                "| {} | {} KiB | {} ms | {} → {} | {} → {} | {} ({}) → {} ({}) |",
                r["offers"],
                fmt_num(f(&r["snapshot_json_bytes"]) / 1024.0, 0),
                r["loaded_after_ms"],
                fmt_num(f(&l["rss_mib"]), 1),
                fmt_num(f(&t["rss_mib"]), 1),
                fmt_num(f(&l["tcmalloc_allocated_mib"]), 1),
                fmt_num(f(&t["tcmalloc_allocated_mib"]), 1),
                fmt_num(f(&l["wasm_linear_size_mib"]), 1),
                fmt_num(f(&l["wasm_linear_resident_mib"]), 1),
                fmt_num(f(&t["wasm_linear_size_mib"]), 1),
                fmt_num(f(&t["wasm_linear_resident_mib"]), 1),
            );
        }
        let _ = writeln!(
            md,
            "\nEach cell: after the snapshot is loaded → after the traffic. Wasm linear memories counted: {} (one per VM). Per VM with the largest snapshot, MiB (size/resident): {}.",
            memory["rows"][0]["after_traffic"]["wasm_linear_memories"],
            memory["rows"]
                .as_array()
                .and_then(|r| r.last())
                .and_then(|r| r["after_traffic"]["wasm_linear_per_vm_mib"].as_array())
                .map(|v| v
                    .iter()
                    .map(|m| format!("{}/{}", m["size"], m["resident"]))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
        let rf = &memory["refresh"];
        if !rf.is_null() {
            let _ = writeln!(
                md,
                "\nRefresh of a {}-offer snapshot (tries: {}): from the sidecar receiving the filter's fetch to the filter's log line saying it stored the validated snapshot (transfer, validation, encoding, shared-data write): median {} ms; to the route endpoint showing the new generation: median {} ms (tries: {} ms). VMs that did not fetch pick a new generation up on their next check (on each tick, every refresh_ms/4 clamped to 50..1000 ms, here 250 ms; and on requests, at most every 250 ms), which dominates the time to visible.",
                rf["offers"],
                rf["tries"],
                fmt_num(f(&rf["fetch_to_stored_ms_median"]), 0),
                fmt_num(f(&rf["fetch_to_visible_ms_median"]), 0),
                rf["fetch_to_visible_ms"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default(),
            );
        }
    }
    md
}

fn run() -> Result<(), String> {
    let opts = parse_opts()?;
    let started = Instant::now();
    fs::create_dir_all(&opts.out)
        .map_err(|e| format!("cannot create {}: {e}", opts.out.display()))?;
    let wasm = wasm_path();
    if !wasm.is_file() {
        return Err(format!("{} is missing (make build)", wasm.display()));
    }
    let envoy = envoy_bin()?;
    let meta = json!({
        "date": utc_now(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "envoy": tool_version(&envoy, "--version")
            .split("version: ")
            .nth(1)
            .unwrap_or("")
            .split('/')
            .nth(1)
            .unwrap_or("")
            .to_string(),
        "cores": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "quick": opts.quick,
        "args": opts.args,
        "wasm_bytes": fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0),
        "loadavg_start": loadavg(),
    });
    // A section runs when asked for; otherwise its results are null.
    let section = |name: &str, run: fn(&Opts) -> Result<Value, String>| {
        if opts.sections.iter().any(|x| x == name) {
            run(&opts)
        } else {
            Ok(Value::Null)
        }
    };
    let overhead = section("overhead", overhead)?;
    let streaming = section("streaming", streaming)?;
    let failover = section("failover", failover)?;
    let memory = section("memory", memory)?;
    let mut meta = meta;
    meta["runtime_s"] = round_to(started.elapsed().as_secs_f64(), 1);
    meta["loadavg_end"] = json!(loadavg());
    let all = json!({"meta": meta, "overhead": overhead, "streaming": streaming, "failover": failover, "memory": memory});
    let json_path = opts.out.join("latest.json");
    let md_path = opts.out.join("latest.md");
    let text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
    fs::write(&json_path, text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    let mut md = markdown(&meta, &overhead, &failover, &memory);
    md.push_str(&streaming_markdown(&streaming));
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
