//! The binding circuit breaker against the real broker and database (SEMANTICS §3).
//!
//! Two workers (two replicas of one binding, splitting its partitions) run the `flaky` handler
//! with messages that fail retryably while keyed state `dependency-down` exists under their key
//! — a dependency that is down until the test deletes that state. After `failure_threshold`
//! failures the breaker opens: both replicas pause their partitions (messages produced while it
//! is open are not consumed), nothing is dead-lettered and no attempt is spent while it is open.
//! After `open_for` (2 s here) it half-opens, the probes fail, it opens again; the dependency
//! comes back; the next probes succeed, it closes, and every message is processed exactly once.
//!
//! A second test forces the breaker open and resets it through the admin API: consumption
//! pauses and resumes, and another tenant's token cannot see the breaker.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Row;
use weir::admin::{AdminState, router};
use weir::config::{Secret, ServerConfig};
use weir::pipeline::worker::{Worker, WorkerSettings, WorkerStats};
use weir::pipeline::{BindingSpec, BreakerPolicy, HandlerSlot, PauseSwitch};
use weir::runtime::{HandlerPool, Runtime, RuntimeConfig};
use weir::store::{Quota, Store};
use weir_acceptance::{component, create_topic, services, unique_name};

const KEYS: usize = 8;
const DOWN: &str = "dependency-down";
const ADMIN: &str = "admin-token-for-the-breaker-tests-0123";

