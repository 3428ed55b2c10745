//! What the outbox costs the writer: a business transaction with `Outbox::enqueue`
//! against the same transaction with a hand-written `INSERT` of the same row, at 1,
//! 4 and 16 clients; and `enqueue_all` of 10 and 100 events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outbox_core::{Event, Outbox, OutboxConfig};

use crate::Ctx;
use crate::fixture::World;
use crate::stats::Summary;
use crate::table::{Report, Section, fixed, rate, verdict};

/// Client counts of the comparison.
const CLIENTS: [usize; 3] = [1, 4, 16];
/// Events per transaction of the batch rows, and their clients.
const BATCHES: [usize; 2] = [10, 100];
const BATCH_CLIENTS: usize = 4;

/// How one transaction writes its event(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A hand-written `insert into outbox (…) values (…)` of the same row.
    HandWritten,
    /// `Outbox::enqueue`.
    Enqueue,
    /// `Outbox::enqueue_all` of this many events.
    EnqueueAll(usize),
}

/// Run `ctx.runs` writer runs and add the section to `report`.
pub(crate) async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let mut single: Vec<[(f64, f64); 3]> = Vec::new();
    let mut batches: Vec<[f64; 2]> = Vec::new();
    for run in 0..ctx.runs {
        println!("bench: writer run {}/{}", run + 1, ctx.runs);
        let world = World::create(ctx, None).await?;
        let result = once(ctx, &world, run).await;
        world.cleanup(ctx).await;
        match result {
            Ok((s, b)) => {
                single.push(s);
                batches.push(b);
            }
            Err(error) => eprintln!("bench: writer run failed: {error:#}"),
        }
    }
    let mut section = Section::new(
        "4. Writer cost (business transaction + outbox row, synchronous_commit on)",
        &[
            "clients",
            "hand-written INSERT tx/s",
            "enqueue tx/s",
            "cost: hand ÷ enqueue",
            "target",
            "",
        ],
    );
    for (n, clients) in CLIENTS.iter().enumerate() {
        let hand: Vec<f64> = single.iter().map(|s| s[n].0).collect();
        let enqueue: Vec<f64> = single.iter().map(|s| s[n].1).collect();
        let cost: Vec<f64> = single.iter().map(|s| s[n].0 / s[n].1).collect();
        let cost = Summary::of(&cost);
        let targeted = *clients >= 4;
        section.row(vec![
            clients.to_string(),
            rate(Summary::of(&hand)),
            rate(Summary::of(&enqueue)),
            fixed(cost, 3),
            if targeted {
                "≤ 1.05".into()
            } else {
                String::new()
            },
            if targeted {
                verdict(cost, |c| c <= 1.05)
            } else {
                String::new()
            },
        ]);
    }
    for (n, events) in BATCHES.iter().enumerate() {
        let rates: Vec<f64> = batches.iter().map(|b| b[n]).collect();
        section.row(vec![
            format!("{BATCH_CLIENTS}, enqueue_all of {events}"),
            String::new(),
            format!("{} events/s", rate(Summary::of(&rates))),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    section.note(format!(
        "The business transaction inserts an order row, then writes its event ({}-byte payload); \
         each figure is {} s of closed-loop clients, one connection each, the modes alternating \
         within a run on freshly truncated tables. The cost is the hand-written rate over the \
         enqueue rate of the same run (1.00 = free).",
        ctx.payload_bytes, ctx.writer_secs
    ));
    report.add(section)
}

async fn once(ctx: &Ctx, world: &World, run: usize) -> anyhow::Result<([(f64, f64); 3], [f64; 2])> {
    let orders = world.schema.qualify("orders");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {orders} (id bigint generated always as identity primary key, \
         customer text not null, total_cents bigint not null, status text not null, \
         updated_at timestamptz not null default now())"
    )))
    .execute(&ctx.pool)
    .await
    .context("creating the business table")?;
    let mut single = [(0.0, 0.0); 3];
    for (n, &clients) in CLIENTS.iter().enumerate() {
        // Alternate which mode goes first, so neither always meets the warmer cache.
        let order = if run.is_multiple_of(2) {
            [Mode::HandWritten, Mode::Enqueue]
        } else {
            [Mode::Enqueue, Mode::HandWritten]
        };
        for mode in order {
            let tps = measure(ctx, world, mode, clients).await?;
            println!("bench: writer {mode:?} at {clients} clients: {tps:.0} tx/s");
            match mode {
                Mode::HandWritten => single[n].0 = tps,
                _ => single[n].1 = tps,
            }
        }
    }
    let mut batches = [0.0; 2];
    for (n, &events) in BATCHES.iter().enumerate() {
        let tps = measure(ctx, world, Mode::EnqueueAll(events), BATCH_CLIENTS).await?;
        batches[n] = tps * events as f64;
        println!(
            "bench: writer enqueue_all of {events}: {:.0} events/s",
            batches[n]
        );
    }
    Ok((single, batches))
}

