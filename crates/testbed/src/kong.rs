//! Kong's proxy-wasm host for the test bed: nginx built with ngx_wasm_module on wasmtime (the
//! host Kong Gateway embeds; `scripts/kong-host.sh` builds it), one generated nginx.conf, and a
//! running-host handle that starts on free ports, waits for a real request, and stops by PID.

use super::http::{free_port, get, wait_ready_while};
use super::procs::{crate_root, wasm_path, Proc, TempDir};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// How long [`Kong::start`] waits for readiness (each worker compiles the module: 0.5-1 s).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// What nginx logs when a worker failed its start (e.g. the filter refused its configuration,
/// "on_configure failure"): it is not respawned, so nothing will ever answer.
const NOT_RESPAWNED: &str = "cannot be respawned";
const NOT_RESPAWNED_WHY: &str = "a worker exited at start and cannot be respawned";
/// How long a stop waits for the master to quit before signalling the workers.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The nginx binary with ngx_wasm_module: `$MR_KONG_NGINX`, else what `scripts/kong-host.sh
/// path` reports (built for the current inputs). Never builds: `make kong-host` does.
pub fn kong_nginx_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MR_KONG_NGINX") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("MR_KONG_NGINX={} does not exist", p.display()))
        };
    }
    let script = crate_root().join("scripts").join("kong-host.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("path")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "Kong's wasm host is not built: {}; run `make kong-host` or set MR_KONG_NGINX",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "kong-host.sh path gave {}, not a file",
            p.display()
        ))
    }
}

/// What runs in the test location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KongFilter {
    /// No filter: nginx's `proxy_pass` alone (the benchmark's baseline).
    None,
    /// The market-router module at [`wasm_path`] with this plugin configuration.
    MarketRouter {
        /// Plugin configuration JSON.
        config_json: String,
    },
}

/// A generated nginx.conf: one listener whose `/` location runs the filter and then
/// `proxy_pass`es to `upstream` (a port on 127.0.0.1; by default a server of this nginx that
/// answers 404 `{"error":"fallthrough"}`, so a request the filter let through is visible, and
/// 200 at `/__kong/ready`, which readiness asks through the filter's location).
#[derive(Debug, Clone)]
pub struct KongConfig {
    /// nginx worker processes.
    pub workers: usize,
    /// The filter.
    pub filter: KongFilter,
    /// Where `proxy_pass` sends what the filter lets through (`None`: the 404 server).
    pub upstream: Option<u16>,
    /// `client_body_buffer_size`: bodies over it are spilled to a file the filter never sees,
    /// so it must be at least `limits.max_body_bytes` (Kong's default is 8k).
    pub client_body_buffer_size: String,
    /// `client_max_body_size`: nginx answers 413 above it before the filter runs.
    pub client_max_body_size: String,
    /// `shm_kv` zones: (name, size). The filter's keys `<prefix>/...` go to zone `<prefix>`.
    pub shm_kv: Vec<(String, String)>,
    /// PEM file of CAs the wasm sockets trust (TLS dispatches verify certificate and host).
    pub tls_trusted_certificate: Option<PathBuf>,
    /// `error_log` level.
    pub log_level: String,
    /// `keepalive_requests` of client connections (nginx's default, 1000, when `None`).
    /// ngx_wasm_module takes each dispatched call's buffers from the client connection's
    /// pool, which grows until the connection closes; every free walks it.
    pub keepalive_requests: Option<u32>,
    /// Raw `server { ... }` blocks added to `http {}` (e.g. a TLS front for a mock).
    pub extra_servers: Vec<String>,
    /// nginx's gzip filter on the filter's answers (`gzip on` for JSON and event streams,
    /// whatever their size; Kong: `nginx_proxy_gzip` and friends), like the compressor Envoy
    /// ships in front of the filter.
    pub compression: bool,
    /// Wait for this many `market-router configured` lines before the first request (the
    /// default: one per worker when the filter is market-router; 0 to skip, for a bad config).
    pub expect_configured: Option<usize>,
}

