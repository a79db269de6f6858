//! `[kafka.security]`: how every Kafka client of the host encrypts and authenticates — TLS,
//! mutual TLS, SASL PLAIN and SCRAM — as typed settings, and their translation into librdkafka
//! properties ([`SecurityConfig::properties`], the only place those properties are written).
//!
//! Owns the librdkafka properties listed in [`OWNED_PROPERTIES`]: `client_overrides` may not set
//! them (see [`KafkaClientConfig::validate`](super::KafkaClientConfig::validate)), so a setting
//! has one place and a typo cannot leave a client on plain text while the file says otherwise.
//! Other TLS and SASL properties of librdkafka (cipher suites, CRLs, PEM strings, …) still go
//! through `client_overrides`.
//!
//! Knows nothing of where the settings come from (the file, the environment) nor of the
//! clients that use them.
//!
//! ```toml
//! [kafka.security]
//! protocol = "sasl_ssl"
//! sasl_mechanism = "SCRAM-SHA-512"
//! sasl_username = "weir"
//! sasl_password = "…"            # better: WEIR_KAFKA__SECURITY__SASL_PASSWORD
//! ssl_ca_location = "/etc/weir/kafka-ca.pem"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{KafkaConfigError, invalid};
use crate::config::Secret;

/// How the clients talk to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No encryption, no authentication: development and closed networks only.
    #[default]
    Plaintext,
    /// TLS: the brokers are verified against `ssl_ca_location`; with a certificate and key the
    /// client authenticates too (mutual TLS).
    Ssl,
    /// SASL authentication without encryption: the credentials cross the network as they are
    /// with PLAIN (SCRAM never sends the password).
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name for it.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    /// The name in the configuration file.
    pub fn config_name(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the clients authenticate with SASL.
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    /// Whether the connections use TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

/// The SASL mechanism (librdkafka's `sasl.mechanisms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// The username and password themselves (use it over TLS only).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256 (RFC 7677): the password never crosses the network.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's (and Kafka's) name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Default for [`SecurityConfig::ssl_endpoint_identification`]: on, librdkafka's default since
/// 2.0 — a broker's certificate must name the host the client connected to.
pub const DEFAULT_SSL_ENDPOINT_IDENTIFICATION: bool = true;

/// The librdkafka properties [`SecurityConfig`] owns, each with the key of `[kafka.security]`
/// that sets it. `client_overrides` may not set them.
pub const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("security.protocol", "protocol"),
    ("sasl.mechanisms", "sasl_mechanism"),
    ("sasl.mechanism", "sasl_mechanism"),
    ("sasl.username", "sasl_username"),
    ("sasl.password", "sasl_password"),
    ("ssl.ca.location", "ssl_ca_location"),
    ("ssl.certificate.location", "ssl_certificate_location"),
    ("ssl.key.location", "ssl_key_location"),
    ("ssl.key.password", "ssl_key_password"),
    (
        "ssl.endpoint.identification.algorithm",
        "ssl_endpoint_identification",
    ),
];

/// `[kafka.security]`: encryption and authentication of every Kafka client of the host (the
/// bindings' consumers, the outbox relay's producer, which also publishes DLQ records, and the
/// readiness probe). Every key is optional; the default is plain text without authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl` (`security.protocol`).
    pub protocol: SecurityProtocol,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (`sasl.mechanisms`). Required with the
    /// `sasl_*` protocols, refused with the others.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// The SASL user: the principal (`User:<name>`) the brokers' ACLs name (`sasl.username`).
    /// Required with the `sasl_*` protocols.
    pub sasl_username: Option<String>,
    /// The SASL user's password (`sasl.password`); never printed. Required with the `sasl_*`
    /// protocols; best set through `WEIR_KAFKA__SECURITY__SASL_PASSWORD`.
    pub sasl_password: Option<Secret>,
    /// PEM file (or directory) of the certificate authorities that signed the brokers'
    /// certificates (`ssl.ca.location`). Unset: OpenSSL's default CA paths. TLS protocols only.
    pub ssl_ca_location: Option<PathBuf>,
    /// PEM file of the client's certificate, for mutual TLS (`ssl.certificate.location`); with
    /// `ssl_key_location`. TLS protocols only.
    pub ssl_certificate_location: Option<PathBuf>,
    /// PEM file of the client's private key, for mutual TLS (`ssl.key.location`); with
    /// `ssl_certificate_location`. TLS protocols only.
    pub ssl_key_location: Option<PathBuf>,
    /// Password of an encrypted private key (`ssl.key.password`); never printed. Only with
    /// `ssl_key_location`.
    pub ssl_key_password: Option<Secret>,
    /// Whether a broker's certificate must match its host name
    /// (`ssl.endpoint.identification.algorithm` `https`, else `none`). Default true; TLS
    /// protocols only.
    pub ssl_endpoint_identification: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            protocol: SecurityProtocol::default(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            ssl_endpoint_identification: DEFAULT_SSL_ENDPOINT_IDENTIFICATION,
        }
    }
}

