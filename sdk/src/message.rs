//! [`Message`]: the Kafka record a handler is asked to handle.

use serde::de::DeserializeOwned;

use crate::Error;
use crate::bindings;

/// One Kafka record header: a name and raw value bytes (empty for a header sent with a null
/// value).
pub use crate::bindings::weir::handler::types::Header;

/// The message a handler is asked to handle, with the context Weir adds to it.
#[derive(Debug, Clone)]
pub struct Message {
    inner: bindings::Message,
}

impl Message {
    /// Identity of the message: its `message-id` header when present, otherwise
    /// `<topic>/<partition>/<offset>`. A redelivered message reports the same id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Topic the message was consumed from.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// Partition of that topic.
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    /// Offset within the partition.
    pub fn offset(&self) -> u64 {
        self.inner.offset
    }

    /// Record key, if the record has one. Messages with the same key are handled one at a
    /// time, in order, and share keyed [`state`](crate::state).
    pub fn key(&self) -> Option<&[u8]> {
        self.inner.key.as_deref()
    }

    /// Record key as text; `None` when there is no key or it is not UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|key| std::str::from_utf8(key).ok())
    }

    /// Record value bytes.
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// Record value as text; a permanent error if it is not UTF-8.
    pub fn payload_str(&self) -> Result<&str, Error> {
        std::str::from_utf8(self.payload())
            .map_err(|e| Error::permanent(format!("payload is not UTF-8: {e}")))
    }

    /// Record value parsed as JSON into `T`; a permanent error naming the problem (as serde
    /// reports it, e.g. "missing field `order_id`") if it does not parse.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.payload())
            .map_err(|e| Error::permanent(format!("payload is not the expected JSON: {e}")))
    }

    /// Value of the first header named `name` (names compare exactly), if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.inner
            .headers
            .iter()
            .find(|header| header.key == name)
            .map(|header| header.value.as_slice())
    }

    /// All record headers, in the order the producer wrote them.
    pub fn headers(&self) -> &[Header] {
        &self.inner.headers
    }

    /// Record timestamp in milliseconds since the Unix epoch, when the record has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.inner.timestamp_ms
    }

    /// The tenant that owns the handler.
    pub fn tenant(&self) -> &str {
        &self.inner.tenant
    }

    /// Which attempt this is: 1 for the first delivery, 2 for the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }
}

#[doc(hidden)]
impl From<bindings::Message> for Message {
    fn from(inner: bindings::Message) -> Self {
        Self { inner }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(key: Option<&[u8]>, payload: &[u8]) -> Message {
        Message::from(bindings::Message {
            id: "orders/0/7".into(),
            topic: "orders".into(),
            partition: 0,
            offset: 7,
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            headers: vec![
                Header {
                    key: "trace".into(),
                    value: b"a".to_vec(),
                },
                Header {
                    key: "trace".into(),
                    value: b"b".to_vec(),
                },
            ],
            timestamp_ms: Some(1_700_000_000_000),
            tenant: "acme".into(),
            attempt: 2,
        })
    }

    #[test]
    fn accessors_expose_the_record() {
        let m = message(Some(b"k"), b"{}");
        assert_eq!(
            (m.id(), m.topic(), m.partition(), m.offset()),
            ("orders/0/7", "orders", 0, 7)
        );
        assert_eq!((m.key(), m.key_str()), (Some(&b"k"[..]), Some("k")));
        assert_eq!((m.tenant(), m.attempt()), ("acme", 2));
        assert_eq!(m.timestamp_ms(), Some(1_700_000_000_000));
        assert_eq!(m.header("trace"), Some(&b"a"[..]));
        assert_eq!(m.header("Trace"), None);
        assert_eq!(m.headers().len(), 2);
    }

    #[test]
    fn non_utf8_key_has_no_text() {
        let m = message(Some(&[0xff]), b"");
        assert_eq!(m.key_str(), None);
        assert_eq!(message(None, b"").key_str(), None);
    }

    #[test]
    fn bad_payloads_are_permanent_errors() {
        let err = message(None, &[0xff]).payload_str().err();
        assert!(err.is_some_and(|e| e.is_permanent() && e.message().contains("UTF-8")));

        #[derive(serde::Deserialize)]
        struct Order {
            #[allow(dead_code)]
            order_id: String,
        }
        let err = message(None, b"{}").json::<Order>().err();
        assert!(err.is_some_and(|e| e.is_permanent() && e.message().contains("`order_id`")));
        let err = message(None, b"{not json")
            .json::<serde_json::Value>()
            .err();
        assert!(err.is_some_and(|e| e.is_permanent()));
    }
}
