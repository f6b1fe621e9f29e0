//! The background worker: registration, the entry point, signals, the main loop and its log
//! lines.
//!
//! - `signals`: handlers that only set flags and the latch; helper threads start with every
//!   signal blocked
//! - `main_loop`: the loop in the style of pg_cron and autoprewarm (reload at the top, one
//!   transaction per batch, every wait on the latch and ending with the postmaster)
//! - `lanes`: each lane's health and backoff, and the link to Redis they share
//! - `log`: the worker's own log lines and the GRANTs a permission error needs

mod lanes;
mod log;
mod main_loop;
mod signals;

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;

use crate::gucs::Settings;
use crate::shmem::{self, WorkerState};

pub use log::Log;
pub use signals::spawn_helper;

/// How long the postmaster waits before starting the worker again after it exited.
const RESTART_TIME: Duration = Duration::from_secs(5);

const WORKER_NAME: &str = "redis_pg_sync worker";

/// Registers the worker with the postmaster (while preloading only).
pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type("redis_pg_sync")
        .set_library("redis_pg_sync")
        .set_function("redis_sync_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_TIME))
        .load();
}

/// Marks the worker stopped in shared memory when the process exits, however it exits.
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    shmem::update(|s| {
        s.pid = 0;
        s.state = WorkerState::Stopped;
        s.redis_connected = false;
    });
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn redis_sync_worker_main(_arg: pg_sys::Datum) {
    signals::install();
    let settings = Settings::load();
    let role = (!settings.role.is_empty()).then_some(settings.role.as_str());
    BackgroundWorker::connect_worker_to_spi(Some(&settings.database), role);

    crate::pg::on_exit(on_exit);
    if let Some(encoding) = crate::pg::non_utf8_encoding() {
        // Started again after its restart time, and refused again: the log and the status
        // say why.
        shmem::record_error(&format!(
            "database \"{}\" has encoding {encoding}: redis_pg_sync needs a UTF8 database",
            settings.database
        ));
        pgrx::error!(
            "redis_pg_sync cannot run in database \"{}\": its encoding is {encoding}, and the \
             worker stores Redis names and values as UTF-8 text; use a UTF8 database \
             (redis_sync.database)",
            settings.database
        );
    }
    let started = shmem::now();
    shmem::clear_skipped();
    shmem::update(|s| {
        *s = shmem::WorkerStatus::default();
        s.pid = crate::pg::my_pid();
        s.state = WorkerState::Starting;
        s.mode = settings.mode;
        s.started_at = started;
        s.redis_server.set(&settings.redis.server());
    });
    // Values the worker writes are compressed with lz4 where the server was built with it:
    // a 12 MB hash row takes a quarter of the time pglz needs, so streams wait less behind
    // it. Only the worker's session; without lz4, pglz stays.
    let _ = crate::pg::in_transaction(|| {
        pgrx::Spi::run("SET default_toast_compression = 'lz4'").map_err(crate::pg::spi_err)
    });
    let waker = match crate::pg::Waker::new() {
        Ok(w) => w,
        // The postmaster starts the worker again after its restart time.
        Err(e) => pgrx::error!("redis_pg_sync: cannot create the worker's wake-up pipe: {e}"),
    };
    main_loop::Worker::new(settings, waker).run();
}
