//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer in front sends
//! first on a connection to say whom it is from, and the one Velocity sends its backends in
//! TCP mode (`proxy_protocol: v1 | v2`).
//!
//! [`parse`] is incremental and bounded: given what has arrived so far it says that more is
//! needed, that the header is complete (and how long it is), or that the bytes cannot be one.
//! It decides as early as the bytes allow (a connection that starts with anything but a
//! PROXY signature is refused at its first byte), reads at most [`MAX_HEADER`] bytes, and
//! never panics: it is fed whatever a peer sends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The version 2 signature (spec 2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 line is at most 107 bytes, `\r\n` included (spec 2.1).
pub const V1_MAX: usize = 107;
/// Version 2: the 16-byte fixed part and what it announces. TLVs past the addresses are read
/// and skipped; this bounds them (HAProxy's own limit is about the same size).
pub const MAX_HEADER: usize = 16 + 4096;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: the original client (`source`) and the address it connected to.
    Proxy { source: SocketAddr, destination: SocketAddr },
    /// v2 `LOCAL` (the sender's own connection, a health check) or v1 `UNKNOWN`, or a v2
    /// family other than TCP over IPv4/IPv6: the connection's own addresses stand.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole header of this many bytes (what follows is the connection's data).
    Done(Header, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The bytes do not start with a PROXY signature.
    NotProxy,
    /// A signature, then something the spec does not allow.
    Invalid(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotProxy => f.write_str("no PROXY protocol header"),
            Error::Invalid(why) => write!(f, "invalid PROXY protocol header: {why}"),
        }
    }
}

/// Parse a header at the front of `buf` (see the module's comment).
pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    let is_prefix = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if is_prefix(&V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if is_prefix(V1_PREFIX) {
        return parse_v1(buf);
    }
    Err(Error::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX { Err(Error::Invalid("v1 line too long")) } else { Ok(Parsed::Incomplete) };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(Error::Invalid("v1 line does not end with CRLF"));
    }
    let line = std::str::from_utf8(&window[..lf - 1]).map_err(|_| Error::Invalid("v1 line is not text"))?;
    let mut parts = line.split(' ');
    let _proxy = parts.next();
    let header = match parts.next() {
        // The rest of an UNKNOWN line is ignored (spec 2.1).
        Some("UNKNOWN") => Header::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Err(Error::Invalid("v1 line needs 4 fields after the family"));
            };
            let ip = |s: &str| -> Result<IpAddr, Error> {
                let ip = if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| Error::Invalid("v1 address does not match its family"))
            };
            let port = |s: &str| -> Result<u16, Error> {
                // Decimal without a leading zero or sign (spec: "0" to "65535").
                let valid = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
                match s.parse::<u16>() {
                    Ok(p) if valid && (s == "0" || !s.starts_with('0')) => Ok(p),
                    _ => Err(Error::Invalid("v1 port is not a number from 0 to 65535")),
                }
            };
            Header::Proxy {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(Error::Invalid("v1 family is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Parsed::Done(header, lf + 1))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(Error::Invalid("v2 version is not 2"));
    }
    let command = ver_cmd & 0x0f;
    if command > 1 {
        return Err(Error::Invalid("v2 command is neither LOCAL nor PROXY"));
    }
    if 16 + len > MAX_HEADER {
        return Err(Error::Invalid("v2 header longer than Velocity accepts"));
    }
    // Known families must fit their addresses in the announced length.
    let needed = match family {
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => 0,
    };
    if len < needed {
        return Err(Error::Invalid("v2 length too short for its address family"));
    }
    if buf.len() < 16 + len {
        return Ok(Parsed::Incomplete);
    }
    let a = &buf[16..16 + len];
    let header = match (command, family) {
        // LOCAL: the addresses (if any) are to be ignored.
        (0, _) => Header::Local,
        // TCP over IPv4.
        (_, 0x11) => {
            let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxy {
                source: SocketAddr::new(ip(0).into(), port(8)),
                destination: SocketAddr::new(ip(4).into(), port(10)),
            }
        }
        // TCP over IPv6.
        (_, 0x21) => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                Ipv6Addr::from(b)
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxy {
                source: SocketAddr::new(ip(0).into(), port(32)),
                destination: SocketAddr::new(ip(16).into(), port(34)),
            }
        }
        // UNSPEC, UDP, unix sockets: nothing Velocity can use as a client address.
        _ => Header::Local,
    };
    Ok(Parsed::Done(header, 16 + len))
}

