//! The plain records that cross the store boundary, and the encodings both engines share
//! (header lists as JSON, enum names as text).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::StoreError;
use crate::runtime::{Header, StateWrite};

/// One stored version of a handler: metadata only, the component bytes are fetched with
/// [`Store::component_bytes`](super::Store::component_bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandlerVersion {
    /// Owning tenant.
    pub tenant: String,
    /// Handler name, unique within the tenant.
    pub handler: String,
    /// Version number: 1 for the first upload of this handler, then increasing by one.
    pub version: i32,
    /// SHA-256 of the component bytes, lower-case hex.
    pub sha256: String,
    /// Size of the component in bytes.
    pub size: i64,
    /// When this version was first uploaded.
    pub created_at: DateTime<Utc>,
}

/// A binding as stored: which handler it runs and its policy, as a JSON document the store
/// does not interpret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindingRecord {
    /// Binding id, unique across tenants.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Name of the handler it runs (of the same tenant).
    pub handler: String,
    /// The binding's policy (topics, group, retry, breaker, …).
    pub spec: serde_json::Value,
    /// 1 when created, increased by one on every update.
    pub revision: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last changed.
    pub updated_at: DateTime<Utc>,
}

/// A message the pipeline finished successfully, with the effects to commit for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The binding that processed it (first half of the processed key). Shared: every
    /// completion of a binding names the same one.
    pub binding_id: Arc<str>,
    /// The tenant owning the binding; keyed state and outbox rows are filed under it.
    pub tenant: Arc<str>,
    /// The handler that ran; keyed state is scoped to `(tenant, handler, key)`.
    pub handler: Arc<str>,
    /// The message's identity (second half of the processed key).
    pub message_id: String,
    /// The message key; required when there are state writes.
    pub key: Option<Vec<u8>>,
    /// Keyed-state writes for `key`, in the order the handler made them.
    pub state_writes: Vec<StateWrite>,
    /// Messages to publish through the outbox, in emit order.
    pub emits: Vec<OutboxInsert>,
    /// The DLQ entry this message replays, if it is a replay: the same transaction marks the
    /// entry `replayed` (also when the completion is a duplicate).
    pub replay_of: Option<i64>,
}

/// One message to publish through the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxInsert {
    /// The record's own stable id (its `message-id` header). Unique in the outbox: inserting an
    /// id that is already there is a no-op.
    pub message_id: String,
    /// Destination topic.
    pub topic: String,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Headers set by the handler (the relay adds Weir's own when publishing).
    pub headers: Vec<Header>,
    /// Id of the message whose processing caused this one.
    pub causation_id: String,
    /// W3C `traceparent` of the causing message's trace, when there is one.
    pub traceparent: Option<String>,
}

/// What happened to one completion (or one outbox insert) of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitOutcome {
    /// New: its processed key and effects are now committed.
    Committed,
    /// Already processed (earlier, or earlier in the same batch): its effects were dropped.
    Duplicate,
}

/// Where an outbox row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxState {
    /// Not yet published.
    Pending,
    /// Published and acknowledged by the broker.
    Sent,
    /// A publish attempt failed; it will be retried.
    Error,
}

/// An outbox row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Row id; increases with insertion order.
    pub id: i64,
    /// The record's stable message id.
    pub message_id: String,
    /// Tenant that caused it.
    pub tenant: String,
    /// Binding whose handler emitted it; `None` for rows inserted directly (ingest).
    pub binding_id: Option<String>,
    /// Destination topic.
    pub topic: String,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Headers set by the handler.
    pub headers: Vec<Header>,
    /// Id of the causing message.
    pub causation_id: String,
    /// W3C `traceparent`, when there is one.
    pub traceparent: Option<String>,
    /// Pending, sent or error.
    pub state: OutboxState,
    /// Failed publish attempts so far.
    pub attempts: i32,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When the row was written.
    pub created_at: DateTime<Utc>,
    /// When it was marked sent.
    pub sent_at: Option<DateTime<Utc>>,
}

/// How a message failed, as recorded in a DLQ entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DlqErrorKind {
    /// The handler kept returning a retryable error (or timing out) until retries ran out.
    Retryable,
    /// The handler returned a permanent error, or the message could not be decoded.
    Permanent,
    /// The handler trapped (panic, out of memory, stack overflow, …).
    Trap,
}

