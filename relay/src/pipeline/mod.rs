//! The one relay loop: a [`Source`] yields units of keyed events, the loop
//! admits them in the ledger, publishes their events in per-key lanes to the
//! sink and settles what the ledger shows finished back to the source.
//!
//! ```text
//! loop:
//!   beat; collect every queued lane result, then reap finished lane tasks
//!   if ending: wait for idle lanes or the grace → abort the rest → settle → close
//!   settle if the source says it is due
//!   select biased { shutdown | source alarm | lane result | settle tick | breaker wait | source.next if admitted }
//!     Unit → ledger.admit → lanes.add → spawn ready keys;  End → start ending
//! ```
//!
//! * **Lanes** (`lanes.rs`): per-key FIFO across units, one task per key, under
//!   the `max_in_flight` semaphore; a task publishes its chunk in runs through
//!   [`Sink::publish_run`] (`lane.rs`).
//! * **Retry mode** ([`RetryMode`], the source's named choice): *release* stops
//!   a lane at broker trouble and drops the rest of its key (released, handed
//!   over again), with the breaker gating admission (`gate.rs`); *in place*
//!   retries the event with backoff, with the breaker gating every publish.
//! * **Ledger** (`ledger.rs`): every admitted unit in source order; an event is
//!   settled only once delivered or dead-lettered, through the source's view
//!   (any order, or the done prefix). Events count against the window from
//!   admission until settled, so the window bounds what a crash sends twice.
//! * **Stop**: on shutdown the loop stops admitting, gives lanes
//!   `shutdown_grace` (a source's own end may give another grace, or abort),
//!   collects every lane result already sent (else delivered rows would stay and
//!   be sent again), settles, then closes the source. The two `select!` orders
//!   that matter are kept `biased`: the source's alarm (the WAL leader check)
//!   before the settle tick, which a failing settle would otherwise keep ready.
//!
//! The source-specific halves: `source/polling/claims.rs`, `source/wal/units.rs`.
//! Crash points of the polling source are described in
//! `source/polling/claims.rs`, those of WAL in [`crate::source::wal`].

pub(crate) mod gate;
pub(crate) mod lane;
pub(crate) mod lanes;
pub(crate) mod ledger;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::PipelineConfig;
use crate::error::Result;
use crate::resilience::CircuitBreaker;
use crate::route::Router;
use crate::sink::Sink;
use crate::source::{
    Ending, LaneItem, Next, RetryMode, SessionEnd, SettleWhen, Settled, Source, SourceLedger, Stop,
};
use crate::stats::RelayStats;
use gate::{Gate, Gated, Load};
use lane::{LaneContext, LaneDone, Queued};
use lanes::{Keyed, Lanes};
use ledger::{Finished, UnitId};

/// Settle at least this often while work is done.
pub(crate) const SETTLE_INTERVAL: Duration = Duration::from_millis(20);

/// What the loop shares with every source: the sink and how to reach it.
pub(crate) struct Parts<K: Sink> {
    pub(crate) sink: Arc<K>,
    pub(crate) router: Router,
    pub(crate) config: PipelineConfig,
    pub(crate) stats: Arc<RelayStats>,
}

type Item<S> = Queued<<S as Source>::Token, <S as Source>::Item>;

/// Set when the loop is ending: why, since when, and the grace.
type Draining = Option<(Result<SessionEnd>, Instant, Duration)>;

/// What woke the loop.
enum Step<S: Source> {
    Nothing,
    Alarm,
    Lane(Option<LaneDone>),
    Tick,
    Next(Next<S::Token, S::Item>),
}

/// The loop's moving parts, apart from the source.
struct Flow<S: Source, K: Sink> {
    context: Arc<LaneContext<S::Lanes, K>>,
    lanes: Lanes<Item<S>>,
    ledger: SourceLedger<S>,
    gate: Gate,
    /// The units of each running lane's chunk, for a lane task that fails.
    running: HashMap<String, Vec<UnitId>>,
    done_tx: tokio::sync::mpsc::UnboundedSender<LaneDone>,
}

