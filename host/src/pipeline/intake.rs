//! Kafka intake for one binding: the consumer's own thread, its rebalance callbacks, batching
//! of received records, backpressure by pausing partitions, and the [`PauseSwitch`] that lets
//! the layers above (breakers, operators) stop consumption.
//!
//! Owns everything that touches the `BaseConsumer` from its thread: `poll`, pause and resume,
//! and the rebalance callbacks (which run inside `poll`, so waiting in them for the drain never
//! blocks the async executor). Knows nothing of handlers, the store or offsets bookkeeping: it
//! hands the coordinator [`Batch`]es of messages on a bounded channel and rebalance events on an
//! unbounded one, so a full message channel can never hold up a revocation.
//!
//! Backpressure: when the coordinator has no room, the intake first waits for it (up to
//! [`PAUSE_AFTER`]); past that it pauses the assigned partitions and keeps polling — so the
//! consumer stays in its group however long the store is down, instead of overrunning
//! `max.poll.interval.ms` — and resumes them once the held batch is delivered. Partitions
//! assigned while paused are paused at once.
//!
//! Errors: librdkafka retries what fails on its own (a broker down, an ACL missing) and tells
//! the consumer's context; the context writes them through `tracing` with librdkafka's own
//! explanation (its log lines too), each kind of error (its code) at most every
//! [`ERROR_LOG_EVERY`] while it repeats. An *access* error — credentials refused, or an ACL
//! missing for the binding's topics or group ([`crate::kafka::is_access_denied`]) — is logged at
//! error level naming the binding, the topics, the group and what to grant, and kept in the
//! worker's stats (shown by `/health/details`) until partitions are assigned or records arrive.
//! The worker keeps running meanwhile: once the rights are granted, consumption starts without
//! a restart.
//!
//! Generations: every revocation starts a new generation. Batches carry the generation they were
//! polled in; the coordinator drops a batch from an earlier generation (those records will be
//! fetched again from the committed offsets), so a stale record never reaches the offset
//! tracker of a partition assigned anew.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::worker::WorkerStats;
use crate::metrics::LagGauge;
use crate::runtime::{Header, Message};

/// How long the intake waits for room before pausing its partitions.
pub const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Records handed over at once, at most.
pub const BATCH_MAX: usize = 256;

/// How long one `poll` waits for a record.
const POLL_WAIT: Duration = Duration::from_millis(100);

/// How often a Kafka error of the same kind is logged again while it repeats: 30 s (librdkafka
/// retries some of them every second).
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

/// Kinds of error whose last logging a consumer remembers, at most.
const ERROR_KINDS_KEPT: usize = 32;

/// Stops and restarts a worker's consumption from outside the worker. Pausing stops fetching
/// for every assigned partition (and for partitions assigned later) until resumed; messages
/// already received still run. The consumer keeps polling, so it stays in its group.
#[derive(Debug, Clone, Default)]
pub struct PauseSwitch(Arc<AtomicBool>);

