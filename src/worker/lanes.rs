//! Health of the worker's lanes (stream reads, discovery, key-value passes) and of its link to
//! the Redis server.
//!
//! A lane's own failure (a Postgres error writing its rows, a Redis error about its keys, a
//! missing grant) backs off that lane only, on its own schedule; the others go on. Redis
//! itself being unreachable is one condition for all lanes of a process: it is counted,
//! logged and backed off once, the lanes wait, and the next job of the stream worker's
//! discovery lane (or the key-value worker's next pass start) is the probe that finds the
//! server back.

use std::time::{Duration, Instant};

use super::log::{explain_privileges, Log};
use super::Role;
use crate::backoff::{Backoff, Jitter};
use crate::error::SyncError;
use crate::gucs::Settings;
use crate::ratelimit::Lane;
use crate::shmem::{self, LaneState};

/// Longest wait before a table that refused every row is tried again.
const REFUSAL_PROBE: Duration = Duration::from_secs(5);

/// Retries, logging and the hold of one schedule of retries.
pub struct Retry {
    backoff: Backoff,
    /// No new try before this.
    hold_until: Option<Instant>,
    /// The next try follows a failure (counted in `retries` when made).
    retry_due: bool,
}

impl Retry {
    fn new(s: &Settings) -> Retry {
        Retry {
            backoff: Backoff::new(s.backoff_base, s.backoff_max),
            hold_until: None,
            retry_due: false,
        }
    }

    fn reconfigure(&mut self, s: &Settings) {
        self.backoff.reconfigure(s.backoff_base, s.backoff_max);
    }

    /// May a try be made now? Counts it in `retries` when it follows a failure.
    fn may_try(&mut self, now: Instant) -> bool {
        if self.hold_until.is_some_and(|t| now < t) {
            return false;
        }
        if std::mem::take(&mut self.retry_due) {
            shmem::bump(|c| &c.retries, 1);
        }
        true
    }

    /// Records a failure; returns the delay before the next try. Logged when trouble starts
    /// and once more when `max_retries` failures in a row end the schedule (from then on
    /// every try waits `backoff_max`), not once per try.
    fn failed(
        &mut self,
        what: &str,
        err: &SyncError,
        s: &Settings,
        jitter: &mut Jitter,
        log: &Log,
        now: Instant,
    ) -> Duration {
        let mut delay = self.backoff.next_delay(jitter.unit(), s.max_retries);
        if err.is_refusal() {
            // The table refuses every row: probed again soon, so writes resume within
            // seconds of the cause going away.
            delay = delay.min(REFUSAL_PROBE);
        }
        let failures = self.backoff.failures();
        self.retry_due = true;
        self.hold_until = Some(now + delay);
        if failures == 1 {
            log.error(err);
            log.info(&format!("{what}retrying in {} ms", delay.as_millis()));
        } else if failures == s.max_retries.max(1) + 1 && !err.is_refusal() {
            log.warning(&format!(
                "{what}{} retries failed in a row; retrying every {} ms (redis_sync.backoff_max) until it works. Last error: {err}",
                s.max_retries,
                delay.as_millis()
            ));
        }
        delay
    }

    /// A try worked: returns whether it ended a run of failures.
    fn succeeded(&mut self) -> bool {
        self.hold_until = None;
        self.retry_due = false;
        let recovered = self.backoff.failures() > 0;
        self.backoff.reset();
        recovered
    }

    fn failing(&self) -> bool {
        self.backoff.failures() > 0
    }

    /// How long until the next try, when one is held back (not once the hold is over: what
    /// else gates the try says when it is due).
    fn wait(&self, now: Instant) -> Option<Duration> {
        self.hold_until.filter(|t| *t > now).map(|t| t - now)
    }
}

/// One lane's health, published in `redis_sync_lanes()`.
pub struct LaneHealth {
    lane: Lane,
    retry: Retry,
    pub state: LaneState,
    last_success: i64,
    last_error: String,
    last_error_time: i64,
}

impl LaneHealth {
    fn new(lane: Lane, s: &Settings) -> LaneHealth {
        LaneHealth {
            lane,
            retry: Retry::new(s),
            state: LaneState::Idle,
            last_success: 0,
            last_error: String::new(),
            last_error_time: 0,
        }
    }

    /// May the lane start work now (it is not backing off)?
    pub fn may_work(&mut self, now: Instant) -> bool {
        self.retry.may_try(now)
    }

    pub fn backing_off(&self) -> bool {
        self.retry.failing()
    }

    /// How long until the lane may try again, when it is held back.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.retry.wait(now)
    }

    pub fn succeeded(&mut self, log: &Log) {
        if self.retry.succeeded() {
            log.info(&format!("{}: syncing again after errors", self.label()));
        }
        self.last_success = shmem::now();
    }

    fn label(&self) -> &'static str {
        match self.lane {
            Lane::Streams => "stream sync",
            Lane::Discovery => "stream discovery",
            Lane::KeyValues => "key-value sync",
        }
    }
}

/// The link to the Redis server, shared by the lanes.
pub struct Link {
    retry: Retry,
    /// Connected (a lane's last exchange with Redis worked).
    pub up: bool,
    /// Connected at least once since the worker started.
    pub ever: bool,
}

