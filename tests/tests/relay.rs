//! The outbox relay against the real broker and the real PostgreSQL server (`tests/services
//! up`), and against an SQLite file (the embedded mode): rows inserted in the outbox are
//! published once each, with Weir's headers, and marked sent; a notification wakes the relay
//! long before its next sweep.
//!
//! The broker-outage test stops the broker, so it lives in a binary of its own
//! (`relay_outage.rs`): `cargo test` runs test binaries one after another, so nothing here runs
//! while the broker is down.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod relay_support;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use weir::kafka::RelaySettings;
use weir::store::{CommitOutcome, Store};
use weir_acceptance::{services, unique_name};

use relay_support::{
    FlakyStore, RunningRelay, TIMEOUT, TestStore, check_all_sent, check_exactly_once, consume,
    create_topic, rows,
};

/// A sweep interval no test waits for: anything published sooner was woken by a notification.
const NO_SWEEP: Duration = Duration::from_secs(600);

/// A wake-up by notification must publish within this (the sweep would take [`NO_SWEEP`]).
const WOKEN_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn postgres_rows_are_published_once_with_weir_headers_and_marked_sent() {
    const N: usize = 500;
    let kafka = services().kafka;
    let db = TestStore::postgres().await;
    let topic = create_topic(&kafka, "relay").await;
    let prefix = unique_name("m");
    let rows = rows(&topic, &prefix, 0, N);
    let outcomes = db
        .store
        .outbox_insert("acme", Some("acme-orders"), &rows)
        .await
        .expect("insert outbox rows");
    assert!(outcomes.iter().all(|o| *o == CommitOutcome::Committed));
    assert_eq!(db.store.outbox_pending().await.unwrap(), N as i64);

    // Batches of 128: three full ones claimed back to back, then a partial one.
    let started = Instant::now();
    let relay = RunningRelay::start(
        &db.store,
        &kafka,
        RelaySettings {
            batch: 128,
            ..RelaySettings::default()
        },
    );
    let received = consume(&kafka, &topic, N, TIMEOUT).await;
    let consumed_in = started.elapsed();
    check_exactly_once(&received, &rows);
    let partitions: std::collections::BTreeSet<i32> =
        received.iter().map(|r| r.partition).collect();
    assert_eq!(partitions.len(), 3, "keys spread over every partition");
    check_all_sent(db.store.as_ref(), &rows).await;
    assert_eq!(relay.stats.published(), N as u64);
    assert_eq!(relay.stats.failed(), 0);
    assert_eq!(relay.stats.store_errors(), 0);
    let stopped_in = relay.stop().await;
    eprintln!(
        "relay: {N} rows published and read back in {consumed_in:?} ({} records, quiet period \
         included); shutdown took {stopped_in:?}",
        received.len()
    );
    assert!(
        stopped_in < Duration::from_secs(15),
        "shutdown took {stopped_in:?}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_notification_wakes_the_relay_long_before_its_sweep() {
    const N: usize = 50;
    let kafka = services().kafka;
    let db = TestStore::postgres().await;
    let topic = create_topic(&kafka, "relay_notify").await;
    let prefix = unique_name("m");
    let relay = RunningRelay::start(
        &db.store,
        &kafka,
        RelaySettings {
            sweep_every: NO_SWEEP,
            ..RelaySettings::default()
        },
    );
    // Let the relay listen, find nothing, and settle into waiting for the next wake-up. The
    // test has a database of its own, so only its own inserts notify.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut all = Vec::new();
    for round in 0..2 {
        let batch = rows(&topic, &prefix, round * N, N);
        let inserted_at = Instant::now();
        db.store
            .outbox_insert("acme", None, &batch)
            .await
            .expect("insert outbox rows");
        relay_support::wait_for("the rows to be published", TIMEOUT, || async {
            relay.stats.published() >= ((round + 1) * N) as u64
        })
        .await;
        let woken_in = inserted_at.elapsed();
        eprintln!("relay: round {round}: {N} rows published {woken_in:?} after their insert");
        assert!(
            woken_in < WOKEN_WITHIN,
            "round {round}: published {woken_in:?} after the insert; the sweep is {NO_SWEEP:?}, \
             so the notification did not wake the relay"
        );
        all.extend(batch);
    }
    let received = consume(&kafka, &topic, all.len(), TIMEOUT).await;
    check_exactly_once(&received, &all);
    check_all_sent(db.store.as_ref(), &all).await;
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_rows_are_published_too() {
    const N: usize = 100;
    let kafka = services().kafka;
    let db = TestStore::sqlite().await;
    let topic = create_topic(&kafka, "relay_sqlite").await;
    let prefix = unique_name("m");
    // Half before the relay starts (its first claim finds them), half after (the in-process
    // notification wakes it: the sweep is too slow to matter).
    let before = rows(&topic, &prefix, 0, N);
    db.store
        .outbox_insert("acme", None, &before)
        .await
        .expect("insert outbox rows");
    let relay = RunningRelay::start(
        &db.store,
        &kafka,
        RelaySettings {
            sweep_every: NO_SWEEP,
            ..RelaySettings::default()
        },
    );
    relay_support::wait_for("the first rows to be published", TIMEOUT, || async {
        relay.stats.published() >= N as u64
    })
    .await;
    let after = rows(&topic, &prefix, N, N);
    let inserted_at = Instant::now();
    db.store
        .outbox_insert("acme", None, &after)
        .await
        .expect("insert outbox rows");
    relay_support::wait_for("the later rows to be published", TIMEOUT, || async {
        relay.stats.published() >= 2 * N as u64
    })
    .await;
    let woken_in = inserted_at.elapsed();
    assert!(
        woken_in < WOKEN_WITHIN,
        "published {woken_in:?} after the insert"
    );

    let all: Vec<_> = before.into_iter().chain(after).collect();
    let received = consume(&kafka, &topic, all.len(), TIMEOUT).await;
    check_exactly_once(&received, &all);
    check_all_sent(db.store.as_ref(), &all).await;
    assert_eq!(relay.stats.failed(), 0);
    eprintln!(
        "relay (sqlite): {} rows published; the later half {woken_in:?} after insert",
        all.len()
    );
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unavailable_store_is_retried_and_the_relay_resumes() {
    const N: usize = 50;
    let kafka = services().kafka;
    let db = TestStore::sqlite().await;
    let topic = create_topic(&kafka, "relay_store_down").await;
    let prefix = unique_name("m");
    let flaky = Arc::new(FlakyStore::new(Arc::clone(&db.store)));
    flaky.set_down(true);
    let store: Arc<dyn Store> = flaky.clone();
    let relay = RunningRelay::start(&store, &kafka, RelaySettings::default());

    // Rows wait while the relay cannot claim; it backs off and keeps trying.
    let batch = rows(&topic, &prefix, 0, N);
    db.store.outbox_insert("acme", None, &batch).await.unwrap();
    relay_support::wait_for("the relay to retry the store", TIMEOUT, || async {
        relay.stats.store_errors() >= 4
    })
    .await;
    assert_eq!(relay.stats.published(), 0);
    assert_eq!(db.store.outbox_pending().await.unwrap(), N as i64);

    // Back up: within the longest back-off (5 s) plus a sweep the rows go out.
    let up_at = Instant::now();
    flaky.set_down(false);
    relay_support::wait_for("the rows to be published", TIMEOUT, || async {
        relay.stats.published() >= N as u64
    })
    .await;
    let resumed_in = up_at.elapsed();
    assert!(
        resumed_in < WOKEN_WITHIN,
        "resumed {resumed_in:?} after the store was back"
    );
    let received = consume(&kafka, &topic, N, TIMEOUT).await;
    check_exactly_once(&received, &batch);
    check_all_sent(db.store.as_ref(), &batch).await;
    eprintln!(
        "relay: store down for {} failed calls; published {resumed_in:?} after it was back",
        relay.stats.store_errors()
    );

    // Shutdown is prompt even while the relay is backing off.
    let errors_before = relay.stats.store_errors();
    flaky.set_down(true);
    relay_support::wait_for("the relay to see the store down again", TIMEOUT, || async {
        relay.stats.store_errors() > errors_before
    })
    .await;
    let stopped_in = relay.stop().await;
    assert!(
        stopped_in < Duration::from_secs(5),
        "shutdown took {stopped_in:?}"
    );
    db.drop().await;
}
