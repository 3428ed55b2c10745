//! Connects the source to the sink: claims batches, publishes them in per-key
//! lanes, settles what the broker confirmed.
//!
//! Per-key order: within a batch the events of one key form a lane, published one
//! after another, each only after its predecessor's confirm; different keys
//! publish concurrently up to `max_in_flight`. A lane stops at the first event
//! that is not delivered (broker trouble, or a rejection that will be retried),
//! so no event overtakes its predecessor; those rows stay unsettled and come back
//! in a later batch. Only a dead-lettered event lets its key move on.
//!
//! Crashes (failpoints of the `failpoints` feature): after a claim
//! (`polling.claim`) or after a broker confirm before the settle
//! (`polling.publish.confirmed`) the rows stay claimed until their lease
//! expires and are published again by whoever owns their partition then;
//! right after handing partitions over (`polling.lease.handover`) the new owner
//! claims them at once and the crashed relay's own leases expire. Only events
//! claimed and not settled are sent twice: at most `polling.batch_size`.
//! On SIGTERM, closing leases and the broker connection is bounded by
//! `CLOSE_TIMEOUT` each, after the grace period.
//!
//! Size: over 600 lines because the loop is one piece until it and
//! `wal_pipeline.rs` become the one loop of issue 13; what they share already
//! lives in `ledger.rs`, `lanes.rs`, `crate::stats` and `crate::resilience`.

pub(crate) mod lanes;
pub(crate) mod ledger;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Mutex, Notify, watch};

use crate::config::PipelineConfig;
use crate::error::Result;
use crate::event::OutboxEvent;
use crate::failpoint::failpoint;
use crate::resilience::{Backoff, BreakerState, CircuitBreaker};
use crate::route::{Route, Router};
use crate::sink::{Outcome, Sink};
use crate::source::polling::lease::{Owned, PartitionLeases};
use crate::source::polling::{ClaimedEvent, PollingSource, RejectionVerdict, Wakeup};
use crate::stats::{RelayStats, RunSummary};
use lanes::{Keyed, Lanes};
use ledger::{AnyOrder, Finished, Ledger, UnitId};
use tracing::Instrument as _;

#[derive(Debug, Default)]
struct LeaseState {
    owned: Owned,
    fair_share: usize,
}

/// A claimed event in its key's lane, with the claim it came in.
#[derive(Debug)]
struct LaneItem {
    unit: UnitId,
    fences: Arc<Owned>,
    claimed: ClaimedEvent,
}

impl Keyed for LaneItem {
    fn key(&self) -> String {
        self.claimed.event.partition_key.clone()
    }
}

/// What one key's lane did: how each of its events left the lane, in order.
#[derive(Debug)]
struct LaneDone {
    key: String,
    finished: Vec<(UnitId, i64, Finished)>,
    transient: u64,
}

impl LaneDone {
    fn delivered(&self) -> usize {
        self.finished
            .iter()
            .filter(|(_, _, finished)| *finished == Finished::Delivered)
            .count()
    }

    /// The lane stopped before its last event: the rest of its key must wait.
    fn stopped(&self) -> bool {
        self.finished
            .last()
            .is_some_and(|(_, _, finished)| *finished == Finished::Released)
    }
}

/// Claims in flight: settled in any order, each under its own lease fences.
type ClaimLedger = Ledger<Arc<Owned>, AnyOrder>;

/// Everything one running relay instance needs.
pub(crate) struct Pipeline<S: Sink> {
    pub(crate) source: Arc<PollingSource>,
    pub(crate) wakeup: Option<Wakeup>,
    pub(crate) sink: Arc<S>,
    pub(crate) router: Router,
    pub(crate) config: PipelineConfig,
    pub(crate) leases: Arc<PartitionLeases>,
    pub(crate) lease_pool: PgPool,
    pub(crate) stats: Arc<RelayStats>,
}

/// The parts a lane task needs, shared.
struct LaneContext<S: Sink> {
    /// At most `max_in_flight` lanes publish at once.
    publishing: tokio::sync::Semaphore,
    source: Arc<PollingSource>,
    sink: Arc<S>,
    router: Router,
    config: PipelineConfig,
    stats: Arc<RelayStats>,
}

/// Keys skipped by half-open probes at most (beyond that, probes take any key again).
const MAX_PROBE_SUSPECTS: usize = 64;

/// Settle at most this many delivered events per statement; settle at least this often.
const SETTLE_MAX_EVENTS: usize = 1_000;
const SETTLE_INTERVAL: Duration = Duration::from_millis(20);

