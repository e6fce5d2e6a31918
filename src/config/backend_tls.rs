//! `https://` backends and their `tls:` block: how Velocity verifies a backend's certificate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rustls::pki_types::ServerName;
use serde::Deserialize;
use serde_saphyr::Location;

use super::legacy::quote;
use super::schema::{Scalar, S};
use super::validate::Ctx;
use super::value;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendTls {
    pub ca: Option<S<Scalar>>,
    pub server_name: Option<S<Scalar>>,
    pub insecure_skip_verify: Option<S<Scalar>>,
}

/// TLS to one backend (its address is `https://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTlsConfig {
    /// SNI and the name the certificate must carry: the address's host unless set.
    pub server_name: String,
    /// Trust anchors (PEM) instead of the system roots; relative to the config file.
    pub ca: Option<PathBuf>,
    /// Accept any certificate (labs only; warned about at load).
    pub insecure_skip_verify: bool,
}

/// The backend's TLS, when its address is `https://` (`host`: the address's host).
pub fn convert(
    ctx: &mut Ctx,
    https: bool,
    host: &str,
    raw: Option<S<RawBackendTls>>,
    address_at: Location,
) -> Option<BackendTlsConfig> {
    if !https {
        if let Some(t) = raw {
            ctx.error(&t.referenced, "`tls` applies to https:// backends: write the address as https://HOST:PORT");
        }
        return None;
    }
    let raw = raw.map(|r| r.value).unwrap_or_default();
    let (server_name, name_at) = match &raw.server_name {
        Some(n) => match super::health::text(&n.value).map(str::trim) {
            Some(t) => (t.to_owned(), n.referenced),
            None => {
                ctx.error(&n.referenced, format!("server_name must be a host name, got {}", n.value));
                (host.to_owned(), n.referenced)
            }
        },
        None => (host.to_owned(), address_at),
    };
    if ServerName::try_from(server_name.as_str()).is_err() {
        ctx.error(&name_at, format!("{server_name:?} is not a name TLS can verify a certificate for"));
    }
    let insecure_skip_verify =
        raw.insecure_skip_verify.as_ref().and_then(|v| value::boolean(ctx, "insecure_skip_verify", v)).unwrap_or(false);
    let ca = raw.ca.as_ref().and_then(|v| match super::health::text(&v.value).map(str::trim) {
        Some(t) if !t.is_empty() => {
            let path = ctx.relative(Path::new(t));
            if insecure_skip_verify {
                ctx.error(&v.referenced, "`ca` is unused with insecure_skip_verify: true, which verifies nothing");
            } else if ctx.scope == super::Scope::Run {
                if let Err(e) = crate::tls::client::load_ca(&path) {
                    ctx.error(&v.referenced, e);
                }
            }
            Some(path)
        }
        _ => {
            ctx.error(&v.referenced, format!("ca must be a file path, got {}", v.value));
            None
        }
    });
    Some(BackendTlsConfig { server_name, ca, insecure_skip_verify })
}

/// The backend's `tls:` line for `to_yaml` (the scheme is in the address).
pub fn to_yaml(out: &mut String, tls: &Option<BackendTlsConfig>) {
    let Some(t) = tls else { return };
    let _ = write!(out, "        tls: {{server_name: {}", quote(&t.server_name));
    if let Some(ca) = &t.ca {
        let _ = write!(out, ", ca: {}", quote(&ca.display().to_string()));
    }
    if t.insecure_skip_verify {
        out.push_str(", insecure_skip_verify: true");
    }
    out.push_str("}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{errors, load};

    fn with_backend(lines: &str) -> String {
        format!("listen: 127.0.0.1:8000\nservices:\n  - name: web\n    backends:\n{lines}")
    }

    #[test]
    fn https_addresses_and_their_tls() {
        let cfg = load(&with_backend(
            "      - address: https://127.0.0.1\n      - address: https://localhost:8443\n        tls: {ca: ca.pem, server_name: api.internal}\n      - address: https://127.0.0.2:9443\n        tls: {insecure_skip_verify: true}\n      - address: 127.0.0.3:80\n",
        ))
        .unwrap();
        let b = &cfg.services[0].backends;
        assert_eq!(b[0].addr, "127.0.0.1:443".parse().unwrap());
        let tls = |i: usize| b[i].tls.clone();
        assert_eq!(
            tls(0),
            Some(BackendTlsConfig { server_name: "127.0.0.1".into(), ca: None, insecure_skip_verify: false })
        );
        assert_eq!(
            tls(1),
            Some(BackendTlsConfig {
                server_name: "api.internal".into(),
                ca: Some("ca.pem".into()),
                insecure_skip_verify: false
            })
        );
        assert!(tls(2).unwrap().insecure_skip_verify);
        assert_eq!(tls(3), None);
        let again = crate::config::parse(Path::new("t.yaml"), &crate::config::to_yaml(&cfg)).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn problems_at_their_position() {
        let cases = [
            (
                "      - address: 127.0.0.1:80\n        tls: {server_name: a}\n",
                "6:14: `tls` applies to https:// backends",
            ),
            (
                "      - address: https://127.0.0.1\n        tls: {ca: a.pem, insecure_skip_verify: true}\n",
                "6:19: `ca` is unused",
            ),
            (
                "      - address: https://127.0.0.1\n        tls: {server_name: \"a b\"}\n",
                "6:28: \"a b\" is not a name TLS can verify",
            ),
            ("      - address: https://127.0.0.1\n        tls: {verify: false}\n", "6:15: unknown key `verify`"),
        ];
        for (lines, want) in cases {
            let e = errors(&with_backend(lines));
            assert!(e.len() == 1 && e[0].starts_with(want), "{lines}\nexpected {want:?}\n{e:#?}");
        }
    }
}
