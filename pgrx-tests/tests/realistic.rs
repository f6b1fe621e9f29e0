//! Scenarios at the defaults, as a first real deployment looks: fsync and synchronous_commit
//! on, every `redis_sync.*` setting at its default, a Redis holding a million ordinary keys
//! beside streams in three databases, a Redis with fewer databases than the search range,
//! a key-value table the worker may not write, `synchronous_commit = off` for the database,
//! and the postmaster killed in each state of the worker.
//!
//! These tests check behaviour with bounds wide enough for a debug build on a shared
//! machine (entries land in well under a second, not seconds); `make bench` measures the
//! figures with a release build. Sizes: `RPS_SCENARIO_KEYS` (default 1,000,000),
//! `RPS_SCENARIO_ENTRIES` (default 200,000), `RPS_SCENARIO_REPEATS` (default 5).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(120);

/// The tests that measure time or CPU run alone; the others share the machine among
/// themselves (on two cores, a latency measured beside three other clusters measures them).
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

fn env_size(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn defaults_with_a_million_keys_and_streams_in_three_databases() {
    let _machine = alone();
    let keys = env_size("RPS_SCENARIO_KEYS", 1_000_000);
    let redis = Redis::start();
    let mut r = redis.client();
    load_keys(&mut r, 0, keys);
    let streams: Vec<(u8, String)> =
        (0..20).map(|i| ((i % 3) as u8, format!("sensor-{i}"))).collect();
    let mut seeds: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    for (db, key) in &streams {
        select(&mut r, *db);
        let id: String =
            redis::cmd("XADD").arg(key).arg("*").arg("seed").arg(1).query(&mut r).expect("XADD");
        seeds.insert((*db, key.clone()), vec![id]);
    }
    let started = Instant::now();
    let pg = Cluster::start_defaults(&redis, &[]);
    assert!(pg.wait_until_running(), "log:\n{}", pg.log());
    pg.wait_number("SELECT count(*) FROM redis_streams", 20, T);
    // 1,000 entries a second over the 20 streams, while the keys are being mirrored.
    let mut ids = produce(redis.port, &streams, 1000, 20.0);
    let produced: usize = ids.values().map(Vec::len).sum();
    pg.wait_number("SELECT count(*) FROM redis_streams", 20 + produced as i64, T);
    let mirrored_in = wait_for("every key mirrored", Duration::from_secs(240), || {
        // The worker's own counter (cheap), not count(*) over a growing table, which would
        // take a core away from the worker.
        let n: usize = pg
            .try_query_text("SELECT key_values_processed FROM redis_sync_status()")?
            .parse()
            .ok()?;
        (n >= keys).then(|| started.elapsed())
    });
    let lat = commit_latencies(&pg);
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    eprintln!(
        "defaults, {keys} keys, 20 streams in 3 databases at 1000/s: XADD to commit p50 {p50:.1} ms, p99 {p99:.1} ms over {} entries; keys mirrored {:.1} s after start",
        lat.len(),
        mirrored_in.as_secs_f64()
    );
    assert_eq!(lat.len(), produced);
    // Entries land in well under a second while the keyspace is mirrored (seconds, before
    // the lanes); the release build's figures are in make bench.
    assert!(p99 < 500.0, "p99 {p99:.1} ms");
    assert!(mirrored_in < Duration::from_secs(240));
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values"), keys as i64);
    for (stream, seed) in seeds {
        ids.entry(stream).or_default().extend(seed);
    }
    assert_eq!(lost_and_duplicated(&pg, &mut r, &ids), (0, 0));
    // No lane fell over meanwhile.
    assert_eq!(
        pg.number("SELECT errors FROM redis_sync_status()"),
        0,
        "{:?}",
        pg.status("last_error")
    );
}

#[test]
fn an_idle_worker_sleeps() {
    let _machine = alone();
    let redis = Redis::start();
    let mut r = redis.client();
    for db in 0..3u8 {
        select(&mut r, db);
        let _: String = redis::cmd("XADD")
            .arg(format!("idle-{db}"))
            .arg("*")
            .arg("a")
            .arg(1)
            .query(&mut r)
            .expect("XADD");
        for k in 0..4 {
            let _: () =
                redis::cmd("SET").arg(format!("key-{k}")).arg("v").query(&mut r).expect("SET");
        }
    }
    let pg = Cluster::start_defaults(&redis, &[]);
    pg.wait_number("SELECT count(*) FROM redis_streams", 3, T);
    pg.wait_number("SELECT count(*) FROM redis_key_values", 12, T);
    wait_for("a few passes", T, || {
        (pg.number("SELECT key_value_passes FROM redis_sync_status()") >= 3).then_some(())
    });
    let pids = pg.worker_pids().expect("both workers");
    wait_for("both workers shown idle", T, || {
        let s = pg.query_text(
            "SELECT string_agg(state, ',') FROM pg_stat_activity WHERE backend_type LIKE 'redis_pg_sync%'",
        )?;
        (s == "idle,idle").then_some(())
    });
    // The CPU of both worker processes together.
    let cpu_of_both = || pids.iter().map(|p| cpu_time(*p).expect("cpu")).sum::<Duration>();
    let mut measure = |label: &str| {
        let window = Duration::from_secs(10);
        let (cpu0, cmd0) = (cpu_of_both(), commands_processed(&mut r));
        std::thread::sleep(window);
        let (cpu1, cmd1) = (cpu_of_both(), commands_processed(&mut r));
        // Less the INFO of the first reading.
        let per_s = (cmd1 - cmd0 - 1) as f64 / window.as_secs_f64();
        let cpu = (cpu1 - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;
        eprintln!("idle, {label}: worker CPU {cpu:.2} % of a core (both processes), Redis {per_s:.1} commands/s from the worker");
        (cpu, per_s)
    };
    // A worker that polls instead of sleeping used half a core and sent thousands of commands
    // a second; this debug build on a shared machine measures 0.4-1.3 % where the release
    // build measures 0.2-0.3 % (make bench measures it for the 1 % target). The commands a
    // second do not depend on the build and keep their strict bound.
    const DEBUG_CPU_BOUND: f64 = 3.0;
    let (cpu, cmds) = measure("rate_limit = 100 (default)");
    assert!(cpu <= DEBUG_CPU_BOUND, "CPU {cpu:.2} %");
    assert!(cmds <= 50.0, "{cmds:.1} commands/s");
    pg.set("redis_sync.rate_limit", "0");
    wait_for("the setting applied", T, || {
        // (A new session reads the reloaded file, as the worker does at its next turn.)
        let v = pg.query_text("SELECT current_setting('redis_sync.rate_limit')");
        (v.as_deref() == Some("0")).then_some(())
    });
    let (cpu, cmds) = measure("rate_limit = 0");
    assert!(cpu <= DEBUG_CPU_BOUND, "CPU {cpu:.2} %");
    assert!(cmds <= 50.0, "{cmds:.1} commands/s");
    assert_eq!(pg.worker_pids(), Some(pids));
}

#[test]
fn both_worker_processes_share_one_rate_limit() {
    let _machine = shared();
    let redis = Redis::start();
    let mut r = redis.client();
    load_keys(&mut r, 0, 200_000);
    add_numbered(&mut r, "budget", 0..200_000);
    let pg = Cluster::start_defaults(
        &redis,
        &[("redis_sync.rate_limit", "20"), ("redis_sync.sync_interval", "100ms")],
    );
    let rows = || pg.number("SELECT messages_processed FROM redis_sync_status()");
    let kv = || pg.number("SELECT key_values_processed FROM redis_sync_status()");
    wait_for("both workers busy", T, || (rows() > 0 && kv() > 0).then_some(()));
    // A window with both at work: stream reads in one process, key-value pages in the other,
    // every round trip counted in redis_ops.
    let ops = || pg.number("SELECT redis_ops FROM redis_sync_status()");
    let (t0, ops0, rows0, kv0) = (Instant::now(), ops(), rows(), kv());
    std::thread::sleep(Duration::from_secs(10));
    let (ops1, rows1, kv1) = (ops(), rows(), kv());
    let per_s = (ops1 - ops0) as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "rate_limit = 20: {per_s:.1} round trips/s from both workers; {} rows, {} keys meanwhile",
        rows1 - rows0,
        kv1 - kv0
    );
    assert!(rows1 > rows0 && rows1 < 200_001, "streams busy all along: {rows0} -> {rows1}");
    assert!(kv1 > kv0, "key values busy too: {kv0} -> {kv1}");
    // One budget for both: at most the rate (with the turns' publishing lag); a budget per
    // process would let each use the whole rate.
    assert!(per_s <= 20.0 * 1.25, "{per_s:.1} round trips/s at rate_limit = 20");
}

#[test]
fn a_redis_with_fewer_databases_than_the_search_range() {
    let _machine = shared();
    let redis = Redis::start_with(&["--databases", "4"]);
    let mut r = redis.client();
    select(&mut r, 1);
    add_entries(&mut r, "four", 10);
    select(&mut r, 3);
    let _: () = redis::cmd("MSET").arg("a").arg("1").arg("b").arg("2").query(&mut r).expect("MSET");
    // db_search_range is 0-15, as by default.
    let pg = Cluster::start_defaults(&redis, &[]);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'db1:four'", 10, T);
    pg.wait_number("SELECT count(*) FROM redis_key_values WHERE redis_db = 3", 2, T);
    wait_for("a few passes", T, || {
        (pg.number("SELECT key_value_passes FROM redis_sync_status()") >= 3).then_some(())
    });
    let skipped = "Searching Redis databases 0-15 for streams matching * (the server has no database 4-15: skipped)";
    assert_eq!(pg.log().matches(skipped).count(), 1, "log:\n{}", pg.log());
    assert_eq!(
        pg.number("SELECT errors FROM redis_sync_status()"),
        0,
        "{:?}",
        pg.status("last_error")
    );
    assert_eq!(pg.status("state").as_deref(), Some("running"));
}

#[test]
fn streams_flow_while_the_key_value_table_may_not_be_written() {
    let _machine = shared();
    let redis = Redis::start();
    let mut r = redis.client();
    let _: () =
        redis::cmd("MSET").arg("k1").arg("v1").arg("k2").arg("v2").query(&mut r).expect("MSET");
    let pg = Cluster::start_defaults(
        &redis,
        &[("redis_sync.role", "syncer"), ("redis_sync.backoff_max", "2s")],
    );
    pg.execute(
        "CREATE ROLE syncer LOGIN;
         CREATE TABLE redis_key_values (id bigserial PRIMARY KEY, redis_key text NOT NULL,
            redis_value text, redis_db int NOT NULL, value_type text NOT NULL,
            value_encoding text, expires_at timestamptz, deleted_at timestamptz,
            \"timestamp\" timestamptz NOT NULL DEFAULT now(), UNIQUE (redis_db, redis_key));
         GRANT USAGE, CREATE ON SCHEMA public TO syncer;",
    );
    // The stream table is the worker's own; the key-value table it may not touch.
    add_entries(&mut r, "flowing", 5_000);
    pg.wait_number("SELECT count(*) FROM redis_streams", 5_000, T);
    let lane = |pg: &Cluster, name: &str| {
        pg.query_text(&format!(
            "SELECT state || '|' || coalesce(last_error, '') FROM redis_sync_lanes() WHERE lane = '{name}'"
        ))
        .unwrap_or_default()
    };
    wait_for("the key-value lane's error", T, || {
        let kv = lane(&pg, "key_values");
        kv.contains("permission denied for table redis_key_values").then_some(())
    });
    assert!(lane(&pg, "key_values")
        .contains("GRANT SELECT, INSERT, UPDATE, DELETE ON public.redis_key_values TO syncer"));
    // Entries keep landing at once while the key-value lane backs off.
    add_numbered(&mut r, "flowing", 5_000..6_000);
    pg.wait_number("SELECT count(*) FROM redis_streams", 6_000, Duration::from_secs(10));
    let streams = lane(&pg, "streams");
    assert!(streams.ends_with('|'), "the stream lane has no error: {streams}");
    // Acknowledged as soon as their commits are on disk (within a second or so).
    wait_for("nothing pending", Duration::from_secs(5), || {
        (pending(&mut r, "flowing", GROUP) == 0).then_some(())
    });
    // Granted, the key-value lane comes back by itself.
    pg.execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON redis_key_values TO syncer;
         GRANT USAGE ON SEQUENCE redis_key_values_id_seq TO syncer;",
    );
    pg.wait_number("SELECT count(*) FROM redis_key_values", 2, T);
}

/// `synchronous_commit = off` for the worker's database, then the server stopped with
/// `-m immediate` (SIGQUIT): the commits of the last moments are lost, and none of the
/// entries they held may have been acknowledged.
fn crash_with_asynchronous_commit(steady: bool) {
    let entries = env_size("RPS_SCENARIO_ENTRIES", 200_000);
    let repeats = env_size("RPS_SCENARIO_REPEATS", 5);
    let redis = Redis::start();
    let mut r = redis.client();
    let mut pg = Cluster::start_defaults(&redis, &[("redis_sync.rate_limit", "0")]);
    pg.execute("ALTER DATABASE postgres SET synchronous_commit = off");
    // The worker picks up database settings when it connects.
    let pid = pg.worker_pid().expect("worker");
    pg.execute(&format!("SELECT pg_terminate_backend({pid})"));
    wait_for("the worker back", T, || pg.worker_pid().filter(|p| *p != pid));
    assert!(pg.wait_until_running());
    let mut all: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    for round in 0..repeats {
        let stream = format!("async-{round}");
        // (The table exists once the first entries landed.)
        let before: i64 = pg
            .try_query_text("SELECT count(*) FROM redis_streams")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if steady {
            // A slow steady stream (each commit smaller than a WAL page), stopped in the
            // middle.
            let port = redis.port;
            let s = vec![(0u8, stream.clone())];
            let producer = std::thread::spawn(move || produce(port, &s, 50, 4.0));
            wait_for("some of it landed", T, || {
                (pg.try_query_text("SELECT count(*) FROM redis_streams")?.parse::<i64>().ok()?
                    > before + 40)
                    .then_some(())
            });
            pg.crash_restart();
            let ids = producer.join().expect("producer");
            all.extend(ids);
        } else {
            let ids = produce_fast(&mut r, &stream, entries);
            wait_for("a partial drain", T, || {
                let n: i64 =
                    pg.try_query_text("SELECT count(*) FROM redis_streams")?.parse().ok()?;
                (n > before + entries as i64 / 10 && n < before + entries as i64 * 9 / 10)
                    .then_some(())
            });
            pg.crash_restart();
            all.insert((0, stream), ids);
        }
    }
    let (lost, duplicated) = lost_and_duplicated(&pg, &mut r, &all);
    let total: usize = all.values().map(Vec::len).sum();
    eprintln!(
        "synchronous_commit = off, {} immediate stops ({}): {lost} of {total} entries lost, {duplicated} duplicated",
        repeats,
        if steady { "50 entries/s" } else { "mid-drain" }
    );
    assert_eq!((lost, duplicated), (0, 0));
}

#[test]
fn asynchronous_commit_and_an_immediate_stop_mid_drain_lose_nothing() {
    let _machine = shared();
    crash_with_asynchronous_commit(false);
}

#[test]
fn asynchronous_commit_and_an_immediate_stop_of_a_steady_stream_lose_nothing() {
    let _machine = shared();
    crash_with_asynchronous_commit(true);
}

/// Kills the postmaster and checks both worker processes are gone within 2 s and a new
/// postmaster starts on the same data directory.
fn kill_postmaster_and_restart(pg: &mut Cluster, state: &str) {
    let pids = pg.worker_pids().expect("both workers");
    pg.kill_postmaster();
    let killed = Instant::now();
    let gone = wait_for(
        &format!("both workers gone after the postmaster ({state})"),
        Duration::from_secs(10),
        || pids.iter().all(|p| !process_alive(*p)).then(|| killed.elapsed()),
    );
    eprintln!("postmaster killed while {state}: workers gone after {} ms", gone.as_millis());
    assert!(
        gone <= Duration::from_secs(2),
        "{state}: the worker lived {gone:?} after the postmaster"
    );
    // A new postmaster starts on the same data directory (nothing holds the old shared
    // memory) and the worker comes back.
    pg.start_again();
    assert!(pg.wait_until_running(), "{state}: log:\n{}", pg.log());
}

#[test]
fn the_worker_dies_with_the_postmaster_in_every_state() {
    let _machine = shared();
    let redis = Redis::start_with(&["--notify-keyspace-events", ""]);
    let mut r = redis.client();
    add_entries(&mut r, "pm", 10);
    let mut pg = Cluster::start_defaults(&redis, &[("redis_sync.rate_limit", "0")]);
    pg.wait_number("SELECT count(*) FROM redis_streams", 10, T);
    wait_for("idle", T, || {
        let s = pg.query_text(
            "SELECT state FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync'",
        )?;
        (s == "idle").then_some(())
    });
    kill_postmaster_and_restart(&mut pg, "idle");

    add_numbered(&mut r, "pm", 10..100_010);
    wait_for("mid-drain", T, || {
        let n: i64 = pg.try_query_text("SELECT count(*) FROM redis_streams")?.parse().ok()?;
        (n > 10 && n < 90_000).then_some(())
    });
    kill_postmaster_and_restart(&mut pg, "draining");

    load_keys(&mut r, 0, 300_000);
    wait_for("a key-value pass under way", T, || {
        let n: i64 = pg
            .try_query_text("SELECT key_values_processed FROM redis_sync_status()")?
            .parse()
            .ok()?;
        (n > 0 && n < 250_000).then_some(())
    });
    kill_postmaster_and_restart(&mut pg, "in a key-value pass");

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("KA")
        .query(&mut r)
        .expect("CONFIG SET");
    wait_for("notifications followed", T, || {
        pg.log().contains("Redis publishes keyspace notifications").then_some(())
    });
    kill_postmaster_and_restart(&mut pg, "following notifications");
    pg.wait_number("SELECT count(*) FROM redis_streams", 100_010, T);
}
