//! [`PgStore`]: the store on PostgreSQL, for production.
//!
//! Batches travel as arrays: `INSERT … SELECT … FROM UNNEST($1::text[], …)`, so a group commit
//! is a constant number of statements whatever its size.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Postgres, QueryBuilder, Row};
use tokio::sync::mpsc;

use super::batch::{self, BlockKey, KeyPlan, OutboxRow};
use super::error::db;
use super::types::{
    decode_headers, encode_headers, not_pending, sha256_hex, validate_tenant, validate_token_hash,
};
use super::{
    BindingRecord, BreakerRecord, BreakerWrite, CommitOutcome, Completion, DlqEntry,
    DlqEntryInsert, DlqErrorKind, DlqFilter, DlqState, HandlerSummary, HandlerVersion,
    MAX_ERROR_BYTES, NewTenant, NewToken, OUTBOX_CHANNEL, OutboxInsert, OutboxRecord, OutboxState,
    Quota, RateLimit, ReplayScope, Resolution, Store, StoreError, Tenant, TenantUsage, TokenRecord,
    claim_limit, lease_micros, truncate,
};

/// Connections in the pool. A live [`Store::outbox_notifications`] listener holds one of them.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// How long an operation waits for a free (or new) connection before the store counts as
/// unavailable.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the notification listener waits after a first error before listening again; it
/// doubles on each further error, up to [`LISTEN_RETRY_MAX`].
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// The longest wait between two attempts to listen again.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Insert a commit's processed keys: `true` if they were all new; `false` if one was there
/// already, and then the statement wrote nothing.
async fn insert_keys<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    bindings: &[&str],
    messages: &[&str],
) -> Result<bool, StoreError> {
    let created = sqlx::query(
        "INSERT INTO processed_keys (binding_id, message_id) \
         SELECT * FROM UNNEST($1::text[], $2::text[])",
    )
    .bind(bindings)
    .bind(messages)
    .execute(executor)
    .await;
    match created {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(db("commit")(e)),
    }
}

/// Insert those of a commit's processed keys that are not there yet; the ones it created.
async fn insert_new_keys<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    bindings: &[&str],
    messages: &[&str],
) -> Result<Vec<(String, String)>, StoreError> {
    sqlx::query_as(
        "INSERT INTO processed_keys (binding_id, message_id) \
         SELECT * FROM UNNEST($1::text[], $2::text[]) \
         ON CONFLICT DO NOTHING \
         RETURNING binding_id, message_id",
    )
    .bind(bindings)
    .bind(messages)
    .fetch_all(executor)
    .await
    .map_err(db("commit"))
}

/// The processed keys `insert_new_keys` created, as [`batch::KeyPlan::inserted`] wants them.
fn created(returned: &[(String, String)]) -> batch::KeySet<'_> {
    returned
        .iter()
        .map(|(b, m)| (b.as_str(), m.as_str()))
        .collect()
}

/// Blocks of offsets as the column arrays of an `UNNEST`.
#[derive(Default)]
struct BlockColumns<'a> {
    bindings: Vec<&'a str>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    blocks: Vec<i64>,
    masks: Vec<i64>,
}

