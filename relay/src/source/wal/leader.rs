//! One active WAL relay per slot: the leader holds a session-level advisory
//! lock on its own connection; standbys try to take it every `leader_retry`.
//!
//! PostgreSQL releases the lock the moment the leader's session ends (process
//! killed, connection lost), so a standby takes over within one retry interval
//! plus the time the slot stays busy (the WAL source waits for the old
//! walsender to go). The slot itself admits only one streaming session, so two
//! instances can never stream at once even when their views of the lock differ.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

use crate::config::DatabaseConfig;
use crate::error::{Result, db_call};
use crate::resilience::Backoff;
use crate::stats::RelayStats;

/// The held leader lock; dropping it (or losing its connection) gives it up.
#[derive(Debug)]
pub struct Leadership {
    connection: PgConnection,
    key: i64,
    timeout: Duration,
}

/// The advisory-lock key of `name` (stable across versions: `hashtextextended`).
async fn lock_key(connection: &mut PgConnection, name: &str, timeout: Duration) -> Result<i64> {
    db_call(
        "computing the leader lock key",
        timeout,
        sqlx::query_scalar::<_, i64>("select hashtextextended('outbox-relay:' || $1, 0)")
            .bind(name)
            .fetch_one(&mut *connection),
    )
    .await
}

impl Leadership {
    /// Wait until this instance holds the lock `name`, or `None` when `shutdown`
    /// turned true first. Connection failures are retried with backoff.
    pub async fn acquire(
        database: &DatabaseConfig,
        name: &str,
        retry: Duration,
        stats: &RelayStats,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Leadership>> {
        let timeout = database.connect_timeout.max(Duration::from_secs(1));
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut logged_standby = false;
        loop {
            stats.beat();
            if *shutdown.borrow() {
                return Ok(None);
            }
            let wait = match Self::try_once(database, name, timeout).await {
                Ok(Some(leadership)) => {
                    tracing::info!(lock = name, "became the WAL relay leader");
                    return Ok(Some(leadership));
                }
                Ok(None) => {
                    backoff.reset();
                    stats.database_reachable.store(true, Ordering::Relaxed);
                    if !logged_standby {
                        tracing::info!(
                            lock = name,
                            "another instance leads this slot; standing by"
                        );
                        logged_standby = true;
                    }
                    retry
                }
                Err(error) => {
                    stats.database_reachable.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot reach PostgreSQL to elect the WAL leader");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait.min(Duration::from_secs(5))) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn try_once(
        database: &DatabaseConfig,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<Leadership>> {
        let options = crate::connect_options(database)?;
        let mut connection =
            match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
                Ok(result) => result.map_err(crate::error::RelayError::database(
                    "connecting to PostgreSQL for the leader lock",
                ))?,
                Err(_) => {
                    return Err(crate::error::RelayError::DatabaseTimeout {
                        operation: "connecting to PostgreSQL for the leader lock",
                        timeout_ms: timeout.as_millis() as u64,
                    });
                }
            };
        let key = lock_key(&mut connection, name, timeout).await?;
        let locked = db_call(
            "taking the leader lock",
            timeout,
            sqlx::query_scalar::<_, bool>("select pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut connection),
        )
        .await?;
        Ok(locked.then_some(Leadership {
            connection,
            key,
            timeout,
        }))
    }

    /// True while the lock's session is alive (and so the lock still held).
    pub async fn check(&mut self) -> bool {
        db_call(
            "checking the leader lock",
            self.timeout,
            // A session-level lock lives as long as its session: a live session holds it.
            sqlx::query_scalar::<_, bool>("select true").fetch_one(&mut self.connection),
        )
        .await
        .unwrap_or(false)
    }

    /// Give the lock up now (it is also released when the connection closes).
    pub async fn release(mut self) {
        let _ = db_call(
            "releasing the leader lock",
            self.timeout,
            sqlx::query_scalar::<_, bool>("select pg_advisory_unlock($1)")
                .bind(self.key)
                .fetch_one(&mut self.connection),
        )
        .await;
        let _ = tokio::time::timeout(self.timeout, self.connection.close()).await;
    }
}
