//! The DLQ admin API, for credentials with the `dlq:admin` scope.
//!
//! - `GET /api/v1/admin/dlq?domain=&status=&errorClass=&failedChannel=&eventType=&from=&to=
//!   &q=&fingerprint=&limit=&cursor=`: newest first; DISCARDED ones only with
//!   `status=DISCARDED`; `from`/`to` bound the failure time, `q` matches the error message.
//! - `GET /api/v1/admin/dlq/counts?` (the same filters): counts by error class and by
//!   fingerprint (the class and message with ids and numbers normalised).
//! - `GET /api/v1/admin/dlq/{id}`: with its corrections.
//! - `PATCH /api/v1/admin/dlq/{id}`: corrects a PENDING letter before its retry:
//!   `{"payload": {...}}` (a poison message's whole event, checked as a new event would be)
//!   or `{"data": {...}, "address": "..."}` (a failed delivery's); audited, original kept.
//! - `POST /api/v1/admin/dlq/{id}/retry?force=`: beyond the replay cap only with force.
//! - `POST /api/v1/admin/dlq/retry-all?domain=&limit=`: retries up to `limit` (default 100,
//!   at most 1000) PENDING ones at once and reports the counts.
//! - `POST /api/v1/admin/dlq/replay`: `{"filter": {same filters as the list}, "ratePerSecond",
//!   "force", "dryRun"}`; a dry run answers what would happen, a real one answers 202 and runs
//!   in the background ([`crate::dlq::replay`]).
//! - `GET /api/v1/admin/dlq/replays`, `GET /api/v1/admin/dlq/replays/{id}`,
//!   `POST /api/v1/admin/dlq/replays/{id}/cancel`.
//! - `DELETE /api/v1/admin/dlq/{id}`: discards (kept for audit).
//!
//! Actions record who did them: the name of the credential (never a header the caller
//! chooses).

use axum::{
    Json,
    extract::State,
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{
        ApiError, ApiJson, ApiPath, ApiQuery, BadRequest, Conflict, NotFound, Unprocessable,
        UnsupportedMediaType,
    },
};
use crate::{
    auth::{Principal, Scope},
    dlq::{
        admin::{
            self as dlq, AdminError, Counts, DeadLetterView, Find, ListFilter, Page,
            RetryAllReport, RetryKind,
        },
        edit::{self, Correction, EditError},
        replay::{self, DryRun, MAX_RATE, Replay},
    },
    domain::{Channel, Domain},
    read_model::queries::decode_cursor,
};

/// The dead-letter routes, each needing `dlq:admin`.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::DlqAdmin)),
        (Method::POST, Need::Scope(Scope::DlqAdmin)),
        (Method::DELETE, Need::Scope(Scope::DlqAdmin)),
        (Method::PATCH, Need::Scope(Scope::DlqAdmin)),
    ];
    guarded(
        OpenApiRouter::new()
            .routes(routes!(list))
            .routes(routes!(retry_all))
            .routes(routes!(counts))
            .routes(routes!(start_replay))
            .routes(routes!(replays))
            .routes(routes!(read_replay))
            .routes(routes!(cancel_replay))
            .routes(routes!(read, discard, correct))
            .routes(routes!(retry)),
        RULES,
    )
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::NotFound(id) => ApiError::NotFound(format!("no dead letter {id}")),
            AdminError::Conflict(message) => ApiError::Conflict(message),
            AdminError::Internal(error) => ApiError::Internal(error),
        }
    }
}

impl From<EditError> for ApiError {
    fn from(error: EditError) -> Self {
        match error {
            EditError::Mismatch(message) => ApiError::BadRequest(message),
            EditError::Invalid { class, message } => ApiError::Unprocessable {
                code: "invalid_correction",
                message: format!("the correction would fail again ({class}): {message}"),
            },
            EditError::Admin(error) => error.into(),
        }
    }
}

/// The query of `GET /api/v1/admin/dlq` and `.../dlq/counts`: what finds dead letters, and
/// (for the list) the page.
#[derive(Debug, Default, Deserialize, Serialize, IntoParams, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
#[schema(as = DeadLetterFilter)]
pub struct FindQuery {
    /// Only dead letters of this domain.
    #[param(value_type = Option<Domain>)]
    #[schema(value_type = Option<Domain>)]
    domain: Option<String>,
    /// PENDING, RETRIED or DISCARDED (DISCARDED ones are listed only when asked for).
    status: Option<String>,
    /// The error class (`X-Error-Class`), such as `schema_violation`.
    error_class: Option<String>,
    /// The channel of a failed delivery.
    #[param(value_type = Option<Channel>)]
    #[schema(value_type = Option<Channel>)]
    failed_channel: Option<String>,
    /// The payload's eventType.
    event_type: Option<String>,
    /// Failed at or after (RFC 3339).
    from: Option<String>,
    /// Failed before (RFC 3339).
    to: Option<String>,
    /// Text the error message contains.
    q: Option<String>,
    /// A fingerprint from the counts: letters with one cause.
    fingerprint: Option<String>,
    /// Page size (the list only).
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page (the list only).
    cursor: Option<String>,
}

