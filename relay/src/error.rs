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

    /// The sink could not be set up.
    #[error("cannot start the sink: {0}")]
    Sink(#[from] SinkError),

    /// An error from outbox-core (schema, migrations).
    #[error(transparent)]
    Core(#[from] outbox_core::Error),
}

impl RelayError {
    pub(crate) fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> RelayError {
        move |source| RelayError::Database { operation, source }
    }
}
