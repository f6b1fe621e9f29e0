//! Failures stay where they started, with real processes: a trigger refusing every row, a
//! lone bad entry, a stream that becomes another type, a consumer group that cannot be
//! created, entries trimmed while pending, a delete that fails to commit, discovery in
//! monitor mode, a database that is not UTF8, keys too big to mirror.

use std::time::{Duration, Instant};

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(90);

const FAST: &[(&str, &str)] = &[
    ("redis_sync.rate_limit", "0"),
    ("redis_sync.stream_discovery_interval", "1s"),
    ("redis_sync.key_value_auto_discovery", "off"),
];

fn dead_letters(pg: &Cluster) -> i64 {
    pg.number("SELECT count(*) FROM redis_sync_dead_letters")
}

fn stream_rows(pg: &Cluster, key: &str) -> i64 {
    pg.number(&format!("SELECT count(*) FROM redis_streams WHERE stream_key = '{key}'"))
}

/// `state` and `last_error` of a tracked stream in `redis_sync_streams()`.
fn stream_state(pg: &Cluster, key: &str) -> Option<(String, String)> {
    let state = pg.try_query_text(&format!(
        "SELECT state FROM redis_sync_streams() WHERE stream_key = '{key}'"
    ))?;
    let error = pg
        .try_query_text(&format!(
            "SELECT coalesce(last_error, '') FROM redis_sync_streams() WHERE stream_key = '{key}'"
        ))
        .unwrap_or_default();
    Some((state, error))
}

fn xadd(r: &mut redis::Connection, stream: &str, field: &str, value: &str) -> String {
    redis::cmd("XADD").arg(stream).arg("*").arg(field).arg(value).query(r).expect("XADD")
}

/// A trigger on the stream table refusing every row (as during a maintenance window).
const REFUSE_ALL: &str = "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
      $$BEGIN RAISE EXCEPTION 'maintenance window'; END$$;
    CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON redis_streams
      FOR EACH ROW EXECUTE FUNCTION refuse()";

/// A trigger on the stream table refusing the rows whose `bad` field is `yes`.
const PICKY: &str = "CREATE FUNCTION picky() RETURNS trigger LANGUAGE plpgsql AS
      $$BEGIN IF NEW.data->>'bad' = 'yes' THEN RAISE EXCEPTION 'bad order'; END IF;
              RETURN NEW; END$$;
    CREATE TRIGGER picky BEFORE INSERT ON redis_streams
      FOR EACH ROW EXECUTE FUNCTION picky()";

#[test]
fn a_trigger_refusing_every_write_holds_entries_in_redis_until_it_goes() {
    let redis = Redis::start();
    let mut r = redis.client();
    let first = xadd(&mut r, "events", "n", "first");
    let pg = Cluster::start_defaults(&redis, &[]);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    pg.execute(REFUSE_ALL);
    // 30 s at 1,000 entries/s, every one refused.
    let mut ids = produce_batched(redis.port, &[(0, "events".to_owned())], 1000, 30.0);
    let added: usize = ids.values().map(Vec::len).sum();
    assert_eq!(added, 30_000);
    // Nothing dead-lettered, nothing acknowledged: all of it is still in Redis's hands
    // (pending in the group, or not yet delivered).
    let (pending, lag) = pending_and_lag(&mut r, 0, "events");
    assert_eq!(dead_letters(&pg), 0, "no dead letters while every row is refused");
    assert_eq!(pending + lag, added as i64, "nothing acknowledged (pending {pending}, lag {lag})");
    assert_eq!(pg.number("SELECT count(*) FROM redis_streams"), 1);
    let error = pg.status("last_error").unwrap_or_default();
    assert!(error.contains("maintenance window") && error.contains("every row"), "{error}");
    // The trigger goes: every entry lands within 10 s.
    let dropped = Instant::now();
    pg.execute("DROP TRIGGER refuse ON redis_streams");
    pg.wait_number("SELECT count(*) FROM redis_streams", added as i64 + 1, Duration::from_secs(10));
    eprintln!("all {added} entries landed {:?} after the trigger was dropped", dropped.elapsed());
    ids.entry((0, "events".to_owned())).or_default().push(first);
    assert_eq!(lost_and_duplicated(&pg, &mut r, &ids), (0, 0));
    assert_eq!(dead_letters(&pg), 0);
}

