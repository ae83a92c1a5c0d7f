//! Shards and routing: the Raft group that owns a session, the nodes that
//! host it, and the path of a command to its leader.

mod batcher;
pub mod route;
mod router;
mod shard;
pub mod topology;

pub use router::{Router, RouterSettings, WriteError};
pub use shard::Shard;
pub use topology::Topology;
