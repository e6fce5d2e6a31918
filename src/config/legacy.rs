//! The original Go Velocity's `config.yml`, loaded unchanged and mapped onto the new model.
//!
//! ```yaml
//! listen_port: 8080
//! api_port: 8081
//! services:
//!   - name: my-service
//!     domain: "localhost:8080"
//!     targetURLs: ["http://localhost:9001"]
//!     algorythm: RoundRobin
//! ```
//! Unknown keys are ignored here (we cannot know every key the Go version took); the new
//! format is strict.

use std::path::Path;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::schema::{OneOrMany, RawBackend, RawConfig, RawService, S};
use super::validate::{validate, yaml_error, Problems};
use super::{Config, ConfigError};

#[derive(Debug, Deserialize)]
struct LegacyConfig {
    listen_port: Option<S<String>>,
    api_port: Option<S<String>>,
    #[serde(default)]
    services: Vec<LegacyService>,
}

#[derive(Debug, Deserialize)]
struct LegacyService {
    name: S<String>,
    domain: Option<S<String>>,
    #[serde(rename = "targetURLs")]
    target_urls: S<Vec<String>>,
    algorythm: Option<S<String>>,
}

pub fn parse(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    let legacy: LegacyConfig = serde_saphyr::from_str(text).map_err(|e| vec![yaml_error(path, &e)])?;
    let mut problems = Problems::new(path);
    let listen = legacy.listen_port.map(|p| {
        let port = p.value.trim().trim_start_matches(':').to_string();
        // The Go version listened on every interface.
        same_place(&p, OneOrMany::One(format!("0.0.0.0:{port}")))
    });
    let services = legacy
        .services
        .into_iter()
        .map(|s| {
            let algorithm = s.algorythm.map(|a| {
                let name = match a.value.to_ascii_lowercase().as_str() {
                    "roundrobin" | "round_robin" => "round_robin".to_string(),
                    "leastconnections" | "least_connections" => "least_connections".to_string(),
                    "weightedroundrobin" | "weighted_round_robin" => "weighted_round_robin".to_string(),
                    _ => {
                        problems.at(
                            &a.referenced,
                            format!("unknown algorythm {:?}: expected RoundRobin or LeastConnections", a.value),
                        );
                        "round_robin".to_string()
                    }
                };
                same_place(&a, name)
            });
            let hosts = s
                .domain
                .filter(|d| !d.value.trim().is_empty())
                .map(|d| same_place(&d, OneOrMany::One(d.value.clone())));
            let backends = s
                .target_urls
                .value
                .iter()
                .map(|url| RawBackend { address: same_place(&s.target_urls, url.clone()), weight: None })
                .collect();
            RawService {
                name: s.name,
                hosts,
                path_prefix: None,
                algorithm,
                backends: same_place(&s.target_urls, backends),
            }
        })
        .collect();
    let raw = RawConfig {
        listen,
        access_log: None,
        log_format: None,
        services: Some(Spanned::new(services, Location::UNKNOWN, Location::UNKNOWN)),
    };
    let problems = problems.into_list();
    let mut config = match validate(path, raw) {
        Ok(c) if problems.is_empty() => c,
        Ok(_) => return Err(problems),
        Err(mut more) => {
            more.extend(problems);
            more.sort_by_key(|e| (e.line, e.column));
            return Err(more);
        }
    };
    let mut yaml = String::new();
    if let Some(api) = legacy.api_port {
        yaml.push_str(&format!("# api_port {}: the admin API is not available yet; this key is ignored\n", api.value));
    }
    yaml.push_str(&super::to_yaml(&config));
    config.legacy_equivalent = Some(yaml);
    Ok(config)
}

fn same_place<T, U>(at: &Spanned<T>, value: U) -> Spanned<U> {
    Spanned::new(value, at.referenced, at.defined)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_CONFIG: &str = "listen_port: 8080
api_port: 8081
services:
  - name: my-service
    domain: \"Legacy.local:8080\"
    targetURLs:
      - \"http://localhost:9001\"
      - \"http://127.0.0.1:9002\"
    algorythm: LeastConnections
  - name: other
    domain: \"\"
    targetURLs: [\"http://127.0.0.1:9003\"]
    algorythm: RoundRobin
";

    #[test]
    fn loads_and_maps() {
        let cfg = super::super::parse(Path::new("config.yml"), GO_CONFIG).unwrap();
        assert_eq!(cfg.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        let s = &cfg.services[0];
        assert_eq!(s.hosts, vec![super::super::HostPattern::Exact("legacy.local".into())]);
        assert_eq!(s.algorithm, super::super::Algorithm::LeastConnections);
        assert_eq!(s.backends.len(), 2);
        assert!(cfg.services[1].hosts.is_empty());
        assert!(cfg.legacy_equivalent.as_ref().unwrap().contains("# api_port 8081"));
    }

    #[test]
    fn equivalent_yaml_loads_to_the_same_config() {
        let legacy = super::super::parse(Path::new("config.yml"), GO_CONFIG).unwrap();
        let yaml = legacy.legacy_equivalent.clone().unwrap();
        let again = super::super::parse(Path::new("new.yaml"), &yaml).unwrap();
        assert_eq!(again, Config { legacy_equivalent: None, ..legacy });
    }

    #[test]
    fn errors_point_into_the_legacy_file() {
        let text = "listen_port: 8080\nservices:\n  - name: a\n    targetURLs: []\n    algorythm: Fastest\n";
        let e = super::super::parse(Path::new("config.yml"), text).unwrap_err();
        let e: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("config.yml:4:17: service \"a\" has no backends"), "{e:?}");
        assert!(e[1].starts_with("config.yml:5:16: unknown algorythm"), "{e:?}");
    }
}