#[test]
fn a_lone_refused_entry_waits_for_proof_then_is_dead_lettered_and_replayed() {
    let redis = Redis::start();
    let mut r = redis.client();
    xadd(&mut r, "orders", "n", "0");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    pg.execute(PICKY);
    let bad = xadd(&mut r, "orders", "bad", "yes");
    // Alone, it proves nothing about the table: it waits in Redis, not in dead letters.
    wait_for("the refusal to be reported", T, || {
        let e = pg.status("last_error")?;
        (e.contains("bad order") && e.contains("every row")).then_some(())
    });
    assert_eq!(dead_letters(&pg), 0);
    assert_eq!(pending(&mut r, "orders", GROUP), 1, "the lone entry is not acknowledged");
    // A good entry shows the table takes rows: the bad one is dead-lettered.
    xadd(&mut r, "orders", "n", "1");
    pg.wait_number("SELECT count(*) FROM redis_streams", 2, T);
    pg.wait_number("SELECT count(*) FROM redis_sync_dead_letters", 1, T);
    wait_for("nothing pending", T, || (pending(&mut r, "orders", GROUP) == 0).then_some(()));
    assert_eq!(
        pg.query_text("SELECT message_id FROM redis_sync_dead_letters").as_deref(),
        Some(bad.as_str())
    );
    // Replayed while still refused: it stays, with one more attempt.
    assert_eq!(
        pg.query_text("SELECT landed || '/' || stayed FROM redis_sync_replay_dead_letters()")
            .as_deref(),
        Some("0/1")
    );
    assert_eq!(pg.number("SELECT attempts FROM redis_sync_dead_letters"), 2);
    // Fixed, then replayed: it lands and leaves the dead letters.
    pg.execute("DROP TRIGGER picky ON redis_streams");
    assert_eq!(
        pg.query_text(
            "SELECT landed || '/' || stayed FROM redis_sync_replay_dead_letters('orders')"
        )
        .as_deref(),
        Some("1/0")
    );
    assert_eq!(dead_letters(&pg), 0);
    assert_eq!(
        pg.number(&format!(
            "SELECT count(*) FROM redis_streams WHERE message_id = '{bad}' AND data->>'bad' = 'yes'"
        )),
        1
    );
    assert_eq!(pg.status("dead_letters_stored").as_deref(), Some("0"));
}

