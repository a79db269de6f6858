//! A binding's circuit breaker (SEMANTICS §3): stop consuming while a dependency of the handler
//! is down, instead of spending every message's attempts on it and dead-lettering them.
//!
//! Owns the `breaker` section of a binding's policy ([`BreakerPolicy`]: its defaults, its
//! validation and its serialized form) and the state machine ([`Breaker`]):
//!
//! ```text
//!   CLOSED ──failure_threshold consecutive failures──► OPEN ──open_for──► HALF_OPEN
//!     ▲                                                 ▲                    │  │
//!     │                                                 └──── a failure ─────┘  │
//!     └──────────── success_threshold consecutive successes of probes ──────────┘
//! ```
//!
//! While CLOSED every message may run; while OPEN none; while HALF_OPEN at most
//! [`BreakerPolicy::max_probes`] probe messages at a time. An operator may force it open (it
//! stays OPEN, never half-opening, until reset) or reset it to CLOSED; another replica's
//! breaker may be followed ([`Breaker::follow`]).
//!
//! What counts as a failure is the caller's decision, given as [`Outcome`]: a retryable handler
//! error or a deadline trap says a dependency is slow or down ([`Outcome::Failure`]); a permanent
//! error, a refused effect or any other trap is the message's own fault and neither trips nor
//! resets the breaker ([`Outcome::Neutral`]). Faults of the host (store down) never reach it.
//!
//! Pure: no clock (the caller passes [`Instant`]s), no I/O, no locks; owned by one task and
//! property-tested. Knows nothing of Kafka, partitions or the store: the worker pauses the
//! partitions, parks the messages and shares the state (see [`super::worker`]).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Default consecutive failures that open the breaker: 5 (product RFC, SEMANTICS §3).
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// Default consecutive probe successes that close it again: 2 (product RFC, SEMANTICS §3).
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 2;
/// Default time it stays open before probing: 60 s (product RFC, SEMANTICS §3).
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(60);
/// Largest threshold accepted (a typo guard).
pub const MAX_THRESHOLD: u32 = 10_000;
/// Shortest `open_for`: 100 ms (shorter would only hammer the dependency).
pub const MIN_OPEN_FOR: Duration = Duration::from_millis(100);
/// Longest `open_for`: one day.
pub const MAX_OPEN_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// The breaker section of a binding's policy. Every field has a default; [`Self::validate`]
/// before use.
///
/// Serialized as `{ "failure_threshold": 5, "success_threshold": 2, "open_for_ms": 60000 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerPolicy {
    /// Consecutive failures (retryable errors, deadlines) that open the breaker.
    pub failure_threshold: u32,
    /// Consecutive successful probes that close it again; also the probes let through at once
    /// while half-open.
    pub success_threshold: u32,
    /// How long it stays open before it lets probes through, milliseconds.
    pub open_for_ms: u64,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
            open_for_ms: DEFAULT_OPEN_FOR.as_millis() as u64,
        }
    }
}

/// A breaker setting that is out of range. `field` is the key inside `breaker`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid breaker.{field}: {message}")]
pub struct BreakerPolicyError {
    /// The offending key, e.g. `failure_threshold`.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl BreakerPolicy {
    /// Refuse zero and absurd values, naming the field.
    pub fn validate(&self) -> Result<(), BreakerPolicyError> {
        for (field, value) in [
            ("failure_threshold", self.failure_threshold),
            ("success_threshold", self.success_threshold),
        ] {
            if !(1..=MAX_THRESHOLD).contains(&value) {
                return Err(BreakerPolicyError {
                    field,
                    message: format!("{value} is out of range; allowed 1 to {MAX_THRESHOLD}"),
                });
            }
        }
        let (min, max) = (MIN_OPEN_FOR.as_millis(), MAX_OPEN_FOR.as_millis());
        if !(min..=max).contains(&u128::from(self.open_for_ms)) {
            return Err(BreakerPolicyError {
                field: "open_for_ms",
                message: format!(
                    "{} ms is out of range; allowed {min} to {max} ms (one day)",
                    self.open_for_ms
                ),
            });
        }
        Ok(())
    }

