//! Velocity: an HTTP load balancer and reverse proxy.
//!
//! Data flows `config` → `proxy` (listeners, per-request path) → `balancer` (pick a backend)
//! → `upstream` (backends and their connection pools); `observe` logs on the side.
//! `membership` is the one writer of the running state; `admin` (the REST API) and `discovery`
//! (DNS, Docker, managed processes) sit beside it and feed it.

pub mod admin;
pub mod balancer;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod discovery;
pub mod fd_limit;
pub mod health;
pub mod http1;
pub mod membership;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod proxy_protocol;
pub mod random;
pub mod request;
pub mod server;
pub mod state;
pub mod testserver;
pub mod tls;
pub mod upstream;