impl PauseSwitch {
    /// Stop fetching.
    pub fn pause(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Fetch again.
    pub fn resume(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    /// Whether a pause was asked for.
    pub fn is_paused(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Records received together, from one generation.
pub struct Batch {
    /// The generation the records were polled in.
    pub generation: u64,
    /// The records, in the order received; each handle is the only one.
    pub messages: Vec<Arc<Message>>,
}

/// Messages handed back to the intake once done, to be filled again with the next records: a
/// message's buffers (id, topic, key, payload, headers, tenant) and its handle are reused, so
/// a steady stream allocates nothing per record. Freeing them on the coordinator instead cost
/// more than any other part of its work (glibc frees a buffer of another thread's arena under
/// that arena's lock).
pub type Spent = std::sync::mpsc::Receiver<Vec<Arc<Message>>>;

/// The coordinator's end of [`Spent`].
pub type GiveBack = std::sync::mpsc::Sender<Vec<Arc<Message>>>;

/// Messages the intake keeps for reuse, at most; more are freed. As many as a worker holds
/// pending, so that the messages of a steady stream circulate without being freed. The intake
/// keeps them only while records keep coming: after [`REUSE_IDLE`] without one, it frees them.
const REUSE_MAX: usize = super::worker::DEFAULT_MAX_PENDING;

/// How long the intake keeps messages for reuse while no record comes (idle, or paused longer
/// than a moment of backpressure).
const REUSE_IDLE: Duration = Duration::from_secs(1);

/// A message that holds more than this many bytes in all (see [`retained`]) is freed rather
/// than kept, so a few large records do not pin their memory: what a binding keeps for reuse
/// stays under 32 MiB (4 096 × 8 KiB), about 5 MiB for records of 1 KiB.
const REUSE_BYTES_MAX: usize = 8 * 1024;

/// The bytes a message holds: the message itself, its buffers and its header list (whose
/// capacity stays when a record with fewer headers is written into it).
fn retained(message: &Message) -> usize {
    std::mem::size_of::<Message>()
        + message.id.capacity()
        + message.topic.capacity()
        + message.key.as_ref().map_or(0, Vec::capacity)
        + message.payload.capacity()
        + message.headers.capacity() * std::mem::size_of::<Header>()
        + message
            .headers
            .iter()
            .map(|h| h.key.capacity() + h.value.capacity())
            .sum::<usize>()
        + message.tenant.capacity()
}

/// A rebalance, as the coordinator learns of it.
pub enum Control {
    /// Partitions assigned (topic, partition), in the given generation.
    Assign(Vec<(String, i32)>, u64),
    /// Partitions revoked; the new generation; acknowledge once drained.
    Revoke(Vec<(String, i32)>, u64, std::sync::mpsc::SyncSender<()>),
}

/// The consumer's context: how its callbacks reach the coordinator.
pub struct IntakeContext {
    control: mpsc::UnboundedSender<Control>,
    drain_deadline: Duration,
    generation: AtomicU64,
    /// Whether the intake holds the assignment paused (for any reason).
    paused: AtomicBool,
    /// Where librdkafka's statistics put the consumer lag, if anywhere.
    lag: Option<LagGauge>,
    /// Who the consumer works for and where its access errors go, if anywhere.
    errors: Option<ErrorReport>,
}

/// Where a consumer's errors are reported: the binding it works for (named in the log) and the
/// worker's stats (read by `/health/details`).
pub struct ErrorReport {
    binding: String,
    topics: String,
    group: String,
    stats: Arc<WorkerStats>,
    /// When each kind of error (its code) was last logged, so a repeating one is logged every
    /// [`ERROR_LOG_EVERY`]; at most [`ERROR_KINDS_KEPT`] kinds.
    last_logged: Mutex<HashMap<String, Instant>>,
}

impl ErrorReport {
    /// Report the errors of `binding`'s consumer of `topics` in `group` to `stats`.
    pub fn new(binding: &str, topics: &[String], group: &str, stats: Arc<WorkerStats>) -> Self {
        Self {
            binding: binding.to_owned(),
            topics: topics.join(", "),
            group: group.to_owned(),
            stats,
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// What an operator reads: librdkafka's `reason`, and for an access error what the
    /// principal lacks.
    fn describe(&self, code: RDKafkaErrorCode, reason: &str) -> String {
        let (topics, group) = (&self.topics, &self.group);
        let reason = reason.trim_end_matches('.');
        match code {
            RDKafkaErrorCode::GroupAuthorizationFailed => format!(
                "kafka denied access to consumer group {group}: {reason}; the principal needs \
                 READ on group {group}"
            ),
            RDKafkaErrorCode::TopicAuthorizationFailed => format!(
                "kafka denied access to topic {topics}: {reason}; the principal needs READ on \
                 topic {topics}"
            ),
            RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::DelegationTokenAuthorizationFailed => {
                format!("kafka denied the consumer of {topics} an operation: {reason}")
            }
            _ => format!(
                "kafka refused the credentials of the consumer of {topics}: {reason}; check \
                 kafka.security"
            ),
        }
    }

    /// Whether an error of `kind` is due to be logged (none logged within [`ERROR_LOG_EVERY`]).
    fn due(&self, kind: String) -> bool {
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last
            .get(&kind)
            .is_some_and(|at| at.elapsed() < ERROR_LOG_EVERY)
        {
            return false;
        }
        if last.len() >= ERROR_KINDS_KEPT {
            last.retain(|_, at| at.elapsed() < ERROR_LOG_EVERY);
        }
        if last.len() < ERROR_KINDS_KEPT {
            last.insert(kind, Instant::now());
        }
        true
    }

    fn report(&self, error: &KafkaError, reason: &str) {
        let binding = &self.binding;
        let code = error.rdkafka_error_code();
        // librdkafka's text varies between two occurrences ("after 311ms in state …"): an error
        // is of the same kind as another when its code is.
        let kind = code.map_or_else(|| reason.to_owned(), |code| format!("{code:?}"));
        match code.filter(|code| crate::kafka::is_access_denied(*code)) {
            Some(code) => {
                let message = self.describe(code, reason);
                if self.due(kind) {
                    tracing::error!(binding, code = ?code, "{message}");
                }
                self.stats.set_kafka_error(message);
            }
            None => {
                if self.due(kind) {
                    tracing::warn!(binding, %error, "kafka consumer error: {reason}");
                }
            }
        }
    }
}

impl IntakeContext {
    /// A context sending rebalances to `control`, waiting at most `drain_deadline` for a drain.
    pub fn new(control: mpsc::UnboundedSender<Control>, drain_deadline: Duration) -> Self {
        Self {
            control,
            drain_deadline,
            generation: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            lag: None,
            errors: None,
        }
    }

    /// Log the consumer's errors for a binding and keep its access errors in `errors`' stats.
    pub fn with_errors(mut self, errors: ErrorReport) -> Self {
        self.errors = Some(errors);
        self
    }

    /// Set `lag` from librdkafka's statistics (emitted every `statistics.interval.ms`, on the
    /// intake thread: never on the executor).
    pub fn with_lag(mut self, lag: LagGauge) -> Self {
        self.lag = Some(lag);
        self
    }
}

fn partitions(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for IntakeContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::forward_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match &self.errors {
            Some(errors) => errors.report(&error, reason),
            None => tracing::warn!(%error, "kafka consumer error: {reason}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        // While paused, librdkafka fetches nothing and its high watermarks go stale; the intake
        // loop samples the lag itself then (see `sample_paused_lag`).
        if let Some(lag) = &self.lag
            && !self.paused.load(Ordering::Relaxed)
        {
            lag.record(&statistics);
        }
    }
}

impl ConsumerContext for IntakeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            // Callbacks run on the intake thread (never on the executor), so waiting here is
            // the drain. Should one ever run on an executor thread, do not block it.
            if tokio::runtime::Handle::try_current().is_err() {
                let (ack, acked) = std::sync::mpsc::sync_channel(1);
                if self
                    .control
                    .send(Control::Revoke(partitions(list), generation, ack))
                    .is_ok()
                    && acked.recv_timeout(self.drain_deadline).is_err()
                {
                    tracing::warn!(
                        "drain deadline passed on revocation; uncommitted messages will be redelivered"
                    );
                }
            }
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "commit on revocation");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            if list.count() > 0
                && let Some(errors) = &self.errors
            {
                // In the group with partitions: whatever was denied has been granted.
                errors.stats.clear_kafka_error();
            }
            if self.paused.load(Ordering::Relaxed)
                && let Err(e) = consumer.pause(list)
            {
                tracing::warn!(error = %e, "cannot pause newly assigned partitions");
            }
            let generation = self.generation.load(Ordering::Acquire);
            let _ = self
                .control
                .send(Control::Assign(partitions(list), generation));
        }
    }
}

/// The intake thread's loop: poll, batch, hand over, pause when there is no room or any of
/// `switches` asks for it (an operator's, the breaker's). Returns when `stop` is set or the coordinator is gone, after leaving the group.
pub fn intake_loop(
    consumer: &BaseConsumer<IntakeContext>,
    messages: &mpsc::Sender<Batch>,
    runtime: &tokio::runtime::Handle,
    stop: &AtomicBool,
    switches: &[PauseSwitch],
    stats: &WorkerStats,
    spent: &Spent,
) {
    let context = consumer.context();
    let mut held: Option<Batch> = None;
    let mut reuse: Vec<Arc<Message>> = Vec::new();
    let mut last_record = std::time::Instant::now();
    let mut lag_sampled = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Hand over what is held; wait a little for room before pausing.
        if let Some(batch) = held.take() {
            if batch.generation != context.generation.load(Ordering::Acquire) {
                // Polled before a revocation: those records will be fetched again.
            } else if context.paused.load(Ordering::Relaxed) {
                match messages.try_send(batch) {
                    Ok(()) => {}
                    Err(TrySendError::Full(batch)) => held = Some(batch),
                    Err(TrySendError::Closed(_)) => break,
                }
            } else {
                // The timer is made inside the runtime's context (this thread is not in it).
                let room = runtime.block_on(async {
                    tokio::time::timeout(PAUSE_AFTER, messages.reserve()).await
                });
                match room {
                    Ok(Ok(permit)) => permit.send(batch),
                    Ok(Err(_)) => break,
                    Err(_) => held = Some(batch),
                }
            }
        }
        let want_paused = switches.iter().any(PauseSwitch::is_paused) || held.is_some();
        if want_paused != context.paused.load(Ordering::Relaxed) {
            set_paused(consumer, want_paused);
        }
        if context.paused.load(Ordering::Relaxed) && lag_sampled.elapsed() >= PAUSED_LAG_EVERY {
            sample_paused_lag(consumer);
            lag_sampled = std::time::Instant::now();
        }
        while let Ok(mut done) = spent.try_recv() {
            let room = REUSE_MAX.saturating_sub(reuse.len());
            done.retain(|m| retained(m) <= REUSE_BYTES_MAX);
            done.truncate(room);
            reuse.append(&mut done);
        }
        // Poll: for records, or (while paused) only to serve callbacks and stay in the group.
        let mut received = Vec::new();
        let mut wait = POLL_WAIT;
        while received.len() < BATCH_MAX {
            match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    // The context's error callback saw it first, with librdkafka's explanation,
                    // and logged it.
                    tracing::debug!(error = %e, "kafka consumer error");
                    break;
                }
                Some(Ok(record)) => received.push(to_message(&record, reuse.pop())),
            }
            wait = Duration::ZERO;
        }
        if received.is_empty() {
            if !reuse.is_empty() && last_record.elapsed() >= REUSE_IDLE {
                reuse = Vec::new();
            }
            continue;
        }
        last_record = std::time::Instant::now();
        stats.clear_kafka_error();
        stats
            .consumed
            .fetch_add(received.len() as u64, Ordering::Relaxed);
        let generation = context.generation.load(Ordering::Acquire);
        match &mut held {
            Some(batch) if batch.generation == generation => batch.messages.append(&mut received),
            _ => {
                held = Some(Batch {
                    generation,
                    messages: received,
                });
            }
        }
    }
    // Leaving the group runs the revocation callback, which commits what was stored.
    consumer.unsubscribe();
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
}

