use std::sync::Arc;

use anyhow::Context;
use openraft::SnapshotPolicy;
use tracing::{error, info};

use super::batcher::Batcher;
use super::route::{Refusal, ShardRoute};
use super::shard::{Shard, ShardContext};
use super::topology::Topology;
use crate::consensus::transport::Peers;
use crate::consensus::{Command, EventSink, Outcome};
use crate::session::header::SessionHeader;
use crate::storage::flusher::Flusher;
use crate::storage::Store;

/// Error of a request that failed or has an unknown outcome. The client may
/// retry it, with the same idempotency key for a write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Unavailable(String),
}

/// Settings of the Raft groups on this node.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// Log entries applied between two snapshots (after which the log is purged).
    pub snapshot_every: u64,
}

/// Maps sessions to shards and sends commands to their leaders.
pub struct Router {
    topology: Arc<Topology>,
    routes: Vec<Arc<ShardRoute>>,
    batchers: Vec<Batcher>,
}

impl Router {
    /// Starts every shard this node hosts and a route to every shard.
    pub async fn start(
        settings: &RouterSettings,
        topology: Arc<Topology>,
        peers: Option<Peers>,
        store: Store,
        flusher: Flusher,
        sink: Arc<dyn EventSink>,
    ) -> anyhow::Result<Router> {
        let context = ShardContext {
            topology: topology.clone(),
            peers: peers.clone(),
            store: store.clone(),
            flusher,
            sink,
            config: Arc::new(raft_config(settings, &topology)?),
        };

        let mut routes = Vec::with_capacity(topology.shards() as usize);
        let mut batchers = Vec::with_capacity(topology.shards() as usize);
        for id in 0..topology.shards() {
            let local = if topology.hosts(id) {
                let shard = Shard::start(id, &context)
                    .await
                    .with_context(|| format!("starting shard {id} failed"))?;
                Some(shard)
            } else {
                None
            };
            let route = Arc::new(ShardRoute::new(
                id,
                topology.local_id(),
                local,
                topology.replicas(id),
                peers.clone(),
                store.clone(),
            ));
            batchers.push(Batcher::start(route.clone()));
            routes.push(route);
        }
        let hosted = routes
            .iter()
            .filter(|route| route.local().is_some())
            .count();
        info!(
            shards = topology.shards(),
            hosted,
            node = topology.local_id(),
            "all shards started"
        );
        Ok(Router {
            topology,
            routes,
            batchers,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Returns the shard that owns `session_id`.
    pub fn shard_of(&self, session_id: &str) -> u32 {
        crate::storage::keys::shard_of(session_id, self.topology.shards())
    }

    /// Returns the route of shard `shard`, if it exists.
    pub fn route(&self, shard: u32) -> Option<&ShardRoute> {
        self.routes.get(shard as usize).map(|route| &**route)
    }

    fn route_of(&self, session_id: &str) -> &ShardRoute {
        &self.routes[self.shard_of(session_id) as usize]
    }

    /// Sends `command` through its shard's Raft log and returns the outcome
    /// once the entry is committed and applied.
    pub async fn write(&self, command: Command, session_id: &str) -> Result<Outcome, WriteError> {
        self.batchers[self.shard_of(session_id) as usize]
            .write(command)
            .await
    }

    /// Carries out a command forwarded by a peer if this node leads shard
    /// `shard`, batched with this node's own requests. See
    /// [`Batcher::write_local`].
    pub async fn write_local(&self, shard: u32, command: Command) -> Result<Outcome, Refusal> {
        match self.batchers.get(shard as usize) {
            Some(batcher) => batcher.write_local(command).await,
            None => Err(Refusal::Unavailable(format!(
                "shard {shard} does not exist"
            ))),
        }
    }

    /// Reads a session header through the shard leader, so that it includes
    /// every acknowledged write.
    pub async fn read_header(&self, session_id: &str) -> Result<Option<SessionHeader>, WriteError> {
        self.route_of(session_id).read_header(session_id).await
    }

    /// Returns whether this node leads the session's shard.
    pub fn leads_session(&self, session_id: &str) -> bool {
        self.route_of(session_id).leads()
    }

    /// Returns whether this node hosts a replica of the session's shard, so
    /// that tails can be served from its own store.
    pub fn hosts_session(&self, session_id: &str) -> bool {
        self.route_of(session_id).local().is_some()
    }

    /// Returns the ids of the nodes that host the session's shard, the leader
    /// first when known.
    pub fn replicas_of(&self, session_id: &str) -> Vec<u64> {
        let shard = self.shard_of(session_id);
        let mut replicas = self.topology.replicas(shard);
        if let Some(leader) = self.route_of(session_id).leader() {
            replicas.retain(|id| *id != leader);
            replicas.insert(0, leader);
        }
        replicas
    }

    fn hosted(&self) -> impl Iterator<Item = &Shard> {
        self.routes.iter().filter_map(|route| route.local())
    }

    /// Waits until every hosted shard has re-applied the log it found at start.
    pub async fn wait_recovered(&self) -> anyhow::Result<()> {
        for shard in self.hosted() {
            shard.wait_recovered().await?;
        }
        Ok(())
    }

    /// Returns whether every hosted shard has a leader.
    pub fn all_have_leaders(&self) -> bool {
        self.hosted().all(|shard| shard.leader().is_some())
    }

    /// Samples every hosted shard's Raft state for the health gauges.
    pub fn health(&self) -> Vec<crate::metrics::ShardHealth> {
        self.hosted().map(Shard::health).collect()
    }

    /// Stops every hosted Raft group, waiting for in-flight log writes.
    // TODO: hand leadership of the shards this node leads to another replica
    // first. openraft 0.9 has no leadership transfer, so each of those shards
    // costs an election.
    pub async fn shutdown(&self) {
        for shard in self.hosted() {
            if let Err(err) = shard.raft.shutdown().await {
                error!(shard = shard.id, error = %err, "shard did not stop cleanly");
            }
        }
        info!("all shards stopped");
    }
}

fn raft_config(settings: &RouterSettings, topology: &Topology) -> anyhow::Result<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "starcite".to_string(),
        // A follower calls an election once it has heard nothing for the
        // election timeout plus openraft's leader lease, which equals the
        // maximum timeout. With these values that is 2 to 3 s after a leader
        // dies. Longer values doubled the measured failover pause, and shorter
        // ones risk needless elections on a loaded machine.
        heartbeat_interval: 300,
        election_timeout_min: 1000,
        election_timeout_max: 1500,
        // Each call that sends a lagging follower a snapshot chunk (up to
        // snapshot_max_chunk_size) has this many ms to complete.
        install_snapshot_timeout: 10_000,
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        // Large batches let one fsync and one apply serve many appends.
        max_payload_entries: 4096,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
        // A cluster keeps more of the log after a snapshot, so a follower
        // that was briefly away catches up from the log instead of a snapshot.
        max_in_snapshot_log_to_keep: if topology.is_single() {
            1000
        } else {
            settings.snapshot_every
        },
        purge_batch_size: 1024,
        ..Default::default()
    };
    Ok(config.validate()?)
}
