//! Every `redis_sync.*` setting: definition, validation (check hooks) and typed getters.
//!
//! Restart-only settings use `PGC_POSTMASTER`; everything else is `PGC_SIGHUP`, picked up by
//! `pg_reload_conf()`. Text settings that have a form (ranges, identifiers) are validated by
//! a check hook, so a bad value is refused by `ALTER SYSTEM` and ignored (with a log line) on
//! reload, and the worker keeps its last good value.

use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::{pg_guard, pg_sys, PostgresGucEnum};

use crate::parse;

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    #[name = c"sync"]
    Sync,
    #[name = c"monitor"]
    Monitor,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Monitor => "monitor",
        }
    }
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub enum LogLevel {
    #[name = c"debug"]
    Debug,
    #[name = c"info"]
    Info,
    #[name = c"notice"]
    Notice,
    #[name = c"warning"]
    Warning,
    #[name = c"error"]
    Error,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyValueDeletes {
    #[name = c"mark"]
    Mark,
    #[name = c"delete"]
    Delete,
    #[name = c"ignore"]
    Ignore,
}

/// When a landed stream entry is acknowledged in Redis (`XACK`): once its commit is flushed
/// here, or once the standbys have flushed it too.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum AckAfter {
    #[name = c"local"]
    Local,
    #[name = c"standby"]
    Standby,
}

type Text = GucSetting<Option<CString>>;

macro_rules! text {
    ($name:ident, $default:expr) => {
        pub static $name: Text = Text::new($default);
    };
}

text!(DATABASE, Some(c"postgres"));
text!(ROLE, Some(c""));
text!(REDIS_HOST, Some(c"localhost"));
text!(REDIS_USERNAME, Some(c""));
text!(REDIS_PASSWORD, Some(c""));
text!(REDIS_TLS_CA_FILE, Some(c""));
text!(REDIS_TLS_CERT_FILE, Some(c""));
text!(REDIS_TLS_KEY_FILE, Some(c""));
text!(REDIS_PASSWORD_FILE, Some(c""));
text!(DB_SEARCH_RANGE, Some(c"0-15"));
text!(STREAMS, Some(c""));
text!(CONSUMER_GROUP, Some(c"redis-pg-sync"));
text!(CONSUMER_NAME, Some(c""));
text!(STREAM_DISCOVERY_PATTERNS, Some(c"*"));
text!(KEY_VALUE_PATTERNS, Some(c"*"));
text!(SCHEMA, Some(c"public"));
text!(STREAM_TABLE, Some(c"redis_streams"));
text!(KEY_VALUE_TABLE, Some(c"redis_key_values"));

pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static REDIS_TLS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static REDIS_CLUSTER: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static STREAM_AUTO_DISCOVERY: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static AUTO_CREATE_CONSUMER_GROUPS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static STREAM_CONFLICT_OVERWRITE: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static KEY_VALUE_AUTO_DISCOVERY: GucSetting<bool> = GucSetting::<bool>::new(true);

pub static MODE: GucSetting<Mode> = GucSetting::<Mode>::new(Mode::Sync);
pub static LOG_LEVEL: GucSetting<LogLevel> = GucSetting::<LogLevel>::new(LogLevel::Info);
pub static KEY_VALUE_DELETES: GucSetting<KeyValueDeletes> =
    GucSetting::<KeyValueDeletes>::new(KeyValueDeletes::Mark);
pub static ACK_AFTER: GucSetting<AckAfter> = GucSetting::<AckAfter>::new(AckAfter::Local);

pub static REDIS_PORT: GucSetting<i32> = GucSetting::<i32>::new(6379);
pub static REDIS_DB: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static HEALTH_CHECK_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static MAX_RETRIES: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static RATE_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static STREAM_DISCOVERY_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static CLAIM_MIN_IDLE_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static SYNC_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static MONITOR_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static KEY_VALUE_VERIFY_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(600);
pub static QUERY_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static DEAD_LETTER_MAX: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
pub static DEAD_LETTER_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static KEY_VALUE_MAX_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static KEY_VALUE_MAX_REMEMBERED: GucSetting<i32> = GucSetting::<i32>::new(2_000_000);
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);

/// Most stream workers `redis_sync.workers` may ask for.
pub const MAX_STREAM_WORKERS: usize = 8;

/// Which stream worker this process is (0 for the first, and in every other process).
static STREAM_WORKER: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// This process's stream-worker index.
pub fn stream_worker() -> u8 {
    STREAM_WORKER.load(std::sync::atomic::Ordering::Relaxed)
}

