//! `GET /api-docs/openapi.json` (the OpenAPI 3.1 document) and `GET /docs` (Swagger UI).
//!
//! The document is hand-written in `openapi.json` next to this file and compiled into the
//! binary, so it is served whatever the working directory. The data schema of each event
//! type (`schemas/`) is added to its components as `EventData_{EVENT_TYPE}` when served, so
//! the document always shows the schemas this instance enforces. `tests/api/docs.rs` calls every
//! operation it names on a running instance, which catches a route that was renamed or
//! removed without the document following.

use axum::{
    Json, Router,
    extract::State,
    response::{Html, IntoResponse},
    routing::get,
};
use serde_json::Value;

use super::AppState;

/// The OpenAPI document, as served.
const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The documentation routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api-docs/openapi.json", get(openapi))
        .route("/docs", get(swagger_ui))
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

/// The Swagger UI page. It loads Swagger UI from the unpkg CDN in the reader's browser: the
/// server itself needs no network, and Herald carries no copy of its assets.
const SWAGGER_UI: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Herald API</title>
  <link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js" crossorigin></script>
  <script>
    window.onload = () => {
      window.ui = SwaggerUIBundle({
        url: "/api-docs/openapi.json",
        dom_id: "#swagger-ui",
        deepLinking: true,
      });
    };
  </script>
</body>
</html>
"##;

async fn swagger_ui() -> Html<&'static str> {
    Html(SWAGGER_UI)
}
