//! Backends and their connection pools.
//!
//! A [`Backend`] lives as long as some config names it: reloads and admin changes build new
//! [`Pool`]s but carry the same `Arc<Backend>` over, so health state, counters and pooled
//! connections survive.

mod backend;
mod connection;
pub mod h2;
mod pool;
mod stream;

pub(crate) use backend::MAX_IDLE_PER_BACKEND;
pub use backend::{AdminState, Backend, InFlight, LastCheck};
pub use connection::{is_local_exhaustion, write_all_vectored, BackendConn, ConnectError};
pub use pool::Pool;
pub use stream::{BackendStream, BackendTls};
