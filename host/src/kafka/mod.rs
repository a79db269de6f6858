//! Kafka: Weir's side of librdkafka.
//!
//! Owns every librdkafka client setting Weir makes ([`KafkaClientConfig`] for what the operator
//! configures, the producer's own settings in `producer.rs`), the conversion between Kafka
//! records and Weir's types (an [`OutboxRecord`] becomes a record with Weir's headers:
//! [`outbox_headers`]), librdkafka's logs (through `tracing`, [`LogContext`]), and the outbox
//! [`Relay`], which publishes the rows the store's outbox holds and marks them sent.
//!
//! Architecture invariant: this module knows no SQL. The relay reaches the outbox only through
//! the [`Store`](crate::store::Store) trait — claim, mark sent, mark failed, wait for a
//! notification — and never interprets a row beyond turning it into a record.
//!
//! Choices a caller can rely on:
//! * **Operator settings first, Weir's guarantees last.** [`KafkaClientConfig::client_config`]
//!   is the bootstrap servers, the typed security settings (`[kafka.security]`, translated in
//!   `security.rs` and nowhere else) and the operator's `client_overrides`, passed to
//!   librdkafka as they are (timeouts, further TLS options, …). Each client then adds what it
//!   owns; settings a client's guarantees depend on (the producer's `enable.idempotence`,
//!   `acks`, `message.timeout.ms`) cannot be overridden, nor can the typed security settings:
//!   such an override is refused when the configuration is validated or the client is built,
//!   never silently ignored.
//! * **One client configuration for all.** The bindings' consumers, the outbox relay's producer
//!   (which also publishes DLQ records) and the readiness probe all start from
//!   [`KafkaClientConfig::client_config`], so they authenticate as the same principal.
//! * **Weir's headers win.** A published outbox record carries `message-id` (the row's own id),
//!   `causation-id` (the causing message's id) and, when there is one, `traceparent`, in that
//!   order, followed by the handler's own headers in the handler's order, less any the handler
//!   named `message-id`, `causation-id` or `traceparent` (compared ignoring ASCII case), so a
//!   consumer never sees two of them.
//! * **Nothing blocks the executor.** Enqueuing a record never waits; flushing and destroying a
//!   producer run on the blocking pool.

mod producer;
mod relay;
pub mod security;

use std::collections::BTreeMap;

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use serde::Deserialize;

use crate::store::OutboxRecord;

pub use security::{SaslMechanism, SecurityConfig, SecurityProtocol};

pub use relay::{
    BACKOFF_MAX, BACKOFF_MIN, DEFAULT_BATCH, DEFAULT_DELIVERY_TIMEOUT, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_LEASE, DEFAULT_SWEEP_EVERY, REPORT_GRACE, Relay, RelaySettings, RelayStats,
};

/// Header holding a record's stable identity (SEMANTICS §1.2).
pub const MESSAGE_ID_HEADER: &str = "message-id";

/// Header holding the id of the message whose processing caused the record.
pub const CAUSATION_ID_HEADER: &str = "causation-id";

/// Header holding the W3C trace context of the causing message's trace.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// How Weir reaches the Kafka cluster: the part of the configuration every Kafka client of the
/// host (the bindings' consumers, the outbox relay, the DLQ producer) shares. Embedded in the
/// host's configuration as `[kafka]`.
///
/// ```toml
/// [kafka]
/// bootstrap_servers = "broker-1:9092,broker-2:9092"
///
/// [kafka.security]
/// protocol = "sasl_ssl"
/// sasl_mechanism = "SCRAM-SHA-512"
/// sasl_username = "weir"
/// sasl_password = "…"
///
/// [kafka.client_overrides]
/// "client.rack" = "eu-west-1a"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaClientConfig {
    /// The cluster's bootstrap servers, `host:port` separated by commas (librdkafka's
    /// `bootstrap.servers`).
    pub bootstrap_servers: String,
    /// Encryption and authentication (`[kafka.security]`).
    #[serde(default)]
    pub security: SecurityConfig,
    /// librdkafka properties passed to every client as they are (see librdkafka's
    /// `CONFIGURATION.md`). The properties `security` owns are refused, and properties a
    /// client's guarantees depend on are refused by that client.
    #[serde(default)]
    pub client_overrides: BTreeMap<String, String>,
}

