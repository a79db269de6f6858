//! A binding's retry policy (SEMANTICS §3): how often a failed message is retried, how long it
//! waits between attempts, and when it goes to the dead-letter queue.
//!
//! Owns the `retry` section of a binding's policy — its defaults, its validation and its
//! serialized form — and the decision taken after each failed attempt. Knows nothing of
//! timers, queues or the DLQ itself: [`RetryPolicy::decide`] returns a [`Decision`] and the caller
//! waits (holding the message's dispatch ticket, so only its key waits) or dead-letters.
//!
//! Only the handler's own failures come here. When PostgreSQL or Kafka is unavailable the host
//! backs off and pauses instead; such failures never count as attempts and never dead-letter.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default number of attempts, the first included: 4 — the first try plus one retry per default
/// backoff step (product RFC: "1 s → 2 s → 5 s, then DLQ").
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Default waits before attempts 2, 3 and 4: 1 s, 2 s, 5 s (product RFC default, SEMANTICS §3).
pub const DEFAULT_BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
];
/// Default jitter: ±20 % of each wait, so that messages that failed together (a downstream
/// outage) do not all retry in the same instant.
pub const DEFAULT_JITTER: f64 = 0.2;

/// Upper bound on `max_attempts`: a typo guard, not a recommendation. A retrying message holds
/// its key, so long retry chains stall that key.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1_000;
/// Upper bound on one backoff step: one day (a typo guard, e.g. seconds given as milliseconds
/// the other way round).
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 60 * 60);

/// Why an attempt failed, as far as retrying is concerned. The runtime's
/// [`crate::runtime::ErrorKind`] converts into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth another attempt after backoff: a retryable handler error, or the deadline.
    Retryable,
    /// Never worth another attempt: a permanent handler error, a trap, a refused effect, or a
    /// message that cannot be decoded.
    Permanent,
}

impl From<crate::runtime::ErrorKind> for FailureKind {
    fn from(kind: crate::runtime::ErrorKind) -> Self {
        match kind {
            crate::runtime::ErrorKind::Retryable => FailureKind::Retryable,
            crate::runtime::ErrorKind::Permanent => FailureKind::Permanent,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then run the message again. Its key stays occupied meanwhile.
    RetryAfter(Duration),
    /// Stop: write a DLQ entry.
    DeadLetter,
}

/// The retry section of a binding's policy. Every field has a default (the `DEFAULT_*`
/// constants); [`Self::validate`] before use.
///
/// Serialized as `{ "max_attempts": 4, "backoff_ms": [1000, 2000, 5000], "jitter": 0.2 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retries.
    pub max_attempts: u32,
    /// Wait before attempt 2, 3, …; attempts beyond the list wait as long as its last entry.
    /// Serialized as `backoff_ms`, in whole milliseconds.
    #[serde(rename = "backoff_ms", with = "millis")]
    #[schema(value_type = Vec<u64>)]
    pub backoff: Vec<Duration>,
    /// Each wait is drawn uniformly from `[d·(1 − jitter), d·(1 + jitter)]`; in `[0, 1)`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: DEFAULT_BACKOFF.to_vec(),
            jitter: DEFAULT_JITTER,
        }
    }
}

/// A retry setting that is out of range. `field` is the configuration key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry.{field}: {message}")]
pub struct RetryPolicyError {
    /// The offending key, e.g. `backoff_ms`.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn invalid(field: &'static str, message: String) -> RetryPolicyError {
    RetryPolicyError { field, message }
}

