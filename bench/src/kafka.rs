//! Kafka for the benchmark: the run's topics, the producers that fill them, and the raw drain.
//!
//! Owns topic creation and deletion (unique names, created per run, deleted at the end), the
//! fill (`--messages` records over `--keys` keys with an idempotent producer, every delivery
//! confirmed), and the **raw** phase: a bare librdkafka `BaseConsumer` in a fresh group
//! draining the topic from the earliest offset, touching nothing but the payload's length —
//! the most this machine can consume, what Weir is compared with. Producing with headers at a
//! fixed rate is the latency phase's business (`latency.rs`); this module lends it a producer.
//!
//! Knows nothing of PostgreSQL or of Weir beyond the id Weir gives a message without a
//! `message-id` header ([`weir::pipeline::worker::message_id`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{
    BaseConsumer, Consumer as _, ConsumerContext, DefaultConsumerContext, Rebalance,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use weir_acceptance::unique_name;

use crate::Plan;
use crate::cpu::Mark;
use crate::report::PhaseFigures;

/// A phase that makes no progress for this long has failed.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a topic to be created or deleted.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the producer's queue to empty at the end of a fill.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the broker's answer about a partition's offsets.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the producing loop serves delivery reports: every this many messages.
const POLL_EVERY: u64 = 1024;

/// Creates and deletes the run's topics.
pub struct Admin {
    client: AdminClient<DefaultClientContext>,
}

impl Admin {
    /// An admin client of the broker at `bootstrap`.
    pub fn new(bootstrap: &str) -> anyhow::Result<Self> {
        let client = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .with_context(|| format!("cannot create a Kafka admin client for {bootstrap}"))?;
        Ok(Self { client })
    }

    fn options() -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT))
    }

    /// Create `topic` with `partitions` partitions (replication factor 1).
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let created = tokio::time::timeout(
            ADMIN_TIMEOUT + Duration::from_secs(5),
            self.client.create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &Self::options(),
            ),
        )
        .await
        .map_err(|_| {
            anyhow!("creating topic {topic}: no answer from the broker in {ADMIN_TIMEOUT:?}")
        })?
        .with_context(|| format!("cannot create topic {topic}"))?;
        for result in created {
            result.map_err(|(name, code)| anyhow!("cannot create topic {name}: {code}"))?;
        }
        Ok(())
    }

    /// Delete `topics`.
    pub async fn delete_topics(&self, topics: &[String]) -> anyhow::Result<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let deleted = tokio::time::timeout(
            ADMIN_TIMEOUT + Duration::from_secs(5),
            self.client.delete_topics(&names, &Self::options()),
        )
        .await
        .map_err(|_| anyhow!("deleting topics: no answer from the broker in {ADMIN_TIMEOUT:?}"))?
        .context("cannot delete the run's topics")?;
        for result in deleted {
            result.map_err(|(name, code)| anyhow!("cannot delete topic {name}: {code}"))?;
        }
        Ok(())
    }
}

/// Counts delivery reports, so that a fill knows every message reached the broker.
#[derive(Default)]
pub struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self
                    .first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

impl Deliveries {
    /// An error unless exactly `expected` messages were delivered and none failed.
    pub fn check(&self, expected: u64, what: &str) -> anyhow::Result<()> {
        let delivered = self.delivered.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        if failed > 0 || delivered != expected {
            let first = self
                .first_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| "no error reported".to_owned());
            bail!(
                "{what}: {delivered} of {expected} messages delivered, {failed} failed \
                 (first error: {first})"
            );
        }
        Ok(())
    }
}

/// An idempotent producer (acks=all) with `overrides`, counting its deliveries.
pub fn producer(
    bootstrap: &str,
    overrides: &[(&str, &str)],
) -> anyhow::Result<BaseProducer<Deliveries>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true");
    for (name, value) in overrides {
        config.set(*name, *value);
    }
    config
        .create_with_context(Deliveries::default())
        .with_context(|| format!("cannot create a Kafka producer for {bootstrap}"))
}

/// Enqueue `record`, waiting while the producer's queue is full.
pub fn send<K, P>(
    producer: &BaseProducer<Deliveries>,
    mut record: BaseRecord<'_, K, P>,
) -> anyhow::Result<()>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(10));
            }
            Err((error, back)) => bail!("cannot produce to {}: {error}", back.topic),
        }
    }
}

/// Wait until every enqueued message is delivered or failed.
pub fn flush(producer: &BaseProducer<Deliveries>, what: &str) -> anyhow::Result<()> {
    producer.flush(FLUSH_TIMEOUT).with_context(|| {
        format!("{what}: the producer did not deliver everything in {FLUSH_TIMEOUT:?}")
    })
}

