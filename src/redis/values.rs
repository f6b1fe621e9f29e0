//! Reading the keys of a key-value page with bounded memory: every value is measured before
//! it is fetched, values bigger than `redis_sync.key_value_max_size` are not fetched at
//! all, and big collections come in windows rather than in one reply.
//!
//! - First round trip, for every key: `GETRANGE key 0 <peek>` (a string's value, cut at a
//!   size that keeps the page's reply small) and its expiry (`PEXPIRETIME`, or `PTTL` on
//!   Redis before 7), with the next SCAN page when asked. When most keys of the last page
//!   were of one collection type (a page of hashes), it asks instead for the expiry and
//!   `MEMORY USAGE ... SAMPLES 5`, and the second round trip asks for the values that fit
//!   as that type (`HGETALL`): three commands a hash instead of five; a key of another
//!   type answers `WRONGTYPE` and is asked about as below.
//! - Second, for the keys that are not strings: `TYPE` and `MEMORY USAGE ... SAMPLES 5`
//!   (an estimate that costs the same whatever the size); for strings longer than the peek,
//!   `STRLEN`.
//! - Then the values that fit: whole (`GET`, `HGETALL`, `LRANGE 0 -1`, `SMEMBERS`,
//!   `ZRANGE ... WITHSCORES`), several keys a round trip up to a byte budget; collections
//!   estimated bigger than a window (or whose size Redis would not tell) in windows of
//!   `HSCAN`/`SSCAN`/`ZSCAN`/`LRANGE`, repeats dropped, stopped past the limit.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use ::redis::Value;

use super::commands::value_command;
use super::conn::command_error;
use super::reply::{as_int, bulk_list, parse_scan};
use super::{KeyMeta, Redis, ScanPage};
use crate::error::{Result, SyncError};

/// What one page's reply may hold of string values, about: the peek of each string is cut
/// to fit it.
const PAGE_BYTES: u64 = 16 << 20;
/// The least and most of a string the first round trip reads.
const PEEK: (u64, u64) = (4 << 10, 1 << 20);
/// Collections estimated above this are read in windows.
const WINDOW_BYTES: u64 = 4 << 20;
/// Elements per window.
const WINDOW: u32 = 10_000;

/// The bytes of a reply's strings.
fn value_bytes(v: &Value) -> u64 {
    match v {
        Value::BulkString(b) => b.len() as u64,
        Value::SimpleString(s) => s.len() as u64,
        Value::Array(items) | Value::Set(items) => items.iter().map(value_bytes).sum(),
        Value::Map(pairs) => pairs.iter().map(|(k, v)| value_bytes(k) + value_bytes(v)).sum(),
        _ => 8,
    }
}

fn unix_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How a key's value is to be read after the first round trip.
enum Plan {
    Done,
    /// A string longer than its peek: its length is asked.
    Long,
    /// Not a string: its type and size are asked.
    Untyped,
    /// Read whole, about this many bytes.
    Whole(u64),
    Windows,
    /// About this many bytes: asked for as the type guessed.
    Guessed(u64),
}

/// The least number of keys of known type a page needs to set the next page's guess.
const GUESS_MIN: usize = 16;

/// The collection type at least three quarters of `metas` are, if any.
fn page_guess(metas: &[KeyMeta]) -> Option<Option<&'static str>> {
    let typed: Vec<&str> =
        metas.iter().map(|m| m.ty.as_str()).filter(|t| !t.is_empty() && *t != "none").collect();
    if typed.len() < GUESS_MIN {
        return None;
    }
    for ty in ["hash", "list", "set", "zset"] {
        if typed.iter().filter(|t| **t == ty).count() * 4 >= typed.len() * 3 {
            return Some(Some(ty));
        }
    }
    Some(None)
}

