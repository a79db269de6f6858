//! The whole configuration of a Weir host: `weir.toml`, overridden by `WEIR_*` environment
//! variables.
//!
//! Owns the sections that are not owned elsewhere — `[store]`, `[kafka]`, `[server]`,
//! `[pipeline]`, `[log]` — with their defaults (named constants that say where they come from)
//! and their validation, embeds `[runtime]` ([`RuntimeConfig`], owned by the runtime), and owns
//! how the file and the environment are combined ([`WeirConfig::load`]). Every section refuses
//! unknown keys, and [`WeirConfig::validate`] names the offending key in dotted form
//! (`pipeline.drain_deadline_ms`), cross-field rules included.
//!
//! Knows nothing of how the settings are used beyond opening the store
//! ([`StoreConfig::connect`], because the pool size is a setting): it never talks to Kafka, binds
//! a socket or installs a log subscriber.
//!
//! # Environment overrides
//!
//! `WEIR_<SECTION>__<KEY>=<value>` sets `<key>` of `[<section>]` (a double underscore separates
//! the section from the key; names are case-insensitive and taken in lower case), e.g.
//! `WEIR_STORE__URL`, `WEIR_KAFKA__BOOTSTRAP_SERVERS`, `WEIR_RUNTIME__DEADLINE_MS`. Nested
//! tables take one more double underscore per level: `WEIR_KAFKA__SECURITY__SASL_PASSWORD` sets
//! `sasl_password` of `[kafka.security]`. librdkafka properties go under
//! `WEIR_KAFKA__CLIENT_OVERRIDES__<PROPERTY>`, with `_` standing for `.`:
//! `WEIR_KAFKA__CLIENT_OVERRIDES__CLIENT_RACK` sets `client.rack` (librdkafka's property names
//! contain no underscores).
//!
//! A value is read as a TOML scalar when it is one (`100`, `true`, `0.5`, `"quoted text"`) and
//! as a string otherwise (`127.0.0.1:9092`, `json`); a scalar where the key takes a string is
//! taken as its text, exactly as written (a password `123456` or `1e3`). Quote a value to force
//! a string. The overrides are merged into the file's document before it is deserialized, and
//! each is first checked on its own, so an unknown key or a value of the wrong type in the
//! environment is refused exactly like one in the file, with a message naming the variable.
//!
//! Every other variable starting with `WEIR_` is an error (a single underscore,
//! `WEIR_STORE_URL`, is the usual typo), except the reserved ones ([`RESERVED_ENV`],
//! [`RESERVED_ENV_PREFIXES`]): `WEIR_LOG` (the log filter), the CLI's `WEIR_SERVER` and
//! `WEIR_TOKEN`, and the variables of the test and
//! build scripts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::kafka::{KafkaClientConfig, KafkaConfigError, SecurityConfig};
use crate::runtime::RuntimeConfig;
use crate::store::{PgStore, SqliteStore, Store, StoreError};

/// The configuration file read when none is named: `weir.toml` in the working directory, if
/// it exists.
pub const DEFAULT_CONFIG_FILE: &str = "weir.toml";

/// Prefix of the environment variables that override the configuration.
pub const ENV_PREFIX: &str = "WEIR_";

/// Separator between the section and the key (and between nested keys) in an override's name.
pub const ENV_SEPARATOR: &str = "__";

/// `WEIR_*` variables that are not configuration overrides: `WEIR_LOG` (the log filter, read
/// by the binary's tracing set-up), and the variables of `tests/services`, `tests/run` and the
/// handler build scripts.
pub const RESERVED_ENV: &[&str] = &[
    "WEIR_LOG",
    "WEIR_CACHE_DIR",
    "WEIR_COMPONENTS_DIR",
    "WEIR_KAFKA_PORT",
    "WEIR_KAFKA_CONTROLLER_PORT",
    "WEIR_SERVER",
    "WEIR_TOKEN",
];

/// Prefixes of `WEIR_*` variables that are not configuration overrides: the test harness
/// (`WEIR_TEST_*`, `WEIR_SERVICES_*`, `WEIR_PG_*`) and the benchmarks (`WEIR_BENCH_*`).
pub const RESERVED_ENV_PREFIXES: &[&str] =
    &["WEIR_TEST_", "WEIR_SERVICES_", "WEIR_PG_", "WEIR_BENCH_"];

// ---- [store] ----------------------------------------------------------------------------------

/// Default store: an SQLite file under `.weir/` in the working directory, the embedded mode
/// for development (`weir dev`). Production points this at PostgreSQL.
pub const DEFAULT_STORE_URL: &str = "sqlite://.weir/weir.db";
/// Default PostgreSQL pool size: 10 connections, the store's own default (a live outbox
/// listener holds one of them).
pub const DEFAULT_STORE_MAX_CONNECTIONS: u32 = 10;
/// How long a PostgreSQL operation waits for a free connection before the store counts as
/// unavailable: 10 s, the store's own default.
const STORE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[store]`: where Weir keeps handlers, bindings, processed keys, keyed state, the outbox and
/// the DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user:password@host:port/database` (or `postgresql://`), `sqlite://<path>`,
    /// `sqlite:<path>` or `sqlite::memory:`. A relative SQLite path is relative to the working
    /// directory; its directory is created if missing.
    pub url: String,
    /// Connections in the PostgreSQL pool. (SQLite uses a fixed pool: readers run in parallel,
    /// writers queue.)
    pub max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_STORE_URL.to_owned(),
            max_connections: DEFAULT_STORE_MAX_CONNECTIONS,
        }
    }
}

