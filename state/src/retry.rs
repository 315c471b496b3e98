//! The workspace's one retry policy: capped exponential backoff with full jitter.
//!
//! Attempt `n` (0-based) waits a uniform random time in `[0, min(cap, base · 2ⁿ)]`, so clients that
//! failed together do not retry together ("full jitter", as the AWS SDKs do). The stream readers and
//! producers (`stockflow-pipeline`), the state commits and the connectors' drains
//! (`stockflow-connectors`) all back off through this type; it lives in the base crate because both
//! depend on it and on nothing else.
//!
//! Two ways to use it: [`Backoff::next_delay`] counts attempts itself and stops after
//! [`Backoff::limited`] attempts; [`Backoff::delay`] takes the attempt number from a caller that keeps
//! its own (a drain lane's saved in-flight request remembers its attempts across restarts).

use std::time::Duration;

/// The shape of a backoff: the first ceiling and the largest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First ceiling.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
}

impl BackoffConfig {
    /// A shape with the given first and largest ceilings.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        BackoffConfig { base, cap }
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { base: Duration::from_millis(200), cap: Duration::from_secs(60) }
    }
}

/// A backoff sequence: a [`BackoffConfig`], a seeded xorshift generator (deterministic in tests,
/// different per lane or per process), and an attempt counter.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    rng: u64,
    attempt: u32,
    max_attempts: u32,
}

impl Backoff {
    /// A sequence seeded with `seed` (any value; 0 is remapped), attempts unlimited.
    pub fn new(cfg: BackoffConfig, seed: u64) -> Self {
        Backoff { cfg, rng: seed | 1, attempt: 0, max_attempts: u32::MAX }
    }

    /// A sequence seeded from the clock, so processes that start together still spread out.
    pub fn from_clock(cfg: BackoffConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self::new(cfg, seed)
    }

    /// The same sequence, giving up after `max_attempts` delays ([`Backoff::next_delay`] → `None`).
    pub fn limited(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The ceiling of attempt `attempt` (0-based): `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.cfg.base.saturating_mul(factor).min(self.cfg.cap)
    }

    /// The wait before retry `attempt` (0-based, counted by the caller): uniform in `[0, ceiling]`.
    pub fn delay(&mut self, attempt: u32) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let nanos = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { self.rng % (nanos.saturating_add(1)) })
    }

    /// The next wait, counting the attempt, or `None` when the attempts are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.attempt >= self.max_attempts {
            return None;
        }
        let d = self.delay(self.attempt);
        self.attempt += 1;
        Some(d)
    }

    /// Starts the count over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out by [`Backoff::next_delay`] since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_stay_under_the_growing_ceiling_and_stop() {
        let mut b = Backoff::new(BackoffConfig::new(ms(10), ms(50)), 3).limited(5);
        for c in [10, 20, 40, 50, 50] {
            assert!(b.next_delay().unwrap() <= ms(c));
        }
        assert_eq!(b.next_delay(), None);
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert!(b.next_delay().unwrap() <= ms(10));
    }

    #[test]
    fn jitter_spreads_over_the_whole_window_and_seeds_differ() {
        let cfg = BackoffConfig::new(ms(100), ms(1_000));
        let mut b = Backoff::new(cfg, 7);
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(10)).collect();
        assert!(delays.iter().all(|d| *d <= ms(1_000)));
        assert!(delays.iter().any(|d| *d < ms(250)) && delays.iter().any(|d| *d > ms(750)));
        let again: Vec<Duration> = {
            let mut b = Backoff::new(cfg, 7);
            (0..200).map(|_| b.delay(10)).collect()
        };
        assert_eq!(delays, again, "same seed, same sequence");
        let mut other = Backoff::new(cfg, 8);
        assert_ne!(delays[..5], (0..5).map(|_| other.delay(10)).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn huge_attempt_numbers_saturate_at_the_cap() {
        let b = Backoff::new(BackoffConfig::new(ms(200), Duration::from_secs(60)), 1);
        assert_eq!(b.ceiling(0), ms(200));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
    }
}