impl Redis {
    /// Type, expiry and value of each of `keys` of database `db`, none bigger than `limit`
    /// bytes (those come back with `too_big` set and no value); with `next`, the next SCAN
    /// page is asked for in the first round trip.
    pub fn fetch_keys(
        &mut self,
        db: u8,
        keys: &[Vec<u8>],
        next: Option<(u64, &[u8], u32)>,
        limit: u64,
    ) -> Result<(Vec<KeyMeta>, Option<ScanPage>)> {
        if keys.is_empty() && next.is_none() {
            return Ok((Vec::new(), None));
        }
        let limit = limit.max(1);
        let peek = (PAGE_BYTES / keys.len().max(1) as u64).clamp(PEEK.0, PEEK.1).min(limit + 1);
        let ttl = self.use_pttl;
        let guess = self.guess;
        let mut replies = self.pipeline_in_lenient(db, "GETRANGE", |p| {
            for k in keys {
                match guess {
                    None => p.cmd("GETRANGE").arg(k).arg(0).arg(peek - 1),
                    Some(_) => p.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(5),
                };
                p.cmd(if ttl { "PTTL" } else { "PEXPIRETIME" }).arg(k);
            }
            if let Some((cursor, glob, count)) = next {
                p.cmd("SCAN").arg(cursor).arg("MATCH").arg(glob).arg("COUNT").arg(count);
            }
        })?;
        let scanned = match next {
            Some(_) => match replies.pop() {
                Some(Ok(v)) => Some(
                    parse_scan(v)
                        .ok_or_else(|| SyncError::protocol("SCAN", "unexpected reply shape"))?,
                ),
                Some(Err(e)) => return Err(command_error("SCAN", &e)),
                None => return Err(SyncError::protocol("SCAN", "missing reply")),
            },
            None => None,
        };
        if replies.len() != keys.len() * 2 {
            return Err(SyncError::protocol("GETRANGE", "unexpected number of replies"));
        }
        // Redis before 7 has no PEXPIRETIME: its error names the command. Asked again with
        // PTTL, and from now on.
        if !ttl && replies.iter().skip(1).step_by(2).any(unknown_command) {
            self.use_pttl = true;
            return self.fetch_keys(db, keys, next, limit);
        }
        let now = unix_millis();
        let mut out = Vec::with_capacity(keys.len());
        let mut plan = Vec::with_capacity(keys.len());
        let mut it = replies.into_iter();
        while let (Some(first), Some(expiry)) = (it.next(), it.next()) {
            let raw = expiry.ok().as_ref().and_then(as_int);
            // -2: no such key; -1: no expiry.
            let missing = raw == Some(-2);
            let expires = match (raw, ttl) {
                (Some(v), false) if v >= 0 => Some(v),
                // To the second: the time to live shrinks between reads, the moment it
                // gives does not (rounded, it stays the same from pass to pass).
                (Some(v), true) if v >= 0 => Some((now + v + 500) / 1000 * 1000),
                _ => None,
            };
            let mut meta = KeyMeta { ty: String::new(), expires, value: None, too_big: None };
            let p = match (first, guess) {
                _ if missing => {
                    meta.ty = "none".into();
                    Plan::Done
                }
                // `MEMORY USAGE`: values that fit are asked for as the type guessed; the
                // others (or an unknown size: an ACL user without MEMORY) by their type.
                (Ok(size), Some(_)) => match as_int(&size) {
                    Some(n) if n >= 0 && n as u64 <= limit && n as u64 <= WINDOW_BYTES => {
                        Plan::Guessed(n as u64)
                    }
                    _ => Plan::Untyped,
                },
                (Err(_), Some(_)) => Plan::Untyped,
                (Ok(Value::BulkString(b)), None) => {
                    meta.ty = "string".into();
                    let cut = b.len() as u64 >= peek;
                    meta.value = Some(Value::BulkString(b));
                    match (cut, peek > limit) {
                        (false, _) => Plan::Done,
                        // Longer than the limit itself: not fetched.
                        (true, true) => {
                            meta.value = None;
                            meta.too_big = Some(peek);
                            Plan::Done
                        }
                        (true, false) => Plan::Long,
                    }
                }
                // WRONGTYPE: not a string.
                (Err(_), None) => Plan::Untyped,
                (Ok(_), None) => Plan::Untyped,
            };
            out.push(meta);
            plan.push(p);
        }
        if let Some(ty) = guess {
            self.fetch_guessed(db, keys, &mut out, &mut plan, limit, ty)?;
        }
        self.measure(db, keys, &mut out, &mut plan, limit)?;
        self.fetch_whole(db, keys, &mut out, &plan, limit)?;
        for i in 0..keys.len() {
            if matches!(plan[i], Plan::Windows) {
                let ty = out[i].ty.clone();
                match self.fetch_windows(db, &keys[i], &ty, limit)? {
                    Windowed::Value(v) => out[i].value = Some(v),
                    Windowed::TooBig(bytes) => out[i].too_big = Some(bytes),
                    Windowed::Changed => {}
                }
            }
        }
        if let Some(g) = page_guess(&out) {
            self.guess = g;
        }
        Ok((out, scanned))
    }

