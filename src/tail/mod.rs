//! Tailing a session: the live feed of applied events and the follower that
//! merges it with replay from storage.
//!
//! A follower subscribes to the live feed first, then replays from the
//! store, then drops live events it already sent. Because the state machine
//! publishes an event only after it is readable from the store, every event
//! is either in the replay or arrives on the feed after the subscription, so
//! nothing falls between the two. A follower that misses live events (its
//! bounded buffer overflowed, or it saw a gap) goes back to the store.

pub mod follower;
pub mod hub;
