//! Harness for the integration tests: every test gets its own schema in a
//! shared test database, so tests run in parallel and never see each other's rows.
//!
//! Services come from `scripts/dev-services` (or `docker compose up -d`). The
//! database URL is `OUTBOX_TEST_DATABASE_URL`, defaulting to the local server.

use std::time::Duration;

/// The README's Rust examples (writer, inbox, consumer helpers), compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExamples;

pub mod amqp;
pub mod browser;
pub mod console;
pub mod daemon;
pub mod fault_proxy;
pub mod kafka;
pub mod load;
pub mod ops;
pub mod relay;
pub mod wal;

use outbox_core::SchemaName;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Database every test schema is created in.
pub const TEST_DATABASE: &str = "outbox_test";

/// Base URL of the PostgreSQL server under test (any database on it).
pub fn server_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// URL of the shared test database (the server URL with its database replaced).
pub fn test_database_url() -> String {
    let url = server_url();
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base.to_owned(), format!("?{query}")),
        None => (url.clone(), String::new()),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[host_start..]
        .find('/')
        .map_or(base.len(), |i| i + host_start);
    format!("{}/{TEST_DATABASE}{query}", &base[..path_start])
}

fn options(database: &str) -> PgConnectOptions {
    let options: PgConnectOptions = server_url()
        .parse()
        .expect("OUTBOX_TEST_DATABASE_URL must be a postgres:// URL");
    options.database(database).disable_statement_logging()
}

/// Create the shared test database once; concurrent test binaries may race to do it.
async fn ensure_test_database() {
    let mut admin = sqlx::PgConnection::connect_with(&options("postgres"))
        .await
        .expect("PostgreSQL must be running: start it with scripts/dev-services");
    let exists: bool =
        sqlx::query_scalar("select exists (select from pg_database where datname = $1)")
            .bind(TEST_DATABASE)
            .fetch_one(&mut admin)
            .await
            .expect("query pg_database");
    if !exists {
        let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create database {TEST_DATABASE}"
        )))
        .execute(&mut admin)
        .await;
        if let Err(error) = created {
            // 42P04 duplicate_database, 23505 unique_violation: another test binary won the race.
            let code = error
                .as_database_error()
                .and_then(|e| e.code())
                .map(|c| c.into_owned());
            assert!(
                matches!(code.as_deref(), Some("42P04") | Some("23505")),
                "creating {TEST_DATABASE}: {error}"
            );
        }
    }
    let _ = admin.close().await;
}

/// A fresh, migrated schema of its own for one test.
pub struct TestSchema {
    /// Pool on the test database.
    pub pool: PgPool,
    /// The schema this test owns.
    pub schema: SchemaName,
    /// URL of the database the schema lives in.
    pub database_url: String,
}

impl TestSchema {
    /// A new schema `t_<random>`, migrated.
    pub async fn new() -> Self {
        let schema = Self::unmigrated().await;
        outbox_core::migrate(&schema.pool, &schema.schema)
            .await
            .expect("migrations apply");
        schema
    }

    /// A new schema name (not yet created) and a pool, for tests of the migrations themselves.
    pub async fn unmigrated() -> Self {
        let pool = Self::pool(10).await;
        TestSchema {
            pool,
            schema: unique_schema(),
            database_url: test_database_url(),
        }
    }

    /// Another pool on the test database, e.g. to act as a second service instance.
    pub async fn pool(max_connections: u32) -> PgPool {
        ensure_test_database().await;
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options(TEST_DATABASE))
            .await
            .expect("connect to the test database")
    }

    /// Another pool on this schema's database (writers acting as other service instances).
    pub async fn connect(&self, max_connections: u32) -> PgPool {
        let options: PgConnectOptions = self
            .database_url
            .parse::<PgConnectOptions>()
            .expect("the test database URL parses")
            .disable_statement_logging();
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .expect("connect to the test database")
    }

    /// `"schema"."table"` for SQL text.
    pub fn table(&self, table: &str) -> String {
        self.schema.qualify(table)
    }
}

/// A schema name no other test uses.
pub fn unique_schema() -> SchemaName {
    let id = uuid::Uuid::new_v4().simple().to_string();
    SchemaName::new(format!("t_{}", &id[..16])).expect("generated schema names are valid")
}

/// Relay logs on stderr when `RUST_LOG` is set (the runtimes are multi-threaded, so
/// the test harness cannot capture them per test); nothing otherwise.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Poll `check` every 50 ms until it holds, or panic after `deadline` naming `what`.
pub async fn wait_until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Enqueue `count` `doc.saved` events over `keys` keys (`doc:0` … ) in one transaction
/// of `test`'s outbox; payload `{"n": i}`.
pub async fn enqueue_docs(test: &TestSchema, count: usize, keys: usize) {
    let events: Vec<outbox_core::Event> = (0..count)
        .map(|i| {
            outbox_core::Event::builder("doc", (i % keys.max(1)).to_string(), "doc.saved")
                .payload(&serde_json::json!({ "n": i }))
                .build()
                .expect("a valid event")
        })
        .collect();
    let mut connection = test.pool.acquire().await.expect("a connection");
    outbox_core::Outbox::new(outbox_core::OutboxConfig {
        schema: test.schema.clone(),
        ..outbox_core::OutboxConfig::default()
    })
    .enqueue_all(&mut connection, &events)
    .await
    .expect("enqueue the events");
}
