//! Connections to Redis: plain or TLS (rustls, the server always verified), authenticated,
//! with connect and I/O timeouts, named for `CLIENT LIST`; and the blocking stream read the
//! reader thread runs on its own connection.

use std::time::{Duration, Instant};

use ::redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Value};

use super::cluster::ClusterLink;
use super::raw::{RawConn, Reply};
use super::reply::{parse_read, RawEntry};
use crate::error::{classify_connect, Result, SyncError};
use crate::gucs::RedisSettings;

/// Longest wait for a TCP connect and the AUTH/SELECT handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for any reply beyond a command's own BLOCK time, so a Redis that stops
/// answering (SIGSTOP, a dead link) is noticed instead of hanging the worker.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection made by the client library, or (stream readers over plain TCP) one with a
/// faster reply parser of its own ([`RawConn`]); both take the same commands.
pub(super) enum Link {
    Library(::redis::Connection),
    Raw(RawConn),
    /// A Redis Cluster, through connections to its primaries.
    Cluster(Box<ClusterLink>),
}

impl Link {
    pub(super) fn set_read_timeout(
        &mut self,
        timeout: Option<Duration>,
    ) -> ::redis::RedisResult<()> {
        match self {
            Link::Library(c) => c.set_read_timeout(timeout),
            Link::Raw(c) => Ok(c.set_read_timeout(timeout)?),
            Link::Cluster(c) => c.set_read_timeout(timeout),
        }
    }
}

