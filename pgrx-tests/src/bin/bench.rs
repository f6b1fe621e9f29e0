//! `make bench`: measured figures of the worker on this machine, in one run, side by side,
//! written to bench/RESULTS.md with the settings each figure used. Every cluster runs with
//! fsync and synchronous_commit on (as users run Postgres).
//!
//! 1. At the defaults, on a production-shaped Redis: 1,000,000 ordinary keys beside 20
//!    streams in 3 databases that receive 1,000 entries/s in all: XADD-to-commit latency
//!    (the producer's send time in the entry against the row's commit timestamp) while the
//!    keys are mirrored, and how long the mirror takes.
//! 2. An idle worker (streams in 3 databases, a few keys, nothing changing): its CPU and the
//!    commands Redis sees from it, at the default rate limit and unlimited.
//! 3. A key-value table the worker may not write: a 200,000-entry drain with and without
//!    the grant.
//! 4. Tuned stream sync (batch_size=1000, rate_limit=0): drain against COPY of the same rows,
//!    latency at 10,000 entries/s; and the same drain at the defaults.
//! 5. Key-value sync of 1,000,000 string keys (initial sync against COPY, idle and verifying
//!    passes, one changed key by scanning and by notification).
//!
//! Environment: BENCH_ENTRIES (default 1000000), BENCH_KEYS (default 1000000),
//! BENCH_LATENCY_SECS (default 10), BENCH_ONLY (defaults, idle, grants, streams, keys, bigkeys, routes,
//! failover, servers, workers or cluster: one
//! part alone, printed, RESULTS.md untouched), PG_CONFIG (the Postgres with the extension
//! installed, built with --release).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_pg_sync_e2e::*;

const STREAMS: usize = 10;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Durable settings for tuned runs, on top of the harness's fast retries.
const ROOMY: [(&str, &str); 2] = [("shared_buffers", "512MB"), ("max_wal_size", "4GB")];

fn durable(redis: &Redis, settings: &[(&str, &str)]) -> Cluster {
    let port = redis.port.to_string();
    let mut all: Vec<(String, String)> = vec![
        ("redis_sync.redis_host".into(), "127.0.0.1".into()),
        ("redis_sync.redis_port".into(), port),
    ];
    all.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Cluster::start_with(ClusterOptions {
        preload: true,
        settings: all,
        durable: true,
        ..Default::default()
    })
}

/// The fields of the bench's entry `j` of stream `s`.
fn entry_fields(s: usize, j: usize) -> [String; 10] {
    [
        "heart_rate".into(),
        (60 + j % 40).to_string(),
        "spo2".into(),
        (95 + j % 5).to_string(),
        "temperature".into(),
        "36.6".into(),
        "device_id".into(),
        format!("dev-{s}"),
        "quality".into(),
        "good".into(),
    ]
}

/// `total` entries over the bench's streams, 2,000 to a round trip; `send` runs the
/// round trip of one stream's chunk (through a single server's or a cluster's client).
fn fill_with(total: usize, mut send: impl FnMut(&str, Vec<[String; 10]>)) {
    let per = total / STREAMS;
    for s in 0..STREAMS {
        let key = format!("biosignal-{s}-stream");
        let mut i = 0;
        while i < per {
            send(&key, (i..(i + 2000).min(per)).map(|j| entry_fields(s, j)).collect());
            i += 2000;
        }
    }
}

fn fill(r: &mut redis::Connection, total: usize) {
    fill_with(total, |key, chunk| {
        let mut p = redis::pipe();
        for fields in chunk {
            p.cmd("XADD").arg(key).arg("*").arg(&fields[..]).ignore();
        }
        let _: () = p.query(r).expect("XADD");
    });
}

fn fill_cluster(c: &mut redis::cluster::ClusterConnection, total: usize) {
    fill_with(total, |key, chunk| {
        let mut p = redis::cluster::cluster_pipe();
        for fields in chunk {
            p.cmd("XADD").arg(key).arg("*").arg(&fields[..]).ignore();
        }
        let _: () = p.query(c).expect("XADD");
    });
}

/// Samples the worker's RssAnon every 50 ms until `stop`; returns the peak in KiB.
fn watch_memory(pid: i32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(kb) = rss_anon_kb(pid) {
                peak = peak.max(kb);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    })
}

struct Drain {
    rows_per_s: f64,
    secs: f64,
    peak_rss_kb: u64,
}

