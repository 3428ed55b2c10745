//! The WAL-source relay publishing to Apache Kafka: G1 (a rolled-back event is
//! never published; committed ones arrive with their key and wire headers), G2/G3
//! under concurrent writers (everything arrives, per-key first deliveries keep
//! commit order, keys land on the Java client's partitions), and a relay killed
//! mid-stream and restarted (it resumes from the slot's confirmed position:
//! nothing lost, order kept).
//!
//! Every test owns a database (with its slot and publication, see
//! [`outbox_tests::wal::WalDatabase`]) and a topic on the shared Apache Kafka broker, and
//! starts writing only once the relay streams from its slot, so events come
//! through the replication stream, not the table drain of a new slot.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::config::{RawConfig, RawKafka};
use outbox_tests::kafka::{
    Received, TopicConsumer, assert_first_deliveries_are, brokers as kafka_brokers,
    create_topic_on, distinct, hot_key_events, java_partition, order_violations, wait_distinct,
};
use outbox_tests::relay::{RunningRelay, wait_for_empty_outbox};
use outbox_tests::wal::WalDatabase;

use outbox_tests::init_tracing;

/// A WAL-mode relay configuration for `db` publishing to `topic` on `brokers`.
fn kafka_config(db: &WalDatabase, brokers: &str, topic: &str) -> RawConfig {
    let mut raw = db.raw_config("unused");
    raw.sink = Some("kafka".into());
    raw.rabbitmq = None;
    // Validation asks the Kafka delivery timeout plus 10 s to stay below the polling
    // lease even with the WAL source, which takes no leases.
    raw.polling.lease_ms = Some(15_000);
    raw.kafka = Some(RawKafka {
        brokers: Some(brokers.to_owned()),
        topic: Some(topic.to_owned()),
        message_timeout_ms: Some(3_000),
        ..Default::default()
    });
    raw
}

/// Start a relay and wait until it streams from the slot (the slot exists and a
/// walsender is active on it), so that what is written next comes through the stream.
async fn start_streaming(db: &WalDatabase, raw: RawConfig) -> RunningRelay {
    init_tracing();
    let relay = RunningRelay::start(raw.validate().unwrap());
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !db.walsender_streams().await {
        assert!(
            tokio::time::Instant::now() < until,
            "the relay did not stream from slot {} within 30 s",
            db.slot
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay
}

/// Let commits of this test's database return before their WAL is flushed, so that
/// thousands of one-event transactions do not queue on fsync of a shared, busy
/// machine. The walsender still decodes only flushed WAL, and the server is not
/// crashed here, so nothing the test checks changes. Applies to new connections.
async fn fast_commits(db: &WalDatabase) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "alter database {} set synchronous_commit = off",
        db.name
    )))
    .execute(&db.test.pool)
    .await
    .unwrap();
}

