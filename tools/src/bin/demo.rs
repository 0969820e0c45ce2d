//! The demo behind `make demo`: three mock LLM providers, the market service
//! (`market-sidecar`, fed by a snapshot file of the demo's market) and a real Envoy running the
//! market-router filter, then a handful of requests with a table of who served each one and
//! why.
//!
//! ```text
//! cargo build --release --workspace --bins && cargo run --release -p market-router-tools --bin demo
//! ```
//!
//! Needs the filter (`make build`, or `$MR_WASM`), Envoy (`make envoy`, or `$ENVOY_BIN`) and
//! the `mock_provider` binary and `market-sidecar` built with the same profile. Every
//! process it starts is stopped when it ends, on errors too; Ctrl-C in a terminal reaches the
//! children as well (same process group).

use market_router_testbed as common;

use common::{
    envoy_bin, example_bin, get, market_service_bin, post_json, wasm_path, Envoy, EnvoyConfig,
    MarketService, MockOpts, MockProvider, ProviderCluster, Response, TempDir,
};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LLAMA: &str = "llama-3.1-70b-instruct";
const MINI: &str = "gpt-4o-mini";
const MODELS: [&str; 2] = [LLAMA, MINI];
/// Timeout of one demo request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the filter to load the first snapshot.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(8);
const REFRESH_MS: u64 = 1000;

/// A provider of the demo: name, mock timing, and its model ids.
struct Spec {
    name: &'static str,
    provider_type: &'static str,
    region: &'static str,
    /// Mock latency of non-streaming answers, ms.
    latency_ms: u64,
    /// Mock time to first token and gap between chunks of streams, ms.
    ttft_ms: u64,
    chunk_ms: u64,
    /// (client model, provider's own id).
    models: [(&'static str, &'static str); 2],
}

const SPECS: [Spec; 3] = [
    Spec {
        name: "acme",
        provider_type: "company",
        region: "us-east",
        latency_ms: 40,
        ttft_ms: 60,
        chunk_ms: 5,
        models: [
            (LLAMA, "meta-llama/Llama-3.1-70B-Instruct"),
            (MINI, "gpt-4o-mini"),
        ],
    },
    Spec {
        name: "bolt",
        provider_type: "community",
        region: "eu-west",
        latency_ms: 25,
        ttft_ms: 40,
        chunk_ms: 5,
        models: [(LLAMA, "llama3.1:70b"), (MINI, "gpt-4o-mini")],
    },
    Spec {
        name: "cirrus",
        provider_type: "company",
        region: "us-west",
        latency_ms: 30,
        ttft_ms: 50,
        chunk_ms: 5,
        models: [
            (LLAMA, "accounts/cirrus/models/llama-v3p1-70b-instruct"),
            (MINI, "gpt-4o-mini-2024-07-18"),
        ],
    },
];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn provider_model(provider: &str, model: &str) -> &'static str {
    SPECS
        .iter()
        .find(|s| s.name == provider)
        .and_then(|s| s.models.iter().find(|(m, _)| *m == model))
        .map_or("", |(_, id)| id)
}

/// One market offer.
#[allow(clippy::too_many_arguments)]
fn offer(
    provider: &str,
    model: &str,
    input: f64,
    output: f64,
    ttft: u64,
    uptime: f64,
    availability: &str,
    tps: f64,
) -> Value {
    let spec = SPECS.iter().find(|s| s.name == provider);
    json!({
        "provider": provider,
        "model": model,
        "provider_model": provider_model(provider, model),
        "price": {"input_per_mtok": input, "output_per_mtok": output},
        "latency_ms": {"ttft_p50": ttft, "ttft_p95": ttft * 3, "total_p50": ttft * 6},
        "throughput_tps": tps,
        "uptime": uptime,
        "availability": availability,
        "provider_type": spec.map_or("company", |s| s.provider_type),
        "region": spec.map_or("", |s| s.region),
        "context_window": 131072,
    })
}

