//! The SQL functions of routes: add (checked up front, with a clear error), drop, list. They
//! run in the caller's backend, as the caller; privileges are set in `sql/finalize.sql`.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, PgRelation};

use super::catalog::{self, Def, Invalid};
use super::mapping::Kind;
use crate::parse::parse_list;
use crate::pg::spi_err;
use crate::shmem;

fn raise(e: Invalid) -> ! {
    ereport!(PgLogLevel::ERROR, e.sqlstate, e.message);
    unreachable!("ereport(ERROR) does not return")
}

fn spi<T>(r: Result<T, pgrx::spi::SpiError>) -> T {
    r.unwrap_or_else(|e| raise(Invalid::from(spi_err(e))))
}

/// Refuses a route that would claim a name another route of its kind claims with the same
/// pattern (which one wins would be arbitrary); overlapping patterns are allowed, and the
/// more specific one wins (see the README).
fn refuse_ambiguous(client: &SpiClient<'_>, def: &Def) {
    let others = catalog::load(client, Some(def.kind)).unwrap_or_else(|e| raise(e.into()));
    if others.len() >= shmem::MAX_ROUTES {
        raise(Invalid {
            sqlstate: PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            message: format!("there are {} routes already, the most there may be", others.len()),
        });
    }
    let mine = parse_list(&def.patterns);
    for other in others.iter().filter(|o| o.name != def.name) {
        if let Some(p) = parse_list(&other.patterns).into_iter().find(|p| mine.contains(p)) {
            raise(Invalid {
                sqlstate: PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                message: format!(
                    "route \"{}\" already claims the pattern \"{p}\": which route takes its {}s would be arbitrary; drop or change one of them",
                    other.name,
                    def.kind.as_str()
                ),
            });
        }
    }
}

/// The caller must be allowed to do to the target what the route will make the worker do
/// (a grantee of these functions cannot route data into, or delete rows of, a table it may
/// not write itself).
fn refuse_without_privileges(client: &SpiClient<'_>, def: &Def) {
    let mut needed = vec!["INSERT"];
    match def.kind {
        Kind::Stream if def.conflict == "update" => needed.push("UPDATE"),
        Kind::Stream => {}
        Kind::Key => {
            needed.push("UPDATE");
            if def.deletes == "delete" {
                needed.push("DELETE");
            }
        }
    }
    for privilege in needed {
        let granted = spi(client
            .select(
                "SELECT pg_catalog.has_table_privilege(current_user, $1, $2)",
                None,
                &[def.target.into(), privilege.into()],
            )
            .and_then(|t| t.first().get_one::<bool>()));
        if granted != Some(true) {
            raise(Invalid {
                sqlstate: PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                message: format!(
                    "route \"{}\": you may not {privilege} the target table yourself, so you may not route to it",
                    def.name
                ),
            });
        }
    }
}

fn add(def: Def) {
    Spi::connect_mut(|client| {
        if !catalog::installed(client).unwrap_or_else(|e| raise(e.into())) {
            raise(Invalid {
                sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                message: "redis_sync.routes is missing: update the extension (ALTER EXTENSION redis_pg_sync UPDATE)".into(),
            });
        }
        let exists = spi(client
            .select(
                "SELECT 1 FROM redis_sync.routes WHERE name = $1",
                None,
                &[def.name.as_str().into()],
            )
            .map(|t| !t.is_empty()));
        if exists {
            raise(Invalid {
                sqlstate: PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                message: format!(
                    "route \"{}\" exists already: drop it first (redis_sync_drop_route), or change it in redis_sync.routes",
                    def.name
                ),
            });
        }
        refuse_ambiguous(client, &def);
        refuse_without_privileges(client, &def);
        let role = crate::gucs::text(&crate::gucs::ROLE);
        if let Err(e) = catalog::check(client, &def, &role) {
            raise(e);
        }
        let columns = def.columns.to_string();
        let key_columns = (def.kind == Kind::Key).then(|| def.key_columns.clone());
        let (conflict, deletes) = match def.kind {
            Kind::Stream => (Some(def.conflict.clone()), None),
            Kind::Key => (None, Some(def.deletes.clone())),
        };
        let inserted = client.update(
            "INSERT INTO redis_sync.routes
                    (name, kind, patterns, target, columns, key_columns, conflict, deletes)
             VALUES ($1, $2, $3, $4::oid::regclass, $5::jsonb, $6, $7, $8)",
            None,
            &[
                def.name.as_str().into(),
                def.kind.as_str().into(),
                def.patterns.as_str().into(),
                def.target.into(),
                columns.as_str().into(),
                key_columns.into(),
                conflict.into(),
                deletes.into(),
            ],
        );
        spi(inserted);
    });
}

