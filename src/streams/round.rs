//! The stream lane on the main thread: take the replies the reader threads have, land each
//! in one transaction, queue its acknowledgements to ride on that database's next read, and
//! keep every database's reader busy.
//!
//! The bookkeeping that exactly-once rests on is plain code, tested without Postgres or
//! Redis: which read comes next ([`StreamSync::next_request`]), how cursors move on a reply
//! ([`StreamSync::advance_cursors`]), and that only committed entries are acknowledged
//! ([`StreamSync::land`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::acks;
use super::reader::{
    Acks, GroupFix, ReadOutcome, ReadReply, ReadRequest, ReadStream, Reader, StreamBatch,
};
use super::writer::{StreamRow, Target, Writers, Written};
use super::{Cursor, StreamSync};
use crate::error::{Result, SyncError};
use crate::gucs::{AckAfter, Settings};
use crate::pg::Waker;
use crate::redis::SharedBudget;
use crate::routes::Route;
use crate::shmem::{self, StreamState};
use crate::worker::Log;

/// At most this many entries are asked for in one read (COUNT is per stream, so fewer
/// streams go in one call when the batch size is large): memory stays bounded by settings.
const MAX_ENTRIES_PER_READ: u32 = 10_000;
/// What one read may bring back, roughly: COUNT is lowered for streams of large entries so
/// a read of huge values cannot take the worker's memory with it (two reads per database
/// are in memory at most, each held twice: as rows and as COPY text).
const READ_BYTES_BUDGET: usize = 16 << 20;

/// How long entries left in a stream's pending list (refused, or held back) wait before the
/// list is read again.
const RETRY_HELD: Duration = Duration::from_secs(5);

/// Committed entries wait at most this long for the WAL writer to flush their commit before
/// the worker flushes it itself (and can acknowledge them).
const FLUSH_AT_LATEST: Duration = Duration::from_secs(1);

/// How long a stopping worker waits for the reads under way to come back before it sends
/// its last acknowledgements.
const FINAL_READS: Duration = Duration::from_secs(3);

/// How long a stopping worker with `ack_after = standby` waits for the standbys to flush its
/// last commits.
const FINAL_STANDBYS: Duration = Duration::from_secs(2);

/// While committed entries wait for their flush, the loop looks again this often.
const FLUSH_POLL: Duration = Duration::from_millis(20);

/// How long the shared read goes on finding nothing before its databases go back to reads
/// of their own: three of the stream lane's rounds at `rate_limit` (so at most three empty
/// reads), none when the rate is unlimited (reads of their own then cost no waiting).
fn linger(rate_limit: u32) -> Duration {
    if rate_limit == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(3.0 / (rate_limit as f64 * crate::ratelimit::Lane::Streams.share()))
}

/// Where a batch's rows go: the stream-table writer, or a stand-in in unit tests.
pub trait BatchWriter {
    /// Writes the rows in one transaction, durably; returns the indices of rows held back
    /// (refused with no room for dead letters: not to be acknowledged). `proven`: streams
    /// (as stored) the table took rows of since their entries were refused, so a refusal
    /// of theirs now is the rows' own.
    /// `recheck`: streams (as stored) whose rows were read again from their pending list,
    /// so some may already be dead letters (committed before their acknowledgement was
    /// lost): those are not written again, and come back as settled.
    /// `route`: where the rows go (`None`: the stream table).
    fn write(
        &mut self,
        route: Option<&Arc<Route>>,
        rows: &[StreamRow],
        copy: &[Vec<u8>],
        proven: &[String],
        recheck: &[String],
    ) -> Result<Written>;
    /// Forgets the prepared statements of a destination after a failure.
    fn reset(&mut self, route: Option<&Arc<Route>>);
}

impl BatchWriter for Writers {
    fn write(
        &mut self,
        route: Option<&Arc<Route>>,
        rows: &[StreamRow],
        copy: &[Vec<u8>],
        proven: &[String],
        recheck: &[String],
    ) -> Result<Written> {
        self.for_route(route)?.write(rows, copy, proven, recheck)
    }
    fn reset(&mut self, route: Option<&Arc<Route>>) {
        Writers::reset(self, route)
    }
}

/// The stream table the settings name.
fn target_of(s: &Settings) -> Target {
    Target::Table {
        schema: s.schema.clone(),
        stream_table: s.stream_table.clone(),
        overwrite: s.stream_conflict_overwrite,
    }
}

/// The batches of one destination (a route, or the stream table for `None`), by stream.
type Group = (Option<Arc<Route>>, Vec<(usize, StreamBatch)>);

/// What one turn of the stream lane did.
#[derive(Debug, Default)]
pub struct Pumped {
    /// Replies taken (also empty ones, and those dropped for an older epoch).
    pub replies: usize,
    /// Entries landed.
    pub landed: usize,
    /// Every stream reads new entries (none is re-reading its pending ones).
    pub caught_up: bool,
}

/// What the stream lane needs to start reads.
pub struct Feed<'a> {
    pub budget: &'a SharedBudget,
    pub waker: &'a Waker,
}

impl StreamSync {
    /// Takes every reply that has come and lands it; with `feed`, starts the next read of
    /// every database in use that has none in flight. Returns the entries landed. An error
    /// is the stream lane's failure: every reply still in flight is dropped unread and every
    /// stream reads its pending entries first when reads start again.
    pub fn pump(
        &mut self,
        writer: &mut Writers,
        s: &Settings,
        log: &Log,
        feed: Option<&Feed<'_>>,
    ) -> Result<Pumped> {
        let outcome = self.pump_inner(writer, s, log, feed);
        if outcome.is_err() {
            self.epoch += 1;
            self.restart_from_pending();
        }
        outcome
    }

    fn pump_inner(
        &mut self,
        writer: &mut Writers,
        s: &Settings,
        log: &Log,
        feed: Option<&Feed<'_>>,
    ) -> Result<Pumped> {
        let mut pumped = Pumped::default();
        self.retry_held(std::time::Instant::now());
        if feed.is_some() && !self.streams.is_empty() {
            // The table exists (is created) as soon as the settings name it, before the
            // first entry comes.
            writer.configure(s);
            writer.table.prepare(&target_of(s))?;
            if let Err(e) = writer.table.expire_dead_letters(s.dead_letter_retention) {
                // Old dead letters stay a minute longer; the streams go on.
                log.warning(&format!(
                    "dead letters past redis_sync.dead_letter_retention not deleted: {e}"
                ));
            }
        }
        // The reader of the busy databases first, then each idle database's own.
        let mut sources: Vec<Option<u8>> = vec![None];
        sources.extend(self.readers.keys().copied().map(Some));
        for source in sources {
            let reader = match source {
                None => self.combined.as_mut(),
                Some(db) => self.readers.get_mut(&db),
            };
            let Some(reader) = reader else { continue };
            let replies = match reader.try_receive() {
                Ok(Some(replies)) => replies,
                Ok(None) => continue,
                Err(e) => {
                    match source {
                        None => self.combined = None,
                        Some(db) => {
                            self.readers.remove(&db);
                        }
                    }
                    return Err(e);
                }
            };
            let from_busy = source.is_none();
            let mut batches = Vec::new();
            for reply in replies {
                pumped.replies += 1;
                if let Some(b) = self.take_reply(reply, s, log)? {
                    batches.push(b);
                }
            }
            let found: Vec<(u8, usize)> = batches
                .iter()
                .map(|(db, b): &(u8, Vec<StreamBatch>)| (*db, b.iter().map(|b| b.ids.len()).sum()))
                .collect();
            self.note_round(&found, from_busy, Instant::now(), linger(s.rate_limit));
            // Read ahead while these batches are written, when the next read cannot depend
            // on them (no busy database re-reads pending entries).
            if let (true, Some(feed)) = (from_busy, feed) {
                let caught_up = self
                    .streams
                    .iter()
                    .filter(|t| self.busy.contains(&t.db) && t.readable())
                    .all(|t| t.cursor == Cursor::New);
                if caught_up {
                    self.send_busy(s, feed)?;
                }
            }
            pumped.landed += self.land_reads(writer, s, log, batches)?;
        }
        self.settle_acks(Instant::now(), s, log);
        if let Some(feed) = feed {
            self.feed(s, feed)?;
        }
        pumped.caught_up = self.streams.iter().all(|t| !t.readable() || t.cursor == Cursor::New);
        Ok(pumped)
    }

