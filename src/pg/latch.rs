//! The one place the worker's main thread sleeps: its process latch (which every signal
//! sets, and which ends the process if the postmaster dies) together with a wake-up pipe
//! that the helper threads write to when they hand something over. So the main thread sleeps
//! until there is work, and never polls.

use std::ffi::{c_int, c_long};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

use pgrx::prelude::*;

/// Longest single wait: the loop comes round at least this often.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// The main thread's end of the wake-up pipe.
pub struct Waker {
    read: std::io::PipeReader,
    write: std::io::PipeWriter,
}

/// A helper thread's end: `wake()` ends the main thread's current or next wait.
pub struct WakeHandle(std::io::PipeWriter);

impl WakeHandle {
    pub fn wake(&self) {
        // A full pipe already holds a wake-up: nothing is lost by not writing.
        let _ = (&self.0).write(&[1]);
    }

    /// Another handle on the same pipe, for another helper thread.
    pub fn try_clone(&self) -> std::io::Result<WakeHandle> {
        Ok(WakeHandle(self.0.try_clone()?))
    }
}

fn set_nonblocking(fd: c_int) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns; F_GETFL/F_SETFL have no memory effects.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        let (read, write) = std::io::pipe()?;
        set_nonblocking(read.as_raw_fd())?;
        set_nonblocking(write.as_raw_fd())?;
        Ok(Waker { read, write })
    }

    /// A handle for a helper thread.
    pub fn handle(&self) -> std::io::Result<WakeHandle> {
        Ok(WakeHandle(self.write.try_clone()?))
    }

    /// Empties the pipe (after a wait).
    fn drain(&mut self) {
        let mut buf = [0u8; 64];
        while matches!(self.read.read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Waits for at most `timeout` (capped at [`MAX_WAIT`]) for a signal, a helper thread's
    /// wake-up or the timeout, whichever comes first. Also with a zero timeout it looks at
    /// the postmaster once: the process ends if the postmaster died.
    pub fn wait(&mut self, timeout: Duration) {
        let ms = timeout.min(MAX_WAIT).as_millis() as c_long;
        let events = pg_sys::WL_LATCH_SET
            | pg_sys::WL_TIMEOUT
            | pg_sys::WL_EXIT_ON_PM_DEATH
            | pg_sys::WL_SOCKET_READABLE;
        // SAFETY: MyLatch is the process latch, owned by this (main) thread; the pipe's read
        // end stays open for the duration of the call.
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as c_int,
                self.read.as_raw_fd(),
                ms as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        self.drain();
    }
}

/// Sleeps on the process latch for at most `timeout` (capped at [`MAX_WAIT`]); returns early
/// on any signal, and ends the process if the postmaster dies. For the SQL functions that
/// wait for the worker.
pub fn wait(timeout: Duration) {
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
