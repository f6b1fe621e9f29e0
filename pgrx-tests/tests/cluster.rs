//! A Redis Cluster as the source: three primaries with a replica each, all real
//! `redis-server` processes made one cluster by `redis-cli --cluster create`.

use std::collections::BTreeSet;
use std::time::Duration;

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(120);
const GROUP: &str = "redis-pg-sync";
const STREAMS: usize = 30;
const PER_STREAM: usize = 10_000;

/// `n` entries numbered from `from` added to `stream` through the cluster client.
fn add(c: &mut redis::cluster::ClusterConnection, stream: &str, range: std::ops::Range<usize>) {
    for chunk in range.collect::<Vec<_>>().chunks(1000) {
        // One key per pipeline: the client sends it to that key's primary.
        let mut p = redis::cluster::cluster_pipe();
        for i in chunk {
            p.cmd("XADD").arg(stream).arg("*").arg("n").arg(*i).arg("s").arg(stream).ignore();
        }
        let _: () = p.query(c).expect("XADD");
    }
}

fn stream_names() -> Vec<String> {
    (0..STREAMS).map(|i| format!("orders:{i}")).collect()
}

/// Which primaries hold at least one of `keys` (by `CLUSTER KEYSLOT` on a node and the
/// node's own `CLUSTER NODES` view of who serves the slot).
fn primaries_holding(rc: &RedisCluster, keys: &[String]) -> BTreeSet<usize> {
    let mut held = BTreeSet::new();
    for i in rc.primaries() {
        let mut c = rc.nodes[i].client();
        for k in keys {
            let n: i64 = redis::cmd("EXISTS").arg(k).query(&mut c).unwrap_or(0);
            if n == 1 {
                held.insert(i);
            }
        }
    }
    held
}

