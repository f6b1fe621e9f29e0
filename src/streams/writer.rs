//! The stream-table writer: a batch is one transaction, an in-process COPY where it can be,
//! otherwise `INSERT ... SELECT FROM unnest(...) ON CONFLICT` through a statement prepared
//! once and kept; refused rows are isolated by bisection into the dead-letter table.

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};

use crate::error::{Result, SyncError};
use crate::pg::ddl::{ensure_stream_tables, qualified, DEAD_LETTER_TABLE};
use crate::pg::{copy_into, in_transaction, spi_err};
use crate::shmem;

/// What a write did with its rows, by index: `held` refused with no room for dead letters
/// (not to be acknowledged), `settled` found already stored as dead letters (not written
/// again; to be acknowledged). `commit_lsn`: the end of the write's last commit in the WAL;
/// its entries may be acknowledged once the WAL is flushed that far (0: already durable).
#[derive(Debug, Default)]
pub struct Written {
    pub held: Vec<usize>,
    pub settled: Vec<usize>,
    pub commit_lsn: u64,
}

/// One stream entry ready for the stream table.
#[derive(Debug, Clone)]
pub struct StreamRow {
    pub stream_key: String,
    pub message_id: String,
    /// The `data` object as JSON text (see `encode::entry_json`).
    pub data: String,
    /// Milliseconds of the entry ID.
    pub millis: i64,
}

/// What the statements were prepared for; a change re-prepares them.
#[derive(Clone, PartialEq, Debug)]
pub struct Target {
    pub schema: String,
    pub stream_table: String,
    pub overwrite: bool,
}

/// After a batch met rows already stored, this many batches go straight to the
/// `ON CONFLICT` statement before the plain one is tried again.
const CONFLICT_STREAK: u32 = 16;

/// Columns the COPY fills, in the order of the COPY text the reader builds.
const COPY_COLUMNS: [&std::ffi::CStr; 4] = [c"stream_key", c"message_id", c"data", c"timestamp"];

#[derive(Default)]
pub struct StreamWriter {
    target: Option<Target>,
    /// `INSERT ... SELECT FROM unnest(...) ON CONFLICT`: for batches that meet rows already
    /// stored (entries read again after a crash, a stream re-created with the same IDs), for
    /// isolating refused rows, and where COPY cannot be used.
    insert: Option<OwnedPreparedStatement>,
    dead_letter: Option<OwnedPreparedStatement>,
    /// Which rows re-read from a pending list are already dead letters.
    dead_lettered: Option<OwnedPreparedStatement>,
    /// Batches left that skip the COPY fast path after one met rows already stored.
    use_conflict_for: u32,
    /// COPY is not usable on this table (row-level security, or no table-level INSERT
    /// privilege): always the INSERT path.
    copy_unusable: bool,
    /// Refused batches probed so far (each probe tries other rows).
    probes: usize,
    /// Streams (as stored) whose rows the table took since their entries were refused: a
    /// refusal of a batch of theirs alone is the rows' own, no probe needed.
    proven: Vec<String>,
    /// Rows in the dead-letter table, as last counted and since added.
    pub dead_letters: u64,
    /// `redis_sync.dead_letter_max` (0: no limit).
    pub dead_letter_max: u64,
    /// When dead letters past `redis_sync.dead_letter_retention` are next looked for.
    next_expiry: Option<std::time::Instant>,
}

/// Rows in the dead-letter table of `schema`.
fn count_dead_letters(client: &mut pgrx::spi::SpiClient<'_>, schema: &str) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM {}", qualified(schema, DEAD_LETTER_TABLE));
    Ok(client
        .select(&sql, None, &[])
        .map_err(spi_err)?
        .first()
        .get_one::<i64>()
        .map_err(spi_err)?
        .unwrap_or(0))
}

/// A batch whose every tried row was refused.
fn refusal(e: &SyncError) -> SyncError {
    SyncError::Refused { sqlstate: e.sqlstate(), message: e.to_string() }
}

