//! `weir-bench`: Weir's side-by-side benchmark. One run, one real Kafka broker, one real
//! PostgreSQL server, five phases:
//!
//! 1. **fill** — a fresh topic, `--messages` records of `--size` bytes over `--keys` keys,
//!    produced with an idempotent producer;
//! 2. **raw** — a bare librdkafka consumer drains that topic (the limit of the machine);
//! 3. **weir** — Weir drains it end to end (`weir::serve::serve` in this process, a no-op
//!    handler, key ordering, every processed key committed through the PostgreSQL store);
//! 4. **seed** — the baseline algorithm written plainly: one transaction and one synchronous
//!    offset commit per message, over a prefix of the topic;
//! 5. **latency** — a second fresh topic fed at a fixed rate while Weir consumes it; produce →
//!    effects-committed latency from the store's processed keys.
//!
//! It prints a table and the ratios (`--json`: every figure as one JSON document). `--smoke`
//! runs tiny counts to prove the harness works; its timings mean nothing.
//!
//! This file owns the command line, the plan (counts and sizes), the order of the phases and
//! the clean-up: every topic and the database schema the run created are removed at the end,
//! on failure too, unless `--keep`. Each phase lives in a module of its own; none of them knows
//! the others.

mod cpu;
mod database;
mod host;
mod io;
mod kafka;
mod latency;
mod report;
mod seed;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};
use clap::Parser;
use serde::Serialize;
use weir_acceptance::{DATABASE_URL_ENV, KAFKA_ENV, unique_name};

use crate::report::Report;

/// Messages in the throughput topic by default.
const DEFAULT_MESSAGES: u64 = 200_000;
/// Payload size by default: 1 KiB, the size the invocation benchmark's middle row uses.
const DEFAULT_SIZE: usize = 1024;
/// Distinct message keys by default.
const DEFAULT_KEYS: u64 = 10_000;
/// Partitions of each topic by default.
const DEFAULT_PARTITIONS: i32 = 12;
/// Messages the per-message baseline handles by default: a prefix, because it is slow.
const DEFAULT_SEED_MESSAGES: u64 = 5_000;
/// Offered rate of the latency phase by default, messages per second.
const DEFAULT_RATE: u64 = 10_000;
/// Length of the latency phase by default, seconds.
const DEFAULT_LATENCY_SECS: u64 = 10;
/// Seconds of the offered load sent before the latency phase measures, by default.
const DEFAULT_LATENCY_WARMUP_SECS: u64 = 1;
/// `linger.ms` of the latency phase's producer by default: librdkafka's own default.
const DEFAULT_PRODUCER_LINGER_MS: u64 = 5;

/// `--smoke`: counts small enough that the whole run takes seconds.
const SMOKE_MESSAGES: u64 = 2_000;
const SMOKE_SEED_MESSAGES: u64 = 200;
const SMOKE_RATE: u64 = 500;
const SMOKE_LATENCY_SECS: u64 = 2;
/// Messages of the I/O-bound phase's key-ordered run.
const DEFAULT_IO_MESSAGES: u64 = 20_000;
const SMOKE_IO_MESSAGES: u64 = 200;
/// Messages of the I/O-bound phase's partition-sequential run (at 5 ms each: 5 s).
const DEFAULT_IO_SEQUENTIAL_MESSAGES: u64 = 1_000;
const SMOKE_IO_SEQUENTIAL_MESSAGES: u64 = 20;
/// Wait per message in the I/O-bound phase, milliseconds.
const DEFAULT_IO_WAIT_MS: u64 = 5;
/// Keys of the I/O-bound phase.
const IO_KEYS: u64 = 1_000;
/// `max_in_flight` of the I/O-bound phase's key-ordered binding (capped by the host's instance
/// pool).
const DEFAULT_IO_MAX_IN_FLIGHT: usize = 120;

/// The component the benchmark deploys when `--component` is not given.
const DEFAULT_COMPONENT: &str = "weir_fixture_noop.wasm";

