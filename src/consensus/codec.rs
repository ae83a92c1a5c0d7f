//! Encoding of stored values (postcard). Every decode failure names the key,
//! because it means the data directory is damaged.

use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard only fails on types serde cannot describe, which none of ours are.
    postcard::to_allocvec(value).expect("postcard encodes every stored type")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StorageError<u64>> {
    postcard::from_bytes(bytes).map_err(|err| {
        let message = format!("stored {what} is corrupt: {err}");
        tracing::error!(what, error = %err, "corrupt stored value");
        StorageIOError::new(
            ErrorSubject::Store,
            ErrorVerb::Read,
            openraft::AnyError::error(message),
        )
        .into()
    })
}

/// Wraps a storage engine error as an openraft storage error.
pub fn io_error(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    err: impl std::fmt::Display,
) -> StorageError<u64> {
    StorageIOError::new(subject, verb, openraft::AnyError::error(err.to_string())).into()
}
