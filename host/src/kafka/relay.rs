//! The outbox relay: publishes the outbox's rows to Kafka and marks them sent (SEMANTICS §1.6).
//!
//! One loop, one task. It waits for a wake-up — a notification that outbox rows committed
//! ([`Store::outbox_notifications`]), the periodic sweep, or shutdown — then claims a batch of
//! rows under a lease, enqueues all of them on the idempotent producer at once, awaits every
//! delivery report, marks the delivered rows sent in one call and each failed one as failed.
//! A full batch is followed by the next claim at once; otherwise the relay waits again.
//!
//! What a caller can rely on:
//! * **Nothing is lost, some things may repeat.** A row is marked sent only after the broker
//!   acknowledged it (`acks=all`). A row whose delivery failed (broker down, delivery timeout)
//!   is marked failed and claimed again when its lease runs out, so the lease is also the
//!   retry delay. A row published but not marked (the store failed at that moment, or shutdown
//!   cut the wait short) is published again after its lease: records carry their stable
//!   `message-id`, by which consumers deduplicate.
//! * **Bounded in time.** The broker gets `delivery_timeout` to acknowledge a record; the relay
//!   waits that long plus [`REPORT_GRACE`] for the report, and the lease must outlast both, so
//!   no other relay claims a row while its delivery is pending.
//! * **Never gives up, never crashes.** Store errors are logged and retried with exponential
//!   back-off ([`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]); broker errors become failed rows.
//!   A producer that hit a fatal librdkafka error is replaced.
//! * **Order.** Rows of one batch are enqueued in claim (insertion) order, and the idempotent
//!   producer keeps that order per partition. A failed row waits for its lease while later rows
//!   go ahead, so records of one key can leave out of order when publishing fails.
//! * **Shutdown.** When the shutdown token fires the relay stops claiming, waits up to
//!   `drain_timeout` for the deliveries in flight (marking those that arrive), then flushes and
//!   closes the producer within what is left of that time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::producer::OutboxProducer;
use super::{KafkaClientConfig, KafkaConfigError};
use crate::metrics::RelayMetrics;
use crate::store::{MAX_OUTBOX_CLAIM, Store, StoreError};

/// Rows claimed at once: enough to fill the producer's batches, few enough that one claim's
/// rows are published well within a lease.
pub const DEFAULT_BATCH: u32 = 500;

/// How long a claimed row stays reserved for this relay: the delivery timeout plus the grace,
/// with room to mark the rows. Also the delay before a failed row is tried again.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How often the relay looks for rows without being notified: covers rows whose lease ran out,
/// notifications lost while the database connection was down, and stores that cannot notify.
pub const DEFAULT_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long the broker gets to acknowledge a record before the delivery counts as failed
/// (librdkafka's `message.timeout.ms`).
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long shutdown waits for deliveries in flight and the producer's flush.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long past the delivery timeout the relay still waits for a delivery report: librdkafka
/// checks for timed-out records once a second, and its thread may be scheduled late.
pub const REPORT_GRACE: Duration = Duration::from_secs(5);

/// The first pause after a store error.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// The longest pause between two attempts to reach the store.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the relay claims and publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// Rows claimed at once, 1 to [`MAX_OUTBOX_CLAIM`] (default [`DEFAULT_BATCH`]).
    pub batch: u32,
    /// How long a claimed row is reserved, and the delay before a failed row is retried
    /// (default [`DEFAULT_LEASE`]). Must exceed `delivery_timeout` + [`REPORT_GRACE`].
    pub lease: Duration,
    /// How often to look for rows without a notification (default [`DEFAULT_SWEEP_EVERY`]).
    pub sweep_every: Duration,
    /// How long the broker gets to acknowledge a record (default
    /// [`DEFAULT_DELIVERY_TIMEOUT`]).
    pub delivery_timeout: Duration,
    /// How long shutdown waits for deliveries in flight and the flush (default
    /// [`DEFAULT_DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch: DEFAULT_BATCH,
            lease: DEFAULT_LEASE,
            sweep_every: DEFAULT_SWEEP_EVERY,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

