//! The Redis side: connections with timeouts (one per logical database in use), health
//! checks, the token bucket over round trips, and the stream commands the worker needs.
//!
//! Nothing in this module calls Postgres except through the `sleep` callback given to
//! [`Redis::new`] (the worker passes its latch wait); the counters it bumps are atomics.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ::redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Value};

use crate::error::{classify_connect, Result, SyncError};
use crate::gucs::RedisSettings;
use crate::ratelimit::TokenBucket;
use crate::shmem;

/// Longest wait for a TCP connect and the AUTH/SELECT handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for any reply beyond a command's own BLOCK time, so a Redis that stops
/// answering (SIGSTOP, a dead link) is noticed instead of hanging the worker.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One stream entry as read: its ID and its fields, or `None` when the entry was deleted
/// while it sat in the pending list (Redis then returns no fields).
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// What one round trip tells about a key: its type, absolute expiry in Unix milliseconds,
/// and its value when it is a string.
pub type KeyMeta = (String, Option<i64>, Option<Value>);

/// What XINFO says about one stream and our group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamInfo {
    pub length: i64,
    pub first_entry_id: Option<String>,
    pub last_entry_id: Option<String>,
    pub pending: i64,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell.
    pub lag: Option<i64>,
    pub consumers: i64,
    pub group_exists: bool,
    /// Consumer groups of the stream (all of them, not only ours).
    pub groups: i64,
    /// With consumers asked for: the consumer of our group idle longest while holding
    /// pending entries, as (name, idle ms, pending).
    pub stalled_consumer: Option<(String, i64, i64)>,
}

pub struct RedisConn {
    conn: ::redis::Connection,
    last_check: Instant,
    read_timeout: Duration,
}

fn command_error(command: &'static str, e: &::redis::RedisError) -> SyncError {
    SyncError::RedisCommand { command, detail: e.to_string(), code: e.code().map(str::to_owned) }
}

