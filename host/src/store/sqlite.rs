//! [`SqliteStore`]: the store in an SQLite file (or memory), for the embedded dev mode.
//!
//! Same logical schema as PostgreSQL, with SQLite's types: `BLOB` for bytes, `TEXT` for JSON,
//! and `INTEGER` microseconds since the Unix epoch for timestamps (so that they compare and
//! sort as numbers). Write transactions start with `BEGIN IMMEDIATE`, so two writers queue on
//! the busy timeout instead of failing to upgrade a read lock. Files use WAL with
//! `synchronous = FULL`: a commit the store acknowledged survives a power cut, as the
//! exactly-once promise needs. Batches are written with multi-row `VALUES` lists, chunked to
//! stay under SQLite's limit on bound parameters.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::mpsc;

use super::batch::{self, BlockKey, KeyPlan, OutboxRow, StateRow};
use super::error::db;
use super::types::{
    decode_headers, encode_headers, not_pending, sha256_hex, validate_tenant, validate_token_hash,
};
use super::{
    BindingRecord, BreakerRecord, BreakerWrite, CommitOutcome, Completion, DlqEntry,
    DlqEntryInsert, DlqErrorKind, DlqFilter, DlqState, HandlerSummary, HandlerVersion,
    MAX_ERROR_BYTES, NewTenant, NewToken, OutboxInsert, OutboxRecord, OutboxState, Quota,
    RateLimit, ReplayScope, Resolution, Store, StoreError, Tenant, TenantUsage, TokenRecord,
    claim_limit, lease_micros, truncate,
};

/// Connections to a database file (readers run in parallel under WAL; writers queue).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

/// How long a writer waits for another one before the store counts as unavailable.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an operation waits for a free connection.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound parameters per statement: under SQLite's default limit of 32 766.
const MAX_PARAMETERS: usize = 30_000;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// The store in SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Senders of [`Store::outbox_notifications`], woken after outbox rows commit.
    listeners: Arc<Mutex<Vec<mpsc::Sender<()>>>>,
}

impl SqliteStore {
    /// Open `url` (`sqlite://<path>`, `sqlite:<path>` or `sqlite::memory:`), creating the file
    /// if missing. Does not migrate; see [`super::connect`].
    ///
    /// An in-memory database lives in a single connection that the pool keeps open for the
    /// store's lifetime (each SQLite connection to `:memory:` would see its own database).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db("connect"))?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(DEFAULT_BUSY_TIMEOUT);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = if in_memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(DEFAULT_MAX_CONNECTIONS)
        };
        let options = if in_memory {
            options
        } else {
            options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
        };
        // One connection outside the pool first, so that a file that cannot be opened fails
        // at once with its cause rather than as a pool timeout.
        let probe = options.connect().await.map_err(db("connect"))?;
        let _ = probe.close().await;
        let pool = pool
            .acquire_timeout(DEFAULT_ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(db("connect"))?;
        Ok(Self::from_pool(pool))
    }

    /// A store over an existing pool.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            listeners: Arc::default(),
        }
    }

    /// The pool, for tests and tools.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Start a write transaction.
    async fn begin(
        &self,
        operation: &'static str,
    ) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(operation))
    }

    /// Wake every live notification receiver.
    fn notify_outbox(&self) {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        listeners.retain(|sender| !sender.is_closed());
        for sender in listeners.iter() {
            // Full means a wake-up is already queued.
            let _ = sender.try_send(());
        }
    }
}

/// Now, as stored.
fn now() -> i64 {
    Utc::now().timestamp_micros()
}

/// A stored timestamp as a time.
fn time(table: &'static str, micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::corrupt(table, format!("timestamp {micros} out of range")))
}

fn optional_time(
    table: &'static str,
    micros: Option<i64>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    micros.map(|micros| time(table, micros)).transpose()
}

