//! `weir dev --demo`, as a newcomer runs it: the in-process mock Kafka cluster, SQLite, the
//! `orders` handler, sample traffic; `/health` answers and the summary shows messages handled,
//! effects committed and poison dead-lettered. Run twice on the same folder, it works twice.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn orders_component() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("wasm32-wasip2/release/weir_handler_orders.wasm");
    assert!(
        path.exists(),
        "{} is missing: build the handler components first (tests/run does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The last summary line's numbers: (in, events on orders.accepted, on orders.dlq).
fn last_summary(stdout: &str) -> (u64, u64, u64) {
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with("demo: messages in"))
        .expect("a summary line");
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    // "orders.accepted" and "orders.dlq" contain no digits, so these are the three counts.
    (numbers[0], numbers[1], numbers[2])
}

#[test]
fn dev_demo_shows_messages_flowing_and_can_run_again() {
    let dir = tempfile::tempdir().unwrap();
    for run in 0..2 {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args([
                "dev",
                "--demo",
                "--rate",
                "50",
                "--for",
                "20",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--component")
            .arg(orders_component())
            .env_remove("WEIR_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let health = loop {
            if let Some(response) = get(port, "/health") {
                break response;
            }
            assert!(Instant::now() < deadline, "/health never answered");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (sent, accepted, dead) = last_summary(&stdout);
        eprintln!("run {run}: in {sent}, accepted {accepted}, dead-lettered {dead}");
        assert!(
            sent >= 100,
            "run {run}: too few messages produced: {stdout}"
        );
        assert!(
            accepted >= sent / 2,
            "run {run}: messages are not flowing: {stdout}"
        );
        assert!(
            dead >= 1,
            "run {run}: poison never reached the DLQ topic: {stdout}"
        );
        assert!(
            stdout.contains("latest event: {\"type\":\"order-accepted\""),
            "{stdout}"
        );
    }
}