impl StoreConfig {
    /// Whether the store is PostgreSQL (else SQLite).
    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")
    }

    /// The URL with its password replaced by `***`, for messages and logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Open the store without applying migrations (`weir migrate` applies them itself).
    ///
    /// PostgreSQL: one connection is opened first, so that an unreachable server fails at once
    /// with its cause; the pool holds [`Self::max_connections`]. SQLite: the file (and its
    /// directory) is created if missing.
    pub async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        if self.is_postgres() {
            use sqlx::{ConnectOptions as _, Connection as _};
            let connect = |source| StoreError::from_sqlx("connect", source);
            let options = sqlx::postgres::PgConnectOptions::from_str(&self.url).map_err(connect)?;
            let probe = options.connect().await.map_err(connect)?;
            // The probe only proved the server is there; failing to say goodbye changes nothing.
            let _ = probe.close().await;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(self.max_connections)
                .acquire_timeout(STORE_ACQUIRE_TIMEOUT)
                .connect_lazy_with(options);
            Ok(Arc::new(PgStore::from_pool(pool)))
        } else if self.url.starts_with("sqlite:") {
            if let Some(dir) = sqlite_dir(&self.url) {
                tokio::fs::create_dir_all(&dir).await.map_err(|e| {
                    StoreError::Invalid(format!(
                        "store.url: cannot create directory {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            Ok(Arc::new(SqliteStore::connect(&self.url).await?))
        } else {
            Err(StoreError::Invalid(format!(
                "store.url: {}",
                unknown_scheme_message(&self.url)
            )))
        }
    }

    /// Open the store and apply the migrations it lacks (what the host and the admin commands
    /// do, like [`crate::store::connect`]).
    pub async fn connect(&self) -> Result<Arc<dyn Store>, StoreError> {
        let store = self.open().await?;
        store.migrate().await?;
        Ok(store)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let scheme_ok = self.is_postgres() || self.url.starts_with("sqlite:");
        if !scheme_ok {
            return Err(invalid("store.url", unknown_scheme_message(&self.url)));
        }
        if self.is_postgres() {
            sqlx::postgres::PgConnectOptions::from_str(&self.url)
                .map_err(|e| invalid("store.url", e.to_string()))?;
        } else if self.url == "sqlite://" || self.url == "sqlite:" {
            return Err(invalid("store.url", "the SQLite URL names no file"));
        }
        check(
            "store.max_connections",
            self.max_connections,
            1,
            1_000,
            "connections",
        )
    }
}

fn unknown_scheme_message(url: &str) -> String {
    let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
    format!(
        "unknown scheme {scheme:?} in {}; expected postgres://, postgresql:// or sqlite:",
        redact_url(url)
    )
}

/// The directory of an SQLite file URL, when there is one to create.
fn sqlite_dir(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" || url.contains("mode=memory") {
        return None;
    }
    Path::new(path)
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

/// `url` with the password of its user-info (`user:password@`) and any `password=` query
/// parameter replaced by `***`. Anything that does not look like a URL is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

// ---- [kafka] ----------------------------------------------------------------------------------

/// Default brokers: one on loopback at Kafka's standard port, for development.
pub const DEFAULT_BOOTSTRAP_SERVERS: &str = "127.0.0.1:9092";
/// Default consumer-group session timeout: 45 s, librdkafka's and Kafka's (KIP-735) default
/// `session.timeout.ms`.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// `[kafka]`: the brokers, the consumer-group session timeout, encryption and authentication
/// (`[kafka.security]`, owned by the Kafka module: [`SecurityConfig`]), and librdkafka
/// properties every client gets. [`Self::client_config`] turns it into the Kafka module's
/// [`KafkaClientConfig`], whose clients refuse overrides of the settings their guarantees
/// depend on (`enable.idempotence`, `acks`, …) and of the typed security settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list (`bootstrap.servers`).
    pub bootstrap_servers: String,
    /// Consumer-group session timeout in milliseconds (`session.timeout.ms`): a host that has
    /// not been heard of for this long loses its partitions.
    pub session_timeout_ms: u64,
    /// `[kafka.security]`: TLS, mutual TLS and SASL (PLAIN, SCRAM) for every client.
    pub security: SecurityConfig,
    /// Further librdkafka properties, passed as they are to every consumer and producer (e.g.
    /// `"client.rack" = "eu-west-1a"`). Numbers and booleans are passed as their text. The
    /// properties `[kafka.security]` owns (`security.protocol`, `sasl.*` and `ssl.*` ones it
    /// sets) are refused.
    #[serde(deserialize_with = "client_properties")]
    pub client_overrides: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: DEFAULT_BOOTSTRAP_SERVERS.to_owned(),
            session_timeout_ms: DEFAULT_SESSION_TIMEOUT.as_millis() as u64,
            security: SecurityConfig::default(),
            client_overrides: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The session timeout as a duration.
    pub fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.session_timeout_ms)
    }

    /// What every Kafka client of the host starts from: the bootstrap servers, the security
    /// settings and the overrides. (The session timeout is the consumers' own: see
    /// [`Self::session_timeout`].)
    pub fn client_config(&self) -> KafkaClientConfig {
        let mut client = KafkaClientConfig::new(self.bootstrap_servers.clone());
        client.security = self.security.clone();
        client.client_overrides = self.client_overrides.clone();
        client
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let servers: Vec<&str> = self.bootstrap_servers.split(',').map(str::trim).collect();
        if servers.iter().any(|server| server.is_empty()) {
            return Err(invalid(
                "kafka.bootstrap_servers",
                format!(
                    "{:?} has an empty entry; expected a comma-separated host:port list",
                    self.bootstrap_servers
                ),
            ));
        }
        check(
            "kafka.session_timeout_ms",
            self.session_timeout_ms,
            1,
            3_600_000,
            "ms",
        )?;
        if self.client_overrides.contains_key("session.timeout.ms") {
            return Err(invalid(
                "kafka.client_overrides.\"session.timeout.ms\"",
                "set kafka.session_timeout_ms instead (pipeline.drain_deadline_ms is checked \
                 against it)",
            ));
        }
        self.client_config().validate().map_err(|e| match e {
            KafkaConfigError::Invalid { field, reason } => invalid(field, reason),
            other => invalid("kafka", other.to_string()),
        })
    }
}

