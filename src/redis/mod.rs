//! The Redis side: connections with timeouts (one per logical database in use), health
//! checks, the token bucket over round trips, and the commands the worker needs.
//!
//! - `conn`: opening connections (TLS, AUTH, timeouts) and the reader's blocking read
//! - `commands`: the commands of discovery, groups, acknowledgements, key-value passes
//! - `reply`: pure parsing of the replies
//!
//! Nothing here calls Postgres except through the `sleep` callback given to
//! [`Redis::connect`] (the worker passes its latch wait); the counters it bumps are atomics.

mod commands;
mod conn;
mod reply;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ::redis::Value;

use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::ratelimit::TokenBucket;
use crate::shmem;

pub use conn::{open_connection, RedisConn};
pub use reply::{bulk_list, KeyMeta, StreamInfo};

use conn::command_error;

/// All connections to one Redis server, keyed by logical database, plus the rate limit.
pub struct Redis {
    settings: RedisSettings,
    conns: BTreeMap<u8, RedisConn>,
    bucket: TokenBucket,
    sleep: fn(Duration),
    round_trips: u64,
}

impl Redis {
    /// Connects to the default database of `settings`.
    pub fn connect(
        settings: &RedisSettings,
        rate_limit: u32,
        sleep: fn(Duration),
    ) -> Result<Redis> {
        let main = RedisConn::connect(settings, settings.db)?;
        let mut conns = BTreeMap::new();
        conns.insert(settings.db, main);
        Ok(Redis {
            settings: settings.clone(),
            conns,
            bucket: TokenBucket::new(rate_limit, Instant::now()),
            sleep,
            round_trips: 0,
        })
    }

    pub fn set_rate_limit(&mut self, rate: u32) {
        if rate != self.bucket.rate() {
            self.bucket.set_rate(rate, Instant::now());
        }
    }

    /// Waits for a token of the rate limit, for a round trip made elsewhere (the reader
    /// thread counts its own round trips).
    pub fn take_token(&mut self) {
        while let Err(wait) = self.bucket.try_take(Instant::now()) {
            (self.sleep)(wait);
        }
    }

    /// Waits for a token and counts the round trip about to be made.
    fn throttle(&mut self) {
        self.take_token();
        self.round_trips += 1;
        shmem::bump(|c| &c.redis_ops, 1);
    }

    /// Round trips made through this value so far.
    pub fn round_trips(&self) -> u64 {
        self.round_trips
    }

    fn conn(&mut self, db: u8) -> Result<&mut RedisConn> {
        if !self.conns.contains_key(&db) {
            let c = RedisConn::connect(&self.settings, db)?;
            self.conns.insert(db, c);
        }
        self.conns.get_mut(&db).ok_or_else(|| SyncError::Config("no connection".into()))
    }

    /// Closes the connections of databases not in `keep` (the default database stays).
    pub fn retain_connections(&mut self, keep: &std::collections::BTreeSet<u8>) {
        let main = self.settings.db;
        self.conns.retain(|db, _| *db == main || keep.contains(db));
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

    /// When the next health check is due.
    pub fn next_check(&self, interval: Duration) -> Instant {
        self.conns.values().map(|c| c.last_check + interval).min().unwrap_or_else(Instant::now)
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
    /// the default connection (`SELECT db` first and back after); returns their replies.
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
    /// rather than failing the whole round trip (a failed `SELECT` still fails it: the
    /// commands would have run against another database).
    fn pipeline_in_lenient(
        &mut self,
        db: u8,
        name: &'static str,
        build: impl FnOnce(&mut ::redis::Pipeline),
    ) -> Result<Vec<::redis::RedisResult<Value>>> {
        let main = self.settings.db;
        let switch = db != main;
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        if switch {
            pipe.cmd("SELECT").arg(db);
        }
        build(&mut pipe);
        if switch {
            pipe.cmd("SELECT").arg(main);
        }
        self.throttle();
        let c = self.conn(main)?;
        let reply = pipe.query::<Vec<::redis::RedisResult<Value>>>(&mut c.conn);
        c.last_check = Instant::now();
        let mut replies = reply.map_err(|e| command_error(name, &e))?;
        if switch {
            let back = replies.pop();
            let first = if replies.is_empty() { None } else { Some(replies.remove(0)) };
            for select in [first, back] {
                match select {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(command_error("SELECT", &e)),
                    None => return Err(SyncError::protocol("SELECT", "missing reply")),
                }
            }
        }
        Ok(replies)
    }
}

impl SyncError {
    fn protocol(command: &'static str, detail: &str) -> SyncError {
        SyncError::RedisCommand { command, detail: detail.to_owned(), code: None }
    }
}
