//! What the sections share: formatting, admin-endpoint and `/proc` readings, the machine's
//! facts (git, tool versions, load average, the clock).

use super::MODEL;
use market_router_testbed::{crate_root, get};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) use crate::wrk::{clock_ticks_per_sec, cpu_ticks};

pub(crate) use crate::wrk::{git_commit, median, which};

/// Percentile (nearest rank) of sorted values.
pub(crate) fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `x` rounded to `digits` decimals; a value that is not finite stays so (and is serialized
/// as null).
pub(crate) fn round_to(x: f64, digits: i32) -> f64 {
    if x.is_finite() {
        let m = 10f64.powi(digits);
        (x * m).round() / m
    } else {
        x
    }
}

pub(crate) fn fmt_num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "n/a".into()
    }
}

pub(crate) fn fmt_signed(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:+.digits$}")
    } else {
        "n/a".into()
    }
}

pub(crate) fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

pub(crate) fn log(msg: &str) {
    eprintln!("bench: {msg}");
}

/// A chat request body of exactly `size` bytes.
pub fn chat_body(size: usize) -> Result<Vec<u8>, String> {
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

pub(crate) fn admin_json(admin_port: u16, path: &str) -> Result<Value, String> {
    let r = get(
        &format!("http://127.0.0.1:{admin_port}{path}"),
        Duration::from_secs(10),
    )?;
    if r.status != 200 {
        return Err(format!("admin {path}: status {}", r.status));
    }
    r.json()
}

pub(crate) fn admin_text(admin_port: u16, path: &str) -> Result<String, String> {
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
pub(crate) fn stats_map(admin_port: u16, filter: &str) -> Result<BTreeMap<String, u64>, String> {
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
pub(crate) fn histogram(
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

/// A `/proc/<pid>/status` field in kB.
pub(crate) fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Wasm linear memories of a process, from `/proc/<pid>/smaps`: V8 reserves a region of at
/// least 4 GiB per linear memory (mostly inaccessible guard space) and maps the memory's
/// current pages read-write just below it. Returns (committed kB, resident kB) per memory.
pub(crate) fn wasm_memories(pid: u32) -> Option<Vec<(u64, u64)>> {
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
pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(crate) fn git_dirty() -> bool {
    Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(crate_root())
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty())
}

pub(crate) fn tool_version(bin: &Path, arg: &str) -> String {
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

pub(crate) fn utc_now() -> String {
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

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `- **key**: about` for each variant.
pub(crate) fn variant_list(md: &mut String, variants: &[super::overhead::VariantInfo]) {
    for v in variants {
        let _ = writeln!(md, "- **{}**: {}", v.key, v.about);
    }
}

/// A number as `latest.json` writes it (`5.0`, `0.57`; `null` when not finite), for the
/// figures `latest.md` quotes as they are.
pub(crate) fn json_num(x: f64) -> String {
    serde_json::to_string(&x).unwrap_or_default()
}
