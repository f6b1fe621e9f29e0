//! Landed entries on their way to `XACK`: committed, then flushed here, then (with
//! `redis_sync.ack_after = standby`) flushed by the standbys. Until then an entry stays in
//! the group's pending list, so whichever server takes over reads it again; reading pauses
//! while too many wait, so memory stays bounded.
//!
//! The standbys that count are those `synchronous_standby_names` asks for; when it is empty,
//! every connected streaming standby. With none connected, acknowledgements wait
//! [`STANDBY_GONE`] after the last one left (or after the worker started): a standby that
//! just lost its connection may be about to be promoted (its primary dying), and a dying
//! primary's worker exits well within that time. After it they follow the local flush, so a
//! server that has no standby (a standby just promoted, say) goes on; the log says so.

use std::time::{Duration, Instant};

use crate::gucs::{AckAfter, Settings};
use crate::pg::standbys::Flushed;

/// How often `pg_stat_replication` is read while entries wait for the standbys and they
/// keep up.
pub const STANDBY_POLL: Duration = Duration::from_millis(20);
/// How often once they have not moved for [`STANDBY_IDLE`] (a standby that is gone or stuck
/// is not asked 50 times a second).
pub const STANDBY_SLOW_POLL: Duration = Duration::from_millis(500);
const STANDBY_IDLE: Duration = Duration::from_secs(2);
/// With no standby named and none connected, acknowledgements wait this long after the last
/// one left, then follow the local flush.
pub const STANDBY_GONE: Duration = Duration::from_secs(10);
/// A wait this long is logged (once, and again when it ends).
const WARN_AFTER: Duration = Duration::from_secs(10);

/// Reading pauses once this many committed entries wait for their acknowledgement: a
/// hundred batches, and at least 10,000 entries.
pub fn awaiting_bound(s: &Settings) -> usize {
    (s.batch_size as usize).saturating_mul(100).max(10_000)
}

/// What the worker knows of the standbys' flush position.
#[derive(Debug, Default)]
pub struct StandbyWait {
    /// The WAL is safe on the standbys up to here (as last read).
    pub safe: u64,
    /// The last reading.
    pub last: Flushed,
    /// When a standby was last seen connected (or first looked for).
    seen: Option<Instant>,
    checked: Option<Instant>,
    moved: Option<Instant>,
    /// When entries began to wait for the standbys (not only for the local flush).
    since: Option<Instant>,
    logged: bool,
    /// Whether acknowledgements follow the local flush for want of a standby (as last said).
    alone: bool,
}

/// What to say in the log about a wait.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitNews {
    Started,
    Ended,
}

impl StandbyWait {
    /// Whether `pg_stat_replication` should be read now, for commits up to `newest`.
    pub fn due(&self, newest: u64, now: Instant) -> bool {
        if self.safe >= newest {
            return false;
        }
        let Some(at) = self.checked else { return true };
        now.saturating_duration_since(at) >= self.poll(now)
    }

    /// How often to look: often while the standbys move, seldom once they stopped.
    pub fn poll(&self, now: Instant) -> Duration {
        let still = self.moved.is_none_or(|m| now.saturating_duration_since(m) >= STANDBY_IDLE);
        if still {
            STANDBY_SLOW_POLL
        } else {
            STANDBY_POLL
        }
    }

    /// Takes in a reading of `pg_stat_replication`.
    pub fn read(&mut self, f: Flushed, now: Instant) {
        if f.position > self.safe {
            self.moved = Some(now);
        }
        // The one that left was connected until this reading, as far as anyone knows.
        if f.connected > 0 || self.last.connected > 0 || self.seen.is_none() {
            self.seen = Some(now);
        }
        // Not `max`: when the standbys that count change, the new ones may be behind.
        self.safe = f.position;
        self.last = f;
        self.checked = Some(now);
    }

    /// The standbys could not be read: nothing more is known safe, and a standby may be
    /// connected (the wait for one to come back starts again).
    pub fn unknown(&mut self, now: Instant) {
        self.seen = Some(now);
        self.checked = Some(now);
    }

    /// Whether no standby counts any more: none named, none connected for
    /// [`STANDBY_GONE`]. Acknowledgements then follow the local flush.
    pub fn none_counts(&self, now: Instant) -> bool {
        !self.last.named
            && self.last.connected == 0
            && self.seen.is_some_and(|t| now.saturating_duration_since(t) >= STANDBY_GONE)
    }

    /// `Some(true)` when no standby counts any more, `Some(false)` when one counts again
    /// (once each, for the log).
    pub fn alone_news(&mut self, now: Instant) -> Option<bool> {
        let alone = self.none_counts(now);
        (alone != self.alone).then(|| {
            self.alone = alone;
            alone
        })
    }

    /// Up to where the standbys let acknowledgements go.
    pub fn limit(&self, now: Instant) -> u64 {
        if self.none_counts(now) {
            u64::MAX
        } else {
            self.safe
        }
    }

