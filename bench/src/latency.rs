//! The **latency** phase: produce → effects-committed latency at a fixed offered rate.
//!
//! A binding of the no-op handler to a fresh topic, a host started for it, and — once a
//! warm-up message has gone through every partition, so that neither the group join nor the
//! first compilation is measured — `--rate` messages per second for `--latency-warmup-secs`
//! (not measured) and then `--latency-secs` seconds (measured). Every measured message carries
//! a `message-id` header `lat-<µs>-<n>`: its scheduled send time in microseconds since the Unix
//! epoch, and its sequence number. Weir records that id as the message's processed key, so
//! afterwards the store says when each message committed, and the difference is the latency
//! (same machine, same clock).
//!
//! The load's warm-up exists because the first tenth of a second at the offered rate is slow
//! before any consumer sees it: on the reference machine the first messages waited up to 65 ms
//! between the producer and the broker's log (measured with broker append times), for Weir and
//! the bare consumer alike. Its messages are handled and committed like the others, only not
//! counted.
//!
//! Pacing is open-loop: message `n` is due at `start + n / rate`, is stamped with that time,
//! and is sent as soon as the clock reaches it; a sender that falls behind does not hide the
//! delay from the figures (the largest lag is reported). The producer batches as librdkafka
//! does by default (`--producer-linger-ms`, 5 ms): its wait is part of every figure. Sending
//! each message on its own (`linger.ms=0`) kept the two-core reference machine 95 % busy at
//! 10 000 msg/s against 82 % (a produce request per message), and the consumers wait behind it.
//!
//! The commit time is the transaction's commit timestamp when PostgreSQL tracks them
//! (`track_commit_timestamp`), else the processed key's `processed_at`, which is `now()` of the
//! group-commit transaction — its *start* — so the figures are short by the time the
//! transaction took. The report names the signal used.
//!
//! Side by side, a bare librdkafka consumer in a group of its own reads the same topic while
//! Weir does, and records when each measured message reached it: produce → consumed, the part
//! of the latency that is the broker's, the client's and the machine's before Weir does
//! anything. Both are measured on the same messages under the same load.
//!
//! Owns the paced producer, the raw consumer's clock and the percentiles; the host and the
//! queries are borrowed from `host.rs` and `database.rs`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde::Serialize;
use weir::config::WeirConfig;

use crate::database::ServerSettings;
use crate::host::{self, Host};
use crate::kafka::{self, Deliveries, STALL_TIMEOUT};
use crate::{Bench, Plan};

/// Prefix of the measured messages' ids.
const MEASURED: &str = "lat-";
/// Prefix of the warm-up messages' ids.
const WARMUP: &str = "warmup-";
/// Prefix of the ids of the load's warm-up messages, sent at the offered rate before the
/// measured ones.
const LOAD_WARMUP: &str = "warmup-load-";
/// How long one warm-up round waits for its messages before sending another.
const WARMUP_ROUND: Duration = Duration::from_secs(2);
/// How often the phase asks the store how far the host got.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// What the latency phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigures {
    /// Offered rate, messages per second.
    pub offered_rate: u64,
    /// How long messages were offered and measured, seconds.
    pub seconds: u64,
    /// Messages offered and measured (and committed: the phase fails otherwise).
    pub messages: u64,
    /// Messages offered at the same rate just before, not measured.
    pub warmup_load_messages: u64,
    /// `linger.ms` of the producer.
    pub producer_linger_ms: u64,
    /// Seconds from starting the host until the warm-up went through every partition.
    pub warmup_seconds: f64,
    /// Largest delay of a send behind its schedule, milliseconds.
    pub pacing_lag_max_ms: f64,
    /// What the commit time is: `"commit timestamp"` or `"processed_at (transaction start)"`.
    pub commit_time: &'static str,
    /// Latency percentiles, milliseconds.
    pub min_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// The same messages, produce → received by a bare librdkafka consumer reading beside Weir.
    pub raw: Percentiles,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Percentiles {
    /// Of `sorted` latencies in microseconds.
    fn of(sorted: &[i64]) -> Self {
        let ms = |q: f64| percentile(sorted, q).map_or(f64::NAN, |us| us as f64 / 1000.0);
        Self {
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
        }
    }
}

impl fmt::Display for LatencyFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} messages at {} msg/s: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
             (raw consumer: p50 {:.1} ms, p99 {:.1} ms)",
            self.messages,
            self.offered_rate,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms,
            self.raw.p50_ms,
            self.raw.p99_ms
        )
    }
}

