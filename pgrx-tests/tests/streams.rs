//! Stream sync end to end: entries added with real clients land in the stream table exactly
//! once, through consumer groups, across crashes, in every database, whatever their bytes.

use std::time::Duration;

use redis::TypedCommands;
use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(60);

/// Creates the worker's group on `stream` and reads `n` entries as `consumer` without
/// acknowledging them: they sit in that consumer's pending list.
fn read_without_ack(r: &mut redis::Connection, stream: &str, consumer: &str, n: usize) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("redis-pg-sync")
        .arg("0")
        .query(r)
        .expect("XGROUP CREATE");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("redis-pg-sync")
        .arg(consumer)
        .arg("COUNT")
        .arg(n)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(r)
        .expect("XREADGROUP");
}

const FAST: &[(&str, &str)] = &[
    ("redis_sync.rate_limit", "0"),
    ("redis_sync.batch_size", "500"),
    ("redis_sync.stream_discovery_interval", "1s"),
];

#[test]
fn entries_of_several_streams_land_exactly_once() {
    let redis = Redis::start();
    let mut r = redis.client();
    let streams = ["s-a", "s-b", "s-c", "s-d"];
    for s in streams {
        add_entries(&mut r, s, 5_000);
    }
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_streams", 20_000, T);
    for s in streams {
        assert_rows_are_the_entries(&pg, &mut r, s, s);
        assert_eq!(
            pg.number(&format!("SELECT count(DISTINCT data->>'n') FROM redis_streams WHERE stream_key = '{s}' AND data->>'s' = '{s}'")),
            5_000
        );
        wait_for("no pending entries", T, || {
            (pending(&mut r, s, "redis-pg-sync") == 0).then_some(())
        });
    }
    // "timestamp" is the entry ID's milliseconds.
    assert_eq!(
        pg.number("SELECT count(*) FROM redis_streams WHERE (extract(epoch FROM \"timestamp\") * 1000)::bigint <> split_part(message_id, '-', 1)::bigint"),
        0
    );
    // More entries keep coming in.
    add_entries(&mut r, "s-a", 100);
    pg.wait_number("SELECT count(*) FROM redis_streams", 20_100, T);
    // Counters.
    wait_for("messages_processed", T, || {
        (pg.status("messages_processed").as_deref() == Some("20100")).then_some(())
    });
    assert_eq!(pg.status("streams_tracked").as_deref(), Some("4"));
    assert_eq!(pg.status("streams_discovered").as_deref(), Some("4"));
    assert!(pg.status("last_sync_time").is_some());
    let pg_ops: i64 = pg.status("pg_ops").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(pg_ops > 4, "pg_ops {pg_ops}");
}

fn kill(pid: i32, sig: i32) {
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid}");
}

#[test]
fn a_killed_worker_loses_nothing_and_duplicates_nothing() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "big", 40_000);
    let pg =
        Cluster::start(&redis, &[("redis_sync.rate_limit", "0"), ("redis_sync.batch_size", "50")]);
    wait_for("a partial drain", T, || {
        let n: i64 = pg.try_query_text("SELECT count(*) FROM redis_streams")?.parse().ok()?;
        (n > 0 && n < 40_000).then_some(())
    });
    let pid = pg.worker_pid().expect("worker");
    kill(pid, libc::SIGKILL);
    // The postmaster restarts every backend after a crash; the new worker finishes the job.
    pg.wait_number("SELECT count(*) FROM redis_streams", 40_000, T);
    assert_rows_are_the_entries(&pg, &mut r, "big", "big");
    assert_eq!(pg.number("SELECT count(DISTINCT data->>'n') FROM redis_streams"), 40_000);
    wait_for("no pending entries", T, || {
        (pending(&mut r, "big", "redis-pg-sync") == 0).then_some(())
    });
    assert_ne!(pg.worker_pid(), Some(pid));
}

/// The names of the consumers of the worker's group on `stream`.
fn consumers(r: &mut redis::Connection, stream: &str) -> Vec<String> {
    let list: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg("redis-pg-sync")
        .query(r)
        .expect("XINFO CONSUMERS");
    list.into_iter()
        .filter_map(|c| {
            let fields: std::collections::HashMap<String, redis::Value> =
                redis::from_redis_value(c).ok()?;
            redis::from_redis_value(fields.get("name")?.clone()).ok()
        })
        .collect()
}

