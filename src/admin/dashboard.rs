//! `GET /`: the live dashboard, one self-contained page built into the binary (no CDN, no
//! build step). It holds no data itself: it asks for the token when one is needed and reads
//! `GET /api/v1/stats` (below) and `GET /api/v1/logs` every second, and drives the backend
//! PATCH route for its drain / disable / enable buttons.

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::Json;

use super::{AdminState, Routes};
use crate::observe::stats;

const PAGE: &str = include_str!("dashboard.html");

pub fn routes(r: Routes) -> Routes {
    r.public_get("/", page).get("/api/v1/stats", read)
}

async fn page() -> impl IntoResponse {
    // The page must not be framed by another site (its buttons change backends).
    ([(header::X_FRAME_OPTIONS, "DENY"), (header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

/// Totals and histogram buckets now; `?history=1` adds the last 10 minutes per service.
async fn read(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Json<stats::Stats> {
    let with_history = query.as_deref().is_some_and(|q| q.split('&').any(|p| p == "history=1"));
    Json(stats::read(&state.shared.load(), with_history))
}
