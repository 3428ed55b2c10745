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

mod config;
mod error;
pub mod leader;
mod lsn;
mod pgoutput;
mod poison;
pub mod rows;
mod server;
mod session;
mod slot;
mod stream;
pub(crate) mod supervisor;
#[cfg(test)]
mod tests;
mod units;

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

// Shared by the submodules (`use super::*`); the public API is re-exported below.
use self::{error::*, server::*, session::*, slot::*};
use crate::percent::percent_decode;

pub use self::config::WalSourceConfig;
pub use self::error::WalError;
pub use self::lsn::Lsn;
pub use self::session::WalSource;
pub use self::slot::{SlotLossReason, SlotLost, SlotMonitor, SlotStatus, WalStart};
pub use self::stream::{DrainRange, MalformedMessage, Undecodable, WalPositions, WalTransaction};

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
