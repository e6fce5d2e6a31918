//! Several Velocity instances as one, through a shared Redis (`cluster:`): members (each
//! instance heartbeats a TTL key, so each knows how many are live), the admin overlay kept in
//! Redis with a revision (changes made on one instance reach the others), and the store that
//! cluster-scope rate limits use.
//!
//! At the side, like the admin API: it feeds the membership writer through its channel
//! (`Change::Adopt`), and reads its view; the request path only sees it through a rate limit.
//! With no `cluster:` configured nothing here runs.

pub mod ratelimit;
pub mod store;
mod sync;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use redis::Script;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::ClusterConfig;
use crate::membership::Handle;
pub use store::Store;

/// How often each instance renews its member key.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A member whose key is this old is gone (three heartbeats missed).
const MEMBER_TTL: Duration = Duration::from_secs(3);
/// Deadline of control-plane calls (heartbeat, overlay): generous, they are off the request path.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(1);

/// One live instance, as its last heartbeat described it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    /// Until its key expires.
    pub expires_in: Duration,
    /// What it wrote: host, pid, start time.
    pub info: Value,
}

/// The running cluster membership; shared by the admin API and cluster-scope rate limits.
pub struct Cluster {
    pub config: ClusterConfig,
    pub instance_id: String,
    pub store: Store,
    keys: Keys,
    /// Live instances (this one included) at the last heartbeat; 1 before the first.
    live: AtomicUsize,
    members: ArcSwap<Vec<Member>>,
    /// Whether the last heartbeat reached the store.
    reachable: AtomicBool,
    started: u64,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// Every key Velocity uses, under `key_prefix`. The `{...}` hash tag puts the keys that one
/// script touches together in one Redis Cluster slot.
#[derive(Debug, Clone)]
pub struct Keys {
    pub members: String,
    pub members_info: String,
    pub member: String,
    pub overlay: String,
    /// The pub/sub channel that announces a new overlay revision.
    pub channel: String,
}

impl Keys {
    pub fn new(prefix: &str, instance_id: &str) -> Keys {
        let tag = format!("{{{prefix}}}");
        Keys {
            members: format!("{tag}members"),
            members_info: format!("{tag}members:info"),
            member: format!("{tag}member:{instance_id}"),
            overlay: format!("{tag}overlay"),
            channel: format!("{prefix}overlay"),
        }
    }
}

/// The running cluster, once started: cluster-scope rate limits are built with the snapshot,
/// before the cluster starts, and find it here (one atomic load).
static CURRENT: std::sync::OnceLock<Arc<Cluster>> = std::sync::OnceLock::new();

pub fn current() -> Option<&'static Arc<Cluster>> {
    CURRENT.get()
}

/// `hostname:pid`, the default instance id.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Renew this member's key, drop expired members, list the live ones and read the overlay's
/// revision, in one round trip. Time is Redis's (`TIME`), so instance clocks do not matter.
static HEARTBEAT_LUA: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {redis.call('HGET', KEYS[4], 'revision') or '-1'}
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = tostring(tonumber(live[i + 1]) - now)
  out[#out + 1] = redis.call('HGET', KEYS[2], live[i]) or ''
end
return out
",
    )
});

static LEAVE_LUA: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
",
    )
});