/// Weir's side-by-side benchmark: raw Kafka consumption, Weir end to end, and the per-message
/// baseline, against the same broker and database in one run; then Weir's latency at a fixed
/// offered rate.
#[derive(Debug, Parser)]
#[command(name = "weir-bench", version)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = KAFKA_ENV, value_name = "HOST:PORT")]
    kafka: Option<String>,
    /// PostgreSQL URL. The run works in a schema of its own, dropped at the end.
    #[arg(long, env = DATABASE_URL_ENV, value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The no-op handler component [default: <target>/wasm32-wasip2/release/weir_fixture_noop.wasm,
    /// built by `cargo build --release --target wasm32-wasip2 -p weir-fixture-noop`; the
    /// `checksum` fixture, which also reads every payload byte, is the harsher alternative].
    #[arg(long, value_name = "PATH")]
    component: Option<PathBuf>,
    /// Messages in the throughput topic [default: 200000; smoke: 2000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    messages: Option<u64>,
    /// Payload bytes per message [default: 1024].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    size: Option<u64>,
    /// Distinct message keys [default: 10000].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    keys: Option<u64>,
    /// Partitions of each topic the run creates [default: 12].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1_000))]
    partitions: Option<i32>,
    /// Messages the per-message baseline handles, a prefix of the topic [default: 5000; smoke: 200].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    seed_messages: Option<u64>,
    /// Offered rate of the latency phase, messages per second [default: 10000; smoke: 500].
    #[arg(long, value_name = "MSG/S", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: Option<u64>,
    /// Length of the latency phase, seconds [default: 10; smoke: 2].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3_600))]
    latency_secs: Option<u64>,
    /// Seconds of the offered load sent, and not measured, before the latency phase measures
    /// [default: 1].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=600))]
    latency_warmup_secs: Option<u64>,
    /// `linger.ms` of the latency phase's producer; its wait counts in the latency [default: 5,
    /// librdkafka's own].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=1_000))]
    producer_linger_ms: Option<u64>,
    /// A librdkafka property for the host's consumers and producers, as the host's
    /// `kafka.client_overrides` sets it (repeatable), e.g. `--kafka-override fetch.min.bytes=1024`.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_override)]
    kafka_override: Vec<(String, String)>,
    /// Messages of the I/O-bound phase, key-ordered run [default: 20000; smoke: 200]; the
    /// partition-sequential run handles a twentieth (at least 20).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    io_messages: Option<u64>,
    /// Wait per message of the I/O-bound phase, milliseconds [default: 5].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    io_wait_ms: Option<u64>,
    /// `max_in_flight` of the I/O-bound phase's key-ordered binding [default: 120].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    io_max_in_flight: Option<u64>,
    /// Tiny counts, to prove the harness works (CI); the timings mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Print every figure as one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the topics and the database schema the run created (for inspection).
    #[arg(long)]
    keep: bool,
}

/// What the run does: every count and size, resolved from the flags and `--smoke`.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Messages in the throughput topic.
    pub messages: u64,
    /// Payload bytes per message.
    pub size: usize,
    /// Distinct message keys.
    pub keys: u64,
    /// Partitions of each topic.
    pub partitions: i32,
    /// Messages the per-message baseline handles (at most `messages`).
    pub seed_messages: u64,
    /// Offered rate of the latency phase, messages per second.
    pub rate: u64,
    /// Length of the latency phase, seconds.
    pub latency_secs: u64,
    /// Seconds of offered load before the latency phase measures.
    pub latency_warmup_secs: u64,
    /// `linger.ms` of the latency phase's producer.
    pub producer_linger_ms: u64,
    /// librdkafka properties set on the host's clients (`kafka.client_overrides`).
    pub kafka_overrides: Vec<(String, String)>,
    /// Messages of the I/O-bound phase's key-ordered run.
    pub io_messages: u64,
    /// Messages of its partition-sequential run.
    pub io_sequential_messages: u64,
    /// Its wait per message, milliseconds.
    pub io_wait_ms: u64,
    /// Its keys.
    pub io_keys: u64,
    /// Its key-ordered binding's `max_in_flight`.
    pub io_max_in_flight: usize,
    /// Whether this is a smoke run (timings not meaningful).
    pub smoke: bool,
}