#[test]
fn entries_read_but_not_acknowledged_are_delivered_first() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "pend", 25);
    add_entries(&mut r, "pend", 15);
    // A previous life of the worker, under the former default consumer name, read these and
    // died before acknowledging them: they sit in that consumer's pending list, and `>`
    // would never return them again. With the name now derived from the server, they are
    // the worker's own: taken over at once, long before claim_min_idle.
    read_without_ack(&mut r, "pend", "redis-pg-sync-1", 25);
    assert_eq!(pending(&mut r, "pend", "redis-pg-sync"), 25);
    let mut settings = FAST.to_vec();
    settings.push(("redis_sync.claim_min_idle", "1h"));
    let pg = Cluster::start(&redis, &settings);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'pend'", 40, T);
    wait_for("pending acknowledged", T, || {
        (pending(&mut r, "pend", "redis-pg-sync") == 0).then_some(())
    });
    let system = pg
        .query_text("SELECT system_identifier FROM pg_control_system()")
        .expect("system identifier");
    let derived = format!("redis-pg-sync-{system}-postgres");
    assert_eq!(pg.consumer_name(), derived);
    wait_for("the former default name gone from the group", T, || {
        (consumers(&mut r, "pend") == vec![derived.clone()]).then_some(())
    });
}

#[test]
fn an_explicit_consumer_name_is_kept() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "named", 30);
    read_without_ack(&mut r, "named", "redis-pg-sync-1", 10);
    let mut settings = FAST.to_vec();
    settings.push(("redis_sync.consumer_name", "redis-pg-sync-1"));
    let pg = Cluster::start(&redis, &settings);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'named'", 30, T);
    wait_for("pending acknowledged", T, || {
        (pending(&mut r, "named", "redis-pg-sync") == 0).then_some(())
    });
    assert_eq!(consumers(&mut r, "named"), vec!["redis-pg-sync-1".to_owned()]);
}

#[test]
fn entries_of_a_dead_consumer_are_claimed() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "orphan", 20);
    read_without_ack(&mut r, "orphan", "dead-one", 20);
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.claim_min_idle", "200ms"),
            ("redis_sync.stream_discovery_interval", "1s"),
            ("redis_sync.rate_limit", "0"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'orphan'", 20, T);
    wait_for("claimed entries acknowledged", T, || {
        (pending(&mut r, "orphan", "redis-pg-sync") == 0).then_some(())
    });
}

fn group_last_delivered(r: &mut redis::Connection, stream: &str) -> Option<String> {
    let v: redis::Value = redis::cmd("XINFO").arg("GROUPS").arg(stream).query(r).ok()?;
    let redis::Value::Array(groups) = v else { return None };
    for g in groups {
        let redis::Value::Array(kv) = g else { continue };
        for pair in kv.chunks(2) {
            if let [redis::Value::BulkString(k), redis::Value::BulkString(v)] = pair {
                if k == b"last-delivered-id" {
                    return Some(String::from_utf8_lossy(v).into_owned());
                }
            }
        }
    }
    None
}

#[test]
fn a_stream_deleted_and_added_again_follows_the_conflict_setting() {
    for (overwrite, expect) in [("off", "first"), ("on", "second")] {
        let redis = Redis::start();
        let mut r = redis.client();
        for id in ["1-1", "2-1"] {
            let _: String = redis::cmd("XADD")
                .arg("re")
                .arg(id)
                .arg("a")
                .arg("first")
                .query(&mut r)
                .expect("XADD");
        }
        let pg = Cluster::start(
            &redis,
            &[("redis_sync.stream_conflict_overwrite", overwrite), ("redis_sync.rate_limit", "0")],
        );
        pg.wait_number("SELECT count(*) FROM redis_streams WHERE data->>'a' = 'first'", 2, T);
        wait_for("first pass acknowledged", T, || {
            (pending(&mut r, "re", "redis-pg-sync") == 0).then_some(())
        });
        let _: usize = r.del("re").expect("DEL");
        for id in ["1-1", "2-1"] {
            let _: String = redis::cmd("XADD")
                .arg("re")
                .arg(id)
                .arg("a")
                .arg("second")
                .query(&mut r)
                .expect("XADD");
        }
        // The worker finds the group gone, creates it again from the start, reads both again.
        wait_for("the re-created stream read to its end", T, || {
            (group_last_delivered(&mut r, "re").as_deref() == Some("2-1")
                && pending(&mut r, "re", "redis-pg-sync") == 0)
                .then_some(())
        });
        pg.wait_number(
            &format!("SELECT count(*) FROM redis_streams WHERE data->>'a' = '{expect}'"),
            2,
            T,
        );
        assert_eq!(pg.number("SELECT count(*) FROM redis_streams"), 2, "overwrite={overwrite}");
    }
}