    /// Streams with entries waiting in their pending lists (refused, or held back for lack of
    /// room in the dead-letter table) read those lists again [`RETRY_HELD`] after they were
    /// left there, whether or not new entries come.
    pub(super) fn retry_held(&mut self, now: std::time::Instant) {
        for t in &mut self.streams {
            // A stream held after its route's target failed is read again, from its
            // pending list, once its time is up.
            if t.held.as_ref().is_some_and(|(_, until)| until.is_some_and(|u| now >= u)) {
                t.held = None;
                t.cursor = Cursor::Pending("0".into());
                self.busy.insert(t.db);
            }
            if !t.retry_due {
                continue;
            }
            let at = *t.retry_at.get_or_insert(now + RETRY_HELD);
            // Not in the middle of a walk of its pending list (that walk reaches them).
            if now >= at && t.readable() && t.cursor == Cursor::New {
                t.retry_due = false;
                t.retry_at = None;
                t.wait_for_new = false;
                t.held_in_walk = false;
                t.cursor = Cursor::Pending("0".into());
                self.busy.insert(t.db);
            }
        }
    }

    /// Takes one reply: drops it if it belongs to an older epoch, applies group fixes and
    /// moves cursors. Returns the batches to land.
    fn take_reply(
        &mut self,
        reply: ReadReply,
        s: &Settings,
        log: &Log,
    ) -> Result<Option<(u8, Vec<StreamBatch>)>> {
        if reply.request.epoch != self.epoch {
            // Dropped unread; entries it brought are in our pending list now, and are read
            // from there at once (a read that was waiting in Redis when reads were stopped
            // may have taken an entry added just after).
            if let Ok(ReadOutcome::Entries(batches)) = &reply.result {
                for b in batches.iter().filter(|b| !b.ids.is_empty()) {
                    if let Some(&i) = self.index.get(&(reply.request.db, b.key.clone())) {
                        let t = &mut self.streams[i];
                        if t.readable() {
                            t.cursor = Cursor::Pending("0".into());
                            self.busy.insert(t.db);
                        }
                    }
                }
            }
            return Ok(None);
        }
        let db = reply.request.db;
        let batches = match reply.result? {
            ReadOutcome::Entries(batches) => batches,
            ReadOutcome::Groups(fixes) => {
                self.reread_pending(&reply.request);
                self.apply_group_fixes(db, fixes, s, log);
                return Ok(None);
            }
            ReadOutcome::NotStreams(keys) => {
                self.reread_pending(&reply.request);
                self.leave_out(db, keys, log);
                return Ok(None);
            }
        };
        self.advance_cursors(&reply.request, &batches);
        let mut batches = batches;
        if reply.request.streams.iter().any(|st| st.after != ">") {
            self.drop_known_landed(db, &mut batches);
        }
        self.note_reply(&batches);
        Ok(Some((db, batches)))
    }

    /// A read refused for one of its streams brought nothing from one server, but from a
    /// Redis Cluster (one read per hash slot) the other slots' reads may have handed out
    /// entries, which are in our pending list now: every stream of the request reads its
    /// pending list first again, so they land before newer ones.
    fn reread_pending(&mut self, request: &ReadRequest) {
        for asked in &request.streams {
            let Some(&i) = self.index.get(&(request.db, asked.key.clone())) else { continue };
            let t = &mut self.streams[i];
            if t.readable() && t.cursor == Cursor::New {
                t.cursor = Cursor::Pending("0".into());
                self.busy.insert(t.db);
            }
        }
    }

    /// A re-read of a pending list also brings entries this worker has landed and not yet
    /// acknowledged (their acknowledgements wait for the WAL flush, or for the next read):
    /// they are dropped here, not written again.
    pub(super) fn drop_known_landed(&self, db: u8, batches: &mut [StreamBatch]) {
        let mut known: HashSet<(&[u8], &str)> = HashSet::new();
        let queued = self.awaiting.iter().filter_map(|(_, _, by_db)| by_db.get(&db));
        for acks in queued.chain(self.unacked.get(&db)) {
            for (key, ids) in acks {
                known.extend(ids.iter().map(|id| (key.as_slice(), id.as_str())));
            }
        }
        if known.is_empty() {
            return;
        }
        for b in batches.iter_mut() {
            let before = b.ids.len();
            b.ids.retain(|id| !known.contains(&(b.key.as_slice(), id.as_str())));
            if b.ids.len() == before {
                continue;
            }
            b.rows.retain(|r| !known.contains(&(b.key.as_slice(), r.message_id.as_str())));
            b.copy = super::reader::copy_text(&b.rows);
            // (An entry deleted from the stream since it landed comes back without fields.)
            b.trimmed = b.ids.len().saturating_sub(b.rows.len());
        }
    }

    /// Decides after a round trip's replies (the entries each database's read found) which
    /// databases are busy: read together in the shared round trip, without waiting in
    /// Redis. A database stays in it while that round trip finds entries anywhere: riding
    /// along costs no round trip, where a read of its own would take one of the rate limit
    /// for every entry that wakes it. Only once the shared read has found nothing at all for
    /// `linger` do its databases go back to reads of their own, waiting in Redis: one
    /// empty read right after a full one (read ahead while a token was spare) says nothing
    /// about the traffic.
    pub(super) fn note_round(
        &mut self,
        found: &[(u8, usize)],
        from_busy: bool,
        now: Instant,
        linger: Duration,
    ) {
        let any = found.iter().any(|(_, n)| *n > 0);
        if any && from_busy {
            self.shared_found_at = Some(now);
        }
        let quiet =
            !any && self.shared_found_at.is_none_or(|t| now.saturating_duration_since(t) >= linger);
        for &(db, entries) in found {
            self.note_busy(db, entries, from_busy && quiet);
        }
    }

    /// A database whose read found entries, or whose streams re-read pending ones, is busy.
    /// `may_idle`: the shared read found nothing in any database; then a database with
    /// nothing pending is idle again (its own read waits in Redis).
    fn note_busy(&mut self, db: u8, entries: usize, may_idle: bool) {
        let pending =
            self.streams.iter().any(|t| t.db == db && t.readable() && t.cursor != Cursor::New);
        if entries > 0 || pending {
            self.busy.insert(db);
        } else if may_idle {
            self.busy.remove(&db);
        }
    }

    /// Moves the acknowledgements whose commits the WAL now holds on disk (up to `flushed`)
    /// to those sent with the next reads.
    pub(super) fn release_durable(&mut self, flushed: u64) {
        self.flushed = self.flushed.max(flushed);
        while self.awaiting.front().is_some_and(|(lsn, ..)| *lsn <= self.flushed) {
            let Some((_, _, by_db)) = self.awaiting.pop_front() else { break };
            for (db, acks) in by_db {
                let n: usize = acks.iter().map(|(_, ids)| ids.len()).sum();
                self.awaiting_entries = self.awaiting_entries.saturating_sub(n);
                self.unacked.entry(db).or_default().extend(acks);
            }
        }
    }