impl Plan {
    fn from_args(args: &Args) -> Self {
        let smoke = args.smoke;
        let pick = |given: Option<u64>, smoke_value: u64, default: u64| {
            given.unwrap_or(if smoke { smoke_value } else { default })
        };
        let messages = pick(args.messages, SMOKE_MESSAGES, DEFAULT_MESSAGES);
        Self {
            messages,
            size: args.size.map_or(DEFAULT_SIZE, |size| {
                usize::try_from(size).unwrap_or(DEFAULT_SIZE)
            }),
            keys: args.keys.unwrap_or(DEFAULT_KEYS),
            partitions: args.partitions.unwrap_or(DEFAULT_PARTITIONS),
            seed_messages: pick(
                args.seed_messages,
                SMOKE_SEED_MESSAGES,
                DEFAULT_SEED_MESSAGES,
            )
            .min(messages),
            rate: pick(args.rate, SMOKE_RATE, DEFAULT_RATE),
            latency_secs: pick(args.latency_secs, SMOKE_LATENCY_SECS, DEFAULT_LATENCY_SECS),
            latency_warmup_secs: args
                .latency_warmup_secs
                .unwrap_or(DEFAULT_LATENCY_WARMUP_SECS),
            producer_linger_ms: args
                .producer_linger_ms
                .unwrap_or(DEFAULT_PRODUCER_LINGER_MS),
            kafka_overrides: args.kafka_override.clone(),
            io_messages: pick(args.io_messages, SMOKE_IO_MESSAGES, DEFAULT_IO_MESSAGES),
            io_sequential_messages: match args.io_messages {
                Some(n) => (n / 20).max(20),
                None if smoke => SMOKE_IO_SEQUENTIAL_MESSAGES,
                None => DEFAULT_IO_SEQUENTIAL_MESSAGES,
            },
            io_wait_ms: args.io_wait_ms.unwrap_or(DEFAULT_IO_WAIT_MS),
            io_keys: IO_KEYS,
            io_max_in_flight: args.io_max_in_flight.map_or(DEFAULT_IO_MAX_IN_FLIGHT, |n| {
                usize::try_from(n).unwrap_or(DEFAULT_IO_MAX_IN_FLIGHT)
            }),
            smoke,
        }
    }
}