/// A realistic market: prices, latencies and uptime differ; cirrus is offline for gpt-4o-mini.
fn snapshot() -> Value {
    json!({
        "version": 1,
        "generated_at_ms": now_ms(),
        "offers": [
            offer("acme", LLAMA, 0.88, 0.88, 420, 0.998, "online", 62.0),
            offer("bolt", LLAMA, 0.35, 0.40, 610, 0.970, "online", 48.0),
            offer("cirrus", LLAMA, 0.60, 0.70, 240, 0.995, "online", 95.0),
            offer("acme", MINI, 0.15, 0.60, 310, 0.999, "online", 110.0),
            offer("bolt", MINI, 0.12, 0.50, 520, 0.960, "degraded", 70.0),
            offer("cirrus", MINI, 0.14, 0.55, 200, 0.990, "offline", 0.0),
        ]
    })
}

fn plugin_config() -> String {
    let providers: Vec<Value> = SPECS
        .iter()
        .map(|s| {
            let models: serde_json::Map<String, Value> = s
                .models
                .iter()
                .map(|(m, id)| (m.to_string(), json!(id)))
                .collect();
            json!({
                "name": s.name,
                "cluster": format!("provider_{}", s.name),
                "authority": format!("api.{}.example", s.name),
                "models": models,
                "provider_type": s.provider_type,
                "region": s.region,
            })
        })
        .collect();
    json!({
        "providers": providers,
        "market": {"cluster": "market_sidecar", "refresh_ms": REFRESH_MS, "max_age_ms": 60000, "timeout_ms": 500},
        "routing": {"strategy": "balanced", "affinity_header": "x-session-id"},
        "failover": {"mode": "route", "max_attempts": 3, "attempt_timeout_ms": 5000, "deadline_ms": 10000,
                     "circuit": {"failure_threshold": 3, "cooldown_ms": 10000}},
        "response_headers": true
    })
    .to_string()
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ");
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(dashes.iter().map(String::as_str).collect()));
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn fmt_num(v: &Value, decimals: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |x| format!("{x:.decimals$}"))
}

