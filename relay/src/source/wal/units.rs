//! The WAL source as the relay loop sees it ([`crate::source::Source`]): pages
//! of the table drain first, then committed transactions, each one unit; the
//! slot position is confirmed only over the ledger's contiguous done prefix.
//!
//! * **Next**: while a drain is under way (a new or lost slot cannot see rows
//!   already in the table), a page at a time within the window's free room,
//!   then a marker unit whose settle records the drain finished; then the
//!   stream. A closed or broken stream ends the session (lanes get
//!   [`RESTART_GRACE`]); a retained-WAL budget exceeded with
//!   `over_budget = "fallback-polling"` ends it with `Fallback`.
//! * **Alarm**: the leader lock is checked every [`LEADER_CHECK_INTERVAL`]
//!   whatever the room; a lost lock aborts the session at once.
//! * **Settle**: the done prefix's rows are deleted, the drain's progress is
//!   recorded, *then* its end LSN is confirmed, so an unconfirmed event always
//!   has its row (table mode). PostgreSQL shutting down (57P*) closes the
//!   stream at once: its shutdown waits for this stream to confirm everything
//!   it sent, which cannot happen now. The position is recorded and reported
//!   here, outside any `select!` (a flush cut short by another branch once lost
//!   a transaction).
//! * **Window**: at most `wal.max_in_flight_events` events received and not yet
//!   settled (one transaction can exceed it; the stream then pauses until it is
//!   settled). Finished events count until their prefix is settled, so a key
//!   that holds the prefix back cannot pile up finished but unconfirmed events.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::{OverBudget, PipelineConfig, WalConfig};
use crate::error::Result;
use crate::event::OutboxEvent;
use crate::failpoint::failpoint;
use crate::pipeline::ledger::{DonePrefix, Ledger};
use crate::resilience::{Backoff, CLOSE_TIMEOUT};
use crate::source::wal::leader::Leadership;
use crate::source::wal::poison::{WalItem, WalLanes};
use crate::source::wal::rows::WalRows;
use crate::source::wal::{Lsn, WalError, WalSource, WalTransaction};
use crate::source::{
    Admission, Next, RetryMode, SessionEnd, SettleWhen, Settled, Source, SourceLedger, Stop, Unit,
    Window,
};
use crate::stats::RelayStats;

/// Events handed to one lane task at a time (progress is reported per chunk).
const LANE_CHUNK: usize = 128;
/// Settle at once when this many rows wait.
const SETTLE_MAX_ROWS: usize = 2_000;
/// How often the leader checks that its lock session is alive.
const LEADER_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Longest time lanes get to finish when a session ends because of an error.
pub(crate) const RESTART_GRACE: Duration = Duration::from_secs(5);
/// How often rows a delete did not find are tried again, and for how long.
pub(crate) const STRAY_RETRY_INTERVAL: Duration = Duration::from_millis(200);
const STRAY_RETRY_FOR: Duration = Duration::from_secs(30);
/// Rows read per page of the table drain.
const DRAIN_PAGE: usize = 1_000;
/// Record the confirmed position at most this often (and at least every
/// `status_interval`): after a crash the stream re-sends the unconfirmed window
/// plus what was confirmed in the last interval.
const POSITION_RECORD_INTERVAL: Duration = Duration::from_millis(250);

const SERVER_GOING_DOWN: &str = "PostgreSQL is shutting down";
const LEADER_LOST: &str = "the leader lock's database session was lost";

/// What settling one transaction (or one page of the table drain) needs.
#[derive(Debug)]
pub(crate) struct WalUnit {
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

/// The table drain: rows `after < sequence <= upto` still to dispatch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drain {
    pub(crate) after: i64,
    pub(crate) upto: i64,
}

type Page = Pin<Box<dyn Future<Output = Result<Vec<OutboxEvent>>> + Send>>;

/// The done prefix of the ledger, to settle.
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

type WalLedger = Ledger<Arc<WalUnit>, DonePrefix>;

