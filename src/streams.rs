//! Stream sync: which streams (configured and discovered), their consumer groups, reading
//! through `XREADGROUP` (own pending entries first, then new ones), writing each batch in one
//! transaction and acknowledging only after the commit.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::encode::encode_name;
use crate::error::Result;
use crate::gucs::{Mode, Settings};
use crate::parse::Pattern;
use crate::reader::{Acks, ReadRequest, ReadStream, Reader, StreamBatch};
use crate::redis::Redis;
use crate::shmem::{self, StreamState, MAX_STREAM_SLOTS};
use crate::sink::{Sink, Target};

/// At most this many entries are asked for in one read (COUNT is per stream, so fewer
/// streams go in one call when the batch size is large): memory stays bounded by settings.
const MAX_ENTRIES_PER_READ: u32 = 2_000;
/// What one read may bring back, roughly: COUNT is lowered for streams of large entries so
/// a read of huge values cannot take the worker's memory with it (two reads are in memory at
/// most, each held twice: as rows and as COPY text).
const READ_BYTES_BUDGET: usize = 16 << 20;
/// SCAN page size.
const SCAN_COUNT: u32 = 1000;

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

/// Checks in a row a figure must rise before monitor mode calls it a trend.
const RISING_CHECKS: u32 = 3;

/// What monitor mode remembers of a stream between checks.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Trend {
    pending: Option<i64>,
    lag: Option<i64>,
    pending_rising: u32,
    lag_rising: u32,
    /// The kinds of trouble in force ("" when healthy): logged when they change, not each
    /// check.
    pub kinds: String,
}

