//! `redis_sync.rate_limit` (Redis round trips per second) shared between the worker's lanes.
//! Pure: time is passed in, so it is unit-tested without sleeping.
//!
//! How the budget is shared:
//! - Each lane has a bucket of its own that fills at its share of the rate and holds one
//!   second of it: stream reads 80 %, discovery 10 %, key-value passes 10 %. A lane always
//!   gets its share, whatever the others do.
//! - What a full bucket would overflow (a lane that has nothing to do) goes to a spare bucket
//!   holding at most one second of the whole rate. Stream reads take from it as soon as their
//!   own bucket is empty; discovery and key-value passes only while it holds more than a
//!   fifth of a second's worth, which is kept for bursts of stream reads. So stream reads are
//!   served first, and an idle worker's lanes together may still use the whole rate.
//! - At `rate_limit = 0` nothing is limited.

use std::time::{Duration, Instant};

/// The kinds of Redis work, each with its own share of the rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Streams = 0,
    Discovery = 1,
    KeyValues = 2,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Streams, Lane::Discovery, Lane::KeyValues];

    /// The lane's name, as `redis_sync_lanes()` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Streams => "streams",
            Lane::Discovery => "discovery",
            Lane::KeyValues => "key_values",
        }
    }

    /// Fraction of `rate_limit` the lane is guaranteed.
    pub fn share(self) -> f64 {
        match self {
            Lane::Streams => 0.8,
            Lane::Discovery | Lane::KeyValues => 0.1,
        }
    }
}

/// Part of a second's worth of the whole rate that only stream reads may take from the spare.
const STREAM_RESERVE: f64 = 0.2;

#[derive(Clone, Debug)]
pub struct Budget {
    /// Tokens per second over all lanes; 0 means unlimited.
    rate: u32,
    own: [f64; 3],
    spare: f64,
    last: Instant,
}

impl Budget {
    /// A budget that starts full (a worker that just started may burst).
    pub fn new(rate: u32, now: Instant) -> Budget {
        let mut b = Budget { rate, own: [0.0; 3], spare: 0.0, last: now };
        b.fill();
        b
    }

    fn fill(&mut self) {
        for lane in Lane::ALL {
            self.own[lane as usize] = self.cap(lane);
        }
        self.spare = self.rate as f64;
    }

