//! A validated event and its wire form.
//!
//! The tail sends each event as one JSON text frame. The frame is rendered
//! once, before the append enters the Raft log, and stored as it will be
//! sent, so a replay copies bytes instead of re-encoding JSON. Only `seq` is
//! unknown until the state machine applies the append, so the stored command
//! carries the frame without it ([`NewEvent::render_frame_tail`]) and
//! [`frame`] puts the two together.

use serde::Serialize;
use serde_json::{Map, Value};

use super::canonical::{self, Fingerprint};
use super::timestamp;

/// An event that passed validation, not yet appended.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_type: String,
    pub payload: Map<String, Value>,
    pub actor: String,
    pub source: Option<String>,
    pub metadata: Map<String, Value>,
    pub refs: Map<String, Value>,
    pub idempotency_key: Option<String>,
}

#[derive(Serialize)]
struct FrameFields<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    payload: &'a Map<String, Value>,
    actor: &'a str,
    source: Option<&'a str>,
    metadata: &'a Map<String, Value>,
    refs: &'a Map<String, Value>,
    idempotency_key: Option<&'a str>,
    inserted_at: String,
}

impl NewEvent {
    /// Fingerprint of the fields that decide whether a retried append with the
    /// same idempotency key is the same event: type, payload, actor, source,
    /// metadata and refs, compared as JSON values.
    pub fn fingerprint(&self) -> Fingerprint {
        let event_type = Value::String(self.event_type.clone());
        let payload = Value::Object(self.payload.clone());
        let actor = Value::String(self.actor.clone());
        let source = self.source.clone().map_or(Value::Null, Value::String);
        let metadata = Value::Object(self.metadata.clone());
        let refs = Value::Object(self.refs.clone());
        canonical::fingerprint(&[&event_type, &payload, &actor, &source, &metadata, &refs])
    }

    /// Renders every frame field after `seq`, ending with the closing brace.
    pub fn render_frame_tail(&self, inserted_at_micros: u64) -> String {
        let fields = FrameFields {
            event_type: &self.event_type,
            payload: &self.payload,
            actor: &self.actor,
            source: self.source.as_deref(),
            metadata: &self.metadata,
            refs: &self.refs,
            idempotency_key: self.idempotency_key.as_deref(),
            inserted_at: timestamp::format_micros(inserted_at_micros),
        };
        // Serializing maps of JSON values and strings cannot fail.
        let object = serde_json::to_string(&fields).unwrap_or_else(|_| "{}".to_string());
        object[1..].to_string()
    }

    /// Size of the payload as compact JSON, in bytes, for the payload metric.
    pub fn payload_bytes(&self) -> usize {
        serde_json::to_string(&self.payload).map_or(0, |text| text.len())
    }
}

/// Builds the complete frame of an event: `seq` first, then the stored fields.
pub fn frame(seq: u64, tail: &str) -> String {
    let mut frame = String::with_capacity(tail.len() + 32);
    frame.push_str("{\"seq\":");
    frame.push_str(&seq.to_string());
    frame.push(',');
    frame.push_str(tail);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> NewEvent {
        NewEvent {
            event_type: "state".into(),
            payload: json!({"state": "running"}).as_object().unwrap().clone(),
            actor: "agent:a".into(),
            source: None,
            metadata: Map::new(),
            refs: Map::new(),
            idempotency_key: Some("k1".into()),
        }
    }

    #[test]
    fn frame_has_every_field() {
        let text = frame(7, &sample().render_frame_tail(1_770_562_800_000_000));
        let value: Value = serde_json::from_str(&text).expect("frame is valid JSON");
        assert_eq!(value["seq"], 7);
        assert_eq!(value["type"], "state");
        assert_eq!(value["payload"], json!({"state": "running"}));
        assert_eq!(value["actor"], "agent:a");
        assert_eq!(value["source"], Value::Null);
        assert_eq!(value["metadata"], json!({}));
        assert_eq!(value["refs"], json!({}));
        assert_eq!(value["idempotency_key"], "k1");
        assert_eq!(value["inserted_at"], "2026-02-08T15:00:00Z");
    }

    #[test]
    fn fingerprint_ignores_idempotency_key() {
        let mut other = sample();
        other.idempotency_key = None;
        assert_eq!(sample().fingerprint(), other.fingerprint());
    }

    #[test]
    fn fingerprint_sees_source() {
        let mut other = sample();
        other.source = Some("agent".into());
        assert_ne!(sample().fingerprint(), other.fingerprint());
    }
}
