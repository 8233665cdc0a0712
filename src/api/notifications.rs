//! `POST /api/v1/notifications` (the direct intake) and `GET /api/v1/notifications/{id}`.
//!
//! The intake writes the same rows as the Kafka consumers, in one transaction, and answers
//! 202 with the notification id and its deliveries. With an `Idempotency-Key` header the
//! first response is stored with the rows: the same key and body replays it (with
//! `Idempotency-Replayed: true`), the same key with another body is 422.

use std::collections::BTreeSet;

use anyhow::Context;
use axum::{
    Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    auth::{Need, Rules, UserIn, guarded},
    error::{
        ApiError, ApiPath, BadRequest, Conflict, NotFound, Unprocessable, UnsupportedMediaType,
    },
};
use crate::{
    auth::{Principal, Scope},
    directory,
    domain::{
        Channel, DeliveryStatus, Domain, EmailAddress, EventType, NotificationStatus, PhoneNumber,
        Recipient, UserId,
    },
    intake::{
        self, Draft, NewNotification, Source,
        writer::{KeyClaim, Stored},
    },
    outbox::HoldInfo,
    preferences,
    templates::ADHOC,
};

/// The event type stored for notifications that bring their own subject and body.
pub const ADHOC_EVENT_TYPE: &str = crate::event_schemas::ADHOC_SCHEMA;
/// How far ahead `scheduledAt` may be.
const MAX_SCHEDULE_AHEAD_DAYS: i64 = 90;
/// Subject and body limits for ad-hoc notifications.
const MAX_SUBJECT_CHARS: usize = 200;
const MAX_BODY_CHARS: usize = 10_000;

/// The notification routes: the intake needs `notifications:write`; reading needs
/// `notifications:read`, or a user token for the user's own history.
pub fn router() -> OpenApiRouter<AppState> {
    const NOTIFICATIONS: Rules = &[
        (Method::POST, Need::Scope(Scope::NotificationsWrite)),
        (
            Method::GET,
            Need::ScopeOrOwner(Scope::NotificationsRead, UserIn::Query),
        ),
    ];
    const ONE: Rules = &[(Method::GET, Need::Scope(Scope::NotificationsRead))];
    guarded(
        OpenApiRouter::new().routes(routes!(create, super::history::list)),
        NOTIFICATIONS,
    )
    .merge(guarded(OpenApiRouter::new().routes(routes!(read)), ONE))
}

/// The intake request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IntakeRequest {
    user_id: Option<i64>,
    recipient: Option<RecipientBody>,
    channels: Option<Vec<String>>,
    event_type: Option<String>,
    data: Option<Map<String, Value>>,
    subject: Option<String>,
    body: Option<String>,
    scheduled_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Recipient)]
struct RecipientBody {
    email: Option<String>,
    phone: Option<String>,
    locale: Option<String>,
}

/// The 202 answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct Accepted {
    notification_id: Uuid,
    status: NotificationStatus,
    deliveries: Vec<AcceptedDelivery>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct AcceptedDelivery {
    id: Uuid,
    channel: Channel,
    status: DeliveryStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_reason: Option<String>,
    /// Why it waits, and until when: `scheduled`, `quiet_hours` or `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hold: Option<HoldInfo>,
}

