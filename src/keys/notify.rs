//! Keyspace notifications: when Redis publishes them (`notify-keyspace-events` with `K` and
//! the event classes), a thread subscribed to `__keyspace@<db>__:*` collects the changed keys
//! that are in scope, fetches their types, expiries and values on a second connection, and
//! hands them to the main thread, which writes them at once. The scan pass stays the safety
//! net for anything missed (a notification is fire-and-forget; a full queue drops events,
//! and then a pass runs at once).
//!
//! The thread takes its fetches from the key-value lane's share of the rate limit, has
//! every signal blocked and never calls Postgres.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::memory::KeyIds;
use super::rows::Found;
use super::scanner::fetch;
use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::parse::Pattern;
use crate::pg::WakeHandle;
use crate::ratelimit::Lane;
use crate::redis::{open_connection, ClusterLink, Redis, SharedBudget};

/// Batches of changed keys waiting for the main thread, at most.
const QUEUE: usize = 64;
/// Changed keys fetched together, at most.
const BATCH: usize = 1000;

/// Do these `notify-keyspace-events` flags publish key changes on the keyspace channel?
pub fn flags_cover_changes(flags: &str) -> bool {
    let has = |c| flags.contains(c);
    has('K') && (has('A') || (has('$') && has('g')))
}

/// `__keyspace@3__:some:key` -> (3, b"some:key").
pub fn parse_channel(channel: &[u8]) -> Option<(u8, Vec<u8>)> {
    let rest = channel.strip_prefix(b"__keyspace@")?;
    let at = rest.iter().position(|&b| b == b'_')?;
    let db: u8 = std::str::from_utf8(&rest[..at]).ok()?.parse().ok()?;
    let key = rest[at..].strip_prefix(b"__:")?;
    Some((db, key.to_vec()))
}

/// Keys of one database that changed, with what Redis says of them now.
pub struct Changed {
    pub db: u8,
    pub keys: Vec<Vec<u8>>,
    pub found: Vec<Found>,
    pub fetched_at: Instant,
}

/// What the thread listens for: changes it follows are of these databases and patterns.
#[derive(Clone, PartialEq, Debug)]
pub struct Scope {
    pub settings: RedisSettings,
    pub dbs: Vec<u8>,
    pub patterns: Vec<String>,
    /// The largest value fetched, in bytes.
    pub limit: u64,
}

pub struct Notifier {
    changes: Receiver<Changed>,
    stop: Arc<AtomicBool>,
    /// Set by the thread when changes were missed (it just subscribed, or the queue was
    /// full): the worker runs a pass at once.
    pub overflowed: Arc<AtomicBool>,
    pub scope: Scope,
}

