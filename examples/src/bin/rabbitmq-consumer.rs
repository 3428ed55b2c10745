//! Example consumer: reads order events from RabbitMQ and bills each one exactly
//! once, on `outbox_core::consumer::amqp::AmqpConsumer`: the effect (a row in
//! `billing.ledger`) and the inbox record commit in one transaction, and the
//! delivery is acknowledged only after that commit (a crash before the ack
//! redelivers it, and the inbox skips the duplicate). A message the handler keeps
//! failing on goes to the queue's dead-letter queue (`<queue>.dead-letters`).
//!
//! ```text
//! cargo run -p outbox-examples --bin rabbitmq-consumer -- --setup-only
//! cargo run -p outbox-examples --bin rabbitmq-consumer -- --expect 24 --timeout-secs 60
//! ```
//!
//! It exits 0 once `--expect` new ledger rows exist, on Ctrl-C / SIGTERM, and at
//! `--timeout-secs` when nothing was expected; it exits 1 with a message when the
//! timeout comes first, or when PostgreSQL or RabbitMQ fails.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use outbox_core::consumer::amqp::AmqpConsumer;
use outbox_core::consumer::{ConsumerConfig, Handler, HandlerError, Message};
use outbox_core::{Inbox, SchemaName};
use outbox_examples::{StopReason, finish, wait_for_stop};
use serde::Deserialize;
use sqlx::PgConnection;

/// Consumes order events from RabbitMQ with exactly-once effects.
#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL (the consumer's own database; here the demo's).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Schema of the inbox table (`outbox-relay migrate --schema`).
    #[arg(long, default_value = "outbox")]
    schema: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Exchange the relay publishes order events to (a topic exchange).
    #[arg(long, default_value = "order")]
    exchange: String,
    /// This consumer's queue; also its inbox consumer name.
    #[arg(long, default_value = "billing")]
    queue: String,
    /// Binding of the queue to the exchange.
    #[arg(long, default_value = "order.#")]
    binding: String,
    /// Exit once this many new ledger rows exist (0: run until Ctrl-C or the timeout).
    #[arg(long, default_value_t = 0)]
    expect: u64,
    /// Stop after this many seconds (0: no limit); an error when --expect was not reached.
    #[arg(long, default_value_t = 0)]
    timeout_secs: u64,
    /// Messages held at once (received, not yet acknowledged); also the prefetch.
    /// They are handled in batches, one transaction each (up to 4 at once, each on
    /// a database connection of its own).
    #[arg(long, default_value_t = 16)]
    max_in_flight: u16,
    /// (Re)create the exchange, the queue (empty) with its dead-letter queue, and the
    /// ledger table, then exit (the demo runs this before the relay starts).
    #[arg(long)]
    setup_only: bool,
}

/// The order events' payloads (see order-service).
#[derive(Deserialize)]
struct OrderEvent {
    order_id: i64,
    #[serde(default)]
    total_cents: i64,
}

/// Writes one ledger row per order event, in the inbox's transaction.
struct Billing;

impl Handler for Billing {
    async fn handle(&self, message: &Message, conn: &mut PgConnection) -> Result<(), HandlerError> {
        let order: OrderEvent = message.json()?;
        let kind = message.meta.event_type.as_deref().unwrap_or("unknown");
        let amount_cents = match kind {
            "order.placed" => order.total_cents,
            "order.cancelled" => 0,
            other => {
                return Err(HandlerError::permanent(format!(
                    "billing does not know event type {other:?}"
                )));
            }
        };
        sqlx::query(INSERT_LEDGER)
            .bind(&message.meta.event_id)
            .bind(order.order_id)
            .bind(kind)
            .bind(amount_cents)
            .execute(conn)
            .await?;
        Ok(())
    }
}

const CREATE_LEDGER: &str = "create schema if not exists billing;
     create table if not exists billing.ledger (
         event_id     text primary key,
         order_id     bigint not null,
         kind         text not null,
         amount_cents bigint not null,
         billed_at    timestamptz not null default now()
     );";
const INSERT_LEDGER: &str =
    "insert into billing.ledger (event_id, order_id, kind, amount_cents) values ($1, $2, $3, $4)";
const COUNT_LEDGER: &str = "select count(*) from billing.ledger";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rabbitmq-consumer: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
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
    sqlx::raw_sql(CREATE_LEDGER)
        .execute(&pool)
        .await
        .context("creating billing.ledger")?;

    let connection =
        lapin::Connection::connect(&args.amqp_url, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ (set AMQP_URL)")?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a RabbitMQ channel")?;
    if args.setup_only {
        setup(&channel, &args)
            .await
            .context("declaring the exchange and queues")?;
        println!(
            "rabbitmq-consumer: queue {} (dead letters: {}.dead-letters) bound to exchange {} by {}",
            args.queue, args.queue, args.exchange, args.binding
        );
        let _ = connection.close(200, "setup done".into()).await;
        return Ok(());
    }

    let mut config = ConsumerConfig::new(args.queue.clone());
    config.max_in_flight = args.max_in_flight.max(1);
    let consumer = AmqpConsumer::new(pool.clone(), Inbox::new(schema), config, Billing);
    let timeout = (args.timeout_secs > 0).then(|| Duration::from_secs(args.timeout_secs));
    let stop: Arc<OnceLock<anyhow::Result<StopReason>>> = Arc::new(OnceLock::new());
    let shutdown = {
        let stop = stop.clone();
        let pool = pool.clone();
        let expect = args.expect;
        let ready = format!(
            "rabbitmq-consumer: consuming queue {} (Ctrl-C to stop)",
            args.queue
        );
        async move {
            let reason = wait_for_stop(&pool, COUNT_LEDGER, expect, timeout, &ready).await;
            let _ = stop.set(reason);
        }
    };
    let result = consumer.run(&channel, &args.queue, shutdown).await;
    let _ = connection.close(200, "consumer stopped".into()).await;
    pool.close().await;
    let stats = result.with_context(|| {
        format!(
            "consuming queue {} from RabbitMQ (`--setup-only` declares it)",
            args.queue
        )
    })?;
    let reason = match Arc::try_unwrap(stop).ok().and_then(OnceLock::into_inner) {
        Some(reason) => reason?,
        None => anyhow::bail!(
            "RabbitMQ ended the consumer (queue {} deleted, or the connection closed)",
            args.queue
        ),
    };
    finish("rabbitmq-consumer", reason, args.expect, &stats)
}

/// Declare the exchange, a fresh queue bound to it, and the queue's dead-letter
/// exchange and queue. The queue is deleted first: a queue declared earlier with
/// other arguments (an older demo's) would make the declaration fail.
async fn setup(channel: &lapin::Channel, args: &Args) -> Result<(), lapin::Error> {
    let durable = || ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let dead_letters = format!("{}.dead-letters", args.queue);
    channel
        .exchange_declare(
            args.exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            durable(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            dead_letters.as_str().into(),
            lapin::ExchangeKind::Fanout,
            durable(),
            FieldTable::default(),
        )
        .await?;
    for queue in [args.queue.as_str(), dead_letters.as_str()] {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            dead_letters.as_str().into(),
            queue_options,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            dead_letters.as_str().into(),
            dead_letters.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(dead_letters.as_str().into()),
    );
    channel
        .queue_declare(args.queue.as_str().into(), queue_options, arguments)
        .await?;
    channel
        .queue_bind(
            args.queue.as_str().into(),
            args.exchange.as_str().into(),
            args.binding.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
