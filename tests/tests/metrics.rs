//! `GET /metrics` of `weir serve` under traffic, against the real broker and PostgreSQL: the
//! counters rise between two scrapes, the duration and latency histograms fill, and the consumer
//! lag gauge shows every partition of the binding and reaches 0 once everything is processed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::time::{Duration, Instant};

use serve_support::Scenario;
use weir_acceptance::metric_value as value;

const PARTITIONS: i32 = 3;
const BATCH: usize = 1_000;
const KEYS: usize = 20;

async fn scrape(port: u16) -> String {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_shows_counters_rising_histograms_filling_and_the_lag_draining() {
    let mut run = Scenario::new("metrics", PARTITIONS, BATCH, KEYS).await;
    let (mut host, port) = run.start_listening(0);
    run.wait_for(BATCH, &mut [&mut host], Duration::from_secs(120))
        .await;
    let binding = format!("binding=\"{}\"", run.binding_id);
    let ok = ["outcome=\"ok\"", binding.as_str()];
    // The group commit that the processed keys show may not have been counted yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let text = scrape(port).await;
        if value(&text, "weir_messages_processed_total", &ok) >= BATCH as f64
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // More traffic: the counters rise.
    run.produce(BATCH, KEYS).await;
    run.wait_for(2 * BATCH, &mut [&mut host], Duration::from_secs(120))
        .await;
    // Then wait for the lag of every partition to be sampled at 0 (librdkafka's statistics
    // come every 5 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let second = loop {
        let text = scrape(port).await;
        let partitions: Vec<f64> = (0..PARTITIONS)
            .map(|p| {
                let partition = format!("partition=\"{p}\"");
                let topic = format!("topic=\"{}\"", run.input);
                let labels = [binding.as_str(), topic.as_str(), partition.as_str()];
                let present = text.lines().any(|l| {
                    l.starts_with("weir_consumer_lag{") && labels.iter().all(|x| l.contains(x))
                });
                if present {
                    value(&text, "weir_consumer_lag", &labels)
                } else {
                    -1.0
                }
            })
            .collect();
        if partitions.iter().all(|lag| *lag == 0.0)
            && value(&text, "weir_messages_processed_total", &ok) >= 2.0 * BATCH as f64
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "lag per partition {partitions:?} (-1: absent); logs in {}\n{text}",
            run.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    run.terminate(&mut host);

    let consumed = |text: &str| value(text, "weir_messages_consumed_total", &[&binding]);
    let processed = |text: &str| value(text, "weir_messages_processed_total", &ok);
    assert!(consumed(&first) >= BATCH as f64, "{first}");
    assert!(
        consumed(&second) >= consumed(&first) + BATCH as f64,
        "consumed {} then {}",
        consumed(&first),
        consumed(&second)
    );
    assert!(
        processed(&second) >= processed(&first) + BATCH as f64,
        "processed {} then {}",
        processed(&first),
        processed(&second)
    );
    for histogram in [
        "weir_handler_duration_seconds_count",
        "weir_end_to_end_latency_seconds_count",
    ] {
        let (before, after) = (
            value(&first, histogram, &[&binding]),
            value(&second, histogram, &[&binding]),
        );
        assert!(
            before > 0.0 && after >= before + BATCH as f64,
            "{histogram}: {before} then {after}"
        );
    }
    assert!(value(&second, "weir_group_commits_total", &[&binding]) > 0.0);
    assert!(value(&second, "weir_commit_batch_size_count", &[&binding]) > 0.0);
    assert_eq!(value(&second, "weir_breaker_state", &[&binding]), 0.0);
    assert_eq!(value(&second, "weir_in_flight", &[&binding]), 0.0);
    // `orders` emits one record per order: the relay published them.
    assert!(
        value(&second, "weir_outbox_published_total", &[]) > 0.0,
        "{second}"
    );
    assert!(value(&second, "weir_outbox_relay_latency_seconds_count", &[]) > 0.0);
    assert!(value(&second, "weir_wasm_compile_cache_total", &[]) > 0.0);

    let excerpt: Vec<&str> = second
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            (l.contains(&binding) || l.starts_with("weir_outbox") || l.starts_with("weir_wasm"))
                && !l.contains("_bucket")
                && !l.ends_with(" 0")
                || l.starts_with("weir_consumer_lag")
        })
        .collect();
    eprintln!(
        "metrics: first scrape consumed {} processed {}; second consumed {} processed {}\n{}",
        consumed(&first),
        processed(&first),
        consumed(&second),
        processed(&second),
        excerpt.join("\n")
    );
    let ((lost, doubled), _) = run.verify().await;
    assert_eq!((lost, doubled), (0, 0));
}

/// POST to the admin API of the host on `port` with the admin token.
async fn admin_post(port: u16, path: &str) {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
}

const ADMIN: &str = "metrics-test-admin-token-0123";

/// The binding's lag over all its partitions, once every partition has been sampled.
fn binding_lag(text: &str, binding: &str) -> Option<f64> {
    let samples = text
        .lines()
        .filter(|l| l.starts_with("weir_consumer_lag{") && l.contains(binding))
        .count();
    (samples == PARTITIONS as usize).then(|| value(text, "weir_consumer_lag", &[binding]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_gauge_follows_a_paused_binding() {
    let mut run = Scenario::new("lagpause", PARTITIONS, 10, KEYS).await;
    run.set_env("WEIR_SERVER__ADMIN_TOKEN", ADMIN);
    let (mut host, port) = run.start_listening(0);
    run.wait_for(10, &mut [&mut host], Duration::from_secs(120))
        .await;
    let binding = format!("binding=\"{}\"", run.binding_id);
    let breaker = format!(
        "/v1/tenants/{}/bindings/{}/breaker",
        run.tenant, run.binding_id
    );

    // Paused by an operator: messages produced now wait in Kafka, and the lag shows them.
    admin_post(port, &format!("{breaker}/open")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.produce(BATCH, KEYS).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let paused_lag = loop {
        let text = scrape(port).await;
        if let Some(lag) = binding_lag(&text, &binding)
            && lag >= BATCH as f64
        {
            break lag;
        }
        assert!(
            Instant::now() < deadline,
            "the lag never showed the paused backlog:\n{}",
            text.lines()
                .filter(|l| l.contains("weir_consumer_lag"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        run.processed().await,
        10,
        "messages ran while the binding was paused"
    );

    // Resumed: the backlog drains and the lag returns to 0.
    admin_post(port, &format!("{breaker}/reset")).await;
    run.wait_for(10 + BATCH, &mut [&mut host], Duration::from_secs(120))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = scrape(port).await;
        if binding_lag(&text, &binding) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the lag never returned to 0");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("lag while paused: {paused_lag} (backlog {BATCH}); after resume: 0");
    run.terminate(&mut host);
    let ((lost, doubled), _) = run.verify().await;
    assert_eq!((lost, doubled), (0, 0));
}