    /// The values of the keys planned [`Plan::Guessed`], asked for as type `ty`, several
    /// keys a round trip up to [`PAGE_BYTES`]; a key of another type (`WRONGTYPE`) is left
    /// to be asked its type.
    fn fetch_guessed(
        &mut self,
        db: u8,
        keys: &[Vec<u8>],
        out: &mut [KeyMeta],
        plan: &mut [Plan],
        limit: u64,
        ty: &'static str,
    ) -> Result<()> {
        let Some(args) = value_command(ty) else { return Ok(()) };
        let wanted: Vec<(usize, u64)> = (0..keys.len())
            .filter_map(|i| match plan[i] {
                Plan::Guessed(n) => Some((i, n)),
                _ => None,
            })
            .collect();
        let mut start = 0;
        while start < wanted.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < wanted.len() && (end == start || bytes < PAGE_BYTES) {
                bytes += wanted[end].1;
                end += 1;
            }
            let group = &wanted[start..end];
            let replies = self.pipeline_in_lenient(db, args[0], |p| {
                for &(i, _) in group {
                    p.cmd(args[0]).arg(&keys[i]);
                    for a in &args[1..] {
                        p.arg(*a);
                    }
                }
            })?;
            if replies.len() != group.len() {
                return Err(SyncError::protocol(args[0], "unexpected number of replies"));
            }
            for (&(i, _), reply) in group.iter().zip(replies) {
                match reply {
                    Ok(v) => {
                        out[i].ty = ty.to_owned();
                        // `MEMORY USAGE` samples: what came is measured too.
                        let got = value_bytes(&v);
                        if got > limit {
                            out[i].too_big = Some(got);
                        } else {
                            out[i].value = Some(v);
                        }
                        plan[i] = Plan::Done;
                    }
                    // WRONGTYPE: asked its type.
                    Err(_) => plan[i] = Plan::Untyped,
                }
            }
            start = end;
        }
        Ok(())
    }

    /// The second round trip: types and size estimates of the keys that are not strings,
    /// lengths of the strings longer than their peek; decides how each is read.
    fn measure(
        &mut self,
        db: u8,
        keys: &[Vec<u8>],
        out: &mut [KeyMeta],
        plan: &mut [Plan],
        limit: u64,
    ) -> Result<()> {
        let asked: Vec<usize> =
            (0..keys.len()).filter(|&i| matches!(plan[i], Plan::Long | Plan::Untyped)).collect();
        if asked.is_empty() {
            return Ok(());
        }
        let replies = self.pipeline_in_lenient(db, "TYPE", |p| {
            for &i in &asked {
                match plan[i] {
                    Plan::Long => {
                        p.cmd("STRLEN").arg(&keys[i]);
                    }
                    _ => {
                        p.cmd("TYPE").arg(&keys[i]);
                        p.cmd("MEMORY").arg("USAGE").arg(&keys[i]).arg("SAMPLES").arg(5);
                    }
                }
            }
        })?;
        let mut it = replies.into_iter();
        for i in asked {
            if matches!(plan[i], Plan::Long) {
                let len = it.next().and_then(|r| r.ok()).as_ref().and_then(as_int).unwrap_or(0);
                let len = len.max(0) as u64;
                if len > limit {
                    out[i].value = None;
                    out[i].too_big = Some(len);
                    plan[i] = Plan::Done;
                } else {
                    plan[i] = Plan::Whole(len);
                }
                continue;
            }
            let ty = it
                .next()
                .and_then(|r| r.ok())
                .map(|v| String::from_utf8(bulk_list(v).concat()).unwrap_or_default())
                .unwrap_or_default();
            // Unknown when MEMORY is not allowed (an ACL user): read in windows, which stop
            // past the limit.
            let size = it.next().and_then(|r| r.ok()).as_ref().and_then(as_int);
            out[i].ty = ty;
            let mirrored =
                matches!(out[i].ty.as_str(), "hash" | "list" | "set" | "zset" | "string");
            plan[i] = match (mirrored, size) {
                (false, _) => Plan::Done,
                (true, Some(n)) if n as u64 > limit => {
                    out[i].too_big = Some(n as u64);
                    Plan::Done
                }
                (true, Some(n)) if n as u64 <= WINDOW_BYTES || out[i].ty == "string" => {
                    Plan::Whole(n.max(0) as u64)
                }
                (true, _) => Plan::Windows,
            };
        }
        Ok(())
    }

    /// Values read whole, several keys a round trip up to [`PAGE_BYTES`].
    fn fetch_whole(
        &mut self,
        db: u8,
        keys: &[Vec<u8>],
        out: &mut [KeyMeta],
        plan: &[Plan],
        limit: u64,
    ) -> Result<()> {
        let mut group: Vec<usize> = Vec::new();
        let mut bytes = 0u64;
        let wanted: Vec<(usize, u64)> = (0..keys.len())
            .filter_map(|i| match plan[i] {
                Plan::Whole(n) => Some((i, n)),
                _ => None,
            })
            .collect();
        for (n, &(i, size)) in wanted.iter().enumerate() {
            group.push(i);
            bytes += size;
            if bytes >= PAGE_BYTES || n + 1 == wanted.len() {
                let typed: Vec<(&[u8], &str)> =
                    group.iter().map(|&i| (keys[i].as_slice(), out[i].ty.as_str())).collect();
                let values = self.key_values(db, &typed)?;
                for (&i, v) in group.iter().zip(values) {
                    // `MEMORY USAGE` samples: what came is measured too.
                    let got = v.as_ref().map_or(0, value_bytes);
                    if got > limit {
                        out[i].too_big = Some(got);
                    } else {
                        out[i].value = v;
                    }
                }
                group.clear();
                bytes = 0;
            }
        }
        Ok(())
    }

    /// A collection read in windows: each window a round trip of at most [`WINDOW`]
    /// elements; members a SCAN-family window repeats are dropped; a list that changes
    /// length while read is left for the next pass.
    fn fetch_windows(&mut self, db: u8, key: &[u8], ty: &str, limit: u64) -> Result<Windowed> {
        let mut flat: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0u64;
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        if ty == "list" {
            let len_of = |r: &mut Redis| -> Result<i64> {
                let v = r.query(db, "LLEN", ::redis::cmd("LLEN").arg(key))?;
                Ok(as_int(&v).unwrap_or(0))
            };
            let before = len_of(self)?;
            let mut start = 0i64;
            while start < before {
                let stop = start + WINDOW as i64 - 1;
                let v =
                    self.query(db, "LRANGE", ::redis::cmd("LRANGE").arg(key).arg(start).arg(stop))?;
                for item in bulk_list(v) {
                    bytes += item.len() as u64;
                    flat.push(item);
                }
                if bytes > limit {
                    return Ok(Windowed::TooBig(bytes));
                }
                start = stop + 1;
            }
            if len_of(self)? != before {
                return Ok(Windowed::Changed);
            }
            return Ok(Windowed::Value(Value::Array(
                flat.into_iter().map(Value::BulkString).collect(),
            )));
        }
        let (scan, pairs) = match ty {
            "hash" => ("HSCAN", true),
            "set" => ("SSCAN", false),
            "zset" => ("ZSCAN", true),
            _ => return Ok(Windowed::Changed),
        };
        let mut cursor = 0u64;
        let mut zset: Vec<(f64, Vec<u8>, Vec<u8>)> = Vec::new();
        loop {
            let v = self.query(
                db,
                scan,
                ::redis::cmd(scan).arg(key).arg(cursor).arg("COUNT").arg(WINDOW),
            )?;
            let (next, items) =
                parse_scan(v).ok_or_else(|| SyncError::protocol(scan, "unexpected reply shape"))?;
            let mut items = items.into_iter();
            while let Some(member) = items.next() {
                let paired = if pairs { items.next() } else { None };
                if !seen.insert(member.clone()) {
                    continue;
                }
                bytes += member.len() as u64 + paired.as_ref().map_or(0, |p| p.len() as u64);
                match (ty, paired) {
                    ("zset", Some(score)) => {
                        let s = std::str::from_utf8(&score).ok().and_then(|s| s.parse().ok());
                        zset.push((s.unwrap_or(0.0), member, score));
                    }
                    (_, Some(value)) => {
                        flat.push(member);
                        flat.push(value);
                    }
                    (_, None) => flat.push(member),
                }
            }
            if bytes > limit {
                return Ok(Windowed::TooBig(bytes));
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        if ty == "zset" {
            // In Redis' order, as ZRANGE gives it: by score, then member.
            zset.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            flat = zset.into_iter().flat_map(|(_, m, s)| [m, s]).collect();
        }
        Ok(Windowed::Value(Value::Array(flat.into_iter().map(Value::BulkString).collect())))
    }
}

enum Windowed {
    Value(Value),
    TooBig(u64),
    /// Changed while read (a list whose length moved): read again next pass.
    Changed,
}

fn unknown_command(r: &::redis::RedisResult<Value>) -> bool {
    matches!(r, Err(e) if e.to_string().to_lowercase().contains("unknown command"))
}
