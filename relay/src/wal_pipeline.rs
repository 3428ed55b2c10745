//! The relay loop of the WAL source: one leader per slot streams committed
//! transactions, publishes their events in per-key lanes and confirms the slot
//! position over a contiguous prefix of fully delivered transactions.
//!
//! * **Leader**: an advisory lock per slot ([`Leadership`]); standbys retry it.
//! * **Start**: a healthy slot streams from its recorded confirmed position. A
//!   slot the source had to create (first start) or re-create (it was dropped
//!   or invalidated: reported loudly, never silent) cannot see rows already in
//!   the table, so those are published from the table first (the *table
//!   drain*, in sequence order, a page at a time within the in-flight window),
//!   then the stream follows. Rows committed after the new slot's start may
//!   come twice, never not at all. The drain is durable (see the state machine
//!   in [`crate::source::wal`]): settling a page records its progress, settling
//!   the marker after the last page records `streaming`, and any interruption
//!   resumes the drain where its settled pages end.
//! * **Position**: the confirmed position is recorded at most every 250 ms
//!   (and reported to the server every `status_interval`), so a crash re-sends
//!   at most the in-flight window plus about a quarter second of traffic.
//! * **Stop**: on SIGTERM lanes get `shutdown_grace`; every lane result already
//!   sent is collected before the final settle (else delivered rows would stay
//!   and be sent again), then the position is recorded. Closing the stream,
//!   the leader lock and the broker connection is bounded by [`CLOSE_TIMEOUT`]
//!   each, so a hung broker adds at most a few seconds to the grace.
//! * **Lanes**: events of one partition key are published one after another in
//!   commit order; keys publish concurrently up to `pipeline.max_in_flight`.
//!   Broker trouble is retried in place (the lane's key waits, with backoff and
//!   the circuit breaker); an event the broker rejects is retried up to
//!   `pipeline.max_attempts` and then dead-lettered, and its key moves on. A
//!   [permanent](crate::sink::SinkError::is_permanent) rejection is
//!   dead-lettered at its first attempt.
//! * **Hostile input**: a change that is no event (a WAL message with the
//!   outbox prefix that does not decode, a row with an infinite `created_at`)
//!   is dead-lettered at once with its raw content and the reason, on a lane of
//!   its own key (a malformed message: `wal-message:<lsn>`); its transaction is
//!   confirmed as usual, so the slot moves past it and the stream never stops.
//! * **Confirming**: a transaction is done when each of its events is delivered
//!   or dead-lettered. The done prefix of transactions in commit order is
//!   settled: its table rows are deleted, *then* its end LSN is confirmed to the
//!   slot. So an unconfirmed event always has its row (table mode), and a crash
//!   at any point only re-sends events.
//! * **Window**: at most `wal.max_in_flight_events` events received and not yet
//!   settled (one transaction can exceed it; the stream then pauses until it is
//!   settled). Finished events count until their prefix is settled, so a key
//!   that holds the prefix back (a retried rejection) cannot pile up finished
//!   but unconfirmed events: after a crash at most the window is sent again.
//! * **Errors**: a broken stream or lost database ends the session (lanes get a
//!   short grace to finish) and a new one resumes from the confirmed position.
//!
//! Size: over 600 lines (supervisor, session loop, lane work, settle) until it
//! is folded into the one loop of issue 13 (the supervisor into `source/wal/`);
//! the lanes are `pipeline/lanes.rs`, the settle rule the done-prefix view of
//! `pipeline/ledger.rs`.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::{OverBudget, PipelineConfig, RelayConfig, WalConfig};
use crate::error::Result;
use crate::event::OutboxEvent;
use crate::failpoint::failpoint;
use crate::pipeline::lanes::{Keyed, Lanes};
use crate::pipeline::ledger::{DonePrefix, Finished, Ledger, UnitId};
use crate::resilience::{Backoff, CLOSE_TIMEOUT, CircuitBreaker};
use crate::route::{Route, Router};
use crate::sink::{Outcome, Sink};
use crate::source::wal::leader::Leadership;
use crate::source::wal::rows::WalRows;
use crate::source::wal::{
    Lsn, SlotMonitor, Undecodable, WalError, WalSource, WalStart, WalTransaction,
};
use crate::stats::{RelayStats, RunSummary};

/// Events handed to one lane task at a time (progress is reported per chunk).
const LANE_CHUNK: usize = 128;
/// Settle (delete rows, confirm) at least this often while work is done.
const SETTLE_INTERVAL: Duration = Duration::from_millis(20);
/// Settle at once when this many rows wait.
const SETTLE_MAX_ROWS: usize = 2_000;
/// How often the leader checks that its lock session is alive.
const LEADER_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Longest time lanes get to finish when a session ends because of an error.
const RESTART_GRACE: Duration = Duration::from_secs(5);
/// How often rows a delete did not find are tried again, and for how long.
const STRAY_RETRY_INTERVAL: Duration = Duration::from_millis(200);
const STRAY_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long a streamed row to dead-letter is looked for when it is not visible
/// yet (its commit can reach the stream microseconds before other sessions see it).
const UNDECODABLE_ROW_WAIT: Duration = Duration::from_secs(5);
/// Rows read per page of the table drain.
const DRAIN_PAGE: usize = 1_000;
/// Record the confirmed position at most this often (and at least every
/// `status_interval`): after a crash the stream re-sends the unconfirmed window
/// plus what was confirmed in the last interval.
const POSITION_RECORD_INTERVAL: Duration = Duration::from_millis(250);
/// The WAL relay of one instance.
pub(crate) struct WalRelay<S: Sink> {
    pub(crate) config: RelayConfig,
    pub(crate) wal: WalConfig,
    pub(crate) sink: Arc<S>,
    pub(crate) rows: WalRows,
    pub(crate) stats: Arc<RelayStats>,
}

/// How the WAL relay ended.
#[derive(Debug)]
pub(crate) enum WalRunEnd {
    /// Shut down, or failed for good (the sink is closed).
    Stopped(RunSummary),
    /// The retained-WAL budget was exceeded and the slot dropped: run the
    /// polling source for the rest of the run (the sink is still open).
    FallBackToPolling,
}

