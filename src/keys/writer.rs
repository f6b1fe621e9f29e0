//! The key-value table's writer: an upsert that leaves unchanged keys alone, the live-key
//! walk of the deletion check, and the deletion policy's two statements, all prepared once
//! and kept, each batch passed as arrays.

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};

use crate::error::{Result, SyncError};
use crate::pg::ddl::{ensure_kv_table, qualified};
use crate::pg::{in_transaction, spi_err};
use crate::shmem;

/// One key ready for the key-value table.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    /// Encoded as stream keys are (see `encode::encode_name`).
    pub redis_key: String,
    pub redis_value: String,
    pub value_type: &'static str,
    /// `Some("base64")` when a string value is stored as base64.
    pub value_encoding: Option<&'static str>,
    /// Absolute expiry in Unix milliseconds.
    pub expires_ms: Option<i64>,
    /// A hash's fields as read (what `redis_value` encodes), in one buffer, for the routes:
    /// not decoded again from the text.
    pub fields: Option<crate::redis::Fields>,
}

impl KeyRow {
    /// Writes the key's name (`key`, encoded) and a hash's text from its fields when it was
    /// read without them (a route was to take it, and none does now).
    pub fn fill_text(&mut self, key: &[u8]) {
        if self.redis_key.is_empty() {
            self.redis_key = crate::encode::encode_name(key);
        }
        if let (true, Some(fields)) = (self.redis_value.is_empty(), &self.fields) {
            self.redis_value = crate::encode::entry_json(&fields.pairs());
        }
    }
}

/// What the key-value statements were prepared for.
#[derive(Clone, PartialEq, Debug)]
pub struct KvTarget {
    pub schema: String,
    pub table: String,
}

/// The key-value table's writer: an upsert that leaves unchanged keys alone (they are
/// filtered out before the INSERT, so they get no new row version, no lock, no WAL).
#[derive(Default)]
pub struct KvWriter {
    target: Option<KvTarget>,
    upsert: Option<OwnedPreparedStatement>,
    live_first: Option<OwnedPreparedStatement>,
    live_next: Option<OwnedPreparedStatement>,
    mark_gone: Option<OwnedPreparedStatement>,
    delete_gone: Option<OwnedPreparedStatement>,
}

impl KvWriter {
    pub fn reset(&mut self) {
        *self = KvWriter::default();
    }

