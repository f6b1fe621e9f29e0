-- Privileges and documentation of the SQL API (runs after every function is created).

REVOKE ALL ON FUNCTION @extschema@.redis_sync_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_status() TO pg_monitor;

REVOKE ALL ON FUNCTION @extschema@.redis_sync_wait_until_running(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_wait_until_running(interval) TO pg_monitor;

COMMENT ON FUNCTION @extschema@.redis_sync_status() IS
  'One row: the redis_pg_sync worker''s state, Redis connection and counters (superuser and pg_monitor).';
COMMENT ON FUNCTION @extschema@.redis_sync_wait_until_running(interval) IS
  'Waits up to timeout for the redis_pg_sync worker to be running and connected to Redis; true when it is.';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_streams() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_streams() TO pg_monitor;
REVOKE ALL ON FUNCTION @extschema@.redis_sync_discover() FROM PUBLIC;

COMMENT ON FUNCTION @extschema@.redis_sync_streams() IS
  'A row per stream the redis_pg_sync worker tracks: last ID synced, counts, pending, lag, length, first/last entry, consumers, last error (superuser and pg_monitor).';
COMMENT ON FUNCTION @extschema@.redis_sync_discover() IS
  'Runs stream discovery in the redis_pg_sync worker now; a row per matching stream and whether it was newly added (superuser; grantable).';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_lanes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_lanes() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_lanes() IS
  'A row per lane of the redis_pg_sync worker (streams, discovery, key_values): state, last success, last error (superuser and pg_monitor).';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_replay_dead_letters(text, integer, text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.redis_sync_replay_dead_letters(text, integer, text) IS
  'Writes dead letters of streams matching stream_pattern back to the stream table, or through their route to its target (route: only that route''s; '''' only the stream table''s); those that land are removed, those still refused stay (superuser; grantable).';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_add_stream_route(text, text, regclass, jsonb, text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.redis_sync_add_stream_route(text, text, regclass, jsonb, text) IS
  'Adds a route: entries of streams matching the patterns become rows of target, columns mapped to fields or $id, $stream, $timestamp, $fields; checked up front (superuser; grantable).';
REVOKE ALL ON FUNCTION @extschema@.redis_sync_add_key_route(text, text, regclass, jsonb, text[], text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.redis_sync_add_key_route(text, text, regclass, jsonb, text[], text) IS
  'Adds a route: hashes (or strings holding a JSON object) matching the patterns become rows of target, upserted on key_columns; deletes: delete, ignore or mark:<column> (superuser; grantable).';
REVOKE ALL ON FUNCTION @extschema@.redis_sync_drop_route(text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.redis_sync_drop_route(text) IS
  'Drops a route; what it matched goes to the generic tables again (superuser; grantable).';
REVOKE ALL ON FUNCTION @extschema@.redis_sync_routes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_routes() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_routes() IS
  'A row per route: its definition, rows landed, dead letters, last landed, last error (superuser and pg_monitor).';
REVOKE ALL ON FUNCTION @extschema@.redis_sync_routes_changed() FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.redis_sync_routes_changed() IS
  'Trigger of redis_sync.routes: tells the redis_pg_sync workers that the routes changed.';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_skipped_keys() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_skipped_keys() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_skipped_keys() IS
  'A row per Redis key too big to mirror (redis_sync.key_value_max_size): database, name, type, size in bytes (superuser and pg_monitor).';

REVOKE ALL ON FUNCTION @extschema@.redis_sync_workers() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.redis_sync_workers() TO pg_monitor;
COMMENT ON FUNCTION @extschema@.redis_sync_workers() IS
  'A row per redis_pg_sync worker process (streams, streams 2, ...: stream reads and discovery; key_values: key-value passes and notifications): process ID, state, lanes, start, streams tracked (superuser and pg_monitor).';
