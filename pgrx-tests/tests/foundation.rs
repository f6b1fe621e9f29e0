//! The foundation: the worker runs, connects, survives Redis outages, follows reloads,
//! validates its settings, keeps its secret, and says `not_loaded` without preload.

use std::time::Duration;

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn worker_appears_in_pg_stat_activity_and_reaches_running() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[]);
    let pid = wait_for("the worker in pg_stat_activity", T, || pg.worker_pid());
    assert!(pg.wait_until_running(), "log:\n{}", pg.log());
    assert_eq!(pg.status("state").as_deref(), Some("running"));
    assert_eq!(pg.status("redis_connected").as_deref(), Some("true"));
    assert_eq!(pg.status("worker_pid"), Some(pid.to_string()));
    assert_eq!(pg.status("redis_server"), Some(format!("127.0.0.1:{}/0", redis.port)));
    assert_eq!(pg.status("mode").as_deref(), Some("sync"));
    assert!(pg.status("started_at").is_some());
    // pg_stat_activity tells what it does: with nothing to sync, it is idle.
    wait_for("activity text", T, || {
        let q = pg.query_text(
            "SELECT state || ': ' || query FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync'",
        )?;
        q.starts_with("idle: idle: 0 streams, waiting for changes").then_some(())
    });
    // Redis sees the worker as a client.
    let mut r = redis.client();
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut r).expect("client list");
    assert!(clients.lines().count() >= 2, "{clients}");
    // The worker counts its Redis round trips.
    let ops: i64 = pg.status("redis_ops").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(ops >= 1, "redis_ops {ops}");
}

#[test]
fn redis_outage_backs_off_counts_retries_and_recovers_by_itself() {
    let mut redis = Redis::start();
    let pg = Cluster::start(&redis, &[("redis_sync.backoff_max", "300ms")]);
    assert!(pg.wait_until_running());
    redis.stop();
    pg.wait_status("redis_connected", "false", T);
    let retries =
        |pg: &Cluster| -> i64 { pg.status("retries").and_then(|s| s.parse().ok()).unwrap_or(-1) };
    wait_for("retries to count up", T, || (retries(&pg) >= 3).then_some(()));
    let state = pg.status("state").unwrap_or_default();
    assert!(state == "backing_off" || state == "connecting", "state while Redis is down: {state}");
    let errors: i64 = pg.status("errors").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(errors >= 3, "errors {errors}");
    // Either worker process may write the last error (the key-value worker's first one is a
    // lost connection, "unexpected end of file"); the retries that follow name the server.
    let server = format!("127.0.0.1:{}", redis.port);
    wait_for("last_error naming the server", T, || {
        pg.status("last_error").filter(|e| e.contains(&server)).map(|_| ())
    });
    assert!(pg.status("last_error_time").is_some());

    let before = retries(&pg);
    wait_for("more retries", T, || (retries(&pg) > before).then_some(()));

    redis.restart();
    pg.wait_status("state", "running", T);
    assert_eq!(pg.status("redis_connected").as_deref(), Some("true"));
    assert!(pg.log().contains("connected to Redis"), "{}", pg.log());
}

#[test]
fn reload_moves_the_worker_to_another_redis() {
    let first = Redis::start();
    let second = Redis::start();
    let pg = Cluster::start(&first, &[]);
    assert!(pg.wait_until_running());
    let worker_pid = pg.worker_pid();

    pg.set("redis_sync.redis_port", &second.port.to_string());
    pg.wait_status("redis_server", &format!("127.0.0.1:{}/0", second.port), T);
    pg.wait_status("state", "running", T);
    // The same worker process moved (no restart), and the second Redis sees it.
    assert_eq!(pg.worker_pid(), worker_pid);
    let mut r = second.client();
    wait_for("the worker among the second Redis' clients", T, || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut r).ok()?;
        (list.lines().count() >= 2).then_some(())
    });
    // And it let go of the first one.
    let mut r1 = first.client();
    wait_for("the worker gone from the first Redis", T, || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut r1).ok()?;
        (list.lines().count() == 1).then_some(())
    });

    // Another reloadable setting: the db is part of the server identity.
    pg.set("redis_sync.redis_db", "3");
    pg.wait_status("redis_server", &format!("127.0.0.1:{}/3", second.port), T);
    pg.wait_status("state", "running", T);
}

