//! The background workers: registration, the entry point, signals, the main loop and its
//! log lines.
//!
//! Two processes run the same loop in two roles: the stream worker (stream reads and
//! discovery, backend type `redis_pg_sync`) and the key-value worker (key-value passes and
//! keyspace notifications, backend type `redis_pg_sync key values`). Each has a Postgres
//! backend of its own, so a long key-value write (a big value's row) never holds up a
//! stream commit. They share the rate limit's buckets and the status in shared memory.
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

/// What a worker process does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Stream reads and discovery (and monitor mode).
    Streams,
    /// Key-value passes and keyspace notifications.
    KeyValues,
}

impl Role {
    const ALL: [Role; 2] = [Role::Streams, Role::KeyValues];

    fn arg(self) -> i32 {
        match self {
            Role::Streams => 0,
            Role::KeyValues => 1,
        }
    }

    /// The process's name and its backend type in `pg_stat_activity`.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Role::Streams => ("redis_pg_sync worker", "redis_pg_sync"),
            Role::KeyValues => ("redis_pg_sync key-value worker", "redis_pg_sync key values"),
        }
    }

    /// The lanes the role's process runs and publishes.
    pub fn lanes(self) -> &'static [crate::ratelimit::Lane] {
        use crate::ratelimit::Lane;
        match self {
            Role::Streams => &[Lane::Streams, Lane::Discovery],
            Role::KeyValues => &[Lane::KeyValues],
        }
    }
}

/// Registers the workers with the postmaster (while preloading only): the key-value worker
/// and `redis_sync.workers` stream workers. The first stream worker's argument is 0 (its
/// role's), the key-value worker's 1, stream worker `k` (from 0) past the first `k + 1`.
pub fn register() {
    let workers = crate::gucs::WORKERS.get().clamp(1, crate::gucs::MAX_STREAM_WORKERS as i32);
    for role in Role::ALL {
        let (name, backend_type) = role.names();
        register_one(name, backend_type, role.arg());
    }
    for k in 1..workers {
        let n = k + 1;
        register_one(&format!("redis_pg_sync worker {n}"), &format!("redis_pg_sync {n}"), k + 1);
    }
}

fn register_one(name: &str, backend_type: &str, arg: i32) {
    BackgroundWorkerBuilder::new(name)
        .set_type(backend_type)
        .set_library("redis_pg_sync")
        .set_function("redis_sync_worker_main")
        .set_argument(Some(pg_sys::Datum::from(arg)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_TIME))
        .load();
}

/// The role and stream-worker index of a worker's argument (see [`register`]).
fn decode_arg(arg: usize) -> (Role, u8) {
    match arg {
        0 => (Role::Streams, 0),
        1 => (Role::KeyValues, 0),
        k => (Role::Streams, (k - 1).min(u8::MAX as usize) as u8),
    }
}

/// Marks the stream worker stopped in shared memory when the process exits, however it
/// exits.
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    shmem::update(|s| {
        s.pid = 0;
        s.state = WorkerState::Stopped;
        s.redis_connected = false;
        s.acks_waiting = 0;
        s.acks_waiting_since = 0;
    });
}

/// The same for a stream worker past the first.
unsafe extern "C-unwind" fn on_exit_more(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    let index = usize::from(crate::gucs::stream_worker());
    shmem::update(|s| {
        if let Some(slot) = index.checked_sub(1).and_then(|i| s.more.get_mut(i)) {
            *slot = shmem::ProcessSlot::STOPPED;
        }
    });
}

/// The same for the key-value worker.
unsafe extern "C-unwind" fn on_exit_kv(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    shmem::update(|s| {
        s.kv.pid = 0;
        s.kv.state = WorkerState::Stopped;
        s.kv.started_at = 0;
    });
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn redis_sync_worker_main(arg: pg_sys::Datum) {
    let (role, index) = decode_arg(arg.value());
    crate::gucs::set_stream_worker(index);
    signals::install();
    let settings = Settings::load();
    let pg_role = (!settings.role.is_empty()).then_some(settings.role.as_str());
    BackgroundWorker::connect_worker_to_spi(Some(&settings.database), pg_role);

    crate::pg::on_exit(match role {
        Role::Streams if index > 0 => on_exit_more,
        Role::Streams => on_exit,
        Role::KeyValues => on_exit_kv,
    });
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
    let pid = crate::pg::my_pid();
    match role {
        Role::Streams if index > 0 => shmem::update(|s| {
            if let Some(slot) = s.more.get_mut(usize::from(index) - 1) {
                *slot = shmem::ProcessSlot {
                    pid,
                    state: WorkerState::Starting,
                    started_at: started,
                    streams: 0,
                };
            }
        }),
        Role::Streams => shmem::update(|s| {
            // The key-value worker's and the other stream workers' parts stay as they are.
            let kv = (s.kv, s.lanes[crate::ratelimit::Lane::KeyValues as usize], s.more);
            *s = shmem::WorkerStatus::default();
            (s.kv, s.lanes[crate::ratelimit::Lane::KeyValues as usize], s.more) = kv;
            s.pid = pid;
            s.state = WorkerState::Starting;
            s.mode = settings.mode;
            s.started_at = started;
            s.redis_server.set(&settings.redis.server());
        }),
        Role::KeyValues => {
            shmem::clear_skipped();
            shmem::hand_over_learned(None);
            shmem::update(|s| {
                s.kv = shmem::ProcessSlot {
                    pid,
                    state: WorkerState::Starting,
                    started_at: started,
                    streams: 0,
                };
                s.lanes[crate::ratelimit::Lane::KeyValues as usize] = shmem::LaneSlot::EMPTY;
            });
        }
    }
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
    main_loop::Worker::new(role, settings, waker).run();
}
