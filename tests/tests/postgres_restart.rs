//! PostgreSQL restart mid-run: the database is stopped while `weir serve` works and started
//! again. Processing pauses and resumes; nothing is lost, nothing doubled, and nothing is
//! dead-lettered — the host's own fault is never the handler's. The outage outlasts the
//! consumer's `max.poll.interval.ms`, and the host keeps its partitions throughout: intake
//! pauses them and keeps polling.
//!
//! Stops the shared test database, so it lives in a test binary of its own (`cargo test` runs
//! test binaries one after another).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::process::Command;
use std::time::{Duration, Instant};

use serve_support::{Scenario, names_down, wait_readiness};

const MESSAGES: usize = 20_000;
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(10);
const OUTAGE: Duration = Duration::from_secs(30);

fn services(args: &[&str]) {
    let script = weir_acceptance::repo_root().join("tests/services");
    let status = Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "tests/services {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_pauses_processing_and_loses_nothing() {
    let mut run = Scenario::new("pgrestart", 6, MESSAGES, 50).await;
    // A poll interval shorter than the outage: a host that stopped polling while the database
    // is down would leave its group. Weir pauses its partitions and keeps polling instead.
    run.set_env("WEIR_KAFKA__SESSION_TIMEOUT_MS", "6000");
    run.set_env("WEIR_PIPELINE__DRAIN_DEADLINE_MS", "4000");
    run.set_env(
        "WEIR_KAFKA__CLIENT_OVERRIDES__MAX_POLL_INTERVAL_MS",
        &MAX_POLL_INTERVAL.as_millis().to_string(),
    );
    let (mut host, port) = run.start_listening(0);
    run.wait_for(MESSAGES / 4, &mut [&mut host], Duration::from_secs(120))
        .await;
    wait_readiness(port, Duration::from_secs(30), "ready", |s, _| s == 200).await;
    let stopped_at = Instant::now();
    services(&["stop", "postgres"]);
    // Readiness flips while the database is down, naming the store.
    let (_, not_ready) = wait_readiness(port, OUTAGE, "503 naming the store", |s, body| {
        s == 503 && names_down(body, "store")
    })
    .await;
    eprintln!(
        "postgres restart: /health/ready during the outage after {:?}: 503 {not_ready}",
        stopped_at.elapsed()
    );
    tokio::time::sleep(OUTAGE.saturating_sub(stopped_at.elapsed())).await;
    assert!(
        host.try_wait().unwrap().is_none(),
        "weir serve died while the database was down"
    );
    services(&["start", "postgres"]);
    let outage = stopped_at.elapsed();
    let started_at = Instant::now();
    wait_readiness(port, Duration::from_secs(60), "ready again", |s, _| {
        s == 200
    })
    .await;
    eprintln!(
        "postgres restart: /health/ready back to 200 {:?} after the database started",
        started_at.elapsed()
    );
    run.wait_for(MESSAGES, &mut [&mut host], Duration::from_secs(300))
        .await;
    run.terminate(&mut host);

    let ((lost, doubled), (records, ids)) = run.verify().await;
    let dead = run.dead_lettered().await;
    eprintln!(
        "postgres restart: {MESSAGES} messages, database down {outage:?}; lost {lost}, doubled {doubled}, dead-lettered {dead}; outbox {records} records, {ids} distinct ids"
    );
    assert_eq!((lost, doubled, dead), (0, 0, 0));
    // One assignment for the whole run: the host never left its group during the outage.
    let log = std::fs::read_to_string(run.log(0)).unwrap();
    // (The store is shared with earlier runs, whose bindings this host serves too.)
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&run.binding_id))
        .collect();
    let assignments = ours
        .iter()
        .filter(|l| l.contains("partitions assigned"))
        .count();
    eprintln!(
        "postgres restart: {assignments} partition assignment(s) over the run (max.poll.interval {MAX_POLL_INTERVAL:?}, outage {OUTAGE:?})"
    );
    // The database's outage is the host's fault: no message spent an attempt on it (a handler
    // waiting on a state read the pool could not serve before the invocation's deadline once
    // did, and was retried, then dead-lettered).
    let retried: Vec<&str> = ours
        .iter()
        .copied()
        .filter(|l| l.contains("retrying") && l.contains("attempt"))
        .collect();
    assert!(
        retried.is_empty(),
        "messages spent attempts on the outage:\n{}",
        retried.join("\n")
    );
    let rebalancing: Vec<&str> = ours
        .iter()
        .copied()
        .filter(|l| l.contains("assigned") || l.contains("revoc") || l.contains("poll"))
        .collect();
    assert_eq!(
        assignments,
        1,
        "the host rebalanced during the outage:\n{}",
        rebalancing.join("\n")
    );
    assert_eq!((records, ids), (MESSAGES as i64, MESSAGES as i64));
}
