//! Measures end-to-end latency, commit to broker delivery, with the polling or
//! the WAL source.
//!
//! Writers commit one event per transaction at a fixed total rate (`--rate`
//! events/s for `--seconds`) and record, per event, the time right after their
//! commit returned. A consumer on a queue bound to the test exchange (or on the
//! test topic, with `--sink kafka`) records when each event arrives. The relay,
//! the writers and the consumer run in this one process, so both times come
//! from the same monotonic clock. The report gives the latency percentiles,
//! and any event that never arrived.
//!
//! The relay runs with its default settings (only the URLs, schema, exchange or
//! topic, and with `--source wal` the slot and publication names are set), so
//! the comparison is the one a default deployment gets; the settings used are
//! printed.
//!
//! ```text
//! cargo run --release -p outbox-examples --bin latency-bench -- --source polling --rate 500 --seconds 20
//! cargo run --release -p outbox-examples --bin latency-bench -- --source wal --rate 500 --seconds 20
//! cargo run --release -p outbox-examples --bin latency-bench -- --source wal --sink kafka
//! ```

use outbox_examples::{drop_slot, slot_streaming};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use outbox_core::{Event, Outbox, OutboxConfig, SchemaName};
use outbox_relay::config::{RawConfig, RawDatabase, RawKafka, RawRabbitMq, RawWal};
use outbox_relay::{RelayConfig, RunSummary};
use sqlx::PgPool;

/// Longest wait for a relay to become ready or for a slot to become inactive.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Partitions of the Kafka test topic.
const KAFKA_PARTITIONS: i32 = 6;

/// Which source the relay reads with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// Claim rows from the table (adaptive polling; LISTEN for the opt-in NOTIFY trigger).
    Polling,
    /// Stream committed inserts through a logical replication slot.
    Wal,
}

/// Which broker the relay publishes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SinkKind {
    /// RabbitMQ, consumed from a queue bound to the test exchange.
    Rabbitmq,
    /// Kafka (or tansu), consumed from every partition of the test topic.
    Kafka,
}

/// End-to-end latency benchmark (commit → broker delivery).
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
    /// Kafka bootstrap servers (with --sink kafka).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// `polling` or `wal`.
    #[arg(long, value_enum, default_value_t = Source::Polling)]
    source: Source,
    /// `rabbitmq` or `kafka`.
    #[arg(long, value_enum, default_value_t = SinkKind::Rabbitmq)]
    sink: SinkKind,
    /// Events committed per second, in total (one event per transaction).
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// How long the writers write.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Writer tasks (one connection each) sharing the rate, so a slow commit does not delay the schedule.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Distinct partition keys.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Payload padding in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Pause between the relay being ready and the first write, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    warmup_ms: u64,
    /// How long to wait for missing deliveries after the last commit, in seconds.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
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
    anyhow::ensure!(args.rate > 0, "--rate must be positive");
    anyhow::ensure!(args.writers > 0, "--writers must be positive");
    anyhow::ensure!(args.keys > 0, "--keys must be positive");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.writers as u32 + 3)
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("latency_{}", &id[..12]);
    let schema = SchemaName::new(name.clone())?;
    outbox_core::migrate(&pool, &schema).await?;
    let bench = Bench {
        destination: format!("latency-{}", &id[..12]),
        slot: format!("{name}_slot"),
        publication: format!("{name}_pub"),
        schema,
        pool,
        args,
    };
    let result = bench.run().await;
    let cleaned = bench.cleanup().await;
    result?;
    cleaned
}

/// What one run created, to clean up.
struct Bench {
    args: Args,
    pool: PgPool,
    schema: SchemaName,
    /// Exchange and queue, or topic.
    destination: String,
    slot: String,
    publication: String,
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

    async fn stop(self) -> anyhow::Result<RunSummary> {
        let _ = self.stop.send(());
        Ok(self.task.await.context("the relay task panicked")??)
    }
}

