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
//! # Layout
//!
//! `relay/ARCHITECTURE.md` walks one event through the code. In short: a source
//! (`source/polling/`, `source/wal/`, behind the `Source` trait of `source/mod.rs`)
//! yields units of keyed events in source order; the one relay loop
//! (`pipeline/mod.rs`) admits each unit in the ledger (`pipeline/ledger.rs`) and
//! publishes its events in per-key lanes (`pipeline/lanes.rs`, `pipeline/lane.rs`)
//! to a sink (`sink/rabbitmq/`, `sink/kafka/`); the ledger says what may be
//! settled back to the source: anything finished for polling, only the contiguous
//! done prefix for WAL. What a lane does on broker trouble is the source's named
//! retry mode (polling releases the lane, WAL retries in place). The WAL
//! supervisor (`source/wal/supervisor.rs`: leader, session restarts) returns a
//! fallback instead of starting polling itself: `run` chooses the sink and the
//! source, and is the one place that falls back from WAL to polling. `stats.rs`,
//! `error.rs`, `resilience.rs` and `ops/` serve both sources; `config/` turns the
//! file, the environment and flags into a [`RelayConfig`].
//!
//! This file (a little over 600 lines) holds the crate's map above and the start-up
//! wiring of [`run`]: connecting with retries, the schema check, the ops endpoint,
//! the choice of sink and source; the loop itself is in `pipeline/`.
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
mod check;
pub mod config;
pub mod error;
pub mod event;
pub mod failpoint;
pub mod logging;
pub mod ops;
pub mod pause;
mod percent;
mod pipeline;
mod presence;
pub mod replay;
pub mod resilience;
pub mod retention;
pub mod route;
pub mod sink;
pub mod source;
pub mod stalls;
pub mod stats;

pub use check::check_connections;
pub use config::{RawConfig, RelayConfig};
pub use error::{RelayError, Result};
pub use stats::{RelayStats, RunSummary};

use config::{DatabaseConfig, SinkConfig};
use error::RelayError as E;

/// Log directives the relay always applies on top of `RUST_LOG`: libraries that
/// log message contents (lapin logs every returned message with its headers and
/// payload at WARN, and whole frames at TRACE) are capped, so no payload or
/// header value reaches a log at any level. Each replaces a user directive for
/// the same target.
pub const LOG_CAPS: &[&str] = &[
    "lapin=info",
    "lapin::returned_messages=error",
    "lapin::channels=info",
    "lapin::channel=info",
    "lapin::frames=info",
    "lapin::io_loop=info",
    "amq_protocol=info",
    "pgwire_replication=info",
];

/// The relay binary's log filter: `RUST_LOG` (default `info`) with [`LOG_CAPS`] applied.
pub fn log_filter() -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    LOG_CAPS
        .iter()
        .fold(filter, |filter, cap| match cap.parse() {
            Ok(directive) => filter.add_directive(directive),
            // The caps are constants; a typo is caught by the unit test below.
            Err(_) => filter,
        })
}

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
        .map_err(|source| E::Database {
            operation: connect_operation(&source),
            source,
        })
}

/// Whether a failed connection attempt is the configuration's fault, so that waiting
/// for the server cannot help: TLS verification, a refused password or pg_hba rule,
/// a missing database, an invalid setting.
pub(crate) fn is_permanent_connect_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("28P01" | "28000" | "3D000"))
        }
        _ => false,
    }
}

