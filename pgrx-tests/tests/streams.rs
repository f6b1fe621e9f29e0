//! Stream sync end to end: entries added with real clients land in the stream table exactly
//! once, through consumer groups, across crashes, in every database, whatever their bytes.

use std::time::Duration;

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(60);

/// Adds `n` entries `{n: i, s: <stream>}` to `stream`, pipelined in chunks.
fn add_entries(r: &mut redis::Connection, stream: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for i in chunk {
            p.cmd("XADD").arg(stream).arg("*").arg("n").arg(*i).arg("s").arg(stream).ignore();
        }
        let _: () = p.query(r).expect("XADD");
    }
}

fn pending(r: &mut redis::Connection, stream: &str, group: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING").arg(stream).arg(group).query(r).expect("XPENDING");
    match v {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
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
    assert_eq!(
        pg.number("SELECT count(DISTINCT (stream_key, message_id)) FROM redis_streams"),
        20_000
    );
    for s in streams {
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