impl<'a> BlockColumns<'a> {
    fn of(blocks: &[(BlockKey<'a>, i64)]) -> Self {
        let mut columns = BlockColumns::default();
        for (block, mask) in blocks {
            columns.push(block, *mask);
        }
        columns
    }

    fn push(&mut self, block: &BlockKey<'a>, mask: i64) {
        self.bindings.push(block.binding_id);
        self.topics.push(block.topic);
        self.partitions.push(block.partition);
        self.blocks.push(block.block);
        self.masks.push(mask);
    }
}

/// Set the batch's bits of each block where none of them is set yet; whether each block was
/// written. A block where one of them is set already is left as it is (and stays locked to the
/// end of the transaction, when `executor` is one).
async fn mark_new_blocks<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    blocks: &[(BlockKey<'_>, i64)],
) -> Result<Vec<bool>, StoreError> {
    let columns = BlockColumns::of(blocks);
    let written: Vec<(String, String, i32, i64)> = sqlx::query_as(
        "INSERT INTO processed_offsets AS p (binding_id, topic, partition, block, mask) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bigint[]) \
         ON CONFLICT (binding_id, topic, partition, block) \
         DO UPDATE SET mask = p.mask | excluded.mask, processed_at = now() \
         WHERE p.mask & excluded.mask = 0 \
         RETURNING binding_id, topic, partition, block",
    )
    .bind(&columns.bindings)
    .bind(&columns.topics)
    .bind(&columns.partitions)
    .bind(&columns.blocks)
    .bind(&columns.masks)
    .fetch_all(executor)
    .await
    .map_err(db("commit"))?;
    if written.len() == blocks.len() {
        return Ok(vec![true; blocks.len()]);
    }
    let written: HashSet<(&str, &str, i32, i64)> = written
        .iter()
        .map(|(b, t, p, k)| (b.as_str(), t.as_str(), *p, *k))
        .collect();
    Ok(blocks
        .iter()
        .map(|(b, _)| written.contains(&(b.binding_id, b.topic, b.partition, b.block)))
        .collect())
}

/// Set the bits of `blocks` that are not set yet, whatever others are; the bits set, block by
/// block. Locks each block (creating a missing one), reading its mask in the same statement,
/// then writes: a concurrent writer of the same block — or the retention sweep — waits for this
/// transaction, so one writer at a time decides which of a block's bits are new.
async fn mark_blocks_settling(
    tx: &mut sqlx::PgConnection,
    blocks: &[(BlockKey<'_>, i64)],
) -> Result<Vec<i64>, StoreError> {
    const OP: &str = "commit";
    let columns = BlockColumns::of(blocks);
    // `DO UPDATE` with the mask unchanged: it locks an existing block and returns its latest
    // mask; a missing one is created empty (and locked as any new row).
    let before: Vec<batch::StoredBlock> = sqlx::query_as(
        "INSERT INTO processed_offsets AS o (binding_id, topic, partition, block, mask) \
         SELECT b, t, p, k, 0 FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[]) \
                AS u(b, t, p, k) \
         ON CONFLICT (binding_id, topic, partition, block) DO UPDATE SET mask = o.mask \
         RETURNING binding_id, topic, partition, block, mask",
    )
    .bind(&columns.bindings)
    .bind(&columns.topics)
    .bind(&columns.partitions)
    .bind(&columns.blocks)
    .fetch_all(&mut *tx)
    .await
    .map_err(db(OP))?;
    let fresh = batch::fresh_bits(blocks, &before);
    let mut updates = BlockColumns::default();
    for ((block, _), fresh) in blocks.iter().zip(&fresh) {
        if *fresh != 0 {
            updates.push(block, *fresh);
        }
    }
    if !updates.masks.is_empty() {
        sqlx::query(
            "UPDATE processed_offsets o SET mask = o.mask | u.m, processed_at = now() \
             FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bigint[]) \
                  AS u(b, t, p, k, m) \
             WHERE o.binding_id = u.b AND o.topic = u.t AND o.partition = u.p AND o.block = u.k",
        )
        .bind(&updates.bindings)
        .bind(&updates.topics)
        .bind(&updates.partitions)
        .bind(&updates.blocks)
        .bind(&updates.masks)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
    }
    Ok(fresh)
}

/// Each block's fresh bits once `mark_new_blocks` wrote those of `written`: all of a written
/// block's; the others' settled by `mark_blocks_settling` in `tx`.
async fn settle(
    tx: &mut sqlx::PgConnection,
    blocks: &[(BlockKey<'_>, i64)],
    written: &[bool],
) -> Result<Vec<i64>, StoreError> {
    let mut fresh: Vec<i64> = blocks
        .iter()
        .zip(written)
        .map(|((_, mask), written)| if *written { *mask } else { 0 })
        .collect();
    let (indexes, rest): (Vec<usize>, Vec<(BlockKey<'_>, i64)>) = blocks
        .iter()
        .zip(written)
        .enumerate()
        .filter(|(_, (_, written))| !**written)
        .map(|(i, (block, _))| (i, *block))
        .unzip();
    if !rest.is_empty() {
        let settled = mark_blocks_settling(tx, &rest).await?;
        for (i, bits) in indexes.into_iter().zip(settled) {
            fresh[i] = bits;
        }
    }
    Ok(fresh)
}

/// The store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connect to `url` (`postgres://…`) with the default pool settings. Does not migrate; see
    /// [`super::connect`].
    ///
    /// Opens one connection first, outside the pool, so that an unreachable server fails at
    /// once with its cause (e.g. connection refused) rather than as a pool timeout.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(db("connect"))?;
        let probe = options.connect().await.map_err(db("connect"))?;
        // The probe only proved the server is there; failing to say goodbye changes nothing.
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(DEFAULT_MAX_CONNECTIONS)
            .acquire_timeout(DEFAULT_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    /// A store over an existing pool.
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for tests and tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Why `tenant`'s DLQ entry `id` was not changed by an update of pending entries only:
    /// [`StoreError::NotFound`] or a [`StoreError::Conflict`] naming its state.
    async fn not_pending(
        &self,
        operation: &'static str,
        tenant: &str,
        id: i64,
    ) -> Result<StoreError, StoreError> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM dlq_entries WHERE tenant = $1 AND id = $2")
                .bind(tenant)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db(operation))?;
        Ok(not_pending(tenant, id, state))
    }
}

macro_rules! handler_version_columns {
    ($p:literal) => {
        concat!(
            $p,
            "tenant, ",
            $p,
            "handler, ",
            $p,
            "version, ",
            $p,
            "sha256, ",
            $p,
            "size, ",
            $p,
            "created_at"
        )
    };
}

const BINDING_COLUMNS: &str =
    "id, tenant, handler, spec::text AS spec, revision, created_at, updated_at";

macro_rules! outbox_columns {
    () => {
        "id, message_id, tenant, binding_id, topic, key, payload, headers::text AS headers, \
         causation_id, traceparent, state, attempts, last_error, created_at, sent_at"
    };
}

macro_rules! dlq_columns {
    () => {
        "id, tenant, binding_id, handler, handler_version, topic, kafka_partition, kafka_offset, \
         message_id, key, payload, headers::text AS headers, timestamp_ms, error_kind, \
         error_message, attempts, first_failure_at, last_failure_at, state, resolved_at, \
         resolution_note"
    };
}

macro_rules! tenant_columns {
    () => {
        "id, max_handlers, max_total_bytes, rate_limit_per_second, rate_limit_burst, created_at"
    };
}

macro_rules! token_columns {
    () => {
        "id, tenant, label, created_at, expires_at, revoked_at"
    };
}

fn handler_version(row: &PgRow) -> Result<HandlerVersion, sqlx::Error> {
    Ok(HandlerVersion {
        tenant: row.try_get("tenant")?,
        handler: row.try_get("handler")?,
        version: row.try_get("version")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get("size")?,
        created_at: row.try_get("created_at")?,
    })
}

fn tenant_record(row: &PgRow) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: row.try_get("id")?,
        quota: Quota {
            max_handlers: row.try_get("max_handlers")?,
            max_total_bytes: row.try_get("max_total_bytes")?,
        },
        rate_limit: RateLimit::from_columns(
            row.try_get("rate_limit_per_second")?,
            row.try_get("rate_limit_burst")?,
        ),
        created_at: row.try_get("created_at")?,
    })
}

fn token_record(row: &PgRow) -> Result<TokenRecord, sqlx::Error> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        label: row.try_get("label")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// Serialize, until `tx` ends, the transactions that change what `tenant` owns or uses of its
/// quotas (uploads, handler and tenant deletion), so that a quota check and the insert it
/// allows see the same usage. An advisory lock: the tenant may have no row to lock.
async fn lock_tenant(
    tx: &mut sqlx::PgConnection,
    operation: &'static str,
    tenant: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("weir.tenant:{tenant}"))
        .execute(&mut *tx)
        .await
        .map_err(db(operation))?;
    Ok(())
}

/// What `tenant` uses of its quotas, as `conn` sees it.
async fn usage(conn: &mut sqlx::PgConnection, tenant: &str) -> Result<TenantUsage, StoreError> {
    let (handlers, total_bytes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM handlers WHERE tenant = $1), \
                (SELECT COALESCE(sum(size), 0)::bigint FROM handler_versions WHERE tenant = $1)",
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

fn binding(row: &PgRow) -> Result<BindingRecord, StoreError> {
    let decode = |error| StoreError::from_sqlx("read binding", error);
    let spec: String = row.try_get("spec").map_err(decode)?;
    Ok(BindingRecord {
        id: row.try_get("id").map_err(decode)?,
        tenant: row.try_get("tenant").map_err(decode)?,
        handler: row.try_get("handler").map_err(decode)?,
        spec: serde_json::from_str(&spec)
            .map_err(|error| StoreError::corrupt("bindings", format!("spec: {error}")))?,
        revision: row.try_get("revision").map_err(decode)?,
        created_at: row.try_get("created_at").map_err(decode)?,
        updated_at: row.try_get("updated_at").map_err(decode)?,
    })
}

const BREAKER_COLUMNS: &str = "binding_id, state, forced, opened_at, open_until, \
     consecutive_failures, revision, updated_at";

fn breaker_record(row: &PgRow) -> Result<BreakerRecord, StoreError> {
    let decode = |error| StoreError::from_sqlx("read breaker", error);
    let state: String = row.try_get("state").map_err(decode)?;
    Ok(BreakerRecord {
        binding_id: row.try_get("binding_id").map_err(decode)?,
        open: match state.as_str() {
            "open" => true,
            "closed" => false,
            other => {
                return Err(StoreError::corrupt(
                    "binding_breakers",
                    format!("unknown state {other:?}"),
                ));
            }
        },
        forced: row.try_get("forced").map_err(decode)?,
        opened_at: row.try_get("opened_at").map_err(decode)?,
        open_until: row.try_get("open_until").map_err(decode)?,
        consecutive_failures: row.try_get("consecutive_failures").map_err(decode)?,
        revision: row.try_get("revision").map_err(decode)?,
        updated_at: row.try_get("updated_at").map_err(decode)?,
    })
}

fn outbox_record(row: &PgRow) -> Result<OutboxRecord, StoreError> {
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
        created_at: row.try_get("created_at").map_err(decode)?,
        sent_at: row.try_get("sent_at").map_err(decode)?,
    })
}

fn dlq_entry(row: &PgRow) -> Result<DlqEntry, StoreError> {
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
            headers: decode_headers("dlq_entries", &headers)?,
            timestamp_ms: row.try_get("timestamp_ms").map_err(decode)?,
            error_kind: DlqErrorKind::decode(&error_kind)?,
            error_message: row.try_get("error_message").map_err(decode)?,
            attempts: row.try_get("attempts").map_err(decode)?,
            first_failure_at: row.try_get("first_failure_at").map_err(decode)?,
            last_failure_at: row.try_get("last_failure_at").map_err(decode)?,
        },
        state: DlqState::decode(&state)?,
        resolved_at: row.try_get("resolved_at").map_err(decode)?,
        resolution_note: row.try_get("resolution_note").map_err(decode)?,
    })
}