    /// Notes whether entries the local flush would release wait for the standbys, and what
    /// the log should say about it.
    pub fn note(&mut self, waiting: bool, now: Instant) -> Option<WaitNews> {
        match (waiting, self.since) {
            (true, None) => {
                self.since = Some(now);
                None
            }
            (true, Some(since))
                if !self.logged && now.saturating_duration_since(since) >= WARN_AFTER =>
            {
                self.logged = true;
                Some(WaitNews::Started)
            }
            (false, Some(_)) => {
                self.since = None;
                std::mem::take(&mut self.logged).then_some(WaitNews::Ended)
            }
            _ => None,
        }
    }

    /// How long the standbys have held entries up.
    pub fn waited(&self, now: Instant) -> Duration {
        self.since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

/// The position up to which acknowledgements may go: the local flush, and with
/// `ack_after = standby` no further than the standbys.
pub fn releasable(ack_after: AckAfter, local: u64, standbys: u64) -> u64 {
    match ack_after {
        AckAfter::Local => local,
        AckAfter::Standby => local.min(standbys),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_mode_releases_no_further_than_the_standbys() {
        assert_eq!(releasable(AckAfter::Local, 500, 0), 500);
        assert_eq!(releasable(AckAfter::Standby, 500, 0), 0);
        assert_eq!(releasable(AckAfter::Standby, 500, 300), 300);
        assert_eq!(releasable(AckAfter::Standby, 200, 300), 200);
    }

    #[test]
    fn the_standbys_are_read_often_while_they_move_and_seldom_once_they_stop() {
        let t0 = Instant::now();
        let mut w = StandbyWait::default();
        assert!(w.due(100, t0));
        w.read(Flushed { position: 50, connected: 1, named: false }, t0);
        assert!(!w.due(100, t0 + Duration::from_millis(5)));
        assert!(w.due(100, t0 + STANDBY_POLL));
        // Nothing to ask while what waits is already safe.
        assert!(!w.due(50, t0 + Duration::from_secs(5)));
        let later = t0 + STANDBY_IDLE + Duration::from_millis(1);
        w.read(Flushed { position: 50, connected: 1, named: false }, later);
        assert!(!w.due(100, later + STANDBY_POLL));
        assert!(w.due(100, later + STANDBY_SLOW_POLL));
    }

    #[test]
    fn without_a_standby_acknowledgements_wait_a_while_then_follow_the_local_flush() {
        let t0 = Instant::now();
        let none = Flushed { position: 0, connected: 0, named: false };
        // A worker that starts with no standby waits too: one may be on its way back.
        let mut w = StandbyWait::default();
        w.read(none, t0);
        assert_eq!(w.limit(t0 + Duration::from_secs(1)), 0);
        assert_eq!(w.alone_news(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.limit(t0 + STANDBY_GONE), u64::MAX);
        assert_eq!(w.alone_news(t0 + STANDBY_GONE), Some(true));
        assert_eq!(w.alone_news(t0 + STANDBY_GONE), None);
        // One connects, then leaves: the wait starts again from when it was last seen.
        let t1 = t0 + STANDBY_GONE * 2;
        w.read(Flushed { position: 300, connected: 1, named: false }, t1);
        assert_eq!(w.limit(t1), 300);
        assert_eq!(w.alone_news(t1), Some(false));
        // (Found gone a second later: it counts as connected until then.)
        let t2 = t1 + Duration::from_secs(1);
        w.read(none, t2);
        assert_eq!(w.limit(t2 + Duration::from_secs(5)), 0);
        assert_eq!(w.limit(t1 + STANDBY_GONE), 0);
        assert_eq!(w.limit(t2 + STANDBY_GONE), u64::MAX);
        // Named standbys are waited for however long they are away.
        let mut named = StandbyWait::default();
        named.read(Flushed { position: 0, connected: 0, named: true }, t0);
        assert_eq!(named.limit(t0 + STANDBY_GONE * 10), 0);
    }

    #[test]
    fn a_long_wait_is_logged_once_and_its_end_too() {
        let t0 = Instant::now();
        let mut w = StandbyWait::default();
        assert_eq!(w.note(true, t0), None);
        assert_eq!(w.note(true, t0 + Duration::from_secs(1)), None);
        assert_eq!(w.note(true, t0 + WARN_AFTER), Some(WaitNews::Started));
        assert_eq!(w.note(true, t0 + WARN_AFTER * 2), None);
        assert_eq!(w.waited(t0 + WARN_AFTER * 2), WARN_AFTER * 2);
        assert_eq!(w.note(false, t0 + WARN_AFTER * 3), Some(WaitNews::Ended));
        // A short wait says nothing.
        assert_eq!(w.note(true, t0 + WARN_AFTER * 4), None);
        assert_eq!(w.note(false, t0 + WARN_AFTER * 4 + Duration::from_secs(1)), None);
    }
}
