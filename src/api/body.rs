//! Reading JSON request bodies within the size limit.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde_json::Value;

use super::error::ApiError;

/// Bytes of an oversized body that are read and discarded so the client can
/// read the 413 on a connection that stays open. Past this the connection is
/// closed instead, so an oversized upload never costs more than this much
/// reading (and never any memory).
const DRAIN_BYTES: u64 = 16 * 1024 * 1024;

/// Reads a JSON body of at most `limit` bytes. Returns `None` for an empty body.
///
/// An oversized body is answered with 413. Up to [`DRAIN_BYTES`] of it are read
/// and dropped first, because a client that is still sending when the server
/// closes the connection sees a broken pipe instead of the 413. Larger bodies,
/// by declared length or as they stream, get the 413 with `Connection: close`.
pub async fn read_json(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<Option<Value>, ApiError> {
    if declared_length(headers).is_some_and(|length| length > limit + DRAIN_BYTES) {
        return Err(ApiError::PayloadTooLarge {
            limit,
            close_connection: true,
        });
    }

    let bytes = read_limited(body, limit).await?;
    if bytes.is_empty() {
        return Ok(None);
    }

    check_content_type(headers)?;
    let value = serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::InvalidRequest(format!("request body is not valid JSON: {err}"))
    })?;
    Ok(Some(value))
}

/// Collects the body while it fits in `limit`; past it, drains and discards.
async fn read_limited(mut body: Body, limit: u64) -> Result<BytesMut, ApiError> {
    let mut collected = BytesMut::new();
    let mut discarded: u64 = 0;

    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            ApiError::InvalidRequest(format!("failed to read the request body: {err}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };

        if discarded == 0 && (collected.len() + data.len()) as u64 <= limit {
            collected.extend_from_slice(&data);
            continue;
        }

        discarded += (collected.len() + data.len()) as u64;
        collected = BytesMut::new();
        if discarded > limit + DRAIN_BYTES {
            return Err(ApiError::PayloadTooLarge {
                limit,
                close_connection: true,
            });
        }
    }

    if discarded > 0 {
        return Err(ApiError::PayloadTooLarge {
            limit,
            close_connection: false,
        });
    }
    Ok(collected)
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Requires `application/json`, with or without parameters such as a charset.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else if content_type.is_empty() {
        Err(ApiError::InvalidRequest(
            "Content-Type header is missing; send the body as application/json".to_string(),
        ))
    } else {
        Err(ApiError::InvalidRequest(format!(
            "Content-Type {content_type:?} is not supported; send the body as application/json"
        )))
    }
}
