//! The scanner thread of a key-value pass: walks every SCAN of the pass and fetches each
//! page's types, expiries and values, a page or two ahead of the main thread, which compares
//! and writes. Redis, the scanner's parsing and the main thread's comparison then overlap
//! instead of taking turns (a pass over a million keys is mostly this work).
//!
//! Like the reader thread it owns its own connection (kept from pass to pass), has every
//! signal blocked, talks over a bounded channel and never calls Postgres. The main thread
//! takes the rate limit's tokens for the round trips each page cost, so the limit holds
//! over time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::parse::Pattern;
use crate::redis::{KeyMeta, Redis};

/// Keys asked per SCAN call; also the unit of one write.
pub const SCAN_COUNT: u32 = 1000;

/// One SCAN page with what Redis said about each of its keys that match the patterns.
pub struct Page {
    pub db: u8,
    pub keys: Vec<Vec<u8>>,
    pub metas: Vec<KeyMeta>,
    /// Round trips this page took.
    pub round_trips: u64,
    /// When its values were asked for: anything learnt about a key later is newer.
    pub fetched_at: Instant,
}

enum Msg {
    Page(Page),
    Done,
    Failed(SyncError),
}

/// One pass to scan: every (database, Redis glob) in turn, keys kept when a pattern
/// matches them.
struct Job {
    number: u64,
    settings: RedisSettings,
    scans: Vec<(u8, Vec<u8>)>,
    patterns: Vec<Pattern>,
}

/// The scanner thread, kept from pass to pass with its connection (no connect, AUTH or TLS
/// handshake per pass).
pub struct Scanner {
    jobs: Sender<Job>,
    pages: Receiver<(u64, Msg)>,
    /// The pass the thread should be scanning; any other is dropped at its next page.
    current: Arc<AtomicU64>,
    number: u64,
    done: bool,
}

impl Scanner {
    pub fn start() -> Result<Scanner> {
        let (jobs_tx, jobs_rx) = channel::<Job>();
        // At most two pages wait: memory stays at a few thousand keys.
        let (tx, rx) = sync_channel::<(u64, Msg)>(2);
        let current = Arc::new(AtomicU64::new(0));
        let flag = current.clone();
        crate::worker::spawn_helper("redis_pg_sync scanner", move || serve(jobs_rx, tx, flag))
            .map_err(|e| SyncError::Config(format!("cannot start the scanner thread: {e}")))?;
        Ok(Scanner { jobs: jobs_tx, pages: rx, current, number: 0, done: true })
    }

    /// Starts scanning a new pass (whatever pass was under way is dropped).
    pub fn begin(
        &mut self,
        settings: &RedisSettings,
        scans: Vec<(u8, Vec<u8>)>,
        patterns: Vec<Pattern>,
    ) -> Result<()> {
        self.number += 1;
        self.current.store(self.number, Ordering::Relaxed);
        self.done = false;
        let job = Job { number: self.number, settings: settings.clone(), scans, patterns };
        self.jobs.send(job).map_err(|_| SyncError::ThreadStopped("scanner"))
    }

    /// Drops the pass under way: the thread stops at its next page.
    pub fn cancel(&mut self) {
        self.number += 1;
        self.current.store(self.number, Ordering::Relaxed);
        self.done = true;
    }

    /// The next page of the pass, or `None` when every SCAN is done. Calls `tick` every
    /// 100 ms while waiting (the worker checks for interrupts there).
    pub fn next(&mut self, tick: &dyn Fn()) -> Result<Option<Page>> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.pages.recv_timeout(Duration::from_millis(100)) {
                // A page of a dropped pass.
                Ok((number, _)) if number != self.number => {}
                Ok((_, Msg::Page(p))) => return Ok(Some(p)),
                Ok((_, Msg::Done)) => {
                    self.done = true;
                    return Ok(None);
                }
                Ok((_, Msg::Failed(e))) => {
                    self.done = true;
                    return Err(e);
                }
                Err(RecvTimeoutError::Timeout) => tick(),
                Err(RecvTimeoutError::Disconnected) => {
                    self.done = true;
                    return Err(SyncError::ThreadStopped("scanner"));
                }
            }
        }
    }
}

fn serve(jobs: Receiver<Job>, pages: SyncSender<(u64, Msg)>, current: Arc<AtomicU64>) {
    let mut conn: Option<(RedisSettings, Redis)> = None;
    for job in jobs {
        if current.load(Ordering::Relaxed) != job.number {
            continue;
        }
        let end = match scan(&mut conn, &job, &pages, &current) {
            Ok(()) => Msg::Done,
            Err(e) => {
                // The connection may be broken: a fresh one for the next pass.
                conn = None;
                Msg::Failed(e)
            }
        };
        if pages.send((job.number, end)).is_err() {
            return;
        }
    }
}

fn scan(
    conn: &mut Option<(RedisSettings, Redis)>,
    job: &Job,
    pages: &SyncSender<(u64, Msg)>,
    current: &AtomicU64,
) -> Result<()> {
    // A connection kept from the last pass may have died since (a Redis restart between
    // passes): checked with a PING, replaced if need be, rather than failing the pass.
    if conn.as_mut().is_some_and(|(_, r)| r.check_health(Duration::ZERO).is_err()) {
        *conn = None;
    }
    if conn.as_ref().is_none_or(|(s, _)| *s != job.settings) {
        *conn = None;
        // No rate limit here: the main thread takes the tokens as pages arrive.
        let redis = Redis::connect(&job.settings, 0, std::thread::sleep)?;
        *conn = Some((job.settings.clone(), redis));
    }
    let Some((_, redis)) = conn.as_mut() else { return Ok(()) };
    for (db, glob) in &job.scans {
        let mut cursor = 0;
        loop {
            if current.load(Ordering::Relaxed) != job.number {
                return Ok(());
            }
            let before = redis.round_trips();
            let (next, keys) = redis.scan_page(*db, cursor, glob, SCAN_COUNT)?;
            let keys: Vec<Vec<u8>> =
                keys.into_iter().filter(|k| job.patterns.iter().any(|p| p.matches(k))).collect();
            let fetched_at = Instant::now();
            let metas = fetch(redis, *db, &keys)?;
            let round_trips = redis.round_trips() - before;
            let page = Page { db: *db, keys, metas, round_trips, fetched_at };
            if pages.send((job.number, Msg::Page(page))).is_err() {
                return Ok(());
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// Type, expiry and value of each key: strings in one round trip (with the expiries),
/// other types in two more.
pub fn fetch(redis: &mut Redis, db: u8, keys: &[Vec<u8>]) -> Result<Vec<KeyMeta>> {
    let mut meta = redis.key_meta(db, keys)?;
    let others: Vec<usize> = meta
        .iter()
        .enumerate()
        .filter(|(_, (t, _, v))| {
            v.is_none() && matches!(t.as_str(), "string" | "hash" | "list" | "set" | "zset")
        })
        .map(|(i, _)| i)
        .collect();
    if !others.is_empty() {
        let typed: Vec<(&[u8], &str)> =
            others.iter().map(|&i| (keys[i].as_slice(), meta[i].0.as_str())).collect();
        let values = redis.key_values(db, &typed)?;
        for (i, v) in others.into_iter().zip(values) {
            meta[i].2 = v;
        }
    }
    Ok(meta)
}
