//! What the `weir serve` acceptance tests (`cable_cut.rs`, `scaling.rs`,
//! `postgres_restart.rs`, `metrics.rs`, and `hot_swap_replay.rs`, which produces its own orders after
//! [`Scenario::deployed`], and `kafka_acl.rs`, on a broker of its own: [`Scenario::deployed_on`])
//! share: a scenario — a fresh input topic, the `orders` handler
//! deployed through the real binary, N orders over K customers produced to the real broker —,
//! `weir serve` processes to start and kill, and the end-of-run check that every per-key
//! counter is exact (0 lost, 0 doubled) and the outbox holds one record per message.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Row;
use weir_acceptance::{component, services, unique_name, weir_binary};

/// A `weir serve` process, killed when dropped (a failed test leaves none behind).
pub struct Host(pub Child);

impl std::ops::Deref for Host {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One run: a binding of `orders` to a fresh topic, its messages, and where to look.
pub struct Scenario {
    pub tenant: String,
    pub binding_id: String,
    /// The topic the binding consumes.
    pub input: String,
    /// The topic `orders` emits its events to.
    pub output: String,
    pub messages: usize,
    pub expected: HashMap<String, i64>,
    pub pool: sqlx::PgPool,
    /// The store URL of this scenario (its own schema of the test database).
    pub database_url: String,
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// librdkafka properties of the test's own clients (creating topics, producing):
    /// `bootstrap.servers` and, on a secured broker, a super user's credentials.
    kafka: Vec<(String, String)>,
}

/// The test broker of `tests/services`, reached without credentials.
pub fn shared_kafka() -> Vec<(String, String)> {
    vec![("bootstrap.servers".to_owned(), services().kafka)]
}

/// A librdkafka configuration with `properties`.
pub fn client_config(properties: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(key, value);
    }
    config
}

