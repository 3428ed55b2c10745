//! The outbox relay: moves committed outbox events from PostgreSQL to a broker.
//!
//! This crate is the library behind the `outbox-relay` binary, so tests and
//! embedders can run a relay in-process with [`run`].
//!
//! Delivery is **at-least-once**: an event is settled (deleted or marked) only
//! after the broker confirmed it, so a crash between publish and settle publishes
//! it again. Events of one partition key are first-delivered in outbox order,
//! across retries, restarts and several relay instances. Consumers get
//! exactly-once *effects* with `outbox_core::Inbox`.
//!
//! Two sources: polling the outbox table (default; several instances share the
//! work by partition leases) or tailing the WAL through a logical replication
//! slot (`source = "wal"`; one leader per slot, standbys take over). With the WAL
//! source the slot's position is confirmed only over a contiguous prefix of
//! transactions whose events the broker confirmed, after their rows were deleted.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_relay::config::RawConfig;
//!
//! let config = RawConfig::load(Some("relay.toml".as_ref()))?.validate()?;
//! let summary = outbox_relay::run(config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! println!("published {} events", summary.published);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;

use sqlx::ConnectOptions;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub mod admin;
pub mod config;
pub mod error;
pub mod event;
pub mod failpoint;
pub mod ops;
mod pipeline;
pub mod resilience;
pub mod route;
pub mod sink;
pub mod source;
mod wal_pipeline;

pub use config::{RawConfig, RelayConfig};
pub use error::{RelayError, Result};
pub use pipeline::{RelayStats, RunSummary};

use config::{DatabaseConfig, SinkConfig};
use error::RelayError as E;

/// The relay's connection settings (timeouts, application name) for `database`.
pub(crate) fn connect_options(database: &DatabaseConfig) -> Result<PgConnectOptions> {
    Ok(database
        .url
        .parse::<PgConnectOptions>()
        .map_err(|source| E::Database {
            operation: "parsing database.url",
            source,
        })?
        .application_name("outbox-relay")
        .options([(
            "statement_timeout",
            database.statement_timeout.as_millis().to_string(),
        )])
        .disable_statement_logging())
}

/// Open a pool with the relay's connection settings (timeouts, application name).
pub async fn connect_pool(database: &DatabaseConfig, max_connections: u32) -> Result<PgPool> {
    let options = connect_options(database)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(database.connect_timeout)
        .connect_with(options)
        .await
        .map_err(E::database(
            "connecting to PostgreSQL (check database.url and that the server is up)",
        ))
}

async fn check_schema(pool: &PgPool, database: &DatabaseConfig) -> Result<()> {
    let table: Option<String> = sqlx::query_scalar("select to_regclass($1)::text")
        .bind(database.schema.qualify("relay_lease"))
        .fetch_one(pool)
        .await
        .map_err(E::database("checking the outbox schema"))?;
    if table.is_none() {
        return Err(outbox_core::Error::SchemaMissing {
            schema: database.schema.to_string(),
        }
        .into());
    }
    Ok(())
}

/// Run a relay until `shutdown` completes; then stop claiming, finish and settle
/// in-flight work within the grace period, release leases and close the sink.
pub async fn run(
    config: RelayConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<RunSummary> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let relay = async move {
        match config.sink.clone() {
            #[cfg(feature = "rabbitmq")]
            SinkConfig::RabbitMq(sink_config) => {
                let sink = sink::rabbitmq::RabbitMqSink::connect(sink_config).await?;
                run_with_sink(config, sink, stop_rx).await
            }
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(sink_config) => {
                let sink = sink::kafka::KafkaSink::connect(sink_config).await?;
                run_with_sink(config, sink, stop_rx).await
            }
        }
    };
    tokio::pin!(relay);
    tokio::pin!(shutdown);
    let mut shutdown_done = false;
    loop {
        tokio::select! {
            result = &mut relay => return result,
            _ = &mut shutdown, if !shutdown_done => {
                shutdown_done = true;
                tracing::info!("shutdown requested: finishing in-flight events");
                let _ = stop_tx.send(true);
            }
        }
    }
}

/// Run a relay with an already connected sink (used by [`run`] and by tests of sinks).
pub async fn run_with_sink<S: sink::Sink>(
    config: RelayConfig,
    sink: S,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<RunSummary> {
    // Bulkheads: claiming (and LISTEN) and settling use separate pools.
    let settle_pool = connect_pool(&config.database, config.database.pool_size).await?;
    check_schema(&settle_pool, &config.database).await?;
    let stats = Arc::new(RelayStats::default());
    let ops = config.ops_listen_addr.map(|addr| {
        let (stats, pool, schema, shutdown) = (
            stats.clone(),
            settle_pool.clone(),
            config.database.schema.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(error) = ops::http::serve(addr, stats, pool, schema, shutdown).await {
                tracing::error!(%addr, %error, "the ops endpoint failed (is the port in use?)");
            }
        })
    });
    let sink = Arc::new(sink);
    let result = match config.wal.clone() {
        None => run_polling(&config, sink, settle_pool, stats, shutdown).await,
        Some(wal) => {
            let rows = source::wal_rows::WalRows::new(settle_pool.clone(), &config.database);
            wal_pipeline::WalRelay {
                config,
                wal,
                sink,
                rows,
                stats,
            }
            .run(shutdown, settle_pool)
            .await
        }
    };
    if let Some(ops) = ops {
        ops.abort();
    }
    result
}

/// The polling source's relay loop (also the WAL source's fallback).
pub(crate) async fn run_polling<S: sink::Sink>(
    config: &RelayConfig,
    sink: Arc<S>,
    settle_pool: PgPool,
    stats: Arc<RelayStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<RunSummary> {
    let claim_pool = connect_pool(&config.database, 3).await?;
    let mut source =
        source::polling::PollingSource::new(claim_pool, settle_pool.clone(), config.clone())
            .await?;
    let wakeup = source.take_wakeup();
    let leases = Arc::new(source::lease::PartitionLeases::new(
        &config.database.schema,
        config.instance_id.clone(),
        config.polling.partitions,
        config.polling.lease,
    ));
    tracing::info!(
        instance = %config.instance_id,
        schema = %config.database.schema,
        partitions = config.polling.partitions,
        "relay starting with the polling source"
    );
    pipeline::Pipeline {
        source: Arc::new(source),
        wakeup: Some(wakeup),
        sink,
        router: config.router.clone(),
        config: config.pipeline.clone(),
        settle: config.polling.settle,
        leases,
        lease_pool: settle_pool,
        stats,
    }
    .run(shutdown)
    .await
}