/// Transactions per second of `clients` closed-loop clients for `ctx.writer_secs`.
async fn measure(ctx: &Ctx, world: &World, mode: Mode, clients: usize) -> anyhow::Result<f64> {
    let orders = world.schema.qualify("orders");
    let outbox_table = world.schema.qualify("outbox");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "truncate {orders}, {outbox_table}"
    )))
    .execute(&ctx.pool)
    .await?;
    let insert_order: Arc<str> = format!(
        "insert into {orders} (customer, total_cents, status) values ($1, $2, 'placed') returning id"
    )
    .into();
    let insert_outbox: Arc<str> = format!(
        "insert into {outbox_table} (event_id, aggregate_type, aggregate_id, event_type, partition_key, \
         destination, payload, headers, created_at) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    )
    .into();
    let outbox = Outbox::new(OutboxConfig {
        schema: world.schema.clone(),
        ..OutboxConfig::default()
    });
    let pad: Arc<str> = "x".repeat(ctx.payload_bytes).into();
    let mut connections = Vec::new();
    for _ in 0..clients {
        connections.push(ctx.pool.acquire().await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for (client, mut conn) in connections.into_iter().enumerate() {
        let (outbox, pad, stop) = (outbox.clone(), pad.clone(), stop.clone());
        let (insert_order, insert_outbox) = (insert_order.clone(), insert_outbox.clone());
        tasks.spawn(async move {
            let mut done = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                let total_cents = 1_000 + (done % 9_000) as i64;
                let id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(&*insert_order))
                    .bind(format!("customer-{client}"))
                    .bind(total_cents)
                    .fetch_one(&mut *tx)
                    .await?;
                let payload = |j: usize| {
                    serde_json::json!({ "order_id": id, "total_cents": total_cents, "j": j, "pad": &*pad })
                };
                match mode {
                    Mode::HandWritten => {
                        let aggregate_id = id.to_string();
                        sqlx::query(sqlx::AssertSqlSafe(&*insert_outbox))
                            .bind(uuid::Uuid::now_v7())
                            .bind("order")
                            .bind(&aggregate_id)
                            .bind("order.placed")
                            .bind(format!("order:{aggregate_id}"))
                            .bind(None::<String>)
                            .bind(payload(0))
                            .bind(serde_json::json!({}))
                            .bind(chrono::Utc::now())
                            .execute(&mut *tx)
                            .await?;
                    }
                    Mode::Enqueue => {
                        let event = Event::builder("order", id.to_string(), "order.placed")
                            .payload(&payload(0))
                            .build()?;
                        outbox.enqueue(&mut tx, &event).await?;
                    }
                    Mode::EnqueueAll(events) => {
                        let events = (0..events)
                            .map(|j| {
                                Event::builder("order", id.to_string(), "order.placed")
                                    .payload(&payload(j))
                                    .build()
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        outbox.enqueue_all(&mut tx, &events).await?;
                    }
                }
                tx.commit().await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    tokio::time::sleep(Duration::from_secs(ctx.writer_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result.context("a writer panicked")??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
