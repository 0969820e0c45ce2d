//! The failover section: 8 client threads for a fixed time, provider `a` answers 503 from
//! half-way on; market-router in route mode and in envoy mode against Envoy's own retry with
//! outlier detection over the same two mock providers.

use super::load::{load, Sample};
use super::market::static_offer;
use super::util::{chat_body, fmt_num, json_num, log, pass, pct, round_to, stats_map};
use super::{Opts, CHAT_PATH, MODEL, REQ_TIMEOUT, SMALL_BODY};
use market_router_testbed::{
    listener_head, request, Envoy, EnvoyConfig, MockOpts, MockProvider, ProviderCluster,
};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::thread;
use std::time::Duration;

/// The failover section of `latest.json`.
#[derive(Debug, Serialize)]
pub struct Failover {
    pub market_router_envoy_mode: Scenario,
    pub upstream: &'static str,
    pub upstream_rtt_p50_us: u64,
    pub market_router: Scenario,
    pub envoy_retry: Scenario,
    /// The route-mode filter configuration.
    pub market_router_config: Value,
    pub envoy_retry_setup: &'static str,
}

/// One setup's run: healthy until the switch, then provider `a` answers 503.
#[derive(Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub envoy_concurrency: u32,
    pub connections: usize,
    pub secs: u64,
    pub switch_at_s: f64,
    pub requests: usize,
    /// HTTP status (0: transport error) → requests.
    pub by_status: BTreeMap<String, usize>,
    pub success_ratio: f64,
    pub outage_requests: usize,
    pub outage_success_ratio: f64,
    pub dead_attempts: u64,
    pub dead_attempts_per_request: f64,
    pub a_hits: u64,
    pub b_hits: u64,
    pub healthy_rps: f64,
    pub outage_rps: f64,
    pub outage_throughput_share: f64,
    pub healthy_p50_us: u64,
    pub healthy_p99_us: u64,
    pub outage_p50_us: u64,
    pub outage_p99_us: u64,
    pub p99_us: u64,
    pub p99_budget_us: u64,
    pub requests_per_500ms: Vec<usize>,
    pub counters: BTreeMap<String, u64>,
    pub goals: ScenarioGoals,
}

#[derive(Debug, Serialize)]
pub struct ScenarioGoals {
    pub success_100pct: bool,
    pub dead_attempts_le_0_01: bool,
    pub throughput_ge_0_9: bool,
    pub p99_within_budget: bool,
}

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

fn failover_scenario(
    name: &str,
    opts: &Opts,
    body: &[u8],
    rtt_us: u64,
) -> Result<Scenario, String> {
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
    Ok(Scenario {
        name: name.to_string(),
        envoy_concurrency: concurrency,
        connections: threads,
        secs: total.as_secs(),
        switch_at_s: round_to(switched_at_us as f64 / 1e6, 3),
        requests: all.requests,
        by_status,
        success_ratio: round_to(success, 5),
        outage_requests: outage.requests,
        outage_success_ratio: round_to(outage.ok as f64 / outage.requests.max(1) as f64, 5),
        dead_attempts: dead,
        dead_attempts_per_request: round_to(dead_per_req, 5),
        a_hits: a_end,
        b_hits: b_end,
        healthy_rps: round_to(healthy.rps, 0),
        outage_rps: round_to(outage.rps, 0),
        outage_throughput_share: round_to(share, 3),
        healthy_p50_us: healthy.p50_us,
        healthy_p99_us: healthy.p99_us,
        outage_p50_us: outage.p50_us,
        outage_p99_us: outage.p99_us,
        p99_us: all.p99_us,
        p99_budget_us: p99_budget,
        requests_per_500ms: timeline,
        counters,
        goals: ScenarioGoals {
            success_100pct: success >= 1.0,
            dead_attempts_le_0_01: dead_per_req <= 0.01,
            throughput_ge_0_9: share >= 0.9,
            p99_within_budget: outage.p99_us <= p99_budget,
        },
    })
}

