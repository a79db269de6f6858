//! The benchmark's corner of PostgreSQL: a fresh schema per run, and the queries the phases
//! read their results with.
//!
//! Owns the schema's life (created at the start, dropped with everything in it at the end),
//! the store URL that points Weir at it (`search_path`), the baseline's table
//! (`seed_processed_keys`, the shape of Weir's processed keys: the primary key led by the
//! message id, bytewise), and the read-only queries on Weir's processed keys that tell when a
//! phase is done and when each message committed. A schema of its own keeps the run apart from
//! whatever else the database holds: the host started by the benchmark reconciles *every*
//! binding of its store, and the tests leave bindings behind.
//!
//! Knows the two forms of Weir's processed keys (a row of `processed_keys`; a bit of a
//! `processed_offsets` block for an id that names a Kafka position, [`weir::store::position`])
//! only to read them; it writes none.

use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use weir::config::redact_url;
use weir_acceptance::unique_name;

/// How long a query waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The run's schema.
pub struct BenchSchema {
    /// Schema name: only `[a-z0-9_]`, so it can be spliced into SQL.
    pub name: String,
    /// The store URL with `search_path` set to the schema.
    pub url: String,
    /// Connections on the server's default `search_path`, for `CREATE` / `DROP SCHEMA`.
    admin: PgPool,
    /// Connections inside the schema, for the queries on processed keys.
    pool: PgPool,
}

/// Server settings that change what the figures mean.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSettings {
    /// `server_version`.
    pub version: String,
    /// `fsync`: off on `tests/services`, so a commit costs no disk flush.
    pub fsync: String,
    /// `synchronous_commit`.
    pub synchronous_commit: String,
    /// `track_commit_timestamp`: when on, latency uses the real commit time.
    pub track_commit_timestamp: String,
}

impl BenchSchema {
    /// Create a fresh schema and the baseline's table in it.
    pub async fn create(base_url: &str) -> anyhow::Result<Self> {
        let redacted = redact_url(base_url);
        // One connection first: a pool would hide the cause (a wrong password, a refused
        // connection) behind its time-out.
        let probe = PgConnection::connect(base_url)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {redacted}"))?;
        let _ = probe.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(base_url)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {redacted}"))?;
        let name = unique_name("weir_bench");
        // `unique_name` yields only [a-z0-9_]: splicing it into SQL is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await
            .with_context(|| format!("cannot create schema {name} in {redacted}"))?;
        let separator = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{separator}options=-c%20search_path%3D{name}");
        let schema = async {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(&url)
                .await
                .context("cannot connect to the benchmark schema")?;
            sqlx::query(
                "CREATE TABLE seed_processed_keys (\
                     binding_id   text COLLATE \"C\" NOT NULL, \
                     message_id   text COLLATE \"C\" NOT NULL, \
                     processed_at timestamptz NOT NULL DEFAULT now(), \
                     PRIMARY KEY (message_id, binding_id))",
            )
            .execute(&pool)
            .await
            .context("cannot create the baseline's table")?;
            Ok::<_, anyhow::Error>(pool)
        }
        .await;
        match schema {
            Ok(pool) => Ok(Self {
                name,
                url,
                admin,
                pool,
            }),
            Err(e) => {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .execute(&admin)
                .await;
                Err(e)
            }
        }
    }

