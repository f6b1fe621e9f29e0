//! Security end to end: ACL users and passwords (also from a file), TLS with a CA the test
//! makes (and client certificates), secrets kept out of every place a DBA can read, a role
//! without CREATE, and hostile names stored as data.

use std::time::Duration;

use redis_pg_sync_e2e::*;

const T: Duration = Duration::from_secs(60);

/// Everything a non-secret reader could see: the status row, the activity, the log.
fn visible_text(pg: &Cluster) -> String {
    let status = pg.query_text(
        "SELECT row_to_json(s)::text || (SELECT json_agg(l)::text FROM redis_sync_lanes() l) FROM redis_sync_status() s",
    );
    let activity = pg.query_text(
        "SELECT string_agg(coalesce(query, ''), ' ') FROM pg_stat_activity WHERE backend_type LIKE 'redis_pg_sync%'",
    );
    let streams =
        pg.query_text("SELECT string_agg(row_to_json(s)::text, ' ') FROM redis_sync_streams() s");
    format!("{status:?} {activity:?} {streams:?} {}", pg.log())
}

#[test]
fn a_wrong_acl_password_is_reported_without_it_and_fixed_by_reload() {
    let redis =
        Redis::start_with(&["--user", "syncer", "on", ">right-pw-7781", "~*", "&*", "+@all"]);
    let mut r = redis.client();
    add_entries(&mut r, "acl", 500);
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.log_level", "debug"),
            ("redis_sync.redis_username", "syncer"),
            ("redis_sync.redis_password", "wrong-pw-4413"),
        ],
    );
    wait_for("the refusal", T, || {
        let error = pg.status("last_error")?;
        (error.contains("authentication failed for Redis user \"syncer\"")
            && pg.number("SELECT retries FROM redis_sync_status()") >= 2)
            .then_some(())
    });
    assert_eq!(pg.status("state").as_deref(), Some("backing_off"));
    pg.set("redis_sync.redis_password", "right-pw-7781");
    pg.wait_status("state", "running", T);
    pg.wait_number("SELECT count(*) FROM redis_streams", 500, T);
    let seen = visible_text(&pg);
    assert!(!seen.contains("wrong-pw-4413"), "the wrong password leaked");
    assert!(!seen.contains("right-pw-7781"), "the password leaked");
}

