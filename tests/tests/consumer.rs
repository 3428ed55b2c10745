//! The consumer helpers of outbox-core (`consumer::amqp`, `consumer::kafka`) against
//! the real brokers and PostgreSQL: every message is published **three times** (as
//! after relay crashes) and consumed by **two** instances of one logical consumer at
//! once, in batches; a few messages fail twice before they succeed; one always fails.
//! Then the batches themselves: a failing handler inside a batch, copies of a message
//! inside one batch, and a consumer lost between its commit and its acks.
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
/// Distinct events published (each `COPIES` times).
const EVENTS: i64 = 200;
/// Copies of each event published (G5: three deliveries to two instances).
const COPIES: usize = 3;
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

    // Publish every event three times, as the relay does (message_id, key and sequence headers).
    let publisher = connection.create_channel().await.unwrap();
    for copy in 0..COPIES {
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

    // The dead-letter queue receives every copy of the poison event.
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
    while dead_ids.len() < COPIES {
        let delivery = tokio::time::timeout_at(until, dead_letters.next())
            .await
            .expect("every copy of the poison event is dead-lettered")
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
    assert_eq!(dead_ids, vec![event_id(POISON_N); COPIES]);

    let total = wait_for_effects_then_stop(&test, &table, until, stops, runs).await;
    eprintln!("amqp consumer stats: {total:?}");
    assert_eq!(total.handled, (EVENTS - 1) as u64);
    // Copies still queued when the consumers stopped are redelivered later.
    assert!(
        total.duplicates <= (COPIES as u64 - 1) * (EVENTS - 1) as u64,
        "{total:?}"
    );
    assert_eq!(total.dead_lettered, COPIES as u64);
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
    for _copy in 0..COPIES {
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

    // Both groups dead-letter every copy of the poison event.
    let dead = dead_letters.wait_for(2 * COPIES, DEADLINE).await;
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
    // Six copies of each event reach the two groups; one is handled, and copies not yet
    // read when the consumers stopped are read again by the group's next consumer.
    assert!(
        total.duplicates <= (2 * COPIES as u64 - 1) * (EVENTS - 1) as u64,
        "{total:?}"
    );
    assert_eq!(total.dead_lettered, 2 * COPIES as u64);
    assert_eq!(poison_effects(&test, &table).await, 0);
}

// ---------------------------------------------------------------------------------
// Batches: several messages in one inbox transaction, a savepoint per message.
// ---------------------------------------------------------------------------------

/// A message to publish: `(n, partition key, event id)`.
type Outgoing = (i64, String, String);

/// The batch tests' effect table: one row per handler run that committed, with the
/// id of the transaction it committed in.
async fn batch_effects_table(test: &TestSchema) -> String {
    let table = test.table("batch_effects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {table} (id bigserial primary key, event_id text not null, \
         partition_key text, n bigint not null, tx bigint not null)"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    table
}

/// Writes one effect row per run (with the transaction id), then fails with a real SQL
/// error on the first `fail_runs[n]` runs of message `n`, so a batch without a savepoint
/// per message would lose its whole transaction. Optionally closes a broker channel
/// while it handles `lose_channel_at`, as if the consumer died before its acks.
struct BatchRecorder {
    table: String,
    fail_runs: HashMap<i64, u32>,
    /// Runs of message `n` (its first `swallow_runs[n]`) that fail a statement, ignore
    /// the error and return `Ok`, leaving the transaction failed.
    swallow_runs: HashMap<i64, u32>,
    runs: Arc<Mutex<Vec<(i64, u32)>>>,
    lose_channel_at: Option<(i64, lapin::Channel)>,
}

impl BatchRecorder {
    fn new(table: &str) -> Self {
        BatchRecorder {
            table: table.to_owned(),
            fail_runs: HashMap::new(),
            swallow_runs: HashMap::new(),
            runs: Arc::new(Mutex::new(Vec::new())),
            lose_channel_at: None,
        }
    }
}

impl Handler for BatchRecorder {
    async fn handle(&self, message: &Message, conn: &mut PgConnection) -> Result<(), HandlerError> {
        let n = message.json::<serde_json::Value>()?["n"]
            .as_i64()
            .ok_or_else(|| HandlerError::permanent("payload without n"))?;
        self.runs.lock().unwrap().push((n, message.attempt));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into {} (event_id, partition_key, n, tx) values ($1, $2, $3, txid_current())",
            self.table
        )))
        .bind(&message.meta.event_id)
        .bind(message.meta.partition_key.as_deref())
        .bind(n)
        .execute(&mut *conn)
        .await?;
        if message.attempt <= self.fail_runs.get(&n).copied().unwrap_or(0) {
            // Aborts the transaction: only a rollback to the message's savepoint saves the batch.
            sqlx::query("select 1 / 0").execute(&mut *conn).await?;
        }
        if message.attempt <= self.swallow_runs.get(&n).copied().unwrap_or(0) {
            let _ignored = sqlx::query("select 1 / 0").execute(&mut *conn).await;
        }
        if let Some((at, channel)) = &self.lose_channel_at
            && *at == n
        {
            channel
                .close(200, "test: the consumer is lost".into())
                .await
                .unwrap();
        }
        Ok(())
    }
}

