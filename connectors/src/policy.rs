//! The one delivery policy every connector shares: batching limits, capped exponential backoff
//! with full jitter, a circuit breaker, a token-bucket rate limit, request timeouts, and the
//! `Retry-After` parser. Time is `tokio::time`, so tests drive it with paused time; sleeping
//! goes through [`Sleeper`], so a test can also record every wait without waiting.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How a connector batches, retries and limits itself.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    /// Most effects per request.
    pub max_batch: usize,
    /// Largest request body, bytes (a batch rendering larger is halved). The in-flight request
    /// is saved in the store, so it must fit a DynamoDB item (≤ 350 KB).
    pub max_bytes: usize,
    /// How long a partial batch waits for more effects.
    pub linger: Duration,
    /// Failed attempts before a request is dead-lettered (throttling and an open circuit do not count).
    pub max_attempts: u32,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Retry backoff.
    pub backoff: BackoffConfig,
    /// Circuit breaker.
    pub breaker: BreakerConfig,
    /// Rate limit (the target's documented limit), if any.
    pub rate: Option<RateLimit>,
    /// Requests in flight at once (one per shard lane at most).
    pub concurrency: usize,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            max_batch: 100,
            max_bytes: 256 << 10,
            linger: Duration::from_millis(200),
            max_attempts: 12,
            timeout: Duration::from_secs(10),
            backoff: BackoffConfig::default(),
            breaker: BreakerConfig::default(),
            rate: None,
            concurrency: 4,
        }
    }
}

pub use stockflow_state::retry::{Backoff, BackoffConfig};

/// Sleeps. The drain waits through this, so tests can record (or skip) every wait.
pub trait Sleeper: Send + Sync + std::fmt::Debug + 'static {
    /// Waits `d`.
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Sleeps on `tokio::time` (paused time in tests advances it).
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// How long it stays open before one probe.
    pub open_for: Duration,
    /// Ceiling of `open_for`, which doubles after each failed probe.
    pub max_open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failures: 5, open_for: Duration::from_secs(5), max_open_for: Duration::from_secs(300) }
    }
}

/// Where the circuit is. The gauge `stockflow_connector_circuit_state` shows the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow (0).
    Closed = 0,
    /// One probe is allowed through (1).
    HalfOpen = 1,
    /// Requests are held back (2).
    Open = 2,
}

/// Closed → Open after `failures` consecutive failures → HalfOpen after `open_for` → one probe:
/// success closes it, failure opens it again for twice as long (capped).
#[derive(Debug)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    inner: Mutex<BreakerInner>,
}

