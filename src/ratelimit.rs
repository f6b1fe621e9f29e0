//! Token bucket over Redis round trips (`redis_sync.rate_limit`, operations per second).
//! Pure: time is passed in, so it is unit-tested without sleeping.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Tokens added per second; 0 means unlimited.
    rate: u32,
    /// Most tokens the bucket holds: one second's worth, so an idle worker may burst up to
    /// `rate` operations at once and never more.
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        TokenBucket { rate, capacity: rate as f64, tokens: rate as f64, last: now }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Changes the rate (after a reload). The bucket keeps its level, clipped to the new size.
    pub fn set_rate(&mut self, rate: u32, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.capacity = rate as f64;
        self.tokens = self.tokens.min(self.capacity);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.capacity);
    }

    /// Takes one token. `Ok(())` when allowed now; otherwise `Err(wait)`, the time until a
    /// token is available (nothing is taken then).
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing / self.rate as f64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, t0);
        assert!((0..100_000).all(|_| b.try_take(t0).is_ok()));
    }

    #[test]
    fn burst_is_one_second_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert_eq!((0..20).filter(|_| b.try_take(t0).is_ok()).count(), 10);
        let wait = b.try_take(t0).expect_err("empty bucket");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // 0.25 s later two tokens have come back, not three.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!((0..5).filter(|_| b.try_take(t1).is_ok()).count(), 2);
    }

    #[test]
    fn long_idle_does_not_overfill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| b.try_take(later).is_ok()).count(), 5);
    }

    #[test]
    fn sustained_rate_matches_setting() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        let mut now = t0;
        let mut taken = 0;
        // Simulate 10 s of a caller that waits exactly as told.
        while now < t0 + Duration::from_secs(10) {
            match b.try_take(now) {
                Ok(()) => taken += 1,
                Err(w) => now += w,
            }
        }
        // 100 burst + 100/s * 10 s
        assert!((1095..=1101).contains(&taken), "{taken}");
    }

    #[test]
    fn set_rate_clips_and_lifts() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        b.set_rate(2, t0);
        assert_eq!((0..10).filter(|_| b.try_take(t0).is_ok()).count(), 2);
        b.set_rate(0, t0);
        assert!(b.try_take(t0).is_ok());
        assert_eq!(b.rate(), 0);
    }
}
