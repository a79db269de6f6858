//! One binding at work: Kafka intake → key-ordered dispatch → invocation → group commit →
//! offsets. The first end-to-end path of the pipeline.
//!
//! Owns the binding's consumer (polled on a dedicated OS thread by [`super::intake`], so
//! librdkafka's rebalance callbacks may block for the drain without blocking the async
//! executor), the coordinator task that drives the pure core ([`KeyScheduler`],
//! [`PartitionOffsets`], [`RetryPolicy`]), the invocation tasks, and the group commit. Knows nothing of SQL (it talks to [`Store`]) nor of how
//! components are loaded (it is given a [`HandlerPool`]).
//!
//! Order of events for one message: received → offset tracked → queued → dispatched when its
//! key is free → invoked (retried after backoff while its key stays occupied) → its completion
//! joins the next group commit (or it is dead-lettered) → only after the commit is its key
//! freed and its offset completed; the contiguous watermark is stored for the next auto-commit.
//! Freeing the key only after the commit means the next message of that key reads committed
//! state: per-key order holds for state too, without an overlay of uncommitted writes.
//!
//! Faults of the host are not the handler's: when the store cannot be read during an
//! invocation, or no instance can be created, the message runs again after a pause without
//! spending an attempt, and it is never dead-lettered; when the group commit fails, the batch is
//! kept and retried with backoff while dispatch stops.
//!
//! While the store is down, nothing completes, the dispatcher fills, and the intake pauses the
//! partitions (see [`super::intake`]) until there is room again: the consumer stays in its group
//! however long the outage lasts.
//!
//! Not yet here (tracked in the control-plane and resilience issues): hot swap of the handler
//! version without restarting the worker; per-tenant rate limits; breakers; metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::binding::BindingSpec;
use super::dispatch::{KeyScheduler, Ticket};
use super::intake::{Batch, Control, IntakeContext, PauseSwitch, intake_loop};
use super::offsets::PartitionOffsets;
use super::retry::{Decision, FailureKind, JitterRng};
use crate::config::PipelineConfig;
use crate::runtime::{
    ContentHash, ErrorKind, HandlerPool, Header, InvocationContext, Message, Outcome, OutputTopics,
    StateSource, TrapKind,
};
use crate::store::{Completion, DlqEntryInsert, DlqErrorKind, OutboxInsert, Store, StoreError};

/// Consumer session timeout when the caller sets none: librdkafka's default, 45 s, longer than
/// the default drain deadline (20 s).
const DEFAULT_SESSION_TIMEOUT_MS: &str = "45000";

/// Batches waiting between the intake thread and the coordinator, at most.
const INTAKE_BATCHES: usize = 4;

/// Wait before running a message again after a fault of the host (not the handler): 1 s.
const HOST_FAULT_BACKOFF: Duration = Duration::from_secs(1);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Completions per group commit, at most.
    pub commit_batch_max: usize,
    /// How long a completion may wait for others before the commit.
    pub commit_linger: Duration,
    /// How long a revocation waits for in-flight messages before giving the partitions up.
    pub drain_deadline: Duration,
    /// Messages received but not yet done, at most (backpressure on intake).
    pub max_pending: usize,
}

/// Messages received but not yet done, per binding, by default.
pub const DEFAULT_MAX_PENDING: usize = 4096;

impl Default for WorkerSettings {
    fn default() -> Self {
        Self::from(&PipelineConfig::default())
    }
}

