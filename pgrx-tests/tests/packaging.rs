//! Packaging: an installation of an earlier release, updated with `ALTER EXTENSION ... UPDATE`,
//! has exactly the objects, signatures, comments and grants of a fresh install of this one.

use std::collections::BTreeSet;
use std::path::PathBuf;

use redis_pg_sync_e2e::*;

/// Every member of the extension with what users and pg_dump see of it: a function's whole
/// definition (`pg_get_functiondef`: arguments with names and defaults, result, language,
/// volatility, strictness, security, parallel safety, cost, rows, settings, C symbol) and
/// ACL; a relation's ACL; every object's comment; the initial privileges that pg_dump
/// restores. One line per object, sorted.
const CATALOG: &str = r#"
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'redis_pg_sync')
SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
    || coalesce(' | ' || pg_get_functiondef(p.oid)
        || ' | acl: ' || coalesce(p.proacl::text, 'default'), '')
    || CASE WHEN c.oid IS NULL THEN '' ELSE ' | acl: ' || coalesce(c.relacl::text, 'default') END
    || ' | comment: ' || coalesce(obj_description(d.objid, d.classid::regclass::name), '')
    || ' | initial privileges: ' || coalesce((
        SELECT string_agg(i.initprivs::text, ',' ORDER BY i.objsubid, i.privtype)
        FROM pg_init_privs i
        WHERE i.classoid = d.classid AND i.objoid = d.objid), '')
FROM pg_depend d
LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM ext)
UNION ALL
SELECT 'extension redis_pg_sync ' || extversion || ' relocatable=' || extrelocatable
    || ' config=' || coalesce(extconfig::regclass[]::text, '')
FROM pg_extension WHERE extname = 'redis_pg_sync'
"#;

