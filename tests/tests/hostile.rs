//! Hostile input never stops the relay (G4): rows written by other writers with
//! values no event could have (infinite timestamps, huge or odd headers, names
//! too long for the protocol) are dead-lettered, with the reason and their raw
//! values, at the first attempt when no retry could help, while every other key
//! keeps flowing; `status` and the dead-letter listing never fail because of them.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::admin::{self, DeadLetterFilter};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::relay::{RunningRelay, raw_config, wait_for_empty_outbox};
use outbox_tests::wait_until;
use sqlx::AssertSqlSafe;

const DEADLINE: Duration = Duration::from_secs(60);

use outbox_tests::init_tracing;

/// A row as a writer in another language could insert it; returns its event id.
async fn insert_raw_row(
    test: &TestSchema,
    aggregate_id: &str,
    event_type: &str,
    created_at: &str,
    headers: serde_json::Value,
) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    sqlx::query(AssertSqlSafe(format!(
        "insert into {} (event_id, aggregate_type, aggregate_id, event_type, partition_key, payload, \
                         headers, created_at) \
         values ($1, 'doc', $2, $3, 'doc:' || $2, '{{\"raw\": true}}'::jsonb, $4, $5::text::timestamptz)",
        test.table("outbox")
    )))
    .bind(id)
    .bind(aggregate_id)
    .bind(event_type)
    .bind(headers)
    .bind(created_at)
    .execute(&test.pool)
    .await
    .unwrap();
    id
}

/// `count` ordinary events on keys `other:0..count`, routed with `ok.flow`.
async fn enqueue_ordinary(test: &TestSchema, count: usize) -> Vec<Event> {
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let events: Vec<Event> = (0..count)
        .map(|i| {
            Event::builder("other", i.to_string(), "ok.flow")
                .build()
                .unwrap()
        })
        .collect();
    outbox
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();
    events
}

/// `(attempts, last_error, created_at as text)` of a dead-lettered event.
async fn dead_letter_row(test: &TestSchema, id: uuid::Uuid) -> Option<(i32, String, String)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "select attempts, last_error, created_at::text from {} where event_id = $1",
        test.table("outbox_dead_letter")
    )))
    .bind(id)
    .fetch_optional(&test.pool)
    .await
    .unwrap()
}

async fn dead_lettered(test: &TestSchema) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "select count(*) from {}",
        test.table("outbox_dead_letter")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn status_and_dead_letter_listing_never_fail_because_of_infinite_timestamps() {
    init_tracing();
    let test = TestSchema::new().await;
    insert_raw_row(&test, "1", "ok.x", "-infinity", serde_json::json!({})).await;
    insert_raw_row(&test, "2", "ok.x", "infinity", serde_json::json!({})).await;
    let status = admin::status(&test.pool, &test.schema).await.unwrap();
    assert_eq!(status.pending, 2);
    assert_eq!(
        status.oldest_pending_secs, None,
        "infinite times have no age"
    );

    // A dead letter and a blocked row whose failure times are infinite.
    sqlx::query(AssertSqlSafe(format!(
        "insert into {} (sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, \
                         payload, headers, created_at, attempts, last_error, first_failed_at, last_failed_at) \
         values (1, $1, 'doc', '3', 'x', 'doc:3', '{{}}', '{{}}', 'infinity', 1, 'e', '-infinity', 'infinity')",
        test.table("outbox_dead_letter")
    )))
    .bind(uuid::Uuid::now_v7())
    .execute(&test.pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "update {} set available_at = 'infinity', attempts = 1, first_failed_at = '-infinity', \
                last_failed_at = 'infinity' where aggregate_id = '1'",
        test.table("outbox")
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    let listed =
        admin::list_dead_letters(&test.pool, &test.schema, &DeadLetterFilter::default(), 10)
            .await
            .unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|d| d.last_failed_at.is_none()));
    let status = admin::status(&test.pool, &test.schema).await.unwrap();
    assert_eq!((status.blocked, status.dead_lettered), (1, 1));
}

