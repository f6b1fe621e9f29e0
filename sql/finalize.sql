-- Privileges and documentation of the SQL API (runs after every function is created).

REVOKE ALL ON FUNCTION @extschema@.redis_sync_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_status() TO pg_monitor;

REVOKE ALL ON FUNCTION @extschema@.redis_sync_wait_until_running(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_wait_until_running(interval) TO pg_monitor;

COMMENT ON FUNCTION @extschema@.redis_sync_status() IS
  'One row: the redis_pg_sync worker''s state, Redis connection and counters (superuser and pg_monitor).';
COMMENT ON FUNCTION @extschema@.redis_sync_wait_until_running(interval) IS
  'Waits up to timeout for the redis_pg_sync worker to be running and connected to Redis; true when it is.';
