//! Routes as `redis_sync.routes` holds them, checked against the catalog: the same checks
//! when a route is added (in the caller's backend, as errors) and when a worker loads the
//! routes (a route that no longer holds, say its target was dropped, is kept out with its
//! reason, and the rest go on).

use std::sync::Arc;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::mapping::{Column, ColumnType, Kind, RowMap, Source};
use super::{Conflict, Deletes, Route};
use crate::error::{Result, SyncError};
use crate::parse::{parse_list, Pattern};
use crate::pg::spi_err;

/// A route as stored: what the user gave.
#[derive(Clone, Debug)]
pub struct Def {
    pub name: String,
    pub kind: Kind,
    pub patterns: String,
    pub target: pg_sys::Oid,
    pub columns: serde_json::Value,
    pub key_columns: Vec<String>,
    /// Stream routes: `nothing` or `update`.
    pub conflict: String,
    /// Key routes: `delete`, `ignore` or `mark:<column>`.
    pub deletes: String,
}

/// A route's definition did not hold: said to the user as an error with this SQLSTATE.
pub struct Invalid {
    pub sqlstate: PgSqlErrorCode,
    pub message: String,
}

fn invalid(message: String) -> Invalid {
    Invalid { sqlstate: PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message }
}

impl From<SyncError> for Invalid {
    fn from(e: SyncError) -> Invalid {
        Invalid { sqlstate: e.sqlstate(), message: e.to_string() }
    }
}

/// Does `redis_sync.routes` exist in this database (the extension is installed here)?
pub fn installed(client: &SpiClient<'_>) -> Result<bool> {
    Ok(client
        .select("SELECT to_regclass('redis_sync.routes') IS NOT NULL", None, &[])
        .map_err(spi_err)?
        .first()
        .get_one::<bool>()
        .map_err(spi_err)?
        .unwrap_or(false))
}

/// Every route of `kind` (all when `None`), in name order.
pub fn load(client: &SpiClient<'_>, kind: Option<Kind>) -> Result<Vec<Def>> {
    let rows = client
        .select(
            "SELECT name, kind, patterns, target::oid, columns::text,
                    coalesce(key_columns, '{}'), coalesce(conflict, 'nothing'),
                    coalesce(deletes, 'delete')
               FROM redis_sync.routes
              WHERE $1::text IS NULL OR kind = $1
              ORDER BY name",
            None,
            &[kind.map(Kind::as_str).into()],
        )
        .map_err(spi_err)?;
    let mut out = Vec::new();
    for row in rows {
        let text = |i: usize| -> Result<String> {
            Ok(row.get::<String>(i).map_err(spi_err)?.unwrap_or_default())
        };
        let kind = if text(2)? == "key" { Kind::Key } else { Kind::Stream };
        let columns: serde_json::Value =
            serde_json::from_str(&text(5)?).unwrap_or(serde_json::Value::Null);
        out.push(Def {
            name: text(1)?,
            kind,
            patterns: text(3)?,
            target: row.get::<pg_sys::Oid>(4).map_err(spi_err)?.unwrap_or(pg_sys::InvalidOid),
            columns,
            key_columns: row.get::<Vec<String>>(6).map_err(spi_err)?.unwrap_or_default(),
            conflict: text(7)?,
            deletes: text(8)?,
        });
    }
    Ok(out)
}

/// A column of the target as the catalog has it.
struct TargetColumn {
    name: String,
    /// The type without its modifier, as SQL can name it (`integer`, `public.mood`,
    /// `character varying`): the cast of the INSERT path; the column's own modifier still
    /// applies when the value is assigned.
    cast: String,
    bytea: bool,
    generated: bool,
    timestamp: bool,
}

fn target_columns(client: &SpiClient<'_>, oid: pg_sys::Oid) -> Result<Vec<TargetColumn>> {
    let rows = client
        .select(
            "SELECT attname::text, pg_catalog.format_type(atttypid, -1),
                    atttypid = 'bytea'::regtype, attgenerated <> '',
                    atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype)
               FROM pg_catalog.pg_attribute
              WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
              ORDER BY attnum",
            None,
            &[oid.into()],
        )
        .map_err(spi_err)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(TargetColumn {
            name: row.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
            cast: row.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
            bytea: row.get::<bool>(3).map_err(spi_err)?.unwrap_or(false),
            generated: row.get::<bool>(4).map_err(spi_err)?.unwrap_or(false),
            timestamp: row.get::<bool>(5).map_err(spi_err)?.unwrap_or(false),
        });
    }
    Ok(out)
}