/// Arrivals seen by the consumer: first arrival per event index.
#[derive(Default)]
struct Arrivals {
    first: HashMap<u64, Instant>,
    duplicates: u64,
    unreadable: u64,
}

/// A consumer task recording arrivals until stopped.
struct Consumer {
    stop: tokio::sync::oneshot::Sender<()>,
    distinct: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<anyhow::Result<Arrivals>>,
}

impl Consumer {
    async fn finish(self) -> anyhow::Result<Arrivals> {
        let _ = self.stop.send(());
        self.task.await.context("the consumer task panicked")?
    }
}

/// Record one arrival; the payload carries the writer's event index `i`.
fn record(arrivals: &mut Arrivals, distinct: &AtomicUsize, payload: &[u8], at: Instant) {
    let index = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|body| body["i"].as_u64());
    match index {
        Some(i) => {
            if arrivals.first.insert(i, at).is_some() {
                arrivals.duplicates += 1;
            } else {
                distinct.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => arrivals.unreadable += 1,
    }
}

/// What the writers did.
struct Written {
    /// Per event index: when COMMIT was sent, and when it returned.
    commits: Vec<(u64, Instant, Instant)>,
    started: Instant,
    last_commit: Instant,
    /// Longest a transaction started after its scheduled time.
    max_behind: Duration,
}

impl Bench {
    async fn run(&self) -> anyhow::Result<()> {
        let args = &self.args;
        let consumer = match args.sink {
            SinkKind::Rabbitmq => self.rabbitmq_consumer().await?,
            SinkKind::Kafka => self.kafka_consumer().await?,
        };
        let config = self.relay_config()?;
        self.print_settings(&config);
        let relay = Relay::start(config);
        if let Err(error) = self.wait_ready(&relay).await {
            let stopped = relay.stop().await;
            return Err(match stopped {
                Err(relay_error) => relay_error.context(format!("{error:#}")),
                Ok(_) => error,
            });
        }
        tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;

        let written = self.write().await;
        let written = match written {
            Ok(written) => written,
            Err(error) => {
                let _ = relay.stop().await;
                let _ = consumer.finish().await;
                return Err(error);
            }
        };
        let total = written.commits.len();
        let elapsed = written.last_commit - written.started;
        println!(
            "latency-bench: {} writers committed {total} events (one per transaction) in {:.2} s: \
             {:.0} events/s (target {}); a transaction started at most {:.1} ms behind its schedule",
            args.writers,
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64().max(1e-9),
            args.rate,
            written.max_behind.as_secs_f64() * 1e3
        );

        // Wait for the stragglers.
        let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
        while consumer.distinct.load(Ordering::Relaxed) < total && Instant::now() < deadline {
            if relay.task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let arrivals = consumer.finish().await?;
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from {}",
            self.schema.qualify("outbox")
        )))
        .fetch_one(&self.pool)
        .await?;
        let summary = relay.stop().await?;
        self.report(&written, &arrivals, left, &summary)
    }

    fn relay_config(&self) -> anyhow::Result<RelayConfig> {
        let args = &self.args;
        let raw = RawConfig {
            database: RawDatabase {
                url: Some(args.database_url.clone()),
                schema: Some(self.schema.to_string()),
                ..Default::default()
            },
            source: Some(
                match args.source {
                    Source::Polling => "polling",
                    Source::Wal => "wal",
                }
                .to_owned(),
            ),
            wal: (args.source == Source::Wal).then(|| RawWal {
                slot: Some(self.slot.clone()),
                publication: Some(self.publication.clone()),
                ..Default::default()
            }),
            sink: Some(
                match args.sink {
                    SinkKind::Rabbitmq => "rabbitmq",
                    SinkKind::Kafka => "kafka",
                }
                .to_owned(),
            ),
            rabbitmq: (args.sink == SinkKind::Rabbitmq).then(|| RawRabbitMq {
                url: Some(args.amqp_url.clone()),
                exchange: Some(self.destination.clone()),
                ..Default::default()
            }),
            kafka: (args.sink == SinkKind::Kafka).then(|| RawKafka {
                brokers: Some(args.kafka_brokers.clone()),
                topic: Some(self.destination.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(raw.validate()?)
    }

    fn print_settings(&self, config: &RelayConfig) {
        let args = &self.args;
        println!(
            "latency-bench: {} events/s for {} s, one event per transaction, {} writers, {} keys, \
             {}-byte payloads, sink {}",
            args.rate,
            args.seconds,
            args.writers,
            args.keys,
            args.payload_bytes,
            match args.sink {
                SinkKind::Rabbitmq => "rabbitmq",
                SinkKind::Kafka => "kafka",
            }
        );
        match &config.wal {
            None => println!(
                "latency-bench: relay defaults, polling source: adaptive polling, idle poll \
                 interval {} ms, batch {}, {} partitions, in-flight {}",
                config.polling.poll_interval.as_millis(),
                config.polling.batch_size,
                config.polling.partitions,
                config.pipeline.max_in_flight
            ),
            Some(wal) => println!(
                "latency-bench: relay defaults, WAL source: slot {}, publication {}, status interval {} ms, \
                 window {} events, in-flight {}",
                wal.slot,
                wal.publication,
                wal.status_interval.as_millis(),
                wal.max_in_flight_events,
                config.pipeline.max_in_flight
            ),
        }
    }

    /// Declare the exchange and a queue bound to it, and consume it (auto-ack).
    async fn rabbitmq_consumer(&self) -> anyhow::Result<Consumer> {
        let connection =
            lapin::Connection::connect(&self.args.amqp_url, lapin::ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ (set AMQP_URL)")?;
        let channel = connection.create_channel().await?;
        let name = self.destination.as_str();
        channel
            .exchange_declare(
                name.into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                name.into(),
                name.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut deliveries = channel
            .basic_consume(
                name.into(),
                "latency-bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let distinct = Arc::new(AtomicUsize::new(0));
        let counter = distinct.clone();
        let task = tokio::spawn(async move {
            let _connection = connection;
            let mut arrivals = Arrivals::default();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    delivery = deliveries.next() => match delivery {
                        Some(delivery) => {
                            let at = Instant::now();
                            let delivery = delivery?;
                            record(&mut arrivals, &counter, &delivery.data, at);
                        }
                        None => anyhow::bail!("the RabbitMQ consumer was cancelled"),
                    },
                }
            }
            Ok(arrivals)
        });
        Ok(Consumer {
            stop,
            distinct,
            task,
        })
    }

    /// Create the topic and read every partition of it from the start.
    async fn kafka_consumer(&self) -> anyhow::Result<Consumer> {
        use rdkafka::Message;
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::consumer::{Consumer as _, StreamConsumer};
        let brokers = self.args.kafka_brokers.as_str();
        let topic = self.destination.as_str();
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()?;
        let results = admin
            .create_topics(
                &[NewTopic::new(
                    topic,
                    KAFKA_PARTITIONS,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
            )
            .await
            .context("creating the Kafka topic (is the broker at --kafka-brokers running?)")?;
        for result in results {
            if let Err((name, code)) = result {
                anyhow::bail!("creating topic {name}: {code}");
            }
        }
        // Fetch at once: the consumer's fetch wait would otherwise add up to 500 ms.
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{topic}-consumer"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .set("fetch.min.bytes", "1")
            .create()?;
        let mut partitions = rdkafka::TopicPartitionList::new();
        for partition in 0..KAFKA_PARTITIONS {
            partitions.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&partitions)?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let distinct = Arc::new(AtomicUsize::new(0));
        let counter = distinct.clone();
        let task = tokio::spawn(async move {
            let mut arrivals = Arrivals::default();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    message = consumer.recv() => {
                        let at = Instant::now();
                        let message = message.context("reading from Kafka")?;
                        record(&mut arrivals, &counter, message.payload().unwrap_or_default(), at);
                    }
                }
            }
            Ok(arrivals)
        });
        Ok(Consumer {
            stop,
            distinct,
            task,
        })
    }

    /// Wait until the WAL relay streams from its slot, or the polling relay holds leases.
    async fn wait_ready(&self, relay: &Relay) -> anyhow::Result<()> {
        let leases_sql = format!(
            "select count(*) from {} where name like 'partition:%' and owner is not null \
             and expires_at > now()",
            self.schema.qualify("relay_lease")
        );
        let started = Instant::now();
        loop {
            let ready = match self.args.source {
                Source::Wal => slot_streaming(&self.pool, &self.slot).await?,
                Source::Polling => {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(leases_sql.as_str()))
                        .fetch_one(&self.pool)
                        .await?
                        > 0
                }
            };
            if ready {
                println!(
                    "latency-bench: relay ready after {:.2} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            anyhow::ensure!(
                !relay.task.is_finished(),
                "the relay stopped before it was ready"
            );
            anyhow::ensure!(
                started.elapsed() < READY_TIMEOUT,
                "the relay was not ready within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Commit `rate × seconds` events, one per transaction, on schedule.
    async fn write(&self) -> anyhow::Result<Written> {
        let args = &self.args;
        let total = u64::from(args.rate) * args.seconds;
        let writers = args.writers as u64;
        let outbox = Outbox::new(OutboxConfig {
            schema: self.schema.clone(),
            ..OutboxConfig::default()
        });
        let padding: Arc<str> = "x".repeat(args.payload_bytes).into();
        let mut connections = Vec::new();
        for _ in 0..writers {
            connections.push(self.pool.acquire().await?);
        }
        let started = Instant::now();
        let start = tokio::time::Instant::from_std(started);
        let period = 1.0 / f64::from(args.rate);
        let mut tasks = tokio::task::JoinSet::new();
        for (writer, mut connection) in (0..writers).zip(connections) {
            let (outbox, padding, keys) = (outbox.clone(), padding.clone(), args.keys as u64);
            tasks.spawn(async move {
                let mut commits = Vec::new();
                let mut max_behind = Duration::ZERO;
                for i in (writer..total).step_by(writers as usize) {
                    let due = start + Duration::from_secs_f64(i as f64 * period);
                    tokio::time::sleep_until(due).await;
                    max_behind = max_behind.max(tokio::time::Instant::now() - due);
                    let event =
                        Event::builder("latency", (i % keys).to_string(), "latency.measured")
                            .payload(&serde_json::json!({ "i": i, "pad": &*padding }))
                            .build()?;
                    let mut tx = sqlx::Connection::begin(&mut *connection).await?;
                    outbox.enqueue(&mut tx, &event).await?;
                    let committing = Instant::now();
                    tx.commit().await?;
                    commits.push((i, committing, Instant::now()));
                }
                anyhow::Ok((commits, max_behind))
            });
        }
        let mut written = Written {
            commits: Vec::with_capacity(total as usize),
            started,
            last_commit: started,
            max_behind: Duration::ZERO,
        };
        while let Some(result) = tasks.join_next().await {
            let (commits, max_behind) = result.context("a writer panicked")??;
            written.max_behind = written.max_behind.max(max_behind);
            if let Some(&(_, _, last)) = commits.last() {
                written.last_commit = written.last_commit.max(last);
            }
            written.commits.extend(commits);
        }
        Ok(written)
    }

    fn report(
        &self,
        written: &Written,
        arrivals: &Arrivals,
        left: i64,
        summary: &RunSummary,
    ) -> anyhow::Result<()> {
        // Signed milliseconds: a delivery can beat the writer's clock read after its
        // commit returned (the WAL sender ships a transaction once it is flushed).
        let ms = |later: Instant, earlier: Instant| match later.checked_duration_since(earlier) {
            Some(d) => d.as_secs_f64() * 1e3,
            None => -(earlier.duration_since(later).as_secs_f64() * 1e3),
        };
        let mut latencies = Vec::with_capacity(written.commits.len());
        let mut round_trips = Vec::with_capacity(written.commits.len());
        let mut missing = Vec::new();
        for &(i, committing, committed) in &written.commits {
            round_trips.push(ms(committed, committing));
            match arrivals.first.get(&i) {
                Some(&arrived) => latencies.push(ms(arrived, committed)),
                None => missing.push(i),
            }
        }
        let early = latencies.iter().filter(|&&l| l < 0.0).count();
        let source = match self.args.source {
            Source::Polling => "polling",
            Source::Wal => "wal",
        };
        match Percentiles::of(&mut latencies) {
            None => println!("latency-bench: [{source}] no event arrived"),
            Some(p) => println!(
                "latency-bench: [{source}] commit returned → delivered, over {} events: p50 {:.1} ms, \
                 p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms (min {:.1} ms, mean {:.1} ms)",
                latencies.len(),
                p.p50,
                p.p95,
                p.p99,
                p.max,
                p.min,
                p.mean
            ),
        }
        if let Some(p) = Percentiles::of(&mut round_trips) {
            println!(
                "latency-bench: [{source}] writers' COMMIT round trip (sent → returned): p50 {:.1} ms, \
                 p99 {:.1} ms, max {:.1} ms; {early} events were delivered before the writer's clock read \
                 after its commit (negative latencies, kept as such)",
                p.p50, p.p99, p.max
            );
        }
        println!(
            "latency-bench: [{source}] committed {}, arrived {}, missing {}, duplicates {}, unreadable {}; \
             relay published {}, dead-lettered {}, transient failures {}; {left} rows still in the outbox \
             when the consumer stopped (delivered, not yet settled)",
            written.commits.len(),
            written.commits.len() - missing.len(),
            missing.len(),
            arrivals.duplicates,
            arrivals.unreadable,
            summary.published,
            summary.dead_lettered,
            summary.transient_failures
        );
        if !missing.is_empty() {
            missing.sort_unstable();
            anyhow::bail!(
                "{} events did not arrive within {} s of the last commit (first: {:?})",
                missing.len(),
                self.args.wait_secs,
                &missing[..missing.len().min(10)]
            );
        }
        Ok(())
    }

    /// Drop the slot (once inactive), the publication, the schema and the broker objects.
    async fn cleanup(&self) -> anyhow::Result<()> {
        let mut result = Ok(());
        if let Err(error) = drop_slot(&self.pool, &self.slot).await {
            eprintln!(
                "latency-bench: could not drop slot {}: {error:#}",
                self.slot
            );
            result = Err(error);
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
                eprintln!("latency-bench: {sql}: {error}");
                result = Err(error.into());
            }
        }
        match self.args.sink {
            SinkKind::Rabbitmq => {
                if let Err(error) = outbox_examples::delete_queue_and_exchange(
                    &self.args.amqp_url,
                    &self.destination,
                )
                .await
                {
                    eprintln!(
                        "latency-bench: could not delete queue {}: {error}",
                        self.destination
                    );
                }
            }
            SinkKind::Kafka => {
                use rdkafka::admin::{AdminClient, AdminOptions};
                let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
                    rdkafka::ClientConfig::new()
                        .set("bootstrap.servers", self.args.kafka_brokers.as_str())
                        .create();
                if let Ok(admin) = admin
                    && let Err(error) = admin
                        .delete_topics(
                            &[self.destination.as_str()],
                            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
                        )
                        .await
                {
                    eprintln!(
                        "latency-bench: could not delete topic {}: {error}",
                        self.destination
                    );
                }
            }
        }
        result
    }
}

/// Nearest-rank percentiles of milliseconds.
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    min: f64,
    mean: f64,
}

impl Percentiles {
    /// Sorts `values`; `None` when empty.
    fn of(values: &mut [f64]) -> Option<Percentiles> {
        values.sort_unstable_by(f64::total_cmp);
        let (&min, &max) = (values.first()?, values.last()?);
        let rank = |p: f64| {
            let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
            values[rank - 1]
        };
        Some(Percentiles {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max,
            min,
            mean: values.iter().sum::<f64>() / values.len() as f64,
        })
    }
}
