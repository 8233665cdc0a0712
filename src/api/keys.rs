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
    Json, Router,
    extract::State,
    http::{Method, StatusCode, header},
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::{delete, get},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, authorize},
    error::{ApiError, ApiJson, ApiPath},
};
use crate::auth::{
    Principal, Scope,
    keys::{self, ApiKey},
};

/// The key routes.
pub fn router() -> Router<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::KeysAdmin)),
        (Method::POST, Need::Scope(Scope::KeysAdmin)),
        (Method::DELETE, Need::Scope(Scope::KeysAdmin)),
    ];
    Router::new()
        .route("/api/v1/admin/keys", get(list).post(create))
        .route("/api/v1/admin/keys/{id}", delete(revoke))
        .route_layer(from_fn_with_state(RULES, authorize))
}

/// The creation request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    scopes: Vec<String>,
}

/// The 201 answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    id: Uuid,
    name: String,
    scopes: Vec<Scope>,
    key: String,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
struct KeyList {
    items: Vec<ApiKey>,
}

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

async fn list(State(state): State<AppState>) -> Result<Json<KeyList>, ApiError> {
    Ok(Json(KeyList {
        items: keys::list(&state.db).await?,
    }))
}

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
