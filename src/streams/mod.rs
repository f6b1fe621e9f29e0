//! Stream sync: which streams (configured and discovered), their consumer groups, reading
//! through `XREADGROUP` (own pending entries first, then new ones), writing each batch in one
//! transaction and acknowledging only after the commit.
//!
//! - `discovery`: finding streams, creating groups, XINFO figures, claiming idle entries
//! - `round`: one read-write-acknowledge round, and the pure bookkeeping it rests on
//! - `reader`: the reader thread (XREADGROUP and row building; never calls Postgres)
//! - `monitor`: monitor mode (look, do not touch)
//! - `writer`: the stream-table writer (COPY, INSERT fallback, dead letters)

mod acks;
mod discoverer;
mod discovery;
mod monitor;
mod reader;
mod replay;
mod round;
pub(crate) mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::encode::encode_name;
use crate::routes::{Destination, Route, RouteSet};
use crate::shmem::{self, StreamState};

pub use discoverer::Discoverer;
pub use discovery::{DiscoveryCtx, DiscoveryTurn, Learned};
pub use replay::replay;
pub use round::Feed;
pub use writer::{route_insert_sql, Writers};

use reader::Reader;

use monitor::Trend;
use reader::Acks;

/// Where a stream's next read starts.
#[derive(Debug, Clone, PartialEq)]
enum Cursor {
    /// Re-reading our own pending entries after this ID (`0` = from the start).
    Pending(String),
    /// Reading new entries (`>`).
    New,
}

#[derive(Debug)]
struct Tracked {
    db: u8,
    key: Vec<u8>,
    /// As stored in the table: encoded, with `db{N}:` when not in the default database.
    stream_key: String,
    configured: bool,
    cursor: Cursor,
    state: StreamState,
    messages_synced: i64,
    last_id: String,
    last_error: String,
    last_sync_time: i64,
    /// Group pending count and consumers from the last XINFO, to decide on claiming.
    group_pending: i64,
    group_consumers: i64,
    /// Monitor mode: what the previous checks saw, to tell a trend.
    trend: Trend,
    /// Left out of reads (another type now, or its group cannot be made): discovery looks
    /// again.
    unreadable: bool,
    /// Entries deleted from the stream (XADD MAXLEN, XTRIM, XDEL) while they were pending,
    /// so never stored.
    entries_lost: i64,
    /// Its pending list holds entries a write refused while nothing showed that the table
    /// takes rows: they wait in Redis (not in dead letters) for proof.
    refused: bool,
    /// The refused entries were re-read from the pending list and refused again: new
    /// entries are read next, to learn whether the table takes any row.
    wait_for_new: bool,
    /// Rows of this stream landed since its entries were refused: a refusal of those now is
    /// theirs, not the table's, and they go to dead letters.
    proven: bool,
    /// The last read of it was a re-read of its pending list.
    read_pending: bool,
    /// Entries of it wait in its pending list (refused, or held back for lack of room in
    /// the dead-letter table): the list is read again at `retry_at`.
    retry_due: bool,
    retry_at: Option<std::time::Instant>,
    /// Refused entries of it were held back for lack of room in the dead-letter table: the
    /// table took other rows with them, so their refusal is their own (proof that lasts
    /// until a re-read of the pending list lands with nothing held).
    held_back: bool,
    /// Entries were held back during the walk of the pending list under way.
    held_in_walk: bool,
    /// The route its entries go to (`None`: the stream table).
    route: Option<Arc<Route>>,
    /// Left out of reads because of its route: the route is broken (until the routes
    /// change), or its target refused a write (until the time given; then its pending
    /// list is read again).
    held: Option<(String, Option<Instant>)>,
}

impl Tracked {
    fn new(db: u8, key: Vec<u8>, stream_key: String, configured: bool) -> Tracked {
        Tracked {
            db,
            key,
            stream_key,
            configured,
            cursor: Cursor::Pending("0".into()),
            state: StreamState::Active,
            messages_synced: 0,
            last_id: String::new(),
            last_error: String::new(),
            last_sync_time: 0,
            group_pending: 0,
            group_consumers: 0,
            trend: Trend::default(),
            unreadable: false,
            entries_lost: 0,
            refused: false,
            wait_for_new: false,
            proven: false,
            read_pending: false,
            retry_due: false,
            retry_at: None,
            held_back: false,
            held_in_walk: false,
            route: None,
            held: None,
        }
    }

