//! Errors of the worker, typed, each with the SQLSTATE it is reported under.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Redis could not be reached (refused, timed out, reset).
    #[error("cannot connect to Redis at {server}: {detail}")]
    RedisUnavailable { server: String, detail: String },

    /// Redis refused our credentials. The password is never part of the message.
    #[error("authentication failed for Redis user \"{user}\" at {server}: {detail}")]
    RedisAuth { server: String, user: String, detail: String },

    /// A Redis command failed on an established connection.
    #[error("Redis command {command} failed: {detail}")]
    RedisCommand { command: &'static str, detail: String },

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
        }
    }

    /// Is the connection still usable after this error?
    pub fn connection_lost(&self) -> bool {
        !matches!(self, SyncError::Config(_))
    }

    /// Reports the error at `level` with its SQLSTATE (WARNING or lower: never aborts).
    pub fn report(&self, level: PgLogLevel) {
        ErrorReport::new(self.sqlstate(), self.to_string(), "redis_pg_sync").report(level);
    }
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
}