/// Create `topic` with `partitions` on the broker `kafka` names.
pub async fn create_topic(kafka: &[(String, String)], topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create().unwrap();
    for result in admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

impl Scenario {
    /// Create the topic (`partitions`), deploy `orders`, produce `messages` orders over `keys`
    /// customers.
    pub async fn new(prefix: &str, partitions: i32, messages: usize, keys: usize) -> Self {
        let mut scenario = Self::deployed(prefix, partitions).await;
        scenario.produce(messages, keys).await;
        scenario
    }

    /// Produce `count` more orders over `keys` customers (order numbers go on from those
    /// produced before), adding them to what [`Self::verify`] expects.
    pub async fn produce(&mut self, count: usize, keys: usize) {
        let producer: FutureProducer = client_config(&self.kafka)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .create()
            .unwrap();
        let mut sends = Vec::with_capacity(count);
        for i in self.messages..self.messages + count {
            let customer = format!("c-{}", i % keys);
            *self.expected.entry(customer.clone()).or_default() += 1;
            let payload = format!(
                r#"{{"order_id":"o-{i}","customer":"{customer}","amount_cents":{}}}"#,
                100 + i
            );
            let record = FutureRecord::to(&self.input)
                .key(&customer)
                .payload(&payload);
            sends.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for send in sends {
            send.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
        self.messages += count;
    }

    /// Create the topic (`partitions`) and deploy `orders` (version 1) to it, producing
    /// nothing: the caller produces and fills in `messages` and `expected`.
    pub async fn deployed(prefix: &str, partitions: i32) -> Self {
        Self::deployed_on(shared_kafka(), prefix, partitions).await
    }

    /// [`Self::deployed`] on the broker `kafka` names (its `bootstrap.servers` and what the
    /// test's own clients need to reach it); the hosts get its bootstrap servers, and whatever
    /// else they need through [`Self::set_env`].
    pub async fn deployed_on(kafka: Vec<(String, String)>, prefix: &str, partitions: i32) -> Self {
        let services = services();
        let bootstrap = kafka
            .iter()
            .find(|(key, _)| key == "bootstrap.servers")
            .map(|(_, value)| value.clone())
            .expect("bootstrap.servers");
        let input = unique_name(prefix);
        create_topic(&kafka, &input, partitions).await;
        let tenant = unique_name("t");
        // A schema of its own: the hosts of this scenario run only its binding, not every
        // binding earlier tests left in the shared database.
        let schema = unique_name("scenario");
        let shared = sqlx::PgPool::connect(&services.database_url).await.unwrap();
        // `unique_name` yields only [a-z0-9_], so splicing it into SQL is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&shared)
            .await
            .unwrap();
        shared.close().await;
        let base = &services.database_url;
        let separator = if base.contains('?') { '&' } else { '?' };
        let database_url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        let env = vec![
            ("WEIR_STORE__URL".to_owned(), database_url.clone()),
            ("WEIR_KAFKA__BOOTSTRAP_SERVERS".to_owned(), bootstrap),
            (
                "WEIR_PIPELINE__RECONCILE_EVERY_MS".to_owned(),
                "500".to_owned(),
            ),
            ("WEIR_RUNTIME__POOL_INSTANCES".to_owned(), "32".to_owned()),
        ];
        let scenario = Self {
            binding_id: format!("{tenant}.orders"),
            tenant,
            output: format!("{input}.accepted"),
            input,
            messages: 0,
            expected: HashMap::new(),
            pool: sqlx::PgPool::connect(&database_url).await.unwrap(),
            database_url,
            dir: tempfile::tempdir().unwrap(),
            env,
            kafka,
        };
        scenario.deploy();
        scenario
    }

    /// Another tenant in this scenario's schema: a fresh topic (`partitions`) and `orders`
    /// deployed to it for a new tenant, so that the hosts of either scenario run both bindings
    /// (they share a host). Its own log directory; messages produced with its
    /// [`Self::produce`].
    pub async fn another_tenant(&self, prefix: &str, partitions: i32) -> Self {
        let input = unique_name(prefix);
        create_topic(&self.kafka, &input, partitions).await;
        let tenant = unique_name("t");
        let scenario = Self {
            binding_id: format!("{tenant}.orders"),
            tenant,
            output: format!("{input}.accepted"),
            input,
            messages: 0,
            expected: HashMap::new(),
            pool: self.pool.clone(),
            database_url: self.database_url.clone(),
            dir: tempfile::tempdir().unwrap(),
            env: self.env.clone(),
            kafka: self.kafka.clone(),
        };
        scenario.deploy();
        scenario
    }

    /// Deploy `orders` (its next version) for this scenario's tenant, bound to its input.
    fn deploy(&self) {
        let (input, output) = (&self.input, &self.output);
        let scenario = self;
        let orders = component("weir_handler_orders");
        let deploy = scenario
            .command()
            .args([
                "handler",
                "deploy",
                orders.to_str().unwrap(),
                "--tenant",
                &scenario.tenant,
                "--name",
                "orders",
            ])
            .args([
                "--topic",
                input,
                "--output-topic",
                output,
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
    }

    /// Set an environment variable for every host started from now on (a `WEIR_*` setting).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

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

    /// The log file of host `n`.
    pub fn log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("serve-{n}.log"))
    }

    /// Start `weir serve` number `n` (its log goes to [`Self::log`]). The process is killed if
    /// the test ends (or fails) without stopping it.
    pub fn start(&self, n: usize) -> Host {
        self.start_listening(n).0
    }

    /// [`Self::start`], also answering the port its HTTP server (`/health`, `/metrics`, the
    /// admin API) listens on, at 127.0.0.1.
    pub fn start_listening(&self, n: usize) -> (Host, u16) {
        let port = weir_acceptance::free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(n))
            .unwrap();
        self.command()
            .arg("serve")
            .env("WEIR_LOG", "info")
            .env("WEIR_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(|child| (Host(child), port))
            .expect("start weir serve")
    }

    /// Messages processed so far (processed-key rows of the binding).
    pub async fn processed(&self) -> usize {
        loop {
            match sqlx::query("SELECT count(*) AS n FROM processed_key_ids WHERE binding_id = $1")
                .bind(&self.binding_id)
                .fetch_one(&self.pool)
                .await
            {
                Ok(row) => return row.get::<i64, _>("n") as usize,
                // The database may be down on purpose: wait for it.
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Wait until `count` messages are processed, checking that `children` keep running.
    pub async fn wait_for(&self, count: usize, children: &mut [&mut Child], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.processed().await;
            if done >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out at {done} of {count}; logs in {}",
                self.dir.path().display()
            );
            for child in children.iter_mut() {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "weir serve exited; logs in {}",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop a host with SIGTERM and check it drained and exited 0.
    pub fn terminate(&self, child: &mut Child) {
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "weir serve exited with {status} after SIGTERM"
        );
    }

    /// (lost, doubled) over every key's counter, and (outbox records, distinct ids).
    pub async fn verify(&self) -> ((i64, i64), (i64, i64)) {
        let mut lost = 0i64;
        let mut doubled = 0i64;
        for (customer, count) in &self.expected {
            let row = sqlx::query(
                "SELECT value FROM keyed_state WHERE tenant = $1 AND handler = 'orders' AND key = $2 AND name = 'orders'",
            )
            .bind(&self.tenant)
            .bind(customer.as_bytes())
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            let value: i64 = row.map_or(0, |row| {
                serde_json::from_slice(&row.get::<Vec<u8>, _>("value")).unwrap()
            });
            lost += (count - value).max(0);
            doubled += (value - count).max(0);
        }
        let row = sqlx::query("SELECT count(*) AS n, count(DISTINCT message_id) AS ids FROM outbox WHERE binding_id = $1")
            .bind(&self.binding_id)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        (
            (lost, doubled),
            (row.get::<i64, _>("n"), row.get::<i64, _>("ids")),
        )
    }

    /// DLQ entries of the binding.
    pub async fn dead_lettered(&self) -> i64 {
        sqlx::query("SELECT count(*) AS n FROM dlq_entries WHERE binding_id = $1")
            .bind(&self.binding_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .get::<i64, _>("n")
    }
}

/// `GET /health/ready` of the host listening on `port`: the status and the JSON body (`Null`
/// when the host did not answer).
pub async fn readiness(port: u16) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    match client
        .get(format!("http://127.0.0.1:{port}/health/ready"))
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.json().await.unwrap_or(serde_json::Value::Null);
            (status, body)
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// Poll `/health/ready` until `accept` holds for its answer, or panic after `timeout`; answers
/// that last answer.
pub async fn wait_readiness(
    port: u16,
    timeout: Duration,
    what: &str,
    accept: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = readiness(port).await;
        if accept(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "/health/ready never became {what} within {timeout:?}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether a `/health/ready` body names `component` as down.
pub fn names_down(body: &serde_json::Value, component: &str) -> bool {
    body["down"]
        .as_array()
        .is_some_and(|down| down.iter().any(|d| d == component))
}