    /// Commits return before their WAL is flushed (see [`crate::pg::defer_flush`]), so
    /// their entries wait here until it is: the WAL writer flushes within
    /// `wal_writer_delay`, and other commits flush it too. The worker flushes it itself only
    /// when no read is under way that could bring entries to land (every database's read
    /// waits in Redis), or when the oldest has waited [`FLUSH_AT_LATEST`]: a commit never
    /// waits for the disk while entries stream in. With `ack_after = standby` they wait
    /// for the standbys as well; reading pauses while too many wait.
    fn settle_acks(&mut self, now: Instant, s: &Settings, log: &Log) {
        self.ack_poll = FLUSH_POLL;
        if let Some(newest) = self.awaiting.iter().map(|a| a.0).max() {
            let mut flushed = crate::pg::flushed_lsn();
            if flushed < newest {
                let oldest = self.awaiting.front().map_or(now, |a| a.1);
                // (Reads paused for want of acknowledgements wait on this flush.)
                let reading = !self.reads_paused
                    && (!self.busy.is_empty()
                        || self.combined.as_ref().is_some_and(Reader::in_flight));
                if !reading || now.saturating_duration_since(oldest) >= FLUSH_AT_LATEST {
                    crate::pg::flush_wal(newest);
                    flushed = newest;
                }
            }
            if s.ack_after == AckAfter::Standby {
                self.read_standbys(newest, now, log);
            }
            let safe = acks::releasable(s.ack_after, flushed, self.standby.limit(now));
            self.release_durable(safe);
            // Flushed here, held for the standbys: looked at again as often as they move.
            let held = s.ack_after == AckAfter::Standby
                && self.awaiting.front().is_some_and(|(lsn, ..)| *lsn <= flushed);
            if held {
                self.ack_poll = self.standby.poll(now);
            }
            self.note_standby_wait(held, now, log);
        } else {
            self.note_standby_wait(false, now, log);
        }
        let paused = self.awaiting_entries >= acks::awaiting_bound(s);
        if paused != self.reads_paused {
            self.reads_paused = paused;
            log.debug(&format!(
                "{} entries wait for their acknowledgement: reading {}",
                self.awaiting_entries,
                if paused { "pauses" } else { "goes on" }
            ));
        }
        self.show_wait(now);
    }

    /// Reads how far the standbys have flushed, when commits up to `newest` wait for it
    /// and the last reading is old enough.
    fn read_standbys(&mut self, newest: u64, now: Instant, log: &Log) {
        if !self.standby.due(newest, now) {
            return;
        }
        match crate::pg::standbys::flush_position() {
            Ok(f) => {
                self.standby.read(f, now);
                match self.standby.alone_news(now) {
                    Some(true) => log.warning(&format!(
                        "no standby has streamed for {} s and synchronous_standby_names is \
                         empty: acknowledgements follow the local flush until one connects \
                         (redis_sync.ack_after = standby)",
                        acks::STANDBY_GONE.as_secs()
                    )),
                    Some(false) => log.info(&format!(
                        "{} streaming standby(s) connected: acknowledgements wait for them again",
                        f.connected
                    )),
                    None => {}
                }
            }
            Err(e) => {
                // Acknowledgements wait (a standby may be there); the next look may work.
                self.standby.unknown(now);
                log.warning(&format!("the standbys' flush position cannot be read: {e}"));
            }
        }
    }

    /// Logs a long wait for the standbys (and its end).
    fn note_standby_wait(&mut self, held: bool, now: Instant, log: &Log) {
        match self.standby.note(held, now) {
            Some(acks::WaitNews::Started) => log.warning(&format!(
                "acknowledgements of {} entries have waited {} s for the standbys \
                 (redis_sync.ack_after = standby; {} streaming standby(s) connected, \
                 synchronous_standby_names = '{}'): the entries stay pending in Redis{}",
                self.awaiting_entries,
                self.standby.waited(now).as_secs(),
                self.standby.last.connected,
                crate::pg::sync_standby_names(),
                if self.reads_paused { ", and reading is paused" } else { "" }
            )),
            Some(acks::WaitNews::Ended) => {
                log.info("the standbys caught up: acknowledgements go on");
            }
            None => {}
        }
    }

