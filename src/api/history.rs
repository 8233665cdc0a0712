//! `GET /api/v1/notifications?userId=`: a user's history from the read model, newest
//! first, with cursor pagination and filters.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{
    AppState,
    error::{ApiError, ApiQuery},
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
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryQuery {
    user_id: i64,
    channel: Option<String>,
    status: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    cursor: Option<String>,
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

/// The handler.
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
