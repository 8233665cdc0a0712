//! A user's channel preferences: `GET`/`PUT /api/v1/notifications/settings?userId=`.
//!
//! The body names channels (`{"channels": {"EMAIL": false}}`) and, optionally, per event
//! type overrides (`{"eventTypes": {"PAYMENT_COMPLETED": {"IN_APP": false}}}`), and quiet
//! hours (`{"quietHours": [{"from": "22:00", "to": "08:00", "channels": ["PUSH"]}]}`: wall
//! clock times in the user's directory time zone, `channels` optional, meaning all; `[]`
//! for none at all; absent, the event types' defaults from the routing file apply). PUT
//! replaces the user's preferences as a whole. Operator channels (the ops Slack) cannot be
//! set: user preferences never apply to them, and neither do quiet hours.

use std::collections::BTreeMap;

use axum::{Json, extract::State, http::Method};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    auth::{Need, Rules, UserIn, guarded},
    error::{ApiError, ApiJson, ApiQuery, BadRequest, UnsupportedMediaType},
    users::user_id,
};
use crate::{
    auth::Scope,
    domain::{Channel, EventType, UserId},
    preferences::{self, Preferences},
    timing::quiet_hours::QuietWindow,
};

/// The most quiet windows a user may set.
pub const MAX_QUIET_WINDOWS: usize = 8;

/// The settings routes: `users:read` / `users:write`, or a user token for its own user.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[
        (
            Method::GET,
            Need::ScopeOrOwner(Scope::UsersRead, UserIn::Query),
        ),
        (
            Method::PUT,
            Need::ScopeOrOwner(Scope::UsersWrite, UserIn::Query),
        ),
    ];
    guarded(OpenApiRouter::new().routes(routes!(read, write)), RULES)
}

/// `?userId=`
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    /// The user, a positive integer.
    user_id: i64,
}

/// The PUT body: channel names as keys, booleans as values.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = SettingsUpdate)]
pub struct SettingsBody {
    /// Channel names (`EMAIL`, `SLACK`, `IN_APP`, `SMS`, ...) and whether the user wants
    /// them; a channel left out is on.
    #[serde(default)]
    channels: BTreeMap<String, bool>,
    /// Per event type (`PAYMENT_COMPLETED`), channel overrides.
    #[serde(default)]
    event_types: BTreeMap<String, BTreeMap<String, bool>>,
    #[serde(default)]
    quiet_hours: Option<Vec<QuietWindow>>,
}

/// What GET and PUT answer: every user channel with its effective setting, and the
/// per-event-type overrides.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Settings)]
pub struct SettingsView {
    user_id: UserId,
    channels: BTreeMap<Channel, bool>,
    event_types: BTreeMap<EventType, BTreeMap<Channel, bool>>,
    /// The user's own quiet hours; null when the event types' defaults apply.
    quiet_hours: Option<Vec<QuietWindow>>,
}

/// A user's channel preferences: every user channel with its effective setting, and the
/// per-event-type overrides.
#[utoipa::path(
    get,
    path = "/api/v1/notifications/settings",
    operation_id = "getSettings",
    tag = "preferences",
    params(UserQuery),
    responses(
        (status = 200, description = "The user's preferences.", body = SettingsView),
        (status = 400, response = BadRequest),
    )
)]
async fn read(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UserQuery>,
) -> Result<Json<SettingsView>, ApiError> {
    let user = user_id(query.user_id)?;
    let stored = preferences::load(
        &state.db,
        &state.redis,
        &state.settings.redis.key_prefix,
        user,
    )
    .await?;
    Ok(Json(view(&state, user, stored)))
}

/// Replaces a user's channel preferences as a whole. Operator channels (the ops Slack)
/// cannot be set.
#[utoipa::path(
    put,
    path = "/api/v1/notifications/settings",
    operation_id = "putSettings",
    tag = "preferences",
    params(UserQuery),
    request_body = SettingsBody,
    responses(
        (status = 200, description = "The user's preferences as stored.", body = SettingsView),
        (status = 400, response = BadRequest),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn write(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UserQuery>,
    ApiJson(body): ApiJson<SettingsBody>,
) -> Result<Json<SettingsView>, ApiError> {
    let user = user_id(query.user_id)?;
    let mut wanted = Preferences::default();
    for (name, enabled) in &body.channels {
        wanted.set_channel(user_channel(&state, name)?, *enabled);
    }
    let known = state.routing.event_types();
    for (name, channels) in &body.event_types {
        let event_type = EventType::parse(name).map_err(ApiError::BadRequest)?;
        if !known.contains(&event_type) {
            return Err(ApiError::BadRequest(format!("unknown event type {name}")));
        }
        let entry = wanted.event_types.entry(event_type).or_default();
        for (channel, enabled) in channels {
            entry.insert(user_channel(&state, channel)?, *enabled);
        }
    }
    if let Some(windows) = &body.quiet_hours {
        if windows.len() > MAX_QUIET_WINDOWS {
            return Err(ApiError::BadRequest(format!(
                "quietHours takes at most {MAX_QUIET_WINDOWS} windows"
            )));
        }
        for (i, window) in windows.iter().enumerate() {
            window
                .validate()
                .map_err(|e| ApiError::BadRequest(format!("quietHours[{i}]: {e}")))?;
            for channel in window.channels.iter().flatten() {
                user_channel(&state, channel.as_str())?;
            }
        }
    }
    wanted.quiet_hours = body.quiet_hours;
    preferences::replace(
        &state.db,
        &state.redis,
        &state.settings.redis.key_prefix,
        user,
        &wanted,
    )
    .await?;
    Ok(Json(view(&state, user, wanted)))
}

fn user_channel(state: &AppState, name: &str) -> Result<Channel, ApiError> {
    let channel: Channel = name.parse().map_err(ApiError::BadRequest)?;
    if state.routing.is_operator_channel(channel) {
        return Err(ApiError::BadRequest(format!(
            "{channel} is an operator channel; user preferences do not apply to it"
        )));
    }
    Ok(channel)
}

fn view(state: &AppState, user: UserId, stored: Preferences) -> SettingsView {
    let channels = Channel::ALL
        .into_iter()
        .filter(|c| !state.routing.is_operator_channel(*c))
        .map(|c| (c, stored.channels.get(&c).copied().unwrap_or(true)))
        .collect();
    SettingsView {
        user_id: user,
        channels,
        event_types: stored.event_types,
        quiet_hours: stored.quiet_hours,
    }
}