#[test]
fn streams_in_other_databases_are_stored_with_their_database() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "shared-name", 3);
    let _: () = redis::cmd("SELECT").arg(3).query(&mut r).expect("SELECT 3");
    add_entries(&mut r, "shared-name", 4);
    let _: () = redis::cmd("SELECT").arg(9).query(&mut r).expect("SELECT 9");
    add_entries(&mut r, "outside-range", 1);
    let pg = Cluster::start(
        &redis,
        &[("redis_sync.db_search_range", "0-5"), ("redis_sync.rate_limit", "0")],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'db3:shared-name'", 4, T);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'shared-name'", 3, T);
    assert_eq!(pg.number("SELECT count(*) FROM redis_streams"), 7);
    assert_eq!(
        pg.query_text("SELECT string_agg(stream_key || '@' || redis_db, ',' ORDER BY stream_key) FROM redis_sync_streams()").as_deref(),
        Some("db3:shared-name@3,shared-name@0")
    );
}

#[test]
fn only_matching_streams_are_synced() {
    let redis = Redis::start();
    let mut r = redis.client();
    for s in ["sensor-a", "other", "dev5", "devx", "xc", "xa", "sensor-[b]"] {
        add_entries(&mut r, s, 1);
    }
    let _: () = r.set("sensor-str", "a string").expect("SET");
    let _: usize = r.hset("sensor-h", "f", "v").expect("HSET");
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.stream_discovery_patterns", "sensor-*, dev[0-9] ,x[!ab]"),
            ("redis_sync.stream_discovery_interval", "1s"),
            ("redis_sync.rate_limit", "0"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams", 4, T);
    // A second discovery pass changes nothing.
    let gen = pg.number("SELECT count(*) FROM redis_sync_discover()");
    assert_eq!(gen, 4);
    assert_eq!(
        pg.query_text("SELECT string_agg(stream_key, ',' ORDER BY stream_key) FROM redis_streams")
            .as_deref(),
        Some("dev5,sensor-[b],sensor-a,xc")
    );
    // The string and the hash that match a pattern were skipped quietly, not as errors.
    let log = pg.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("] redis_pg_sync ") && (l.contains("ERROR") || l.contains("WARNING"))
        })
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
}

#[test]
fn new_streams_are_found_and_discover_reports_them() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "early", 1);
    let pg = Cluster::start(
        &redis,
        &[("redis_sync.stream_discovery_interval", "1h"), ("redis_sync.rate_limit", "0")],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    add_entries(&mut r, "late", 2);
    assert_eq!(
        pg.query_text("SELECT string_agg(stream_key || ':' || newly_added, ',' ORDER BY stream_key) FROM redis_sync_discover()").as_deref(),
        Some("early:false,late:true")
    );
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'late'", 2, T);
    assert_eq!(
        pg.query_text("SELECT string_agg(stream_key || ':' || newly_added, ',' ORDER BY stream_key) FROM redis_sync_discover()").as_deref(),
        Some("early:false,late:false")
    );
    // Found within one interval without being asked, too.
    let pg2 = Cluster::start(
        &redis,
        &[
            ("redis_sync.stream_discovery_interval", "1s"),
            ("redis_sync.consumer_group", "second"),
            ("redis_sync.rate_limit", "0"),
        ],
    );
    pg2.wait_number("SELECT count(*) FROM redis_streams", 3, T);
    add_entries(&mut r, "later", 1);
    pg2.wait_number(
        "SELECT count(*) FROM redis_streams WHERE stream_key = 'later'",
        1,
        Duration::from_secs(10),
    );
}

