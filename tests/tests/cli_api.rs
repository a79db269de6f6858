//! The `weir` command line over the admin API, as an operator and a tenant use it: `weir serve`
//! started as a process (real PostgreSQL, in a schema of its own, and the real broker) with an
//! admin token, and the real `weir` binary pointed at it through `WEIR_SERVER` / `WEIR_TOKEN`.
//!
//! One story — tenant, token, deploy (twice: a second version), list, show, rollback, activate,
//! binding show and update, produce, message status, the DLQ (list, show, bulk discard),
//! deleting — then the exit codes scripts rely on: 2 for input the API refused (with the field),
//! 4 for an invalid component, 5 for a server that is down, 6 for a wrong token, 7 for an
//! unknown object, 8 for a conflict.
//!
//! The binary is the `weir` that cargo built next to this test: `cargo build -p weir` first
//! when running `cargo test -p weir-acceptance` alone.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use weir_acceptance::{component, services, unique_name, weir_binary};

const ADMIN: &str = "cli-admin-token-0123456789abcdef";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `weir serve` on a schema of its own, and the `weir` commands pointed at it.
struct Host {
    child: Child,
    server: String,
    dir: tempfile::TempDir,
    pool: sqlx::PgPool,
    schema: String,
}

impl Host {
    async fn start() -> Self {
        let services = services();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&services.database_url)
            .await
            .expect("connect to postgresql (start it with `tests/services up`)");
        let schema = unique_name("cli");
        // `unique_name` yields only [a-z0-9_], so splicing it into SQL is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .unwrap();
        let base = &services.database_url;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        let dir = tempfile::tempdir().unwrap();
        let port = weir_acceptance::free_port();
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let mut command = Command::new(weir_binary());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEIR_") {
                command.env_remove(name);
            }
        }
        let child = command
            .arg("serve")
            .current_dir(dir.path())
            .env("WEIR_STORE__URL", &url)
            .env("WEIR_KAFKA__BOOTSTRAP_SERVERS", &services.kafka)
            .env("WEIR_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("WEIR_SERVER__ADMIN_TOKEN", ADMIN)
            .env("WEIR_PIPELINE__RECONCILE_EVERY_MS", "500")
            .env("WEIR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weir serve");
        let host = Self {
            child,
            server: format!("http://127.0.0.1:{port}"),
            dir,
            pool,
            schema,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            let ready = http
                .get(format!("{}/health", host.server))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "weir serve never answered /health; log: {}",
                host.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        host
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Run `weir` with `token` against this host, in a directory without `weir.toml`, and no
    /// other `WEIR_*` variable of this process's environment.
    fn weir(&self, token: Option<&str>, args: &[&str]) -> Output {
        self.weir_at(&self.server, token, args)
    }

    fn weir_at(&self, server: &str, token: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(weir_binary());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEIR_") {
                command.env_remove(name);
            }
        }
        command
            .current_dir(self.dir.path())
            .env("WEIR_SERVER", server);
        if let Some(token) = token {
            command.env("WEIR_TOKEN", token);
        }
        let out = command.args(args).output().expect("run weir");
        assert!(
            !text(&out.stderr).contains("unrecognized subcommand"),
            "{} is out of date: rebuild it with `cargo build -p weir`",
            weir_binary().display()
        );
        out
    }

    /// Run `weir … --output json`, expecting exit code 0 and one JSON document.
    fn json(&self, token: Option<&str>, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let out = self.weir(token, &args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "weir {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("weir {args:?}: not JSON ({e}): {}", text(&out.stdout)))
    }

    /// Run `weir … --output json`, expecting exit code `code` and the error document.
    fn fails(&self, token: Option<&str>, code: i32, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let out = self.weir(token, &args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "weir {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let body: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("weir {args:?}: not JSON ({e}): {}", text(&out.stdout)));
        assert_eq!(body["outcome"], "error", "{body}");
        body
    }

    async fn stop(mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "weir serve exited with {status}");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await
        .unwrap();
    }
}

