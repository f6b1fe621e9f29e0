//! The discovery thread: the Redis side of discovery and of monitor mode, on a connection of
//! its own, so that neither a keyspace walk nor a slow XINFO ever holds up a read or a write.
//!
//! A discovery job finds the streams (the configured ones, and those matching the patterns:
//! from the stream keys the last key-value pass saw when the main thread supplies them, or by
//! its own walk, `SCAN ... TYPE stream COUNT 10000` of the databases that hold keys), creates
//! the consumer groups of streams not known to have one, reads every stream's XINFO figures,
//! and claims entries that dead consumers left pending. A monitor job reads the figures only.
//! The thread takes its round trips from the discovery lane's share of the rate limit, has
//! every signal blocked, and never calls Postgres.

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use crate::error::{Result, SyncError};
use crate::gucs::{Mode, Settings};
use crate::parse::{redis_globs, Pattern};
use crate::pg::WakeHandle;
use crate::ratelimit::Lane;
use crate::redis::{Redis, SharedBudget, StreamInfo};

/// SCAN page size of a discovery walk: the server does the same work whatever the page
/// size, and a tenth of the round trips of `COUNT 1000`.
const SCAN_COUNT: u32 = 10_000;

/// A routed stream's pending list is read whole only when it is shorter than this (longer
/// ones keep their landing records until it is).
const PENDING_LIST_MAX: usize = 10_000;

pub enum Job {
    Discover {
        settings: Box<Settings>,
        /// Stream keys seen by a recent complete key-value pass: no walk of our own.
        supplied: Option<Vec<(u8, Vec<u8>)>>,
        /// Streams whose consumer group is known to exist: no XGROUP CREATE for them.
        has_group: HashSet<(u8, Vec<u8>)>,
        /// Streams that go to a route: the IDs pending in the group (any consumer's) are
        /// read, so that landing records of entries no longer pending can go.
        routed: HashSet<(u8, Vec<u8>)>,
        scope: u64,
    },
    Monitor {
        settings: Box<Settings>,
        streams: Vec<(u8, Vec<u8>)>,
        scope: u64,
    },
}

/// What became of a found stream's consumer group.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupState {
    /// It exists (or was just created).
    Ready,
    /// Missing, and `auto_create_consumer_groups` is off.
    Missing,
    /// Creating it failed: the error.
    Failed(SyncError),
}

pub struct Found {
    pub db: u8,
    pub key: Vec<u8>,
    pub configured: bool,
    /// `None` in monitor mode (groups are not touched).
    pub group: Option<GroupState>,
    pub info: Option<StreamInfo>,
    /// Entries claimed from consumers idle past `claim_min_idle`, or why claiming failed.
    pub claimed: std::result::Result<usize, String>,
    /// Pending entries Redis found deleted from the stream while claiming.
    pub lost: usize,
    /// A routed stream: the IDs pending in the group (after claiming), when known.
    pub pending: Option<Vec<String>>,
}

pub struct Discovered {
    pub found: Vec<Found>,
    /// Databases of the search range the server does not have (when it says so).
    pub missing_dbs: Vec<u8>,
}

pub enum Report {
    /// The thread connected (or connected again) to Redis; its job's report follows.
    Connected,
    Discovered(Discovered),
    Monitored(Vec<(u8, Vec<u8>, Option<StreamInfo>)>),
    Failed(SyncError),
}

/// The main thread's handle on the discovery thread.
pub struct Discoverer {
    jobs: SyncSender<Job>,
    reports: Receiver<(u64, Report)>,
    busy: bool,
}

impl Discoverer {
    pub fn start(budget: SharedBudget, wake: WakeHandle) -> Result<Discoverer> {
        let (job_tx, job_rx) = sync_channel::<Job>(1);
        let (rep_tx, rep_rx) = sync_channel::<(u64, Report)>(1);
        crate::worker::spawn_helper("redis_pg_sync discovery", move || {
            serve(job_rx, rep_tx, budget, wake)
        })
        .map_err(|e| SyncError::Config(format!("cannot start the discovery thread: {e}")))?;
        Ok(Discoverer { jobs: job_tx, reports: rep_rx, busy: false })
    }

    /// Is a job under way?
    pub fn busy(&self) -> bool {
        self.busy
    }

    pub fn send(&mut self, job: Job) -> Result<()> {
        self.jobs.send(job).map_err(|_| SyncError::ThreadStopped("discovery"))?;
        self.busy = true;
        Ok(())
    }