#[test]
fn a_stream_that_becomes_another_type_stops_only_itself() {
    let redis = Redis::start();
    let mut r = redis.client();
    xadd(&mut r, "a", "n", "0");
    xadd(&mut r, "b", "n", "0");
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            // No discovery meanwhile: the reads themselves find the key of another type.
            ("redis_sync.stream_discovery_interval", "1h"),
            ("redis_sync.key_value_auto_discovery", "off"),
            ("redis_sync.stream_auto_discovery", "off"),
            ("redis_sync.streams", "a,b"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams", 2, T);
    // Both streams idle, so the read of this database blocks on both when the key changes;
    // at once (MULTI), so that no group can be made again on an empty key in between.
    let _: () = redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg("a")
        .ignore()
        .cmd("SET")
        .arg("a")
        .arg("not a stream")
        .ignore()
        .query(&mut r)
        .expect("DEL + SET");
    // The other stream of the same database goes on.
    add_entries(&mut r, "b", 500);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'b'", 501, T);
    wait_for("a in state error", T, || {
        let (state, error) = stream_state(&pg, "a")?;
        (state == "error" && error.contains("WRONGTYPE")).then_some(())
    });
    add_entries(&mut r, "b", 500);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'b'", 1001, T);
    assert_eq!(pg.status("state").as_deref(), Some("running"));
    // A stream again: read again once discovery looks (asked for here, not waited for).
    let _: () = redis::cmd("DEL").arg("a").query(&mut r).expect("DEL");
    xadd(&mut r, "a", "n", "again");
    pg.execute("SELECT * FROM redis_sync_discover()");
    wait_for("a read again", T, || (stream_rows(&pg, "a") == 2).then_some(()));
    wait_for("a active", T, || (stream_state(&pg, "a")?.0 == "active").then_some(()));
}

#[test]
fn a_consumer_group_that_cannot_be_created_is_shown_in_error() {
    let redis = Redis::start();
    let mut r = redis.client();
    // A user that may read streams but not create groups.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("reader")
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-xgroup|create")
        .query(&mut r)
        .expect("ACL SETUSER");
    xadd(&mut r, "locked", "n", "0");
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_discovery_interval", "1s"),
            ("redis_sync.key_value_auto_discovery", "off"),
            ("redis_sync.redis_username", "reader"),
            ("redis_sync.redis_password", "secret"),
        ],
    );
    wait_for("the stream in state error", T, || {
        let (state, error) = stream_state(&pg, "locked")?;
        (state == "error" && error.contains("NOPERM")).then_some(())
    });
    // Once the user may create groups, the stream syncs.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("reader")
        .arg("+xgroup|create")
        .query(&mut r)
        .expect("ACL SETUSER");
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'locked'", 1, T);
    wait_for("the stream active", T, || (stream_state(&pg, "locked")?.0 == "active").then_some(()));
}

#[test]
fn entries_trimmed_while_pending_are_counted_as_lost() {
    let redis = Redis::start();
    let mut r = redis.client();
    xadd(&mut r, "trimmed", "n", "first");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    pg.execute(REFUSE_ALL);
    add_entries(&mut r, "trimmed", 50);
    // Delivered and held pending while every write is refused ...
    wait_for("entries pending", T, || (pending(&mut r, "trimmed", GROUP) == 50).then_some(()));
    // ... then trimmed away before they could land.
    let _: () =
        redis::cmd("XTRIM").arg("trimmed").arg("MAXLEN").arg(0).query(&mut r).expect("XTRIM");
    pg.execute("DROP TRIGGER refuse ON redis_streams");
    wait_for("the loss counted", T, || {
        let lost = pg.try_query_text(
            "SELECT entries_lost FROM redis_sync_streams() WHERE stream_key = 'trimmed'",
        )?;
        (lost == "50").then_some(())
    });
    assert_eq!(pg.status("entries_lost").as_deref(), Some("50"));
    wait_for("nothing pending", T, || (pending(&mut r, "trimmed", GROUP) == 0).then_some(()));
    assert!(pg.log().contains("were deleted from the stream"), "logged: {}", pg.log());
    // The stream goes on.
    xadd(&mut r, "trimmed", "n", "after");
    pg.wait_number("SELECT count(*) FROM redis_streams", 2, T);
}

#[test]
fn discovery_answers_in_monitor_mode() {
    let redis = Redis::start();
    let mut r = redis.client();
    xadd(&mut r, "watched", "n", "0");
    let pg = Cluster::start(
        &redis,
        &[("redis_sync.mode", "monitor"), ("redis_sync.key_value_auto_discovery", "off")],
    );
    assert!(pg.wait_until_running(), "log:\n{}", pg.log());
    let t0 = Instant::now();
    let found = pg.query_text("SELECT string_agg(stream_key, ',') FROM redis_sync_discover()");
    assert_eq!(found.as_deref(), Some("watched"));
    assert!(t0.elapsed() < Duration::from_secs(10), "answered in {:?}", t0.elapsed());
    assert_eq!(
        pg.query_text("SELECT to_regclass('redis_streams') IS NULL").as_deref(),
        Some("true"),
        "monitor mode writes nothing"
    );
    // After a worker restart, a call waits for a discovery of the new worker, not for the
    // old worker's generation.
    let pid = pg.worker_pid().expect("worker");
    pg.execute(&format!("SELECT pg_terminate_backend({pid})"));
    wait_for("a new worker", T, || pg.worker_pid().filter(|p| *p != pid));
    let t0 = Instant::now();
    let found = pg.query_text("SELECT string_agg(stream_key, ',') FROM redis_sync_discover()");
    assert_eq!(found.as_deref(), Some("watched"));
    assert!(t0.elapsed() < Duration::from_secs(10), "answered in {:?}", t0.elapsed());
}

