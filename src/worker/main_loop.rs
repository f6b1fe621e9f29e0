//! The main loop, in the style of pg_cron and autoprewarm: reload at the top, one turn of
//! each lane, publish the state, then wait on the latch and the wake-up pipe (which ends the
//! process if the postmaster died) until a signal, a helper thread's hand-over or the next
//! deadline.
//!
//! The main thread is the only one that calls Postgres, and it never does Redis I/O: the
//! reader threads (one per database) and the discovery thread of the stream worker, the
//! scanner thread and the notification thread of the key-value worker do, and hand over
//! their results. Each turn takes what has come and does a bounded piece of Postgres work
//! per lane of its process (a batch of each database's entries; one chunk of a key-value
//! page), so no lane's work waits long behind another's.

use std::time::{Duration, Instant};

use super::lanes::Lanes;
use super::log::Log;
use super::Role;
use crate::gucs::{Mode, Settings};
use crate::keys::{flags_cover_changes, KeySync, KvCtx, KvWriter, Notifier, PassSummary, Scope};
use crate::pg::{self, LoopContext, Waker, MAX_WAIT};
use crate::ratelimit::Lane;
use crate::redis::SharedBudget;
use crate::shmem::{self, LaneState, WorkerState};
use crate::streams::{DiscoveryCtx, DiscoveryTurn, Feed, Learned, StreamSync, Writers};

/// A turn longer than this is logged at debug level, with what took the time.
const SLOW_TURN: Duration = Duration::from_millis(100);

/// Batches of notified changes written per turn, at most.
const CHANGES_PER_TURN: usize = 4;

pub struct Worker {
    role: Role,
    settings: Settings,
    log: Log,
    lanes: Lanes,
    budget: SharedBudget,
    waker: Waker,
    streams: StreamSync,
    stream_writer: Writers,
    keys: KeySync,
    kv_writer: KvWriter,
    /// Listening to keyspace notifications, when Redis publishes them.
    notifier: Option<Notifier>,
    /// The last turn found the worker paused or on a standby.
    held: bool,
    /// What pg_stat_activity shows now.
    activity: (bool, String),
    loop_cxt: LoopContext,
    /// The stream keys the key-value worker last handed over, and their generation.
    learned: (u64, Option<Learned>),
    /// A Redis Cluster's primaries as this process last showed them in the status.
    nodes: String,
}

impl Worker {
    pub fn new(role: Role, settings: Settings, waker: Waker) -> Worker {
        pg::set_query_timeout(settings.query_timeout);
        follow_commit_setting(role);
        let seed = (pg::my_pid() as u64) << 32 ^ shmem::now() as u64;
        let now = Instant::now();
        let mut streams = StreamSync::new(now);
        streams.requests_answered_before(shmem::discovery_answered());
        let worker = Worker {
            role,
            log: Log { level: settings.log_level },
            lanes: Lanes::new(role, &settings, seed),
            budget: SharedBudget::new(settings.rate_limit),
            waker,
            streams,
            stream_writer: Writers::default(),
            keys: KeySync::new(now),
            kv_writer: KvWriter::default(),
            notifier: None,
            held: false,
            activity: (false, String::new()),
            loop_cxt: LoopContext::new(),
            learned: (0, None),
            nodes: String::new(),
            settings,
        };
        worker.log.info(&format!(
            "redis_pg_sync {} started: database \"{}\", Redis {}{}",
            match role {
                Role::Streams => "worker",
                Role::KeyValues => "key-value worker",
            },
            worker.settings.database,
            worker.settings.redis.server(),
            match role {
                Role::Streams => format!(
                    ", consumer \"{}\" of group \"{}\"",
                    worker.settings.consumer_name, worker.settings.consumer_group
                ),
                Role::KeyValues => String::new(),
            }
        ));
        worker
    }

