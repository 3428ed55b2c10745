//! What holds the relay back, for `outbox-relay status` and the metrics:
//! transactions open for long (they pin a replication slot's WAL and hold back
//! what readers see), events a key waits behind (retrying or blocked), and
//! partition leases whose owner stopped sending heartbeats (a restarted relay
//! waits for them to expire). Never a query's text or a payload.

use outbox_core::SchemaName;
use sqlx::{AssertSqlSafe, PgPool};

use crate::{RelayError, Result};

/// By default a transaction open longer than this is reported.
pub const LONG_TRANSACTION: std::time::Duration = std::time::Duration::from_secs(60);
/// Rows at most per list.
const LIMIT: i64 = 20;

/// A transaction of this database open for long.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpenTransaction {
    /// Its backend's process id (`pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// Seconds since it began.
    pub age_secs: f64,
    /// The client's `application_name`.
    pub application_name: String,
    /// `active`, `idle in transaction`, …
    pub state: String,
    /// Whether it wrote (holds a transaction id): logical decoding must keep WAL
    /// from its start until it ends, so it pins every slot's restart position.
    pub wrote: bool,
}

/// An event its key waits behind.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HeldKey {
    /// The partition key held.
    pub partition_key: String,
    /// The event at its head.
    pub event_id: String,
    /// `retrying` (after a broker rejection) or `blocked` (the `block` policy, until an operator acts).
    pub reason: String,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The last error.
    pub last_error: String,
    /// Seconds until the next attempt (retrying only).
    pub next_attempt_in_secs: Option<f64>,
}

/// Partition leases of an owner that has no live instance heartbeat.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OrphanedLeases {
    /// The owner's instance id.
    pub owner: String,
    /// Partitions it still holds.
    pub partitions: i64,
    /// Seconds until the last of them expires and other relays take them.
    pub expires_in_secs: f64,
}

/// Everything [`stall_report`] found; empty lists mean nothing holds the relay back.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StallReport {
    /// Transactions open longer than the threshold, oldest first.
    pub long_transactions: Vec<OpenTransaction>,
    /// Keys waiting behind a retrying or blocked event: one row per key, its first such event.
    pub held_keys: Vec<HeldKey>,
    /// Partition leases held by instances without a heartbeat.
    pub orphaned_leases: Vec<OrphanedLeases>,
}

impl StallReport {
    /// Age of the oldest long transaction, if any.
    pub fn oldest_transaction_secs(&self) -> Option<f64> {
        self.long_transactions.first().map(|t| t.age_secs)
    }
}

/// Look for what holds back `schema`'s relays; transactions count as long after `threshold`.
pub async fn stall_report(
    pool: &PgPool,
    schema: &SchemaName,
    threshold: std::time::Duration,
) -> Result<StallReport> {
    let long_transactions: Vec<(i32, f64, String, String, bool)> = sqlx::query_as(
        "select pid, extract(epoch from now() - xact_start)::float8, coalesce(application_name, ''), \
                coalesce(state, ''), backend_xid is not null \
         from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid() and xact_start is not null \
           and now() - xact_start > make_interval(secs => $1) \
         order by xact_start limit $2",
    )
    .bind(threshold.as_secs_f64())
    .bind(LIMIT)
    .fetch_all(pool)
    .await
    .map_err(RelayError::database("reading open transactions"))?;
    let outbox = schema.qualify("outbox");
    let held_keys: Vec<(String, String, String, i32, String, Option<f64>)> =
        sqlx::query_as(AssertSqlSafe(format!(
            "select distinct on (partition_key) partition_key, event_id::text, \
                    case when available_at = 'infinity' then 'blocked' else 'retrying' end, \
                    attempts, coalesce(last_error, ''), \
                    case when available_at <> 'infinity' and isfinite(available_at) \
                         then greatest(extract(epoch from available_at - now()), 0)::float8 end \
             from {outbox} where published_at is null and attempts > 0 \
             order by partition_key, sequence limit $1"
        )))
        .bind(LIMIT)
        .fetch_all(pool)
        .await
        .map_err(RelayError::database("reading held keys"))?;
    let leases = schema.qualify("relay_lease");
    let orphaned: Vec<(String, i64, f64)> = sqlx::query_as(AssertSqlSafe(format!(
        "select p.owner, count(*), extract(epoch from max(p.expires_at) - now())::float8 \
         from {leases} p \
         where p.name like 'partition:%' and p.expires_at > now() and p.owner is not null \
           and not exists (select 1 from {leases} i where i.name = 'instance:' || p.owner \
                           and i.expires_at > now()) \
         group by p.owner order by p.owner limit $1"
    )))
    .bind(LIMIT)
    .fetch_all(pool)
    .await
    .map_err(RelayError::database("reading orphaned leases"))?;
    Ok(StallReport {
        long_transactions: long_transactions
            .into_iter()
            .map(
                |(pid, age_secs, application_name, state, wrote)| OpenTransaction {
                    pid,
                    age_secs,
                    application_name,
                    state,
                    wrote,
                },
            )
            .collect(),
        held_keys: held_keys
            .into_iter()
            .map(
                |(partition_key, event_id, reason, attempts, last_error, next)| HeldKey {
                    partition_key,
                    event_id,
                    reason,
                    attempts,
                    last_error,
                    next_attempt_in_secs: next,
                },
            )
            .collect(),
        orphaned_leases: orphaned
            .into_iter()
            .map(|(owner, partitions, expires_in_secs)| OrphanedLeases {
                owner,
                partitions,
                expires_in_secs,
            })
            .collect(),
    })
}

impl std::fmt::Display for StallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.long_transactions.is_empty()
            && self.held_keys.is_empty()
            && self.orphaned_leases.is_empty()
        {
            return writeln!(f, "holding it back:     nothing");
        }
        writeln!(f, "holding it back:")?;
        for t in &self.long_transactions {
            writeln!(
                f,
                "  transaction of pid {} ({:?}, {}) open {:.0} s{}",
                t.pid,
                t.application_name,
                t.state,
                t.age_secs,
                if t.wrote {
                    ": it wrote, so replication slots keep WAL from its start"
                } else {
                    ""
                }
            )?;
        }
        for key in &self.held_keys {
            write!(
                f,
                "  key {:?} {} at event {} ({} attempts): {}",
                key.partition_key, key.reason, key.event_id, key.attempts, key.last_error
            )?;
            match key.next_attempt_in_secs {
                Some(secs) => writeln!(f, "; next attempt in {secs:.1} s")?,
                None => writeln!(f, "; retry or purge it with outbox-relay dead-letters")?,
            }
        }
        for lease in &self.orphaned_leases {
            writeln!(
                f,
                "  {} partitions held by {} with no heartbeat; free in {:.1} s when the lease expires",
                lease.partitions, lease.owner, lease.expires_in_secs
            )?;
        }
        Ok(())
    }
}
