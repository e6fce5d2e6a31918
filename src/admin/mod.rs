//! The admin listener: an axum server beside the data plane. It reads the published snapshot
//! (through arc-swap, like a request) and sends changes to the membership writer; no other
//! module depends on it.
//!
//! Adding routes: write `src/admin/NAME.rs` with `pub fn routes(r: Routes) -> Routes` that adds
//! them (`r.get("/path", handler)`, or `r.public_get(..)` for one that needs no token), declare
//! `mod NAME;` below and call it in [`all_routes`]. Every route must be in docs/admin-api.yaml
//! (tests/admin_openapi.rs checks both ways).

mod api;
pub mod auth;
mod cluster;
mod dashboard;
pub mod error;
mod listener;
mod logs;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::routing::{delete, get, patch, post, MethodRouter};
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

pub use error::{ApiError, ApiPath, ApiQuery, JsonBody};

use crate::config::AdminConfig;
use crate::membership::Handle;
use crate::state::Shared;

/// Request bodies beyond this are refused with 413: a service definition is a few KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler can reach: `State(state): State<AdminState>`.
#[derive(Clone)]
pub struct AdminState {
    /// The published snapshot, as requests see it: `state.shared.load()`.
    pub shared: Shared,
    /// The membership writer: every change goes through it.
    pub membership: Handle,
    /// `None`: the API needs no token (only allowed on loopback addresses).
    pub token: Option<Arc<str>>,
    pub metrics_public: bool,
    /// `cluster:`: the members and the store's state; `None`: a single instance.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The routes and the record of them (for the OpenAPI test), built together so they cannot
/// differ. Protected routes get the token check; public ones do not.
pub struct Routes {
    protected: Router<AdminState>,
    public: Router<AdminState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn new() -> Routes {
        Routes { protected: Router::new(), public: Router::new(), table: Vec::new() }
    }

    fn add(mut self, method: Method, path: &'static str, route: MethodRouter<AdminState>, public: bool) -> Routes {
        if public {
            self.public = self.public.route(path, route);
        } else {
            self.protected = self.protected.route(path, route);
        }
        self.table.push((method, path));
        self
    }

    pub fn get<H: Handler<T, AdminState>, T: 'static>(self, path: &'static str, h: H) -> Routes {
        self.add(Method::GET, path, get(h), false)
    }

    pub fn post<H: Handler<T, AdminState>, T: 'static>(self, path: &'static str, h: H) -> Routes {
        self.add(Method::POST, path, post(h), false)
    }

    pub fn patch<H: Handler<T, AdminState>, T: 'static>(self, path: &'static str, h: H) -> Routes {
        self.add(Method::PATCH, path, patch(h), false)
    }

    pub fn delete<H: Handler<T, AdminState>, T: 'static>(self, path: &'static str, h: H) -> Routes {
        self.add(Method::DELETE, path, delete(h), false)
    }

    /// A GET that needs no token (such as `/metrics` with `metrics_public: true`: decide in
    /// the routes function from `metrics_public`, which [`all_routes`] is given).
    pub fn public_get<H: Handler<T, AdminState>, T: 'static>(self, path: &'static str, h: H) -> Routes {
        self.add(Method::GET, path, get(h), true)
    }
}

/// Every route of the admin API. `metrics_public` says whether `/metrics` skips the token.
fn all_routes(metrics_public: bool) -> Routes {
    let r = Routes::new();
    let r = api::routes(r);
    // Other route files are added here: `let r = observe::routes(r, metrics_public);`
    let r = metrics::routes(r, metrics_public);
    let r = dashboard::routes(r);
    let r = cluster::routes(r);
    logs::routes(r)
}

/// (method, path) of every route, as axum spells paths (`/api/v1/services/{name}`).
pub fn route_table() -> Vec<(String, String)> {
    all_routes(false).table.into_iter().map(|(m, p)| (m.to_string(), p.to_owned())).collect()
}

/// The whole admin router, with the token check, the body limit and JSON fallbacks.
pub fn router(state: AdminState) -> Router {
    let routes = all_routes(state.metrics_public);
    let auth = axum::middleware::from_fn_with_state(state.clone(), auth::require_token);
    Router::new()
        .merge(routes.protected.route_layer(auth))
        .merge(routes.public)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn no_route() -> ApiError {
    ApiError::not_found("no such route", "path")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route", Some("method"))
}

/// The admin API's bearer token, read from `token_env` at start. An admin API that should be
/// guarded but has no token to check against does not start: failing open would give anyone
/// the backends.
pub fn token(cfg: &AdminConfig) -> Result<Option<Arc<str>>, String> {
    let Some(name) = &cfg.token_env else { return Ok(None) };
    match std::env::var(name) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(Arc::from(t.trim()))),
        Ok(_) => Err(format!("admin.token_env: the environment variable {name} is empty")),
        Err(_) => Err(format!("admin.token_env: the environment variable {name} is not set")),
    }
}

/// A running admin listener; dropping it stops it.
pub struct AdminServer {
    pub local: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind the admin address and serve. Tests and scripts read the logged line for the port.
pub async fn start(cfg: &AdminConfig, state: AdminState) -> Result<AdminServer, String> {
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|e| format!("cannot listen on {} (admin): {e}", cfg.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!("admin API listening on http://{local}");
    let timeouts = state.shared.load().config.limits.timeouts;
    let deadlines = listener::Deadlines { header: timeouts.client_header, idle: timeouts.client_idle };
    let app = router(state);
    let task = tokio::spawn(listener::serve(listener, app, deadlines));
    Ok(AdminServer { local, task })
}