/// Every lane's health and the link's, as one worker process sees them: each process has
/// its own view of the link, and publishes only the lanes it runs. `redis_connected` is the
/// stream worker's.
pub struct Lanes {
    pub link: Link,
    lanes: [LaneHealth; 3],
    jitter: Jitter,
    role: Role,
}

impl Lanes {
    pub fn new(role: Role, s: &Settings, seed: u64) -> Lanes {
        Lanes {
            link: Link { retry: Retry::new(s), up: false, ever: false },
            lanes: Lane::ALL.map(|l| LaneHealth::new(l, s)),
            jitter: Jitter::new(seed),
            role,
        }
    }

    /// Sets `redis_connected`, when this process is the (first) stream worker.
    fn show_connected(&self, connected: bool) {
        if self.role == Role::Streams && crate::gucs::stream_worker() == 0 {
            shmem::update(|st| st.redis_connected = connected);
        }
    }

    pub fn get(&mut self, lane: Lane) -> &mut LaneHealth {
        &mut self.lanes[lane as usize]
    }

    pub fn get_ref(&self, lane: Lane) -> &LaneHealth {
        &self.lanes[lane as usize]
    }

    pub fn reconfigure(&mut self, s: &Settings) {
        self.link.retry.reconfigure(s);
        for l in &mut self.lanes {
            l.retry.reconfigure(s);
        }
    }

    /// A new Redis server: nothing of the old one's failures carries over.
    pub fn reset_link(&mut self) {
        self.link.up = false;
        self.link.retry.succeeded();
    }

    /// May the probe that finds Redis again be sent now (the link is down and its delay is
    /// over)? Counts the retry.
    pub fn may_probe(&mut self, now: Instant) -> bool {
        !self.link.up && self.link.retry.may_try(now)
    }

    /// How long until the link's next probe.
    pub fn probe_wait(&self, now: Instant) -> Duration {
        self.link.retry.wait(now).unwrap_or(Duration::ZERO)
    }

    /// A lane's exchange with Redis worked: the link is up.
    pub fn connected(&mut self, server: &str, log: &Log) {
        if self.link.up {
            return;
        }
        let again = self.link.retry.succeeded() || self.link.ever;
        self.link.up = true;
        self.link.ever = true;
        log.info(&if again {
            format!("connected to Redis {server} again")
        } else {
            format!("connected to Redis {server}")
        });
        self.show_connected(true);
    }

    /// A lane failed with `err`: Redis unreachable takes the link down (once for all lanes);
    /// anything else backs off that lane only. Both are counted in `errors` and shown in
    /// `last_error` and the lane's row.
    pub fn failed(&mut self, lane: Lane, err: SyncError, s: &Settings, log: &Log, now: Instant) {
        let err = explain_privileges(err, s);
        let message = format!("{}: {err}", self.lanes[lane as usize].label());
        if err.connection_lost() {
            // The first lane to notice takes the link down; the others wait with it.
            if self.link.up {
                self.link.up = false;
                self.link.retry.failed("", &err, s, &mut self.jitter, log, now);
                shmem::record_error(&err.to_string());
                self.show_connected(false);
            }
        } else {
            let health = &mut self.lanes[lane as usize];
            let what = format!("{}: ", health.label());
            health.retry.failed(&what, &err, s, &mut self.jitter, log, now);
            shmem::record_error(&message);
        }
        let health = &mut self.lanes[lane as usize];
        health.last_error = message;
        health.last_error_time = shmem::now();
    }

    /// The link's probe, sent by `lane`, failed again (Redis is still not there).
    pub fn probe_failed(
        &mut self,
        lane: Lane,
        err: SyncError,
        s: &Settings,
        log: &Log,
        now: Instant,
    ) {
        let err = explain_privileges(err, s);
        self.link.up = false;
        self.link.retry.failed("", &err, s, &mut self.jitter, log, now);
        shmem::record_error(&err.to_string());
        let health = &mut self.lanes[lane as usize];
        health.last_error = format!("{}: {err}", health.label());
        health.last_error_time = shmem::now();
    }

    /// Is anything of this process backing off (its state is then `backing_off`)? Not
    /// while the first connection is still being made.
    pub fn any_failing(&self) -> bool {
        self.link.retry.failing()
            || (self.link.ever && !self.link.up)
            || self.role.lanes().iter().any(|l| self.lanes[*l as usize].retry.failing())
    }

    /// Writes the rows of this process's lanes to shared memory (the first stream worker's
    /// for the stream lanes: the others show in `redis_sync_workers()`).
    pub fn publish(&self) {
        if self.role == Role::Streams && crate::gucs::stream_worker() > 0 {
            return;
        }
        let link_down = !self.link.up;
        let own = self.role.lanes();
        shmem::update(|st| {
            for (slot, l) in st.lanes.iter_mut().zip(&self.lanes) {
                if !own.contains(&l.lane) {
                    continue;
                }
                slot.state = if l.state == LaneState::Off {
                    LaneState::Off
                } else if l.retry.failing() {
                    LaneState::BackingOff
                } else if link_down {
                    LaneState::Waiting
                } else {
                    l.state
                };
                slot.last_success = l.last_success;
                slot.last_error.set(&l.last_error);
                slot.last_error_time = l.last_error_time;
            }
        });
    }
}
