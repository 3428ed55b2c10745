//! WAL relays announce themselves for `outbox-relay status`: a `wal-instance:<id>`
//! row in `<schema>.relay_lease`, renewed every [`BEAT`] while the relay runs,
//! with `fencing_token` 1 while it leads its slot and 0 as a standby. (Polling
//! relays announce themselves with their `instance:<id>` lease.) The prefix
//! differs so the polling source's fair share of partitions counts only polling
//! relays.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_core::SchemaName;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::watch;

use crate::RelayStats;

/// How often the row is renewed.
pub(crate) const BEAT: Duration = Duration::from_secs(5);
/// How long a row outlives its last renewal.
const TTL: Duration = Duration::from_secs(15);

/// Renew this WAL relay's row until `shutdown`, then delete it.
pub(crate) async fn announce_wal_relay(
    pool: PgPool,
    schema: SchemaName,
    instance: String,
    stats: Arc<RelayStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let leases = schema.qualify("relay_lease");
    let upsert = format!(
        "insert into {leases} (name, owner, fencing_token, expires_at) \
         values ('wal-instance:' || $1, $1, $2, now() + make_interval(secs => $3)) \
         on conflict (name) do update set owner = excluded.owner, \
             fencing_token = excluded.fencing_token, expires_at = excluded.expires_at"
    );
    loop {
        let leader = i64::from(stats.wal.leader.load(Ordering::Relaxed));
        if let Err(error) = sqlx::query(AssertSqlSafe(upsert.as_str()))
            .bind(&instance)
            .bind(leader)
            .bind(TTL.as_secs_f64())
            .execute(&pool)
            .await
        {
            tracing::debug!(%error, "could not renew this relay's presence row");
        }
        tokio::select! {
            _ = tokio::time::sleep(BEAT) => {}
            _ = shutdown.changed() => break,
        }
    }
    let _ = sqlx::query(AssertSqlSafe(format!(
        "delete from {leases} where name = 'wal-instance:' || $1"
    )))
    .bind(&instance)
    .execute(&pool)
    .await;
}
