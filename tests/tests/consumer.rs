//! The consumer helpers of outbox-core (`consumer::amqp`, `consumer::kafka`) against
//! the real brokers and PostgreSQL: every message is published **twice** (as after a
//! relay crash) and consumed by **two** instances of one logical consumer at once; a
//! few messages fail twice before they succeed; one always fails.
//!
//! What must hold (G5): each event's effect row exists exactly once; the always-failing
//! message is dead-lettered (RabbitMQ: through the queue's dead-letter exchange; Kafka:
//! on the dead-letter topic with the reason in a header) and has no effect; the
//! flaky ones end handled. Each test owns its schema, exchange, queues and topics.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use outbox_core::Inbox;
use outbox_core::consumer::amqp::AmqpConsumer;
use outbox_core::consumer::kafka::{KafkaConsumer, KafkaSettings};
use outbox_core::consumer::{
    ConsumerConfig, ConsumerStats, Handler, HandlerError, Message, RetryPolicy, wire,
};
use outbox_tests::TestSchema;
use outbox_tests::amqp::amqp_url;
use outbox_tests::kafka::{TopicConsumer, brokers, create_topic};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgConnection;
use tokio::time::Instant;

/// Longest wait for the consumers to get through everything.
const DEADLINE: Duration = Duration::from_secs(60);
/// Distinct events published (each twice).
const EVENTS: i64 = 200;
/// Keys they are spread over.
const KEYS: i64 = 10;
/// The event that always fails.
const POISON_N: i64 = 77;

fn event_id(n: i64) -> String {
    format!("00000000-0000-7000-8000-{n:012}")
}

fn flaky(n: i64) -> bool {
    n % 17 == 0
}

/// Writes one effect row per handled message; fails twice for flaky events and
/// always for the poison event.
struct Effects {
    table: String,
    failures: Arc<Mutex<HashMap<String, u32>>>,
}

impl Handler for Effects {
    async fn handle(&self, message: &Message, conn: &mut PgConnection) -> Result<(), HandlerError> {
        let body: serde_json::Value = message.json()?;
        let n = body["n"]
            .as_i64()
            .ok_or_else(|| HandlerError::permanent("payload without n"))?;
        if n == POISON_N {
            return Err(HandlerError::transient("the poison event always fails"));
        }
        if flaky(n) {
            let mut failures = self.failures.lock().unwrap();
            let seen = failures.entry(message.meta.event_id.clone()).or_insert(0);
            *seen += 1;
            if *seen <= 2 {
                return Err(HandlerError::transient("a flaky failure"));
            }
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into {} (event_id, partition_key, n) values ($1, $2, $3)",
            self.table
        )))
        .bind(&message.meta.event_id)
        .bind(message.meta.partition_key.as_deref())
        .bind(n)
        .execute(conn)
        .await?;
        Ok(())
    }
}

async fn effects_table(test: &TestSchema) -> String {
    let table = test.table("effects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {table} (id bigserial primary key, event_id text not null, \
         partition_key text, n bigint not null)"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    table
}

fn consumer_config() -> ConsumerConfig {
    let mut config = ConsumerConfig::new("billing");
    config.retry = RetryPolicy {
        max_attempts: 4,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    };
    config.max_in_flight = 16;
    config
}

/// `(distinct events with an effect, events with more than one)`.
async fn effect_counts(test: &TestSchema, table: &str) -> (i64, i64) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select count(*), count(*) filter (where copies > 1) \
         from (select event_id, count(*) as copies from {table} group by event_id) e"
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

async fn poison_effects(test: &TestSchema, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {table} where n = $1"
    )))
    .bind(POISON_N)
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

/// The consumer instances' tasks.
type Runs = Vec<tokio::task::JoinHandle<Result<ConsumerStats, outbox_core::Error>>>;

