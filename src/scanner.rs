//! The scanner thread of a key-value pass: walks every SCAN of the pass and fetches each
//! page's types, expiries and values, a page or two ahead of the main thread, which compares
//! and writes. Redis, the scanner's parsing and the main thread's comparison then overlap
//! instead of taking turns (a pass over a million keys is mostly this work).
//!
//! Like the reader thread it owns its own connection, has every signal blocked, talks over
//! a bounded channel and never calls Postgres. The main thread takes the rate limit's tokens
//! for the round trips each page cost, so the limit holds over time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::parse::Pattern;
use crate::reader::with_signals_blocked;
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
}

enum Msg {
    Page(Page),
    Done,
    Failed(SyncError),
}

pub struct Scanner {
    pages: Receiver<Msg>,
    stop: Arc<AtomicBool>,
    done: bool,
}

impl Scanner {
    /// Starts scanning `jobs` (database, Redis glob) one after the other; keys are kept
    /// when one of `patterns` matches them.
    pub fn start(
        settings: &RedisSettings,
        jobs: Vec<(u8, Vec<u8>)>,
        patterns: Vec<Pattern>,
    ) -> Result<Scanner> {
        // At most two pages wait: memory stays at a few thousand keys.
        let (tx, rx) = sync_channel::<Msg>(2);
        let stop = Arc::new(AtomicBool::new(false));
        let settings = settings.clone();
        let flag = stop.clone();
        with_signals_blocked(|| {
            std::thread::Builder::new().name("redis_pg_sync scanner".into()).spawn(move || {
                let end = match scan(&settings, &jobs, &patterns, &tx, &flag) {
                    Ok(()) => Msg::Done,
                    Err(e) => Msg::Failed(e),
                };
                let _ = tx.send(end);
            })
        })
        .map_err(|e| SyncError::Config(format!("cannot start the scanner thread: {e}")))?;
        Ok(Scanner { pages: rx, stop, done: false })
    }

    /// The next page, or `None` when every SCAN is done. Calls `tick` every 100 ms while
    /// waiting (the worker checks for interrupts there).
    pub fn next(&mut self, tick: &dyn Fn()) -> Result<Option<Page>> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.pages.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Page(p)) => return Ok(Some(p)),
                Ok(Msg::Done) => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Msg::Failed(e)) => {
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

impl Drop for Scanner {
    fn drop(&mut self) {
        // The thread stops at its next page (or when its send finds nobody listening); a
        // round trip in flight ends within the connection's timeouts.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn scan(
    settings: &RedisSettings,
    jobs: &[(u8, Vec<u8>)],
    patterns: &[Pattern],
    tx: &SyncSender<Msg>,
    stop: &AtomicBool,
) -> Result<()> {
    // No rate limit here: the main thread takes the tokens as pages arrive.
    let mut redis = Redis::connect(settings, 0, std::thread::sleep)?;
    for (db, glob) in jobs {
        let mut cursor = 0;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let before = redis.round_trips();
            let (next, keys) = redis.scan_page(*db, cursor, glob, SCAN_COUNT)?;
            let keys: Vec<Vec<u8>> =
                keys.into_iter().filter(|k| patterns.iter().any(|p| p.matches(k))).collect();
            let metas = fetch(&mut redis, *db, &keys)?;
            let round_trips = redis.round_trips() - before;
            let page = Page { db: *db, keys, metas, round_trips };
            if tx.send(Msg::Page(page)).is_err() {
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
