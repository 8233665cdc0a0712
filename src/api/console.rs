//! `GET /console`: the operators' console, a page, a script and a stylesheet compiled into
//! the binary (no build step, nothing fetched from elsewhere). It calls the same API with
//! the operator's API key, which it keeps in the tab's session storage and never puts in a
//! URL; the pages (dead letters, broadcasts, delivery, a notification's timeline) need the
//! scopes of the routes they call.

use axum::{
    Router,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::AppState;

/// The console's routes (open: they hold no data; the API they call checks the key).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/console",
            get(|| {
                asset(
                    include_str!("console/index.html"),
                    "text/html; charset=utf-8",
                )
            }),
        )
        .route(
            "/console/",
            get(|| {
                asset(
                    include_str!("console/index.html"),
                    "text/html; charset=utf-8",
                )
            }),
        )
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

/// One asset, with headers that keep the page to its own origin: it runs only its own
/// script, talks only to this Herald, and cannot be framed.
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
