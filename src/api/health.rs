//! Health and metrics endpoints.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::state::AppState;

/// Reports liveness: the process runs and serves HTTP.
pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Reports readiness: storage is recovered and every shard this node hosts has a leader.
pub async fn ready(State(state): State<AppState>) -> Response {
    match state.readiness_problem() {
        None => Json(json!({"status": "ok"})).into_response(),
        // Built here rather than through ApiError, which logs every 503:
        // readiness is polled, and a recovering node is not an error.
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "unavailable", "message": reason})),
        )
            .into_response(),
    }
}

/// Prometheus text exposition of every metric.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics() {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::Unavailable("metrics are not enabled in this process".to_string())
            .into_response(),
    }
}
