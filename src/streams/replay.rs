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
}

/// Replays the dead letters whose stream (as stored) matches `pattern`, at most `max` of
/// them, oldest first.
pub fn replay(pattern: &str, max: Option<i64>) -> Result<Replayed> {
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
    let next = format!(
        "SELECT id,
                CASE WHEN {wrapped} THEN fields->>'stream_key' ELSE stream_key END,
                message_id,
                CASE WHEN {wrapped} THEN (fields->'fields')::text ELSE fields::text END
           FROM {dead} WHERE id > $1 ORDER BY id LIMIT $2",
        wrapped =
            "stream_key LIKE '%characters, md5 %)' AND fields ? 'stream_key' AND fields ? 'fields'"
    );
    let mut out = Replayed::default();
    let mut after = 0i64;
    let limit = max.unwrap_or(i64::MAX);
    Spi::connect_mut(|client| {
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
                let (name, fields) = (&d.stream_key, &d.fields);
                let millis = entry_id_millis(&d.message_id).unwrap_or(0);
                let landed = in_subtransaction(|| {
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