/// Set the bits of `blocks` (position ids' processed keys, see `batch`); the bits of each that
/// were not set before. The transaction holds SQLite's one write lock (`BEGIN IMMEDIATE`), so
/// reading the blocks and then writing them cannot race another writer.
async fn mark_blocks(
    op: &'static str,
    tx: &mut SqliteConnection,
    blocks: &[(BlockKey<'_>, i64)],
    processed_at: i64,
) -> Result<Vec<i64>, StoreError> {
    let mut rows: Vec<batch::StoredBlock> = Vec::new();
    for chunk in blocks.chunks(chunk_rows(4)) {
        let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT binding_id, topic, partition, block, mask FROM processed_offsets \
             WHERE (binding_id, topic, partition, block) IN (",
        );
        let mut list = query.separated(", ");
        for (block, _) in chunk {
            list.push("(")
                .push_bind_unseparated(block.binding_id.to_owned())
                .push_unseparated(", ")
                .push_bind_unseparated(block.topic.to_owned())
                .push_unseparated(", ")
                .push_bind_unseparated(block.partition)
                .push_unseparated(", ")
                .push_bind_unseparated(block.block)
                .push_unseparated(")");
        }
        query.push(")");
        rows.extend(
            query
                .build_query_as::<batch::StoredBlock>()
                .fetch_all(&mut *tx)
                .await
                .map_err(db(op))?,
        );
    }
    let fresh = batch::fresh_bits(blocks, &rows);
    let writes: Vec<(&BlockKey<'_>, i64)> = blocks
        .iter()
        .zip(&fresh)
        .filter(|(_, fresh)| **fresh != 0)
        .map(|((block, _), fresh)| (block, *fresh))
        .collect();
    for chunk in writes.chunks(chunk_rows(6)) {
        let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO processed_offsets \
             (binding_id, topic, partition, block, mask, processed_at) ",
        );
        query.push_values(chunk, |mut values, (block, fresh)| {
            values
                .push_bind(block.binding_id.to_owned())
                .push_bind(block.topic.to_owned())
                .push_bind(block.partition)
                .push_bind(block.block)
                .push_bind(*fresh)
                .push_bind(processed_at);
        });
        query.push(
            " ON CONFLICT (binding_id, topic, partition, block) \
             DO UPDATE SET mask = mask | excluded.mask, processed_at = excluded.processed_at",
        );
        query.build().execute(&mut *tx).await.map_err(db(op))?;
    }
    Ok(fresh)
}

/// Rows per statement for a multi-row statement with `columns` parameters per row.
fn chunk_rows(columns: usize) -> usize {
    (MAX_PARAMETERS / columns).max(1)
}

const HANDLER_VERSION_COLUMNS: &str = "tenant, handler, version, sha256, size, created_at";

const BINDING_COLUMNS: &str = "id, tenant, handler, spec, revision, created_at, updated_at";

const OUTBOX_COLUMNS: &str = "id, message_id, tenant, binding_id, topic, key, payload, headers, \
     causation_id, traceparent, state, attempts, last_error, created_at, sent_at";

const DLQ_COLUMNS: &str = "id, tenant, binding_id, handler, handler_version, topic, \
     kafka_partition, kafka_offset, message_id, key, payload, headers, timestamp_ms, error_kind, \
     error_message, attempts, first_failure_at, last_failure_at, state, resolved_at, \
     resolution_note";

const TENANT_COLUMNS: &str =
    "id, max_handlers, max_total_bytes, rate_limit_per_second, rate_limit_burst, created_at";

const TOKEN_COLUMNS: &str = "id, tenant, label, created_at, expires_at, revoked_at";

/// `SELECT <columns> FROM <rest>` as a statement sqlx accepts; every part is a constant.
fn select(columns: &str, rest: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!("SELECT {columns} FROM {rest}"))
}

fn handler_version(row: &SqliteRow) -> Result<HandlerVersion, StoreError> {
    let decode = |error| StoreError::from_sqlx("read handler version", error);
    Ok(HandlerVersion {
        tenant: row.try_get("tenant").map_err(decode)?,
        handler: row.try_get("handler").map_err(decode)?,
        version: row.try_get("version").map_err(decode)?,
        sha256: row.try_get("sha256").map_err(decode)?,
        size: row.try_get("size").map_err(decode)?,
        created_at: time(
            "handler_versions",
            row.try_get("created_at").map_err(decode)?,
        )?,
    })
}

fn tenant_record(row: &SqliteRow) -> Result<Tenant, StoreError> {
    let decode = |error| StoreError::from_sqlx("read tenant", error);
    Ok(Tenant {
        id: row.try_get("id").map_err(decode)?,
        quota: Quota {
            max_handlers: row.try_get("max_handlers").map_err(decode)?,
            max_total_bytes: row.try_get("max_total_bytes").map_err(decode)?,
        },
        rate_limit: RateLimit::from_columns(
            row.try_get("rate_limit_per_second").map_err(decode)?,
            row.try_get("rate_limit_burst").map_err(decode)?,
        ),
        created_at: time("tenants", row.try_get("created_at").map_err(decode)?)?,
    })
}

fn token_record(row: &SqliteRow) -> Result<TokenRecord, StoreError> {
    const TABLE: &str = "tokens";
    let decode = |error| StoreError::from_sqlx("read token", error);
    Ok(TokenRecord {
        id: row.try_get("id").map_err(decode)?,
        tenant: row.try_get("tenant").map_err(decode)?,
        label: row.try_get("label").map_err(decode)?,
        created_at: time(TABLE, row.try_get("created_at").map_err(decode)?)?,
        expires_at: optional_time(TABLE, row.try_get("expires_at").map_err(decode)?)?,
        revoked_at: optional_time(TABLE, row.try_get("revoked_at").map_err(decode)?)?,
    })
}

/// What `tenant` uses of its quotas, as `conn` sees it.
async fn usage(conn: &mut SqliteConnection, tenant: &str) -> Result<TenantUsage, StoreError> {
    let (handlers, total_bytes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM handlers WHERE tenant = $1), \
                (SELECT COALESCE(sum(size), 0) FROM handler_versions WHERE tenant = $1)",
    )
    .bind(tenant)
    .fetch_one(&mut *conn)
    .await
    .map_err(db("read tenant usage"))?;
    Ok(TenantUsage {
        handlers,
        total_bytes,
    })
}

/// Why `tenant`'s DLQ entry `id` was not changed by an update of pending entries only:
/// [`StoreError::NotFound`] or a [`StoreError::Conflict`] naming its state.
async fn dlq_state(
    operation: &'static str,
    conn: &mut SqliteConnection,
    tenant: &str,
    id: i64,
) -> Result<StoreError, StoreError> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM dlq_entries WHERE tenant = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db(operation))?;
    Ok(not_pending(tenant, id, state))
}

fn binding(row: &SqliteRow) -> Result<BindingRecord, StoreError> {
    let decode = |error| StoreError::from_sqlx("read binding", error);
    let spec: String = row.try_get("spec").map_err(decode)?;
    Ok(BindingRecord {
        id: row.try_get("id").map_err(decode)?,
        tenant: row.try_get("tenant").map_err(decode)?,
        handler: row.try_get("handler").map_err(decode)?,
        spec: serde_json::from_str(&spec)
            .map_err(|error| StoreError::corrupt("bindings", format!("spec: {error}")))?,
        revision: row.try_get("revision").map_err(decode)?,
        created_at: time("bindings", row.try_get("created_at").map_err(decode)?)?,
        updated_at: time("bindings", row.try_get("updated_at").map_err(decode)?)?,
    })
}

const BREAKER_COLUMNS: &str = "binding_id, state, forced, opened_at, open_until, \
     consecutive_failures, revision, updated_at";

fn breaker_record(row: &SqliteRow) -> Result<BreakerRecord, StoreError> {
    const TABLE: &str = "binding_breakers";
    let decode = |error| StoreError::from_sqlx("read breaker", error);
    let state: String = row.try_get("state").map_err(decode)?;
    Ok(BreakerRecord {
        binding_id: row.try_get("binding_id").map_err(decode)?,
        open: match state.as_str() {
            "open" => true,
            "closed" => false,
            other => {
                return Err(StoreError::corrupt(
                    TABLE,
                    format!("unknown state {other:?}"),
                ));
            }
        },
        forced: row.try_get::<i64, _>("forced").map_err(decode)? != 0,
        opened_at: optional_time(TABLE, row.try_get("opened_at").map_err(decode)?)?,
        open_until: optional_time(TABLE, row.try_get("open_until").map_err(decode)?)?,
        consecutive_failures: row.try_get("consecutive_failures").map_err(decode)?,
        revision: row.try_get("revision").map_err(decode)?,
        updated_at: time(TABLE, row.try_get("updated_at").map_err(decode)?)?,
    })
}