    /// Before the worker stops: ends the reads under way (their entries stay pending, to be
    /// read again), flushes the WAL and acknowledges every committed entry that may be (with
    /// `ack_after = standby`, what the standbys hold), so that no other consumer of the group
    /// claims and stores them again. Returns (sent to be acknowledged, left pending).
    pub fn final_acks(&mut self, writer: &mut Writers, s: &Settings, log: &Log) -> (usize, usize) {
        self.stop_reads(&s.redis);
        let deadline = Instant::now() + FINAL_READS;
        while self.reading() && Instant::now() < deadline {
            let _ = self.pump(writer, s, log, None);
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(newest) = self.awaiting.iter().map(|a| a.0).max() {
            crate::pg::flush_wal(newest);
            let mut limit = newest;
            if s.ack_after == AckAfter::Standby {
                // The WAL senders stay up while the server shuts down: the last commits
                // reach the standbys within moments.
                let until = Instant::now() + FINAL_STANDBYS;
                loop {
                    let now = Instant::now();
                    match crate::pg::standbys::flush_position() {
                        Ok(f) => self.standby.read(f, now),
                        Err(e) => {
                            self.standby.unknown(now);
                            log.warning(&format!(
                                "the standbys' flush position cannot be read: {e}"
                            ));
                            break;
                        }
                    }
                    if self.standby.limit(now) >= newest || now >= until {
                        break;
                    }
                    std::thread::sleep(FLUSH_POLL);
                }
                limit = limit.min(self.standby.limit(Instant::now()));
            }
            self.release_durable(limit);
        }
        let mut acked = 0;
        let owed = std::mem::take(&mut self.unacked);
        let Some(&first) = owed.keys().next() else { return (0, self.awaiting_entries) };
        // One connection for every database (a Redis that is down costs one timeout).
        let mut conn = match crate::redis::RedisConn::connect(&s.redis, first) {
            Ok(c) => c,
            Err(e) => {
                let n: usize = owed.values().flatten().map(|(_, ids)| ids.len()).sum();
                log.warning(&format!(
                    "{n} committed entries not acknowledged before stopping (they stay pending): {e}"
                ));
                return (0, self.awaiting_entries);
            }
        };
        for (db, acks) in owed {
            let n: usize = acks.iter().map(|(_, ids)| ids.len()).sum();
            let sent = conn.select(db).and_then(|()| {
                conn.read_group(&s.consumer_group, &s.consumer_name, 1, None, &[], &acks)
            });
            match sent {
                Ok(_) => acked += n,
                Err(e) => {
                    log.warning(&format!(
                        "committed entries of database {db} and after not acknowledged before stopping (they stay pending): {e}"
                    ));
                    break;
                }
            }
        }
        (acked, self.awaiting_entries)
    }

    /// Whether a read is under way.
    fn reading(&self) -> bool {
        self.combined.as_ref().is_some_and(Reader::in_flight)
            || self.readers.values().any(Reader::in_flight)
    }

    /// Shows in `redis_sync_status()` how many entries wait for their acknowledgement, and
    /// since when.
    fn show_wait(&mut self, now: Instant) {
        // (The first stream worker's only, for now.)
        if crate::gucs::stream_worker() > 0 {
            return;
        }
        let wait = (self.awaiting_entries, self.awaiting.front().map(|a| a.1));
        if wait == self.shown_wait {
            return;
        }
        self.shown_wait = wait;
        let since = wait.1.map_or(0, |t| {
            shmem::now() - now.saturating_duration_since(t).as_micros().min(i64::MAX as u128) as i64
        });
        shmem::update(|st| {
            st.acks_waiting = wait.0 as i64;
            st.acks_waiting_since = since;
        });
    }

    /// How long the loop may wait while committed entries wait for their flush.
    pub fn ack_wait(&self) -> Option<Duration> {
        (!self.awaiting.is_empty()).then_some(self.ack_poll)
    }

    /// Lands the batches of one round trip's reads, in one transaction.
    fn land_reads(
        &mut self,
        writer: &mut Writers,
        s: &Settings,
        log: &Log,
        reads: Vec<(u8, Vec<StreamBatch>)>,
    ) -> Result<usize> {
        if reads.iter().all(|(_, b)| b.iter().all(|b| b.ids.is_empty())) {
            return Ok(0);
        }
        writer.table.prepare(&target_of(s))?;
        let now = shmem::now();
        let landed = self.land(writer, reads, now);
        self.publish_landed(&landed, now, log);
        landed.result
    }

    /// Starts the next reads: one round trip for every busy database (when none is in
    /// flight), and a read that waits in Redis for every idle database whose reader is free
    /// (starting readers for databases new to it, ending those no longer needed).
    fn feed(&mut self, s: &Settings, feed: &Feed<'_>) -> Result<()> {
        let readable: BTreeSet<u8> =
            self.streams.iter().filter(|t| t.readable()).map(|t| t.db).collect();
        self.busy.retain(|db| readable.contains(db));
        // A database's own reader (its thread and connection) is kept while the database has
        // streams, busy or not: a database that turns busy and idle again under a moderate
        // load must not cost a connect (and TLS handshake) each time.
        self.readers.retain(|db, r| readable.contains(db) || r.in_flight());
        if !self.combined.as_ref().is_some_and(Reader::in_flight) {
            self.send_busy(s, feed)?;
        }
        for db in readable {
            if self.busy.contains(&db) || self.readers.get(&db).is_some_and(Reader::in_flight) {
                continue;
            }
            let Some(req) = self.next_request(db, s) else { continue };
            let reader = match self.readers.get_mut(&db) {
                Some(r) => r,
                None => {
                    let wake = feed
                        .waker
                        .handle()
                        .map_err(|e| SyncError::Config(format!("cannot start a reader: {e}")))?;
                    let r =
                        Reader::start(&format!("reader db{db}"), db, feed.budget.clone(), wake)?;
                    self.readers.entry(db).or_insert(r)
                }
            };
            if let Err(e) = reader.send(vec![req]) {
                self.readers.remove(&db);
                return Err(e);
            }
        }
        Ok(())
    }

    /// One round trip reading every busy database. Acknowledgements owed to a database it
    /// does not read go with it too: one whose own read waits in Redis (and would carry them
    /// only when it ends), or one with nothing left to read.
    fn send_busy(&mut self, s: &Settings, feed: &Feed<'_>) -> Result<()> {
        // A database is read from one place at a time: while its own reader's read (waiting
        // in Redis) is under way, the shared read leaves it out until that read returns (an
        // entry ends it at once, else `poll_interval` does). Two reads of one stream at the
        // same time could both be handed an entry (one as new, the other from the pending
        // list) and land it twice.
        let dbs: Vec<u8> = self
            .busy
            .iter()
            .copied()
            .filter(|db| !self.readers.get(db).is_some_and(Reader::in_flight))
            .collect();
        let mut reqs: Vec<ReadRequest> =
            dbs.into_iter().filter_map(|db| self.next_request(db, s)).collect();
        let owed: Vec<u8> = self
            .unacked
            .keys()
            .copied()
            .filter(|db| {
                !self.busy.contains(db)
                    && (self.readers.get(db).is_some_and(Reader::in_flight)
                        || !self.streams.iter().any(|t| t.db == *db && t.readable()))
            })
            .collect();
        for db in owed {
            reqs.extend(self.acks_only(db, s));
        }
        if reqs.is_empty() {
            return Ok(());
        }
        let reader = match self.combined.as_mut() {
            Some(r) => r,
            None => {
                let wake = feed
                    .waker
                    .handle()
                    .map_err(|e| SyncError::Config(format!("cannot start a reader: {e}")))?;
                self.combined.insert(Reader::start(
                    "reader",
                    s.redis.db,
                    feed.budget.clone(),
                    wake,
                )?)
            }
        };
        if let Err(e) = reader.send(reqs) {
            self.combined = None;
            return Err(e);
        }
        Ok(())
    }

    /// The next read of database `db`: its streams from their cursors (round-robin when they
    /// do not all fit in one read), carrying the acknowledgements of that database's committed
    /// entries. A busy database (its last read found entries, or a stream there re-reads
    /// pending ones) is read without waiting; an idle one with a read that covers every stream
    /// of `db` and blocks in Redis for up to `poll_interval`: a new entry ends it at once.
    /// `None` when there is nothing to send.
    pub(super) fn next_request(&mut self, db: u8, s: &Settings) -> Option<ReadRequest> {
        if self.reads_paused {
            return self.acks_only(db, s);
        }
        let idx: Vec<usize> = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, t)| t.db == db && t.readable())
            .map(|(i, _)| i)
            .collect();
        let acks = self.unacked.remove(&db).unwrap_or_default();
        if idx.is_empty() && acks.is_empty() {
            return None;
        }
        let pending = idx.iter().any(|&i| self.streams[i].cursor != Cursor::New);
        let block = !self.busy.contains(&db) && !pending && !idx.is_empty();
        let per_read = (MAX_ENTRIES_PER_READ / s.batch_size.max(1)).max(1) as usize;
        let take: Vec<usize> = if block || idx.len() <= per_read {
            idx.clone()
        } else {
            let start = self.rr.get(&db).copied().unwrap_or(0) % idx.len();
            self.rr.insert(db, start + per_read);
            idx.iter().cycle().skip(start).take(per_read).copied().collect()
        };
        let streams: Vec<ReadStream> = take
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
                    configured: t.configured,
                    map: t.route.as_ref().map(|r| r.map.clone()),
                }
            })
            .collect();
        let n = streams.len().max(1);
        let fit = READ_BYTES_BUDGET / self.avg_entry_bytes.max(1) / n;
        let spread = (MAX_ENTRIES_PER_READ as usize / n).max(1);
        let count = (fit.min(spread).max(1) as u32).min(s.batch_size);
        Some(self.request(db, s, acks, streams, count, block.then_some(s.poll_interval)))
    }

    /// A request that only acknowledges the committed entries of database `db`.
    fn acks_only(&mut self, db: u8, s: &Settings) -> Option<ReadRequest> {
        let acks = self.unacked.remove(&db)?;
        Some(self.request(db, s, acks, Vec::new(), 1, None))
    }

    fn request(
        &self,
        db: u8,
        s: &Settings,
        acks: Acks,
        streams: Vec<ReadStream>,
        count: u32,
        block: Option<Duration>,
    ) -> ReadRequest {
        ReadRequest {
            acks,
            settings: s.redis.clone(),
            db,
            group: s.consumer_group.clone(),
            consumer: s.consumer_name.clone(),
            count,
            block,
            streams,
            auto_create: s.auto_create_consumer_groups,
            epoch: self.epoch,
        }
    }

    /// Moves cursors after a reply: a pending re-read goes on after its last entry, or
    /// switches to new entries once it comes back empty. A cursor moved elsewhere since the
    /// request was made (sent back to `0`) is left alone.
    pub(super) fn advance_cursors(&mut self, request: &ReadRequest, batches: &[StreamBatch]) {
        let db = request.db;
        for asked in &request.streams {
            let Some(&i) = self.index.get(&(db, asked.key.clone())) else { continue };
            let t = &mut self.streams[i];
            t.read_pending = asked.after != ">";
            if t.cursor != Cursor::Pending(asked.after.clone()) {
                continue;
            }
            let got = batches.iter().find(|b| b.key == asked.key).and_then(|b| b.ids.last());
            t.cursor = match got {
                Some(last) => Cursor::Pending(last.clone()),
                None => {
                    // The pending list is read through: a later refusal needs new proof,
                    // unless entries were held back on the way (their refusal is theirs).
                    t.proven = false;
                    t.held_back = t.held_in_walk;
                    t.held_in_walk = false;
                    Cursor::New
                }
            };
        }
    }

    /// Keeps the moving average of entry sizes that the read budget uses.
    fn note_reply(&mut self, batches: &[StreamBatch]) {
        let entries: usize = batches.iter().map(|b| b.ids.len()).sum();
        let bytes: usize = batches.iter().map(|b| b.copy.len()).sum();
        if let Some(avg) = bytes.checked_div(entries) {
            self.avg_entry_bytes = (self.avg_entry_bytes * 3 + avg) / 4;
        }
    }

    /// Keys of `db` that a read found to be of another type now (deleted and set again as a
    /// string, say): left out of reads, in state `error`, until discovery finds a stream
    /// there again; the other streams read on.
    fn leave_out(&mut self, db: u8, keys: Vec<(Vec<u8>, String)>, log: &Log) {
        for (key, ty) in keys {
            let Some(&i) = self.index.get(&(db, key)) else { continue };
            let t = &mut self.streams[i];
            t.mark_unreadable(not_a_stream(&ty), log);
        }
        self.publish_all();
    }

    /// The group or the stream disappeared under a read (deleted, or deleted and added
    /// again): the reader made the groups again where it could; streams that are gone are no
    /// longer tracked.
    fn apply_group_fixes(
        &mut self,
        db: u8,
        fixes: Vec<(Vec<u8>, GroupFix)>,
        s: &Settings,
        log: &Log,
    ) {
        let mut gone = Vec::new();
        for (key, fix) in fixes {
            let Some(&i) = self.index.get(&(db, key)) else { continue };
            let t = &mut self.streams[i];
            match fix {
                GroupFix::Recreated => {
                    log.warning(&format!(
                        "consumer group \"{}\" re-created on stream \"{}\": the stream or its group disappeared; reading it again from the start",
                        s.consumer_group, t.stream_key
                    ));
                    t.cursor = Cursor::Pending("0".into());
                }
                GroupFix::Exists => {}
                GroupFix::Missing => {
                    t.state = StreamState::NoGroup;
                    t.last_error = format!(
                        "consumer group \"{}\" disappeared and redis_sync.auto_create_consumer_groups is off",
                        s.consumer_group
                    );
                    log.warning(&format!("stream \"{}\": {}", t.stream_key, t.last_error));
                }
                GroupFix::Gone => gone.push(i),
                GroupFix::NotStream(ty) => t.mark_unreadable(not_a_stream(&ty), log),
                GroupFix::Failed(e) => {
                    t.mark_unreadable(format!("its consumer group cannot be created: {e}"), log)
                }
            }
        }
        gone.sort_unstable();
        for i in gone.iter().rev() {
            self.streams.remove(*i);
        }
        self.reindex();
        self.publish_all();
    }

    /// Writes the rows of one round trip's reads (of one or more databases) in one
    /// transaction. Only when it committed are the entries queued for acknowledgement (with
    /// the next read of their database);
    /// when it failed, nothing is queued: the entries stay in our pending list and are read
    /// again from there once Postgres takes them. `now` is the Postgres timestamp recorded
    /// as the streams' last sync time. Plain bookkeeping: what it changed is published by
    /// the caller.
    pub(super) fn land(
        &mut self,
        writer: &mut impl BatchWriter,
        reads: Vec<(u8, Vec<StreamBatch>)>,
        now: i64,
    ) -> Landed {
        // One write per destination (the stream table, each route's target), each in its
        // own transaction: a route whose target fails holds only its own streams.
        let mut groups: Vec<Group> = Vec::new();
        for (db, batches) in reads {
            for b in batches {
                if b.ids.is_empty() {
                    continue;
                }
                let Some(&i) = self.index.get(&(db, b.key.clone())) else { continue };
                let route = self.streams[i].route.clone();
                let name = route.as_ref().map(|r| r.name.clone());
                match groups.iter_mut().find(|(r, _)| r.as_ref().map(|r| &r.name) == name.as_ref())
                {
                    Some((_, items)) => items.push((i, b)),
                    None => groups.push((route, vec![(i, b)])),
                }
            }
        }
        let mut out = Landed::of(Ok(0), Vec::new(), Vec::new());
        for (route, items) in groups {
            let streams: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
            let landed = self.land_group(writer, route.as_ref(), items, now);
            out.touched.extend(landed.touched);
            out.lost.extend(landed.lost);
            out.dead += landed.dead;
            match (landed.result, route) {
                (Ok(n), Some(r)) => {
                    out.routes.push((r.name.clone(), n.saturating_sub(landed.dead), String::new()));
                    out.result = out.result.map(|m| m + n);
                }
                (Ok(n), None) => out.result = out.result.map(|m| m + n),
                // A route's target failed: its streams wait and read their pending entries
                // again later; the other destinations go on.
                (Err(e), Some(r)) => {
                    let error = format!("route \"{}\": {e}", r.name);
                    out.routes.push((r.name.clone(), 0, error.clone()));
                    out.held.extend(streams.into_iter().map(|i| (i, error.clone())));
                }
                (Err(e), None) => {
                    if out.result.is_ok() {
                        out.result = Err(e);
                    }
                }
            }
        }
        out
    }

    /// Lands the batches of one destination in one write.
    fn land_group(
        &mut self,
        writer: &mut impl BatchWriter,
        route: Option<&Arc<Route>>,
        items: Vec<(usize, StreamBatch)>,
        now: i64,
    ) -> Landed {
        let mut rows = Vec::new();
        let mut copy = Vec::new();
        let mut acks: Vec<(usize, Vec<String>)> = Vec::new();
        let mut lost = Vec::new();
        for (i, b) in items {
            if b.trimmed > 0 {
                lost.push((i, b.trimmed));
            }
            rows.extend(b.rows);
            copy.push(b.copy);
            acks.push((i, b.ids));
        }
        let touched: Vec<usize> = acks.iter().map(|(i, _)| *i).collect();
        if acks.is_empty() {
            return Landed::of(Ok(0), touched, lost);
        }
        let proven: Vec<String> = acks
            .iter()
            .filter(|(i, _)| self.streams[*i].proven || self.streams[*i].held_back)
            .map(|(i, _)| self.streams[*i].stream_key.clone())
            .collect();
        let recheck: Vec<String> = acks
            .iter()
            .filter(|(i, _)| self.streams[*i].read_pending)
            .map(|(i, _)| self.streams[*i].stream_key.clone())
            .collect();
        let Written { held, settled, commit_lsn, dead } =
            match writer.write(route, &rows, &copy, &proven, &recheck) {
                Ok(w) => w,
                Err(e @ SyncError::Refused { .. })
                    if acks.iter().all(|(i, _)| {
                        let t = &self.streams[*i];
                        t.refused && t.read_pending
                    }) =>
                {
                    // Entries already known refused, refused again on their re-read: no news, so
                    // no failure of the lane (no backoff, no other stream's reads dropped).
                    // They wait for proof: new entries next, the pending list again in 5 s.
                    for (i, _) in &acks {
                        let t = &mut self.streams[*i];
                        t.last_error = e.to_string();
                        t.state = StreamState::Error;
                        t.proven = false;
                        t.wait_for_new = true;
                        t.retry_due = true;
                        t.retry_at = None;
                        t.cursor = Cursor::New;
                    }
                    writer.reset(route);
                    return Landed::of(Ok(0), touched, lost);
                }
                Err(e) => {
                    self.refused_write(&acks, &e);
                    writer.reset(route);
                    return Landed::of(Err(e), touched, Vec::new());
                }
            };
        // Refused rows the dead-letter table has no room for: not acknowledged; their
        // streams read their pending lists again in a few seconds.
        let held: HashSet<(&str, &str)> = held
            .iter()
            .filter_map(|&i| rows.get(i))
            .map(|r| (&*r.stream_key, r.message_id.as_str()))
            .collect();
        for (i, ids) in &mut acks {
            let t = &mut self.streams[*i];
            let before = ids.len();
            if !held.is_empty() {
                ids.retain(|id| !held.contains(&(t.stream_key.as_str(), id.as_str())));
            }
            if ids.len() < before {
                t.retry_due = true;
                t.held_back = true;
                t.held_in_walk = true;
            }
        }
        // Entries found already in the dead-letter table: acknowledged, not counted again.
        let settled: HashSet<(&str, &str)> = settled
            .iter()
            .filter_map(|&i| rows.get(i))
            .map(|r| (&*r.stream_key, r.message_id.as_str()))
            .collect();
        let mut handled = 0;
        for (i, ids) in &acks {
            let t = &mut self.streams[*i];
            if ids.is_empty() {
                // All of its rows held back: it says why.
                t.last_error = "refused entries wait in Redis: the dead-letter table is full (redis_sync.dead_letter_max)".into();
                continue;
            }
            let synced = ids
                .iter()
                .filter(|id| !settled.contains(&(t.stream_key.as_str(), id.as_str())))
                .count();
            if synced == 0 {
                // Only entries already stored as dead letters: acknowledged, and nothing
                // landed (no proof that the table takes rows).
                continue;
            }
            t.messages_synced += synced as i64;
            t.last_id = ids.last().cloned().unwrap_or_default();
            t.last_sync_time = now;
            t.state = StreamState::Active;
            t.last_error.clear();
            handled += synced;
            if t.refused {
                t.refused = false;
                t.wait_for_new = false;
                if !t.read_pending {
                    // The table takes this stream's rows: its refused entries are read
                    // again, and what is refused of them now is dead-lettered.
                    t.proven = true;
                    t.cursor = Cursor::Pending("0".into());
                    self.busy.insert(t.db);
                }
            }
        }
        drop(settled);
        drop(rows);
        drop(copy);
        let mut by_db: BTreeMap<u8, Acks> = BTreeMap::new();
        for (i, ids) in acks {
            if ids.is_empty() {
                continue;
            }
            let t = &self.streams[i];
            by_db.entry(t.db).or_default().push((t.key.clone(), ids));
        }
        if !by_db.is_empty() {
            self.awaiting_entries +=
                by_db.values().flat_map(|a| a.iter()).map(|(_, ids)| ids.len()).sum::<usize>();
            self.awaiting.push_back((commit_lsn, Instant::now(), by_db));
            self.release_durable(self.flushed);
        }
        let mut landed = Landed::of(Ok(handled), touched, lost);
        landed.dead = dead;
        landed
    }

    /// A write of the streams in `acks` failed with `e`: they say so. A refusal of every
    /// row holds their entries in Redis; refused again on a re-read of the pending list, new
    /// entries are read next (the proof that the table takes rows), and the pending list
    /// again in a few seconds.
    fn refused_write(&mut self, acks: &[(usize, Vec<String>)], e: &SyncError) {
        for (i, _) in acks {
            let t = &mut self.streams[*i];
            t.state = StreamState::Error;
            t.last_error = e.to_string();
            if matches!(e, SyncError::Refused { .. }) {
                t.wait_for_new = t.refused && t.read_pending;
                t.retry_due |= t.wait_for_new;
                t.refused = true;
                t.proven = false;
            }
        }
    }

    /// Publishes what [`StreamSync::land`] changed: the streams' figures and the counters.
    fn publish_landed(&mut self, landed: &Landed, now: i64, log: &Log) {
        for &(i, n) in &landed.lost {
            self.streams[i].note_lost(n, log);
        }
        let until = Instant::now() + RETRY_HELD;
        for (i, error) in &landed.held {
            self.streams[*i].hold(error.clone(), Some(until), log);
        }
        for (name, n, error) in &landed.routes {
            shmem::update_route(name, |r| {
                if *n > 0 {
                    r.rows_landed += *n as i64;
                    r.last_landed = now;
                }
                if !error.is_empty() {
                    r.last_error.set(error);
                    r.last_error_time = now;
                }
            });
        }
        if let Ok(handled) = landed.result {
            if handled > 0 {
                shmem::bump(|c| &c.messages_processed, handled as u64);
                shmem::update(|st| st.last_sync_time = now);
            }
        }
        self.publish(landed.touched.iter().copied());
    }
}

