//! `GET /api-docs/openapi.json` (the OpenAPI 3.1 document) and `GET /docs` (Swagger UI).
//!
//! The document is hand-written in `openapi.json` next to this file and compiled into the
//! binary, so it is served whatever the working directory. `tests/api/docs.rs` calls every
//! operation it names on a running instance, which catches a route that was renamed or
//! removed without the document following.

use axum::{
    Router,
    http::header,
    response::{Html, IntoResponse},
    routing::get,
};

use super::AppState;

/// The OpenAPI document, as served.
const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The documentation routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api-docs/openapi.json", get(openapi))
        .route("/docs", get(swagger_ui))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
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