impl RetryPolicy {
    /// Refuse zero, empty and absurd values, naming the field. (Negative delays cannot be
    /// represented; deserializing one fails, naming `backoff_ms`.)
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(invalid(
                "max_attempts",
                format!(
                    "{} is out of range; allowed 1 (no retries) to {MAX_ATTEMPTS_LIMIT}",
                    self.max_attempts
                ),
            ));
        }
        if self.backoff.is_empty() {
            return Err(invalid(
                "backoff_ms",
                "the list is empty; give at least one wait (set max_attempts = 1 for no retries)"
                    .to_owned(),
            ));
        }
        if self.backoff.len() > MAX_ATTEMPTS_LIMIT as usize {
            return Err(invalid(
                "backoff_ms",
                format!(
                    "{} entries; allowed at most {MAX_ATTEMPTS_LIMIT}",
                    self.backoff.len()
                ),
            ));
        }
        if let Some((index, wait)) = self
            .backoff
            .iter()
            .enumerate()
            .find(|(_, wait)| **wait > MAX_BACKOFF)
        {
            return Err(invalid(
                "backoff_ms",
                format!(
                    "entry {index} is {} ms; allowed at most {} ms (one day)",
                    wait.as_millis(),
                    MAX_BACKOFF.as_millis()
                ),
            ));
        }
        if !(self.jitter.is_finite() && (0.0..1.0).contains(&self.jitter)) {
            return Err(invalid(
                "jitter",
                format!(
                    "{} is out of range; allowed 0 (none) up to, not including, 1",
                    self.jitter
                ),
            ));
        }
        Ok(())
    }

    /// What to do after attempt number `attempt` (1 for the first try) failed with `kind`:
    /// permanent failures dead-letter at once; retryable ones retry until `max_attempts`
    /// attempts have been made. The wait is jittered with a sample from `rng`.
    pub fn decide(&self, attempt: u32, kind: FailureKind, rng: &mut JitterRng) -> Decision {
        self.decide_with(attempt, kind, rng.next_unit())
    }

    /// [`Self::decide`] with the jitter sample given: `unit` in `[0, 1)` picks the wait within
    /// the jitter range (0 the shortest, 0.5 the nominal one).
    pub fn decide_with(&self, attempt: u32, kind: FailureKind, unit: f64) -> Decision {
        match kind {
            FailureKind::Permanent => Decision::DeadLetter,
            FailureKind::Retryable if attempt >= self.max_attempts => Decision::DeadLetter,
            FailureKind::Retryable => Decision::RetryAfter(self.backoff_after(attempt, unit)),
        }
    }

    /// The wait after attempt `attempt` failed (before attempt `attempt + 1`), jittered by
    /// `unit` in `[0, 1)`. Attempt 0 counts as 1. Never panics, even on an unvalidated policy.
    pub fn backoff_after(&self, attempt: u32, unit: f64) -> Duration {
        jittered(self.nominal_backoff_after(attempt), self.jitter, unit)
    }

    /// The nominal (unjittered) wait after attempt `attempt` failed: the list's entry for it, or
    /// its last entry beyond the list (zero for an empty list, which `validate` refuses).
    pub fn nominal_backoff_after(&self, attempt: u32) -> Duration {
        let step = attempt.saturating_sub(1) as usize;
        self.backoff
            .get(step)
            .or_else(|| self.backoff.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}

/// `base` moved by up to `±jitter·base`, uniformly by `unit`. Exact integer nanoseconds for
/// waits up to a hundred days, so the result is always within the bounds.
fn jittered(base: Duration, jitter: f64, unit: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let base_ns = base.as_nanos() as f64;
    let span = (base_ns * jitter).floor();
    let offset = ((2.0 * unit - 1.0) * span).round();
    // `as` saturates: never panics, whatever the input.
    Duration::from_nanos((base_ns + offset).max(0.0) as u64)
}

/// A small, fast random source for jitter (SplitMix64). Not cryptographic; one per task, no
/// locks. Seed it for deterministic tests.
#[derive(Debug, Clone)]
pub struct JitterRng {
    state: u64,
}

impl JitterRng {
    /// A generator with a fixed seed: the same seed gives the same waits.
    pub fn seeded(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded from the process's hash randomness (distinct per call).
    pub fn from_entropy() -> Self {
        Self::seeded(RandomState::new().hash_one(0x5eed_u64))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform sample in `[0, 1)`.
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for JitterRng {
    fn default() -> Self {
        Self::from_entropy()
    }
}

/// `Vec<Duration>` as a list of whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        waits: &[Duration],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            waits
                .iter()
                .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        // Read signed numbers so that a negative wait gets an error naming the field rather
        // than serde's generic "invalid value".
        let values = Vec::<i64>::deserialize(deserializer)?;
        values
            .into_iter()
            .map(|ms| {
                u64::try_from(ms).map(Duration::from_millis).map_err(|_| {
                    D::Error::custom(format!(
                        "invalid retry.backoff_ms: {ms} is negative; waits are milliseconds, 0 or more"
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_are_the_rfc_defaults() {
        let p = RetryPolicy::default();
        p.validate().unwrap();
        assert_eq!(p.max_attempts, 4);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "max_attempts": 4, "backoff_ms": [1000, 2000, 5000], "jitter": 0.2 })
        );
        // Attempt 1 fails → wait 1 s; 2 → 2 s; 3 → 5 s; 4 → DLQ.
        let waits: Vec<_> = (1..=4)
            .map(|attempt| p.decide_with(attempt, FailureKind::Retryable, 0.5))
            .collect();
        assert_eq!(
            waits,
            [
                Decision::RetryAfter(Duration::from_secs(1)),
                Decision::RetryAfter(Duration::from_secs(2)),
                Decision::RetryAfter(Duration::from_secs(5)),
                Decision::DeadLetter,
            ]
        );
    }

    #[test]
    fn permanent_failures_dead_letter_at_once() {
        let p = RetryPolicy::default();
        let mut rng = JitterRng::seeded(1);
        assert_eq!(
            p.decide(1, FailureKind::Permanent, &mut rng),
            Decision::DeadLetter
        );
        assert_eq!(
            FailureKind::from(crate::runtime::ErrorKind::Permanent),
            FailureKind::Permanent
        );
        assert_eq!(
            FailureKind::from(crate::runtime::ErrorKind::Retryable),
            FailureKind::Retryable
        );
    }

    #[test]
    fn beyond_the_list_the_last_wait_repeats() {
        let p = RetryPolicy {
            max_attempts: 10,
            backoff: vec![Duration::from_millis(100), Duration::from_millis(300)],
            jitter: 0.0,
        };
        p.validate().unwrap();
        let waits: Vec<_> = (1..=4).map(|a| p.backoff_after(a, 0.9)).collect();
        assert_eq!(waits, [100, 300, 300, 300].map(Duration::from_millis));
        assert_eq!(p.backoff_after(0, 0.0), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spans_the_whole_range() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff_after(1, 0.0), Duration::from_millis(800));
        assert_eq!(p.backoff_after(1, 0.5), Duration::from_millis(1000));
        let top = p.backoff_after(1, 1.0 - f64::EPSILON);
        assert!(top > Duration::from_millis(1199) && top <= Duration::from_millis(1200));
        // A seeded generator is deterministic; different seeds differ.
        let a: Vec<_> = (0..5).map(|_| JitterRng::seeded(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            JitterRng::seeded(7).next_u64(),
            JitterRng::seeded(8).next_u64()
        );
    }

    #[test]
    fn partial_configuration_takes_defaults() {
        let p: RetryPolicy = serde_json::from_str(r#"{ "max_attempts": 2 }"#).unwrap();
        assert_eq!(p.max_attempts, 2);
        assert_eq!(p.backoff, DEFAULT_BACKOFF.to_vec());
        let p: RetryPolicy = toml::from_str("backoff_ms = [250, 0]\njitter = 0.0").unwrap();
        assert_eq!(
            p.backoff,
            [Duration::from_millis(250), Duration::ZERO].to_vec()
        );
        p.validate().unwrap();
    }

    #[test]
    fn bad_configuration_is_refused_naming_the_field() {
        let field = |p: RetryPolicy| p.validate().unwrap_err().field;
        let base = RetryPolicy::default;
        assert_eq!(
            field(RetryPolicy {
                max_attempts: 0,
                ..base()
            }),
            "max_attempts"
        );
        assert_eq!(
            field(RetryPolicy {
                max_attempts: MAX_ATTEMPTS_LIMIT + 1,
                ..base()
            }),
            "max_attempts"
        );
        assert_eq!(
            field(RetryPolicy {
                backoff: vec![],
                ..base()
            }),
            "backoff_ms"
        );
        assert_eq!(
            field(RetryPolicy {
                backoff: vec![
                    Duration::from_secs(1),
                    MAX_BACKOFF + Duration::from_millis(1)
                ],
                ..base()
            }),
            "backoff_ms"
        );
        for jitter in [-0.1, 1.0, 2.0, f64::NAN, f64::INFINITY] {
            assert_eq!(field(RetryPolicy { jitter, ..base() }), "jitter");
        }
        let err = RetryPolicy {
            max_attempts: 0,
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid retry.max_attempts: 0 is out of range; allowed 1 (no retries) to 1000"
        );
        // Negative waits and unknown fields fail at parse time, naming the field.
        let err = serde_json::from_str::<RetryPolicy>(r#"{ "backoff_ms": [1000, -5] }"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry.backoff_ms: -5 is negative"), "{err}");
        let err = serde_json::from_str::<RetryPolicy>(r#"{ "backoff": [1000] }"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `backoff`"), "{err}");
    }

    #[test]
    fn an_unvalidated_policy_never_panics() {
        let p = RetryPolicy {
            max_attempts: 3,
            backoff: vec![Duration::MAX],
            jitter: f64::NAN,
        };
        assert_eq!(p.backoff_after(1, f64::NAN), Duration::from_nanos(u64::MAX));
        let empty = RetryPolicy {
            backoff: vec![],
            ..RetryPolicy::default()
        };
        assert_eq!(
            empty.decide_with(1, FailureKind::Retryable, 0.3),
            Decision::RetryAfter(Duration::ZERO)
        );
    }

    fn policy() -> impl Strategy<Value = RetryPolicy> {
        (
            1u32..20,
            proptest::collection::vec(0u64..=MAX_BACKOFF.as_millis() as u64, 1..6),
            0.0f64..1.0,
        )
            .prop_map(|(max_attempts, backoff_ms, jitter)| RetryPolicy {
                max_attempts,
                backoff: backoff_ms.into_iter().map(Duration::from_millis).collect(),
                jitter,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Every wait lies within [d·(1−j), d·(1+j)] of its nominal step, whatever the sample.
        #[test]
        fn waits_stay_within_the_jitter_range(p in policy(), attempt in 0u32..30, seed in any::<u64>()) {
            prop_assert!(p.validate().is_ok());
            let nominal = p.nominal_backoff_after(attempt);
            let step = (attempt.max(1) - 1) as usize;
            prop_assert_eq!(nominal, p.backoff[step.min(p.backoff.len() - 1)]);
            let mut rng = JitterRng::seeded(seed);
            for _ in 0..8 {
                let wait = p.backoff_after(attempt, rng.next_unit()).as_nanos() as f64;
                let d = nominal.as_nanos() as f64;
                // One nanosecond of slack for the rounding of d·j.
                prop_assert!(wait >= d * (1.0 - p.jitter) - 1.0, "{wait} < {d}·(1−{})", p.jitter);
                prop_assert!(wait <= d * (1.0 + p.jitter) + 1.0, "{wait} > {d}·(1+{})", p.jitter);
            }
        }

        /// Driving a message through its attempts: retryable failures make exactly
        /// `max_attempts` attempts, a permanent failure ends the chain at once, and no chain
        /// exceeds `max_attempts`.
        #[test]
        fn attempts_never_exceed_the_maximum(
            p in policy(),
            kinds in proptest::collection::vec(prop_oneof![4 => Just(FailureKind::Retryable), 1 => Just(FailureKind::Permanent)], 1..40),
            seed in any::<u64>(),
        ) {
            let mut rng = JitterRng::seeded(seed);
            let mut attempt = 1u32;
            let mut kinds = kinds.iter().copied().cycle();
            loop {
                let kind = kinds.next().unwrap_or(FailureKind::Retryable);
                match p.decide(attempt, kind, &mut rng) {
                    Decision::RetryAfter(_) => {
                        prop_assert_eq!(kind, FailureKind::Retryable);
                        attempt += 1;
                        prop_assert!(attempt <= p.max_attempts);
                    }
                    Decision::DeadLetter => {
                        prop_assert!(kind == FailureKind::Permanent || attempt == p.max_attempts);
                        break;
                    }
                }
            }
            let all_retryable = (1..p.max_attempts)
                .all(|a| p.decide_with(a, FailureKind::Retryable, 0.5) != Decision::DeadLetter);
            prop_assert!(all_retryable);
        }

        /// A permanent failure never retries, at any attempt.
        #[test]
        fn permanent_never_retries(p in policy(), attempt in 0u32..2_000, unit in 0.0f64..1.0) {
            prop_assert_eq!(p.decide_with(attempt, FailureKind::Permanent, unit), Decision::DeadLetter);
        }

        /// The serialized form round-trips.
        #[test]
        fn policy_round_trips(p in policy()) {
            let json = serde_json::to_string(&p).unwrap();
            let back: RetryPolicy = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back.max_attempts, p.max_attempts);
            prop_assert_eq!(&back.backoff, &p.backoff);
            // serde_json's default float parser may be one ulp off.
            prop_assert!((back.jitter - p.jitter).abs() < 1e-12);
        }
    }
}
