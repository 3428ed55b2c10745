//! The relay's error type.

use crate::config::ConfigError;
use crate::resilience::DbCallFailure;
use crate::sink::SinkError;
use crate::source::wal::WalError;

/// Result with [`RelayError`] as the default error type.
pub type Result<T, E = RelayError> = std::result::Result<T, E>;

/// Why the relay could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration is invalid; the message names the field and the fix.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A PostgreSQL call failed.
    #[error("database error while {operation}: {source}")]
    Database {
        /// What the relay was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A PostgreSQL call did not answer in time (network stall, overloaded server).
    #[error(
        "database call timed out after {timeout_ms} ms while {operation}; check the network to PostgreSQL and its load"
    )]
    DatabaseTimeout {
        /// What the relay was doing.
        operation: &'static str,
        /// The timeout that fired.
        timeout_ms: u64,
    },

    /// The ops endpoint's address cannot be bound (in use, not a local address, no such host).
    #[error(
        "cannot serve the ops endpoint on {addr}: {source}; choose a free port and a local address or host name in ops.listen_addr"
    )]
    OpsBind {
        /// `ops.listen_addr`.
        addr: String,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },

    /// PostgreSQL or the broker did not answer within `instance.startup_timeout_ms`.
    #[error(
        "gave up waiting for {what} after {waited_ms} ms (instance.startup_timeout_ms); last error: {last_error}"
    )]
    StartupTimeout {
        /// `PostgreSQL`, `RabbitMQ` or `Kafka`.
        what: &'static str,
        /// How long the relay waited.
        waited_ms: u64,
        /// The last attempt's error, with its cause.
        last_error: String,
    },

    /// The sink could not be set up.
    #[error("cannot start the sink: {0}")]
    Sink(#[from] SinkError),

    /// The WAL source failed in a way that needs an operator (slot, publication, decoding).
    #[error(transparent)]
    Wal(Box<WalError>),

    /// An error from outbox-core (schema, migrations).
    #[error(transparent)]
    Core(#[from] outbox_core::Error),
}

/// [`crate::resilience::db_call`] with the relay's error type.
pub(crate) async fn db_call<T>(
    operation: &'static str,
    timeout: std::time::Duration,
    call: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
) -> Result<T> {
    crate::resilience::db_call(operation, timeout, call).await
}

impl From<DbCallFailure> for RelayError {
    fn from(failure: DbCallFailure) -> Self {
        match failure {
            DbCallFailure::Failed { operation, source } => {
                RelayError::Database { operation, source }
            }
            DbCallFailure::TimedOut {
                operation,
                timeout_ms,
            } => RelayError::DatabaseTimeout {
                operation,
                timeout_ms,
            },
        }
    }
}

impl RelayError {
    /// True when a new attempt (a new WAL session, with backoff) can succeed
    /// without an operator: database trouble other than TLS or the configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            RelayError::Database { source, .. } => {
                !matches!(source, sqlx::Error::Configuration(_) | sqlx::Error::Tls(_))
            }
            RelayError::DatabaseTimeout { .. } => true,
            RelayError::Wal(error) => error.is_retryable(),
            _ => false,
        }
    }

    /// True for SQLSTATE class 57P (admin, crash or immediate shutdown; cannot connect now).
    pub(crate) fn is_server_going_down(&self) -> bool {
        let RelayError::Database { source, .. } = self else {
            return false;
        };
        source
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| code.starts_with("57P"))
    }

    pub(crate) fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> RelayError {
        move |source| RelayError::Database { operation, source }
    }
}

impl From<WalError> for RelayError {
    fn from(error: WalError) -> Self {
        let config = |field: &str, problem: String, fix: String| {
            RelayError::Config(ConfigError {
                field: field.to_owned(),
                problem,
                fix,
            })
        };
        match error {
            WalError::InvalidConfig {
                field,
                problem,
                fix,
            } => config(field, problem, fix),
            WalError::WalLevel { actual } => config(
                "PostgreSQL wal_level",
                format!("is {actual:?}, the WAL source needs 'logical'"),
                "run `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL (or use the polling source)"
                    .to_owned(),
            ),
            WalError::ReplicationNotPermitted { role } => config(
                "database.url",
                format!("role {role:?} may not use replication"),
                format!("run `ALTER ROLE \"{role}\" REPLICATION` and allow it replication connections in pg_hba.conf"),
            ),
            WalError::Publication {
                publication,
                problem,
                fix,
            } => config(
                "wal.publication",
                format!("{publication:?}: {problem}"),
                fix,
            ),
            WalError::Slot { slot, problem, fix } => {
                config("wal.slot", format!("{slot:?}: {problem}"), fix)
            }
            WalError::Database { operation, source } => RelayError::Database { operation, source },
            WalError::DatabaseTimeout {
                operation,
                timeout_ms,
            } => RelayError::DatabaseTimeout {
                operation,
                timeout_ms,
            },
            WalError::Core(error) => RelayError::Core(error),
            other => RelayError::Wal(Box::new(other)),
        }
    }
}
