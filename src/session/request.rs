//! Validation of the JSON bodies of create and append.
//!
//! Bodies are parsed into `serde_json::Value` first and checked field by
//! field, so every error names the field and what it should be. `null` is
//! rejected for every field: omitting a field is the only way to leave it
//! out, so a client bug that sends `null` cannot silently drop a guard such
//! as `expected_seq`.

use serde_json::{Map, Number, Value};

use super::event::NewEvent;
use super::{id, InvalidRequest};

/// A validated `POST /v1/sessions` body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CreateSession {
    pub id: Option<String>,
    pub title: Option<String>,
    pub metadata: Map<String, Value>,
}

/// A validated `POST /v1/sessions/:id/append` body.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendEvent {
    pub event: NewEvent,
    pub expected_seq: Option<u64>,
}

const CREATE_FIELDS: &[&str] = &["id", "title", "metadata"];
const APPEND_FIELDS: &[&str] = &[
    "type",
    "payload",
    "actor",
    "source",
    "metadata",
    "refs",
    "idempotency_key",
    "expected_seq",
];

/// Validates a create body. `None` stands for an empty body.
pub fn parse_create(body: Option<Value>) -> Result<CreateSession, InvalidRequest> {
    let Some(body) = body else {
        return Ok(CreateSession::default());
    };
    let fields = into_object(body)?;
    reject_unknown_fields(&fields, CREATE_FIELDS)?;

    let id = optional_string(&fields, "id")?;
    if let Some(id) = &id {
        id::validate(id)?;
    }

    Ok(CreateSession {
        id,
        title: optional_any_string(&fields, "title")?,
        metadata: optional_object(&fields, "metadata")?.unwrap_or_default(),
    })
}

/// Validates an append body.
pub fn parse_append(body: Value) -> Result<AppendEvent, InvalidRequest> {
    let fields = into_object(body)?;
    reject_unknown_fields(&fields, APPEND_FIELDS)?;

    let event = NewEvent {
        event_type: required_string(&fields, "type")?,
        payload: required_object(&fields, "payload")?,
        actor: required_string(&fields, "actor")?,
        source: optional_string(&fields, "source")?,
        metadata: optional_object(&fields, "metadata")?.unwrap_or_default(),
        refs: parse_refs(&fields)?,
        idempotency_key: optional_string(&fields, "idempotency_key")?,
    };
    let expected_seq = match fields.get("expected_seq") {
        None => None,
        Some(value) => Some(parse_non_negative("expected_seq", value)?),
    };

    Ok(AppendEvent {
        event,
        expected_seq,
    })
}

/// Parses an integer field: a JSON integer from 0 to 2^64-1, or the same
/// number as a canonical decimal string (`"41"`, not `"+41"`, `"041"` or
/// `" 41"`).
pub fn parse_non_negative(field: &str, value: &Value) -> Result<u64, InvalidRequest> {
    let parsed = match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => parse_decimal(text),
        _ => None,
    };
    parsed.ok_or_else(|| {
        InvalidRequest::new(format!(
            "{field} must be a non-negative integer (or a decimal string such as \"41\"), got {}",
            describe(value)
        ))
    })
}

/// Parses a canonical decimal: `0`, or digits without a leading zero,
/// within u64. Also used for the tail's `cursor` query parameter.
pub fn parse_decimal(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical {
        text.parse().ok()
    } else {
        None
    }
}

fn parse_refs(fields: &Map<String, Value>) -> Result<Map<String, Value>, InvalidRequest> {
    let Some(mut refs) = optional_object(fields, "refs")? else {
        return Ok(Map::new());
    };

    for key in ["to_seq", "step"] {
        if let Some(value) = refs.get(key) {
            let field = format!("refs.{key}");
            let number = parse_non_negative(&field, value)?;
            refs.insert(key.to_string(), Value::Number(Number::from(number)));
        }
    }
    for key in ["request_id", "sequence_id"] {
        if let Some(value) = refs.get(key) {
            if !value.is_string() {
                return Err(InvalidRequest::new(format!(
                    "refs.{key} must be a string, got {}",
                    describe(value)
                )));
            }
        }
    }
    Ok(refs)
}

fn into_object(body: Value) -> Result<Map<String, Value>, InvalidRequest> {
    match body {
        Value::Object(fields) => Ok(fields),
        other => Err(InvalidRequest::new(format!(
            "request body must be a JSON object, got {}",
            describe(&other)
        ))),
    }
}