    /// Leaves the stream out of reads because of its route (see `held`); said once in the
    /// log.
    fn hold(&mut self, error: String, until: Option<Instant>, log: &crate::worker::Log) {
        self.state = StreamState::Error;
        self.cursor = Cursor::Pending("0".into());
        if self.last_error != error {
            log.warning(&format!("stream \"{}\": {error}", self.stream_key));
            shmem::bump(|c| &c.errors, 1);
            self.last_error = error.clone();
        }
        self.held = Some((error, until));
    }

    /// Counts entries found deleted while pending: logged the first time for the stream,
    /// counted in `entries_lost` always.
    fn note_lost(&mut self, n: usize, log: &crate::worker::Log) {
        if n == 0 {
            return;
        }
        if self.entries_lost == 0 {
            log.warning(&format!(
                "stream \"{}\": {n} entries were deleted from the stream (XADD MAXLEN, XTRIM or XDEL) while they were pending, so they cannot be stored; redis_sync_streams().entries_lost counts them",
                self.stream_key
            ));
        }
        self.entries_lost += n as i64;
        shmem::bump(|c| &c.entries_lost, n as u64);
    }

    /// Is the stream read (its group exists, and it is a stream)?
    fn readable(&self) -> bool {
        self.state != StreamState::NoGroup && !self.unreadable && self.held.is_none()
    }

    /// Leaves the stream out of reads with `error` (state `error`); said once in the log and
    /// counted in `errors`, not again while the error stays the same.
    fn mark_unreadable(&mut self, error: String, log: &crate::worker::Log) {
        self.state = StreamState::Error;
        self.unreadable = true;
        self.cursor = Cursor::New;
        if self.last_error != error {
            log.warning(&format!("stream \"{}\": {error}", self.stream_key));
            shmem::bump(|c| &c.errors, 1);
            self.last_error = error;
        }
    }
}

/// Routes are loaded again at least this often, whether or not the generation moved (a
/// change the trigger did not see: a restore with triggers off, a target altered).
const ROUTES_RELOAD: std::time::Duration = std::time::Duration::from_secs(10);
/// While they cannot be read, they are tried this often.
const ROUTES_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

