//! Suppressed addresses (issue 15), for credentials with the `suppressions:admin` scope.
//!
//! - `GET /api/v1/admin/suppressions?channel=&address=&includeLifted=&limit=&cursor=`:
//!   newest first; active ones unless `includeLifted=true`; `nextCursor` pages on.
//! - `DELETE /api/v1/admin/suppressions/{id}`: lifts one (kept for audit, with the name of
//!   the credential that lifted it) and answers it; later sends to the address go out.

use axum::{Json, extract::State, http::Method};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{ApiError, ApiPath, ApiQuery, BadRequest, NotFound},
};
use crate::{
    auth::{Principal, Scope},
    domain::Channel,
    suppressions::{self, Filter, Suppression},
};

/// The suppression routes, each needing `suppressions:admin`.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::SuppressionsAdmin)),
        (Method::DELETE, Need::Scope(Scope::SuppressionsAdmin)),
    ];
    guarded(
        OpenApiRouter::new()
            .routes(routes!(list))
            .routes(routes!(lift)),
        RULES,
    )
}

/// `GET /api/v1/admin/suppressions` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only this channel's.
    #[param(value_type = Option<Channel>)]
    channel: Option<String>,
    /// Only this address's.
    address: Option<String>,
    /// Lifted ones too.
    include_lifted: Option<bool>,
    /// Page size.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// A page of suppressions.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SuppressionPage)]
struct Page {
    items: Vec<Suppression>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// Suppressed addresses, newest first; active ones unless `includeLifted=true`.
#[utoipa::path(
    get,
    path = "/api/v1/admin/suppressions",
    operation_id = "listSuppressions",
    tag = "receipts",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of suppressions.", body = Page),
        (status = 400, response = BadRequest),
    )
)]
async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Page>, ApiError> {
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
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|s| s.id.to_string()))
        .flatten();
    Ok(Json(Page { items, next_cursor }))
}

/// Lifts a suppression (kept for audit, with the name of the credential that lifted it):
/// later sends to the address go out.
#[utoipa::path(
    delete,
    path = "/api/v1/admin/suppressions/{id}",
    operation_id = "liftSuppression",
    tag = "receipts",
    params(("id" = Uuid, Path, description = "The suppression id.")),
    responses(
        (status = 200, description = "The lifted suppression.", body = Suppression),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
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