impl Notifier {
    pub fn start(
        scope: Scope,
        budget: SharedBudget,
        wake: WakeHandle,
        ids: Arc<KeyIds>,
    ) -> Result<Notifier> {
        let (tx, rx) = sync_channel(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let overflowed = Arc::new(AtomicBool::new(false));
        let (sc, st, ov) = (scope.clone(), stop.clone(), overflowed.clone());
        let to = Listener { tx, stop: st, overflowed: ov, budget, wake, ids };
        crate::worker::spawn_helper("redis_pg_sync notifications", move || {
            if sc.settings.cluster {
                follow_cluster(sc, to)
            } else {
                let subscribe = sc.settings.clone();
                listen(sc, subscribe, to, None)
            }
        })
        .map_err(|e| SyncError::Config(format!("cannot start the notification thread: {e}")))?;
        Ok(Notifier { changes: rx, stop, overflowed, scope })
    }

    /// The next batch of changed keys, if one has come.
    pub fn try_next(&mut self) -> Result<Option<Changed>> {
        match self.changes.try_recv() {
            Ok(c) => Ok(Some(c)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(SyncError::ThreadStopped("notification")),
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a listening thread hands its changes to, and when it stops.
struct Listener {
    tx: SyncSender<Changed>,
    stop: Arc<AtomicBool>,
    overflowed: Arc<AtomicBool>,
    budget: SharedBudget,
    wake: WakeHandle,
    ids: Arc<KeyIds>,
}

/// How often the cluster's primaries are looked at again: a failover or a new primary
/// means subscribing again (notifications are published by the node where the key lives).
const TOPOLOGY_CHECK: Duration = Duration::from_secs(2);
/// The longest the catch-up pass waits for every primary's subscription.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// A Redis Cluster: a listening thread per primary (each subscribed on its own node, the
/// changed keys fetched through the cluster), all of them made again when the primaries
/// change.
fn follow_cluster(scope: Scope, to: Listener) {
    let mut link: Option<ClusterLink> = None;
    let mut delay = Duration::from_millis(100);
    let mut current: Vec<(String, u16)> = Vec::new();
    let mut generation = Arc::new(AtomicBool::new(false));
    // The nodes of the current generation subscribed so far; once all are, one pass.
    let mut subscribed = Arc::new(AtomicUsize::new(0));
    let mut caught_up = true;
    let mut since = Instant::now();
    while !to.stop.load(Ordering::Relaxed) {
        let primaries = match link.as_mut() {
            Some(l) => l.refresh().map(|_| l.topology().primaries().to_vec()),
            None => ClusterLink::connect(&scope.settings, 0).map(|l| {
                let p = l.topology().primaries().to_vec();
                link = Some(l);
                p
            }),
        };
        let Ok(primaries) = primaries else {
            link = None;
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(10));
            continue;
        };
        delay = Duration::from_millis(100);
        if primaries != current {
            generation.store(true, Ordering::Relaxed);
            generation = Arc::new(AtomicBool::new(false));
            subscribed = Arc::new(AtomicUsize::new(0));
            caught_up = false;
            since = Instant::now();
            for (host, port) in &primaries {
                let subscribe = RedisSettings {
                    host: host.clone(),
                    port: *port,
                    db: 0,
                    cluster: false,
                    ..scope.settings.clone()
                };
                let Ok(wake) = to.wake.try_clone() else {
                    to.overflowed.store(true, Ordering::Relaxed);
                    continue;
                };
                let node = Listener {
                    tx: to.tx.clone(),
                    stop: generation.clone(),
                    overflowed: to.overflowed.clone(),
                    budget: to.budget.clone(),
                    wake,
                    ids: to.ids.clone(),
                };
                let sc = scope.clone();
                let count = subscribed.clone();
                let started =
                    crate::worker::spawn_helper("redis_pg_sync notifications", move || {
                        listen(sc, subscribe, node, Some(count))
                    });
                if started.is_err() {
                    // Not all primaries are followed: passes keep finding the changes.
                    to.overflowed.store(true, Ordering::Relaxed);
                }
            }
            current = primaries;
        }
        // Sleep in short steps, so a stop is seen soon.
        let until = Instant::now() + TOPOLOGY_CHECK;
        while Instant::now() < until && !to.stop.load(Ordering::Relaxed) {
            let all = subscribed.load(Ordering::Relaxed) >= current.len();
            if !caught_up && (all || since.elapsed() >= CATCH_UP_WAIT) {
                // Every primary heard from now on (or some will not be soon, a node down or
                // refusing PSUBSCRIBE): a pass finds what changed before.
                caught_up = true;
                to.overflowed.store(true, Ordering::Relaxed);
                to.wake.wake();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    generation.store(true, Ordering::Relaxed);
}

/// Subscribes on the server of `subscribe` and hands the changed keys over, fetched
/// through `scope.settings` (the cluster, for a cluster's node).
///
/// `first` counts the first subscription of a cluster's nodes (instead of a pass asked for
/// at each).
fn listen(
    scope: Scope,
    subscribe: RedisSettings,
    to: Listener,
    mut first: Option<Arc<AtomicUsize>>,
) {
    let Listener { tx, stop, overflowed, budget, wake, ids } = to;
    let patterns: Vec<Pattern> = scope.patterns.iter().map(|p| Pattern::new(p)).collect();
    let settings = &subscribe;
    let mut fetcher: Option<Redis> = None;
    let mut delay = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = open_connection(settings, settings.db) else {
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(10));
            continue;
        };
        let mut pubsub = conn.as_pubsub();
        let subscribed =
            scope.dbs.iter().all(|db| pubsub.psubscribe(format!("__keyspace@{db}__:*")).is_ok());
        if !subscribed {
            std::thread::sleep(delay);
            continue;
        }
        delay = Duration::from_millis(100);
        match first.take() {
            // A cluster's node subscribed for the first time: one pass runs once every
            // primary has (see `follow_cluster`).
            Some(count) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            // Anything changed while we were not subscribed: the worker runs a pass now.
            None => {
                overflowed.store(true, Ordering::Relaxed);
                wake.wake();
            }
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // Wait for a change; then take whatever else is already there, up to a batch.
            let mut batch: BTreeSet<(u8, Vec<u8>)> = BTreeSet::new();
            let mut timeout = Duration::from_millis(500);
            let mut broken = false;
            while batch.len() < BATCH {
                if pubsub.set_read_timeout(Some(timeout)).is_err() {
                    broken = true;
                    break;
                }
                match pubsub.get_message() {
                    Ok(msg) => {
                        let event =
                            msg.get_channel::<Vec<u8>>().ok().and_then(|c| parse_channel(&c));
                        if let Some((db, key)) = event {
                            if scope.dbs.contains(&db) && patterns.iter().any(|p| p.matches(&key)) {
                                batch.insert((db, key));
                            }
                        }
                        timeout = Duration::from_millis(1);
                    }
                    Err(e) if e.is_timeout() => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                let to = Handover { scope: &scope, budget: &budget, ids: &ids, tx: &tx };
                if !hand_over(batch, &mut fetcher, &to, &overflowed) {
                    return;
                }
                wake.wake();
            }
            if broken {
                break;
            }
        }
    }
}

/// Where fetched changes go, and how they are fetched.
struct Handover<'a> {
    scope: &'a Scope,
    budget: &'a SharedBudget,
    ids: &'a KeyIds,
    tx: &'a SyncSender<Changed>,
}

/// Fetches the batch's keys (per database) and queues them for the main thread. Returns
/// false when the main thread is gone.
fn hand_over(
    batch: BTreeSet<(u8, Vec<u8>)>,
    fetcher: &mut Option<Redis>,
    to: &Handover<'_>,
    overflowed: &AtomicBool,
) -> bool {
    let Handover { scope, budget, ids, tx } = *to;
    let mut by_db: Vec<(u8, Vec<Vec<u8>>)> = Vec::new();
    for (db, key) in batch {
        match by_db.last_mut() {
            Some((d, keys)) if *d == db => keys.push(key),
            _ => by_db.push((db, vec![key])),
        }
    }
    for (db, keys) in by_db {
        if fetcher.is_none() {
            *fetcher = Redis::connect(&scope.settings, budget.clone(), Lane::KeyValues).ok();
        }
        let Some(redis) = fetcher.as_mut() else {
            // Redis is not there now: what changed is found by the next pass.
            overflowed.store(true, Ordering::Relaxed);
            continue;
        };
        let fetched_at = Instant::now();
        let found = match fetch(redis, ids, db, &keys, scope.limit) {
            Ok(f) => f,
            Err(_) => {
                *fetcher = None;
                overflowed.store(true, Ordering::Relaxed);
                continue;
            }
        };
        match tx.try_send(Changed { db, keys, found, fetched_at }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => overflowed.store(true, Ordering::Relaxed),
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels() {
        assert_eq!(parse_channel(b"__keyspace@0__:user:1"), Some((0, b"user:1".to_vec())));
        assert_eq!(parse_channel(b"__keyspace@12__:a__:b"), Some((12, b"a__:b".to_vec())));
        assert_eq!(parse_channel(b"__keyspace@12__:\xff"), Some((12, vec![0xff])));
        assert_eq!(parse_channel(b"__keyevent@0__:set"), None);
    }

    #[test]
    fn flags() {
        assert!(flags_cover_changes("KA"));
        assert!(flags_cover_changes("AKE"));
        assert!(flags_cover_changes("Kg$lshzxe"));
        assert!(!flags_cover_changes("EA"));
        assert!(!flags_cover_changes(""));
        assert!(!flags_cover_changes("Kx"));
    }
}
