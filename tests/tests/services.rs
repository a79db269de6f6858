//! Proves the real services the acceptance tests run against (`tests/services up`): a Kafka
//! broker that keeps keyed messages with headers in order per partition, delivers each once to a
//! consumer group and remembers its committed offsets; and a PostgreSQL server with the
//! transaction, upsert and type behaviour Weir's store relies on.
//!
//! Without the services these tests fail; they never skip.

#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::Offset;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::time::{Instant, timeout, timeout_at};
use weir_acceptance::{services, unique_name};

/// Messages the Kafka test produces.
const MESSAGES: usize = 200;
/// Partitions of the Kafka test's topic.
const PARTITIONS: i32 = 3;
/// Distinct keys, so that several messages share a key (and so a partition).
const KEYS: usize = 20;
/// Bound on every wait for a service; generous, as the two cores are shared with the compiler.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a consumer must receive nothing to count as having nothing to receive.
const QUIET: Duration = Duration::from_secs(5);

fn key(i: usize) -> String {
    format!("key-{:02}", i % KEYS)
}

/// Text, then bytes that are not UTF-8, so a lossy conversion anywhere would show.
fn payload(i: usize) -> Vec<u8> {
    let mut payload = format!("message {i}").into_bytes();
    payload.extend_from_slice(&[0x00, 0xff, 0xfe]);
    payload.extend_from_slice(&u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes());
    payload
}

fn trace(i: usize) -> Vec<u8> {
    [0xde, 0xad].into_iter().chain(i.to_le_bytes()).collect()
}

fn consumer(kafka: &str, group: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create()
        .expect("create kafka consumer")
}

