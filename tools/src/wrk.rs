//! What the benchmarks share: running wrk with a Lua script that prints one JSON summary line,
//! the median of a set of figures, finding a tool on PATH, the commit measured.

use market_router_testbed::crate_root;
use serde_json::Value;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// One wrk run: `threads` threads, `conns` connections, `secs` seconds, 5 s request timeout,
/// `script` (a Lua script whose `done` prints `<prefix><json>`) against `url`. Returns that
/// JSON; a run that outlives `secs` by 20 s is killed and is an error.
pub fn run(
    bin: &Path,
    threads: u32,
    conns: u32,
    secs: u64,
    script: &Path,
    url: &str,
    prefix: &str,
) -> Result<Value, String> {
    let mut child = Command::new(bin)
        .arg("-t")
        .arg(threads.to_string())
        .arg("-c")
        .arg(conns.to_string())
        .arg("-d")
        .arg(format!("{secs}s"))
        .args(["--timeout", "5s", "-s"])
        .arg(script)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(secs + 20);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("wrk did not finish in time".into());
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .ok_or_else(|| format!("wrk ({status}) printed no summary: {out}{err}"))?;
    serde_json::from_str(line).map_err(|e| format!("wrk summary {line:?}: {e}"))
}

/// The median of the finite values; NaN when there are none.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The median of the finite values; `None` when there are none.
pub fn median_of(v: &[f64]) -> Option<f64> {
    Some(median(v)).filter(|m| !m.is_nan())
}

/// `name` on PATH, or in /usr/sbin or /sbin.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The short commit of the checkout; `unknown` outside git.
pub fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(crate_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 when it cannot be read.
pub fn clock_ticks_per_sec() -> f64 {
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
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::{median, median_of};

    #[test]
    fn median_of_odd_even_and_non_finite_sets() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0, f64::INFINITY]), 5.0);
        assert!(median(&[f64::NAN]).is_nan());
        assert_eq!(median_of(&[2.0, 1.0]), Some(1.5));
        assert_eq!(median_of(&[]), None);
        assert_eq!(median_of(&[f64::NAN]), None);
    }
}
