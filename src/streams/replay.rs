//! `redis_sync_replay_dead_letters()`: dead letters written back to the stream table, each
//! in a subtransaction of the caller's transaction, once the cause of their refusal is
//! fixed. Runs in the calling backend, as the calling role.

use pgrx::prelude::*;

use crate::encode::entry_id_millis;
use crate::error::Result;
use crate::gucs;
use crate::parse::Pattern;
use crate::pg::ddl::{qualified, DEAD_LETTER_TABLE};
use crate::pg::{in_subtransaction, spi_err};

/// Dead letters read per round of the walk.
const CHUNK: i64 = 1000;

/// What replaying found: rows that landed (and left the dead-letter table) and rows still
/// refused (kept, `attempts` raised).
#[derive(Debug, Default, PartialEq)]
pub struct Replayed {
    pub landed: i64,
    pub stayed: i64,
}

struct DeadLetter {
    id: i64,
    stream_key: String,
    message_id: String,
    fields: String,
    /// The route it was refused by (`None`: the stream table's).
    route: Option<String>,
}

/// A route's replay: its checked definition and its INSERT.
struct RouteReplay {
    route: Option<crate::routes::Route>,
    error: String,
}

/// Replays the dead letters whose stream (as stored) matches `pattern`, at most `max` of
/// them, oldest first; with `route`, only that route's (`''`: only the stream table's).
/// A route's dead letter goes through the route as it is now (its mapping, its target's
/// column types); one whose route is gone stays, saying so.
pub fn replay(pattern: &str, max: Option<i64>, only_route: Option<&str>) -> Result<Replayed> {
    let schema = gucs::text(&gucs::SCHEMA);
    let table = qualified(&schema, &gucs::text(&gucs::STREAM_TABLE));
    let dead = qualified(&schema, DEAD_LETTER_TABLE);
    let pattern = Pattern::new(pattern);
    let insert = format!(
        "INSERT INTO {table} (stream_key, message_id, data, \"timestamp\")
         VALUES ($1, $2, $3::jsonb, to_timestamp($4::float8 / 1000))
         ON CONFLICT (stream_key, message_id) DO NOTHING"
    );
    let remove = format!("DELETE FROM {dead} WHERE id = $1");
    let keep = format!(
        "UPDATE {dead} SET attempts = attempts + 1, error = $2, sqlstate = $3, created_at = now()
          WHERE id = $1"
    );
    // A dead letter stored under a shortened stream name (the full one too long for the
    // index) keeps the full name and the fields in `fields`.
    let mut out = Replayed::default();
    let mut after = 0i64;
    let limit = max.unwrap_or(i64::MAX);
    let role = gucs::text(&gucs::ROLE);
    let mut routes: std::collections::HashMap<String, RouteReplay> = Default::default();
    Spi::connect_mut(|client| {
        // (A dead-letter table made before routes has no route column.)
        let has_route = client
            .select(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                                 WHERE attrelid = pg_catalog.to_regclass($1)
                                   AND attname = 'route' AND NOT attisdropped)",
                None,
                &[dead.as_str().into()],
            )
            .map_err(spi_err)?
            .first()
            .get_one::<bool>()
            .map_err(spi_err)?
            .unwrap_or(false);
        let next = format!(
            "SELECT id,
                    CASE WHEN {wrapped} THEN fields->>'stream_key' ELSE stream_key END,
                    message_id,
                    CASE WHEN {wrapped} THEN (fields->'fields')::text ELSE fields::text END,
                    {route}
               FROM {dead} WHERE id > $1 ORDER BY id LIMIT $2",
            wrapped = "stream_key LIKE '%characters, md5 %)' AND fields ? 'stream_key' AND fields ? 'fields'",
            route = if has_route { "route" } else { "NULL::text" },
        );
        loop {
            let rows =
                client.select(&next, None, &[after.into(), CHUNK.into()]).map_err(spi_err)?;
            let mut batch = Vec::new();
            for row in rows {
                batch.push(DeadLetter {
                    id: row.get::<i64>(1).map_err(spi_err)?.unwrap_or_default(),
                    stream_key: row.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
                    message_id: row.get::<String>(3).map_err(spi_err)?.unwrap_or_default(),
                    fields: row.get::<String>(4).map_err(spi_err)?.unwrap_or_default(),
                    route: row.get::<String>(5).map_err(spi_err)?,
                });
            }
            let Some(last) = batch.last() else { break };
            after = last.id;
            for d in batch {
                if out.landed + out.stayed >= limit {
                    return Ok(());
                }
                if !pattern.matches(d.stream_key.as_bytes()) {
                    continue;
                }
                if only_route.is_some_and(|r| r != d.route.as_deref().unwrap_or("")) {
                    continue;
                }
                let (name, fields) = (&d.stream_key, &d.fields);
                let millis = entry_id_millis(&d.message_id).unwrap_or(0);
                let landed = in_subtransaction(|| {
                    match &d.route {
                        None => {
                            client
                                .update(
                                    &insert,
                                    None,
                                    &[
                                        name.as_str().into(),
                                        d.message_id.as_str().into(),
                                        fields.as_str().into(),
                                        millis.into(),
                                    ],
                                )
                                .map_err(spi_err)?;
                        }
                        Some(r) => {
                            let replay = routes
                                .entry(r.clone())
                                .or_insert_with(|| route_for_replay(client, r, &role));
                            let Some(route) = &replay.route else {
                                return Err(crate::error::SyncError::Postgres {
                                    sqlstate: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                                    message: replay.error.clone(),
                                });
                            };
                            insert_through_route(client, route, &d, millis)?;
                        }
                    }
                    client.update(&remove, None, &[d.id.into()]).map_err(spi_err)?;
                    Ok(())
                });
                match landed {
                    Ok(()) => out.landed += 1,
                    Err(e) => {
                        let sqlstate = crate::error::sqlstate_text(e.sqlstate());
                        client
                            .update(
                                &keep,
                                None,
                                &[d.id.into(), e.to_string().into(), sqlstate.into()],
                            )
                            .map_err(spi_err)?;
                        out.stayed += 1;
                    }
                }
            }
        }
        Ok(())
    })?;
    // The worker's count of stored dead letters (it counts again whenever it prepares its
    // statements).
    let landed = out.landed;
    crate::shmem::update(|st| st.dead_letters_stored = (st.dead_letters_stored - landed).max(0));
    Ok(out)
}

