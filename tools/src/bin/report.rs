//! Per-provider report from a running Envoy with the market-router filter: traffic, failures,
//! tokens, cost and upstream latency, printed as a table and drawn as an SVG.
//!
//! ```text
//! report [--admin http://127.0.0.1:9901] [--out report.svg] [--config plugin.json]
//! ```
//!
//! Reads Envoy's admin `/stats/prometheus`. The filter's counters give, per provider, attempts,
//! successes, failures, failovers, tokens and cost. Latency is Envoy's own histogram
//! `cluster.<cluster>.upstream_rq_time` (p50 estimated from its buckets), so the provider →
//! cluster map is needed: it is taken from the wasm filter's configuration in admin
//! `/config_dump`, or from `--config` (a file holding the plugin configuration JSON).
//!
//! Effective cost: `cost × (1 + retry rate)`, where cost is what the provider's answers cost at
//! the prices the filter used (the `cost_micro_usd` counter: tokens × unit price), and the
//! retry rate is the provider's failovers (failed attempts after which the request went on to
//! another provider) per success. It weighs a provider's price by how much extra work its
//! failures cause. A provider without successes has no retry rate (`-`); its effective cost is
//! its cost.

use market_router_testbed as common;

use clap::Parser;
use common::get;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `name{k="v",...} value` lines; comments and malformed lines are skipped.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()? {
                            (_, '"') => break,
                            (_, '\\') => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            (_, other) => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
        rest = &inner[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A provider as the plugin configuration names it.
#[derive(Debug, Clone, PartialEq)]
struct ProviderRef {
    name: String,
    cluster: String,
}

/// Providers of a plugin configuration document.
fn providers_of(config: &Value) -> Option<Vec<ProviderRef>> {
    let list = config.get("providers")?.as_array()?;
    list.iter()
        .map(|p| {
            Some(ProviderRef {
                name: p.get("name")?.as_str()?.to_string(),
                cluster: p.get("cluster")?.as_str()?.to_string(),
            })
        })
        .collect()
}

/// Plugin configurations found in an Envoy `/config_dump`: every `configuration` StringValue
/// whose value is JSON with a `providers` list.
fn configs_in_dump(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(map) => {
            if let Some(text) = map
                .get("configuration")
                .and_then(|c| c.get("value"))
                .and_then(Value::as_str)
            {
                if let Ok(parsed) = serde_json::from_str::<Value>(text) {
                    if parsed.get("providers").is_some_and(Value::is_array)
                        && !out.contains(&parsed)
                    {
                        out.push(parsed);
                    }
                }
            }
            map.values().for_each(|x| configs_in_dump(x, out));
        }
        Value::Array(items) => items.iter().for_each(|x| configs_in_dump(x, out)),
        _ => {}
    }
}

/// The provider list: from `--config`, else from the wasm filter configuration(s) in
/// `/config_dump` (providers of several filters are merged by name).
fn load_providers(admin: &str, config_file: Option<&str>) -> Result<Vec<ProviderRef>, String> {
    let configs = match config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --config {path}: {e}"))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| format!("--config {path}: not JSON: {e}"))?;
            vec![v]
        }
        None => {
            let url = format!("{admin}/config_dump");
            let r = get(&url, TIMEOUT)?;
            if r.status != 200 {
                return Err(format!("GET {url}: status {}", r.status));
            }
            let mut out = Vec::new();
            configs_in_dump(&r.json()?, &mut out);
            if out.is_empty() {
                return Err(format!(
                    "no market-router configuration in {url}; pass --config <plugin.json>"
                ));
            }
            out
        }
    };
    let mut providers: Vec<ProviderRef> = Vec::new();
    for c in &configs {
        let list = providers_of(c)
            .ok_or_else(|| "the plugin configuration has no valid `providers` list".to_string())?;
        for p in list {
            if !providers.iter().any(|q| q.name == p.name) {
                providers.push(p);
            }
        }
    }
    Ok(providers)
}