#[tokio::test]
async fn rows_with_infinite_created_at_are_dead_lettered_raw_at_once_while_every_other_event_flows()
{
    init_tracing();
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let infinite = insert_raw_row(&test, "1", "ok.bad", "infinity", serde_json::json!({})).await;
    let minus = insert_raw_row(&test, "2", "ok.bad", "-infinity", serde_json::json!({})).await;
    // The same keys continue after the undecodable rows.
    let after = insert_raw_row(
        &test,
        "1",
        "ok.after",
        "2026-01-01 00:00:00+00",
        serde_json::json!({}),
    )
    .await;
    let ordinary = enqueue_ordinary(&test, 50).await;

    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(5);
    // Long backoffs: a retried (not at-once) dead-lettering would miss the deadline below.
    raw.pipeline.retry_backoff_initial_ms = Some(10_000);
    raw.pipeline.retry_backoff_max_ms = Some(10_000);
    let relay = RunningRelay::start(raw.validate().unwrap());
    rabbit
        .wait_for_distinct(ordinary.len() + 1, Duration::from_secs(20))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(20)).await;
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 2);

    let ids: Vec<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    assert!(ids.contains(&after.to_string()), "the key continued");
    assert!(!ids.contains(&infinite.to_string()) && !ids.contains(&minus.to_string()));
    for (id, raw_value) in [(infinite, "infinity"), (minus, "-infinity")] {
        let (attempts, error, created_at) = dead_letter_row(&test, id).await.unwrap();
        assert_eq!(attempts, 1, "dead-lettered at the first attempt");
        assert_eq!(created_at, raw_value, "the raw value is kept");
        assert!(
            error.contains(&format!("created_at is '{raw_value}'")) && error.contains("retry"),
            "{error}"
        );
    }
    let status = admin::status(&test.pool, &test.schema).await.unwrap();
    assert_eq!(status.dead_lettered, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_table_drain_dead_letters_rows_with_infinite_created_at_and_relays_the_rest() {
    let db = outbox_tests::wal::WalDatabase::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    // Written before the slot exists: only the table drain reads them.
    let infinite = insert_raw_row(&db.test, "1", "ok.bad", "infinity", serde_json::json!({})).await;
    let minus = insert_raw_row(&db.test, "2", "ok.bad", "-infinity", serde_json::json!({})).await;
    let ordinary = enqueue_ordinary(&db.test, 30).await;
    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    rabbit.wait_for_distinct(ordinary.len(), DEADLINE).await;
    wait_until("both rows are dead-lettered", DEADLINE, async || {
        dead_lettered(&db.test).await == 2
    })
    .await;
    wait_for_empty_outbox(&db.test, DEADLINE).await;
    relay.stop().await;
    for (id, raw_value) in [(infinite, "infinity"), (minus, "-infinity")] {
        let (_, error, created_at) = dead_letter_row(&db.test, id).await.unwrap();
        assert_eq!(created_at, raw_value);
        assert!(error.contains("created_at"), "{error}");
    }
    db.cleanup().await;
}

/// Waits for `ordinary` plus `extra` distinct messages, then checks `poison` was
/// dead-lettered at its first attempt with an error containing `expected`.
async fn assert_dead_lettered_at_once(
    test: &TestSchema,
    rabbit: &RabbitFixture,
    poison: &[(uuid::Uuid, &str)],
    delivered: usize,
    deadline: Duration,
) {
    rabbit.wait_for_distinct(delivered, deadline).await;
    wait_for_empty_outbox(test, deadline).await;
    let ids: Vec<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    for (id, expected) in poison {
        assert!(!ids.contains(&id.to_string()), "{id} was not published");
        let (attempts, error, _) = dead_letter_row(test, *id).await.unwrap();
        assert_eq!(
            attempts, 1,
            "{id} dead-lettered at the first attempt: {error}"
        );
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }
}

/// A relay whose retries of a rejected event would take 10 s each.
fn slow_retry_config(test: &TestSchema, rabbit: &RabbitFixture) -> outbox_relay::RelayConfig {
    let mut raw = raw_config(test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(5);
    raw.pipeline.retry_backoff_initial_ms = Some(10_000);
    raw.pipeline.retry_backoff_max_ms = Some(10_000);
    raw.validate().unwrap()
}

#[tokio::test]
async fn an_event_with_headers_over_the_rabbitmq_frame_size_is_dead_lettered_at_once_and_never_stops_other_keys()
 {
    init_tracing();
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let huge = "h".repeat(200 * 1024);
    let poison = insert_raw_row(
        &test,
        "1",
        "ok.huge",
        "2026-01-01 00:00:00+00",
        serde_json::json!({ "big": huge }),
    )
    .await;
    let after = insert_raw_row(
        &test,
        "1",
        "ok.after",
        "2026-01-01 00:00:00+00",
        serde_json::json!({}),
    )
    .await;
    let ordinary = enqueue_ordinary(&test, 50).await;
    let relay = RunningRelay::start(slow_retry_config(&test, &rabbit));
    assert_dead_lettered_at_once(
        &test,
        &rabbit,
        &[(poison, "frame")],
        ordinary.len() + 1,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        rabbit
            .received()
            .iter()
            .any(|m| m.message_id == after.to_string()),
        "the key continued"
    );
    relay.stop().await;
}

#[tokio::test]
async fn rejections_no_retry_can_cure_are_dead_lettered_at_the_first_attempt_and_free_their_key_at_once()
 {
    init_tracing();
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let at = "2026-01-01 00:00:00+00";
    // Routing key = event type: 300 bytes is over AMQP's 255.
    let long_key = insert_raw_row(
        &test,
        "1",
        &format!("ok.{}", "k".repeat(300)),
        at,
        serde_json::json!({}),
    )
    .await;
    let after_key = insert_raw_row(&test, "1", "ok.after", at, serde_json::json!({})).await;
    // A header name over 255 bytes cannot be an AMQP field-table key.
    let long_name = insert_raw_row(
        &test,
        "2",
        "ok.x",
        at,
        serde_json::json!({ "n".repeat(300): "v" }),
    )
    .await;
    let after_name = insert_raw_row(&test, "2", "ok.after", at, serde_json::json!({})).await;
    let ordinary = enqueue_ordinary(&test, 20).await;
    let relay = RunningRelay::start(slow_retry_config(&test, &rabbit));
    assert_dead_lettered_at_once(
        &test,
        &rabbit,
        &[(long_key, "routing key"), (long_name, "header name")],
        ordinary.len() + 2,
        Duration::from_secs(15),
    )
    .await;
    let ids: Vec<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    assert!(ids.contains(&after_key.to_string()) && ids.contains(&after_name.to_string()));
    relay.stop().await;
}

#[tokio::test]
async fn payloads_over_rabbitmq_max_message_bytes_are_dead_lettered_at_the_first_attempt() {
    init_tracing();
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let big = Event::builder("doc", "1", "ok.big")
        .payload(&serde_json::json!({ "blob": "b".repeat(5_000) }))
        .build()
        .unwrap();
    let after = Event::builder("doc", "1", "ok.after").build().unwrap();
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
    .enqueue_all(
        &mut test.pool.acquire().await.unwrap(),
        &[big.clone(), after.clone()],
    )
    .await
    .unwrap();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(5);
    raw.pipeline.retry_backoff_initial_ms = Some(10_000);
    raw.pipeline.retry_backoff_max_ms = Some(10_000);
    if let Some(rabbitmq) = raw.rabbitmq.as_mut() {
        rabbitmq.max_message_bytes = Some(1_000);
    }
    let relay = RunningRelay::start(raw.validate().unwrap());
    assert_dead_lettered_at_once(
        &test,
        &rabbit,
        &[(*big.id().as_uuid(), "max_message_bytes")],
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(rabbit.received()[0].message_id, after.id().to_string());
    relay.stop().await;
}

/// A queue that refuses every message (max length 0, reject-publish), bound to
/// `exchange` for `binding`: RabbitMQ nacks what is routed to it.
async fn bind_refusing_queue(exchange: &str, binding: &str) -> lapin::Connection {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let connection = lapin::Connection::connect(
        &outbox_tests::amqp::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("test-q-full-{}", uuid::Uuid::new_v4().simple());
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let options = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), options, arguments)
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    connection
}

#[tokio::test]
async fn after_an_outage_an_event_the_broker_keeps_refusing_cannot_keep_the_breaker_open_for_other_keys()
 {
    init_tracing();
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let _refusing = bind_refusing_queue(&rabbit.exchange, "full.#").await;
    let amqp = outbox_tests::amqp::amqp_url();
    let host_port = amqp
        .split_once('@')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let upstream = tokio::net::lookup_host(host_port.as_str())
        .await
        .unwrap()
        .find(std::net::SocketAddr::is_ipv4)
        .unwrap();
    let proxy = outbox_tests::fault_proxy::FaultProxy::start(upstream)
        .await
        .unwrap();
    let mut raw = raw_config(&test, &rabbit.exchange);
    if let Some(rabbitmq) = raw.rabbitmq.as_mut() {
        rabbitmq.url = Some(amqp.replacen(&host_port, &proxy.addr().to_string(), 1));
        rabbitmq.publish_timeout_ms = Some(1_000);
        rabbitmq.connect_timeout_ms = Some(1_000);
    }
    raw.pipeline.breaker_failure_threshold = Some(1);
    let relay = RunningRelay::start(raw.validate().unwrap());
    enqueue_ordinary(&test, 1).await;
    rabbit.wait_for_distinct(1, DEADLINE).await;

    // The broker goes away; meanwhile the oldest event is one it will nack forever.
    proxy.cut();
    let accepted = proxy.total_accepted();
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let refused = Event::builder("full", "1", "full.always").build().unwrap();
    let others: Vec<Event> = (0..20)
        .map(|i| {
            Event::builder("late", i.to_string(), "ok.late")
                .build()
                .unwrap()
        })
        .collect();
    let mut conn = test.pool.acquire().await.unwrap();
    outbox.enqueue(&mut conn, &refused).await.unwrap();
    outbox.enqueue_all(&mut conn, &others).await.unwrap();
    wait_until("the relay tries to reconnect", DEADLINE, async || {
        proxy.total_accepted() >= accepted + 2
    })
    .await;
    proxy.restore();
    rabbit.wait_for_distinct(1 + others.len(), DEADLINE).await;
    relay.stop().await;
}

/// One generated hostile row, as a writer in another language could insert it.
struct HostileRow {
    aggregate_id: String,
    event_type: String,
    partition_key: String,
    destination: Option<String>,
    payload: String,
    headers: serde_json::Value,
    created_at: String,
    attempts: i32,
}

fn pick<'a, T>(rng: &mut rand::rngs::StdRng, items: &'a [T]) -> &'a T {
    use rand::Rng;
    &items[rng.random_range(0..items.len())]
}

