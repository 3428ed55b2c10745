//! The polling source as the relay loop sees it ([`crate::source::Source`]):
//! claims of leased partitions are its units, settled in any order.
//!
//! * **Claim**: within the window's room, outside the keys in flight (a key
//!   stays in flight from its claim until its rows are settled, so a re-claim
//!   never publishes its later rows while delivered ones are still in the
//!   table); a half-open breaker's probe claims one event. After a claim that
//!   found nothing the next waits for the wake-up (adaptive polling, NOTIFY)
//!   when the loop is quiet, else about a settle interval; a settle that frees
//!   keys lets the next claim go at once.
//! * **Retry**: [`RetryMode::Release`]: broker trouble stops the lane, the rows
//!   stay and are claimed again. A rejection keeps its attempts and backoff on
//!   the row (`available_at`), then dead-letters or (`block`) parks it.
//! * **Leases**: upkeep is this source's own task (`keep_leases`); extra
//!   partitions are handed over only with no lane running.
//!
//! Crashes (failpoints of the `failpoints` feature): after a claim
//! (`polling.claim`) or after a broker confirm before the settle
//! (`polling.publish.confirmed`) the rows stay claimed until their lease
//! expires and are published again by whoever owns their partition then;
//! right after handing partitions over (`polling.lease.handover`) the new owner
//! claims them at once and the crashed relay's own leases expire. Only events
//! claimed and not settled are sent twice: at most `polling.batch_size`.
//! On SIGTERM, closing leases is bounded by `CLOSE_TIMEOUT`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::PgPool;
use tokio::sync::{Mutex, Notify, watch};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::PipelineConfig;
use crate::error::Result;
use crate::event::OutboxEvent;
use crate::failpoint::failpoint;
use crate::pipeline::SETTLE_INTERVAL;
use crate::pipeline::lanes::Keyed;
use crate::pipeline::ledger::AnyOrder;
use crate::resilience::Backoff;
use crate::sink::SinkError;
use crate::source::polling::lease::{Owned, PartitionLeases};
use crate::source::polling::{Batch, ClaimedEvent, PollingSource, RejectionVerdict, Wakeup};
use crate::source::{
    Admission, LaneItem, LaneWork, Next, RetryMode, SettleWhen, Settled, Source, SourceLedger,
    Stop, Unit, Verdict, Window,
};
use crate::stats::RelayStats;

/// Settle at once when this many delivered events wait.
const SETTLE_MAX_EVENTS: usize = 1_000;

#[derive(Debug, Default)]
struct LeaseState {
    owned: Owned,
    fair_share: usize,
}

type Claim = Pin<Box<dyn Future<Output = Result<Batch>> + Send>>;

/// Why the next claim waits.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// The last claim found nothing.
    Empty { at: Instant },
    /// The last claim failed: back off when quiet.
    Failed { at: Instant, retry_at: Instant },
}

/// The polling source of one relay loop.
pub(crate) struct PollingClaims {
    source: Arc<PollingSource>,
    lanes: Arc<PollingLanes>,
    wakeup: Wakeup,
    leases: Arc<PartitionLeases>,
    lease_pool: PgPool,
    state: Arc<Mutex<LeaseState>>,
    leases_changed: Arc<Notify>,
    keeper: tokio::task::JoinHandle<()>,
    stats: Arc<RelayStats>,
    /// Keys claimed and not yet settled: kept out of new claims.
    busy: HashSet<String>,
    db_backoff: Backoff,
    hold: Option<Hold>,
    /// A claim under way (and whether it is a probe), resumed when the loop's
    /// select cancelled it.
    claim: Option<(Claim, bool)>,
    last_settle: Instant,
}

