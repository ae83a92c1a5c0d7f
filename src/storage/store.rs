use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use tracing::info;

use super::journal_sync::JournalFiles;

/// Failure of the embedded store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine error: {0}")]
    Engine(#[from] fjall::Error),
    #[error("stored value under key {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "data directory {path} is in use by another starcite process (it holds the lock on {lock}); \
         stop that process or choose another data directory"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("locking the data directory failed: {0}")]
    Lock(std::io::Error),
    #[error("fsync of the journal failed: {0}")]
    Sync(std::io::Error),
    #[error(
        "data directory {path} was created with {stored} shards but {requested} were requested; \
         the shard count is fixed when the data directory is created, so start with --shards {stored}"
    )]
    ShardCountMismatch {
        path: PathBuf,
        stored: u32,
        requested: u32,
    },
    #[error(
        "data directory {path} belongs to a cluster with {stored:?} but this node was started with \
         {requested:?}; members, shard count and replication factor are fixed when a node's data \
         directory is created, so start with the original NODE_NAME / CLUSTER_NODES (a new data directory is only for a new cluster)"
    )]
    LayoutMismatch {
        path: PathBuf,
        stored: String,
        requested: String,
    },
}

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Block cache shared by all partitions, in bytes.
    pub cache_bytes: u64,
    /// Upper bound of all memtables together, in bytes.
    pub write_buffer_bytes: u64,
}

/// Handles to the keyspace and its partitions. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub keyspace: Keyspace,
    /// Raft log entries of every shard, keyed by [`crate::storage::keys::log_entry`].
    pub raft_log: PartitionHandle,
    /// Votes, purge points and other per-shard Raft values.
    pub raft_meta: PartitionHandle,
    /// State machine bookkeeping: last applied log id and membership per shard.
    pub applied: PartitionHandle,
    /// Session headers.
    pub sessions: PartitionHandle,
    /// Events, keyed by session id and seq; each value is the event's JSON frame.
    pub events: PartitionHandle,
    /// Idempotency records: the seq and fingerprint of the first event sent with a key.
    pub idempotency: PartitionHandle,
    /// Per session, how far the Postgres archive and the trimming of local
    /// events have got ([`crate::session::retention::ArchiveMark`]). Only
    /// sessions with a trimmed or archived mark have an entry.
    pub archive_marks: PartitionHandle,
    /// Data directory settings that must not change after creation.
    pub settings: PartitionHandle,
    /// Exclusive lock on the data directory, held while the store is open.
    _lock: Arc<File>,
    /// Descriptors for fsyncing the journal outside fjall's lock.
    journals: Arc<Mutex<JournalFiles>>,
    /// Set by the first failed fsync. The kernel may drop dirty pages after
    /// a failed fsync, so a later one succeeding would prove nothing: every
    /// persist after the first failure fails too.
    sync_failed: Arc<AtomicBool>,
    /// Shard count the data directory was created with.
    shards: u32,
}

const SHARD_COUNT_KEY: &[u8] = b"shard_count";
const LAYOUT_KEY: &[u8] = b"cluster_layout";

impl Store {
    /// Opens (or creates) the store under `path`, recovering the journal.
    ///
    /// A data directory remembers the shard count it was created with, because
    /// sessions are placed on shards by hash; a different count is rejected.
    pub fn open(path: &Path, shards: u32, tuning: &StoreSettings) -> Result<Store, StoreError> {
        info!(path = %path.display(), "opening storage");
        let lock = lock_data_dir(path)?;

        // Journal writes stay in process memory until the flusher persists them,
        // so one write(2) and one fsync serve every append of a group commit.
        let keyspace = Config::new(path)
            .manual_journal_persist(true)
            .fsync_ms(None)
            .cache_size(tuning.cache_bytes)
            .max_write_buffer_size(tuning.write_buffer_bytes)
            // One background thread each instead of one per core: on a small
            // machine more of them took cores from request handling in
            // bursts (measured: 64-writer throughput rose from about 27,000
            // to about 32,000 appends/s on two cores).
            .flush_workers(1)
            .compaction_workers(1)
            .open()?;

        let open = |name: &str| keyspace.open_partition(name, PartitionCreateOptions::default());
        // Events and log entries are only read in key ranges, never looked up
        // one by one, so their partitions skip bloom filters. The engine keeps
        // those in memory outside the block cache, about 10 bits per key, so
        // they would grow with history.
        let open_range_only = |name: &str| {
            keyspace.open_partition(
                name,
                PartitionCreateOptions::default().bloom_filter_bits(None),
            )
        };
        let store = Store {
            raft_log: open_range_only("raft_log")?,
            raft_meta: open("raft_meta")?,
            applied: open("applied")?,
            sessions: open("sessions")?,
            events: open_range_only("events")?,
            idempotency: open("idempotency")?,
            archive_marks: open("archive_marks")?,
            settings: open("settings")?,
            keyspace,
            _lock: Arc::new(lock),
            journals: Arc::new(Mutex::new(JournalFiles::new(path))),
            sync_failed: Arc::new(AtomicBool::new(false)),
            shards,
        };

        store.check_shard_count(path, shards)?;
        Ok(store)
    }

