//! Exponential backoff with a cap and jitter. Pure: the caller supplies the randomness, so
//! the schedule is unit-tested exactly.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// Consecutive failures so far.
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max: max.max(base), failures: 0 }
    }

    /// Applies new settings (after a reload) without forgetting the failure count.
    pub fn reconfigure(&mut self, base: Duration, max: Duration) {
        self.base = base;
        self.max = max.max(base);
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The un-jittered delay before retry number `attempt` (0-based):
    /// `min(base * 2^attempt, max)`.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).unwrap_or(self.max).min(self.max)
    }

    /// Records a failure and returns how long to wait before the next try. `unit` is a
    /// random number in `[0, 1)`; the delay is drawn from `[d/2, d]` ("equal jitter"), so a
    /// fleet of workers does not retry in lock-step yet never retries faster than half the
    /// schedule. After `max_retries` failures in a row the schedule is over: every further
    /// try waits the full `max` (no jitter), until a success resets the count.
    pub fn next_delay(&mut self, unit: f64, max_retries: u32) -> Duration {
        let exhausted = self.failures >= max_retries.max(1);
        self.failures = self.failures.saturating_add(1);
        if exhausted {
            return self.max;
        }
        let d = self.delay_for(self.failures - 1);
        let unit = if unit.is_finite() { unit.clamp(0.0, 1.0) } else { 0.0 };
        d / 2 + d.mul_f64(0.5 * unit)
    }
}

/// A small xorshift generator for jitter: no need for cryptographic quality.
#[derive(Clone, Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn schedule_doubles_and_caps() {
        let b = Backoff::new(ms(1000), ms(30_000));
        let got: Vec<u64> = (0..8).map(|a| b.delay_for(a).as_millis() as u64).collect();
        assert_eq!(got, vec![1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(b.delay_for(1000), ms(30_000), "huge attempt counts do not overflow");
    }

    #[test]
    fn max_below_base_is_raised_to_base() {
        let b = Backoff::new(ms(500), ms(100));
        assert_eq!(b.delay_for(0), ms(500));
        assert_eq!(b.delay_for(5), ms(500));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut b = Backoff::new(ms(1000), ms(8000));
        assert_eq!(b.next_delay(0.0, 10), ms(500));
        assert_eq!(b.next_delay(1.0, 10), ms(2000));
        assert_eq!(b.next_delay(0.5, 10), ms(3000));
        assert_eq!(b.failures(), 3);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay(f64::NAN, 10), ms(500));
    }

    #[test]
    fn reconfigure_keeps_the_count() {
        let mut b = Backoff::new(ms(1000), ms(30_000));
        b.next_delay(0.0, 5);
        b.next_delay(0.0, 5);
        b.reconfigure(ms(10), ms(50));
        assert_eq!(b.delay_for(b.failures()), ms(40));
    }

    #[test]
    fn after_max_retries_every_try_waits_the_maximum() {
        let mut b = Backoff::new(ms(100), ms(60_000));
        let got: Vec<u64> = (0..6).map(|_| b.next_delay(1.0, 3).as_millis() as u64).collect();
        assert_eq!(got, vec![100, 200, 400, 60_000, 60_000, 60_000]);
        // Even with the smallest jitter draw: the cap is not jittered.
        assert_eq!(b.next_delay(0.0, 3), ms(60_000));
        b.reset();
        assert_eq!(b.next_delay(1.0, 3), ms(100));
    }

    #[test]
    fn jitter_is_in_unit_interval_and_varies() {
        let mut j = Jitter::new(42);
        let xs: Vec<f64> = (0..1000).map(|_| j.unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }
}
