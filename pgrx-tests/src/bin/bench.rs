//! `make bench`: measures stream sync against COPY on this machine, in one run, and writes
//! the figures to bench/RESULTS.md.
//!
//! 1. A backlog of N entries (default 1,000,000) over 10 streams, 5 short fields each.
//! 2. Drain rate with batch_size=1000, rate_limit=0, then with the defaults (new consumer
//!    group, new table, same backlog).
//! 3. COPY of the same rows into an identical empty table: the ceiling.
//! 4. The worker's peak private memory (RssAnon) while draining.
//! 5. Latency from XADD to row visible at a steady 5,000 entries/s.
//!
//! Environment: BENCH_ENTRIES (default 1000000), BENCH_LATENCY_SECS (default 10),
//! PG_CONFIG (the Postgres with the extension installed, built with --release).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis_pg_sync_e2e::*;

const STREAMS: usize = 10;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fill(r: &mut redis::Connection, total: usize) {
    let per = total / STREAMS;
    for s in 0..STREAMS {
        let key = format!("biosignal-{s}-stream");
        let mut i = 0;
        while i < per {
            let mut p = redis::pipe();
            for j in i..(i + 2000).min(per) {
                p.cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("heart_rate")
                    .arg(60 + j % 40)
                    .arg("spo2")
                    .arg(95 + j % 5)
                    .arg("temperature")
                    .arg("36.6")
                    .arg("device_id")
                    .arg(format!("dev-{s}"))
                    .arg("quality")
                    .arg("good")
                    .ignore();
            }
            let _: () = p.query(r).expect("XADD");
            i += 2000;
        }
    }
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

fn micros_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Adds entries at `rate`/s over 10 streams for `secs`, while a reader polls the table for
/// new rows; returns (p50, p99, max) latency in ms over all rows.
fn latency(
    redis: &Redis,
    pg: &Cluster,
    prefix: &str,
    table: &str,
    rate: u64,
    secs: u64,
) -> (f64, f64, f64, usize) {
    let prefix = prefix.to_owned();
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let mut r = redis.client();
        let done = done.clone();
        let sent = sent.clone();
        std::thread::spawn(move || {
            let tick = Duration::from_millis(10);
            let per_tick = (rate / 100).max(1);
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(secs) {
                let due = start + tick * (n / per_tick) as u32;
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(w);
                }
                let mut p = redis::pipe();
                for _ in 0..per_tick {
                    p.cmd("XADD")
                        .arg(format!("{prefix}-{}-stream", n % STREAMS as u64))
                        .arg("*")
                        .arg("sent_us")
                        .arg(micros_now())
                        .arg("heart_rate")
                        .arg(70)
                        .ignore();
                    n += 1;
                }
                let _: () = p.query(&mut r).expect("XADD");
            }
            sent.store(n, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut c = pg.client();
    let mut last_id: i64 = 0;
    let mut lat_ms: Vec<f64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    loop {
        let rows = c
            .query(
                &format!(
                    "SELECT id, (data->>'sent_us')::bigint FROM {table} WHERE id > $1 ORDER BY id"
                ),
                &[&last_id],
            )
            .expect("poll");
        let now = micros_now();
        for row in &rows {
            let id: i64 = row.get(0);
            let sent_us: i64 = row.get(1);
            last_id = last_id.max(id);
            lat_ms.push((now as i64 - sent_us) as f64 / 1000.0);
        }
        if done.load(Ordering::SeqCst) && lat_ms.len() as u64 >= sent.load(Ordering::SeqCst) {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let _ = producer.join();
    lat_ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat_ms
            .get(((lat_ms.len() as f64 * p) as usize).min(lat_ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    (pct(0.5), pct(0.99), lat_ms.last().copied().unwrap_or(f64::NAN), lat_ms.len())
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
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.enabled", "off"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_auto_discovery", "off"),
            ("redis_sync.db_search_range", "0"),
            ("redis_sync.sync_interval", "1s"),
            ("shared_buffers", "512MB"),
            ("max_wal_size", "4GB"),
        ],
    );
    eprintln!("[bench] key-value initial sync");
    let pid = wait_for("worker", Duration::from_secs(30), || pg.worker_pid());
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

fn main() {
    if std::env::var("BENCH_ONLY").as_deref() == Ok("keys") {
        // Key-value part alone, printed and not written to bench/RESULTS.md.
        let kv = bench_keys(env_num("BENCH_KEYS", 1_000_000) as usize);
        eprintln!(
            "[bench] initial {:.0} rows/s vs COPY {:.0} ({:.2}); idle pass {:.2} s; verifying pass {:.2} s; changed key {:.0?} ms",
            kv.rate, kv.copy_rate, kv.rate / kv.copy_rate, kv.idle_pass_secs, kv.verify_pass_secs, kv.scan_delay_ms
        );
        return;
    }
    let total = env_num("BENCH_ENTRIES", 1_000_000) as usize;
    let lat_secs = env_num("BENCH_LATENCY_SECS", 10);
    let redis = Redis::start();
    let mut r = redis.client();
    eprintln!("[bench] filling {total} entries over {STREAMS} streams");
    let t = Instant::now();
    fill(&mut r, total);
    eprintln!("[bench] filled in {:.1}s", t.elapsed().as_secs_f64());

    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.enabled", "off"),
            ("redis_sync.batch_size", "1000"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_discovery_patterns", "biosignal-*"),
            ("redis_sync.key_value_auto_discovery", "off"),
            ("shared_buffers", "512MB"),
            ("max_wal_size", "4GB"),
        ],
    );
    eprintln!("[bench] drain 1: batch_size=1000, rate_limit=0");
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
    eprintln!("[bench]   COPY {:.0} rows/s ({:.1}s)", copy_rate, copy_secs);
    pg.execute("DROP TABLE copy_target; CHECKPOINT");

    eprintln!("[bench] drain 2: defaults (batch_size=100, rate_limit=100)");
    pg.set("redis_sync.enabled", "off");
    wait_for("paused", Duration::from_secs(30), || {
        (pg.status("state").as_deref() == Some("paused")).then_some(())
    });
    for sql in [
        // The defaults, set explicitly (postgresql.conf still holds the first drain's values).
        "ALTER SYSTEM SET redis_sync.batch_size = 100",
        "ALTER SYSTEM SET redis_sync.rate_limit = 100",
        "ALTER SYSTEM SET redis_sync.consumer_group = 'bench-defaults'",
        "ALTER SYSTEM SET redis_sync.stream_table = 'redis_streams_defaults'",
    ] {
        pg.execute(sql);
    }
    pg.reload();
    let defaults = drain(&pg, "redis_streams_defaults", total);
    eprintln!(
        "[bench]   {:.0} rows/s ({:.1}s), peak RssAnon {} KiB",
        defaults.rows_per_s, defaults.secs, defaults.peak_rss_kb
    );

    let mut lat = Vec::new();
    for (prefix, label, settings) in [
        ("lat", "defaults", [("redis_sync.batch_size", "100"), ("redis_sync.rate_limit", "100")]),
        (
            "latfast",
            "batch_size=1000, rate_limit=0",
            [("redis_sync.batch_size", "1000"), ("redis_sync.rate_limit", "0")],
        ),
    ] {
        eprintln!("[bench] latency at 5000 entries/s for {lat_secs}s ({label})");
        let table = format!("redis_streams_{prefix}");
        pg.execute(&format!(
            "ALTER SYSTEM SET redis_sync.stream_discovery_patterns = '{prefix}-*'"
        ));
        pg.execute(&format!("ALTER SYSTEM SET redis_sync.stream_table = '{table}'"));
        for (k, v) in settings {
            pg.execute(&format!("ALTER SYSTEM SET {k} = '{v}'"));
        }
        pg.reload();
        // The ten streams exist before the clock starts, so discovery is not measured.
        for s in 0..STREAMS {
            let _: String = redis::cmd("XADD")
                .arg(format!("{prefix}-{s}-stream"))
                .arg("*")
                .arg("sent_us")
                .arg(micros_now())
                .query(&mut r)
                .expect("XADD");
        }
        pg.wait_number(
            "SELECT count(*) FROM redis_sync_streams()",
            STREAMS as i64,
            Duration::from_secs(60),
        );
        pg.wait_number(
            &format!("SELECT count(*) FROM {table}"),
            STREAMS as i64,
            Duration::from_secs(60),
        );
        pg.execute(&format!("TRUNCATE {table}"));
        let (p50, p99, max, n) = latency(&redis, &pg, prefix, &table, 5000, lat_secs);
        eprintln!("[bench]   p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms over {n} rows");
        lat.push((label, p50, p99, max, n));
    }

    let kv = bench_keys(env_num("BENCH_KEYS", 1_000_000) as usize);

    let ratio = fast.rows_per_s / copy_rate;
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let pg_version = pg.query_text("SELECT version()").unwrap_or_default();
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
    let _ = writeln!(md, "Postgres runs with fsync=off for the worker and for COPY alike; figures from one run, side by side.\n");
    let _ = writeln!(
        md,
        "## Stream sync: {total} entries over {STREAMS} streams, 5 short fields each\n"
    );
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    let _ = writeln!(
        md,
        "| drain, batch_size=1000, rate_limit=0 | {:.0} rows/s ({:.1} s) |",
        fast.rows_per_s, fast.secs
    );
    let _ = writeln!(
        md,
        "| drain, defaults (batch_size=100, rate_limit=100) | {:.0} rows/s ({:.1} s) |",
        defaults.rows_per_s, defaults.secs
    );
    let _ = writeln!(
        md,
        "| COPY of the same rows into an identical empty table | {:.0} rows/s ({:.1} s) |",
        copy_rate, copy_secs
    );
    let _ = writeln!(md, "| **drain (batch 1000) / COPY** | **{ratio:.2}** (target >= 0.5) |");
    let _ = writeln!(md, "| drain (defaults) / COPY | {:.2} |", defaults.rows_per_s / copy_rate);
    let _ = writeln!(
        md,
        "| worker peak RssAnon, batch 1000 / defaults | {:.1} MiB / {:.1} MiB (target < 100 MiB) |",
        fast.peak_rss_kb as f64 / 1024.0,
        defaults.peak_rss_kb as f64 / 1024.0
    );
    for (label, p50, p99, max, n) in &lat {
        let _ = writeln!(md, "| latency XADD -> row visible at 5,000 entries/s ({label}), {n} rows | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (target p99 < 50 ms) |");
    }
    let _ = writeln!(md, "\n## Key-value sync: {} string keys\n", kv.keys);
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
        "| worker peak RssAnon during the initial sync | {:.1} MiB |",
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
    let _ = writeln!(
        md,
        "\nReproduce: `make bench` (BENCH_ENTRIES, BENCH_KEYS and BENCH_LATENCY_SECS change the sizes)."
    );
    print!("{md}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/RESULTS.md");
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, md).expect("write bench/RESULTS.md");
    eprintln!("[bench] wrote {}", out.display());
}
