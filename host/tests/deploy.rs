//! `weir handler deploy`, `weir binding list` and `weir migrate` as an operator uses them: the
//! real binary, an SQLite store in a temporary directory (named by `WEIR_STORE__URL`), real
//! components built from `handlers/` (by `tests/run`, or `cargo build --release --target
//! wasm32-wasip2 -p <handler>`), and the exit codes scripts rely on. What the store holds
//! afterwards is checked through the library's own store.
//!
//! The PostgreSQL half lives in `tests/tests/deploy_postgres.rs` (it needs the real server).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
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

/// A working directory with its own SQLite store.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("weir.db").display())
    }

    /// Run `weir` in the sandbox with `store_url` as the store, and no other `WEIR_*` variable
    /// of this process's environment.
    fn weir_with(&self, store_url: &str, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEIR_") {
                command.env_remove(name);
            }
        }
        command
            .current_dir(self.dir.path())
            .env("WEIR_STORE__URL", store_url)
            .args(args)
            .output()
            .expect("run weir")
    }

    fn weir(&self, args: &[&str]) -> Output {
        self.weir_with(&self.url(), args)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("write file");
        path
    }

    /// What the store holds: `tenant`'s versions of `handler`, and every binding id.
    async fn stored(&self, tenant: &str, handler: &str) -> (Vec<i32>, Vec<String>) {
        let store = weir::store::connect(&self.url()).await.expect("open store");
        let versions = store
            .list_handler_versions(tenant, handler)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.version)
            .collect();
        let bindings = store
            .list_bindings()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        store.close().await;
        (versions, bindings)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[tokio::test]