impl From<&PipelineConfig> for WorkerSettings {
    fn from(config: &PipelineConfig) -> Self {
        Self {
            commit_batch_max: config.commit_batch_max as usize,
            commit_linger: config.commit_linger(),
            drain_deadline: config.drain_deadline(),
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

/// Counters of one worker, readable while it runs.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Messages received from Kafka.
    pub consumed: AtomicU64,
    /// Messages whose effects committed.
    pub committed: AtomicU64,
    /// Messages found already processed (their effects dropped).
    pub duplicates: AtomicU64,
    /// Retries scheduled.
    pub retried: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Group commits made.
    pub commits: AtomicU64,
    /// Whether the store was unreachable at the last attempt.
    pub store_unavailable: AtomicBool,
    /// Partition assignments received (one per rebalance this worker took part in).
    pub assignments: AtomicU64,
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The consumer could not be created or subscribed.
    #[error("binding {binding}: cannot consume {topics:?}: {message}")]
    Consumer {
        /// Binding id.
        binding: String,
        /// Topics.
        topics: Vec<String>,
        /// librdkafka's explanation.
        message: String,
    },
}

/// Everything a worker needs.
pub struct Worker {
    /// Binding id (first half of the processed key).
    pub binding_id: String,
    /// The binding's policy.
    pub spec: BindingSpec,
    /// The handler's active version, pooled.
    pub handler: Arc<HandlerPool>,
    /// The active version's number, recorded in DLQ entries.
    pub handler_version: Option<i32>,
    /// Where effects, state and the DLQ live.
    pub store: Arc<dyn Store>,
    /// librdkafka settings (bootstrap servers and overrides); the worker adds its own.
    pub kafka: ClientConfig,
    /// Batching and drain settings.
    pub settings: WorkerSettings,
    /// Counters.
    pub stats: Arc<WorkerStats>,
    /// Stops and restarts consumption from outside.
    pub pause: PauseSwitch,
}

/// Topic index and partition: the unit of ordering and offsets.
type Part = (u16, i32);

/// A message in the coordinator's hands.
struct Pending {
    message: Arc<Message>,
    part: Part,
    offset: i64,
    first_failure: Option<chrono::DateTime<Utc>>,
}

/// What an invocation task reports.
enum Done {
    /// Handled: commit these effects.
    Success(u64, Completion),
    /// Failed; the retry policy decides.
    Failed {
        slot: u64,
        kind: FailureKind,
        dlq_kind: DlqErrorKind,
        message: String,
    },
    /// The host failed, not the handler (the state store could not be read, no instance could
    /// be created): run it again later without spending an attempt. Never dead-lettered.
    HostFault { slot: u64, error: String },
    /// A wait is over: run the message again, as its next attempt or (after a host fault) the
    /// same one.
    Rerun { slot: u64, next_attempt: bool },
    /// Dead-lettered (stored and queued for the DLQ topic).
    DeadLettered(u64),
}

/// Reads keyed state from the store, for one invocation, remembering whether a read failed (a
/// handler that then fails failed because of the host).
struct StoreState {
    store: Arc<dyn Store>,
    tenant: String,
    handler: String,
    failed: AtomicBool,
}

impl StateSource for StoreState {
    fn get<'a>(
        &'a self,
        key: &'a [u8],
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            self.store
                .state_get(&self.tenant, &self.handler, key, name)
                .await
                .map_err(|e| {
                    self.failed.store(true, AtomicOrdering::Relaxed);
                    e.to_string()
                })
        })
    }
}

/// The id of a message: its `message-id` header, else `topic/partition/offset`.
pub fn message_id(topic: &str, partition: i32, offset: i64, headers: &[Header]) -> String {
    headers
        .iter()
        .find(|h| h.key == "message-id")
        .and_then(|h| std::str::from_utf8(&h.value).ok())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{topic}/{partition}/{offset}"))
}

/// The stable id of the `index`-th record emitted while handling `message_id` in `binding`.
pub fn emitted_id(binding: &str, message_id: &str, index: usize) -> String {
    let digest = ContentHash::of(format!("{binding}\0{message_id}\0{index}").as_bytes()).to_hex();
    digest[..32].to_owned()
}

