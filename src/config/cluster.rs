//! The `cluster:` section: the Redis store that several Velocity instances share (members,
//! the overlay of run-time changes, cluster-scope rate limits). Kept in its own file, like
//! `admin.rs`. Nothing here connects: the store connects lazily when the server starts.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

use super::schema::{OneOrMany, Scalar, S};
use super::validate::Ctx;
use super::value::{self, Bounds, MILLISECOND, SECOND};

/// `cluster:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: Option<S<OneOrMany>>,
    pub key_prefix: Option<S<Scalar>>,
    pub instance_id: Option<S<Scalar>>,
    pub store_timeout: Option<S<Scalar>>,
    pub on_store_error: Option<S<Scalar>>,
}

/// What a cluster-scope decision does when the store does not answer in `store_timeout` (or
/// the breaker is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// The limit divided by the live instance count, enforced by this instance alone.
    Local,
    Allow,
    Deny,
}

impl OnStoreError {
    pub fn name(self) -> &'static str {
        match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

/// The cluster store, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// One URL: a single Redis (or a proxy in front of one). Several: the seed nodes of a Redis
    /// Cluster.
    pub redis: Vec<String>,
    /// Put before every key, so that several Velocity clusters can share one Redis.
    pub key_prefix: String,
    /// `None`: `hostname:pid`, decided at start.
    pub instance_id: Option<String>,
    /// How long a request may wait for the store (cluster-scope rate limits).
    pub store_timeout: Duration,
    pub on_store_error: OnStoreError,
}

pub const DEFAULT_PREFIX: &str = "velocity:";
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(5);
/// A request waits at most this long for the store: beyond it, Redis is as good as down.
const STORE_TIMEOUT: Bounds<Duration> = Bounds { min: MILLISECOND, max: SECOND };

pub fn convert(ctx: &mut Ctx, raw: S<RawCluster>) -> Option<ClusterConfig> {
    let at = raw.referenced;
    let RawCluster { redis, key_prefix, instance_id, store_timeout, on_store_error } = raw.value;
    let Some(redis) = redis else {
        ctx.error(&at, "`cluster` needs `redis`, such as redis://127.0.0.1:6379 (or a list of Redis Cluster nodes)");
        return None;
    };
    let mut urls = Vec::new();
    let items = OneOrMany::into_items(redis);
    if items.is_empty() {
        ctx.error(&at, "cluster.redis is empty: give a URL such as redis://127.0.0.1:6379");
    }
    for item in items {
        match redis_url(&item.value) {
            Ok(u) => urls.push(u),
            Err(e) => ctx.error(&item.referenced, e),
        }
    }
    let key_prefix = key_prefix
        .and_then(|v| {
            let hint = "text without `{`, `}` or control characters (Velocity adds the hash tags)";
            value::text(ctx, "key_prefix", &v, |t| !t.contains(['{', '}']) && !t.chars().any(char::is_control), hint)
        })
        .unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    let instance_id = instance_id
        .and_then(|v| {
            let ok = |t: &str| !t.trim().is_empty() && t.len() <= 200 && !t.chars().any(char::is_control);
            value::text(ctx, "instance_id", &v, ok, "a non-empty name such as lb-1")
        })
        .map(|t| t.trim().to_owned());
    let store_timeout = store_timeout
        .and_then(|v| value::duration(ctx, "store_timeout", &v, STORE_TIMEOUT))
        .unwrap_or(DEFAULT_STORE_TIMEOUT);
    let on_store_error = match on_store_error {
        None => OnStoreError::Local,
        Some(v) => match &v.value {
            Scalar::Text(t) if t == "local" => OnStoreError::Local,
            Scalar::Text(t) if t == "allow" => OnStoreError::Allow,
            Scalar::Text(t) if t == "deny" => OnStoreError::Deny,
            other => {
                ctx.error(&v.referenced, format!("on_store_error must be local, allow or deny, got {other}"));
                OnStoreError::Local
            }
        },
    };
    (!urls.is_empty()).then_some(ClusterConfig { redis: urls, key_prefix, instance_id, store_timeout, on_store_error })
}

/// A `redis://` URL the client accepts (checked without connecting).
fn redis_url(text: &str) -> Result<String, String> {
    use redis::IntoConnectionInfo as _;
    let t = text.trim();
    if t.starts_with("rediss://") {
        return Err(format!("{t:?}: TLS to Redis (rediss://) is not supported; use redis://"));
    }
    if !t.starts_with("redis://") {
        return Err(format!("cluster.redis {t:?} must be a URL such as redis://127.0.0.1:6379"));
    }
    match t.into_connection_info() {
        Ok(_) => Ok(t.to_owned()),
        Err(e) => Err(format!("cluster.redis {t:?} is not a valid Redis URL: {e}")),
    }
}