impl ::redis::ConnectionLike for Link {
    fn req_packed_command(&mut self, cmd: &[u8]) -> ::redis::RedisResult<Value> {
        match self {
            Link::Library(c) => c.req_packed_command(cmd),
            Link::Raw(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> ::redis::RedisResult<Vec<Value>> {
        match self {
            Link::Library(c) => c.req_packed_commands(cmd, offset, count),
            Link::Raw(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Library(c) => c.get_db(),
            Link::Raw(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Link::Library(c) => c.check_connection(),
            Link::Raw(c) => c.check_connection(),
            Link::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Link::Library(c) => c.is_open(),
            Link::Raw(c) => c.is_open(),
            Link::Cluster(c) => c.is_open(),
        }
    }
}

pub struct RedisConn {
    pub(super) conn: Link,
    /// The last exchange on this connection (a PING is due when it is old).
    pub(super) last_check: Instant,
    read_timeout: Duration,
}

pub(super) fn command_error(command: &'static str, e: &::redis::RedisError) -> SyncError {
    // As Redis wrote it ("NOPERM this user has no permissions ..."), rather than the
    // client library's name for the error kind.
    let detail = match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    };
    SyncError::RedisCommand { command, detail, code: e.code().map(str::to_owned) }
}

/// Several hosts are seed nodes of a cluster, which `redis_cluster` must say.
fn one_server(settings: &RedisSettings) -> Result<()> {
    if settings.host.contains(',') {
        return Err(SyncError::Config(format!(
            "redis_sync.redis_host lists several hosts (\"{}\"): set redis_sync.redis_cluster = on for a Redis Cluster, or name one server",
            settings.host
        )));
    }
    Ok(())
}

/// A connection to database `db` of the configured server (over TLS when `redis_tls` is
/// on), authenticated, with timeouts set.
pub fn open_connection(settings: &RedisSettings, db: u8) -> Result<::redis::Connection> {
    one_server(settings)?;
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
    super::count_round_trip();
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

/// What a read of several streams gave: each stream's key and entries.
pub type StreamEntries = Vec<(Vec<u8>, Vec<RawEntry>)>;

/// The entries of a stream read's reply.
fn entries(reply: Reply) -> Result<StreamEntries> {
    match reply {
        Reply::Entries(e) => Ok(e),
        Reply::Value(v) => {
            parse_read(v).ok_or_else(|| SyncError::protocol("XREADGROUP", "unexpected reply shape"))
        }
    }
}

/// One database's part of [`RedisConn::read_groups`].
pub struct GroupRead<'a> {
    pub db: u8,
    pub group: &'a str,
    pub consumer: &'a str,
    pub count: u32,
    pub streams: Vec<(&'a [u8], &'a str)>,
    pub acks: &'a [(Vec<u8>, Vec<String>)],
}

impl RedisConn {
    pub fn connect(settings: &RedisSettings, db: u8) -> Result<RedisConn> {
        if settings.cluster {
            return RedisConn::cluster(settings, db);
        }
        let conn = Link::Library(open_connection(settings, db)?);
        RedisConn::proven(settings, db, conn)
    }

    /// The worker's connection for reads, passes and discovery: over plain TCP, one with a
    /// reply parser of its own (a read of a thousand entries, or a page of values, is parsed
    /// several times faster); over TLS, or when the server answers the handshake with an
    /// error, the library's (which says what the error is).
    pub fn connect_fast(settings: &RedisSettings, db: u8) -> Result<RedisConn> {
        if settings.cluster {
            return RedisConn::cluster(settings, db);
        }
        one_server(settings)?;
        if settings.tls {
            return RedisConn::connect(settings, db);
        }
        let password = settings.resolve_password().map_err(SyncError::Config)?;
        super::count_round_trip();
        let raw = RawConn::connect(
            &settings.host,
            settings.port,
            &settings.username,
            &password,
            db,
            CONNECT_TIMEOUT,
            IO_TIMEOUT,
        );
        match raw {
            Ok(Some(mut raw)) => {
                let _: ::redis::RedisResult<()> = ::redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(format!("redis_pg_sync-{}", std::process::id()))
                    .query(&mut raw);
                RedisConn::proven(settings, db, Link::Raw(raw))
            }
            // Refused (a wrong password, say): the library connects, or says exactly why not.
            Ok(None) => RedisConn::connect(settings, db),
            Err(e) => Err(SyncError::RedisUnavailable {
                server: format!("{}:{}/{}", settings.host, settings.port, db),
                detail: e.to_string(),
            }),
        }
    }

    /// A connection to a Redis Cluster (`redis_cluster`), its slot map read.
    fn cluster(settings: &RedisSettings, db: u8) -> Result<RedisConn> {
        let link = ClusterLink::connect(settings, db)?;
        Ok(RedisConn {
            conn: Link::Cluster(Box::new(link)),
            last_check: Instant::now(),
            read_timeout: IO_TIMEOUT,
        })
    }

    fn proven(settings: &RedisSettings, db: u8, conn: Link) -> Result<RedisConn> {
        let server = format!("{}:{}/{}", settings.host, settings.port, db);
        let mut c = RedisConn { conn, last_check: Instant::now(), read_timeout: IO_TIMEOUT };
        // Prove the connection before calling it up.
        c.ping().map_err(|e| SyncError::RedisUnavailable { server, detail: e.to_string() })?;
        Ok(c)
    }

    pub(super) fn ping(&mut self) -> Result<()> {
        super::count_round_trip();
        let reply: ::redis::RedisResult<String> = ::redis::cmd("PING").query(&mut self.conn);
        self.last_check = Instant::now();
        reply.map(|_| ()).map_err(|e| command_error("PING", &e))
    }

    /// One `XREADGROUP` over several streams of this connection's database. `streams` pairs
    /// each key with the ID to read after (`0` for our own pending entries, `>` for new
    /// ones); with no streams, only the acknowledgements are sent. The caller accounts for
    /// the round trip in the rate limit.
    ///
    /// `acks` (entries whose rows are committed) are sent as `XACK`s in the same pipelined
    /// round trip, before the read, so a pending re-read never returns them. Each command's
    /// reply is read on its own, so a Redis error of the read (`NOGROUP`, `WRONGTYPE`) keeps
    /// its code; an `XACK` refused because its group is gone needs nothing more (the entry
    /// is no longer pending anywhere).
    pub fn read_group(
        &mut self,
        group: &str,
        consumer: &str,
        count: u32,
        block: Option<Duration>,
        streams: &[(&[u8], &str)],
        acks: &[(Vec<u8>, Vec<String>)],
    ) -> Result<StreamEntries> {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for (key, ids) in acks {
            pipe.cmd("XACK").arg(key).arg(group).arg(ids.as_slice());
        }
        if !streams.is_empty() {
            let cmd = pipe.cmd("XREADGROUP");
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
        } else if acks.is_empty() {
            return Ok(Vec::new());
        }
        self.set_block(block)?;
        let reads = if streams.is_empty() { Vec::new() } else { vec![pipe.len() - 1] };
        let replies = self.query_reads(&pipe, &reads);
        self.last_check = Instant::now();
        let mut replies = replies.map_err(|e| command_error("XREADGROUP", &e))?;
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        match replies.pop() {
            Some(Ok(reply)) => entries(reply),
            Some(Err(e)) => Err(command_error("XREADGROUP", &e)),
            None => Err(SyncError::protocol("XREADGROUP", "missing reply")),
        }
    }

    /// Sends `pipe` (whose errors are ignored) and reads every reply; those at the indices in
    /// `reads` are stream reads, which a connection of our own parses straight into entries.
    fn query_reads(
        &mut self,
        pipe: &::redis::Pipeline,
        reads: &[usize],
    ) -> ::redis::RedisResult<Vec<::redis::RedisResult<Reply>>> {
        match &mut self.conn {
            Link::Raw(c) => Ok(c
                .pipeline(&pipe.get_packed_pipeline(), pipe.len(), reads)?
                .into_iter()
                .map(|r| match r {
                    Reply::Value(Value::ServerError(e)) => Err(e.into()),
                    other => Ok(other),
                })
                .collect()),
            Link::Library(c) => Ok(pipe
                .query::<Vec<::redis::RedisResult<Value>>>(c)?
                .into_iter()
                .map(|r| r.map(Reply::Value))
                .collect()),
            Link::Cluster(c) => Ok(pipe
                .query::<Vec<::redis::RedisResult<Value>>>(c.as_mut())?
                .into_iter()
                .map(|r| r.map(Reply::Value))
                .collect()),
        }
    }

    /// Reads of several databases in one pipelined round trip (none of them blocks): for
    /// each part, `SELECT` its database when it is not the one selected, its
    /// acknowledgements, then its `XREADGROUP`; and back to `home` at the end. Each part gets
    /// its own outcome; a `SELECT` that fails fails the whole call (the connection is then
    /// made again, since what it had selected is unknown).
    pub fn read_groups(
        &mut self,
        home: u8,
        parts: &[GroupRead<'_>],
    ) -> Result<Vec<Result<StreamEntries>>> {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        let mut selects = Vec::new();
        let mut reads = Vec::new();
        let mut n = 0usize;
        let mut current = home;
        for p in parts {
            if p.db != current {
                pipe.cmd("SELECT").arg(p.db);
                selects.push(n);
                n += 1;
                current = p.db;
            }
            for (key, ids) in p.acks {
                pipe.cmd("XACK").arg(key).arg(p.group).arg(ids.as_slice());
                n += 1;
            }
            if p.streams.is_empty() {
                reads.push(None);
                continue;
            }
            let cmd = pipe.cmd("XREADGROUP");
            cmd.arg("GROUP").arg(p.group).arg(p.consumer).arg("COUNT").arg(p.count);
            cmd.arg("STREAMS");
            for (k, _) in &p.streams {
                cmd.arg(*k);
            }
            for (_, id) in &p.streams {
                cmd.arg(*id);
            }
            reads.push(Some(n));
            n += 1;
        }
        if current != home {
            pipe.cmd("SELECT").arg(home);
            selects.push(n);
        }
        self.set_block(None)?;
        let read_at: Vec<usize> = reads.iter().flatten().copied().collect();
        let replies = self.query_reads(&pipe, &read_at);
        self.last_check = Instant::now();
        let mut replies: Vec<Option<::redis::RedisResult<Reply>>> =
            replies.map_err(|e| command_error("XREADGROUP", &e))?.into_iter().map(Some).collect();
        for i in selects {
            if let Some(Some(Err(e))) = replies.get(i) {
                return Err(SyncError::RedisCommand {
                    command: "SELECT",
                    detail: e.to_string(),
                    code: None,
                });
            }
        }
        Ok(reads
            .into_iter()
            .map(|i| {
                let Some(i) = i else { return Ok(Vec::new()) };
                match replies.get_mut(i).and_then(Option::take) {
                    Some(Ok(reply)) => entries(reply),
                    Some(Err(e)) => Err(command_error("XREADGROUP", &e)),
                    None => Err(SyncError::protocol("XREADGROUP", "missing reply")),
                }
            })
            .collect())
    }

    /// Selects database `db` on this connection.
    pub fn select(&mut self, db: u8) -> Result<()> {
        super::count_round_trip();
        let r = ::redis::cmd("SELECT").arg(db).query::<()>(&mut self.conn);
        self.last_check = Instant::now();
        r.map_err(|e| SyncError::RedisCommand {
            command: "SELECT",
            detail: e.to_string(),
            code: None,
        })
    }

    /// This connection's client ID (`CLIENT ID`), for `CLIENT UNBLOCK` from another one.
    pub fn client_id(&mut self) -> Option<u64> {
        if matches!(self.conn, Link::Cluster(_)) {
            // A cluster's reads never block in Redis (and an ID is one node's).
            return None;
        }
        super::count_round_trip();
        ::redis::cmd("CLIENT").arg("ID").query::<u64>(&mut self.conn).ok()
    }

    /// Ends the blocking commands of other connections at once (as if they had timed out):
    /// best effort, a user without the right to run CLIENT lets them end by themselves.
    pub fn unblock(&mut self, ids: &[u64]) {
        let mut pipe = ::redis::pipe();
        for id in ids {
            pipe.cmd("CLIENT").arg("UNBLOCK").arg(*id).ignore();
        }
        super::count_round_trip();
        let _: ::redis::RedisResult<()> = pipe.query(&mut self.conn);
    }

    /// Creates `group` on `key` from the start of the stream (`MKSTREAM` with `mkstream`):
    /// `Ok(true)` when created, `Ok(false)` when it existed already.
    pub fn create_group(&mut self, key: &[u8], group: &str, mkstream: bool) -> Result<bool> {
        let mut cmd = ::redis::cmd("XGROUP");
        cmd.arg("CREATE").arg(key).arg(group).arg("0");
        if mkstream {
            cmd.arg("MKSTREAM");
        }
        super::count_round_trip();
        let reply = cmd.query::<Value>(&mut self.conn);
        self.last_check = Instant::now();
        match reply {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(command_error("XGROUP CREATE", &e)),
        }
    }

    /// The type of each of `keys` (`none` for a missing one), in one round trip.
    pub fn types(&mut self, keys: &[&[u8]]) -> Result<Vec<String>> {
        let mut pipe = ::redis::pipe();
        for k in keys {
            pipe.cmd("TYPE").arg(*k);
        }
        super::count_round_trip();
        let r = pipe.query::<Vec<String>>(&mut self.conn);
        self.last_check = Instant::now();
        r.map_err(|e| command_error("TYPE", &e))
    }

    /// Does `group` exist on `key`?
    pub fn group_exists(&mut self, key: &[u8], group: &str) -> Result<bool> {
        super::count_round_trip();
        let reply = ::redis::cmd("XINFO").arg("GROUPS").arg(key).query::<Value>(&mut self.conn);
        self.last_check = Instant::now();
        match reply {
            Ok(groups) => Ok(super::reply::group_names(&groups).iter().any(|g| g == group)),
            Err(e) if e.code().is_some() => Ok(false),
            Err(e) => Err(command_error("XINFO GROUPS", &e)),
        }
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
