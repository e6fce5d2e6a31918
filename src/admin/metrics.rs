//! `GET /metrics`: the Prometheus text exposition, read from the data plane's atomics now.
//! Takes the API token unless `admin.metrics_public: true`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::{AdminState, Routes};
use crate::observe::metrics;

pub fn routes(r: Routes, metrics_public: bool) -> Routes {
    if metrics_public {
        r.public_get("/metrics", scrape)
    } else {
        r.get("/metrics", scrape)
    }
}

async fn scrape(State(state): State<AdminState>) -> impl IntoResponse {
    let body = metrics::encode(state.shared.load_full());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body)
}
