//! Cable cut: `weir serve` is killed with SIGKILL several times mid-run and started again. At the
//! end every per-key counter equals its key's message count — nothing lost, nothing doubled —
//! and the outbox holds exactly one record per message. Real broker, real database, the real
//! binary.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Row;
use weir_acceptance::{component, services, unique_name, weir_binary};

const MESSAGES: usize = 20_000;
const KEYS: usize = 50;
const KILLS: usize = 3;

struct Host {
    env: Vec<(String, String)>,
    log: std::path::PathBuf,
}

impl Host {
    fn command(&self) -> Command {
        let mut command = Command::new(weir_binary());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEIR_") {
                command.env_remove(name);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    fn start(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.command()
            .arg("serve")
            .env("WEIR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weir serve")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_doubles_nothing() {
    let services = services();
    let input = unique_name("cut_in");
    let output = format!("{input}.accepted");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .create()
        .unwrap();
    for result in admin
        .create_topics(
            &[NewTopic::new(&input, 6, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }

    let workdir = tempfile::tempdir().unwrap();
    let tenant = unique_name("cut");
    let host = Host {
        env: vec![
            ("WEIR_STORE__URL".into(), services.database_url.clone()),
            (
                "WEIR_KAFKA__BOOTSTRAP_SERVERS".into(),
                services.kafka.clone(),
            ),
            (
                "WEIR_SERVER__LISTEN".into(),
                format!("127.0.0.1:{}", free_port()),
            ),
            ("WEIR_PIPELINE__RECONCILE_EVERY_MS".into(), "500".into()),
            ("WEIR_RUNTIME__POOL_INSTANCES".into(), "32".into()),
        ],
        log: workdir.path().join("serve.log"),
    };
    let orders = component("weir_handler_orders");
    let deploy = host
        .command()
        .args([
            "handler",
            "deploy",
            orders.to_str().unwrap(),
            "--tenant",
            &tenant,
            "--name",
            "orders",
        ])
        .args([
            "--topic",
            &input,
            "--output-topic",
            &output,
            "--config",
            &format!("output-topic={output}"),
        ])
        .args(["--max-in-flight", "32"])
        .output()
        .unwrap();
    assert!(
        deploy.status.success(),
        "deploy failed: {}",
        String::from_utf8_lossy(&deploy.stderr)
    );
    let binding_id = format!("{tenant}.orders");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let mut expected: HashMap<String, i64> = HashMap::new();
    let mut sends = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let customer = format!("c-{}", i % KEYS);
        *expected.entry(customer.clone()).or_default() += 1;
        let payload = format!(
            r#"{{"order_id":"o-{i}","customer":"{customer}","amount_cents":{}}}"#,
            100 + i
        );
        let record = FutureRecord::to(&input).key(&customer).payload(&payload);
        sends.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for send in sends {
        send.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    let pool = sqlx::PgPool::connect(&services.database_url).await.unwrap();
    let processed = || {
        let pool = pool.clone();
        let binding_id = binding_id.clone();
        async move {
            sqlx::query("SELECT count(*) AS n FROM processed_keys WHERE binding_id = $1")
                .bind(&binding_id)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get::<i64, _>("n") as usize
        }
    };

    // Kill it while it works: each time once some progress since the last start is visible.
    let mut child = host.start();
    let mut kills_at = Vec::new();
    for kill in 0..KILLS {
        let before = processed().await;
        let deadline = Instant::now() + Duration::from_secs(120);
        let step = (MESSAGES / (KILLS + 2)).max(1);
        while processed().await < before + step {
            assert!(
                Instant::now() < deadline,
                "no progress before kill {kill}; see {}",
                host.log.display()
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "weir serve exited; see {}",
                host.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let at = processed().await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills_at.push(at);
        child = host.start();
    }

    let deadline = Instant::now() + Duration::from_secs(300);
    while processed().await < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "timed out at {} of {MESSAGES}; see {}",
            processed().await,
            host.log.display()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "weir serve exited; see {}",
            host.log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stop it gracefully (SIGTERM): it drains and exits 0.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "weir serve exited with {status} after SIGTERM"
    );

    // Every counter exact: 0 lost, 0 doubled.
    let mut lost = 0i64;
    let mut doubled = 0i64;
    for (customer, count) in &expected {
        let row = sqlx::query("SELECT value FROM keyed_state WHERE tenant = $1 AND handler = 'orders' AND key = $2 AND name = 'orders'")
            .bind(&tenant)
            .bind(customer.as_bytes())
            .fetch_one(&pool)
            .await
            .unwrap();
        let value: i64 = serde_json::from_slice(&row.get::<Vec<u8>, _>("value")).unwrap();
        lost += (count - value).max(0);
        doubled += (value - count).max(0);
    }
    let row = sqlx::query(
        "SELECT count(*) AS n, count(DISTINCT message_id) AS ids FROM outbox WHERE binding_id = $1",
    )
    .bind(&binding_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let (records, ids) = (row.get::<i64, _>("n"), row.get::<i64, _>("ids"));
    eprintln!(
        "cable cut: {MESSAGES} messages, {KILLS} SIGKILLs at {kills_at:?} processed; lost {lost}, doubled {doubled}; outbox {records} records, {ids} distinct ids"
    );
    assert_eq!((lost, doubled), (0, 0));
    assert_eq!((records, ids), (MESSAGES as i64, MESSAGES as i64));
}
