//! `GET /console`: the operators' console, a page, a script and a stylesheet compiled into
//! the binary (no build step, nothing fetched from elsewhere). It calls the same API with
//! the operator's API key, which it keeps in the tab's session storage and never puts in a
//! URL; the pages (dead letters, broadcasts, delivery, a notification's timeline) need the
//! scopes of the routes they call.

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;

/// The console's routes (open: they hold no data; the API they call checks the key). The
/// page is documented; `/console/` serves it too, and its script and stylesheet are assets.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(page))
        .route("/console/", get(page))
        .route(
            "/console/console.js",
            get(|| {
                asset(
                    include_str!("console/console.js"),
                    "text/javascript; charset=utf-8",
                )
            }),
        )
        .route(
            "/console/console.css",
            get(|| {
                asset(
                    include_str!("console/console.css"),
                    "text/css; charset=utf-8",
                )
            }),
        )
}

/// The operators' console: dead letters, broadcasts, delivery statistics and a
/// notification's timeline, calling this API with an API key.
#[utoipa::path(
    get,
    path = "/console",
    operation_id = "console",
    tag = "operations",
    responses((status = 200, description = "The page (HTML).", body = String, content_type = "text/html"))
)]
async fn page() -> Response {
    asset(
        include_str!("console/index.html"),
        "text/html; charset=utf-8",
    )
    .await
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; \
                     connect-src 'self'; img-src 'self' data:; form-action 'self'; \
                     frame-ancestors 'none'; base-uri 'none'",
                ),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}
