//! The Raft log of one shard, in the shared fjall keyspace.
//!
//! Appends are written to the journal and handed to the group-commit
//! [`Flusher`]; openraft learns that they are durable through its callback,
//! and only then counts them towards commit. Recent entries are also kept in
//! memory, because openraft reads every committed entry back to apply it and
//! decoding it from disk again would double the work of an append.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, StorageError, Vote,
};
use tracing::debug;

use super::codec::{decode, encode, io_error};
use super::TypeConfig;
use crate::storage::flusher::Flusher;
use crate::storage::{keys, Store};

const VOTE: u8 = b'v';
const PURGED: u8 = b'p';
const COMMITTED: u8 = b'c';

/// Bytes of entries kept in memory per shard before the oldest are dropped.
/// Entries are read back right after they are appended (to apply them), so a
/// small cache serves almost every read.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// Log store of one shard. Clones share the cache and are used as the log
/// reader of replication tasks.
#[derive(Clone)]
pub struct LogStore {
    shard: u32,
    store: Store,
    flusher: Flusher,
    cache: Arc<Mutex<EntryCache>>,
}

/// Most recent entries by index, bounded by an estimate of their size.
#[derive(Default)]
struct EntryCache {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    bytes: usize,
}

impl EntryCache {
    fn insert(&mut self, entry: Entry<TypeConfig>) {
        self.bytes += entry_size(&entry);
        if let Some(old) = self.entries.insert(entry.log_id.index, entry) {
            self.bytes -= entry_size(&old);
        }
        while self.bytes > CACHE_BYTES {
            let Some((_, oldest)) = self.entries.pop_first() else {
                break;
            };
            self.bytes -= entry_size(&oldest);
        }
    }

    fn remove_from(&mut self, index: u64) {
        let removed = self.entries.split_off(&index);
        self.bytes -= removed.values().map(entry_size).sum::<usize>();
    }

    fn remove_up_to(&mut self, index: u64) {
        let kept = self.entries.split_off(&(index + 1));
        let removed = std::mem::replace(&mut self.entries, kept);
        self.bytes -= removed.values().map(entry_size).sum::<usize>();
    }

    /// Returns the entries of `start..end` if the cache contains all of them.
    fn get_range(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        if start >= end {
            return Some(Vec::new());
        }
        let entries: Vec<_> = self
            .entries
            .range(start..end)
            .map(|(_, entry)| entry.clone())
            .collect();
        let complete = entries.len() as u64 == end - start;
        complete.then_some(entries)
    }
}

fn entry_size(entry: &Entry<TypeConfig>) -> usize {
    let payload = match &entry.payload {
        EntryPayload::Normal(command) => command.approx_size(),
        _ => 0,
    };
    payload + 128
}

impl LogStore {
    pub fn new(shard: u32, store: Store, flusher: Flusher) -> LogStore {
        LogStore {
            shard,
            store,
            flusher,
            cache: Arc::new(Mutex::new(EntryCache::default())),
        }
    }

    /// Index of the last entry in the log, or of the purge point when the log is empty.
    pub fn last_index(&self) -> Result<Option<u64>, StorageError<u64>> {
        recovered_last_index(&self.store, self.shard)
    }