    /// The next report of the job under way, with the scope it was made for, if one has
    /// come.
    pub fn try_receive(&mut self) -> Result<Option<(u64, Report)>> {
        match self.reports.try_recv() {
            Ok(r) => {
                if !matches!(r.1, Report::Connected) {
                    self.busy = false;
                }
                Ok(Some(r))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => {
                self.busy = false;
                Err(SyncError::ThreadStopped("discovery"))
            }
        }
    }
}

fn serve(
    jobs: Receiver<Job>,
    reports: SyncSender<(u64, Report)>,
    budget: SharedBudget,
    wake: WakeHandle,
) {
    let mut redis: Option<Redis> = None;
    let send = |scope: u64, report: Report| {
        let ok = reports.send((scope, report)).is_ok();
        wake.wake();
        ok
    };
    for job in jobs {
        let (settings, scope) = match &job {
            Job::Discover { settings, scope, .. } | Job::Monitor { settings, scope, .. } => {
                (settings.redis.clone(), *scope)
            }
        };
        if redis.as_ref().is_none_or(|r| *r.settings() != settings) {
            redis = None;
            match Redis::connect(&settings, budget.clone(), Lane::Discovery) {
                Ok(r) => {
                    redis = Some(r);
                    // Said at once: the main thread need not wait for a keyspace walk to
                    // know that Redis is there.
                    if !send(scope, Report::Connected) {
                        return;
                    }
                }
                Err(e) => {
                    if !send(scope, Report::Failed(e)) {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(r) = redis.as_mut() else { continue };
        let outcome = match job {
            Job::Discover { settings, supplied, has_group, routed, .. } => {
                discover(r, &settings, supplied, &has_group, &routed).map(Report::Discovered)
            }
            Job::Monitor { settings, streams, .. } => monitor(r, &settings, streams),
        };
        let report = outcome.unwrap_or_else(|e| {
            if e.connection_lost() {
                redis = None;
            }
            Report::Failed(e)
        });
        if !send(scope, report) {
            return;
        }
    }
}

fn discover(
    redis: &mut Redis,
    s: &Settings,
    supplied: Option<Vec<(u8, Vec<u8>)>>,
    has_group: &HashSet<(u8, Vec<u8>)>,
    routed: &HashSet<(u8, Vec<u8>)>,
) -> Result<Discovered> {
    let dbs = redis.databases()?;
    let mut candidates: Vec<(u8, Vec<u8>, bool)> =
        s.streams.iter().map(|name| (s.redis.db, name.as_bytes().to_vec(), true)).collect();
    if s.stream_auto_discovery && !s.stream_discovery_patterns.is_empty() {
        let patterns: Vec<Pattern> =
            s.stream_discovery_patterns.iter().map(|p| Pattern::new(p)).collect();
        let keys = match supplied {
            Some(keys) => keys,
            None => {
                let globs = redis_globs(&patterns);
                redis.scan_streams(&dbs.to_scan(&s.db_search_range), &globs, SCAN_COUNT)?
            }
        };
        // Confirmed client-side: fnmatch semantics are the contract.
        for (db, key) in keys {
            if s.db_search_range.contains(&db) && patterns.iter().any(|p| p.matches(&key)) {
                candidates.push((db, key, false));
            }
        }
    }
    // One entry per stream; configured by name wins. Only this worker's streams (with
    // several stream workers, each stream belongs to one).
    let mut unique: BTreeMap<(u8, Vec<u8>), bool> = BTreeMap::new();
    for (db, key, configured) in candidates {
        if super::owner(db, &key, s.workers) != s.stream_worker {
            continue;
        }
        *unique.entry((db, key)).or_insert(false) |= configured;
    }
    let mut found: Vec<Found> = unique
        .into_iter()
        .map(|((db, key), configured)| Found {
            db,
            key,
            configured,
            group: None,
            info: None,
            claimed: Ok(0),
            lost: 0,
            pending: None,
        })
        .collect();
    if s.mode == Mode::Sync {
        for f in &mut found {
            if has_group.contains(&(f.db, f.key.clone())) {
                f.group = Some(GroupState::Ready);
                continue;
            }
            let state = ensure_group(redis, f, s);
            if let GroupState::Failed(e) = &state {
                if e.connection_lost() {
                    return Err(e.clone());
                }
            }
            f.group = Some(state);
        }
    }
    refresh_info(redis, s, &mut found)?;
    if s.mode == Mode::Sync {
        claim(redis, s, &mut found)?;
        for f in found.iter_mut().filter(|f| routed.contains(&(f.db, f.key.clone()))) {
            f.pending = match redis.pending_ids(f.db, &f.key, &s.consumer_group, PENDING_LIST_MAX) {
                Ok(ids) => ids,
                Err(e) if e.connection_lost() => return Err(e),
                Err(_) => None,
            };
        }
    }
    Ok(Discovered { found, missing_dbs: dbs.missing(&s.db_search_range) })
}

/// Creates the consumer group of a stream when missing (and allowed to).
fn ensure_group(redis: &mut Redis, f: &Found, s: &Settings) -> GroupState {
    if s.auto_create_consumer_groups {
        match redis.create_group(f.db, &f.key, &s.consumer_group, f.configured) {
            Ok(_) => GroupState::Ready,
            Err(e) => GroupState::Failed(e),
        }
    } else {
        match redis.stream_info(f.db, &s.consumer_group, &[&f.key]) {
            Ok(info) => {
                let exists = info.first().and_then(|i| i.as_ref()).is_some_and(|i| i.group_exists);
                if exists {
                    GroupState::Ready
                } else {
                    GroupState::Missing
                }
            }
            Err(e) => GroupState::Failed(e),
        }
    }
}

/// Length, first/last IDs, pending, lag and consumers of every stream: one pipelined round
/// trip per database.
fn refresh_info(redis: &mut Redis, s: &Settings, found: &mut [Found]) -> Result<()> {
    let mut by_db: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
    for (i, f) in found.iter().enumerate() {
        by_db.entry(f.db).or_default().push(i);
    }
    for (db, idx) in by_db {
        let keys: Vec<&[u8]> = idx.iter().map(|&i| found[i].key.as_slice()).collect();
        let infos = redis.stream_info(db, &s.consumer_group, &keys)?;
        for (&i, info) in idx.iter().zip(infos) {
            found[i].info = info;
        }
    }
    Ok(())
}

/// How long the worker's former consumer name must have been idle before its pending
/// entries are taken over: a worker still reading as it (one not yet upgraded, say) touches
/// it at every read, at least every few seconds.
const FORMER_IDLE: Duration = Duration::from_secs(10);

/// Claims entries other consumers left pending longer than `claim_min_idle`; they join our
/// pending list and are read from there.
///
/// The entries pending for the worker's former consumer name (the old default, when the
/// name is now derived) are its own: they move to the current name at once, whatever
/// their idle time, and the former name leaves the group.
fn claim(redis: &mut Redis, s: &Settings, found: &mut [Found]) -> Result<()> {
    for f in found {
        // The former name is a second consumer of the group; one that no worker has used
        // for a while (a live one reads at least every poll) is taken over.
        let former = s.former_consumer.as_deref().filter(|f| *f != s.consumer_name);
        // (Before the worker's first read its own name is not in the group yet.)
        let maybe = f.info.as_ref().is_some_and(|i| i.consumers >= 2 || i.pending > 0);
        if let (Some(former), true, true) = (former, maybe, f.group == Some(GroupState::Ready)) {
            let moved = redis.take_over_consumer(
                f.db,
                &f.key,
                &s.consumer_group,
                former,
                &s.consumer_name,
                FORMER_IDLE,
                s.batch_size.max(100),
            );
            match moved {
                Ok((n, deleted)) => {
                    f.claimed = Ok(n);
                    f.lost = deleted;
                }
                Err(e) if e.connection_lost() => return Err(e),
                Err(e) => f.claimed = Err(e.to_string()),
            }
        }
        let busy = f.info.as_ref().is_some_and(|i| i.pending > 0 && i.consumers >= 2);
        if f.group != Some(GroupState::Ready) || !busy {
            continue;
        }
        let n = redis.claim_idle(
            f.db,
            &f.key,
            &s.consumer_group,
            &s.consumer_name,
            s.claim_min_idle,
            s.batch_size,
        );
        f.claimed = match (n, &f.claimed) {
            (Ok(_), Err(e)) => Err(e.clone()),
            (Ok((n, deleted)), Ok(before)) => {
                f.lost += deleted;
                Ok(n + before)
            }
            (Err(e), _) if e.connection_lost() => return Err(e),
            (Err(e), _) => Err(e.to_string()),
        };
    }
    Ok(())
}

fn monitor(redis: &mut Redis, s: &Settings, streams: Vec<(u8, Vec<u8>)>) -> Result<Report> {
    let mut by_db: BTreeMap<u8, Vec<Vec<u8>>> = BTreeMap::new();
    for (db, key) in streams {
        by_db.entry(db).or_default().push(key);
    }
    let mut out = Vec::new();
    for (db, keys) in by_db {
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let infos = redis.stream_health(db, &s.consumer_group, &refs, Some(&s.consumer_name))?;
        for (key, info) in keys.into_iter().zip(infos) {
            out.push((db, key, info));
        }
    }
    Ok(Report::Monitored(out))
}
