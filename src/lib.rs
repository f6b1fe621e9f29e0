//! redis_pg_sync: a background worker inside Postgres that keeps Redis and Postgres in sync.
//!
//! This file is wiring only. The module map, and who may call Postgres:
//!
//! | module | what | calls Postgres |
//! |---|---|---|
//! | `gucs` | every setting, its check hook, the typed `Settings`, what a reload changes | yes (GUC API) |
//! | `api` | the SQL functions | yes |
//! | `shmem` | worker state and counters in shared memory | yes (LWLocks; the counters are atomics any thread may bump) |
//! | `worker` | registration, signals, the main loop, log lines | yes, main thread only |
//! | `pg` | transactions and timeouts, COPY, DDL, the latch, the log hook | yes: the Postgres plumbing |
//! | `streams` | discovery, read rounds, reader thread, monitor mode, stream-table writer | the writer and the round, on the main thread; never the reader thread |
//! | `keys` | key-value passes, fingerprint memory, rows, scanner and notification threads, writer | the pass and writer, on the main thread; never the two threads |
//! | `routes` | routes into users' tables: their mapping (pure), catalog checks, SQL functions | the catalog and SQL functions; never the mapping |
//! | `redis` | connections, commands, reply parsing | no |
//! | `encode`, `parse`, `backoff`, `ratelimit`, `error` | pure helpers | no |
//!
//! Only the worker's main thread calls Postgres. The reader, scanner and notification
//! threads do Redis I/O, start with every signal blocked (`worker::spawn_helper`) and talk to
//! the main thread over bounded channels.
#![warn(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

mod api;
mod backoff;
mod encode;
mod error;
mod gucs;
mod keys;
mod parse;
mod pg;
mod ratelimit;
mod redis;
mod routes;
mod shmem;
mod streams;
mod worker;

pgrx::pg_module_magic!();

extension_sql_file!(
    "../sql/routes.sql",
    name = "routes",
    requires = [routes::sql::redis_sync_routes_changed]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: globals of the postmaster's start-up, read once while the library loads.
    let (upgrade, preloading) =
        unsafe { (pg_sys::IsBinaryUpgrade, pg_sys::process_shared_preload_libraries_in_progress) };
    if upgrade {
        return;
    }
    gucs::init();
    pg::redact::init();
    if preloading {
        shmem::init();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;
#[cfg(test)]
mod proptests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'redis_pg_sync'",
            // No Redis listens here: the worker backs off quietly during these tests.
            "redis_sync.redis_port = 1",
            "redis_sync.backoff_base = '10s'",
        ]
    }
}
