//! docs/admin-api.yaml stays true to the router: every route is documented, and every
//! documented operation is a route.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::IgnoredAny;
use serde::Deserialize;

#[derive(Deserialize)]
struct Doc {
    openapi: String,
    paths: BTreeMap<String, BTreeMap<String, IgnoredAny>>,
}

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

#[test]
fn every_route_is_documented_and_every_documented_operation_is_a_route() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-api.yaml")).unwrap();
    let doc: Doc = serde_saphyr::from_str(&text).unwrap();
    assert!(doc.openapi.starts_with("3."), "OpenAPI 3, got {}", doc.openapi);
    let documented: BTreeSet<(String, String)> = doc
        .paths
        .iter()
        .flat_map(|(path, ops)| {
            ops.keys().filter(|k| METHODS.contains(&k.as_str())).map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = velocity::admin::route_table().into_iter().collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes missing from docs/admin-api.yaml: {undocumented:?}");
    assert!(missing.is_empty(), "documented but not routed: {missing:?}");
    assert!(routed.len() >= 10, "{routed:?}");
}
