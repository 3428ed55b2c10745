//! Retry timing: exponential backoff with jitter and a cap, the circuit breaker,
//! and deadlines on database calls.

use std::time::Duration;

/// Exponential backoff with "equal jitter": the n-th delay is uniformly drawn from
/// `[d/2, d]` where `d = min(max, initial * 2^n)`, so retries of many relays or
/// keys spread out instead of arriving together.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial`, never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The delay after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = Self::delay_for(self.initial, self.max, self.failures);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Forget past failures (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The jittered delay before retry number `attempt` (0-based) of one event.
    pub fn delay_for(initial: Duration, max: Duration, attempt: u32) -> Duration {
        let factor = 2_u32.saturating_pow(attempt.min(30));
        let capped = initial.saturating_mul(factor).min(max.max(initial));
        let half = capped / 2;
        let jitter_nanos = rand::random_range(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_within_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut previous_cap = Duration::ZERO;
        for n in 0..20 {
            let d = backoff.next_delay();
            let cap =
                (Duration::from_millis(100) * 2_u32.pow(n.min(10))).min(Duration::from_secs(2));
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {n}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
            assert!(cap >= previous_cap);
            previous_cap = cap;
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}

/// State of a [`CircuitBreaker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Normal operation.
    Closed,
    /// The broker failed repeatedly: nothing is claimed or published until the probe time.
    Open,
    /// Probing: one small batch decides whether to close or open again.
    HalfOpen,
}

impl BreakerState {
    /// Numeric value for the metric (0 closed, 1 open, 2 half-open).
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

/// A circuit breaker around the sink: after `threshold` consecutive failed
/// rounds it opens, so a dead broker is not hammered and the database is not
/// polled for work that cannot be published; after a backoff it lets one probe
/// through (half-open) and closes on success or opens again, waiting longer.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    consecutive_failures: u32,
    state: BreakerState,
    open_backoff: Backoff,
    probe_at: Option<tokio::time::Instant>,
}

impl CircuitBreaker {
    /// A closed breaker that opens after `threshold` consecutive failures and
    /// waits between `initial` and `max` (growing) before each probe.
    pub fn new(threshold: u32, initial: Duration, max: Duration) -> Self {
        CircuitBreaker {
            threshold: threshold.max(1),
            consecutive_failures: 0,
            state: BreakerState::Closed,
            open_backoff: Backoff::new(initial, max),
            probe_at: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// How long to wait before work may be attempted (zero unless open);
    /// moves an open breaker whose wait is over to half-open.
    pub fn wait(&mut self) -> Duration {
        match (self.state, self.probe_at) {
            (BreakerState::Open, Some(at)) => {
                let now = tokio::time::Instant::now();
                if now >= at {
                    self.state = BreakerState::HalfOpen;
                    tracing::info!("circuit breaker half-open: probing the broker");
                    Duration::ZERO
                } else {
                    at - now
                }
            }
            _ => Duration::ZERO,
        }
    }

    /// A round succeeded (something was delivered).
    pub fn record_success(&mut self) {
        if self.state != BreakerState::Closed {
            tracing::info!("circuit breaker closed: the broker is back");
        }
        self.state = BreakerState::Closed;
        self.consecutive_failures = 0;
        self.open_backoff.reset();
        self.probe_at = None;
    }

    /// A round failed for broker or network reasons; returns the state after it.
    pub fn record_failure(&mut self) -> BreakerState {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.state == BreakerState::HalfOpen || self.consecutive_failures >= self.threshold {
            let wait = self.open_backoff.next_delay();
            if self.state != BreakerState::Open {
                tracing::warn!(
                    failures = self.consecutive_failures,
                    probe_in_ms = wait.as_millis() as u64,
                    "circuit breaker open: pausing claims and publishes"
                );
            }
            self.state = BreakerState::Open;
            self.probe_at = Some(tokio::time::Instant::now() + wait);
        }
        self.state
    }
}

#[cfg(test)]
mod breaker_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_probes_and_closes() {
        let mut breaker = CircuitBreaker::new(3, Duration::from_secs(1), Duration::from_secs(8));
        assert_eq!(breaker.record_failure(), BreakerState::Closed);
        assert_eq!(breaker.record_failure(), BreakerState::Closed);
        assert_eq!(breaker.record_failure(), BreakerState::Open);
        let wait = breaker.wait();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        tokio::time::advance(wait).await;
        assert_eq!(breaker.wait(), Duration::ZERO);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // A failed probe opens it again at once, waiting longer.
        assert_eq!(breaker.record_failure(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(breaker.wait(), Duration::ZERO);
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.record_failure(), BreakerState::Closed);
    }
}

/// Longest each closing step (final position, replication stream, leader lock,
/// leases, broker connection) may take once the grace period is over.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// A database call that failed or did not answer within its deadline; each
/// error type of the crate converts it into its own variants.
#[derive(Debug)]
pub(crate) enum DbCallFailure {
    /// The driver returned an error.
    Failed {
        /// What the caller was doing.
        operation: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The deadline passed first.
    TimedOut {
        /// What the caller was doing.
        operation: &'static str,
        /// The deadline that passed.
        timeout_ms: u64,
    },
}

/// Run a database call with a client-side deadline: `statement_timeout` cannot fire
/// when the network to the server stalls.
pub(crate) async fn db_call<T, E: From<DbCallFailure>>(
    operation: &'static str,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, E> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|source| DbCallFailure::Failed { operation, source }.into()),
        Err(_) => Err(DbCallFailure::TimedOut {
            operation,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }
        .into()),
    }
}