impl RelaySettings {
    /// Check every setting and how they relate, naming the field.
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        let invalid = |field: &str, reason: String| KafkaConfigError::Invalid {
            field: format!("relay.{field}"),
            reason,
        };
        if !(1..=MAX_OUTBOX_CLAIM).contains(&self.batch) {
            return Err(invalid(
                "batch",
                format!("{} is not between 1 and {MAX_OUTBOX_CLAIM}", self.batch),
            ));
        }
        if self.sweep_every.is_zero() {
            return Err(invalid("sweep_every", "must be longer than zero".into()));
        }
        if self.delivery_timeout < Duration::from_millis(1) {
            return Err(invalid(
                "delivery_timeout",
                "must be at least 1 ms (librdkafka reads 0 as never)".into(),
            ));
        }
        let outlast = self.delivery_timeout.saturating_add(REPORT_GRACE);
        if self.lease <= outlast {
            return Err(invalid(
                "lease",
                format!(
                    "{:?} must be longer than relay.delivery_timeout ({:?}) + {:?}, or a row \
                     could be claimed again while its delivery is pending",
                    self.lease, self.delivery_timeout, REPORT_GRACE
                ),
            ));
        }
        Ok(())
    }
}

/// The relay's counters, cheap to read at any time (for tests now, metrics later).
#[derive(Debug, Default)]
pub struct RelayStats {
    claimed: AtomicU64,
    published: AtomicU64,
    failed: AtomicU64,
    store_errors: AtomicU64,
}

impl RelayStats {
    /// Rows claimed from the outbox (a row retried after a failure counts again).
    pub fn claimed(&self) -> u64 {
        self.claimed.load(Ordering::Relaxed)
    }

    /// Records the broker acknowledged (counted even if marking the row sent then failed).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Deliveries that failed (each will be tried again), including records that could not be
    /// enqueued.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Store calls that failed (claims, marks).
    pub fn store_errors(&self) -> u64 {
        self.store_errors.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Publishes outbox rows. Build it with [`Relay::new`], keep [`Relay::stats`] if you want the
/// counters, then spawn [`Relay::run`].
pub struct Relay {
    store: Arc<dyn Store>,
    producer: OutboxProducer,
    settings: RelaySettings,
    stats: Arc<RelayStats>,
    /// Prometheus handles (a registry of its own unless [`Relay::with_metrics`] gave the host's).
    metrics: RelayMetrics,
    /// When shutdown must be over, once the shutdown token has fired.
    drain_deadline: Option<Instant>,
}

/// Where the relay's notifications come from.
enum Listener {
    /// Woken through this receiver.
    Active(mpsc::Receiver<()>),
    /// Not listening yet, or the listener ended: try again before the next pass.
    Retry {
        /// Whether the last attempt failed (log the next failure quietly).
        failed: bool,
    },
    /// The store cannot notify; sweeping only.
    Unsupported,
}

impl Relay {
    /// A relay over `store`'s outbox, publishing to the cluster of `kafka`. Creates the
    /// producer (which connects in the background); fails only on invalid settings.
    pub fn new(
        store: Arc<dyn Store>,
        kafka: &KafkaClientConfig,
        settings: RelaySettings,
    ) -> Result<Self, KafkaConfigError> {
        settings.validate()?;
        let producer = OutboxProducer::new(kafka, settings.delivery_timeout)?;
        Ok(Self {
            store,
            producer,
            settings,
            stats: Arc::new(RelayStats::default()),
            metrics: RelayMetrics::detached(),
            drain_deadline: None,
        })
    }

    /// Update the host's metrics: published and failed deliveries, and each published row's
    /// latency from its creation.
    pub fn with_metrics(mut self, metrics: RelayMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Publish until `shutdown` fires, then drain (see the module documentation). Errors are
    /// logged and retried, never returned.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(
            batch = self.settings.batch,
            lease_ms = millis(self.settings.lease),
            sweep_ms = millis(self.settings.sweep_every),
            "outbox relay started"
        );
        let mut listener = Listener::Retry { failed: false };
        let mut sweep = tokio::time::interval(self.settings.sweep_every);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut backoff = Backoff::default();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if let Listener::Retry { failed } = listener {
                listener = self.listen(failed).await;
            }
            match self.pass(&shutdown).await {
                Ok(full) => {
                    backoff.reset();
                    if full {
                        continue;
                    }
                }
                Err(error) => {
                    RelayStats::add(&self.stats.store_errors, 1);
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_ms = millis(delay), "outbox relay: store error, retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                woken = notified(&mut listener) => {
                    if woken.is_none() {
                        tracing::warn!("outbox relay: notification listener ended; sweeping until it is back");
                        listener = Listener::Retry { failed: false };
                    }
                }
                _ = sweep.tick() => {}
            }
        }
        let deadline = *self
            .drain_deadline
            .get_or_insert_with(|| Instant::now() + self.settings.drain_timeout);
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(error) = self.producer.close(left).await {
            tracing::warn!(%error, "outbox relay: records still queued at shutdown; their rows are published again after their lease");
        }
        tracing::info!(
            published = self.stats.published(),
            failed = self.stats.failed(),
            "outbox relay stopped"
        );
    }

