//! Key routes on the key-value worker: keys a route matches become rows of its target,
//! upserted on the route's key columns, written only when they differ from the stored row;
//! keys gone from Redis follow the route's `deletes`. The passes, notifications, memory and
//! deletion check of the key-value mirror carry them as they carry the mirror's keys.

use std::collections::HashMap;
use std::sync::Arc;

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{PgBuiltInOids, PgOid};

use super::writer::KeyRow;
use crate::encode::decode_entry_json;
use crate::error::{Result, SyncError};
use crate::parse::quote_ident;
use crate::pg::{in_transaction, spi_err};
use crate::redis::Fields;
use crate::routes::mapping::{Cell, KeyRow as MappedKey, Source};
use crate::routes::{Deletes, Route};
use crate::shmem;

/// The fields and value of a key as a route maps them: a hash's fields, or a string's value
/// (and its fields when it holds a JSON object), owned where they had to be decoded.
/// `None` for the types a route cannot map.
struct KeyParts<'r> {
    read: Option<&'r Fields>,
    decoded: Vec<(Vec<u8>, Vec<u8>)>,
    value: Option<Vec<u8>>,
}

impl<'r> KeyParts<'r> {
    fn of(row: &'r KeyRow) -> Option<KeyParts<'r>> {
        match row.value_type {
            "hash" => Some(match &row.fields {
                Some(fields) => KeyParts { read: Some(fields), decoded: Vec::new(), value: None },
                None => KeyParts {
                    read: None,
                    decoded: decode_entry_json(&row.redis_value)?,
                    value: None,
                },
            }),
            "string" => {
                let bytes = match row.value_encoding {
                    Some(_) => {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD.decode(&row.redis_value).ok()?
                    }
                    None => row.redis_value.as_bytes().to_vec(),
                };
                let decoded = json_object_fields(&bytes).unwrap_or_default();
                Some(KeyParts { read: None, decoded, value: Some(bytes) })
            }
            _ => None,
        }
    }

    fn fields(&self) -> Vec<(&[u8], &[u8])> {
        match self.read {
            Some(f) => f.pairs(),
            None => self.decoded.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect(),
        }
    }
}

/// The members of a JSON object, each as text (a string's contents, anything else as its
/// JSON text); `None` when `bytes` is not a JSON object.
fn json_object_fields(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object()?;
    Some(
        obj.iter()
            .filter_map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    // An absent field: NULL.
                    serde_json::Value::Null => return None,
                    other => other.to_string(),
                };
                Some((k.as_bytes().to_vec(), text.into_bytes()))
            })
            .collect(),
    )
}

/// The row a route makes of a key, in the route's column order; `Err` with the reason when
/// the route cannot take the key.
pub fn route_cells(
    route: &Route,
    key: &[u8],
    parts: &[&[u8]],
    row: &KeyRow,
) -> std::result::Result<Vec<Cell>, String> {
    let Some(key_parts) = KeyParts::of(row) else {
        return Err(format!(
            "it is a {}: a route takes hashes, and strings (their JSON object's members as fields)",
            row.value_type
        ));
    };
    let fields = key_parts.fields();
    let cells = route.map.key_cells(&MappedKey {
        key,
        parts,
        fields: &fields,
        value: key_parts.value.as_deref(),
        expires_millis: row.expires_ms,
    });
    if route.deletes != Deletes::Ignore {
        // The deletion check rebuilds the key from the stored key columns: an integer
        // written in another form than Postgres prints it (`007`, `+7`) would give another
        // key, and the row would be taken for one whose key is gone.
        for (i, c) in route.map.columns.iter().enumerate() {
            let integer = matches!(
                route.casts.get(i).map(String::as_str),
                Some("smallint" | "integer" | "bigint")
            );
            let key_part = matches!(c.source, Source::Key | Source::KeyPart(_));
            if integer && key_part && route.key_columns.contains(&c.name) {
                let text = cells[i].as_deref().unwrap_or("");
                if !canonical_integer(text) {
                    return Err(format!(
                        "\"{text}\" for key column \"{}\" is not how {} prints it, so its row could not be matched to the key again",
                        c.name,
                        route.casts[i]
                    ));
                }
            }
        }
    }
    Ok(cells)
}

