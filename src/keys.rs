//! Key-value sync: every key matching `key_value_patterns` in every database of
//! `db_search_range` is mirrored into the key-value table, pass after pass, one SCAN page at
//! a time (so stream sync keeps going during a long pass). Values of a page are fetched in
//! pipelined round trips (an `MGET` and the expiries, then the other types); only keys whose
//! value, type or expiry changed are written. Keys gone from Redis are handled by
//! `key_value_deletes`, and only after a complete pass against the same Redis server.
//!
//! Between passes the worker remembers a fingerprint of every key it mirrored (24 bytes a
//! key in a hash table, up to twice that with its spare room). A key whose fingerprint is unchanged is not sent to Postgres at all, and
//! when every remembered key was seen again no deletion check is needed: an idle pass costs
//! the Redis reads and nothing else. The memory is trusted only while the Redis server
//! (its run ID), the table (its oid and relfilenode: a TRUNCATE or a re-created table voids
//! it) and the scope are those it was built with, and at least every
//! `key_value_verify_interval` a pass compares every key with the table again.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

use ::redis::Value;

use crate::encode::{decode_name, encode_name, value_text, Value as Val};
use crate::error::Result;
use crate::gucs::{KeyValueDeletes, Settings};
use crate::parse::Pattern;
use crate::redis::{bulk_list, Redis};
use crate::scanner::{fetch, Scanner, SCAN_COUNT};
use crate::shmem;
use crate::sink::{KeyRow, KvSink, KvTarget};

/// Live keys read from the table per step of the deletion check.
const CHECK_CHUNK: i64 = 10_000;

/// A key in memory: a 128-bit keyed hash of its database and name.
#[derive(Clone, Copy, PartialEq, Eq)]
struct KeyId(u64, u64);

impl Hash for KeyId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: its first half is a good bucket index as it is.
        state.write_u64(self.0);
    }
}

/// The hasher of [`KeyId`]s: passes the first half through.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Per key: a 48-bit fingerprint of what the table holds for it, and the 16-bit number of
/// the last pass that saw it (packed in one word: 24 bytes a key with the id).
type Memory = HashMap<KeyId, u64, BuildHasherDefault<IdHasher>>;

fn pack(fingerprint: u64, pass: u16) -> u64 {
    fingerprint << 16 | u64::from(pass)
}

fn pass_of(v: u64) -> u16 {
    v as u16
}

fn fingerprint_of(v: u64) -> u64 {
    v >> 16
}

/// What the memory was built against: when any of it differs, the memory is void.
#[derive(Clone, PartialEq, Debug)]
struct Basis {
    run_id: String,
    table: (i64, i64),
}

struct Pass {
    /// Pages still to come from the scanner thread.
    scanning: bool,
    patterns: Vec<Pattern>,
    /// This pass's number: a key whose memory carries it was seen by this pass.
    number: u16,
    /// Unchanged fingerprints may skip Postgres (false on a verifying pass).
    trusted: bool,
    basis: Basis,
    started: Instant,
    written: usize,
    keys: usize,
    /// Set once every SCAN is done and Redis is still the same server: the table's live keys
    /// are then walked a chunk per step to find the ones the pass did not see.
    finishing: Option<Finish>,
}

struct Finish {
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

pub struct KeySync {
    pass: Option<Pass>,
    next_pass: Instant,
    memory: Memory,
    /// Set when a complete pass left `memory` holding every live key of the table in scope.
    basis: Option<Basis>,
    /// Number of the last pass started.
    number: u16,
    /// Start of the last pass that compared every key with the table.
    verified: Option<Instant>,
    ids: RandomState,
    /// Runs the SCANs and fetches values a page or two ahead; started on first use.
    scanner: Option<Scanner>,
    /// Keys a notification synced during the pass under way, and when: a page fetched
    /// before that is older than the table for them.
    event_times: HashMap<KeyId, Instant, BuildHasherDefault<IdHasher>>,
}

impl Default for KeySync {
    fn default() -> Self {
        KeySync {
            pass: None,
            next_pass: Instant::now(),
            memory: Memory::default(),
            basis: None,
            number: 0,
            verified: None,
            ids: RandomState::new(),
            scanner: None,
            event_times: HashMap::default(),
        }
    }
}

impl KeySync {
    fn key_id(&self, db: u8, name: &[u8]) -> KeyId {
        KeyId(self.ids.hash_one((0u8, db, name)), self.ids.hash_one((1u8, db, name)))
    }

