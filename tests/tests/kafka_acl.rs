//! Kafka client security against a real broker that enforces ACLs: a second broker of this
//! test's own (KRaft, the jars `tests/services` caches) with a SASL_PLAINTEXT listener
//! (SCRAM-SHA-256), Kafka's `StandardAuthorizer`, `allow.everyone.if.no.acl.found=false` and
//! one super user (`admin`) that sets things up.
//!
//! 1. `weir serve` as the principal `weir`, which holds exactly the least privileges the
//!    operators' guide lists — READ on the input topic, READ on the binding's group, WRITE on
//!    the output and DLQ topics, no IDEMPOTENT_WRITE on the cluster — processes every order: the
//!    events and the DLQ records are read back from the broker by the super user.
//! 2. `weir serve` as `weir-denied`, which may write the output and DLQ topics but lacks READ on
//!    the input topic and the group: nothing is processed, and the host says why — an error in
//!    its log and in `/health/details` naming the authorization failure, not a silent hang.
//! 3. Once the missing ACLs are granted, the same host, still running, processes the orders
//!    that waited and the error is gone.
//!
//! The broker listens on loopback ports of its own and is killed when the test ends, passed or
//! failed. Needs PostgreSQL from `tests/services` (the store), Java and the cached Kafka jars
//! (`tests/services kafka-libs`), and the `orders` component.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use serve_support::{Scenario, client_config, create_topic};
use weir_acceptance::{repo_root, unique_name};

/// The super user: creates topics and ACLs, produces the orders, reads the results back.
const ADMIN: (&str, &str) = ("admin", "admin-secret");
/// The principal with exactly Weir's least privileges.
const WEIR: (&str, &str) = ("weir", "weir-secret");
/// The principal without READ on the input topic and the group.
const DENIED: (&str, &str) = ("weir-denied", "denied-secret");

/// How long the broker may take to start (two cores shared with cargo): generous.
const BROKER_START: Duration = Duration::from_secs(120);
/// How long a step that involves Kafka and a host may take.
const STEP: Duration = Duration::from_secs(60);

/// A KRaft broker with a SASL_PLAINTEXT listener and ACLs, killed when dropped.
struct SecureBroker {
    child: Child,
    bootstrap: String,
    libs: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory of the Kafka jars `tests/services` caches (fetched if missing).
fn kafka_libs() -> PathBuf {
    let output = Command::new(repo_root().join("tests/services"))
        .arg("kafka-libs")
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/services kafka-libs");
    assert!(output.status.success(), "tests/services kafka-libs failed");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// `java` with the test broker's flags (those of `tests/services`) and the Kafka jars.
fn java(libs: &Path, logs: &Path) -> Command {
    let mut command = Command::new("java");
    command
        .args([
            "-Xmx512m",
            "-Xms512m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
        ])
        .arg("-Djava.awt.headless=true")
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            repo_root().join("tests/kafka/log4j2.properties").display()
        ))
        .arg(format!("-Dkafka.logs.dir={}", logs.display()))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()));
    command
}