#[derive(Debug)]
struct BreakerInner {
    state: CircuitState,
    failures: u32,
    open_until: Instant,
    open_for: Duration,
    probing: bool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        CircuitBreaker {
            cfg,
            inner: Mutex::new(BreakerInner {
                state: CircuitState::Closed,
                failures: 0,
                open_until: Instant::now(),
                open_for: cfg.open_for,
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current state (an open circuit whose time is up reads as half-open).
    pub fn state(&self) -> CircuitState {
        let b = self.lock();
        if b.state == CircuitState::Open && Instant::now() >= b.open_until { CircuitState::HalfOpen } else { b.state }
    }

    /// May a request go now? `Err(wait)` when the circuit is open (or its probe is out).
    pub fn permit(&self) -> Result<(), Duration> {
        let mut b = self.lock();
        let now = Instant::now();
        match b.state {
            CircuitState::Closed => Ok(()),
            CircuitState::Open if now < b.open_until => Err(b.open_until - now),
            CircuitState::Open | CircuitState::HalfOpen if !b.probing => {
                b.state = CircuitState::HalfOpen;
                b.probing = true;
                Ok(())
            }
            // A probe is out: wait for its verdict.
            _ => Err(Duration::from_millis(50).min(self.cfg.open_for)),
        }
    }

    /// The request succeeded.
    pub fn success(&self) {
        let mut b = self.lock();
        b.state = CircuitState::Closed;
        b.failures = 0;
        b.probing = false;
        b.open_for = self.cfg.open_for;
    }

    /// The request failed (transiently; a rejection is the receiver working).
    pub fn failure(&self) {
        let mut b = self.lock();
        let now = Instant::now();
        match b.state {
            CircuitState::HalfOpen => {
                b.open_for = (b.open_for * 2).min(self.cfg.max_open_for);
                b.state = CircuitState::Open;
                b.open_until = now + b.open_for;
                b.probing = false;
            }
            CircuitState::Closed => {
                b.failures += 1;
                if b.failures >= self.cfg.failures {
                    b.state = CircuitState::Open;
                    b.open_until = now + b.open_for;
                }
            }
            CircuitState::Open => {}
        }
    }

    /// A request that was let through ended without a verdict on the receiver (throttled):
    /// a probe slot is given back.
    pub fn release(&self) {
        self.lock().probing = false;
    }
}

/// A token bucket: `capacity` requests at once, one more every `every`. For a documented limit
/// of L requests per window W, choose `capacity + W/every ≤ L` so that no window of length W
/// ever sees more than L.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Burst size.
    pub capacity: u32,
    /// One token per this interval.
    pub every: Duration,
}

impl RateLimit {
    /// Xero: 60 calls per minute per tenant → burst 10, then 50 a minute (≤ 60 in any minute).
    pub const XERO: RateLimit = RateLimit { capacity: 10, every: Duration::from_millis(1200) };
    /// QuickBooks Online: 500 per minute and 10 per second per realm → burst 2, 8 a second
    /// (≤ 10 in any second, ≤ 482 in any minute).
    pub const QUICKBOOKS: RateLimit = RateLimit { capacity: 2, every: Duration::from_millis(125) };
    /// QuickBooks Online batch requests: 40 per minute per company → burst 4, then one every
    /// 1.667 s (≤ 39.99 in any minute).
    pub const QUICKBOOKS_BATCH: RateLimit = RateLimit { capacity: 4, every: Duration::from_millis(1667) };
}

/// A vendor's daily request budget (Xero: 5,000 calls per tenant in a rolling day), counted
/// locally and corrected by the vendor's own count (`X-DayLimit-Remaining`). It is exported as
/// `stockflow_connector_daily_budget_remaining`; below 10 % it warns, and when spent the drain
/// waits for the window instead of being refused.
#[derive(Debug)]
pub struct DailyBudget {
    limit: u32,
    calls: Mutex<std::collections::VecDeque<Instant>>,
    /// The vendor's last word: (remaining, when).
    reported: Mutex<Option<(u32, Instant)>>,
}

const DAY: Duration = Duration::from_secs(86_400);

impl DailyBudget {
    /// A budget of `limit` requests in any 24 hours.
    pub fn new(limit: u32) -> Self {
        DailyBudget { limit, calls: Mutex::new(Default::default()), reported: Mutex::new(None) }
    }

    /// The limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Requests left now (the smaller of the local count and the vendor's last report, less
    /// what was sent since).
    pub fn remaining(&self) -> u32 {
        let now = Instant::now();
        let mut calls = self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while calls.front().is_some_and(|t| now.duration_since(*t) >= DAY) {
            calls.pop_front();
        }
        let local = self.limit.saturating_sub(u32::try_from(calls.len()).unwrap_or(u32::MAX));
        let reported = *self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match reported {
            Some((r, at)) if now.duration_since(at) < DAY => {
                let since = calls.iter().filter(|t| **t > at).count();
                local.min(r.saturating_sub(u32::try_from(since).unwrap_or(u32::MAX)))
            }
            _ => local,
        }
    }

    /// Takes one request from the budget, or says how long until one is free.
    pub fn take(&self) -> Result<(), Duration> {
        if self.remaining() == 0 {
            let calls = self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let oldest = calls.front().copied().unwrap_or_else(Instant::now);
            return Err(DAY.saturating_sub(oldest.elapsed()).max(Duration::from_secs(60)));
        }
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push_back(Instant::now());
        Ok(())
    }

    /// Records the vendor's count after an answer, and publishes what is left.
    pub fn observe(&self, remaining: Option<u32>, connector: &'static str) {
        if let Some(r) = remaining {
            *self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((r, Instant::now()));
        }
        let left = self.remaining();
        metrics::gauge!("stockflow_connector_daily_budget_remaining", "connector" => connector).set(f64::from(left));
        if u64::from(left) * 10 < u64::from(self.limit) {
            tracing::warn!(connector, left, limit = self.limit, "daily request budget nearly spent");
        }
    }
}

/// The bucket itself, on `tokio::time`, kept as a GCRA "theoretical arrival time" (integer
/// time, no floating-point drift): a request may go once `tat − (capacity−1)·every ≤ now`.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    tat: tokio::sync::Mutex<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket { limit, tat: tokio::sync::Mutex::new(Instant::now()) }
    }

    /// Waits for a token and takes it. Waiters are served in order (the lock is fair).
    pub async fn acquire(&self) {
        self.acquire_share(1).await;
    }

    /// Like [`TokenBucket::acquire`], for one of `members` processes sharing the limit: a burst
    /// of `max(1, capacity / members)` and a token every `members × every`, so that the group
    /// together stays within `capacity + W/every` in any window `W` (while `members ≤ capacity`;
    /// beyond that the group's burst is `members`). The share may change between calls.
    pub async fn acquire_share(&self, members: u32) {
        let members = members.max(1);
        let every = self.limit.every.saturating_mul(members);
        let capacity = (self.limit.capacity / members).max(1);
        let mut tat = self.tat.lock().await;
        let tolerance = every * capacity.saturating_sub(1);
        let now = Instant::now();
        let t = (*tat).max(now);
        if t > now + tolerance {
            tokio::time::sleep_until(t - tolerance).await;
        }
        *tat = t + every;
    }
}