/// How a streaming session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown requested; everything possible was settled.
    Shutdown,
    /// The retained-WAL budget was exceeded with `over_budget = "fallback-polling"`.
    Fallback,
    /// Something went wrong that a new session can get past.
    Restart(String),
}

/// One event (or one undecodable change) on its way through a lane.
#[derive(Debug)]
struct Item {
    unit: u64,
    work: Work,
}

/// What a lane does with an item.
#[derive(Debug)]
enum Work {
    /// Publish it until it is delivered or dead-lettered.
    Publish(Publish),
    /// A change that is no event: straight to the dead-letter table, never published.
    DeadLetter {
        undecodable: Undecodable,
        committed_at: DateTime<Utc>,
    },
}

/// An event to publish.
#[derive(Debug)]
struct Publish {
    event: OutboxEvent,
    has_row: bool,
    attempts: u32,
}

impl Keyed for Item {
    /// The lane: the event's partition key; a malformed WAL message has none and
    /// gets a key of its own, so it can hold back nothing.
    fn key(&self) -> String {
        match &self.work {
            Work::Publish(publish) => publish.event.partition_key.clone(),
            Work::DeadLetter {
                undecodable: Undecodable::Row { partition_key, .. },
                ..
            } => partition_key.clone(),
            Work::DeadLetter {
                undecodable: Undecodable::Message(message),
                ..
            } => format!("wal-message:{}", message.lsn),
        }
    }
}

impl Item {
    fn publish(unit: u64, event: OutboxEvent, has_row: bool) -> Item {
        Item {
            unit,
            work: Work::Publish(Publish {
                event,
                has_row,
                attempts: 0,
            }),
        }
    }
}

/// What a lane task finished: per event, its unit and whether it was delivered
/// (`false`: dead-lettered).
#[derive(Debug)]
struct LaneDone {
    key: String,
    finished: Vec<(UnitId, bool)>,
}

/// What settling one transaction (or one page of the table drain) needs.
#[derive(Debug)]
struct WalUnit {
    end_lsn: Option<Lsn>,
    rows: Vec<i64>,
    drain: Option<DrainMark>,
}

/// What settling a unit of the table drain records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainMark {
    /// A page: every drained row up to this sequence is settled with it.
    Page(i64),
    /// The marker after the last page: the whole drain is settled.
    Finished,
}

/// Units in commit order, settled through the ledger's done-prefix view only
/// (a confirmed position confirms everything before it), plus the settle's own
/// retry state.
#[derive(Debug)]
struct Tracker {
    ledger: Ledger<WalUnit, DonePrefix>,
    /// After a failed settle: not before this instant.
    retry_settle_at: Option<Instant>,
    settle_backoff: Backoff,
    /// Rows of confirmed events a delete did not find yet, since when.
    stray_rows: Vec<(i64, Instant)>,
    last_stray_retry: Instant,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            ledger: Ledger::default(),
            retry_settle_at: None,
            settle_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            stray_rows: Vec::new(),
            last_stray_retry: Instant::now(),
        }
    }
}

/// The done prefix of the tracker, to settle.
#[derive(Debug, Default)]
struct PrefixToSettle {
    units: usize,
    rows: Vec<i64>,
    end_lsn: Option<Lsn>,
    delivered: u64,
    /// Highest drain page settled with the prefix.
    drain_after: Option<i64>,
    /// The prefix settles the end of the drain.
    drain_finished: bool,
}

impl Tracker {
    fn push(&mut self, end_lsn: Option<Lsn>, events: usize, rows: Vec<i64>) -> UnitId {
        self.push_unit(end_lsn, events, rows, None)
    }

    fn push_drain(&mut self, mark: DrainMark, events: usize, rows: Vec<i64>) -> UnitId {
        self.push_unit(None, events, rows, Some(mark))
    }

    fn push_unit(
        &mut self,
        end_lsn: Option<Lsn>,
        events: usize,
        rows: Vec<i64>,
        drain: Option<DrainMark>,
    ) -> UnitId {
        self.ledger.admit(
            WalUnit {
                end_lsn,
                rows,
                drain,
            },
            events,
        )
    }

    /// Events received and not yet settled: what `wal.max_in_flight_events` limits.
    fn in_flight(&self) -> usize {
        self.ledger.in_flight()
    }

    /// An event of `unit` was delivered (`false`: dead-lettered).
    fn finish(&mut self, unit: UnitId, delivered: bool) {
        let finished = if delivered {
            Finished::Delivered
        } else {
            Finished::DeadLettered
        };
        // The done-prefix view keeps no sequences: the unit's rows are in its token.
        self.ledger.finish(unit, 0, finished);
    }

    fn done_prefix(&self) -> PrefixToSettle {
        let mut prefix = PrefixToSettle::default();
        for done in self.ledger.done_prefix() {
            let unit = done.token;
            prefix.units += 1;
            prefix.rows.extend_from_slice(&unit.rows);
            prefix.end_lsn = unit.end_lsn.or(prefix.end_lsn);
            prefix.delivered += done.delivered;
            match unit.drain {
                Some(DrainMark::Page(last)) => {
                    prefix.drain_after = Some(prefix.drain_after.unwrap_or(last).max(last));
                }
                Some(DrainMark::Finished) => prefix.drain_finished = true,
                None => {}
            }
        }
        prefix
    }

    fn pop(&mut self, units: usize) {
        self.ledger.pop_prefix(units);
    }

    fn done_rows(&self) -> usize {
        self.ledger
            .done_prefix()
            .map(|done| done.token.rows.len().max(1))
            .sum()
    }
}

/// Shared by the lane tasks of a session.
struct LaneContext<S: Sink> {
    publishing: tokio::sync::Semaphore,
    sink: Arc<S>,
    router: Router,
    config: PipelineConfig,
    rows: WalRows,
    breaker: std::sync::Mutex<CircuitBreaker>,
    stats: Arc<RelayStats>,
}