/// One batch of exactly `messages` (it waits for them, up to 1 s), one batch at once.
fn batch_config(messages: u16) -> ConsumerConfig {
    let mut config = ConsumerConfig::new("batch-test");
    config.retry = RetryPolicy {
        max_attempts: 5,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(50),
    };
    config.max_batch_messages = messages;
    config.max_batch_wait = Duration::from_secs(1);
    config.max_concurrent_batches = 1;
    config.database_retry = Duration::from_millis(50);
    config
}

/// `n` of every committed effect row, in commit order of `key` (all keys: `None`).
async fn effect_ns(test: &TestSchema, table: &str, key: Option<&str>) -> Vec<i64> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select n from {table} where $1::text is null or partition_key = $1 order by id"
    )))
    .bind(key)
    .fetch_all(&test.pool)
    .await
    .unwrap()
}

/// Distinct transactions the effects of messages other than `key`'s committed in.
async fn transactions_without(test: &TestSchema, table: &str, key: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(distinct tx) from {table} where partition_key <> $1"
    )))
    .bind(key)
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

async fn wait_for_effects(test: &TestSchema, table: &str, count: usize) {
    outbox_tests::wait_until("every message has its effect", DEADLINE, async || {
        effect_ns(test, table, None).await.len() >= count
    })
    .await;
}

/// A plain queue of this test (not auto-deleted: it must outlive a lost consumer).
struct TestQueue {
    connection: Connection,
    name: String,
}

