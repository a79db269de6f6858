//! Prometheus metrics (`GET /metrics`), named and labelled per STYLE §10: the `weir_` prefix,
//! unit suffixes, bounded labels (tenant, handler, binding, topic, partition, outcome, kind).
//!
//! One [`Metrics`] per host process owns its own [`Registry`] (not the crate's global one, so a
//! test process can run several hosts) and every metric family. Each worker resolves its
//! labelled handles once, at start ([`Metrics::binding`]); on the hot path an update is one
//! atomic operation on a handle, with no lookup, allocation or lock. Gauges that need the store
//! or librdkafka (DLQ and outbox pending, consumer lag) are sampled off the hot path: the lag
//! from librdkafka's statistics callback on the intake thread ([`LagGauge`]), the store counts
//! by one task of `serve`.

use std::sync::Arc;

use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use rdkafka::statistics::Statistics;

use crate::outbound::{DestinationMetrics, HttpMetrics};
use crate::runtime::{CacheStats, TrapKind};

/// Buckets of one handler invocation, in seconds: 0.5 ms to 10 s.
const HANDLER_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of latencies across Kafka and the store, in seconds: 5 ms to 5 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets of messages per group commit.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// The trap kinds, in the order of [`BindingMetrics::traps`].
const TRAP_KINDS: [TrapKind; 5] = [
    TrapKind::Deadline,
    TrapKind::Memory,
    TrapKind::StackOverflow,
    TrapKind::Unreachable,
    TrapKind::Other,
];

/// The label value of a trap kind.
pub fn trap_label(kind: TrapKind) -> &'static str {
    match kind {
        TrapKind::Deadline => "deadline",
        TrapKind::Memory => "memory",
        TrapKind::StackOverflow => "stack_overflow",
        TrapKind::Unreachable => "unreachable",
        TrapKind::Other => "other",
    }
}

/// Every metric family of one host process, in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    consumed: IntCounterVec,
    processed: IntCounterVec,
    failures: IntCounterVec,
    handler_duration: HistogramVec,
    end_to_end: HistogramVec,
    lag: IntGaugeVec,
    in_flight: IntGaugeVec,
    group_commits: IntCounterVec,
    commit_batch: HistogramVec,
    breaker_state: IntGaugeVec,
    dlq_pending: IntGaugeVec,
    outbox_pending: IntGauge,
    relay_latency: Histogram,
    relay_published: IntCounter,
    relay_failed: IntCounter,
    traps: IntCounterVec,
    compile_cache: IntCounterVec,
    wasm_instances: IntGauge,
    wasm_instance_slots: IntGauge,
    rate_limit_waits: IntCounterVec,
    rate_limit_wait_seconds: CounterVec,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    http_breaker_state: IntGaugeVec,
}

const MESSAGE: &[&str] = &["tenant", "handler", "binding"];

