//! What a run found, and how it is shown: a table with the ratios, or (`--json`) one JSON
//! document with every figure.
//!
//! Owns the figures' types and their presentation; computes nothing but ratios.

use std::fmt::{self, Write as _};
use std::time::Instant;

use serde::Serialize;
use weir::config::WeirConfig;

use crate::Plan;
use crate::cpu::{CpuFigures, Mark};
use crate::database::ServerSettings;
use crate::io::IoFigures;
use crate::latency::LatencyFigures;

/// One throughput phase: how many messages, how long.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseFigures {
    /// Messages handled.
    pub messages: u64,
    /// Seconds from the start of the phase (consumer created, host started) to the
    /// partitions' assignment (raw), the first message consumed (seed) or the first message
    /// committed (weir). None for the fill.
    pub startup_seconds: Option<f64>,
    /// Seconds from the end of the start-up to the last message (the fill: from the first send
    /// to the last delivery).
    pub seconds: f64,
    /// `messages ÷ seconds`.
    pub msgs_per_second: f64,
    /// CPU time per message over the phase (none for the fill).
    pub cpu: CpuFigures,
}

impl PhaseFigures {
    /// The figures of `messages` messages in `seconds`.
    pub fn new(messages: u64, startup_seconds: Option<f64>, seconds: f64) -> Self {
        Self {
            messages,
            startup_seconds,
            seconds,
            msgs_per_second: if seconds > 0.0 {
                messages as f64 / seconds
            } else {
                f64::NAN
            },
            cpu: CpuFigures::default(),
        }
    }

    /// The figures of a phase started at `start` whose `messages` messages drained from `from`
    /// (the end of its start-up) to `to`: time and CPU alike.
    pub fn drained(messages: u64, start: Instant, from: Mark, to: Mark) -> Self {
        Self {
            cpu: from.cpu.per_message(&to.cpu, messages),
            ..Self::new(
                messages,
                Some(from.at.duration_since(start).as_secs_f64()),
                to.at.duration_since(from.at).as_secs_f64(),
            )
        }
    }
}

impl fmt::Display for PhaseFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} messages in {:.3} s, {:.0} msg/s",
            self.messages, self.seconds, self.msgs_per_second
        )?;
        if let Some(startup) = self.startup_seconds {
            write!(f, " (start-up {startup:.3} s)")?;
        }
        Ok(())
    }
}

/// The host's pipeline settings in force (defaults unless `WEIR_PIPELINE__*` says otherwise).
#[derive(Debug, Clone, Serialize)]
pub struct PipelineFigures {
    /// Completions per group commit, at most.
    pub commit_batch_max: u32,
    /// Group-commit linger, milliseconds.
    pub commit_linger_ms: u64,
    /// PostgreSQL pool size.
    pub store_max_connections: u32,
    /// Handler instances in the runtime's pool.
    pub pool_instances: u32,
    /// Messages in flight per binding (the binding's default).
    pub max_in_flight: usize,
    /// Ordering (the binding's default).
    pub ordering: &'static str,
}

impl From<&WeirConfig> for PipelineFigures {
    fn from(config: &WeirConfig) -> Self {
        Self {
            commit_batch_max: config.pipeline.commit_batch_max,
            commit_linger_ms: config.pipeline.commit_linger_ms,
            store_max_connections: config.store.max_connections,
            pool_instances: config.runtime.pool_instances,
            max_in_flight: weir::pipeline::binding::DEFAULT_MAX_IN_FLIGHT,
            ordering: "key",
        }
    }
}

/// Where the run ran.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    /// Kafka bootstrap servers.
    pub kafka: String,
    /// The store URL, password hidden.
    pub store: String,
    /// PostgreSQL settings that change what the figures mean.
    pub postgres: ServerSettings,
    /// The host's settings.
    pub pipeline: PipelineFigures,
    /// The handler component.
    pub component: String,
    /// The throughput topic.
    pub topic: String,
    /// The latency topic.
    pub latency_topic: String,
}

/// Ratios between the phases' rates.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Weir's rate ÷ the raw consumer's.
    pub weir_to_raw: f64,
    /// Weir's rate ÷ the per-message baseline's.
    pub weir_to_seed: f64,
    /// The baseline's rate ÷ the raw consumer's.
    pub seed_to_raw: f64,
    /// The fill's rate ÷ the raw consumer's.
    pub fill_to_raw: f64,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Counts and sizes.
    pub plan: Plan,
    /// Where it ran.
    pub environment: Environment,
    /// Producing the topic.
    pub fill: PhaseFigures,
    /// The bare consumer.
    pub raw: PhaseFigures,
    /// Weir end to end.
    pub weir: PhaseFigures,
    /// The per-message baseline.
    pub seed: PhaseFigures,
    /// Rate ratios.
    pub ratios: Ratios,
    /// Produce → committed latency at a fixed rate.
    pub latency: LatencyFigures,
    /// The I/O-bound handler: key-ordered against partition-sequential.
    pub io: IoFigures,
}

