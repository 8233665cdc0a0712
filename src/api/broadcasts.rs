//! Broadcasts: `POST /api/v1/broadcasts` (202, fanned out in the background),
//! `GET /api/v1/broadcasts[/{id}]` (status, totals, progress, timings) and
//! `POST /api/v1/broadcasts/{id}/cancel`.

use anyhow::Context;
use axum::{
    Json,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, Method},
    response::Response,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{
        ApiError, ApiPath, ApiQuery, BadRequest, Conflict, NotFound, Unprocessable,
        UnsupportedMediaType,
    },
    notifications::{
        Content, IdempotencyKey, accepted_response, bad, check_schedule, idempotency_key,
        parse_channels, read_request,
    },
};
use crate::{
    auth::{Principal, Scope},
    broadcast::{
        self, Audience, BroadcastRow, BroadcastStatus, Cancelled, Created, NewBroadcast, Segment,
        Totals,
    },
    domain::Channel,
};

/// Largest request body: room for 100,000 explicit user ids.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most explicit user ids one broadcast may list (larger audiences are segments).
const MAX_USER_IDS: usize = 100_000;
const MAX_NAME_CHARS: usize = 200;
/// Largest `data` (as JSON): it is copied into every recipient's notification.
const MAX_DATA_BYTES: usize = 64 * 1024;

/// The broadcast routes: `broadcasts:write` to create and cancel, `broadcasts:read` to read.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::BroadcastsRead)),
        (Method::POST, Need::Scope(Scope::BroadcastsWrite)),
    ];
    let (schemas, paths, create) = routes!(create);
    let create = create.layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    guarded(
        OpenApiRouter::new()
            .routes((schemas, paths, create))
            .routes(routes!(list))
            .routes(routes!(read))
            .routes(routes!(cancel)),
        RULES,
    )
}

/// The creation request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BroadcastRequest {
    name: Option<String>,
    audience: Audience,
    channels: Vec<String>,
    #[serde(alias = "template")]
    event_type: Option<String>,
    data: Option<Map<String, Value>>,
    subject: Option<String>,
    body: Option<String>,
    scheduled_at: Option<DateTime<Utc>>,
}

/// A broadcast as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Broadcast)]
pub struct BroadcastView {
    broadcast_id: Uuid,
    name: Option<String>,
    status: BroadcastStatus,
    audience: AudienceShown,
    channels: Vec<String>,
    event_type: String,
    totals: Totals,
    /// Per cent of the expected deliveries (audience × channels) that are final.
    progress: f64,
    timings: Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The name of the credential that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    created_by: Option<String>,
    /// The name of the credential that cancelled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    cancelled_by: Option<String>,
}

/// A broadcast's audience as shown: the segment as given, or the size of an explicit list
/// (which can be 100,000 ids).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = BroadcastAudience)]
enum AudienceShown {
    Segment(Segment),
    UserCount(i64),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = BroadcastTimings)]
