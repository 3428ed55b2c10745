//! Example writer: an order service that places and cancels orders, writing
//! each change and its event in one transaction through the outbox.
//!
//! ```text
//! cargo run -p outbox-examples --bin order-service -- --orders 100
//! ```

use anyhow::Context;
use clap::Parser;
use outbox_core::{Event, Outbox, OutboxConfig, SchemaName};
use serde::Serialize;

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
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let schema = SchemaName::new(args.schema.clone()).context("--schema")?;
    outbox_core::migrate(&pool, &schema).await?;
    outbox_examples::create_shop_tables(&pool).await?;
    let outbox = Outbox::new(OutboxConfig {
        schema,
        ..OutboxConfig::default()
    });

    let mut placed = 0;
    let mut cancelled = 0;
    for n in 1..=args.orders {
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
        outbox.enqueue(&mut tx, &event).await?;
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
            outbox.enqueue(&mut tx, &event).await?;
            tx.commit().await?;
            cancelled += 1;
        }
    }
    println!(
        "order-service: placed {placed} orders, cancelled {cancelled}; {} events enqueued",
        placed + cancelled
    );
    Ok(())
}