    pub fn run(&mut self) -> ! {
        if self.role == Role::Streams {
            super::signals::stop_gracefully();
        }
        loop {
            self.loop_cxt.reset();
            if super::signals::stop_requested() {
                self.stop();
            }
            pgrx::check_for_interrupts!();
            if pg::reload_if_requested() {
                self.reload();
            }
            if super::signals::take_cancel_request() {
                self.log.info(
                    "cancel request ignored: the redis_pg_sync worker has no statement worth cancelling (use pg_terminate_backend to restart it)",
                );
            }
            let ops = crate::redis::take_round_trips();
            if ops > 0 {
                shmem::bump(|c| &c.redis_ops, ops);
            }
            self.show_nodes();
            let (worked, wait) = self.turn(Instant::now());
            // Statistics of the last writes reach the cumulative statistics (and
            // autovacuum) even when no further write comes to flush them.
            pg::flush_idle_stats();
            // Even with more work at hand, look at the latch and the postmaster once a turn.
            self.waker.wait(if worked { Duration::ZERO } else { wait });
        }
    }

    /// Shows a Redis Cluster's primaries in the status when this process learnt new ones
    /// (its connections read the slot map on helper threads).
    fn show_nodes(&mut self) {
        if !self.settings.redis.cluster && self.nodes.is_empty() {
            return;
        }
        let nodes =
            if self.settings.redis.cluster { crate::redis::nodes_seen() } else { String::new() };
        if nodes != self.nodes {
            shmem::update(|s| s.redis_nodes.set(&nodes));
            self.nodes = nodes;
        }
    }

    /// SIGTERM (a fast shutdown, `pg_terminate_backend`): the stream worker acknowledges
    /// what it committed, then ends as Postgres' `die` ends a process.
    fn stop(&mut self) {
        // (The handler may have cancelled a transaction that had already ended.)
        pg::forget_cancel();
        let (acked, left) =
            self.streams.final_acks(&mut self.stream_writer, &self.settings, &self.log);
        if acked + left > 0 {
            self.log.info(&format!(
                "stopping: {acked} committed entries acknowledged{}",
                if left > 0 {
                    format!(", {left} left pending (not yet flushed by the standbys)")
                } else {
                    String::new()
                }
            ));
        }
        // Ends the process (at the interrupt check it makes).
        super::signals::die_now();
    }

    /// Picks up new settings after a reload. A changed Redis address or credentials moves
    /// every lane to the new Redis at once.
    fn reload(&mut self) {
        follow_commit_setting(self.role);
        let new = Settings::load();
        let changes = new.changes(&self.settings);
        if changes.is_empty() {
            return;
        }
        let now = Instant::now();
        self.log = Log { level: new.log_level };
        pg::set_query_timeout(new.query_timeout);
        self.lanes.reconfigure(&new);
        self.budget.set_rate(new.rate_limit);
        if changes.redis {
            self.log.info(&format!(
                "Redis settings changed: moving from {} to {}",
                self.settings.redis.server(),
                new.redis.server()
            ));
            self.lanes.reset_link();
            let server = new.redis.server();
            if self.role == Role::Streams && self.settings.stream_worker == 0 {
                shmem::update(|s| {
                    s.redis_connected = false;
                    s.redis_server.set(&server);
                });
            }
        }
        if (changes.stream_scope || changes.redis) && self.role == Role::Streams {
            // New patterns, ranges, streams or server: look again now.
            self.streams.clear(now, &self.settings.redis, changes.redis);
        }
        if changes.key_value_scope && self.role == Role::KeyValues {
            // A pass under way was started with the old key-value settings: start again.
            self.keys.abandon();
            shmem::hand_over_learned(None);
            self.notifier = None;
        }
        let mode = new.mode;
        if self.role == Role::Streams && self.settings.stream_worker == 0 {
            shmem::update(|s| s.mode = mode);
        }
        self.settings = new;
        self.log.debug("configuration reloaded");
    }