fn catalog(pg: &Cluster, db: &str) -> BTreeSet<String> {
    pg.client_of(db)
        .query(CATALOG, &[])
        .unwrap_or_else(|e| panic!("catalog query: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// The frozen install script of an earlier release (`sql/redis_pg_sync--X.sql`), kept in the
/// source tree and not installed, copied beside the installed scripts while the guard lives.
struct EarlierRelease(PathBuf);

impl EarlierRelease {
    fn install(version: &str) -> EarlierRelease {
        let name = format!("redis_pg_sync--{version}.sql");
        let frozen = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sql").join(&name);
        let target = pg_sharedir().join("extension").join(&name);
        std::fs::copy(&frozen, &target)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", frozen.display(), target.display()));
        EarlierRelease(target)
    }
}

impl Drop for EarlierRelease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The version of the extension being built (the root package's, which the control file's
/// `default_version` takes).
fn extension_version() -> String {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("read Cargo.toml");
    text.lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the package version in Cargo.toml")
        .to_owned()
}

#[test]
fn an_update_from_0_1_0_equals_a_fresh_install() {
    update_equals_fresh("0.1.0");
}

#[test]
fn an_update_from_0_2_0_equals_a_fresh_install() {
    update_equals_fresh("0.2.0");
}

#[test]
fn an_update_from_0_3_0_equals_a_fresh_install() {
    update_equals_fresh("0.3.0");
}

/// Installs release `from` from its frozen script, updates it step by step to this version,
/// and compares the catalog with a fresh install.
fn update_equals_fresh(from: &str) {
    let _script = EarlierRelease::install(from);
    let pg = Cluster::start_with(ClusterOptions {
        preload: true,
        no_extension: true,
        ..Default::default()
    });
    pg.execute("CREATE DATABASE fresh");
    pg.execute("CREATE DATABASE updated");
    pg.client_of("fresh").batch_execute("CREATE EXTENSION redis_pg_sync").expect("fresh install");
    let mut updated = pg.client_of("updated");
    updated
        .batch_execute(&format!("CREATE EXTENSION redis_pg_sync VERSION '{from}'"))
        .unwrap_or_else(|e| panic!("install {from}: {e}"));
    let old = catalog(&pg, "updated");
    assert!(
        old.iter().any(|l| l.starts_with(&format!("extension redis_pg_sync {from} "))),
        "{old:#?}"
    );
    updated.batch_execute("ALTER EXTENSION redis_pg_sync UPDATE").expect("update");

    let (fresh, updated) = (catalog(&pg, "fresh"), catalog(&pg, "updated"));
    let version = extension_version();
    assert!(
        fresh.iter().any(|l| l.starts_with(&format!("extension redis_pg_sync {version} "))),
        "the fresh install is not {version}: {fresh:#?}"
    );
    // Every function of the SQL API is there, with its comment.
    let functions: Vec<&String> = fresh.iter().filter(|l| l.starts_with("function ")).collect();
    assert!(functions.len() >= 7, "{functions:#?}");
    let uncommented: Vec<&&String> =
        functions.iter().filter(|l| l.contains(" | comment:  | ")).collect();
    assert!(uncommented.is_empty(), "functions without a comment: {uncommented:#?}");
    let only_fresh: Vec<&String> = fresh.difference(&updated).collect();
    let only_updated: Vec<&String> = updated.difference(&fresh).collect();
    assert!(
        only_fresh.is_empty() && only_updated.is_empty(),
        "the update differs from a fresh install\nonly in the fresh install:\n{only_fresh:#?}\nonly after the update:\n{only_updated:#?}"
    );
    assert_ne!(old, fresh, "{from} and {version} should differ (the update did something)");
}

/// A child process killed (by its PID) and reaped when dropped, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of `GET path` from a server on loopback (HTTP/1.0: read to the end).
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1);
    (status == Some("200")).then(|| body.to_owned())
}

/// The value of the sample `name{labels}` (labels as the exporter prints them, in order; empty
/// for none) in a Prometheus text exposition.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

#[test]
fn the_exporter_queries_show_what_the_worker_reports_to_a_pg_monitor_role() {
    const T: std::time::Duration = std::time::Duration::from_secs(60);
    let exporter = PathBuf::from("/usr/bin/prometheus-postgres-exporter");
    assert!(exporter.exists(), "{} missing: scripts/setup.sh installs it", exporter.display());
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "metrics-stream", 40);
    let _: () =
        redis::cmd("MSET").arg("k:1").arg("a").arg("k:2").arg("b").query(&mut r).expect("MSET");
    let pg = Cluster::start(&redis, &[("redis_sync.key_value_patterns", "k:*")]);
    pg.wait_number("SELECT count(*) FROM redis_streams", 40, T);
    pg.wait_number("SELECT count(*) FROM redis_key_values", 2, T);
    pg.execute("CREATE ROLE exporter LOGIN IN ROLE pg_monitor");
    let queries =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docker/postgres_exporter.yaml");
    let port = free_port();
    let log = std::env::temp_dir().join(format!("rps-exporter-{port}.log"));
    let _exporter = Killed(
        std::process::Command::new(&exporter)
            .arg(format!("--extend.query-path={}", queries.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--disable-settings-metrics")
            .env(
                "DATA_SOURCE_NAME",
                format!("postgresql://exporter@127.0.0.1:{}/postgres?sslmode=disable", pg.port),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("exporter log"))
            .spawn()
            .expect("start the exporter"),
    );
    // (The counter is bumped just after the commit that made the rows visible.)
    pg.wait_number("SELECT messages_processed FROM redis_sync_status()", 40, T);
    let processed = 40;
    let deadline = std::time::Instant::now() + T;
    let metrics = loop {
        let m = http_get(port, "/metrics");
        let got = m.as_deref().and_then(|m| sample(m, "redis_sync_messages_processed", &[]));
        if got == Some(processed as f64) {
            break m.unwrap_or_default();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no redis_sync_messages_processed {processed} scraped in {T:?} (last: {got:?}); exporter log:\n{}\nlast scrape:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            m.unwrap_or_default().lines().filter(|l| l.contains("redis_sync") || l.contains("pg_exporter") || l.contains("pg_up")).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = std::fs::remove_file(&log);
    let has = |line: &str| metrics.lines().any(|l| l == line);
    assert!(has("# TYPE redis_sync_messages_processed counter"), "{metrics}");
    assert!(has("# TYPE redis_sync_stream_pending gauge"), "{metrics}");
    assert!(has("# TYPE redis_sync_dead_letters_stored gauge"), "{metrics}");
    assert!(has("# TYPE redis_sync_acks_waiting gauge"), "{metrics}");
    assert!(sample(&metrics, "redis_sync_acks_waiting_seconds", &[]).is_some(), "{metrics}");
    assert_eq!(sample(&metrics, "redis_sync_up", &[]), Some(1.0));
    assert_eq!(
        sample(&metrics, "redis_sync_worker_info", &[("state", "running"), ("mode", "sync")]),
        Some(1.0)
    );
    // A state is never a label of a counter (a change of state would start a new series).
    assert!(
        metrics.lines().filter(|l| l.starts_with("redis_sync_messages_processed")).count() == 1,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "redis_sync_redis_connected", &[]), Some(1.0));
    assert_eq!(
        sample(&metrics, "redis_sync_key_values_processed", &[]),
        Some(pg.number("SELECT key_values_processed FROM redis_sync_status()") as f64)
    );
    let stream = [("stream_key", "metrics-stream"), ("redis_db", "0")];
    assert_eq!(sample(&metrics, "redis_sync_stream_messages_synced", &stream), Some(40.0));
    assert_eq!(sample(&metrics, "redis_sync_stream_pending", &stream), Some(0.0));
    assert_eq!(sample(&metrics, "redis_sync_stream_healthy", &stream), Some(1.0));
    for lane in ["streams", "discovery", "key_values"] {
        assert_eq!(
            sample(&metrics, "redis_sync_lane_up", &[("lane", lane)]),
            Some(1.0),
            "lane {lane}: {metrics}"
        );
    }
    for worker in ["streams", "key_values"] {
        assert_eq!(
            sample(&metrics, "redis_sync_process_up", &[("worker", worker)]),
            Some(1.0),
            "worker {worker}: {metrics}"
        );
    }
    // The queries file loaded, and every query of the last scrape ran.
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("pg_exporter_user_queries_load_error") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "pg_exporter_last_scrape_error", &[]), Some(0.0), "{metrics}");
}
