//! API keys over HTTP (DESIGN §5a), for credentials with `keys:admin`:
//!
//! - `POST /api/v1/admin/keys` `{"name", "scopes"}` → 201 `{"id", "name", "scopes", "key",
//!   "createdAt"}`: the only time the key is shown.
//! - `GET /api/v1/admin/keys`: every key, newest first, without the keys themselves.
//! - `DELETE /api/v1/admin/keys/{id}` → 204: revoked at once here, on every other
//!   instance within `auth::keys::CACHE_TTL`.
//!
//! A key may grant only scopes its creator holds, so `keys:admin` alone cannot mint a key
//! with more power than its holder.

use axum::{
    Json,
    extract::State,
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{ApiError, ApiJson, ApiPath, BadRequest, NotFound, UnsupportedMediaType},
};
use crate::auth::{
    Principal, Scope,
    keys::{self, ApiKey},
};

/// The key routes.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::KeysAdmin)),
        (Method::POST, Need::Scope(Scope::KeysAdmin)),
        (Method::DELETE, Need::Scope(Scope::KeysAdmin)),
    ];
    guarded(
        OpenApiRouter::new()
            .routes(routes!(list, create))
            .routes(routes!(revoke)),
        RULES,
    )
}

/// The creation request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewApiKey)]
struct CreateRequest {
    /// Who holds the key, for people and audit fields.
    name: String,
    /// What it may do; only scopes the creating credential holds.
    #[schema(value_type = Vec<Scope>)]
    scopes: Vec<String>,
}

/// The 201 answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = CreatedApiKey)]
struct Created {
    id: Uuid,
    name: String,
    scopes: Vec<Scope>,
    /// The key itself: shown this once, stored only as a hash.
    key: String,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = ApiKeyList)]
struct KeyList {
    items: Vec<ApiKey>,
}

/// Creates an API key and shows it, the only time it is shown.
#[utoipa::path(
    post,
    path = "/api/v1/admin/keys",
    operation_id = "createApiKey",
    tag = "admin",
    request_body = CreateRequest,
    responses(
        (status = 201, description = "Created.", body = Created,
            headers(("Location" = String, description = "The key's URL."))),
        (status = 400, response = BadRequest),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateRequest>,
) -> Result<Response, ApiError> {
    let (name, scopes) =
        keys::parse_request(&request.name, &request.scopes).map_err(ApiError::BadRequest)?;
    if let Some(missing) = scopes.iter().find(|s| !principal.has(**s)) {
        return Err(ApiError::Forbidden(format!(
            "a key may grant only scopes its creator holds; this credential lacks {missing}"
        )));
    }
    let created = keys::create(&state.db, &name, &scopes, &principal.name()).await?;
    let location = format!("/api/v1/admin/keys/{}", created.key.id);
    let body = Created {
        id: created.key.id,
        name: created.key.name,
        scopes: created.key.scopes,
        key: created.secret,
        created_at: created.key.created_at,
    };
    Ok((
        StatusCode::CREATED,
        [
            (header::LOCATION, location),
            // The answer holds a secret: no cache may keep it.
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        Json(body),
    )
        .into_response())
}

/// Every API key, newest first, without the keys themselves.
#[utoipa::path(
    get,
    path = "/api/v1/admin/keys",
    operation_id = "listApiKeys",
    tag = "admin",
    responses((status = 200, description = "The keys.", body = KeyList))
)]
async fn list(State(state): State<AppState>) -> Result<Json<KeyList>, ApiError> {
    Ok(Json(KeyList {
        items: keys::list(&state.db).await?,
    }))
}

/// Revokes an API key: at once on this instance, on every other within 5 s.
#[utoipa::path(
    delete,
    path = "/api/v1/admin/keys/{id}",
    operation_id = "revokeApiKey",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The key id.")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn revoke(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = Uuid::parse_str(&raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a key id")))?;
    match keys::revoke(&state.db, id, &principal.name()).await? {
        Some(_) => {
            state.auth.keys().forget(id);
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::NotFound(format!("no API key {id}"))),
    }
}