#[test]
fn redis_sync_streams_describes_each_stream() {
    let redis = Redis::start();
    let mut r = redis.client();
    let ids: Vec<String> = (0..10)
        .map(|i| {
            redis::cmd("XADD")
                .arg("described")
                .arg("*")
                .arg("i")
                .arg(i)
                .query(&mut r)
                .expect("XADD")
        })
        .collect();
    let pg = Cluster::start(
        &redis,
        &[("redis_sync.stream_discovery_interval", "1s"), ("redis_sync.rate_limit", "0")],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams", 10, T);
    let want = format!(
        "described|0|redis-pg-sync|active|{last}|10|0|0|10|{first}|{last}|1|t|",
        first = ids[0],
        last = ids[9]
    );
    wait_for("redis_sync_streams() to catch up", T, || {
        let got = pg.query_text(
            "SELECT concat_ws('|', stream_key, redis_db, consumer_group, state, last_id, messages_synced, pending, lag, length, first_entry_id, last_entry_id, consumers, last_sync_time IS NOT NULL, coalesce(last_error, '')) FROM redis_sync_streams()",
        )?;
        (got == want).then_some(())
    });
}

#[test]
fn bytes_nul_huge_values_and_refused_rows_never_block_a_stream() {
    let redis = Redis::start();
    let mut r = redis.client();
    let pg = Cluster::start(&redis, &[("redis_sync.rate_limit", "0")]);
    // The DBA's own table, with a rule and a trigger of their own.
    pg.execute(
        "CREATE TABLE redis_streams (
            id bigserial PRIMARY KEY, stream_key text NOT NULL, message_id text NOT NULL,
            data jsonb NOT NULL, \"timestamp\" timestamptz NOT NULL,
            synced_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream_key, message_id),
            CONSTRAINT no_bad CHECK (data->>'bad' IS DISTINCT FROM 'yes'));
         CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.data->>'trig' = 'raise' THEN RAISE EXCEPTION 'no thanks'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON redis_streams FOR EACH ROW EXECUTE FUNCTION refuse();",
    );
    let add = |r: &mut redis::Connection, id: &str, name: &[u8], value: &[u8]| {
        let _: String =
            redis::cmd("XADD").arg("mixed").arg(id).arg(name).arg(value).query(r).expect("XADD");
    };
    add(&mut r, "1-1", b"bin", &[0xff, 0x00, 0x01]);
    add(&mut r, "2-1", &[0xc3, 0x28], b"x");
    add(&mut r, "3-1", b"big", &vec![b'z'; 1 << 20]);
    add(&mut r, "4-1", b"bad", b"yes");
    add(&mut r, "5-1", b"ok", b"1");
    add(&mut r, "6-1", b"trig", b"raise");
    add(&mut r, "7-1", b"nul", b"a\0b");
    pg.wait_number("SELECT count(*) FROM redis_streams", 5, T);
    pg.wait_number("SELECT count(*) FROM redis_sync_dead_letters", 2, T);
    wait_for("everything acknowledged", T, || {
        (pending(&mut r, "mixed", "redis-pg-sync") == 0).then_some(())
    });
    let q = |sql: &str| pg.query_text(sql).unwrap_or_default();
    assert_eq!(
        q("SELECT data::text FROM redis_streams WHERE message_id = '1-1'"),
        r#"{"bin": {"$b64": "/wAB"}}"#
    );
    assert_eq!(
        q("SELECT data::text FROM redis_streams WHERE message_id = '2-1'"),
        r#"{"$b64:wyg=": "x"}"#
    );
    assert_eq!(
        q("SELECT length(data->>'big') FROM redis_streams WHERE message_id = '3-1'"),
        "1048576"
    );
    assert_eq!(
        q("SELECT data::text FROM redis_streams WHERE message_id = '7-1'"),
        r#"{"nul": {"$b64": "YQBi"}}"#
    );
    assert_eq!(
        q("SELECT string_agg(message_id || ':' || sqlstate || ':' || fields::text, ' ' ORDER BY message_id) FROM redis_sync_dead_letters"),
        r#"4-1:23514:{"bad": "yes"} 6-1:P0001:{"trig": "raise"}"#
    );
    assert!(
        q("SELECT error FROM redis_sync_dead_letters WHERE message_id = '4-1'").contains("no_bad")
    );
    assert!(q("SELECT error FROM redis_sync_dead_letters WHERE message_id = '6-1'")
        .contains("no thanks"));
    assert_eq!(pg.status("dead_letters").as_deref(), Some("2"));
    // The stream goes on.
    add(&mut r, "8-1", b"ok", b"2");
    pg.wait_number("SELECT count(*) FROM redis_streams", 6, T);
}