/// The `[kafka.security]` key that owns the librdkafka property `property`, if one does.
pub fn owner_of(property: &str) -> Option<&'static str> {
    OWNED_PROPERTIES
        .iter()
        .find(|(name, _)| *name == property)
        .map(|(_, key)| *key)
}

fn field(key: &str) -> String {
    format!("kafka.security.{key}")
}

impl SecurityConfig {
    /// Check that the settings fit the protocol and each other, and that the files named exist;
    /// the error names the key (`kafka.security.sasl_username`).
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        let protocol = self.protocol;
        let sasl_set = [
            ("sasl_mechanism", self.sasl_mechanism.is_some()),
            ("sasl_username", self.sasl_username.is_some()),
            ("sasl_password", self.sasl_password.is_some()),
        ];
        if protocol.uses_sasl() {
            for (key, set) in sasl_set {
                if !set {
                    return Err(invalid(
                        field(key),
                        format!(
                            "required when protocol is sasl_plaintext or sasl_ssl (it is {})",
                            protocol.config_name()
                        ),
                    ));
                }
            }
            if self
                .sasl_username
                .as_deref()
                .is_some_and(|user| user.trim().is_empty())
            {
                return Err(invalid(field("sasl_username"), "is empty"));
            }
            if self
                .sasl_password
                .as_ref()
                .is_some_and(|password| password.expose().is_empty())
            {
                return Err(invalid(field("sasl_password"), "is empty"));
            }
        } else if let Some((key, _)) = sasl_set.iter().find(|(_, set)| *set) {
            return Err(invalid(
                field(key),
                format!(
                    "only used when protocol is sasl_plaintext or sasl_ssl (it is {})",
                    protocol.config_name()
                ),
            ));
        }

        let files = [
            ("ssl_ca_location", self.ssl_ca_location.as_deref()),
            (
                "ssl_certificate_location",
                self.ssl_certificate_location.as_deref(),
            ),
            ("ssl_key_location", self.ssl_key_location.as_deref()),
        ];
        let tls_set = files
            .iter()
            .map(|(key, path)| (*key, path.is_some()))
            .chain([("ssl_key_password", self.ssl_key_password.is_some())]);
        if !protocol.uses_tls() {
            if let Some((key, _)) = tls_set.clone().find(|(_, set)| *set) {
                return Err(invalid(
                    field(key),
                    format!(
                        "only used when protocol is ssl or sasl_ssl (it is {})",
                        protocol.config_name()
                    ),
                ));
            }
            return Ok(());
        }
        match (&self.ssl_certificate_location, &self.ssl_key_location) {
            (Some(_), None) => {
                return Err(invalid(
                    field("ssl_key_location"),
                    "required with ssl_certificate_location (mutual TLS needs the certificate \
                     and its private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    field("ssl_certificate_location"),
                    "required with ssl_key_location (mutual TLS needs the certificate and its \
                     private key)",
                ));
            }
            _ => {}
        }
        if self.ssl_key_password.is_some() && self.ssl_key_location.is_none() {
            return Err(invalid(
                field("ssl_key_password"),
                "only used with ssl_key_location",
            ));
        }
        for (key, path) in files {
            if let Some(path) = path {
                check_readable(key, path)?;
            }
        }
        Ok(())
    }

    /// The librdkafka properties for these settings — every one of [`OWNED_PROPERTIES`] that
    /// applies to the protocol, `security.protocol` always — in a fixed order. Call
    /// [`Self::validate`] first: a setting the protocol does not use is left out here.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = vec![(
            "security.protocol",
            self.protocol.librdkafka_name().to_owned(),
        )];
        if self.protocol.uses_sasl() {
            if let Some(mechanism) = self.sasl_mechanism {
                properties.push(("sasl.mechanisms", mechanism.name().to_owned()));
            }
            if let Some(user) = &self.sasl_username {
                properties.push(("sasl.username", user.clone()));
            }
            if let Some(password) = &self.sasl_password {
                properties.push(("sasl.password", password.expose().to_owned()));
            }
        }
        if self.protocol.uses_tls() {
            let paths = [
                ("ssl.ca.location", &self.ssl_ca_location),
                ("ssl.certificate.location", &self.ssl_certificate_location),
                ("ssl.key.location", &self.ssl_key_location),
            ];
            for (property, path) in paths {
                if let Some(path) = path {
                    properties.push((property, path.to_string_lossy().into_owned()));
                }
            }
            if let Some(password) = &self.ssl_key_password {
                properties.push(("ssl.key.password", password.expose().to_owned()));
            }
            let algorithm = if self.ssl_endpoint_identification {
                "https"
            } else {
                "none"
            };
            properties.push((
                "ssl.endpoint.identification.algorithm",
                algorithm.to_owned(),
            ));
        }
        properties
    }
}