    /// How long the breaker stays open.
    pub fn open_for(&self) -> Duration {
        Duration::from_millis(self.open_for_ms)
    }

    /// Probe messages let through at once while half-open: as many as it takes to close.
    pub fn max_probes(&self) -> u32 {
        self.success_threshold.max(1)
    }
}

/// The breaker's state, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Messages run.
    Closed,
    /// Nothing runs; the partitions are paused.
    Open,
    /// Probe messages run; their outcome closes or reopens it.
    HalfOpen,
}

impl BreakerState {
    /// The value of the state's gauges (`weir_breaker_state`, `weir_http_breaker_state`):
    /// 0 closed, 1 half-open, 2 open.
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }

    /// The name used in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// How an admitted message ended, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded.
    Success,
    /// A dependency looks down: a retryable handler error, or the deadline.
    Failure,
    /// The message's own fault (permanent error, refusal, other trap): neither counts.
    Neutral,
}

/// Whether a message may run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: run it.
    Run,
    /// Half-open: run it as a probe; report its outcome with this token.
    Probe(ProbeToken),
    /// Open, or every probe slot is taken: let it wait.
    Wait,
}

/// Identifies a probe of one half-open period; a probe of an earlier period (the breaker
/// reopened meanwhile) no longer decides anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeToken(u64);

/// A change of state the caller must act on (pause, resume, share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Opened (by failures, or from half-open by a failed probe).
    Opened,
    /// Forced open by an operator (or by following a forced one).
    ForcedOpen,
    /// Open long enough: probes may run.
    HalfOpened,
    /// Closed (by successful probes, or reset).
    Closed,
}

/// A breaker's state as another replica or an operator wrote it, for [`Breaker::follow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// Closed (reset, or closed by probes).
    Closed,
    /// Open until the given instant (half-open after it).
    OpenUntil(Instant),
    /// Forced open until reset.
    Forced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        /// When it opened.
        since: Instant,
        /// When it half-opens; `None` when forced (until reset).
        until: Option<Instant>,
    },
    HalfOpen {
        successes: u32,
        probes: u32,
    },
}

/// The state machine of one binding's breaker. See the module documentation.
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Inner,
    /// Counts half-open periods, for [`ProbeToken`]s.
    period: u64,
}

