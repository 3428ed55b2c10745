//! Measures the relay's drain rate, with the polling or the WAL source, in two
//! phases on the same schema:
//!
//! 1. **Backlog**: enqueue `--events` first, then start a relay and time until
//!    the outbox is empty (every event confirmed by the broker and settled).
//!    With `--source wal` the relay creates a new slot, which cannot see rows
//!    already in the table: this phase measures the WAL source's *table drain*,
//!    not its stream.
//! 2. **Streamed**: start a relay on an empty outbox first (with `--source wal`
//!    its new slot is created and streaming), then write `--events` in
//!    transactions of `--tx-events` as fast as one writer can, and time from the
//!    first commit until the writer is done and the outbox is empty. With
//!    `--source wal` this is the WAL streaming path; with `--source polling` the
//!    same workload through the polling source, so the two can be compared.
//!
//! Every relay runs in-process. The WAL relays' slots (one per phase), the
//! publication, the schema, the queue and the exchange are dropped at the end.
//!
//! ```text
//! cargo run --release -p outbox-examples --bin drain-bench -- --events 100000
//! cargo run --release -p outbox-examples --bin drain-bench -- --events 100000 --source wal
//! cargo run --release -p outbox-examples --bin drain-bench -- --events 100000 --sink kafka
//! ```

use outbox_examples::{drop_slot, slot_state, slot_streaming};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use outbox_core::{Event, Outbox, OutboxConfig, SchemaName};
use outbox_relay::config::{
    RawConfig, RawDatabase, RawKafka, RawPipeline, RawPolling, RawRabbitMq, RawWal,
};
use outbox_relay::{RelayConfig, RunSummary};
use sqlx::PgPool;

/// Longest wait for a relay to become ready or for a slot to become inactive.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Which source the relay reads with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// Claim rows from the table (adaptive polling; LISTEN for the opt-in NOTIFY trigger).
    Polling,
    /// Stream committed inserts through a logical replication slot.
    Wal,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Polling => "polling",
            Source::Wal => "wal",
        }
    }
}

/// Relay drain-rate benchmark (polling or WAL source → RabbitMQ or Kafka).
#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL (the role needs REPLICATION, or superuser, with --source wal).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// `polling` or `wal`.
    #[arg(long, value_enum, default_value_t = Source::Polling)]
    source: Source,
    /// Events per phase (the backlog, and the streamed write).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events per writer transaction in the streamed phase.
    #[arg(long, default_value_t = 1_000)]
    tx_events: usize,
    /// Distinct partition keys.
    #[arg(long, default_value_t = 1_000)]
    keys: usize,
    /// Relay batch size (with --source wal also the window of unconfirmed events).
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Relay in-flight limit (keys publishing at once).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Payload padding in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// `rabbitmq` or `kafka`.
    #[arg(long, default_value = "rabbitmq")]
    sink: String,
    /// Kafka bootstrap servers (with --sink kafka).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Skip the streamed phase (backlog only).
    #[arg(long)]
    backlog_only: bool,
    /// Skip the backlog phase (streamed only).
    #[arg(long, conflicts_with = "backlog_only")]
    streamed_only: bool,
    /// Only enqueue the backlog and declare the exchange and queue; print their names
    /// (`schema: …`, `exchange: …`) for an external relay, and leave them in place.
    #[arg(long)]
    enqueue_only: bool,
}

/// What one benchmark run created, to clean up.
struct Bench {
    args: Args,
    pool: PgPool,
    schema: SchemaName,
    /// Exchange, queue and Kafka topic name.
    exchange: String,
    /// The WAL relays' slots: one for the backlog phase, one for the streamed phase.
    slots: [String; 2],
    publication: String,
    outbox: Outbox,
    padding: String,
    count_sql: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(args.tx_events > 0, "--tx-events must be positive");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("bench_{}", &id[..12]);
    let schema = SchemaName::new(name.clone())?;
    outbox_core::migrate(&pool, &schema).await?;
    let bench = Bench {
        outbox: Outbox::new(OutboxConfig {
            schema: schema.clone(),
            ..OutboxConfig::default()
        }),
        padding: "x".repeat(args.payload_bytes),
        count_sql: format!("select count(*) from {}", schema.qualify("outbox")),
        exchange: format!("bench-{}", &id[..12]),
        slots: [format!("{name}_backlog"), format!("{name}_streamed")],
        publication: format!("{name}_pub"),
        schema,
        pool,
        args,
    };
    let result = bench.run().await;
    if matches!(result, Ok(Finished::LeaveInPlace)) {
        return Ok(());
    }
    let cleaned = bench.cleanup().await;
    result?;
    cleaned
}