/// Why a Kafka client could not be configured or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaConfigError {
    /// A setting is missing or out of range; `field` names it as the configuration file does.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The setting, e.g. `kafka.bootstrap_servers` or `relay.lease`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// librdkafka refused the configuration (an unknown property, a bad value) when the client
    /// was created.
    #[error("cannot create the kafka {client}: {source}")]
    Client {
        /// Which client, e.g. `outbox producer`.
        client: &'static str,
        /// librdkafka's explanation.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

impl KafkaClientConfig {
    /// A configuration for the cluster at `bootstrap_servers`, without overrides.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            security: SecurityConfig::default(),
            client_overrides: BTreeMap::new(),
        }
    }

    /// Check what librdkafka would only reject later, naming the field.
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(invalid(
                "kafka.bootstrap_servers",
                "must name at least one broker (host:port)",
            ));
        }
        for key in self.client_overrides.keys() {
            if key.trim().is_empty() {
                return Err(invalid(
                    "kafka.client_overrides",
                    "a property name is empty",
                ));
            }
            if key == "bootstrap.servers" || key == "metadata.broker.list" {
                return Err(invalid(
                    format!("kafka.client_overrides.{key:?}"),
                    "set kafka.bootstrap_servers instead",
                ));
            }
            if let Some(owner) = security::owner_of(key) {
                return Err(invalid(
                    format!("kafka.client_overrides.{key:?}"),
                    format!("set kafka.security.{owner} instead"),
                ));
            }
        }
        self.security.validate()
    }

    /// The librdkafka settings every client starts from: `bootstrap.servers`, the security
    /// settings and the overrides. Clients add their own settings on top.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in self.security.properties() {
            config.set(key, value);
        }
        for (key, value) in &self.client_overrides {
            config.set(key, value);
        }
        // librdkafka only produces the log lines at or above this level; `tracing` filters
        // further.
        config.set_log_level(RDKafkaLogLevel::Info);
        config
    }
}

/// A librdkafka client context that reports librdkafka's log lines and client errors through
/// `tracing` (target `librdkafka`), like the rest of the host, instead of the `log` crate.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // Mostly transport errors (a broker down, a connection refused), which librdkafka
        // retries on its own; the relay reports failed deliveries separately.
        tracing::warn!(target: "librdkafka", %error, "kafka client error: {reason}");
    }
}

/// Write one of librdkafka's log lines through `tracing` (target `librdkafka`), at the matching
/// level: what [`LogContext`] and the other clients' contexts do with them.
pub fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility, "{message}");
            }
        }
    }
}

/// Whether a librdkafka error means the brokers refused the client's credentials or its
/// principal's rights (an ACL is missing): errors librdkafka keeps retrying but that only an
/// operator can end.
pub fn is_access_denied(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        code,
        Code::TopicAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::DelegationTokenAuthorizationFailed
            | Code::SaslAuthenticationFailed
            | Code::Authentication
            | Code::UnsupportedSASLMechanism
    )
}

/// The headers an outbox record is published with, in order: `message-id`, `causation-id`,
/// `traceparent` (when the row has one), then the handler's headers except those three names
/// (compared ignoring ASCII case).
pub fn outbox_headers(record: &OutboxRecord) -> Vec<(&str, &[u8])> {
    let mut headers = Vec::with_capacity(record.headers.len() + 3);
    headers.push((MESSAGE_ID_HEADER, record.message_id.as_bytes()));
    headers.push((CAUSATION_ID_HEADER, record.causation_id.as_bytes()));
    if let Some(traceparent) = &record.traceparent {
        headers.push((TRACEPARENT_HEADER, traceparent.as_bytes()));
    }
    headers.extend(
        record
            .headers
            .iter()
            .filter(|header| !is_weir_header(&header.key))
            .map(|header| (header.key.as_str(), header.value.as_slice())),
    );
    headers
}