/// Turns the worker on (it was started paused) and times the drain of `total` rows into
/// `table`.
fn drain(pg: &Cluster, table: &str, total: usize) -> Drain {
    let pid = wait_for("worker", Duration::from_secs(30), || pg.worker_pid());
    let stop = Arc::new(AtomicBool::new(false));
    let mem = watch_memory(pid, stop.clone());
    // Progress is read from the worker's shared-memory counter (cheap), not with count(*)
    // over a growing table, which would take a core away from the worker on this machine.
    let processed = || -> i64 {
        pg.try_query_text("SELECT messages_processed FROM redis_sync_status()")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let base = processed();
    let t0 = Instant::now();
    pg.set("redis_sync.enabled", "on");
    loop {
        let n = processed() - base;
        if n as usize >= total {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(1800), "drain too slow: {n} of {total}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        pg.number(&format!("SELECT count(*) FROM {table}")),
        total as i64,
        "rows in {table}"
    );
    let peak_rss_kb = mem.join().unwrap_or(0);
    Drain { rows_per_s: total as f64 / secs, secs, peak_rss_kb }
}

struct KvFigures {
    keys: usize,
    rate: f64,
    secs: f64,
    copy_rate: f64,
    peak_rss_kb: u64,
    idle_pass_secs: f64,
    verify_pass_secs: f64,
    idle_rows_written: i64,
    scan_delay_ms: Vec<f64>,
    notify_ms: (f64, f64, f64, usize),
}

fn counter(pg: &Cluster, col: &str) -> i64 {
    pg.try_query_text(&format!("SELECT {col} FROM redis_sync_status()"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Milliseconds until `key` reads `value` in the key-value table (polled every `every`).
fn visible_after(
    pg: &mut postgres::Client,
    key: &str,
    value: &str,
    start: Instant,
    every: Duration,
) -> f64 {
    loop {
        let row = pg
            .query_opt(
                "SELECT redis_value FROM redis_key_values WHERE redis_db = 0 AND redis_key = $1",
                &[&key],
            )
            .expect("poll");
        if row.map(|r| r.get::<_, String>(0)).as_deref() == Some(value) {
            return start.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{key} never became {value}");
        std::thread::sleep(every);
    }
}

fn bench_keys(total: usize) -> KvFigures {
    let redis = Redis::start();
    let mut r = redis.client();
    eprintln!("[bench] filling {total} string keys");
    for start in (0..total).step_by(10_000) {
        let mut p = redis::pipe();
        for i in start..(start + 10_000).min(total) {
            p.cmd("SET").arg(format!("key:{i}")).arg(format!("value-{i}")).ignore();
        }
        let _: () = p.query(&mut r).expect("SET");
    }
    let pg = durable(
        &redis,
        &[
            ("redis_sync.enabled", "off"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_auto_discovery", "off"),
            ("redis_sync.db_search_range", "0"),
            ("redis_sync.sync_interval", "1s"),
            ROOMY[0],
            ROOMY[1],
        ],
    );
    eprintln!("[bench] key-value initial sync");
    let pid = wait_for("key-value worker", Duration::from_secs(30), || pg.kv_worker_pid());
    let stop = Arc::new(AtomicBool::new(false));
    let mem = watch_memory(pid, stop.clone());
    let t0 = Instant::now();
    pg.set("redis_sync.enabled", "on");
    while (counter(&pg, "key_values_processed") as usize) < total {
        assert!(t0.elapsed() < Duration::from_secs(1800), "initial sync too slow");
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak_rss_kb = mem.join().unwrap_or(0);
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values"), total as i64);
    eprintln!(
        "[bench]   {:.0} rows/s ({secs:.1}s), peak RssAnon {peak_rss_kb} KiB",
        total as f64 / secs
    );

    let dump = pg.data_dir().join("bench_kv.copy");
    let dump = dump.to_string_lossy();
    let cols = "redis_key, redis_value, redis_db, value_type, value_encoding, expires_at, deleted_at, \"timestamp\"";
    pg.execute(&format!("COPY (SELECT {cols} FROM redis_key_values) TO '{dump}'"));
    pg.execute("CREATE TABLE kv_copy (LIKE redis_key_values INCLUDING ALL)");
    pg.execute("CHECKPOINT");
    let t = Instant::now();
    pg.execute(&format!("COPY kv_copy ({cols}) FROM '{dump}'"));
    let copy_rate = total as f64 / t.elapsed().as_secs_f64();
    pg.execute("DROP TABLE kv_copy");
    eprintln!("[bench]   COPY {copy_rate:.0} rows/s");

    eprintln!("[bench] idle passes");
    let writes = |pg: &Cluster| {
        pg.number("SELECT n_tup_ins + n_tup_upd + n_tup_del + n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'redis_key_values'")
    };
    // Passes back to back (sync_interval 10ms), so the time between two pass completions is
    // the time one pass takes. The first pass after the initial sync verifies every key
    // against the table (nothing is remembered yet); the next ones are the idle passes.
    pg.set("redis_sync.sync_interval", "10ms");
    let pass_secs = |pg: &Cluster| {
        let p1 = counter(pg, "key_value_passes");
        wait_for("a pass", Duration::from_secs(600), || {
            (counter(pg, "key_value_passes") > p1).then_some(())
        });
        let t1 = Instant::now();
        wait_for("a pass", Duration::from_secs(600), || {
            (counter(pg, "key_value_passes") > p1 + 1).then_some(())
        });
        t1.elapsed().as_secs_f64()
    };
    let _ = pass_secs(&pg);
    std::thread::sleep(Duration::from_millis(700));
    let w0 = writes(&pg);
    let processed0 = counter(&pg, "key_values_processed");
    let idle: Vec<f64> = (0..3).map(|_| pass_secs(&pg)).collect();
    let idle_pass_secs = idle.iter().copied().fold(0.0, f64::max);
    std::thread::sleep(Duration::from_millis(700));
    let idle_rows_written =
        (writes(&pg) - w0) + (counter(&pg, "key_values_processed") - processed0);
    eprintln!("[bench]   idle passes {idle:.2?} s, rows written {idle_rows_written}");
    // A verifying pass compares every key with the table (key_value_verify_interval = 0).
    pg.set("redis_sync.key_value_verify_interval", "0");
    let verify_pass_secs = pass_secs(&pg);
    pg.set("redis_sync.key_value_verify_interval", "600");
    let _ = pass_secs(&pg);
    eprintln!("[bench]   verifying pass {verify_pass_secs:.2} s");

    eprintln!("[bench] one changed key, scanning alone (sync_interval 1s)");
    pg.set("redis_sync.sync_interval", "1s");
    let _ = pass_secs(&pg);
    let mut c = pg.client();
    let mut scan_delay_ms = Vec::new();
    for trial in 0..10usize {
        // Changes arrive at different points of the pass cycle.
        std::thread::sleep(Duration::from_millis(137 * trial as u64 % 1000));
        let key = format!("key:{}", (trial * 337_129 + 4242) % total);
        let value = format!("changed-{trial}");
        let start = Instant::now();
        let _: () = redis::cmd("SET").arg(&key).arg(&value).query(&mut r).expect("SET");
        scan_delay_ms.push(visible_after(&mut c, &key, &value, start, Duration::from_millis(10)));
    }
    eprintln!("[bench]   {scan_delay_ms:.0?} ms");

    eprintln!("[bench] one changed key, with keyspace notifications");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("KA")
        .query(&mut r)
        .expect("CONFIG SET");
    wait_for("the listener", Duration::from_secs(600), || {
        pg.log().contains("Redis publishes keyspace notifications").then_some(())
    });
    let mut lat = Vec::new();
    for trial in 0..200usize {
        let key = format!("key:{}", (trial * 7919 + 17) % total);
        let value = format!("notified-{trial}");
        let start = Instant::now();
        let _: () = redis::cmd("SET").arg(&key).arg(&value).query(&mut r).expect("SET");
        lat.push(visible_after(&mut c, &key, &value, start, Duration::from_micros(500)));
        std::thread::sleep(Duration::from_millis(20));
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let notify_ms = (pct(0.5), pct(0.99), lat[lat.len() - 1], lat.len());
    eprintln!(
        "[bench]   p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        notify_ms.0, notify_ms.1, notify_ms.2
    );
    KvFigures {
        keys: total,
        rate: total as f64 / secs,
        secs,
        copy_rate,
        peak_rss_kb,
        idle_pass_secs,
        verify_pass_secs,
        idle_rows_written,
        scan_delay_ms,
        notify_ms,
    }
}

/// Figures of the deployment at the defaults.
struct Defaults {
    keys: usize,
    p50: f64,
    p99: f64,
    max: f64,
    entries: usize,
    mirrored_secs: f64,
    lost: usize,
    duplicated: i64,
    errors: i64,
}

fn bench_defaults(keys: usize) -> Defaults {
    let redis = Redis::start();
    let mut r = redis.client();
    eprintln!("[bench] defaults: {keys} keys and 20 streams in 3 databases");
    load_keys(&mut r, 0, keys);
    let streams: Vec<(u8, String)> =
        (0..20).map(|i| ((i % 3) as u8, format!("sensor-{i}"))).collect();
    let mut ids: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    for (db, key) in &streams {
        select(&mut r, *db);
        let id: String =
            redis::cmd("XADD").arg(key).arg("*").arg("seed").arg(1).query(&mut r).expect("XADD");
        ids.insert((*db, key.clone()), vec![id]);
    }
    let started = Instant::now();
    let extra = bench_set();
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let pg = Cluster::start_defaults(&redis, &extra);
    assert!(pg.wait_until_running());
    pg.wait_number("SELECT count(*) FROM redis_streams", 20, Duration::from_secs(60));
    // 1,000 entries a second while the keys are mirrored, and 10 s more after.
    let port = redis.port;
    let done = Arc::new(AtomicBool::new(false));
    let producer = produce_until(port, streams.clone(), done.clone(), 5.0);
    let mirror = !extra.contains(&("redis_sync.key_value_auto_discovery", "off"));
    let mirrored = if !mirror {
        std::thread::sleep(Duration::from_secs(30));
        started.elapsed()
    } else {
        wait_for("every key mirrored", Duration::from_secs(900), || {
            // The worker's own counter (cheap), not count(*) over a growing table, which would
            // take a core away from the worker.
            let n: usize = pg
                .try_query_text("SELECT key_values_processed FROM redis_sync_status()")?
                .parse()
                .ok()?;
            (n >= keys).then(|| started.elapsed())
        })
    };
    if mirror {
        eprintln!("[bench]   keys mirrored {:.1} s after start", mirrored.as_secs_f64());
        assert_eq!(pg.number("SELECT count(*) FROM redis_key_values"), keys as i64);
    }
    std::thread::sleep(Duration::from_secs(10));
    done.store(true, Ordering::Relaxed);
    let produced = producer.join().expect("producer");
    let entries: usize = produced.values().map(Vec::len).sum();
    for (k, v) in produced {
        ids.entry(k).or_default().extend(v);
    }
    let (lost, duplicated) = lost_and_duplicated(&pg, &mut r, &ids);
    let lat = commit_latencies(&pg);
    if std::env::var("BENCH_TRACE").is_ok() {
        trace(&pg);
    }
    let d = Defaults {
        keys,
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied().unwrap_or(f64::NAN),
        entries,
        mirrored_secs: mirrored.as_secs_f64(),
        lost,
        duplicated,
        errors: pg.number("SELECT errors FROM redis_sync_status()"),
    };
    eprintln!(
        "[bench]   XADD to commit p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} entries; lost {}, duplicated {}",
        d.p50, d.p99, d.max, d.entries, d.lost, d.duplicated
    );
    d
}

/// Adds 1,000 entries a second to `streams` (in slices of `slice` seconds) until `done`; the
/// IDs Redis gave, by stream.
fn produce_until(
    port: u16,
    streams: Vec<(u8, String)>,
    done: Arc<AtomicBool>,
    slice: f64,
) -> std::thread::JoinHandle<BTreeMap<(u8, String), Vec<String>>> {
    std::thread::spawn(move || {
        let mut all: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
        while !done.load(Ordering::Relaxed) {
            for (k, v) in produce(port, &streams, 1000, slice) {
                all.entry(k).or_default().extend(v);
            }
        }
        all
    })
}

/// BENCH_SET="name=value,..." changes settings of the scenarios at the defaults (to
/// compare).
fn bench_set() -> Vec<(String, String)> {
    std::env::var("BENCH_SET")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Latency by second of the run (BENCH_TRACE), to see where it comes from.
fn trace(pg: &Cluster) {
    let mut c = pg.client();
    let gaps = c
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY gap),
                    percentile_cont(0.9) WITHIN GROUP (ORDER BY gap),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY gap), max(gap), count(*),
                    (SELECT avg(n) FROM (SELECT count(*) n FROM redis_streams GROUP BY xmin) x)::float8
               FROM (SELECT (extract(epoch FROM ts - lag(ts) OVER (ORDER BY ts)) * 1000)::float8 AS gap
                       FROM (SELECT DISTINCT pg_xact_commit_timestamp(xmin) AS ts
                               FROM redis_streams) a) b",
            &[],
        )
        .expect("gaps");
    eprintln!(
        "[trace] gaps between commits: p50 {:.1} ms, p90 {:.1}, p99 {:.1}, max {:.1}, {} commits, {:.1} rows each",
        gaps.get::<_, f64>(0),
        gaps.get::<_, f64>(1),
        gaps.get::<_, f64>(2),
        gaps.get::<_, f64>(3),
        gaps.get::<_, i64>(4),
        gaps.get::<_, f64>(5)
    );
    // Where the time goes: from the producer's send to Redis' clock in the entry ID (the
    // XADD waiting on a busy Redis), and from there to the commit (the worker).
    let parts = c
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY r), percentile_cont(0.99) WITHIN GROUP (ORDER BY r),
                    max(r),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY w), percentile_cont(0.99) WITHIN GROUP (ORDER BY w),
                    max(w)
               FROM (SELECT (split_part(message_id, '-', 1)::float8 * 1000 - (data->>'sent_us')::float8) / 1000.0 AS r,
                            (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e3
                             - split_part(message_id, '-', 1)::float8) AS w
                       FROM redis_streams WHERE data ? 'sent_us') x",
            &[],
        )
        .expect("parts");
    eprintln!(
        "[trace] send to Redis: p50 {:.1} ms, p99 {:.1}, max {:.1}; Redis to commit: p50 {:.1} ms, p99 {:.1}, max {:.1}",
        parts.get::<_, f64>(0),
        parts.get::<_, f64>(1),
        parts.get::<_, f64>(2),
        parts.get::<_, f64>(3),
        parts.get::<_, f64>(4),
        parts.get::<_, f64>(5)
    );
    for row in c
        .query(
            "SELECT floor(extract(epoch FROM pg_xact_commit_timestamp(xmin)))::int8 % 1000 AS s,
                    count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY l), max(l)
               FROM (SELECT xmin, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6
                             - (data->>'sent_us')::float8) / 1000.0 AS l
                       FROM redis_streams WHERE data ? 'sent_us') x
              GROUP BY 1 ORDER BY 1",
            &[],
        )
        .expect("trace")
    {
        eprintln!(
            "[trace] {:>4} {:>5} p50 {:>7.1} max {:>7.1}",
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, f64>(2),
            row.get::<_, f64>(3)
        );
    }
}

struct BigKeys {
    /// While the first pass mirrors the keyspace (the 10 MB hash row written once).
    first: (f64, f64, f64, usize),
    /// Afterwards: passes over the same keys, nothing changing but the streams.
    steady: (f64, f64, f64, usize),
    peak_rss_kb: u64,
    stop_secs: f64,
    skipped: String,
    lost: usize,
    duplicated: i64,
}

/// Streams at the defaults beside a 500,000-field hash (mirrored) and a 5,000,000-member
/// sorted set (over `key_value_max_size`: skipped): stream latency, the worker's memory, and
/// how fast `pg_ctl stop -m fast` returns.
fn bench_big_keys(secs: f64) -> BigKeys {
    let redis = Redis::start();
    let mut r = redis.client();
    eprintln!("[bench] big keys: a 500,000-field hash and a 5,000,000-member sorted set");
    load_big_keys(&mut r);
    let streams: Vec<(u8, String)> = (0..3).map(|i| (0, format!("beside-{i}"))).collect();
    let mut ids: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    for (_, key) in &streams {
        let id: String =
            redis::cmd("XADD").arg(key).arg("*").arg("seed").arg(1).query(&mut r).expect("XADD");
        ids.insert((0, key.clone()), vec![id]);
    }
    let extra = bench_set();
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut pg = Cluster::start_defaults(&redis, &extra);
    assert!(pg.wait_until_running());
    pg.wait_number("SELECT count(*) FROM redis_streams", 3, Duration::from_secs(60));
    // The key-value worker holds the big values.
    let pid = pg.kv_worker_pid().expect("key-value worker pid");
    let stop = Arc::new(AtomicBool::new(false));
    let memory = watch_memory(pid, stop.clone());
    // From the worker's first pass on, until the hash is mirrored and `secs` more.
    let port = redis.port;
    let done = Arc::new(AtomicBool::new(false));
    let producer = produce_until(port, streams.clone(), done.clone(), 1.0);
    pg.wait_number(
        "SELECT count(*) FROM redis_key_values WHERE redis_key = 'big-hash'",
        1,
        Duration::from_secs(300),
    );
    let mirrored_us = unix_micros();
    std::thread::sleep(Duration::from_secs_f64(secs));
    done.store(true, Ordering::Relaxed);
    for (k, v) in producer.join().expect("producer") {
        ids.entry(k).or_default().extend(v);
    }
    let (lost, duplicated) = lost_and_duplicated(&pg, &mut r, &ids);
    stop.store(true, Ordering::Relaxed);
    let peak_rss_kb = memory.join().unwrap_or(0);
    let skipped = pg
        .try_query_text(
            "SELECT string_agg(redis_key || ' (' || value_type || ', ' || bytes || ' bytes)', ', ')
               FROM redis_sync_skipped_keys()",
        )
        .unwrap_or_default();
    if std::env::var("BENCH_TRACE").is_ok() {
        trace(&pg);
    }
    let figures = |sql: &str| {
        let mut c = pg.client();
        let mut v: Vec<f64> = c
            .query(sql, &[&(mirrored_us as f64)])
            .expect("latencies")
            .iter()
            .map(|r| r.get::<_, f64>(0))
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        (percentile(&v, 50.0), percentile(&v, 99.0), v.last().copied().unwrap_or(f64::NAN), v.len())
    };
    let latency = "(extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6 - (data->>'sent_us')::float8) / 1000.0";
    let first = figures(&format!(
        "SELECT {latency} FROM redis_streams WHERE (data->>'sent_us')::float8 < $1"
    ));
    let steady = figures(&format!(
        "SELECT {latency} FROM redis_streams WHERE (data->>'sent_us')::float8 >= $1"
    ));
    let t0 = Instant::now();
    pg.stop();
    let b = BigKeys {
        first,
        steady,
        peak_rss_kb,
        stop_secs: t0.elapsed().as_secs_f64(),
        skipped,
        lost,
        duplicated,
    };
    eprintln!(
        "[bench]   XADD to commit while mirroring: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} entries); afterwards: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} entries); key-value worker peak RssAnon {:.1} MiB; stop -m fast {:.2} s; skipped: {}",
        b.first.0, b.first.1, b.first.2, b.first.3, b.steady.0, b.steady.1, b.steady.2, b.steady.3,
        b.peak_rss_kb as f64 / 1024.0, b.stop_secs, b.skipped
    );
    b
}

/// CPU (percent of a core) and Redis commands per second of an idle worker, at the default
/// rate limit and unlimited.
fn bench_idle() -> Vec<(&'static str, f64, f64)> {
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
    pg.wait_number("SELECT count(*) FROM redis_streams", 3, Duration::from_secs(60));
    pg.wait_number("SELECT count(*) FROM redis_key_values", 12, Duration::from_secs(60));
    // Both worker processes' CPU together.
    let pids = pg.worker_pids().expect("both workers");
    let cpu = || pids.iter().map(|p| cpu_time(*p).expect("cpu")).sum::<Duration>();
    let mut out = Vec::new();
    for (label, rate) in [("rate_limit = 100 (default)", "100"), ("rate_limit = 0", "0")] {
        pg.set("redis_sync.rate_limit", rate);
        std::thread::sleep(Duration::from_secs(3));
        let window = Duration::from_secs(10);
        let (cpu0, cmd0) = (cpu(), commands_processed(&mut r));
        std::thread::sleep(window);
        let (cpu1, cmd1) = (cpu(), commands_processed(&mut r));
        let cpu = (cpu1 - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;
        let cmds = (cmd1 - cmd0 - 1) as f64 / window.as_secs_f64();
        eprintln!("[bench] idle, {label}: CPU {cpu:.2} %, {cmds:.1} commands/s");
        out.push((label, cpu, cmds));
    }
    out
}

/// Seconds a 200,000-entry drain takes at the defaults, with the worker's role allowed to
/// write the key-value table, and not.
fn bench_grants(entries: usize) -> (f64, f64, String) {
    let mut secs = Vec::new();
    let mut lane = String::new();
    let order: Vec<bool> = match std::env::var("BENCH_GRANTS").as_deref() {
        Ok("missing") => vec![false],
        _ => vec![true, false],
    };
    for granted in order {
        let redis = Redis::start();
        let mut r = redis.client();
        load_keys(&mut r, 0, 10_000);
        let pg = Cluster::start_defaults(&redis, &[("redis_sync.role", "syncer")]);
        pg.execute(
            "CREATE ROLE syncer LOGIN;
             CREATE TABLE redis_key_values (id bigserial PRIMARY KEY, redis_key text NOT NULL,
                redis_value text, redis_db int NOT NULL, value_type text NOT NULL,
                value_encoding text, expires_at timestamptz, deleted_at timestamptz,
                \"timestamp\" timestamptz NOT NULL DEFAULT now(), UNIQUE (redis_db, redis_key));
             GRANT USAGE, CREATE ON SCHEMA public TO syncer;",
        );
        if granted {
            pg.execute(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON redis_key_values TO syncer;
                 GRANT USAGE ON SEQUENCE redis_key_values_id_seq TO syncer;",
            );
            pg.wait_number(
                "SELECT count(*) FROM redis_key_values",
                10_000,
                Duration::from_secs(300),
            );
        } else {
            wait_for("the key-value lane failing", Duration::from_secs(300), || {
                let s = pg.try_query_text(
                    "SELECT state FROM redis_sync_lanes() WHERE lane = 'key_values'",
                )?;
                (s == "backing_off").then_some(())
            });
        }
        // The stream is tracked before the clock starts: discovery is not what is measured.
        let seed = produce_fast(&mut r, "drained", 1);
        let count = "SELECT count(*) FROM redis_streams WHERE stream_key = 'drained'";
        pg.wait_number(count, seed.len() as i64, Duration::from_secs(120));
        let t0 = Instant::now();
        let ids = produce_fast(&mut r, "drained", entries);
        pg.wait_number(count, (ids.len() + 1) as i64, Duration::from_secs(1800));
        secs.push(t0.elapsed().as_secs_f64());
        if !granted {
            lane = pg
                .query_text("SELECT state || ': ' || coalesce(last_error, '') FROM redis_sync_lanes() WHERE lane = 'key_values'")
                .unwrap_or_default();
        }
        eprintln!(
            "[bench] drain of {entries} with the key-value grant {}: {:.1} s",
            if granted { "present" } else { "missing" },
            secs[secs.len() - 1]
        );
    }
    (secs[0], secs[1], lane)
}

/// Latency in ms (p50, p99, max) from XADD to commit at `rate`/s over 10 streams for `secs`.
fn commit_latency(
    redis: &Redis,
    pg: &Cluster,
    prefix: &str,
    table: &str,
    rate: u64,
    secs: u64,
) -> (f64, f64, f64, usize) {
    let streams: Vec<(u8, String)> =
        (0..STREAMS).map(|s| (0u8, format!("{prefix}-{s}-stream"))).collect();
    let mut r = redis.client();
    for (_, key) in &streams {
        let _: String =
            redis::cmd("XADD").arg(key).arg("*").arg("seed").arg(1).query(&mut r).expect("XADD");
    }
    pg.wait_number(
        &format!("SELECT count(*) FROM {table}"),
        STREAMS as i64,
        Duration::from_secs(60),
    );
    let ids = produce_batched(redis.port, &streams, rate, secs as f64);
    let n: usize = ids.values().map(Vec::len).sum();
    pg.wait_number(
        &format!("SELECT count(*) FROM {table} WHERE data ? 'sent_us'"),
        n as i64,
        Duration::from_secs(300),
    );
    let mut c = pg.client();
    let rows = c
        .query(
            &format!(
                "SELECT (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6
                         - (data->>'sent_us')::float8) / 1000.0 FROM {table} WHERE data ? 'sent_us'"
            ),
            &[],
        )
        .expect("latencies");
    let mut lat: Vec<f64> = rows.iter().map(|r| r.get::<_, f64>(0)).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
        lat.len(),
    )
}

struct Tuned {
    fast: Drain,
    copy_rate: f64,
    copy_secs: f64,
    defaults: Drain,
    latency: (f64, f64, f64, usize),
    total: usize,
}

fn bench_streams(total: usize, lat_secs: u64) -> Tuned {
    let redis = Redis::start();
    let mut r = redis.client();
    eprintln!("[bench] filling {total} entries over {STREAMS} streams");
    fill(&mut r, total);
    let pg = durable(
        &redis,
        &[
            ("redis_sync.enabled", "off"),
            ("redis_sync.batch_size", "1000"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_discovery_patterns", "biosignal-*,lat-*"),
            ("redis_sync.key_value_auto_discovery", "off"),
            ROOMY[0],
            ROOMY[1],
        ],
    );
    eprintln!("[bench] drain: batch_size=1000, rate_limit=0");
    let fast = drain(&pg, "redis_streams", total);
    eprintln!(
        "[bench]   {:.0} rows/s ({:.1}s), peak RssAnon {} KiB",
        fast.rows_per_s, fast.secs, fast.peak_rss_kb
    );
    eprintln!("[bench] COPY of the same rows into an identical empty table");
    let dump = pg.data_dir().join("bench_rows.copy");
    let dump = dump.to_string_lossy();
    pg.execute(&format!(
        "COPY (SELECT stream_key, message_id, data, \"timestamp\" FROM redis_streams) TO '{dump}';
         CREATE TABLE copy_target (LIKE redis_streams INCLUDING ALL);
         CHECKPOINT;"
    ));
    let t = Instant::now();
    pg.execute(&format!(
        "COPY copy_target (stream_key, message_id, data, \"timestamp\") FROM '{dump}'"
    ));
    let copy_secs = t.elapsed().as_secs_f64();
    let copy_rate = total as f64 / copy_secs;
    eprintln!("[bench]   COPY {copy_rate:.0} rows/s ({copy_secs:.1}s)");
    pg.execute("DROP TABLE copy_target; CHECKPOINT");
    eprintln!(
        "[bench] latency at 10,000 entries/s for {lat_secs}s (batch_size=1000, rate_limit=0)"
    );
    pg.execute("ALTER SYSTEM SET redis_sync.stream_table = 'redis_streams_lat'");
    pg.reload();
    let latency = commit_latency(&redis, &pg, "lat", "redis_streams_lat", 10_000, lat_secs);
    eprintln!(
        "[bench]   p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} rows",
        latency.0, latency.1, latency.2, latency.3
    );
    eprintln!("[bench] drain at the defaults (batch_size=100, rate_limit=100)");
    pg.set("redis_sync.enabled", "off");
    wait_for("paused", Duration::from_secs(30), || {
        (pg.status("state").as_deref() == Some("paused")).then_some(())
    });
    for sql in [
        "ALTER SYSTEM SET redis_sync.batch_size = 100",
        "ALTER SYSTEM SET redis_sync.rate_limit = 100",
        "ALTER SYSTEM SET redis_sync.consumer_group = 'bench-defaults'",
        "ALTER SYSTEM SET redis_sync.stream_table = 'redis_streams_defaults'",
        "ALTER SYSTEM SET redis_sync.stream_discovery_patterns = 'biosignal-*'",
    ] {
        pg.execute(sql);
    }
    pg.reload();
    let defaults = drain(&pg, "redis_streams_defaults", total);
    eprintln!("[bench]   {:.0} rows/s ({:.1}s)", defaults.rows_per_s, defaults.secs);
    Tuned { fast, copy_rate, copy_secs, defaults, latency, total }
}

struct RouteFigures {
    entries: usize,
    keys: usize,
    stream: Drain,
    stream_copy: f64,
    stream_defaults: Drain,
    /// Rows/s from the first landed row (see `route_landed`), and the seconds.
    key_rate: f64,
    key_secs: f64,
    key_copy: f64,
    key_defaults_rate: f64,
    key_defaults_secs: f64,
}

/// Times `COPY` of `table`'s rows (`cols`) into an identical empty table, twice; the
/// faster rows/s (on a shared machine one run may be slowed by others: the ratio against
/// the faster one is the conservative one).
fn copy_rate(pg: &Cluster, table: &str, cols: &str, rows: usize) -> f64 {
    let dump = pg.data_dir().join(format!("bench_{table}.copy"));
    let dump = dump.to_string_lossy();
    pg.execute(&format!("COPY (SELECT {cols} FROM {table}) TO '{dump}'"));
    let mut best = 0f64;
    for _ in 0..2 {
        pg.execute(&format!(
            "CREATE TABLE {table}_copy (LIKE {table} INCLUDING ALL);
             CHECKPOINT;"
        ));
        let t = Instant::now();
        pg.execute(&format!("COPY {table}_copy ({cols}) FROM '{dump}'"));
        best = best.max(rows as f64 / t.elapsed().as_secs_f64());
        pg.execute(&format!("DROP TABLE {table}_copy; CHECKPOINT"));
    }
    best
}

/// Waits until route `name` has landed `rows` rows (its counter, which starts at `base`);
/// the seconds it took from its first landed row, and the rows landed since that first
/// look (the time the worker takes to notice the setting that starts it is not the
/// route's speed).
fn route_landed(pg: &Cluster, name: &str, base: usize, rows: usize) -> (f64, usize) {
    let t0 = Instant::now();
    let mut first: Option<(Instant, usize)> = None;
    loop {
        let n = pg
            .try_query_text(&format!(
                "SELECT rows_landed FROM redis_sync_routes() WHERE name = '{name}'"
            ))
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        if n > base && first.is_none() {
            first = Some((Instant::now(), n));
        }
        if let (true, Some((t, seen))) = (n >= base + rows, first) {
            return (t.elapsed().as_secs_f64(), base + rows - seen);
        }
        assert!(t0.elapsed() < Duration::from_secs(1800), "route {name}: {n} of {}", base + rows);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Routes: a stream route into a typed 5-column table with one index, and a key route of
/// hashes of 4 fields, each against COPY of the same rows into the same table; tuned and
/// at the defaults.
fn bench_routes(entries: usize, keys: usize) -> RouteFigures {
    let redis = Redis::start();
    let mut r = redis.client();
    eprintln!("[bench] routes: filling {entries} entries over {STREAMS} streams and {keys} hashes");
    fill(&mut r, entries);
    for start in (0..keys).step_by(10_000) {
        let mut p = redis::pipe();
        for i in start..(start + 10_000).min(keys) {
            p.cmd("HSET")
                .arg(format!("user:{i}"))
                .arg("name")
                .arg(format!("user {i}"))
                .arg("age")
                .arg(20 + i % 60)
                .arg("email")
                .arg(format!("u{i}@example.org"))
                .arg("city")
                .arg("Lyon")
                .ignore();
        }
        let _: () = p.query(&mut r).expect("HSET");
    }
    let pg = durable(
        &redis,
        &[
            ("redis_sync.enabled", "off"),
            ("redis_sync.batch_size", "1000"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_discovery_patterns", "biosignal-*"),
            ("redis_sync.db_search_range", "0"),
            ROOMY[0],
            ROOMY[1],
        ],
    );
    pg.execute(
        "CREATE TABLE vitals (device_id text, heart_rate int, spo2 int, taken_at timestamptz, entry_id text);
         CREATE INDEX ON vitals (device_id, taken_at);
         SELECT redis_sync_add_stream_route('vitals', 'biosignal-*', 'vitals',
             '{\"device_id\": \"device_id\", \"heart_rate\": \"heart_rate\", \"spo2\": \"spo2\",
               \"taken_at\": \"$timestamp\", \"entry_id\": \"$id\"}');
         CREATE TABLE users (id bigint PRIMARY KEY, name text, age int, email text, city text);
         SELECT redis_sync_add_key_route('users', 'user:*', 'users',
             '{\"id\": \"$key_part 1\", \"name\": \"name\", \"age\": \"age\", \"email\": \"email\", \"city\": \"city\"}', '{id}');",
    );
    eprintln!(
        "[bench] stream route drain (batch_size=1000, rate_limit=0), key routes off meanwhile"
    );
    pg.execute("ALTER SYSTEM SET redis_sync.key_value_auto_discovery = off");
    pg.reload();
    let stream = drain(&pg, "vitals", entries);
    let stream_copy =
        copy_rate(&pg, "vitals", "device_id, heart_rate, spo2, taken_at, entry_id", entries);
    eprintln!(
        "[bench]   {:.0} rows/s ({:.1}s); COPY {stream_copy:.0} rows/s: {:.2}",
        stream.rows_per_s,
        stream.secs,
        stream.rows_per_s / stream_copy
    );
    eprintln!("[bench] key route initial sync (rate_limit=0)");
    pg.execute("ALTER SYSTEM SET redis_sync.key_value_auto_discovery = on");
    pg.reload();
    let (key_secs, key_rows) = route_landed(&pg, "users", 0, keys);
    let key_rate = key_rows as f64 / key_secs;
    let key_copy = copy_rate(&pg, "users", "id, name, age, email, city", keys);
    eprintln!(
        "[bench]   {key_rate:.0} rows/s ({key_secs:.1}s); COPY {key_copy:.0} rows/s: {:.2}",
        key_rate / key_copy
    );
    eprintln!(
        "[bench] both again at the defaults (batch_size=100, rate_limit=100), into new tables"
    );
    pg.set("redis_sync.enabled", "off");
    wait_for("paused", Duration::from_secs(30), || {
        (pg.status("state").as_deref() == Some("paused")).then_some(())
    });
    pg.execute(
        "CREATE TABLE vitals_defaults (LIKE vitals INCLUDING ALL);
         CREATE TABLE users_defaults (LIKE users INCLUDING ALL);
         UPDATE redis_sync.routes SET target = 'vitals_defaults' WHERE name = 'vitals';
         UPDATE redis_sync.routes SET target = 'users_defaults' WHERE name = 'users';",
    );
    for sql in [
        "ALTER SYSTEM SET redis_sync.batch_size = 100",
        "ALTER SYSTEM SET redis_sync.rate_limit = 100",
        "ALTER SYSTEM SET redis_sync.consumer_group = 'bench-defaults'",
        "ALTER SYSTEM SET redis_sync.key_value_auto_discovery = off",
    ] {
        pg.execute(sql);
    }
    pg.reload();
    let stream_defaults = drain(&pg, "vitals_defaults", entries);
    let base: i64 = pg.number("SELECT rows_landed FROM redis_sync_routes() WHERE name = 'users'");
    pg.execute("ALTER SYSTEM SET redis_sync.key_value_auto_discovery = on");
    pg.reload();
    let (key_defaults_secs, key_defaults_rows) = route_landed(&pg, "users", base as usize, keys);
    let key_defaults_rate = key_defaults_rows as f64 / key_defaults_secs;
    eprintln!(
        "[bench]   stream route {:.0} rows/s; key route {key_defaults_rate:.0} rows/s",
        stream_defaults.rows_per_s,
    );
    RouteFigures {
        entries,
        keys,
        stream,
        stream_copy,
        stream_defaults,
        key_rate,
        key_secs,
        key_copy,
        key_defaults_rate,
        key_defaults_secs,
    }
}

/// The scale-out parts' settings: paused until the drain starts, 1,000-entry batches, no
/// rate limit, only the bench's streams, no key-value sync, roomy buffers and WAL.
const TUNED_DRAIN: [(&str, &str); 7] = [
    ("redis_sync.enabled", "off"),
    ("redis_sync.batch_size", "1000"),
    ("redis_sync.rate_limit", "0"),
    ("redis_sync.stream_discovery_patterns", "biosignal-*"),
    ("redis_sync.key_value_auto_discovery", "off"),
    ROOMY[0],
    ROOMY[1],
];

/// Drains `total` entries over the bench's streams with one server, then again with two
/// servers syncing one group (two Postgres clusters on this machine, one Redis): (rows/s of
/// one, rows/s of the two together, the two servers' shares).
fn bench_servers(total: usize) -> (f64, f64, i64, i64) {
    let tuned = TUNED_DRAIN;
    let one = {
        let redis = Redis::start();
        fill(&mut redis.client(), total);
        let pg = durable(&redis, &tuned);
        eprintln!("[bench] one server drains {total} entries");
        drain(&pg, "redis_streams", total).rows_per_s
    };
    let redis = Redis::start();
    fill(&mut redis.client(), total);
    let (a, b) = (durable(&redis, &tuned), durable(&redis, &tuned));
    eprintln!("[bench] two servers in one group drain {total} entries");
    let t0 = Instant::now();
    for pg in [&a, &b] {
        pg.execute("ALTER SYSTEM SET redis_sync.enabled = on");
    }
    a.reload();
    b.reload();
    loop {
        let n = counter(&a, "messages_processed") + counter(&b, "messages_processed");
        if n as usize >= total {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(1800), "drain too slow: {n} of {total}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let two = total as f64 / t0.elapsed().as_secs_f64();
    let (na, nb) = (
        a.number("SELECT count(*) FROM redis_streams"),
        b.number("SELECT count(*) FROM redis_streams"),
    );
    assert_eq!(na + nb, total as i64, "rows in the two tables");
    eprintln!(
        "[bench]   one server {one:.0} rows/s, two servers {two:.0} rows/s ({na} + {nb} rows)"
    );
    (one, two, na, nb)
}

/// Drains `total` entries over the bench's streams with 1, then 2 stream workers on one
/// server: rows/s of each.
fn bench_workers(total: usize) -> (f64, f64) {
    let mut rates = Vec::new();
    for workers in ["1", "2"] {
        let redis = Redis::start();
        fill(&mut redis.client(), total);
        let mut settings = TUNED_DRAIN.to_vec();
        settings.push(("redis_sync.workers", workers));
        let pg = durable(&redis, &settings);
        eprintln!("[bench] {workers} stream worker(s) drain {total} entries");
        let rate = drain(&pg, "redis_streams", total).rows_per_s;
        eprintln!("[bench]   {rate:.0} rows/s");
        rates.push(rate);
    }
    (rates[0], rates[1])
}

/// Drains `total` entries over the bench's streams from one Redis, then from a Redis
/// Cluster of three primaries (each with a replica), the same settings otherwise.
fn bench_cluster(total: usize) -> (f64, f64) {
    let settings = TUNED_DRAIN;
    let redis = Redis::start();
    fill(&mut redis.client(), total);
    let pg = durable(&redis, &settings);
    eprintln!("[bench] one Redis: drain {total} entries");
    let single = drain(&pg, "redis_streams", total).rows_per_s;
    eprintln!("[bench]   {single:.0} rows/s");
    drop(pg);
    drop(redis);
    let rc = RedisCluster::start(&[]);
    fill_cluster(&mut rc.client(), total);
    let seeds = rc.seeds();
    let mut all: Vec<(String, String)> = vec![
        ("redis_sync.redis_cluster".into(), "on".into()),
        ("redis_sync.redis_host".into(), seeds),
    ];
    all.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let pg = Cluster::start_with(ClusterOptions {
        preload: true,
        settings: all,
        durable: true,
        ..Default::default()
    });
    eprintln!("[bench] Redis Cluster, 3 primaries: drain {total} entries");
    let cluster = drain(&pg, "redis_streams", total).rows_per_s;
    eprintln!("[bench]   {cluster:.0} rows/s");
    (single, cluster)
}

/// Kill-and-promote failovers mid-drain (see `kill_and_promote`), `reps` times for each
/// `redis_sync.ack_after`: (mode, lost per repetition, duplicated per repetition).
fn bench_failover(reps: usize, total: usize) -> Vec<(&'static str, Vec<i64>, Vec<i64>)> {
    let mut out = Vec::new();
    for mode in ["local", "standby"] {
        let (mut lost, mut duplicated) = (Vec::new(), Vec::new());
        for rep in 1..=reps {
            let (l, d) = kill_and_promote(mode, total, failover_lag(rep));
            eprintln!("[bench] failover, ack_after = {mode}, repetition {rep} (standby behind: {:?}): {l} lost, {d} duplicated of {total}", failover_lag(rep));
            lost.push(l);
            duplicated.push(d);
        }
        out.push((mode, lost, duplicated));
    }
    out
}

fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let keys = env_num("BENCH_KEYS", 1_000_000) as usize;
    let entries = env_num("BENCH_ENTRIES", 1_000_000) as usize;
    let lat_secs = env_num("BENCH_LATENCY_SECS", 10);
    match only.as_str() {
        "" => {}
        "defaults" => {
            bench_defaults(keys);
            return;
        }
        "idle" => {
            bench_idle();
            return;
        }
        "grants" => {
            bench_grants(200_000);
            return;
        }
        "streams" => {
            bench_streams(entries, lat_secs);
            return;
        }
        "keys" => {
            bench_keys(keys);
            return;
        }
        "bigkeys" => {
            bench_big_keys(30.0);
            return;
        }
        "routes" => {
            bench_routes(entries, keys);
            return;
        }
        "failover" => {
            bench_failover(5, 20_000);
            return;
        }
        "servers" => {
            bench_servers(entries);
            return;
        }
        "workers" => {
            bench_workers(entries);
            return;
        }
        "cluster" => {
            bench_cluster(entries);
            return;
        }
        other => {
            panic!(
                "BENCH_ONLY={other}: one of defaults, idle, grants, streams, keys, bigkeys, routes, failover, servers, workers, cluster"
            )
        }
    }
    let d = bench_defaults(keys);
    let idle = bench_idle();
    let (with_grant, without_grant, lane) = bench_grants(200_000);
    let t = bench_streams(entries, lat_secs);
    let kv = bench_keys(keys);
    let big = bench_big_keys(30.0);
    let routes = bench_routes(entries, keys);
    let failover = bench_failover(5, 20_000);
    let servers = bench_servers(entries);
    let workers = bench_workers(entries);
    let cluster = bench_cluster(entries);

    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let pg_version = std::process::Command::new(
        std::env::var("PG_CONFIG").unwrap_or_else(|_| "pg_config".into()),
    )
    .arg("--version")
    .output()
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .unwrap_or_default();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "Written by `make bench` on {date}; machine: {cores} cores, {machine}; {pg_version}."
    );
    let _ = writeln!(md, "Every cluster ran with fsync = on and synchronous_commit = on (the stream worker's own commits do not wait for the flush; it acknowledges an entry only once its commit is flushed); one run, side by side. Each section says the settings its figures used.\n");

    let _ = writeln!(md, "## At the defaults, on a production-shaped Redis\n");
    let _ = writeln!(md, "Every `redis_sync.*` setting at its default (rate_limit 100, batch_size 100, poll_interval 1s, discovery every 10s, key-value sync on, db_search_range 0-15); Redis holds {} string keys in db 0 and 20 streams over dbs 0, 1 and 2, which receive 1,000 entries/s in all from the start until 10 s after the keys are mirrored.\n", d.keys);
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(md, "| XADD to commit (commit timestamp), {} entries | p50 {:.1} ms, **p99 {:.1} ms**, max {:.1} ms (target p99 <= 50 ms) |", d.entries, d.p50, d.p99, d.max);
    let _ = writeln!(
        md,
        "| all {} keys mirrored, from the worker's start | **{:.1} s** (target <= 60 s) |",
        d.keys, d.mirrored_secs
    );
    let _ = writeln!(
        md,
        "| entries lost / duplicated (IDs compared) | {} / {} |",
        d.lost, d.duplicated
    );
    let _ = writeln!(md, "| worker errors meanwhile | {} |", d.errors);
    let _ = writeln!(md, "\n## An idle worker\n");
    let _ = writeln!(md, "Defaults; streams in dbs 0, 1 and 2 with one entry each, 4 keys in each, nothing changing, no keyspace notifications; a 10 s window.\n");
    let _ = writeln!(
        md,
        "| rate limit | worker CPU (both processes) | Redis commands/s from the worker |\n|---|---|---|"
    );
    for (label, cpu, cmds) in &idle {
        let _ = writeln!(
            md,
            "| {label} | {cpu:.2} % of a core (target <= 1 %) | {cmds:.1} (target <= 50) |"
        );
    }
    let _ = writeln!(md, "\n## A key-value table the worker may not write\n");
    let _ = writeln!(md, "Defaults, `redis_sync.role = syncer`, 10,000 keys in Redis; the same 200,000-entry drain with the key-value table's grant present, then missing.\n");
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(md, "| drain with the grant | {with_grant:.1} s |");
    let _ = writeln!(md, "| drain without it | {without_grant:.1} s |");
    let _ = writeln!(md, "| **ratio** | **{:.2}** (target <= 1.1) |", without_grant / with_grant);
    let _ = writeln!(
        md,
        "| key-value lane meanwhile | {} |",
        lane.chars().take(160).collect::<String>()
    );
    let _ = writeln!(md, "\n## Stream sync, tuned\n");
    let _ = writeln!(md, "{} entries over {STREAMS} streams, 5 short fields each; batch_size = 1000, rate_limit = 0, key-value sync off, shared_buffers 512MB, max_wal_size 4GB.\n", t.total);
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(md, "| drain | {:.0} rows/s ({:.1} s) |", t.fast.rows_per_s, t.fast.secs);
    let _ = writeln!(
        md,
        "| COPY of the same rows into an identical empty table | {:.0} rows/s ({:.1} s) |",
        t.copy_rate, t.copy_secs
    );
    let _ = writeln!(
        md,
        "| **drain / COPY** | **{:.2}** (target >= 0.8) |",
        t.fast.rows_per_s / t.copy_rate
    );
    let _ = writeln!(
        md,
        "| worker peak RssAnon while draining | {:.1} MiB |",
        t.fast.peak_rss_kb as f64 / 1024.0
    );
    let _ = writeln!(md, "| XADD to commit at 10,000 entries/s, {} rows | p50 {:.1} ms, **p99 {:.1} ms**, max {:.1} ms (target p99 <= 5 ms) |", t.latency.3, t.latency.0, t.latency.1, t.latency.2);
    let _ = writeln!(md, "| the same drain at the defaults (batch_size 100, rate_limit 100) | {:.0} rows/s ({:.1} s), {:.2} of COPY |", t.defaults.rows_per_s, t.defaults.secs, t.defaults.rows_per_s / t.copy_rate);
    let _ = writeln!(md, "\n## Key-value sync: {} string keys\n\nrate_limit = 0, stream discovery off, db_search_range 0, sync_interval 1s, shared_buffers 512MB.\n", kv.keys);
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ =
        writeln!(md, "| initial sync (rate_limit=0) | {:.0} rows/s ({:.1} s) |", kv.rate, kv.secs);
    let _ = writeln!(
        md,
        "| COPY of the same rows into an identical empty table | {:.0} rows/s |",
        kv.copy_rate
    );
    let _ = writeln!(
        md,
        "| **initial sync / COPY** | **{:.2}** (target >= 0.3) |",
        kv.rate / kv.copy_rate
    );
    let _ = writeln!(
        md,
        "| key-value worker peak RssAnon during the initial sync | {:.1} MiB |",
        kv.peak_rss_kb as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "| one idle pass over all keys (longest of 3, passes back to back) | {:.2} s |",
        kv.idle_pass_secs
    );
    let _ = writeln!(
        md,
        "| one verifying pass (every key compared with the table; key_value_verify_interval) | {:.2} s |",
        kv.verify_pass_secs
    );
    let _ = writeln!(md, "| rows written by idle passes | {} (target 0) |", kv.idle_rows_written);
    let worst = kv.scan_delay_ms.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(md, "| one changed key visible, scanning alone (sync_interval=1s), {} trials | {} ms; max {worst:.0} ms (target < 2000 ms) |", kv.scan_delay_ms.len(), kv.scan_delay_ms.iter().map(|d| format!("{d:.0}")).collect::<Vec<_>>().join(", "));
    let _ = writeln!(md, "| one changed key visible with keyspace notifications, {} changes | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < 50 ms) |", kv.notify_ms.3, kv.notify_ms.0, kv.notify_ms.1, kv.notify_ms.2);
    let _ = writeln!(md, "\n## Big keys beside streams\n\nEvery setting at its default (key_value_max_size 64MB); Redis holds a 500,000-field hash (about 12 MB as JSON: mirrored) and a 5,000,000-member sorted set (over the limit: skipped) in db 0, and 3 streams there receive 1,000 entries/s in all from the worker's first pass on, until 30 s after the hash is mirrored.\n");
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(md, "| XADD to commit while the first pass mirrors the hash, {} entries | p50 {:.1} ms, **p99 {:.1} ms**, max {:.1} ms (target p99 <= 100 ms) |", big.first.3, big.first.0, big.first.1, big.first.2);
    let _ = writeln!(md, "| XADD to commit in the 30 s after, passes going on, {} entries | p50 {:.1} ms, **p99 {:.1} ms**, max {:.1} ms (target p99 <= 100 ms) |", big.steady.3, big.steady.0, big.steady.1, big.steady.2);
    let _ = writeln!(
        md,
        "| key-value worker peak RssAnon | **{:.1} MiB** (target <= 256 MiB) |",
        big.peak_rss_kb as f64 / 1024.0
    );
    let _ = writeln!(md, "| `pg_ctl stop -m fast` (SIGINT to the postmaster) returned after | **{:.2} s** (target <= 5 s) |", big.stop_secs);
    let _ = writeln!(md, "| redis_sync_skipped_keys() | {} |", big.skipped);
    let _ = writeln!(
        md,
        "| entries lost / duplicated (IDs compared) | {} / {} |",
        big.lost, big.duplicated
    );
    let _ = writeln!(md, "\n## Routes: into the user's own typed tables\n");
    let _ = writeln!(md, "A stream route: {} entries over {STREAMS} streams into `vitals(device_id text, heart_rate int, spo2 int, taken_at timestamptz, entry_id text)` with one index, no unique key (exactly once by landing records). A key route: {} hashes of 4 fields into `users(id bigint primary key, name, age, email, city)`. Tuned: batch_size = 1000, rate_limit = 0, shared_buffers 512MB, max_wal_size 4GB; then the same at the defaults (batch_size 100, rate_limit 100) into new tables. COPY: the faster of two runs. A key route's rate counts from its first landed row (not the worker noticing the setting that starts it).\n", routes.entries, routes.keys);
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(
        md,
        "| stream route drain (tuned) | {:.0} rows/s ({:.1} s) |",
        routes.stream.rows_per_s, routes.stream.secs
    );
    let _ = writeln!(
        md,
        "| COPY of the same rows into the same table (empty, same index) | {:.0} rows/s |",
        routes.stream_copy
    );
    let _ = writeln!(
        md,
        "| **stream route / COPY** | **{:.2}** (target >= 0.8) |",
        routes.stream.rows_per_s / routes.stream_copy
    );
    let _ = writeln!(
        md,
        "| stream route drain at the defaults | {:.0} rows/s ({:.2} of COPY) |",
        routes.stream_defaults.rows_per_s,
        routes.stream_defaults.rows_per_s / routes.stream_copy
    );
    let key_rate = routes.key_rate;
    let _ = writeln!(
        md,
        "| key route initial sync (rate_limit = 0) | {:.0} rows/s ({:.1} s) |",
        key_rate, routes.key_secs
    );
    let _ = writeln!(
        md,
        "| COPY of the same rows into the same table | {:.0} rows/s |",
        routes.key_copy
    );
    let _ = writeln!(
        md,
        "| **key route / COPY** | **{:.2}** (target >= 0.5) |",
        key_rate / routes.key_copy
    );
    let _ = writeln!(
        md,
        "| key route initial sync at the defaults | {:.0} rows/s ({:.1} s) |",
        routes.key_defaults_rate, routes.key_defaults_secs
    );
    let _ = writeln!(md, "\n## Postgres failover\n\nA durable primary at the default settings with an asynchronous streaming standby (no synchronous_standby_names); a route into a table without a unique key; 20,000 entries added at about 20,000/s; once a quarter has landed, `kill -9` of the primary's postmaster and stream worker, and the standby promoted. In repetitions 1 to 4 the primary's WAL sender is stopped 1 s before the kill (a standby that fell behind); in the fifth the standby keeps up. Counted once the group has nothing pending or unread. Five repetitions for each `redis_sync.ack_after`.\n");
    let _ = writeln!(md, "| ack_after | entries lost, per repetition | duplicated | lost in all |\n|---|---|---|---|");
    for (mode, lost, duplicated) in &failover {
        let list = |v: &Vec<i64>| v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            md,
            "| {mode} | {} | {} | **{}** |",
            list(lost),
            list(duplicated),
            lost.iter().sum::<i64>()
        );
    }
    let _ = writeln!(md, "\n## Two servers in one group\n\n{entries} entries over {STREAMS} streams drained by one server, then by two servers (two durable Postgres clusters on this machine) syncing the same consumer group; batch_size = 1000, rate_limit = 0, shared_buffers 512MB, max_wal_size 4GB.\n");
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(md, "| one server | {:.0} rows/s |", servers.0);
    let _ = writeln!(
        md,
        "| two servers together | {:.0} rows/s (**{:.2}x**; shares {} and {} rows) |",
        servers.1,
        servers.1 / servers.0,
        servers.2,
        servers.3
    );
    let pair = |md: &mut String, title: &str, what: &str, labels: [&str; 2], rates: (f64, f64)| {
        let _ = writeln!(md, "\n## {title}\n\n{entries} entries over {STREAMS} streams {what}; batch_size = 1000, rate_limit = 0, shared_buffers 512MB, max_wal_size 4GB.\n");
        let _ = writeln!(md, "| measure | value |\n|---|---|");
        let _ = writeln!(md, "| {} | {:.0} rows/s |", labels[0], rates.0);
        let _ = writeln!(
            md,
            "| {} | {:.0} rows/s (**{:.2}x**) |",
            labels[1],
            rates.1,
            rates.1 / rates.0
        );
    };
    pair(
        &mut md,
        "Stream workers on one server",
        "drained with `redis_sync.workers` = 1, then 2",
        ["1 stream worker", "2 stream workers"],
        workers,
    );
    pair(
        &mut md,
        "A Redis Cluster as the source",
        "drained from one Redis, then from a Redis Cluster of three primaries (each with a replica, all on this machine)",
        ["one Redis", "Redis Cluster, 3 primaries"],
        cluster,
    );
    let _ = writeln!(md, "\nReproduce: `make bench` (BENCH_ENTRIES, BENCH_KEYS and BENCH_LATENCY_SECS change the sizes; BENCH_ONLY runs one part).");
    print!("{md}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/RESULTS.md");
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, md).expect("write bench/RESULTS.md");
    eprintln!("[bench] wrote {}", out.display());
}
