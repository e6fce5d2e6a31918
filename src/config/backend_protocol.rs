//! `backend_protocol:` of a service: which HTTP Velocity speaks to its backends. TLS follows
//! each backend's address (`https://`), so the two must agree: `h2` is HTTP/2 over TLS
//! (ALPN `h2`), `h2c` HTTP/2 in cleartext (prior knowledge), `http1` either.

use serde_saphyr::Location;

use super::schema::S;
use super::validate::Ctx;
use super::BackendConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendProtocol {
    #[default]
    Http1,
    H2,
    H2c,
}

impl BackendProtocol {
    pub fn name(self) -> &'static str {
        match self {
            BackendProtocol::Http1 => "http1",
            BackendProtocol::H2 => "h2",
            BackendProtocol::H2c => "h2c",
        }
    }

    /// HTTP/2 (over TLS or not).
    pub fn is_h2(self) -> bool {
        self != BackendProtocol::Http1
    }
}

pub fn convert(ctx: &mut Ctx, raw: Option<&S<String>>) -> BackendProtocol {
    let Some(v) = raw else { return BackendProtocol::Http1 };
    match v.value.trim() {
        "http1" => BackendProtocol::Http1,
        "h2" => BackendProtocol::H2,
        "h2c" => BackendProtocol::H2c,
        other => {
            ctx.error(&v.referenced, format!("unknown backend_protocol {other:?}: use http1, h2 or h2c"));
            BackendProtocol::Http1
        }
    }
}

/// A listed backend's scheme must fit the protocol (`at`: its address).
pub fn check_backend(ctx: &mut Ctx, protocol: BackendProtocol, b: &BackendConfig, at: Location) {
    match (protocol, b.tls.is_some()) {
        (BackendProtocol::H2, false) => ctx.error(
            &at,
            format!(
                "backend_protocol h2 is HTTP/2 over TLS: write the address as https://{} (or use h2c for HTTP/2 without TLS)",
                b.authority
            ),
        ),
        (BackendProtocol::H2c, true) => {
            ctx.error(&at, "backend_protocol h2c is HTTP/2 without TLS: an https:// backend needs backend_protocol h2")
        }
        _ => {}
    }
}

/// Discovered and managed backends are plain addresses, so `h2` (which needs TLS) cannot have
/// them (`at`: the `discovery` or `managed` key).
pub fn check_dynamic(ctx: &mut Ctx, protocol: BackendProtocol, at: Location) {
    if protocol == BackendProtocol::H2 {
        ctx.error(
            &at,
            "backend_protocol h2 needs https:// backends, and discovered or managed backends are plain addresses: use h2c",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{errors, load};

    fn service(lines: &str) -> String {
        format!("listen: 127.0.0.1:8000\nservices:\n  - name: web\n{lines}")
    }

    #[test]
    fn values_and_default() {
        let cfg = load(&service("    backends: [{address: 127.0.0.1:1}]\n")).unwrap();
        assert_eq!(cfg.services[0].backend_protocol, BackendProtocol::Http1);
        for (text, want, address) in [
            ("h2c", BackendProtocol::H2c, "127.0.0.1:1"),
            ("h2", BackendProtocol::H2, "https://127.0.0.1:1"),
            ("http1", BackendProtocol::Http1, "https://127.0.0.1:1"),
        ] {
            let cfg =
                load(&service(&format!("    backend_protocol: {text}\n    backends: [{{address: {address}}}]\n")))
                    .unwrap();
            assert_eq!(cfg.services[0].backend_protocol, want);
            let again = crate::config::parse(std::path::Path::new("t.yaml"), &crate::config::to_yaml(&cfg)).unwrap();
            assert_eq!(again, cfg);
        }
    }

    #[test]
    fn problems_at_their_position() {
        let cases = [
            (
                "    backend_protocol: http2\n    backends: [{address: 127.0.0.1:1}]\n",
                "4:23: unknown backend_protocol \"http2\": use http1, h2 or h2c",
            ),
            (
                "    backend_protocol: h2\n    backends: [{address: 127.0.0.1:1}]\n",
                "5:26: backend_protocol h2 is HTTP/2 over TLS: write the address as https://127.0.0.1:1",
            ),
            (
                "    backend_protocol: h2c\n    backends: [{address: \"https://127.0.0.1:1\"}]\n",
                "5:26: backend_protocol h2c is HTTP/2 without TLS",
            ),
            (
                "    backend_protocol: h2\n    discovery: {dns: {name: web.internal, port: 80}}\n",
                "5:16: backend_protocol h2 needs https:// backends",
            ),
        ];
        for (lines, want) in cases {
            let e = errors(&service(lines));
            assert!(e.len() == 1 && e[0].starts_with(want), "{lines}\nexpected {want:?}\n{e:#?}");
        }
    }
}
