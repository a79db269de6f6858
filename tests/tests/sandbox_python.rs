//! A handler written in Python runs in the same sandbox as a Rust one. Kept apart from
//! `sandbox.rs` because compiling CPython (~18 MB) takes both cores for a while, which would
//! disturb that file's timing assertions.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod sandbox_support;

use std::sync::Arc;
use std::time::Instant;

use sandbox_support::{ORDER, config, context, load, message, run};
use weir::runtime::{ErrorKind, InvocationContext, MemoryState, Outcome, Runtime, StateWrite};

/// A handler written in Python (componentize-py, which embeds CPython and imports most of WASI)
/// loads in the deny-by-default sandbox and behaves like the Rust `orders` handler. Built by
/// `handlers/python-orders/build.sh`, which `tests/run` calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_handler_runs_in_the_same_sandbox() {
    let runtime = Runtime::new(config()).unwrap();
    let started = Instant::now();
    let python = load(&runtime, "weir_handler_python_orders");
    eprintln!(
        "python component: {} bytes, compiled in {:?}",
        python.size(),
        started.elapsed()
    );
    let mut state = MemoryState::new();
    state.insert("c-42", "orders", "3");
    let ctx = InvocationContext {
        state: Arc::new(state),
        ..context(&[("output-topic", "py.accepted")])
    };
    let inv = run(&python, &message(Some("c-42"), ORDER), &ctx).await;
    assert_eq!(inv.outcome, Outcome::Ok, "{inv:?}");
    assert_eq!(inv.effects.emits.len(), 1);
    assert_eq!(inv.effects.emits[0].topic, "py.accepted");
    assert_eq!(inv.effects.emits[0].key.as_deref(), Some(&b"c-42"[..]));
    let event: serde_json::Value = serde_json::from_slice(&inv.effects.emits[0].payload).unwrap();
    assert_eq!(event["type"], "order-accepted");
    assert_eq!(event["customer_order_count"], 4);
    assert_eq!(event["source_message_id"], "orders/0/7");
    assert_eq!(
        inv.effects.state_writes,
        vec![StateWrite {
            name: "orders".into(),
            value: Some(b"4".to_vec())
        }]
    );
    assert!(
        inv.logs
            .iter()
            .any(|l| l.source == weir::runtime::LogSource::Stdout),
        "print() did not reach the handler log: {:?}",
        inv.logs
    );
    // Its errors are classified like a Rust handler's.
    let inv = run(&python, &message(Some("c-42"), "not json"), &ctx).await;
    assert_eq!(
        inv.outcome.error_kind(),
        Some(ErrorKind::Permanent),
        "{inv:?}"
    );
    assert!(inv.effects.is_empty());
}