/// The direct intake: one notification on the channels it names (or its event type's
/// defaults), with one delivery per channel, sent in the background.
#[utoipa::path(
    post,
    path = "/api/v1/notifications",
    operation_id = "createNotification",
    tag = "notifications",
    params(IdempotencyKey),
    request_body = IntakeRequest,
    responses(
        (status = 202, description = "Accepted: the notification and its deliveries are stored.",
            body = Accepted,
            headers(
                ("Location" = String, description = "The notification's URL."),
                ("Idempotency-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same Idempotency-Key."),
            )),
        (status = 400, response = BadRequest),
        (status = 409, response = Conflict),
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
    let (request, request_hash): (IntakeRequest, String) = read_request(&headers, body)?;
    let key = idempotency_key(&headers)?;
    let credential = principal.credential();
    // A stored answer for the key is looked for while the request is prepared: a keyed
    // request then waits for one round trip to PostgreSQL before its write, as an unkeyed
    // one does, and only a replay (rare) reads the directory for nothing. The stored answer
    // still wins over anything preparing finds.
    let replay = async {
        match &key {
            Some(key) => stored_response(&state, &credential, key, &request_hash).await,
            None => Ok(None),
        }
    };
    let prepare = async {
        let (draft, channels) = validate(&state, request)?;
        // The directory (PostgreSQL) and the preferences (Redis, PostgreSQL on a miss) are
        // read at the same time: one wait instead of two before the transaction.
        let (contact, prefs) = match draft.user_id {
            Some(user) => tokio::try_join!(
                directory::load(&state.db, user),
                preferences::load(
                    &state.db,
                    &state.redis,
                    &state.settings.redis.key_prefix,
                    user,
                ),
            )?,
            None => (None, Default::default()),
        };
        Ok::<_, ApiError>(intake::prepare(
            &state.routing,
            draft,
            &channels,
            contact.as_ref(),
            &prefs,
            &*state.channel_enabled,
        ))
    };
    let (replay, prepared) = tokio::join!(replay, prepare);
    if let Some(stored) = replay? {
        return Ok(stored);
    }
    let notification = prepared?;
    // The request is stored in one statement with those arriving with it; its
    // Idempotency-Key, if any, is claimed in that statement with the answer it replays.
    let claim = key.clone().map(|key| KeyClaim {
        credential: credential.clone(),
        key,
        request_hash: request_hash.clone(),
        answer: accepted_body,
    });
    match state.intake.store(notification, claim).await? {
        Stored::New(notification) => Ok(created(notification.id, accepted_body(&notification)?)),
        Stored::KeyTaken => {
            // Another request with the key was stored first: answer as it was answered.
            let key = key.context("a request without a key was refused for its key")?;
            stored_response(&state, &credential, &key, &request_hash)
                .await?
                .ok_or_else(|| {
                    ApiError::Conflict(
                        "another request with this Idempotency-Key was not stored; send it again"
                            .to_owned(),
                    )
                })
        }
    }
}

/// The 202 for a notification just stored, counted.
fn created(id: Uuid, body: Value) -> Response {
    metrics::counter!("herald_intake_notifications_total").increment(1);
    accepted_response(&format!("/api/v1/notifications/{id}"), body, false)
}

/// The answer to a stored notification. Built after the insert: a digest it joined sets
/// its deliveries' due time.
fn accepted_body(notification: &NewNotification) -> anyhow::Result<Value> {
    let accepted = Accepted {
        notification_id: notification.id,
        status: NotificationStatus::derive(notification.deliveries.iter().map(|d| d.status())),
        deliveries: notification
            .deliveries
            .iter()
            .map(|d| {
                let (due, hold) = d.schedule(notification);
                AcceptedDelivery {
                    id: d.id,
                    channel: d.channel,
                    status: d.status(),
                    skip_reason: d.skip_reason.clone(),
                    hold: hold.map(|reason| HoldInfo { reason, until: due }),
                }
            })
            .collect(),
    };
    serde_json::to_value(&accepted).context("Failed to encode the answer")
}

/// A 202 with `Location` and, for a replayed idempotent request, `Idempotency-Replayed`.
pub(super) fn accepted_response(location: &str, body: Value, replayed: bool) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert("idempotency-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The `Idempotency-Key` header, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[expect(
    dead_code,
    reason = "read by idempotency_key from the headers; declared for the document"
)]
pub(super) struct IdempotencyKey {
    /// Makes the request safe to repeat: the same key and body answer the first response
    /// again (with `Idempotency-Replayed: true`) and create nothing; the same key with
    /// another body is 422. 1 to 255 visible ASCII characters, scoped to the credential and
    /// remembered for `HERALD_IDEMPOTENCY_TTL` (24 h).
    #[param(rename = "Idempotency-Key", min_length = 1, max_length = 255)]
    idempotency_key: Option<String>,
}

pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
        })?;
    Ok(Some(key.to_owned()))
}

