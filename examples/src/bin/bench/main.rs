//! The benchmark: what the relay and the writer cost and deliver, each figure next to
//! the limit of the same machine measured in the same run.
//!
//! ```text
//! cargo run --release -p outbox-examples --bin bench -- all            # < 15 min on 2 cores
//! cargo run --release -p outbox-examples --bin bench -- drain --runs 1
//! cargo run --release -p outbox-examples --bin bench -- rss            # 1,000,000 events
//! ```
//!
//! Parts: `limits` (raw lapin publish-with-confirm into a durable queue, raw rdkafka
//! idempotent produce, raw claim-and-delete), `drain` (the relay daemon per source ×
//! sink × 1,000 / 10 / 1 keys, with each run's limits), `poller` (a hand-written poller,
//! with each run's limits), `latency` (COMMIT → consumer at 1,000 and 5,000 events/s),
//! `writer` (enqueue vs a hand-written INSERT), `consumer` (the consumer helpers and the
//! inbox), `rss` (the daemon on 1,000,000 events; not in `all`). Every figure is the
//! median of `--runs` runs with min–max. The relay is the release `outbox-relay` daemon,
//! a child process configured by `OUTBOX_RELAY__*` variables. Every measurement owns its
//! schema, exchange and queue or topic, slot and publication, and removes them.

mod consumer;
mod daemon;
mod drain;
mod fixture;
mod latency;
mod limits;
mod machine;
mod poller;
mod rss;
mod stats;
mod table;
mod writer;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sqlx::PgPool;

use crate::table::Report;

/// Which source the relay reads with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Source {
    /// Claim rows from the table.
    Polling,
    /// A logical replication slot.
    Wal,
}

impl Source {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Source::Polling => "polling",
            Source::Wal => "wal",
        }
    }
}

/// Which broker the relay publishes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Sink {
    /// RabbitMQ: a durable topic exchange and a durable queue bound to it.
    Rabbitmq,
    /// Apache Kafka: a topic of 6 partitions.
    Kafka,
}

impl Sink {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Sink::Rabbitmq => "rabbitmq",
            Sink::Kafka => "kafka",
        }
    }
}

/// Benchmark of the outbox writer, the relay daemon and the consumer helpers.
#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    part: Part,
    /// PostgreSQL URL (a role with REPLICATION, or superuser, for the WAL source).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    amqp_url: String,
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    kafka_brokers: String,
    /// The relay daemon; default: `outbox-relay` next to this program.
    #[arg(long, env = "OUTBOX_RELAY_BIN", global = true)]
    relay_bin: Option<PathBuf>,
    /// Runs per figure (the median and min–max are reported).
    #[arg(long, default_value_t = 3, global = true)]
    runs: usize,
    /// Write the Markdown table here as well (rewritten after every part).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Sources to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Source::Polling, Source::Wal], global = true)]
    sources: Vec<Source>,
    /// Sinks to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Sink::Rabbitmq, Sink::Kafka], global = true)]
    sinks: Vec<Sink>,
    /// Payload padding in bytes.
    #[arg(long, default_value_t = 200, global = true)]
    payload_bytes: usize,
    /// Backlog of a 1,000-key drain and of the hand-written poller.
    #[arg(long, default_value_t = 40_000, global = true)]
    backlog: usize,
    /// Backlog of the 10-key and 1-key drains (time-bounded).
    #[arg(long, default_value_t = 20_000, global = true)]
    backlog_hot: usize,
    /// Longest a drain is measured, from its first settled row, in seconds.
    #[arg(long, default_value_t = 5, global = true)]
    drain_secs: u64,
    /// Seconds of writes at 1,000 events/s.
    #[arg(long, default_value_t = 5, global = true)]
    latency_secs: u64,
    /// Seconds of writes at 5,000 events/s.
    #[arg(long, default_value_t = 3, global = true)]
    latency_secs_fast: u64,
    /// Seconds per writer measurement.
    #[arg(long, default_value_t = 2, global = true)]
    writer_secs: u64,
    /// Messages preloaded for the consumer measurement.
    #[arg(long, default_value_t = 20_000, global = true)]
    consumer_messages: usize,
    /// Longest the consumer is measured, in seconds.
    #[arg(long, default_value_t = 6, global = true)]
    consumer_secs: u64,
    /// A relay setting for every daemon the bench starts, `SECTION__KEY=VALUE` (as
    /// `OUTBOX_RELAY__SECTION__KEY`), e.g. `RABBITMQ__MAX_IN_FLIGHT_PER_KEY=64`; repeatable.
    #[arg(long = "relay-setting", value_parser = parse_setting, global = true)]
    relay_settings: Vec<(String, String)>,
    /// Channels the raw RabbitMQ publisher of the limits spreads the window over
    /// (256 publishes one message per channel at a time, as the relay's pool does).
    #[arg(long, default_value_t = limits::RABBITMQ_CHANNELS, global = true)]
    limit_channels: usize,
    /// Batch transactions of the consumer at once (default: the helpers' default).
    #[arg(long, global = true)]
    consumer_batches: Option<u16>,
    /// Most messages per consumer batch (default: the helpers' default; 1 with
    /// `--consumer-batches 32` is about the helpers before batching).
    #[arg(long, global = true)]
    consumer_batch_messages: Option<u16>,
}

fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not SECTION__KEY=VALUE"))?;
    Ok((key.trim().to_ascii_uppercase(), value.to_owned()))
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Everything but `rss`, in under 15 minutes on 2 cores.
    All,
    /// The machine's limits alone.
    Limits,
    /// Drains per source × sink × key shape, with each run's limits.
    Drain,
    /// The hand-written poller, with each run's limits.
    Poller,
    /// Commit → consumer latency at 1,000 and 5,000 events/s.
    Latency,
    /// Writer cost: enqueue vs a hand-written INSERT; enqueue_all.
    Writer,
    /// Consumer helpers + inbox throughput.
    Consumer,
    /// The daemon draining a large backlog: CPU per 100,000 events and peak RSS.
    Rss {
        /// Events (backlog, or written while the WAL source streams).
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// `polling` (a backlog) or `wal` (streamed while it runs).
        #[arg(long, value_enum, default_value_t = Source::Polling)]
        source: Source,
        /// The sink.
        #[arg(long, value_enum, default_value_t = Sink::Rabbitmq)]
        sink: Sink,
    },
}

/// What every part needs.
pub(crate) struct Ctx {
    pub(crate) database_url: String,
    pub(crate) amqp_url: String,
    pub(crate) kafka_brokers: String,
    pub(crate) pool: PgPool,
    pub(crate) relay_bin: PathBuf,
    pub(crate) runs: usize,
    pub(crate) sources: Vec<Source>,
    pub(crate) sinks: Vec<Sink>,
    pub(crate) payload_bytes: usize,
    /// The relay's claim batch (its default), also the raw claim-and-delete batch.
    pub(crate) batch_size: usize,
    /// The relay's in-flight limit (its default), also the raw publishers' window.
    pub(crate) window: usize,
    pub(crate) backlog: usize,
    pub(crate) backlog_hot: usize,
    pub(crate) drain_secs: u64,
    pub(crate) latency_secs: u64,
    pub(crate) latency_secs_fast: u64,
    pub(crate) writer_secs: u64,
    pub(crate) consumer_messages: usize,
    pub(crate) consumer_secs: u64,
    pub(crate) consumer_batches: Option<u16>,
    pub(crate) consumer_batch_messages: Option<u16>,
    pub(crate) rss_events: usize,
    /// Settings for every daemon, beyond the bench's own (`--relay-setting`).
    pub(crate) relay_settings: Vec<(String, String)>,
    /// Channels of the raw RabbitMQ publisher (`--limit-channels`).
    pub(crate) limit_channels: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,lapin=off,sqlx::query=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        !args.sources.is_empty() && !args.sinks.is_empty(),
        "--sources and --sinks must not be empty"
    );
    let database_url = args
        .database_url
        .clone()
        .context("set DATABASE_URL or --database-url (eval \"$(scripts/dev-services)\")")?;
    let relay_bin = match &args.relay_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating this program")?
            .with_file_name("outbox-relay"),
    };
    // Limits, the hand-written poller, the writer and the consumer run without the daemon.
    let needs_daemon = matches!(
        args.part,
        Part::All | Part::Drain | Part::Latency | Part::Rss { .. }
    );
    anyhow::ensure!(
        !needs_daemon || relay_bin.is_file(),
        "no relay daemon at {} (cargo build --release -p outbox-relay, or set OUTBOX_RELAY_BIN)",
        relay_bin.display()
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect(&database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let rss_events = match args.part {
        Part::Rss { events, .. } => events,
        _ => 1_000_000,
    };
    let ctx = Ctx {
        database_url,
        amqp_url: args.amqp_url,
        kafka_brokers: args.kafka_brokers,
        pool,
        relay_bin,
        runs: args.runs,
        sources: dedup(args.sources),
        sinks: dedup(args.sinks),
        payload_bytes: args.payload_bytes,
        batch_size: outbox_relay::config::DEFAULT_BATCH_SIZE,
        window: outbox_relay::config::DEFAULT_MAX_IN_FLIGHT,
        backlog: args.backlog.max(1),
        backlog_hot: args.backlog_hot.max(1),
        drain_secs: args.drain_secs.max(1),
        latency_secs: args.latency_secs.max(1),
        latency_secs_fast: args.latency_secs_fast.max(1),
        writer_secs: args.writer_secs.max(1),
        consumer_messages: args.consumer_messages.max(1),
        consumer_secs: args.consumer_secs.max(1),
        consumer_batches: args.consumer_batches,
        consumer_batch_messages: args.consumer_batch_messages,
        rss_events: rss_events.max(1),
        relay_settings: args.relay_settings,
        limit_channels: args.limit_channels,
    };
    let started = Instant::now();
    let mut report = Report::new(args.out);
    report.add(machine::facts(&ctx).await)?;
    match args.part {
        Part::All => {
            drain::run(
                &ctx,
                &mut report,
                drain::Parts {
                    poller: true,
                    drains: true,
                },
            )
            .await?;
            latency::run(&ctx, &mut report).await?;
            writer::run(&ctx, &mut report).await?;
            consumer::run(&ctx, &mut report).await?;
        }
        Part::Limits => {
            drain::run(
                &ctx,
                &mut report,
                drain::Parts {
                    poller: false,
                    drains: false,
                },
            )
            .await?;
        }
        Part::Drain => {
            drain::run(
                &ctx,
                &mut report,
                drain::Parts {
                    poller: false,
                    drains: true,
                },
            )
            .await?;
        }
        Part::Poller => {
            drain::run(
                &ctx,
                &mut report,
                drain::Parts {
                    poller: true,
                    drains: false,
                },
            )
            .await?;
        }
        Part::Latency => latency::run(&ctx, &mut report).await?,
        Part::Writer => writer::run(&ctx, &mut report).await?,
        Part::Consumer => consumer::run(&ctx, &mut report).await?,
        Part::Rss { source, sink, .. } => rss::run(&ctx, &mut report, source, sink).await?,
    }
    let mut done = table::Section::new("Run", &[]);
    done.note(format!(
        "`bench {}` took {:.1} min ({}).",
        part_name(args.part),
        started.elapsed().as_secs_f64() / 60.0,
        match args.part {
            Part::Rss { .. } => "one run".to_owned(),
            _ => format!("{} runs per figure", ctx.runs),
        }
    ));
    report.add(done)?;
    ctx.pool.close().await;
    Ok(())
}

fn part_name(part: Part) -> &'static str {
    match part {
        Part::All => "all",
        Part::Limits => "limits",
        Part::Drain => "drain",
        Part::Poller => "poller",
        Part::Latency => "latency",
        Part::Writer => "writer",
        Part::Consumer => "consumer",
        Part::Rss { .. } => "rss",
    }
}

fn dedup<T: Ord>(mut values: Vec<T>) -> Vec<T> {
    values.sort();
    values.dedup();
    values
}
