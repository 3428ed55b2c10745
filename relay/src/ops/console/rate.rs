//! The publish rate shown on the overview, from the relay's published counter.
//! The relay keeps no rate itself; the console remembers when it saw which count.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window the rate is averaged over.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Samples of the published counter.
pub(crate) struct PublishRate {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl PublishRate {
    /// Start with one sample: `published` now.
    pub(crate) fn new(published: u64) -> Self {
        PublishRate {
            samples: Mutex::new(VecDeque::from([(Instant::now(), published)])),
        }
    }

    /// Record `published` now; the rate in events per second over the window (or
    /// since the first sample, if younger) and the seconds it covers; `None`
    /// until a second has passed.
    pub(crate) fn observe(&self, published: u64) -> Option<(f64, f64)> {
        self.observe_at(Instant::now(), published)
    }

    fn observe_at(&self, now: Instant, published: u64) -> Option<(f64, f64)> {
        let mut samples = self.samples.lock().ok()?;
        // Keep one sample at or beyond the window's start, so the window stays covered.
        while samples.len() > 1
            && samples
                .get(1)
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= RATE_WINDOW)
        {
            samples.pop_front();
        }
        let &(since, count) = samples.front()?;
        samples.push_back((now, published));
        if samples.len() > 1_000 {
            samples.pop_front();
        }
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        (elapsed >= 1.0).then(|| (published.saturating_sub(count) as f64 / elapsed, elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_over_the_window() {
        let start = Instant::now();
        let rate = PublishRate {
            samples: Mutex::new(VecDeque::from([(start, 100)])),
        };
        assert_eq!(rate.observe_at(start, 100), None, "no time has passed");
        let (per_sec, over) = rate
            .observe_at(start + Duration::from_secs(10), 150)
            .unwrap_or_default();
        assert!((per_sec - 5.0).abs() < 1e-9, "{per_sec}");
        assert!((over - 10.0).abs() < 1e-9);
        // Two minutes later the first samples fell out of the window.
        let (per_sec, over) = rate
            .observe_at(start + Duration::from_secs(130), 150)
            .unwrap_or_default();
        assert!(
            per_sec.abs() < 1e-9 && over >= 60.0,
            "{per_sec} over {over}"
        );
    }
}
