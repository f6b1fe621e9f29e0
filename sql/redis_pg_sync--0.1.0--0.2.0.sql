-- redis_pg_sync 0.1.0 -> 0.2.0: the worker's lanes.
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
