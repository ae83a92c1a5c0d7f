//! Shards and routing: which Raft group owns a session, and how a command
//! reaches it.

mod batcher;
mod router;
mod shard;

pub use router::{Router, RouterSettings, WriteError};
pub use shard::Shard;