/// Run `source` until it ends or `shutdown` is true; then drain, settle and
/// close it. Returns how the session ended.
pub(crate) async fn run<S: Source, K: Sink>(
    mut source: S,
    parts: &Parts<K>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<SessionEnd> {
    let stats = parts.stats.clone();
    let breaker = (S::RETRY == RetryMode::InPlace).then(|| {
        std::sync::Mutex::new(CircuitBreaker::new(
            parts.config.breaker_failure_threshold,
            parts.config.retry_backoff_initial,
            parts.config.retry_backoff_max,
        ))
    });
    let context = Arc::new(LaneContext {
        publishing: tokio::sync::Semaphore::new(parts.config.max_in_flight),
        work: source.lane_work(),
        sink: parts.sink.clone(),
        router: parts.router.clone(),
        config: parts.config.clone(),
        stats: stats.clone(),
        mode: S::RETRY,
        breaker,
    });
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<LaneDone>();
    let mut flow: Flow<S, K> = Flow {
        context,
        lanes: Lanes::new(S::LANE_CHUNK),
        ledger: SourceLedger::<S>::default(),
        gate: Gate::new(&parts.config, S::RETRY),
        running: HashMap::new(),
        done_tx,
    };
    let mut settle_tick = tokio::time::interval(SETTLE_INTERVAL);
    settle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ending: Draining = None;

    let end = loop {
        stats.beat();
        // Collect every result a finished lane sent before reaping its task: a
        // lane counts as idle once its task is gone, and the last settle must
        // see what it delivered (else its rows stay and are sent again).
        while let Ok(done) = done_rx.try_recv() {
            flow.collect(done);
        }
        if let Some(stop) = flow.reap() {
            flow.lanes.abort_all();
            break stop.end;
        }
        flow.spawn_ready();
        if ending.is_none() && *shutdown.borrow() {
            ending = Some((
                Ok(SessionEnd::Shutdown),
                Instant::now(),
                parts.config.shutdown_grace,
            ));
        }
        if let Some((_, since, grace)) = &ending {
            let idle = flow.lanes.is_idle();
            if idle || since.elapsed() >= *grace {
                if !idle {
                    tracing::warn!(
                        lanes = flow.lanes.running(),
                        "grace period over with publishes in flight; they will be sent again"
                    );
                    flow.lanes.abort_all();
                }
                while let Ok(done) = done_rx.try_recv() {
                    flow.collect(done);
                }
                source.settle(&mut flow.ledger, SettleWhen::Last).await;
                let end = ending
                    .take()
                    .map_or(Ok(SessionEnd::Shutdown), |(end, _, _)| end);
                break end;
            }
        }
        if source.settle_due(&flow.ledger, flow.lanes.is_idle()) {
            let settled = source.settle(&mut flow.ledger, SettleWhen::Due).await;
            if let Some(stop) = flow.settled(settled) {
                break stop.end;
            }
        }

        // A pause by an operator stops admitting like a full window does;
        // in-flight events still finish.
        let quiet = flow.lanes.is_idle() && flow.ledger.finished_lanes() == 0;
        let gated = if ending.is_some() || stats.paused.load(Ordering::Relaxed) {
            Gated::Hold
        } else {
            let load = Load {
                in_flight: flow.ledger.in_flight(),
                lanes_idle: flow.lanes.is_idle(),
                quiet,
            };
            flow.gate.admission(source.window(), load, &stats)
        };
        let (admission, wait) = match gated {
            Gated::Admit(admission) => (Some(admission), None),
            Gated::Wait(wait) => (None, Some(wait)),
            Gated::Hold => (None, None),
        };
        let alarm = source.alarm(ending.is_some());
        let step: Step<S> = tokio::select! {
            biased;
            _ = shutdown.changed(), if ending.is_none() => Step::Nothing,
            // Before lane results and the settle tick: failing settles take
            // longer than the tick, which would otherwise always be ready.
            () = alarm => Step::Alarm,
            done = done_rx.recv() => Step::Lane(done),
            _ = settle_tick.tick() => Step::Tick,
            () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => Step::Nothing,
            next = source.next(admission.clone().unwrap_or_default()), if admission.is_some() => Step::Next(next),
        };
        match step {
            Step::Nothing | Step::Lane(None) => {}
            Step::Alarm => {
                if let Some(stop) = source.check(ending.is_some()).await
                    && let Some(end) = flow.stop(stop, &mut ending)
                {
                    break end;
                }
            }
            Step::Lane(Some(done)) => {
                flow.collect(done);
                flow.spawn_ready();
            }
            Step::Tick => {
                let when = SettleWhen::Tick {
                    ending: ending.is_some(),
                };
                let settled = source.settle(&mut flow.ledger, when).await;
                if let Some(stop) = flow.settled(settled) {
                    break stop.end;
                }
            }
            Step::Next(next) => {
                let admission = admission.unwrap_or_default();
                match next {
                    Next::Unit(unit) => {
                        let first = unit.items.first().map(|item| item.key());
                        flow.gate.admitted(&admission, first);
                        flow.admit(unit);
                    }
                    Next::Idle => flow.gate.found_nothing(&admission),
                    Next::End(stop) => {
                        if let Some(end) = flow.stop(stop, &mut ending) {
                            break end;
                        }
                    }
                }
            }
        }
    };
    drop(flow.done_tx);
    flow.lanes.shutdown().await;
    flow.gate.close(&stats);
    source
        .close(matches!(
            end,
            Ok(SessionEnd::Shutdown | SessionEnd::Fallback)
        ))
        .await;
    end
}

impl<S: Source, K: Sink> Flow<S, K> {
    /// Admit a unit: into the ledger, its items behind their keys' lanes.
    fn admit(&mut self, unit: crate::source::Unit<S::Token, S::Item>) {
        let token = Arc::new(unit.token);
        let id = self.ledger.admit(token.clone(), unit.items.len());
        for item in unit.items {
            self.lanes.add(Queued {
                unit: id,
                token: token.clone(),
                item,
            });
        }
        self.spawn_ready();
    }

    /// Start a task for every key with queued items and none running.
    fn spawn_ready(&mut self) {
        let (context, done_tx, running) = (&self.context, &self.done_tx, &mut self.running);
        self.lanes.spawn_ready(|key, items| {
            running.insert(
                key.clone(),
                items.iter().map(|queued| queued.unit).collect(),
            );
            let (context, done_tx) = (context.clone(), done_tx.clone());
            async move {
                let done = context.publish_lane(key, items).await;
                let _ = done_tx.send(done);
            }
        });
    }

    /// Record a lane's result in the ledger and the gate's round. A lane that
    /// stopped drops whatever of its key is still queued (released: handed over
    /// again, in order); the key's lane finishes once nothing of it is left (the
    /// any-order view frees it only after the settle that follows).
    fn collect(&mut self, done: LaneDone) {
        self.gate.collect(&done);
        self.running.remove(&done.key);
        if done.stopped() {
            for queued in self.lanes.release(&done.key) {
                self.ledger
                    .finish(queued.unit, queued.item.sequence(), Finished::Released);
            }
        }
        for (unit, sequence, finished) in done.finished {
            self.ledger.finish(unit, sequence, finished);
        }
        if self.lanes.finished(&done.key) {
            self.ledger.lane_finished(done.key);
        }
    }

    /// Reap finished lane tasks. A task that failed without reporting lost its
    /// events: released, they leave the window and the source hands them over
    /// again; a source that retries in place cannot, and restarts.
    fn reap(&mut self) -> Option<Stop> {
        for (key, error) in self.lanes.reap() {
            match S::RETRY {
                RetryMode::Release => {
                    tracing::error!(%error, key, "a publishing lane failed; its events will be claimed again");
                    for unit in self.running.remove(&key).unwrap_or_default() {
                        self.ledger.abandon(unit, 1);
                    }
                    for queued in self.lanes.release(&key) {
                        self.ledger.abandon(queued.unit, 1);
                    }
                    self.lanes.finished(&key);
                    self.ledger.lane_finished(key);
                }
                RetryMode::InPlace if error.is_panic() => {
                    tracing::error!(%error, "a publishing lane failed; restarting from the confirmed position");
                    return Some(Stop::abort(format!("a publishing lane failed: {error}")));
                }
                RetryMode::InPlace => {}
            }
        }
        None
    }

    /// The source stops: abort at once (returns the end), or start draining
    /// (a drain already under way keeps its reason and grace).
    fn stop(&mut self, stop: Stop, ending: &mut Draining) -> Option<Result<SessionEnd>> {
        match stop.ending {
            Ending::Abort => {
                self.lanes.abort_all();
                Some(stop.end)
            }
            Ending::Drain(grace) => {
                ending.get_or_insert((stop.end, Instant::now(), grace));
                None
            }
        }
    }

    /// After a settle: feed the gate's round, or stop.
    fn settled(&mut self, settled: Settled) -> Option<Stop> {
        match settled {
            Settled::Done => {
                self.gate.round_settled();
                None
            }
            Settled::Nothing | Settled::Failed => None,
            Settled::Stop(stop) => {
                self.lanes.abort_all();
                Some(stop)
            }
        }
    }
}
