//! What goes into an invocation and what comes out of it, in host terms.
//!
//! Owns the host-side message, the invocation context (binding settings, output-topic
//! allowlist, where keyed state is read from), the buffered effects and the outcome. These are
//! plain data: the pipeline turns effects into outbox rows and state writes; the runtime applies
//! nothing and knows nothing of Kafka or SQL.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

/// The message handed to a handler, and one record header: the WIT `message` and `header`
/// records themselves, so an invocation passes the message to the guest without copying it
/// first.
pub use super::bindings::weir::handler::types::{Header, Message};

/// Where an invocation reads committed keyed state from. The pipeline serves it from the store
/// (plus writes not yet committed); `weir handler test` from the initial state it was given.
pub trait StateSource: Send + Sync {
    /// The committed value of `name` under `key`, if any. An error means the store could not be
    /// read; the guest sees `state-error::unavailable`.
    fn get<'a>(
        &'a self,
        key: &'a [u8],
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>>;
}

/// A [`StateSource`] over a fixed map of `(key, name) → value`.
#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    values: BTreeMap<(Vec<u8>, String), Vec<u8>>,
}

impl MemoryState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Store `value` under `(key, name)`.
    pub fn insert(
        &mut self,
        key: impl Into<Vec<u8>>,
        name: impl Into<String>,
        value: impl Into<Vec<u8>>,
    ) {
        self.values.insert((key.into(), name.into()), value.into());
    }

    /// Apply an invocation's writes for `key`, in order.
    pub fn apply(&mut self, key: &[u8], writes: &[StateWrite]) {
        for write in writes {
            match &write.value {
                Some(value) => self.insert(key.to_vec(), write.name.clone(), value.clone()),
                None => {
                    self.values.remove(&(key.to_vec(), write.name.clone()));
                }
            }
        }
    }
}

impl StateSource for MemoryState {
    fn get<'a>(
        &'a self,
        key: &'a [u8],
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        let value = self.values.get(&(key.to_vec(), name.to_owned())).cloned();
        Box::pin(async move { Ok(value) })
    }
}

/// Which topics an invocation may emit to.
#[derive(Debug, Clone, Default)]
pub enum OutputTopics {
    /// Any topic (the default for `weir handler test`).
    #[default]
    Any,
    /// Only these topics.
    Only(Arc<HashSet<String>>),
}

impl OutputTopics {
    /// Whether `topic` may be emitted to.
    pub fn allows(&self, topic: &str) -> bool {
        match self {
            OutputTopics::Any => true,
            OutputTopics::Only(topics) => topics.contains(topic),
        }
    }
}

/// What an invocation runs with besides the message: the binding's side of the contract.
#[derive(Clone)]
pub struct InvocationContext {
    /// The binding's configuration, as the `config` import shows it.
    pub config: Arc<BTreeMap<String, String>>,
    /// Topics the binding may emit to.
    pub output_topics: OutputTopics,
    /// Committed keyed state.
    pub state: Arc<dyn StateSource>,
    /// Deadline of this invocation; `None` uses the runtime's `deadline_ms`.
    pub deadline: Option<Duration>,
    /// The binding's outbound-HTTP gate; `None`: every `wasi:http` request is refused.
    pub http: Option<Arc<crate::outbound::HttpGate>>,
}

impl Default for InvocationContext {
    fn default() -> Self {
        Self {
            config: Arc::default(),
            output_topics: OutputTopics::Any,
            state: Arc::new(MemoryState::new()),
            deadline: None,
            http: None,
        }
    }
}

impl fmt::Debug for InvocationContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvocationContext")
            .field("config", &self.config)
            .field("output_topics", &self.output_topics)
            .field("deadline", &self.deadline)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// One buffered emit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Emit {
    /// Destination topic.
    pub topic: String,
    /// Record key.
    #[serde(serialize_with = "crate::runtime::invocation::opt_bytes_as_text")]
    pub key: Option<Vec<u8>>,
    /// Record value.
    #[serde(serialize_with = "crate::runtime::invocation::bytes_as_text")]
    pub payload: Vec<u8>,
    /// Record headers set by the handler (the host adds its own when publishing).
    #[serde(serialize_with = "crate::runtime::invocation::headers_as_text")]
    pub headers: Vec<Header>,
}

/// One buffered keyed-state write for the message's key: a set (`Some`) or a delete (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateWrite {
    /// State name within the key.
    pub name: String,
    /// New value, or `None` for a delete.
    #[serde(serialize_with = "crate::runtime::invocation::opt_bytes_as_text")]
    pub value: Option<Vec<u8>>,
}

/// The effects of a successful invocation, in the order the handler asked for them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Effects {
    /// Messages to publish, in emit order.
    pub emits: Vec<Emit>,
    /// Keyed-state writes for the message's key, in call order.
    pub state_writes: Vec<StateWrite>,
}

