//! REST API v1: services and backends, reload, the effective config and the overlay. Reads
//! come from the last published view (lock-free); every change goes to the membership writer.

use std::time::SystemTime;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{AdminState, ApiError, ApiPath, ApiQuery, JsonBody, Routes};
use crate::config;
use crate::membership::overlay::same_address;
use crate::membership::{Change, Source, View};
use crate::state::Service;
use crate::upstream::{AdminState as BackendState, Backend};

pub fn routes(r: Routes) -> Routes {
    r.get("/api/v1/services", list_services)
        .post("/api/v1/services", add_service)
        .get("/api/v1/services/{name}", get_service)
        .delete("/api/v1/services/{name}", remove_service)
        .post("/api/v1/services/{name}/backends", add_backend)
        .patch("/api/v1/services/{name}/backends/{address}", patch_backend)
        .delete("/api/v1/services/{name}/backends/{address}", remove_backend)
        .post("/api/v1/reload", reload)
        .get("/api/v1/config", get_config)
        .delete("/api/v1/overlay", clear_overlay)
}

type Answer = Result<(StatusCode, Json<Value>), ApiError>;

async fn list_services(State(state): State<AdminState>) -> Json<Value> {
    let view = state.membership.view();
    let services: Vec<Value> = view.snapshot.services.iter().map(|s| service_json(&view, s)).collect();
    Json(json!({ "services": services, "conflicts": view.desired.conflicts }))
}

async fn get_service(State(state): State<AdminState>, ApiPath(name): ApiPath<String>) -> Answer {
    let view = state.membership.view();
    let s = find_service(&view, &name)?;
    Ok((StatusCode::OK, Json(service_json(&view, s))))
}

async fn add_service(State(state): State<AdminState>, JsonBody(body): JsonBody) -> Answer {
    let name = crate::membership::desired::service_name(&body);
    let view = state.membership.send(Source::Admin, Change::AddService(body)).await?;
    let s = find_service(&view, &name)?;
    Ok((StatusCode::CREATED, Json(service_json(&view, s))))
}

async fn remove_service(State(state): State<AdminState>, ApiPath(name): ApiPath<String>) -> Answer {
    let before = state.membership.view();
    let shown = service_json(&before, find_service(&before, &name)?);
    state.membership.send(Source::Admin, Change::RemoveService(name)).await?;
    Ok((StatusCode::OK, Json(shown)))
}

async fn add_backend(
    State(state): State<AdminState>,
    ApiPath(service): ApiPath<String>,
    JsonBody(body): JsonBody,
) -> Answer {
    let fields = object(&body, &["address", "weight"])?;
    let address = match fields.get("address") {
        Some(Value::String(a)) if !a.trim().is_empty() => a.trim().to_owned(),
        Some(Value::String(_)) => return Err(ApiError::bad_request("address is empty", "address")),
        Some(_) => return Err(ApiError::bad_request("address must be a string such as \"127.0.0.1:9004\"", "address")),
        None => return Err(ApiError::bad_request("address is missing", "address")),
    };
    let weight = match fields.get("weight") {
        None => 1,
        Some(w) => weight(w)?,
    };
    let change = Change::AddBackend { service: service.clone(), address: address.clone(), weight };
    let view = state.membership.send(Source::Admin, change).await?;
    Ok((StatusCode::CREATED, Json(backend_by_address(&view, &service, &address)?)))
}