impl StreamWriter {
    /// Forgets the prepared statements (after a failure that may mean the table changed).
    pub fn reset(&mut self) {
        self.target = None;
        self.insert = None;
        self.dead_letter = None;
        self.dead_lettered = None;
        self.copy_unusable = false;
    }

    /// Makes sure the tables exist and the statements are prepared for `target`.
    pub fn prepare(&mut self, target: &Target) -> Result<()> {
        if self.target.as_ref() == Some(target) && self.insert.is_some() {
            return Ok(());
        }
        self.reset();
        let (insert, dead_letter, dead_lettered, stored) = in_transaction(|| {
            Spi::connect_mut(|client| {
                ensure_stream_tables(client, &target.schema, &target.stream_table)?;
                let stored = count_dead_letters(client, &target.schema)?;
                let insert = client
                    .prepare_mut(insert_sql(target).as_str(), &insert_types())
                    .map_err(spi_err)?
                    .keep();
                let dead = client
                    .prepare_mut(dead_letter_sql(&target.schema).as_str(), &dead_letter_types())
                    .map_err(spi_err)?
                    .keep();
                let text = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
                let lookup = client
                    .prepare_mut(dead_lettered_sql(&target.schema).as_str(), &[text, text, text])
                    .map_err(spi_err)?
                    .keep();
                Ok((insert, dead, lookup, stored))
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        self.dead_letters = stored.max(0) as u64;
        shmem::update(|st| st.dead_letters_stored = stored);
        self.insert = Some(insert);
        self.dead_letter = Some(dead_letter);
        self.dead_lettered = Some(dead_lettered);
        self.target = Some(target.clone());
        Ok(())
    }

    /// Writes one batch. The fast path is an in-process COPY of `copy` (the same rows in
    /// COPY text format) in one transaction: Postgres' own bulk path, with multi-row heap
    /// inserts. When the batch meets rows already stored, or COPY cannot be used, the rows go
    /// through `INSERT ... ON CONFLICT` instead. Returns the rows held back: refused, with
    /// no room left in the dead-letter table (their entries must not be acknowledged), and
    /// where the commit ends in the WAL: the other entries may be acknowledged once the WAL
    /// is flushed that far (the commit itself need not wait for it, see
    /// [`crate::pg::defer_flush`]).
    ///
    /// Rows of the streams in `recheck` (read again from their pending list) that are
    /// already in the dead-letter table, the same entry with the same fields, are not
    /// written: a dead letter whose acknowledgement was lost (a crash between its commit and
    /// the `XACK`) would otherwise land as a row too once the table takes it. They come back
    /// as settled, to be acknowledged.
    pub fn write(
        &mut self,
        rows: &[StreamRow],
        copy: &[Vec<u8>],
        proven: &[String],
        recheck: &[String],
    ) -> Result<Written> {
        if rows.is_empty() {
            return Ok(Written::default());
        }
        self.proven = proven.to_vec();
        let settled =
            if recheck.is_empty() { Vec::new() } else { self.already_dead_letters(rows, recheck)? };
        let held = if settled.is_empty() {
            self.write_batch(rows, copy)?
        } else {
            // The COPY chunks hold every row: the others go through INSERT.
            let keep: Vec<usize> = (0..rows.len()).filter(|i| !settled.contains(i)).collect();
            let rest: Vec<StreamRow> = keep.iter().map(|&i| rows[i].clone()).collect();
            let held = self.insert_isolating(&rest)?;
            held.into_iter().filter_map(|j| keep.get(j).copied()).collect()
        };
        Ok(Written { held, settled, commit_lsn: crate::pg::last_commit_lsn() })
    }

    /// The indices of the rows of `streams` whose entries are already dead letters with
    /// the same fields.
    fn already_dead_letters(
        &mut self,
        rows: &[StreamRow],
        streams: &[String],
    ) -> Result<Vec<usize>> {
        let stmt = self.dead_lettered.as_ref().ok_or_else(crate::pg::not_prepared)?;
        let mut index = Vec::new();
        let (mut keys, mut ids, mut fields) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in rows.iter().enumerate() {
            if streams.contains(&r.stream_key) {
                index.push(i);
                keys.push(r.stream_key.as_str());
                ids.push(r.message_id.as_str());
                fields.push(r.data.as_str());
            }
        }
        if index.is_empty() {
            return Ok(Vec::new());
        }
        let found = in_transaction(|| {
            Spi::connect(|client| {
                let args = [keys.into(), ids.into(), fields.into()];
                let table = client.select(stmt, None, &args).map_err(spi_err)?;
                let mut out = Vec::new();
                for row in table {
                    if let Some(j) = row.get::<i64>(1).map_err(spi_err)? {
                        out.extend(index.get(j as usize).copied());
                    }
                }
                Ok(out)
            })
        })?;
        Ok(found)
    }

    fn write_batch(&mut self, rows: &[StreamRow], copy: &[Vec<u8>]) -> Result<Vec<usize>> {
        if self.use_conflict_for > 0 {
            self.use_conflict_for -= 1;
        } else if !self.copy_unusable {
            match self.copy_in(copy) {
                Ok(()) => return Ok(Vec::new()),
                Err(SyncError::Postgres {
                    sqlstate: PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                    ..
                }) => {
                    self.use_conflict_for = CONFLICT_STREAK;
                }
                Err(SyncError::CopyUnusable) => self.copy_unusable = true,
                // Refused rows are isolated by the INSERT path below.
                Err(e) if e.is_row_level() => {}
                Err(e) => return Err(e),
            }
        }
        self.insert_isolating(rows)
    }

    /// Writes `rows` with `INSERT ... ON CONFLICT` in one transaction. When the batch is
    /// refused because of some rows' content, a few single rows are tried first: when none
    /// lands, the table takes nothing now (a trigger refusing every write, a foreign key to a
    /// table being reloaded) and the whole batch comes back as [`SyncError::Refused`], with
    /// nothing dead-lettered. (No probe for a batch of streams the table was just shown to
    /// take rows of.) When the table takes rows, the rest of the batch is split in halves,
    /// each tried in its own transaction, down to the single rows; those refused go to the
    /// dead-letter table while it has room, and are returned as held back when it has none.
    /// Any other error (table gone, timeout, disk full) comes back as `Err` with nothing
    /// written from the failing part.
    fn insert_isolating(&mut self, rows: &[StreamRow]) -> Result<Vec<usize>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let first = match self.insert_rows(rows) {
            Ok(_) => return Ok(Vec::new()),
            Err(e) if e.is_row_level() => e,
            Err(e) => return Err(e),
        };
        let proven = rows.iter().all(|r| self.proven.contains(&r.stream_key));
        let mut refused = Vec::new();
        if proven {
            if rows.len() == 1 {
                refused.push((0, first));
            } else {
                let half = rows.len() / 2;
                let (a, b) = rows.split_at(half);
                self.bisect_from(a, 0, &mut refused)?;
                self.bisect_from(b, half, &mut refused)?;
            }
        } else {
            // The row a probe landed is committed: it is not tried (or dead-lettered) again.
            let Some(landed) = self.probe(rows)? else { return Err(refusal(&first)) };
            self.bisect_from(&rows[..landed], 0, &mut refused)?;
            self.bisect_from(&rows[landed + 1..], landed + 1, &mut refused)?;
        }
        if refused.is_empty() {
            return Ok(Vec::new());
        }
        if self.dead_letter_max > 0 && self.dead_letters >= self.dead_letter_max {
            // Counted again first: dead letters may have been replayed or deleted by hand.
            let schema = self.target.as_ref().map(|t| t.schema.clone()).unwrap_or_default();
            let stored =
                in_transaction(|| Spi::connect_mut(|client| count_dead_letters(client, &schema)))?;
            self.dead_letters = stored.max(0) as u64;
            shmem::update(|st| st.dead_letters_stored = stored);
        }
        if self.dead_letter_max > 0 && self.dead_letters >= self.dead_letter_max {
            // No room: the refused rows wait in Redis; the rest of the batch is stored.
            let full =
                SyncError::DeadLettersFull { stored: self.dead_letters, max: self.dead_letter_max };
            shmem::record_error(&full.to_string());
            return Ok(refused.into_iter().map(|(i, _)| i).collect());
        }
        for (i, e) in &refused {
            self.dead_letter(&rows[*i], e)?;
        }
        Ok(Vec::new())
    }

    /// Deletes dead letters older than `retention` (0: kept), at most once a minute.
    pub fn expire_dead_letters(&mut self, retention: std::time::Duration) -> Result<()> {
        let now = std::time::Instant::now();
        if retention.is_zero() || self.next_expiry.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.next_expiry = Some(now + std::time::Duration::from_secs(60));
        let Some(t) = self.target.as_ref() else { return Ok(()) };
        let sql = format!(
            "DELETE FROM {} WHERE created_at < now() - make_interval(secs => $1)",
            qualified(&t.schema, DEAD_LETTER_TABLE)
        );
        let secs = retention.as_secs_f64();
        let deleted = in_transaction(|| {
            Spi::connect_mut(|client| {
                client.update(&sql, None, &[secs.into()]).map(|t| t.len()).map_err(spi_err)
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        self.dead_letters = self.dead_letters.saturating_sub(deleted as u64);
        shmem::update(|st| st.dead_letters_stored = self.dead_letters as i64);
        Ok(())
    }

    /// Tries up to three single rows of a refused batch (others each time it is tried
    /// again): does the table take any row at all? The index of the row that landed.
    fn probe(&mut self, rows: &[StreamRow]) -> Result<Option<usize>> {
        let n = rows.len();
        let k = self.probes;
        self.probes = self.probes.wrapping_add(1);
        let mut picks = vec![k % n, (k + n / 2) % n, n - 1 - k % n];
        picks.dedup();
        for i in picks {
            match self.insert_rows(&rows[i..=i]) {
                // A row already stored inserts nothing: no proof that the table takes rows.
                Ok(0) => {}
                Ok(_) => return Ok(Some(i)),
                Err(e) if e.is_row_level() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Inserts `rows`, splitting refused parts in halves down to the single rows, whose
    /// index (in the batch) and error are noted in `refused`.
    fn bisect_from(
        &mut self,
        rows: &[StreamRow],
        offset: usize,
        refused: &mut Vec<(usize, SyncError)>,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        match self.insert_rows(rows) {
            Ok(_) => Ok(()),
            Err(e) if e.is_row_level() && rows.len() == 1 => {
                refused.push((offset, e));
                Ok(())
            }
            Err(e) if e.is_row_level() => {
                let half = rows.len() / 2;
                let (a, b) = rows.split_at(half);
                self.bisect_from(a, offset, refused)?;
                self.bisect_from(b, offset + half, refused)
            }
            Err(e) => Err(e),
        }
    }

    fn copy_in(&mut self, chunks: &[Vec<u8>]) -> Result<()> {
        let t = self.target.as_ref().ok_or_else(crate::pg::not_prepared)?;
        copy_into(&t.schema, &t.stream_table, &COPY_COLUMNS, chunks)?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(())
    }

    /// Inserts `rows` in one transaction; returns how many were inserted (a row already
    /// stored inserts nothing unless `stream_conflict_overwrite` updates it).
    fn insert_rows(&mut self, rows: &[StreamRow]) -> Result<usize> {
        let stmt = self.insert.as_ref().ok_or_else(crate::pg::not_prepared)?;
        let keys: Vec<&str> = rows.iter().map(|r| r.stream_key.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
        let data: Vec<&str> = rows.iter().map(|r| r.data.as_str()).collect();
        let millis: Vec<i64> = rows.iter().map(|r| r.millis).collect();
        let inserted = in_transaction(|| {
            Spi::connect_mut(|client| {
                client
                    .update(stmt, None, &[keys.into(), ids.into(), data.into(), millis.into()])
                    .map(|t| t.len())
                    .map_err(spi_err)
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(inserted)
    }

    fn dead_letter(&mut self, row: &StreamRow, err: &SyncError) -> Result<()> {
        let stmt = self.dead_letter.as_ref().ok_or_else(crate::pg::not_prepared)?;
        let sqlstate = crate::error::sqlstate_text(err.sqlstate());
        let args = [
            row.stream_key.as_str().into(),
            row.message_id.as_str().into(),
            row.data.as_str().into(),
            err.to_string().into(),
            sqlstate.into(),
        ];
        let stored = in_transaction(|| {
            Spi::connect_mut(|client| client.update(stmt, None, &args).map(|_| ()).map_err(spi_err))
        });
        match stored {
            Ok(()) => {}
            // The row cannot even be a dead letter as it is (a stream name too long for the
            // index): it goes in under a short name, the whole row kept in `fields`.
            Err(e) if e.is_row_level() => {
                let schema = self.target.as_ref().map(|t| t.schema.clone()).unwrap_or_default();
                in_transaction(|| {
                    Spi::connect_mut(|client| {
                        client
                            .update(&dead_letter_wrapped_sql(&schema), None, &args)
                            .map(|_| ())
                            .map_err(spi_err)
                    })
                })?;
            }
            Err(e) => return Err(e),
        }
        shmem::bump(|c| &c.pg_ops, 1);
        shmem::bump(|c| &c.dead_letters, 1);
        self.dead_letters += 1;
        shmem::update(|st| st.dead_letters_stored = self.dead_letters as i64);
        Ok(())
    }
}

fn insert_types() -> [PgOid; 4] {
    let text = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
    [text, text, text, PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID)]
}

fn insert_sql(t: &Target) -> String {
    let conflict = if t.overwrite {
        "ON CONFLICT (stream_key, message_id) DO UPDATE SET data = EXCLUDED.data, \"timestamp\" = EXCLUDED.\"timestamp\", synced_at = now()"
    } else {
        "ON CONFLICT (stream_key, message_id) DO NOTHING"
    };
    format!(
        "INSERT INTO {} (stream_key, message_id, data, \"timestamp\")
         SELECT k, m, d::jsonb, to_timestamp(ts::float8 / 1000)
           FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS u(k, m, d, ts)
         {conflict}",
        qualified(&t.schema, &t.stream_table),
    )
}

fn dead_letter_types() -> [PgOid; 5] {
    [PgOid::BuiltIn(PgBuiltInOids::TEXTOID); 5]
}

/// What a dead letter that is refused again does: counts the attempt.
const DEAD_LETTER_CONFLICT: &str = "ON CONFLICT (stream_key, message_id) DO UPDATE
            SET attempts = d.attempts + 1, error = EXCLUDED.error,
                sqlstate = EXCLUDED.sqlstate, created_at = now()";

/// A dead letter whose stream name is too long for the index: stored as the first 200
/// characters, the length and an md5, with the full name and the fields in `fields`.
fn dead_letter_wrapped_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {} AS d (stream_key, message_id, fields, error, sqlstate)
         VALUES (pg_catalog.left($1, 200) || '... (' || pg_catalog.length($1) || ' characters, md5 '
                 || pg_catalog.md5($1) || ')',
                 $2, pg_catalog.jsonb_build_object('stream_key', $1, 'fields', $3::jsonb), $4, $5)
         {DEAD_LETTER_CONFLICT}",
        qualified(schema, DEAD_LETTER_TABLE),
    )
}

/// The 0-based indices of the (stream, ID, fields) triples already stored as dead letters.
fn dead_lettered_sql(schema: &str) -> String {
    format!(
        "SELECT (u.i - 1)::int8
           FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(k, m, f, i)
          WHERE EXISTS (SELECT 1 FROM {} d
                         WHERE d.stream_key = u.k AND d.message_id = u.m
                           AND d.fields = u.f::jsonb)",
        qualified(schema, DEAD_LETTER_TABLE),
    )
}

fn dead_letter_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {} AS d (stream_key, message_id, fields, error, sqlstate)
         VALUES ($1, $2, $3::jsonb, $4, $5)
         {DEAD_LETTER_CONFLICT}",
        qualified(schema, DEAD_LETTER_TABLE),
    )
}
