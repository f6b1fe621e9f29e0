//! Routes end to end: streams into the user's own typed tables, through real Redis and a
//! real Postgres, exactly once across crashes, with dead letters, live changes and
//! pg_dump/pg_restore.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(60);

const FAST: &[(&str, &str)] = &[
    ("redis_sync.rate_limit", "0"),
    ("redis_sync.batch_size", "500"),
    ("redis_sync.stream_discovery_interval", "1s"),
    ("redis_sync.key_value_auto_discovery", "off"),
];

fn xadd(r: &mut redis::Connection, stream: &str, fields: &[(&str, &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(r).expect("XADD")
}

const TYPED: &str = "
    CREATE TYPE mood AS ENUM ('calm', 'tense');
    CREATE DOMAIN pct AS int CHECK (VALUE BETWEEN 0 AND 100);
    CREATE TABLE typed (
        i int, b bigint, n numeric(10,2), f float8, ok bool, at timestamptz, d date,
        u uuid, m mood, tags text[], doc jsonb, p pct, raw bytea, note text,
        entry_id text, stream text, ts timestamptz, fields jsonb, missing int);
    SELECT redis_sync_add_stream_route('typed', 'typed-*', 'typed', '{
        \"i\": \"i\", \"b\": \"b\", \"n\": \"n\", \"f\": \"f\", \"ok\": \"ok\", \"at\": \"at\",
        \"d\": \"d\", \"u\": \"u\", \"m\": \"m\", \"tags\": \"tags\", \"doc\": \"doc\", \"p\": \"p\",
        \"raw\": \"raw\", \"note\": \"note\", \"entry_id\": \"$id\", \"stream\": \"$stream\",
        \"ts\": \"$timestamp\", \"fields\": \"$fields\", \"missing\": \"absent\"}');";

/// The fields of an entry of every type; `p` is the domain's value.
fn typed_fields(p: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("i", b"42".to_vec()),
        ("b", b"9000000000".to_vec()),
        ("n", b"3.14159".to_vec()),
        ("f", b"2.5e10".to_vec()),
        ("ok", b"t".to_vec()),
        ("at", b"2026-01-02 03:04:05+02".to_vec()),
        ("d", b"2026-02-03".to_vec()),
        ("u", b"0b6a8f2e-3c1d-4e5f-9a7b-1c2d3e4f5a6b".to_vec()),
        ("m", b"tense".to_vec()),
        ("tags", b"{a,\"b c\"}".to_vec()),
        ("doc", b"{\"k\": [1, 2]}".to_vec()),
        ("p", p.as_bytes().to_vec()),
        ("raw", vec![0u8, 0xff, 0x10]),
        ("note", vec![b'h', 0xff, b'i']),
    ]
}

/// One row of `typed` as text, every column converted back by Postgres.
fn typed_row(pg: &Cluster, entry_id: &str) -> String {
    pg.query_text(&format!(
        "SELECT concat_ws('|', i, b, n, f, ok, at AT TIME ZONE 'UTC', d, u, m, tags, doc->'k'->>1,
                          p, encode(raw, 'hex'), note, stream, ts = to_timestamp(split_part(entry_id, '-', 1)::float8 / 1000),
                          fields->>'i', missing IS NULL)
           FROM typed WHERE entry_id = '{entry_id}'"
    ))
    .unwrap_or_default()
}

#[test]
fn every_type_arrives_through_its_input_function() {
    let redis = Redis::start();
    let mut r = redis.client();
    let pg = Cluster::start(&redis, FAST);
    pg.execute(TYPED);
    assert!(pg.wait_until_running());
    let fields = typed_fields("55");
    let refs: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    // Alone: the COPY path.
    let first = xadd(&mut r, "typed-1", &refs);
    pg.wait_number(&format!("SELECT count(*) FROM typed WHERE entry_id = '{first}'"), 1, T);
    let want = "42|9000000000|3.14|25000000000|t|2026-01-02 01:04:05|2026-02-03|\
                0b6a8f2e-3c1d-4e5f-9a7b-1c2d3e4f5a6b|tense|{a,\"b c\"}|2|55|00ff10|$b64:aP9p|typed-1|t|42|t";
    assert_eq!(typed_row(&pg, &first), want);
    // With a row the domain refuses in the same read (the three added at once): the others
    // land through the INSERT path (each value cast to its column's type), the refused one
    // is a dead letter.
    let bad = typed_fields("500");
    let mut p = redis::pipe();
    p.atomic();
    for f in [&fields, &bad, &fields] {
        let cmd = p.cmd("XADD").arg("typed-2").arg("*");
        for (k, v) in f {
            cmd.arg(*k).arg(v.as_slice());
        }
    }
    let added: Vec<String> = p.query(&mut r).expect("MULTI XADD");
    let (second, refused, third) = (added[0].clone(), added[1].clone(), added[2].clone());
    pg.wait_number(
        &format!("SELECT count(*) FROM typed WHERE entry_id IN ('{second}', '{third}')"),
        2,
        T,
    );
    for id in [&second, &third] {
        assert_eq!(typed_row(&pg, id), want.replace("typed-1", "typed-2"));
    }
    wait_for("the refused entry in dead letters", T, || {
        pg.query_text(&format!(
            "SELECT route || '|' || sqlstate FROM redis_sync_dead_letters WHERE message_id = '{refused}'"
        ))
        .filter(|s| s == "typed|23514")
    });
    assert_eq!(pg.number(&format!("SELECT count(*) FROM typed WHERE entry_id = '{refused}'")), 0);
    // None of it went to the generic stream table.
    assert_eq!(pg.number("SELECT count(*) FROM redis_streams WHERE stream_key LIKE 'typed-%'"), 0);
}

#[test]
fn a_refused_value_is_dead_lettered_and_lands_once_the_column_is_widened() {
    let redis = Redis::start();
    let mut r = redis.client();
    let pg = Cluster::start(&redis, FAST);
    pg.execute(
        "CREATE TABLE small (v smallint, id text);
         SELECT redis_sync_add_stream_route('small', 'small', 'small', '{\"v\": \"v\", \"id\": \"$id\"}');",
    );
    assert!(pg.wait_until_running());
    let ok = xadd(&mut r, "small", &[("v", b"1")]);
    let big = xadd(&mut r, "small", &[("v", b"100000")]);
    let after = xadd(&mut r, "small", &[("v", b"2")]);
    pg.wait_number("SELECT count(*) FROM small", 2, T);
    wait_for("the dead letter", T, || {
        pg.query_text(&format!(
            "SELECT route || '|' || sqlstate FROM redis_sync_dead_letters WHERE message_id = '{big}'"
        ))
        .filter(|s| s == "small|22003")
    });
    assert_eq!(
        pg.number(&format!("SELECT count(*) FROM small WHERE id IN ('{ok}', '{after}')")),
        2
    );
    wait_for("the routes' figures", T, || {
        pg.query_text("SELECT rows_landed || '|' || dead_letters FROM redis_sync_routes()")
            .filter(|s| s == "2|1")
    });
    // Widened while the worker runs: the dead letter lands when replayed, and new values
    // that need the wider type land too, through COPY and through the INSERT path (no
    // statement keeps the old cast).
    pg.execute("ALTER TABLE small ALTER COLUMN v TYPE int");
    let replayed = pg.query_text(
        "SELECT landed || '|' || stayed FROM redis_sync_replay_dead_letters('*', NULL, 'small')",
    );
    assert_eq!(replayed.as_deref(), Some("1|0"));
    assert_eq!(pg.number(&format!("SELECT v FROM small WHERE id = '{big}'")), 100_000);
    assert_eq!(pg.number("SELECT count(*) FROM redis_sync_dead_letters"), 0);
    let wide = xadd(&mut r, "small", &[("v", b"200000")]);
    pg.wait_number(&format!("SELECT count(*) FROM small WHERE id = '{wide}'"), 1, T);
    // A read with a refused row (the two added at once) takes the INSERT path for the
    // other.
    let added: Vec<String> = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg("small")
        .arg("*")
        .arg("v")
        .arg("300000")
        .cmd("XADD")
        .arg("small")
        .arg("*")
        .arg("v")
        .arg("not a number")
        .query(&mut r)
        .expect("MULTI XADD");
    let wide2 = &added[0];
    pg.wait_number(&format!("SELECT count(*) FROM small WHERE id = '{wide2}'"), 1, T);
    wait_for("the second dead letter", T, || {
        (pg.number("SELECT count(*) FROM redis_sync_dead_letters WHERE sqlstate = '22P02'") == 1)
            .then_some(())
    });
    assert_eq!(pg.number("SELECT count(*) FROM small"), 5);
}

/// Every ID of `ids` is one row of `table` (column `id_col`), and there is nothing else.
fn assert_once(pg: &Cluster, table: &str, id_col: &str, ids: &[String]) {
    let mut c = pg.client();
    let rows =
        c.query(&format!("SELECT {id_col}, count(*) FROM {table} GROUP BY 1"), &[]).expect("rows");
    let have: HashMap<String, i64> =
        rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect();
    let lost = ids.iter().filter(|id| !have.contains_key(*id)).count();
    let duplicated: i64 = have.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    let extra = have.len() - (ids.len() - lost);
    if duplicated > 0 {
        let dup = c
            .query(
                &format!(
                    "SELECT {id_col}, xmin::text FROM {table} WHERE {id_col} IN
                       (SELECT {id_col} FROM {table} GROUP BY 1 HAVING count(*) > 1) ORDER BY 1 LIMIT 6"
                ),
                &[],
            )
            .expect("dups");
        for r in dup {
            eprintln!("duplicated: {} xmin {}", r.get::<_, String>(0), r.get::<_, String>(1));
        }
    }
    eprintln!("{table}: {} entries, {lost} lost, {duplicated} duplicated", ids.len());
    assert_eq!((lost, duplicated, extra), (0, 0, 0));
}

#[test]
fn a_table_without_a_unique_key_gets_each_entry_once_across_a_killed_worker_and_an_immediate_stop()
{
    let redis = Redis::start();
    let mut r = redis.client();
    let mut pg = Cluster::start(&redis, FAST);
    pg.execute(
        "CREATE TABLE plain (entry_id text, n int, at timestamptz);
         SELECT redis_sync_add_stream_route('plain', 'plain', 'plain',
             '{\"entry_id\": \"$id\", \"n\": \"n\", \"at\": \"$timestamp\"}');",
    );
    assert!(pg.wait_until_running());
    let total = 100_000;
    let ids = produce_fast(&mut r, "plain", total);
    let landed = |pg: &Cluster| -> i64 {
        pg.try_query_text("SELECT count(*) FROM plain").and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    wait_for("a first part landed", T, || (landed(&pg) > 10_000).then_some(()));
    let killed = pg.kill_worker();
    // (The postmaster restarts every backend: connections fail until recovery is done.)
    wait_for("the worker back", T, || {
        pg.try_query_text("SELECT pid FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync'")
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p != killed)
    });
    let before = landed(&pg);
    wait_for("more landed", T, || {
        let n = landed(&pg);
        (n > before + 10_000 && n < total as i64).then_some(())
    });
    pg.crash_restart();
    assert!(pg.wait_until_running());
    pg.wait_number("SELECT count(DISTINCT entry_id) FROM plain", total as i64, T);
    wait_for("nothing pending", T, || {
        (pending(&mut r, "plain", "redis-pg-sync") == 0).then_some(())
    });
    assert_once(&pg, "plain", "entry_id", &ids);
    assert_eq!(pg.number("SELECT count(*) FROM plain WHERE n IS NULL OR at IS NULL"), 0);
}

#[test]
fn routes_added_changed_and_dropped_while_the_worker_runs_apply_within_a_second() {
    let redis = Redis::start();
    let mut r = redis.client();
    let pg = Cluster::start(&redis, FAST);
    pg.execute(
        "CREATE TABLE first_t (entry_id text, v text);
         CREATE TABLE second_t (entry_id text, w text);",
    );
    assert!(pg.wait_until_running());
    let generic = xadd(&mut r, "live", &[("v", b"0")]);
    pg.wait_number(
        &format!("SELECT count(*) FROM redis_streams WHERE message_id = '{generic}'"),
        1,
        T,
    );
    // Each change: committed, then an entry added right away must land where the change
    // says within a second.
    let within_a_second = |sql: &str, table: &str, col: &str, value: &[u8]| {
        pg.execute(sql);
        let t0 = Instant::now();
        let id = xadd(&mut redis.client(), "live", &[(col, value)]);
        let q = format!(
            "SELECT count(*) FROM {table} WHERE {} = '{id}'",
            if table == "redis_streams" { "message_id" } else { "entry_id" }
        );
        wait_for(&format!("{id} in {table}"), T, || (pg.number(&q) == 1).then_some(()));
        let took = t0.elapsed();
        eprintln!("{sql}: applied in {took:?}");
        assert!(took < Duration::from_secs(1), "{sql}: took {took:?}");
    };
    within_a_second(
        "SELECT redis_sync_add_stream_route('r', 'live', 'first_t', '{\"entry_id\": \"$id\", \"v\": \"v\"}')",
        "first_t",
        "v",
        b"1",
    );
    within_a_second(
        "UPDATE redis_sync.routes SET target = 'second_t', columns = '{\"entry_id\": \"$id\", \"w\": \"v\"}' WHERE name = 'r'",
        "second_t",
        "v",
        b"2",
    );
    assert_eq!(pg.query_text("SELECT w FROM second_t").as_deref(), Some("2"));
    within_a_second("SELECT redis_sync_drop_route('r')", "redis_streams", "v", b"3");
    // Nothing was lost or written twice on the way.
    assert_eq!(
        pg.number("SELECT count(*) FROM first_t")
            + pg.number("SELECT count(*) FROM second_t")
            + pg.number("SELECT count(*) FROM redis_streams WHERE stream_key = 'live'"),
        4
    );
    let _ = r;
}

#[test]
fn pg_dump_and_pg_restore_keep_the_routes() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, FAST);
    pg.execute(
        "CREATE TABLE vitals (device_id text, heart_rate int, spo2 int, taken_at timestamptz, entry_id text);
         SELECT redis_sync_add_stream_route('vitals', 'biosignal-*', 'vitals',
             '{\"device_id\": \"$stream\", \"heart_rate\": \"hr\", \"spo2\": \"spo2\", \"taken_at\": \"$timestamp\", \"entry_id\": \"$id\"}');
         CREATE TABLE users (id bigint PRIMARY KEY, name text, age int, updated_at timestamptz);
         SELECT redis_sync_add_key_route('users', 'user:*', 'users',
             '{\"id\": \"$key_part 1\", \"name\": \"name\", \"age\": \"age\"}', '{id}', 'mark:updated_at');",
    );
    pg.execute("CREATE DATABASE restored");
    let definitions = |db: &str| -> Vec<String> {
        pg.client_of(db)
            .query(
                "SELECT concat_ws('|', name, kind, patterns, target::text, columns::text, key_columns::text, conflict, deletes)
                   FROM redis_sync.routes ORDER BY name",
                &[],
            )
            .expect("routes")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    };
    let before = definitions("postgres");
    assert_eq!(before.len(), 2);
    let dump = tempfile::NamedTempFile::new().expect("dump file");
    let port = pg.port.to_string();
    let out = Command::new(pg_program("pg_dump"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-Fc", "-f"])
        .arg(dump.path())
        .arg("postgres")
        .output()
        .expect("pg_dump");
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(pg_program("pg_restore"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "restored",
            "--exit-on-error",
        ])
        .arg(dump.path())
        .output()
        .expect("pg_restore");
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(definitions("restored"), before);
}

const KEYS: &[(&str, &str)] = &[
    ("redis_sync.rate_limit", "0"),
    ("redis_sync.sync_interval", "200ms"),
    ("redis_sync.stream_auto_discovery", "off"),
];

fn xmin_of(pg: &Cluster, table: &str, id: &str) -> String {
    pg.query_text(&format!("SELECT xmin::text FROM {table} WHERE id = {id}")).unwrap_or_default()
}

/// Waits for `n` more complete key-value passes.
fn passes(pg: &Cluster, n: i64) {
    let now = pg.number("SELECT key_value_passes FROM redis_sync_status()");
    pg.wait_number(
        &format!("SELECT least(key_value_passes, {}) FROM redis_sync_status()", now + n),
        now + n,
        T,
    );
}

#[test]
fn key_routes_upsert_changes_follow_deletes_and_leave_unchanged_rows_alone() {
    let redis = Redis::start();
    let mut r = redis.client();
    let mut pg = Cluster::start(&redis, KEYS);
    pg.execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, age int, updated_at timestamptz);
         SELECT redis_sync_add_key_route('users', 'user:*', 'users',
             '{\"id\": \"$key_part 1\", \"name\": \"name\", \"age\": \"age\", \"updated_at\": \"$expires_at\"}', '{id}');
         CREATE TABLE orders (id text PRIMARY KEY, total numeric, gone_at timestamptz);
         SELECT redis_sync_add_key_route('orders', 'order:*', 'orders',
             '{\"id\": \"$key\", \"total\": \"total\"}', '{id}', 'mark:gone_at');
         CREATE TABLE items (id text PRIMARY KEY, qty int);
         SELECT redis_sync_add_key_route('items', 'item:*', 'items',
             '{\"id\": \"$key_part 1\", \"qty\": \"qty\"}', '{id}', 'ignore');",
    );
    let hset = |r: &mut redis::Connection, key: &str, fields: &[(&str, &str)]| {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key);
        for (f, v) in fields {
            cmd.arg(*f).arg(*v);
        }
        let _: i64 = cmd.query(r).expect("HSET");
    };
    hset(&mut r, "user:1", &[("name", "Ada"), ("age", "36")]);
    hset(&mut r, "user:2", &[("name", "Bob"), ("age", "40")]);
    let _: () = redis::cmd("SET")
        .arg("user:3")
        .arg("{\"name\": \"Cy\", \"age\": 5}")
        .query(&mut r)
        .expect("SET");
    hset(&mut r, "order:1", &[("total", "9.50")]);
    hset(&mut r, "item:1", &[("qty", "3")]);
    let _: () = redis::cmd("SET").arg("plain").arg("v").query(&mut r).expect("SET");
    assert!(pg.wait_until_running());
    pg.wait_number("SELECT count(*) FROM users", 3, T);
    assert_eq!(
        pg.query_text(
            "SELECT string_agg(id || ':' || name || ':' || age, ',' ORDER BY id) FROM users"
        )
        .as_deref(),
        Some("1:Ada:36,2:Bob:40,3:Cy:5")
    );
    pg.wait_number("SELECT count(*) FROM orders WHERE total = 9.50", 1, T);
    pg.wait_number("SELECT count(*) FROM items WHERE qty = 3", 1, T);
    // Only what no route takes is in the key-value table.
    pg.wait_number("SELECT count(*) FROM redis_key_values WHERE redis_key = 'plain'", 1, T);
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values WHERE redis_key <> 'plain'"), 0);
    // A change is written; unchanged rows are not (their row version stays).
    let (x1, x2) = (xmin_of(&pg, "users", "1"), xmin_of(&pg, "users", "2"));
    hset(&mut r, "user:1", &[("age", "37")]);
    pg.wait_number("SELECT age FROM users WHERE id = 1", 37, T);
    passes(&pg, 2);
    assert_ne!(xmin_of(&pg, "users", "1"), x1);
    assert_eq!(xmin_of(&pg, "users", "2"), x2, "an unchanged key was rewritten");
    // An expiry is mapped, and when the key expires its row goes (deletes = 'delete').
    let _: i64 = redis::cmd("PEXPIRE").arg("user:2").arg(1500).query(&mut r).expect("PEXPIRE");
    pg.wait_number("SELECT count(*) FROM users WHERE id = 2 AND updated_at IS NOT NULL", 1, T);
    pg.wait_number("SELECT count(*) FROM users WHERE id = 2", 0, T);
    // Deleted: 'delete' removes the row, 'mark:gone_at' sets the column, 'ignore' keeps it.
    let _: i64 =
        redis::cmd("DEL").arg("user:1").arg("order:1").arg("item:1").query(&mut r).expect("DEL");
    pg.wait_number("SELECT count(*) FROM users WHERE id = 1", 0, T);
    pg.wait_number(
        "SELECT count(*) FROM orders WHERE id = 'order:1' AND gone_at IS NOT NULL",
        1,
        T,
    );
    passes(&pg, 2);
    assert_eq!(pg.number("SELECT count(*) FROM items WHERE id = '1'"), 1);
    // Back again: the mark goes.
    hset(&mut r, "order:1", &[("total", "10")]);
    pg.wait_number(
        "SELECT count(*) FROM orders WHERE id = 'order:1' AND gone_at IS NULL AND total = 10",
        1,
        T,
    );
    // A key part an integer column would store in another form is not written (its row
    // could not be matched to the key again), and says so; the row of user 7's key is not
    // touched by it.
    hset(&mut r, "user:07", &[("name", "Bond"), ("age", "50")]);
    wait_for("the key reported", T, || {
        pg.query_text("SELECT last_error FROM redis_sync_routes() WHERE name = 'users'")
            .filter(|e| e.contains("\"07\" for key column \"id\""))
    });
    assert_eq!(pg.number("SELECT count(*) FROM users WHERE id = 7"), 0);
    let _: i64 = redis::cmd("DEL").arg("user:07").query(&mut r).expect("DEL");
    // A key deleted while no worker watched is found by walking the target; after the
    // restart nothing is remembered, and unchanged rows still keep their row version.
    let x_order = xmin_of(&pg, "orders", "'order:1'");
    pg.stop();
    let _: i64 = redis::cmd("DEL").arg("user:3").query(&mut r).expect("DEL");
    pg.start_again();
    assert!(pg.wait_until_running());
    pg.wait_number("SELECT count(*) FROM users WHERE id = 3", 0, T);
    passes(&pg, 1);
    assert_eq!(xmin_of(&pg, "orders", "'order:1'"), x_order, "an unchanged key was rewritten");
    assert_eq!(
        pg.query_text(
            "SELECT string_agg(name, ',') FROM redis_sync_routes() WHERE last_error IS NOT NULL AND name <> 'users'"
        ),
        None
    );
}

