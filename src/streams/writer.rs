//! The stream-table writer: a batch is one transaction, an in-process COPY where it can be,
//! otherwise `INSERT ... SELECT FROM unnest(...) ON CONFLICT` through a statement prepared
//! once and kept; refused rows are isolated by bisection into the dead-letter table.

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};

use std::ffi::CString;
use std::sync::Arc;

use crate::encode::{push_copy_field, push_utc_millis};
use crate::error::{Result, SyncError};
use crate::pg::ddl::{
    ensure_route_dead_letters, ensure_stream_tables, qualified, DEAD_LETTER_TABLE,
};
use crate::pg::{copy_into, copy_rows, in_transaction, spi_err};
use crate::redis::Fields;
use crate::routes::mapping::{Cell, Entry};
use crate::routes::{Conflict, Route, RowMap};
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
    /// Rows of this write that went to the dead-letter table.
    pub dead: usize,
}

/// One stream entry ready for the stream table, or for a route's target.
#[derive(Debug, Clone)]
pub struct StreamRow {
    pub stream_key: Arc<str>,
    pub message_id: String,
    /// The `data` object as JSON text (see `encode::entry_json`); empty for a route's row,
    /// whose fields are kept in `fields` instead.
    pub data: String,
    /// Milliseconds of the entry ID.
    pub millis: i64,
    /// The route's mapping, when the entry goes to a route: the row's COPY text is written
    /// from `fields` straight, its cells made only when a statement needs them.
    pub map: Option<Arc<RowMap>>,
    /// A route's row: the entry's fields (also a dead letter's).
    pub fields: Fields,
}

impl StreamRow {
    /// The `data` object as JSON text: the stream table's column, a dead letter's fields.
    pub fn data_json(&self) -> std::borrow::Cow<'_, str> {
        if self.map.is_none() {
            return std::borrow::Cow::Borrowed(&self.data);
        }
        std::borrow::Cow::Owned(crate::encode::entry_json(&self.fields.pairs()))
    }

    fn entry(&self) -> Entry<'_> {
        Entry {
            id: &self.message_id,
            stream: &self.stream_key,
            millis: self.millis,
            fields: &self.fields,
        }
    }

    /// The values of the route's columns (empty for the stream table's row).
    pub fn cells(&self) -> Vec<Cell> {
        self.map.as_ref().map_or_else(Vec::new, |m| m.entry_cells(&self.entry()))
    }

    /// Appends the row's line of COPY text: the route's columns when it goes to a route,
    /// else the stream table's (stream_key, message_id, data, timestamp).
    pub fn push_copy(&self, out: &mut Vec<u8>) {
        if let Some(m) = &self.map {
            m.push_entry_copy(out, &self.entry());
            return;
        }
        push_copy_field(out, &self.stream_key);
        out.push(b'\t');
        push_copy_field(out, &self.message_id);
        out.push(b'\t');
        push_copy_field(out, &self.data);
        out.push(b'\t');
        push_utc_millis(out, self.millis);
        out.push(b'\n');
    }
}

/// What the statements were prepared for; a change re-prepares them.
#[derive(Clone, PartialEq, Debug)]
pub enum Target {
    /// The stream table of `schema`.
    Table { schema: String, stream_table: String, overwrite: bool },
    /// A route's target; its dead letters go to the dead-letter table of `schema` (beside
    /// `stream_table`), its landing records name the consumer `group`.
    Route { route: Arc<Route>, schema: String, stream_table: String, group: String },
}

impl Target {
    /// The schema of the dead-letter table.
    fn schema(&self) -> &str {
        match self {
            Target::Table { schema, .. } | Target::Route { schema, .. } => schema,
        }
    }

    fn route(&self) -> Option<&Arc<Route>> {
        match self {
            Target::Table { .. } => None,
            Target::Route { route, .. } => Some(route),
        }
    }
}

/// The stream table's writer and one writer per route that has rows, each with statements
/// of its own.
#[derive(Default)]
pub struct Writers {
    pub table: StreamWriter,
    routes: std::collections::HashMap<String, StreamWriter>,
    /// The dead-letter table's schema, the stream table and the consumer group, from the
    /// settings.
    context: (String, String, String),
    dead_letter_max: u64,
}

impl Writers {
    /// Takes the settings the route writers need.
    pub fn configure(&mut self, s: &crate::gucs::Settings) {
        self.context = (s.schema.clone(), s.stream_table.clone(), s.consumer_group.clone());
        self.dead_letter_max = s.dead_letter_max;
        self.table.dead_letter_max = s.dead_letter_max;
    }

