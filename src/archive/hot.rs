//! The size of the hot tier: events each shard keeps in the local store.
//!
//! Counted from one scan of the store at start, then kept up to date by the
//! state machines (applied events add, trims subtract, a snapshot install
//! resets its shard), so the gauge costs no scan after start.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tracing::{error, warn};

use crate::consensus::codec::decode;
use crate::consensus::state_machine::read_mark;
use crate::session::header::SessionHeader;
use crate::storage::{keys, Store};

/// Events in the local store, per shard.
#[derive(Clone)]
pub struct HotEvents(Arc<Vec<AtomicI64>>);

impl HotEvents {
    pub fn new(shards: u32) -> HotEvents {
        HotEvents(Arc::new((0..shards).map(|_| AtomicI64::new(0)).collect()))
    }

    pub fn shard_count(&self) -> u32 {
        self.0.len() as u32
    }

    pub fn add(&self, shard: u32, events: i64) {
        if let Some(count) = self.0.get(shard as usize) {
            count.fetch_add(events, Ordering::Relaxed);
        }
    }

    pub fn set(&self, shard: u32, events: i64) {
        if let Some(count) = self.0.get(shard as usize) {
            count.store(events, Ordering::Relaxed);
        }
    }

    /// Events in the local store over every shard.
    pub fn total(&self) -> u64 {
        let sum: i64 = self
            .0
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum();
        sum.max(0) as u64
    }
}

/// Result of one scan of the store: every session with its last seq, and
/// the events each shard keeps locally.
pub struct StoredSessions {
    pub sessions: Vec<(String, u64)>,
    pub hot: HotEvents,
}

/// Scans every session header and archive mark. Runs before the Raft groups
/// start, so nothing is applied meanwhile and the counts are exact.
pub fn scan(store: &Store) -> StoredSessions {
    let shards = store.shard_count();
    let hot = HotEvents::new(shards);
    let mut sessions = Vec::new();
    for item in store.sessions.iter() {
        let (key, value) = match item {
            Ok(pair) => pair,
            Err(err) => {
                error!(
                    error = %err,
                    scanned = sessions.len(),
                    "scanning stored sessions failed; the sessions not reached are archived only once \
                     they get new events, and the hot tier gauge counts only those scanned"
                );
                break;
            }
        };
        let id = String::from_utf8_lossy(&key).into_owned();
        // The codec logs a value it cannot decode.
        let Ok(header) = decode::<SessionHeader>(&value, "session header") else {
            continue;
        };
        let trimmed = match read_mark(store, &id) {
            Ok(mark) => mark.unwrap_or_default().trimmed_through,
            Err(err) => {
                warn!(session_id = %id, error = %err, "reading the archive mark failed; counting every event of the session as local");
                0
            }
        };
        hot.add(
            keys::shard_of(&id, shards),
            header.last_seq.saturating_sub(trimmed) as i64,
        );
        sessions.push((id, header.last_seq));
    }
    StoredSessions { sessions, hot }
}