/// The `cluster:` section as YAML (for `to_yaml`), nothing when there is none.
pub fn to_yaml(out: &mut String, cluster: &Option<ClusterConfig>) {
    let Some(c) = cluster else { return };
    let q = super::legacy::quote;
    let urls: Vec<String> = c.redis.iter().map(|u| q(u)).collect();
    let _ = writeln!(out, "cluster:");
    let _ = writeln!(out, "  redis: [{}]", urls.join(", "));
    let _ = writeln!(out, "  key_prefix: {}", q(&c.key_prefix));
    if let Some(id) = &c.instance_id {
        let _ = writeln!(out, "  instance_id: {}", q(id));
    }
    let _ = writeln!(out, "  store_timeout: {}", value::format_duration(c.store_timeout));
    let _ = writeln!(out, "  on_store_error: {}", c.on_store_error.name());
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::test_support::{self, with_one_service};
    use crate::config::{parse, to_yaml, Config, ConfigError};

    use super::*;

    fn load(cluster: &str) -> Result<Config, Vec<ConfigError>> {
        test_support::load(&with_one_service(cluster))
    }

    fn errors(cluster: &str) -> Vec<String> {
        test_support::errors(&with_one_service(cluster))
    }

    #[test]
    fn defaults_all_keys_and_round_trip() {
        let c = load("cluster: {redis: redis://127.0.0.1:6379}\n").unwrap().cluster.unwrap();
        assert_eq!(c.redis, ["redis://127.0.0.1:6379"]);
        assert_eq!(c.key_prefix, DEFAULT_PREFIX);
        assert_eq!(
            (c.instance_id, c.store_timeout, c.on_store_error),
            (None, DEFAULT_STORE_TIMEOUT, OnStoreError::Local)
        );
        let cfg = load(
            "cluster:\n  redis: [redis://10.0.0.1:7000, \"redis://10.0.0.2:7000\"]\n  key_prefix: \"v:prod:\"\n  instance_id: lb-1\n  store_timeout: 20ms\n  on_store_error: deny\n",
        )
        .unwrap();
        let c = cfg.cluster.clone().unwrap();
        assert_eq!(c.redis.len(), 2);
        assert_eq!((c.key_prefix.as_str(), c.instance_id.as_deref()), ("v:prod:", Some("lb-1")));
        assert_eq!((c.store_timeout, c.on_store_error), (Duration::from_millis(20), OnStoreError::Deny));
        let again = parse(Path::new("again.yaml"), &to_yaml(&cfg)).unwrap();
        assert_eq!(again.cluster, cfg.cluster);
        assert_eq!(load("").unwrap().cluster, None);
    }

    #[test]
    fn errors_at_their_positions() {
        assert_eq!(
            errors("cluster:\n  key_prefix: x\n")[0],
            "3:3: `cluster` needs `redis`, such as redis://127.0.0.1:6379 (or a list of Redis Cluster nodes)"
        );
        assert_eq!(
            errors("cluster:\n  redis: [redis://a:1, http://b:2]\n")[0],
            "3:24: cluster.redis \"http://b:2\" must be a URL such as redis://127.0.0.1:6379"
        );
        assert!(errors("cluster:\n  redis: rediss://a:1\n")[0].starts_with("3:10: \"rediss://a:1\": TLS"));
        assert_eq!(
            errors("cluster:\n  redis: redis://a:1\n  store_timeout: 5\n")[0],
            "4:18: store_timeout: duration \"5\" is missing a unit (ms, s, m or h)"
        );
        assert_eq!(
            errors("cluster:\n  redis: redis://a:1\n  store_timeout: 2s\n")[0],
            "4:18: store_timeout must be from 1ms to 1s, got \"2s\""
        );
        assert_eq!(
            errors("cluster:\n  redis: redis://a:1\n  on_store_error: fail\n")[0],
            "4:19: on_store_error must be local, allow or deny, got \"fail\""
        );
        assert!(errors("cluster:\n  redis: redis://a:1\n  key_prefix: \"{x}\"\n")[0]
            .starts_with("4:15: key_prefix must be"));
        assert!(errors("cluster:\n  redis: redis://a:1\n  port: 1\n")[0].contains("unknown key"));
    }
}
