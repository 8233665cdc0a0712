//! The API's error type and its JSON body, `{"error": {"code": "...", "message": "..."}}`
//! (DESIGN §5).
//!
//! Each variant documents its status. A 5xx body never carries internal details: the cause
//! is logged with the request's span and the client gets a generic message.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;

/// An error an API handler returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: no route or no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 500: anything the client cannot fix; logged, not shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The JSON error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The `error` member of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
}

impl ErrorBody {
    /// A body with a machine-readable `code` and a message for a person.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::NotFound(message) => {
                (StatusCode::NOT_FOUND, ErrorBody::new("not_found", message))
            }
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorBody::new("internal", "internal error; see the server logs"),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}
