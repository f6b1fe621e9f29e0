//! Signal handlers of the worker, and the helper that starts its I/O threads with every
//! signal blocked. Handlers only set flags and the latch (as Postgres' own do); the main
//! loop acts on the flags.
//!
//! SIGTERM is handled as Postgres' `die` handles it (a hand-written equivalent, because the
//! worker installs its own set of handlers): the next CHECK_FOR_INTERRUPTS ends the process
//! with FATAL (exit code 1), also in the middle of a statement, and the postmaster starts the
//! worker again after its restart time (exit 0 would unregister it for good). SIGINT
//! (`pg_cancel_backend`) only sets a flag: nothing the worker does is worth cancelling, except
//! a write past `redis_sync.query_timeout`, whose timer also arrives as SIGINT.
#![warn(clippy::undocumented_unsafe_blocks)]

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;

static CANCEL_REQUESTED: AtomicBool = AtomicBool::new(false);
/// The stream worker ends at the top of its loop, after acknowledging what it committed
/// (see [`stop_gracefully`]).
static GRACEFUL: AtomicBool = AtomicBool::new(false);
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// SIGHUP: note the reload for the top of the loop (pgrx's own handler would reload inside
/// the signal handler).
unsafe extern "C-unwind" fn handle_sighup(_signo: c_int) {
    // SAFETY: errno is saved and restored around the handler's work; ConfigReloadPending is
    // a sig_atomic_t flag and SetLatch is async-signal-safe.
    unsafe {
        let saved = *libc::__errno_location();
        pg_sys::ConfigReloadPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

/// SIGTERM: what Postgres' `die` does; in the stream worker, a request to stop at the top
/// of the loop (see [`stop_gracefully`]).
unsafe extern "C-unwind" fn handle_sigterm(_signo: c_int) {
    // SAFETY: as in handle_sighup; the interrupt flags are sig_atomic_t, proc_exit_inprogress
    // is only read.
    unsafe {
        let saved = *libc::__errno_location();
        if GRACEFUL.load(Ordering::SeqCst) {
            STOP_REQUESTED.store(true, Ordering::SeqCst);
            // A transaction under way is cancelled (a lock wait, a commit waiting for a
            // synchronous standby would otherwise hold the stop up): its entries stay
            // pending; a commit's wait for a standby ends with the commit kept locally.
            if crate::pg::in_transaction_now() {
                pg_sys::QueryCancelPending = 1;
                pg_sys::InterruptPending = 1;
            }
        } else if !pg_sys::proc_exit_inprogress {
            pg_sys::InterruptPending = 1;
            pg_sys::ProcDiePending = 1;
        }
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

/// Makes SIGTERM a request to stop that the loop takes at its top ([`stop_requested`]),
/// so the stream worker can acknowledge the entries it committed before it ends: another
/// server reading the same group would otherwise claim them and store them again. A
/// transaction under way is cancelled.
pub fn stop_gracefully() {
    GRACEFUL.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested (SIGTERM) while stopping gracefully.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Ends the process as Postgres' `die` would (FATAL at the next interrupt check, exit code
/// 1, so the postmaster starts the worker again after its restart time unless it is
/// shutting down).
pub fn die_now() {
    // SAFETY: main thread, outside any transaction; sets the same flags the handler of a
    // plain SIGTERM sets, and the interrupt check right after acts on them.
    unsafe {
        pg_sys::InterruptPending = 1;
        pg_sys::ProcDiePending = 1;
    }
    pgrx::check_for_interrupts!();
}

unsafe extern "C-unwind" fn handle_sigint(_signo: c_int) {
    // SAFETY: errno is saved first and restored last.
    let saved = unsafe { *libc::__errno_location() };
    // redis_sync.query_timeout fired (Postgres' timeout handler sends SIGINT): cancel the
    // write; it is rolled back and retried. Any other SIGINT is a user's cancel request.
    // SAFETY: signal-handler context, which cancel_if_timed_out is written for.
    if !unsafe { crate::pg::cancel_if_timed_out() } {
        CANCEL_REQUESTED.store(true, Ordering::SeqCst);
    }
    // SAFETY: SetLatch is async-signal-safe; errno restored as saved.
    unsafe {
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

fn set_signal(signo: u32, handler: unsafe extern "C-unwind" fn(c_int)) {
    // SAFETY: installing a handler with Postgres' own wrapper, before signals are unblocked.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(signo as c_int, Some(handler));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signo as c_int, Some(handler));
    }
}

/// Installs the handlers, then unblocks signals (which the postmaster starts us with blocked).
pub fn install() {
    set_signal(pg_sys::SIGHUP, handle_sighup);
    set_signal(pg_sys::SIGTERM, handle_sigterm);
    set_signal(pg_sys::SIGINT, handle_sigint);
    // SAFETY: every handler the worker relies on is installed above.
    unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
}

/// Takes a pending plain cancel request (`pg_cancel_backend`), which the worker ignores.
pub fn take_cancel_request() -> bool {
    CANCEL_REQUESTED.swap(false, Ordering::SeqCst)
}

/// Starts a helper thread named `name` with every signal blocked, so that no signal ever runs
/// Postgres' handlers on it. The thread must never call Postgres.
pub fn spawn_helper<F>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    // SAFETY: sigset_t is plain data that sigfillset initialises; pthread_sigmask only
    // changes this thread's mask, and the old mask is put back before returning, so the
    // main thread's signals are untouched while the new thread inherits the blocked set.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = std::thread::Builder::new().name(name.to_owned()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}
