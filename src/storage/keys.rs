//! Key layout of the embedded store.
//!
//! Every key below is on disk: changing an encoding makes existing data
//! directories unreadable, so these functions must never change meaning.
//! Integers are big-endian so that byte order equals numeric order and range
//! scans return entries in ascending index or seq.

/// Separates a session id from the rest of a key. Session ids never contain
/// it, because the id rule only allows printable ASCII.
const SEPARATOR: u8 = 0;

/// Key of one Raft log entry: shard (u32) then log index (u64).
pub fn log_entry(shard: u32, index: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&shard.to_be_bytes());
    key[4..].copy_from_slice(&index.to_be_bytes());
    key
}

/// Reads the log index back out of a [`log_entry`] key.
pub fn log_index(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Key of one per-shard Raft value such as the vote (`b'v'`), the last
/// purged log id (`b'p'`) or the committed log id (`b'c'`).
pub fn shard_value(shard: u32, kind: u8) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[..4].copy_from_slice(&shard.to_be_bytes());
    key[4] = kind;
    key
}

/// Shard of `session_id` among `shard_count` shards.
///
/// The hash (XXH3, seed 0) and the modulo are part of the on-disk format:
/// changing either would move sessions away from the shard holding them.
pub fn shard_of(session_id: &str, shard_count: u32) -> u32 {
    let hash = xxhash_rust::xxh3::xxh3_64(session_id.as_bytes());
    (hash % u64::from(shard_count)) as u32
}

/// Key of a session header.
pub fn session(id: &str) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// Key of a session's archive mark.
pub fn archive_mark(id: &str) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// Prefix shared by all events of one session.
pub fn event_prefix(session_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(session_id.len() + 9);
    key.extend_from_slice(session_id.as_bytes());
    key.push(SEPARATOR);
    key
}

/// Key of one event: session id, separator, seq (u64).
pub fn event(session_id: &str, seq: u64) -> Vec<u8> {
    let mut key = event_prefix(session_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Reads the seq back out of an [`event`] key.
pub fn event_seq(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    let bytes: [u8; 8] = key[start..].try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Key of one idempotency record: session id, separator, client key.
pub fn idempotency(session_id: &str, idempotency_key: &str) -> Vec<u8> {
    let mut key = event_prefix(session_id);
    key.extend_from_slice(idempotency_key.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_keys_sort_by_seq() {
        let low = event("ses_a", 9);
        let high = event("ses_a", 10);
        assert!(low < high, "seq 9 must sort before seq 10");
        assert_eq!(event_seq(&high), Some(10));
    }

    #[test]
    fn event_prefix_excludes_longer_ids() {
        let key = event("ses_ab", 1);
        assert!(
            !key.starts_with(&event_prefix("ses_a")),
            "the separator must keep ses_a's scan out of ses_ab"
        );
    }

    #[test]
    fn log_keys_round_trip() {
        let key = log_entry(3, 42);
        assert_eq!(log_index(&key), Some(42));
        assert!(log_entry(3, 255) < log_entry(3, 256));
        assert!(log_entry(3, u64::MAX) < log_entry(4, 0));
    }
}
