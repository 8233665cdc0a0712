//! The HTTP surface: one module per resource, each exposing `router()`, merged here.

pub mod error;
pub mod health;
pub mod metrics;

use std::sync::Arc;

use axum::{Json, Router, http::StatusCode, middleware, response::IntoResponse};
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{config::Settings, kafka::KafkaAdmin, roles::Role};
use error::ErrorBody;

/// What every handler can reach. Cheap to clone: every field is a handle.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub kafka: KafkaAdmin,
    pub metrics: PrometheusHandle,
    /// The roles this instance runs.
    pub roles: Arc<[Role]>,
    /// Cancelled when the instance starts shutting down.
    pub shutdown: CancellationToken,
}

/// The whole router. Health and metrics are served whatever the roles.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(metrics::router())
        .fallback(not_found)
        .layer(middleware::from_fn(metrics::track))
        .with_state(state)
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody::new("not_found", "no such route")),
    )
}
