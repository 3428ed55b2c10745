//! The polling relay publishing to Apache Kafka: G1-G4 with Kafka's semantics,
//! read back with a Kafka consumer. Per-key order is per-partition order, and keys
//! land on the partitions a Java client would choose.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::HashSet;
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::config::{RawConfig, RawKafka};
use outbox_tests::TestSchema;
use outbox_tests::kafka::{
    PrivateBroker, Received, TopicConsumer, assert_first_deliveries_are, brokers as kafka_brokers,
    create_topic_on, distinct, hot_key_events, java_partition, order_violations, wait_distinct,
};
use outbox_tests::relay::{RunningRelay, raw_config, wait_for_empty_outbox};

fn kafka_config(test: &TestSchema, brokers: &str, topic: &str) -> RawConfig {
    let mut raw = raw_config(test, "unused");
    raw.sink = Some("kafka".into());
    raw.rabbitmq = None;
    raw.polling.lease_ms = Some(15_000);
    raw.kafka = Some(RawKafka {
        brokers: Some(brokers.to_owned()),
        topic: Some(topic.to_owned()),
        message_timeout_ms: Some(3_000),
        ..Default::default()
    });
    raw
}

#[tokio::test]
async fn concurrent_writers_events_arrive_complete_in_commit_order_on_java_partitions() {
    const WRITERS: usize = 8;
    const EVENTS: usize = 20_000;
    const KEYS: usize = 200;
    const PARTITIONS: i32 = 6;
    let brokers = kafka_brokers();
    let test = TestSchema::new().await;
    let topic = create_topic_on(&brokers, PARTITIONS).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, PARTITIONS);
    let counters = outbox_tests::load::create_counters(&test, KEYS).await;
    let relay = RunningRelay::start(kafka_config(&test, &brokers, &topic).validate().unwrap());
    outbox_tests::load::run_counter_writers(&test, &counters, WRITERS, EVENTS, KEYS).await;
    let received = wait_distinct(&consumer, EVENTS, Duration::from_secs(180)).await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    relay.stop().await;

    assert_eq!(order_violations(&received), 0);
    for m in &received {
        assert_eq!(
            m.partition,
            java_partition(m.key.as_deref().unwrap(), PARTITIONS),
            "key {}",
            m.key_text()
        );
        assert_eq!(m.header("outbox-partition-key"), Some(m.key_text()));
    }
    let keys: HashSet<String> = received.iter().map(Received::key_text).collect();
    assert_eq!(keys.len(), KEYS);
}

#[tokio::test]
async fn oversized_event_is_dead_lettered_at_the_first_attempt_with_the_reason_while_others_flow() {
    let brokers = kafka_brokers();
    let test = TestSchema::new().await;
    let topic = create_topic_on(&brokers, 3).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, 3);
    let mut raw = kafka_config(&test, &brokers, &topic);
    raw.pipeline.max_attempts = Some(2);
    let relay = RunningRelay::start(raw.validate().unwrap());

    // The writer allows large payloads; the broker's limit (1 MB) is the relay's to enforce.
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        max_payload_bytes: 4 * 1024 * 1024,
        ..OutboxConfig::default()
    });
    let big = Event::builder("doc", "big", "doc.uploaded")
        .payload(&serde_json::json!({ "n": 1, "blob": "x".repeat(2 * 1024 * 1024) }))
        .build()
        .unwrap();
    let mut events = vec![big.clone()];
    events.extend((0..1_000).map(|i| {
        Event::builder("doc", (i % 50).to_string(), "doc.changed")
            .payload(&serde_json::json!({ "n": i }))
            .build()
            .unwrap()
    }));
    outbox
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();

    let received = wait_distinct(&consumer, 1_000, Duration::from_secs(60)).await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 1);
    assert!(
        received
            .iter()
            .all(|m| m.header("outbox-event-id") != Some(big.id().to_string()))
    );
    let (event_id, attempts, last_error): (uuid::Uuid, i32, String) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select event_id, attempts, last_error from {}",
            test.table("outbox_dead_letter")
        )))
        .fetch_one(&test.pool)
        .await
        .unwrap();
    assert_eq!(event_id, *big.id().as_uuid());
    assert!(last_error.contains("maximum message size"), "{last_error}");
    assert_eq!(
        attempts, 1,
        "too large can never succeed: dead-lettered at the first attempt"
    );
}