fn outbox_record(row: &SqliteRow) -> Result<OutboxRecord, StoreError> {
    let decode = |error| StoreError::from_sqlx("read outbox", error);
    let headers: String = row.try_get("headers").map_err(decode)?;
    let state: String = row.try_get("state").map_err(decode)?;
    Ok(OutboxRecord {
        id: row.try_get("id").map_err(decode)?,
        message_id: row.try_get("message_id").map_err(decode)?,
        tenant: row.try_get("tenant").map_err(decode)?,
        binding_id: row.try_get("binding_id").map_err(decode)?,
        topic: row.try_get("topic").map_err(decode)?,
        key: row.try_get("key").map_err(decode)?,
        payload: row.try_get("payload").map_err(decode)?,
        headers: decode_headers("outbox", &headers)?,
        causation_id: row.try_get("causation_id").map_err(decode)?,
        traceparent: row.try_get("traceparent").map_err(decode)?,
        state: OutboxState::decode(&state)?,
        attempts: row.try_get("attempts").map_err(decode)?,
        last_error: row.try_get("last_error").map_err(decode)?,
        created_at: time("outbox", row.try_get("created_at").map_err(decode)?)?,
        sent_at: optional_time("outbox", row.try_get("sent_at").map_err(decode)?)?,
    })
}

fn dlq_entry(row: &SqliteRow) -> Result<DlqEntry, StoreError> {
    const TABLE: &str = "dlq_entries";
    let decode = |error| StoreError::from_sqlx("read dlq entry", error);
    let headers: String = row.try_get("headers").map_err(decode)?;
    let error_kind: String = row.try_get("error_kind").map_err(decode)?;
    let state: String = row.try_get("state").map_err(decode)?;
    Ok(DlqEntry {
        id: row.try_get("id").map_err(decode)?,
        entry: DlqEntryInsert {
            tenant: row.try_get("tenant").map_err(decode)?,
            binding_id: row.try_get("binding_id").map_err(decode)?,
            handler: row.try_get("handler").map_err(decode)?,
            handler_version: row.try_get("handler_version").map_err(decode)?,
            topic: row.try_get("topic").map_err(decode)?,
            partition: row.try_get("kafka_partition").map_err(decode)?,
            offset: row.try_get("kafka_offset").map_err(decode)?,
            message_id: row.try_get("message_id").map_err(decode)?,
            key: row.try_get("key").map_err(decode)?,
            payload: row.try_get("payload").map_err(decode)?,
            headers: decode_headers(TABLE, &headers)?,
            timestamp_ms: row.try_get("timestamp_ms").map_err(decode)?,
            error_kind: DlqErrorKind::decode(&error_kind)?,
            error_message: row.try_get("error_message").map_err(decode)?,
            attempts: row.try_get("attempts").map_err(decode)?,
            first_failure_at: time(TABLE, row.try_get("first_failure_at").map_err(decode)?)?,
            last_failure_at: time(TABLE, row.try_get("last_failure_at").map_err(decode)?)?,
        },
        state: DlqState::decode(&state)?,
        resolved_at: optional_time(TABLE, row.try_get("resolved_at").map_err(decode)?)?,
        resolution_note: row.try_get("resolution_note").map_err(decode)?,
    })
}

/// Insert outbox rows (skipping message ids already present); the message ids inserted.
async fn insert_outbox(
    operation: &'static str,
    conn: &mut SqliteConnection,
    rows: &[OutboxRow<'_>],
) -> Result<HashSet<String>, StoreError> {
    let created_at = now();
    let mut inserted = HashSet::new();
    for chunk in rows.chunks(chunk_rows(10)) {
        let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO outbox (message_id, tenant, binding_id, topic, key, payload, headers, \
                                 causation_id, traceparent, created_at) ",
        );
        query.push_values(chunk, |mut values, row| {
            let insert = row.insert;
            values
                .push_bind(insert.message_id.clone())
                .push_bind(row.tenant.to_owned())
                .push_bind(row.binding_id.map(str::to_owned))
                .push_bind(insert.topic.clone())
                .push_bind(insert.key.clone())
                .push_bind(insert.payload.clone())
                .push_bind(encode_headers(&insert.headers))
                .push_bind(insert.causation_id.clone())
                .push_bind(insert.traceparent.clone())
                .push_bind(created_at);
        });
        query.push(" ON CONFLICT (message_id) DO NOTHING RETURNING message_id");
        let ids: Vec<String> = query
            .build_query_scalar()
            .fetch_all(&mut *conn)
            .await
            .map_err(db(operation))?;
        inserted.extend(ids);
    }
    Ok(inserted)
}