fn done_prefix(ledger: &WalLedger) -> PrefixToSettle {
    let mut prefix = PrefixToSettle::default();
    for done in ledger.done_prefix() {
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

fn done_rows(ledger: &WalLedger) -> usize {
    ledger
        .done_prefix()
        .map(|done| done.token.rows.len().max(1))
        .sum()
}

/// A WAL error as a session end: retryable ones restart the session.
pub(crate) fn wal_end(error: WalError) -> Result<SessionEnd> {
    if error.is_retryable() {
        Ok(SessionEnd::Restart(error.to_string()))
    } else {
        Err(error.into())
    }
}

/// One streaming session of the WAL source (its leader holds the slot).
pub(crate) struct WalUnits<'a> {
    source: WalSource,
    leadership: &'a mut Leadership,
    rows: WalRows,
    lanes: Arc<WalLanes>,
    stats: Arc<RelayStats>,
    wal: WalConfig,
    shutdown_grace: Duration,
    drain: Option<Drain>,
    /// A drain page under way, resumed when the loop's select cancelled it.
    page: Option<Page>,
    over_budget: watch::Receiver<bool>,
    sampler: tokio::task::JoinHandle<()>,
    next_leader_check: Instant,
    /// After a failed settle: not before this instant.
    retry_settle_at: Option<Instant>,
    settle_backoff: Backoff,
    /// Rows of confirmed events a delete did not find yet, since when.
    stray_rows: Vec<(i64, Instant)>,
    last_stray_retry: Instant,
    last_flush: Instant,
}

/// What a session needs besides its stream.
pub(crate) struct SessionParts<'a> {
    pub(crate) leadership: &'a mut Leadership,
    pub(crate) rows: WalRows,
    pub(crate) stats: Arc<RelayStats>,
    pub(crate) wal: WalConfig,
    pub(crate) pipeline: PipelineConfig,
    pub(crate) drain: Option<Drain>,
    pub(crate) over_budget: watch::Receiver<bool>,
    pub(crate) sampler: tokio::task::JoinHandle<()>,
}