impl Trend {
    /// Takes in one check's figures and returns the kinds of trouble they show and the
    /// warning text ("" = none): pending entries rising check after check, lag rising check
    /// after check, or a consumer sitting on pending entries for longer than `stall_ms`.
    pub fn judge(&mut self, info: &crate::redis::StreamInfo, stall_ms: i64) -> (String, String) {
        let rising = |before: Option<i64>, now: i64, count: u32| match before {
            Some(b) if now > b => count + 1,
            _ => 0,
        };
        self.pending_rising = rising(self.pending, info.pending, self.pending_rising);
        self.pending = Some(info.pending);
        match info.lag {
            Some(lag) => {
                self.lag_rising = rising(self.lag, lag, self.lag_rising);
                self.lag = Some(lag);
            }
            None => {
                self.lag_rising = 0;
                self.lag = None;
            }
        }
        let mut kinds = Vec::new();
        let mut found = Vec::new();
        if self.pending_rising >= RISING_CHECKS {
            kinds.push("pending".to_owned());
            found.push(format!(
                "pending entries rising for {} checks in a row (now {})",
                self.pending_rising, info.pending
            ));
        }
        if self.lag_rising >= RISING_CHECKS {
            kinds.push("lag".to_owned());
            found.push(format!(
                "lag rising for {} checks in a row (now {} entries not yet delivered)",
                self.lag_rising,
                info.lag.unwrap_or(0)
            ));
        }
        if let Some((name, idle, pending)) = &info.stalled_consumer {
            if *idle >= stall_ms {
                kinds.push(format!("stalled {name}"));
                found.push(format!(
                    "consumer \"{name}\" idle for {} s with {pending} pending entries",
                    idle / 1000
                ));
            }
        }
        (kinds.join(","), found.join("; "))
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
    pub fn new() -> StreamSync {
        StreamSync {
            may_block: true,
            streams: Vec::new(),
            index: HashMap::new(),
            next_discovery: Instant::now(),
            discovery_gen: 0,
            rr: BTreeMap::new(),
            next_db: 0,
            unacked: BTreeMap::new(),
            idle: false,
            avg_entry_bytes: 1024,
            group: String::new(),
            last_search: String::new(),
            next_monitor: Instant::now(),
        }
    }

    pub fn tracked(&self) -> usize {
        self.streams.len()
    }

    /// Sends every acknowledgement still waiting for a read to ride on (before discovery,
    /// which re-reads our pending entries).
    pub fn flush_acks(&mut self, redis: &mut Redis, group: &str) -> Result<()> {
        while let Some((db, acks)) = self.unacked.pop_first() {
            let req: Vec<(&[u8], Vec<&str>)> = acks
                .iter()
                .map(|(k, ids)| (k.as_slice(), ids.iter().map(String::as_str).collect()))
                .collect();
            redis.ack(db, group, &req)?;
        }
        Ok(())
    }

    /// After a reconnect: our pending entries come first again.
    pub fn restart_from_pending(&mut self) {
        for s in &mut self.streams {
            s.cursor = Cursor::Pending("0".into());
        }
    }

    /// Forgets everything (the Redis server changed).
    pub fn clear(&mut self) {
        self.streams.clear();
        self.unacked.clear();
        self.index.clear();
        self.next_discovery = Instant::now();
        self.publish_all();
    }

    /// Makes discovery due now (`redis_sync_discover()`).
    pub fn discover_now(&mut self) {
        self.next_discovery = Instant::now();
    }

    pub fn discovery_due(&self) -> bool {
        Instant::now() >= self.next_discovery
    }

    /// Finds the streams to sync: the configured ones plus, with discovery on, every stream
    /// matching the patterns in every database of the search range. Creates consumer groups,
    /// refreshes the per-stream figures, and claims idle entries of dead consumers.
    pub fn discover(&mut self, redis: &mut Redis, s: &Settings, log: &dyn Fn(&str)) -> Result<()> {
        self.next_discovery = Instant::now() + s.stream_discovery_interval;
        self.group = s.consumer_group.clone();
        let default_db = s.redis.db;
        let mut found: Vec<(u8, Vec<u8>, bool)> = Vec::new();
        for name in &s.streams {
            found.push((default_db, name.as_bytes().to_vec(), true));
        }
        if s.stream_auto_discovery && !s.stream_discovery_patterns.is_empty() {
            let patterns: Vec<Pattern> =
                s.stream_discovery_patterns.iter().map(|p| Pattern::new(p)).collect();
            // One SCAN per pattern per database; `*` alone makes the others redundant.
            let globs: Vec<Vec<u8>> = if patterns.iter().any(|p| p.as_str() == "*") {
                vec![b"*".to_vec()]
            } else {
                patterns.iter().map(Pattern::to_redis_glob).collect()
            };
            let search = format!(
                "Searching Redis databases {} for streams matching {}",
                crate::parse::format_db_range(&s.db_search_range),
                s.stream_discovery_patterns.join(", ")
            );
            if search != self.last_search {
                log(&search);
                self.last_search = search;
            }
            for (db, key) in redis.scan_streams(&s.db_search_range, &globs, SCAN_COUNT)? {
                // Confirm client-side: fnmatch semantics are the contract.
                if patterns.iter().any(|p| p.matches(&key)) {
                    found.push((db, key, false));
                }
            }
        }
        // Reconcile: keep what is still there, add what is new, drop discovered streams that
        // are gone (their entries went with them).
        let mut keep: HashMap<(u8, Vec<u8>), bool> = HashMap::new();
        for (db, key, configured) in found {
            let e = keep.entry((db, key)).or_insert(false);
            *e |= configured;
        }
        let before = self.streams.len();
        self.streams.retain(|t| keep.contains_key(&(t.db, t.key.clone())));
        let removed = before - self.streams.len();
        let mut added = Vec::new();
        let known: std::collections::HashSet<(u8, Vec<u8>)> =
            self.streams.iter().map(|t| (t.db, t.key.clone())).collect();
        let mut new_keys: Vec<((u8, Vec<u8>), bool)> =
            keep.into_iter().filter(|(k, _)| !known.contains(k)).collect();
        new_keys.sort();
        for ((db, key), configured) in new_keys {
            let stream_key = stream_key_name(db, default_db, &key);
            added.push(stream_key.clone());
            self.streams.push(Tracked {
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
            });
        }
        self.reindex();
        if !added.is_empty() {
            shmem::bump(|c| &c.streams_discovered, added.len() as u64);
            let shown: Vec<&str> = added.iter().take(10).map(String::as_str).collect();
            let more = if added.len() > 10 {
                format!(" and {} more", added.len() - 10)
            } else {
                String::new()
            };
            log(&format!("tracking {} new stream(s): {}{more}", added.len(), shown.join(", ")));
        }
        if removed > 0 {
            log(&format!("{removed} stream(s) no longer exist and are no longer tracked"));
        }
        if s.mode == Mode::Monitor {
            // Look, do not touch: no groups created, nothing claimed or read.
            for t in &mut self.streams {
                t.state = StreamState::Monitored;
            }
            self.reindex();
            self.discovery_gen += 1;
            self.publish_all();
            return Ok(());
        }
        // Groups for the new ones (and for any stream still waiting for its group).
        let mut gone = Vec::new();
        for i in 0..self.streams.len() {
            let t = &self.streams[i];
            let fresh = t.messages_synced == 0 && t.last_id.is_empty();
            if !(fresh || t.state == StreamState::NoGroup) {
                continue;
            }
            match self.ensure_group(redis, i, s) {
                Ok(()) => {}
                Err(e) if e.connection_lost() => return Err(e),
                Err(_) => gone.push(i),
            }
        }
        for i in gone.into_iter().rev() {
            self.streams.remove(i);
        }
        self.reindex();
        let in_use: std::collections::BTreeSet<u8> = self.streams.iter().map(|t| t.db).collect();
        redis.retain_connections(&in_use);
        // Slots first (a new stream gets a fresh slot), then the figures that go in them.
        self.publish_all();
        self.refresh_info(redis, s)?;
        self.claim(redis, s)?;
        // The safety net: anything left in our pending list (a read whose reply was lost)
        // is read again now. The caller makes sure no read is in flight.
        self.restart_from_pending();
        self.discovery_gen += 1;
        let gen = self.discovery_gen;
        self.publish_all();
        let added_set: std::collections::HashSet<&str> = added.iter().map(String::as_str).collect();
        shmem::update_streams(|t| {
            for (slot, st) in t.slots.iter_mut().zip(&self.streams) {
                slot.found_gen = gen;
                if added_set.contains(st.stream_key.as_str()) {
                    slot.added_gen = gen;
                }
            }
            t.discovery_gen = gen;
        });
        Ok(())
    }

    fn reindex(&mut self) {
        self.index =
            self.streams.iter().enumerate().map(|(i, t)| ((t.db, t.key.clone()), i)).collect();
    }

    /// Creates the consumer group of stream `i` when missing (and allowed to).
    fn ensure_group(&mut self, redis: &mut Redis, i: usize, s: &Settings) -> Result<()> {
        let t = &mut self.streams[i];
        if s.auto_create_consumer_groups {
            match redis.create_group(t.db, &t.key, &s.consumer_group, t.configured) {
                Ok(_) => {
                    t.state = StreamState::Active;
                    Ok(())
                }
                Err(e) => {
                    t.last_error = e.to_string();
                    Err(e)
                }
            }
        } else {
            let info = redis.stream_info(t.db, &s.consumer_group, &[&t.key])?;
            let exists = info.first().and_then(|i| i.as_ref()).is_some_and(|i| i.group_exists);
            t.state = if exists { StreamState::Active } else { StreamState::NoGroup };
            if !exists {
                t.last_error = format!(
                    "consumer group \"{}\" does not exist and redis_sync.auto_create_consumer_groups is off",
                    s.consumer_group
                );
            }
            Ok(())
        }
    }

    /// Length, first/last IDs, pending, lag and consumers of every stream: one pipelined
    /// round trip per database.
    fn refresh_info(&mut self, redis: &mut Redis, s: &Settings) -> Result<()> {
        for (db, idx) in self.by_db(|_| true) {
            let keys: Vec<&[u8]> = idx.iter().map(|&i| self.streams[i].key.as_slice()).collect();
            let infos = redis.stream_info(db, &s.consumer_group, &keys)?;
            let mut slots = Vec::new();
            for (&i, info) in idx.iter().zip(infos) {
                let Some(info) = info else { continue };
                let t = &mut self.streams[i];
                t.group_pending = info.pending;
                t.group_consumers = info.consumers;
                slots.push((i, info));
            }
            shmem::update_streams(|tbl| {
                for (i, info) in &slots {
                    if let Some(slot) = tbl.slots.get_mut(*i) {
                        slot.set_info(info);
                    }
                }
            });
        }
        Ok(())
    }

    /// Claims entries other consumers left pending longer than `claim_min_idle`; they join
    /// our pending list and are read from there.
    fn claim(&mut self, redis: &mut Redis, s: &Settings) -> Result<()> {
        for t in &mut self.streams {
            if t.state != StreamState::Active || t.group_pending == 0 || t.group_consumers < 2 {
                continue;
            }
            let n = redis.claim_idle(
                t.db,
                &t.key,
                &s.consumer_group,
                &s.consumer_name,
                s.claim_min_idle,
                s.batch_size,
            );
            match n {
                Ok(0) => {}
                Ok(_) => t.cursor = Cursor::Pending("0".into()),
                Err(e) if e.connection_lost() => return Err(e),
                Err(e) => t.last_error = e.to_string(),
            }
        }
        Ok(())
    }

    /// Indexes of active streams grouped by database.
    fn by_db(&self, filter: impl Fn(&Tracked) -> bool) -> BTreeMap<u8, Vec<usize>> {
        let mut m: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, t) in self.streams.iter().enumerate() {
            if t.state != StreamState::NoGroup && filter(t) {
                m.entry(t.db).or_default().push(i);
            }
        }
        m
    }

