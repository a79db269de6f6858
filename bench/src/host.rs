//! Weir under test, run the way production runs it: [`weir::serve::serve`] in this process,
//! with the handler and its binding put in the store through the store API, as
//! `weir handler deploy` does (version, activation, binding).
//!
//! Owns the host's configuration for the run (the defaults, or `WEIR_*` overrides from the
//! environment, pointed at the run's broker and schema), deploying and removing the run's
//! bindings, starting and stopping the host, and the **weir** throughput phase: waiting until
//! the store holds a processed key for every message of the topic. Nothing of the host is
//! tuned here; the report shows the pipeline settings in force.
//!
//! Knows nothing of the host's insides: it sees only what a user sees, the store and Kafka.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir::config::WeirConfig;
use weir::pipeline::BindingSpec;
use weir::runtime::{Runtime, RuntimeConfig};
use weir::serve::ServeError;
use weir::store::Quota;

use crate::Bench;
use crate::cpu::Mark;
use crate::kafka::STALL_TIMEOUT;
use crate::report::PhaseFigures;

/// Handler name of the no-op component in the store.
const HANDLER: &str = "noop";
/// How often the throughput phase asks the store whether the last messages committed.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// How often the throughput phase counts every processed key, to see progress.
const COUNT_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for the host to drain and stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Validate and compile `component` in a runtime like the host's, so that a bad file fails the
/// run at once rather than as a binding that never starts.
pub fn check_component(component: &[u8]) -> anyhow::Result<()> {
    let runtime = Runtime::new(RuntimeConfig {
        // Loading compiles; it instantiates nothing, so one slot is enough.
        pool_instances: 1,
        ..RuntimeConfig::default()
    })
    .context("cannot start the wasm runtime")?;
    runtime.load(component)?;
    Ok(())
}

/// The host's configuration: every default (or a `WEIR_*` override from the environment),
/// with the run's broker and store, `overrides` added to `kafka.client_overrides`, and the
/// health endpoint on a free loopback port.
pub fn config(
    kafka: &str,
    store_url: &str,
    overrides: &[(String, String)],
) -> anyhow::Result<WeirConfig> {
    let mut config =
        WeirConfig::load(None, std::env::vars()).context("invalid WEIR_* environment")?;
    config.store.url = store_url.to_owned();
    config.kafka.bootstrap_servers = kafka.to_owned();
    config.server.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config
        .kafka
        .client_overrides
        .extend(overrides.iter().cloned());
    config
        .validate()
        .context("invalid host configuration for the benchmark")?;
    Ok(config)
}

/// A binding the run deployed.
pub struct Deployment {
    /// Binding id: the first half of its processed keys.
    pub binding_id: String,
}

/// What a phase deploys: a handler (name and component) and how its binding differs from the
/// defaults.
pub struct Handler<'a> {
    /// Handler name in the store.
    pub name: &'a str,
    /// Component bytes.
    pub component: &'a [u8],
    /// Settings of the binding that are not the defaults.
    pub configure: &'a dyn Fn(&mut BindingSpec),
}

/// The run's no-op handler, bound with every default.
pub fn noop(bench: &Bench) -> Handler<'_> {
    Handler {
        name: HANDLER,
        component: &bench.component,
        configure: &|_| {},
    }
}

/// Put `handler`'s component in the store as its active version, and bind it to `topic` under
/// `binding_id` with a consumer group of its own and the handler's settings.
pub async fn deploy(
    config: &WeirConfig,
    bench: &Bench,
    binding_id: &str,
    topic: &str,
    handler: &Handler<'_>,
) -> anyhow::Result<Deployment> {
    let store = config
        .store
        .connect()
        .await
        .with_context(|| format!("cannot open the store at {}", config.store.redacted_url()))?;
    let deployed = async {
        let version = store
            .put_handler_version(
                &bench.tenant,
                handler.name,
                handler.component,
                &Quota::default(),
            )
            .await?;
        store
            .activate(&bench.tenant, handler.name, version.version)
            .await?;
        let mut spec = BindingSpec::new(&bench.tenant, handler.name, vec![topic.to_owned()]);
        spec.group_id = Some(format!("weir.{binding_id}"));
        (handler.configure)(&mut spec);
        spec.validate()?;
        let spec = serde_json::to_value(&spec)?;
        store
            .put_binding(binding_id, &bench.tenant, handler.name, &spec)
            .await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    store.close().await;
    deployed.with_context(|| format!("cannot deploy binding {binding_id}"))?;
    Ok(Deployment {
        binding_id: binding_id.to_owned(),
    })
}

impl Deployment {
    /// Delete the binding (its processed keys stay), so that the next host does not run it.
    pub async fn remove(self, config: &WeirConfig) -> anyhow::Result<()> {
        let store = config.store.connect().await?;
        let deleted = store.delete_binding(&self.binding_id).await;
        store.close().await;
        deleted.with_context(|| format!("cannot delete binding {}", self.binding_id))?;
        Ok(())
    }
}

/// A running host.
pub struct Host {
    shutdown: CancellationToken,
    /// `None` once the host stopped by itself and [`Host::check`] reported it.
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Host {
    /// Start `weir serve` in this process.
    pub fn start(config: &WeirConfig) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(weir::serve::serve(config.clone(), shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// An error if the host has stopped by itself (reported once; later calls say only that it
    /// stopped).
    pub async fn check(&mut self) -> anyhow::Result<()> {
        match self.task.take_if(|task| task.is_finished()) {
            Some(task) => match task.await {
                Ok(Ok(())) => bail!("weir serve stopped by itself"),
                joined => served(joined),
            },
            None if self.task.is_none() => bail!("weir serve has stopped"),
            None => Ok(()),
        }
    }

    /// Drain and stop the host. A host that stopped by itself and was reported by
    /// [`Host::check`] has nothing left to stop.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if self.task.is_none() {
            return Ok(());
        }
        self.check().await?;
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        self.shutdown.cancel();
        match tokio::time::timeout(STOP_TIMEOUT, &mut task).await {
            Err(_) => {
                task.abort();
                bail!("weir serve did not stop within {STOP_TIMEOUT:?}")
            }
            Ok(joined) => served(joined),
        }
    }
}

/// What the host's task ended with.
fn served(joined: Result<Result<(), ServeError>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow!(e).context("weir serve failed")),
        Err(e) => Err(anyhow!(e).context("weir serve panicked")),
    }
}

