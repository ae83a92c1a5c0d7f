//! The one error type handlers return, and its mapping to status and code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::warn;

use crate::cluster::WriteError;
use crate::session::InvalidRequest;

/// Everything a request can fail with. The mapping in [`ApiError::status_and_code`]
/// has no wildcard arm, so a new variant must decide what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("session {0:?} was not found")]
    SessionNotFound(String),
    #[error("session {0:?} already exists")]
    SessionExists(String),
    #[error("Expected seq {expected}, current seq is {current}")]
    ExpectedSeqConflict { expected: u64, current: u64 },
    #[error(
        "idempotency_key {key:?} was already used in this session for a different event (seq {seq}); \
         use a new key for a new event"
    )]
    IdempotencyConflict { key: String, seq: u64 },
    #[error("request body is larger than the limit of {limit} bytes; send a smaller event")]
    PayloadTooLarge {
        limit: u64,
        /// Whether the rest of the body was left unread, so the connection
        /// must close after the response.
        close_connection: bool,
    },
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::RouteNotFound { .. } => (StatusCode::NOT_FOUND, "invalid_request"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "invalid_request")
            }
            ApiError::SessionNotFound(_) => (StatusCode::NOT_FOUND, "session_not_found"),
            ApiError::SessionExists(_) => (StatusCode::CONFLICT, "session_exists"),
            ApiError::ExpectedSeqConflict { .. } => (StatusCode::CONFLICT, "expected_seq_conflict"),
            ApiError::IdempotencyConflict { .. } => (StatusCode::CONFLICT, "idempotency_conflict"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl From<InvalidRequest> for ApiError {
    fn from(err: InvalidRequest) -> Self {
        ApiError::InvalidRequest(err.0)
    }
}

impl From<WriteError> for ApiError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Unavailable(message) => ApiError::Unavailable(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            warn!(error = %self, "request failed: unavailable");
        }
        let close = matches!(
            self,
            ApiError::PayloadTooLarge {
                close_connection: true,
                ..
            }
        );
        let body = json!({"error": code, "message": self.to_string()});
        let mut response = (status, Json(body)).into_response();
        if close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