/// Produce messages `from..to` (key `k-<i % KEYS>`), each failing while the dependency is
/// down.
async fn produce(kafka: &str, topic: &str, from: usize, to: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut sends = Vec::new();
    for i in from..to {
        let key = format!("k-{}", i % KEYS);
        let payload = json!({ "fail_while_state": DOWN, "n": i }).to_string();
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        sends.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for send in sends {
        send.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// A binding of `flaky` to a fresh topic, stored, with the component deployed and loaded.
struct Setup {
    store: Arc<dyn Store>,
    pool: sqlx::PgPool,
    tenant: String,
    binding_id: String,
    input: String,
    output: String,
    spec: BindingSpec,
    handler: Arc<HandlerPool>,
}

impl Setup {
    async fn new(prefix: &str, partitions: i32, breaker: BreakerPolicy) -> Self {
        let services = services();
        let input = unique_name(prefix);
        let output = format!("{input}.out");
        create_topic(&services.kafka, &input, partitions).await;
        let store = weir::store::connect(&services.database_url).await.unwrap();
        let pool = sqlx::PgPool::connect(&services.database_url).await.unwrap();
        let tenant = unique_name("t");
        let bytes = std::fs::read(component("weir_handler_flaky")).unwrap();
        let version = store
            .put_handler_version(&tenant, "flaky", &bytes, &Quota::default())
            .await
            .unwrap();
        store
            .activate(&tenant, "flaky", version.version)
            .await
            .unwrap();
        let runtime = Runtime::new(RuntimeConfig {
            pool_instances: 32,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let handler = Arc::new(HandlerPool::new(runtime.load(&bytes).unwrap(), 16));
        let mut spec = BindingSpec::new(&tenant, "flaky", vec![input.clone()]);
        spec.output_topics = vec![output.clone()];
        spec.config.insert("output-topic".into(), output.clone());
        spec.max_in_flight = 16;
        spec.retry.backoff = vec![Duration::from_millis(200)];
        spec.breaker = breaker;
        spec.validate().unwrap();
        let binding_id = format!("{tenant}.flaky");
        store
            .put_binding(
                &binding_id,
                &tenant,
                "flaky",
                &serde_json::to_value(&spec).unwrap(),
            )
            .await
            .unwrap();
        Self {
            store,
            pool,
            tenant,
            binding_id,
            input,
            output,
            spec,
            handler,
        }
    }

    /// Start a worker (a replica) of the binding.
    fn start(
        &self,
    ) -> (
        Arc<WorkerStats>,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut kafka = ClientConfig::new();
        kafka.set("bootstrap.servers", &services().kafka);
        let stats = Arc::new(WorkerStats::default());
        let worker = Worker {
            binding_id: self.binding_id.clone(),
            spec: self.spec.clone(),
            handler: HandlerSlot::new(self.handler.clone(), Some(1)),
            store: self.store.clone(),
            kafka,
            settings: WorkerSettings::default(),
            stats: stats.clone(),
            pause: PauseSwitch::default(),
            metrics: None,
            rate_limit: None,
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move { worker.run(stopped).await.unwrap() });
        (stats, stop, task)
    }

    /// Bring the dependency down (`true`) or back (`false`) for every key.
    async fn dependency_down(&self, down: bool) {
        for k in 0..KEYS {
            let key = format!("k-{k}");
            let query = if down {
                "INSERT INTO keyed_state (tenant, handler, key, name, value) \
                 VALUES ($1, 'flaky', $2, $3, 'x') ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM keyed_state WHERE tenant = $1 AND handler = 'flaky' AND key = $2 \
                 AND name = $3"
            };
            sqlx::query(query)
                .bind(&self.tenant)
                .bind(key.as_bytes())
                .bind(DOWN)
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .bind(&self.binding_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .get::<i64, _>(0)
    }

    async fn processed(&self) -> i64 {
        self.count("SELECT count(*) FROM processed_key_ids WHERE binding_id = $1")
            .await
    }

    async fn dead_lettered(&self) -> i64 {
        self.count("SELECT count(*) FROM dlq_entries WHERE binding_id = $1")
            .await
    }
}

async fn wait_for<F: Fn() -> Fut, Fut: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    done: F,
) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sum(workers: &[Arc<WorkerStats>], f: impl Fn(&WorkerStats) -> u64) -> u64 {
    workers.iter().map(|s| f(s)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_pauses_both_replicas_spends_nothing_and_closes_when_the_dependency_is_back() {
    const FIRST: usize = 40;
    const WHILE_OPEN: usize = 40;
    let kafka = services().kafka;
    let setup = Setup::new(
        "breaker_in",
        4,
        BreakerPolicy {
            failure_threshold: 3,
            success_threshold: 2,
            open_for_ms: 2_000,
        },
    )
    .await;
    setup.dependency_down(true).await;

    // Two replicas; the second joins once the first has its partitions.
    let (a, stop_a, task_a) = setup.start();
    wait_for("the first assignment", Duration::from_secs(60), || async {
        a.assignments.load(Ordering::Relaxed) >= 1
    })
    .await;
    let (b, stop_b, task_b) = setup.start();
    wait_for("the shared assignment", Duration::from_secs(60), || async {
        b.assignments.load(Ordering::Relaxed) >= 1 && a.assignments.load(Ordering::Relaxed) >= 2
    })
    .await;
    let workers = [a.clone(), b.clone()];
    let start = Instant::now();
    let at = |t: Instant| t.duration_since(start).as_secs_f64();

    // The dependency is down: the first failures open the breaker; both replicas follow.
    produce(&kafka, &setup.input, 0, FIRST).await;
    wait_for("the breaker to open", Duration::from_secs(60), || async {
        a.breaker_open.load(Ordering::Relaxed) && b.breaker_open.load(Ordering::Relaxed)
    })
    .await;
    let opened_at = Instant::now();
    let consumed_at_open = sum(&workers, |s| s.consumed.load(Ordering::Relaxed));
    let shared = setup.store.breaker_get(&setup.binding_id).await.unwrap();

    // Produced while open: not consumed until it closes.
    produce(&kafka, &setup.input, FIRST, FIRST + WHILE_OPEN).await;
    let produced_while_open_at = Instant::now();

    // Probes fail while the dependency is down: it opens again. Watch consumption meanwhile.
    let mut consumed_while_open = 0;
    let mut half_open_at = None;
    while sum(&workers, |s| s.breaker_opened.load(Ordering::Relaxed)) < 3 {
        consumed_while_open =
            consumed_while_open.max(sum(&workers, |s| s.consumed.load(Ordering::Relaxed)));
        if half_open_at.is_none()
            && sum(&workers, |s| s.breaker_half_opened.load(Ordering::Relaxed)) > 0
        {
            half_open_at = Some(Instant::now());
        }
        assert!(
            opened_at.elapsed() < Duration::from_secs(30),
            "the breaker did not open again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reopened_at = Instant::now();
    // Half-open and the failed probe may fall within one poll of 20 ms.
    let half_open_at = half_open_at.or_else(|| {
        (sum(&workers, |s| s.breaker_half_opened.load(Ordering::Relaxed)) > 0)
            .then_some(reopened_at)
    });
    let half_opened_before = sum(&workers, |s| s.breaker_half_opened.load(Ordering::Relaxed));
    let dlq_while_down = setup.dead_lettered().await;
    let processed_while_down = setup.processed().await;

    // The dependency is back: the next probes succeed and it closes everywhere.
    setup.dependency_down(false).await;
    let back_at = Instant::now();
    let mut second_half_open_at = None;
    while !workers.iter().all(|s| {
        s.breaker_closed.load(Ordering::Relaxed) >= 1 && !s.breaker_open.load(Ordering::Relaxed)
    }) {
        // Only while every replica is still open: once one has closed (the shared state says
        // closed) it resumes and consumes legitimately while the other follows within ~1 s.
        if workers
            .iter()
            .all(|s| s.breaker_open.load(Ordering::Relaxed))
        {
            consumed_while_open =
                consumed_while_open.max(sum(&workers, |s| s.consumed.load(Ordering::Relaxed)));
        }
        if second_half_open_at.is_none()
            && sum(&workers, |s| s.breaker_half_opened.load(Ordering::Relaxed)) > half_opened_before
        {
            second_half_open_at = Some(Instant::now());
        }
        assert!(
            back_at.elapsed() < Duration::from_secs(30),
            "the breaker did not close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed_at = Instant::now();
    let second_half_open_at = second_half_open_at.or_else(|| {
        (sum(&workers, |s| s.breaker_half_opened.load(Ordering::Relaxed)) > half_opened_before)
            .then_some(closed_at)
    });
    let total = (FIRST + WHILE_OPEN) as i64;
    wait_for("every message", Duration::from_secs(60), || async {
        setup.processed().await >= total
    })
    .await;
    let done_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_a.send(true).unwrap();
    stop_b.send(true).unwrap();
    task_a.await.unwrap();
    task_b.await.unwrap();

    // Exactly once: one output record per message, each key's counter exact.
    let outputs = sqlx::query("SELECT payload FROM outbox WHERE binding_id = $1 AND topic = $2")
        .bind(&setup.binding_id)
        .bind(&setup.output)
        .fetch_all(&setup.pool)
        .await
        .unwrap();
    let mut attempts: HashMap<u64, usize> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for row in &outputs {
        let event: Value = serde_json::from_slice(&row.get::<Vec<u8>, _>("payload")).unwrap();
        ids.insert(event["id"].as_str().unwrap().to_owned());
        *attempts
            .entry(event["attempt"].as_u64().unwrap())
            .or_default() += 1;
    }
    let mut counters_exact = 0;
    for k in 0..KEYS {
        let expected = (0..FIRST + WHILE_OPEN).filter(|i| i % KEYS == k).count() as u64;
        let row = sqlx::query(
            "SELECT value FROM keyed_state WHERE tenant = $1 AND handler = 'flaky' AND key = $2 AND name = 'handled'",
        )
        .bind(&setup.tenant)
        .bind(format!("k-{k}").as_bytes())
        .fetch_one(&setup.pool)
        .await
        .unwrap();
        let handled: u64 = serde_json::from_slice(&row.get::<Vec<u8>, _>("value")).unwrap();
        counters_exact += usize::from(handled == expected);
    }
    let parked = sum(&workers, |s| s.parked.load(Ordering::Relaxed));
    let retried = sum(&workers, |s| s.retried.load(Ordering::Relaxed));
    let opened = sum(&workers, |s| s.breaker_opened.load(Ordering::Relaxed));
    let half_opened = sum(&workers, |s| s.breaker_half_opened.load(Ordering::Relaxed));
    let dlq = setup.dead_lettered().await;
    let mut attempts: Vec<_> = attempts.into_iter().collect();
    attempts.sort_unstable();
    let consumed_during_open = consumed_while_open.saturating_sub(consumed_at_open);
    eprintln!(
        "breaker timeline (s from the first message): opened {:.2} (shared: {}), {WHILE_OPEN} \
         produced while open by {:.2}, half-open {:.2}, reopened {:.2} (probes failed), \
         dependency back {:.2}, half-open again {:.2}, closed {:.2}, all {} processed {:.2}; \
         consumed when it opened {consumed_at_open}, consumed while open {consumed_during_open}; \
         while down: {processed_while_down} processed, {dlq_while_down} dead-lettered; opens \
         {opened}, half-opens {half_opened} (over both replicas), failures parked {parked}, \
         retries {retried}; attempts of the successful runs {attempts:?}; outputs {} ({} \
         distinct), exact key counters {counters_exact}/{KEYS}, DLQ {dlq}",
        at(opened_at),
        shared.as_ref().map_or("none".to_owned(), |r| format!(
            "open={} until={:?} failures={:?}",
            r.open, r.open_until, r.consecutive_failures
        )),
        at(produced_while_open_at),
        half_open_at.map_or(f64::NAN, at),
        at(reopened_at),
        at(back_at),
        second_half_open_at.map_or(f64::NAN, at),
        at(closed_at),
        total,
        at(done_at),
        outputs.len(),
        ids.len(),
    );
    assert!(
        shared.is_some_and(|r| r.open),
        "the open breaker was not shared"
    );
    assert_eq!(consumed_during_open, 0, "messages were consumed while open");
    assert!(consumed_at_open <= FIRST as u64);
    assert_eq!(
        (dlq_while_down, dlq),
        (0, 0),
        "dead-lettered because a dependency was down"
    );
    assert_eq!(processed_while_down, 0);
    assert!(parked > 0);
    // Not spent: failures far beyond max_attempts (4) in all, yet no run past attempt 2 (at
    // most one retry before the breaker opened).
    assert!(
        attempts.iter().all(|(attempt, _)| *attempt <= 2),
        "{attempts:?}"
    );
    assert_eq!((outputs.len(), ids.len()), (total as usize, total as usize));
    assert_eq!(counters_exact, KEYS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_forces_the_breaker_open_and_resets_it_through_the_api() {
    let kafka = services().kafka;
    let setup = Setup::new("breaker_api", 2, BreakerPolicy::default()).await;
    let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).unwrap());
    let server = ServerConfig {
        admin_token: Some(Secret::new(ADMIN)),
        ..ServerConfig::default()
    };
    let app = router(Arc::new(AdminState::new(
        setup.store.clone(),
        runtime,
        &server,
    )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::new();
    let call = |method: Method, path: String, token: String| {
        let request = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let path = format!(
        "/v1/tenants/{}/bindings/{}/breaker",
        setup.tenant, setup.binding_id
    );

    let (status, view) = call(Method::GET, path.clone(), ADMIN.into()).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["state"], "closed");
    assert_eq!(view["policy"]["failure_threshold"], 5);

    // The dependency is up: messages flow.
    let (stats, stop, task) = setup.start();
    produce(&kafka, &setup.input, 0, 10).await;
    wait_for("the first 10", Duration::from_secs(60), || async {
        setup.processed().await == 10
    })
    .await;

    // Forced open: the worker follows within about a second and consumes nothing more.
    let (status, view) = call(Method::POST, format!("{path}/open"), ADMIN.into()).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        (view["state"].as_str(), view["forced"].as_bool()),
        (Some("open"), Some(true))
    );
    assert!(
        view["until"].is_null() && view["opened_at"].is_string(),
        "{view}"
    );
    let forced_at = Instant::now();
    wait_for("the worker to follow", Duration::from_secs(10), || async {
        stats.breaker_open.load(Ordering::Relaxed)
    })
    .await;
    let followed_after = forced_at.elapsed();
    produce(&kafka, &setup.input, 10, 20).await;
    // Longer than the default open_for would matter for, here: forced never half-opens.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let consumed_while_forced = stats.consumed.load(Ordering::Relaxed);
    let processed_while_forced = setup.processed().await;
    let (_, view) = call(Method::GET, path.clone(), ADMIN.into()).await;
    assert_eq!(view["state"], "open", "{view}");

    // Another tenant's token: 404, as if the binding did not exist.
    let other = unique_name("other");
    let created = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({ "id": other }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let token: Value = http
        .post(format!("{base}/v1/tenants/{other}/tokens"))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::POST, "/reset"),
        (Method::POST, "/open"),
    ] {
        let (status, body) = call(method, format!("{path}{suffix}"), token.clone()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{suffix}: {body}");
    }
    let (status, _) = call(
        Method::GET,
        format!("/v1/tenants/{other}/bindings/{}/breaker", setup.binding_id),
        token.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Reset: it resumes and the rest flows.
    let (status, view) = call(Method::POST, format!("{path}/reset"), ADMIN.into()).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["state"], "closed");
    let reset_at = Instant::now();
    wait_for("all 20", Duration::from_secs(60), || async {
        setup.processed().await == 20
    })
    .await;
    let resumed_after = reset_at.elapsed();
    stop.send(true).unwrap();
    task.await.unwrap();
    eprintln!(
        "force-open: followed after {followed_after:?}; while forced (4 s): consumed \
         {consumed_while_forced}, processed {processed_while_forced}; after reset all 20 \
         processed in {resumed_after:?}; DLQ {}",
        setup.dead_lettered().await
    );
    assert_eq!((consumed_while_forced, processed_while_forced), (10, 10));
    assert_eq!(setup.dead_lettered().await, 0);
    assert_eq!(stats.breaker_closed.load(Ordering::Relaxed), 1);
}
