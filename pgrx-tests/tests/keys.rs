//! Key-value sync end to end: every Redis type mirrored, per database, changes landing,
//! unchanged keys left alone, deletes and expiry under each policy, any bytes stored.

use std::time::Duration;

use redis::TypedCommands;
use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(60);

const FAST: &[(&str, &str)] = &[
    ("redis_sync.rate_limit", "0"),
    ("redis_sync.sync_interval", "100ms"),
    ("redis_sync.db_search_range", "0-1"),
];

fn passes(pg: &Cluster) -> i64 {
    pg.status("key_value_passes").and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Waits until `n` more complete passes have run.
fn wait_passes(pg: &Cluster, n: i64) {
    let start = passes(pg);
    wait_for("key-value passes", T, || (passes(pg) >= start + n).then_some(()));
}

fn row(pg: &Cluster, db: i32, key: &str) -> Option<String> {
    pg.query_text(&format!(
        "SELECT concat_ws('|', value_type, redis_value, value_encoding, expires_at IS NOT NULL, deleted_at IS NOT NULL)
           FROM redis_key_values WHERE redis_db = {db} AND redis_key = '{}'",
        key.replace('\'', "''")
    ))
}

#[test]
fn every_type_is_mirrored_with_its_value() {
    let redis = Redis::start();
    let mut r = redis.client();
    r.set("s", "text").expect("SET");
    let _: usize = r.hset_multiple("h", &[("a", "1"), ("b", "two")]).map(|_| 2).expect("HSET");
    let _: usize = r.rpush("l", &["x", "y", "x"]).expect("RPUSH");
    let _: usize = r.sadd("st", &["c", "a", "b"]).expect("SADD");
    let _: usize = r.zadd_multiple("z", &[(2.5, "m2"), (1.0, "m1")]).expect("ZADD");
    let _: String =
        redis::cmd("XADD").arg("a-stream").arg("*").arg("f").arg("v").query(&mut r).expect("XADD");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_key_values", 5, T);
    assert_eq!(row(&pg, 0, "s").as_deref(), Some("string|text|f|f"));
    assert_eq!(row(&pg, 0, "h").as_deref(), Some(r#"hash|{"a":"1","b":"two"}|f|f"#));
    assert_eq!(row(&pg, 0, "l").as_deref(), Some(r#"list|["x","y","x"]|f|f"#));
    assert_eq!(row(&pg, 0, "st").as_deref(), Some(r#"set|["a","b","c"]|f|f"#));
    assert_eq!(row(&pg, 0, "z").as_deref(), Some(r#"zset|[["m1",1],["m2",2.5]]|f|f"#));
    // The stream is left to stream sync.
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values WHERE redis_key = 'a-stream'"), 0);
    // Values that are JSON are valid JSON.
    assert_eq!(
        pg.number("SELECT count(*) FROM redis_key_values WHERE value_type <> 'string' AND jsonb_typeof(redis_value::jsonb) IS NULL"),
        0
    );
}

/// The calls of `command` Redis has served (`INFO commandstats`).
fn calls(r: &mut redis::Connection, command: &str) -> i64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(r).expect("INFO");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn pages_mostly_of_hashes_still_mirror_every_type() {
    let redis = Redis::start();
    let mut r = redis.client();
    for i in 0..200 {
        let _: usize = r.hset_multiple(format!("h:{i}"), &[("n", i)]).map(|_| 1).expect("HSET");
    }
    r.set("s", "text").expect("SET");
    let _: usize = r.rpush("l", &["x", "y"]).expect("RPUSH");
    let _: usize = r.sadd("st", &["b", "a"]).expect("SADD");
    let _: usize = r.zadd_multiple("z", &[(1.0, "m1")]).expect("ZADD");
    let _: String =
        redis::cmd("XADD").arg("a-stream").arg("*").arg("f").arg("v").query(&mut r).expect("XADD");
    let pg = Cluster::start(&redis, &[FAST[0], FAST[1], ("redis_sync.db_search_range", "0")]);
    pg.wait_number("SELECT count(*) FROM redis_key_values", 204, T);
    // Later passes know the keys are mostly hashes: their values are asked for as hashes
    // without asking each key's type first (no GETRANGE for them), and the keys of other
    // types, refused as hashes, are asked their type and read as what they are.
    wait_passes(&pg, 1);
    r.set("s", "new text").expect("SET");
    let _: usize = r.rpush("l", &["z"]).expect("RPUSH");
    let _: usize = r.sadd("st", &["c"]).expect("SADD");
    let _: usize = r.zadd_multiple("z", &[(0.5, "m0")]).expect("ZADD");
    let _: usize = r.hset_multiple("h:7", &[("n", "seven")]).map(|_| 1).expect("HSET");
    let getrange = calls(&mut r, "getrange");
    wait_passes(&pg, 2);
    assert!(
        calls(&mut r, "getrange") - getrange < 100,
        "a pass over 200 hashes asked GETRANGE of each"
    );
    assert_eq!(row(&pg, 0, "s").as_deref(), Some("string|new text|f|f"));
    assert_eq!(row(&pg, 0, "l").as_deref(), Some(r#"list|["x","y","z"]|f|f"#));
    assert_eq!(row(&pg, 0, "st").as_deref(), Some(r#"set|["a","b","c"]|f|f"#));
    assert_eq!(row(&pg, 0, "z").as_deref(), Some(r#"zset|[["m0",0.5],["m1",1]]|f|f"#));
    assert_eq!(row(&pg, 0, "h:7").as_deref(), Some(r#"hash|{"n":"seven"}|f|f"#));
    assert_eq!(row(&pg, 0, "h:8").as_deref(), Some(r#"hash|{"n":"8"}|f|f"#));
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values WHERE redis_key = 'a-stream'"), 0);
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values WHERE deleted_at IS NOT NULL"), 0);
}

#[test]
fn the_same_name_in_two_databases_gives_two_rows() {
    let redis = Redis::start();
    let mut r = redis.client();
    r.set("same", "in-0").expect("SET");
    let _: () = redis::cmd("SELECT").arg(1).query(&mut r).expect("SELECT");
    r.set("same", "in-1").expect("SET");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_key_values WHERE redis_key = 'same'", 2, T);
    assert_eq!(row(&pg, 0, "same").as_deref(), Some("string|in-0|f|f"));
    assert_eq!(row(&pg, 1, "same").as_deref(), Some("string|in-1|f|f"));
}

#[test]
fn changes_land_and_unchanged_keys_are_not_rewritten() {
    let redis = Redis::start();
    let mut r = redis.client();
    for i in 0..50 {
        r.set(format!("k{i}"), i).expect("SET");
    }
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_key_values", 50, T);
    wait_passes(&pg, 1);
    let versions = |pg: &Cluster| {
        pg.query_text("SELECT string_agg(redis_key || ':' || xmin::text || ':' || ctid::text, ';' ORDER BY redis_key) FROM redis_key_values")
    };
    let before = versions(&pg);
    let written = pg.status("key_values_processed");
    let counters = |pg: &Cluster| {
        pg.query_text("SELECT key_value_passes || ' ' || pg_ops FROM redis_sync_status()")
            .and_then(|t| {
                let (p, o) = t.split_once(' ')?;
                Some((p.parse::<i64>().ok()?, o.parse::<i64>().ok()?))
            })
            .unwrap_or_default()
    };
    let (p0, o0) = counters(&pg);
    wait_passes(&pg, 3);
    let (p1, o1) = counters(&pg);
    assert_eq!(versions(&pg), before, "idle passes must not rewrite rows");
    assert_eq!(pg.status("key_values_processed"), written);
    // Unchanged keys are not even sent to Postgres: an idle pass costs one look at the
    // table's identity (no upsert, no deletion walk).
    assert!(o1 - o0 <= p1 - p0 + 1, "{} statements in {} idle passes", o1 - o0, p1 - p0);
    r.set("k7", "changed").expect("SET");
    wait_for("the change", T, || {
        (row(&pg, 0, "k7").as_deref() == Some("string|changed|f|f")).then_some(())
    });
    // Only that row got a new version.
    let after = versions(&pg).unwrap_or_default();
    let changed: Vec<&str> = after
        .split(';')
        .zip(before.as_deref().unwrap_or("").split(';'))
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(changed[0].starts_with("k7:"), "{changed:?}");
}

#[test]
fn truncated_dropped_or_hand_edited_tables_are_repaired() {
    let redis = Redis::start();
    let mut r = redis.client();
    for i in 0..20 {
        r.set(format!("k{i}"), i).expect("SET");
    }
    let pg = Cluster::start(&redis, FAST);
    let count = "SELECT count(*) FROM redis_key_values WHERE deleted_at IS NULL";
    pg.wait_number(count, 20, T);
    wait_passes(&pg, 1);
    // A TRUNCATE gives the table a new relfilenode: the worker's memory of it is void and
    // the next pass writes every row again.
    pg.execute("TRUNCATE redis_key_values");
    pg.wait_number(count, 20, T);
    pg.execute("DROP TABLE redis_key_values");
    pg.wait_number(count, 20, T);
    // Rows edited by hand are put right by the next verifying pass.
    pg.execute("DELETE FROM redis_key_values WHERE redis_key = 'k3'");
    pg.execute("UPDATE redis_key_values SET redis_value = 'edited' WHERE redis_key = 'k4'");
    pg.set("redis_sync.key_value_verify_interval", "1");
    wait_for("the verifying pass", T, || {
        (row(&pg, 0, "k3").as_deref() == Some("string|3|f|f")
            && row(&pg, 0, "k4").as_deref() == Some("string|4|f|f"))
        .then_some(())
    });
}

#[test]
fn deleted_and_expired_keys_follow_the_policy() {
    for policy in ["mark", "delete", "ignore"] {
        let redis = Redis::start();
        let mut r = redis.client();
        r.set("keep", "1").expect("SET");
        r.set("drop", "1").expect("SET");
        let pg =
            Cluster::start(&redis, &[FAST, &[("redis_sync.key_value_deletes", policy)]].concat());
        pg.wait_number("SELECT count(*) FROM redis_key_values", 2, T);
        // Set once the worker runs (a slow start on a busy machine must not let it expire
        // before it was ever mirrored).
        let _: () = redis::cmd("SET")
            .arg("brief")
            .arg("1")
            .arg("PX")
            .arg(8000)
            .query(&mut r)
            .expect("SET PX");
        pg.wait_number("SELECT count(*) FROM redis_key_values", 3, T);
        assert_eq!(row(&pg, 0, "brief").as_deref(), Some("string|1|t|f"));
        let _: usize = r.del("drop").expect("DEL");
        // "brief" expires by itself.
        wait_for("brief to expire", T, || (!r.exists("brief").unwrap_or(true)).then_some(()));
        wait_passes(&pg, 2);
        let state = |k| row(&pg, 0, k);
        match policy {
            "mark" => {
                assert_eq!(state("drop").as_deref(), Some("string|1|f|t"));
                assert_eq!(state("brief").as_deref(), Some("string|1|t|t"));
            }
            "delete" => {
                assert_eq!(state("drop"), None);
                assert_eq!(state("brief"), None);
            }
            _ => {
                assert_eq!(state("drop").as_deref(), Some("string|1|f|f"));
                assert_eq!(state("brief").as_deref(), Some("string|1|t|f"));
            }
        }
        assert_eq!(state("keep").as_deref(), Some("string|1|f|f"), "{policy}");
        // A key that comes back is live again.
        r.set("drop", "back").expect("SET");
        wait_for("the key back", T, || {
            (state("drop").as_deref() == Some("string|back|f|f")).then_some(())
        });
    }
}

#[test]
fn a_key_that_becomes_a_stream_leaves_the_key_value_table() {
    let redis = Redis::start();
    let mut r = redis.client();
    r.set("morph", "a string").expect("SET");
    r.set("stays", "1").expect("SET");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_key_values WHERE deleted_at IS NULL", 2, T);
    wait_passes(&pg, 2);
    let _: usize = r.del("morph").expect("DEL");
    let _: String =
        redis::cmd("XADD").arg("morph").arg("*").arg("f").arg("v").query(&mut r).expect("XADD");
    // Stream sync takes it; for key-value sync it is gone (marked, by the default policy).
    wait_for("the string row marked deleted", T, || {
        (row(&pg, 0, "morph").as_deref() == Some("string|a string|f|t")).then_some(())
    });
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'morph'", 1, T);
    assert_eq!(row(&pg, 0, "stays").as_deref(), Some("string|1|f|f"));
}

#[test]
fn binary_values_and_hostile_names_are_stored_as_data() {
    let redis = Redis::start();
    let mut r = redis.client();
    let names =
        ["it's", "semi;colon", "new\nline", "back\\slash", "ünïcødé ✓", "$dollar", "\"quoted\""];
    for n in names {
        r.set(n, n).expect("SET");
    }
    let _: () = redis::cmd("SET")
        .arg(&b"bin\xffkey"[..])
        .arg(&b"\x00\x01\xfe"[..])
        .query(&mut r)
        .expect("SET");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_key_values", names.len() as i64 + 1, T);
    for n in names {
        let stored = if n.starts_with('$') { format!("${n}") } else { n.to_owned() };
        assert_eq!(row(&pg, 0, &stored), Some(format!("string|{n}|f|f")), "{n:?}");
    }
    assert_eq!(
        pg.query_text("SELECT redis_value || '|' || value_encoding FROM redis_key_values WHERE redis_key = '$b64:Ymlu/2tleQ=='").as_deref(),
        Some("AAH+|base64")
    );
}

#[test]
fn a_hundred_thousand_keys() {
    let redis = Redis::start();
    let mut r = redis.client();
    for chunk in (0..100_000).collect::<Vec<u32>>().chunks(5000) {
        let mut p = redis::pipe();
        for i in chunk {
            p.cmd("SET").arg(format!("user:{i}")).arg(i).ignore();
        }
        let _: () = p.query(&mut r).expect("SET");
    }
    let pg = Cluster::start(
        &redis,
        &[("redis_sync.rate_limit", "0"), ("redis_sync.db_search_range", "0")],
    );
    pg.wait_number("SELECT count(*) FROM redis_key_values", 100_000, Duration::from_secs(180));
    assert_eq!(pg.number("SELECT count(DISTINCT redis_value) FROM redis_key_values"), 100_000);
}

#[test]
fn keyspace_notifications_bring_changes_in_between_passes() {
    let redis = Redis::start_with(&["--notify-keyspace-events", "KA"]);
    let mut r = redis.client();
    r.set("watched", "1").expect("SET");
    r.set("doomed", "1").expect("SET");
    // One pass at start, the next in an hour: only notifications can bring what follows.
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.sync_interval", "1h"),
            ("redis_sync.db_search_range", "0"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_key_values", 2, T);
    wait_for("the notification listener", T, || {
        pg.log().contains("Redis publishes keyspace notifications").then_some(())
    });
    // Subscribing triggers one catch-up pass (changes made before it were not heard).
    wait_for("the catch-up pass", T, || (passes(&pg) == 2).then_some(()));
    r.set("watched", "2").expect("SET");
    let _: usize = r.del("doomed").expect("DEL");
    r.set("newcomer", "hello").expect("SET");
    wait_for("the change", T, || {
        (row(&pg, 0, "watched").as_deref() == Some("string|2|f|f")).then_some(())
    });
    wait_for("the delete", T, || {
        (row(&pg, 0, "doomed").as_deref() == Some("string|1|f|t")).then_some(())
    });
    wait_for("the new key", T, || {
        (row(&pg, 0, "newcomer").as_deref() == Some("string|hello|f|f")).then_some(())
    });
    assert_eq!(passes(&pg), 2, "no pass after the catch-up should have run");
}

#[test]
fn passes_cut_short_by_a_redis_restart_mark_nothing() {
    // With AOF the keys survive the restarts: any row marked deleted would be a pass that
    // inferred "gone" from a partial view. What keeps it from happening here is that a
    // restart breaks the scanner's connections, which ends the pass under way unmarked; the
    // comparison of the server's run_id at the start and the end of a scan is a second
    // guard, for a connection that would outlive a restart (none does with this client), so
    // this test does not tell the two apart.
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut r = redis.client();
    for chunk in (0..30_000).collect::<Vec<u32>>().chunks(5000) {
        let mut p = redis::pipe();
        for i in chunk {
            p.cmd("SET").arg(format!("durable:{i}")).arg(i).ignore();
        }
        let _: () = p.query(&mut r).expect("SET");
    }
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.sync_interval", "10ms"),
            ("redis_sync.db_search_range", "0"),
            ("redis_sync.key_value_deletes", "mark"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_key_values", 30_000, T);
    wait_passes(&pg, 1);
    let marked = |pg: &Cluster| {
        pg.try_query_text("SELECT count(*) FROM redis_key_values WHERE deleted_at IS NOT NULL")
    };
    for _ in 0..3 {
        // Passes run back to back, so each restart lands in the middle of one.
        std::thread::sleep(Duration::from_millis(150));
        redis.restart();
        assert_eq!(marked(&pg).as_deref(), Some("0"));
    }
    wait_passes(&pg, 2);
    assert_eq!(marked(&pg).as_deref(), Some("0"));
    assert!(
        pg.status("errors").and_then(|e| e.parse::<i64>().ok()).unwrap_or(0) > 0,
        "the restarts were noticed"
    );
}
