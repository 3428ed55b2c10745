//! The WAL source: reads committed outbox events from PostgreSQL's write-ahead
//! log through a logical replication slot (pgoutput), in commit order.
//!
//! It captures both writer modes of outbox-core: inserts into `<schema>.outbox`
//! (table mode; the publication publishes that table, inserts only) and
//! transactional logical decoding messages with the configured prefix
//! (wal-message mode, [`outbox_core::wal_message`]). Events come grouped by
//! transaction, in commit order ([`WalSource::next_transaction`]); a transaction
//! that rolled back never appears.
//!
//! # Confirming, and what the slot keeps
//!
//! PostgreSQL keeps WAL from the slot's `confirmed_flush_lsn` on. The caller
//! calls [`WalSource::confirm`] with a transaction's `end_lsn` once the broker
//! confirmed every event of that transaction and of all before it; the source
//! reports exactly that position (never the latest received one), so a restart
//! resumes after the last confirmed transaction and re-sends the rest
//! (at-least-once). Confirming the *end* LSN matters: the commit LSN would
//! re-send the confirmed transaction after a restart.
//!
//! While the outbox is idle and other tables take writes, the server's
//! keepalives report how far it has read. When every transaction handed out is
//! confirmed and none is open, that position is confirmed too, so an idle outbox
//! does not pin WAL. It never passes an unconfirmed event.
//!
//! Status updates go to the server every `status_interval` and at once when it
//! asks for one (the replication client answers those even while the caller is
//! busy publishing, so `wal_sender_timeout` never fires on a slow broker).
//!
//! # Slot loss
//!
//! Before a position is reported to the server it is written to the row
//! `wal-confirmed:<slot>` of `<schema>.relay_lease` (the LSN in `fencing_token`),
//! so the slot's `confirmed_flush_lsn` never passes the recorded position. On
//! [`WalSource::start`]:
//! * no slot, though one was created (state `draining` or `streaming`, or a
//!   recorded position): the slot was dropped;
//! * slot with `wal_status = 'lost'` (or `conflicting`, or an
//!   `invalidation_reason` on newer servers): it was invalidated;
//! * slot ahead of the recorded position: someone advanced or re-created it.
//!   A slot with no recorded position (or 0/0) is not ahead of anything: it is
//!   adopted (see "State machine").
//!
//! Each is a loss of the events in between, reported as [`WalStart::SlotLost`]:
//! the source never creates a new slot at the current position by itself.
//! Recovery: call [`SlotLost::recreate_slot`] (it records `recovering` first, so
//! an interrupted recovery is finished by the next start), then publish the
//! rows of [`WalSource::drain`] (in sequence order) and settle them, recording
//! the progress with [`WalSource::record_drain`], then stream. Rows
//! committed before the new slot's start are in the table; later ones come
//! from the new slot too (duplicates, never gaps). Events written in
//! wal-message mode have no table row and cannot be recovered.
//!
//! A slot starts at the WAL position of its creation. When the source creates
//! one ([`WalSource::created_slot`], also on the very first start, e.g. after
//! switching from the polling source), rows already in the table are not in its
//! stream: publish them from the table first, as after a loss
//! ([`WalSource::drain`]).
//!
//! # State machine
//!
//! Everything a restart needs is in the database before it is relied on: the
//! slot's lifecycle and its drain in `<schema>.relay_wal_slot` (migration
//! 0003), the confirmed position in `relay_lease` row `wal-confirmed:<slot>`.
//! A crash (kill -9, abort, a terminated session) in any state resumes there;
//! it only ever re-sends events, at most the in-flight window plus what was
//! confirmed since the last position record (every 250 ms).
//!
//! | state | durable | a crash here, and what the next start does |
//! |---|---|---|
//! | *(no row)* | nothing (or a position recorded by a relay before 0003) | first start: `creating`. With a position and a healthy slot (an upgrade): drain the whole table once, since an older relay may have been interrupted mid-drain |
//! | `creating` | the intent to create the slot; no position | the slot may exist or not, finished by the server after the client died. Missing: create it. Present: adopt it (its `confirmed_flush_lsn` becomes the position); one that another session is still creating (no position yet) is waited for, up to `slot_busy_timeout`, never taken for lost |
//! | `draining` | the slot's start as the position, and the drain `after < sequence <= upto` (`upto`: the table's high-water mark right after the slot's creation, in the same statement as the position) | the drain resumes after the last settled page (`after`); the stream resumes from the recorded position. Rows settled before the crash are gone; rows delivered but not settled are sent again |
//! | `streaming` | the drain is settled; the position moves forward | resume from the recorded position |
//! | `recovering` | the slot was found lost (dropped, invalidated, or moved ahead of the recorded position) | drop what is left of the old slot, forget its position (back to `creating`), create a new one and drain the table |
//!
//! Transitions: `creating` → (slot created, position and drain recorded in one
//! statement) → `draining` → (every drain page settled, i.e. rows deleted) →
//! `streaming`; with an empty table straight to `streaming`. A lost slot:
//! any → `recovering` → `creating` → … . The loss check tells "never recorded"
//! (no position, or 0/0: adopt the slot) from "moved ahead of what we
//! recorded" (a loss): positions are recorded before they are reported, so a
//! slot of ours is never ahead of the record.
//!
//! Failpoints (feature `failpoints`, see `crate::failpoint`) mark each step:
//! `wal.leader.acquired`, `wal.slot.creating`, `wal.slot.created`,
//! `wal.drain.page`, `wal.drain.finished`, `wal.publish.confirmed`,
//! `wal.settle.deleted`, `wal.position.recorded`, `wal.recovery.dropped`.
//!
//! # Positions of wal-message events
//!
//! Table rows carry their outbox `sequence`. A wal-message event has none, so its
//! [`OutboxEvent::sequence`] is the position pgoutput reports for its message
//! record (the record's end LSN, as an `i64`, at most the transaction's commit
//! LSN): unique, increasing within a transaction, and per key increasing in commit order
//! whenever writers of one key are serialized (the same rule that makes outbox
//! sequences per-key monotonic, see `outbox_core::writer`). Delivery order is
//! commit order either way; [`WalTransaction::end_lsn`] is the commit-ordered
//! position of the whole transaction.
//!
//! # Memory
//!
//! PostgreSQL (pgoutput protocol 1) sends a transaction only after it
//! committed, all at once. The source holds one whole transaction while it
//! arrives, about `events × (payload + headers + 300 bytes)` (a 10,000-event
//! transaction of 1 KiB payloads takes about 13 MB), plus at most
//! [`WalSourceConfig::buffer_messages`] undecoded messages of one row each.
//!
//! # Leadership
//!
//! Only one session can stream from a slot. Electing the one relay instance
//! that runs the source is the caller's job (an advisory lock, or the
//! [`WalSourceConfig::leader_lease_name`] lease); a standby that calls
//! [`WalSource::start`] while the old leader's session is still open waits up
//! to [`WalSourceConfig::slot_busy_timeout`] for the slot.

mod pgoutput;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{EventId, SchemaName};
use pgwire_replication::{
    PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool};
use tokio::time::Instant;

use crate::event::OutboxEvent;
use crate::failpoint::failpoint;
use crate::resilience::DbCallFailure;

use pgoutput::{OutboxColumns, Relation};

/// Default prefix of wal-message events (the writer's default too).
pub const DEFAULT_MESSAGE_PREFIX: &str = outbox_core::wal_message::DEFAULT_PREFIX;
/// Default interval of standby status updates and of recording the confirmed position, in milliseconds.
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 10_000;
/// Default timeout of connecting and starting replication, in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Default time to wait for a slot that another session still streams from, in milliseconds.
pub const DEFAULT_SLOT_BUSY_TIMEOUT_MS: u64 = 60_000;
/// Default number of undecoded replication messages buffered ahead of decoding.
pub const DEFAULT_BUFFER_MESSAGES: usize = 1024;

/// Longest a slot creation may take: it waits for transactions running at that moment.
const SLOT_CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Smallest client-side deadline of an ordinary SQL call.
const MIN_DB_TIMEOUT: Duration = Duration::from_secs(30);
/// Session settings of the replication connection: values decode in a known text form.
const REPLICATION_SESSION_OPTIONS: &str =
    "-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3";
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

const WAL_LEVEL_SQL: &str = "select current_setting('wal_level')";
const ROLE_SQL: &str = "select current_user::text, rolsuper or rolreplication from pg_roles where rolname = current_user";
const TABLE_SQL: &str = "select to_regclass($1)::text";
const PUBLICATION_SQL: &str = "select pubinsert from pg_publication where pubname = $1";
// to_jsonb keeps this working on servers without the PG 15 columns attnames / rowfilter.
const PUBLICATION_TABLE_SQL: &str = "select to_jsonb(t) from pg_publication_tables t \
     where pubname = $1 and schemaname = $2 and tablename = 'outbox'";
// Columns of newer servers (conflicting: 16, invalidation_reason: 17) via to_jsonb.
const SLOT_SQL: &str = "select plugin::text, slot_type, database::text, database = current_database(), \
            confirmed_flush_lsn::text, wal_status, \
            coalesce((to_jsonb(s) ->> 'conflicting')::bool, false), to_jsonb(s) ->> 'invalidation_reason' \
     from pg_replication_slots s where slot_name = $1";
const CREATE_SLOT_SQL: &str =
    "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')";