/// Called once by a stream worker at its start, before it loads the settings.
pub fn set_stream_worker(index: u8) {
    STREAM_WORKER.store(index, std::sync::atomic::Ordering::Relaxed);
}

const HOUR_S: i32 = 3600;
const DAY_S: i32 = 86_400;
const DAY_MS: i32 = 86_400_000;

/// Defines every setting. Called from `_PG_init` in every process that loads the library.
pub fn init() {
    let none = GucFlags::default();
    let ms = GucFlags::UNIT_MS;
    let s = GucFlags::UNIT_S;

    // Restart-only settings can only be defined while preloading (Postgres refuses
    // PGC_POSTMASTER variables after startup); without preload there is no worker to use them.
    // SAFETY: a flag of the postmaster's start-up, read while the library loads.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        string(
            c"redis_sync.database",
            c"Database the worker connects to and writes into.",
            &DATABASE,
            GucContext::Postmaster,
            none,
            Some(check_not_empty),
        );
        string(
            c"redis_sync.role",
            c"Role the worker writes as (empty: the bootstrap superuser).",
            &ROLE,
            GucContext::Postmaster,
            none,
            None,
        );
        int(
            c"redis_sync.workers",
            c"Stream worker processes; each tracked stream belongs to one of them (restart).",
            &WORKERS,
            1,
            MAX_STREAM_WORKERS as i32,
            GucContext::Postmaster,
            none,
        );
    }
    bool_(
        c"redis_sync.enabled",
        c"Sync when on; pause (state paused) when off.",
        &ENABLED,
        GucContext::Sighup,
    );
    GucRegistry::define_enum_guc(
        c"redis_sync.mode",
        c"sync: copy streams and keys into tables; monitor: only report stream health.",
        c"",
        &MODE,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_enum_guc(
        c"redis_sync.log_level",
        c"Verbosity of the worker's own log lines.",
        c"",
        &LOG_LEVEL,
        GucContext::Sighup,
        none,
    );
    string(
        c"redis_sync.redis_host",
        c"Redis host name or address; with redis_cluster, seed nodes as host[:port], comma-separated.",
        &REDIS_HOST,
        GucContext::Sighup,
        none,
        Some(check_host),
    );
    int(
        c"redis_sync.redis_port",
        c"Redis TCP port.",
        &REDIS_PORT,
        1,
        65535,
        GucContext::Sighup,
        none,
    );
    string(
        c"redis_sync.redis_username",
        c"Redis ACL user name (empty: the default user).",
        &REDIS_USERNAME,
        GucContext::Sighup,
        none,
        None,
    );
    // The password: superuser-only, hidden from SHOW ALL and from pg_settings for others,
    // and shown masked even to superusers.
    // SAFETY: the setting and the show hook are statics that live as long as the process.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"redis_sync.redis_password",
            c"Redis password (superuser-only, never logged).",
            c"",
            &REDIS_PASSWORD,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            None,
            Some(show_password),
        );
    }
    int(
        c"redis_sync.redis_db",
        c"Default Redis database; streams in other databases are stored as db{N}:{name}.",
        &REDIS_DB,
        0,
        parse::MAX_REDIS_DB as i32,
        GucContext::Sighup,
        none,
    );
    string(
        c"redis_sync.redis_password_file",
        c"File holding the Redis password (readable by the server's OS user only); \
          instead of redis_sync.redis_password.",
        &REDIS_PASSWORD_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
        None,
    );
    bool_(c"redis_sync.redis_tls", c"Connect to Redis over TLS.", &REDIS_TLS, GucContext::Sighup);
    bool_(
        c"redis_sync.redis_cluster",
        c"Redis is a Redis Cluster: redis_host lists seed nodes (host[:port], comma-separated); database 0 only.",
        &REDIS_CLUSTER,
        GucContext::Sighup,
    );
    string(
        c"redis_sync.redis_tls_ca_file",
        c"CA certificates (PEM) that verify the Redis server with TLS; empty: the system's.",
        &REDIS_TLS_CA_FILE,
        GucContext::Sighup,
        none,
        None,
    );
    string(
        c"redis_sync.redis_tls_cert_file",
        c"Client certificate (PEM) for Redis with tls-auth-clients; empty: none.",
        &REDIS_TLS_CERT_FILE,
        GucContext::Sighup,
        none,
        None,
    );
    string(
        c"redis_sync.redis_tls_key_file",
        c"Private key (PEM) of the client certificate.",
        &REDIS_TLS_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
        None,
    );
    string(
        c"redis_sync.db_search_range",
        c"Redis databases searched by discovery, e.g. 0-15 or 0,2,5-7.",
        &DB_SEARCH_RANGE,
        GucContext::Sighup,
        none,
        Some(check_db_range),
    );
    int(
        c"redis_sync.health_check_interval",
        c"How often the Redis connection is checked with PING.",
        &HEALTH_CHECK_INTERVAL_S,
        1,
        DAY_S,
        GucContext::Sighup,
        s,
    );
    int(
        c"redis_sync.max_retries",
        c"Consecutive failures of one operation before the worker reports backing_off.",
        &MAX_RETRIES,
        1,
        1_000_000,
        GucContext::Sighup,
        none,
    );
    int(
        c"redis_sync.backoff_base",
        c"First retry delay; doubles per failure up to backoff_max.",
        &BACKOFF_BASE_MS,
        1,
        HOUR_S * 1000,
        GucContext::Sighup,
        ms,
    );
    int(
        c"redis_sync.backoff_max",
        c"Longest retry delay.",
        &BACKOFF_MAX_MS,
        1,
        DAY_MS,
        GucContext::Sighup,
        ms,
    );
    int(
        c"redis_sync.rate_limit",
        c"Redis round trips per second, shared by the lanes (stream reads first); 0 = unlimited.",
        &RATE_LIMIT,
        0,
        10_000_000,
        GucContext::Sighup,
        none,
    );
    string(
        c"redis_sync.streams",
        c"Comma-separated stream keys always synced.",
        &STREAMS,
        GucContext::Sighup,
        none,
        None,
    );
    string(
        c"redis_sync.consumer_group",
        c"Consumer group the worker reads streams through.",
        &CONSUMER_GROUP,
        GucContext::Sighup,
        none,
        Some(check_not_empty),
    );
    string(
        c"redis_sync.consumer_name",
        c"Consumer name of the worker within its group; empty: redis-pg-sync-<system identifier>-<database>.",
        &CONSUMER_NAME,
        GucContext::Sighup,
        none,
        None,
    );
    int(
        c"redis_sync.batch_size",
        c"Entries read per stream per XREADGROUP and written per transaction.",
        &BATCH_SIZE,
        1,
        100_000,
        GucContext::Sighup,
        none,
    );
    int(
        c"redis_sync.poll_interval",
        c"Longest time a read waits in Redis when there is nothing to read (a new entry ends \
          the wait at once).",
        &POLL_INTERVAL_MS,
        1,
        60_000,
        GucContext::Sighup,
        ms,
    );
    bool_(
        c"redis_sync.stream_auto_discovery",
        c"Discover streams matching stream_discovery_patterns.",
        &STREAM_AUTO_DISCOVERY,
        GucContext::Sighup,
    );
    string(
        c"redis_sync.stream_discovery_patterns",
        c"Comma-separated fnmatch patterns of stream keys to discover.",
        &STREAM_DISCOVERY_PATTERNS,
        GucContext::Sighup,
        none,
        None,
    );
    int(
        c"redis_sync.stream_discovery_interval",
        c"How often discovery scans for new streams.",
        &STREAM_DISCOVERY_INTERVAL_S,
        1,
        DAY_S,
        GucContext::Sighup,
        s,
    );
    bool_(
        c"redis_sync.auto_create_consumer_groups",
        c"Create the consumer group of a stream when missing.",
        &AUTO_CREATE_CONSUMER_GROUPS,
        GucContext::Sighup,
    );
    bool_(
        c"redis_sync.stream_conflict_overwrite",
        c"On a duplicate stream entry: off = keep the stored row, on = overwrite it.",
        &STREAM_CONFLICT_OVERWRITE,
        GucContext::Sighup,
    );
    int(
        c"redis_sync.claim_min_idle",
        c"Pending entries of other consumers idle this long are claimed.",
        &CLAIM_MIN_IDLE_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        ms,
    );
    bool_(
        c"redis_sync.key_value_auto_discovery",
        c"Mirror keys matching key_value_patterns into the key-value table.",
        &KEY_VALUE_AUTO_DISCOVERY,
        GucContext::Sighup,
    );
    string(
        c"redis_sync.key_value_patterns",
        c"Comma-separated fnmatch patterns of keys to mirror.",
        &KEY_VALUE_PATTERNS,
        GucContext::Sighup,
        none,
        None,
    );
    GucRegistry::define_enum_guc(
        c"redis_sync.ack_after",
        c"When a landed stream entry is acknowledged in Redis: local (its commit is flushed \
          here) or standby (the standbys have flushed it too).",
        c"With standby, as many standbys as synchronous_standby_names requires, or when that \
          is empty, every connected streaming standby, must have flushed the commit; until \
          then the entries stay pending in Redis. With the setting empty and no standby \
          connected for 10 s, acknowledgements follow the local flush.",
        &ACK_AFTER,
        GucContext::Sighup,
        none,
    );
    int(
        c"redis_sync.sync_interval",
        c"How often a key-value pass runs.",
        &SYNC_INTERVAL_MS,
        10,
        DAY_MS,
        GucContext::Sighup,
        ms,
    );
    GucRegistry::define_enum_guc(
        c"redis_sync.key_value_deletes",
        c"A key gone from Redis: mark (set deleted_at), delete (remove the row) or ignore.",
        c"",
        &KEY_VALUE_DELETES,
        GucContext::Sighup,
        none,
    );
    int(
        c"redis_sync.key_value_verify_interval",
        c"How often a key-value pass compares every key with the table instead of trusting \
          what the worker remembers of unchanged keys (0: every pass).",
        &KEY_VALUE_VERIFY_INTERVAL_S,
        0,
        DAY_S,
        GucContext::Sighup,
        s,
    );
    int(
        c"redis_sync.monitor_interval",
        c"How often monitor mode reports stream health.",
        &MONITOR_INTERVAL_S,
        1,
        DAY_S,
        GucContext::Sighup,
        s,
    );
    for (name, setting, desc) in [
        (c"redis_sync.schema", &SCHEMA, c"Schema of the worker's tables."),
        (c"redis_sync.stream_table", &STREAM_TABLE, c"Table stream entries land in."),
        (c"redis_sync.key_value_table", &KEY_VALUE_TABLE, c"Table keys are mirrored into."),
    ] {
        string(name, desc, setting, GucContext::Sighup, none, Some(check_identifier));
    }
    int(
        c"redis_sync.dead_letter_max",
        c"Rows the dead-letter table may hold; past it, refused entries wait in Redis \
          (nothing more is acknowledged). 0 = no limit.",
        &DEAD_LETTER_MAX,
        0,
        i32::MAX,
        GucContext::Sighup,
        none,
    );
    int(
        c"redis_sync.dead_letter_retention",
        c"Dead letters older than this are deleted; 0 = kept until replayed or removed.",
        &DEAD_LETTER_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        s,
    );
    int(
        c"redis_sync.key_value_max_size",
        c"Largest key value mirrored, as Redis measures it before it is fetched; larger keys are skipped and listed by redis_sync_skipped_keys().",
        &KEY_VALUE_MAX_SIZE_KB,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    int(
        c"redis_sync.key_value_max_remembered",
        c"Keys whose fingerprint the worker keeps between passes (32-66 bytes each); keys beyond it are compared with the table at every pass.",
        &KEY_VALUE_MAX_REMEMBERED,
        0,
        i32::MAX,
        GucContext::Sighup,
        none,
    );
    int(
        c"redis_sync.query_timeout",
        c"statement_timeout of the worker's writes; 0 = none.",
        &QUERY_TIMEOUT_MS,
        0,
        DAY_MS,
        GucContext::Sighup,
        ms,
    );

    // SAFETY: called from _PG_init after our settings are defined; the prefix is static.
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"redis_sync".as_ptr());
    }
}