/// The route `name` as it is now (checked), or why it cannot take dead letters.
fn route_for_replay(client: &pgrx::spi::SpiClient<'_>, name: &str, role: &str) -> RouteReplay {
    let defs = match crate::routes::catalog::load(client, Some(crate::routes::Kind::Stream)) {
        Ok(d) => d,
        Err(e) => return RouteReplay { route: None, error: e.to_string() },
    };
    let Some(def) = defs.into_iter().find(|d| d.name == name) else {
        return RouteReplay {
            route: None,
            error: format!("route \"{name}\" no longer exists: add it again, or move its dead letters to another route (UPDATE ... SET route = ...)"),
        };
    };
    match crate::routes::catalog::check(client, &def, role) {
        Ok(r) => RouteReplay { route: Some(r), error: String::new() },
        Err(e) => RouteReplay { route: None, error: e.message },
    }
}

/// Writes a dead letter's entry to its route's target, through the route's mapping as it is
/// now.
fn insert_through_route(
    client: &mut pgrx::spi::SpiClient<'_>,
    route: &crate::routes::Route,
    d: &DeadLetter,
    millis: i64,
) -> Result<()> {
    let Some(fields) = crate::encode::decode_entry_json(&d.fields) else {
        return Err(crate::error::SyncError::Postgres {
            sqlstate: PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            message: "the dead letter's fields are not an entry's".into(),
        });
    };
    let entry = crate::routes::mapping::Entry {
        id: &d.message_id,
        stream: &d.stream_key,
        millis,
        fields: &crate::redis::Fields::from_pairs(&fields),
    };
    let cells = route.map.entry_cells(&entry);
    let sql = crate::streams::route_insert_sql(route, &route.casts);
    let args: Vec<pgrx::datum::DatumWithOid> = cells.into_iter().map(|c| vec![c].into()).collect();
    client.update(&sql, None, &args).map_err(spi_err)?;
    Ok(())
}