impl Report {
    /// Assemble the report and its ratios (one argument per phase).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        plan: Plan,
        environment: Environment,
        fill: PhaseFigures,
        raw: PhaseFigures,
        weir: PhaseFigures,
        seed: PhaseFigures,
        latency: LatencyFigures,
        io: IoFigures,
    ) -> Self {
        let ratios = Ratios {
            weir_to_raw: weir.msgs_per_second / raw.msgs_per_second,
            weir_to_seed: weir.msgs_per_second / seed.msgs_per_second,
            seed_to_raw: seed.msgs_per_second / raw.msgs_per_second,
            fill_to_raw: fill.msgs_per_second / raw.msgs_per_second,
        };
        Self {
            plan,
            environment,
            fill,
            raw,
            weir,
            seed,
            ratios,
            latency,
            io,
        }
    }

    /// The human-readable result.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let plan = &self.plan;
        let env = &self.environment;
        let pg = &env.postgres;
        let pipeline = &env.pipeline;
        if plan.smoke {
            let _ = writeln!(
                out,
                "SMOKE RUN: tiny counts to prove the harness works; the timings mean nothing.\n"
            );
        }
        let _ = writeln!(
            out,
            "{} messages of {} B over {} keys, {} partitions; kafka {}; PostgreSQL {} \
             (fsync {}, synchronous_commit {})",
            plan.messages,
            plan.size,
            plan.keys,
            plan.partitions,
            env.kafka,
            pg.version,
            pg.fsync,
            pg.synchronous_commit
        );
        let _ = writeln!(
            out,
            "weir: group commit ≤ {} completions, linger {} ms, {} store connections, \
             max_in_flight {}, ordering {}; handler {}\n",
            pipeline.commit_batch_max,
            pipeline.commit_linger_ms,
            pipeline.store_max_connections,
            pipeline.max_in_flight,
            pipeline.ordering,
            env.component
        );
        let _ = writeln!(
            out,
            "{:<7} {:>10} {:>11} {:>9} {:>10} {:>8} {:>13} {:>13}",
            "phase",
            "messages",
            "start-up s",
            "seconds",
            "msg/s",
            "÷ raw",
            "cpu µs/msg¹",
            "machine µs²"
        );
        let micros = |us: Option<f64>| us.map_or_else(|| "-".to_owned(), |us| format!("{us:.2}"));
        for (name, phase) in [
            ("fill", &self.fill),
            ("raw", &self.raw),
            ("weir", &self.weir),
            ("seed", &self.seed),
        ] {
            let startup = phase
                .startup_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}"));
            let _ = writeln!(
                out,
                "{name:<7} {:>10} {startup:>11} {:>9.3} {:>10.0} {:>8.3} {:>13} {:>13}",
                phase.messages,
                phase.seconds,
                phase.msgs_per_second,
                phase.msgs_per_second / self.raw.msgs_per_second,
                micros(phase.cpu.process_us),
                micros(phase.cpu.machine_us)
            );
        }
        let _ = writeln!(
            out,
            "¹ CPU time of this process (the raw consumer; Weir) per message while the phase drained\n\
             ² CPU time of the whole machine (this process, the broker, PostgreSQL) per message"
        );
        let _ = writeln!(
            out,
            "\nweir ÷ raw  = {:.3}\nweir ÷ seed = {:.1}×",
            self.ratios.weir_to_raw, self.ratios.weir_to_seed
        );
        let latency = &self.latency;
        let _ = writeln!(
            out,
            "\nlatency, produce → effects committed ({} msg/s offered for {} s, {} messages, \
             after {} warm-up messages at that rate; producer linger {} ms; commit time = {}):",
            latency.offered_rate,
            latency.seconds,
            latency.messages,
            latency.warmup_load_messages,
            latency.producer_linger_ms,
            latency.commit_time
        );
        let _ = writeln!(
            out,
            "  p50 {:.1} ms   p95 {:.1} ms   p99 {:.1} ms   max {:.1} ms   (min {:.1} ms; \
             largest send lag {:.1} ms; warm-up {:.1} s)",
            latency.p50_ms,
            latency.p95_ms,
            latency.p99_ms,
            latency.max_ms,
            latency.min_ms,
            latency.pacing_lag_max_ms,
            latency.warmup_seconds
        );
        let _ = writeln!(
            out,
            "  the same messages, produce → received by a bare librdkafka consumer beside Weir:\n  \
             p50 {:.1} ms   p95 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
            latency.raw.p50_ms, latency.raw.p95_ms, latency.raw.p99_ms, latency.raw.max_ms
        );
        let io = &self.io;
        let _ = writeln!(
            out,
            "\nI/O-bound handler (waits {} ms in a host call; 1 partition, {} keys):\n  \
             weir, per-key ordering (max_in_flight {}): {}\n  partition-sequential: {}\n  \
             weir ÷ sequential = {:.1}×",
            io.wait_ms, io.keys, io.max_in_flight, io.weir, io.sequential, io.ratio
        );
        out
    }
}