fn string(
    name: &'static CStr,
    desc: &'static CStr,
    setting: &'static Text,
    context: GucContext,
    flags: GucFlags,
    check: Option<StringCheck>,
) {
    // SAFETY: name, description, setting and hook are statics that outlive the process's
    // use of them; the hook has the signature Postgres expects.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            desc,
            c"",
            setting,
            context,
            flags,
            check.map(|c| c as _),
            None,
            None,
        );
    }
}

fn int(
    name: &'static CStr,
    desc: &'static CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    context: GucContext,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(name, desc, c"", setting, min, max, context, flags);
}

fn bool_(
    name: &'static CStr,
    desc: &'static CStr,
    setting: &'static GucSetting<bool>,
    context: GucContext,
) {
    GucRegistry::define_bool_guc(name, desc, c"", setting, context, GucFlags::default());
}

type StringCheck = unsafe extern "C-unwind" fn(
    *mut *mut c_char,
    *mut *mut c_void,
    pg_sys::GucSource::Type,
) -> bool;

/// Runs a validator over the proposed value; on refusal the DETAIL of the error says what
/// is wrong and which form is accepted (the primary message names the setting and value).
unsafe fn validate(newval: *mut *mut c_char, f: impl Fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: Postgres hands a check hook a pointer to the proposed value, a C string or
    // NULL; both are checked before reading.
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            String::new()
        } else {
            CStr::from_ptr(*newval).to_string_lossy().into_owned()
        }
    };
    match f(&value) {
        Ok(()) => true,
        Err(detail) => {
            let detail = CString::new(detail.replace('\0', " ")).unwrap_or_default();
            // SAFETY: in a check hook, GUC_check_errdetail_string is meant to be set to a
            // palloc'd string; pstrdup copies ours into the current context.
            unsafe {
                pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
            }
            false
        }
    }
}

