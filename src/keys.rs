//! Key-value sync: every key matching `key_value_patterns` in every database of
//! `db_search_range` is mirrored into the key-value table, pass after pass, one SCAN page at
//! a time (so stream sync keeps going during a long pass). Values of a page are fetched in
//! two pipelined round trips (type and expiry, then values); only keys whose value, type or
//! expiry changed are written. Keys gone from Redis are handled by `key_value_deletes`, and
//! only after a complete pass against the same Redis server.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use ::redis::Value;

use crate::encode::{decode_name, encode_name, value_text, Value as Val};
use crate::error::Result;
use crate::gucs::{KeyValueDeletes, Settings};
use crate::parse::Pattern;
use crate::redis::{bulk_list, KeyMeta, Redis};
use crate::shmem;
use crate::sink::{KeyRow, KvSink, KvTarget};

/// SCAN page size (keys asked per SCAN call; also the unit of one write).
const SCAN_COUNT: u32 = 1000;

/// One SCAN still to finish: database, glob, cursor (0 = not started or finished).
#[derive(Debug, Clone)]
struct ScanJob {
    db: u8,
    glob: usize,
    cursor: u64,
    started: bool,
}

struct Pass {
    jobs: Vec<ScanJob>,
    globs: Vec<Vec<u8>>,
    patterns: Vec<Pattern>,
    /// Keys seen in this pass, as 128-bit hashes of (db, stored name): ~20 bytes a key.
    seen: HashSet<u128>,
    run_id: String,
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

/// Live keys read from the table per step of the deletion check.
const CHECK_CHUNK: i64 = 10_000;

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
}

pub fn seen_hash(db: u8, name: &str) -> u128 {
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (salt, db, name).hash(&mut h);
        h.finish() as u128
    };
    half(0) << 64 | half(1)
}

impl Default for KeySync {
    fn default() -> Self {
        KeySync { pass: None, next_pass: Instant::now() }
    }
}

impl KeySync {
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

    /// Drops the pass under way (after an error, or new settings): nothing is marked
    /// deleted from an incomplete pass.
    pub fn abandon(&mut self) {
        self.pass = None;
    }

    /// Does one page of work. Returns the summary when a pass finished.
    pub fn step(
        &mut self,
        redis: &mut Redis,
        sink: &mut KvSink,
        s: &Settings,
    ) -> Result<Option<PassSummary>> {
        if !s.key_value_auto_discovery || s.key_value_patterns.is_empty() {
            self.pass = None;
            return Ok(None);
        }
        if self.pass.is_none() {
            if Instant::now() < self.next_pass {
                return Ok(None);
            }
            self.start(redis, s)?;
        }
        sink.prepare(&KvTarget { schema: s.schema.clone(), table: s.key_value_table.clone() })?;
        let outcome = self.page(redis, sink, s);
        if outcome.is_err() {
            self.pass = None;
            self.next_pass = Instant::now() + s.sync_interval;
        }
        outcome
    }

