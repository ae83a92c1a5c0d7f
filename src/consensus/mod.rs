//! Raft through openraft: commands, the log store, the state machine and
//! the node-to-node network.
//!
//! Every shard is one Raft group. A single node is a cluster of one: the
//! same log store and state machine, with a network that has no peers.
//! In a cluster, Raft messages travel over HTTP between peer ports.

// openraft's storage traits fix the error type to its `StorageError`, which
// is large; the helpers here return it as is instead of boxing and unboxing.
#![allow(clippy::result_large_err)]

pub(crate) mod codec;
pub mod command;
pub mod log_store;
pub mod network;
pub mod snapshot;
pub mod state_machine;
pub mod transport;

pub use command::{AppendCommand, ArchivedCommand, Command, CreateCommand, Outcome};

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

    /// Reports events deleted from the local store of `shard` after they
    /// were archived: (session id, events deleted).
    fn trimmed(&self, _shard: u32, _sessions: &[(String, u64)]) {}

    /// Reports that a snapshot replaced the state of `shard`, which now
    /// contains `stored` events in the local store. `newest` contains the newest
    /// event of each session in it, which wakes open tails: those events
    /// were not applied one by one, so they must not count as new.
    fn replaced(&self, _shard: u32, _stored: u64, newest: Vec<AppliedEvent>) {
        if !newest.is_empty() {
            self.publish(newest);
        }
    }
}