impl<'a> WalUnits<'a> {
    pub(crate) fn new(source: WalSource, parts: SessionParts<'a>) -> WalUnits<'a> {
        let lanes = Arc::new(WalLanes::new(
            parts.rows.clone(),
            parts.pipeline.clone(),
            parts.stats.clone(),
        ));
        WalUnits {
            source,
            leadership: parts.leadership,
            rows: parts.rows,
            lanes,
            stats: parts.stats,
            wal: parts.wal,
            shutdown_grace: parts.pipeline.shutdown_grace,
            drain: parts.drain,
            page: None,
            over_budget: parts.over_budget,
            sampler: parts.sampler,
            // The first check comes at once, like a fresh interval's first tick.
            next_leader_check: Instant::now(),
            retry_settle_at: None,
            settle_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            stray_rows: Vec::new(),
            last_stray_retry: Instant::now(),
            last_flush: Instant::now(),
        }
    }

    /// The next page of the drain, or its end marker.
    async fn next_page(&mut self, current: Drain, room: usize) -> Next<WalUnit, WalItem> {
        if self.page.is_none() {
            // A page fills the free room only: the window bounds the drain's
            // re-sends after a crash as it bounds the stream's.
            let limit = room.clamp(1, DRAIN_PAGE);
            let rows = self.rows.clone();
            self.page = Some(Box::pin(
                async move { rows.page(current.after, current.upto, limit).await }.instrument(
                    tracing::info_span!("drain_page", after = current.after, limit),
                ),
            ));
        }
        let Some(page) = self.page.as_mut() else {
            return Next::Idle;
        };
        let page = page.await;
        self.page = None;
        match page {
            Ok(page) if page.is_empty() => {
                tracing::info!(slot = %self.wal.slot, "table drain dispatched; streaming");
                self.drain = None;
                // Settled after every page before it: then the drain is recorded as finished.
                Next::Unit(Unit {
                    token: WalUnit {
                        end_lsn: None,
                        rows: Vec::new(),
                        drain: Some(DrainMark::Finished),
                    },
                    items: Vec::new(),
                })
            }
            Ok(page) => {
                let last = page.last().map_or(current.upto, |e| e.sequence);
                self.drain = Some(Drain {
                    after: last,
                    upto: current.upto,
                });
                let rows: Vec<i64> = page.iter().map(|e| e.sequence).collect();
                failpoint!("wal.drain.page");
                Next::Unit(Unit {
                    token: WalUnit {
                        end_lsn: None,
                        rows,
                        drain: Some(DrainMark::Page(last)),
                    },
                    items: page
                        .into_iter()
                        .map(|event| WalItem::publish(event, true))
                        .collect(),
                })
            }
            Err(error) => Next::End(Stop::drain(
                Ok(SessionEnd::Restart(error.to_string())),
                RESTART_GRACE,
            )),
        }
    }

    /// Delete the rows of the done prefix, then confirm its end position.
    /// After a failure, waits a backoff delay before trying again.
    async fn settle_prefix(&mut self, ledger: &mut WalLedger) -> Outcome {
        if self.retry_settle_at.is_some_and(|at| Instant::now() < at) {
            return Outcome::Later;
        }
        self.delete_stray_rows().await;
        let prefix = done_prefix(ledger);
        if prefix.units == 0 {
            return Outcome::Nothing;
        }
        match self.rows.delete(&prefix.rows).await {
            Ok(deleted) => {
                if deleted.len() < prefix.rows.len() {
                    let deleted: HashSet<i64> = deleted.into_iter().collect();
                    let now = Instant::now();
                    self.stray_rows.extend(
                        prefix
                            .rows
                            .iter()
                            .filter(|sequence| !deleted.contains(sequence))
                            .map(|&sequence| (sequence, now)),
                    );
                }
                self.settle_backoff.reset();
                self.retry_settle_at = None;
                ledger.pop_prefix(prefix.units);
                failpoint!("wal.settle.deleted");
                if prefix.drain_finished {
                    failpoint!("wal.drain.finished");
                }
                if prefix.drain_after.is_some() || prefix.drain_finished {
                    // Only after the rows are gone: a crash before this re-reads the
                    // settled pages (and finds nothing); `streaming` is never recorded
                    // before every drained row is settled.
                    let after = prefix.drain_after.unwrap_or(0);
                    if let Err(error) = self.source.record_drain(after, prefix.drain_finished).await
                    {
                        tracing::warn!(%error, "could not record the drain's progress; a restart drains the settled rows' range again (nothing is sent twice that is gone)");
                    }
                }
                if let Some(lsn) = prefix.end_lsn {
                    self.source.confirm(lsn);
                }
                self.stats
                    .published
                    .fetch_add(prefix.delivered, Ordering::Relaxed);
                self.stats.database_reachable.store(true, Ordering::Relaxed);
                Outcome::Done
            }
            Err(error) if error.is_server_going_down() => {
                tracing::warn!(%error, "PostgreSQL is shutting down; closing the replication stream");
                Outcome::ServerGoingDown
            }
            Err(error) => {
                self.retry_settle_at = Some(Instant::now() + self.settle_backoff.next_delay());
                self.stats.database_errors.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .database_reachable
                    .store(false, Ordering::Relaxed);
                tracing::warn!(%error, rows = prefix.rows.len(), "deleting relayed rows failed; the position is not confirmed until it succeeds");
                Outcome::Failed
            }
        }
    }

    /// The last settle of a session: the done prefix, then rows a delete did not
    /// find yet, retried for up to [`CLOSE_TIMEOUT`] (a stopped relay must not
    /// leave rows of delivered events behind for the next one to send again).
    async fn final_settle(&mut self, ledger: &mut WalLedger) {
        self.retry_settle_at = None;
        self.settle_prefix(ledger).await;
        let until = Instant::now() + CLOSE_TIMEOUT;
        while !self.stray_rows.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.last_stray_retry = Instant::now() - STRAY_RETRY_INTERVAL;
            self.delete_stray_rows().await;
        }
    }

