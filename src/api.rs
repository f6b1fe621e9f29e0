//! SQL functions: status and waiting. Privileges and comments are set in `sql/finalize.sql`.

use std::time::{Duration, Instant};

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

use crate::gucs;
use crate::shmem::{self, WorkerState};
use crate::worker::Role;

const NOT_LOADED_HINT: &str = "redis_pg_sync is not in shared_preload_libraries, so no worker runs: add it there (ALTER SYSTEM SET shared_preload_libraries = 'redis_pg_sync') and restart PostgreSQL";

fn ts(v: i64) -> Option<TimestampWithTimeZone> {
    if v == 0 {
        None
    } else {
        TimestampWithTimeZone::try_from(v).ok()
    }
}

fn count(v: &std::sync::atomic::AtomicU64) -> i64 {
    v.load(std::sync::atomic::Ordering::Relaxed).min(i64::MAX as u64) as i64
}

/// One row describing the worker: state, connection and counters.
#[allow(clippy::type_complexity)] // pgrx needs the named columns spelled out here
#[pg_extern(volatile, parallel_safe)]
fn redis_sync_status() -> TableIterator<
    'static,
    (
        name!(worker_pid, Option<i32>),
        name!(state, String),
        name!(mode, String),
        name!(redis_connected, bool),
        name!(redis_server, Option<String>),
        name!(streams_tracked, i64),
        name!(messages_processed, i64),
        name!(key_values_processed, i64),
        name!(redis_ops, i64),
        name!(pg_ops, i64),
        name!(streams_discovered, i64),
        name!(errors, i64),
        name!(retries, i64),
        name!(dead_letters, i64),
        name!(last_sync_time, Option<TimestampWithTimeZone>),
        name!(last_error, Option<String>),
        name!(last_error_time, Option<TimestampWithTimeZone>),
        name!(started_at, Option<TimestampWithTimeZone>),
        name!(key_value_passes, i64),
        name!(dead_letters_stored, i64),
        name!(entries_lost, i64),
        name!(key_values_skipped, i64),
        name!(acks_waiting, i64),
        name!(acks_waiting_since, Option<TimestampWithTimeZone>),
        name!(redis_nodes, Option<String>),
    ),
> {
    let mode = gucs::MODE.get().as_str().to_owned();
    let Some(s) = shmem::snapshot() else {
        return TableIterator::once((
            None,
            "not_loaded".to_owned(),
            mode,
            false,
            None,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            None,
            Some(NOT_LOADED_HINT.to_owned()),
            None,
            None,
            0,
            0,
            0,
            0,
            0,
            None,
            None,
        ));
    };
    let c = shmem::COUNTERS.get();
    let skipped = shmem::SKIPPED.share().count;
    let opt = |t: &str| (!t.is_empty()).then(|| t.to_owned());
    // One row for both processes: the key-value worker backing off shows as the whole
    // worker's state (redis_sync_workers() and redis_sync_lanes() say which).
    let kv_failing = s.kv.state == WorkerState::BackingOff
        || s.more.iter().any(|m| m.state == WorkerState::BackingOff);
    let state = if s.state == WorkerState::Running && kv_failing {
        WorkerState::BackingOff
    } else {
        s.state
    };
    TableIterator::once((
        (s.pid != 0).then_some(s.pid),
        state.as_str().to_owned(),
        s.mode.as_str().to_owned(),
        s.redis_connected,
        opt(s.redis_server.as_str()),
        s.streams_tracked + s.more.iter().map(|m| m.streams).sum::<i64>(),
        count(&c.messages_processed),
        count(&c.key_values_processed),
        count(&c.redis_ops),
        count(&c.pg_ops),
        count(&c.streams_discovered),
        count(&c.errors),
        count(&c.retries),
        count(&c.dead_letters),
        ts(s.last_sync_time),
        opt(s.last_error.as_str()),
        ts(s.last_error_time),
        ts(s.started_at),
        count(&c.key_value_passes),
        s.dead_letters_stored,
        count(&c.entries_lost),
        skipped,
        s.acks_waiting,
        ts(s.acks_waiting_since),
        opt(s.redis_nodes.as_str()),
    ))
}

