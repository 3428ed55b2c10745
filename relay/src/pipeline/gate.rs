//! Admission: whether the loop may ask its source for more, and how much.
//!
//! The window comes first (a source admits while its admitted and unsettled
//! events are below its refill mark). Then, for a source that releases lanes on
//! broker trouble ([`RetryMode::Release`]), the circuit breaker: it is fed once
//! per settle round (a round with a delivery, or without broker trouble, is a
//! success) and gates admission; half-open, it admits one event alone, as the
//! probe. Keys whose event failed a probe are skipped by later probes, so one
//! event the broker keeps refusing (a nack, a closed channel) cannot keep the
//! breaker open for every key by being the oldest, probe after probe. A source
//! that retries in place ([`RetryMode::InPlace`]) has its breaker in the lanes
//! (`lane.rs`): admission is the window alone.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::PipelineConfig;
use crate::resilience::{BreakerState, CircuitBreaker};
use crate::source::{Admission, RetryMode, Window};
use crate::stats::RelayStats;

use super::lane::LaneDone;

/// Keys skipped by half-open probes at most (beyond that, probes take any key again).
const MAX_PROBE_SUSPECTS: usize = 64;

/// What the gate says.
#[derive(Debug)]
pub(crate) enum Gated {
    /// Ask the source, with this room.
    Admit(Admission),
    /// Not before this long (the breaker is open, or a failed round backs off).
    Wait(Duration),
    /// Not now (no room, or a probe waits for the lanes to empty).
    Hold,
}

/// The loop's state at admission time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) in_flight: usize,
    pub(crate) lanes_idle: bool,
    pub(crate) quiet: bool,
}

/// The admission gate of one loop.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Release mode only.
    breaker: Option<CircuitBreaker>,
    initial_backoff: Duration,
    /// What the lanes finished since the last settle did.
    delivered: usize,
    transient: u64,
    probe_suspects: Vec<String>,
    probe_key: Option<String>,
    /// After a failed round with the breaker still closed: wait this long when quiet.
    not_before: Option<Instant>,
}

impl Gate {
    pub(crate) fn new(config: &PipelineConfig, mode: RetryMode) -> Gate {
        let breaker = (mode == RetryMode::Release).then(|| {
            CircuitBreaker::new(
                config.breaker_failure_threshold,
                config.retry_backoff_initial,
                config.retry_backoff_max,
            )
        });
        Gate {
            breaker,
            initial_backoff: config.retry_backoff_initial,
            delivered: 0,
            transient: 0,
            probe_suspects: Vec::new(),
            probe_key: None,
            not_before: None,
        }
    }

    /// Whether to ask the source now, given its window and the loop's load.
    pub(crate) fn admission(&mut self, window: Window, load: Load, stats: &RelayStats) -> Gated {
        if load.in_flight >= window.refill_below {
            return Gated::Hold;
        }
        let room = window.limit.saturating_sub(load.in_flight).max(1);
        let mut admission = Admission {
            room,
            probe: false,
            lanes_idle: load.lanes_idle,
            quiet: load.quiet,
            skip_keys: Vec::new(),
        };
        let Some(breaker) = &mut self.breaker else {
            return Gated::Admit(admission);
        };
        // Only a quiet loop waits out a failed round; a busy one claims on.
        if let Some(at) = self.not_before.take()
            && load.quiet
        {
            let now = Instant::now();
            if now < at {
                self.not_before = Some(at);
                return Gated::Wait(at - now);
            }
        }
        stats.set_breaker(breaker.state());
        let wait = breaker.wait();
        if !wait.is_zero() {
            return Gated::Wait(wait);
        }
        stats.set_breaker(breaker.state());
        if breaker.state() == BreakerState::HalfOpen {
            // A probe goes alone: only when nothing else is in flight.
            if !load.quiet {
                return Gated::Hold;
            }
            admission.probe = true;
            admission.room = 1;
            admission.skip_keys = self.probe_suspects.clone();
        }
        Gated::Admit(admission)
    }

    /// The source admitted a unit whose first event is of `first_key`.
    pub(crate) fn admitted(&mut self, admission: &Admission, first_key: Option<String>) {
        if admission.probe {
            self.probe_key = first_key;
        }
    }

    /// The source had nothing to admit.
    pub(crate) fn found_nothing(&mut self, admission: &Admission) {
        if admission.probe
            && let Some(breaker) = &mut self.breaker
        {
            // Nothing (else) to probe with: the next event decides.
            self.probe_suspects.clear();
            breaker.record_success();
        }
    }

    /// A lane's result, for the round.
    pub(crate) fn collect(&mut self, done: &LaneDone) {
        self.delivered += done.delivered();
        self.transient += done.transient;
    }

    /// A settle round ran: feed the breaker with the round (release mode).
    pub(crate) fn round_settled(&mut self) {
        let (delivered, transient) = (self.delivered, self.transient);
        self.delivered = 0;
        self.transient = 0;
        let probed = self.probe_key.take();
        let Some(breaker) = &mut self.breaker else {
            return;
        };
        if delivered > 0 || transient == 0 {
            self.probe_suspects.clear();
            breaker.record_success();
            return;
        }
        if let Some(key) = probed
            && self.probe_suspects.len() < MAX_PROBE_SUSPECTS
        {
            tracing::info!(
                partition_key = %key,
                "the breaker's probe failed; the next probe tries another key"
            );
            self.probe_suspects.push(key);
        }
        if breaker.record_failure() == BreakerState::Closed {
            self.not_before = Some(Instant::now() + self.initial_backoff);
        }
    }

    /// The loop ended: a release-mode breaker reads closed again.
    pub(crate) fn close(&self, stats: &RelayStats) {
        if self.breaker.is_some() {
            stats.set_breaker(BreakerState::Closed);
        }
    }
}
