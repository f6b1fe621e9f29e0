//! One key-value pass: start (what the memory may be trusted for), a page at a time from
//! the scanner thread (compare, write what changed, remember what committed), and the finish
//! (the deletion check, only after a complete pass against the same Redis server).

use std::time::Instant;

use super::memory::{fingerprint, fingerprint_of, pack, pass_of, Memory, NO_FINGERPRINT};
use super::rows::{key_row, report_refused, MIRRORED};
use super::scanner::{Scanner, SCAN_COUNT};
use super::writer::{KvTarget, KvWriter};
use super::KeySync;
use crate::encode::decode_name;
use crate::error::Result;
use crate::gucs::{KeyValueDeletes, Settings};
use crate::parse::Pattern;
use crate::redis::Redis;
use crate::shmem;

/// Live keys read from the table per step of the deletion check.
const CHECK_CHUNK: i64 = 10_000;

/// What the memory was built against: when any of it differs, the memory is void.
#[derive(Clone, PartialEq, Debug)]
pub(super) struct Basis {
    run_id: String,
    table: (i64, i64),
}

pub(super) struct Pass {
    /// Pages still to come from the scanner thread.
    pub(super) scanning: bool,
    pub(super) patterns: Vec<Pattern>,
    /// This pass's number: a key whose memory carries it was seen by this pass.
    pub(super) number: u16,
    /// Unchanged fingerprints may skip Postgres (false on a verifying pass).
    pub(super) trusted: bool,
    pub(super) basis: Basis,
    pub(super) started: Instant,
    pub(super) written: usize,
    pub(super) keys: usize,
    /// Set once every SCAN is done and Redis is still the same server: the table's live keys
    /// are then walked a chunk per step to find the ones the pass did not see.
    pub(super) finishing: Option<Finish>,
}

pub(super) struct Finish {
    db_index: usize,
    after: Option<String>,
    missing: Vec<(u8, String)>,
}

/// What a pass found, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PassSummary {
    pub keys: usize,
    pub written: usize,
    pub gone: usize,
    pub complete: bool,
}

impl KeySync {
    pub(super) fn start(
        &mut self,
        redis: &mut Redis,
        writer: &mut KvWriter,
        target: &KvTarget,
        s: &Settings,
        now: Instant,
    ) -> Result<()> {
        let mut table = writer.table_identity()?;
        if table.is_none() {
            // Dropped since the statements were prepared: create it again.
            writer.reset();
            writer.prepare(target)?;
            table = writer.table_identity()?;
        }
        let basis = Basis { run_id: redis.run_id()?, table: table.unwrap_or_default() };
        let verify_due =
            self.verified.is_none_or(|t| now.duration_since(t) >= s.key_value_verify_interval);
        self.number = self.number.wrapping_add(1);
        if self.number == 0 {
            // Pass numbers wrapped: an old mark could pass for this pass's.
            self.basis = None;
            self.number = 1;
        }
        let trusted = !verify_due && self.basis.as_ref() == Some(&basis);
        if self.basis.as_ref() != Some(&basis) {
            self.memory = Memory::default();
            self.basis = None;
        }
        let patterns: Vec<Pattern> = s.key_value_patterns.iter().map(|p| Pattern::new(p)).collect();
        let globs = crate::parse::redis_globs(&patterns);
        let jobs = s
            .db_search_range
            .iter()
            .flat_map(|&db| globs.iter().map(move |g| (db, g.clone())))
            .collect();
        let scanner = match self.scanner.as_mut() {
            Some(scanner) => scanner,
            None => self.scanner.insert(Scanner::start()?),
        };
        scanner.begin(&s.redis, jobs, patterns.clone())?;
        self.event_times.clear();
        self.pass = Some(Pass {
            scanning: true,
            patterns,
            number: self.number,
            trusted,
            basis,
            started: now,
            written: 0,
            keys: 0,
            finishing: None,
        });
        Ok(())
    }

