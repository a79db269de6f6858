//! PostgreSQL restart mid-run: the database is stopped while `weir serve` works and started
//! again. Processing pauses and resumes; nothing is lost, nothing doubled, and nothing is
//! dead-lettered — the host's own fault is never the handler's.
//!
//! Stops the shared test database, so it lives in a test binary of its own (`cargo test` runs
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
async fn a_database_restart_pauses_processing_and_loses_nothing() {
    let run = Scenario::new("pgrestart", 6, MESSAGES, 50).await;
    let mut host = run.start(0);
    run.wait_for(MESSAGES / 4, &mut [&mut host], Duration::from_secs(120))
        .await;
    let stopped_at = Instant::now();
    services(&["stop", "postgres"]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        host.try_wait().unwrap().is_none(),
        "weir serve died while the database was down"
    );
    services(&["start", "postgres"]);
    let outage = stopped_at.elapsed();
    run.wait_for(MESSAGES, &mut [&mut host], Duration::from_secs(300))
        .await;
    run.terminate(&mut host);

    let ((lost, doubled), (records, ids)) = run.verify().await;
    let dead = run.dead_lettered().await;
    eprintln!(
        "postgres restart: {MESSAGES} messages, database down {outage:?}; lost {lost}, doubled {doubled}, dead-lettered {dead}; outbox {records} records, {ids} distinct ids"
    );
    assert_eq!((lost, doubled, dead), (0, 0, 0));
    assert_eq!((records, ids), (MESSAGES as i64, MESSAGES as i64));
}
