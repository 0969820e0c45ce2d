//! The memory section: Envoy's RSS, tcmalloc and wasm linear memory with 0 to 10,000 market
//! offers, after the snapshot is loaded and after traffic; the time to apply a 10,000-offer
//! refresh.

use super::load::load;
use super::market::{offer, snapshot, static_offer, wait_snapshot};
use super::util::{
    admin_json, chat_body, fmt_num, json_num, log, median, now_ms, round_to, stats_map, status_kb,
    wasm_memories,
};
use super::{Opts, LOAD_TIMEOUT, MODEL, SMALL_BODY};
use market_router_testbed::{
    get, Envoy, EnvoyConfig, MockOpts, MockProvider, ProviderCluster, Sidecar, TempDir,
};
use serde::Serialize;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// The memory section of `latest.json`.
#[derive(Debug, Serialize)]
pub struct Memory {
    pub envoy_concurrency: u32,
    pub providers: usize,
    pub rows: Vec<MemRow>,
    /// The refresh of the largest snapshot; null when none was timed.
    pub refresh: Option<Refresh>,
    pub wasm_stats: Vec<String>,
    pub notes: &'static str,
}

/// One snapshot size.
#[derive(Debug, Serialize)]
pub struct MemRow {
    pub offers: usize,
    pub snapshot_json_bytes: usize,
    pub loaded_after_ms: u64,
    pub after_load: MemReading,
    pub requests: usize,
    pub after_traffic: MemReading,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_refreshes: Option<MemReading>,
}

/// Envoy's memory at one moment, MiB (null where it could not be read).
#[derive(Debug, Serialize)]
pub struct MemReading {
    pub rss_mib: Option<f64>,
    pub hwm_mib: Option<f64>,
    pub tcmalloc_allocated_mib: Option<f64>,
    pub tcmalloc_heap_mib: Option<f64>,
    pub wasm_linear_memories: usize,
    pub wasm_linear_per_vm_mib: Vec<VmMemory>,
    pub wasm_linear_size_mib: f64,
    pub wasm_linear_resident_mib: f64,
}

impl std::fmt::Display for MemReading {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        out.write_str(&text)
    }
}

#[derive(Debug, Serialize)]
pub struct VmMemory {
    pub size: f64,
    pub resident: f64,
}

#[derive(Debug, Serialize)]
pub struct Refresh {
    pub offers: usize,
    pub tries: usize,
    pub fetch_to_visible_ms: Vec<f64>,
    pub fetch_to_visible_ms_median: f64,
    pub fetch_to_stored_ms: Vec<f64>,
    pub fetch_to_stored_ms_median: f64,
    pub file_write_to_visible_ms: Vec<f64>,
    pub note: &'static str,
}

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

fn measure_memory(envoy: &Envoy) -> Result<MemReading, String> {
    let pid = envoy.pid();
    let mem = admin_json(envoy.admin_port(), "/memory").unwrap_or(Value::Null);
    let mib = |v: &Value| -> Option<f64> {
        v.as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .or_else(|| v.as_f64())
            .map(|b| round_to(b / 1048576.0, 1))
    };
    let memories = wasm_memories(pid).unwrap_or_default();
    let wasm_size_kb: u64 = memories.iter().map(|m| m.0).sum();
    let wasm_rss_kb: u64 = memories.iter().map(|m| m.1).sum();
    Ok(MemReading {
        rss_mib: status_kb(pid, "VmRSS").map(|k| round_to(k as f64 / 1024.0, 1)),
        hwm_mib: status_kb(pid, "VmHWM").map(|k| round_to(k as f64 / 1024.0, 1)),
        tcmalloc_allocated_mib: mib(&mem["allocated"]),
        tcmalloc_heap_mib: mib(&mem["heap_size"]),
        wasm_linear_memories: memories.len(),
        wasm_linear_per_vm_mib: memories
            .iter()
            .map(|(size, rss)| VmMemory {
                size: round_to(*size as f64 / 1024.0, 2),
                resident: round_to(*rss as f64 / 1024.0, 2),
            })
            .collect(),
        wasm_linear_size_mib: round_to(wasm_size_kb as f64 / 1024.0, 2),
        wasm_linear_resident_mib: round_to(wasm_rss_kb as f64 / 1024.0, 2),
    })
}

