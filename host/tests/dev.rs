//! `weir dev --demo`, as a newcomer runs it: the in-process mock Kafka cluster, SQLite, the
//! `orders` handler, sample traffic; `/health` answers and the summary shows messages handled,
//! effects committed and poison dead-lettered. Run twice on the same folder, it works twice.
//! And the admin API it serves: the tenant token it prints works with the `weir` commands
//! (`handler list`, `binding list`, `dlq list`), the admin token (chosen with
//! `WEIR_SERVER__ADMIN_TOKEN`) too.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
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

/// `weir` with the admin API at `server` and `token`, in `cwd` (no `weir.toml` there), and no
/// other `WEIR_*` variable of this process's environment.
fn weir_api(cwd: &Path, server: &str, token: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WEIR_") {
            command.env_remove(name);
        }
    }
    command
        .current_dir(cwd)
        .env("WEIR_SERVER", server)
        .env("WEIR_TOKEN", token)
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn dev_serves_the_admin_api_with_the_token_it_prints() {
    const ADMIN: &str = "dev-admin-token-for-the-test";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "dev",
            "--for",
            "60",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--component")
        .arg(orders_component())
        .env_remove("WEIR_LOG")
        .env("WEIR_SERVER__ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, received) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // The copy-paste hint: `export WEIR_SERVER=… WEIR_TOKEN=…`.
    let mut printed = Vec::new();
    let (server, token) = loop {
        let line = received
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no export hint in: {printed:#?}"));
        printed.push(line.clone());
        if let Some(export) = line.trim().strip_prefix("try      export ") {
            let mut server = None;
            let mut token = None;
            for pair in export.split_whitespace() {
                match pair.split_once('=') {
                    Some(("WEIR_SERVER", v)) => server = Some(v.to_owned()),
                    Some(("WEIR_TOKEN", v)) => token = Some(v.to_owned()),
                    _ => {}
                }
            }
            break (server.unwrap(), token.unwrap());
        }
    };
    assert_eq!(server, format!("http://127.0.0.1:{port}"));
    assert!(
        printed
            .iter()
            .any(|l| l.contains("from WEIR_SERVER__ADMIN_TOKEN")),
        "{printed:#?}"
    );
    assert!(
        !printed.iter().any(|l| l.contains(ADMIN)),
        "the admin token chosen by the environment is printed: {printed:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(port, "/health").is_none() {
        assert!(Instant::now() < deadline, "/health never answered");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The tenant token sees the example handler, its binding and its DLQ.
    let cwd = dir.path();
    let handlers = json(&weir_api(
        cwd,
        &server,
        &token,
        &["handler", "list", "--output", "json"],
    ));
    assert_eq!(handlers[0]["name"], "orders", "{handlers}");
    assert_eq!(handlers[0]["tenant"], "dev", "{handlers}");
    assert_eq!(handlers[0]["active_version"], 1, "{handlers}");
    let bindings = json(&weir_api(
        cwd,
        &server,
        &token,
        &["binding", "list", "--output", "json"],
    ));
    assert_eq!(bindings[0]["id"], "dev.orders", "{bindings}");
    let dlq = json(&weir_api(
        cwd,
        &server,
        &token,
        &["dlq", "list", "--output", "json"],
    ));
    assert!(dlq["entries"].is_array(), "{dlq}");
    // The admin token works too, and the tenant token is not the admin's.
    let tenants = json(&weir_api(
        cwd,
        &server,
        ADMIN,
        &["tenant", "list", "--output", "json"],
    ));
    assert!(
        tenants.as_array().unwrap().iter().any(|t| t["id"] == "dev"),
        "{tenants}"
    );
    let refused = weir_api(cwd, &server, &token, &["tenant", "list"]);
    assert_eq!(refused.status.code(), Some(6));

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "weir dev exited with {status}");
}