/// `-?(0|[1-9][0-9]*)`: an integer as Postgres prints it.
fn canonical_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0"
}

/// The key columns' cells of a key (for a deletion), in the order of `route.key_columns`.
pub fn key_cells(route: &Route, key: &[u8], parts: &[&[u8]]) -> Vec<Cell> {
    let mapped = MappedKey { key, parts, fields: &[], value: None, expires_millis: None };
    let all = route.map.key_cells(&mapped);
    route
        .key_columns
        .iter()
        .map(|k| route.map.columns.iter().position(|c| &c.name == k).and_then(|i| all[i].clone()))
        .collect()
}

/// The Redis key a row's key columns (as text, in `route.key_columns` order) stand for:
/// from a column mapped to `$key`, or the first pattern filled with the `$key_part`s.
pub fn key_of(route: &Route, values: &[Option<String>]) -> Option<Vec<u8>> {
    let value_of = |source: &Source| -> Option<&str> {
        let col = route.map.columns.iter().find(|c| &c.source == source)?;
        let i = route.key_columns.iter().position(|k| k == &col.name)?;
        values.get(i)?.as_deref()
    };
    if let Some(v) = value_of(&Source::Key) {
        return Some(decode_value_text(v));
    }
    for p in &route.patterns {
        let parts: Option<Vec<Vec<u8>>> = (1..=p.wildcards())
            .map(|n| value_of(&Source::KeyPart(n)).map(decode_value_text))
            .collect();
        let Some(parts) = parts else { continue };
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        if let Some(key) = p.fill(&refs).filter(|k| p.matches(k)) {
            return Some(key);
        }
    }
    None
}