#[test]
fn the_rate_limit_bounds_round_trips_and_can_be_lifted() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "metered", 3_000);
    let pg =
        Cluster::start(&redis, &[("redis_sync.rate_limit", "10"), ("redis_sync.batch_size", "10")]);
    let t0 = std::time::Instant::now();
    wait_for("the first rows", T, || {
        let n: i64 = pg.try_query_text("SELECT count(*) FROM redis_streams")?.parse().ok()?;
        (n > 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let n = pg.number("SELECT count(*) FROM redis_streams");
    let elapsed = t0.elapsed().as_secs_f64() + 1.0;
    // Each batch of at most 10 rows costs at least one round trip (the read, with the
    // previous batch's acknowledgement riding along): 10 ops/s with a burst of 10 allows at
    // most 10 * (10 + 10 * elapsed) rows.
    let bound = (10.0 * (10.0 + 10.0 * elapsed)) as i64;
    assert!(n <= bound, "{n} rows in {elapsed:.1}s with rate_limit 10 (bound {bound})");
    pg.set("redis_sync.rate_limit", "0");
    pg.wait_number("SELECT count(*) FROM redis_streams", 3_000, T);
}

#[test]
fn a_moderate_load_opens_no_new_connections() {
    // At a few hundred entries a second a database keeps turning busy (read without
    // waiting) and idle (a read that waits in Redis): its connections stay the same.
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "steady", 1);
    let pg = Cluster::start(&redis, &[("redis_sync.key_value_auto_discovery", "off")]);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    let before = connections_received(&mut r);
    let ids = produce(redis.port, &[(0, "steady".to_owned())], 300, 4.0);
    assert_eq!(ids.values().map(Vec::len).sum::<usize>(), 1200);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1201, T);
    // One connection is the producer's own.
    assert_eq!(connections_received(&mut r) - before, 1, "connections opened under load");
}

#[test]
fn several_stream_workers_split_the_streams_and_land_each_entry_once() {
    let redis = Redis::start();
    let mut r = redis.client();
    for i in 0..8 {
        add_entries(&mut r, &format!("split-{i}"), 500);
    }
    select(&mut r, 1);
    add_entries(&mut r, "split-db1", 500);
    select(&mut r, 0);
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.workers", "2"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_discovery_interval", "1s"),
            ("redis_sync.key_value_auto_discovery", "off"),
        ],
    );
    assert!(pg.wait_until_running());
    let rows = || {
        pg.query_text(
            "SELECT string_agg(worker || ':' || state, ',' ORDER BY worker) FROM redis_sync_workers()",
        )
    };
    wait_for("three workers running", T, || {
        (rows()?.as_str() == "key_values:running,streams:running,streams 2:running").then_some(())
    });
    // Each stream belongs to one of the two stream workers, and both have some.
    wait_for("all nine streams tracked, by both workers", T, || {
        let split = pg.query_text(
            "SELECT string_agg(streams::text, ',' ORDER BY worker) FROM redis_sync_workers() WHERE worker LIKE 'streams%'",
        )?;
        let n: Vec<i64> = split.split(',').filter_map(|v| v.parse().ok()).collect();
        (n.len() == 2 && n.iter().all(|v| *v > 0) && n.iter().sum::<i64>() == 9).then_some(())
    });
    assert_eq!(pg.status("streams_tracked").as_deref(), Some("9"));
    // redis_sync_discover() answers for both workers.
    assert_eq!(pg.number("SELECT count(*) FROM redis_sync_discover()"), 9);
    pg.wait_number("SELECT count(*) FROM redis_streams", 4500, T);
    // The second worker restarted: its streams go on, each entry once.
    let second = pg.number("SELECT pid FROM redis_sync_workers() WHERE worker = 'streams 2'");
    pg.execute(&format!("SELECT pg_terminate_backend({second})"));
    for i in 0..8 {
        add_numbered(&mut r, &format!("split-{i}"), 500..700);
    }
    wait_for("the second worker back", T, || {
        let pid: i64 = pg
            .try_query_text("SELECT pid FROM redis_sync_workers() WHERE worker = 'streams 2' AND state = 'running'")?
            .parse()
            .ok()?;
        (pid != second).then_some(())
    });
    pg.wait_number("SELECT count(*) FROM redis_streams", 4500 + 8 * 200, T);
    // The first worker's status is its own after the second's exit and start.
    assert_eq!(pg.status("state").as_deref(), Some("running"));
    assert_eq!(pg.status("redis_connected").as_deref(), Some("true"));
    for i in 0..8 {
        wait_for("nothing pending", T, || {
            (pending(&mut r, &format!("split-{i}"), GROUP) == 0).then_some(())
        });
    }
}
