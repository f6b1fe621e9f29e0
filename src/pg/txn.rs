//! One transaction per write, under `redis_sync.query_timeout`, with errors caught and typed.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::prelude::*;

use crate::error::{Result, SyncError};

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
    // SAFETY: get_timeout_indicator only reads a flag of the timeout module's static array,
    // and the two interrupt flags are sig_atomic_t variables meant to be set from handlers.
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

/// Whether [`in_transaction`] is running a transaction now (read by the SIGTERM handler).
static IN_TXN: AtomicBool = AtomicBool::new(false);

/// Whether a transaction of [`in_transaction`] is under way. Safe in a signal handler.
pub fn in_transaction_now() -> bool {
    IN_TXN.load(Ordering::SeqCst)
}

/// Drops a query cancel that came after the last interrupt check (so it cannot cancel what
/// the worker does next).
pub fn forget_cancel() {
    // SAFETY: main thread; the flag is a plain sig_atomic_t of this backend.
    unsafe { pg_sys::QueryCancelPending = 0 };
}

/// Whether this process's commits return before their WAL is flushed (see [`defer_flush`]).
static DEFER_FLUSH: AtomicBool = AtomicBool::new(false);

/// With `on`, the transactions of [`in_transaction`] commit with `synchronous_commit = off`:
/// the commit returns (and its rows are visible) without waiting for the WAL flush, and the
/// caller finds out when it is durable with [`wal_end`] and [`flushed_lsn`]. This is
/// how PostgreSQL's own logical-replication apply workers commit: the stream worker
/// acknowledges an entry only once the WAL holding its row is flushed, so nothing that Redis
/// forgets can be lost in a crash, and no commit waits on a disk flush that other writers'
/// WAL (a key-value pass, say) made slow.
pub fn defer_flush(on: bool) {
    DEFER_FLUSH.store(on, Ordering::Relaxed);
}

/// Whether commits wait for synchronous standbys, as the server, database or role configure
/// it (`synchronous_standby_names` set and `synchronous_commit` above `local`). Read outside
/// a transaction, where the worker's own per-transaction setting is not in force.
pub fn commits_wait_for_standbys() -> bool {
    // SAFETY: main thread; both are plain GUC variables of this backend, and a non-null
    // `SyncRepStandbyNames` points at a NUL-terminated string owned by the GUC machinery.
    unsafe {
        let level = pg_sys::synchronous_commit as u32;
        let names = pg_sys::SyncRepStandbyNames;
        level > pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_LOCAL_FLUSH
            && !names.is_null()
            && *names != 0
    }
}

/// `synchronous_standby_names` as this backend has it ("" when unset).
pub fn sync_standby_names() -> String {
    // SAFETY: main thread; a non-null `SyncRepStandbyNames` points at a NUL-terminated
    // string owned by the GUC machinery, copied here before anything can change it.
    unsafe {
        let names = pg_sys::SyncRepStandbyNames;
        if names.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(names).to_string_lossy().into_owned()
    }
}

/// Where the WAL written so far ends: once it is flushed that far, every commit this process
/// made or saw (other backends' too, an earlier worker's not yet flushed) is durable.
pub fn wal_end() -> u64 {
    // SAFETY: main thread; reads the shared insert position under its spin lock, and a
    // plain integer GUC set at startup.
    let (insert, segment) =
        unsafe { (pg_sys::GetXLogInsertRecPtr(), pg_sys::wal_segment_size as u64) };
    end_of_records(insert, pg_sys::XLOG_BLCKSZ as u64, segment)
}

/// The insert position names the first byte after a page's header once the WAL reaches a
/// page boundary, although nothing is written on that page yet: flushing up to it is an
/// ERROR ("xlog flush request ... is not satisfied") and the flush position never reaches
/// it. Every record written so far ends at the boundary, so that is where the WAL ends.
fn end_of_records(insert: u64, page: u64, segment: u64) -> u64 {
    const fn aligned(size: usize) -> u64 {
        (size as u64).div_ceil(8) * 8
    }
    let header = if segment > 0 && insert % segment < page {
        aligned(std::mem::size_of::<pg_sys::XLogLongPageHeaderData>())
    } else {
        aligned(std::mem::size_of::<pg_sys::XLogPageHeaderData>())
    };
    if page > 0 && insert % page == header {
        insert - header
    } else {
        insert
    }
}