async fn dead_letters(db: &WalDatabase) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {}",
        db.test.table("outbox_dead_letter")
    )))
    .fetch_one(&db.test.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_event_never_arrives_and_committed_ones_carry_key_and_headers() {
    const PARTITIONS: i32 = 3;
    let brokers = kafka_brokers();
    let db = WalDatabase::new().await;
    let topic = create_topic_on(&brokers, PARTITIONS).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, PARTITIONS);
    let relay = start_streaming(&db, kafka_config(&db, &brokers, &topic)).await;
    let outbox = Outbox::new(OutboxConfig {
        schema: db.test.schema.clone(),
        ..OutboxConfig::default()
    });

    let committed = [
        Event::builder("order", "1", "order.placed")
            .payload(&serde_json::json!({ "n": 1 }))
            .header("tenant", "acme")
            .build()
            .unwrap(),
        Event::builder("order", "2", "order.placed")
            .payload(&serde_json::json!({ "n": 1 }))
            .partition_key("customer:7")
            .build()
            .unwrap(),
    ];
    let rolled_back = Event::builder("order", "1", "order.cancelled")
        .payload(&serde_json::json!({ "n": 2 }))
        .build()
        .unwrap();
    // The rolled-back transaction starts first and ends before the committed one.
    let mut tx_r = db.test.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx_r, &rolled_back).await.unwrap();
    let mut tx = db.test.pool.begin().await.unwrap();
    outbox.enqueue_all(&mut tx, &committed).await.unwrap();
    tx_r.rollback().await.unwrap();
    tx.commit().await.unwrap();
    // A later committed event: once it is published, the stream is past the rollback.
    let marker = Event::builder("order", "3", "order.placed")
        .payload(&serde_json::json!({ "n": 1 }))
        .build()
        .unwrap();
    outbox
        .enqueue(&mut db.test.pool.acquire().await.unwrap(), &marker)
        .await
        .unwrap();

    let received = wait_distinct(&consumer, 3, Duration::from_secs(30)).await;
    wait_for_empty_outbox(&db.test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;
    let received_after_stop = consumer.received();
    assert!(
        received_after_stop
            .iter()
            .all(|m| m.header("outbox-event-id") != Some(rolled_back.id().to_string())),
        "the rolled-back event was published"
    );
    assert_eq!(distinct(&received_after_stop), 3, "{received:?}");
    assert_eq!(summary.dead_lettered, 0);

    for event in committed.iter().chain([&marker]) {
        let id = event.id().to_string();
        let m = received
            .iter()
            .find(|m| m.header("outbox-event-id").as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("event {id} did not arrive"));
        assert_eq!(m.key_text(), event.partition_key());
        assert_eq!(
            m.partition,
            java_partition(event.partition_key().as_bytes(), PARTITIONS)
        );
        assert_eq!(
            m.header("outbox-partition-key").as_deref(),
            Some(event.partition_key())
        );
        assert_eq!(
            m.header("outbox-event-type").as_deref(),
            Some(event.event_type())
        );
        assert_eq!(
            m.header("outbox-aggregate-type").as_deref(),
            Some(event.aggregate_type())
        );
        assert_eq!(
            m.header("outbox-aggregate-id").as_deref(),
            Some(event.aggregate_id())
        );
        let created_at = m.header("outbox-created-at").unwrap();
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(&created_at).unwrap(),
            event.created_at(),
            "outbox-created-at is the writer's time"
        );
        let sequence: i64 = m.header("outbox-sequence").unwrap().parse().unwrap();
        assert!(sequence > 0, "outbox-sequence {sequence}");
        for name in [
            "outbox-event-id",
            "outbox-event-type",
            "outbox-partition-key",
            "outbox-sequence",
        ] {
            assert_eq!(m.header_count(name), 1, "{name} appears once");
        }
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(m.payload.as_deref().unwrap()).unwrap(),
            *event.payload()
        );
    }
    let first = received
        .iter()
        .find(|m| m.header("outbox-event-id") == Some(committed[0].id().to_string()))
        .unwrap();
    assert_eq!(first.header("tenant").as_deref(), Some("acme"));
    assert_eq!(dead_letters(&db).await, 0);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_events_arrive_complete_in_commit_order_on_java_partitions() {
    const WRITERS: usize = 8;
    const EVENTS: usize = 20_000;
    const KEYS: usize = 200;
    const PARTITIONS: i32 = 6;
    let brokers = kafka_brokers();
    let db = WalDatabase::new().await;
    let topic = create_topic_on(&brokers, PARTITIONS).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, PARTITIONS);
    let counters = outbox_tests::load::create_counters(&db.test, KEYS).await;
    fast_commits(&db).await;
    let relay = start_streaming(&db, kafka_config(&db, &brokers, &topic)).await;

    let started = Instant::now();
    outbox_tests::load::run_counter_writers(&db.test, &counters, WRITERS, EVENTS, KEYS).await;
    let written = started.elapsed();
    let received = wait_distinct(&consumer, EVENTS, Duration::from_secs(90)).await;
    let delivered = started.elapsed();
    wait_for_empty_outbox(&db.test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;
    println!(
        "wal -> kafka: {EVENTS} events by {WRITERS} writers written in {:.1} s, all delivered after {:.1} s; \
         {} messages ({} duplicates)",
        written.as_secs_f64(),
        delivered.as_secs_f64(),
        received.len(),
        received.len() - distinct(&received)
    );

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
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(dead_letters(&db).await, 0);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_stream_and_restarted_loses_nothing_and_keeps_order() {
    const WRITERS: usize = 4;
    const EVENTS: usize = 8_000;
    const KEYS: usize = 50;
    const PARTITIONS: i32 = 3;
    let brokers = kafka_brokers();
    let db = WalDatabase::new().await;
    let topic = create_topic_on(&brokers, PARTITIONS).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, PARTITIONS);
    let counters = outbox_tests::load::create_counters(&db.test, KEYS).await;
    fast_commits(&db).await;
    let raw = kafka_config(&db, &brokers, &topic);

    let first = start_streaming(&db, raw.clone()).await;
    let writers = {
        let (test, counters) = (
            outbox_tests::TestSchema {
                pool: db.test.pool.clone(),
                schema: db.test.schema.clone(),
                database_url: db.test.database_url.clone(),
            },
            counters.clone(),
        );
        tokio::spawn(async move {
            outbox_tests::load::run_counter_writers(&test, &counters, WRITERS, EVENTS, KEYS).await;
        })
    };
    wait_distinct(&consumer, 1_000, Duration::from_secs(60)).await;
    let confirmed_before_kill = db.slot_confirmed().await.unwrap();
    first.kill();
    let at_kill = distinct(&consumer.received());
    db.wait_slot_inactive().await;
    assert!(at_kill < EVENTS, "the kill must happen mid-stream");

    let second = start_streaming(&db, raw).await;
    writers.await.unwrap();
    let received = wait_distinct(&consumer, EVENTS, Duration::from_secs(60)).await;
    wait_for_empty_outbox(&db.test, Duration::from_secs(30)).await;
    let summary = second.stop().await;
    let duplicates = received.len() - distinct(&received);
    println!(
        "wal -> kafka, relay killed after {at_kill} of {EVENTS} events (slot confirmed at \
         {confirmed_before_kill}): all arrived, {duplicates} duplicates"
    );
    assert_eq!(order_violations(&received), 0);
    assert_eq!(summary.dead_lettered, 0);
    assert!(
        duplicates <= 2_000,
        "{duplicates} duplicates: more than the unconfirmed window of the killed relay"
    );
    let confirmed_after = db.slot_confirmed().await.unwrap();
    assert!(
        confirmed_after > confirmed_before_kill,
        "the restarted relay confirmed its progress ({confirmed_before_kill} -> {confirmed_after})"
    );
    db.cleanup().await;
}