    /// One turn of every lane; returns whether any work was done and, if not, how long the
    /// loop may wait.
    fn turn(&mut self, now: Instant) -> (bool, Duration) {
        let hold = if pg::in_recovery() {
            Some((WorkerState::Standby, "standby: waiting for promotion"))
        } else if !self.settings.enabled {
            Some((WorkerState::Paused, "paused (redis_sync.enabled = off)"))
        } else {
            None
        };
        if let Some((state, text)) = hold {
            if self.role == Role::Streams {
                if !self.held {
                    // Whatever is read from now on is read again from the pending list later.
                    self.streams.stop_reads(&self.settings.redis);
                }
                // Replies still arriving are dropped unread; nothing new is asked for.
                let _ = self.streams.pump(&mut self.stream_writer, &self.settings, &self.log, None);
            }
            self.held = true;
            let connected = self.lanes.link.up;
            self.enter(state, text, connected, true);
            return (false, MAX_WAIT);
        }
        self.held = false;
        let worked = match self.role {
            Role::Streams => self.stream_lanes(now),
            Role::KeyValues => self.key_value_lanes(now),
        };
        self.publish(worked);
        (worked, self.wait(now))
    }

    /// The key-value worker's turn: a step of the pass, then notified changes.
    fn key_value_lanes(&mut self, now: Instant) -> bool {
        if self.settings.mode != Mode::Sync {
            self.lanes.get(Lane::KeyValues).state = LaneState::Off;
            return false;
        }
        let started = Instant::now();
        let mut worked = self.key_value_turn(now);
        let pass = started.elapsed();
        worked |= self.notification_turn(now);
        let total = started.elapsed();
        if total >= SLOW_TURN {
            self.log.debug(&format!(
                "slow turn of {} ms: key-value pass {} ms, notifications {} ms",
                total.as_millis(),
                pass.as_millis(),
                (total - pass).as_millis()
            ));
        }
        worked
    }

    /// The stream worker's turn: land what was read, then discovery.
    fn stream_lanes(&mut self, now: Instant) -> bool {
        self.take_learned(now);
        let mut worked = false;
        let mut times = [Duration::ZERO; 2];
        let mut clock = Instant::now();
        let mut lap = |i: usize| {
            let t = Instant::now();
            times[i] = t - clock;
            clock = t;
        };
        if self.settings.mode == Mode::Sync {
            worked |= self.stream_turn(now);
        } else {
            let _ = self.streams.pump(&mut self.stream_writer, &self.settings, &self.log, None);
        }
        lap(0);
        worked |= self.discovery_turn(now);
        lap(1);
        let total: Duration = times.iter().sum();
        if total >= SLOW_TURN {
            self.log.debug(&format!(
                "slow turn of {} ms: streams {} ms, discovery {} ms",
                total.as_millis(),
                times[0].as_millis(),
                times[1].as_millis()
            ));
        }
        worked
    }

    /// Takes the stream keys the key-value worker handed over since the last turn; a new
    /// one among them moves the next discovery to now.
    fn take_learned(&mut self, now: Instant) {
        let generation = shmem::learned_generation();
        if generation == self.learned.0 {
            return;
        }
        let learned = shmem::learned().map(|(at, streams)| Learned { at, streams });
        if let Some(l) = &learned {
            self.streams.streams_seen(&self.settings, l, now);
        }
        self.learned = (generation, learned);
    }

    /// The stream lane: land what the readers brought, start the next reads.
    fn stream_turn(&mut self, now: Instant) -> bool {
        self.streams.follow_routes(&self.settings, now, &self.log);
        let feed_ok = self.lanes.link.up && self.lanes.get(Lane::Streams).may_work(now);
        let feed = Feed { budget: &self.budget, waker: &self.waker };
        let outcome = self.streams.pump(
            &mut self.stream_writer,
            &self.settings,
            &self.log,
            feed_ok.then_some(&feed),
        );
        let health = self.lanes.get(Lane::Streams);
        match outcome {
            Ok(p) => {
                // Working again: entries landed, or reads work and nothing waits to be read
                // again after a failed write.
                if p.landed > 0 || (p.replies > 0 && p.caught_up) {
                    health.succeeded(&self.log);
                }
                health.state = if p.landed > 0 { LaneState::Running } else { LaneState::Idle };
                p.replies > 0
            }
            Err(e) => {
                self.stream_writer.reset_all();
                self.lanes.failed(Lane::Streams, e, &self.settings, &self.log, now);
                true
            }
        }
    }

