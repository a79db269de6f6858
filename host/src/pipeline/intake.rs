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
//! Generations: every revocation starts a new generation. Batches carry the generation they were
//! polled in; the coordinator drops a batch from an earlier generation (those records will be
//! fetched again from the committed offsets), so a stale record never reaches the offset
//! tracker of a partition assigned anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::statistics::Statistics;
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
    /// The records, in the order received.
    pub messages: Vec<Message>,
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
        }
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
) {
    let context = consumer.context();
    let mut held: Option<Batch> = None;
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
        // Poll: for records, or (while paused) only to serve callbacks and stay in the group.
        let mut received = Vec::new();
        let mut wait = POLL_WAIT;
        while received.len() < BATCH_MAX {
            match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    break;
                }
                Some(Ok(record)) => received.push(to_message(&record)),
            }
            wait = Duration::ZERO;
        }
        if received.is_empty() {
            continue;
        }
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

/// A received record as the handler sees it (the tenant is filled in by the coordinator).
fn to_message(record: &BorrowedMessage<'_>) -> Message {
    let headers: Vec<Header> = record
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    key: h.key.to_owned(),
                    value: h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    Message {
        id: super::worker::message_id(
            record.topic(),
            record.partition(),
            record.offset(),
            &headers,
        ),
        topic: record.topic().to_owned(),
        partition: record.partition().max(0) as u32,
        offset: record.offset().max(0) as u64,
        key: record.key().map(<[u8]>::to_vec),
        payload: record.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        timestamp_ms: record.timestamp().to_millis(),
        tenant: String::new(),
        attempt: 1,
    }
}
