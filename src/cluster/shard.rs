use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use openraft::BasicNode;
use tracing::{info, warn};

use super::topology::Topology;
use crate::consensus::log_store::LogStore;
use crate::consensus::network::ShardNetwork;
use crate::consensus::state_machine::StateMachine;
use crate::consensus::transport::Peers;
use crate::consensus::{EventSink, Raft};
use crate::storage::flusher::Flusher;
use crate::storage::Store;

/// Raft group of one shard hosted on this node, with the index it must apply
/// before it reports recovery.
pub struct Shard {
    pub id: u32,
    pub raft: Raft,
    /// Index the state machine must reach before the shard serves reads. On a
    /// single node it is the end of the log found at start, because every
    /// entry there was committed. In a cluster it is the committed index found
    /// at start, because later entries may be uncommitted and replaced by the
    /// leader.
    recovered_index: Option<u64>,
}

/// Handles and settings shared by every shard of a node.
pub struct ShardContext {
    pub topology: Arc<Topology>,
    pub peers: Option<Peers>,
    pub store: Store,
    pub flusher: Flusher,
    pub sink: Arc<dyn EventSink>,
    pub config: Arc<openraft::Config>,
}

impl Shard {
    /// Starts the Raft group of shard `id` and, on first start, forms it
    /// from the shard's replicas.
    pub async fn start(id: u32, context: &ShardContext) -> anyhow::Result<Shard> {
        let log_store = LogStore::new(id, context.store.clone(), context.flusher.clone());
        let recovered_index = if context.topology.is_single() {
            log_store.last_index()?
        } else {
            log_store.committed_index()?
        };
        // Snapshot images are built from the live state only once Raft runs,
        // because the snapshot read openraft makes while starting needs only
        // the metadata.
        let running = Arc::new(AtomicBool::new(false));
        let state_machine = StateMachine::new(
            id,
            context.store.clone(),
            context.sink.clone(),
            running.clone(),
        );
        let network = ShardNetwork::new(id, context.peers.clone());

        let local = context.topology.local_id();
        let raft = Raft::new(
            local,
            context.config.clone(),
            network,
            log_store,
            state_machine,
        )
        .await?;
        running.store(true, std::sync::atomic::Ordering::Release);

        if !raft.is_initialized().await? {
            form_group(id, &raft, &context.topology).await?;
        }
        tokio::spawn(log_leader_changes(id, raft.clone()));

        Ok(Shard {
            id,
            raft,
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
            leader: metrics.current_leader,
            applied_index: metrics.last_applied.map_or(0, |log_id| log_id.index),
        }
    }

    /// Returns the shard's current leader in this replica's view.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }
}

/// Logs every change of the shard's leader in this replica's view until the
/// group stops.
async fn log_leader_changes(id: u32, raft: Raft) {
    let mut metrics = raft.metrics();
    let mut known = None;
    loop {
        let (leader, term) = {
            let current = metrics.borrow_and_update();
            (current.current_leader, current.current_term)
        };
        if leader != known {
            info!(shard = id, leader = ?leader, term, "shard leader changed");
            known = leader;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Time a replica that is not the preferred leader waits before it forms the
/// group itself, in case the preferred leader is down.
const FORMATION_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Initializes the shard's Raft group with its replicas as the first
/// membership. The preferred leader does this at once and wins the first
/// election, so leaders start out spread evenly. The other replicas join when
/// it contacts them. If it is down, they form the group themselves after
/// [`FORMATION_GRACE`] with the same member set, which openraft allows on any
/// number of replicas.
async fn form_group(id: u32, raft: &Raft, topology: &Topology) -> anyhow::Result<()> {
    let replicas = topology.replicas(id);
    let members: BTreeMap<u64, BasicNode> = replicas
        .iter()
        .map(|node| {
            let addr = topology.member(*node).map_or("", |m| m.addr.as_str());
            (*node, BasicNode::new(addr))
        })
        .collect();

    // TODO: a node restarted on an empty data directory also gets here and
    // forms or joins its groups with its Raft votes forgotten. It should ask
    // its peers first and stop with an error if the group already exists.
    let preferred = replicas.first() == Some(&topology.local_id());
    if preferred {
        raft.initialize(members).await?;
        info!(shard = id, node = topology.local_id(), replicas = ?replicas, "shard group formed");
        return Ok(());
    }

    let raft = raft.clone();
    let node = topology.local_id();
    tokio::spawn(async move {
        tokio::time::sleep(FORMATION_GRACE).await;
        match raft.is_initialized().await {
            Ok(true) => {}
            Ok(false) => match raft.initialize(members).await {
                Ok(()) => warn!(
                    shard = id,
                    node, "preferred leader silent; shard group formed here"
                ),
                Err(err) => warn!(shard = id, node, error = %err, "forming the shard group failed"),
            },
            Err(err) => warn!(shard = id, node, error = %err, "checking the shard group failed"),
        }
    });
    Ok(())
}
