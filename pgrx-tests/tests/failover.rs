//! Several Postgres servers end to end: a primary and a streaming standby (both with the
//! extension preloaded), `redis_sync.ack_after = standby`, a standby that stops flushing, a
//! primary killed mid-drain with its standby promoted; and two servers sharing one consumer
//! group, one of them stopped mid-drain.

use std::time::{Duration, Instant};

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(60);

/// Rows of stream `stream` in the default stream table.
fn landed(pg: &Cluster, stream: &str) -> i64 {
    pg.try_query_text(&format!("SELECT count(*) FROM redis_streams WHERE stream_key = '{stream}'"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The IDs of stream `stream`'s rows, oldest first.
fn landed_ids(pg: &Cluster, stream: &str) -> Vec<String> {
    pg.client()
        .query("SELECT message_id FROM redis_streams WHERE stream_key = $1 ORDER BY id", &[&stream])
        .expect("IDs")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The IDs pending in the group for `stream`.
fn pending_ids(r: &mut redis::Connection, stream: &str) -> std::collections::HashSet<String> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(1_000_000)
        .query(r)
        .expect("XPENDING");
    rows.into_iter().map(|(id, ..)| id).collect()
}

#[test]
fn entries_are_acknowledged_only_once_the_standby_has_flushed_them() {
    let redis = Redis::start();
    let mut r = redis.client();
    let primary = Cluster::start(
        &redis,
        &[
            ("redis_sync.ack_after", "standby"),
            ("redis_sync.streams", "acked"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.key_value_auto_discovery", "off"),
        ],
    );
    assert!(primary.wait_until_running());
    let mut standby = Cluster::start_standby_of(&primary);
    primary.wait_streaming_standbys(1, T);

    // The standby keeps up: entries are acknowledged.
    add_entries(&mut r, "acked", 50);
    primary.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'acked'", 50, T);
    wait_for("the first entries acknowledged", T, || {
        (pending(&mut r, "acked", GROUP) == 0).then_some(())
    });

    // The standby stops flushing (its WAL receiver is stopped; it stays connected): what
    // lands on the primary stays pending in Redis, and reading pauses once the bound (a
    // hundred batches of 100, at least 10,000 entries) waits.
    let frozen = Frozen::new(standby.wal_receiver_pid());
    let total = 15_000;
    add_numbered(&mut r, "acked", 50..50 + total);
    let bound = 10_000;
    wait_for("the bound of waiting entries reached", T, || {
        let waiting: i64 = primary.status("acks_waiting")?.parse().ok()?;
        (waiting >= bound).then_some(())
    });
    let window = Instant::now() + Duration::from_secs(2);
    let mut checks = 0;
    while Instant::now() < window || checks < 10 {
        // Nothing landed since is acknowledged (every ID landed is pending); reading
        // stopped near the bound.
        let ids = landed_ids(&primary, "acked");
        let held = pending_ids(&mut r, "acked");
        let since_frozen = ids.len() as i64 - 50;
        let acked: Vec<&String> = ids.iter().skip(50).filter(|id| !held.contains(*id)).collect();
        assert!(acked.is_empty(), "{} landed since the freeze and acknowledged", acked.len());
        assert!(since_frozen < bound + 1_000, "reading did not pause: {since_frozen} landed");
        checks += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let since_frozen = landed(&primary, "acked") - 50;
    assert_eq!(primary.status("acks_waiting"), Some(since_frozen.to_string()));
    assert_eq!(
        primary.query_text("SELECT acks_waiting_since < now() FROM redis_sync_status()").as_deref(),
        Some("true")
    );

    // The standby catches up: everything lands and is acknowledged.
    drop(frozen);
    primary.wait_number(
        "SELECT count(*) FROM redis_streams WHERE stream_key = 'acked'",
        50 + total as i64,
        T,
    );
    wait_for("every entry acknowledged", T, || {
        (pending(&mut r, "acked", GROUP) == 0).then_some(())
    });
    primary.wait_status("acks_waiting", "0", T);

    // The standby stops, and no synchronous_standby_names is set: acknowledgements wait
    // 10 s (a standby that just left may be about to be promoted), then follow the local
    // flush, and the log says so.
    standby.stop();
    primary.wait_streaming_standbys(0, T);
    let added = Instant::now();
    add_entries(&mut r, "acked", 10);
    primary.wait_number(
        "SELECT count(*) FROM redis_streams WHERE stream_key = 'acked'",
        60 + total as i64,
        T,
    );
    assert_eq!(pending(&mut r, "acked", GROUP), 10, "acknowledged at once without a standby");
    primary.wait_status("acks_waiting", "10", T);
    wait_for("acknowledged after the local flush", T, || {
        (pending(&mut r, "acked", GROUP) == 0).then_some(())
    });
    assert!(added.elapsed() >= Duration::from_secs(10), "{:?}", added.elapsed());
    primary.wait_status("acks_waiting", "0", T);
    assert!(primary.log().contains("no standby has streamed for 10 s"), "{}", primary.log());
}

#[test]
fn a_promoted_standby_lands_every_entry_once_after_the_primary_is_killed_mid_drain() {
    for rep in 1..=5 {
        let started = Instant::now();
        let (lost, duplicated) = kill_and_promote("standby", 20_000, failover_lag(rep));
        eprintln!(
            "ack_after = standby, repetition {rep} (standby behind: {:?}): {lost} lost, {duplicated} duplicated ({:.1} s)",
            failover_lag(rep),
            started.elapsed().as_secs_f64()
        );
        assert_eq!((lost, duplicated), (0, 0), "repetition {rep}");
    }
}

#[test]
fn a_fast_stop_with_ack_after_standby_leaves_no_landed_entry_pending() {
    let redis = Redis::start();
    let mut r = redis.client();
    let mut primary = Cluster::start(
        &redis,
        &[
            ("redis_sync.ack_after", "standby"),
            ("redis_sync.streams", "stopped"),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.key_value_auto_discovery", "off"),
        ],
    );
    assert!(primary.wait_until_running());
    let _standby = Cluster::start_standby_of(&primary);
    primary.wait_streaming_standbys(1, T);
    let url = redis.url();
    let producer = std::thread::spawn(move || {
        let mut r = redis::Client::open(url).expect("url").get_connection().expect("connect");
        for start in (0..20_000).step_by(500) {
            add_numbered(&mut r, "stopped", start..start + 500);
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    wait_for("a quarter landed", T, || (landed(&primary, "stopped") >= 5_000).then_some(()));
    // `pg_ctl stop -m fast` mid-drain, the standby behind (the WAL sender stopped for the
    // last half second before the stop and the first after): the worker waits for the
    // standby to flush its last commits and acknowledges them; only what it had not landed
    // stays pending.
    let sender = Frozen::new(primary.number("SELECT pid FROM pg_stat_replication") as i32);
    std::thread::sleep(Duration::from_millis(500));
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(sender);
    });
    primary.stop();
    thaw.join().expect("thaw");
    producer.join().expect("producer");
    let held = pending_ids(&mut r, "stopped");
    primary.append_conf("redis_sync.enabled = off");
    primary.start_again();
    let ids = landed_ids(&primary, "stopped");
    let left: Vec<&String> = ids.iter().filter(|id| held.contains(*id)).collect();
    eprintln!(
        "fast stop: {} landed, {} pending, {} of them landed",
        ids.len(),
        held.len(),
        left.len()
    );
    assert!(
        left.is_empty(),
        "{} landed entries left pending: {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );
}

const SHARED: [&str; 4] = ["g0", "g1", "g2", "g3"];
const SHARED_BATCH: i64 = 500;

/// Two servers (two system identifiers, so two consumer names) syncing one group, both
/// paused until the entries are there, then both on until `landed` have landed.
fn two_servers(redis: &Redis, per_stream: usize, landed: i64) -> (Cluster, Cluster) {
    let mut r = redis.client();
    for s in SHARED {
        add_entries(&mut r, s, per_stream);
    }
    let batch = SHARED_BATCH.to_string();
    let settings = [
        ("redis_sync.enabled", "off"),
        ("redis_sync.rate_limit", "0"),
        ("redis_sync.batch_size", batch.as_str()),
        ("redis_sync.streams", "g0,g1,g2,g3"),
        ("redis_sync.claim_min_idle", "5s"),
        ("redis_sync.stream_discovery_interval", "1s"),
        ("redis_sync.key_value_auto_discovery", "off"),
    ];
    let a = Cluster::start(redis, &settings);
    let b = Cluster::start(redis, &settings);
    assert_ne!(a.consumer_name(), b.consumer_name());
    for pg in [&a, &b] {
        pg.execute("ALTER SYSTEM SET redis_sync.enabled = on");
    }
    a.reload();
    b.reload();
    wait_for(&format!("{landed} landed, on both servers"), T, || {
        let (na, nb) = (landed_all(&a), landed_all(&b));
        (na > 0 && nb > 0 && na + nb >= landed).then_some(())
    });
    (a, b)
}

/// The entry IDs (stream and ID) a server's table holds, with how many rows each.
fn held(pg: &Cluster) -> std::collections::HashMap<String, i64> {
    pg.client()
        .query(
            "SELECT stream_key || ' ' || message_id, count(*) FROM redis_streams GROUP BY 1",
            &[],
        )
        .expect("rows")
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect()
}

/// Once the group has nothing pending or unread: starts the stopped server `a` again with
/// the worker paused, and counts (rows of a, rows of b, distinct entries, entries both hold).
fn settle_and_count(redis: &Redis, a: &mut Cluster, b: &Cluster) -> (i64, i64, i64, i64) {
    let mut r = redis.client();
    wait_for("every entry read and acknowledged", 2 * T, || {
        SHARED.iter().all(|s| pending_and_lag(&mut r, 0, s) == (0, 0)).then_some(())
    });
    a.append_conf("redis_sync.enabled = off");
    a.start_again();
    let (of_a, of_b) = (held(a), held(b));
    let rows = |m: &std::collections::HashMap<String, i64>| m.values().sum::<i64>();
    let distinct = of_a.keys().chain(of_b.keys()).collect::<std::collections::HashSet<_>>().len();
    let both = of_a.keys().filter(|k| of_b.contains_key(*k)).count();
    (rows(&of_a), rows(&of_b), distinct as i64, both as i64)
}

#[test]
fn two_servers_share_a_group_and_a_fast_stop_mid_drain_repeats_nothing() {
    let redis = Redis::start();
    let (mut a, b) = two_servers(&redis, 50_000, 40_000);
    // `pg_ctl stop -m fast`: the worker acknowledges what it committed before it ends; what it
    // had read and not committed is claimed by the other server after claim_min_idle.
    a.stop();
    assert!(a.log().contains("committed entries acknowledged"), "{}", a.log());
    let (rows_a, rows_b, distinct, both) = settle_and_count(&redis, &mut a, &b);
    eprintln!(
        "fast stop: server a {rows_a} rows, server b {rows_b}, {distinct} distinct of 200000, {both} in both"
    );
    assert!(rows_a > 0 && rows_b > 0, "both got a share: {rows_a} and {rows_b}");
    assert_eq!(distinct, 200_000, "lost: {}", 200_000 - distinct);
    assert_eq!(rows_a + rows_b - distinct, 0, "duplicated across the two servers");
}

#[test]
fn after_an_immediate_stop_the_entries_both_servers_hold_are_few_and_reported() {
    let redis = Redis::start();
    let (mut a, b) = two_servers(&redis, 50_000, 100_000);
    // `pg_ctl stop -m immediate`: no last acknowledgements. What the crashed server had
    // committed, flushed and not yet acknowledged is claimed and stored by the other too.
    a.stop_immediate();
    let (rows_a, rows_b, distinct, both) = settle_and_count(&redis, &mut a, &b);
    let one_read = SHARED_BATCH * SHARED.len() as i64;
    eprintln!(
        "immediate stop: server a {rows_a} rows, server b {rows_b}, {distinct} distinct of 200000, {both} in both (one read is at most {one_read})"
    );
    assert_eq!(distinct, 200_000, "lost: {}", 200_000 - distinct);
    // Those are the entries whose commit was flushed and whose acknowledgement had not gone
    // yet: it rides on the next read (a read is sent ahead while a batch is written), and
    // the flushes come in groups (the WAL writer's), so a few reads' worth (0 to 6,000
    // here). Ten reads' worth, under half of what the crashed server landed, fails:
    // acknowledgements no longer go promptly.
    assert!(both <= 10 * one_read, "{both} entries in both tables");
    assert!(rows_a > 2 * 10 * one_read, "the crashed server landed too little to tell: {rows_a}");
}

/// Rows in a server's stream table (0 while it cannot be asked).
fn landed_all(pg: &Cluster) -> i64 {
    pg.try_query_text("SELECT count(*) FROM redis_streams")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
