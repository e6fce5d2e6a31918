//! REST API v1: services and backends, reload, config, overlay.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{AdminState, Routes};

pub fn routes(r: Routes) -> Routes {
    r.get("/api/v1/services", list_services)
}

async fn list_services(State(state): State<AdminState>) -> Json<Value> {
    let view = state.membership.view();
    let services: Vec<Value> = view
        .snapshot
        .services
        .iter()
        .map(|s| {
            let lb = s.lb.load();
            let backends: Vec<Value> = lb
                .pool
                .backends
                .iter()
                .zip(&lb.pool.weights)
                .map(|(b, w)| json!({ "address": b.name, "weight": w, "in_flight": b.in_flight() }))
                .collect();
            json!({ "name": s.config.name, "backends": backends })
        })
        .collect();
    Json(json!({ "services": services }))
}