/// A name as Envoy's Prometheus output spells it.
fn prom_name(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The counters of one provider, plus the latency of its cluster.
#[derive(Debug, Clone, Default, PartialEq)]
struct Row {
    name: String,
    cluster: String,
    attempts: u64,
    success: u64,
    failure: u64,
    failover: u64,
    circuit_open: u64,
    tokens_in: u64,
    tokens_out: u64,
    cost_usd: f64,
    /// Failovers per success; `None` without successes.
    retry_rate: Option<f64>,
    effective_usd: f64,
    /// Samples in the cluster's `upstream_rq_time` histogram.
    latency_samples: u64,
    p50_ms: Option<f64>,
}

impl Row {
    fn failure_rate(&self) -> Option<f64> {
        (self.attempts > 0).then(|| self.failure as f64 / self.attempts as f64)
    }
}

struct Stats {
    samples: Vec<Sample>,
}

impl Stats {
    /// A filter metric: Envoy 1.40 renders `wasmcustom.market_router.x.y` as
    /// `market_router_x_y`; other versions may add the `envoy_` namespace.
    fn filter_metric(&self, dotted: &str) -> Option<f64> {
        let base = prom_name(dotted);
        let names = [
            base.clone(),
            format!("envoy_{base}"),
            format!("envoy_wasmcustom_{base}"),
        ];
        self.samples
            .iter()
            .find(|s| s.labels.is_empty() && names.contains(&s.name))
            .map(|s| s.value)
    }

    fn counter(&self, dotted: &str) -> u64 {
        self.filter_metric(dotted).map_or(0, |v| v.max(0.0) as u64)
    }

    /// Cumulative buckets `(upper bound, count)` of a cluster histogram, sorted by bound.
    fn cluster_buckets(&self, cluster: &str, histogram: &str) -> Vec<(f64, f64)> {
        let name = format!("envoy_cluster_{histogram}_bucket");
        let mut b: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.label("envoy_cluster_name") == Some(cluster))
            .filter_map(|s| {
                let le = match s.label("le")? {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                Some((le, s.value))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}

/// Quantile `q` of a cumulative histogram, interpolated linearly inside the bucket (as
/// Prometheus' `histogram_quantile` does). `None` without samples.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(prev_bound);
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return Some(bound);
            }
            return Some(prev_bound + (bound - prev_bound) * (rank - prev_count) / in_bucket);
        }
        prev_bound = bound;
        prev_count = count;
    }
    Some(prev_bound)
}

