//! A real `redis-server` (Debian's `redis-server` package) for the scale-out tests: on a free
//! loopback port, without persistence (`--save '' --appendonly no`, so a restart starts
//! empty, the worst case the market service must survive), ready once it answers `PING`,
//! killed by its PID on drop.
//!
//! A missing `redis-server` is an error, never a silent skip: [`redis_or_skip`] skips only
//! when `SKIP_REDIS=1` is set on purpose (CI never sets it).

use super::http::free_port;
use super::procs::Proc;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

/// How long redis-server gets to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `$MR_REDIS_SERVER`, else `redis-server` on `PATH` (or in /usr/bin, /usr/sbin).
pub fn redis_server_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MR_REDIS_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("MR_REDIS_SERVER={} does not exist", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "redis-server not found: install Debian's redis-server package \
             (apt-get install redis-server; .ci/run does), or set SKIP_REDIS=1 to skip \
             the Redis tests on purpose"
                .to_string()
        })
}

/// Whether `SKIP_REDIS=1` asks to skip the Redis tests (never set by CI).
pub fn skip_redis() -> bool {
    std::env::var("SKIP_REDIS").is_ok_and(|v| v == "1")
}

/// A Redis for a test: `Ok(None)` only when skipped on request (`SKIP_REDIS=1`, said on
/// stderr); a missing or failing redis-server is an error.
pub fn redis_or_skip(test: &str) -> Result<Option<RedisServer>, String> {
    if skip_redis() {
        eprintln!("{test}: skipped on request (SKIP_REDIS=1)");
        return Ok(None);
    }
    RedisServer::start().map(Some)
}

/// One `PING`: whether the server answers `+PONG`.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A running redis-server, killed on drop.
pub struct RedisServer {
    port: u16,
    proc: Option<Proc>,
    bin: PathBuf,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers `PING`.
    pub fn start() -> Result<RedisServer, String> {
        let bin = redis_server_bin()?;
        let mut r = RedisServer {
            port: free_port(),
            proc: None,
            bin,
        };
        r.restart()?;
        Ok(r)
    }

    /// Port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it (SIGKILL, by its PID): everything it held is gone.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Whether it is running.
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// (Re)starts it on the same port, empty, and waits until it answers `PING`.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut proc = Proc::spawn("redis-server", &self.bin, args)?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !ping(self.port) {
            proc.check_running()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} did not answer PING within {} s; log tail:\n{}",
                    self.port,
                    START_TIMEOUT.as_secs(),
                    proc.log_tail(20)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Its log.
    pub fn log_contents(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_contents())
            .unwrap_or_default()
    }
}