/// What a failed connection attempt was, with the setting to check for its cause.
pub(crate) fn connect_operation(error: &sqlx::Error) -> &'static str {
    match error {
        sqlx::Error::Tls(source) => {
            let text = source.to_string().to_ascii_lowercase();
            if text.contains("hostname mismatch") || text.contains("ip address mismatch") {
                "connecting to PostgreSQL over TLS: the host name in database.url is not a name \
                 in the server's certificate (sslmode=verify-full checks it); connect by a name \
                 the certificate lists, or use sslmode=verify-ca"
            } else if text.contains("certificate verify failed") {
                "connecting to PostgreSQL over TLS: the server's certificate is not signed by the \
                 CA in database.url's sslrootcert; set sslrootcert to the CA file that signed it"
            } else {
                "connecting to PostgreSQL over TLS (check sslmode, sslrootcert, and sslcert/sslkey \
                 for a client certificate, in database.url)"
            }
        }
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") => {
                "connecting to PostgreSQL: the password was refused; check the user and \
                 password in database.url"
            }
            Some("28000") => {
                "connecting to PostgreSQL: the server refused this user, host or TLS combination \
                 (pg_hba.conf); check the user in database.url, sslmode, and sslcert/sslkey \
                 if the server wants a client certificate"
            }
            Some("3D000") => {
                "connecting to PostgreSQL: the database in database.url does not exist"
            }
            _ => "connecting to PostgreSQL (check database.url and that the server is up)",
        },
        _ => "connecting to PostgreSQL (check database.url and that the server is up)",
    }
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
///
/// At start the ops endpoint is bound first (an address that cannot be bound is
/// an error); then the relay waits for the broker and PostgreSQL, retrying with
/// backoff and logging each failed attempt with its cause, for at most
/// `instance.startup_timeout_ms` if set. Meanwhile `/healthz` answers 200 and
/// `/readyz` 503.
pub async fn run(
    config: RelayConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<RunSummary> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stats = Arc::new(RelayStats::default());
    stats.beat();
    let ops = start_ops(&config, &stats, stop_rx.clone()).await?;
    let started_at = tokio::time::Instant::now();
    let relay = async move {
        let mut stop = stop_rx.clone();
        match config.sink.clone() {
            #[cfg(feature = "rabbitmq")]
            SinkConfig::RabbitMq(sink_config) => {
                let connect = || sink::rabbitmq::RabbitMqSink::connect(sink_config.clone());
                let Some(sink) =
                    wait_for_sink("RabbitMQ", connect, &config, started_at, &stats, &mut stop)
                        .await?
                else {
                    return Ok(stats.summary());
                };
                relay_with_sink(config, sink, stop_rx, stats, started_at).await
            }
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(sink_config) => {
                let connect = || sink::kafka::KafkaSink::connect(sink_config.clone());
                let Some(sink) =
                    wait_for_sink("Kafka", connect, &config, started_at, &stats, &mut stop).await?
                else {
                    return Ok(stats.summary());
                };
                relay_with_sink(config, sink, stop_rx, stats, started_at).await
            }
        }
    };
    tokio::pin!(relay);
    tokio::pin!(shutdown);
    let mut shutdown_done = false;
    let result = loop {
        tokio::select! {
            result = &mut relay => break result,
            _ = &mut shutdown, if !shutdown_done => {
                shutdown_done = true;
                tracing::info!("shutdown requested: finishing in-flight events");
                let _ = stop_tx.send(true);
            }
        }
    };
    drop(ops);
    result
}

