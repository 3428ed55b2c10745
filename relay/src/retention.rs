//! Retention that keeps up: published rows (`settle = "mark"`) and the consumers'
//! inbox ids older than their windows are deleted continuously, in batches of
//! [`BATCH`] rows per short statement (`for update skip locked`, so a purge never
//! waits on a relay or a consumer, nor holds many locks). Unpublished rows
//! (`published_at is null`, blocked ones included) and the dead-letter table are
//! never touched.
//!
//! While a round deletes full batches the next round follows at once; after a
//! short one the task sleeps [`BUSY_PAUSE`], and [`IDLE_PAUSE`] after an empty one,
//! both at most half the shortest retention, so rows never wait long past theirs.

use std::time::Duration;

use outbox_core::{Inbox, InboxRetention, SchemaName};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::watch;

/// Rows deleted per statement.
pub const BATCH: i64 = 1_000;
/// Pause after a round that found fewer than a batch of old rows.
pub const BUSY_PAUSE: Duration = Duration::from_secs(1);
/// Pause after a round that found nothing to delete.
pub const IDLE_PAUSE: Duration = Duration::from_secs(10);
/// Batches at most per round, so one round never runs for long.
const ROUND_BATCHES: usize = 20;

/// What to purge, and how old it must be.
#[derive(Clone, Debug, Default)]
pub struct RetentionPlan {
    /// The outbox schema and how long published rows are kept (`settle = "mark"`).
    pub published: Option<(SchemaName, Duration)>,
    /// The inbox and its retention.
    pub inbox: Option<(SchemaName, InboxRetention)>,
}

impl RetentionPlan {
    /// Whether there is anything to purge.
    pub fn is_empty(&self) -> bool {
        self.published.is_none() && self.inbox.is_none()
    }

    /// The pauses after a short and after an empty round: [`BUSY_PAUSE`] and
    /// [`IDLE_PAUSE`], at most half the shortest retention (and at least 100 ms).
    pub fn pauses(&self) -> (Duration, Duration) {
        let shortest = [
            self.published.as_ref().map(|(_, retention)| *retention),
            self.inbox.as_ref().map(|(_, policy)| policy.retention()),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(IDLE_PAUSE * 2);
        let cap = (shortest / 2).max(Duration::from_millis(100));
        (BUSY_PAUSE.min(cap), IDLE_PAUSE.min(cap))
    }
}

/// The SQL that deletes one batch of published rows of `schema`'s outbox older
/// than `$1` seconds, at most `$2` rows.
pub fn purge_published_sql(schema: &SchemaName) -> String {
    let outbox = schema.qualify("outbox");
    format!(
        "delete from {outbox} where sequence = any(array(select sequence from {outbox} \
         where published_at < now() - make_interval(secs => $1) \
         order by published_at limit $2 for update skip locked))"
    )
}

/// Rows deleted by one round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Published outbox rows.
    pub published: u64,
    /// Inbox ids.
    pub inbox_ids: u64,
}

/// One round: up to [`ROUND_BATCHES`] batches of each kind; returns what it
/// deleted and whether a kind still had full batches left.
pub async fn purge_round(pool: &PgPool, plan: &RetentionPlan) -> crate::Result<(Purged, bool)> {
    let mut purged = Purged::default();
    let mut more = false;
    if let Some((schema, retention)) = &plan.published {
        let sql = purge_published_sql(schema);
        for _ in 0..ROUND_BATCHES {
            let deleted = sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(retention.as_secs_f64())
                .bind(BATCH)
                .execute(pool)
                .await
                .map_err(|source| crate::RelayError::Database {
                    operation: "purging published rows",
                    source,
                })?
                .rows_affected();
            purged.published += deleted;
            if deleted < BATCH as u64 {
                break;
            }
            more = true;
        }
    }
    if let Some((schema, retention)) = &plan.inbox {
        let inbox = Inbox::new(schema.clone());
        for _ in 0..ROUND_BATCHES {
            let deleted = inbox.purge_batch(pool, retention, BATCH).await?;
            purged.inbox_ids += deleted;
            if deleted < BATCH as u64 {
                break;
            }
            more = true;
        }
    }
    Ok((purged, more))
}

/// Purge by `plan` until `shutdown`; database errors are logged and retried next round.
pub(crate) async fn run(pool: PgPool, plan: RetentionPlan, mut shutdown: watch::Receiver<bool>) {
    let (busy_pause, idle_pause) = plan.pauses();
    loop {
        let pause = match purge_round(&pool, &plan).await {
            Ok((_, true)) => Duration::ZERO,
            Ok((purged, false)) if purged == Purged::default() => idle_pause,
            Ok((purged, false)) => {
                tracing::debug!(
                    published = purged.published,
                    inbox_ids = purged.inbox_ids,
                    "retention purged old rows"
                );
                busy_pause
            }
            Err(error) => {
                tracing::warn!(%error, "retention: purging old rows failed; retrying");
                idle_pause
            }
        };
        if *shutdown.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_at_most_half_the_shortest_retention() {
        let schema = SchemaName::new("outbox").unwrap();
        let day = RetentionPlan {
            published: Some((schema.clone(), Duration::from_secs(86_400))),
            inbox: None,
        };
        assert_eq!(day.pauses(), (BUSY_PAUSE, IDLE_PAUSE));
        let second = RetentionPlan {
            published: Some((schema, Duration::from_secs(1))),
            inbox: None,
        };
        assert_eq!(
            second.pauses(),
            (Duration::from_millis(500), Duration::from_millis(500))
        );
    }
}
