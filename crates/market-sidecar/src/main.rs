//! `market-sidecar`: serves market snapshot v1 built from live feeds and price catalogs.

use clap::Parser;
use market_sidecar::config::Config;
use market_sidecar::{now_ms, serve, shared, App};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The market service of market-router: polls marketplace feeds and price catalogs, maps them
/// to the plugin's provider and model names and serves market snapshot v1.
#[derive(Debug, Parser)]
#[command(name = "market-sidecar", version)]
struct Args {
    /// Configuration file (JSON): sources, provider and model mapping, overrides.
    #[arg(long, short)]
    config: PathBuf,
    /// Address to listen on (port 0 picks a free one; the first stdout line says which).
    #[arg(long, default_value = "127.0.0.1:9901")]
    listen: String,
    /// Path the snapshot is served at.
    #[arg(long, default_value = "/v1/market/snapshot")]
    path: String,
    /// How often the configuration file is checked for changes, seconds.
    #[arg(long, default_value_t = 2.0)]
    reload_interval_s: f64,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Fetch every source once, print the snapshot to stdout and exit.
    #[arg(long)]
    once: bool,
    /// Share observations and one snapshot with the other replicas through this Redis
    /// (`redis://host:6379/0`). Without it the replica serves what it builds itself.
    #[arg(long)]
    redis_url: Option<String>,
    /// Prefix of this market's Redis keys.
    #[arg(long, default_value = "market-router:")]
    redis_prefix: String,
    /// This replica's name in Redis (the leader lease's value); default: $HOSTNAME-<pid>.
    #[arg(long)]
    replica_id: Option<String>,
    /// How often a replica syncs with Redis, milliseconds.
    #[arg(long, default_value_t = 100)]
    redis_sync_ms: u64,
    /// The leader lease, milliseconds: a leader gone is replaced after it.
    #[arg(long, default_value_t = 2000)]
    redis_lease_ms: u64,
}

fn redis_options(args: &Args) -> Result<Option<shared::Options>, String> {
    let Some(url) = &args.redis_url else {
        return Ok(None);
    };
    if !(10..=10_000).contains(&args.redis_sync_ms) {
        return Err(format!(
            "--redis-sync-ms {}: expected 10 to 10000",
            args.redis_sync_ms
        ));
    }
    if args.redis_lease_ms < 3 * args.redis_sync_ms || args.redis_lease_ms > 60_000 {
        return Err(format!(
            "--redis-lease-ms {}: expected at least 3 times --redis-sync-ms ({}) and at most 60000",
            args.redis_lease_ms,
            3 * args.redis_sync_ms
        ));
    }
    let replica = args
        .replica_id
        .clone()
        .unwrap_or_else(shared::default_replica);
    if replica.is_empty() {
        return Err("--replica-id: expected a non-empty name".into());
    }
    let mut o = shared::Options::new(url, replica)?;
    o.prefix = args.redis_prefix.clone();
    o.sync = Duration::from_millis(args.redis_sync_ms);
    o.lease = Duration::from_millis(args.redis_lease_ms);
    Ok(Some(o))
}

async fn run(args: Args) -> Result<(), String> {
    let config = Config::load(&args.config)?;
    if args.check {
        println!(
            "{}: OK ({} sources, {} providers, {} models)",
            args.config.display(),
            config.sources.len(),
            config.providers.len(),
            config.models.len()
        );
        return Ok(());
    }
    if !args.path.starts_with('/') {
        return Err(format!(
            "--path {:?}: expected a path starting with /",
            args.path
        ));
    }
    if !(args.reload_interval_s.is_finite() && args.reload_interval_s > 0.0) {
        return Err("--reload-interval-s: expected a positive number".into());
    }
    let redis = redis_options(&args)?;
    let app = App::new(config)?;
    if args.once {
        let cfg = app.config();
        for s in &cfg.sources {
            for key in s.feed_keys() {
                app.poll(s, &key).await;
            }
        }
        app.rebuild(now_ms());
        let snap = app
            .snapshot()
            .ok_or("no snapshot: no source could be loaded")?;
        println!("{}", String::from_utf8_lossy(&snap.body));
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let tasks = app.start();
    if let Some(o) = redis {
        tracing::info!(
            "sharing observations and the snapshot through Redis as replica {} (keys {}*)",
            o.replica,
            o.prefix
        );
        app.enable_redis(&o.replica);
        tokio::spawn(shared::run(app.clone(), o));
    }
    tokio::spawn(app.clone().run_builder());
    tokio::spawn(app.clone().run_reloader(
        args.config.clone(),
        Duration::from_secs_f64(args.reload_interval_s),
        tasks,
    ));
    println!("market-sidecar listening on {addr}");
    tracing::info!(
        "serving {} on {addr}; {} sources",
        args.path,
        app.config().sources.len()
    );
    axum::serve(listener, serve::router(app, &args.path))
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| format!("server failed: {e}"))
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("market-sidecar: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("market-sidecar: {e}");
            ExitCode::from(2)
        }
    }
}
