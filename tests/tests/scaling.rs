//! Horizontal scaling: two `weir serve` processes run the same binding in the same consumer
//! group; one is stopped and started again during the run. Kafka moves its partitions to the
//! other and back; at the end nothing is lost and nothing doubled.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::time::Duration;

use serve_support::Scenario;

const MESSAGES: usize = 20_000;
const KEYS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_the_partitions_and_one_restarting_loses_nothing() {
    // Half the messages first: the second half is produced once the stopped host is back, so
    // both hosts share work after the restart however fast the first half went.
    let mut run = Scenario::new("scale", 6, MESSAGES / 2, KEYS).await;
    let mut first = run.start(0);
    let mut second = run.start(1);
    run.wait_for(
        MESSAGES / 4,
        &mut [&mut first, &mut second],
        Duration::from_secs(120),
    )
    .await;
    // Stop the second host (it drains), let the first work alone, then bring it back.
    run.terminate(&mut second);
    let stopped_at = run.processed().await;
    run.wait_for(
        (stopped_at + MESSAGES / 8).min(MESSAGES / 2),
        &mut [&mut first],
        Duration::from_secs(120),
    )
    .await;
    let mut second = run.start(1);
    run.produce(MESSAGES / 2, KEYS).await;
    run.wait_for(
        MESSAGES,
        &mut [&mut first, &mut second],
        Duration::from_secs(300),
    )
    .await;
    run.terminate(&mut first);
    run.terminate(&mut second);

    // Both hosts ran the binding in the group (each log shows its worker starting); with six
    // partitions and two members, the group gives each of them partitions.
    for n in 0..2 {
        let log = std::fs::read_to_string(run.log(n)).unwrap();
        assert!(
            log.contains("worker started"),
            "host {n} never ran the binding:\n{log}"
        );
    }
    let ((lost, doubled), (records, ids)) = run.verify().await;
    eprintln!(
        "scaling: {MESSAGES} messages, 2 hosts, one stopped at {stopped_at} and restarted; lost {lost}, doubled {doubled}; outbox {records} records, {ids} distinct ids"
    );
    assert_eq!((lost, doubled), (0, 0));
    assert_eq!((records, ids), (MESSAGES as i64, MESSAGES as i64));
}
