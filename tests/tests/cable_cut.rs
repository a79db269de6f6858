//! Cable cut: `weir serve` is killed with SIGKILL several times mid-run and started again. At the
//! end every per-key counter equals its key's message count — nothing lost, nothing doubled —
//! and the outbox holds exactly one record per message. Real broker, real database, the real
//! binary.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::time::Duration;

use serve_support::Scenario;

const MESSAGES: usize = 20_000;
const KILLS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_doubles_nothing() {
    let mut run = Scenario::new("cut", 6, MESSAGES, 50).await;
    // A killed host holds its partitions until its session times out: keep that short so
    // the run spends its time processing, not waiting (the guarantees do not depend on it).
    run.set_env("WEIR_KAFKA__SESSION_TIMEOUT_MS", "10000");
    run.set_env("WEIR_PIPELINE__DRAIN_DEADLINE_MS", "5000");
    let mut child = run.start(0);
    let mut kills_at = Vec::new();
    for _ in 0..KILLS {
        // Kill it while it works: each time once some progress since the last start is visible.
        let target = run.processed().await + MESSAGES / (KILLS + 2);
        run.wait_for(target, &mut [&mut child], Duration::from_secs(120))
            .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills_at.push(run.processed().await);
        child = run.start(0);
    }
    run.wait_for(MESSAGES, &mut [&mut child], Duration::from_secs(300))
        .await;
    run.terminate(&mut child);

    let ((lost, doubled), (records, ids)) = run.verify().await;
    eprintln!(
        "cable cut: {MESSAGES} messages, {KILLS} SIGKILLs at {kills_at:?} processed; lost {lost}, doubled {doubled}; outbox {records} records, {ids} distinct ids"
    );
    assert_eq!((lost, doubled), (0, 0));
    assert_eq!((records, ids), (MESSAGES as i64, MESSAGES as i64));
}
