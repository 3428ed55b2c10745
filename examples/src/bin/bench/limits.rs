//! The machine's own limits, measured in the same run as the relay's figures:
//! raw publish-with-confirm through lapin into a durable queue, raw idempotent
//! `acks=all` produce through rdkafka, raw claim-and-delete of the outbox table.
//! Same payloads, headers and in-flight window as the relay.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::BasicProperties;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::fixture::World;
use crate::{Ctx, Sink};

/// Messages the raw RabbitMQ publisher sends (or fewer, at [`LIMIT_SECS`]).
const RABBITMQ_MESSAGES: usize = 20_000;
/// Messages the raw Kafka producer sends (or fewer, at [`LIMIT_SECS`]).
const KAFKA_MESSAGES: usize = 40_000;
/// Rows the raw claim-and-delete loop works through (or fewer, at [`LIMIT_SECS`]).
const POSTGRES_ROWS: usize = 50_000;
/// Longest a limit is measured.
pub(crate) const LIMIT_SECS: u64 = 5;
/// Channels the raw publisher spreads its window over, unless `--limit-channels` says.
pub(crate) const RABBITMQ_CHANNELS: usize = 8;
/// Keys of the limit measurements.
const KEYS: usize = 1_000;

/// Rates per second of one run; `None` where the measurement failed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Limits {
    pub(crate) rabbitmq: Option<f64>,
    pub(crate) kafka: Option<f64>,
    pub(crate) postgres: Option<f64>,
}

impl Limits {
    pub(crate) fn of(&self, sink: Sink) -> Option<f64> {
        match sink {
            Sink::Rabbitmq => self.rabbitmq,
            Sink::Kafka => self.kafka,
        }
    }
}

/// Measure the three limits once.
pub(crate) async fn measure(ctx: &Ctx) -> Limits {
    let mut limits = Limits::default();
    if ctx.sinks.contains(&Sink::Rabbitmq) {
        limits.rabbitmq = report("RabbitMQ publish-with-confirm", rabbitmq(ctx).await);
    }
    if ctx.sinks.contains(&Sink::Kafka) {
        limits.kafka = report("Kafka idempotent produce", kafka(ctx).await);
    }
    limits.postgres = report("PostgreSQL claim-and-delete", postgres(ctx).await);
    limits
}

fn report(what: &str, result: anyhow::Result<f64>) -> Option<f64> {
    match result {
        Ok(rate) => {
            println!("bench: limit: {what}: {rate:.0}/s");
            Some(rate)
        }
        Err(error) => {
            eprintln!("bench: limit: {what} failed: {error:#}");
            None
        }
    }
}

async fn rabbitmq(ctx: &Ctx) -> anyhow::Result<f64> {
    let world = World::create(ctx, Some(Sink::Rabbitmq)).await?;
    let deadline = Instant::now() + Duration::from_secs(LIMIT_SECS);
    let result = publish_confirmed(ctx, &world.destination, 0, RABBITMQ_MESSAGES, deadline).await;
    world.cleanup(ctx).await;
    let (sent, elapsed) = result?;
    Ok(sent as f64 / elapsed.as_secs_f64())
}

async fn kafka(ctx: &Ctx) -> anyhow::Result<f64> {
    let world = World::create(ctx, Some(Sink::Kafka)).await?;
    let deadline = Instant::now() + Duration::from_secs(LIMIT_SECS);
    let result = produce(ctx, &world.destination, KAFKA_MESSAGES, deadline).await;
    world.cleanup(ctx).await;
    let (sent, elapsed) = result?;
    Ok(sent as f64 / elapsed.as_secs_f64())
}

async fn postgres(ctx: &Ctx) -> anyhow::Result<f64> {
    let world = World::create(ctx, None).await?;
    let result = claim_and_delete(ctx, &world).await;
    world.cleanup(ctx).await;
    result
}

