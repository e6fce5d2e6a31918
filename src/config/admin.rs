//! The `admin:` section: where the admin API listens, the token that guards it, and the file
//! that keeps run-time changes across restarts. Kept in its own file so that it grows apart
//! from the rest of validation.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use super::schema::{Scalar, S};
use super::validate::Ctx;
use super::value;

/// `admin:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<S<Scalar>>,
    pub token_env: Option<S<Scalar>>,
    pub state_file: Option<S<Scalar>>,
    pub metrics_public: Option<S<Scalar>>,
}

/// The admin listener, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The environment variable that holds the bearer token; `None`: no token (loopback only).
    pub token_env: Option<String>,
    /// Where the overlay of run-time changes is kept; `None`: changes last until the process exits.
    pub state_file: Option<PathBuf>,
    /// Serve `/metrics` without the token (scrapers often cannot send one).
    pub metrics_public: bool,
}

impl AdminConfig {
    /// What the legacy format's `api_port` means: the admin API on loopback, no token.
    pub fn loopback(port: u16) -> AdminConfig {
        AdminConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            token_env: None,
            state_file: None,
            metrics_public: false,
        }
    }
}

pub fn convert(ctx: &mut Ctx, raw: S<RawAdmin>) -> Option<AdminConfig> {
    let at = raw.referenced;
    let RawAdmin { listen, token_env, state_file, metrics_public } = raw.value;
    let Some(listen) = listen else {
        ctx.error(&at, "`admin` needs `listen`, such as 127.0.0.1:9901");
        return None;
    };
    let addr = match address(&listen.value) {
        Ok(a) => a,
        Err(msg) => {
            ctx.error(&listen.referenced, msg);
            return None;
        }
    };
    let token_env = token_env
        .and_then(|t| {
            let hint = "the name of an environment variable, such as VELOCITY_ADMIN_TOKEN";
            value::text(ctx, "token_env", &t, |n| valid_env_name(n.trim()), hint)
        })
        .map(|n| n.trim().to_owned());
    if token_env.is_none() && !addr.ip().is_loopback() {
        // Anyone who can reach the address could change the backends.
        ctx.error(
            &listen.referenced,
            format!("admin listen {addr} is not a loopback address: set `token_env` so that the API needs a token"),
        );
    }
    let state_file = state_file
        .and_then(|p| value::text(ctx, "state_file", &p, |p| !p.trim().is_empty(), "a file path"))
        .map(|p| PathBuf::from(p.trim()));
    let metrics_public = metrics_public.and_then(|v| value::boolean(ctx, "metrics_public", &v)).unwrap_or(false);
    Some(AdminConfig { listen: addr, token_env, state_file, metrics_public })
}

/// `IP:port` or `localhost:port`: the admin address is never looked up in DNS.
fn address(value: &Scalar) -> Result<SocketAddr, String> {
    let Scalar::Text(text) = value else {
        return Err(format!("admin listen must be an address with a port, such as 127.0.0.1:9901, got {value}"));
    };
    let text = text.trim();
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
    }
    text.parse::<SocketAddr>()
        .map_err(|_| format!("admin listen {text:?} must be IP:port or localhost:port, such as 127.0.0.1:9901"))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `admin:` section as YAML (for `to_yaml`), nothing when there is none.
pub fn to_yaml(out: &mut String, admin: &Option<AdminConfig>) {
    let Some(a) = admin else { return };
    let _ = writeln!(out, "admin:");
    let _ = writeln!(out, "  listen: \"{}\"", a.listen);
    if let Some(t) = &a.token_env {
        let _ = writeln!(out, "  token_env: {t}");
    }
    if let Some(p) = &a.state_file {
        let _ = writeln!(out, "  state_file: {}", super::legacy::quote(&p.display().to_string()));
    }
    if a.metrics_public {
        let _ = writeln!(out, "  metrics_public: true");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::test_support::{self, with_one_service};
    use crate::config::{parse, to_yaml, Config, ConfigError};

    use super::*;

    fn load(admin: &str) -> Result<Config, Vec<ConfigError>> {
        test_support::load(&with_one_service(admin))
    }

    fn errors(admin: &str) -> Vec<String> {
        test_support::errors(&with_one_service(admin))
    }

    #[test]
    fn all_keys_and_round_trip() {
        let cfg = load("admin:\n  listen: 0.0.0.0:9901\n  token_env: TOK\n  state_file: /var/lib/v/overlay.json\n  metrics_public: true\n").unwrap();
        let a = cfg.admin.clone().unwrap();
        assert_eq!(a.listen, "0.0.0.0:9901".parse().unwrap());
        assert_eq!(a.token_env.as_deref(), Some("TOK"));
        assert_eq!(a.state_file, Some(PathBuf::from("/var/lib/v/overlay.json")));
        assert!(a.metrics_public);
        let again = parse(Path::new("again.yaml"), &to_yaml(&cfg)).unwrap();
        assert_eq!(again.admin, cfg.admin);
        assert_eq!(load("admin: {listen: \"localhost:1\"}\n").unwrap().admin, Some(AdminConfig::loopback(1)));
        assert_eq!(load("").unwrap().admin, None);
    }

    #[test]
    fn errors_at_their_positions() {
        assert_eq!(errors("admin:\n  listen: 10.0.0.1:9901\n"), ["3:11: admin listen 10.0.0.1:9901 is not a loopback address: set `token_env` so that the API needs a token"]);
        assert_eq!(
            errors("admin:\n  listen: example.com:1\n")[0],
            "3:11: admin listen \"example.com:1\" must be IP:port or localhost:port, such as 127.0.0.1:9901"
        );
        assert_eq!(
            errors("admin:\n  listen: 127.0.0.1:1\n  token_env: \"1 x\"\n")[0],
            "4:14: token_env must be the name of an environment variable, such as VELOCITY_ADMIN_TOKEN, got \"1 x\""
        );
        assert_eq!(
            errors("admin:\n  listen: 127.0.0.1:1\n  metrics_public: maybe\n")[0],
            "4:19: metrics_public must be true or false, got \"maybe\""
        );
        assert_eq!(errors("admin:\n  token_env: T\n")[0], "3:3: `admin` needs `listen`, such as 127.0.0.1:9901");
        assert!(errors("admin:\n  listen: 127.0.0.1:1\n  port: 2\n")[0].contains("unknown key"));
    }
}
