//! The Redis side: connections with timeouts (one per logical database in use), health
//! checks, the token bucket over round trips, and the commands the worker needs.
//!
//! - `conn`: opening connections (TLS, AUTH, timeouts) and the reader's blocking read
//! - `commands`: the commands of discovery, groups, acknowledgements, key-value passes
//! - `fields`: a stream entry's fields in one buffer
//! - `raw`: the plain-TCP connection of reads and passes, with a reply parser of its own
//! - `reply`: pure parsing of the replies
//!
//! Nothing here calls Postgres except through the `sleep` callback given to
//! [`Redis::connect`] (the worker passes its latch wait); the counters it bumps are atomics.

mod cluster;
mod commands;
mod conn;
mod fields;
mod raw;
mod reply;
mod values;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::Value;

use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::ratelimit::{Budget, Lane};

pub use cluster::{nodes_seen, parse_seeds, ClusterLink};
pub use commands::Databases;
pub use conn::{open_connection, GroupRead, RedisConn, StreamEntries};
pub use fields::Fields;
pub use reply::{bulk_list, KeyMeta, StreamInfo};

use conn::command_error;

/// A SCAN page: the cursor to go on from (0: done) and the keys.
pub type ScanPage = (u64, Vec<Vec<u8>>);

/// Round trips made by this process and not yet counted in `redis_sync_status().redis_ops`.
/// Helper threads count here (they never touch shared memory); the main thread moves the
/// count into the shared counter every turn.
static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);

/// Takes the round trips counted since the last call.
pub fn take_round_trips() -> u64 {
    ROUND_TRIPS.swap(0, Ordering::Relaxed)
}

fn count_round_trip() {
    ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
}

/// `redis_sync.rate_limit`, shared by every lane's threads (see `ratelimit`): in shared
/// memory, so the stream and key-value worker processes draw from one set of buckets, or
/// in the process where the library is not preloaded.
#[derive(Clone)]
pub struct SharedBudget {
    /// The rate every thread of this process asks with (0: unlimited, no bucket looked at).
    rate: Arc<AtomicU32>,
    /// The buckets where the shared memory does not exist.
    local: Arc<Mutex<Budget>>,
    shared: bool,
}

impl SharedBudget {
    pub fn new(rate: u32) -> SharedBudget {
        let budget = SharedBudget {
            rate: Arc::new(AtomicU32::new(rate)),
            local: Arc::new(Mutex::new(Budget::new(rate, Instant::now()))),
            shared: crate::shmem::preloaded(),
        };
        budget.set_rate(rate);
        budget
    }

    /// No rate limit is set: round trips cost nothing from a budget.
    pub fn unlimited(&self) -> bool {
        self.rate.load(Ordering::Relaxed) == 0
    }

