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
    Json,
    extract::State,
    http::Method,
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, UserIn, guarded},
    error::{ApiError, ApiPath, ApiQuery, BadRequest, NotFound, TooManyRequests},
    history::{cursor, page_limit},
    users::{UserPath, user_id},
};
use crate::{
    auth::Scope,
    channels::in_app_hub::Refusal,
    domain::UserId,
    read_model::queries::{self, HistoryFilter, HistoryPage},
};

/// The inbox routes: a user token for its own user, or `notifications:read` to read any
/// user's inbox and `users:write` to mark messages read on a user's behalf.
pub fn router() -> OpenApiRouter<AppState> {
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
    guarded(
        OpenApiRouter::new()
            .routes(routes!(list))
            .routes(routes!(unread))
            .routes(routes!(read_all))
            .routes(routes!(read_one))
            .routes(routes!(stream)),
        RULES,
    )
}

/// The inbox query string.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InboxQuery {
    /// Only messages not read yet.
    #[serde(default)]
    unread_only: bool,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 200, default = 50)]
    limit: Option<i64>,
}

/// How many in-app messages a user has not read.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct UnreadCount {
    user_id: UserId,
    unread: i64,
}

/// How many messages a read mark changed.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct MarkedRead {
    user_id: UserId,
    /// Messages newly marked read (0 for one already read).
    marked: u64,
}

/// The stream's `?token=`, as documented.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "read by auth::authenticate; declared for the document"
)]
struct StreamQuery {
    /// The user token, for a browser's EventSource, which cannot set headers (never
    /// logged). `Authorization: Bearer` works too.
    token: Option<String>,
}

/// A user's in-app messages, newest first, with cursor pagination.
#[utoipa::path(
    get,
    path = "/api/v1/users/{id}/inbox",
    operation_id = "listInbox",
    tag = "inbox",
    params(UserPath, InboxQuery),
    responses(
        (status = 200, description = "One page of the inbox.", body = HistoryPage),
        (status = 400, response = BadRequest),
    )
)]
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

/// How many in-app messages the user has not read.
#[utoipa::path(
    get,
    path = "/api/v1/users/{id}/inbox/unread-count",
    operation_id = "getUnreadCount",
    tag = "inbox",
    params(UserPath),
    responses(
        (status = 200, description = "The count.", body = UnreadCount),
        (status = 400, response = BadRequest),
    )
)]
async fn unread(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<UnreadCount>, ApiError> {
    let user = user_id(id)?;
    let unread = queries::unread_count(&state.db, user.get()).await?;
    Ok(Json(UnreadCount {
        user_id: user,
        unread,
    }))
}

/// Marks one in-app message read.
#[utoipa::path(
    post,
    path = "/api/v1/users/{id}/inbox/{delivery}/read",
    operation_id = "markRead",
    tag = "inbox",
    params(
        UserPath,
        ("delivery" = Uuid, Path, description = "The message's delivery id."),
    ),
    responses(
        (status = 200, description = "Marked.", body = MarkedRead),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read_one(
    State(state): State<AppState>,
    ApiPath((id, delivery)): ApiPath<(i64, String)>,
) -> Result<Json<MarkedRead>, ApiError> {
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
    Ok(Json(MarkedRead {
        user_id: user,
        marked,
    }))
}

/// Marks every in-app message of the user read.
#[utoipa::path(
    post,
    path = "/api/v1/users/{id}/inbox/read-all",
    operation_id = "markAllRead",
    tag = "inbox",
    params(UserPath),
    responses(
        (status = 200, description = "Marked.", body = MarkedRead),
        (status = 400, response = BadRequest),
    )
)]
async fn read_all(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<MarkedRead>, ApiError> {
    let user = user_id(id)?;
    let marked = crate::deliveries::mark_read(&state.db, user.get(), None).await?;
    Ok(Json(MarkedRead {
        user_id: user,
        marked,
    }))
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

/// Server-Sent Events relaying the user's in-app messages as they are published (event
/// `notification`, data the message JSON). It ends when Herald shuts down; clients
/// reconnect and catch up from the inbox.
#[utoipa::path(
    get,
    path = "/api/v1/users/{id}/inbox/stream",
    operation_id = "streamInbox",
    tag = "inbox",
    params(UserPath, StreamQuery),
    responses(
        (status = 200, description = "The event stream.", body = String, content_type = "text/event-stream"),
        (status = 400, response = BadRequest),
        (status = 429, response = TooManyRequests),
    )
)]
async fn stream(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let user = user_id(id)?;
    // From this instance's shared subscription (crate::channels::in_app_hub::StreamHub).
    let events = state
        .streams
        .subscribe(user.get())
        .await?
        .into_stream()
        .map(|message| Ok(Event::default().event("notification").data(&*message)))
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
