//! Example consumer: reads order events from Kafka and books each one exactly once
//! for shipping, on `outbox_core::consumer::kafka::KafkaConsumer`: the effect (a row
//! in `shipping.parcels`) and the inbox record commit in one transaction, and the
//! offset is committed only over messages whose transaction committed (a crash
//! re-reads them, and the inbox skips the duplicates). A message the handler keeps
//! failing on is produced to the dead-letter topic with the reason in a header.
//!
//! The topic and the dead-letter topic are created if missing (brokers without
//! topic auto-creation, as most production clusters and `scripts/dev-services`).
//!
//! ```text
//! cargo run -p outbox-examples --bin kafka-consumer -- --setup-only
//! cargo run -p outbox-examples --bin kafka-consumer -- --expect 24 --timeout-secs 60
//! ```
//!
//! It exits 0 once `--expect` new parcel rows exist, on Ctrl-C / SIGTERM, and at
//! `--timeout-secs` when nothing was expected; it exits 1 with a message when the
//! timeout comes first, or when PostgreSQL or Kafka fails.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use outbox_core::consumer::kafka::{KafkaConsumer, KafkaSettings};
use outbox_core::consumer::{ConsumerConfig, Handler, HandlerError, Message};
use outbox_core::{Inbox, SchemaName};
use outbox_examples::{StopReason, finish, wait_for_stop};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use sqlx::PgConnection;

/// How long topic creation may take before the broker counts as unreachable.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Consumes order events from Kafka with exactly-once effects.
#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL (the consumer's own database; here the demo's).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Schema of the inbox table (`outbox-relay migrate --schema`).
    #[arg(long, default_value = "outbox")]
    schema: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Topic the relay produces order events to.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Topic for messages the handler keeps failing on (default `<topic>.dead-letters`).
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// Partitions of the topics when this consumer creates them.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Consumer group; also the inbox consumer name.
    #[arg(long, default_value = "shipping")]
    group: String,
    /// Exit once this many new parcel rows exist (0: run until Ctrl-C or the timeout).
    #[arg(long, default_value_t = 0)]
    expect: u64,
    /// Stop after this many seconds (0: no limit); an error when --expect was not reached.
    #[arg(long, default_value_t = 0)]
    timeout_secs: u64,
    /// Messages held at once (read, offset not yet stored).
    /// They are handled in batches, one transaction each (up to 4 at once, each on
    /// a database connection of its own).
    #[arg(long, default_value_t = 16)]
    max_in_flight: u16,
    /// Create the topics (if missing) and the parcels table, then exit (the demo runs
    /// this before the relay starts: the relay dead-letters events for a missing topic).
    #[arg(long)]
    setup_only: bool,
}

/// The order events' payloads (see order-service).
#[derive(Deserialize)]
struct OrderEvent {
    order_id: i64,
}

/// Writes one parcel row per order event, in the inbox's transaction.
struct Shipping;

impl Handler for Shipping {
    async fn handle(&self, message: &Message, conn: &mut PgConnection) -> Result<(), HandlerError> {
        let order: OrderEvent = message.json()?;
        let action = match message.meta.event_type.as_deref() {
            Some("order.placed") => "pack",
            Some("order.cancelled") => "hold",
            other => {
                return Err(HandlerError::permanent(format!(
                    "shipping does not know event type {other:?}"
                )));
            }
        };
        sqlx::query(INSERT_PARCEL)
            .bind(&message.meta.event_id)
            .bind(order.order_id)
            .bind(action)
            .execute(conn)
            .await?;
        Ok(())
    }
}

const CREATE_PARCELS: &str = "create schema if not exists shipping;
     create table if not exists shipping.parcels (
         event_id  text primary key,
         order_id  bigint not null,
         action    text not null,
         booked_at timestamptz not null default now()
     );";
const INSERT_PARCEL: &str =
    "insert into shipping.parcels (event_id, order_id, action) values ($1, $2, $3)";
const COUNT_PARCELS: &str = "select count(*) from shipping.parcels";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kafka-consumer: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dead_letter_topic = args
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{}.dead-letters", args.topic));
    let pool = sqlx::postgres::PgPoolOptions::new()
        // One connection per batch transaction, plus one for the stop condition's count.
        .max_connections(u32::from(outbox_core::consumer::DEFAULT_MAX_CONCURRENT_BATCHES) + 1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let schema = SchemaName::new(args.schema.clone()).context("--schema")?;
    outbox_core::migrate(&pool, &schema)
        .await
        .context("creating the inbox table")?;
    sqlx::raw_sql(CREATE_PARCELS)
        .execute(&pool)
        .await
        .context("creating shipping.parcels")?;
    create_topics(
        &args.brokers,
        &[args.topic.as_str(), dead_letter_topic.as_str()],
        args.partitions,
    )
    .await?;
    if args.setup_only {
        println!(
            "kafka-consumer: topics {} and {dead_letter_topic} exist",
            args.topic
        );
        return Ok(());
    }

    let mut config = ConsumerConfig::new(args.group.clone());
    config.max_in_flight = args.max_in_flight.max(1);
    let settings = KafkaSettings::new(
        args.brokers.clone(),
        args.group.clone(),
        [args.topic.clone()],
        dead_letter_topic,
    );
    let consumer =
        KafkaConsumer::connect(pool.clone(), Inbox::new(schema), config, settings, Shipping)
            .context("connecting to Kafka")?;
    let timeout = (args.timeout_secs > 0).then(|| Duration::from_secs(args.timeout_secs));
    let stop: Arc<OnceLock<anyhow::Result<StopReason>>> = Arc::new(OnceLock::new());
    let shutdown = {
        let stop = stop.clone();
        let pool = pool.clone();
        let expect = args.expect;
        let ready = format!(
            "kafka-consumer: consuming topic {} (Ctrl-C to stop)",
            args.topic
        );
        async move {
            let reason = wait_for_stop(&pool, COUNT_PARCELS, expect, timeout, &ready).await;
            let _ = stop.set(reason);
        }
    };
    let result = consumer.run(shutdown).await;
    drop(consumer);
    pool.close().await;
    let stats = result.context("consuming from Kafka")?;
    let reason = match Arc::try_unwrap(stop).ok().and_then(OnceLock::into_inner) {
        Some(reason) => reason?,
        None => anyhow::bail!("the Kafka consumer stopped on its own"),
    };
    finish("kafka-consumer", reason, args.expect, &stats)
}

/// Create `topics` with `partitions` partitions unless they exist.
async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|topic| NewTopic::new(topic, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));
    let results = tokio::time::timeout(
        ADMIN_TIMEOUT + Duration::from_secs(5),
        admin.create_topics(&new_topics, &options),
    )
    .await
    .with_context(|| {
        format!("Kafka at {brokers} did not answer within {ADMIN_TIMEOUT:?} (set KAFKA_BROKERS)")
    })?
    .with_context(|| format!("creating topics on Kafka at {brokers}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating Kafka topic {topic}: {code}"),
        }
    }
    Ok(())
}