/// Adds a route: streams matching `streams` (comma-separated fnmatch patterns) land in
/// `target`, one row per entry, with `columns` mapping target columns to fields or meta
/// values. `conflict`: what a row the target already has (a unique key) does: 'nothing'
/// keeps the stored one, 'update' overwrites it.
#[pg_extern(volatile)]
fn redis_sync_add_stream_route(
    name: &str,
    streams: &str,
    target: PgRelation,
    columns: JsonB,
    conflict: default!(&str, "'nothing'"),
) {
    add(Def {
        name: name.to_owned(),
        kind: Kind::Stream,
        patterns: streams.to_owned(),
        target: target.oid(),
        columns: columns.0,
        key_columns: Vec::new(),
        conflict: conflict.to_owned(),
        deletes: "ignore".into(),
    });
}

/// Adds a route: keys matching `keys` (hashes, or strings holding a JSON object) become rows
/// of `target`, upserted on `key_columns`; `deletes` says what a key deleted or expired does
/// to its row: 'delete', 'ignore' or 'mark:<timestamptz column>'.
#[pg_extern(volatile)]
fn redis_sync_add_key_route(
    name: &str,
    keys: &str,
    target: PgRelation,
    columns: JsonB,
    key_columns: Vec<String>,
    deletes: default!(&str, "'delete'"),
) {
    add(Def {
        name: name.to_owned(),
        kind: Kind::Key,
        patterns: keys.to_owned(),
        target: target.oid(),
        columns: columns.0,
        key_columns,
        conflict: "nothing".into(),
        deletes: deletes.to_owned(),
    });
}

/// Drops a route; true when there was one of that name. What it matched goes to the
/// generic tables again (or to another route that matches).
#[pg_extern(volatile)]
fn redis_sync_drop_route(name: &str) -> bool {
    Spi::connect_mut(|client| {
        let dropped = spi(client.update(
            "DELETE FROM redis_sync.routes WHERE name = $1 RETURNING name",
            None,
            &[name.into()],
        ));
        // Its landing records go with it: entries it left pending go to where their streams
        // go now.
        spi(client.update("DELETE FROM redis_sync.landed WHERE route = $1", None, &[name.into()]));
        if dropped.is_empty() {
            ereport!(
                PgLogLevel::NOTICE,
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("there is no route \"{name}\"")
            );
            return false;
        }
        true
    })
}

fn ts(v: i64) -> Option<TimestampWithTimeZone> {
    (v != 0).then(|| TimestampWithTimeZone::try_from(v).ok()).flatten()
}

/// A row per route: its definition and what it did (rows landed, dead letters, last
/// landed, last error). Runs as the extension's owner, so `pg_monitor` may read it without
/// a grant on `redis_sync.routes`.
#[allow(clippy::type_complexity)] // pgrx needs the named columns spelled out here
#[pg_extern(volatile, security_definer)]
fn redis_sync_routes() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(kind, String),
        name!(patterns, String),
        name!(target, String),
        name!(columns, JsonB),
        name!(key_columns, Option<Vec<String>>),
        name!(conflict, Option<String>),
        name!(deletes, Option<String>),
        name!(rows_landed, i64),
        name!(dead_letters, i64),
        name!(last_landed, Option<TimestampWithTimeZone>),
        name!(last_error, Option<String>),
    ),
> {
    let rows = Spi::connect(|client| {
        let table = spi(client.select(
            "SELECT name, kind, patterns, target::text, columns, key_columns, conflict, deletes
               FROM redis_sync.routes ORDER BY name",
            None,
            &[],
        ));
        let mut out = Vec::new();
        for row in table {
            let text = |i| spi(row.get::<String>(i)).unwrap_or_default();
            out.push((
                text(1),
                text(2),
                text(3),
                text(4),
                spi(row.get::<JsonB>(5)).unwrap_or(JsonB(serde_json::Value::Null)),
                spi(row.get::<Vec<String>>(6)),
                spi(row.get::<String>(7)),
                spi(row.get::<String>(8)),
            ));
        }
        out
    });
    let slots = shmem::route_slots();
    let out: Vec<_> = rows
        .into_iter()
        .map(|(name, kind, patterns, target, columns, key_columns, conflict, deletes)| {
            let slot = slots.iter().find(|s| s.name.as_str() == name && s.keys == (kind == "key"));
            let (landed, dead, last, error) = slot.map_or((0, 0, 0, String::new()), |s| {
                (s.rows_landed, s.dead_letters, s.last_landed, s.last_error.as_str().to_owned())
            });
            (
                name,
                kind,
                patterns,
                target,
                columns,
                key_columns,
                conflict,
                deletes,
                landed,
                dead,
                ts(last),
                (!error.is_empty()).then_some(error),
            )
        })
        .collect();
    TableIterator::new(out)
}

/// The trigger on `redis_sync.routes`: once the change commits, the workers load the routes
/// again.
#[pg_trigger]
pub fn redis_sync_routes_changed<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::heap_tuple::PgHeapTupleError> {
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, shmem::bump_routes_generation);
    Ok(None)
}
