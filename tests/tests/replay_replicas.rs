//! DLQ replay with two replicas of `weir serve` sharing a binding: each replica claims only the
//! replays of the partitions it holds, so every entry runs again within seconds of the
//! operator's request, wherever its partition is. (Before, whichever replica claimed first
//! leased every queued entry, and the entries of the other replica's partitions waited out the
//! 60 s lease.)
//!
//! Malformed orders are dead-lettered (permanent) on partitions spread over both replicas; all
//! are queued for replay at once; being malformed still, each replay fails again and files its
//! entry as pending with a new failure time. The test waits for every entry to be back, well
//! within the lease, and checks that both replicas ran replays.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use serve_support::{Scenario, client_config, shared_kafka};
use weir::store::{DlqFilter, DlqState, PgStore, Store};

const PARTITIONS: i32 = 6;
/// Malformed orders, each with a key of its own (spread over the partitions).
const POISON: usize = 24;
/// The replay lease (`REPLAY_LEASE` in the worker): a replay claimed by the wrong replica
/// would wait this long.
const LEASE: Duration = Duration::from_secs(60);

fn both_assigned(run: &Scenario) -> bool {
    (0..2).all(|n| {
        std::fs::read_to_string(run.log(n)).is_ok_and(|log| {
            log.lines()
                .any(|l| l.contains(&run.binding_id) && l.contains("partitions assigned"))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_replica_replays_the_entries_of_its_own_partitions() {
    let run = Scenario::deployed("replay_replicas", PARTITIONS).await;
    let mut first = run.start(0);
    let mut second = run.start(1);
    let started = Instant::now();
    while !both_assigned(&run) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the two replicas did not both get partitions; logs in {}",
            run.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the group settle after the second member joined.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let producer: FutureProducer = client_config(&shared_kafka()).create().unwrap();
    for i in 0..POISON {
        let key = format!("poison-{i}");
        let record = FutureRecord::to(&run.input)
            .key(&key)
            .payload("not an order");
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let store = PgStore::connect(&run.database_url).await.unwrap();
    let pending = |store: &PgStore| {
        let filter = DlqFilter {
            binding_id: Some(run.binding_id.clone()),
            state: Some(DlqState::Pending),
            ..DlqFilter::default()
        };
        let store = store.clone();
        async move { store.dlq_list(&filter).await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let entries = loop {
        let entries = pending(&store).await;
        if entries.len() == POISON {
            break entries;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {POISON} malformed orders dead-lettered; logs in {}",
            entries.len(),
            run.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let partitions: std::collections::BTreeSet<i32> =
        entries.iter().map(|e| e.entry.partition).collect();
    assert!(
        partitions.len() >= 2,
        "the poison landed on one partition only"
    );

    // Replay every entry at once.
    let asked = Instant::now();
    let failed_before: std::collections::HashMap<i64, _> = entries
        .iter()
        .map(|e| (e.id, e.entry.last_failure_at))
        .collect();
    for entry in &entries {
        store.dlq_replay(&run.tenant, entry.id).await.unwrap();
    }
    // Each replay fails again (still malformed) and files its entry as pending, with a new
    // failure time.
    loop {
        let again = pending(&store)
            .await
            .into_iter()
            .filter(|e| {
                failed_before
                    .get(&e.id)
                    .is_some_and(|t| e.entry.last_failure_at > *t)
            })
            .count();
        if again == POISON {
            break;
        }
        assert!(
            asked.elapsed() < LEASE / 2,
            "{again} of {POISON} replays ran within {:?} (partitions {partitions:?}); logs in {}",
            LEASE / 2,
            run.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = asked.elapsed();
    // Both replicas replayed entries of their own partitions.
    let replayed_by = |n: usize| {
        std::fs::read_to_string(run.log(n))
            .unwrap()
            .lines()
            .filter(|l| l.contains(&run.binding_id) && l.contains("claimed for replay"))
            .count()
    };
    let (by_first, by_second) = (replayed_by(0), replayed_by(1));
    eprintln!(
        "replay with two replicas: {POISON} entries on partitions {partitions:?} ran again {took:?} after the request (lease {LEASE:?}); claims logged: {by_first} by the first replica, {by_second} by the second"
    );
    assert!(
        by_first > 0 && by_second > 0,
        "one replica ran every replay: {by_first} / {by_second} claims"
    );
    run.terminate(&mut first);
    run.terminate(&mut second);
}