/// librdkafka takes every property as text; accept TOML strings, numbers and booleans.
fn client_properties<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Property {
        Text(String),
        Integer(i64),
        Float(f64),
        Bool(bool),
    }
    let properties = BTreeMap::<String, Property>::deserialize(deserializer)?;
    Ok(properties
        .into_iter()
        .map(|(name, value)| {
            let text = match value {
                Property::Text(text) => text,
                Property::Integer(n) => n.to_string(),
                Property::Float(x) => x.to_string(),
                Property::Bool(b) => b.to_string(),
            };
            (name, text)
        })
        .collect())
}

// ---- [server] ---------------------------------------------------------------------------------

/// Default address of the admin API, `/metrics` and `/health/*`: loopback port 8080, so that
/// nothing is exposed until an operator chooses to.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));

/// `[server]`: the HTTP server (admin API, metrics, health).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on, e.g. `0.0.0.0:8080` or `[::]:8080`.
    pub listen: SocketAddr,
    /// The platform admin token (at least 16 characters). Unset: no request acts as the admin
    /// (tenant tokens still work). Best set through `WEIR_SERVER__ADMIN_TOKEN`.
    pub admin_token: Option<Secret>,
    /// Largest handler upload accepted, in bytes.
    pub max_upload_bytes: u64,
    /// Handlers a tenant may have unless its own quota says otherwise.
    pub tenant_max_handlers: i64,
    /// Component bytes a tenant may store over all versions unless its own quota says otherwise.
    pub tenant_max_total_bytes: i64,
}

/// Default largest upload: 64 MiB, room for a Python handler built by componentize-py (about
/// 18 MB, CPython inside) with a wide margin.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 64 * 1024 * 1024;
/// Default handlers per tenant: 100.
pub const DEFAULT_TENANT_MAX_HANDLERS: i64 = 100;
/// Default component bytes per tenant: 2 GiB (about a hundred Python handler versions).
pub const DEFAULT_TENANT_MAX_TOTAL_BYTES: i64 = 2 * 1024 * 1024 * 1024;
/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            admin_token: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            tenant_max_handlers: DEFAULT_TENANT_MAX_HANDLERS,
            tenant_max_total_bytes: DEFAULT_TENANT_MAX_TOTAL_BYTES,
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(token) = &self.admin_token
            && token.expose().len() < MIN_ADMIN_TOKEN_LEN
        {
            return Err(invalid(
                "server.admin_token",
                format!("is shorter than {MIN_ADMIN_TOKEN_LEN} characters"),
            ));
        }
        check(
            "server.max_upload_bytes",
            self.max_upload_bytes,
            1024,
            1024 * 1024 * 1024,
            "bytes",
        )?;
        check(
            "server.tenant_max_handlers",
            self.tenant_max_handlers,
            1,
            1_000_000,
            "handlers",
        )?;
        check(
            "server.tenant_max_total_bytes",
            self.tenant_max_total_bytes,
            1024,
            1 << 50,
            "bytes",
        )
    }
}

/// A secret from the configuration: printed as `***`, compared by the caller.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

// ---- [pipeline] -------------------------------------------------------------------------------

