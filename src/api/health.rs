//! `GET /health/live` and `GET /health/ready`.
//!
//! Liveness says the process serves requests. Readiness checks each dependency
//! (PostgreSQL, Redis, Kafka) concurrently, each within [`CHECK_TIMEOUT`], and answers 503
//! naming what is down, or while the instance is shutting down, so that a load balancer
//! stops sending it work. Each dependency's error text (driver messages can name hosts and
//! users) is shown only to a caller with an API key or the admin token.
//! It also reports each Kafka consumer group's membership and
//! answers 503 while one has been without partitions beyond the watchdog's bound
//! ("notif-payment: no assignment for 45 s"): every dependency can answer while events
//! pile up unread.

use std::{collections::BTreeMap, future::Future, time::Instant};

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use serde::Serialize;
use tokio::time::{Duration, timeout};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{AppState, error::ErrorBody};
use crate::auth::Principal;
use crate::kafka::watchdog::ConsumerReport;
use crate::roles::Role;

/// How long one dependency may take to answer before it counts as down.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The health routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
}

/// The liveness answer.
#[derive(Debug, Serialize, ToSchema)]
struct Liveness {
    /// Always `live`.
    status: &'static str,
    /// The roles this instance runs.
    #[schema(value_type = Vec<Role>)]
    roles: Arc<[Role]>,
}

/// Liveness: the process serves requests.
#[utoipa::path(
    get,
    path = "/health/live",
    operation_id = "getLiveness",
    tag = "operations",
    responses((status = 200, description = "The instance is live.", body = Liveness))
)]
async fn live(State(state): State<AppState>) -> Json<Liveness> {
    Json(Liveness {
        status: "live",
        roles: state.roles.clone(),
    })
}

/// One dependency's state in the readiness body.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = DependencyCheck)]
struct Check {
    status: &'static str,
    latency_ms: u128,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The readiness body: `status` is `ready` or `unavailable`; `error` names what is down.
#[derive(Debug, Serialize, ToSchema)]
struct Readiness {
    status: &'static str,
    checks: BTreeMap<&'static str, Check>,
    /// Each consumer group of this instance, by group.
    consumers: BTreeMap<String, ConsumerReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<crate::api::error::ErrorDetail>,
}

/// Readiness: PostgreSQL, Redis and Kafka answer and every consumer group has its
/// partitions. Each dependency's error text is shown only to a caller with an API key or the
/// admin token.
#[utoipa::path(
    get,
    path = "/health/ready",
    operation_id = "getReadiness",
    tag = "operations",
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Not ready: `error.code` is `not_ready` and `error.message` \
            names what is down (or `shutting down`).", body = Readiness),
    )
)]
async fn ready(State(state): State<AppState>, headers: HeaderMap) -> (StatusCode, Json<Readiness>) {
    let (postgres, redis, kafka) = tokio::join!(
        check(async {
            sqlx::query("SELECT 1")
                .execute(&state.db)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }),
        check(async {
            let mut conn = state.redis.clone();
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }),
        check(async {
            state
                .kafka
                .ping(CHECK_TIMEOUT)
                .await
                .map_err(|e| e.to_string())
        }),
    );
    let mut checks = BTreeMap::from([("postgres", postgres), ("redis", redis), ("kafka", kafka)]);
    if !operator(&state, &headers).await {
        for check in checks.values_mut() {
            check.error = None;
        }
    }
    let down: Vec<&str> = checks
        .iter()
        .filter(|(_, c)| c.status != "up")
        .map(|(name, _)| *name)
        .collect();
    let consumers = state.consumers.reports();
    let stuck: Vec<&str> = consumers
        .values()
        .filter_map(|c| c.problem.as_deref())
        .collect();

    let problem = if state.shutdown.is_cancelled() {
        Some("shutting down".to_owned())
    } else if !down.is_empty() {
        Some(format!("not ready: {} down", down.join(", ")))
    } else if !stuck.is_empty() {
        Some(format!("not ready: {}", stuck.join(", ")))
    } else {
        None
    };
    match problem {
        None => (
            StatusCode::OK,
            Json(Readiness {
                status: "ready",
                checks,
                consumers,
                error: None,
            }),
        ),
        Some(message) => {
            tracing::warn!(%message, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Readiness {
                    status: "unavailable",
                    checks,
                    consumers,
                    error: Some(ErrorBody::new("not_ready", message).error),
                }),
            )
        }
    }
}

/// Whether the caller sent the admin token or an API key (any scope): an operator may see
/// why a dependency is down. Anonymous callers and user tokens see only up or down.
async fn operator(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(Ok(credential)) = super::auth::bearer(headers) else {
        return false;
    };
    matches!(
        timeout(CHECK_TIMEOUT, state.auth.authenticate(credential)).await,
        Ok(Ok(Ok(Principal::Admin | Principal::Key(_))))
    )
}

async fn check(probe: impl Future<Output = Result<(), String>>) -> Check {
    let started = Instant::now();
    let outcome = match timeout(CHECK_TIMEOUT, probe).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    };
    let latency_ms = started.elapsed().as_millis();
    match outcome {
        Ok(()) => Check {
            status: "up",
            latency_ms,
            error: None,
        },
        Err(error) => Check {
            status: "down",
            latency_ms,
            error: Some(error),
        },
    }
}
