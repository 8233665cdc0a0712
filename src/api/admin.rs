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
    Json, Router,
    extract::State,
    http::{Method, StatusCode, header},
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, authorize},
    error::{ApiError, ApiJson, ApiPath, ApiQuery},
};
use crate::{
    auth::{Principal, Scope},
    dlq::{
        admin::{
            self as dlq, AdminError, Counts, DeadLetterView, Find, ListFilter, Page, RetryAllReport,
        },
        edit::{self, Correction, EditError},
        replay::{self, MAX_RATE, Replay},
    },
    domain::{Channel, Domain},
    read_model::queries::decode_cursor,
};

/// The dead-letter routes, each needing `dlq:admin`.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::DlqAdmin)),
        (Method::POST, Need::Scope(Scope::DlqAdmin)),
        (Method::DELETE, Need::Scope(Scope::DlqAdmin)),
        (Method::PATCH, Need::Scope(Scope::DlqAdmin)),
    ];
    Router::new()
        .route("/api/v1/admin/dlq", get(list))
        .route("/api/v1/admin/dlq/retry-all", post(retry_all))
        .route("/api/v1/admin/dlq/counts", get(counts))
        .route("/api/v1/admin/dlq/replay", post(start_replay))
        .route("/api/v1/admin/dlq/replays", get(replays))
        .route("/api/v1/admin/dlq/replays/{id}", get(read_replay))
        .route("/api/v1/admin/dlq/replays/{id}/cancel", post(cancel_replay))
        .route(
            "/api/v1/admin/dlq/{id}",
            get(read).delete(discard).patch(correct),
        )
        .route("/api/v1/admin/dlq/{id}/retry", post(retry))
        .route_layer(from_fn_with_state(RULES, authorize))
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
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FindQuery {
    domain: Option<String>,
    status: Option<String>,
    error_class: Option<String>,
    failed_channel: Option<String>,
    event_type: Option<String>,
    /// Failed at or after (RFC 3339).
    from: Option<String>,
    /// Failed before (RFC 3339).
    to: Option<String>,
    /// Text the error message contains.
    q: Option<String>,
    fingerprint: Option<String>,
    limit: Option<i64>,
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

/// `GET /api/v1/admin/dlq/counts`: how many letters a find matches, by error class and by
/// fingerprint.
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrectionBody {
    payload: Option<Value>,
    data: Option<serde_json::Map<String, Value>>,
    address: Option<String>,
}

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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryQuery {
    /// Replay beyond the replay cap.
    #[serde(default)]
    force: bool,
}

async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
    ApiQuery(query): ApiQuery<RetryQuery>,
) -> Result<Json<Value>, ApiError> {
    let id = id(&raw)?;
    let cap = state.settings.dlq.replay_cap;
    let kind = dlq::retry(&state.ingestor, id, &principal.name(), query.force, cap).await?;
    let letter = dlq::get(&state.db, id).await?;
    Ok(Json(json!({ "retry": kind, "deadLetter": letter })))
}

/// `POST /api/v1/admin/dlq/retry-all` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryAllQuery {
    domain: Option<String>,
    limit: Option<i64>,
}

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
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaysQuery {
    limit: Option<i64>,
}

async fn replays(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ReplaysQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::error::page_limit(query.limit, 20, 100)?;
    Ok(Json(
        json!({ "items": replay::list(&state.db, limit).await? }),
    ))
}

fn replay_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a replay id")))
}

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

async fn discard(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(
        dlq::discard(&state.db, id(&raw)?, &principal.name()).await?,
    ))
}
