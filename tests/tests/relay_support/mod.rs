//! What the outbox relay's acceptance tests (`relay.rs`, `relay_outage.rs`) share: a store of
//! their own (a fresh PostgreSQL database, so that neither NOTIFY wake-ups nor pending counts
//! leak between tests, or an SQLite file), a fresh topic, outbox rows that exercise every header
//! rule, a relay running in a task, and a consumer that reads a topic back and checks each
//! record against its row.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use weir::kafka::{KafkaClientConfig, Relay, RelaySettings, RelayStats};
use weir::runtime::Header;
use weir::store::{
    BindingRecord, BreakerRecord, BreakerWrite, CommitOutcome, Completion, DlqEntry,
    DlqEntryInsert, DlqFilter, HandlerSummary, HandlerVersion, NewTenant, NewToken, OutboxInsert,
    OutboxRecord, OutboxState, Quota, Resolution, Store, StoreError, Tenant, TenantUsage,
    TokenRecord,
};
use weir_acceptance::{services, unique_name};

/// Bound on every wait for a service; generous, as the two cores are shared with the compiler.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How long a consumer that has everything keeps reading, to catch duplicates.
pub const QUIET: Duration = Duration::from_secs(5);

/// Partitions of every test topic.
pub const PARTITIONS: i32 = 3;

/// A store of the test's own.
pub struct TestStore {
    /// The store.
    pub store: Arc<dyn Store>,
    /// For PostgreSQL: the database to drop and a pool on the shared one to drop it from.
    postgres: Option<(PgPool, String)>,
    /// For SQLite: the directory holding the file.
    _dir: Option<tempfile::TempDir>,
}

impl TestStore {
    /// A fresh PostgreSQL database on the test server, migrated.
    pub async fn postgres() -> Self {
        let url = services().database_url;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect to postgresql (start it with `tests/services up`)");
        let name = unique_name("relay");
        // `unique_name` yields only [a-z0-9_], so splicing it into SQL is safe.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create a database for the test");
        let store = weir::store::connect(&database_url(&url, &name))
            .await
            .expect("connect to the test database and migrate");
        Self {
            store,
            postgres: Some((admin, name)),
            _dir: None,
        }
    }

    /// A fresh SQLite file in a temporary directory, migrated.
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("weir.db").display());
        let store = weir::store::connect(&url).await.expect("open and migrate");
        Self {
            store,
            postgres: None,
            _dir: Some(dir),
        }
    }

    /// Close the store and drop its database.
    pub async fn drop(self) {
        self.store.close().await;
        if let Some((admin, name)) = self.postgres {
            sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&admin)
            .await
            .expect("drop the test database");
        }
    }
}

/// `url` with its database name replaced by `name`.
fn database_url(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, _database) = base
        .rsplit_once('/')
        .expect("the database url names a database");
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// A new topic with [`PARTITIONS`] partitions on the test broker.
pub async fn create_topic(kafka: &str, prefix: &str) -> String {
    let topic = unique_name(prefix);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .expect("create kafka admin client");
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    let created = timeout(
        TIMEOUT,
        admin.create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &options,
        ),
    )
    .await
    .expect("create topic in time")
    .expect("create topic request");
    for result in created {
        result.expect("topic created");
    }
    topic
}

/// A valid W3C traceparent, distinct per `i`.
fn traceparent(i: usize) -> String {
    format!("00-{i:032x}-{:016x}-01", i + 1)
}

/// `n` outbox rows for `topic`, ids `<prefix>-<i>` for `i` in `from..from + n`. Keys repeat
/// (20 of them) and every tenth row has none; payloads end in bytes that are not UTF-8; every
/// row has two handler headers (one binary), every fifth also forges `message-id`,
/// `Causation-Id` and `TRACEPARENT`; even rows have a traceparent.
pub fn rows(topic: &str, prefix: &str, from: usize, n: usize) -> Vec<OutboxInsert> {
    (from..from + n)
        .map(|i| {
            let mut headers = vec![
                Header {
                    key: "content-type".into(),
                    value: b"text/plain".to_vec(),
                },
                Header {
                    key: "raw".into(),
                    value: vec![0x00, 0xff, (i % 256) as u8],
                },
            ];
            if i % 5 == 0 {
                for forged in ["message-id", "Causation-Id", "TRACEPARENT"] {
                    headers.insert(
                        1,
                        Header {
                            key: forged.into(),
                            value: b"forged".to_vec(),
                        },
                    );
                }
            }
            let mut payload = format!("payload {i}").into_bytes();
            payload.extend_from_slice(&[0x00, 0xff, 0xfe]);
            OutboxInsert {
                message_id: format!("{prefix}-{i}"),
                topic: topic.to_owned(),
                key: (i % 10 != 0).then(|| format!("key-{}", i % 20).into_bytes()),
                payload,
                headers,
                causation_id: format!("cause-{i}"),
                traceparent: (i % 2 == 0).then(|| traceparent(i)),
            }
        })
        .collect()
}

