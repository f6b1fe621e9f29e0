//! Fault injection with real processes: Postgres crashed, Redis restarted or frozen, the
//! table dropped, the worker terminated, the link cut, locks held, settings changed under
//! load. Every case ends by checking that each entry added is stored exactly once and
//! nothing is left pending.

use std::time::Duration;

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(90);
const GROUP: &str = "redis-pg-sync";

const FAST: &[(&str, &str)] = &[
    ("redis_sync.rate_limit", "0"),
    ("redis_sync.batch_size", "200"),
    ("redis_sync.stream_discovery_interval", "1s"),
    ("redis_sync.key_value_auto_discovery", "off"),
    ("redis_sync.backoff_base", "100ms"),
    ("redis_sync.backoff_max", "1s"),
];

fn rows(pg: &Cluster) -> i64 {
    pg.try_query_text("SELECT count(*) FROM redis_streams")
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

/// Waits until some but not all of `total` rows are stored: the fault then lands mid-drain.
fn wait_mid_drain(pg: &Cluster, total: i64) {
    wait_for("the drain to be under way", T, || {
        let n = rows(pg);
        (n > 0 && n < total).then_some(())
    });
}

/// Every entry of `streams` (each with `per_stream` entries numbered 0..) is stored exactly
/// once and none is left pending.
fn assert_exactly_once(pg: &Cluster, r: &mut redis::Connection, streams: &[&str], per_stream: i64) {
    let total = per_stream * streams.len() as i64;
    pg.wait_number("SELECT count(*) FROM redis_streams", total, T);
    for s in streams {
        wait_for("nothing pending", T, || (pending(r, s, GROUP) == 0).then_some(()));
        assert_eq!(
            pg.number(&format!(
                "SELECT count(DISTINCT data->>'n') FROM redis_streams WHERE stream_key = '{s}'"
            )),
            per_stream,
            "{s}: every entry once"
        );
    }
    for s in streams {
        assert_rows_are_the_entries(pg, r, s, s);
    }
    // Nothing more turns up later.
    assert_eq!(rows(pg), total);
}

#[test]
fn postgres_stopped_immediately_during_a_drain() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "crash-a", 15_000);
    add_entries(&mut r, "crash-b", 15_000);
    let mut pg = Cluster::start(&redis, FAST);
    wait_mid_drain(&pg, 30_000);
    pg.crash_restart();
    assert!(pg.wait_until_running(), "log:\n{}", pg.log());
    assert_exactly_once(&pg, &mut r, &["crash-a", "crash-b"], 15_000);
}

#[test]
fn redis_restarted_with_aof_during_a_drain() {
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut r = redis.client();
    add_entries(&mut r, "aof", 30_000);
    let pg = Cluster::start(&redis, FAST);
    wait_mid_drain(&pg, 30_000);
    redis.restart();
    let mut r = redis.client();
    assert_exactly_once(&pg, &mut r, &["aof"], 30_000);
    assert!(pg.status("errors").and_then(|e| e.parse::<i64>().ok()).unwrap_or(0) > 0);
}

#[test]
fn redis_frozen_longer_than_the_timeouts() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "frozen", 20_000);
    let pg = Cluster::start(&redis, FAST);
    wait_mid_drain(&pg, 20_000);
    redis.freeze();
    // The worker notices (its read times out) instead of hanging, and says so.
    wait_for("the worker to notice", Duration::from_secs(60), || {
        let state = pg.status("state")?;
        (state == "backing_off" || state == "connecting").then_some(())
    });
    let error = pg.status("last_error").unwrap_or_default();
    assert!(error.contains("Redis"), "{error}");
    // It stays responsive meanwhile: the status and a terminate-free reload still work.
    pg.set("redis_sync.log_level", "debug");
    redis.thaw();
    pg.wait_status("state", "running", T);
    assert_exactly_once(&pg, &mut r, &["frozen"], 20_000);
}

