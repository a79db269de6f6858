//! The sandbox against real components built from `handlers/`: hostile fixtures are contained,
//! invalid uploads are refused with distinct errors, effects are all-or-nothing and ordered,
//! and the runtime keeps serving normal invocations after every incident.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use weir::runtime::{
    ComponentError, ErrorKind, HandlerPool, Header, InstancePolicy, Invocation, InvocationContext,
    MemoryState, Message, Outcome, OutputTopics, Runtime, RuntimeConfig, StateWrite, TrapKind,
};
use weir_acceptance::component;

mod sandbox_support;

use sandbox_support::{ORDER, config, context, load, message, run};

/// After an incident, the same runtime still runs the orders handler correctly.
async fn still_serves(runtime: &Runtime) {
    let orders = load(runtime, "weir_handler_orders");
    let mut state = MemoryState::new();
    state.insert("c-42", "orders", "3");
    let ctx = InvocationContext {
        state: Arc::new(state),
        ..context(&[])
    };
    let inv = run(&orders, &message(Some("c-42"), ORDER), &ctx).await;
    assert_eq!(inv.outcome, Outcome::Ok, "{inv:?}");
    assert_eq!(inv.effects.emits.len(), 1);
    let event: serde_json::Value = serde_json::from_slice(&inv.effects.emits[0].payload).unwrap();
    assert_eq!(event["customer_order_count"], 4);
    assert_eq!(
        inv.effects.state_writes,
        vec![StateWrite {
            name: "orders".into(),
            value: Some(b"4".to_vec())
        }]
    );
}

