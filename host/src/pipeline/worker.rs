//! One binding at work: Kafka intake → key-ordered dispatch → invocation → group commit →
//! offsets. The first end-to-end path of the pipeline.
//!
//! Owns the binding's consumer (polled on a dedicated OS thread by [`super::intake`], so
//! librdkafka's rebalance callbacks may block for the drain without blocking the async
//! executor), the coordinator task that drives the pure core ([`KeyScheduler`],
//! [`PartitionOffsets`], [`RetryPolicy`](super::RetryPolicy)), the invocation tasks (a dispatch
//! round's messages shared over at most one task per runtime worker), and the group commit.
//! Knows nothing of SQL (it talks to [`Store`]) nor of how components are loaded (it is given
//! a [`HandlerSlot`] of compiled [`HandlerPool`](crate::runtime::HandlerPool)s).
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
//! Hot swap (SEMANTICS §4): the worker runs whatever version is in its [`HandlerSlot`]. Each
//! invocation takes the slot's version when it is dispatched (one atomic load while nothing
//! changed) and keeps it to its end, so swapping a version in affects the next message, and
//! only that: the consumer, its assignment, queued messages and retries carry on (a retry is a
//! new invocation, on the version active then). A DLQ entry records the version that failed.
//!
//! DLQ replay (SEMANTICS §3): every [`REPLAY_CLAIM_EVERY`] the worker claims, with a lease of
//! [`REPLAY_LEASE`], up to [`REPLAY_CLAIM_BATCH`] entries queued for replay to its binding
//! ([`Store::dlq_claim_replays`]) and runs each as a message: the original topic, partition,
//! offset, key, payload, headers and message id, attempt 1, in the lane of its key on its
//! original partition (behind that key's queued live messages), retried per the policy. Its
//! completion carries the entry's id, so the group commit that commits its effects — or finds
//! them already committed, its processed key absorbing a replay that runs twice — marks the
//! entry replayed; on its final failure it is dead-lettered again, which files the same entry
//! as pending. Its offset is neither tracked nor stored: it is not a record of the assignment.
//! The claim asks only for replays of the partitions the worker holds (and of topics the
//! binding no longer reads, which any worker runs), so with several replicas each claims its
//! own. One whose partition was revoked between the claim and its run is dropped and left to
//! its lease, after which the worker holding the partition claims it. A failed claim is a
//! fault of the host: logged, tried at the next tick.
//!
//! The binding's circuit breaker (SEMANTICS §3, [`super::breaker`]): every outcome of a handler
//! is recorded — a retryable error or a deadline as a failure, a permanent error, refusal or
//! other trap as neutral (the message's own fault), a success as a success; faults of the host
//! not at all. When it opens, the worker pauses its partitions through a [`PauseSwitch`] of its
//! own (the intake pauses partitions assigned later too) and stops dispatching. A message whose
//! retryable failure finds the breaker open, or opens it, is *parked*: it keeps its ticket (its
//! key waits), its attempt does not advance, and it is never dead-lettered for it; messages
//! already queued wait too. Half-open, dispatch lets through the probes the breaker admits,
//! parked messages first (the partitions stay paused unless there is nothing to probe with);
//! closed, every parked message runs again and the partitions resume. Revocation and shutdown
//! let parked messages go uncommitted (their offsets are not stored; they are delivered again),
//! so neither waits for the breaker. Shared state: a worker writes its own openings and
//! closings ([`Store::breaker_set`]) and every [`BREAKER_SYNC_EVERY`] reads the binding's row
//! ([`Store::breaker_get`]), following a revision it has not seen — another replica's breaker,
//! or an operator's reset or force-open — so every replica pauses together. No replay is
//! claimed while the breaker is not closed.
//!
//! Metrics ([`crate::metrics`]): the binding's handles are resolved once in [`Worker::run`]; the
//! coordinator counts consumed, committed, duplicate, retried and dead-lettered messages, group
//! commits and their size, the end-to-end latency at the commit, in-flight invocations and the
//! breaker's state; the invocation task the duration and the failure kinds; librdkafka's
//! statistics (every 5 s) the consumer lag.
//!
//! The tenant's rate limit (SEMANTICS §3, [`super::rate_limit`]): every binding of a tenant on
//! this host shares the tenant's [`TenantLimiter`]. Dispatch takes a token before it starts a
//! message from the queue (a message, not an attempt: retries, parked messages and reruns after
//! a host fault take none); when the bucket is empty, dispatch stops for this binding until the
//! instant the bucket names — a timer in the coordinator's select, nothing held meanwhile — the
//! queue fills, and the intake pauses by the usual backpressure. Nothing is dropped, and only
//! this tenant's bindings wait. Waits are counted per tenant
//! (`weir_rate_limit_waits_total`, `weir_rate_limit_wait_seconds_total`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::binding::BindingSpec;
use super::breaker::{
    Admission, Breaker, BreakerState, Outcome as BreakerOutcome, ProbeToken, Shared, Transition,
};
use super::dispatch::{KeyScheduler, Ticket};
use super::handler::{HandlerReader, HandlerSlot};
use super::intake::{
    Batch, Control, ErrorReport, GiveBack, IntakeContext, PauseSwitch, intake_loop,
};
use super::offsets::PartitionOffsets;
use super::rate_limit::TenantLimiter;
use super::retry::{Decision, FailureKind, JitterRng};
use super::slots::Slots;
use super::trace::TraceContext;
use crate::config::PipelineConfig;
use crate::metrics::{BindingMetrics, Metrics};
use crate::outbound::HttpGate;
use crate::runtime::{
    ContentHash, ErrorKind, Header, Invocation, InvocationContext, LogSource, Message, Outcome,
    OutputTopics, StateSource, TrapKind,
};
use crate::store::{
    BreakerRecord, BreakerWrite, Completion, DlqEntry, DlqEntryInsert, DlqErrorKind, OutboxInsert,
    ReplayScope, Store, StoreError,
};

/// Consumer session timeout when the caller sets none: librdkafka's default, 45 s, longer than
/// the default drain deadline (20 s).
const DEFAULT_SESSION_TIMEOUT_MS: &str = "45000";

/// How often librdkafka reports its statistics, from which the consumer lag gauge is set, when
/// the caller sets no `statistics.interval.ms`: 5 s.
const LAG_SAMPLE_EVERY_MS: &str = "5000";

/// Batches waiting between the intake thread and the coordinator, at most.
const INTAKE_BATCHES: usize = 4;

/// Group commits a binding with per-key ordering on one topic runs at once, each on its own
/// store connection: two keep the store busy while the coordinator handles the other's outcome.
/// A key is held until its message's commit, so the two batches share no key (unless a producer
/// spread one key over several partitions, or a DLQ replay runs beside a live message of its
/// key: then PostgreSQL may report a deadlock between them, and the failed batch is retried
/// after its backoff; its effects still commit once). Offsets are stored as the commits
/// complete, in any order. Other bindings run one commit at a time.
const COMMITS_IN_FLIGHT: usize = 2;

/// How long librdkafka waits before fetching again for a partition whose local queue was over
/// its thresholds (librdkafka's default: 1 000 ms). See [`consumer_config`].
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// Reports (invocations done, commits done) the coordinator takes from its channel at once.
const DONES_PER_TURN: usize = 256;

/// How long a task running a share of invocations runs before it yields to the runtime.
const SHARE_SLICE: Duration = Duration::from_micros(500);

/// Wait before running a message again after a fault of the host (not the handler): 1 s.
const HOST_FAULT_BACKOFF: Duration = Duration::from_secs(1);

/// How often the worker looks for DLQ entries queued for replay to its binding: 1 s, so a
/// replay starts about a second after it was asked for.
pub const REPLAY_CLAIM_EVERY: Duration = Duration::from_secs(1);

/// DLQ entries claimed at once, at most (fewer when the worker has less room).
pub const REPLAY_CLAIM_BATCH: u32 = 64;

/// How long a claimed replay is this worker's: 60 s, far longer than a message takes with its
/// retries (1 s + 2 s + 5 s by default). A replay the worker could not finish (it crashed, lost
/// the partition, or the entry's partition is not assigned to it) is claimable again after it.
pub const REPLAY_LEASE: Duration = Duration::from_secs(60);

/// How often the worker reads its binding's shared breaker state (and retries a failed write):
/// 1 s, so every replica pauses within about a second of the one whose breaker opened.
pub const BREAKER_SYNC_EVERY: Duration = Duration::from_secs(1);