/// Defines a string check hook from a validator `fn(&str) -> Result<(), String>`.
macro_rules! check_hook {
    ($name:ident, $validator:expr) => {
        #[pg_guard]
        unsafe extern "C-unwind" fn $name(
            newval: *mut *mut c_char,
            _extra: *mut *mut c_void,
            _source: pg_sys::GucSource::Type,
        ) -> bool {
            // SAFETY: `newval` is what Postgres passed this check hook.
            unsafe { validate(newval, $validator) }
        }
    };
}

check_hook!(check_db_range, |v: &str| parse::parse_db_range(v).map(|_| ()));
check_hook!(check_identifier, parse::check_identifier);
check_hook!(check_not_empty, |v: &str| {
    if v.trim().is_empty() {
        Err("Accepted form: a non-empty name.".into())
    } else {
        Ok(())
    }
});
check_hook!(check_host, |v: &str| {
    if v.contains(',') {
        // Seed nodes of a cluster.
        return crate::redis::parse_seeds(v, 6379).map(|_| ()).map_err(|e| {
            format!("Accepted form: host[:port], comma-separated (seed nodes of a cluster): {e}")
        });
    }
    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("Accepted form: a host name or IP address without blanks.".into());
    }
    Ok(())
});

#[pg_guard]
unsafe extern "C-unwind" fn show_password() -> *const c_char {
    // SAFETY: the setting's storage is a static C-string pointer that Postgres keeps valid
    // (or NULL) between assignments; no assignment runs during a show hook.
    let set = unsafe {
        let p = *REDIS_PASSWORD.as_ptr();
        !p.is_null() && *p != 0
    };
    if set {
        c"********".as_ptr()
    } else {
        c"".as_ptr()
    }
}

