//! A lock-free latency histogram with fixed buckets, rendered as a Prometheus
//! `histogram` (cumulative `_bucket{le=…}`, `_sum` in seconds, `_count`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 1 ms to 60 s; `+Inf` is implied.
pub const BUCKETS_SECS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Observed durations: a count per bucket (not cumulative), their sum and count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_SECS.len()],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(index) = BUCKETS_SECS.iter().position(|bound| secs <= *bound) {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Append this histogram as `name` with `help` in the Prometheus text format;
    /// `labels` (e.g. `sink="kafka"`) go on every sample.
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let (with, alone) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        // Read the count first: buckets observed after it only make `+Inf` lag, never exceed.
        let count = self.count();
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_SECS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{with}le=\"{bound}\"}} {}",
                cumulative.min(count)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{with}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{alone} {sum}");
        let _ = writeln!(out, "{name}_count{alone} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets_sum_and_count() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(20));
        histogram.observe(Duration::from_secs(120));
        let mut out = String::new();
        histogram.render(&mut out, "x_seconds", "X.", "");
        assert!(out.contains("# TYPE x_seconds histogram\n"));
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.025\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 120.0205\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        let mut labelled = String::new();
        histogram.render(&mut labelled, "x_seconds", "X.", "sink=\"kafka\"");
        assert!(
            labelled.contains("x_seconds_bucket{sink=\"kafka\",le=\"+Inf\"} 3\n"),
            "{labelled}"
        );
        assert!(
            labelled.contains("x_seconds_count{sink=\"kafka\"} 3\n"),
            "{labelled}"
        );
    }
}
