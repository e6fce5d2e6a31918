//! `GET /api/v1/cluster`: this instance's view of the cluster (members, the store's state).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{AdminState, Routes};

pub fn routes(r: Routes) -> Routes {
    r.get("/api/v1/cluster", cluster)
}

async fn cluster(State(state): State<AdminState>) -> Json<Value> {
    let revision = state.membership.view().overlay.revision;
    let mut v = match &state.cluster {
        Some(c) => c.status(),
        // A single instance is a cluster of one.
        None => json!({"enabled": false, "live": 1, "members": []}),
    };
    v["overlay_revision"] = json!(revision);
    Json(v)
}