fn domain(raw: Option<String>) -> Result<Option<String>, ApiError> {
    raw.map(|d| {
        d.parse::<Domain>()
            .map(|d| d.as_str().to_owned())
            .map_err(ApiError::BadRequest)
    })
    .transpose()
}

/// A query's find, each value checked.
fn find(query: &FindQuery) -> Result<Find, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(s @ ("PENDING" | "RETRIED" | "DISCARDED")) => Some(s.to_owned()),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "status must be PENDING, RETRIED or DISCARDED, got {other:?}"
            )));
        }
    };
    let failed_channel = query
        .failed_channel
        .as_ref()
        .map(|c| c.to_ascii_uppercase().parse::<Channel>())
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("failedChannel: {e}")))?
        .map(|c| c.as_str().to_owned());
    let time = |name: &str, raw: &Option<String>| {
        raw.as_ref()
            .map(|t| {
                DateTime::parse_from_rfc3339(t)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::BadRequest(format!(
                            "{name}: {t:?} is not an RFC 3339 time such as 2026-12-01T09:00:00Z"
                        ))
                    })
            })
            .transpose()
    };
    let text = |name: &str, raw: &Option<String>| {
        raw.clone()
            .map(|t| {
                if t.contains('\0') || t.len() > 500 {
                    Err(ApiError::BadRequest(format!(
                        "{name}: at most 500 characters, without NUL"
                    )))
                } else {
                    Ok(t)
                }
            })
            .transpose()
    };
    Ok(Find {
        domain: domain(query.domain.clone())?,
        status,
        error_class: text("errorClass", &query.error_class)?,
        failed_channel,
        event_type: text("eventType", &query.event_type)?,
        from: time("from", &query.from)?,
        to: time("to", &query.to)?,
        text: text("q", &query.q)?.filter(|t| !t.is_empty()),
        fingerprint: text("fingerprint", &query.fingerprint)?,
    })
}

/// Dead letters, newest first; DISCARDED ones only with `status=DISCARDED`.
#[utoipa::path(
    get,
    path = "/api/v1/admin/dlq",
    operation_id = "listDeadLetters",
    tag = "admin",
    params(FindQuery),
    responses(
        (status = 200, description = "One page of dead letters.", body = Page),
        (status = 400, response = BadRequest),
    )
)]
async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<FindQuery>,
) -> Result<Json<Page>, ApiError> {
    let limit = super::error::page_limit(query.limit, 50, 500)?;
    let after = query
        .cursor
        .as_deref()
        .map(|c| {
            decode_cursor(c).ok_or_else(|| ApiError::BadRequest(format!("{c:?} is not a cursor")))
        })
        .transpose()?;
    let filter = ListFilter {
        find: find(&query)?,
        after,
        limit,
    };
    Ok(Json(dlq::list(&state.db, &filter).await?))
}

/// How many letters the filters find, by error class and by fingerprint (the class and
/// message with ids and numbers normalised). No `limit` or `cursor`.
#[utoipa::path(
    get,
    path = "/api/v1/admin/dlq/counts",
    operation_id = "countDeadLetters",
    tag = "admin",
    params(FindQuery),
    responses(
        (status = 200, description = "The counts.", body = Counts),
        (status = 400, response = BadRequest),
    )
)]
async fn counts(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<FindQuery>,
) -> Result<Json<Counts>, ApiError> {
    if query.limit.is_some() || query.cursor.is_some() {
        return Err(ApiError::BadRequest(
            "counts cover every letter the filters find: no limit or cursor".to_owned(),
        ));
    }
    Ok(Json(dlq::counts(&state.db, &find(&query)?).await?))
}

fn id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a dead letter id")))
}