#[test]
fn the_password_can_come_from_a_file_readable_by_the_server_alone() {
    let redis = Redis::start_with(&["--requirepass", "from-a-file-9917"]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let file = dir.path().join("redis.pw");
    write_owned_by_pg(&file, "from-a-file-9917\n", 0o644);
    let path = file.to_string_lossy().into_owned();
    let pg = Cluster::start(&redis, &[("redis_sync.redis_password_file", &path)]);
    // Readable by others: refused, with the fix in the message.
    wait_for("the refusal", T, || {
        pg.status("last_error")?
            .contains("readable by it alone (mode 644); run: chmod 600")
            .then_some(())
    });
    assert_eq!(pg.status("state").as_deref(), Some("backing_off"));
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    pg.wait_status("state", "running", T);
    // Both set is ambiguous: refused until one goes.
    pg.set("redis_sync.redis_password", "from-a-file-9917");
    wait_for("the conflict reported", T, || {
        pg.status("last_error")?.contains("not both").then_some(())
    });
    pg.set("redis_sync.redis_password", "");
    pg.wait_status("state", "running", T);
    assert!(!visible_text(&pg).contains("from-a-file-9917"));
    // Non-superusers do not see where the file is.
    pg.execute("CREATE ROLE plain LOGIN");
    let mut c = pg.client_as("plain");
    assert!(c.query_one("SHOW redis_sync.redis_password_file", &[]).is_err());
}

#[test]
fn tls_with_a_verified_server() {
    let certs = Certs::make();
    let redis = Redis::start_tls(&certs, false);
    let mut r = redis.client();
    add_entries(&mut r, "over-tls", 1_000);
    let tls_port = redis.tls_port.expect("tls port").to_string();
    let ca = certs.ca.to_string_lossy().into_owned();
    let other = certs.other_ca.to_string_lossy().into_owned();
    // Plain text to the TLS port fails cleanly.
    let pg = Cluster::start(&redis, &[("redis_sync.redis_port", &tls_port)]);
    wait_for("the plain connection refused", T, || {
        pg.status("last_error")?.contains("cannot connect to Redis").then_some(())
    });
    assert_eq!(pg.status("state").as_deref(), Some("backing_off"));
    // A server certificate from a CA we do not trust is refused.
    pg.set("redis_sync.redis_tls_ca_file", &other);
    pg.set("redis_sync.redis_tls", "on");
    wait_for("the certificate refused", T, || {
        let e = pg.status("last_error")?;
        (e.contains("certificate") || e.contains("UnknownIssuer")).then_some(e)
    });
    assert_ne!(pg.status("state").as_deref(), Some("running"));
    // The right CA: verified, connected, syncing.
    pg.set("redis_sync.redis_tls_ca_file", &ca);
    pg.wait_status("state", "running", T);
    pg.wait_number("SELECT count(*) FROM redis_streams", 1_000, T);
}

#[test]
fn tls_with_a_client_certificate() {
    let certs = Certs::make();
    let redis = Redis::start_tls(&certs, true);
    let mut r = redis.client();
    add_entries(&mut r, "mtls", 300);
    let tls_port = redis.tls_port.expect("tls port").to_string();
    let ca = certs.ca.to_string_lossy().into_owned();
    let pg = Cluster::start(
        &redis,
        &[
            ("redis_sync.redis_port", &tls_port),
            ("redis_sync.redis_tls", "on"),
            ("redis_sync.redis_tls_ca_file", &ca),
        ],
    );
    // Redis asks for a client certificate and gets none.
    wait_for("the handshake refused", T, || {
        (pg.number("SELECT errors FROM redis_sync_status()") >= 2).then_some(())
    });
    assert_ne!(pg.status("state").as_deref(), Some("running"));
    pg.set("redis_sync.redis_tls_cert_file", &certs.client_cert.to_string_lossy());
    wait_for("the half-set pair reported", T, || {
        pg.status("last_error")?.contains("go together").then_some(())
    });
    pg.set("redis_sync.redis_tls_key_file", &certs.client_key.to_string_lossy());
    pg.wait_status("state", "running", T);
    pg.wait_number("SELECT count(*) FROM redis_streams", 300, T);
}

#[test]
fn a_role_without_create_is_told_the_grants_and_works_once_granted() {
    let redis = Redis::start();
    let mut r = redis.client();
    add_entries(&mut r, "granted", 200);
    let _: () =
        redis::cmd("MSET").arg("k1").arg("v1").arg("k2").arg("v2").query(&mut r).expect("MSET");
    let pg = Cluster::start(&redis, &[("redis_sync.role", "syncer")]);
    pg.execute("CREATE ROLE syncer LOGIN");
    // PostgreSQL 15 and later: no CREATE on schema public for PUBLIC.
    pg.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let hint = "run: GRANT USAGE, CREATE ON SCHEMA public TO syncer;";
    wait_for("the grants named", T, || {
        let e = pg.status("last_error")?;
        (e.contains("permission denied for schema public") && e.contains(hint)).then_some(())
    });
    assert!(pg.log().contains(hint), "the log says it too");
    // The DBA creates the tables (as the extension would) and grants what the message says.
    pg.execute("GRANT USAGE, CREATE ON SCHEMA public TO postgres");
    let mut admin = pg.client();
    admin
        .batch_execute(
            "CREATE TABLE redis_streams (id bigserial PRIMARY KEY, stream_key text NOT NULL,
                message_id text NOT NULL, data jsonb NOT NULL, \"timestamp\" timestamptz NOT NULL,
                synced_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream_key, message_id));
             CREATE TABLE redis_sync_dead_letters (id bigserial PRIMARY KEY,
                stream_key text NOT NULL, message_id text NOT NULL, fields jsonb NOT NULL,
                error text NOT NULL, sqlstate text, attempts int NOT NULL DEFAULT 1,
                created_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream_key, message_id));
             CREATE TABLE redis_key_values (id bigserial PRIMARY KEY, redis_key text NOT NULL,
                redis_value text, redis_db int NOT NULL, value_type text NOT NULL,
                value_encoding text, expires_at timestamptz, deleted_at timestamptz,
                \"timestamp\" timestamptz NOT NULL DEFAULT now(), UNIQUE (redis_db, redis_key));
             GRANT USAGE ON SCHEMA public TO syncer;
             GRANT SELECT, INSERT, UPDATE ON public.redis_streams, public.redis_sync_dead_letters TO syncer;
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.redis_key_values TO syncer;
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO syncer;",
        )
        .expect("set up");
    pg.wait_number("SELECT count(*) FROM redis_streams", 200, T);
    pg.wait_number("SELECT count(*) FROM redis_key_values", 2, T);
    pg.wait_status("state", "running", T);
    // It still cannot create anything.
    assert_eq!(pg.number("SELECT count(*) FROM pg_class WHERE relowner = 'syncer'::regrole"), 0);
}

