//! TLS for `https` health checks (the connector is shared with https backends: `crate::tls::client`).

use hyper::header::HeaderValue;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::upstream::Backend;

/// A connector for one service's checks, built once when its checker starts.
pub fn connector(insecure_skip_verify: bool) -> Result<TlsConnector, String> {
    crate::tls::client::connector(insecure_skip_verify, None, &[])
}

/// The name the certificate must match: the check's Host without its port (a name or an IP).
pub fn server_name(host: &HeaderValue, backend: &Backend) -> Result<ServerName<'static>, String> {
    let host = host.to_str().unwrap_or_default();
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let name = if bare.is_empty() { backend.addr.ip().to_string() } else { bare.to_owned() };
    ServerName::try_from(name).map_err(|e| format!("invalid TLS server name {host:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_drops_the_port() {
        let b = Backend::new("b".into(), "10.0.0.1:443".parse().unwrap(), "10.0.0.1:443");
        let name = |h: &'static str| server_name(&HeaderValue::from_static(h), &b).map(|n| n.to_str().into_owned());
        assert_eq!(name("web.local:8443"), Ok("web.local".into()));
        assert_eq!(name("web.local"), Ok("web.local".into()));
        assert_eq!(name("10.0.0.1:443"), Ok("10.0.0.1".into()));
        assert_eq!(name("[::1]:443"), Ok("::1".into()));
        assert!(connector(false).is_ok() && connector(true).is_ok());
    }
}