/// The topic index given to replays of a topic the binding no longer reads: a lane of their
/// own, never revoked.
const FORMER_TOPIC: u16 = u16::MAX;

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
    /// Outbound HTTP may reach internal addresses (`pipeline.http_allow_private_networks`).
    pub http_allow_private_networks: bool,
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
            http_allow_private_networks: config.http_allow_private_networks,
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
    /// Partitions assigned now (added on assignment, removed on revocation).
    pub partitions: AtomicU64,
    /// DLQ entries claimed for replay.
    pub replays_claimed: AtomicU64,
    /// Replays whose group commit marked their DLQ entry replayed (their effects committed, or
    /// found already committed).
    pub replayed: AtomicU64,
    /// Handler versions swapped in while running (hot swaps seen by dispatch).
    pub handler_swaps: AtomicU64,
    /// Times the breaker opened (by this worker's failures, a replica's or an operator's).
    pub breaker_opened: AtomicU64,
    /// Times the breaker half-opened.
    pub breaker_half_opened: AtomicU64,
    /// Times the breaker closed (by probes, a replica or a reset).
    pub breaker_closed: AtomicU64,
    /// Whether the breaker is open or half-open now.
    pub breaker_open: AtomicBool,
    /// Failures that parked their message for the breaker (no attempt spent, no DLQ).
    pub parked: AtomicU64,
    /// Whether [`Self::kafka_error`] holds an error (read on the intake's path without a lock).
    kafka_error_set: AtomicBool,
    /// The last access error the binding's consumer met — its credentials refused, or an ACL
    /// missing for its topics or group — until partitions are assigned or records arrive.
    kafka_error: std::sync::Mutex<Option<String>>,
}

impl WorkerStats {
    /// The consumer's last access error, while it lasts (see [`super::intake`]).
    pub fn kafka_error(&self) -> Option<String> {
        self.kafka_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Record an access error of the consumer.
    pub fn set_kafka_error(&self, error: String) {
        *self
            .kafka_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
        self.kafka_error_set.store(true, AtomicOrdering::Release);
    }

    /// Forget the consumer's access error: it was granted what it lacked.
    pub fn clear_kafka_error(&self) {
        if self.kafka_error_set.load(AtomicOrdering::Relaxed)
            && self.kafka_error_set.swap(false, AtomicOrdering::AcqRel)
        {
            *self
                .kafka_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }
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
    /// The handler's active version, pooled, and its number (recorded in DLQ entries). Swapped
    /// from outside while the worker runs: every invocation dispatched afterwards runs the new
    /// version (hot swap, see [`HandlerSlot`]).
    pub handler: HandlerSlot,
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
    /// The host's metrics (the worker resolves its binding's handles at start); without them
    /// the worker counts on a registry of its own.
    pub metrics: Option<Arc<Metrics>>,
    /// The tenant's rate limit on this host, shared with its other bindings here; none:
    /// unlimited.
    pub rate_limit: Option<Arc<TenantLimiter>>,
}

/// Topic index and partition: the unit of ordering and offsets.
type Part = (u16, i32);

/// A message in the coordinator's hands: a Kafka record of the assignment, or a replay.
struct Pending {
    message: Arc<Message>,
    part: Part,
    offset: i64,
    first_failure: Option<chrono::DateTime<Utc>>,
    /// The DLQ entry this message replays. A replay's offset is not tracked nor stored: it is
    /// not a record of the current assignment.
    replay_of: Option<i64>,
}

/// What a task of the coordinator (an invocation, a wait, a store call) reports.
enum Done {
    /// Handled: commit these effects.
    Success(u64, Completion),
    /// A group commit finished: the slots and completions it carried, and how it went.
    Committed {
        /// The commit's number, in start order.
        seq: u64,
        slots: Vec<u64>,
        completions: Vec<Completion>,
        result: Result<Vec<crate::store::CommitOutcome>, StoreError>,
    },
    /// Failed; the retry policy decides.
    Failed {
        slot: u64,
        kind: FailureKind,
        dlq_kind: DlqErrorKind,
        message: String,
        /// The handler version that failed.
        version: Option<i32>,
    },
    /// The host failed, not the handler (the state store could not be read, no instance could
    /// be created): run it again later without spending an attempt. Never dead-lettered.
    HostFault { slot: u64, error: String },
    /// A wait is over: run the message again, as its next attempt or (after a host fault) the
    /// same one.
    Rerun { slot: u64, next_attempt: bool },
    /// Dead-lettered (stored and queued for the DLQ topic).
    DeadLettered(u64),
    /// DLQ entries claimed for replay (or why none could be).
    Claimed(Result<Vec<DlqEntry>, StoreError>),
    /// The shared breaker state was read (or why it could not be).
    BreakerRead(Result<Option<BreakerRecord>, StoreError>),
    /// This worker's breaker state was shared (or why it could not be).
    BreakerWritten(Result<BreakerRecord, StoreError>),
}

/// Reads keyed state from the store, for one invocation, remembering whether a read failed (a
/// handler that then fails failed because of the host). A read the invocation's deadline cut
/// off — its future dropped while the store had not answered, as when the database is down and
/// the pool waits for a connection longer than the deadline — counts as failed too: the
/// handler was waiting for the host, so its deadline trap is the host's fault, not a failure
/// that spends an attempt or counts towards the breaker.
///
/// A read that the store answers late counts too: if the invocation then runs out of time
/// having spent at least half of it waiting for the store (a read that waited for a connection
/// until the database came back), the deadline is the host's fault as well.
struct StoreState {
    store: Arc<dyn Store>,
    /// (tenant, handler), shared by every invocation of the binding.
    owner: Arc<(Arc<str>, Arc<str>)>,
    failed: AtomicBool,
    /// Time spent waiting for the store's answers, microseconds.
    waited_us: AtomicU64,
}

impl StoreState {
    /// Whether the invocation's `outcome` (after `duration`) is the host's fault: a read
    /// failed or was abandoned, or the deadline ran out while it mostly waited for the store.
    fn host_fault(&self, outcome: &Outcome, duration: Duration) -> bool {
        if outcome.is_ok() {
            return false;
        }
        if self.failed.load(AtomicOrdering::Relaxed) {
            return true;
        }
        let deadline = matches!(
            outcome,
            Outcome::Trap {
                kind: TrapKind::Deadline,
                ..
            }
        );
        let waited = Duration::from_micros(self.waited_us.load(AtomicOrdering::Relaxed));
        deadline && waited * 2 >= duration
    }
}

impl StateSource for StoreState {
    fn get<'a>(
        &'a self,
        key: &'a [u8],
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            let unanswered = FailUnlessAnswered(Some(&self.failed));
            let started = Instant::now();
            let read = self
                .store
                .state_get(&self.owner.0, &self.owner.1, key, name)
                .await;
            let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.waited_us.fetch_add(waited, AtomicOrdering::Relaxed);
            unanswered.answered();
            read.map_err(|e| {
                self.failed.store(true, AtomicOrdering::Relaxed);
                e.to_string()
            })
        })
    }
}

/// Sets its flag when dropped before [`Self::answered`]: a store read abandoned half-way.
struct FailUnlessAnswered<'a>(Option<&'a AtomicBool>);

impl FailUnlessAnswered<'_> {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for FailUnlessAnswered<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(true, AtomicOrdering::Relaxed);
        }
    }
}

/// The id of a message: its `message-id` header, else `topic/partition/offset`.
pub fn message_id(topic: &str, partition: i32, offset: i64, headers: &[Header]) -> String {
    let mut id = String::new();
    write_message_id(&mut id, topic, partition, offset, headers);
    id
}