/// What landing one read did: the entries handled (or why nothing was), and the streams
/// whose figures changed.
pub(super) struct Landed {
    pub result: Result<usize>,
    pub touched: Vec<usize>,
    /// Streams whose read brought entries deleted while pending, and how many.
    pub lost: Vec<(usize, usize)>,
    /// Streams held because their route's target failed, and why.
    pub held: Vec<(usize, String)>,
    /// Each route written: its name, the rows it landed, and its error ("" for none).
    pub routes: Vec<(String, usize, String)>,
    /// Rows that went to dead letters.
    pub dead: usize,
}

impl Landed {
    fn of(result: Result<usize>, touched: Vec<usize>, lost: Vec<(usize, usize)>) -> Landed {
        Landed { result, touched, lost, held: Vec::new(), routes: Vec::new(), dead: 0 }
    }
}

/// The `last_error` of a stream key that holds another type now.
fn not_a_stream(ty: &str) -> String {
    format!(
        "WRONGTYPE: the key is a {ty} now, not a stream: left out of reads until it is a stream again"
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::error::SyncError;
    use crate::streams::Tracked;

    /// Stands in for the stream table: refuses every write while `fail` is set; refuses
    /// the rows named in `bad` as the real writer does (every row of a batch of bad rows
    /// refused: the table's refusal, unless `proven`; then dead-lettered).
    #[derive(Default)]
    struct Table {
        /// Where its commits end in the WAL (0: durable at once).
        lsn: u64,
        fail: bool,
        bad: Vec<String>,
        rows: Vec<String>,
        dead: Vec<String>,
        /// No room for dead letters: refused rows are held back.
        full: bool,
    }

    impl BatchWriter for Table {
        fn write(
            &mut self,
            _route: Option<&Arc<Route>>,
            rows: &[StreamRow],
            _copy: &[Vec<u8>],
            proven: &[String],
            _recheck: &[String],
        ) -> Result<Written> {
            if self.fail {
                return Err(SyncError::Config("refused".into()));
            }
            let (bad, good): (Vec<_>, Vec<_>) =
                rows.iter().map(|r| r.message_id.clone()).partition(|id| self.bad.contains(id));
            let proven = rows.iter().all(|r| proven.iter().any(|p| **p == *r.stream_key));
            if good.is_empty() && !bad.is_empty() && !proven {
                return Err(SyncError::Refused {
                    sqlstate: pgrx::PgSqlErrorCode::ERRCODE_RAISE_EXCEPTION,
                    message: "bad".into(),
                });
            }
            self.rows.extend(good);
            if self.full {
                let held = rows
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| bad.contains(&r.message_id))
                    .map(|(i, _)| i)
                    .collect();
                return Ok(Written { held, ..Default::default() });
            }
            self.dead.extend(bad);
            Ok(Written { commit_lsn: self.lsn, ..Default::default() })
        }
        fn reset(&mut self, _route: Option<&Arc<Route>>) {}
    }

    fn sync_with(streams: &[(u8, &str)]) -> StreamSync {
        let mut s = StreamSync::new(Instant::now());
        for (db, key) in streams {
            s.streams.push(Tracked::new(*db, key.as_bytes().to_vec(), key.to_string(), false));
        }
        s.reindex();
        s
    }

    fn batch(key: &str, ids: &[&str]) -> StreamBatch {
        StreamBatch {
            key: key.as_bytes().to_vec(),
            ids: ids.iter().map(|i| i.to_string()).collect(),
            rows: ids
                .iter()
                .map(|i| StreamRow {
                    stream_key: key.into(),
                    message_id: i.to_string(),
                    data: "{}".into(),
                    millis: 0,
                    map: None,
                    fields: Default::default(),
                })
                .collect(),
            copy: Vec::new(),
            trimmed: 0,
        }
    }

    fn afters(r: &ReadRequest) -> Vec<(&str, &str)> {
        r.streams
            .iter()
            .map(|s| (std::str::from_utf8(&s.key).unwrap_or(""), s.after.as_str()))
            .collect()
    }

    #[test]
    fn pending_first_then_new_and_cursors_follow_replies() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a"), (0, "b")]);
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", "0"), ("b", "0")]);
        // `a` still had pending entries, `b` none: `a` goes on after its last one.
        s.advance_cursors(&r, &[batch("a", &["1-0", "2-0"])]);
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", "2-0"), ("b", ">")]);
        s.advance_cursors(&r, &[]);
        s.busy.insert(0);
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", ">"), ("b", ">")]);
        assert_eq!(r.block, None, "a busy database: no waiting");
        // Only once the database is idle, with nothing pending, does the read block.
        s.busy.remove(&0);
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(r.block, Some(settings.poll_interval));
    }

    #[test]
    fn a_reply_to_a_stale_request_does_not_move_a_cursor_sent_back_to_pending() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        let r = s.next_request(0, &settings).expect("a read");
        s.advance_cursors(&r, &[]);
        let stale = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&stale), vec![("a", ">")]);
        s.restart_from_pending();
        s.advance_cursors(&stale, &[batch("a", &["9-0"])]);
        assert_eq!(s.streams[0].cursor, Cursor::Pending("0".into()));
    }

    #[test]
    fn a_read_refused_for_one_stream_sends_the_others_back_to_their_pending_lists() {
        // From a cluster, the read of `b`'s slot may have handed out entries while `a`'s
        // group was missing: `b` reads its pending list before new entries again.
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a"), (0, "b")]);
        for st in &mut s.streams {
            st.cursor = Cursor::New;
        }
        let request = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&request), vec![("a", ">"), ("b", ">")]);
        // (What `take_reply` does with a Groups or NotStreams outcome, before the fixes.)
        s.reread_pending(&request);
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", "0"), ("b", "0")]);
    }

    #[test]
    fn each_database_reads_and_blocks_on_its_own() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a"), (3, "b"), (3, "c")]);
        for st in &mut s.streams {
            st.cursor = Cursor::New;
        }
        s.busy.insert(3);
        let r0 = s.next_request(0, &settings).expect("a read of db 0");
        let r3 = s.next_request(3, &settings).expect("a read of db 3");
        assert_eq!((r0.db, afters(&r0)), (0, vec![("a", ">")]));
        assert_eq!((r3.db, afters(&r3)), (3, vec![("b", ">"), ("c", ">")]));
        // db 0 is idle, db 3 is not: only db 0's read waits in Redis.
        assert_eq!((r0.block, r3.block), (Some(settings.poll_interval), None));
        assert!(s.next_request(5, &settings).is_none(), "nothing to read in db 5");
    }

    #[test]
    fn databases_turn_busy_with_entries_and_idle_when_a_shared_read_finds_none() {
        let mut s = sync_with(&[(0, "a"), (1, "b")]);
        // Re-reading pending entries: busy whatever the read found.
        let t0 = Instant::now();
        let z = Duration::ZERO;
        s.note_round(&[(1, 0)], true, t0, z);
        assert!(s.busy.contains(&1));
        for st in &mut s.streams {
            st.cursor = Cursor::New;
        }
        // The shared read found nothing in db 1: idle, its own read waits in Redis.
        s.note_round(&[(1, 0)], true, t0, z);
        assert!(!s.busy.contains(&1));
        // Its waiting read came back empty: still idle; with entries: busy.
        s.note_round(&[(1, 0)], false, t0, z);
        assert!(!s.busy.contains(&1));
        s.note_round(&[(1, 3)], false, t0, z);
        assert!(s.busy.contains(&1));
        assert!(!s.busy.contains(&0));
        // After a failure or a discovery every database starts over busy, pending first.
        s.restart_from_pending();
        assert_eq!(s.busy.iter().copied().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn a_quiet_database_rides_along_while_the_shared_read_finds_entries_elsewhere() {
        let mut s = sync_with(&[(0, "a"), (1, "b"), (2, "c")]);
        for st in &mut s.streams {
            st.cursor = Cursor::New;
        }
        s.busy.extend([0, 1, 2]);
        let t0 = Instant::now();
        let linger = super::linger(100);
        assert_eq!(linger, Duration::from_micros(37_500));
        // db 0 had entries, dbs 1 and 2 none: they stay in the shared read (no round trip
        // of their own, no token of the rate limit each time an entry wakes them).
        s.note_round(&[(0, 5), (1, 0), (2, 0)], true, t0, linger);
        assert_eq!(s.busy.iter().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
        // The shared read found nothing anywhere right after: still busy (one empty read
        // right after a full one says nothing about the traffic).
        let empty = [(0, 0), (1, 0), (2, 0)];
        s.note_round(&empty, true, t0 + Duration::from_millis(1), linger);
        assert_eq!(s.busy.len(), 3);
        // Nothing found anywhere for longer than `linger`: every database waits in Redis.
        s.note_round(&empty, true, t0 + linger, linger);
        assert!(s.busy.is_empty());
        // Unlimited rate: at once.
        s.busy.extend([0, 1, 2]);
        s.note_round(&[(0, 5), (1, 0), (2, 0)], true, t0, super::linger(0));
        s.note_round(&empty, true, t0, super::linger(0));
        assert!(s.busy.is_empty());
    }

    #[test]
    fn acknowledgements_wait_until_the_commit_is_on_disk() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        s.streams[0].cursor = Cursor::New;
        let mut table = Table { lsn: 100, ..Default::default() };
        assert_eq!(
            s.land(&mut table, vec![(0, vec![batch("a", &["1-0"])])], 1).result.ok(),
            Some(1)
        );
        // Committed (the row is there) but its WAL is not flushed yet: not acknowledged.
        let acks = |s: &mut StreamSync| s.next_request(0, &settings).map(|r| r.acks);
        assert_eq!(acks(&mut s), Some(vec![]));
        s.release_durable(99);
        assert_eq!(acks(&mut s), Some(vec![]));
        table.lsn = 200;
        assert_eq!(
            s.land(&mut table, vec![(0, vec![batch("a", &["2-0"])])], 2).result.ok(),
            Some(1)
        );
        // Flushed past the first commit only: its entries go with the next read.
        s.release_durable(150);
        assert_eq!(acks(&mut s), Some(vec![(b"a".to_vec(), vec!["1-0".to_owned()])]));
        assert_eq!(acks(&mut s), Some(vec![]));
        // A position older than one already seen moves nothing back.
        s.release_durable(120);
        assert_eq!(acks(&mut s), Some(vec![]));
        s.release_durable(200);
        assert_eq!(acks(&mut s), Some(vec![(b"a".to_vec(), vec!["2-0".to_owned()])]));
    }

    #[test]
    fn a_pending_re_read_drops_entries_landed_and_not_yet_acknowledged() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        s.streams[0].cursor = Cursor::New;
        let mut table = Table { lsn: 100, ..Default::default() };
        assert_eq!(
            s.land(&mut table, vec![(0, vec![batch("a", &["1-0"])])], 1).result.ok(),
            Some(1)
        );
        table.lsn = 0;
        assert_eq!(
            s.land(&mut table, vec![(0, vec![batch("a", &["2-0"])])], 1).result.ok(),
            Some(1)
        );
        // A discovery sends the stream back to its pending list: 1-0 (awaiting its flush) and
        // 2-0 (flushed, its acknowledgement not sent yet) come back with 3-0, never landed.
        let mut got = vec![batch("a", &["1-0", "2-0", "3-0"])];
        s.drop_known_landed(0, &mut got);
        assert_eq!(got[0].ids, vec!["3-0"]);
        assert_eq!(got[0].rows.iter().map(|r| r.message_id.as_str()).collect::<Vec<_>>(), ["3-0"]);
        assert_eq!(got[0].trimmed, 0);
        // Once acknowledged (sent with a read), they are no longer known.
        let _ = s.next_request(0, &settings);
        s.release_durable(100);
        let _ = s.next_request(0, &settings);
        let mut got = vec![batch("a", &["1-0", "2-0"])];
        s.drop_known_landed(0, &mut got);
        assert_eq!(got[0].ids.len(), 2);
    }

    #[test]
    fn many_streams_take_turns_unless_the_read_blocks() {
        let settings = Settings { batch_size: 5000, ..Settings::default() };
        let names: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
        let streams: Vec<(u8, &str)> = names.iter().map(|n| (0, n.as_str())).collect();
        let mut s = sync_with(&streams);
        for st in &mut s.streams {
            st.cursor = Cursor::New;
        }
        // 10,000 entries a read at most: two streams of COUNT 5000 per read, in turn.
        s.busy.insert(0);
        let firsts: Vec<String> = (0..3)
            .map(|_| s.next_request(0, &settings).expect("a read"))
            .map(|r| afters(&r).iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>().join(","))
            .collect();
        assert_eq!(firsts, vec!["s0,s1", "s2,s3", "s4,s0"]);
        s.busy.clear();
        // A blocking read covers them all, with COUNT lowered to keep the same bound.
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!((r.streams.len(), r.count), (5, 2000));
    }

    #[test]
    fn acknowledgements_of_a_database_no_longer_read_are_still_sent() {
        let settings = Settings::default();
        let mut s = sync_with(&[(2, "a")]);
        let mut table = Table::default();
        assert!(s.land(&mut table, vec![(2, vec![batch("a", &["1-0"])])], 1).result.is_ok());
        s.streams.clear();
        s.reindex();
        let r = s.next_request(2, &settings).expect("an acknowledgement");
        assert!(r.streams.is_empty());
        assert_eq!(r.acks, vec![(b"a".to_vec(), vec!["1-0".to_owned()])]);
        assert!(s.next_request(2, &settings).is_none());
    }

    #[test]
    fn one_write_for_the_reads_of_several_databases_acknowledges_each_in_its_own() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a"), (4, "b")]);
        let mut table = Table::default();
        let reads = vec![(0, vec![batch("a", &["1-0"])]), (4, vec![batch("b", &["7-0", "8-0"])])];
        assert_eq!(s.land(&mut table, reads, 1).result.ok(), Some(3));
        assert_eq!(table.rows, vec!["1-0", "7-0", "8-0"]);
        let acks = |s: &mut StreamSync, db| s.next_request(db, &settings).map(|r| r.acks);
        assert_eq!(acks(&mut s, 0), Some(vec![(b"a".to_vec(), vec!["1-0".to_owned()])]));
        assert_eq!(
            acks(&mut s, 4),
            Some(vec![(b"b".to_vec(), vec!["7-0".to_owned(), "8-0".to_owned()])])
        );
    }

    #[test]
    fn entries_deleted_while_pending_are_acknowledged_and_reported_lost() {
        let mut s = sync_with(&[(0, "a")]);
        let mut table = Table::default();
        // Three entries read from the pending list, one of them deleted from the stream
        // meanwhile (Redis sends its ID without fields).
        let mut b = batch("a", &["1-0", "2-0"]);
        b.ids.push("3-0".into());
        b.trimmed = 1;
        let landed = s.land(&mut table, vec![(0, vec![b])], 1);
        assert_eq!(landed.result.ok(), Some(3));
        assert_eq!(landed.lost, vec![(0, 1)]);
        assert_eq!(table.rows, vec!["1-0", "2-0"]);
        let r = s.next_request(0, &Settings::default()).expect("a read");
        assert_eq!(r.acks[0].1, vec!["1-0", "2-0", "3-0"]);
    }

    /// One read of stream "a" answered with `ids`: the cursors move, then the batch lands
    /// (the entries handled: landed or dead-lettered).
    fn read_and_land(s: &mut StreamSync, table: &mut Table, ids: &[&str]) -> Result<usize> {
        let settings = Settings::default();
        let r = s.next_request(0, &settings).expect("a read");
        let b = batch("a", ids);
        s.advance_cursors(&r, std::slice::from_ref(&b));
        let landed = s.land(table, vec![(0, vec![b])], 1);
        if landed.result.is_err() {
            s.restart_from_pending();
        }
        landed.result
    }

    #[test]
    fn a_lone_refused_entry_waits_in_redis_for_a_row_that_lands() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        s.streams[0].cursor = Cursor::New;
        let mut table = Table { bad: vec!["1-0".into()], ..Default::default() };
        // Alone, refused: the table's refusal as far as anyone can tell. Not dead-lettered,
        // not acknowledged; the pending list is read again.
        assert!(read_and_land(&mut s, &mut table, &["1-0"]).is_err_and(|e| e.is_refusal()));
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", "0")]);
        assert!(r.acks.is_empty());
        // Refused again from the pending list: no news, so not a failure of the lane (the
        // other streams' reads go on); new entries are read next, and the pending list
        // again a few seconds later, new entries or not.
        assert_eq!(read_and_land(&mut s, &mut table, &["1-0"]).ok(), Some(0));
        assert_eq!(afters(&s.next_request(0, &settings).expect("a read")), vec![("a", ">")]);
        assert!(table.dead.is_empty());
        let t0 = Instant::now();
        s.retry_held(t0);
        assert_eq!(afters(&s.next_request(0, &settings).expect("a read")), vec![("a", ">")]);
        s.retry_held(t0 + RETRY_HELD);
        assert_eq!(afters(&s.next_request(0, &settings).expect("a read")), vec![("a", "0")]);
        assert_eq!(read_and_land(&mut s, &mut table, &["1-0"]).ok(), Some(0));
        assert_eq!(afters(&s.next_request(0, &settings).expect("a read")), vec![("a", ">")]);
        assert!(s.next_request(0, &settings).is_some_and(|r| r.acks.is_empty()));
        // A new entry lands: the table takes rows, so the pending list is read again, and
        // the refused entry now goes to dead letters.
        assert_eq!(read_and_land(&mut s, &mut table, &["2-0"]).ok(), Some(1));
        assert_eq!(afters(&s.next_request(0, &settings).expect("a read")), vec![("a", "0")]);
        assert_eq!(read_and_land(&mut s, &mut table, &["1-0"]).ok(), Some(1));
        assert_eq!(table.dead, vec!["1-0"]);
        assert_eq!(table.rows, vec!["2-0"]);
        // The pending list read through: the next refusal needs proof again.
        assert_eq!(read_and_land(&mut s, &mut table, &[]).ok(), Some(0));
        assert!(!s.streams[0].proven);
    }

    #[test]
    fn entries_held_for_lack_of_dead_letter_room_wait_in_redis_and_are_read_again() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        s.streams[0].cursor = Cursor::New;
        let mut table = Table { bad: vec!["2-0".into()], full: true, ..Default::default() };
        // 1-0 and 3-0 land and are acknowledged; 2-0 is held, not acknowledged.
        assert_eq!(read_and_land(&mut s, &mut table, &["1-0", "2-0", "3-0"]).ok(), Some(2));
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(r.acks, vec![(b"a".to_vec(), vec!["1-0".to_owned(), "3-0".to_owned()])]);
        assert_eq!(afters(&r), vec![("a", ">")]);
        // A few seconds later the pending list is read again; with room now, the held entry
        // goes to dead letters (its refusal was shown to be its own), without a probe.
        let t0 = Instant::now();
        s.retry_held(t0);
        s.retry_held(t0 + RETRY_HELD);
        assert_eq!(afters(&s.next_request(0, &settings).expect("a read")), vec![("a", "0")]);
        table.full = false;
        assert_eq!(read_and_land(&mut s, &mut table, &["2-0"]).ok(), Some(1));
        assert_eq!(table.dead, vec!["2-0"]);
        // The walk of the pending list ends with nothing held: the proof is spent.
        assert!(s.streams[0].held_back);
        assert_eq!(read_and_land(&mut s, &mut table, &[]).ok(), Some(0));
        assert!(!s.streams[0].held_back);
    }

    #[test]
    fn a_stream_left_out_of_reads_does_not_keep_its_database_busy() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a"), (0, "b")]);
        s.streams[1].unreadable = true;
        s.streams[1].state = StreamState::Error;
        s.restart_from_pending();
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", "0")]);
        s.advance_cursors(&r, &[]);
        s.note_busy(0, 0, true);
        // Only "a" is read, and, with nothing pending, the read waits in Redis.
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", ">")]);
        assert!(r.block.is_some());
    }

    #[test]
    fn only_committed_entries_are_acknowledged() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        let mut table = Table::default();
        assert_eq!(
            s.land(&mut table, vec![(0, vec![batch("a", &["1-0", "2-0"])])], 1).result.ok(),
            Some(2)
        );
        // The write of the next batch fails: nothing of it is queued for XACK, and the
        // stream says why.
        table.fail = true;
        assert!(s.land(&mut table, vec![(0, vec![batch("a", &["3-0"])])], 2).result.is_err());
        assert_eq!(s.streams[0].state, StreamState::Error);
        assert_eq!(s.streams[0].messages_synced, 2);
        // After the failure the worker re-reads from its pending list: the next read starts
        // at 0 and carries the acknowledgements of the committed batch only.
        s.restart_from_pending();
        let r = s.next_request(0, &settings).expect("a read");
        assert_eq!(afters(&r), vec![("a", "0")]);
        assert_eq!(r.acks, vec![(b"a".to_vec(), vec!["1-0".to_owned(), "2-0".to_owned()])]);
        assert!(s.next_request(0, &settings).is_some_and(|r| r.acks.is_empty()));
        assert_eq!(table.rows, vec!["1-0", "2-0"]);
    }
}