impl Worker {
    /// Consume until `shutdown` flips to true. Returns after the in-flight messages are done
    /// or the drain deadline passed, with the offsets of everything committed stored.
    pub async fn run(
        self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), WorkerError> {
        let (control_tx, mut control) = mpsc::unbounded_channel::<Control>();
        let (batches_tx, mut batches) = mpsc::channel::<Batch>(INTAKE_BATCHES);
        let context = IntakeContext::new(control_tx, self.settings.drain_deadline);
        let mut config = self.kafka.clone();
        config
            .set("group.id", self.spec.group_id())
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Eager rebalancing: a revocation takes every partition, and the drain below is
            // written for that. The cooperative protocol is not supported.
            .set("partition.assignment.strategy", "range,roundrobin");
        if config.get("session.timeout.ms").is_none() {
            config.set("session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS);
        }
        let consumer_error = |message: String| WorkerError::Consumer {
            binding: self.binding_id.clone(),
            topics: self.spec.topics.clone(),
            message,
        };
        let consumer: Arc<BaseConsumer<IntakeContext>> = Arc::new(
            config
                .create_with_context(context)
                .map_err(|e| consumer_error(e.to_string()))?,
        );
        let topics: Vec<&str> = self.spec.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| consumer_error(e.to_string()))?;

        let stop_intake = Arc::new(AtomicBool::new(false));
        let intake = {
            let consumer = consumer.clone();
            let stop = stop_intake.clone();
            let stats = self.stats.clone();
            let switch = self.pause.clone();
            let runtime = tokio::runtime::Handle::current();
            let binding = self.binding_id.clone();
            std::thread::Builder::new()
                .name(format!("weir-intake-{binding}"))
                .spawn(move || {
                    intake_loop(&consumer, &batches_tx, &runtime, &stop, &switch, &stats)
                })
                .map_err(|e| consumer_error(format!("cannot start the intake thread: {e}")))?
        };

        let mut coordinator = Coordinator::new(&self, consumer.clone());
        loop {
            let linger = coordinator.commit_deadline();
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                Some(event) = control.recv() => coordinator.on_control(event).await,
                Some(done) = coordinator.done_rx.recv() => coordinator.on_done(done).await,
                batch = batches.recv(), if coordinator.has_room() => match batch {
                    Some(batch) => coordinator.on_batch(batch),
                    None => break,
                },
                _ = sleep_until(linger), if linger.is_some() => coordinator.flush().await,
            }
            if coordinator.batch.len() >= self.settings.commit_batch_max {
                coordinator.flush().await;
            }
            coordinator.dispatch();
            coordinator.check_drain().await;
        }

        // Shutdown: let in-flight work finish (bounded), commit, store offsets, then stop intake.
        let deadline = Instant::now() + self.settings.drain_deadline;
        while coordinator.scheduler.in_flight() > 0 && Instant::now() < deadline {
            tokio::select! {
                Some(done) = coordinator.done_rx.recv() => coordinator.on_done(done).await,
                _ = tokio::time::sleep(self.settings.commit_linger) => coordinator.flush().await,
            }
        }
        coordinator.flush().await;
        // The intake thread must hold the last reference to the consumer, so that closing it
        // (which runs the revocation callback) happens there, not on the executor.
        drop(coordinator);
        drop(consumer);
        drop(batches);
        stop_intake.store(true, AtomicOrdering::Relaxed);
        // Keep answering revocations while the intake thread closes the consumer.
        let mut closer = tokio::task::spawn_blocking(move || {
            let _ = intake.join();
        });
        loop {
            tokio::select! {
                _ = &mut closer => break,
                event = control.recv() => match event {
                    Some(Control::Revoke(_, _, ack)) => {
                        let _ = ack.send(());
                    }
                    Some(Control::Assign(..)) => {}
                    None => {
                        let _ = (&mut closer).await;
                        break;
                    }
                },
            }
        }
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

struct Coordinator {
    binding_id: String,
    spec: Arc<BindingSpec>,
    topics: Vec<String>,
    handler: Arc<HandlerPool>,
    handler_version: Option<i32>,
    store: Arc<dyn Store>,
    consumer: Arc<BaseConsumer<IntakeContext>>,
    settings: WorkerSettings,
    stats: Arc<WorkerStats>,
    context: InvocationContext,
    scheduler: KeyScheduler<Pending, Part>,
    offsets: PartitionOffsets<Part>,
    tickets: HashMap<u64, Ticket<Pending, Part>>,
    next_slot: u64,
    batch: Vec<(u64, Completion)>,
    batch_started: Option<Instant>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    jitter: JitterRng,
    /// A revocation in progress: its acknowledgement, deadline and partitions.
    draining: Option<(std::sync::mpsc::SyncSender<()>, Instant, Vec<Part>)>,
    store_backoff: Duration,
    /// The intake generation of the current assignment; older batches are dropped.
    generation: u64,
}

impl Coordinator {
    fn new(worker: &Worker, consumer: Arc<BaseConsumer<IntakeContext>>) -> Self {
        let spec = Arc::new(worker.spec.clone());
        let context = InvocationContext {
            config: Arc::new(spec.config.clone().into_iter().collect::<BTreeMap<_, _>>()),
            output_topics: OutputTopics::Only(Arc::new(
                spec.output_topics.iter().cloned().collect(),
            )),
            // Replaced per invocation by a fresh `StoreState` (see `spawn_invocation`).
            state: Arc::new(crate::runtime::MemoryState::new()),
            deadline: spec.deadline_ms.map(Duration::from_millis),
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            binding_id: worker.binding_id.clone(),
            topics: spec.topics.clone(),
            scheduler: KeyScheduler::new(spec.ordering, spec.max_in_flight()),
            spec,
            handler: worker.handler.clone(),
            handler_version: worker.handler_version,
            store: worker.store.clone(),
            consumer,
            settings: worker.settings.clone(),
            stats: worker.stats.clone(),
            context,
            offsets: PartitionOffsets::default(),
            tickets: HashMap::new(),
            next_slot: 0,
            batch: Vec::new(),
            batch_started: None,
            done_tx,
            done_rx,
            jitter: JitterRng::from_entropy(),
            draining: None,
            store_backoff: Duration::ZERO,
            generation: 0,
        }
    }

