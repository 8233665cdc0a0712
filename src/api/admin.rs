//! The DLQ admin API, for credentials with the `dlq:admin` scope.
//!
//! - `GET /api/v1/admin/dlq?domain=&status=&limit=&cursor=`: newest first; DISCARDED ones
//!   only with `status=DISCARDED`.
//! - `GET /api/v1/admin/dlq/{id}`
//! - `POST /api/v1/admin/dlq/{id}/retry`
//! - `POST /api/v1/admin/dlq/retry-all?domain=&limit=`: retries up to `limit` (default 100,
//!   at most 1000) PENDING ones and reports the counts.
//! - `DELETE /api/v1/admin/dlq/{id}`: discards (kept for audit).
//!
//! Actions record who did them: the name of the credential (never a header the caller
//! chooses).

use axum::{
    Json, Router,
    extract::State,
    http::Method,
    middleware::from_fn_with_state,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, authorize},
    error::{ApiError, ApiPath, ApiQuery},
};
use crate::{
    auth::{Principal, Scope},
    dlq::admin::{self as dlq, AdminError, DeadLetterView, ListFilter, Page, RetryAllReport},
    domain::Domain,
    read_model::queries::decode_cursor,
};

/// The dead-letter routes, each needing `dlq:admin`.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::DlqAdmin)),
        (Method::POST, Need::Scope(Scope::DlqAdmin)),
        (Method::DELETE, Need::Scope(Scope::DlqAdmin)),
    ];
    Router::new()
        .route("/api/v1/admin/dlq", get(list))
        .route("/api/v1/admin/dlq/retry-all", post(retry_all))
        .route("/api/v1/admin/dlq/{id}", get(read).delete(discard))
        .route("/api/v1/admin/dlq/{id}/retry", post(retry))
        .route_layer(from_fn_with_state(RULES, authorize))
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::NotFound(id) => ApiError::NotFound(format!("no dead letter {id}")),
            AdminError::Conflict(message) => ApiError::Conflict(message),
            AdminError::Internal(error) => ApiError::Internal(error),
        }
    }
}

/// `GET /api/v1/admin/dlq` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    domain: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

fn domain(raw: Option<String>) -> Result<Option<String>, ApiError> {
    raw.map(|d| {
        d.parse::<Domain>()
            .map(|d| d.as_str().to_owned())
            .map_err(ApiError::BadRequest)
    })
    .transpose()
}

async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Page>, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(s @ ("PENDING" | "RETRIED" | "DISCARDED")) => Some(s.to_owned()),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "status must be PENDING, RETRIED or DISCARDED, got {other:?}"
            )));
        }
    };
    let limit = match query.limit.unwrap_or(50) {
        n if (1..=500).contains(&n) => n,
        n => {
            return Err(ApiError::BadRequest(format!(
                "limit must be 1 to 500, got {n}"
            )));
        }
    };
    let after = query
        .cursor
        .as_deref()
        .map(|c| {
            decode_cursor(c).ok_or_else(|| ApiError::BadRequest(format!("{c:?} is not a cursor")))
        })
        .transpose()?;
    let filter = ListFilter {
        domain: domain(query.domain)?,
        status,
        after,
        limit,
    };
    Ok(Json(dlq::list(&state.db, &filter).await?))
}

fn id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a dead letter id")))
}

async fn read(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(dlq::get(&state.db, id(&raw)?).await?))
}

async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = id(&raw)?;
    let kind = dlq::retry(&state.ingestor, id, &principal.name()).await?;
    let letter = dlq::get(&state.db, id).await?;
    Ok(Json(json!({ "retry": kind, "deadLetter": letter })))
}

/// `POST /api/v1/admin/dlq/retry-all` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryAllQuery {
    domain: Option<String>,
    limit: Option<i64>,
}

async fn retry_all(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<RetryAllQuery>,
) -> Result<Json<RetryAllReport>, ApiError> {
    let limit = match query.limit.unwrap_or(100) {
        n if (1..=1000).contains(&n) => n,
        n => {
            return Err(ApiError::BadRequest(format!(
                "limit must be 1 to 1000, got {n}"
            )));
        }
    };
    let domain = domain(query.domain)?;
    let report =
        dlq::retry_all(&state.ingestor, domain.as_deref(), limit, &principal.name()).await?;
    Ok(Json(report))
}

async fn discard(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(
        dlq::discard(&state.db, id(&raw)?, &principal.name()).await?,
    ))
}