#[test]
fn redis_sync_discover_is_for_superusers_unless_granted() {
    let redis = Redis::start();
    let pg = Cluster::start(&redis, &[]);
    assert!(pg.wait_until_running());
    pg.execute("CREATE ROLE operator LOGIN");
    let mut op = pg.client_as("operator");
    let err = op.query("SELECT * FROM redis_sync_discover()", &[]).expect_err("refused");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE));
    pg.execute("GRANT EXECUTE ON FUNCTION redis_sync_discover() TO operator");
    assert!(op.query("SELECT * FROM redis_sync_discover()", &[]).is_ok());
    // The settings that name secrets are not readable by it.
    for setting in ["redis_sync.redis_password", "redis_sync.redis_tls_key_file"] {
        assert!(op.query_one(&format!("SHOW {setting}"), &[]).is_err(), "{setting}");
    }
}

#[test]
fn hostile_names_are_stored_as_data() {
    let redis = Redis::start();
    let mut r = redis.client();
    // 64 KiB of UTF-8 that compresses well, and 64 KiB that does not: too long for a btree
    // index entry (2.7 KB), so it cannot be a stream_key or redis_key at all.
    let long = "é".repeat(32 * 1024);
    let huge: String =
        (0..21_846u32).filter_map(|i| char::from_u32(0x4E00 + (i * 7919 + 13) % 20_000)).collect();
    let names: Vec<String> = [
        "it's",
        "semi;colon); DROP TABLE redis_streams; --",
        "back\\slash",
        "new\nline",
        "ünïcødé ✓ 🚀",
        "$b64:AAAA",
        "db3:not-a-db",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([long, huge.clone()])
    .collect();
    for name in &names {
        let _: String = redis::cmd("XADD")
            .arg(name)
            .arg("*")
            .arg("f")
            .arg(name)
            // Two field names that an encoding could confuse: raw bytes and the text of
            // their encoded form.
            .arg(b"\xff".as_slice())
            .arg("binary")
            .arg("$b64:/w==")
            .arg("text")
            .query(&mut r)
            .expect("XADD");
    }
    // The same names as string keys, in database 1 (a key has one type).
    let _: () = redis::cmd("SELECT").arg(1).query(&mut r).expect("SELECT");
    for name in &names {
        let _: () = redis::cmd("SET").arg(name).arg(name).query(&mut r).expect("SET");
    }
    // Something ordinary after them, which they must not hold up.
    let _: () = redis::cmd("SET").arg("ordinary-key").arg("v").query(&mut r).expect("SET");
    let _: () = redis::cmd("SELECT").arg(0).query(&mut r).expect("SELECT");
    add_entries(&mut r, "ordinary", 100);
    let pg = Cluster::start(&redis, &[("redis_sync.rate_limit", "0")]);
    let stored = names.len() as i64 - 1;
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key <> 'ordinary'", stored, T);
    pg.wait_number("SELECT count(*) FROM redis_streams WHERE stream_key = 'ordinary'", 100, T);
    pg.wait_number("SELECT count(*) FROM redis_key_values", stored + 1, T);
    let mut c = pg.client();
    for name in &names[..names.len() - 1] {
        let key = if name.starts_with('$') { format!("${name}") } else { name.clone() };
        let row = c
            .query_one(
                "SELECT data->>'f', data->>'$b64:/w==', data->>'$$b64:/w==' FROM redis_streams WHERE stream_key = $1",
                &[&key],
            )
            .unwrap_or_else(|e| panic!("{name:.40}: {e}"));
        let (f, binary, text): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((f.as_str(), binary.as_str(), text.as_str()), (name.as_str(), "binary", "text"));
        let value: String = c
            .query_one(
                "SELECT redis_value FROM redis_key_values WHERE redis_db = 1 AND redis_key = $1",
                &[&key],
            )
            .unwrap_or_else(|e| panic!("{name:.40}: {e}"))
            .get(0);
        assert_eq!(&value, name);
    }
    // The name no index can hold: the entry is a dead letter that keeps the whole name,
    // the key is reported, and neither blocked anything.
    let kept: String = c
        .query_one(
            "SELECT fields->>'stream_key' FROM redis_sync_dead_letters WHERE sqlstate = '54000'",
            &[],
        )
        .expect("dead letter")
        .get(0);
    assert!(kept == huge, "the dead letter keeps the full name");
    wait_for("the refused key reported", T, || {
        pg.log().contains("of Redis database 1 cannot be stored: index row").then_some(())
    });
    assert!(pg.query_text("SELECT to_regclass('redis_streams')::text").is_some());
}
