//! What the WAL source's lanes do besides publishing: retry a rejected event in
//! place, counting its attempts (on the row too, in table mode, so a restarted
//! relay continues the count and `status` shows it), then dead-letter it; and
//! dead-letter a change that is no event with its raw content.
//!
//! * **Rejections**: an event the broker rejects is retried up to
//!   `pipeline.max_attempts` and then dead-lettered, and its key moves on. A
//!   [permanent](crate::sink::SinkError::is_permanent) rejection is
//!   dead-lettered at its first attempt.
//! * **Hostile input**: a change that is no event (a WAL message with the
//!   outbox prefix that does not decode, a row with an infinite `created_at`)
//!   is dead-lettered at once with its raw content and the reason, on a lane of
//!   its own key (a malformed message: `wal-message:<lsn>`); its transaction is
//!   confirmed as usual, so the slot moves past it and the stream never stops.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::config::PipelineConfig;
use crate::event::OutboxEvent;
use crate::failpoint::failpoint;
use crate::pipeline::lanes::Keyed;
use crate::resilience::Backoff;
use crate::sink::SinkError;
use crate::source::wal::Undecodable;
use crate::source::wal::rows::WalRows;
use crate::source::wal::units::{STRAY_RETRY_INTERVAL, WalUnit};
use crate::source::{LaneItem, LaneWork, Verdict};
use crate::stats::RelayStats;

/// How long a streamed row to dead-letter is looked for when it is not visible
/// yet (its commit can reach the stream microseconds before other sessions see it).
const UNDECODABLE_ROW_WAIT: Duration = Duration::from_secs(5);

/// One event (or one undecodable change) on its way through a lane.
#[derive(Debug)]
pub(crate) enum WalItem {
    /// Publish it until it is delivered or dead-lettered.
    Publish {
        event: OutboxEvent,
        /// It has a table row (table mode, or a drained row).
        has_row: bool,
        /// Rejections so far.
        attempts: u32,
    },
    /// A change that is no event: straight to the dead-letter table, never published.
    DeadLetter {
        undecodable: Undecodable,
        committed_at: DateTime<Utc>,
    },
}

impl WalItem {
    pub(crate) fn publish(event: OutboxEvent, has_row: bool) -> WalItem {
        WalItem::Publish {
            event,
            has_row,
            attempts: 0,
        }
    }
}

impl Keyed for WalItem {
    /// The lane: the event's partition key; a malformed WAL message has none and
    /// gets a key of its own, so it can hold back nothing.
    fn key(&self) -> String {
        match self {
            WalItem::Publish { event, .. } => event.partition_key.clone(),
            WalItem::DeadLetter {
                undecodable: Undecodable::Row { partition_key, .. },
                ..
            } => partition_key.clone(),
            WalItem::DeadLetter {
                undecodable: Undecodable::Message(message),
                ..
            } => format!("wal-message:{}", message.lsn),
        }
    }
}

impl LaneItem for WalItem {
    fn event(&self) -> Option<&OutboxEvent> {
        match self {
            WalItem::Publish { event, .. } => Some(event),
            WalItem::DeadLetter { .. } => None,
        }
    }

    fn sequence(&self) -> i64 {
        match self {
            WalItem::Publish { event, .. } => event.sequence,
            WalItem::DeadLetter {
                undecodable: Undecodable::Row { sequence, .. },
                ..
            } => *sequence,
            WalItem::DeadLetter { .. } => 0,
        }
    }
}

/// Shared by the lane tasks of a session.
pub(crate) struct WalLanes {
    rows: WalRows,
    config: PipelineConfig,
    stats: Arc<RelayStats>,
}

impl WalLanes {
    pub(crate) fn new(rows: WalRows, config: PipelineConfig, stats: Arc<RelayStats>) -> WalLanes {
        WalLanes {
            rows,
            config,
            stats,
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        )
    }

    fn delay_for(&self, attempts: u32) -> Duration {
        Backoff::delay_for(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
            attempts.saturating_sub(1),
        )
    }

    /// Move a poison event to the dead-letter table, retrying database trouble.
    async fn dead_letter(&self, event: &OutboxEvent, has_row: bool, attempts: u32, error: &str) {
        let mut backoff = self.backoff();
        loop {
            match self.rows.dead_letter(event, has_row, attempts, error).await {
                Ok(()) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        sequence = event.sequence,
                        event_id = %event.event_id,
                        event_type = %event.event_type,
                        attempts,
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

    /// Move a change that is no event to the dead-letter table (raw values kept),
    /// retrying database trouble; a row found in neither table (not visible yet)
    /// is looked for again for up to [`UNDECODABLE_ROW_WAIT`].
    async fn dead_letter_undecodable(
        &self,
        undecodable: &Undecodable,
        committed_at: DateTime<Utc>,
    ) {
        let mut backoff = self.backoff();
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
}

impl LaneWork for WalLanes {
    type Token = WalUnit;
    type Item = WalItem;

    /// Count the attempt (on the row too: durable across restarts, seen by
    /// `status`); retry in place after a backoff, or dead-letter it after its
    /// last attempt. A permanent rejection (over a size limit, a name the
    /// protocol cannot carry) fails the same way every time: no retry.
    async fn reject(&self, token: &WalUnit, item: &mut WalItem, error: &SinkError) -> Verdict {
        let WalItem::Publish {
            event,
            has_row,
            attempts,
        } = item
        else {
            return self.dispose(token, item).await;
        };
        *attempts += 1;
        if *attempts >= self.config.max_attempts || error.is_permanent() {
            self.dead_letter(event, *has_row, *attempts, &error.message)
                .await;
            return Verdict::DeadLettered;
        }
        let mut delay = self.delay_for(*attempts);
        if *has_row {
            match self
                .rows
                .record_rejection(event.sequence, &error.message, delay)
                .await
            {
                Ok(Some(on_row)) if on_row > *attempts => {
                    *attempts = on_row;
                    if *attempts >= self.config.max_attempts {
                        self.dead_letter(event, *has_row, *attempts, &error.message)
                            .await;
                        return Verdict::DeadLettered;
                    }
                    delay = self.delay_for(*attempts);
                }
                Ok(_) => {}
                Err(db_error) => tracing::debug!(
                    %db_error,
                    "could not count the attempt on the row; counting it in memory"
                ),
            }
        }
        tracing::warn!(
            sequence = event.sequence,
            event_id = %event.event_id,
            attempts = *attempts,
            retry_in_ms = delay.as_millis() as u64,
            %error,
            "broker rejected the event; its key waits for the retry"
        );
        Verdict::RetryAfter(delay)
    }

    async fn dispose(&self, _token: &WalUnit, item: &mut WalItem) -> Verdict {
        if let WalItem::DeadLetter {
            undecodable,
            committed_at,
        } = item
        {
            self.dead_letter_undecodable(undecodable, *committed_at)
                .await;
        }
        Verdict::DeadLettered
    }

    fn delivered(&self, _item: &WalItem) {
        failpoint!("wal.publish.confirmed");
    }
}