#[test]
fn a_database_that_is_not_utf8_is_refused_with_its_encoding() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[("redis_sync.database", "latin")]);
    pg.execute("CREATE DATABASE latin ENCODING 'LATIN1' LOCALE 'C' TEMPLATE template0");
    wait_for("the refusal", T, || {
        let e = pg.status("last_error")?;
        (e.contains("LATIN1") && e.contains("UTF8")).then_some(())
    });
    assert!(pg.log().contains("its encoding is LATIN1"), "log:\n{}", pg.log());
    assert_ne!(pg.status("state").as_deref(), Some("running"));
}

#[test]
fn a_notified_delete_that_fails_is_not_forgotten() {
    let redis = Redis::start_with(&["--notify-keyspace-events", "KEA"]);
    let mut r = redis.client();
    let _: () = redis::cmd("SET").arg("doomed").arg("v").query(&mut r).expect("SET");
    let _: () = redis::cmd("SET").arg("other").arg("v").query(&mut r).expect("SET");
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_auto_discovery", "off"),
            ("redis_sync.key_value_patterns", "*"),
            ("redis_sync.sync_interval", "1s"),
            ("redis_sync.key_value_verify_interval", "1h"),
            ("redis_sync.key_value_deletes", "delete"),
        ],
    );
    let live = "SELECT count(*) FROM redis_key_values WHERE redis_key = 'doomed'";
    pg.wait_number(live, 1, T);
    pg.execute(
        "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN RAISE EXCEPTION 'not now'; END$$;
         CREATE TRIGGER keep BEFORE DELETE ON redis_key_values
           FOR EACH ROW EXECUTE FUNCTION keep()",
    );
    let _: () = redis::cmd("DEL").arg("doomed").query(&mut r).expect("DEL");
    wait_for("the failed delete reported", T, || {
        pg.status("last_error").filter(|e| e.contains("not now")).map(|_| ())
    });
    assert_eq!(pg.number(live), 1);
    pg.execute("DROP TRIGGER keep ON redis_key_values");
    // The next pass (not a verifying one) still knows the key was live, looks, and deletes.
    pg.wait_number(live, 0, Duration::from_secs(30));
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values WHERE redis_key = 'other'"), 1);
}

