//! Session routes: create, read the header, append.

use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use tracing::{error, info};

use super::body::read_json;
use super::error::ApiError;
use super::session_id;
use super::state::AppState;
use crate::consensus::{AppendCommand, Command, CreateCommand, Outcome};
use crate::session::request::{parse_append, parse_create};
use crate::session::{id, timestamp};

type Created = (StatusCode, Json<Value>);

/// `POST /v1/sessions`
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Created, ApiError> {
    let body = read_json(&headers, body, state.settings().max_body_bytes).await?;
    let request = parse_create(body)?;
    state.ensure_available()?;

    let session_id = request.id.unwrap_or_else(id::generate);
    let command = Command::CreateSession(CreateCommand {
        id: session_id.clone(),
        title: request.title,
        metadata: Value::Object(request.metadata).to_string(),
        now: timestamp::now_micros(),
    });

    match state.router().write(command, &session_id).await? {
        Outcome::Created(header) => {
            info!(session_id = %session_id, "session created");
            Ok((StatusCode::CREATED, Json(header.to_json(&session_id))))
        }
        Outcome::SessionExists => Err(ApiError::SessionExists(session_id)),
        other => Err(unexpected(&session_id, &other)),
    }
}

/// `GET /v1/sessions/:id`
pub async fn get_header(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let session_id = session_id(path)?;
    state.ensure_available()?;

    match state.router().read_header(&session_id).await? {
        Some(header) => Ok(Json(header.to_json(&session_id))),
        None => Err(ApiError::SessionNotFound(session_id)),
    }
}

/// `POST /v1/sessions/:id/append`
pub async fn append(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Created, ApiError> {
    let received = Instant::now();
    let session_id = session_id(path)?;
    let body = read_json(&headers, body, state.settings().max_body_bytes)
        .await?
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "request body is required: a JSON object with type, payload and actor".into(),
            )
        })?;
    let request = parse_append(body)?;
    state.ensure_available()?;

    let now = timestamp::now_micros();
    let payload_bytes = request.event.payload_bytes();
    let idempotency_key = request.event.idempotency_key.clone();
    let command = Command::Append(AppendCommand {
        session_id: session_id.clone(),
        frame_tail: request.event.render_frame_tail(now),
        fingerprint: request.event.fingerprint(),
        idempotency_key: idempotency_key.clone(),
        expected_seq: request.expected_seq,
        now,
    });

    match state.router().write(command, &session_id).await? {
        Outcome::Appended { seq, last_seq } => {
            crate::metrics::record_append(payload_bytes, received.elapsed());
            Ok(appended(seq, last_seq, false))
        }
        Outcome::Deduped { seq, last_seq } => {
            crate::metrics::record_deduped();
            Ok(appended(seq, last_seq, true))
        }
        Outcome::SessionNotFound => Err(ApiError::SessionNotFound(session_id)),
        Outcome::ExpectedSeqConflict { expected, current } => {
            Err(ApiError::ExpectedSeqConflict { expected, current })
        }
        Outcome::IdempotencyConflict { seq } => Err(ApiError::IdempotencyConflict {
            key: idempotency_key.unwrap_or_default(),
            seq,
        }),
        other => Err(unexpected(&session_id, &other)),
    }
}

fn appended(seq: u64, last_seq: u64, deduped: bool) -> Created {
    let body = json!({"seq": seq, "last_seq": last_seq, "deduped": deduped});
    (StatusCode::CREATED, Json(body))
}

/// Reports an outcome that the command cannot produce as unavailable, rather
/// than guess at it, and logs it because it means a bug.
fn unexpected(session_id: &str, outcome: &Outcome) -> ApiError {
    error!(
        session_id,
        ?outcome,
        "state machine returned an unexpected outcome"
    );
    ApiError::Unavailable("the server returned an unexpected result; retry shortly".to_string())
}