/// Where a DLQ entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DlqState {
    /// Waiting for an operator.
    Pending,
    /// Queued for replay to its binding; becomes `replayed` when the replay commits, or
    /// `pending` again if it fails again.
    Replaying,
    /// Re-delivered to its binding.
    Replayed,
    /// Dropped on purpose, with a note.
    Discarded,
}

/// How an operator resolved a DLQ entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// It was re-delivered to its binding.
    Replayed,
    /// It was dropped on purpose.
    Discarded,
}

impl From<Resolution> for DlqState {
    fn from(resolution: Resolution) -> Self {
        match resolution {
            Resolution::Replayed => DlqState::Replayed,
            Resolution::Discarded => DlqState::Discarded,
        }
    }
}

/// A message to dead-letter: the whole record and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqEntryInsert {
    /// Owning tenant.
    pub tenant: String,
    /// Binding that consumed the message (replay re-delivers to it only).
    pub binding_id: String,
    /// Handler that ran.
    pub handler: String,
    /// Handler version that ran, when one did.
    pub handler_version: Option<i32>,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The message's identity.
    pub message_id: String,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Record headers, in order.
    pub headers: Vec<Header>,
    /// Record timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// How it failed.
    pub error_kind: DlqErrorKind,
    /// The last error's message.
    pub error_message: String,
    /// Attempts made.
    pub attempts: i32,
    /// When the first attempt failed.
    pub first_failure_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failure_at: DateTime<Utc>,
}

/// A DLQ entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqEntry {
    /// Entry id; increases with insertion order (the key of [`DlqFilter::after_id`]).
    pub id: i64,
    /// The dead-lettered record and its failure.
    pub entry: DlqEntryInsert,
    /// Pending, replayed or discarded.
    pub state: DlqState,
    /// When it was resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// The operator's note on the resolution.
    pub resolution_note: Option<String>,
}

/// Which of a binding's queued replays a worker may claim ([`super::Store::dlq_claim_replays`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayScope<'a> {
    /// Every one.
    Any,
    /// Those of the partitions the worker holds, and those of topics its binding no longer
    /// reads (no worker holds their partitions: any worker runs them). Another replica's
    /// partitions are left to it instead of leased here for nothing.
    Held {
        /// The topics the binding reads.
        topics: &'a [String],
        /// The `(topic, partition)`s the worker holds.
        partitions: &'a [(String, i32)],
    },
}

/// Which DLQ entries to list. Every field narrows the result; entries come in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqFilter {
    /// Only this tenant's entries. `None` lists every tenant's: for the platform admin only.
    pub tenant: Option<String>,
    /// Only entries of this binding.
    pub binding_id: Option<String>,
    /// Only entries of this handler.
    pub handler: Option<String>,
    /// Only entries with this error kind.
    pub error_kind: Option<DlqErrorKind>,
    /// Only entries whose last failure is at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only entries whose last failure is before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only entries in this state.
    pub state: Option<DlqState>,
    /// Keyset pagination: only entries with a larger id (pass the last id of the previous
    /// page).
    pub after_id: Option<i64>,
    /// Page size; 0 means [`MAX_DLQ_PAGE`], and larger values are capped at it.
    pub limit: u32,
}

/// The largest page [`Store::dlq_list`](super::Store::dlq_list) returns.
pub const MAX_DLQ_PAGE: u32 = 1_000;

/// The largest number of rows [`Store::outbox_claim`](super::Store::outbox_claim) claims at
/// once.
pub const MAX_OUTBOX_CLAIM: u32 = 10_000;

impl DlqFilter {
    /// The page size to use.
    pub fn page_size(&self) -> i64 {
        let limit = if self.limit == 0 {
            MAX_DLQ_PAGE
        } else {
            self.limit.min(MAX_DLQ_PAGE)
        };
        i64::from(limit)
    }
}