#[test]
fn the_stream_table_dropped_while_syncing_is_created_again() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "before", 20_000);
    let pg = Cluster::start(&redis, FAST);
    wait_mid_drain(&pg, 20_000);
    // The drop, with what the table held at that moment (the lock keeps the worker's
    // commits out between the read and the drop).
    let mut c = pg.client();
    let mut tx = c.transaction().expect("begin");
    tx.batch_execute("LOCK TABLE redis_streams IN ACCESS EXCLUSIVE MODE").expect("lock");
    let before_drop: std::collections::HashSet<String> = tx
        .query("SELECT message_id FROM redis_streams WHERE stream_key = 'before'", &[])
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.batch_execute("DROP TABLE redis_streams").expect("drop");
    tx.commit().expect("commit");
    assert!(!before_drop.is_empty() && before_drop.len() < 20_000, "dropped mid-drain");
    // What was stored before the drop went with the table; the rest of the drain and
    // everything after lands in the new one.
    add_entries(&mut r, "after", 5_000);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'after'", 5_000, T);
    // Every entry of both streams read (no lag) and acknowledged (nothing pending).
    wait_for("both streams read and acknowledged", T, || {
        (pending_and_lag(&mut r, 0, "before") == (0, 0)
            && pending_and_lag(&mut r, 0, "after") == (0, 0))
            .then_some(())
    });
    let ids = entry_ids(&mut r, "before");
    let after_drop: std::collections::HashSet<String> = c
        .query("SELECT message_id FROM redis_streams WHERE stream_key = 'before'", &[])
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let nowhere = ids.iter().filter(|id| !before_drop.contains(*id) && !after_drop.contains(*id));
    assert_eq!(nowhere.count(), 0, "every entry of the drain was stored, before or after the drop");
    assert_eq!(
        ids.iter().filter(|id| before_drop.contains(*id) && after_drop.contains(*id)).count(),
        0,
        "no entry stored before the drop came back after it"
    );
    assert_eq!(before_drop.len() + after_drop.len(), ids.len());
    assert_rows_are_the_entries(&pg, &mut r, "after", "after");
    assert_eq!(
        pg.number(
            "SELECT count(DISTINCT data->>'n') FROM redis_streams WHERE stream_key = 'after'"
        ),
        5_000
    );
}

#[test]
fn each_worker_process_restarts_alone() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "alone", 50_000);
    for k in 0..100 {
        let _: () = redis::cmd("SET").arg(format!("kv-{k}")).arg("v").query(&mut r).expect("SET");
    }
    let mut settings = FAST.to_vec();
    settings.retain(|(name, _)| *name != "redis_sync.key_value_auto_discovery");
    let pg = Cluster::start(&redis, &settings);
    let kv_rows = "SELECT count(*) FROM redis_key_values WHERE redis_key LIKE 'kv-%'";
    wait_mid_drain(&pg, 50_000);
    let [streams, kv] = pg.worker_pids().expect("both workers");
    // The key-value worker ends: it alone comes back; the stream worker's drain goes on in
    // the same process.
    pg.execute(&format!("SELECT pg_terminate_backend({kv})"));
    let kv2 = wait_for("a new key-value worker", T, || pg.kv_worker_pid().filter(|p| *p != kv));
    assert_eq!(pg.worker_pid(), Some(streams), "the stream worker was not restarted");
    let _: () = redis::cmd("SET").arg("kv-new").arg("v").query(&mut r).expect("SET");
    pg.wait_number(kv_rows, 101, T);
    // And the other way round.
    pg.execute(&format!("SELECT pg_terminate_backend({streams})"));
    let streams2 = wait_for("a new stream worker", T, || pg.worker_pid().filter(|p| *p != streams));
    assert_eq!(pg.kv_worker_pid(), Some(kv2), "the key-value worker was not restarted");
    assert_exactly_once(&pg, &mut r, &["alone"], 50_000);
    let want = format!("key_values:{kv2},streams:{streams2}");
    wait_for("both shown by redis_sync_workers()", T, || {
        let rows = pg.query_text(
            "SELECT string_agg(worker || ':' || pid, ',' ORDER BY worker) FROM redis_sync_workers()",
        )?;
        (rows == want).then_some(())
    });
}

#[test]
fn a_terminated_worker_comes_back_and_resumes() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "term", 30_000);
    let pg = Cluster::start(&redis, FAST);
    wait_mid_drain(&pg, 30_000);
    let pid = pg.worker_pid().expect("worker");
    // A cancel is ignored: same process, still syncing.
    pg.execute(&format!("SELECT pg_cancel_backend({pid})"));
    pg.execute(&format!("SELECT pg_terminate_backend({pid})"));
    wait_for("a new worker", T, || pg.worker_pid().filter(|p| *p != pid));
    assert_exactly_once(&pg, &mut r, &["term"], 30_000);
}