/// Runs the memory section.
pub(crate) fn run(opts: &Opts) -> Result<Memory, String> {
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
    let mut refresh: Option<Refresh> = None;
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
        let mut row = MemRow {
            offers: n,
            snapshot_json_bytes: snap_text.len(),
            loaded_after_ms: loaded.as_millis() as u64,
            after_load,
            requests: samples.len(),
            after_traffic,
            after_refreshes: None,
        };
        if n == max_n && n > 0 && opts.refresh_reps > 0 {
            refresh = Some(measure_refresh(
                &envoy,
                &sidecar,
                &snap_path,
                n,
                opts.refresh_reps,
            )?);
            row.after_refreshes = Some(measure_memory(&envoy)?);
        }
        rows.push(row);
    }
    Ok(Memory {
        envoy_concurrency: concurrency,
        providers: MEM_PROVIDERS,
        rows,
        refresh,
        wasm_stats: wasm_stat_names,
        notes: "RSS from /proc/<pid>/status; tcmalloc from admin /memory; wasm linear memory = resident part of the ≥4 GiB anonymous reservations V8 makes per wasm memory (one per VM: the main thread's plus one per worker) in /proc/<pid>/smaps",
    })
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
) -> Result<Refresh, String> {
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
    Ok(Refresh {
        offers: n,
        tries: reps,
        fetch_to_visible_ms: served_to_visible.iter().map(|x| round_to(*x, 0)).collect(),
        fetch_to_visible_ms_median: round_to(median(&served_to_visible), 0),
        fetch_to_stored_ms: served_to_stored.iter().map(|x| round_to(*x, 0)).collect(),
        fetch_to_stored_ms_median: round_to(median(&served_to_stored), 0),
        file_write_to_visible_ms: write_to_visible.iter().map(|x| round_to(*x, 0)).collect(),
        note: "fetch = the sidecar counted the filter's request (polled every 5 ms); stored = the timestamp of the filter's `market snapshot updated` log line (transfer, validation, encoding and the shared-data write, ms resolution); visible = the route endpoint reports the new generated_at_ms (VMs that did not fetch decode it on their next check: each tick, every refresh_ms/4 = 250 ms here, and requests, at most every 250 ms); write → visible adds the wait for the next refresh slot (refresh_ms 1000)",
    })
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

/// The memory part of `latest.md`.
pub(crate) fn markdown_part(memory: Option<&Memory>) -> String {
    let mut md = String::new();
    let Some(m) = memory else {
        return md;
    };
    let (first, last) = (m.rows.first(), m.rows.last());
    let null = || "null".to_string();
    let _ = writeln!(md, "\n## 3. Memory\n");
    let _ = writeln!(
        md,
        "Envoy `--concurrency {}` with market-router ({} providers, route mode), snapshots of N offers (every provider offers N/{} models). Measured once the route endpoint shows all N offers, and again after {} requests. Wasm linear memory: the read-write pages V8 maps below each linear memory's reservation in `/proc/<pid>/smaps` (Envoy has no stat for the V8 heap).\n",
        m.envoy_concurrency,
        m.providers,
        m.providers,
        first.map_or_else(null, |r| r.requests.to_string()),
    );
    let _ = writeln!(
        md,
        "| offers | snapshot JSON | loaded after | Envoy RSS MiB | tcmalloc allocated MiB | wasm linear memory MiB, all VMs (resident) |\n|---:|---:|---:|---:|---:|---:|"
    );
    let mib = |x: Option<f64>| fmt_num(x.unwrap_or(f64::NAN), 1);
    for r in &m.rows {
        let (l, t) = (&r.after_load, &r.after_traffic);
        let _ = writeln!(
            md,
            "| {} | {} KiB | {} ms | {} → {} | {} → {} | {} ({}) → {} ({}) |",
            r.offers,
            fmt_num(r.snapshot_json_bytes as f64 / 1024.0, 0),
            r.loaded_after_ms,
            mib(l.rss_mib),
            mib(t.rss_mib),
            mib(l.tcmalloc_allocated_mib),
            mib(t.tcmalloc_allocated_mib),
            fmt_num(l.wasm_linear_size_mib, 1),
            fmt_num(l.wasm_linear_resident_mib, 1),
            fmt_num(t.wasm_linear_size_mib, 1),
            fmt_num(t.wasm_linear_resident_mib, 1),
        );
    }
    let _ = writeln!(
        md,
        "\nEach cell: after the snapshot is loaded → after the traffic. Wasm linear memories counted: {} (one per VM). Per VM with the largest snapshot, MiB (size/resident): {}.",
        first.map_or_else(null, |r| r.after_traffic.wasm_linear_memories.to_string()),
        last.map(|r| r
            .after_traffic
            .wasm_linear_per_vm_mib
            .iter()
            .map(|vm| format!("{}/{}", json_num(vm.size), json_num(vm.resident)))
            .collect::<Vec<_>>()
            .join(", "))
            .unwrap_or_default()
    );
    if let Some(rf) = &m.refresh {
        let _ = writeln!(
            md,
            "\nRefresh of a {}-offer snapshot (tries: {}): from the sidecar receiving the filter's fetch to the filter's log line saying it stored the validated snapshot (transfer, validation, encoding, shared-data write): median {} ms; to the route endpoint showing the new generation: median {} ms (tries: {} ms). VMs that did not fetch pick a new generation up on their next check (on each tick, every refresh_ms/4 clamped to 50..1000 ms, here 250 ms; and on requests, at most every 250 ms), which dominates the time to visible.",
            rf.offers,
            rf.tries,
            fmt_num(rf.fetch_to_stored_ms_median, 0),
            fmt_num(rf.fetch_to_visible_ms_median, 0),
            rf.fetch_to_visible_ms
                .iter()
                .map(|x| json_num(*x))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    md
}
