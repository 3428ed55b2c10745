//! Example writer: an order service that places and cancels orders, writing
//! each change and its event in one transaction through the outbox.
//!
//! `--mode table` (default) enqueues each event as a row of the outbox table
//! (either relay source reads it); `--mode wal-message` emits it as a
//! transactional logical decoding message (`outbox_core::wal_message::emit`): no
//! table row, only a relay with `source = "wal"` whose slot already exists sees it.
//!
//! ```text
//! cargo run -p outbox-examples --bin order-service -- --orders 100
//! cargo run -p outbox-examples --bin order-service -- --orders 100 --mode wal-message
//! ```

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use outbox_core::{Event, Outbox, OutboxConfig, SchemaName, wal_message};
use serde::Serialize;
use sqlx::PgConnection;

/// How events are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// A row in the outbox table, in the order's transaction.
    Table,
    /// A transactional WAL message in the order's transaction (WAL source only).
    WalMessage,
}

/// Places orders (and cancels some), publishing events through the outbox.
#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Outbox schema.
    #[arg(long, default_value = "outbox")]
    schema: String,
    /// How many orders to place.
    #[arg(long, default_value_t = 100)]
    orders: u32,
    /// Cancel every n-th order after placing it (0: never).
    #[arg(long, default_value_t = 5)]
    cancel_every: u32,
    /// Orders placed per second (0: as fast as the database takes them).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Where events go: the outbox table, or WAL messages.
    #[arg(long, value_enum, default_value_t = Mode::Table)]
    mode: Mode,
    /// Prefix of the WAL messages (the relay's `wal.message_prefix`), with `--mode wal-message`.
    #[arg(long, default_value = wal_message::DEFAULT_PREFIX)]
    wal_prefix: String,
}

/// Writes events in the chosen mode into the caller's transaction.
struct Writer {
    mode: Mode,
    outbox: Outbox,
    wal_prefix: String,
}

impl Writer {
    async fn write(&self, conn: &mut PgConnection, event: &Event) -> outbox_core::Result<()> {
        match self.mode {
            Mode::Table => self.outbox.enqueue(conn, event).await.map(drop),
            Mode::WalMessage => {
                wal_message::emit(
                    conn,
                    &self.wal_prefix,
                    event,
                    outbox_core::writer::DEFAULT_MAX_PAYLOAD_BYTES,
                )
                .await
            }
        }
    }
}

#[derive(Serialize)]
struct OrderPlaced<'a> {
    order_id: i64,
    customer: &'a str,
    total_cents: i64,
}

#[derive(Serialize)]
struct OrderCancelled {
    order_id: i64,
    reason: &'static str,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("order-service: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let schema = SchemaName::new(args.schema.clone()).context("--schema")?;
    outbox_core::migrate(&pool, &schema).await?;
    outbox_examples::create_shop_tables(&pool).await?;
    let writer = Writer {
        mode: args.mode,
        outbox: Outbox::new(OutboxConfig {
            schema,
            ..OutboxConfig::default()
        }),
        wal_prefix: args.wal_prefix.clone(),
    };

    let mut placed = 0;
    let mut cancelled = 0;
    let mut pace = (args.rate > 0).then(|| {
        let mut pace = tokio::time::interval(Duration::from_secs(1) / args.rate);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    });
    for n in 1..=args.orders {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let customer = format!("customer-{}", n % 10);
        let total_cents = i64::from(n) * 100 + 99;

        // Business change and event in one transaction: both commit or neither does.
        let mut tx = pool.begin().await?;
        let order_id: i64 = sqlx::query_scalar(
            "insert into shop.orders (customer, total_cents, status) values ($1, $2, 'placed') returning id",
        )
        .bind(&customer)
        .bind(total_cents)
        .fetch_one(&mut *tx)
        .await?;
        let event = Event::builder("order", order_id.to_string(), "order.placed")
            .payload(&OrderPlaced {
                order_id,
                customer: &customer,
                total_cents,
            })
            .header("schema-version", "1")
            .build()?;
        writer.write(&mut tx, &event).await?;
        tx.commit().await?;
        placed += 1;

        if args.cancel_every > 0 && n % args.cancel_every == 0 {
            let mut tx = pool.begin().await?;
            // Update (and so lock) the aggregate's row before enqueueing: this is what keeps
            // the order's events in commit order for the relay.
            sqlx::query(
                "update shop.orders set status = 'cancelled', version = version + 1, updated_at = now() where id = $1",
            )
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
            let event = Event::builder("order", order_id.to_string(), "order.cancelled")
                .payload(&OrderCancelled {
                    order_id,
                    reason: "customer request",
                })
                .header("schema-version", "1")
                .build()?;
            writer.write(&mut tx, &event).await?;
            tx.commit().await?;
            cancelled += 1;
        }
    }
    println!(
        "order-service: placed {placed} orders, cancelled {cancelled}; {} events written ({})",
        placed + cancelled,
        match args.mode {
            Mode::Table => "outbox table",
            Mode::WalMessage => "WAL messages",
        }
    );
    Ok(())
}
