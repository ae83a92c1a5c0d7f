//! The contents of one shard's state machine as a single value, sent to a
//! replica that has fallen behind the leader's purged log.
//!
//! A node takes snapshots only as a durable point in its own store (see
//! [`super::state_machine::SnapshotBuilder`]). The image here is built when a
//! peer needs it, from the state as applied at that moment, and its log id
//! is that applied point.
//!
//! TODO: the image is built, sent and installed in memory, so a shard
//! larger than the memory of a node cannot be transferred. Streaming it
//! through a file would remove that limit.

use std::collections::BTreeMap;

use openraft::{ErrorSubject, ErrorVerb, StorageError};
use serde::{Deserialize, Serialize};

use super::codec::{decode, encode, io_error};
use super::AppliedEvent;
use crate::session::retention::ArchiveMark;
use crate::storage::{keys, Store};

/// Version of the image layout. An image of another version is rejected.
const FORMAT: u32 = 2;

/// Every session of one shard, with its events and idempotency records.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ShardImage {
    format: u32,
    sessions: Vec<SessionImage>,
}

/// One session's stored values, byte for byte.
#[derive(Debug, Serialize, Deserialize)]
struct SessionImage {
    id: String,
    header: Vec<u8>,
    /// (seq, frame)
    events: Vec<(u64, Vec<u8>)>,
    /// (client key, record)
    idempotency: Vec<(Vec<u8>, Vec<u8>)>,
    /// The archive mark, if the session has one. Its events start after
    /// the mark's trimmed seq.
    mark: Option<Vec<u8>>,
}

impl ShardImage {
    /// Returns the newest event of every session in the image. Published
    /// after an install, these events make open tails on this node notice that
    /// the store moved ahead, so they read the events they missed from it.
    pub fn newest_events(&self) -> Vec<AppliedEvent> {
        self.sessions
            .iter()
            .filter_map(|session| {
                let (seq, frame) = session.events.last()?;
                Some(AppliedEvent {
                    session_id: session.id.clone(),
                    seq: *seq,
                    frame: String::from_utf8_lossy(frame).into_owned(),
                })
            })
            .collect()
    }

    /// Returns the number of sessions and events in the image, for logs.
    pub fn size(&self) -> (usize, usize) {
        let events = self.sessions.iter().map(|s| s.events.len()).sum();
        (self.sessions.len(), events)
    }
}

fn read_error(err: impl std::fmt::Display) -> StorageError<u64> {
    io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, err)
}

