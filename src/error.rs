//! Errors of the worker, typed, each with the SQLSTATE it is reported under.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SyncError {
    /// Redis could not be reached (refused, timed out, reset).
    #[error("cannot connect to Redis at {server}: {detail}")]
    RedisUnavailable { server: String, detail: String },

    /// Redis refused our credentials. The password is never part of the message.
    #[error("authentication failed for Redis user \"{user}\" at {server}: {detail}")]
    RedisAuth { server: String, user: String, detail: String },

    /// A Redis command failed; `code` is Redis' error code (`NOGROUP`, `BUSYGROUP`, ...)
    /// when the server answered with an error, `None` for I/O and protocol failures.
    #[error("Redis command {command} failed: {detail}")]
    RedisCommand { command: &'static str, detail: String, code: Option<String> },

    /// In-process COPY cannot be used on the stream table (row-level security, or INSERT
    /// granted on columns only): the INSERT path is used instead.
    #[error("COPY cannot be used on the stream table")]
    CopyUnusable,

    /// A helper thread of the worker (reader, notification listener) is gone.
    #[error("the {0} thread has stopped")]
    ThreadStopped(&'static str),

    /// A statement of the worker failed in Postgres.
    #[error("{message}")]
    Postgres { sqlstate: PgSqlErrorCode, message: String },

    /// Every row tried was refused (a trigger or a constraint that takes nothing now, a
    /// foreign key to a table being reloaded), or the dead-letter table is full: the failure
    /// is the table's, not the rows'. Nothing is dead-lettered or acknowledged; the rows are
    /// tried again.
    #[error("{message} (every row tried was refused, so nothing is dead-lettered or acknowledged; tried again every few seconds)")]
    Refused { sqlstate: PgSqlErrorCode, message: String },

    /// Rows were refused, but the dead-letter table holds `redis_sync.dead_letter_max` rows:
    /// nothing more is dead-lettered or acknowledged; the batch is tried again.
    #[error("the dead-letter table holds {stored} rows, redis_sync.dead_letter_max is {max}: refused entries wait in Redis until dead letters are replayed or removed")]
    DeadLettersFull { stored: u64, max: u64 },

    /// The configuration cannot be used as it stands.
    #[error("{0}")]
    Config(String),
}

impl SyncError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            SyncError::RedisUnavailable { .. } => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            SyncError::RedisAuth { .. } => PgSqlErrorCode::ERRCODE_INVALID_PASSWORD,
            SyncError::RedisCommand { .. } => PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
            SyncError::Config(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::CopyUnusable => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            SyncError::ThreadStopped(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            SyncError::Postgres { sqlstate, .. } | SyncError::Refused { sqlstate, .. } => *sqlstate,
            SyncError::DeadLettersFull { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        }
    }

    /// Does this error mean the Redis connections must be dropped and made again? A Redis
    /// error reply (`code` set) leaves the connection usable; Postgres errors do not touch it.
    pub fn connection_lost(&self) -> bool {
        match self {
            SyncError::RedisUnavailable { .. } | SyncError::RedisAuth { .. } => true,
            SyncError::RedisCommand { code, .. } => code.is_none(),
            SyncError::Config(_)
            | SyncError::CopyUnusable
            | SyncError::ThreadStopped(_)
            | SyncError::Postgres { .. }
            | SyncError::Refused { .. }
            | SyncError::DeadLettersFull { .. } => false,
        }
    }

    /// Redis said the consumer group or the stream is missing (`NOGROUP`), or the stream
    /// was deleted while we were blocked reading it (`UNBLOCKED`).
    pub fn is_nogroup(&self) -> bool {
        matches!(self, SyncError::RedisCommand { code: Some(c), .. } if c == "NOGROUP" || c == "UNBLOCKED")
    }

    /// Redis said a key of the command is of another type (`WRONGTYPE`).
    pub fn is_wrong_type(&self) -> bool {
        matches!(self, SyncError::RedisCommand { code: Some(c), .. } if c == "WRONGTYPE")
    }

    /// A Postgres error caused by one row's content (a CHECK constraint, a trigger that
    /// raises, bad data for a column, a name too long for a btree index entry): the row is
    /// isolated into the dead-letter table instead of failing its batch.
    pub fn is_row_level(&self) -> bool {
        match self {
            SyncError::Postgres { sqlstate, .. } => {
                let code = sqlstate_text(*sqlstate);
                ["22", "23", "54", "P0", "2F", "38", "39"]
                    .iter()
                    .any(|class| code.starts_with(class))
            }
            _ => false,
        }
    }

    /// A refusal of every row: probed again soon, whatever the backoff says.
    pub fn is_refusal(&self) -> bool {
        matches!(self, SyncError::Refused { .. } | SyncError::DeadLettersFull { .. })
    }

    /// Reports the error at `level` with its SQLSTATE (WARNING or lower: never aborts).
    pub fn report(&self, level: PgLogLevel) {
        ErrorReport::new(self.sqlstate(), self.to_string(), "redis_pg_sync").report(level);
    }
}

/// The five-character SQLSTATE of a code.
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let c = code as i32;
    (0..5).map(|i| (((c >> (6 * i)) & 0x3f) as u8 + b'0') as char).collect()
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// Classifies a `redis` crate error from the connect/handshake phase.
pub fn classify_connect(err: &redis::RedisError, server: &str, user: &str) -> SyncError {
    use redis::ErrorKind;
    let detail = err.to_string();
    let auth = matches!(err.kind(), ErrorKind::AuthenticationFailed)
        || detail.contains("WRONGPASS")
        || detail.contains("NOAUTH")
        || detail.contains("invalid password")
        || detail.contains("invalid username-password");
    if auth {
        let user = if user.is_empty() { "default" } else { user };
        SyncError::RedisAuth { server: server.to_owned(), user: user.to_owned(), detail }
    } else {
        SyncError::RedisUnavailable { server: server.to_owned(), detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_server_and_never_a_password() {
        let e = SyncError::RedisAuth {
            server: "127.0.0.1:6379/0".into(),
            user: "app".into(),
            detail: "WRONGPASS invalid username-password pair".into(),
        };
        let m = e.to_string();
        assert!(m.starts_with("authentication failed for Redis user \"app\""), "{m}");
        assert_eq!(e.sqlstate(), PgSqlErrorCode::ERRCODE_INVALID_PASSWORD);
    }

    #[test]
    fn row_level_classes() {
        let pg = |sqlstate| SyncError::Postgres { sqlstate, message: String::new() };
        assert_eq!(sqlstate_text(PgSqlErrorCode::ERRCODE_CHECK_VIOLATION), "23514");
        assert!(pg(PgSqlErrorCode::ERRCODE_CHECK_VIOLATION).is_row_level());
        assert!(pg(PgSqlErrorCode::ERRCODE_RAISE_EXCEPTION).is_row_level());
        assert!(pg(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION).is_row_level());
        assert!(!pg(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE).is_row_level());
        assert!(!pg(PgSqlErrorCode::ERRCODE_QUERY_CANCELED).is_row_level());
        assert!(!pg(PgSqlErrorCode::ERRCODE_DISK_FULL).is_row_level());
        // "index row size exceeds maximum" (a 64 KiB name that does not compress).
        assert!(pg(PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED).is_row_level());
    }
}
