//! The API's error type and its JSON body, `{"error": {"code": "...", "message": "..."}}`
//! (DESIGN §5), plus extractors whose rejections use that body.
//!
//! Each variant documents its status. A 5xx body never carries internal details: the cause
//! is logged and the client gets a generic message.

use axum::{
    Json,
    extract::{
        FromRequest, FromRequestParts,
        rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::{
    ToSchema,
    openapi::{
        ContentBuilder, HeaderBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type,
        response::Response as Documented,
    },
};

use crate::{
    auth::AuthFailure,
    event_schemas::{Problem, SchemaViolation},
};

/// An error an API handler returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_request`: the input is malformed or a value is not acceptable.
    #[error("{0}")]
    BadRequest(String),
    /// 401 `unauthorized`, with `WWW-Authenticate: Bearer`: the credential is missing,
    /// malformed, expired, forged or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 `forbidden`: a valid credential that may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `not_found`: no route or no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 409 `conflict`: the resource is not in a state that allows the action.
    #[error("{0}")]
    Conflict(String),
    /// 413 `payload_too_large`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415 `unsupported_media_type`: a body in a content type the route does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422 with its own code: well-formed, but it conflicts with what was stored before
    /// (an Idempotency-Key reused with another body).
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// 400 `schema_violation`: an event's `data` breaks its type's schema; the body lists
    /// each problem's path (`data.amount`) in `error.details`.
    #[error("{0}")]
    SchemaViolation(#[from] SchemaViolation),
    /// 429 `too_many_requests` with `Retry-After`: this caller holds as much as it may
    /// (for instance its share of in-app streams).
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    /// 503 `unavailable`: a feature switched off by configuration.
    #[error("{0}")]
    Unavailable(String),
    /// 503 `overloaded` with `Retry-After`: this instance is at a capacity bound (concurrent
    /// imports, in-app streams); another instance or a later try may succeed.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u64,
    },
    /// 500 `internal`: anything the client cannot fix; logged, not shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The JSON error body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The `error` member of the error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `invalid_request`, `schema_violation`, `unauthorized`, `forbidden`,
    /// `not_found`, `conflict`, `payload_too_large`, `unsupported_media_type`,
    /// `idempotency_key_reused`, `template_invalid`, `too_many_requests`, `unavailable`,
    /// `overloaded`, `timeout`, `internal`, ...
    pub code: &'static str,
    /// For a person.
    pub message: String,
    /// Each problem with its path, when the error is about fields of the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<Problem>,
}

impl ErrorBody {
    /// A body with a machine-readable `code` and a message for a person.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
                details: Vec::new(),
            },
        }
    }
}

/// Declares the reusable error responses of the OpenAPI document (`components.responses`):
/// each is the JSON error body with an example of a real answer (built as the handler builds
/// it; `tests/api/docs.rs` compares some with what the app answers) and, where the answer
/// carries one, a header.
macro_rules! documented_errors {
    ($(
        $name:ident $([$header:literal: $header_doc:literal])? => $description:literal,
        example ($code:literal, $message:expr);
    )*) => {$(
        #[doc = $description]
        pub struct $name;

        impl<'r> utoipa::ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Documented>) {
                let example = serde_json::to_value(ErrorBody::new($code, $message))
                    .expect("an error body serializes");
                let json = ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Error")))
                    .example(Some(example))
                    .build();
                let response = ResponseBuilder::new()
                    .description($description)
                    .content("application/json", json);
                $(
                    let response = response.header(
                        $header,
                        HeaderBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                            .description(Some($header_doc))
                            .build(),
                    );
                )?
                (stringify!($name), response.build().into())
            }
        }
    )*};
}

