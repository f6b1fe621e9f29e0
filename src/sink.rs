//! The Postgres side: tables created when missing, and batch writes through statements
//! prepared once and kept, with each batch passed as arrays (`INSERT ... SELECT FROM
//! unnest(...)`). No SQL is ever built from data; names come from validated settings and are
//! always quoted.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{PgBuiltInOids, PgOid};

use crate::error::{Result, SyncError};
use crate::parse::quote_ident;
use crate::shmem;

pub const DEAD_LETTER_TABLE: &str = "redis_sync_dead_letters";

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

#[derive(Default)]
pub struct Sink {
    target: Option<Target>,
    /// `INSERT ... SELECT FROM unnest(...) ON CONFLICT`: for batches that meet rows already
    /// stored (entries read again after a crash, a stream re-created with the same IDs), for
    /// isolating refused rows, and where COPY cannot be used.
    insert: Option<OwnedPreparedStatement>,
    dead_letter: Option<OwnedPreparedStatement>,
    /// Batches left that skip the COPY fast path after one met rows already stored.
    use_conflict_for: u32,
    /// COPY is not usable on this table (row-level security, or no table-level INSERT
    /// privilege): always the INSERT path.
    copy_unusable: bool,
}

thread_local! {
    /// The COPY data being fed to `CopyFrom` (main thread only): chunks and read position.
    static COPY_SOURCE: std::cell::Cell<(*const Vec<u8>, usize, usize, usize)> =
        const { std::cell::Cell::new((std::ptr::null(), 0, 0, 0)) };
}

/// `copy_data_source_cb`: hands COPY the next bytes of the chunks; 0 means the end.
unsafe extern "C-unwind" fn copy_source(
    outbuf: *mut std::ffi::c_void,
    _minread: std::ffi::c_int,
    maxread: std::ffi::c_int,
) -> std::ffi::c_int {
    COPY_SOURCE.with(|src| {
        let (chunks, n, mut idx, mut off) = src.get();
        let mut written = 0usize;
        let max = maxread.max(0) as usize;
        while written < max && idx < n {
            // SAFETY: `chunks` points at `n` vectors that outlive the COPY (see copy_in).
            let chunk = unsafe { &*chunks.add(idx) };
            let take = (chunk.len() - off).min(max - written);
            unsafe {
                std::ptr::copy_nonoverlapping(
                    chunk.as_ptr().add(off),
                    (outbuf as *mut u8).add(written),
                    take,
                );
            }
            written += take;
            off += take;
            if off == chunk.len() {
                idx += 1;
                off = 0;
            }
        }
        src.set((chunks, n, idx, off));
        written as std::ffi::c_int
    })
}

fn caught(e: CaughtError) -> SyncError {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
            let mut message = r.message().to_owned();
            if let Some(d) = r.detail() {
                message.push_str(" (");
                message.push_str(d);
                message.push(')');
            }
            SyncError::Postgres { sqlstate: r.sql_error_code(), message }
        }
        CaughtError::RustPanic { ereport, .. } => SyncError::Postgres {
            sqlstate: ereport.sql_error_code(),
            message: ereport.message().to_owned(),
        },
    }
}

/// `redis_sync.query_timeout` in milliseconds (0 = none), set by the worker after each
/// reload and applied to every transaction of [`in_transaction`].
static QUERY_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

// utils/timeout.h, which pgrx does not bind. `LOCK_TIMEOUT` and `STATEMENT_TIMEOUT` are the
// third and fourth members of `TimeoutId` in every supported major version (13 to 18).
const LOCK_TIMEOUT: std::ffi::c_int = 2;
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
    fn get_timeout_indicator(id: std::ffi::c_int, reset_indicator: bool) -> bool;
}

/// Called from the worker's SIGINT handler: Postgres' statement- and lock-timeout handlers
/// signal the process with SIGINT, and the worker (which ignores plain cancel requests)
/// turns it into a query cancel only when one of those timeouts is what fired.
///
/// # Safety
/// Signal-handler context: reads a flag of the timeout module and sets two flags.
pub unsafe fn cancel_if_timed_out() -> bool {
    unsafe {
        if get_timeout_indicator(STATEMENT_TIMEOUT, false)
            || get_timeout_indicator(LOCK_TIMEOUT, false)
        {
            pg_sys::QueryCancelPending = 1;
            pg_sys::InterruptPending = 1;
            return true;
        }
    }
    false
}