/// What woke the session loop.
enum Step {
    Shutdown,
    OverBudget,
    Lane(Option<LaneDone>),
    Tick,
    CheckLeader,
    Transaction(std::result::Result<Option<WalTransaction>, WalError>),
}

/// The table drain: rows `after < sequence <= upto` still to dispatch.
#[derive(Debug, Clone, Copy)]
struct Drain {
    after: i64,
    upto: i64,
}

/// What a settle attempt did.
#[derive(Debug, PartialEq, Eq)]
enum Settled {
    /// Nothing to do, or the done prefix was settled.
    Done,
    /// Backing off after a failure; try again later.
    Later,
    /// It failed; try again later.
    Failed,
    /// The server is shutting down.
    ServerGoingDown,
}

const SERVER_GOING_DOWN: &str = "PostgreSQL is shutting down";

/// A WAL error as a session end: retryable ones restart the session.
fn wal_end(error: WalError) -> Result<SessionEnd> {
    if error.is_retryable() {
        Ok(SessionEnd::Restart(error.to_string()))
    } else {
        Err(error.into())
    }
}

impl<S: Sink> WalRelay<S> {
    /// Elect, stream, restart after errors; on fallback, drop the slot and say
    /// so: the caller starts the polling source.
    pub(crate) async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
        settle_pool: sqlx::PgPool,
    ) -> Result<WalRunEnd> {
        let source_config = self.wal.source_config(&self.config.database);
        let lock_name = format!(
            "{}:{}",
            self.config.database.schema,
            source_config.leader_lease_name()
        );
        let mut backoff = Backoff::new(
            self.config.pipeline.retry_backoff_initial,
            self.config.pipeline.retry_backoff_max,
        );
        self.stats.wal.active.store(true, Ordering::Relaxed);
        self.stats.beat();
        tracing::info!(
            instance = %self.config.instance_id,
            schema = %self.config.database.schema,
            slot = %self.wal.slot,
            publication = %self.wal.publication,
            "relay starting with the WAL source"
        );
        let end = loop {
            let Some(mut leadership) = Leadership::acquire(
                &self.config.database,
                &lock_name,
                self.wal.leader_retry,
                &self.stats,
                &mut shutdown,
            )
            .await?
            else {
                break SessionEnd::Shutdown;
            };
            failpoint!("wal.leader.acquired");
            self.stats.wal.leader.store(true, Ordering::Relaxed);
            let started = Instant::now();
            let result = self.session(&mut leadership, &mut shutdown).await;
            self.stats.wal.leader.store(false, Ordering::Relaxed);
            // The lock goes with its session anyway; never wait long for the unlock.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, leadership.release()).await;
            let reason = match result {
                Ok(SessionEnd::Restart(reason)) => reason,
                Ok(end) => break end,
                Err(error) if error.is_retryable() => error.to_string(),
                Err(error) => {
                    crate::sink::close_sink(&*self.sink).await;
                    return Err(error);
                }
            };
            if started.elapsed() > Duration::from_secs(60) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            self.stats
                .database_reachable
                .store(false, Ordering::Relaxed);
            tracing::warn!(
                reason,
                retry_in_ms = delay.as_millis() as u64,
                "WAL session ended; starting a new one"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break SessionEnd::Shutdown;
            }
        };
        if let SessionEnd::Fallback = end {
            let source_config = self.wal.source_config(&self.config.database);
            self.rows
                .drop_slot(
                    &self.wal.slot,
                    &source_config.position_row_name(),
                    &self.config.database.schema.qualify("relay_lease"),
                )
                .await?;
            // A new slot starts afresh (`creating`), not as a lost one.
            crate::error::db_call(
                "forgetting the dropped slot's state",
                self.config.database.statement_timeout + Duration::from_secs(5),
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "delete from {} where slot = $1",
                    self.config.database.schema.qualify("relay_wal_slot")
                )))
                .bind(&self.wal.slot)
                .execute(&settle_pool),
            )
            .await?;
            tracing::error!(
                slot = %self.wal.slot,
                "retained-WAL budget exceeded: dropped the replication slot and switched to the polling source \
                 for the rest of this run (every table row is still there; wal-message events not yet relayed are lost). \
                 Restarting the relay starts the WAL source again with a new slot."
            );
            self.stats.wal.active.store(false, Ordering::Relaxed);
            return Ok(WalRunEnd::FallBackToPolling);
        }
        crate::sink::close_sink(&*self.sink).await;
        let summary = self.stats.summary();
        tracing::info!(?summary, "relay stopped");
        Ok(WalRunEnd::Stopped(summary))
    }

    /// Start the source (recovering a lost slot), run the stream, close it.
    async fn session(
        &self,
        leadership: &mut Leadership,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd> {
        let source_config = self.wal.source_config(&self.config.database);
        // Starting can wait for a busy slot (up to slot_busy_timeout): a shutdown cuts it short.
        let started = tokio::select! {
            started = WalSource::start(source_config) => started,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(SessionEnd::Shutdown),
        };
        let mut source = match started {
            Ok(WalStart::Ready(source)) => source,
            Ok(WalStart::SlotLost(lost)) => {
                self.stats.wal.slot_losses.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    slot = %self.wal.slot,
                    reason = %lost.reason,
                    last_confirmed_lsn = %lost.last_confirmed_lsn,
                    "the replication slot was lost; recovering: a new slot is created first, then every row \
                     still in the outbox table is published, then the stream. Events written in wal-message mode \
                     after the last confirmed position cannot be recovered."
                );
                match lost.recreate_slot().await {
                    Ok(source) => source,
                    Err(error) => return wal_end(error),
                }
            }
            Err(error) => return wal_end(error),
        };
        self.stats.database_reachable.store(true, Ordering::Relaxed);
        // The drain is durable: a session that starts after an interrupted one
        // resumes it where its settled pages end.
        let drain = source.drain().map(|range| {
            tracing::info!(
                slot = %self.wal.slot,
                after_sequence = range.after,
                up_to_sequence = range.upto,
                "publishing the rows the slot cannot see from the outbox table before the stream"
            );
            Drain {
                after: range.after,
                upto: range.upto,
            }
        });
        let (over_tx, over_rx) = watch::channel(false);
        let sampler = tokio::spawn(sample_slot(
            source.monitor(),
            self.stats.clone(),
            self.wal.clone(),
            over_tx,
        ));
        let result = self
            .stream(&mut source, drain, leadership, shutdown, over_rx)
            .await;
        sampler.abort();
        let graceful = matches!(result, Ok(SessionEnd::Shutdown | SessionEnd::Fallback));
        // Bounded: a shutdown must not wait for a slow database on top of the grace.
        match tokio::time::timeout(2 * CLOSE_TIMEOUT, source.shutdown()).await {
            Ok(Ok(position)) => {
                tracing::info!(slot = %self.wal.slot, %position, "replication stream closed")
            }
            Ok(Err(error)) if graceful => {
                tracing::warn!(%error, "could not record the final position; the last transactions will be sent again")
            }
            Ok(Err(error)) => tracing::debug!(%error, "closing the broken stream"),
            Err(_) => tracing::warn!(
                "closing the replication stream timed out; the last transactions will be sent again"
            ),
        }
        result
    }

    /// The session loop: read, dispatch to lanes, settle the done prefix.
    async fn stream(
        &self,
        source: &mut WalSource,
        mut drain: Option<Drain>,
        leadership: &mut Leadership,
        shutdown: &mut watch::Receiver<bool>,
        mut over_budget: watch::Receiver<bool>,
    ) -> Result<SessionEnd> {
        let context = Arc::new(LaneContext {
            publishing: tokio::sync::Semaphore::new(self.config.pipeline.max_in_flight),
            sink: self.sink.clone(),
            router: self.config.router.clone(),
            config: self.config.pipeline.clone(),
            rows: self.rows.clone(),
            breaker: std::sync::Mutex::new(CircuitBreaker::new(
                self.config.pipeline.breaker_failure_threshold,
                self.config.pipeline.retry_backoff_initial,
                self.config.pipeline.retry_backoff_max,
            )),
            stats: self.stats.clone(),
        });
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<LaneDone>();
        let mut lanes = Lanes::new(LANE_CHUNK);
        let mut tracker = Tracker::default();
        let mut settle_tick = tokio::time::interval(SETTLE_INTERVAL);
        settle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leader_tick = tokio::time::interval(LEADER_CHECK_INTERVAL);
        leader_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let record_interval = self.wal.status_interval.min(POSITION_RECORD_INTERVAL);
        let mut last_flush = Instant::now();
        // Set when the session is ending: why, and since when.
        let mut ending: Option<(Result<SessionEnd>, Instant, Duration)> = None;
        let fallback_enabled = self.wal.over_budget == OverBudget::FallbackPolling;

        loop {
            self.stats.beat();
            // Collect every result a finished lane sent before reaping its task:
            // a lane counts as idle once its task is gone, and the final settle
            // must see what it delivered (else its rows stay and are sent again).
            while let Ok(done) = done_rx.try_recv() {
                collect(&mut lanes, done, &mut tracker);
            }
            spawn_lanes(&mut lanes, &context, &done_tx);
            // A panicked lane loses track of its events, which ends the session.
            if let Some((_, error)) = lanes.reap().into_iter().find(|(_, error)| error.is_panic()) {
                tracing::error!(%error, "a publishing lane failed; restarting the stream from the confirmed position");
                lanes.abort_all();
                return Ok(SessionEnd::Restart(format!(
                    "a publishing lane failed: {error}"
                )));
            }
            if ending.is_none() && *shutdown.borrow() {
                ending = Some((
                    Ok(SessionEnd::Shutdown),
                    Instant::now(),
                    self.config.pipeline.shutdown_grace,
                ));
            }
            if let Some((_, since, grace)) = &ending {
                let idle = lanes.is_idle();
                if idle || since.elapsed() >= *grace {
                    if !idle {
                        tracing::warn!(
                            lanes = lanes.running(),
                            "grace period over with publishes in flight; they will be sent again"
                        );
                        lanes.abort_all();
                        while let Ok(done) = done_rx.try_recv() {
                            collect(&mut lanes, done, &mut tracker);
                        }
                    }
                    while let Ok(done) = done_rx.try_recv() {
                        collect(&mut lanes, done, &mut tracker);
                    }
                    self.final_settle(source, &mut tracker).await;
                    let (end, _, _) = ending.take().unwrap_or((
                        Ok(SessionEnd::Shutdown),
                        Instant::now(),
                        Duration::ZERO,
                    ));
                    return end;
                }
            }
            // A pause by an operator stops reading like a full window does: status
            // updates keep the stream alive, in-flight events finish.
            let room = ending.is_none()
                && !self.stats.paused.load(Ordering::Relaxed)
                && tracker.in_flight() < self.wal.max_in_flight_events;

            // The table drain goes first, page by page, before any streamed transaction.
            if room && let Some(current) = drain {
                // A page fills the free room only: the window bounds the drain's
                // re-sends after a crash as it bounds the stream's.
                let limit =
                    (self.wal.max_in_flight_events - tracker.in_flight()).clamp(1, DRAIN_PAGE);
                let page = self
                    .rows
                    .page(current.after, current.upto, limit)
                    .instrument(tracing::info_span!(
                        "drain_page",
                        after = current.after,
                        limit
                    ));
                match page.await {
                    Ok(page) if page.is_empty() => {
                        tracing::info!(slot = %self.wal.slot, "table drain dispatched; streaming");
                        // Settled after every page before it: then the drain is recorded as finished.
                        tracker.push_drain(DrainMark::Finished, 0, Vec::new());
                        drain = None;
                    }
                    Ok(page) => {
                        let last = page.last().map_or(current.upto, |e| e.sequence);
                        drain = Some(Drain {
                            after: last,
                            upto: current.upto,
                        });
                        let rows: Vec<i64> = page.iter().map(|e| e.sequence).collect();
                        let unit = tracker.push_drain(DrainMark::Page(last), page.len(), rows);
                        for event in page {
                            lanes.add(Item::publish(unit, event, true));
                        }
                        spawn_lanes(&mut lanes, &context, &done_tx);
                        failpoint!("wal.drain.page");
                    }
                    Err(error) => {
                        ending = Some((
                            Ok(SessionEnd::Restart(error.to_string())),
                            Instant::now(),
                            RESTART_GRACE,
                        ));
                    }
                }
                continue;
            }

            let read = room && drain.is_none();
            let step = tokio::select! {
                biased;
                _ = shutdown.changed(), if ending.is_none() => Step::Shutdown,
                _ = over_budget.changed(), if ending.is_none() && fallback_enabled => Step::OverBudget,
                // Before the settle tick: failing settles take longer than the tick,
                // which would otherwise always be ready and starve the leader check.
                _ = leader_tick.tick() => Step::CheckLeader,
                done = done_rx.recv() => Step::Lane(done),
                _ = settle_tick.tick() => Step::Tick,
                transaction = source.next_transaction(), if read => Step::Transaction(transaction),
            };
            match step {
                Step::Shutdown => {}
                Step::OverBudget => {
                    if *over_budget.borrow() {
                        ending = Some((
                            Ok(SessionEnd::Fallback),
                            Instant::now(),
                            self.config.pipeline.shutdown_grace,
                        ));
                    }
                }
                Step::Lane(Some(done)) => {
                    collect(&mut lanes, done, &mut tracker);
                    spawn_lanes(&mut lanes, &context, &done_tx);
                    // Settle at once when the window is full: only a settle makes room.
                    let full = tracker.in_flight() >= self.wal.max_in_flight_events;
                    let done = tracker.done_rows();
                    if (done >= SETTLE_MAX_ROWS || (full && done > 0))
                        && self.settle(source, &mut tracker).await == Settled::ServerGoingDown
                    {
                        lanes.abort_all();
                        return Ok(SessionEnd::Restart(SERVER_GOING_DOWN.into()));
                    }
                }
                Step::Lane(None) => {}
                Step::Tick => {
                    // PostgreSQL's shutdown waits for this stream to confirm everything
                    // it sent, which cannot happen now: close the stream at once.
                    match self.settle(source, &mut tracker).await {
                        Settled::ServerGoingDown => {
                            lanes.abort_all();
                            return Ok(SessionEnd::Restart(SERVER_GOING_DOWN.into()));
                        }
                        // A shutdown often shows as connections refused or a pool timeout:
                        // the lock session tells at once whether the server is still there.
                        Settled::Failed if ending.is_none() && !leadership.check().await => {
                            lanes.abort_all();
                            return Ok(SessionEnd::Restart(
                                "the leader lock's database session was lost".into(),
                            ));
                        }
                        _ => {}
                    }
                    self.stats
                        .wal
                        .confirmed_lsn
                        .store(source.positions().reported.as_u64(), Ordering::Relaxed);
                    // Record and report the position here, outside the select: a flush
                    // inside `next_transaction` can be cut short when another branch wins.
                    // Every settled prefix is recorded within `record_interval`.
                    if last_flush.elapsed() >= record_interval {
                        last_flush = Instant::now();
                        if let Err(error) = source.flush().await {
                            tracing::warn!(%error, "could not record the confirmed position");
                        }
                    }
                }
                Step::CheckLeader => {
                    if ending.is_none() && !leadership.check().await {
                        lanes.abort_all();
                        return Ok(SessionEnd::Restart(
                            "the leader lock's database session was lost".into(),
                        ));
                    }
                }
                Step::Transaction(Ok(Some(transaction))) => {
                    let _span = tracing::info_span!(
                        "transaction",
                        xid = transaction.xid,
                        commit_lsn = %transaction.commit_lsn,
                        events = transaction.events.len(),
                    )
                    .entered();
                    self.dispatch(transaction, &mut tracker, &mut lanes);
                    spawn_lanes(&mut lanes, &context, &done_tx);
                }
                Step::Transaction(Ok(None)) => {
                    ending = Some((
                        Ok(SessionEnd::Restart("the replication stream ended".into())),
                        Instant::now(),
                        RESTART_GRACE,
                    ));
                }
                Step::Transaction(Err(error)) => {
                    let end = wal_end(error);
                    if let Ok(SessionEnd::Restart(reason)) = &end {
                        tracing::warn!(
                            reason,
                            "replication stream failed; finishing in-flight publishes"
                        );
                    }
                    ending = Some((end, Instant::now(), RESTART_GRACE));
                }
            }
        }
    }

    fn dispatch(
        &self,
        transaction: WalTransaction,
        tracker: &mut Tracker,
        lanes: &mut Lanes<Item>,
    ) {
        let mut rows = transaction.row_sequences;
        rows.sort_unstable();
        let unit = tracker.push(
            Some(transaction.end_lsn),
            transaction.events.len() + transaction.undecodable.len(),
            rows.clone(),
        );
        for event in transaction.events {
            let has_row = rows.binary_search(&event.sequence).is_ok();
            lanes.add(Item::publish(unit, event, has_row));
        }
        // Counted in the unit like events: the transaction is confirmed (the slot
        // moves past them) only once each is in the dead-letter table.
        for undecodable in transaction.undecodable {
            lanes.add(Item {
                unit,
                work: Work::DeadLetter {
                    undecodable,
                    committed_at: transaction.commit_time,
                },
            });
        }
    }

    /// Delete the rows of the done prefix, then confirm its end position.
    /// After a failure, waits a backoff delay before trying again.
    async fn settle(&self, source: &mut WalSource, tracker: &mut Tracker) -> Settled {
        if tracker
            .retry_settle_at
            .is_some_and(|at| Instant::now() < at)
        {
            return Settled::Later;
        }
        self.delete_stray_rows(tracker).await;
        let prefix = tracker.done_prefix();
        if prefix.units == 0 {
            return Settled::Done;
        }
        match self.rows.delete(&prefix.rows).await {
            Ok(deleted) => {
                if deleted.len() < prefix.rows.len() {
                    let deleted: HashSet<i64> = deleted.into_iter().collect();
                    let now = Instant::now();
                    tracker.stray_rows.extend(
                        prefix
                            .rows
                            .iter()
                            .filter(|sequence| !deleted.contains(sequence))
                            .map(|&sequence| (sequence, now)),
                    );
                }
                tracker.settle_backoff.reset();
                tracker.retry_settle_at = None;
                tracker.pop(prefix.units);
                failpoint!("wal.settle.deleted");
                if prefix.drain_finished {
                    failpoint!("wal.drain.finished");
                }
                if prefix.drain_after.is_some() || prefix.drain_finished {
                    // Only after the rows are gone: a crash before this re-reads the
                    // settled pages (and finds nothing); `streaming` is never recorded
                    // before every drained row is settled.
                    let after = prefix.drain_after.unwrap_or(0);
                    if let Err(error) = source.record_drain(after, prefix.drain_finished).await {
                        tracing::warn!(%error, "could not record the drain's progress; a restart drains the settled rows' range again (nothing is sent twice that is gone)");
                    }
                }
                if let Some(lsn) = prefix.end_lsn {
                    source.confirm(lsn);
                }
                self.stats
                    .published
                    .fetch_add(prefix.delivered, Ordering::Relaxed);
                self.stats.database_reachable.store(true, Ordering::Relaxed);
                Settled::Done
            }
            Err(error) if error.is_server_going_down() => {
                tracing::warn!(%error, "PostgreSQL is shutting down; closing the replication stream");
                Settled::ServerGoingDown
            }
            Err(error) => {
                tracker.retry_settle_at =
                    Some(Instant::now() + tracker.settle_backoff.next_delay());
                self.stats.database_errors.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .database_reachable
                    .store(false, Ordering::Relaxed);
                tracing::warn!(%error, rows = prefix.rows.len(), "deleting relayed rows failed; the position is not confirmed until it succeeds");
                Settled::Failed
            }
        }
    }
}

