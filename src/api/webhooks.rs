//! Webhook endpoints (issue 15), for credentials with the `webhooks:admin` scope.
//!
//! - `POST /api/v1/webhooks` `{"url", "kinds": ["delivery", "notification_status",
//!   "broadcast"], "description"}` → 201 with the endpoint and its `secret`, shown this
//!   once. A URL on a non-public address is refused 400 unless configuration allows it.
//! - `GET /api/v1/webhooks`, `GET /api/v1/webhooks/{id}`
//! - `DELETE /api/v1/webhooks/{id}` → 204 (kept for audit; its waiting calls are dropped)
//! - `POST /api/v1/webhooks/{id}/enable`: after it was disabled for failing.
//! - `GET /api/v1/webhooks/{id}/deliveries?status=&limit=&cursor=`: its calls, newest first.

use axum::{
    Json,
    extract::State,
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{ApiError, ApiJson, ApiPath, ApiQuery, BadRequest, NotFound, UnsupportedMediaType},
};
use crate::{
    auth::{Principal, Scope},
    webhooks::{self, Call, Endpoint, Kind},
};

/// The webhook routes, each needing `webhooks:admin`.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::WebhooksAdmin)),
        (Method::POST, Need::Scope(Scope::WebhooksAdmin)),
        (Method::DELETE, Need::Scope(Scope::WebhooksAdmin)),
    ];
    guarded(
        OpenApiRouter::new()
            .routes(routes!(create, list))
            .routes(routes!(read, delete))
            .routes(routes!(enable))
            .routes(routes!(deliveries)),
        RULES,
    )
}

/// `POST /api/v1/webhooks` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WebhookRequest)]
struct CreateRequest {
    /// Where to POST the calls; a non-public address is refused unless configuration
    /// allows it.
    url: String,
    /// Default: every kind.
    #[schema(value_type = Option<Vec<Kind>>)]
    kinds: Option<Vec<String>>,
    /// For people, at most 500 characters.
    description: Option<String>,
}

/// A new endpoint, with the secret its calls are signed with: shown this once.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CreatedWebhookEndpoint)]
struct Created {
    #[serde(flatten)]
    endpoint: Endpoint,
    /// `whsec_<base64>`: verify each call's `webhook-signature` with it.
    secret: String,
}

/// The endpoints.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = WebhookEndpointList)]
struct List {
    items: Vec<Endpoint>,
}

/// A page of an endpoint's calls.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = WebhookCallPage)]
struct CallPage {
    items: Vec<Call>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// Adds an endpoint for signed outbound webhooks.
#[utoipa::path(
    post,
    path = "/api/v1/webhooks",
    operation_id = "createWebhook",
    tag = "webhooks",
    request_body = CreateRequest,
    responses(
        (status = 201, description = "Created.", body = Created),
        (status = 400, response = BadRequest),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateRequest>,
) -> Result<Response, ApiError> {
    let url = webhooks::check_url(&request.url, state.settings.webhooks.allow_private)
        .await
        .map_err(|e| ApiError::BadRequest(e.0))?;
    let kinds: Vec<Kind> = match request.kinds {
        None => Kind::ALL.to_vec(),
        Some(kinds) if kinds.is_empty() => {
            return Err(ApiError::BadRequest(
                "kinds: name at least one of delivery, notification_status, broadcast".to_owned(),
            ));
        }
        Some(kinds) => {
            let mut parsed = Vec::new();
            for kind in kinds {
                let kind: Kind = kind
                    .parse()
                    .map_err(|e: String| ApiError::BadRequest(format!("kinds: {e}")))?;
                if !parsed.contains(&kind) {
                    parsed.push(kind);
                }
            }
            parsed
        }
    };
    let description = request.description.map(|d| d.replace('\0', ""));
    if description.as_ref().is_some_and(|d| d.len() > 500) {
        return Err(ApiError::BadRequest(
            "description: at most 500 characters".to_owned(),
        ));
    }
    let (endpoint, secret) = webhooks::create(
        &state.db,
        &url,
        &kinds,
        description.as_deref(),
        &principal.name(),
    )
    .await?;
    tracing::info!(endpoint = %endpoint.id, by = %principal.name(), "webhook endpoint created");
    Ok((StatusCode::CREATED, Json(Created { endpoint, secret })).into_response())
}

/// Every endpoint.
#[utoipa::path(
    get,
    path = "/api/v1/webhooks",
    operation_id = "listWebhooks",
    tag = "webhooks",
    responses((status = 200, description = "The endpoints.", body = List))
)]
async fn list(State(state): State<AppState>) -> Result<Json<List>, ApiError> {
    Ok(Json(List {
        items: webhooks::list(&state.db).await?,
    }))
}

fn id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a webhook endpoint id")))
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no webhook endpoint {id}"))
}

/// One endpoint.
#[utoipa::path(
    get,
    path = "/api/v1/webhooks/{id}",
    operation_id = "getWebhook",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint id.")),
    responses(
        (status = 200, description = "The endpoint.", body = Endpoint),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Endpoint>, ApiError> {
    let id = id(&raw)?;
    Ok(Json(
        webhooks::get(&state.db, id)
            .await?
            .ok_or_else(|| not_found(id))?,
    ))
}

/// Deletes an endpoint (kept for audit); its waiting calls are dropped.
#[utoipa::path(
    delete,
    path = "/api/v1/webhooks/{id}",
    operation_id = "deleteWebhook",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = id(&raw)?;
    if !webhooks::delete(&state.db, id, &principal.name()).await? {
        return Err(not_found(id));
    }
    tracing::info!(endpoint = %id, by = %principal.name(), "webhook endpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Enables an endpoint again after it was disabled for failing.
#[utoipa::path(
    post,
    path = "/api/v1/webhooks/{id}/enable",
    operation_id = "enableWebhook",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint id.")),
    responses(
        (status = 200, description = "The endpoint.", body = Endpoint),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn enable(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Endpoint>, ApiError> {
    let id = id(&raw)?;
    let endpoint = webhooks::enable(&state.db, id, state.settings.webhooks.give_up_after)
        .await?
        .ok_or_else(|| not_found(id))?;
    tracing::info!(endpoint = %id, by = %principal.name(), "webhook endpoint enabled");
    Ok(Json(endpoint))
}

/// `GET /api/v1/webhooks/{id}/deliveries` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CallsQuery {
    /// PENDING, SUCCESS or FAILED.
    status: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// An endpoint's calls, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/webhooks/{id}/deliveries",
    operation_id = "listWebhookCalls",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint id."), CallsQuery),
    responses(
        (status = 200, description = "One page of calls.", body = CallPage),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn deliveries(
    State(state): State<AppState>,
    ApiPath(raw): ApiPath<String>,
    ApiQuery(query): ApiQuery<CallsQuery>,
) -> Result<Json<CallPage>, ApiError> {
    let id = id(&raw)?;
    if webhooks::get(&state.db, id).await?.is_none() {
        return Err(not_found(id));
    }
    let status = match query.status.as_deref() {
        None => None,
        Some(s @ ("PENDING" | "SUCCESS" | "FAILED")) => Some(s),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "status must be PENDING, SUCCESS or FAILED, got {other:?}"
            )));
        }
    };
    let limit = super::error::page_limit(query.limit, 50, 500)?;
    let before = super::error::id_cursor(query.cursor.as_deref())?;
    let items = webhooks::calls(&state.db, id, status, before, limit).await?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|c| c.id.to_string()))
        .flatten();
    Ok(Json(CallPage { items, next_cursor }))
}
