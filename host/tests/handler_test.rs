//! `weir handler test` as a handler author uses it: the real binary, real components built from
//! `handlers/` (by `tests/run`, or `cargo build --release --target wasm32-wasip2 -p <handler>`),
//! and the exit codes scripts rely on.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn component(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the handler components first (tests/run does)",
        path.display()
    );
    path
}

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .expect("run weir")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const ORDER: &str = r#"{"order_id":"o-1","customer":"c-42","amount_cents":1250}"#;

#[test]
fn orders_prints_its_outcome_and_effects() {
    let orders = component("weir_handler_orders");
    let out = weir(&[
        "handler",
        "test",
        orders.to_str().unwrap(),
        "--key",
        "c-42",
        "--payload",
        ORDER,
        "--state",
        "orders=3",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("outcome   ok"), "{stdout}");
    assert!(stdout.contains("-> orders.accepted  key c-42"), "{stdout}");
    assert!(stdout.contains("\"customer_order_count\":4"), "{stdout}");
    assert!(stdout.contains("set orders = 4"), "{stdout}");
    assert!(stdout.contains("order accepted"), "{stdout}");
}

#[test]
fn json_output_is_one_document_for_tools() {
    let orders = component("weir_handler_orders");
    let out = weir(&[
        "handler",
        "test",
        orders.to_str().unwrap(),
        "--key",
        "c-42",
        "--payload",
        ORDER,
        "--config",
        "output-topic=accepted",
        "--header",
        "message-id=m-1",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["outcome"], "ok");
    assert_eq!(
        doc["message"]["id"], "m-1",
        "the message-id header is the message id"
    );
    assert_eq!(doc["effects"]["emits"][0]["topic"], "accepted");
    assert_eq!(doc["effects"]["emits"][0]["key"], "c-42");
    assert_eq!(doc["effects"]["state_writes"][0]["name"], "orders");
    assert_eq!(doc["effects"]["state_writes"][0]["value"], "1");
    assert!(
        doc["component"]["hash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(doc["duration_us"].as_u64().is_some());
}

#[test]
fn a_handler_error_exits_1_and_shows_no_effects() {
    let flaky = component("weir_handler_flaky");
    let out = weir(&[
        "handler",
        "test",
        flaky.to_str().unwrap(),
        "--payload",
        r#"{"fail":"retryable"}"#,
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["outcome"], "handler-error");
    assert_eq!(doc["kind"], "retryable");
    assert_eq!(doc["effects"]["emits"], Value::Array(vec![]));

    let out = weir(&[
        "handler",
        "test",
        flaky.to_str().unwrap(),
        "--payload",
        "not json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("handler error (Permanent)"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_trap_or_limit_exits_3() {
    let busy = component("weir_fixture_busy_loop");
    let out = weir(&[
        "handler",
        "test",
        busy.to_str().unwrap(),
        "--deadline-ms",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stdout).contains("trap (deadline)"),
        "{}",
        text(&out.stdout)
    );

    let oversized = component("weir_fixture_emit_oversized");
    let out = weir(&[
        "handler",
        "test",
        oversized.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["outcome"], "refused");
}

#[test]
fn an_invalid_component_exits_4_with_a_clear_error() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let out = weir(&[
        "handler",
        "test",
        manifest.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["code"], "not-wasm");

    let other = component("weir_fixture_other_world");
    let out = weir(&["handler", "test", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("does not implement the weir:handler@0.1.0 `handler` world"),
        "{stderr}"
    );
}

#[test]
fn usage_and_setting_errors_have_their_own_codes() {
    let orders = component("weir_handler_orders");
    let out = weir(&[
        "handler",
        "test",
        orders.to_str().unwrap(),
        "--config",
        "no-equals-sign",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("expected NAME=VALUE"));

    let out = weir(&[
        "handler",
        "test",
        orders.to_str().unwrap(),
        "--memory-bytes",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        text(&out.stderr).contains("invalid runtime.memory_bytes"),
        "{}",
        text(&out.stderr)
    );

    let out = weir(&["handler", "test", "/nonexistent/handler.wasm"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(text(&out.stderr).contains("cannot read /nonexistent/handler.wasm"));
}