impl<S: Sink> WalRelay<S> {
    /// The last settle of a session: the done prefix, then rows a delete did not
    /// find yet, retried for up to [`CLOSE_TIMEOUT`] (a stopped relay must not
    /// leave rows of delivered events behind for the next one to send again).
    async fn final_settle(&self, source: &mut WalSource, tracker: &mut Tracker) {
        tracker.retry_settle_at = None;
        self.settle(source, tracker).await;
        let until = Instant::now() + CLOSE_TIMEOUT;
        while !tracker.stray_rows.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tracker.last_stray_retry = Instant::now() - STRAY_RETRY_INTERVAL;
            self.delete_stray_rows(tracker).await;
        }
    }
}

impl<S: Sink> WalRelay<S> {
    /// Retry deleting rows a settle did not find (see [`WalRows::delete`]) every
    /// [`STRAY_RETRY_INTERVAL`], for [`STRAY_RETRY_FOR`]; rows still not found by
    /// then were gone already. Their events were delivered and confirmed either way.
    async fn delete_stray_rows(&self, tracker: &mut Tracker) {
        if tracker.stray_rows.is_empty()
            || tracker.last_stray_retry.elapsed() < STRAY_RETRY_INTERVAL
        {
            return;
        }
        tracker.last_stray_retry = Instant::now();
        tracker
            .stray_rows
            .retain(|(_, since)| since.elapsed() < STRAY_RETRY_FOR);
        let sequences: Vec<i64> = tracker.stray_rows.iter().map(|(s, _)| *s).collect();
        match self.rows.delete(&sequences).await {
            Ok(deleted) => {
                let deleted: HashSet<i64> = deleted.into_iter().collect();
                tracker
                    .stray_rows
                    .retain(|(sequence, _)| !deleted.contains(sequence));
            }
            Err(error) => tracing::debug!(%error, "retrying the delete of relayed rows failed"),
        }
    }
}

