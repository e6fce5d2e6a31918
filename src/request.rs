//! The request as the balancer, the policies and the access log see it, whatever protocol
//! brought it: method, scheme, authority, path, headers and the client's address.
//!
//! Both downstream protocols hand the core the same [`RequestHead`]: HTTP/1.x's parser fills
//! it from the bytes the client sent, HTTP/2 builds it from a stream's pseudo-headers and
//! header list (`src/proxy/downstream/h2.rs`: the fields written as an HTTP/1.1 head and
//! parsed by the same parser, so both get the same checks). The view only reads
//! it, so building one per request costs a few words on the stack; nothing outside `http1`
//! and the downstream sessions touches a protocol's own framing.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use hyper::Method;

use crate::http1::RequestHead;

/// How the client reached Velocity: `X-Forwarded-Proto`, `Secure` cookies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Scheme::Http => b"http",
            Scheme::Https => b"https",
        }
    }
}

/// Which protocol the client speaks (the access log's protocol field, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// `protocol: tcp` listeners: no HTTP, an empty head (no path, no header).
    Tcp,
}

/// A request, read-only, for everything that decides about it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    head: &'a RequestHead,
    pub scheme: Scheme,
    pub protocol: Protocol,
    /// The client: the socket peer, or the address `trusted_proxies` resolution found (see
    /// [`crate::policy::GlobalGate::client_ip`]), which every policy, the hash balancers and
    /// the access log then use.
    pub client: SocketAddr,
}

impl<'a> RequestView<'a> {
    pub fn new(head: &'a RequestHead, scheme: Scheme, protocol: Protocol, client: SocketAddr) -> Self {
        RequestView { head, scheme, protocol, client }
    }

    /// The same request with the client resolved (`trusted_proxies`).
    pub fn with_client_ip(self, ip: IpAddr) -> Self {
        RequestView { client: SocketAddr::new(ip, self.client.port()), ..self }
    }

    pub fn client_ip(&self) -> IpAddr {
        self.client.ip()
    }

    pub fn method(&self) -> &'a Method {
        &self.head.method
    }

    /// HTTP/2's `:authority`, HTTP/1's absolute-form authority or `Host`.
    pub fn authority(&self) -> Option<&'a [u8]> {
        self.head.host()
    }

    /// The path without the query.
    pub fn path(&self) -> &'a [u8] {
        self.head.path()
    }

    /// Path and query (origin-form).
    pub fn path_and_query(&self) -> &'a [u8] {
        self.head.origin_target()
    }

    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.head.header(name)
    }

    /// Every value of header `name`, in order.
    pub fn headers_named(&self, name: &'a str) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
        self.head.headers_named(name)
    }

    /// The authority, sharing the head's buffer (for the access log).
    pub fn authority_bytes(&self) -> Option<Bytes> {
        self.head.host_bytes()
    }

    /// The target as the client sent it (for the access log).
    pub fn target_bytes(&self) -> Bytes {
        self.head.target_bytes()
    }
}