fn pending_on(rc: &RedisCluster, stream: &str) -> i64 {
    let mut c = rc.client();
    let v: redis::Value =
        redis::cmd("XPENDING").arg(stream).arg(GROUP).query(&mut c).expect("XPENDING");
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

/// A Postgres pointed at the cluster with the streams routed into `landed`, a table without
/// a unique key (an entry stored twice shows as two rows there), then the worker started.
fn start_worker(rc: &RedisCluster, extra: &[(&str, &str)]) -> Cluster {
    let mut settings = vec![
        ("redis_sync.enabled", "off"),
        ("redis_sync.rate_limit", "0"),
        ("redis_sync.stream_discovery_interval", "1s"),
        ("redis_sync.key_value_auto_discovery", "off"),
    ];
    settings.extend_from_slice(extra);
    let pg = Cluster::start_on_cluster(rc, &settings);
    pg.execute(
        "CREATE TABLE landed (stream text, n int, entry_id text);
         SELECT redis_sync_add_stream_route('orders', 'orders:*', 'landed',
             '{\"stream\": \"$stream\", \"n\": \"n\", \"entry_id\": \"$id\"}');",
    );
    pg.set("redis_sync.enabled", "on");
    assert!(pg.wait_until_running());
    pg
}

/// Every entry of every stream in the table once, none missing, none twice; nothing left
/// pending in any stream's group.
fn check_exactly_once(pg: &Cluster, rc: &RedisCluster) {
    let total = (STREAMS * PER_STREAM) as i64;
    pg.wait_number("SELECT count(*) FROM landed", total, T);
    assert_eq!(
        pg.number("SELECT count(*) FROM (SELECT DISTINCT stream, entry_id FROM landed) d"),
        total,
        "an entry landed twice"
    );
    assert_eq!(
        pg.number("SELECT count(*) FROM (SELECT DISTINCT stream, n FROM landed) d"),
        total,
        "an entry is missing"
    );
    assert_eq!(pg.number("SELECT count(DISTINCT stream) FROM landed"), STREAMS as i64);
    for s in stream_names() {
        wait_for("nothing pending", T, || (pending_on(rc, &s) == 0).then_some(()));
    }
}

/// Every stream filled, every entry on a replica too (what the cluster keeps after a crash
/// is all), a worker started and a tenth of the entries landed.
fn drain_under_way(rc: &RedisCluster) -> (Cluster, i64) {
    let mut c = rc.client();
    for s in &stream_names() {
        add(&mut c, s, 0..PER_STREAM);
    }
    rc.wait_replicated(T);
    // Smaller batches: the drain lasts long enough for the failover to fall in it.
    let pg = start_worker(rc, &[("redis_sync.batch_size", "200")]);
    let total = (STREAMS * PER_STREAM) as i64;
    wait_for("the drain under way", T, || {
        (pg.number("SELECT count(*) FROM landed") >= total / 10).then_some(())
    });
    (pg, total)
}

#[test]
fn a_cluster_source_lands_every_entry_of_every_primary_once() {
    let rc = RedisCluster::start(&[]);
    let mut c = rc.client();
    let names = stream_names();
    // The streams hash to slots all over the cluster: every primary holds some.
    for s in &names {
        add(&mut c, s, 0..PER_STREAM / 2);
    }
    assert_eq!(primaries_holding(&rc, &names).len(), 3, "every primary holds streams");
    let pg = start_worker(&rc, &[]);
    wait_for("all streams tracked", T, || {
        (pg.status("streams_tracked").as_deref() == Some("30")).then_some(())
    });
    // New entries while the worker drains: read as they come.
    for s in &names {
        add(&mut c, s, PER_STREAM / 2..PER_STREAM);
    }
    check_exactly_once(&pg, &rc);
    // The status names the three primaries; the default database range (0-15) was cut to
    // the cluster's database 0 and said once.
    let nodes = pg.status("redis_nodes").expect("redis_nodes shown");
    let mut want: Vec<String> =
        rc.primaries().iter().map(|&i| format!("127.0.0.1:{}", rc.nodes[i].port)).collect();
    want.sort();
    assert_eq!(nodes, want.join(","));
    assert_eq!(pg.status("state").as_deref(), Some("running"));
    assert_eq!(
        pg.status("errors").as_deref(),
        Some("0"),
        "last error: {:?}",
        pg.status("last_error")
    );
    // Idle: reads of several slots cannot block in Redis; the worker waits between them
    // instead of spinning.
    let worker = pg.worker_pid().expect("worker");
    let commands = || {
        rc.primaries().iter().map(|&i| commands_processed(&mut rc.nodes[i].client())).sum::<u64>()
    };
    let window = Duration::from_secs(5);
    let (cpu0, cmd0) = (cpu_time(worker).expect("cpu"), commands());
    std::thread::sleep(window);
    let (cpu1, cmd1) = (cpu_time(worker).expect("cpu"), commands());
    let cpu = (cpu1 - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;
    let per_s = (cmd1 - cmd0) as f64 / window.as_secs_f64();
    eprintln!("idle over the cluster: worker CPU {cpu:.2} % of a core, {per_s:.0} commands/s to the primaries");
    assert!(cpu <= 5.0, "idle worker CPU {cpu:.2} %");
    assert!(per_s <= 1000.0, "{per_s:.0} commands/s while idle");
    let log = pg.log();
    assert_eq!(
        log.matches("a Redis Cluster has database 0 only: 1-15 skipped").count(),
        1,
        "the databases a cluster lacks reported once:\n{log}"
    );
}

#[test]
fn a_manual_cluster_failover_mid_drain_loses_and_repeats_nothing() {
    let rc = RedisCluster::start(&[]);
    let (pg, total) = drain_under_way(&rc);
    // A manual failover: a replica of a primary holding streams takes over its slots.
    let before = rc.primaries();
    let replica = rc.replicas()[0];
    let landed_at_failover = pg.number("SELECT count(*) FROM landed");
    let reply: String = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut rc.nodes[replica].client())
        .expect("CLUSTER FAILOVER");
    assert_eq!(reply, "OK");
    wait_for("the replica promoted", T, || rc.primaries().contains(&replica).then_some(()));
    assert!(
        landed_at_failover < total,
        "the failover came after the drain ({landed_at_failover} landed)"
    );
    rc.wait_ok(T);
    assert_ne!(rc.primaries(), before);
    check_exactly_once(&pg, &rc);
    // The status follows the new primaries.
    let mut want: Vec<String> =
        rc.primaries().iter().map(|&i| format!("127.0.0.1:{}", rc.nodes[i].port)).collect();
    want.sort();
    wait_for("the new primaries shown", T, || {
        (pg.status("redis_nodes")? == want.join(",")).then_some(())
    });
    eprintln!(
        "cluster failover: {landed_at_failover} of {total} landed when the replica took over"
    );
}

#[test]
fn the_key_value_mirror_is_the_union_of_the_primaries_and_follows_their_notifications() {
    // The worker signs in as an ACL user on every node, for its commands and for each
    // node's subscription (the test's own client is the default user).
    let rc = RedisCluster::start(&[
        "--notify-keyspace-events",
        "KA",
        "--user",
        "syncer",
        "on",
        ">s3cret",
        "~*",
        "&*",
        "+@all",
    ]);
    let mut c = rc.client();
    for i in 0..3000 {
        let _: () = redis::cmd("SET").arg(format!("kv:{i}")).arg(i).query(&mut c).expect("SET");
    }
    for i in 0..300 {
        let _: () =
            redis::cmd("HSET").arg(format!("h:{i}")).arg("f").arg(i).query(&mut c).expect("HSET");
    }
    // One pass at start, the next in an hour: only notifications bring what follows.
    let pg = Cluster::start_on_cluster(
        &rc,
        &[
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.sync_interval", "1h"),
            ("redis_sync.redis_username", "syncer"),
            ("redis_sync.redis_password", "s3cret"),
        ],
    );
    assert!(pg.wait_until_running());
    let keys = rc.all_keys();
    assert_eq!(keys.len(), 3300);
    pg.wait_number("SELECT count(*) FROM redis_key_values WHERE deleted_at IS NULL", 3300, T);
    let mirrored = pg
        .query_text("SELECT string_agg(redis_key, ',' ORDER BY redis_key) FROM redis_key_values WHERE redis_db = 0")
        .unwrap_or_default();
    let mut want: Vec<String> =
        keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    want.sort();
    assert_eq!(mirrored, want.join(","), "the mirror is the union of the primaries' keys");
    wait_for("the notification listener", T, || {
        pg.log().contains("Redis publishes keyspace notifications").then_some(())
    });
    let passes = || pg.status("key_value_passes").and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    // Subscribing triggers one catch-up pass (changes made before it were not heard).
    wait_for("the catch-up pass", T, || (passes() == 2).then_some(()));
    // A change on every primary: keys until each primary has one.
    let mut changed = Vec::new();
    let mut on: BTreeSet<usize> = BTreeSet::new();
    for i in 0..3000 {
        let k = format!("kv:{i}");
        let holder = primaries_holding(&rc, std::slice::from_ref(&k));
        if holder.iter().any(|h| on.insert(*h)) {
            let _: () = redis::cmd("SET").arg(&k).arg("changed").query(&mut c).expect("SET");
            changed.push(k);
        }
        if on.len() == 3 {
            break;
        }
    }
    assert_eq!(changed.len(), 3, "a key on each primary");
    for k in &changed {
        wait_for("the change heard", T, || {
            let v = pg.query_text(&format!(
                "SELECT redis_value FROM redis_key_values WHERE redis_db = 0 AND redis_key = '{k}'"
            ));
            (v.as_deref() == Some("changed")).then_some(())
        });
    }
    assert_eq!(passes(), 2, "no pass after the catch-up should have run");
}

#[test]
fn a_primary_killed_mid_drain_is_replaced_by_its_replica_and_nothing_lands_twice() {
    let mut rc = RedisCluster::start(&[]);
    let (pg, total) = drain_under_way(&rc);
    // kill -9 of a primary: its replica is elected after the node timeout (2 s).
    let victim = rc.primaries()[1];
    let landed_at_crash = pg.number("SELECT count(*) FROM landed");
    assert!(landed_at_crash < total, "the crash came after the drain");
    rc.nodes[victim].kill();
    wait_for("a replica elected in its place", T, || {
        let survivors: Vec<usize> = rc.primaries().into_iter().filter(|&i| i != victim).collect();
        (survivors.len() == 3).then_some(())
    });
    check_exactly_once(&pg, &rc);
    eprintln!("primary killed: {landed_at_crash} of {total} landed at the crash");
}

#[test]
fn a_cluster_over_tls_is_read_on_the_nodes_tls_ports() {
    let certs = Certs::make();
    let rc = RedisCluster::start_tls(&certs, &[]);
    let mut c = rc.client();
    let names = stream_names();
    for s in &names {
        add(&mut c, s, 0..100);
    }
    let ca = certs.ca.to_string_lossy().into_owned();
    let pg = Cluster::start_on_cluster(
        &rc,
        &[
            ("redis_sync.redis_tls", "on"),
            ("redis_sync.redis_tls_ca_file", &ca),
            ("redis_sync.rate_limit", "0"),
            ("redis_sync.stream_discovery_interval", "1s"),
            ("redis_sync.key_value_auto_discovery", "off"),
        ],
    );
    pg.wait_number("SELECT count(*) FROM redis_streams", (STREAMS * 100) as i64, T);
    // Every node was reached at its TLS port (CLUSTER SLOTS asked over TLS gives those).
    let mut want: Vec<String> = rc
        .primaries()
        .iter()
        .map(|&i| format!("127.0.0.1:{}", rc.nodes[i].tls_port.expect("tls port")))
        .collect();
    want.sort();
    assert_eq!(pg.status("redis_nodes"), Some(want.join(",")));
    assert_eq!(
        pg.status("errors").as_deref(),
        Some("0"),
        "last error: {:?}",
        pg.status("last_error")
    );
}

/// `CLUSTER MYID` of a node.
fn node_id(rc: &RedisCluster, i: usize) -> String {
    redis::cmd("CLUSTER").arg("MYID").query(&mut rc.nodes[i].client()).expect("CLUSTER MYID")
}

#[test]
fn a_stream_whose_slot_moves_mid_drain_is_followed_through_ask_and_moved() {
    let rc = RedisCluster::start(&[]);
    let mut c = rc.client();
    let total = 40_000usize;
    add(&mut c, "orders:moving", 0..total);
    let pg = start_worker(&rc, &[("redis_sync.batch_size", "200")]);
    wait_for("the drain under way", T, || {
        (pg.number("SELECT count(*) FROM landed") >= 2000).then_some(())
    });
    // The stream's slot moves from its primary to another, as `redis-cli --cluster reshard`
    // moves it: the target imports, the source migrates, the key goes over (from then on
    // the source answers ASK for it), then the slot is given to the target (MOVED).
    let slot: i64 =
        redis::cmd("CLUSTER").arg("KEYSLOT").arg("orders:moving").query(&mut c).expect("KEYSLOT");
    let primaries = rc.primaries();
    let holds = |i: usize| -> bool {
        let n: i64 = redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query(&mut rc.nodes[i].client())
            .unwrap_or(0);
        n > 0
    };
    let src = *primaries.iter().find(|&&i| holds(i)).expect("the slot's primary");
    let dst = *primaries.iter().find(|&&i| i != src).expect("another primary");
    let (src_id, dst_id) = (node_id(&rc, src), node_id(&rc, dst));
    let setslot = |i: usize, how: &str, id: &str| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(how)
            .arg(id)
            .query(&mut rc.nodes[i].client())
            .expect("CLUSTER SETSLOT");
    };
    setslot(dst, "IMPORTING", &src_id);
    setslot(src, "MIGRATING", &dst_id);
    let landed_before = pg.number("SELECT count(*) FROM landed");
    assert!(landed_before < total as i64, "the move came after the drain");
    let _: () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(rc.nodes[dst].port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg("orders:moving")
        .query(&mut rc.nodes[src].client())
        .expect("MIGRATE");
    // While the slot is half moved, the worker goes on through ASK.
    wait_for("entries landed while the source answers ASK", T, || {
        let n = pg.number("SELECT count(*) FROM landed");
        (n >= (landed_before + 2000).min(total as i64)).then_some(())
    });
    for &i in &primaries {
        setslot(i, "NODE", &dst_id);
    }
    pg.wait_number("SELECT count(*) FROM landed", total as i64, T);
    assert_eq!(
        pg.number("SELECT count(*) FROM (SELECT DISTINCT entry_id FROM landed) d"),
        total as i64,
        "an entry landed twice"
    );
    assert_eq!(pg.number("SELECT count(DISTINCT n) FROM landed"), total as i64);
    wait_for("nothing pending", T, || (pending_on(&rc, "orders:moving") == 0).then_some(()));
    assert_eq!(
        pg.status("errors").as_deref(),
        Some("0"),
        "last error: {:?}",
        pg.status("last_error")
    );
    eprintln!("slot moved: {landed_before} of {total} landed when it began to move");
}