    fn has_room(&self) -> bool {
        self.draining.is_none() && self.scheduler.len() < self.settings.max_pending
    }

    fn commit_deadline(&self) -> Option<Instant> {
        self.batch_started
            .map(|started| started + self.settings.commit_linger + self.store_backoff)
    }

    fn topic_index(&self, topic: &str) -> u16 {
        self.topics.iter().position(|t| t == topic).unwrap_or(0) as u16
    }

    fn on_batch(&mut self, batch: Batch) {
        if batch.generation != self.generation {
            tracing::debug!(
                records = batch.messages.len(),
                "records from before a rebalance dropped; they will be fetched again"
            );
            return;
        }
        for mut message in batch.messages {
            message.tenant.clone_from(&self.spec.tenant);
            let part = (self.topic_index(&message.topic), message.partition as i32);
            let offset = message.offset as i64;
            if let Err(e) = self.offsets.track(part, offset) {
                tracing::debug!(error = %e, "offset not tracked (redelivery after a rebalance)");
                continue;
            }
            let key = message.key.clone();
            let pending = Pending {
                message: Arc::new(message),
                part,
                offset,
                first_failure: None,
            };
            self.scheduler.push(part, key.as_deref(), pending);
        }
    }

    async fn on_control(&mut self, event: Control) {
        match event {
            Control::Assign(parts, generation) => {
                self.generation = generation;
                self.stats.assignments.fetch_add(1, AtomicOrdering::Relaxed);
                tracing::info!(binding = %self.binding_id, partitions = parts.len(), generation, "partitions assigned");
                for (topic, partition) in parts {
                    let part = (self.topic_index(&topic), partition);
                    self.offsets.assign(part);
                }
            }
            Control::Revoke(parts, generation, ack) => {
                self.generation = generation;
                for (topic, partition) in &parts {
                    let part = (self.topic_index(topic), *partition);
                    let dropped = self.scheduler.revoke(part);
                    tracing::debug!(binding = %self.binding_id, topic, partition, dropped = dropped.len(), "partition revoked");
                }
                self.flush().await;
                let parts = parts
                    .iter()
                    .map(|(topic, partition)| (self.topic_index(topic), *partition))
                    .collect();
                self.draining = Some((ack, Instant::now() + self.settings.drain_deadline, parts));
                self.check_drain().await;
            }
        }
    }

