//! Per-tenant rate limits (SEMANTICS §3: "a tenant exceeds its rate → its intake waits (token
//! bucket, backpressure); nothing is dropped").
//!
//! [`TokenBucket`] is the pure core: `burst` tokens at most, refilled at `rate` per second, no
//! clock inside (the caller passes [`Instant`]s), so it is property-tested like the breaker:
//! over any window of length `t` it admits at most `burst + rate·t` messages.
//!
//! [`TenantLimiter`] is one tenant's bucket on one host, shared by every worker of the tenant's
//! bindings there (a short `std` mutex around the arithmetic, never held across an await; an
//! unlimited tenant costs one atomic load per message). [`RateLimits`] is the host's registry,
//! keyed by tenant, refreshed from the store at every reconciliation by `serve`. A worker
//! takes a token before it dispatches a message; when none is left it stops dispatching until
//! the instant the bucket names, its queue fills and the intake pauses by the usual
//! backpressure. Each host enforces the full rate: N hosts running a tenant's bindings admit up
//! to N times it.
//!
//! Knows nothing of Kafka, the store or the worker beyond [`RateLimit`], plain data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::store::RateLimit;

/// A token bucket: holds at most `burst` tokens, gains `rate` per second, starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket for `limit`.
    pub fn new(limit: RateLimit) -> Self {
        let burst = f64::from(limit.burst.max(1));
        Self {
            rate: f64::from(limit.messages_per_second.max(1)),
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            // A clock that went backwards (it cannot, with `Instant`) refills nothing.
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        if self.last.is_none_or(|last| now > last) {
            self.last = Some(now);
        }
    }

    /// Take one token at `now`, or learn when the next one will be there.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Instant> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = (1.0 - self.tokens) / self.rate;
        // Rounded up to the microsecond, so that waking at that instant finds a whole token.
        let wait = Duration::from_micros((missing * 1e6).ceil() as u64 + 1);
        Err(now + wait)
    }

    /// Give back a token taken for nothing (there was no message to dispatch after all).
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Tokens available at the last call.
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

/// One tenant's rate limit on this host, shared by the workers of all its bindings here.
#[derive(Debug, Default)]
pub struct TenantLimiter {
    /// Whether a limit is set (read without the lock on every dispatch).
    limited: AtomicBool,
    bucket: Mutex<Option<(RateLimit, TokenBucket)>>,
}

impl TenantLimiter {
    /// Take a token for one message at `now` (always granted without a limit), or learn when
    /// the next one will be there.
    pub fn try_take(&self, now: Instant) -> Result<(), Instant> {
        if !self.limited.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        match bucket.as_mut() {
            Some((_, bucket)) => bucket.try_take(now),
            None => Ok(()),
        }
    }

    /// Give back a token taken for nothing.
    pub fn give_back(&self) {
        if !self.limited.load(Ordering::Relaxed) {
            return;
        }
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, bucket)) = bucket.as_mut() {
            bucket.give_back();
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> Option<RateLimit> {
        let bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        bucket.as_ref().map(|(limit, _)| *limit)
    }

    /// Set or remove the limit. Setting the limit already in force keeps its bucket (and the
    /// tokens spent); a new limit starts with a full bucket.
    pub fn set(&self, limit: Option<RateLimit>) {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        match limit {
            Some(limit)
                if bucket
                    .as_ref()
                    .is_some_and(|(current, _)| *current == limit) => {}
            Some(limit) => *bucket = Some((limit, TokenBucket::new(limit))),
            None => *bucket = None,
        }
        self.limited.store(bucket.is_some(), Ordering::Relaxed);
    }
}

/// The host's rate limits, one [`TenantLimiter`] per tenant.
#[derive(Debug, Default)]
pub struct RateLimits {
    tenants: Mutex<HashMap<String, Arc<TenantLimiter>>>,
}

impl RateLimits {
    /// The limiter of `tenant` (unlimited until a refresh sets one); every binding of the
    /// tenant gets the same.
    pub fn tenant(&self, tenant: &str) -> Arc<TenantLimiter> {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        tenants.entry(tenant.to_owned()).or_default().clone()
    }