/// The answer stored for a credential's key, unless it expired.
async fn stored_response(
    state: &AppState,
    credential: &str,
    key: &str,
    request_hash: &str,
) -> Result<Option<Response>, ApiError> {
    let row: Option<(String, Value)> = sqlx::query_as(
        "SELECT request_hash, response_body FROM idempotency_keys \
         WHERE credential = $1 AND idempotency_key = $2 AND created_at > now() - $3",
    )
    .bind(credential)
    .bind(key)
    .bind(state.settings.access.idempotency_ttl)
    .fetch_optional(&state.db)
    .await
    .context("Failed to read the idempotency key")?;
    match row {
        None => Ok(None),
        Some((hash, body)) if hash == request_hash => {
            let id = serde_json::from_value::<Accepted>(body.clone())
                .map(|a| a.notification_id)
                .unwrap_or_default();
            Ok(Some(accepted_response(
                &format!("/api/v1/notifications/{id}"),
                body,
                true,
            )))
        }
        Some(_) => Err(ApiError::Unprocessable {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was used with a different request body".to_owned(),
        }),
    }
}

/// Reads a JSON request body into `T`, with the hash that idempotency keys compare. A NUL
/// character is refused here: PostgreSQL cannot store it.
pub(super) fn read_request<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(T, String), ApiError> {
    super::error::require_json(headers)?;
    let body = body?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    if crate::ingest::decode::contains_nul(&value) {
        return Err(bad(
            "the body contains a NUL character (\\u0000), which cannot be stored",
        ));
    }
    let request_hash = hash(&value);
    let request =
        serde_json::from_value(value).map_err(|e| bad(format!("invalid request: {e}")))?;
    Ok((request, request_hash))
}

