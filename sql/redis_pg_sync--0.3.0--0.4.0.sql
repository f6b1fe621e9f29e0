-- redis_pg_sync 0.3.0 -> 0.4.0: redis_sync_status() shows the entries whose acknowledgement
-- waits for a flush (here, or on the standbys with redis_sync.ack_after = standby) and a
-- Redis Cluster's primaries;
-- redis_sync_workers() has a row per stream worker (redis_sync.workers) and its streams.
\echo Use "ALTER EXTENSION redis_pg_sync UPDATE TO '0.4.0'" to load this file. \quit

-- New columns: the function is made again (a view over it must be dropped first).
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
	"key_values_skipped" bigint,
	"acks_waiting" bigint,
	"acks_waiting_since" timestamp with time zone,
	"redis_nodes" TEXT
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_status_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_status() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_status() IS
  'One row: the redis_pg_sync worker''s state, Redis connection and counters (superuser and pg_monitor).';

DROP FUNCTION @extschema@.redis_sync_workers();
CREATE FUNCTION @extschema@."redis_sync_workers"() RETURNS TABLE (
	"worker" TEXT,
	"pid" INT,
	"state" TEXT,
	"lanes" TEXT[],
	"started_at" timestamp with time zone,
	"streams" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_workers_wrapper';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_workers() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_workers() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_workers() IS
  'A row per redis_pg_sync worker process (streams, streams 2, ...: stream reads and discovery; key_values: key-value passes and notifications): process ID, state, lanes, start, streams tracked (superuser and pg_monitor).';