    /// The discovery lane (and monitor mode's health checks). While Redis is unreachable, its
    /// next job is the probe that finds it back.
    fn discovery_turn(&mut self, now: Instant) -> bool {
        let idle = !self.streams.discovery_busy();
        let probe = idle && !self.lanes.link.up && self.lanes.may_probe(now);
        let may_send =
            probe || (idle && self.lanes.link.up && self.lanes.get(Lane::Discovery).may_work(now));
        let ctx = DiscoveryCtx {
            budget: &self.budget,
            waker: &self.waker,
            may_send,
            probe,
            requested: shmem::discovery_requests(),
            learned: self.learned.1.as_ref(),
        };
        let outcome = self.streams.discovery_turn(&self.settings, now, &ctx, &self.log);
        let server = self.settings.redis.server();
        let worked = match outcome {
            Ok(DiscoveryTurn::Nothing) => false,
            Ok(DiscoveryTurn::Connected) => {
                self.lanes.connected(&server, &self.log);
                true
            }
            Ok(DiscoveryTurn::Applied) => {
                self.lanes.connected(&server, &self.log);
                self.lanes.get(Lane::Discovery).succeeded(&self.log);
                true
            }
            Err(e) if !self.lanes.link.up => {
                self.lanes.probe_failed(Lane::Discovery, e, &self.settings, &self.log, now);
                true
            }
            Err(e) => {
                self.lanes.failed(Lane::Discovery, e, &self.settings, &self.log, now);
                true
            }
        };
        self.lanes.get(Lane::Discovery).state =
            if self.streams.discovery_busy() { LaneState::Running } else { LaneState::Idle };
        worked
    }

    /// The key-value lane: start a pass when due, or take one step of the pass under way.
    fn key_value_turn(&mut self, now: Instant) -> bool {
        let enabled = self.settings.mirrors_key_values();
        // While Redis is unreachable, the start of a pass is the probe that finds it back:
        // sent when a pass is due and both the lane's and the link's delays are over.
        let may_start = if self.lanes.link.up {
            self.lanes.get(Lane::KeyValues).may_work(now)
        } else {
            // (The lane's hold is looked at without counting a retry: the probe counts one.)
            enabled
                && self.keys.due(now)
                && self.lanes.get_ref(Lane::KeyValues).wait(now).is_none()
                && self.lanes.may_probe(now)
        };
        if enabled {
            self.keys.follow_routes(&self.settings, now);
        }
        let ctx = KvCtx { budget: &self.budget, waker: &self.waker, may_start };
        let outcome = self.keys.step(&mut self.kv_writer, &self.settings, now, &ctx);
        let worked = match outcome {
            Ok(turn) => {
                if turn.heard {
                    self.lanes.connected(&self.settings.redis.server(), &self.log);
                }
                if turn.wrote || turn.finished.is_some() {
                    self.lanes.get(Lane::KeyValues).succeeded(&self.log);
                }
                if let Some(flags) = turn.notify_flags {
                    self.follow_notifications(flags.as_deref());
                }
                if let Some(summary) = turn.finished {
                    self.log.debug(&pass_line(&summary));
                    // Handed to the stream worker's discovery, which may skip its own walk.
                    shmem::hand_over_learned(self.keys.learned().map(|l| (l.at, &l.streams[..])));
                }
                turn.worked
            }
            Err(e) => {
                self.kv_writer.reset();
                if e.connection_lost() && !self.lanes.link.up {
                    self.lanes.probe_failed(Lane::KeyValues, e, &self.settings, &self.log, now);
                } else {
                    self.lanes.failed(Lane::KeyValues, e, &self.settings, &self.log, now);
                }
                true
            }
        };
        self.lanes.get(Lane::KeyValues).state = match (enabled, self.keys.busy()) {
            (false, _) => LaneState::Off,
            (true, true) => LaneState::Running,
            (true, false) => LaneState::Idle,
        };
        worked
    }

