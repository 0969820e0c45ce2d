//! Scale-out on Redis: several replicas of the service share what their gateways report and
//! serve one snapshot. Without `--redis-url` none of this runs and a replica serves what it
//! builds itself.
//!
//! The design is a **leader lease that publishes the snapshot, over a shared observation
//! log**:
//!
//! - `<prefix>reports` (a stream): every report a replica receives, as fields `id` (unique per
//!   report), `at` (ms, when it was received) and `r` (the report), trimmed to the observation
//!   window (`XADD ... MINID ~`). Every replica reads the whole stream and adds each report once
//!   by its id, so every replica holds the same observations and folds them the same way
//!   ([`crate::observed::Fleet::accept`]).
//! - `<prefix>retry` (a hash): `provider NUL model` → until (ms): the fleet-wide Retry-After
//!   windows, the larger value winning (they may outlast the observation window).
//! - `<prefix>leader`: the lease (`SET NX PX`), renewed on every sync by its holder only.
//! - `<prefix>snapshot` (a hash: `body`, `etag`, `generated_at_ms`, `leader`): written by the
//!   leader, in the same script that checks it still holds the lease. Followers serve it byte
//!   for byte, so every replica answers with the same document and the same ETag.
//! - `<prefix>epoch`: a random id, set when missing. A different one than the replica last saw
//!   means Redis lost its data (a restart without persistence): every replica then shares
//!   again every report it knows (ids make the copies harmless), so the log comes back whole.
//!
//! Why a leader and not each replica folding the shared log itself: the fold is deterministic,
//! but each replica polls the feeds at its own moments, so provenance ages and
//! `generated_at_ms` differ, and with them the bytes and the ETag. One builder gives one
//! document. The shared log still matters: a new leader (the old one gone, its lease expired)
//! already holds every observation, and a replica cut off from Redis keeps serving its own
//! view from what it learned plus what its gateways report meanwhile.
//!
//! Failure: a Redis error drops the link; the replica serves its own snapshot at once (it
//! builds one all along), keeps the reports it receives, and retries every `retry`. Back on
//! Redis it shares what it received meanwhile (or everything, after an epoch change), reads
//! what it missed and follows the leader again. Nothing here is on a snapshot request's or a
//! report's path: both only touch memory.

use crate::observed::{self, WINDOW_MS};
use crate::{lock, now_ms, App, Published};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Client, RedisResult};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Reports pushed per command batch.
const PUSH_BATCH: usize = 128;
/// Stream entries read per command.
const PULL_BATCH: usize = 512;
/// Batches per sync, either way (the rest waits for the next sync).
const MAX_BATCHES: usize = 16;

/// `GET lease == me` → renew it.
const RENEW: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// `GET lease == me` → write the snapshot.
const PUBLISH: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], 'body', ARGV[2], 'etag', ARGV[3], 'generated_at_ms', ARGV[4], 'leader', ARGV[1])
  return 1 else return 0 end";
/// A Retry-After window: the later end wins.
const WINDOW_MAX: &str = r"local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > c then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0";

/// How a replica uses Redis.
#[derive(Debug, Clone)]
pub struct Options {
    /// The Redis client (from `--redis-url`).
    pub client: Client,
    /// Key prefix, so that several markets can share one Redis.
    pub prefix: String,
    /// This replica's name (the lease holder's value; unique per process).
    pub replica: String,
    /// How often a connected replica syncs.
    pub sync: Duration,
    /// The leader lease; a leader that stops renewing is replaced after it.
    pub lease: Duration,
    /// Connection and response timeout.
    pub timeout: Duration,
    /// How often a disconnected replica tries again.
    pub retry: Duration,
}

impl Options {
    /// Options for `url` with the defaults: prefix `market-router:`, sync 100 ms, lease 2 s,
    /// timeout 500 ms, retry 500 ms. A URL Redis cannot use is refused here.
    pub fn new(url: &str, replica: String) -> Result<Options, String> {
        let client =
            Client::open(url).map_err(|e| format!("--redis-url {url:?}: not a Redis URL: {e}"))?;
        Ok(Options {
            client,
            prefix: "market-router:".into(),
            replica,
            sync: Duration::from_millis(100),
            lease: Duration::from_millis(2000),
            timeout: Duration::from_millis(500),
            retry: Duration::from_millis(500),
        })
    }
}