fn reject_unknown_fields(
    fields: &Map<String, Value>,
    allowed: &[&str],
) -> Result<(), InvalidRequest> {
    match fields.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(unknown) => Err(InvalidRequest::new(format!(
            "unknown field {unknown:?}; allowed fields are {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

fn required_string(fields: &Map<String, Value>, name: &str) -> Result<String, InvalidRequest> {
    optional_string(fields, name)?
        .ok_or_else(|| InvalidRequest::new(format!("{name} is required: a non-empty string")))
}

/// Reads a non-empty string, or `None` when the field is absent.
fn optional_string(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, InvalidRequest> {
    match optional_any_string(fields, name)? {
        Some(text) if text.is_empty() => {
            Err(InvalidRequest::new(format!("{name} must not be empty")))
        }
        other => Ok(other),
    }
}

/// Any string, empty included, or `None` when the field is absent.
fn optional_any_string(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, InvalidRequest> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(InvalidRequest::new(format!(
            "{name} must be a string, got {}",
            describe(other)
        ))),
    }
}

fn required_object(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Map<String, Value>, InvalidRequest> {
    optional_object(fields, name)?
        .ok_or_else(|| InvalidRequest::new(format!("{name} is required: a JSON object")))
}

fn optional_object(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Option<Map<String, Value>>, InvalidRequest> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map.clone())),
        Some(other) => Err(InvalidRequest::new(format!(
            "{name} must be a JSON object, got {}",
            describe(other)
        ))),
    }
}

/// Names the JSON type of a rejected value for an error message.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(flag) => format!("boolean {flag}"),
        Value::Number(number) => format!("number {number}"),
        Value::String(text) if text.chars().count() <= 40 => format!("string {text:?}"),
        Value::String(_) => "a string".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({"type": "t", "payload": {}, "actor": "agent:a"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut body = minimal();
        body[field] = value;
        body
    }

    #[test]
    fn append_accepts_minimal_body() {
        let parsed = parse_append(minimal()).expect("minimal body is valid");
        assert_eq!(parsed.event.event_type, "t");
        assert_eq!(parsed.expected_seq, None);
    }

    #[test]
    fn append_rejects_bad_required_fields() {
        for field in ["type", "actor"] {
            for bad in [json!(""), json!(null), json!(1), json!({})] {
                assert!(
                    parse_append(with(field, bad.clone())).is_err(),
                    "{field}={bad}"
                );
            }
        }
        for bad in [json!([]), json!("x"), json!(1), json!(null)] {
            assert!(
                parse_append(with("payload", bad.clone())).is_err(),
                "payload={bad}"
            );
        }
    }

    #[test]
    fn append_rejects_unknown_field() {
        let error = parse_append(with("expectedSeq", json!(1))).unwrap_err();
        assert!(error.0.contains("expectedSeq"), "message: {}", error.0);
    }

    #[test]
    fn integer_fields_accept_decimal_strings() {
        let parsed = parse_append(with("expected_seq", json!("41"))).unwrap();
        assert_eq!(parsed.expected_seq, Some(41));
        let parsed = parse_append(with("refs", json!({"to_seq": "7", "step": 2}))).unwrap();
        assert_eq!(parsed.event.refs["to_seq"], json!(7));
        assert_eq!(parsed.event.refs["step"], json!(2));
    }

    #[test]
    fn integer_fields_reject_other_forms() {
        let bad = [
            json!(-1),
            json!(3.5),
            json!(1e3),
            json!(null),
            json!("+3"),
            json!("03"),
            json!(" 2"),
            json!(""),
            json!("18446744073709551616"),
            json!(true),
        ];
        for value in bad {
            assert!(
                parse_append(with("expected_seq", value.clone())).is_err(),
                "{value}"
            );
        }
        let too_big: Value = serde_json::from_str("18446744073709551616").unwrap();
        assert!(parse_append(with("expected_seq", too_big)).is_err());
    }

    #[test]
    fn create_accepts_empty_and_full_bodies() {
        assert_eq!(parse_create(None).unwrap(), CreateSession::default());
        let parsed = parse_create(Some(
            json!({"id": "ses_1", "title": "T", "metadata": {"a": 1}}),
        ))
        .unwrap();
        assert_eq!(parsed.id.as_deref(), Some("ses_1"));
        assert_eq!(parsed.title.as_deref(), Some("T"));
    }

    #[test]
    fn create_rejects_bad_fields() {
        for body in [
            json!({"id": ""}),
            json!({"id": "a/b"}),
            json!({"id": 5}),
            json!({"title": 5}),
            json!({"metadata": []}),
            json!({"metadata": null}),
            json!({"name": "x"}),
            json!([]),
        ] {
            assert!(parse_create(Some(body.clone())).is_err(), "{body}");
        }
    }
}