    /// Writes the keys that keyspace notifications named, already fetched by the
    /// notification thread.
    fn notification_turn(&mut self, now: Instant) -> bool {
        if self.lanes.get(Lane::KeyValues).backing_off() {
            return false;
        }
        let Some(n) = self.notifier.as_mut() else { return false };
        if n.overflowed.swap(false, std::sync::atomic::Ordering::Relaxed) {
            // Changes were missed (just subscribed, or the queue was full).
            self.keys.pass_now(now);
        }
        let mut worked = false;
        for _ in 0..CHANGES_PER_TURN {
            let Some(n) = self.notifier.as_mut() else { break };
            let changed = match n.try_next() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    // The thread is gone: started again after the next pass.
                    self.notifier = None;
                    break;
                }
            };
            worked = true;
            if let Err(e) = self.keys.apply_changes(&mut self.kv_writer, &self.settings, changed) {
                self.kv_writer.reset();
                self.lanes.failed(Lane::KeyValues, e, &self.settings, &self.log, now);
                // What was not written is found by the next pass.
                self.keys.pass_now(now);
                break;
            }
        }
        worked
    }

    /// Starts or stops listening to keyspace notifications as the server publishes them
    /// (`flags`: its `notify-keyspace-events`, read at the end of every pass).
    fn follow_notifications(&mut self, flags: Option<&str>) {
        let s = &self.settings;
        let want = s.key_value_auto_discovery && flags.is_some_and(flags_cover_changes);
        let scope = Scope {
            settings: s.redis.clone(),
            dbs: s.db_search_range.clone(),
            patterns: s.key_value_patterns.clone(),
            limit: s.key_value_max_size,
        };
        let current = self.notifier.as_ref().is_some_and(|n| n.scope == scope);
        if want && !current {
            let started = self
                .waker
                .handle()
                .map_err(|e| crate::error::SyncError::Config(e.to_string()))
                .and_then(|wake| {
                    Notifier::start(scope, self.budget.clone(), wake, self.keys.ids())
                });
            match started {
                Ok(n) => {
                    self.notifier = Some(n);
                    self.log.info(
                        "Redis publishes keyspace notifications: changed keys are synced as they change",
                    );
                }
                Err(e) => self.log.error(&e),
            }
        } else if !want && self.notifier.is_some() {
            self.notifier = None;
            self.log.info("keyspace notifications are off: changes are found by scanning");
        }
    }

    /// How long the loop may sleep: until the first lane has something due. Helper threads
    /// wake it when they hand something over.
    fn wait(&self, now: Instant) -> Duration {
        let mut wait = MAX_WAIT;
        let kv_on = self.settings.mode == Mode::Sync && self.settings.mirrors_key_values();
        let probe = self.lanes.probe_wait(now);
        match self.role {
            Role::Streams => {
                wait = wait.min(self.streams.discovery_wait(&self.settings, now));
                if let Some(acks) = self.streams.ack_wait() {
                    wait = wait.min(acks);
                }
                // The probe is discovery's next job; one in flight wakes the loop itself.
                if !self.lanes.link.up && !self.streams.discovery_busy() {
                    wait = wait.min(probe);
                }
            }
            Role::KeyValues if kv_on => {
                let mut next = self.keys.wait(now);
                // The probe is the next pass start: when it is due and the link's delay over.
                if !self.lanes.link.up && !self.keys.busy() {
                    next = next.max(probe);
                }
                wait = wait.min(next);
            }
            Role::KeyValues => {}
        }
        for &lane in self.role.lanes() {
            if let Some(held) = self.lanes.get_ref(lane).wait(now) {
                wait = wait.min(held);
            }
        }
        wait
    }

    /// The process's state, its lanes' rows and what pg_stat_activity shows.
    fn publish(&mut self, worked: bool) {
        self.lanes.publish();
        let connected = self.lanes.link.up;
        let (state, text, idle) = match self.role {
            Role::Streams => self.stream_state(worked),
            Role::KeyValues => self.key_value_state(worked),
        };
        self.enter(state, &text, connected, idle);
    }

    fn stream_state(&self, worked: bool) -> (WorkerState, String, bool) {
        let n = self.streams.tracked();
        let streams = format!("{n} stream{}", if n == 1 { "" } else { "s" });
        if !self.lanes.link.ever && !self.lanes.any_failing() {
            (
                WorkerState::Connecting,
                format!("connecting to Redis {}", self.settings.redis.server()),
                false,
            )
        } else if self.lanes.any_failing() {
            let error =
                shmem::snapshot().map(|s| s.last_error.as_str().to_owned()).unwrap_or_default();
            (WorkerState::BackingOff, format!("backing off: {error}"), true)
        } else if self.settings.mode == Mode::Monitor {
            (WorkerState::Monitoring, format!("monitoring {streams}"), !worked)
        } else if !worked {
            (WorkerState::Running, format!("idle: {streams}, waiting for changes"), true)
        } else {
            (WorkerState::Running, format!("syncing {streams}"), false)
        }
    }

    fn key_value_state(&self, worked: bool) -> (WorkerState, String, bool) {
        let s = &self.settings;
        if s.mode == Mode::Monitor {
            return (WorkerState::Monitoring, "monitor mode: no key-value mirror".into(), true);
        }
        if !s.mirrors_key_values() {
            return (
                WorkerState::Running,
                "idle: key-value mirror off (redis_sync.key_value_auto_discovery)".into(),
                true,
            );
        }
        if !self.lanes.link.ever && !self.lanes.any_failing() {
            (WorkerState::Connecting, format!("connecting to Redis {}", s.redis.server()), false)
        } else if self.lanes.any_failing() {
            let error = shmem::snapshot()
                .map(|st| st.lanes[Lane::KeyValues as usize].last_error.as_str().to_owned())
                .unwrap_or_default();
            (WorkerState::BackingOff, format!("backing off: {error}"), true)
        } else if worked && self.keys.busy() {
            (WorkerState::Running, "syncing key values: key-value pass".into(), false)
        } else if worked {
            (WorkerState::Running, "syncing key values: notified changes".into(), false)
        } else {
            (WorkerState::Running, "idle: key values, waiting for changes".into(), true)
        }
    }

    /// Publishes the state, and the activity when it changed.
    fn enter(&mut self, state: WorkerState, activity: &str, connected: bool, idle: bool) {
        let role = self.role;
        let more = usize::from(self.settings.stream_worker).checked_sub(1);
        let changed = shmem::snapshot().map(|s| match (role, more) {
            (Role::Streams, Some(i)) => s.more.get(i).is_some_and(|m| m.state != state),
            (Role::Streams, None) => s.state != state || s.redis_connected != connected,
            (Role::KeyValues, _) => s.kv.state != state,
        });
        if changed.unwrap_or(true) {
            shmem::update(|s| match (role, more) {
                (Role::Streams, Some(i)) => {
                    if let Some(m) = s.more.get_mut(i) {
                        m.state = state;
                    }
                }
                (Role::Streams, None) => {
                    s.state = state;
                    s.redis_connected = connected;
                }
                (Role::KeyValues, _) => s.kv.state = state,
            });
        }
        if (idle, activity) != (self.activity.0, self.activity.1.as_str()) {
            pg::report_activity(idle, activity);
            self.activity = (idle, activity.to_owned());
        }
    }
}

/// The stream worker's commits return before their WAL is flushed, and its entries are
/// acknowledged once it is (see [`pg::defer_flush`]); except where the server, database or
/// role make commits wait for synchronous standbys: then they wait, as configured. The
/// key-value worker acknowledges nothing and commits as configured.
fn follow_commit_setting(role: Role) {
    pg::defer_flush(role == Role::Streams && !pg::commits_wait_for_standbys());
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