/// Inverse of `encode::encode_value_text` (a text that only looks encoded is taken as
/// encoded: the documented ambiguity).
fn decode_value_text(text: &str) -> Vec<u8> {
    use base64::Engine;
    text.strip_prefix(crate::encode::B64_NAME_PREFIX)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

/// One key route's statements, prepared for its target's current column types.
struct Writer {
    route: Arc<Route>,
    casts: Vec<String>,
    upsert: OwnedPreparedStatement,
    gone: Option<OwnedPreparedStatement>,
    walk_first: OwnedPreparedStatement,
    walk_next: OwnedPreparedStatement,
}

/// The writers of the key routes, by name.
#[derive(Default)]
pub struct KeyRouteWriters {
    writers: HashMap<String, Writer>,
    /// Routes whose target refused a COPY of keys new to the worker, with the pass it was
    /// in: until that pass ends, their keys are upserted.
    no_copy: HashMap<String, u16>,
}

fn cast_of(route: &Route, casts: &[String], column: &str) -> String {
    route
        .map
        .columns
        .iter()
        .position(|c| c.name == column)
        .and_then(|i| casts.get(i).cloned())
        .unwrap_or_else(|| "text".into())
}

/// `(k1, k2) IN (SELECT u.c1::T1, u.c2::T2 FROM unnest($1::text[], $2::text[]) ...)`.
fn keys_in(route: &Route, casts: &[String]) -> String {
    let keys: Vec<String> = route.key_columns.iter().map(|k| quote_ident(k)).collect();
    let values: Vec<String> = route
        .key_columns
        .iter()
        .enumerate()
        .map(|(i, k)| format!("u.c{}::{}", i + 1, cast_of(route, casts, k)))
        .collect();
    let params: Vec<String> = (1..=keys.len()).map(|i| format!("${i}::text[]")).collect();
    let aliases: Vec<String> = (1..=keys.len()).map(|i| format!("c{i}")).collect();
    format!(
        "({}) IN (SELECT {} FROM {}({}) AS u({}))",
        keys.join(", "),
        values.join(", "),
        crate::routes::unnest(params.len()),
        params.join(", "),
        aliases.join(", ")
    )
}

fn upsert_sql(route: &Route, casts: &[String]) -> String {
    let keys: Vec<String> = route.key_columns.iter().map(|k| quote_ident(k)).collect();
    let rest: Vec<String> = route
        .map
        .columns
        .iter()
        .filter(|c| !route.key_columns.contains(&c.name))
        .map(|c| quote_ident(&c.name))
        .collect();
    let mut set: Vec<String> = rest.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
    let mut differs = Vec::new();
    if !rest.is_empty() {
        let old: Vec<String> = rest.iter().map(|c| format!("t.{c}")).collect();
        let new: Vec<String> = rest.iter().map(|c| format!("EXCLUDED.{c}")).collect();
        differs.push(format!("({}) IS DISTINCT FROM ({})", old.join(", "), new.join(", ")));
    }
    if let Deletes::Mark(col) = &route.deletes {
        // The key exists again: no longer marked.
        let c = quote_ident(col);
        set.push(format!("{c} = NULL"));
        differs.push(format!("t.{c} IS NOT NULL"));
    }
    let conflict = if set.is_empty() {
        format!("ON CONFLICT ({}) DO NOTHING", keys.join(", "))
    } else {
        // Unchanged rows are not updated: no new row version, no WAL.
        format!(
            "ON CONFLICT ({}) DO UPDATE SET {} WHERE {}",
            keys.join(", "),
            set.join(", "),
            differs.join(" OR ")
        )
    };
    // Two keys may give one row (two databases, `user:7` and `user:07` into a bigint): the
    // last one is written.
    format!(
        "{} {conflict}",
        crate::routes::insert_select(route, casts, true, Some(&route.key_columns))
    )
}

impl Writer {
    fn prepare(
        client: &mut SpiClient<'_>,
        route: &Arc<Route>,
        casts: Vec<String>,
    ) -> Result<Writer> {
        let texts = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
        let int8 = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
        let nkeys = route.key_columns.len();
        let prep = |client: &mut SpiClient<'_>, sql: &str, types: &[PgOid]| {
            client.prepare_mut(sql, types).map(|p| p.keep()).map_err(spi_err)
        };
        let upsert =
            prep(client, &upsert_sql(route, &casts), &vec![texts; route.map.columns.len()])?;
        let gone = match &route.deletes {
            Deletes::Ignore => None,
            Deletes::Delete => Some(prep(
                client,
                &format!("DELETE FROM {} WHERE {}", route.table, keys_in(route, &casts)),
                &vec![texts; nkeys],
            )?),
            Deletes::Mark(col) => {
                let c = quote_ident(col);
                Some(prep(
                    client,
                    &format!(
                        "UPDATE {} SET {c} = now() WHERE {} AND {c} IS NULL",
                        route.table,
                        keys_in(route, &casts)
                    ),
                    &vec![texts; nkeys],
                )?)
            }
        };
        let keys: Vec<String> = route.key_columns.iter().map(|k| quote_ident(k)).collect();
        let as_text: Vec<String> = keys.iter().map(|k| format!("{k}::text")).collect();
        let live = match &route.deletes {
            Deletes::Mark(col) => format!("{} IS NULL", quote_ident(col)),
            _ => "true".into(),
        };
        let walk_first = prep(
            client,
            &format!(
                "SELECT {} FROM {} WHERE {live} ORDER BY {} LIMIT $1",
                as_text.join(", "),
                route.table,
                keys.join(", ")
            ),
            &[int8],
        )?;
        let after: Vec<String> = route
            .key_columns
            .iter()
            .enumerate()
            .map(|(i, k)| format!("${}::text::{}", i + 1, cast_of(route, &casts, k)))
            .collect();
        let mut next_types = vec![PgOid::BuiltIn(PgBuiltInOids::TEXTOID); nkeys];
        next_types.push(int8);
        let walk_next = prep(
            client,
            &format!(
                "SELECT {} FROM {} WHERE {live} AND ({}) > ({}) ORDER BY {} LIMIT ${}",
                as_text.join(", "),
                route.table,
                keys.join(", "),
                after.join(", "),
                keys.join(", "),
                nkeys + 1
            ),
            &next_types,
        )?;
        Ok(Writer { route: route.clone(), casts, upsert, gone, walk_first, walk_next })
    }
}