/// SHA-256 of the body in a canonical form (object keys sorted, no whitespace), so the same
/// JSON sent with other formatting or key order is the same request.
fn hash(value: &Value) -> String {
    fn canonical(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                out.push('{');
                let keys: BTreeSet<&String> = map.keys().collect();
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    canonical(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut text = String::new();
    canonical(value, &mut text);
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(super) fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// Turns a request into a draft and its channels, or says what is wrong with it.
fn validate(state: &AppState, request: IntakeRequest) -> Result<(Draft, Vec<Channel>), ApiError> {
    let user_id = request
        .user_id
        .map(|id| UserId::new(id).map_err(bad))
        .transpose()?;
    let recipient = match &request.recipient {
        None => Recipient::default(),
        Some(r) => Recipient {
            email: r
                .email
                .as_deref()
                .map(|e| EmailAddress::parse(e).map_err(|m| bad(format!("recipient.email: {m}"))))
                .transpose()?,
            phone: r
                .phone
                .as_deref()
                .map(|p| PhoneNumber::parse(p).map_err(|m| bad(format!("recipient.phone: {m}"))))
                .transpose()?,
            locale: r
                .locale
                .as_deref()
                .map(|l| l.parse().map_err(|m| bad(format!("recipient.locale: {m}"))))
                .transpose()?,
        },
    };

    let content = Content::parse(
        request.event_type.as_deref(),
        request.subject.as_deref(),
        request.body.as_deref(),
    )?;
    let channels = match &request.channels {
        Some(names) => parse_channels(names)?,
        None if content.subject.is_some() => {
            return Err(bad("channels are required with subject and body"));
        }
        None => state
            .routing
            .channels_in_any_domain(&content.event_type)
            .ok_or_else(|| {
                bad(format!(
                    "eventType {} has no route; name the channels or use a routed event type",
                    content.event_type
                ))
            })?
            .to_vec(),
    };
    content.check_templates(state, &channels)?;
    if user_id.is_none()
        && recipient == Recipient::default()
        && channels
            .iter()
            .any(|c| !state.routing.is_operator_channel(*c))
    {
        return Err(bad("give userId or recipient: who should receive this?"));
    }

    let now = Utc::now();
    check_schedule(request.scheduled_at, now)?;
    let data = request.data.unwrap_or_default();
    content.check_data(state, &data)?;

    Ok((
        Draft {
            source: Source::Api,
            domain: Domain::Api,
            event_id: None,
            event_type: content.event_type,
            user_id,
            recipient,
            data,
            subject: content.subject,
            body: content.body,
            raw_event: None,
            origin: None,
            occurred_at: Some(now),
            scheduled_at: request.scheduled_at,
            broadcast_id: None,
            replay: None,
        },
        channels,
    ))
}

/// What a notification (or a broadcast) says: a templated event type with its data, or an
/// ad-hoc subject and body (the `_adhoc` template).
pub(super) struct Content {
    pub event_type: EventType,
    /// The template folder.
    pub template: String,
    pub subject: Option<String>,
    pub body: Option<String>,
}

impl Content {
    /// Checks that exactly one of the two forms is given, within limits.
    pub fn parse(
        event_type: Option<&str>,
        subject: Option<&str>,
        body: Option<&str>,
    ) -> Result<Self, ApiError> {
        match (event_type, subject, body) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(bad(
                "give either eventType (with data) or subject and body, not both",
            )),
            (Some(name), None, None) => {
                let event_type = EventType::parse(name).map_err(bad)?;
                Ok(Content {
                    template: event_type.to_string(),
                    event_type,
                    subject: None,
                    body: None,
                })
            }
            (None, Some(subject), Some(body)) => {
                if subject.trim().is_empty() || subject.chars().count() > MAX_SUBJECT_CHARS {
                    return Err(bad(format!(
                        "subject must be 1 to {MAX_SUBJECT_CHARS} characters"
                    )));
                }
                if body.trim().is_empty() || body.chars().count() > MAX_BODY_CHARS {
                    return Err(bad(format!(
                        "body must be 1 to {MAX_BODY_CHARS} characters"
                    )));
                }
                Ok(Content {
                    event_type: EventType::parse(ADHOC_EVENT_TYPE).map_err(bad)?,
                    template: ADHOC.to_owned(),
                    subject: Some(subject.to_owned()),
                    body: Some(body.to_owned()),
                })
            }
            _ => Err(bad("give eventType (with data), or subject and body")),
        }
    }

    /// `data` must match the schema of the event type (ad-hoc notifications have the event
    /// type `ADHOC`, whose schema is `schemas/ADHOC.json`).
    pub fn check_data(&self, state: &AppState, data: &Map<String, Value>) -> Result<(), ApiError> {
        Ok(state.schemas.check(self.event_type.as_str(), data)?)
    }

    /// Every channel must have a template for this content.
    pub fn check_templates(&self, state: &AppState, channels: &[Channel]) -> Result<(), ApiError> {
        for channel in channels {
            if !state.templates.covers(&self.template, *channel) {
                return Err(bad(format!(
                    "there is no {channel} template for {}",
                    self.event_type
                )));
            }
        }
        Ok(())
    }
}

/// Parses channel names: known, at least one, duplicates dropped.
pub(super) fn parse_channels(names: &[String]) -> Result<Vec<Channel>, ApiError> {
    let mut channels = Vec::new();
    for name in names {
        let channel: Channel = name.parse().map_err(bad)?;
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    if channels.is_empty() {
        return Err(bad("channels must name at least one channel"));
    }
    Ok(channels)
}

/// `scheduledAt` may be a few minutes late (clock skew) and at most 90 days ahead.
pub(super) fn check_schedule(
    at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if let Some(at) = at {
        if at < now - Duration::minutes(5) {
            return Err(bad("scheduledAt is in the past"));
        }
        if at > now + Duration::days(MAX_SCHEDULE_AHEAD_DAYS) {
            return Err(bad(format!(
                "scheduledAt may be at most {MAX_SCHEDULE_AHEAD_DAYS} days ahead"
            )));
        }
    }
    Ok(())
}

/// One notification as `GET /api/v1/notifications/{id}` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Notification)]
struct NotificationView {
    #[serde(flatten)]
    notification: NotificationRow,
    status: NotificationStatus,
    deliveries: Vec<DeliveryView>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct NotificationRow {
    id: Uuid,
    source: String,
    domain: String,
    event_id: Option<String>,
    event_type: String,
    user_id: Option<i64>,
    locale: String,
    data: Value,
    subject: Option<String>,
    created_at: DateTime<Utc>,
    scheduled_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Delivery)]
struct DeliveryView {
    id: Uuid,
    channel: Channel,
    status: DeliveryStatus,
    address: Option<String>,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    last_error: Option<String>,
    skip_reason: Option<String>,
    provider_ref: Option<String>,
    sent_via: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    /// Why a PENDING delivery waits until `nextAttemptAt`: scheduled, quiet_hours,
    /// frequency_capped, digest, rate_limited or circuit_open.
    #[serde(skip_serializing_if = "Option::is_none")]
    hold_reason: Option<String>,
    /// The digest it is (or was sent) in.
    #[serde(skip_serializing_if = "Option::is_none")]
    digest_id: Option<Uuid>,
    /// What the provider said became of the message, once it said so.
    #[sqlx(flatten)]
    #[schema(value_type = Option<crate::receipts::ReceiptState>)]
    receipt: crate::receipts::ReceiptColumns,
    /// Every attempt to send it, oldest first.
    #[sqlx(skip)]
    attempt_log: Vec<AttemptView>,
}

/// One attempt to send a delivery.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Attempt)]
struct AttemptView {
    #[serde(skip)]
    delivery_id: Uuid,
    attempt: i32,
    /// The channel it went out on (a fallback's, for a KakaoTalk message sent as SMS).
    channel: String,
    started_at: DateTime<Utc>,
    latency_ms: i32,
    /// SUCCESS, RETRYABLE or PERMANENT.
    outcome: String,
    error: Option<String>,
}

/// One notification with its deliveries (each with its attempts and receipt) and the
/// status derived from them.
#[utoipa::path(
    get,
    path = "/api/v1/notifications/{id}",
    operation_id = "getNotification",
    tag = "notifications",
    params(("id" = Uuid, Path, description = "The notification id.")),
    responses(
        (status = 200, description = "The notification.", body = NotificationView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<NotificationView>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| bad(format!("{id:?} is not a notification id")))?;
    let row: Option<NotificationRow> = sqlx::query_as(
        "SELECT id, source, domain, event_id, event_type, user_id, locale, data, subject, \
             created_at, scheduled_at FROM notifications WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.db)
    .await
    .context("Failed to read a notification")?;
    let notification = row.ok_or_else(|| ApiError::NotFound(format!("no notification {id}")))?;
    let mut deliveries: Vec<DeliveryView> = sqlx::query_as(
        "SELECT id, channel, status, address, attempts, next_attempt_at, last_error, \
             skip_reason, provider_ref, sent_via, created_at, updated_at, completed_at, \
             CASE WHEN status = 'PENDING' THEN hold_reason END AS hold_reason, digest_id, \
             receipt_status, receipt_reason, receipt_permanent, receipt_at \
         FROM deliveries WHERE notification_id = $1 ORDER BY channel",
    )
    .bind(id)
    .fetch_all(&state.db)
    .await
    .context("Failed to read deliveries")?;
    // Retries and failures have attempt rows; a first attempt that succeeded is kept on the
    // delivery itself (migration 0009).
    let attempts: Vec<AttemptView> = sqlx::query_as(
        "SELECT a.delivery_id, a.attempt, a.channel, a.started_at, a.latency_ms, a.outcome, \
             a.error \
         FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id \
         WHERE d.notification_id = $1 \
         UNION ALL \
         SELECT id, 1, COALESCE(sent_via, channel), first_attempt_started_at, \
             first_attempt_latency_ms, 'SUCCESS', NULL \
         FROM deliveries WHERE notification_id = $1 AND first_attempt_started_at IS NOT NULL \
         ORDER BY started_at, attempt",
    )
    .bind(id)
    .fetch_all(&state.db)
    .await
    .context("Failed to read attempts")?;
    for attempt in attempts {
        if let Some(delivery) = deliveries.iter_mut().find(|d| d.id == attempt.delivery_id) {
            delivery.attempt_log.push(attempt);
        }
    }
    let status = NotificationStatus::derive(deliveries.iter().map(|d| d.status));
    Ok(Json(NotificationView {
        notification,
        status,
        deliveries,
    }))
}
