//! Counters of one relay run, shared by the loop, the sources and the ops endpoint.
//!
//! [`RelayStats`] holds what every source counts, plus one part per source
//! ([`PollingStats`], [`WalStats`]). The metric names they are rendered under
//! live in `ops/metrics.rs` and do not depend on this layout.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::resilience::BreakerState;

/// Counters of one relay run.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events the broker confirmed and that were settled.
    pub published: AtomicU64,
    /// Broker rejections of single events.
    pub rejected: AtomicU64,
    /// Events moved to the dead-letter table.
    pub dead_lettered: AtomicU64,
    /// Publishes that failed for broker or network reasons.
    pub transient_failures: AtomicU64,
    /// Events parked by the `block` poison policy.
    pub blocked: AtomicU64,
    /// Failed database calls of the relay loop.
    pub database_errors: AtomicU64,
    /// Circuit breaker state: 0 closed, 1 open, 2 half-open.
    pub breaker_state: AtomicU64,
    /// Whether the last database call of the relay loop or the sampler succeeded.
    pub database_reachable: AtomicBool,
    /// Unix time in milliseconds of the relay loop's last turn.
    pub last_heartbeat_ms: AtomicU64,
    /// Whether start-up is over (PostgreSQL and the broker answered); `/readyz` says 503 before.
    pub started: AtomicBool,
    /// Time from an event's `created_at` to the broker's confirm, per delivered event.
    pub commit_to_confirm: crate::ops::histogram::Histogram,
    /// Duration of each publish until the broker's verdict.
    pub publish_duration: crate::ops::histogram::Histogram,
    /// Whether an operator paused this relay's instance group (`outbox-relay pause`).
    pub paused: AtomicBool,
    /// The polling source's part.
    pub polling: PollingStats,
    /// The WAL source's part.
    pub wal: WalStats,
}

/// What only the polling source counts.
#[derive(Debug, Default)]
pub struct PollingStats {
    /// Events confirmed but not settled because a lease was lost (the new owner republishes them).
    pub unsettled: AtomicU64,
    /// Batches claimed.
    pub batches: AtomicU64,
    /// Claim queries sent (including empty ones): the relay's polling load on PostgreSQL.
    pub claim_queries: AtomicU64,
    /// Lease maintenance rounds (a few small queries each).
    pub lease_rounds: AtomicU64,
    /// Work partitions held.
    pub partitions_held: AtomicU64,
}

/// What only the WAL source counts.
#[derive(Debug, Default)]
pub struct WalStats {
    /// Whether the relay runs the WAL source.
    pub active: AtomicBool,
    /// Whether this instance leads its replication slot.
    pub leader: AtomicBool,
    /// WAL written after the slot's confirmed position, in bytes (sampled).
    pub lag_bytes: AtomicI64,
    /// WAL the slot keeps on the server, in bytes (sampled).
    pub retained_bytes: AtomicI64,
    /// The last position recorded and reported to the slot.
    pub confirmed_lsn: AtomicU64,
    /// Times the slot was found lost and recovered from the table.
    pub slot_losses: AtomicU64,
    /// WAL messages with the outbox prefix that were no event, dead-lettered.
    pub malformed_messages: AtomicU64,
}

/// A snapshot of [`RelayStats`], returned when the relay stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Events published and settled.
    pub published: u64,
    /// Events moved to the dead-letter table.
    pub dead_lettered: u64,
    /// Events parked by the `block` poison policy.
    pub blocked: u64,
    /// Publishes that failed for broker or network reasons.
    pub transient_failures: u64,
    /// Events confirmed but not settled because their lease moved (polling): the
    /// new owner publishes them again.
    pub unsettled: u64,
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl RelayStats {
    /// Record that the relay loop is alive.
    pub fn beat(&self) {
        self.last_heartbeat_ms
            .store(unix_millis(), Ordering::Relaxed);
    }

    /// Time since the relay loop's last turn.
    pub fn heartbeat_age(&self) -> Duration {
        Duration::from_millis(
            unix_millis().saturating_sub(self.last_heartbeat_ms.load(Ordering::Relaxed)),
        )
    }

    pub(crate) fn set_breaker(&self, state: BreakerState) {
        self.breaker_state
            .store(state.as_gauge() as u64, Ordering::Relaxed);
    }

    /// The circuit breaker's current state.
    pub fn breaker(&self) -> BreakerState {
        match self.breaker_state.load(Ordering::Relaxed) {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    pub(crate) fn summary(&self) -> RunSummary {
        RunSummary {
            published: self.published.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            transient_failures: self.transient_failures.load(Ordering::Relaxed),
            unsettled: self.polling.unsettled.load(Ordering::Relaxed),
        }
    }
}
