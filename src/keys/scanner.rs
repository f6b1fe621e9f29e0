//! The key-value lane's thread: all of a pass's Redis work. It learns the server's run ID
//! and which databases hold keys, walks every SCAN of the pass and fetches each page's
//! types, expiries and values a page or two ahead of the main thread (which compares and
//! writes), reports the run ID and the `notify-keyspace-events` setting at the end, and
//! confirms with `TYPE` which keys the deletion check found missing are really gone.
//!
//! It owns its connections (kept from pass to pass), takes its round trips from the
//! key-value lane's share of the rate limit, talks over bounded channels (waking the main
//! thread), has every signal blocked and never calls Postgres.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::memory::KeyIds;
use super::rows::{prepare, Found};
use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::parse::Pattern;
use crate::pg::WakeHandle;
use crate::ratelimit::Lane;
use crate::redis::{Databases, Redis, ScanPage, SharedBudget};

/// Keys asked per SCAN call: Redis does the same work whatever the page size, and a large
/// page costs a tenth of the round trips of `COUNT 1000` (a million keys in about 200).
pub const SCAN_COUNT: u32 = 10_000;

/// A page with at least this many keys to fetch is fetched in two halves at once, on two
/// connections, when no rate limit is set: Redis serves one half while this thread reads
/// the other's replies (one connection leaves Redis idle while its replies are parsed, and
/// this thread idle while Redis works).
const SPLIT_KEYS: usize = 2000;

/// A kept connection idle longer than this is checked with a PING before a pass uses it.
const KEPT_IDLE: Duration = Duration::from_secs(5);

/// One SCAN page with what Redis said about each of its keys that match the patterns, made
/// ready to compare and write.
pub struct Page {
    pub db: u8,
    pub keys: Vec<Vec<u8>>,
    pub found: Vec<Found>,
    /// When its values were asked for: anything learnt about a key later is newer.
    pub fetched_at: Instant,
}

pub enum Msg {
    /// The pass began: what the server says of itself and its databases.
    Started(Databases),
    Page(Page),
    /// Every SCAN is done: the run ID now (a different one means Redis restarted during the
    /// pass) and `notify-keyspace-events` (`None` when it cannot be read).
    Done {
        run_id: String,
        notify_flags: Option<String>,
        /// Expiries were read as `PTTL` (Redis before 7 has no `PEXPIRETIME`): each one
        /// is the read's time plus the time to live, to the second.
        pttl: bool,
    },
    /// The types of keys asked about (`none` for a key that is gone).
    Types {
        db: u8,
        keys: Vec<String>,
        types: Vec<String>,
    },
    Failed(SyncError),
}

enum Job {
    Pass {
        number: u64,
        settings: RedisSettings,
        range: Vec<u8>,
        globs: Vec<Vec<u8>>,
        patterns: Vec<Pattern>,
        /// The routes' patterns: the hashes they match are read without their text.
        routed: Vec<Pattern>,
        /// The largest value fetched, in bytes.
        limit: u64,
    },
    Confirm {
        number: u64,
        settings: RedisSettings,
        db: u8,
        /// As stored in the table (encoded), and as bytes for Redis.
        names: Vec<String>,
        keys: Vec<Vec<u8>>,
    },
}

/// The scanner thread, kept from pass to pass with its connections (no connect, AUTH or
/// TLS handshake per pass).
pub struct Scanner {
    jobs: Sender<Job>,
    msgs: Receiver<(u64, Msg)>,
    /// The pass the thread should be working for; any other is dropped at its next page.
    current: Arc<AtomicU64>,
    number: u64,
}

impl Scanner {
    pub fn start(budget: SharedBudget, wake: WakeHandle, ids: Arc<KeyIds>) -> Result<Scanner> {
        let (jobs_tx, jobs_rx) = channel::<Job>();
        // At most two pages wait: memory stays at a few pages of keys.
        let (tx, rx) = sync_channel::<(u64, Msg)>(2);
        let current = Arc::new(AtomicU64::new(0));
        let flag = current.clone();
        crate::worker::spawn_helper("redis_pg_sync scanner", move || {
            serve(jobs_rx, tx, flag, budget, wake, ids)
        })
        .map_err(|e| SyncError::Config(format!("cannot start the scanner thread: {e}")))?;
        Ok(Scanner { jobs: jobs_tx, msgs: rx, current, number: 0 })
    }

    /// Starts a new pass (whatever pass was under way is dropped).
    pub fn begin(
        &mut self,
        settings: &RedisSettings,
        range: Vec<u8>,
        patterns: Vec<Pattern>,
        routed: Vec<Pattern>,
        limit: u64,
    ) -> Result<()> {
        self.number += 1;
        self.current.store(self.number, Ordering::Relaxed);
        let globs = crate::parse::redis_globs(&patterns);
        let settings = settings.clone();
        let job =
            Job::Pass { number: self.number, settings, range, globs, patterns, routed, limit };
        self.jobs.send(job).map_err(|_| SyncError::ThreadStopped("scanner"))
    }