/// Keys new to the worker go to the target by COPY; a target that already has a row for one
/// of them (as after a restart, or rows put there by hand) refuses the COPY, and those keys
/// are upserted instead: nothing is lost, stale rows are brought up to date, and a row the
/// target refuses is reported alone.
#[test]
fn a_key_routes_new_keys_land_whatever_rows_the_target_already_holds() {
    let redis = Redis::start();
    let mut r = redis.client();
    let pg = Cluster::start(&redis, KEYS);
    pg.execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, age int);
         INSERT INTO users VALUES (2, 'stale', 1), (250, 'stale', 1), (1000, 'not in Redis', 1);
         SELECT redis_sync_add_key_route('users', 'user:*', 'users',
             '{\"id\": \"$key_part 1\", \"name\": \"name\", \"age\": \"age\"}', '{id}', 'ignore');",
    );
    let mut p = redis::pipe();
    for i in 1..=500 {
        let age = if i == 77 { "old".to_string() } else { i.to_string() };
        p.cmd("HSET")
            .arg(format!("user:{i}"))
            .arg("name")
            .arg(format!("n{i}"))
            .arg("age")
            .arg(age)
            .ignore();
    }
    let _: () = p.query(&mut r).expect("HSET");
    assert!(pg.wait_until_running());
    // 499 keys (user:77's age is no int) and the row Redis never had.
    pg.wait_number("SELECT count(*) FROM users WHERE name <> 'stale'", 500, T);
    wait_for("user:77 reported", T, || {
        pg.query_text("SELECT last_error FROM redis_sync_routes() WHERE name = 'users'")
            .filter(|e| e.contains("user:77"))
    });
    assert_eq!(
        pg.number(
            "SELECT count(*) FROM users WHERE id BETWEEN 1 AND 500 AND name = 'n' || id AND age = id"
        ),
        499,
        "every key's row as Redis has it"
    );
    assert_eq!(pg.number("SELECT count(*) FROM users WHERE id = 77"), 0);
    // A key added later is new to the worker: it lands too, beside rows it knows.
    let _: i64 = redis::cmd("HSET")
        .arg("user:501")
        .arg("name")
        .arg("n501")
        .arg("age")
        .arg("501")
        .query(&mut r)
        .expect("HSET");
    pg.wait_number("SELECT count(*) FROM users WHERE id = 501 AND name = 'n501'", 1, T);
}

