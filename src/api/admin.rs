//! The DLQ admin API, behind `Authorization: Bearer $HERALD_ADMIN_TOKEN` (401 without a
//! token, 403 with a wrong one, 503 when no token is configured).
//!
//! - `GET /api/v1/admin/dlq?domain=&status=&limit=&cursor=`: newest first; DISCARDED ones
//!   only with `status=DISCARDED`.
//! - `GET /api/v1/admin/dlq/{id}`
//! - `POST /api/v1/admin/dlq/{id}/retry`
//! - `POST /api/v1/admin/dlq/retry-all?domain=&limit=`: retries up to `limit` (default 100,
//!   at most 1000) PENDING ones and reports the counts.
//! - `DELETE /api/v1/admin/dlq/{id}`: discards (kept for audit).
//!
//! Actions record who did them: the `X-Operator` header, or `admin`.

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderMap, header},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    AppState,
    error::{ApiError, ApiPath, ApiQuery},
};
use crate::{
    dlq::admin::{self as dlq, AdminError, DeadLetterView, ListFilter, Page, RetryAllReport},
    domain::Domain,
    read_model::queries::decode_cursor,
};

/// The admin routes, each behind the bearer token.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/dlq", get(list))
        .route("/api/v1/admin/dlq/retry-all", post(retry_all))
        .route("/api/v1/admin/dlq/{id}", get(read).delete(discard))
        .route("/api/v1/admin/dlq/{id}/retry", post(retry))
        .route_layer(middleware::from_fn_with_state(state, authorize))
}

async fn authorize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(token) = &state.settings.admin.token else {
        return Err(ApiError::Unavailable(
            "the admin API is disabled: HERALD_ADMIN_TOKEN is not set".into(),
        ));
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::Unauthorized("send Authorization: Bearer <admin token>".into()))?;
    use secrecy::ExposeSecret;
    // Comparing digests keeps the comparison's time independent of where they differ.
    if Sha256::digest(presented.trim().as_bytes())
        != Sha256::digest(token.expose_secret().as_bytes())
    {
        return Err(ApiError::Forbidden("the admin token is not valid".into()));
    }
    Ok(next.run(request).await)
}

fn operator(headers: &HeaderMap) -> String {
    headers
        .get("x-operator")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 100)
        .unwrap_or("admin")
        .to_owned()
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
    headers: HeaderMap,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = id(&raw)?;
    let kind = dlq::retry(&state.ingestor, id, &operator(&headers)).await?;
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
    headers: HeaderMap,
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
    let report = dlq::retry_all(
        &state.ingestor,
        domain.as_deref(),
        limit,
        &operator(&headers),
    )
    .await?;
    Ok(Json(report))
}

async fn discard(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(
        dlq::discard(&state.db, id(&raw)?, &operator(&headers)).await?,
    ))
}
