//! Market snapshots and filter configurations of the sections, and waiting for a snapshot to
//! show up on the route endpoint.

use super::MODEL;
use market_router_testbed::get;
use serde_json::{json, Value};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) fn offer(provider: &str, model: &str, i: usize) -> Value {
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

pub(crate) fn snapshot(offers: Vec<Value>, generated_at_ms: u64) -> Value {
    json!({"version": 1, "generated_at_ms": generated_at_ms, "offers": offers})
}

pub(crate) fn static_offer(input: f64, output: f64, ttft: u64, uptime: f64) -> Value {
    json!({"price": {"input_per_mtok": input, "output_per_mtok": output},
           "latency_ms": {"ttft_p50": ttft}, "uptime": uptime})
}

/// The overhead runs' filter configuration: two providers (both reach the fast upstream).
pub fn overhead_config(mode: &str, full: bool, market: bool) -> String {
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
pub(crate) fn wait_snapshot(
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