/// Wait until every event but the poison one has exactly one effect (never two), then
/// stop the instances and add up what they did.
async fn wait_for_effects_then_stop(
    test: &TestSchema,
    table: &str,
    until: Instant,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    runs: Runs,
) -> ConsumerStats {
    loop {
        let (distinct, repeated) = effect_counts(test, table).await;
        assert_eq!(repeated, 0, "an event's effect happened twice");
        if distinct == EVENTS - 1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{distinct} of {} events have their effect after {DEADLINE:?}",
            EVENTS - 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for stop in stops {
        let _ = stop.send(());
    }
    let mut total = ConsumerStats::default();
    for run in runs {
        let stats = run.await.unwrap().unwrap();
        total.handled += stats.handled;
        total.duplicates += stats.duplicates;
        total.retries += stats.retries;
        total.dead_lettered += stats.dead_lettered;
    }
    total
}

fn payload(n: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_helper_applies_each_event_once_across_duplicates_and_two_instances() {
    let test = TestSchema::new().await;
    let table = effects_table(&test).await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (exchange, queue) = (format!("test-x-{id}"), format!("test-q-{id}"));
    let (dlx, dlq) = (format!("test-dlx-{id}"), format!("test-dlq-{id}"));

    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let setup = connection.create_channel().await.unwrap();
    for (name, kind) in [
        (&exchange, ExchangeKind::Topic),
        (&dlx, ExchangeKind::Fanout),
    ] {
        setup
            .exchange_declare(
                name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.as_str())),
    );
    for (name, args, source, binding) in [
        (&queue, arguments, &exchange, "#"),
        (&dlq, FieldTable::default(), &dlx, ""),
    ] {
        setup
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        setup
            .queue_bind(
                name.as_str().into(),
                source.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    // Two instances of consumer "billing", each on its own channel.
    let failures = Arc::new(Mutex::new(HashMap::new()));
    let mut stops = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let channel = connection.create_channel().await.unwrap();
        let consumer = AmqpConsumer::new(
            test.pool.clone(),
            Inbox::new(test.schema.clone()),
            consumer_config(),
            Effects {
                table: table.clone(),
                failures: failures.clone(),
            },
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let queue = queue.clone();
        stops.push(stop);
        runs.push(tokio::spawn(async move {
            consumer
                .run(&channel, &queue, async {
                    let _ = stopped.await;
                })
                .await
        }));
    }

    // Publish every event twice, as the relay does (message_id, key and sequence headers).
    let publisher = connection.create_channel().await.unwrap();
    for copy in 0..2 {
        for n in 1..=EVENTS {
            let mut headers = FieldTable::default();
            let key = format!("order:{}", n % KEYS);
            headers.insert(
                wire::PARTITION_KEY.into(),
                AMQPValue::LongString(LongString::from(key.as_str())),
            );
            headers.insert(
                wire::SEQUENCE.into(),
                AMQPValue::LongString(LongString::from(n.to_string().as_str())),
            );
            let properties = BasicProperties::default()
                .with_message_id(event_id(n).as_str().into())
                .with_headers(headers);
            publisher
                .basic_publish(
                    exchange.as_str().into(),
                    "order.placed".into(),
                    BasicPublishOptions::default(),
                    &payload(n),
                    properties,
                )
                .await
                .unwrap();
        }
        eprintln!("published copy {copy}");
    }

    // The dead-letter queue receives both copies of the poison event.
    let dead = connection.create_channel().await.unwrap();
    let mut dead_letters = dead
        .basic_consume(
            dlq.as_str().into(),
            "test-dlq-reader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let until = Instant::now() + DEADLINE;
    let mut dead_ids = Vec::new();
    while dead_ids.len() < 2 {
        let delivery = tokio::time::timeout_at(until, dead_letters.next())
            .await
            .expect("both copies of the poison event are dead-lettered")
            .unwrap()
            .unwrap();
        dead_ids.push(
            delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
                .to_owned(),
        );
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    assert_eq!(dead_ids, [event_id(POISON_N), event_id(POISON_N)]);

    let total = wait_for_effects_then_stop(&test, &table, until, stops, runs).await;
    eprintln!("amqp consumer stats: {total:?}");
    assert_eq!(total.handled, (EVENTS - 1) as u64);
    // Second copies still queued when the consumers stopped are redelivered later.
    assert!(total.duplicates <= (EVENTS - 1) as u64, "{total:?}");
    assert_eq!(total.dead_lettered, 2);
    assert!(total.retries >= 2 * (EVENTS / 17) as u64, "{total:?}");
    assert_eq!(poison_effects(&test, &table).await, 0);
    let (distinct, repeated) = effect_counts(&test, &table).await;
    assert_eq!((distinct, repeated), (EVENTS - 1, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_helper_applies_each_event_once_across_duplicates_and_two_instances() {
    let test = TestSchema::new().await;
    let table = effects_table(&test).await;
    let topic = create_topic(3).await;
    let dead_letter_topic = create_topic(1).await;
    let dead_letters = TopicConsumer::start(&dead_letter_topic, 1);

    // Two instances in different groups: each receives every message, so every message
    // reaches both at about the same time; the inbox (one consumer name) decides.
    let failures = Arc::new(Mutex::new(HashMap::new()));
    let mut stops = Vec::new();
    let mut runs = Vec::new();
    for instance in 0..2 {
        let settings = KafkaSettings::new(
            brokers(),
            format!("test-group-{}-{instance}", uuid::Uuid::new_v4().simple()),
            [topic.clone()],
            dead_letter_topic.clone(),
        );
        let consumer = KafkaConsumer::connect(
            test.pool.clone(),
            Inbox::new(test.schema.clone()),
            consumer_config(),
            settings,
            Effects {
                table: table.clone(),
                failures: failures.clone(),
            },
        )
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        runs.push(tokio::spawn(async move {
            consumer
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }));
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for _copy in 0..2 {
        for n in 1..=EVENTS {
            let key = format!("order:{}", n % KEYS);
            let id = event_id(n);
            let sequence = n.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: wire::EVENT_ID,
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: wire::PARTITION_KEY,
                    value: Some(key.as_bytes()),
                })
                .insert(Header {
                    key: wire::SEQUENCE,
                    value: Some(sequence.as_bytes()),
                });
            let body = payload(n);
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(key.as_bytes())
                        .payload(&body)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }

    // Both groups dead-letter both copies of the poison event.
    let dead = dead_letters.wait_for(4, DEADLINE).await;
    for message in &dead {
        assert_eq!(
            message.header(wire::EVENT_ID),
            Some(event_id(POISON_N)),
            "only the poison event is dead-lettered"
        );
        let reason = message.header(wire::DEAD_LETTER_ERROR).unwrap_or_default();
        assert!(reason.contains("always fails"), "{reason}");
        let source = message.header(wire::DEAD_LETTER_SOURCE).unwrap_or_default();
        assert!(source.starts_with(&format!("{topic}/")), "{source}");
    }

    let until = Instant::now() + DEADLINE;
    let total = wait_for_effects_then_stop(&test, &table, until, stops, runs).await;
    eprintln!("kafka consumer stats: {total:?}");
    assert_eq!(total.handled, (EVENTS - 1) as u64);
    // Four copies of each event reach the two groups; one is handled, and copies not yet
    // read when the consumers stopped are read again by the group's next consumer.
    assert!(total.duplicates <= 3 * (EVENTS - 1) as u64, "{total:?}");
    assert_eq!(total.dead_lettered, 4);
    assert_eq!(poison_effects(&test, &table).await, 0);
}