#[test]
fn keys_too_big_are_skipped_and_reported_and_big_ones_do_not_stall_the_worker() {
    let redis = Redis::start();
    let mut r = redis.client();
    // A 500,000-field hash (about 10 MB: mirrored) and a 5,000,000-member sorted set (over
    // the default limit: skipped).
    load_big_keys(&mut r);
    let _: () = redis::cmd("SET").arg("small").arg("v").query(&mut r).expect("SET");
    xadd(&mut r, "live", "n", "0");
    let mut pg = Cluster::start_defaults(&redis, &[("redis_sync.key_value_patterns", "*")]);
    pg.wait_number(
        "SELECT count(*) FROM redis_key_values WHERE redis_key IN ('small', 'big-hash')",
        2,
        Duration::from_secs(120),
    );
    assert_eq!(
        pg.number(
            "SELECT count(*) FROM redis_key_values, jsonb_object_keys(redis_value::jsonb)
              WHERE redis_key = 'big-hash'"
        ),
        500_000
    );
    wait_for("the sorted set reported", T, || {
        pg.try_query_text(
            "SELECT value_type || ' ' || (bytes > 64 * 1024 * 1024)
               FROM redis_sync_skipped_keys() WHERE redis_key = 'huge-zset'",
        )
        .filter(|v| v == "zset true")
    });
    assert_eq!(pg.number("SELECT count(*) FROM redis_key_values WHERE redis_key = 'huge-zset'"), 0);
    assert_eq!(pg.status("key_values_skipped").as_deref(), Some("1"));
    assert!(pg.log().contains("huge-zset"), "reported in the log");
    // Streams keep landing meanwhile, and the key-value worker's own memory stays small.
    xadd(&mut r, "live", "n", "1");
    pg.wait_number("SELECT count(*) FROM redis_streams", 2, T);
    let pid = pg.kv_worker_pid().expect("key-value worker pid");
    let rss = rss_anon_kb(pid).expect("RssAnon");
    assert!(rss <= 256 * 1024, "key-value worker RssAnon {rss} KiB");
    // A verifying pass over the big hash does not keep the worker from stopping.
    pg.execute("ALTER SYSTEM SET redis_sync.key_value_verify_interval = '1s'");
    pg.reload();
    let passes = pg.number("SELECT key_value_passes FROM redis_sync_status()");
    // Two verifying passes done: they run back to back (each takes longer than
    // sync_interval), so the stop comes during the next one.
    wait_for("verifying passes back to back", T, || {
        (pg.number("SELECT key_value_passes FROM redis_sync_status()") >= passes + 2).then_some(())
    });
    let t0 = Instant::now();
    pg.stop();
    assert!(t0.elapsed() <= Duration::from_secs(5), "stopped in {:?}", t0.elapsed());
}

#[test]
fn expiries_on_redis_6_2_come_from_pttl() {
    // Redis 6.2 has no PEXPIRETIME.
    let redis = Redis::start_binary(redis62_server_bin(), &[]);
    let mut r = redis.client();
    let info: String = redis::cmd("INFO").arg("server").query(&mut r).expect("INFO");
    assert!(info.contains("redis_version:6.2"), "{info}");
    let _: () =
        redis::cmd("SET").arg("ttl").arg("v").arg("PX").arg(600_000).query(&mut r).expect("SET");
    let _: () = redis::cmd("SET").arg("forever").arg("v").query(&mut r).expect("SET");
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_auto_discovery", "off"),
            ("redis_sync.sync_interval", "1s"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_key_values", 2, T);
    // Ten minutes from the write, to the second (the read's time plus the time to live).
    let off = pg.number(
        "SELECT abs(extract(epoch FROM expires_at - (now() + interval '10 minutes')))::int
           FROM redis_key_values WHERE redis_key = 'ttl'",
    );
    assert!(off <= 30, "expires_at off by {off} s");
    assert_eq!(
        pg.query_text(
            "SELECT expires_at IS NULL FROM redis_key_values WHERE redis_key = 'forever'"
        )
        .as_deref(),
        Some("true")
    );
    assert!(pg.log().contains("no PEXPIRETIME"), "said once in the log");
    // Later passes do not rewrite the key: the moment stays the same from pass to pass.
    let written =
        pg.number("SELECT xmin::text::bigint FROM redis_key_values WHERE redis_key = 'ttl'");
    let passes: i64 = pg.status("key_value_passes").and_then(|p| p.parse().ok()).unwrap_or(0);
    wait_for("three more passes", T, || {
        let now: i64 = pg.status("key_value_passes")?.parse().ok()?;
        (now >= passes + 3).then_some(())
    });
    assert_eq!(
        pg.number("SELECT xmin::text::bigint FROM redis_key_values WHERE redis_key = 'ttl'"),
        written
    );
}

#[test]
fn a_group_destroyed_under_load_is_made_again_without_a_reconnect() {
    let redis = Redis::start();
    let mut r = redis.client();
    let first = xadd(&mut r, "g", "n", "first");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    let port = redis.port;
    let producer = std::thread::spawn(move || produce(port, &[(0, "g".to_owned())], 500, 6.0));
    // Under load, every read carries the acknowledgements of the last batch (a pipeline).
    wait_for("the load under way", T, || {
        (pg.number("SELECT count(*) FROM redis_streams") > 300).then_some(())
    });
    let connections = connections_received(&mut r);
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg("g")
        .arg(GROUP)
        .query(&mut r)
        .expect("XGROUP DESTROY");
    let mut ids = producer.join().expect("producer");
    ids.entry((0, "g".to_owned())).or_default().push(first);
    assert_eq!(lost_and_duplicated(&pg, &mut r, &ids), (0, 0));
    // NOGROUP is the stream's error, not a lost connection: the worker did not reconnect.
    let now = connections_received(&mut r);
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut r).expect("CLIENT LIST");
    assert_eq!(now, connections, "no new connection to Redis; clients now:\n{clients}");
    let error = pg.status("last_error").unwrap_or_default();
    assert!(!error.contains("connection"), "{error}");
}

