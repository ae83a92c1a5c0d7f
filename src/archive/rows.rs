//! Events as rows of the `events` table, and the frames rendered back from
//! those rows for tails that start below the local store's frontier.
//!
//! Postgres cannot store the character U+0000 in `text` or `jsonb`, while JSON
//! strings may contain it. An event with one is archived with U+FFFD in its
//! place in those columns, and its exact frame is kept in the `frame`
//! column, which cold reads prefer. Every other event has `frame` NULL and
//! is rendered from its columns.

use serde::Serialize;
use serde_json::Value;

use crate::session::timestamp;

/// One event as archived.
pub struct Row {
    pub seq: i64,
    pub kind: String,
    pub payload: Value,
    pub actor: String,
    pub source: Option<String>,
    pub metadata: Value,
    pub refs: Value,
    pub idempotency_key: Option<String>,
    pub inserted_at: String,
    /// The stored frame, only for events that had U+0000 replaced.
    pub frame: Option<String>,
    pub bytes: usize,
}

impl Row {
    /// Splits a stored frame into columns. Fails only on a frame that is not
    /// JSON, which means the local store is damaged.
    pub fn from_frame(seq: u64, raw: &[u8]) -> Result<Row, serde_json::Error> {
        let mut frame: Value = serde_json::from_slice(raw)?;
        // serde_json always writes U+0000 as this escape.
        let has_nul = raw.windows(6).any(|window| window == b"\\u0000");
        if has_nul {
            replace_nul(&mut frame);
        }

        let mut take = |name: &str| frame.get_mut(name).map(Value::take).unwrap_or(Value::Null);
        let text = |value: Value| match value {
            Value::String(text) => Some(text),
            _ => None,
        };
        Ok(Row {
            seq: seq as i64,
            kind: text(take("type")).unwrap_or_default(),
            payload: take("payload"),
            actor: text(take("actor")).unwrap_or_default(),
            source: text(take("source")),
            metadata: take("metadata"),
            refs: take("refs"),
            idempotency_key: text(take("idempotency_key")),
            inserted_at: text(take("inserted_at")).unwrap_or_default(),
            frame: has_nul.then(|| String::from_utf8_lossy(raw).into_owned()),
            bytes: raw.len(),
        })
    }
}

