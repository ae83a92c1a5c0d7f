//! Shards and routing: which Raft group owns a session, which nodes hold
//! it, and how a command reaches its leader.

mod batcher;
pub mod route;
mod router;
mod shard;
pub mod topology;

pub use router::{Router, RouterSettings, WriteError};
pub use shard::Shard;
pub use topology::Topology;
