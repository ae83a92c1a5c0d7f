//! Raft through openraft: commands, the log store, the state machine and
//! the node-to-node network.
//!
//! Every shard is one Raft group. A single node is a cluster of one: the
//! same log store and state machine, with a network that has no peers.
//! In a cluster, Raft messages travel over HTTP between peer ports.

// openraft's storage traits fix the error type to its `StorageError`, which
// is large; the helpers here return it as is instead of boxing and unboxing.
#![allow(clippy::result_large_err)]

mod codec;
pub mod command;
pub mod log_store;
pub mod network;
pub mod snapshot;
pub mod state_machine;
pub mod transport;

pub use command::{AppendCommand, Command, CreateCommand, Outcome};

use std::io::Cursor;
use std::sync::Arc;

openraft::declare_raft_types!(
    /// Raft type configuration shared by every shard.
    pub TypeConfig:
        D = Arc<Command>,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of one shard.
pub type Raft = openraft::Raft<TypeConfig>;

/// An event the state machine has applied, handed to live tails.
#[derive(Debug, Clone)]
pub struct AppliedEvent {
    pub session_id: String,
    pub seq: u64,
    pub frame: String,
}

/// Receives the events of each applied batch, in seq order per session,
/// after they are readable from storage.
pub trait EventSink: Send + Sync + 'static {
    fn publish(&self, events: Vec<AppliedEvent>);
}