impl<S: Sink> Pipeline<S> {
    /// Run until `shutdown` is true, then finish and settle in-flight work within the grace period.
    ///
    /// Lanes run as tasks: a key's lane publishes its claimed events one after
    /// another; new claims skip keys whose lane is still publishing or settling, so
    /// a slow destination only holds its own keys, never the others.
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
        let mut wakeup = self
            .wakeup
            .take()
            .ok_or_else(|| crate::RelayError::Database {
                operation: "starting the relay loop",
                source: sqlx::Error::Protocol("the pipeline was started twice".into()),
            })?;
        let context = Arc::new(LaneContext {
            publishing: tokio::sync::Semaphore::new(self.config.max_in_flight),
            source: self.source.clone(),
            sink: self.sink.clone(),
            router: self.router.clone(),
            config: self.config.clone(),
            stats: self.stats.clone(),
        });
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<LaneDone>();
        // One task per key with the key's whole claim (a key is in one claim at a time).
        let mut lanes: Lanes<LaneItem> = Lanes::new(usize::MAX);
        let mut busy: std::collections::HashSet<String> = std::collections::HashSet::new();
        // The unit and size of each key's running lane, for a lane that fails.
        let mut lane_units: std::collections::HashMap<String, (UnitId, usize)> =
            std::collections::HashMap::new();
        // Claimed events not yet settled: the window that can be published twice after a crash.
        let mut ledger = ClaimLedger::default();
        let mut round = Round::default();
        // Keys whose event failed a half-open probe: later probes try other keys, so
        // one event that the broker keeps refusing (a nack, a closed channel) cannot
        // keep the breaker open for every key by being the oldest, probe after probe.
        let mut probe_suspects: Vec<String> = Vec::new();
        let mut probe_key: Option<String> = None;

