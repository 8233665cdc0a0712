//! Delivery statistics for analysts, from delivery_stats (days in the reporting time zone,
//! HERALD_REPORTING_TIMEZONE).
//!
//! - `GET /api/v1/dashboard/delivery?from=YYYY-MM-DD&to=YYYY-MM-DD`: per day and channel
//!   (default: the last 7 days; at most 366 days).
//! - `GET /api/v1/dashboard/delivery/channels?from=&to=`: per channel (default 30 days).
//! - `GET /api/v1/dashboard/delivery/failures?limit=`: the most recent failures.

use axum::{Json, extract::State, http::Method};
use chrono::{Datelike, Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{ApiError, ApiQuery, BadRequest},
};
use crate::{
    auth::Scope,
    read_model::queries::{self, ChannelStats, DailyStats, Failure},
};

/// The longest range one request may ask for.
pub const MAX_RANGE_DAYS: u64 = 366;

/// The dashboard routes, each needing `dashboard:read`.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[(Method::GET, Need::Scope(Scope::DashboardRead))];
    guarded(
        OpenApiRouter::new()
            .routes(routes!(daily))
            .routes(routes!(channels))
            .routes(routes!(failures)),
        RULES,
    )
}

/// `?from=&to=`
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Range {
    /// First day of the period (inclusive, `YYYY-MM-DD`), in the reporting time zone.
    /// Default: the period's length before `to`.
    #[param(value_type = Option<NaiveDate>)]
    from: Option<String>,
    /// Last day of the period (inclusive), in the reporting time zone. Default: today.
    #[param(value_type = Option<NaiveDate>)]
    to: Option<String>,
}

/// The answer's period and rows.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Report<T> {
    from: NaiveDate,
    to: NaiveDate,
    /// The reporting time zone (HERALD_REPORTING_TIMEZONE), in which days are counted.
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

/// Terminal outcomes per day and channel (default: the last 7 days; at most 366 days).
#[utoipa::path(
    get,
    path = "/api/v1/dashboard/delivery",
    operation_id = "getDailyDelivery",
    tag = "dashboard",
    params(Range),
    responses(
        (status = 200, description = "The period and its rows.", body = Report<DailyStats>),
        (status = 400, response = BadRequest),
    )
)]
async fn daily(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<Range>,
) -> Result<Json<Report<DailyStats>>, ApiError> {
    let (from, to) = range(&state, &query, 7)?;
    let items = queries::daily(&state.db, from, to).await?;
    Ok(Json(report(&state, from, to, items)))
}

/// Totals and success rate per channel (default: the last 30 days; at most 366 days).
#[utoipa::path(
    get,
    path = "/api/v1/dashboard/delivery/channels",
    operation_id = "getChannelDelivery",
    tag = "dashboard",
    params(Range),
    responses(
        (status = 200, description = "The period and its rows.", body = Report<ChannelStats>),
        (status = 400, response = BadRequest),
    )
)]
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
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FailuresQuery {
    /// How many, newest first.
    #[param(minimum = 1, maximum = 200, default = 20)]
    limit: Option<i64>,
}

/// The most recent failures with their reasons, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/dashboard/delivery/failures",
    operation_id = "getRecentFailures",
    tag = "dashboard",
    params(FailuresQuery),
    responses(
        (status = 200, description = "The failures.", body = Vec<Failure>),
        (status = 400, response = BadRequest),
    )
)]
async fn failures(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<FailuresQuery>,
) -> Result<Json<Vec<Failure>>, ApiError> {
    let limit = super::error::page_limit(query.limit, 20, 200)?;
    Ok(Json(queries::failures(&state.db, limit).await?))
}
