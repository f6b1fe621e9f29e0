//! Keeps the Redis password out of the server log.
//!
//! On reload Postgres logs every changed setting as `parameter "x" changed to "value"`, with
//! the raw value from the file and no flag to suppress it. An `emit_log_hook` rewrites that
//! one message for `redis_sync.redis_password` before it reaches the log.

use std::ffi::CStr;

use pgrx::prelude::*;

static mut PREV_HOOK: pg_sys::emit_log_hook_type = None;

const CHANGED_FORMAT: &[u8] = b"parameter \"%s\" changed to \"%s\"";
const PASSWORD_SETTING: &[u8] = b"\"redis_sync.redis_password\"";

pub fn init() {
    // SAFETY: called once from _PG_init, before any other code of the process logs; the
    // previous hook is kept and chained.
    unsafe {
        PREV_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn redact(edata: *mut pg_sys::ErrorData) {
    // SAFETY: Postgres calls the hook with a valid ErrorData (checked for NULL fields below)
    // in a memory context where pstrdup is allowed.
    unsafe {
        if let Some(prev) = PREV_HOOK {
            prev(edata);
        }
        if edata.is_null() || (*edata).message.is_null() || (*edata).message_id.is_null() {
            return;
        }
        if CStr::from_ptr((*edata).message_id).to_bytes() != CHANGED_FORMAT {
            return;
        }
        let msg = CStr::from_ptr((*edata).message).to_bytes();
        if msg.windows(PASSWORD_SETTING.len()).any(|w| w == PASSWORD_SETTING) {
            (*edata).message = pg_sys::pstrdup(
                c"parameter \"redis_sync.redis_password\" changed (value hidden)".as_ptr(),
            );
        }
    }
}
