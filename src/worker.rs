//! The background worker: registration and main loop.
//!
//! Loop shape after pg_cron and autoprewarm: signal handlers only set flags and the latch;
//! the configuration is reloaded at the top of the loop; every wait is on the latch and ends
//! the process if the postmaster dies. SIGTERM uses Postgres' own `die`, so a terminate
//! interrupts even a long statement and the worker exits with code 1, which makes the
//! postmaster start it again after the restart time (exit 0 would unregister it for good).
//! SIGINT (`pg_cancel_backend`) only sets a flag: nothing the worker does is worth cancelling
//! (except a write past `redis_sync.query_timeout`, whose timer also arrives as SIGINT).

use std::ffi::{c_int, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use pgrx::PgLogLevel;

use crate::backoff::{Backoff, Jitter};
use crate::error::SyncError;
use crate::gucs::{LogLevel, Mode, Settings};
use crate::keys::KeySync;
use crate::notify::{flags_cover_changes, Notifier};
use crate::reader::Reader;
use crate::redis::Redis;
use crate::shmem::{self, WorkerState};
use crate::sink::{KvSink, Sink};
use crate::streams::StreamSync;

/// How long the postmaster waits before starting the worker again after it exited.
pub const RESTART_TIME: Duration = Duration::from_secs(5);
/// Longest single latch wait: the loop comes round at least this often.
const MAX_WAIT: Duration = Duration::from_secs(1);

pub const WORKER_NAME: &str = "redis_pg_sync worker";

static CANCEL_REQUESTED: AtomicBool = AtomicBool::new(false);

pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type("redis_pg_sync")
        .set_library("redis_pg_sync")
        .set_function("redis_sync_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_TIME))
        .load();
}

/// SIGHUP: note the reload for the top of the loop (pgrx's own handler would reload inside
/// the signal handler).
unsafe extern "C-unwind" fn handle_sighup(_signo: c_int) {
    let saved = unsafe { *libc::__errno_location() };
    unsafe {
        pg_sys::ConfigReloadPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

/// SIGTERM: what Postgres' `die` does. The next CHECK_FOR_INTERRUPTS ends the process with
/// FATAL (exit code 1), also in the middle of a statement.
unsafe extern "C-unwind" fn handle_sigterm(_signo: c_int) {
    let saved = unsafe { *libc::__errno_location() };
    unsafe {
        if !pg_sys::proc_exit_inprogress {
            pg_sys::InterruptPending = 1;
            pg_sys::ProcDiePending = 1;
        }
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

unsafe extern "C-unwind" fn handle_sigint(_signo: c_int) {
    let saved = unsafe { *libc::__errno_location() };
    // redis_sync.query_timeout fired (Postgres' timeout handler sends SIGINT): cancel the
    // write; it is rolled back and retried. Any other SIGINT is a user's cancel request.
    if !unsafe { crate::sink::cancel_if_timed_out() } {
        CANCEL_REQUESTED.store(true, Ordering::SeqCst);
    }
    unsafe {
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

fn set_signal(signo: u32, handler: unsafe extern "C-unwind" fn(c_int)) {
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(signo as c_int, Some(handler));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signo as c_int, Some(handler));
    }
}

unsafe extern "C-unwind" fn on_exit(_code: c_int, _arg: pg_sys::Datum) {
    shmem::update(|s| {
        s.pid = 0;
        s.state = WorkerState::Stopped;
        s.redis_connected = false;
    });
}

/// The worker's own log lines, filtered by `redis_sync.log_level`. Nothing here raises an
/// ERROR: the worker reports and carries on.
pub struct Log {
    level: LogLevel,
}

impl Log {
    pub fn at(&self, level: LogLevel, msg: &str) {
        if level < self.level {
            return;
        }
        let pg_level = match level {
            LogLevel::Debug | LogLevel::Info | LogLevel::Notice => PgLogLevel::LOG,
            LogLevel::Warning | LogLevel::Error => PgLogLevel::WARNING,
        };
        ereport!(pg_level, PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, msg);
    }

    pub fn error(&self, err: &SyncError) {
        if LogLevel::Warning >= self.level {
            err.report(PgLogLevel::WARNING);
        }
    }
}

fn report_activity(text: &str) {
    let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, c.as_ptr()) };
}

/// Sleeps on the process latch for at most `timeout` (capped at one second); returns early on
/// any signal, and ends the process if the postmaster dies.
pub fn wait(timeout: Duration) {
    if timeout.is_zero() {
        return;
    }
    let ms = timeout.min(MAX_WAIT).as_millis().max(1) as std::ffi::c_long;
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as c_int,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// Where the worker waits on another thread: a terminate request is still honoured.
fn interrupts() {
    pgrx::check_for_interrupts!();
}

/// The rate limiter's wait: a latch wait that still honours a terminate request.
fn throttle_sleep(d: Duration) {
    wait(d);
    pgrx::check_for_interrupts!();
}

/// A "permission denied" from Postgres gets the grants that fix it appended, so the DBA reads
/// in `last_error` and the log exactly what to run.
fn explain_privileges(err: SyncError, s: &Settings) -> SyncError {
    match err {
        SyncError::Postgres { sqlstate, message }
            if sqlstate == PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE =>
        {
            SyncError::Postgres { sqlstate, message: format!("{message}. {}", grants_needed(s)) }
        }
        other => other,
    }
}

/// An identifier as Postgres would print it: quoted only when it must be.
fn pg_quote_ident(name: &str) -> String {
    let Ok(c) = CString::new(name) else { return crate::parse::quote_ident(name) };
    unsafe {
        let quoted = pg_sys::quote_identifier(c.as_ptr());
        std::ffi::CStr::from_ptr(quoted).to_string_lossy().into_owned()
    }
}

/// The privileges the worker's role needs, as the GRANTs to run.
pub fn grants_needed(s: &Settings) -> String {
    let role = if s.role.is_empty() { "<role>".to_owned() } else { pg_quote_ident(&s.role) };
    let schema = pg_quote_ident(&s.schema);
    let table = |name: &str| format!("{schema}.{}", pg_quote_ident(name));
    format!(
        "The worker writes as role {role}; run: GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}; \
         or create the tables beforehand and run: GRANT USAGE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT, INSERT, UPDATE ON {}, {} TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {role}; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role};",
        table(&s.stream_table),
        table(crate::sink::DEAD_LETTER_TABLE),
        table(&s.key_value_table),
    )
}

/// Where the Redis connection stands.
enum Link {
    Down { next_attempt: Instant },
    Up(Box<Redis>),
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn redis_sync_worker_main(_arg: pg_sys::Datum) {
    set_signal(pg_sys::SIGHUP, handle_sighup);
    set_signal(pg_sys::SIGTERM, handle_sigterm);
    set_signal(pg_sys::SIGINT, handle_sigint);
    unsafe { pg_sys::BackgroundWorkerUnblockSignals() };

    let settings = Settings::load();
    let role = (!settings.role.is_empty()).then_some(settings.role.as_str());
    BackgroundWorker::connect_worker_to_spi(Some(&settings.database), role);

    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    let started = shmem::now();
    shmem::update(|s| {
        *s = shmem::WorkerStatus::default();
        s.pid = unsafe { pg_sys::MyProcPid };
        s.state = WorkerState::Starting;
        s.mode = settings.mode;
        s.started_at = started;
        s.redis_server.set(&settings.redis.server());
    });

    let mut worker = Worker::new(settings);
    worker.log.at(
        LogLevel::Info,
        &format!(
            "redis_pg_sync worker started: database \"{}\", Redis {}",
            worker.settings.database,
            worker.settings.redis.server()
        ),
    );
    worker.run();
}

struct Worker {
    settings: Settings,
    log: Log,
    link: Link,
    backoff: Backoff,
    jitter: Jitter,
    streams: StreamSync,
    sink: Sink,
    /// Started on first use; started again if it ever stops.
    reader: Option<Reader>,
    keys: KeySync,
    kv_sink: KvSink,
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
    loop_cxt: pg_sys::MemoryContext,
}

impl Worker {
    fn new(settings: Settings) -> Worker {
        crate::sink::set_query_timeout(settings.query_timeout);
        let backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
        let seed = (unsafe { pg_sys::MyProcPid } as u64) << 32 ^ shmem::now() as u64;
        Worker {
            log: Log { level: settings.log_level },
            settings,
            link: Link::Down { next_attempt: Instant::now() },
            backoff,
            jitter: Jitter::new(seed),
            streams: StreamSync::new(),
            sink: Sink::default(),
            reader: None,
            keys: KeySync::default(),
            kv_sink: KvSink::default(),
            notifier: None,
            hold_until: Instant::now(),
            retry_due: false,
            activity: String::new(),
            discover_handled: shmem::discovery_requests(),
            loop_cxt: unsafe {
                pg_sys::AllocSetContextCreateInternal(
                    pg_sys::TopMemoryContext,
                    c"redis_pg_sync loop".as_ptr(),
                    0,
                    8 * 1024,
                    8 * 1024 * 1024,
                )
            },
        }
    }

    fn run(&mut self) -> ! {
        loop {
            // Anything palloc'd outside a transaction lives for one pass only.
            unsafe {
                pg_sys::MemoryContextSwitchTo(self.loop_cxt);
                pg_sys::MemoryContextReset(self.loop_cxt);
            }
            pgrx::check_for_interrupts!();
            if unsafe { pg_sys::ConfigReloadPending } != 0 {
                unsafe {
                    pg_sys::ConfigReloadPending = 0;
                    pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
                }
                self.reload();
            }
            if CANCEL_REQUESTED.swap(false, Ordering::SeqCst) {
                self.log.at(
                    LogLevel::Info,
                    "cancel request ignored: the redis_pg_sync worker has no statement worth cancelling (use pg_terminate_backend to restart it)",
                );
            }
            let timeout = self.step();
            // Statistics of the last writes reach the cumulative statistics (and
            // autovacuum) even when no further write comes to flush them.
            crate::sink::flush_idle_stats();
            match self.notifier.as_mut() {
                // A changed key wakes the loop at once; signals are seen within 100 ms.
                Some(n) => {
                    n.wait(timeout.min(Duration::from_millis(100)));
                }
                None => wait(timeout),
            }
        }
    }

    /// Picks up new settings after a reload. A changed Redis address or credentials moves
    /// the worker to the new Redis at once.
    fn reload(&mut self) {
        let new = Settings::load();
        if new == self.settings {
            return;
        }
        self.log = Log { level: new.log_level };
        crate::sink::set_query_timeout(new.query_timeout);
        self.backoff.reconfigure(new.backoff_base, new.backoff_max);
        if new.redis != self.settings.redis {
            self.log.at(
                LogLevel::Info,
                &format!(
                    "Redis settings changed: moving from {} to {}",
                    self.settings.redis.server(),
                    new.redis.server()
                ),
            );
            self.link = Link::Down { next_attempt: Instant::now() };
            self.backoff.reset();
            self.streams.clear();
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
        // New patterns, ranges or streams: look again now.
        let rediscover = new.streams != self.settings.streams
            || new.stream_discovery_patterns != self.settings.stream_discovery_patterns
            || new.db_search_range != self.settings.db_search_range
            || new.stream_auto_discovery != self.settings.stream_auto_discovery
            || new.consumer_group != self.settings.consumer_group
            || new.mode != self.settings.mode;
        // A pass under way was started with the old key-value settings: start again.
        if new.key_value_patterns != self.settings.key_value_patterns
            || new.key_value_auto_discovery != self.settings.key_value_auto_discovery
            || new.db_search_range != self.settings.db_search_range
            || new.key_value_table != self.settings.key_value_table
            || new.schema != self.settings.schema
            || new.key_value_deletes != self.settings.key_value_deletes
            || new.mode != self.settings.mode
            || new.redis != self.settings.redis
        {
            self.keys.abandon();
            self.notifier = None;
        }
        if rediscover {
            if let Link::Up(redis) = &mut self.link {
                if let Some(reader) = self.reader.as_mut() {
                    reader.discard(&interrupts);
                }
                // Best effort: whatever is not acknowledged now is read again later and
                // lands as a no-op.
                let _ = self.streams.flush_acks(redis, &self.settings.consumer_group);
            }
            self.streams.clear();
        }
        self.settings = new;
        self.log.at(LogLevel::Debug, "configuration reloaded");
    }

    /// One pass of the loop; returns how long to wait before the next.
    fn step(&mut self) -> Duration {
        if unsafe { pg_sys::RecoveryInProgress() } {
            if !matches!(self.link, Link::Down { .. }) {
                self.link = Link::Down { next_attempt: Instant::now() };
            }
            self.enter(WorkerState::Standby, "standby: waiting for promotion", false);
            return MAX_WAIT;
        }
        if !self.settings.enabled {
            self.enter(WorkerState::Paused, "paused (redis_sync.enabled = off)", self.is_up());
            return MAX_WAIT;
        }
        let now = Instant::now();
        match &mut self.link {
            Link::Down { next_attempt } => {
                if now < *next_attempt {
                    return *next_attempt - now;
                }
                self.connect()
            }
            Link::Up(redis) => {
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
                    Mode::Monitor => self.monitor_streams(),
                    Mode::Sync => self.sync_streams(),
                };
                match round {
                    Ok(wait) => {
                        if self.backoff.failures() > 0 {
                            self.log.at(LogLevel::Info, "syncing again after errors");
                            self.backoff.reset();
                        }
                        self.publish_running();
                        wait.min(next_check.saturating_duration_since(Instant::now()))
                    }
                    Err(err) => self.fail(err),
                }
            }
        }
    }

    /// Monitor mode's round: discovery when due (or asked for) and the health checks.
    fn monitor_streams(&mut self) -> Result<Duration, SyncError> {
        let Link::Up(redis) = &mut self.link else { return Ok(MAX_WAIT) };
        let requested = shmem::discovery_requests();
        if requested != self.discover_handled {
            self.streams.discover_now();
            self.discover_handled = requested;
        }
        let log = &self.log;
        self.streams.monitor(
            redis,
            &self.settings,
            &|m| log.at(LogLevel::Info, m),
            &|m| log.at(LogLevel::Debug, m),
            &|m| log.at(LogLevel::Warning, m),
        )
    }

    /// Discovery when due (or asked for), then one read-write-ack round. Returns how long
    /// the loop may wait before the next round.
    fn sync_streams(&mut self) -> Result<Duration, SyncError> {
        let Link::Up(redis) = &mut self.link else { return Ok(MAX_WAIT) };
        let requested = shmem::discovery_requests();
        if self.streams.discovery_due() || requested != self.discover_handled {
            if let Some(reader) = self.reader.as_mut() {
                reader.discard(&interrupts);
            }
            self.streams.flush_acks(redis, &self.settings.consumer_group)?;
            let log = &self.log;
            self.streams.discover(redis, &self.settings, &|m| log.at(LogLevel::Info, m))?;
            self.discover_handled = requested;
        }
        let mut wait = self.streams.idle_wait();
        if self.streams.tracked() > 0 {
            if self.reader.is_none() {
                self.reader = Some(Reader::start()?);
            }
            let Some(reader) = self.reader.as_mut() else { return Ok(MAX_WAIT) };
            // While a key-value pass is under way, stream reads do not block.
            self.streams.may_block = !self.keys.busy();
            let log = &self.log;
            let outcome = self.streams.step(
                redis,
                reader,
                &mut self.sink,
                &self.settings,
                &|m| log.at(LogLevel::Warning, m),
                &interrupts,
            );
            if matches!(outcome, Err(SyncError::ThreadStopped(_))) {
                self.reader = None;
            }
            outcome?;
            // XREADGROUP already blocked for up to poll_interval when there was nothing.
            wait = Duration::ZERO;
        }
        let Link::Up(redis) = &mut self.link else { return Ok(MAX_WAIT) };
        if let Some(n) = self.notifier.as_mut() {
            if n.overflowed.swap(false, std::sync::atomic::Ordering::Relaxed) {
                // Notifications were missed (just subscribed, or the queue was full).
                self.keys.pass_now();
            }
            let events = n.drain(10_000);
            if let Err(e) = self.keys.apply_events(redis, &mut self.kv_sink, &self.settings, events)
            {
                self.kv_sink.reset();
                return Err(e);
            }
        }
        let pass = self.keys.step(redis, &mut self.kv_sink, &self.settings, &interrupts);
        if matches!(pass, Ok(Some(_))) {
            // Between passes: follow the server's notify-keyspace-events setting.
            let want = self.settings.key_value_auto_discovery
                && redis.notify_flags().is_some_and(|f| flags_cover_changes(&f));
            let current = self.notifier.as_ref().is_some_and(|n| {
                n.settings == self.settings.redis && n.dbs == self.settings.db_search_range
            });
            if want && !current {
                self.notifier =
                    Some(Notifier::start(&self.settings.redis, &self.settings.db_search_range)?);
                self.log.at(
                    LogLevel::Info,
                    "Redis publishes keyspace notifications: changed keys are synced as they change",
                );
            } else if !want && self.notifier.is_some() {
                self.notifier = None;
                self.log.at(
                    LogLevel::Info,
                    "keyspace notifications are off: changes are found by scanning",
                );
            }
        }
        match pass {
            Ok(Some(summary)) => self.log.at(
                LogLevel::Debug,
                &format!(
                    "key-value pass: {} keys, {} rows written, {} gone{}",
                    summary.keys,
                    summary.written,
                    summary.gone,
                    if summary.complete {
                        ""
                    } else {
                        " (Redis restarted during the pass: nothing marked)"
                    }
                ),
            ),
            Ok(None) => {}
            Err(e) => {
                self.kv_sink.reset();
                return Err(e);
            }
        }
        if self.keys.busy() {
            wait = Duration::ZERO;
        } else {
            wait = wait.min(self.keys.until_next_pass());
        }
        Ok(wait)
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
                let msg = if was_failing {
                    format!("connected to Redis {server} again")
                } else {
                    format!("connected to Redis {server}")
                };
                self.log.at(LogLevel::Info, &msg);
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
            self.log.at(LogLevel::Info, &format!("retrying in {} ms", delay.as_millis()));
        } else if failures == max_retries.max(1) + 1 {
            self.log.at(
                LogLevel::Warning,
                &format!(
                    "{max_retries} retries failed in a row; retrying every {} ms (redis_sync.backoff_max) until it works. Last error: {err}",
                    delay.as_millis()
                ),
            );
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
            report_activity(activity);
            self.activity = activity.to_owned();
        }
    }
}