impl Metrics {
    /// A registry with every family registered (none has a sample until it is updated).
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        fn register<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            collector: Result<C, prometheus::Error>,
        ) -> C {
            // The names and labels are constants checked by the tests: neither step can fail.
            #[allow(clippy::expect_used)]
            let collector = collector.expect("valid metric definition");
            #[allow(clippy::expect_used)]
            registry
                .register(Box::new(collector.clone()))
                .expect("metric registered once");
            collector
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    labels,
                ),
            )
        };
        let metrics = Self {
            consumed: counter(
                "weir_messages_consumed_total",
                "Records received from Kafka.",
                MESSAGE,
            ),
            processed: counter(
                "weir_messages_processed_total",
                "Messages by outcome: ok (effects committed), duplicate (already processed), retried (a retry scheduled), dead_lettered.",
                &["tenant", "handler", "binding", "outcome"],
            ),
            failures: counter(
                "weir_handler_failures_total",
                "Failed invocations by kind: retryable, permanent, trap, deadline, refused.",
                &["tenant", "handler", "binding", "kind"],
            ),
            handler_duration: histogram(
                "weir_handler_duration_seconds",
                "Wall time of one handler invocation (the guest call).",
                HANDLER_BUCKETS,
                MESSAGE,
            ),
            end_to_end: histogram(
                "weir_end_to_end_latency_seconds",
                "From the record's timestamp to its effects committed.",
                LATENCY_BUCKETS,
                MESSAGE,
            ),
            lag: gauge(
                "weir_consumer_lag",
                "Records between the partition's high watermark and the binding's stored position (sampled from librdkafka's statistics).",
                &["binding", "topic", "partition"],
            ),
            in_flight: gauge("weir_in_flight", "Invocations running now.", &["binding"]),
            group_commits: counter(
                "weir_group_commits_total",
                "Group commits made (one store transaction each).",
                &["binding"],
            ),
            commit_batch: histogram(
                "weir_commit_batch_size",
                "Messages per group commit.",
                BATCH_BUCKETS,
                &["binding"],
            ),
            breaker_state: gauge(
                "weir_breaker_state",
                "The binding's circuit breaker: 0 closed, 1 half-open, 2 open.",
                &["binding"],
            ),
            dlq_pending: gauge(
                "weir_dlq_pending",
                "DLQ entries waiting for an operator (sampled from the store).",
                &["tenant", "handler"],
            ),
            outbox_pending: register(
                &registry,
                IntGauge::new(
                    "weir_outbox_pending",
                    "Outbox rows not yet published (sampled from the store).",
                ),
            ),
            relay_latency: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "weir_outbox_relay_latency_seconds",
                        "From an outbox row's creation to the broker's acknowledgement.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                ),
            ),
            relay_published: register(
                &registry,
                IntCounter::new(
                    "weir_outbox_published_total",
                    "Outbox records the broker acknowledged.",
                ),
            ),
            relay_failed: register(
                &registry,
                IntCounter::new(
                    "weir_outbox_publish_failures_total",
                    "Outbox deliveries that failed (each is tried again).",
                ),
            ),
            traps: counter(
                "weir_wasm_traps_total",
                "Handler traps by kind: deadline, memory, stack_overflow, unreachable, other.",
                &["binding", "kind"],
            ),
            compile_cache: counter(
                "weir_wasm_compile_cache_total",
                "Components loaded, by where they came from: memory, disk, compiled.",
                &["result"],
            ),
            wasm_instances: register(
                &registry,
                IntGauge::new(
                    "weir_wasm_instances",
                    "Handler instances alive now, idle in a pool or running.",
                ),
            ),
            wasm_instance_slots: register(
                &registry,
                IntGauge::new(
                    "weir_wasm_instance_slots",
                    "Instances the pooling allocator can hold at once (`runtime.pool_instances`).",
                ),
            ),
            rate_limit_waits: counter(
                "weir_rate_limit_waits_total",
                "Times a binding of the tenant found the tenant's token bucket empty and stopped dispatching until it refilled.",
                &["tenant"],
            ),
            rate_limit_wait_seconds: register(
                &registry,
                CounterVec::new(
                    Opts::new(
                        "weir_rate_limit_wait_seconds_total",
                        "Time the tenant's bindings spent waiting for its token bucket, summed over bindings.",
                    ),
                    &["tenant"],
                ),
            ),
            http_requests: counter(
                "weir_http_requests_total",
                "Outbound HTTP requests of handlers by destination (the allowlist entry; `not_allowed` for refused ones) and outcome: answered, server_error (5xx, also counted as answered), failed, timeout, breaker_open, too_large, denied.",
                &["binding", "destination", "outcome"],
            ),
            http_duration: histogram(
                "weir_http_request_duration_seconds",
                "From sending an outbound HTTP request to its response headers (or its failure).",
                HANDLER_BUCKETS,
                &["binding", "destination"],
            ),
            http_breaker_state: gauge(
                "weir_http_breaker_state",
                "The breaker of the destination last used under an allowlist entry: 0 closed, 1 half-open, 2 open.",
                &["binding", "destination"],
            ),
            registry,
        };
        Arc::new(metrics)
    }

    /// The handles of one binding, resolved once (at the worker's start).
    pub fn binding(&self, tenant: &str, handler: &str, binding: &str) -> BindingMetrics {
        let message = [tenant, handler, binding];
        let processed = |outcome: &str| {
            self.processed
                .with_label_values(&[tenant, handler, binding, outcome])
        };
        let failure = |kind: &str| {
            self.failures
                .with_label_values(&[tenant, handler, binding, kind])
        };
        BindingMetrics {
            consumed: self.consumed.with_label_values(&message),
            ok: processed("ok"),
            duplicate: processed("duplicate"),
            retried: processed("retried"),
            dead_lettered: processed("dead_lettered"),
            failed_retryable: failure("retryable"),
            failed_permanent: failure("permanent"),
            failed_trap: failure("trap"),
            failed_deadline: failure("deadline"),
            failed_refused: failure("refused"),
            traps: TRAP_KINDS
                .map(|kind| self.traps.with_label_values(&[binding, trap_label(kind)])),
            handler_duration: self.handler_duration.with_label_values(&message),
            end_to_end: self.end_to_end.with_label_values(&message),
            in_flight: self.in_flight.with_label_values(&[binding]),
            group_commits: self.group_commits.with_label_values(&[binding]),
            commit_batch: self.commit_batch.with_label_values(&[binding]),
            breaker_state: self.breaker_state.with_label_values(&[binding]),
            rate_limit_waits: self.rate_limit_waits.with_label_values(&[tenant]),
            rate_limit_wait_seconds: self.rate_limit_wait_seconds.with_label_values(&[tenant]),
            lag: LagGauge {
                gauge: self.lag.clone(),
                binding: binding.to_owned(),
            },
        }
    }

    /// The outbound-HTTP handles of one binding: one set per entry of its allowlist.
    pub fn http(&self, binding: &str, allow: &[String]) -> HttpMetrics {
        let requests = |destination: &str, outcome: &str| {
            self.http_requests
                .with_label_values(&[binding, destination, outcome])
        };
        HttpMetrics {
            destinations: allow
                .iter()
                .map(|d| DestinationMetrics {
                    answered: requests(d, "answered"),
                    server_errors: requests(d, "server_error"),
                    failed: requests(d, "failed"),
                    timed_out: requests(d, "timeout"),
                    breaker_open: requests(d, "breaker_open"),
                    too_large: requests(d, "too_large"),
                    duration: self.http_duration.with_label_values(&[binding, d]),
                    breaker_state: self.http_breaker_state.with_label_values(&[binding, d]),
                })
                .collect(),
            denied: requests("not_allowed", "denied"),
        }
    }

    /// The relay's handles.
    pub fn relay(&self) -> RelayMetrics {
        RelayMetrics {
            latency: self.relay_latency.clone(),
            published: self.relay_published.clone(),
            failed: self.relay_failed.clone(),
        }
    }

    /// Set the outbox rows not yet published.
    pub fn set_outbox_pending(&self, pending: i64) {
        self.outbox_pending.set(pending);
    }

    /// Set the pending DLQ entries of a handler.
    pub fn set_dlq_pending(&self, tenant: &str, handler: &str, pending: i64) {
        self.dlq_pending
            .with_label_values(&[tenant, handler])
            .set(pending);
    }

    /// Remove every series of `binding` (a binding that stopped on this host: deleted, or moved
    /// to other replicas), so a scrape does not show its last values forever. The tenant's
    /// rate-limit series and the handler's DLQ gauge stay: other bindings may share them.
    pub fn forget_binding(&self, binding: &str) {
        forget(&self.consumed, binding);
        forget(&self.processed, binding);
        forget(&self.failures, binding);
        forget(&self.handler_duration, binding);
        forget(&self.end_to_end, binding);
        forget(&self.lag, binding);
        forget(&self.in_flight, binding);
        forget(&self.group_commits, binding);
        forget(&self.commit_batch, binding);
        forget(&self.breaker_state, binding);
        forget(&self.traps, binding);
        forget(&self.http_requests, binding);
        forget(&self.http_duration, binding);
        forget(&self.http_breaker_state, binding);
    }

    /// Set the live Wasm instances and the pool's capacity.
    pub fn set_wasm_instances(&self, live: i64, slots: i64) {
        self.wasm_instances.set(live);
        self.wasm_instance_slots.set(slots);
    }

    /// Bring the compile-cache counters up to the runtime's (which only grow).
    pub fn observe_cache(&self, stats: &CacheStats) {
        for (result, total) in [
            ("memory", stats.memory_hits),
            ("disk", stats.disk_hits),
            ("compiled", stats.compiled),
        ] {
            let counter = self.compile_cache.with_label_values(&[result]);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The handles one worker updates, resolved once.
#[derive(Clone)]
pub struct BindingMetrics {
    /// Records received.
    pub consumed: IntCounter,
    /// Effects committed.
    pub ok: IntCounter,
    /// Found already processed.
    pub duplicate: IntCounter,
    /// Retries scheduled.
    pub retried: IntCounter,
    /// Dead-lettered.
    pub dead_lettered: IntCounter,
    /// The handler returned a retryable error.
    pub failed_retryable: IntCounter,
    /// The handler returned a permanent error.
    pub failed_permanent: IntCounter,
    /// The handler trapped (other than its deadline).
    pub failed_trap: IntCounter,
    /// The handler ran past its deadline.
    pub failed_deadline: IntCounter,
    /// The runtime refused the invocation.
    pub failed_refused: IntCounter,
    traps: [IntCounter; 5],
    /// One invocation's guest time.
    pub handler_duration: Histogram,
    /// Record timestamp → effects committed.
    pub end_to_end: Histogram,
    /// Invocations running.
    pub in_flight: IntGauge,
    /// Group commits made.
    pub group_commits: IntCounter,
    /// Messages per group commit.
    pub commit_batch: Histogram,
    /// 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGauge,
    /// Waits for the tenant's token bucket (shared by the tenant's bindings).
    pub rate_limit_waits: IntCounter,
    /// Seconds spent waiting for the tenant's token bucket (shared by the tenant's bindings).
    pub rate_limit_wait_seconds: Counter,
    /// The consumer lag of the binding's partitions.
    pub lag: LagGauge,
}

impl BindingMetrics {
    /// Handles on a registry of their own, for a worker run without a host (tests).
    pub fn detached(tenant: &str, handler: &str, binding: &str) -> Self {
        Metrics::new().binding(tenant, handler, binding)
    }

    /// Count a trap of `kind`.
    pub fn trap(&self, kind: TrapKind) {
        let index = TRAP_KINDS.iter().position(|k| *k == kind).unwrap_or(4);
        self.traps[index].inc();
    }
}

/// The consumer lag of one binding's partitions, set from librdkafka's statistics (on the
/// intake thread, every statistics interval).
#[derive(Clone)]
pub struct LagGauge {
    gauge: IntGaugeVec,
    binding: String,
}

impl LagGauge {
    /// Set the lag of every partition the statistics show assigned (high watermark minus the
    /// stored offset, or the committed one before any was stored); forget the others.
    pub fn record(&self, statistics: &Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let label = partition.to_string();
                let labels = [self.binding.as_str(), topic.as_str(), label.as_str()];
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else {
                    p.consumer_lag
                };
                if p.fetch_state == "none" || p.fetch_state == "stopped" {
                    let _ = self.gauge.remove_label_values(&labels);
                } else if lag >= 0 {
                    self.gauge.with_label_values(&labels).set(lag);
                }
            }
        }
    }

    /// Set one partition's lag (for tests and for sources other than the statistics).
    pub fn set(&self, topic: &str, partition: i32, lag: i64) {
        self.gauge
            .with_label_values(&[self.binding.as_str(), topic, &partition.to_string()])
            .set(lag);
    }
}

