//! The state machine of one shard: sessions, events and idempotency records.
//!
//! `apply` writes a whole batch of entries, with the new last-applied log id,
//! in one atomic fjall batch. It does not fsync, because every applied entry
//! is already durable in the Raft log and openraft re-applies whatever the
//! state machine lost in a crash. A snapshot fsyncs the state machine
//! before it lets openraft purge the log entries it covers.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, SnapshotMeta,
    StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info};

use super::codec::{decode, encode, io_error};
use super::snapshot;
use super::{
    AppendCommand, AppliedEvent, ArchivedCommand, Command, CreateCommand, EventSink, Outcome,
    TypeConfig,
};
use crate::session::event;
use crate::session::header::SessionHeader;
use crate::session::retention::ArchiveMark;
use crate::session::rules::{decide_append, AppendDecision, IdempotencyRecord};
use crate::storage::{keys, Store};

const SNAPSHOT: u8 = b's';

/// Event deletions after which `apply` commits the batch at the next entry
/// boundary. One trim command requests about 50,000 (see the archive's trim
/// queue), so this lets a few commands share a write.
const MAX_DELETIONS_PER_WRITE: u64 = 200_000;

/// Last applied log id and membership of a shard, stored with its state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
}

pub struct StateMachine {
    shard: u32,
    store: Store,
    sink: Arc<dyn EventSink>,
    /// Set once Raft runs: from then on a request for the current snapshot
    /// means a peer needs it, and gets the shard's full image.
    running: Arc<AtomicBool>,
}

/// Writes of one apply batch that later entries of the same batch must see.
#[derive(Default)]
struct PendingWrites {
    headers: HashMap<String, SessionHeader>,
    idempotency: HashMap<(String, String), IdempotencyRecord>,
    marks: HashMap<String, ArchiveMark>,
    events: Vec<AppliedEvent>,
    /// Store key of each event appended in this batch, with its index in
    /// `events`. They are written to the batch only at the end, because a
    /// follower catching up may apply an append and the trim covering it in
    /// one batch. The trim then drops the insert, and the batch never contains
    /// an insert and a remove of one key, whose order fjall does not
    /// document.
    new_events: HashMap<Vec<u8>, usize>,
    /// (session id, events deleted from the local store)
    trims: Vec<(String, u64)>,
    /// Event deletions added to the batch so far.
    deletions: u64,
}

impl StateMachine {
    pub fn new(
        shard: u32,
        store: Store,
        sink: Arc<dyn EventSink>,
        running: Arc<AtomicBool>,
    ) -> StateMachine {
        StateMachine {
            shard,
            store,
            sink,
            running,
        }
    }

    /// Builds the shard's full image at the applied point, with that point
    /// as its log id. openraft runs this between two applies of the shard,
    /// so its state does not move during the scan.
    async fn current_image(&self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let state = self.read_applied()?;
        let (store, shard, shard_count) =
            (self.store.clone(), self.shard, self.store.shard_count());
        // The scan runs off the async runtime's threads, which serve requests.
        let (bytes, sessions, events) = tokio::task::spawn_blocking(move || {
            let image = snapshot::build(&store, shard, shard_count)?;
            let (sessions, events) = image.size();
            Ok::<_, StorageError<u64>>((snapshot::to_bytes(&image), sessions, events))
        })
        .await
        .map_err(|err| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, err))??;

