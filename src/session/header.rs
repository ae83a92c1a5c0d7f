//! The session header: everything about a session except its events.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::timestamp;

/// The stored header of one session. Encoded with postcard on disk, so fields
/// may only be appended at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionHeader {
    pub title: Option<String>,
    /// The metadata object as compact JSON text.
    pub metadata: String,
    pub last_seq: u64,
    /// Microseconds since the Unix epoch.
    pub created_at: u64,
    /// Microseconds since the Unix epoch; the creation time or the time of the last append.
    pub updated_at: u64,
}

impl SessionHeader {
    /// Renders the header as the API shows it.
    pub fn to_json(&self, id: &str) -> Value {
        let metadata: Value = serde_json::from_str(&self.metadata).unwrap_or_else(|_| json!({}));
        json!({
            "id": id,
            "title": self.title,
            "metadata": metadata,
            "last_seq": self.last_seq,
            "created_at": timestamp::format_micros(self.created_at),
            "updated_at": timestamp::format_micros(self.updated_at),
        })
    }
}
