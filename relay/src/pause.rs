//! Pausing publishing without stopping the relays (`outbox-relay pause` /
//! `resume`): a row per instance group in `<schema>.relay_pause`. Every relay of
//! the group reads it every [`CHECK_INTERVAL`] and takes no new events while it
//! exists; in-flight events finish. `status` and `/readyz` show it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::SchemaName;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::watch;

use crate::{RelayError, Result};

/// How often relays read the pause row: a pause takes effect within this time.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The instance group of relays that set none (`instance.group`).
pub const DEFAULT_GROUP: &str = "default";

/// A `relay_pause` row: group, since, by, reason.
type PauseRow = (String, DateTime<Utc>, String, String);

/// A pause in effect.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pause {
    /// The paused instance group.
    pub instance_group: String,
    /// Since when.
    pub paused_at: DateTime<Utc>,
    /// Who paused (user and host of the command, or what they passed).
    pub paused_by: String,
    /// Why, as given.
    pub reason: String,
}

/// Pause `group` (idempotent: a second pause keeps the first one's time and updates the reason).
pub async fn pause(
    pool: &PgPool,
    schema: &SchemaName,
    group: &str,
    by: &str,
    reason: &str,
) -> Result<Pause> {
    let table = schema.qualify("relay_pause");
    let (paused_at,): (DateTime<Utc>,) = sqlx::query_as(AssertSqlSafe(format!(
        "insert into {table} (instance_group, paused_by, reason) values ($1, $2, $3) \
         on conflict (instance_group) do update set reason = excluded.reason, paused_by = excluded.paused_by \
         returning paused_at"
    )))
    .bind(group)
    .bind(by)
    .bind(reason)
    .fetch_one(pool)
    .await
    .map_err(RelayError::database("pausing the relays"))?;
    Ok(Pause {
        instance_group: group.to_owned(),
        paused_at,
        paused_by: by.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Resume `group`; returns whether it was paused.
pub async fn resume(pool: &PgPool, schema: &SchemaName, group: &str) -> Result<bool> {
    let table = schema.qualify("relay_pause");
    let deleted = sqlx::query(AssertSqlSafe(format!(
        "delete from {table} where instance_group = $1"
    )))
    .bind(group)
    .execute(pool)
    .await
    .map_err(RelayError::database("resuming the relays"))?
    .rows_affected();
    Ok(deleted > 0)
}

/// Every pause in effect in `schema`.
pub async fn pauses(pool: &PgPool, schema: &SchemaName) -> Result<Vec<Pause>> {
    let table = schema.qualify("relay_pause");
    let rows: Vec<PauseRow> = sqlx::query_as(AssertSqlSafe(format!(
        "select instance_group, paused_at, paused_by, reason from {table} order by instance_group"
    )))
    .fetch_all(pool)
    .await
    .map_err(RelayError::database("reading pauses"))?;
    Ok(rows
        .into_iter()
        .map(|(instance_group, paused_at, paused_by, reason)| Pause {
            instance_group,
            paused_at,
            paused_by,
            reason,
        })
        .collect())
}

/// Keep `paused` (and `stats.paused`) equal to whether `group` is paused,
/// reading every [`CHECK_INTERVAL`] until `shutdown`. A failed read keeps the last state.
pub(crate) async fn watch_pause(
    pool: PgPool,
    schema: SchemaName,
    group: String,
    paused: watch::Sender<Option<Pause>>,
    stats: std::sync::Arc<crate::RelayStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let table = schema.qualify("relay_pause");
    let sql = format!(
        "select instance_group, paused_at, paused_by, reason from {table} where instance_group = $1"
    );
    loop {
        let row: std::result::Result<Option<PauseRow>, _> =
            sqlx::query_as(AssertSqlSafe(sql.as_str()))
                .bind(&group)
                .fetch_optional(&pool)
                .await;
        match row {
            Ok(row) => {
                let now = row.map(|(instance_group, paused_at, paused_by, reason)| Pause {
                    instance_group,
                    paused_at,
                    paused_by,
                    reason,
                });
                paused.send_if_modified(|current| {
                    if *current == now {
                        return false;
                    }
                    match &now {
                        Some(pause) => tracing::warn!(
                            group = %pause.instance_group,
                            by = %pause.paused_by,
                            reason = %pause.reason,
                            "publishing paused by an operator; outbox-relay resume continues"
                        ),
                        None => tracing::info!(%group, "publishing resumed"),
                    }
                    *current = now.clone();
                    true
                });
                stats
                    .paused
                    .store(now.is_some(), std::sync::atomic::Ordering::Relaxed);
            }
            Err(error) => {
                tracing::debug!(%error, "reading the pause row failed; keeping the last state");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}