/// Append [`message_id`] to `id` (a buffer reused from message to message).
pub fn write_message_id(
    id: &mut String,
    topic: &str,
    partition: i32,
    offset: i64,
    headers: &[Header],
) {
    if let Some(header) = headers
        .iter()
        .find(|h| h.key == "message-id")
        .and_then(|h| std::str::from_utf8(&h.value).ok())
        .filter(|id| !id.is_empty())
    {
        id.push_str(header);
        return;
    }
    // Written by hand, once per message: `format!` cost 3 % of the host's CPU here, most of it
    // growing the string as it went.
    let (mut partition_digits, mut offset_digits) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (partition, offset) = (
        partition_digits.format(partition),
        offset_digits.format(offset),
    );
    id.reserve(topic.len() + partition.len() + offset.len() + 2);
    id.push_str(topic);
    id.push('/');
    id.push_str(partition);
    id.push('/');
    id.push_str(offset);
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
        let metrics = match &self.metrics {
            Some(metrics) => {
                metrics.binding(&self.spec.tenant, &self.spec.handler, &self.binding_id)
            }
            None => {
                BindingMetrics::detached(&self.spec.tenant, &self.spec.handler, &self.binding_id)
            }
        };
        let context = IntakeContext::new(control_tx, self.settings.drain_deadline)
            .with_lag(metrics.lag.clone())
            .with_errors(ErrorReport::new(
                &self.binding_id,
                &self.spec.topics,
                &self.spec.group_id(),
                self.stats.clone(),
            ));
        let config = consumer_config(&self.kafka, &self.spec.group_id());
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
        // The breaker's own switch: an operator's pause (`self.pause`) is not undone when the
        // breaker closes.
        let breaker_pause = PauseSwitch::default();
        let (spent_tx, spent) = std::sync::mpsc::channel();
        let intake = {
            let consumer = consumer.clone();
            let stop = stop_intake.clone();
            let stats = self.stats.clone();
            let switches = [self.pause.clone(), breaker_pause.clone()];
            let runtime = tokio::runtime::Handle::current();
            let binding = self.binding_id.clone();
            std::thread::Builder::new()
                .name(format!("weir-intake-{binding}"))
                .spawn(move || {
                    intake_loop(
                        &consumer,
                        &batches_tx,
                        &runtime,
                        &stop,
                        &switches,
                        &stats,
                        &spent,
                    )
                })
                .map_err(|e| consumer_error(format!("cannot start the intake thread: {e}")))?
        };

        let mut coordinator =
            Coordinator::new(&self, consumer.clone(), breaker_pause, metrics, spent_tx);
        // Reports are taken from the channel in runs: the bookkeeping after them (commit,
        // replays, breaker, dispatch) then runs once per run, not once per message.
        let mut dones: Vec<Done> = Vec::with_capacity(DONES_PER_TURN);
        // Two timers for the whole loop, moved only when their deadline changes: a fresh
        // `Sleep` per turn would register with and leave the timer wheel once per message.
        let mut linger_timer = Timer::new();
        let mut wake_timer = Timer::new();
        loop {
            let linger = coordinator.commit_deadline();
            linger_timer.set(linger);
            wake_timer.set(Some(coordinator.next_wake()));
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                Some(event) = control.recv() => coordinator.on_control(event).await,
                _ = coordinator.done_rx.recv_many(&mut dones, DONES_PER_TURN) => {
                    for done in dones.drain(..) {
                        coordinator.on_done(done).await;
                    }
                }
                batch = batches.recv(), if coordinator.has_room() => match batch {
                    Some(batch) => coordinator.on_batch(batch),
                    None => break,
                },
                () = linger_timer.wait(), if linger.is_some() => coordinator.start_commit(),
                () = wake_timer.wait() => {}
            }
            // Commit at once when the batch is full, or when no invocation is running that
            // could still join it (waiting out the linger would only add latency). While a
            // commit is in flight the next batch gathers; it starts when that one is done.
            if coordinator.commits_in_flight < coordinator.commit_limit()
                && !coordinator.batch.is_empty()
                && coordinator.store_backoff.is_zero()
                && (coordinator.batch.len() >= self.settings.commit_batch_max
                    || coordinator.running == 0)
            {
                coordinator.start_commit();
            }
            // Checked on every turn, not only when its timer wins the select: a busy worker
            // still claims its replays.
            coordinator.claim_replays();
            coordinator.sync_breaker();
            coordinator.dispatch();
            coordinator.check_drain().await;
        }

        // Shutdown: let in-flight work finish (bounded), commit, store offsets, then stop intake.
        // Messages parked for the breaker are let go: not committed, their offsets not stored,
        // they are delivered again.
        coordinator.stopping = true;
        coordinator.abandon_parked(|_| true);
        let deadline = Instant::now() + self.settings.drain_deadline;
        while coordinator.scheduler.outstanding() > 0 && Instant::now() < deadline {
            tokio::select! {
                Some(done) = coordinator.done_rx.recv() => coordinator.on_done(done).await,
                _ = tokio::time::sleep(self.settings.commit_linger) => coordinator.start_commit(),
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

/// The binding's consumer configuration: the host's client settings, the group, and what the
/// pipeline relies on (offsets stored by the coordinator only, eager rebalancing), plus
/// defaults of Weir's own where the operator set none.
fn consumer_config(kafka: &ClientConfig, group_id: &str) -> ClientConfig {
    let mut config = kafka.clone();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Eager rebalancing: a revocation takes every partition, and the drain in `Worker::run`
        // is written for that. The cooperative protocol is not supported.
        .set("partition.assignment.strategy", "range,roundrobin");
    let defaults = [
        ("session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS),
        // librdkafka stops fetching a partition for this long once its local queue is over the
        // thresholds, which happens whenever the pipeline is behind: with its default (1 s) the
        // queue then runs dry and the binding idles for most of a second.
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS),
        // The consumer lag gauge is sampled from these, on the intake thread.
        ("statistics.interval.ms", LAG_SAMPLE_EVERY_MS),
    ];
    for (name, value) in defaults {
        if config.get(name).is_none() {
            config.set(name, value);
        }
    }
    config
}

/// A timer the coordinator keeps for its whole run: re-armed only when its deadline changes.
struct Timer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    deadline: Option<Instant>,
}

impl Timer {
    fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            deadline: None,
        }
    }

    /// Fire at `deadline`; never, for `None`.
    fn set(&mut self, deadline: Option<Instant>) {
        if deadline != self.deadline {
            self.deadline = deadline;
            if let Some(deadline) = deadline {
                self.sleep.as_mut().reset(deadline.into());
            }
        }
    }

    /// Wait for the deadline (forever without one).
    async fn wait(&mut self) {
        match self.deadline {
            Some(_) => self.sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

struct Coordinator {
    /// Shared with every completion of the binding.
    binding_id: Arc<str>,
    spec: Arc<BindingSpec>,
    topics: Vec<String>,
    handler: HandlerReader,
    /// The handler version the last dispatch ran, to count and log swaps.
    handler_version: Option<i32>,
    store: Arc<dyn Store>,
    consumer: Arc<BaseConsumer<IntakeContext>>,
    settings: WorkerSettings,
    stats: Arc<WorkerStats>,
    /// The binding's metric handles.
    metrics: Arc<BindingMetrics>,
    /// (tenant, handler) of the binding, for the keyed-state reads and the completions of every
    /// invocation.
    owner: Arc<(Arc<str>, Arc<str>)>,
    context: InvocationContext,
    scheduler: KeyScheduler<Pending, Part>,
    offsets: PartitionOffsets<Part>,
    /// The dispatched messages' tickets, by slot: a slot names a message from dispatch to done.
    tickets: Slots<Ticket<Pending, Part>>,
    /// The slots a dispatch round starts (kept for its capacity).
    starting: Vec<u64>,
    /// Worker threads of the runtime: the most tasks a dispatch round's invocations run on.
    workers: usize,
    batch: Vec<(u64, Completion)>,
    batch_started: Option<Instant>,
    /// Hands messages done with back to the intake for reuse.
    spent: GiveBack,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    jitter: JitterRng,
    /// A revocation in progress: its acknowledgement, deadline and partitions.
    draining: Option<(std::sync::mpsc::SyncSender<()>, Instant, Vec<Part>)>,
    store_backoff: Duration,
    /// The intake generation of the current assignment; older batches are dropped.
    generation: u64,
    /// Invocations started whose outcome has not arrived yet.
    running: usize,
    /// Whether a group commit is in flight (at most one at a time).
    commits_in_flight: usize,
    /// Commits started so far (numbers them).
    commit_seq: u64,
    /// When a commit last failed, the number of the last commit started by then; cleared when
    /// a commit started after the failure succeeds.
    failed_commit: Option<u64>,
    /// DLQ entries claimed for replay and not yet done here (so a claim that returns one again,
    /// after its lease ran out while it waited, does not queue it twice).
    replays: HashSet<i64>,
    /// When to look for replays next.
    next_claim: Instant,
    /// A claim is running.
    claiming: bool,
    /// The last claim failed (logged once until one succeeds).
    claim_failing: bool,
    /// The binding's circuit breaker.
    breaker: Breaker,
    /// Pauses the intake while the breaker is open.
    breaker_pause: PauseSwitch,
    /// Messages whose failure found the breaker open (or opened it), in the order they failed:
    /// they keep their ticket (their key waits) and run again, on the same attempt, as probes
    /// or once it closed.
    parked: VecDeque<u64>,
    /// Slots running as half-open probes.
    probes: HashMap<u64, ProbeToken>,
    /// The breaker changed here and the store does not know yet.
    breaker_dirty: bool,
    /// A read or write of the shared breaker state is running.
    breaker_syncing: bool,
    /// The highest shared breaker revision seen (read or written).
    breaker_seen: i64,
    /// When to read the shared breaker state next.
    next_breaker_sync: Instant,
    /// The last write of the shared breaker state failed: the next waits for the next sync.
    breaker_write_failed: bool,
    /// The worker is shutting down: parked messages are let go at once.
    stopping: bool,
    /// The tenant's token bucket on this host.
    rate_limit: Option<Arc<TenantLimiter>>,
    /// The tenant's bucket was empty: dispatch of queued messages waits until then.
    rate_wait_until: Option<Instant>,
    /// Since when dispatch has been waiting for the bucket (for the wait-time metric).
    rate_waiting_since: Option<Instant>,
}

/// Run a share of the invocations [`Coordinator::start`] started, concurrently (one waiting in
/// a host call does not hold up the others). Yields to the runtime once it has run for
/// [`SHARE_SLICE`] without a pause, so that a share of slow handlers cannot keep the coordinator
/// or other bindings from a worker for longer than one invocation.
async fn run_share<F: Future<Output = ()>>(mut share: FuturesUnordered<F>) {
    let mut slice = Instant::now();
    while share.next().await.is_some() {
        if slice.elapsed() >= SHARE_SLICE {
            tokio::task::yield_now().await;
            slice = Instant::now();
        }
    }
}

/// Write the handler's log lines (its `log` import, stdout, stderr) to the host's log, inside
/// the message's span (target `weir::handler`), so they carry the tenant, binding, message and
/// trace.
/// The span of one message (target `weir::message`) and, when it is recorded, the trace context
/// it continues, its ids recorded on it.
fn message_span(
    spec: &BindingSpec,
    binding_id: &str,
    message: &Message,
) -> (tracing::Span, Option<TraceContext>) {
    let span = tracing::info_span!(
        target: "weir::message",
        "message",
        tenant = %spec.tenant,
        handler = %spec.handler,
        binding = %binding_id,
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        message_id = %message.id,
        attempt = message.attempt,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    // With OTLP export on, the exported span continues the record's trace and its ids are the
    // ones the emitted records name.
    let trace = (!span.is_disabled()).then(|| {
        let trace = crate::telemetry::link(&span, TraceContext::for_message(binding_id, message));
        span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
        span.record("span_id", tracing::field::display(trace.span_id_hex()));
        trace
    });
    (span, trace)
}

fn log_handler_lines(invocation: &Invocation) {
    use crate::runtime::LogLevel;
    for line in &invocation.logs {
        let source = match line.source {
            LogSource::Log => "log",
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
        };
        let fields = FieldsText(&line.fields);
        // Control characters escaped: a handler must not be able to forge host log lines.
        let text = Escaped(&line.message);
        match line.level {
            LogLevel::Trace => {
                tracing::trace!(target: "weir::handler", source, fields = %fields, "{text}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "weir::handler", source, fields = %fields, "{text}")
            }
            LogLevel::Info => {
                tracing::info!(target: "weir::handler", source, fields = %fields, "{text}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "weir::handler", source, fields = %fields, "{text}")
            }
            LogLevel::Error => {
                tracing::error!(target: "weir::handler", source, fields = %fields, "{text}")
            }
        }
    }
    if invocation.logs_dropped > 0 {
        tracing::warn!(target: "weir::handler", dropped = invocation.logs_dropped, "handler log lines over the per-invocation limit were dropped");
    }
}

/// A handler log line's fields as `name=value` pairs, formatted only if the line is written.
struct FieldsText<'a>(&'a [(String, String)]);

impl std::fmt::Display for FieldsText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}={value:?}", Escaped(name))?;
        }
        Ok(())
    }
}