#[test]
fn a_route_that_cannot_work_is_refused_up_front_with_a_clear_error() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[("redis_sync.role", "syncer")]);
    pg.execute(
        "CREATE ROLE syncer LOGIN;
         CREATE TABLE t (id bigint PRIMARY KEY, name text, at timestamptz, n int);
         CREATE TABLE nokey (id bigint, name text);
         CREATE TABLE u (id uuid PRIMARY KEY);
         GRANT INSERT, UPDATE, SELECT, DELETE ON u TO syncer;
         GRANT INSERT, UPDATE, SELECT, DELETE ON t TO syncer;
         SELECT redis_sync_add_key_route('first', 'user:*', 't', '{\"id\": \"$key_part 1\"}', '{id}');",
    );
    let refused = |sql: &str| -> (String, String) {
        match pg.client().batch_execute(sql) {
            Ok(()) => panic!("{sql}: accepted"),
            Err(e) => {
                let db = e.as_db_error().expect("an error of the server");
                (db.code().code().to_owned(), db.message().to_owned())
            }
        }
    };
    let cases: &[(&str, &str, &str)] = &[
        ("SELECT redis_sync_add_stream_route('a', 's', 't', '{\"nope\": \"f\"}')", "42703", "has no column \"nope\""),
        ("SELECT redis_sync_add_stream_route('a', 's', 't', '{\"id\": \"$key\"}')", "22023", "$key belongs to key routes"),
        ("SELECT redis_sync_add_stream_route('a', 's', 't', '{\"id\": \"$nope\"}')", "22023", "is no meta value"),
        ("SELECT redis_sync_add_stream_route('a', 's', 't', '[1]')", "22023", "must be a JSON object"),
        ("SELECT redis_sync_add_stream_route('a', 's', 't', '{\"id\": \"$id\"}', 'sometimes')", "22023", "conflict must be"),
        ("SELECT redis_sync_add_stream_route('a', 's', 'nokey', '{\"id\": \"$id\"}', 'update')", "22023", "needs a primary key or unique constraint"),
        ("SELECT redis_sync_add_stream_route('a', 's', 'nokey', '{\"id\": \"$id\"}')", "42501", "GRANT INSERT (id) ON public.nokey TO syncer"),
        ("SELECT redis_sync_add_key_route('a', 'k:*', 't', '{\"name\": \"name\"}', '{name}')", "42P10", "no unique constraint on exactly (name)"),
        ("SELECT redis_sync_add_key_route('a', 'k:*', 't', '{\"id\": \"$key_part 2\"}', '{id}')", "22023", "has 1 wildcard"),
        ("SELECT redis_sync_add_key_route('a', 'k:*', 't', '{\"id\": \"$key_part 1\"}', '{id}', 'mark:name')", "22023", "needs a timestamptz column"),
        ("SELECT redis_sync_add_key_route('a', 'k:*', 't', '{\"id\": \"$key_part 1\"}', '{id}', 'sometimes')", "22023", "deletes must be"),
        ("SELECT redis_sync_add_key_route('a', 'k:*', 't', '{\"name\": \"$key\", \"id\": \"n\"}', '{id}')", "22023", "must give back the Redis key"),
        ("SELECT redis_sync_add_key_route('a', 'user:*', 't', '{\"id\": \"$key_part 1\"}', '{id}')", "42710", "route \"first\" already claims the pattern \"user:*\""),
        ("SELECT redis_sync_add_key_route('first', 'other:*', 't', '{\"id\": \"$key_part 1\"}', '{id}')", "42710", "exists already: drop it first"),
        ("SELECT redis_sync_add_stream_route('a b', 's', 't', '{\"id\": \"$id\"}')", "22023", "route name"),
        ("SELECT redis_sync_add_stream_route('a', 's', 'pg_class', '{\"relname\": \"$id\"}')", "22023", "not a table a route may write"),
        ("SELECT redis_sync_add_key_route('a', 'k:*', 't', '{\"id\": \"$key_part 1\", \"at\": \"x\"}', '{id}', 'mark:at')", "22023", "which columns maps too"),
        ("SELECT redis_sync_add_key_route('a', 'k:*', 'u', '{\"id\": \"$key_part 1\"}', '{id}')", "22023", "whose text does not give the Redis key back exactly"),
    ];
    for (sql, code, says) in cases {
        let (got_code, message) = refused(sql);
        assert!(message.contains(says), "{sql}: {message}");
        assert_eq!(&got_code, code, "{sql}: {message}");
    }
    // A grantee of the function may not route into a table it may not write itself.
    pg.execute(
        "CREATE ROLE outsider LOGIN;
         GRANT USAGE ON SCHEMA redis_sync TO outsider;
         GRANT SELECT, INSERT ON redis_sync.routes TO outsider;
         GRANT EXECUTE ON FUNCTION redis_sync_add_stream_route(text, text, regclass, jsonb, text) TO outsider;",
    );
    let err = pg
        .client_as("outsider")
        .batch_execute("SELECT redis_sync_add_stream_route('o', 'o', 't', '{\"id\": \"$id\"}')")
        .expect_err("refused");
    let db = err.as_db_error().expect("an error of the server");
    assert_eq!(db.code().code(), "42501", "{}", db.message());
    assert!(db.message().contains("may not INSERT the target table yourself"), "{}", db.message());
    assert_eq!(pg.number("SELECT count(*) FROM redis_sync.routes"), 1);
}

