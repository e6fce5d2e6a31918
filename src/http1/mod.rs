//! HTTP/1.1 on the wire, for the proxy's own use: heads parsed with `httparse` into raw bytes
//! plus offsets, and the chunked transfer coding scanned rather than decoded.
//!
//! Written here rather than taken from hyper because a proxy forwards what it received: hyper
//! builds a `HeaderMap` for every message, hands each client request to a separate connection
//! task through a channel, and serialises the headers again; with those, Velocity spent about
//! 1.6 times NGINX's user-space instructions per request (callgrind, `bench/callgrind.sh`).
//! hyper still serves the health checks and the test clients.

pub mod chunked;
#[doc(hidden)]
pub mod fuzzing;
mod head;

pub use chunked::{ChunkedError, ChunkedScanner};
pub use head::{encode_local, valid_host, ClientFraming, Forwarding, Framing, HeadError, RequestHead, ResponseHead};