    /// Retry deleting rows a settle did not find (see [`WalRows::delete`]) every
    /// [`STRAY_RETRY_INTERVAL`], for [`STRAY_RETRY_FOR`]; rows still not found by
    /// then were gone already. Their events were delivered and confirmed either way.
    async fn delete_stray_rows(&mut self) {
        if self.stray_rows.is_empty() || self.last_stray_retry.elapsed() < STRAY_RETRY_INTERVAL {
            return;
        }
        self.last_stray_retry = Instant::now();
        self.stray_rows
            .retain(|(_, since)| since.elapsed() < STRAY_RETRY_FOR);
        let sequences: Vec<i64> = self.stray_rows.iter().map(|(s, _)| *s).collect();
        match self.rows.delete(&sequences).await {
            Ok(deleted) => {
                let deleted: HashSet<i64> = deleted.into_iter().collect();
                self.stray_rows
                    .retain(|(sequence, _)| !deleted.contains(sequence));
            }
            Err(error) => tracing::debug!(%error, "retrying the delete of relayed rows failed"),
        }
    }
}

/// What one settle attempt did.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Nothing,
    Done,
    /// Backing off after a failure.
    Later,
    Failed,
    ServerGoingDown,
}

/// A transaction as a unit: its rows (sorted) and end position; its changes
/// that are no event are counted like events, so the transaction is confirmed
/// (the slot moves past them) only once each is in the dead-letter table.
fn dispatch(transaction: WalTransaction) -> Unit<WalUnit, WalItem> {
    let _span = tracing::info_span!(
        "transaction",
        xid = transaction.xid,
        commit_lsn = %transaction.commit_lsn,
        events = transaction.events.len(),
    )
    .entered();
    let mut rows = transaction.row_sequences;
    rows.sort_unstable();
    let mut items = Vec::with_capacity(transaction.events.len() + transaction.undecodable.len());
    for event in transaction.events {
        let has_row = rows.binary_search(&event.sequence).is_ok();
        items.push(WalItem::publish(event, has_row));
    }
    for undecodable in transaction.undecodable {
        items.push(WalItem::DeadLetter {
            undecodable,
            committed_at: transaction.commit_time,
        });
    }
    Unit {
        token: WalUnit {
            end_lsn: Some(transaction.end_lsn),
            rows,
            drain: None,
        },
        items,
    }
}

impl<'a> Source for WalUnits<'a> {
    type Token = WalUnit;
    type Item = WalItem;
    type View = DonePrefix;
    type Lanes = WalLanes;
    const RETRY: RetryMode = RetryMode::InPlace;
    const LANE_CHUNK: usize = LANE_CHUNK;

    fn lane_work(&self) -> Arc<WalLanes> {
        self.lanes.clone()
    }

    fn window(&self) -> Window {
        Window {
            limit: self.wal.max_in_flight_events,
            refill_below: self.wal.max_in_flight_events,
        }
    }

    fn alarm(&self, ending: bool) -> impl Future<Output = ()> + Send + 'static {
        let at = self.next_leader_check;
        let fallback = !ending && self.wal.over_budget == OverBudget::FallbackPolling;
        let mut over_budget = fallback.then(|| self.over_budget.clone());
        async move {
            let over = async {
                let rang = match over_budget.as_mut() {
                    Some(over_budget) => over_budget.wait_for(|over| *over).await.is_ok(),
                    None => false,
                };
                if !rang {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = over => {}
            }
        }
    }

    async fn check(&mut self, ending: bool) -> Option<Stop> {
        let fallback = self.wal.over_budget == OverBudget::FallbackPolling;
        if !ending && fallback && *self.over_budget.borrow() {
            return Some(Stop::drain(Ok(SessionEnd::Fallback), self.shutdown_grace));
        }
        if Instant::now() >= self.next_leader_check {
            self.next_leader_check = Instant::now() + LEADER_CHECK_INTERVAL;
            if !ending && !self.leadership.check().await {
                return Some(Stop::abort(LEADER_LOST));
            }
        }
        None
    }

