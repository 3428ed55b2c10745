//! Connects the source to the sink: claims batches, publishes them in per-key
//! lanes, settles what the broker confirmed.
//!
//! Per-key order: within a batch the events of one key form a lane, published one
//! after another, each only after its predecessor's confirm; different keys
//! publish concurrently up to `max_in_flight`. A lane stops at the first event
//! that is not delivered (broker trouble, or a rejection that will be retried),
//! so no event overtakes its predecessor; those rows stay unsettled and come back
//! in a later batch. Only a dead-lettered event lets its key move on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::PgPool;
use tokio::sync::{Mutex, Notify, watch};

use crate::config::{PipelineConfig, SettleMode};
use crate::error::Result;
use crate::resilience::{Backoff, BreakerState, CircuitBreaker};
use crate::route::Router;
use crate::sink::{Outcome, Sink};
use crate::source::lease::{Owned, PartitionLeases};
use crate::source::polling::{Batch, ClaimedEvent, PollingSource, RejectionVerdict};

/// Counters of one relay run.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events the broker confirmed and that were settled.
    pub published: AtomicU64,
    /// Events confirmed but not settled because a lease was lost (the new owner republishes them).
    pub unsettled: AtomicU64,
    /// Broker rejections of single events.
    pub rejected: AtomicU64,
    /// Events moved to the dead-letter table.
    pub dead_lettered: AtomicU64,
    /// Publishes that failed for broker or network reasons.
    pub transient_failures: AtomicU64,
    /// Events parked by the `block` poison policy.
    pub blocked: AtomicU64,
    /// Batches claimed.
    pub batches: AtomicU64,
    /// Claim queries sent (including empty ones): the relay's polling load on PostgreSQL.
    pub claim_queries: AtomicU64,
    /// Lease maintenance rounds (a few small queries each).
    pub lease_rounds: AtomicU64,
    /// Failed database calls of the claim loop.
    pub database_errors: AtomicU64,
    /// Circuit breaker state: 0 closed, 1 open, 2 half-open.
    pub breaker_state: AtomicU64,
    /// Work partitions held.
    pub partitions_held: AtomicU64,
    /// Whether the last database call of the claim loop or the sampler succeeded.
    pub database_reachable: std::sync::atomic::AtomicBool,
    /// Unix time in milliseconds of the relay loop's last turn.
    pub last_heartbeat_ms: AtomicU64,
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

    fn set_breaker(&self, state: BreakerState) {
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

    fn summary(&self) -> RunSummary {
        RunSummary {
            published: self.published.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            transient_failures: self.transient_failures.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct LeaseState {
    owned: Owned,
    fair_share: usize,
}

#[derive(Debug, Default)]
struct BatchReport {
    delivered: Vec<i64>,
    transient: u64,
}

/// Everything one running relay instance needs.
pub(crate) struct Pipeline<S: Sink> {
    pub(crate) source: PollingSource,
    pub(crate) sink: Arc<S>,
    pub(crate) router: Router,
    pub(crate) config: PipelineConfig,
    pub(crate) settle: SettleMode,
    pub(crate) leases: Arc<PartitionLeases>,
    pub(crate) lease_pool: PgPool,
    pub(crate) stats: Arc<RelayStats>,
}

impl<S: Sink> Pipeline<S> {
    /// Run until `shutdown` is true, then finish and settle in-flight work within the grace period.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<RunSummary> {
        self.leases.register(&self.lease_pool).await?;
        let state = Arc::new(Mutex::new(LeaseState::default()));
        let leases_changed = Arc::new(Notify::new());
        self.stats.beat();
        let keeper = tokio::spawn(keep_leases(
            self.stats.clone(),
            self.leases.clone(),
            self.lease_pool.clone(),
            state.clone(),
            leases_changed.clone(),
            shutdown.clone(),
        ));

        let mut breaker = CircuitBreaker::new(
            self.config.breaker_failure_threshold,
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        let mut db_backoff = Backoff::new(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        let mut last_purge = tokio::time::Instant::now();
        while !*shutdown.borrow() {
            self.stats.beat();
            self.stats.set_breaker(breaker.state());
            // While the breaker is open nothing is claimed: the broker is not hammered and
            // the database is not polled for work that cannot be published.
            let wait = breaker.wait();
            if !wait.is_zero() {
                sleep_or_shutdown(wait, &mut shutdown).await;
                continue;
            }
            self.stats.set_breaker(breaker.state());
            let probe = breaker.state() == BreakerState::HalfOpen;
            let owned = self.release_extra_partitions(&state).await;
            self.stats.claim_queries.fetch_add(1, Ordering::Relaxed);
            let batch = match self.source.claim(&owned, probe.then_some(1)).await {
                Ok(batch) => {
                    db_backoff.reset();
                    self.stats.database_reachable.store(true, Ordering::Relaxed);
                    batch
                }
                Err(error) => {
                    let delay = db_backoff.next_delay();
                    self.stats.database_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .database_reachable
                        .store(false, Ordering::Relaxed);
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "claiming failed");
                    sleep_or_shutdown(delay, &mut shutdown).await;
                    continue;
                }
            };
            if batch.events.is_empty() {
                if probe {
                    // Nothing to probe with: the next event decides.
                    breaker.record_success();
                }
                if let SettleMode::Mark { retention } = self.settle
                    && last_purge.elapsed() > Duration::from_secs(60)
                {
                    last_purge = tokio::time::Instant::now();
                    if let Err(error) = self.source.purge_published(retention).await {
                        tracing::warn!(%error, "purging published rows failed");
                    }
                }
                tokio::select! {
                    _ = self.source.wait_for_work() => {}
                    _ = leases_changed.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            let grace = self.config.shutdown_grace;
            let mut shutdown_in_batch = shutdown.clone();
            let report = tokio::select! {
                report = self.process(&batch) => report,
                _ = async {
                    while !*shutdown_in_batch.borrow() {
                        if shutdown_in_batch.changed().await.is_err() { break; }
                    }
                    tokio::time::sleep(grace).await;
                } => {
                    tracing::warn!(events = batch.events.len(), "shutdown grace period over with publishes in flight; they will be republished");
                    break;
                }
            };
            if !report.delivered.is_empty() || report.transient == 0 {
                breaker.record_success();
            } else if breaker.record_failure() == BreakerState::Closed {
                // Not yet open: still pause briefly so a failing broker is not retried in a tight loop.
                sleep_or_shutdown(self.config.retry_backoff_initial, &mut shutdown).await;
            }
        }
        self.stats.set_breaker(BreakerState::Closed);

        keeper.abort();
        if let Err(error) = self.leases.leave(&self.lease_pool).await {
            tracing::warn!(%error, "could not release leases on shutdown; they expire on their own");
        }
        self.sink.close().await;
        let summary = self.stats.summary();
        tracing::info!(?summary, "relay stopped");
        Ok(summary)
    }

    async fn release_extra_partitions(&self, state: &Mutex<LeaseState>) -> Owned {
        let mut state = state.lock().await;
        if state.fair_share > 0 && state.owned.len() > state.fair_share {
            let extra: Vec<u32> = state
                .owned
                .keys()
                .rev()
                .take(state.owned.len() - state.fair_share)
                .copied()
                .collect();
            match self.leases.release(&self.lease_pool, &extra).await {
                Ok(()) => {
                    for p in &extra {
                        state.owned.remove(p);
                    }
                }
                Err(error) => tracing::warn!(%error, "releasing extra partitions failed"),
            }
        }
        state.owned.clone()
    }

    /// Publish a batch in per-key lanes, record rejections, settle the delivered.
    async fn process(&self, batch: &Batch) -> BatchReport {
        let fences = &batch.fences;
        let lanes: Vec<_> = lanes_by_key(&batch.events)
            .into_iter()
            .map(|lane| self.publish_lane(lane, fences))
            .collect();
        let reports: Vec<BatchReport> = futures_util::stream::iter(lanes)
            .buffer_unordered(self.config.max_in_flight)
            .collect()
            .await;
        let mut total = BatchReport::default();
        for report in reports {
            total.delivered.extend(report.delivered);
            total.transient += report.transient;
        }
        total.delivered.sort_unstable();
        match self.source.settle(&batch.fences, &total.delivered).await {
            Ok(settled) => {
                self.stats
                    .published
                    .fetch_add(settled.len() as u64, Ordering::Relaxed);
                let lost = total.delivered.len() - settled.len();
                if lost > 0 {
                    self.stats
                        .unsettled
                        .fetch_add(lost as u64, Ordering::Relaxed);
                    tracing::warn!(
                        lost,
                        "published events not settled: their partition moved to another relay, which republishes them"
                    );
                }
            }
            Err(error) => {
                // Published but not settled: they will be published again (at-least-once).
                tracing::warn!(%error, events = total.delivered.len(), "settling failed; the events will be republished");
                total.transient += 1;
            }
        }
        total
    }

    async fn publish_lane(&self, lane: Vec<&ClaimedEvent>, fences: &Owned) -> BatchReport {
        let mut report = BatchReport::default();
        for claimed in lane {
            let event = &claimed.event;
            let route = self.router.route(event);
            match self.sink.publish(event, &route).await {
                Outcome::Delivered => report.delivered.push(event.sequence),
                Outcome::Retry(error) => {
                    self.stats
                        .transient_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(sequence = event.sequence, %error, "publish failed transiently");
                    report.transient += 1;
                    break;
                }
                Outcome::Rejected(error) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    let backoff = Backoff::delay_for(
                        self.config.retry_backoff_initial,
                        self.config.retry_backoff_max,
                        event.attempts.max(0) as u32,
                    );
                    match self
                        .source
                        .reject(
                            fences,
                            event,
                            &error.message,
                            self.config.max_attempts,
                            backoff,
                        )
                        .await
                    {
                        Ok(RejectionVerdict::DeadLettered) => {
                            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                sequence = event.sequence,
                                event_id = %event.event_id,
                                event_type = %event.event_type,
                                attempts = event.attempts + 1,
                                %error,
                                "event dead-lettered; its key continues"
                            );
                            continue;
                        }
                        Ok(RejectionVerdict::WillRetry { attempts }) => {
                            tracing::warn!(
                                sequence = event.sequence,
                                event_id = %event.event_id,
                                attempts,
                                retry_in_ms = backoff.as_millis() as u64,
                                %error,
                                "broker rejected the event; its key waits for the retry"
                            );
                        }
                        Ok(RejectionVerdict::Blocked) => {
                            self.stats.blocked.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                sequence = event.sequence,
                                event_id = %event.event_id,
                                event_type = %event.event_type,
                                partition_key = %event.partition_key,
                                %error,
                                "event blocked after its last attempt; its key waits for `outbox-relay dead-letters retry`"
                            );
                        }
                        Ok(RejectionVerdict::NotOwned) => {}
                        Err(db_error) => {
                            tracing::warn!(%db_error, "could not record the rejection; will retry");
                            report.transient += 1;
                        }
                    }
                    break;
                }
            }
        }
        report
    }
}

/// Group a batch into lanes, one per partition key, each in sequence order.
fn lanes_by_key(events: &[ClaimedEvent]) -> Vec<Vec<&ClaimedEvent>> {
    let mut lanes: Vec<Vec<&ClaimedEvent>> = Vec::new();
    let mut lane_of_key: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for claimed in events {
        let index = *lane_of_key
            .entry(claimed.event.partition_key.as_str())
            .or_insert_with(|| {
                lanes.push(Vec::new());
                lanes.len() - 1
            });
        lanes[index].push(claimed);
    }
    lanes
}

async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.changed() => {}
    }
}

/// Heartbeat and renew leases every third of the lease period; take free partitions.
async fn keep_leases(
    stats: Arc<RelayStats>,
    leases: Arc<PartitionLeases>,
    pool: PgPool,
    state: Arc<Mutex<LeaseState>>,
    changed: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = leases.lease() / 3;
    loop {
        {
            let mut state = state.lock().await;
            stats.lease_rounds.fetch_add(1, Ordering::Relaxed);
            match leases.maintain(&pool, &state.owned).await {
                Ok((owned, fair)) => {
                    let grew = owned.keys().any(|p| !state.owned.contains_key(p));
                    state.owned = owned;
                    state.fair_share = fair;
                    stats
                        .partitions_held
                        .store(state.owned.len() as u64, Ordering::Relaxed);
                    if grew {
                        changed.notify_one();
                    }
                }
                Err(error) => tracing::warn!(%error, "lease maintenance failed; retrying"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
    }
}
