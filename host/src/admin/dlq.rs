//! `/v1/tenants/{tenant}/dlq`: list DLQ entries with filters and pagination, show one, replay
//! or discard one or many (by filter, a page at a time), and `/state` to read one key's keyed
//! state for debugging.
//!
//! A replay queues the entry for its own binding (never another), keeping its message id, so
//! a message replayed twice takes effect once; a discard is recorded with its note.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::auth::Principal;
use super::error::{ApiError, ErrorBody, JsonBody};
use crate::store::{DlqEntry, DlqErrorKind, DlqFilter, DlqState, Resolution, StoreError};

/// Bytes of the payload shown in a preview.
const PREVIEW_BYTES: usize = 256;

/// Bytes as text when they are UTF-8, and always as base64.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BytesView {
    /// The bytes as UTF-8 text, when they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The bytes, base64.
    pub base64: String,
}

fn bytes_view(bytes: &[u8]) -> BytesView {
    BytesView {
        text: std::str::from_utf8(bytes).ok().map(str::to_owned),
        base64: base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

/// One header of the dead-lettered record.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeaderView {
    /// Header name.
    pub key: String,
    /// Header value.
    pub value: BytesView,
}

/// A DLQ entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DlqEntryView {
    /// Entry id.
    pub id: i64,
    /// Owning tenant.
    pub tenant: String,
    /// The binding that consumed the message (a replay goes back to it only).
    pub binding_id: String,
    /// The handler.
    pub handler: String,
    /// The version that failed.
    pub handler_version: Option<i32>,
    /// Where the record came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The message id (kept by a replay).
    pub message_id: String,
    /// The record's key.
    pub key: Option<BytesView>,
    /// Payload size in bytes.
    pub payload_size: usize,
    /// The first bytes of the payload, as text (lossy).
    pub payload_preview: String,
    /// The whole payload (when one entry is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<BytesView>,
    /// The record's headers (when one entry is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<HeaderView>>,
    /// The record's timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// `retryable`, `permanent` or `trap`.
    pub error_kind: String,
    /// The last failure.
    pub error_message: String,
    /// Attempts made.
    pub attempts: i32,
    /// First failure.
    pub first_failure_at: DateTime<Utc>,
    /// Last failure.
    pub last_failure_at: DateTime<Utc>,
    /// `pending`, `replaying`, `replayed` or `discarded`.
    pub state: String,
    /// When it was resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// The note given with a discard.
    pub resolution_note: Option<String>,
}

fn entry_view(e: DlqEntry, full: bool) -> DlqEntryView {
    let d = e.entry;
    let preview_len = d.payload.len().min(PREVIEW_BYTES);
    DlqEntryView {
        id: e.id,
        tenant: d.tenant,
        binding_id: d.binding_id,
        handler: d.handler,
        handler_version: d.handler_version,
        topic: d.topic,
        partition: d.partition,
        offset: d.offset,
        message_id: d.message_id,
        key: d.key.as_deref().map(bytes_view),
        payload_size: d.payload.len(),
        payload_preview: String::from_utf8_lossy(&d.payload[..preview_len]).into_owned(),
        payload: full.then(|| bytes_view(&d.payload)),
        headers: full.then(|| {
            d.headers
                .iter()
                .map(|h| HeaderView {
                    key: h.key.clone(),
                    value: bytes_view(&h.value),
                })
                .collect()
        }),
        timestamp_ms: d.timestamp_ms,
        error_kind: d.error_kind.to_string(),
        error_message: d.error_message,
        attempts: d.attempts,
        first_failure_at: d.first_failure_at,
        last_failure_at: d.last_failure_at,
        state: e.state.to_string(),
        resolved_at: e.resolved_at,
        resolution_note: e.resolution_note,
    }
}

/// Which entries: every field narrows.
#[derive(Debug, Default, Clone, Serialize, Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    /// Only this binding's entries.
    pub binding: Option<String>,
    /// Only this handler's entries.
    pub handler: Option<String>,
    /// `retryable`, `permanent` or `trap`.
    pub error_kind: Option<String>,
    /// Last failure at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Last failure before (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// `pending` (the default for replay and discard), `replaying`, `replayed`, `discarded`.
    pub state: Option<String>,
    /// Only entries with a larger id: the `next_after` of the previous page.
    pub after: Option<i64>,
    /// Page size (at most the store's page limit).
    pub limit: Option<u32>,
}

