//! One round of stream sync: take the reply of the read in flight (or read now), start the
//! next read when it cannot depend on this one, write the batch in one transaction, and
//! queue its acknowledgements for after the commit.
//!
//! The bookkeeping that exactly-once rests on is plain code, tested without Postgres or
//! Redis: which read comes next ([`StreamSync::next_request`]), how cursors move on a reply
//! ([`StreamSync::advance_cursors`]), and that only committed entries are acknowledged
//! ([`StreamSync::land`]).

use super::reader::{ReadRequest, ReadStream, Reader, StreamBatch};
use super::writer::{StreamRow, Target};
use super::{Cursor, StreamSync};
use crate::error::Result;
use crate::gucs::Settings;
use crate::redis::Redis;
use crate::shmem::{self, StreamState};
use crate::worker::Log;

/// At most this many entries are asked for in one read (COUNT is per stream, so fewer
/// streams go in one call when the batch size is large): memory stays bounded by settings.
const MAX_ENTRIES_PER_READ: u32 = 2_000;
/// What one read may bring back, roughly: COUNT is lowered for streams of large entries so
/// a read of huge values cannot take the worker's memory with it (two reads are in memory at
/// most, each held twice: as rows and as COPY text).
const READ_BYTES_BUDGET: usize = 16 << 20;

/// Where a batch's rows go: the stream-table writer, or a stand-in in unit tests.
pub trait BatchWriter {
    /// Writes the rows in one transaction; returns how many were dead-lettered.
    fn write(&mut self, rows: &[StreamRow], copy: &[Vec<u8>]) -> Result<usize>;
    /// Forgets prepared statements after a failure.
    fn reset(&mut self);
}

impl BatchWriter for super::StreamWriter {
    fn write(&mut self, rows: &[StreamRow], copy: &[Vec<u8>]) -> Result<usize> {
        super::StreamWriter::write(self, rows, copy)
    }
    fn reset(&mut self) {
        super::StreamWriter::reset(self)
    }
}

impl StreamSync {
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