pub struct StreamSync {
    streams: Vec<Tracked>,
    index: HashMap<(u8, Vec<u8>), usize>,
    next_discovery: Instant,
    discovery_gen: u64,
    /// Round-robin start per database, so every stream gets its turn when not all fit in
    /// one read.
    rr: BTreeMap<u8, usize>,
    /// A reader thread per idle database in use, whose reads wait in Redis.
    readers: BTreeMap<u8, Reader>,
    /// The reader of the busy databases: one round trip reads them all, without waiting.
    combined: Option<Reader>,
    /// Databases whose last read found entries, or whose streams re-read pending ones.
    busy: std::collections::BTreeSet<u8>,
    /// Replies to reads made before the last failure, pause or change of scope are dropped
    /// unread (their entries stay in our pending list and are read again from there).
    epoch: u64,
    /// Entries whose rows are committed and flushed but not yet acknowledged, by database:
    /// they ride along with the next read of that database (one round trip for both).
    unacked: BTreeMap<u8, Acks>,
    /// Entries whose rows are committed, but maybe not yet flushed to disk, oldest first:
    /// where the commit ends in the WAL, when it committed, and the acknowledgements by
    /// database. They move to `unacked` once the WAL is flushed that far.
    awaiting: std::collections::VecDeque<(u64, Instant, BTreeMap<u8, Acks>)>,
    /// How far the WAL was flushed when last looked at (and with `ack_after = standby`, the
    /// standbys too): acknowledgements may go up to here.
    flushed: u64,
    /// Entries in `awaiting`.
    awaiting_entries: usize,
    /// The standbys' flush position, with `ack_after = standby`.
    standby: acks::StandbyWait,
    /// Reads stopped (acknowledgements still go) while `awaiting` holds too many entries.
    reads_paused: bool,
    /// How long the loop may sleep while entries wait for their acknowledgement.
    ack_poll: std::time::Duration,
    /// The wait last shown in shared memory: entries and when the oldest committed.
    shown_wait: (usize, Option<Instant>),
    /// When the shared read of the busy databases last found entries.
    shared_found_at: Option<Instant>,
    /// The stream routes, as last loaded, and the generation they were loaded at.
    routes: RouteSet,
    routes_gen: Option<u64>,
    routes_loaded: Option<Instant>,
    /// The last landing record written before the discovery under way read the pending
    /// lists (`None`: no routed stream, or not known).
    records_floor: Option<i64>,
    /// Moving average of an entry's size in bytes, for the read budget.
    avg_entry_bytes: usize,
    group: String,
    /// The last "Searching Redis databases ..." line logged (logged again when it changes).
    last_search: String,
    /// Monitor mode: when the next health check is due.
    next_monitor: Instant,
    /// The discovery thread, started on first use.
    discoverer: Option<Discoverer>,
    /// Bumped when what is tracked is cleared: a discovery made for an older scope is
    /// dropped.
    scope: u64,
    /// `redis_sync_discover()` requests answered by the last discovery, and those the one
    /// under way will answer.
    discover_served: u64,
    serving: u64,
    /// Whether `last_search` was logged.
    search_logged: bool,
    /// When the last discovery job was sent.
    discovery_started: Option<Instant>,
    /// This stream worker's part of the stream slots in shared memory.
    slots: std::ops::Range<usize>,
}

/// Which of `workers` stream workers reads stream `key` of database `db`: a stable hash
/// (FNV-1a), the same in every process and after every restart, so a stream always
/// belongs to one worker and its entries land in order.
pub fn owner(db: u8, key: &[u8], workers: u8) -> u8 {
    if workers <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(db).chain(key.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(workers)) as u8
}

/// The name a stream is stored under.
pub fn stream_key_name(db: u8, default_db: u8, key: &[u8]) -> String {
    if db == default_db {
        encode_name(key)
    } else {
        format!("db{db}:{}", encode_name(key))
    }
}

impl StreamSync {
    pub fn new(now: Instant) -> StreamSync {
        StreamSync {
            streams: Vec::new(),
            index: HashMap::new(),
            next_discovery: now,
            discovery_gen: 0,
            rr: BTreeMap::new(),
            readers: BTreeMap::new(),
            combined: None,
            busy: std::collections::BTreeSet::new(),
            epoch: 0,
            unacked: BTreeMap::new(),
            awaiting: std::collections::VecDeque::new(),
            flushed: 0,
            awaiting_entries: 0,
            standby: acks::StandbyWait::default(),
            reads_paused: false,
            ack_poll: acks::STANDBY_POLL,
            shown_wait: (0, None),
            shared_found_at: None,
            routes: RouteSet::default(),
            routes_gen: None,
            routes_loaded: None,
            records_floor: None,
            avg_entry_bytes: 1024,
            group: String::new(),
            last_search: String::new(),
            next_monitor: now,
            discoverer: None,
            scope: 0,
            discover_served: 0,
            serving: 0,
            search_logged: false,
            discovery_started: None,
            slots: shmem::stream_slots(
                crate::gucs::stream_worker(),
                crate::gucs::WORKERS.get().clamp(1, crate::gucs::MAX_STREAM_WORKERS as i32) as u8,
            ),
        }
    }

    /// Takes up where the last worker left `redis_sync_discover()` requests: those it did
    /// not answer are answered by this one's first discovery.
    pub fn requests_answered_before(&mut self, answered: u64) {
        self.discover_served = answered;
    }

    pub fn tracked(&self) -> usize {
        self.streams.len()
    }

