//! `outbox-relay`: command-line entry point. Wiring only.

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_core::SchemaName;
use sqlx::postgres::PgPoolOptions;

/// Publishes transactional-outbox events from PostgreSQL to RabbitMQ or Kafka.
#[derive(Parser, Debug)]
#[command(name = "outbox-relay", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish outbox events until SIGTERM/SIGINT, then drain in-flight work and exit.
    Run(RunArgs),
    /// Create the outbox schema and apply pending migrations (idempotent).
    Migrate(DatabaseArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TOML configuration file; OUTBOX_RELAY__SECTION__KEY environment variables override it.
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Validate the configuration, print it (without secrets) and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(clap::Args, Debug)]
struct DatabaseArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "OUTBOX_RELAY__DATABASE__URL")]
    database_url: String,
    /// Schema holding the outbox tables.
    #[arg(long, env = "OUTBOX_RELAY__DATABASE__SCHEMA", default_value = outbox_core::schema::DEFAULT_SCHEMA)]
    schema: String,
}

impl DatabaseArgs {
    async fn connect(&self) -> anyhow::Result<(sqlx::PgPool, SchemaName)> {
        let schema = SchemaName::new(self.schema.clone()).context("--schema")?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&self.database_url)
            .await
            .context(
                "connecting to PostgreSQL (check --database-url / OUTBOX_RELAY__DATABASE__URL)",
            )?;
        Ok((pool, schema))
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let config = outbox_relay::RawConfig::load(args.config.as_deref())?.validate()?;
            if args.check_config {
                println!(
                    "configuration is valid: schema {}, batch {}, partitions {}, lease {} ms, in-flight {}, max attempts {}",
                    config.database.schema,
                    config.polling.batch_size,
                    config.polling.partitions,
                    config.polling.lease.as_millis(),
                    config.pipeline.max_in_flight,
                    config.pipeline.max_attempts
                );
                return Ok(());
            }
            let summary = outbox_relay::run(config, shutdown_signal()).await?;
            println!(
                "relay stopped: {} published, {} dead-lettered",
                summary.published, summary.dead_lettered
            );
            Ok(())
        }
        Command::Migrate(args) => {
            let (pool, schema) = args.connect().await?;
            outbox_relay::admin::migrate(&pool, &schema).await?;
            let versions = outbox_relay::admin::applied_migrations(&pool, &schema).await?;
            println!(
                "schema {schema} is up to date ({} migrations applied, latest {})",
                versions.len(),
                versions.last().copied().unwrap_or_default()
            );
            Ok(())
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
