//! Handles on the `mock_provider` and `market_sidecar` binaries (`src/bin/`).

use super::http::{get, post_json, wait_ready_while};
use super::procs::{example_bin, Proc};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// How long a mock gets to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of admin calls.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts an example binary on port 0 and reads the port back from its first log line
/// (`listening on 127.0.0.1:<port>`), then waits for its health endpoint.
fn start_example(
    bin: &str,
    label: &str,
    args: Vec<String>,
    health: &str,
) -> Result<(Proc, u16), String> {
    let path = example_bin(bin)?;
    let mut proc = Proc::spawn(label, &path, args)?;
    let line = proc.wait_for_log("listening on ", START_TIMEOUT)?;
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .ok_or_else(|| format!("{label}: cannot read the port from {line:?}"))?;
    let url = format!("http://127.0.0.1:{port}{health}");
    wait_ready_while(&url, START_TIMEOUT, || proc.check_running())?;
    Ok((proc, port))
}

fn admin_get(url: &str) -> Result<Value, String> {
    let r = get(url, ADMIN_TIMEOUT)?;
    if r.status != 200 {
        return Err(format!("GET {url}: status {}: {}", r.status, r.text()));
    }
    r.json()
}

fn admin_post(url: &str, body: &Value) -> Result<(), String> {
    let r = post_json(url, &[], body, ADMIN_TIMEOUT)?;
    if r.status != 200 {
        return Err(format!("POST {url}: status {}: {}", r.status, r.text()));
    }
    Ok(())
}

/// Start-up behaviour of a mock provider (the CLI flags of `mock_provider`).
#[derive(Debug, Clone, Default)]
pub struct MockOpts {
    /// Require `authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Answer every LLM request with this status and an OpenAI-style error.
    pub status: Option<u16>,
    /// `Retry-After` seconds on error answers.
    pub retry_after: Option<u64>,
    /// Delay before answering, ms.
    pub latency_ms: u64,
    /// Delay before the first SSE event, ms.
    pub ttft_ms: u64,
    /// Delay between SSE events, ms.
    pub chunk_ms: u64,
    /// Never answer.
    pub hang: bool,
    /// Cut the connection mid-body.
    pub reset_mid: bool,
    /// Answer 200 with a body that is not JSON.
    pub malformed: bool,
    /// No per-request log lines (load tests).
    pub quiet: bool,
    /// Compress every answer with this coding (gzip, deflate, br, zstd), asked or not.
    pub compress_always: Option<String>,
    /// Never compress (by default answers are compressed when the request allows it).
    pub no_compress: bool,
    /// Least size of non-streaming answers, bytes.
    pub answer_bytes: u64,
    /// Non-streaming answers chunked, without Content-Length.
    pub chunked: bool,
}

impl MockOpts {
    /// Sets the required API key.
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_string());
        self
    }

    /// Sets the error status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the base latency.
    pub fn latency_ms(mut self, ms: u64) -> Self {
        self.latency_ms = ms;
        self
    }

    /// Sets time to first token and inter-chunk delay of streams.
    pub fn stream_timing(mut self, ttft_ms: u64, chunk_ms: u64) -> Self {
        self.ttft_ms = ttft_ms;
        self.chunk_ms = chunk_ms;
        self
    }

    fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        if let Some(k) = &self.api_key {
            push("--api-key", k.clone());
        }
        if let Some(s) = self.status {
            push("--status", s.to_string());
        }
        if let Some(r) = self.retry_after {
            push("--retry-after", r.to_string());
        }
        if let Some(c) = &self.compress_always {
            push("--compress-always", c.clone());
        }
        if self.answer_bytes > 0 {
            push("--answer-bytes", self.answer_bytes.to_string());
        }
        push("--latency-ms", self.latency_ms.to_string());
        push("--ttft-ms", self.ttft_ms.to_string());
        push("--chunk-ms", self.chunk_ms.to_string());
        for (on, flag) in [
            (self.hang, "--hang"),
            (self.reset_mid, "--reset-mid"),
            (self.malformed, "--malformed"),
            (self.quiet, "--quiet"),
            (self.no_compress, "--no-compress"),
            (self.chunked, "--chunked"),
        ] {
            if on {
                a.push(flag.to_string());
            }
        }
        a
    }
}