/// A relay running in a task.
pub struct RunningRelay {
    /// Its counters.
    pub stats: Arc<RelayStats>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningRelay {
    /// Start a relay over `store` publishing to the test broker `kafka`.
    pub fn start(store: &Arc<dyn Store>, kafka: &str, settings: RelaySettings) -> Self {
        let relay = Relay::new(Arc::clone(store), &KafkaClientConfig::new(kafka), settings)
            .expect("create the relay");
        let stats = relay.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self {
            stats,
            shutdown,
            task,
        }
    }

    /// Fire the shutdown token and wait for the relay to finish; how long it took.
    pub async fn stop(self) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        timeout(TIMEOUT, self.task)
            .await
            .expect("the relay stops in time")
            .expect("the relay task did not panic");
        started.elapsed()
    }
}

/// What a consumer saw of one record.
#[derive(Debug, Clone)]
pub struct Received {
    /// Partition it was read from.
    pub partition: i32,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Vec<u8>,
    /// Its headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Received {
    /// The value of the `message-id` header.
    pub fn message_id(&self) -> String {
        let value = self
            .headers
            .iter()
            .find(|(key, _)| key == "message-id")
            .map(|(_, value)| value.clone())
            .expect("every record has a message-id header");
        String::from_utf8(value).expect("message-id is text")
    }
}

/// Read `topic` from the beginning in a fresh consumer group until `expected` distinct
/// message ids arrived (failing after `within`), then for [`QUIET`] longer, so that duplicates
/// show. Returns every record read, in the order read.
pub async fn consume(kafka: &str, topic: &str, expected: usize, within: Duration) -> Vec<Received> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", unique_name("relay_check"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("create kafka consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut received = Vec::new();
    let mut distinct: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + within;
    let mut quiet_until: Option<Instant> = None;
    loop {
        let until = quiet_until.unwrap_or(deadline);
        let message = match timeout_at(until, consumer.recv()).await {
            Ok(message) => message.expect("receive a record"),
            Err(_) if quiet_until.is_some() => break,
            Err(_) => panic!(
                "received {} distinct of {expected} records ({} in all) from {topic} in {within:?}",
                distinct.len(),
                received.len()
            ),
        };
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let record = Received {
            partition: message.partition(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        };
        *distinct.entry(record.message_id()).or_default() += 1;
        received.push(record);
        if distinct.len() >= expected && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + QUIET);
        }
    }
    received
}

/// Check that the records read are exactly `rows`, each once, with key, payload and headers as
/// the relay promises.
pub fn check_exactly_once(received: &[Received], rows: &[OutboxInsert]) {
    let counts = count_by_id(received);
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "records published more than once: {duplicated:?}"
    );
    check_every_row_once(received, rows);
}

/// Check that every row arrived at least once and nothing else did, each copy with the right
/// key, payload and headers (duplicates allowed: consumers deduplicate by message id).
pub fn check_every_row_once(received: &[Received], rows: &[OutboxInsert]) {
    let by_id: HashMap<&str, &OutboxInsert> = rows
        .iter()
        .map(|row| (row.message_id.as_str(), row))
        .collect();
    for record in received {
        let id = record.message_id();
        let row = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("record {id} was never inserted"));
        check_record(record, row);
    }
    let counts = count_by_id(received);
    let missing: Vec<&str> = rows
        .iter()
        .map(|row| row.message_id.as_str())
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "rows never published: {missing:?}");
    assert_eq!(counts.len(), rows.len(), "distinct message ids");
}

/// How many records each message id had.
pub fn count_by_id(received: &[Received]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in received {
        *counts.entry(record.message_id()).or_default() += 1;
    }
    counts
}