/// A file setting must name something that exists, as UTF-8 (librdkafka takes text).
fn check_readable(key: &str, path: &Path) -> Result<(), KafkaConfigError> {
    if path.to_str().is_none() {
        return Err(invalid(
            field(key),
            format!("{} is not valid UTF-8", path.display()),
        ));
    }
    std::fs::metadata(path)
        .map(drop)
        .map_err(|e| invalid(field(key), format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl(protocol: SecurityProtocol) -> SecurityConfig {
        SecurityConfig {
            protocol,
            sasl_mechanism: Some(SaslMechanism::ScramSha256),
            sasl_username: Some("weir".into()),
            sasl_password: Some(Secret::new("s3cret")),
            ..SecurityConfig::default()
        }
    }

    fn props(config: &SecurityConfig) -> Vec<(&'static str, String)> {
        config.validate().expect("valid");
        config.properties()
    }

    fn pairs(list: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        list.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    #[test]
    fn the_default_is_plaintext_and_says_so() {
        assert_eq!(
            props(&SecurityConfig::default()),
            pairs(&[("security.protocol", "PLAINTEXT")])
        );
    }

    #[test]
    fn sasl_settings_become_librdkafka_properties() {
        assert_eq!(
            props(&sasl(SecurityProtocol::SaslPlaintext)),
            pairs(&[
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanisms", "SCRAM-SHA-256"),
                ("sasl.username", "weir"),
                ("sasl.password", "s3cret"),
            ])
        );
        let plain = SecurityConfig {
            sasl_mechanism: Some(SaslMechanism::Plain),
            ..sasl(SecurityProtocol::SaslSsl)
        };
        assert_eq!(
            props(&plain),
            pairs(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanisms", "PLAIN"),
                ("sasl.username", "weir"),
                ("sasl.password", "s3cret"),
                ("ssl.endpoint.identification.algorithm", "https"),
            ])
        );
    }

    #[test]
    fn mutual_tls_settings_become_librdkafka_properties() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "-----BEGIN-----").unwrap();
            path
        };
        let config = SecurityConfig {
            protocol: SecurityProtocol::Ssl,
            ssl_ca_location: Some(file("ca.pem")),
            ssl_certificate_location: Some(file("client.pem")),
            ssl_key_location: Some(file("client.key")),
            ssl_key_password: Some(Secret::new("keypass")),
            ssl_endpoint_identification: false,
            ..SecurityConfig::default()
        };
        let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        assert_eq!(
            props(&config),
            vec![
                ("security.protocol", "SSL".to_owned()),
                ("ssl.ca.location", path("ca.pem")),
                ("ssl.certificate.location", path("client.pem")),
                ("ssl.key.location", path("client.key")),
                ("ssl.key.password", "keypass".to_owned()),
                ("ssl.endpoint.identification.algorithm", "none".to_owned()),
            ]
        );
        // Every property written is one the section owns.
        for (property, _) in config.properties() {
            assert!(owner_of(property).is_some(), "{property}");
        }
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = SecurityConfig {
            ssl_key_password: Some(Secret::new("keypass")),
            ..sasl(SecurityProtocol::SaslSsl)
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(!printed.contains("keypass"), "{printed}");
    }

    #[test]
    fn invalid_settings_name_the_key() {
        let missing = std::path::PathBuf::from("/nonexistent/weir-test/ca.pem");
        let cases: Vec<(SecurityConfig, &str, &str)> = vec![
            (
                SecurityConfig {
                    sasl_username: None,
                    ..sasl(SecurityProtocol::SaslSsl)
                },
                "kafka.security.sasl_username",
                "required when protocol is sasl_plaintext or sasl_ssl",
            ),
            (
                SecurityConfig {
                    sasl_mechanism: None,
                    ..sasl(SecurityProtocol::SaslPlaintext)
                },
                "kafka.security.sasl_mechanism",
                "required",
            ),
            (
                SecurityConfig {
                    sasl_password: None,
                    ..sasl(SecurityProtocol::SaslPlaintext)
                },
                "kafka.security.sasl_password",
                "required",
            ),
            (
                SecurityConfig {
                    sasl_username: Some(" ".into()),
                    ..sasl(SecurityProtocol::SaslPlaintext)
                },
                "kafka.security.sasl_username",
                "empty",
            ),
            (
                sasl(SecurityProtocol::Ssl),
                "kafka.security.sasl_mechanism",
                "only used when protocol is sasl_plaintext or sasl_ssl (it is ssl)",
            ),
            (
                SecurityConfig {
                    ssl_ca_location: Some("/etc/ca.pem".into()),
                    ..sasl(SecurityProtocol::SaslPlaintext)
                },
                "kafka.security.ssl_ca_location",
                "only used when protocol is ssl or sasl_ssl (it is sasl_plaintext)",
            ),
            (
                SecurityConfig {
                    protocol: SecurityProtocol::Ssl,
                    ssl_certificate_location: Some("/etc/client.pem".into()),
                    ..SecurityConfig::default()
                },
                "kafka.security.ssl_key_location",
                "required with ssl_certificate_location",
            ),
            (
                SecurityConfig {
                    protocol: SecurityProtocol::Ssl,
                    ssl_key_location: Some("/etc/client.key".into()),
                    ..SecurityConfig::default()
                },
                "kafka.security.ssl_certificate_location",
                "required with ssl_key_location",
            ),
            (
                SecurityConfig {
                    protocol: SecurityProtocol::Ssl,
                    ssl_key_password: Some(Secret::new("x")),
                    ..SecurityConfig::default()
                },
                "kafka.security.ssl_key_password",
                "only used with ssl_key_location",
            ),
            (
                SecurityConfig {
                    protocol: SecurityProtocol::Ssl,
                    ssl_ca_location: Some(missing),
                    ..SecurityConfig::default()
                },
                "kafka.security.ssl_ca_location",
                "cannot read /nonexistent/weir-test/ca.pem",
            ),
        ];
        for (config, key, reason) in cases {
            let error = config.validate().expect_err(key);
            let text = error.to_string();
            assert!(text.starts_with(&format!("invalid {key}: ")), "{text}");
            assert!(text.contains(reason), "{text}");
        }
    }

    #[test]
    fn parses_from_toml_and_refuses_unknown_keys() {
        let config: SecurityConfig = toml::from_str(
            "protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n\
             sasl_username = \"weir\"\nsasl_password = \"pw\"\n\
             ssl_endpoint_identification = false\n",
        )
        .unwrap();
        assert_eq!(config.protocol, SecurityProtocol::SaslSsl);
        assert_eq!(config.sasl_mechanism, Some(SaslMechanism::ScramSha512));
        assert_eq!(
            config.sasl_password.as_ref().map(Secret::expose),
            Some("pw")
        );
        assert!(!config.ssl_endpoint_identification);
        for bad in [
            "protocol = \"SASL_SSL\"\n",
            "sasl_mechanism = \"GSSAPI\"\n",
            "sasl_user = \"weir\"\n",
        ] {
            assert!(toml::from_str::<SecurityConfig>(bad).is_err(), "{bad}");
        }
    }
}