    /// Index of the last entry known to be committed when it was last recorded.
    pub fn committed_index(&self) -> Result<Option<u64>, StorageError<u64>> {
        let committed = self
            .read_value::<Option<LogId<u64>>>(COMMITTED, "committed log id")?
            .flatten();
        Ok(committed.map(|log_id| log_id.index))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read_value<T: serde::de::DeserializeOwned>(
        &self,
        kind: u8,
        what: &str,
    ) -> Result<Option<T>, StorageError<u64>> {
        read_shard_value(&self.store, self.shard, kind, what)
    }

    fn last_log_id(&self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        last_log_id(&self.store, self.shard)
    }

    fn read_from_disk(
        &self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let from = keys::log_entry(self.shard, start);
        let to = keys::log_entry(self.shard, end);
        let mut entries = Vec::new();
        for item in self.store.raft_log.range(from..to) {
            let (_, value) =
                item.map_err(|err| io_error(ErrorSubject::Logs, ErrorVerb::Read, err))?;
            entries.push(decode(&value, "raft log entry")?);
        }
        Ok(entries)
    }

    /// Removes the keys of every entry with an index in `start..=end`.
    fn remove_range(&self, start: u64, end: u64) -> Result<(), StorageError<u64>> {
        let from = keys::log_entry(self.shard, start);
        let to = keys::log_entry(self.shard, end);
        let mut batch = self.store.keyspace.batch();
        for item in self.store.raft_log.range(from..=to) {
            let (key, _) =
                item.map_err(|err| io_error(ErrorSubject::Logs, ErrorVerb::Read, err))?;
            batch.remove(&self.store.raft_log, key);
        }
        batch
            .commit()
            .map_err(|err| io_error(ErrorSubject::Logs, ErrorVerb::Delete, err))
    }
}

/// Returns the index of the last entry of shard `shard`'s log on disk, or of
/// its purge point when the log is empty. Usable before any Raft group runs.
pub fn recovered_last_index(store: &Store, shard: u32) -> Result<Option<u64>, StorageError<u64>> {
    Ok(last_log_id(store, shard)?.map(|log_id| log_id.index))
}

fn last_log_id(store: &Store, shard: u32) -> Result<Option<LogId<u64>>, StorageError<u64>> {
    let last = store
        .raft_log
        .prefix(shard.to_be_bytes())
        .next_back()
        .transpose()
        .map_err(|err| io_error(ErrorSubject::Logs, ErrorVerb::Read, err))?;
    match last {
        Some((_, value)) => {
            let entry: Entry<TypeConfig> = decode(&value, "raft log entry")?;
            Ok(Some(entry.log_id))
        }
        None => read_shard_value(store, shard, PURGED, "last purged log id"),
    }
}

fn read_shard_value<T: serde::de::DeserializeOwned>(
    store: &Store,
    shard: u32,
    kind: u8,
    what: &str,
) -> Result<Option<T>, StorageError<u64>> {
    let value = store
        .raft_meta
        .get(keys::shard_value(shard, kind))
        .map_err(|err| io_error(ErrorSubject::Store, ErrorVerb::Read, err))?;
    value.map(|bytes| decode(&bytes, what)).transpose()
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(index) => *index,
        Bound::Excluded(index) => index.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(index) => index.saturating_add(1),
        Bound::Excluded(index) => *index,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let (start, end) = bounds(&range);
        if let Some(entries) = self.cache().get_range(start, end) {
            return Ok(entries);
        }
        self.read_from_disk(start, end)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let last_purged_log_id = self.read_value(PURGED, "last purged log id")?;
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let key = keys::shard_value(self.shard, VOTE);
        self.store
            .raft_meta
            .insert(key, encode(vote))
            .map_err(|err| io_error(ErrorSubject::Vote, ErrorVerb::Write, err))?;

        // Raft requires the vote on disk before it is acted upon.
        self.store
            .persist()
            .map_err(|err| io_error(ErrorSubject::Vote, ErrorVerb::Write, err))?;
        debug!(shard = self.shard, vote = %vote, "vote saved");
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.read_value(VOTE, "vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        // Not fsynced: it only lets a restart apply committed entries earlier,
        // and any value written is at most the durable end of the log.
        let key = keys::shard_value(self.shard, COMMITTED);
        self.store
            .raft_meta
            .insert(key, encode(&committed))
            .map_err(|err| io_error(ErrorSubject::Store, ErrorVerb::Write, err))?;
        if let Some(log_id) = committed {
            self.flusher.committed(self.shard, log_id.index);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self
            .read_value::<Option<LogId<u64>>>(COMMITTED, "committed log id")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = self.store.keyspace.batch();
        let mut appended = Vec::new();
        for entry in entries {
            batch.insert(
                &self.store.raft_log,
                keys::log_entry(self.shard, entry.log_id.index),
                encode(&entry),
            );
            appended.push(entry);
        }
        batch
            .commit()
            .map_err(|err| io_error(ErrorSubject::Logs, ErrorVerb::Write, err))?;

        let count = appended.len();
        let last_index = appended.last().map_or(0, |entry| entry.log_id.index);
        {
            let mut cache = self.cache();
            for entry in appended {
                cache.insert(entry);
            }
        }

        // The entries are readable now; they become durable with the next fsync.
        self.flusher.request(
            self.shard,
            last_index,
            count,
            Box::new(move |result| callback.log_io_completed(result)),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        debug!(shard = self.shard, from = log_id.index, "truncating log");
        self.remove_range(log_id.index, u64::MAX)?;
        self.cache().remove_from(log_id.index);

        // A truncated entry that came back after a crash would conflict with
        // the entries the leader sends next, so the removal is made durable.
        self.store
            .persist()
            .map_err(|err| io_error(ErrorSubject::Logs, ErrorVerb::Delete, err))
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        debug!(shard = self.shard, up_to = log_id.index, "purging log");
        let key = keys::shard_value(self.shard, PURGED);
        self.store
            .raft_meta
            .insert(key, encode(&log_id))
            .map_err(|err| io_error(ErrorSubject::Logs, ErrorVerb::Write, err))?;
        self.remove_range(0, log_id.index)?;
        self.cache().remove_up_to(log_id.index);
        Ok(())
    }
}