/// Returns the ids of the sessions stored for `shard` out of `shard_count`
/// shards.
fn session_ids(
    store: &Store,
    shard: u32,
    shard_count: u32,
) -> Result<Vec<String>, StorageError<u64>> {
    let mut ids = Vec::new();
    for item in store.sessions.iter() {
        let (key, _) = item.map_err(read_error)?;
        let id = String::from_utf8_lossy(&key).into_owned();
        if keys::shard_of(&id, shard_count) == shard {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Iterates over a session's events in the store from its local frontier
/// on. Starting there skips the deletion markers that trimming left below it,
/// which the engine would otherwise walk until compaction removes them.
fn local_events(
    store: &Store,
    id: &str,
) -> Result<impl Iterator<Item = fjall::Result<fjall::KvPair>>, StorageError<u64>> {
    let frontier = match store
        .archive_marks
        .get(keys::archive_mark(id))
        .map_err(read_error)?
    {
        Some(bytes) => decode::<ArchiveMark>(&bytes, "archive mark")?.frontier(),
        None => 1,
    };
    Ok(store
        .events
        .range(keys::event(id, frontier)..=keys::event(id, u64::MAX)))
}

/// Builds the image of `shard` from every session of that shard in the store.
pub fn build(store: &Store, shard: u32, shard_count: u32) -> Result<ShardImage, StorageError<u64>> {
    let mut image = ShardImage {
        format: FORMAT,
        sessions: Vec::new(),
    };
    for id in session_ids(store, shard, shard_count)? {
        let Some(header) = store.sessions.get(keys::session(&id)).map_err(read_error)? else {
            continue;
        };
        let prefix = keys::event_prefix(&id);

        let mut events = Vec::new();
        for item in local_events(store, &id)? {
            let (key, value) = item.map_err(read_error)?;
            let seq = keys::event_seq(&key).ok_or_else(|| read_error("event key too short"))?;
            events.push((seq, value.to_vec()));
        }

        let mut idempotency = Vec::new();
        for item in store.idempotency.prefix(&prefix) {
            let (key, value) = item.map_err(read_error)?;
            idempotency.push((key[prefix.len()..].to_vec(), value.to_vec()));
        }

        let mark = store
            .archive_marks
            .get(keys::archive_mark(&id))
            .map_err(read_error)?
            .map(|mark| mark.to_vec());

        image.sessions.push(SessionImage {
            id,
            header: header.to_vec(),
            events,
            idempotency,
            mark,
        });
    }
    Ok(image)
}

/// Encodes an image for sending.
pub fn to_bytes(image: &ShardImage) -> Vec<u8> {
    encode(image)
}

/// Decodes an image received from a peer. Fails on an image of another
/// format version.
pub fn from_bytes(bytes: &[u8]) -> Result<ShardImage, StorageError<u64>> {
    let image: ShardImage = decode(bytes, "received snapshot")?;
    if image.format != FORMAT {
        return Err(io_error(
            ErrorSubject::Snapshot(None),
            ErrorVerb::Read,
            format!(
                "received snapshot has format {}, this node reads format {FORMAT}; run the same version on every node",
                image.format
            ),
        ));
    }
    Ok(image)
}

/// Adds to `batch` the removal of every session of `shard` and the
/// insertion of the image's sessions, so that committing the batch replaces
/// the shard's state in one atomic step.
///
/// Keys that the image writes again are not removed first. Every write of
/// one batch gets the same sequence number, so a removal and an insertion of
/// one key in the same batch would have no defined order.
pub fn replace(
    store: &Store,
    shard: u32,
    shard_count: u32,
    image: &ShardImage,
    batch: &mut fjall::Batch,
) -> Result<(), StorageError<u64>> {
    let mut sessions = BTreeMap::new();
    let mut events = BTreeMap::new();
    let mut idempotency = BTreeMap::new();
    let mut marks = BTreeMap::new();
    for session in &image.sessions {
        sessions.insert(keys::session(&session.id), session.header.as_slice());
        if let Some(mark) = &session.mark {
            marks.insert(keys::archive_mark(&session.id), mark.as_slice());
        }
        for (seq, frame) in &session.events {
            events.insert(keys::event(&session.id, *seq), frame.as_slice());
        }
        let prefix = keys::event_prefix(&session.id);
        for (key, record) in &session.idempotency {
            let mut full = prefix.clone();
            full.extend_from_slice(key);
            idempotency.insert(full, record.as_slice());
        }
    }

    for id in session_ids(store, shard, shard_count)? {
        let key = keys::session(&id);
        if !sessions.contains_key(&key) {
            batch.remove(&store.sessions, key);
        }
        let mark_key = keys::archive_mark(&id);
        if !marks.contains_key(&mark_key) {
            batch.remove(&store.archive_marks, mark_key);
        }
        let prefix = keys::event_prefix(&id);
        for item in local_events(store, &id)? {
            let (key, _) = item.map_err(read_error)?;
            if !events.contains_key(key.as_ref()) {
                batch.remove(&store.events, key);
            }
        }
        for item in store.idempotency.prefix(&prefix) {
            let (key, _) = item.map_err(read_error)?;
            if !idempotency.contains_key(key.as_ref()) {
                batch.remove(&store.idempotency, key);
            }
        }
    }

    for (key, value) in sessions {
        batch.insert(&store.sessions, key, value);
    }
    for (key, value) in events {
        batch.insert(&store.events, key, value);
    }
    for (key, value) in idempotency {
        batch.insert(&store.idempotency, key, value);
    }
    for (key, value) in marks {
        batch.insert(&store.archive_marks, key, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoreSettings;

    const SHARDS: u32 = 4;

    fn open(dir: &std::path::Path) -> Store {
        let tuning = StoreSettings {
            cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
        };
        Store::open(dir, SHARDS, &tuning).expect("opening a test store failed")
    }

    /// Session ids that land on shard 0 and on another shard.
    fn ids() -> (Vec<String>, String) {
        let mut on_zero = Vec::new();
        let mut elsewhere = None;
        for n in 0.. {
            let id = format!("ses_{n}");
            if keys::shard_of(&id, SHARDS) == 0 {
                on_zero.push(id);
            } else if elsewhere.is_none() {
                elsewhere = Some(id);
            }
            if on_zero.len() == 3 && elsewhere.is_some() {
                break;
            }
        }
        (on_zero, elsewhere.expect("some id is on another shard"))
    }

    fn put_session(store: &Store, id: &str, events: u64, key: &str) {
        store
            .sessions
            .insert(keys::session(id), format!("header {id}"))
            .unwrap();
        for seq in 1..=events {
            store
                .events
                .insert(keys::event(id, seq), format!("{id} event {seq}"))
                .unwrap();
        }
        store
            .idempotency
            .insert(keys::idempotency(id, key), format!("{id} {key}"))
            .unwrap();
        store
            .archive_marks
            .insert(
                keys::archive_mark(id),
                encode(&ArchiveMark {
                    archived_seq: events,
                    trimmed_through: 0,
                }),
            )
            .unwrap();
    }

    fn contents(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all = Vec::new();
        for partition in [
            &store.sessions,
            &store.events,
            &store.idempotency,
            &store.archive_marks,
        ] {
            for item in partition.iter() {
                let (key, value) = item.unwrap();
                all.push((key.to_vec(), value.to_vec()));
            }
        }
        all
    }

    #[test]
    fn install_replaces_the_shard_and_keeps_other_shards() {
        let (on_zero, elsewhere) = ids();
        let leader_dir = tempfile::tempdir().unwrap();
        let leader = open(leader_dir.path());
        put_session(&leader, &on_zero[0], 5, "a");
        put_session(&leader, &on_zero[1], 2, "b");

        // The follower has an older copy of one session, a session the
        // leader no longer has on this shard, and a session of another shard.
        let follower_dir = tempfile::tempdir().unwrap();
        let follower = open(follower_dir.path());
        put_session(&follower, &on_zero[0], 3, "a");
        put_session(&follower, &on_zero[2], 4, "stale");
        put_session(&follower, &elsewhere, 2, "kept");

        let image = from_bytes(&to_bytes(&build(&leader, 0, SHARDS).unwrap())).unwrap();
        assert_eq!(
            image.size(),
            (2, 7),
            "image of shard 0: sessions and events"
        );

        let mut batch = follower.keyspace.batch();
        replace(&follower, 0, SHARDS, &image, &mut batch).unwrap();
        batch.commit().unwrap();

        let expected_dir = tempfile::tempdir().unwrap();
        let expected = open(expected_dir.path());
        put_session(&expected, &on_zero[0], 5, "a");
        put_session(&expected, &on_zero[1], 2, "b");
        put_session(&expected, &elsewhere, 2, "kept");
        assert_eq!(
            contents(&follower),
            contents(&expected),
            "after the install the follower must equal the leader on shard 0 and keep shard {}",
            keys::shard_of(&elsewhere, SHARDS)
        );
    }

    #[test]
    fn install_drops_events_the_leader_trimmed() {
        let (on_zero, _) = ids();
        let id = &on_zero[0];
        let leader_dir = tempfile::tempdir().unwrap();
        let leader = open(leader_dir.path());
        put_session(&leader, id, 5, "a");
        let trimmed = ArchiveMark {
            archived_seq: 4,
            trimmed_through: 2,
        };
        leader
            .archive_marks
            .insert(keys::archive_mark(id), encode(&trimmed))
            .unwrap();
        for seq in 1..=2 {
            leader.events.remove(keys::event(id, seq)).unwrap();
        }

        // The follower has the untrimmed copy of an older state.
        let follower_dir = tempfile::tempdir().unwrap();
        let follower = open(follower_dir.path());
        put_session(&follower, id, 3, "a");

        let image = from_bytes(&to_bytes(&build(&leader, 0, SHARDS).unwrap())).unwrap();
        assert_eq!(image.size(), (1, 3), "the image holds events 3 to 5");
        let mut batch = follower.keyspace.batch();
        replace(&follower, 0, SHARDS, &image, &mut batch).unwrap();
        batch.commit().unwrap();

        assert_eq!(
            contents(&follower),
            contents(&leader),
            "the follower must drop events 1 and 2 and take the leader's mark"
        );
    }

    #[test]
    fn newest_events_give_last_seq_per_session() {
        let (on_zero, _) = ids();
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        put_session(&store, &on_zero[0], 5, "a");
        put_session(&store, &on_zero[1], 2, "b");

        let image = build(&store, 0, SHARDS).unwrap();
        let mut newest: Vec<(String, u64)> = image
            .newest_events()
            .into_iter()
            .map(|event| (event.session_id, event.seq))
            .collect();
        newest.sort();
        let mut expected = vec![(on_zero[0].clone(), 5), (on_zero[1].clone(), 2)];
        expected.sort();
        assert_eq!(newest, expected, "(session, newest seq) pairs");
    }

    #[test]
    fn image_of_another_format_is_rejected() {
        let image = ShardImage {
            format: FORMAT - 1,
            sessions: Vec::new(),
        };
        let err = from_bytes(&to_bytes(&image)).unwrap_err();
        assert!(err.to_string().contains("same version"), "{err}");
    }
}
