//! `weir migrate`, `weir handler deploy` and `weir binding list` against the real PostgreSQL
//! server (`tests/services up`), each test in a fresh schema of its own: the production store,
//! reached the way an operator reaches it, through `WEIR_STORE__URL`.
//!
//! The binary is the `weir` that cargo built next to this test (`<target>/debug/weir`):
//! `cargo test` at the workspace root (what `tests/run` runs) builds it, because the host's own
//! integration tests need it. Without PostgreSQL, or without the binary, these tests fail with
//! the command to run; they never skip.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Output};

use serde_json::Value;

/// A schema of its own on the test server, and the store URL that points into it.
struct Schema {
    admin: sqlx::PgPool,
    name: String,
    url: String,
}

impl Schema {
    async fn new() -> Self {
        let base = weir_acceptance::services().database_url;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&base)
            .await
            .expect("connect to postgresql (start it with `tests/services up`)");
        let name = weir_acceptance::unique_name("deploy");
        // `unique_name` yields only [a-z0-9_], so splicing it into SQL is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await
            .expect("create schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        Self { admin, name, url }
    }

    /// Run `weir` with this schema as the store and no other `WEIR_*` variable.
    fn weir(&self, args: &[&str]) -> Output {
        let cwd = tempfile::tempdir().expect("temporary directory");
        let mut command = Command::new(weir_acceptance::weir_binary());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEIR_") {
                command.env_remove(name);
            }
        }
        let out = command
            .current_dir(cwd.path())
            .env("WEIR_STORE__URL", &self.url)
            .args(args)
            .output()
            .expect("run weir");
        // A binary older than the commands this test runs answers with clap's usage error.
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"),
            "{} is out of date: rebuild it with `cargo build -p weir`",
            weir_acceptance::weir_binary().display()
        );
        out
    }

    async fn drop(self) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.name
        )))
        .execute(&self.admin)
        .await
        .expect("drop schema");
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

#[tokio::test(flavor = "multi_thread")]
async fn migrate_then_deploy_to_postgresql() {
    let schema = Schema::new().await;

    let out = schema.weir(&["migrate"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("migrated  postgres://weir:***@"),
        "{stdout}"
    );

    let orders = weir_acceptance::component("weir_handler_orders");
    let orders = orders.to_str().unwrap();
    let deploy = [
        "handler",
        "deploy",
        orders,
        "--tenant",
        "acme",
        "--name",
        "orders",
        "--topic",
        "orders",
        "--output-topic",
        "orders.accepted",
        "--output",
        "json",
    ];
    let first = schema.weir(&deploy);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let first = json(&first);
    assert_eq!(first["version"], 1);
    assert_eq!(first["binding_id"], "acme.orders");
    assert_eq!(first["binding_revision"], 1);
    assert!(
        !first["store"].as_str().unwrap().contains(":weir@"),
        "the password is shown: {first}"
    );

    let again = schema.weir(&deploy);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let again = json(&again);
    assert_eq!(again["version"], 1, "same bytes, same version: {again}");
    assert_eq!(again["sha256"], first["sha256"]);
    assert_eq!(again["binding_revision"], 2);

    // Nothing is written for a file that is not a handler, nor for an invalid binding.
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"not webassembly").unwrap();
    let out = schema.weir(&[
        "handler",
        "deploy",
        junk.path().to_str().unwrap(),
        "--tenant",
        "acme",
        "--name",
        "junk",
        "--topic",
        "junk",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let out = schema.weir(&[
        "handler",
        "deploy",
        orders,
        "--tenant",
        "acme",
        "--name",
        "limitless",
        "--topic",
        "orders",
        "--max-in-flight",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    let listed = schema.weir(&["binding", "list", "--output", "json"]);
    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed.stderr));
    let listed = json(&listed);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme.orders"]);

    let store = weir::store::connect(&schema.url).await.unwrap();
    let active = store.active_version("acme", "orders").await.unwrap();
    assert_eq!(active.map(|v| v.version), Some(1));
    assert!(
        store
            .list_handler_versions("acme", "junk")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list_handler_versions("acme", "limitless")
            .await
            .unwrap()
            .is_empty()
    );
    let binding = store.binding("acme.orders").await.unwrap().unwrap();
    let spec: weir::pipeline::BindingSpec = serde_json::from_value(binding.spec).unwrap();
    assert_eq!(spec.output_topics, ["orders.accepted"]);
    store.close().await;

    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_exits_5_without_showing_it() {
    let base = weir_acceptance::services().database_url;
    let wrong = weir::config::redact_url(&base).replace("***", "not-the-password");
    let out = Command::new(weir_acceptance::weir_binary())
        .env("WEIR_STORE__URL", &wrong)
        .args(["migrate"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-password"), "{stderr}");
}