#[test]
fn a_lock_held_past_query_timeout_delays_but_loses_nothing() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "locked", 2_000);
    let pg = Cluster::start(&redis, &[FAST, &[("redis_sync.query_timeout", "300ms")]].concat());
    pg.wait_number("SELECT count(*) FROM redis_streams", 2_000, T);
    let errors_before = pg.number("SELECT errors FROM redis_sync_status()");
    // A DBA's transaction holds the table: the worker's writes time out, are rolled back,
    // counted, and retried.
    let mut holder = pg.client();
    let mut tx = holder.transaction().expect("begin");
    tx.batch_execute("LOCK TABLE redis_streams IN ACCESS EXCLUSIVE MODE").expect("lock");
    add_numbered(&mut r, "locked", 2_000..5_000);
    wait_for("a timed-out write", T, || {
        let error = pg.status("last_error")?;
        (error.contains("statement timeout")
            && pg.number("SELECT errors FROM redis_sync_status()") > errors_before)
            .then_some(())
    });
    tx.rollback().expect("release");
    assert_exactly_once(&pg, &mut r, &["locked"], 5_000);
    assert_eq!(pg.status("state").as_deref(), Some("running"));
}

#[test]
fn a_disk_full_error_rolls_the_batch_back_and_it_is_retried() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "full", 1_000);
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1_000, T);
    // A trigger that fails every write with disk_full (53100), as a full disk would: not
    // a row's fault, so nothing is dead-lettered; the batch is rolled back and retried.
    pg.execute(
        "CREATE TABLE disk_is_full (is_full bool);
         INSERT INTO disk_is_full VALUES (true);
         CREATE FUNCTION fail_when_full() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF (SELECT is_full FROM disk_is_full) THEN
             RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER when_full BEFORE INSERT ON redis_streams FOR EACH ROW EXECUTE FUNCTION fail_when_full();",
    );
    let errors_before = pg.number("SELECT errors FROM redis_sync_status()");
    add_numbered(&mut r, "full", 1_000..3_000);
    wait_for("the failed writes reported", T, || {
        (pg.status("last_error")?.contains("No space left on device")
            && pg.number("SELECT errors FROM redis_sync_status()") > errors_before + 1)
            .then_some(())
    });
    assert_eq!(rows(&pg), 1_000, "nothing of a failed batch is kept");
    assert_eq!(pg.number("SELECT dead_letters FROM redis_sync_status()"), 0);
    pg.execute("UPDATE disk_is_full SET is_full = false");
    assert_exactly_once(&pg, &mut r, &["full"], 3_000);
}

#[test]
fn killed_connections_are_replaced() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "cut", 5_000);
    let pg = Cluster::start(&redis, &[FAST, &[("redis_sync.health_check_interval", "1")]].concat());
    pg.wait_number("SELECT count(*) FROM redis_streams", 5_000, T);
    // Every client connection but ours is cut, as a proxy or a Redis failover would.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut r)
        .expect("CLIENT KILL");
    assert!(killed >= 1, "the worker's connections were cut");
    add_numbered(&mut r, "cut", 5_000..8_000);
    assert_exactly_once(&pg, &mut r, &["cut"], 8_000);
}

#[test]
fn max_retries_ends_the_schedule_with_one_warning() {
    let mut redis = Redis::start();
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.max_retries", "3"),
            ("redis_sync.backoff_base", "50ms"),
            ("redis_sync.backoff_max", "700ms"),
        ],
    );
    assert!(pg.wait_until_running());
    redis.stop();
    pg.wait_status("state", "backing_off", T);
    let retries = |pg: &Cluster| pg.number("SELECT retries FROM redis_sync_status()");
    // Well past max_retries: every try is counted, and the end of the schedule is logged
    // once by each process that tries, not once per try.
    let line = "3 retries failed in a row; retrying every 700 ms";
    let lines = |pg: &Cluster| {
        let log = pg.log();
        let (kv, streams): (Vec<&str>, Vec<&str>) = log
            .lines()
            .filter(|l| l.contains(line))
            .partition(|l| l.contains("] redis_pg_sync key values "));
        (streams.len(), kv.len())
    };
    wait_for("the stream worker's line and sixteen retries", T, || {
        (lines(&pg).0 >= 1 && retries(&pg) >= 16).then_some(())
    });
    let (streams, kv) = lines(&pg);
    assert_eq!(streams, 1, "log:\n{}", pg.log());
    assert!(kv <= 1, "log:\n{}", pg.log());
    assert_ne!(pg.status("state").as_deref(), Some("running"));
    redis.restart();
    pg.wait_status("state", "running", T);
    assert!(pg.log().contains("connected to Redis"));
}

