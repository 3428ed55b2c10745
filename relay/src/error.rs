//! The relay's error type.

use crate::config::ConfigError;
use crate::sink::SinkError;

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
    Wal(Box<crate::source::wal::WalError>),

    /// An error from outbox-core (schema, migrations).
    #[error(transparent)]
    Core(#[from] outbox_core::Error),
}

/// Run a database call with a client-side deadline: `statement_timeout` cannot fire
/// when the network to the server stalls.
pub(crate) async fn db_call<T>(
    operation: &'static str,
    timeout: std::time::Duration,
    call: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(RelayError::database(operation)),
        Err(_) => Err(RelayError::DatabaseTimeout {
            operation,
            timeout_ms: timeout.as_millis() as u64,
        }),
    }
}

impl RelayError {
    pub(crate) fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> RelayError {
        move |source| RelayError::Database { operation, source }
    }
}
