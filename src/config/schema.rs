//! The YAML as written. Values whose meaning is checked later are `Spanned`, so that every
//! problem can be reported at its line and column, and all of them at once.

use serde::Deserialize;
use serde_saphyr::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<S<OneOrMany>>,
    pub access_log: Option<S<String>>,
    pub log_format: Option<S<String>>,
    pub services: Option<S<Vec<RawService>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: S<String>,
    pub hosts: Option<S<OneOrMany>>,
    pub path_prefix: Option<S<String>>,
    pub algorithm: Option<S<String>>,
    pub backends: S<Vec<RawBackend>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: S<String>,
    pub weight: Option<S<i64>>,
}

/// Just enough to tell the legacy Go format from ours.
#[derive(Debug, Deserialize)]
pub struct Probe {
    pub listen_port: Option<serde::de::IgnoredAny>,
    pub api_port: Option<serde::de::IgnoredAny>,
}
