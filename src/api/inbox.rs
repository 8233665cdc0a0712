//! The in-app inbox: a user's IN_APP messages, their read state, and a live stream.
//!
//! - `GET /api/v1/users/{id}/inbox?unreadOnly=&cursor=&limit=`
//! - `GET /api/v1/users/{id}/inbox/unread-count`
//! - `POST /api/v1/users/{id}/inbox/{deliveryId}/read`, `POST .../inbox/read-all`
//! - `GET /api/v1/users/{id}/inbox/stream`: Server-Sent Events relaying the user's in-app
//!   messages from Redis as they are published (event `notification`, data the message
//!   JSON). It ends when Herald shuts down; clients reconnect and catch up from the inbox.

use std::convert::Infallible;

use axum::{
    Json, Router,
    extract::State,
    http::Method,
    middleware::from_fn_with_state,
    response::sse::{Event, KeepAlive, Sse},
    routing::{get, post},
};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, UserIn, authorize},
    error::{ApiError, ApiPath, ApiQuery},
    history::{cursor, page_limit},
    users::user_id,
};
use crate::{
    auth::Scope,
    channels::in_app_hub::Refusal,
    read_model::queries::{self, HistoryFilter, HistoryPage},
};

/// The inbox routes: a user token for its own user, or `notifications:read` to read any
/// user's inbox and `users:write` to mark messages read on a user's behalf.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[
        (
            Method::GET,
            Need::ScopeOrOwner(Scope::NotificationsRead, UserIn::Path),
        ),
        (
            Method::POST,
            Need::ScopeOrOwner(Scope::UsersWrite, UserIn::Path),
        ),
    ];
    Router::new()
        .route("/api/v1/users/{id}/inbox", get(list))
        .route("/api/v1/users/{id}/inbox/unread-count", get(unread))
        .route("/api/v1/users/{id}/inbox/read-all", post(read_all))
        .route("/api/v1/users/{id}/inbox/{delivery}/read", post(read_one))
        .route("/api/v1/users/{id}/inbox/stream", get(stream))
        .route_layer(from_fn_with_state(RULES, authorize))
}

/// The inbox query string.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboxQuery {
    #[serde(default)]
    unread_only: bool,
    cursor: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<InboxQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let user = user_id(id)?;
    let filter = HistoryFilter {
        channel: Some("IN_APP".to_owned()),
        unread_in_app: query.unread_only,
        ..HistoryFilter::default()
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

async fn unread(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let user = user_id(id)?;
    let count = queries::unread_count(&state.db, user.get()).await?;
    Ok(Json(json!({ "userId": user, "unread": count })))
}

async fn read_one(
    State(state): State<AppState>,
    ApiPath((id, delivery)): ApiPath<(i64, String)>,
) -> Result<Json<Value>, ApiError> {
    let user = user_id(id)?;
    let delivery = Uuid::parse_str(&delivery)
        .map_err(|_| ApiError::BadRequest(format!("{delivery:?} is not a delivery id")))?;
    let marked = crate::deliveries::mark_read(&state.db, user.get(), Some(delivery)).await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
         WHERE d.id = $1 AND n.user_id = $2 AND d.channel = 'IN_APP')",
    )
    .bind(delivery)
    .bind(user.get())
    .fetch_one(&state.db)
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    if !exists {
        return Err(ApiError::NotFound(format!(
            "user {user} has no in-app message {delivery}"
        )));
    }
    Ok(Json(json!({ "userId": user, "marked": marked })))
}

async fn read_all(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let user = user_id(id)?;
    let marked = crate::deliveries::mark_read(&state.db, user.get(), None).await?;
    Ok(Json(json!({ "userId": user, "marked": marked })))
}

/// What a refused stream is told to wait before trying again.
const STREAM_RETRY_AFTER_SECS: u64 = 5;

/// 429 beyond the per-user cap, 503 beyond the instance's or without Redis.
impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::UserFull => ApiError::TooManyRequests {
                message: "this user has as many open in-app streams as one user may".into(),
                retry_after_secs: STREAM_RETRY_AFTER_SECS,
            },
            Refusal::InstanceFull => ApiError::Overloaded {
                message: "this instance holds as many in-app streams as it may; try again".into(),
                retry_after_secs: STREAM_RETRY_AFTER_SECS,
            },
            Refusal::Unavailable => {
                ApiError::Unavailable("the in-app stream is unavailable (Redis); try again".into())
            }
        }
    }
}

/// The messages come from this instance's shared subscription
/// ([`crate::channels::in_app_hub::StreamHub`]).
async fn stream(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let user = user_id(id)?;
    let events = state
        .streams
        .subscribe(user.get())
        .await?
        .into_stream()
        .map(|message| Ok(Event::default().event("notification").data(&*message)))
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
