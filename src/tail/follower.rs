//! The follower behind one tail socket: replay from the store, then live.

use axum::extract::ws::Utf8Bytes;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use super::hub::Subscription;
use crate::consensus::state_machine::read_header;
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
        subscription: Subscription,
        cursor: u64,
    ) -> Follower {
        Follower {
            session_id,
            store,
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

    /// Reads the next page after `last_sent` from the store.
    async fn read_page(&mut self) -> Result<Vec<Utf8Bytes>, FollowError> {
        let store = self.store.clone();
        let session_id = self.session_id.clone();
        let after = self.last_sent;
        let page = tokio::task::spawn_blocking(move || read_events(&store, &session_id, after))
            .await
            .map_err(|err| FollowError::Storage {
                session_id: self.session_id.clone(),
                reason: err.to_string(),
            })??;

        if let Some(last) = page.last() {
            self.last_sent = last.0;
        }
        Ok(page.into_iter().map(|(_, frame)| frame).collect())
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

/// Reads up to one page of events with seq greater than `after`, checking
/// that the seqs continue without a gap.
fn read_events(
    store: &Store,
    session_id: &str,
    after: u64,
) -> Result<Vec<(u64, Utf8Bytes)>, FollowError> {
    let Some(first) = after.checked_add(1) else {
        return Ok(Vec::new());
    };

    // Read before the events: every event up to this last_seq was written
    // with or before the header, so the range below must contain them.
    let last_seq = read_header(store, session_id)
        .map_err(|err| FollowError::Storage {
            session_id: session_id.to_string(),
            reason: err.to_string(),
        })?
        .map_or(0, |header| header.last_seq);
    let from = keys::event(session_id, first);
    let to = keys::event(session_id, u64::MAX);

    let mut page = Vec::new();
    let mut bytes = 0;
    for (expected, item) in (first..).zip(store.events.range(from..=to)) {
        let (key, value) = item.map_err(|err| FollowError::Storage {
            session_id: session_id.to_string(),
            reason: err.to_string(),
        })?;
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
        let frame = String::from_utf8(value.to_vec()).map_err(|err| FollowError::Storage {
            session_id: session_id.to_string(),
            reason: format!("event {seq} is not valid UTF-8: {err}"),
        })?;

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
    Ok(page)
}
