//! The append rules, in the order the contract checks them.
//!
//! The session must exist (checked by the caller, which owns the lookup).
//! Then an idempotency key that was used before decides the outcome: the same
//! event gets its original seq back, a different one is a conflict. Only
//! after that is `expected_seq` compared, so a retry of a request that
//! carried both gets its original answer instead of a conflict.

use serde::{Deserialize, Serialize};

use super::canonical::Fingerprint;

/// Record of an idempotency key in one session: the seq of the event first
/// appended with it and that event's fingerprint. Stored with postcard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub seq: u64,
    pub fingerprint: Fingerprint,
}

/// The outcome of the rules for one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendDecision {
    /// Append the event at this seq.
    Append { seq: u64 },
    /// The same event was appended before with this key, at this seq.
    Deduped { seq: u64 },
    /// The key was used before for a different event, appended at this seq.
    IdempotencyConflict { seq: u64 },
    /// The caller's `expected_seq` is not the session's `last_seq`.
    ExpectedSeqConflict { expected: u64, current: u64 },
}

/// Decides what happens to an append to a session whose last seq is
/// `last_seq`, given the record of its idempotency key, if it has one.
pub fn decide_append(
    last_seq: u64,
    previous: Option<&IdempotencyRecord>,
    fingerprint: &Fingerprint,
    expected_seq: Option<u64>,
) -> AppendDecision {
    if let Some(previous) = previous {
        return if previous.fingerprint == *fingerprint {
            AppendDecision::Deduped { seq: previous.seq }
        } else {
            AppendDecision::IdempotencyConflict { seq: previous.seq }
        };
    }

    match expected_seq {
        Some(expected) if expected != last_seq => AppendDecision::ExpectedSeqConflict {
            expected,
            current: last_seq,
        },
        _ => AppendDecision::Append { seq: last_seq + 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAME: Fingerprint = [1; 32];
    const OTHER: Fingerprint = [2; 32];

    #[test]
    fn first_append_gets_seq_one() {
        assert_eq!(
            decide_append(0, None, &SAME, None),
            AppendDecision::Append { seq: 1 }
        );
    }

    #[test]
    fn expected_seq_guards_append() {
        assert_eq!(
            decide_append(41, None, &SAME, Some(41)),
            AppendDecision::Append { seq: 42 }
        );
        assert_eq!(
            decide_append(42, None, &SAME, Some(41)),
            AppendDecision::ExpectedSeqConflict {
                expected: 41,
                current: 42
            }
        );
    }

    #[test]
    fn dedupe_runs_before_expected_seq() {
        let previous = IdempotencyRecord {
            seq: 5,
            fingerprint: SAME,
        };
        assert_eq!(
            decide_append(9, Some(&previous), &SAME, Some(4)),
            AppendDecision::Deduped { seq: 5 }
        );
    }

    #[test]
    fn reused_key_with_other_event_conflicts() {
        let previous = IdempotencyRecord {
            seq: 5,
            fingerprint: SAME,
        };
        assert_eq!(
            decide_append(9, Some(&previous), &OTHER, None),
            AppendDecision::IdempotencyConflict { seq: 5 }
        );
    }
}
