//! The store's error type, and the one place that decides whether a database error means the
//! database is *unavailable* (the host pauses and retries) or that the request itself was wrong.

/// Why a store operation failed.
///
/// The pipeline branches on [`StoreError::is_unavailable`]: an unavailable store is the host's
/// own problem (back off, pause intake, report not-ready, never dead-letter), every other
/// variant is an answer about the request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached or refused to work for now: connection refused or
    /// closed, pool timed out or closed, I/O error, server shutting down, too many connections,
    /// disk full, a serialization failure or deadlock, a locked SQLite file. Retrying later is
    /// the right answer.
    #[error("store unavailable during {operation}: {source}")]
    Unavailable {
        /// The store operation that failed, e.g. `commit`.
        operation: &'static str,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },
    /// The thing the operation acts on does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The operation contradicts what is stored (e.g. a binding id owned by another tenant, a
    /// DLQ entry that is already resolved).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A tenant's quota would be exceeded (handler count, total component bytes).
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The request is malformed (e.g. state writes for a message without a key, a bad URL).
    #[error("invalid {0}")]
    Invalid(String),
    /// A stored row does not decode (an unknown state name, a bad timestamp or header list):
    /// the database was changed behind the store's back.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table the row came from.
        table: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// Applying the migrations failed for another reason than unavailability (e.g. the
    /// database has a migration this binary does not know, or one was edited after it ran).
    #[error("store migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Any other database error: a bug in a query or a schema that does not match.
    #[error("database error during {operation}: {source}")]
    Database {
        /// The store operation that failed.
        operation: &'static str,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    /// Whether the store is unavailable (retry later, never dead-letter) rather than the
    /// request being wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(source)) => {
                is_transient(source)
            }
            _ => false,
        }
    }

    /// Wrap a driver error from `operation`, classifying it.
    pub(crate) fn from_sqlx(operation: &'static str, source: sqlx::Error) -> Self {
        if is_transient(&source) {
            return StoreError::Unavailable { operation, source };
        }
        match &source {
            sqlx::Error::Configuration(detail) => {
                StoreError::Invalid(format!("store configuration: {detail}"))
            }
            sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation => {
                StoreError::Conflict(format!("{operation}: {}", db.message()))
            }
            _ => StoreError::Database { operation, source },
        }
    }

    /// Wrap a migration error, classifying the driver errors inside it.
    pub(crate) fn from_migrate(source: sqlx::migrate::MigrateError) -> Self {
        match source {
            sqlx::migrate::MigrateError::Execute(inner) if is_transient(&inner) => {
                StoreError::Unavailable {
                    operation: "migrate",
                    source: inner,
                }
            }
            other => StoreError::Migrate(other),
        }
    }

    /// A row that does not decode.
    pub(crate) fn corrupt(table: &'static str, detail: impl Into<String>) -> Self {
        StoreError::Corrupt {
            table,
            detail: detail.into(),
        }
    }
}

/// A closure for `map_err` that classifies driver errors of `operation`.
pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::from_sqlx(operation, source)
}

/// Whether a driver error means "not now" rather than "not this".
fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        // A connection that died mid-message (e.g. the server was killed) shows up as a
        // protocol error.
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                postgres_code_is_transient(pg.code())
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                db.code()
                    .is_some_and(|code| sqlite_code_is_transient(&code))
            } else {
                false
            }
        }
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs that mean the server cannot serve us now.
fn postgres_code_is_transient(code: &str) -> bool {
    // 08: connection exception. 53: insufficient resources (disk full, out of memory, too many
    // connections). 57P01-57P03: admin or crash shutdown, cannot connect now. 58: system error
    // (I/O). 57014: statement cancelled (a statement timeout on an overloaded server).
    // 40001/40P01: serialization failure, deadlock (retry the transaction). 25006: read only
    // transaction (a fail-over in progress).
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("58")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "40001" | "40P01" | "25006"
        )
}

/// SQLite extended result codes whose primary code means "not now".
fn sqlite_code_is_transient(code: &str) -> bool {
    let Ok(extended) = code.parse::<i32>() else {
        return false;
    };
    // SQLITE_BUSY 5, SQLITE_LOCKED 6, SQLITE_NOMEM 7, SQLITE_IOERR 10, SQLITE_FULL 13,
    // SQLITE_CANTOPEN 14, SQLITE_PROTOCOL 15.
    matches!(extended & 0xff, 5 | 6 | 7 | 10 | 13 | 14 | 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_unavailable_and_constraint_errors_are_not() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(StoreError::from_sqlx("commit", sqlx::Error::Io(refused)).is_unavailable());
        assert!(StoreError::from_sqlx("commit", sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(StoreError::from_sqlx("commit", sqlx::Error::PoolClosed).is_unavailable());
        assert!(!StoreError::from_sqlx("commit", sqlx::Error::RowNotFound).is_unavailable());
        assert!(!StoreError::NotFound("handler a/b".into()).is_unavailable());
        assert!(!StoreError::Conflict("x".into()).is_unavailable());
    }

    #[test]
    fn postgres_and_sqlite_codes_are_classified() {
        assert!(postgres_code_is_transient("08006"));
        assert!(postgres_code_is_transient("57P01"));
        assert!(postgres_code_is_transient("53300"));
        assert!(postgres_code_is_transient("40P01"));
        assert!(!postgres_code_is_transient("23505"));
        assert!(!postgres_code_is_transient("42P01"));
        assert!(sqlite_code_is_transient("5"));
        // SQLITE_BUSY_TIMEOUT = SQLITE_BUSY | (3 << 8)
        assert!(sqlite_code_is_transient("773"));
        assert!(sqlite_code_is_transient("10"));
        // SQLITE_CONSTRAINT_UNIQUE = 2067
        assert!(!sqlite_code_is_transient("2067"));
        assert!(!sqlite_code_is_transient("1"));
    }
}