    /// Asks which of `names` (keys of database `db`) still exist, and as what.
    pub fn confirm(&mut self, settings: &RedisSettings, db: u8, names: Vec<String>) -> Result<()> {
        let keys =
            names.iter().map(|n| crate::encode::decode_name(n).unwrap_or_default()).collect();
        let job = Job::Confirm { number: self.number, settings: settings.clone(), db, names, keys };
        self.jobs.send(job).map_err(|_| SyncError::ThreadStopped("scanner"))
    }

    /// Drops the pass under way: the thread stops at its next page.
    pub fn cancel(&mut self) {
        self.number += 1;
        self.current.store(self.number, Ordering::Relaxed);
    }

    /// The next message of the pass under way, if one has come.
    pub fn try_next(&mut self) -> Result<Option<Msg>> {
        loop {
            match self.msgs.try_recv() {
                // A message of a dropped pass.
                Ok((number, _)) if number != self.number => {}
                Ok((_, msg)) => return Ok(Some(msg)),
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => return Err(SyncError::ThreadStopped("scanner")),
            }
        }
    }
}

struct Conn {
    settings: RedisSettings,
    redis: Redis,
    /// The second connection a split page's other half is fetched on, opened when first
    /// needed.
    second: Option<Redis>,
}

fn serve(
    jobs: Receiver<Job>,
    msgs: SyncSender<(u64, Msg)>,
    current: Arc<AtomicU64>,
    budget: SharedBudget,
    wake: WakeHandle,
    ids: Arc<KeyIds>,
) {
    let mut conn: Option<Conn> = None;
    let send = |number: u64, msg: Msg| {
        let ok = msgs.send((number, msg)).is_ok();
        wake.wake();
        ok
    };
    for job in jobs {
        let (number, settings) = match &job {
            Job::Pass { number, settings, .. } | Job::Confirm { number, settings, .. } => {
                (*number, settings.clone())
            }
        };
        if current.load(Ordering::Relaxed) != number {
            continue;
        }
        let outcome = connect(&mut conn, &settings, &budget).and_then(|c| match job {
            Job::Pass { range, globs, patterns, routed, limit, .. } => {
                let what = Scan {
                    range: &range,
                    globs: &globs,
                    patterns: &patterns,
                    routed: &routed,
                    limit,
                };
                scan(c, &budget, number, &what, &ids, &send, &current)
            }
            Job::Confirm { db, names, keys, .. } => {
                let types = confirm(&mut c.redis, db, &keys)?;
                send(number, Msg::Types { db, keys: names, types });
                Ok(())
            }
        });
        if let Err(e) = outcome {
            // The connection may be broken: a fresh one for the next job.
            conn = None;
            if !send(number, Msg::Failed(e)) {
                return;
            }
        }
    }
}

fn connect<'a>(
    conn: &'a mut Option<Conn>,
    settings: &RedisSettings,
    budget: &SharedBudget,
) -> Result<&'a mut Conn> {
    // A connection kept from an earlier pass and idle since may have died (a Redis restart
    // between passes): checked with a PING, replaced if need be, rather than failing the
    // pass. One used a moment ago is not checked (no extra command per pass).
    if conn.as_mut().is_some_and(|c| c.redis.check_health(KEPT_IDLE).is_err()) {
        *conn = None;
    }
    if conn.as_ref().is_none_or(|c| c.settings != *settings) {
        *conn = None;
        let redis = Redis::connect(settings, budget.clone(), Lane::KeyValues)?;
        *conn = Some(Conn { settings: settings.clone(), redis, second: None });
    }
    if let Some(c) = conn.as_mut() {
        if c.second.as_mut().is_some_and(|r| r.check_health(KEPT_IDLE).is_err()) {
            c.second = None;
        }
    }
    match conn.as_mut() {
        Some(c) => Ok(c),
        None => Err(SyncError::Config("no scanner connection".into())),
    }
}

/// What a pass scans.
struct Scan<'a> {
    range: &'a [u8],
    globs: &'a [Vec<u8>],
    patterns: &'a [Pattern],
    routed: &'a [Pattern],
    limit: u64,
}