/// Text with its control characters (newlines included) escaped.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// The binding's outbound-HTTP gate, if its policy grants any (the spec was validated, so
/// building it does not fail; if it did, every request would be refused and the reason logged).
fn http_gate(
    binding: &str,
    spec: &BindingSpec,
    metrics: Option<&Metrics>,
    allow_private_networks: bool,
) -> Option<Arc<HttpGate>> {
    let policy = spec.http.as_ref()?;
    let detached;
    let metrics: &Metrics = match metrics {
        Some(metrics) => metrics,
        None => {
            detached = Metrics::new();
            &detached
        }
    };
    let handles = metrics.http(binding, &policy.allow);
    match HttpGate::new(binding, policy.clone(), handles) {
        Ok(gate) => Some(Arc::new(
            gate.allowing_private_networks(allow_private_networks),
        )),
        Err(e) => {
            tracing::error!(%binding, error = %e, "outbound HTTP policy refused; every request of the handler will be denied");
            None
        }
    }
}

impl Coordinator {
    fn new(
        worker: &Worker,
        consumer: Arc<BaseConsumer<IntakeContext>>,
        breaker_pause: PauseSwitch,
        metrics: BindingMetrics,
        spent: GiveBack,
    ) -> Self {
        let spec = Arc::new(worker.spec.clone());
        let context = InvocationContext {
            config: Arc::new(spec.config.clone().into_iter().collect::<BTreeMap<_, _>>()),
            output_topics: OutputTopics::Only(Arc::new(
                spec.output_topics.iter().cloned().collect(),
            )),
            // Replaced per invocation by a fresh `StoreState` (see `Coordinator::invocation`).
            state: Arc::new(crate::runtime::MemoryState::new()),
            deadline: spec.deadline_ms.map(Duration::from_millis),
            http: http_gate(
                &worker.binding_id,
                &spec,
                worker.metrics.as_deref(),
                worker.settings.http_allow_private_networks,
            ),
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            binding_id: worker.binding_id.as_str().into(),
            topics: spec.topics.clone(),
            scheduler: KeyScheduler::new(spec.ordering, spec.max_in_flight()),
            spec,
            handler: worker.handler.reader(),
            handler_version: worker.handler.current().version,
            store: worker.store.clone(),
            consumer,
            settings: worker.settings.clone(),
            stats: worker.stats.clone(),
            metrics: Arc::new(metrics),
            owner: Arc::new((
                worker.spec.tenant.as_str().into(),
                worker.spec.handler.as_str().into(),
            )),
            context,
            offsets: PartitionOffsets::default(),
            tickets: Slots::default(),
            starting: Vec::new(),
            workers: tokio::runtime::Handle::current()
                .metrics()
                .num_workers()
                .max(1),
            batch: Vec::new(),
            batch_started: None,
            spent,
            done_tx,
            done_rx,
            jitter: JitterRng::from_entropy(),
            draining: None,
            store_backoff: Duration::ZERO,
            generation: 0,
            running: 0,
            commits_in_flight: 0,
            commit_seq: 0,
            failed_commit: None,
            replays: HashSet::new(),
            next_claim: Instant::now() + REPLAY_CLAIM_EVERY,
            claiming: false,
            claim_failing: false,
            breaker: Breaker::new(worker.spec.breaker),
            breaker_pause,
            parked: VecDeque::new(),
            probes: HashMap::new(),
            breaker_dirty: false,
            breaker_syncing: false,
            breaker_seen: 0,
            // At once: a worker starting while the binding's breaker is open pauses.
            next_breaker_sync: Instant::now(),
            breaker_write_failed: false,
            stopping: false,
            rate_limit: worker.rate_limit.clone(),
            rate_wait_until: None,
            rate_waiting_since: None,
        }
    }

    /// Group commits this binding may run at once (see [`COMMITS_IN_FLIGHT`]).
    fn commit_limit(&self) -> usize {
        if self.spec.ordering == super::dispatch::Ordering::Key && self.topics.len() == 1 {
            COMMITS_IN_FLIGHT
        } else {
            1
        }
    }

    fn has_room(&self) -> bool {
        self.draining.is_none() && self.scheduler.len() < self.settings.max_pending
    }

    fn commit_deadline(&self) -> Option<Instant> {
        if self.commits_in_flight >= self.commit_limit() {
            return None;
        }
        self.batch_started
            .map(|started| started + self.settings.commit_linger + self.store_backoff)
    }

    fn topic_index(&self, topic: &str) -> u16 {
        if self.topics.len() == 1 {
            return 0;
        }
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
        let mut consumed = 0;
        for mut message in batch.messages {
            // The handle is the only one: this writes in place (into a reused buffer).
            Arc::make_mut(&mut message)
                .tenant
                .clone_from(&self.spec.tenant);
            let part = (self.topic_index(&message.topic), message.partition as i32);
            let offset = message.offset as i64;
            if let Err(e) = self.offsets.track(part, offset) {
                tracing::debug!(error = %e, "offset not tracked (redelivery after a rebalance)");
                continue;
            }
            consumed += 1;
            // A second handle on the message lends the scheduler its key: no copy of it.
            let keyed = message.clone();
            let pending = Pending {
                message,
                part,
                offset,
                first_failure: None,
                replay_of: None,
            };
            self.scheduler.push(part, keyed.key.as_deref(), pending);
        }
        self.metrics.consumed.inc_by(consumed);
    }

    async fn on_control(&mut self, event: Control) {
        match event {
            Control::Assign(parts, generation) => {
                self.generation = generation;
                self.stats.assignments.fetch_add(1, AtomicOrdering::Relaxed);
                self.stats
                    .partitions
                    .fetch_add(parts.len() as u64, AtomicOrdering::Relaxed);
                tracing::info!(binding = %self.binding_id, partitions = parts.len(), generation, "partitions assigned");
                for (topic, partition) in parts {
                    let part = (self.topic_index(&topic), partition);
                    self.offsets.assign(part);
                }
            }
            Control::Revoke(parts, generation, ack) => {
                self.generation = generation;
                let revoked = parts.len() as u64;
                let _ = self.stats.partitions.fetch_update(
                    AtomicOrdering::Relaxed,
                    AtomicOrdering::Relaxed,
                    |n| Some(n.saturating_sub(revoked)),
                );
                for (topic, partition) in &parts {
                    let part = (self.topic_index(topic), *partition);
                    let dropped = self.scheduler.revoke(part);
                    // Queued replays of the partition are let go: their lease runs out and a
                    // worker holding the partition claims them again.
                    let replays = dropped
                        .iter()
                        .filter_map(|pending| pending.replay_of)
                        .inspect(|id| {
                            self.replays.remove(id);
                        })
                        .count();
                    tracing::debug!(binding = %self.binding_id, topic, partition, dropped = dropped.len(), replays, "partition revoked");
                }
                let parts: Vec<Part> = parts
                    .iter()
                    .map(|(topic, partition)| (self.topic_index(topic), *partition))
                    .collect();
                // Parked messages would hold the drain until its deadline: let them go, the
                // partition's next owner gets them.
                self.abandon_parked(|part| parts.contains(&part));
                self.flush().await;
                self.draining = Some((ack, Instant::now() + self.settings.drain_deadline, parts));
                self.check_drain().await;
            }
        }
    }