#[test]
fn monitor_mode_watches_without_writing_and_sync_resumes() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "watched", 1_000);
    let pg = Cluster::start(
        &redis,
        &[FAST, &[("redis_sync.monitor_interval", "1"), ("redis_sync.claim_min_idle", "1s")]]
            .concat(),
    );
    pg.wait_number("SELECT count(*) FROM redis_streams", 1_000, T);
    pg.set("redis_sync.mode", "monitor");
    pg.wait_status("state", "monitoring", T);
    wait_for("activity text", T, || {
        let q = pg.query_text(
            "SELECT query FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync'",
        )?;
        (q == "monitoring 1 stream").then_some(())
    });
    // Entries added now are watched, not synced.
    add_numbered(&mut r, "watched", 1_000..3_000);
    // A consumer of our group that reads and never acknowledges: a sign of trouble.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("stuck-consumer")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg("watched")
        .arg(">")
        .query(&mut r)
        .expect("XREADGROUP");
    let health = "SELECT concat_ws('|', state, length, groups, consumers, pending, health) FROM redis_sync_streams()";
    wait_for("the stalled consumer reported", T, || {
        let h = pg.query_text(health)?;
        h.starts_with("monitored|3000|1|2|10|consumer \"stuck-consumer\" idle for").then_some(())
    });
    // Checks go on every second while the consumer stays stuck: the warning is logged once,
    // when the trouble starts, not at every check.
    wait_for("more checks", T, || {
        let h = pg.query_text(health)?;
        let idle: i64 = h.split("idle for ").nth(1)?.split(' ').next()?.parse().ok()?;
        (idle >= 6).then_some(())
    });
    let warning = "WARNING:  stream watched: consumer \"stuck-consumer\" idle for";
    assert_eq!(pg.log().matches(warning).count(), 1, "log:\n{}", pg.log());
    assert_eq!(rows(&pg), 1_000, "monitor mode writes nothing");
    // Back to sync: it resumes where it stopped (the stuck consumer's entries are claimed).
    pg.set("redis_sync.mode", "sync");
    pg.wait_status("state", "running", T);
    assert_exactly_once(&pg, &mut r, &["watched"], 3_000);
}

#[test]
fn pause_under_load_and_resume() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "paused", 20_000);
    let pg = Cluster::start(&redis, FAST);
    wait_mid_drain(&pg, 20_000);
    pg.set("redis_sync.enabled", "off");
    pg.wait_status("state", "paused", T);
    let frozen = rows(&pg);
    add_numbered(&mut r, "paused", 20_000..25_000);
    // Paused means no writes. Two reloads, each logged at the top of a loop turn, prove
    // that a whole turn ran with the new entries waiting (a running worker writes a batch
    // per turn), and the count held.
    pg.set("redis_sync.log_level", "debug");
    let reloads = |pg: &Cluster| pg.log().matches("configuration reloaded").count();
    wait_for("a reload", T, || (reloads(&pg) >= 1).then_some(()));
    pg.set("redis_sync.monitor_interval", "2");
    wait_for("another reload", T, || (reloads(&pg) >= 2).then_some(()));
    assert_eq!(pg.status("state").as_deref(), Some("paused"));
    assert_eq!(rows(&pg), frozen, "nothing written while paused");
    assert!(frozen < 25_000);
    pg.set("redis_sync.enabled", "on");
    assert_exactly_once(&pg, &mut r, &["paused"], 25_000);
}

#[test]
fn a_wider_db_search_range_by_reload_finds_more_streams() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "near", 100);
    let _: () = redis::cmd("SELECT").arg(3).query(&mut r).expect("SELECT");
    add_entries(&mut r, "far", 100);
    let pg = Cluster::start(&redis, &[FAST, &[("redis_sync.db_search_range", "0-1")]].concat());
    pg.wait_number("SELECT count(*) FROM redis_streams", 100, T);
    wait_for("the search logged", T, || {
        pg.log().contains("Searching Redis databases 0-1 for streams matching *").then_some(())
    });
    pg.set("redis_sync.db_search_range", "0-3");
    wait_for("the new search logged", T, || {
        pg.log().contains("Searching Redis databases 0-3 for streams matching *").then_some(())
    });
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'db3:far'", 100, T);
    wait_for("nothing pending", T, || (pending(&mut r, "far", GROUP) == 0).then_some(()));
    // The worker reports its writes to the statistics (what autovacuum goes by).
    pg.wait_number(
        "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'redis_streams'",
        200,
        T,
    );
    // Another table by reload: created, and new entries land there.
    pg.set("redis_sync.stream_table", "streams_v2");
    // Created as soon as the worker applies the reload (entries added before that would
    // still go to the old table).
    wait_for("the new table", T, || {
        (pg.query_text("SELECT to_regclass('streams_v2') IS NOT NULL")? == "true").then_some(())
    });
    let _: () = redis::cmd("SELECT").arg(0).query(&mut r).expect("SELECT");
    add_numbered(&mut r, "near", 100..150);
    pg.wait_number("SELECT count(*) FROM streams_v2 WHERE stream_key = 'near'", 50, T);
    assert_eq!(pg.number("SELECT count(*) FROM redis_streams"), 200);
}