    /// The next read: the streams of the next database in turn (round-robin within it when
    /// they do not all fit in one read), each from its cursor. Blocks for up to
    /// `poll_interval` only when the previous read found nothing and no stream is re-reading
    /// its pending entries.
    fn next_request(&mut self, s: &Settings, idle: bool) -> Option<ReadRequest> {
        let groups = self.by_db(|_| true);
        if groups.is_empty() {
            return None;
        }
        let dbs: Vec<u8> = groups.keys().copied().collect();
        let db = dbs[self.next_db % dbs.len()];
        self.next_db = self.next_db.wrapping_add(1);
        let idx = &groups[&db];
        let per_read = (MAX_ENTRIES_PER_READ / s.batch_size.max(1)).max(1) as usize;
        let start = self.rr.get(&db).copied().unwrap_or(0) % idx.len();
        let take: Vec<usize> =
            idx.iter().cycle().skip(start).take(per_read.min(idx.len())).copied().collect();
        self.rr.insert(db, start + take.len());
        let any_pending = take.iter().any(|&i| self.streams[i].cursor != Cursor::New);
        let streams = take
            .iter()
            .map(|&i| {
                let t = &self.streams[i];
                ReadStream {
                    key: t.key.clone(),
                    after: match &t.cursor {
                        Cursor::Pending(id) => id.clone(),
                        Cursor::New => ">".to_owned(),
                    },
                    stream_key: t.stream_key.clone(),
                }
            })
            .collect();
        let fit = READ_BYTES_BUDGET / self.avg_entry_bytes.max(1) / take.len().max(1);
        Some(ReadRequest {
            acks: self.unacked.remove(&db).unwrap_or_default(),
            settings: s.redis.clone(),
            db,
            group: s.consumer_group.clone(),
            consumer: s.consumer_name.clone(),
            count: (fit.max(1) as u32).min(s.batch_size),
            block: (idle && !any_pending && dbs.len() == 1 && self.may_block)
                .then_some(s.poll_interval),
            streams,
        })
    }

