//! Layering check: Portkey's open-source gateway in front, Envoy with market-router behind it.
//!
//! ```text
//! test_layering --portkey SERVER_JS --node-preload FILE
//! ```
//!
//! The client talks to Portkey with the `x-portkey-config` of `examples/layering/` (provider
//! `openai`, `custom_host` = the Envoy listener, Portkey's own retry policy). Envoy runs the
//! filter with `examples/layering/market-router.json`: two providers, `a` cheapest, failover in
//! route mode. Each provider cluster injects its own key; the mocks refuse any other.
//!
//! 1. `a` answers 503, `b` serves: the client gets `b`'s answer; the filter's response headers
//!    (`x-market-router-provider: b`, `-attempts: 2`) come back through Portkey; Portkey did
//!    not retry (the failover happened inside Envoy); Envoy saw one request.
//! 2. Both providers answer 503: the filter answers its own error, and Portkey enforces its
//!    retry policy on it: Envoy sees 1 + `retry.attempts` requests and the client gets the
//!    filter's JSON error with `x-portkey-retry-attempt-count: -1` (Portkey's "retries
//!    exhausted").
//!
//! Exits non-zero with the reason on the first failed check.

use market_router_testbed as common;

use clap::Parser;
use common::{
    crate_root, request, Envoy, EnvoyConfig, MockOpts, MockProvider, ProviderCluster, Response,
};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const MODEL: &str = "gpt-4o-mini";
const T: Duration = Duration::from_secs(20);
const ACCESS_LOG: &str = "ACCESS path=%REQ(:PATH)% status=%RESPONSE_CODE% \
first_cluster=%UPSTREAM_CLUSTER% decision=%FILTER_STATE(wasm.market_router.decision:PLAIN)%\n";

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", path.display()))
}
/// Envoy's `ACCESS` lines so far.
fn access_lines(envoy: &Envoy) -> Vec<String> {
    envoy
        .log_contents()
        .lines()
        .filter(|l| l.starts_with("ACCESS "))
        .map(str::to_string)
        .collect()
}

/// Waits until Envoy has written `n` access log lines. Envoy flushes its stdout access log on
/// a timer (bootstrap `file_flush_interval_msec`, 10 s by default), so this waits up to 12 s.
fn wait_access_lines(envoy: &Envoy, n: usize) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let lines = access_lines(envoy);
        if lines.len() >= n {
            return Ok(lines);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "Envoy wrote {} access log line(s), expected {n}; log tail:\n{}",
                lines.len(),
                envoy.log_tail(20)
            ));
        }
        thread::sleep(Duration::from_millis(25));
    }
}

fn decision_of(line: &str) -> Result<Value, String> {
    let raw = line
        .split_once("decision=")
        .map(|(_, d)| d.trim())
        .ok_or_else(|| format!("no decision in access log line {line:?}"))?;
    serde_json::from_str(raw).map_err(|e| format!("decision {raw:?} is not JSON: {e}"))
}

fn send(portkey_port: u16, portkey_config: &str) -> Result<(Response, Duration), String> {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]});
    let t0 = Instant::now();
    let r = request(
        "POST",
        &format!("http://127.0.0.1:{portkey_port}/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("x-portkey-config", portkey_config),
        ],
        body.to_string().as_bytes(),
        T,
    )?;
    Ok((r, t0.elapsed()))
}

