//! Child processes with log files, temp dirs, and locating the binaries the test bed runs.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The workspace root (two levels above this crate), as known at compile time.
pub fn crate_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().nth(2).unwrap_or(here).to_path_buf()
}

/// A directory under the system temp dir, removed on drop unless `MR_KEEP_TMP` is set.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/market-router-<prefix>-<pid>-<n>-<nanos>`.
    pub fn new(prefix: &str) -> Result<TempDir, String> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "market-router-{prefix}-{}-{n}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `dir/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("MR_KEEP_TMP").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process whose stdout and stderr go to `<tempdir>/<name>.log`. Killed (SIGKILL) and
/// reaped on drop; only this child is ever signalled.
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    /// Holds the log; removed after the child is killed.
    dir: TempDir,
}

impl Proc {
    /// Spawns `program args...` with its output going to a fresh log file.
    pub fn spawn<I, S>(name: &str, program: &Path, args: I) -> Result<Proc, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Proc::spawn_cmd(name, cmd)
    }

    /// Spawns a prepared command (env, cwd...) with stdin closed and output going to a fresh
    /// log file; its stdout/stderr settings are overwritten.
    pub fn spawn_cmd(name: &str, mut cmd: Command) -> Result<Proc, String> {
        let dir = TempDir::new(name)?;
        Proc::spawn_in(name, &mut cmd, dir)
    }

    /// Like [`Proc::spawn_cmd`] with a caller-made temp dir (e.g. one holding config files),
    /// which the `Proc` then owns.
    pub fn spawn_in(name: &str, cmd: &mut Command, dir: TempDir) -> Result<Proc, String> {
        let log_path = dir.join(&format!("{name}.log"));
        let out = File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot clone log handle: {e}"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log_path,
            dir,
        })
    }

    /// Name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir this process owns.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whole log so far (lossy UTF-8).
    pub fn log_contents(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log_contents();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `Err` with the exit status and log tail if the process has exited.
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} (pid {}) exited with {status}; log tail:\n{}",
                self.name,
                self.pid(),
                self.log_tail(40)
            )),
            Err(e) => Err(format!(
                "cannot query {} (pid {}): {e}",
                self.name,
                self.pid()
            )),
        }
    }

    /// Waits until a log line contains `needle` and returns that line; fails if the process
    /// exits or `timeout` elapses first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_contents().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not log {needle:?} within {} ms; log tail:\n{}",
                    self.name,
                    timeout.as_millis(),
                    self.log_tail(40)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (if still running) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn exe_name(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Newest modification time of the sources a test bed or tools binary is built from: its
/// `src/bin/<name>.rs` and the test bed library.
fn example_sources_mtime(name: &str) -> Option<SystemTime> {
    let root = crate_root();
    let mut newest = ["crates/testbed", "tools"]
        .iter()
        .filter_map(|c| modified(&root.join(c).join("src/bin").join(format!("{name}.rs"))))
        .max();
    if let Ok(entries) = fs::read_dir(root.join("crates/testbed/src")) {
        for e in entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "rs"))
        {
            let t = modified(&e.path());
            if t > newest {
                newest = t;
            }
        }
    }
    newest
}

/// Path of a built binary of the test bed (mocks) or the tools: `$MR_EXAMPLES_DIR/<name>` if
/// that variable is set, else `<name>` in the `target/<profile>/` dir the current executable
/// lives in (or under). Cargo's `CARGO_BIN_EXE_<name>` reaches only one package's own tests;
/// this finds the binaries of every member. Fails if it is missing, or older than its sources.
pub fn example_bin(name: &str) -> Result<PathBuf, String> {
    let file = exe_name(name);
    let hint = "run `cargo build --workspace --bins` (add --release for a release test bed)";
    if let Some(dir) = std::env::var_os("MR_EXAMPLES_DIR") {
        let p = PathBuf::from(dir).join(&file);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "example `{name}` not found at {}; {hint}",
                p.display()
            ))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot locate the current executable: {e}"))?;
    let found = exe
        .ancestors()
        .skip(1)
        .take(4)
        .map(|d| d.join(&file))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("example `{name}` not found near {}; {hint}", exe.display()))?;
    if let (Some(bin), Some(src)) = (modified(&found), example_sources_mtime(name)) {
        if src > bin {
            return Err(format!(
                "{} is older than its sources; {hint}",
                found.display()
            ));
        }
    }
    Ok(found)
}

/// The Envoy binary: `$ENVOY_BIN`, else the one the `envoy` Python package installs into the
/// crate's `.venv`.
pub fn envoy_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("ENVOY_BIN={} does not exist", p.display()))
        };
    }
    let lib = crate_root().join(".venv").join("lib");
    let tail = ["site-packages", "envoy", "_bin", "envoy"];
    let mut candidates = vec![lib.join("python3.11")];
    if let Ok(entries) = fs::read_dir(&lib) {
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        candidates.extend(dirs);
    }
    candidates
        .into_iter()
        .map(|d| tail.iter().fold(d, |p, t| p.join(t)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "Envoy not found under {}/python3*/site-packages/envoy/_bin/; \
                 run `make envoy` or set ENVOY_BIN",
                lib.display()
            )
        })
}

/// The filter module: `$MR_WASM`, else `target/wasm32-wasip1/release/market_router.wasm`. Not
/// checked for existence.
pub fn wasm_path() -> PathBuf {
    match std::env::var_os("MR_WASM") {
        Some(p) => PathBuf::from(p),
        None => crate_root()
            .join("target")
            .join("wasm32-wasip1")
            .join("release")
            .join("market_router.wasm"),
    }
}

/// Starts Portkey's open-source gateway (`node <preload> <server_js> --headless`) on a free
/// loopback port (the preload keeps it on 127.0.0.1) and waits until it answers.
pub fn start_portkey(
    server_js: &Path,
    preload: &Path,
    timeout: Duration,
) -> Result<(Proc, u16), String> {
    let dir = TempDir::new("portkey")?;
    let port = super::http::free_port();
    let mut cmd = Command::new("node");
    cmd.arg("--import")
        .arg(preload)
        .arg(server_js)
        .arg(format!("--port={port}"))
        .arg("--headless")
        .current_dir(dir.path());
    let mut proc = Proc::spawn_in("portkey", &mut cmd, dir)?;
    super::http::wait_ready_while(&format!("http://127.0.0.1:{port}/"), timeout, || {
        proc.check_running()
    })
    .map_err(|e| format!("Portkey gateway did not start: {e}\n{}", proc.log_tail(15)))?;
    Ok((proc, port))
}