impl PollingClaims {
    /// Register this instance, start the lease upkeep and claim from `source`.
    pub(crate) async fn start(
        mut source: PollingSource,
        leases: Arc<PartitionLeases>,
        lease_pool: PgPool,
        config: &PipelineConfig,
        stats: Arc<RelayStats>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<PollingClaims> {
        leases.register(&lease_pool).await?;
        let wakeup = source.take_wakeup();
        let source = Arc::new(source);
        let state = Arc::new(Mutex::new(LeaseState::default()));
        let leases_changed = Arc::new(Notify::new());
        stats.beat();
        let keeper = tokio::spawn(keep_leases(
            stats.clone(),
            leases.clone(),
            lease_pool.clone(),
            state.clone(),
            leases_changed.clone(),
            shutdown,
        ));
        Ok(PollingClaims {
            lanes: Arc::new(PollingLanes {
                source: source.clone(),
                config: config.clone(),
                stats: stats.clone(),
            }),
            source,
            wakeup,
            leases,
            lease_pool,
            state,
            leases_changed,
            keeper,
            db_backoff: Backoff::new(config.retry_backoff_initial, config.retry_backoff_max),
            stats,
            busy: HashSet::new(),
            hold: None,
            claim: None,
            last_settle: Instant::now(),
        })
    }

    /// Wait as the last claim asks; cancel-safe (every wait is to a stored deadline).
    async fn wait_for_claim(&mut self, admission: &Admission) {
        match self.hold {
            None => {}
            Some(Hold::Empty { at }) if !admission.quiet => {
                tokio::time::sleep_until(at + SETTLE_INTERVAL).await
            }
            Some(Hold::Empty { .. }) => {
                tokio::select! {
                    _ = self.wakeup.wait_for_work() => {}
                    _ = self.leases_changed.notified() => {}
                }
            }
            Some(Hold::Failed { at, .. }) if !admission.quiet => {
                tokio::time::sleep_until(at + SETTLE_INTERVAL).await
            }
            Some(Hold::Failed { retry_at, .. }) => tokio::time::sleep_until(retry_at).await,
        }
        self.hold = None;
    }

    /// The claim to run: hand extra partitions over first when nothing runs.
    fn claim(&self, admission: &Admission) -> Claim {
        let (source, leases, pool, state) = (
            self.source.clone(),
            self.leases.clone(),
            self.lease_pool.clone(),
            self.state.clone(),
        );
        let idle = admission.lanes_idle;
        let limit = admission.room.min(self.source.batch_size());
        let mut busy: Vec<String> = self.busy.iter().cloned().collect();
        busy.extend(admission.skip_keys.iter().cloned());
        self.stats
            .polling
            .claim_queries
            .fetch_add(1, Ordering::Relaxed);
        Box::pin(
            async move {
                let owned = release_extra_partitions(&leases, &pool, &state, idle).await;
                source.claim(&owned, Some(limit), &busy).await
            }
            .instrument(tracing::info_span!("claim", limit)),
        )
    }
}

impl Source for PollingClaims {
    type Token = Owned;
    type Item = ClaimedEvent;
    type View = AnyOrder;
    type Lanes = PollingLanes;
    const RETRY: RetryMode = RetryMode::Release;
    /// A task gets its key's whole claim (a key is in one claim at a time).
    const LANE_CHUNK: usize = usize::MAX;

    fn lane_work(&self) -> Arc<PollingLanes> {
        self.lanes.clone()
    }

    /// Refill when half the window is free, so claims stay large.
    fn window(&self) -> Window {
        let batch_size = self.source.batch_size();
        Window {
            limit: batch_size,
            refill_below: batch_size / 2 + 1,
        }
    }

    fn alarm(&self, _ending: bool) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    async fn check(&mut self, _ending: bool) -> Option<Stop> {
        None
    }

    async fn next(&mut self, admission: Admission) -> Next<Owned, ClaimedEvent> {
        loop {
            // A claim started for another kind of admission (a probe, or not) is
            // not resumed: a probe claims one event alone.
            if self
                .claim
                .as_ref()
                .is_some_and(|(_, probe)| *probe != admission.probe)
            {
                self.claim = None;
            }
            if self.claim.is_none() {
                self.wait_for_claim(&admission).await;
                self.claim = Some((self.claim(&admission), admission.probe));
            }
            let Some((claim, _)) = self.claim.as_mut() else {
                continue;
            };
            let claimed = claim.await;
            self.claim = None;
            match claimed {
                Ok(batch) => {
                    self.db_backoff.reset();
                    self.stats.database_reachable.store(true, Ordering::Relaxed);
                    if batch.events.is_empty() {
                        self.hold = Some(Hold::Empty { at: Instant::now() });
                        return Next::Idle;
                    }
                    failpoint!("polling.claim");
                    self.wakeup.found_work();
                    self.stats.polling.batches.fetch_add(1, Ordering::Relaxed);
                    for claimed in &batch.events {
                        self.busy.insert(claimed.event.partition_key.clone());
                    }
                    return Next::Unit(Unit {
                        token: batch.fences,
                        items: batch.events,
                    });
                }
                Err(error) => {
                    let delay = self.db_backoff.next_delay();
                    let at = Instant::now();
                    self.hold = Some(Hold::Failed {
                        at,
                        retry_at: at + delay,
                    });
                    self.stats.database_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .database_reachable
                        .store(false, Ordering::Relaxed);
                    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "claiming failed");
                }
            }
        }
    }

    /// Settle in groups: when every lane is done, when a quarter batch waits,
    /// when many delivered events wait, or at the tick.
    fn settle_due(&self, ledger: &SourceLedger<Self>, lanes_idle: bool) -> bool {
        ledger.finished_lanes() > 0
            && (lanes_idle
                || ledger.finished_unsettled() >= (self.source.batch_size() / 4).max(1)
                || ledger.delivered_unsettled() >= SETTLE_MAX_EVENTS
                || self.last_settle.elapsed() >= SETTLE_INTERVAL)
    }

