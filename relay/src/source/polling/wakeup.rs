//! When to claim again: adaptive polling and the opt-in NOTIFY.

use std::time::Duration;

use sqlx::postgres::PgListener;

/// Shortest wait between two claims that found nothing, while events flow.
const FIRST_IDLE_POLL: Duration = Duration::from_millis(2);

/// Wakes the claim loop when rows may be there: polling that tightens while events
/// flow and backs off when idle, and a NOTIFY where the opt-in insert trigger sends one.
///
/// Inserts do not notify by default (NOTIFY serialises the writers' commits, see
/// migrations/0004): after a claim that found events the next wait is
/// [`FIRST_IDLE_POLL`], and each empty wait doubles it up to `poll_interval`. So a
/// steady flow is claimed within milliseconds, and an idle relay sends one cheap claim
/// query per `poll_interval`.
#[derive(Debug)]
pub struct Wakeup {
    pub(super) listener: Option<PgListener>,
    pub(super) channel: String,
    pub(super) poll_interval: Duration,
    /// Waits since a claim last found events.
    pub(super) idle_waits: u32,
    /// When the wait under way ends: kept when the wait is cancelled, so the
    /// relay loop can race it against lane results and resume it.
    pub(super) deadline: Option<tokio::time::Instant>,
}

impl Wakeup {
    /// A claim found events: poll again soon after the next empty one.
    pub fn found_work(&mut self) {
        self.idle_waits = 0;
    }

    /// How long the next wait lasts unless a notification comes first.
    fn next_interval(&self) -> Duration {
        let doublings = self.idle_waits.min(16);
        FIRST_IDLE_POLL
            .saturating_mul(1_u32 << doublings)
            .min(self.poll_interval)
    }

    /// Wait until new rows may be there: the adaptive poll interval, or a NOTIFY.
    /// Cancel-safe: a cancelled wait resumes with the same deadline.
    pub async fn wait_for_work(&mut self) {
        let deadline = match self.deadline {
            Some(deadline) => deadline,
            None => {
                let interval = self.next_interval();
                self.idle_waits = self.idle_waits.saturating_add(1);
                *self.deadline.insert(tokio::time::Instant::now() + interval)
            }
        };
        self.wait_until(deadline).await;
        self.deadline = None;
    }

    async fn wait_until(&mut self, deadline: tokio::time::Instant) {
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep_until(deadline).await;
            return;
        };
        match tokio::time::timeout_at(deadline, listener.try_recv()).await {
            Ok(Ok(Some(_))) => {
                // Notifications that piled up while we worked all mean the same: there is work.
                while let Ok(Ok(Some(_))) =
                    tokio::time::timeout(Duration::ZERO, listener.try_recv()).await
                {
                }
                self.idle_waits = 0;
            }
            Ok(Ok(None)) => {
                tracing::warn!(channel = %self.channel, "LISTEN connection lost; it reconnects on the next wait");
                tokio::time::sleep_until(deadline).await;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "LISTEN failed; polling on the interval until it recovers");
                tokio::time::sleep_until(deadline).await;
            }
            Err(_elapsed) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_tightens_after_work_and_backs_off_to_the_poll_interval_when_idle() {
        let mut wakeup = Wakeup {
            listener: None,
            channel: "outbox.outbox".into(),
            poll_interval: Duration::from_millis(250),
            idle_waits: 0,
            deadline: None,
        };
        let mut waits = Vec::new();
        for _ in 0..10 {
            waits.push(wakeup.next_interval().as_millis());
            wakeup.idle_waits += 1;
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 250, 250, 250]);
        wakeup.idle_waits = u32::MAX;
        assert_eq!(wakeup.next_interval(), Duration::from_millis(250));
        wakeup.found_work();
        assert_eq!(wakeup.next_interval(), FIRST_IDLE_POLL);
    }
}
