//! `GET /api/v1/notifications?userId=`: a user's history from the read model, newest
//! first, with cursor pagination and filters.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{
    AppState,
    error::{ApiError, ApiQuery, BadRequest},
    users::user_id,
};
use crate::{
    domain::{Channel, DeliveryStatus},
    read_model::queries::{self, HistoryFilter, HistoryPage},
};

/// Default and largest page sizes.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// The query string.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The user, a positive integer.
    user_id: i64,
    /// Only deliveries on this channel.
    #[param(value_type = Option<Channel>)]
    channel: Option<String>,
    /// Only deliveries in this status.
    #[param(value_type = Option<DeliveryStatus>)]
    status: Option<String>,
    /// Only deliveries created at or after this time.
    from: Option<DateTime<Utc>>,
    /// Only deliveries created at or before this time.
    to: Option<DateTime<Utc>>,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 200, default = 50)]
    limit: Option<i64>,
}

/// Checks a page size of history or the inbox.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    super::error::page_limit(limit, DEFAULT_LIMIT, MAX_LIMIT)
}

/// Parses a history cursor.
pub fn cursor(raw: Option<&str>) -> Result<Option<(DateTime<Utc>, uuid::Uuid)>, ApiError> {
    raw.map(|c| {
        queries::decode_cursor(c)
            .ok_or_else(|| ApiError::BadRequest(format!("{c:?} is not a cursor from this API")))
    })
    .transpose()
}

/// A user's history from the read model, newest first, with cursor pagination and
/// filters.
#[utoipa::path(
    get,
    path = "/api/v1/notifications",
    operation_id = "listNotifications",
    tag = "notifications",
    params(HistoryQuery),
    responses(
        (status = 200, description = "One page of the user's deliveries.", body = HistoryPage),
        (status = 400, response = BadRequest),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let user = user_id(query.user_id)?;
    if let Some(channel) = &query.channel {
        channel.parse::<Channel>().map_err(ApiError::BadRequest)?;
    }
    if let Some(status) = &query.status {
        status
            .parse::<DeliveryStatus>()
            .map_err(ApiError::BadRequest)?;
    }
    if let (Some(from), Some(to)) = (query.from, query.to)
        && from > to
    {
        return Err(ApiError::BadRequest("from is after to".into()));
    }
    let filter = HistoryFilter {
        channel: query.channel,
        status: query.status,
        from: query.from,
        to: query.to,
        unread_in_app: false,
    };
    let page = queries::history(
        &state.db,
        user.get(),
        &filter,
        cursor(query.cursor.as_deref())?,
        page_limit(query.limit)?,
    )
    .await?;
    Ok(Json(page))
}
