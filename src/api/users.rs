//! The user directory: `PUT`/`GET /api/v1/users/{id}/contact`, and the bulk import
//! `POST /api/v1/users:import` (NDJSON or a JSON array, checked line by line).

use anyhow::Context;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, header},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    AppState,
    error::{ApiError, ApiJson, ApiPath},
};
use crate::{
    directory::{self, Contact},
    domain::{BirthYear, EmailAddress, PhoneNumber, Tag, Timezone, UserId},
};

/// Largest import body: about 100,000 users of typical size.
const MAX_IMPORT_BYTES: usize = 32 * 1024 * 1024;
/// Most rejected lines listed in an import report (the count covers them all).
const MAX_REPORTED_REJECTIONS: usize = 1_000;
/// Users written per statement during an import.
const IMPORT_CHUNK: usize = 5_000;
/// Most tags one user may carry.
const MAX_TAGS: usize = 32;

/// The user routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/users/{id}/contact", get(read).put(write))
        .route(
            "/api/v1/users:import",
            post(import).layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)),
        )
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
/// object per line (anything else, typically `application/x-ndjson`). Good lines are stored
/// in one transaction; bad lines are reported and skipped. 400 only when the body as a
/// whole is unreadable (not UTF-8, or not an array when sent as JSON).
async fn import(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ImportReport>, ApiError> {
    let body = body?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not UTF-8: {e}")))?;
    let json_array = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let lines: Vec<(usize, Result<Value, String>)> = if json_array {
        let items: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body is not a JSON array of users ({e}); send NDJSON as application/x-ndjson"
            ))
        })?;
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| (i + 1, Ok(item)))
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                (
                    i + 1,
                    serde_json::from_str(line).map_err(|e| format!("not JSON: {e}")),
                )
            })
            .collect()
    };
    if lines.is_empty() {
        return Err(ApiError::BadRequest("the body lists no users".into()));
    }

    let mut report = ImportReport {
        received: lines.len(),
        imported: 0,
        rejected: 0,
        rejections: Vec::new(),
    };
    let mut good = Vec::with_capacity(lines.len());
    for (line, value) in lines {
        let parsed = value.and_then(|value| {
            if crate::ingest::decode::contains_nul(&value) {
                return Err("contains a NUL character (\\u0000)".to_owned());
            }
            // A line is a contact body plus its userId (serde's flatten would not refuse
            // unknown fields, so the id is taken out by hand).
            let Value::Object(mut fields) = value else {
                return Err("not a JSON object".to_owned());
            };
            let user = fields
                .remove("userId")
                .ok_or("userId is missing")?
                .as_i64()
                .ok_or("userId must be a positive integer")
                .and_then(|id| UserId::new(id).map_err(|_| "userId must be a positive integer"))?;
            let contact: ContactBody =
                serde_json::from_value(Value::Object(fields)).map_err(|e| e.to_string())?;
            Ok((user, contact.parse()?))
        });
        match parsed {
            Ok(entry) => good.push(entry),
            Err(error) => {
                report.rejected += 1;
                if report.rejections.len() < MAX_REPORTED_REJECTIONS {
                    report.rejections.push(Rejection { line, error });
                }
            }
        }
    }
    let mut tx = state
        .db
        .begin()
        .await
        .context("Failed to begin the import")?;
    for chunk in good.chunks(IMPORT_CHUNK) {
        directory::upsert_many(&mut tx, chunk).await?;
    }
    tx.commit().await.context("Failed to commit the import")?;
    report.imported = good.len();
    metrics::counter!("herald_users_imported_total").increment(good.len() as u64);
    Ok(Json(report))
}