    /// One round: take the reply of the read in flight (or read now), start the next read
    /// when it cannot depend on this one, then write this one in one transaction and
    /// acknowledge after the commit. Reading and writing overlap on two threads.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        redis: &mut Redis,
        reader: &mut Reader,
        sink: &mut Sink,
        s: &Settings,
        warn: &dyn Fn(&str),
        tick: &dyn Fn(),
    ) -> Result<usize> {
        let target = Target {
            schema: s.schema.clone(),
            stream_table: s.stream_table.clone(),
            overwrite: s.stream_conflict_overwrite,
        };
        if let Err(e) = sink.prepare(&target) {
            reader.discard(tick);
            self.restart_from_pending();
            return Err(e);
        }
        if !reader.in_flight() {
            let Some(req) = self.next_request(s, self.idle) else {
                return Ok(0);
            };
            redis.take_token();
            reader.send(req)?;
        }
        let reply = reader.receive(tick)?;
        let db = reply.request.db;
        let batches = match reply.result {
            Ok(b) => b,
            Err(e) if e.is_nogroup() => {
                reader.discard(tick);
                let idx: Vec<usize> = reply
                    .request
                    .streams
                    .iter()
                    .filter_map(|r| self.index.get(&(db, r.key.clone())).copied())
                    .collect();
                self.recreate_groups(redis, db, &idx, s, warn)?;
                return Ok(0);
            }
            Err(e) => {
                reader.discard(tick);
                self.restart_from_pending();
                return Err(e);
            }
        };
        // Move cursors: a pending re-read goes on after its last entry, or switches to new
        // entries once it comes back empty.
        for asked in &reply.request.streams {
            let Some(&i) = self.index.get(&(db, asked.key.clone())) else { continue };
            let t = &mut self.streams[i];
            if t.cursor != Cursor::Pending(asked.after.clone()) {
                continue;
            }
            let got = batches.iter().find(|b| b.key == asked.key).and_then(|b| b.ids.last());
            t.cursor = match got {
                Some(last) => Cursor::Pending(last.clone()),
                None => Cursor::New,
            };
        }
        let entries: usize = batches.iter().map(|b| b.ids.len()).sum();
        self.idle = entries == 0;
        let bytes: usize = batches.iter().map(|b| b.copy.len()).sum();
        if let Some(avg) = bytes.checked_div(entries) {
            self.avg_entry_bytes = (self.avg_entry_bytes * 3 + avg) / 4;
        }
        // Read ahead while this batch is written, when the next read cannot depend on it.
        if self.streams.iter().all(|t| t.cursor == Cursor::New) {
            if let Some(next) = self.next_request(s, self.idle) {
                redis.take_token();
                reader.send(next)?;
            }
        }
        match self.land(sink, db, batches) {
            Ok(n) => Ok(n),
            Err(e) => {
                reader.discard(tick);
                self.restart_from_pending();
                Err(e)
            }
        }
    }

    /// The group or the stream disappeared under us (deleted, or deleted and added again):
    /// create the group again from the start, and stop tracking streams that are gone.
    fn recreate_groups(
        &mut self,
        redis: &mut Redis,
        db: u8,
        idx: &[usize],
        s: &Settings,
        warn: &dyn Fn(&str),
    ) -> Result<()> {
        let mut gone = Vec::new();
        for &i in idx {
            let t = &mut self.streams[i];
            if !s.auto_create_consumer_groups {
                let info = redis.stream_info(db, &s.consumer_group, &[&t.key])?;
                let exists = info.first().and_then(|i| i.as_ref()).is_some_and(|i| i.group_exists);
                if !exists {
                    t.state = StreamState::NoGroup;
                    t.last_error = format!(
                        "consumer group \"{}\" disappeared and redis_sync.auto_create_consumer_groups is off",
                        s.consumer_group
                    );
                    warn(&format!("stream \"{}\": {}", t.stream_key, t.last_error));
                }
                continue;
            }
            match redis.create_group(db, &t.key, &s.consumer_group, t.configured) {
                Ok(true) => {
                    warn(&format!(
                        "consumer group \"{}\" re-created on stream \"{}\": the stream or its group disappeared; reading it again from the start",
                        s.consumer_group, t.stream_key
                    ));
                    t.cursor = Cursor::Pending("0".into());
                }
                Ok(false) => {}
                Err(e) if e.connection_lost() => return Err(e),
                Err(_) => gone.push(i),
            }
        }
        if !gone.is_empty() {
            let mut gone = gone;
            gone.sort_unstable();
            for i in gone.into_iter().rev() {
                self.streams.remove(i);
            }
            self.reindex();
            self.publish_all();
        }
        Ok(())
    }

    /// Writes the rows of one read in one transaction, then acknowledges every entry read.
    /// Returns the entries handled.
    fn land(&mut self, sink: &mut Sink, db: u8, batches: Vec<StreamBatch>) -> Result<usize> {
        let mut rows = Vec::new();
        let mut copy = Vec::new();
        let mut acks: Vec<(usize, Vec<String>)> = Vec::new();
        for b in batches {
            if b.ids.is_empty() {
                continue;
            }
            let Some(&i) = self.index.get(&(db, b.key)) else { continue };
            rows.extend(b.rows);
            copy.push(b.copy);
            acks.push((i, b.ids));
        }
        if acks.is_empty() {
            return Ok(0);
        }
        if let Err(e) = sink.write(&rows, &copy) {
            // Nothing acknowledged: the entries stay in our pending list and are read
            // again from there once Postgres takes them.
            for (i, _) in &acks {
                let t = &mut self.streams[*i];
                t.state = StreamState::Error;
                t.last_error = e.to_string();
            }
            sink.reset();
            self.publish(acks.iter().map(|(i, _)| *i));
            return Err(e);
        }
        drop(rows);
        drop(copy);
        let now = shmem::now();
        let mut handled = 0;
        for (i, ids) in &acks {
            let t = &mut self.streams[*i];
            t.messages_synced += ids.len() as i64;
            t.last_id = ids.last().cloned().unwrap_or_default();
            t.last_sync_time = now;
            t.state = StreamState::Active;
            t.last_error.clear();
            handled += ids.len();
        }
        shmem::bump(|c| &c.messages_processed, handled as u64);
        shmem::update(|st| st.last_sync_time = now);
        self.publish(acks.iter().map(|(i, _)| *i));
        // Committed: acknowledged with the next read of this database.
        let stash = self.unacked.entry(db).or_default();
        for (i, ids) in acks {
            stash.push((self.streams[i].key.clone(), ids));
        }
        Ok(handled)
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

    /// Monitor mode: no reads through the group, no acknowledgements, no writes. Discovery
    /// runs as usual; every `monitor_interval` each stream's figures are refreshed (length,
    /// first and last IDs, groups, consumers, pending, lag) and judged, a change of verdict
    /// is logged (WARNING when trouble starts, LOG when it clears) and shown in
    /// `redis_sync_streams().health`. Returns how long the loop may wait.
    pub fn monitor(
        &mut self,
        redis: &mut Redis,
        s: &Settings,
        info: &dyn Fn(&str),
        debug: &dyn Fn(&str),
        warn: &dyn Fn(&str),
    ) -> Result<Duration> {
        if self.discovery_due() {
            self.discover(redis, s, info)?;
            self.next_monitor = Instant::now();
        }
        let now = Instant::now();
        if now < self.next_monitor {
            return Ok(self.next_monitor.min(self.next_discovery) - now);
        }
        self.next_monitor = now + s.monitor_interval;
        let stall_ms = (s.monitor_interval * 3).max(s.claim_min_idle).as_millis() as i64;
        let mut dbs: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, t) in self.streams.iter().enumerate() {
            dbs.entry(t.db).or_default().push(i);
        }
        for (db, idx) in dbs {
            let keys: Vec<&[u8]> = idx.iter().map(|&i| self.streams[i].key.as_slice()).collect();
            let infos =
                redis.stream_health(db, &s.consumer_group, &keys, Some(&s.consumer_name))?;
            let mut slots = Vec::new();
            for (&i, found) in idx.iter().zip(infos) {
                // A stream gone since discovery: the next discovery drops it.
                let Some(found) = found else { continue };
                let t = &mut self.streams[i];
                let (kinds, verdict) = t.trend.judge(&found, stall_ms);
                debug(&format!(
                    "stream {}: length {}, entries {}..{}, {} group(s), {} consumer(s) in \"{}\", {} pending, lag {}",
                    t.stream_key,
                    found.length,
                    found.first_entry_id.as_deref().unwrap_or("-"),
                    found.last_entry_id.as_deref().unwrap_or("-"),
                    found.groups,
                    found.consumers,
                    s.consumer_group,
                    found.pending,
                    found.lag.map_or("unknown".to_owned(), |l| l.to_string()),
                ));
                if kinds != t.trend.kinds {
                    if kinds.is_empty() {
                        info(&format!("stream {}: healthy again", t.stream_key));
                    } else {
                        warn(&format!("stream {}: {verdict}", t.stream_key));
                    }
                    t.trend.kinds = kinds;
                }
                slots.push((i, found, verdict));
            }
            shmem::update_streams(|tbl| {
                for (i, found, warning) in &slots {
                    if let Some(slot) = tbl.slots.get_mut(*i) {
                        slot.set_info(found);
                        slot.health.set(warning);
                    }
                }
            });
        }
        Ok(s.monitor_interval.min(self.next_discovery.saturating_duration_since(Instant::now())))
    }

    /// Time until discovery is due, for the latch wait when there is nothing to read.
    pub fn idle_wait(&self) -> Duration {
        self.next_discovery.saturating_duration_since(Instant::now())
    }
}