pub fn set_query_timeout(timeout: std::time::Duration) {
    QUERY_TIMEOUT_MS.store(timeout.as_millis() as u64, Ordering::Relaxed);
}

/// Runs `f` in its own transaction. An ERROR inside rolls the transaction back and comes
/// back as `Err` with its SQLSTATE; the worker carries on.
///
/// The transaction runs under `redis_sync.query_timeout`. A background worker has no
/// `statement_timeout` of its own (only a client backend arms it, per statement), so the
/// timer is armed here: a write stuck on a lock or a slow trigger is cancelled with SQLSTATE
/// 57014, rolled back and retried, instead of stalling the worker.
pub fn in_transaction<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    let timeout_ms = QUERY_TIMEOUT_MS.load(Ordering::Relaxed).min(i32::MAX as u64) as i32;
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        if timeout_ms > 0 {
            enable_timeout_after(STATEMENT_TIMEOUT, timeout_ms);
        }
    }
    let f = AssertUnwindSafe(f);
    let outcome = PgTryBuilder::new(move || {
        let f = f;
        match (f.0)() {
            Ok(r) => {
                unsafe {
                    pg_sys::PopActiveSnapshot();
                    pg_sys::CommitTransactionCommand();
                }
                Ok(r)
            }
            // An error we return (not raised by Postgres) still rolls back.
            Err(e) => Err(e),
        }
    })
    .catch_others(|e| Err(caught(e)))
    .execute();
    if outcome.is_err() && unsafe { pg_sys::IsTransactionState() } {
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    if timeout_ms > 0 {
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            // A timer that fired after the last interrupt check must not cancel whatever
            // the worker does next (nothing else of the worker uses a query cancel).
            pg_sys::QueryCancelPending = 0;
        }
    }
    if outcome.is_ok() {
        report_stat();
        STATS_SINCE.with(|t| {
            if t.get().is_none() {
                t.set(Some(std::time::Instant::now()));
            }
        });
    }
    outcome
}

thread_local! {
    /// When the oldest commit whose statistics may still be unflushed happened.
    static STATS_SINCE: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Called by the worker's loop outside any transaction: statistics a commit left pending
/// (Postgres flushes at most once a second, and only when asked) are flushed a second later
/// even if no further commit comes, as an idle client backend does with its idle timer.
pub fn flush_idle_stats() {
    let due =
        STATS_SINCE.with(|t| t.get().is_some_and(|since| since.elapsed().as_millis() >= 1000));
    if due {
        STATS_SINCE.with(|t| t.set(None));
        // (On PostgreSQL 14 the argument means "disconnect", so nothing is forced there:
        // its statistics go with the next commit.)
        #[cfg(not(feature = "pg14"))]
        unsafe {
            pg_sys::pgstat_report_stat(true);
        }
    }
}

/// Lets autovacuum see the worker's writes.
fn report_stat() {
    #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17", feature = "pg18"))]
    unsafe {
        pg_sys::pgstat_report_stat(false);
    }
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        pg_sys::pgstat_report_stat(false);
    }
}

fn spi_err(e: pgrx::spi::SpiError) -> SyncError {
    SyncError::Postgres {
        sqlstate: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        message: format!("SPI: {e}"),
    }
}

fn relation_exists(client: &SpiClient<'_>, schema: &str, table: &str) -> Result<bool> {
    let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let found = client
        .select("SELECT to_regclass($1) IS NOT NULL", None, &[name.into()])
        .map_err(spi_err)?
        .first()
        .get_one::<bool>()
        .map_err(spi_err)?;
    Ok(found.unwrap_or(false))
}

impl Sink {
    /// Forgets the prepared statements (after a failure that may mean the table changed).
    pub fn reset(&mut self) {
        self.target = None;
        self.insert = None;
        self.dead_letter = None;
        self.copy_unusable = false;
    }

