//! The I/O-bound phase: a handler that waits in a host call for each message (the `sleep`
//! fixture: WASI's monotonic clock, `--io-wait-ms`, default 5 ms), on a topic of one partition
//! with 1 000 keys. Weir runs it twice on the same host settings: with per-key ordering (messages
//! of different keys wait side by side, up to the binding's `max_in_flight`) and with
//! per-partition ordering — partition-sequential processing, one message at a time, the way a
//! plain consumer loop handles a partition.
//!
//! Owns the phase's topics, bindings and figures; the timing is the weir phase's
//! ([`host::timed`]).

use anyhow::Context as _;
use serde::Serialize;
use weir::pipeline::Ordering;
use weir_acceptance::unique_name;

use crate::report::PhaseFigures;
use crate::{Bench, Plan, host, kafka, progress};

/// Handler name of the waiting component in the store.
const HANDLER: &str = "sleep";
/// The component, as `cargo build --release --target wasm32-wasip2 -p weir-fixture-sleep` builds it.
pub const COMPONENT: &str = "weir_fixture_sleep.wasm";

/// What the phase found.
#[derive(Debug, Clone, Serialize)]
pub struct IoFigures {
    /// Wait per message in the host call, milliseconds.
    pub wait_ms: u64,
    /// Distinct keys.
    pub keys: u64,
    /// `max_in_flight` of the key-ordered binding.
    pub max_in_flight: usize,
    /// Weir, per-key ordering.
    pub weir: PhaseFigures,
    /// Weir, per-partition ordering (one message at a time).
    pub sequential: PhaseFigures,
    /// `weir ÷ sequential`.
    pub ratio: f64,
}

/// Run the phase with the plan's counts.
pub async fn run(
    config: &weir::config::WeirConfig,
    bench: &mut Bench,
    plan: &Plan,
) -> anyhow::Result<IoFigures> {
    let path = weir_acceptance::components_dir().join(COMPONENT);
    let component = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}; build it with `cargo build --release --target wasm32-wasip2 -p \
             weir-fixture-sleep`",
            path.display()
        )
    })?;
    let wait = plan.io_wait_ms.to_string();
    // Every invocation in flight holds an instance: stay within the host's pool.
    let max_in_flight = plan
        .io_max_in_flight
        .min(config.runtime.pool_instances as usize);
    let mut figures = Vec::new();
    for (name, ordering, messages) in [
        ("weir", Ordering::Key, plan.io_messages),
        (
            "sequential",
            Ordering::Partition,
            plan.io_sequential_messages,
        ),
    ] {
        let topic = unique_name(&format!("weir_bench_io_{name}"));
        bench.admin.create_topic(&topic, 1).await?;
        bench.topics.push(topic.clone());
        let fill_plan = Plan {
            messages,
            keys: plan.io_keys,
            partitions: 1,
            size: 64,
            ..plan.clone()
        };
        let fill = kafka::fill(&bench.kafka, &topic, &fill_plan).await?;
        let configure = |spec: &mut weir::pipeline::BindingSpec| {
            spec.ordering = ordering;
            spec.max_in_flight = max_in_flight;
            spec.config.insert("sleep-ms".to_owned(), wait.clone());
        };
        let handler = host::Handler {
            name: HANDLER,
            component: &component,
            configure: &configure,
        };
        let measured = host::timed(
            config,
            bench,
            &format!("{}.io_{name}", bench.tenant),
            &topic,
            &handler,
            &fill.last_ids,
            messages,
        )
        .await?;
        progress(format_args!("io {name}: {measured}"));
        figures.push(measured);
    }
    let sequential = figures.pop().context("no sequential figures")?;
    let weir = figures.pop().context("no weir figures")?;
    Ok(IoFigures {
        wait_ms: plan.io_wait_ms,
        keys: plan.io_keys,
        max_in_flight,
        ratio: weir.msgs_per_second / sequential.msgs_per_second,
        weir,
        sequential,
    })
}