    /// Start listening for notifications.
    async fn listen(&self, failed_before: bool) -> Listener {
        match self.store.outbox_notifications().await {
            Ok(Some(receiver)) => Listener::Active(receiver),
            Ok(None) => Listener::Unsupported,
            Err(error) => {
                if failed_before {
                    tracing::debug!(%error, "outbox relay: still cannot listen for notifications");
                } else {
                    tracing::warn!(%error, "outbox relay: cannot listen for notifications; sweeping meanwhile");
                }
                Listener::Retry { failed: true }
            }
        }
    }

    /// Claim one batch, publish it, mark the rows. Whether the batch was full.
    async fn pass(&mut self, shutdown: &CancellationToken) -> Result<bool, StoreError> {
        let claimed_at = Instant::now();
        let records = self
            .store
            .outbox_claim(self.settings.batch, self.settings.lease)
            .await?;
        if records.is_empty() {
            return Ok(false);
        }
        RelayStats::add(&self.stats.claimed, records.len());
        let full = records.len() >= usize::try_from(self.settings.batch).unwrap_or(usize::MAX);

        // Enqueue everything first, then await the reports together.
        let mut sent = Vec::with_capacity(records.len());
        let mut failed: Vec<(i64, String)> = Vec::new();
        let mut deliveries = FuturesUnordered::new();
        for record in &records {
            match self.producer.enqueue(record) {
                Ok(delivery) => {
                    let (id, created_at) = (record.id, record.created_at);
                    deliveries.push(async move { (id, created_at, delivery.await) });
                }
                Err(error) => failed.push((record.id, error.to_string())),
            }
        }
        let report_deadline = claimed_at + self.settings.delivery_timeout + REPORT_GRACE;
        let mut unanswered = 0;
        while !deliveries.is_empty() {
            let deadline = self
                .drain_deadline
                .map_or(report_deadline, |drain| drain.min(report_deadline));
            tokio::select! {
                biased;
                Some((id, created_at, report)) = deliveries.next() => match report {
                    Ok(Ok(_delivery)) => {
                        let latency = (chrono::Utc::now() - created_at).to_std().unwrap_or_default();
                        self.metrics.latency.observe(latency.as_secs_f64());
                        sent.push(id);
                    }
                    Ok(Err((error, _record))) => failed.push((id, error.to_string())),
                    Err(_cancelled) => failed.push((id, "the producer closed before reporting the delivery".into())),
                },
                () = shutdown.cancelled(), if self.drain_deadline.is_none() => {
                    self.drain_deadline = Some(Instant::now() + self.settings.drain_timeout);
                }
                () = tokio::time::sleep_until(deadline) => {
                    unanswered = deliveries.len();
                    break;
                }
            }
        }
        drop(deliveries);

        RelayStats::add(&self.stats.published, sent.len());
        RelayStats::add(&self.stats.failed, failed.len());
        self.metrics.published.inc_by(sent.len() as u64);
        self.metrics.failed.inc_by(failed.len() as u64);
        if unanswered > 0 {
            tracing::warn!(
                unanswered,
                claimed = records.len(),
                "outbox relay: no delivery report in time; those rows are published again when their lease runs out"
            );
        }
        if let Some((_, first_error)) = failed.first() {
            tracing::warn!(
                failed = failed.len(),
                claimed = records.len(),
                error = %first_error,
                retry_after_ms = millis(self.settings.lease),
                "outbox relay: records not delivered; retrying after their lease"
            );
        }
        tracing::debug!(
            claimed = records.len(),
            sent = sent.len(),
            failed = failed.len(),
            elapsed_ms = millis(claimed_at.elapsed()),
            "outbox relay: batch published"
        );

        let marked = self
            .mark_sent(&sent, claimed_at + self.settings.lease, shutdown)
            .await;
        // Failed rows are retried after their lease whether or not this succeeds; marking them
        // records the attempt and the error for operators.
        let recorded = self.mark_failed(&failed).await;

        if let Some(reason) = self.producer.fatal_error() {
            tracing::error!(%reason, "outbox relay: the producer hit a fatal error; replacing it");
            if let Err(error) = self.producer.recreate() {
                tracing::error!(%error, "outbox relay: cannot replace the producer");
            }
        }
        marked.and(recorded).map(|()| full)
    }