    /// Drop the schema and everything in it.
    pub async fn drop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.name
        )))
        .execute(&self.admin)
        .await
        .with_context(|| format!("cannot drop schema {}", self.name))?;
        self.admin.close().await;
        Ok(())
    }

    /// The server settings that change what the figures mean.
    pub async fn settings(&self) -> anyhow::Result<ServerSettings> {
        let (version, fsync, synchronous_commit, track_commit_timestamp): (
            String,
            String,
            String,
            String,
        ) = sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('fsync'), \
                    current_setting('synchronous_commit'), \
                    current_setting('track_commit_timestamp')",
        )
        .fetch_one(&self.pool)
        .await
        .context("cannot read the PostgreSQL server's settings")?;
        Ok(ServerSettings {
            version,
            fsync,
            synchronous_commit,
            track_commit_timestamp,
        })
    }

    /// Whether `binding` has committed any message of `topic` read without a `message-id`
    /// header (named by its position) yet.
    pub async fn any_position_committed(&self, binding: &str, topic: &str) -> anyhow::Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM processed_offsets WHERE binding_id = $1 AND topic = $2)",
        )
        .bind(binding)
        .bind(topic)
        .fetch_one(&self.pool)
        .await
        .context("cannot read processed keys")
    }

    /// How many messages of `topic` read without a `message-id` header `binding` has
    /// committed: the bits of its blocks.
    pub async fn positions_committed(&self, binding: &str, topic: &str) -> anyhow::Result<i64> {
        let masks: Vec<i64> = sqlx::query_scalar(
            "SELECT mask FROM processed_offsets WHERE binding_id = $1 AND topic = $2",
        )
        .bind(binding)
        .bind(topic)
        .fetch_all(&self.pool)
        .await
        .context("cannot read processed keys")?;
        Ok(masks.iter().map(|mask| i64::from(mask.count_ones())).sum())
    }

    /// How many of `message_ids` `binding` has committed, in either form.
    pub async fn committed_among(
        &self,
        binding: &str,
        message_ids: &[String],
    ) -> anyhow::Result<i64> {
        let (mut topics, mut partitions, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        let mut rows = Vec::new();
        for id in message_ids {
            match weir::store::position(id) {
                Some((topic, partition, offset)) => {
                    topics.push(topic);
                    partitions.push(partition);
                    offsets.push(offset);
                }
                None => rows.push(id.as_str()),
            }
        }
        let in_rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM processed_keys WHERE binding_id = $1 AND message_id = ANY($2)",
        )
        .bind(binding)
        .bind(&rows)
        .fetch_one(&self.pool)
        .await
        .context("cannot read processed keys")?;
        let in_blocks: i64 = sqlx::query_scalar(
            // One primary-key lookup per id (`OFFSET 0` keeps the planner from turning the
            // lateral lookups into a scan of all the binding's blocks and a hash join: this
            // runs every few milliseconds while Weir is measured).
            "SELECT count(*) FROM UNNEST($2::text[], $3::int[], $4::bigint[]) AS u(t, p, o) \
             CROSS JOIN LATERAL ( \
                 SELECT b.mask FROM processed_offsets b \
                 WHERE b.binding_id = $1 AND b.topic = u.t AND b.partition = u.p \
                   AND b.block = u.o / $5 \
                 OFFSET 0) b \
             WHERE b.mask & ((1::bigint) << (u.o % $5)::int) <> 0",
        )
        .bind(binding)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(weir::store::BLOCK_OFFSETS)
        .fetch_one(&self.pool)
        .await
        .context("cannot read processed keys")?;
        Ok(in_rows + in_blocks)
    }

    /// How many messages `binding` has committed whose id starts with `prefix`, among the ids
    /// kept as rows (those of messages with a `message-id` header).
    pub async fn committed(&self, binding: &str, prefix: &str) -> anyhow::Result<i64> {
        let end = prefix_end(prefix)?;
        sqlx::query_scalar(
            "SELECT count(*) FROM processed_keys \
             WHERE message_id >= $2 AND message_id < $3 AND binding_id = $1",
        )
        .bind(binding)
        .bind(prefix)
        .bind(end)
        .fetch_one(&self.pool)
        .await
        .context("cannot read processed keys")
    }

    /// The message id and commit time (microseconds since the Unix epoch, server clock) of
    /// every message of `binding` whose id starts with `prefix`.
    ///
    /// The commit time is the transaction's commit timestamp when the server tracks them
    /// (`track_commit_timestamp = on`), else `processed_at`: the store sets it to `now()`,
    /// which is the *start* of the group-commit transaction — earlier than its commit by the
    /// time the transaction took.
    pub async fn commit_times(
        &self,
        binding: &str,
        prefix: &str,
        commit_timestamps: bool,
    ) -> anyhow::Result<Vec<(String, i64)>> {
        let end = prefix_end(prefix)?;
        let query = if commit_timestamps {
            "SELECT message_id, \
                    (extract(epoch FROM coalesce(pg_xact_commit_timestamp(xmin), processed_at)) \
                     * 1000000)::bigint \
             FROM processed_keys \
             WHERE message_id >= $2 AND message_id < $3 AND binding_id = $1"
        } else {
            "SELECT message_id, (extract(epoch FROM processed_at) * 1000000)::bigint \
             FROM processed_keys \
             WHERE message_id >= $2 AND message_id < $3 AND binding_id = $1"
        };
        sqlx::query_as(query)
            .bind(binding)
            .bind(prefix)
            .bind(end)
            .fetch_all(&self.pool)
            .await
            .context("cannot read the commit times of processed keys")
    }
}

/// The least string greater than every string that starts with `prefix`, bytewise (the store's
/// processed-key columns compare so): `prefix` with its last character the next one. With it a
/// prefix is a range of the processed keys' primary key, which leads with the message id.
fn prefix_end(prefix: &str) -> anyhow::Result<String> {
    let mut chars = prefix.chars();
    let last = chars
        .next_back()
        .context("a processed-key prefix must not be empty")?;
    let next = char::from_u32(u32::from(last) + 1)
        .with_context(|| format!("no character follows the last one of the prefix {prefix:?}"))?;
    let mut end = chars.as_str().to_owned();
    end.push(next);
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_where_its_last_character_would_be_the_next_one() {
        assert_eq!(prefix_end("topic/").unwrap(), "topic0");
        assert_eq!(prefix_end("lat-").unwrap(), "lat.");
        assert_eq!(prefix_end("é").unwrap(), "ê");
        assert!(prefix_end("").is_err());
        assert!(
            prefix_end("a\u{d7ff}").is_err(),
            "no character follows U+D7FF"
        );
        // Every id with the prefix sorts below the end, bytewise.
        let end = prefix_end("t/").unwrap();
        for id in ["t/", "t/0/0", "t/\u{10ffff}"] {
            assert!(id.as_bytes() < end.as_bytes(), "{id}");
        }
        assert!("t0".as_bytes() >= end.as_bytes());
    }
}