impl Cluster {
    /// Set up the store (lazily: nothing connects here) and start the heartbeat and the
    /// overlay sync.
    pub fn start(config: &ClusterConfig, membership: Handle) -> Result<Arc<Cluster>, String> {
        let instance_id = config.instance_id.clone().unwrap_or_else(default_instance_id);
        let hint: store::Hint = Arc::new(Notify::new());
        let store = Store::new(&config.redis, hint.clone())?;
        let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let cluster = Arc::new(Cluster {
            keys: Keys::new(&config.key_prefix, &instance_id),
            config: config.clone(),
            instance_id,
            store,
            live: AtomicUsize::new(1),
            members: ArcSwap::from_pointee(Vec::new()),
            reachable: AtomicBool::new(false),
            started,
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        info!(
            "cluster: instance {} with the store at {} (key prefix {:?})",
            cluster.instance_id,
            cluster.config.redis.join(", "),
            cluster.config.key_prefix
        );
        let _ = CURRENT.set(cluster.clone());
        let resync = Arc::new(Notify::new());
        let heartbeat = tokio::spawn(heartbeat(cluster.clone(), resync.clone()));
        let sync = tokio::spawn(sync::run(cluster.clone(), membership, hint, resync));
        if let Ok(mut t) = cluster.tasks.lock() {
            t.push(heartbeat);
            t.push(sync);
        }
        Ok(cluster)
    }

    /// Live instances, this one included (at least 1).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed).max(1)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Stop the tasks and take this instance out of the member list (best effort, brief).
    pub async fn leave(&self) {
        if let Ok(mut t) = self.tasks.lock() {
            for task in t.drain(..) {
                task.abort();
            }
        }
        let k = &self.keys;
        let keys = [k.members.as_str(), k.members_info.as_str(), k.member.as_str()];
        let _: Result<i64, String> =
            self.store.script(&LEAVE_LUA, &keys, &[&self.instance_id], Duration::from_millis(200)).await;
    }

    /// What `GET /api/v1/cluster` shows.
    pub fn status(&self) -> Value {
        let b = &self.store.breaker;
        let members: Vec<Value> = self
            .members
            .load()
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "self": m.id == self.instance_id,
                    "expires_in_ms": u64::try_from(m.expires_in.as_millis()).unwrap_or(u64::MAX),
                    "info": m.info,
                })
            })
            .collect();
        json!({
            "enabled": true,
            "instance_id": self.instance_id,
            "redis": self.config.redis,
            "key_prefix": self.config.key_prefix,
            "store": {
                "reachable": self.reachable.load(Ordering::Relaxed),
                "breaker": if b.is_open() { "open" } else { "closed" },
                "errors": b.errors.load(Ordering::Relaxed),
                "fallbacks": b.fallbacks.load(Ordering::Relaxed),
                "timeout_ms": u64::try_from(self.config.store_timeout.as_millis()).unwrap_or(u64::MAX),
                "on_store_error": self.config.on_store_error.name(),
            },
            "live": self.live(),
            "members": members,
        })
    }

    /// One heartbeat: the store's overlay revision (-1: none) on success.
    async fn beat(&self) -> Result<i64, String> {
        let k = &self.keys;
        let keys = [k.members.as_str(), k.members_info.as_str(), k.member.as_str(), k.overlay.as_str()];
        let info =
            json!({"host": host_of(&self.instance_id), "pid": std::process::id(), "started": self.started}).to_string();
        let ttl = u64::try_from(MEMBER_TTL.as_millis()).unwrap_or(3000);
        let out: Vec<String> =
            self.store.script(&HEARTBEAT_LUA, &keys, &[&self.instance_id, &ttl, &info], CONTROL_TIMEOUT).await?;
        let revision = out.first().and_then(|r| r.parse::<i64>().ok()).unwrap_or(-1);
        let mut members: Vec<Member> = out[1.min(out.len())..]
            .chunks_exact(3)
            .map(|c| Member {
                id: c[0].clone(),
                expires_in: Duration::from_millis(c[1].parse::<f64>().map_or(0, |ms| ms.max(0.0) as u64)),
                info: serde_json::from_str(&c[2]).unwrap_or(Value::Null),
            })
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        self.live.store(members.len().max(1), Ordering::Relaxed);
        self.members.store(Arc::new(members));
        Ok(revision)
    }
}

fn host_of(id: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| id.to_owned(), |h| h.trim().to_owned())
}

/// Renew membership every [`HEARTBEAT`]; the heartbeat is also the breaker's probe, and tells
/// the sync when the store's overlay revision differs from ours or the store came back.
async fn heartbeat(cluster: Arc<Cluster>, resync: Arc<Notify>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_revision = i64::MIN;
    loop {
        tick.tick().await;
        match cluster.beat().await {
            Ok(revision) => {
                let was = cluster.reachable.swap(true, Ordering::Relaxed);
                let closed = cluster.store.breaker.close();
                if !was || closed {
                    info!(
                        "cluster: store reachable; {} live instance(s); shared limits and changes resume",
                        cluster.live()
                    );
                    resync.notify_one();
                } else if revision != last_revision {
                    resync.notify_one();
                }
                last_revision = revision;
            }
            Err(e) => {
                let was = cluster.reachable.swap(false, Ordering::Relaxed);
                if cluster.store.breaker.trip() || was {
                    warn!(
                        "cluster: store unreachable ({e}); rate limits follow on_store_error ({}), run-time changes stay local until it is back",
                        cluster.config.on_store_error.name()
                    );
                }
            }
        }
    }
}