const DROP_SLOT_SQL: &str = "select pg_drop_replication_slot($1)";
const SLOT_STATUS_SQL: &str = "select active_pid, confirmed_flush_lsn::text, restart_lsn::text, wal_status, \
            (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, (pg_current_wal_lsn() - restart_lsn)::int8 \
     from pg_replication_slots where slot_name = $1";

/// Result with [`WalError`] as the default error type.
pub type Result<T, E = WalError> = std::result::Result<T, E>;

/// A position in PostgreSQL's write-ahead log, shown as PostgreSQL does (`16/B374D848`).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position.
    pub const ZERO: Lsn = Lsn(0);

    /// The raw 64-bit value.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// As an `i64` (for `bigint` columns and `sequence`); real LSNs are far below `i64::MAX`.
    pub fn to_i64(self) -> Option<i64> {
        i64::try_from(self.0).ok()
    }

    fn to_pgwire(self) -> pgwire_replication::Lsn {
        pgwire_replication::Lsn(self.0)
    }

    fn from_pgwire(lsn: pgwire_replication::Lsn) -> Self {
        Lsn(lsn.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid LSN {s:?}: expected X/Y"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Settings of a [`WalSource`].
#[derive(Clone)]
pub struct WalSourceConfig {
    /// PostgreSQL URL; the role needs the `REPLICATION` attribute (or superuser).
    pub database_url: String,
    /// Schema of the outbox tables.
    pub schema: SchemaName,
    /// Name of the logical replication slot (`a-z`, `0-9`, `_`; unique in the cluster).
    pub slot: String,
    /// Name of the publication on `<schema>.outbox` (`a-z`, `0-9`, `_`).
    pub publication: String,
    /// Prefix of wal-message events (default [`DEFAULT_MESSAGE_PREFIX`]).
    pub message_prefix: String,
    /// Interval of standby status updates and of recording the confirmed position.
    pub status_interval: Duration,
    /// Timeout of connecting and of starting replication.
    pub connect_timeout: Duration,
    /// How long [`WalSource::start`] waits while another session streams from the slot.
    pub slot_busy_timeout: Duration,
    /// Undecoded replication messages buffered ahead of decoding (one row each).
    pub buffer_messages: usize,
}

impl WalSourceConfig {
    /// Settings with the defaults for everything but the connection, schema, slot and publication.
    pub fn new(
        database_url: impl Into<String>,
        schema: SchemaName,
        slot: impl Into<String>,
        publication: impl Into<String>,
    ) -> Self {
        WalSourceConfig {
            database_url: database_url.into(),
            schema,
            slot: slot.into(),
            publication: publication.into(),
            message_prefix: DEFAULT_MESSAGE_PREFIX.to_owned(),
            status_interval: Duration::from_millis(DEFAULT_STATUS_INTERVAL_MS),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            slot_busy_timeout: Duration::from_millis(DEFAULT_SLOT_BUSY_TIMEOUT_MS),
            buffer_messages: DEFAULT_BUFFER_MESSAGES,
        }
    }

    /// Check the settings without connecting.
    pub fn validate(&self) -> Result<()> {
        check_identifier("wal.slot", &self.slot)?;
        check_identifier("wal.publication", &self.publication)?;
        if self.message_prefix.is_empty() || self.message_prefix.contains('\0') {
            return Err(invalid(
                "wal.message_prefix",
                "must not be empty or contain NUL",
                format!("use the writers' prefix, by default {DEFAULT_MESSAGE_PREFIX:?}"),
            ));
        }
        for (field, value) in [
            ("wal.status_interval_ms", self.status_interval),
            ("wal.connect_timeout_ms", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be positive", "set it to at least 1"));
            }
        }
        if self.buffer_messages == 0 {
            return Err(invalid(
                "wal.buffer_messages",
                "must be positive",
                format!("leave the default {DEFAULT_BUFFER_MESSAGES}"),
            ));
        }
        self.connect_options()?;
        Ok(())
    }

    /// Name of the lease (in `relay_lease`) or advisory lock that elects the one
    /// relay instance streaming from this slot: `wal:<slot>`.
    pub fn leader_lease_name(&self) -> String {
        format!("wal:{}", self.slot)
    }

    /// Name of the `relay_lease` row recording the confirmed position: `wal-confirmed:<slot>`.
    pub fn position_row_name(&self) -> String {
        format!("wal-confirmed:{}", self.slot)
    }

    fn connect_options(&self) -> Result<PgConnectOptions> {
        // The error is not shown: it may quote the URL, password included.
        self.database_url.parse::<PgConnectOptions>().map_err(|_| {
            invalid(
                "database.url",
                "cannot be parsed",
                "use postgres://user:password@host:port/database",
            )
        })
    }

    fn db_timeout(&self) -> Duration {
        self.connect_timeout.max(MIN_DB_TIMEOUT)
    }
}

impl fmt::Debug for WalSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalSourceConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("schema", &self.schema)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("message_prefix", &self.message_prefix)
            .field("status_interval", &self.status_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("slot_busy_timeout", &self.slot_busy_timeout)
            .field("buffer_messages", &self.buffer_messages)
            .finish()
    }
}

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

    fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> WalError {
        move |source| WalError::Database { operation, source }
    }

    fn replication(operation: &'static str) -> impl FnOnce(PgWireError) -> WalError {
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

/// What [`WalSource::start`] found.
#[derive(Debug)]
#[must_use = "a lost slot must be recovered from, and a ready source read from"]
// Returned once per start and destructured at once: boxing would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum WalStart {
    /// The slot is healthy (or was just created); the source streams from the
    /// recorded confirmed position.
    Ready(WalSource),
    /// The slot existed before and is gone or invalidated: events may be missing
    /// from the WAL. Recover from the table, see [`SlotLost`].
    SlotLost(SlotLost),
}

/// A slot that existed before and is now gone, invalidated or moved: the source
/// did not create a new one. Recover with [`SlotLost::recreate_slot`], then
/// re-publish every row left in the outbox table, then stream.
#[derive(Debug)]
pub struct SlotLost {
    /// The last position recorded as confirmed: everything before it reached the broker.
    pub last_confirmed_lsn: Lsn,
    /// What happened to the slot.
    pub reason: SlotLossReason,
    config: WalSourceConfig,
    pool: PgPool,
}

/// What happened to a lost slot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotLossReason {
    /// The slot no longer exists (dropped by hand, or lost with a failover).
    Dropped,
    /// The slot exists but PostgreSQL invalidated it (`wal_status = 'lost'`:
    /// `max_slot_wal_keep_size` exceeded, or a recovery conflict).
    Invalidated {
        /// PostgreSQL's `wal_status` or `invalidation_reason`.
        detail: String,
    },
    /// The slot's confirmed position is ahead of anything this relay confirmed:
    /// it was advanced or re-created by someone else.
    MovedAhead {
        /// The slot's `confirmed_flush_lsn`.
        slot_confirmed_lsn: Lsn,
    },
}

impl fmt::Display for SlotLossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotLossReason::Dropped => f.write_str("the slot was dropped"),
            SlotLossReason::Invalidated { detail } => {
                write!(f, "the slot was invalidated ({detail})")
            }
            SlotLossReason::MovedAhead { slot_confirmed_lsn } => write!(
                f,
                "the slot was advanced or re-created by someone else (it is at {slot_confirmed_lsn})"
            ),
        }
    }
}

impl SlotLost {
    /// Drop what is left of the old slot, create a new one at the current WAL
    /// position, record that position and start streaming from it.
    ///
    /// Events committed before the new slot's start are not in its stream: after
    /// this returns, re-publish every row still in the outbox table (in sequence
    /// order) and settle them *before* publishing what
    /// [`WalSource::next_transaction`] returns, so each key stays in order.
    /// (Re-publishing before this call as well is fine, but not enough: rows
    /// committed in between would be missed.)
    pub async fn recreate_slot(self) -> Result<WalSource> {
        let SlotLost {
            config,
            pool,
            reason,
            last_confirmed_lsn,
        } = self;
        let sql = WalSql::new(&config);
        tracing::warn!(
            slot = %config.slot, %reason, %last_confirmed_lsn,
            "re-creating the lost replication slot at the current WAL position"
        );
        let (start, drain) = recover_slot(&pool, &config, &sql).await?;
        WalSource::open(config, pool, sql, start, drain, true).await
    }
}

/// The events of one committed transaction, in the order it wrote them.
#[derive(Debug, Clone, PartialEq)]
pub struct WalTransaction {
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: pass it to [`WalSource::confirm`].
    pub end_lsn: Lsn,
    /// Transaction id.
    pub xid: u32,
    /// When it committed (server time).
    pub commit_time: DateTime<Utc>,
    /// Its outbox events, table rows and wal-message events in write order.
    pub events: Vec<OutboxEvent>,
    /// Outbox sequences of the events that are table rows: delete those rows
    /// once the transaction is confirmed (wal-message events have no row).
    pub row_sequences: Vec<i64>,
    /// Changes with the outbox's marks that cannot become events, in write
    /// order: dead-letter each (it is never published), then confirm the
    /// transaction as usual, so the slot moves past them.
    pub undecodable: Vec<Undecodable>,
}

/// A change in the stream that looks like an outbox event and cannot be one.
/// Anyone who can write the outbox table or connect (any role may call
/// `pg_logical_emit_message`) can produce these: they must never stop the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Undecodable {
    /// An outbox row with a value no event can carry (an infinite `created_at`).
    /// Its row stays in the table until it is moved to the dead-letter table as it
    /// is (raw values kept); it is not in [`WalTransaction::row_sequences`].
    Row {
        /// The row's outbox sequence.
        sequence: i64,
        /// The row's event id.
        event_id: EventId,
        /// The row's partition key.
        partition_key: String,
        /// Why it cannot be published.
        reason: String,
    },
    /// A transactional logical decoding message with the outbox prefix whose
    /// content is not an event document (bad bytes, unknown version, invalid
    /// JSON, missing or empty fields).
    Message(MalformedMessage),
}

