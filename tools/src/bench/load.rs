//! Load generators: wrk with a Lua script printing one JSON summary line, and a Rust
//! keep-alive loop recording every request's status and latency.

use super::{CHAT_PATH, CLUSTER_HEADER, REQ_TIMEOUT};
use market_router_testbed::{Conn, TempDir};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct WrkOut {
    pub requests: u64,
    pub secs: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub non2xx: u64,
    pub errors: u64,
}

pub struct Wrk {
    bin: PathBuf,
    dir: TempDir,
}

impl Wrk {
    pub fn new(bin: PathBuf) -> Result<Wrk, String> {
        Ok(Wrk {
            bin,
            dir: TempDir::new("wrk")?,
        })
    }

    /// A Lua script posting `body` with the cluster header, printing a JSON summary line.
    pub fn script(&self, name: &str, body: &[u8]) -> Result<PathBuf, String> {
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
    pub fn gzip_twin(script: &Path) -> PathBuf {
        let stem = script
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        script.with_file_name(format!("{stem}-gz.lua"))
    }

    pub fn run(
        &self,
        script: &Path,
        url: &str,
        threads: u32,
        conns: u32,
        secs: u64,
    ) -> Result<WrkOut, String> {
        let v = crate::wrk::run(&self.bin, threads, conns, secs, script, url, "BENCHJSON ")?;
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

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Start, µs after the load began.
    pub(crate) start_us: u64,
    /// Latency, µs.
    pub(crate) lat_us: u64,
    /// HTTP status; 0 for a transport error.
    pub(crate) status: u16,
}

/// Runs `threads` keep-alive clients posting `body` to `authority` until `until` (or `count`
/// requests per thread), with `during` running on the calling thread meanwhile.
pub(crate) fn load<F: FnOnce(Instant)>(
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
