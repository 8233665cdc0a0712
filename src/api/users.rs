//! The user directory: `PUT`/`GET /api/v1/users/{id}/contact`, and the bulk import
//! `POST /api/v1/users:import` (NDJSON or a JSON array, checked line by line).

use anyhow::Context;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, Method, header},
    middleware::from_fn_with_state,
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    AppState,
    auth::{Need, Rules, authorize},
    error::{ApiError, ApiJson, ApiPath},
};
use crate::{
    auth::Scope,
    directory::{self, Contact},
    domain::{BirthYear, EmailAddress, PhoneNumber, Tag, Timezone, UserId},
};

/// Largest import body: about 100,000 users of typical size.
const MAX_IMPORT_BYTES: usize = 32 * 1024 * 1024;
/// Most rejected lines listed in an import report (the count covers them all).
const MAX_REPORTED_REJECTIONS: usize = 1_000;
/// Most users one import may list.
const MAX_IMPORT_USERS: usize = 200_000;
/// Most tags one user may carry.
const MAX_TAGS: usize = 32;

/// The user routes: `users:read` to read the directory, `users:write` to change it.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::UsersRead)),
        (Method::PUT, Need::Scope(Scope::UsersWrite)),
        (Method::POST, Need::Scope(Scope::UsersWrite)),
    ];
    Router::new()
        .route("/api/v1/users/{id}/contact", get(read).put(write))
        .route(
            "/api/v1/users:import",
            post(import).layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)),
        )
        .route_layer(from_fn_with_state(RULES, authorize))
}

/// The body of `PUT /api/v1/users/{id}/contact`. Every field is optional; an absent or null
/// field clears what was stored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContactBody {
    email: Option<String>,
    phone: Option<String>,
    locale: Option<String>,
    timezone: Option<String>,
    birth_year: Option<i64>,
    tags: Option<Vec<String>>,
}

impl ContactBody {
    /// Checks every field; the message names the first bad one.
    fn parse(self) -> Result<Contact, String> {
        let tags = self.tags.unwrap_or_default();
        if tags.len() > MAX_TAGS {
            return Err(format!("tags: at most {MAX_TAGS} tags"));
        }
        Ok(Contact {
            email: self
                .email
                .as_deref()
                .map(EmailAddress::parse)
                .transpose()
                .map_err(|m| format!("email: {m}"))?,
            phone: self
                .phone
                .as_deref()
                .map(PhoneNumber::parse)
                .transpose()
                .map_err(|m| format!("phone: {m}"))?,
            locale: self
                .locale
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|m| format!("locale: {m}"))?,
            timezone: self
                .timezone
                .as_deref()
                .map(Timezone::parse)
                .transpose()
                .map_err(|m| format!("timezone: {m}"))?,
            birth_year: self
                .birth_year
                .map(BirthYear::new)
                .transpose()
                .map_err(|m| format!("birthYear: {m}"))?,
            tags: tags
                .iter()
                .map(|t| Tag::parse(t))
                .collect::<Result<_, _>>()
                .map_err(|m| format!("tags: {m}"))?,
            updated_at: None,
        })
    }
}

/// A user's directory entry as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContactView {
    user_id: UserId,
    #[serde(flatten)]
    contact: Contact,
}

/// What an import did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImportReport {
    /// Lines (or array items) read, blank lines aside.
    received: usize,
    /// Users created or replaced.
    imported: usize,
    /// Lines refused, each with its reason; nothing of a refused line is stored.
    rejected: usize,
    /// The first rejections (at most 1,000), with 1-based line (or item) numbers.
    rejections: Vec<Rejection>,
}

#[derive(Debug, Serialize)]
struct Rejection {
    line: usize,
    error: String,
}

/// Parses a path or query user id.
pub fn user_id(raw: i64) -> Result<UserId, ApiError> {
    UserId::new(raw).map_err(ApiError::BadRequest)
}

async fn write(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<ContactBody>,
) -> Result<Json<ContactView>, ApiError> {
    let user = user_id(id)?;
    let contact = body.parse().map_err(ApiError::BadRequest)?;
    let stored = directory::upsert(&state.db, user, &contact).await?;
    Ok(Json(ContactView {
        user_id: user,
        contact: stored,
    }))
}

