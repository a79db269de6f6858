//! The first end-to-end path against the real broker and database: messages in Kafka → the
//! `orders` handler → effects committed exactly once in PostgreSQL → offsets committed.
//! Poison messages reach the DLQ (store and outbox for the DLQ topic) on their first failure,
//! with full metadata, while every other message flows.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Row;
use weir::pipeline::worker::{Worker, WorkerSettings, WorkerStats, emitted_id};
use weir::pipeline::{BindingSpec, HandlerSlot, PauseSwitch};
use weir::runtime::{HandlerPool, Runtime, RuntimeConfig};
use weir::store::{DlqErrorKind, DlqFilter, Store};
use weir_acceptance::{component, create_topic, services, unique_name};

const MESSAGES: usize = 1_000;
const KEYS: usize = 40;
const POISON: usize = 10;

/// A worker for `binding_id` on the test broker, with default settings.
fn new_worker(
    binding_id: &str,
    spec: BindingSpec,
    handler: Arc<HandlerPool>,
    store: &Arc<dyn Store>,
    kafka: &str,
    stats: &Arc<WorkerStats>,
) -> Worker {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka);
    Worker {
        binding_id: binding_id.to_owned(),
        spec,
        handler: HandlerSlot::new(handler, Some(1)),
        store: store.clone(),
        kafka: config,
        settings: WorkerSettings::default(),
        stats: stats.clone(),
        pause: PauseSwitch::default(),
        metrics: None,
        rate_limit: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_to_effects_exactly_once_and_poison_is_dead_lettered() {
    let services = services();
    let input = unique_name("flow_in");
    let output = format!("{input}.accepted");
    create_topic(&services.kafka, &input, 6).await;

    // Produce: MESSAGES orders over KEYS customers, plus POISON malformed ones.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut expected: HashMap<String, u64> = HashMap::new();
    let mut sends = Vec::new();
    for i in 0..MESSAGES + POISON {
        let customer = format!("c-{}", i % KEYS);
        let payload = if i < MESSAGES {
            *expected.entry(customer.clone()).or_default() += 1;
            format!(
                r#"{{"order_id":"o-{i}","customer":"{customer}","amount_cents":{}}}"#,
                100 + i
            )
        } else {
            "this is not json".to_owned()
        };
        let id = format!("msg-{i}");
        let record = FutureRecord::to(&input)
            .key(&customer)
            .payload(&payload)
            .headers(OwnedHeaders::new().insert(KafkaHeader {
                key: "message-id",
                value: Some(&id),
            }));
        sends.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for send in sends {
        send.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    let store = weir::store::connect(&services.database_url).await.unwrap();
    let runtime = Runtime::new(RuntimeConfig {
        pool_instances: 64,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(component("weir_handler_orders")).unwrap();
    let handler = Arc::new(HandlerPool::new(runtime.load(&bytes).unwrap(), 64));
    let tenant = unique_name("t");
    let binding_id = format!("{tenant}.orders");
    let mut spec = BindingSpec::new(&tenant, "orders", vec![input.clone()]);
    spec.output_topics = vec![output.clone()];
    spec.config.insert("output-topic".into(), output.clone());
    spec.validate().unwrap();

    let stats = Arc::new(WorkerStats::default());
    let worker = new_worker(
        &binding_id,
        spec.clone(),
        handler,
        &store,
        &services.kafka,
        &stats,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let running = tokio::spawn(worker.run(stopped));

    let deadline = Instant::now() + Duration::from_secs(180);
    while (stats.committed.load(Ordering::Relaxed) as usize) < MESSAGES
        || (stats.dead_lettered.load(Ordering::Relaxed) as usize) < POISON
    {
        assert!(Instant::now() < deadline, "timed out: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    eprintln!("{MESSAGES} messages + {POISON} poison in {took:?}: {stats:?}");
    assert_eq!(stats.committed.load(Ordering::Relaxed) as usize, MESSAGES);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.retried.load(Ordering::Relaxed),
        0,
        "poison is permanent: no retries"
    );

    // Every keyed counter is exact.
    for (customer, count) in &expected {
        let value = store
            .state_get(&tenant, "orders", customer.as_bytes(), "orders")
            .await
            .unwrap();
        let value: u64 = serde_json::from_slice(&value.expect("counter")).unwrap();
        assert_eq!(value, *count, "counter of {customer}");
    }

    // One outbox record per message, with a stable, unique id.
    let pool = sqlx::PgPool::connect(&services.database_url).await.unwrap();
    let row = sqlx::query(
        "SELECT count(*) AS n, count(DISTINCT message_id) AS ids FROM outbox WHERE binding_id = $1 AND topic = $2",
    )
    .bind(&binding_id)
    .bind(&output)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("n") as usize, MESSAGES);
    assert_eq!(row.get::<i64, _>("ids") as usize, MESSAGES);
    let first = store
        .outbox_status(&emitted_id(&binding_id, "msg-0", 0))
        .await
        .unwrap()
        .expect("outbox row");
    assert_eq!(first.causation_id, "msg-0");

    // Poison: in the DLQ with its metadata, and queued for the DLQ topic with weir-dlq-* headers.
    let filter = DlqFilter {
        tenant: Some(tenant.clone()),
        limit: 100,
        ..DlqFilter::default()
    };
    let entries = store.dlq_list(&filter).await.unwrap();
    assert_eq!(entries.len(), POISON);
    for entry in &entries {
        let e = &entry.entry;
        assert_eq!(e.error_kind, DlqErrorKind::Permanent);
        assert_eq!(e.attempts, 1);
        assert_eq!(e.topic, input);
        assert_eq!(e.payload, b"this is not json");
        assert!(e.key.is_some());
        assert!(e.headers.iter().any(|h| h.key == "message-id"));
        assert_eq!(e.handler_version, Some(1));
    }
    let dlq = sqlx::query("SELECT headers FROM outbox WHERE binding_id = $1 AND topic = $2")
        .bind(&binding_id)
        .bind(spec.dlq_topic())
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(dlq.len(), POISON);

    // Offsets were committed: a new worker in the same group receives nothing.
    let stats2 = Arc::new(WorkerStats::default());
    let bytes = std::fs::read(component("weir_handler_orders")).unwrap();
    let worker = new_worker(
        &binding_id,
        spec,
        Arc::new(HandlerPool::new(runtime.load(&bytes).unwrap(), 4)),
        &store,
        &services.kafka,
        &stats2,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(worker.run(stopped));
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(
        stats2.consumed.load(Ordering::Relaxed),
        0,
        "offsets were not committed: {stats2:?}"
    );
}

/// A handler that fails retryably twice then succeeds is processed once, after delays within the
/// policy's bounds; meanwhile a later message of another key on the same partition completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_key_waits_while_other_keys_of_its_partition_flow_on() {
    let services = services();
    let input = unique_name("retry_in");
    let output = format!("{input}.out");
    create_topic(&services.kafka, &input, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .create()
        .unwrap();
    // Offset 0: key a fails twice. Offset 1: key b succeeds at once. Offset 2: key a again.
    for (id, key, payload) in [
        ("a-1", "a", r#"{"fail_until_attempt": 3}"#),
        ("b-1", "b", "{}"),
        ("a-2", "a", "{}"),
    ] {
        let record =
            FutureRecord::to(&input)
                .key(key)
                .payload(payload)
                .headers(OwnedHeaders::new().insert(KafkaHeader {
                    key: "message-id",
                    value: Some(id),
                }));
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let store = weir::store::connect(&services.database_url).await.unwrap();
    let runtime = Runtime::new(RuntimeConfig {
        pool_instances: 8,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(component("weir_handler_flaky")).unwrap();
    let tenant = unique_name("t");
    let binding_id = format!("{tenant}.flaky");
    let mut spec = BindingSpec::new(&tenant, "flaky", vec![input.clone()]);
    spec.output_topics = vec![output.clone()];
    spec.config.insert("output-topic".into(), output.clone());
    spec.retry.backoff = vec![Duration::from_millis(400), Duration::from_millis(800)];
    spec.retry.jitter = 0.2;
    spec.validate().unwrap();
    let stats = Arc::new(WorkerStats::default());
    let worker = new_worker(
        &binding_id,
        spec,
        Arc::new(HandlerPool::new(runtime.load(&bytes).unwrap(), 8)),
        &store,
        &services.kafka,
        &stats,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(worker.run(stopped));
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.committed.load(Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "timed out: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(stats.retried.load(Ordering::Relaxed), 2, "{stats:?}");
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);

    let row = |id: &'static str| {
        let store = store.clone();
        let binding_id = binding_id.clone();
        async move {
            store
                .outbox_status(&emitted_id(&binding_id, id, 0))
                .await
                .unwrap()
                .expect(id)
        }
    };
    let (a1, b1, a2) = (row("a-1").await, row("b-1").await, row("a-2").await);
    let attempt = |r: &weir::store::OutboxRecord| -> u64 {
        serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["attempt"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((attempt(&a1), attempt(&b1), attempt(&a2)), (3, 1, 1));
    // b (later offset, other key) did not wait for a's retries; a-2 waited for a-1.
    assert!(
        b1.created_at < a1.created_at,
        "b waited for a: {:?} vs {:?}",
        b1.created_at,
        a1.created_at
    );
    assert!(a1.created_at < a2.created_at, "a-2 overtook a-1");
    // The retries waited 400 ms and 800 ms ± 20 %, at least 960 ms after a-1's first failure;
    // b-1 committed a commit linger or so after that failure, hence 100 ms of slack.
    let waited = (a1.created_at - b1.created_at).to_std().unwrap();
    eprintln!("a-1 committed {waited:?} after b-1 (policy: 400 ms + 800 ms, ±20 %)");
    assert!(
        waited >= Duration::from_millis(860),
        "retried too early: {waited:?}"
    );
    assert!(
        waited <= Duration::from_millis(1440 + 1500),
        "retried too late: {waited:?}"
    );
    // Processed once: the keyed counter of a is 2 (a-1 once, a-2 once).
    let handled = store
        .state_get(&tenant, "flaky", b"a", "handled")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(handled, b"2");
}

/// Produce `count` orders to `topic` with ids `{prefix}-{i}` over 5 customers.
async fn produce_orders(kafka: &str, topic: &str, prefix: &str, count: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let payload = format!(
            r#"{{"order_id":"{id}","customer":"c-{}","amount_cents":100}}"#,
            i % 5
        );
        let customer = format!("c-{}", i % 5);
        let record = FutureRecord::to(topic)
            .key(&customer)
            .payload(&payload)
            .headers(OwnedHeaders::new().insert(KafkaHeader {
                key: "message-id",
                value: Some(&id),
            }));
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

async fn wait_until(what: &str, stats: &WorkerStats, done: impl Fn(&WorkerStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done(stats) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_fetches_nothing_until_resumed() {
    let services = services();
    let input = unique_name("pause_in");
    let output = format!("{input}.accepted");
    create_topic(&services.kafka, &input, 3).await;
    produce_orders(&services.kafka, &input, "first", 30).await;

    let store = weir::store::connect(&services.database_url).await.unwrap();
    let runtime = Runtime::new(RuntimeConfig {
        pool_instances: 8,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(component("weir_handler_orders")).unwrap();
    let tenant = unique_name("t");
    let mut spec = BindingSpec::new(&tenant, "orders", vec![input.clone()]);
    spec.output_topics = vec![output.clone()];
    spec.config.insert("output-topic".into(), output);
    spec.validate().unwrap();
    let stats = Arc::new(WorkerStats::default());
    let mut worker = new_worker(
        &format!("{tenant}.orders"),
        spec,
        Arc::new(HandlerPool::new(runtime.load(&bytes).unwrap(), 8)),
        &store,
        &services.kafka,
        &stats,
    );
    let switch = worker.pause.clone();
    switch.pause();
    worker.pause = switch.clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(worker.run(stopped));

    // Paused from the start: assigned, but nothing fetched.
    wait_until("the assignment", &stats, |s| {
        s.assignments.load(Ordering::Relaxed) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stats.consumed.load(Ordering::Relaxed), 0, "{stats:?}");

    switch.resume();
    wait_until("the first 30", &stats, |s| {
        s.committed.load(Ordering::Relaxed) == 30
    })
    .await;

    // Paused again: new messages wait in Kafka.
    switch.pause();
    tokio::time::sleep(Duration::from_secs(1)).await;
    produce_orders(&services.kafka, &input, "second", 30).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stats.consumed.load(Ordering::Relaxed), 30, "{stats:?}");

    switch.resume();
    wait_until("all 60", &stats, |s| {
        s.committed.load(Ordering::Relaxed) == 60
    })
    .await;
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(stats.consumed.load(Ordering::Relaxed), 60, "{stats:?}");
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0, "{stats:?}");
    assert_eq!(stats.assignments.load(Ordering::Relaxed), 1, "{stats:?}");
}
