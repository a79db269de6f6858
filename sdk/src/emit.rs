//! Emit messages to Kafka topics.
//!
//! Emitted messages are buffered and published after the handled message commits, in the order
//! they were emitted; nothing is published if the handler fails. The host gives each one its
//! own stable `message-id` header and a `causation-id` header naming the handled message.
//!
//! A refused emit (topic not allowed, message too large, too many emits) fails the whole
//! invocation permanently even if the handler ignores the error and returns `Ok`, so pass it
//! on with `?`.

use serde::Serialize;

use crate::Error;
use crate::bindings::weir::handler::emit;
use crate::message::Header;

/// Emit `payload` with `key` to `topic`.
pub fn send(topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<(), Error> {
    emit::send(topic, key, payload, &[]).map_err(Error::from)
}

/// Emit `payload` with `key` and `headers` (name, value) to `topic`.
pub fn send_with_headers(
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: &[(&str, &[u8])],
) -> Result<(), Error> {
    let headers: Vec<Header> = headers
        .iter()
        .map(|(name, value)| Header {
            key: (*name).to_owned(),
            value: value.to_vec(),
        })
        .collect();
    emit::send(topic, key, payload, &headers).map_err(Error::from)
}

/// Emit `value` serialized as JSON, with `key`, to `topic`.
pub fn json(topic: &str, key: Option<&[u8]>, value: &impl Serialize) -> Result<(), Error> {
    let payload = serde_json::to_vec(value)
        .map_err(|e| Error::permanent(format!("cannot serialize message for `{topic}`: {e}")))?;
    send(topic, key, &payload)
}