/// Start a lane task for every key that has events queued and none running.
fn spawn_lanes<S: Sink>(
    lanes: &mut Lanes<Item>,
    context: &Arc<LaneContext<S>>,
    done_tx: &tokio::sync::mpsc::UnboundedSender<LaneDone>,
) {
    lanes.spawn_ready(|key, items| {
        let (context, done_tx) = (context.clone(), done_tx.clone());
        async move {
            let done = context.publish_lane(key, items).await;
            let _ = done_tx.send(done);
        }
    });
}

/// Record a lane's result: each event finished in its unit; the key may go on.
fn collect(lanes: &mut Lanes<Item>, done: LaneDone, tracker: &mut Tracker) {
    for (unit, delivered) in done.finished {
        tracker.finish(unit, delivered);
    }
    lanes.finished(&done.key);
}

impl<S: Sink> LaneContext<S> {
    /// Publish one key's events in order; each is retried until it is delivered
    /// or dead-lettered (the session aborts lanes that must stop).
    async fn publish_lane(&self, key: String, items: Vec<Item>) -> LaneDone {
        let _permit = self.publishing.acquire().await.ok();
        let mut done = LaneDone {
            key,
            finished: Vec::with_capacity(items.len()),
        };
        let mut items = items;
        // First verdicts of events published as one run, for the events in order.
        let mut first_verdicts: VecDeque<Outcome> = VecDeque::new();
        for index in 0..items.len() {
            if first_verdicts.is_empty() && matches!(items[index].work, Work::Publish(_)) {
                first_verdicts = self.publish_run(&items[index..]).await.into();
            }
            let item = &mut items[index];
            let delivered = match &mut item.work {
                Work::Publish(publish) => {
                    self.publish_until_done(publish, first_verdicts.pop_front())
                        .await
                }
                Work::DeadLetter {
                    undecodable,
                    committed_at,
                } => {
                    self.dead_letter_undecodable(undecodable, *committed_at)
                        .await;
                    false
                }
            };
            done.finished.push((item.unit, delivered));
        }
        done
    }

