//! Test bed shared by the integration tests (`tests/`), the mocks (`src/bin/`) and the tools:
//! a small HTTP/1.1 server and client, child-process handling, Envoy and Kong launchers, and
//! handles on the mock provider and market sidecar binaries.
//!
//! Users name it `common` (`use market_router_testbed as common;`). Each user needs only part of it.

#![allow(dead_code, unused_imports)]

pub mod encoding;
pub mod envoy;
pub mod gateway;
pub mod http;
pub mod hyper_serve;
pub mod kong;
pub mod market_service;
pub mod procs;
pub mod redis;
pub mod refusing;
pub mod testbed;

pub use envoy::{listener_head, Envoy, EnvoyConfig, Filter, ProviderCluster, SidecarCluster};
pub use gateway::Gateway;
pub use http::{
    bind_and_serve, free_port, get, handler, post_json, request, serve, split_url, wait_ready,
    wait_ready_while, Conn, Handler, Reply, Request, Response, Server,
};
pub use kong::{kong_nginx_bin, Kong, KongConfig, KongFilter};
pub use market_service::{market_service_bin, venv_catalogs, MarketService};
pub use procs::{crate_root, envoy_bin, example_bin, start_portkey, wasm_path, Proc, TempDir};
pub use redis::{redis_or_skip, RedisServer};
pub use refusing::RefusingPort;
pub use testbed::{MockOpts, MockProvider, Sidecar};

/// 64-bit FNV-1a hash.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Locks a mutex, ignoring poisoning (a panicked holder leaves plain data behind).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Minimal command-line parsing for the mock and tool binaries: `--flag value` and bare `--switch`.
pub struct Args {
    items: Vec<String>,
}

impl Args {
    /// The process arguments, without the program name.
    pub fn from_env() -> Args {
        Args {
            items: std::env::args().skip(1).collect(),
        }
    }

    /// Arguments from a list.
    pub fn from_vec(items: Vec<String>) -> Args {
        Args { items }
    }

    /// Whether `--name` is present.
    pub fn flag(&self, name: &str) -> bool {
        self.items.iter().any(|a| a == name)
    }

    /// The value after `--name`, if any.
    pub fn value(&self, name: &str) -> Result<Option<String>, String> {
        match self.items.iter().position(|a| a == name) {
            None => Ok(None),
            Some(i) => match self.items.get(i + 1) {
                Some(v) if !v.starts_with("--") => Ok(Some(v.clone())),
                _ => Err(format!("{name} needs a value")),
            },
        }
    }

    /// The value after `--name` parsed as `T`, or `default`.
    pub fn parse_or<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.value(name)? {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name}: invalid value {v:?}")),
        }
    }

    /// Errors on any argument that is neither a `valued` flag (followed by its value) nor a
    /// `switch`.
    pub fn check_known(&self, valued: &[&str], switches: &[&str]) -> Result<(), String> {
        let mut i = 0;
        while i < self.items.len() {
            let a = &self.items[i];
            if valued.contains(&a.as_str()) {
                i += 2;
            } else if switches.contains(&a.as_str()) {
                i += 1;
            } else {
                return Err(format!("unknown argument {a:?}"));
            }
        }
        Ok(())
    }
}