#[test]
fn a_stream_route_that_updates_takes_the_last_of_two_entries_of_one_key_in_a_read() {
    let redis = Redis::start();
    let mut r = redis.client();
    let pg = Cluster::start(&redis, FAST);
    pg.execute(
        "CREATE TABLE latest (device text PRIMARY KEY, hr int, entry_id text);
         SELECT redis_sync_add_stream_route('latest', 'dev-*', 'latest',
             '{\"device\": \"$stream\", \"hr\": \"hr\", \"entry_id\": \"$id\"}', 'update');",
    );
    assert!(pg.wait_until_running());
    let first = xadd(&mut r, "dev-1", &[("hr", b"60")]);
    pg.wait_number(&format!("SELECT count(*) FROM latest WHERE entry_id = '{first}'"), 1, T);
    // Two entries of one device in one read: the row takes the last, nothing is held.
    let added: Vec<String> = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg("dev-1")
        .arg("*")
        .arg("hr")
        .arg("61")
        .cmd("XADD")
        .arg("dev-1")
        .arg("*")
        .arg("hr")
        .arg("62")
        .query(&mut r)
        .expect("MULTI XADD");
    pg.wait_number(&format!("SELECT count(*) FROM latest WHERE entry_id = '{}'", added[1]), 1, T);
    assert_eq!(pg.number("SELECT hr FROM latest WHERE device = 'dev-1'"), 62);
    let after = xadd(&mut r, "dev-1", &[("hr", b"63")]);
    pg.wait_number(&format!("SELECT count(*) FROM latest WHERE entry_id = '{after}'"), 1, T);
    wait_for("nothing pending", T, || {
        (pending(&mut r, "dev-1", "redis-pg-sync") == 0).then_some(())
    });
    assert_eq!(pg.number("SELECT count(*) FROM latest"), 1);
}