    fn with<R>(&self, f: impl FnOnce(&mut Budget) -> R) -> R {
        let f = if self.shared {
            match crate::shmem::with_budget(self.rate.load(Ordering::Relaxed), f) {
                Ok(r) => return r,
                Err(f) => f,
            }
        } else {
            f
        };
        f(&mut self.local.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_rate(&self, rate: u32) {
        self.rate.store(rate, Ordering::Relaxed);
        self.with(|b| {
            if b.rate() != rate {
                b.set_rate(rate, Instant::now());
            }
        });
    }

    /// Waits (sleeping the calling thread, which is never the main one) for a token of
    /// `lane` and counts the round trip about to be made.
    pub fn take(&self, lane: Lane) {
        loop {
            // Unlimited: no bucket to look at.
            if self.rate.load(Ordering::Relaxed) == 0 {
                break;
            }
            match self.with(|b| b.try_take(lane, Instant::now())) {
                Ok(()) => break,
                // At most 100 ms at a time, so a raised limit is noticed soon.
                Err(wait) => std::thread::sleep(wait.min(Duration::from_millis(100))),
            }
        }
        count_round_trip();
    }
}

/// All connections of one lane to one Redis server, one per logical database in use (each
/// `SELECT`s its database once, at connect), and the lane's part of the rate limit. Used on
/// helper threads only.
pub struct Redis {
    settings: RedisSettings,
    conns: BTreeMap<u8, RedisConn>,
    budget: SharedBudget,
    lane: Lane,
    /// What the server says about its databases, learnt at the first look.
    databases: Option<Databases>,
    /// The server has no PEXPIRETIME (Redis before 7): expiries are read with PTTL.
    use_pttl: bool,
    /// The collection type most keys of the last page were: the next page's values are
    /// asked for as that type, without asking each key's type first.
    guess: Option<&'static str>,
}

impl Redis {
    /// Connects to the default database of `settings`.
    pub fn connect(settings: &RedisSettings, budget: SharedBudget, lane: Lane) -> Result<Redis> {
        let main = RedisConn::connect_fast(settings, settings.db)?;
        let mut conns = BTreeMap::new();
        conns.insert(settings.db, main);
        Ok(Redis {
            settings: settings.clone(),
            conns,
            budget,
            lane,
            databases: None,
            use_pttl: false,
            guess: None,
        })
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    /// Expiries are read with PTTL (the server has no PEXPIRETIME).
    pub fn reads_ttl(&self) -> bool {
        self.use_pttl
    }

    /// Waits for a token and counts the round trip about to be made.
    fn throttle(&mut self) {
        self.budget.take(self.lane);
    }

    fn conn(&mut self, db: u8) -> Result<&mut RedisConn> {
        if !self.conns.contains_key(&db) {
            let c = RedisConn::connect_fast(&self.settings, db)?;
            self.conns.insert(db, c);
        }
        self.conns.get_mut(&db).ok_or_else(|| SyncError::Config("no connection".into()))
    }

    /// PINGs every connection whose last exchange is older than `interval`.
    pub fn check_health(&mut self, interval: Duration) -> Result<()> {
        for c in self.conns.values_mut() {
            if c.last_check.elapsed() >= interval {
                c.ping()?;
            }
        }
        Ok(())
    }

    fn query(&mut self, db: u8, name: &'static str, cmd: &::redis::Cmd) -> Result<Value> {
        // (VerbatimString replies, e.g. INFO under RESP3, are read as plain text by as_string.)
        self.throttle();
        let c = self.conn(db)?;
        let reply = cmd.query::<Value>(&mut c.conn);
        c.last_check = Instant::now();
        reply.map_err(|e| command_error(name, &e))
    }

    /// Runs the commands `build` adds against database `db` in one pipelined round trip on
    /// that database's connection; returns their replies, failing on the first error.
    fn pipeline_in(
        &mut self,
        db: u8,
        name: &'static str,
        build: impl FnOnce(&mut ::redis::Pipeline),
    ) -> Result<Vec<Value>> {
        self.pipeline_in_lenient(db, name, build)?
            .into_iter()
            .map(|r| r.map_err(|e| command_error(name, &e)))
            .collect()
    }

    /// As [`Redis::pipeline_in`], but a command's error reply is returned in its place
    /// rather than failing the whole round trip.
    fn pipeline_in_lenient(
        &mut self,
        db: u8,
        name: &'static str,
        build: impl FnOnce(&mut ::redis::Pipeline),
    ) -> Result<Vec<::redis::RedisResult<Value>>> {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        build(&mut pipe);
        self.throttle();
        let c = self.conn(db)?;
        let reply = pipe.query::<Vec<::redis::RedisResult<Value>>>(&mut c.conn);
        c.last_check = Instant::now();
        reply.map_err(|e| command_error(name, &e))
    }
}

impl SyncError {
    fn protocol(command: &'static str, detail: &str) -> SyncError {
        SyncError::RedisCommand { command, detail: detail.to_owned(), code: None }
    }
}
