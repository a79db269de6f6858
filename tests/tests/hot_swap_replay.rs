//! Hot swap and DLQ replay, through `weir serve` against the real broker and database.
//!
//! `orders` (version 1) runs a binding while orders keep arriving, some of them in a legacy CSV
//! format that version 1 dead-letters as malformed, a few invalid in any version. While they
//! flow, version 2 (`handlers/fixtures/orders-v2`: the same handler, which also reads the CSV
//! format and marks its events with `"handler_version": 2`) is uploaded and activated through
//! the store; the host swaps it in without restarting the consumer. Then every pending DLQ
//! entry of the binding is replayed; asking again for the valid ones is refused.
//!
//! At the end: every per-key counter is exact (nothing lost, nothing doubled); every CSV order
//! was processed exactly once, by version 2; the DLQ entries of valid orders are `replayed`,
//! those of invalid ones failed again on version 2 and are pending again, recording version 2
//! (and their new failure is on the DLQ topic); the output holds one event per valid order,
//! with distinct message ids; every order produced after the swap ran on version 2, and no key
//! went back to version 1 after reaching version 2; the host's log shows one partition
//! assignment and one worker start for the binding — the consumer was not restarted.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serve_support::Scenario;
use sqlx::Row;
use weir::store::{DlqFilter, DlqState, Quota, StoreError};
use weir_acceptance::{component, services};

/// Customers (message keys).
const KEYS: usize = 40;
/// Orders handed to the producer per round, and the pause between rounds (about 2,000 orders
/// a second).
const ROUND: usize = 50;
const ROUND_PAUSE: Duration = Duration::from_millis(25);
/// Every `CSV_EVERY`-th order is in the legacy CSV format.
const CSV_EVERY: usize = 20;
/// Every `BAD_EVERY`-th order is invalid in any version (a CSV order of 0 cents).
const BAD_EVERY: usize = 500;
/// Orders produced before version 2 is activated, at least.
const BEFORE_SWAP: usize = 3_000;
/// Orders produced after the swap was seen in the log, at least.
const AFTER_SWAP: usize = 3_000;

fn customer(i: usize) -> String {
    format!("c-{}", i % KEYS)
}

fn is_bad(i: usize) -> bool {
    i % BAD_EVERY == BAD_EVERY / 2 + 5
}

fn is_csv(i: usize) -> bool {
    i % CSV_EVERY == CSV_EVERY / 2 && !is_bad(i)
}