pub fn text(setting: &Text) -> String {
    setting.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn ms(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

fn secs(setting: &GucSetting<i32>) -> Duration {
    Duration::from_secs(setting.get().max(0) as u64)
}

/// A snapshot of every setting, read on the worker's main thread at the top of each loop
/// pass (after a reload), so the rest of the worker works with plain Rust values.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub database: String,
    pub role: String,
    pub enabled: bool,
    pub mode: Mode,
    pub log_level: LogLevel,
    pub redis: RedisSettings,
    pub db_search_range: Vec<u8>,
    pub health_check_interval: Duration,
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub rate_limit: u32,
    pub streams: Vec<String>,
    pub consumer_group: String,
    /// The consumer name the worker reads as: `redis_sync.consumer_name`, or when that is
    /// empty, one derived from the server's system identifier and the database.
    pub consumer_name: String,
    /// A name the worker ran under before and treats as its own: the former default
    /// (`redis-pg-sync-1`) when the name is derived; its pending entries are taken over.
    pub former_consumer: Option<String>,
    pub batch_size: u32,
    pub poll_interval: Duration,
    pub stream_auto_discovery: bool,
    pub stream_discovery_patterns: Vec<String>,
    pub stream_discovery_interval: Duration,
    pub auto_create_consumer_groups: bool,
    pub stream_conflict_overwrite: bool,
    pub claim_min_idle: Duration,
    pub ack_after: AckAfter,
    /// Stream worker processes, and which of them this one is.
    pub workers: u8,
    pub stream_worker: u8,
    pub key_value_auto_discovery: bool,
    pub key_value_patterns: Vec<String>,
    pub sync_interval: Duration,
    pub key_value_deletes: KeyValueDeletes,
    pub key_value_verify_interval: Duration,
    pub monitor_interval: Duration,
    pub schema: String,
    pub stream_table: String,
    pub key_value_table: String,
    pub query_timeout: Duration,
    pub dead_letter_max: u64,
    pub dead_letter_retention: Duration,
    /// Bytes.
    pub key_value_max_size: u64,
    pub key_value_max_remembered: usize,
}

/// What identifies "the Redis we talk to": a change to any of it means a new connection.
#[derive(Clone, PartialEq)]
pub struct RedisSettings {
    pub host: String,
    pub port: u16,
    pub db: u8,
    pub username: String,
    pub password: String,
    pub password_file: String,
    pub tls: bool,
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// `redis_cluster`: `host` lists the seed nodes of a Redis Cluster.
    pub cluster: bool,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, not even in a debug dump.
        f.debug_struct("RedisSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "********" })
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl RedisSettings {
    /// The password to authenticate with: `redis_password`, or the first line of
    /// `redis_password_file`. The file must belong to the server's OS user and be
    /// unreadable by anyone else, like a server key.
    pub fn resolve_password(&self) -> Result<String, String> {
        if self.password_file.is_empty() {
            return Ok(self.password.clone());
        }
        if !self.password.is_empty() {
            return Err(
                "set either redis_sync.redis_password or redis_sync.redis_password_file, not both"
                    .into(),
            );
        }
        use std::os::unix::fs::MetadataExt;
        let path = &self.password_file;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("cannot read redis_sync.redis_password_file \"{path}\": {e}"))?;
        // SAFETY: geteuid cannot fail and has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "redis_sync.redis_password_file \"{path}\" must belong to the server's OS user and be readable by it alone (mode {:o}); run: chmod 600 {path}",
                meta.mode() & 0o777
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read redis_sync.redis_password_file \"{path}\": {e}"))?;
        Ok(text.lines().next().unwrap_or("").to_owned())
    }

    /// `host:port/db`, as shown in `redis_sync_status().redis_server`.
    pub fn server(&self) -> String {
        if self.cluster {
            return format!("cluster {}", self.host);
        }
        format!("{}:{}/{}", self.host, self.port, self.db)
    }
}