/// What a consumer saw of one message.
#[derive(Debug)]
struct Received {
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_delivers_keyed_messages_with_headers_once_per_group() {
    let kafka = services().kafka;
    let topic = unique_name("services");
    let group = unique_name("services_group");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
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

    // Produce: all messages are enqueued in order before any delivery is awaited, so the
    // idempotent producer's per-partition ordering is what keeps each key's messages in order.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("create kafka producer");
    let mut deliveries = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let (key, payload, index, trace) = (key(i), payload(i), i.to_string(), trace(i));
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "index",
                value: Some(&index),
            })
            .insert(Header {
                key: "trace",
                value: Some(&trace),
            })
            .insert(Header {
                key: "empty",
                value: None::<&[u8]>,
            });
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        let delivery = producer
            .send_result(record)
            .map_err(|(error, _)| error)
            .expect("enqueue message");
        deliveries.push(delivery);
    }
    let mut produced = Vec::with_capacity(MESSAGES);
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let delivery = timeout(TIMEOUT, delivery)
            .await
            .expect("delivery report in time")
            .expect("delivery report not cancelled")
            .map_err(|(error, _)| error)
            .unwrap_or_else(|error| panic!("message {i} not delivered: {error}"));
        produced.push((delivery.partition, delivery.offset));
    }
    let used: BTreeSet<i32> = produced.iter().map(|(partition, _)| *partition).collect();
    assert_eq!(
        used.len(),
        usize::try_from(PARTITIONS).expect("partition count"),
        "{KEYS} keys should spread over all partitions: {used:?}"
    );

    // Consume in a fresh group, storing each message's offset once it is handled.
    let first = consumer(&kafka, &group);
    first.subscribe(&[&topic]).expect("subscribe");
    let mut received: BTreeMap<usize, Received> = BTreeMap::new();
    let mut last_offsets: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + TIMEOUT;
    while received.len() < MESSAGES {
        let message = timeout_at(deadline, first.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "received {} of {MESSAGES} messages in {TIMEOUT:?}",
                    received.len()
                )
            })
            .expect("receive message");
        let headers: Vec<(String, Option<Vec<u8>>)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let index: usize = headers
            .iter()
            .find(|(name, _)| name == "index")
            .and_then(|(_, value)| value.as_deref())
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|value| value.parse().ok())
            .expect("message has an index header");
        if let Some(previous) = last_offsets.insert(message.partition(), message.offset()) {
            assert!(
                message.offset() > previous,
                "partition {} went from offset {previous} to {}",
                message.partition(),
                message.offset()
            );
        }
        let seen = Received {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec).unwrap_or_default(),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        };
        // Stores the *next* offset (message offset + 1). Beware: rdkafka's
        // `store_offset(topic, partition, offset)` also adds 1 itself (librdkafka's legacy
        // `rd_kafka_offset_store`), so it takes the message's own offset; only `store_offsets`
        // with a partition list stores offsets as given.
        first
            .store_offset_from_message(&message)
            .expect("store offset");
        if let Some(earlier) = received.insert(index, seen) {
            panic!("message {index} delivered twice, first as {earlier:?}");
        }
    }

    for (i, seen) in &received {
        let i = *i;
        assert_eq!(
            (seen.partition, seen.offset),
            produced[i],
            "message {i} is where its delivery report put it"
        );
        assert_eq!(seen.key, key(i).into_bytes(), "key of message {i}");
        assert_eq!(seen.payload, payload(i), "payload of message {i}");
        let expected_headers = vec![
            ("index".to_owned(), Some(i.to_string().into_bytes())),
            ("trace".to_owned(), Some(trace(i))),
            ("empty".to_owned(), None),
        ];
        assert_eq!(seen.headers, expected_headers, "headers of message {i}");
    }
    // Same key, same partition, in production order.
    let mut by_key: HashMap<Vec<u8>, (i32, i64)> = HashMap::new();
    for seen in received.values() {
        if let Some((partition, offset)) =
            by_key.insert(seen.key.clone(), (seen.partition, seen.offset))
        {
            assert_eq!(partition, seen.partition, "one key, one partition");
            assert!(offset < seen.offset, "a key's messages stay in order");
        }
    }

    // The log holds exactly the produced messages, and the group's commit covers all of them.
    // Synchronous librdkafka calls block, so they leave the async worker thread first.
    let high_watermarks: Vec<i64> = tokio::task::block_in_place(|| {
        first
            .commit_consumer_state(CommitMode::Sync)
            .expect("commit stored offsets");
        (0..PARTITIONS)
            .map(|partition| {
                let (low, high) = first
                    .fetch_watermarks(&topic, partition, TIMEOUT)
                    .expect("fetch watermarks");
                assert_eq!(low, 0, "nothing deleted from partition {partition}");
                high
            })
            .collect()
    });
    let total: i64 = high_watermarks.iter().sum();
    assert_eq!(total, i64::try_from(MESSAGES).expect("message count"));
    // The list is dropped at once: its elements can hold references into the consumer
    // (librdkafka toppars), and a list that outlives its consumer makes dropping the consumer
    // hang in `rd_kafka_destroy`.
    let committed: Vec<Option<Offset>> = {
        let list = tokio::task::block_in_place(|| first.committed(TIMEOUT)).expect("committed");
        (0..PARTITIONS)
            .map(|partition| list.find_partition(&topic, partition).map(|e| e.offset()))
            .collect()
    };
    for ((partition, offset), high) in (0..PARTITIONS).zip(committed).zip(&high_watermarks) {
        assert_eq!(
            offset,
            Some(Offset::Offset(*high)),
            "committed offset of partition {partition}"
        );
    }
    // Dropping a consumer leaves the group (so the next member is assigned every partition at
    // once) and waits for librdkafka to close it: blocking, so off the async worker thread.
    tokio::task::block_in_place(|| drop(first));

    // A new member of the same group starts from the commits: nothing left to receive.
    let second = consumer(&kafka, &group);
    second.subscribe(&[&topic]).expect("subscribe");
    let deadline = Instant::now() + TIMEOUT;
    let mut quiet_since: Option<Instant> = None;
    loop {
        match timeout(Duration::from_millis(500), second.recv()).await {
            Ok(Ok(message)) => panic!(
                "second consumer of the group received partition {} offset {}",
                message.partition(),
                message.offset()
            ),
            Ok(Err(error)) => panic!("second consumer: {error}"),
            Err(_elapsed) => {}
        }
        let assigned = second.assignment().expect("assignment").count();
        match quiet_since {
            None if assigned == usize::try_from(PARTITIONS).expect("partition count") => {
                quiet_since = Some(Instant::now());
            }
            None => assert!(
                Instant::now() < deadline,
                "second consumer not assigned the topic's partitions within {TIMEOUT:?}"
            ),
            Some(since) if since.elapsed() >= QUIET => break,
            Some(_) => {}
        }
    }
    tokio::task::block_in_place(|| drop(second));

    let deleted = timeout(TIMEOUT, admin.delete_topics(&[&topic], &options))
        .await
        .expect("delete topic in time")
        .expect("delete topic request");
    for result in deleted {
        result.expect("topic deleted");
    }
}

