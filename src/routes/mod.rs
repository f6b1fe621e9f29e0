//! Routes: streams and keys into the user's own tables, column by column, with Postgres'
//! own types. The generic stream and key-value tables stay the default for whatever no route
//! matches.
//!
//! - `mapping`: what a route maps and the rows it makes (pure: the reader threads use it)
//! - `catalog`: routes as `redis_sync.routes` holds them, checked against the catalog
//! - `sql`: the SQL functions that add, drop and list routes
//!
//! Routes live in `redis_sync.routes`, a configuration table of the extension (kept by
//! `pg_dump`). A trigger on it bumps a generation number in shared memory once the change
//! commits; each worker loads its kind of routes again when the number moves (and every
//! few seconds anyway), so a change by hand or by `pg_restore` counts too.

pub mod catalog;
pub mod mapping;
pub mod sql;

use std::sync::Arc;

use pgrx::pg_sys;

pub use mapping::{Kind, RowMap};

use crate::parse::{quote_ident, Pattern};

/// What a stream route does with a row its target already has (a unique key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Keep the stored row.
    Nothing,
    /// Overwrite it, on these key columns (sorted).
    Update(Vec<String>),
}

/// What a key route does when its key is deleted or expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deletes {
    Delete,
    Ignore,
    /// Sets this timestamptz column to the time the key was found gone.
    Mark(String),
}

/// A route, checked and ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub name: String,
    pub kind: Kind,
    pub patterns: Vec<Pattern>,
    pub target: pg_sys::Oid,
    /// The target, schema-qualified and quoted.
    pub table: String,
    /// Its schema and name, unquoted.
    pub schema: String,
    pub relname: String,
    pub map: Arc<RowMap>,
    /// The type of each mapped column (in `map`'s order), as the INSERT path casts to it.
    pub casts: Vec<String>,
    pub conflict: Conflict,
    pub deletes: Deletes,
    /// Key routes: the columns rows are upserted on (sorted).
    pub key_columns: Vec<String>,
}

/// A route that did not check out when loaded: its streams or keys wait, and
/// `redis_sync_routes()` says why.
#[derive(Clone, Debug)]
pub struct Broken {
    pub name: String,
    pub patterns: Vec<Pattern>,
    pub error: String,
}

/// The routes of one kind, as a worker runs them.
#[derive(Clone, Debug, Default)]
pub struct RouteSet {
    pub routes: Vec<Arc<Route>>,
    pub broken: Vec<Broken>,
    /// The routes could not be read (the worker role may not read `redis_sync.routes`, say):
    /// where anything goes is unknown, so everything waits rather than land in the wrong
    /// table.
    pub unreadable: Option<String>,
}

impl RouteSet {
    /// The set when the routes cannot be read, with why.
    pub fn unreadable(error: String) -> RouteSet {
        RouteSet { unreadable: Some(error), ..RouteSet::default() }
    }

    /// Every pattern of the set's routes, broken ones included.
    pub fn patterns(&self) -> Vec<Pattern> {
        let routes = self.routes.iter().flat_map(|r| r.patterns.iter());
        routes.chain(self.broken.iter().flat_map(|b| b.patterns.iter())).cloned().collect()
    }
}

/// Where a name goes.
#[derive(Clone, Debug)]
pub enum Destination<'n> {
    /// No route matches: the generic table.
    Generic,
    /// This route, with the parts its pattern matched.
    Route(Arc<Route>, Vec<&'n [u8]>),
    /// A route matches that is broken now: the name waits.
    Broken(String),
}

impl RouteSet {
    /// The route `name` goes to (see [`mapping::choose`]); a broken route counts as a
    /// match, so what it would take is held, not sent to the generic table.
    pub fn destination<'n>(&self, name: &'n [u8]) -> Destination<'n> {
        if let Some(e) = &self.unreadable {
            return Destination::Broken(format!("the routes cannot be read: {e}"));
        }
        let n = self.routes.len();
        let all = self
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.patterns.as_slice()))
            .chain(self.broken.iter().map(|b| (b.name.as_str(), b.patterns.as_slice())))
            .enumerate()
            .map(|(i, (name, p))| (i, name, p));
        match mapping::choose(all, name) {
            None => Destination::Generic,
            Some((i, parts)) if i < n => Destination::Route(self.routes[i].clone(), parts),
            Some((i, _)) => {
                let b = &self.broken[i - n];
                Destination::Broken(format!("route \"{}\" cannot run: {}", b.name, b.error))
            }
        }
    }
}