/// Both addresses in one family: an IPv4 one becomes IPv4-mapped IPv6 beside an IPv6 one.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// A version 1 line for a connection from `source` to `destination`.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(source, destination);
    let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {family} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
}

/// A version 2 `PROXY` header (TCP, no TLVs) for a connection from `source` to `destination`.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(source, destination);
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match (s.ip(), d.ip()) {
        (IpAddr::V4(si), IpAddr::V4(di)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&si.octets());
            out.extend_from_slice(&di.octets());
        }
        (si, di) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(ip) => ip.octets(),
                IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(si));
            out.extend_from_slice(&v6(di));
        }
    }
    out.extend_from_slice(&s.port().to_be_bytes());
    out.extend_from_slice(&d.port().to_be_bytes());
    out
}

/// Read a header from a trusted peer into `buf`; what follows it stays in `buf` for the
/// connection. The caller bounds the wait.
pub async fn read_header(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Header, ReadError> {
    loop {
        match parse(buf) {
            Ok(Parsed::Done(header, len)) => {
                let _ = buf.split_to(len);
                return Ok(header);
            }
            Ok(Parsed::Incomplete) => {}
            Err(e) => return Err(ReadError::Protocol(e)),
        }
        buf.reserve(512);
        match stream.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

#[derive(Debug)]
pub enum ReadError {
    Protocol(Error),
    /// The peer closed before the header was whole.
    Closed,
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Protocol(e) => e.fmt(f),
            ReadError::Closed => f.write_str("closed before the PROXY protocol header was complete"),
            ReadError::Io(e) => write!(f, "reading the PROXY protocol header: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_examples_from_the_spec() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(line),
            Ok(Parsed::Done(
                Header::Proxy { source: addr("192.168.0.1:56324"), destination: addr("192.168.0.11:443") },
                47
            ))
        );
        let line = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(parse(line), Err(Error::Invalid("v1 address does not match its family")));
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n";
        assert_eq!(
            parse(line),
            Ok(Parsed::Done(
                Header::Proxy { source: addr("[2001:db8::1]:65535"), destination: addr("[2001:db8::2]:0") },
                line.len()
            ))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Parsed::Done(Header::Local, 15)));
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), V1_MAX);
        assert_eq!(parse(worst), Ok(Parsed::Done(Header::Local, V1_MAX)));
    }

    #[test]
    fn v1_refusals() {
        for (bad, why) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..], "v1 line does not end with CRLF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1 line needs 4 fields after the family"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1 port is not a number from 0 to 65535"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1 port is not a number from 0 to 65535"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1 address does not match its family"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 family is not TCP4, TCP6 or UNKNOWN"),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "v1 line needs 4 fields after the family"),
        ] {
            assert_eq!(parse(bad), Err(Error::Invalid(why)), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'P'; 200]), Err(Error::NotProxy));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'a');
        assert_eq!(parse(&long), Err(Error::Invalid("v1 line too long")));
        long.truncate(V1_MAX - 1);
        assert_eq!(parse(&long), Ok(Parsed::Incomplete));
    }

    #[test]
    fn not_proxy_is_seen_at_the_first_byte() {
        assert_eq!(parse(b"G"), Err(Error::NotProxy));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Error::NotProxy));
        assert_eq!(parse(b"PROX"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\r\n\r\n\0"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\r\n\r\nX"), Err(Error::NotProxy));
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v2_ipv4_and_ipv6_and_local() {
        // A v2 header as HAProxy sends it for 127.0.0.1:56324 -> 127.0.0.2:443, with a TLV
        // (PP2_TYPE_ALPN "h2") that is skipped.
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 17, 127, 0, 0, 1, 127, 0, 0, 2, 0xdc, 0x04, 0x01, 0xbb]);
        h.extend_from_slice(&[0x01, 0, 2, b'h', b'2']);
        let total = h.len();
        h.extend_from_slice(b"data");
        let want = Header::Proxy { source: addr("127.0.0.1:56324"), destination: addr("127.0.0.2:443") };
        assert_eq!(parse(&h), Ok(Parsed::Done(want, total)));
        for cut in 0..total {
            assert_eq!(parse(&h[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
        let v6 = encode_v2(addr("[2001:db8::1]:1000"), addr("[2001:db8::2]:80"));
        assert_eq!(v6.len(), 16 + 36);
        assert_eq!(
            parse(&v6),
            Ok(Parsed::Done(
                Header::Proxy { source: addr("[2001:db8::1]:1000"), destination: addr("[2001:db8::2]:80") },
                52
            ))
        );
        // LOCAL (a health check from the proxy in front): no address.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Parsed::Done(Header::Local, 16)));
        // A unix-socket source is no client IP.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 216]);
        unix.resize(16 + 216, 0);
        assert_eq!(parse(&unix), Ok(Parsed::Done(Header::Local, 232)));
    }

    #[test]
    fn v2_refusals() {
        let with = |ver_cmd: u8, fam: u8, len: u16| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[ver_cmd, fam]);
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        assert_eq!(parse(&with(0x11, 0x11, 12)), Err(Error::Invalid("v2 version is not 2")));
        assert_eq!(parse(&with(0x22, 0x11, 12)), Err(Error::Invalid("v2 command is neither LOCAL nor PROXY")));
        assert_eq!(parse(&with(0x21, 0x11, 11)), Err(Error::Invalid("v2 length too short for its address family")));
        assert_eq!(parse(&with(0x21, 0x21, 12)), Err(Error::Invalid("v2 length too short for its address family")));
        assert_eq!(parse(&with(0x21, 0x11, 65535)), Err(Error::Invalid("v2 header longer than Velocity accepts")));
    }

    #[test]
    fn encode_round_trips() {
        let pairs = [
            ("10.0.0.1:5000", "10.0.0.2:80"),
            ("[::1]:5000", "[fe80::1]:443"),
            // Mixed families: both go out as IPv6.
            ("10.0.0.1:5000", "[::1]:443"),
        ];
        for (s, d) in pairs {
            let (s, d) = (addr(s), addr(d));
            let (ws, wd) = same_family(s, d);
            let want = Header::Proxy { source: ws, destination: wd };
            for encoded in [encode_v1(s, d), encode_v2(s, d)] {
                assert_eq!(parse(&encoded), Ok(Parsed::Done(want, encoded.len())), "{encoded:?}");
            }
        }
        assert_eq!(
            encode_v1(addr("192.168.0.1:56324"), addr("192.168.0.11:443")),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
    }

    /// Random bytes, and valid headers with random bytes changed or cut: the parser answers
    /// each without panicking, never claims more bytes than it was given, and gives the same
    /// verdict whatever arrived before.
    #[test]
    fn fuzz_random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = [
            encode_v1(addr("1.2.3.4:5"), addr("6.7.8.9:10")),
            encode_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10")),
            encode_v2(addr("[::1]:5"), addr("[::2]:10")),
            b"PROXY UNKNOWN x y\r\n".to_vec(),
        ];
        for round in 0..200_000 {
            let mut bytes = if round % 2 == 0 {
                let len = (next() % 300) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                let mut b = valid[(next() % valid.len() as u64) as usize].clone();
                for _ in 0..(next() % 3) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b.truncate((next() as usize) % (b.len() + 1));
                b
            };
            if round % 7 == 0 {
                bytes.extend_from_slice(&V2_SIGNATURE);
            }
            if let Ok(Parsed::Done(_, n)) = parse(&bytes) {
                assert!(n <= bytes.len());
                // A complete header parses the same with more bytes after it.
                let mut more = bytes.clone();
                more.extend_from_slice(b"trailing");
                assert_eq!(parse(&more), parse(&bytes));
            }
        }
    }
}