    /// The writer of `route` (the stream table's for `None`), its statements prepared.
    pub fn for_route(&mut self, route: Option<&Arc<Route>>) -> Result<&mut StreamWriter> {
        let Some(route) = route else { return Ok(&mut self.table) };
        let target = Target::Route {
            route: route.clone(),
            schema: self.context.0.clone(),
            stream_table: self.context.1.clone(),
            group: self.context.2.clone(),
        };
        let w = self.routes.entry(route.name.clone()).or_default();
        w.dead_letter_max = self.dead_letter_max;
        w.prepare(&target)?;
        Ok(w)
    }

    /// Forgets the statements of one destination after a failure.
    pub fn reset(&mut self, route: Option<&Arc<Route>>) {
        match route {
            None => self.table.reset(),
            Some(r) => {
                self.routes.remove(&r.name);
            }
        }
    }

    /// Forgets every prepared statement (after a failure of the lane).
    pub fn reset_all(&mut self) {
        self.table.reset();
        self.routes.clear();
    }
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
    /// Which rows re-read from a pending list are already dead letters (for a route: already
    /// landed, as its landing records say).
    dead_lettered: Option<OwnedPreparedStatement>,
    /// A route's landing records: which entries landed, written with the rows.
    record: Option<OwnedPreparedStatement>,
    /// The types the route's INSERT casts to, as prepared.
    casts: Vec<String>,
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
        self.record = None;
        self.casts.clear();
        self.copy_unusable = false;
    }

    /// Makes sure the tables exist and the statements are prepared for `target`.
    pub fn prepare(&mut self, target: &Target) -> Result<()> {
        if self.target.as_ref() == Some(target) && self.insert.is_some() {
            return Ok(());
        }
        self.reset();
        let text_array = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
        let text = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
        let (insert, dead_letter, dead_lettered, record, stored) = in_transaction(|| {
            Spi::connect_mut(|client| {
                let schema = target.schema();
                match target {
                    Target::Table { stream_table, .. } => {
                        ensure_stream_tables(client, schema, stream_table)?
                    }
                    Target::Route { stream_table, .. } => {
                        ensure_route_dead_letters(client, schema, stream_table)?
                    }
                }
                let stored = count_dead_letters(client, schema)?;
                let (insert, dead, lookup, record) = match target {
                    Target::Table { schema, stream_table, overwrite } => {
                        let insert = client
                            .prepare_mut(
                                insert_sql(schema, stream_table, *overwrite).as_str(),
                                &insert_types(),
                            )
                            .map_err(spi_err)?
                            .keep();
                        let dead = client
                            .prepare_mut(dead_letter_sql(schema).as_str(), &dead_letter_types())
                            .map_err(spi_err)?
                            .keep();
                        let lookup = client
                            .prepare_mut(
                                dead_lettered_sql(schema).as_str(),
                                &[text_array, text_array, text_array],
                            )
                            .map_err(spi_err)?
                            .keep();
                        (insert, dead, lookup, None)
                    }
                    Target::Route { route, schema, .. } => {
                        let insert = client
                            .prepare_mut(
                                route_insert_sql(route, &route.casts).as_str(),
                                &vec![text_array; route.map.columns.len()],
                            )
                            .map_err(spi_err)?
                            .keep();
                        let dead = client
                            .prepare_mut(route_dead_letter_sql(schema).as_str(), &[text; 6])
                            .map_err(spi_err)?
                            .keep();
                        // The landing records are the extension's own (see `as_superuser`).
                        let (lookup, record) = crate::pg::as_superuser(|| {
                            let lookup = client
                                .prepare_mut(LANDED_LOOKUP, &[text_array, text_array, text, text])
                                .map_err(spi_err)?
                                .keep();
                            let record = client
                                .prepare_mut(LANDED_RECORD, &[text, text, text_array, text_array])
                                .map_err(spi_err)?
                                .keep();
                            Ok::<_, SyncError>((lookup, record))
                        })?;
                        (insert, dead, lookup, Some(record))
                    }
                };
                Ok((insert, dead, lookup, record, stored))
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        self.dead_letters = stored.max(0) as u64;
        shmem::update(|st| st.dead_letters_stored = stored);
        self.insert = Some(insert);
        self.dead_letter = Some(dead_letter);
        self.dead_lettered = Some(dead_lettered);
        self.record = record;
        self.casts = target.route().map(|r| r.casts.clone()).unwrap_or_default();
        self.target = Some(target.clone());
        Ok(())
    }

    /// Writes the landing records of `rows` (a route's), in the caller's transaction: which
    /// entries of which stream landed, so that a re-read of the pending list after a crash
    /// skips them.
    fn record_landed(
        &self,
        client: &mut pgrx::spi::SpiClient<'_>,
        rows: &[&StreamRow],
    ) -> Result<()> {
        let (Some(stmt), Some(Target::Route { route, group, .. })) =
            (self.record.as_ref(), self.target.as_ref())
        else {
            return Ok(());
        };
        let mut by_stream: Vec<(&str, String)> = Vec::new();
        for r in rows {
            match by_stream.iter_mut().find(|(k, _)| **k == *r.stream_key) {
                Some((_, ids)) => {
                    ids.push(' ');
                    ids.push_str(&r.message_id);
                }
                None => by_stream.push((&r.stream_key, r.message_id.clone())),
            }
        }
        if by_stream.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = by_stream.iter().map(|(k, _)| *k).collect();
        let ids: Vec<&str> = by_stream.iter().map(|(_, i)| i.as_str()).collect();
        let args = [route.name.as_str().into(), group.as_str().into(), keys.into(), ids.into()];
        crate::pg::as_superuser(|| client.update(stmt, None, &args)).map_err(spi_err)?;
        Ok(())
    }

    /// The route's INSERT casts to the types the target has now: re-prepared (in the
    /// caller's transaction, after the target is locked) when a column's type changed
    /// (`ALTER TABLE ... TYPE`), so no statement keeps a stale cast.
    fn follow_target_types(&mut self, client: &mut pgrx::spi::SpiClient<'_>) -> Result<()> {
        let Some(Target::Route { route, .. }) = self.target.as_ref() else { return Ok(()) };
        let route = route.clone();
        let now = crate::routes::catalog::current_casts(client, &route)?;
        if now != self.casts {
            let text_array = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
            let insert = client
                .prepare_mut(route_insert_sql(&route, &now).as_str(), &vec![text_array; now.len()])
                .map_err(spi_err)?
                .keep();
            self.insert = Some(insert);
            self.casts = now;
        }
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
        let dead_before = self.dead_letters;
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
        let dead = self.dead_letters.saturating_sub(dead_before) as usize;
        // Everything in the WAL so far, not only this write's commit: rows found already landed
        // (settled) may be an earlier worker's, committed and not yet flushed.
        Ok(Written { held, settled, commit_lsn: crate::pg::wal_end(), dead })
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
            if streams.iter().any(|s| **s == *r.stream_key) {
                index.push(i);
                keys.push(&*r.stream_key);
                ids.push(r.message_id.as_str());
                fields.push(r.data.as_str());
            }
        }
        if index.is_empty() {
            return Ok(Vec::new());
        }
        let target = self.target.as_ref();
        let found = in_transaction(|| {
            Spi::connect(|client| {
                // (Made inside the transaction: an array's type is looked up in the catalog.)
                let args: Vec<pgrx::datum::DatumWithOid> = match target {
                    Some(Target::Route { route, group, .. }) => vec![
                        keys.into(),
                        ids.into(),
                        group.as_str().into(),
                        route.name.as_str().into(),
                    ],
                    _ => vec![keys.into(), ids.into(), fields.into()],
                };
                // A route's are landing records: the extension's own (see `as_superuser`).
                let table = if matches!(target, Some(Target::Route { .. })) {
                    crate::pg::as_superuser(|| client.select(stmt, None, &args))
                } else {
                    client.select(stmt, None, &args)
                }
                .map_err(spi_err)?;
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
            match self.copy_in(copy, rows) {
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
        let proven = rows.iter().all(|r| self.proven.iter().any(|p| **p == *r.stream_key));
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
        // With several stream workers each adds to the table: counted every time.
        let several = crate::gucs::WORKERS.get() > 1;
        if self.dead_letter_max > 0 && (several || self.dead_letters >= self.dead_letter_max) {
            // Counted again first: dead letters may have been replayed or deleted by hand.
            let schema = self.target.as_ref().map(|t| t.schema().to_owned()).unwrap_or_default();
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
            qualified(t.schema(), DEAD_LETTER_TABLE)
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

    fn copy_in(&mut self, chunks: &[Vec<u8>], rows: &[StreamRow]) -> Result<()> {
        let t = self.target.clone().ok_or_else(crate::pg::not_prepared)?;
        match &t {
            Target::Table { schema, stream_table, .. } => {
                copy_into(schema, stream_table, &COPY_COLUMNS, chunks)?
            }
            Target::Route { route, .. } => {
                let names: Vec<CString> = route
                    .map
                    .columns
                    .iter()
                    .map(|c| CString::new(c.name.as_str()))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| SyncError::Config("a column name contains NUL".into()))?;
                let columns: Vec<&std::ffi::CStr> = names.iter().map(|c| c.as_c_str()).collect();
                let all: Vec<&StreamRow> = rows.iter().collect();
                in_transaction(|| {
                    copy_rows(&route.schema, &route.relname, &columns, chunks)?;
                    Spi::connect_mut(|client| self.record_landed(client, &all))
                })?;
            }
        }
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(())
    }

    /// Inserts `rows` in one transaction; returns how many were inserted (a row already
    /// stored inserts nothing unless `stream_conflict_overwrite` updates it).
    fn insert_rows(&mut self, rows: &[StreamRow]) -> Result<usize> {
        if let Some(Target::Route { route, .. }) = self.target.clone() {
            return self.insert_route_rows(&route, rows);
        }
        let stmt = self.insert.as_ref().ok_or_else(crate::pg::not_prepared)?;
        let keys: Vec<&str> = rows.iter().map(|r| &*r.stream_key).collect();
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

    /// A route's rows through its INSERT (one text array per column, each cast to the
    /// column's type: its input function), with their landing records, in one transaction.
    /// Returns how many rows the statement inserted (a row the target already has inserts
    /// nothing under `conflict = 'nothing'`); every row counts as landed.
    fn insert_route_rows(&mut self, route: &Route, rows: &[StreamRow]) -> Result<usize> {
        let n = route.map.columns.len();
        let cells: Vec<Vec<Cell>> = rows.iter().map(StreamRow::cells).collect();
        let mut arrays: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(rows.len()); n];
        for r in &cells {
            for (k, array) in arrays.iter_mut().enumerate() {
                array.push(r.get(k).and_then(|c| c.as_deref()));
            }
        }
        let all: Vec<&StreamRow> = rows.iter().collect();
        let inserted = in_transaction(|| {
            Spi::connect_mut(|client| {
                // The target is locked first, so a change of its columns that committed
                // before is seen here.
                client
                    .update(&format!("LOCK TABLE {} IN ROW EXCLUSIVE MODE", route.table), None, &[])
                    .map_err(spi_err)?;
                self.follow_target_types(client)?;
                let stmt = self.insert.as_ref().ok_or_else(crate::pg::not_prepared)?;
                let args: Vec<pgrx::datum::DatumWithOid> =
                    arrays.iter().map(|a| a.clone().into()).collect();
                let inserted = client.update(stmt, None, &args).map_err(spi_err)?.len();
                self.record_landed(client, &all)?;
                Ok(inserted)
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(inserted)
    }

    fn dead_letter(&mut self, row: &StreamRow, err: &SyncError) -> Result<()> {
        let route = self.target.as_ref().and_then(Target::route).map(|r| r.name.clone());
        let sqlstate = crate::error::sqlstate_text(err.sqlstate());
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
            (&*row.stream_key).into(),
            row.message_id.as_str().into(),
            row.data_json().as_ref().into(),
            err.to_string().into(),
            sqlstate.into(),
        ];
        if let Some(r) = &route {
            args.push(r.as_str().into());
        }
        let stored = in_transaction(|| {
            Spi::connect_mut(|client| {
                let stmt = self.dead_letter.as_ref().ok_or_else(crate::pg::not_prepared)?;
                client.update(stmt, None, &args).map_err(spi_err)?;
                // A route's dead letter is a landing too: a re-read skips it.
                self.record_landed(client, &[row])
            })
        });
        match stored {
            Ok(()) => {}
            // The row cannot even be a dead letter as it is (a stream name too long for the
            // index): it goes in under a short name, the whole row kept in `fields`.
            Err(e) if e.is_row_level() => {
                let schema =
                    self.target.as_ref().map(|t| t.schema().to_owned()).unwrap_or_default();
                // (The wrapped form takes the first five arguments; a route's name goes in
                // `route` and its landing record with it.)
                let route_name = route.clone();
                in_transaction(|| {
                    Spi::connect_mut(|client| {
                        client
                            .update(&dead_letter_wrapped_sql(&schema), None, &args[..5])
                            .map_err(spi_err)?;
                        if let Some(r) = &route_name {
                            client
                                .update(
                                    &format!(
                                        "UPDATE {} SET route = $1 WHERE message_id = $2 AND fields->>'stream_key'::text = $3",
                                        qualified(&schema, DEAD_LETTER_TABLE)
                                    ),
                                    None,
                                    &[r.as_str().into(), row.message_id.as_str().into(), (&*row.stream_key).into()],
                                )
                                .map_err(spi_err)?;
                        }
                        self.record_landed(client, &[row])
                    })
                })?;
            }
            Err(e) => return Err(e),
        }
        shmem::bump(|c| &c.pg_ops, 1);
        shmem::bump(|c| &c.dead_letters, 1);
        if let Some(r) = &route {
            shmem::update_route(r, |s| s.dead_letters += 1);
        }
        self.dead_letters += 1;
        shmem::update(|st| st.dead_letters_stored = self.dead_letters as i64);
        Ok(())
    }
}

fn insert_types() -> [PgOid; 4] {
    let text = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
    [text, text, text, PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID)]
}

fn insert_sql(schema: &str, stream_table: &str, overwrite: bool) -> String {
    let conflict = if overwrite {
        "ON CONFLICT (stream_key, message_id) DO UPDATE SET data = EXCLUDED.data, \"timestamp\" = EXCLUDED.\"timestamp\", synced_at = now()"
    } else {
        "ON CONFLICT (stream_key, message_id) DO NOTHING"
    };
    format!(
        "INSERT INTO {} (stream_key, message_id, data, \"timestamp\")
         SELECT k, m, d::jsonb, to_timestamp(ts::float8 / 1000::float8)
           FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS u(k, m, d, ts)
         {conflict}",
        qualified(schema, stream_table),
    )
}

/// A route's INSERT: one text array per mapped column, each cast to the column's type (its
/// input function, as COPY uses; the column's own modifier applies on assignment).
pub fn route_insert_sql(route: &Route, casts: &[String]) -> String {
    let (dedupe, conflict) = match &route.conflict {
        Conflict::Nothing => (None, "ON CONFLICT DO NOTHING".to_owned()),
        Conflict::Update(keys) => {
            let set: Vec<String> = route
                .map
                .columns
                .iter()
                .filter(|c| !keys.contains(&c.name))
                .map(|c| {
                    let q = crate::parse::quote_ident(&c.name);
                    format!("{q} = EXCLUDED.{q}")
                })
                .collect();
            let quoted: Vec<String> = keys.iter().map(|k| crate::parse::quote_ident(k)).collect();
            let conflict = if set.is_empty() {
                format!("ON CONFLICT ({}) DO NOTHING", quoted.join(", "))
            } else {
                format!("ON CONFLICT ({}) DO UPDATE SET {}", quoted.join(", "), set.join(", "))
            };
            (Some(keys.as_slice()), conflict)
        }
    };
    format!("{} {conflict}", crate::routes::insert_select(route, casts, false, dedupe))
}

/// A route's landing records: stream, consumer group and the IDs (space-separated).
const LANDED_RECORD: &str = "INSERT INTO redis_sync.landed (route, stream_key, consumer_group, ids)
     SELECT $1, u.k, $2, pg_catalog.string_to_array(u.i, ' ')
       FROM unnest($3::text[], $4::text[]) AS u(k, i)";

/// The 0-based indices of the (stream, ID) pairs a route's landing records hold.
const LANDED_LOOKUP: &str = "SELECT (u.i - 1)::int8
       FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(k, m, i)
      WHERE EXISTS (SELECT 1 FROM redis_sync.landed l
                     WHERE l.stream_key = u.k AND l.consumer_group = $3 AND l.route = $4
                       AND u.m = ANY (l.ids))";

/// A route's dead letter: with the route's name.
fn route_dead_letter_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {} AS d (stream_key, message_id, fields, error, sqlstate, route)
         VALUES ($1, $2, $3::jsonb, $4, $5, $6)
         {DEAD_LETTER_CONFLICT}, route = EXCLUDED.route",
        qualified(schema, DEAD_LETTER_TABLE),
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
         VALUES (pg_catalog.left($1, 200) || '... (' || pg_catalog.length($1)::text || ' characters, md5 '
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
