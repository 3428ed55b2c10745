//! Example consumer: reads order events from RabbitMQ and applies them exactly
//! once through the inbox, acknowledging each delivery only after its
//! transaction committed (so a crash before the ack redelivers it, and the inbox
//! skips the duplicate).
//!
//! ```text
//! cargo run -p outbox-examples --bin rabbitmq-consumer -- --expect 24
//! ```

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use outbox_core::{Inbox, Processed, SchemaName};
use sqlx::PgConnection;

/// Consumes order events with exactly-once effects.
#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL (the consumer's own database; here the demo's).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Exchange the relay publishes order events to.
    #[arg(long, default_value = "order")]
    exchange: String,
    /// This consumer's queue (and inbox consumer name).
    #[arg(long, default_value = "billing")]
    queue: String,
    /// Exit after this many distinct messages were handled (0: run forever).
    #[arg(long, default_value_t = 0)]
    expect: u64,
    /// Give up after this many seconds without reaching --expect.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Only declare the exchange, queue and binding, purge the queue, then exit (used by the demo).
    #[arg(long)]
    setup_only: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let schema = SchemaName::default();
    outbox_core::migrate(&pool, &schema).await?;
    sqlx::raw_sql(
        "create schema if not exists billing;
         create table if not exists billing.ledger (
             event_id text primary key, order_id bigint not null, kind text not null, amount_cents bigint not null);",
    )
    .execute(&pool)
    .await?;
    let inbox = Inbox::new(schema);

    let connection =
        lapin::Connection::connect(&args.amqp_url, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ (set AMQP_URL)")?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            args.exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            args.queue.as_str().into(),
            args.exchange.as_str().into(),
            "order.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if args.setup_only {
        channel
            .queue_purge(
                args.queue.as_str().into(),
                lapin::options::QueuePurgeOptions::default(),
            )
            .await?;
        println!(
            "rabbitmq-consumer: queue {} bound to exchange {}",
            args.queue, args.exchange
        );
        return Ok(());
    }
    channel.basic_qos(64, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            args.queue.as_str().into(),
            "outbox-example".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let (mut handled, mut duplicates) = (0_u64, 0_u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    while args.expect == 0 || handled < args.expect {
        let delivery = match tokio::time::timeout_at(deadline, deliveries.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => break,
            Err(_) if args.expect > 0 => anyhow::bail!(
                "only {handled} of {} messages within the timeout",
                args.expect
            ),
            Err(_) => continue,
        };
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        let kind = delivery
            .properties
            .kind()
            .as_ref()
            .map(|k| k.as_str().to_owned())
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
        let outcome = inbox
            .process(&pool, &args.queue, message_id.as_deref(), async |conn: &mut PgConnection| {
                let order_id = body["order_id"].as_i64().unwrap_or_default();
                let amount = match kind.as_str() {
                    "order.placed" => body["total_cents"].as_i64().unwrap_or_default(),
                    _ => 0,
                };
                sqlx::query("insert into billing.ledger (event_id, order_id, kind, amount_cents) values ($1, $2, $3, $4)")
                    .bind(message_id.as_deref().unwrap_or_default())
                    .bind(order_id)
                    .bind(&kind)
                    .bind(amount)
                    .execute(conn)
                    .await
                    .map_err(|source| outbox_core::Error::Database { operation: "writing the ledger", source })?;
                Ok::<_, outbox_core::Error>(())
            })
            .await;
        match outcome {
            Ok(Processed::Handled(())) => {
                handled += 1;
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Ok(Processed::Duplicate) => {
                duplicates += 1;
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(outbox_core::Error::MissingMessageId) => {
                eprintln!("rabbitmq-consumer: message without message_id rejected (not requeued)");
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await?;
            }
            Err(error) => {
                eprintln!("rabbitmq-consumer: {error}; requeueing");
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    }
    println!(
        "rabbitmq-consumer: handled {handled} messages exactly once, skipped {duplicates} duplicates"
    );
    Ok(())
}