    /// Finish a revocation once nothing is in flight (or the deadline passed).
    async fn check_drain(&mut self) {
        let Some((_, deadline, _)) = &self.draining else {
            return;
        };
        if self.scheduler.in_flight() > 0 && Instant::now() < *deadline {
            return;
        }
        self.flush().await;
        if let Some((ack, _, parts)) = self.draining.take() {
            // Offsets of everything committed are stored by now; forget the partitions.
            for part in parts {
                self.offsets.revoke(part);
            }
            let _ = ack.send(());
        }
    }

    fn dispatch(&mut self) {
        if self.draining.is_some() || self.store_backoff > Duration::ZERO {
            return;
        }
        while let Some(ticket) = self.scheduler.next_ready() {
            let slot = self.next_slot;
            self.next_slot += 1;
            let message = ticket.message().message.clone();
            self.tickets.insert(slot, ticket);
            self.spawn_invocation(slot, message);
        }
    }

    fn spawn_invocation(&self, slot: u64, message: Arc<Message>) {
        let handler = self.handler.clone();
        let state = Arc::new(StoreState {
            store: self.store.clone(),
            tenant: self.spec.tenant.clone(),
            handler: self.spec.handler.clone(),
            failed: AtomicBool::new(false),
        });
        let mut context = self.context.clone();
        context.state = state.clone();
        let done = self.done_tx.clone();
        let binding_id = self.binding_id.clone();
        let spec = self.spec.clone();
        tokio::spawn(async move {
            let report = match handler.invoke(&message, &context).await {
                Err(e) => Done::HostFault {
                    slot,
                    error: e.to_string(),
                },
                Ok(invocation)
                    if !invocation.outcome.is_ok()
                        && state.failed.load(AtomicOrdering::Relaxed) =>
                {
                    Done::HostFault {
                        slot,
                        error: "the state store could not be read".to_owned(),
                    }
                }
                Ok(invocation) => match invocation.outcome {
                    Outcome::Ok => {
                        let emits = invocation
                            .effects
                            .emits
                            .into_iter()
                            .enumerate()
                            .map(|(i, emit)| OutboxInsert {
                                message_id: emitted_id(&binding_id, &message.id, i),
                                topic: emit.topic,
                                key: emit.key,
                                payload: emit.payload,
                                headers: emit.headers,
                                causation_id: message.id.clone(),
                                traceparent: message
                                    .headers
                                    .iter()
                                    .find(|h| h.key == "traceparent")
                                    .and_then(|h| String::from_utf8(h.value.clone()).ok()),
                            })
                            .collect();
                        Done::Success(
                            slot,
                            Completion {
                                binding_id,
                                tenant: spec.tenant.clone(),
                                handler: spec.handler.clone(),
                                message_id: message.id.clone(),
                                key: message.key.clone(),
                                state_writes: invocation.effects.state_writes,
                                emits,
                            },
                        )
                    }
                    Outcome::HandlerError { kind, message } => Done::Failed {
                        slot,
                        kind: kind.into(),
                        dlq_kind: match kind {
                            ErrorKind::Retryable => DlqErrorKind::Retryable,
                            ErrorKind::Permanent => DlqErrorKind::Permanent,
                        },
                        message,
                    },
                    Outcome::Refused { message } => Done::Failed {
                        slot,
                        kind: FailureKind::Permanent,
                        dlq_kind: DlqErrorKind::Permanent,
                        message,
                    },
                    Outcome::Trap { kind, message } => Done::Failed {
                        slot,
                        kind: kind.error_kind().into(),
                        dlq_kind: if kind == TrapKind::Deadline {
                            DlqErrorKind::Retryable
                        } else {
                            DlqErrorKind::Trap
                        },
                        message,
                    },
                },
            };
            let _ = done.send(report);
        });
    }