    /// Makes sure the tables exist and the statements are prepared for `target`.
    pub fn prepare(&mut self, target: &Target) -> Result<()> {
        if self.target.as_ref() == Some(target) && self.insert.is_some() {
            return Ok(());
        }
        self.reset();
        let (insert, dead_letter) = in_transaction(|| {
            Spi::connect_mut(|client| {
                ensure_tables(client, target)?;
                let insert = client
                    .prepare_mut(insert_sql(target).as_str(), &insert_types())
                    .map_err(spi_err)?
                    .keep();
                let dead = client
                    .prepare_mut(dead_letter_sql(&target.schema).as_str(), &dead_letter_types())
                    .map_err(spi_err)?
                    .keep();
                Ok((insert, dead))
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        self.insert = Some(insert);
        self.dead_letter = Some(dead_letter);
        self.target = Some(target.clone());
        Ok(())
    }

    /// Writes one batch. The fast path is an in-process COPY of `copy` (the same rows in
    /// COPY text format) in one transaction: Postgres' own bulk path, with multi-row heap
    /// inserts. When the batch meets rows already stored, or COPY cannot be used, the rows go
    /// through `INSERT ... ON CONFLICT` instead. Returns how many rows were dead-lettered.
    pub fn write(&mut self, rows: &[StreamRow], copy: &[Vec<u8>]) -> Result<usize> {
        if rows.is_empty() {
            return Ok(0);
        }
        if self.use_conflict_for > 0 {
            self.use_conflict_for -= 1;
        } else if !self.copy_unusable {
            match self.copy_in(copy) {
                Ok(()) => return Ok(0),
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
    /// refused because of some rows' content, it is split in halves and each half tried in
    /// its own transaction, down to the single rows, which go to the dead-letter table. Any
    /// other error (table gone, timeout, disk full) comes back as `Err` with nothing written
    /// from the failing part.
    fn insert_isolating(&mut self, rows: &[StreamRow]) -> Result<usize> {
        if rows.is_empty() {
            return Ok(0);
        }
        match self.insert_rows(rows) {
            Ok(()) => Ok(0),
            Err(e) if e.is_row_level() => {
                if rows.len() == 1 {
                    self.dead_letter(&rows[0], &e)?;
                    return Ok(1);
                }
                let (a, b) = rows.split_at(rows.len() / 2);
                Ok(self.insert_isolating(a)? + self.insert_isolating(b)?)
            }
            Err(e) => Err(e),
        }
    }

    /// COPY of `chunks` into the stream table, in-process (BeginCopyFrom with a data
    /// callback), with the same privilege checks COPY makes.
    fn copy_in(&mut self, chunks: &[Vec<u8>]) -> Result<()> {
        let t = self.target.as_ref().ok_or_else(|| SyncError::Config("not prepared".into()))?;
        let schema = std::ffi::CString::new(t.schema.as_str())
            .map_err(|_| SyncError::Config("schema name contains NUL".into()))?;
        let table = std::ffi::CString::new(t.stream_table.as_str())
            .map_err(|_| SyncError::Config("table name contains NUL".into()))?;
        in_transaction(|| unsafe {
            let rv = pg_sys::makeRangeVar(
                pg_sys::pstrdup(schema.as_ptr()),
                pg_sys::pstrdup(table.as_ptr()),
                -1,
            );
            let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
            let rel = pg_sys::table_openrv(rv, lock);
            let allowed = !(*(*rel).rd_rel).relrowsecurity
                && pg_sys::pg_class_aclcheck(
                    (*rel).rd_id,
                    pg_sys::GetUserId(),
                    pg_sys::ACL_INSERT as _,
                ) == pg_sys::AclResult::ACLCHECK_OK;
            if !allowed {
                pg_sys::table_close(rel, lock);
                return Err(SyncError::CopyUnusable);
            }
            let mut cols: *mut pg_sys::List = std::ptr::null_mut();
            for c in [c"stream_key", c"message_id", c"data", c"timestamp"] {
                cols =
                    pg_sys::lappend(cols, pg_sys::makeString(pg_sys::pstrdup(c.as_ptr())).cast());
            }
            COPY_SOURCE.with(|s| s.set((chunks.as_ptr(), chunks.len(), 0, 0)));
            let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
            // COPY's executor state is built from the parse state's range table, as DoCopy
            // sets it up.
            pg_sys::addRangeTableEntryForRelation(
                pstate,
                rel,
                lock,
                std::ptr::null_mut(),
                false,
                false,
            );
            let cstate = pg_sys::BeginCopyFrom(
                pstate,
                rel,
                std::ptr::null_mut(),
                std::ptr::null(),
                false,
                Some(copy_source),
                cols,
                std::ptr::null_mut(),
            );
            pg_sys::CopyFrom(cstate);
            pg_sys::EndCopyFrom(cstate);
            pg_sys::free_parsestate(pstate);
            COPY_SOURCE.with(|s| s.set((std::ptr::null(), 0, 0, 0)));
            // The lock is kept to the end of the transaction, as COPY does.
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            Ok(())
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(())
    }

    fn insert_rows(&mut self, rows: &[StreamRow]) -> Result<()> {
        let stmt = self.insert.as_ref().ok_or_else(|| SyncError::Config("not prepared".into()))?;
        let keys: Vec<&str> = rows.iter().map(|r| r.stream_key.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
        let data: Vec<&str> = rows.iter().map(|r| r.data.as_str()).collect();
        let millis: Vec<i64> = rows.iter().map(|r| r.millis).collect();
        in_transaction(|| {
            Spi::connect_mut(|client| {
                client
                    .update(stmt, None, &[keys.into(), ids.into(), data.into(), millis.into()])
                    .map(|_| ())
                    .map_err(spi_err)
            })
        })?;
        shmem::bump(|c| &c.pg_ops, 1);
        Ok(())
    }

    fn dead_letter(&mut self, row: &StreamRow, err: &SyncError) -> Result<()> {
        let stmt =
            self.dead_letter.as_ref().ok_or_else(|| SyncError::Config("not prepared".into()))?;
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
        Ok(())
    }
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
        client
            .update(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)), None, &[])
            .map_err(spi_err)?;
    }
    Ok(())
}

fn ensure_tables(client: &mut SpiClient<'_>, t: &Target) -> Result<()> {
    let schema = quote_ident(&t.schema);
    let table = quote_ident(&t.stream_table);
    ensure_schema(client, &t.schema)?;
    if !relation_exists(client, &t.schema, &t.stream_table)? {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{table} (
                id bigserial PRIMARY KEY,
                stream_key text NOT NULL,
                message_id text NOT NULL,
                data jsonb NOT NULL,
                \"timestamp\" timestamptz NOT NULL,
                synced_at timestamptz NOT NULL DEFAULT now(),
                UNIQUE (stream_key, message_id));
             CREATE INDEX IF NOT EXISTS {ts_idx} ON {schema}.{table} (stream_key, \"timestamp\" DESC);
             CREATE INDEX IF NOT EXISTS {id_idx} ON {schema}.{table} (message_id);",
            ts_idx = quote_ident(&format!("{}_stream_key_timestamp_idx", t.stream_table)),
            id_idx = quote_ident(&format!("{}_message_id_idx", t.stream_table)),
        );
        client.update(&sql, None, &[]).map_err(spi_err)?;
    }
    if !relation_exists(client, &t.schema, DEAD_LETTER_TABLE)? {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{dl} (
                id bigserial PRIMARY KEY,
                stream_key text NOT NULL,
                message_id text NOT NULL,
                fields jsonb NOT NULL,
                error text NOT NULL,
                sqlstate text,
                attempts int NOT NULL DEFAULT 1,
                created_at timestamptz NOT NULL DEFAULT now(),
                UNIQUE (stream_key, message_id));",
            dl = quote_ident(DEAD_LETTER_TABLE),
        );
        client.update(&sql, None, &[]).map_err(spi_err)?;
    }
    Ok(())
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
        "INSERT INTO {}.{} (stream_key, message_id, data, \"timestamp\")
         SELECT k, m, d::jsonb, to_timestamp(ts::float8 / 1000)
           FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS u(k, m, d, ts)
         {conflict}",
        quote_ident(&t.schema),
        quote_ident(&t.stream_table),
    )
}

fn dead_letter_types() -> [PgOid; 5] {
    [PgOid::BuiltIn(PgBuiltInOids::TEXTOID); 5]
}

/// A dead letter whose stream name is too long for the index: stored as the first 200
/// characters, the length and an md5, with the full name and the fields in `fields`.
fn dead_letter_wrapped_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {}.{} AS d (stream_key, message_id, fields, error, sqlstate)
         VALUES (pg_catalog.left($1, 200) || '... (' || pg_catalog.length($1) || ' characters, md5 '
                 || pg_catalog.md5($1) || ')',
                 $2, pg_catalog.jsonb_build_object('stream_key', $1, 'fields', $3::jsonb), $4, $5)
         ON CONFLICT (stream_key, message_id) DO UPDATE
            SET attempts = d.attempts + 1, error = EXCLUDED.error,
                sqlstate = EXCLUDED.sqlstate, created_at = now()",
        quote_ident(schema),
        quote_ident(DEAD_LETTER_TABLE),
    )
}

fn dead_letter_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {}.{} AS d (stream_key, message_id, fields, error, sqlstate)
         VALUES ($1, $2, $3::jsonb, $4, $5)
         ON CONFLICT (stream_key, message_id) DO UPDATE
            SET attempts = d.attempts + 1, error = EXCLUDED.error,
                sqlstate = EXCLUDED.sqlstate, created_at = now()",
        quote_ident(schema),
        quote_ident(DEAD_LETTER_TABLE),
    )
}

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
pub struct KvSink {
    target: Option<KvTarget>,
    upsert: Option<OwnedPreparedStatement>,
    live_first: Option<OwnedPreparedStatement>,
    live_next: Option<OwnedPreparedStatement>,
    mark_gone: Option<OwnedPreparedStatement>,
    delete_gone: Option<OwnedPreparedStatement>,
}

impl KvSink {
    pub fn reset(&mut self) {
        *self = KvSink::default();
    }