impl Default for StreamSync {
    fn default() -> Self {
        StreamSync::new()
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

    #[test]
    fn monitor_calls_a_trend_after_three_rising_checks() {
        use crate::redis::StreamInfo;
        let mut t = Trend::default();
        let check = |t: &mut Trend, pending: i64, lag: Option<i64>| {
            t.judge(&StreamInfo { pending, lag, ..Default::default() }, 60_000)
        };
        assert_eq!(check(&mut t, 5, Some(1)).1, "");
        assert_eq!(check(&mut t, 6, Some(2)).1, "");
        assert_eq!(check(&mut t, 7, Some(3)).1, "");
        assert_eq!(
            check(&mut t, 8, Some(4)),
            (
                "pending,lag".to_owned(),
                "pending entries rising for 3 checks in a row (now 8); lag rising for 3 checks in a row (now 4 entries not yet delivered)".to_owned()
            )
        );
        // The kinds stay the same while the figures move: one warning, not one per check.
        assert_eq!(check(&mut t, 9, Some(5)).0, "pending,lag");
        // A flat check ends the trend.
        assert_eq!(check(&mut t, 9, Some(5)), (String::new(), String::new()));
        let stalled =
            StreamInfo { stalled_consumer: Some(("old".into(), 90_000, 3)), ..Default::default() };
        assert_eq!(
            t.judge(&stalled, 60_000),
            (
                "stalled old".to_owned(),
                "consumer \"old\" idle for 90 s with 3 pending entries".to_owned()
            )
        );
        assert_eq!(t.judge(&stalled, 120_000).0, "");
    }
}