/// How far the WAL is flushed to disk.
pub fn flushed_lsn() -> u64 {
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    // SAFETY: reads the shared flush position under its spin lock.
    unsafe {
        pg_sys::GetFlushRecPtr()
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    // SAFETY: reads the shared flush position under its spin lock; a null timeline pointer
    // is allowed.
    unsafe {
        pg_sys::GetFlushRecPtr(std::ptr::null_mut())
    }
}

/// Flushes the WAL up to `lsn` (what a synchronous commit waits for; standbys are not
/// waited for).
pub fn flush_wal(lsn: u64) {
    // SAFETY: main thread, outside a transaction; flushing up to a position already written
    // is what a synchronous commit does.
    unsafe { pg_sys::XLogFlush(lsn) };
}

/// Runs `f` (inside a transaction) as the bootstrap superuser: for the extension's own
/// bookkeeping in `redis_sync` (the routes, the landing records), which the worker reads
/// and writes whatever role it writes the user's tables as. As a `SECURITY DEFINER`
/// function with `SET search_path` would, it runs with `search_path` set to
/// `pg_catalog, pg_temp`, so no function or operator a user made in a schema of the path can
/// stand in for a built-in one. The role and the path come back after `f`, and on an ERROR
/// the transaction's abort restores both as well.
pub fn as_superuser<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, std::ffi::c_int, std::ffi::c_int);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: main thread, inside the transaction; puts back the identity saved
            // below and ends the GUC nesting level opened there (what fmgr_security_definer
            // does on its way out).
            unsafe {
                pg_sys::AtEOXact_GUC(true, self.2);
                pg_sys::SetUserIdAndSecContext(self.0, self.1);
            }
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context: std::ffi::c_int = 0;
    // SAFETY: main thread inside a transaction; the saved identity and the GUC level are
    // put back by `Restore`; `pg_catalog, pg_temp` is a valid search_path, so nothing is
    // raised.
    let level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as std::ffi::c_int,
        );
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            pgrx::PgLogLevel::ERROR as std::ffi::c_int,
            false,
        );
        level
    };
    let _restore = Restore(user, context, level);
    f()
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
    IN_TXN.store(true, Ordering::SeqCst);
    // SAFETY: main thread, outside any transaction (the worker never nests these calls).
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        if timeout_ms > 0 {
            enable_timeout_after(STATEMENT_TIMEOUT, timeout_ms);
        }
    }
    let f = AssertUnwindSafe(f);
    let defer = DEFER_FLUSH.load(Ordering::Relaxed);
    let outcome = PgTryBuilder::new(move || {
        let f = f;
        if defer {
            // SAFETY: inside the transaction started above; a LOCAL setting ends with it,
            // and `off` is a valid value, so nothing is raised.
            unsafe {
                pg_sys::set_config_option(
                    c"synchronous_commit".as_ptr(),
                    c"off".as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_LOCAL,
                    true,
                    pgrx::PgLogLevel::ERROR as std::ffi::c_int,
                    false,
                );
            }
        }
        match (f.0)() {
            Ok(r) => {
                // SAFETY: the snapshot pushed above is still the active one, and the
                // transaction started above is still open.
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
    .catch_others(|e| Err(super::caught(e)))
    .execute();
    // SAFETY: aborting is what an ERROR's longjmp target would do; the snapshot stack is
    // cleaned up by the abort.
    if outcome.is_err() && unsafe { pg_sys::IsTransactionState() } {
        // SAFETY: as above.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    IN_TXN.store(false, Ordering::SeqCst);
    if timeout_ms > 0 {
        // SAFETY: disabling a timer is always allowed; the cancel flag is ours to clear.
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
        // SAFETY: outside a transaction, on the main thread, as an idle backend calls it.
        unsafe {
            pg_sys::pgstat_report_stat(true);
        }
    }
}

/// Lets autovacuum see the worker's writes.
fn report_stat() {
    // SAFETY: right after a commit, on the main thread, outside any transaction.
    unsafe {
        pg_sys::pgstat_report_stat(false);
    }
}

/// For errors the worker raises itself inside a transaction.
pub fn not_prepared() -> SyncError {
    SyncError::Config("statement not prepared".into())
}

#[cfg(test)]
mod tests {
    use super::end_of_records;

    const PAGE: u64 = 8192;
    const SEGMENT: u64 = 16 << 20;

    #[test]
    fn the_wal_ends_at_a_page_boundary_that_nothing_is_written_past() {
        // 0/16C0018: the header of a page that is not a segment's first.
        assert_eq!(end_of_records(0x16C_0018, PAGE, SEGMENT), 0x16C_0000);
        // A segment's first page has the long header.
        assert_eq!(end_of_records(0x200_0028, PAGE, SEGMENT), 0x200_0000);
    }

    #[test]
    fn a_position_with_records_on_its_page_is_kept() {
        for lsn in [0x16C_0019, 0x16C_0030, 0x16C_1FF8, 0x200_0018, 0x200_0030, 0x16C_0000] {
            assert_eq!(end_of_records(lsn, PAGE, SEGMENT), lsn, "{lsn:#x}");
        }
    }
}
