//! `GET /api/v1/logs?status=5xx&service=web&limit=100`: the most recent access-log lines from
//! the in-memory ring, newest first, as the JSON access-log objects.

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::IntoResponse;

use super::{AdminState, ApiError, Routes};
use crate::observe::ring::Query;

pub fn routes(r: Routes) -> Routes {
    r.get("/api/v1/logs", recent)
}

async fn recent(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Result<impl IntoResponse, ApiError> {
    let q = Query::parse(query.as_deref().unwrap_or("")).map_err(|(field, msg)| ApiError::bad_request(msg, field))?;
    let body = state.shared.load().metrics.recent.query_json(&q);
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}