    /// The next read: the streams of the next database in turn (round-robin within it when
    /// they do not all fit in one read), each from its cursor, carrying the acknowledgements
    /// of that database's committed entries. Blocks for up to `poll_interval` only when the
    /// previous read found nothing and no stream is re-reading its pending entries.
    pub(super) fn next_request(&mut self, s: &Settings, idle: bool) -> Option<ReadRequest> {
        let groups = self.by_db();
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

    /// Moves cursors after a reply: a pending re-read goes on after its last entry, or
    /// switches to new entries once it comes back empty. A cursor moved elsewhere since the
    /// request was made (a reconnect sent it back to `0`) is left alone.
    pub(super) fn advance_cursors(&mut self, request: &ReadRequest, batches: &[StreamBatch]) {
        let db = request.db;
        for asked in &request.streams {
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
    }

    /// Keeps the moving average of entry sizes that the read budget uses, and whether the
    /// read found nothing.
    fn note_reply(&mut self, batches: &[StreamBatch]) {
        let entries: usize = batches.iter().map(|b| b.ids.len()).sum();
        self.idle = entries == 0;
        let bytes: usize = batches.iter().map(|b| b.copy.len()).sum();
        if let Some(avg) = bytes.checked_div(entries) {
            self.avg_entry_bytes = (self.avg_entry_bytes * 3 + avg) / 4;
        }
    }

    /// One round (see the module comment). Returns the entries handled.
    pub fn step(
        &mut self,
        redis: &mut Redis,
        reader: &mut Reader,
        writer: &mut super::StreamWriter,
        s: &Settings,
        log: &Log,
        tick: &dyn Fn(),
    ) -> Result<usize> {
        let target = Target {
            schema: s.schema.clone(),
            stream_table: s.stream_table.clone(),
            overwrite: s.stream_conflict_overwrite,
        };
        if let Err(e) = writer.prepare(&target) {
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
        let batches = match reply.result {
            Ok(b) => b,
            Err(e) if e.is_nogroup() => {
                reader.discard(tick);
                let db = reply.request.db;
                let idx: Vec<usize> = reply
                    .request
                    .streams
                    .iter()
                    .filter_map(|r| self.index.get(&(db, r.key.clone())).copied())
                    .collect();
                self.recreate_groups(redis, db, &idx, s, log)?;
                return Ok(0);
            }
            Err(e) => {
                reader.discard(tick);
                self.restart_from_pending();
                return Err(e);
            }
        };
        self.advance_cursors(&reply.request, &batches);
        self.note_reply(&batches);
        // Read ahead while this batch is written, when the next read cannot depend on it.
        if self.streams.iter().all(|t| t.cursor == Cursor::New) {
            if let Some(next) = self.next_request(s, self.idle) {
                redis.take_token();
                reader.send(next)?;
            }
        }
        let now = shmem::now();
        let landed = self.land(writer, reply.request.db, batches, now);
        self.publish_landed(&landed, now);
        match landed.result {
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
        log: &Log,
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
                    log.warning(&format!("stream \"{}\": {}", t.stream_key, t.last_error));
                }
                continue;
            }
            match redis.create_group(db, &t.key, &s.consumer_group, t.configured) {
                Ok(true) => {
                    log.warning(&format!(
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
            gone.sort_unstable();
            for i in gone.into_iter().rev() {
                self.streams.remove(i);
            }
            self.reindex();
            self.publish_all();
        }
        Ok(())
    }

    /// Writes the rows of one read of database `db` in one transaction. Only when it
    /// committed are the entries queued for acknowledgement (with the next read of `db`);
    /// when it failed, nothing is queued: the entries stay in our pending list and are read
    /// again from there once Postgres takes them. `now` is the Postgres timestamp recorded
    /// as the streams' last sync time. Plain bookkeeping: what it changed is published by
    /// the caller.
    pub(super) fn land(
        &mut self,
        writer: &mut impl BatchWriter,
        db: u8,
        batches: Vec<StreamBatch>,
        now: i64,
    ) -> Landed {
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
        let touched: Vec<usize> = acks.iter().map(|(i, _)| *i).collect();
        if acks.is_empty() {
            return Landed { result: Ok(0), touched };
        }
        if let Err(e) = writer.write(&rows, &copy) {
            for (i, _) in &acks {
                let t = &mut self.streams[*i];
                t.state = StreamState::Error;
                t.last_error = e.to_string();
            }
            writer.reset();
            return Landed { result: Err(e), touched };
        }
        drop(rows);
        drop(copy);
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
        let stash = self.unacked.entry(db).or_default();
        for (i, ids) in acks {
            stash.push((self.streams[i].key.clone(), ids));
        }
        Landed { result: Ok(handled), touched }
    }

    /// Publishes what [`StreamSync::land`] changed: the streams' figures and the counters.
    fn publish_landed(&self, landed: &Landed, now: i64) {
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
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::error::SyncError;
    use crate::streams::Tracked;

    /// Stands in for the stream table: refuses every write while `fail` is set.
    #[derive(Default)]
    struct Table {
        fail: bool,
        rows: Vec<String>,
    }

    impl BatchWriter for Table {
        fn write(&mut self, rows: &[StreamRow], _copy: &[Vec<u8>]) -> Result<usize> {
            if self.fail {
                return Err(SyncError::Config("refused".into()));
            }
            self.rows.extend(rows.iter().map(|r| r.message_id.clone()));
            Ok(0)
        }
        fn reset(&mut self) {}
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
                })
                .collect(),
            copy: Vec::new(),
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
        let r = s.next_request(&settings, false).expect("a read");
        assert_eq!(afters(&r), vec![("a", "0"), ("b", "0")]);
        // `a` still had pending entries, `b` none: `a` goes on after its last one.
        s.advance_cursors(&r, &[batch("a", &["1-0", "2-0"])]);
        let r = s.next_request(&settings, false).expect("a read");
        assert_eq!(afters(&r), vec![("a", "2-0"), ("b", ">")]);
        s.advance_cursors(&r, &[]);
        let r = s.next_request(&settings, true).expect("a read");
        assert_eq!(afters(&r), vec![("a", ">"), ("b", ">")]);
        // Only now, idle with nothing pending, may the read block.
        assert_eq!(r.block, Some(settings.poll_interval));
    }

    #[test]
    fn a_reply_to_a_stale_request_does_not_move_a_cursor_sent_back_to_pending() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        let r = s.next_request(&settings, false).expect("a read");
        s.advance_cursors(&r, &[]);
        let stale = s.next_request(&settings, false).expect("a read");
        assert_eq!(afters(&stale), vec![("a", ">")]);
        s.restart_from_pending();
        s.advance_cursors(&stale, &[batch("a", &["9-0"])]);
        assert_eq!(s.streams[0].cursor, Cursor::Pending("0".into()));
    }

    #[test]
    fn reads_take_databases_in_turn_and_never_block_across_several() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a"), (3, "b")]);
        s.restart_from_pending();
        for st in &mut s.streams {
            st.cursor = Cursor::New;
        }
        let dbs: Vec<u8> =
            (0..4).filter_map(|_| s.next_request(&settings, true)).map(|r| r.db).collect();
        assert_eq!(dbs, vec![0, 3, 0, 3]);
        assert!(s.next_request(&settings, true).is_some_and(|r| r.block.is_none()));
    }

    #[test]
    fn only_committed_entries_are_acknowledged() {
        let settings = Settings::default();
        let mut s = sync_with(&[(0, "a")]);
        let mut table = Table::default();
        assert_eq!(
            s.land(&mut table, 0, vec![batch("a", &["1-0", "2-0"])], 1).result.ok(),
            Some(2)
        );
        // The write of the next batch fails: nothing of it is queued for XACK, and the
        // stream says why.
        table.fail = true;
        assert!(s.land(&mut table, 0, vec![batch("a", &["3-0"])], 2).result.is_err());
        assert_eq!(s.streams[0].state, StreamState::Error);
        assert_eq!(s.streams[0].messages_synced, 2);
        // After the failure the worker re-reads from its pending list: the next read starts
        // at 0 and carries the acknowledgements of the committed batch only.
        s.restart_from_pending();
        let r = s.next_request(&settings, false).expect("a read");
        assert_eq!(afters(&r), vec![("a", "0")]);
        assert_eq!(r.acks, vec![(b"a".to_vec(), vec!["1-0".to_owned(), "2-0".to_owned()])]);
        assert!(s.next_request(&settings, false).is_some_and(|r| r.acks.is_empty()));
        assert_eq!(table.rows, vec!["1-0", "2-0"]);
    }
}