/// Upsert and delete the final keyed-state rows of a batch.
async fn write_state(
    operation: &'static str,
    conn: &mut SqliteConnection,
    rows: &[StateRow<'_>],
) -> Result<(), StoreError> {
    let (sets, deletes): (Vec<&StateRow<'_>>, Vec<&StateRow<'_>>) =
        rows.iter().partition(|row| row.value.is_some());
    let updated_at = now();
    for chunk in sets.chunks(chunk_rows(6)) {
        let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO keyed_state (tenant, handler, key, name, value, updated_at) ",
        );
        query.push_values(chunk, |mut values, row| {
            values
                .push_bind(row.tenant.to_owned())
                .push_bind(row.handler.to_owned())
                .push_bind(row.key.to_vec())
                .push_bind(row.name.to_owned())
                .push_bind(row.value.unwrap_or_default().to_vec())
                .push_bind(updated_at);
        });
        query.push(
            " ON CONFLICT (tenant, handler, key, name) \
             DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        );
        query
            .build()
            .execute(&mut *conn)
            .await
            .map_err(db(operation))?;
    }
    for chunk in deletes.chunks(chunk_rows(4)) {
        let mut query: QueryBuilder<Sqlite> =
            QueryBuilder::new("DELETE FROM keyed_state WHERE (tenant, handler, key, name) IN (");
        query.push_values(chunk, |mut values, row| {
            values
                .push_bind(row.tenant.to_owned())
                .push_bind(row.handler.to_owned())
                .push_bind(row.key.to_vec())
                .push_bind(row.name.to_owned());
        });
        query.push(")");
        query
            .build()
            .execute(&mut *conn)
            .await
            .map_err(db(operation))?;
    }
    Ok(())
}

/// Mark the DLQ entries replayed by a batch, `(id, binding_id)`, as replayed if they are
/// queued for replay.
async fn mark_replayed(
    operation: &'static str,
    conn: &mut SqliteConnection,
    replays: &[(i64, &str)],
    resolved_at: i64,
) -> Result<(), StoreError> {
    for chunk in replays.chunks(chunk_rows(2)) {
        let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
            "UPDATE dlq_entries SET state = 'replayed', lease_until = NULL, resolved_at = ",
        );
        query
            .push_bind(resolved_at)
            .push(" WHERE state = 'replaying' AND (id, binding_id) IN (");
        query.push_values(chunk, |mut values, (id, binding_id)| {
            values.push_bind(*id).push_bind((*binding_id).to_owned());
        });
        query.push(")");
        query
            .build()
            .execute(&mut *conn)
            .await
            .map_err(db(operation))?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(StoreError::from_migrate)
    }

    async fn close(&self) {
        self.pool.close().await;
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    async fn put_handler_version(
        &self,
        tenant: &str,
        handler: &str,
        component: &[u8],
        quota: &Quota,
    ) -> Result<HandlerVersion, StoreError> {
        const OP: &str = "put handler version";
        let sha256 = sha256_hex(component);
        let size = i64::try_from(component.len())
            .map_err(|_| StoreError::Invalid(format!("component of handler {handler}: size")))?;
        let created_at = now();
        // IMMEDIATE: this transaction holds the write lock, so neither version numbers nor the
        // quota check can race.
        let mut tx = self.begin(OP).await?;
        let existing = sqlx::query(select(
            HANDLER_VERSION_COLUMNS,
            "handler_versions WHERE tenant = $1 AND handler = $2 AND sha256 = $3",
        ))
        .bind(tenant)
        .bind(handler)
        .bind(&sha256)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        if let Some(row) = existing {
            // The same bytes again: nothing new is stored, so nothing is counted.
            let version = handler_version(&row)?;
            tx.commit().await.map_err(db(OP))?;
            return Ok(version);
        }
        if !quota.is_unlimited() {
            let known: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM handlers WHERE tenant = $1 AND name = $2)",
            )
            .bind(tenant)
            .bind(handler)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(OP))?;
            let usage = usage(&mut tx, tenant).await?;
            // Refused: dropping `tx` rolls back, nothing is stored.
            quota.check(tenant, handler, usage, !known, size)?;
        }
        sqlx::query(
            "INSERT INTO handlers (tenant, name, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(handler)
        .bind(created_at)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO handler_versions \
                 (tenant, handler, version, sha256, size, component, created_at) \
             SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4, $5, $6 \
             FROM handler_versions WHERE tenant = $1 AND handler = $2 \
             RETURNING {HANDLER_VERSION_COLUMNS}"
        )))
        .bind(tenant)
        .bind(handler)
        .bind(&sha256)
        .bind(size)
        .bind(component)
        .bind(created_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(OP))?;
        let version = handler_version(&row)?;
        tx.commit().await.map_err(db(OP))?;
        Ok(version)
    }

    async fn list_handlers(&self, tenant: &str) -> Result<Vec<HandlerSummary>, StoreError> {
        const OP: &str = "list handlers";
        let rows = sqlx::query(
            "SELECT h.tenant, h.name, h.active_version, h.created_at, \
                    COALESCE(max(v.version), 0) AS latest_version, \
                    count(v.version) AS versions, \
                    COALESCE(sum(v.size), 0) AS total_bytes \
             FROM handlers h \
             LEFT JOIN handler_versions v ON v.tenant = h.tenant AND v.handler = h.name \
             WHERE h.tenant = $1 \
             GROUP BY h.tenant, h.name \
             ORDER BY h.name",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(|row| {
                let decode = |error| StoreError::from_sqlx(OP, error);
                Ok(HandlerSummary {
                    tenant: row.try_get("tenant").map_err(decode)?,
                    handler: row.try_get("name").map_err(decode)?,
                    active_version: row.try_get("active_version").map_err(decode)?,
                    latest_version: row.try_get("latest_version").map_err(decode)?,
                    versions: row.try_get("versions").map_err(decode)?,
                    total_bytes: row.try_get("total_bytes").map_err(decode)?,
                    created_at: time("handlers", row.try_get("created_at").map_err(decode)?)?,
                })
            })
            .collect()
    }

    async fn delete_handler(&self, tenant: &str, handler: &str) -> Result<bool, StoreError> {
        const OP: &str = "delete handler";
        let mut tx = self.begin(OP).await?;
        let binding: Option<String> = sqlx::query_scalar(
            "SELECT id FROM bindings WHERE tenant = $1 AND handler = $2 ORDER BY id LIMIT 1",
        )
        .bind(tenant)
        .bind(handler)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        if let Some(binding) = binding {
            return Err(StoreError::Conflict(format!(
                "handler {tenant}/{handler} is run by binding {binding}"
            )));
        }
        // The handler points at its active version and the versions at the handler: unlink
        // first, then delete the versions, then the handler.
        sqlx::query("UPDATE handlers SET active_version = NULL WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(handler)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        sqlx::query("DELETE FROM handler_versions WHERE tenant = $1 AND handler = $2")
            .bind(tenant)
            .bind(handler)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        let deleted = sqlx::query("DELETE FROM handlers WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(handler)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?
            .rows_affected();
        tx.commit().await.map_err(db(OP))?;
        Ok(deleted > 0)
    }

    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db("read tenant usage"))?;
        usage(&mut conn, tenant).await
    }

    async fn handler_version(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<Option<HandlerVersion>, StoreError> {
        let row = sqlx::query(select(
            HANDLER_VERSION_COLUMNS,
            "handler_versions WHERE tenant = $1 AND handler = $2 AND version = $3",
        ))
        .bind(tenant)
        .bind(handler)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read handler version"))?;
        row.as_ref().map(handler_version).transpose()
    }

    async fn component_bytes(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        sqlx::query_scalar(
            "SELECT component FROM handler_versions \
             WHERE tenant = $1 AND handler = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(handler)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read component bytes"))
    }

    async fn activate(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<HandlerVersion, StoreError> {
        const OP: &str = "activate handler version";
        let mut tx = self.begin(OP).await?;
        let row = sqlx::query(select(
            HANDLER_VERSION_COLUMNS,
            "handler_versions WHERE tenant = $1 AND handler = $2 AND version = $3",
        ))
        .bind(tenant)
        .bind(handler)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!(
                "version {version} of handler {tenant}/{handler}"
            )));
        };
        sqlx::query("UPDATE handlers SET active_version = $3 WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(handler)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        let activated = handler_version(&row)?;
        tx.commit().await.map_err(db(OP))?;
        Ok(activated)
    }

    async fn active_version(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Option<HandlerVersion>, StoreError> {
        let row = sqlx::query(select(
            "v.tenant, v.handler, v.version, v.sha256, v.size, v.created_at",
            "handlers h JOIN handler_versions v \
               ON v.tenant = h.tenant AND v.handler = h.name AND v.version = h.active_version \
             WHERE h.tenant = $1 AND h.name = $2",
        ))
        .bind(tenant)
        .bind(handler)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read active handler version"))?;
        row.as_ref().map(handler_version).transpose()
    }

    async fn list_handler_versions(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Vec<HandlerVersion>, StoreError> {
        let rows = sqlx::query(select(
            HANDLER_VERSION_COLUMNS,
            "handler_versions WHERE tenant = $1 AND handler = $2 ORDER BY version",
        ))
        .bind(tenant)
        .bind(handler)
        .fetch_all(&self.pool)
        .await
        .map_err(db("list handler versions"))?;
        rows.iter().map(handler_version).collect()
    }

    async fn create_tenant(&self, tenant: &NewTenant) -> Result<Tenant, StoreError> {
        const OP: &str = "create tenant";
        validate_tenant(tenant)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO tenants (id, max_handlers, max_total_bytes, created_at) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING RETURNING {TENANT_COLUMNS}"
        )))
        .bind(&tenant.id)
        .bind(tenant.quota.max_handlers)
        .bind(tenant.quota.max_total_bytes)
        .bind(now())
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => tenant_record(&row),
            None => Err(StoreError::Conflict(format!(
                "tenant {} already exists",
                tenant.id
            ))),
        }
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query(select(TENANT_COLUMNS, "tenants WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read tenant"))?;
        row.as_ref().map(tenant_record).transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query(select(TENANT_COLUMNS, "tenants ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(db("list tenants"))?;
        rows.iter().map(tenant_record).collect()
    }

    async fn set_tenant_rate_limit(
        &self,
        tenant: &str,
        limit: Option<RateLimit>,
    ) -> Result<Tenant, StoreError> {
        const OP: &str = "set tenant rate limit";
        RateLimit::validate(limit)?;
        let (per_second, burst) = RateLimit::columns(limit);
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE tenants SET rate_limit_per_second = $2, rate_limit_burst = $3 \
             WHERE id = $1 RETURNING {TENANT_COLUMNS}"
        )))
        .bind(tenant)
        .bind(per_second)
        .bind(burst)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => tenant_record(&row),
            None => Err(StoreError::NotFound(format!("tenant {tenant}"))),
        }
    }

    async fn delete_tenant(&self, id: &str) -> Result<bool, StoreError> {
        const OP: &str = "delete tenant";
        let mut tx = self.begin(OP).await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(OP))?;
        if exists.is_none() {
            return Ok(false);
        }
        let (handlers, bindings): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM handlers WHERE tenant = $1), \
                    EXISTS (SELECT 1 FROM bindings WHERE tenant = $1)",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(OP))?;
        if handlers || bindings {
            let what = if handlers { "handlers" } else { "bindings" };
            return Err(StoreError::Conflict(format!(
                "tenant {id} still has {what}"
            )));
        }
        sqlx::query("DELETE FROM tokens WHERE tenant = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(true)
    }

    async fn create_token(&self, token: &NewToken) -> Result<TokenRecord, StoreError> {
        const OP: &str = "create token";
        validate_token_hash(&token.sha256)?;
        let mut tx = self.begin(OP).await?;
        let tenant: Option<i64> = sqlx::query_scalar("SELECT 1 FROM tenants WHERE id = $1")
            .bind(&token.tenant)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(OP))?;
        if tenant.is_none() {
            return Err(StoreError::NotFound(format!("tenant {}", token.tenant)));
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO tokens (id, tenant, sha256, label, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT DO NOTHING RETURNING {TOKEN_COLUMNS}"
        )))
        .bind(&token.id)
        .bind(&token.tenant)
        .bind(&token.sha256)
        .bind(token.label.as_deref())
        .bind(now())
        .bind(token.expires_at.map(|at| at.timestamp_micros()))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let Some(row) = row else {
            return Err(StoreError::Conflict(format!(
                "token {}: its id or secret is already taken",
                token.id
            )));
        };
        let record = token_record(&row)?;
        tx.commit().await.map_err(db(OP))?;
        Ok(record)
    }

    async fn list_tokens(&self, tenant: &str) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query(select(
            TOKEN_COLUMNS,
            "tokens WHERE tenant = $1 ORDER BY created_at, id",
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db("list tokens"))?;
        rows.iter().map(token_record).collect()
    }

    async fn revoke_token(&self, tenant: &str, id: &str) -> Result<TokenRecord, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE tokens SET revoked_at = COALESCE(revoked_at, $3) \
             WHERE tenant = $1 AND id = $2 RETURNING {TOKEN_COLUMNS}"
        )))
        .bind(tenant)
        .bind(id)
        .bind(now())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("revoke token"))?;
        match row {
            Some(row) => token_record(&row),
            None => Err(StoreError::NotFound(format!(
                "token {id} of tenant {tenant}"
            ))),
        }
    }

    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(select(TOKEN_COLUMNS, "tokens WHERE sha256 = $1"))
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read token"))?;
        row.as_ref().map(token_record).transpose()
    }

    async fn put_binding(
        &self,
        id: &str,
        tenant: &str,
        handler: &str,
        spec: &serde_json::Value,
    ) -> Result<BindingRecord, StoreError> {
        const OP: &str = "put binding";
        let at = now();
        let mut tx = self.begin(OP).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO bindings (id, tenant, handler, spec, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (id) DO UPDATE \
               SET handler = excluded.handler, spec = excluded.spec, \
                   revision = bindings.revision + 1, updated_at = excluded.updated_at \
               WHERE bindings.tenant = excluded.tenant \
             RETURNING {BINDING_COLUMNS}"
        )))
        .bind(id)
        .bind(tenant)
        .bind(handler)
        .bind(spec.to_string())
        .bind(at)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let Some(row) = row else {
            return Err(StoreError::Conflict(format!(
                "binding {id:?} belongs to another tenant"
            )));
        };
        let record = binding(&row)?;
        sqlx::query("UPDATE bindings_revision SET revision = revision + 1")
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(record)
    }

    async fn delete_binding(&self, id: &str) -> Result<bool, StoreError> {
        const OP: &str = "delete binding";
        let mut tx = self.begin(OP).await?;
        let deleted = sqlx::query("DELETE FROM bindings WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?
            .rows_affected();
        sqlx::query("DELETE FROM binding_breakers WHERE binding_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        if deleted > 0 {
            sqlx::query("UPDATE bindings_revision SET revision = revision + 1")
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?;
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(deleted > 0)
    }

    async fn binding(&self, id: &str) -> Result<Option<BindingRecord>, StoreError> {
        let row = sqlx::query(select(BINDING_COLUMNS, "bindings WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read binding"))?;
        row.as_ref().map(binding).transpose()
    }

    async fn list_bindings(&self) -> Result<Vec<BindingRecord>, StoreError> {
        let rows = sqlx::query(select(BINDING_COLUMNS, "bindings ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(db("list bindings"))?;
        rows.iter().map(binding).collect()
    }

    async fn bindings_revision(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT revision FROM bindings_revision")
            .fetch_one(&self.pool)
            .await
            .map_err(db("read bindings revision"))
    }

    async fn breaker_get(&self, binding_id: &str) -> Result<Option<BreakerRecord>, StoreError> {
        let row = sqlx::query(select(
            BREAKER_COLUMNS,
            "binding_breakers WHERE binding_id = $1",
        ))
        .bind(binding_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read breaker"))?;
        row.as_ref().map(breaker_record).transpose()
    }

    async fn breaker_set(
        &self,
        binding_id: &str,
        write: BreakerWrite,
    ) -> Result<BreakerRecord, StoreError> {
        let at = now();
        // $2 state, $3 forced, $4 opened_at, $5 open_until, $6 failures, $7 now.
        let (state, forced, opened_at, open_until, failures) = match write {
            BreakerWrite::Closed => ("closed", 0i64, None, None, None),
            BreakerWrite::Open {
                open_for,
                consecutive_failures,
            } => (
                "open",
                0,
                Some(at),
                Some(at.saturating_add(lease_micros(open_for))),
                Some(consecutive_failures.max(0)),
            ),
            BreakerWrite::Forced => ("open", 1, Some(at), None, None),
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO binding_breakers AS b (binding_id, state, forced, opened_at, open_until, \
                                               consecutive_failures, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (binding_id) DO UPDATE \
               SET state = excluded.state, forced = excluded.forced, \
                   opened_at = CASE WHEN excluded.forced = 1 AND b.state = 'open' \
                                    THEN b.opened_at ELSE excluded.opened_at END, \
                   open_until = excluded.open_until, \
                   consecutive_failures = COALESCE(excluded.consecutive_failures, \
                       CASE WHEN excluded.state = 'open' THEN b.consecutive_failures END), \
                   revision = b.revision + 1, updated_at = excluded.updated_at \
             RETURNING {BREAKER_COLUMNS}"
        )))
        .bind(binding_id)
        .bind(state)
        .bind(forced)
        .bind(opened_at)
        .bind(open_until)
        .bind(failures)
        .bind(at)
        .fetch_one(&self.pool)
        .await
        .map_err(db("write breaker"))?;
        breaker_record(&row)
    }

    async fn state_get(
        &self,
        tenant: &str,
        handler: &str,
        key: &[u8],
        name: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        sqlx::query_scalar(
            "SELECT value FROM keyed_state \
             WHERE tenant = $1 AND handler = $2 AND key = $3 AND name = $4",
        )
        .bind(tenant)
        .bind(handler)
        .bind(key)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read keyed state"))
    }

    async fn state_list(
        &self,
        tenant: &str,
        handler: &str,
        key: &[u8],
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        sqlx::query_as(
            "SELECT name, value FROM keyed_state \
             WHERE tenant = $1 AND handler = $2 AND key = $3 ORDER BY name",
        )
        .bind(tenant)
        .bind(handler)
        .bind(key)
        .fetch_all(&self.pool)
        .await
        .map_err(db("list keyed state"))
    }

    async fn commit(&self, batch: &[Completion]) -> Result<Vec<CommitOutcome>, StoreError> {
        const OP: &str = "commit";
        batch::validate(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let plan = KeyPlan::new(batch);
        let processed_at = now();
        let mut tx = self.begin(OP).await?;
        let mut inserted: HashSet<(String, String)> = HashSet::with_capacity(plan.rows.len());
        for chunk in plan.rows.chunks(chunk_rows(3)) {
            let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO processed_keys (binding_id, message_id, processed_at) ",
            );
            query.push_values(chunk, |mut values, (binding_id, message_id)| {
                values
                    .push_bind((*binding_id).to_owned())
                    .push_bind((*message_id).to_owned())
                    .push_bind(processed_at);
            });
            query.push(" ON CONFLICT DO NOTHING RETURNING binding_id, message_id");
            let rows: Vec<(String, String)> = query
                .build_query_as()
                .fetch_all(&mut *tx)
                .await
                .map_err(db(OP))?;
            inserted.extend(rows);
        }
        let fresh = mark_blocks(OP, &mut tx, &plan.blocks, processed_at).await?;
        let inserted = plan.inserted(
            Some(
                inserted
                    .iter()
                    .map(|(b, m)| (b.as_str(), m.as_str()))
                    .collect(),
            ),
            &fresh,
        );
        let (outcomes, writes) = batch::outcomes(batch, &inserted);
        write_state(OP, &mut tx, &writes.state).await?;
        let emitted = if writes.outbox.is_empty() {
            false
        } else {
            !insert_outbox(OP, &mut tx, &writes.outbox).await?.is_empty()
        };
        mark_replayed(OP, &mut tx, &batch::replays(batch), processed_at).await?;
        tx.commit().await.map_err(db(OP))?;
        if emitted {
            self.notify_outbox();
        }
        Ok(outcomes)
    }

    async fn outbox_insert(
        &self,
        tenant: &str,
        binding_id: Option<&str>,
        rows: &[OutboxInsert],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        const OP: &str = "insert outbox rows";
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let distinct = batch::distinct_outbox(tenant, binding_id, rows);
        let mut tx = self.begin(OP).await?;
        let inserted = insert_outbox(OP, &mut tx, &distinct).await?;
        tx.commit().await.map_err(db(OP))?;
        if !inserted.is_empty() {
            self.notify_outbox();
        }
        Ok(batch::insert_outcomes(rows, &inserted))
    }

    async fn outbox_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        let at = now();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE outbox SET lease_until = $1 + $2 \
             WHERE id IN (SELECT id FROM outbox \
                          WHERE state <> 'sent' AND (lease_until IS NULL OR lease_until <= $1) \
                          ORDER BY id LIMIT $3) \
             RETURNING {OUTBOX_COLUMNS}"
        )))
        .bind(at)
        .bind(lease_micros(lease))
        .bind(claim_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claim outbox rows"))?;
        let mut records = rows
            .iter()
            .map(outbox_record)
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|record| record.id);
        Ok(records)
    }

    async fn outbox_mark_sent(&self, ids: &[i64]) -> Result<u64, StoreError> {
        const OP: &str = "mark outbox rows sent";
        if ids.is_empty() {
            return Ok(0);
        }
        let at = now();
        let mut tx = self.begin(OP).await?;
        let mut marked = 0;
        for chunk in ids.chunks(chunk_rows(1)) {
            let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
                "UPDATE outbox SET state = 'sent', lease_until = NULL, sent_at = ",
            );
            query
                .push_bind(at)
                .push(" WHERE state <> 'sent' AND id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            query.push(")");
            marked += query
                .build()
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?
                .rows_affected();
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(marked)
    }

    async fn outbox_mark_error(&self, id: i64, error: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE outbox SET state = 'error', attempts = attempts + 1, last_error = $2 \
             WHERE id = $1 AND state <> 'sent'",
        )
        .bind(id)
        .bind(truncate(error, MAX_ERROR_BYTES))
        .execute(&self.pool)
        .await
        .map_err(db("mark outbox row failed"))?;
        Ok(result.rows_affected() > 0)
    }

    async fn outbox_status(&self, message_id: &str) -> Result<Option<OutboxRecord>, StoreError> {
        let row = sqlx::query(select(OUTBOX_COLUMNS, "outbox WHERE message_id = $1"))
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read outbox row"))?;
        row.as_ref().map(outbox_record).transpose()
    }

    async fn outbox_pending(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state <> 'sent'")
            .fetch_one(&self.pool)
            .await
            .map_err(db("count pending outbox rows"))
    }

    async fn outbox_notifications(&self) -> Result<Option<mpsc::Receiver<()>>, StoreError> {
        if self.pool.is_closed() {
            return Err(StoreError::from_sqlx(
                "listen for outbox rows",
                sqlx::Error::PoolClosed,
            ));
        }
        // One slot: a wake-up already queued covers every later one.
        let (sender, receiver) = mpsc::channel(1);
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sender);
        Ok(Some(receiver))
    }

    async fn dlq_insert(&self, entry: &DlqEntryInsert) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "INSERT INTO dlq_entries (tenant, binding_id, handler, handler_version, topic, \
                 kafka_partition, kafka_offset, message_id, key, payload, headers, timestamp_ms, \
                 error_kind, error_message, attempts, first_failure_at, last_failure_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (binding_id, message_id) WHERE state IN ('pending', 'replaying') \
             DO UPDATE SET \
                 state = 'pending', \
                 lease_until = NULL, \
                 handler_version = excluded.handler_version, \
                 error_kind = excluded.error_kind, \
                 error_message = excluded.error_message, \
                 attempts = dlq_entries.attempts + excluded.attempts, \
                 first_failure_at = min(dlq_entries.first_failure_at, excluded.first_failure_at), \
                 last_failure_at = max(dlq_entries.last_failure_at, excluded.last_failure_at) \
             RETURNING id",
        )
        .bind(&entry.tenant)
        .bind(&entry.binding_id)
        .bind(&entry.handler)
        .bind(entry.handler_version)
        .bind(&entry.topic)
        .bind(entry.partition)
        .bind(entry.offset)
        .bind(&entry.message_id)
        .bind(entry.key.as_deref())
        .bind(&entry.payload)
        .bind(encode_headers(&entry.headers))
        .bind(entry.timestamp_ms)
        .bind(entry.error_kind.as_str())
        .bind(&entry.error_message)
        .bind(entry.attempts)
        .bind(entry.first_failure_at.timestamp_micros())
        .bind(entry.last_failure_at.timestamp_micros())
        .fetch_one(&self.pool)
        .await
        .map_err(db("insert dlq entry"))
    }

    async fn dlq_replay(&self, tenant: &str, id: i64) -> Result<DlqEntry, StoreError> {
        const OP: &str = "replay dlq entry";
        let mut tx = self.begin(OP).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE dlq_entries SET state = 'replaying', lease_until = NULL \
             WHERE tenant = $1 AND id = $2 AND state = 'pending' \
             RETURNING {DLQ_COLUMNS}"
        )))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let result = match row {
            Some(row) => dlq_entry(&row),
            None => Err(dlq_state(OP, &mut tx, tenant, id).await?),
        };
        tx.commit().await.map_err(db(OP))?;
        result
    }

    async fn dlq_claim_replays(
        &self,
        binding_id: &str,
        scope: ReplayScope<'_>,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<DlqEntry>, StoreError> {
        let at = now();
        let (any, topics, held) = match scope {
            ReplayScope::Any => (true, "[]".to_owned(), "[]".to_owned()),
            ReplayScope::Held { topics, partitions } => (
                false,
                serde_json::Value::from(topics.to_vec()).to_string(),
                serde_json::Value::from(
                    partitions
                        .iter()
                        .map(|(t, p)| serde_json::json!([t, p]))
                        .collect::<Vec<_>>(),
                )
                .to_string(),
            ),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE dlq_entries SET lease_until = $1 + $2 \
             WHERE id IN (SELECT id FROM dlq_entries \
                          WHERE binding_id = $4 AND state = 'replaying' \
                            AND (lease_until IS NULL OR lease_until <= $1) \
                            AND ($5 \
                                 OR NOT EXISTS (SELECT 1 FROM json_each($6) t \
                                                WHERE t.value = dlq_entries.topic) \
                                 OR EXISTS (SELECT 1 FROM json_each($7) h \
                                            WHERE json_extract(h.value, '$[0]') = dlq_entries.topic \
                                              AND json_extract(h.value, '$[1]') \
                                                  = dlq_entries.kafka_partition)) \
                          ORDER BY id LIMIT $3) \
             RETURNING {DLQ_COLUMNS}"
        )))
        .bind(at)
        .bind(lease_micros(lease))
        .bind(claim_limit(limit))
        .bind(binding_id)
        .bind(any)
        .bind(topics)
        .bind(held)
        .fetch_all(&self.pool)
        .await
        .map_err(db("claim dlq replays"))?;
        let mut entries = rows.iter().map(dlq_entry).collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|entry| entry.id);
        Ok(entries)
    }

    async fn dlq_get(&self, tenant: &str, id: i64) -> Result<Option<DlqEntry>, StoreError> {
        let row = sqlx::query(select(
            DLQ_COLUMNS,
            "dlq_entries WHERE tenant = $1 AND id = $2",
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read dlq entry"))?;
        row.as_ref().map(dlq_entry).transpose()
    }

    async fn dlq_pending_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT tenant, handler, count(*) FROM dlq_entries WHERE state = 'pending' \
             GROUP BY tenant, handler ORDER BY tenant, handler",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("count pending dlq entries"))
    }

    async fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError> {
        let mut query: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {DLQ_COLUMNS} FROM dlq_entries WHERE 1"));
        if let Some(tenant) = &filter.tenant {
            query.push(" AND tenant = ").push_bind(tenant.clone());
        }
        if let Some(binding_id) = &filter.binding_id {
            query
                .push(" AND binding_id = ")
                .push_bind(binding_id.clone());
        }
        if let Some(handler) = &filter.handler {
            query.push(" AND handler = ").push_bind(handler.clone());
        }
        if let Some(kind) = filter.error_kind {
            query.push(" AND error_kind = ").push_bind(kind.as_str());
        }
        if let Some(since) = filter.since {
            query
                .push(" AND last_failure_at >= ")
                .push_bind(since.timestamp_micros());
        }
        if let Some(until) = filter.until {
            query
                .push(" AND last_failure_at < ")
                .push_bind(until.timestamp_micros());
        }
        if let Some(state) = filter.state {
            query.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(after_id) = filter.after_id {
            query.push(" AND id > ").push_bind(after_id);
        }
        query
            .push(" ORDER BY id LIMIT ")
            .push_bind(filter.page_size());
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("list dlq entries"))?;
        rows.iter().map(dlq_entry).collect()
    }

    async fn dlq_resolve(
        &self,
        tenant: &str,
        id: i64,
        resolution: Resolution,
        note: Option<&str>,
    ) -> Result<DlqEntry, StoreError> {
        const OP: &str = "resolve dlq entry";
        let mut tx = self.begin(OP).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE dlq_entries SET state = $3, resolved_at = $5, resolution_note = $4 \
             WHERE tenant = $1 AND id = $2 AND state = 'pending' \
             RETURNING {DLQ_COLUMNS}"
        )))
        .bind(tenant)
        .bind(id)
        .bind(DlqState::from(resolution).as_str())
        .bind(note)
        .bind(now())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let result = match row {
            Some(row) => dlq_entry(&row),
            None => Err(dlq_state(OP, &mut tx, tenant, id).await?),
        };
        tx.commit().await.map_err(db(OP))?;
        result
    }

    async fn sweep_processed_keys(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
        const OP: &str = "sweep processed keys";
        let blocks: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM processed_offsets WHERE processed_at < $1 RETURNING mask",
        )
        .bind(older_than.timestamp_micros())
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        let swept_blocks = batch::keys_in_blocks(&blocks);
        let result = sqlx::query("DELETE FROM processed_keys WHERE processed_at < $1")
            .bind(older_than.timestamp_micros())
            .execute(&self.pool)
            .await
            .map_err(db(OP))?;
        Ok(result.rows_affected() + swept_blocks)
    }
}