/// Run the phase on `topic` (created, empty).
pub async fn run(
    config: &WeirConfig,
    bench: &Bench,
    topic: &str,
    plan: &Plan,
    settings: &ServerSettings,
) -> anyhow::Result<LatencyFigures> {
    let deployment = host::deploy(
        config,
        bench,
        &format!("{}.latency", bench.tenant),
        topic,
        &host::noop(bench),
    )
    .await?;
    let linger = plan.producer_linger_ms.to_string();
    let producer = kafka::producer(&bench.kafka, &[("linger.ms", linger.as_str())])?;
    let raw = RawClock::start(&bench.kafka, topic, plan.rate * plan.latency_secs)?;
    let start = Instant::now();
    let mut host = Host::start(config);
    let measured = measure(
        &mut host,
        bench,
        &producer,
        &deployment.binding_id,
        topic,
        plan,
        settings,
        start,
        raw,
    )
    .await;
    let stopped = host.stop().await;
    let removed = deployment.remove(config).await;
    let figures = measured?;
    stopped?;
    removed?;
    Ok(figures)
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    host: &mut Host,
    bench: &Bench,
    producer: &BaseProducer<Deliveries>,
    binding: &str,
    topic: &str,
    plan: &Plan,
    settings: &ServerSettings,
    start: Instant,
    raw: RawClock,
) -> anyhow::Result<LatencyFigures> {
    // Warm up: one message per partition per round, until a round has gone through.
    let mut warm = false;
    let mut round = 0;
    while !warm {
        if start.elapsed() > STALL_TIMEOUT {
            bail!(
                "latency: the warm-up did not go through within {STALL_TIMEOUT:?} of starting \
                 the host (set WEIR_LOG=info to see the host's log)"
            );
        }
        host.check().await?;
        let ids: Vec<String> = (0..plan.partitions)
            .map(|p| format!("{WARMUP}{round}-{p}"))
            .collect();
        for (partition, id) in (0..plan.partitions).zip(&ids) {
            let headers = OwnedHeaders::new().insert(Header {
                key: "message-id",
                value: Some(id.as_str()),
            });
            kafka::send(
                producer,
                BaseRecord::to(topic)
                    .partition(partition)
                    .key("warmup")
                    .payload("warmup")
                    .headers(headers),
            )
            .context("latency warm-up")?;
        }
        tokio::task::block_in_place(|| kafka::flush(producer, "latency warm-up"))?;
        let sent = Instant::now();
        let expected = i64::try_from(ids.len()).context("too many partitions")?;
        while sent.elapsed() < WARMUP_ROUND {
            tokio::time::sleep(POLL_EVERY).await;
            if bench.schema.committed_among(binding, &ids).await? == expected {
                warm = true;
                break;
            }
        }
        round += 1;
    }
    // The raw consumer must hold its partitions before the load starts, or its figures
    // would include the group's join.
    raw.wait_assigned(STALL_TIMEOUT).await?;
    let warmup_seconds = start.elapsed().as_secs_f64();
    let warmups = (round * plan.partitions) as u64;

    // Offer the load.
    let total = plan.rate * plan.latency_secs;
    let load_warmups = plan.rate * plan.latency_warmup_secs;
    let lag = tokio::task::block_in_place(|| paced(producer, topic, plan))?;
    producer
        .context()
        .check(warmups + load_warmups + total, "latency")?;

    // Wait until every measured message has committed.
    let expected = i64::try_from(total).context("too many messages")?;
    let mut committed = 0;
    let mut progress_at = Instant::now();
    while committed < expected {
        tokio::time::sleep(POLL_EVERY).await;
        host.check().await?;
        let now = bench.schema.committed(binding, MEASURED).await?;
        if now > committed {
            committed = now;
            progress_at = Instant::now();
        } else if progress_at.elapsed() > STALL_TIMEOUT {
            bail!(
                "latency: no progress for {STALL_TIMEOUT:?}: {committed} of {expected} messages \
                 committed"
            );
        }
    }

    let commit_timestamps = settings.track_commit_timestamp == "on";
    let rows = bench
        .schema
        .commit_times(binding, MEASURED, commit_timestamps)
        .await?;
    let mut latencies = Vec::with_capacity(rows.len());
    for (id, committed_us) in rows {
        let sent_us = sent_micros(&id).with_context(|| format!("unexpected message id {id:?}"))?;
        latencies.push(committed_us - sent_us);
    }
    latencies.sort_unstable();
    let raw = raw.finish().await?;
    let ms = |q: f64| percentile(&latencies, q).map_or(f64::NAN, |us| us as f64 / 1000.0);
    Ok(LatencyFigures {
        offered_rate: plan.rate,
        seconds: plan.latency_secs,
        messages: total,
        warmup_load_messages: load_warmups,
        producer_linger_ms: plan.producer_linger_ms,
        warmup_seconds,
        pacing_lag_max_ms: lag.as_secs_f64() * 1000.0,
        commit_time: if commit_timestamps {
            "commit timestamp"
        } else {
            "processed_at (transaction start)"
        },
        min_ms: ms(0.0),
        p50_ms: ms(0.50),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
        raw,
    })
}

/// The bare consumer reading the latency topic beside Weir, on a thread of its own.
struct RawClock {
    assigned: Arc<AtomicBool>,
    thread: tokio::task::JoinHandle<anyhow::Result<Vec<i64>>>,
}