fn arrays(rows: &[Vec<Cell>], width: usize) -> Vec<Vec<Option<&str>>> {
    let mut out: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(rows.len()); width];
    for r in rows {
        for (k, a) in out.iter_mut().enumerate() {
            a.push(r.get(k).and_then(|c| c.as_deref()));
        }
    }
    out
}

impl KeyRouteWriters {
    pub fn reset(&mut self) {
        self.writers.clear();
    }

    /// Writes keys the worker has not written before (its memory does not know them: a
    /// first mirror, new keys) with an in-process COPY, several times faster than the
    /// upsert. Returns `None` when the target did not take them all (one of them has a row
    /// already, as after a restart, which empties the memory; a refused row; a target COPY
    /// cannot write): nothing was written, the caller upserts them, and so does every
    /// later call of the same pass.
    pub fn copy_fresh(
        &mut self,
        route: &Arc<Route>,
        rows: &[Vec<Cell>],
        pass: u16,
    ) -> Option<usize> {
        if rows.is_empty() || self.no_copy.get(&route.name) == Some(&pass) {
            return None;
        }
        let mut text = Vec::with_capacity(rows.len() * 64);
        for r in rows {
            crate::routes::mapping::push_copy_cells(&mut text, r);
        }
        let names: Option<Vec<std::ffi::CString>> = route
            .map
            .columns
            .iter()
            .map(|c| std::ffi::CString::new(c.name.as_str()).ok())
            .collect();
        let names = names?;
        let columns: Vec<&std::ffi::CStr> = names.iter().map(|c| c.as_c_str()).collect();
        let copied = in_transaction(|| {
            crate::pg::copy_rows(&route.schema, &route.relname, &columns, &[text])
        });
        shmem::bump(|c| &c.pg_ops, 1);
        match copied {
            Ok(()) => Some(rows.len()),
            Err(_) => {
                self.no_copy.insert(route.name.clone(), pass);
                None
            }
        }
    }