/// Default largest group commit: 512 completions in one transaction. Large enough that commit
/// cost per message is small at high rates, small enough that one transaction stays short.
pub const DEFAULT_COMMIT_BATCH_MAX: u32 = 512;
/// Default time a group commit waits for more completions after the first: 5 ms, a small share
/// of the p50 < 50 ms objective.
pub const DEFAULT_COMMIT_LINGER: Duration = Duration::from_millis(5);
/// Default interval between two checks of the stored bindings (through the store's bindings
/// revision, so an idle check costs one query): 2 s, how long a deploy takes to reach every
/// host at most.
pub const DEFAULT_RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Default time a binding has to finish its in-flight messages and commit their offsets when it
/// stops or loses partitions: 20 s, comfortably inside the default session timeout (45 s), so
/// that the group does not evict the host while it drains.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// Default time a processed key is kept: 7 days, Kafka's default log retention, so a message
/// cannot be redelivered after its key is gone unless its topic keeps records longer.
pub const DEFAULT_PROCESSED_KEYS_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default interval between two sweeps of expired processed keys: 1 hour.
pub const DEFAULT_PROCESSED_KEYS_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// `[pipeline]`: group commit, binding reconciliation and draining.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Completions committed in one transaction at most.
    pub commit_batch_max: u32,
    /// Milliseconds a completion may wait for others while invocations are still running;
    /// with none running, or the batch full, the commit starts at once. 0 never waits.
    pub commit_linger_ms: u64,
    /// Milliseconds between two checks for changed bindings.
    pub reconcile_every_ms: u64,
    /// Milliseconds a stopping binding has to drain; shorter than `kafka.session_timeout_ms`.
    pub drain_deadline_ms: u64,
    /// Seconds a processed key is kept for duplicate detection; longer than any topic's
    /// retention, or a message redelivered after its key was swept runs again.
    pub processed_keys_retention_s: u64,
    /// Seconds between two sweeps of expired processed keys.
    pub processed_keys_sweep_every_s: u64,
    /// Let handlers' outbound HTTP reach loopback, private, link-local and other internal
    /// addresses. Off by default: a tenant's allowlist must not open the host's own network
    /// (its metrics port, a cloud metadata service) to its handler.
    pub http_allow_private_networks: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            commit_batch_max: DEFAULT_COMMIT_BATCH_MAX,
            commit_linger_ms: DEFAULT_COMMIT_LINGER.as_millis() as u64,
            reconcile_every_ms: DEFAULT_RECONCILE_EVERY.as_millis() as u64,
            drain_deadline_ms: DEFAULT_DRAIN_DEADLINE.as_millis() as u64,
            processed_keys_retention_s: DEFAULT_PROCESSED_KEYS_RETENTION.as_secs(),
            processed_keys_sweep_every_s: DEFAULT_PROCESSED_KEYS_SWEEP_EVERY.as_secs(),
            http_allow_private_networks: false,
        }
    }
}

impl PipelineConfig {
    /// The group-commit linger as a duration.
    pub fn commit_linger(&self) -> Duration {
        Duration::from_millis(self.commit_linger_ms)
    }

    /// The reconciliation interval as a duration.
    pub fn reconcile_every(&self) -> Duration {
        Duration::from_millis(self.reconcile_every_ms)
    }

    /// The drain deadline as a duration.
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_millis(self.drain_deadline_ms)
    }

    /// How long processed keys are kept, as a duration.
    pub fn processed_keys_retention(&self) -> Duration {
        Duration::from_secs(self.processed_keys_retention_s)
    }

    /// The sweep interval as a duration.
    pub fn processed_keys_sweep_every(&self) -> Duration {
        Duration::from_secs(self.processed_keys_sweep_every_s)
    }

    fn validate(&self, kafka: &KafkaConfig) -> Result<(), ConfigError> {
        check(
            "pipeline.commit_batch_max",
            self.commit_batch_max,
            1,
            100_000,
            "completions",
        )?;
        check(
            "pipeline.commit_linger_ms",
            self.commit_linger_ms,
            0,
            10_000,
            "ms",
        )?;
        check(
            "pipeline.reconcile_every_ms",
            self.reconcile_every_ms,
            100,
            3_600_000,
            "ms",
        )?;
        check(
            "pipeline.drain_deadline_ms",
            self.drain_deadline_ms,
            1,
            3_600_000,
            "ms",
        )?;
        check(
            "pipeline.processed_keys_retention_s",
            self.processed_keys_retention_s,
            1,
            10 * 365 * 24 * 3600,
            "s",
        )?;
        check(
            "pipeline.processed_keys_sweep_every_s",
            self.processed_keys_sweep_every_s,
            1,
            7 * 24 * 3600,
            "s",
        )?;
        if self.drain_deadline_ms >= kafka.session_timeout_ms {
            return Err(invalid(
                "pipeline.drain_deadline_ms",
                format!(
                    "{} ms is not shorter than kafka.session_timeout_ms ({} ms); the group would \
                     evict this host while it drains and hand its messages to another",
                    self.drain_deadline_ms, kafka.session_timeout_ms
                ),
            ));
        }
        Ok(())
    }
}

// ---- [log] ------------------------------------------------------------------------------------