impl RawClock {
    /// Subscribe a consumer in a fresh group to `topic`; it runs until it has received
    /// `measured` measured messages (or stalls).
    fn start(bootstrap: &str, topic: &str, measured: u64) -> anyhow::Result<Self> {
        let consumer: BaseConsumer<RawContext> = kafka::consumer_config(
            bootstrap,
            &weir_acceptance::unique_name("weir_bench_latency_raw"),
        )
        .set("fetch.wait.max.ms", "100")
        .create_with_context(RawContext::default())
        .with_context(|| format!("cannot create a Kafka consumer for {bootstrap}"))?;
        consumer
            .subscribe(&[topic])
            .with_context(|| format!("latency: cannot subscribe to {topic}"))?;
        let assigned = consumer.context().assigned.clone();
        let thread = tokio::task::spawn_blocking(move || {
            let mut latencies = Vec::with_capacity(usize::try_from(measured).unwrap_or(0));
            let mut last_progress = Instant::now();
            while (latencies.len() as u64) < measured {
                if let Some(Ok(record)) = consumer.poll(Duration::from_millis(100)) {
                    last_progress = Instant::now();
                    let received_us = now_micros();
                    let sent = record
                        .headers()
                        .and_then(|headers| {
                            headers
                                .iter()
                                .find(|h| h.key == "message-id")
                                .and_then(|h| h.value)
                        })
                        .and_then(|id| std::str::from_utf8(id).ok())
                        .and_then(sent_micros);
                    if let Some(sent_us) = sent {
                        latencies.push(received_us - sent_us);
                    }
                }
                if last_progress.elapsed() > STALL_TIMEOUT {
                    bail!(
                        "latency: the raw consumer received nothing for {STALL_TIMEOUT:?} after \
                         {} of {measured} messages",
                        latencies.len()
                    );
                }
            }
            Ok(latencies)
        });
        Ok(Self { assigned, thread })
    }

    async fn wait_assigned(&self, timeout: Duration) -> anyhow::Result<()> {
        let since = Instant::now();
        while !self.assigned.load(AtomicOrdering::Relaxed) {
            if since.elapsed() > timeout {
                bail!("latency: the raw consumer got no partitions within {timeout:?}");
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<Percentiles> {
        let mut latencies = self
            .thread
            .await
            .context("the raw latency consumer's thread failed")??;
        latencies.sort_unstable();
        Ok(Percentiles::of(&latencies))
    }
}

/// Says when the raw consumer first holds its partitions.
#[derive(Default)]
struct RawContext {
    assigned: Arc<AtomicBool>,
}

impl ClientContext for RawContext {}

impl ConsumerContext for RawContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned.store(true, AtomicOrdering::Relaxed);
        }
    }
}

/// Now, in microseconds since the Unix epoch (0 if the clock is before it).
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Send `rate × (latency_warmup_secs + latency_secs)` messages at their scheduled times, the
/// warm-up's first; the largest lag behind the schedule of a measured one.
fn paced(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
    plan: &Plan,
) -> anyhow::Result<Duration> {
    let warmups = plan.rate * plan.latency_warmup_secs;
    let total = warmups + plan.rate * plan.latency_secs;
    let template = kafka::payload_template(plan.size);
    let mut payload = Vec::with_capacity(plan.size);
    let epoch_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_micros();
    let start = Instant::now();
    let mut lag = Duration::ZERO;
    for n in 0..total {
        let offset_us = u128::from(n) * 1_000_000 / u128::from(plan.rate);
        let due = start + Duration::from_micros(u64::try_from(offset_us).unwrap_or(u64::MAX));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let id = if n < warmups {
            format!("{LOAD_WARMUP}{n}")
        } else {
            lag = lag.max(Instant::now().saturating_duration_since(due));
            format!("{MEASURED}{}-{n}", epoch_us + offset_us)
        };
        let key = format!("key-{}", n % plan.keys);
        kafka::stamp_payload(&mut payload, &template, n);
        let headers = OwnedHeaders::new().insert(Header {
            key: "message-id",
            value: Some(id.as_str()),
        });
        kafka::send(
            producer,
            BaseRecord::to(topic)
                .key(&key)
                .payload(&payload)
                .headers(headers),
        )
        .context("latency")?;
        producer.poll(Duration::ZERO);
    }
    kafka::flush(producer, "latency")?;
    Ok(lag)
}

/// The send time (µs since the epoch) encoded in a measured message's id, `lat-<µs>-<n>`.
fn sent_micros(id: &str) -> Option<i64> {
    id.strip_prefix(MEASURED)?.split('-').next()?.parse().ok()
}

/// The `q`-quantile (0 ≤ q ≤ 1) of sorted `values`, nearest rank.
fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_times_come_back_out_of_ids() {
        assert_eq!(
            sent_micros("lat-1764189000123456-42"),
            Some(1_764_189_000_123_456)
        );
        assert_eq!(sent_micros("warmup-0-3"), None);
        assert_eq!(sent_micros("lat-x-1"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile(&values, 0.5), Some(50));
        assert_eq!(percentile(&values, 0.95), Some(95));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
