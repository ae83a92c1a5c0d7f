use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::SnapshotPolicy;
use tracing::{error, info, warn};

use super::shard::{Shard, ShardContext};
use crate::consensus::{Command, EventSink, Outcome, Raft};
use crate::storage::flusher::Flusher;
use crate::storage::Store;

/// A write that could not be carried out; the client may retry it.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Unavailable(String),
}

/// Settings of the Raft groups on this node.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub shards: u32,
    pub node_id: u64,
    pub node_addr: String,
    /// Log entries applied between two snapshots (after which the log is purged).
    pub snapshot_every: u64,
}

/// Maps sessions to shards and sends commands to them.
pub struct Router {
    shards: Vec<Shard>,
}

impl Router {
    /// Starts every shard of this node.
    pub async fn start(
        settings: &RouterSettings,
        store: Store,
        flusher: Flusher,
        sink: Arc<dyn EventSink>,
    ) -> anyhow::Result<Router> {
        let context = ShardContext {
            node_id: settings.node_id,
            node_addr: settings.node_addr.clone(),
            store,
            flusher,
            sink,
            config: Arc::new(raft_config(settings)?),
        };

        let mut shards = Vec::with_capacity(settings.shards as usize);
        for id in 0..settings.shards {
            shards.push(Shard::start(id, &context).await?);
        }
        info!(shards = settings.shards, "all shards started");
        Ok(Router { shards })
    }

    /// Returns the shard that owns `session_id`.
    ///
    /// The hash (XXH3, seed 0) and the modulo are part of the on-disk format:
    /// changing either would move sessions away from the shard holding them.
    pub fn shard_for(&self, session_id: &str) -> &Shard {
        let hash = xxhash_rust::xxh3::xxh3_64(session_id.as_bytes());
        let index = (hash % self.shards.len() as u64) as usize;
        &self.shards[index]
    }

    /// Sends `command` through its shard's Raft log and returns the outcome
    /// once the entry is committed and applied.
    pub async fn write(&self, command: Command, session_id: &str) -> Result<Outcome, WriteError> {
        self.shard_for(session_id).batcher.write(command).await
    }

    /// Waits until every shard has re-applied the log it found at start.
    pub async fn wait_recovered(&self) -> anyhow::Result<()> {
        for shard in &self.shards {
            shard.wait_recovered().await?;
        }
        Ok(())
    }

    /// Returns whether every shard has a leader.
    pub fn all_have_leaders(&self) -> bool {
        self.shards.iter().all(Shard::has_leader)
    }

    /// Samples every shard's Raft state for the health gauges.
    pub fn health(&self) -> Vec<crate::metrics::ShardHealth> {
        self.shards.iter().map(Shard::health).collect()
    }

    /// Stops every Raft group, waiting for in-flight log writes.
    pub async fn shutdown(&self) {
        for shard in &self.shards {
            if let Err(err) = shard.raft.shutdown().await {
                error!(shard = shard.id, error = %err, "shard did not stop cleanly");
            }
        }
        info!("all shards stopped");
    }
}

/// Writes one entry through `raft` and maps openraft's errors to what a
/// client can act on.
pub(super) async fn client_write(
    shard: u32,
    raft: &Raft,
    command: Command,
) -> Result<Outcome, WriteError> {
    match raft.client_write(Arc::new(command)).await {
        Ok(response) => Ok(response.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
            warn!(shard, leader = ?forward.leader_id, "write reached a node that is not the leader");
            Err(WriteError::Unavailable(format!(
                "shard {shard} has no leader on this node; retry shortly"
            )))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(err))) => {
            error!(shard, error = %err, "unexpected membership error on a client write");
            Err(WriteError::Unavailable(format!(
                "shard {shard} is changing membership; retry shortly"
            )))
        }
        Err(RaftError::Fatal(fatal)) => {
            error!(shard, error = %fatal, "shard stopped");
            Err(WriteError::Unavailable(format!(
                "shard {shard} is stopped: {fatal}"
            )))
        }
    }
}

fn raft_config(settings: &RouterSettings) -> anyhow::Result<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "starcite".to_string(),
        heartbeat_interval: 500,
        election_timeout_min: 1500,
        election_timeout_max: 3000,
        // Large batches let one fsync and one apply serve many appends.
        max_payload_entries: 4096,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
        max_in_snapshot_log_to_keep: 1000,
        purge_batch_size: 1024,
        ..Default::default()
    };
    Ok(config.validate()?)
}