/// A logical decoding message with the outbox prefix that is not an event; see
/// [`Undecodable::Message`]. Its content is kept for the dead-letter table only:
/// never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct MalformedMessage {
    /// The message record's position (its end LSN, as for wal-message events).
    pub lsn: Lsn,
    /// The message's prefix.
    pub prefix: String,
    /// The raw content, as emitted.
    pub content: Vec<u8>,
    /// Why it is not an event.
    pub reason: String,
}

impl fmt::Debug for MalformedMessage {
    // The content is whatever anyone emitted: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MalformedMessage")
            .field("lsn", &self.lsn)
            .field("prefix", &self.prefix)
            .field("content_bytes", &self.content.len())
            .finish_non_exhaustive()
    }
}

/// Positions the source tracks, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPositions {
    /// Highest transaction end the caller confirmed.
    pub confirmed: Lsn,
    /// Highest position recorded and handed to the replication connection for reporting.
    pub reported: Lsn,
    /// End of the last transaction with events handed out.
    pub received: Lsn,
    /// Latest WAL position the server reported in a keepalive.
    pub server_wal_end: Lsn,
}

/// Rows of the outbox table that a slot's stream cannot carry: those with
/// `after < sequence <= upto` still in the table committed before the slot started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainRange {
    /// Every drained row up to this sequence is settled.
    pub after: i64,
    /// The outbox's high-water mark when the slot started.
    pub upto: i64,
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// The walsender streaming from it, if any.
    pub active_pid: Option<i32>,
    /// Position confirmed to the server.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot still needs.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL written after the confirmed position.
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL the slot keeps on disk (from `restart_lsn`).
    pub retained_bytes: Option<i64>,
}

/// Reads a slot's lag and state over ordinary SQL; cheap to clone, usable from
/// a metrics task while the source streams.
#[derive(Debug, Clone)]
pub struct SlotMonitor {
    pool: PgPool,
    slot: String,
    timeout: Duration,
}

impl SlotMonitor {
    /// The slot's state, or `None` when it does not exist.
    pub async fn status(&self) -> Result<Option<SlotStatus>> {
        type Row = (
            Option<i32>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
        );
        let row: Option<Row> = db_call(
            "reading the replication slot's status",
            self.timeout,
            sqlx::query_as(SLOT_STATUS_SQL)
                .bind(&self.slot)
                .fetch_optional(&self.pool),
        )
        .await?;
        Ok(row.map(
            |(active_pid, confirmed, restart, wal_status, lag_bytes, retained_bytes)| SlotStatus {
                active_pid,
                confirmed_flush_lsn: confirmed.and_then(|s| s.parse().ok()),
                restart_lsn: restart.and_then(|s| s.parse().ok()),
                wal_status,
                lag_bytes,
                retained_bytes,
            },
        ))
    }

    /// Bytes of WAL written after the slot's confirmed position
    /// (`pg_current_wal_lsn() - confirmed_flush_lsn`), or `None` without a slot.
    pub async fn lag_bytes(&self) -> Result<Option<i64>> {
        Ok(self.status().await?.and_then(|s| s.lag_bytes))
    }
}

/// Streams committed outbox events from a logical replication slot; see the module docs.
pub struct WalSource {
    config: WalSourceConfig,
    pool: PgPool,
    sql: WalSql,
    client: ReplicationClient,
    relations: HashMap<u32, RelationKind>,
    open: Option<OpenTransaction>,
    broken: bool,
    /// Highest transaction end the caller confirmed.
    confirmed: Lsn,
    /// End of the last transaction with events handed out.
    last_event_end: Lsn,
    /// Highest position (keepalive, or end of a transaction without events) that
    /// may be confirmed once everything handed out is confirmed.
    idle: Lsn,
    /// Recorded in the position row and handed to the client for reporting.
    reported: Lsn,
    server_wal_end: Lsn,
    last_flush: Instant,
    created_slot: bool,
    /// Rows of the table to publish before the stream (durable in `relay_wal_slot`).
    drain: Option<DrainRange>,
    /// A transaction decoded but not yet returned (its call was cancelled).
    ready: Option<WalTransaction>,
}

impl fmt::Debug for WalSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalSource")
            .field("slot", &self.config.slot)
            .field("positions", &self.positions())
            .field("broken", &self.broken)
            .field("created_slot", &self.created_slot)
            .field("drain", &self.drain)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum RelationKind {
    Outbox(std::result::Result<OutboxColumns, String>),
    Other,
}

#[derive(Debug)]
struct OpenTransaction {
    xid: u32,
    events: Vec<OutboxEvent>,
    row_sequences: Vec<i64>,
    undecodable: Vec<Undecodable>,
}

#[derive(Debug)]
struct WalSql {
    read_position: String,
    advance_position: String,
    outbox: String,
    create_publication: String,
    read_state: String,
    set_creating: String,
    set_recovering: String,
    forget_position: String,
    record_start: String,
    start_drain: String,
    drain_progress: String,
}

impl WalSql {
    fn new(config: &WalSourceConfig) -> Self {
        let leases = config.schema.qualify("relay_lease");
        let outbox = config.schema.qualify("outbox");
        let slots = config.schema.qualify("relay_wal_slot");
        WalSql {
            read_position: format!("select fencing_token from {leases} where name = $1"),
            // Positions only move forward, whichever instance writes.
            advance_position: format!(
                "insert into {leases} as l (name, fencing_token, expires_at) values ($1, $2, 'infinity') \
                 on conflict (name) do update set fencing_token = greatest(l.fencing_token, excluded.fencing_token)"
            ),
            read_state: format!(
                "select state, drain_after, drain_upto from {slots} where slot = $1"
            ),
            // $1 slot, $2 position row.
            set_creating: format!(
                "insert into {slots} (slot, state) values ($1, 'creating') \
                 on conflict (slot) do update set state = 'creating', drain_after = 0, drain_upto = 0, \
                   changed_at = now()"
            ),
            set_recovering: format!(
                "insert into {slots} (slot, state) values ($1, 'recovering') \
                 on conflict (slot) do update set state = 'recovering', changed_at = now()"
            ),
            forget_position: format!(
                "with forgotten as (delete from {leases} where name = $2) \
                 insert into {slots} (slot, state) values ($1, 'creating') \
                 on conflict (slot) do update set state = 'creating', drain_after = 0, drain_upto = 0, \
                   changed_at = now()"
            ),
            // The position and the drain in one statement: both are durable, or neither.
            record_start: format!(
                "with recorded as ( \
                   insert into {leases} as l (name, fencing_token, expires_at) values ($2, $3, 'infinity') \
                   on conflict (name) do update set fencing_token = excluded.fencing_token) \
                 insert into {slots} (slot, state, drain_after, drain_upto) \
                 select $1, case when coalesce(max(sequence), 0) > 0 then 'draining' else 'streaming' end, \
                        0, coalesce(max(sequence), 0) from {outbox} \
                 on conflict (slot) do update set state = excluded.state, drain_after = 0, \
                   drain_upto = excluded.drain_upto, changed_at = now() \
                 returning drain_upto"
            ),
            start_drain: format!(
                "insert into {slots} (slot, state, drain_after, drain_upto) \
                 select $1, case when coalesce(max(sequence), 0) > 0 then 'draining' else 'streaming' end, \
                        0, coalesce(max(sequence), 0) from {outbox} \
                 on conflict (slot) do update set state = excluded.state, drain_after = 0, \
                   drain_upto = excluded.drain_upto, changed_at = now() \
                 returning drain_upto"
            ),
            drain_progress: format!(
                "update {slots} set drain_after = greatest(drain_after, $2), \
                   state = case when $3 then 'streaming' else state end, changed_at = now() \
                 where slot = $1"
            ),
            create_publication: format!(
                "create publication \"{}\" for table {outbox} with (publish = 'insert')",
                config.publication
            ),
            outbox,
        }
    }
}

/// A slot as the startup checks need it.
struct SlotRow {
    plugin: Option<String>,
    slot_type: String,
    database: Option<String>,
    in_this_database: bool,
    confirmed: Option<Lsn>,
    invalidation: Option<String>,
}

enum SlotState {
    /// `adopted`: the slot had no recorded position (made by an operator, or the
    /// relay crashed right after creating it); its start is recorded now.
    Healthy {
        resume_from: Lsn,
        drain: Option<DrainRange>,
        adopted: bool,
    },
    Missing,
    Lost {
        reason: SlotLossReason,
        last: Lsn,
    },
    /// A recovery from a lost slot was interrupted: finish it.
    Recovering,
}