/// The column sets of the target's unique indexes that an `ON CONFLICT` can name (valid,
/// not partial, no expressions), primary key first, each sorted.
fn unique_keys(client: &SpiClient<'_>, oid: pg_sys::Oid) -> Result<Vec<Vec<String>>> {
    let rows = client
        .select(
            "SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attname)
               FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_attribute a
                 ON a.attrelid = i.indrelid
                AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1])
              WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate
                AND i.indpred IS NULL AND i.indexprs IS NULL
              GROUP BY i.indexrelid, i.indisprimary
              ORDER BY i.indisprimary DESC, i.indexrelid",
            None,
            &[oid.into()],
        )
        .map_err(spi_err)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.get::<Vec<String>>(1).map_err(spi_err)?.unwrap_or_default());
    }
    Ok(out)
}

/// The role the workers write as (`redis_sync.role`), `None` when it is the bootstrap
/// superuser (empty setting) or a superuser.
fn worker_role(client: &SpiClient<'_>, role: &str) -> Result<Option<String>> {
    if role.is_empty() {
        return Ok(None);
    }
    let is_super = client
        .select("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", None, &[role.into()])
        .map_err(spi_err)?
        .first()
        .get_one::<bool>()
        .map_err(spi_err)?;
    Ok(match is_super {
        Some(true) => None,
        // A role that does not exist is the settings' problem, said by the worker.
        _ => Some(role.to_owned()),
    })
}

/// Is `privilege` on `column` of the target granted to `role`?
fn column_privilege(
    client: &SpiClient<'_>,
    role: &str,
    oid: pg_sys::Oid,
    column: &str,
    privilege: &str,
) -> Result<bool> {
    Ok(client
        .select(
            "SELECT pg_catalog.has_column_privilege($1, $2, $3, $4)",
            None,
            &[role.into(), oid.into(), column.into(), privilege.into()],
        )
        .map_err(spi_err)?
        .first()
        .get_one::<bool>()
        .map_err(spi_err)?
        .unwrap_or(false))
}