impl Breaker {
    /// A closed breaker with `policy`.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            inner: Inner::Closed { failures: 0 },
            period: 0,
        }
    }

    /// Its policy.
    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    /// The state (as of the last [`Self::poll`]).
    pub fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Consecutive failures counted while closed (the threshold while open or half-open).
    pub fn consecutive_failures(&self) -> u32 {
        match self.inner {
            Inner::Closed { failures } => failures,
            _ => self.policy.failure_threshold,
        }
    }

    /// Whether it is open by force (until reset).
    pub fn is_forced(&self) -> bool {
        matches!(self.inner, Inner::Open { until: None, .. })
    }

    /// When it opened, if open.
    pub fn opened_at(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { since, .. } => Some(since),
            _ => None,
        }
    }

    /// When it half-opens, if open and not forced.
    pub fn open_until(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { until, .. } => until,
            _ => None,
        }
    }

    /// Let time pass: an open breaker whose time is up half-opens.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        match self.inner {
            Inner::Open {
                until: Some(until), ..
            } if now >= until => {
                self.half_open();
                Some(Transition::HalfOpened)
            }
            _ => None,
        }
    }

    /// Whether a message may run now (after letting time pass). A [`Admission::Probe`] takes a
    /// probe slot until its outcome is [recorded](Self::record).
    pub fn admit(&mut self, now: Instant) -> Admission {
        self.poll(now);
        let max_probes = self.policy.max_probes();
        match &mut self.inner {
            Inner::Closed { .. } => Admission::Run,
            Inner::Open { .. } => Admission::Wait,
            Inner::HalfOpen { probes, .. } if *probes < max_probes => {
                *probes += 1;
                Admission::Probe(ProbeToken(self.period))
            }
            Inner::HalfOpen { .. } => Admission::Wait,
        }
    }

    /// Record how a message ended. `probe` is the token it was admitted with, if it was a
    /// probe. While closed, failures count and a success resets the count; while half-open only
    /// this period's probes decide (a failure reopens, `success_threshold` successes close);
    /// while open nothing changes.
    pub fn record(
        &mut self,
        outcome: Outcome,
        probe: Option<ProbeToken>,
        now: Instant,
    ) -> Option<Transition> {
        let current = probe.is_some_and(|ProbeToken(period)| period == self.period);
        match (&mut self.inner, outcome) {
            (Inner::Closed { failures }, Outcome::Failure) => {
                *failures = failures.saturating_add(1);
                (*failures >= self.policy.failure_threshold).then(|| self.open(now))
            }
            (Inner::Closed { failures }, Outcome::Success) => {
                *failures = 0;
                None
            }
            (Inner::Closed { .. } | Inner::Open { .. }, _) => None,
            (Inner::HalfOpen { .. }, _) if !current => None,
            (Inner::HalfOpen { .. }, Outcome::Failure) => Some(self.open(now)),
            (Inner::HalfOpen { successes, probes }, Outcome::Success) => {
                *probes = probes.saturating_sub(1);
                *successes += 1;
                (*successes >= self.policy.success_threshold).then(|| self.close())
            }
            (Inner::HalfOpen { probes, .. }, Outcome::Neutral) => {
                *probes = probes.saturating_sub(1);
                None
            }
        }
    }

    /// Give back a probe slot whose message did not run to an outcome (the host failed, not
    /// the handler): another probe may take it.
    pub fn cancel(&mut self, probe: ProbeToken) {
        if let Inner::HalfOpen { probes, .. } = &mut self.inner
            && probe.0 == self.period
        {
            *probes = probes.saturating_sub(1);
        }
    }

    /// Open by force until [`Self::reset`].
    pub fn force_open(&mut self, now: Instant) -> Option<Transition> {
        if self.is_forced() {
            return None;
        }
        self.inner = Inner::Open {
            since: now,
            until: None,
        };
        Some(Transition::ForcedOpen)
    }

    /// Close, whatever the state.
    pub fn reset(&mut self) -> Option<Transition> {
        match self.inner {
            Inner::Closed { .. } => {
                self.inner = Inner::Closed { failures: 0 };
                None
            }
            _ => Some(self.close()),
        }
    }

    /// Take on a state written elsewhere (another replica opened or closed its breaker, an
    /// operator forced or reset it). An open state whose time is already up half-opens at the
    /// next [`Self::poll`].
    pub fn follow(&mut self, shared: Shared, now: Instant) -> Option<Transition> {
        match shared {
            Shared::Closed => self.reset(),
            Shared::Forced => self.force_open(now),
            Shared::OpenUntil(until) => match self.inner {
                Inner::Open {
                    until: Some(current),
                    since,
                } => {
                    self.inner = Inner::Open {
                        since,
                        until: Some(current.max(until)),
                    };
                    None
                }
                _ => {
                    self.inner = Inner::Open {
                        since: now,
                        until: Some(until),
                    };
                    Some(Transition::Opened)
                }
            },
        }
    }

    fn open(&mut self, now: Instant) -> Transition {
        self.inner = Inner::Open {
            since: now,
            until: Some(now + self.policy.open_for()),
        };
        Transition::Opened
    }

    fn half_open(&mut self) {
        self.period += 1;
        self.inner = Inner::HalfOpen {
            successes: 0,
            probes: 0,
        };
    }

    fn close(&mut self) -> Transition {
        self.inner = Inner::Closed { failures: 0 };
        Transition::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(failures: u32, successes: u32, open_ms: u64) -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: failures,
            success_threshold: successes,
            open_for_ms: open_ms,
        }
    }

    #[test]
    fn defaults_are_the_rfc_defaults_and_partial_sections_take_them() {
        let p = BreakerPolicy::default();
        assert_eq!((p.failure_threshold, p.success_threshold), (5, 2));
        assert_eq!(p.open_for(), Duration::from_secs(60));
        assert_eq!(p.validate(), Ok(()));
        let partial: BreakerPolicy = serde_json::from_str(r#"{"open_for_ms": 2000}"#).unwrap();
        assert_eq!(partial, policy(5, 2, 2000));
        let err = serde_json::from_str::<BreakerPolicy>(r#"{"open_for": 2}"#).unwrap_err();
        assert!(err.to_string().contains("open_for"), "{err}");
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        for (p, field) in [
            (policy(0, 2, 1000), "failure_threshold"),
            (policy(5, 0, 1000), "success_threshold"),
            (policy(MAX_THRESHOLD + 1, 2, 1000), "failure_threshold"),
            (policy(5, 2, 0), "open_for_ms"),
            (policy(5, 2, 99), "open_for_ms"),
            (policy(5, 2, 86_400_001), "open_for_ms"),
        ] {
            assert_eq!(p.validate().unwrap_err().field, field, "{p:?}");
        }
    }

    #[test]
    fn one_cycle_closed_open_half_open_closed() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy(3, 2, 1000));
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admission::Run);
            assert_eq!(b.record(Outcome::Failure, None, t0), None);
        }
        // A neutral outcome neither counts nor resets.
        assert_eq!(b.record(Outcome::Neutral, None, t0), None);
        assert_eq!(b.consecutive_failures(), 2);
        assert_eq!(
            b.record(Outcome::Failure, None, t0),
            Some(Transition::Opened)
        );
        assert_eq!(b.admit(t0 + Duration::from_millis(999)), Admission::Wait);
        let t1 = t0 + Duration::from_secs(1);
        let Admission::Probe(first) = b.admit(t1) else {
            panic!("no probe once open_for passed");
        };
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let Admission::Probe(second) = b.admit(t1) else {
            panic!("second probe refused");
        };
        assert_eq!(b.admit(t1), Admission::Wait, "more probes than allowed");
        assert_eq!(b.record(Outcome::Success, Some(first), t1), None);
        assert_eq!(
            b.record(Outcome::Success, Some(second), t1),
            Some(Transition::Closed)
        );
        assert_eq!(b.admit(t1), Admission::Run);
    }

    #[test]
    fn a_failed_probe_reopens_and_stale_probes_decide_nothing() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy(1, 1, 1000));
        b.record(Outcome::Failure, None, t0);
        let t1 = t0 + Duration::from_secs(1);
        let Admission::Probe(stale) = b.admit(t1) else {
            panic!()
        };
        assert_eq!(
            b.record(Outcome::Failure, Some(stale), t1),
            Some(Transition::Opened)
        );
        let t2 = t1 + Duration::from_secs(1);
        assert!(matches!(b.admit(t2), Admission::Probe(_)));
        // A probe of the earlier period succeeding does not close it.
        assert_eq!(b.record(Outcome::Success, Some(stale), t2), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn forced_open_stays_open_until_reset_and_following_works() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy(5, 2, 1000));
        assert_eq!(b.force_open(t0), Some(Transition::ForcedOpen));
        assert_eq!(b.admit(t0 + Duration::from_secs(3600)), Admission::Wait);
        assert_eq!(b.reset(), Some(Transition::Closed));
        assert_eq!(
            b.follow(Shared::OpenUntil(t0 + Duration::from_secs(5)), t0),
            Some(Transition::Opened)
        );
        assert_eq!(b.admit(t0 + Duration::from_secs(4)), Admission::Wait);
        assert!(matches!(
            b.admit(t0 + Duration::from_secs(5)),
            Admission::Probe(_)
        ));
        assert_eq!(b.follow(Shared::Closed, t0), Some(Transition::Closed));
        assert_eq!(b.follow(Shared::Forced, t0), Some(Transition::ForcedOpen));
        assert!(b.is_forced());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit,
        Record(u8, bool),
        Advance(u64),
        Force,
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Admit),
            4 => (0u8..3, any::<bool>()).prop_map(|(o, p)| Op::Record(o, p)),
            2 => (0u64..3000).prop_map(Op::Advance),
            1 => Just(Op::Force),
            1 => Just(Op::Reset),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Driven by any sequence of events: nothing runs while open; at most `max_probes`
        /// probes are out while half-open; a forced breaker never half-opens; a non-forced one
        /// half-opens exactly when `open_for` has passed; it opens only on the
        /// `failure_threshold`-th consecutive failure.
        #[test]
        fn invariants_hold_for_any_sequence(
            f in 1u32..6, s in 1u32..4, open_ms in 100u64..2000,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let p = policy(f, s, open_ms);
            let mut b = Breaker::new(p);
            let mut now = Instant::now();
            let mut probes: Vec<ProbeToken> = Vec::new();
            for op in ops {
                let before = b.clone();
                match op {
                    Op::Admit => match b.admit(now) {
                        Admission::Run => prop_assert_eq!(b.state(), BreakerState::Closed),
                        Admission::Probe(token) => {
                            prop_assert_eq!(b.state(), BreakerState::HalfOpen);
                            probes.push(token);
                        }
                        Admission::Wait => prop_assert_ne!(b.state(), BreakerState::Closed),
                    },
                    Op::Record(o, as_probe) => {
                        let outcome = [Outcome::Success, Outcome::Failure, Outcome::Neutral][o as usize];
                        let token = if as_probe { probes.pop() } else { None };
                        let t = b.record(outcome, token, now);
                        if t == Some(Transition::Opened) {
                            prop_assert_eq!(outcome, Outcome::Failure);
                            if before.state() == BreakerState::Closed {
                                prop_assert_eq!(before.consecutive_failures() + 1, f);
                            }
                            prop_assert_eq!(b.open_until(), Some(now + p.open_for()));
                        }
                        if t == Some(Transition::Closed) {
                            prop_assert_eq!(before.state(), BreakerState::HalfOpen);
                            prop_assert_eq!(outcome, Outcome::Success);
                        }
                        if before.state() == BreakerState::Open {
                            prop_assert_eq!(t, None);
                        }
                    }
                    Op::Advance(ms) => {
                        now += Duration::from_millis(ms);
                        let t = b.poll(now);
                        if t == Some(Transition::HalfOpened) {
                            prop_assert!(!before.is_forced());
                            prop_assert!(before.open_until().is_some_and(|u| u <= now));
                        } else if let Some(until) = b.open_until() {
                            prop_assert!(until > now);
                        }
                    }
                    Op::Force => {
                        b.force_open(now);
                        prop_assert!(b.is_forced());
                    }
                    Op::Reset => {
                        b.reset();
                        prop_assert_eq!(b.state(), BreakerState::Closed);
                        prop_assert_eq!(b.consecutive_failures(), 0);
                    }
                }
                if let Inner::HalfOpen { probes: out, successes } = b.inner {
                    prop_assert!(out <= p.max_probes());
                    prop_assert!(successes < s);
                }
                if let Inner::Closed { failures } = b.inner {
                    prop_assert!(failures < f);
                }
                if b.is_forced() {
                    prop_assert_eq!(b.poll(now + Duration::from_secs(86_400)), None);
                }
            }
        }

        /// The serialized form round-trips.
        #[test]
        fn policy_round_trips(f in 1u32..100, s in 1u32..100, open_ms in 100u64..86_400_000) {
            let p = policy(f, s, open_ms);
            let back: BreakerPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            prop_assert_eq!(back, p);
        }
    }
}