/// The broker process is stopped (SIGSTOP: it neither answers nor refuses) under
/// steady writes, then continued. `OUTBOX_TEST_KAFKA_OUTAGE_SECS` sets how long
/// (default 5 s; `scripts/test-heavy` runs 30 s).
#[tokio::test]
async fn broker_stopped_under_load_then_continued_loses_nothing_and_dead_letters_nothing() {
    let outage = Duration::from_secs(
        std::env::var("OUTBOX_TEST_KAFKA_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let broker = PrivateBroker::start().await;
    let test = TestSchema::new().await;
    let topic = create_topic_on(&broker.brokers, 3).await;
    let consumer = TopicConsumer::start_on(&broker.brokers, &topic, 3);
    let relay = RunningRelay::start(
        kafka_config(&test, &broker.brokers, &topic)
            .validate()
            .unwrap(),
    );
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let pool = test.pool.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = [0_i64; 20];
            let mut written = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = written % 20;
                n[key] += 1;
                let event = Event::builder("item", format!("k{key}"), "item.changed")
                    .payload(&serde_json::json!({ "n": n[key] }))
                    .build()
                    .unwrap();
                outbox
                    .enqueue(&mut pool.acquire().await.unwrap(), &event)
                    .await
                    .unwrap();
                written += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        })
    };
    wait_distinct(&consumer, 100, Duration::from_secs(60)).await;
    broker.pause();
    tokio::time::sleep(outage).await; // the scenario: the broker is stopped this long
    broker.resume();
    tokio::time::sleep(Duration::from_secs(1)).await; // keep writing a moment after it returns
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();

    wait_for_empty_outbox(&test, Duration::from_secs(120)).await;
    let received = wait_distinct(&consumer, written, Duration::from_secs(60)).await;
    let summary = relay.stop().await;
    println!(
        "kafka broker stopped {outage:?}: {written} events written, all delivered; {} transient failures",
        summary.transient_failures
    );
    assert_eq!(summary.dead_lettered, 0, "an outage never dead-letters");
    assert_eq!(order_violations(&received), 0);
}

#[tokio::test]
async fn relay_killed_mid_stream_and_restarted_loses_nothing() {
    const EVENTS: usize = 6_000;
    let brokers = kafka_brokers();
    let test = TestSchema::new().await;
    let topic = create_topic_on(&brokers, 3).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, 3);
    outbox_tests::load::enqueue_backlog(&test, EVENTS, 50).await;
    let mut raw = kafka_config(&test, &brokers, &topic);
    raw.polling.batch_size = Some(200);
    raw.polling.lease_ms = Some(14_000);

    let first = RunningRelay::start(raw.clone().validate().unwrap());
    wait_distinct(&consumer, 1_000, Duration::from_secs(60)).await;
    first.kill();
    assert!(
        distinct(&consumer.received()) < EVENTS,
        "the kill must happen mid-stream"
    );
    let second = RunningRelay::start(raw.validate().unwrap());
    let received = wait_distinct(&consumer, EVENTS, Duration::from_secs(120)).await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    second.stop().await;
    assert_eq!(order_violations(&received), 0);
    assert!(
        received.len() - distinct(&received) <= 200,
        "duplicates within the in-flight window"
    );
}

/// One key's backlog: its events are published with many in flight at once
/// (`kafka.max_in_flight_per_key`, default 64), and still arrive complete, each
/// first delivery in commit order; an oversized event in the middle of the key is
/// dead-lettered and nothing behind it is lost or goes ahead of what came before.
#[tokio::test]
async fn a_hot_keys_backlog_arrives_complete_and_in_order_with_many_events_in_flight() {
    let brokers = kafka_brokers();
    let test = TestSchema::new().await;
    let topic = create_topic_on(&brokers, 3).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, 3);
    let (events, big) = hot_key_events(3_000, 1_500);
    large_payload_outbox(&test)
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();

    let relay = RunningRelay::start(kafka_config(&test, &brokers, &topic).validate().unwrap());
    let received = wait_distinct(&consumer, events.len() - 1, Duration::from_secs(120)).await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;

    assert_eq!(summary.dead_lettered, 1, "the oversized event, once");
    assert_first_deliveries_are(&received, &events, big);
}

/// An outbox whose writer takes payloads up to 4 MiB (the broker's limit is the relay's to enforce).
fn large_payload_outbox(test: &TestSchema) -> Outbox {
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        max_payload_bytes: 4 * 1024 * 1024,
        ..OutboxConfig::default()
    })
}