impl DlqQuery {
    fn filter(&self, tenant: &str) -> Result<DlqFilter, ApiError> {
        let error_kind = self
            .error_kind
            .as_deref()
            .map(str::parse::<DlqErrorKind>)
            .transpose()
            .map_err(|_| {
                ApiError::invalid("error_kind", "expected retryable, permanent or trap")
            })?;
        let state = self
            .state
            .as_deref()
            .map(str::parse::<DlqState>)
            .transpose()
            .map_err(|_| {
                ApiError::invalid(
                    "state",
                    "expected pending, replaying, replayed or discarded",
                )
            })?;
        Ok(DlqFilter {
            tenant: Some(tenant.to_owned()),
            binding_id: self.binding.clone(),
            handler: self.handler.clone(),
            error_kind,
            since: self.since,
            until: self.until,
            state,
            after_id: self.after,
            limit: self.limit.unwrap_or(0),
        })
    }
}

/// A page of entries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DlqPage {
    /// The entries, by id.
    pub entries: Vec<DlqEntryView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// List DLQ entries.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/dlq", tag = "dlq",
    params(("tenant" = String, Path, description = "tenant id"), DlqQuery),
    responses((status = 200, body = DlqPage), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
    Query(query): Query<DlqQuery>,
) -> Result<Json<DlqPage>, ApiError> {
    principal.scope(&tenant)?;
    let filter = query.filter(&tenant)?;
    let entries = state.store.dlq_list(&filter).await?;
    let next_after = next_after(&filter, &entries);
    Ok(Json(DlqPage {
        entries: entries.into_iter().map(|e| entry_view(e, false)).collect(),
        next_after,
    }))
}

/// The id to continue after when `entries` filled the page `filter` asked for.
fn next_after(filter: &DlqFilter, entries: &[DlqEntry]) -> Option<i64> {
    let full = i64::try_from(entries.len()).is_ok_and(|n| n >= filter.page_size());
    full.then(|| entries.last().map(|e| e.id)).flatten()
}

async fn owned_entry(state: &AdminState, tenant: &str, id: i64) -> Result<DlqEntry, ApiError> {
    state
        .store
        .dlq_get(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("dlq entry {id}")))
}

/// One entry, with its whole payload and headers.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/dlq/{id}", tag = "dlq",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = i64, Path, description = "entry id")),
    responses((status = 200, body = DlqEntryView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, i64)>,
) -> Result<Json<DlqEntryView>, ApiError> {
    principal.scope(&tenant)?;
    Ok(Json(entry_view(
        owned_entry(&state, &tenant, id).await?,
        true,
    )))
}

/// Replay one entry: queued for its binding, which runs it again with the same message id.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/dlq/{id}/replay", tag = "dlq",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = i64, Path, description = "entry id")),
    responses((status = 200, body = DlqEntryView), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn replay_one(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, i64)>,
) -> Result<Json<DlqEntryView>, ApiError> {
    principal.scope(&tenant)?;
    let entry = state.store.dlq_replay(&tenant, id).await?;
    tracing::info!(%tenant, entry = id, "dlq entry queued for replay");
    Ok(Json(entry_view(entry, false)))
}

/// Why an entry is discarded.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscardBody {
    /// Recorded with the entry.
    #[serde(default)]
    pub note: Option<String>,
}

/// Discard one entry (recorded with its note, never deleted).
#[utoipa::path(post, path = "/v1/tenants/{tenant}/dlq/{id}/discard", tag = "dlq",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = i64, Path, description = "entry id")),
    request_body = DiscardBody,
    responses((status = 200, body = DlqEntryView), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn discard_one(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, i64)>,
    JsonBody(body): JsonBody<DiscardBody>,
) -> Result<Json<DlqEntryView>, ApiError> {
    principal.scope(&tenant)?;
    let entry = state
        .store
        .dlq_resolve(&tenant, id, Resolution::Discarded, body.note.as_deref())
        .await?;
    tracing::info!(%tenant, entry = id, "dlq entry discarded");
    Ok(Json(entry_view(entry, false)))
}

