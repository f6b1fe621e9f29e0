//! The main loop: reload at the top, one step of work, publish the state, wait on the latch.
//! The main thread is the only one that calls Postgres; Redis I/O of the reader, scanner and
//! notification threads comes to it over channels.

use std::time::{Duration, Instant};

use super::log::{explain_privileges, Log};
use crate::backoff::{Backoff, Jitter};
use crate::error::SyncError;
use crate::gucs::{Mode, Settings};
use crate::keys::{flags_cover_changes, KeySync, KvWriter, Notifier, PassSummary};
use crate::pg::{self, LoopContext};
use crate::redis::Redis;
use crate::shmem::{self, WorkerState};
use crate::streams::{Reader, StreamSync, StreamWriter};

/// Longest single wait: the loop comes round at least this often.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Where the worker waits on another thread: a terminate request is still honoured.
fn interrupts() {
    pgrx::check_for_interrupts!();
}

/// The rate limiter's wait: a latch wait that still honours a terminate request.
fn throttle_sleep(d: Duration) {
    pg::wait(d);
    pgrx::check_for_interrupts!();
}

/// Where the Redis connection stands.
enum Link {
    Down { next_attempt: Instant },
    Up(Box<Redis>),
}

pub struct Worker {
    settings: Settings,
    log: Log,
    link: Link,
    backoff: Backoff,
    jitter: Jitter,
    streams: StreamSync,
    stream_writer: StreamWriter,
    /// Started on first use; started again if it ever stops.
    reader: Option<Reader>,
    keys: KeySync,
    kv_writer: KvWriter,
    /// Listening to keyspace notifications, when Redis publishes them.
    notifier: Option<Notifier>,
    /// `redis_sync_discover()` requests handled so far.
    discover_handled: u64,
    /// After a failure that left Redis connected (a Postgres error), no new round before this.
    hold_until: Instant,
    /// The next attempt is a retry (counted in `retries`).
    retry_due: bool,
    /// What pg_stat_activity shows now.
    activity: String,
    loop_cxt: LoopContext,
}

impl Worker {
    pub fn new(settings: Settings) -> Worker {
        pg::set_query_timeout(settings.query_timeout);
        let backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
        let seed = (pg::my_pid() as u64) << 32 ^ shmem::now() as u64;
        let now = Instant::now();
        let worker = Worker {
            log: Log { level: settings.log_level },
            settings,
            link: Link::Down { next_attempt: now },
            backoff,
            jitter: Jitter::new(seed),
            streams: StreamSync::new(now),
            stream_writer: StreamWriter::default(),
            reader: None,
            keys: KeySync::new(now),
            kv_writer: KvWriter::default(),
            notifier: None,
            hold_until: now,
            retry_due: false,
            activity: String::new(),
            discover_handled: shmem::discovery_requests(),
            loop_cxt: LoopContext::new(),
        };
        worker.log.info(&format!(
            "redis_pg_sync worker started: database \"{}\", Redis {}",
            worker.settings.database,
            worker.settings.redis.server()
        ));
        worker
    }

    pub fn run(&mut self) -> ! {
        loop {
            self.loop_cxt.reset();
            pgrx::check_for_interrupts!();
            if pg::reload_if_requested() {
                self.reload();
            }
            if super::signals::take_cancel_request() {
                self.log.info(
                    "cancel request ignored: the redis_pg_sync worker has no statement worth cancelling (use pg_terminate_backend to restart it)",
                );
            }
            let timeout = self.step(Instant::now());
            // Statistics of the last writes reach the cumulative statistics (and
            // autovacuum) even when no further write comes to flush them.
            pg::flush_idle_stats();
            match self.notifier.as_mut() {
                // A changed key wakes the loop at once; signals are seen within 100 ms.
                Some(n) => {
                    n.wait(timeout.min(Duration::from_millis(100)));
                }
                None => pg::wait(timeout),
            }
        }
    }

