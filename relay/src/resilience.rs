//! Retry timing: exponential backoff with jitter and a cap.

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