/// A running `mock_provider` process, killed on drop.
pub struct MockProvider {
    name: String,
    port: u16,
    proc: Proc,
}

impl MockProvider {
    /// Starts `mock_provider --name <name>` on a port it picks itself.
    pub fn start(name: &str, opts: &MockOpts) -> Result<MockProvider, String> {
        let mut args = vec![
            "--port".to_string(),
            "0".to_string(),
            "--name".to_string(),
            name.to_string(),
        ];
        args.extend(opts.to_args());
        let (proc, port) = start_example(
            "mock_provider",
            &format!("mock-{name}"),
            args,
            "/__mock/health",
        )?;
        Ok(MockProvider {
            name: name.to_string(),
            port,
            proc,
        })
    }

    /// Provider name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The mock's log (one line per request).
    pub fn log_contents(&self) -> String {
        self.proc.log_contents()
    }

    /// `GET /__mock/stats`.
    pub fn stats(&self) -> Result<Value, String> {
        admin_get(&self.url("/__mock/stats"))
    }

    /// LLM requests received since start or the last reset.
    pub fn hits(&self) -> Result<u64, String> {
        let s = self.stats()?;
        s["requests"]
            .as_u64()
            .ok_or_else(|| format!("no `requests` in {s}"))
    }

    /// Requests received on any path but the admin endpoints (LLM or not).
    pub fn seen(&self) -> Result<u64, String> {
        let s = self.stats()?;
        s["seen"]
            .as_u64()
            .ok_or_else(|| format!("no `seen` in {s}"))
    }

    /// The last LLM request received (`model`, `headers`, `body_bytes`...), `null` if none.
    pub fn last_request(&self) -> Result<Value, String> {
        Ok(self.stats()?["last_request"].clone())
    }

    /// Replaces the behaviour (fields left out take their defaults), e.g.
    /// `json!({"status": 503, "retry_after": 2})`.
    pub fn set_behavior(&self, behavior: &Value) -> Result<(), String> {
        admin_post(&self.url("/__mock/behavior"), behavior)
    }

    /// Zeroes the counters and forgets the last request.
    pub fn reset(&self) -> Result<(), String> {
        admin_post(&self.url("/__mock/reset"), &Value::Null)
    }
}

/// A running `market_sidecar` process, killed on drop.
pub struct Sidecar {
    port: u16,
    path: String,
    proc: Proc,
}

impl Sidecar {
    /// Serves `snapshot_file` at `/v1/market/snapshot`.
    pub fn start(snapshot_file: &Path) -> Result<Sidecar, String> {
        Sidecar::start_at(snapshot_file, "/v1/market/snapshot")
    }

    /// Serves `snapshot_file` at `path`.
    pub fn start_at(snapshot_file: &Path, path: &str) -> Result<Sidecar, String> {
        let args = vec![
            "--port".to_string(),
            "0".to_string(),
            "--file".to_string(),
            snapshot_file.to_string_lossy().into_owned(),
            "--path".to_string(),
            path.to_string(),
        ];
        let (proc, port) = start_example("market_sidecar", "sidecar", args, "/__sidecar/health")?;
        Ok(Sidecar {
            port,
            path: path.to_string(),
            proc,
        })
    }

    /// Port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// URL of the snapshot.
    pub fn snapshot_url(&self) -> String {
        self.url(&self.path)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The sidecar's log.
    pub fn log_contents(&self) -> String {
        self.proc.log_contents()
    }

    /// `GET /__sidecar/stats`.
    pub fn stats(&self) -> Result<Value, String> {
        admin_get(&self.url("/__sidecar/stats"))
    }

    /// Snapshot requests received (304s included).
    pub fn hits(&self) -> Result<u64, String> {
        let s = self.stats()?;
        s["requests"]
            .as_u64()
            .ok_or_else(|| format!("no `requests` in {s}"))
    }

    /// Replaces the behaviour, e.g. `json!({"status": 500})`; `json!({})` serves the file again.
    pub fn set_behavior(&self, behavior: &Value) -> Result<(), String> {
        admin_post(&self.url("/__sidecar/behavior"), behavior)
    }

    /// Zeroes the counters.
    pub fn reset(&self) -> Result<(), String> {
        admin_post(&self.url("/__sidecar/reset"), &Value::Null)
    }
}
