use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::BasicNode;
use tracing::info;

use super::batcher::Batcher;
use crate::consensus::log_store::LogStore;
use crate::consensus::network::NoPeers;
use crate::consensus::state_machine::StateMachine;
use crate::consensus::{EventSink, Raft};
use crate::storage::flusher::Flusher;
use crate::storage::Store;

/// One Raft group and what it needs to report recovery.
pub struct Shard {
    pub id: u32,
    pub raft: Raft,
    pub batcher: Batcher,
    /// Index of the last log entry found at start; the shard has recovered
    /// once its state machine has applied up to here.
    recovered_index: Option<u64>,
}

/// Handles and settings shared by every shard of a node.
pub struct ShardContext {
    pub node_id: u64,
    pub node_addr: String,
    pub store: Store,
    pub flusher: Flusher,
    pub sink: Arc<dyn EventSink>,
    pub config: Arc<openraft::Config>,
}

impl Shard {
    /// Starts the Raft group of shard `id` and, on first start, makes this
    /// node its only member.
    pub async fn start(id: u32, context: &ShardContext) -> anyhow::Result<Shard> {
        let log_store = LogStore::new(id, context.store.clone(), context.flusher.clone());
        let recovered_index = log_store.last_index()?;
        let state_machine = StateMachine::new(id, context.store.clone(), context.sink.clone());

        let raft = Raft::new(
            context.node_id,
            context.config.clone(),
            NoPeers,
            log_store,
            state_machine,
        )
        .await?;

        if !raft.is_initialized().await? {
            let members = BTreeMap::from([(context.node_id, BasicNode::new(&context.node_addr))]);
            raft.initialize(members).await?;
            info!(
                shard = id,
                node = context.node_id,
                "shard initialized as a single-node group"
            );
        }

        let batcher = Batcher::start(id, raft.clone());
        Ok(Shard {
            id,
            raft,
            batcher,
            recovered_index,
        })
    }

    /// Waits until the state machine has applied every entry that was in the
    /// log at start, so reads see every acknowledged event.
    pub async fn wait_recovered(&self) -> anyhow::Result<()> {
        let Some(index) = self.recovered_index else {
            return Ok(());
        };
        self.raft
            .wait(None)
            .applied_index_at_least(Some(index), "replay of the log found at start")
            .await?;
        info!(shard = self.id, index, "shard recovered");
        Ok(())
    }

    /// Samples the shard's Raft state for the health gauges.
    pub fn health(&self) -> crate::metrics::ShardHealth {
        let metrics = self.raft.metrics().borrow().clone();
        crate::metrics::ShardHealth {
            shard: self.id,
            has_leader: metrics.current_leader.is_some(),
            applied_index: metrics.last_applied.map_or(0, |log_id| log_id.index),
        }
    }

    /// Returns whether the shard currently has a leader.
    pub fn has_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader.is_some()
    }
}
