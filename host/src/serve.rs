//! `weir serve`: the long-running host. Reconciles bindings from the store and runs one
//! [`Worker`] per binding, the outbox relay, the health endpoints and `/metrics` (one
//! [`Metrics`] registry per process, shared with the workers and the relay; the store's gauges
//! sampled every [`METRICS_SAMPLE_EVERY`]).
//!
//! Owns the lifecycle of workers: started when a binding appears, restarted when its revision
//! changes (a new spec), stopped (drained) when it disappears or the process shuts down. When
//! only its handler's active version changes, the worker keeps running: the new version is
//! compiled off the executor and swapped into the worker's [`HandlerSlot`], so it takes effect
//! for the next message without restarting the consumer, while invocations already running
//! finish on the version they started with (SEMANTICS §4). A version that cannot be compiled is
//! logged and left out (the worker keeps its version) until another one is activated. Every
//! host process does the same from the same store, so a second process joins the same consumer
//! groups and Kafka spreads the partitions, and each swaps versions on its own next
//! reconciliation. Tenants' rate limits are refreshed at every reconciliation too: one
//! [`TenantLimiter`] per tenant on this host ([`RateLimits`]), shared by the workers of all the
//! tenant's bindings here, so a changed limit applies to running workers without a restart.
//! Knows nothing of SQL, librdkafka settings or wasmtime beyond the modules'
//! public APIs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::WeirConfig;
use crate::kafka::{Relay, RelaySettings};
use crate::metrics::Metrics;
use crate::pipeline::intake::PauseSwitch;
use crate::pipeline::rate_limit::{RateLimits, TenantLimiter};
use crate::pipeline::worker::{Worker, WorkerSettings, WorkerStats};
use crate::pipeline::{BindingSpec, HandlerSlot};
use crate::runtime::{HandlerComponent, HandlerPool, Runtime};
use crate::store::{BindingRecord, RateLimit, Store};

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error("cannot open the store at {url}: {message}")]
    Store {
        /// The store URL, password hidden.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The runtime could not start.
    #[error("cannot start the wasm runtime: {0}")]
    Runtime(String),
    /// The relay could not start.
    #[error("cannot start the outbox relay: {0}")]
    Relay(String),
    /// The HTTP listener could not bind.
    #[error("cannot listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the operating system said.
        message: String,
    },
}

/// A worker that runs, and what it was started from.
struct Running {
    revision: i64,
    /// The handler version in its slot.
    version: i32,
    /// A version that could not be compiled: not tried again until another one is active.
    refused: Option<i32>,
    /// Where a newly activated version is swapped in.
    handler: HandlerSlot,
    /// Idle instances a handler pool of this binding keeps (its `max_in_flight`).
    max_idle: usize,
    /// Whether the binding grants outbound HTTP (its pools link `wasi:http`).
    http: bool,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// What the health endpoints show of it.
    health: BindingHealth,
}

/// Why a handler version could not be made ready to run.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    /// The store could not give the bytes (tried again at the next reconciliation).
    #[error("{0}")]
    Store(String),
    /// The bytes are missing or the runtime refused them (not tried again).
    #[error("{0}")]
    Component(String),
}

/// Shared with the health endpoints.
struct Health {
    store: Arc<dyn Store>,
    /// One client for the Kafka metadata probe (created once; `None` if librdkafka refused the
    /// settings, which the probe then reports).
    kafka: Result<Arc<BaseConsumer<ProbeContext>>, String>,
    /// The last Kafka probe and when it ran; held across a probe so concurrent requests share it.
    kafka_probe: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// The workers started by the last reconciliation.
    bindings: std::sync::Mutex<Vec<BindingHealth>>,
    reconciled: AtomicBool,
}

/// What the health endpoints see of one worker.
#[derive(Clone)]
struct BindingHealth {
    id: String,
    tenant: String,
    handler: String,
    version: i32,
    stats: Arc<WorkerStats>,
    alive: Arc<AtomicBool>,
}