/// The super user's librdkafka settings.
fn admin_properties(bootstrap: &str) -> Vec<(String, String)> {
    [
        ("bootstrap.servers", bootstrap),
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanisms", "SCRAM-SHA-256"),
        ("sasl.username", ADMIN.0),
        ("sasl.password", ADMIN.1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

impl SecureBroker {
    /// Format a fresh KRaft log with the SCRAM credentials of every principal, start the broker
    /// and wait until the super user can read its metadata.
    async fn start() -> Self {
        let libs = kafka_libs();
        let dir = tempfile::tempdir().unwrap();
        let (port, controller) = (weir_acceptance::free_port(), weir_acceptance::free_port());
        let bootstrap = format!("127.0.0.1:{port}");
        let properties = dir.path().join("server.properties");
        let (admin, admin_password) = ADMIN;
        std::fs::write(
            &properties,
            format!(
                r#"process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listeners=CLIENT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=CLIENT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
controller.listener.names=CONTROLLER
inter.broker.listener.name=CLIENT
listener.security.protocol.map=CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
log.dirs={data}

# Clients authenticate with SCRAM-SHA-256; the broker talks to itself as the super user.
listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-256
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-256
listener.name.client.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="{admin}" password="{admin_password}";
# KRaft controllers do not take SCRAM: PLAIN, with the one user defined here.
listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="{admin}" password="{admin_password}" user_{admin}="{admin_password}";

authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:{admin}
allow.everyone.if.no.acl.found=false

default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
"#,
                data = dir.path().join("data").display(),
            ),
        )
        .unwrap();
        let logs = dir.path().join("logs");
        let t0 = Instant::now();
        let mut format = java(&libs, &logs);
        format
            .args(["kafka.tools.StorageTool", "format", "--standalone"])
            // Any 16 bytes in URL-safe base64 make a cluster id; the log is fresh every run.
            .args(["-t", "V2VpckFjbFRlc3RDbHVzdA", "-c"])
            .arg(&properties);
        for (user, password) in [ADMIN, WEIR, DENIED] {
            format.args([
                "--add-scram",
                &format!("SCRAM-SHA-256=[name={user},password={password}]"),
            ]);
        }
        let formatted = format.output().expect("run kafka.tools.StorageTool");
        assert!(
            formatted.status.success(),
            "formatting the broker's log failed: {}{}",
            String::from_utf8_lossy(&formatted.stdout),
            String::from_utf8_lossy(&formatted.stderr)
        );
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).unwrap();
        let child = java(&libs, &logs)
            .arg("kafka.Kafka")
            .arg(&properties)
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().unwrap())
            .stderr(stdout)
            .spawn()
            .expect("start the broker");
        let mut broker = Self {
            child,
            bootstrap,
            libs,
            dir,
        };
        broker.wait_until_ready().await;
        eprintln!(
            "secure broker on {} ready in {:.1} s (logs in {})",
            broker.bootstrap,
            t0.elapsed().as_secs_f64(),
            broker.dir.path().display()
        );
        broker
    }

    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + BROKER_START;
        let consumer: BaseConsumer = client_config(&self.admin()).create().unwrap();
        let consumer = std::sync::Arc::new(consumer);
        loop {
            let probe = consumer.clone();
            let ready = tokio::task::spawn_blocking(move || {
                probe
                    .fetch_metadata(None, Duration::from_secs(2))
                    .map(|metadata| !metadata.brokers().is_empty())
                    .unwrap_or(false)
            })
            .await
            .unwrap();
            if ready {
                return;
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the secure broker exited during start-up; logs in {}",
                self.dir.path().display()
            );
            assert!(
                Instant::now() < deadline,
                "the secure broker did not answer within {BROKER_START:?}; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn admin(&self) -> Vec<(String, String)> {
        admin_properties(&self.bootstrap)
    }

    /// Grant `acls` — (principal, resource type, name, operations) — as the super user, with
    /// Kafka's Admin client (`tests/kafka/KafkaAcls.java`); answers every ACL of the cluster.
    fn allow(&self, acls: &[(&str, &str, &str, &str)]) -> String {
        let mut command = java(&self.libs, &self.dir.path().join("logs"));
        command
            .arg(repo_root().join("tests/kafka/KafkaAcls.java"))
            .args([self.bootstrap.as_str(), ADMIN.0, ADMIN.1]);
        for (principal, kind, name, operations) in acls {
            command.args(["allow", principal, kind, name, operations]);
        }
        let output = command.output().expect("run KafkaAcls.java");
        assert!(
            output.status.success(),
            "granting ACLs failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

/// The `WEIR_KAFKA__SECURITY__*` settings of a host authenticating as `principal`.
fn security_env(scenario: &mut Scenario, (user, password): (&str, &str)) {
    scenario.set_env("WEIR_KAFKA__SECURITY__PROTOCOL", "sasl_plaintext");
    scenario.set_env("WEIR_KAFKA__SECURITY__SASL_MECHANISM", "SCRAM-SHA-256");
    scenario.set_env("WEIR_KAFKA__SECURITY__SASL_USERNAME", user);
    scenario.set_env("WEIR_KAFKA__SECURITY__SASL_PASSWORD", password);
}

/// Every record of `topic` (its values), read from the start by the super user until `count`
/// arrived or [`STEP`] passed.
async fn read_back(broker: &SecureBroker, topic: &str, count: usize) -> Vec<String> {
    let mut config: ClientConfig = client_config(&broker.admin());
    config
        .set("group.id", unique_name("readback"))
        .set("enable.auto.commit", "false");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            assignment
                .add_partition_offset(&topic, partition.id(), rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + STEP;
        let mut values = Vec::new();
        while values.len() < count && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(record)) => values.push(
                    String::from_utf8_lossy(record.payload().unwrap_or_default()).into_owned(),
                ),
                Some(Err(e)) => panic!("reading {topic} back: {e}"),
                None => {}
            }
        }
        values
    })
    .await
    .unwrap()
}

/// The binding's entry of `/health/details` of the host on `port`.
async fn binding_details(port: u16, binding: &str) -> serde_json::Value {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let Ok(response) = client
        .get(format!("http://127.0.0.1:{port}/health/details"))
        .send()
        .await
    else {
        return serde_json::Value::Null;
    };
    let details: serde_json::Value = response.json().await.unwrap_or_default();
    details["bindings"]
        .as_array()
        .and_then(|bindings| bindings.iter().find(|b| b["id"] == binding).cloned())
        .unwrap_or_default()
}

/// Wait until the binding's `/health/details` entry satisfies `accept`; answers it.
async fn wait_details(
    port: u16,
    binding: &str,
    what: &str,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + STEP;
    loop {
        let details = binding_details(port, binding).await;
        if accept(&details) {
            return details;
        }
        assert!(
            Instant::now() < deadline,
            "/health/details never showed {what} within {STEP:?}; last: {details}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_runs_with_least_privileges_and_names_a_missing_acl() {
    let t0 = Instant::now();
    let broker = SecureBroker::start().await;

    // A binding of `orders` on the secure broker; its output and DLQ topics exist (nothing is
    // created automatically there).
    let mut scenario = Scenario::deployed_on(broker.admin(), "acl_orders", 3).await;
    let dlq = format!("{}.dlq", scenario.input);
    create_topic(&broker.admin(), &scenario.output, 1).await;
    create_topic(&broker.admin(), &dlq, 1).await;
    let group = format!("weir.{}.orders", scenario.tenant);

    // Exactly the least privileges of docs/operators.md: READ implies DESCRIBE, and WRITE on a
    // topic lets the relay's idempotent producer start (no IDEMPOTENT_WRITE on the cluster).
    let weir = format!("User:{}", WEIR.0);
    let denied = format!("User:{}", DENIED.0);
    let acls = broker.allow(&[
        (&weir, "topic", &scenario.input, "READ"),
        (&weir, "group", &group, "READ"),
        (&weir, "topic", &scenario.output, "WRITE"),
        (&weir, "topic", &dlq, "WRITE"),
        (&denied, "topic", &scenario.output, "WRITE"),
        (&denied, "topic", &dlq, "WRITE"),
    ]);
    eprintln!("ACLs at {:.1} s:\n{acls}", t0.elapsed().as_secs_f64());

    // 30 orders over 6 customers, and 2 that are not orders (the DLQ's).
    scenario.produce(30, 6).await;
    let producer: FutureProducer = client_config(&broker.admin()).create().unwrap();
    for bad in ["{not an order", "[]"] {
        let record = FutureRecord::to(&scenario.input).key("c-bad").payload(bad);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    // 1. Least privileges: everything flows.
    security_env(&mut scenario, WEIR);
    let (mut host, port) = scenario.start_listening(1);
    let t1 = Instant::now();
    scenario.wait_for(30, &mut [&mut host.0], STEP).await;
    let deadline = Instant::now() + STEP;
    while scenario.dead_lettered().await < 2 {
        assert!(
            Instant::now() < deadline,
            "the 2 bad orders never reached the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = read_back(&broker, &scenario.output, 30).await;
    let dead = read_back(&broker, &dlq, 2).await;
    eprintln!(
        "as {}: 30 orders processed, {} events and {} DLQ records read back in {:.1} s",
        WEIR.0,
        events.len(),
        dead.len(),
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(events.len(), 30, "events on {}", scenario.output);
    assert_eq!(dead.len(), 2, "records on {dlq}");
    assert!(
        dead.iter().any(|value| value == "{not an order"),
        "{dead:?}"
    );
    // 30 events and 2 DLQ records went through the outbox.
    assert_eq!(scenario.verify().await, ((0, 0), (32, 32)));
    let details = binding_details(port, &scenario.binding_id).await;
    assert!(details["kafka_error"].is_null(), "{details}");
    scenario.terminate(&mut host);
    let log = std::fs::read_to_string(scenario.log(1)).unwrap();
    assert!(!log.contains("uthorization"), "host 1 met an ACL: {log}");

    // 2. Without READ on the input topic and the group: nothing is processed, and the host says
    //    why.
    scenario.produce(10, 6).await;
    security_env(&mut scenario, DENIED);
    let (mut host, port) = scenario.start_listening(2);
    let t2 = Instant::now();
    let details = wait_details(port, &scenario.binding_id, "a kafka_error", |d| {
        d["kafka_error"].is_string()
    })
    .await;
    let error = details["kafka_error"].as_str().unwrap().to_owned();
    eprintln!(
        "as {}: /health/details shows after {:.1} s: {error}",
        DENIED.0,
        t2.elapsed().as_secs_f64()
    );
    assert!(error.contains("authorization failed"), "{error}");
    assert!(
        error.contains(&group) || error.contains(&scenario.input),
        "{error}"
    );
    assert!(details["worker_running"] == true, "{details}");
    let log = std::fs::read_to_string(scenario.log(2)).unwrap();
    let logged: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("kafka denied access"))
        .collect();
    assert!(!logged.is_empty(), "no authorization error logged: {log}");
    eprintln!("host log: {}", logged[0]);
    assert!(
        logged.iter().all(|line| line.contains("ERROR")),
        "{logged:?}"
    );
    assert_eq!(
        scenario.processed().await,
        30,
        "the denied host processed something"
    );
    // One binding's missing ACL does not take the host (its admin API, other bindings) out.
    let (status, ready) = serve_support::readiness(port).await;
    eprintln!("/health/ready meanwhile: {status} {ready}");

    // 3. Granted what it lacked, the same host catches up; the error is gone.
    let t3 = Instant::now();
    broker.allow(&[
        (&denied, "topic", &scenario.input, "READ"),
        (&denied, "group", &group, "READ"),
    ]);
    scenario.wait_for(40, &mut [&mut host.0], STEP).await;
    wait_details(port, &scenario.binding_id, "no kafka_error", |d| {
        d["kafka_error"].is_null()
    })
    .await;
    eprintln!(
        "as {} with the ACLs granted: caught up in {:.1} s",
        DENIED.0,
        t3.elapsed().as_secs_f64()
    );
    scenario.terminate(&mut host);
    assert_eq!(scenario.verify().await, ((0, 0), (42, 42)));

    // 4. A wrong password: the same, said of the credentials; readiness names it too.
    scenario.set_env("WEIR_KAFKA__SECURITY__SASL_PASSWORD", "not-the-password");
    let (mut host, port) = scenario.start_listening(3);
    let t4 = Instant::now();
    let details = wait_details(port, &scenario.binding_id, "a kafka_error", |d| {
        d["kafka_error"].is_string()
    })
    .await;
    let error = details["kafka_error"].as_str().unwrap().to_owned();
    eprintln!(
        "with a wrong password: /health/details shows after {:.1} s: {error}",
        t4.elapsed().as_secs_f64()
    );
    assert!(error.contains("Authentication failed"), "{error}");
    assert!(error.contains("kafka.security"), "{error}");
    let (status, ready) =
        serve_support::wait_readiness(port, STEP, "down naming the credentials", |status, body| {
            status == 503
                && body["kafka"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("Authentication failed"))
        })
        .await;
    eprintln!(
        "/health/ready after {:.1} s: {status} {ready}",
        t4.elapsed().as_secs_f64()
    );
    scenario.terminate(&mut host);
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
}
