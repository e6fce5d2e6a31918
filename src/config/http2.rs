//! The top-level `http2:` block: HTTP/2 to clients (ALPN `h2` on TLS listeners, h2c by prior
//! knowledge on plain ones) and its limits.

use super::lifecycle;
use std::fmt::Write as _;

use super::schema::{RawHttp2, S};
use super::validate::Ctx;
use super::value::{self, Bounds, KIB, MIB};

/// HTTP/2 settings; the same for every HTTP listener (`protocol: http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Config {
    /// Off: TLS listeners offer only `http/1.1`, and a plain listener answers h2c's preface
    /// as a malformed HTTP/1 request (400).
    pub enabled: bool,
    /// Streams a client may have open at once on one connection; more are refused
    /// (`REFUSED_STREAM`).
    pub max_concurrent_streams: u32,
    /// A request's header list (HPACK-decoded, as RFC 9113 counts it): over it the stream
    /// gets a 431 (the `h2` crate's answer); far over it (or a CONTINUATION flood) the
    /// connection gets GOAWAY `ENHANCE_YOUR_CALM`. `None`: `max_header_bytes`.
    pub max_header_list_size: Option<u32>,
    /// How much of a request body a client may send on one stream before Velocity has
    /// forwarded it (the stream's flow-control window).
    pub stream_window: u32,
    /// The same for all of a connection's streams together.
    pub connection_window: u32,
    /// Streams a client may reset in one second on one connection (rapid reset,
    /// CVE-2023-44487): beyond, GOAWAY `ENHANCE_YOUR_CALM`.
    pub max_resets_per_second: u32,
    /// PING and SETTINGS frames a client may send in one second on one connection: beyond,
    /// GOAWAY `ENHANCE_YOUR_CALM`.
    pub max_control_frames_per_second: u32,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            enabled: true,
            max_concurrent_streams: 128,
            max_header_list_size: None,
            stream_window: MIB as u32,
            connection_window: 4 * MIB as u32,
            max_resets_per_second: 200,
            max_control_frames_per_second: 100,
        }
    }
}

/// The protocol's own bounds (RFC 9113 6.5.2, 6.9.1): a window is at most 2^31 - 1, at least
/// the 64 KiB every peer starts with.
const WINDOW: Bounds<u64> = Bounds { min: 64 * KIB - 1, max: (1 << 31) - 1 };
const HEADER_LIST: Bounds<u64> = Bounds { min: KIB, max: 1024 * KIB };

pub fn convert(ctx: &mut Ctx, raw: Option<S<RawHttp2>>) -> Http2Config {
    let mut cfg = Http2Config::default();
    let Some(raw) = raw else { return cfg };
    let RawHttp2 {
        enabled,
        max_concurrent_streams,
        max_header_list_size,
        stream_window,
        connection_window,
        max_resets_per_second,
        max_control_frames_per_second,
    } = raw.value;
    if let Some(v) = enabled.and_then(|v| value::boolean(ctx, "http2.enabled", &v)) {
        cfg.enabled = v;
    }
    let count = |ctx: &mut Ctx, key, v: Option<S<_>>, min, max| {
        v.and_then(|v| lifecycle::count(ctx, key, &v, min, max)).map(|n| n as u32)
    };
    if let Some(n) = count(ctx, "http2.max_concurrent_streams", max_concurrent_streams, 1, 65_536) {
        cfg.max_concurrent_streams = n;
    }
    if let Some(n) = count(ctx, "http2.max_resets_per_second", max_resets_per_second, 1, 1_000_000) {
        cfg.max_resets_per_second = n;
    }
    if let Some(n) = count(ctx, "http2.max_control_frames_per_second", max_control_frames_per_second, 1, 1_000_000) {
        cfg.max_control_frames_per_second = n;
    }
    if let Some(n) = max_header_list_size.and_then(|v| value::size(ctx, "http2.max_header_list_size", &v, HEADER_LIST))
    {
        cfg.max_header_list_size = Some(n as u32);
    }
    if let Some(n) = stream_window.and_then(|v| value::size(ctx, "http2.stream_window", &v, WINDOW)) {
        cfg.stream_window = n as u32;
    }
    if let Some(n) = connection_window.and_then(|v| value::size(ctx, "http2.connection_window", &v, WINDOW)) {
        cfg.connection_window = n as u32;
    }
    cfg
}

/// The block as YAML when it differs from the defaults (`to_yaml`: the membership's merge
/// writes the config out and parses it again, so a key left out here is lost).
pub fn to_yaml(out: &mut String, h: &Http2Config) {
    if *h == Http2Config::default() {
        return;
    }
    let _ = write!(
        out,
        "http2: {{enabled: {}, max_concurrent_streams: {}, stream_window: {}, connection_window: {}, max_resets_per_second: {}, max_control_frames_per_second: {}",
        h.enabled,
        h.max_concurrent_streams,
        h.stream_window,
        h.connection_window,
        h.max_resets_per_second,
        h.max_control_frames_per_second
    );
    if let Some(n) = h.max_header_list_size {
        let _ = write!(out, ", max_header_list_size: {n}");
    }
    out.push_str("}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{errors, load};

    const SERVICES: &str = "services:\n  - name: web\n    backends: [{address: 127.0.0.1:9001}]\n";

    #[test]
    fn keys_and_defaults() {
        let cfg = load(&format!("listen: 127.0.0.1:8000\n{SERVICES}")).unwrap();
        assert_eq!(cfg.http2, Http2Config::default());
        let cfg = load(&format!(
            "listen: 127.0.0.1:8000\nhttp2: {{enabled: false, max_concurrent_streams: 10, max_header_list_size: 8k, stream_window: 1m, connection_window: 2m, max_resets_per_second: 5, max_control_frames_per_second: 6}}\n{SERVICES}"
        ))
        .unwrap();
        let want = Http2Config {
            enabled: false,
            max_concurrent_streams: 10,
            max_header_list_size: Some(8192),
            stream_window: 1 << 20,
            connection_window: 2 << 20,
            max_resets_per_second: 5,
            max_control_frames_per_second: 6,
        };
        assert_eq!(cfg.http2, want);
        let again = load(&crate::config::to_yaml(&cfg)).unwrap();
        assert_eq!(again.http2, want, "round trip");
    }

    #[test]
    fn out_of_range_values_are_reported() {
        let e = errors(&format!(
            "listen: 127.0.0.1:8000\nhttp2: {{max_concurrent_streams: 0, stream_window: 3g}}\n{SERVICES}"
        ));
        assert!(e.iter().any(|e| e.contains("http2.max_concurrent_streams")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("http2.stream_window")), "{e:?}");
    }
}