/// Runs the failover section: route mode, envoy mode and Envoy's own retry, one after another.
pub(crate) fn run(opts: &Opts) -> Result<Failover, String> {
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
    Ok(Failover {
        market_router_envoy_mode: native,
        upstream: "mock_provider --quiet (a and b), behaviour switched at runtime",
        upstream_rtt_p50_us: rtt,
        market_router: mr,
        envoy_retry: envoy,
        market_router_config: serde_json::from_str::<Value>(&failover_mr_config()).unwrap_or(Value::Null),
        envoy_retry_setup: "one cluster, a at priority 0 and b at priority 1; outlier_detection consecutive_5xx 3, base_ejection_time 5s; retry_on 5xx, num_retries 2, previous_hosts + previous_priorities (default retry back-off)",
    })
}

/// The failover part of `latest.md`.
pub(crate) fn markdown_part(failover: Option<&Failover>) -> String {
    let mut md = String::new();
    let Some(fo) = failover else {
        return md;
    };
    let (mr, nm, ev) = (
        &fo.market_router,
        &fo.market_router_envoy_mode,
        &fo.envoy_retry,
    );
    let _ = writeln!(md, "\n## 2. Failover under load\n");
    let _ = writeln!(
        md,
        "{} client connections (keep-alive, closed loop, 200-byte body) for {} s; provider `a` answers 503 from t = {} s on. Upstreams: two mock providers (`--quiet`), one round trip {} µs (p50, direct). Envoy `--concurrency {}`.\n\n- **market-router**: route mode, `cheapest` (a first, then b), circuit `failure_threshold` 3, `cooldown_ms` 5000; **envoy mode**: the same in `failover.mode: envoy`.\n- **Envoy retry**: {}.\n\nDead-provider attempts: the 503 answers provider `a` counted, over the requests started after the switch. Healthy: from 0.5 s to the switch; outage: from the switch to the end.\n",
        mr.connections,
        mr.secs,
        json_num(mr.switch_at_s),
        fo.upstream_rtt_p50_us,
        mr.envoy_concurrency,
        fo.envoy_retry_setup,
    );
    let _ = writeln!(
        md,
        "| | market-router, route mode | market-router, envoy mode | Envoy retry + outlier detection | goal |\n|---|---:|---:|---:|---|"
    );
    // One row: the cell of each setup (route mode, envoy mode, Envoy retry) and the goal.
    let row = |md: &mut String, label: &str, cell: &dyn Fn(&Scenario) -> String, goal: &str| {
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {goal} |",
            cell(mr),
            cell(nm),
            cell(ev)
        );
    };
    row(&mut md, "requests", &|v| v.requests.to_string(), "");
    row(
        &mut md,
        "success ratio",
        &|v| fmt_num(v.success_ratio * 100.0, 3) + " %",
        "100 %",
    );
    let failed = |v: &Scenario| -> String {
        let mut parts: Vec<String> = v
            .by_status
            .iter()
            .filter(|(k, _)| k.as_str() != "200")
            .map(|(k, n)| {
                let k = if k == "0" {
                    "transport error"
                } else {
                    k.as_str()
                };
                format!("{n} × {k}")
            })
            .collect();
        if parts.is_empty() {
            parts.push("none".into());
        }
        let overflow = v
            .counters
            .get("cluster.providers.upstream_rq_retry_overflow")
            .copied()
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
                fmt_num(v.dead_attempts_per_request, 4),
                v.dead_attempts,
                v.outage_requests
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
                fmt_num(v.healthy_rps, 0),
                fmt_num(v.outage_rps, 0)
            )
        },
        "",
    );
    row(
        &mut md,
        "outage throughput / healthy",
        &|v| fmt_num(v.outage_throughput_share, 3),
        "≥ 0.9",
    );
    row(
        &mut md,
        "p50 µs healthy → outage",
        &|v| format!("{} → {}", v.healthy_p50_us, v.outage_p50_us),
        "",
    );
    row(
        &mut md,
        "p99 µs healthy → outage",
        &|v| format!("{} → {}", v.healthy_p99_us, v.outage_p99_us),
        "outage ≤ healthy + 1 round trip + 5 ms",
    );
    let goals = |v: &Scenario| -> String {
        let g = &v.goals;
        format!(
            "success {} · dead attempts {} · throughput {} · p99 {}",
            pass(g.success_100pct),
            pass(g.dead_attempts_le_0_01),
            pass(g.throughput_ge_0_9),
            pass(g.p99_within_budget)
        )
    };
    row(&mut md, "goals", &goals, "");
    md
}
