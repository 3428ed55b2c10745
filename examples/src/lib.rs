//! Shared pieces of the examples: the order service's own table, when the
//! consumers stop ([`wait_for_stop`]), and the replication-slot helpers of the
//! benchmarks.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::PgPool;

/// How long a benchmark waits for a relay's walsender to release its slot.
pub const SLOT_RELEASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Schema of the example order service's business tables.
pub const SHOP_SCHEMA: &str = "shop";

/// Create the order service's `shop.orders` table if it is missing. Safe to run
/// from several instances at once (`create … if not exists` alone is not: two
/// sessions can both find the schema missing), so it runs under an advisory lock.
pub async fn create_shop_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtext('outbox-examples.shop'))")
        .execute(&mut *tx)
        .await?;
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
    .execute(&mut *tx)
    .await?;
    tx.commit().await
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

/// Why a consumer example stopped taking messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Its effects table holds the `--expect`ed number of new rows.
    Expected,
    /// `--timeout-secs` passed first.
    Timeout,
    /// Ctrl-C or SIGTERM.
    Signal,
}

/// How often [`wait_for_stop`] counts the effects rows.
pub const STOP_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long the effects table may stay unreadable before a consumer gives up.
pub const DATABASE_OUTAGE_LIMIT: Duration = Duration::from_secs(30);

/// Wait until `count_sql` (a `select count(*) …` of the consumer's effects) has
/// grown by `expect` since the call (never, for 0), `timeout` passed (never, for
/// `None`), or the process got Ctrl-C / SIGTERM. An error when the database stays
/// unreachable for [`DATABASE_OUTAGE_LIMIT`].
///
/// The consumer helpers poll this future once they are subscribed: it prints
/// `ready` then (after the signal handlers are in place, so a signal from then on
/// stops the consumer cleanly). Every branch awaits (a timer, a signal, a query):
/// nothing here spins.
pub async fn wait_for_stop(
    pool: &PgPool,
    count_sql: &'static str,
    expect: u64,
    timeout: Option<Duration>,
    ready: &str,
) -> anyhow::Result<StopReason> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut signals = Signals::new().context("installing the signal handlers")?;
    println!("{ready}");
    let start = count_rows(pool, count_sql)
        .await
        .context("counting the consumer's effects at start")?;
    let mut tick = tokio::time::interval(STOP_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    loop {
        let timer = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signals.recv() => return Ok(StopReason::Signal),
            _ = timer => return Ok(StopReason::Timeout),
            _ = tick.tick() => {}
        }
        if expect == 0 {
            continue;
        }
        match count_rows(pool, count_sql).await {
            Ok(now) => {
                failing_since = None;
                if now.saturating_sub(start) >= expect {
                    return Ok(StopReason::Expected);
                }
            }
            Err(error) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > DATABASE_OUTAGE_LIMIT {
                    return Err(error).context(format!(
                        "PostgreSQL did not answer for {DATABASE_OUTAGE_LIMIT:?}"
                    ));
                }
            }
        }
    }
}

async fn count_rows(pool: &PgPool, count_sql: &'static str) -> Result<u64, sqlx::Error> {
    let count: i64 = sqlx::query_scalar(count_sql).fetch_one(pool).await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Ctrl-C and (on Unix) SIGTERM, caught from creation on: a signal that arrives
/// before [`Signals::recv`] is awaited is not lost and does not kill the process.
pub struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers now.
    pub fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// Completes on the next Ctrl-C or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => {}
                _ = self.interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How a consumer example ends: the exit message for `reason`, or an error when
/// `expect` messages were wanted and the timeout came first.
pub fn finish(
    name: &str,
    reason: StopReason,
    expect: u64,
    stats: &outbox_core::consumer::ConsumerStats,
) -> anyhow::Result<()> {
    println!(
        "{name}: handled {} exactly once, duplicates skipped {}, retries {}, dead-lettered {}",
        stats.handled, stats.duplicates, stats.retries, stats.dead_lettered
    );
    match reason {
        StopReason::Timeout if expect > 0 => anyhow::bail!(
            "the timeout passed before {expect} messages were handled (is the relay running?)"
        ),
        StopReason::Expected | StopReason::Timeout | StopReason::Signal => Ok(()),
    }
}
