//! The run-time deny list: `GET/POST/DELETE /api/v1/denylist` (every request) and
//! `/api/v1/services/{name}/denylist` (one service). Entries live in the overlay (and its
//! state file), so they survive reloads and restarts; the membership writer applies them,
//! and the next request sees them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{AdminState, ApiError, ApiPath, ApiQuery, JsonBody, Routes};
use crate::membership::{Change, Source, View};

pub fn routes(r: Routes) -> Routes {
    r.get("/api/v1/denylist", get_global)
        .post("/api/v1/denylist", add_global)
        .delete("/api/v1/denylist", remove_global)
        .get("/api/v1/services/{name}/denylist", get_service)
        .post("/api/v1/services/{name}/denylist", add_service)
        .delete("/api/v1/services/{name}/denylist", remove_service)
}

type Answer = Result<(StatusCode, Json<Value>), ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    cidr: Option<String>,
}

fn listing(view: &View, service: Option<&str>) -> Json<Value> {
    let denylist: Vec<&str> = view.overlay.denied(service).collect();
    match service {
        None => Json(json!({ "denylist": denylist })),
        Some(name) => Json(json!({ "service": name, "denylist": denylist })),
    }
}

fn known_service(view: &View, name: &str) -> Result<(), ApiError> {
    match view.snapshot.services.iter().any(|s| s.config.name == name) {
        true => Ok(()),
        false => Err(ApiError::not_found(format!("no service {name:?}"), "name")),
    }
}

/// `{"cidrs": ["10.0.0.0/8", ...]}` or `{"cidr": "192.0.2.7"}`.
fn cidrs(body: &Value) -> Result<Vec<String>, ApiError> {
    let fields = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object", "body"))?;
    if let Some(k) = fields.keys().find(|k| !matches!(k.as_str(), "cidr" | "cidrs")) {
        return Err(ApiError::bad_request(format!("unknown field {k:?}; allowed: cidr, cidrs"), k));
    }
    let mut out = Vec::new();
    match fields.get("cidr") {
        Some(Value::String(c)) => out.push(c.clone()),
        Some(_) => return Err(ApiError::bad_request("cidr must be a string such as \"192.0.2.0/24\"", "cidr")),
        None => {}
    }
    match fields.get("cidrs") {
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(c) => out.push(c.clone()),
                    _ => return Err(ApiError::bad_request("cidrs must be a list of strings", "cidrs")),
                }
            }
        }
        Some(_) => return Err(ApiError::bad_request("cidrs must be a list of strings", "cidrs")),
        None => {}
    }
    if out.is_empty() {
        return Err(ApiError::bad_request("give cidr or cidrs: the address ranges to deny", "cidrs"));
    }
    Ok(out)
}

async fn change(state: &AdminState, service: Option<String>, cidrs: Vec<String>, add: bool) -> Answer {
    let view = state.membership.send(Source::Admin, Change::Deny { service: service.clone(), cidrs, add }).await?;
    Ok((StatusCode::OK, listing(&view, service.as_deref())))
}

async fn get_global(State(state): State<AdminState>) -> Json<Value> {
    listing(&state.membership.view(), None)
}

async fn add_global(State(state): State<AdminState>, JsonBody(body): JsonBody) -> Answer {
    change(&state, None, cidrs(&body)?, true).await
}

async fn remove_global(State(state): State<AdminState>, ApiQuery(q): ApiQuery<RemoveQuery>) -> Answer {
    change(&state, None, q.cidr.into_iter().collect(), false).await
}

async fn get_service(State(state): State<AdminState>, ApiPath(name): ApiPath<String>) -> Answer {
    let view = state.membership.view();
    known_service(&view, &name)?;
    Ok((StatusCode::OK, listing(&view, Some(&name))))
}

async fn add_service(
    State(state): State<AdminState>,
    ApiPath(name): ApiPath<String>,
    JsonBody(body): JsonBody,
) -> Answer {
    known_service(&state.membership.view(), &name)?;
    change(&state, Some(name), cidrs(&body)?, true).await
}

async fn remove_service(
    State(state): State<AdminState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Answer {
    known_service(&state.membership.view(), &name)?;
    change(&state, Some(name), q.cidr.into_iter().collect(), false).await
}