    /// Picks up new settings after a reload. A changed Redis address or credentials moves
    /// the worker to the new Redis at once.
    fn reload(&mut self) {
        let new = Settings::load();
        let changes = new.changes(&self.settings);
        if changes.is_empty() {
            return;
        }
        let now = Instant::now();
        self.log = Log { level: new.log_level };
        pg::set_query_timeout(new.query_timeout);
        self.backoff.reconfigure(new.backoff_base, new.backoff_max);
        if changes.redis {
            self.log.info(&format!(
                "Redis settings changed: moving from {} to {}",
                self.settings.redis.server(),
                new.redis.server()
            ));
            self.link = Link::Down { next_attempt: now };
            self.backoff.reset();
            self.streams.clear(now);
            if let Some(mut reader) = self.reader.take() {
                reader.discard(&interrupts);
            }
            let server = new.redis.server();
            shmem::update(|s| {
                s.redis_connected = false;
                s.redis_server.set(&server);
            });
        }
        let mode = new.mode;
        shmem::update(|s| s.mode = mode);
        if let Link::Up(redis) = &mut self.link {
            redis.set_rate_limit(new.rate_limit);
        }
        if changes.key_value_scope {
            // A pass under way was started with the old key-value settings: start again.
            self.keys.abandon();
            self.notifier = None;
        }
        if changes.stream_scope {
            // New patterns, ranges or streams: look again now.
            if let Link::Up(redis) = &mut self.link {
                if let Some(reader) = self.reader.as_mut() {
                    reader.discard(&interrupts);
                }
                // Best effort: whatever is not acknowledged now is read again later and
                // lands as a no-op.
                let _ = self.streams.flush_acks(redis, &self.settings.consumer_group);
            }
            self.streams.clear(now);
        }
        self.settings = new;
        self.log.debug("configuration reloaded");
    }

    /// One pass of the loop; returns how long to wait before the next.
    fn step(&mut self, now: Instant) -> Duration {
        if pg::in_recovery() {
            if !matches!(self.link, Link::Down { .. }) {
                self.link = Link::Down { next_attempt: now };
            }
            self.enter(WorkerState::Standby, "standby: waiting for promotion", false);
            return MAX_WAIT;
        }
        if !self.settings.enabled {
            self.enter(WorkerState::Paused, "paused (redis_sync.enabled = off)", self.is_up());
            return MAX_WAIT;
        }
        let Link::Up(redis) = &mut self.link else {
            if let Link::Down { next_attempt } = self.link {
                if now < next_attempt {
                    return next_attempt - now;
                }
            }
            return self.connect();
        };
        let interval = self.settings.health_check_interval;
        if let Err(err) = redis.check_health(interval) {
            let err = SyncError::RedisUnavailable {
                server: self.settings.redis.server(),
                detail: err.to_string(),
            };
            return self.fail(err);
        }
        let next_check = redis.next_check(interval);
        if now < self.hold_until {
            return self.hold_until - now;
        }
        self.count_retry();
        let round = match self.settings.mode {
            Mode::Monitor => self.monitor_streams(now),
            Mode::Sync => self.sync(now),
        };
        match round {
            Ok(wait) => {
                if self.backoff.failures() > 0 {
                    self.log.info("syncing again after errors");
                    self.backoff.reset();
                }
                self.publish_running();
                wait.min(next_check.saturating_duration_since(Instant::now()))
            }
            Err(err) => self.fail(err),
        }
    }

    /// Takes a `redis_sync_discover()` request, if one came since the last.
    fn take_discover_request(&mut self) -> bool {
        let requested = shmem::discovery_requests();
        let new = requested != self.discover_handled;
        self.discover_handled = requested;
        new
    }

    /// Monitor mode's round: discovery when due (or asked for) and the health checks.
    fn monitor_streams(&mut self, now: Instant) -> Result<Duration, SyncError> {
        if self.take_discover_request() {
            self.streams.discover_now(now);
        }
        let Link::Up(redis) = &mut self.link else { return Ok(MAX_WAIT) };
        self.streams.monitor(redis, &self.settings, now, &self.log)
    }

    /// Sync mode's round: discovery when due, one stream round, the keys notifications
    /// named, one step of the key-value pass. Returns how long the loop may wait.
    fn sync(&mut self, now: Instant) -> Result<Duration, SyncError> {
        self.discover_if_due(now)?;
        let mut wait = self.streams.idle_wait(now);
        if self.streams.tracked() > 0 {
            self.read_round()?;
            // XREADGROUP already blocked for up to poll_interval when there was nothing.
            wait = Duration::ZERO;
        }
        self.apply_notifications(now)?;
        self.key_value_step(now)?;
        if self.keys.busy() {
            wait = Duration::ZERO;
        } else {
            wait = wait.min(self.keys.until_next_pass(now));
        }
        Ok(wait)
    }

