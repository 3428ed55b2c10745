//! `outbox-relay`: command-line entry point. Wiring only.
//!
//! Over 600 lines on purpose: the clap definitions of every subcommand (each a few
//! lines with the help text `--help` prints) and their dispatch to `admin`,
//! `replay`, `pause` and `run`; no logic of its own.

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_core::SchemaName;
use outbox_relay::admin::{self, DeadLetterFilter};
use sqlx::postgres::PgPoolOptions;

/// Publishes transactional-outbox events from PostgreSQL to RabbitMQ or Kafka.
#[derive(Parser, Debug)]
#[command(name = "outbox-relay", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "OUTBOX_RELAY_LOG_FORMAT"
    )]
    log_format: outbox_relay::logging::LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish outbox events until SIGTERM/SIGINT, then drain in-flight work and exit.
    Run(RunArgs),
    /// Create the outbox schema and apply pending migrations (idempotent).
    Migrate(DatabaseArgs),
    /// Show pending, retrying, blocked and dead-lettered events and the live relays.
    Status {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// Report transactions open longer than this as holding the relay back.
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        long_transaction: std::time::Duration,
    },
    /// Inspect, retry or purge events that could not be published.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Publish retained events (settle = "mark") again, in per-key order, with their
    /// original event ids and an `outbox-replay` header.
    Replay(ReplayArgs),
    /// Stop publishing on every relay of an instance group within a second (they keep
    /// running; events accumulate in the outbox) until `resume`.
    Pause {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// The instance group (`instance.group` of the relays; default `default`).
        #[arg(long, default_value = outbox_relay::pause::DEFAULT_GROUP)]
        group: String,
        /// Why, shown by `status` and logged by the relays.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Continue publishing on the relays of an instance group.
    Resume {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// The instance group (default `default`).
        #[arg(long, default_value = outbox_relay::pause::DEFAULT_GROUP)]
        group: String,
    },
    /// Maintain the consumers' inbox of processed message ids.
    Inbox {
        #[command(subcommand)]
        action: InboxAction,
    },
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// TOML configuration file of the relay (database and sink); OUTBOX_RELAY__… variables override it.
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
    /// Only events created at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events created before this time (RFC 3339).
    #[arg(long)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only this aggregate type.
    #[arg(long)]
    aggregate_type: Option<String>,
    /// Only this aggregate id.
    #[arg(long)]
    aggregate_id: Option<String>,
    /// Only this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Publish to this exchange (RabbitMQ) or topic (Kafka) instead of each event's own route.
    #[arg(long)]
    to: Option<String>,
    /// Only count the events and keys that would be replayed.
    #[arg(long)]
    dry_run: bool,
    /// Replay every retained event (required when no filter narrows the selection).
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand, Debug)]
enum InboxAction {
    /// Delete processed-message ids older than the retention, in small batches.
    /// Refuses a retention shorter than the redelivery horizon.
    Purge {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// Keep ids this long, e.g. `8d`, `36h` (default: inbox.retention_ms of --config).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<std::time::Duration>,
        /// The longest time after which a message may still be delivered again
        /// (default: inbox.redelivery_horizon_ms of --config, else 7d).
        #[arg(long, value_parser = parse_duration)]
        redelivery_horizon: Option<std::time::Duration>,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `500ms`, `90s`, `30m`, `36h` or `8d`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; use ms, s, m, h or d, e.g. 8d"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number, e.g. 8d"))?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown unit {other:?}; use ms, s, m, h or d")),
    };
    number
        .checked_mul(millis)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TOML configuration file; OUTBOX_RELAY__SECTION__KEY environment variables override it.
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Validate the configuration, print a summary (without secrets) and exit.
    #[arg(long)]
    check_config: bool,
    /// With --check-config: also connect to PostgreSQL and the broker once each.
    #[arg(long, requires = "check_config")]
    check_connections: bool,
}

#[derive(clap::Args, Debug)]
struct OutputArgs {
    /// Print JSON (one document on stdout; field names in the README's operations guide).
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    /// Print `value` as JSON, or `text()` when --json is not given.
    fn print<T: serde::Serialize>(
        &self,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).context("writing JSON")?
            );
        } else {
            print!("{}", text());
        }
        Ok(())
    }
}