/// One record against its row: key and payload as stored; headers `message-id`,
/// `causation-id`, `traceparent` (when the row has one) first, then the handler's own in order
/// without the forged ones.
fn check_record(record: &Received, row: &OutboxInsert) {
    let id = &row.message_id;
    assert_eq!(record.key, row.key, "{id}: key");
    assert_eq!(record.payload, row.payload, "{id}: payload");
    let mut expected: Vec<(String, Vec<u8>)> = vec![
        ("message-id".into(), row.message_id.clone().into_bytes()),
        ("causation-id".into(), row.causation_id.clone().into_bytes()),
    ];
    if let Some(traceparent) = &row.traceparent {
        expected.push(("traceparent".into(), traceparent.clone().into_bytes()));
    }
    expected.extend(
        row.headers
            .iter()
            .filter(|h| {
                !["message-id", "causation-id", "traceparent"]
                    .iter()
                    .any(|weir| h.key.eq_ignore_ascii_case(weir))
            })
            .map(|h| (h.key.clone(), h.value.clone())),
    );
    assert_eq!(record.headers, expected, "{id}: headers");
}

/// Every row is marked sent, and nothing is pending.
pub async fn check_all_sent(store: &dyn Store, rows: &[OutboxInsert]) {
    wait_for("no pending outbox rows", TIMEOUT, || async {
        store.outbox_pending().await.expect("count pending rows") == 0
    })
    .await;
    for row in rows {
        let status = store
            .outbox_status(&row.message_id)
            .await
            .expect("read outbox row")
            .expect("the row exists");
        assert_eq!(status.state, OutboxState::Sent, "{}", row.message_id);
        assert!(status.sent_at.is_some(), "{}", row.message_id);
    }
}

/// Poll `condition` every 100 ms until it holds; panic naming `what` after `within`.
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A store that can be made unavailable: while [`FlakyStore::set_down`] is on, the calls the
/// relay makes (claim, mark sent, mark failed, listen) fail as an unreachable database would;
/// everything else, and everything while it is up, goes to the wrapped store.
pub struct FlakyStore {
    inner: Arc<dyn Store>,
    down: AtomicBool,
}