#[test]
fn not_loaded_without_shared_preload_libraries() {
    let pg = Cluster::start_with(ClusterOptions { preload: false, ..Default::default() });
    assert_eq!(pg.status("state").as_deref(), Some("not_loaded"));
    assert_eq!(pg.status("worker_pid"), None);
    let hint = pg.status("last_error").unwrap_or_default();
    assert!(hint.contains("shared_preload_libraries"), "{hint}");
    assert_eq!(
        pg.query_text("SELECT redis_sync_wait_until_running('100ms')").as_deref(),
        Some("false")
    );
    assert_eq!(pg.worker_pid(), None);
}

#[test]
fn bad_values_are_refused_with_the_setting_and_the_accepted_form() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[]);
    let cases: &[(&str, &str, &str)] = &[
        ("redis_sync.db_search_range", "3-1", "Accepted form"),
        ("redis_sync.db_search_range", "0-99", "outside 0-15"),
        ("redis_sync.db_search_range", "a,b", "Accepted form"),
        ("redis_sync.schema", "public; drop table x", "plain identifier"),
        ("redis_sync.stream_table", "1abc", "plain identifier"),
        ("redis_sync.key_value_table", "", "plain identifier"),
        ("redis_sync.consumer_group", " ", "non-empty"),
        ("redis_sync.redis_host", "bad host", "without blanks"),
        ("redis_sync.redis_host", "a:1,b:x", "seed nodes of a cluster"),
    ];
    for (name, value, detail) in cases {
        let err =
            pg.alter_system_error(name, value).unwrap_or_else(|| panic!("{name}={value} accepted"));
        assert_eq!(err.message(), format!("invalid value for parameter \"{name}\": \"{value}\""));
        let d = err.detail().unwrap_or_default();
        assert!(d.contains(detail), "{name}={value}: detail {d:?}");
    }
    let ranged: &[(&str, &str)] = &[
        ("redis_sync.redis_port", "0"),
        ("redis_sync.redis_port", "70000"),
        ("redis_sync.redis_db", "16"),
        ("redis_sync.redis_db", "-1"),
        ("redis_sync.backoff_base", "-5s"),
        ("redis_sync.poll_interval", "-1ms"),
        ("redis_sync.batch_size", "0"),
        ("redis_sync.rate_limit", "-1"),
    ];
    for (name, value) in ranged {
        let err =
            pg.alter_system_error(name, value).unwrap_or_else(|| panic!("{name}={value} accepted"));
        assert!(
            err.message().contains(name) && err.message().contains("outside the valid range"),
            "{name}={value}: {}",
            err.message()
        );
    }
    let err = pg.alter_system_error("redis_sync.mode", "bogus").expect("refused");
    assert_eq!(err.message(), "invalid value for parameter \"redis_sync.mode\": \"bogus\"");
    assert_eq!(err.hint(), Some("Available values: sync, monitor."));
    let err =
        pg.alter_system_error("redis_sync.health_check_interval", "10 parsecs").expect("refused");
    assert!(err.message().contains("redis_sync.health_check_interval"), "{}", err.message());
    // Good values pass.
    for (name, value) in [
        ("redis_sync.db_search_range", "0,2,5-7"),
        ("redis_sync.schema", "_my_schema1"),
        ("redis_sync.poll_interval", "250ms"),
    ] {
        assert!(pg.alter_system_error(name, value).is_none(), "{name}={value} refused");
    }
}

