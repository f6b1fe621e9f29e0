-- redis_pg_sync 0.1.0 -> 0.2.0: the worker's lanes; dead-letter replay; skipped keys; new
-- columns of redis_sync_status() and redis_sync_streams().
\echo Use "ALTER EXTENSION redis_pg_sync UPDATE TO '0.2.0'" to load this file. \quit

CREATE FUNCTION @extschema@."redis_sync_lanes"() RETURNS TABLE (
	"lane" TEXT,
	"state" TEXT,
	"last_success" timestamp with time zone,
	"last_error" TEXT,
	"last_error_time" timestamp with time zone
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_lanes_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_lanes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_lanes() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_lanes() IS
  'A row per lane of the redis_pg_sync worker (streams, discovery, key_values): state, last success, last error (superuser and pg_monitor).';

-- New columns: the functions are made again (a view over them must be dropped first).
DROP FUNCTION @extschema@.redis_sync_status();
CREATE FUNCTION @extschema@."redis_sync_status"() RETURNS TABLE (
	"worker_pid" INT,
	"state" TEXT,
	"mode" TEXT,
	"redis_connected" bool,
	"redis_server" TEXT,
	"streams_tracked" bigint,
	"messages_processed" bigint,
	"key_values_processed" bigint,
	"redis_ops" bigint,
	"pg_ops" bigint,
	"streams_discovered" bigint,
	"errors" bigint,
	"retries" bigint,
	"dead_letters" bigint,
	"last_sync_time" timestamp with time zone,
	"last_error" TEXT,
	"last_error_time" timestamp with time zone,
	"started_at" timestamp with time zone,
	"key_value_passes" bigint,
	"dead_letters_stored" bigint,
	"entries_lost" bigint,
	"key_values_skipped" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_status_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_status() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_status() IS
  'One row: the redis_pg_sync worker''s state, Redis connection and counters (superuser and pg_monitor).';

DROP FUNCTION @extschema@.redis_sync_streams();
CREATE FUNCTION @extschema@."redis_sync_streams"() RETURNS TABLE (
	"stream_key" TEXT,
	"redis_db" INT,
	"consumer_group" TEXT,
	"state" TEXT,
	"last_id" TEXT,
	"messages_synced" bigint,
	"pending" bigint,
	"lag" bigint,
	"length" bigint,
	"first_entry_id" TEXT,
	"last_entry_id" TEXT,
	"consumers" bigint,
	"last_sync_time" timestamp with time zone,
	"last_error" TEXT,
	"groups" bigint,
	"health" TEXT,
	"entries_lost" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_streams_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_streams() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_streams() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_streams() IS
  'A row per stream the redis_pg_sync worker tracks: last ID synced, counts, pending, lag, length, first/last entry, consumers, last error (superuser and pg_monitor).';

CREATE FUNCTION @extschema@."redis_sync_replay_dead_letters"(
	"stream_pattern" TEXT DEFAULT '*',
	"max" INT DEFAULT NULL
) RETURNS TABLE (
	"landed" bigint,
	"stayed" bigint
)
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_replay_dead_letters_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_replay_dead_letters(text, integer) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.redis_sync_replay_dead_letters(text, integer) IS
  'Writes dead letters of streams matching stream_pattern back to the stream table; those that land are removed, those still refused stay (superuser; grantable).';

CREATE FUNCTION @extschema@."redis_sync_skipped_keys"() RETURNS TABLE (
	"redis_db" INT,
	"redis_key" TEXT,
	"value_type" TEXT,
	"bytes" bigint,
	"skipped_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_skipped_keys_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_skipped_keys() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_skipped_keys() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_skipped_keys() IS
  'A row per Redis key too big to mirror (redis_sync.key_value_max_size): database, name, type, size in bytes (superuser and pg_monitor).';

CREATE FUNCTION @extschema@."redis_sync_workers"() RETURNS TABLE (
	"worker" TEXT,
	"pid" INT,
	"state" TEXT,
	"lanes" TEXT[],
	"started_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_workers_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_workers() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_workers() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_workers() IS
  'A row per redis_pg_sync worker process (streams: stream reads and discovery; key_values: key-value passes and notifications): process ID, state, lanes, start (superuser and pg_monitor).';
