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
    /// Create the outbox schema and apply pending migrations (idempotent).
    Migrate(DatabaseArgs),
}

#[derive(clap::Args, Debug)]
struct DatabaseArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "OUTBOX_RELAY__DATABASE_URL")]
    database_url: String,
    /// Schema holding the outbox tables.
    #[arg(long, env = "OUTBOX_RELAY__SCHEMA", default_value = outbox_core::schema::DEFAULT_SCHEMA)]
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
                "connecting to PostgreSQL (check --database-url / OUTBOX_RELAY__DATABASE_URL)",
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
