//! The in-process COPY: Postgres' own bulk-load path (multi-row heap inserts) fed from memory
//! through a data callback, with the privilege checks COPY makes.

use std::ffi::{CStr, CString};

use pgrx::prelude::*;

use crate::error::{Result, SyncError};

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
            // SAFETY: `chunks` points at `n` vectors that outlive the COPY (see copy_into).
            let chunk = unsafe { &*chunks.add(idx) };
            let take = (chunk.len() - off).min(max - written);
            // SAFETY: `outbuf` has room for `maxread` bytes and `written + take <= maxread`;
            // `off + take <= chunk.len()`; the two buffers cannot overlap.
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

/// COPY of `chunks` (rows in COPY text format, one `\n`-ended line each) into the `columns`
/// of `schema.table`, in its own transaction. [`SyncError::CopyUnusable`] when COPY cannot be
/// used on the table (row-level security, or INSERT granted on columns only): the caller
/// then takes its INSERT path.
pub fn copy_into(schema: &str, table: &str, columns: &[&CStr], chunks: &[Vec<u8>]) -> Result<()> {
    super::in_transaction(|| copy_rows(schema, table, columns, chunks))
}

/// As [`copy_into`], inside the caller's transaction.
pub fn copy_rows(schema: &str, table: &str, columns: &[&CStr], chunks: &[Vec<u8>]) -> Result<()> {
    let schema =
        CString::new(schema).map_err(|_| SyncError::Config("schema name contains NUL".into()))?;
    let table =
        CString::new(table).map_err(|_| SyncError::Config("table name contains NUL".into()))?;
    {
        // SAFETY: inside a transaction (the caller's) on the main thread; every pointer handed to Postgres
        // is palloc'd in the transaction's context or outlives the COPY (`chunks`, whose
        // address the callback reads only until COPY_SOURCE is cleared below).
        unsafe {
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
            for c in columns {
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
        }
    }
}