async fn read(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<ContactView>, ApiError> {
    let user = user_id(id)?;
    let contact = directory::load(&state.db, user)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {user} has no directory entry")))?;
    Ok(Json(ContactView {
        user_id: user,
        contact,
    }))
}

/// `POST /api/v1/users:import`: a JSON array (`Content-Type: application/json`) or one JSON
/// object per line (`application/x-ndjson`). Good lines are stored
/// in one transaction; bad lines are reported and skipped. 400 only when the body as a
/// whole is unreadable (not UTF-8, or not an array when sent as JSON).
async fn import(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ImportReport>, ApiError> {
    let json_array = import_format(&headers)?;
    let body = body?;
    // Tens of megabytes of JSON: parsed off the async workers.
    let (mut report, good) = tokio::task::spawn_blocking(move || read_import(&body, json_array))
        .await
        .context("the import parser panicked")??;
    let mut tx = state
        .db
        .begin()
        .await
        .context("Failed to begin the import")?;
    directory::upsert_many(&mut tx, &good).await?;
    tx.commit().await.context("Failed to commit the import")?;
    report.imported = good.len();
    metrics::counter!("herald_users_imported_total").increment(good.len() as u64);
    Ok(Json(report))
}

/// Whether an import body is a JSON array (`application/json`) rather than NDJSON
/// (`application/x-ndjson`, `application/ndjson` or `application/jsonl`); any other type
/// is refused, as for every body (see `error::require_json`).
fn import_format(headers: &HeaderMap) -> Result<bool, ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match media_type.as_deref() {
        Some("application/json") => Ok(true),
        Some("application/x-ndjson" | "application/ndjson" | "application/jsonl") => Ok(false),
        _ => Err(ApiError::UnsupportedMediaType(
            "send the users as application/json (an array) or application/x-ndjson (a line each)"
                .into(),
        )),
    }
}

/// Checks an import body line by line (or item by item): the good entries, and a report of
/// the rest.
fn read_import(
    body: &[u8],
    json_array: bool,
) -> Result<(ImportReport, Vec<(UserId, Contact)>), ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not UTF-8: {e}")))?;
    let lines: Box<dyn Iterator<Item = (usize, Result<Value, String>)>> = if json_array {
        let items: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body is not a JSON array of users ({e}); send NDJSON as application/x-ndjson"
            ))
        })?;
        Box::new(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| (i + 1, Ok(item))),
        )
    } else {
        Box::new(
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(i, line)| {
                    let value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"));
                    (i + 1, value)
                }),
        )
    };
    let mut report = ImportReport {
        received: 0,
        imported: 0,
        rejected: 0,
        rejections: Vec::new(),
    };
    let mut good = Vec::new();
    for (line, value) in lines {
        report.received += 1;
        if report.received > MAX_IMPORT_USERS {
            return Err(ApiError::BadRequest(format!(
                "an import may list at most {MAX_IMPORT_USERS} users; split it"
            )));
        }
        match value.and_then(import_line) {
            Ok(entry) => good.push(entry),
            Err(error) => {
                report.rejected += 1;
                if report.rejections.len() < MAX_REPORTED_REJECTIONS {
                    report.rejections.push(Rejection { line, error });
                }
            }
        }
    }
    if report.received == 0 {
        return Err(ApiError::BadRequest("the body lists no users".into()));
    }
    Ok((report, good))
}

/// One import line: a contact body plus its userId (taken out by hand, because serde's
/// flatten would not refuse unknown fields).
fn import_line(value: Value) -> Result<(UserId, Contact), String> {
    if crate::ingest::decode::contains_nul(&value) {
        return Err("contains a NUL character (\\u0000)".to_owned());
    }
    let Value::Object(mut fields) = value else {
        return Err("not a JSON object".to_owned());
    };
    let user = fields
        .remove("userId")
        .ok_or("userId is missing")?
        .as_i64()
        .and_then(|id| UserId::new(id).ok())
        .ok_or("userId must be a positive integer")?;
    let contact: ContactBody =
        serde_json::from_value(Value::Object(fields)).map_err(|e| e.to_string())?;
    Ok((user, contact.parse()?))
}