#[test]
fn a_bad_value_on_reload_keeps_the_last_good_one() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[("redis_sync.db_search_range", "0-3")]);
    assert!(pg.wait_until_running());
    pg.append_conf("redis_sync.db_search_range = '3-1'\nredis_sync.mode = 'bogus'");
    pg.reload();
    wait_for("the reload to log the refusal", T, || {
        pg.log()
            .contains("invalid value for parameter \"redis_sync.db_search_range\": \"3-1\"")
            .then_some(())
    });
    assert_eq!(
        pg.query_text("current_setting('redis_sync.db_search_range')").as_deref(),
        Some("0-3")
    );
    assert_eq!(pg.query_text("current_setting('redis_sync.mode')").as_deref(), Some("sync"));
    assert_eq!(pg.status("state").as_deref(), Some("running"));
}

#[test]
fn the_password_is_used_but_never_shown() {
    const SECRET: &str = "s3cret-PASS-9f8e7d";
    let redis = Redis::start_with(&["--requirepass", SECRET]);
    let pg = Cluster::start(&redis, &[("redis_sync.redis_password", "wrong-one-1234")]);
    // Wrong password: a clear error, no password in it, the worker keeps trying.
    wait_for("an authentication error", T, || {
        pg.status("last_error").filter(|e| e.contains("authentication failed")).map(|_| ())
    });
    let e = pg.status("last_error").unwrap_or_default();
    assert!(!e.contains("wrong-one-1234"), "{e}");
    // Fixed by a reload.
    pg.set("redis_sync.redis_password", SECRET);
    pg.wait_status("state", "running", T);
    // Never shown: not to a plain role, masked for superusers, not in the log or status.
    pg.execute("CREATE ROLE plain LOGIN; CREATE ROLE watcher LOGIN IN ROLE pg_monitor");
    for role in ["plain", "watcher"] {
        let mut c = pg.client_as(role);
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_settings WHERE name = 'redis_sync.redis_password'",
                &[],
            )
            .expect("pg_settings")
            .get(0);
        assert_eq!(n, 0, "{role} sees the password setting");
        // SHOW: refused to a plain role; members of pg_read_all_settings see it masked.
        match c.query_one("SHOW redis_sync.redis_password", &[]) {
            Err(e) => {
                assert_eq!(role, "plain", "{role}: {e}");
                let m = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
                assert!(m.contains("redis_sync.redis_password"), "{m}");
                assert!(!m.contains(SECRET));
            }
            Ok(row) => {
                assert_eq!(role, "watcher", "plain role could SHOW the password");
                assert_eq!(row.get::<_, String>(0), "********");
            }
        }
    }
    assert_eq!(
        pg.query_text("current_setting('redis_sync.redis_password')").as_deref(),
        Some("********")
    );
    let status =
        pg.query_text("SELECT row(s.*)::text FROM redis_sync_status() s").unwrap_or_default();
    assert!(!status.contains(SECRET), "{status}");
    let log = pg.log();
    let leaks: Vec<&str> =
        log.lines().filter(|l| l.contains(SECRET) || l.contains("wrong-one-1234")).collect();
    assert!(leaks.is_empty(), "password in the log: {leaks:#?}");
    assert!(log.contains("authentication failed"), "the auth failure should be logged");
}

#[test]
fn cancel_is_ignored_and_terminate_brings_the_worker_back() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[]);
    assert!(pg.wait_until_running());
    let pid = pg.worker_pid().expect("worker pid");
    assert_eq!(pg.query_text(&format!("SELECT pg_cancel_backend({pid})")).as_deref(), Some("true"));
    wait_for("the cancel to be logged", T, || {
        pg.log().contains("cancel request ignored").then_some(())
    });
    assert_eq!(pg.worker_pid(), Some(pid), "cancel must not end the worker");
    assert_eq!(pg.status("state").as_deref(), Some("running"));

    pg.execute(&format!("SELECT pg_terminate_backend({pid})"));
    let new_pid =
        wait_for("a new worker after terminate", T, || pg.worker_pid().filter(|p| *p != pid));
    assert!(pg.wait_until_running());
    assert_eq!(pg.status("worker_pid"), Some(new_pid.to_string()));
}

