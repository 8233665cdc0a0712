//! The user directory: `PUT`/`GET /api/v1/users/{id}/contact`.

use axum::{Json, Router, extract::State, routing::get};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::{ApiError, ApiJson, ApiPath},
};
use crate::{
    directory::{self, Contact},
    domain::{EmailAddress, PhoneNumber, Timezone, UserId},
};

/// The user routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/users/{id}/contact", get(read).put(write))
}

/// The body of `PUT /api/v1/users/{id}/contact`. Every field is optional; an absent or null
/// field clears what was stored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    email: Option<String>,
    phone: Option<String>,
    locale: Option<String>,
    timezone: Option<String>,
}

/// A user's directory entry as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContactView {
    user_id: UserId,
    #[serde(flatten)]
    contact: Contact,
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
    let contact = Contact {
        email: body
            .email
            .as_deref()
            .map(EmailAddress::parse)
            .transpose()
            .map_err(|m| ApiError::BadRequest(format!("email: {m}")))?,
        phone: body
            .phone
            .as_deref()
            .map(PhoneNumber::parse)
            .transpose()
            .map_err(|m| ApiError::BadRequest(format!("phone: {m}")))?,
        locale: body
            .locale
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|m| ApiError::BadRequest(format!("locale: {m}")))?,
        timezone: body
            .timezone
            .as_deref()
            .map(Timezone::parse)
            .transpose()
            .map_err(|m| ApiError::BadRequest(format!("timezone: {m}")))?,
        updated_at: None,
    };
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
