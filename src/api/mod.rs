//! The HTTP surface: one module per resource, each exposing `router()`, merged here.

pub mod admin;
pub mod alerts;
pub mod auth;
pub mod broadcasts;
pub mod console;
pub mod dashboard;
pub mod docs;
pub mod error;
pub mod event_types;
pub mod health;
pub mod history;
pub mod inbox;
pub mod keys;
pub mod metrics;
pub mod notifications;
pub mod receipts;
pub mod settings;
pub mod suppressions;
pub mod templates;
pub mod users;
pub mod webhooks;

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::{
    auth::Authenticator,
    channels::in_app_hub::StreamHub,
    config::Settings,
    domain::Channel,
    event_schemas::EventSchemas,
    ingest::Ingestor,
    intake::writer::IntakeWriter,
    kafka::{KafkaAdmin, watchdog::Watchdogs},
    roles::Role,
    routing::RoutingTable,
    templates::Templates,
};
use error::ErrorBody;

/// What every handler can reach, shared: axum clones the state for every request, and one
/// reference count is cheaper than one per field. Reads as [`Shared`].
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The state of an instance.
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The handles behind [`AppState`].
pub struct Shared {
    pub settings: Arc<Settings>,
    /// The API's own pool (HERALD_DATABASE_API_MAX_CONNECTIONS): requests cannot take the
    /// workers' connections.
    pub db: PgPool,
    /// The workers' pool (ingest, dispatch, relay, projector, DLQ store).
    pub work_db: PgPool,
    /// Checks credentials (DESIGN §5a).
    pub auth: Authenticator,
    pub redis: ConnectionManager,
    pub kafka: KafkaAdmin,
    pub metrics: PrometheusHandle,
    /// The roles this instance runs.
    pub roles: Arc<[Role]>,
    /// Cancelled when the instance starts shutting down.
    pub shutdown: CancellationToken,
    pub routing: Arc<RoutingTable>,
    /// The data schema of each event type.
    pub schemas: Arc<EventSchemas>,
    pub templates: Arc<Templates>,
    /// Whether a channel has an endpoint configured.
    pub channel_enabled: Arc<dyn Fn(Channel) -> bool + Send + Sync>,
    /// The one Redis subscription the in-app streams of this instance share.
    pub streams: StreamHub,
    /// One permit per user import this instance may parse at once.
    pub imports: Arc<Semaphore>,
    /// The ingestion step, also used to re-ingest poison messages.
    pub ingestor: Ingestor,
    /// Stores `POST /api/v1/notifications` requests, several to a transaction.
    pub intake: IntakeWriter,
    /// The group membership of this instance's Kafka consumers, for readiness.
    pub consumers: Watchdogs,
}

/// Largest request body the API reads.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// Every documented route, in the sets that are served under different conditions.
struct Routes {
    /// Served by every instance: health, docs, console.
    open: OpenApiRouter<AppState>,
    /// Prometheus metrics, unless they have a listener of their own.
    metrics: OpenApiRouter<AppState>,
    /// The resource routes, where the `api` role runs.
    resources: OpenApiRouter<AppState>,
}

fn routes() -> Routes {
    Routes {
        open: health::router()
            .merge(docs::router())
            .merge(console::router()),
        metrics: metrics::router(),
        resources: notifications::router()
            .merge(settings::router())
            .merge(users::router())
            .merge(broadcasts::router())
            .merge(inbox::router())
            .merge(dashboard::router())
            .merge(admin::router())
            .merge(alerts::router())
            .merge(keys::router())
            .merge(event_types::router())
            .merge(templates::router())
            .merge(receipts::router())
            .merge(suppressions::router())
            .merge(webhooks::router()),
    }
}

/// The OpenAPI document of every route an instance may serve, derived from the routes
/// themselves (see [`docs`]).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let Routes {
        open,
        metrics,
        resources,
    } = routes();
    let mut openapi = OpenApiRouter::with_openapi(docs::ApiDoc::openapi())
        .merge(open)
        .merge(metrics)
        .merge(resources)
        .into_openapi();
    // What the layers of `router` answer on every API route, whatever its handler does;
    // the other routes are open (an empty security list says so).
    for (path, item) in &mut openapi.paths.paths {
        if !path.starts_with("/api/") {
            for operation in docs::operations_mut(item) {
                operation.security = Some(Vec::new());
            }
            continue;
        }
        for operation in docs::operations_mut(item) {
            if operation.request_body.is_some() {
                docs::respond(operation, 413, "PayloadTooLarge");
            }
            docs::respond(operation, 500, "Internal");
            docs::respond(operation, 503, "Unavailable");
        }
    }
    openapi
}

/// The whole router. Health and docs are served whatever the roles, and metrics unless
/// they have a listener of their own (HERALD_METRICS_ADDR); the resource routes only where
/// the `api` role runs. Every request under `/api/` is authenticated first (`auth`), and
/// API requests are bounded in number and time.
pub fn router(state: AppState) -> Router {
    let Routes {
        open,
        metrics,
        resources,
    } = routes();
    let mut router = open;
    if state.settings.http.metrics_addr.is_none() {
        router = router.merge(metrics);
    }
    if state.roles.contains(&Role::Api) {
        router = router.merge(resources);
    }
    let router = Router::from(router);
    let limits = Limits {
        permits: Arc::new(Semaphore::new(state.settings.http.max_concurrent_requests)),
        timeout: state.settings.http.request_timeout,
    };
    let cors = cors(&state.settings.access.cors_allowed_origins);
    let mut router = router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(limits, limit));
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    router
        .layer(middleware::from_fn(metrics::track))
        .with_state(state)
}

/// What bounds the API: requests in progress at once, and how long each may take.
#[derive(Clone)]
struct Limits {
    permits: Arc<Semaphore>,
    timeout: Duration,
}

/// Answers 503 at once beyond the concurrency bound (a flood is refused, not queued) and
/// 503 for a request that does not answer in time. Health, docs and metrics are exempt, so
/// an overloaded instance can still say so.
async fn limit(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let Ok(_permit) = limits.permits.try_acquire_owned() else {
        ::metrics::counter!("herald_http_refused_total", "reason" => "overloaded").increment(1);
        return refusal(
            "overloaded",
            "too many requests in progress on this instance; retry shortly",
        );
    };
    match tokio::time::timeout(limits.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            ::metrics::counter!("herald_http_refused_total", "reason" => "timeout").increment(1);
            tracing::warn!(timeout = ?limits.timeout, "an API request timed out");
            refusal(
                "timeout",
                "the request took too long and was abandoned; retry it",
            )
        }
    }
}

fn refusal(code: &'static str, message: &str) -> Response {
    error::retry_later(
        StatusCode::SERVICE_UNAVAILABLE,
        1,
        ErrorBody::new(code, message),
    )
}

/// CORS for the configured origins (none: no CORS headers at all, so browsers keep other
/// origins out). Only what the API uses is allowed; no cookies are involved.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("idempotency-replayed"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody::new("not_found", "no such route")),
    )
}
