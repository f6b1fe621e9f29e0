//! Postgres plumbing that both writers share: transactions with their timeouts and durable
//! commits, the in-process COPY, the tables' DDL, the latch wait, and the hook that keeps the
//! Redis password out of the log. Everything that calls the C API directly lives here (and in
//! the worker's signal handlers): the features above call these safe functions.
#![warn(clippy::undocumented_unsafe_blocks)]

mod copy;
pub mod ddl;
mod latch;
pub mod redact;
pub mod standbys;
mod txn;

use std::ffi::{CStr, CString};

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::error::SyncError;

pub use copy::{copy_into, copy_rows};
pub use latch::{wait, WakeHandle, Waker, MAX_WAIT};
pub use txn::{
    as_superuser, cancel_if_timed_out, commits_wait_for_standbys, defer_flush, flush_idle_stats,
    flush_wal, flushed_lsn, forget_cancel, in_transaction, in_transaction_now, not_prepared,
    set_query_timeout, sync_standby_names, wal_end,
};

/// Sets the latch of the backend with process ID `pid`, if it lives (wakes a worker).
pub fn wake_backend(pid: i32) {
    if pid == 0 {
        return;
    }
    // SAFETY: BackendPidGetProc returns the PGPROC of a live backend or NULL (checked);
    // setting another process's latch is what latches are for.
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&mut (*proc_).procLatch);
        }
    }
}

/// A Postgres error caught by `PgTryBuilder`, as a typed error keeping its SQLSTATE.
pub fn caught(e: CaughtError) -> SyncError {
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

/// Runs `f` in a subtransaction of the current transaction: an ERROR inside (or an `Err`)
/// rolls back only what `f` did, and comes back as `Err` with its SQLSTATE.
pub fn in_subtransaction<R>(
    f: impl FnOnce() -> crate::error::Result<R>,
) -> crate::error::Result<R> {
    // SAFETY: reads a flag of this backend's transaction machinery.
    if !unsafe { pg_sys::IsTransactionState() } {
        return Err(SyncError::Postgres {
            sqlstate: PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            message: "a subtransaction needs a transaction".into(),
        });
    }
    // SAFETY: inside a transaction on the main thread of a backend; the memory context and
    // resource owner are put back as they were, whichever way the subtransaction ends (as
    // PL/pgSQL's exception blocks do).
    let (cxt, owner) = unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        (cxt, owner)
    };
    let f = std::panic::AssertUnwindSafe(f);
    let outcome = PgTryBuilder::new(move || {
        let f = f;
        (f.0)()
    })
    .catch_others(|e| Err(caught(e)))
    .execute();
    // SAFETY: the subtransaction begun above is the current one.
    unsafe {
        if outcome.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
    }
    outcome
}

/// An SPI failure of pgrx's own (not an ERROR raised by Postgres).
pub fn spi_err(e: pgrx::spi::SpiError) -> SyncError {
    SyncError::Postgres {
        sqlstate: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        message: format!("SPI: {e}"),
    }
}

/// An identifier as Postgres would print it: quoted only when it must be.
pub fn quote_identifier(name: &str) -> String {
    let Ok(c) = CString::new(name) else { return crate::parse::quote_ident(name) };
    // SAFETY: `c` is a valid NUL-terminated string; quote_identifier returns either it or a
    // palloc'd copy, both valid C strings for the duration of this call.
    unsafe {
        let quoted = pg_sys::quote_identifier(c.as_ptr());
        CStr::from_ptr(quoted).to_string_lossy().into_owned()
    }
}

/// What the worker is doing, for `pg_stat_activity` (`state` idle or active, and `query`).
pub fn report_activity(idle: bool, text: &str) {
    let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
    let state =
        if idle { pg_sys::BackendState::STATE_IDLE } else { pg_sys::BackendState::STATE_RUNNING };
    // SAFETY: main thread of a backend with a PGPROC; the string is copied by Postgres.
    unsafe { pg_sys::pgstat_report_activity(state, c.as_ptr()) };
}

/// The server is a hot standby (or still recovering).
pub fn in_recovery() -> bool {
    // SAFETY: a plain read of shared recovery state, valid in any backend.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// This process's PID as Postgres knows it.
pub fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set once at process start and never changes.
    unsafe { pg_sys::MyProcPid }
}

/// Takes a pending SIGHUP and re-reads the configuration files (at the top of the loop, never
/// inside the signal handler). Returns whether a reload happened.
pub fn reload_if_requested() -> bool {
    // SAFETY: the flag is set by the SIGHUP handler and only read and cleared here, on the
    // main thread; ProcessConfigFile is called outside any signal handler.
    unsafe {
        if pg_sys::ConfigReloadPending == 0 {
            return false;
        }
        pg_sys::ConfigReloadPending = 0;
        pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
    }
    true
}

/// Registers `f` to run when the process exits (before shared memory is detached).
pub fn on_exit(f: unsafe extern "C-unwind" fn(std::ffi::c_int, pg_sys::Datum)) {
    // SAFETY: `f` is a plain function that only touches our shared memory.
    unsafe { pg_sys::before_shmem_exit(Some(f), pg_sys::Datum::from(0)) };
}

/// A memory context reset at every turn of the worker's loop: whatever is palloc'd outside a
/// transaction lives for one turn only.
pub struct LoopContext(pg_sys::MemoryContext);

impl LoopContext {
    pub fn new() -> LoopContext {
        // SAFETY: TopMemoryContext exists for the life of the process; the name is static.
        LoopContext(unsafe {
            pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopMemoryContext,
                c"redis_pg_sync loop".as_ptr(),
                0,
                8 * 1024,
                8 * 1024 * 1024,
            )
        })
    }

    /// Switches to the context and frees what the last turn left in it.
    pub fn reset(&self) {
        // SAFETY: the context was created above and is never deleted; outside a transaction
        // nothing else points into it by the top of the loop.
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.0);
            pg_sys::MemoryContextReset(self.0);
        }
    }
}

/// The database's encoding, when it is not UTF8: the worker stores names and values as
/// UTF-8 text (and escapes what is not), so it runs only in a UTF8 database.
pub fn non_utf8_encoding() -> Option<String> {
    // SAFETY: the backend is connected to its database, whose encoding is set for good
    // during start-up; the name is a static C string.
    let (encoding, name) = unsafe {
        let encoding = pg_sys::GetDatabaseEncoding();
        let name = std::ffi::CStr::from_ptr(pg_sys::GetDatabaseEncodingName());
        (encoding, name.to_string_lossy().into_owned())
    };
    (encoding != pg_sys::pg_enc::PG_UTF8 as i32).then_some(name)
}