    /// Stream discovery when its interval is up or `redis_sync_discover()` asked for it. A
    /// request counts as handled only once a discovery after it succeeded.
    fn discover_if_due(&mut self, now: Instant) -> Result<(), SyncError> {
        let requested = shmem::discovery_requests();
        if requested == self.discover_handled && !self.streams.discovery_due(now) {
            return Ok(());
        }
        let Link::Up(redis) = &mut self.link else { return Ok(()) };
        if let Some(reader) = self.reader.as_mut() {
            reader.discard(&interrupts);
        }
        self.streams.flush_acks(redis, &self.settings.consumer_group)?;
        let log = &self.log;
        self.streams.discover(redis, &self.settings, now, &|m| log.info(m))?;
        self.discover_handled = requested;
        Ok(())
    }

    /// One read-write-acknowledge round of stream sync, on the reader thread.
    fn read_round(&mut self) -> Result<(), SyncError> {
        let Link::Up(redis) = &mut self.link else { return Ok(()) };
        let reader = match self.reader.as_mut() {
            Some(reader) => reader,
            None => self.reader.insert(Reader::start()?),
        };
        // While a key-value pass is under way, stream reads do not block.
        self.streams.may_block = !self.keys.busy();
        let outcome = self.streams.step(
            redis,
            reader,
            &mut self.stream_writer,
            &self.settings,
            &self.log,
            &interrupts,
        );
        if matches!(outcome, Err(SyncError::ThreadStopped(_))) {
            self.reader = None;
        }
        outcome.map(|_| ())
    }

    /// Syncs the keys keyspace notifications named since the last turn.
    fn apply_notifications(&mut self, now: Instant) -> Result<(), SyncError> {
        let Link::Up(redis) = &mut self.link else { return Ok(()) };
        let Some(n) = self.notifier.as_mut() else { return Ok(()) };
        if n.overflowed.swap(false, std::sync::atomic::Ordering::Relaxed) {
            // Notifications were missed (just subscribed, or the queue was full).
            self.keys.pass_now(now);
        }
        let events = n.drain(10_000);
        if let Err(e) = self.keys.apply_events(redis, &mut self.kv_writer, &self.settings, events) {
            self.kv_writer.reset();
            return Err(e);
        }
        Ok(())
    }

    /// One page of the key-value pass; between passes, follows the server's
    /// notify-keyspace-events setting.
    fn key_value_step(&mut self, now: Instant) -> Result<(), SyncError> {
        let Link::Up(redis) = &mut self.link else { return Ok(()) };
        let pass = self.keys.step(redis, &mut self.kv_writer, &self.settings, now, &interrupts);
        let summary = match pass {
            Ok(summary) => summary,
            Err(e) => {
                self.kv_writer.reset();
                return Err(e);
            }
        };
        if let Some(summary) = summary {
            self.follow_notifications()?;
            self.log.debug(&pass_line(&summary));
        }
        Ok(())
    }

    /// Starts or stops listening to keyspace notifications as the server publishes them.
    fn follow_notifications(&mut self) -> Result<(), SyncError> {
        let Link::Up(redis) = &mut self.link else { return Ok(()) };
        let want = self.settings.key_value_auto_discovery
            && redis.notify_flags().is_some_and(|f| flags_cover_changes(&f));
        let current = self.notifier.as_ref().is_some_and(|n| {
            n.settings == self.settings.redis && n.dbs == self.settings.db_search_range
        });
        if want && !current {
            self.notifier =
                Some(Notifier::start(&self.settings.redis, &self.settings.db_search_range)?);
            self.log.info(
                "Redis publishes keyspace notifications: changed keys are synced as they change",
            );
        } else if !want && self.notifier.is_some() {
            self.notifier = None;
            self.log.info("keyspace notifications are off: changes are found by scanning");
        }
        Ok(())
    }