/// Replaces U+0000 in every string and object key of `value` with U+FFFD.
pub fn replace_nul(value: &mut Value) {
    match value {
        Value::String(text) => {
            if text.contains('\0') {
                *text = text.replace('\0', "\u{FFFD}");
            }
        }
        Value::Array(items) => items.iter_mut().for_each(replace_nul),
        Value::Object(fields) => {
            if fields.keys().any(|key| key.contains('\0')) {
                let original = std::mem::take(fields);
                for (key, field) in original {
                    fields.insert(key.replace('\0', "\u{FFFD}"), field);
                }
            }
            fields.values_mut().for_each(replace_nul);
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Replaces U+0000 in a text column's value with U+FFFD.
pub fn clean_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// An archived event as a tail frame: the same fields in the same order as
/// [`crate::session::event::frame`] writes them. `J` is the type of the JSON
/// columns, a parsed value or raw JSON text.
#[derive(Serialize)]
pub struct ArchivedFrame<'a, J: Serialize + ?Sized> {
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub payload: &'a J,
    pub actor: &'a str,
    pub source: Option<&'a str>,
    pub metadata: &'a J,
    pub refs: &'a J,
    pub idempotency_key: Option<&'a str>,
    pub inserted_at: String,
}

impl<J: Serialize + ?Sized> ArchivedFrame<'_, J> {
    /// Renders the frame as compact JSON.
    pub fn render(&self) -> String {
        // Serializing strings and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Formats an archived `inserted_at` the way frames show it.
pub fn format_inserted_at(micros: i64) -> String {
    timestamp::format_micros(u64::try_from(micros).unwrap_or(0))
}

/// Inserts `rows` in one statement; rows already archived are skipped.
/// Returns how many were new.
pub async fn insert_events(
    transaction: &deadpool_postgres::Transaction<'_>,
    session_id: &str,
    rows: &[Row],
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }

    // One array per column, unnested into rows by Postgres.
    let sessions: Vec<&str> = rows.iter().map(|_| session_id).collect();
    let seqs: Vec<i64> = rows.iter().map(|row| row.seq).collect();
    let kinds: Vec<&str> = rows.iter().map(|row| row.kind.as_str()).collect();
    let payloads: Vec<&Value> = rows.iter().map(|row| &row.payload).collect();
    let actors: Vec<&str> = rows.iter().map(|row| row.actor.as_str()).collect();
    let sources: Vec<Option<&str>> = rows.iter().map(|row| row.source.as_deref()).collect();
    let metadata: Vec<&Value> = rows.iter().map(|row| &row.metadata).collect();
    let refs: Vec<&Value> = rows.iter().map(|row| &row.refs).collect();
    let keys: Vec<Option<&str>> = rows
        .iter()
        .map(|row| row.idempotency_key.as_deref())
        .collect();
    let inserted_at: Vec<&str> = rows.iter().map(|row| row.inserted_at.as_str()).collect();
    let frames: Vec<Option<&str>> = rows.iter().map(|row| row.frame.as_deref()).collect();

    transaction
        .execute(
            "INSERT INTO events (session_id, seq, type, payload, actor, source, metadata, refs,
                                 idempotency_key, inserted_at, frame)
             SELECT s, q, t, p, a, so, m, r, k, i::timestamptz, f
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[],
                         $6::text[], $7::jsonb[], $8::jsonb[], $9::text[], $10::text[],
                         $11::text[])
                  AS u(s, q, t, p, a, so, m, r, k, i, f)
             ON CONFLICT (session_id, seq) DO NOTHING",
            &[
                &sessions,
                &seqs,
                &kinds,
                &payloads,
                &actors,
                &sources,
                &metadata,
                &refs,
                &keys,
                &inserted_at,
                &frames,
            ],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::event::{frame, NewEvent};
    use serde_json::{json, Map};

    fn stored_frame(seq: u64, source: Option<&str>, payload: Value) -> String {
        let event = NewEvent {
            event_type: "state".into(),
            payload: payload.as_object().unwrap().clone(),
            actor: "agent:a".into(),
            source: source.map(str::to_string),
            metadata: json!({"m": [1, 2.5]}).as_object().unwrap().clone(),
            refs: Map::new(),
            idempotency_key: Some("k1".into()),
        };
        frame(seq, &event.render_frame_tail(1_770_562_800_123_456))
    }

    fn archived(row: &Row) -> String {
        ArchivedFrame {
            seq: row.seq as u64,
            kind: &row.kind,
            payload: &row.payload,
            actor: &row.actor,
            source: row.source.as_deref(),
            metadata: &row.metadata,
            refs: &row.refs,
            idempotency_key: row.idempotency_key.as_deref(),
            inserted_at: format_inserted_at(1_770_562_800_123_456),
        }
        .render()
    }

    #[test]
    fn archived_frame_equals_the_stored_frame() {
        for source in [None, Some("agent")] {
            let stored = stored_frame(3, source, json!({"text": "hi", "n": 1}));
            let row = Row::from_frame(3, stored.as_bytes()).unwrap();
            assert_eq!(row.frame, None, "no U+0000, so no stored frame");
            assert_eq!(row.inserted_at, "2026-02-08T15:00:00.123456Z");
            assert_eq!(
                archived(&row),
                stored,
                "same fields, same order, same bytes"
            );
        }
    }

    #[test]
    fn nul_replaced_and_frame_kept() {
        let stored = stored_frame(4, Some("a\u{0}b"), json!({"k\u{0}": ["x\u{0}"]}));
        let row = Row::from_frame(4, stored.as_bytes()).unwrap();
        assert_eq!(row.frame.as_deref(), Some(stored.as_str()));
        assert_eq!(row.source.as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(row.payload, json!({"k\u{FFFD}": ["x\u{FFFD}"]}));
    }
}