#[derive(clap::Args)]
struct DatabaseArgs {
    /// PostgreSQL connection URL (default: database.url of --config).
    // hide_env_values: --help must never print the password the variable holds.
    #[arg(long, env = "OUTBOX_RELAY__DATABASE__URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Schema holding the outbox tables (default: database.schema of --config, else outbox).
    #[arg(long, env = "OUTBOX_RELAY__DATABASE__SCHEMA")]
    schema: Option<String>,
    /// Relay configuration file to take the database settings from.
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field(
                "database_url",
                &self
                    .database_url
                    .as_deref()
                    .map(outbox_relay::config::redact_url),
            )
            .field("schema", &self.schema)
            .field("config", &self.config)
            .finish()
    }
}

#[derive(Subcommand, Debug)]
enum DeadLetterAction {
    /// List dead-lettered and blocked events, oldest failure first.
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Show one event with its payload, headers and last error.
    Show {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// The event id.
        event_id: uuid::Uuid,
    },
    /// Publish the selected events again (idempotent): dead-lettered ones re-enter the
    /// outbox, blocked ones are released so their key continues.
    Retry {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Delete the selected events for good (a blocked event's key continues without it).
    Purge {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

#[derive(clap::Args, Debug)]
struct FilterArgs {
    /// Event ids to select.
    event_ids: Vec<uuid::Uuid>,
    /// Only this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Only this aggregate type.
    #[arg(long)]
    aggregate_type: Option<String>,
    /// Only this aggregate id.
    #[arg(long)]
    aggregate_id: Option<String>,
    /// Only those that last failed at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only those that last failed before this time (RFC 3339).
    #[arg(long)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Select every dead letter (required by retry and purge when nothing else narrows the selection).
    #[arg(long)]
    all: bool,
}

impl FilterArgs {
    fn filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            event_ids: self.event_ids.clone(),
            event_type: self.event_type.clone(),
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            since: self.since,
            until: self.until,
        }
    }

    fn filter_for_change(&self, verb: &str) -> anyhow::Result<DeadLetterFilter> {
        let filter = self.filter();
        if filter.is_empty() && !self.all {
            anyhow::bail!(
                "refusing to {verb} every dead letter: name event ids or filters, or pass --all"
            );
        }
        Ok(filter)
    }
}

impl DatabaseArgs {
    async fn connect(&self) -> anyhow::Result<(sqlx::PgPool, SchemaName)> {
        // The file (if any) with OUTBOX_RELAY__… overrides, as `run` reads them, so
        // OUTBOX_RELAY__DATABASE__URL_FILE works here too.
        let from_file = Some(outbox_relay::RawConfig::load(self.config.as_deref())?);
        let url = match (&self.database_url, &from_file) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(raw)) => raw.database_url()?,
            (None, None) => None,
        };
        let from_file = from_file.map(|raw| raw.database);
        let url = url
            .context("no database URL: pass --database-url, set OUTBOX_RELAY__DATABASE__URL, or give --config")?;
        let schema = self
            .schema
            .clone()
            .or_else(|| from_file.as_ref().and_then(|d| d.schema.clone()))
            .unwrap_or_else(|| outbox_core::schema::DEFAULT_SCHEMA.to_owned());
        let schema = SchemaName::new(schema).context("--schema")?;
        let shown = outbox_relay::config::redact_url(&url);
        let options: sqlx::postgres::PgConnectOptions = url.parse().map_err(|error: sqlx::Error| {
            anyhow::anyhow!(
                "the database URL {shown} does not parse: {}; use postgres://user:password@host:5432/database",
                outbox_relay::config::scrub_password(&error.to_string(), &url)
            )
        })?;
        // One connection first: its error names the cause, where a pool only says "timed out".
        let timeout = std::time::Duration::from_secs(10);
        let probe = tokio::time::timeout(
            timeout,
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
        )
        .await;
        match probe {
            Ok(Ok(connection)) => {
                let _ = sqlx::Connection::close(connection).await;
            }
            Ok(Err(error)) => anyhow::bail!(
                "cannot connect to PostgreSQL at {shown}: {}; check --database-url / OUTBOX_RELAY__DATABASE__URL and that the server is up",
                outbox_relay::config::scrub_password(&error.to_string(), &url)
            ),
            Err(_) => anyhow::bail!(
                "PostgreSQL at {shown} did not answer within {timeout:?}; check the host, the port and the network"
            ),
        }
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "connecting to PostgreSQL at {shown}: {}",
                    outbox_relay::config::scrub_password(&error.to_string(), &url)
                )
            })?;
        Ok((pool, schema))
    }
}