/// A bulk replay or discard: the pending entries matching the filter, one page per call.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// Which entries (`state` must be absent or `pending`).
    #[serde(default)]
    pub filter: DlqQuery,
    /// For a discard: recorded with every entry.
    #[serde(default)]
    pub note: Option<String>,
}

/// Progress of a bulk operation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkProgress {
    /// Entries of this page that matched.
    pub matched: usize,
    /// Of those, replayed or discarded now.
    pub done: usize,
    /// Of those, skipped because another request resolved them meanwhile.
    pub skipped: usize,
    /// Call again with `filter.after` set to this to go on; absent when finished.
    pub next_after: Option<i64>,
}

async fn bulk(
    state: &AdminState,
    principal: &Principal,
    tenant: &str,
    body: BulkBody,
    replay: bool,
) -> Result<Json<BulkProgress>, ApiError> {
    principal.scope(tenant)?;
    if body.filter.state.as_deref().is_some_and(|s| s != "pending") {
        return Err(ApiError::invalid(
            "filter.state",
            "only pending entries can be replayed or discarded",
        ));
    }
    let mut filter = body.filter.filter(tenant)?;
    filter.state = Some(DlqState::Pending);
    let entries = state.store.dlq_list(&filter).await?;
    let (mut done, mut skipped) = (0, 0);
    for entry in &entries {
        let result = if replay {
            state.store.dlq_replay(tenant, entry.id).await.map(|_| ())
        } else {
            state
                .store
                .dlq_resolve(
                    tenant,
                    entry.id,
                    Resolution::Discarded,
                    body.note.as_deref(),
                )
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => done += 1,
            Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => skipped += 1,
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(%tenant, replay, done, skipped, "dlq bulk operation");
    Ok(Json(BulkProgress {
        matched: entries.len(),
        done,
        skipped,
        next_after: next_after(&filter, &entries),
    }))
}

/// Replay the pending entries matching a filter, one page per call.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/dlq/replay", tag = "dlq",
    params(("tenant" = String, Path, description = "tenant id")), request_body = BulkBody,
    responses((status = 200, body = BulkProgress), (status = 422, body = ErrorBody)))]
pub async fn replay_many(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<BulkBody>,
) -> Result<Json<BulkProgress>, ApiError> {
    bulk(&state, &principal, &tenant, body, true).await
}

/// Discard the pending entries matching a filter, one page per call.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/dlq/discard", tag = "dlq",
    params(("tenant" = String, Path, description = "tenant id")), request_body = BulkBody,
    responses((status = 200, body = BulkProgress), (status = 422, body = ErrorBody)))]
pub async fn discard_many(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<BulkBody>,
) -> Result<Json<BulkProgress>, ApiError> {
    bulk(&state, &principal, &tenant, body, false).await
}

/// Which key's state.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    /// The message key, as UTF-8 text.
    pub key: Option<String>,
    /// The message key, base64 (for binary keys).
    pub key_base64: Option<String>,
}

/// One named state value.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StateValue {
    /// The state's name.
    pub name: String,
    /// Its value.
    pub value: BytesView,
}

/// A key's committed state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StateView {
    /// The handler.
    pub handler: String,
    /// The key.
    pub key: BytesView,
    /// Every named value under the key.
    pub values: Vec<StateValue>,
}

/// Read the committed keyed state of one message key (for debugging).
#[utoipa::path(get, path = "/v1/tenants/{tenant}/handlers/{name}/state", tag = "handlers",
    params(("tenant" = String, Path, description = "tenant id"),
        ("name" = String, Path, description = "handler name"), StateQuery),
    responses((status = 200, body = StateView), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn state(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, name)): Path<(String, String)>,
    Query(query): Query<StateQuery>,
) -> Result<Json<StateView>, ApiError> {
    principal.scope(&tenant)?;
    let key = match (query.key, query.key_base64) {
        (Some(key), None) => key.into_bytes(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| ApiError::invalid("key_base64", format!("not base64: {e}")))?,
        _ => {
            return Err(ApiError::invalid(
                "key",
                "give exactly one of `key` and `key_base64`",
            ));
        }
    };
    let values = state.store.state_list(&tenant, &name, &key).await?;
    Ok(Json(StateView {
        handler: name,
        key: bytes_view(&key),
        values: values
            .into_iter()
            .map(|(name, value)| StateValue {
                name,
                value: bytes_view(&value),
            })
            .collect(),
    }))
}
