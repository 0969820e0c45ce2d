//! Test bed shared by the integration tests (`tests/`), the mocks (`src/bin/`) and the tools:
//! a small HTTP/1.1 server and client, child-process handling, Envoy and Kong launchers, and
//! handles on the mock provider and market sidecar binaries.
//!
//! Users name it `common` (`use market_router_testbed as common;`). Each user needs only part of it.

#![allow(dead_code, unused_imports)]

pub mod encoding;
pub mod envoy;
pub mod fleet;
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