/// One dead letter, with its corrections.
#[utoipa::path(
    get,
    path = "/api/v1/admin/dlq/{id}",
    operation_id = "getDeadLetter",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The dead letter id.")),
    responses(
        (status = 200, description = "The dead letter.", body = DeadLetterView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    let id = id(&raw)?;
    let mut letter = dlq::get(&state.db, id).await?;
    letter.edits = Some(edit::list(&state.db, id).await?);
    Ok(Json(letter))
}

/// `PATCH /api/v1/admin/dlq/{id}` body: one of the two corrections.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DeadLetterCorrection)]
pub struct CorrectionBody {
    /// A poison message's whole event, checked as a new event would be.
    payload: Option<Value>,
    /// A failed delivery's data.
    data: Option<serde_json::Map<String, Value>>,
    /// A failed delivery's address.
    address: Option<String>,
}

/// Corrects a PENDING letter before its retry: `payload` (a poison message's whole event)
/// or `data` and/or `address` (a failed delivery's). Audited; the original is kept.
#[utoipa::path(
    patch,
    path = "/api/v1/admin/dlq/{id}",
    operation_id = "correctDeadLetter",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The dead letter id.")),
    request_body = CorrectionBody,
    responses(
        (status = 200, description = "The corrected dead letter.", body = DeadLetterView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn correct(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
    ApiJson(body): ApiJson<CorrectionBody>,
) -> Result<Json<DeadLetterView>, ApiError> {
    let correction = match body {
        CorrectionBody {
            payload: Some(payload),
            data: None,
            address: None,
        } => Correction::Payload(payload),
        CorrectionBody {
            payload: None,
            data,
            address,
        } => Correction::Delivery { data, address },
        _ => {
            return Err(ApiError::BadRequest(
                "give either payload (a poison message's event) or data and/or address (a \
                 failed delivery's), not both"
                    .to_owned(),
            ));
        }
    };
    Ok(Json(
        edit::edit(&state.ingestor, id(&raw)?, correction, &principal.name()).await?,
    ))
}

/// `POST /api/v1/admin/dlq/{id}/retry` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RetryQuery {
    /// Replay beyond the replay cap.
    #[serde(default)]
    force: bool,
}

/// What a retry did, and the letter after it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = RetryResult)]
struct Retried {
    retry: RetryKind,
    dead_letter: DeadLetterView,
}

/// Retries one dead letter: a failed delivery is re-queued (other channels are not sent
/// again), a poison message re-ingested. Beyond the replay cap only with `force`.
#[utoipa::path(
    post,
    path = "/api/v1/admin/dlq/{id}/retry",
    operation_id = "retryDeadLetter",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The dead letter id."), RetryQuery),
    responses(
        (status = 200, description = "Retried.", body = Retried),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
    )
)]
async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
    ApiQuery(query): ApiQuery<RetryQuery>,
) -> Result<Json<Retried>, ApiError> {
    let id = id(&raw)?;
    let cap = state.settings.dlq.replay_cap;
    let retry = dlq::retry(&state.ingestor, id, &principal.name(), query.force, cap).await?;
    let dead_letter = dlq::get(&state.db, id).await?;
    Ok(Json(Retried { retry, dead_letter }))
}

/// `POST /api/v1/admin/dlq/retry-all` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RetryAllQuery {
    /// Only dead letters of this domain.
    #[param(value_type = Option<Domain>)]
    domain: Option<String>,
    /// How many at most, oldest first.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
}

/// Retries up to `limit` PENDING dead letters at once and reports the counts.
#[utoipa::path(
    post,
    path = "/api/v1/admin/dlq/retry-all",
    operation_id = "retryAllDeadLetters",
    tag = "admin",
    params(RetryAllQuery),
    responses(
        (status = 200, description = "What was retried.", body = RetryAllReport),
        (status = 400, response = BadRequest),
    )
)]
async fn retry_all(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<RetryAllQuery>,
) -> Result<Json<RetryAllReport>, ApiError> {
    let limit = super::error::page_limit(query.limit, 100, 1000)?;
    let domain = domain(query.domain)?;
    let report = dlq::retry_all(
        &state.ingestor,
        domain.as_deref(),
        limit,
        &principal.name(),
        state.settings.dlq.replay_cap,
    )
    .await?;
    Ok(Json(report))
}

/// `POST /api/v1/admin/dlq/replay` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ReplayRequest)]
pub struct ReplayBody {
    /// The list's filters; every PENDING letter when absent.
    filter: Option<FindQuery>,
    /// Letters per second, 1 to 1000 (HERALD_DLQ_REPLAY_RATE when absent).
    rate_per_second: Option<u32>,
    /// Replay letters beyond the replay cap too.
    #[serde(default)]
    force: bool,
    /// Answer what would happen, change nothing.
    #[serde(default)]
    dry_run: bool,
}

