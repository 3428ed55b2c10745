//! Metric names, in one place, and their Prometheus text rendering.
//!
//! Counters come from [`RelayStats`]; outbox gauges (backlog, oldest age, dead
//! letters) are sampled from PostgreSQL by [`sample_outbox`] every
//! `ops.sample_interval_ms` (default 15 s), so they can be that stale. Labels are low-cardinality only (none per event or key).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::stats::RelayStats;

/// Events published and settled (counter).
pub const EVENTS_PUBLISHED: &str = "outbox_relay_events_published_total";
/// Events the broker refused (counter; every attempt counts).
pub const EVENTS_REJECTED: &str = "outbox_relay_events_rejected_total";
/// Events moved to the dead-letter table (counter).
pub const EVENTS_DEAD_LETTERED: &str = "outbox_relay_events_dead_lettered_total";
/// Events parked by the `block` poison policy (counter).
pub const EVENTS_BLOCKED: &str = "outbox_relay_events_blocked_total";
/// Events confirmed but not settled because their lease moved (counter).
pub const EVENTS_UNSETTLED: &str = "outbox_relay_events_unsettled_total";
/// Publishes that failed for broker or network reasons (counter).
pub const PUBLISH_FAILURES: &str = "outbox_relay_publish_failures_total";
/// Batches claimed (counter).
pub const BATCHES: &str = "outbox_relay_batches_total";
/// Claim queries sent, empty ones included (counter): the polling load on PostgreSQL.
pub const CLAIM_QUERIES: &str = "outbox_relay_claim_queries_total";
/// Lease maintenance rounds (counter; a few small queries each).
pub const LEASE_ROUNDS: &str = "outbox_relay_lease_rounds_total";
/// Failed database calls of the claim loop (counter).
pub const DATABASE_ERRORS: &str = "outbox_relay_database_errors_total";
/// Circuit breaker state: 0 closed, 1 open, 2 half-open (gauge).
pub const BREAKER_STATE: &str = "outbox_relay_circuit_breaker_state";
/// Work partitions this instance holds (gauge).
pub const PARTITIONS_HELD: &str = "outbox_relay_partitions_held";
/// Unpublished events in the outbox, all instances together (gauge, sampled).
pub const OUTBOX_PENDING: &str = "outbox_relay_outbox_pending_events";
/// Age of the oldest unpublished event in seconds (gauge, sampled).
pub const OUTBOX_OLDEST_AGE: &str = "outbox_relay_outbox_oldest_pending_age_seconds";
/// Events held by the `block` policy (gauge, sampled).
pub const OUTBOX_BLOCKED: &str = "outbox_relay_outbox_blocked_events";
/// Rows in the dead-letter table (gauge, sampled).
pub const DEAD_LETTER_ROWS: &str = "outbox_relay_dead_letter_events";

/// Transactions of this database open longer than 60 s (gauge, sampled).
pub const LONG_TRANSACTIONS: &str = "outbox_relay_long_transactions";
/// Age of the oldest transaction open longer than 60 s, in seconds; 0 when none (gauge, sampled).
pub const OLDEST_TRANSACTION_AGE: &str = "outbox_relay_oldest_transaction_age_seconds";
/// Pending events waiting for a retry after a broker rejection (gauge, sampled).
pub const OUTBOX_RETRYING: &str = "outbox_relay_outbox_retrying_events";
/// Partitions leased by instances with no heartbeat (gauge, sampled).
pub const ORPHANED_PARTITIONS: &str = "outbox_relay_orphaned_partitions";
/// Seconds from an event's `created_at` (the writer's clock at enqueue) to the
/// broker's confirm, per delivered event (histogram).
pub const COMMIT_TO_CONFIRM: &str = "outbox_relay_commit_to_confirm_seconds";
/// Seconds from handing an event to the sink to the broker's verdict (histogram).
pub const PUBLISH_DURATION: &str = "outbox_relay_publish_duration_seconds";
/// 1 while an operator paused this relay's instance group (gauge).
pub const PAUSED: &str = "outbox_relay_paused";
/// Always 1, labelled with the relay's `version` (gauge).
pub const BUILD_INFO: &str = "outbox_relay_build_info";

