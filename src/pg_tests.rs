//! `#[pg_test]`: settings, privileges and the SQL functions, inside a Postgres with the
//! library preloaded (see `pg_test::postgresql_conf_options` in lib.rs). No Redis listens
//! there, so the worker is seen backing off.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: pgrx::datum::FromDatum + pgrx::IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// (name, boot value, context, unit) of every setting: the contract of DESIGN section 1.
    const SETTINGS: &[(&str, &str, &str, &str)] = &[
        ("redis_sync.ack_after", "local", "sighup", ""),
        ("redis_sync.auto_create_consumer_groups", "on", "sighup", ""),
        ("redis_sync.backoff_base", "1000", "sighup", "ms"),
        ("redis_sync.backoff_max", "30000", "sighup", "ms"),
        ("redis_sync.batch_size", "100", "sighup", ""),
        ("redis_sync.claim_min_idle", "60000", "sighup", "ms"),
        ("redis_sync.consumer_group", "redis-pg-sync", "sighup", ""),
        ("redis_sync.consumer_name", "", "sighup", ""),
        ("redis_sync.database", "postgres", "postmaster", ""),
        ("redis_sync.dead_letter_max", "1000000", "sighup", ""),
        ("redis_sync.dead_letter_retention", "0", "sighup", "s"),
        ("redis_sync.db_search_range", "0-15", "sighup", ""),
        ("redis_sync.enabled", "on", "sighup", ""),
        ("redis_sync.health_check_interval", "60", "sighup", "s"),
        ("redis_sync.key_value_auto_discovery", "on", "sighup", ""),
        ("redis_sync.key_value_deletes", "mark", "sighup", ""),
        ("redis_sync.key_value_max_remembered", "2000000", "sighup", ""),
        ("redis_sync.key_value_max_size", "65536", "sighup", "kB"),
        ("redis_sync.key_value_patterns", "*", "sighup", ""),
        ("redis_sync.key_value_table", "redis_key_values", "sighup", ""),
        ("redis_sync.key_value_verify_interval", "600", "sighup", "s"),
        ("redis_sync.log_level", "info", "sighup", ""),
        ("redis_sync.max_retries", "5", "sighup", ""),
        ("redis_sync.mode", "sync", "sighup", ""),
        ("redis_sync.monitor_interval", "5", "sighup", "s"),
        ("redis_sync.poll_interval", "1000", "sighup", "ms"),
        ("redis_sync.query_timeout", "30000", "sighup", "ms"),
        ("redis_sync.rate_limit", "100", "sighup", ""),
        ("redis_sync.redis_db", "0", "sighup", ""),
        ("redis_sync.redis_host", "localhost", "sighup", ""),
        ("redis_sync.redis_password_file", "", "sighup", ""),
        ("redis_sync.redis_port", "6379", "sighup", ""),
        ("redis_sync.redis_tls", "off", "sighup", ""),
        ("redis_sync.redis_cluster", "off", "sighup", ""),
        ("redis_sync.redis_tls_ca_file", "", "sighup", ""),
        ("redis_sync.redis_tls_cert_file", "", "sighup", ""),
        ("redis_sync.redis_tls_key_file", "", "sighup", ""),
        ("redis_sync.redis_username", "", "sighup", ""),
        ("redis_sync.role", "", "postmaster", ""),
        ("redis_sync.schema", "public", "sighup", ""),
        ("redis_sync.stream_auto_discovery", "on", "sighup", ""),
        ("redis_sync.stream_conflict_overwrite", "off", "sighup", ""),
        ("redis_sync.stream_discovery_interval", "10", "sighup", "s"),
        ("redis_sync.stream_discovery_patterns", "*", "sighup", ""),
        ("redis_sync.stream_table", "redis_streams", "sighup", ""),
        ("redis_sync.streams", "", "sighup", ""),
        ("redis_sync.sync_interval", "1000", "sighup", "ms"),
        ("redis_sync.workers", "1", "postmaster", ""),
    ];

    #[pg_test]
    fn every_setting_has_its_default_context_and_unit() {
        for (name, boot, context, unit) in SETTINGS {
            let row = one::<String>(&format!(
                "SELECT concat_ws('|', boot_val, context, coalesce(unit, '')) FROM pg_settings WHERE name = '{name}'"
            ));
            assert_eq!(row.as_deref(), Some(format!("{boot}|{context}|{unit}").as_str()), "{name}");
        }
        // The password is hidden from pg_settings (NO_SHOW_ALL), so it is counted apart.
        let n = one::<i64>("SELECT count(*) FROM pg_settings WHERE name LIKE 'redis_sync.%'");
        assert_eq!(n, Some(SETTINGS.len() as i64));
    }

    #[pg_test]
    fn enum_settings_list_their_values() {
        for (name, vals) in [
            ("redis_sync.mode", "{sync,monitor}"),
            ("redis_sync.log_level", "{debug,info,notice,warning,error}"),
            ("redis_sync.key_value_deletes", "{mark,delete,ignore}"),
            ("redis_sync.ack_after", "{local,standby}"),
        ] {
            let got = one::<String>(&format!(
                "SELECT enumvals::text FROM pg_settings WHERE name = '{name}'"
            ));
            assert_eq!(got.as_deref(), Some(vals), "{name}");
        }
    }

    #[pg_test]
    fn password_is_masked_for_superusers_and_hidden_from_others() {
        assert_eq!(one::<String>("SHOW redis_sync.redis_password").as_deref(), Some(""));
        Spi::run("CREATE ROLE rps_plain; SET ROLE rps_plain").expect("role");
        let seen =
            one::<i64>("SELECT count(*) FROM pg_settings WHERE name = 'redis_sync.redis_password'");
        assert_eq!(seen, Some(0));
    }

    #[pg_test(error = "parameter \"redis_sync.batch_size\" cannot be changed now")]
    fn reload_settings_refuse_session_set() {
        Spi::run("SET redis_sync.batch_size = 5").expect("refused");
    }

    #[pg_test(error = "invalid configuration parameter name \"redis_sync.no_such_setting\"")]
    fn prefix_is_reserved() {
        Spi::run("SET redis_sync.no_such_setting = 1").expect("refused");
    }

    #[pg_test]
    fn status_is_for_superuser_and_pg_monitor_only() {
        Spi::run("CREATE ROLE rps_public; CREATE ROLE rps_monitor IN ROLE pg_monitor")
            .expect("roles");
        for (f, args) in [
            ("redis_sync_status", ""),
            ("redis_sync_wait_until_running", "interval"),
            ("redis_sync_streams", ""),
            ("redis_sync_lanes", ""),
            ("redis_sync_workers", ""),
        ] {
            let check = |role: &str| {
                one::<bool>(&format!(
                    "SELECT has_function_privilege('{role}', '{f}({args})', 'EXECUTE')"
                ))
            };
            assert_eq!(check("rps_public"), Some(false), "{f} PUBLIC");
            assert_eq!(check("rps_monitor"), Some(true), "{f} pg_monitor");
        }
    }

    #[pg_test]
    fn discover_is_superuser_only_and_grantable() {
        Spi::run("CREATE ROLE rps_mon2 IN ROLE pg_monitor; CREATE ROLE rps_ops").expect("roles");
        let may = |role: &str| {
            one::<bool>(&format!(
                "SELECT has_function_privilege('{role}', 'redis_sync_discover()', 'EXECUTE')"
            ))
        };
        assert_eq!(may("rps_mon2"), Some(false));
        assert_eq!(may("rps_ops"), Some(false));
        Spi::run("GRANT EXECUTE ON FUNCTION redis_sync_discover() TO rps_ops").expect("grant");
        assert_eq!(may("rps_ops"), Some(true));
    }

    #[pg_test]
    fn streams_is_empty_without_redis() {
        assert_eq!(one::<i64>("SELECT count(*) FROM redis_sync_streams()"), Some(0));
        let cols = one::<String>(
            "SELECT array_to_string(proargnames, ',') FROM pg_proc WHERE proname = 'redis_sync_streams'",
        );
        assert_eq!(
            cols.as_deref(),
            Some(
                "stream_key,redis_db,consumer_group,state,last_id,messages_synced,pending,lag,\
                 length,first_entry_id,last_entry_id,consumers,last_sync_time,last_error,groups,health,\
                 entries_lost"
            )
        );
    }

    #[pg_test]
    fn lanes_lists_the_three_lanes_and_their_columns() {
        let lanes =
            one::<String>("SELECT string_agg(lane, ',' ORDER BY lane) FROM redis_sync_lanes()");
        assert_eq!(lanes.as_deref(), Some("discovery,key_values,streams"));
        let cols = one::<String>(
            "SELECT array_to_string(proargnames, ',') FROM pg_proc WHERE proname = 'redis_sync_lanes'",
        );
        assert_eq!(cols.as_deref(), Some("lane,state,last_success,last_error,last_error_time"));
        // No Redis listens in these tests: once the worker has had a turn, its lanes wait
        // for Redis (polled: the worker may not have had its first turn yet).
        let states =
            || one::<String>("SELECT string_agg(DISTINCT state, ',') FROM redis_sync_lanes()");
        for _ in 0..100 {
            if states().as_deref() == Some("waiting_for_redis") {
                break;
            }
            Spi::run("SELECT pg_sleep(0.1)").expect("sleep");
        }
        assert_eq!(states().as_deref(), Some("waiting_for_redis"));
    }

    #[pg_test]
    fn workers_lists_both_processes_with_their_lanes() {
        let cols = one::<String>(
            "SELECT array_to_string(proargnames, ',') FROM pg_proc WHERE proname = 'redis_sync_workers'",
        );
        assert_eq!(cols.as_deref(), Some("worker,pid,state,lanes,started_at,streams"));
        // Each row's pid is that process's in pg_stat_activity (polled: the workers may not
        // have started yet).
        let rows = || {
            one::<String>(
                "SELECT string_agg(w.worker || ':' || array_to_string(w.lanes, '+') || ':' ||                  (a.backend_type IS NOT NULL), ',' ORDER BY w.worker)                  FROM redis_sync_workers() w LEFT JOIN pg_stat_activity a ON a.pid = w.pid",
            )
        };
        let want = "key_values:key_values:true,streams:streams+discovery:true";
        for _ in 0..100 {
            if rows().as_deref() == Some(want) {
                break;
            }
            Spi::run("SELECT pg_sleep(0.1)").expect("sleep");
        }
        assert_eq!(rows().as_deref(), Some(want));
        let types = one::<String>(
            "SELECT string_agg(a.backend_type, ',' ORDER BY w.worker)              FROM redis_sync_workers() w JOIN pg_stat_activity a ON a.pid = w.pid",
        );
        assert_eq!(types.as_deref(), Some("redis_pg_sync key values,redis_pg_sync"));
    }

    #[pg_test(error = "permission denied for function redis_sync_status")]
    fn status_refused_to_public() {
        Spi::run(
            "CREATE ROLE rps_public2; SET ROLE rps_public2; SELECT * FROM redis_sync_status()",
        )
        .expect("refused");
    }

    #[pg_test]
    fn every_function_is_commented() {
        let missing = one::<i64>(
            "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'redis_pg_sync'
              WHERE obj_description(p.oid, 'pg_proc') IS NULL AND p.pronamespace <> 'tests'::regnamespace",
        );
        assert_eq!(missing, Some(0));
        let total = one::<i64>(
            "SELECT count(*) FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
              WHERE e.extname = 'redis_pg_sync' AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
              AND (SELECT pronamespace FROM pg_proc WHERE oid = d.objid) <> 'tests'::regnamespace",
        );
        assert!(total.unwrap_or(0) >= 2, "{total:?}");
    }

    #[pg_test]
    fn status_has_every_column_and_sees_the_worker_back_off() {
        let out = one::<String>(
            "SELECT array_to_string(proargnames, ',') FROM pg_proc WHERE proname = 'redis_sync_status'",
        );
        assert_eq!(
            out.as_deref(),
            Some(
                "worker_pid,state,mode,redis_connected,redis_server,streams_tracked,messages_processed,\
                 key_values_processed,redis_ops,pg_ops,streams_discovered,errors,retries,dead_letters,\
                 last_sync_time,last_error,last_error_time,started_at,key_value_passes,\
                 dead_letters_stored,entries_lost,key_values_skipped,acks_waiting,acks_waiting_since,redis_nodes"
            )
        );
        // Nothing listens on port 1: the worker must be alive, not connected, with errors.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let row = one::<String>(
                "SELECT concat_ws('|', worker_pid IS NOT NULL, state, mode, redis_connected, redis_server, errors > 0, last_error IS NOT NULL)
                   FROM redis_sync_status()",
            );
            if row.as_deref() == Some("t|backing_off|sync|f|localhost:1/0|t|t") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "status never showed backing_off: {row:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    #[pg_test]
    fn wait_until_running_gives_up_at_its_timeout() {
        let t = std::time::Instant::now();
        assert_eq!(one::<bool>("SELECT redis_sync_wait_until_running('300ms')"), Some(false));
        let took = t.elapsed();
        assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }
}