/// Replays the PENDING letters a filter finds, at a bounded rate, in the background; a dry
/// run answers what would happen and changes nothing.
#[utoipa::path(
    post,
    path = "/api/v1/admin/dlq/replay",
    operation_id = "replayDeadLetters",
    tag = "admin",
    request_body = ReplayBody,
    responses(
        (status = 200, description = "The dry run's findings (`dryRun: true`).", body = DryRun),
        (status = 202, description = "The replay, started.", body = Replay,
            headers(("Location" = String, description = "The replay's URL."))),
        (status = 400, response = BadRequest),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn start_replay(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<ReplayBody>,
) -> Result<Response, ApiError> {
    let query = body.filter.unwrap_or_default();
    if query.limit.is_some() || query.cursor.is_some() {
        return Err(ApiError::BadRequest(
            "a replay covers every letter its filter finds: no limit or cursor".to_owned(),
        ));
    }
    let mut find = find(&query)?;
    match find.status.as_deref() {
        None | Some("PENDING") => find.status = Some("PENDING".to_owned()),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "a replay replays PENDING letters, not {other}"
            )));
        }
    }
    let rate = body
        .rate_per_second
        .unwrap_or(state.settings.dlq.replay_rate);
    if !(1..=MAX_RATE).contains(&rate) {
        return Err(ApiError::BadRequest(format!(
            "ratePerSecond must be 1 to {MAX_RATE}, got {rate}"
        )));
    }
    let cap = state.settings.dlq.replay_cap;
    if body.dry_run {
        let report = replay::dry_run(&state.ingestor, &find, body.force, cap).await?;
        return Ok(Json(report).into_response());
    }
    let mut filter = serde_json::to_value(&query).map_err(anyhow::Error::from)?;
    // As given: the filters that were set.
    if let Some(fields) = filter.as_object_mut() {
        fields.retain(|_, value| !value.is_null());
    }
    let replay = replay::start(
        &state.db,
        &find,
        filter,
        rate,
        body.force,
        &principal.name(),
    )
    .await?;
    let location = format!("/api/v1/admin/dlq/replays/{}", replay.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(replay),
    )
        .into_response())
}

/// `GET /api/v1/admin/dlq/replays` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReplaysQuery {
    /// How many, newest first.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<i64>,
}

/// The most recent replays.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ReplayPage)]
struct Replays {
    items: Vec<Replay>,
}

/// The most recent replays, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/admin/dlq/replays",
    operation_id = "listReplays",
    tag = "admin",
    params(ReplaysQuery),
    responses(
        (status = 200, description = "The replays.", body = Replays),
        (status = 400, response = BadRequest),
    )
)]
async fn replays(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ReplaysQuery>,
) -> Result<Json<Replays>, ApiError> {
    let limit = super::error::page_limit(query.limit, 20, 100)?;
    Ok(Json(Replays {
        items: replay::list(&state.db, limit).await?,
    }))
}

fn replay_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a replay id")))
}

/// One replay and how far it got.
#[utoipa::path(
    get,
    path = "/api/v1/admin/dlq/replays/{id}",
    operation_id = "getReplay",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The replay id.")),
    responses(
        (status = 200, description = "The replay.", body = Replay),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read_replay(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Replay>, ApiError> {
    let id = replay_id(&raw)?;
    replay::get(&state.db, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no replay {id}")))
}

/// Stops a running replay; letters not reached yet stay PENDING.
#[utoipa::path(
    post,
    path = "/api/v1/admin/dlq/replays/{id}/cancel",
    operation_id = "cancelReplay",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The replay id.")),
    responses(
        (status = 200, description = "The replay, cancelled.", body = Replay),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
    )
)]
async fn cancel_replay(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Replay>, ApiError> {
    let id = replay_id(&raw)?;
    match replay::cancel(&state.db, id, &principal.name()).await {
        Err(AdminError::NotFound(_)) => Err(ApiError::NotFound(format!("no replay {id}"))),
        other => Ok(Json(other?)),
    }
}

/// Discards a dead letter: a soft delete, kept for audit.
#[utoipa::path(
    delete,
    path = "/api/v1/admin/dlq/{id}",
    operation_id = "discardDeadLetter",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The dead letter id.")),
    responses(
        (status = 200, description = "The discarded dead letter.", body = DeadLetterView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
    )
)]
async fn discard(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(
        dlq::discard(&state.db, id(&raw)?, &principal.name()).await?,
    ))
}
