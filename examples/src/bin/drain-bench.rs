//! Measures the relay's drain rate: enqueue a backlog, start a relay, time until
//! the outbox is empty (every event confirmed by the broker and settled).
//!
//! ```text
//! cargo run --release -p outbox-examples --bin drain-bench -- --events 100000
//! cargo run --release -p outbox-examples --bin drain-bench -- --events 100000 --sink kafka
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use outbox_core::{Event, Outbox, OutboxConfig, SchemaName};
use outbox_relay::config::{
    RawConfig, RawDatabase, RawKafka, RawPipeline, RawPolling, RawRabbitMq,
};

/// Relay drain-rate benchmark (polling source → RabbitMQ).
#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Backlog size.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct partition keys.
    #[arg(long, default_value_t = 1_000)]
    keys: usize,
    /// Relay batch size.
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
    /// Only enqueue the backlog and declare the exchange and queue; print their names
    /// (`schema: …`, `exchange: …`) for an external relay, and leave them in place.
    #[arg(long)]
    enqueue_only: bool,
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
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (set DATABASE_URL)")?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let schema = SchemaName::new(format!("bench_{}", &id[..12]))?;
    outbox_core::migrate(&pool, &schema).await?;

    let connection =
        lapin::Connection::connect(&args.amqp_url, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ (set AMQP_URL)")?;
    let channel = connection.create_channel().await?;
    let exchange = format!("bench-{}", &id[..12]);
    let queue = exchange.clone();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let outbox = Outbox::new(OutboxConfig {
        schema: schema.clone(),
        ..OutboxConfig::default()
    });
    let padding = "x".repeat(args.payload_bytes);
    let started = Instant::now();
    for chunk in (0..args.events).collect::<Vec<_>>().chunks(1_000) {
        let events = chunk
            .iter()
            .map(|&i| {
                Event::builder("bench", (i % args.keys).to_string(), "bench.happened")
                    .payload(&serde_json::json!({ "i": i, "pad": padding }))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = pool.begin().await?;
        outbox.enqueue_all(&mut tx, &events).await?;
        tx.commit().await?;
    }
    println!(
        "drain-bench: enqueued {} events over {} keys in {:.1} s",
        args.events,
        args.keys,
        started.elapsed().as_secs_f64()
    );

    if args.enqueue_only {
        println!("schema: {schema}");
        println!("exchange: {exchange}");
        return Ok(());
    }

    if args.sink == "kafka" {
        create_kafka_topic(&args.kafka_brokers, &exchange, 6).await?;
    }
    let raw = RawConfig {
        database: RawDatabase {
            url: Some(args.database_url.clone()),
            schema: Some(schema.to_string()),
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
        sink: Some(args.sink.clone()),
        rabbitmq: (args.sink == "rabbitmq").then(|| RawRabbitMq {
            url: Some(args.amqp_url.clone()),
            exchange: Some(exchange.clone()),
            ..Default::default()
        }),
        kafka: (args.sink == "kafka").then(|| RawKafka {
            brokers: Some(args.kafka_brokers.clone()),
            topic: Some(exchange.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let config = raw.validate()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let relay = tokio::spawn(outbox_relay::run(config, async move {
        let _ = stopped.await;
    }));
    let count_sql = format!("select count(*) from {}", schema.qualify("outbox"));
    loop {
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count_sql.as_str()))
            .fetch_one(&pool)
            .await?;
        if left == 0 {
            break;
        }
        if relay.is_finished() {
            anyhow::bail!("the relay stopped early with {left} events left");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    let summary = relay.await??;
    println!(
        "drain-bench: relay drained {} events to {} in {:.2} s: {:.0} events/s (batch {}, in-flight {}, published {})",
        args.events,
        args.sink,
        elapsed.as_secs_f64(),
        args.events as f64 / elapsed.as_secs_f64(),
        args.batch_size,
        args.max_in_flight,
        summary.published
    );

    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let drop = format!("drop schema {} cascade", schema.as_str());
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(&pool)
        .await?;
    Ok(())
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