async fn deploy_stores_activates_and_binds_and_the_same_bytes_keep_their_version() {
    let sandbox = Sandbox::new();
    let orders = component("weir_handler_orders");
    let deploy = [
        "handler",
        "deploy",
        path(&orders),
        "--tenant",
        "acme",
        "--name",
        "orders",
        "--topic",
        "orders",
        "--topic",
        "orders.retry",
        "--output-topic",
        "orders.accepted",
        "--config",
        "output-topic=orders.accepted",
        "--max-attempts",
        "3",
        "--backoff-ms",
        "100,200",
        "--ordering",
        "partition",
        "--output",
        "json",
    ];
    let first = sandbox.weir(&deploy);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let first = json(&first);
    assert_eq!(first["outcome"], "deployed");
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["handler"], "orders");
    assert_eq!(first["version"], 1);
    assert_eq!(first["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(first["binding_id"], "acme.orders");
    assert_eq!(first["binding_revision"], 1);
    assert_eq!(first["group_id"], "weir.acme.orders");
    assert_eq!(
        first["topics"],
        serde_json::json!(["orders", "orders.retry"])
    );
    assert_eq!(first["dlq_topic"], "orders.dlq");

    let again = sandbox.weir(&deploy);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let again = json(&again);
    assert_eq!(again["version"], 1, "same bytes, same version: {again}");
    assert_eq!(again["sha256"], first["sha256"]);
    assert_eq!(again["binding_revision"], 2);

    // Another component under the same name is the next version, and becomes the active one.
    let echo = component("weir_handler_echo");
    let mut other = deploy;
    other[2] = path(&echo);
    let second = sandbox.weir(&other);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    assert_eq!(json(&second)["version"], 2);

    let store = weir::store::connect(&sandbox.url()).await.unwrap();
    let active = store
        .active_version("acme", "orders")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(active.version, 2);
    let binding = store.binding("acme.orders").await.unwrap().unwrap();
    let spec: weir::pipeline::BindingSpec = serde_json::from_value(binding.spec).unwrap();
    assert_eq!(spec.topics, ["orders", "orders.retry"]);
    assert_eq!(spec.output_topics, ["orders.accepted"]);
    assert_eq!(spec.config["output-topic"], "orders.accepted");
    assert_eq!(spec.retry.max_attempts, 3);
    assert_eq!(spec.retry.backoff.len(), 2);
    assert_eq!(spec.ordering, weir::pipeline::Ordering::Partition);
    store.close().await;

    // Human output names the same things.
    let human = sandbox.weir(&deploy[..deploy.len() - 2]);
    let stdout = text(&human.stdout);
    assert_eq!(human.status.code(), Some(0), "{}", text(&human.stderr));
    assert!(
        stdout.contains("acme/orders version 1 (active)"),
        "{stdout}"
    );
    assert!(stdout.contains("group     weir.acme.orders"), "{stdout}");
}

#[tokio::test]
async fn binding_list_shows_what_was_deployed() {
    let sandbox = Sandbox::new();
    let echo = component("weir_handler_echo");
    for (tenant, topic) in [("acme", "payments"), ("globex", "shipments")] {
        let out = sandbox.weir(&[
            "handler",
            "deploy",
            path(&echo),
            "--tenant",
            tenant,
            "--name",
            "echo",
            "--topic",
            topic,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let out = sandbox.weir(&["binding", "list"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.starts_with("ID "), "{stdout}");
    assert!(stdout.contains("acme.echo"), "{stdout}");
    assert!(stdout.contains("shipments"), "{stdout}");

    let out = sandbox.weir(&["binding", "list", "--tenant", "globex", "--output", "json"]);
    let listed = json(&out);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], "globex.echo");
    assert_eq!(listed[0]["revision"], 1);
    assert_eq!(listed[0]["spec"]["topics"][0], "shipments");
}

#[tokio::test]
async fn a_file_that_is_not_a_handler_exits_4_and_writes_nothing() {
    let sandbox = Sandbox::new();
    let junk = sandbox.file("junk.wasm", b"this is not webassembly");
    let other_world = component("weir_fixture_other_world");
    for file in [junk, other_world] {
        let out = sandbox.weir(&[
            "handler",
            "deploy",
            path(&file),
            "--tenant",
            "acme",
            "--name",
            "orders",
            "--topic",
            "orders",
            "--output",
            "json",
        ]);
        assert_eq!(out.status.code(), Some(4), "{}", text(&out.stdout));
        let body = json(&out);
        assert_eq!(body["outcome"], "error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("is not a valid Weir handler"),
            "{body}"
        );
    }
    assert_eq!(sandbox.stored("acme", "orders").await, (vec![], vec![]));
}

#[tokio::test]
async fn an_invalid_binding_setting_exits_2_naming_it_and_writes_nothing() {
    let sandbox = Sandbox::new();
    let orders = component("weir_handler_orders");
    let cases: [(&[&str], &str); 5] = [
        (&["--max-in-flight", "0"], "max_in_flight"),
        (&["--max-attempts", "0"], "retry.max_attempts"),
        (&["--output-topic", "orders"], "output_topics"),
        (&["--binding-id", "Not An Id"], "binding_id"),
        (&["--deadline-ms", "0"], "deadline_ms"),
    ];
    for (flags, field) in cases {
        let mut args = vec![
            "handler",
            "deploy",
            path(&orders),
            "--tenant",
            "acme",
            "--name",
            "orders",
            "--topic",
            "orders",
        ];
        args.extend_from_slice(flags);
        let out = sandbox.weir(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid binding {field}:")),
            "{flags:?}: {stderr}"
        );
    }
    // Names are checked too: the tenant's.
    let out = sandbox.weir(&[
        "handler",
        "deploy",
        path(&orders),
        "--tenant",
        "Acme Corp",
        "--name",
        "orders",
        "--topic",
        "orders",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("invalid binding tenant"));
    assert_eq!(sandbox.stored("acme", "orders").await, (vec![], vec![]));
}

#[tokio::test]
async fn a_binding_id_of_another_tenant_is_refused_before_anything_is_written() {
    let sandbox = Sandbox::new();
    let echo = component("weir_handler_echo");
    let deploy = |tenant: &'static str| {
        sandbox.weir(&[
            "handler",
            "deploy",
            path(&echo),
            "--tenant",
            tenant,
            "--name",
            "echo",
            "--topic",
            "in",
            "--binding-id",
            "shared",
        ])
    };
    assert_eq!(deploy("acme").status.code(), Some(0));
    let out = deploy("globex");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("\"shared\" belongs to tenant"), "{stderr}");
    let (versions, bindings) = sandbox.stored("globex", "echo").await;
    assert_eq!(versions, Vec::<i32>::new());
    assert_eq!(bindings, ["shared"]);
}

#[tokio::test]
async fn migrate_creates_a_fresh_sqlite_store() {
    let sandbox = Sandbox::new();
    // A directory that does not exist yet, as with the default `.weir/weir.db`.
    let url = format!(
        "sqlite://{}",
        sandbox.dir.path().join("state/weir.db").display()
    );
    let out = sandbox.weir_with(&url, &["migrate"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("migrated"), "{stdout}");
    assert!(sandbox.dir.path().join("state/weir.db").is_file());
    // Twice is fine.
    let out = sandbox.weir_with(&url, &["migrate", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(json(&out)["outcome"], "migrated");
    // And the store is usable.
    let store = weir::store::connect(&url).await.unwrap();
    assert_eq!(store.list_bindings().await.unwrap(), vec![]);
    store.close().await;
}

#[test]
fn migrate_against_an_unreachable_store_exits_5_without_the_password() {
    let sandbox = Sandbox::new();
    let out = sandbox.weir_with("postgres://weir:wrong@127.0.0.1:1/x", &["migrate"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("store unreachable"), "{stderr}");
    assert!(
        stderr.contains("postgres://weir:***@127.0.0.1:1/x"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong"), "{stderr}");
}

#[test]
fn configuration_mistakes_exit_5_naming_the_variable_or_file() {
    let sandbox = Sandbox::new();
    let url = sandbox.url();

    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    let out = command
        .current_dir(sandbox.dir.path())
        .env("WEIR_STORE__URI", &url)
        .args(["migrate"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("WEIR_STORE__URI"), "{stderr}");
    assert!(stderr.contains("uri"), "{stderr}");

    let out = sandbox.weir(&["migrate", "--config-file", "missing.toml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");

    // `weir.toml` in the working directory is read when no file is named; the environment wins.
    sandbox.file(
        "weir.toml",
        b"[pipeline]\ndrain_deadline_ms = 60000\n[store]\nurl = \"sqlite::memory:\"\n",
    );
    let out = sandbox.weir(&["migrate"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("pipeline.drain_deadline_ms"), "{stderr}");
}