        let mut breaker = CircuitBreaker::new(
            self.config.breaker_failure_threshold,
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        let mut db_backoff = Backoff::new(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        let mut draining_since: Option<tokio::time::Instant> = None;
        let mut last_settle = tokio::time::Instant::now();
        let mut settle_tick = tokio::time::interval(SETTLE_INTERVAL);
        settle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            self.stats.beat();
            // Collect finished lanes first, then reap their tasks (a finished task has sent its result).
            while let Ok(done) = done_rx.try_recv() {
                round.collect(done, &mut ledger, &mut lanes, &mut lane_units);
            }
            // Reap finished tasks; a lane that panicked frees its key (its rows are claimed again).
            for (key, error) in lanes.reap() {
                tracing::error!(%error, key, "a publishing lane failed; its events will be claimed again");
                busy.remove(&key);
                if let Some((unit, claimed)) = lane_units.remove(&key) {
                    ledger.abandon(unit, claimed);
                }
            }
            let stopping = *shutdown.borrow();
            if stopping && draining_since.is_none() {
                draining_since = Some(tokio::time::Instant::now());
            }
            if stopping && lanes.is_idle() {
                self.settle(&context.source, &mut ledger, &mut busy).await;
                break;
            }
            if let Some(since) = draining_since
                && since.elapsed() > self.config.shutdown_grace
            {
                tracing::warn!(
                    lanes = lanes.running(),
                    "shutdown grace period over with publishes in flight; they will be republished"
                );
                lanes.abort_all();
                while let Ok(done) = done_rx.try_recv() {
                    round.collect(done, &mut ledger, &mut lanes, &mut lane_units);
                }
                self.settle(&context.source, &mut ledger, &mut busy).await;
                break;
            }

            // Claim more work when there is room, the breaker allows it and no
            // operator paused this instance group (in-flight events still finish).
            let mut claimed_any = false;
            let mut claim_wait = Duration::ZERO;
            let batch_size = context.source.batch_size();
            let paused = self.stats.paused.load(Ordering::Relaxed);
            // Refill when half the window is free, so claims stay large.
            if !stopping && !paused && ledger.in_flight() <= batch_size / 2 {
                self.stats.set_breaker(breaker.state());
                claim_wait = breaker.wait();
                if claim_wait.is_zero() {
                    self.stats.set_breaker(breaker.state());
                    let probe = breaker.state() == BreakerState::HalfOpen;
                    // A probe goes alone: claim it only when nothing else is in flight.
                    if !probe || (lanes.is_idle() && ledger.finished_lanes() == 0) {
                        let owned = self.release_extra_partitions(&state, lanes.is_idle()).await;
                        let limit = if probe {
                            1
                        } else {
                            batch_size - ledger.in_flight()
                        };
                        let mut busy_keys: Vec<String> = busy.iter().cloned().collect();
                        if probe {
                            busy_keys.extend(probe_suspects.iter().cloned());
                        }
                        self.stats
                            .polling
                            .claim_queries
                            .fetch_add(1, Ordering::Relaxed);
                        let claim = context
                            .source
                            .claim(&owned, Some(limit), &busy_keys)
                            .instrument(tracing::info_span!("claim", limit));
                        match claim.await {
                            Ok(batch) => {
                                db_backoff.reset();
                                self.stats.database_reachable.store(true, Ordering::Relaxed);
                                if !batch.events.is_empty() {
                                    failpoint!("polling.claim");
                                    claimed_any = true;
                                    wakeup.found_work();
                                    probe_key =
                                        probe.then(|| batch.events[0].event.partition_key.clone());
                                    self.stats.polling.batches.fetch_add(1, Ordering::Relaxed);
                                    let fences = Arc::new(batch.fences);
                                    let unit = ledger.admit(fences.clone(), batch.events.len());
                                    for claimed in batch.events {
                                        busy.insert(claimed.event.partition_key.clone());
                                        lanes.add(LaneItem {
                                            unit,
                                            fences: fences.clone(),
                                            claimed,
                                        });
                                    }
                                    lanes.spawn_ready(|key, items| {
                                        let lane_unit =
                                            items.first().map_or(unit, |item| item.unit);
                                        lane_units.insert(key.clone(), (lane_unit, items.len()));
                                        let (context, done_tx) = (context.clone(), done_tx.clone());
                                        async move {
                                            let done = context.publish_lane(key, items).await;
                                            let _ = done_tx.send(done);
                                        }
                                    });
                                } else if probe {
                                    // Nothing (else) to probe with: the next event decides.
                                    probe_suspects.clear();
                                    breaker.record_success();
                                }
                            }
                            Err(error) => {
                                claim_wait = db_backoff.next_delay();
                                self.stats.database_errors.fetch_add(1, Ordering::Relaxed);
                                self.stats
                                    .database_reachable
                                    .store(false, Ordering::Relaxed);
                                tracing::warn!(error = %error, retry_in_ms = claim_wait.as_millis() as u64, "claiming failed");
                            }
                        }
                    }
                }
            }

            // Collect finished lanes; settle in groups.
            while let Ok(done) = done_rx.try_recv() {
                round.collect(done, &mut ledger, &mut lanes, &mut lane_units);
            }
            // Settle in groups: when every lane is done, when a quarter batch waits, or at the tick.
            if ledger.finished_lanes() > 0
                && (lanes.is_idle()
                    || ledger.finished_unsettled() >= (batch_size / 4).max(1)
                    || ledger.delivered_unsettled() >= SETTLE_MAX_EVENTS
                    || last_settle.elapsed() >= SETTLE_INTERVAL)
            {
                last_settle = tokio::time::Instant::now();
                self.settle(&context.source, &mut ledger, &mut busy).await;
                let probed = probe_key.take();
                if round.delivered > 0 || round.transient == 0 {
                    probe_suspects.clear();
                    breaker.record_success();
                } else {
                    if let Some(key) = probed
                        && probe_suspects.len() < MAX_PROBE_SUSPECTS
                    {
                        tracing::info!(
                            partition_key = %key,
                            "the breaker's probe failed; the next probe tries another key"
                        );
                        probe_suspects.push(key);
                    }
                    if breaker.record_failure() == BreakerState::Closed {
                        claim_wait = claim_wait.max(self.config.retry_backoff_initial);
                    }
                }
                round = Round::default();
            }
            if claimed_any && ledger.in_flight() <= batch_size / 2 {
                continue;
            }

            // Wait for something to do.
            if lanes.is_idle() && ledger.finished_lanes() == 0 {
                if stopping {
                    continue;
                }
                if !claim_wait.is_zero() {
                    sleep_or_shutdown(claim_wait, &mut shutdown).await;
                    continue;
                }
                tokio::select! {
                    _ = wakeup.wait_for_work() => {}
                    _ = leases_changed.notified() => {}
                    _ = shutdown.changed() => {}
                }
            } else {
                tokio::select! {
                    done = done_rx.recv() => {
                        if let Some(done) = done {
                            round.collect(done, &mut ledger, &mut lanes, &mut lane_units);
                        }
                    }
                    _ = settle_tick.tick() => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        drop(done_tx);
        lanes.shutdown().await;
        self.stats.set_breaker(BreakerState::Closed);

        keeper.abort();
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
        crate::sink::close_sink(&*self.sink).await;
        let summary = self.stats.summary();
        tracing::info!(?summary, "relay stopped");
        Ok(summary)
    }

    /// Settle what finished lanes delivered (any order, each claim under its own
    /// fences), then free their keys for new claims.
    async fn settle(
        &self,
        source: &PollingSource,
        ledger: &mut ClaimLedger,
        busy: &mut std::collections::HashSet<String>,
    ) {
        let settlement = ledger.take_finished();
        for (fences, mut sequences) in settlement.units {
            sequences.sort_unstable();
            match source.settle(&fences, &sequences).await {
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
        for key in settlement.keys {
            busy.remove(&key);
        }
    }

    async fn release_extra_partitions(&self, state: &Mutex<LeaseState>, idle: bool) -> Owned {
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
            match self.leases.release(&self.lease_pool, &extra).await {
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
}

impl<S: Sink> LaneContext<S> {
    /// Publish the decodable events at the start of `items` as one run (as many as
    /// the sink overlaps; one when it allows one per key): the verdicts of a
    /// delivered prefix and of the first event that was not delivered.
    async fn publish_run(&self, items: &[LaneItem]) -> Vec<Outcome> {
        let limit = if self.sink.max_in_flight_per_key() > 1 {
            items.len()
        } else {
            1
        };
        let run: Vec<(&OutboxEvent, Route)> = items
            .iter()
            .take(limit)
            .map_while(|item| {
                let event = &item.claimed.event;
                item.claimed
                    .undecodable
                    .is_none()
                    .then(|| (event, self.router.route(event)))
            })
            .collect();
        self.sink.publish_run(&run).await
    }

    /// Publish one key's events in order, each after its predecessor's confirm;
    /// stop at the first one that is not delivered.
    async fn publish_lane(&self, key: String, lane: Vec<LaneItem>) -> LaneDone {
        let mut done = LaneDone {
            key,
            finished: Vec::with_capacity(lane.len()),
            transient: 0,
        };
        // The semaphore is never closed; if it were, publishing without a permit is still correct.
        let _permit = self.publishing.acquire().await.ok();
        // Verdicts of events published as one run, for the events in order.
        let mut verdicts: VecDeque<Outcome> = VecDeque::new();
        for (index, item) in lane.iter().enumerate() {
            let (claimed, unit) = (&item.claimed, item.unit);
            let event = &claimed.event;
            let outcome = match &claimed.undecodable {
                // A row that is not an event goes to the dead-letter table as it is.
                Some(reason) => {
                    Outcome::Rejected(crate::sink::SinkError::permanent(reason.clone()))
                }
                None => match verdicts.pop_front() {
                    Some(outcome) => outcome,
                    None => {
                        verdicts = self.publish_run(&lane[index..]).await.into();
                        verdicts.pop_front().unwrap_or_else(|| {
                            Outcome::Retry(crate::sink::SinkError::new(
                                "the sink gave no verdict for the event; it will be published again",
                            ))
                        })
                    }
                },
            };
            match outcome {
                Outcome::Delivered => {
                    failpoint!("polling.publish.confirmed");
                    done.finished
                        .push((unit, event.sequence, Finished::Delivered))
                }
                Outcome::Retry(error) => {
                    self.stats
                        .transient_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(sequence = event.sequence, %error, "publish failed transiently");
                    done.transient += 1;
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
                            &item.fences,
                            event,
                            &error.message,
                            self.config.max_attempts,
                            backoff,
                            error.is_permanent(),
                        )
                        .await
                    {
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
                            done.finished
                                .push((unit, event.sequence, Finished::DeadLettered));
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
                            done.transient += 1;
                        }
                    }
                    break;
                }
            }
        }
        // The lane stopped: this event and the rest of the key's lane were not
        // delivered; their rows stay and are claimed again, in order.
        for item in &lane[done.finished.len()..] {
            done.finished
                .push((item.unit, item.claimed.event.sequence, Finished::Released));
        }
        done
    }
}

/// What the lanes finished since the last settle did, for the breaker.
#[derive(Debug, Default)]
struct Round {
    delivered: usize,
    transient: u64,
}

impl Round {
    /// Record a lane's result in the ledger and the round. A lane that stopped
    /// drops whatever of its key is still queued (released: claimed again, in
    /// order); the key leaves the lanes once nothing of it is left, and claims
    /// again only after the settle that follows.
    fn collect(
        &mut self,
        done: LaneDone,
        ledger: &mut ClaimLedger,
        lanes: &mut Lanes<LaneItem>,
        lane_units: &mut std::collections::HashMap<String, (UnitId, usize)>,
    ) {
        self.delivered += done.delivered();
        self.transient += done.transient;
        lane_units.remove(&done.key);
        if done.stopped() {
            for item in lanes.release(&done.key) {
                ledger.finish(item.unit, item.claimed.event.sequence, Finished::Released);
            }
        }
        for (unit, sequence, finished) in done.finished {
            ledger.finish(unit, sequence, finished);
        }
        if lanes.finished(&done.key) {
            ledger.lane_finished(done.key);
        }
    }
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