/// Whether this instance leads its replication slot: 1 leader, 0 standby (gauge, WAL source).
pub const WAL_LEADER: &str = "outbox_relay_wal_leader";
/// WAL written after the slot's confirmed position, in bytes (gauge, sampled, WAL source).
pub const WAL_SLOT_LAG: &str = "outbox_relay_wal_slot_lag_bytes";
/// WAL the slot keeps on the server, in bytes (gauge, sampled, WAL source).
pub const WAL_RETAINED: &str = "outbox_relay_wal_retained_bytes";
/// The last position confirmed to the slot, as a number (gauge, WAL source).
pub const WAL_CONFIRMED_LSN: &str = "outbox_relay_wal_confirmed_lsn";
/// Times the slot was found lost and recovered from the table (counter, WAL source).
pub const WAL_SLOT_LOSSES: &str = "outbox_relay_wal_slot_losses_total";
/// Logical decoding messages with the outbox prefix that were no event and went
/// to the dead-letter table (counter, WAL source; also in [`EVENTS_DEAD_LETTERED`]).
pub const WAL_MALFORMED_MESSAGES: &str = "outbox_relay_wal_malformed_messages_total";

/// Gauges sampled from the outbox tables.
#[derive(Debug, Default, Clone, Copy)]
pub struct OutboxSample {
    /// Unpublished events.
    pub pending: i64,
    /// Age of the oldest unpublished event, in seconds.
    pub oldest_age_secs: f64,
    /// Blocked events.
    pub blocked: i64,
    /// Dead-lettered events.
    pub dead_lettered: i64,
    /// Pending events waiting for a retry.
    pub retrying: i64,
    /// Transactions open longer than 60 s.
    pub long_transactions: i64,
    /// Age of the oldest of them, in seconds (0 when none).
    pub oldest_transaction_secs: f64,
    /// Partitions leased by instances with no heartbeat.
    pub orphaned_partitions: i64,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// Render every metric in the Prometheus text format.
pub fn render(stats: &RelayStats, sample: Option<OutboxSample>) -> String {
    let counter = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP {BUILD_INFO} The relay's version; always 1.");
    let _ = writeln!(out, "# TYPE {BUILD_INFO} gauge");
    let _ = writeln!(
        out,
        "{BUILD_INFO}{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    metric(
        &mut out,
        EVENTS_PUBLISHED,
        "counter",
        "Events published and settled.",
        counter(&stats.published),
    );
    metric(
        &mut out,
        EVENTS_REJECTED,
        "counter",
        "Broker rejections of single events.",
        counter(&stats.rejected),
    );
    metric(
        &mut out,
        EVENTS_DEAD_LETTERED,
        "counter",
        "Events moved to the dead-letter table.",
        counter(&stats.dead_lettered),
    );
    metric(
        &mut out,
        EVENTS_BLOCKED,
        "counter",
        "Events parked by the block poison policy.",
        counter(&stats.blocked),
    );
    metric(
        &mut out,
        EVENTS_UNSETTLED,
        "counter",
        "Events confirmed but not settled because their lease moved.",
        counter(&stats.polling.unsettled),
    );
    metric(
        &mut out,
        PUBLISH_FAILURES,
        "counter",
        "Publishes that failed for broker or network reasons.",
        counter(&stats.transient_failures),
    );
    metric(
        &mut out,
        BATCHES,
        "counter",
        "Batches claimed.",
        counter(&stats.polling.batches),
    );
    metric(
        &mut out,
        CLAIM_QUERIES,
        "counter",
        "Claim queries sent, empty ones included.",
        counter(&stats.polling.claim_queries),
    );
    metric(
        &mut out,
        LEASE_ROUNDS,
        "counter",
        "Lease maintenance rounds.",
        counter(&stats.polling.lease_rounds),
    );
    metric(
        &mut out,
        DATABASE_ERRORS,
        "counter",
        "Failed database calls of the claim loop.",
        counter(&stats.database_errors),
    );
    metric(
        &mut out,
        BREAKER_STATE,
        "gauge",
        "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
        stats.breaker().as_gauge(),
    );
    metric(
        &mut out,
        PARTITIONS_HELD,
        "gauge",
        "Work partitions this instance holds.",
        counter(&stats.polling.partitions_held),
    );
    if stats.wal.active.load(Ordering::Relaxed) {
        let gauge_i64 = |g: &std::sync::atomic::AtomicI64| g.load(Ordering::Relaxed) as f64;
        metric(
            &mut out,
            WAL_LEADER,
            "gauge",
            "1 when this instance leads its replication slot, 0 on a standby.",
            if stats.wal.leader.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        metric(
            &mut out,
            WAL_SLOT_LAG,
            "gauge",
            "WAL written after the slot's confirmed position, in bytes.",
            gauge_i64(&stats.wal.lag_bytes),
        );
        metric(
            &mut out,
            WAL_RETAINED,
            "gauge",
            "WAL the replication slot keeps on the server, in bytes.",
            gauge_i64(&stats.wal.retained_bytes),
        );
        metric(
            &mut out,
            WAL_CONFIRMED_LSN,
            "gauge",
            "The last WAL position recorded and reported to the slot.",
            counter(&stats.wal.confirmed_lsn),
        );
        metric(
            &mut out,
            WAL_SLOT_LOSSES,
            "counter",
            "Times the slot was found lost and recovered from the outbox table.",
            counter(&stats.wal.slot_losses),
        );
        metric(
            &mut out,
            WAL_MALFORMED_MESSAGES,
            "counter",
            "WAL messages with the outbox prefix that were no event, dead-lettered.",
            counter(&stats.wal.malformed_messages),
        );
    }
    metric(
        &mut out,
        PAUSED,
        "gauge",
        "1 while an operator paused this relay's instance group.",
        if stats.paused.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    stats.commit_to_confirm.render(
        &mut out,
        COMMIT_TO_CONFIRM,
        "Seconds from the event's created_at (writer's clock) to the broker's confirm.",
        "",
    );
    stats.publish_duration.render(
        &mut out,
        PUBLISH_DURATION,
        "Seconds from handing an event to the sink to the broker's verdict.",
        "",
    );
    if let Some(sample) = sample {
        metric(
            &mut out,
            OUTBOX_PENDING,
            "gauge",
            "Unpublished events in the outbox.",
            sample.pending as f64,
        );
        metric(
            &mut out,
            OUTBOX_OLDEST_AGE,
            "gauge",
            "Age of the oldest unpublished event in seconds.",
            sample.oldest_age_secs,
        );
        metric(
            &mut out,
            OUTBOX_BLOCKED,
            "gauge",
            "Events held by the block poison policy.",
            sample.blocked as f64,
        );
        metric(
            &mut out,
            DEAD_LETTER_ROWS,
            "gauge",
            "Events in the dead-letter table.",
            sample.dead_lettered as f64,
        );
        metric(
            &mut out,
            OUTBOX_RETRYING,
            "gauge",
            "Pending events waiting for a retry after a broker rejection.",
            sample.retrying as f64,
        );
        metric(
            &mut out,
            LONG_TRANSACTIONS,
            "gauge",
            "Transactions of this database open longer than 60 s.",
            sample.long_transactions as f64,
        );
        metric(
            &mut out,
            OLDEST_TRANSACTION_AGE,
            "gauge",
            "Age of the oldest transaction open longer than 60 s, in seconds (0: none).",
            sample.oldest_transaction_secs,
        );
        metric(
            &mut out,
            ORPHANED_PARTITIONS,
            "gauge",
            "Partitions leased by relay instances with no heartbeat.",
            sample.orphaned_partitions as f64,
        );
    }
    out
}

/// Sample the outbox gauges.
pub async fn sample_outbox(
    pool: &sqlx::PgPool,
    schema: &outbox_core::SchemaName,
) -> crate::Result<OutboxSample> {
    let status = crate::admin::status(pool, schema).await?;
    Ok(OutboxSample {
        pending: status.pending,
        oldest_age_secs: status.oldest_pending_secs.unwrap_or(0.0),
        blocked: status.blocked,
        dead_lettered: status.dead_lettered,
        retrying: status.retrying,
        long_transactions: status.stalls.long_transactions.len() as i64,
        oldest_transaction_secs: status.stalls.oldest_transaction_secs().unwrap_or(0.0),
        orphaned_partitions: status
            .stalls
            .orphaned_leases
            .iter()
            .map(|lease| lease.partitions)
            .sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let stats = RelayStats::default();
        stats.published.fetch_add(3, Ordering::Relaxed);
        let text = render(
            &stats,
            Some(OutboxSample {
                pending: 7,
                ..Default::default()
            }),
        );
        assert!(text.contains("# TYPE outbox_relay_events_published_total counter\noutbox_relay_events_published_total 3\n"));
        assert!(text.contains("outbox_relay_outbox_pending_events 7\n"));
        assert!(text.contains("outbox_relay_circuit_breaker_state 0\n"));
        assert!(
            !text.contains(WAL_SLOT_LAG),
            "no WAL metrics with the polling source"
        );
        stats.wal.active.store(true, Ordering::Relaxed);
        stats.wal.leader.store(true, Ordering::Relaxed);
        stats.wal.lag_bytes.store(4096, Ordering::Relaxed);
        let text = render(&stats, None);
        assert!(text.contains("outbox_relay_wal_slot_lag_bytes 4096\n"));
        assert!(text.contains("outbox_relay_wal_leader 1\n"));
        assert!(text.contains("outbox_relay_wal_malformed_messages_total 0\n"));
    }
}
