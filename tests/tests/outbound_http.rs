//! Outbound HTTP through `wasi:http` (SEMANTICS §3), against a local HTTP service the tests
//! control: the `enrich` example handler looks up each order's customer.
//!
//! * `the_gate_refuses_caps_times_out_and_breaks_per_destination` runs the handler on the
//!   runtime with a binding's gate: a destination outside the allowlist is refused without a
//!   request being sent; a binding without `http` cannot even instantiate the handler; a closed
//!   port, a slow answer and an oversized body fail with the right kind of error; after
//!   `failure_threshold` 5xx answers the destination's breaker opens and requests fail fast
//!   (the service sees none) while another destination still works; after `open_for` probes
//!   close it again. Metrics count each outcome.
//! * `enrichment_survives_a_service_outage_exactly_once` runs a worker against the real broker
//!   and PostgreSQL while the service answers 503 for its first seconds: every order is
//!   enriched exactly once, nothing is dead-lettered, and the breaker failed requests fast
//!   during the outage.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::Row;
use weir::metrics::Metrics;
use weir::outbound::{HttpGate, HttpPolicy};
use weir::pipeline::worker::{Worker, WorkerSettings, WorkerStats};
use weir::pipeline::{BindingSpec, BreakerPolicy, HandlerSlot, PauseSwitch};
use weir::runtime::{
    ErrorKind, HandlerPool, InstantiateError, Invocation, InvocationContext, Message, Outcome,
    Runtime, RuntimeConfig,
};
use weir::store::Quota;
use weir_acceptance::{component, create_topic, metric_value, services, unique_name};

/// How the customer service answers.
const HEALTHY: u8 = 0;
const FAILING: u8 = 1;
const SLOW: u8 = 2;
const BIG: u8 = 3;
const BIG_STREAMED: u8 = 4;

#[derive(Default)]
struct Service {
    mode: AtomicU8,
    requests: AtomicU64,
}

async fn customer(State(service): State<Arc<Service>>, Path(id): Path<String>) -> Response {
    service.requests.fetch_add(1, Ordering::SeqCst);
    match service.mode.load(Ordering::SeqCst) {
        FAILING => (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response(),
        SLOW => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            axum::Json(json!({ "id": id })).into_response()
        }
        BIG => {
            let body = format!("\"{}\"", "x".repeat(2 << 20));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        BIG_STREAMED => {
            let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 32 << 10]));
            Body::from_stream(futures::stream::iter(chunks)).into_response()
        }
        _ if id == "nobody" => StatusCode::NOT_FOUND.into_response(),
        _ => axum::Json(json!({ "id": id, "name": format!("Customer {id}"), "tier": "gold" }))
            .into_response(),
    }
}

