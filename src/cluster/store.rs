//! The connection to the cluster store: one Redis (a connection manager, which reconnects by
//! itself) or a Redis Cluster (`cluster-async`). Both connect lazily: a config loads, and an
//! instance starts and serves, with Redis down. Every call has a deadline, and a circuit
//! breaker keeps requests from waiting on a store that is known to be down.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, ToRedisArgs};
use tokio::sync::Notify;

/// Consecutive failed requests that open the breaker.
const BREAKER_THRESHOLD: u32 = 3;
/// A (re)connect attempt gives up after this: the heartbeat comes round again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    pub breaker: Arc<Breaker>,
}

/// A message on the overlay channel (or a reconnect): time to look at the store's overlay.
pub type Hint = Arc<Notify>;

impl Store {
    /// Set up the connection without connecting. `hint` is notified on every pub/sub message
    /// and on every disconnect.
    pub fn new(urls: &[String], hint: Hint) -> Result<Store, String> {
        let push = {
            let hint = hint.clone();
            move |info: PushInfo| -> Result<(), ()> {
                if matches!(info.kind, PushKind::Message | PushKind::Disconnection) {
                    hint.notify_one();
                }
                Ok(())
            }
        };
        let conn = if urls.len() == 1 {
            let info = urls[0].as_str().into_connection_info().map_err(|e| format!("cluster.redis: {e}"))?;
            // RESP3: pub/sub messages arrive on the same multiplexed connection as commands.
            let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(settings)).map_err(|e| e.to_string())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500))
                .set_push_sender(push)
                .set_automatic_resubscription();
            Conn::Single(client.get_connection_manager_lazy(config).map_err(|e| format!("cluster.redis: {e}"))?)
        } else {
            let client = redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(push)
                .connection_timeout(CONNECT_TIMEOUT)
                .retries(1)
                .build()
                .map_err(|e| format!("cluster.redis: {e}"))?;
            let config = redis::cluster::ClusterConfig::new().set_connection_timeout(CONNECT_TIMEOUT);
            Conn::Cluster(client.get_pending_async_connection_with_config(config))
        };
        Ok(Store { conn, breaker: Arc::new(Breaker::default()) })
    }

    /// Run `script` with a deadline.
    pub async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&dyn ToRedisArgsDyn],
        timeout: Duration,
    ) -> Result<T, String> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            a.push_to(&mut inv);
        }
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => inv.invoke_async(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
            }
        };
        deadline(timeout, run).await
    }

    /// Run one command with a deadline.
    pub async fn command<T: FromRedisValue>(&self, cmd: &redis::Cmd, timeout: Duration) -> Result<T, String> {
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => query(cmd, &mut c).await,
                Conn::Cluster(mut c) => query(cmd, &mut c).await,
            }
        };
        deadline(timeout, run).await
    }

    /// Subscribe to `channel`; messages notify the hint given to [`Store::new`].
    pub async fn subscribe(&self, channel: &str, timeout: Duration) -> Result<(), String> {
        let run = async {
            match self.conn.clone() {
                Conn::Single(mut c) => c.subscribe(channel).await,
                Conn::Cluster(mut c) => c.subscribe(channel).await,
            }
        };
        deadline(timeout, run).await
    }
}

async fn query<T: FromRedisValue>(cmd: &redis::Cmd, c: &mut impl ConnectionLike) -> redis::RedisResult<T> {
    cmd.query_async(c).await
}

async fn deadline<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Script arguments of mixed types.
pub trait ToRedisArgsDyn: Sync {
    fn push_to(&self, inv: &mut redis::ScriptInvocation<'_>);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn push_to(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(self);
    }
}

/// Opens after [`BREAKER_THRESHOLD`] failures in a row: then requests do not ask the store at
/// all (they get the `on_store_error` policy at once). The heartbeat is the probe: its next
/// success closes it.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
    /// Requests that were answered by the `on_store_error` policy (a failure or an open breaker).
    pub fallbacks: AtomicU64,
    /// Failed store requests of any kind.
    pub errors: AtomicU64,
}

impl Breaker {
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// A request succeeded.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed; true when this failure opened the breaker.
    pub fn failure(&self) -> bool {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        n >= BREAKER_THRESHOLD && !self.open.swap(true, Ordering::Relaxed)
    }

    /// The heartbeat failed: the store is down, whatever the requests saw. True when it opened.
    pub fn trip(&self) -> bool {
        self.errors.fetch_add(1, Ordering::Relaxed);
        !self.open.swap(true, Ordering::Relaxed)
    }

    /// The heartbeat succeeded; true when this closed the breaker.
    pub fn close(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        self.open.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_failures_in_a_row_and_the_heartbeat_closes_it() {
        let b = Breaker::default();
        assert!(!b.failure() && !b.failure());
        b.success();
        assert!(!b.failure() && !b.failure() && !b.is_open());
        assert!(b.failure(), "the third in a row opens it");
        assert!(b.is_open() && !b.failure());
        assert!(b.close() && !b.is_open() && !b.close());
        assert!(b.trip() && b.is_open());
        assert_eq!(b.errors.load(Ordering::Relaxed), 7);
    }
}