/// One key's events, streamed from the WAL in 30 transactions of 100, are published
/// with many in flight at once and arrive complete, each first delivery in commit
/// order; an oversized event in the middle of the key is dead-lettered, and nothing
/// behind it is lost or goes ahead of what came before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_keys_stream_arrives_complete_and_in_order_with_many_events_in_flight() {
    let brokers = kafka_brokers();
    let db = WalDatabase::new().await;
    let topic = create_topic_on(&brokers, 3).await;
    let consumer = TopicConsumer::start_on(&brokers, &topic, 3);
    let relay = start_streaming(&db, kafka_config(&db, &brokers, &topic)).await;
    let outbox = Outbox::new(OutboxConfig {
        schema: db.test.schema.clone(),
        max_payload_bytes: 4 * 1024 * 1024,
        ..OutboxConfig::default()
    });
    let (events, big) = hot_key_events(3_000, 1_550);
    for transaction in events.chunks(100) {
        let mut tx = db.test.pool.begin().await.unwrap();
        outbox.enqueue_all(&mut tx, transaction).await.unwrap();
        tx.commit().await.unwrap();
    }

    let received = wait_distinct(&consumer, events.len() - 1, Duration::from_secs(120)).await;
    wait_for_empty_outbox(&db.test, Duration::from_secs(30)).await;
    relay.stop().await;

    assert_eq!(dead_letters(&db).await, 1, "the oversized event, once");
    assert_first_deliveries_are(&received, &events, big);
}
