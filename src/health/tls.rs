//! TLS for `https` health checks: rustls with the `ring` provider, verified against the
//! Mozilla roots built into webpki-roots, or not verified at all with `insecure_skip_verify`.

use std::sync::Arc;

use hyper::header::HeaderValue;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

use crate::upstream::Backend;

/// A connector for one service's checks, built once when its checker starts.
pub fn connector(insecure_skip_verify: bool) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = if insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))).with_no_client_auth()
    } else {
        let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
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

/// `insecure_skip_verify: true`: any certificate is accepted, but the handshake signatures are
/// still checked (the peer must hold the key of the certificate it shows).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