/// Polls the filter's `/route` endpoint until the VM answering holds a snapshot.
fn wait_for_snapshot(envoy: &mut Envoy) -> Result<Value, String> {
    let deadline = Instant::now() + SNAPSHOT_WAIT;
    let url = envoy.url(&format!("/market-router/v1/route?model={LLAMA}"));
    let mut last;
    loop {
        envoy.check_running()?;
        match get(&url, Duration::from_secs(2)) {
            Ok(r) if r.status == 200 => {
                let v = r.json()?;
                if v["snapshot"]["offers"].as_u64().unwrap_or(0) > 0 {
                    return Ok(v["snapshot"].clone());
                }
                last = format!("snapshot: {}", v["snapshot"]);
            }
            Ok(r) => last = format!("status {}: {}", r.status, r.text()),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the filter did not load the market snapshot within {} s ({last})",
                SNAPSHOT_WAIT.as_secs()
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The filter's ranking of `model` right now (`GET /market-router/v1/route?model=`).
fn fetch_ranking(envoy: &Envoy, model: &str) -> Result<Value, String> {
    let r = get(
        &envoy.url(&format!("/market-router/v1/route?model={model}")),
        REQUEST_TIMEOUT,
    )?;
    if r.status != 200 {
        return Err(format!(
            "/route?model={model}: status {}: {}",
            r.status,
            r.text()
        ));
    }
    r.json()
}

fn candidates(ranking: &Value) -> &[Value] {
    ranking["candidates"].as_array().map_or(&[], Vec::as_slice)
}

/// Name of the first candidate.
fn primary_of(model: &str, ranking: &Value) -> Result<String, String> {
    candidates(ranking)
        .first()
        .and_then(|c| c["provider"].as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("no candidate for {model}: {ranking}"))
}

/// `bolt 0.731, cirrus 0.640, ...`
fn ranking_line(ranking: &Value) -> String {
    candidates(ranking)
        .iter()
        .map(|c| {
            format!(
                "{} {} (reliability {})",
                c["provider"].as_str().unwrap_or("?"),
                fmt_num(&c["score"], 3),
                fmt_num(&c["reliability"], 3)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_ranking(model: &str, v: &Value) {
    println!(
        "\nRanking for {model} ({} strategy; assumes {} input / {} output tokens)",
        v["strategy"].as_str().unwrap_or("?"),
        v["assumed_tokens"]["input"],
        v["assumed_tokens"]["output"],
    );
    let rows: Vec<Vec<String>> = candidates(v)
        .iter()
        .map(|c| {
            vec![
                c["rank"].to_string(),
                c["provider"].as_str().unwrap_or("?").to_string(),
                format!(
                    "{} / {}",
                    fmt_num(&c["input_per_mtok"], 2),
                    fmt_num(&c["output_per_mtok"], 2)
                ),
                c["provenance"]["price"]["source"]
                    .as_str()
                    .unwrap_or("-")
                    .to_string(),
                fmt_num(&c["ttft_ms"], 0),
                fmt_num(&c["uptime"], 3),
                c["availability"].as_str().unwrap_or("?").to_string(),
                fmt_num(&c["expected_cost_usd"], 6),
                fmt_num(&c["score"], 3),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "rank",
                "provider",
                "$/Mtok in / out",
                "price from",
                "ttft ms",
                "uptime",
                "availability",
                "est. cost $",
                "score",
            ],
            &rows,
        )
    );
    for e in v["excluded"].as_array().map_or(&[][..], Vec::as_slice) {
        println!(
            "  excluded: {} ({})",
            e["provider"].as_str().unwrap_or("?"),
            e["reason"].as_str().unwrap_or("?")
        );
    }
}

/// One demo request and what came back.
struct Sent {
    label: String,
    model: String,
    response: Response,
    ms: u128,
    /// Why this provider served it.
    why: String,
}

impl Sent {
    fn provider(&self) -> &str {
        self.response
            .header("x-market-router-provider")
            .unwrap_or("-")
    }

    /// Explains the outcome against the ranking's first choice at the time (`top`), the
    /// provider a session was on (`session`), and a provider made to fail (`failing`).
    fn explain(mut self, top: &str, session: Option<&str>, failing: Option<&str>) -> Sent {
        let attempts = self
            .response
            .header("x-market-router-attempts")
            .and_then(|a| a.parse::<u32>().ok())
            .unwrap_or(0);
        let p = self.provider().to_string();
        self.why = if self.response.status != 200 {
            "error".to_string()
        } else if attempts > 1 {
            match failing {
                Some(f) => format!("failover: {f} answered 503"),
                None => "failover".to_string(),
            }
        } else if session == Some(p.as_str()) && p != top {
            format!("session affinity (ranking prefers {top})")
        } else if p == top {
            "top of the ranking".to_string()
        } else {
            format!("ranking prefers {top}")
        };
        self
    }
}

fn send(
    envoy: &Envoy,
    label: &str,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> Result<Sent, String> {
    let model = body["model"].as_str().unwrap_or("").to_string();
    let start = Instant::now();
    let response = post_json(&envoy.url(path), headers, &body, REQUEST_TIMEOUT)
        .map_err(|e| format!("request `{label}` failed: {e}"))?;
    Ok(Sent {
        label: label.to_string(),
        model,
        response,
        ms: start.elapsed().as_millis(),
        why: String::new(),
    })
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]})
}

fn row(n: usize, s: &Sent) -> Vec<String> {
    let r = &s.response;
    let h = |k: &str| r.header(k).unwrap_or("-").to_string();
    let cost = match (
        r.header("x-market-router-cost-usd"),
        r.header("x-market-router-cost-estimated"),
    ) {
        (Some(c), Some("true")) => format!("{c} (est.)"),
        (Some(c), _) => c.to_string(),
        (None, _) => "-".to_string(),
    };
    vec![
        n.to_string(),
        s.label.clone(),
        s.model.clone(),
        h("x-market-router-provider"),
        h("x-market-router-attempts"),
        r.status.to_string(),
        cost,
        s.ms.to_string(),
        s.why.clone(),
    ]
}

fn run() -> Result<(), String> {
    let t0 = Instant::now();
    // Everything the demo needs, checked up front with a hint each.
    let hint = "run `make demo` (it builds the filter, installs Envoy and builds the binaries)";
    let wasm = wasm_path();
    if !wasm.is_file() {
        return Err(format!(
            "filter module {} not found; {hint}",
            wasm.display()
        ));
    }
    envoy_bin().map_err(|e| format!("{e}; {hint}"))?;
    example_bin("mock_provider").map_err(|e| format!("{e}; or {hint}"))?;
    market_service_bin().map_err(|e| format!("{e}; or {hint}"))?;

    println!("market-router demo: three providers, the market service, Envoy with the filter\n");
    let mut mocks = Vec::new();
    for s in &SPECS {
        let opts = MockOpts::default()
            .latency_ms(s.latency_ms)
            .stream_timing(s.ttft_ms, s.chunk_ms);
        let m = MockProvider::start(s.name, &opts)?;
        println!("  provider {:<7} mock on 127.0.0.1:{}", s.name, m.port());
        mocks.push(m);
    }
    let dir = TempDir::new("demo")?;
    let snapshot_file = dir.join("snapshot.json");
    let snap = snapshot();
    std::fs::write(
        &snapshot_file,
        serde_json::to_vec_pretty(&snap).unwrap_or_default(),
    )
    .map_err(|e| format!("cannot write {}: {e}", snapshot_file.display()))?;
    // The market service polls the demo's market file as a snapshot v1 source.
    let service_config = dir.join("market-sidecar.json");
    let providers: serde_json::Map<String, Value> = SPECS
        .iter()
        .map(|s| (s.name.to_string(), json!({})))
        .collect();
    let service_doc = json!({
        "sources": [{"name": "demo-feed", "kind": "snapshot", "file": "snapshot.json", "period_s": 1}],
        "providers": providers,
        "models": MODELS.iter().map(|m| (m.to_string(), json!({}))).collect::<serde_json::Map<_, _>>(),
    });
    std::fs::write(&service_config, service_doc.to_string())
        .map_err(|e| format!("cannot write {}: {e}", service_config.display()))?;
    let sidecar = MarketService::start(&service_config)?;
    println!(
        "  market service   on 127.0.0.1:{} serving {} offers",
        sidecar.port(),
        snap["offers"].as_array().map_or(0, Vec::len)
    );

    let mut cfg = EnvoyConfig::new()
        .sidecar("market_sidecar", sidecar.port())
        .route_timeout(Duration::from_secs(15))
        .market_router(&plugin_config());
    for (s, m) in SPECS.iter().zip(&mocks) {
        cfg = cfg.provider(ProviderCluster::new(
            &format!("provider_{}", s.name),
            m.port(),
        ));
    }
    let mut envoy = Envoy::start(&cfg, 2)?;
    println!(
        "  Envoy            on 127.0.0.1:{} (admin {}), 2 workers, strategy balanced, market refresh {REFRESH_MS} ms",
        envoy.port(),
        envoy.admin_port()
    );

    let snap_state = wait_for_snapshot(&mut envoy)?;
    println!(
        "\nMarket snapshot loaded by the filter: {} offers, {} ms old",
        snap_state["offers"], snap_state["age_ms"]
    );

    let mut top = Vec::new();
    for model in MODELS {
        let v = fetch_ranking(&envoy, model)?;
        print_ranking(model, &v);
        top.push(primary_of(model, &v)?);
    }
    let (llama_top, mini_top) = (top[0].clone(), top[1].clone());

    let path = "/v1/chat/completions";
    let session = [("x-session-id", "demo-session-42")];
    let mut sent = Vec::new();
    sent.push(
        send(&envoy, "chat", path, chat(LLAMA, "Name three rivers."), &[])?
            .explain(&llama_top, None, None),
    );
    sent.push(
        send(&envoy, "chat", path, chat(MINI, "Say hello."), &[])?.explain(&mini_top, None, None),
    );
    let completion = json!({"model": MINI, "prompt": "Once upon a time", "max_tokens": 16});
    sent.push(
        send(&envoy, "completion", "/v1/completions", completion, &[])?
            .explain(&mini_top, None, None),
    );
    let mut stream = chat(LLAMA, "Stream a haiku.");
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    sent.push(send(&envoy, "chat, streaming", path, stream, &[])?.explain(&llama_top, None, None));
    let first = send(
        &envoy,
        "chat, session A",
        path,
        chat(LLAMA, "Hi, I am Ada."),
        &session,
    )?
    .explain(&llama_top, None, None);
    let session_provider = first.provider().to_string();
    sent.push(first);

    // The first choice for llama starts failing: the filter fails over to the next provider.
    let failing = llama_top.clone();
    let mock = mocks
        .iter()
        .find(|m| m.name() == failing)
        .ok_or_else(|| format!("no mock named {failing}"))?;
    mock.set_behavior(&json!({"status": 503}))?;
    let label = format!("chat while {failing} answers 503");
    let failover = send(&envoy, &label, path, chat(LLAMA, "Are you there?"), &[]);
    // Back to normal (its original timing) before anything else can fail.
    let spec = SPECS.iter().find(|s| s.name == failing);
    mock.set_behavior(&json!({
        "latency_ms": spec.map_or(0, |s| s.latency_ms),
        "ttft_ms": spec.map_or(0, |s| s.ttft_ms),
        "chunk_ms": spec.map_or(0, |s| s.chunk_ms),
    }))?;
    sent.push(failover?.explain(&llama_top, None, Some(&failing)));
    let failover_n = sent.len();

    // The failure counts against that provider's reliability in the next rankings.
    let after = fetch_ranking(&envoy, LLAMA)?;
    let new_top = primary_of(LLAMA, &after)?;
    sent.push(
        send(&envoy, "chat", path, chat(LLAMA, "Hello again."), &[])?.explain(&new_top, None, None),
    );
    sent.push(
        send(
            &envoy,
            "chat, session A again",
            path,
            chat(LLAMA, "What is my name?"),
            &session,
        )?
        .explain(&new_top, Some(&session_provider), None),
    );

    println!(
        "\nRequests through Envoy (http://127.0.0.1:{})",
        envoy.port()
    );
    let rows: Vec<Vec<String>> = sent
        .iter()
        .enumerate()
        .map(|(i, s)| row(i + 1, s))
        .collect();
    println!(
        "{}",
        table(
            &[
                "#",
                "request",
                "model",
                "served by",
                "attempts",
                "status",
                "cost $",
                "ms",
                "why"
            ],
            &rows
        )
    );
    println!(
        "\n  After #{failover_n}, the {LLAMA} ranking is: {}.",
        ranking_line(&after)
    );
    println!(
        "  The error {failing} returned counts against its reliability; session A was on {session_provider}."
    );
    let bad: Vec<&Sent> = sent.iter().filter(|s| s.response.status != 200).collect();
    for s in &bad {
        println!(
            "  `{}` answered {}: {}",
            s.label,
            s.response.status,
            s.response.text()
        );
    }
    println!(
        "\nDone in {:.1} s; stopping Envoy, the market service and the mocks.",
        t0.elapsed().as_secs_f64()
    );
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("{} request(s) did not succeed", bad.len()))
    }
}

fn main() {
    // `run` returns before exiting, so every process handle is dropped (and its child stopped).
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e}");
            1
        }
    };
    std::process::exit(code);
}