    /// Bring every tenant's limit in line with `limits` (a tenant absent from it has none).
    pub fn refresh(&self, limits: &HashMap<String, RateLimit>) {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        for (tenant, limit) in limits {
            let limiter = tenants.entry(tenant.clone()).or_default();
            if limiter.limit() != Some(*limit) {
                tracing::info!(
                    tenant,
                    messages_per_second = limit.messages_per_second,
                    burst = limit.burst,
                    "tenant rate limit set"
                );
            }
            limiter.set(Some(*limit));
        }
        for (tenant, limiter) in tenants.iter() {
            if !limits.contains_key(tenant) && limiter.limit().is_some() {
                tracing::info!(tenant, "tenant rate limit removed");
                limiter.set(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(messages_per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            messages_per_second,
            burst,
        }
    }

    #[test]
    fn a_full_bucket_admits_its_burst_then_one_per_interval() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(limit(10, 3));
        for _ in 0..3 {
            assert_eq!(bucket.try_take(start), Ok(()));
        }
        let next = bucket.try_take(start).unwrap_err();
        let wait = next - start;
        assert!(wait >= Duration::from_millis(100) && wait < Duration::from_millis(101));
        assert!(bucket.try_take(start + Duration::from_millis(99)).is_err());
        assert_eq!(bucket.try_take(next), Ok(()));
        assert!(bucket.try_take(next).is_err());
    }

    #[test]
    fn an_idle_bucket_refills_up_to_its_burst_only() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(limit(100, 5));
        assert_eq!(bucket.try_take(start), Ok(()));
        let later = start + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(bucket.try_take(later), Ok(()));
        }
        assert!(bucket.try_take(later).is_err());
    }

    #[test]
    fn a_token_given_back_is_there_again() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(limit(1, 1));
        assert_eq!(bucket.try_take(start), Ok(()));
        assert!(bucket.try_take(start).is_err());
        bucket.give_back();
        assert_eq!(bucket.try_take(start), Ok(()));
    }

    #[test]
    fn tenants_have_buckets_of_their_own_and_bindings_share_them() {
        let limits = RateLimits::default();
        let a1 = limits.tenant("a");
        let a2 = limits.tenant("a");
        let b = limits.tenant("b");
        limits.refresh(&HashMap::from([("a".to_owned(), limit(1, 2))]));
        let now = Instant::now();
        assert_eq!(a1.try_take(now), Ok(()));
        assert_eq!(a2.try_take(now), Ok(()));
        assert!(a1.try_take(now).is_err(), "bindings of a share one bucket");
        for _ in 0..1000 {
            assert_eq!(b.try_take(now), Ok(()), "b is not limited");
        }
        // The same limit again keeps the bucket; removing it lets everything through.
        limits.refresh(&HashMap::from([("a".to_owned(), limit(1, 2))]));
        assert!(a2.try_take(now).is_err());
        limits.refresh(&HashMap::new());
        assert_eq!(a2.try_take(now), Ok(()));
        assert_eq!(a1.limit(), None);
    }

    proptest! {
        /// Whatever the pattern of attempts, no window of length `t` sees more than
        /// `burst + rate·t` admissions.
        #[test]
        fn never_admits_more_than_burst_plus_rate_times_t(
            rate in 1u32..2000,
            burst in 1u32..100,
            steps in proptest::collection::vec((0u64..20_000, 1usize..5, any::<bool>()), 1..120),
        ) {
            let start = Instant::now();
            let mut bucket = TokenBucket::new(limit(rate, burst));
            let mut now = start;
            let mut admitted: Vec<Instant> = Vec::new();
            for (advance_us, attempts, give_back) in steps {
                now += Duration::from_micros(advance_us);
                for _ in 0..attempts {
                    match bucket.try_take(now) {
                        Ok(()) => admitted.push(now),
                        Err(next) => prop_assert!(next > now),
                    }
                }
                if give_back && admitted.last() == Some(&now) {
                    bucket.give_back();
                    admitted.pop();
                }
            }
            for (i, first) in admitted.iter().enumerate() {
                for (j, last) in admitted.iter().enumerate().skip(i) {
                    let t = (*last - *first).as_secs_f64();
                    let count = (j - i + 1) as f64;
                    prop_assert!(
                        count <= f64::from(burst) + f64::from(rate) * t + 1e-6,
                        "{count} admitted in {t} s (rate {rate}, burst {burst})"
                    );
                }
            }
        }

        /// A caller that waits until the instant the bucket names is admitted then: the rate
        /// is reached, not only bounded.
        #[test]
        fn waiting_as_told_reaches_the_rate(rate in 1u32..1000, burst in 1u32..50) {
            let start = Instant::now();
            let mut bucket = TokenBucket::new(limit(rate, burst));
            let mut now = start;
            let mut admitted = 0u32;
            let n = burst + 2 * rate;
            while admitted < n {
                match bucket.try_take(now) {
                    Ok(()) => admitted += 1,
                    Err(next) => now = next,
                }
            }
            // burst + 2·rate messages take about 2 s (plus rounding of a microsecond each).
            let elapsed = (now - start).as_secs_f64();
            prop_assert!(elapsed <= 2.0 + f64::from(n) * 2e-6, "{elapsed}");
            prop_assert!(elapsed >= 2.0 - 1e-6 - 1.0 / f64::from(rate), "{elapsed}");
        }
    }
}
