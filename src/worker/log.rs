//! The worker's own log lines, filtered by `redis_sync.log_level`, and the text that turns a
//! permission error into the GRANTs that fix it.

use pgrx::prelude::*;
use pgrx::PgLogLevel;

use crate::error::SyncError;
use crate::gucs::{LogLevel, Settings};
use crate::pg::quote_identifier;

/// Nothing here raises an ERROR: the worker reports and carries on.
pub struct Log {
    pub level: LogLevel,
}

impl Log {
    pub fn at(&self, level: LogLevel, msg: &str) {
        if level < self.level {
            return;
        }
        let pg_level = match level {
            LogLevel::Debug | LogLevel::Info | LogLevel::Notice => PgLogLevel::LOG,
            LogLevel::Warning | LogLevel::Error => PgLogLevel::WARNING,
        };
        ereport!(pg_level, PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, msg);
    }

    pub fn info(&self, msg: &str) {
        self.at(LogLevel::Info, msg);
    }

    pub fn debug(&self, msg: &str) {
        self.at(LogLevel::Debug, msg);
    }

    pub fn warning(&self, msg: &str) {
        self.at(LogLevel::Warning, msg);
    }

    pub fn error(&self, err: &SyncError) {
        if LogLevel::Warning >= self.level {
            err.report(PgLogLevel::WARNING);
        }
    }
}

/// A "permission denied" from Postgres gets the grants that fix it appended, so the DBA reads
/// in `last_error` and the log exactly what to run.
pub fn explain_privileges(err: SyncError, s: &Settings) -> SyncError {
    match err {
        SyncError::Postgres { sqlstate, message }
            if sqlstate == PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE =>
        {
            SyncError::Postgres { sqlstate, message: format!("{message}. {}", grants_needed(s)) }
        }
        other => other,
    }
}

/// The privileges the worker's role needs, as the GRANTs to run.
pub fn grants_needed(s: &Settings) -> String {
    let role = if s.role.is_empty() { "<role>".to_owned() } else { quote_identifier(&s.role) };
    let schema = quote_identifier(&s.schema);
    let table = |name: &str| format!("{schema}.{}", quote_identifier(name));
    format!(
        "The worker writes as role {role}; run: GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}; \
         or create the tables beforehand and run: GRANT USAGE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT, INSERT, UPDATE ON {}, {} TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {role}; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role};",
        table(&s.stream_table),
        table(crate::pg::ddl::DEAD_LETTER_TABLE),
        table(&s.key_value_table),
    )
}