/// Default log filter: `info` (tracing's `EnvFilter` syntax). `WEIR_LOG`, when set, wins.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[log]`: the host's own log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// Filter in tracing's `EnvFilter` syntax, e.g. `info` or `warn,weir::pipeline=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: DEFAULT_LOG_LEVEL.to_owned(),
        }
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.level.trim().is_empty() {
            return Err(invalid("log.level", "empty; expected e.g. `info`"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(drop)
            .map_err(|e| invalid("log.level", format!("{:?}: {e}", self.level)))
    }
}

// ---- the whole file ---------------------------------------------------------------------------

/// The whole configuration, `weir.toml`. Every key has a default, so an empty file (or none)
/// is a valid development configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WeirConfig {
    /// `[store]`: the database.
    pub store: StoreConfig,
    /// `[kafka]`: the brokers and librdkafka settings.
    pub kafka: KafkaConfig,
    /// `[runtime]`: the Wasm sandbox's limits.
    pub runtime: RuntimeConfig,
    /// `[server]`: the HTTP server.
    pub server: ServerConfig,
    /// `[pipeline]`: group commit, reconciliation, draining.
    pub pipeline: PipelineConfig,
    /// `[log]`: the host's log.
    pub log: LogConfig,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML, has an unknown key, or a value of the wrong
    /// type.
    #[error("invalid configuration file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and the key.
        message: String,
    },
    /// A `WEIR_*` environment variable is malformed, names an unknown key, or has a value of
    /// the wrong type.
    #[error("invalid environment variable {name}: {message}")]
    Env {
        /// The variable, e.g. `WEIR_STORE__URL`.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The dotted key, e.g. `pipeline.drain_deadline_ms`.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key of an out-of-range value.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn check<T>(field: &str, value: T, min: T, max: T, unit: &str) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if value < min || value > max {
        return Err(invalid(
            field,
            format!("{value} {unit} is out of range; allowed {min} to {max} {unit}"),
        ));
    }
    Ok(())
}

/// One `WEIR_<SECTION>__<KEY>` variable, understood.
struct Override {
    name: String,
    path: Vec<String>,
    value: toml::Value,
    /// The value as written.
    text: String,
}

