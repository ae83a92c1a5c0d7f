//! The embedded storage engine (fjall) and its key layout.
//!
//! One fjall keyspace holds everything: the Raft logs of every shard, the
//! state machines' sessions, events and idempotency records. All partitions
//! share one journal, so a single fsync makes every shard's pending writes
//! durable at once; [`flusher`] builds group commit on that.

pub mod flusher;
mod journal_sync;
pub mod keys;
mod store;
pub mod watermark;

pub use store::{Store, StoreError, StoreSettings};