/// Outbox rows as the column arrays of one `UNNEST` insert.
#[derive(Default)]
struct OutboxColumns<'a> {
    message_id: Vec<&'a str>,
    tenant: Vec<&'a str>,
    binding_id: Vec<Option<&'a str>>,
    topic: Vec<&'a str>,
    key: Vec<Option<&'a [u8]>>,
    payload: Vec<&'a [u8]>,
    headers: Vec<String>,
    causation_id: Vec<&'a str>,
    traceparent: Vec<Option<&'a str>>,
}

impl<'a> OutboxColumns<'a> {
    fn new(rows: &[OutboxRow<'a>]) -> Self {
        let mut columns = OutboxColumns::default();
        for row in rows {
            let insert = row.insert;
            columns.message_id.push(&insert.message_id);
            columns.tenant.push(row.tenant);
            columns.binding_id.push(row.binding_id);
            columns.topic.push(&insert.topic);
            columns.key.push(insert.key.as_deref());
            columns.payload.push(&insert.payload);
            columns.headers.push(encode_headers(&insert.headers));
            columns.causation_id.push(&insert.causation_id);
            columns.traceparent.push(insert.traceparent.as_deref());
        }
        columns
    }

    /// Insert the rows (skipping message ids already present); the message ids inserted.
    async fn insert(
        self,
        operation: &'static str,
        conn: &mut sqlx::PgConnection,
    ) -> Result<HashSet<String>, StoreError> {
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO outbox (message_id, tenant, binding_id, topic, key, payload, headers, \
                                 causation_id, traceparent) \
             SELECT m, t, b, tp, k, p, h::jsonb, c, tr \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], \
                         $6::bytea[], $7::text[], $8::text[], $9::text[]) \
                  WITH ORDINALITY AS u(m, t, b, tp, k, p, h, c, tr, n) \
             ORDER BY n \
             ON CONFLICT (message_id) DO NOTHING \
             RETURNING message_id",
        )
        .bind(self.message_id)
        .bind(self.tenant)
        .bind(self.binding_id)
        .bind(self.topic)
        .bind(self.key)
        .bind(self.payload)
        .bind(self.headers)
        .bind(self.causation_id)
        .bind(self.traceparent)
        .fetch_all(&mut *conn)
        .await
        .map_err(db(operation))?;
        if !inserted.is_empty() {
            // Delivered when (and only if) the transaction commits.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(OUTBOX_CHANNEL)
                .execute(&mut *conn)
                .await
                .map_err(db(operation))?;
        }
        Ok(inserted.into_iter().collect())
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(StoreError::from_migrate)
    }

    async fn close(&self) {
        self.pool.close().await;
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
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        // Serializes the tenant's uploads, so that version numbers have no gaps or races and
        // the quota check below holds until the commit.
        lock_tenant(&mut tx, OP, tenant).await?;
        let existing = sqlx::query(concat!(
            "SELECT ",
            handler_version_columns!(""),
            " FROM handler_versions WHERE tenant = $1 AND handler = $2 AND sha256 = $3"
        ))
        .bind(tenant)
        .bind(handler)
        .bind(&sha256)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        if let Some(row) = existing {
            // The same bytes again: nothing new is stored, so nothing is counted.
            let version = handler_version(&row).map_err(db(OP))?;
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
        sqlx::query("INSERT INTO handlers (tenant, name) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(tenant)
            .bind(handler)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        let row = sqlx::query(concat!(
            "INSERT INTO handler_versions (tenant, handler, version, sha256, size, component) \
             SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4, $5 \
             FROM handler_versions WHERE tenant = $1 AND handler = $2 \
             RETURNING ",
            handler_version_columns!("")
        ))
        .bind(tenant)
        .bind(handler)
        .bind(&sha256)
        .bind(size)
        .bind(component)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(OP))?;
        let version = handler_version(&row).map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(version)
    }

    async fn list_handlers(&self, tenant: &str) -> Result<Vec<HandlerSummary>, StoreError> {
        const OP: &str = "list handlers";
        let rows = sqlx::query(
            "SELECT h.tenant, h.name, h.active_version, h.created_at, \
                    COALESCE(max(v.version), 0) AS latest_version, \
                    count(v.version) AS versions, \
                    COALESCE(sum(v.size), 0)::bigint AS total_bytes \
             FROM handlers h \
             LEFT JOIN handler_versions v ON v.tenant = h.tenant AND v.handler = h.name \
             WHERE h.tenant = $1 \
             GROUP BY h.tenant, h.name \
             ORDER BY h.name COLLATE \"C\"",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(|row| {
                Ok(HandlerSummary {
                    tenant: row.try_get("tenant")?,
                    handler: row.try_get("name")?,
                    active_version: row.try_get("active_version")?,
                    latest_version: row.try_get("latest_version")?,
                    versions: row.try_get("versions")?,
                    total_bytes: row.try_get("total_bytes")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db(OP))
    }

    async fn delete_handler(&self, tenant: &str, handler: &str) -> Result<bool, StoreError> {
        const OP: &str = "delete handler";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        lock_tenant(&mut tx, OP, tenant).await?;
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
        usage(
            &mut *self.pool.acquire().await.map_err(db("read tenant usage"))?,
            tenant,
        )
        .await
    }

    async fn handler_version(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<Option<HandlerVersion>, StoreError> {
        const OP: &str = "read handler version";
        let row = sqlx::query(concat!(
            "SELECT ",
            handler_version_columns!(""),
            " FROM handler_versions WHERE tenant = $1 AND handler = $2 AND version = $3"
        ))
        .bind(tenant)
        .bind(handler)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        row.as_ref()
            .map(handler_version)
            .transpose()
            .map_err(db(OP))
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
        let row = sqlx::query(concat!(
            "UPDATE handlers h SET active_version = v.version FROM handler_versions v \
             WHERE h.tenant = $1 AND h.name = $2 \
               AND v.tenant = h.tenant AND v.handler = h.name AND v.version = $3 \
             RETURNING ",
            handler_version_columns!("v.")
        ))
        .bind(tenant)
        .bind(handler)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => handler_version(&row).map_err(db(OP)),
            None => Err(StoreError::NotFound(format!(
                "version {version} of handler {tenant}/{handler}"
            ))),
        }
    }

    async fn active_version(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Option<HandlerVersion>, StoreError> {
        const OP: &str = "read active handler version";
        let row = sqlx::query(concat!(
            "SELECT ",
            handler_version_columns!("v."),
            " FROM handlers h JOIN handler_versions v \
               ON v.tenant = h.tenant AND v.handler = h.name AND v.version = h.active_version \
             WHERE h.tenant = $1 AND h.name = $2"
        ))
        .bind(tenant)
        .bind(handler)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        row.as_ref()
            .map(handler_version)
            .transpose()
            .map_err(db(OP))
    }

    async fn list_handler_versions(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Vec<HandlerVersion>, StoreError> {
        const OP: &str = "list handler versions";
        let rows = sqlx::query(concat!(
            "SELECT ",
            handler_version_columns!(""),
            " FROM handler_versions WHERE tenant = $1 AND handler = $2 ORDER BY version"
        ))
        .bind(tenant)
        .bind(handler)
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(handler_version)
            .collect::<Result<_, _>>()
            .map_err(db(OP))
    }

    async fn create_tenant(&self, tenant: &NewTenant) -> Result<Tenant, StoreError> {
        const OP: &str = "create tenant";
        validate_tenant(tenant)?;
        let row = sqlx::query(concat!(
            "INSERT INTO tenants (id, max_handlers, max_total_bytes) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING RETURNING ",
            tenant_columns!()
        ))
        .bind(&tenant.id)
        .bind(tenant.quota.max_handlers)
        .bind(tenant.quota.max_total_bytes)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => tenant_record(&row).map_err(db(OP)),
            None => Err(StoreError::Conflict(format!(
                "tenant {} already exists",
                tenant.id
            ))),
        }
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        const OP: &str = "read tenant";
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        row.as_ref().map(tenant_record).transpose().map_err(db(OP))
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        const OP: &str = "list tenants";
        let rows = sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants ORDER BY id COLLATE \"C\""
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(tenant_record)
            .collect::<Result<_, _>>()
            .map_err(db(OP))
    }

    async fn set_tenant_rate_limit(
        &self,
        tenant: &str,
        limit: Option<RateLimit>,
    ) -> Result<Tenant, StoreError> {
        const OP: &str = "set tenant rate limit";
        RateLimit::validate(limit)?;
        let (per_second, burst) = RateLimit::columns(limit);
        let row = sqlx::query(concat!(
            "UPDATE tenants SET rate_limit_per_second = $2, rate_limit_burst = $3 \
             WHERE id = $1 RETURNING ",
            tenant_columns!()
        ))
        .bind(tenant)
        .bind(per_second)
        .bind(burst)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => tenant_record(&row).map_err(db(OP)),
            None => Err(StoreError::NotFound(format!("tenant {tenant}"))),
        }
    }

    async fn delete_tenant(&self, id: &str) -> Result<bool, StoreError> {
        const OP: &str = "delete tenant";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        // Uploads of the tenant's handlers wait for this transaction (and it for them).
        lock_tenant(&mut tx, OP, id).await?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE")
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
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        // Keeps the tenant from being deleted until the token is in.
        let tenant: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM tenants WHERE id = $1 FOR KEY SHARE")
                .bind(&token.tenant)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db(OP))?;
        if tenant.is_none() {
            return Err(StoreError::NotFound(format!("tenant {}", token.tenant)));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO tokens (id, tenant, sha256, label, expires_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING RETURNING ",
            token_columns!()
        ))
        .bind(&token.id)
        .bind(&token.tenant)
        .bind(&token.sha256)
        .bind(token.label.as_deref())
        .bind(token.expires_at)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let Some(row) = row else {
            return Err(StoreError::Conflict(format!(
                "token {}: its id or secret is already taken",
                token.id
            )));
        };
        let record = token_record(&row).map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(record)
    }

    async fn list_tokens(&self, tenant: &str) -> Result<Vec<TokenRecord>, StoreError> {
        const OP: &str = "list tokens";
        let rows = sqlx::query(concat!(
            "SELECT ",
            token_columns!(),
            " FROM tokens WHERE tenant = $1 ORDER BY created_at, id COLLATE \"C\""
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(token_record)
            .collect::<Result<_, _>>()
            .map_err(db(OP))
    }

    async fn revoke_token(&self, tenant: &str, id: &str) -> Result<TokenRecord, StoreError> {
        const OP: &str = "revoke token";
        let row = sqlx::query(concat!(
            "UPDATE tokens SET revoked_at = COALESCE(revoked_at, now()) \
             WHERE tenant = $1 AND id = $2 RETURNING ",
            token_columns!()
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => token_record(&row).map_err(db(OP)),
            None => Err(StoreError::NotFound(format!(
                "token {id} of tenant {tenant}"
            ))),
        }
    }

    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        const OP: &str = "read token";
        let row = sqlx::query(concat!(
            "SELECT ",
            token_columns!(),
            " FROM tokens WHERE sha256 = $1"
        ))
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        row.as_ref().map(token_record).transpose().map_err(db(OP))
    }

    async fn put_binding(
        &self,
        id: &str,
        tenant: &str,
        handler: &str,
        spec: &serde_json::Value,
    ) -> Result<BindingRecord, StoreError> {
        const OP: &str = "put binding";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let row = sqlx::query(
            "INSERT INTO bindings (id, tenant, handler, spec) VALUES ($1, $2, $3, $4::jsonb) \
             ON CONFLICT (id) DO UPDATE \
               SET handler = excluded.handler, spec = excluded.spec, \
                   revision = bindings.revision + 1, updated_at = now() \
               WHERE bindings.tenant = excluded.tenant \
             RETURNING id, tenant, handler, spec::text AS spec, revision, created_at, updated_at",
        )
        .bind(id)
        .bind(tenant)
        .bind(handler)
        .bind(spec.to_string())
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
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
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
        let sql = format!("SELECT {BINDING_COLUMNS} FROM bindings WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read binding"))?;
        row.as_ref().map(binding).transpose()
    }

    async fn list_bindings(&self) -> Result<Vec<BindingRecord>, StoreError> {
        let sql = format!("SELECT {BINDING_COLUMNS} FROM bindings ORDER BY id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
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
        let sql = format!("SELECT {BREAKER_COLUMNS} FROM binding_breakers WHERE binding_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
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
        // $2 state, $3 forced, $4 open_for (µs, NULL: no until), $5 failures.
        let (state, forced, open_for, failures) = match write {
            BreakerWrite::Closed => ("closed", false, None, None),
            BreakerWrite::Open {
                open_for,
                consecutive_failures,
            } => (
                "open",
                false,
                Some(lease_micros(open_for)),
                Some(consecutive_failures.max(0)),
            ),
            BreakerWrite::Forced => ("open", true, None, None),
        };
        let sql = format!(
            "INSERT INTO binding_breakers AS b (binding_id, state, forced, opened_at, open_until, \
                                               consecutive_failures) \
             VALUES ($1, $2, $3, CASE WHEN $2 = 'open' THEN now() END, \
                     now() + $4 * interval '1 microsecond', $5) \
             ON CONFLICT (binding_id) DO UPDATE \
               SET state = excluded.state, forced = excluded.forced, \
                   opened_at = CASE WHEN excluded.state = 'closed' THEN NULL \
                                    WHEN excluded.forced AND b.state = 'open' THEN b.opened_at \
                                    ELSE excluded.opened_at END, \
                   open_until = excluded.open_until, \
                   consecutive_failures = COALESCE(excluded.consecutive_failures, \
                       CASE WHEN excluded.state = 'open' THEN b.consecutive_failures END), \
                   revision = b.revision + 1, updated_at = now() \
             RETURNING {BREAKER_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(binding_id)
            .bind(state)
            .bind(forced)
            .bind(open_for)
            .bind(failures)
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
             WHERE tenant = $1 AND handler = $2 AND key = $3 ORDER BY name COLLATE \"C\"",
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
        let (bindings, messages): (Vec<&str>, Vec<&str>) = plan.rows.iter().copied().unzip();

        // Position ids are bits of offset blocks (see `batch`): a block none of whose bits is
        // set yet is written at once (`mark_new_blocks`); one where a bit is set already (a
        // duplicate, after a crash or a rebalance) is then locked, read and written again by
        // `mark_blocks_settling`, which says which of the batch's bits are new.
        //
        // The other ids are rows. The common case is a batch of new messages: a plain insert,
        // without `ON CONFLICT` (whose speculative insertion costs PostgreSQL an index probe
        // and a WAL record more per row). Only if it hits a key already there is it undone and
        // the batch inserted again asking which rows are new.
        //
        // A batch that writes nothing but its processed keys runs outside a transaction: each
        // statement is atomic on its own, and a block written early by the first one is the
        // batch's own whatever follows (its messages have no effects to lose). Under light load
        // commits are small and frequent, and the round trips saved show in PostgreSQL's CPU.
        if batch::writes_only_keys(batch) {
            let returned: Vec<(String, String)>;
            let rows =
                if plan.rows.is_empty() || insert_keys(&self.pool, &bindings, &messages).await? {
                    None
                } else {
                    returned = insert_new_keys(&self.pool, &bindings, &messages).await?;
                    Some(created(&returned))
                };
            let mut fresh = Vec::new();
            if !plan.blocks.is_empty() {
                let written = mark_new_blocks(&self.pool, &plan.blocks).await?;
                fresh = if written.contains(&false) {
                    let mut tx = self.pool.begin().await.map_err(db(OP))?;
                    let fresh = settle(&mut tx, &plan.blocks, &written).await?;
                    tx.commit().await.map_err(db(OP))?;
                    fresh
                } else {
                    plan.blocks.iter().map(|(_, mask)| *mask).collect()
                };
            }
            return Ok(batch::outcomes(batch, &plan.inserted(rows, &fresh)).0);
        }
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let returned: Vec<(String, String)>;
        let rows = if plan.rows.is_empty() || insert_keys(&mut *tx, &bindings, &messages).await? {
            None
        } else {
            tx.rollback().await.map_err(db(OP))?;
            tx = self.pool.begin().await.map_err(db(OP))?;
            returned = insert_new_keys(&mut *tx, &bindings, &messages).await?;
            Some(created(&returned))
        };
        let mut fresh = Vec::new();
        if !plan.blocks.is_empty() {
            let written = mark_new_blocks(&mut *tx, &plan.blocks).await?;
            fresh = settle(&mut tx, &plan.blocks, &written).await?;
        }
        let inserted = plan.inserted(rows, &fresh);
        let (outcomes, writes) = batch::outcomes(batch, &inserted);

        let (sets, deletes): (Vec<_>, Vec<_>) =
            writes.state.iter().partition(|row| row.value.is_some());
        if !sets.is_empty() {
            sqlx::query(
                "INSERT INTO keyed_state (tenant, handler, key, name, value) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[]) \
                 ON CONFLICT (tenant, handler, key, name) \
                 DO UPDATE SET value = excluded.value, updated_at = now()",
            )
            .bind(sets.iter().map(|row| row.tenant).collect::<Vec<_>>())
            .bind(sets.iter().map(|row| row.handler).collect::<Vec<_>>())
            .bind(sets.iter().map(|row| row.key).collect::<Vec<_>>())
            .bind(sets.iter().map(|row| row.name).collect::<Vec<_>>())
            .bind(
                sets.iter()
                    .map(|row| row.value.unwrap_or_default())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        if !deletes.is_empty() {
            sqlx::query(
                "DELETE FROM keyed_state s \
                 USING UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[]) \
                       AS d(tenant, handler, key, name) \
                 WHERE s.tenant = d.tenant AND s.handler = d.handler \
                   AND s.key = d.key AND s.name = d.name",
            )
            .bind(deletes.iter().map(|row| row.tenant).collect::<Vec<_>>())
            .bind(deletes.iter().map(|row| row.handler).collect::<Vec<_>>())
            .bind(deletes.iter().map(|row| row.key).collect::<Vec<_>>())
            .bind(deletes.iter().map(|row| row.name).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        if !writes.outbox.is_empty() {
            OutboxColumns::new(&writes.outbox)
                .insert(OP, &mut tx)
                .await?;
        }
        let replays = batch::replays(batch);
        if !replays.is_empty() {
            let (ids, bindings): (Vec<i64>, Vec<&str>) = replays.into_iter().unzip();
            sqlx::query(
                "UPDATE dlq_entries d \
                 SET state = 'replayed', resolved_at = now(), lease_until = NULL \
                 FROM UNNEST($1::bigint[], $2::text[]) AS r(id, binding_id) \
                 WHERE d.id = r.id AND d.binding_id = r.binding_id AND d.state = 'replaying'",
            )
            .bind(ids)
            .bind(bindings)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        tx.commit().await.map_err(db(OP))?;
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
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let inserted = OutboxColumns::new(&distinct).insert(OP, &mut tx).await?;
        tx.commit().await.map_err(db(OP))?;
        Ok(batch::insert_outcomes(rows, &inserted))
    }

    async fn outbox_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "UPDATE outbox SET lease_until = now() + $2 * interval '1 microsecond' \
             WHERE id IN (SELECT id FROM outbox \
                          WHERE state <> 'sent' AND (lease_until IS NULL OR lease_until <= now()) \
                          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING ",
            outbox_columns!()
        ))
        .bind(claim_limit(limit))
        .bind(lease_micros(lease))
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
        if ids.is_empty() {
            return Ok(0);
        }
        let result = sqlx::query(
            "UPDATE outbox SET state = 'sent', sent_at = now(), lease_until = NULL \
             WHERE id = ANY($1) AND state <> 'sent'",
        )
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(db("mark outbox rows sent"))?;
        Ok(result.rows_affected())
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
        let row = sqlx::query(concat!(
            "SELECT ",
            outbox_columns!(),
            " FROM outbox WHERE message_id = $1"
        ))
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
        const OP: &str = "listen for outbox rows";
        let mut listener = PgListener::connect_with(&self.pool).await.map_err(db(OP))?;
        listener.listen(OUTBOX_CHANNEL).await.map_err(db(OP))?;
        // One slot: a wake-up already queued covers every later one.
        let (sender, receiver) = mpsc::channel(1);
        // The task ends when the receiver is dropped or the store is closed; it holds nothing
        // else, so it needs no shutdown of its own.
        tokio::spawn(async move {
            let mut retry = LISTEN_RETRY;
            loop {
                let received = tokio::select! {
                    () = sender.closed() => break,
                    received = listener.try_recv() => received,
                };
                match received {
                    // A notification; or `None`: the connection was lost and has been
                    // re-established, and notifications may have been missed meanwhile.
                    Ok(_) => retry = LISTEN_RETRY,
                    Err(sqlx::Error::PoolClosed) => break,
                    Err(error) => {
                        tracing::warn!(%error, retry_s = retry.as_secs(), "outbox listener: cannot listen, retrying");
                        tokio::select! {
                            () = sender.closed() => break,
                            () = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(LISTEN_RETRY_MAX);
                    }
                }
                // Full means a wake-up is already queued; closed ends the loop above.
                let _ = sender.try_send(());
            }
        });
        Ok(Some(receiver))
    }

    async fn dlq_insert(&self, entry: &DlqEntryInsert) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "INSERT INTO dlq_entries (tenant, binding_id, handler, handler_version, topic, \
                 kafka_partition, kafka_offset, message_id, key, payload, headers, timestamp_ms, \
                 error_kind, error_message, attempts, first_failure_at, last_failure_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15, \
                     $16, $17) \
             ON CONFLICT (binding_id, message_id) WHERE state IN ('pending', 'replaying') \
             DO UPDATE SET \
                 state = 'pending', \
                 lease_until = NULL, \
                 handler_version = excluded.handler_version, \
                 error_kind = excluded.error_kind, \
                 error_message = excluded.error_message, \
                 attempts = dlq_entries.attempts + excluded.attempts, \
                 first_failure_at = LEAST(dlq_entries.first_failure_at, excluded.first_failure_at), \
                 last_failure_at = GREATEST(dlq_entries.last_failure_at, excluded.last_failure_at) \
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
        .bind(entry.first_failure_at)
        .bind(entry.last_failure_at)
        .fetch_one(&self.pool)
        .await
        .map_err(db("insert dlq entry"))
    }

    async fn dlq_replay(&self, tenant: &str, id: i64) -> Result<DlqEntry, StoreError> {
        const OP: &str = "replay dlq entry";
        let row = sqlx::query(concat!(
            "UPDATE dlq_entries SET state = 'replaying', lease_until = NULL \
             WHERE tenant = $1 AND id = $2 AND state = 'pending' \
             RETURNING ",
            dlq_columns!()
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => dlq_entry(&row),
            None => Err(self.not_pending(OP, tenant, id).await?),
        }
    }

    async fn dlq_claim_replays(
        &self,
        binding_id: &str,
        scope: ReplayScope<'_>,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<DlqEntry>, StoreError> {
        let (any, topics, held_topics, held_partitions) = match scope {
            ReplayScope::Any => (true, Vec::new(), Vec::new(), Vec::new()),
            ReplayScope::Held { topics, partitions } => (
                false,
                topics.iter().map(String::as_str).collect(),
                partitions.iter().map(|(t, _)| t.as_str()).collect(),
                partitions.iter().map(|(_, p)| *p).collect(),
            ),
        };
        let rows = sqlx::query(concat!(
            "UPDATE dlq_entries SET lease_until = now() + $3 * interval '1 microsecond' \
             WHERE id IN (SELECT id FROM dlq_entries \
                          WHERE binding_id = $1 AND state = 'replaying' \
                            AND (lease_until IS NULL OR lease_until <= now()) \
                            AND ($4 OR NOT (topic = ANY($5::text[])) \
                                 OR (topic, kafka_partition) IN \
                                    (SELECT * FROM UNNEST($6::text[], $7::int[]))) \
                          ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING ",
            dlq_columns!()
        ))
        .bind(binding_id)
        .bind(claim_limit(limit))
        .bind(lease_micros(lease))
        .bind(any)
        .bind(&topics)
        .bind(&held_topics)
        .bind(&held_partitions)
        .fetch_all(&self.pool)
        .await
        .map_err(db("claim dlq replays"))?;
        let mut entries = rows.iter().map(dlq_entry).collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|entry| entry.id);
        Ok(entries)
    }

    async fn dlq_get(&self, tenant: &str, id: i64) -> Result<Option<DlqEntry>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            dlq_columns!(),
            " FROM dlq_entries WHERE tenant = $1 AND id = $2"
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
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(concat!(
            "SELECT ",
            dlq_columns!(),
            " FROM dlq_entries WHERE true"
        ));
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
            query.push(" AND last_failure_at >= ").push_bind(since);
        }
        if let Some(until) = filter.until {
            query.push(" AND last_failure_at < ").push_bind(until);
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
        let row = sqlx::query(concat!(
            "UPDATE dlq_entries SET state = $3, resolved_at = now(), resolution_note = $4 \
             WHERE tenant = $1 AND id = $2 AND state = 'pending' \
             RETURNING ",
            dlq_columns!()
        ))
        .bind(tenant)
        .bind(id)
        .bind(DlqState::from(resolution).as_str())
        .bind(note)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        match row {
            Some(row) => dlq_entry(&row),
            None => Err(self.not_pending(OP, tenant, id).await?),
        }
    }

    async fn sweep_processed_keys(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
        const OP: &str = "sweep processed keys";
        let rows = sqlx::query("DELETE FROM processed_keys WHERE processed_at < $1")
            .bind(older_than)
            .execute(&self.pool)
            .await
            .map_err(db(OP))?;
        let blocks: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM processed_offsets WHERE processed_at < $1 RETURNING mask",
        )
        .bind(older_than)
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        Ok(rows.rows_affected() + batch::keys_in_blocks(&blocks))
    }
}