/// Rows of `table` with key `id`, seen through the pool (not through any open transaction).
async fn count(pool: &PgPool, table: &str, id: i64) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE id = $1");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("count rows")
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_commits_rolls_back_skips_conflicts_and_round_trips_bytea_and_jsonb() {
    let database_url = services().database_url;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(TIMEOUT)
        .connect(&database_url)
        .await
        .expect("connect to postgresql");
    let table = unique_name("services");
    // `unique_name` yields only [a-z0-9_], so splicing it into SQL is safe.
    let sql = |text: &str| AssertSqlSafe(text.replace("{table}", &table));

    sqlx::query(sql(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, body bytea NOT NULL, doc jsonb NOT NULL)",
    ))
    .execute(&pool)
    .await
    .expect("create table");
    let body: Vec<u8> = (0..=255).collect();
    let doc = serde_json::json!({
        "order": "A-17",
        "lines": [{"sku": "tea", "qty": 2}, {"sku": "cup", "qty": 1}],
        "note": "naïve café ✓",
        "paid": true,
        "discount": null,
    });
    let insert = "INSERT INTO {table} (id, body, doc) VALUES ($1, $2, $3::jsonb)";

    // Committed rows are visible to other connections, and only after the commit.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(sql(insert))
        .bind(1_i64)
        .bind(&body)
        .bind(doc.to_string())
        .execute(&mut *tx)
        .await
        .expect("insert in transaction");
    assert_eq!(
        count(&pool, &table, 1).await,
        0,
        "uncommitted row visible to another connection"
    );
    tx.commit().await.expect("commit");
    assert_eq!(
        count(&pool, &table, 1).await,
        1,
        "committed row not visible"
    );

    // Rolled-back rows are gone.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(sql(insert))
        .bind(2_i64)
        .bind(&body)
        .bind(doc.to_string())
        .execute(&mut *tx)
        .await
        .expect("insert in transaction");
    tx.rollback().await.expect("rollback");
    assert_eq!(count(&pool, &table, 2).await, 0, "rolled-back row visible");

    // A duplicate key is skipped, and says so: 0 rows.
    let upsert = "INSERT INTO {table} (id, body, doc) VALUES ($1, $2, $3::jsonb) \
                  ON CONFLICT (id) DO NOTHING";
    let duplicate = sqlx::query(sql(upsert))
        .bind(1_i64)
        .bind(b"other".as_slice())
        .bind("{}")
        .execute(&pool)
        .await
        .expect("insert duplicate");
    assert_eq!(duplicate.rows_affected(), 0, "duplicate key inserted");
    let fresh = sqlx::query(sql(upsert))
        .bind(3_i64)
        .bind(b"new".as_slice())
        .bind("{}")
        .execute(&pool)
        .await
        .expect("insert new key");
    assert_eq!(fresh.rows_affected(), 1, "new key not inserted");

    // bytea and jsonb come back as they went in (the duplicate changed nothing).
    let (read_body, read_doc, order): (Vec<u8>, String, String) = sqlx::query_as(sql(
        "SELECT body, doc::text, doc->>'order' FROM {table} WHERE id = 1",
    ))
    .fetch_one(&pool)
    .await
    .expect("read row");
    assert_eq!(read_body, body);
    let read_doc: serde_json::Value = serde_json::from_str(&read_doc).expect("jsonb as json");
    assert_eq!(read_doc, doc);
    assert_eq!(order, "A-17");

    sqlx::query(sql("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop table");
    pool.close().await;
}