impl WalSource {
    /// Check the server and the publication, create what is missing (publication
    /// first, then a permanent pgoutput slot), and start streaming from the
    /// recorded confirmed position; or report that the slot was lost.
    ///
    /// Errors name the fix: `wal_level` not `logical`, a role without
    /// `REPLICATION`, a publication that does not publish inserts of
    /// `<schema>.outbox` (or filters its rows or columns), a slot of another
    /// plugin or database. A slot another session streams from is waited for up
    /// to `slot_busy_timeout`.
    pub async fn start(config: WalSourceConfig) -> Result<WalStart> {
        config.validate()?;
        let pool = connect_pool(&config).await?;
        let sql = WalSql::new(&config);
        check_server(&pool, &config, &sql).await?;
        ensure_publication(&pool, &config, &sql).await?;
        match inspect_slot(&pool, &config, &sql).await? {
            SlotState::Healthy {
                resume_from,
                drain,
                adopted,
            } => Ok(WalStart::Ready(
                WalSource::open(config, pool, sql, resume_from, drain, adopted).await?,
            )),
            SlotState::Missing => {
                let (start, drain) = create_slot(&pool, &config, &sql).await?;
                Ok(WalStart::Ready(
                    WalSource::open(config, pool, sql, start, drain, true).await?,
                ))
            }
            SlotState::Recovering => {
                tracing::warn!(slot = %config.slot, "finishing an interrupted recovery of the lost replication slot");
                let (start, drain) = recover_slot(&pool, &config, &sql).await?;
                Ok(WalStart::Ready(
                    WalSource::open(config, pool, sql, start, drain, true).await?,
                ))
            }
            SlotState::Lost { reason, last } => {
                tracing::error!(
                    slot = %config.slot, %reason, last_confirmed_lsn = %last,
                    "replication slot lost: events after the last confirmed position may be missing from the WAL; \
                     recover from the outbox table"
                );
                Ok(WalStart::SlotLost(SlotLost {
                    last_confirmed_lsn: last,
                    reason,
                    config,
                    pool,
                }))
            }
        }
    }

    async fn open(
        config: WalSourceConfig,
        pool: PgPool,
        sql: WalSql,
        resume_from: Lsn,
        drain: Option<DrainRange>,
        created_slot: bool,
    ) -> Result<Self> {
        let client = start_streaming(&config, resume_from).await?;
        tracing::info!(slot = %config.slot, %resume_from, "streaming from the replication slot");
        Ok(WalSource {
            config,
            pool,
            sql,
            client,
            relations: HashMap::new(),
            open: None,
            broken: false,
            confirmed: resume_from,
            last_event_end: resume_from,
            idle: resume_from,
            reported: resume_from,
            server_wal_end: resume_from,
            last_flush: Instant::now(),
            created_slot,
            drain,
            ready: None,
        })
    }

    /// The next committed transaction with outbox events, in commit order;
    /// `None` when the stream ended cleanly.
    ///
    /// Transactions without outbox events (other tables, rolled back work) are
    /// skipped. While waiting, the confirmed position is recorded and reported
    /// every `status_interval`, so keep calling this (or [`WalSource::flush`])
    /// while the outbox is idle.
    ///
    /// Cancel safe: dropping the future loses nothing; a transaction that was
    /// partly received stays buffered. After an error, call [`WalSource::reconnect`].
    pub async fn next_transaction(&mut self) -> Result<Option<WalTransaction>> {
        if self.broken {
            return Err(WalError::NeedsReconnect);
        }
        // A transaction completed by a call that was cancelled while flushing.
        if let Some(transaction) = self.ready.take() {
            return Ok(Some(transaction));
        }
        loop {
            let flush_at = self.last_flush + self.config.status_interval;
            let received = tokio::select! {
                biased;
                received = self.client.recv() => received,
                () = tokio::time::sleep_until(flush_at), if self.flush_pending() => {
                    self.flush_quietly().await;
                    continue;
                }
            };
            let event = match received {
                Ok(Some(event)) => event,
                Ok(None) => {
                    self.broken = true;
                    return Ok(None);
                }
                Err(error) => {
                    self.broken = true;
                    return Err(WalError::replication("streaming")(error));
                }
            };
            let transaction = match self.handle(event) {
                Ok(transaction) => transaction,
                Err(error) => {
                    self.broken = true;
                    return Err(error);
                }
            };
            // Under steady traffic the timer branch above never wins. The
            // transaction is kept in `ready` across the flush's await: if this
            // call is cancelled there, the next one returns it (cancel safety).
            if self.flush_pending() && Instant::now() >= flush_at {
                self.ready = transaction;
                self.flush_quietly().await;
                if let Some(transaction) = self.ready.take() {
                    return Ok(Some(transaction));
                }
            } else if let Some(transaction) = transaction {
                return Ok(Some(transaction));
            }
        }
    }

    /// Every event of the transactions up to and including the one ending at
    /// `end_lsn` ([`WalTransaction::end_lsn`]) was confirmed by the broker.
    ///
    /// Cheap, no I/O: the position is recorded and reported within
    /// `status_interval` while [`WalSource::next_transaction`] or
    /// [`WalSource::flush`] runs. A position beyond the last transaction handed
    /// out is capped to it.
    pub fn confirm(&mut self, end_lsn: Lsn) {
        let lsn = if end_lsn > self.last_event_end {
            tracing::warn!(
                slot = %self.config.slot, %end_lsn, received = %self.last_event_end,
                "confirm beyond the last transaction handed out; capped"
            );
            self.last_event_end
        } else {
            end_lsn
        };
        self.confirmed = self.confirmed.max(lsn);
    }

    /// Record the confirmed position now and hand it to the replication
    /// connection, which reports it within `status_interval`. Returns the position.
    pub async fn flush(&mut self) -> Result<Lsn> {
        let target = self.flush_target();
        if target > self.reported {
            self.record_position(target).await?;
            failpoint!("wal.position.recorded");
            self.client.update_applied_lsn(target.to_pgwire());
            self.reported = target;
        }
        self.last_flush = Instant::now();
        Ok(self.reported)
    }