/// Longest wait, after the relay stopped, for tasks still running on blocking
/// threads (a Kafka flush to a hung broker): the shutdown stays bounded.
const RUNTIME_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _log_guard = outbox_relay::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    match result {
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
                println!("configuration is valid: {}", config.summary());
                if args.check_connections {
                    for line in outbox_relay::check_connections(&config).await? {
                        println!("{line}");
                    }
                }
                return Ok(());
            }
            let summary = outbox_relay::run(config, shutdown_signal()).await?;
            println!(
                "relay stopped: {} published, {} dead-lettered, {} blocked",
                summary.published, summary.dead_lettered, summary.blocked
            );
            Ok(())
        }
        Command::Migrate(args) => {
            let (pool, schema) = args.connect().await?;
            admin::migrate(&pool, &schema).await?;
            let versions = admin::applied_migrations(&pool, &schema).await?;
            println!(
                "schema {schema} is up to date ({} migrations applied, latest {})",
                versions.len(),
                versions.last().copied().unwrap_or_default()
            );
            Ok(())
        }
        Command::Status {
            db,
            output,
            long_transaction,
        } => {
            let (pool, schema) = db.connect().await?;
            let status = admin::status_with(&pool, &schema, long_transaction).await?;
            output.print(&status, || status.to_string())
        }
        Command::DeadLetters { action } => dead_letters(action).await,
        Command::Inbox { action } => inbox(action).await,
        Command::Replay(args) => replay(args).await,
        Command::Pause {
            db,
            output,
            group,
            reason,
        } => {
            let (pool, schema) = db.connect().await?;
            let by = format!(
                "{}@{}",
                std::env::var("USER").unwrap_or_else(|_| "operator".to_owned()),
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "localhost".to_owned())
            );
            let pause = outbox_relay::pause::pause(&pool, &schema, &group, &by, &reason).await?;
            output.print(&pause, || {
                format!(
                    "group {:?} paused since {}: its relays stop taking new events within {} ms\n",
                    pause.instance_group,
                    pause.paused_at.to_rfc3339(),
                    outbox_relay::pause::CHECK_INTERVAL.as_millis()
                )
            })
        }
        Command::Resume { db, output, group } => {
            let (pool, schema) = db.connect().await?;
            let resumed = outbox_relay::pause::resume(&pool, &schema, &group).await?;
            output.print(&serde_json::json!({ "resumed": resumed }), || {
                if resumed {
                    format!("group {group:?} resumed\n")
                } else {
                    format!("group {group:?} was not paused\n")
                }
            })
        }
    }
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let selection = outbox_relay::replay::ReplaySelection {
        since: args.since,
        until: args.until,
        aggregate_type: args.aggregate_type,
        aggregate_id: args.aggregate_id,
        event_type: args.event_type,
    };
    if selection.is_empty() && !args.all {
        anyhow::bail!(
            "refusing to replay every retained event: narrow it with --since/--until, \
             --aggregate-type/--aggregate-id or --event-type, or pass --all"
        );
    }
    let config = outbox_relay::RawConfig::load(args.config.as_deref())?.validate()?;
    let report = if args.dry_run {
        let pool = outbox_relay::connect_pool(&config.database, 1).await?;
        outbox_relay::replay::count(&pool, &config.database.schema, &selection).await?
    } else {
        outbox_relay::replay::run(&config, &selection, args.to.as_deref()).await?
    };
    args.output
        .print(&report, || replay_text(&report, args.dry_run))?;
    if report.failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} keys stopped at an event the broker refused",
            report.failed.len()
        )
    }
}

fn replay_text(report: &outbox_relay::replay::ReplayReport, dry_run: bool) -> String {
    use std::fmt::Write;
    if dry_run {
        return format!(
            "{} retained events of {} keys would be replayed\n",
            report.selected, report.keys
        );
    }
    let mut text = format!(
        "replay {}: {} of {} selected events published ({} keys)\n",
        report.replay_id, report.published, report.selected, report.keys
    );
    for failure in &report.failed {
        let _ = writeln!(
            text,
            "key {} stopped at event {}: {}",
            failure.partition_key, failure.event_id, failure.error
        );
    }
    text
}