fn rows(stats: &Stats, providers: &[ProviderRef]) -> Vec<Row> {
    providers
        .iter()
        .map(|p| {
            let seg: String = p
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let c = |suffix: &str| stats.counter(&format!("market_router.provider.{seg}.{suffix}"));
            let success = c("success");
            let failover = c("failover");
            let cost_usd = c("cost_micro_usd") as f64 / 1e6;
            let retry_rate = (success > 0).then(|| failover as f64 / success as f64);
            let buckets = stats.cluster_buckets(&p.cluster, "upstream_rq_time");
            Row {
                name: p.name.clone(),
                cluster: p.cluster.clone(),
                attempts: c("attempts"),
                success,
                failure: c("failure"),
                failover,
                circuit_open: c("circuit_open"),
                tokens_in: c("tokens_in"),
                tokens_out: c("tokens_out"),
                cost_usd,
                retry_rate,
                effective_usd: cost_usd * (1.0 + retry_rate.unwrap_or(0.0)),
                latency_samples: buckets.last().map_or(0, |b| b.1.max(0.0) as u64),
                p50_ms: quantile(&buckets, 0.5),
            }
        })
        .collect()
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

/// The table: one header line, one line per provider, whitespace-separated columns.
fn table(rows: &[Row]) -> String {
    let header = [
        "provider",
        "cluster",
        "attempts",
        "success",
        "failure",
        "fail_rate",
        "failover",
        "circuit_open",
        "tokens_in",
        "tokens_out",
        "cost_usd",
        "retry_rate",
        "effective_usd",
        "p50_ms",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        lines.push(vec![
            r.name.clone(),
            r.cluster.clone(),
            r.attempts.to_string(),
            r.success.to_string(),
            r.failure.to_string(),
            opt(r.failure_rate(), |x| format!("{:.1}%", x * 100.0)),
            r.failover.to_string(),
            r.circuit_open.to_string(),
            r.tokens_in.to_string(),
            r.tokens_out.to_string(),
            format!("{:.6}", r.cost_usd),
            opt(r.retry_rate, |x| format!("{x:.3}")),
            format!("{:.6}", r.effective_usd),
            opt(r.p50_ms, |x| format!("{x:.1}")),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One horizontal bar chart: per provider, one bar per series.
struct Chart<'a> {
    title: &'a str,
    series: &'a [(&'a str, &'a str)],
    /// Per provider: its name and one value per series (`None` = no data).
    values: Vec<(String, Vec<Option<f64>>)>,
    unit: &'a str,
    decimals: usize,
}

const WIDTH: f64 = 800.0;
const VALUE_W: f64 = 130.0;
const BAR_H: f64 = 16.0;

impl Chart<'_> {
    /// Room for the longest provider label (about 7 px a character at 12 px), within reason.
    fn label_w(&self) -> f64 {
        let longest = self.values.iter().map(|(n, _)| n.chars().count()).max();
        (longest.unwrap_or(0) as f64 * 7.0 + 20.0).clamp(120.0, WIDTH / 2.0)
    }

    fn height(&self) -> f64 {
        let per = BAR_H * self.series.len() as f64 + 10.0;
        50.0 + per * self.values.len().max(1) as f64
    }

    fn draw(&self, out: &mut String, top: f64) {
        let label_w = self.label_w();
        let _ = writeln!(
            out,
            r#"  <text x="10" y="{:.1}" font-size="15" font-weight="bold">{}</text>"#,
            top + 20.0,
            xml(self.title)
        );
        let mut x = label_w;
        for (name, color) in self.series {
            let _ = writeln!(
                out,
                r#"  <rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                top + 28.0,
                x + 14.0,
                top + 37.0,
                xml(name)
            );
            x += 30.0 + 7.0 * name.len() as f64;
        }
        let max = self
            .values
            .iter()
            .flat_map(|(_, v)| v.iter().flatten())
            .fold(0.0_f64, |m, v| m.max(*v));
        let span = WIDTH - label_w - VALUE_W;
        let mut y = top + 48.0;
        for (provider, vals) in &self.values {
            let group = BAR_H * self.series.len() as f64;
            let _ = writeln!(
                out,
                r#"  <text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
                label_w - 8.0,
                y + group / 2.0 + 4.0,
                xml(provider)
            );
            for ((_, color), v) in self.series.iter().zip(vals) {
                let w = match v {
                    Some(v) if max > 0.0 => (v / max * span).max(1.0),
                    _ => 0.0,
                };
                let label = match v {
                    Some(v) => format!("{v:.prec$} {}", self.unit, prec = self.decimals),
                    None => "no data".to_string(),
                };
                let _ = writeln!(
                    out,
                    r#"  <rect x="{label_w:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                    BAR_H - 3.0,
                    label_w + w + 6.0,
                    y + BAR_H - 5.0,
                    xml(&label)
                );
                y += BAR_H;
            }
            y += 10.0;
        }
    }
}

/// The SVG: a cost chart (cost and effective cost per provider) and a latency chart (upstream
/// p50 per provider).
fn svg(rows: &[Row]) -> String {
    let cost = Chart {
        title: "Cost per provider (USD)",
        series: &[("cost", "#4e79a7"), ("effective (with retries)", "#f28e2b")],
        values: rows
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    vec![Some(r.cost_usd), Some(r.effective_usd)],
                )
            })
            .collect(),
        unit: "USD",
        decimals: 6,
    };
    let latency = Chart {
        title: "Upstream latency p50 per provider (ms)",
        series: &[("p50 upstream_rq_time", "#59a14f")],
        values: rows
            .iter()
            .map(|r| (format!("{} ({})", r.name, r.cluster), vec![r.p50_ms]))
            .collect(),
        unit: "ms",
        decimals: 1,
    };
    let height = cost.height() + latency.height() + 20.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH:.0}" height="{height:.0}" viewBox="0 0 {WIDTH:.0} {height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"  <rect x="0" y="0" width="{WIDTH:.0}" height="{height:.0}" fill="white"/>"#
    );
    cost.draw(&mut out, 0.0);
    latency.draw(&mut out, cost.height() + 10.0);
    out.push_str("</svg>\n");
    out
}