    /// Flush, close the stream, and make sure the slot knows the position.
    /// Returns the position.
    ///
    /// The replication client reports a position at most every
    /// `status_interval` and not when it closes; rather than wait for its next
    /// report, the stream is closed at once and the slot moved to the recorded
    /// position with `pg_replication_slot_advance` (a restart resumes from the
    /// recorded position either way; the slot's position only decides how much
    /// WAL the server keeps meanwhile).
    pub async fn shutdown(mut self) -> Result<Lsn> {
        // Close the stream even when the position cannot be recorded (database
        // going down): an open walsender would hold up the server's shutdown.
        let flushed = self.flush().await;
        match tokio::time::timeout(self.config.connect_timeout, self.client.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "replication stream ended with an error"),
            Err(_) => {
                tracing::debug!("replication stream did not close in time");
                self.client.abort();
            }
        }
        let flushed = flushed?;
        if self.client.metrics().last_applied_lsn() < flushed.to_pgwire() {
            self.advance_slot(flushed).await;
        }
        Ok(flushed)
    }

    /// Move the (now idle) slot's confirmed position to `to`, waiting briefly for
    /// the walsender of the closed stream to go. Best effort: a failure only
    /// means the server keeps some WAL until the next start confirms it.
    async fn advance_slot(&self, to: Lsn) {
        let deadline = Instant::now() + self.config.connect_timeout;
        loop {
            let state: Result<Option<(bool, bool)>> = db_call(
                "reading the slot before advancing it",
                self.config.db_timeout(),
                sqlx::query_as(
                    "select active, coalesce(confirmed_flush_lsn < $2::pg_lsn, false) \
                     from pg_replication_slots where slot_name = $1",
                )
                .bind(&self.config.slot)
                .bind(to.to_string())
                .fetch_optional(&self.pool),
            )
            .await;
            match state {
                Ok(Some((false, true))) => {
                    let advanced: Result<Option<String>> = db_call(
                        "advancing the slot",
                        self.config.db_timeout(),
                        sqlx::query_scalar(
                            "select end_lsn::text from pg_replication_slot_advance($1, $2::pg_lsn)",
                        )
                        .bind(&self.config.slot)
                        .bind(to.to_string())
                        .fetch_optional(&self.pool),
                    )
                    .await;
                    match advanced {
                        Ok(_) => {
                            tracing::debug!(slot = %self.config.slot, position = %to, "slot advanced to the confirmed position")
                        }
                        Err(error) => {
                            tracing::debug!(%error, "could not advance the slot; the next start confirms the position")
                        }
                    }
                    return;
                }
                Ok(Some((true, true))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(_) => return,
                Err(error) => {
                    tracing::debug!(%error, "could not read the slot; the next start confirms the position");
                    return;
                }
            }
        }
    }

    /// Restart the stream after an error: record the confirmed position (if the
    /// database answers), check the slot again and stream from the recorded
    /// position. Transactions handed out but not confirmed are sent again.
    pub async fn reconnect(&mut self) -> Result<()> {
        // After a decode error the old session still holds the slot: end it first.
        self.broken = true;
        if self.client.is_running()
            && tokio::time::timeout(self.config.connect_timeout, self.client.shutdown())
                .await
                .is_err()
        {
            self.client.abort();
        }
        if let Err(error) = self.record_position(self.flush_target()).await {
            tracing::warn!(%error, "could not record the confirmed position before reconnecting");
        }
        let resume_from = match inspect_slot(&self.pool, &self.config, &self.sql).await? {
            SlotState::Healthy { resume_from, .. } => resume_from,
            SlotState::Missing | SlotState::Recovering => {
                return Err(WalError::SlotLost {
                    slot: self.config.slot.clone(),
                    last_confirmed_lsn: self.reported,
                });
            }
            SlotState::Lost { last, .. } => {
                return Err(WalError::SlotLost {
                    slot: self.config.slot.clone(),
                    last_confirmed_lsn: last,
                });
            }
        };
        self.client = start_streaming(&self.config, resume_from).await?;
        self.relations.clear();
        self.open = None;
        self.ready = None;
        self.broken = false;
        self.reported = self.reported.max(resume_from);
        self.confirmed = self.confirmed.max(resume_from);
        self.last_event_end = self.last_event_end.max(resume_from);
        self.last_flush = Instant::now();
        tracing::info!(slot = %self.config.slot, %resume_from, "replication stream reconnected");
        Ok(())
    }

    /// Bytes of WAL written after the slot's confirmed position, or `None` without a slot.
    pub async fn slot_lag_bytes(&self) -> Result<Option<i64>> {
        self.monitor().lag_bytes().await
    }

    /// A handle that reads the slot's lag and state from another task.
    pub fn monitor(&self) -> SlotMonitor {
        SlotMonitor {
            pool: self.pool.clone(),
            slot: self.config.slot.clone(),
            timeout: self.config.db_timeout(),
        }
    }

    /// The positions the source tracks.
    pub fn positions(&self) -> WalPositions {
        WalPositions {
            confirmed: self.confirmed,
            reported: self.reported,
            received: self.last_event_end,
            server_wal_end: self.server_wal_end,
        }
    }

    /// True when this source created its slot (first start, or
    /// [`SlotLost::recreate_slot`]) or adopted one without a recorded position: rows already in the outbox table committed
    /// before the slot's start and are not in the stream. Publish and settle them
    /// from the table before what [`WalSource::next_transaction`] returns.
    pub fn created_slot(&self) -> bool {
        self.created_slot
    }

    /// The rows of the outbox table to publish (and settle) before what
    /// [`WalSource::next_transaction`] returns: those with
    /// `after < sequence <= upto` still in the table. Set after the slot was
    /// created, adopted or re-created, and on every start until
    /// [`WalSource::record_drain`] recorded the drain as finished.
    pub fn drain(&self) -> Option<DrainRange> {
        self.drain
    }

    /// Record the drain's progress: every drained row up to sequence `after`
    /// is settled (deleted). With `finished`, the whole drain is settled and
    /// the slot's state becomes `streaming`; a restart then drains no more.
    pub async fn record_drain(&mut self, after: i64, finished: bool) -> Result<()> {
        db_call(
            "recording the drain's progress",
            self.config.db_timeout(),
            sqlx::query(AssertSqlSafe(self.sql.drain_progress.as_str()))
                .bind(&self.config.slot)
                .bind(after)
                .bind(finished)
                .execute(&self.pool),
        )
        .await?;
        if finished {
            self.drain = None;
            tracing::info!(slot = %self.config.slot, "table drain settled; the slot streams everything from now on");
        } else if let Some(drain) = &mut self.drain {
            drain.after = drain.after.max(after);
        }
        Ok(())
    }

    /// The settings the source runs with.
    pub fn config(&self) -> &WalSourceConfig {
        &self.config
    }

    /// The position that may be reported: what the caller confirmed, or an idle
    /// position past it once everything handed out is confirmed.
    fn flush_target(&self) -> Lsn {
        let target = if self.confirmed >= self.last_event_end {
            self.confirmed.max(self.idle)
        } else {
            self.confirmed
        };
        target.max(self.reported)
    }

    fn flush_pending(&self) -> bool {
        self.flush_target() > self.reported
    }

    /// Flushing again later is safe: a failed recording only delays reporting.
    async fn flush_quietly(&mut self) {
        if let Err(error) = self.flush().await {
            self.last_flush = Instant::now();
            tracing::warn!(slot = %self.config.slot, %error, "could not record the confirmed position; retrying");
        }
    }

    async fn record_position(&self, lsn: Lsn) -> Result<()> {
        write_position(&self.pool, &self.config, &self.sql.advance_position, lsn).await
    }

    fn handle(&mut self, event: ReplicationEvent) -> Result<Option<WalTransaction>> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, .. } => {
                if self.open.is_some() {
                    return Err(WalError::Decode {
                        lsn: Lsn::from_pgwire(final_lsn),
                        problem: "Begin inside an open transaction".to_owned(),
                    });
                }
                self.open = Some(OpenTransaction {
                    xid,
                    events: Vec::new(),
                    row_sequences: Vec::new(),
                    undecodable: Vec::new(),
                });
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => self.handle_data(Lsn::from_pgwire(wal_start), &data)?,
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix != self.config.message_prefix {
                    return Ok(None);
                }
                let lsn = Lsn::from_pgwire(lsn);
                if !transactional {
                    tracing::warn!(
                        %lsn, %prefix,
                        "ignoring a non-transactional WAL message: it is delivered even when its transaction \
                         rolls back; writers must use pg_logical_emit_message(true, …) (outbox_core::wal_message::emit)"
                    );
                    return Ok(None);
                }
                let decode_error = |problem: String| WalError::Decode { lsn, problem };
                let sequence = lsn
                    .to_i64()
                    .ok_or_else(|| decode_error("LSN beyond i64".to_owned()))?;
                let open = self
                    .open
                    .as_mut()
                    .ok_or_else(|| decode_error("WAL message outside a transaction".to_owned()))?;
                let decoded = match outbox_core::wal_message::decode(&content) {
                    Ok(decoded) => decoded,
                    Err(error) => {
                        // The reason can quote the content: it goes to the dead-letter table only.
                        tracing::warn!(
                            %lsn, %prefix, content_bytes = content.len(),
                            "a WAL message with the outbox prefix is not an event; dead-lettering it"
                        );
                        open.undecodable.push(Undecodable::Message(MalformedMessage {
                            reason: format!(
                                "the WAL message at LSN {lsn} with prefix {prefix:?} ({} bytes) cannot be \
                                 published: {error}; its raw content is in payload.wal_message \
                                 (content_base64, and content_text when it is UTF-8)",
                                content.len()
                            ),
                            lsn,
                            prefix,
                            content: content.to_vec(),
                        }));
                        return Ok(None);
                    }
                };
                open.events.push(OutboxEvent {
                    sequence,
                    event_id: decoded.event_id,
                    aggregate_type: decoded.aggregate_type,
                    aggregate_id: decoded.aggregate_id,
                    event_type: decoded.event_type,
                    partition_key: decoded.partition_key,
                    destination: decoded.destination,
                    payload: decoded.payload,
                    headers: decoded.headers,
                    created_at: decoded.created_at,
                    attempts: 0,
                });
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                let commit_lsn = Lsn::from_pgwire(lsn);
                let end_lsn = Lsn::from_pgwire(end_lsn);
                let open = self.open.take().ok_or_else(|| WalError::Decode {
                    lsn: commit_lsn,
                    problem: "Commit without Begin".to_owned(),
                })?;
                if open.events.is_empty() && open.undecodable.is_empty() {
                    self.idle = self.idle.max(end_lsn);
                    return Ok(None);
                }
                self.last_event_end = self.last_event_end.max(end_lsn);
                return Ok(Some(WalTransaction {
                    commit_lsn,
                    end_lsn,
                    xid: open.xid,
                    commit_time: pg_time(commit_time_micros),
                    events: open.events,
                    row_sequences: open.row_sequences,
                    undecodable: open.undecodable,
                }));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = Lsn::from_pgwire(wal_end);
                self.server_wal_end = self.server_wal_end.max(wal_end);
                // Everything up to the keepalive was sent before it; with no transaction
                // open, nothing unsent commits before this position.
                if self.open.is_none() {
                    self.idle = self.idle.max(wal_end);
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(None)
    }

    fn handle_data(&mut self, lsn: Lsn, data: &[u8]) -> Result<()> {
        let decode_error = |problem: String| WalError::Decode { lsn, problem };
        match data.first() {
            Some(&pgoutput::RELATION) => {
                let relation = pgoutput::parse_relation(data).map_err(decode_error)?;
                let kind = if relation.namespace == self.config.schema.as_str()
                    && relation.name == "outbox"
                {
                    RelationKind::Outbox(OutboxColumns::new(&relation))
                } else {
                    RelationKind::Other
                };
                let Relation { oid, .. } = relation;
                self.relations.insert(oid, kind);
            }
            Some(&pgoutput::INSERT) => {
                let (oid, values) = pgoutput::parse_insert(data).map_err(decode_error)?;
                let columns = match self.relations.get(&oid) {
                    Some(RelationKind::Outbox(Ok(columns))) => columns,
                    Some(RelationKind::Outbox(Err(problem))) => {
                        return Err(decode_error(problem.clone()));
                    }
                    Some(RelationKind::Other) => return Ok(()),
                    None => {
                        return Err(decode_error(format!(
                            "Insert into relation {oid} before its Relation message"
                        )));
                    }
                };
                let (event, undecodable) = columns.event(&values).map_err(decode_error)?;
                let open = self
                    .open
                    .as_mut()
                    .ok_or_else(|| decode_error("Insert outside a transaction".to_owned()))?;
                match undecodable {
                    None => {
                        open.row_sequences.push(event.sequence);
                        open.events.push(event);
                    }
                    Some(reason) => open.undecodable.push(Undecodable::Row {
                        sequence: event.sequence,
                        event_id: event.event_id,
                        partition_key: event.partition_key,
                        reason,
                    }),
                }
            }
            // Type, Origin, and Update/Delete/Truncate of a publication that publishes
            // more than inserts: nothing the outbox needs.
            _ => {}
        }
        Ok(())
    }
}

async fn connect_pool(config: &WalSourceConfig) -> Result<PgPool> {
    let options = config
        .connect_options()?
        .application_name("outbox-relay-wal")
        .disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(config.connect_timeout)
        .connect_with(options)
        .await
        .map_err(WalError::database(
            "connecting to PostgreSQL (check the database URL and that the server is up)",
        ))
}

