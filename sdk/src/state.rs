//! Keyed state: small values stored per message key.
//!
//! State belongs to (tenant, handler, message key): a handler sees only the state of the key it
//! is handling, and because messages with one key are handled one at a time, reads and writes
//! need no locks. Within a key, values are addressed by name (for example `"count"`). Writes
//! are buffered and commit with the message's other effects; reads see the committed state
//! plus this invocation's own earlier writes.
//!
//! A message without a key has no state: every operation returns a permanent error. A refused
//! write fails the invocation permanently even if the handler ignores it; an unavailable store
//! is a retryable error.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::bindings::weir::handler::state;

/// The value stored under `name` for the current key, if any.
pub fn get(name: &str) -> Result<Option<Vec<u8>>, Error> {
    state::get(name).map_err(Error::from)
}

/// Store `value` under `name` for the current key.
pub fn set(name: &str, value: &[u8]) -> Result<(), Error> {
    state::set(name, value).map_err(Error::from)
}

/// Remove the value stored under `name` for the current key (nothing happens if there is none).
pub fn delete(name: &str) -> Result<(), Error> {
    state::delete(name).map_err(Error::from)
}

/// The JSON value stored under `name` for the current key, parsed into `T`; a permanent error
/// if it does not parse.
pub fn get_json<T: DeserializeOwned>(name: &str) -> Result<Option<T>, Error> {
    get(name)?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| {
                Error::permanent(format!("state `{name}` is not the expected JSON: {e}"))
            })
        })
        .transpose()
}

/// Store `value` as JSON under `name` for the current key.
pub fn set_json(name: &str, value: &impl Serialize) -> Result<(), Error> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| Error::permanent(format!("cannot serialize state `{name}`: {e}")))?;
    set(name, &bytes)
}