    /// After a reconnect or a failed round: our pending entries come first again.
    pub fn restart_from_pending(&mut self) {
        for s in &mut self.streams {
            s.held_in_walk = false;
            // A stream whose pending entries were refused again goes on with new entries:
            // the next row that lands proves the table writable (see `land`); its pending
            // list is read again on its own timer. A stream left out of reads has no cursor
            // to go back to.
            s.cursor = if (s.refused && s.wait_for_new) || !s.readable() {
                Cursor::New
            } else {
                Cursor::Pending("0".into())
            };
        }
        self.busy = self.streams.iter().map(|t| t.db).collect();
    }

    /// Drops whatever reads are under way (their replies are not landed) and makes every
    /// stream read its pending entries first when reads start again: after a failure, a
    /// pause, a mode change.
    pub fn drop_reads(&mut self) {
        self.epoch += 1;
        self.restart_from_pending();
    }

    /// As [`StreamSync::drop_reads`], and reads blocked in Redis are ended at once (so that
    /// none goes on taking entries into our pending list while paused or monitoring).
    pub fn stop_reads(&mut self, settings: &crate::gucs::RedisSettings) {
        self.drop_reads();
        let ids = self
            .readers
            .values()
            .chain(self.combined.iter())
            .filter_map(Reader::blocked_client)
            .collect();
        reader::unblock(settings, ids);
    }

    /// Forgets the tracked streams (their scope changed) and makes discovery due now.
    /// Acknowledgements of committed entries are kept and still sent, unless `other_server`
    /// (the Redis server itself changed): then the readers and what they owed go too.
    pub fn clear(&mut self, now: Instant, old: &crate::gucs::RedisSettings, other_server: bool) {
        self.stop_reads(old);
        self.scope += 1;
        self.streams.clear();
        self.index.clear();
        if other_server {
            self.unacked.clear();
            self.awaiting.clear();
            self.awaiting_entries = 0;
            self.reads_paused = false;
            self.readers.clear();
            self.combined = None;
        }
        self.next_discovery = now;
        self.publish_all();
    }

    fn reindex(&mut self) {
        self.index =
            self.streams.iter().enumerate().map(|(i, t)| ((t.db, t.key.clone()), i)).collect();
    }

