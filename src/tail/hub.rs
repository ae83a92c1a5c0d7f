//! Per-session live feeds, fed by the state machines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::broadcast;

use crate::consensus::{AppliedEvent, EventSink};

/// An applied event as sent to tails: its seq and its JSON frame.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub seq: u64,
    pub frame: Utf8Bytes,
}

/// The live feeds of every session that has at least one tail.
pub struct LiveHub {
    feeds: Mutex<HashMap<String, broadcast::Sender<LiveEvent>>>,
    /// Events buffered per session; a tail further behind reads the store.
    capacity: usize,
}

/// A tail's place in one session's live feed. Dropping the last one
/// removes the feed.
pub struct Subscription {
    pub receiver: broadcast::Receiver<LiveEvent>,
    session_id: String,
    hub: Arc<LiveHub>,
}

impl LiveHub {
    pub fn new(capacity: usize) -> Arc<LiveHub> {
        Arc::new(LiveHub {
            feeds: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        })
    }

    fn feeds(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<LiveEvent>>> {
        // Every critical section is a single map operation, so a poisoned map is intact.
        self.feeds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes to the live events of `session_id` from now on.
    pub fn subscribe(self: &Arc<Self>, session_id: &str) -> Subscription {
        let receiver = self
            .feeds()
            .entry(session_id.to_string())
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe();
        Subscription {
            receiver,
            session_id: session_id.to_string(),
            hub: self.clone(),
        }
    }

    /// Number of sessions with at least one tail.
    pub fn session_count(&self) -> usize {
        self.feeds().len()
    }
}

impl EventSink for LiveHub {
    fn publish(&self, events: Vec<AppliedEvent>) {
        let feeds = self.feeds();
        if feeds.is_empty() {
            return;
        }
        for event in events {
            if let Some(sender) = feeds.get(&event.session_id) {
                // An error only means every receiver has just gone away.
                let _ = sender.send(LiveEvent {
                    seq: event.seq,
                    frame: Utf8Bytes::from(event.frame),
                });
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut feeds = self.hub.feeds();
        let last = feeds
            .get(&self.session_id)
            .is_some_and(|sender| sender.receiver_count() <= 1);
        if last {
            feeds.remove(&self.session_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(session_id: &str, seq: u64) -> AppliedEvent {
        AppliedEvent {
            session_id: session_id.to_string(),
            seq,
            frame: format!("{{\"seq\":{seq}}}"),
        }
    }

    #[tokio::test]
    async fn subscriber_receives_only_its_session() {
        let hub = LiveHub::new(16);
        let mut subscription = hub.subscribe("a");
        hub.publish(vec![applied("b", 1), applied("a", 1)]);
        let event = subscription.receiver.recv().await.unwrap();
        assert_eq!(event.seq, 1);
        assert!(
            subscription.receiver.try_recv().is_err(),
            "session b's event leaked into a"
        );
    }

    #[test]
    fn last_unsubscribe_removes_feed() {
        let hub = LiveHub::new(16);
        let first = hub.subscribe("a");
        let second = hub.subscribe("a");
        drop(first);
        assert_eq!(hub.session_count(), 1);
        drop(second);
        assert_eq!(hub.session_count(), 0);
    }
}