fn scan(
    conn: &mut Conn,
    budget: &SharedBudget,
    number: u64,
    what: &Scan<'_>,
    ids: &KeyIds,
    send: &dyn Fn(u64, Msg) -> bool,
    current: &AtomicU64,
) -> Result<()> {
    let Scan { range, globs, patterns, routed, limit } = *what;
    let Conn { settings, redis, second } = conn;
    let dbs = redis.databases()?;
    let to_scan = dbs.to_scan(range);
    if !send(number, Msg::Started(dbs)) {
        return Ok(());
    }
    let keep = |keys: Vec<Vec<u8>>| -> Vec<Vec<u8>> {
        keys.into_iter().filter(|k| patterns.iter().any(|p| p.matches(k))).collect()
    };
    for &db in &to_scan {
        for glob in globs {
            if current.load(Ordering::Relaxed) != number {
                return Ok(());
            }
            let (mut cursor, keys) = redis.scan_page(db, 0, glob, SCAN_COUNT)?;
            let mut keys = keep(keys);
            loop {
                if current.load(Ordering::Relaxed) != number {
                    return Ok(());
                }
                // This page's values and the next page's keys in one round trip.
                let next = (cursor != 0).then_some((cursor, glob.as_slice(), SCAN_COUNT));
                let fetched_at = Instant::now();
                let split = keys.len() >= SPLIT_KEYS && budget.unlimited();
                if split && second.is_none() {
                    *second = Some(Redis::connect(settings, budget.clone(), Lane::KeyValues)?);
                }
                let how = Reading { ids, limit, routed };
                let (found, scanned) = match second.as_mut().filter(|_| split) {
                    Some(other) => fetch_split(redis, other, how, db, &keys, next)?,
                    None => fetch_and_scan(redis, how, db, &keys, next)?,
                };
                if !keys.is_empty()
                    && !send(number, Msg::Page(Page { db, keys, found, fetched_at }))
                {
                    return Ok(());
                }
                let Some((next_cursor, next_keys)) = scanned else { break };
                cursor = next_cursor;
                keys = keep(next_keys);
            }
        }
    }
    let run_id = redis.databases()?.run_id;
    let notify_flags = redis.notify_flags();
    let pttl = redis.reads_ttl();
    send(number, Msg::Done { run_id, notify_flags, pttl });
    Ok(())
}

/// The types of `keys` of `db`; every key of a database the server no longer has is gone.
fn confirm(redis: &mut Redis, db: u8, keys: &[Vec<u8>]) -> Result<Vec<String>> {
    let has = redis.databases()?.has(db);
    if !has {
        return Ok(keys.iter().map(|_| "none".to_owned()).collect());
    }
    redis.key_types(db, keys)
}

/// How a page's values are read and made ready.
#[derive(Clone, Copy)]
struct Reading<'a> {
    ids: &'a KeyIds,
    /// Values bigger than this many bytes are not fetched.
    limit: u64,
    /// The routes' patterns: the hashes they match are made ready without their text.
    routed: &'a [Pattern],
}

/// What each of `keys` is now, ready to compare and write (values bigger than `limit`
/// bytes are not fetched).
pub fn fetch(
    redis: &mut Redis,
    ids: &KeyIds,
    db: u8,
    keys: &[Vec<u8>],
    limit: u64,
) -> Result<Vec<Found>> {
    Ok(fetch_and_scan(redis, Reading { ids, limit, routed: &[] }, db, keys, None)?.0)
}

/// As [`fetch_and_scan`], the second half of `keys` fetched at the same time on `other`
/// (by a thread of its own, which has this thread's signals blocked).
fn fetch_split(
    redis: &mut Redis,
    other: &mut Redis,
    how: Reading<'_>,
    db: u8,
    keys: &[Vec<u8>],
    next: Option<(u64, &[u8], u32)>,
) -> Result<(Vec<Found>, Option<ScanPage>)> {
    let (first, rest) = keys.split_at(keys.len() / 2);
    std::thread::scope(|s| {
        let helper = s.spawn(|| Ok(fetch_and_scan(other, how, db, rest, None)?.0));
        let mine = fetch_and_scan(redis, how, db, first, next);
        let theirs = helper.join().map_err(|_| SyncError::ThreadStopped("scanner"))?;
        let (mut found, scanned) = mine?;
        found.extend(theirs?);
        Ok((found, scanned))
    })
}

/// As [`fetch`], with the next SCAN page asked for in the first round trip.
fn fetch_and_scan(
    redis: &mut Redis,
    how: Reading<'_>,
    db: u8,
    keys: &[Vec<u8>],
    next: Option<(u64, &[u8], u32)>,
) -> Result<(Vec<Found>, Option<ScanPage>)> {
    let (metas, scanned) = redis.fetch_keys(db, keys, next, how.limit)?;
    let found = keys
        .iter()
        .zip(metas)
        .map(|(k, m)| prepare(how.ids, k, m, !how.routed.iter().any(|p| p.matches(k))))
        .collect();
    Ok((found, scanned))
}