        let meta = snapshot_meta(self.shard, &state);
        info!(shard = self.shard, snapshot = %meta.snapshot_id, sessions, events, bytes = bytes.len(), "snapshot image built for a peer");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }

    fn read_applied(&self) -> Result<AppliedState, StorageError<u64>> {
        let key = self.shard.to_be_bytes();
        let value = self
            .store
            .applied
            .get(key)
            .map_err(|err| io_error(ErrorSubject::StateMachine, ErrorVerb::Read, err))?;
        match value {
            Some(bytes) => decode(&bytes, "applied state"),
            None => Ok(AppliedState::default()),
        }
    }

    fn header(
        &self,
        id: &str,
        pending: &PendingWrites,
    ) -> Result<Option<SessionHeader>, StorageError<u64>> {
        if let Some(header) = pending.headers.get(id) {
            return Ok(Some(header.clone()));
        }
        read_header(&self.store, id)
    }

    fn idempotency(
        &self,
        session_id: &str,
        key: &str,
        pending: &PendingWrites,
    ) -> Result<Option<IdempotencyRecord>, StorageError<u64>> {
        if let Some(record) = pending
            .idempotency
            .get(&(session_id.to_string(), key.to_string()))
        {
            return Ok(Some(record.clone()));
        }
        let value = self
            .store
            .idempotency
            .get(keys::idempotency(session_id, key))
            .map_err(|err| io_error(ErrorSubject::StateMachine, ErrorVerb::Read, err))?;
        value
            .map(|bytes| decode(&bytes, "idempotency record"))
            .transpose()
    }

    /// Writes what the entries applied so far produced, with `state` as the
    /// applied point, in one atomic batch, then hands the applied events to
    /// the sink and reports the trims.
    fn commit(
        &self,
        mut batch: fjall::Batch,
        mut pending: PendingWrites,
        state: &AppliedState,
    ) -> Result<(), StorageError<u64>> {
        for (key, index) in pending.new_events.drain() {
            batch.insert(
                &self.store.events,
                key,
                pending.events[index].frame.as_bytes(),
            );
        }
        for (id, header) in &pending.headers {
            batch.insert(&self.store.sessions, keys::session(id), encode(header));
        }
        for (id, mark) in &pending.marks {
            batch.insert(
                &self.store.archive_marks,
                keys::archive_mark(id),
                encode(mark),
            );
        }
        batch.insert(&self.store.applied, self.shard.to_be_bytes(), encode(state));
        batch.commit().map_err(|err| {
            error!(shard = self.shard, error = %err, "state machine write failed");
            io_error(ErrorSubject::StateMachine, ErrorVerb::Write, err)
        })?;

        // Published only now, so a tail that sees an event live can also read
        // every earlier event from the store.
        if !pending.events.is_empty() {
            self.sink.publish(pending.events);
        }
        if !pending.trims.is_empty() {
            let events: u64 = pending.trims.iter().map(|(_, count)| count).sum();
            debug!(
                shard = self.shard,
                sessions = pending.trims.len(),
                events,
                "archived events trimmed from the local store"
            );
            self.sink.trimmed(self.shard, &pending.trims);
        }
        Ok(())
    }

    fn mark(&self, id: &str, pending: &PendingWrites) -> Result<ArchiveMark, StorageError<u64>> {
        if let Some(mark) = pending.marks.get(id) {
            return Ok(*mark);
        }
        Ok(read_mark(&self.store, id)?.unwrap_or_default())
    }

    fn apply_command(
        &self,
        command: &Command,
        batch: &mut fjall::Batch,
        pending: &mut PendingWrites,
    ) -> Result<Outcome, StorageError<u64>> {
        match command {
            Command::CreateSession(create) => self.apply_create(create, pending),
            Command::Append(append) => self.apply_append(append, batch, pending),
            Command::Batch(commands) => {
                let mut outcomes = Vec::with_capacity(commands.len());
                for command in commands {
                    outcomes.push(self.apply_command(command, batch, pending)?);
                }
                Ok(Outcome::Batch(outcomes))
            }
            Command::Archived(archived) => self.apply_archived(archived, batch, pending),
        }
    }

    /// Records how far the archive contains each session and deletes the
    /// events that are now both archived and older than the newest
    /// `tail_keep`. A session this shard does not have is skipped.
    fn apply_archived(
        &self,
        archived: &ArchivedCommand,
        batch: &mut fjall::Batch,
        pending: &mut PendingWrites,
    ) -> Result<Outcome, StorageError<u64>> {
        let mut trimmed = 0;
        for (id, archived_seq) in &archived.sessions {
            let Some(header) = self.header(id, pending)? else {
                continue;
            };
            let before = self.mark(id, pending)?;
            let after = before.advance(*archived_seq, header.last_seq, archived.tail_keep);
            if after == before {
                continue;
            }

            for seq in before.frontier()..=after.trimmed_through {
                let key = keys::event(id, seq);
                if pending.new_events.remove(&key).is_none() {
                    batch.remove(&self.store.events, key);
                    pending.deletions += 1;
                }
            }
            let count = after.trimmed_through - before.trimmed_through;
            if count > 0 {
                pending.trims.push((id.clone(), count));
                trimmed += count;
            }
            pending.marks.insert(id.clone(), after);
        }
        Ok(Outcome::Archived { trimmed })
    }

    fn apply_create(
        &self,
        create: &CreateCommand,
        pending: &mut PendingWrites,
    ) -> Result<Outcome, StorageError<u64>> {
        if self.header(&create.id, pending)?.is_some() {
            return Ok(Outcome::SessionExists);
        }
        let header = SessionHeader {
            title: create.title.clone(),
            metadata: create.metadata.clone(),
            last_seq: 0,
            created_at: create.now,
            updated_at: create.now,
        };
        pending.headers.insert(create.id.clone(), header.clone());
        Ok(Outcome::Created(header))
    }

    fn apply_append(
        &self,
        append: &AppendCommand,
        batch: &mut fjall::Batch,
        pending: &mut PendingWrites,
    ) -> Result<Outcome, StorageError<u64>> {
        let Some(mut header) = self.header(&append.session_id, pending)? else {
            return Ok(Outcome::SessionNotFound);
        };
        let previous = match &append.idempotency_key {
            Some(key) => self.idempotency(&append.session_id, key, pending)?,
            None => None,
        };

        let seq = match decide_append(
            header.last_seq,
            previous.as_ref(),
            &append.fingerprint,
            append.expected_seq,
        ) {
            AppendDecision::Append { seq } => seq,
            AppendDecision::Deduped { seq } => {
                return Ok(Outcome::Deduped {
                    seq,
                    last_seq: header.last_seq,
                })
            }
            AppendDecision::IdempotencyConflict { seq } => {
                return Ok(Outcome::IdempotencyConflict { seq })
            }
            AppendDecision::ExpectedSeqConflict { expected, current } => {
                return Ok(Outcome::ExpectedSeqConflict { expected, current })
            }
        };

        let frame = event::frame(seq, &append.frame_tail);
        pending
            .new_events
            .insert(keys::event(&append.session_id, seq), pending.events.len());
        if let Some(key) = &append.idempotency_key {
            let record = IdempotencyRecord {
                seq,
                fingerprint: append.fingerprint,
            };
            batch.insert(
                &self.store.idempotency,
                keys::idempotency(&append.session_id, key),
                encode(&record),
            );
            pending
                .idempotency
                .insert((append.session_id.clone(), key.clone()), record);
        }

        header.last_seq = seq;
        header.updated_at = append.now;
        pending.headers.insert(append.session_id.clone(), header);
        pending.events.push(AppliedEvent {
            session_id: append.session_id.clone(),
            seq,
            frame,
        });
        Ok(Outcome::Appended { seq, last_seq: seq })
    }
}

