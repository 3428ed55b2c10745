//! Shared pieces of the examples: the order service's own table, and the
//! replication-slot helpers of the benchmarks.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::PgPool;

/// How long a benchmark waits for a relay's walsender to release its slot.
pub const SLOT_RELEASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Schema of the example order service's business tables.
pub const SHOP_SCHEMA: &str = "shop";

/// Create the order service's `shop.orders` table if it is missing.
pub async fn create_shop_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "create schema if not exists shop;
         create table if not exists shop.orders (
             id          bigint generated always as identity primary key,
             customer    text not null,
             total_cents bigint not null,
             status      text not null,
             version     bigint not null default 1,
             updated_at  timestamptz not null default now()
         );",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether a walsender streams from `slot` (it has left the `startup` state of slot creation).
pub async fn slot_streaming(pool: &PgPool, slot: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "select coalesce(bool_or(r.state in ('catchup', 'streaming')), false) \
         from pg_replication_slots s join pg_stat_replication r on r.pid = s.active_pid \
         where s.slot_name = $1",
    )
    .bind(slot)
    .fetch_one(pool)
    .await?)
}

/// `Some(active)` when the slot exists.
pub async fn slot_state(pool: &PgPool, slot: &str) -> anyhow::Result<Option<bool>> {
    Ok(
        sqlx::query_scalar("select active from pg_replication_slots where slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await?,
    )
}

/// Drop `slot` once no session streams from it (so it does not pin WAL); nothing if it is gone.
pub async fn drop_slot(pool: &PgPool, slot: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match slot_state(pool, slot).await? {
            None => return Ok(()),
            Some(false) => {
                sqlx::query("select pg_drop_replication_slot($1)")
                    .bind(slot)
                    .execute(pool)
                    .await
                    .with_context(|| format!("dropping replication slot {slot}"))?;
                return Ok(());
            }
            Some(true) if started.elapsed() > SLOT_RELEASE_TIMEOUT => {
                anyhow::bail!(
                    "replication slot {slot} is still active after {SLOT_RELEASE_TIMEOUT:?}"
                )
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Delete a benchmark's RabbitMQ queue and exchange (both named `name`); best effort.
pub async fn delete_queue_and_exchange(amqp_url: &str, name: &str) -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let connection =
        lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let _ = channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await;
    Ok(())
}