    /// Shard count of this data directory.
    pub fn shard_count(&self) -> u32 {
        self.shards
    }

    /// Records `layout` (the cluster's members, shard count and replication
    /// factor) on first start and refuses a data directory created for
    /// another one: its Raft groups would have other members.
    pub fn check_layout(&self, path: &Path, layout: &str) -> Result<(), StoreError> {
        match self.settings.get(LAYOUT_KEY)? {
            Some(stored) if stored.as_ref() == layout.as_bytes() => Ok(()),
            Some(stored) => Err(StoreError::LayoutMismatch {
                path: path.to_path_buf(),
                stored: String::from_utf8_lossy(&stored).into_owned(),
                requested: layout.to_string(),
            }),
            None => {
                self.settings.insert(LAYOUT_KEY, layout.as_bytes())?;
                self.persist()
            }
        }
    }

    /// Returns whether `err` means the store is damaged, as opposed to in use
    /// or opened with the wrong settings.
    pub fn is_corruption(err: &StoreError) -> bool {
        matches!(
            err,
            StoreError::Engine(
                fjall::Error::JournalRecovery(_)
                    | fjall::Error::Decode(_)
                    | fjall::Error::Storage(_)
            ) | StoreError::Corrupt { .. }
        )
    }

    fn check_shard_count(&self, path: &Path, requested: u32) -> Result<(), StoreError> {
        match self.settings.get(SHARD_COUNT_KEY)? {
            Some(value) => {
                let bytes: [u8; 4] =
                    value.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                        key: "shard_count".into(),
                        reason: format!("expected 4 bytes, found {}", value.len()),
                    })?;
                let stored = u32::from_be_bytes(bytes);
                if stored != requested {
                    return Err(StoreError::ShardCountMismatch {
                        path: path.to_path_buf(),
                        stored,
                        requested,
                    });
                }
                Ok(())
            }
            None => {
                self.settings
                    .insert(SHARD_COUNT_KEY, requested.to_be_bytes())?;
                self.persist()
            }
        }
    }

    /// Makes every write so far durable: hands fjall's buffered journal bytes
    /// to the OS (a `write` under its lock), then fsyncs the journal files
    /// outside that lock, see [`JournalFiles`].
    pub fn persist(&self) -> Result<(), StoreError> {
        // NOTE: no test injects a failed fsync, so this branch has only been
        // checked by reading.
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(StoreError::Sync(std::io::Error::other(
                "an earlier fsync failed, so nothing since is known to be durable; restart the server",
            )));
        }

        let result = self.write_and_sync();
        if result.is_err() {
            self.sync_failed.store(true, Ordering::Release);
        }
        result
    }

    fn write_and_sync(&self) -> Result<(), StoreError> {
        self.keyspace.persist(PersistMode::Buffer)?;
        let mut journals = self
            .journals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        journals.sync_all().map_err(StoreError::Sync)
    }
}

/// Takes an exclusive lock on the data directory, so that two processes never
/// write the same journal: each would acknowledge appends the other then
/// overwrites. The OS releases the lock when the process exits, however it exits.
fn lock_data_dir(path: &Path) -> Result<File, StoreError> {
    fs::create_dir_all(path).map_err(StoreError::Lock)?;
    let lock_path = path.join("starcite.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(StoreError::Lock)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: path.to_path_buf(),
            lock: lock_path,
        }),
        Err(std::fs::TryLockError::Error(err)) => Err(StoreError::Lock(err)),
    }
}
