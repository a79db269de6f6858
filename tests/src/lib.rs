//! Shared helpers for the acceptance tests, which run against a real Kafka broker and a real
//! PostgreSQL server started by `tests/services up` (`tests/run` does that, then builds the
//! handler components and runs `cargo test`).
//!
//! This module owns three things: finding the services ([`services`]), naming the topics, groups
//! and tables a test creates so that tests can share one broker and one database
//! ([`unique_name`]), and finding the handler components built for `wasm32-wasip2`
//! ([`components_dir`], [`component`]).
//!
//! Acceptance tests fail, never skip, when the services or the components are missing: a test
//! that silently passes without a broker proves nothing. The panics say which command to run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use std::{env, fs, process};

/// Environment variable holding the Kafka bootstrap servers, e.g. `127.0.0.1:19092`.
pub const KAFKA_ENV: &str = "WEIR_TEST_KAFKA";

/// Environment variable holding the PostgreSQL URL, e.g.
/// `postgres://weir:weir@127.0.0.1:15432/weir`.
pub const DATABASE_URL_ENV: &str = "WEIR_TEST_DATABASE_URL";

/// Environment variable naming the state directory of `tests/services` (default
/// `<repo>/tests/.services`), in which `tests/services up` writes the `env` file.
pub const SERVICES_DIR_ENV: &str = "WEIR_SERVICES_DIR";

/// Target triple of handler components.
pub const COMPONENT_TARGET: &str = "wasm32-wasip2";

/// Where the test services listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Services {
    /// Kafka bootstrap servers (`bootstrap.servers`).
    pub kafka: String,
    /// PostgreSQL connection URL for the `weir` role and database.
    pub database_url: String,
}

/// The root of the repository (the workspace).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The state directory of `tests/services`: `$WEIR_SERVICES_DIR`, else `<repo>/tests/.services`.
pub fn services_dir() -> PathBuf {
    match env::var_os(SERVICES_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join("tests").join(".services"),
    }
}

/// The Kafka broker and PostgreSQL server to test against.
///
/// Each comes from its environment variable ([`KAFKA_ENV`], [`DATABASE_URL_ENV`]) if set, else
/// from the `env` file that `tests/services up` writes in [`services_dir`].
///
/// # Panics
///
/// When neither says where a service is, with a message telling the reader to run
/// `tests/services up`.
pub fn services() -> Services {
    let file = services_dir().join("env");
    let from_file = fs::read_to_string(&file).ok();
    let lookup = |name: &str| {
        env::var(name)
            .ok()
            .filter(|value| !value.is_empty())
            .or_else(|| {
                from_file
                    .as_deref()
                    .and_then(|text| env_file_value(text, name))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{name} is not set and {} does not define it: these acceptance tests need \
                     a real Kafka broker and PostgreSQL server; start them with \
                     `tests/services up` (or run everything with `tests/run`)",
                    file.display()
                )
            })
    };
    Services {
        kafka: lookup(KAFKA_ENV),
        database_url: lookup(DATABASE_URL_ENV),
    }
}

/// The value of `name` in an env file of `export NAME=value` (or `NAME=value`) lines.
fn env_file_value(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let value = line.strip_prefix(name)?.strip_prefix('=')?.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// A name no other test (in this run, or a concurrent or earlier one) uses: `prefix`, the process
/// id, the time and a counter, e.g. `orders_4242_1764189000123_7`.
///
/// The result has only lower-case ASCII letters, digits and `_` (other characters of `prefix`
/// become `_`), so it is both a valid Kafka topic or group name and an unquoted SQL identifier.
/// Keep `prefix` under 30 characters to stay within PostgreSQL's 63-byte identifiers.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let prefix: String = prefix
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{millis}_{n}", process::id())
}

/// A loopback port free at the time of asking (the OS picks it; the listener is closed again).
///
/// # Panics
///
/// If no loopback port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

/// Directory of the release builds of handler components:
/// `$CARGO_TARGET_DIR` (else `<repo>/target`) + `/wasm32-wasip2/release`.
///
/// A relative `CARGO_TARGET_DIR` is taken relative to the repository root.
pub fn components_dir() -> PathBuf {
    let target = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => repo_root().join(dir),
        _ => repo_root().join("target"),
    };
    target.join(COMPONENT_TARGET).join("release")
}

/// Path of the component built from the handler package `name` (e.g. `weir-handler-echo`, or its
/// file stem `weir_handler_echo`): `<components_dir>/<name with _ for ->.wasm`.
///
/// # Panics
///
/// When the file does not exist, with the command that builds it.
pub fn component(name: &str) -> PathBuf {
    let path = components_dir().join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "component {} not found: build it with `cargo build --release --target {COMPONENT_TARGET} \
         -p {}` (`tests/run` builds every handler)",
        path.display(),
        name.replace('_', "-"),
    );
    path
}

/// The `weir` binary next to the test executable (`<target>/<profile>/weir`). `cargo test` at
/// the workspace root (what `tests/run` does) builds it; `cargo test -p weir-acceptance` alone
/// does not, and may find an older one.
pub fn weir_binary() -> PathBuf {
    let exe = env::current_exe().unwrap_or_else(|e| panic!("path of the test executable: {e}"));
    let dir = exe.parent().and_then(Path::parent).unwrap_or_else(|| {
        panic!(
            "the test executable {} lives in <target>/<profile>/deps",
            exe.display()
        )
    });
    let binary = dir.join(format!("weir{}", env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build -p weir` (or run `cargo test` at the \
         workspace root, which builds it)",
        binary.display()
    );
    binary
}

/// In a Prometheus text exposition: the sum of the samples of `name` whose labels contain every one of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Create `topic` with `partitions` (replication 1) on the broker at `kafka`; panics if the
/// broker refuses (a test's set-up).
#[allow(clippy::unwrap_used)]
pub async fn create_topic(kafka: &str, topic: &str, partitions: i32) {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    for result in results {
        result.unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_values_are_found_with_or_without_export_and_quotes() {
        let text = "# written by tests/services\nexport WEIR_TEST_KAFKA=127.0.0.1:19092\n\
                    WEIR_TEST_DATABASE_URL=\"postgres://weir:weir@127.0.0.1:15432/weir\"\n";
        assert_eq!(
            env_file_value(text, KAFKA_ENV).as_deref(),
            Some("127.0.0.1:19092")
        );
        assert_eq!(
            env_file_value(text, DATABASE_URL_ENV).as_deref(),
            Some("postgres://weir:weir@127.0.0.1:15432/weir")
        );
        assert_eq!(env_file_value(text, "WEIR_TEST"), None);
        assert_eq!(env_file_value("export WEIR_TEST_KAFKA=\n", KAFKA_ENV), None);
    }

    #[test]
    fn unique_names_differ_and_are_plain_identifiers() {
        let a = unique_name("Orders-Topic.v1");
        let b = unique_name("Orders-Topic.v1");
        assert_ne!(a, b);
        assert!(a.starts_with("orders_topic_v1_"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{a}"
        );
        assert!(a.len() < 63, "{a}");
    }
}