fn payload(i: usize) -> String {
    let customer = customer(i);
    let amount = 100 + i;
    if is_bad(i) {
        format!("o-{i},{customer},0")
    } else if is_csv(i) {
        format!("o-{i},{customer},{amount}")
    } else {
        format!(r#"{{"order_id":"o-{i}","customer":"{customer}","amount_cents":{amount}}}"#)
    }
}

/// Produce orders `0, 1, 2, …` until `stop`, taking each index from `next` just before sending
/// it; returns once every order sent is acknowledged.
async fn produce(kafka: String, topic: String, next: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut sends = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        for _ in 0..ROUND {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let (key, payload) = (customer(i), payload(i));
            let record = FutureRecord::to(&topic).key(&key).payload(&payload);
            sends.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
    for send in sends {
        send.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// DLQ entries of the binding in `state` (any state when `None`).
async fn dlq_count(run: &Scenario, state: Option<&str>) -> usize {
    sqlx::query(
        "SELECT count(*) AS n FROM dlq_entries WHERE binding_id = $1 AND ($2::text IS NULL OR state = $2)",
    )
    .bind(&run.binding_id)
    .bind(state)
    .fetch_one(&run.pool)
    .await
    .unwrap()
    .get::<i64, _>("n") as usize
}

/// Wait until `done` holds, checking that the host keeps running.
async fn wait_until<F, Fut>(
    what: &str,
    run: &Scenario,
    host: &mut Child,
    timeout: Duration,
    done: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; logs in {}",
            run.dir.path().display()
        );
        assert!(
            host.try_wait().unwrap().is_none(),
            "weir serve exited; logs in {}",
            run.dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines of host 0's log that mention the binding and `text`.
fn log_lines(run: &Scenario, text: &str) -> usize {
    std::fs::read_to_string(run.log(0))
        .unwrap()
        .lines()
        .filter(|line| line.contains(text) && line.contains(&run.binding_id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_activated_mid_stream_runs_the_next_message_and_replays_take_effect_once() {
    let services = services();
    let mut run = Scenario::deployed("swap", 6).await;
    let store = weir::store::connect(&run.database_url).await.unwrap();
    let mut host = run.start(0);

    // Orders flow from now until after the swap.
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce(
        services.kafka.clone(),
        run.input.clone(),
        next.clone(),
        stop.clone(),
    ));

    // Version 1 at work: orders processed, CSV orders dead-lettered.
    wait_until(
        "version 1 at work",
        &run,
        &mut host,
        Duration::from_secs(120),
        || async {
            next.load(Ordering::SeqCst) >= BEFORE_SWAP
                && run.processed().await >= BEFORE_SWAP / 2
                && dlq_count(&run, None).await >= 5
        },
    )
    .await;

    // Upload version 2 and activate it, while orders keep coming.
    let bytes = std::fs::read(component("weir_fixture_orders_v2")).unwrap();
    let v2 = store
        .put_handler_version(&run.tenant, "orders", &bytes, &Quota::default())
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    let processed_at_activation = run.processed().await;
    let produced_at_activation = next.load(Ordering::SeqCst);
    store.activate(&run.tenant, "orders", 2).await.unwrap();
    wait_until(
        "the swap",
        &run,
        &mut host,
        Duration::from_secs(60),
        || async { log_lines(&run, "handler version swapped; the worker keeps running") >= 1 },
    )
    .await;
    // Every order whose index is taken from here on is produced after the swap.
    let swapped_at = next.load(Ordering::SeqCst);
    let processed_at_swap = run.processed().await;
    wait_until(
        "orders after the swap",
        &run,
        &mut host,
        Duration::from_secs(60),
        || async { next.load(Ordering::SeqCst) >= swapped_at + AFTER_SWAP },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    let total = next.load(Ordering::SeqCst);
    let valid: Vec<usize> = (0..total).filter(|&i| !is_bad(i)).collect();
    let bad = total - valid.len();
    run.messages = valid.len();
    run.expected = HashMap::new();
    for &i in &valid {
        *run.expected.entry(customer(i)).or_default() += 1;
    }

    // Every order is either processed or dead-lettered.
    wait_until(
        "every order handled",
        &run,
        &mut host,
        Duration::from_secs(240),
        || async { run.processed().await + dlq_count(&run, None).await >= total },
    )
    .await;
    let processed_before_replay = run.processed().await;

    // Replay every pending DLQ entry of the binding.
    let pending = store
        .dlq_list(&DlqFilter {
            tenant: Some(run.tenant.clone()),
            binding_id: Some(run.binding_id.clone()),
            state: Some(DlqState::Pending),
            ..DlqFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(pending.len(), total - processed_before_replay);
    let order_of = |payload: &[u8]| -> usize {
        let text = std::str::from_utf8(payload).unwrap();
        text[2..text.find(',').unwrap()].parse().unwrap()
    };
    let (replay_bad, replay_valid): (Vec<_>, Vec<_>) = pending
        .iter()
        .partition(|entry| is_bad(order_of(&entry.entry.payload)));
    for entry in &replay_valid {
        // Only version 1 fails valid orders.
        assert_eq!(entry.entry.handler_version, Some(1), "{entry:?}");
    }
    for entry in &pending {
        let replaying = store.dlq_replay(&run.tenant, entry.id).await.unwrap();
        assert_eq!(replaying.state, DlqState::Replaying);
    }
    // Asking again is refused: each is queued or already replayed. (An invalid order's entry
    // may be pending again by now, so it is left out.)
    let mut refused_again = 0;
    for entry in &replay_valid {
        match store.dlq_replay(&run.tenant, entry.id).await {
            Err(StoreError::Conflict(_)) => refused_again += 1,
            other => panic!("a second replay of entry {} answered {other:?}", entry.id),
        }
    }
    wait_until(
        "the replays",
        &run,
        &mut host,
        Duration::from_secs(120),
        || async {
            run.processed().await >= valid.len()
                && dlq_count(&run, Some("replayed")).await == replay_valid.len()
                && dlq_count(&run, Some("pending")).await == bad
        },
    )
    .await;
    // Let a late duplicate, if any, show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.terminate(&mut host);

    // Counters: exact.
    let ((lost, doubled), _) = run.verify().await;
    // DLQ: valid orders replayed; invalid ones failed again, on version 2.
    let dlq_total = dlq_count(&run, None).await;
    let dlq_replayed = dlq_count(&run, Some("replayed")).await;
    let failed_again = store
        .dlq_list(&DlqFilter {
            tenant: Some(run.tenant.clone()),
            binding_id: Some(run.binding_id.clone()),
            state: Some(DlqState::Pending),
            ..DlqFilter::default()
        })
        .await
        .unwrap();
    let failed_again_on_v2 = failed_again
        .iter()
        .filter(|e| e.entry.handler_version == Some(2) && is_bad(order_of(&e.entry.payload)))
        .count();
    let dlq_records = sqlx::query("SELECT count(*) AS n, count(DISTINCT message_id) AS ids FROM outbox WHERE binding_id = $1 AND topic = $2")
        .bind(&run.binding_id)
        .bind(format!("{}.dlq", run.input))
        .fetch_one(&run.pool)
        .await
        .unwrap();
    let (dlq_records, dlq_record_ids) = (
        dlq_records.get::<i64, _>("n") as usize,
        dlq_records.get::<i64, _>("ids") as usize,
    );
    // Output: one event per valid order, distinct ids; versions as expected.
    let rows = sqlx::query(
        "SELECT message_id, payload FROM outbox WHERE binding_id = $1 AND topic = $2 ORDER BY id",
    )
    .bind(&run.binding_id)
    .bind(&run.output)
    .fetch_all(&run.pool)
    .await
    .unwrap();
    let mut ids = HashSet::new();
    let mut by_order: HashMap<usize, Vec<Option<i64>>> = HashMap::new();
    let mut by_key: HashMap<String, Vec<(u64, Option<i64>)>> = HashMap::new();
    for row in &rows {
        ids.insert(row.get::<String, _>("message_id"));
        let event: serde_json::Value =
            serde_json::from_slice(&row.get::<Vec<u8>, _>("payload")).unwrap();
        let order: usize = event["order_id"].as_str().unwrap()[2..].parse().unwrap();
        let version = event["handler_version"].as_i64();
        by_order.entry(order).or_default().push(version);
        by_key
            .entry(event["customer"].as_str().unwrap().to_owned())
            .or_default()
            .push((event["customer_order_count"].as_u64().unwrap(), version));
    }
    let orders_once = valid
        .iter()
        .filter(|i| by_order.get(i).is_some_and(|v| v.len() == 1))
        .count();
    let csv_orders: Vec<usize> = (0..total).filter(|&i| is_csv(i)).collect();
    let csv_once_by_v2 = csv_orders
        .iter()
        .filter(|i| by_order.get(i).is_some_and(|v| v == &[Some(2)]))
        .count();
    let after_swap_not_on_v2 = (swapped_at..total)
        .filter(|&i| !is_bad(i))
        .filter(|i| by_order.get(i).is_none_or(|v| v != &[Some(2)]))
        .count();
    let v2_events = by_order.values().flatten().filter(|v| v.is_some()).count();
    // Per key, handling is serial: once a key ran on version 2 it never ran on version 1.
    let keys_back_to_v1 = by_key
        .values_mut()
        .map(|events| {
            events.sort_unstable();
            events
                .windows(2)
                .any(|w| w[0].1 == Some(2) && w[1].1.is_none())
        })
        .filter(|&back| back)
        .count();
    // The consumer was not restarted.
    let assignments = log_lines(&run, "partitions assigned");
    let starts = log_lines(&run, "worker started");
    let stops = log_lines(&run, "stopping worker");
    let swaps_in_worker = log_lines(
        &run,
        "handler version swapped in; the consumer keeps running",
    );

    eprintln!(
        "hot swap + replay: {total} orders ({} CSV, {bad} invalid) over {KEYS} keys; version 2 \
         activated at {produced_at_activation} produced / {processed_at_activation} processed, \
         swap seen at {swapped_at} produced / {processed_at_swap} processed; replayed {} DLQ \
         entries ({} of valid orders, second requests refused: {refused_again}); DLQ now \
         {dlq_replayed} replayed + {} pending again ({failed_again_on_v2} failed on version 2) \
         of {dlq_total}; DLQ topic {dlq_records} records, {dlq_record_ids} distinct ids; lost \
         {lost}, doubled {doubled}; output {} events, {} distinct ids, {orders_once} valid \
         orders exactly once, {v2_events} by version 2; CSV orders once by version 2: \
         {csv_once_by_v2} of {}; orders after the swap not on version 2: \
         {after_swap_not_on_v2}; keys back to version 1: {keys_back_to_v1}; log: {assignments} \
         assignment(s), {starts} start(s), {stops} stop(s), {swaps_in_worker} swap(s) seen by \
         the worker",
        csv_orders.len(),
        pending.len(),
        replay_valid.len(),
        failed_again.len(),
        rows.len(),
        ids.len(),
        csv_orders.len(),
    );
    assert_eq!((lost, doubled), (0, 0));
    assert!(
        !replay_valid.is_empty(),
        "version 1 dead-lettered no CSV order"
    );
    // Every invalid order was dead-lettered (by version 1 or 2) and replayed, in vain.
    assert!(bad > 0);
    assert_eq!(replay_bad.len(), bad);
    assert_eq!(refused_again, replay_valid.len());
    assert_eq!(dlq_replayed, replay_valid.len());
    assert_eq!((failed_again.len(), failed_again_on_v2), (bad, bad));
    assert_eq!(dlq_total, replay_valid.len() + bad);
    // One record per entry filed, plus one per failed replay.
    assert_eq!(
        (dlq_records, dlq_record_ids),
        (dlq_total + replay_bad.len(), dlq_total + replay_bad.len())
    );
    let valid_count = valid.len();
    assert_eq!(
        (rows.len(), ids.len(), orders_once),
        (valid_count, valid_count, valid_count)
    );
    assert_eq!(csv_once_by_v2, csv_orders.len());
    assert_eq!(after_swap_not_on_v2, 0);
    assert_eq!(keys_back_to_v1, 0);
    assert!(
        processed_at_swap > processed_at_activation,
        "messages did not flow during the swap"
    );
    assert_eq!(
        (assignments, starts, stops, swaps_in_worker),
        (1, 1, 0, 1),
        "the worker was restarted; log in {}",
        run.dir.path().display()
    );
}
