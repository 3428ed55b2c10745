//! The WAL source's supervisor: one leader per slot, sessions restarted after
//! errors, and the fallback to polling when the retained-WAL budget is exceeded.
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
//! * **Session**: the one relay loop (`crate::pipeline::run`) over
//!   [`WalUnits`]; a broken stream or lost database ends the session (lanes get
//!   a short grace to finish) and a new one resumes from the confirmed position.
//! * **Position**: the confirmed position is recorded at most every 250 ms
//!   (and reported to the server every `status_interval`), so a crash re-sends
//!   at most the in-flight window plus about a quarter second of traffic.
//! * **Stop**: closing the stream, the leader lock and the broker connection is
//!   bounded by [`CLOSE_TIMEOUT`] each, so a hung broker adds at most a few
//!   seconds to the grace.
//! * **Fallback**: the supervisor drops the slot and *returns*
//!   [`WalRunEnd::FallBackToPolling`]; `lib.rs` starts the polling source, the
//!   one place that chooses it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{OverBudget, RelayConfig, WalConfig};
use crate::error::Result;
use crate::failpoint::failpoint;
use crate::pipeline::Parts;
use crate::resilience::{Backoff, CLOSE_TIMEOUT};
use crate::sink::Sink;
use crate::source::SessionEnd;
use crate::source::wal::leader::Leadership;
use crate::source::wal::rows::WalRows;
use crate::source::wal::units::{Drain, SessionParts, WalUnits, wal_end};
use crate::source::wal::{SlotMonitor, WalSource, WalStart};
use crate::stats::{RelayStats, RunSummary};

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
        let source = match started {
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
        let parts = Parts {
            sink: self.sink.clone(),
            router: self.config.router.clone(),
            config: self.config.pipeline.clone(),
            stats: self.stats.clone(),
        };
        let units = WalUnits::new(
            source,
            SessionParts {
                leadership,
                rows: self.rows.clone(),
                stats: self.stats.clone(),
                wal: self.wal.clone(),
                pipeline: self.config.pipeline.clone(),
                drain,
                over_budget: over_rx,
                sampler,
            },
        );
        crate::pipeline::run(units, &parts, shutdown).await
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