/// `tried` of a decision record as `a 5xx, b success`.
fn tried_of(d: &Value) -> String {
    d["tried"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|x| {
                    format!(
                        "{} {}",
                        x[0].as_str().unwrap_or("?"),
                        x[1].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn downstream_requests(envoy: &Envoy) -> Result<u64, String> {
    Ok(envoy.stat("http.ingress.downstream_rq_total")?.unwrap_or(0))
}

fn run(server_js: &Path, preload: &Path) -> Result<(), String> {
    let dir = crate_root().join("examples").join("layering");
    let mr_config = read_json(&dir.join("market-router.json"))?;
    let mut pk_config = read_json(&dir.join("portkey-config.json"))?;
    let retries = pk_config["retry"]["attempts"]
        .as_u64()
        .ok_or("portkey-config.json: retry.attempts is not a number")?;

    let a = MockProvider::start("a", &MockOpts::default().api_key("key-a").status(503))?;
    let b = MockProvider::start("b", &MockOpts::default().api_key("key-b"))?;
    let envoy = Envoy::start(
        &EnvoyConfig::new()
            .provider(ProviderCluster::new("provider_a", a.port()).with_key("key-a"))
            .provider(ProviderCluster::new("provider_b", b.port()).with_key("key-b"))
            .market_router(&mr_config.to_string())
            .access_log(true)
            .access_log_format(ACCESS_LOG)
            .component_log_level(""),
        1,
    )?;
    let (portkey, pk_port) = common::start_portkey(server_js, preload, Duration::from_secs(30))?;
    pk_config["custom_host"] = json!(format!("http://127.0.0.1:{}/v1", envoy.port()));
    let pk_header = pk_config.to_string();

    // 1. Failover inside Envoy, seen through Portkey.
    let (r, took) = send(pk_port, &pk_header)?;
    let text = r.text();
    check(r.status == 200, || {
        format!(
            "step 1: client got {} from Portkey, expected 200: {text}\nPortkey log:\n{}\nEnvoy log:\n{}",
            r.status,
            portkey.log_tail(20),
            envoy.log_tail(20)
        )
    })?;
    let v = r.json()?;
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    check(content.starts_with("Hello from b "), || {
        format!("step 1: answer is not b's: {text}")
    })?;
    let (ha, hb) = (a.hits()?, b.hits()?);
    check(ha == 1 && hb == 1, || {
        format!("step 1: mock hits a={ha} b={hb}, expected 1 and 1")
    })?;
    check(
        b.last_request()?["headers"]["authorization"] == "Bearer key-b",
        || "step 1: b did not get its own key from Envoy".to_string(),
    )?;
    check(downstream_requests(&envoy)? == 1, || {
        "step 1: Envoy did not see exactly one request".to_string()
    })?;
    check(
        r.header("x-portkey-retry-attempt-count") == Some("0"),
        || {
            format!(
                "step 1: x-portkey-retry-attempt-count is {:?}, expected 0 (the failover happened in Envoy)",
                r.header("x-portkey-retry-attempt-count")
            )
        },
    )?;
    let through_portkey = match (
        r.header("x-market-router-provider"),
        r.header("x-market-router-attempts"),
    ) {
        (Some(p), Some(n)) => {
            check(p == "b" && n == "2", || {
                format!(
                    "step 1: through Portkey x-market-router-provider={p} -attempts={n}, \
                     expected b and 2"
                )
            })?;
            true
        }
        _ => false,
    };
    println!(
        "test-layering: step 1 passed ({} ms): client <- 200 from b via Portkey",
        took.as_millis()
    );

    // 2. Portkey's own policy on top: every provider fails, the filter answers its error and
    //    Portkey retries it `retries` times.
    b.set_behavior(&json!({"status": 503}))?;
    let (r2, took2) = send(pk_port, &pk_header)?;
    let text2 = r2.text();
    check((502..=504).contains(&r2.status), || {
        format!(
            "step 2: client got {}, expected the filter's 502/503/504: {text2}",
            r2.status
        )
    })?;
    let err = r2
        .json()
        .map_err(|e| format!("step 2: body is not the filter's JSON error: {e}: {text2}"))?;
    check(
        err["error"]["code"].is_string() && err["error"]["message"].is_string(),
        || format!("step 2: no error.code/error.message in {err}"),
    )?;
    let seen = downstream_requests(&envoy)? - 1;
    check(seen == 1 + retries, || {
        format!(
            "step 2: Envoy saw {seen} request(s), expected {} (1 + Portkey's {retries} retries)",
            1 + retries
        )
    })?;
    // Portkey reports -1 when it used every retry and the last answer still matched
    // `on_status_codes` (retries exhausted); the count itself is Envoy's, above.
    check(
        r2.header("x-portkey-retry-attempt-count") == Some("-1"),
        || {
            format!(
                "step 2: x-portkey-retry-attempt-count is {:?}, expected -1 (retries exhausted)",
                r2.header("x-portkey-retry-attempt-count")
            )
        },
    )?;
    println!(
        "test-layering: step 2 passed ({} ms): Portkey's retry policy acted on the filter's \
         {} ({}): {} requests reached Envoy, x-portkey-retry-attempt-count: -1 (exhausted)",
        took2.as_millis(),
        r2.status,
        err["error"]["code"].as_str().unwrap_or(""),
        1 + retries
    );

    // Envoy's side of both steps, from its access log (decision records).
    let lines = wait_access_lines(&envoy, 2 + retries as usize)?;
    let d = decision_of(&lines[0])?;
    check(d["provider"] == "b" && d["attempts"] == 2, || {
        format!("step 1: Envoy's decision record is {d}, expected provider b after 2 attempts")
    })?;
    let headers_note = if through_portkey {
        "x-market-router-provider: b and x-market-router-attempts: 2 reached the client \
         through Portkey"
    } else {
        "Portkey did not pass x-market-router-* on: asserted from Envoy's access log \
         (decision record) instead"
    };
    println!("\npath of step 1:");
    println!("  client -> Portkey 127.0.0.1:{pk_port}  (x-portkey-config: provider openai, custom_host = Envoy, retry {retries} on 502/503/504)");
    println!(
        "         -> Envoy 127.0.0.1:{}  [market-router: {}]",
        envoy.port(),
        tried_of(&d)
    );
    println!("         <- 200 from b; {headers_note}");
    println!(
        "  Portkey answer headers: x-portkey-retry-attempt-count: 0, x-portkey-last-used-option-index: {}",
        r.header("x-portkey-last-used-option-index").unwrap_or("-")
    );
    println!("\nEnvoy access log:");
    for l in &lines {
        println!("  {l}");
    }
    println!("\ntest-layering: 2 passed, 0 failed");
    Ok(())
}

/// `test_layering`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "test_layering",
    about = "market-router in Envoy layered with Portkey's gateway in front: both answer, and the access log shows the path"
)]
struct Cli {
    /// Portkey's server JS file
    #[arg(long, value_name = "SERVER_JS")]
    portkey: PathBuf,
    /// The file node preloads for Portkey
    #[arg(long, value_name = "FILE")]
    node_preload: PathBuf,
}

fn main() -> ExitCode {
    // A bad command line exits 2 (clap's code), help 0.
    let cli = Cli::parse();
    let (js, preload) = (cli.portkey, cli.node_preload);
    match run(&js, &preload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("test-layering: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