/// Reads a session's archive mark from the store, outside of any apply
/// batch. `None` means nothing of the session was reported archived.
pub fn read_mark(store: &Store, id: &str) -> Result<Option<ArchiveMark>, StorageError<u64>> {
    let value = store
        .archive_marks
        .get(keys::archive_mark(id))
        .map_err(|err| io_error(ErrorSubject::StateMachine, ErrorVerb::Read, err))?;
    value
        .map(|bytes| decode(&bytes, "archive mark"))
        .transpose()
}

/// Reads a session header from the store, outside of any apply batch.
pub fn read_header(store: &Store, id: &str) -> Result<Option<SessionHeader>, StorageError<u64>> {
    let value = store
        .sessions
        .get(keys::session(id))
        .map_err(|err| io_error(ErrorSubject::StateMachine, ErrorVerb::Read, err))?;
    value
        .map(|bytes| decode(&bytes, "session header"))
        .transpose()
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let state = self.read_applied()?;
        Ok((state.last_applied, state.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.read_applied()?;
        let mut batch = self.store.keyspace.batch();
        let mut pending = PendingWrites::default();
        let mut outcomes = Vec::new();

        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let outcome = match &entry.payload {
                EntryPayload::Blank => Outcome::Internal,
                EntryPayload::Membership(membership) => {
                    state.membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    Outcome::Internal
                }
                EntryPayload::Normal(command) => {
                    self.apply_command(command, &mut batch, &mut pending)?
                }
            };
            outcomes.push(outcome);

            // openraft hands over every committed entry not applied yet, so
            // a follower catching up on trims could gather millions of
            // deletions here. Committing at an entry boundary, with the
            // applied point of that entry, bounds the batch and keeps each
            // write atomic with the applied point it records.
            if pending.deletions >= MAX_DELETIONS_PER_WRITE {
                let full = std::mem::replace(&mut batch, self.store.keyspace.batch());
                self.commit(full, std::mem::take(&mut pending), &state)?;
            }
        }

        self.commit(batch, pending, &state)?;
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shard: self.shard,
            store: self.store.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        let image = snapshot::from_bytes(snapshot.get_ref())?;
        let (sessions, events) = image.size();
        info!(shard = self.shard, snapshot = %meta.snapshot_id, sessions, events, "installing snapshot");

        let mut batch = self.store.keyspace.batch();
        snapshot::replace(
            &self.store,
            self.shard,
            self.store.shard_count(),
            &image,
            &mut batch,
        )?;
        let state = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        batch.insert(
            &self.store.applied,
            self.shard.to_be_bytes(),
            encode(&state),
        );
        batch.insert(
            &self.store.raft_meta,
            keys::shard_value(self.shard, SNAPSHOT),
            encode(meta),
        );
        batch
            .commit()
            .map_err(|err| io_error(subject(), ErrorVerb::Write, err))?;

        // openraft purges the log up to the snapshot next, so the state must
        // be durable first.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.persist())
            .await
            .map_err(|err| io_error(subject(), ErrorVerb::Write, err))?
            .map_err(|err| io_error(subject(), ErrorVerb::Write, err))?;
        info!(shard = self.shard, snapshot = %meta.snapshot_id, "snapshot installed");

        self.sink
            .replaced(self.shard, events as u64, image.newest_events());
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let key = keys::shard_value(self.shard, SNAPSHOT);
        let value = self
            .store
            .raft_meta
            .get(key)
            .map_err(|err| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, err))?;
        let Some(bytes) = value else { return Ok(None) };
        // openraft 0.9 calls this once while starting, for the metadata
        // only, and then only to send the snapshot to a replica that needs
        // it (`stream_snapshot` in its replication), which needs the data.
        if self.running.load(Ordering::Acquire) {
            return self.current_image().await.map(Some);
        }
        let meta: SnapshotMeta<u64, BasicNode> = decode(&bytes, "snapshot metadata")?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        }))
    }
}

