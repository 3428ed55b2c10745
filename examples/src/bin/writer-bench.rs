//! Measures what the writer costs: events/s and per-transaction latency for
//! concurrent writers, with and without the per-key advisory lock.
//!
//! ```text
//! cargo run --release -p outbox-examples --bin writer-bench -- --writers 8 --transactions 2000
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use outbox_core::{Event, KeyOrdering, Outbox, OutboxConfig, SchemaName};

/// Writer throughput benchmark.
#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Concurrent writer tasks (one connection each).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Transactions per writer per mode.
    #[arg(long, default_value_t = 1000)]
    transactions: usize,
    /// Events per transaction (enqueue_all when more than 1).
    #[arg(long, default_value_t = 1)]
    events_per_tx: usize,
    /// Distinct partition keys the writers spread over.
    #[arg(long, default_value_t = 200)]
    keys: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.writers as u32 + 1)
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let schema = SchemaName::new("outbox_bench")?;
    sqlx::raw_sql("drop schema if exists outbox_bench cascade")
        .execute(&pool)
        .await?;
    outbox_core::migrate(&pool, &schema).await?;

    println!(
        "writer-bench: {} writers x {} transactions x {} events, {} keys",
        args.writers, args.transactions, args.events_per_tx, args.keys
    );
    for mode in [KeyOrdering::CallerLocksAggregate, KeyOrdering::AdvisoryLock] {
        let outbox = Outbox::new(OutboxConfig {
            schema: schema.clone(),
            key_ordering: mode,
            ..OutboxConfig::default()
        });
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..args.writers {
            let pool = pool.clone();
            let outbox = outbox.clone();
            let (transactions, per_tx, keys) = (args.transactions, args.events_per_tx, args.keys);
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity(transactions);
                for i in 0..transactions {
                    let events: Vec<Event> = (0..per_tx)
                        .map(|j| {
                            let key = (writer * 7919 + i * 31 + j) % keys;
                            Event::builder("bench", key.to_string(), "bench.happened")
                                .payload(&serde_json::json!({ "writer": writer, "i": i, "j": j, "pad": "x".repeat(200) }))
                                .build()
                        })
                        .collect::<Result<_, _>>()?;
                    let t = Instant::now();
                    let mut tx = pool.begin().await?;
                    if per_tx == 1 {
                        outbox.enqueue(&mut tx, &events[0]).await?;
                    } else {
                        outbox.enqueue_all(&mut tx, &events).await?;
                    }
                    tx.commit().await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            });
        }
        let mut latencies: Vec<Duration> = Vec::new();
        while let Some(result) = tasks.join_next().await {
            latencies.extend(result??);
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        let events = args.writers * args.transactions * args.events_per_tx;
        println!(
            "{mode:?}: {:.0} events/s, {:.0} tx/s; tx latency p50 {:.2} ms, p99 {:.2} ms",
            events as f64 / elapsed.as_secs_f64(),
            latencies.len() as f64 / elapsed.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
        );
    }
    sqlx::raw_sql("drop schema if exists outbox_bench cascade")
        .execute(&pool)
        .await?;
    Ok(())
}