/// The Redis link as `/healthz` and `/metrics` show it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// This replica's name.
    pub replica: String,
    /// Whether the last sync reached Redis.
    pub connected: bool,
    /// Whether this replica holds the lease (publishes the snapshot).
    pub leader: bool,
    /// Who holds the lease, as last read.
    pub leader_id: Option<String>,
    /// Whether the served snapshot is the leader's (read from Redis) rather than this
    /// replica's own.
    pub serving_shared: bool,
    /// Failed syncs and connection attempts.
    pub errors: u64,
    /// Times Redis was found to have lost its data (epoch changed).
    pub epoch_changes: u64,
    /// Reports written to the stream.
    pub pushed: u64,
    /// New reports read from the stream (written by other replicas, or before a restart).
    pub pulled: u64,
    /// Known reports Redis does not hold yet.
    pub unshared: usize,
    /// The last error.
    pub last_error: Option<String>,
}

struct Keys {
    epoch: String,
    reports: String,
    retry: String,
    leader: String,
    snapshot: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            epoch: format!("{prefix}epoch"),
            reports: format!("{prefix}reports"),
            retry: format!("{prefix}retry"),
            leader: format!("{prefix}leader"),
            snapshot: format!("{prefix}snapshot"),
        }
    }
}

/// One connection and what this replica knows of Redis (kept across reconnections: Redis
/// only unreachable for a while still holds what it held).
struct Link {
    conn: Option<MultiplexedConnection>,
    /// The epoch last seen.
    epoch: Option<String>,
    /// The last stream id read.
    cursor: String,
    leader: bool,
    /// The ETag this replica last published as leader.
    published: Option<String>,
}

/// A fresh random-looking id (no crate for it: uniqueness per process start is all it needs).
fn fresh_id(replica: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:016x}",
        crate::fnv1a64(format!("{replica}/{}/{nanos}", std::process::id()).as_bytes())
    )
}

/// The default replica name: `$HOSTNAME` (a pod's name) or `replica`, with the process id.
pub fn default_replica() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "replica".into());
    format!("{host}-{}", std::process::id())
}

/// Field of a Retry-After window in `<prefix>retry`.
fn window_field(provider: &str, model: &str) -> Vec<u8> {
    let mut f = provider.as_bytes().to_vec();
    f.push(0);
    f.extend_from_slice(model.as_bytes());
    f
}

impl App {
    /// Turns sharing on (before [`run`]): reports are then kept by id to be shared.
    pub fn enable_redis(&self, replica: &str) {
        *lock(&self.redis) = Some(Status {
            replica: replica.to_string(),
            ..Status::default()
        });
    }
}

async fn connect(opts: &Options) -> RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(opts.timeout))
        .set_response_timeout(Some(opts.timeout));
    let fut = opts
        .client
        .get_multiplexed_async_connection_with_config(&cfg);
    match tokio::time::timeout(opts.timeout * 2, fut).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connection timed out",
        ))),
    }
}

/// Keeps this replica in sync with Redis, forever (spawn it).
pub async fn run(app: Arc<App>, opts: Options) {
    if app.redis_status().is_none() {
        app.enable_redis(&opts.replica);
    }
    let keys = Keys::new(&opts.prefix);
    let mut l = Link {
        conn: None,
        epoch: None,
        cursor: "0-0".into(),
        leader: false,
        published: None,
    };
    let mut failing = false;
    let mut first = true;
    loop {
        if first {
            first = false;
        } else if l.conn.is_some() {
            tokio::select! {
                _ = app.sync_wake.notified() => {}
                _ = tokio::time::sleep(opts.sync) => {}
            }
        } else {
            tokio::time::sleep(opts.retry).await;
        }
        if l.conn.is_none() {
            match connect(&opts).await {
                Ok(conn) => l.conn = Some(conn),
                Err(e) => {
                    lost(&app, &mut failing, &e.to_string());
                    continue;
                }
            }
        }
        // A whole sync is bounded too: a Redis that accepts and never answers is down.
        let budget = opts.timeout * 4;
        let result = match tokio::time::timeout(budget, sync(&app, &opts, &keys, &mut l)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", budget.as_millis())),
        };
        match result {
            Ok(()) => {
                if failing {
                    tracing::info!(
                        "redis: connected again; sharing observations and following the leader"
                    );
                    failing = false;
                }
            }
            Err(e) => {
                l.conn = None;
                l.leader = false;
                l.published = None;
                lost(&app, &mut failing, &e);
            }
        }
    }
}

