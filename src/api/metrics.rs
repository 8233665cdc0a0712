//! `GET /metrics`: the Prometheus text exposition, and the middleware that counts requests.

use std::time::Instant;

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};

use super::AppState;

/// The `/metrics` route.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

async fn render(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Counts every request and times it, labelled by route template (not the raw path, which
/// would give one series per id).
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("herald_http_requests_total", &labels).increment(1);
    metrics::histogram!("herald_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}