    /// Counts the attempt about to be made if it follows a failure.
    fn count_retry(&mut self) {
        if std::mem::take(&mut self.retry_due) {
            shmem::bump(|c| &c.retries, 1);
        }
    }

    fn is_up(&self) -> bool {
        matches!(self.link, Link::Up(_))
    }

    fn connect(&mut self) -> Duration {
        let server = self.settings.redis.server();
        self.enter(WorkerState::Connecting, &format!("connecting to Redis {server}"), false);
        self.count_retry();
        match Redis::connect(&self.settings.redis, self.settings.rate_limit, throttle_sleep) {
            Ok(conn) => {
                let was_failing = self.backoff.failures() > 0;
                self.backoff.reset();
                self.link = Link::Up(Box::new(conn));
                // Our own pending entries first, every time we (re)connect.
                self.streams.restart_from_pending();
                self.log.info(&if was_failing {
                    format!("connected to Redis {server} again")
                } else {
                    format!("connected to Redis {server}")
                });
                self.publish_running();
                Duration::ZERO
            }
            Err(err) => self.fail(err),
        }
    }

    /// Records a failure, drops the connection and schedules the next try with backoff.
    /// Logged when trouble starts and once more when `max_retries` failures in a row end
    /// the backoff schedule (from then on every try waits `backoff_max`), not once per try.
    fn fail(&mut self, err: SyncError) -> Duration {
        let err = explain_privileges(err, &self.settings);
        let max_retries = self.settings.max_retries;
        let delay = self.backoff.next_delay(self.jitter.unit(), max_retries);
        let failures = self.backoff.failures();
        self.retry_due = true;
        if failures == 1 {
            self.log.error(&err);
            self.log.info(&format!("retrying in {} ms", delay.as_millis()));
        } else if failures == max_retries.max(1) + 1 {
            self.log.warning(&format!(
                "{max_retries} retries failed in a row; retrying every {} ms (redis_sync.backoff_max) until it works. Last error: {err}",
                delay.as_millis()
            ));
        }
        shmem::record_error(&err.to_string());
        if err.connection_lost() || !self.is_up() {
            // (Also a failed connect for another reason, a configuration error say: the next
            // attempt waits its turn too.)
            self.link = Link::Down { next_attempt: Instant::now() + delay };
            // A read still in flight belongs to the old connection: what it read sits in our
            // pending list and is read again after the reconnect.
            if let Some(reader) = self.reader.as_mut() {
                reader.discard(&interrupts);
            }
        } else {
            self.hold_until = Instant::now() + delay;
        }
        let connected = self.is_up();
        self.enter(
            WorkerState::BackingOff,
            &format!("backing off {} ms: {err}", delay.as_millis()),
            connected,
        );
        delay
    }

    /// State `running` (or `monitoring`), and what the worker is doing for
    /// pg_stat_activity: "syncing 3 streams", "syncing 3 streams, key-value pass", ...
    fn publish_running(&mut self) {
        let n = self.streams.tracked();
        let streams = format!("{n} stream{}", if n == 1 { "" } else { "s" });
        let (state, text) = match self.settings.mode {
            Mode::Sync if self.keys.busy() => {
                (WorkerState::Running, format!("syncing {streams}, key-value pass"))
            }
            Mode::Sync => (WorkerState::Running, format!("syncing {streams}")),
            Mode::Monitor => (WorkerState::Monitoring, format!("monitoring {streams}")),
        };
        self.enter(state, &text, true);
    }

    /// Publishes the state, and the activity text when it changed.
    fn enter(&mut self, state: WorkerState, activity: &str, connected: bool) {
        let changed = shmem::snapshot().map(|s| s.state != state || s.redis_connected != connected);
        if changed.unwrap_or(true) {
            shmem::update(|s| {
                s.state = state;
                s.redis_connected = connected;
            });
        }
        if activity != self.activity {
            pg::report_activity(activity);
            self.activity = activity.to_owned();
        }
    }
}

/// The debug line of a finished key-value pass.
fn pass_line(summary: &PassSummary) -> String {
    format!(
        "key-value pass: {} keys, {} rows written, {} gone{}",
        summary.keys,
        summary.written,
        summary.gone,
        if summary.complete { "" } else { " (Redis restarted during the pass: nothing marked)" }
    )
}