    /// Settle what finished lanes delivered (any order, each claim under its own
    /// fences), then free their keys for new claims.
    async fn settle(&mut self, ledger: &mut SourceLedger<Self>, when: SettleWhen) -> Settled {
        if when != SettleWhen::Last && ledger.finished_lanes() == 0 {
            return Settled::Nothing;
        }
        self.last_settle = Instant::now();
        let settlement = ledger.take_finished();
        for (fences, mut sequences) in settlement.units {
            sequences.sort_unstable();
            match self.source.settle(&fences, &sequences).await {
                Ok(settled) => {
                    self.stats
                        .published
                        .fetch_add(settled.len() as u64, Ordering::Relaxed);
                    let lost = sequences.len() - settled.len();
                    if lost > 0 {
                        self.stats
                            .polling
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
                    tracing::warn!(%error, events = sequences.len(), "settling failed; the events will be republished");
                }
            }
        }
        // Only now: a key freed before its rows are settled could be claimed again
        // and publish its later rows while the delivered ones are still there.
        for key in &settlement.keys {
            self.busy.remove(key);
        }
        if !settlement.keys.is_empty() && matches!(self.hold, Some(Hold::Empty { .. })) {
            self.hold = None;
        }
        Settled::Done
    }

    async fn close(self, _graceful: bool) {
        self.keeper.abort();
        // Bounded, like closing the sink: the leases expire on their own anyway.
        match tokio::time::timeout(
            crate::resilience::CLOSE_TIMEOUT,
            self.leases.leave(&self.lease_pool),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not release leases on shutdown; they expire on their own")
            }
            Err(_) => {
                tracing::warn!("releasing leases on shutdown timed out; they expire on their own")
            }
        }
    }
}

impl Keyed for ClaimedEvent {
    fn key(&self) -> String {
        self.event.partition_key.clone()
    }
}

impl LaneItem for ClaimedEvent {
    fn event(&self) -> Option<&OutboxEvent> {
        self.undecodable.is_none().then_some(&self.event)
    }

    fn sequence(&self) -> i64 {
        self.event.sequence
    }
}

/// What the polling lanes share: the rejection rule, attempts kept on the row.
pub(crate) struct PollingLanes {
    source: Arc<PollingSource>,
    config: PipelineConfig,
    stats: Arc<RelayStats>,
}

impl LaneWork for PollingLanes {
    type Token = Owned;
    type Item = ClaimedEvent;

    /// Record the rejection on the row (backoff in `available_at`); dead-letter
    /// or park it after its last attempt.
    async fn reject(
        &self,
        fences: &Owned,
        claimed: &mut ClaimedEvent,
        error: &SinkError,
    ) -> Verdict {
        let event = &claimed.event;
        let backoff = Backoff::delay_for(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
            event.attempts.max(0) as u32,
        );
        let rejected = self
            .source
            .reject(
                fences,
                event,
                &error.message,
                self.config.max_attempts,
                backoff,
                error.is_permanent(),
            )
            .await;
        match rejected {
            Ok(RejectionVerdict::DeadLettered) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    sequence = event.sequence,
                    event_id = %event.event_id,
                    event_type = %event.event_type,
                    attempts = event.attempts.saturating_add(1),
                    permanent = error.is_permanent(),
                    %error,
                    "event dead-lettered; its key continues"
                );
                Verdict::DeadLettered
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
                Verdict::Release { transient: false }
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
                Verdict::Release { transient: false }
            }
            Ok(RejectionVerdict::NotOwned) => Verdict::Release { transient: false },
            Err(db_error) => {
                tracing::warn!(%db_error, "could not record the rejection; will retry");
                Verdict::Release { transient: true }
            }
        }
    }

    /// A row that is not an event goes to the dead-letter table as it is.
    async fn dispose(&self, fences: &Owned, claimed: &mut ClaimedEvent) -> Verdict {
        let reason = claimed.undecodable.clone().unwrap_or_default();
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        self.reject(fences, claimed, &SinkError::permanent(reason))
            .await
    }

    fn delivered(&self, _claimed: &ClaimedEvent) {
        failpoint!("polling.publish.confirmed");
    }
}

async fn release_extra_partitions(
    leases: &PartitionLeases,
    pool: &PgPool,
    state: &Mutex<LeaseState>,
    idle: bool,
) -> Owned {
    let mut state = state.lock().await;
    // Partitions are only handed over with nothing in flight, so no key of theirs is mid-lane.
    if idle && state.fair_share > 0 && state.owned.len() > state.fair_share {
        let extra: Vec<u32> = state
            .owned
            .keys()
            .rev()
            .take(state.owned.len() - state.fair_share)
            .copied()
            .collect();
        match leases.release(pool, &extra).await {
            Ok(()) => {
                failpoint!("polling.lease.handover");
                for p in &extra {
                    state.owned.remove(p);
                }
            }
            Err(error) => tracing::warn!(%error, "releasing extra partitions failed"),
        }
    }
    state.owned.clone()
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
            stats.polling.lease_rounds.fetch_add(1, Ordering::Relaxed);
            match leases.maintain(&pool, &state.owned).await {
                Ok((owned, fair)) => {
                    let grew = owned.keys().any(|p| !state.owned.contains_key(p));
                    state.owned = owned;
                    state.fair_share = fair;
                    stats
                        .polling
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
