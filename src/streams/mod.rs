//! Stream sync: which streams (configured and discovered), their consumer groups, reading
//! through `XREADGROUP` (own pending entries first, then new ones), writing each batch in one
//! transaction and acknowledging only after the commit.
//!
//! - `discovery`: finding streams, creating groups, XINFO figures, claiming idle entries
//! - `round`: one read-write-acknowledge round, and the pure bookkeeping it rests on
//! - `reader`: the reader thread (XREADGROUP and row building; never calls Postgres)
//! - `monitor`: monitor mode (look, do not touch)
//! - `writer`: the stream-table writer (COPY, INSERT fallback, dead letters)

mod discovery;
mod monitor;
mod reader;
mod round;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::encode::encode_name;
use crate::shmem::{self, StreamState, MAX_STREAM_SLOTS};

pub use reader::Reader;
pub use writer::StreamWriter;

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
        }
    }
}

pub struct StreamSync {
    /// Set by the worker: a read may block for `poll_interval` when there is nothing to do.
    pub may_block: bool,
    streams: Vec<Tracked>,
    index: HashMap<(u8, Vec<u8>), usize>,
    next_discovery: Instant,
    discovery_gen: u64,
    /// Round-robin start per database, so every stream gets its turn when not all fit in
    /// one read.
    rr: BTreeMap<u8, usize>,
    /// Which database the next read goes to (round-robin).
    next_db: usize,
    /// Entries whose rows are committed but not yet acknowledged, by database: they ride
    /// along with the next read of that database (one round trip for both).
    unacked: BTreeMap<u8, Acks>,
    /// The last read found nothing: the next one may block.
    idle: bool,
    /// Moving average of an entry's size in bytes, for the read budget.
    avg_entry_bytes: usize,
    group: String,
    /// The last "Searching Redis databases ..." line logged (logged again when it changes).
    last_search: String,
    /// Monitor mode: when the next health check is due.
    next_monitor: Instant,
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
            may_block: true,
            streams: Vec::new(),
            index: HashMap::new(),
            next_discovery: now,
            discovery_gen: 0,
            rr: BTreeMap::new(),
            next_db: 0,
            unacked: BTreeMap::new(),
            idle: false,
            avg_entry_bytes: 1024,
            group: String::new(),
            last_search: String::new(),
            next_monitor: now,
        }
    }

    pub fn tracked(&self) -> usize {
        self.streams.len()
    }

    /// After a reconnect or a failed round: our pending entries come first again.
    pub fn restart_from_pending(&mut self) {
        for s in &mut self.streams {
            s.cursor = Cursor::Pending("0".into());
        }
    }

    /// Forgets everything (the Redis server changed).
    pub fn clear(&mut self, now: Instant) {
        self.streams.clear();
        self.unacked.clear();
        self.index.clear();
        self.next_discovery = now;
        self.publish_all();
    }

    /// Makes discovery due now (`redis_sync_discover()`).
    pub fn discover_now(&mut self, now: Instant) {
        self.next_discovery = now;
    }

    pub fn discovery_due(&self, now: Instant) -> bool {
        now >= self.next_discovery
    }

    /// Time until discovery is due, for the latch wait when there is nothing to read.
    pub fn idle_wait(&self, now: Instant) -> Duration {
        self.next_discovery.saturating_duration_since(now)
    }

    fn reindex(&mut self) {
        self.index =
            self.streams.iter().enumerate().map(|(i, t)| ((t.db, t.key.clone()), i)).collect();
    }

    /// Indexes of streams that can be read (not waiting for a group), by database.
    fn by_db(&self) -> BTreeMap<u8, Vec<usize>> {
        let mut m: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, t) in self.streams.iter().enumerate() {
            if t.state != StreamState::NoGroup {
                m.entry(t.db).or_default().push(i);
            }
        }
        m
    }

    /// Writes the per-stream figures of streams `idx` to shared memory.
    fn publish(&self, idx: impl Iterator<Item = usize>) {
        let idx: Vec<usize> = idx.filter(|i| *i < MAX_STREAM_SLOTS).collect();
        shmem::update_streams(|tbl| {
            for i in idx {
                let t = &self.streams[i];
                let slot = &mut tbl.slots[i];
                slot.state = t.state;
                slot.last_id.set(&t.last_id);
                slot.messages_synced = t.messages_synced;
                slot.last_sync_time = t.last_sync_time;
                slot.last_error.set(&t.last_error);
            }
        });
    }

    /// Rewrites the whole stream table in shared memory (the tracked set changed).
    fn publish_all(&self) {
        let n = self.streams.len();
        shmem::update_streams(|tbl| {
            for (i, slot) in tbl.slots.iter_mut().enumerate() {
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
            }
        });
        shmem::update(|st| st.streams_tracked = n as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_other_databases_are_prefixed() {
        assert_eq!(stream_key_name(0, 0, b"s"), "s");
        assert_eq!(stream_key_name(3, 0, b"s"), "db3:s");
        assert_eq!(stream_key_name(0, 2, b"s"), "db0:s");
        assert_eq!(stream_key_name(1, 0, b"\xff"), "db1:$b64:/w==");
    }
}