/// The body and properties the relay would send for event `i`: persistent, with its
/// message id, type and the relay's headers.
pub(crate) fn amqp_message(i: usize, pad: &str) -> (Vec<u8>, BasicProperties) {
    let body = serde_json::json!({ "i": i, "pad": pad })
        .to_string()
        .into_bytes();
    let text = |s: String| AMQPValue::LongString(LongString::from(s));
    let mut headers = FieldTable::default();
    let key = format!("bench:{}", i % KEYS);
    headers.insert(
        "outbox-event-id".into(),
        text(uuid::Uuid::now_v7().to_string()),
    );
    headers.insert("outbox-event-type".into(), text("bench.happened".into()));
    headers.insert("outbox-aggregate-type".into(), text("bench".into()));
    headers.insert("outbox-aggregate-id".into(), text((i % KEYS).to_string()));
    headers.insert("outbox-partition-key".into(), text(key));
    headers.insert(
        "outbox-created-at".into(),
        text(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    headers.insert("outbox-sequence".into(), AMQPValue::LongLongInt(i as i64));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(ShortString::from(uuid::Uuid::now_v7().to_string()))
        .with_type("bench.happened".into())
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default())
        .with_app_id("outbox-bench".into())
        .with_headers(headers);
    (body, properties)
}

/// A connection to RabbitMQ and one channel of it in confirm mode.
pub(crate) async fn confirm_channel(
    ctx: &Ctx,
) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let connection =
        lapin::Connection::connect(&ctx.amqp_url, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ (set AMQP_URL)")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Publish events `first..first + count` to `exchange` with confirms, `--limit-channels`
/// (default [`RABBITMQ_CHANNELS`]) channels sharing the relay's in-flight window; stop early at `deadline`. Returns the
/// confirmed count and the time from the first publish to the last confirm.
pub(crate) async fn publish_confirmed(
    ctx: &Ctx,
    exchange: &str,
    first: usize,
    count: usize,
    deadline: Instant,
) -> anyhow::Result<(usize, Duration)> {
    let connection =
        lapin::Connection::connect(&ctx.amqp_url, lapin::ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ (set AMQP_URL)")?;
    let channels = ctx.limit_channels.max(1);
    let per_channel = (ctx.window / channels).max(1);
    let next = Arc::new(AtomicUsize::new(first));
    let end = first + count;
    let pad: Arc<str> = "x".repeat(ctx.payload_bytes).into();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..channels {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (next, pad, exchange) = (next.clone(), pad.clone(), exchange.to_owned());
        tasks.spawn(async move {
            let mut pending = VecDeque::with_capacity(per_channel);
            let mut confirmed = 0_usize;
            loop {
                let i = if Instant::now() < deadline {
                    next.fetch_add(1, Ordering::Relaxed)
                } else {
                    end
                };
                if i >= end && pending.is_empty() {
                    break;
                }
                if i < end {
                    let (body, properties) = amqp_message(i, &pad);
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "bench.happened".into(),
                            BasicPublishOptions {
                                mandatory: true,
                                immediate: false,
                            },
                            &body,
                            properties,
                        )
                        .await?;
                    pending.push_back(confirm);
                }
                if (pending.len() >= per_channel || i >= end)
                    && let Some(confirm) = pending.pop_front()
                {
                    match confirm.await? {
                        Confirmation::Ack(None) => confirmed += 1,
                        Confirmation::Ack(Some(_)) => {
                            anyhow::bail!("RabbitMQ returned a message (unroutable)")
                        }
                        other => anyhow::bail!("RabbitMQ did not confirm a message: {other:?}"),
                    }
                }
            }
            anyhow::Ok(confirmed)
        });
    }
    let mut confirmed = 0;
    while let Some(result) = tasks.join_next().await {
        confirmed += result.context("a publisher task panicked")??;
    }
    let elapsed = started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    Ok((confirmed, elapsed))
}

/// An idempotent `acks=all` producer with the relay's settings.
pub(crate) fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "10000")
        .set("compression.type", "none")
        .set("linger.ms", "1")
        .create()
        .context("creating the Kafka producer")
}

/// Produce `count` events (keys `bench:<i % 1000>`) to `topic` with the relay's window of
/// outstanding deliveries; stop early at `deadline`. Returns the delivered count and the
/// time from the first send to the last report.
pub(crate) async fn produce(
    ctx: &Ctx,
    topic: &str,
    count: usize,
    deadline: Instant,
) -> anyhow::Result<(usize, Duration)> {
    let producer = producer(&ctx.kafka_brokers)?;
    let pad = "x".repeat(ctx.payload_bytes);
    let mut pending = VecDeque::with_capacity(ctx.window);
    let mut delivered = 0;
    let started = Instant::now();
    let mut i = 0;
    loop {
        let more = i < count && Instant::now() < deadline;
        if !more && pending.is_empty() {
            break;
        }
        if more {
            let body = serde_json::json!({ "i": i, "pad": pad }).to_string();
            let key = format!("bench:{}", i % KEYS);
            let id = uuid::Uuid::now_v7().to_string();
            let sequence = i.to_string();
            let headers = OwnedHeaders::new_with_capacity(4)
                .insert(Header {
                    key: "outbox-event-id",
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: "outbox-event-type",
                    value: Some("bench.happened".as_bytes()),
                })
                .insert(Header {
                    key: "outbox-partition-key",
                    value: Some(key.as_bytes()),
                })
                .insert(Header {
                    key: "outbox-sequence",
                    value: Some(sequence.as_bytes()),
                });
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(body.as_bytes())
                .headers(headers);
            match producer.send_result(record) {
                Ok(future) => pending.push_back(future),
                Err((error, _)) => anyhow::bail!("producing to Kafka: {error}"),
            }
            i += 1;
        }
        if (pending.len() >= ctx.window || !more)
            && let Some(future) = pending.pop_front()
        {
            match future.await {
                Ok(Ok(_)) => delivered += 1,
                Ok(Err((error, _))) => anyhow::bail!("Kafka did not take a message: {error}"),
                Err(_) => anyhow::bail!("the Kafka producer dropped a delivery report"),
            }
        }
    }
    Ok((delivered, started.elapsed()))
}

/// Claim (`for update skip locked`, the relay's batch size) and delete, one
/// connection, until the backlog is gone or [`LIMIT_SECS`] passed.
async fn claim_and_delete(ctx: &Ctx, world: &World) -> anyhow::Result<f64> {
    world.load_backlog(ctx, 0, POSTGRES_ROWS, KEYS).await?;
    let outbox = world.schema.qualify("outbox");
    let claim = format!(
        "select sequence, event_id, partition_key, payload::text from {outbox} \
         where published_at is null order by sequence limit $1 for update skip locked"
    );
    let delete = format!("delete from {outbox} where sequence = any($1)");
    let mut conn = ctx.pool.acquire().await?;
    let started = Instant::now();
    let mut rows = 0;
    while started.elapsed() < Duration::from_secs(LIMIT_SECS) {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let claimed: Vec<(i64, uuid::Uuid, String, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(claim.as_str()))
                .bind(ctx.batch_size as i64)
                .fetch_all(&mut *tx)
                .await?;
        if claimed.is_empty() {
            break;
        }
        let sequences: Vec<i64> = claimed.iter().map(|row| row.0).collect();
        sqlx::query(sqlx::AssertSqlSafe(delete.as_str()))
            .bind(&sequences)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        rows += claimed.len();
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}