/// A row with one or more hostile values, drawn from `rng`.
fn hostile_row(rng: &mut rand::rngs::StdRng, n: usize) -> HostileRow {
    use rand::Rng;
    let created_at = pick(
        rng,
        &[
            "infinity",
            "-infinity",
            "4713-01-01 00:00:00+00 BC",
            "262143-06-01 00:00:00+00",
            "294276-12-31 00:00:00+00",
            "1970-01-01 00:00:00+00",
            "2026-06-01 12:00:00.123456+00",
        ],
    )
    .to_string();
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let payload = pick(
        rng,
        &[
            "null".to_owned(),
            "\"just a string\"".to_owned(),
            "{\"emoji\": \"🦀 ünïcödé \\u2028 \\ud83d\\ude00\"}".to_owned(),
            deep,
            format!("{{\"blob\": \"{}\"}}", "x".repeat(300_000)),
            "[]".to_owned(),
        ],
    )
    .clone();
    let headers = match rng.random_range(0..8) {
        0 => serde_json::json!({ "big": "h".repeat(200 * 1024) }),
        1 => serde_json::json!({ "n".repeat(300): "long name" }),
        2 => serde_json::json!({ "ünï-cödé 🦀": "odd name", "": "empty name" }),
        3 => serde_json::json!({ "num": 7, "obj": {"a": [1, null]}, "nothing": null, "t": true }),
        4 => serde_json::json!({ "outbox-event-id": "forged", "OUTBOX-sequence": "-1" }),
        // Many small headers, about 100 KiB on the wire.
        5 => serde_json::Value::Object(
            (0..2_000)
                .map(|i| (format!("h{i}"), serde_json::Value::String("v".repeat(40))))
                .collect(),
        ),
        _ => serde_json::json!({}),
    };
    let event_type = pick(
        rng,
        &[
            "hostile.ok".to_owned(),
            format!("hostile.{}", "k".repeat(300)),
            "hostile.ünïcödé.🦀".to_owned(),
        ],
    )
    .clone();
    let destination = pick(
        rng,
        &[
            None,
            None,
            Some("test-no-such-exchange-hostile".to_owned()),
            Some("d".repeat(300)),
        ],
    )
    .clone();
    let aggregate_id = pick(
        rng,
        &[
            format!("{n}"),
            format!("🦀-{n}"),
            format!("{n}-{}", "i".repeat(5_000)),
        ],
    )
    .clone();
    // Hostile rows share a few keys among themselves, never with ordinary keys.
    let partition_key = match rng.random_range(0..3) {
        0 => format!("hostile:{}", rng.random_range(0..5)),
        1 => format!("hostile:{}", "p".repeat(10_000)),
        _ => format!("hostile:own:{n}"),
    };
    let attempts = *pick(rng, &[0, 0, 0, -5, i32::MAX]);
    HostileRow {
        aggregate_id,
        event_type,
        partition_key,
        destination,
        payload,
        headers,
        created_at,
        attempts,
    }
}