/// Start the customer service on a free loopback port.
async fn serve() -> (Arc<Service>, u16) {
    let service = Arc::new(Service::default());
    let app = Router::new()
        .route("/customers/{id}", get(customer))
        .with_state(service.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (service, port)
}

fn order(i: usize, customer: &str) -> Message {
    Message {
        id: format!("orders/0/{i}"),
        topic: "orders".to_owned(),
        partition: 0,
        offset: i as u64,
        key: Some(customer.as_bytes().to_vec()),
        payload: json!({ "order_id": format!("o-{i}"), "customer": customer })
            .to_string()
            .into_bytes(),
        headers: Vec::new(),
        timestamp_ms: None,
        tenant: "acme".to_owned(),
        attempt: 1,
    }
}

fn context(url: &str, gate: Option<Arc<HttpGate>>) -> InvocationContext {
    InvocationContext {
        config: Arc::new(
            [("customers-url".to_owned(), url.to_owned())]
                .into_iter()
                .collect(),
        ),
        http: gate,
        ..InvocationContext::default()
    }
}

/// A gate that may reach the test's service on loopback.
fn gate(metrics: &Metrics, binding: &str, policy: HttpPolicy) -> Arc<HttpGate> {
    let handles = metrics.http(binding, &policy.allow);
    Arc::new(
        HttpGate::new(binding, policy, handles)
            .unwrap()
            .allowing_private_networks(true),
    )
}

/// The handler's error, or a panic naming what it did instead.
fn error(invocation: &Invocation) -> (ErrorKind, String) {
    match &invocation.outcome {
        Outcome::HandlerError { kind, message } => (*kind, message.clone()),
        other => panic!("expected a handler error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_refuses_caps_times_out_and_breaks_per_destination() {
    let (service, port) = serve().await;
    let requests = || service.requests.load(Ordering::SeqCst);
    let runtime = Runtime::new(RuntimeConfig {
        pool_instances: 8,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let bytes = std::fs::read(component("weir_handler_enrich")).unwrap();
    let component = runtime.load(&bytes).unwrap();
    assert!(component.imports_http());
    let pool = HandlerPool::new(component.clone(), 4).granting_http();
    let metrics = Metrics::new();
    let url = format!("http://127.0.0.1:{port}");
    let allowed = format!("127.0.0.1:{port}");

    // Allowed: the order comes out enriched.
    let mut policy = HttpPolicy::allowing([allowed.clone(), format!("localhost:{port}")]);
    policy.breaker = BreakerPolicy {
        failure_threshold: 3,
        success_threshold: 2,
        open_for_ms: 500,
    };
    let open_gate = gate(&metrics, "b.breaks", policy);
    let ctx = context(&url, Some(open_gate.clone()));
    let done = pool.invoke(&order(1, "c-1"), &ctx).await.unwrap();
    assert_eq!(done.outcome, Outcome::Ok, "{:?}", done.logs);
    let emitted: Value = serde_json::from_slice(&done.effects.emits[0].payload).unwrap();
    assert_eq!(emitted["customer_profile"]["name"], "Customer c-1");
    assert_eq!(emitted["order_id"], "o-1");
    assert_eq!(requests(), 1);

    // Not in the allowlist: refused by the host, permanently, and never sent.
    let elsewhere = gate(
        &metrics,
        "b.elsewhere",
        HttpPolicy::allowing(["customers.example"]),
    );
    let denied = pool
        .invoke(&order(2, "c-2"), &context(&url, Some(elsewhere)))
        .await
        .unwrap();
    let (kind, message) = error(&denied);
    assert_eq!(kind, ErrorKind::Permanent);
    assert!(message.contains("denied"), "{message}");
    assert!(message.contains("http.allow"), "{message}");
    assert_eq!(requests(), 1, "a refused request reached the service");
    // The same refusal for a request with a body: the SDK writes the body before it learns the
    // host refused, and must still report the refusal (permanent), not the failed write.
    let poster = runtime
        .load(&std::fs::read(weir_acceptance::component("weir_fixture_http_post")).unwrap())
        .unwrap();
    // A body larger than the stream's buffer, so that writing it fails once the host refused.
    let mut big = order(2, "c-2");
    big.payload = vec![b'x'; 1 << 20];
    let posted = HandlerPool::new(poster, 2)
        .granting_http()
        .invoke(
            &big,
            &InvocationContext {
                config: Arc::new(
                    [("url".to_owned(), format!("{url}/audit"))]
                        .into_iter()
                        .collect(),
                ),
                http: Some(gate(
                    &metrics,
                    "b.elsewhere.post",
                    HttpPolicy::allowing(["customers.example"]),
                )),
                ..InvocationContext::default()
            },
        )
        .await
        .unwrap();
    let (kind, message) = error(&posted);
    assert_eq!(kind, ErrorKind::Permanent, "{message}");
    assert!(message.contains("denied"), "{message}");
    assert_eq!(requests(), 1, "a refused POST reached the service");
    // Allowed by name but internal: refused unless the operator allows private networks.
    let guarded = {
        let policy = HttpPolicy::allowing([allowed.clone()]);
        let handles = metrics.http("b.internal", &policy.allow);
        Arc::new(HttpGate::new("b.internal", policy, handles).unwrap())
    };
    let internal = pool
        .invoke(&order(2, "c-2"), &context(&url, Some(guarded)))
        .await
        .unwrap();
    let (kind, message) = error(&internal);
    assert_eq!(kind, ErrorKind::Permanent);
    assert!(message.contains("denied"), "{message}");
    assert_eq!(
        requests(),
        1,
        "a request to an internal address reached the service"
    );
    // A binding without `http` does not link `wasi:http` at all.
    let unlinked = HandlerPool::new(component.clone(), 4)
        .invoke(&order(3, "c-3"), &context(&url, None))
        .await;
    assert!(
        matches!(unlinked, Err(InstantiateError::HttpNotGranted { .. })),
        "{:?}",
        unlinked.err()
    );

    // A closed port: retryable, "cannot reach".
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused_gate = gate(
        &metrics,
        "b.closed",
        HttpPolicy::allowing([format!("127.0.0.1:{closed_port}")]),
    );
    let refused = pool
        .invoke(
            &order(4, "c-4"),
            &context(
                &format!("http://127.0.0.1:{closed_port}"),
                Some(refused_gate),
            ),
        )
        .await
        .unwrap();
    let (kind, message) = error(&refused);
    assert_eq!(kind, ErrorKind::Retryable, "{message}");
    assert!(message.contains("cannot reach"), "{message}");

    // Slow: the binding's total timeout (300 ms) cuts a 5 s answer short, retryably.
    let mut slow_policy = HttpPolicy::allowing([allowed.clone()]);
    slow_policy.timeout_ms = 300;
    let slow_gate = gate(&metrics, "b.slow", slow_policy);
    service.mode.store(SLOW, Ordering::SeqCst);
    let started = Instant::now();
    let slow = pool
        .invoke(&order(5, "c-5"), &context(&url, Some(slow_gate)))
        .await
        .unwrap();
    let took = started.elapsed();
    let (kind, message) = error(&slow);
    assert_eq!(kind, ErrorKind::Retryable, "{message}");
    assert!(message.contains("timed out"), "{message}");
    assert!(took < Duration::from_secs(3), "the timeout took {took:?}");
    println!("slow service: timed out after {took:?} (timeout_ms 300)");
    // The invocation's own deadline (400 ms) bounds a request whose timeout is longer.
    let patient_gate = gate(
        &metrics,
        "b.patient",
        HttpPolicy::allowing([allowed.clone()]),
    );
    let mut short = context(&url, Some(patient_gate));
    short.deadline = Some(Duration::from_millis(400));
    let started = Instant::now();
    let cut = pool.invoke(&order(5, "c-5"), &short).await.unwrap();
    let took = started.elapsed();
    assert!(
        matches!(
            &cut.outcome,
            Outcome::HandlerError {
                kind: ErrorKind::Retryable,
                ..
            } | Outcome::Trap {
                kind: weir::runtime::TrapKind::Deadline,
                ..
            }
        ),
        "{:?}",
        cut.outcome
    );
    assert!(took < Duration::from_secs(2), "the deadline took {took:?}");
    println!(
        "slow service under a 400 ms deadline: {:?} after {took:?}",
        cut.outcome
    );

    // Too large, declared and streamed: permanent.
    let big_gate = gate(&metrics, "b.big", HttpPolicy::allowing([allowed.clone()]));
    for mode in [BIG, BIG_STREAMED] {
        service.mode.store(mode, Ordering::SeqCst);
        let big = pool
            .invoke(&order(6, "c-6"), &context(&url, Some(big_gate.clone())))
            .await
            .unwrap();
        let (kind, message) = error(&big);
        assert_eq!(kind, ErrorKind::Permanent, "mode {mode}: {message}");
        assert!(
            message.contains("max_response_bytes"),
            "mode {mode}: {message}"
        );
    }

    // The destination fails: 3 answers of 503 open its breaker.
    service.mode.store(FAILING, Ordering::SeqCst);
    let before = requests();
    for i in 0..3 {
        let failed = pool.invoke(&order(10 + i, "c-7"), &ctx).await.unwrap();
        let (kind, message) = error(&failed);
        assert_eq!(kind, ErrorKind::Retryable, "{message}");
        assert!(message.contains("503"), "{message}");
    }
    assert_eq!(requests() - before, 3);
    assert_eq!(
        open_gate.breaker_state(&allowed).map(|s| s.as_str()),
        Some("open")
    );
    // While open: fail fast, the service sees nothing.
    let opened = Instant::now();
    for i in 0..5 {
        let fast = pool.invoke(&order(20 + i, "c-7"), &ctx).await.unwrap();
        let (kind, message) = error(&fast);
        assert_eq!(kind, ErrorKind::Retryable, "{message}");
        assert!(message.contains("circuit breaker is open"), "{message}");
    }
    assert_eq!(
        requests() - before,
        3,
        "requests reached an open destination"
    );
    println!(
        "breaker open: 5 requests failed fast in {:?}",
        opened.elapsed()
    );
    // Another destination of the same binding has its own breaker, still closed.
    service.mode.store(HEALTHY, Ordering::SeqCst);
    let other = pool
        .invoke(
            &order(30, "c-8"),
            &context(&format!("http://localhost:{port}"), Some(open_gate.clone())),
        )
        .await
        .unwrap();
    assert_eq!(other.outcome, Outcome::Ok, "{:?}", other.outcome);
    assert_eq!(requests() - before, 4);
    // After open_for the probes go through and, succeeding twice, close it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..2 {
        let probe = pool.invoke(&order(40 + i, "c-9"), &ctx).await.unwrap();
        assert_eq!(probe.outcome, Outcome::Ok, "{:?}", probe.outcome);
    }
    assert_eq!(
        open_gate.breaker_state(&allowed).map(|s| s.as_str()),
        Some("closed")
    );
    assert_eq!(requests() - before, 6);

    let text = metrics.render();
    let count = |binding: &str, outcome: &str| {
        metric_value(
            &text,
            "weir_http_requests_total",
            &[
                &format!("binding=\"{binding}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        )
    };
    assert_eq!(count("b.elsewhere", "denied"), 1.0);
    assert_eq!(count("b.internal", "denied"), 1.0);
    assert_eq!(count("b.breaks", "breaker_open"), 5.0);
    assert_eq!(count("b.breaks", "server_error"), 3.0);
    assert_eq!(count("b.breaks", "answered"), 7.0);
    assert_eq!(count("b.closed", "failed"), 1.0);
    assert_eq!(count("b.slow", "timeout"), 1.0);
    assert_eq!(count("b.big", "too_large"), 2.0);
    assert_eq!(
        metric_value(
            &text,
            "weir_http_breaker_state",
            &[
                "binding=\"b.breaks\"",
                &format!("destination=\"{allowed}\"")
            ]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrichment_survives_a_service_outage_exactly_once() {
    const ORDERS: usize = 300;
    const CUSTOMERS: usize = 20;
    let services = services();
    let (service, port) = serve().await;
    service.mode.store(FAILING, Ordering::SeqCst);

    let input = unique_name("enrich_in");
    let output = format!("{input}.enriched");
    create_topic(&services.kafka, &input, 4).await;
    let store = weir::store::connect(&services.database_url).await.unwrap();
    let db = sqlx::PgPool::connect(&services.database_url).await.unwrap();
    let tenant = unique_name("t");
    let bytes = std::fs::read(component("weir_handler_enrich")).unwrap();
    let version = store
        .put_handler_version(&tenant, "enrich", &bytes, &Quota::default())
        .await
        .unwrap();
    store
        .activate(&tenant, "enrich", version.version)
        .await
        .unwrap();
    let mut spec = BindingSpec::new(&tenant, "enrich", vec![input.clone()]);
    spec.output_topics = vec![output.clone()];
    spec.config.insert("output-topic".into(), output.clone());
    spec.config
        .insert("customers-url".into(), format!("http://127.0.0.1:{port}"));
    spec.max_in_flight = 16;
    spec.retry.max_attempts = 50;
    spec.retry.backoff = vec![Duration::from_millis(200), Duration::from_millis(500)];
    spec.breaker = BreakerPolicy {
        failure_threshold: 10,
        success_threshold: 2,
        open_for_ms: 1_000,
    };
    let mut http = HttpPolicy::allowing([format!("127.0.0.1:{port}")]);
    http.breaker = BreakerPolicy {
        failure_threshold: 3,
        success_threshold: 1,
        open_for_ms: 500,
    };
    spec.http = Some(http);
    spec.validate().unwrap();
    let binding_id = format!("{tenant}.enrich");
    store
        .put_binding(
            &binding_id,
            &tenant,
            "enrich",
            &serde_json::to_value(&spec).unwrap(),
        )
        .await
        .unwrap();

    let runtime = Runtime::new(RuntimeConfig {
        pool_instances: 32,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let handler = Arc::new(HandlerPool::new(runtime.load(&bytes).unwrap(), 16).granting_http());
    let metrics = Metrics::new();
    let mut kafka = ClientConfig::new();
    kafka.set("bootstrap.servers", &services.kafka);
    let stats = Arc::new(WorkerStats::default());
    let worker = Worker {
        binding_id: binding_id.clone(),
        spec: spec.clone(),
        handler: HandlerSlot::new(handler, Some(version.version)),
        store: store.clone(),
        kafka,
        settings: WorkerSettings {
            http_allow_private_networks: true,
            ..WorkerSettings::default()
        },
        stats: stats.clone(),
        pause: PauseSwitch::default(),
        metrics: Some(metrics.clone()),
        rate_limit: None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { worker.run(stopped).await.unwrap() });

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut sends = Vec::new();
    for i in 0..ORDERS {
        let customer = format!("c-{}", i % CUSTOMERS);
        let payload = json!({ "order_id": format!("o-{i}"), "customer": customer }).to_string();
        let record = FutureRecord::to(&input).key(&customer).payload(&payload);
        sends.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for send in sends {
        send.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    // The service is down for 4 s after the first request reaches it.
    let started = Instant::now();
    while service.requests.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no request came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during_outage = service.requests.load(Ordering::SeqCst);
    let failed_fast_during_outage = metric_value(
        &metrics.render(),
        "weir_http_requests_total",
        &["outcome=\"breaker_open\""],
    );
    service.mode.store(HEALTHY, Ordering::SeqCst);
    let recovered = Instant::now();

    let count = |sql: &'static str| {
        let db = db.clone();
        let binding_id = binding_id.clone();
        async move {
            sqlx::query(sql)
                .bind(&binding_id)
                .fetch_one(&db)
                .await
                .unwrap()
                .get::<i64, _>(0)
        }
    };
    loop {
        let done = count("SELECT count(*) FROM processed_key_ids WHERE binding_id = $1").await;
        if done as usize >= ORDERS {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(120),
            "only {done} of {ORDERS} orders processed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up = recovered.elapsed();
    let _ = stop.send(true);
    task.await.unwrap();

    let dead = count("SELECT count(*) FROM dlq_entries WHERE binding_id = $1").await;
    let rows = sqlx::query("SELECT message_id, payload FROM outbox WHERE binding_id = $1")
        .bind(&binding_id)
        .fetch_all(&db)
        .await
        .unwrap();
    let mut orders = std::collections::HashSet::new();
    for row in &rows {
        let payload: Value = serde_json::from_slice(&row.get::<Vec<u8>, _>("payload")).unwrap();
        let customer = payload["customer"].as_str().unwrap().to_owned();
        assert_eq!(
            payload["customer_profile"]["name"],
            format!("Customer {customer}")
        );
        orders.insert(payload["order_id"].as_str().unwrap().to_owned());
    }
    let text = metrics.render();
    let outcome = |o: &str| {
        metric_value(
            &text,
            "weir_http_requests_total",
            &[&format!("outcome=\"{o}\"")],
        )
    };
    println!(
        "outage of 4 s: {during_outage} requests reached the service, {failed_fast_during_outage} failed fast; \
         caught up {caught_up:?} after recovery; outbox {} rows, {} distinct orders, DLQ {dead}; \
         http answered {} (5xx {}), breaker_open {}, retried {}",
        rows.len(),
        orders.len(),
        outcome("answered"),
        outcome("server_error"),
        outcome("breaker_open"),
        stats.retried.load(Ordering::Relaxed),
    );
    assert_eq!(dead, 0, "messages were dead-lettered during the outage");
    assert_eq!(rows.len(), ORDERS, "effects lost or doubled");
    assert_eq!(orders.len(), ORDERS, "orders lost or doubled");
    assert!(
        failed_fast_during_outage > 0.0,
        "the destination breaker never failed a request fast"
    );
}
