//! Delivery statistics for analysts, from delivery_stats (days in the reporting time zone,
//! HERALD_REPORTING_TIMEZONE).
//!
//! - `GET /api/v1/dashboard/delivery?from=YYYY-MM-DD&to=YYYY-MM-DD`: per day and channel
//!   (default: the last 7 days; at most 366 days).
//! - `GET /api/v1/dashboard/delivery/channels?from=&to=`: per channel (default 30 days).
//! - `GET /api/v1/dashboard/delivery/failures?limit=`: the most recent failures.

use axum::{
    Json, Router, extract::State, http::Method, middleware::from_fn_with_state, routing::get,
};
use chrono::{Datelike, Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    auth::{Need, Rules, authorize},
    error::{ApiError, ApiQuery},
};
use crate::{
    auth::Scope,
    read_model::queries::{self, ChannelStats, DailyStats, Failure},
};

/// The longest range one request may ask for.
pub const MAX_RANGE_DAYS: u64 = 366;

/// The dashboard routes, each needing `dashboard:read`.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[(Method::GET, Need::Scope(Scope::DashboardRead))];
    Router::new()
        .route("/api/v1/dashboard/delivery", get(daily))
        .route("/api/v1/dashboard/delivery/channels", get(channels))
        .route("/api/v1/dashboard/delivery/failures", get(failures))
        .route_layer(from_fn_with_state(RULES, authorize))
}

/// `?from=&to=`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    from: Option<String>,
    to: Option<String>,
}

/// The answer's period and rows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report<T> {
    from: NaiveDate,
    to: NaiveDate,
    timezone: String,
    items: Vec<T>,
}

fn range(
    state: &AppState,
    range: &Range,
    default_days: u64,
) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let parse = |name: &str, value: &str| {
        NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .ok()
            .filter(|d| (1970..=9999).contains(&d.year()))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{name} must be a date from 1970 to 9999 such as 2026-11-21, got {value:?}"
                ))
            })
    };
    let today = Utc::now()
        .with_timezone(&state.settings.read_model.reporting_timezone)
        .date_naive();
    let to = range
        .to
        .as_deref()
        .map(|v| parse("to", v))
        .transpose()?
        .unwrap_or(today);
    let from = match range.from.as_deref() {
        Some(v) => parse("from", v)?,
        None => to
            .checked_sub_days(Days::new(default_days - 1))
            .ok_or_else(|| ApiError::BadRequest(format!("to ({to}) is too early")))?,
    };
    if from > to {
        return Err(ApiError::BadRequest(format!(
            "from ({from}) is after to ({to})"
        )));
    }
    if (to - from).num_days() as u64 >= MAX_RANGE_DAYS {
        return Err(ApiError::BadRequest(format!(
            "the range may cover at most {MAX_RANGE_DAYS} days"
        )));
    }
    Ok((from, to))
}

async fn daily(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<Range>,
) -> Result<Json<Report<DailyStats>>, ApiError> {
    let (from, to) = range(&state, &query, 7)?;
    let items = queries::daily(&state.db, from, to).await?;
    Ok(Json(report(&state, from, to, items)))
}

async fn channels(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<Range>,
) -> Result<Json<Report<ChannelStats>>, ApiError> {
    let (from, to) = range(&state, &query, 30)?;
    let items = queries::channels(&state.db, from, to).await?;
    Ok(Json(report(&state, from, to, items)))
}

fn report<T>(state: &AppState, from: NaiveDate, to: NaiveDate, items: Vec<T>) -> Report<T> {
    Report {
        from,
        to,
        timezone: state
            .settings
            .read_model
            .reporting_timezone
            .name()
            .to_owned(),
        items,
    }
}

/// `?limit=`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailuresQuery {
    limit: Option<i64>,
}

async fn failures(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<FailuresQuery>,
) -> Result<Json<Vec<Failure>>, ApiError> {
    let limit = super::error::page_limit(query.limit, 20, 200)?;
    Ok(Json(queries::failures(&state.db, limit).await?))
}