    /// Is a pass under way (the worker then does not block on stream reads)?
    pub fn busy(&self) -> bool {
        self.pass.is_some()
    }

    /// Time until the next pass starts.
    pub fn until_next_pass(&self) -> Duration {
        self.next_pass.saturating_duration_since(Instant::now())
    }

    /// Starts the next pass now (events may have been missed).
    pub fn pass_now(&mut self) {
        self.next_pass = Instant::now();
    }

    /// Drops the pass under way and what is remembered (new settings: another scope or
    /// table): nothing is marked deleted from an incomplete pass.
    pub fn abandon(&mut self) {
        self.drop_pass();
        self.basis = None;
        self.memory = Memory::default();
    }

    /// Ends the pass under way without a verdict; the scanner stops at its next page.
    fn drop_pass(&mut self) {
        self.pass = None;
        self.event_times.clear();
        if let Some(scanner) = self.scanner.as_mut() {
            scanner.cancel();
        }
    }

    /// Does one page of work. Returns the summary when a pass finished. `tick` is called
    /// every 100 ms while waiting for the scanner thread.
    pub fn step(
        &mut self,
        redis: &mut Redis,
        sink: &mut KvSink,
        s: &Settings,
        tick: &dyn Fn(),
    ) -> Result<Option<PassSummary>> {
        if !s.key_value_auto_discovery || s.key_value_patterns.is_empty() {
            self.drop_pass();
            return Ok(None);
        }
        if self.pass.is_none() && Instant::now() < self.next_pass {
            return Ok(None);
        }
        let target = KvTarget { schema: s.schema.clone(), table: s.key_value_table.clone() };
        sink.prepare(&target)?;
        let outcome = match self.pass {
            None => self.start(redis, sink, &target, s).map(|()| None),
            Some(_) => self.page(redis, sink, s, tick),
        };
        if let Err(e) = &outcome {
            // What was written stays remembered; what failed was not recorded as written.
            self.drop_pass();
            if matches!(e, crate::error::SyncError::ThreadStopped(_)) {
                self.scanner = None;
            }
            self.next_pass = Instant::now() + s.sync_interval;
        }
        outcome
    }