async fn check_server(pool: &PgPool, config: &WalSourceConfig, sql: &WalSql) -> Result<()> {
    let timeout = config.db_timeout();
    let wal_level: String = db_call(
        "reading wal_level",
        timeout,
        sqlx::query_scalar(WAL_LEVEL_SQL).fetch_one(pool),
    )
    .await?;
    check_wal_level(&wal_level)?;
    let (role, may_replicate): (String, bool) = db_call(
        "reading the role's attributes",
        timeout,
        sqlx::query_as(ROLE_SQL).fetch_one(pool),
    )
    .await?;
    if !may_replicate {
        return Err(WalError::ReplicationNotPermitted { role });
    }
    let table: Option<String> = db_call(
        "looking up the outbox table",
        timeout,
        sqlx::query_scalar(TABLE_SQL)
            .bind(&sql.outbox)
            .fetch_one(pool),
    )
    .await?;
    if table.is_none() {
        return Err(outbox_core::Error::SchemaMissing {
            schema: config.schema.to_string(),
        }
        .into());
    }
    Ok(())
}

fn check_wal_level(wal_level: &str) -> Result<()> {
    if wal_level == "logical" {
        Ok(())
    } else {
        Err(WalError::WalLevel {
            actual: wal_level.to_owned(),
        })
    }
}

/// Create the publication if it is missing; otherwise check that it publishes
/// every insert into the outbox table with every column.
async fn ensure_publication(pool: &PgPool, config: &WalSourceConfig, sql: &WalSql) -> Result<()> {
    let timeout = config.db_timeout();
    let publication = &config.publication;
    let outbox = format!("{}.outbox", config.schema);
    let problem = |problem: String, fix: String| WalError::Publication {
        publication: publication.clone(),
        problem,
        fix,
    };
    let mut publishes_insert: Option<bool> = db_call(
        "looking up the publication",
        timeout,
        sqlx::query_scalar(PUBLICATION_SQL)
            .bind(publication)
            .fetch_optional(pool),
    )
    .await?;
    if publishes_insert.is_none() {
        let created = tokio::time::timeout(
            timeout,
            sqlx::query(AssertSqlSafe(sql.create_publication.as_str())).execute(pool),
        )
        .await;
        match created {
            Ok(Ok(_)) => {
                tracing::info!(%publication, table = %outbox, "created the publication");
                publishes_insert = Some(true);
            }
            // Another instance created it at the same moment: check what it is.
            Ok(Err(error)) if sqlstate(&error).as_deref() == Some("42710") => {
                publishes_insert = db_call(
                    "looking up the publication",
                    timeout,
                    sqlx::query_scalar(PUBLICATION_SQL)
                        .bind(publication)
                        .fetch_optional(pool),
                )
                .await?;
            }
            Ok(Err(error)) => {
                return Err(problem(
                    format!("does not exist and cannot be created: {error}"),
                    format!(
                        "create it as the owner of the outbox table: \
                         CREATE PUBLICATION \"{publication}\" FOR TABLE {outbox} WITH (publish = 'insert')"
                    ),
                ));
            }
            Err(_) => {
                return Err(WalError::DatabaseTimeout {
                    operation: "creating the publication",
                    timeout_ms: millis(timeout),
                });
            }
        }
    }
    if publishes_insert != Some(true) {
        return Err(problem(
            "does not publish inserts".to_owned(),
            format!("run ALTER PUBLICATION \"{publication}\" SET (publish = 'insert')"),
        ));
    }
    let table: Option<serde_json::Value> = db_call(
        "checking the publication's tables",
        timeout,
        sqlx::query_scalar(PUBLICATION_TABLE_SQL)
            .bind(publication)
            .bind(config.schema.as_str())
            .fetch_optional(pool),
    )
    .await?;
    let Some(table) = table else {
        return Err(problem(
            format!("exists but does not include the outbox table {outbox}"),
            format!(
                "run ALTER PUBLICATION \"{publication}\" ADD TABLE {outbox}, or configure a publication \
                 that includes it (a new name is created automatically)"
            ),
        ));
    };
    if let Some(filter) = table.get("rowfilter").and_then(|f| f.as_str()) {
        return Err(problem(
            format!(
                "filters the rows of {outbox} (WHERE {filter}): filtered events would never be published"
            ),
            format!("run ALTER PUBLICATION \"{publication}\" SET TABLE {outbox}"),
        ));
    }
    if let Some(columns) = table.get("attnames").and_then(|c| c.as_array()) {
        let published: Vec<&str> = columns.iter().filter_map(|c| c.as_str()).collect();
        let required = [
            "sequence",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "partition_key",
            "payload",
            "created_at",
            "destination",
            "headers",
        ];
        if let Some(missing) = required.iter().find(|c| !published.contains(c)) {
            return Err(problem(
                format!("publishes a column list of {outbox} without {missing:?}"),
                format!("run ALTER PUBLICATION \"{publication}\" SET TABLE {outbox}"),
            ));
        }
    }
    Ok(())
}

async fn slot_row(pool: &PgPool, config: &WalSourceConfig) -> Result<Option<SlotRow>> {
    type Row = (
        Option<String>,
        String,
        Option<String>,
        Option<bool>,
        Option<String>,
        Option<String>,
        bool,
        Option<String>,
    );
    let row: Option<Row> = db_call(
        "looking up the replication slot",
        config.db_timeout(),
        sqlx::query_as(SLOT_SQL)
            .bind(&config.slot)
            .fetch_optional(pool),
    )
    .await?;
    Ok(row.map(
        |(plugin, slot_type, database, ours, confirmed, wal_status, conflicting, reason)| {
            let invalidation = reason
                .or_else(|| conflicting.then(|| "conflicting with recovery".to_owned()))
                .or_else(|| {
                    (wal_status.as_deref() == Some("lost"))
                        .then(|| "wal_status = 'lost'".to_owned())
                });
            SlotRow {
                plugin,
                slot_type,
                database,
                in_this_database: ours == Some(true),
                confirmed: confirmed.and_then(|s| s.parse().ok()),
                invalidation,
            }
        },
    ))
}

/// The slot's lifecycle row in `<schema>.relay_wal_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Creating,
    Draining(DrainRange),
    Streaming,
    Recovering,
}