/// How a run ended.
enum Finished {
    /// Measured; clean up.
    Done,
    /// `--enqueue-only`: leave everything in place.
    LeaveInPlace,
}

/// A relay running in-process.
struct Relay {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<outbox_relay::Result<RunSummary>>,
}

impl Relay {
    fn start(config: RelayConfig) -> Relay {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(outbox_relay::run(config, async move {
            let _ = stopped.await;
        }));
        Relay { stop, task }
    }

    fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Ask it to stop, and wait for its summary.
    async fn stop(self) -> anyhow::Result<RunSummary> {
        let _ = self.stop.send(());
        Ok(self.task.await.context("the relay task panicked")??)
    }

    /// Stop it and turn its early end into an error.
    async fn ended_early(self, what: String) -> anyhow::Error {
        match self.stop().await {
            Ok(summary) => anyhow::anyhow!("the relay stopped early ({what}): {summary:?}"),
            Err(error) => error.context(format!("the relay failed ({what})")),
        }
    }
}

impl Bench {
    async fn run(&self) -> anyhow::Result<Finished> {
        let args = &self.args;
        let connection =
            lapin::Connection::connect(&args.amqp_url, lapin::ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ (set AMQP_URL)")?;
        let channel = connection.create_channel().await?;
        let (exchange, queue) = (self.exchange.as_str(), self.exchange.as_str());
        channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        if args.enqueue_only {
            self.enqueue_backlog().await?;
            println!("schema: {}", self.schema);
            println!("exchange: {exchange}");
            return Ok(Finished::LeaveInPlace);
        }
        if args.sink == "kafka" {
            create_kafka_topic(&args.kafka_brokers, exchange, 6).await?;
        }
        println!(
            "drain-bench: source {}, sink {}, {} events per phase over {} keys, {}-byte payloads, \
             batch {}, in-flight {}",
            args.source.name(),
            args.sink,
            args.events,
            args.keys,
            args.payload_bytes,
            args.batch_size,
            args.max_in_flight
        );
        if !args.streamed_only {
            self.backlog_phase().await?;
            self.check_queue(&channel, "backlog").await?;
        }
        if !args.backlog_only {
            self.streamed_phase().await?;
            self.check_queue(&channel, "streamed").await?;
        }
        Ok(Finished::Done)
    }

    /// The events with indexes `range` (`i` in the payload; key `i % keys`).
    fn events(&self, range: std::ops::Range<usize>) -> anyhow::Result<Vec<Event>> {
        range
            .map(|i| {
                Event::builder("bench", (i % self.args.keys).to_string(), "bench.happened")
                    .payload(&serde_json::json!({ "i": i, "pad": self.padding }))
                    .build()
                    .map_err(anyhow::Error::from)
            })
            .collect()
    }

    async fn enqueue_backlog(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        for start in (0..self.args.events).step_by(1_000) {
            let events = self.events(start..(start + 1_000).min(self.args.events))?;
            let mut tx = self.pool.begin().await?;
            self.outbox.enqueue_all(&mut tx, &events).await?;
            tx.commit().await?;
        }
        println!(
            "drain-bench: enqueued {} events over {} keys in {:.1} s",
            self.args.events,
            self.args.keys,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn relay_config(&self, slot: &str) -> anyhow::Result<RelayConfig> {
        let args = &self.args;
        let raw = RawConfig {
            database: RawDatabase {
                url: Some(args.database_url.clone()),
                schema: Some(self.schema.to_string()),
                ..Default::default()
            },
            polling: RawPolling {
                batch_size: Some(args.batch_size),
                ..Default::default()
            },
            pipeline: RawPipeline {
                max_in_flight: Some(args.max_in_flight),
                ..Default::default()
            },
            source: Some(args.source.name().to_owned()),
            wal: (args.source == Source::Wal).then(|| RawWal {
                slot: Some(slot.to_owned()),
                publication: Some(self.publication.clone()),
                ..Default::default()
            }),
            sink: Some(args.sink.clone()),
            rabbitmq: (args.sink == "rabbitmq").then(|| RawRabbitMq {
                url: Some(args.amqp_url.clone()),
                exchange: Some(self.exchange.clone()),
                ..Default::default()
            }),
            kafka: (args.sink == "kafka").then(|| RawKafka {
                brokers: Some(args.kafka_brokers.clone()),
                topic: Some(self.exchange.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(raw.validate()?)
    }

    async fn outbox_rows(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.count_sql.as_str()))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Phase 1: backlog first, then the relay.
    async fn backlog_phase(&self) -> anyhow::Result<()> {
        let args = &self.args;
        self.enqueue_backlog().await?;
        let slot = &self.slots[0];
        let relay = Relay::start(self.relay_config(slot)?);
        let started = Instant::now();
        let mut slot_created: Option<Duration> = None;
        loop {
            if args.source == Source::Wal
                && slot_created.is_none()
                && slot_state(&self.pool, slot).await?.is_some()
            {
                slot_created = Some(started.elapsed());
            }
            let left = self.outbox_rows().await?;
            if left == 0 {
                break;
            }
            if relay.is_finished() {
                return Err(relay.ended_early(format!("{left} events left")).await);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        let summary = relay.stop().await?;
        let path = match args.source {
            Source::Polling => "polling source",
            Source::Wal => "WAL source, table drain of a new slot (not the WAL stream)",
        };
        println!(
            "drain-bench: [backlog, {path}] relay drained {} events to {} in {:.2} s: {:.0} events/s \
             (published {}, dead-lettered {}, transient failures {})",
            args.events,
            args.sink,
            elapsed.as_secs_f64(),
            args.events as f64 / elapsed.as_secs_f64(),
            summary.published,
            summary.dead_lettered,
            summary.transient_failures
        );
        if let Some(created) = slot_created {
            let drain = elapsed.saturating_sub(created);
            println!(
                "drain-bench: [backlog] the slot existed {:.2} s after the start; from then on {:.2} s: \
                 {:.0} events/s",
                created.as_secs_f64(),
                drain.as_secs_f64(),
                args.events as f64 / drain.as_secs_f64()
            );
        }
        if args.source == Source::Wal {
            drop_slot(&self.pool, slot).await?;
        }
        Ok(())
    }

    /// Phase 2: the relay first, then the writes.
    async fn streamed_phase(&self) -> anyhow::Result<()> {
        let args = &self.args;
        let slot = &self.slots[1];
        let relay = Relay::start(self.relay_config(slot)?);
        // Ready: the WAL relay streams from its slot; the polling relay holds leases.
        let leases_sql = format!(
            "select count(*) from {} where name like 'partition:%' and owner is not null \
             and expires_at > now()",
            self.schema.qualify("relay_lease")
        );
        let started = Instant::now();
        loop {
            let ready = match args.source {
                Source::Wal => slot_streaming(&self.pool, slot).await?,
                Source::Polling => {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(leases_sql.as_str()))
                        .fetch_one(&self.pool)
                        .await?
                        > 0
                }
            };
            if ready {
                break;
            }
            if relay.is_finished() {
                return Err(relay.ended_early("before it was ready".into()).await);
            }
            anyhow::ensure!(
                started.elapsed() < READY_TIMEOUT,
                "the relay was not ready within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "drain-bench: [streamed] relay ready after {:.2} s ({})",
            started.elapsed().as_secs_f64(),
            match args.source {
                Source::Wal => "slot created, streaming",
                Source::Polling => "partition leases held",
            }
        );
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut transactions = Vec::new();
        for start in (0..args.events).step_by(args.tx_events) {
            transactions.push(self.events(start..(start + args.tx_events).min(args.events))?);
        }
        let count = transactions.len();
        let (pool, outbox) = (self.pool.clone(), self.outbox.clone());
        let writer = tokio::spawn(async move {
            let mut first_commit = None;
            for events in transactions {
                let mut tx = pool.begin().await?;
                outbox.enqueue_all(&mut tx, &events).await?;
                tx.commit().await?;
                first_commit.get_or_insert_with(Instant::now);
            }
            let last_commit = Instant::now();
            anyhow::Ok((first_commit.unwrap_or(last_commit), last_commit))
        });
        let mut peak = 0;
        let (first_commit, last_commit) = loop {
            // Writer first: once it is done, an empty outbox means everything was relayed.
            let written = writer.is_finished();
            let left = self.outbox_rows().await?;
            peak = peak.max(left);
            if written && left == 0 {
                break writer.await.context("the writer panicked")??;
            }
            if relay.is_finished() {
                return Err(relay.ended_early(format!("{left} events left")).await);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let done = Instant::now();
        let summary = relay.stop().await?;
        let elapsed = done - first_commit;
        let writing = last_commit - first_commit;
        println!(
            "drain-bench: [streamed] one writer committed {} events in {count} transactions of up to {} \
             in {:.2} s from the first commit ({:.0} events/s)",
            args.events,
            args.tx_events,
            writing.as_secs_f64(),
            args.events as f64 / writing.as_secs_f64().max(1e-9)
        );
        let path = match args.source {
            Source::Polling => "polling source",
            Source::Wal => "WAL source, WAL stream",
        };
        println!(
            "drain-bench: [streamed, {path}] relay drained {} events to {} in {:.2} s from the first commit: \
             {:.0} events/s; outbox empty {:.2} s after the last commit, at most {peak} rows waiting \
             (published {}, dead-lettered {}, transient failures {})",
            args.events,
            args.sink,
            elapsed.as_secs_f64(),
            args.events as f64 / elapsed.as_secs_f64(),
            (done - last_commit).as_secs_f64(),
            summary.published,
            summary.dead_lettered,
            summary.transient_failures
        );
        if args.source == Source::Wal {
            drop_slot(&self.pool, slot).await?;
        }
        Ok(())
    }

    /// Check that the queue holds every event of the phase (at-least-once: maybe more), then empty it.
    async fn check_queue(&self, channel: &lapin::Channel, phase: &str) -> anyhow::Result<()> {
        if self.args.sink != "rabbitmq" {
            return Ok(());
        }
        let queue = channel
            .queue_declare(
                self.exchange.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let got = queue.message_count() as usize;
        println!(
            "drain-bench: [{phase}] the queue holds {got} messages ({} duplicates)",
            got.saturating_sub(self.args.events)
        );
        anyhow::ensure!(
            got >= self.args.events,
            "the queue holds {got} messages, fewer than the {} events relayed",
            self.args.events
        );
        channel
            .queue_purge(self.exchange.as_str().into(), QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    /// Drop the slots (once inactive), the publication, the schema, the queue and the exchange.
    async fn cleanup(&self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for slot in &self.slots {
            if let Err(error) = drop_slot(&self.pool, slot).await {
                eprintln!("drain-bench: could not drop slot {slot}: {error:#}");
                result = Err(error);
            }
        }
        let statements = [
            format!("drop publication if exists \"{}\"", self.publication),
            format!("drop schema if exists {} cascade", self.schema.as_str()),
        ];
        for sql in statements {
            if let Err(error) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.as_str()))
                .execute(&self.pool)
                .await
            {
                eprintln!("drain-bench: {sql}: {error}");
                result = Err(error.into());
            }
        }
        if let Err(error) =
            outbox_examples::delete_queue_and_exchange(&self.args.amqp_url, &self.exchange).await
        {
            eprintln!(
                "drain-bench: could not delete queue {}: {error}",
                self.exchange
            );
        }
        result
    }
}

/// Create `topic` with `partitions` partitions (tansu and Kafka alike).
async fn create_kafka_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .context("creating the Kafka topic (is the broker at --kafka-brokers running?)")?;
    for result in results {
        if let Err((name, code)) = result {
            anyhow::bail!("creating topic {name}: {code}");
        }
    }
    // Let metadata catch up before the relay's first publish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}
