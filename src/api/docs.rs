//! `GET /api-docs/openapi.json` (the OpenAPI 3.1 document) and `GET /docs` (Swagger UI).
//!
//! Swagger UI's page, script and stylesheet are Herald's own: `utoipa-swagger-ui` with its
//! `vendored` feature embeds a pinned Swagger UI (5.32.6, from the
//! `utoipa-swagger-ui-vendored` crate) at build time, so the page renders on a machine or
//! network that reaches no CDN, and the build itself downloads nothing.
//!
//! The document is hand-written in `openapi.json` next to this file and compiled into the
//! binary, so it is served whatever the working directory. The data schema of each event
//! type (`schemas/`) is added to its components as `EventData_{EVENT_TYPE}` when served, so
//! the document always shows the schemas this instance enforces. `tests/api/docs.rs` calls every
//! operation it names on a running instance, which catches a route that was renamed or
//! removed without the document following.

use axum::{Json, Router, extract::State, response::IntoResponse, routing::get};
use serde_json::Value;
use utoipa_swagger_ui::{Config, SwaggerUi};

use super::AppState;

/// The OpenAPI document, as served.
const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The documentation routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api-docs/openapi.json", get(openapi))
        // `/docs` redirects to `/docs/`, which serves the page and its assets.
        .merge(SwaggerUi::new("/docs").config(Config::from("/api-docs/openapi.json")))
}

async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    let mut document: Value =
        serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON (tests/api/docs.rs)");
    if let Some(components) = document["components"]["schemas"].as_object_mut() {
        for schema in state.schemas.iter() {
            let mut published = schema.document().clone();
            if let Some(fields) = published.as_object_mut() {
                // The document is one resource: ids of its own would make resolvers
                // look for the schemas elsewhere.
                fields.remove("$id");
                fields.remove("$schema");
            }
            components.insert(format!("EventData_{}", schema.name()), published);
        }
    }
    Json(document)
}