async fn patch_backend(
    State(state): State<AdminState>,
    ApiPath((service, address)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody,
) -> Answer {
    let fields = object(&body, &["weight", "state"])?;
    let mut changes = Vec::new();
    if let Some(w) = fields.get("weight") {
        changes.push(Change::SetWeight { service: service.clone(), address: address.clone(), weight: weight(w)? });
    }
    if let Some(s) = fields.get("state") {
        let state = match s.as_str() {
            Some("active") => BackendState::Active,
            Some("draining") => BackendState::Draining,
            Some("disabled") => BackendState::Disabled,
            _ => return Err(ApiError::bad_request("state must be \"active\", \"draining\" or \"disabled\"", "state")),
        };
        changes.push(Change::SetState { service: service.clone(), address: address.clone(), state });
    }
    let change = match changes.len() {
        0 => return Err(ApiError::bad_request("nothing to change: give weight or state", "body")),
        1 => changes.remove(0),
        _ => Change::Batch(changes),
    };
    let view = state.membership.send(Source::Admin, change).await?;
    Ok((StatusCode::OK, Json(backend_by_address(&view, &service, &address)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    drain: Option<String>,
}

async fn remove_backend(
    State(state): State<AdminState>,
    ApiPath((service, address)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Answer {
    let drain = match q.drain.as_deref() {
        None | Some("true") => true,
        Some("false") => false,
        Some(_) => return Err(ApiError::bad_request("drain must be true or false", "drain")),
    };
    let before = state.membership.view();
    let shown = backend_by_address(&before, &service, &address)?;
    let change = Change::RemoveBackend { service: service.clone(), address: address.clone(), drain };
    let view = state.membership.send(Source::Admin, change).await?;
    if drain {
        // Still there, draining (or already gone if it had nothing in flight and the writer
        // was quick): show what is known.
        let now = backend_by_address(&view, &service, &address).unwrap_or(shown);
        return Ok((StatusCode::ACCEPTED, Json(now)));
    }
    let mut shown = shown;
    shown["state"] = json!("removed");
    Ok((StatusCode::OK, Json(shown)))
}

async fn reload(State(state): State<AdminState>) -> Answer {
    let view = state.membership.send(Source::Reload("admin API"), Change::Reload).await?;
    let body = json!({
        "status": "ok",
        "services": view.snapshot.services.len(),
        "conflicts": view.desired.conflicts,
    });
    Ok((StatusCode::OK, Json(body)))
}

async fn get_config(State(state): State<AdminState>) -> Json<Value> {
    let view = state.membership.view();
    Json(json!({
        "effective": config::to_yaml(&view.snapshot.config),
        "overlay": view.overlay,
        "conflicts": view.desired.conflicts,
    }))
}

async fn clear_overlay(State(state): State<AdminState>) -> Answer {
    let view = state.membership.send(Source::Admin, Change::ClearOverlay).await?;
    Ok((StatusCode::OK, Json(json!({ "overlay": view.overlay, "conflicts": view.desired.conflicts }))))
}

fn find_service<'a>(view: &'a View, name: &str) -> Result<&'a Service, ApiError> {
    view.snapshot
        .services
        .iter()
        .find(|s| s.config.name == name)
        .map(|s| &**s)
        .ok_or_else(|| ApiError::not_found(format!("no service {name:?}"), "name"))
}

fn backend_by_address(view: &View, service: &str, address: &str) -> Result<Value, ApiError> {
    let s = find_service(view, service)?;
    let lb = s.lb.load();
    lb.pool
        .backends
        .iter()
        .zip(&lb.pool.weights)
        .find(|(b, _)| same_address(&b.name, address))
        .map(|(b, w)| backend_json(view, s, b, *w))
        .ok_or_else(|| ApiError::not_found(format!("service {service:?} has no backend {address:?}"), "address"))
}

/// The body as an object with only `allowed` keys.
fn object<'a>(body: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, ApiError> {
    let fields = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object", "body"))?;
    if let Some(k) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!("unknown field {k:?}; allowed: {}", allowed.join(", ")), k));
    }
    Ok(fields)
}

fn weight(w: &Value) -> Result<u32, ApiError> {
    w.as_u64().filter(|n| (1..=config::MAX_WEIGHT as u64).contains(n)).and_then(|n| u32::try_from(n).ok()).ok_or_else(
        || {
            ApiError::bad_request(
                format!("weight must be a whole number from 1 to {}, got {w}", config::MAX_WEIGHT),
                "weight",
            )
        },
    )
}

fn service_json(view: &View, s: &Service) -> Value {
    let lb = s.lb.load();
    let backends: Vec<Value> =
        lb.pool.backends.iter().zip(&lb.pool.weights).map(|(b, w)| backend_json(view, s, b, *w)).collect();
    let c = &s.config;
    let mut out = json!({
        "name": c.name,
        "origin": if view.desired.overlay_services.contains(&c.name) { "overlay" } else { "file" },
        "hosts": c.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "path_prefix": c.path_prefix,
        "algorithm": c.algorithm.name(),
        "health_check": c.health.check.as_ref().map(|h| h.kind.name()),
        "backends": backends,
    });
    if c.managed.is_some() {
        // The supervisor's last report: each instance with its process id and state.
        out["managed"] = json!(view.snapshot.metrics.discovery.managed_info(&c.name).unwrap_or_default());
    }
    out
}

fn backend_json(view: &View, s: &Service, b: &Backend, weight: u32) -> Value {
    let checked = s.config.health.check.is_some();
    let status = if b.health.is_ejected() {
        "ejected"
    } else if b.health.is_up() {
        "up"
    } else {
        "down"
    };
    let last = b.last_check().filter(|_| checked);
    let reason = match (&last, status) {
        (_, "ejected") => Some("ejected by passive detection (failures on live traffic)".to_owned()),
        (Some(c), _) => Some(c.reason.clone()),
        (None, "down") => Some("waiting for its first passing check".to_owned()),
        (None, _) => None,
    };
    let last_check = last.map(|c| {
        let age = SystemTime::now().duration_since(c.at).unwrap_or_default();
        json!({ "passed": c.passed, "age_ms": u64::try_from(age.as_millis()).unwrap_or(u64::MAX) })
    });
    let from_overlay = view.desired.from_overlay(&s.config.name, &b.name);
    let (origin, source) = match view.desired.source_of(&s.config.name, &b.name) {
        Some(src) => ("discovery", src),
        None if from_overlay => ("overlay", "api"),
        None => ("file", "file"),
    };
    json!({
        "id": b.id,
        "address": b.name,
        "resolved": b.addr.to_string(),
        "weight": weight,
        "state": b.admin_state().name(),
        "origin": origin,
        "source": source,
        "health": { "status": status, "checked": checked, "last_check": last_check, "reason": reason },
        "in_flight": b.in_flight(),
        "requests_total": b.requests_total(),
        "connections_opened": b.connections_opened(),
    })
}
