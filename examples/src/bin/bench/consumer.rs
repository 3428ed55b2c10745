//! Consumer throughput: messages/s through `outbox_core`'s consumer helpers and the
//! inbox into a one-row effect, from a preloaded RabbitMQ queue or Kafka topic.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use outbox_core::Inbox;
use outbox_core::consumer::amqp::AmqpConsumer;
use outbox_core::consumer::kafka::{KafkaConsumer, KafkaSettings};
use outbox_core::consumer::{ConsumerConfig, Handler, HandlerError, Message};
use sqlx::PgConnection;

use crate::fixture::{World, create_topic, delete_topics};
use crate::stats::Summary;
use crate::table::{Report, Section, rate, verdict};
use crate::{Ctx, Sink, limits};

/// How often the effects are counted.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for the first effect (Kafka: the group join).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The target of issue 17.
const TARGET_PER_SEC: f64 = 5_000.0;

/// The effect: one row per message, in the inbox's transaction.
struct OneRow {
    insert: String,
}

impl Handler for OneRow {
    async fn handle(&self, message: &Message, conn: &mut PgConnection) -> Result<(), HandlerError> {
        sqlx::query(sqlx::AssertSqlSafe(self.insert.as_str()))
            .bind(&message.meta.event_id)
            .bind(message.payload.len() as i32)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Run `ctx.runs` consumer runs per sink and add the section to `report`.
pub(crate) async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let mut section = Section::new(
        "7. Consumer throughput (outbox_core consumer helpers + inbox, one-row effect)",
        &["sink", "messages/s", "target", ""],
    );
    let mut rates: Vec<(Sink, Vec<f64>)> = ctx.sinks.iter().map(|&s| (s, Vec::new())).collect();
    for run in 0..ctx.runs {
        println!("bench: consumer run {}/{}", run + 1, ctx.runs);
        for (sink, rates) in &mut rates {
            match once(ctx, *sink).await {
                Ok(rate) => {
                    println!("bench: consumer {}: {rate:.0} messages/s", sink.name());
                    rates.push(rate);
                }
                Err(error) => eprintln!("bench: consumer {} failed: {error:#}", sink.name()),
            }
        }
    }
    for (sink, rates) in rates {
        let summary = Summary::of(&rates);
        section.row(vec![
            sink.name().into(),
            rate(summary),
            "≥ 5,000".into(),
            verdict(summary, |r| r >= TARGET_PER_SEC),
        ]);
    }
    section.note(format!(
        "{} messages preloaded (the relay's properties and headers, 1,000 keys), then \
         `AmqpConsumer` / `KafkaConsumer` with the helpers' settings: {} in flight, batches of \
         at most {} messages (whatever is ready, no wait), {} batch transactions at once; a batch \
         is one transaction with the inbox row and one effect row per message (no savepoints \
         unless a handler fails). \
         Counted from the first effect row for at most {} s (the Kafka group join is left out).",
        crate::table::thousands(ctx.consumer_messages as f64),
        outbox_core::consumer::DEFAULT_MAX_IN_FLIGHT,
        ctx.consumer_batch_messages
            .unwrap_or(outbox_core::consumer::DEFAULT_MAX_BATCH_MESSAGES),
        ctx.consumer_batches
            .unwrap_or(outbox_core::consumer::DEFAULT_MAX_CONCURRENT_BATCHES),
        ctx.consumer_secs
    ));
    report.add(section)
}

async fn once(ctx: &Ctx, sink: Sink) -> anyhow::Result<f64> {
    let world = World::create(ctx, Some(sink)).await?;
    let dead_letters = format!("{}-dead-letters", world.destination);
    let result = async {
        if sink == Sink::Kafka {
            create_topic(&ctx.kafka_brokers, &dead_letters).await?;
        }
        measure(ctx, &world, sink, &dead_letters).await
    }
    .await;
    if sink == Sink::Kafka {
        delete_topics(&ctx.kafka_brokers, &[dead_letters.as_str()]).await;
    }
    world.cleanup(ctx).await;
    result
}

async fn measure(ctx: &Ctx, world: &World, sink: Sink, dead_letters: &str) -> anyhow::Result<f64> {
    let effects = world.schema.qualify("effects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {effects} (event_id text primary key, bytes int not null)"
    )))
    .execute(&ctx.pool)
    .await?;
    let total = ctx.consumer_messages;
    let far = Instant::now() + Duration::from_secs(600);
    let (loaded, _) = match sink {
        Sink::Rabbitmq => limits::publish_confirmed(ctx, &world.destination, 0, total, far).await?,
        Sink::Kafka => limits::produce(ctx, &world.destination, total, far).await?,
    };
    anyhow::ensure!(loaded == total, "preloaded {loaded} of {total} messages");
    let mut config = ConsumerConfig::new(format!("{}-consumer", world.destination));
    if let Some(batches) = ctx.consumer_batches {
        config.max_concurrent_batches = batches.max(1);
    }
    if let Some(messages) = ctx.consumer_batch_messages {
        config.max_batch_messages = messages.max(1);
        // Enough in flight for every batch to be full.
        config.max_in_flight = config.max_in_flight.max(
            config
                .max_batch_messages
                .saturating_mul(config.max_concurrent_batches),
        );
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::from(config.max_concurrent_batches) + 1)
        .connect(&ctx.database_url)
        .await
        .context("connecting the consumer's pool")?;
    let handler = OneRow {
        insert: format!("insert into {effects} (event_id, bytes) values ($1, $2)"),
    };
    let inbox = Inbox::new(world.schema.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let consumer = match sink {
        Sink::Rabbitmq => {
            let connection =
                lapin::Connection::connect(&ctx.amqp_url, lapin::ConnectionProperties::default())
                    .await
                    .context("connecting to RabbitMQ (set AMQP_URL)")?;
            let queue = world.destination.clone();
            let consumer = AmqpConsumer::new(pool.clone(), inbox, config, handler);
            tokio::spawn(async move {
                let channel = connection.create_channel().await?;
                let stats = consumer.run(&channel, &queue, shutdown).await?;
                let _ = connection.close(200, "done".into()).await;
                anyhow::Ok(stats)
            })
        }
        Sink::Kafka => {
            let settings = KafkaSettings::new(
                ctx.kafka_brokers.clone(),
                format!("{}-group", world.destination),
                [world.destination.clone()],
                dead_letters,
            );
            let consumer = KafkaConsumer::connect(pool.clone(), inbox, config, settings, handler)?;
            tokio::spawn(async move { Ok(consumer.run(shutdown).await?) })
        }
    };
    let count_sql = format!("select count(*) from {effects}");
    let started = Instant::now();
    let mut first: Option<(Instant, i64)> = None;
    let measured = loop {
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count_sql.as_str()))
            .fetch_one(&ctx.pool)
            .await?;
        let now = Instant::now();
        match first {
            None if count > 0 => first = Some((now, count)),
            None if started.elapsed() > START_TIMEOUT => {
                break Err(anyhow::anyhow!(
                    "no message handled within {START_TIMEOUT:?}"
                ));
            }
            Some((t0, n0))
                if count as usize >= total
                    || now - t0 >= Duration::from_secs(ctx.consumer_secs) =>
            {
                break Ok((count - n0) as f64 / (now - t0).as_secs_f64().max(1e-3));
            }
            _ => {}
        }
        if consumer.is_finished() {
            break Err(anyhow::anyhow!("the consumer stopped early"));
        }
        tokio::time::sleep(SAMPLE_INTERVAL).await;
    };
    let _ = stop.send(());
    let stats = consumer.await.context("the consumer task panicked")?;
    pool.close().await;
    let stats = stats?;
    anyhow::ensure!(
        stats.dead_lettered == 0,
        "{} messages dead-lettered",
        stats.dead_lettered
    );
    measured
}
