//! HTTP and WebSocket API: routes, request validation and error mapping.
//! No storage logic lives here; handlers call the router and the store.

mod body;
mod error;
mod health;
mod peer;
mod relay;
mod serve;
mod sessions;
mod state;
mod tail;

pub use error::ApiError;
pub use peer::router as peer_router;
pub use serve::serve;
pub use state::{ApiSettings, AppState};

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;

use crate::session::id;

/// Builds the application's routes.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/sessions", post(sessions::create))
        .route("/v1/sessions/{id}", get(sessions::get_header))
        .route("/v1/sessions/{id}/append", post(sessions::append))
        .route("/v1/sessions/{id}/tail", get(tail::upgrade))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// Takes the session id from the path and checks the id rule.
fn session_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(session_id) =
        path.map_err(|err| ApiError::InvalidRequest(format!("invalid session id in path: {err}")))?;
    id::validate(&session_id)
        .map_err(|err| ApiError::InvalidRequest(format!("invalid session {err}")))?;
    Ok(session_id)
}
