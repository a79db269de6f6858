//! W3C trace context of a message (`traceparent`): read from the consumed record, continued on
//! every record the handler emits.
//!
//! Owns the parsing of `traceparent` (version `00`: `00-<trace-id>-<parent-id>-<flags>`, lower
//! hex, neither id all zeros) and the identity of a message's processing span: a span id (and,
//! for a message that arrived without a valid trace context, a new trace id) derived from the
//! binding and the message id, so a message processed twice (a retry, a redelivery) reports the
//! same ids, and its effects — committed once — carry one `traceparent`:
//! `00-<trace-id of the input>-<span id of the processing>-<flags of the input>`.
//!
//! Pure: no clock, no randomness, no I/O. Knows nothing of Kafka or the store.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::runtime::Message;

/// The header carrying the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The trace context of one message's processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace the message belongs to.
    pub trace_id: [u8; 16],
    /// The span of the message's processing (the parent of whatever it emits).
    pub span_id: [u8; 8],
    /// The span that produced the message, when the record carried a trace context.
    pub parent_id: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled), from the input; `01` for a new trace.
    pub flags: u8,
}

impl TraceContext {
    /// The context of `message` processed by `binding`: continuing the trace of its
    /// `traceparent` header when it has a valid one, else a new trace.
    pub fn for_message(binding: &str, message: &Message) -> Self {
        let incoming = message
            .headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(TRACEPARENT))
            .and_then(|h| parse(&h.value));
        let digest = Sha256::new()
            .chain_update(binding.as_bytes())
            .chain_update([0])
            .chain_update(message.id.as_bytes())
            .finalize();
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&digest[..8]);
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        match incoming {
            Some((trace_id, parent_id, flags)) => Self {
                trace_id,
                span_id,
                parent_id: Some(parent_id),
                flags,
            },
            None => {
                let mut trace_id = [0u8; 16];
                trace_id.copy_from_slice(&digest[8..24]);
                if trace_id == [0; 16] {
                    trace_id[15] = 1;
                }
                Self {
                    trace_id,
                    span_id,
                    parent_id: None,
                    flags: 1,
                }
            }
        }
    }

    /// The `traceparent` records emitted while processing carry: this trace, this span as
    /// their parent.
    pub fn child_traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    /// The trace id as 32 lower-case hex digits (displayed lazily, for log fields).
    pub fn trace_id_hex(&self) -> impl fmt::Display + '_ {
        Hex(&self.trace_id)
    }

    /// The span id as 16 lower-case hex digits.
    pub fn span_id_hex(&self) -> impl fmt::Display + '_ {
        Hex(&self.span_id)
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Parse a version-00 `traceparent`: (trace id, parent id, flags). `None` if malformed.
pub fn parse(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" {
        return None;
    }
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(trace, 32) || !lower_hex(parent, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut parent_id = [0u8; 8];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(parent, &mut parent_id).ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, parent_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Header;

    const INCOMING: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn message(id: &str, traceparent: Option<&str>) -> Message {
        Message {
            id: id.to_owned(),
            topic: "orders".to_owned(),
            partition: 0,
            offset: 1,
            key: None,
            payload: Vec::new(),
            headers: traceparent
                .map(|t| Header {
                    key: "traceparent".to_owned(),
                    value: t.as_bytes().to_vec(),
                })
                .into_iter()
                .collect(),
            timestamp_ms: None,
            tenant: "acme".to_owned(),
            attempt: 1,
        }
    }

    #[test]
    fn a_valid_context_is_continued_with_a_new_span() {
        let context = TraceContext::for_message("acme.orders", &message("m-1", Some(INCOMING)));
        let child = context.child_traceparent();
        assert!(
            child.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{child}"
        );
        assert!(child.ends_with("-01"), "{child}");
        assert_ne!(child, INCOMING);
        assert_eq!(
            context.parent_id,
            Some(*b"\xb7\xad\x6b\x71\x69\x20\x33\x31")
        );
        let (trace, span, flags) = parse(child.as_bytes()).unwrap();
        assert_eq!(trace, context.trace_id);
        assert_eq!(span, context.span_id);
        assert_eq!(flags, 1);
    }

    #[test]
    fn the_ids_are_stable_per_message_and_binding() {
        let a = TraceContext::for_message("acme.orders", &message("m-1", None));
        assert_eq!(
            a,
            TraceContext::for_message("acme.orders", &message("m-1", None))
        );
        assert_ne!(
            a,
            TraceContext::for_message("acme.orders", &message("m-2", None))
        );
        assert_ne!(
            a,
            TraceContext::for_message("acme.other", &message("m-1", None))
        );
        assert_eq!(a.parent_id, None);
        assert_eq!(a.flags, 1);
        assert_eq!(a.trace_id_hex().to_string().len(), 32);
        assert_eq!(a.span_id_hex().to_string().len(), 16);
    }

    #[test]
    fn malformed_contexts_start_a_new_trace() {
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-xyz-b7ad6b7169203331-01",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
            let context = TraceContext::for_message("b", &message("m", Some(bad)));
            assert_eq!(context.parent_id, None, "{bad}");
        }
    }
}