    async fn on_done(&mut self, done: Done) {
        match done {
            Done::Success(slot, completion) => {
                if self.batch.is_empty() {
                    self.batch_started = Some(Instant::now());
                }
                self.batch.push((slot, completion));
            }
            Done::Rerun { slot, next_attempt } => {
                if let Some(ticket) = self.tickets.get_mut(&slot) {
                    let pending = ticket.message_mut();
                    if next_attempt {
                        let mut message = (*pending.message).clone();
                        message.attempt += 1;
                        pending.message = Arc::new(message);
                    }
                    let message = pending.message.clone();
                    self.spawn_invocation(slot, message);
                }
            }
            Done::HostFault { slot, error } => {
                self.stats
                    .store_unavailable
                    .store(true, AtomicOrdering::Relaxed);
                tracing::warn!(binding = %self.binding_id, %error, "host fault; the message will run again, no attempt spent");
                let done = self.done_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(HOST_FAULT_BACKOFF).await;
                    let _ = done.send(Done::Rerun {
                        slot,
                        next_attempt: false,
                    });
                });
            }
            Done::DeadLettered(slot) => {
                self.stats
                    .dead_lettered
                    .fetch_add(1, AtomicOrdering::Relaxed);
                self.release(slot);
            }
            Done::Failed {
                slot,
                kind,
                dlq_kind,
                message: error,
            } => {
                let Some(ticket) = self.tickets.get_mut(&slot) else {
                    return;
                };
                let pending = ticket.message_mut();
                let now = Utc::now();
                let first = *pending.first_failure.get_or_insert(now);
                let attempt = pending.message.attempt;
                let (failed, part, offset) =
                    (pending.message.clone(), pending.part, pending.offset);
                match self.spec.retry.decide(attempt, kind, &mut self.jitter) {
                    Decision::RetryAfter(delay) => {
                        self.stats.retried.fetch_add(1, AtomicOrdering::Relaxed);
                        tracing::info!(binding = %self.binding_id, message_id = %failed.id, attempt, ?delay, %error, "retrying");
                        let done = self.done_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = done.send(Done::Rerun {
                                slot,
                                next_attempt: true,
                            });
                        });
                    }
                    Decision::DeadLetter => {
                        let entry =
                            self.dlq_entry(&failed, part, offset, dlq_kind, error, first, now);
                        let outbox = self.dlq_record(&entry);
                        let store = self.store.clone();
                        let done = self.done_tx.clone();
                        let tenant = self.spec.tenant.clone();
                        let binding = self.binding_id.clone();
                        tokio::spawn(async move {
                            // The host's own faults never lose a dead letter: retry until stored.
                            let mut backoff = Duration::from_millis(100);
                            loop {
                                let stored = async {
                                    store.dlq_insert(&entry).await?;
                                    store
                                        .outbox_insert(
                                            &tenant,
                                            Some(&binding),
                                            std::slice::from_ref(&outbox),
                                        )
                                        .await?;
                                    Ok::<_, StoreError>(())
                                }
                                .await;
                                match stored {
                                    Ok(()) => break,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "cannot store a DLQ entry; retrying");
                                        tokio::time::sleep(backoff).await;
                                        backoff = (backoff * 2).min(Duration::from_secs(5));
                                    }
                                }
                            }
                            let _ = done.send(Done::DeadLettered(slot));
                        });
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dlq_entry(
        &self,
        message: &Message,
        part: Part,
        offset: i64,
        error_kind: DlqErrorKind,
        error_message: String,
        first_failure_at: chrono::DateTime<Utc>,
        last_failure_at: chrono::DateTime<Utc>,
    ) -> DlqEntryInsert {
        DlqEntryInsert {
            tenant: self.spec.tenant.clone(),
            binding_id: self.binding_id.clone(),
            handler: self.spec.handler.clone(),
            handler_version: self.handler_version,
            topic: message.topic.clone(),
            partition: part.1,
            offset,
            message_id: message.id.clone(),
            key: message.key.clone(),
            payload: message.payload.clone(),
            headers: message.headers.clone(),
            timestamp_ms: message.timestamp_ms,
            error_kind,
            error_message,
            attempts: message.attempt as i32,
            first_failure_at,
            last_failure_at,
        }
    }