impl Drop for Host {
    /// A test that failed half-way leaves no `weir serve` behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn create_topic(name: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", services().kafka)
        .create()
        .unwrap();
    for result in admin
        .create_topics(
            &[NewTopic::new(name, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Poll `probe` every 250 ms until it answers, for at most `timeout`.
async fn eventually<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_admin_api_end_to_end() {
    let host = Host::start().await;
    let tenant = unique_name("acme");
    let input = unique_name("cli_in");
    let output = format!("{input}.accepted");
    create_topic(&input).await;

    // Tenants and tokens (admin).
    let created = host.json(Some(ADMIN), &["tenant", "create", &tenant]);
    assert_eq!(created["id"], tenant.as_str());
    let again = host.fails(Some(ADMIN), 8, &["tenant", "create", &tenant]);
    assert_eq!(again["error"]["code"], "conflict");
    let token = host.json(
        Some(ADMIN),
        &["token", "create", "--tenant", &tenant, "--label", "ci"],
    );
    let token = token["token"].as_str().unwrap().to_owned();
    let token = Some(token.as_str());

    // The tenant's rate limit (admin): set, shown, refused to the tenant, validated, removed.
    let limited = host.json(
        Some(ADMIN),
        &[
            "tenant",
            "rate-limit",
            &tenant,
            "--per-second",
            "200",
            "--burst",
            "20",
        ],
    );
    assert_eq!(
        limited["rate_limit"],
        json!({"messages_per_second": 200, "burst": 20})
    );
    let shown = host.json(token, &["tenant", "show"]);
    assert_eq!(shown["rate_limit"]["messages_per_second"], 200);
    let human = host.weir(token, &["tenant", "show"]);
    assert!(
        text(&human.stdout).contains("200 messages/s per host, burst 20"),
        "{}",
        text(&human.stdout)
    );
    host.fails(
        token,
        6,
        &["tenant", "rate-limit", &tenant, "--per-second", "9999"],
    );
    let zero = host.fails(
        Some(ADMIN),
        2,
        &[
            "tenant",
            "rate-limit",
            &tenant,
            "--per-second",
            "0",
            "--burst",
            "5",
        ],
    );
    assert_eq!(zero["error"]["field"], "messages_per_second", "{zero}");
    let off = host.json(Some(ADMIN), &["tenant", "rate-limit", &tenant, "--off"]);
    assert_eq!(off["rate_limit"], Value::Null);
    // The admin token acts for no tenant: commands that need one say so (usage, 2).
    let usage = host.fails(Some(ADMIN), 2, &["handler", "list"]);
    assert!(
        usage["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--tenant"),
        "{usage}"
    );

    // Deploy through the API (the tenant from the token), twice: a second version.
    let orders = component("weir_handler_orders");
    let v2 = component("weir_fixture_orders_v2");
    let deploy = |file: &Path| {
        host.json(
            token,
            &[
                "handler",
                "deploy",
                path(file),
                "--name",
                "orders",
                "--topic",
                &input,
                "--output-topic",
                &output,
                "--config",
                &format!("output-topic={output}"),
                "--max-attempts",
                "2",
                "--backoff-ms",
                "100",
            ],
        )
    };
    let first = deploy(&orders);
    assert_eq!(
        (
            &first["tenant"],
            &first["version"],
            &first["active"],
            &first["binding_revision"]
        ),
        (
            &Value::from(tenant.as_str()),
            &Value::from(1),
            &Value::from(true),
            &Value::from(1)
        ),
        "{first}"
    );
    let binding_id = format!("{tenant}.orders");
    assert_eq!(first["binding_id"], binding_id.as_str());
    assert_eq!(first["server"], host.server.as_str());
    let second = deploy(&v2);
    assert_eq!(
        (&second["version"], &second["binding_revision"]),
        (&Value::from(2), &Value::from(2)),
        "a second deploy replaces the binding (PUT after 409): {second}"
    );

    // Handlers: list, show, rollback, activate.
    let handlers = host.json(token, &["handler", "list"]);
    assert_eq!(handlers.as_array().unwrap().len(), 1, "{handlers}");
    assert_eq!(handlers[0]["active_version"], 2);
    let shown = host.json(token, &["handler", "show", "orders"]);
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2, "{shown}");
    let rolled = host.json(token, &["handler", "rollback", "orders"]);
    assert_eq!(rolled["active_version"], 1, "{rolled}");
    let activated = host.json(token, &["handler", "activate", "orders", "2"]);
    assert_eq!(activated["active_version"], 2, "{activated}");
    let human = host.weir(token, &["handler", "list", "--output", "table"]);
    assert_eq!(human.status.code(), Some(0), "{}", text(&human.stderr));
    assert!(
        text(&human.stdout).starts_with("NAME "),
        "{}",
        text(&human.stdout)
    );

    // Bindings: show, and update (only the flags given change).
    let binding = host.json(token, &["binding", "show", &binding_id]);
    assert_eq!(binding["spec"]["topics"][0], input.as_str(), "{binding}");
    assert_eq!(binding["spec"]["retry"]["max_attempts"], 2, "{binding}");
    let updated = host.json(
        token,
        &["binding", "update", &binding_id, "--max-in-flight", "8"],
    );
    assert_eq!(
        (
            &updated["revision"],
            &updated["spec"]["max_in_flight"],
            &updated["spec"]["topics"][0],
            &updated["spec"]["config"]["output-topic"]
        ),
        (
            &Value::from(3),
            &Value::from(8),
            &Value::from(input.as_str()),
            &Value::from(output.as_str())
        ),
        "{updated}"
    );
    let listed = host.json(token, &["binding", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // The binding's breaker: closed, forced open, reset.
    let breaker = host.json(token, &["binding", "breaker", &binding_id]);
    assert_eq!(
        (&breaker["state"], &breaker["forced"]),
        (&Value::from("closed"), &Value::from(false)),
        "{breaker}"
    );
    let opened = host.json(token, &["binding", "breaker", &binding_id, "--open"]);
    assert_eq!(
        (&opened["state"], &opened["forced"]),
        (&Value::from("open"), &Value::from(true)),
        "{opened}"
    );
    let reset = host.json(token, &["binding", "breaker", &binding_id, "--reset"]);
    assert_eq!(reset["state"], "closed", "{reset}");

    // Produce: a good order with a stable id, and a poison one from a file.
    let message_id = format!("{tenant}-m1");
    let produced = host.json(
        token,
        &[
            "produce",
            &input,
            "--key",
            "c-1",
            "--value",
            r#"{"order_id":"o-1","customer":"c-1","amount_cents":100}"#,
            "--message-id",
            &message_id,
            "--header",
            "source=cli-test",
        ],
    );
    assert_eq!(
        produced["messages"][0]["id"],
        message_id.as_str(),
        "{produced}"
    );
    assert_eq!(produced["messages"][0]["duplicate"], false);
    let poison = host.dir.path().join("poison.txt");
    std::fs::write(&poison, b"{not an order").unwrap();
    host.json(
        token,
        &[
            "produce",
            &input,
            "--key",
            "c-2",
            "--value-file",
            path(&poison),
        ],
    );
    let sent = eventually("the message to be sent", Duration::from_secs(60), || {
        let status = host.json(token, &["message", "status", &message_id]);
        (status["state"] == "sent").then_some(status)
    })
    .await;
    assert_eq!(sent["topic"], input.as_str(), "{sent}");

    // The DLQ: the poison order arrives; show it, then discard everything pending in bulk.
    let page = eventually(
        "the poison order in the DLQ",
        Duration::from_secs(90),
        || {
            let page = host.json(token, &["dlq", "list", "--binding", &binding_id]);
            (!page["entries"].as_array().unwrap().is_empty()).then_some(page)
        },
    )
    .await;
    let entry = &page["entries"][0];
    assert_eq!(entry["error_kind"], "permanent", "{page}");
    let id = entry["id"].as_i64().unwrap().to_string();
    let shown = host.json(token, &["dlq", "show", &id]);
    assert_eq!(shown["payload"]["text"], "{not an order", "{shown}");
    let discard = host.weir(
        token,
        &[
            "dlq",
            "discard",
            "--all",
            "--binding",
            &binding_id,
            "--note",
            "cli test",
            "--output",
            "json",
        ],
    );
    assert_eq!(discard.status.code(), Some(0), "{}", text(&discard.stderr));
    let done: Value = serde_json::from_slice(&discard.stdout).unwrap();
    assert_eq!(
        (&done["outcome"], &done["done"]),
        (&Value::from("discarded"), &Value::from(1)),
        "{done}"
    );
    assert!(
        text(&discard.stderr).contains("discarded 1 of 1 matched so far (skipped 0)"),
        "{}",
        text(&discard.stderr)
    );
    let discarded = host.json(token, &["dlq", "list", "--state", "discarded"]);
    assert_eq!(
        discarded["entries"][0]["resolution_note"], "cli test",
        "{discarded}"
    );
    // A discarded entry cannot be replayed: conflict.
    host.fails(token, 8, &["dlq", "replay", &id]);

    // Exit codes.
    // 6: a wrong token.
    let wrong = host.fails(Some("weir_000000000000_wrong"), 6, &["handler", "list"]);
    assert_eq!(wrong["error"]["code"], "invalid-token", "{wrong}");
    // 6: no token at all, with a hint.
    let none = host.weir(None, &["handler", "list", "--tenant", &tenant]);
    assert_eq!(none.status.code(), Some(6));
    assert!(
        text(&none.stderr).contains("WEIR_TOKEN"),
        "{}",
        text(&none.stderr)
    );
    // 7: an unknown handler.
    let unknown = host.fails(token, 7, &["handler", "show", "nope"]);
    assert_eq!(unknown["error"]["code"], "not-found", "{unknown}");
    // 4: an invalid component file.
    let junk = host.dir.path().join("junk.wasm");
    std::fs::write(&junk, b"this is not webassembly").unwrap();
    let invalid = host.fails(
        token,
        4,
        &["handler", "deploy", path(&junk), "--name", "junk"],
    );
    assert_eq!(invalid["error"]["code"], "not-wasm", "{invalid}");
    assert!(
        invalid["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not a valid Weir handler"),
        "{invalid}"
    );
    // 2: binding settings the API refuses, with the field named.
    for (flags, field) in [
        (
            vec![
                "--output-topic",
                "a.out",
                "--config",
                "output-topic=elsewhere",
            ],
            "config.output-topic",
        ),
        (vec!["--max-in-flight", "0"], "max_in_flight"),
    ] {
        let mut args = vec![
            "binding",
            "create",
            "--handler",
            "orders",
            "--id",
            "other",
            "--topic",
            &input,
        ];
        args.extend(flags);
        let refused = host.fails(token, 2, &args);
        assert_eq!(refused["error"]["field"], field, "{refused}");
    }
    // 8: deleting a handler a binding runs; then in order, it works.
    host.fails(token, 8, &["handler", "delete", "orders"]);
    host.json(token, &["binding", "delete", &binding_id]);
    host.json(token, &["handler", "delete", "orders"]);
    host.json(Some(ADMIN), &["tenant", "delete", &tenant]);
    // 5: a server that is down.
    let down = format!("http://127.0.0.1:{}", weir_acceptance::free_port());
    let out = host.weir_at(&down, token, &["handler", "list"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("cannot reach the Weir server at {down}")),
        "{}",
        text(&out.stderr)
    );

    host.stop().await;
}