#[test]
fn a_worker_role_with_grants_on_its_target_alone_lands_through_a_route_with_landing_records() {
    let redis = Redis::start();
    let mut r = redis.client();
    let mut settings = FAST.to_vec();
    settings.push(("redis_sync.role", "syncer"));
    let pg = Cluster::start(&redis, &settings);
    // The role may write its target and make the stream tables; nothing in redis_sync.
    pg.execute(
        "CREATE ROLE syncer LOGIN;
         GRANT USAGE, CREATE ON SCHEMA public TO syncer;
         CREATE TABLE readings (device text, hr int, entry_id text);
         GRANT SELECT, INSERT ON readings TO syncer;
         SELECT redis_sync_add_stream_route('readings', 'dev-*', 'readings',
             '{\"device\": \"device\", \"hr\": \"hr\", \"entry_id\": \"$id\"}');",
    );
    let ids: Vec<String> = (0..3)
        .map(|i| {
            xadd(&mut r, "dev-1", &[("device", b"d1"), ("hr", format!("{}", 60 + i).as_bytes())])
        })
        .collect();
    // Their landing records are written in the same transaction: had they been refused,
    // no row would be there.
    pg.wait_number("SELECT count(*) FROM readings", 3, T);
    assert_once(&pg, "readings", "entry_id", &ids);
    assert_eq!(
        pg.query_text("SELECT last_error FROM redis_sync_routes() WHERE name = 'readings'"),
        None
    );
    assert_eq!(
        pg.number("SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = 'syncer' AND table_schema = 'redis_sync'"),
        0,
        "the role was granted nothing on the extension's own tables"
    );
}