/// A connection to database `db` of the configured server (over TLS when `redis_tls` is
/// on), authenticated, with timeouts set.
pub fn open_connection(settings: &RedisSettings, db: u8) -> Result<::redis::Connection> {
    let server = format!("{}:{}/{}", settings.host, settings.port, db);
    let mut redis = RedisConnectionInfo::default().set_db(db as i64);
    if !settings.username.is_empty() {
        redis = redis.set_username(&settings.username);
    }
    let password = settings.resolve_password().map_err(SyncError::Config)?;
    if !password.is_empty() {
        redis = redis.set_password(&password);
    }
    let fail = |e: ::redis::RedisError| classify_connect(&e, &server, &settings.username);
    let addr = if settings.tls {
        // Verified: the certificate must chain to the CA and name the host.
        ConnectionAddr::TcpTls {
            host: settings.host.clone(),
            port: settings.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(settings.host.clone(), settings.port)
    };
    let info = addr.into_connection_info().map_err(fail)?.set_redis_settings(redis);
    let client = if settings.tls {
        install_crypto_provider();
        ::redis::Client::build_with_tls(info, tls_certificates(settings)?)
    } else {
        ::redis::Client::open(info)
    };
    shmem::bump(|c| &c.redis_ops, 1);
    let conn = client.map_err(fail)?.get_connection_with_timeout(CONNECT_TIMEOUT).map_err(fail)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| conn.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(fail)?;
    // Named for `CLIENT LIST` (best effort: an ACL user may not be allowed to).
    let mut conn = conn;
    let _: ::redis::RedisResult<()> = ::redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(format!("redis_pg_sync-{}", std::process::id()))
        .query(&mut conn);
    Ok(conn)
}

/// rustls needs a process-wide crypto provider; ring's is installed once.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The CA and client certificate files named by the settings, read now (so a renewed
/// certificate is used at the next connection).
fn tls_certificates(settings: &RedisSettings) -> Result<::redis::TlsCertificates> {
    let read = |setting: &str, path: &str| {
        std::fs::read(path).map_err(|e| {
            SyncError::Config(format!("cannot read redis_sync.{setting} \"{path}\": {e}"))
        })
    };
    let root_cert = match settings.tls_ca_file.as_str() {
        "" => None,
        path => Some(read("redis_tls_ca_file", path)?),
    };
    let client_tls = match (settings.tls_cert_file.as_str(), settings.tls_key_file.as_str()) {
        ("", "") => None,
        ("", _) | (_, "") => {
            return Err(SyncError::Config(
                "redis_sync.redis_tls_cert_file and redis_sync.redis_tls_key_file go together: set both or neither".into(),
            ))
        }
        (cert, key) => Some(::redis::ClientTlsConfig {
            client_cert: read("redis_tls_cert_file", cert)?,
            client_key: read("redis_tls_key_file", key)?,
        }),
    };
    Ok(::redis::TlsCertificates { client_tls, root_cert })
}

impl RedisConn {
    pub fn connect(settings: &RedisSettings, db: u8) -> Result<RedisConn> {
        let server = format!("{}:{}/{}", settings.host, settings.port, db);
        let conn = open_connection(settings, db)?;
        let mut c = RedisConn { conn, last_check: Instant::now(), read_timeout: IO_TIMEOUT };
        // Prove the connection before calling it up.
        c.ping().map_err(|e| SyncError::RedisUnavailable { server, detail: e.to_string() })?;
        Ok(c)
    }

    fn ping(&mut self) -> Result<()> {
        shmem::bump(|c| &c.redis_ops, 1);
        let reply: ::redis::RedisResult<String> = ::redis::cmd("PING").query(&mut self.conn);
        self.last_check = Instant::now();
        reply.map(|_| ()).map_err(|e| command_error("PING", &e))
    }

    /// One `XREADGROUP` over several streams of this connection's database. `streams` pairs
    /// each key with the ID to read after (`0` for our own pending entries, `>` for new
    /// ones). The caller accounts for the round trip in the rate limit.
    ///
    /// `acks` (entries whose rows are committed) are sent as `XACK`s in the same pipelined
    /// round trip, before the read, so a pending re-read never returns them.
    pub fn read_group(
        &mut self,
        group: &str,
        consumer: &str,
        count: u32,
        block: Option<Duration>,
        streams: &[(&[u8], &str)],
        acks: &[(Vec<u8>, Vec<String>)],
    ) -> Result<Vec<(Vec<u8>, Vec<RawEntry>)>> {
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for (k, _) in streams {
            cmd.arg(*k);
        }
        for (_, id) in streams {
            cmd.arg(*id);
        }
        self.set_block(block)?;
        shmem::bump(|c| &c.redis_ops, 1);
        let reply = if acks.is_empty() {
            cmd.query::<Value>(&mut self.conn)
        } else {
            let mut pipe = ::redis::pipe();
            for (key, ids) in acks {
                pipe.cmd("XACK").arg(key).arg(group).arg(ids.as_slice()).ignore();
            }
            pipe.add_command(cmd);
            pipe.query::<Vec<Value>>(&mut self.conn).map(|mut v| v.pop().unwrap_or(Value::Nil))
        };
        self.last_check = Instant::now();
        let reply = reply.map_err(|e| command_error("XREADGROUP", &e))?;
        parse_read(reply).ok_or_else(|| SyncError::protocol("XREADGROUP", "unexpected reply shape"))
    }

    fn set_block(&mut self, block: Option<Duration>) -> Result<()> {
        let want = IO_TIMEOUT + block.unwrap_or_default();
        if want != self.read_timeout {
            self.conn.set_read_timeout(Some(want)).map_err(|e| command_error("SET TIMEOUT", &e))?;
            self.read_timeout = want;
        }
        Ok(())
    }
}

/// All connections to one Redis server, keyed by logical database, plus the rate limit.
pub struct Redis {
    settings: RedisSettings,
    conns: BTreeMap<u8, RedisConn>,
    bucket: TokenBucket,
    sleep: fn(Duration),
    round_trips: u64,
}

impl Redis {
    /// Connects to the default database of `settings`.
    pub fn connect(
        settings: &RedisSettings,
        rate_limit: u32,
        sleep: fn(Duration),
    ) -> Result<Redis> {
        let main = RedisConn::connect(settings, settings.db)?;
        let mut conns = BTreeMap::new();
        conns.insert(settings.db, main);
        Ok(Redis {
            settings: settings.clone(),
            conns,
            bucket: TokenBucket::new(rate_limit, Instant::now()),
            sleep,
            round_trips: 0,
        })
    }

    pub fn set_rate_limit(&mut self, rate: u32) {
        if rate != self.bucket.rate() {
            self.bucket.set_rate(rate, Instant::now());
        }
    }

    /// Waits for a token of the rate limit, for a round trip made elsewhere (the reader
    /// thread counts its own round trips).
    pub fn take_token(&mut self) {
        while let Err(wait) = self.bucket.try_take(Instant::now()) {
            (self.sleep)(wait);
        }
    }

    /// Waits for a token and counts the round trip about to be made.
    fn throttle(&mut self) {
        self.take_token();
        self.round_trips += 1;
        shmem::bump(|c| &c.redis_ops, 1);
    }

    /// Round trips made through this value so far.
    pub fn round_trips(&self) -> u64 {
        self.round_trips
    }

    fn conn(&mut self, db: u8) -> Result<&mut RedisConn> {
        if !self.conns.contains_key(&db) {
            let c = RedisConn::connect(&self.settings, db)?;
            self.conns.insert(db, c);
        }
        self.conns.get_mut(&db).ok_or_else(|| SyncError::Config("no connection".into()))
    }

    /// Closes the connections of databases not in `keep` (the default database stays).
    pub fn retain_connections(&mut self, keep: &std::collections::BTreeSet<u8>) {
        let main = self.settings.db;
        self.conns.retain(|db, _| *db == main || keep.contains(db));
    }

    /// PINGs every connection whose last exchange is older than `interval`.
    pub fn check_health(&mut self, interval: Duration) -> Result<()> {
        for c in self.conns.values_mut() {
            if c.last_check.elapsed() >= interval {
                c.ping()?;
            }
        }
        Ok(())
    }

    /// When the next health check is due.
    pub fn next_check(&self, interval: Duration) -> Instant {
        self.conns.values().map(|c| c.last_check + interval).min().unwrap_or_else(Instant::now)
    }

    fn query(&mut self, db: u8, name: &'static str, cmd: &::redis::Cmd) -> Result<Value> {
        // (VerbatimString replies, e.g. INFO under RESP3, are read as plain text by as_string.)
        self.throttle();
        let c = self.conn(db)?;
        let reply = cmd.query::<Value>(&mut c.conn);
        c.last_check = Instant::now();
        reply.map_err(|e| command_error(name, &e))
    }

    /// `SCAN ... MATCH glob TYPE stream COUNT n` over the whole keyspace of every database
    /// in `dbs`, for every glob: the pages of all databases go in one pipelined round trip
    /// on the default connection (`SELECT n` before each, back to the default at the end).
    /// Returns `(db, key)` pairs, possibly with repeats across globs.
    pub fn scan_streams(
        &mut self,
        dbs: &[u8],
        globs: &[Vec<u8>],
        count: u32,
    ) -> Result<Vec<(u8, Vec<u8>)>> {
        let main = self.settings.db;
        // (db, glob index, cursor) still to scan.
        let mut todo: Vec<(u8, usize, u64)> =
            dbs.iter().flat_map(|&db| (0..globs.len()).map(move |g| (db, g, 0u64))).collect();
        let mut keys = Vec::new();
        while !todo.is_empty() {
            let mut pipe = ::redis::pipe();
            for &(db, g, cursor) in &todo {
                pipe.cmd("SELECT").arg(db).ignore();
                pipe.cmd("SCAN").arg(cursor).arg("MATCH").arg(&globs[g]).arg("COUNT").arg(count);
                pipe.arg("TYPE").arg("stream");
            }
            pipe.cmd("SELECT").arg(main).ignore();
            self.throttle();
            let c = self.conn(main)?;
            let reply = pipe.query::<Vec<Value>>(&mut c.conn);
            c.last_check = Instant::now();
            let replies = reply.map_err(|e| command_error("SCAN", &e))?;
            if replies.len() != todo.len() {
                return Err(SyncError::protocol("SCAN", "unexpected number of replies"));
            }
            let mut next = Vec::new();
            for ((db, g, _), reply) in todo.into_iter().zip(replies) {
                let (cursor, batch) = parse_scan(reply)
                    .ok_or_else(|| SyncError::protocol("SCAN", "unexpected reply shape"))?;
                keys.extend(batch.into_iter().map(|k| (db, k)));
                if cursor != 0 {
                    next.push((db, g, cursor));
                }
            }
            todo = next;
        }
        Ok(keys)
    }

    /// Runs the commands `build` adds against database `db` in one pipelined round trip on
    /// the default connection (`SELECT db` first and back after); returns their replies.
    fn pipeline_in(
        &mut self,
        db: u8,
        name: &'static str,
        build: impl FnOnce(&mut ::redis::Pipeline),
    ) -> Result<Vec<Value>> {
        self.pipeline_in_lenient(db, name, build)?
            .into_iter()
            .map(|r| r.map_err(|e| command_error(name, &e)))
            .collect()
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

    /// Type, expiry and (for strings) value of every key. One pipelined round trip carries
    /// an `MGET` of all the keys and a `PEXPIRETIME` of each: most keys are strings, whose
    /// value and expiry are then known (one command for a page of values, which is what
    /// makes a pass over a million keys cheap for Redis). Keys `MGET` had no value for
    /// (other types, or gone) get a `TYPE` in a second round trip. The expiry is the
    /// absolute Unix time in milliseconds (stable from pass to pass, unlike a TTL), `None`
    /// for none; the value is `None` unless the key is a string.
    pub fn key_meta(&mut self, db: u8, keys: &[Vec<u8>]) -> Result<Vec<KeyMeta>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let replies = self.pipeline_in_lenient(db, "MGET", |p| {
            p.cmd("MGET");
            for k in keys {
                p.arg(k);
            }
            for k in keys {
                p.cmd("PEXPIRETIME").arg(k);
            }
        })?;
        if replies.len() != keys.len() + 1 {
            return Err(SyncError::protocol("MGET", "unexpected number of replies"));
        }
        let mut it = replies.into_iter();
        let values = match it.next() {
            Some(Ok(Value::Array(values))) if values.len() == keys.len() => values,
            Some(Err(e)) => return Err(command_error("MGET", &e)),
            _ => return Err(SyncError::protocol("MGET", "unexpected reply shape")),
        };
        let mut out: Vec<KeyMeta> = values
            .into_iter()
            .zip(it)
            .map(|(value, exp)| {
                let exp = exp.ok().as_ref().and_then(as_int).filter(|v| *v >= 0);
                match value {
                    Value::Nil => (String::new(), exp, None),
                    v => ("string".to_owned(), exp, Some(v)),
                }
            })
            .collect();
        let untyped: Vec<usize> =
            out.iter().enumerate().filter(|(_, m)| m.2.is_none()).map(|(i, _)| i).collect();
        if !untyped.is_empty() {
            let untyped_keys: Vec<&[u8]> = untyped.iter().map(|&i| keys[i].as_slice()).collect();
            let types = self.key_types(db, &untyped_keys)?;
            // (A key that became a string after the MGET gets its value with the others.)
            for (i, ty) in untyped.into_iter().zip(types) {
                out[i].0 = ty;
            }
        }
        Ok(out)
    }

    /// As [`Redis::pipeline_in`], but a command's error reply is returned in its place
    /// rather than failing the whole round trip (a failed `SELECT` still fails it: the
    /// commands would have run against another database).
    fn pipeline_in_lenient(
        &mut self,
        db: u8,
        name: &'static str,
        build: impl FnOnce(&mut ::redis::Pipeline),
    ) -> Result<Vec<::redis::RedisResult<Value>>> {
        let main = self.settings.db;
        let switch = db != main;
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        if switch {
            pipe.cmd("SELECT").arg(db);
        }
        build(&mut pipe);
        if switch {
            pipe.cmd("SELECT").arg(main);
        }
        self.throttle();
        let c = self.conn(main)?;
        let reply = pipe.query::<Vec<::redis::RedisResult<Value>>>(&mut c.conn);
        c.last_check = Instant::now();
        let mut replies = reply.map_err(|e| command_error(name, &e))?;
        if switch {
            let back = replies.pop();
            let first = if replies.is_empty() { None } else { Some(replies.remove(0)) };
            for select in [first, back] {
                match select {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(command_error("SELECT", &e)),
                    None => return Err(SyncError::protocol("SELECT", "missing reply")),
                }
            }
        }
        Ok(replies)
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

    /// The server's run ID: a different one means Redis restarted.
    pub fn run_id(&mut self) -> Result<String> {
        let main = self.settings.db;
        let reply = self.query(main, "INFO", ::redis::cmd("INFO").arg("server"))?;
        let text = as_string(&reply).unwrap_or_default();
        Ok(text.lines().find_map(|l| l.strip_prefix("run_id:")).unwrap_or("").trim().to_owned())
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

    /// Acknowledges entries, one `XACK` per stream, all in one pipelined round trip.
    pub fn ack(&mut self, db: u8, group: &str, acks: &[(&[u8], Vec<&str>)]) -> Result<()> {
        if acks.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        for (key, ids) in acks {
            pipe.cmd("XACK").arg(*key).arg(group).arg(ids.as_slice()).ignore();
        }
        self.throttle();
        let c = self.conn(db)?;
        let reply = pipe.query::<()>(&mut c.conn);
        c.last_check = Instant::now();
        reply.map_err(|e| command_error("XACK", &e))
    }

    /// Claims entries of other consumers idle longer than `min_idle` into our pending list
    /// (`XAUTOCLAIM ... JUSTID`); returns how many were claimed.
    pub fn claim_idle(
        &mut self,
        db: u8,
        key: &[u8],
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: u32,
    ) -> Result<usize> {
        let mut start = "0-0".to_owned();
        let mut claimed = 0;
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
            claimed += match parts.get(1) {
                Some(Value::Array(ids)) => ids.len(),
                _ => 0,
            };
            if next == "0-0" {
                break;
            }
            start = next;
        }
        Ok(claimed)
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

impl SyncError {
    fn protocol(command: &'static str, detail: &str) -> SyncError {
        SyncError::RedisCommand { command, detail: detail.to_owned(), code: None }
    }
}

/// The command that reads a key of Redis type `ty`, with its arguments after the key.
fn value_command(ty: &str) -> Option<&'static [&'static str]> {
    match ty {
        "string" => Some(&["GET"]),
        "hash" => Some(&["HGETALL"]),
        "list" => Some(&["LRANGE", "0", "-1"]),
        "set" => Some(&["SMEMBERS"]),
        "zset" => Some(&["ZRANGE", "0", "-1", "WITHSCORES"]),
        _ => None,
    }
}

/// A reply of bulk strings (array, set or map flattened), as byte strings.
pub fn bulk_list(v: Value) -> Vec<Vec<u8>> {
    match v {
        Value::Array(items) | Value::Set(items) => {
            items.into_iter().filter_map(into_bytes).collect()
        }
        Value::Map(pairs) => {
            pairs.into_iter().flat_map(|(k, v)| [k, v]).filter_map(into_bytes).collect()
        }
        other => into_bytes(other).into_iter().collect(),
    }
}

fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Double(d) => Some(d.to_string().into_bytes()),
        _ => None,
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::VerbatimString { text, .. } => Some(text.clone()),
        other => as_bytes(other).map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

fn parse_scan(reply: Value) -> Option<(u64, Vec<Vec<u8>>)> {
    let Value::Array(mut parts) = reply else { return None };
    if parts.len() != 2 {
        return None;
    }
    let keys = match parts.pop()? {
        Value::Array(keys) => keys
            .into_iter()
            .filter_map(|k| match k {
                Value::BulkString(b) => Some(b),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    let cursor = as_string(&parts[0])?.parse().ok()?;
    Some((cursor, keys))
}

/// Parses an XREADGROUP reply (RESP2 array or RESP3 map; nil when nothing came).
pub fn parse_read(reply: Value) -> Option<Vec<(Vec<u8>, Vec<RawEntry>)>> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Some(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key = kv.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect::<Option<_>>()?,
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    pairs
        .into_iter()
        .map(|(key, entries)| {
            let Value::BulkString(key) = key else { return None };
            let Value::Array(entries) = entries else { return None };
            let entries = entries.into_iter().map(parse_entry).collect::<Option<Vec<_>>>()?;
            Some((key, entries))
        })
        .collect()
}

fn parse_entry(v: Value) -> Option<RawEntry> {
    let Value::Array(mut parts) = v else { return None };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = as_string(&parts[0])?;
    let fields = match fields {
        Value::Nil => None,
        Value::Array(flat) => {
            let mut out = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(n), Some(v)) = (it.next(), it.next()) {
                match (n, v) {
                    (Value::BulkString(n), Value::BulkString(v)) => out.push((n, v)),
                    _ => return None,
                }
            }
            Some(out)
        }
        Value::Map(pairs) => Some(
            pairs
                .into_iter()
                .map(|(n, v)| match (n, v) {
                    (Value::BulkString(n), Value::BulkString(v)) => Some((n, v)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?,
        ),
        _ => return None,
    };
    Some(RawEntry { id, fields })
}

/// Field/value pairs of an XINFO reply (flat array in RESP2, map in RESP3).
fn info_pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => as_string(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => {
            pairs.iter().filter_map(|(k, v)| as_string(k).map(|k| (k, v))).collect()
        }
        _ => Vec::new(),
    }
}

fn entry_id_of(v: &Value) -> Option<String> {
    match v {
        Value::Array(parts) => parts.first().and_then(as_string),
        _ => None,
    }
}

/// The consumer idle longest among those holding pending entries, other than `ours` (in
/// monitor mode our own consumer is idle on purpose).
fn stalled_consumer(consumers: &Value, ours: &str) -> Option<(String, i64, i64)> {
    let Value::Array(list) = consumers else { return None };
    list.iter()
        .filter_map(|c| {
            let pairs = info_pairs(c);
            let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            let pending = get("pending").and_then(as_int).unwrap_or(0);
            let idle = get("idle").and_then(as_int).unwrap_or(0);
            let name = get("name").and_then(as_string).unwrap_or_default();
            (pending > 0 && name != ours).then_some((name, idle, pending))
        })
        .max_by_key(|(_, idle, _)| *idle)
}

fn parse_info(stream: &Value, groups: &Value, group: &str) -> StreamInfo {
    let mut info = StreamInfo::default();
    for (k, v) in info_pairs(stream) {
        match k.as_str() {
            "length" => info.length = as_int(v).unwrap_or(0),
            "first-entry" => info.first_entry_id = entry_id_of(v),
            "last-entry" => info.last_entry_id = entry_id_of(v),
            _ => {}
        }
    }
    if let Value::Array(groups) = groups {
        info.groups = groups.len() as i64;
        for g in groups {
            let pairs = info_pairs(g);
            let name = pairs.iter().find(|(k, _)| k == "name").and_then(|(_, v)| as_string(v));
            if name.as_deref() != Some(group) {
                continue;
            }
            info.group_exists = true;
            for (k, v) in &pairs {
                match k.as_str() {
                    "pending" => info.pending = as_int(v).unwrap_or(0),
                    "consumers" => info.consumers = as_int(v).unwrap_or(0),
                    "lag" => info.lag = as_int(v),
                    _ => {}
                }
            }
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn read_reply_with_deleted_entry() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"s1"),
            Value::Array(vec![
                Value::Array(vec![bulk(b"1-0"), Value::Array(vec![bulk(b"a"), bulk(b"\xff")])]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let got = parse_read(reply).expect("parsed");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, b"s1");
        assert_eq!(got[0].1[0].fields, Some(vec![(b"a".to_vec(), b"\xff".to_vec())]));
        assert_eq!(got[0].1[1], RawEntry { id: "2-0".into(), fields: None });
        assert_eq!(parse_read(Value::Nil), Some(vec![]));
        assert_eq!(parse_read(Value::Int(3)), None);
    }

    #[test]
    fn info_reply() {
        let stream = Value::Array(vec![
            bulk(b"length"),
            Value::Int(3),
            bulk(b"first-entry"),
            Value::Array(vec![bulk(b"1-0"), Value::Array(vec![])]),
            bulk(b"last-entry"),
            Value::Array(vec![bulk(b"3-0"), Value::Array(vec![])]),
        ]);
        let groups = Value::Array(vec![Value::Array(vec![
            bulk(b"name"),
            bulk(b"g"),
            bulk(b"consumers"),
            Value::Int(2),
            bulk(b"pending"),
            Value::Int(1),
            bulk(b"lag"),
            Value::Int(0),
        ])]);
        let i = parse_info(&stream, &groups, "g");
        assert_eq!(i.length, 3);
        assert_eq!(i.first_entry_id.as_deref(), Some("1-0"));
        assert_eq!(i.last_entry_id.as_deref(), Some("3-0"));
        assert_eq!((i.pending, i.consumers, i.lag, i.group_exists), (1, 2, Some(0), true));
        assert!(!parse_info(&stream, &groups, "other").group_exists);
    }
}
