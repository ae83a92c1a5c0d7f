//! The session domain: ids, events, headers and the append rules.
//!
//! Nothing here does I/O. The state machine calls [`rules::decide_append`]
//! with what it read from storage, and the API calls [`request`] to turn a
//! JSON body into a validated event.

pub mod canonical;
pub mod event;
pub mod header;
pub mod id;
pub mod request;
pub mod retention;
pub mod rules;
pub mod timestamp;

/// A request that breaks the contract; the message names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

impl InvalidRequest {
    pub fn new(message: impl Into<String>) -> Self {
        InvalidRequest(message.into())
    }
}