impl Default for KongConfig {
    fn default() -> Self {
        KongConfig {
            workers: 1,
            filter: KongFilter::None,
            upstream: None,
            client_body_buffer_size: "1m".to_string(),
            client_max_body_size: "8m".to_string(),
            shm_kv: vec![("mr".to_string(), "16m".to_string())],
            tls_trusted_certificate: None,
            log_level: "info".to_string(),
            keepalive_requests: None,
            extra_servers: Vec::new(),
            compression: false,
            expect_configured: None,
        }
    }
}

/// An nginx single-quoted string: backslashes and quotes escaped.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl KongConfig {
    /// One worker, no filter, 1m body buffer, zone `mr` of 16m.
    pub fn new() -> KongConfig {
        KongConfig::default()
    }

    /// Runs market-router with this plugin configuration.
    pub fn market_router(mut self, config_json: &str) -> Self {
        self.filter = KongFilter::MarketRouter {
            config_json: config_json.to_string(),
        };
        self
    }

    /// Sets the worker count.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Sends what the filter lets through to this port.
    pub fn upstream(mut self, port: u16) -> Self {
        self.upstream = Some(port);
        self
    }

    /// Sets `client_body_buffer_size`.
    pub fn client_body_buffer_size(mut self, size: &str) -> Self {
        self.client_body_buffer_size = size.to_string();
        self
    }

    /// Trusts this CA file on the filter's TLS calls.
    pub fn trust(mut self, ca: &Path) -> Self {
        self.tls_trusted_certificate = Some(ca.to_path_buf());
        self
    }

    /// Sets `keepalive_requests` of client connections.
    pub fn keepalive_requests(mut self, n: u32) -> Self {
        self.keepalive_requests = Some(n);
        self
    }

    /// Adds a raw `server {}` block.
    pub fn server(mut self, block: &str) -> Self {
        self.extra_servers.push(block.to_string());
        self
    }

    /// Compresses the filter's answers with nginx's gzip filter.
    pub fn compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }

    /// Waits for `n` configured lines at start (0: none).
    pub fn expect_configured(mut self, n: usize) -> Self {
        self.expect_configured = Some(n);
        self
    }

    /// The nginx.conf text for listener `port`, 404 server `fallthrough`, files under `dir`.
    pub fn render(&self, port: u16, fallthrough: u16, dir: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "daemon off;\nmaster_process on;");
        let _ = writeln!(s, "worker_processes {};", self.workers);
        if is_root() {
            let _ = writeln!(s, "user root;");
        }
        let _ = writeln!(s, "pid {};", dir.join("nginx.pid").display());
        let _ = writeln!(
            s,
            "error_log {} {};",
            dir.join("error.log").display(),
            self.log_level
        );
        let _ = writeln!(s, "events {{ worker_connections 4096; }}");
        if let KongFilter::MarketRouter { .. } = &self.filter {
            let _ = writeln!(s, "wasm {{");
            let _ = writeln!(s, "    module market_router {};", wasm_path().display());
            for (name, size) in &self.shm_kv {
                let _ = writeln!(s, "    shm_kv {name} {size};");
            }
            // Without it the module resolves names through a public DNS server.
            let _ = writeln!(s, "    resolver 127.0.0.1 ipv6=off;");
            if let Some(ca) = &self.tls_trusted_certificate {
                let _ = writeln!(s, "    tls_trusted_certificate {};", ca.display());
                let _ = writeln!(s, "    tls_verify_cert on;\n    tls_verify_host on;");
            }
            let _ = writeln!(s, "}}");
        }
        let upstream = self.upstream.unwrap_or(fallthrough);
        let _ = writeln!(s, "http {{");
        let _ = writeln!(s, "    access_log off;");
        if let Some(n) = self.keepalive_requests {
            let _ = writeln!(s, "    keepalive_requests {n};");
        }
        let _ = writeln!(
            s,
            "    client_body_buffer_size {};\n    client_max_body_size {};",
            self.client_body_buffer_size, self.client_max_body_size
        );
        let _ = writeln!(
            s,
            "    upstream fallthrough {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
        );
        let _ = writeln!(s, "    server {{");
        let _ = writeln!(s, "        listen 127.0.0.1:{port} reuseport;");
        let _ = writeln!(s, "        location / {{");
        if let KongFilter::MarketRouter { config_json } = &self.filter {
            let _ = writeln!(
                s,
                "            proxy_wasm market_router {};",
                quoted(config_json)
            );
        }
        if self.compression {
            let _ = writeln!(
                s,
                "            gzip on; gzip_min_length 1; gzip_proxied any; gzip_types application/json text/event-stream;"
            );
        }
        // Which worker answered (the circuit and affinity tests need both to take part).
        let _ = writeln!(s, "            add_header x-kong-worker $pid always;");
        let _ = writeln!(s, "            proxy_http_version 1.1;");
        let _ = writeln!(s, "            proxy_set_header Connection \"\";");
        let _ = writeln!(s, "            proxy_pass http://fallthrough;");
        let _ = writeln!(s, "        }}");
        // Readiness: through the filter, to the fallthrough server's 200 (whatever `upstream`).
        let _ = writeln!(s, "        location = /__kong/ready {{");
        if let KongFilter::MarketRouter { config_json } = &self.filter {
            let _ = writeln!(
                s,
                "            proxy_wasm market_router {};",
                quoted(config_json)
            );
        }
        let _ = writeln!(s, "            proxy_pass http://127.0.0.1:{fallthrough};");
        let _ = writeln!(s, "        }}\n    }}");
        let _ = writeln!(s, "    server {{");
        let _ = writeln!(s, "        listen 127.0.0.1:{fallthrough};");
        let _ = writeln!(
            s,
            "        location / {{ default_type application/json; return 404 '{{\"error\":\"fallthrough\"}}'; }}"
        );
        // Readiness: a GET through the filter's location lands here.
        let _ = writeln!(
            s,
            "        location = /__kong/ready {{ return 200 'ready'; }}"
        );
        let _ = writeln!(s, "    }}");
        for block in &self.extra_servers {
            let _ = writeln!(s, "    {block}");
        }
        let _ = writeln!(s, "}}");
        s
    }
}