impl TestQueue {
    async fn new() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let name = format!("test-q-{}", uuid::Uuid::new_v4().simple());
        connection
            .create_channel()
            .await
            .unwrap()
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        TestQueue { connection, name }
    }

    /// Publish through the default exchange, each confirmed before the next.
    async fn publish(&self, messages: &[Outgoing]) {
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        for (n, key, id) in messages {
            let mut headers = FieldTable::default();
            headers.insert(
                wire::PARTITION_KEY.into(),
                AMQPValue::LongString(LongString::from(key.as_str())),
            );
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_headers(headers);
            channel
                .basic_publish(
                    "".into(),
                    self.name.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload(*n),
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }

    /// Messages ready in the queue (neither delivered nor unacknowledged).
    async fn ready(&self) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// Run a consumer on a channel of its own until the returned sender fires.
    async fn consume(
        &self,
        test: &TestSchema,
        config: ConsumerConfig,
        handler: BatchRecorder,
        channel: Option<lapin::Channel>,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<ConsumerStats, outbox_core::Error>>,
    ) {
        let channel = match channel {
            Some(channel) => channel,
            None => self.connection.create_channel().await.unwrap(),
        };
        let consumer = AmqpConsumer::new(
            test.pool.clone(),
            Inbox::new(test.schema.clone()),
            config,
            handler,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let queue = self.name.clone();
        let run = tokio::spawn(async move {
            consumer
                .run(&channel, &queue, async {
                    let _ = stopped.await;
                })
                .await
        });
        (stop, run)
    }

    async fn delete(self) {
        let channel = self.connection.create_channel().await.unwrap();
        let _ = channel
            .queue_delete(self.name.as_str().into(), Default::default())
            .await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Message `n` of key `key`, id derived from `n`.
fn outgoing(n: i64, key: &str) -> Outgoing {
    (n, key.to_owned(), event_id(n))
}

/// 12 messages: 1, 2, 3 of key `order:a` (1 fails twice), 4..=12 of keys of their own.
fn batch_with_a_flaky_first_message() -> Vec<Outgoing> {
    (1..=12)
        .map(|n| {
            let key = if n <= 3 {
                "order:a".to_owned()
            } else {
                format!("order:{n}")
            };
            outgoing(n, &key)
        })
        .collect()
}

/// What the flaky-batch tests check once every effect is in.
async fn assert_flaky_batch(
    test: &TestSchema,
    table: &str,
    runs: &[(i64, u32)],
    stats: ConsumerStats,
) {
    // Each message's effect once; the failed runs of 1 left nothing.
    let mut all = effect_ns(test, table, None).await;
    all.sort_unstable();
    assert_eq!(all, (1..=12).collect::<Vec<_>>(), "runs: {runs:?}");
    // Message 1 ran three times; every other message once, in its first attempt.
    let runs_of = |n: i64| -> Vec<u32> {
        runs.iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, a)| *a)
            .collect()
    };
    assert_eq!(runs_of(1), [1, 2, 3], "runs: {runs:?}");
    for n in 2..=12 {
        assert_eq!(runs_of(n), [1], "message {n} ran once; runs: {runs:?}");
    }
    // The rest of key a waited for 1: they first ran after its successful run.
    let position = |n: i64, attempt: u32| runs.iter().position(|r| *r == (n, attempt)).unwrap();
    assert!(position(2, 1) > position(1, 3), "runs: {runs:?}");
    assert!(position(3, 1) > position(2, 1), "runs: {runs:?}");
    assert_eq!(effect_ns(test, table, Some("order:a")).await, [1, 2, 3]);
    // The other keys committed together, in the first batch's one transaction.
    assert_eq!(transactions_without(test, table, "order:a").await, 1);
    assert_eq!(
        (
            stats.handled,
            stats.duplicates,
            stats.retries,
            stats.dead_lettered
        ),
        (12, 0, 2, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_a_failing_handler_rolls_back_only_its_message_the_rest_of_the_batch_commits_once_and_its_key_waits()
 {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    let queue = TestQueue::new().await;
    queue.publish(&batch_with_a_flaky_first_message()).await;

    let mut handler = BatchRecorder::new(&table);
    handler.fail_runs.insert(1, 2);
    let runs = handler.runs.clone();
    let (stop, run) = queue.consume(&test, batch_config(12), handler, None).await;
    wait_for_effects(&test, &table, 12).await;
    let _ = stop.send(());
    let stats = run.await.unwrap().unwrap();
    let runs = runs.lock().unwrap().clone();
    assert_flaky_batch(&test, &table, &runs, stats).await;
    // Every delivery was acknowledged (the consumer requeues what it holds when it stops).
    outbox_tests::wait_until("the queue is empty", DEADLINE, async || {
        queue.ready().await == 0
    })
    .await;
    queue.delete().await;
}

/// 12 messages, each of a key of its own.
fn batch_of_own_keys() -> Vec<Outgoing> {
    (1..=12)
        .map(|n| outgoing(n, &format!("order:{n}")))
        .collect()
}

/// Run `handler` over one batch of [`batch_of_own_keys`] until every effect is in
/// (`handler` writes into a table of `test`); the handler's runs and the stats.
async fn consume_own_keys(
    test: &TestSchema,
    handler: BatchRecorder,
) -> (Vec<(i64, u32)>, ConsumerStats) {
    let queue = TestQueue::new().await;
    queue.publish(&batch_of_own_keys()).await;
    let runs = handler.runs.clone();
    let table = handler.table.clone();
    let (stop, run) = queue.consume(test, batch_config(12), handler, None).await;
    wait_for_effects(test, &table, 12).await;
    let _ = stop.send(());
    let stats = run.await.unwrap().unwrap();
    outbox_tests::wait_until("the queue is empty", DEADLINE, async || {
        queue.ready().await == 0
    })
    .await;
    queue.delete().await;
    let runs = runs.lock().unwrap().clone();
    (runs, stats)
}

/// Every message of [`batch_of_own_keys`] has exactly one effect row.
async fn assert_each_effect_once(test: &TestSchema, table: &str, runs: &[(i64, u32)]) {
    let mut all = effect_ns(test, table, None).await;
    all.sort_unstable();
    assert_eq!(all, (1..=12).collect::<Vec<_>>(), "runs: {runs:?}");
}

/// Handled, duplicates, retries, dead-lettered.
fn counts(stats: &ConsumerStats) -> (u64, u64, u64, u64) {
    (
        stats.handled,
        stats.duplicates,
        stats.retries,
        stats.dead_lettered,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_a_handler_failing_mid_batch_runs_once_per_attempt_and_every_effect_commits_once() {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    let mut handler = BatchRecorder::new(&table);
    handler.fail_runs.insert(6, 1);
    let (runs, stats) = consume_own_keys(&test, handler).await;
    assert_each_effect_once(&test, &table, &runs).await;
    let runs_of = |n: i64| -> Vec<u32> {
        runs.iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, a)| *a)
            .collect()
    };
    assert_eq!(
        runs_of(6),
        [1, 2],
        "the failing handler ran once per attempt: {runs:?}"
    );
    // The others committed together in one transaction, message 6 in a later one.
    assert_eq!(transactions_without(&test, &table, "order:6").await, 1);
    assert_eq!(counts(&stats), (12, 0, 1, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_a_handler_that_returns_ok_on_a_failed_transaction_is_a_failed_run_and_loses_no_other_effect()
 {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    let mut handler = BatchRecorder::new(&table);
    // The last of the batch: no later handler's statement finds the failed
    // transaction, the check before the commit must.
    handler.swallow_runs.insert(12, 1);
    let (runs, stats) = consume_own_keys(&test, handler).await;
    assert_each_effect_once(&test, &table, &runs).await;
    assert_eq!(counts(&stats), (12, 0, 1, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_copies_of_a_message_in_one_batch_have_one_effect() {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    let queue = TestQueue::new().await;
    let (x, y, z) = (
        outgoing(1, "order:x"),
        outgoing(2, "order:y"),
        outgoing(3, "order:z"),
    );
    queue
        .publish(&[x.clone(), y.clone(), x.clone(), z, x, y])
        .await;

    let handler = BatchRecorder::new(&table);
    let runs = handler.runs.clone();
    let (stop, run) = queue.consume(&test, batch_config(6), handler, None).await;
    wait_for_effects(&test, &table, 3).await;
    let _ = stop.send(());
    let stats = run.await.unwrap().unwrap();
    let mut effects = effect_ns(&test, &table, None).await;
    effects.sort_unstable();
    assert_eq!(effects, [1, 2, 3]);
    assert_eq!(runs.lock().unwrap().len(), 3, "one handler run per message");
    assert_eq!((stats.handled, stats.duplicates), (3, 3), "{stats:?}");
    assert_eq!(
        transactions_without(&test, &table, "").await,
        1,
        "one batch"
    );
    outbox_tests::wait_until("the queue is empty", DEADLINE, async || {
        queue.ready().await == 0
    })
    .await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_a_consumer_lost_after_its_commit_but_before_its_acks_has_its_redeliveries_skipped_by_the_inbox()
 {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    let queue = TestQueue::new().await;
    let first: Vec<Outgoing> = (1..=10)
        .map(|n| outgoing(n, &format!("order:{n}")))
        .collect();
    queue.publish(&first).await;

    // The channel closes while the batch runs: the transaction commits, the acks cannot
    // be sent, and RabbitMQ requeues all ten deliveries.
    let channel = queue.connection.create_channel().await.unwrap();
    let mut handler = BatchRecorder::new(&table);
    handler.lose_channel_at = Some((10, channel.clone()));
    let (_stop, run) = queue
        .consume(&test, batch_config(10), handler, Some(channel))
        .await;
    wait_for_effects(&test, &table, 10).await;
    // The run ends by itself when its channel is gone (with or without an error).
    let _ = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the lost consumer's run ends");

    // Its successor receives the ten again, then a new message.
    queue.publish(&[outgoing(11, "order:11")]).await;
    let handler = BatchRecorder::new(&table);
    let runs = handler.runs.clone();
    let (stop, run) = queue.consume(&test, batch_config(11), handler, None).await;
    wait_for_effects(&test, &table, 11).await;
    let _ = stop.send(());
    let stats = run.await.unwrap().unwrap();
    assert_eq!(
        effect_ns(&test, &table, None).await.len(),
        11,
        "no effect twice"
    );
    assert_eq!(*runs.lock().unwrap(), [(11, 1)], "only the new message ran");
    assert_eq!((stats.handled, stats.duplicates), (1, 10), "{stats:?}");
    outbox_tests::wait_until("the queue is empty", DEADLINE, async || {
        queue.ready().await == 0
    })
    .await;
    queue.delete().await;
}

/// Produce `messages` in order to `topic` (the relay's headers, key = partition key).
async fn produce(topic: &str, messages: &[Outgoing]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for (n, key, id) in messages {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: wire::EVENT_ID,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: wire::PARTITION_KEY,
                value: Some(key.as_bytes()),
            });
        let body = payload(*n);
        producer
            .send(
                FutureRecord::to(topic)
                    .key(key.as_bytes())
                    .payload(&body)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}

/// Consume `topic` as `group` with `handler` until its table holds `effects` rows,
/// then stop; the consumer's stats.
async fn consume_topic_until(
    test: &TestSchema,
    topic: &str,
    group: &str,
    dead_letter_topic: &str,
    config: ConsumerConfig,
    handler: BatchRecorder,
    effects: usize,
) -> ConsumerStats {
    let table = handler.table.clone();
    let (stop, run) = consume_topic(test, topic, group, dead_letter_topic, config, handler);
    wait_for_effects(test, &table, effects).await;
    let _ = stop.send(());
    run.await.unwrap().unwrap()
}

/// Run a Kafka consumer of `topic` in `group` until the returned sender fires.
fn consume_topic(
    test: &TestSchema,
    topic: &str,
    group: &str,
    dead_letter_topic: &str,
    config: ConsumerConfig,
    handler: BatchRecorder,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<ConsumerStats, outbox_core::Error>>,
) {
    let settings = KafkaSettings::new(brokers(), group, [topic.to_owned()], dead_letter_topic);
    let consumer = KafkaConsumer::connect(
        test.pool.clone(),
        Inbox::new(test.schema.clone()),
        config,
        settings,
        handler,
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        consumer
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, run)
}

/// The offset `group` committed on partition 0 of `topic`.
fn committed_offset(topic: &str, group: &str) -> rdkafka::Offset {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    partitions.add_partition(topic, 0);
    let committed = reader
        .committed_offsets(partitions, Duration::from_secs(10))
        .unwrap();
    committed.elements()[0].offset()
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_a_failing_handler_rolls_back_only_its_message_the_rest_of_the_batch_commits_once_and_its_key_waits()
 {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    let topic = create_topic(1).await;
    let dead_letter_topic = create_topic(1).await;
    produce(&topic, &batch_with_a_flaky_first_message()).await;

    let mut handler = BatchRecorder::new(&table);
    handler.fail_runs.insert(1, 2);
    let runs = handler.runs.clone();
    let group = format!("test-group-{}", uuid::Uuid::new_v4().simple());
    let stats = consume_topic_until(
        &test,
        &topic,
        &group,
        &dead_letter_topic,
        batch_config(12),
        handler,
        12,
    )
    .await;
    let runs = runs.lock().unwrap().clone();
    assert_flaky_batch(&test, &table, &runs, stats).await;
    // Every offset is committed once it and all before it are done.
    assert_eq!(
        committed_offset(&topic, &group),
        rdkafka::Offset::Offset(12)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_messages_read_again_after_their_offsets_were_lost_are_skipped_by_the_inbox() {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    let topic = create_topic(1).await;
    let dead_letter_topic = create_topic(1).await;
    let first: Vec<Outgoing> = (1..=10)
        .map(|n| outgoing(n, &format!("order:{n}")))
        .collect();
    produce(&topic, &first).await;

    let group = format!("test-group-{}", uuid::Uuid::new_v4().simple());
    let handler = BatchRecorder::new(&table);
    let _ = consume_topic_until(
        &test,
        &topic,
        &group,
        &dead_letter_topic,
        batch_config(10),
        handler,
        10,
    )
    .await;

    // A consumer whose group has no committed offset (as after a crash between the
    // inbox commit and the offset commit) reads the ten again, then a new message.
    produce(&topic, &[outgoing(11, "order:11")]).await;
    let handler = BatchRecorder::new(&table);
    let runs = handler.runs.clone();
    let lost = format!("test-group-{}", uuid::Uuid::new_v4().simple());
    let stats = consume_topic_until(
        &test,
        &topic,
        &lost,
        &dead_letter_topic,
        batch_config(11),
        handler,
        11,
    )
    .await;
    assert_eq!(
        effect_ns(&test, &table, None).await.len(),
        11,
        "no effect twice"
    );
    assert_eq!(*runs.lock().unwrap(), [(11, 1)], "only the new message ran");
    assert_eq!((stats.handled, stats.duplicates), (1, 10), "{stats:?}");
    assert_eq!(committed_offset(&topic, &lost), rdkafka::Offset::Offset(11));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_inbox_database_is_retried_without_limit_and_never_dead_letters() {
    let test = TestSchema::new().await;
    let table = batch_effects_table(&test).await;
    // Every insert into the inbox fails (and counts itself, outside the transaction).
    let (inbox, attempts) = (test.table("inbox"), test.table("inbox_attempts"));
    let trigger = test.table("inbox_down");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create sequence {attempts}; \
         create function {trigger}() returns trigger language plpgsql as \
         $$ begin perform nextval('{attempts}'); raise exception 'the inbox is down (test)'; end $$; \
         create trigger inbox_down before insert on {inbox} for each statement execute function {trigger}()"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    let queue = TestQueue::new().await;
    let messages: Vec<Outgoing> = (1..=5)
        .map(|n| outgoing(n, &format!("order:{n}")))
        .collect();
    queue.publish(&messages).await;

    // One handler failure would dead-letter at once; database failures must not count.
    let mut config = batch_config(5);
    config.retry.max_attempts = 1;
    config.database_retry = Duration::from_millis(20);
    let (stop, run) = queue
        .consume(&test, config, BatchRecorder::new(&table), None)
        .await;
    let attempts_sql = format!("select last_value from {attempts}");
    outbox_tests::wait_until("the batch was tried ten times", DEADLINE, async || {
        let tried: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(attempts_sql.as_str()))
            .fetch_one(&test.pool)
            .await
            .unwrap();
        tried >= 10
    })
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop trigger inbox_down on {inbox}"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    wait_for_effects(&test, &table, 5).await;
    let _ = stop.send(());
    let stats = run.await.unwrap().unwrap();
    assert_eq!(
        (stats.handled, stats.dead_lettered, stats.retries),
        (5, 0, 0),
        "{stats:?}"
    );
    outbox_tests::wait_until("the queue is empty", DEADLINE, async || {
        queue.ready().await == 0
    })
    .await;
    queue.delete().await;
}
