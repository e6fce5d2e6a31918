//! TLS termination on listeners: certificates loaded from PEM files, chosen by SNI among the
//! names of each certificate's subjectAltName (the first certificate is the fallback).
//! rustls with the `ring` provider, as for https health checks.

pub mod client;
pub mod stream;
mod x509;

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::{CertificateFiles, TlsConfig, TlsVersion};

/// A certificate warns in `check` when it expires within this.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 24 * 3600;

/// A certificate and key that load and belong together.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// From the subjectAltName, lower-cased; `*.example.com` kept as written.
    pub names: Vec<String>,
    /// Seconds since the epoch; `None` when the certificate's validity could not be read.
    pub not_after: Option<i64>,
}

impl LoadedCert {
    /// What the certificate is called in metrics and messages: its first name, or its file.
    pub fn label(&self, files: &CertificateFiles) -> String {
        self.names.first().cloned().unwrap_or_else(|| files.cert.display().to_string())
    }
}

/// A problem with a certificate pair, naming the file it is in.
#[derive(Debug)]
pub struct CertError {
    /// The problem is in the key file (else in the certificate file).
    pub in_key: bool,
    pub message: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read and check one pair: both files readable PEM, the key one rustls can sign with, and
/// the key the certificate's.
pub fn check_files(cert: &Path, key: &Path) -> Result<LoadedCert, CertError> {
    load(&CertificateFiles { cert: cert.to_owned(), key: key.to_owned() }, &provider())
}

fn load(files: &CertificateFiles, provider: &CryptoProvider) -> Result<LoadedCert, CertError> {
    let (cert_path, key_path) = (files.cert.display(), files.key.display());
    let cert_err = |message: String| CertError { in_key: false, message };
    let key_err = |message: String| CertError { in_key: true, message };
    let pem = std::fs::read(&files.cert).map_err(|e| cert_err(format!("cannot read certificate {cert_path}: {e}")))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("certificate {cert_path} is not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err(format!("certificate {cert_path} holds no CERTIFICATE block")));
    }
    let pem = std::fs::read(&files.key).map_err(|e| key_err(format!("cannot read key {key_path}: {e}")))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| key_err(format!("key {key_path} holds no usable PEM private key: {e}")))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| key_err(format!("key {key_path} cannot be used: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(key_err(format!("key {key_path} does not belong to certificate {cert_path}")));
        }
    }
    let leaf = certified.cert[0].as_ref();
    Ok(LoadedCert { names: x509::names(leaf), not_after: x509::not_after(leaf), key: Arc::new(certified) })
}

/// Load every certificate of a listener, in order.
pub fn load_all(tls: &TlsConfig) -> Result<Vec<LoadedCert>, String> {
    let provider = provider();
    tls.certificates.iter().map(|files| load(files, &provider).map_err(|e| e.message)).collect()
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A warning when `cert` has expired or expires within [`EXPIRY_WARNING_SECS`] of `now`.
pub fn expiry_warning(listener: &str, files: &CertificateFiles, cert: &LoadedCert, now: i64) -> Option<String> {
    let left = cert.not_after? - now;
    if left > EXPIRY_WARNING_SECS {
        return None;
    }
    let (file, name) = (files.cert.display(), cert.label(files));
    let days = left.abs() / 86_400;
    Some(if left < 0 {
        format!("listener {listener}: certificate {file} ({name}) expired {days} day(s) ago")
    } else {
        format!("listener {listener}: certificate {file} ({name}) expires in {days} day(s)")
    })
}

/// The expiry warnings of every certificate in `cfg` (for `velocity check`); certificates
/// that do not load were reported by the config's validation.
pub fn check_warnings(cfg: &crate::config::Config) -> Vec<String> {
    let now = unix_now();
    let provider = provider();
    let mut out = Vec::new();
    for l in &cfg.listeners {
        for files in l.tls.iter().flat_map(|t| &t.certificates) {
            if let Some(w) = load(files, &provider).ok().and_then(|c| expiry_warning(&l.name, files, &c, now)) {
                out.push(w);
            }
        }
    }
    out
}

/// A listener's rustls config. `ticketer` is kept by the listener across reloads, so that
/// session tickets issued before a reload still resume after it.
pub fn server_config(
    tls: &TlsConfig,
    certs: &[LoadedCert],
    ticketer: Arc<dyn ProducesTickets>,
    h2: bool,
) -> Result<Arc<ServerConfig>, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let resolver = SniResolver { certs: certs.iter().map(|c| (c.names.clone(), c.key.clone())).collect() };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // `h2` first: a client that offers both gets HTTP/2 (`proxy::downstream::h2`).
    config.alpn_protocols = if h2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    config.ticketer = ticketer;
    Ok(Arc::new(config))
}

/// Session tickets (TLS 1.3 resumption and TLS 1.2 tickets), with keys rotated by rustls.
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, String> {
    rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))
}

/// Picks the certificate whose subjectAltName holds the SNI name (exactly, or by a `*.`
/// wildcard for one label); the first certificate otherwise.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name() {
            if let Some((_, key)) = self.certs.iter().find(|(names, _)| names.iter().any(|n| name_matches(n, sni))) {
                return Some(key.clone());
            }
        }
        self.certs.first().map(|(_, key)| key.clone())
    }
}

/// Whether a certificate name covers `sni` (lower-case: rustls normalizes it).
fn name_matches(name: &str, sni: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(suffix) => {
            sni.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix))
        }
        None => name.eq_ignore_ascii_case(sni),
    }
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("a.example.com", "a.example.com"));
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("b.example.com", "a.example.com"));
    }
}
