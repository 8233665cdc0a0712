//! The HTTP surface: one module per resource, each exposing `router()`, merged here.

pub mod admin;
pub mod broadcasts;
pub mod dashboard;
pub mod docs;
pub mod error;
pub mod health;
pub mod history;
pub mod inbox;
pub mod metrics;
pub mod notifications;
pub mod settings;
pub mod users;

use std::sync::Arc;

use axum::{
    Json, Router, extract::DefaultBodyLimit, http::StatusCode, middleware, response::IntoResponse,
};
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    domain::Channel,
    ingest::Ingestor,
    kafka::{KafkaAdmin, watchdog::Watchdogs},
    roles::Role,
    routing::RoutingTable,
    templates::Templates,
};
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
    pub routing: Arc<RoutingTable>,
    pub templates: Arc<Templates>,
    /// Whether a channel has an endpoint configured.
    pub channel_enabled: Arc<dyn Fn(Channel) -> bool + Send + Sync>,
    /// For connections of their own (pub/sub streams).
    pub redis_client: redis::Client,
    /// The ingestion step, also used to re-ingest poison messages.
    pub ingestor: Ingestor,
    /// The group membership of this instance's Kafka consumers, for readiness.
    pub consumers: Watchdogs,
}

/// Largest request body the API reads.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// The whole router. Health, metrics and docs are served whatever the roles; the resource
/// routes only where the `api` role runs.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .merge(health::router())
        .merge(docs::router())
        .merge(metrics::router());
    if state.roles.contains(&Role::Api) {
        router = router
            .merge(notifications::router())
            .merge(settings::router())
            .merge(users::router())
            .merge(broadcasts::router())
            .merge(inbox::router())
            .merge(dashboard::router())
            .merge(admin::router(state.clone()));
    }
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(metrics::track))
        .with_state(state)
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody::new("not_found", "no such route")),
    )
}