#[test]
fn a_full_dead_letter_table_holds_refusals_in_redis() {
    let redis = Redis::start();
    let mut r = redis.client();
    xadd(&mut r, "orders", "n", "0");
    let mut settings = FAST.to_vec();
    settings.push(("redis_sync.dead_letter_max", "1"));
    let pg = Cluster::start(&redis, &settings);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    pg.execute(PICKY);
    // The first refused entry fills the dead-letter table ...
    xadd(&mut r, "orders", "bad", "yes");
    xadd(&mut r, "orders", "n", "1");
    pg.wait_number("SELECT count(*) FROM redis_sync_dead_letters", 1, T);
    pg.wait_number("SELECT count(*) FROM redis_streams", 2, T);
    // ... so the next waits in Redis, unacknowledged, while the good entries land.
    let held = xadd(&mut r, "orders", "bad", "yes");
    xadd(&mut r, "orders", "n", "2");
    pg.wait_number("SELECT count(*) FROM redis_streams", 3, T);
    wait_for("the limit reported", T, || {
        pg.status("last_error").filter(|e| e.contains("dead_letter_max")).map(|_| ())
    });
    assert_eq!(dead_letters(&pg), 1);
    assert!(pending(&mut r, "orders", GROUP) >= 1, "the held entry is not acknowledged");
    // Room made by hand: the held entry goes to dead letters.
    pg.execute("DELETE FROM redis_sync_dead_letters");
    wait_for("the held entry dead-lettered", T, || {
        let id = pg.try_query_text("SELECT message_id FROM redis_sync_dead_letters")?;
        (id == held).then_some(())
    });
    wait_for("nothing pending", T, || (pending(&mut r, "orders", GROUP) == 0).then_some(()));
}