/// The readiness probe's client context: keeps librdkafka's last error (a refused password, a
/// failed TLS handshake), which says more than the metadata request's failure. The workers'
/// and the relay's clients log such errors; this one only reports them.
#[derive(Default)]
struct ProbeContext {
    last_error: std::sync::Mutex<Option<ProbeError>>,
}

/// An error the probe's client met.
struct ProbeError {
    reason: String,
    at: std::time::Instant,
    /// Whether it was an access error (credentials, ACLs), which a later "all brokers are down"
    /// (its consequence) does not replace.
    access_denied: bool,
}

/// How long the probe client's last error explains a failed probe: librdkafka reports an
/// error that repeats only now and then.
const PROBE_ERROR_KEPT: std::time::Duration = std::time::Duration::from_secs(60);

impl ProbeContext {
    fn last_error(&self) -> std::sync::MutexGuard<'_, Option<ProbeError>> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The last error, if recent; after a successful probe, none.
    fn explain(&self, probe_ok: bool) -> Option<String> {
        let mut last = self.last_error();
        if probe_ok {
            *last = None;
        }
        last.as_ref()
            .filter(|error| error.at.elapsed() < PROBE_ERROR_KEPT)
            .map(|error| error.reason.clone())
    }
}

impl ClientContext for ProbeContext {
    fn log(&self, _level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(target: "librdkafka", facility, "probe: {message}");
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let access_denied = error
            .rdkafka_error_code()
            .is_some_and(crate::kafka::is_access_denied);
        let mut last = self.last_error();
        if let Some(kept) = last.as_ref()
            && kept.access_denied
            && !access_denied
            && kept.at.elapsed() < PROBE_ERROR_KEPT
        {
            return;
        }
        *last = Some(ProbeError {
            reason: reason.to_owned(),
            at: std::time::Instant::now(),
            access_denied,
        });
    }
}

impl rdkafka::consumer::ConsumerContext for ProbeContext {}