    pub(super) fn page(
        &mut self,
        redis: &mut Redis,
        writer: &mut KvWriter,
        s: &Settings,
        tick: &dyn Fn(),
    ) -> Result<Option<PassSummary>> {
        let Some(pass) = self.pass.as_mut() else { return Ok(None) };
        let page = match (pass.scanning, self.scanner.as_mut()) {
            (true, Some(scanner)) => scanner.next(tick)?,
            _ => None,
        };
        let Some(page) = page else {
            pass.scanning = false;
            let summary = self.finish(redis, writer, s)?;
            return Ok(self.pass.is_none().then_some(summary));
        };
        // The scanner made these round trips without the rate limit: pay for them here.
        for _ in 0..page.round_trips {
            redis.take_token();
        }
        let db = page.db;
        let number = pass.number;
        let trusted = pass.trusted;
        let mut rows = Vec::new();
        let mut pending = Vec::new();
        let mut keys = 0;
        for (key, (ty, expires, value)) in page.keys.iter().zip(page.metas) {
            // Streams belong to stream sync; no value means the key vanished meanwhile.
            let Some(value) = value else { continue };
            let fingerprint = fingerprint(&ty, expires, &value);
            let id = self.ids.id(db, key);
            if self.event_times.get(&id).is_some_and(|t| *t >= page.fetched_at) {
                // A notification synced this key after the page was fetched: the table is
                // newer than this value. Seen if it still exists; if it went, the deletion
                // check confirms that with Redis.
                if let Some(v) = self.memory.get_mut(&id) {
                    *v = pack(fingerprint_of(*v), number);
                    keys += 1;
                }
                continue;
            }
            // One lookup per key: the memory of a million keys does not fit in a CPU cache,
            // so every lookup is a cache miss.
            if let Some(v) = self.memory.get_mut(&id) {
                if trusted && fingerprint_of(*v) == fingerprint {
                    *v = pack(fingerprint, number);
                    keys += 1;
                    continue;
                }
            }
            let Some(row) = key_row(key, &ty, expires, value) else { continue };
            keys += 1;
            rows.push(row);
            pending.push((id, fingerprint));
        }
        let Some(pass) = self.pass.as_mut() else { return Ok(None) };
        pass.keys += keys;
        let mut refused = Vec::new();
        let written = writer.upsert_isolating(db, &rows, &mut refused)?;
        // Remembered below like the others, so an unchanged refused key is not tried (and
        // reported) again until it changes or a verifying pass comes.
        report_refused(db, &rows, &refused);
        // Only now, with the rows committed, does the memory vouch for them.
        for (id, fingerprint) in pending {
            self.memory.insert(id, pack(fingerprint, number));
        }
        pass.written += written;
        if written > 0 {
            shmem::bump(|c| &c.key_values_processed, written as u64);
            let now = shmem::now();
            shmem::update(|st| st.last_sync_time = now);
        }
        Ok(None)
    }

    /// Every SCAN is done. The deletion check runs a step at a time: first whether one is
    /// needed at all, then the table's live keys a chunk per step, then the keys the pass
    /// did not see, confirmed gone with Redis, get the deletion policy.
    fn finish(
        &mut self,
        redis: &mut Redis,
        writer: &mut KvWriter,
        s: &Settings,
    ) -> Result<PassSummary> {
        let Some(pass) = self.pass.as_ref() else { return Ok(PassSummary::default()) };
        if pass.finishing.is_none() {
            if let Some(summary) = self.begin_finish(redis, s)? {
                return Ok(summary);
            }
        }
        if self.walk_live_chunk(writer, s)? {
            // More of the table to walk at the next step.
            return Ok(PassSummary::default());
        }
        let gone = self.apply_gone(redis, writer, s)?;
        Ok(self.close(s, true, gone))
    }

    /// Decides whether a deletion check is needed. Redis must be the same server as at the
    /// start (a restart during the pass proves nothing about what is gone); when every key
    /// remembered from the last complete pass was seen again, nothing can be gone. Returns
    /// the pass's summary when it ends here.
    fn begin_finish(&mut self, redis: &mut Redis, s: &Settings) -> Result<Option<PassSummary>> {
        let Some(pass) = self.pass.as_ref() else { return Ok(Some(PassSummary::default())) };
        let number = pass.number;
        if redis.run_id()? != pass.basis.run_id {
            self.basis = None;
            return Ok(Some(self.close(s, false, 0)));
        }
        let unseen = self.memory.values().filter(|v| pass_of(**v) != number).count();
        let walk = s.key_value_deletes != KeyValueDeletes::Ignore && !(pass.trusted && unseen == 0);
        if !walk {
            return Ok(Some(self.close(s, true, 0)));
        }
        if let Some(p) = self.pass.as_mut() {
            p.finishing = Some(Finish { db_index: 0, after: None, missing: Vec::new() });
        }
        Ok(None)
    }