/// Whether `name` is one of the headers the host sets itself.
fn is_weir_header(name: &str) -> bool {
    [MESSAGE_ID_HEADER, CAUSATION_ID_HEADER, TRACEPARENT_HEADER]
        .iter()
        .any(|weir| name.eq_ignore_ascii_case(weir))
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> KafkaConfigError {
    KafkaConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Header;
    use crate::store::OutboxState;

    fn record(traceparent: Option<&str>, headers: &[(&str, &[u8])]) -> OutboxRecord {
        OutboxRecord {
            id: 7,
            message_id: "m-1".into(),
            tenant: "acme".into(),
            binding_id: Some("acme-orders".into()),
            topic: "orders.accepted".into(),
            key: Some(b"k".to_vec()),
            payload: b"p".to_vec(),
            headers: headers
                .iter()
                .map(|(key, value)| Header {
                    key: (*key).to_owned(),
                    value: value.to_vec(),
                })
                .collect(),
            causation_id: "cause-1".into(),
            traceparent: traceparent.map(str::to_owned),
            state: OutboxState::Pending,
            attempts: 0,
            last_error: None,
            created_at: chrono::Utc::now(),
            sent_at: None,
        }
    }

    #[test]
    fn weir_headers_come_first_and_replace_the_handlers_own() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let record = record(
            Some(traceparent),
            &[
                ("content-type", b"application/json"),
                ("Message-ID", b"forged"),
                ("raw", &[0x00, 0xff]),
                ("causation-id", b"forged"),
                ("TRACEPARENT", b"forged"),
                ("content-type", b"again"),
            ],
        );
        let expected: Vec<(&str, &[u8])> = vec![
            ("message-id", b"m-1"),
            ("causation-id", b"cause-1"),
            ("traceparent", traceparent.as_bytes()),
            ("content-type", b"application/json"),
            ("raw", &[0x00, 0xff]),
            ("content-type", b"again"),
        ];
        assert_eq!(outbox_headers(&record), expected);
    }

    #[test]
    fn traceparent_is_left_out_when_there_is_none() {
        let record = record(None, &[("traceparent", b"forged")]);
        let expected: Vec<(&str, &[u8])> =
            vec![("message-id", b"m-1"), ("causation-id", b"cause-1")];
        assert_eq!(outbox_headers(&record), expected);
    }

    #[test]
    fn client_config_is_bootstrap_plus_security_plus_overrides() {
        let mut kafka = KafkaClientConfig::new("127.0.0.1:9092");
        kafka
            .client_overrides
            .insert("client.rack".into(), "a".into());
        kafka.security = SecurityConfig {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("weir".into()),
            sasl_password: Some(crate::config::Secret::new("pw")),
            ..SecurityConfig::default()
        };
        kafka.validate().unwrap();
        let config = kafka.client_config();
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(config.get("client.rack"), Some("a"));
        assert_eq!(config.get("security.protocol"), Some("SASL_PLAINTEXT"));
        assert_eq!(config.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("weir"));
        assert_eq!(config.get("sasl.password"), Some("pw"));
        // librdkafka's own debug output leaves the password out.
        assert!(!format!("{config:?}").contains("\"pw\""));
        // Without a security section: plain text, said explicitly.
        let config = KafkaClientConfig::new("b:9092").client_config();
        assert_eq!(config.get("security.protocol"), Some("PLAINTEXT"));
    }

    #[test]
    fn overrides_of_security_settings_are_refused() {
        for (property, key) in [
            ("security.protocol", "kafka.security.protocol"),
            ("sasl.mechanism", "kafka.security.sasl_mechanism"),
            ("sasl.mechanisms", "kafka.security.sasl_mechanism"),
            ("sasl.password", "kafka.security.sasl_password"),
            ("ssl.key.location", "kafka.security.ssl_key_location"),
            (
                "ssl.endpoint.identification.algorithm",
                "kafka.security.ssl_endpoint_identification",
            ),
        ] {
            let mut kafka = KafkaClientConfig::new("b:9092");
            kafka.client_overrides.insert(property.into(), "x".into());
            let error = kafka.validate().unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("invalid kafka.client_overrides.{property:?}: ")),
                "{error}"
            );
            assert!(error.contains(&format!("set {key} instead")), "{error}");
        }
        // Further TLS options are not owned: they pass.
        let mut kafka = KafkaClientConfig::new("b:9092");
        kafka
            .client_overrides
            .insert("ssl.cipher.suites".into(), "ECDHE".into());
        kafka.validate().unwrap();
    }

    #[test]
    fn security_validation_is_part_of_the_client_configuration() {
        let mut kafka = KafkaClientConfig::new("b:9092");
        kafka.security.protocol = SecurityProtocol::SaslSsl;
        let error = kafka.validate().unwrap_err().to_string();
        assert!(
            error.starts_with("invalid kafka.security.sasl_mechanism: required"),
            "{error}"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let error = KafkaClientConfig::new(" ").validate().unwrap_err();
        assert!(
            error.to_string().contains("kafka.bootstrap_servers"),
            "{error}"
        );
        let mut kafka = KafkaClientConfig::new("b:9092");
        kafka
            .client_overrides
            .insert("bootstrap.servers".into(), "other:9092".into());
        let error = kafka.validate().unwrap_err();
        assert!(error.to_string().contains("bootstrap.servers"), "{error}");
    }

    #[test]
    fn config_parses_from_toml_and_refuses_unknown_fields() {
        let kafka: KafkaClientConfig = toml::from_str(
            "bootstrap_servers = \"b:9092\"\n[client_overrides]\n\"client.id\" = \"x\"\n",
        )
        .unwrap();
        assert_eq!(
            kafka.client_overrides.get("client.id").map(String::as_str),
            Some("x")
        );
        assert!(
            toml::from_str::<KafkaClientConfig>("bootstrap_servers = \"b\"\nlinger = 1\n").is_err()
        );
    }
}