/// What a reload changed, as far as the running worker must act on it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// Anything at all changed (the log level, a timeout, a table name, ...).
    pub any: bool,
    /// Another Redis server or other credentials: every connection is made again.
    pub redis: bool,
    /// Which streams are synced, or how (names, patterns, databases, group, mode): the
    /// tracked set is dropped and discovery runs again at once.
    pub stream_scope: bool,
    /// Which keys are mirrored, where, or how deletes are handled: the pass under way and
    /// what is remembered of keys are dropped.
    pub key_value_scope: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.any
    }
}

/// The consumer name every worker read as before names were derived.
pub const FORMER_DEFAULT_CONSUMER: &str = "redis-pg-sync-1";

/// The consumer name to read as: the configured one, or when none is set, one unique per
/// server and database. A streaming standby has its primary's system identifier, so a
/// promoted standby goes on as its primary's consumer (its pending entries are its own).
fn consumer_name(configured: &str, database: &str) -> String {
    let configured = configured.trim();
    if !configured.is_empty() {
        return configured.to_owned();
    }
    // SAFETY: reads the system identifier from the control file data in shared memory,
    // which is set before any background worker starts and never changes.
    let system = unsafe { pgrx::pg_sys::GetSystemIdentifier() };
    derived_consumer_name(system, database)
}

/// `redis-pg-sync-<system identifier>-<database>`. Pure.
pub fn derived_consumer_name(system: u64, database: &str) -> String {
    format!("redis-pg-sync-{system}-{database}")
}

impl Settings {
    /// Is the key-value mirror on (auto-discovery with at least one pattern)?
    pub fn mirrors_key_values(&self) -> bool {
        self.key_value_auto_discovery && !self.key_value_patterns.is_empty()
    }

    /// What differs from `old` (the settings before a reload). Pure.
    pub fn changes(&self, old: &Settings) -> Changes {
        let redis = self.redis != old.redis;
        let mode = self.mode != old.mode;
        let range = self.db_search_range != old.db_search_range;
        Changes {
            any: self != old,
            redis,
            stream_scope: mode
                || range
                || self.streams != old.streams
                || self.stream_discovery_patterns != old.stream_discovery_patterns
                || self.stream_auto_discovery != old.stream_auto_discovery
                || self.consumer_group != old.consumer_group,
            key_value_scope: redis
                || mode
                || range
                || self.key_value_patterns != old.key_value_patterns
                || self.key_value_auto_discovery != old.key_value_auto_discovery
                || self.key_value_table != old.key_value_table
                || self.schema != old.schema
                || self.key_value_deletes != old.key_value_deletes,
        }
    }