fn assert_trap(inv: &Invocation, expected: TrapKind) {
    match &inv.outcome {
        Outcome::Trap { kind, .. } => assert_eq!(*kind, expected, "{inv:?}"),
        other => panic!("expected a {expected:?} trap, got {other:?}"),
    }
    assert!(
        inv.effects.is_empty(),
        "a trapped invocation left effects: {:?}",
        inv.effects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_loop_traps_within_its_deadline_plus_one_tick() {
    let runtime = Runtime::new(RuntimeConfig {
        deadline_ms: 200,
        epoch_tick_ms: 10,
        ..config()
    })
    .unwrap();
    let busy = load(&runtime, "weir_fixture_busy_loop");
    let started = Instant::now();
    let inv = run(&busy, &message(Some("k"), "{}"), &context(&[])).await;
    let took = started.elapsed();
    assert_trap(&inv, TrapKind::Deadline);
    assert_eq!(
        inv.outcome.error_kind(),
        Some(ErrorKind::Retryable),
        "running out of time is retryable"
    );
    eprintln!("busy loop trapped after {took:?} (deadline 200 ms, tick 10 ms)");
    assert!(
        took >= Duration::from_millis(200),
        "trapped early: {took:?}"
    );
    // Deadline plus one tick, plus scheduling slack on a shared 2-core machine.
    assert!(
        took <= Duration::from_millis(200 + 10 + 40),
        "trapped late: {took:?}"
    );
    still_serves(&runtime).await;
}

/// A state store that never answers, and says when a read it was waiting on was abandoned.
struct SilentStore(Arc<std::sync::atomic::AtomicBool>);

struct Abandoned(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl weir::runtime::StateSource for SilentStore {
    fn get<'a>(
        &'a self,
        _key: &'a [u8],
        _name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        let abandoned = Abandoned(self.0.clone());
        Box::pin(async move {
            let _abandoned = abandoned;
            std::future::pending().await
        })
    }
}

/// A guest waiting on a state read the store never answers (a database down, the pool waiting
/// for a connection) is cut off at its deadline, and the read is abandoned there — dropped,
/// which is how the pipeline learns that the deadline was the host's fault, not the handler's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_read_never_answered_is_cut_off_at_the_deadline() {
    let runtime = Runtime::new(RuntimeConfig {
        deadline_ms: 300,
        epoch_tick_ms: 10,
        ..config()
    })
    .unwrap();
    let orders = load(&runtime, "weir_handler_orders");
    let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ctx = InvocationContext {
        state: Arc::new(SilentStore(abandoned.clone())),
        ..context(&[])
    };
    let started = Instant::now();
    let inv = run(&orders, &message(Some("c-42"), ORDER), &ctx).await;
    let took = started.elapsed();
    assert_trap(&inv, TrapKind::Deadline);
    eprintln!("a state read never answered: cut off after {took:?} (deadline 300 ms)");
    assert!(
        took < Duration::from_secs(2),
        "the invocation waited past its deadline: {took:?}"
    );
    assert!(
        abandoned.load(std::sync::atomic::Ordering::SeqCst),
        "the unanswered read was not abandoned at the deadline"
    );
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_loop_does_not_starve_other_tasks() {
    let runtime = Runtime::new(RuntimeConfig {
        deadline_ms: 300,
        ..config()
    })
    .unwrap();
    let busy = load(&runtime, "weir_fixture_busy_loop");
    // One worker thread: if the guest never yielded, the ticker task could not run.
    let handle = tokio::spawn(async move { run(&busy, &message(None, "{}"), &context(&[])).await });
    let mut ticks = 0;
    let until = Instant::now() + Duration::from_millis(250);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
        ticks += 1;
    }
    let inv = handle.await.unwrap();
    assert_trap(&inv, TrapKind::Deadline);
    assert!(
        ticks >= 10,
        "the executor was starved: {ticks} ticks in 250 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_traps_at_the_cap() {
    let runtime = Runtime::new(RuntimeConfig {
        memory_bytes: 16 << 20,
        ..config()
    })
    .unwrap();
    let bomb = load(&runtime, "weir_fixture_memory_bomb");
    let inv = run(&bomb, &message(None, "{}"), &context(&[])).await;
    assert_trap(&inv, TrapKind::Memory);
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_traps() {
    let runtime = Runtime::new(config()).unwrap();
    let deep = load(&runtime, "weir_fixture_deep_recursion");
    // Frames on the wasm stack: the host's stack limit.
    let inv = run(&deep, &message(None, "{}"), &context(&[])).await;
    assert_trap(&inv, TrapKind::StackOverflow);
    // Frames on Rust's shadow stack in linear memory: it wraps below address 0 and the next
    // store is out of bounds.
    let inv = run(&deep, &message(None, "shadow"), &context(&[])).await;
    assert_trap(&inv, TrapKind::Other);
    match &inv.outcome {
        Outcome::Trap { message, .. } => {
            assert!(message.contains("out of bounds memory access"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(inv.outcome.error_kind(), Some(ErrorKind::Permanent));
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_traps_and_its_message_reaches_the_log() {
    let runtime = Runtime::new(config()).unwrap();
    let panic = load(&runtime, "weir_fixture_panic");
    let inv = run(&panic, &message(None, "{}"), &context(&[])).await;
    assert_trap(&inv, TrapKind::Unreachable);
    assert_eq!(inv.outcome.error_kind(), Some(ErrorKind::Permanent));
    assert!(
        inv.logs.iter().any(|l| l.message.contains("fixture panic")),
        "panic message not in the handler log: {:?}",
        inv.logs
    );
    still_serves(&runtime).await;
}

fn assert_denied(inv: &Invocation, expected: &str) {
    match &inv.outcome {
        Outcome::HandlerError {
            kind: ErrorKind::Permanent,
            message,
        } => {
            assert!(message.contains(expected), "unexpected message: {message}")
        }
        Outcome::Trap { .. } => {}
        other => panic!("the sandbox let it through: {other:?} {:?}", inv.effects),
    }
    assert!(
        inv.effects.emits.iter().all(|e| e.topic != "leak"),
        "leaked: {:?}",
        inv.effects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_out_of_reach() {
    let runtime = Runtime::new(config()).unwrap();
    let fixture = load(&runtime, "weir_fixture_read_file");
    let inv = run(&fixture, &message(None, "{}"), &context(&[])).await;
    eprintln!("read-file: {:?}", inv.outcome);
    assert_denied(&inv, "read-file:");
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_is_empty() {
    // Something to leak, were the host's environment inherited.
    let runtime = Runtime::new(config()).unwrap();
    let fixture = load(&runtime, "weir_fixture_read_env");
    let inv = run(&fixture, &message(None, "{}"), &context(&[])).await;
    eprintln!("read-env: {:?}", inv.outcome);
    assert_denied(&inv, "environment is empty");
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let runtime = Runtime::new(config()).unwrap();
    let fixture = load(&runtime, "weir_fixture_open_socket");
    let inv = run(&fixture, &message(None, "{}"), &context(&[("addr", &addr)])).await;
    eprintln!("open-socket to {addr}: {:?}", inv.outcome);
    assert_denied(&inv, "");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the guest reached the listener: {other:?}"),
    }
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_emit_fails_the_invocation_even_if_ignored() {
    let runtime = Runtime::new(config()).unwrap();
    let fixture = load(&runtime, "weir_fixture_emit_oversized");
    let inv = run(&fixture, &message(None, "{}"), &context(&[])).await;
    match &inv.outcome {
        Outcome::Refused { message } => assert!(message.contains("exceeds the limit"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(inv.outcome.error_kind(), Some(ErrorKind::Permanent));
    assert!(inv.effects.is_empty());
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_storm_is_bounded() {
    let runtime = Runtime::new(RuntimeConfig {
        max_emits: 100,
        ..config()
    })
    .unwrap();
    let fixture = load(&runtime, "weir_fixture_emit_storm");
    let inv = run(&fixture, &message(None, "{}"), &context(&[])).await;
    match &inv.outcome {
        Outcome::Refused { message } => {
            assert!(message.contains("maximum of 100 messages"), "{message}")
        }
        // A storm long enough to hit the deadline is contained too.
        Outcome::Trap {
            kind: TrapKind::Deadline,
            ..
        } => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(inv.effects.is_empty());
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emits_outside_the_output_topics_are_refused() {
    let runtime = Runtime::new(config()).unwrap();
    let orders = load(&runtime, "weir_handler_orders");
    let ctx = InvocationContext {
        output_topics: OutputTopics::Only(Arc::new(
            ["somewhere-else".to_owned()].into_iter().collect(),
        )),
        ..context(&[])
    };
    let inv = run(&orders, &message(Some("c-42"), ORDER), &ctx).await;
    match &inv.outcome {
        Outcome::Refused { message } => assert!(message.contains("orders.accepted"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(inv.effects.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_uploads_are_refused_with_distinct_errors() {
    let runtime = Runtime::new(config()).unwrap();
    let other_world = std::fs::read(component("weir_fixture_other_world")).unwrap();
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty file", Vec::new(), "empty"),
        ("random bytes", random, "not-wasm"),
        ("core module", b"\0asm\x01\0\0\0".to_vec(), "core-module"),
        (
            "truncated component",
            b"\0asm\x0d\0\x01\0\x07".to_vec(),
            "invalid-component",
        ),
        ("component of another world", other_world, "wrong-world"),
    ];
    let mut seen = Vec::new();
    for (what, bytes, code) in cases {
        let err: ComponentError = runtime.load(&bytes).expect_err(what);
        eprintln!("{what}: [{}] {err}", err.code());
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(!err.to_string().is_empty());
        seen.push(err.to_string());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "errors are not distinct: {seen:?}");
    still_serves(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_of_a_failed_invocation_are_discarded() {
    let runtime = Runtime::new(config()).unwrap();
    let fixture = load(&runtime, "weir_fixture_effects_then_fail");
    let inv = run(&fixture, &message(Some("k"), "{}"), &context(&[])).await;
    assert_eq!(
        inv.outcome,
        Outcome::HandlerError {
            kind: ErrorKind::Retryable,
            message: "after effects".to_owned()
        }
    );
    assert!(inv.effects.is_empty(), "{:?}", inv.effects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_of_a_successful_invocation_come_back_in_order() {
    let runtime = Runtime::new(config()).unwrap();
    let fixture = load(&runtime, "weir_fixture_effects_ok");
    let inv = run(&fixture, &message(Some("k"), "{}"), &context(&[])).await;
    assert_eq!(inv.outcome, Outcome::Ok, "{inv:?}");
    let emitted: Vec<(&str, &[u8])> = inv
        .effects
        .emits
        .iter()
        .map(|e| (e.topic.as_str(), e.payload.as_slice()))
        .collect();
    assert_eq!(
        emitted,
        vec![("out", &b"one"[..]), ("out", b"two"), ("out", b"three")]
    );
    assert_eq!(
        inv.effects.state_writes,
        vec![
            StateWrite {
                name: "a".into(),
                value: Some(b"1".to_vec())
            },
            StateWrite {
                name: "b".into(),
                value: None
            },
            StateWrite {
                name: "a".into(),
                value: Some(b"2".to_vec())
            },
        ]
    );
    assert_eq!(inv.logs.len(), 1, "{:?}", inv.logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_validates_counts_and_emits() {
    let runtime = Runtime::new(config()).unwrap();
    let orders = load(&runtime, "weir_handler_orders");
    still_serves(&runtime).await;
    // Malformed and invalid orders are permanent errors naming the problem.
    for (payload, expect) in [
        ("not json", ""),
        (
            r#"{"order_id":"o","customer":"c","amount_cents":0}"#,
            "amount_cents",
        ),
    ] {
        let inv = run(&orders, &message(Some("c"), payload), &context(&[])).await;
        match &inv.outcome {
            Outcome::HandlerError {
                kind: ErrorKind::Permanent,
                message,
            } => {
                assert!(message.contains(expect), "{message}")
            }
            other => panic!("{payload}: expected a permanent error, got {other:?}"),
        }
        assert!(inv.effects.is_empty());
    }
    // Without a key there is no keyed state.
    let inv = run(&orders, &message(None, ORDER), &context(&[])).await;
    assert_eq!(
        inv.outcome.error_kind(),
        Some(ErrorKind::Permanent),
        "{inv:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_instances_serve_many_messages_and_trapped_ones_are_replaced() {
    let runtime = Runtime::new(config()).unwrap();
    assert_eq!(runtime.config().instance_policy, InstancePolicy::Reuse);
    let flaky = HandlerPool::new(load(&runtime, "weir_handler_flaky"), 4);
    for _ in 0..50 {
        let inv = flaky
            .invoke(&message(Some("k"), "{}"), &context(&[]))
            .await
            .unwrap();
        assert_eq!(inv.outcome, Outcome::Ok, "{inv:?}");
        assert_eq!(flaky.idle(), 1, "the instance was not kept for reuse");
    }
    let panic = HandlerPool::new(load(&runtime, "weir_fixture_panic"), 4);
    let inv = panic
        .invoke(&message(None, "{}"), &context(&[]))
        .await
        .unwrap();
    assert_trap(&inv, TrapKind::Unreachable);
    assert_eq!(panic.idle(), 0, "a trapped instance went back to the pool");

    let fresh = Runtime::new(RuntimeConfig {
        instance_policy: InstancePolicy::Fresh,
        ..config()
    })
    .unwrap();
    let flaky = HandlerPool::new(load(&fresh, "weir_handler_flaky"), 4);
    let inv = flaky
        .invoke(&message(Some("k"), "{}"), &context(&[]))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::Ok);
    assert_eq!(flaky.idle(), 0, "with the fresh policy no instance is kept");
}

/// The line the `reflect` fixture logs for `message`'s fields other than its buffers.
fn reflected(message: &Message) -> String {
    format!(
        "id={} topic={} partition={} offset={} timestamp={:?} tenant={} attempt={}",
        message.id,
        message.topic,
        message.partition,
        message.offset,
        message.timestamp_ms,
        message.tenant,
        message.attempt
    )
}

/// Every field of the message reaches the guest as sent: present and absent options, empty
/// and large buffers, many headers, values at the edges of their types, on a fresh instance and
/// on one instance reused in between (so a value left over from the previous message shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_message_reaches_the_guest_as_sent() {
    let runtime = Runtime::new(config()).unwrap();
    let reflect = load(&runtime, "weir_fixture_reflect");
    let header = |key: &str, value: &[u8]| Header {
        key: key.to_owned(),
        value: value.to_vec(),
    };
    let full = Message {
        id: "commandes/7/1099511627779".to_owned(),
        topic: "commandes-é".to_owned(),
        partition: u32::MAX,
        offset: (1 << 40) + 3,
        key: Some(vec![0, 255, 7]),
        payload: (0..1024).map(|i| (i % 251) as u8).collect(),
        headers: vec![
            header("message-id", b"m-1"),
            header("empty", b""),
            header("clé", &[0xff, 0, 1]),
        ],
        timestamp_ms: Some(i64::MIN),
        tenant: "acme-ü".to_owned(),
        attempt: u32::MAX,
    };
    let bare = Message {
        id: String::new(),
        topic: "t".to_owned(),
        partition: 0,
        offset: 0,
        key: None,
        payload: Vec::new(),
        headers: Vec::new(),
        timestamp_ms: None,
        tenant: String::new(),
        attempt: 1,
    };
    let large = Message {
        key: Some(Vec::new()),
        payload: (0..64 * 1024).map(|i| (i % 253) as u8).collect(),
        headers: (0..40)
            .map(|i| header(&format!("h{i}"), &vec![i as u8; i]))
            .collect(),
        timestamp_ms: Some(1_700_000_000_000),
        ..full.clone()
    };
    let messages = [&full, &bare, &large, &full, &bare];
    let mut reused = reflect.instantiate().await.unwrap();
    for message in messages {
        for inv in [
            reused.invoke(message, &context(&[])).await,
            run(&reflect, message, &context(&[])).await,
        ] {
            assert_eq!(inv.outcome, Outcome::Ok, "{inv:?}");
            assert_eq!(inv.logs.len(), 1, "{inv:?}");
            assert_eq!(inv.logs[0].message, reflected(message));
            let [emit] = inv.effects.emits.as_slice() else {
                panic!("expected one emit: {inv:?}");
            };
            assert_eq!(emit.key, message.key);
            assert!(emit.payload == message.payload, "the payload differs");
            assert_eq!(emit.headers, message.headers);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompiled_components_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..config()
    };
    let bytes = std::fs::read(component("weir_handler_orders")).unwrap();
    {
        let runtime = Runtime::new(config.clone()).unwrap();
        runtime.load(&bytes).unwrap();
        runtime.load(&bytes).unwrap();
        let stats = runtime.cache_stats();
        assert_eq!(
            (stats.compiled, stats.memory_hits, stats.disk_hits),
            (1, 1, 0),
            "{stats:?}"
        );
    }
    let runtime = Runtime::new(config).unwrap();
    let orders = runtime.load(&bytes).unwrap();
    let stats = runtime.cache_stats();
    assert_eq!((stats.compiled, stats.disk_hits), (0, 1), "{stats:?}");
    let inv = run(&orders, &message(Some("c-42"), ORDER), &context(&[])).await;
    assert_eq!(inv.outcome, Outcome::Ok);
}

#[test]
fn absurd_limits_are_refused_naming_the_field() {
    let err = Runtime::new(RuntimeConfig {
        memory_bytes: 0,
        ..config()
    })
    .err()
    .expect("refused");
    assert_eq!(
        err.to_string(),
        "invalid runtime.memory_bytes: 0 bytes is out of range; allowed 65536 to 4294967296 bytes"
    );
}
