//! The one retry policy: capped exponential backoff with full jitter.

use std::time::Duration;

/// Capped exponential backoff with full jitter: attempt `n` sleeps a uniform random time in
/// `[0, min(cap, base · 2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    max_attempts: u32,
    rng: u64,
}

impl Backoff {
    /// A policy with the given base, cap and number of attempts.
    pub fn new(base: Duration, cap: Duration, max_attempts: u32) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Backoff { base, cap, attempt: 0, max_attempts, rng: seed | 1 }
    }

    /// The next delay, or `None` when the attempts are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.attempt >= self.max_attempts {
            return None;
        }
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.cap);
        self.attempt += 1;
        // xorshift64*: plenty for jitter.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let nanos = ceiling.as_nanos() as u64;
        Some(Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) }))
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_the_growing_ceiling_and_stop() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(50), 5);
        let ceilings = [10, 20, 40, 50, 50];
        for c in ceilings {
            assert!(b.next_delay().unwrap() <= Duration::from_millis(c));
        }
        assert_eq!(b.next_delay(), None);
        assert_eq!(b.attempts(), 5);
    }
}