    fn cap(&self, lane: Lane) -> f64 {
        self.rate as f64 * lane.share()
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Changes the rate (after a reload); the buckets keep their levels, clipped.
    pub fn set_rate(&mut self, rate: u32, now: Instant) {
        self.refill(now);
        let was_unlimited = self.rate == 0;
        self.rate = rate;
        if was_unlimited {
            self.fill();
            return;
        }
        for lane in Lane::ALL {
            self.own[lane as usize] = self.own[lane as usize].min(self.cap(lane));
        }
        self.spare = self.spare.min(rate as f64);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut overflow = 0.0;
        for lane in Lane::ALL {
            let cap = self.cap(lane);
            let level = self.own[lane as usize] + elapsed * cap;
            overflow += (level - cap).max(0.0);
            self.own[lane as usize] = level.min(cap);
        }
        self.spare = (self.spare + overflow).min(self.rate as f64);
    }

    /// Takes one token for `lane`. `Ok(())` when allowed now; otherwise `Err(wait)`, the time
    /// until the lane's own bucket has a token (nothing is taken then).
    pub fn try_take(&mut self, lane: Lane, now: Instant) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        self.refill(now);
        // Stream reads take what the other lanes left before their own share (which then
        // stays ready for a burst); the others take their own share first, and the spare
        // only above the stream reserve.
        let keep = match lane {
            Lane::Streams => 0.0,
            _ => STREAM_RESERVE * self.rate as f64,
        };
        let spare_first = lane == Lane::Streams;
        if spare_first && self.spare >= 1.0 {
            self.spare -= 1.0;
            return Ok(());
        }
        let own = &mut self.own[lane as usize];
        if *own >= 1.0 {
            *own -= 1.0;
            return Ok(());
        }
        if self.spare >= 1.0 + keep {
            self.spare -= 1.0;
            return Ok(());
        }
        // Until the own bucket has a token, or the spare one has enough (it fills at the
        // rate of the lanes whose buckets are full).
        let own_wait = (1.0 - self.own[lane as usize]) / self.cap(lane);
        let overflow: f64 = Lane::ALL
            .iter()
            .filter(|l| **l != lane && self.own[**l as usize] >= self.cap(**l))
            .map(|l| self.cap(*l))
            .sum();
        let spare_wait = if overflow > 0.0 {
            ((1.0 + keep - self.spare) / overflow).max(0.0)
        } else {
            f64::INFINITY
        };
        Err(Duration::from_secs_f64(own_wait.min(spare_wait)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens `lane` gets over `secs` when it asks as fast as it may, while `others` ask too.
    fn run(rate: u32, secs: u64, busy: &[Lane]) -> [u64; 3] {
        let t0 = Instant::now();
        let mut b = Budget::new(rate, t0);
        let mut got = [0u64; 3];
        let mut now = t0;
        let step = Duration::from_micros(500);
        while now < t0 + Duration::from_secs(secs) {
            for &lane in busy {
                while b.try_take(lane, now).is_ok() {
                    got[lane as usize] += 1;
                }
            }
            now += step;
        }
        got
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = Budget::new(0, t0);
        assert!((0..100_000).all(|_| b.try_take(Lane::KeyValues, t0).is_ok()));
    }

    #[test]
    fn every_lane_gets_its_share_when_all_are_busy() {
        let got = run(100, 10, &[Lane::Streams, Lane::Discovery, Lane::KeyValues]);
        // 10 s at the shares, plus the first second's full buckets.
        let [s, d, k] = got;
        assert!((880..=1000).contains(&s), "{got:?}");
        assert!((100..=125).contains(&d), "{got:?}");
        assert!((100..=125).contains(&k), "{got:?}");
        assert!(s + d + k <= 1000 + 100 + 100, "{got:?}");
    }

    #[test]
    fn stream_reads_take_what_idle_lanes_leave() {
        let [s, _, _] = run(100, 10, &[Lane::Streams]);
        assert!((1000..=1200).contains(&s), "{s}");
    }

    #[test]
    fn a_lone_background_lane_may_use_most_of_the_rate_but_not_the_stream_reserve() {
        let [_, _, k] = run(100, 10, &[Lane::KeyValues]);
        // Its own 10/s and the spare above the reserve: about the whole rate.
        assert!((900..=1200).contains(&k), "{k}");
        // Right after, stream reads still find their reserve and their own bucket.
        let t0 = Instant::now();
        let mut b = Budget::new(100, t0);
        while b.try_take(Lane::KeyValues, t0).is_ok() {}
        let streams = (0..200).filter(|_| b.try_take(Lane::Streams, t0).is_ok()).count();
        assert_eq!(streams, 80 + 20);
    }

    #[test]
    fn an_empty_bucket_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = Budget::new(10, t0);
        while b.try_take(Lane::Discovery, t0).is_ok() {}
        // The other lanes are idle: their overflow (9/s) refills the spare above the
        // reserve (2) sooner than the own 1/s share.
        let wait = b.try_take(Lane::Discovery, t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 1.0 / 9.0).abs() < 1e-9, "{wait:?}");
        // With stream reads busy too, only the own share is left.
        while b.try_take(Lane::Streams, t0).is_ok() {}
        let wait = b.try_take(Lane::Discovery, t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 1.0 / 1.0).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn set_rate_clips_and_lifts() {
        let t0 = Instant::now();
        let mut b = Budget::new(100, t0);
        b.set_rate(10, t0);
        assert_eq!((0..100).filter(|_| b.try_take(Lane::Streams, t0).is_ok()).count(), 8 + 10);
        b.set_rate(0, t0);
        assert!(b.try_take(Lane::Streams, t0).is_ok());
        assert_eq!(b.rate(), 0);
        b.set_rate(50, t0);
        assert_eq!((0..200).filter(|_| b.try_take(Lane::Streams, t0).is_ok()).count(), 40 + 50);
    }
}