impl FlakyStore {
    /// Wrap `inner`, up.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
        }
    }

    /// Make the relay's calls fail (`true`) or work again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self, operation: &'static str) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            let refused =
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "test: store down");
            return Err(StoreError::Unavailable {
                operation,
                source: sqlx::Error::Io(refused),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }

    async fn close(&self) {
        self.inner.close().await
    }

    async fn put_handler_version(
        &self,
        tenant: &str,
        handler: &str,
        component: &[u8],
        quota: &Quota,
    ) -> Result<HandlerVersion, StoreError> {
        self.inner
            .put_handler_version(tenant, handler, component, quota)
            .await
    }

    async fn list_handlers(&self, tenant: &str) -> Result<Vec<HandlerSummary>, StoreError> {
        self.inner.list_handlers(tenant).await
    }

    async fn delete_handler(&self, tenant: &str, handler: &str) -> Result<bool, StoreError> {
        self.inner.delete_handler(tenant, handler).await
    }

    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError> {
        self.inner.tenant_usage(tenant).await
    }

    async fn handler_version(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<Option<HandlerVersion>, StoreError> {
        self.inner.handler_version(tenant, handler, version).await
    }

    async fn component_bytes(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.component_bytes(tenant, handler, version).await
    }

    async fn activate(
        &self,
        tenant: &str,
        handler: &str,
        version: i32,
    ) -> Result<HandlerVersion, StoreError> {
        self.inner.activate(tenant, handler, version).await
    }

    async fn active_version(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Option<HandlerVersion>, StoreError> {
        self.inner.active_version(tenant, handler).await
    }

    async fn list_handler_versions(
        &self,
        tenant: &str,
        handler: &str,
    ) -> Result<Vec<HandlerVersion>, StoreError> {
        self.inner.list_handler_versions(tenant, handler).await
    }

    async fn create_tenant(&self, tenant: &NewTenant) -> Result<Tenant, StoreError> {
        self.inner.create_tenant(tenant).await
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        self.inner.tenant(id).await
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.inner.list_tenants().await
    }

    async fn set_tenant_rate_limit(
        &self,
        tenant: &str,
        limit: Option<weir::store::RateLimit>,
    ) -> Result<Tenant, StoreError> {
        self.inner.set_tenant_rate_limit(tenant, limit).await
    }

    async fn delete_tenant(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.delete_tenant(id).await
    }

    async fn create_token(&self, token: &NewToken) -> Result<TokenRecord, StoreError> {
        self.inner.create_token(token).await
    }

    async fn list_tokens(&self, tenant: &str) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.list_tokens(tenant).await
    }

    async fn revoke_token(&self, tenant: &str, id: &str) -> Result<TokenRecord, StoreError> {
        self.inner.revoke_token(tenant, id).await
    }

    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.token_by_hash(sha256).await
    }

    async fn put_binding(
        &self,
        id: &str,
        tenant: &str,
        handler: &str,
        spec: &serde_json::Value,
    ) -> Result<BindingRecord, StoreError> {
        self.inner.put_binding(id, tenant, handler, spec).await
    }

    async fn delete_binding(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.delete_binding(id).await
    }

    async fn binding(&self, id: &str) -> Result<Option<BindingRecord>, StoreError> {
        self.inner.binding(id).await
    }

    async fn list_bindings(&self) -> Result<Vec<BindingRecord>, StoreError> {
        self.inner.list_bindings().await
    }

    async fn breaker_get(&self, binding_id: &str) -> Result<Option<BreakerRecord>, StoreError> {
        self.inner.breaker_get(binding_id).await
    }

    async fn breaker_set(
        &self,
        binding_id: &str,
        write: BreakerWrite,
    ) -> Result<BreakerRecord, StoreError> {
        self.inner.breaker_set(binding_id, write).await
    }

    async fn bindings_revision(&self) -> Result<i64, StoreError> {
        self.inner.bindings_revision().await
    }

    async fn state_get(
        &self,
        tenant: &str,
        handler: &str,
        key: &[u8],
        name: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.state_get(tenant, handler, key, name).await
    }

    async fn state_list(
        &self,
        tenant: &str,
        handler: &str,
        key: &[u8],
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.state_list(tenant, handler, key).await
    }

    async fn commit(&self, batch: &[Completion]) -> Result<Vec<CommitOutcome>, StoreError> {
        self.inner.commit(batch).await
    }

    async fn outbox_insert(
        &self,
        tenant: &str,
        binding_id: Option<&str>,
        rows: &[OutboxInsert],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        self.inner.outbox_insert(tenant, binding_id, rows).await
    }

    async fn outbox_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        self.check("outbox_claim")?;
        self.inner.outbox_claim(limit, lease).await
    }

    async fn outbox_mark_sent(&self, ids: &[i64]) -> Result<u64, StoreError> {
        self.check("outbox_mark_sent")?;
        self.inner.outbox_mark_sent(ids).await
    }

    async fn outbox_mark_error(&self, id: i64, error: &str) -> Result<bool, StoreError> {
        self.check("outbox_mark_error")?;
        self.inner.outbox_mark_error(id, error).await
    }

    async fn outbox_status(&self, message_id: &str) -> Result<Option<OutboxRecord>, StoreError> {
        self.inner.outbox_status(message_id).await
    }

    async fn outbox_pending(&self) -> Result<i64, StoreError> {
        self.inner.outbox_pending().await
    }

    async fn outbox_notifications(&self) -> Result<Option<mpsc::Receiver<()>>, StoreError> {
        self.check("outbox_notifications")?;
        self.inner.outbox_notifications().await
    }

    async fn dlq_insert(&self, entry: &DlqEntryInsert) -> Result<i64, StoreError> {
        self.inner.dlq_insert(entry).await
    }

    async fn dlq_replay(&self, tenant: &str, id: i64) -> Result<DlqEntry, StoreError> {
        self.inner.dlq_replay(tenant, id).await
    }

    async fn dlq_claim_replays(
        &self,
        binding_id: &str,
        scope: weir::store::ReplayScope<'_>,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<DlqEntry>, StoreError> {
        self.inner
            .dlq_claim_replays(binding_id, scope, limit, lease)
            .await
    }

    async fn dlq_get(&self, tenant: &str, id: i64) -> Result<Option<DlqEntry>, StoreError> {
        self.inner.dlq_get(tenant, id).await
    }

    async fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError> {
        self.inner.dlq_list(filter).await
    }

    async fn dlq_pending_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.inner.dlq_pending_counts().await
    }

    async fn dlq_resolve(
        &self,
        tenant: &str,
        id: i64,
        resolution: Resolution,
        note: Option<&str>,
    ) -> Result<DlqEntry, StoreError> {
        self.inner.dlq_resolve(tenant, id, resolution, note).await
    }

    async fn sweep_processed_keys(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
        self.inner.sweep_processed_keys(older_than).await
    }
}