/// Redis is out of reach: serve this replica's own view.
fn lost(app: &App, failing: &mut bool, e: &str) {
    app.set_shared_snapshot(None);
    let unshared = lock(&app.fleet).unshared_count();
    app.set_redis_status(|s| {
        s.connected = false;
        s.leader = false;
        s.leader_id = None;
        s.serving_shared = false;
        s.errors += 1;
        s.unshared = unshared;
        s.last_error = Some(e.to_string());
    });
    if !*failing {
        tracing::warn!(
            "redis: {e}; serving this replica's own view, keeping its reports to share later"
        );
        *failing = true;
    } else {
        tracing::debug!("redis: still out of reach: {e}");
    }
}

async fn sync(app: &App, opts: &Options, k: &Keys, l: &mut Link) -> RedisResult<()> {
    let Some(mut conn) = l.conn.clone() else {
        return Ok(());
    };
    let now = now_ms();
    // 1. The epoch: a new one means Redis lost what it held.
    let mut epoch: Option<String> = redis::cmd("GET")
        .arg(&k.epoch)
        .query_async(&mut conn)
        .await?;
    if epoch.is_none() {
        let _: Option<String> = redis::cmd("SET")
            .arg(&k.epoch)
            .arg(fresh_id(&opts.replica))
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        epoch = redis::cmd("GET")
            .arg(&k.epoch)
            .query_async(&mut conn)
            .await?;
    }
    let mut rejoined = false;
    if epoch != l.epoch {
        let mut fleet = lock(&app.fleet);
        if l.epoch.is_some() {
            tracing::warn!(
                "redis: it lost its data (epoch changed); sharing again the {} reports this replica knows",
                fleet.known_count()
            );
            app.set_redis_status(|s| s.epoch_changes += 1);
        }
        // Also on a first connection: what this replica knows may be news to Redis.
        fleet.mark_all_unshared();
        drop(fleet);
        l.epoch = epoch;
        l.cursor = "0-0".into();
        l.published = None;
        rejoined = true;
    }

    // 2. Share what this replica received (and, after a rejoin, everything it knows).
    let mut pushed = 0u64;
    for _ in 0..MAX_BATCHES {
        let batch = lock(&app.fleet).unshared(PUSH_BATCH);
        if batch.is_empty() {
            break;
        }
        let cutoff = now.saturating_sub(WINDOW_MS);
        let mut pipe = redis::pipe();
        for (id, at, body) in &batch {
            pipe.cmd("XADD")
                .arg(&k.reports)
                .arg("MINID")
                .arg("~")
                .arg(cutoff)
                .arg("*")
                .arg("id")
                .arg(id)
                .arg("at")
                .arg(*at)
                .arg("r")
                .arg(body.as_slice())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        let mut fleet = lock(&app.fleet);
        for (id, ..) in &batch {
            fleet.mark_shared(id);
        }
        pushed += batch.len() as u64;
    }
    if pushed > 0 || rejoined {
        let windows = lock(&app.fleet).windows(now);
        if !windows.is_empty() {
            let mut pipe = redis::pipe();
            for (p, m, until) in &windows {
                pipe.cmd("EVAL")
                    .arg(WINDOW_MAX)
                    .arg(1)
                    .arg(&k.retry)
                    .arg(window_field(p, m))
                    .arg(*until)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
    }

    // 3. Read what the other replicas received.
    let mut pulled = 0u64;
    for _ in 0..MAX_BATCHES {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(PULL_BATCH)
            .arg("STREAMS")
            .arg(&k.reports)
            .arg(&l.cursor)
            .query_async(&mut conn)
            .await?;
        let entries: Vec<_> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        let n = entries.len();
        let mut fleet = lock(&app.fleet);
        for e in entries {
            l.cursor = e.id.clone();
            let (Some(id), Some(at), Some(body)) = (
                e.get::<String>("id"),
                e.get::<u64>("at"),
                e.get::<Vec<u8>>("r"),
            ) else {
                tracing::debug!("redis: stream entry {} is not a report; skipped", e.id);
                continue;
            };
            match observed::parse(&body) {
                Ok(r) => {
                    if fleet.accept(&id, at, &r, true) {
                        pulled += 1;
                    }
                }
                Err(err) => tracing::debug!("redis: stream entry {}: {err}; skipped", e.id),
            }
        }
        drop(fleet);
        if n < PULL_BATCH {
            break;
        }
    }
    let windows: HashMap<Vec<u8>, u64> = redis::cmd("HGETALL")
        .arg(&k.retry)
        .query_async(&mut conn)
        .await?;
    let mut opened = false;
    let mut ended: Vec<Vec<u8>> = Vec::new();
    {
        let mut fleet = lock(&app.fleet);
        for (field, until) in &windows {
            if *until <= now {
                ended.push(field.clone());
                continue;
            }
            let mut parts = field.splitn(2, |b| *b == 0);
            let (Some(p), Some(m)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (p, m) = (String::from_utf8_lossy(p), String::from_utf8_lossy(m));
            opened |= fleet.open_window(&p, &m, *until);
        }
    }
    if pulled > 0 || opened {
        app.changed.notify_one();
    }

    // 4. The lease: renewed while it is this replica's (also right after a reconnection).
    let lease_ms = opts.lease.as_millis() as u64;
    let renewed: i64 = redis::Script::new(RENEW)
        .key(&k.leader)
        .arg(&opts.replica)
        .arg(lease_ms)
        .invoke_async(&mut conn)
        .await?;
    if l.leader && renewed != 1 {
        tracing::warn!("redis: lost the leader lease; following");
        l.published = None;
    }
    l.leader = renewed == 1;
    if !l.leader {
        let got: Option<String> = redis::cmd("SET")
            .arg(&k.leader)
            .arg(&opts.replica)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms)
            .query_async(&mut conn)
            .await?;
        if got.is_some() {
            tracing::info!(
                "redis: this replica ({}) leads: it publishes the snapshot",
                opts.replica
            );
            l.leader = true;
            l.published = None;
        }
    }
    let leader_id: Option<String> = redis::cmd("GET")
        .arg(&k.leader)
        .query_async(&mut conn)
        .await?;
    if l.leader && !ended.is_empty() {
        let mut del = redis::cmd("HDEL");
        del.arg(&k.retry);
        for f in &ended {
            del.arg(f.as_slice());
        }
        del.query_async::<()>(&mut conn).await?;
    }

    // 5. The snapshot: the leader publishes its own, the others serve it.
    let mut serving_shared = false;
    if l.leader {
        app.set_shared_snapshot(None);
        if let Some(own) = app.own_snapshot() {
            if l.published.as_deref() != Some(own.etag.as_str()) {
                let ok: i64 = redis::Script::new(PUBLISH)
                    .key(&k.leader)
                    .key(&k.snapshot)
                    .arg(&opts.replica)
                    .arg(own.body.as_slice())
                    .arg(&own.etag)
                    .arg(own.generated_at_ms)
                    .invoke_async(&mut conn)
                    .await?;
                if ok == 1 {
                    l.published = Some(own.etag.clone());
                } else {
                    l.leader = false;
                }
            }
        }
    } else {
        let etag: Option<String> = redis::cmd("HGET")
            .arg(&k.snapshot)
            .arg("etag")
            .query_async(&mut conn)
            .await?;
        let current = read_shared_etag(app);
        let stale_after = 2 * app.config().republish.as_millis() as u64 + lease_ms;
        match etag {
            None => app.set_shared_snapshot(None),
            Some(e) if Some(&e) == current.as_ref() => {
                serving_shared = app
                    .snapshot()
                    .is_some_and(|p| now.saturating_sub(p.generated_at_ms) <= stale_after);
                if !serving_shared {
                    app.set_shared_snapshot(None);
                }
            }
            Some(_) => {
                let (etag, body, generated): (Option<String>, Option<Vec<u8>>, Option<u64>) =
                    redis::cmd("HMGET")
                        .arg(&k.snapshot)
                        .arg("etag")
                        .arg("body")
                        .arg("generated_at_ms")
                        .query_async(&mut conn)
                        .await?;
                match (etag, body, generated) {
                    (Some(etag), Some(body), Some(generated))
                        if now.saturating_sub(generated) <= stale_after && servable(&body, now) =>
                    {
                        app.set_shared_snapshot(Some(Published::from_shared(
                            body, etag, generated,
                        )));
                        serving_shared = true;
                    }
                    _ => app.set_shared_snapshot(None),
                }
            }
        }
    }
    let unshared = lock(&app.fleet).unshared_count();
    let leader = l.leader;
    app.set_redis_status(|s| {
        s.connected = true;
        s.leader = leader;
        s.leader_id = leader_id;
        s.serving_shared = serving_shared;
        s.pushed += pushed;
        s.pulled += pulled;
        s.unshared = unshared;
        s.last_error = None;
    });
    Ok(())
}

fn read_shared_etag(app: &App) -> Option<String> {
    crate::read(&app.shared_snapshot)
        .as_ref()
        .map(|p| p.etag.clone())
}

/// Whether the filter would take the whole document (the leader checked it; a follower
/// checks again rather than serve what it cannot vouch for).
fn servable(body: &[u8], now: u64) -> bool {
    matches!(market_router_core::market::validate_any(body, now), Ok(v) if v.invalid.is_empty())
}