    /// Mark `ids` sent, retrying an unavailable store while their lease (and the drain time)
    /// lasts: after that another claim may publish them again anyway.
    async fn mark_sent(
        &mut self,
        ids: &[i64],
        lease_end: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut backoff = Backoff::default();
        loop {
            let error = match self.store.outbox_mark_sent(ids).await {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            if shutdown.is_cancelled() && self.drain_deadline.is_none() {
                self.drain_deadline = Some(Instant::now() + self.settings.drain_timeout);
            }
            let give_up_at = self
                .drain_deadline
                .map_or(lease_end, |drain| drain.min(lease_end));
            let delay = backoff.next_delay();
            if !error.is_unavailable() || Instant::now() + delay >= give_up_at {
                tracing::warn!(
                    rows = ids.len(),
                    "outbox relay: published rows could not be marked sent; they are published again when their lease runs out"
                );
                return Err(error);
            }
            RelayStats::add(&self.stats.store_errors, 1);
            tracing::warn!(%error, retry_ms = millis(delay), "outbox relay: cannot mark published rows sent, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Record each failed delivery; stops at the first store error.
    async fn mark_failed(&self, failed: &[(i64, String)]) -> Result<(), StoreError> {
        for (id, error) in failed {
            self.store.outbox_mark_error(*id, error).await?;
        }
        Ok(())
    }
}

/// The next notification, or `None` if the listener ended; never, when not listening.
async fn notified(listener: &mut Listener) -> Option<()> {
    match listener {
        Listener::Active(receiver) => receiver.recv().await,
        Listener::Retry { .. } | Listener::Unsupported => std::future::pending().await,
    }
}

/// Exponential back-off from [`BACKOFF_MIN`], doubling up to [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// A duration in whole milliseconds, for log fields.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RelaySettings::default().validate().unwrap();
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let cases = [
            (
                RelaySettings {
                    batch: 0,
                    ..RelaySettings::default()
                },
                "relay.batch",
            ),
            (
                RelaySettings {
                    batch: MAX_OUTBOX_CLAIM + 1,
                    ..RelaySettings::default()
                },
                "relay.batch",
            ),
            (
                RelaySettings {
                    sweep_every: Duration::ZERO,
                    ..RelaySettings::default()
                },
                "relay.sweep_every",
            ),
            (
                RelaySettings {
                    delivery_timeout: Duration::ZERO,
                    ..RelaySettings::default()
                },
                "relay.delivery_timeout",
            ),
            (
                RelaySettings {
                    lease: DEFAULT_DELIVERY_TIMEOUT + REPORT_GRACE,
                    ..RelaySettings::default()
                },
                "relay.lease",
            ),
        ];
        for (settings, field) in cases {
            let error = settings.validate().unwrap_err();
            assert!(error.to_string().contains(field), "{field}: {error}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[0], BACKOFF_MIN);
        assert_eq!(delays[1], BACKOFF_MIN * 2);
        assert!(delays.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(delays[7], BACKOFF_MAX);
        backoff.reset();
        assert_eq!(backoff.next_delay(), BACKOFF_MIN);
    }
}