documented_errors! {
    BadRequest => "`invalid_request`: the body, a path or query parameter (unknown query \
        parameters included) or a value is not acceptable; `message` says which. \
        `schema_violation`: `data` breaks the event type's schema; `details` names each path.",
        example ("invalid_request", "userId must be a positive integer, got 0");
    Unauthorized ["WWW-Authenticate": "`Bearer realm=\"herald\"`"] => "`unauthorized`: no \
        valid credential (missing, malformed, unknown, revoked, forged or expired).",
        example ("unauthorized", AuthFailure::Missing.message());
    Forbidden => "`forbidden`: a valid credential without the operation's scope, or a user \
        token on another user's route.",
        example ("forbidden", "this credential lacks the scope dlq:admin");
    NotFound => "`not_found`: there is no such resource.",
        example ("not_found", "no notification 0193a5f2-6c1e-7b3d-9a0f-3c5e8d2b1a47");
    Conflict => "`conflict`: the resource is not in a state that allows the action.",
        example ("conflict", "broadcast 0193a5f2-6c1e-7b3d-9a0f-3c5e8d2b1a47 has already finished (COMPLETED)");
    PayloadTooLarge => "`payload_too_large`: the body is over 256 KiB.",
        example ("payload_too_large", TOO_LARGE);
    UnsupportedMediaType => "`unsupported_media_type`: the body is not sent as \
        `Content-Type: application/json`.",
        example ("unsupported_media_type", JSON_ONLY);
    Unprocessable => "Well-formed but not acceptable as sent, with its own `code` \
        (`idempotency_key_reused`: an Idempotency-Key reused with another body).",
        example ("idempotency_key_reused", "this Idempotency-Key was used with a different request body");
    TooManyRequests ["Retry-After": "Seconds to wait before trying again."] =>
        "`too_many_requests`: this caller holds as much as it may (its share of in-app \
        streams).",
        example ("too_many_requests", "this user has as many open in-app streams as one user may");
    Unavailable ["Retry-After": "Seconds to wait (`overloaded`, `timeout`)."] =>
        "`overloaded` or `timeout`: the instance is at a capacity bound or the request took \
        too long; `unavailable`: a dependency needed to answer is down, or the feature is \
        switched off.",
        example ("overloaded", "too many requests in progress on this instance; retry shortly");
    Internal => "`internal`: something the client cannot fix (PostgreSQL unreachable, say). \
        The cause is in the server logs, never in the body.",
        example ("internal", INTERNAL);
}

/// The message of every 413.
const TOO_LARGE: &str = "the request body is too large";
/// The message of a body that is not JSON.
const JSON_ONLY: &str = "send the body as Content-Type: application/json";
/// The message of every 500.
const INTERNAL: &str = "internal error; see the server logs";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unprocessable { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, *code),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::SchemaViolation(violation) => {
                let mut body = ErrorBody::new("schema_violation", violation.to_string());
                body.error.details = violation.problems.clone();
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
            ApiError::Unauthorized(message) => {
                let body = ErrorBody::new("unauthorized", message.clone());
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, r#"Bearer realm="herald""#)],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => {
                let body = ErrorBody::new("too_many_requests", self.to_string());
                return retry_later(StatusCode::TOO_MANY_REQUESTS, *retry_after_secs, body);
            }
            ApiError::Overloaded {
                retry_after_secs, ..
            } => {
                let body = ErrorBody::new("overloaded", self.to_string());
                return retry_later(StatusCode::SERVICE_UNAVAILABLE, *retry_after_secs, body);
            }
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "request failed");
                let body = ErrorBody::new("internal", INTERNAL);
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
            }
        };
        (status, Json(ErrorBody::new(code, self.to_string()))).into_response()
    }
}

/// A refusal that tells the client when to come back.
pub(super) fn retry_later(status: StatusCode, retry_after_secs: u64, body: ErrorBody) -> Response {
    (
        status,
        [(header::RETRY_AFTER, retry_after_secs.to_string())],
        Json(body),
    )
        .into_response()
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::BytesRejection(bytes) => bytes.into(),
            JsonRejection::MissingJsonContentType(_) => json_only(),
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(TOO_LARGE.to_owned())
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

/// Refuses a body that is not declared `application/json`: a browser page on another
/// origin can send a form or `text/plain` without asking first (no CORS preflight), but
/// not JSON.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = media_type(headers).is_some_and(|v| {
        v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
    });
    if json { Ok(()) } else { Err(json_only()) }
}

/// The body's media type, lowercase and without parameters (`; charset=...`).
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
}

fn json_only() -> ApiError {
    ApiError::UnsupportedMediaType(JSON_ONLY.into())
}

/// `axum::Json` with rejections in the JSON error body.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Query` with rejections in the JSON error body.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `axum::extract::Path` with rejections in the JSON error body.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// A list's `limit`: `default` when absent, else 1 to `max`; a 400 that says so otherwise.
pub fn page_limit(raw: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    match raw.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "limit must be 1 to {max}, got {n}"
        ))),
    }
}

/// A list's `cursor` where it is the last id of the page before (ids are UUIDv7, so newest
/// first is id order).
pub fn id_cursor(raw: Option<&str>) -> Result<Option<uuid::Uuid>, ApiError> {
    raw.map(|c| {
        c.parse()
            .map_err(|_| ApiError::BadRequest(format!("{c:?} is not a cursor")))
    })
    .transpose()
}