    pub fn prepare(&mut self, target: &KvTarget) -> Result<()> {
        if self.target.as_ref() == Some(target) && self.upsert.is_some() {
            return Ok(());
        }
        self.reset();
        let table = format!("{}.{}", quote_ident(&target.schema), quote_ident(&target.table));
        let int4 = PgOid::BuiltIn(PgBuiltInOids::INT4OID);
        let text = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
        let texts = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
        let int8 = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
        let (upsert, live, mark, delete) = in_transaction(|| {
            Spi::connect_mut(|client| {
                ensure_kv_table(client, target)?;
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

    /// As [`KvSink::upsert`], but when the batch is refused because of some rows' content
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
        let stmt = self.upsert.as_ref().ok_or_else(|| SyncError::Config("not prepared".into()))?;
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
        let name = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table));
        let found = in_transaction(|| {
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
        })?;
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
                let not_prepared = || SyncError::Config("not prepared".into());
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
        let stmt = stmt.as_ref().ok_or_else(|| SyncError::Config("not prepared".into()))?;
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

fn ensure_kv_table(client: &mut SpiClient<'_>, t: &KvTarget) -> Result<()> {
    let schema = quote_ident(&t.schema);
    let table = quote_ident(&t.table);
    ensure_schema(client, &t.schema)?;
    if !relation_exists(client, &t.schema, &t.table)? {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{table} (
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
             CREATE INDEX IF NOT EXISTS {key_idx} ON {schema}.{table} (redis_key);
             CREATE INDEX IF NOT EXISTS {db_idx} ON {schema}.{table} (redis_db);",
            key_idx = quote_ident(&format!("{}_redis_key_idx", t.table)),
            db_idx = quote_ident(&format!("{}_redis_db_idx", t.table)),
        );
        client.update(&sql, None, &[]).map_err(spi_err)?;
    }
    Ok(())
}

fn kv_upsert_sql(t: &KvTarget) -> String {
    let table = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table));
    let expires = "CASE WHEN u.ex IS NULL THEN NULL ELSE to_timestamp(u.ex::float8 / 1000) END";
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
