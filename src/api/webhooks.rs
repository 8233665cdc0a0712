//! Webhook endpoints (issue 15), for credentials with the `webhooks:admin` scope.
//!
//! - `POST /api/v1/webhooks` `{"url", "kinds": ["delivery", "notification_status",
//!   "broadcast"], "description"}` → 201 with the endpoint and its `secret`, shown this
//!   once. A URL on a non-public address is refused 400 unless configuration allows it.
//! - `GET /api/v1/webhooks`, `GET /api/v1/webhooks/{id}`
//! - `DELETE /api/v1/webhooks/{id}` → 204 (kept for audit; its waiting calls are dropped)
//! - `POST /api/v1/webhooks/{id}/enable`: after it was disabled for failing.
//! - `GET /api/v1/webhooks/{id}/deliveries?status=&limit=&cursor=`: its calls, newest first.

use axum::{
    Json, Router,
    extract::State,
    http::{Method, StatusCode},
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, authorize},
    error::{ApiError, ApiJson, ApiPath, ApiQuery},
};
use crate::{
    auth::{Principal, Scope},
    webhooks::{self, Endpoint, Kind},
};

/// The webhook routes, each needing `webhooks:admin`.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::WebhooksAdmin)),
        (Method::POST, Need::Scope(Scope::WebhooksAdmin)),
        (Method::DELETE, Need::Scope(Scope::WebhooksAdmin)),
    ];
    Router::new()
        .route("/api/v1/webhooks", post(create).get(list))
        .route("/api/v1/webhooks/{id}", get(read).delete(delete))
        .route("/api/v1/webhooks/{id}/enable", post(enable))
        .route("/api/v1/webhooks/{id}/deliveries", get(deliveries))
        .route_layer(from_fn_with_state(RULES, authorize))
}

/// `POST /api/v1/webhooks` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    url: String,
    /// Default: every kind.
    kinds: Option<Vec<String>>,
    description: Option<String>,
}

async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateRequest>,
) -> Result<Response, ApiError> {
    let url = webhooks::check_url(&request.url, state.settings.webhooks.allow_private)
        .await
        .map_err(|e| ApiError::BadRequest(e.0))?;
    let kinds: Vec<Kind> = match request.kinds {
        None => Kind::ALL.to_vec(),
        Some(kinds) if kinds.is_empty() => {
            return Err(ApiError::BadRequest(
                "kinds: name at least one of delivery, notification_status, broadcast".to_owned(),
            ));
        }
        Some(kinds) => {
            let mut parsed = Vec::new();
            for kind in kinds {
                let kind: Kind = kind
                    .parse()
                    .map_err(|e: String| ApiError::BadRequest(format!("kinds: {e}")))?;
                if !parsed.contains(&kind) {
                    parsed.push(kind);
                }
            }
            parsed
        }
    };
    let description = request.description.map(|d| d.replace('\0', ""));
    if description.as_ref().is_some_and(|d| d.len() > 500) {
        return Err(ApiError::BadRequest(
            "description: at most 500 characters".to_owned(),
        ));
    }
    let (endpoint, secret) = webhooks::create(
        &state.db,
        &url,
        &kinds,
        description.as_deref(),
        &principal.name(),
    )
    .await?;
    tracing::info!(endpoint = %endpoint.id, by = %principal.name(), "webhook endpoint created");
    let mut body = serde_json::to_value(&endpoint).map_err(anyhow::Error::from)?;
    body["secret"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "items": webhooks::list(&state.db).await? })))
}

fn id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a webhook endpoint id")))
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no webhook endpoint {id}"))
}

async fn read(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Endpoint>, ApiError> {
    let id = id(&raw)?;
    Ok(Json(
        webhooks::get(&state.db, id)
            .await?
            .ok_or_else(|| not_found(id))?,
    ))
}

async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = id(&raw)?;
    if !webhooks::delete(&state.db, id, &principal.name()).await? {
        return Err(not_found(id));
    }
    tracing::info!(endpoint = %id, by = %principal.name(), "webhook endpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn enable(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Endpoint>, ApiError> {
    let id = id(&raw)?;
    let endpoint = webhooks::enable(&state.db, id, state.settings.webhooks.give_up_after)
        .await?
        .ok_or_else(|| not_found(id))?;
    tracing::info!(endpoint = %id, by = %principal.name(), "webhook endpoint enabled");
    Ok(Json(endpoint))
}

/// `GET /api/v1/webhooks/{id}/deliveries` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallsQuery {
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn deliveries(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
    ApiQuery(query): ApiQuery<CallsQuery>,
) -> Result<Json<Value>, ApiError> {
    let id = id(&raw)?;
    if webhooks::get(&state.db, id).await?.is_none() {
        return Err(not_found(id));
    }
    let status = match query.status.as_deref() {
        None => None,
        Some(s @ ("PENDING" | "SUCCESS" | "FAILED")) => Some(s),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "status must be PENDING, SUCCESS or FAILED, got {other:?}"
            )));
        }
    };
    let limit = super::error::page_limit(query.limit, 50, 500)?;
    let before = super::error::id_cursor(query.cursor.as_deref())?;
    let items = webhooks::calls(&state.db, id, status, before, limit).await?;
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|c| c.id.to_string()))
        .flatten();
    Ok(Json(json!({ "items": items, "nextCursor": next })))
}