#[test]
fn an_unnest_a_user_made_in_public_is_never_run_by_the_worker() {
    let redis = Redis::start();
    let mut r = redis.client();
    let pg = Cluster::start(&redis, FAST);
    // A role that may create in public shadows the built-in unnest for text arrays with one
    // that makes it a superuser when a superuser runs it.
    pg.execute(
        "CREATE ROLE attacker LOGIN;
         GRANT CREATE ON SCHEMA public TO attacker;
         CREATE TABLE readings (device text, hr int, entry_id text);
         SELECT redis_sync_add_stream_route('readings', 'dev-*', 'readings',
             '{\"device\": \"device\", \"hr\": \"hr\", \"entry_id\": \"$id\"}');
         CREATE TABLE latest (device text PRIMARY KEY, hr int);
         SELECT redis_sync_add_stream_route('latest', 'last-*', 'latest',
             '{\"device\": \"device\"}', 'update');",
    );
    pg.client_as("attacker")
        .batch_execute(
            "CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
             BEGIN
               IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                 EXECUTE 'ALTER ROLE attacker SUPERUSER';
               END IF;
               RETURN QUERY SELECT x FROM pg_catalog.unnest(a) AS x;
             END $$;",
        )
        .expect("the attacker's function");
    // Landing records (a table without a unique key) and an upsert of one mapped column.
    let ids: Vec<String> = (0..3)
        .map(|i| {
            xadd(&mut r, "dev-1", &[("device", b"d1"), ("hr", format!("{}", 60 + i).as_bytes())])
        })
        .collect();
    xadd(&mut r, "last-1", &[("device", b"d1")]);
    xadd(&mut r, "last-1", &[("device", b"d1")]);
    pg.wait_number("SELECT count(*) FROM readings", 3, T);
    pg.wait_number("SELECT count(*) FROM latest", 1, T);
    assert_once(&pg, "readings", "entry_id", &ids);
    assert_eq!(
        pg.query_text("SELECT rolsuper::text FROM pg_roles WHERE rolname = 'attacker'").as_deref(),
        Some("false"),
        "the worker ran the attacker's unnest"
    );
}
