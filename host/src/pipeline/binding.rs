//! A binding's policy: which topics a handler consumes, with which consumer group, ordering,
//! concurrency, retries, limits, output topics and settings.
//!
//! Owns the serialized form (stored by the store as an opaque JSON document, edited through
//! the CLI and, later, the admin API) and its validation, which names the offending field.
//! Knows nothing of how the policy is enforced.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

use crate::outbound::HttpPolicy;

use super::breaker::BreakerPolicy;
use super::dispatch::Ordering;
use super::retry::RetryPolicy;

/// Default messages in flight per binding: 64. Enough parallelism across keys to hide a handler
/// that waits on I/O, small enough that a slow dependency is not hammered.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Largest `max_in_flight` accepted: 10 000.
pub const MAX_MAX_IN_FLIGHT: usize = 10_000;

/// Longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// A binding's policy, as stored and edited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingSpec {
    /// Owning tenant.
    pub tenant: String,
    /// Handler name (its active version runs).
    pub handler: String,
    /// Topics consumed.
    pub topics: Vec<String>,
    /// Consumer group; default `weir.<tenant>.<handler>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Ordering of messages (default: per key).
    #[serde(default)]
    pub ordering: Ordering,
    /// Messages in flight at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Retry policy (default: 4 attempts, 1 s, 2 s, 5 s, ±20 %).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Circuit breaker (default: opens after 5 consecutive failures for 60 s, closes after 2
    /// successful probes). Absent in specs stored before breakers existed: the defaults.
    #[serde(default)]
    pub breaker: BreakerPolicy,
    /// Topics the handler may emit to. Empty: none.
    #[serde(default)]
    pub output_topics: Vec<String>,
    /// Settings the handler reads through the `config` import.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Invocation deadline override, milliseconds (default: the runtime's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Topic dead-lettered messages are published to; default `<first topic>.dlq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_topic: Option<String>,
    /// Outbound HTTP granted to the handler (`wasi:http/outgoing-handler`): the hosts it may
    /// call, timeouts, the response cap and each destination's breaker. Absent: none; a
    /// handler importing `wasi:http` then cannot run under this binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpPolicy>,
}

fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}

/// A binding setting that is invalid. `field` is the setting's key, dotted for nested ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid binding {field}: {message}")]
pub struct BindingError {
    /// The offending key, e.g. `max_in_flight` or `retry.backoff_ms`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> BindingError {
    BindingError {
        field: field.into(),
        message: message.into(),
    }
}

/// Names of tenants and handlers: 1–64 characters from `[a-z0-9_-]`, starting with a letter or
/// digit, so they can be used in group ids, topic names and paths without escaping.
pub fn check_name(field: &str, name: &str) -> Result<(), BindingError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{name}` must be 1-64 characters of a-z, 0-9, `-`, `_`, starting with a letter or digit"
            ),
        ))
    }
}

/// Longest binding id.
pub const MAX_BINDING_ID_LEN: usize = 255;

/// Binding ids: 1–255 characters of `a-z`, `0-9`, `.`, `_`, `-`, starting with a letter or
/// digit (the default `<tenant>.<name>` always is one).
pub fn check_binding_id(id: &str) -> Result<(), BindingError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_BINDING_ID_LEN
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(BindingError {
            field: "binding_id".to_owned(),
            message: format!(
                "`{id}` must be 1-{MAX_BINDING_ID_LEN} characters of a-z, 0-9, `.`, `_`, `-`, \
                 starting with a letter or digit"
            ),
        })
    }
}

fn check_topic(field: &str, topic: &str) -> Result<(), BindingError> {
    let ok = !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{topic}` is not a valid Kafka topic name (1-249 characters of a-z, A-Z, 0-9, `.`, `_`, `-`)"
            ),
        ))
    }
}