/// How long a health probe waits for the store or for Kafka's metadata.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a Kafka probe's answer is reused.
const KAFKA_PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl Health {
    /// Whether the store answers within [`PROBE_TIMEOUT`].
    async fn store(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.store.bindings_revision()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }

    /// Whether a Kafka metadata request succeeds within [`PROBE_TIMEOUT`]; run on a blocking
    /// thread and cached for [`KAFKA_PROBE_TTL`].
    async fn kafka(&self) -> Result<(), String> {
        let consumer = self.kafka.clone()?;
        let mut last = self.kafka_probe.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < KAFKA_PROBE_TTL
        {
            return result.clone();
        }
        let result = tokio::task::spawn_blocking(move || {
            // Serve the error events librdkafka queued since the last probe (a broker outage
            // queues one per failed connection), so they do not pile up.
            for _ in 0..1000 {
                if consumer.poll(std::time::Duration::ZERO).is_none() {
                    break;
                }
            }
            let result = consumer.fetch_metadata(None, PROBE_TIMEOUT).map(|_| ());
            // Errors met meanwhile (the callback runs while polling) explain a failure.
            for _ in 0..1000 {
                if consumer.poll(std::time::Duration::ZERO).is_none() {
                    break;
                }
            }
            let explanation = consumer.context().explain(result.is_ok());
            match (result, explanation) {
                (Ok(()), _) => Ok(()),
                (Err(e), Some(reason)) => Err(format!("{e}; last client error: {reason}")),
                (Err(e), None) => Err(e.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("metadata probe failed: {e}")));
        *last = Some((std::time::Instant::now(), result.clone()));
        result
    }

    fn bindings(&self) -> Vec<BindingHealth> {
        self.bindings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Run until `shutdown` is cancelled; then drain every worker and stop the relay.
pub async fn serve(config: WeirConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let store = config
        .store
        .connect()
        .await
        .map_err(|e| ServeError::Store {
            url: config.store.redacted_url(),
            message: e.to_string(),
        })?;
    let runtime = Arc::new(
        Runtime::new(config.runtime.clone()).map_err(|e| ServeError::Runtime(e.to_string()))?,
    );
    let kafka = config.kafka.client_config();

    let metrics = Metrics::new();
    let relay = Relay::new(store.clone(), &kafka, RelaySettings::default())
        .map_err(|e| ServeError::Relay(e.to_string()))?
        .with_metrics(metrics.relay());
    let relay_task = tokio::spawn(relay.run(shutdown.child_token()));
    let sweeper = tokio::spawn(sweep_processed_keys(
        store.clone(),
        config.pipeline.processed_keys_retention(),
        config.pipeline.processed_keys_sweep_every(),
        shutdown.child_token(),
    ));

    let sampler = tokio::spawn(sample_store_gauges(
        store.clone(),
        metrics.clone(),
        METRICS_SAMPLE_EVERY,
        shutdown.child_token(),
    ));

    let mut consumer_config = kafka.client_config();
    consumer_config.set(
        "session.timeout.ms",
        config.kafka.session_timeout_ms.to_string(),
    );
    // The probe uses the workers' settings: what they cannot reach, it reports.
    let probe_client = consumer_config
        .clone()
        .set("group.id", "weir-health")
        .create_with_context::<_, BaseConsumer<ProbeContext>>(ProbeContext::default())
        .map(Arc::new)
        .map_err(|e| format!("cannot create the Kafka client: {e}"));
    let health = Arc::new(Health {
        store: store.clone(),
        kafka: probe_client,
        kafka_probe: tokio::sync::Mutex::new(None),
        bindings: std::sync::Mutex::new(Vec::new()),
        reconciled: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| ServeError::Listen {
            addr: config.server.listen,
            message: e.to_string(),
        })?;
    let admin = Arc::new(AdminState::new(
        store.clone(),
        runtime.clone(),
        &config.server,
    ));
    if config.server.admin_token.is_none() {
        tracing::warn!(
            "no server.admin_token configured: admin routes of the API answer 401 to every request; tenant tokens still work"
        );
    }
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route("/health/details", get(details))
        .with_state(health.clone())
        .route(
            "/metrics",
            get(scrape).with_state((metrics.clone(), runtime.clone())),
        )
        .merge(admin::router(admin));
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(http_shutdown.cancelled_owned())
            .await;
    });
    tracing::info!(listen = %config.server.listen, store = %config.store.redacted_url(), "weir serving");

    let settings = WorkerSettings::from(&config.pipeline);

    let mut running: HashMap<String, Running> = HashMap::new();
    let rate_limits = Arc::new(RateLimits::default());
    let mut ticker = tokio::time::interval(config.pipeline.reconcile_every());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                match reconcile(&store, &runtime, &metrics, &rate_limits, &consumer_config, &settings, &mut running).await {
                    Ok(()) => {
                        health.reconciled.store(true, Ordering::Relaxed);
                        let mut now: Vec<BindingHealth> = running.values().map(|r| BindingHealth { version: r.version, ..r.health.clone() }).collect();
                        now.sort_by(|a, b| a.id.cmp(&b.id));
                        *health.bindings.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reconcile bindings; will retry"),
                }
            }
        }
    }

    tracing::info!(workers = running.len(), "shutting down: draining workers");
    for (_, worker) in running.drain() {
        let _ = worker.stop.send(true);
        let _ = worker.task.await;
    }
    let _ = relay_task.await;
    let _ = sweeper.await;
    let _ = sampler.await;
    let _ = http.await;
    store.close().await;
    Ok(())
}

/// Every `every`, delete the processed keys recorded more than `retention` ago, until
/// `shutdown`. A failed sweep is logged and tried again at the next tick.
pub async fn sweep_processed_keys(
    store: Arc<dyn Store>,
    retention: std::time::Duration,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Ok(retention) = chrono::Duration::from_std(retention) else {
            return;
        };
        let older_than = chrono::Utc::now() - retention;
        match store.sweep_processed_keys(older_than).await {
            Ok(0) => {}
            Ok(swept) => tracing::info!(swept, %older_than, "processed keys swept"),
            Err(e) => tracing::warn!(error = %e, "cannot sweep processed keys; will retry"),
        }
    }
}