fn snapshot_meta(shard: u32, state: &AppliedState) -> SnapshotMeta<u64, BasicNode> {
    let index = state.last_applied.map_or(0, |log_id| log_id.index);
    SnapshotMeta {
        last_log_id: state.last_applied,
        last_membership: state.membership.clone(),
        snapshot_id: format!("shard-{shard}-index-{index}"),
    }
}

/// Builds snapshots of one shard's state machine.
///
/// The state machine lives in the store already, so a snapshot is a durable
/// point in it: fsync, then record the applied log id, after which openraft
/// may purge the log up to there.
pub struct SnapshotBuilder {
    shard: u32,
    store: Store,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        // Read the applied point first: the fsync below then covers it.
        let applied = self
            .store
            .applied
            .get(self.shard.to_be_bytes())
            .map_err(|err| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, err))?;
        let state: AppliedState = match applied {
            Some(bytes) => decode(&bytes, "applied state")?,
            None => AppliedState::default(),
        };
        // The fsync runs off the async runtime's threads, which serve requests.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.persist())
            .await
            .map_err(|err| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, err))?
            .map_err(|err| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, err))?;

        let meta = snapshot_meta(self.shard, &state);
        let index = state.last_applied.map_or(0, |log_id| log_id.index);
        let bytes = encode(&meta);
        self.store
            .raft_meta
            .insert(keys::shard_value(self.shard, SNAPSHOT), bytes.clone())
            .map_err(|err| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, err))?;

        info!(shard = self.shard, index, "snapshot taken");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use openraft::{CommittedLeaderId, LogId};

    use super::*;
    use crate::storage::StoreSettings;

    /// Collects what the state machine reports.
    #[derive(Default)]
    struct Recorder {
        published: Mutex<Vec<u64>>,
        trimmed: Mutex<u64>,
    }

    impl EventSink for Recorder {
        fn publish(&self, events: Vec<AppliedEvent>) {
            let mut published = self.published.lock().unwrap();
            published.extend(events.iter().map(|event| event.seq));
        }

        fn trimmed(&self, _shard: u32, sessions: &[(String, u64)]) {
            *self.trimmed.lock().unwrap() += sessions.iter().map(|(_, n)| n).sum::<u64>();
        }
    }

    fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Arc::new(command)),
        }
    }

    fn append(seq: u64) -> Command {
        Command::Append(AppendCommand {
            session_id: "ses_a".to_string(),
            frame_tail: format!("\"type\":\"t\",\"n\":{seq}}}"),
            fingerprint: [0; 32],
            idempotency_key: None,
            expected_seq: None,
            now: seq,
        })
    }

    fn trim(archived_seq: u64, tail_keep: u64) -> Command {
        Command::Archived(ArchivedCommand {
            sessions: vec![("ses_a".to_string(), archived_seq)],
            tail_keep,
        })
    }

    /// A follower catching up applies appends and the trims that cover
    /// them in one call: the trimmed events must be gone, the rest kept.
    #[tokio::test]
    async fn trim_in_the_same_apply_as_its_appends() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = StoreSettings {
            cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
        };
        let store = Store::open(dir.path(), 1, &tuning).unwrap();
        let recorder = Arc::new(Recorder::default());
        let running = Arc::new(AtomicBool::new(false));
        let mut machine = StateMachine::new(0, store.clone(), recorder.clone(), running);

        let mut entries = vec![entry(
            1,
            Command::CreateSession(CreateCommand {
                id: "ses_a".to_string(),
                title: None,
                metadata: "{}".to_string(),
                now: 0,
            }),
        )];
        entries.extend((1..=10).map(|seq| entry(seq + 1, append(seq))));
        entries.push(entry(12, trim(6, 3)));
        entries.push(entry(13, trim(9, 3)));
        let outcomes = machine.apply(entries).await.unwrap();

        assert_eq!(outcomes[11], Outcome::Archived { trimmed: 6 });
        assert_eq!(outcomes[12], Outcome::Archived { trimmed: 1 });
        let stored: Vec<u64> = store
            .events
            .prefix(keys::event_prefix("ses_a"))
            .map(|item| keys::event_seq(&item.unwrap().0).unwrap())
            .collect();
        assert_eq!(stored, vec![8, 9, 10], "events 1 to 7 are trimmed");
        assert_eq!(
            read_mark(&store, "ses_a").unwrap(),
            Some(ArchiveMark {
                archived_seq: 9,
                trimmed_through: 7
            })
        );
        assert_eq!(
            *recorder.published.lock().unwrap(),
            (1..=10).collect::<Vec<_>>(),
            "every applied event reaches the tails, trimmed or not"
        );
        assert_eq!(*recorder.trimmed.lock().unwrap(), 7);
    }
}