/// Loads the routes of `kind` (main thread of a worker): each checked; those that fail are
/// kept as broken, with the reason in `redis_sync_routes()` and the log.
pub fn load(kind: Kind, role: &str) -> crate::error::Result<RouteSet> {
    // Read as the superuser: the routes are the extension's configuration, readable
    // whatever role the worker writes as (checks of that role's privileges name it).
    let set = crate::pg::in_transaction(|| {
        crate::pg::as_superuser(|| {
            pgrx::Spi::connect(|client| {
                if !catalog::installed(client)? {
                    return Ok(RouteSet::default());
                }
                let mut set = RouteSet::default();
                for def in catalog::load(client, Some(kind))? {
                    match catalog::check(client, &def, role) {
                        Ok(r) => set.routes.push(Arc::new(r)),
                        Err(e) => set.broken.push(Broken {
                            name: def.name.clone(),
                            patterns: crate::parse::parse_list(&def.patterns)
                                .iter()
                                .map(|p| Pattern::new(p))
                                .collect(),
                            error: e.message,
                        }),
                    }
                }
                Ok(set)
            })
        })
    })?;
    let names: Vec<String> = set
        .routes
        .iter()
        .map(|r| r.name.clone())
        .chain(set.broken.iter().map(|b| b.name.clone()))
        .collect();
    crate::shmem::keep_routes(kind == Kind::Key, &names);
    let now = crate::shmem::now();
    for b in &set.broken {
        crate::shmem::update_route(&b.name, |s| {
            if s.last_error.as_str() != b.error {
                s.last_error.set(&b.error);
                s.last_error_time = now;
            }
        });
    }
    for r in &set.routes {
        crate::shmem::update_route(&r.name, |s| {
            if s.last_error.as_str().starts_with("route ") {
                s.last_error.set("");
            }
        });
    }
    Ok(set)
}

/// The last landing record written (`None` when there is none), main thread.
pub fn landed_max() -> crate::error::Result<Option<i64>> {
    crate::pg::in_transaction(|| {
        crate::pg::as_superuser(|| {
            pgrx::Spi::connect(|client| {
                if !catalog::installed(client)? {
                    return Ok(None);
                }
                client
                    .select("SELECT max(seq) FROM redis_sync.landed", None, &[])
                    .map_err(crate::pg::spi_err)?
                    .first()
                    .get_one::<i64>()
                    .map_err(crate::pg::spi_err)
            })
        })
    })
}

/// Deletes the landing records that can no longer matter: for each routed stream (stream as
/// stored, the IDs pending in the group, read after record `floor` was written), the records
/// up to `floor` holding none of those IDs, whichever route wrote them. Their entries are
/// acknowledged, so no re-read will meet them.
pub fn forget_landed(
    group: &str,
    streams: &[(String, Vec<String>, i64)],
) -> crate::error::Result<()> {
    if streams.is_empty() {
        return Ok(());
    }
    crate::pg::in_transaction(|| {
        crate::pg::as_superuser(|| {
            pgrx::Spi::connect_mut(|client| {
                for (stream, pending, floor) in streams {
                    client
                        .update(
                            "DELETE FROM redis_sync.landed
                          WHERE stream_key = $1 AND consumer_group = $2
                            AND seq <= $3 AND NOT (ids OPERATOR(pg_catalog.&&) $4::text[])",
                            None,
                            &[
                                stream.as_str().into(),
                                group.into(),
                                (*floor).into(),
                                pending.clone().into(),
                            ],
                        )
                        .map_err(crate::pg::spi_err)?;
                }
                Ok(())
            })
        })
    })
}

/// `INSERT INTO target [AS t] (columns) SELECT ...` of a route's rows, given as one text array
/// per mapped column (`$1::text[]`, ...), each cast to its column's type (its input function,
/// as COPY uses; the column's own modifier applies on assignment). With `dedupe`, rows with
/// the same values of those columns are written once, the last one winning (an upsert may
/// not touch one row twice).
pub fn insert_select(
    route: &Route,
    casts: &[String],
    alias: bool,
    dedupe: Option<&[String]>,
) -> String {
    let cols: Vec<String> = route.map.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let aliases: Vec<String> = (1..=cols.len()).map(|k| format!("c{k}")).collect();
    let values: Vec<String> =
        aliases.iter().zip(casts).map(|(a, t)| format!("u.{a}::{t}")).collect();
    let params: Vec<String> = (1..=cols.len()).map(|k| format!("${k}::text[]")).collect();
    let (distinct, order) = match dedupe {
        Some(keys) if !keys.is_empty() => {
            let exprs: Vec<String> = keys
                .iter()
                .filter_map(|k| route.map.columns.iter().position(|c| &c.name == k))
                .map(|i| values[i].clone())
                .collect();
            (
                format!("DISTINCT ON ({}) ", exprs.join(", ")),
                format!(" ORDER BY {}, u.ord DESC", exprs.join(", ")),
            )
        }
        _ => (String::new(), String::new()),
    };
    format!(
        "INSERT INTO {}{} ({}) SELECT {distinct}{} FROM {}({}) WITH ORDINALITY AS u({}, ord){order}",
        route.table,
        if alias { " AS t" } else { "" },
        cols.join(", "),
        values.join(", "),
        unnest(params.len()),
        params.join(", "),
        aliases.join(", "),
    )
}

/// The `unnest` of `args` arrays, always the built-in one: with several, Postgres itself
/// calls `pg_catalog.unnest` for each (and refuses a qualified name); with one, the name is
/// qualified, so no `unnest(text[])` a user made in a schema of the path can stand in.
pub fn unnest(args: usize) -> &'static str {
    if args == 1 {
        "pg_catalog.unnest"
    } else {
        "unnest"
    }
}