    fn start(
        &mut self,
        redis: &mut Redis,
        sink: &mut KvSink,
        target: &KvTarget,
        s: &Settings,
    ) -> Result<()> {
        let mut table = sink.table_identity()?;
        if table.is_none() {
            // Dropped since the statements were prepared: create it again.
            sink.reset();
            sink.prepare(target)?;
            table = sink.table_identity()?;
        }
        let basis = Basis { run_id: redis.run_id()?, table: table.unwrap_or_default() };
        let verify_due = self.verified.is_none_or(|t| t.elapsed() >= s.key_value_verify_interval);
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
        let globs: Vec<Vec<u8>> = if patterns.iter().any(|p| p.as_str() == "*") {
            vec![b"*".to_vec()]
        } else {
            patterns.iter().map(Pattern::to_redis_glob).collect()
        };
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
            started: Instant::now(),
            written: 0,
            keys: 0,
            finishing: None,
        });
        Ok(())
    }

    fn page(
        &mut self,
        redis: &mut Redis,
        sink: &mut KvSink,
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
            let summary = self.finish(redis, sink, s)?;
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
            let id = self.key_id(db, key);
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
        let written = sink.upsert_isolating(db, &rows, &mut refused)?;
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

    /// Every SCAN is done. Check that Redis is the same server as at the start (a restart
    /// during the pass proves nothing about what is gone). If every key remembered from the
    /// last complete pass was seen again, nothing can be gone; otherwise walk the table's
    /// live keys a chunk per step, and apply the deletion policy to keys the pass did not
    /// see and that Redis confirms are gone.
    fn finish(
        &mut self,
        redis: &mut Redis,
        sink: &mut KvSink,
        s: &Settings,
    ) -> Result<PassSummary> {
        let Some(pass) = self.pass.as_ref() else { return Ok(PassSummary::default()) };
        let number = pass.number;
        if pass.finishing.is_none() {
            let same_server = redis.run_id()? == pass.basis.run_id;
            if !same_server {
                self.basis = None;
                return Ok(self.close(s, false, 0));
            }
            let unseen = self.memory.values().filter(|v| pass_of(**v) != number).count();
            let walk =
                s.key_value_deletes != KeyValueDeletes::Ignore && !(pass.trusted && unseen == 0);
            if !walk {
                return Ok(self.close(s, true, 0));
            }
            if let Some(p) = self.pass.as_mut() {
                p.finishing = Some(Finish { db_index: 0, after: None, missing: Vec::new() });
            }
        }
        let Some(pass) = self.pass.as_ref() else { return Ok(PassSummary::default()) };
        let Some(fin) = pass.finishing.as_ref() else { return Ok(PassSummary::default()) };
        if let Some(&db) = s.db_search_range.get(fin.db_index) {
            let names = sink.live_keys_chunk(db, fin.after.as_deref(), CHECK_CHUNK)?;
            let mut missing = Vec::new();
            for name in &names {
                // Only keys this pass was looking for: a key outside the patterns is not
                // "gone" (nor is a name this extension did not write).
                let Some(bytes) = decode_name(name) else { continue };
                if !pass.patterns.iter().any(|p| p.matches(&bytes)) {
                    continue;
                }
                let id = self.key_id(db, &bytes);
                if self.memory.get(&id).is_some_and(|v| pass_of(*v) == number) {
                    continue;
                }
                missing.push((db, name.clone()));
            }
            let Some(fin) = self.pass.as_mut().and_then(|p| p.finishing.as_mut()) else {
                return Ok(PassSummary::default());
            };
            fin.missing.extend(missing);
            if (names.len() as i64) < CHECK_CHUNK {
                fin.db_index += 1;
                fin.after = None;
            } else {
                fin.after = names.last().cloned();
            }
            return Ok(PassSummary::default());
        }
        let missing = self
            .pass
            .as_mut()
            .and_then(|p| p.finishing.as_mut())
            .map(|f| std::mem::take(&mut f.missing))
            .unwrap_or_default();
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
            // A key created after SCAN went past its slot is not gone: ask Redis. (A key
            // that became a stream or another type not mirrored here is gone.)
            let bytes: Vec<Vec<u8>> =
                names.iter().map(|n| decode_name(n).unwrap_or_default()).collect();
            let types = redis.key_types(db, &bytes)?;
            let mut really_gone = Vec::new();
            for ((name, key), ty) in names.into_iter().zip(&bytes).zip(types) {
                if MIRRORED.contains(&ty.as_str()) {
                    // Still there: remembered as seen, with a fingerprint nothing matches, so
                    // the next pass compares it with the table (and a later deletion of it is
                    // looked for).
                    let id = self.key_id(db, key);
                    self.memory.insert(id, pack(NO_FINGERPRINT, number));
                } else {
                    really_gone.push(name);
                }
            }
            gone += sink.gone(db, &really_gone, delete)?;
        }
        if gone > 0 {
            shmem::bump(|c| &c.key_values_processed, gone as u64);
        }
        Ok(self.close(s, true, gone))
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

impl KeySync {
    /// Syncs keys named by keyspace notifications right away: changed ones are upserted,
    /// ones Redis says no longer exist get the deletion policy. Returns the rows touched.
    pub fn apply_events(
        &mut self,
        redis: &mut Redis,
        sink: &mut KvSink,
        s: &Settings,
        mut events: Vec<(u8, Vec<u8>)>,
    ) -> Result<usize> {
        if !s.key_value_auto_discovery || events.is_empty() {
            return Ok(0);
        }
        sink.prepare(&KvTarget { schema: s.schema.clone(), table: s.key_value_table.clone() })?;
        let patterns: Vec<Pattern> = s.key_value_patterns.iter().map(|p| Pattern::new(p)).collect();
        events.retain(|(db, key)| {
            s.db_search_range.contains(db) && patterns.iter().any(|p| p.matches(key))
        });
        events.sort();
        events.dedup();
        // A key first met here is not "seen" by the pass under way (if any): should it go
        // away again, the pass's deletion check must find it.
        let unseen = match &self.pass {
            Some(p) => p.number.wrapping_sub(1),
            None => self.number,
        };
        let mut touched = 0;
        let mut i = 0;
        while i < events.len() {
            let db = events[i].0;
            let keys: Vec<Vec<u8>> =
                events[i..].iter().take_while(|(d, _)| *d == db).map(|(_, k)| k.clone()).collect();
            i += keys.len();
            let values = fetch(redis, db, &keys)?;
            let mut rows = Vec::new();
            let mut pending = Vec::new();
            let mut gone = Vec::new();
            let now = Instant::now();
            for (key, (ty, expires, value)) in keys.iter().zip(values) {
                let id = self.key_id(db, key);
                if self.pass.is_some() {
                    self.event_times.insert(id, now);
                }
                if ty == "none" {
                    gone.push(encode_name(key));
                    self.memory.remove(&id);
                    continue;
                }
                let Some(value) = value else { continue };
                let fingerprint = fingerprint(&ty, expires, &value);
                if let Some(row) = key_row(key, &ty, expires, value) {
                    rows.push(row);
                    pending.push((id, fingerprint));
                }
            }
            let mut refused = Vec::new();
            touched += sink.upsert_isolating(db, &rows, &mut refused)?;
            report_refused(db, &rows, &refused);
            for (id, fingerprint) in pending {
                let number = self.memory.get(&id).map_or(unseen, |v| pass_of(*v));
                self.memory.insert(id, pack(fingerprint, number));
            }
            if !gone.is_empty() && s.key_value_deletes != KeyValueDeletes::Ignore {
                touched += sink.gone(db, &gone, s.key_value_deletes == KeyValueDeletes::Delete)?;
            }
        }
        if touched > 0 {
            shmem::bump(|c| &c.key_values_processed, touched as u64);
            let now = shmem::now();
            shmem::update(|st| st.last_sync_time = now);
        }
        Ok(touched)
    }
}

/// Keys the table refused (a name too long for its index, a trigger that raises): reported
/// in the log and `last_error`; they hold up nothing else.
fn report_refused(db: u8, rows: &[KeyRow], refused: &[(usize, crate::error::SyncError)]) {
    for (i, e) in refused {
        let name: String = rows[*i].redis_key.chars().take(200).collect();
        let msg = format!("key \"{name}\" of Redis database {db} cannot be stored: {e}");
        shmem::record_error(&msg);
        pgrx::warning!("{msg}");
    }
}

/// The types mirrored into the key-value table.
const MIRRORED: [&str; 5] = ["string", "hash", "list", "set", "zset"];

/// A fingerprint no value has (see [`fingerprint`]).
const NO_FINGERPRINT: u64 = 0;

/// A 48-bit fingerprint of a key's type, expiry and value as Redis sent them (never 0).
fn fingerprint(ty: &str, expires_ms: Option<i64>, value: &Value) -> u64 {
    fn feed(v: &Value, h: &mut std::collections::hash_map::DefaultHasher) {
        match v {
            Value::BulkString(b) => (0u8, b).hash(h),
            Value::SimpleString(s) => (1u8, s).hash(h),
            Value::Int(i) => (2u8, i).hash(h),
            Value::Double(d) => (3u8, d.to_bits()).hash(h),
            Value::Array(items) | Value::Set(items) => {
                (4u8, items.len()).hash(h);
                items.iter().for_each(|i| feed(i, h));
            }
            Value::Map(pairs) => {
                (5u8, pairs.len()).hash(h);
                pairs.iter().for_each(|(k, v)| {
                    feed(k, h);
                    feed(v, h);
                });
            }
            Value::Nil => 6u8.hash(h),
            other => (7u8, format!("{other:?}")).hash(h),
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ty, expires_ms).hash(&mut h);
    feed(value, &mut h);
    (h.finish() >> 16).max(1)
}

/// `[a, 1, b, 2]` -> `[(a, 1), (b, 2)]` (hash fields, sorted-set members with scores).
fn pairs(flat: Vec<Vec<u8>>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut it = flat.into_iter();
    let mut out = Vec::new();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        out.push((a, b));
    }
    out
}

/// The row of one key, or `None` for a type that is not mirrored.
pub fn key_row(key: &[u8], ty: &str, expires_ms: Option<i64>, value: Value) -> Option<KeyRow> {
    let (value_type, (text, encoding)) = match ty {
        "string" => {
            let bytes = match value {
                Value::BulkString(b) => b,
                Value::SimpleString(s) => s.into_bytes(),
                // The key changed type or vanished between the two round trips.
                _ => return None,
            };
            ("string", value_text(Val::String(&bytes)))
        }
        "hash" => ("hash", value_text(Val::Hash(&pairs(bulk_list(value))))),
        "list" => ("list", value_text(Val::List(&bulk_list(value)))),
        "set" => ("set", value_text(Val::Set(&bulk_list(value)))),
        "zset" => ("zset", value_text(Val::ZSet(&pairs(bulk_list(value))))),
        _ => return None,
    };
    Some(KeyRow {
        redis_key: encode_name(key),
        redis_value: text,
        value_type,
        value_encoding: encoding,
        expires_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn rows_of_each_type() {
        let r = key_row(b"k", "string", Some(5), bulk(b"v")).expect("row");
        assert_eq!(
            (r.redis_value.as_str(), r.value_type, r.value_encoding, r.expires_ms),
            ("v", "string", None, Some(5))
        );
        let h =
            key_row(b"h", "hash", None, Value::Array(vec![bulk(b"a"), bulk(b"1")])).expect("row");
        assert_eq!(h.redis_value, r#"{"a":"1"}"#);
        let z =
            key_row(b"z", "zset", None, Value::Array(vec![bulk(b"m"), bulk(b"2.5")])).expect("row");
        assert_eq!(z.redis_value, r#"[["m",2.5]]"#);
        assert!(key_row(b"s", "stream", None, Value::Nil).is_none());
        assert!(key_row(b"gone", "string", None, Value::Nil).is_none());
        assert_eq!(
            key_row(b"$x", "set", None, Value::Array(vec![])).expect("row").redis_key,
            "$$x"
        );
    }

    #[test]
    fn key_ids_separate_databases_and_names() {
        let k = KeySync::default();
        assert!(k.key_id(0, b"a") != k.key_id(1, b"a"));
        assert!(k.key_id(0, b"a") != k.key_id(0, b"b"));
        assert!(k.key_id(3, b"x") == k.key_id(3, b"x"));
    }

    #[test]
    fn fingerprints_follow_type_expiry_and_value() {
        let v = bulk(b"v");
        let base = fingerprint("string", None, &v);
        assert_eq!(base, fingerprint("string", None, &bulk(b"v")));
        assert_ne!(base, fingerprint("string", Some(1), &v));
        assert_ne!(base, fingerprint("string", None, &bulk(b"w")));
        let list = |items: &[&[u8]]| Value::Array(items.iter().map(|b| bulk(b)).collect());
        assert_ne!(
            fingerprint("list", None, &list(&[b"ab", b"c"])),
            fingerprint("list", None, &list(&[b"a", b"bc"]))
        );
        assert_ne!(
            fingerprint("list", None, &list(&[b"v"])),
            fingerprint("set", None, &list(&[b"v"]))
        );
        assert!(base < 1 << 48);
    }

    #[test]
    fn memory_word_keeps_fingerprint_and_pass() {
        let w = pack((1 << 48) - 1, 7);
        assert_eq!((fingerprint_of(w), pass_of(w)), ((1 << 48) - 1, 7));
    }
}
