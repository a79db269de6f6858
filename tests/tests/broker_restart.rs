//! Broker restart mid-run: the Kafka broker is stopped while `weir serve` works — once cleanly
//! (SIGTERM), once as a crash (SIGKILL) — and started again each time. Consumption and the
//! outbox relay pause and resume; nothing is lost, nothing doubled, nothing dead-lettered.
//!
//! Stops the shared test broker, so it lives in a test binary of its own (`cargo test` runs
//! test binaries one after another).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use serve_support::{Scenario, names_down, wait_readiness};

const ADMIN: &str = "broker-restart-admin-token";
/// Messages ingested through the admin API during each outage.
const INGESTED: usize = 5;

const MESSAGES: usize = 20_000;
/// How long the broker stays down each time (at least; a clean stop may take longer).
const OUTAGE: Duration = Duration::from_secs(30);

fn services(args: &[&str]) {
    let script = weir_acceptance::repo_root().join("tests/services");
    let status = Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "tests/services {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_pause_processing_and_lose_nothing() {
    let mut run = Scenario::new("brokerrestart", 6, MESSAGES, 50).await;
    run.set_env("WEIR_SERVER__ADMIN_TOKEN", ADMIN);
    let (mut host, port) = run.start_listening(0);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut outages = Vec::new();
    let mut ingested = Vec::new();
    for (round, stop) in [&["stop", "kafka"][..], &["stop", "kafka", "--kill"][..]]
        .into_iter()
        .enumerate()
    {
        let target = MESSAGES * (round + 1) / 4;
        run.wait_for(target, &mut [&mut host], Duration::from_secs(180))
            .await;
        wait_readiness(port, Duration::from_secs(30), "ready", |s, _| s == 200).await;
        let down = Instant::now();
        services(stop);
        // Readiness flips, naming Kafka.
        let (_, not_ready) = wait_readiness(
            port,
            Duration::from_secs(30),
            "503 naming kafka",
            |s, body| s == 503 && names_down(body, "kafka"),
        )
        .await;
        eprintln!(
            "broker restart: /health/ready {:?} into the outage: 503 {not_ready}",
            down.elapsed()
        );
        // Ingest keeps accepting into the outbox while the broker is down.
        let messages: Vec<_> = (0..INGESTED)
            .map(|i| {
                let id = format!("{}-ingest-{round}-{i}", run.tenant);
                ingested.push(id.clone());
                json!({"key": format!("k-{i}"), "value": {"n": i}, "message_id": id})
            })
            .collect();
        let response = http
            .post(format!("{base}/v1/topics/{}/messages", run.output))
            .query(&[("tenant", run.tenant.as_str())])
            .bearer_auth(ADMIN)
            .json(&json!({"messages": messages}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let accepted: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 202, "ingest while the broker is down: {accepted}");
        for m in accepted["messages"].as_array().unwrap() {
            assert_eq!(m["state"], json!("pending"), "{accepted}");
        }
        tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
        assert!(
            host.try_wait().unwrap().is_none(),
            "weir serve died while the broker was down"
        );
        services(&["start", "kafka"]);
        outages.push(down.elapsed());
        let up = Instant::now();
        wait_readiness(port, Duration::from_secs(120), "ready again", |s, _| {
            s == 200
        })
        .await;
        eprintln!(
            "broker restart: /health/ready back to 200 {:?} after the broker started",
            up.elapsed()
        );
    }
    run.wait_for(MESSAGES, &mut [&mut host], Duration::from_secs(300))
        .await;
    // The messages ingested during the outages reach Kafka once it is back.
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ingested {
        loop {
            let body: serde_json::Value = http
                .get(format!("{base}/v1/messages/{id}"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if body["state"] == json!("sent") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ingested message {id} never reached sent: {body}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!(
        "broker restart: {} messages ingested while the broker was down, all sent",
        ingested.len()
    );
    // The details name this binding: its worker runs and (once the group has settled after
    // the restart; a rebalance may still be under way) holds all six partitions.
    let settle = Instant::now() + Duration::from_secs(90);
    loop {
        let details: serde_json::Value = http
            .get(format!("{base}/health/details"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ours = details["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == json!(run.binding_id))
            .unwrap_or_else(|| panic!("binding missing from /health/details: {details}"))
            .clone();
        let seen = (
            details["store"]["status"].clone(),
            details["kafka"]["status"].clone(),
            ours["worker_running"].clone(),
            ours["partitions_assigned"].clone(),
            ours["breaker"].clone(),
        );
        let expected = (
            json!("ok"),
            json!("ok"),
            json!(true),
            json!(6),
            json!("closed"),
        );
        if seen == expected {
            break;
        }
        assert!(Instant::now() < settle, "{details}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    run.terminate(&mut host);

    let ((lost, doubled), (records, ids)) = run.verify().await;
    let dead = run.dead_lettered().await;
    eprintln!(
        "broker restart: {MESSAGES} messages, broker down {outages:?} (SIGTERM, then SIGKILL); lost {lost}, doubled {doubled}, dead-lettered {dead}; outbox {records} records, {ids} distinct ids"
    );
    assert_eq!((lost, doubled, dead), (0, 0, 0));
    assert_eq!((records, ids), (MESSAGES as i64, MESSAGES as i64));
}
