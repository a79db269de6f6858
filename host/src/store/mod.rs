//! The store: everything Weir keeps in a database.
//!
//! Owns the persistence of handlers and their versions (the component bytes), bindings,
//! processed keys, keyed state, the outbox, DLQ entries, and the control plane's tenants and
//! API tokens — the schema (`migrations/postgres`, `migrations/sqlite`), the queries, and the
//! one transaction in which a batch of completed messages commits its effects
//! ([`Store::commit`]). [`Store`] is the boundary; [`PgStore`] (PostgreSQL, production) and
//! [`SqliteStore`] (a file or memory, the embedded dev mode) are its two implementations, held
//! to one contract by `tests/tests/store_contract.rs`.
//! [`connect`] picks one by URL scheme and applies the migrations.
//!
//! Architecture invariant: the store knows nothing of Kafka or wasmtime. It stores message ids,
//! topics and bytes as data; it never publishes, consumes or runs anything. Binding specs are
//! JSON documents it does not interpret.
//!
//! Choices a caller can rely on:
//! * **Group commit.** [`Store::commit`] runs a constant number of statements per batch, in one
//!   transaction (on PostgreSQL a batch that writes nothing but processed keys runs them as
//!   statements of their own, each atomic): the processed keys — a multi-row insert of rows,
//!   and one of offset blocks for the message ids that name a Kafka position (below) — at most
//!   one keyed-state upsert, one keyed-state delete, one outbox insert and one update of the DLQ
//!   entries the batch replays, and on PostgreSQL a `NOTIFY weir_outbox` (arrays
//!   through `UNNEST`, so any batch size; SQLite splits the multi-row `VALUES` lists at its
//!   bound-parameter limit, one statement per few thousand rows). A completion whose processed
//!   key already existed, or that repeats an earlier completion of the same batch, is a
//!   [`CommitOutcome::Duplicate`] and none of its effects are written (the DLQ entry it
//!   replays is marked all the same, see below). State writes apply in batch order, then call
//!   order. A completion with state writes but no message key is refused ([`StoreError::Invalid`])
//!   and nothing of the batch is written. Outbox message ids are unique: an emit whose id is
//!   already in the outbox is not inserted again.
//! * **Processed keys have two forms.** A message id that names a Kafka position
//!   (`topic/partition/offset`, see [`position`]) is one bit of a row per 64 offsets of a
//!   binding's topic partition (`processed_offsets`); any other id is a row of
//!   `processed_keys`. The form follows from the id's text alone. The view `processed_key_ids`
//!   lists both as `(binding_id, message_id, processed_at)`; a block's `processed_at` is its
//!   last write, and the retention sweep ([`Store::sweep_processed_keys`]) drops a block when
//!   that is old, counting its bits.
//! * **Outbox claims use a lease.** [`Store::outbox_claim`] marks the rows it returns as
//!   leased until `now + lease` in one statement (on PostgreSQL with `FOR UPDATE SKIP LOCKED`),
//!   so two relays never claim the same row while the lease runs, and a relay that dies
//!   releases its rows when the lease runs out. A row marked as failed
//!   ([`Store::outbox_mark_error`]) becomes claimable again when its lease runs out: the lease
//!   is also the shortest retry delay. A relay that outlives its lease may publish a row twice;
//!   records carry stable message ids, so consumers deduplicate. Claims come oldest first, but
//!   a row whose publish failed waits for its lease while newer rows go ahead, so records of
//!   one key can leave out of order when publishing fails; a relay that needs strict order
//!   must stop claiming after a failure.
//! * **Notifications.** [`Store::outbox_notifications`] wakes the relay when outbox rows
//!   commit: through `LISTEN weir_outbox` on PostgreSQL (so rows committed by other replicas
//!   wake it too), in-process on SQLite. A wake-up may be spurious or coalesced; the relay
//!   still sweeps periodically.
//! * **Breakers are shared state, last writer wins.** [`Store::breaker_set`] upserts one row per
//!   binding and bumps its revision; readers compare revisions to see a change. Nothing else
//!   (no lease, no lock): two replicas opening at once both write, and both follow the last.
//! * **Bindings are deleted for real.** [`Store::bindings_revision`] is a counter bumped in the
//!   same transaction as every binding insert, update and delete, so a poller that sees it
//!   unchanged can skip [`Store::list_bindings`]. A binding id belongs to the tenant that
//!   created it: putting it for another tenant is a [`StoreError::Conflict`]. Deleting a
//!   binding keeps its processed keys and DLQ entries (a binding re-created under the same id
//!   is the same binding to deduplication).
//! * **Handler versions are immutable.** Uploading bytes already stored for the handler returns
//!   the existing version; otherwise the version is one more than the handler's highest.
//!   Deleting a handler deletes all its versions (not its keyed state or DLQ entries) and is a
//!   [`StoreError::Conflict`] while a binding of its tenant runs it.
//! * **Quotas are checked in the upload's transaction.** [`Store::put_handler_version`] counts
//!   the tenant's handlers and component bytes in the transaction that inserts the version,
//!   serialized with the tenant's other uploads and deletions (an advisory lock per tenant on
//!   PostgreSQL, the write lock on SQLite), so concurrent uploads cannot together pass a limit.
//!   A refused upload is [`StoreError::QuotaExceeded`] and stores nothing (not even a new
//!   handler). Re-uploading bytes already stored returns the existing version without counting
//!   them again, even at the limit. A limit reached exactly is not passed. The caller passes
//!   the quota (tenant's own or the platform default); the store does not look it up.
//! * **Tenants are optional rows.** Handlers and bindings carry a tenant name but do not
//!   reference `tenants` (those deployed by `weir handler deploy` have no tenant row). Deleting
//!   a tenant is a [`StoreError::Conflict`] while it has handlers or bindings, and deletes its
//!   tokens.
//! * **Tokens are found by hash only.** The store keeps a token's SHA-256 (lower-case hex, one
//!   token per hash), never its secret, and [`Store::token_by_hash`] is the only lookup for
//!   authentication; it returns revoked and expired tokens too, and the caller decides with
//!   [`TokenRecord::is_valid_at`]. Revoking is idempotent (the first time is kept) and scoped to
//!   the tenant: another tenant's token id is [`StoreError::NotFound`].
//! * **DLQ entries are idempotent while open.** Dead-lettering a message (same binding and
//!   message id) that already has a pending or replaying entry updates that entry's failure
//!   (kind, message, attempts, last failure), makes it pending again (no lease) and returns its
//!   id, so a crash between the DLQ insert and the offset commit does not file the message
//!   twice, and a replay that fails again lands back on its entry.
//! * **DLQ replay is a lifecycle.** `pending` → `replaying` ([`Store::dlq_replay`]) →
//!   `replayed` when the group commit of a completion with [`Completion::replay_of`] (and the
//!   entry's binding) commits, whether the completion is committed or a duplicate (resolved at
//!   the commit's time); or back to `pending` when the replay fails and is dead-lettered again.
//!   Workers take queued replays with [`Store::dlq_claim_replays`], a lease like the outbox's:
//!   while it runs no other claim returns the entry; when it runs out the entry is claimable
//!   again. Only pending entries can be queued or resolved ([`Store::dlq_resolve`]); anything
//!   else is a [`StoreError::Conflict`].
//! * **Time.** Timestamps are UTC with microsecond precision. Those the store sets itself
//!   (`created_at`, `processed_at`, leases, …) come from the server's clock on PostgreSQL
//!   (`timestamptz`, `now()`) and from the host's clock on SQLite (integer microseconds since
//!   the Unix epoch).
//! * **Trust.** The store checks what keeps its data consistent (unique ids, tenant ownership of
//!   binding ids, pending-only DLQ resolution and replay, the quotas it is given) but not
//!   authorization: a [`Completion`]'s tenant and handler are taken as given, and callers scope
//!   reads by tenant where the signature asks for one.
//! * **Unavailability.** Connection failures, pool time-outs, a closed store, server shutdown,
//!   serialization failures and deadlocks, and a busy or unopenable SQLite file are
//!   [`StoreError::is_unavailable`]: retry later, never dead-letter. A pooled connection the
//!   server killed is replaced on the next call.