impl Effects {
    /// Whether there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        self.emits.is_empty() && self.state_writes.is_empty()
    }
}

/// Severity of a handler log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// The `log` import.
    Log,
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
}

/// One log line written by the handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogRecord {
    /// Severity.
    pub level: LogLevel,
    /// Origin.
    pub source: LogSource,
    /// Text (truncated to the runtime's `max_log_line_bytes`).
    pub message: String,
    /// Structured fields.
    pub fields: Vec<(String, String)>,
}

/// How a handler failure should be treated (SEMANTICS §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Worth retrying after backoff.
    Retryable,
    /// Dead-letter at once.
    Permanent,
}

/// Why an instance trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrapKind {
    /// Ran past its deadline (treated as retryable).
    Deadline,
    /// Tried to grow memory or a table past its cap.
    Memory,
    /// Overflowed its stack.
    StackOverflow,
    /// Executed `unreachable`, e.g. a Rust panic or abort.
    Unreachable,
    /// Any other trap (bad memory access, division by zero, a trapping WASI call, …).
    Other,
}

impl TrapKind {
    /// How the pipeline should treat this trap: running out of time is retryable, every other
    /// trap is permanent.
    pub fn error_kind(self) -> ErrorKind {
        match self {
            TrapKind::Deadline => ErrorKind::Retryable,
            _ => ErrorKind::Permanent,
        }
    }
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// `handle` returned `ok`; the effects are to be committed.
    Ok,
    /// `handle` returned an error.
    HandlerError {
        /// Retryable or permanent.
        kind: ErrorKind,
        /// The handler's explanation.
        message: String,
    },
    /// The host refused one of the invocation's effects (an output topic the binding does not
    /// allow, or a size or count limit), so none of them count, whatever `handle` returned.
    /// Treated as a permanent error.
    Refused {
        /// The first refusal.
        message: String,
    },
    /// The instance trapped; it has been discarded.
    Trap {
        /// What kind of trap.
        kind: TrapKind,
        /// wasmtime's description, with the guest backtrace when there is one.
        message: String,
    },
}

impl Outcome {
    /// Whether the invocation succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }

    /// How a failure should be treated, `None` on success.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        match self {
            Outcome::Ok => None,
            Outcome::HandlerError { kind, .. } => Some(*kind),
            Outcome::Refused { .. } => Some(ErrorKind::Permanent),
            Outcome::Trap { kind, .. } => Some(kind.error_kind()),
        }
    }
}

/// The result of one invocation. `effects` is empty unless `outcome` is [`Outcome::Ok`]: a
/// failed or trapped invocation leaves no effects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Invocation {
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Effects to commit (only on success).
    pub effects: Effects,
    /// Log lines, kept whatever the outcome.
    pub logs: Vec<LogRecord>,
    /// Log lines dropped over the per-invocation cap.
    pub logs_dropped: u32,
    /// Wall time spent in the guest call.
    #[serde(
        serialize_with = "crate::runtime::invocation::duration_as_micros",
        rename = "duration_us"
    )]
    pub duration: Duration,
}

/// Bytes as a UTF-8 string when they are one, else as `{"base64": …}`: readable in the common
/// case, lossless always.
pub(crate) fn bytes_as_text<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => s.serialize_str(text),
        Err(_) => {
            use base64::Engine as _;
            use serde::ser::SerializeMap;
            let mut map = s.serialize_map(Some(1))?;
            map.serialize_entry(
                "base64",
                &base64::engine::general_purpose::STANDARD.encode(bytes),
            )?;
            map.end()
        }
    }
}

/// Bytes that serialize as by [`bytes_as_text`], for JSON built by hand.
pub struct BytesText<'a>(pub &'a [u8]);

impl Serialize for BytesText<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        bytes_as_text(self.0, s)
    }
}

/// Headers as `[{"key": …, "value": …}]`, values as by [`bytes_as_text`].
pub(crate) fn headers_as_text<S: serde::Serializer>(
    headers: &[Header],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    #[derive(Serialize)]
    struct Text<'a> {
        key: &'a str,
        #[serde(serialize_with = "bytes_as_text")]
        value: &'a [u8],
    }
    let mut seq = s.serialize_seq(Some(headers.len()))?;
    for header in headers {
        seq.serialize_element(&Text {
            key: &header.key,
            value: &header.value,
        })?;
    }
    seq.end()
}

pub(crate) fn opt_bytes_as_text<S: serde::Serializer>(
    bytes: &Option<Vec<u8>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(bytes) => bytes_as_text(bytes, s),
        None => s.serialize_none(),
    }
}

pub(crate) fn duration_as_micros<S: serde::Serializer>(
    d: &Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}