/// Waits until the worker is running and connected to Redis, at most `timeout`.
#[pg_extern(volatile, parallel_safe)]
fn redis_sync_wait_until_running(timeout: default!(Interval, "'10s'")) -> bool {
    if !shmem::preloaded() {
        ereport!(
            PgLogLevel::NOTICE,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the redis_pg_sync worker is not loaded",
            NOT_LOADED_HINT
        );
        return false;
    }
    let micros = timeout.as_micros().clamp(0, i64::MAX as i128) as u64;
    let deadline = Instant::now() + Duration::from_micros(micros);
    loop {
        if let Some(s) = shmem::snapshot() {
            let ready = matches!(s.state, WorkerState::Running | WorkerState::Monitoring);
            if ready && s.redis_connected {
                return true;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        crate::pg::wait((deadline - now).min(Duration::from_millis(50)));
        pgrx::check_for_interrupts!();
    }
}

/// A row per lane of the worker (stream reads, discovery, key-value passes): what it is
/// doing, when it last worked, and its last error.
#[allow(clippy::type_complexity)] // pgrx needs the named columns spelled out here
#[pg_extern(volatile, parallel_safe)]
fn redis_sync_lanes() -> TableIterator<
    'static,
    (
        name!(lane, String),
        name!(state, String),
        name!(last_success, Option<TimestampWithTimeZone>),
        name!(last_error, Option<String>),
        name!(last_error_time, Option<TimestampWithTimeZone>),
    ),
> {
    let Some(s) = shmem::snapshot() else {
        return TableIterator::new(Vec::new());
    };
    let opt = |t: &str| (!t.is_empty()).then(|| t.to_owned());
    let rows: Vec<_> = crate::ratelimit::Lane::ALL
        .iter()
        .zip(s.lanes.iter())
        .map(|(lane, slot)| {
            // The key-value lane runs in a process of its own.
            let pid = if Role::KeyValues.lanes().contains(lane) { s.kv.pid } else { s.pid };
            let state = if pid != 0 { slot.state.as_str() } else { "stopped" };
            (
                lane.as_str().to_owned(),
                state.to_owned(),
                ts(slot.last_success),
                opt(slot.last_error.as_str()),
                ts(slot.last_error_time),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// A row per worker process: the stream worker (stream reads, discovery) and the key-value
/// worker (key-value passes, keyspace notifications), with the process ID, state and start.
#[allow(clippy::type_complexity)] // pgrx needs the named columns spelled out here
#[pg_extern(volatile, parallel_safe)]
fn redis_sync_workers() -> TableIterator<
    'static,
    (
        name!(worker, String),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(lanes, Vec<String>),
        name!(started_at, Option<TimestampWithTimeZone>),
        name!(streams, Option<i64>),
    ),
> {
    let Some(s) = shmem::snapshot() else {
        return TableIterator::new(Vec::new());
    };
    let lanes = |r: Role| r.lanes().iter().map(|l| l.as_str().to_owned()).collect::<Vec<_>>();
    let mut rows = vec![
        (
            "streams".to_owned(),
            (s.pid != 0).then_some(s.pid),
            s.state.as_str().to_owned(),
            lanes(Role::Streams),
            ts(s.started_at),
            Some(s.streams_tracked),
        ),
        (
            "key_values".to_owned(),
            (s.kv.pid != 0).then_some(s.kv.pid),
            s.kv.state.as_str().to_owned(),
            lanes(Role::KeyValues),
            ts(s.kv.started_at),
            None,
        ),
    ];
    let workers = gucs::WORKERS.get().clamp(1, gucs::MAX_STREAM_WORKERS as i32) as usize;
    for (i, m) in s.more.iter().enumerate().take(workers - 1) {
        rows.push((
            format!("streams {}", i + 2),
            (m.pid != 0).then_some(m.pid),
            m.state.as_str().to_owned(),
            lanes(Role::Streams),
            ts(m.started_at),
            Some(m.streams),
        ));
    }
    TableIterator::new(rows)
}

/// A row per key too big to mirror (`redis_sync.key_value_max_size`), as the last pass
/// found it: its database, name (as the key-value table would store it), type, and size in
/// bytes as Redis measured it. At most 64 are listed; `redis_sync_status()` counts them all.
#[allow(clippy::type_complexity)] // pgrx needs the named columns spelled out here
#[pg_extern(volatile, parallel_safe)]
fn redis_sync_skipped_keys() -> TableIterator<
    'static,
    (
        name!(redis_db, i32),
        name!(redis_key, String),
        name!(value_type, String),
        name!(bytes, i64),
        name!(skipped_at, Option<TimestampWithTimeZone>),
    ),
> {
    if !shmem::preloaded() {
        return TableIterator::new(Vec::new());
    }
    let mut rows: Vec<_> = {
        let table = shmem::SKIPPED.share();
        table
            .slots
            .iter()
            .filter(|s| s.used)
            .map(|s| {
                (
                    i32::from(s.db),
                    s.key.as_str().to_owned(),
                    s.value_type.as_str().to_owned(),
                    s.bytes,
                    ts(s.skipped_at),
                )
            })
            .collect()
    };
    rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    TableIterator::new(rows)
}

/// A row per tracked stream, with what the worker and Redis last said about it.
#[allow(clippy::type_complexity)] // pgrx needs the named columns spelled out here
#[pg_extern(volatile, parallel_safe)]
fn redis_sync_streams() -> TableIterator<
    'static,
    (
        name!(stream_key, String),
        name!(redis_db, i32),
        name!(consumer_group, String),
        name!(state, String),
        name!(last_id, Option<String>),
        name!(messages_synced, i64),
        name!(pending, i64),
        name!(lag, Option<i64>),
        name!(length, i64),
        name!(first_entry_id, Option<String>),
        name!(last_entry_id, Option<String>),
        name!(consumers, i64),
        name!(last_sync_time, Option<TimestampWithTimeZone>),
        name!(last_error, Option<String>),
        name!(groups, i64),
        name!(health, Option<String>),
        name!(entries_lost, i64),
    ),
> {
    if !shmem::preloaded() {
        return TableIterator::new(Vec::new());
    }
    let opt = |t: &str| (!t.is_empty()).then(|| t.to_owned());
    let rows: Vec<_> = {
        let tbl = shmem::STREAMS.share();
        tbl.slots
            .iter()
            .filter(|s| s.used)
            .map(|s| {
                (
                    s.key.as_str().to_owned(),
                    s.db as i32,
                    s.consumer_group.as_str().to_owned(),
                    s.state.as_str().to_owned(),
                    opt(s.last_id.as_str()),
                    s.messages_synced,
                    s.pending,
                    (s.lag >= 0).then_some(s.lag),
                    s.length,
                    opt(s.first_entry_id.as_str()),
                    opt(s.last_entry_id.as_str()),
                    s.consumers,
                    ts(s.last_sync_time),
                    opt(s.last_error.as_str()),
                    s.groups,
                    opt(s.health.as_str()),
                    s.entries_lost,
                )
            })
            .collect()
    };
    TableIterator::new(rows)
}

/// Writes dead letters back to the stream table, or through their route to its target
/// (each in a subtransaction), and removes those that landed; those still refused stay,
/// with `attempts` raised. Only dead letters of streams matching `stream_pattern` (fnmatch,
/// as stored), at most `max` of them; with `route`, only that route's (`''`: only the
/// stream table's).
#[pg_extern(volatile)]
fn redis_sync_replay_dead_letters(
    stream_pattern: default!(&str, "'*'"),
    max: default!(Option<i32>, "NULL"),
    route: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(landed, i64), name!(stayed, i64))> {
    match crate::streams::replay(stream_pattern, max.map(i64::from), route) {
        Ok(r) => TableIterator::once((r.landed, r.stayed)),
        Err(e) => {
            e.report(PgLogLevel::ERROR);
            TableIterator::once((0, 0))
        }
    }
}

/// Asks the worker to run stream discovery now and waits for it (at most 30 s): a row per
/// stream the pass found, and whether it was new.
#[pg_extern(volatile)]
fn redis_sync_discover() -> TableIterator<
    'static,
    (name!(stream_key, String), name!(redis_db, i32), name!(newly_added, bool)),
> {
    let Some(status) = shmem::snapshot() else {
        error!("redis_pg_sync is not loaded: {NOT_LOADED_HINT}");
    };
    if status.pid == 0 {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the redis_pg_sync worker is not running",
            "See redis_sync_status() and the server log."
        );
    }
    let requested = {
        let mut t = shmem::STREAMS.exclusive();
        t.discovery_requested += 1;
        t.discovery_requested
    };
    // Every stream worker runs one (each tracks its own streams).
    let workers = gucs::WORKERS.get().clamp(1, gucs::MAX_STREAM_WORKERS as i32) as u8;
    let pids: Vec<i32> = std::iter::once(status.pid)
        .chain(status.more.iter().take(usize::from(workers) - 1).map(|m| m.pid))
        .collect();
    for pid in &pids {
        crate::pg::wake_backend(*pid);
    }
    // Answered once a discovery that started after this request has finished, in every
    // stream worker that runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let gens = loop {
        {
            let t = shmem::STREAMS.share();
            let answered = pids
                .iter()
                .enumerate()
                .all(|(k, pid)| *pid == 0 || t.discovery_answered[k] >= requested);
            if answered {
                break t.discovery_gen;
            }
        }
        if Instant::now() >= deadline {
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                "redis_sync_discover() timed out waiting for the worker",
                "The worker may be backing off; see redis_sync_status() and redis_sync_lanes()."
            );
        }
        crate::pg::wait(Duration::from_millis(20));
        pgrx::check_for_interrupts!();
    };
    let rows: Vec<_> = {
        let tbl = shmem::STREAMS.share();
        // (A worker that is not running answers nothing: its slots are not listed.)
        (0..workers)
            .filter(|k| pids.get(usize::from(*k)).is_some_and(|pid| *pid != 0))
            .flat_map(|k| {
                let gen = gens[usize::from(k)];
                tbl.slots[shmem::stream_slots(k, workers)]
                    .iter()
                    .filter(move |s| s.used && s.found_gen == gen)
                    .map(move |s| (s.key.as_str().to_owned(), s.db as i32, s.added_gen == gen))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    TableIterator::new(rows)
}