mod batch;
mod error;
mod postgres;
mod sqlite;
mod types;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

pub use batch::{BLOCK_OFFSETS, position};
pub use error::StoreError;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use types::{
    BindingRecord, BreakerRecord, BreakerWrite, CommitOutcome, Completion, DlqEntry,
    DlqEntryInsert, DlqErrorKind, DlqFilter, DlqState, HandlerSummary, HandlerVersion,
    MAX_DLQ_PAGE, MAX_OUTBOX_CLAIM, NewTenant, NewToken, OutboxInsert, OutboxRecord, OutboxState,
    Quota, RateLimit, ReplayScope, Resolution, Tenant, TenantUsage, TokenRecord,
};

/// The NOTIFY channel that announces new outbox rows.
pub const OUTBOX_CHANNEL: &str = "weir_outbox";

/// Everything Weir keeps in a database. See the module documentation for the guarantees every
/// implementation keeps.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Apply the migrations this binary knows that the database lacks. [`connect`] already
    /// does; `weir migrate` calls it explicitly. Safe to run concurrently from several hosts.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Close every connection. Later calls fail as unavailable.
    async fn close(&self);

    // ---- handlers ------------------------------------------------------------------------

    /// Store `component` as a new version of `tenant`'s `handler` (creating the handler), or
    /// return the existing version if the same bytes were uploaded before. With `quota`, the
    /// tenant's handler count and total component bytes are checked in the same transaction:
    /// [`StoreError::QuotaExceeded`] and nothing stored if the upload would pass either.
    async fn put_handler_version(
        &self,
        tenant: &str,
        handler: &str,
        component: &[u8],
        quota: &Quota,
    ) -> Result<HandlerVersion, StoreError>;

    /// `tenant`'s handlers by name, each with its active version and totals.
    async fn list_handlers(&self, tenant: &str) -> Result<Vec<HandlerSummary>, StoreError>;

    /// Delete `tenant`'s `handler` and all its versions; whether it existed.
    /// [`StoreError::Conflict`] (and nothing deleted) while a binding runs it.
    async fn delete_handler(&self, tenant: &str, handler: &str) -> Result<bool, StoreError>;

    /// What `tenant` uses of its quotas.
    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError>;

    /// One version's metadata.
    async fn handler_version(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<Option<HandlerVersion>, StoreError>;

    /// One version's component bytes.
    async fn component_bytes(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Make `version` the handler's active one ([`StoreError::NotFound`] if it does not exist).
    async fn activate(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<HandlerVersion, StoreError>;

    /// The handler's active version, if it has one.
    async fn active_version(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Option<HandlerVersion>, StoreError>;

    /// Every version of the handler, oldest first.
    async fn list_handler_versions(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Vec<HandlerVersion>, StoreError>;

    // ---- tenants and tokens --------------------------------------------------------------

    /// Create a tenant. [`StoreError::Conflict`] if the id is taken.
    async fn create_tenant(&self, tenant: &NewTenant) -> Result<Tenant, StoreError>;

    /// One tenant.
    async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError>;

    /// Every tenant, by id.
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;

    /// Set (`Some`) or remove (`None`) `tenant`'s rate limit; the tenant as it is now.
    /// [`StoreError::NotFound`] if there is no such tenant; [`StoreError::Invalid`] for a rate
    /// or burst of 0.
    async fn set_tenant_rate_limit(
        &self,
        tenant: &str,
        limit: Option<RateLimit>,
    ) -> Result<Tenant, StoreError>;

    /// Delete a tenant and its tokens; whether it existed. [`StoreError::Conflict`] (and nothing
    /// deleted) while it has handlers or bindings.
    async fn delete_tenant(&self, id: &str) -> Result<bool, StoreError>;

    /// Record a token (its secret already hashed). [`StoreError::NotFound`] if the tenant does
    /// not exist, [`StoreError::Conflict`] if the id or hash is taken.
    async fn create_token(&self, token: &NewToken) -> Result<TokenRecord, StoreError>;

    /// `tenant`'s tokens, revoked and expired ones included, by creation.
    async fn list_tokens(&self, tenant: &str) -> Result<Vec<TokenRecord>, StoreError>;

    /// Revoke `tenant`'s token `id` (idempotent: revoking twice keeps the first time).
    /// [`StoreError::NotFound`] if `tenant` has no such token.
    async fn revoke_token(&self, tenant: &str, id: &str) -> Result<TokenRecord, StoreError>;

    /// The token whose secret hashes to `sha256` (lower-case hex), revoked or not: the caller
    /// checks [`TokenRecord::is_valid_at`].
    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>, StoreError>;

    // ---- bindings ------------------------------------------------------------------------

    /// Create binding `id` (revision 1) or replace its handler and spec (revision + 1).
    /// [`StoreError::Conflict`] if `id` belongs to another tenant.
    async fn put_binding(
        &self,
        id: &str,
        tenant: &str,
        handler: &str,
        spec: &serde_json::Value,
    ) -> Result<BindingRecord, StoreError>;

    /// Delete binding `id`; whether it existed.
    async fn delete_binding(&self, id: &str) -> Result<bool, StoreError>;

    /// One binding.
    async fn binding(&self, id: &str) -> Result<Option<BindingRecord>, StoreError>;

    /// Every binding of every tenant, by id (for reconciliation).
    async fn list_bindings(&self) -> Result<Vec<BindingRecord>, StoreError>;

    /// A number that changes whenever any binding is created, updated or deleted.
    async fn bindings_revision(&self) -> Result<i64, StoreError>;

    // ---- breakers ------------------------------------------------------------------------

    /// The shared state of `binding_id`'s circuit breaker, if one was ever written (none:
    /// closed).
    async fn breaker_get(&self, binding_id: &str) -> Result<Option<BreakerRecord>, StoreError>;

    /// Write `binding_id`'s breaker state (revision + 1, `updated_at` now, the store's clock):
    /// [`BreakerWrite::Open`] sets `opened_at` to now and `open_until` to now + `open_for`;
    /// [`BreakerWrite::Forced`] sets `opened_at` to now (kept if it was open already) and no
    /// `open_until`; [`BreakerWrite::Closed`] clears both. Deleting the binding deletes it.
    async fn breaker_set(
        &self,
        binding_id: &str,
        write: BreakerWrite,
    ) -> Result<BreakerRecord, StoreError>;

    // ---- keyed state ---------------------------------------------------------------------

    /// The committed value of state `name` under message `key` of `tenant`'s `handler`.
    async fn state_get(
        &self,
        tenant: &str,
        handler: &str,
        key: &[u8],
        name: &str,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every committed state value under message `key` of `tenant`'s `handler`, by name.
    async fn state_list(
        &self,
        tenant: &str,
        handler: &str,
        key: &[u8],
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    // ---- group commit --------------------------------------------------------------------

    /// Commit a batch of completions in one transaction: their processed keys, and the
    /// effects of those that are new. Returns one outcome per completion, in input order. On
    /// error nothing of the batch is written.
    async fn commit(&self, batch: &[Completion]) -> Result<Vec<CommitOutcome>, StoreError>;

    // ---- outbox --------------------------------------------------------------------------

    /// Insert outbox rows directly (not as a handler's effects), e.g. for an ingest endpoint.
    /// One outcome per row: `Duplicate` when its message id is already in the outbox (or
    /// earlier in `rows`).
    async fn outbox_insert(
        &self,
        tenant: &str,
        binding_id: Option<&str>,
        rows: &[OutboxInsert],
    ) -> Result<Vec<CommitOutcome>, StoreError>;

    /// Claim up to `limit` (at most [`MAX_OUTBOX_CLAIM`]) unsent rows whose lease has run out,
    /// oldest first, and lease them for `lease`.
    async fn outbox_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRecord>, StoreError>;

    /// Mark rows as published; how many were not already marked.
    async fn outbox_mark_sent(&self, ids: &[i64]) -> Result<u64, StoreError>;

    /// Record a failed publish of row `id` (attempts + 1, state `error`); it is retried when
    /// its lease runs out. Returns `false` if the row does not exist or was already sent.
    async fn outbox_mark_error(&self, id: i64, error: &str) -> Result<bool, StoreError>;

    /// The outbox row with this message id.
    async fn outbox_status(&self, message_id: &str) -> Result<Option<OutboxRecord>, StoreError>;

    /// How many rows are not yet sent (pending or error).
    async fn outbox_pending(&self) -> Result<i64, StoreError>;

    /// A receiver woken (at least once, possibly more) after outbox rows commit, or `None` if
    /// this store cannot notify. Dropping the receiver stops the listener.
    async fn outbox_notifications(&self) -> Result<Option<mpsc::Receiver<()>>, StoreError>;

    // ---- DLQ -----------------------------------------------------------------------------

    /// File a DLQ entry (or refresh the pending or replaying entry of the same binding and
    /// message id, which becomes pending again with the new failure and no lease); returns its
    /// id.
    async fn dlq_insert(&self, entry: &DlqEntryInsert) -> Result<i64, StoreError>;

    /// Queue a pending entry of `tenant` for replay (state `replaying`, no lease).
    /// [`StoreError::NotFound`] if `tenant` has no entry `id`, [`StoreError::Conflict`] if it
    /// is not pending. The binding's workers claim it ([`Store::dlq_claim_replays`]); the group
    /// commit of its completion marks it `replayed` ([`Completion::replay_of`]).
    async fn dlq_replay(&self, tenant: &str, id: i64) -> Result<DlqEntry, StoreError>;

    /// Claim up to `limit` (at most [`MAX_OUTBOX_CLAIM`]) entries of `binding_id` queued for
    /// replay within `scope` whose lease is absent or has run out, oldest first, leasing them
    /// for `lease` (as [`Store::outbox_claim`] does).
    async fn dlq_claim_replays(
        &self,
        binding_id: &str,
        scope: ReplayScope<'_>,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<DlqEntry>, StoreError>;

    /// One of `tenant`'s DLQ entries.
    async fn dlq_get(&self, tenant: &str, id: i64) -> Result<Option<DlqEntry>, StoreError>;

    /// The pending DLQ entries (waiting for an operator) of every handler that has some, as
    /// `(tenant, handler, count)` in tenant and handler order: one aggregate query, for the
    /// `weir_dlq_pending` gauge.
    async fn dlq_pending_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError>;

    /// DLQ entries matching `filter`, in id order, at most one page.
    async fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError>;

    /// Resolve a pending DLQ entry. [`StoreError::NotFound`] if `tenant` has no entry `id`,
    /// [`StoreError::Conflict`] if it is not pending (resolved, or queued for replay).
    async fn dlq_resolve(
        &self,
        tenant: &str,
        id: i64,
        resolution: Resolution,
        note: Option<&str>,
    ) -> Result<DlqEntry, StoreError>;

    // ---- retention -----------------------------------------------------------------------

    /// Delete processed keys recorded before `older_than`; how many. A message redelivered
    /// after its key was swept is processed again, so keep keys longer than any redelivery.
    async fn sweep_processed_keys(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// Open the store at `url` and apply its migrations: `postgres://…` or `postgresql://…` for
/// PostgreSQL, `sqlite://<path>` (created if missing), `sqlite:<path>` or `sqlite::memory:`
/// for SQLite.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = if url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        Arc::new(PgStore::connect(url).await?)
    } else if url.starts_with("sqlite:") {
        Arc::new(SqliteStore::connect(url).await?)
    } else {
        let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
        return Err(StoreError::Invalid(format!(
            "store url: unknown scheme {scheme:?} (expected postgres://, postgresql:// or sqlite:)"
        )));
    };
    store.migrate().await?;
    Ok(store)
}

/// A lease as a whole number of microseconds, capped at one day.
pub(crate) fn lease_micros(lease: Duration) -> i64 {
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    i64::try_from(lease.min(DAY).as_micros()).unwrap_or(i64::MAX)
}

/// `limit` capped at [`MAX_OUTBOX_CLAIM`].
pub(crate) fn claim_limit(limit: u32) -> i64 {
    i64::from(limit.min(MAX_OUTBOX_CLAIM))
}

/// Longest `last_error` kept for an outbox row, in bytes.
pub(crate) const MAX_ERROR_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes, on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn leases_and_claims_are_bounded() {
        assert_eq!(lease_micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(lease_micros(Duration::MAX), 86_400_000_000);
        assert_eq!(claim_limit(u32::MAX), i64::from(MAX_OUTBOX_CLAIM));
        assert_eq!(claim_limit(7), 7);
    }
}