/// The text stored for enum values, and parsing it back.
macro_rules! text_enum {
    ($ty:ident, $table:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }

            pub(crate) fn decode(text: &str) -> Result<Self, StoreError> {
                text.parse()
                    .map_err(|()| StoreError::corrupt($table, format!("unknown {} {text:?}", stringify!($ty))))
            }
        }

        impl FromStr for $ty {
            type Err = ();

            fn from_str(text: &str) -> Result<Self, ()> {
                match text {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(()),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(OutboxState, "outbox", { Pending => "pending", Sent => "sent", Error => "error" });
text_enum!(DlqErrorKind, "dlq_entries", {
    Retryable => "retryable",
    Permanent => "permanent",
    Trap => "trap",
});
text_enum!(DlqState, "dlq_entries", {
    Pending => "pending",
    Replaying => "replaying",
    Replayed => "replayed",
    Discarded => "discarded",
});

/// Headers as stored: a JSON array of `{"key": …, "value": …}`, the value a string when the
/// bytes are UTF-8 and `{"base64": …}` otherwise (the same shape `weir handler test` prints), so
/// that an operator reading the table sees text and nothing is lost.
pub(crate) fn encode_headers(headers: &[Header]) -> String {
    use crate::runtime::BytesText;
    #[derive(Serialize)]
    struct Stored<'a> {
        key: &'a str,
        value: BytesText<'a>,
    }
    let stored: Vec<Stored<'_>> = headers
        .iter()
        .map(|header| Stored {
            key: &header.key,
            value: BytesText(&header.value),
        })
        .collect();
    // Serializing strings and byte slices to JSON cannot fail.
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".to_owned())
}

/// The inverse of [`encode_headers`].
pub(crate) fn decode_headers(table: &'static str, text: &str) -> Result<Vec<Header>, StoreError> {
    use base64::Engine as _;
    let bad = |detail: String| StoreError::corrupt(table, format!("headers: {detail}"));
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|error| bad(error.to_string()))?;
    let items = value
        .as_array()
        .ok_or_else(|| bad("not a JSON array".into()))?;
    items
        .iter()
        .map(|item| {
            let key = item
                .get("key")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| bad("a header without a string key".into()))?;
            let value = match item.get("value") {
                Some(serde_json::Value::String(text)) => text.as_bytes().to_vec(),
                Some(serde_json::Value::Object(object)) => {
                    let encoded = object
                        .get("base64")
                        .and_then(serde_json::Value::as_str)
                        .ok_or_else(|| bad(format!("header {key:?}: value is not text")))?;
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|error| bad(format!("header {key:?}: {error}")))?
                }
                _ => return Err(bad(format!("header {key:?} without a value"))),
            };
            Ok(Header {
                key: key.to_owned(),
                value,
            })
        })
        .collect()
}

/// Hex SHA-256 of component bytes.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Limits checked when a handler version is stored; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Handlers the tenant may have, at most.
    pub max_handlers: Option<i64>,
    /// Component bytes the tenant may store over all its versions, at most.
    pub max_total_bytes: Option<i64>,
}

/// A handler and its versions, summed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandlerSummary {
    /// Owning tenant.
    pub tenant: String,
    /// Handler name.
    pub handler: String,
    /// The active version, if one is active.
    pub active_version: Option<i32>,
    /// The highest version number.
    pub latest_version: i32,
    /// How many versions are stored.
    pub versions: i64,
    /// Component bytes over all versions.
    pub total_bytes: i64,
    /// When the handler was created.
    pub created_at: DateTime<Utc>,
}

/// What a tenant uses of its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TenantUsage {
    /// Handlers.
    pub handlers: i64,
    /// Component bytes over all versions of all handlers.
    pub total_bytes: i64,
}

/// A tenant to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTenant {
    /// Tenant id: the name every object of the tenant is filed under.
    pub id: String,
    /// Its own quotas; `None` fields take the platform defaults.
    pub quota: Quota,
}

/// A tenant's rate limit: a token bucket of `burst` messages refilled at
/// `messages_per_second`, enforced by each host on the tenant's bindings there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RateLimit {
    /// Messages per second, at least 1.
    pub messages_per_second: u32,
    /// Messages admitted at once after an idle spell, at least 1.
    pub burst: u32,
}

impl RateLimit {
    /// The limit the two nullable columns hold (none unless both are set and in range).
    pub(crate) fn from_columns(per_second: Option<i64>, burst: Option<i64>) -> Option<Self> {
        Some(Self {
            messages_per_second: u32::try_from(per_second?).ok()?,
            burst: u32::try_from(burst?).ok()?,
        })
    }

    /// The two columns, for a limit or none.
    pub(crate) fn columns(limit: Option<Self>) -> (Option<i64>, Option<i64>) {
        match limit {
            Some(l) => (
                Some(i64::from(l.messages_per_second)),
                Some(i64::from(l.burst)),
            ),
            None => (None, None),
        }
    }

