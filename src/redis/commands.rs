//! The commands the worker sends through [`Redis`]: stream discovery, consumer groups,
//! acknowledgements and claims, XINFO, and the key-value pass's SCAN and value fetches.
//! Each is one pipelined round trip (or a bounded number of them) and takes a token of the
//! rate limit.

use std::time::{Duration, Instant};

use ::redis::Value;

use super::conn::command_error;
use super::reply::{as_string, bulk_list, parse_info, parse_scan, stalled_consumer};
use super::{Redis, StreamInfo};
use crate::error::{Result, SyncError};

impl Redis {
    /// `SCAN ... MATCH glob TYPE stream COUNT n` over the whole keyspace of every database
    /// in `dbs`, for every glob, each database on its own connection. Returns `(db, key)`
    /// pairs, possibly with repeats across globs.
    pub fn scan_streams(
        &mut self,
        dbs: &[u8],
        globs: &[Vec<u8>],
        count: u32,
    ) -> Result<Vec<(u8, Vec<u8>)>> {
        let mut keys = Vec::new();
        for &db in dbs {
            for glob in globs {
                let mut cursor = 0;
                loop {
                    let mut replies = self.pipeline_in(db, "SCAN", |p| {
                        p.cmd("SCAN").arg(cursor).arg("MATCH").arg(glob).arg("COUNT").arg(count);
                        p.arg("TYPE").arg("stream");
                    })?;
                    let (next, batch) = replies
                        .pop()
                        .and_then(parse_scan)
                        .ok_or_else(|| SyncError::protocol("SCAN", "unexpected reply shape"))?;
                    keys.extend(batch.into_iter().map(|k| (db, k)));
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(keys)
    }

    /// The server's run ID and which databases hold keys (`INFO`), and, the first time, how
    /// many databases it has (`CONFIG GET databases`, where the user may run it).
    pub fn databases(&mut self) -> Result<Databases> {
        if self.settings.cluster {
            // A cluster has database 0 only; its first primary's run ID stands for the
            // cluster (a failover of that primary starts a key-value pass afresh).
            let reply = self.query(0, "INFO", ::redis::cmd("INFO").arg("server"))?;
            let mut found = Databases::from_info(&as_string(&reply).unwrap_or_default(), Some(1));
            found.nonempty.insert(0);
            self.databases = Some(found.clone());
            return Ok(found);
        }
        let main = self.settings.db;
        let reply = self.query(main, "INFO", &::redis::cmd("INFO"))?;
        let text = as_string(&reply).unwrap_or_default();
        let count = match self.databases.as_ref() {
            Some(known) => known.count,
            None => self
                .query(main, "CONFIG GET", ::redis::cmd("CONFIG").arg("GET").arg("databases"))
                .ok()
                .and_then(|v| {
                    bulk_list(v).get(1).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
                }),
        };
        let found = Databases::from_info(&text, count);
        self.databases = Some(found.clone());
        Ok(found)
    }

    /// One `SCAN` page of `db` (all types).
    pub fn scan_page(
        &mut self,
        db: u8,
        cursor: u64,
        glob: &[u8],
        count: u32,
    ) -> Result<(u64, Vec<Vec<u8>>)> {
        let mut replies = self.pipeline_in(db, "SCAN", |p| {
            p.cmd("SCAN").arg(cursor).arg("MATCH").arg(glob).arg("COUNT").arg(count);
        })?;
        replies
            .pop()
            .and_then(parse_scan)
            .ok_or_else(|| SyncError::protocol("SCAN", "unexpected reply shape"))
    }

    /// The type of each of `keys` in database `db` (`none` for a missing key), in one
    /// round trip.
    pub fn key_types<K: AsRef<[u8]>>(&mut self, db: u8, keys: &[K]) -> Result<Vec<String>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let replies = self.pipeline_in(db, "TYPE", |p| {
            for k in keys {
                p.cmd("TYPE").arg(k.as_ref());
            }
        })?;
        if replies.len() != keys.len() {
            return Err(SyncError::protocol("TYPE", "unexpected number of replies"));
        }
        Ok(replies.iter().map(|r| as_string(r).unwrap_or_default()).collect())
    }

    /// The values of keys of known types, in one round trip (`GET`, `HGETALL`, `LRANGE`,
    /// `SMEMBERS`, `ZRANGE ... WITHSCORES`); `None` for a key of another type.
    pub fn key_values(&mut self, db: u8, keys: &[(&[u8], &str)]) -> Result<Vec<Option<Value>>> {
        let wanted: Vec<usize> = keys
            .iter()
            .enumerate()
            .filter(|(_, (_, t))| value_command(t).is_some())
            .map(|(i, _)| i)
            .collect();
        if wanted.is_empty() {
            return Ok(keys.iter().map(|_| None).collect());
        }
        let replies = self.pipeline_in(db, "GET", |p| {
            for &i in &wanted {
                let (k, t) = keys[i];
                if let Some(args) = value_command(t) {
                    p.cmd(args[0]).arg(k);
                    for a in &args[1..] {
                        p.arg(*a);
                    }
                }
            }
        })?;
        if replies.len() != wanted.len() {
            return Err(SyncError::protocol("GET", "unexpected number of replies"));
        }
        let mut out: Vec<Option<Value>> = keys.iter().map(|_| None).collect();
        for (i, v) in wanted.into_iter().zip(replies) {
            out[i] = Some(v);
        }
        Ok(out)
    }

    /// The `notify-keyspace-events` setting, or `None` when it cannot be read (an ACL user
    /// without CONFIG, a managed Redis).
    pub fn notify_flags(&mut self) -> Option<String> {
        let main = self.settings.db;
        let reply = self
            .query(
                main,
                "CONFIG GET",
                ::redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events"),
            )
            .ok()?;
        let items = bulk_list(reply);
        items.get(1).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// Creates `group` on `key` reading from the start. `Ok(true)` when created, `Ok(false)`
    /// when it already existed; an error (code `NOKEY`-like) when the stream does not exist
    /// and `mkstream` is off.
    pub fn create_group(
        &mut self,
        db: u8,
        key: &[u8],
        group: &str,
        mkstream: bool,
    ) -> Result<bool> {
        let mut cmd = ::redis::cmd("XGROUP");
        cmd.arg("CREATE").arg(key).arg(group).arg("0");
        if mkstream {
            cmd.arg("MKSTREAM");
        }
        match self.query(db, "XGROUP CREATE", &cmd) {
            Ok(_) => Ok(true),
            Err(SyncError::RedisCommand { code: Some(code), .. }) if code == "BUSYGROUP" => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The IDs pending in `key`'s `group`, whichever consumer holds them (`XPENDING ... - +
    /// max`); `None` when there are `max` or more (the list is then not known whole).
    pub fn pending_ids(
        &mut self,
        db: u8,
        key: &[u8],
        group: &str,
        max: usize,
    ) -> Result<Option<Vec<String>>> {
        let mut cmd = ::redis::cmd("XPENDING");
        cmd.arg(key).arg(group).arg("-").arg("+").arg(max);
        let Value::Array(items) = self.query(db, "XPENDING", &cmd)? else {
            return Err(SyncError::protocol("XPENDING", "unexpected reply shape"));
        };
        if items.len() >= max {
            return Ok(None);
        }
        Ok(Some(pending_reply_ids(&items)))
    }

    /// Moves the entries pending for consumer `from` to consumer `to` whatever their idle
    /// time, once `from` itself has been idle for `min_idle` (no worker reads as it any
    /// more): `XINFO CONSUMERS`, then pages of `XPENDING ... from` and
    /// `XCLAIM ... 0 ... JUSTID` (up to ten pages of `count`), and `XGROUP DELCONSUMER` once
    /// nothing is pending for it. Returns how many entries moved, and how many Redis found
    /// deleted from the stream (and dropped from the pending list); (0, 0) when `from` is
    /// not in the group or was active lately.
    #[allow(clippy::too_many_arguments)]
    pub fn take_over_consumer(
        &mut self,
        db: u8,
        key: &[u8],
        group: &str,
        from: &str,
        to: &str,
        min_idle: Duration,
        count: u32,
    ) -> Result<(usize, usize)> {
        let mut cmd = ::redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(key).arg(group);
        let consumers = self.query(db, "XINFO CONSUMERS", &cmd)?;
        let idle = super::reply::consumer_idle(&consumers, from);
        if idle.is_none_or(|ms| ms < min_idle.as_millis() as i64) {
            return Ok((0, 0));
        }
        let (mut moved, mut deleted) = (0, 0);
        for _ in 0..10 {
            let mut cmd = ::redis::cmd("XPENDING");
            cmd.arg(key).arg(group).arg("-").arg("+").arg(count.max(1)).arg(from);
            let Value::Array(items) = self.query(db, "XPENDING", &cmd)? else {
                return Err(SyncError::protocol("XPENDING", "unexpected reply shape"));
            };
            let ids = pending_reply_ids(&items);
            if ids.is_empty() {
                let mut cmd = ::redis::cmd("XGROUP");
                cmd.arg("DELCONSUMER").arg(key).arg(group).arg(from);
                self.query(db, "XGROUP DELCONSUMER", &cmd)?;
                break;
            }
            let mut cmd = ::redis::cmd("XCLAIM");
            cmd.arg(key).arg(group).arg(to).arg(0).arg(&ids).arg("JUSTID");
            let Value::Array(got) = self.query(db, "XCLAIM", &cmd)? else {
                return Err(SyncError::protocol("XCLAIM", "unexpected reply shape"));
            };
            // (Redis 7 drops IDs no longer in the stream from the pending list, unnamed.)
            moved += got.len();
            deleted += ids.len().saturating_sub(got.len());
        }
        Ok((moved, deleted))
    }

    /// Claims entries of other consumers idle longer than `min_idle` into our pending list
    /// (`XAUTOCLAIM ... JUSTID`); returns how many were claimed, and how many pending entries
    /// Redis found deleted from the stream meanwhile (and dropped from the pending list).
    pub fn claim_idle(
        &mut self,
        db: u8,
        key: &[u8],
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: u32,
    ) -> Result<(usize, usize)> {
        let mut start = "0-0".to_owned();
        let mut claimed = 0;
        let mut deleted = 0;
        // Bounded: at most 10 pages per call; the next pass goes on.
        for _ in 0..10 {
            let mut cmd = ::redis::cmd("XAUTOCLAIM");
            cmd.arg(key).arg(group).arg(consumer).arg(min_idle.as_millis() as u64);
            cmd.arg(&start).arg("COUNT").arg(count).arg("JUSTID");
            let reply = self.query(db, "XAUTOCLAIM", &cmd)?;
            let Value::Array(parts) = reply else {
                return Err(SyncError::protocol("XAUTOCLAIM", "unexpected reply shape"));
            };
            let next = parts.first().and_then(as_string).unwrap_or_else(|| "0-0".into());
            let len = |v: Option<&Value>| match v {
                Some(Value::Array(ids)) => ids.len(),
                _ => 0,
            };
            claimed += len(parts.get(1));
            // (Redis 7 and later.)
            deleted += len(parts.get(2));
            if next == "0-0" {
                break;
            }
            start = next;
        }
        Ok((claimed, deleted))
    }

    /// XINFO STREAM and XINFO GROUPS for each key, pipelined in one round trip.
    pub fn stream_info(
        &mut self,
        db: u8,
        group: &str,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<StreamInfo>>> {
        self.stream_health(db, group, keys, None)
    }

    /// As [`Redis::stream_info`]; with `consumers` (our own consumer's name), also
    /// `XINFO CONSUMERS` of our group: monitor mode looks for other consumers that sit on
    /// pending entries.
    pub fn stream_health(
        &mut self,
        db: u8,
        group: &str,
        keys: &[&[u8]],
        consumers: Option<&str>,
    ) -> Result<Vec<Option<StreamInfo>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let per_key = if consumers.is_some() { 3 } else { 2 };
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for k in keys {
            pipe.cmd("XINFO").arg("STREAM").arg(*k);
            pipe.cmd("XINFO").arg("GROUPS").arg(*k);
            if consumers.is_some() {
                pipe.cmd("XINFO").arg("CONSUMERS").arg(*k).arg(group);
            }
        }
        self.throttle();
        let c = self.conn(db)?;
        let reply = pipe.query::<Vec<::redis::RedisResult<Value>>>(&mut c.conn);
        c.last_check = Instant::now();
        let reply = reply.map_err(|e| command_error("XINFO", &e))?;
        Ok(reply
            .chunks(per_key)
            .map(|part| match part {
                [Ok(stream), Ok(groups), rest @ ..] => {
                    let mut info = parse_info(stream, groups, group);
                    if let ([Ok(list)], Some(ours)) = (rest, consumers) {
                        info.stalled_consumer = stalled_consumer(list, ours);
                    }
                    Some(info)
                }
                _ => None,
            })
            .collect())
    }
}

/// The entry IDs of an extended `XPENDING` reply (one `[id, consumer, idle, deliveries]`
/// array an entry).
fn pending_reply_ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter_map(|item| match item {
            Value::Array(parts) => parts.first().and_then(as_string),
            _ => None,
        })
        .collect()
}

/// The command that reads a key of Redis type `ty`, with its arguments after the key.
pub(super) fn value_command(ty: &str) -> Option<&'static [&'static str]> {
    match ty {
        "string" => Some(&["GET"]),
        "hash" => Some(&["HGETALL"]),
        "list" => Some(&["LRANGE", "0", "-1"]),
        "set" => Some(&["SMEMBERS"]),
        "zset" => Some(&["ZRANGE", "0", "-1", "WITHSCORES"]),
        _ => None,
    }
}

/// What `INFO` and `CONFIG GET databases` say about a server's logical databases.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Databases {
    /// The server's run ID: a different one means Redis restarted.
    pub run_id: String,
    /// How many databases the server has (`None` when CONFIG may not be run).
    pub count: Option<u32>,
    /// The databases that hold at least one key.
    pub nonempty: std::collections::BTreeSet<u8>,
}

impl Databases {
    /// Reads `INFO`'s `run_id:` line and its `# Keyspace` lines (`db3:keys=10,...`).
    pub fn from_info(info: &str, count: Option<u32>) -> Databases {
        let mut out = Databases { count, ..Databases::default() };
        for line in info.lines() {
            if let Some(id) = line.strip_prefix("run_id:") {
                out.run_id = id.trim().to_owned();
            } else if let Some(rest) = line.strip_prefix("db") {
                let Some((n, stats)) = rest.split_once(':') else { continue };
                let keys = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("keys="))
                    .and_then(|k| k.trim().parse::<u64>().ok());
                if let (Ok(n), Some(k)) = (n.parse::<u8>(), keys) {
                    if k > 0 {
                        out.nonempty.insert(n);
                    }
                }
            }
        }
        out
    }

    /// Databases of `range` the server does not have (known only when CONFIG could be read).
    pub fn missing(&self, range: &[u8]) -> Vec<u8> {
        match self.count {
            Some(n) => range.iter().copied().filter(|&db| u32::from(db) >= n).collect(),
            None => Vec::new(),
        }
    }

    /// Does the server have database `db` (as far as is known)?
    pub fn has(&self, db: u8) -> bool {
        self.count.is_none_or(|n| u32::from(db) < n)
    }

    /// The databases of `range` worth scanning: those that hold keys.
    pub fn to_scan(&self, range: &[u8]) -> Vec<u8> {
        range.iter().copied().filter(|db| self.nonempty.contains(db)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_tells_run_id_and_the_databases_with_keys() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n\r\n# Keyspace\r\n\
                    db0:keys=3,expires=0,avg_ttl=0\r\ndb2:keys=0,expires=0\r\ndb12:keys=7,expires=1,avg_ttl=5\r\n";
        let d = Databases::from_info(info, Some(4));
        assert_eq!(d.run_id, "abc123");
        assert_eq!(d.nonempty.iter().copied().collect::<Vec<_>>(), vec![0, 12]);
        let range: Vec<u8> = (0..=15).collect();
        assert_eq!(d.missing(&range), (4..=15).collect::<Vec<u8>>());
        assert_eq!(d.to_scan(&range), vec![0, 12]);
        assert!(d.has(3) && !d.has(4));
        let unknown = Databases::from_info("", None);
        assert!(unknown.missing(&range).is_empty() && unknown.has(15));
    }
}
