//! redis_pg_sync: a background worker inside Postgres that keeps Redis and Postgres in sync.
//!
//! This file is wiring only; each concern lives in its own module.

use pgrx::prelude::*;

pub mod api;
pub mod backoff;
pub mod encode;
pub mod error;
pub mod gucs;
pub mod keys;
pub mod notify;
pub mod parse;
pub mod ratelimit;
pub mod reader;
pub mod redact;
pub mod redis;
pub mod scanner;
pub mod shmem;
pub mod sink;
pub mod streams;
pub mod worker;

pgrx::pg_module_magic!();

extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    gucs::init();
    redact::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
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