impl WeirConfig {
    /// Read the configuration: the TOML file at `path` (none: every default), then the
    /// `WEIR_*` overrides among `env`, then [`Self::validate`].
    ///
    /// `env` is the process environment in the binary (`std::env::vars`); tests pass their own.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some((path, text))
            }
            None => None,
        };
        Self::from_parts(
            file.as_ref().map(|(path, text)| (*path, text.as_str())),
            env,
        )
    }

    /// [`Self::load`] from the file's text (`file` is its path, for messages, and its text).
    pub fn from_parts(
        file: Option<(&Path, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut document = match file {
            Some((path, text)) => {
                let file_error = |message: String| ConfigError::File {
                    path: path.to_path_buf(),
                    message,
                };
                // Deserialize the file alone first: its errors point at a line and a key.
                toml::from_str::<WeirConfig>(text).map_err(|e| file_error(e.to_string()))?;
                text.parse::<toml::Table>()
                    .map_err(|e| file_error(e.to_string()))?
            }
            None => toml::Table::new(),
        };
        for mut item in env_overrides(env)? {
            // Checked alone first, so that an unknown key or a wrong type names the variable.
            let alone = |value: toml::Value| {
                let mut alone = toml::Table::new();
                insert(&mut alone, &item.path, value);
                toml::Value::Table(alone).try_into::<WeirConfig>()
            };
            if let Err(e) = alone(item.value.clone()) {
                // A scalar where the key takes text (a password of digits): the text as written.
                let text = toml::Value::String(item.text.clone());
                if item.value.is_str() || alone(text.clone()).is_err() {
                    return Err(ConfigError::Env {
                        name: item.name.clone(),
                        message: format!("{}: {}", item.path.join("."), e.message()),
                    });
                }
                item.value = text;
            }
            if !insert(&mut document, &item.path, item.value) {
                return Err(ConfigError::Env {
                    message: format!(
                        "{} is not a table in the configuration file",
                        item.path[..item.path.len() - 1].join(".")
                    ),
                    name: item.name,
                });
            }
        }
        let config: WeirConfig =
            toml::Value::Table(document)
                .try_into()
                .map_err(|e| ConfigError::Env {
                    name: format!("{ENV_PREFIX}*"),
                    message: e.message().to_owned(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Check every value and the rules between them; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store.validate()?;
        self.kafka.validate()?;
        self.runtime
            .validate()
            .map_err(|e| invalid(format!("runtime.{}", e.field), e.message))?;
        self.server.validate()?;
        self.pipeline.validate(&self.kafka)?;
        self.log.validate()?;
        Ok(())
    }
}

/// Whether a `WEIR_*` variable belongs to someone else.
fn is_reserved(name: &str) -> bool {
    RESERVED_ENV.contains(&name)
        || RESERVED_ENV_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// The configuration overrides among `env`, sorted by variable name.
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<Override>, ConfigError> {
    let mut overrides = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if is_reserved(&name) {
            continue;
        }
        let malformed = |message: String| ConfigError::Env {
            name: name.clone(),
            message,
        };
        let segments: Vec<String> = rest.split(ENV_SEPARATOR).map(str::to_lowercase).collect();
        if segments.len() < 2 {
            return Err(malformed(format!(
                "not a configuration override: expected {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY> \
                 (a double underscore after the section, e.g. WEIR_STORE__URL)"
            )));
        }
        let well_formed = |segment: &String| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !segments.iter().all(well_formed) {
            return Err(malformed(format!(
                "expected {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>, with letters, digits and \
                 single underscores between the double ones"
            )));
        }
        let path =
            if segments[0] == "kafka" && segments[1] == "client_overrides" && segments.len() > 2 {
                // librdkafka's property names are dotted and have no underscores.
                let property = segments[2..].join("_").replace('_', ".");
                vec!["kafka".to_owned(), "client_overrides".to_owned(), property]
            } else {
                segments
            };
        overrides.push(Override {
            name,
            path,
            value: env_value(&value),
            text: value,
        });
    }
    overrides.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(overrides)
}

/// An override's value: a TOML scalar when it parses as one, else the text itself.
fn env_value(text: &str) -> toml::Value {
    match text.parse::<toml::Value>() {
        Ok(
            value @ (toml::Value::String(_)
            | toml::Value::Integer(_)
            | toml::Value::Float(_)
            | toml::Value::Boolean(_)),
        ) => value,
        _ => toml::Value::String(text.to_owned()),
    }
}

/// Set `path` in `table` to `value`, creating tables on the way; `false` when a value on the
/// way is not a table.
fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut table = table;
    for parent in parents {
        let entry = table
            .entry(parent.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(inner) => table = inner,
            _ => return false,
        }
    }
    table.insert(last.clone(), value);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{SaslMechanism, SecurityProtocol};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load(file: &str, vars: &[(&str, &str)]) -> Result<WeirConfig, ConfigError> {
        WeirConfig::from_parts(Some((Path::new("weir.toml"), file)), env(vars))
    }

    #[test]
    fn defaults_are_valid_and_match_the_documented_values() {
        let config = WeirConfig::default();
        config.validate().expect("defaults are valid");
        assert_eq!(config.store.url, "sqlite://.weir/weir.db");
        assert_eq!(config.kafka.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(config.kafka.session_timeout_ms, 45_000);
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.pipeline.commit_batch_max, 512);
        assert_eq!(config.pipeline.commit_linger_ms, 5);
        assert_eq!(config.pipeline.reconcile_every_ms, 2_000);
        assert_eq!(config.pipeline.drain_deadline_ms, 20_000);
        assert_eq!(config.log.format, LogFormat::Human);
        // No file and no environment: the defaults.
        assert_eq!(WeirConfig::load(None, Vec::new()).unwrap(), config);
        assert_eq!(load("", &[]).unwrap(), config);
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&WeirConfig::default()).unwrap();
        assert_eq!(load(&text, &[]).unwrap(), WeirConfig::default());
    }

    #[test]
    fn a_full_file_is_read() {
        let config = load(
            r#"
            [store]
            url = "postgres://weir:secret@db:5432/weir"
            max_connections = 20

            [kafka]
            bootstrap_servers = "k1:9092,k2:9092"
            session_timeout_ms = 30000

            [kafka.security]
            protocol = "sasl_ssl"
            sasl_mechanism = "SCRAM-SHA-512"
            sasl_username = "weir"
            sasl_password = "hunter2"

            [kafka.client_overrides]
            "client.rack" = "eu-west-1a"
            "queued.min.messages" = 1000
            "socket.keepalive.enable" = true

            [runtime]
            deadline_ms = 2000

            [server]
            listen = "0.0.0.0:9000"

            [pipeline]
            commit_batch_max = 100
            drain_deadline_ms = 10000

            [log]
            format = "json"
            level = "warn,weir=debug"
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(config.store.max_connections, 20);
        assert_eq!(config.kafka.security.protocol, SecurityProtocol::SaslSsl);
        assert_eq!(
            config.kafka.security.sasl_mechanism,
            Some(SaslMechanism::ScramSha512)
        );
        assert_eq!(config.kafka.client_overrides["client.rack"], "eu-west-1a");
        // The password reaches librdkafka but no debug output.
        let client = config.kafka.client_config().client_config();
        assert_eq!(client.get("sasl.password"), Some("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(config.kafka.client_overrides["queued.min.messages"], "1000");
        assert_eq!(
            config.kafka.client_overrides["socket.keepalive.enable"],
            "true"
        );
        assert_eq!(config.runtime.deadline_ms, 2_000);
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.pipeline.drain_deadline(), Duration::from_secs(10));
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused_by_name() {
        for (file, key) in [
            (
                "[pipeline]\ncommit_batch_maximum = 3\n",
                "commit_batch_maximum",
            ),
            ("[runtime]\ndeadlin_ms = 5\n", "deadlin_ms"),
            ("[stores]\nurl = \"sqlite::memory:\"\n", "stores"),
            ("listen = \"0.0.0.0:1\"\n", "listen"),
        ] {
            let err = load(file, &[]).expect_err(key);
            let text = err.to_string();
            assert!(matches!(err, ConfigError::File { .. }), "{text}");
            assert!(text.contains(key), "{text}");
            assert!(text.contains("weir.toml"), "{text}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let path = Path::new("/nonexistent/weir-config-test.toml");
        let err = WeirConfig::load(Some(path), Vec::new()).expect_err("missing file");
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains("weir-config-test.toml"), "{err}");
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let config = load(
            "[store]\nurl = \"sqlite://file.db\"\n[runtime]\ndeadline_ms = 100\n",
            &[
                ("WEIR_STORE__URL", "postgres://weir:pw@127.0.0.1:5432/weir"),
                ("WEIR_KAFKA__BOOTSTRAP_SERVERS", "10.0.0.1:9092"),
                ("WEIR_RUNTIME__DEADLINE_MS", "250"),
                ("WEIR_KAFKA__CLIENT_OVERRIDES__CLIENT_RACK", "eu-west-1a"),
                ("WEIR_KAFKA__CLIENT_OVERRIDES__QUEUED_MIN_MESSAGES", "1000"),
                ("WEIR_LOG__FORMAT", "json"),
                ("WEIR_SERVER__LISTEN", "0.0.0.0:8081"),
                ("weir_store__url", "ignored: lower-case prefix"),
                ("PATH", "/usr/bin"),
            ],
        )
        .unwrap();
        assert_eq!(config.store.url, "postgres://weir:pw@127.0.0.1:5432/weir");
        assert_eq!(config.kafka.bootstrap_servers, "10.0.0.1:9092");
        assert_eq!(config.runtime.deadline_ms, 250);
        assert_eq!(config.kafka.client_overrides["client.rack"], "eu-west-1a");
        assert_eq!(config.kafka.client_overrides["queued.min.messages"], "1000");
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.server.listen.port(), 8081);
    }

    #[test]
    fn security_settings_come_from_the_environment() {
        let config = load(
            "[kafka.security]\nprotocol = \"sasl_plaintext\"\nsasl_username = \"file-user\"\n",
            &[
                ("WEIR_KAFKA__SECURITY__PROTOCOL", "sasl_ssl"),
                ("WEIR_KAFKA__SECURITY__SASL_MECHANISM", "SCRAM-SHA-256"),
                ("WEIR_KAFKA__SECURITY__SASL_USERNAME", "weir"),
                // Digits, and a float's look: the text as written, not a number.
                ("WEIR_KAFKA__SECURITY__SASL_PASSWORD", "0123456"),
                ("WEIR_KAFKA__SECURITY__SSL_ENDPOINT_IDENTIFICATION", "false"),
            ],
        )
        .unwrap();
        let security = &config.kafka.security;
        assert_eq!(security.protocol, SecurityProtocol::SaslSsl);
        assert_eq!(security.sasl_mechanism, Some(SaslMechanism::ScramSha256));
        assert_eq!(security.sasl_username.as_deref(), Some("weir"));
        assert_eq!(
            security.sasl_password.as_ref().map(Secret::expose),
            Some("0123456")
        );
        assert!(!security.ssl_endpoint_identification);
        let config = load("", &[("WEIR_SERVER__ADMIN_TOKEN", "1.000000000000000000")]).unwrap();
        assert_eq!(
            config.server.admin_token.as_ref().map(Secret::expose),
            Some("1.000000000000000000")
        );
        // A number still refuses text, and an unknown security key is named.
        for (name, value, expect) in [
            (
                "WEIR_KAFKA__SESSION_TIMEOUT_MS",
                "soon",
                "session_timeout_ms",
            ),
            ("WEIR_KAFKA__SECURITY__SASL_USER", "weir", "sasl_user"),
            ("WEIR_KAFKA__SECURITY__PROTOCOL", "tls", "protocol"),
        ] {
            let err = load("", &[(name, value)]).expect_err(name);
            assert!(matches!(err, ConfigError::Env { .. }), "{err}");
            assert!(err.to_string().contains(expect), "{err}");
        }
    }

    #[test]
    fn security_rules_name_the_key() {
        for (file, vars, field) in [
            (
                "[kafka.security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\n",
                &[("WEIR_KAFKA__SECURITY__SASL_PASSWORD", "pw")][..],
                "kafka.security.sasl_username",
            ),
            (
                "[kafka.client_overrides]\n\"security.protocol\" = \"SASL_SSL\"\n",
                &[],
                "kafka.client_overrides.\"security.protocol\"",
            ),
            (
                "",
                &[("WEIR_KAFKA__CLIENT_OVERRIDES__SASL_USERNAME", "weir")][..],
                "kafka.client_overrides.\"sasl.username\"",
            ),
        ] {
            let err = load(file, vars).expect_err(field);
            assert_eq!(err.field(), Some(field), "{err}");
        }
        let err = load("[kafka.security]\nprotocol = \"sasl_plaintext\"\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "invalid kafka.security.sasl_mechanism: required when protocol is sasl_plaintext or sasl_ssl"
            ),
            "{err}"
        );
    }

    #[test]
    fn quoted_environment_values_are_strings() {
        let config = load("", &[("WEIR_LOG__LEVEL", "\"debug\"")]).unwrap();
        assert_eq!(config.log.level, "debug");
    }

    #[test]
    fn reserved_variables_are_ignored() {
        let config = load(
            "",
            &[
                ("WEIR_LOG", "debug"),
                ("WEIR_TEST_DATABASE_URL", "postgres://x"),
                ("WEIR_SERVICES_DIR", "/tmp"),
                ("WEIR_CACHE_DIR", "/tmp"),
                ("WEIR_BENCH_QUICK", "1"),
                ("WEIR_COMPONENTS_DIR", "/tmp"),
                ("WEIR_PG_PORT", "1"),
                ("WEIR_KAFKA_PORT", "1"),
            ],
        )
        .unwrap();
        assert_eq!(config, WeirConfig::default());
    }

    #[test]
    fn unknown_or_malformed_environment_variables_are_refused_by_name() {
        for (name, value, expect) in [
            ("WEIR_RUNTIME__DEADLIN_MS", "5", "deadlin_ms"),
            ("WEIR_STORES__URL", "sqlite::memory:", "stores"),
            ("WEIR_STORE_URL", "sqlite::memory:", "WEIR_STORE__URL"),
            ("WEIR_STORE__", "x", "WEIR_<SECTION>__<KEY>"),
            ("WEIR_RUNTIME__DEADLINE_MS", "soon", "deadline_ms"),
            ("WEIR_STORE__URL__HOST", "x", "store.url.host"),
        ] {
            let err = load("", &[(name, value)]).expect_err(name);
            let text = err.to_string();
            assert!(matches!(err, ConfigError::Env { .. }), "{text}");
            assert!(text.contains(name), "{text}");
            assert!(text.contains(expect), "{text}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("[store]\nurl = \"mysql://x\"\n", "store.url"),
            ("[store]\nmax_connections = 0\n", "store.max_connections"),
            (
                "[kafka]\nbootstrap_servers = \"a:1,,b:2\"\n",
                "kafka.bootstrap_servers",
            ),
            (
                "[kafka]\nsession_timeout_ms = 0\n",
                "kafka.session_timeout_ms",
            ),
            (
                "[kafka.client_overrides]\n\"bootstrap.servers\" = \"b:1\"\n",
                "kafka.client_overrides.\"bootstrap.servers\"",
            ),
            (
                "[kafka.client_overrides]\n\"session.timeout.ms\" = 6000\n",
                "kafka.client_overrides.\"session.timeout.ms\"",
            ),
            ("[runtime]\ndeadline_ms = 0\n", "runtime.deadline_ms"),
            (
                "[pipeline]\ncommit_batch_max = 0\n",
                "pipeline.commit_batch_max",
            ),
            (
                "[pipeline]\ncommit_linger_ms = 3600000\n",
                "pipeline.commit_linger_ms",
            ),
            (
                "[pipeline]\nreconcile_every_ms = 1\n",
                "pipeline.reconcile_every_ms",
            ),
            // The cross-field rule: draining must end before the group evicts the host.
            (
                "[pipeline]\ndrain_deadline_ms = 45000\n",
                "pipeline.drain_deadline_ms",
            ),
            (
                "[kafka]\nsession_timeout_ms = 10000\n",
                "pipeline.drain_deadline_ms",
            ),
            ("[log]\nlevel = \"\"\n", "log.level"),
        ];
        for (file, field) in cases {
            let err = load(file, &[]).expect_err(field);
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(
                err.to_string().starts_with(&format!("invalid {field}: ")),
                "{err}"
            );
        }
        // The same rule through the environment.
        let err = load("", &[("WEIR_PIPELINE__DRAIN_DEADLINE_MS", "50000")]).unwrap_err();
        assert_eq!(err.field(), Some("pipeline.drain_deadline_ms"), "{err}");
        assert!(
            err.to_string().contains("kafka.session_timeout_ms"),
            "{err}"
        );
    }

    #[test]
    fn values_of_the_wrong_type_are_refused() {
        let err = load("[server]\nlisten = \"everywhere\"\n", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");
        assert!(err.to_string().contains("listen"), "{err}");
        let err = load("", &[("WEIR_LOG__FORMAT", "xml")]).unwrap_err();
        assert!(err.to_string().contains("WEIR_LOG__FORMAT"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://weir:wrong@127.0.0.1:1/x"),
            "postgres://weir:***@127.0.0.1:1/x"
        );
        assert_eq!(
            redact_url("postgres://weir@db/x?sslmode=require&password=pw"),
            "postgres://weir@db/x?sslmode=require&password=***"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(
            redact_url("sqlite://.weir/weir.db"),
            "sqlite://.weir/weir.db"
        );
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
        let err = load("[store]\nurl = \"mysql://root:hunter2@db/x\"\n", &[]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn sqlite_directories_are_found() {
        assert_eq!(
            sqlite_dir("sqlite://.weir/weir.db"),
            Some(PathBuf::from(".weir"))
        );
        assert_eq!(
            sqlite_dir("sqlite:/tmp/a/b.db?mode=rwc"),
            Some(PathBuf::from("/tmp/a"))
        );
        assert_eq!(sqlite_dir("sqlite://weir.db"), None);
        assert_eq!(sqlite_dir("sqlite::memory:"), None);
    }
}