/// One `--kafka-override`: `KEY=VALUE`, neither side empty.
fn parse_override(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() && !value.is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// A progress line on stderr (stdout carries the result).
pub fn progress(line: impl std::fmt::Display) {
    eprintln!("weir-bench: {line}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The host's per-message span and handler lines at `info`, as `weir serve` runs by default
    // (so the bench pays what production pays); the rest of the host's chatter at `warn`.
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,weir::message=info,weir::handler=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("weir-bench: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json;
    match runtime.block_on(run(args)) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("weir-bench: error: cannot write the report as JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weir-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where the run talks to, and what it created (removed at the end).
pub struct Bench {
    /// Kafka bootstrap servers.
    pub kafka: String,
    /// The run's schema in PostgreSQL.
    pub schema: database::BenchSchema,
    /// Topic administration.
    pub admin: kafka::Admin,
    /// The handler component's bytes.
    pub component: Vec<u8>,
    /// Path of the component, for the report.
    pub component_path: PathBuf,
    /// Tenant owning the run's handler and bindings.
    pub tenant: String,
    /// Topics created so far.
    pub topics: Vec<String>,
}

async fn run(args: Args) -> anyhow::Result<Report> {
    let plan = Plan::from_args(&args);
    let kafka = args
        .kafka
        .clone()
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| {
            anyhow!(
                "no Kafka broker: pass --kafka HOST:PORT or set {KAFKA_ENV} \
             (`tests/services up`, then `source <(tests/services env)`)"
            )
        })?;
    let database_url = args
        .database_url
        .clone()
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| {
            anyhow!(
                "no PostgreSQL server: pass --database-url URL or set {DATABASE_URL_ENV} \
                 (`tests/services up`, then `source <(tests/services env)`)"
            )
        })?;
    let component_path = args
        .component
        .clone()
        .unwrap_or_else(|| weir_acceptance::components_dir().join(DEFAULT_COMPONENT));
    let component = std::fs::read(&component_path).with_context(|| {
        format!(
            "cannot read the handler component {}; build it with `cargo build --release \
             --target wasm32-wasip2 -p weir-fixture-noop` or pass --component",
            component_path.display()
        )
    })?;
    host::check_component(&component)
        .with_context(|| format!("{} is not a valid Weir handler", component_path.display()))?;

    let admin = kafka::Admin::new(&kafka)?;
    let schema = database::BenchSchema::create(&database_url).await?;
    let mut bench = Bench {
        kafka,
        schema,
        admin,
        component,
        component_path,
        tenant: unique_name("bench"),
        topics: Vec::new(),
    };
    let outcome = phases(&plan, &mut bench).await;

    if args.keep {
        progress(format_args!(
            "kept topics {} and schema {}",
            bench.topics.join(", "),
            bench.schema.name
        ));
    } else {
        if let Err(e) = bench.admin.delete_topics(&bench.topics).await {
            progress(format_args!("warning: {e:#}"));
        }
        if let Err(e) = bench.schema.drop().await {
            progress(format_args!("warning: {e:#}"));
        }
    }
    outcome
}

async fn phases(plan: &Plan, bench: &mut Bench) -> anyhow::Result<Report> {
    let settings = bench.schema.settings().await?;
    let config = host::config(&bench.kafka, &bench.schema.url, &plan.kafka_overrides)?;
    progress(format_args!(
        "{} messages of {} B over {} keys, {} partitions; store schema {}{}",
        plan.messages,
        plan.size,
        plan.keys,
        plan.partitions,
        bench.schema.name,
        if plan.smoke {
            " (smoke: timings not meaningful)"
        } else {
            ""
        }
    ));

    let topic = unique_name("weir_bench");
    bench.admin.create_topic(&topic, plan.partitions).await?;
    bench.topics.push(topic.clone());
    let fill = kafka::fill(&bench.kafka, &topic, plan).await?;
    progress(format_args!("fill: {}", fill.figures));

    let raw = kafka::drain(&bench.kafka, &topic, plan.messages).await?;
    progress(format_args!("raw: {}", raw));

    let weir = host::throughput(&config, bench, &topic, &fill.last_ids, plan.messages).await?;
    progress(format_args!("weir: {}", weir));

    let seed = seed::run(&bench.kafka, &topic, &bench.schema.url, plan.seed_messages).await?;
    progress(format_args!("seed: {}", seed));

    let latency_topic = unique_name("weir_bench_latency");
    bench
        .admin
        .create_topic(&latency_topic, plan.partitions)
        .await?;
    bench.topics.push(latency_topic.clone());
    let latency = latency::run(&config, bench, &latency_topic, plan, &settings).await?;
    progress(format_args!("latency: {}", latency));

    let io = io::run(&config, bench, plan).await?;

    Ok(Report::new(
        plan.clone(),
        report::Environment {
            kafka: bench.kafka.clone(),
            store: config.store.redacted_url(),
            postgres: settings,
            pipeline: report::PipelineFigures::from(&config),
            component: bench.component_path.display().to_string(),
            topic,
            latency_topic,
        },
        fill.figures,
        raw,
        weir,
        seed,
        latency,
        io,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Plan {
        let mut argv = vec!["weir-bench"];
        argv.extend_from_slice(args);
        Plan::from_args(&Args::parse_from(argv))
    }

    #[test]
    fn kafka_overrides_are_key_value_pairs() {
        let plan = parse(&[
            "--kafka-override",
            "fetch.min.bytes=1024",
            "--kafka-override",
            "client.id=a=b",
        ]);
        assert_eq!(
            plan.kafka_overrides,
            vec![
                ("fetch.min.bytes".to_owned(), "1024".to_owned()),
                ("client.id".to_owned(), "a=b".to_owned()),
            ]
        );
        for bad in ["fetch.min.bytes", "=1", "fetch.min.bytes="] {
            assert!(
                Args::try_parse_from(["weir-bench", "--kafka-override", bad]).is_err(),
                "{bad}"
            );
        }
        let plan = parse(&[]);
        assert_eq!(plan.producer_linger_ms, DEFAULT_PRODUCER_LINGER_MS);
        assert_eq!(plan.latency_warmup_secs, DEFAULT_LATENCY_WARMUP_SECS);
    }

    #[test]
    fn smoke_shrinks_the_counts_but_explicit_flags_win() {
        let full = parse(&[]);
        assert_eq!(full.messages, DEFAULT_MESSAGES);
        assert_eq!(full.seed_messages, DEFAULT_SEED_MESSAGES);
        let smoke = parse(&["--smoke"]);
        assert_eq!(smoke.messages, SMOKE_MESSAGES);
        assert_eq!(smoke.seed_messages, SMOKE_SEED_MESSAGES);
        assert_eq!(smoke.rate, SMOKE_RATE);
        assert_eq!(smoke.latency_secs, SMOKE_LATENCY_SECS);
        assert_eq!(parse(&["--smoke", "--messages", "5000"]).messages, 5000);
        assert_eq!(
            (
                full.io_messages,
                full.io_sequential_messages,
                full.io_wait_ms
            ),
            (DEFAULT_IO_MESSAGES, DEFAULT_IO_SEQUENTIAL_MESSAGES, 5)
        );
        assert_eq!(
            (smoke.io_messages, smoke.io_sequential_messages),
            (SMOKE_IO_MESSAGES, SMOKE_IO_SEQUENTIAL_MESSAGES)
        );
        assert_eq!(
            parse(&["--io-messages", "4000"]).io_sequential_messages,
            200
        );
    }

    #[test]
    fn the_baseline_never_handles_more_than_the_topic_holds() {
        assert_eq!(parse(&["--messages", "100"]).seed_messages, 100);
    }
}
