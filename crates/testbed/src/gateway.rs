//! One handle on the host in front of the filter, Envoy or Kong's wasm host, for the suites
//! that run one scenario in both (the `_kong` twins of the dispatch-mode scenarios).

use super::envoy::Envoy;
use super::kong::Kong;

/// The host a test bed runs the filter in.
pub enum Gateway {
    /// Envoy with the filter (any failover mode).
    Envoy(Envoy),
    /// Kong's wasm host (nginx + ngx_wasm_module) with the filter in dispatch mode.
    Kong(Kong),
}

impl Gateway {
    /// `http://127.0.0.1:<listener><path>`.
    pub fn url(&self, path: &str) -> String {
        match self {
            Gateway::Envoy(e) => e.url(path),
            Gateway::Kong(k) => k.url(path),
        }
    }

    /// The listener's port.
    pub fn port(&self) -> u16 {
        match self {
            Gateway::Envoy(e) => e.port(),
            Gateway::Kong(k) => k.port(),
        }
    }

    /// The last `n` lines of the host's log (Envoy's output, nginx's error.log).
    pub fn log_tail(&self, n: usize) -> String {
        match self {
            Gateway::Envoy(e) => e.log_tail(n),
            Gateway::Kong(k) => {
                let log = k.error_log();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
        }
    }

    /// Envoy, if that is the host.
    pub fn envoy(&self) -> Option<&Envoy> {
        match self {
            Gateway::Envoy(e) => Some(e),
            Gateway::Kong(_) => None,
        }
    }

    /// Fails unless Kong's error log is free of traps, panics and crashed workers (nothing
    /// to check on Envoy, whose suites check its stats). Skipped while a test panics.
    pub fn assert_no_crash(&self) {
        if let (Gateway::Kong(k), false) = (self, std::thread::panicking()) {
            let crashes = k.crashes();
            assert!(crashes.is_empty(), "Kong's host: {}", crashes.join("\n"));
        }
    }
}
