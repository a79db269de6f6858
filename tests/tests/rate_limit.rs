//! Per-tenant rate limits against the real broker and PostgreSQL (SEMANTICS §3: "a tenant
//! exceeds its rate → its intake waits (token bucket, backpressure); nothing is dropped").
//!
//! Two tenants share one `weir serve` process, each with a backlog of orders: tenant A is
//! limited (200 messages/s, burst 20), tenant B is not. A's processed rate over a 10 s window
//! stays within ±10 % of its limit while B works through its backlog at its own pace (at least
//! 5× A's rate); then A's limit is removed, the host picks that up at its next reconciliation
//! and A finishes quickly. Nothing is lost, doubled or dead-lettered, and the wait counters of
//! A (and only A) rose.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::time::{Duration, Instant};

use serve_support::Scenario;
use weir::store::{NewTenant, Quota, RateLimit};
use weir_acceptance::metric_value as value;

const PARTITIONS: i32 = 3;
const KEYS: usize = 20;
const RATE: u32 = 200;
const BURST: u32 = 20;
/// A's backlog: more than its binding queues (4096), so its intake pauses while it waits.
const A_MESSAGES: usize = 5_000;
const B_MESSAGES: usize = 8_000;
const WINDOW: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_tenant_holds_its_rate_while_another_on_the_same_host_runs_free() {
    let mut a = Scenario::deployed("ratea", PARTITIONS).await;
    let mut b = a.another_tenant("rateb", PARTITIONS).await;
    a.produce(A_MESSAGES, KEYS).await;
    b.produce(B_MESSAGES, KEYS).await;

    let store = weir::store::connect(&a.database_url).await.unwrap();
    store
        .create_tenant(&NewTenant {
            id: a.tenant.clone(),
            quota: Quota::default(),
        })
        .await
        .unwrap();
    let limit = RateLimit {
        messages_per_second: RATE,
        burst: BURST,
    };
    store
        .set_tenant_rate_limit(&a.tenant, Some(limit))
        .await
        .unwrap();

    let (mut host, port) = a.start_listening(0);
    let started = Instant::now();

    // Poll both tenants' processed counts until A is in its steady state (past its burst and
    // the start-up), noting when B started and finished.
    let mut b_first: Option<Instant> = None;
    let mut b_done: Option<Instant> = None;
    let mut poll_b = |count: usize, now: Instant| {
        if count > 0 && b_first.is_none() {
            b_first = Some(now);
        }
        if count >= B_MESSAGES && b_done.is_none() {
            b_done = Some(now);
        }
    };
    loop {
        let now = Instant::now();
        poll_b(b.processed().await, now);
        if a.processed().await >= 300 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "A did not start; logs in {}",
            a.dir.path().display()
        );
        assert!(host.try_wait().unwrap().is_none(), "weir serve exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let a0 = a.processed().await;
    while t0.elapsed() < WINDOW {
        poll_b(b.processed().await, Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a1 = a.processed().await;
    let window = t0.elapsed().as_secs_f64();
    let a_rate = (a1 - a0) as f64 / window;
    // B's backlog may outlast the window on a slow machine: wait for it.
    b.wait_for(B_MESSAGES, &mut [&mut host], Duration::from_secs(120))
        .await;
    poll_b(B_MESSAGES, Instant::now());
    let (b_first, b_done) = (b_first.unwrap(), b_done.unwrap());
    let b_seconds = b_done.duration_since(b_first).as_secs_f64().max(0.1);
    let b_rate = B_MESSAGES as f64 / b_seconds;
    eprintln!(
        "rate limit: A limited to {RATE}/s (burst {BURST}): {} messages in {window:.2} s = {a_rate:.1}/s ({:+.1} %); \
         B unlimited: {B_MESSAGES} messages in {b_seconds:.2} s = {b_rate:.0}/s ({:.1}× A)",
        a1 - a0,
        (a_rate / f64::from(RATE) - 1.0) * 100.0,
        b_rate / a_rate
    );
    assert!(
        (a_rate - f64::from(RATE)).abs() <= 0.1 * f64::from(RATE),
        "A processed {a_rate:.1}/s, not within ±10 % of {RATE}/s; logs in {}",
        a.dir.path().display()
    );
    assert!(
        b_rate >= 5.0 * a_rate,
        "B processed only {b_rate:.0}/s while A was limited to {a_rate:.1}/s"
    );

    // The wait counters show A waiting, and B never.
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let tenant_a = format!("tenant=\"{}\"", a.tenant);
    let tenant_b = format!("tenant=\"{}\"", b.tenant);
    let waits = value(&text, "weir_rate_limit_waits_total", &[&tenant_a]);
    let waited = value(&text, "weir_rate_limit_wait_seconds_total", &[&tenant_a]);
    assert!(waits > 0.0 && waited > 0.0, "{waits} waits, {waited} s");
    assert_eq!(
        value(&text, "weir_rate_limit_waits_total", &[&tenant_b]),
        0.0
    );
    eprintln!("rate limit: A waited {waits} times, {waited:.1} s in all");

    // Removing the limit frees A at the next reconciliation: the rest of its backlog goes at
    // the unthrottled pace.
    let before = a.processed().await;
    let removed_at = Instant::now();
    store.set_tenant_rate_limit(&a.tenant, None).await.unwrap();
    a.wait_for(A_MESSAGES, &mut [&mut host], Duration::from_secs(120))
        .await;
    let rest = A_MESSAGES - before;
    let rest_seconds = removed_at.elapsed().as_secs_f64();
    eprintln!(
        "rate limit: after removal A processed its last {rest} messages in {rest_seconds:.2} s"
    );
    assert!(
        rest_seconds < rest as f64 / f64::from(RATE) * 0.5 + 1.0,
        "A took {rest_seconds:.2} s for {rest} messages after its limit was removed"
    );

    a.terminate(&mut host);
    for run in [&a, &b] {
        let ((lost, doubled), (outbox, ids)) = run.verify().await;
        assert_eq!((lost, doubled), (0, 0), "tenant {}", run.tenant);
        assert_eq!((outbox, ids), (run.messages as i64, run.messages as i64));
        assert_eq!(run.dead_lettered().await, 0);
    }
    store.close().await;
}
