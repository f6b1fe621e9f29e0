//! The worker's tables, created when missing (never altered when they exist), and the
//! catalog lookups that tell whether a table is still the one the worker knew.
//!
//! Names come from validated settings and are always quoted; no SQL is built from data.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::spi_err;
use crate::error::Result;
use crate::parse::quote_ident;

pub const DEAD_LETTER_TABLE: &str = "redis_sync_dead_letters";

/// `schema.table`, both quoted.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

fn relation_exists(client: &SpiClient<'_>, schema: &str, table: &str) -> Result<bool> {
    let found = client
        .select("SELECT to_regclass($1) IS NOT NULL", None, &[qualified(schema, table).into()])
        .map_err(spi_err)?
        .first()
        .get_one::<bool>()
        .map_err(spi_err)?;
    Ok(found.unwrap_or(false))
}

/// Creates the schema when it does not exist (and only then: a role that may use an existing
/// schema need not be allowed to create one).
fn ensure_schema(client: &mut SpiClient<'_>, schema: &str) -> Result<()> {
    let exists = client
        .select("SELECT to_regnamespace($1) IS NOT NULL", None, &[schema.into()])
        .map_err(spi_err)?
        .first()
        .get_one::<bool>()
        .map_err(spi_err)?
        .unwrap_or(false);
    if !exists {
        lock_ddl(client)?;
        client
            .update(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)), None, &[])
            .map_err(spi_err)?;
    }
    Ok(())
}

/// Several worker processes may make the same schema or table at once: one at a time (the
/// others then find it), till the end of the transaction.
fn lock_ddl(client: &mut SpiClient<'_>) -> Result<()> {
    client
        .update(&format!("SELECT pg_catalog.pg_advisory_xact_lock({DDL_LOCK})"), None, &[])
        .map_err(spi_err)?;
    Ok(())
}

/// Runs `ddl` (which creates `schema.table` and its indexes) unless the table exists.
fn create_unless_exists(
    client: &mut SpiClient<'_>,
    schema: &str,
    table: &str,
    ddl: &str,
) -> Result<()> {
    if !relation_exists(client, schema, table)? {
        lock_ddl(client)?;
        if !relation_exists(client, schema, table)? {
            client.update(ddl, None, &[]).map_err(spi_err)?;
        }
    }
    Ok(())
}

/// The advisory lock key the workers' table DDL takes ("rpsddl" in ASCII).
const DDL_LOCK: i64 = 0x7270_7364_646c;

/// The stream table and the dead-letter table of `schema`.
pub fn ensure_stream_tables(client: &mut SpiClient<'_>, schema: &str, table: &str) -> Result<()> {
    ensure_schema(client, schema)?;
    let name = qualified(schema, table);
    let stream_ddl = format!(
        "CREATE TABLE IF NOT EXISTS {name} (
            id bigserial PRIMARY KEY,
            stream_key text NOT NULL,
            message_id text NOT NULL,
            data jsonb NOT NULL,
            \"timestamp\" timestamptz NOT NULL,
            synced_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (stream_key, message_id));
         CREATE INDEX IF NOT EXISTS {ts_idx} ON {name} (stream_key, \"timestamp\" DESC);
         CREATE INDEX IF NOT EXISTS {id_idx} ON {name} (message_id);",
        ts_idx = quote_ident(&format!("{table}_stream_key_timestamp_idx")),
        id_idx = quote_ident(&format!("{table}_message_id_idx")),
    );
    create_unless_exists(client, schema, table, &stream_ddl)?;
    let dead_ddl = format!(
        "CREATE TABLE IF NOT EXISTS {} (
            id bigserial PRIMARY KEY,
            stream_key text NOT NULL,
            message_id text NOT NULL,
            fields jsonb NOT NULL,
            error text NOT NULL,
            sqlstate text,
            attempts int NOT NULL DEFAULT 1,
            created_at timestamptz NOT NULL DEFAULT now(),
            route text,
            UNIQUE (stream_key, message_id));",
        qualified(schema, DEAD_LETTER_TABLE),
    );
    create_unless_exists(client, schema, DEAD_LETTER_TABLE, &dead_ddl)
}

/// The dead-letter table of `schema` for routes (with the stream table when it is missing
/// too: it is where entries of no route go), and its `route` column, added to a table made
/// before routes existed.
pub fn ensure_route_dead_letters(
    client: &mut SpiClient<'_>,
    schema: &str,
    stream_table: &str,
) -> Result<()> {
    ensure_stream_tables(client, schema, stream_table)?;
    let has_route = client
        .select(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                             WHERE attrelid = pg_catalog.to_regclass($1) AND attname = 'route'
                               AND NOT attisdropped)",
            None,
            &[qualified(schema, DEAD_LETTER_TABLE).into()],
        )
        .map_err(spi_err)?
        .first()
        .get_one::<bool>()
        .map_err(spi_err)?
        .unwrap_or(false);
    if !has_route {
        client
            .update(
                &format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS route text",
                    qualified(schema, DEAD_LETTER_TABLE)
                ),
                None,
                &[],
            )
            .map_err(spi_err)?;
    }
    Ok(())
}

/// The key-value table of `schema`.
pub fn ensure_kv_table(client: &mut SpiClient<'_>, schema: &str, table: &str) -> Result<()> {
    ensure_schema(client, schema)?;
    let name = qualified(schema, table);
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {name} (
            id bigserial PRIMARY KEY,
            redis_key text NOT NULL,
            redis_value text,
            redis_db int NOT NULL,
            value_type text NOT NULL,
            value_encoding text,
            expires_at timestamptz,
            deleted_at timestamptz,
            \"timestamp\" timestamptz NOT NULL DEFAULT now(),
            UNIQUE (redis_db, redis_key));
         CREATE INDEX IF NOT EXISTS {key_idx} ON {name} (redis_key);
         CREATE INDEX IF NOT EXISTS {db_idx} ON {name} (redis_db);",
        key_idx = quote_ident(&format!("{table}_redis_key_idx")),
        db_idx = quote_ident(&format!("{table}_redis_db_idx")),
    );
    create_unless_exists(client, schema, table, &ddl)
}

/// The table's identity as `(oid, relfilenode)`, or `None` when it does not exist: a
/// different value means the table was dropped, truncated or rewritten since the last look.
pub fn table_identity(schema: &str, table: &str) -> Result<Option<(i64, i64)>> {
    let name = qualified(schema, table);
    super::in_transaction(|| {
        Spi::connect(|client| {
            let rows = client
                .select(
                    "SELECT oid::int8, relfilenode::int8 FROM pg_catalog.pg_class
                      WHERE oid = pg_catalog.to_regclass($1)",
                    Some(1),
                    &[name.as_str().into()],
                )
                .map_err(spi_err)?;
            let mut out = None;
            for row in rows {
                let oid = row.get::<i64>(1).map_err(spi_err)?.unwrap_or_default();
                let file = row.get::<i64>(2).map_err(spi_err)?.unwrap_or_default();
                out = Some((oid, file));
            }
            Ok(out)
        })
    })
}
