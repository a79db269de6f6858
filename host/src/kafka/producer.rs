//! The outbox producer: librdkafka's idempotent producer with Weir's settings, and the turning of
//! an outbox row into a Kafka record.
//!
//! Settings, and why:
//! * `enable.idempotence=true`, `acks=all`: the broker writes each record once per send, in
//!   order per partition, and acknowledges it only when every in-sync replica has it.
//!   Not overridable.
//! * `message.timeout.ms` = the relay's delivery timeout: a broker outage turns into failed
//!   deliveries (the relay marks the rows and retries them after their lease) rather than
//!   records waiting in memory forever. Not overridable (the relay's lease must outlast it).
//! * `linger.ms=5`, `compression.type=lz4` (librdkafka's built-in LZ4, no extra library),
//!   `client.id=weir-outbox-relay`: defaults an operator may override.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use super::{KafkaClientConfig, KafkaConfigError, LogContext, outbox_headers};
use crate::store::OutboxRecord;

/// Producer properties the outbox's guarantees depend on; an override of one is refused.
const OWNED: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
];

/// Producer properties Weir sets unless the operator overrode them: a short linger (5 ms) so a
/// batch of outbox rows leaves in few requests without delaying a lone row noticeably, LZ4
/// (cheap, and built into librdkafka), and a client id that names the relay in broker logs.
const DEFAULTS: &[(&str, &str)] = &[
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("client.id", "weir-outbox-relay"),
];

/// The librdkafka producer type the relay uses.
type Inner = FutureProducer<LogContext>;

/// The idempotent producer the relay publishes outbox rows with.
pub(crate) struct OutboxProducer {
    config: ClientConfig,
    inner: Inner,
}

impl OutboxProducer {
    /// Build the producer for `kafka`, failing deliveries that take longer than
    /// `delivery_timeout`. Does not connect: librdkafka connects in the background.
    pub(crate) fn new(
        kafka: &KafkaClientConfig,
        delivery_timeout: Duration,
    ) -> Result<Self, KafkaConfigError> {
        let config = producer_config(kafka, delivery_timeout)?;
        let inner = create(&config)?;
        Ok(Self { config, inner })
    }

    /// Enqueue `record` for publishing, without waiting. The future resolves with the
    /// delivery report (within the delivery timeout, or when the producer is dropped).
    pub(crate) fn enqueue(&self, record: &OutboxRecord) -> Result<DeliveryFuture, KafkaError> {
        let headers = outbox_headers(record).into_iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len() + 3),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        let mut kafka_record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic)
            .payload(record.payload.as_slice())
            .headers(headers);
        if let Some(key) = &record.key {
            kafka_record = kafka_record.key(key.as_slice());
        }
        self.inner
            .send_result(kafka_record)
            .map_err(|(error, _)| error)
    }

    /// librdkafka's fatal error, if the producer has hit one: it then fails every send, and
    /// only a new producer helps (for an idempotent producer, e.g. after the broker lost
    /// records it had acknowledged).
    pub(crate) fn fatal_error(&self) -> Option<String> {
        self.inner
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Replace the producer by a new one with the same settings; the old one is destroyed on
    /// the blocking pool (its undelivered records fail).
    pub(crate) fn recreate(&mut self) -> Result<(), KafkaConfigError> {
        let fresh = create(&self.config)?;
        let old = std::mem::replace(&mut self.inner, fresh);
        tokio::task::spawn_blocking(move || drop(old));
        Ok(())
    }

    /// Wait up to `timeout` for the records still queued to be delivered, then destroy the
    /// producer; both on the blocking pool. Returns librdkafka's error if records were left.
    pub(crate) async fn close(self, timeout: Duration) -> Result<(), KafkaError> {
        let inner = self.inner;
        tokio::task::spawn_blocking(move || {
            let flushed = inner.flush(timeout);
            drop(inner);
            flushed
        })
        .await
        .unwrap_or(Ok(()))
    }
}