/// The weir phase: deploy a binding of the no-op handler to `topic`, start the host, and time
/// it until every one of `messages` messages has a processed key. `last_ids` are the ids of
/// the last message of each partition (see [`crate::kafka::Fill`]).
pub async fn throughput(
    config: &WeirConfig,
    bench: &Bench,
    topic: &str,
    last_ids: &[String],
    messages: u64,
) -> anyhow::Result<PhaseFigures> {
    timed(
        config,
        bench,
        &format!("{}.throughput", bench.tenant),
        topic,
        &noop(bench),
        last_ids,
        messages,
    )
    .await
}

/// Deploy `handler` to `topic` as `binding_id`, start a host, and time it until every one of
/// `messages` messages has a processed key; then stop the host and remove the binding.
pub async fn timed(
    config: &WeirConfig,
    bench: &Bench,
    binding_id: &str,
    topic: &str,
    handler: &Handler<'_>,
    last_ids: &[String],
    messages: u64,
) -> anyhow::Result<PhaseFigures> {
    let deployment = deploy(config, bench, binding_id, topic, handler).await?;
    let start = Instant::now();
    let mut host = Host::start(config);
    let measured = wait_for_all(
        &mut host,
        bench,
        &deployment,
        topic,
        last_ids,
        messages,
        start,
    )
    .await;
    let stopped = host.stop().await;
    let removed = deployment.remove(config).await;
    let figures = measured?;
    stopped?;
    removed?;
    Ok(figures)
}

async fn wait_for_all(
    host: &mut Host,
    bench: &Bench,
    deployment: &Deployment,
    topic: &str,
    last_ids: &[String],
    messages: u64,
    start: Instant,
) -> anyhow::Result<PhaseFigures> {
    let binding = deployment.binding_id.as_str();
    // The messages carry no `message-id` header: their ids are `topic/partition/offset`, kept
    // as bits of offset blocks.
    let schema = &bench.schema;
    let expected = i64::try_from(messages).context("too many messages")?;
    let tails = i64::try_from(last_ids.len()).context("too many partitions")?;
    let started = Mark {
        at: start,
        cpu: crate::cpu::CpuSample::now(),
    };
    let mut first: Option<Mark> = None;
    let mut counted = 0;
    let mut counted_at = start;
    let mut progress_at = start;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        host.check().await?;
        if first.is_none() {
            if schema.any_position_committed(binding, topic).await? {
                first = Some(Mark::now());
            } else if start.elapsed() > STALL_TIMEOUT {
                bail!(
                    "weir: no message committed within {STALL_TIMEOUT:?} of starting the host \
                     (set WEIR_LOG=info to see the host's log)"
                );
            }
            continue;
        }
        if schema.committed_among(binding, last_ids).await? == tails {
            // The run ended when the last messages were seen committed; counting every
            // processed key (to confirm none is missing) takes a while and is not part of it.
            let end = Mark::now();
            let all = schema.positions_committed(binding, topic).await?;
            if all >= expected {
                if all > expected {
                    bail!("weir: {all} processed keys for {expected} messages");
                }
                return Ok(PhaseFigures::drained(
                    messages,
                    start,
                    first.unwrap_or(started),
                    end,
                ));
            }
        }
        if counted_at.elapsed() >= COUNT_EVERY {
            let now = schema.positions_committed(binding, topic).await?;
            counted_at = Instant::now();
            if now > counted {
                counted = now;
                progress_at = counted_at;
            } else if progress_at.elapsed() > STALL_TIMEOUT {
                bail!(
                    "weir: no progress for {STALL_TIMEOUT:?}: {counted} of {expected} messages \
                     committed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_host_that_fails_at_start_is_reported_once_and_stops_quietly() {
        let mut config = WeirConfig::load(None, std::iter::empty::<(String, String)>())
            .expect("the defaults load");
        config.store.url = "nosuch://store".to_owned();
        config.server.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let mut host = Host::start(&config);
        let since = Instant::now();
        let error = loop {
            if let Err(e) = host.check().await {
                break e;
            }
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "the host kept running"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(
            format!("{error:#}").contains("weir serve failed"),
            "{error:#}"
        );
        let again = host.check().await.expect_err("still stopped");
        assert!(again.to_string().contains("has stopped"), "{again:#}");
        host.stop().await.expect("nothing left to stop");
    }
}