/// A payload of `size` bytes: lower-case letters, never starting with `!` (which the checksum
/// fixture refuses).
pub fn payload_template(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// `template` with the decimal sequence number `n` written over its start, so that payloads
/// differ.
pub fn stamp_payload(buffer: &mut Vec<u8>, template: &[u8], n: u64) {
    buffer.clear();
    buffer.extend_from_slice(template);
    let digits = n.to_string();
    let len = digits.len().min(buffer.len());
    buffer[..len].copy_from_slice(&digits.as_bytes()[..len]);
}

/// What a fill produced.
pub struct Fill {
    /// Messages, time, rate.
    pub figures: PhaseFigures,
    /// The id Weir gives the last message of every non-empty partition: once all are
    /// committed, the topic is nearly done (and a count confirms it).
    pub last_ids: Vec<String>,
}

/// Produce the plan's messages to `topic` and confirm the broker holds exactly them.
pub async fn fill(bootstrap: &str, topic: &str, plan: &Plan) -> anyhow::Result<Fill> {
    let (bootstrap, topic, plan) = (bootstrap.to_owned(), topic.to_owned(), plan.clone());
    tokio::task::spawn_blocking(move || fill_blocking(&bootstrap, &topic, &plan))
        .await
        .context("the fill thread failed")?
}

fn fill_blocking(bootstrap: &str, topic: &str, plan: &Plan) -> anyhow::Result<Fill> {
    let producer = producer(bootstrap, &[])?;
    let template = payload_template(plan.size);
    let mut payload = Vec::with_capacity(plan.size);
    let start = Instant::now();
    for n in 0..plan.messages {
        let key = format!("key-{}", n % plan.keys);
        stamp_payload(&mut payload, &template, n);
        send(&producer, BaseRecord::to(topic).key(&key).payload(&payload)).context("fill")?;
        if n % POLL_EVERY == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    flush(&producer, "fill")?;
    let seconds = start.elapsed().as_secs_f64();
    producer.context().check(plan.messages, "fill")?;

    let mut total = 0;
    let mut last_ids = Vec::new();
    for partition in 0..plan.partitions {
        let (low, high) = producer
            .client()
            .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
            .with_context(|| format!("cannot read the offsets of {topic}/{partition}"))?;
        total += high - low;
        if high > low {
            last_ids.push(weir::pipeline::worker::message_id(
                topic,
                partition,
                high - 1,
                &[],
            ));
        }
    }
    if u64::try_from(total).ok() != Some(plan.messages) {
        bail!(
            "fill: topic {topic} holds {total} messages, {} were produced",
            plan.messages
        );
    }
    Ok(Fill {
        figures: PhaseFigures::new(plan.messages, None, seconds),
        last_ids,
    })
}

/// Settings of a consumer in `group`, reading from the earliest offset, committing nothing by
/// itself.
pub fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    config
}

/// A consumer in `group`, reading from the earliest offset, committing nothing by itself.
pub fn consumer(bootstrap: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    consumer_config(bootstrap, group)
        .create_with_context(DefaultConsumerContext)
        .with_context(|| format!("cannot create a Kafka consumer for {bootstrap}"))
}

/// The raw phase: drain `messages` messages of `topic` as fast as librdkafka delivers them.
pub async fn drain(bootstrap: &str, topic: &str, messages: u64) -> anyhow::Result<PhaseFigures> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || drain_blocking(&bootstrap, &topic, messages))
        .await
        .context("the raw consumer's thread failed")?
}

/// Remembers when the group first assigned the consumer its partitions, and the CPU counters
/// then.
#[derive(Default)]
struct AssignmentClock {
    assigned: Mutex<Option<Mark>>,
}

impl ClientContext for AssignmentClock {}

impl ConsumerContext for AssignmentClock {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert_with(Mark::now);
        }
    }
}

fn drain_blocking(bootstrap: &str, topic: &str, messages: u64) -> anyhow::Result<PhaseFigures> {
    let consumer: BaseConsumer<AssignmentClock> =
        consumer_config(bootstrap, &unique_name("weir_bench_raw"))
            .create_with_context(AssignmentClock::default())
            .with_context(|| format!("cannot create a Kafka consumer for {bootstrap}"))?;
    // A first reading before the clock starts learns the length of a clock tick (a `getconf`
    // process, once) outside the measured drain.
    let _ = crate::cpu::CpuSample::now();
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("raw: cannot subscribe to {topic}"))?;
    let start = Mark::now();
    let mut count: u64 = 0;
    let mut bytes: u64 = 0;
    let mut last_progress = start.at;
    let mut last_error = None;
    while count < messages {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                count += 1;
                bytes += message.payload_len() as u64;
            }
            Some(Err(error)) => last_error = Some(error.to_string()),
            None => {}
        }
        if last_progress.elapsed() > STALL_TIMEOUT {
            bail!(
                "raw: no message for {STALL_TIMEOUT:?} after {count} of {messages} \
                 (last consumer error: {})",
                last_error.as_deref().unwrap_or("none")
            );
        }
    }
    let end = Mark::now();
    std::hint::black_box(bytes);
    // From the assignment, so that librdkafka's first fetches (which run ahead of the first
    // message handed out) count as draining, not as start-up: its time and its CPU alike.
    let assigned = consumer
        .context()
        .assigned
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .unwrap_or(start);
    Ok(PhaseFigures::drained(messages, start.at, assigned, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_size_asked_and_differ() {
        let template = payload_template(16);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        stamp_payload(&mut a, &template, 7);
        stamp_payload(&mut b, &template, 8);
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        assert_ne!(a.first(), Some(&b'!'));
        let mut tiny = Vec::new();
        stamp_payload(&mut tiny, &payload_template(2), 12_345);
        assert_eq!(tiny, b"12");
        stamp_payload(&mut tiny, &payload_template(0), 1);
        assert!(tiny.is_empty());
    }
}