    /// [`StoreError::Invalid`] for a rate or burst of 0.
    pub(crate) fn validate(limit: Option<Self>) -> Result<(), crate::store::StoreError> {
        match limit {
            Some(l) if l.messages_per_second == 0 => Err(crate::store::StoreError::Invalid(
                "rate limit: messages_per_second must be at least 1".into(),
            )),
            Some(l) if l.burst == 0 => Err(crate::store::StoreError::Invalid(
                "rate limit: burst must be at least 1".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// A tenant as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Tenant id.
    pub id: String,
    /// Its own quotas (`None`: the platform default).
    pub quota: Quota,
    /// Its rate limit, if it has one.
    pub rate_limit: Option<RateLimit>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A token to record: the secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// Public id of the token (shown in lists, used to revoke it).
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// SHA-256 of the secret, lower-case hex.
    pub sha256: String,
    /// A label for humans.
    pub label: Option<String>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A token as stored (without its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// A label for humans.
    pub label: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Quota {
    /// Whether neither limit is set.
    pub(crate) fn is_unlimited(&self) -> bool {
        self.max_handlers.is_none() && self.max_total_bytes.is_none()
    }

    /// Refuse negative limits.
    pub(crate) fn validate(&self, owner: &str) -> Result<(), StoreError> {
        if self.max_handlers.is_some_and(|max| max < 0) {
            return Err(StoreError::Invalid(format!(
                "quota of {owner}: max_handlers is negative"
            )));
        }
        if self.max_total_bytes.is_some_and(|max| max < 0) {
            return Err(StoreError::Invalid(format!(
                "quota of {owner}: max_total_bytes is negative"
            )));
        }
        Ok(())
    }

    /// [`StoreError::QuotaExceeded`] if storing `size` more component bytes for `tenant`'s
    /// `handler` (a handler it does not have yet when `new_handler`) would pass a limit, given
    /// what the tenant uses now. A limit reached exactly is not passed.
    pub(crate) fn check(
        &self,
        tenant: &str,
        handler: &str,
        usage: TenantUsage,
        new_handler: bool,
        size: i64,
    ) -> Result<(), StoreError> {
        if let Some(max) = self.max_handlers
            && new_handler
            && usage.handlers.saturating_add(1) > max
        {
            return Err(StoreError::QuotaExceeded(format!(
                "tenant {tenant} has {} handler(s), at most {max}: cannot add handler {handler}",
                usage.handlers
            )));
        }
        if let Some(max) = self.max_total_bytes
            && usage.total_bytes.saturating_add(size) > max
        {
            return Err(StoreError::QuotaExceeded(format!(
                "tenant {tenant} stores {} component bytes, at most {max}: cannot add {size} \
                 more for handler {handler}",
                usage.total_bytes
            )));
        }
        Ok(())
    }
}

/// Refuse a tenant without an id or with a negative quota.
pub(crate) fn validate_tenant(tenant: &NewTenant) -> Result<(), StoreError> {
    if tenant.id.is_empty() {
        return Err(StoreError::Invalid("tenant: empty id".to_owned()));
    }
    tenant.quota.validate(&format!("tenant {}", tenant.id))
}

/// The answer to a change of pending DLQ entry `id` of `tenant` that changed nothing, given
/// the entry's state (`None`: no such entry).
pub(crate) fn not_pending(tenant: &str, id: i64, state: Option<String>) -> StoreError {
    match state {
        None => StoreError::NotFound(format!("dlq entry {id} of tenant {tenant}")),
        Some(state) => StoreError::Conflict(format!("dlq entry {id} is {state}, not pending")),
    }
}

/// Refuse a token hash that is not 64 lower-case hex digits.
pub(crate) fn validate_token_hash(sha256: &str) -> Result<(), StoreError> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "token hash: expected 64 lower-case hex digits (sha-256)".to_owned(),
        ))
    }
}

impl TokenRecord {
    /// Whether the token authenticates at `now`: not revoked, not expired.
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|expiry| now < expiry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_text_and_binary_values() {
        let headers = vec![
            Header {
                key: "content-type".into(),
                value: b"application/json".to_vec(),
            },
            Header {
                key: "trace".into(),
                value: vec![0xde, 0xad, 0x00, 0xff],
            },
            Header {
                key: "empty".into(),
                value: Vec::new(),
            },
            Header {
                key: "content-type".into(),
                value: "naïve ✓".as_bytes().to_vec(),
            },
        ];
        let text = encode_headers(&headers);
        assert!(text.contains(r#""value":"application/json""#), "{text}");
        assert!(text.contains(r#""base64""#), "{text}");
        assert_eq!(decode_headers("outbox", &text).unwrap(), headers);
        assert_eq!(decode_headers("outbox", "[]").unwrap(), Vec::new());
        assert!(decode_headers("outbox", "{}").is_err());
        assert!(decode_headers("outbox", r#"[{"key": "a", "value": 1}]"#).is_err());
    }

    #[test]
    fn enum_names_round_trip_and_unknown_ones_are_corrupt() {
        for state in [OutboxState::Pending, OutboxState::Sent, OutboxState::Error] {
            assert_eq!(OutboxState::decode(state.as_str()).unwrap(), state);
        }
        for kind in [
            DlqErrorKind::Retryable,
            DlqErrorKind::Permanent,
            DlqErrorKind::Trap,
        ] {
            assert_eq!(DlqErrorKind::decode(kind.as_str()).unwrap(), kind);
        }
        for state in [
            DlqState::Pending,
            DlqState::Replaying,
            DlqState::Replayed,
            DlqState::Discarded,
        ] {
            assert_eq!(DlqState::decode(state.as_str()).unwrap(), state);
        }
        assert!(matches!(
            DlqState::decode("lost"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn quotas_refuse_what_would_pass_a_limit_only() {
        let quota = Quota {
            max_handlers: Some(2),
            max_total_bytes: Some(100),
        };
        let usage = TenantUsage {
            handlers: 2,
            total_bytes: 90,
        };
        // A new version of a handler the tenant has does not count as a handler.
        quota.check("t", "h", usage, false, 10).unwrap();
        assert!(matches!(
            quota.check("t", "h", usage, true, 0),
            Err(StoreError::QuotaExceeded(_))
        ));
        assert!(matches!(
            quota.check("t", "h", usage, false, 11),
            Err(StoreError::QuotaExceeded(_))
        ));
        Quota::default()
            .check("t", "h", usage, true, i64::MAX)
            .unwrap();
        assert!(Quota::default().is_unlimited());
        assert!(!quota.is_unlimited());
        assert!(
            Quota {
                max_handlers: Some(-1),
                max_total_bytes: None
            }
            .validate("tenant t")
            .is_err()
        );
    }

    #[test]
    fn token_hashes_are_lower_case_sha256_hex() {
        validate_token_hash(&sha256_hex(b"secret")).unwrap();
        assert!(validate_token_hash(&sha256_hex(b"secret").to_uppercase()).is_err());
        assert!(validate_token_hash("abc").is_err());
    }

    #[test]
    fn dlq_page_size_is_bounded() {
        let mut filter = DlqFilter::default();
        assert_eq!(filter.page_size(), i64::from(MAX_DLQ_PAGE));
        filter.limit = 10;
        assert_eq!(filter.page_size(), 10);
        filter.limit = u32::MAX;
        assert_eq!(filter.page_size(), i64::from(MAX_DLQ_PAGE));
    }
}

/// A binding's circuit breaker as shared between replicas (see [`super::Store::breaker_set`]).
/// Half-open is not stored: it is an open, not forced, breaker past `open_until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerRecord {
    /// The binding.
    pub binding_id: String,
    /// Open (or half-open) rather than closed.
    pub open: bool,
    /// Opened by an operator until reset.
    pub forced: bool,
    /// When it opened, if open.
    pub opened_at: Option<DateTime<Utc>>,
    /// When it lets probes through, if open and not forced.
    pub open_until: Option<DateTime<Utc>>,
    /// The consecutive failures that opened it, as its writer counted them.
    pub consecutive_failures: Option<i32>,
    /// 1 when first written, one more on every write: a reader that saw this revision has
    /// seen this state.
    pub revision: i64,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
}

/// A breaker state to share (see [`super::Store::breaker_set`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerWrite {
    /// Closed: by its probes, or reset by an operator.
    Closed,
    /// Opened by failures, from now for `open_for` (at most a day).
    Open {
        /// How long until probes may run.
        open_for: std::time::Duration,
        /// The consecutive failures that opened it.
        consecutive_failures: i32,
    },
    /// Opened by an operator until reset.
    Forced,
}