/// How often the lag of a paused binding is sampled from the brokers.
const PAUSED_LAG_EVERY: Duration = Duration::from_secs(5);

/// How long one partition's watermark query may take.
const WATERMARK_WAIT: Duration = Duration::from_millis(500);

/// Set the lag gauge of every assigned partition from the broker's high watermark and the
/// consumer's position (the next record it would fetch): while paused, nothing is fetched, so
/// librdkafka's statistics would keep showing the lag of the moment the pause began. Runs on the
/// intake thread, which is otherwise idle while paused; each query waits at most
/// [`WATERMARK_WAIT`].
fn sample_paused_lag(consumer: &BaseConsumer<IntakeContext>) {
    let Some(lag) = &consumer.context().lag else {
        return;
    };
    let positions = match consumer.position() {
        Ok(positions) => positions,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read positions to sample the lag");
            return;
        }
    };
    for element in positions.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let Ok((low, high)) = consumer.fetch_watermarks(topic, partition, WATERMARK_WAIT) else {
            continue;
        };
        let position = match element.offset() {
            rdkafka::Offset::Offset(position) => position,
            // Nothing fetched yet in this assignment: the committed offset, else the start.
            _ => consumer
                .committed_offsets(
                    {
                        let mut one = TopicPartitionList::new();
                        one.add_partition(topic, partition);
                        one
                    },
                    WATERMARK_WAIT,
                )
                .ok()
                .and_then(|c| {
                    c.find_partition(topic, partition)
                        .and_then(|e| e.offset().to_raw())
                })
                .filter(|o| *o >= 0)
                .unwrap_or(low),
        };
        lag.set(topic, partition, (high - position).max(0));
    }
}

