//! The follower behind one tail socket: replay from the store, then live.
//!
//! With the archive on, the local store may have trimmed a session's oldest
//! events. Replay below that frontier reads them from Postgres, in pages
//! that end at the frontier, and then goes on in the local store. The seam
//! is the single seq where one source ends and the other starts, so nothing
//! is skipped or sent twice. Each local read takes the header, the archive
//! mark and the events at one instant of the store, so a trim running at the
//! same time cannot show it a gap.

use axum::extract::ws::Utf8Bytes;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use super::hub::Subscription;
use crate::archive::{ColdReader, PageLimit};
use crate::consensus::codec::decode;
use crate::session::header::SessionHeader;
use crate::session::retention::ArchiveMark;
use crate::storage::{keys, Store};

/// Events read from the store in one step, at most.
const PAGE_EVENTS: usize = 512;
/// Bytes of frames read from the store in one step, at most (at least one
/// event is always read, however large).
const PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Live events taken in one step, at most, so one busy session cannot keep
/// a socket from its pings.
const LIVE_BATCH: usize = 256;

/// Failure that ends a follower.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The store lacks an event below the session's `last_seq`. Serving the
    /// next one would skip it, so the tail stops instead.
    #[error("event {missing} of session {session_id} is missing from storage")]
    Hole { session_id: String, missing: u64 },
    #[error("reading session {session_id} from storage failed: {reason}")]
    Storage { session_id: String, reason: String },
    /// The live feed was closed, which happens only when the server stops.
    #[error("the live feed of session {session_id} closed")]
    FeedClosed { session_id: String },
    /// The events asked for were trimmed from the local store after they
    /// were archived, and this node has no archive to read them from.
    #[error(
        "events up to {trimmed_through} of session {session_id} are only in the Postgres archive, \
         which this node is not configured to read; set STARCITE_ARCHIVER_ENABLED and DATABASE_URL \
         on every node"
    )]
    NoArchive {
        session_id: String,
        trimmed_through: u64,
    },
    /// Reading archived events from Postgres failed.
    #[error("reading archived events of session {session_id} failed: {reason}")]
    Archive { session_id: String, reason: String },
}

impl FollowError {
    /// Returns a reason short enough for a close frame (123 bytes). The
    /// full error goes to the log.
    pub fn close_reason(&self) -> &'static str {
        match self {
            FollowError::Hole { .. } => {
                "an event is missing from storage; reconnect with your last seq as cursor"
            }
            FollowError::Storage { .. } => {
                "reading storage failed; reconnect with your last seq as cursor"
            }
            FollowError::FeedClosed { .. } => "server shutting down",
            FollowError::NoArchive { .. } => {
                "older events are only in the Postgres archive, which this node cannot read"
            }
            FollowError::Archive { .. } => {
                "reading the Postgres archive failed; reconnect with your last seq as cursor"
            }
        }
    }
}

enum Mode {
    Replay,
    Live,
}

/// Produces the frames of one session after a cursor, in seq order, each
/// exactly once.
pub struct Follower {
    session_id: String,
    store: Store,
    archive: Option<ColdReader>,
    subscription: Subscription,
    last_sent: u64,
    mode: Mode,
}

impl Follower {
    /// `subscription` must be taken before the follower's first store read;
    /// see the module documentation of [`crate::tail`].
    pub fn new(
        session_id: String,
        store: Store,
        archive: Option<ColdReader>,
        subscription: Subscription,
        cursor: u64,
    ) -> Follower {
        Follower {
            session_id,
            store,
            archive,
            subscription,
            last_sent: cursor,
            mode: Mode::Replay,
        }
    }