#[test]
fn idles_on_a_hot_standby_and_starts_on_promotion() {
    let redis = Redis::start();
    let primary = Cluster::start(&redis, &[]);
    assert!(primary.wait_until_running());
    let standby = Cluster::start_standby_of(&primary);
    assert_eq!(standby.query_text("pg_is_in_recovery()").as_deref(), Some("true"));
    standby.wait_status("state", "standby", T);
    assert_eq!(standby.status("redis_connected").as_deref(), Some("false"));
    let states = |pg: &Cluster| {
        pg.query_text("SELECT string_agg(worker || ':' || state, ',' ORDER BY worker) FROM redis_sync_workers()")
    };
    wait_for("both standby workers idle", T, || {
        (states(&standby)?.as_str() == "key_values:standby,streams:standby").then_some(())
    });
    // Only the primary's workers talk to Redis: every connection named after a worker
    // process (redis_pg_sync-<pid>) is one of the primary's two.
    let mut r = redis.client();
    let primary_workers =
        primary.worker_pids().expect("pids").map(|p| format!("name=redis_pg_sync-{p} "));
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut r).expect("CLIENT LIST");
    let ours: Vec<&str> = list.lines().filter(|l| l.contains("name=redis_pg_sync-")).collect();
    assert!(!ours.is_empty(), "{list}");
    assert!(ours.iter().all(|l| primary_workers.iter().any(|w| l.contains(w))), "{list}");

    standby.execute("SELECT pg_promote()");
    standby.wait_status("state", "running", T);
    assert_eq!(standby.status("redis_connected").as_deref(), Some("true"));
    wait_for("both workers running after promotion", T, || {
        (states(&standby)?.as_str() == "key_values:running,streams:running").then_some(())
    });
}

#[test]
fn enabled_off_pauses_and_on_resumes() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[]);
    assert!(pg.wait_until_running());
    pg.set("redis_sync.enabled", "off");
    pg.wait_status("state", "paused", T);
    assert_eq!(
        pg.query_text("SELECT query FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync'")
            .as_deref(),
        Some("paused (redis_sync.enabled = off)")
    );
    pg.set("redis_sync.enabled", "on");
    pg.wait_status("state", "running", T);
}

#[test]
fn connects_to_the_configured_database_as_the_configured_role() {
    let redis = Redis::start();
    let pg =
        Cluster::start(&redis, &[("redis_sync.database", "appdb"), ("redis_sync.role", "syncer")]);
    // Neither exists yet: the worker cannot start its session, and is restarted by the
    // postmaster (restart time 5 s) until they do.
    pg.execute("CREATE ROLE syncer LOGIN");
    pg.execute("CREATE DATABASE appdb OWNER syncer");
    let who = wait_for("the worker connected to appdb as syncer", T, || {
        pg.query_text(
            "SELECT datname || '/' || usename FROM pg_stat_activity WHERE backend_type = 'redis_pg_sync'",
        )
    });
    assert_eq!(who, "appdb/syncer");
    assert!(pg.wait_until_running());
}

#[test]
fn status_is_readable_by_pg_monitor_and_not_by_public() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[]);
    assert!(pg.wait_until_running());
    pg.execute("CREATE ROLE nobody LOGIN; CREATE ROLE watcher LOGIN IN ROLE pg_monitor");
    let mut w = pg.client_as("watcher");
    let state: String =
        w.query_one("SELECT state FROM redis_sync_status()", &[]).expect("pg_monitor").get(0);
    assert_eq!(state, "running");
    let ok: bool = w
        .query_one("SELECT redis_sync_wait_until_running('1s')", &[])
        .expect("pg_monitor may wait")
        .get(0);
    assert!(ok);
    let mut n = pg.client_as("nobody");
    let err = n.query_one("SELECT state FROM redis_sync_status()", &[]).expect_err("PUBLIC");
    let msg = err.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert_eq!(msg, "permission denied for function redis_sync_status");
}

#[test]
fn log_level_follows_reload() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[]);
    assert!(pg.wait_until_running());
    assert!(!pg.log().contains("configuration reloaded"));
    pg.set("redis_sync.log_level", "debug");
    // The reload that sets debug is itself logged at debug.
    wait_for("a debug line", T, || pg.log().contains("configuration reloaded").then_some(()));
}
