//! `make soak`: steady stream load for SOAK_SECS (default 600) while Redis is restarted
//! every 2 minutes (with AOF, so entries survive) and the worker is killed with SIGKILL
//! every 3 minutes (Postgres then restarts every backend). Prints entries added, rows
//! stored, duplicates, loss, pending, and the worker's memory at the start and the end.
//! Not part of `make test`: it runs for ten minutes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_pg_sync_e2e::*;

const STREAMS: [&str; 4] = ["soak-a", "soak-b", "soak-c", "soak-d"];
const GROUP: &str = "redis-pg-sync";

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

fn main() {
    // The servers are stopped when `soak` returns (their handles drop), before the exit.
    let clean = soak();
    std::process::exit(if clean { 0 } else { 1 });
}

/// Runs the soak and prints its figures; true when nothing was lost or duplicated.
fn soak() -> bool {
    let total = env_secs("SOAK_SECS", 600);
    let redis_every = env_secs("SOAK_REDIS_RESTART_SECS", 120);
    let kill_every = env_secs("SOAK_WORKER_KILL_SECS", 180);
    let redis = Arc::new(Mutex::new(Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    ])));
    let port = redis.lock().map(|r| r.port).unwrap_or(0);
    let pg = Cluster::start(
        &redis.lock().expect("redis"),
        &[
            ("redis_sync.stream_discovery_patterns", "soak-*"),
            ("redis_sync.stream_discovery_interval", "2s"),
            ("redis_sync.key_value_auto_discovery", "off"),
            ("redis_sync.backoff_base", "200ms"),
            ("redis_sync.backoff_max", "2s"),
        ],
    );
    assert!(pg.wait_until_running(), "the worker did not start:\n{}", pg.log());

    // The producer: 20 entries per stream every 50 ms (1,600 entries/s), numbered; a batch
    // that fails (Redis restarting) is retried, so an entry may exist twice in Redis with
    // two IDs. That is the producer's doing: the check below counts Redis' own entries.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let producer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut conn: Option<redis::Connection> = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                        .and_then(|c| c.get_connection())
                    {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    },
                };
                let mut p = redis::pipe();
                for s in STREAMS {
                    for i in 0..20 {
                        p.cmd("XADD").arg(s).arg("*").arg("n").arg(n + i).ignore();
                    }
                }
                match p.query::<()>(c) {
                    Ok(()) => {
                        n += 20;
                        acked.fetch_add(20 * STREAMS.len() as u64, Ordering::Relaxed);
                    }
                    Err(_) => conn = None,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let start = Instant::now();
    let first_pid = pg.worker_pid().unwrap_or(0);
    let mut mem_start = None;
    // Sampled once the worker is warm, before the first kill.
    let sample_at = Duration::from_secs(30).min(kill_every / 2);
    let (mut next_restart, mut next_kill) = (redis_every, kill_every);
    let (mut restarts, mut kills) = (0, 0);
    while start.elapsed() < total {
        std::thread::sleep(Duration::from_millis(250));
        let t = start.elapsed();
        if mem_start.is_none() && t >= sample_at {
            mem_start = rss_anon_kb(first_pid);
        }
        if t >= next_restart && t + Duration::from_secs(5) < total {
            next_restart += redis_every;
            eprintln!("[soak] {:>4}s restarting Redis", t.as_secs());
            if let Ok(mut r) = redis.lock() {
                r.restart();
            }
            restarts += 1;
        }
        if t >= next_kill && t + Duration::from_secs(5) < total {
            next_kill += kill_every;
            if let Some(pid) = pg.worker_pid() {
                eprintln!("[soak] {:>4}s SIGKILL worker {pid}", t.as_secs());
                unsafe { libc::kill(pid, libc::SIGKILL) };
                kills += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = producer.join();
    let end_pid = wait_for("the worker", Duration::from_secs(60), || pg.worker_pid());
    let mem_end = rss_anon_kb(end_pid);

    // Let it drain, then compare with what Redis holds.
    let mut r = redis.lock().expect("redis").client();
    let in_redis = |r: &mut redis::Connection| -> i64 {
        STREAMS.iter().map(|s| redis::cmd("XLEN").arg(*s).query::<i64>(r).unwrap_or(0)).sum()
    };
    let added = in_redis(&mut r);
    let drained = Instant::now();
    while pg.number("SELECT count(DISTINCT (stream_key, message_id)) FROM redis_streams") < added
        && drained.elapsed() < Duration::from_secs(300)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let rows = pg.number("SELECT count(*) FROM redis_streams");
    let distinct = pg.number("SELECT count(DISTINCT (stream_key, message_id)) FROM redis_streams");
    let pending_total: i64 = STREAMS.iter().map(|s| pending(&mut r, s, GROUP)).sum();
    let stats = pg.query_text(
        "SELECT concat_ws(' ', 'messages_processed', messages_processed, 'errors', errors, 'retries', retries) FROM redis_sync_status()",
    );
    println!("soak: {} s, Redis restarts {restarts}, worker kills {kills}", total.as_secs());
    println!("entries added (XLEN over the streams): {added}");
    println!("entries the producer saw acknowledged: {}", acked.load(Ordering::Relaxed));
    println!("rows stored: {rows}");
    println!("duplicates (rows - distinct IDs): {}", rows - distinct);
    println!("lost (entries in Redis with no row): {}", added - distinct);
    println!("pending in the group: {pending_total}");
    println!(
        "worker RssAnon: {} KiB after {} s (pid {first_pid}), {} KiB at the end (pid {end_pid})",
        mem_start.map_or("?".into(), |k| k.to_string()),
        sample_at.as_secs(),
        mem_end.map_or("?".into(), |k| k.to_string())
    );
    println!("status: {}", stats.unwrap_or_default());
    let clean = rows == distinct && distinct == added && pending_total == 0;
    println!("{}", if clean { "CLEAN" } else { "NOT CLEAN" });
    clean
}