    /// Returns the seq of the last frame handed out.
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// Returns the next frames in order, waiting for new events once the
    /// follower has caught up. Cancel-safe: a cancelled call hands nothing
    /// out and the next call resumes at the same place.
    pub async fn next_frames(&mut self) -> Result<Vec<Utf8Bytes>, FollowError> {
        loop {
            match self.mode {
                Mode::Replay => {
                    let frames = self.read_page().await?;
                    if !frames.is_empty() {
                        return Ok(frames);
                    }
                    self.mode = Mode::Live;
                }
                Mode::Live => {
                    if let Some(frames) = self.receive_live().await? {
                        return Ok(frames);
                    }
                    self.mode = Mode::Replay;
                }
            }
        }
    }

    /// Reads the next page after `last_sent`: from the local store, or from
    /// the archive while `last_sent` is below the local frontier.
    async fn read_page(&mut self) -> Result<Vec<Utf8Bytes>, FollowError> {
        let store = self.store.clone();
        let session_id = self.session_id.clone();
        let after = self.last_sent;
        let read = tokio::task::spawn_blocking(move || read_events(&store, &session_id, after))
            .await
            .map_err(|err| FollowError::Storage {
                session_id: self.session_id.clone(),
                reason: err.to_string(),
            })??;

        let page = match read {
            LocalRead::Page(page) => page,
            LocalRead::Trimmed { trimmed_through } => self.read_archived(trimmed_through).await?,
        };
        if let Some(last) = page.last() {
            self.last_sent = last.0;
        }
        Ok(page.into_iter().map(|(_, frame)| frame).collect())
    }

    /// Reads the next page after `last_sent` from the archive, up to
    /// `trimmed_through` at most, checking that the seqs continue without a
    /// gap: every trimmed event was archived first, so one missing means the
    /// archive lost it.
    async fn read_archived(
        &self,
        trimmed_through: u64,
    ) -> Result<Vec<(u64, Utf8Bytes)>, FollowError> {
        let Some(archive) = &self.archive else {
            return Err(FollowError::NoArchive {
                session_id: self.session_id.clone(),
                trimmed_through,
            });
        };
        let after = self.last_sent;
        let frames = archive
            .read(
                &self.session_id,
                after,
                trimmed_through,
                &PageLimit {
                    events: PAGE_EVENTS,
                    bytes: PAGE_BYTES,
                },
            )
            .await
            .map_err(|err| FollowError::Archive {
                session_id: self.session_id.clone(),
                reason: crate::archive::error_chain(&err),
            })?;

        let mut page = Vec::with_capacity(frames.len());
        for (expected, (seq, frame)) in (after + 1..).zip(frames) {
            if seq != expected {
                return Err(self.archive_hole(expected));
            }
            page.push((seq, Utf8Bytes::from(frame)));
        }
        if page.is_empty() {
            return Err(self.archive_hole(after + 1));
        }
        debug!(session_id = %self.session_id, from = after + 1, to = after + page.len() as u64, "archived events read for a tail");
        Ok(page)
    }

    fn archive_hole(&self, missing: u64) -> FollowError {
        warn!(session_id = %self.session_id, missing, "event missing from the archive, and trimmed locally");
        FollowError::Archive {
            session_id: self.session_id.clone(),
            reason: format!(
                "event {missing} is in neither the local store nor the Postgres archive"
            ),
        }
    }

