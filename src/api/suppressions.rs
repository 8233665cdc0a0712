//! Suppressed addresses (issue 15), for credentials with the `suppressions:admin` scope.
//!
//! - `GET /api/v1/admin/suppressions?channel=&address=&includeLifted=&limit=&cursor=`:
//!   newest first; active ones unless `includeLifted=true`; `nextCursor` pages on.
//! - `DELETE /api/v1/admin/suppressions/{id}`: lifts one (kept for audit, with the name of
//!   the credential that lifted it) and answers it; later sends to the address go out.

use axum::{
    Json, Router, extract::State, http::Method, middleware::from_fn_with_state, routing::get,
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
    domain::Channel,
    suppressions::{self, Filter, Suppression},
};

/// The suppression routes, each needing `suppressions:admin`.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::SuppressionsAdmin)),
        (Method::DELETE, Need::Scope(Scope::SuppressionsAdmin)),
    ];
    Router::new()
        .route("/api/v1/admin/suppressions", get(list))
        .route(
            "/api/v1/admin/suppressions/{id}",
            axum::routing::delete(lift),
        )
        .route_layer(from_fn_with_state(RULES, authorize))
}

/// `GET /api/v1/admin/suppressions` query.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    channel: Option<String>,
    address: Option<String>,
    include_lifted: Option<bool>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let channel = query
        .channel
        .map(|c| c.to_ascii_uppercase().parse::<Channel>())
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let limit = super::error::page_limit(query.limit, 50, 500)?;
    let before = super::error::id_cursor(query.cursor.as_deref())?;
    let filter = Filter {
        channel,
        address: query.address,
        include_lifted: query.include_lifted.unwrap_or(false),
        before,
        limit,
    };
    let items: Vec<Suppression> = suppressions::list(&state.db, &filter).await?;
    let next = (items.len() as i64 == limit).then(|| items.last().map(|s| s.id.to_string()));
    Ok(Json(
        json!({ "items": items, "nextCursor": next.flatten() }),
    ))
}

async fn lift(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Suppression>, ApiError> {
    let id = Uuid::parse_str(&raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a suppression id")))?;
    let lifted = suppressions::lift(&state.db, id, &principal.name())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no active suppression {id}")))?;
    tracing::info!(suppression = %id, channel = %lifted.channel, by = %principal.name(), "suppression lifted");
    Ok(Json(lifted))
}
