-- Routes: the extension's own schema, its configuration tables, and the trigger that tells
-- the workers a route changed.

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
