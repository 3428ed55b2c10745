//! Why the WAL source could not start or had to stop.

use super::*;

/// Why the WAL source could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// A setting is invalid.
    #[error("invalid setting {field}: {problem}; {fix}")]
    InvalidConfig {
        /// The setting, e.g. `wal.slot`.
        field: &'static str,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },

    /// The server does not write logical WAL.
    #[error(
        "PostgreSQL runs with wal_level = {actual:?}, the WAL source needs 'logical': \
         run `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL (or use the polling source)"
    )]
    WalLevel {
        /// The server's `wal_level`.
        actual: String,
    },

    /// The role may not use replication.
    #[error(
        "role {role:?} may not use replication: run `ALTER ROLE \"{role}\" REPLICATION` and allow it \
         replication connections in pg_hba.conf (`host replication {role} <address> <method>`)"
    )]
    ReplicationNotPermitted {
        /// The role of the connection.
        role: String,
    },

    /// The publication is missing and cannot be created, or does not cover what is needed.
    #[error("publication {publication:?}: {problem}; {fix}")]
    Publication {
        /// The publication.
        publication: String,
        /// What is wrong with it.
        problem: String,
        /// How to fix it.
        fix: String,
    },

    /// The slot cannot be used (wrong plugin or database, cannot be created).
    #[error("replication slot {slot:?}: {problem}; {fix}")]
    Slot {
        /// The slot.
        slot: String,
        /// What is wrong with it.
        problem: String,
        /// How to fix it.
        fix: String,
    },

    /// Another session kept streaming from the slot for the whole `slot_busy_timeout`.
    #[error(
        "replication slot {slot:?} is still in use by process {pid:?} after waiting {waited_ms} ms: \
         another relay instance (or pg_recvlogical) streams from it; stop it, or run one relay per slot"
    )]
    SlotBusy {
        /// The slot.
        slot: String,
        /// The walsender process holding it, when the server said.
        pid: Option<i32>,
        /// How long the source waited.
        waited_ms: u64,
    },

    /// The slot disappeared or was invalidated while the source was running.
    #[error(
        "replication slot {slot:?} was lost while streaming (last confirmed position {last_confirmed_lsn}): \
         start the source again to recover"
    )]
    SlotLost {
        /// The slot.
        slot: String,
        /// The last recorded confirmed position.
        last_confirmed_lsn: Lsn,
    },

    /// An SQL call failed.
    #[error("database error while {operation}: {source}")]
    Database {
        /// What the source was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// An SQL call did not answer in time.
    #[error("database call timed out after {timeout_ms} ms while {operation}")]
    DatabaseTimeout {
        /// What the source was doing.
        operation: &'static str,
        /// The deadline that passed.
        timeout_ms: u64,
    },

    /// The replication connection failed.
    #[error("replication stream failed while {operation}: {source}")]
    Replication {
        /// What the source was doing.
        operation: &'static str,
        /// The replication client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// Whether reconnecting can help.
        retryable: bool,
    },

    /// Starting replication did not finish in time.
    #[error("starting replication timed out after {timeout_ms} ms")]
    ReplicationTimeout {
        /// The deadline that passed.
        timeout_ms: u64,
    },

    /// A replicated change could not be read at all (a protocol message out of
    /// place, a publication without a needed column). The stream stops there (it
    /// is never skipped); fix the cause and restart. Changes that are well formed
    /// but no event (a malformed WAL message with the outbox prefix, a row with an
    /// infinite `created_at`) are not errors: see [`Undecodable`].
    #[error("cannot decode the change at LSN {lsn}: {problem}")]
    Decode {
        /// Where in the WAL.
        lsn: Lsn,
        /// What is wrong.
        problem: String,
    },

    /// An earlier error left the stream in an unknown state; call [`WalSource::reconnect`].
    #[error("the replication stream failed earlier; reconnect before reading on")]
    NeedsReconnect,

    /// An error from outbox-core (the outbox tables are missing).
    #[error(transparent)]
    Core(#[from] outbox_core::Error),
}

impl WalError {
    /// True when trying again (reconnecting, with backoff) can succeed without an operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            WalError::Database { source, .. } => {
                !matches!(source, sqlx::Error::Configuration(_) | sqlx::Error::Tls(_))
            }
            WalError::Replication { retryable, .. } => *retryable,
            WalError::DatabaseTimeout { .. }
            | WalError::ReplicationTimeout { .. }
            | WalError::SlotBusy { .. }
            | WalError::NeedsReconnect => true,
            _ => false,
        }
    }

    pub(super) fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> WalError {
        move |source| WalError::Database { operation, source }
    }

    pub(super) fn replication(operation: &'static str) -> impl FnOnce(PgWireError) -> WalError {
        move |source| {
            let retryable = match &source {
                PgWireError::Io(_) | PgWireError::Task(_) => true,
                // Mostly the server going away (shutdown 57P01, starting up 57P03, a
                // terminated walsender); not access (28), missing objects or bad
                // commands (42), unsupported features (0A) or a missing database (3D).
                PgWireError::Server(message) => !matches!(
                    sqlstate_in(message).map(|code| &code[..2]),
                    Some("28" | "42" | "0A" | "3D")
                ),
                _ => false,
            };
            WalError::Replication {
                operation,
                source: Box::new(source),
                retryable,
            }
        }
    }
}

/// The SQLSTATE in a replication client's server error text: `… (SQLSTATE 55006)`.
pub(super) fn sqlstate_in(message: &str) -> Option<&str> {
    let start = message.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    message
        .get(start..start + 5)
        .filter(|code| code.bytes().all(|b| b.is_ascii_alphanumeric()))
}

pub(super) fn busy_pid(message: &str) -> Option<i32> {
    let rest = &message[message.find("PID ")? + 4..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
