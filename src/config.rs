//! Settings: every one is a command-line flag and an environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Starcite: ordered, durable session event logs with live WebSocket tails.
#[derive(Debug, Clone, Parser)]
#[command(name = "starcite", version, about)]
pub struct Settings {
    /// Address to listen on. The default keeps the server private to this
    /// machine; use 0.0.0.0 behind a gateway or in a container.
    #[arg(long, env = "STARCITE_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// TCP port for HTTP and WebSocket; 0 picks a free port (logged at start).
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Data directory: the Raft logs and the event store. Created if missing.
    #[arg(long, env = "STARCITE_RAFT_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// This node's name in CLUSTER_NODES. Required when CLUSTER_NODES is set.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Every member of the cluster as `name=host:port,...`, where the
    /// address is the member's peer port (Raft messages and forwarded
    /// requests). This node listens on its own entry's port, on --host.
    /// Unset: a single node with no peers.
    #[arg(long, env = "CLUSTER_NODES")]
    pub cluster_nodes: Option<String>,

    /// Nodes that hold a replica of each shard (all nodes when fewer), 1 to
    /// 3. An append is acknowledged once a majority of them has it on disk.
    // TODO: five or more replicas need a request id that the state machine
    // deduplicates: with them, an entry the leader dropped after an election
    // can still be committed from another replica, so retrying a write that
    // openraft reported as not written could apply it twice.
    #[arg(long, env = "STARCITE_REPLICATION_FACTOR", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=3))]
    pub replication_factor: u32,

    /// Number of shards (Raft groups). Fixed when the data directory is created.
    #[arg(long, env = "STARCITE_SHARDS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub shards: u32,

    /// Largest accepted request body, in bytes; larger bodies get 413. Each
    /// tail frame is at most this plus about 200 bytes.
    #[arg(long, env = "STARCITE_MAX_BODY_BYTES", default_value_t = 1_048_576,
          value_parser = clap::value_parser!(u64).range(1024..=67_108_864))]
    pub max_body_bytes: u64,

    /// Interval between WebSocket pings to each tail, in milliseconds. A tail
    /// that sends nothing (not even a pong) for two intervals is closed.
    #[arg(long, env = "STARCITE_TAIL_PING_INTERVAL_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub tail_ping_interval_ms: u64,

    /// How long a write to a tail socket may make no progress before the
    /// socket is dropped, in milliseconds.
    #[arg(long, env = "STARCITE_TAIL_SEND_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub tail_send_timeout_ms: u64,

    /// Live events buffered per tailed session; a tail further behind is
    /// served from storage instead.
    #[arg(long, env = "STARCITE_TAIL_BUFFER_EVENTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub tail_buffer_events: u64,

    /// Storage block cache, in MiB.
    #[arg(long, env = "STARCITE_STORAGE_CACHE_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub storage_cache_mb: u64,

    /// Storage write buffer (all memtables together), in MiB.
    #[arg(long, env = "STARCITE_STORAGE_WRITE_BUFFER_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub storage_write_buffer_mb: u64,

    /// Log entries applied per shard between two snapshots; a snapshot lets
    /// the shard drop the log entries it covers.
    #[arg(long, env = "STARCITE_SNAPSHOT_EVERY", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub snapshot_every: u64,

    /// Copies committed events into Postgres in the background. Needs
    /// DATABASE_URL (or STARCITE_POSTGRES_URL). Off: nothing touches Postgres.
    #[arg(long, env = "STARCITE_ARCHIVER_ENABLED", default_value_t = false)]
    pub archiver_enabled: bool,

    /// Postgres connection URL for the archive, e.g.
    /// postgres://user:password@127.0.0.1:5432/starcite.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Interval between two archive flushes, in milliseconds.
    #[arg(long, env = "STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub archive_flush_interval_ms: u64,

    /// Events per session written to Postgres in one transaction at most.
    #[arg(long, env = "STARCITE_ARCHIVE_BATCH_SIZE", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub archive_batch_size: u64,

    /// Newest events of each session kept in the local store once archived.
    /// Older ones are deleted there and read back from Postgres by tails
    /// that start before them. Applies only with the archive on. The minimum
    /// is 1, because a replica that installs a snapshot wakes its open
    /// tails with each session's newest local event.
    #[arg(long, env = "STARCITE_TAIL_KEEP", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub tail_keep: u64,

    /// Postgres connections of the archive at most (archiver and cold reads).
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub db_pool_size: u64,

    /// How long shutdown waits for tails to close and appends to finish, in milliseconds.
    #[arg(long, env = "STARCITE_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
}

impl Settings {
    /// Returns the archive settings when the archiver is on, or why it cannot run.
    pub fn archive(&self) -> Result<Option<crate::archive::ArchiveSettings>, String> {
        if !self.archiver_enabled {
            return Ok(None);
        }
        let url = self
            .database_url
            .clone()
            .or_else(|| std::env::var("STARCITE_POSTGRES_URL").ok())
            .filter(|url| !url.trim().is_empty())
            .ok_or_else(|| {
                "STARCITE_ARCHIVER_ENABLED is set but neither DATABASE_URL nor STARCITE_POSTGRES_URL is; \
                 set one to the Postgres URL"
                    .to_string()
            })?;
        Ok(Some(crate::archive::ArchiveSettings {
            database_url: url,
            flush_interval: Duration::from_millis(self.archive_flush_interval_ms),
            batch_size: self.archive_batch_size as usize,
            pool_size: self.db_pool_size as usize,
            tail_keep: self.tail_keep,
        }))
    }

    /// Returns the cluster as configured: the embedded single node unless
    /// CLUSTER_NODES is set.
    pub fn topology(&self) -> Result<crate::cluster::Topology, String> {
        use crate::cluster::Topology;
        let Some(nodes) = self
            .cluster_nodes
            .as_deref()
            .filter(|n| !n.trim().is_empty())
        else {
            if self.node_name.is_some() {
                tracing::warn!(
                    "NODE_NAME is set but CLUSTER_NODES is not; running as a single node"
                );
            }
            return Ok(Topology::single(self.shards));
        };
        let name = self.node_name.as_deref().ok_or_else(|| {
            "CLUSTER_NODES is set but NODE_NAME is not; set NODE_NAME to this node's name in the list"
                .to_string()
        })?;
        Topology::parse(name, nodes, self.shards, self.replication_factor)
            .map_err(|err| err.to_string())
    }

    pub fn tail_ping_interval(&self) -> Duration {
        Duration::from_millis(self.tail_ping_interval_ms)
    }

    pub fn tail_send_timeout(&self) -> Duration {
        Duration::from_millis(self.tail_send_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}