    pub fn load() -> Settings {
        let configured_consumer = text(&CONSUMER_NAME);
        Settings {
            database: text(&DATABASE),
            role: text(&ROLE),
            enabled: ENABLED.get(),
            mode: MODE.get(),
            log_level: LOG_LEVEL.get(),
            redis: RedisSettings {
                host: text(&REDIS_HOST),
                port: REDIS_PORT.get().clamp(1, 65535) as u16,
                db: REDIS_DB.get().clamp(0, parse::MAX_REDIS_DB as i32) as u8,
                username: text(&REDIS_USERNAME),
                password: text(&REDIS_PASSWORD),
                password_file: text(&REDIS_PASSWORD_FILE),
                tls: REDIS_TLS.get(),
                tls_ca_file: text(&REDIS_TLS_CA_FILE),
                tls_cert_file: text(&REDIS_TLS_CERT_FILE),
                tls_key_file: text(&REDIS_TLS_KEY_FILE),
                cluster: REDIS_CLUSTER.get(),
            },
            // The check hook guarantees the stored value parses; fall back to the default.
            db_search_range: parse::parse_db_range(&text(&DB_SEARCH_RANGE))
                .unwrap_or_else(|_| (0..=parse::MAX_REDIS_DB).collect()),
            health_check_interval: secs(&HEALTH_CHECK_INTERVAL_S),
            max_retries: MAX_RETRIES.get().max(1) as u32,
            backoff_base: ms(&BACKOFF_BASE_MS),
            backoff_max: ms(&BACKOFF_MAX_MS),
            rate_limit: RATE_LIMIT.get().max(0) as u32,
            streams: parse::parse_list(&text(&STREAMS)),
            consumer_group: text(&CONSUMER_GROUP),
            consumer_name: consumer_name(&configured_consumer, &text(&DATABASE)),
            former_consumer: configured_consumer
                .trim()
                .is_empty()
                .then(|| FORMER_DEFAULT_CONSUMER.to_owned()),
            batch_size: BATCH_SIZE.get().max(1) as u32,
            poll_interval: ms(&POLL_INTERVAL_MS),
            stream_auto_discovery: STREAM_AUTO_DISCOVERY.get(),
            stream_discovery_patterns: parse::parse_list(&text(&STREAM_DISCOVERY_PATTERNS)),
            stream_discovery_interval: secs(&STREAM_DISCOVERY_INTERVAL_S),
            auto_create_consumer_groups: AUTO_CREATE_CONSUMER_GROUPS.get(),
            stream_conflict_overwrite: STREAM_CONFLICT_OVERWRITE.get(),
            claim_min_idle: ms(&CLAIM_MIN_IDLE_MS),
            ack_after: ACK_AFTER.get(),
            workers: WORKERS.get().clamp(1, MAX_STREAM_WORKERS as i32) as u8,
            stream_worker: STREAM_WORKER.load(std::sync::atomic::Ordering::Relaxed),
            key_value_auto_discovery: KEY_VALUE_AUTO_DISCOVERY.get(),
            key_value_patterns: parse::parse_list(&text(&KEY_VALUE_PATTERNS)),
            sync_interval: ms(&SYNC_INTERVAL_MS),
            key_value_deletes: KEY_VALUE_DELETES.get(),
            key_value_verify_interval: secs(&KEY_VALUE_VERIFY_INTERVAL_S),
            monitor_interval: secs(&MONITOR_INTERVAL_S),
            schema: text(&SCHEMA),
            stream_table: text(&STREAM_TABLE),
            key_value_table: text(&KEY_VALUE_TABLE),
            query_timeout: ms(&QUERY_TIMEOUT_MS),
            dead_letter_max: DEAD_LETTER_MAX.get().max(0) as u64,
            dead_letter_retention: secs(&DEAD_LETTER_RETENTION_S),
            key_value_max_size: KEY_VALUE_MAX_SIZE_KB.get().max(1) as u64 * 1024,
            key_value_max_remembered: KEY_VALUE_MAX_REMEMBERED.get().max(0) as usize,
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            host: "localhost".into(),
            port: 6379,
            db: 0,
            username: String::new(),
            password: String::new(),
            password_file: String::new(),
            tls: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            cluster: false,
        }
    }
}

