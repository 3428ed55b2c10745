//! The body of a lane task: publish one key's chunk in order through
//! [`Sink::publish_run`], and say how each of its events left the lane.
//!
//! A chunk is published in runs: a run is the events up to the next item that
//! is no event (a polling row that does not decode, a WAL change that is no
//! event), which the source disposes of without publishing
//! ([`LaneWork::dispose`]). The sink returns outcomes for a prefix of the run,
//! all delivered but possibly the last; what follows that prefix was not
//! delivered and is handed over again: by the source's [`RetryMode`], released
//! (polling: the rows are claimed again) or retried in place from the first
//! failure (WAL). An event the broker refused goes to the source's
//! [`LaneWork::reject`], whose [`Verdict`] says whether the key moves on, waits
//! in place or stops.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::config::PipelineConfig;
use crate::pipeline::ledger::{Finished, UnitId};
use crate::resilience::{Backoff, CircuitBreaker};
use crate::route::{Route, Router};
use crate::sink::{Outcome, Sink};
use crate::source::{LaneItem, LaneWork, RetryMode, Verdict};
use crate::stats::RelayStats;

use super::lanes::Keyed;

/// An item in its key's lane, with the unit it came in.
#[derive(Debug)]
pub(crate) struct Queued<T, I> {
    pub(crate) unit: UnitId,
    pub(crate) token: Arc<T>,
    pub(crate) item: I,
}

impl<T: Send + Sync + 'static, I: LaneItem> Keyed for Queued<T, I> {
    fn key(&self) -> String {
        self.item.key()
    }
}

/// What one key's lane did: how each of its events left the lane, in order.
#[derive(Debug)]
pub(crate) struct LaneDone {
    pub(crate) key: String,
    /// `(unit, sequence, how)` per item of the chunk, in order.
    pub(crate) finished: Vec<(UnitId, i64, Finished)>,
    /// Broker or database trouble seen (release mode: feeds the breaker's round).
    pub(crate) transient: u64,
}

impl LaneDone {
    /// Events the broker confirmed.
    pub(crate) fn delivered(&self) -> usize {
        self.finished
            .iter()
            .filter(|(_, _, finished)| *finished == Finished::Delivered)
            .count()
    }

    /// The lane stopped before its last event: the rest of its key must wait.
    pub(crate) fn stopped(&self) -> bool {
        self.finished
            .last()
            .is_some_and(|(_, _, finished)| *finished == Finished::Released)
    }
}

/// The parts a lane task needs, shared by every lane of a loop.
pub(crate) struct LaneContext<W, K> {
    /// At most `max_in_flight` lanes publish at once.
    pub(crate) publishing: tokio::sync::Semaphore,
    pub(crate) work: Arc<W>,
    pub(crate) sink: Arc<K>,
    pub(crate) router: Router,
    pub(crate) config: PipelineConfig,
    pub(crate) stats: Arc<RelayStats>,
    pub(crate) mode: RetryMode,
    /// Retry in place only: the breaker that gates every publish of every lane.
    pub(crate) breaker: Option<std::sync::Mutex<CircuitBreaker>>,
}