    /// Reads the next chunk of the table's live keys (keyset pagination on the unique
    /// index) and notes those in scope that the pass did not see. Returns whether there is
    /// more to walk.
    fn walk_live_chunk(&mut self, writer: &mut KvWriter, s: &Settings) -> Result<bool> {
        let Some(pass) = self.pass.as_ref() else { return Ok(false) };
        let Some(fin) = pass.finishing.as_ref() else { return Ok(false) };
        let Some(&db) = s.db_search_range.get(fin.db_index) else { return Ok(false) };
        let number = pass.number;
        let names = writer.live_keys_chunk(db, fin.after.as_deref(), CHECK_CHUNK)?;
        let mut missing = Vec::new();
        for name in &names {
            // Only keys this pass was looking for: a key outside the patterns is not
            // "gone" (nor is a name this extension did not write).
            let Some(bytes) = decode_name(name) else { continue };
            if !pass.patterns.iter().any(|p| p.matches(&bytes)) {
                continue;
            }
            let id = self.ids.id(db, &bytes);
            if self.memory.get(&id).is_some_and(|v| pass_of(*v) == number) {
                continue;
            }
            missing.push((db, name.clone()));
        }
        let Some(fin) = self.pass.as_mut().and_then(|p| p.finishing.as_mut()) else {
            return Ok(false);
        };
        fin.missing.extend(missing);
        if (names.len() as i64) < CHECK_CHUNK {
            fin.db_index += 1;
            fin.after = None;
        } else {
            fin.after = names.last().cloned();
        }
        Ok(true)
    }

    /// The keys the pass did not see: a key created after SCAN went past its slot is not
    /// gone, so Redis is asked (`TYPE`); the rest get the deletion policy. Returns the rows
    /// touched.
    fn apply_gone(
        &mut self,
        redis: &mut Redis,
        writer: &mut KvWriter,
        s: &Settings,
    ) -> Result<usize> {
        let Some(pass) = self.pass.as_mut() else { return Ok(0) };
        let number = pass.number;
        let missing =
            pass.finishing.as_mut().map(|f| std::mem::take(&mut f.missing)).unwrap_or_default();
        let delete = s.key_value_deletes == KeyValueDeletes::Delete;
        let mut gone = 0;
        let mut i = 0;
        while i < missing.len() {
            let db = missing[i].0;
            let names: Vec<String> = missing[i..]
                .iter()
                .take_while(|(d, _)| *d == db)
                .take(SCAN_COUNT as usize)
                .map(|(_, n)| n.clone())
                .collect();
            i += names.len();
            // (A key that became a stream or another type not mirrored here is gone.)
            let bytes: Vec<Vec<u8>> =
                names.iter().map(|n| decode_name(n).unwrap_or_default()).collect();
            let types = redis.key_types(db, &bytes)?;
            let mut really_gone = Vec::new();
            for ((name, key), ty) in names.into_iter().zip(&bytes).zip(types) {
                if MIRRORED.contains(&ty.as_str()) {
                    // Still there: remembered as seen, with a fingerprint nothing matches, so
                    // the next pass compares it with the table (and a later deletion of it is
                    // looked for).
                    let id = self.ids.id(db, key);
                    self.memory.insert(id, pack(NO_FINGERPRINT, number));
                } else {
                    really_gone.push(name);
                }
            }
            gone += writer.gone(db, &really_gone, delete)?;
        }
        if gone > 0 {
            shmem::bump(|c| &c.key_values_processed, gone as u64);
        }
        Ok(gone)
    }

    fn close(&mut self, s: &Settings, complete: bool, gone: usize) -> PassSummary {
        let Some(pass) = self.pass.take() else { return PassSummary::default() };
        self.next_pass = pass.started + s.sync_interval;
        shmem::bump(|c| &c.key_value_passes, 1);
        if complete {
            // Keys not seen are gone (or out of scope): forget them. The memory now holds
            // every live key of the table in scope.
            let number = pass.number;
            self.memory.retain(|_, v| pass_of(*v) == number);
            self.basis = Some(pass.basis);
            if !pass.trusted {
                self.verified = Some(pass.started);
            }
        }
        PassSummary { keys: pass.keys, written: pass.written, gone, complete }
    }
}