    /// The record published to the DLQ topic: the original key, payload and headers, plus
    /// `weir-dlq-*` headers describing the failure.
    fn dlq_record(&self, entry: &DlqEntryInsert) -> OutboxInsert {
        let mut headers = entry.headers.clone();
        let kind = match entry.error_kind {
            DlqErrorKind::Retryable => "retryable",
            DlqErrorKind::Permanent => "permanent",
            DlqErrorKind::Trap => "trap",
        };
        for (name, value) in [
            ("weir-dlq-binding", entry.binding_id.clone()),
            ("weir-dlq-handler", entry.handler.clone()),
            (
                "weir-dlq-handler-version",
                entry
                    .handler_version
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            ),
            ("weir-dlq-topic", entry.topic.clone()),
            ("weir-dlq-partition", entry.partition.to_string()),
            ("weir-dlq-offset", entry.offset.to_string()),
            ("weir-dlq-error-kind", kind.to_owned()),
            ("weir-dlq-error", entry.error_message.clone()),
            ("weir-dlq-attempts", entry.attempts.to_string()),
            (
                "weir-dlq-first-failure",
                entry.first_failure_at.to_rfc3339(),
            ),
            ("weir-dlq-last-failure", entry.last_failure_at.to_rfc3339()),
        ] {
            headers.push(Header {
                key: name.to_owned(),
                value: value.into_bytes(),
            });
        }
        OutboxInsert {
            message_id: emitted_id(&entry.binding_id, &format!("dlq:{}", entry.message_id), 0),
            topic: self.spec.dlq_topic(),
            key: entry.key.clone(),
            payload: entry.payload.clone(),
            headers,
            causation_id: entry.message_id.clone(),
            traceparent: None,
        }
    }

    /// Commit the batch; on success free the keys and complete the offsets.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let completions: Vec<Completion> = self.batch.iter().map(|(_, c)| c.clone()).collect();
        match self.store.commit(&completions).await {
            Ok(outcomes) => {
                self.stats.commits.fetch_add(1, AtomicOrdering::Relaxed);
                self.stats
                    .store_unavailable
                    .store(false, AtomicOrdering::Relaxed);
                self.store_backoff = Duration::ZERO;
                for outcome in &outcomes {
                    match outcome {
                        crate::store::CommitOutcome::Committed => &self.stats.committed,
                        crate::store::CommitOutcome::Duplicate => &self.stats.duplicates,
                    }
                    .fetch_add(1, AtomicOrdering::Relaxed);
                }
                let slots: Vec<u64> = self.batch.drain(..).map(|(slot, _)| slot).collect();
                self.batch_started = None;
                for slot in slots {
                    self.release(slot);
                }
            }
            Err(e) => {
                // The host's fault: keep the batch, stop dispatching, retry after a backoff.
                self.stats
                    .store_unavailable
                    .store(true, AtomicOrdering::Relaxed);
                self.store_backoff = (self.store_backoff * 2)
                    .clamp(Duration::from_millis(100), Duration::from_secs(5));
                self.batch_started = Some(Instant::now());
                tracing::warn!(binding = %self.binding_id, error = %e, backoff = ?self.store_backoff, "group commit failed; will retry");
            }
        }
    }

    /// A message is done: free its key, complete its offset, store the new watermark.
    fn release(&mut self, slot: u64) {
        let Some(ticket) = self.tickets.remove(&slot) else {
            return;
        };
        let pending = self.scheduler.finish(ticket);
        if self.offsets.complete(pending.part, pending.offset).is_err() {
            return; // the partition was revoked meanwhile
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in self.offsets.take_committable() {
            if let Some(topic) = self.topics.get(topic as usize) {
                let _ = list.add_partition_offset(topic, partition, Offset::Offset(next));
            }
        }
        if list.count() > 0
            && let Err(e) = self.consumer.store_offsets(&list)
        {
            tracing::debug!(error = %e, "storing offsets");
        }
    }
}