    pub fn prepare(&mut self, target: &KvTarget) -> Result<()> {
        if self.target.as_ref() == Some(target) && self.upsert.is_some() {
            return Ok(());
        }
        self.reset();
        let table = qualified(&target.schema, &target.table);
        let int4 = PgOid::BuiltIn(PgBuiltInOids::INT4OID);
        let text = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
        let texts = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
        let int8 = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
        let (upsert, live, mark, delete) = in_transaction(|| {
            Spi::connect_mut(|client| {
                ensure_kv_table(client, &target.schema, &target.table)?;
                let prep = |sql: &str, types: &[PgOid]| {
                    client.prepare_mut(sql, types).map(|p| p.keep()).map_err(spi_err)
                };
                let upsert = prep(
                    &kv_upsert_sql(target),
                    &[
                        int4,
                        texts,
                        texts,
                        texts,
                        texts,
                        PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID),
                    ],
                )?;
                // Two statements rather than "$2 IS NULL OR redis_key > $2", so that every
                // chunk is a range scan of the unique index, not a scan from the start.
                let live_first = prep(
                    &format!(
                        "SELECT redis_key FROM {table} WHERE redis_db = $1 AND deleted_at IS NULL
                          ORDER BY redis_key LIMIT $2"
                    ),
                    &[int4, int8],
                )?;
                let live_next = prep(
                    &format!(
                        "SELECT redis_key FROM {table} WHERE redis_db = $1 AND redis_key > $2
                            AND deleted_at IS NULL ORDER BY redis_key LIMIT $3"
                    ),
                    &[int4, text, int8],
                )?;
                let mark = prep(
                    &format!(
                        "UPDATE {table} SET deleted_at = now(), \"timestamp\" = now()
                          WHERE redis_db = $1 AND redis_key = ANY($2) AND deleted_at IS NULL"
                    ),
                    &[int4, texts],
                )?;
                let delete = prep(
                    &format!("DELETE FROM {table} WHERE redis_db = $1 AND redis_key = ANY($2)"),
                    &[int4, texts],
                )?;
                Ok((upsert, (live_first, live_next), mark, delete))
            })
        })?;
        self.live_first = Some(live.0);
        self.live_next = Some(live.1);
        self.mark_gone = Some(mark);
        self.delete_gone = Some(delete);
        shmem::bump(|c| &c.pg_ops, 1);
        self.upsert = Some(upsert);
        self.target = Some(target.clone());
        Ok(())
    }

    /// As [`KvWriter::upsert`], but when the batch is refused because of some rows' content
    /// (a key name too long for the unique index, a trigger that raises), it is split down
    /// to the single rows, and the refused ones come back with their error instead of
    /// failing the batch: one bad key never holds up the others.
    pub fn upsert_isolating(
        &mut self,
        db: u8,
        rows: &[KeyRow],
        refused: &mut Vec<(usize, SyncError)>,
    ) -> Result<usize> {
        self.isolate(db, rows, 0, refused)
    }

    fn isolate(
        &mut self,
        db: u8,
        rows: &[KeyRow],
        offset: usize,
        refused: &mut Vec<(usize, SyncError)>,
    ) -> Result<usize> {
        match self.upsert(db, rows) {
            Ok(n) => Ok(n),
            Err(e) if e.is_row_level() && rows.len() == 1 => {
                refused.push((offset, e));
                Ok(0)
            }
            Err(e) if e.is_row_level() => {
                let half = rows.len() / 2;
                let (a, b) = rows.split_at(half);
                Ok(self.isolate(db, a, offset, refused)?
                    + self.isolate(db, b, offset + half, refused)?)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the keys of `db` whose value, type or expiry differ from the table (or that are
    /// new, or were marked deleted); returns how many rows were written.
    pub fn upsert(&mut self, db: u8, rows: &[KeyRow]) -> Result<usize> {
        if rows.is_empty() {
            return Ok(0);
        }
        let stmt = self.upsert.as_ref().ok_or_else(crate::pg::not_prepared)?;
        let keys: Vec<&str> = rows.iter().map(|r| r.redis_key.as_str()).collect();
        let values: Vec<&str> = rows.iter().map(|r| r.redis_value.as_str()).collect();
        let types: Vec<&str> = rows.iter().map(|r| r.value_type).collect();
        let encodings: Vec<Option<&str>> = rows.iter().map(|r| r.value_encoding).collect();
        let expires: Vec<Option<i64>> = rows.iter().map(|r| r.expires_ms).collect();
        let written = in_transaction(|| {
            Spi::connect_mut(|client| {
                client
                    .update(
                        stmt,
                        None,
                        &[
                            (db as i32).into(),
                            keys.into(),
                            values.into(),
                            types.into(),
                            encodings.into(),
                            expires.into(),
                        ],
                    )
                    .map(|t| t.len())
                    .map_err(spi_err)
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(written)
    }

    /// The table's identity as `(oid, relfilenode)`, or `None` when it does not exist: a
    /// different value means the table was dropped, truncated or rewritten since the last
    /// look, so what the worker remembers about its rows is void.
    pub fn table_identity(&self) -> Result<Option<(i64, i64)>> {
        let Some(t) = self.target.as_ref() else { return Ok(None) };
        let found = crate::pg::ddl::table_identity(&t.schema, &t.table)?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(found)
    }

    /// Up to `limit` live (not deleted) keys of database `db` after `after`, in key order
    /// (keyset pagination on the unique index: each call is short, memory stays bounded).
    pub fn live_keys_chunk(
        &mut self,
        db: u8,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>> {
        let first = self.live_first.as_ref();
        let next = self.live_next.as_ref();
        let keys = in_transaction(|| {
            Spi::connect(|client| {
                // Always a range scan of the unique index, in its order: right after a bulk
                // load the table has no statistics yet, and the planner would read every
                // matching row and sort them for each chunk.
                client
                    .select(
                        "SELECT pg_catalog.set_config('enable_bitmapscan', 'off', true),
                                pg_catalog.set_config('enable_seqscan', 'off', true),
                                pg_catalog.set_config('enable_sort', 'off', true)",
                        None,
                        &[],
                    )
                    .map_err(spi_err)?;
                let not_prepared = crate::pg::not_prepared;
                let rows = match after {
                    None => client.select(
                        first.ok_or_else(not_prepared)?,
                        None,
                        &[(db as i32).into(), limit.into()],
                    ),
                    Some(after) => client.select(
                        next.ok_or_else(not_prepared)?,
                        None,
                        &[(db as i32).into(), after.into(), limit.into()],
                    ),
                }
                .map_err(spi_err)?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    out.push(row.get::<String>(1).map_err(spi_err)?.unwrap_or_default());
                }
                Ok(out)
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(keys)
    }

    /// Applies the deletion policy to keys gone from Redis: `mark` sets `deleted_at`,
    /// `delete` removes the rows. Returns the rows touched.
    pub fn gone(&mut self, db: u8, keys: &[String], delete: bool) -> Result<usize> {
        let stmt = if delete { &self.delete_gone } else { &self.mark_gone };
        let stmt = stmt.as_ref().ok_or_else(crate::pg::not_prepared)?;
        let mut total = 0;
        for chunk in keys.chunks(10_000) {
            let args: Vec<&str> = chunk.iter().map(String::as_str).collect();
            total += in_transaction(|| {
                Spi::connect_mut(|client| {
                    client
                        .update(stmt, None, &[(db as i32).into(), args.into()])
                        .map(|t| t.len())
                        .map_err(spi_err)
                })
            })?;
            shmem::bump(|c| &c.pg_ops, 1);
        }
        Ok(total)
    }
}

fn kv_upsert_sql(t: &KvTarget) -> String {
    let table = qualified(&t.schema, &t.table);
    let expires =
        "CASE WHEN u.ex IS NULL THEN NULL ELSE to_timestamp(u.ex::float8 / 1000::float8) END";
    format!(
        "INSERT INTO {table} AS t
                (redis_db, redis_key, redis_value, value_type, value_encoding, expires_at, deleted_at, \"timestamp\")
         SELECT $1, u.k, u.v, u.ty, u.enc, {expires}, NULL, now()
           FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int8[]) AS u(k, v, ty, enc, ex)
           -- One unique-index probe per key (LATERAL ... LIMIT 1 keeps the planner from
           -- hashing the whole table for a page of keys).
           LEFT JOIN LATERAL (
                SELECT c.id, c.redis_value, c.value_type, c.value_encoding, c.expires_at, c.deleted_at
                  FROM {table} AS c
                 WHERE c.redis_db = $1 AND c.redis_key = u.k
                 LIMIT 1) AS cur ON true
          WHERE cur.id IS NULL OR cur.deleted_at IS NOT NULL
             OR (cur.redis_value, cur.value_type, cur.value_encoding, cur.expires_at)
                IS DISTINCT FROM (u.v, u.ty, u.enc, {expires})
         ON CONFLICT (redis_db, redis_key) DO UPDATE
            SET redis_value = EXCLUDED.redis_value, value_type = EXCLUDED.value_type,
                value_encoding = EXCLUDED.value_encoding, expires_at = EXCLUDED.expires_at,
                deleted_at = NULL, \"timestamp\" = now()"
    )
}