    /// Gives each tracked stream its route (or none: the stream table); a stream whose route
    /// is broken is held with the reason. Returns whether any stream's destination changed.
    fn assign_routes(&mut self, log: &crate::worker::Log) -> bool {
        let mut changed = false;
        for t in &mut self.streams {
            let (route, broken) = match self.routes.destination(&t.key) {
                Destination::Generic => (None, None),
                Destination::Route(r, _) => (Some(r), None),
                Destination::Broken(e) => (None, Some(e)),
            };
            let same_route = match (&t.route, &route) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || **a == **b,
                _ => false,
            };
            let was_broken = t.held.as_ref().is_some_and(|(_, until)| until.is_none());
            if !same_route || was_broken != broken.is_some() {
                changed = true;
            }
            t.route = route;
            match broken {
                Some(e) => t.hold(e, None, log),
                None if was_broken || !same_route => {
                    // Read again from its pending list, into its new destination.
                    t.held = None;
                    if t.state == StreamState::Error {
                        t.state = StreamState::Active;
                        t.last_error.clear();
                    }
                    t.cursor = Cursor::Pending("0".into());
                }
                None => {}
            }
        }
        changed
    }

    /// Loads the stream routes again when they changed (the generation in shared memory
    /// moved) or every few seconds, and gives the streams their routes. A change of where a
    /// stream goes drops the reads under way (their rows were made for the old
    /// destination): its pending entries are read again.
    pub fn follow_routes(
        &mut self,
        s: &crate::gucs::Settings,
        now: Instant,
        log: &crate::worker::Log,
    ) {
        let gen = shmem::routes_generation();
        // (Tried again sooner while they cannot be read.)
        let every = if self.routes.unreadable.is_some() { ROUTES_RETRY } else { ROUTES_RELOAD };
        let due = self.routes_loaded.is_none_or(|t| now.saturating_duration_since(t) >= every);
        if self.routes_gen == Some(gen) && !due {
            return;
        }
        self.routes_loaded = Some(now);
        match crate::routes::load(crate::routes::Kind::Stream, &s.role) {
            Ok(set) => {
                for b in &set.broken {
                    if !self.routes.broken.iter().any(|o| o.name == b.name && o.error == b.error) {
                        log.warning(&format!("route \"{}\" cannot run: {}", b.name, b.error));
                    }
                }
                self.routes = set;
                self.routes_gen = Some(gen);
                if self.assign_routes(log) {
                    // Reads waiting in Redis are ended now: one would otherwise take the
                    // next entry into our pending list for the old destination.
                    self.stop_reads(&s.redis);
                    self.publish_all();
                }
            }
            Err(e) => {
                let error = e.to_string();
                if self.routes.unreadable.as_deref() != Some(error.as_str()) {
                    log.warning(&format!(
                        "the routes cannot be read, so every stream waits: {error}"
                    ));
                }
                self.routes = RouteSet::unreadable(error);
                self.routes_gen = Some(gen);
                if self.assign_routes(log) {
                    self.stop_reads(&s.redis);
                    self.publish_all();
                }
            }
        }
    }

    /// Writes the per-stream figures of streams `idx` to shared memory.
    fn publish(&self, idx: impl Iterator<Item = usize>) {
        let idx: Vec<usize> = idx.filter(|i| *i < self.slots.len()).collect();
        shmem::update_streams(|tbl| {
            let mine = &mut tbl.slots[self.slots.clone()];
            for i in idx {
                let t = &self.streams[i];
                let slot = &mut mine[i];
                slot.state = t.state;
                slot.last_id.set(&t.last_id);
                slot.messages_synced = t.messages_synced;
                slot.last_sync_time = t.last_sync_time;
                slot.last_error.set(&t.last_error);
                slot.entries_lost = t.entries_lost;
            }
        });
    }

    /// Rewrites the whole stream table in shared memory (the tracked set changed).
    fn publish_all(&self) {
        let n = self.streams.len();
        shmem::update_streams(|tbl| {
            for (i, slot) in tbl.slots[self.slots.clone()].iter_mut().enumerate() {
                let Some(t) = self.streams.get(i) else {
                    *slot = shmem::StreamSlot::EMPTY;
                    continue;
                };
                if !slot.used || slot.key.as_str() != t.stream_key || slot.db != t.db {
                    *slot = shmem::StreamSlot::EMPTY;
                    slot.used = true;
                    slot.key.set(&t.stream_key);
                    slot.db = t.db;
                }
                slot.consumer_group.set(&self.group);
                slot.state = t.state;
                slot.last_id.set(&t.last_id);
                slot.messages_synced = t.messages_synced;
                slot.last_sync_time = t.last_sync_time;
                slot.last_error.set(&t.last_error);
                slot.entries_lost = t.entries_lost;
            }
        });
        let more = usize::from(crate::gucs::stream_worker()).checked_sub(1);
        shmem::update(|st| match more {
            Some(i) => {
                if let Some(m) = st.more.get_mut(i) {
                    m.streams = n as i64;
                }
            }
            None => st.streams_tracked = n as i64,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stream_belongs_to_one_worker_and_the_streams_spread() {
        assert_eq!(owner(0, b"anything", 1), 0);
        let mut per = [0usize; 3];
        for i in 0..3000 {
            let key = format!("stream-{i}");
            let w = owner((i % 4) as u8, key.as_bytes(), 3);
            assert_eq!(w, owner((i % 4) as u8, key.as_bytes(), 3));
            per[w as usize] += 1;
        }
        assert!(per.iter().all(|n| *n > 800), "{per:?}");
        // The database counts: the same name in two databases may go to two workers.
        assert!((0..16u8).any(|db| owner(db, b"s", 2) != owner(0, b"s", 2)));
    }

    #[test]
    fn names_in_other_databases_are_prefixed() {
        assert_eq!(stream_key_name(0, 0, b"s"), "s");
        assert_eq!(stream_key_name(3, 0, b"s"), "db3:s");
        assert_eq!(stream_key_name(0, 2, b"s"), "db0:s");
        assert_eq!(stream_key_name(1, 0, b"\xff"), "db1:$b64:/w==");
    }
}