/// The producer's librdkafka settings: the shared ones, Weir's overridable defaults, then the
/// settings Weir owns.
fn producer_config(
    kafka: &KafkaClientConfig,
    delivery_timeout: Duration,
) -> Result<ClientConfig, KafkaConfigError> {
    kafka.validate()?;
    if let Some(key) = kafka
        .client_overrides
        .keys()
        .find(|key| OWNED.contains(&key.as_str()))
    {
        return Err(KafkaConfigError::Invalid {
            field: format!("kafka.client_overrides.{key:?}"),
            reason: "the outbox producer sets it itself (its delivery guarantees depend on it)"
                .into(),
        });
    }
    let timeout_ms = u32::try_from(delivery_timeout.as_millis())
        .ok()
        .filter(|ms| (1..=i32::MAX.unsigned_abs()).contains(ms))
        .ok_or_else(|| KafkaConfigError::Invalid {
            field: "relay.delivery_timeout".into(),
            reason: format!("{delivery_timeout:?} is not between 1 ms and 24 days"),
        })?;
    let mut config = kafka.client_config();
    for (key, value) in DEFAULTS {
        if config.get(key).is_none() {
            config.set(*key, *value);
        }
    }
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout_ms.to_string());
    Ok(config)
}

fn create(config: &ClientConfig) -> Result<Inner, KafkaConfigError> {
    config
        .create_with_context(LogContext)
        .map_err(|source| KafkaConfigError::Client {
            client: "outbox producer",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weir_settings_are_applied_and_defaults_can_be_overridden() {
        let mut kafka = KafkaClientConfig::new("127.0.0.1:1");
        kafka
            .client_overrides
            .insert("linger.ms".into(), "50".into());
        let config = producer_config(&kafka, Duration::from_secs(20)).unwrap();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("message.timeout.ms"), Some("20000"));
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
    }

    #[test]
    fn overriding_a_guarantee_is_refused() {
        for key in ["acks", "enable.idempotence", "message.timeout.ms"] {
            let mut kafka = KafkaClientConfig::new("127.0.0.1:1");
            kafka.client_overrides.insert(key.into(), "0".into());
            let error = producer_config(&kafka, Duration::from_secs(20))
                .err()
                .unwrap();
            assert!(error.to_string().contains(key), "{error}");
        }
        let kafka = KafkaClientConfig::new("127.0.0.1:1");
        assert!(producer_config(&kafka, Duration::ZERO).is_err());
    }

    #[tokio::test]
    async fn the_producer_is_created_without_a_broker_and_unknown_properties_fail() {
        // librdkafka connects lazily: nothing listens on port 1, and creation still succeeds
        // (and LZ4 is available in this build).
        let kafka = KafkaClientConfig::new("127.0.0.1:1");
        let producer = OutboxProducer::new(&kafka, Duration::from_secs(1)).unwrap();
        assert!(producer.fatal_error().is_none());
        producer.close(Duration::ZERO).await.unwrap();

        // This build of librdkafka has TLS and SCRAM: both are accepted when the client is made.
        let mut kafka = KafkaClientConfig::new("127.0.0.1:1");
        kafka.security = crate::kafka::SecurityConfig {
            protocol: crate::kafka::SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(crate::kafka::SaslMechanism::ScramSha512),
            sasl_username: Some("weir".into()),
            sasl_password: Some(crate::config::Secret::new("pw")),
            ..crate::kafka::SecurityConfig::default()
        };
        let producer = OutboxProducer::new(&kafka, Duration::from_secs(1)).unwrap();
        producer.close(Duration::ZERO).await.unwrap();

        let mut kafka = KafkaClientConfig::new("127.0.0.1:1");
        kafka
            .client_overrides
            .insert("no.such.property".into(), "1".into());
        let error = OutboxProducer::new(&kafka, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(
            matches!(error, KafkaConfigError::Client { .. }),
            "{error:?}"
        );
    }
}
