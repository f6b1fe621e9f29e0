-- redis_pg_sync 0.2.0 -> 0.3.0: routes (streams and keys into users' own tables), and
-- redis_sync_replay_dead_letters() learns routes.
\echo Use "ALTER EXTENSION redis_pg_sync UPDATE TO '0.3.0'" to load this file. \quit

-- A new argument: the function is made again.
DROP FUNCTION @extschema@.redis_sync_replay_dead_letters(text, integer);
CREATE FUNCTION @extschema@."redis_sync_replay_dead_letters"(
	"stream_pattern" TEXT DEFAULT '*',
	"max" INT DEFAULT NULL,
	"route" TEXT DEFAULT NULL
) RETURNS TABLE (
	"landed" bigint,
	"stayed" bigint
)
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_replay_dead_letters_wrapper';

CREATE FUNCTION @extschema@."redis_sync_add_stream_route"(
	"name" TEXT,
	"streams" TEXT,
	"target" regclass,
	"columns" jsonb,
	"conflict" TEXT DEFAULT 'nothing'
) RETURNS void
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_add_stream_route_wrapper';

CREATE FUNCTION @extschema@."redis_sync_add_key_route"(
	"name" TEXT,
	"keys" TEXT,
	"target" regclass,
	"columns" jsonb,
	"key_columns" TEXT[],
	"deletes" TEXT DEFAULT 'delete'
) RETURNS void
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_add_key_route_wrapper';

CREATE FUNCTION @extschema@."redis_sync_drop_route"(
	"name" TEXT
) RETURNS bool
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_drop_route_wrapper';

CREATE FUNCTION @extschema@."redis_sync_routes"() RETURNS TABLE (
	"name" TEXT,
	"kind" TEXT,
	"patterns" TEXT,
	"target" TEXT,
	"columns" jsonb,
	"key_columns" TEXT[],
	"conflict" TEXT,
	"deletes" TEXT,
	"rows_landed" bigint,
	"dead_letters" bigint,
	"last_landed" timestamp with time zone,
	"last_error" TEXT
)
STRICT VOLATILE SECURITY DEFINER
LANGUAGE c
AS 'MODULE_PATHNAME', 'redis_sync_routes_wrapper';

CREATE FUNCTION @extschema@."redis_sync_routes_changed"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'redis_sync_routes_changed_wrapper';

DO $$
BEGIN
    IF pg_catalog.to_regnamespace('redis_sync') IS NULL THEN
        CREATE SCHEMA redis_sync;
    ELSIF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n
                 JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
                WHERE n.nspname = 'redis_sync') THEN
        RAISE EXCEPTION 'schema redis_sync exists and is not owned by a superuser'
            USING HINT = 'redis_pg_sync keeps its routes in a schema of that name: rename the existing schema, or make a superuser its owner, then try again.';
    ELSE
        -- A schema of that name exists already (redis_sync.schema named it, so the worker's
        -- tables may be in it): it becomes the extension's, and DROP EXTENSION then refuses
        -- to drop it while it holds those tables.
        ALTER EXTENSION redis_pg_sync ADD SCHEMA redis_sync;
    END IF;
END
$$;
COMMENT ON SCHEMA redis_sync IS 'redis_pg_sync: routes and their landing records';

CREATE TABLE redis_sync.routes (
    name text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('stream', 'key')),
    patterns text NOT NULL,
    target regclass NOT NULL,
    columns jsonb NOT NULL,
    key_columns text[],
    conflict text CHECK (conflict IN ('nothing', 'update')),
    deletes text,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE redis_sync.routes IS
  'redis_pg_sync routes: streams or keys matching patterns land in target, columns mapped (change with redis_sync_add_stream_route, redis_sync_add_key_route, redis_sync_drop_route)';
SELECT pg_catalog.pg_extension_config_dump('redis_sync.routes', '');

CREATE TABLE redis_sync.landed (
    seq bigserial PRIMARY KEY,
    route text NOT NULL,
    stream_key text NOT NULL,
    consumer_group text NOT NULL,
    ids text[] NOT NULL,
    landed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX landed_stream_idx ON redis_sync.landed (stream_key, consumer_group);
COMMENT ON TABLE redis_sync.landed IS
  'redis_pg_sync: the stream entries each route landed, written with the rows and kept until Redis no longer holds them pending (exactly once into tables without a unique key)';
SELECT pg_catalog.pg_extension_config_dump('redis_sync.landed', '');
SELECT pg_catalog.pg_extension_config_dump('redis_sync.landed_seq_seq', '');

CREATE TRIGGER routes_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON redis_sync.routes
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@.redis_sync_routes_changed();

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
  'A row per redis_pg_sync worker process (streams: stream reads and discovery; key_values: key-value passes and notifications): process ID, state, lanes, start (superuser and pg_monitor).';