/// Parses `Retry-After` (RFC 9110 §10.2.3): delta-seconds, or an HTTP-date in any of its three forms,
/// relative to `now`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // An HTTP-date in any of RFC 9110's three forms (IMF-fixdate, RFC 850, asctime).
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daily_budget_counts_calls_and_believes_the_vendor() {
        let b = DailyBudget::new(3);
        assert_eq!(b.remaining(), 3);
        b.take().unwrap();
        b.take().unwrap();
        assert_eq!(b.remaining(), 1);
        b.take().unwrap();
        assert!(b.take().is_err_and(|wait| wait >= Duration::from_secs(60)), "spent: wait for the window");
        // The vendor's count wins when it is lower (other processes share the tenant).
        let shared = DailyBudget::new(5_000);
        shared.observe(Some(2), "xero");
        assert_eq!(shared.remaining(), 2);
        shared.take().unwrap();
        assert_eq!(shared.remaining(), 1);
        shared.take().unwrap();
        assert!(shared.take().is_err());
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        let epoch = std::time::UNIX_EPOCH;
        assert_eq!(parse_retry_after("Thu, 29 Feb 2024 00:00:00 GMT", epoch), Some(Duration::from_secs(1_709_164_800)));
        // The two obsolete forms a recipient must still accept (RFC 9110 §5.6.7).
        assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:50:37 GMT", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("Sun Nov  6 08:50:37 1994", now), Some(Duration::from_secs(60)));
        for bad in ["", "soon", "-3", "Sun, 06 Nov 1994 25:00:00 GMT", "Sun, 06 Foo 1994 08:49:37 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_probes_and_recovers() {
        let cfg =
            BreakerConfig { failures: 3, open_for: Duration::from_secs(10), max_open_for: Duration::from_secs(25) };
        let b = CircuitBreaker::new(cfg);
        for _ in 0..2 {
            assert!(b.permit().is_ok());
            b.failure();
        }
        assert_eq!(b.state(), CircuitState::Closed);
        b.success(); // a success resets the count
        for _ in 0..3 {
            assert!(b.permit().is_ok());
            b.failure();
        }
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(b.permit(), Err(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.permit().is_ok(), "one probe");
        assert!(b.permit().is_err(), "only one probe");
        b.failure();
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(b.permit(), Err(Duration::from_secs(20)), "open twice as long after a failed probe");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(b.permit().is_ok());
        b.failure();
        assert_eq!(b.permit(), Err(Duration::from_secs(25)), "capped");
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(b.permit().is_ok());
        b.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.permit().is_ok() && b.permit().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_holds_xero_and_quickbooks_windows() {
        for (limit, window, most) in [
            (RateLimit::XERO, Duration::from_secs(60), 60),
            (RateLimit::QUICKBOOKS, Duration::from_secs(1), 10),
            (RateLimit::QUICKBOOKS, Duration::from_secs(60), 500),
        ] {
            let bucket = TokenBucket::new(limit);
            let start = Instant::now();
            let mut times = Vec::new();
            for _ in 0..300 {
                bucket.acquire().await;
                times.push(Instant::now() - start);
            }
            for (i, t) in times.iter().enumerate() {
                let within = times[i..].iter().take_while(|u| **u < *t + window).count();
                assert!(within <= most, "{limit:?}: {within} requests in {window:?} from {t:?}");
            }
            // And the bucket is not needlessly slow: the long-run rate is the refill rate.
            let span = times[299] - times[0];
            let expected = limit.every * (300 - limit.capacity);
            assert!(span <= expected + limit.every, "{limit:?}: {span:?} > {expected:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn members_sharing_a_bucket_hold_the_limit_together() {
        // Three members, each with its own bucket at a third of Xero's limit, all sending flat out.
        let (limit, window, most) = (RateLimit::XERO, Duration::from_secs(60), 60);
        let start = Instant::now();
        let times = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let times = std::sync::Arc::clone(&times);
            tasks.push(tokio::spawn(async move {
                let bucket = TokenBucket::new(limit);
                for _ in 0..100 {
                    bucket.acquire_share(3).await;
                    times.lock().unwrap().push(Instant::now() - start);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut times = times.lock().unwrap().clone();
        times.sort();
        for (i, t) in times.iter().enumerate() {
            let within = times[i..].iter().take_while(|u| **u < *t + window).count();
            assert!(within <= most, "{within} requests of the group in {window:?} from {t:?}");
        }
        // Not needlessly slow: the group's long-run rate is one token per `every`.
        let span = times[299] - times[0];
        assert!(span <= limit.every * 300, "{span:?}");
    }
}
