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

use serve_support::Scenario;

const MESSAGES: usize = 20_000;

fn services(args: &[&str]) {
    let script = weir_acceptance::repo_root().join("tests/services");
    let status = Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "tests/services {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_pause_processing_and_lose_nothing() {
    let run = Scenario::new("brokerrestart", 6, MESSAGES, 50).await;
    let mut host = run.start(0);
    let mut outages = Vec::new();
    for (round, stop) in [&["stop", "kafka"][..], &["stop", "kafka", "--kill"][..]]
        .into_iter()
        .enumerate()
    {
        let target = MESSAGES * (round + 1) / 4;
        run.wait_for(target, &mut [&mut host], Duration::from_secs(180))
            .await;
        let down = Instant::now();
        services(stop);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            host.try_wait().unwrap().is_none(),
            "weir serve died while the broker was down"
        );
        services(&["start", "kafka"]);
        outages.push(down.elapsed());
    }
    run.wait_for(MESSAGES, &mut [&mut host], Duration::from_secs(300))
        .await;
    run.terminate(&mut host);

    let ((lost, doubled), (records, ids)) = run.verify().await;
    let dead = run.dead_lettered().await;
    eprintln!(
        "broker restart: {MESSAGES} messages, broker down {outages:?} (SIGTERM, then SIGKILL); lost {lost}, doubled {doubled}, dead-lettered {dead}; outbox {records} records, {ids} distinct ids"
    );
    assert_eq!((lost, doubled, dead), (0, 0, 0));
    assert_eq!((records, ids), (MESSAGES as i64, MESSAGES as i64));
}
