//! The Redis side: one connection with timeouts, built from the settings, health-checked.
//!
//! Nothing in this module calls Postgres, so it could run on an I/O thread; the counters it
//! bumps are shared-memory atomics.

use std::time::{Duration, Instant};

use ::redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use crate::error::{classify_connect, Result, SyncError};
use crate::gucs::RedisSettings;
use crate::shmem;

/// Longest wait for a TCP connect and the AUTH/SELECT handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for any reply. Blocking reads (XREADGROUP BLOCK) stay well below it, so a
/// Redis that stops answering (SIGSTOP, a dead link) is noticed instead of hanging the worker.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisConn {
    conn: ::redis::Connection,
    settings: RedisSettings,
    last_check: Instant,
}

impl RedisConn {
    pub fn connect(settings: &RedisSettings) -> Result<RedisConn> {
        let server = settings.server();
        if settings.tls {
            return Err(SyncError::Config(
                "redis_sync.redis_tls = on is not supported by this version yet; set it to off"
                    .into(),
            ));
        }
        let mut redis = RedisConnectionInfo::default().set_db(settings.db as i64);
        if !settings.username.is_empty() {
            redis = redis.set_username(&settings.username);
        }
        if !settings.password.is_empty() {
            redis = redis.set_password(&settings.password);
        }
        let info = ConnectionAddr::Tcp(settings.host.clone(), settings.port)
            .into_connection_info()
            .map_err(|e| classify_connect(&e, &server, &settings.username))?
            .set_redis_settings(redis);
        shmem::bump(|c| &c.redis_ops, 1);
        let client = ::redis::Client::open(info)
            .map_err(|e| classify_connect(&e, &server, &settings.username))?;
        let conn = client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(|e| classify_connect(&e, &server, &settings.username))?;
        conn.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| conn.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| classify_connect(&e, &server, &settings.username))?;
        let mut c = RedisConn { conn, settings: settings.clone(), last_check: Instant::now() };
        // Prove the connection before calling it up.
        c.ping().map_err(|e| SyncError::RedisUnavailable { server, detail: e.to_string() })?;
        Ok(c)
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    pub fn ping(&mut self) -> Result<()> {
        shmem::bump(|c| &c.redis_ops, 1);
        let reply: ::redis::RedisResult<String> = ::redis::cmd("PING").query(&mut self.conn);
        self.last_check = Instant::now();
        match reply {
            Ok(_) => Ok(()),
            Err(e) => Err(SyncError::RedisCommand { command: "PING", detail: e.to_string() }),
        }
    }

    /// PINGs when `interval` has passed since the last successful exchange.
    pub fn check_health(&mut self, interval: Duration) -> Result<()> {
        if self.last_check.elapsed() >= interval {
            self.ping()
        } else {
            Ok(())
        }
    }

    /// When the next health check is due.
    pub fn next_check(&self, interval: Duration) -> Instant {
        self.last_check + interval
    }
}