    /// Waits for live events. Returns `None` when the follower must go back
    /// to the store: it lagged behind the feed's buffer, or the feed skipped
    /// past the next seq.
    async fn receive_live(&mut self) -> Result<Option<Vec<Utf8Bytes>>, FollowError> {
        let receiver = &mut self.subscription.receiver;
        let first = loop {
            match receiver.recv().await {
                Ok(event) if event.seq <= self.last_sent => continue,
                Ok(event) if event.seq == self.last_sent + 1 => break event,
                Ok(event) => {
                    crate::metrics::record_tail_replay();
                    debug!(session_id = %self.session_id, seq = event.seq, last_sent = self.last_sent, "live feed ahead; replaying from storage");
                    return Ok(None);
                }
                Err(RecvError::Lagged(skipped)) => {
                    crate::metrics::record_tail_replay();
                    debug!(session_id = %self.session_id, skipped, "tail lagged behind the live feed; replaying from storage");
                    return Ok(None);
                }
                Err(RecvError::Closed) => {
                    return Err(FollowError::FeedClosed {
                        session_id: self.session_id.clone(),
                    })
                }
            }
        };

        self.last_sent = first.seq;
        let mut frames = vec![first.frame];
        while frames.len() < LIVE_BATCH {
            match receiver.try_recv() {
                Ok(event) if event.seq <= self.last_sent => continue,
                Ok(event) if event.seq == self.last_sent + 1 => {
                    self.last_sent = event.seq;
                    frames.push(event.frame);
                }
                // Anything else is handled by the next call: a gap or a lag
                // sends it to the store, an empty feed makes it wait.
                Ok(_) => {
                    self.mode = Mode::Replay;
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(Some(frames))
    }
}

/// Result of a local store read after some seq.
enum LocalRead {
    /// Up to one page of (seq, frame), empty when there is nothing newer.
    Page(Vec<(u64, Utf8Bytes)>),
    /// The next event was trimmed after it was archived: the archive has
    /// everything up to this seq.
    Trimmed { trimmed_through: u64 },
}

/// Reads up to one page of events with seq greater than `after`, checking
/// that the seqs continue without a gap.
fn read_events(store: &Store, session_id: &str, after: u64) -> Result<LocalRead, FollowError> {
    let Some(first) = after.checked_add(1) else {
        return Ok(LocalRead::Page(Vec::new()));
    };
    let storage_error = |reason: String| FollowError::Storage {
        session_id: session_id.to_string(),
        reason,
    };

    // One instant for the header, the mark and the events: each apply batch
    // is atomic, so they agree with each other.
    let instant = store.keyspace.instant();
    let header = store
        .sessions
        .snapshot_at(instant)
        .get(keys::session(session_id))
        .map_err(|err| storage_error(err.to_string()))?;
    let last_seq = match header {
        Some(bytes) => {
            decode::<SessionHeader>(&bytes, "session header")
                .map_err(|err| storage_error(err.to_string()))?
                .last_seq
        }
        None => 0,
    };
    let mark = store
        .archive_marks
        .snapshot_at(instant)
        .get(keys::archive_mark(session_id))
        .map_err(|err| storage_error(err.to_string()))?;
    if let Some(bytes) = mark {
        let mark: ArchiveMark =
            decode(&bytes, "archive mark").map_err(|err| storage_error(err.to_string()))?;
        if first < mark.frontier() {
            return Ok(LocalRead::Trimmed {
                trimmed_through: mark.trimmed_through,
            });
        }
    }

    let from = keys::event(session_id, first);
    let to = keys::event(session_id, u64::MAX);
    let mut page = Vec::new();
    let mut bytes = 0;
    let events = store.events.snapshot_at(instant);
    for (expected, item) in (first..).zip(events.range(from..=to)) {
        let (key, value) = item.map_err(|err| storage_error(err.to_string()))?;
        let seq = keys::event_seq(&key).unwrap_or(0);
        if seq != expected {
            warn!(
                session_id,
                missing = expected,
                found = seq,
                "hole in stored events"
            );
            return Err(FollowError::Hole {
                session_id: session_id.to_string(),
                missing: expected,
            });
        }
        let frame = String::from_utf8(value.to_vec())
            .map_err(|err| storage_error(format!("event {seq} is not valid UTF-8: {err}")))?;

        bytes += frame.len();
        page.push((seq, Utf8Bytes::from(frame)));
        if page.len() >= PAGE_EVENTS || bytes >= PAGE_BYTES {
            break;
        }
    }

    if page.is_empty() && last_seq > after {
        warn!(
            session_id,
            missing = first,
            last_seq,
            "stored events end before the session's last_seq"
        );
        return Err(FollowError::Hole {
            session_id: session_id.to_string(),
            missing: first,
        });
    }
    Ok(LocalRead::Page(page))
}