async fn read_lifecycle(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<Option<Lifecycle>> {
    let row: Option<(String, i64, i64)> = db_call(
        "reading the slot's recorded state",
        config.db_timeout(),
        sqlx::query_as(AssertSqlSafe(sql.read_state.as_str()))
            .bind(&config.slot)
            .fetch_optional(pool),
    )
    .await?;
    Ok(row.and_then(|(state, after, upto)| match state.as_str() {
        "creating" => Some(Lifecycle::Creating),
        "draining" => Some(Lifecycle::Draining(DrainRange { after, upto })),
        "streaming" => Some(Lifecycle::Streaming),
        "recovering" => Some(Lifecycle::Recovering),
        _ => None,
    }))
}

/// Run a lifecycle statement on (slot) or, `with_position_row`, (slot, position row).
async fn write_lifecycle(
    pool: &PgPool,
    config: &WalSourceConfig,
    operation: &'static str,
    query: &str,
    with_position_row: bool,
) -> Result<()> {
    let mut statement = sqlx::query(AssertSqlSafe(query)).bind(&config.slot);
    if with_position_row {
        statement = statement.bind(config.position_row_name());
    }
    db_call(operation, config.db_timeout(), statement.execute(pool)).await?;
    Ok(())
}

/// Record `position` as the confirmed one and start the drain of every row the
/// table holds now (one statement, so both or neither are durable). Returns the
/// drain, `None` when the table is empty (the state is then `streaming`).
async fn record_start(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
    position: Lsn,
) -> Result<Option<DrainRange>> {
    let value = position.to_i64().ok_or_else(|| WalError::Decode {
        lsn: position,
        problem: "LSN beyond i64".to_owned(),
    })?;
    let upto: i64 = db_call(
        "recording the new slot's start and the drain",
        config.db_timeout(),
        sqlx::query_scalar(AssertSqlSafe(sql.record_start.as_str()))
            .bind(&config.slot)
            .bind(config.position_row_name())
            .bind(value)
            .fetch_one(pool),
    )
    .await?;
    Ok((upto > 0).then_some(DrainRange { after: 0, upto }))
}

/// Start a drain of every row the table holds now, keeping the recorded position.
async fn start_drain(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<Option<DrainRange>> {
    let upto: i64 = db_call(
        "recording a drain of the outbox table",
        config.db_timeout(),
        sqlx::query_scalar(AssertSqlSafe(sql.start_drain.as_str()))
            .bind(&config.slot)
            .fetch_one(pool),
    )
    .await?;
    Ok((upto > 0).then_some(DrainRange { after: 0, upto }))
}

/// The recorded confirmed position; `None` when never recorded (a 0/0 that a
/// relay before migration 0003 could record counts as never recorded).
async fn read_position(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<Option<Lsn>> {
    let recorded: Option<i64> = db_call(
        "reading the recorded WAL position",
        config.db_timeout(),
        sqlx::query_scalar(AssertSqlSafe(sql.read_position.as_str()))
            .bind(config.position_row_name())
            .fetch_optional(pool),
    )
    .await?;
    Ok(recorded
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .map(Lsn))
}

/// Decide from the recorded lifecycle, the recorded position and the slot
/// itself what this start does; see "State machine" in the module docs.
async fn inspect_slot(pool: &PgPool, config: &WalSourceConfig, sql: &WalSql) -> Result<SlotState> {
    let lifecycle = read_lifecycle(pool, config, sql).await?;
    if lifecycle == Some(Lifecycle::Recovering) {
        return Ok(SlotState::Recovering);
    }
    let recorded = read_position(pool, config, sql).await?;
    let Some(slot) = slot_ready(pool, config).await? else {
        return Ok(match (lifecycle, recorded) {
            // Never created, or the creation did not get through.
            (None, None) | (Some(Lifecycle::Creating), _) => SlotState::Missing,
            (_, last) => SlotState::Lost {
                reason: SlotLossReason::Dropped,
                last: last.unwrap_or_default(),
            },
        });
    };
    let wrong = |problem: String| WalError::Slot {
        slot: config.slot.clone(),
        problem,
        fix: "configure a slot name of its own for this outbox (wal.slot); the relay creates it"
            .to_owned(),
    };
    if slot.slot_type != "logical" || slot.plugin.as_deref() != Some("pgoutput") {
        return Err(wrong(format!(
            "is a {} slot with plugin {:?}, the WAL source needs a logical pgoutput slot",
            slot.slot_type,
            slot.plugin.as_deref().unwrap_or("none")
        )));
    }
    if !slot.in_this_database {
        return Err(wrong(format!(
            "belongs to database {:?}, not the one of the database URL",
            slot.database.as_deref().unwrap_or("none")
        )));
    }
    if let Some(detail) = slot.invalidation {
        return Ok(SlotState::Lost {
            reason: SlotLossReason::Invalidated { detail },
            last: recorded.or(slot.confirmed).unwrap_or_default(),
        });
    }
    // slot_ready() waited for the position of a slot still being created.
    let slot_confirmed = slot.confirmed.unwrap_or_default();
    match (lifecycle, recorded) {
        // Our own creation that crashed before it was recorded, or a slot made
        // by an operator: adopt it. Rows already in the table may not be in its
        // stream: drain them.
        (Some(Lifecycle::Creating), _) | (_, None) => {
            tracing::info!(slot = %config.slot, position = %slot_confirmed, "adopting a replication slot without a recorded position");
            let drain = record_start(pool, config, sql, slot_confirmed).await?;
            Ok(SlotState::Healthy {
                resume_from: slot_confirmed,
                drain,
                adopted: true,
            })
        }
        // Positions are recorded before they are reported, so a slot of ours is never ahead.
        (_, Some(last)) if slot_confirmed > last => Ok(SlotState::Lost {
            reason: SlotLossReason::MovedAhead {
                slot_confirmed_lsn: slot_confirmed,
            },
            last,
        }),
        (Some(Lifecycle::Draining(drain)), Some(last)) => Ok(SlotState::Healthy {
            resume_from: last,
            drain: (drain.after < drain.upto).then_some(drain),
            adopted: false,
        }),
        (Some(Lifecycle::Streaming), Some(last)) => Ok(SlotState::Healthy {
            resume_from: last,
            drain: None,
            adopted: false,
        }),
        // A position recorded by a relay before migration 0003: whether its
        // drain finished is unknown, so drain what the table holds once.
        (None, Some(last)) => Ok(SlotState::Healthy {
            resume_from: last,
            drain: start_drain(pool, config, sql).await?,
            adopted: false,
        }),
        (Some(Lifecycle::Recovering), Some(_)) => Ok(SlotState::Recovering),
    }
}

/// The slot, once it has a confirmed position: a slot that another session
/// is still creating (a relay killed while creating it leaves its backend
/// running) has none yet; it is waited for up to `slot_busy_timeout`.
async fn slot_ready(pool: &PgPool, config: &WalSourceConfig) -> Result<Option<SlotRow>> {
    let began = Instant::now();
    loop {
        let slot = slot_row(pool, config).await?;
        match slot {
            Some(row) if row.confirmed.is_none() && row.invalidation.is_none() => {
                let waited = began.elapsed();
                if waited >= config.slot_busy_timeout {
                    return Err(WalError::SlotBusy {
                        slot: config.slot.clone(),
                        pid: None,
                        waited_ms: millis(waited),
                    });
                }
                tracing::info!(slot = %config.slot, "the replication slot is still being created by another session; waiting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return Ok(other),
        }
    }
}

/// Create the permanent pgoutput slot and record its start as the confirmed
/// position, with the drain of the rows the table holds.
///
/// `creating` is recorded first: a crash after the server made the slot and
/// before its start is recorded leaves a slot the next start adopts.
async fn create_slot(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<(Lsn, Option<DrainRange>)> {
    write_lifecycle(
        pool,
        config,
        "recording that the slot is being created",
        &sql.set_creating,
        false,
    )
    .await?;
    failpoint!("wal.slot.creating");
    tracing::info!(slot = %config.slot, "creating the replication slot (waits for running transactions)");
    let created = tokio::time::timeout(
        SLOT_CREATE_TIMEOUT,
        sqlx::query_scalar::<_, String>(CREATE_SLOT_SQL)
            .bind(&config.slot)
            .fetch_one(pool),
    )
    .await;
    let start: Lsn = match created {
        Ok(Ok(lsn)) => lsn.parse().map_err(|problem| WalError::Slot {
            slot: config.slot.clone(),
            problem,
            fix: "report this as a bug".to_owned(),
        })?,
        Ok(Err(error)) => {
            let fix = match sqlstate(&error).as_deref() {
                Some("53400") => {
                    "raise max_replication_slots (needs a restart) or drop unused slots".to_owned()
                }
                Some("42710") => {
                    "another relay created it at the same moment; start again".to_owned()
                }
                _ => "check the role's REPLICATION attribute and max_replication_slots".to_owned(),
            };
            return Err(WalError::Slot {
                slot: config.slot.clone(),
                problem: format!("cannot be created: {error}"),
                fix,
            });
        }
        Err(_) => {
            return Err(WalError::DatabaseTimeout {
                operation: "creating the replication slot (a long-running transaction blocks it)",
                timeout_ms: millis(SLOT_CREATE_TIMEOUT),
            });
        }
    };
    failpoint!("wal.slot.created");
    let drain = record_start(pool, config, sql, start).await?;
    tracing::info!(slot = %config.slot, %start, drain_upto = drain.map(|d| d.upto), "created the replication slot");
    Ok((start, drain))
}

/// Recover from a lost slot: record `recovering`, drop what is left of the old
/// slot, forget its position (state `creating`), create a new one.
async fn recover_slot(
    pool: &PgPool,
    config: &WalSourceConfig,
    sql: &WalSql,
) -> Result<(Lsn, Option<DrainRange>)> {
    write_lifecycle(
        pool,
        config,
        "recording the slot's recovery",
        &sql.set_recovering,
        false,
    )
    .await?;
    if slot_row(pool, config).await?.is_some() {
        db_call(
            "dropping the lost replication slot",
            config.db_timeout(),
            sqlx::query(DROP_SLOT_SQL).bind(&config.slot).execute(pool),
        )
        .await?;
    }
    failpoint!("wal.recovery.dropped");
    write_lifecycle(
        pool,
        config,
        "forgetting the lost slot's position",
        &sql.forget_position,
        true,
    )
    .await?;
    create_slot(pool, config, sql).await
}

async fn write_position(
    pool: &PgPool,
    config: &WalSourceConfig,
    query: &str,
    lsn: Lsn,
) -> Result<()> {
    let value = lsn.to_i64().ok_or_else(|| WalError::Decode {
        lsn,
        problem: "LSN beyond i64".to_owned(),
    })?;
    db_call(
        "recording the confirmed WAL position",
        config.db_timeout(),
        sqlx::query(AssertSqlSafe(query))
            .bind(config.position_row_name())
            .bind(value)
            .execute(pool),
    )
    .await?;
    Ok(())
}

/// Connect the replication session and start streaming at `resume_from`,
/// waiting out a slot another session still holds.
async fn start_streaming(config: &WalSourceConfig, resume_from: Lsn) -> Result<ReplicationClient> {
    let began = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let replication = replication_config(config, resume_from)?;
        let mut client = ReplicationClient::connect(replication)
            .await
            .map_err(WalError::replication("connecting for replication"))?;
        let error = match tokio::time::timeout(config.connect_timeout, client.wait_started()).await
        {
            Ok(Ok(())) => return Ok(client),
            Ok(Err(error)) => error,
            Err(_) => {
                client.abort();
                return Err(WalError::ReplicationTimeout {
                    timeout_ms: millis(config.connect_timeout),
                });
            }
        };
        let message = error.to_string();
        // 55006 object_in_use: "replication slot … is active for PID …".
        if sqlstate_in(&message) != Some("55006") {
            return Err(WalError::replication("starting replication")(error));
        }
        let waited = began.elapsed();
        if waited >= config.slot_busy_timeout {
            return Err(WalError::SlotBusy {
                slot: config.slot.clone(),
                pid: busy_pid(&message),
                waited_ms: millis(waited),
            });
        }
        tracing::info!(
            slot = %config.slot, pid = ?busy_pid(&message),
            "replication slot is in use by another session; waiting for it"
        );
        tokio::time::sleep(backoff.min(config.slot_busy_timeout.saturating_sub(waited))).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn replication_config(config: &WalSourceConfig, resume_from: Lsn) -> Result<ReplicationConfig> {
    let options = config.connect_options()?;
    let url = options.to_url_lossy();
    let password = url.password().map(percent_decode).unwrap_or_default();
    let host = match options.get_socket() {
        Some(socket) => socket.to_string_lossy().into_owned(),
        None => options.get_host().to_owned(),
    };
    let database = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    let file_of = |name: &str| {
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| certificate_file(name, &value))
            .transpose()
    };
    let root_cert = file_of("sslrootcert")?;
    let mut tls = match options.get_ssl_mode() {
        PgSslMode::Disable => TlsConfig::disabled(),
        PgSslMode::Allow | PgSslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::default()
        },
        PgSslMode::Require => TlsConfig::require(),
        PgSslMode::VerifyCa => TlsConfig::verify_ca(root_cert),
        PgSslMode::VerifyFull => TlsConfig::verify_full(root_cert),
    };
    // The replication connection presents the same client certificate as the pools.
    match (file_of("sslcert")?, file_of("sslkey")?) {
        (Some(cert), Some(key)) => tls = tls.with_client_cert(cert, key),
        (None, None) => {}
        _ => {
            return Err(WalError::InvalidConfig {
                field: "database.url",
                problem: "it sets only one of sslcert and sslkey".into(),
                fix: "a client certificate needs both: set sslcert=<file> and sslkey=<file>".into(),
            });
        }
    }
    Ok(ReplicationConfig::new(
        host,
        options.get_username(),
        password,
        database,
        config.slot.as_str(),
        config.publication.as_str(),
    )
    .with_port(options.get_port())
    .with_tls(tls)
    // The server skips what committed before the start; the initial report is the
    // recorded position, so the slot never moves back or past it.
    .with_start_lsn(resume_from.to_pgwire())
    .with_ack_lsn(resume_from.to_pgwire())
    .with_status_interval(config.status_interval)
    .with_wakeup_interval(config.status_interval)
    .with_buffer_size(config.buffer_messages)
    .with_options(REPLICATION_SESSION_OPTIONS)
    .with_application_name(format!("outbox-relay-wal:{}", config.slot)))
}

/// The file a certificate setting of the database URL names. sqlx writes a file as
/// `file: <path>` in the URLs it builds; a certificate given inline (PEM in the URL)
/// cannot be handed to the replication client.
fn certificate_file(setting: &str, value: &str) -> Result<std::path::PathBuf> {
    let path = value.strip_prefix("file: ").unwrap_or(value);
    if path.starts_with("-----BEGIN") {
        return Err(WalError::InvalidConfig {
            field: "database.url",
            problem: format!("it gives {setting} inline (PEM text)"),
            fix: format!(
                "the WAL source's replication connection needs a file: set \
                 {setting}=<path to a PEM file>"
            ),
        });
    }
    Ok(std::path::PathBuf::from(path))
}

/// The SQLSTATE in a replication client's server error text: `… (SQLSTATE 55006)`.
fn sqlstate_in(message: &str) -> Option<&str> {
    let start = message.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    message
        .get(start..start + 5)
        .filter(|code| code.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn busy_pid(message: &str) -> Option<i32> {
    let rest = &message[message.find("PID ")? + 4..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn pg_time(micros_since_2000: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros_since_2000.saturating_add(PG_EPOCH_UNIX_MICROS))
        .unwrap_or_default()
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// [`crate::resilience::db_call`] with the WAL source's error type.
async fn db_call<T>(
    operation: &'static str,
    timeout: Duration,
    call: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
) -> Result<T> {
    crate::resilience::db_call(operation, timeout, call).await
}

impl From<DbCallFailure> for WalError {
    fn from(failure: DbCallFailure) -> Self {
        match failure {
            DbCallFailure::Failed { operation, source } => WalError::Database { operation, source },
            DbCallFailure::TimedOut {
                operation,
                timeout_ms,
            } => WalError::DatabaseTimeout {
                operation,
                timeout_ms,
            },
        }
    }
}

fn invalid(field: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> WalError {
    WalError::InvalidConfig {
        field,
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Slot and publication names go into SQL and replication commands as text,
/// so they are plain lowercase identifiers (slot names must be anyway).
fn check_identifier(field: &'static str, name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a plain identifier"),
            "use 1 to 63 characters of a-z, 0-9 and _, not starting with a digit",
        ))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL with its password replaced, for logs and `Debug`.
fn redact_url(url: &str) -> String {
    let mut redacted = url.to_owned();
    if let Some(scheme_end) = redacted.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = redacted[authority_start..]
            .find(['/', '?'])
            .map_or(redacted.len(), |i| i + authority_start);
        if let Some(at) = redacted[authority_start..authority_end].rfind('@') {
            let userinfo = &redacted[authority_start..authority_start + at];
            if let Some(colon) = userinfo.find(':') {
                redacted.replace_range(authority_start + colon + 1..authority_start + at, "***");
            }
        }
    }
    if let Some(start) = redacted.find("password=") {
        let value_start = start + "password=".len();
        let value_end = redacted[value_start..]
            .find('&')
            .map_or(redacted.len(), |i| i + value_start);
        redacted.replace_range(value_start..value_end, "***");
    }
    redacted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn wal_level_error_names_the_fix() {
        assert!(check_wal_level("logical").is_ok());
        let err = check_wal_level("replica").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ALTER SYSTEM SET wal_level = logical"),
            "{text}"
        );
        assert!(text.contains("restart"), "{text}");
        let relay: crate::error::RelayError = err.into();
        assert!(
            matches!(relay, crate::error::RelayError::Config(_)),
            "{relay}"
        );
    }

    #[test]
    fn names_that_go_into_sql_are_plain_identifiers() {
        let mut config = WalSourceConfig::new(
            "postgres://u@localhost/db",
            SchemaName::default(),
            "s_1",
            "p",
        );
        assert!(config.validate().is_ok());
        for bad in ["", "Slot", "a-b", "a\"b", "1a", "a b", &"s".repeat(64)] {
            config.slot = bad.to_owned();
            let err = config.validate().unwrap_err();
            assert!(
                matches!(
                    err,
                    WalError::InvalidConfig {
                        field: "wal.slot",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
        config.slot = "s".to_owned();
        config.publication = "p'; drop".to_owned();
        assert!(config.validate().is_err());
        config.publication = "p".to_owned();
        config.message_prefix = String::new();
        assert!(config.validate().is_err());
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        let config = WalSourceConfig::new(
            "postgres://relay:s3cr%40t@db:5432/app?sslmode=require&password=other",
            SchemaName::default(),
            "s",
            "p",
        );
        let text = format!("{config:?}");
        assert!(!text.contains("s3cr"), "{text}");
        assert!(!text.contains("other"), "{text}");
        assert!(text.contains("relay:***@db:5432/app"), "{text}");
    }

    #[test]
    fn replication_settings_come_from_the_url() {
        let config = WalSourceConfig::new(
            "postgres://relay:s3cr%40t@db.example:6543/app?sslmode=disable",
            SchemaName::default(),
            "slot_a",
            "pub_a",
        );
        let replication = replication_config(&config, Lsn(42)).unwrap();
        assert_eq!(replication.host, "db.example");
        assert_eq!(replication.port, 6543);
        assert_eq!(replication.user, "relay");
        assert_eq!(replication.password, "s3cr@t");
        assert_eq!(replication.database, "app");
        assert_eq!(replication.slot, "slot_a");
        assert_eq!(replication.start_lsn.0, 42);
        assert_eq!(replication.ack_lsn.map(|l| l.0), Some(42));
        assert_eq!(replication.tls.mode, pgwire_replication::SslMode::Disable);
    }

    #[test]
    fn the_replication_connection_verifies_with_the_urls_ca_and_client_certificate() {
        let config = WalSourceConfig::new(
            "postgres://relay@db.example/app?sslmode=verify-full&sslrootcert=/tls/ca.pem\
             &sslcert=/tls/client.pem&sslkey=/tls/client.key",
            SchemaName::default(),
            "slot_a",
            "pub_a",
        );
        let tls = replication_config(&config, Lsn(42)).unwrap().tls;
        assert_eq!(tls.mode, pgwire_replication::SslMode::VerifyFull);
        let path = |p: &str| Some(std::path::PathBuf::from(p));
        assert_eq!(tls.ca_pem_path, path("/tls/ca.pem"));
        assert_eq!(tls.client_cert_pem_path, path("/tls/client.pem"));
        assert_eq!(tls.client_key_pem_path, path("/tls/client.key"));

        let half = WalSourceConfig::new(
            "postgres://relay@db.example/app?sslmode=require&sslcert=/tls/client.pem",
            SchemaName::default(),
            "slot_a",
            "pub_a",
        );
        let error = replication_config(&half, Lsn(42)).unwrap_err().to_string();
        assert!(error.contains("sslcert and sslkey"), "{error}");
    }

    #[test]
    fn replication_errors_are_classified_by_sqlstate() {
        let server =
            |m: &str| WalError::replication("streaming")(PgWireError::Server(m.to_owned()));
        assert!(
            server("terminating connection due to administrator command (SQLSTATE 57P01)")
                .is_retryable()
        );
        assert!(
            !server("no pg_hba.conf entry for replication connection (SQLSTATE 28000)")
                .is_retryable()
        );
        assert!(!server("publication \"p\" does not exist (SQLSTATE 42704)").is_retryable());
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(WalError::replication("streaming")(PgWireError::from(io)).is_retryable());
        assert_eq!(sqlstate_in("x (SQLSTATE 55006)"), Some("55006"));
        assert_eq!(sqlstate_in("no code"), None);
    }

    #[test]
    fn busy_pid_is_read_from_the_server_message() {
        assert_eq!(
            busy_pid("replication slot \"s\" is active for PID 4242 (SQLSTATE 55006)"),
            Some(4242)
        );
        assert_eq!(busy_pid("other"), None);
    }
}