/// Two distinct free loopback ports.
fn two_free_ports() -> (u16, u16) {
    let held = [
        std::net::TcpListener::bind("127.0.0.1:0"),
        std::net::TcpListener::bind("127.0.0.1:0"),
    ];
    let port = |l: &std::io::Result<std::net::TcpListener>| {
        l.as_ref()
            .ok()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(free_port, |a| a.port())
    };
    (port(&held[0]), port(&held[1]))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                    let rest = st.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Whether `pid` still runs (and is not a zombie).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            st.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|s| s != "Z"))
        })
        .unwrap_or(false)
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A running nginx with ngx_wasm_module. Stopped on drop: `QUIT` to the master, then `TERM`
/// (and at last `KILL`) to any of its workers still there, each by its PID.
pub struct Kong {
    proc: Proc,
    port: u16,
    workers: Vec<u32>,
    dir: PathBuf,
    conf: String,
}

impl Kong {
    /// Writes the config into a temp dir, starts nginx on free ports and waits until the
    /// filter is configured in every worker and a real request through the location answers.
    pub fn start(cfg: &KongConfig) -> Result<Kong, String> {
        let bin = kong_nginx_bin()?;
        if let KongFilter::MarketRouter { .. } = cfg.filter {
            let wasm = wasm_path();
            if !wasm.is_file() {
                return Err(format!(
                    "no filter at {} (run `make build`)",
                    wasm.display()
                ));
            }
        }
        let dir = TempDir::new("kong")?;
        fs::create_dir_all(dir.join("logs")).map_err(|e| format!("cannot create logs/: {e}"))?;
        // Picked while both are held: two free_port() calls in a row can return one port
        // twice (then nginx refuses the second server and the bed never gets ready).
        let (port, fallthrough) = two_free_ports();
        let conf = cfg.render(port, fallthrough, dir.path());
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, &conf).map_err(|e| format!("cannot write nginx.conf: {e}"))?;
        let dir_path = dir.path().to_path_buf();
        let mut cmd = Command::new(&bin);
        cmd.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path);
        let proc = Proc::spawn_in("nginx", &mut cmd, dir)?;
        let mut kong = Kong {
            proc,
            port,
            workers: Vec::new(),
            dir: dir_path,
            conf,
        };
        kong.wait_ready(cfg)?;
        Ok(kong)
    }

    fn wait_ready(&mut self, cfg: &KongConfig) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let want = match cfg.filter {
            KongFilter::MarketRouter { .. } => cfg.expect_configured.unwrap_or(cfg.workers),
            KongFilter::None => 0,
        };
        loop {
            self.proc.check_running().map_err(|e| self.fail(&e))?;
            let log = self.error_log();
            if log.contains(NOT_RESPAWNED) {
                return Err(self.fail(NOT_RESPAWNED_WHY));
            }
            if want == 0 || log.matches("market-router configured").count() >= want {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.fail(&format!(
                    "the filter was not configured in {want} worker(s) within {} s",
                    READY_TIMEOUT.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
        // A real request through the test location: nginx accepts, the filter (if any) sees it.
        let left = deadline.saturating_duration_since(Instant::now());
        let url = self.url("/__kong/ready");
        let proc = &mut self.proc;
        let log = self.dir.join("error.log");
        wait_ready_while(&url, left, || {
            proc.check_running()?;
            let text = fs::read(&log).unwrap_or_default();
            if String::from_utf8_lossy(&text).contains(NOT_RESPAWNED) {
                return Err(NOT_RESPAWNED_WHY.to_string());
            }
            Ok(())
        })
        .map_err(|e| self.fail(&format!("no answer from the listener: {e}")))?;
        self.workers = children_of(self.proc.pid());
        Ok(())
    }

    fn fail(&self, why: &str) -> String {
        let log = self.error_log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        format!(
            "Kong's wasm host: {why}\n--- nginx output:\n{}\n--- error.log tail:\n{}",
            self.proc.log_tail(20),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Listener port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Master PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Worker PIDs seen at start.
    pub fn worker_pids(&self) -> &[u32] {
        &self.workers
    }

    /// The generated nginx.conf.
    pub fn conf(&self) -> &str {
        &self.conf
    }

    /// The whole error log (the filter's log lines are there too).
    pub fn error_log(&self) -> String {
        fs::read(self.dir.join("error.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Error-log lines that show a trap, a panic or a crashed worker.
    pub fn crashes(&self) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("trap")
                    || l.contains("panicked")
                    || l.contains("unreachable")
                    || l.contains("exited on signal")
                    || l.contains("[emerg]")
                    || l.contains("[crit]")
            })
            .map(str::to_string)
            .collect()
    }

    /// Waits until a log line containing `needle` appears `count` times.
    pub fn wait_for_log(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.error_log().matches(needle).count() >= count {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.fail(&format!("{count} x {needle:?} not logged in time")));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops nginx: QUIT to the master, then TERM and KILL to lingering workers, by PID.
    pub fn stop(&mut self) {
        let master = self.proc.pid();
        let mut pids = self.workers.clone();
        for p in children_of(master) {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
        if self.proc.check_running().is_ok() {
            signal("QUIT", master);
            let deadline = Instant::now() + QUIT_TIMEOUT;
            while self.proc.check_running().is_ok() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(25));
            }
        }
        // A worker holding a tick timer may linger after the master is gone.
        let lingering: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
        for p in &lingering {
            signal("TERM", *p);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while lingering.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(25));
        }
        for p in lingering.iter().filter(|p| alive(**p)) {
            signal("KILL", *p);
        }
        self.proc.kill();
    }
}

impl Drop for Kong {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (made with the openssl command):
/// (certificate, key), both PEM, in `dir`. The certificate is its own CA.
pub fn self_signed_cert(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((cert, key))
}

/// A `server {}` block that terminates TLS on `port` with `cert`/`key` and proxies to
/// `upstream` on 127.0.0.1 (a TLS front for a plain mock provider).
pub fn tls_front(port: u16, cert: &Path, key: &Path, upstream: u16) -> String {
    format!(
        "server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {}; \
         location / {{ proxy_http_version 1.1; proxy_buffering off; proxy_pass http://127.0.0.1:{upstream}; }} }}",
        cert.display(),
        key.display()
    )
}

/// GET `/` through the location (readiness without the filter's explain endpoints).
pub fn probe(kong: &Kong) -> Result<u16, String> {
    get(&kong.url("/"), Duration::from_secs(5)).map(|r| r.status)
}
