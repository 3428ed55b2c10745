//! A periodic progress line while events flow: published so far, the rate since
//! the last line, the backlog and the oldest pending event's age. Silent while idle.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::RelayStats;

/// Log a progress line every `interval` in which events were published, until `shutdown`.
pub(crate) async fn report(
    stats: Arc<RelayStats>,
    pool: sqlx::PgPool,
    schema: outbox_core::SchemaName,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = stats.published.load(Ordering::Relaxed);
    let mut last_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let published = stats.published.load(Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        if published == last {
            last_at = now;
            continue;
        }
        let rate = rate_per_sec(published - last, now - last_at);
        (last, last_at) = (published, now);
        match super::metrics::sample_outbox(&pool, &schema).await {
            Ok(sample) => tracing::info!(
                published,
                rate_per_sec = rate,
                backlog = sample.pending,
                oldest_pending_age_secs = sample.oldest_age_secs,
                dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
                "progress"
            ),
            Err(error) => tracing::info!(
                published,
                rate_per_sec = rate,
                dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
                backlog_unknown = %error,
                "progress"
            ),
        }
    }
}

/// Events per second, rounded to one decimal.
fn rate_per_sec(events: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (events as f64 / secs * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::rate_per_sec;
    use std::time::Duration;

    #[test]
    fn rate_is_events_per_second() {
        assert_eq!(rate_per_sec(300, Duration::from_secs(30)), 10.0);
        assert_eq!(rate_per_sec(5, Duration::ZERO), 0.0);
    }
}