struct Timings {
    created_at: DateTime<Utc>,
    scheduled_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    /// Every recipient had its notification.
    fanned_out_at: Option<DateTime<Utc>>,
    cancelled_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    /// From start to finish (or to now while it runs).
    elapsed_secs: Option<f64>,
    /// Recipients whose deliveries are all final, per second of `elapsedSecs`.
    recipients_per_second: Option<f64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// How many, newest first.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = BroadcastPage)]
struct ListView {
    items: Vec<BroadcastView>,
}

/// One message to an audience (user ids or a segment of the directory), fanned out in the
/// background through the ordinary delivery pipeline.
#[utoipa::path(
    post,
    path = "/api/v1/broadcasts",
    operation_id = "createBroadcast",
    tag = "broadcasts",
    params(IdempotencyKey),
    request_body = BroadcastRequest,
    responses(
        (status = 202, description = "Accepted: the broadcast is stored and scheduled.",
            body = BroadcastView,
            headers(
                ("Location" = String, description = "The broadcast's URL."),
                ("Idempotency-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same Idempotency-Key."),
            )),
        (status = 400, response = BadRequest),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (request, request_hash): (BroadcastRequest, String) = read_request(&headers, body)?;
    let key = idempotency_key(&headers)?;
    let new = validate(&state, &principal, request, key, request_hash)?;
    let (row, replayed) = match broadcast::create(&state.db, &new).await? {
        Created::New(row) => (row, false),
        Created::Replayed(row) => (row, true),
        Created::KeyReused => {
            return Err(ApiError::Unprocessable {
                code: "idempotency_key_reused",
                message: "this Idempotency-Key was used with a different request body".into(),
            });
        }
    };
    let view = view(&state, row).await?;
    let location = format!("/api/v1/broadcasts/{}", view.broadcast_id);
    let body = serde_json::to_value(&view).context("Failed to encode a broadcast")?;
    Ok(accepted_response(&location, body, replayed))
}

fn validate(
    state: &AppState,
    principal: &Principal,
    request: BroadcastRequest,
    idempotency_key: Option<String>,
    request_hash: String,
) -> Result<NewBroadcast, ApiError> {
    if let Some(name) = &request.name
        && (name.trim().is_empty() || name.chars().count() > MAX_NAME_CHARS)
    {
        return Err(bad(format!(
            "name must be 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    match &request.audience {
        Audience::UserIds(ids) if ids.is_empty() => {
            return Err(bad("audience.userIds lists nobody"));
        }
        Audience::UserIds(ids) if ids.len() > MAX_USER_IDS => {
            return Err(bad(format!(
                "audience.userIds may list at most {MAX_USER_IDS} users; use a segment for more"
            )));
        }
        Audience::Segment(segment) => {
            segment
                .check()
                .map_err(|m| bad(format!("audience.segment: {m}")))?;
        }
        Audience::UserIds(_) => {}
    }
    if let Some(data) = &request.data
        && Value::Object(data.clone()).to_string().len() > MAX_DATA_BYTES
    {
        return Err(bad(format!(
            "data may be at most {} KiB as JSON: it is copied to every recipient",
            MAX_DATA_BYTES / 1024
        )));
    }
    let content = Content::parse(
        request.event_type.as_deref(),
        request.subject.as_deref(),
        request.body.as_deref(),
    )?;
    let channels = parse_channels(&request.channels)?;
    if let Some(channel) = channels
        .iter()
        .find(|c| state.routing.is_operator_channel(**c))
    {
        return Err(bad(format!(
            "{channel} is an operator channel; a broadcast goes to users"
        )));
    }
    content.check_templates(state, &channels)?;
    let data = request.data.unwrap_or_default();
    content.check_data(state, &data)?;
    check_schedule(request.scheduled_at, Utc::now())?;
    Ok(NewBroadcast {
        name: request.name,
        audience: request.audience,
        channels,
        event_type: content.event_type.to_string(),
        data,
        subject: content.subject,
        body: content.body,
        scheduled_at: request.scheduled_at,
        idempotency_key,
        idempotency_credential: principal.credential(),
        idempotency_ttl: state.settings.access.idempotency_ttl,
        request_hash,
        created_by: principal.name(),
    })
}

/// One broadcast: status, totals, progress and timings.
#[utoipa::path(
    get,
    path = "/api/v1/broadcasts/{id}",
    operation_id = "getBroadcast",
    tag = "broadcasts",
    params(("id" = Uuid, Path, description = "The broadcast id.")),
    responses(
        (status = 200, description = "The broadcast.", body = BroadcastView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<BroadcastView>, ApiError> {
    let row = broadcast::load(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no broadcast {id}")))?;
    Ok(Json(view(&state, row).await?))
}

/// The most recent broadcasts, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/broadcasts",
    operation_id = "listBroadcasts",
    tag = "broadcasts",
    params(ListQuery),
    responses(
        (status = 200, description = "The broadcasts.", body = ListView),
        (status = 400, response = BadRequest),
    )
)]
async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<ListView>, ApiError> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(bad("limit must be from 1 to 100"));
    }
    let mut items = Vec::new();
    for row in broadcast::list(&state.db, limit).await? {
        items.push(view(&state, row).await?);
    }
    Ok(Json(ListView { items }))
}

/// Cancels a broadcast that has not finished.
#[utoipa::path(
    post,
    path = "/api/v1/broadcasts/{id}/cancel",
    operation_id = "cancelBroadcast",
    tag = "broadcasts",
    params(("id" = Uuid, Path, description = "The broadcast id.")),
    responses(
        (status = 200, description = "The broadcast, cancelled.", body = BroadcastView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
    )
)]
async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<BroadcastView>, ApiError> {
    let topic_prefix = &state.settings.kafka.topic_prefix;
    match broadcast::cancel(&state.db, id, topic_prefix, &principal.name()).await? {
        Cancelled::Done(row) => Ok(Json(view(&state, row).await?)),
        Cancelled::TooLate(row) => Err(ApiError::Conflict(format!(
            "broadcast {id} has already finished ({})",
            row.status().as_str()
        ))),
        Cancelled::NotFound => Err(ApiError::NotFound(format!("no broadcast {id}"))),
    }
}

async fn view(state: &AppState, row: BroadcastRow) -> Result<BroadcastView, ApiError> {
    let mut conn = state
        .db
        .acquire()
        .await
        .context("Failed to reach PostgreSQL")?;
    let totals = broadcast::totals(&mut conn, &row).await?;
    let progress = broadcast::progress(&row, &totals);
    let elapsed = row
        .started_at
        .map(|start| (row.finished_at.unwrap_or_else(Utc::now) - start).as_seconds_f64());
    let channels = row.channels().len().max(1) as i64;
    // A recipient is done when all its deliveries are; with deliveries finishing evenly
    // across channels, final deliveries over channels approximates it.
    let done_recipients = (totals.sent + totals.failed + totals.skipped) / channels;
    let timings = Timings {
        created_at: row.created_at,
        scheduled_at: row.scheduled_at,
        started_at: row.started_at,
        fanned_out_at: row.fanned_out_at,
        cancelled_at: row.cancelled_at,
        finished_at: row.finished_at,
        elapsed_secs: elapsed.map(|s| (s * 1000.0).round() / 1000.0),
        recipients_per_second: elapsed
            .filter(|s| *s > 0.0)
            .map(|s| (done_recipients as f64 / s * 10.0).round() / 10.0),
    };
    let channel_names = row.channels().iter().map(Channel::to_string).collect();
    Ok(BroadcastView {
        broadcast_id: row.id,
        status: row.status(),
        name: row.name,
        audience: serde_json::from_value(row.audience)
            .context("Failed to read a broadcast's audience")?,
        channels: channel_names,
        event_type: row.event_type,
        totals,
        progress,
        timings,
        error: row.error,
        created_by: row.created_by,
        cancelled_by: row.cancelled_by,
    })
}
