//! The polling relay publishing to RabbitMQ: G1 (atomic), G2 (nothing lost),
//! G3 (per-key order) and poison handling, checked by an AMQP consumer.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::n_of;
use outbox_tests::amqp::{RabbitFixture, first_delivery_order_violations};
use outbox_tests::relay::{RunningRelay, outbox_rows, raw_config, wait_for_empty_outbox};

fn outbox_for(test: &TestSchema) -> Outbox {
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
}

#[tokio::test]
async fn rolled_back_events_are_never_published_and_committed_ones_arrive_with_their_properties() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let outbox = outbox_for(&test);
    let relay = RunningRelay::start(raw_config(&test, &rabbit.exchange).validate().unwrap());

    let rolled_back = Event::builder("order", "1", "order.placed")
        .build()
        .unwrap();
    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &rolled_back).await.unwrap();
    tx.rollback().await.unwrap();

    let committed = outbox_tests::amqp::detailed_order_event();
    let mut tx = test.pool.begin().await.unwrap();
    let enqueued = outbox.enqueue(&mut tx, &committed).await.unwrap();
    tx.commit().await.unwrap();
    // A marker committed after both: once it is in, anything the rollback could have produced would be too.
    let marker = Event::builder("order", "3", "order.marker")
        .build()
        .unwrap();
    outbox
        .enqueue(&mut test.pool.acquire().await.unwrap(), &marker)
        .await
        .unwrap();

    rabbit.wait_for_distinct(2, Duration::from_secs(30)).await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    relay.stop().await;

    let received = rabbit.received();
    let ids: HashSet<&str> = received.iter().map(|m| m.message_id.as_str()).collect();
    assert!(
        !ids.contains(rolled_back.id().to_string().as_str()),
        "rolled-back event was published"
    );
    assert_eq!(ids.len(), 2);

    let message = received
        .iter()
        .find(|m| m.message_id == committed.id().to_string())
        .unwrap();
    outbox_tests::amqp::assert_detailed_order_message(message, &committed, enqueued.sequence);
}

/// 8 writers, 20,000 events over 200 keys; each transaction bumps its key's counter row
/// (the aggregate lock), sleeps a random few ms, enqueues and commits. Per key, first
/// deliveries must follow the counter (commit order).
#[tokio::test]
async fn concurrent_writers_events_arrive_complete_and_in_commit_order_per_key() {
    const WRITERS: usize = 8;
    const EVENTS: usize = 20_000;
    const KEYS: usize = 200;
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let counters = outbox_tests::load::create_counters(&test, KEYS).await;
    let relay = RunningRelay::start(raw_config(&test, &rabbit.exchange).validate().unwrap());
    outbox_tests::load::run_counter_writers(&test, &counters, WRITERS, EVENTS, KEYS).await;

    rabbit
        .wait_for_distinct(EVENTS, Duration::from_secs(180))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;

    let received = rabbit.received();
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    // Every counter value 1..=max arrived for every key: nothing lost.
    let mut per_key: HashMap<String, HashSet<i64>> = HashMap::new();
    for m in &received {
        per_key
            .entry(m.header("outbox-partition-key").unwrap().to_owned())
            .or_default()
            .insert(n_of(m));
    }
    assert_eq!(per_key.len(), KEYS);
    for (key, ns) in per_key {
        let max = *ns.iter().max().unwrap();
        assert_eq!(ns.len() as i64, max, "key {key} is missing counter values");
    }
    assert_eq!(summary.published as usize, EVENTS);
    // At-least-once: a publish that timed out after reaching the broker, or a lease
    // that lapsed (a starved machine), publishes again. Without either, no duplicate.
    if summary.transient_failures == 0 && summary.unsettled == 0 {
        assert_eq!(received.len(), EVENTS, "no duplicates without failures");
    } else {
        println!(
            "duplicates {} after {} transient failures and {} unsettled events",
            received.len() - EVENTS,
            summary.transient_failures,
            summary.unsettled
        );
    }
}

#[tokio::test]
async fn relay_killed_mid_stream_and_restarted_loses_nothing() {
    const EVENTS: usize = 6_000;
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    outbox_tests::load::enqueue_backlog(&test, EVENTS, 50).await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.polling.batch_size = Some(200);
    let batch = 200;

    let first = RunningRelay::start(raw.clone().validate().unwrap());
    rabbit
        .wait_for_distinct(1_000, Duration::from_secs(60))
        .await;
    first.kill();
    let at_kill = rabbit.distinct();
    assert!(at_kill < EVENTS, "the kill must happen mid-stream");

    // A new instance: it takes the dead one's partitions when their leases expire.
    let second = RunningRelay::start(raw.validate().unwrap());
    rabbit
        .wait_for_distinct(EVENTS, Duration::from_secs(120))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    second.stop().await;

    let received = rabbit.received();
    let duplicates = received.len() - rabbit.distinct();
    assert!(
        duplicates <= batch,
        "{duplicates} duplicates, more than the in-flight window of {batch}"
    );
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
}