/// How often the gauges read from the store (DLQ and outbox pending) are sampled: 10 s.
pub const METRICS_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// `GET /metrics`: the Prometheus text exposition of the host's registry.
async fn scrape(
    State((metrics, runtime)): State<(Arc<Metrics>, Arc<Runtime>)>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    metrics.observe_cache(&runtime.cache_stats());
    metrics.set_wasm_instances(
        runtime.live_instances(),
        i64::from(runtime.config().pool_instances),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

/// Every `every`, set the gauges that come from the store: the outbox rows not yet published
/// and the pending DLQ entries per handler (a handler whose entries are all gone drops to 0).
/// A failed read leaves the last values and is logged at debug level.
pub async fn sample_store_gauges(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match store.outbox_pending().await {
            Ok(pending) => metrics.set_outbox_pending(pending),
            Err(e) => tracing::debug!(error = %e, "cannot count pending outbox rows"),
        }
        match store.dlq_pending_counts().await {
            Ok(counts) => {
                let mut now = std::collections::HashSet::with_capacity(counts.len());
                for (tenant, handler, pending) in counts {
                    metrics.set_dlq_pending(&tenant, &handler, pending);
                    now.insert((tenant, handler));
                }
                for (tenant, handler) in seen.difference(&now) {
                    metrics.set_dlq_pending(tenant, handler, 0);
                }
                seen.extend(now);
            }
            Err(e) => tracing::debug!(error = %e, "cannot count pending DLQ entries"),
        }
    }
}

fn probe_json(result: &Result<(), String>) -> serde_json::Value {
    match result {
        Ok(()) => serde_json::json!({"status": "ok"}),
        Err(e) => serde_json::json!({"status": "down", "error": e}),
    }
}

/// `GET /health/ready`: 200 when the store answers, Kafka's metadata is reachable and the
/// bindings were reconciled; 503 otherwise, the JSON body naming what is down.
async fn ready(State(health): State<Arc<Health>>) -> (StatusCode, Json<serde_json::Value>) {
    let (store, kafka) = tokio::join!(health.store(), health.kafka());
    let reconciled = health.reconciled.load(Ordering::Relaxed);
    let bindings = health.bindings();
    let mut down = Vec::new();
    if store.is_err() {
        down.push("store");
    }
    if kafka.is_err() {
        down.push("kafka");
    }
    if !reconciled {
        down.push("bindings");
    }
    let ok = down.is_empty();
    let body = serde_json::json!({
        "ready": ok,
        "down": down,
        "store": probe_json(&store),
        "kafka": probe_json(&kafka),
        "reconciled": reconciled,
        "bindings": bindings.len(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// `GET /health/details`: the store, Kafka and every binding this host runs (always 200).
async fn details(State(health): State<Arc<Health>>) -> Json<serde_json::Value> {
    let (store, kafka) = tokio::join!(health.store(), health.kafka());
    let bindings: Vec<serde_json::Value> = health
        .bindings()
        .iter()
        .map(|b| {
            let breaker = if b.stats.breaker_open.load(Ordering::Relaxed) {
                "open"
            } else {
                "closed"
            };
            serde_json::json!({
                "id": b.id,
                "tenant": b.tenant,
                "handler": b.handler,
                "version": b.version,
                "worker_running": b.alive.load(Ordering::Relaxed),
                "partitions_assigned": b.stats.partitions.load(Ordering::Relaxed),
                "breaker": breaker,
                "store_unavailable": b.stats.store_unavailable.load(Ordering::Relaxed),
                "consumed": b.stats.consumed.load(Ordering::Relaxed),
                "committed": b.stats.committed.load(Ordering::Relaxed),
                "dead_lettered": b.stats.dead_lettered.load(Ordering::Relaxed),
                "kafka_error": b.stats.kafka_error(),
            })
        })
        .collect();
    Json(serde_json::json!({
        "store": probe_json(&store),
        "kafka": probe_json(&kafka),
        "reconciled": health.reconciled.load(Ordering::Relaxed),
        "bindings": bindings,
    }))
}

/// Bring the running workers in line with the store.
async fn reconcile(
    store: &Arc<dyn Store>,
    runtime: &Arc<Runtime>,
    metrics: &Arc<Metrics>,
    rate_limits: &Arc<RateLimits>,
    kafka: &rdkafka::ClientConfig,
    settings: &WorkerSettings,
    running: &mut HashMap<String, Running>,
) -> Result<(), crate::store::StoreError> {
    // Tenants' rate limits first: the workers already running share their tenant's limiter
    // and follow the change at their next message.
    let limits: HashMap<String, RateLimit> = store
        .list_tenants()
        .await?
        .into_iter()
        .filter_map(|tenant| Some((tenant.id, tenant.rate_limit?)))
        .collect();
    rate_limits.refresh(&limits);
    let records = store.list_bindings().await?;
    let mut desired: HashMap<String, (BindingRecord, i32)> = HashMap::new();
    for record in records {
        match store
            .active_version(&record.tenant, &record.handler)
            .await?
        {
            Some(version) => {
                desired.insert(record.id.clone(), (record, version.version));
            }
            None => {
                tracing::warn!(binding = %record.id, handler = %record.handler, "handler has no active version; binding not started")
            }
        }
    }
    // Stop what is gone or changed. A new handler version alone is no reason: it is swapped in
    // below.
    let stale: Vec<String> = running
        .iter()
        .filter(|(id, r)| {
            desired
                .get(*id)
                .is_none_or(|(record, _)| record.revision != r.revision)
                || r.task.is_finished()
        })
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        if let Some(worker) = running.remove(&id) {
            tracing::info!(binding = %id, "stopping worker");
            let _ = worker.stop.send(true);
            let _ = worker.task.await;
            // Its series go with it (a worker started again for a new revision starts afresh).
            metrics.forget_binding(&id);
        }
    }
    // Swap newly activated versions into the workers that keep running.
    for (id, (record, version)) in &desired {
        let Some(worker) = running.get_mut(id) else {
            continue;
        };
        if worker.version == *version || worker.refused == Some(*version) {
            continue;
        }
        let loaded = load(store, runtime, record, *version)
            .await
            .and_then(|component| pool_for(component, worker.max_idle, worker.http));
        match loaded {
            Ok(pool) => {
                let pool = Arc::new(pool);
                let previous = worker.handler.swap(pool, Some(*version));
                // Invocations running on it finish; its idle instances go now.
                previous.pool.retire();
                tracing::info!(binding = %id, handler = %record.handler, from = ?previous.version, to = version, "handler version swapped; the worker keeps running");
                worker.version = *version;
                worker.refused = None;
            }
            Err(e) => {
                tracing::warn!(binding = %id, handler = %record.handler, version, error = %e, "cannot swap in the active handler version; the worker keeps its version");
                if matches!(e, LoadError::Component(_)) {
                    worker.refused = Some(*version);
                }
            }
        }
    }
    // Start what is new.
    for (id, (record, version)) in desired {
        if running.contains_key(&id) {
            continue;
        }
        let limiter = rate_limits.tenant(&record.tenant);
        match start(
            store, runtime, metrics, limiter, kafka, settings, &record, version,
        )
        .await
        {
            Ok(worker) => {
                tracing::info!(binding = %id, handler = %record.handler, version, "worker started");
                running.insert(id, worker);
            }
            Err(e) => tracing::warn!(binding = %id, error = %e, "cannot start worker"),
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn start(
    store: &Arc<dyn Store>,
    runtime: &Arc<Runtime>,
    metrics: &Arc<Metrics>,
    rate_limit: Arc<TenantLimiter>,
    kafka: &rdkafka::ClientConfig,
    settings: &WorkerSettings,
    record: &BindingRecord,
    version: i32,
) -> Result<Running, String> {
    let spec: BindingSpec = serde_json::from_value(record.spec.clone())
        .map_err(|e| format!("invalid binding spec: {e}"))?;
    spec.validate().map_err(|e| e.to_string())?;
    let component = load(store, runtime, record, version)
        .await
        .map_err(|e| e.to_string())?;
    let max_idle = spec.max_in_flight;
    let http = spec.http.is_some();
    let pool = pool_for(component, max_idle, http).map_err(|e| e.to_string())?;
    let handler = HandlerSlot::new(Arc::new(pool), Some(version));
    let stats = Arc::new(WorkerStats::default());
    let alive = Arc::new(AtomicBool::new(true));
    let binding_health = BindingHealth {
        id: record.id.clone(),
        tenant: record.tenant.clone(),
        handler: spec.handler.clone(),
        version,
        stats: stats.clone(),
        alive: alive.clone(),
    };
    let worker = Worker {
        binding_id: record.id.clone(),
        handler: handler.clone(),
        spec,
        store: store.clone(),
        kafka: kafka.clone(),
        settings: settings.clone(),
        stats: stats.clone(),
        pause: PauseSwitch::default(),
        metrics: Some(metrics.clone()),
        rate_limit: Some(rate_limit),
    };
    let (stop, stopped) = watch::channel(false);
    let id = record.id.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = worker.run(stopped).await {
            tracing::error!(binding = %id, error = %e, "worker stopped");
        }
        alive.store(false, Ordering::Relaxed);
    });
    Ok(Running {
        revision: record.revision,
        version,
        refused: None,
        handler,
        max_idle,
        http,
        stop,
        task,
        health: binding_health,
    })
}

/// The pool a binding runs `component` in; `http`: the binding grants outbound HTTP. A handler
/// that imports `wasi:http` under a binding that grants none is refused, naming the setting.
fn pool_for(
    component: HandlerComponent,
    max_idle: usize,
    http: bool,
) -> Result<HandlerPool, LoadError> {
    if component.imports_http() && !http {
        return Err(LoadError::Component(format!(
            "handler {} imports wasi:http/outgoing-handler, but the binding grants no outbound HTTP; set its `http.allow` to the hosts the handler may call",
            component.hash()
        )));
    }
    let pool = HandlerPool::new(component, max_idle);
    Ok(if http { pool.granting_http() } else { pool })
}

/// Fetch `version` of the binding's handler and compile it, off the executor (the runtime's
/// cache makes a version compiled before cheap).
async fn load(
    store: &Arc<dyn Store>,
    runtime: &Arc<Runtime>,
    record: &BindingRecord,
    version: i32,
) -> Result<HandlerComponent, LoadError> {
    let bytes = store
        .component_bytes(&record.tenant, &record.handler, version)
        .await
        .map_err(|e| LoadError::Store(e.to_string()))?
        .ok_or_else(|| {
            LoadError::Component(format!(
                "handler {} version {version} has no component",
                record.handler
            ))
        })?;
    let loader = runtime.clone();
    tokio::task::spawn_blocking(move || loader.load(&bytes))
        .await
        .map_err(|e| LoadError::Component(e.to_string()))?
        .map_err(|e| LoadError::Component(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{CommitOutcome, Completion};

    fn completion(message_id: &str) -> Completion {
        Completion {
            binding_id: "t.h".into(),
            tenant: "t".into(),
            handler: "h".into(),
            message_id: message_id.into(),
            key: None,
            state_writes: Vec::new(),
            emits: Vec::new(),
            replay_of: None,
        }
    }

    #[tokio::test]
    async fn the_sweeper_forgets_processed_keys_after_the_retention_only() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("weir.db").display());
        let store = crate::store::connect(&url).await.unwrap();
        assert_eq!(
            store.commit(&[completion("old")]).await.unwrap(),
            vec![CommitOutcome::Committed]
        );
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn(sweep_processed_keys(
            store.clone(),
            Duration::from_secs(1),
            Duration::from_millis(100),
            shutdown.clone(),
        ));
        // Within the retention the key is still known: a redelivery is a duplicate.
        assert_eq!(
            store.commit(&[completion("old")]).await.unwrap(),
            vec![CommitOutcome::Duplicate]
        );
        tokio::time::sleep(Duration::from_millis(1600)).await;
        store.commit(&[completion("new")]).await.unwrap();
        // Past it, the key is gone; the key committed just now stays.
        assert_eq!(
            store
                .commit(&[completion("old"), completion("new")])
                .await
                .unwrap(),
            vec![CommitOutcome::Committed, CommitOutcome::Duplicate]
        );
        shutdown.cancel();
        sweeper.await.unwrap();
    }
}