    /// Runs `f` with the route's writer in one transaction, after the target is locked and
    /// its statements follow its current column types.
    fn with<R>(
        &mut self,
        route: &Arc<Route>,
        f: impl FnOnce(&mut SpiClient<'_>, &Writer) -> Result<R>,
    ) -> Result<R> {
        let writers = &mut self.writers;
        in_transaction(|| {
            Spi::connect_mut(|client| {
                client
                    .update(&format!("LOCK TABLE {} IN ROW EXCLUSIVE MODE", route.table), None, &[])
                    .map_err(spi_err)?;
                let casts = crate::routes::catalog::current_casts(client, route)?;
                let fresh = writers
                    .get(&route.name)
                    .is_none_or(|w| w.casts != casts || *w.route != **route);
                if fresh {
                    let w = Writer::prepare(client, route, casts)?;
                    writers.insert(route.name.clone(), w);
                }
                let w = writers.get(&route.name).ok_or_else(crate::pg::not_prepared)?;
                f(client, w)
            })
        })
    }

    /// Upserts `rows` (cells in the route's column order); a batch refused because of some
    /// rows' content is split down to the single rows, whose errors come back in `refused`
    /// (by index). Returns the rows written (unchanged ones are not).
    pub fn upsert_isolating(
        &mut self,
        route: &Arc<Route>,
        rows: &[Vec<Cell>],
        offset: usize,
        refused: &mut Vec<(usize, SyncError)>,
    ) -> Result<usize> {
        if rows.is_empty() {
            return Ok(0);
        }
        let width = route.map.columns.len();
        let done = self.with(route, |client, w| {
            let args: Vec<pgrx::datum::DatumWithOid> =
                arrays(rows, width).into_iter().map(Into::into).collect();
            client.update(&w.upsert, None, &args).map(|t| t.len()).map_err(spi_err)
        });
        shmem::bump(|c| &c.pg_ops, 1);
        match done {
            Ok(n) => Ok(n),
            Err(e) if e.is_row_level() && rows.len() == 1 => {
                refused.push((offset, e));
                Ok(0)
            }
            Err(e) if e.is_row_level() => {
                let half = rows.len() / 2;
                let (a, b) = rows.split_at(half);
                Ok(self.upsert_isolating(route, a, offset, refused)?
                    + self.upsert_isolating(route, b, offset + half, refused)?)
            }
            Err(e) => Err(e),
        }
    }

    /// Applies the route's `deletes` to keys gone (their key columns' cells). Returns the
    /// rows touched.
    pub fn gone(&mut self, route: &Arc<Route>, keys: &[Vec<Cell>]) -> Result<usize> {
        if keys.is_empty() || route.deletes == Deletes::Ignore {
            return Ok(0);
        }
        let width = route.key_columns.len();
        let mut total = 0;
        for chunk in keys.chunks(10_000) {
            total += self.with(route, |client, w| {
                let Some(stmt) = &w.gone else { return Ok(0) };
                let args: Vec<pgrx::datum::DatumWithOid> =
                    arrays(chunk, width).into_iter().map(Into::into).collect();
                client.update(stmt, None, &args).map(|t| t.len()).map_err(spi_err)
            })?;
            shmem::bump(|c| &c.pg_ops, 1);
        }
        Ok(total)
    }

    /// Up to `limit` live rows' key columns (as text, in key order) after `after`: the
    /// deletion check's walk of the target.
    pub fn walk(
        &mut self,
        route: &Arc<Route>,
        after: Option<&[Option<String>]>,
        limit: i64,
    ) -> Result<Vec<Vec<Option<String>>>> {
        let width = route.key_columns.len();
        let rows = self.with(route, |client, w| {
            let table = match after {
                None => client.select(&w.walk_first, None, &[limit.into()]),
                Some(after) => {
                    let mut args: Vec<pgrx::datum::DatumWithOid> =
                        after.iter().map(|v| v.as_deref().into()).collect();
                    args.push(limit.into());
                    client.select(&w.walk_next, None, &args)
                }
            }
            .map_err(spi_err)?;
            let mut out = Vec::new();
            for row in table {
                let mut values = Vec::with_capacity(width);
                for i in 1..=width {
                    values.push(row.get::<String>(i).map_err(spi_err)?);
                }
                out.push(values);
            }
            Ok(out)
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(rows)
    }
}

/// Says that a route's target failed (the route's last error and the log); its keys are
/// tried again at the next pass.
pub fn failed(route: &str, error: &str) {
    let msg = format!("route \"{route}\": {error}");
    let now = shmem::now();
    shmem::update_route(route, |s| {
        s.last_error.set(&msg);
        s.last_error_time = now;
    });
    pgrx::warning!("{msg}");
}

/// Says that a key of a route cannot be written (its type, or the target refused it): the
/// route's last error and the log; it holds up nothing else and is tried again when it
/// changes.
pub fn report(route: &str, key: &[u8], error: &str) {
    let name: String = crate::encode::encode_name(key).chars().take(200).collect();
    let msg = format!("route \"{route}\": key \"{name}\" cannot be written: {error}");
    let now = shmem::now();
    shmem::update_route(route, |s| {
        s.last_error.set(&msg);
        s.last_error_time = now;
    });
    pgrx::warning!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_as_postgres_prints_them() {
        for ok in ["0", "7", "-12", "9000000000"] {
            assert!(canonical_integer(ok), "{ok}");
        }
        for bad in ["007", "+7", "-0", "", "-", "1e3", " 7", "7 "] {
            assert!(!canonical_integer(bad), "{bad}");
        }
    }

    #[test]
    fn strings_holding_json_objects_give_fields() {
        let f = json_object_fields(br#"{"name":"Ada","age":36,"tags":["a"],"none":null}"#)
            .expect("object");
        let get = |k: &str| f.iter().find(|(n, _)| n == k.as_bytes()).map(|(_, v)| v.clone());
        assert_eq!(get("name"), Some(b"Ada".to_vec()));
        assert_eq!(get("age"), Some(b"36".to_vec()));
        assert_eq!(get("tags"), Some(br#"["a"]"#.to_vec()));
        assert_eq!(get("none"), None, "a JSON null is an absent field (NULL)");
        assert!(json_object_fields(b"[1]").is_none());
        assert!(json_object_fields(b"plain").is_none());
    }
}
