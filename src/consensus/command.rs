//! Commands that go through the Raft log, and their outcomes.
//!
//! A command carries every non-deterministic input (timestamps, generated
//! ids, the rendered event) chosen before it enters the log, so every
//! replica that applies it computes the same outcome. Commands are stored in
//! the log with postcard: add new variants and fields only at the end.

use serde::{Deserialize, Serialize};

use crate::session::canonical::Fingerprint;
use crate::session::header::SessionHeader;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    CreateSession(CreateCommand),
    Append(AppendCommand),
    /// Several commands for sessions of the same shard, applied in order as
    /// one log entry, so that a burst of requests costs one Raft round.
    Batch(Vec<Command>),
    /// The archive contains these sessions' events up to the given seqs.
    /// Every replica records that and trims its local store.
    Archived(ArchivedCommand),
}

impl Command {
    /// Rough size in memory and on the wire, in bytes: enough to bound
    /// caches and batches, not exact.
    pub fn approx_size(&self) -> usize {
        match self {
            Command::Append(append) => append.frame_tail.len() + 128,
            Command::CreateSession(create) => create.metadata.len() + 128,
            Command::Batch(commands) => commands.iter().map(Command::approx_size).sum(),
            Command::Archived(archived) => archived
                .sessions
                .iter()
                .map(|(id, _)| id.len() + 16)
                .sum::<usize>()
                .saturating_add(16),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateCommand {
    pub id: String,
    pub title: Option<String>,
    /// Metadata object as compact JSON text.
    pub metadata: String,
    /// Creation time, microseconds since the Unix epoch.
    pub now: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendCommand {
    pub session_id: String,
    /// The event's frame without `seq`, see [`crate::session::event::frame`].
    pub frame_tail: String,
    pub fingerprint: Fingerprint,
    pub idempotency_key: Option<String>,
    pub expected_seq: Option<u64>,
    /// Append time, microseconds since the Unix epoch.
    pub now: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedCommand {
    /// (session id, archived seq) of sessions of one shard.
    pub sessions: Vec<(String, u64)>,
    /// Newest events each session keeps in the local store. Carried in the
    /// command, so that every replica trims the same events whatever its
    /// own configuration sets.
    pub tail_keep: u64,
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Created(SessionHeader),
    SessionExists,
    SessionNotFound,
    Appended {
        seq: u64,
        last_seq: u64,
    },
    Deduped {
        seq: u64,
        last_seq: u64,
    },
    IdempotencyConflict {
        seq: u64,
    },
    ExpectedSeqConflict {
        expected: u64,
        current: u64,
    },
    /// The outcomes of a [`Command::Batch`], in order.
    Batch(Vec<Outcome>),
    /// A blank or membership entry, which has no client.
    Internal,
    /// The outcome of a [`Command::Archived`]: events deleted from the
    /// local store.
    Archived {
        trimmed: u64,
    },
}