    /// Every [`REPLAY_CLAIM_EVERY`], claim the DLQ entries queued for replay to this binding
    /// (at most [`REPLAY_CLAIM_BATCH`], and no more than there is room for), off the
    /// coordinator: the answer comes back as [`Done::Claimed`]. Not while a revocation drains,
    /// nor before the worker holds a partition.
    fn claim_replays(&mut self) {
        let now = Instant::now();
        if now < self.next_claim {
            return;
        }
        self.next_claim = now + REPLAY_CLAIM_EVERY;
        // An idle worker lets go of a replaced handler version here, not at its next message.
        let _ = self.handler.get();
        let room = self
            .settings
            .max_pending
            .saturating_sub(self.scheduler.len());
        if self.claiming
            || self.draining.is_some()
            || self.breaker.state() != BreakerState::Closed
            || room == 0
            || self.offsets.partitions().next().is_none()
        {
            return;
        }
        self.claiming = true;
        let limit = REPLAY_CLAIM_BATCH.min(u32::try_from(room).unwrap_or(u32::MAX));
        // Only replays this worker can run: of its partitions, or of topics the binding no
        // longer reads. Another replica's are left to it, not leased here for nothing.
        let held: Vec<(String, i32)> = self
            .offsets
            .partitions()
            .filter_map(|(topic, partition)| {
                let topic = self.topics.get(usize::from(topic))?;
                Some((topic.clone(), partition))
            })
            .collect();
        let topics = self.topics.clone();
        let store = self.store.clone();
        let binding = self.binding_id.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let scope = ReplayScope::Held {
                topics: &topics,
                partitions: &held,
            };
            let claimed = store
                .dlq_claim_replays(&binding, scope, limit, REPLAY_LEASE)
                .await;
            let _ = done.send(Done::Claimed(claimed));
        });
    }

    /// Queue claimed replays: each in the lane of its key on its original partition, behind
    /// the live messages of that key already queued, so it is ordered with them like any other
    /// message. A replay whose partition this worker does not hold is left to its lease (the
    /// worker holding it claims it once the lease runs out), as is one the worker holds
    /// already. A failed claim is the host's fault: logged, tried again at the next tick.
    fn on_claimed(&mut self, claimed: Result<Vec<DlqEntry>, StoreError>) {
        self.claiming = false;
        let entries = match claimed {
            Ok(entries) => {
                self.claim_failing = false;
                entries
            }
            Err(e) => {
                if !self.claim_failing {
                    tracing::warn!(binding = %self.binding_id, error = %e, "cannot claim DLQ replays; will retry");
                }
                tracing::debug!(binding = %self.binding_id, error = %e, "cannot claim DLQ replays");
                self.claim_failing = true;
                return;
            }
        };
        if !entries.is_empty() {
            tracing::info!(binding = %self.binding_id, entries = entries.len(), "DLQ entries claimed for replay");
        }
        for entry in entries {
            self.stats
                .replays_claimed
                .fetch_add(1, AtomicOrdering::Relaxed);
            let Some(part) = self.replay_part(&entry.entry.topic, entry.entry.partition) else {
                tracing::info!(binding = %self.binding_id, entry = entry.id, topic = %entry.entry.topic, partition = entry.entry.partition, lease = ?REPLAY_LEASE, "replay of a partition not assigned here; left for the worker holding it");
                continue;
            };
            if !self.replays.insert(entry.id) {
                continue;
            }
            let DlqEntry { id, entry, .. } = entry;
            tracing::debug!(binding = %self.binding_id, entry = id, message_id = %entry.message_id, "replaying a DLQ entry");
            let message = Message {
                id: entry.message_id,
                topic: entry.topic,
                partition: entry.partition.max(0) as u32,
                offset: entry.offset.max(0) as u64,
                key: entry.key,
                payload: entry.payload,
                headers: entry.headers,
                timestamp_ms: entry.timestamp_ms,
                tenant: self.spec.tenant.clone(),
                attempt: 1,
            };
            let key = message.key.clone();
            let pending = Pending {
                message: Arc::new(message),
                part,
                offset: entry.offset,
                first_failure: None,
                replay_of: Some(id),
            };
            self.scheduler.push(part, key.as_deref(), pending);
        }
    }

    /// The lane partition of a replay of `topic`/`partition`: the partition itself when this
    /// worker holds it (and is not giving it up), none when it does not; a topic the binding no
    /// longer reads has lanes of its own.
    fn replay_part(&self, topic: &str, partition: i32) -> Option<Part> {
        let Some(index) = self.topics.iter().position(|t| t == topic) else {
            return Some((FORMER_TOPIC, partition));
        };
        let part = (index as u16, partition);
        let revoking = self
            .draining
            .as_ref()
            .is_some_and(|(_, _, parts)| parts.contains(&part));
        (self.offsets.get(part).is_some() && !revoking).then_some(part)
    }

    /// Finish a revocation once nothing is in flight (or the deadline passed).
    async fn check_drain(&mut self) {
        let Some((_, deadline, _)) = &self.draining else {
            return;
        };
        if self.scheduler.outstanding() > 0 && Instant::now() < *deadline {
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

    /// Start what may run: while the breaker is closed, parked messages and then every ready
    /// one; while half-open, as many probes as it admits (parked messages first); while open,
    /// nothing.
    fn dispatch(&mut self) {
        let mut slots = std::mem::take(&mut self.starting);
        self.select_ready(&mut slots);
        self.start(&slots);
        slots.clear();
        self.starting = slots;
    }

    /// Put in `slots` the messages that may start now (see [`Self::dispatch`]).
    fn select_ready(&mut self, slots: &mut Vec<u64>) {
        if self.draining.is_some() || self.store_backoff > Duration::ZERO {
            return;
        }
        let now = Instant::now();
        let polled = self.breaker.poll(now);
        self.on_breaker(polled, false);
        while let Some(&slot) = self.parked.front() {
            if !self.admit(slot, now) {
                return;
            }
            self.parked.pop_front();
            slots.push(slot);
        }
        loop {
            let admission = self.breaker.admit(now);
            if admission == Admission::Wait {
                return;
            }
            if self.scheduler.queued() == 0 || !self.take_token(now) {
                if let Admission::Probe(token) = admission {
                    self.breaker.cancel(token);
                    if self.probes.is_empty() && self.scheduler.queued() == 0 {
                        // Half-open with nothing to probe with: fetch the next messages.
                        self.breaker_pause.resume();
                    }
                }
                return;
            }
            let Some(ticket) = self.scheduler.next_ready() else {
                // Every queued message waits for its key: the token was taken for nothing.
                if let Some(limiter) = &self.rate_limit {
                    limiter.give_back();
                }
                if let Admission::Probe(token) = admission {
                    self.breaker.cancel(token);
                    if self.probes.is_empty() && self.scheduler.queued() == 0 {
                        // Half-open with nothing to probe with: fetch the next messages.
                        self.breaker_pause.resume();
                    }
                }
                return;
            };
            let slot = self.tickets.insert(ticket);
            if let Admission::Probe(token) = admission {
                self.probes.insert(slot, token);
            }
            slots.push(slot);
        }
    }

    /// Take a token of the tenant's bucket for the next queued message; without one, note when
    /// the bucket will have one (the coordinator wakes then) and whether this starts a wait.
    fn take_token(&mut self, now: Instant) -> bool {
        let Some(limiter) = &self.rate_limit else {
            return true;
        };
        if self.rate_wait_until.is_some_and(|until| now < until) {
            return false;
        }
        match limiter.try_take(now) {
            Ok(()) => {
                self.rate_wait_until = None;
                if let Some(since) = self.rate_waiting_since.take() {
                    let waited = now.saturating_duration_since(since).as_secs_f64();
                    self.metrics.rate_limit_wait_seconds.inc_by(waited);
                }
                true
            }
            Err(until) => {
                self.rate_wait_until = Some(until);
                if self.rate_waiting_since.is_none() {
                    self.rate_waiting_since = Some(now);
                    self.metrics.rate_limit_waits.inc();
                }
                false
            }
        }
    }

    /// Whether the message of `slot` may run now (as a probe, if half-open).
    fn admit(&mut self, slot: u64, now: Instant) -> bool {
        match self.breaker.admit(now) {
            Admission::Run => true,
            Admission::Probe(token) => {
                self.probes.insert(slot, token);
                true
            }
            Admission::Wait => false,
        }
    }

    /// Run the message of `slot` again when the breaker lets it (at once if it does now).
    fn rerun(&mut self, slot: u64) {
        if self.admit(slot, Instant::now()) {
            self.start(&[slot]);
        } else {
            self.park(slot);
        }
    }

    /// Hold the message of `slot` until the breaker lets it run: its ticket (and key) kept, no
    /// attempt spent. Let go at once while shutting down or while its partition is revoked.
    fn park(&mut self, slot: u64) {
        self.parked.push_back(slot);
        let revoking = self.draining.as_ref().map(|(_, _, parts)| parts.clone());
        if self.stopping {
            self.abandon_parked(|_| true);
        } else if let Some(parts) = revoking {
            self.abandon_parked(|part| parts.contains(&part));
        }
    }

    /// Let parked messages of the partitions `which` selects go: their keys are freed, their
    /// offsets not completed (they are delivered again), replays left to their lease.
    fn abandon_parked(&mut self, which: impl Fn(Part) -> bool) {
        let mut kept = VecDeque::with_capacity(self.parked.len());
        while let Some(slot) = self.parked.pop_front() {
            let Some(ticket) = self.tickets.get(slot) else {
                continue;
            };
            if !which(ticket.message().part) {
                kept.push_back(slot);
                continue;
            }
            if let Some(ticket) = self.tickets.remove(slot) {
                let pending = self.scheduler.finish(ticket);
                if let Some(entry) = pending.replay_of {
                    self.replays.remove(&entry);
                }
            }
        }
        self.parked = kept;
    }

    /// When the loop must wake up even if nothing happens: the next replay claim, the next
    /// breaker read, the breaker's half-opening, the next token of the tenant's bucket.
    fn next_wake(&self) -> Instant {
        let mut wake = self.next_claim.min(self.next_breaker_sync);
        if let Some(until) = self.breaker.open_until() {
            wake = wake.min(until);
        }
        // A wait that is over and found nothing queued is not a reason to wake again.
        if let Some(until) = self.rate_wait_until.filter(|until| *until > Instant::now()) {
            wake = wake.min(until);
        }
        wake
    }

    /// Act on a breaker transition: pause or resume the intake, count it, and (when it happened
    /// here, not by following the store) share it.
    fn on_breaker(&mut self, transition: Option<Transition>, local: bool) {
        let Some(transition) = transition else {
            return;
        };
        self.metrics
            .breaker_state
            .set(self.breaker.state().gauge_value());
        let stats = &self.stats;
        match transition {
            Transition::Opened | Transition::ForcedOpen => {
                self.breaker_pause.pause();
                stats.breaker_opened.fetch_add(1, AtomicOrdering::Relaxed);
                stats.breaker_open.store(true, AtomicOrdering::Relaxed);
                tracing::warn!(
                    binding = %self.binding_id,
                    forced = self.breaker.is_forced(),
                    by = if local { "this worker" } else { "the shared state" },
                    open_for = ?self.breaker.open_until().map(|u| u.saturating_duration_since(Instant::now())),
                    parked = self.parked.len(),
                    "breaker opened; partitions paused"
                );
                if local {
                    self.breaker_dirty = true;
                }
            }
            Transition::HalfOpened => {
                // The partitions stay paused while parked or queued messages can be the probes;
                // `dispatch` resumes them when there is nothing to probe with.
                stats
                    .breaker_half_opened
                    .fetch_add(1, AtomicOrdering::Relaxed);
                tracing::info!(binding = %self.binding_id, parked = self.parked.len(), "breaker half-open; probing");
            }
            Transition::Closed => {
                self.breaker_pause.resume();
                self.probes.clear();
                stats.breaker_closed.fetch_add(1, AtomicOrdering::Relaxed);
                stats.breaker_open.store(false, AtomicOrdering::Relaxed);
                tracing::info!(binding = %self.binding_id, parked = self.parked.len(), by = if local { "this worker" } else { "the shared state" }, "breaker closed; partitions resumed");
                if local {
                    self.breaker_dirty = true;
                }
            }
        }
    }

    /// Share a change of this worker's breaker through the store, or read the shared state
    /// every [`BREAKER_SYNC_EVERY`]: one store call at a time, off the coordinator.
    fn sync_breaker(&mut self) {
        if self.breaker_syncing {
            return;
        }
        let now = Instant::now();
        let store = self.store.clone();
        let binding = self.binding_id.clone();
        let done = self.done_tx.clone();
        if self.breaker_dirty && (!self.breaker_write_failed || now >= self.next_breaker_sync) {
            self.breaker_dirty = false;
            self.next_breaker_sync = now + BREAKER_SYNC_EVERY;
            let write = match self.breaker.state() {
                BreakerState::Closed => BreakerWrite::Closed,
                BreakerState::Open if self.breaker.is_forced() => BreakerWrite::Forced,
                BreakerState::Open | BreakerState::HalfOpen => BreakerWrite::Open {
                    open_for: self
                        .breaker
                        .open_until()
                        .map_or(Duration::ZERO, |until| until.saturating_duration_since(now)),
                    consecutive_failures: i32::try_from(self.breaker.consecutive_failures())
                        .unwrap_or(i32::MAX),
                },
            };
            self.breaker_syncing = true;
            tokio::spawn(async move {
                let written = store.breaker_set(&binding, write).await;
                let _ = done.send(Done::BreakerWritten(written));
            });
        } else if now >= self.next_breaker_sync {
            self.next_breaker_sync = now + BREAKER_SYNC_EVERY;
            self.breaker_syncing = true;
            tokio::spawn(async move {
                let read = store.breaker_get(&binding).await;
                let _ = done.send(Done::BreakerRead(read));
            });
        }
    }

    /// The shared breaker state was read: follow a change this worker has not seen (unless
    /// its own change is still to be written, which will overwrite it).
    fn on_breaker_read(&mut self, read: Result<Option<BreakerRecord>, StoreError>) {
        self.breaker_syncing = false;
        let record = match read {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(binding = %self.binding_id, error = %e, "cannot read the shared breaker state");
                return;
            }
        };
        if self.breaker_dirty || record.revision <= self.breaker_seen {
            return;
        }
        self.breaker_seen = record.revision;
        let now = Instant::now();
        let shared = if !record.open {
            Shared::Closed
        } else if record.forced {
            Shared::Forced
        } else {
            let left = record
                .open_until
                .map(|until| (until - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::ZERO);
            Shared::OpenUntil(now + left)
        };
        let transition = self.breaker.follow(shared, now);
        self.on_breaker(transition, false);
    }

    fn on_breaker_written(&mut self, written: Result<BreakerRecord, StoreError>) {
        self.breaker_syncing = false;
        match written {
            Ok(record) => {
                self.breaker_write_failed = false;
                self.breaker_seen = self.breaker_seen.max(record.revision);
            }
            Err(e) => {
                self.breaker_write_failed = true;
                tracing::warn!(binding = %self.binding_id, error = %e, "cannot share the breaker state; will retry");
                self.breaker_dirty = true;
            }
        }
    }

    /// Start the messages of `slots`. They run on at most as many tasks as the runtime has
    /// workers, each task running its share concurrently: a task per message would cost a
    /// spawn, a wake-up of another worker and a task's bookkeeping for every message.
    fn start(&mut self, slots: &[u64]) {
        if slots.is_empty() {
            return;
        }
        // Each invocation's future (over a kilobyte) is made in place in its task's set, not
        // gathered first: every move of it is a copy.
        let tasks = self.workers.min(slots.len());
        for share in slots.chunks(slots.len().div_ceil(tasks)) {
            let invocations = FuturesUnordered::new();
            for &slot in share {
                if let Some(invocation) = self.invocation(slot) {
                    invocations.push(invocation);
                }
            }
            if !invocations.is_empty() {
                tokio::spawn(run_share(invocations));
            }
        }
    }

    /// The invocation of the message of `slot`, on the handler version active now (it keeps
    /// that version to its end, whatever is swapped in meanwhile), reporting its outcome on the
    /// coordinator's channel when it ends.
    fn invocation(
        &mut self,
        slot: u64,
    ) -> Option<tracing::instrument::Instrumented<impl Future<Output = ()> + Send + 'static>> {
        let ticket = self.tickets.get(slot)?;
        let message = ticket.message().message.clone();
        let replay_of = ticket.message().replay_of;
        self.running += 1;
        self.metrics.in_flight.inc();
        let active = self.handler.get().clone();
        if active.version != self.handler_version {
            self.stats
                .handler_swaps
                .fetch_add(1, AtomicOrdering::Relaxed);
            tracing::info!(binding = %self.binding_id, from = ?self.handler_version, to = ?active.version, "handler version swapped in; the consumer keeps running");
            self.handler_version = active.version;
        }
        let (handler, version) = (active.pool, active.version);
        let state = Arc::new(StoreState {
            store: self.store.clone(),
            owner: self.owner.clone(),
            failed: AtomicBool::new(false),
            waited_us: AtomicU64::new(0),
        });
        let mut context = self.context.clone();
        context.state = state.clone();
        let done = self.done_tx.clone();
        let binding_id = self.binding_id.clone();
        let spec = self.spec.clone();
        let metrics = self.metrics.clone();
        // The message's span costs its fields formatted (and a hash for the trace context):
        // made before the invocation only when it is exported over OTLP (its timing is part
        // of the trace), else only if the handler logged something, for those lines to carry it.
        let (span, trace) = if crate::telemetry::exporting() {
            let (span, trace) = message_span(&spec, &binding_id, &message);
            (Some(span), trace)
        } else {
            (None, None)
        };
        let logged_in = span.clone();
        let task = async move {
            let invoked = handler.invoke(&message, &context).await;
            if let Ok(invocation) = &invoked {
                if !invocation.logs.is_empty() || invocation.logs_dropped > 0 {
                    match &logged_in {
                        Some(span) => span.in_scope(|| log_handler_lines(invocation)),
                        None => message_span(&spec, &binding_id, &message)
                            .0
                            .in_scope(|| log_handler_lines(invocation)),
                    }
                }
                metrics
                    .handler_duration
                    .observe(invocation.duration.as_secs_f64());
                match &invocation.outcome {
                    Outcome::Ok => {}
                    Outcome::HandlerError {
                        kind: ErrorKind::Retryable,
                        ..
                    } => metrics.failed_retryable.inc(),
                    Outcome::HandlerError {
                        kind: ErrorKind::Permanent,
                        ..
                    } => metrics.failed_permanent.inc(),
                    Outcome::Refused { .. } => metrics.failed_refused.inc(),
                    Outcome::Trap { kind, .. } => {
                        metrics.trap(*kind);
                        if *kind == TrapKind::Deadline {
                            metrics.failed_deadline.inc();
                        } else {
                            metrics.failed_trap.inc();
                        }
                    }
                }
            }
            let report = match invoked {
                Err(e) => Done::HostFault {
                    slot,
                    error: e.to_string(),
                },
                Ok(invocation) if state.host_fault(&invocation.outcome, invocation.duration) => {
                    Done::HostFault {
                        slot,
                        error: "the state store could not be read".to_owned(),
                    }
                }
                Ok(invocation) => match invocation.outcome {
                    Outcome::Ok => {
                        let traceparent = (!invocation.effects.emits.is_empty()).then(|| {
                            trace
                                .unwrap_or_else(|| TraceContext::for_message(&binding_id, &message))
                                .child_traceparent()
                        });
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
                                traceparent: traceparent.clone(),
                            })
                            .collect();
                        Done::Success(
                            slot,
                            Completion {
                                binding_id,
                                tenant: state.owner.0.clone(),
                                handler: state.owner.1.clone(),
                                message_id: message.id.clone(),
                                // The store needs the key only to file state writes under it.
                                key: if invocation.effects.state_writes.is_empty() {
                                    None
                                } else {
                                    message.key.clone()
                                },
                                state_writes: invocation.effects.state_writes,
                                emits,
                                replay_of,
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
                        version,
                    },
                    Outcome::Refused { message } => Done::Failed {
                        slot,
                        kind: FailureKind::Permanent,
                        dlq_kind: DlqErrorKind::Permanent,
                        message,
                        version,
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
                        version,
                    },
                },
            };
            let _ = done.send(report);
        };
        Some(task.instrument(span.unwrap_or_else(tracing::Span::none)))
    }

    async fn on_done(&mut self, done: Done) {
        if matches!(
            done,
            Done::Success(..) | Done::Failed { .. } | Done::HostFault { .. }
        ) {
            self.running = self.running.saturating_sub(1);
            self.metrics.in_flight.dec();
        }
        match done {
            Done::Success(slot, completion) => {
                let probe = self.probes.remove(&slot);
                let transition =
                    self.breaker
                        .record(BreakerOutcome::Success, probe, Instant::now());
                self.on_breaker(transition, true);
                // Its work is done: free the in-flight slot for other keys; the key itself
                // stays occupied until the commit.
                if let Some(ticket) = self.tickets.get_mut(slot) {
                    self.scheduler.release_slot(ticket);
                }
                if self.batch.is_empty() {
                    self.batch_started = Some(Instant::now());
                }
                self.batch.push((slot, completion));
            }
            Done::Committed {
                seq,
                slots,
                completions,
                result,
            } => self.on_committed(seq, slots, completions, result),
            Done::Rerun { slot, next_attempt } => {
                if next_attempt && let Some(ticket) = self.tickets.get_mut(slot) {
                    let pending = ticket.message_mut();
                    let mut message = (*pending.message).clone();
                    message.attempt += 1;
                    pending.message = Arc::new(message);
                }
                self.rerun(slot);
            }
            Done::Claimed(claimed) => self.on_claimed(claimed),
            Done::BreakerRead(read) => self.on_breaker_read(read),
            Done::BreakerWritten(written) => self.on_breaker_written(written),
            Done::HostFault { slot, error } => {
                // Not the handler's outcome: a probe slot is given back.
                if let Some(probe) = self.probes.remove(&slot) {
                    self.breaker.cancel(probe);
                }
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
                self.metrics.dead_lettered.inc();
                self.release(slot);
            }
            Done::Failed {
                slot,
                kind,
                dlq_kind,
                message: error,
                version,
            } => {
                // A dependency that looks down (a retryable error, the deadline) counts towards
                // the breaker; the message's own faults do not.
                let outcome = if kind == FailureKind::Retryable {
                    BreakerOutcome::Failure
                } else {
                    BreakerOutcome::Neutral
                };
                let probe = self.probes.remove(&slot);
                let transition = self.breaker.record(outcome, probe, Instant::now());
                self.on_breaker(transition, true);
                if !self.tickets.contains(slot) {
                    return;
                }
                if outcome == BreakerOutcome::Failure
                    && self.breaker.state() != BreakerState::Closed
                {
                    // The breaker is open (this failure may have opened it): the message is
                    // not spent — same attempt, never dead-lettered for it; it runs again as a
                    // probe or once the breaker closed.
                    self.stats.parked.fetch_add(1, AtomicOrdering::Relaxed);
                    tracing::debug!(binding = %self.binding_id, slot, %error, "failure while the breaker is open; message parked, no attempt spent");
                    self.park(slot);
                    return;
                }
                let Some(ticket) = self.tickets.get_mut(slot) else {
                    return;
                };
                let pending = ticket.message_mut();
                let now = Utc::now();
                let first = *pending.first_failure.get_or_insert(now);
                let attempt = pending.message.attempt;
                let (failed, part, offset, replay_of) = (
                    pending.message.clone(),
                    pending.part,
                    pending.offset,
                    pending.replay_of,
                );
                match self.spec.retry.decide(attempt, kind, &mut self.jitter) {
                    Decision::RetryAfter(delay) => {
                        self.stats.retried.fetch_add(1, AtomicOrdering::Relaxed);
                        self.metrics.retried.inc();
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
                        let entry = self
                            .dlq_entry(&failed, part, offset, version, dlq_kind, error, first, now);
                        let outbox = self.dlq_record(&entry, replay_of.is_some());
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
        handler_version: Option<i32>,
        error_kind: DlqErrorKind,
        error_message: String,
        first_failure_at: chrono::DateTime<Utc>,
        last_failure_at: chrono::DateTime<Utc>,
    ) -> DlqEntryInsert {
        DlqEntryInsert {
            tenant: self.spec.tenant.clone(),
            binding_id: self.binding_id.to_string(),
            handler: self.spec.handler.clone(),
            handler_version,
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
    /// `weir-dlq-*` headers describing the failure. Its id is stable for a message's first
    /// dead-lettering (a crash that dead-letters it again publishes it once); a failed replay
    /// is a new failure, published under an id of its own.
    fn dlq_record(&self, entry: &DlqEntryInsert, replay: bool) -> OutboxInsert {
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
            message_id: if replay {
                let failed_at = entry.last_failure_at.timestamp_micros();
                let cause = format!("dlq:{}:replay:{failed_at}", entry.message_id);
                emitted_id(&entry.binding_id, &cause, 0)
            } else {
                emitted_id(&entry.binding_id, &format!("dlq:{}", entry.message_id), 0)
            },
            topic: self.spec.dlq_topic(),
            key: entry.key.clone(),
            payload: entry.payload.clone(),
            headers,
            causation_id: entry.message_id.clone(),
            traceparent: None,
        }
    }

    /// Start committing the batch in the background, unless `commit_limit` commits are or the batch
    /// is empty. Its outcome comes back as [`Done::Committed`].
    fn start_commit(&mut self) {
        if self.commits_in_flight >= self.commit_limit() || self.batch.is_empty() {
            return;
        }
        let (slots, completions): (Vec<u64>, Vec<Completion>) = self.batch.drain(..).unzip();
        self.batch_started = None;
        self.commits_in_flight += 1;
        self.commit_seq += 1;
        let seq = self.commit_seq;
        let store = self.store.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let result = store.commit(&completions).await;
            let _ = done.send(Done::Committed {
                seq,
                slots,
                completions,
                result,
            });
        });
    }

    /// Wait for the commits in flight, then commit what is left (at most two more attempts):
    /// for a drain or shutdown, which must not return with committed work unacknowledged.
    async fn flush(&mut self) {
        let mut attempts = 0;
        loop {
            if self.commits_in_flight == 0 {
                if self.batch.is_empty() || attempts >= 2 {
                    return;
                }
                attempts += 1;
                self.start_commit();
            }
            match self.done_rx.recv().await {
                Some(done) => self.on_done(done).await,
                None => return,
            }
        }
    }

    /// A group commit finished: on success free the keys and complete the offsets (and start the
    /// next commit if a batch gathered meanwhile); on failure put the batch back, ahead of what
    /// gathered meanwhile, and back off.
    fn on_committed(
        &mut self,
        seq: u64,
        slots: Vec<u64>,
        completions: Vec<Completion>,
        result: Result<Vec<crate::store::CommitOutcome>, StoreError>,
    ) {
        self.commits_in_flight = self.commits_in_flight.saturating_sub(1);
        match result {
            Ok(outcomes) => {
                self.stats.commits.fetch_add(1, AtomicOrdering::Relaxed);
                // Only a commit started after the last failure says the store is back: one
                // that was already in flight must not cut the failed batch's backoff short.
                if self.failed_commit.is_none_or(|failed| seq > failed) {
                    self.failed_commit = None;
                    self.stats
                        .store_unavailable
                        .store(false, AtomicOrdering::Relaxed);
                    self.store_backoff = Duration::ZERO;
                }
                let replayed = completions.iter().filter(|c| c.replay_of.is_some()).count();
                self.stats
                    .replayed
                    .fetch_add(replayed as u64, AtomicOrdering::Relaxed);
                let duplicates = outcomes
                    .iter()
                    .filter(|o| **o == crate::store::CommitOutcome::Duplicate)
                    .count();
                self.stats
                    .duplicates
                    .fetch_add(duplicates as u64, AtomicOrdering::Relaxed);
                self.stats.committed.fetch_add(
                    (outcomes.len() - duplicates) as u64,
                    AtomicOrdering::Relaxed,
                );
                self.metrics.group_commits.inc();
                self.metrics.commit_batch.observe(outcomes.len() as f64);
                self.metrics.duplicate.inc_by(duplicates as u64);
                self.metrics.ok.inc_by((outcomes.len() - duplicates) as u64);
                self.release_all(&slots, Some(Utc::now().timestamp_millis()));
                if !self.batch.is_empty() {
                    self.start_commit();
                }
            }
            Err(e) => {
                // The host's fault: keep the batch, stop dispatching, retry after a backoff.
                // Commits numbered up to here started before this failure was known.
                self.failed_commit = Some(self.commit_seq);
                self.stats
                    .store_unavailable
                    .store(true, AtomicOrdering::Relaxed);
                self.store_backoff = (self.store_backoff * 2)
                    .clamp(Duration::from_millis(100), Duration::from_secs(5));
                let mut restored: Vec<(u64, Completion)> =
                    slots.into_iter().zip(completions).collect();
                restored.append(&mut self.batch);
                self.batch = restored;
                self.batch_started = Some(Instant::now());
                tracing::warn!(binding = %self.binding_id, error = %e, backoff = ?self.store_backoff, "group commit failed; will retry");
            }
        }
    }

    /// A message is done (dead-lettered): free its key, complete its offset.
    fn release(&mut self, slot: u64) {
        self.release_all(&[slot], None);
    }

    /// Messages are done: free their keys, complete their offsets, store the new watermarks
    /// (one call for all of them). With `committed_at` (milliseconds since the epoch), they
    /// committed then: each one's end-to-end latency is observed from its record's timestamp
    /// (not a replay's, whose timestamp is its first delivery's).
    fn release_all(&mut self, slots: &[u64], committed_at: Option<i64>) {
        let mut spent = Vec::new();
        for slot in slots {
            let Some(ticket) = self.tickets.remove(*slot) else {
                continue;
            };
            let Pending {
                mut message,
                part,
                offset,
                replay_of,
                ..
            } = self.scheduler.finish(ticket);
            if let (Some(now_ms), None, Some(timestamp)) =
                (committed_at, replay_of, message.timestamp_ms)
            {
                let elapsed_ms = now_ms.saturating_sub(timestamp).max(0);
                self.metrics.end_to_end.observe(elapsed_ms as f64 / 1000.0);
            }
            // The last handle goes back to the intake, to be filled with another record.
            if Arc::get_mut(&mut message).is_some() {
                spent.push(message);
            }
            if let Some(entry) = replay_of {
                // Not a record of the assignment: no offset to complete.
                self.replays.remove(&entry);
                continue;
            }
            // An error means the partition was revoked meanwhile: nothing to store.
            let _ = self.offsets.complete(part, offset);
        }
        if !spent.is_empty() {
            // The intake has stopped if this fails: the messages are freed here.
            let _ = self.spent.send(spent);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_named_by_its_header_else_by_where_it_was_read() {
        let header = |key: &str, value: &[u8]| Header {
            key: key.to_owned(),
            value: value.to_vec(),
        };
        for (topic, partition, offset) in [
            ("orders", 0, 0),
            ("acme.orders-v2", 11, 1_234_567),
            ("t", i32::MAX, i64::MAX),
            ("", -1, -1001),
            ("pédidos", 7, 9),
        ] {
            assert_eq!(
                message_id(topic, partition, offset, &[]),
                format!("{topic}/{partition}/{offset}")
            );
        }
        assert_eq!(
            message_id("orders", 1, 2, &[header("message-id", b"order-17")]),
            "order-17"
        );
        // An empty or non-UTF-8 header does not name the message; another header never does.
        for headers in [
            vec![header("message-id", b"")],
            vec![header("message-id", &[0xff, 0xfe])],
            vec![header("Message-Id", b"x"), header("id", b"y")],
        ] {
            assert_eq!(message_id("orders", 1, 2, &headers), "orders/1/2");
        }
    }

    #[test]
    fn the_consumer_fetches_again_soon_after_its_queue_was_full_unless_told_otherwise() {
        let config = consumer_config(&ClientConfig::new(), "weir.b");
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(config.get("group.id"), Some("weir.b"));
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        let mut operator = ClientConfig::new();
        operator
            .set("fetch.queue.backoff.ms", "250")
            .set("session.timeout.ms", "10000")
            .set("enable.auto.offset.store", "true");
        let config = consumer_config(&operator, "weir.b");
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("250"));
        assert_eq!(config.get("session.timeout.ms"), Some("10000"));
        // What the pipeline relies on is not the operator's to change.
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
    }

    fn deadline_trap() -> Outcome {
        Outcome::Trap {
            kind: TrapKind::Deadline,
            message: "deadline of 5000 ms exceeded".to_owned(),
        }
    }

    /// A deadline the invocation mostly spent waiting for the store is the host's fault; one
    /// it mostly spent on its own is the handler's, as is any other failure after a slow read.
    #[tokio::test]
    async fn a_deadline_spent_waiting_for_the_store_is_the_hosts_fault() {
        let store: Arc<dyn Store> = Arc::new(
            crate::store::SqliteStore::connect("sqlite::memory:")
                .await
                .unwrap(),
        );
        let state = |waited: Duration| StoreState {
            store: store.clone(),
            owner: Arc::new(("acme".into(), "orders".into())),
            failed: AtomicBool::new(false),
            waited_us: AtomicU64::new(waited.as_micros() as u64),
        };
        let five = Duration::from_secs(5);
        assert!(state(Duration::from_millis(4_900)).host_fault(&deadline_trap(), five));
        assert!(state(Duration::from_millis(2_500)).host_fault(&deadline_trap(), five));
        assert!(!state(Duration::from_millis(200)).host_fault(&deadline_trap(), five));
        let error = Outcome::HandlerError {
            kind: ErrorKind::Retryable,
            message: "no".to_owned(),
        };
        assert!(!state(Duration::from_millis(4_900)).host_fault(&error, five));
        assert!(!state(Duration::from_millis(4_900)).host_fault(&Outcome::Ok, five));
        let failed = state(Duration::ZERO);
        failed.failed.store(true, AtomicOrdering::Relaxed);
        assert!(failed.host_fault(&error, five));
    }

    /// A read abandoned half-way (its future dropped, as the invocation's deadline does) marks
    /// the invocation's state as failed; an answered read does not.
    #[tokio::test]
    async fn an_abandoned_store_read_counts_as_failed() {
        let failed = AtomicBool::new(false);
        let read = async {
            let unanswered = FailUnlessAnswered(Some(&failed));
            std::future::pending::<()>().await;
            unanswered.answered();
        };
        let cut = tokio::time::timeout(Duration::from_millis(10), read).await;
        assert!(cut.is_err());
        assert!(failed.load(AtomicOrdering::Relaxed));

        let answered = AtomicBool::new(false);
        let unanswered = FailUnlessAnswered(Some(&answered));
        tokio::task::yield_now().await;
        unanswered.answered();
        assert!(!answered.load(AtomicOrdering::Relaxed));
    }
}