impl BindingSpec {
    /// A binding of `handler` to `topics` with every default.
    pub fn new(tenant: impl Into<String>, handler: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            tenant: tenant.into(),
            handler: handler.into(),
            topics,
            group_id: None,
            ordering: Ordering::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            output_topics: Vec::new(),
            config: BTreeMap::new(),
            deadline_ms: None,
            dlq_topic: None,
            http: None,
        }
    }

    /// The consumer group: the configured one, or `weir.<tenant>.<handler>`.
    pub fn group_id(&self) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("weir.{}.{}", self.tenant, self.handler))
    }

    /// The DLQ topic: the configured one, or `<first input topic>.dlq`.
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic.clone().unwrap_or_else(|| {
            format!(
                "{}.dlq",
                self.topics.first().map(String::as_str).unwrap_or("weir")
            )
        })
    }

    /// `max_in_flight` as the scheduler wants it.
    pub fn max_in_flight(&self) -> NonZeroUsize {
        NonZeroUsize::new(self.max_in_flight).unwrap_or(NonZeroUsize::MIN)
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), BindingError> {
        check_name("tenant", &self.tenant)?;
        check_name("handler", &self.handler)?;
        if self.topics.is_empty() {
            return Err(invalid("topics", "at least one input topic is required"));
        }
        for topic in &self.topics {
            check_topic("topics", topic)?;
        }
        if let Some(group) = &self.group_id
            && (group.is_empty() || group.len() > 255)
        {
            return Err(invalid("group_id", "must be 1-255 characters"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_MAX_IN_FLIGHT {
            return Err(invalid(
                "max_in_flight",
                format!(
                    "{} is out of range; allowed 1 to {MAX_MAX_IN_FLIGHT}",
                    self.max_in_flight
                ),
            ));
        }
        self.retry
            .validate()
            .map_err(|e| invalid(format!("retry.{}", e.field), e.message))?;
        self.breaker
            .validate()
            .map_err(|e| invalid(format!("breaker.{}", e.field), e.message))?;
        for topic in &self.output_topics {
            check_topic("output_topics", topic)?;
            if self.topics.contains(topic) {
                return Err(invalid(
                    "output_topics",
                    format!(
                        "`{topic}` is also an input topic; a handler emitting to its own input would loop"
                    ),
                ));
            }
        }
        if let Some(deadline) = self.deadline_ms
            && !(1..=15 * 60 * 1000).contains(&deadline)
        {
            return Err(invalid(
                "deadline_ms",
                format!("{deadline} ms is out of range; allowed 1 to 900000 ms"),
            ));
        }
        if let Some(dlq) = &self.dlq_topic {
            check_topic("dlq_topic", dlq)?;
        }
        if let Some(http) = &self.http {
            http.validate()
                .map_err(|e| invalid(format!("http.{}", e.field), e.message))?;
        }
        for (name, value) in &self.config {
            if name.is_empty() || name.len() > 256 {
                return Err(invalid(
                    "config",
                    format!("setting name `{name}` must be 1-256 characters"),
                ));
            }
            // A setting that names a topic tells the handler where to emit: it must be one the
            // binding allows, or every emit would be refused at run time.
            if name.ends_with("topic") && !self.output_topics.contains(value) {
                return Err(invalid(
                    format!("config.{name}"),
                    format!(
                        "names topic `{value}`, which is not among output_topics {:?}; the handler could not emit to it",
                        self.output_topics
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_that_names_a_topic_must_name_an_allowed_one() {
        let mut s = spec();
        s.config
            .insert("output-topic".into(), "orders.accepted".into());
        assert!(s.validate().is_ok());
        s.config.insert("output-topic".into(), "elsewhere".into());
        assert_eq!(s.validate().unwrap_err().field, "config.output-topic");
    }

    fn spec() -> BindingSpec {
        let mut spec = BindingSpec::new("acme", "orders", vec!["orders".into()]);
        spec.output_topics = vec!["orders.accepted".into()];
        spec
    }

    #[test]
    fn defaults_are_valid_and_derived_names_follow_the_tenant_and_handler() {
        let spec = spec();
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.group_id(), "weir.acme.orders");
        assert_eq!(spec.dlq_topic(), "orders.dlq");
        assert_eq!(spec.retry.max_attempts, 4);
    }

    #[test]
    fn bad_fields_are_named() {
        type Mutation = fn(&mut BindingSpec);
        let cases: Vec<(&str, Mutation)> = vec![
            ("tenant", |s| s.tenant = "Acme Corp".into()),
            ("handler", |s| s.handler = String::new()),
            ("topics", |s| s.topics.clear()),
            ("topics", |s| s.topics = vec!["bad topic".into()]),
            ("max_in_flight", |s| s.max_in_flight = 0),
            ("retry.max_attempts", |s| s.retry.max_attempts = 0),
            ("breaker.failure_threshold", |s| {
                s.breaker.failure_threshold = 0
            }),
            ("breaker.success_threshold", |s| {
                s.breaker.success_threshold = 0
            }),
            ("breaker.open_for_ms", |s| s.breaker.open_for_ms = 10),
            ("output_topics", |s| s.output_topics = vec!["orders".into()]),
            ("deadline_ms", |s| s.deadline_ms = Some(0)),
            ("dlq_topic", |s| s.dlq_topic = Some(String::new())),
            ("http.allow", |s| {
                s.http = Some(HttpPolicy::allowing(Vec::<String>::new()))
            }),
            ("http.allow[0]", |s| {
                s.http = Some(HttpPolicy::allowing(["https://api.example.com"]))
            }),
            ("http.timeout_ms", |s| {
                let mut http = HttpPolicy::allowing(["api.example.com"]);
                http.timeout_ms = 0;
                s.http = Some(http)
            }),
        ];
        for (field, mutate) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn a_spec_stored_before_breakers_parses_with_the_default_breaker() {
        let spec: BindingSpec =
            serde_json::from_str(r#"{"tenant":"a","handler":"b","topics":["t"]}"#).unwrap();
        assert_eq!(spec.breaker, BreakerPolicy::default());
        let err = serde_json::from_str::<BindingSpec>(
            r#"{"tenant":"a","handler":"b","topics":["t"],"breaker":{"threshold":3}}"#,
        )
        .expect_err("unknown breaker field accepted");
        assert!(err.to_string().contains("threshold"), "{err}");
    }

    #[test]
    fn json_round_trips_and_refuses_unknown_fields() {
        let spec = spec();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(serde_json::from_value::<BindingSpec>(json).unwrap(), spec);
        let err = serde_json::from_str::<BindingSpec>(
            r#"{"tenant":"a","handler":"b","topics":["t"],"max_inflight":3}"#,
        )
        .expect_err("unknown field accepted");
        assert!(err.to_string().contains("max_inflight"), "{err}");
    }
}
