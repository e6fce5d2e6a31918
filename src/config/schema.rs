//! The YAML as written. Values whose meaning is checked later are `Spanned`, so that every
//! problem can be reported at its line and column, and all of them at once. Fields are
//! `Option` where a missing value is a semantic error, so it does not abort the whole parse.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

pub type S<T> = Spanned<T>;

/// A scalar or a list of scalars (`hosts: web.local` or `hosts: [a, b]`).
///
/// Hand-written rather than `#[serde(untagged)]`: untagged buffers its input, which loses the
/// spans of the list items.
#[derive(Debug)]
pub enum OneOrMany {
    One(String),
    Many(Vec<S<String>>),
}

impl OneOrMany {
    /// The items with their locations; a single scalar takes the location of the whole value.
    pub fn into_items(outer: S<OneOrMany>) -> Vec<S<String>> {
        match outer.value {
            OneOrMany::One(s) => vec![Spanned { value: s, referenced: outer.referenced, defined: outer.defined }],
            OneOrMany::Many(v) => v,
        }
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            // `listen: 8000` is a number to YAML; keep its text so validation can say what is wrong.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<OneOrMany, E> {
                Ok(OneOrMany::Many(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<S<String>>()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A scalar of any type, so that `weight: abc` or `listen_port: "8080"` become semantic errors
/// (collected with the others) rather than a type error that stops the parse.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Int(i64),
    /// A string, as written (quoted or not).
    Text(String),
    /// Anything else (float, bool, null, huge integer), as text for messages.
    Other(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Int(n) => write!(f, "{n}"),
            Scalar::Text(s) => write!(f, "{s:?}"),
            Scalar::Other(s) => f.write_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or_else(|_| Scalar::Other(v.to_string()), Scalar::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Other(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other("null".into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            // A list or mapping is consumed and reported by validation, at the value's location
            // (a type error from here would point at the key).
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("a list".into()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("a mapping".into()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<S<OneOrMany>>,
    pub listeners: Option<S<Vec<S<super::listeners::RawListener>>>>,
    pub access_log: Option<S<String>>,
    pub log_format: Option<S<String>>,
    pub event_log: Option<S<String>>,
    pub access_log_ring: Option<S<Scalar>>,
    pub services: Option<S<Vec<S<RawService>>>>,
    pub timeouts: Option<S<RawTimeouts>>,
    pub max_header_bytes: Option<S<Scalar>>,
    pub max_client_connections: Option<S<Scalar>>,
    pub shutdown: Option<S<RawShutdown>>,
    pub http2: Option<S<RawHttp2>>,
    pub admin: Option<S<super::admin::RawAdmin>>,
    pub cluster: Option<S<super::cluster::RawCluster>>,
    // Traffic policy (see `policy.rs`).
    pub trusted_proxies: super::policy::RawNets,
    pub allow: super::policy::RawNets,
    pub deny: super::policy::RawNets,
    pub deny_action: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: Option<S<String>>,
    pub hosts: Option<S<OneOrMany>>,
    pub path_prefix: Option<S<String>>,
    pub algorithm: Option<S<String>>,
    /// `http1` (default), `h2` or `h2c` (see `backend_protocol.rs`).
    pub backend_protocol: Option<S<String>>,
    pub backends: Option<S<Vec<S<RawBackend>>>>,
    pub health_check: Option<S<RawHealthCheck>>,
    pub passive: Option<S<RawPassive>>,
    pub retry: Option<S<RawRetry>>,
    pub timeouts: Option<S<RawTimeouts>>,
    pub max_body_bytes: Option<S<Scalar>>,
    pub queue: Option<S<RawQueue>>,
    // The algorithm's parameters (see `balancing.rs`).
    pub hash_key: Option<S<Scalar>>,
    pub hash_query: Option<S<Scalar>>,
    pub sticky: Option<S<super::balancing::RawSticky>>,
    pub slow_start: Option<S<Scalar>>,
    // Traffic policy (see `policy.rs`).
    pub rate_limits: Option<S<Vec<S<super::policy::RawRateLimit>>>>,
    pub allow: super::policy::RawNets,
    pub deny: super::policy::RawNets,
    // Where backends come from besides `backends` (see `discovery.rs`).
    pub discovery: Option<S<super::discovery::RawDiscovery>>,
    pub managed: Option<S<super::discovery::RawManaged>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: Option<S<String>>,
    pub weight: Option<S<Scalar>>,
    pub max_connections: Option<S<Scalar>>,
    pub tls: Option<S<super::backend_tls::RawBackendTls>>,
}

// ---- Timeouts, limits, queueing and shutdown ----

/// Durations are `Scalar` so that `connect: 5` is reported as a missing unit, with the others.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub client_header: Option<S<Scalar>>,
    pub client_idle: Option<S<Scalar>>,
    pub client_send: Option<S<Scalar>>,
    pub connect: Option<S<Scalar>>,
    pub backend_response: Option<S<Scalar>>,
    pub request: Option<S<Scalar>>,
    pub tunnel_idle: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub size: Option<S<Scalar>>,
    pub timeout: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp2 {
    pub enabled: Option<S<Scalar>>,
    pub max_concurrent_streams: Option<S<Scalar>>,
    pub max_header_list_size: Option<S<Scalar>>,
    pub stream_window: Option<S<Scalar>>,
    pub connection_window: Option<S<Scalar>>,
    pub max_resets_per_second: Option<S<Scalar>>,
    pub max_control_frames_per_second: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_timeout: Option<S<Scalar>>,
}

// Issue 3: health checks, passive detection, retries. Values are `Scalar` so that a wrong type
// (`interval: 2`, `attempts: many`) is reported with the other problems.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(rename = "type")]
    pub kind: Option<S<Scalar>>,
    pub path: Option<S<Scalar>>,
    pub expect_status: Option<S<Scalar>>,
    pub host: Option<S<Scalar>>,
    pub interval: Option<S<Scalar>>,
    pub timeout: Option<S<Scalar>>,
    pub healthy_threshold: Option<S<Scalar>>,
    pub unhealthy_threshold: Option<S<Scalar>>,
    pub insecure_skip_verify: Option<S<Scalar>>,
    /// `grpc` checks: the service name asked about (`grpc.health.v1.HealthCheckRequest.service`).
    pub service: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<S<Scalar>>,
    pub on_5xx: Option<S<Scalar>>,
    pub base_ejection: Option<S<Scalar>>,
    pub max_ejection: Option<S<Scalar>>,
    pub max_ejected_percent: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<S<Scalar>>,
    pub on: Option<S<Vec<S<Scalar>>>>,
    pub backoff: Option<S<RawBackoff>>,
    pub buffer_body_limit: Option<S<Scalar>>,
    pub budget_percent: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    pub base: Option<S<Scalar>>,
    pub max: Option<S<Scalar>>,
}

/// Whether a key is present at all, even with a null value (which `Option` would hide).
#[derive(Debug, Default)]
pub struct Present(pub bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Present(true))
    }
}

/// Just enough to tell the legacy Go format from ours; every other key is ignored.
#[derive(Debug, Deserialize)]
pub struct Probe {
    #[serde(default)]
    pub listen_port: Present,
    #[serde(default)]
    pub api_port: Present,
}

impl Probe {
    pub fn is_legacy(&self) -> bool {
        self.listen_port.0 || self.api_port.0
    }
}

/// The original Go Velocity config. An unknown key is an error (with a hint when it looks like
/// a known one, such as `targetUrls` for `targetURLs`): ignoring it would leave a service
/// without the backends or algorithm its author wrote.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyConfig {
    pub listen_port: Option<S<Scalar>>,
    pub api_port: Option<S<Scalar>>,
    pub services: Option<S<Vec<S<LegacyService>>>>,
    /// A new-format key in a legacy file is a mix-up worth reporting rather than ignoring.
    pub listen: Option<S<IgnoredAny>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyService {
    pub name: Option<S<String>>,
    pub domain: Option<S<String>>,
    #[serde(rename = "targetURLs")]
    pub target_urls: Option<S<Vec<S<String>>>>,
    /// Spelled this way in the Go version; the correct spelling is accepted too.
    #[serde(alias = "algorithm")]
    pub algorythm: Option<S<String>>,
}