/// How many times Redis delivered entry `id` of `stream` to our group (0 when not pending).
fn deliveries(r: &mut redis::Connection, stream: &str, id: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg(id)
        .arg(id)
        .arg(1)
        .query(r)
        .expect("XPENDING");
    let redis::Value::Array(entries) = v else { return 0 };
    match entries.first() {
        Some(redis::Value::Array(e)) => match e.get(3) {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

#[test]
fn a_lone_refused_entry_lands_once_the_table_takes_it_even_with_nothing_after_it() {
    let redis = Redis::start();
    let mut r = redis.client();
    xadd(&mut r, "orders", "n", "0");
    let pg = Cluster::start(&redis, FAST);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    pg.execute(PICKY);
    let lone = xadd(&mut r, "orders", "bad", "yes");
    // Refused when read, and again when read back from the pending list (Redis counts the
    // deliveries): it now waits for proof.
    wait_for("two deliveries", T, || (deliveries(&mut r, "orders", &lone) >= 2).then_some(()));
    let e = pg.status("last_error").unwrap_or_default();
    assert!(e.contains("bad order"), "{e}");
    assert_eq!(dead_letters(&pg), 0);
    // The table is fixed; no entry comes after the lone one.
    pg.execute(
        "CREATE OR REPLACE FUNCTION picky() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN RETURN NEW; END$$",
    );
    pg.wait_number(
        &format!("SELECT count(*) FROM redis_streams WHERE message_id = '{lone}'"),
        1,
        T,
    );
    wait_for("nothing pending", T, || (pending(&mut r, "orders", GROUP) == 0).then_some(()));
    assert_eq!(dead_letters(&pg), 0);
}

#[test]
fn a_full_key_memory_still_mirrors_and_deletes_every_key() {
    let redis = Redis::start();
    let mut r = redis.client();
    for i in 0..100 {
        let _: () = redis::cmd("SET").arg(format!("k:{i}")).arg(i).query(&mut r).expect("SET");
    }
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_auto_discovery", "off"),
            ("redis_sync.sync_interval", "200ms"),
            ("redis_sync.key_value_verify_interval", "1h"),
            ("redis_sync.key_value_max_remembered", "10"),
        ],
    );
    let live = "SELECT count(*) FROM redis_key_values WHERE deleted_at IS NULL";
    pg.wait_number(live, 100, T);
    wait_for("the cap said in the log", T, || {
        pg.log().contains("remembers at most 10 keys").then_some(())
    });
    // Keys the memory does not hold are still compared and their deletions found.
    let _: () = redis::cmd("SET").arg("k:77").arg("changed").query(&mut r).expect("SET");
    let _: () = redis::cmd("DEL").arg("k:78").query(&mut r).expect("DEL");
    wait_for("the change mirrored", T, || {
        pg.try_query_text("SELECT redis_value FROM redis_key_values WHERE redis_key = 'k:77'")
            .filter(|v| v == "changed")
    });
    pg.wait_number(live, 99, T);
    assert_eq!(
        pg.number("SELECT count(*) FROM redis_key_values WHERE redis_key = 'k:78' AND deleted_at IS NOT NULL"),
        1
    );
}

#[test]
fn a_dead_letter_whose_acknowledgement_was_lost_is_not_stored_twice() {
    let redis = Redis::start();
    let mut r = redis.client();
    xadd(&mut r, "s", "n", "0");
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.key_value_auto_discovery", "off"),
            ("redis_sync.stream_auto_discovery", "off"),
            ("redis_sync.streams", "s"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams", 1, T);
    let group =
        pg.query_text("SELECT current_setting('redis_sync.consumer_group')").expect("group");
    let consumer = pg.consumer_name();
    pg.set("redis_sync.enabled", "off");
    pg.wait_status("state", "paused", T);
    // What a crash between a dead letter's commit and its XACK leaves: the entry still in
    // the worker's pending list, and stored as a dead letter.
    let id = xadd(&mut r, "s", "n", "1");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg(&consumer)
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg("s")
        .arg(">")
        .query(&mut r)
        .expect("XREADGROUP");
    pg.execute(&format!(
        "INSERT INTO redis_sync_dead_letters (stream_key, message_id, fields, error, sqlstate)
         VALUES ('s', '{id}', '{{\"n\": \"1\"}}', 'refused by a trigger', 'P0001')"
    ));
    // The table takes rows now: the re-read of the pending list acknowledges the entry
    // without storing it a second time.
    pg.set("redis_sync.enabled", "on");
    wait_for("the pending entry acknowledged", T, || {
        let summary: Vec<redis::Value> =
            redis::cmd("XPENDING").arg("s").arg(&group).query(&mut r).ok()?;
        (summary.first() == Some(&redis::Value::Int(0))).then_some(())
    });
    xadd(&mut r, "s", "n", "2");
    pg.wait_number("SELECT count(*) FROM redis_streams", 2, T);
    assert_eq!(
        pg.number(&format!("SELECT count(*) FROM redis_streams WHERE message_id = '{id}'")),
        0
    );
    assert_eq!(dead_letters(&pg), 1);
    assert_eq!(
        pg.number("SELECT messages_synced FROM redis_sync_streams() WHERE stream_key = 's'"),
        2
    );
}