/// Checks `def` against the catalog and builds the route the workers run. `role`: the
/// `redis_sync.role` setting.
pub fn check(client: &SpiClient<'_>, def: &Def, role: &str) -> std::result::Result<Route, Invalid> {
    crate::parse::check_identifier(&def.name)
        .map_err(|e| invalid(format!("route name \"{}\": {e}", def.name)))?;
    let patterns: Vec<Pattern> =
        parse_list(&def.patterns).iter().map(|p| Pattern::new(p)).collect();
    if patterns.is_empty() {
        return Err(invalid(format!("route \"{}\": no pattern given", def.name)));
    }
    let target = client
        .select(
            "SELECT n.nspname::text, c.relname::text, c.relkind::text
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1",
            None,
            &[def.target.into()],
        )
        .map_err(spi_err)
        .map_err(Invalid::from)?;
    let mut found = None;
    for row in target {
        let get = |i| row.get::<String>(i).map_err(spi_err).map(Option::unwrap_or_default);
        found = Some((get(1)?, get(2)?, get(3)?));
    }
    let Some((schema, table, relkind)) = found else {
        return Err(Invalid {
            sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            message: format!(
                "route \"{}\": its target table (oid {}) no longer exists",
                def.name,
                def.target.to_u32()
            ),
        });
    };
    if relkind != "r" && relkind != "p" {
        return Err(Invalid {
            sqlstate: PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            message: format!("route \"{}\": \"{schema}.{table}\" is not a table", def.name),
        });
    }
    if schema == "redis_sync" || schema == "pg_catalog" || schema == "information_schema" {
        return Err(invalid(format!(
            "route \"{}\": \"{schema}.{table}\" is not a table a route may write",
            def.name
        )));
    }
    let qualified =
        format!("{}.{}", crate::pg::quote_identifier(&schema), crate::pg::quote_identifier(&table));
    let cols = target_columns(client, def.target).map_err(Invalid::from)?;
    let Some(map) = def.columns.as_object().filter(|m| !m.is_empty()) else {
        return Err(invalid(format!(
            "route \"{}\": columns must be a JSON object of target column to source, such as {{\"heart_rate\": \"hr\", \"entry_id\": \"$id\"}}",
            def.name
        )));
    };
    let mut columns = Vec::new();
    let mut casts = Vec::new();
    for (column, source) in map {
        let Some(tc) = cols.iter().find(|c| &c.name == column) else {
            return Err(Invalid {
                sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                message: format!("route \"{}\": {qualified} has no column \"{column}\"", def.name),
            });
        };
        if tc.generated {
            return Err(invalid(format!(
                "route \"{}\": column \"{column}\" of {qualified} is generated and cannot be written",
                def.name
            )));
        }
        let Some(text) = source.as_str() else {
            return Err(invalid(format!(
                "route \"{}\": the source of column \"{column}\" must be a string (a field name or a meta value such as \"$id\")",
                def.name
            )));
        };
        let source = Source::parse(text, def.kind)
            .map_err(|e| invalid(format!("route \"{}\", column \"{column}\": {e}", def.name)))?;
        if let Source::KeyPart(n) = source {
            if let Some(p) = patterns.iter().find(|p| p.wildcards() < n) {
                return Err(invalid(format!(
                    "route \"{}\", column \"{column}\": $key_part {n}, but the pattern \"{}\" has {} wildcard(s)",
                    def.name,
                    p.as_str(),
                    p.wildcards()
                )));
            }
        }
        let ty = if tc.bytea { ColumnType::Bytea } else { ColumnType::Text };
        columns.push(Column { name: column.clone(), source, ty });
        casts.push(tc.cast.clone());
    }
    let mapped = |c: &str| columns.iter().any(|m| m.name == c);
    let keys = unique_keys(client, def.target).map_err(Invalid::from)?;
    let mut needs: Vec<(String, &'static str)> =
        columns.iter().map(|c| (c.name.clone(), "INSERT")).collect();
    let (conflict, deletes, key_columns) = match def.kind {
        Kind::Stream => {
            let conflict = match def.conflict.as_str() {
                "nothing" => Conflict::Nothing,
                "update" => {
                    let Some(key) = keys.iter().find(|k| k.iter().all(|c| mapped(c))) else {
                        return Err(invalid(format!(
                            "route \"{}\": conflict 'update' needs a primary key or unique constraint of {qualified} whose columns are all mapped",
                            def.name
                        )));
                    };
                    for c in &columns {
                        needs.push((c.name.clone(), "UPDATE"));
                    }
                    Conflict::Update(key.clone())
                }
                other => {
                    return Err(invalid(format!(
                        "route \"{}\": conflict must be 'nothing' or 'update', not '{other}'",
                        def.name
                    )))
                }
            };
            (conflict, Deletes::Ignore, Vec::new())
        }
        Kind::Key => {
            let mut key_columns = def.key_columns.clone();
            if key_columns.is_empty() {
                return Err(invalid(format!(
                    "route \"{}\": key_columns must name the target's columns the rows are upserted on",
                    def.name
                )));
            }
            if let Some(c) = key_columns.iter().find(|c| !mapped(c)) {
                return Err(invalid(format!(
                    "route \"{}\": key column \"{c}\" is not in columns (map it to $key or $key_part N)",
                    def.name
                )));
            }
            key_columns.sort();
            key_columns.dedup();
            if !keys.contains(&key_columns) {
                return Err(Invalid {
                    sqlstate: PgSqlErrorCode::ERRCODE_INVALID_COLUMN_REFERENCE,
                    message: format!(
                        "route \"{}\": {qualified} has no unique constraint on exactly ({}): add one (ALTER TABLE {qualified} ADD UNIQUE ({})) so rows can be upserted",
                        def.name,
                        key_columns.join(", "),
                        key_columns.join(", ")
                    ),
                });
            }
            for c in &columns {
                needs.push((c.name.clone(), "UPDATE"));
            }
            for c in &key_columns {
                needs.push((c.clone(), "SELECT"));
            }
            let deletes = match def.deletes.as_str() {
                "delete" => {
                    needs.push((key_columns[0].clone(), "DELETE"));
                    Deletes::Delete
                }
                "ignore" => Deletes::Ignore,
                other => match other.strip_prefix("mark:") {
                    Some(col) if mapped(col) => {
                        return Err(invalid(format!(
                            "route \"{}\": deletes 'mark:{col}' sets \"{col}\", which columns maps too",
                            def.name
                        )))
                    }
                    Some(col) if cols.iter().any(|c| c.name == col && c.timestamp) => {
                        needs.push((col.to_owned(), "UPDATE"));
                        Deletes::Mark(col.to_owned())
                    }
                    Some(col) => {
                        return Err(invalid(format!(
                            "route \"{}\": deletes 'mark:{col}' needs a timestamptz column \"{col}\" of {qualified}",
                            def.name
                        )))
                    }
                    None => {
                        return Err(invalid(format!(
                            "route \"{}\": deletes must be 'delete', 'ignore' or 'mark:<timestamptz column>', not '{other}'",
                            def.name
                        )))
                    }
                },
            };
            if deletes != Deletes::Ignore {
                // Rows of keys gone while no worker watched are found by walking the target,
                // so its key columns must give back the key.
                let names_key = columns
                    .iter()
                    .any(|c| c.source == Source::Key && key_columns.contains(&c.name));
                let parts_all = patterns.iter().all(|p| {
                    (1..=p.wildcards()).all(|n| {
                        columns.iter().any(|c| {
                            c.source == Source::KeyPart(n) && key_columns.contains(&c.name)
                        })
                    }) && p.fill(&vec![&b"x"[..]; p.wildcards()]).is_some()
                });
                // Its text must give the key back exactly: text, or an integer (written as
                // Postgres prints it, which the worker checks key by key).
                for (i, c) in columns.iter().enumerate() {
                    let from_key = matches!(c.source, Source::Key | Source::KeyPart(_));
                    let exact = matches!(
                        casts[i].as_str(),
                        "text" | "character varying" | "smallint" | "integer" | "bigint"
                    );
                    if from_key && key_columns.contains(&c.name) && !exact {
                        return Err(invalid(format!(
                            "route \"{}\": key column \"{}\" is {}, whose text does not give the Redis key back exactly; with deletes '{}' key columns taken from the key must be text, varchar or an integer type (or use deletes 'ignore')",
                            def.name, c.name, casts[i], def.deletes
                        )));
                    }
                }
                if !names_key && !parts_all {
                    return Err(invalid(format!(
                        "route \"{}\": with deletes '{}' the key columns must give back the Redis key: map $key, or $key_part N for every wildcard of patterns without [...] classes, to key columns",
                        def.name, def.deletes
                    )));
                }
            }
            (Conflict::Nothing, deletes, key_columns)
        }
    };
    if let Some(role) = worker_role(client, role).map_err(Invalid::from)? {
        // (The DELETE privilege is table-wide: has_column_privilege does not know it.)
        for (column, privilege) in &needs {
            let granted = if *privilege == "DELETE" {
                client
                    .select(
                        "SELECT pg_catalog.has_table_privilege($1, $2, 'DELETE')",
                        None,
                        &[role.as_str().into(), def.target.into()],
                    )
                    .map_err(spi_err)
                    .and_then(|t| t.first().get_one::<bool>().map_err(spi_err))
                    .map_err(Invalid::from)?
                    .unwrap_or(false)
            } else {
                column_privilege(client, &role, def.target, column, privilege)
                    .map_err(Invalid::from)?
            };
            if !granted {
                let what = if *privilege == "DELETE" {
                    format!("GRANT DELETE ON {qualified} TO {}", crate::pg::quote_identifier(&role))
                } else {
                    format!(
                        "GRANT {privilege} ({}) ON {qualified} TO {}",
                        crate::pg::quote_identifier(column),
                        crate::pg::quote_identifier(&role)
                    )
                };
                return Err(Invalid {
                    sqlstate: PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    message: format!(
                        "route \"{}\": the worker writes as role {role}, which may not {privilege} {qualified}.{column}; run: {what}",
                        def.name
                    ),
                });
            }
        }
    }
    Ok(Route {
        name: def.name.clone(),
        kind: def.kind,
        patterns,
        target: def.target,
        table: qualified,
        schema,
        relname: table,
        map: Arc::new(RowMap { route: def.name.clone(), columns }),
        casts,
        conflict,
        deletes,
        key_columns,
    })
}

/// The types of a route's mapped columns now, as its INSERT casts to them (`ALTER TABLE ...
/// TYPE` is followed); a mapped column that is gone is an error.
pub fn current_casts(client: &SpiClient<'_>, route: &Route) -> Result<Vec<String>> {
    let names: Vec<&str> = route.map.columns.iter().map(|c| c.name.as_str()).collect();
    let rows = client
        .select(
            "SELECT pg_catalog.format_type(a.atttypid, -1)
               FROM pg_catalog.unnest($2::text[]) WITH ORDINALITY AS c(n, i)
               LEFT JOIN pg_catalog.pg_attribute a
                 ON a.attrelid = $1 AND a.attname = c.n AND NOT a.attisdropped
              ORDER BY c.i",
            None,
            &[route.target.into(), names.into()],
        )
        .map_err(spi_err)?;
    let mut out = Vec::new();
    for row in rows {
        match row.get::<String>(1).map_err(spi_err)? {
            Some(t) => out.push(t),
            None => {
                return Err(SyncError::Postgres {
                    sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    message: format!("a mapped column of {} is gone", route.table),
                })
            }
        }
    }
    Ok(out)
}