/// The documented defaults, as plain values (the GUC definitions above carry the same):
/// what a worker runs with when nothing is configured. Used by unit tests, which run
/// without Postgres.
impl Default for Settings {
    fn default() -> Self {
        Settings {
            database: "postgres".into(),
            role: String::new(),
            enabled: true,
            mode: Mode::Sync,
            log_level: LogLevel::Info,
            redis: RedisSettings::default(),
            db_search_range: (0..=parse::MAX_REDIS_DB).collect(),
            health_check_interval: Duration::from_secs(60),
            max_retries: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            rate_limit: 100,
            streams: Vec::new(),
            consumer_group: "redis-pg-sync".into(),
            consumer_name: "redis-pg-sync-1".into(),
            former_consumer: None,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            stream_auto_discovery: true,
            stream_discovery_patterns: vec!["*".into()],
            stream_discovery_interval: Duration::from_secs(10),
            auto_create_consumer_groups: true,
            stream_conflict_overwrite: false,
            claim_min_idle: Duration::from_secs(60),
            ack_after: AckAfter::Local,
            workers: 1,
            stream_worker: 0,
            key_value_auto_discovery: true,
            key_value_patterns: vec!["*".into()],
            sync_interval: Duration::from_secs(1),
            key_value_deletes: KeyValueDeletes::Mark,
            key_value_verify_interval: Duration::from_secs(600),
            monitor_interval: Duration::from_secs(5),
            schema: "public".into(),
            stream_table: "redis_streams".into(),
            key_value_table: "redis_key_values".into(),
            query_timeout: Duration::from_secs(30),
            dead_letter_max: 1_000_000,
            dead_letter_retention: Duration::ZERO,
            key_value_max_size: 64 << 20,
            key_value_max_remembered: 2_000_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_consumer_name_names_the_server_and_the_database() {
        assert_eq!(
            derived_consumer_name(7_301_234_567_890_123_456, "app"),
            "redis-pg-sync-7301234567890123456-app"
        );
        assert_ne!(derived_consumer_name(1, "app"), derived_consumer_name(2, "app"));
        assert_ne!(derived_consumer_name(1, "app"), derived_consumer_name(1, "other"));
        assert_ne!(derived_consumer_name(1, "app"), FORMER_DEFAULT_CONSUMER);
    }

    #[test]
    fn nothing_changed_is_empty() {
        let s = Settings::default();
        assert!(s.changes(&s.clone()).is_empty());
    }

    #[test]
    fn each_kind_of_change_is_told_apart() {
        let old = Settings::default();
        let with = |f: &dyn Fn(&mut Settings)| {
            let mut new = old.clone();
            f(&mut new);
            new.changes(&old)
        };
        // A log level or a batch size: applied as they are, nothing dropped.
        let c = with(&|s| s.log_level = LogLevel::Debug);
        assert_eq!(c, Changes { any: true, ..Changes::default() });
        assert_eq!(with(&|s| s.batch_size = 500), c);
        // Another Redis: reconnect and drop what is remembered of keys.
        let c = with(&|s| s.redis.port = 6380);
        assert!(c.redis && c.key_value_scope && !c.stream_scope);
        // A password is a credential like the others.
        assert!(with(&|s| s.redis.password = "x".into()).redis);
        // Stream scope.
        for c in [
            with(&|s| s.streams = vec!["a".into()]),
            with(&|s| s.stream_discovery_patterns = vec!["x*".into()]),
            with(&|s| s.stream_auto_discovery = false),
            with(&|s| s.consumer_group = "g".into()),
        ] {
            assert!(c.stream_scope && !c.key_value_scope && !c.redis, "{c:?}");
        }
        // Key-value scope.
        for c in [
            with(&|s| s.key_value_patterns = vec!["x*".into()]),
            with(&|s| s.key_value_auto_discovery = false),
            with(&|s| s.key_value_table = "t".into()),
            with(&|s| s.schema = "s".into()),
            with(&|s| s.key_value_deletes = KeyValueDeletes::Delete),
        ] {
            assert!(c.key_value_scope && !c.stream_scope && !c.redis, "{c:?}");
        }
        // Both.
        for c in [with(&|s| s.db_search_range = vec![0]), with(&|s| s.mode = Mode::Monitor)] {
            assert!(c.key_value_scope && c.stream_scope && !c.redis, "{c:?}");
        }
    }
}