    /// Publish the events at the start of `items` as one run (as many as the
    /// sink overlaps; one when it allows one per key), after the breaker allows:
    /// the first verdict of each, for a prefix of them.
    async fn publish_run(&self, items: &[Item]) -> Vec<Outcome> {
        loop {
            let wait = self
                .breaker
                .lock()
                .map(|mut breaker| breaker.wait())
                .unwrap_or_default();
            if wait.is_zero() {
                break;
            }
            self.stats.breaker_state.store(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
        let limit = if self.sink.max_in_flight_per_key() > 1 {
            items.len()
        } else {
            1
        };
        let run: Vec<(&OutboxEvent, Route)> = items
            .iter()
            .take(limit)
            .map_while(|item| match &item.work {
                Work::Publish(publish) => Some((&publish.event, self.router.route(&publish.event))),
                Work::DeadLetter { .. } => None,
            })
            .collect();
        self.sink.publish_run(&run).await
    }

    /// Move a change that is no event to the dead-letter table (raw values kept),
    /// retrying database trouble; a row found in neither table (not visible yet)
    /// is looked for again for up to [`UNDECODABLE_ROW_WAIT`].
    async fn dead_letter_undecodable(
        &self,
        undecodable: &Undecodable,
        committed_at: DateTime<Utc>,
    ) {
        let mut backoff = Backoff::new(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        let started = Instant::now();
        loop {
            let result = match undecodable {
                Undecodable::Row {
                    sequence, reason, ..
                } => self.rows.dead_letter_streamed_row(*sequence, reason).await,
                Undecodable::Message(message) => {
                    self.rows.dead_letter_message(message, committed_at).await
                }
            };
            match (result, undecodable) {
                (Ok(true), Undecodable::Message(message)) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .wal
                        .malformed_messages
                        .fetch_add(1, Ordering::Relaxed);
                    // Never the content or the reason (it can quote the content).
                    tracing::error!(
                        lsn = %message.lsn,
                        prefix = %message.prefix,
                        content_bytes = message.content.len(),
                        "a WAL message with the outbox prefix that is no event was dead-lettered \
                         (reason and raw content in the dead-letter table); the stream continues"
                    );
                    return;
                }
                (Ok(false), Undecodable::Message(message)) => {
                    tracing::debug!(lsn = %message.lsn, "the malformed WAL message was dead-lettered before");
                    return;
                }
                (
                    Ok(true),
                    Undecodable::Row {
                        sequence,
                        event_id,
                        reason,
                        ..
                    },
                ) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        sequence,
                        event_id = %event_id,
                        error = %reason,
                        "undecodable outbox row dead-lettered; its key continues"
                    );
                    return;
                }
                (Ok(false), Undecodable::Row { sequence, .. }) => {
                    if started.elapsed() >= UNDECODABLE_ROW_WAIT {
                        tracing::warn!(
                            sequence,
                            "an undecodable outbox row is gone from the table (deleted by someone else); \
                             nothing to dead-letter"
                        );
                        return;
                    }
                    tokio::time::sleep(STRAY_RETRY_INTERVAL).await;
                }
                (Err(db_error), _) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%db_error, retry_in_ms = delay.as_millis() as u64, "could not dead-letter an undecodable change; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// True when delivered, false when dead-lettered. `first_verdict`: the outcome
    /// of the first attempt, when the event was already published in a run.
    async fn publish_until_done(&self, item: &mut Publish, first_verdict: Option<Outcome>) -> bool {
        let mut backoff = Backoff::new(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        let mut first_verdict = first_verdict;
        loop {
            let outcome = match first_verdict.take() {
                Some(outcome) => outcome,
                None => {
                    let wait = self
                        .breaker
                        .lock()
                        .map(|mut breaker| breaker.wait())
                        .unwrap_or_default();
                    if !wait.is_zero() {
                        self.stats.breaker_state.store(1, Ordering::Relaxed);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    let route = self.router.route(&item.event);
                    self.sink.publish(&item.event, &route).await
                }
            };
            match outcome {
                Outcome::Delivered => {
                    failpoint!("wal.publish.confirmed");
                    if let Ok(mut breaker) = self.breaker.lock() {
                        breaker.record_success();
                        self.stats
                            .breaker_state
                            .store(breaker.state().as_gauge() as u64, Ordering::Relaxed);
                    }
                    return true;
                }
                Outcome::Retry(error) => {
                    self.stats
                        .transient_failures
                        .fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut breaker) = self.breaker.lock() {
                        let state = breaker.record_failure();
                        self.stats
                            .breaker_state
                            .store(state.as_gauge() as u64, Ordering::Relaxed);
                    }
                    let delay = backoff.next_delay();
                    tracing::debug!(sequence = item.event.sequence, %error, retry_in_ms = delay.as_millis() as u64, "publish failed transiently");
                    tokio::time::sleep(delay).await;
                }
                Outcome::Rejected(error) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    item.attempts += 1;
                    // A permanent rejection (over a size limit, a name the protocol
                    // cannot carry) fails the same way every time: no retry.
                    if item.attempts >= self.config.max_attempts || error.is_permanent() {
                        self.dead_letter(item, &error.message).await;
                        return false;
                    }
                    let mut delay = Backoff::delay_for(
                        self.config.retry_backoff_initial,
                        self.config.retry_backoff_max,
                        item.attempts - 1,
                    );
                    // Table-mode events count their attempts on the row: durable across
                    // restarts (a restarted relay continues the count) and seen by status.
                    if item.has_row {
                        match self
                            .rows
                            .record_rejection(item.event.sequence, &error.message, delay)
                            .await
                        {
                            Ok(Some(on_row)) if on_row > item.attempts => {
                                item.attempts = on_row;
                                if item.attempts >= self.config.max_attempts {
                                    self.dead_letter(item, &error.message).await;
                                    return false;
                                }
                                delay = Backoff::delay_for(
                                    self.config.retry_backoff_initial,
                                    self.config.retry_backoff_max,
                                    item.attempts - 1,
                                );
                            }
                            Ok(_) => {}
                            Err(db_error) => tracing::debug!(
                                %db_error,
                                "could not count the attempt on the row; counting it in memory"
                            ),
                        }
                    }
                    tracing::warn!(
                        sequence = item.event.sequence,
                        event_id = %item.event.event_id,
                        attempts = item.attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        %error,
                        "broker rejected the event; its key waits for the retry"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Move a poison event to the dead-letter table, retrying database trouble.
    async fn dead_letter(&self, item: &Publish, error: &str) {
        let mut backoff = Backoff::new(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        loop {
            match self
                .rows
                .dead_letter(&item.event, item.has_row, item.attempts, error)
                .await
            {
                Ok(()) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        sequence = item.event.sequence,
                        event_id = %item.event.event_id,
                        event_type = %item.event.event_type,
                        attempts = item.attempts,
                        error,
                        "event dead-lettered; its key continues"
                    );
                    return;
                }
                Err(db_error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%db_error, retry_in_ms = delay.as_millis() as u64, "could not dead-letter the event; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Sample the slot's lag and retained WAL into the stats; enforce the budget.
async fn sample_slot(
    monitor: SlotMonitor,
    stats: Arc<RelayStats>,
    wal: WalConfig,
    over_budget: watch::Sender<bool>,
) {
    let mut last_warning: Option<Instant> = None;
    loop {
        match monitor.status().await {
            Ok(Some(status)) => {
                let lag = status.lag_bytes.unwrap_or(0);
                let retained = status.retained_bytes.unwrap_or(0);
                stats.wal.lag_bytes.store(lag, Ordering::Relaxed);
                stats.wal.retained_bytes.store(retained, Ordering::Relaxed);
                if let Some(budget) = wal.retained_wal_budget_bytes
                    && u64::try_from(retained).unwrap_or(0) > budget
                {
                    match wal.over_budget {
                        OverBudget::Warn => {
                            if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(60))
                            {
                                last_warning = Some(Instant::now());
                                tracing::warn!(
                                    slot = %wal.slot,
                                    retained_bytes = retained,
                                    budget_bytes = budget,
                                    lag_bytes = lag,
                                    "the replication slot holds back more WAL than its budget: is the broker reachable?"
                                );
                            }
                        }
                        OverBudget::FallbackPolling => {
                            tracing::error!(
                                slot = %wal.slot,
                                retained_bytes = retained,
                                budget_bytes = budget,
                                "the replication slot holds back more WAL than its budget: falling back to polling"
                            );
                            let _ = over_budget.send(true);
                            return;
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "sampling the slot failed"),
        }
        tokio::time::sleep(wal.lag_sample_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_prefix_stops_at_the_first_unfinished_unit() {
        let mut tracker = Tracker::default();
        let a = tracker.push(Some(Lsn(10)), 2, vec![1, 2]);
        let b = tracker.push(Some(Lsn(20)), 1, vec![3]);
        let c = tracker.push(Some(Lsn(30)), 1, vec![]);
        assert_eq!(tracker.in_flight(), 4);
        tracker.finish(b, true);
        tracker.finish(c, false);
        assert_eq!(tracker.done_prefix().units, 0, "a is not done");
        tracker.finish(a, true);
        assert_eq!(tracker.done_prefix().units, 0);
        tracker.finish(a, true);
        let prefix = tracker.done_prefix();
        assert_eq!(prefix.units, 3);
        assert_eq!(prefix.rows, vec![1, 2, 3]);
        assert_eq!(prefix.end_lsn, Some(Lsn(30)));
        assert_eq!(
            prefix.delivered, 3,
            "the dead-lettered event is not counted as published"
        );
        assert_eq!(
            tracker.in_flight(),
            4,
            "finished events fill the window until they are settled"
        );
        tracker.pop(prefix.units);
        assert_eq!(tracker.in_flight(), 0);
        let d = tracker.push(Some(Lsn(40)), 1, vec![4]);
        assert_eq!(d, 3, "unit indexes keep counting after a pop");
        tracker.finish(d, true);
        assert_eq!(tracker.done_prefix().end_lsn, Some(Lsn(40)));
    }

    #[test]
    fn the_drain_is_recorded_finished_only_with_every_page_before_it_settled() {
        let mut tracker = Tracker::default();
        let first = tracker.push_drain(DrainMark::Page(10), 2, vec![5, 10]);
        let second = tracker.push_drain(DrainMark::Page(20), 1, vec![20]);
        tracker.push_drain(DrainMark::Finished, 0, Vec::new());
        let streamed = tracker.push(Some(Lsn(99)), 1, vec![30]);
        tracker.finish(second, true);
        tracker.finish(streamed, true);
        let prefix = tracker.done_prefix();
        assert_eq!(prefix.units, 0, "the first page is not settled yet");
        assert!(!prefix.drain_finished);
        tracker.finish(first, true);
        tracker.finish(first, true);
        let prefix = tracker.done_prefix();
        assert_eq!(prefix.units, 4);
        assert_eq!(prefix.drain_after, Some(20));
        assert!(prefix.drain_finished);
        assert_eq!(prefix.end_lsn, Some(Lsn(99)));
        tracker.pop(prefix.units);

        let mut tracker = Tracker::default();
        let page = tracker.push_drain(DrainMark::Page(10), 1, vec![10]);
        tracker.push_drain(DrainMark::Page(20), 1, vec![20]);
        tracker.finish(page, true);
        let prefix = tracker.done_prefix();
        assert_eq!(
            prefix.drain_after,
            Some(10),
            "progress stops at the first unsettled page"
        );
        assert!(!prefix.drain_finished);
    }

    #[test]
    fn drain_units_confirm_no_position() {
        let mut tracker = Tracker::default();
        let page = tracker.push(None, 1, vec![7]);
        tracker.finish(page, true);
        let prefix = tracker.done_prefix();
        assert_eq!(prefix.end_lsn, None);
        assert_eq!(prefix.rows, vec![7]);
    }
}
