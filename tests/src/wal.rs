//! A database of its own for one WAL-source test: a migrated outbox schema, a
//! slot and publication nobody else uses, and a relay configuration with
//! `source = "wal"` and test-friendly timings.
//!
//! Slots and publications belong to a database (slot names to the cluster), so
//! every WAL test creates `walr_<random>` and drops it, with its slots, at the
//! end ([`WalDatabase::cleanup`], or on drop when the test failed).

use std::time::Duration;

use outbox_relay::config::{RawConfig, RawWal};
use outbox_relay::source::wal::Lsn;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

use crate::TestSchema;

/// Longest wait for anything the server should do promptly.
const DEADLINE: Duration = Duration::from_secs(30);

fn server_options() -> PgConnectOptions {
    crate::server_url()
        .parse::<PgConnectOptions>()
        .expect("OUTBOX_TEST_DATABASE_URL must be a postgres:// URL")
        .disable_statement_logging()
}

/// One WAL test's database; see the module docs.
pub struct WalDatabase {
    /// Database name (also the slot name).
    pub name: String,
    /// The outbox schema in it (the default `outbox`), with a pool.
    pub test: TestSchema,
    /// The replication slot the relay uses.
    pub slot: String,
    /// The publication the relay uses.
    pub publication: String,
    cleaned: bool,
}

impl WalDatabase {
    /// Create and migrate a fresh database, plus a table `public.other` for
    /// writes that are not outbox events.
    pub async fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("walr_{}", &id[..16]);
        let mut admin = PgConnection::connect_with(&server_options().database("postgres"))
            .await
            .expect("PostgreSQL must be running: start it with scripts/dev-services");
        sqlx::raw_sql(AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        let options = server_options().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(DEADLINE)
            .connect_with(options.clone())
            .await
            .expect("connect to the WAL test database");
        let schema = outbox_core::SchemaName::default();
        outbox_core::migrate(&pool, &schema)
            .await
            .expect("migrations apply");
        sqlx::query("create table public.other (id bigserial primary key, note text not null)")
            .execute(&pool)
            .await
            .expect("create public.other");
        WalDatabase {
            slot: name.clone(),
            publication: format!("{name}_pub"),
            test: TestSchema {
                pool,
                schema,
                database_url: options.to_url_lossy().to_string(),
            },
            name,
            cleaned: false,
        }
    }

    /// The `[wal]` section for this database: status every 100 ms, standby
    /// retry 200 ms, lag sampled every 200 ms, busy slot waited for 30 s.
    pub fn raw_wal(&self) -> RawWal {
        RawWal {
            slot: Some(self.slot.clone()),
            publication: Some(self.publication.clone()),
            status_interval_ms: Some(100),
            slot_busy_timeout_ms: Some(30_000),
            leader_retry_ms: Some(200),
            lag_sample_interval_ms: Some(200),
            ..Default::default()
        }
    }

    /// [`crate::relay::raw_config`] for this database with `source = "wal"`,
    /// publishing to RabbitMQ exchange `exchange`.
    pub fn raw_config(&self, exchange: &str) -> RawConfig {
        let mut raw = crate::relay::raw_config(&self.test, exchange);
        raw.source = Some("wal".into());
        raw.wal = Some(self.raw_wal());
        raw
    }

    /// The slot's `confirmed_flush_lsn`, or `None` when the slot does not exist.
    pub async fn slot_confirmed(&self) -> Option<Lsn> {
        let lsn: Option<Option<String>> = sqlx::query_scalar(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&self.test.pool)
        .await
        .expect("read pg_replication_slots");
        lsn.flatten().and_then(|lsn| lsn.parse().ok())
    }

    /// Whether a session streams from the slot now.
    pub async fn slot_active(&self) -> bool {
        sqlx::query_scalar(
            "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_one(&self.test.pool)
        .await
        .expect("read pg_replication_slots")
    }

    /// Whether a walsender streams from the slot, not just a session creating it:
    /// `active` is true during `pg_create_logical_replication_slot` too, before
    /// the slot's start and its table drain's range are recorded, and rows written
    /// then are drained from the table instead of streamed (and may come both ways).
    pub async fn walsender_streams(&self) -> bool {
        sqlx::query_scalar(
            "select exists (select from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid \
             where s.slot_name = $1 and a.backend_type = 'walsender' and s.confirmed_flush_lsn is not null)",
        )
        .bind(&self.slot)
        .fetch_one(&self.test.pool)
        .await
        .expect("read pg_replication_slots")
    }

    /// Wait until no session streams from the slot (a killed relay's walsender ended).
    pub async fn wait_slot_inactive(&self) {
        let until = tokio::time::Instant::now() + DEADLINE;
        while self.slot_active().await {
            assert!(
                tokio::time::Instant::now() < until,
                "slot {} still active after {DEADLINE:?}",
                self.slot
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drop the slot (terminating a session that streams from it).
    pub async fn drop_slot(&self) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let _ = sqlx::query(
                "select pg_terminate_backend(active_pid) from pg_replication_slots \
                 where slot_name = $1 and active_pid is not null",
            )
            .bind(&self.slot)
            .execute(&self.test.pool)
            .await;
            let _ = sqlx::query(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                 where slot_name = $1 and not active",
            )
            .bind(&self.slot)
            .execute(&self.test.pool)
            .await;
            if self.slot_confirmed().await.is_none() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "could not drop slot {}",
                self.slot
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's current WAL position.
    pub async fn current_wal_lsn(&self) -> Lsn {
        let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
            .fetch_one(&self.test.pool)
            .await
            .expect("read pg_current_wal_lsn");
        lsn.parse().expect("an LSN")
    }

    /// Insert `rows` rows into `public.other` in one transaction (WAL that is not outbox events).
    pub async fn write_other(&self, rows: i64) {
        sqlx::query(
            "insert into public.other (note) select 'x' || g from generate_series(1, $1) g",
        )
        .bind(rows)
        .execute(&self.test.pool)
        .await
        .expect("write public.other");
    }

    /// Drop the slots and the database.
    pub async fn cleanup(mut self) {
        self.test.pool.close().await;
        drop_database(&self.name).await;
        self.cleaned = true;
    }
}

impl Drop for WalDatabase {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // The test failed: clean up from a runtime of our own.
        drop_database_blocking(&self.name);
    }
}

/// [`drop_database`] from a `Drop` impl: on a thread with a runtime of its own.
pub fn drop_database_blocking(name: &str) {
    let name = name.to_owned();
    let _ = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(drop_database(&name));
        }
    })
    .join();
}

/// Drop the slots of database `name` (ending the sessions that hold them), then the database.
pub async fn drop_database(name: &str) {
    let Ok(mut admin) = PgConnection::connect_with(&server_options().database("postgres")).await
    else {
        return;
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let _ = sqlx::query(
            "select pg_terminate_backend(active_pid) from pg_replication_slots \
             where database = $1 and active_pid is not null",
        )
        .bind(name)
        .execute(&mut admin)
        .await;
        let _ = sqlx::query(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
             where database = $1 and not active",
        )
        .bind(name)
        .execute(&mut admin)
        .await;
        let left: i64 =
            sqlx::query_scalar("select count(*) from pg_replication_slots where database = $1")
                .bind(name)
                .fetch_one(&mut admin)
                .await
                .unwrap_or(0);
        if left == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = sqlx::raw_sql(AssertSqlSafe(format!(
        "drop database if exists {name} with (force)"
    )))
    .execute(&mut admin)
    .await;
    let _ = admin.close().await;
}