    async fn next(&mut self, admission: Admission) -> Next<WalUnit, WalItem> {
        // The table drain goes first, page by page, before any streamed transaction.
        if let Some(current) = self.drain {
            return self.next_page(current, admission.room).await;
        }
        match self.source.next_transaction().await {
            Ok(Some(transaction)) => Next::Unit(dispatch(transaction)),
            Ok(None) => Next::End(Stop::drain(
                Ok(SessionEnd::Restart("the replication stream ended".into())),
                RESTART_GRACE,
            )),
            Err(error) => {
                let end = wal_end(error);
                if let Ok(SessionEnd::Restart(reason)) = &end {
                    tracing::warn!(
                        reason,
                        "replication stream failed; finishing in-flight publishes"
                    );
                }
                Next::End(Stop::drain(end, RESTART_GRACE))
            }
        }
    }

    /// Settle at once when many rows wait, or when the window is full: only a
    /// settle makes room.
    fn settle_due(&self, ledger: &SourceLedger<Self>, _lanes_idle: bool) -> bool {
        let full = ledger.in_flight() >= self.wal.max_in_flight_events;
        let done = done_rows(ledger);
        done >= SETTLE_MAX_ROWS || (full && done > 0)
    }

    async fn settle(&mut self, ledger: &mut SourceLedger<Self>, when: SettleWhen) -> Settled {
        let outcome = match when {
            SettleWhen::Last => {
                self.final_settle(ledger).await;
                return Settled::Done;
            }
            SettleWhen::Due | SettleWhen::Tick { .. } => self.settle_prefix(ledger).await,
        };
        let ending = match when {
            SettleWhen::Tick { ending } => ending,
            SettleWhen::Due | SettleWhen::Last => {
                return match outcome {
                    Outcome::ServerGoingDown => Settled::Stop(Stop::abort(SERVER_GOING_DOWN)),
                    Outcome::Failed => Settled::Failed,
                    _ => Settled::Done,
                };
            }
        };
        match outcome {
            // PostgreSQL's shutdown waits for this stream to confirm everything
            // it sent, which cannot happen now: close the stream at once.
            Outcome::ServerGoingDown => return Settled::Stop(Stop::abort(SERVER_GOING_DOWN)),
            // A shutdown often shows as connections refused or a pool timeout:
            // the lock session tells at once whether the server is still there.
            Outcome::Failed if !ending && !self.leadership.check().await => {
                return Settled::Stop(Stop::abort(LEADER_LOST));
            }
            _ => {}
        }
        self.stats
            .wal
            .confirmed_lsn
            .store(self.source.positions().reported.as_u64(), Ordering::Relaxed);
        // Record and report the position here, outside the select: a flush
        // inside `next_transaction` can be cut short when another branch wins.
        // Every settled prefix is recorded within `record_interval`.
        let record_interval = self.wal.status_interval.min(POSITION_RECORD_INTERVAL);
        if self.last_flush.elapsed() >= record_interval {
            self.last_flush = Instant::now();
            if let Err(error) = self.source.flush().await {
                tracing::warn!(%error, "could not record the confirmed position");
            }
        }
        match outcome {
            Outcome::Failed => Settled::Failed,
            Outcome::Nothing | Outcome::Later => Settled::Nothing,
            Outcome::Done | Outcome::ServerGoingDown => Settled::Done,
        }
    }

    async fn close(self, graceful: bool) {
        self.sampler.abort();
        // Bounded: a shutdown must not wait for a slow database on top of the grace.
        match tokio::time::timeout(2 * CLOSE_TIMEOUT, self.source.shutdown()).await {
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
    }
}

#[cfg(test)]
#[path = "units_tests.rs"]
mod tests;