/// The handles the outbox relay updates.
#[derive(Clone)]
pub struct RelayMetrics {
    /// Row created → published.
    pub latency: Histogram,
    /// Records acknowledged.
    pub published: IntCounter,
    /// Deliveries failed.
    pub failed: IntCounter,
}

impl RelayMetrics {
    /// Handles on a registry of their own, for a relay run without a host.
    pub fn detached() -> Self {
        Metrics::new().relay()
    }
}

/// Remove the series of `family` whose `binding` label is `binding`.
fn forget<T: prometheus::core::MetricVecBuilder>(
    family: &prometheus::core::MetricVec<T>,
    binding: &str,
) {
    use prometheus::core::Collector as _;
    for metric_family in family.collect() {
        for metric in metric_family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            if labels.get("binding") == Some(&binding) {
                let _ = family.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_binding_leaves_no_series_and_others_keep_theirs() {
        let metrics = Metrics::new();
        for name in ["gone", "kept"] {
            let binding = metrics.binding("acme", "orders", name);
            binding.consumed.inc();
            binding.handler_duration.observe(0.01);
            binding.lag.set("orders", 0, 3);
            binding.lag.set("orders", 1, 4);
            binding.trap(TrapKind::Memory);
            let http = metrics.http(name, &["api.example.com".to_owned()]);
            http.destinations[0].answered.inc();
            http.denied.inc();
        }
        metrics.set_wasm_instances(3, 128);
        metrics.forget_binding("gone");
        let text = metrics.render();
        assert!(!text.contains("\"gone\""), "{text}");
        assert!(
            text.contains("weir_consumer_lag{binding=\"kept\",partition=\"1\",topic=\"orders\"} 4")
        );
        assert!(text.contains("weir_http_requests_total{binding=\"kept\",destination=\"api.example.com\",outcome=\"answered\"} 1"));
        assert!(text.contains("weir_wasm_instances 3"));
        assert!(text.contains("weir_wasm_instance_slots 128"));
    }

    #[test]
    fn the_exposition_has_every_family_with_its_labels() {
        let metrics = Metrics::new();
        let binding = metrics.binding("acme", "orders", "acme-orders");
        binding.consumed.inc_by(3);
        binding.ok.inc_by(2);
        binding.duplicate.inc();
        binding.retried.inc();
        binding.dead_lettered.inc();
        binding.failed_retryable.inc();
        binding.failed_trap.inc();
        binding.trap(TrapKind::Unreachable);
        binding.handler_duration.observe(0.002);
        binding.end_to_end.observe(0.2);
        binding.in_flight.inc();
        binding.group_commits.inc();
        binding.commit_batch.observe(3.0);
        binding.breaker_state.set(2);
        binding.rate_limit_waits.inc();
        binding.rate_limit_wait_seconds.inc_by(0.5);
        binding.lag.set("orders", 0, 7);
        metrics.set_dlq_pending("acme", "orders", 4);
        metrics.set_outbox_pending(5);
        let relay = metrics.relay();
        relay.latency.observe(0.05);
        relay.published.inc();
        relay.failed.inc();
        metrics.observe_cache(&CacheStats {
            memory_hits: 2,
            disk_hits: 1,
            compiled: 1,
        });
        metrics.observe_cache(&CacheStats {
            memory_hits: 3,
            disk_hits: 1,
            compiled: 1,
        });

        let text = metrics.render();
        for line in [
            "weir_messages_consumed_total{binding=\"acme-orders\",handler=\"orders\",tenant=\"acme\"} 3",
            "weir_messages_processed_total{binding=\"acme-orders\",handler=\"orders\",outcome=\"ok\",tenant=\"acme\"} 2",
            "weir_messages_processed_total{binding=\"acme-orders\",handler=\"orders\",outcome=\"duplicate\",tenant=\"acme\"} 1",
            "weir_messages_processed_total{binding=\"acme-orders\",handler=\"orders\",outcome=\"retried\",tenant=\"acme\"} 1",
            "weir_messages_processed_total{binding=\"acme-orders\",handler=\"orders\",outcome=\"dead_lettered\",tenant=\"acme\"} 1",
            "weir_handler_failures_total{binding=\"acme-orders\",handler=\"orders\",kind=\"retryable\",tenant=\"acme\"} 1",
            "weir_handler_failures_total{binding=\"acme-orders\",handler=\"orders\",kind=\"trap\",tenant=\"acme\"} 1",
            "weir_handler_failures_total{binding=\"acme-orders\",handler=\"orders\",kind=\"refused\",tenant=\"acme\"} 0",
            "weir_handler_duration_seconds_count{binding=\"acme-orders\",handler=\"orders\",tenant=\"acme\"} 1",
            "weir_end_to_end_latency_seconds_bucket{binding=\"acme-orders\",handler=\"orders\",tenant=\"acme\",le=\"0.25\"} 1",
            "weir_consumer_lag{binding=\"acme-orders\",partition=\"0\",topic=\"orders\"} 7",
            "weir_in_flight{binding=\"acme-orders\"} 1",
            "weir_group_commits_total{binding=\"acme-orders\"} 1",
            "weir_commit_batch_size_sum{binding=\"acme-orders\"} 3",
            "weir_breaker_state{binding=\"acme-orders\"} 2",
            "weir_dlq_pending{handler=\"orders\",tenant=\"acme\"} 4",
            "weir_rate_limit_waits_total{tenant=\"acme\"} 1",
            "weir_rate_limit_wait_seconds_total{tenant=\"acme\"} 0.5",
            "weir_outbox_pending 5",
            "weir_outbox_relay_latency_seconds_count 1",
            "weir_outbox_published_total 1",
            "weir_outbox_publish_failures_total 1",
            "weir_wasm_traps_total{binding=\"acme-orders\",kind=\"unreachable\"} 1",
            "weir_wasm_compile_cache_total{result=\"memory\"} 3",
            "weir_wasm_compile_cache_total{result=\"disk\"} 1",
            "weir_wasm_compile_cache_total{result=\"compiled\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        for family in ["counter", "histogram", "gauge"] {
            assert!(text.contains(&format!(" {family}\n")), "{family}");
        }
        // No label outside STYLE §10's set.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some(labels) = line.split_once('{').map(|(_, rest)| rest) {
                for pair in labels.split('}').next().unwrap_or("").split(',') {
                    let name = pair.split('=').next().unwrap_or("");
                    assert!(
                        [
                            "tenant",
                            "handler",
                            "binding",
                            "topic",
                            "partition",
                            "outcome",
                            "kind",
                            "result",
                            "le"
                        ]
                        .contains(&name),
                        "unexpected label {name} in {line}"
                    );
                }
            }
        }
    }
}
