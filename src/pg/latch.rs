//! The one place the worker sleeps: its process latch, which every signal sets and which
//! ends the process if the postmaster dies.

use std::ffi::{c_int, c_long};
use std::time::Duration;

use pgrx::prelude::*;

/// Longest single latch wait: the loop comes round at least this often.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// Sleeps on the process latch for at most `timeout` (capped at [`MAX_WAIT`]); returns early
/// on any signal, and ends the process if the postmaster dies.
pub fn wait(timeout: Duration) {
    if timeout.is_zero() {
        return;
    }
    let ms = timeout.min(MAX_WAIT).as_millis().max(1) as c_long;
    // SAFETY: MyLatch is the process latch, owned by this (main) thread.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as c_int,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}