/// Pause or resume every assigned partition, and remember it for later assignments.
fn set_paused(consumer: &BaseConsumer<IntakeContext>, paused: bool) {
    let assignment = match consumer.assignment() {
        Ok(assignment) => assignment,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the assignment to pause or resume it");
            return;
        }
    };
    let result = if paused {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => {
            consumer.context().paused.store(paused, Ordering::Relaxed);
            tracing::debug!(paused, partitions = assignment.count(), "intake");
        }
        Err(e) => tracing::warn!(error = %e, paused, "cannot pause or resume the partitions"),
    }
}

/// A message with nothing in it, to write a first record into.
fn empty_message() -> Message {
    Message {
        id: String::new(),
        topic: String::new(),
        partition: 0,
        offset: 0,
        key: None,
        payload: Vec::new(),
        headers: Vec::new(),
        timestamp_ms: None,
        tenant: String::new(),
        attempt: 1,
    }
}

/// A received record as the handler sees it (the tenant is filled in by the coordinator),
/// written into `reused`'s buffers when given one (a message done with, whose handle is the
/// only one).
fn to_message(record: &BorrowedMessage<'_>, reused: Option<Arc<Message>>) -> Arc<Message> {
    let mut handle = reused.unwrap_or_else(|| Arc::new(empty_message()));
    let Some(message) = Arc::get_mut(&mut handle) else {
        // Not the only handle after all: leave it to its other owners.
        return to_message(record, None);
    };
    let mut count = 0;
    if let Some(headers) = record.headers() {
        for h in headers.iter() {
            if count == message.headers.len() {
                message.headers.push(Header {
                    key: String::new(),
                    value: Vec::new(),
                });
            }
            let header = &mut message.headers[count];
            header.key.clear();
            header.key.push_str(h.key);
            header.value.clear();
            header.value.extend_from_slice(h.value.unwrap_or_default());
            count += 1;
        }
    }
    message.headers.truncate(count);
    message.id.clear();
    super::worker::write_message_id(
        &mut message.id,
        record.topic(),
        record.partition(),
        record.offset(),
        &message.headers,
    );
    message.topic.clear();
    message.topic.push_str(record.topic());
    message.partition = record.partition().max(0) as u32;
    message.offset = record.offset().max(0) as u64;
    match (record.key(), &mut message.key) {
        (Some(key), Some(buffer)) => {
            buffer.clear();
            buffer.extend_from_slice(key);
        }
        (key, buffer) => *buffer = key.map(<[u8]>::to_vec),
    }
    message.payload.clear();
    message
        .payload
        .extend_from_slice(record.payload().unwrap_or_default());
    message.timestamp_ms = record.timestamp().to_millis();
    message.tenant.clear();
    message.attempt = 1;
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_counts_its_header_list_even_when_its_headers_are_empty() {
        let mut message = empty_message();
        assert!(retained(&message) <= REUSE_BYTES_MAX);
        // Headers with no name and no value (a producer may send thousands), then a record
        // with none written over them: the list keeps its capacity.
        message.headers = (0..1000)
            .map(|_| Header {
                key: String::new(),
                value: Vec::new(),
            })
            .collect();
        message.headers.truncate(0);
        assert!(retained(&message) > REUSE_BYTES_MAX);
    }

    /// Records of every shape, one after another, each written into the buffers of the message
    /// before it: what comes out is what a fresh message would hold, in the same memory.
    #[test]
    fn a_reused_message_holds_nothing_of_the_record_before() {
        use rdkafka::consumer::Consumer as _;
        use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("orders", 1, 1).unwrap();
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .unwrap();
        let long = vec![7u8; 3000];
        let headers = |pairs: &[(&str, Option<&[u8]>)]| {
            pairs.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(KafkaHeader { key, value: *value })
            })
        };
        let records = [
            // A key, two headers (one the message id), a long payload.
            (
                Some(&b"customer-1"[..]),
                Some(headers(&[
                    ("message-id", Some(b"order-1")),
                    ("trace", Some(b"a long header value")),
                ])),
                Some(&long[..]),
            ),
            // No key, no headers, a short payload: named by its position.
            (None, None, Some(&b"{}"[..])),
            // A shorter key, a header without a value, no payload.
            (Some(&b"c2"[..]), Some(headers(&[("x", None)])), None),
            // An empty key; an empty message-id header does not name it.
            (
                Some(&b""[..]),
                Some(headers(&[("message-id", Some(b""))])),
                Some(&b"z"[..]),
            ),
        ];
        for (key, headers, payload) in &records {
            let mut record = BaseRecord::<[u8], [u8]>::to("orders");
            record.key = *key;
            record.payload = *payload;
            record.headers = headers.clone();
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();

        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "reuse")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("orders", 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut previous: Option<Arc<Message>> = None;
        let mut seen = Vec::new();
        while seen.len() < records.len() {
            assert!(Instant::now() < deadline, "records not consumed");
            let Some(record) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let record = record.unwrap();
            let fresh = to_message(&record, None);
            let reused = match previous.take() {
                Some(before) => {
                    let memory = Arc::as_ptr(&before);
                    let reused = to_message(&record, Some(before));
                    assert_eq!(Arc::as_ptr(&reused), memory, "the message is reused");
                    reused
                }
                None => to_message(&record, None),
            };
            assert_eq!(format!("{reused:?}"), format!("{fresh:?}"));
            seen.push(reused.id.clone());
            previous = Some(reused);
        }
        assert_eq!(seen, ["order-1", "orders/0/1", "orders/0/2", "orders/0/3"]);
    }

    fn report() -> (ErrorReport, Arc<WorkerStats>) {
        let stats = Arc::new(WorkerStats::default());
        let report = ErrorReport::new(
            "acme.orders",
            &["orders".to_owned()],
            "weir.acme.orders",
            stats.clone(),
        );
        (report, stats)
    }

    #[test]
    fn access_errors_say_what_to_grant_and_stay_until_cleared() {
        let (report, stats) = report();
        report.report(
            &KafkaError::Global(RDKafkaErrorCode::GroupAuthorizationFailed),
            "FindCoordinator response error: Group authorization failed.",
        );
        assert_eq!(
            stats.kafka_error().as_deref(),
            Some(
                "kafka denied access to consumer group weir.acme.orders: FindCoordinator \
                 response error: Group authorization failed; the principal needs READ on group \
                 weir.acme.orders"
            )
        );
        report.report(
            &KafkaError::Global(RDKafkaErrorCode::TopicAuthorizationFailed),
            "Subscribed topic not available: orders: Broker: Topic authorization failed",
        );
        let error = stats.kafka_error().unwrap();
        assert!(error.contains("READ on topic orders"), "{error}");
        report.report(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error: Authentication failed",
        );
        let error = stats.kafka_error().unwrap();
        assert!(
            error.starts_with("kafka refused the credentials"),
            "{error}"
        );
        assert!(error.ends_with("check kafka.security"), "{error}");
        // A transport error is logged, not kept: it is not the binding's to fix.
        stats.clear_kafka_error();
        report.report(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(stats.kafka_error(), None);
    }

    #[test]
    fn a_repeating_error_is_logged_once_per_interval_and_kind() {
        let (report, _) = report();
        assert!(report.due("GroupAuthorizationFailed".into()));
        assert!(!report.due("GroupAuthorizationFailed".into()));
        assert!(report.due("TopicAuthorizationFailed".into()));
        assert!(!report.due("GroupAuthorizationFailed".into()));
        // The memory of kinds is bounded; past it, errors are logged rather than forgotten.
        for kind in 0..2 * ERROR_KINDS_KEPT {
            assert!(report.due(format!("kind {kind}")));
        }
        assert!(report.last_logged.lock().unwrap().len() <= ERROR_KINDS_KEPT);
    }
}
