//! Reading JSON request bodies within the size limit.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use super::error::ApiError;

/// Reads a JSON body of at most `limit` bytes. Returns `None` for an empty body.
///
/// A declared `Content-Length` over the limit is rejected before anything is
/// read; a body that streams past the limit is cut off there, so an oversized
/// request never sits in memory whole.
pub async fn read_json(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<Option<Value>, ApiError> {
    if declared_length(headers).is_some_and(|length| length > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }

    let bytes = match Limited::new(body, limit as usize).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::PayloadTooLarge { limit })
        }
        Err(err) => {
            return Err(ApiError::InvalidRequest(format!(
                "failed to read the request body: {err}"
            )))
        }
    };
    if bytes.is_empty() {
        return Ok(None);
    }

    check_content_type(headers)?;
    let value = serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::InvalidRequest(format!("request body is not valid JSON: {err}"))
    })?;
    Ok(Some(value))
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