async fn insert_hostile(test: &TestSchema, row: &HostileRow) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    sqlx::query(AssertSqlSafe(format!(
        "insert into {} (event_id, aggregate_type, aggregate_id, event_type, partition_key, destination, \
                         payload, headers, created_at, attempts) \
         values ($1, 'hostile', $2, $3, $4, $5, $6::text::jsonb, $7, $8::text::timestamptz, $9)",
        test.table("outbox")
    )))
    .bind(id)
    .bind(&row.aggregate_id)
    .bind(&row.event_type)
    .bind(&row.partition_key)
    .bind(&row.destination)
    .bind(&row.payload)
    .bind(&row.headers)
    .bind(&row.created_at)
    .bind(row.attempts)
    .execute(&test.pool)
    .await
    .unwrap();
    id
}

/// Seeded, so a failure can be replayed: `OUTBOX_TEST_HOSTILE_SEED` overrides it
/// (`scripts/test-heavy` runs the property tests with a random seed and prints it).
const HOSTILE_SEED: u64 = 0x5EED_0011;

fn hostile_seed() -> u64 {
    std::env::var("OUTBOX_TEST_HOSTILE_SEED")
        .ok()
        .and_then(|seed| {
            let seed = seed.trim();
            match seed.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => seed.parse().ok(),
            }
        })
        .unwrap_or(HOSTILE_SEED)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    Polling,
    Wal,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sink {
    RabbitMq,
    Kafka,
}

