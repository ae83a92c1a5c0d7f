//! The contents of one shard's state machine as a single value, sent to a
//! replica that has fallen behind the leader's purged log.
//!
//! A node takes snapshots only as a durable point in its own store (see
//! [`super::state_machine::SnapshotBuilder`]); the image here is built when a
//! peer needs it, from the state as applied at that moment, and its log id
//! is that applied point.
//!
//! TODO: the image is built, sent and installed in memory, so a shard
//! larger than the memory of a node cannot be transferred; streaming it
//! through a file would lift that.

use std::collections::BTreeMap;

use openraft::{ErrorSubject, ErrorVerb, StorageError};
use serde::{Deserialize, Serialize};

use super::codec::{decode, encode, io_error};
use super::AppliedEvent;
use crate::storage::{keys, Store};

/// Version of the image layout; an image of another version is refused.
const FORMAT: u32 = 1;

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
}

impl ShardImage {
    /// The newest event of every session in the image. Published after an
    /// install, they make open tails on this node notice that the store
    /// moved ahead and read the events they missed from it.
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

    /// Number of sessions and events in the image, for logs.
    pub fn size(&self) -> (usize, usize) {
        let events = self.sessions.iter().map(|s| s.events.len()).sum();
        (self.sessions.len(), events)
    }
}

fn read_error(err: impl std::fmt::Display) -> StorageError<u64> {
    io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, err)
}

/// Ids of the sessions stored for `shard` (of `shard_count`).
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

/// Reads every session of `shard` from the store.
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
        for item in store.events.prefix(&prefix) {
            let (key, value) = item.map_err(read_error)?;
            let seq = keys::event_seq(&key).ok_or_else(|| read_error("event key too short"))?;
            events.push((seq, value.to_vec()));
        }

        let mut idempotency = Vec::new();
        for item in store.idempotency.prefix(&prefix) {
            let (key, value) = item.map_err(read_error)?;
            idempotency.push((key[prefix.len()..].to_vec(), value.to_vec()));
        }

        image.sessions.push(SessionImage {
            id,
            header: header.to_vec(),
            events,
            idempotency,
        });
    }
    Ok(image)
}

/// Serialises an image for sending.
pub fn to_bytes(image: &ShardImage) -> Vec<u8> {
    encode(image)
}

/// Reads an image received from a peer.
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
/// Keys the image writes again are not removed first: every write of one
/// batch gets the same sequence number, so a removal and an insertion of one
/// key in the same batch would have no defined order.
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
    for session in &image.sessions {
        sessions.insert(keys::session(&session.id), session.header.as_slice());
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
        let prefix = keys::event_prefix(&id);
        for item in store.events.prefix(&prefix) {
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
    Ok(())
}