#[tokio::test]
async fn two_relays_share_the_work_and_one_killed_hands_over_to_the_other() {
    const EVENTS: usize = 10_000;
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut a = raw_config(&test, &rabbit.exchange);
    a.instance.id = Some("relay-a".into());
    a.rabbitmq.as_mut().unwrap().app_id = Some("relay-a".into());
    a.polling.batch_size = Some(100);
    let mut b = a.clone();
    b.instance.id = Some("relay-b".into());
    b.rabbitmq.as_mut().unwrap().app_id = Some("relay-b".into());

    let relay_a = RunningRelay::start(a.validate().unwrap());
    let relay_b = RunningRelay::start(b.validate().unwrap());
    // Let both settle into their fair shares before the load arrives. Alone this takes
    // 15-20 s with the tests' 3 s lease; a loaded full suite once needed more than 30.
    let leases = test.table("relay_lease");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let owners: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select owner, count(*) from {leases} where name like 'partition:%' and owner is not null \
             and expires_at > now() group by owner"
        )))
        .fetch_all(&test.pool)
        .await
        .unwrap();
        if owners.len() == 2 && owners.iter().all(|(_, n)| *n == 8) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partitions not shared: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    outbox_tests::load::enqueue_backlog(&test, EVENTS, 100).await;
    rabbit
        .wait_for_distinct(EVENTS / 4, Duration::from_secs(60))
        .await;
    relay_a.kill();
    rabbit
        .wait_for_distinct(EVENTS, Duration::from_secs(120))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    relay_b.stop().await;

    let received = rabbit.received();
    let publishers: HashSet<&str> = received
        .iter()
        .filter_map(|m| m.app_id.as_deref())
        .collect();
    assert_eq!(
        publishers,
        HashSet::from(["relay-a", "relay-b"]),
        "both relays did work"
    );
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    assert!(
        received.len() - rabbit.distinct() <= 100,
        "duplicates within one batch"
    );
}

#[tokio::test]
async fn unroutable_event_is_retried_then_dead_lettered_with_the_reason_while_others_flow() {
    let test = TestSchema::new().await;
    // Only `ok.*` routing keys reach the queue: `lost.*` events are unroutable.
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(3);
    let relay = RunningRelay::start(raw.validate().unwrap());

    let outbox = outbox_for(&test);
    let poison = Event::builder("doc", "1", "lost.event").build().unwrap();
    let mut events = vec![
        Event::builder("doc", "1", "ok.before")
            .payload(&serde_json::json!({"n": 1}))
            .build()
            .unwrap(),
        poison.clone(),
        Event::builder("doc", "1", "ok.after")
            .payload(&serde_json::json!({"n": 3}))
            .build()
            .unwrap(),
    ];
    for i in 0..200 {
        events.push(
            Event::builder("other", i.to_string(), "ok.flow")
                .payload(&serde_json::json!({"n": i}))
                .build()
                .unwrap(),
        );
    }
    outbox
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();

    // Everything else arrives, including the poison's successor on its own key (skip policy).
    rabbit
        .wait_for_distinct(events.len() - 1, Duration::from_secs(60))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 1);

    let received = rabbit.received();
    assert!(
        received
            .iter()
            .all(|m| m.message_id != poison.id().to_string())
    );
    let doc_order: Vec<&str> = received
        .iter()
        .filter(|m| m.header("outbox-partition-key") == Some("doc:1"))
        .map(|m| m.routing_key.as_str())
        .collect();
    assert_eq!(doc_order, ["ok.before", "ok.after"]);

    let (event_id, attempts, last_error): (uuid::Uuid, i32, String) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select event_id, attempts, last_error from {}",
            test.table("outbox_dead_letter")
        )))
        .fetch_one(&test.pool)
        .await
        .unwrap();
    assert_eq!(event_id, *poison.id().as_uuid());
    assert_eq!(attempts, 3);
    assert!(last_error.contains("unroutable"), "{last_error}");
    assert_eq!(outbox_rows(&test).await, 0);
}

#[tokio::test]
async fn graceful_stop_settles_what_was_published() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    outbox_tests::load::enqueue_backlog(&test, 3_000, 30).await;
    let relay = RunningRelay::start(raw_config(&test, &rabbit.exchange).validate().unwrap());
    rabbit.wait_for_distinct(500, Duration::from_secs(60)).await;
    let summary = relay.stop().await;
    // Everything the broker confirmed was settled: the rows left are exactly the unpublished ones.
    let left = outbox_rows(&test).await as u64;
    assert_eq!(summary.published + left, 3_000);
    // Nothing was published twice: no duplicates after a graceful stop.
    rabbit
        .wait_for_distinct(summary.published as usize, Duration::from_secs(10))
        .await;
    assert_eq!(rabbit.count(), rabbit.distinct());
    assert_eq!(rabbit.count() as u64, summary.published);
    // And nothing is held: the leases were released for the next relay.
    let held: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {} where owner is not null",
        test.table("relay_lease")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap();
    assert_eq!(held, 0);
}

/// With `rabbitmq.max_in_flight_per_key = 64`, one key's backlog is published with
/// many events outstanding on one channel and still arrives complete, each first
/// delivery in commit order.
#[tokio::test]
async fn a_hot_keys_backlog_arrives_complete_and_in_order_with_many_in_flight_on_one_channel() {
    const EVENTS: usize = 3_000;
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await;
    let events: Vec<Event> = (0..EVENTS)
        .map(|n| {
            Event::builder("account", "hot", "account.changed")
                .payload(&serde_json::json!({ "n": n }))
                .build()
                .unwrap()
        })
        .collect();
    outbox_for(&test)
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.rabbitmq.as_mut().unwrap().max_in_flight_per_key = Some(64);
    let relay = RunningRelay::start(raw.validate().unwrap());

    rabbit
        .wait_for_distinct(EVENTS, Duration::from_secs(120))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    relay.stop().await;
    let received = rabbit.received();
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    let mut seen = HashSet::new();
    let first: Vec<String> = received
        .iter()
        .filter(|m| seen.insert(m.message_id.clone()))
        .map(|m| m.message_id.clone())
        .collect();
    let expected: Vec<String> = events.iter().map(|e| e.id().to_string()).collect();
    assert!(first == expected, "every event once, in commit order");
}