/// Generated hostile rows (raw SQL) beside 200 ordinary events, through `source` to
/// `sink`: ordinary keys arrive at once, every hostile row ends delivered or
/// dead-lettered, the relay never stops, the listing and the status cope.
async fn hostile_rows_are_delivered_or_dead_lettered(source: Source, sink: Sink) {
    use rand::SeedableRng;
    init_tracing();
    let seed = hostile_seed();
    println!("hostile rows, {source:?} -> {sink:?}, seed {seed:#x}");
    let wal = match source {
        Source::Wal => Some(outbox_tests::wal::WalDatabase::new().await),
        Source::Polling => None,
    };
    let owned_test;
    let test = match &wal {
        Some(db) => &db.test,
        None => {
            owned_test = TestSchema::new().await;
            &owned_test
        }
    };
    let rabbit = RabbitFixture::with_binding("#").await;
    let mut raw = match &wal {
        Some(db) => db.raw_config(&rabbit.exchange),
        None => raw_config(test, &rabbit.exchange),
    };
    raw.pipeline.max_attempts = Some(2);
    let kafka = match sink {
        Sink::RabbitMq => None,
        Sink::Kafka => {
            let topic = outbox_tests::kafka::create_topic(3).await;
            raw.sink = Some("kafka".into());
            raw.rabbitmq = None;
            raw.kafka = Some(outbox_relay::config::RawKafka {
                brokers: Some(outbox_tests::kafka::brokers()),
                topic: Some(topic.clone()),
                message_timeout_ms: Some(1_500),
                ..Default::default()
            });
            // A lease must outlast a delivery: message timeout plus 10 s.
            raw.polling.lease_ms = Some(12_000);
            Some(outbox_tests::kafka::TopicConsumer::start(&topic, 3))
        }
    };
    let received_ids = || -> std::collections::HashSet<String> {
        match &kafka {
            Some(consumer) => outbox_tests::daemon::seen_on_kafka(&consumer.received()),
            None => outbox_tests::daemon::seen_on_rabbitmq(&rabbit.received()),
        }
        .into_iter()
        .map(|m| m.event_id)
        .collect()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut hostile = Vec::new();
    let relay = if source == Source::Wal {
        // Rows written while the relay streams: the stream's decoding, not the drain's.
        let relay = RunningRelay::start(raw.validate().unwrap());
        let db = wal.as_ref().unwrap();
        wait_until("the WAL relay streams", DEADLINE, async || {
            db.walsender_streams().await
        })
        .await;
        for n in 0..60 {
            hostile.push(insert_hostile(test, &hostile_row(&mut rng, n)).await);
        }
        relay
    } else {
        for n in 0..60 {
            hostile.push(insert_hostile(test, &hostile_row(&mut rng, n)).await);
        }
        RunningRelay::start(raw.validate().unwrap())
    };
    let ordinary = enqueue_ordinary(test, 200).await;

    // Ordinary keys are never held back by the hostile rows.
    let ordinary_ids: std::collections::HashSet<String> =
        ordinary.iter().map(|e| e.id().to_string()).collect();
    wait_until(
        "every ordinary event arrives",
        Duration::from_secs(30),
        async || ordinary_ids.is_subset(&received_ids()),
    )
    .await;
    // Every hostile row ends delivered or dead-lettered; the relay never stops.
    wait_for_empty_outbox(test, DEADLINE).await;
    let summary = relay.stop().await;
    let received = received_ids();
    let mut dead = 0;
    for id in &hostile {
        let delivered = received.contains(&id.to_string());
        let dead_lettered = dead_letter_row(test, *id).await.is_some();
        assert!(
            delivered != dead_lettered,
            "{id}: delivered {delivered}, dead-lettered {dead_lettered} (seed {seed:#x})"
        );
        dead += usize::from(dead_lettered);
    }
    assert_eq!(summary.dead_lettered as usize, dead, "seed {seed:#x}");
    if seed == HOSTILE_SEED {
        assert!(
            dead > 0 && dead < hostile.len(),
            "the seed exercises both outcomes ({dead} dead)"
        );
    }
    // The listing and the status cope with all of it.
    let listed = admin::list_dead_letters(
        &test.pool,
        &test.schema,
        &DeadLetterFilter::default(),
        1_000,
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), dead, "seed {seed:#x}");
    admin::status(&test.pool, &test.schema).await.unwrap();
    println!(
        "hostile rows, {source:?} -> {sink:?}: {} of {} dead-lettered, the rest delivered",
        dead,
        hostile.len()
    );
    if let Some(db) = wal {
        db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_rows_are_each_delivered_or_dead_lettered_and_never_hold_back_ordinary_keys()
 {
    hostile_rows_are_delivered_or_dead_lettered(Source::Polling, Sink::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_rows_streamed_by_the_wal_source_are_each_delivered_or_dead_lettered() {
    hostile_rows_are_delivered_or_dead_lettered(Source::Wal, Sink::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_rows_to_kafka_are_each_delivered_or_dead_lettered() {
    hostile_rows_are_delivered_or_dead_lettered(Source::Polling, Sink::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_rows_streamed_to_kafka_are_each_delivered_or_dead_lettered() {
    hostile_rows_are_delivered_or_dead_lettered(Source::Wal, Sink::Kafka).await;
}

#[tokio::test]
async fn with_poison_policy_block_an_undecodable_row_is_parked_at_once_and_holds_only_its_key() {
    init_tracing();
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let at = "2026-01-01 00:00:00+00";
    let bad = insert_raw_row(&test, "1", "ok.bad", "infinity", serde_json::json!({})).await;
    let held = insert_raw_row(&test, "1", "ok.after", at, serde_json::json!({})).await;
    let ordinary = enqueue_ordinary(&test, 20).await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.pipeline.poison_policy = Some("block".into());
    raw.pipeline.max_attempts = Some(5);
    raw.pipeline.retry_backoff_initial_ms = Some(10_000);
    raw.pipeline.retry_backoff_max_ms = Some(10_000);
    let relay = RunningRelay::start(raw.validate().unwrap());
    rabbit
        .wait_for_distinct(ordinary.len(), Duration::from_secs(15))
        .await;
    wait_until("the row is parked", Duration::from_secs(15), async || {
        admin::status(&test.pool, &test.schema)
            .await
            .unwrap()
            .blocked
            == 1
    })
    .await;
    let listed =
        admin::list_dead_letters(&test.pool, &test.schema, &DeadLetterFilter::default(), 10)
            .await
            .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].event_id, listed[0].attempts), (bad, 1));
    assert!(
        listed[0].last_error.contains("created_at"),
        "{}",
        listed[0].last_error
    );
    let summary = relay.stop().await;
    assert_eq!(summary.blocked, 1);
    let ids: Vec<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    assert!(
        !ids.contains(&held.to_string()),
        "its key waits for the operator"
    );
}