impl<W: LaneWork, K: Sink> LaneContext<W, K> {
    /// Publish one key's chunk in order; see the module docs.
    pub(crate) async fn publish_lane(
        &self,
        key: String,
        mut lane: Vec<Queued<W::Token, W::Item>>,
    ) -> LaneDone {
        let mut done = LaneDone {
            key,
            finished: Vec::with_capacity(lane.len()),
            transient: 0,
        };
        // The semaphore is never closed; if it were, publishing without a permit is still correct.
        let _permit = self.publishing.acquire().await.ok();
        let mut backoff = Backoff::new(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
        );
        // `next`: the first item not finished yet.
        'lane: while let Some(head) = lane.get_mut(done.finished.len()) {
            let (unit, sequence) = (head.unit, head.item.sequence());
            if head.item.event().is_none() {
                let verdict = self.work.dispose(&head.token, &mut head.item).await;
                if !self.follow(verdict, unit, sequence, &mut done).await {
                    break 'lane;
                }
                continue;
            }
            self.wait_for_breaker().await;
            let start = done.finished.len();
            // A sink that waits for each confirm gets runs of one event, so each
            // event's crash point fires before the next one is published.
            let run_limit = if self.sink.max_in_flight_per_key() > 1 {
                usize::MAX
            } else {
                1
            };
            let outcomes = {
                let run: Vec<(&crate::event::OutboxEvent, Route)> = lane[start..]
                    .iter()
                    .take(run_limit)
                    .map_while(|queued| queued.item.event())
                    .map(|event| (event, self.router.route(event)))
                    .collect();
                self.sink.publish_run(&run).await
            };
            for (offset, outcome) in outcomes.into_iter().enumerate() {
                let Some(queued) = lane.get_mut(start + offset) else {
                    tracing::error!("the sink returned more outcomes than the run had events");
                    break 'lane;
                };
                let (unit, sequence) = (queued.unit, queued.item.sequence());
                match outcome {
                    Outcome::Delivered => {
                        self.work.delivered(&queued.item);
                        self.breaker_success();
                        backoff.reset();
                        done.finished.push((unit, sequence, Finished::Delivered));
                    }
                    Outcome::Retry(error) => {
                        self.stats
                            .transient_failures
                            .fetch_add(1, Ordering::Relaxed);
                        match self.mode {
                            RetryMode::Release => {
                                tracing::debug!(sequence, %error, "publish failed transiently");
                                done.transient += 1;
                                break 'lane;
                            }
                            RetryMode::InPlace => {
                                self.breaker_failure();
                                let delay = backoff.next_delay();
                                tracing::debug!(sequence, %error, retry_in_ms = delay.as_millis() as u64, "publish failed transiently");
                                tokio::time::sleep(delay).await;
                                continue 'lane;
                            }
                        }
                    }
                    Outcome::Rejected(error) => {
                        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        let verdict = self
                            .work
                            .reject(&queued.token, &mut queued.item, &error)
                            .await;
                        if !self.follow(verdict, unit, sequence, &mut done).await {
                            break 'lane;
                        }
                        // What followed the refused event in the run was not sent.
                        continue 'lane;
                    }
                }
            }
        }
        // The lane stopped: this event and the rest of the chunk were not
        // delivered; the source hands them over again, in order.
        for queued in &lane[done.finished.len()..] {
            done.finished
                .push((queued.unit, queued.item.sequence(), Finished::Released));
        }
        done
    }

    /// Act on a verdict for the head item; false when the lane stops.
    async fn follow(
        &self,
        verdict: Verdict,
        unit: UnitId,
        sequence: i64,
        done: &mut LaneDone,
    ) -> bool {
        match verdict {
            Verdict::DeadLettered => {
                done.finished.push((unit, sequence, Finished::DeadLettered));
                true
            }
            Verdict::RetryAfter(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            Verdict::Release { transient } => {
                done.transient += u64::from(transient);
                false
            }
        }
    }

    /// Retry in place: wait while the shared breaker is open.
    async fn wait_for_breaker(&self) {
        let Some(breaker) = &self.breaker else {
            return;
        };
        loop {
            let wait = breaker
                .lock()
                .map(|mut breaker| breaker.wait())
                .unwrap_or_default();
            if wait.is_zero() {
                return;
            }
            self.stats.breaker_state.store(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }

    fn breaker_success(&self) {
        if let Some(Ok(mut breaker)) = self.breaker.as_ref().map(|b| b.lock()) {
            breaker.record_success();
            self.stats.set_breaker(breaker.state());
        }
    }

    fn breaker_failure(&self) {
        if let Some(Ok(mut breaker)) = self.breaker.as_ref().map(|b| b.lock()) {
            let state = breaker.record_failure();
            self.stats.set_breaker(state);
        }
    }
}