/// `report`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "report",
    about = "Reads a running Envoy's market_router metrics (admin /stats/prometheus) and draws them as an SVG report"
)]
struct Cli {
    /// Envoy's admin address
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// The SVG file to write
    #[arg(long, value_name = "FILE", default_value = "report.svg")]
    out: String,
    /// The plugin configuration, for provider names and prices (else read from the admin config dump)
    #[arg(long, value_name = "FILE")]
    config: Option<String>,
}

fn run() -> Result<(), String> {
    let cli = Cli::parse();
    let admin = cli.admin.trim_end_matches('/').to_string();
    let out = cli.out;
    let config = cli.config;

    let url = format!("{admin}/stats/prometheus");
    let r = get(&url, TIMEOUT)
        .map_err(|e| format!("cannot read {url} ({e}); is Envoy's admin interface there?"))?;
    if r.status != 200 {
        return Err(format!("GET {url}: status {}", r.status));
    }
    let stats = Stats {
        samples: parse_prometheus(&r.text()),
    };
    if stats.filter_metric("market_router.requests").is_none() {
        return Err(format!(
            "no market_router metrics at {url}: is the market-router filter loaded?"
        ));
    }
    let providers = load_providers(&admin, config.as_deref())?;
    let rows = rows(&stats, &providers);

    let mut globals = BTreeMap::new();
    for g in [
        "requests",
        "recovered_by_failover",
        "all_failed",
        "rejected.bad_request",
        "rejected.unknown_model",
        "rejected.too_large",
        "rejected.no_provider",
    ] {
        globals.insert(g, stats.counter(&format!("market_router.{g}")));
    }
    println!("market-router report from {admin}");
    let summary: Vec<String> = globals.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{}", summary.join(" "));
    println!();
    print!("{}", table(&rows));
    println!();
    println!("fail_rate = failure / attempts; retry_rate = failover / success;");
    println!("effective_usd = cost_usd * (1 + retry_rate); p50_ms from cluster.<cluster>.upstream_rq_time.");

    std::fs::write(&out, svg(&rows)).map_err(|e| format!("cannot write {out}: {e}"))?;
    println!("wrote {out}");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("report: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_lines() {
        let s = parse_prometheus(
            "# TYPE x counter\nmarket_router_requests{} 7\nh_bucket{envoy_cluster_name=\"p\\\"q\",le=\"+Inf\"} 3\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].name.as_str(), s[0].value),
            ("market_router_requests", 7.0)
        );
        assert_eq!(s[1].label("envoy_cluster_name"), Some("p\"q"));
        assert_eq!(s[1].label("le"), Some("+Inf"));
    }

    #[test]
    fn quantile_interpolates_in_the_bucket() {
        let b = [(1.0, 0.0), (5.0, 2.0), (10.0, 4.0), (f64::INFINITY, 4.0)];
        assert_eq!(quantile(&b, 0.5), Some(5.0));
        assert_eq!(quantile(&b, 0.75), Some(7.5));
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }
}