async fn inbox(action: InboxAction) -> anyhow::Result<()> {
    let InboxAction::Purge {
        db,
        output,
        older_than,
        redelivery_horizon,
        dry_run,
    } = action;
    let configured = outbox_relay::RawConfig::load(db.config.as_deref())?.inbox;
    let ms = std::time::Duration::from_millis;
    let retention = older_than
        .or_else(|| configured.as_ref().and_then(|c| c.retention_ms).map(ms))
        .context(
            "no retention: pass --older-than (e.g. 8d) or set inbox.retention_ms in --config",
        )?;
    let horizon = redelivery_horizon
        .or_else(|| {
            configured
                .as_ref()
                .and_then(|c| c.redelivery_horizon_ms)
                .map(ms)
        })
        .unwrap_or(ms(outbox_relay::config::DEFAULT_REDELIVERY_HORIZON_MS));
    let policy = outbox_core::InboxRetention::new(retention, horizon).map_err(|_| {
        anyhow::anyhow!(
            "refusing to purge: a retention of {retention:?} is shorter than the redelivery horizon \
             {horizon:?}, so a duplicate arriving later would run its handler again; pass a longer \
             --older-than, or --redelivery-horizon if redeliveries end sooner"
        )
    })?;
    let (pool, schema) = db.connect().await?;
    let schema = match configured.and_then(|c| c.schema) {
        Some(name) if db.schema.is_none() => SchemaName::new(name).context("inbox.schema")?,
        _ => schema,
    };
    let inbox = outbox_core::Inbox::new(schema);
    if dry_run {
        let count = inbox.count_purgeable(&pool, &policy).await?;
        return output.print(&serde_json::json!({ "would_purge": count }), || {
            format!("{count} inbox ids are older than {retention:?} and would be purged\n")
        });
    }
    let purged = inbox.purge(&pool, &policy).await?;
    output.print(&serde_json::json!({ "purged": purged }), || {
        format!("{purged} inbox ids older than {retention:?} purged\n")
    })
}

async fn dead_letters(action: DeadLetterAction) -> anyhow::Result<()> {
    match action {
        DeadLetterAction::List {
            db,
            output,
            filter,
            limit,
        } => {
            let (pool, schema) = db.connect().await?;
            let rows = admin::list_dead_letters(&pool, &schema, &filter.filter(), limit).await?;
            output.print(&rows, || dead_letter_table(&rows))
        }
        DeadLetterAction::Show {
            db,
            output,
            event_id,
        } => {
            let (pool, schema) = db.connect().await?;
            let filter = DeadLetterFilter {
                event_ids: vec![event_id],
                ..Default::default()
            };
            let row = admin::list_dead_letters(&pool, &schema, &filter, 1)
                .await?
                .into_iter()
                .next()
                .with_context(|| format!("no dead-lettered or blocked event {event_id}"))?;
            output.print(&row, || dead_letter_details(&row))
        }
        DeadLetterAction::Retry { db, output, filter } => {
            let filter = filter.filter_for_change("retry")?;
            let (pool, schema) = db.connect().await?;
            let retried = admin::retry_dead_letters(&pool, &schema, &filter).await?;
            output.print(&serde_json::json!({ "retried": retried }), || {
                format!("{retried} events queued for publishing again\n")
            })
        }
        DeadLetterAction::Purge { db, output, filter } => {
            let filter = filter.filter_for_change("purge")?;
            let (pool, schema) = db.connect().await?;
            let purged = admin::purge_dead_letters(&pool, &schema, &filter).await?;
            output.print(&serde_json::json!({ "purged": purged }), || {
                format!("{purged} events purged\n")
            })
        }
    }
}

fn dead_letter_table(rows: &[admin::DeadLetter]) -> String {
    use std::fmt::Write;
    let mut text = format!(
        "{:<14} {:<36} {:<24} {:<24} {:>8}  last error\n",
        "status", "event id", "event type", "key", "attempts"
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{:<14} {:<36} {:<24} {:<24} {:>8}  {}",
            row.status,
            row.event_id,
            row.event_type,
            row.partition_key,
            row.attempts,
            row.last_error
        );
    }
    let _ = writeln!(text, "{} shown", rows.len());
    text
}

fn dead_letter_details(row: &admin::DeadLetter) -> String {
    let time =
        |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    format!(
        "status:          {}\nevent id:        {}\nsequence:        {}\naggregate:       {} {}\n\
         event type:      {}\npartition key:   {}\nattempts:        {}\nfirst failed at: {}\n\
         last failed at:  {}\nlast error:      {}\nheaders:         {}\npayload:         {}\n",
        row.status,
        row.event_id,
        row.sequence,
        row.aggregate_type,
        row.aggregate_id,
        row.event_type,
        row.partition_key,
        row.attempts,
        time(row.first_failed_at),
        time(row.last_failed_at),
        row.last_error,
        row.headers,
        row.payload
    )
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