    fn start(&mut self, redis: &mut Redis, s: &Settings) -> Result<()> {
        let patterns: Vec<Pattern> = s.key_value_patterns.iter().map(|p| Pattern::new(p)).collect();
        let globs: Vec<Vec<u8>> = if patterns.iter().any(|p| p.as_str() == "*") {
            vec![b"*".to_vec()]
        } else {
            patterns.iter().map(Pattern::to_redis_glob).collect()
        };
        let jobs = s
            .db_search_range
            .iter()
            .flat_map(|&db| {
                (0..globs.len()).map(move |glob| ScanJob { db, glob, cursor: 0, started: false })
            })
            .collect();
        self.pass = Some(Pass {
            jobs,
            globs,
            patterns,
            seen: HashSet::new(),
            run_id: redis.run_id()?,
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
    ) -> Result<Option<PassSummary>> {
        let Some(pass) = self.pass.as_mut() else { return Ok(None) };
        let Some(job) = pass.jobs.first().cloned() else {
            let summary = self.finish(redis, sink, s)?;
            return Ok(self.pass.is_none().then_some(summary));
        };
        let (next, keys) =
            redis.scan_page(job.db, job.cursor, &pass.globs[job.glob], SCAN_COUNT)?;
        // Confirm the pattern client-side and skip keys already seen (SCAN may repeat keys,
        // and several globs may match one key).
        let mut fresh = Vec::with_capacity(keys.len());
        for key in keys {
            if !pass.patterns.iter().any(|p| p.matches(&key)) {
                continue;
            }
            if pass.seen.contains(&seen_hash(job.db, &encode_name(&key))) {
                continue;
            }
            fresh.push(key);
        }
        let values = fetch(redis, job.db, &fresh)?;
        let mut rows = Vec::with_capacity(fresh.len());
        for (key, (ty, expires, value)) in fresh.iter().zip(values) {
            let ty = ty.as_str();
            // Streams belong to stream sync; "none" means the key vanished meanwhile.
            let Some(value) = value else { continue };
            let Some(row) = key_row(key, ty, expires, value) else { continue };
            pass.seen.insert(seen_hash(job.db, &row.redis_key));
            rows.push(row);
        }
        pass.keys += rows.len();
        let written = sink.upsert(job.db, &rows)?;
        pass.written += written;
        if written > 0 {
            shmem::bump(|c| &c.key_values_processed, written as u64);
            let now = shmem::now();
            shmem::update(|st| st.last_sync_time = now);
        }
        if let Some(j) = pass.jobs.first_mut() {
            j.cursor = next;
            j.started = true;
        }
        if next == 0 {
            pass.jobs.remove(0);
        }
        Ok(None)
    }

    /// Every SCAN is done. Check that Redis is the same server as at the start (a restart
    /// during the pass proves nothing about what is gone), then walk the table's live keys a
    /// chunk per step, and finally apply the deletion policy to keys the pass did not see.
    fn finish(
        &mut self,
        redis: &mut Redis,
        sink: &mut KvSink,
        s: &Settings,
    ) -> Result<PassSummary> {
        let Some(pass) = self.pass.as_mut() else { return Ok(PassSummary::default()) };
        if pass.finishing.is_none() {
            let same_server = redis.run_id()? == pass.run_id;
            if !same_server || s.key_value_deletes == KeyValueDeletes::Ignore {
                return Ok(self.close(s, same_server, 0));
            }
            pass.finishing = Some(Finish { db_index: 0, after: None, missing: Vec::new() });
        }
        let Some(fin) = pass.finishing.as_mut() else { return Ok(PassSummary::default()) };
        if let Some(&db) = s.db_search_range.get(fin.db_index) {
            let names = sink.live_keys_chunk(db, fin.after.as_deref(), CHECK_CHUNK)?;
            for name in &names {
                if pass.seen.contains(&seen_hash(db, name)) {
                    continue;
                }
                // Only keys this pass was looking for: a key outside the patterns is not "gone".
                let in_scope = decode_name(name)
                    .is_some_and(|bytes| pass.patterns.iter().any(|p| p.matches(&bytes)));
                if in_scope {
                    fin.missing.push((db, name.clone()));
                }
            }
            if (names.len() as i64) < CHECK_CHUNK {
                fin.db_index += 1;
                fin.after = None;
            } else {
                fin.after = names.last().cloned();
            }
            return Ok(PassSummary::default());
        }
        let missing = std::mem::take(&mut fin.missing);
        let delete = s.key_value_deletes == KeyValueDeletes::Delete;
        let mut gone = 0;
        let mut i = 0;
        while i < missing.len() {
            let db = missing[i].0;
            let names: Vec<String> =
                missing[i..].iter().take_while(|(d, _)| *d == db).map(|(_, n)| n.clone()).collect();
            i += names.len();
            gone += sink.gone(db, &names, delete)?;
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
        let mut touched = 0;
        let mut i = 0;
        while i < events.len() {
            let db = events[i].0;
            let keys: Vec<Vec<u8>> =
                events[i..].iter().take_while(|(d, _)| *d == db).map(|(_, k)| k.clone()).collect();
            i += keys.len();
            let values = fetch(redis, db, &keys)?;
            let mut rows = Vec::new();
            let mut gone = Vec::new();
            for (key, (ty, expires, value)) in keys.iter().zip(values) {
                if ty == "none" {
                    gone.push(encode_name(key));
                } else if let Some(row) = value.and_then(|v| key_row(key, &ty, expires, v)) {
                    rows.push(row);
                }
            }
            touched += sink.upsert(db, &rows)?;
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

/// Type, expiry and value of each key: strings in one round trip, other types in a second.
fn fetch(redis: &mut Redis, db: u8, keys: &[Vec<u8>]) -> Result<Vec<KeyMeta>> {
    let mut meta = redis.key_meta(db, keys)?;
    let others: Vec<usize> = meta
        .iter()
        .enumerate()
        .filter(|(_, (t, _, _))| matches!(t.as_str(), "hash" | "list" | "set" | "zset"))
        .map(|(i, _)| i)
        .collect();
    if !others.is_empty() {
        let typed: Vec<(&[u8], &str)> =
            others.iter().map(|&i| (keys[i].as_slice(), meta[i].0.as_str())).collect();
        let values = redis.key_values(db, &typed)?;
        for (i, v) in others.into_iter().zip(values) {
            meta[i].2 = v;
        }
    }
    Ok(meta)
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
    fn seen_hashes_separate_databases_and_names() {
        assert_ne!(seen_hash(0, "a"), seen_hash(1, "a"));
        assert_ne!(seen_hash(0, "a"), seen_hash(0, "b"));
        assert_eq!(seen_hash(3, "x"), seen_hash(3, "x"));
    }
}