/// Run a relay with an already connected sink (used by [`run`] and by tests of sinks).
pub async fn run_with_sink<S: sink::Sink>(
    config: RelayConfig,
    sink: S,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<RunSummary> {
    let stats = Arc::new(RelayStats::default());
    stats.beat();
    let ops = start_ops(&config, &stats, shutdown.clone()).await?;
    let result = relay_with_sink(config, sink, shutdown, stats, tokio::time::Instant::now()).await;
    drop(ops);
    result
}

/// Background tasks of operations (the ops endpoint, the progress line), aborted when the relay stops.
struct OpsTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for OpsTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What the retention task purges: published rows with `settle = "mark"` (polling
/// source) and the `[inbox]` ids.
fn retention_plan(config: &RelayConfig) -> retention::RetentionPlan {
    let published = match (&config.wal, config.polling.settle) {
        (None, config::SettleMode::Mark { retention }) => {
            Some((config.database.schema.clone(), retention))
        }
        _ => None,
    };
    retention::RetentionPlan {
        published,
        inbox: config
            .inbox
            .as_ref()
            .map(|inbox| (inbox.schema.clone(), inbox.retention)),
    }
}

/// Bind the ops endpoint (if configured) and serve it in a task; failing to bind
/// is an error with the cause, not a warning. Start the progress line and retention.
async fn start_ops(
    config: &RelayConfig,
    stats: &Arc<RelayStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<OpsTasks> {
    let mut tasks = Vec::new();
    // Lazy: the endpoint must answer while PostgreSQL does not, yet.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(config.database.connect_timeout)
        .connect_lazy_with(connect_options(&config.database)?);
    let schema = config.database.schema.clone();
    let (pause_tx, _) = tokio::sync::watch::channel(None);
    tasks.push(tokio::spawn(pause::watch_pause(
        pool.clone(),
        config.database.schema.clone(),
        config.instance_group.clone(),
        pause_tx,
        stats.clone(),
        shutdown.clone(),
    )));
    let plan = retention_plan(config);
    if !plan.is_empty() {
        tasks.push(tokio::spawn(retention::run(
            pool.clone(),
            plan,
            shutdown.clone(),
        )));
    }
    if let Some(interval) = config.progress_interval {
        tasks.push(tokio::spawn(ops::progress::report(
            stats.clone(),
            pool.clone(),
            schema.clone(),
            interval,
            shutdown.clone(),
        )));
    }
    let Some(addr) = config.ops_listen_addr.clone() else {
        return Ok(OpsTasks(tasks));
    };
    let listener = tokio::net::TcpListener::bind(addr.as_str())
        .await
        .map_err(|source| E::OpsBind {
            addr: addr.clone(),
            source,
        })?;
    let (stats, interval) = (stats.clone(), config.ops_sample_interval);
    let console = match &config.console {
        Some(console) => Some(ops::console::Console::new(
            console,
            // Its own small pool: the sampler's connection stays free, and two
            // tabs' actions really run at once (the admin functions make that safe).
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(config.database.connect_timeout)
                .connect_lazy_with(connect_options(&config.database)?),
            schema.clone(),
            stats.clone(),
            config.router.clone(),
        )?),
        None => None,
    };
    tasks.push(tokio::spawn(async move {
        if let Err(error) =
            ops::http::serve(listener, stats, pool, schema, interval, console, shutdown).await
        {
            tracing::error!(%addr, %error, "the ops endpoint failed");
        }
    }));
    Ok(OpsTasks(tasks))
}

/// Delay before the next start-up attempt, or the error that ends the wait.
fn next_startup_attempt(
    what: &'static str,
    error: String,
    attempt: u32,
    backoff: &mut resilience::Backoff,
    config: &RelayConfig,
    started_at: tokio::time::Instant,
) -> Result<std::time::Duration> {
    let delay = backoff.next_delay();
    if let Some(limit) = config.startup_timeout
        && started_at.elapsed() + delay > limit
    {
        return Err(E::StartupTimeout {
            what,
            waited_ms: started_at.elapsed().as_millis() as u64,
            last_error: error,
        });
    }
    tracing::warn!(
        attempt,
        retry_in_ms = delay.as_millis() as u64,
        %error,
        "{what} does not answer yet; the relay waits for it (/readyz says 503 meanwhile)"
    );
    Ok(delay)
}

/// Backoff between start-up attempts.
fn startup_backoff() -> resilience::Backoff {
    resilience::Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(30),
    )
}

/// Sleep `delay`; false if the relay was asked to stop meanwhile.
async fn sleep_unless_stopped(
    delay: std::time::Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// Connect the sink, retrying until the broker answers; `None`: asked to stop.
/// Errors of the configuration (permanent) end the wait at once.
async fn wait_for_sink<S, F, Fut>(
    what: &'static str,
    connect: F,
    config: &RelayConfig,
    started_at: tokio::time::Instant,
    stats: &RelayStats,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<S>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::result::Result<S, sink::SinkError>>,
{
    let mut backoff = startup_backoff();
    for attempt in 1_u32.. {
        stats.beat();
        let error = match connect().await {
            Ok(sink) => {
                if attempt > 1 {
                    tracing::info!(attempt, "{what} answers; starting");
                }
                return Ok(Some(sink));
            }
            Err(error) if error.is_permanent() => return Err(E::Sink(error)),
            Err(error) => error.message,
        };
        let delay = next_startup_attempt(what, error, attempt, &mut backoff, config, started_at)?;
        if !sleep_unless_stopped(delay, stop).await {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Wait until PostgreSQL accepts a connection (with the real cause of each
/// failure in the log, where a pool would only say "timed out"); false: asked to stop.
async fn wait_for_database(
    config: &RelayConfig,
    started_at: tokio::time::Instant,
    stats: &RelayStats,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<bool> {
    use sqlx::Connection;
    let database = &config.database;
    let options = connect_options(database)?;
    let mut backoff = startup_backoff();
    for attempt in 1_u32.. {
        stats.beat();
        let connected = tokio::time::timeout(
            database.connect_timeout,
            sqlx::PgConnection::connect_with(&options),
        )
        .await;
        let error = match connected {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                if attempt > 1 {
                    tracing::info!(attempt, "PostgreSQL answers; starting");
                }
                return Ok(true);
            }
            // Waiting cannot fix a refused certificate, password or pg_hba rule.
            Ok(Err(error)) if is_permanent_connect_error(&error) => {
                return Err(E::Database {
                    operation: connect_operation(&error),
                    source: error,
                });
            }
            Ok(Err(error)) => format!(
                "cannot connect to PostgreSQL at {}: {}",
                config::redact_url(&database.url),
                config::scrub_password(&error.to_string(), &database.url)
            ),
            Err(_) => format!(
                "PostgreSQL at {} did not answer within {:?} (database.connect_timeout_ms)",
                config::redact_url(&database.url),
                database.connect_timeout
            ),
        };
        let delay = next_startup_attempt(
            "PostgreSQL",
            error,
            attempt,
            &mut backoff,
            config,
            started_at,
        )?;
        if !sleep_unless_stopped(delay, stop).await {
            return Ok(false);
        }
    }
    Ok(false)
}

/// Wait for PostgreSQL, then run the source for `config` with `sink`.
async fn relay_with_sink<S: sink::Sink>(
    config: RelayConfig,
    sink: S,
    shutdown: tokio::sync::watch::Receiver<bool>,
    stats: Arc<RelayStats>,
    started_at: tokio::time::Instant,
) -> Result<RunSummary> {
    let mut stop = shutdown.clone();
    if !wait_for_database(&config, started_at, &stats, &mut stop).await? {
        sink.close().await;
        return Ok(stats.summary());
    }
    // Bulkheads: claiming (and LISTEN) and settling use separate pools.
    let settle_pool = connect_pool(&config.database, config.database.pool_size).await?;
    check_schema(&settle_pool, &config.database).await?;
    stats
        .started
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let system = match &config.sink {
        #[cfg(feature = "rabbitmq")]
        SinkConfig::RabbitMq(_) => "rabbitmq",
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(_) => "kafka",
    };
    let sink = Arc::new(sink::InstrumentedSink::new(sink, stats.clone(), system));
    match config.wal.clone() {
        None => run_polling(&config, sink, settle_pool, stats, shutdown).await,
        Some(wal) => {
            let presence = tokio::spawn(presence::announce_wal_relay(
                settle_pool.clone(),
                config.database.schema.clone(),
                config.instance_id.clone(),
                stats.clone(),
                shutdown.clone(),
            ));
            let rows = source::wal::rows::WalRows::new(settle_pool.clone(), &config.database);
            let end = source::wal::supervisor::WalRelay {
                config: config.clone(),
                wal,
                sink: sink.clone(),
                rows,
                stats: stats.clone(),
            }
            .run(shutdown.clone(), settle_pool.clone())
            .await;
            // On a stop the task deletes this relay's presence row; give it the time
            // (aborting it left the row for its 15 s expiry: `status` still listed us).
            let mut presence = presence;
            if *shutdown.borrow()
                && tokio::time::timeout(resilience::CLOSE_TIMEOUT, &mut presence)
                    .await
                    .is_err()
            {
                tracing::debug!("deleting this relay's presence row took too long");
            }
            presence.abort();
            let end = end?;
            match end {
                source::wal::supervisor::WalRunEnd::Stopped(summary) => Ok(summary),
                // The one place that chooses the fallback source.
                source::wal::supervisor::WalRunEnd::FallBackToPolling => {
                    run_polling(&config, sink, settle_pool, stats, shutdown).await
                }
            }
        }
    }
}

/// The polling source's relay loop (also the WAL source's fallback).
async fn run_polling<S: sink::Sink>(
    config: &RelayConfig,
    sink: Arc<S>,
    settle_pool: PgPool,
    stats: Arc<RelayStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<RunSummary> {
    let claim_pool = connect_pool(&config.database, 3).await?;
    let source =
        source::polling::PollingSource::new(claim_pool, settle_pool.clone(), config.clone())
            .await?;
    let leases = Arc::new(source::polling::lease::PartitionLeases::new(
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
    let claims = source::polling::PollingClaims::start(
        source,
        leases,
        settle_pool,
        &config.pipeline,
        stats.clone(),
        shutdown.clone(),
    )
    .await?;
    let parts = pipeline::Parts {
        sink: sink.clone(),
        router: config.router.clone(),
        config: config.pipeline.clone(),
        stats: stats.clone(),
    };
    let mut shutdown = shutdown;
    let end = pipeline::run(claims, &parts, &mut shutdown).await;
    sink::close_sink(&*sink).await;
    end?;
    let summary = stats.summary();
    tracing::info!(?summary, "relay stopped");
    Ok(summary)
}

#[cfg(test)]
mod log_tests {
    #[test]
    fn every_log_cap_is_a_valid_directive() {
        for cap in super::LOG_CAPS {
            assert!(
                cap.parse::<tracing_subscriber::filter::Directive>().is_ok(),
                "{cap}"
            );
        }
    }
}
