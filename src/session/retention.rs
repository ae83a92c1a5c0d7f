//! How far a session's events may leave the local store.
//!
//! Once the archive contains a session's events up to `archived_seq`, and
//! that point has gone through the shard's Raft log, every replica may
//! delete them from its local store. The newest `tail_keep` events stay
//! local, because tails that reconnect usually request them. The events
//! left locally always form one run ending at `last_seq`, so a session's
//! local frontier is a single seq: `trimmed_through + 1`.

use serde::{Deserialize, Serialize};

/// Progress of one session's archive and of the deletions from the local
/// store. Stored with postcard, so fields may only be appended at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveMark {
    /// Every event up to this seq is in the archive.
    pub archived_seq: u64,
    /// Every event up to this seq is deleted from the local store; the
    /// events after it, up to `last_seq`, are all there.
    pub trimmed_through: u64,
}

impl ArchiveMark {
    /// Returns the first seq still in the local store.
    pub fn frontier(&self) -> u64 {
        self.trimmed_through + 1
    }

    /// Returns the mark after the archive reported `archived_seq`, for a
    /// session whose last seq is `last_seq`. Neither field ever moves back,
    /// and the archive can never hold more than the session has.
    pub fn advance(self, archived_seq: u64, last_seq: u64, tail_keep: u64) -> ArchiveMark {
        let archived_seq = self.archived_seq.max(archived_seq.min(last_seq));
        let trimmable = archived_seq.min(last_seq.saturating_sub(tail_keep));
        ArchiveMark {
            archived_seq,
            trimmed_through: self.trimmed_through.max(trimmable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events() {
        let mark = ArchiveMark::default().advance(100, 100, 10);
        assert_eq!(
            mark,
            ArchiveMark {
                archived_seq: 100,
                trimmed_through: 90
            }
        );
        assert_eq!(mark.frontier(), 91);
    }

    #[test]
    fn trims_only_what_is_archived() {
        let mark = ArchiveMark::default().advance(40, 100, 10);
        assert_eq!(mark.trimmed_through, 40, "events after 40 are not archived");
    }

    #[test]
    fn short_sessions_are_not_trimmed() {
        let mark = ArchiveMark::default().advance(8, 8, 10);
        assert_eq!(mark.trimmed_through, 0);
        assert_eq!(mark.archived_seq, 8);
    }

    #[test]
    fn never_moves_back() {
        let mark = ArchiveMark {
            archived_seq: 50,
            trimmed_through: 30,
        };
        assert_eq!(mark.advance(20, 60, 0), mark.advance(50, 60, 0));
        assert_eq!(mark.advance(20, 60, 100).trimmed_through, 30);
    }

    #[test]
    fn archived_seq_is_capped_by_last_seq() {
        let mark = ArchiveMark::default().advance(500, 100, 0);
        assert_eq!(mark.archived_seq, 100);
        assert_eq!(mark.trimmed_through, 100);
    }
}
