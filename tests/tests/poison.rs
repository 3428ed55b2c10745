//! Poison isolation (G4): an event the broker always refuses is dead-lettered
//! (policy `skip`) or holds its key (policy `block`) while other keys flow, and an
//! operator's retry after the fix delivers it exactly once.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::admin::{self, DeadLetterFilter};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::relay::{RunningRelay, raw_config, wait_for_empty_outbox};
use outbox_tests::wait_until;

/// `doc:1` gets ok.before, a poison event (routing key nobody binds), ok.after;
/// 200 other keys get one routable event each.
async fn enqueue_poison_scenario(test: &TestSchema) -> (Event, usize) {
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let poison = Event::builder("doc", "1", "lost.event").build().unwrap();
    let mut events = vec![
        Event::builder("doc", "1", "ok.before").build().unwrap(),
        poison.clone(),
        Event::builder("doc", "1", "ok.after").build().unwrap(),
    ];
    for i in 0..200 {
        events.push(
            Event::builder("other", i.to_string(), "ok.flow")
                .build()
                .unwrap(),
        );
    }
    outbox
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();
    (poison, events.len())
}

fn doc_order(rabbit: &RabbitFixture) -> Vec<String> {
    rabbit
        .received()
        .iter()
        .filter(|m| m.header("outbox-partition-key") == Some("doc:1"))
        .map(|m| m.routing_key.clone())
        .collect()
}

#[tokio::test]
async fn blocked_poison_event_holds_its_key_while_others_flow_and_retry_after_the_fix_delivers_it_once()
 {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(2);
    raw.pipeline.poison_policy = Some("block".into());
    let relay = RunningRelay::start(raw.validate().unwrap());
    let (poison, total) = enqueue_poison_scenario(&test).await;

    // Everything except the poison event and its successor on doc:1.
    rabbit
        .wait_for_distinct(total - 2, Duration::from_secs(60))
        .await;
    wait_until(
        "the poison event blocks",
        Duration::from_secs(30),
        async || {
            admin::status(&test.pool, &test.schema)
                .await
                .unwrap()
                .blocked
                == 1
        },
    )
    .await;
    let status = admin::status(&test.pool, &test.schema).await.unwrap();
    assert_eq!(
        status.pending, 2,
        "the poison event and the one it holds back"
    );
    assert_eq!(status.dead_lettered, 0);
    assert_eq!(
        doc_order(&rabbit),
        ["ok.before"],
        "the key is held behind the poison event"
    );

    let listed =
        admin::list_dead_letters(&test.pool, &test.schema, &DeadLetterFilter::default(), 10)
            .await
            .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, "blocked");
    assert_eq!(listed[0].event_id, *poison.id().as_uuid());
    assert_eq!(listed[0].attempts, 2);
    assert!(
        listed[0].last_error.contains("unroutable"),
        "{}",
        listed[0].last_error
    );

    // The operator fixes the route, then retries.
    rabbit.bind("lost.#").await;
    let filter = DeadLetterFilter {
        event_type: Some("lost.event".into()),
        ..Default::default()
    };
    assert_eq!(
        admin::retry_dead_letters(&test.pool, &test.schema, &filter)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        admin::retry_dead_letters(&test.pool, &test.schema, &filter)
            .await
            .unwrap(),
        0,
        "idempotent"
    );

    rabbit
        .wait_for_distinct(total, Duration::from_secs(30))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    let summary = relay.stop().await;
    assert_eq!(summary.blocked, 1);
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(
        doc_order(&rabbit),
        ["ok.before", "lost.event", "ok.after"],
        "in order, once each"
    );
}

#[tokio::test]
async fn skipped_poison_event_is_dead_lettered_and_retry_after_the_fix_delivers_it_once() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(2);
    let relay = RunningRelay::start(raw.validate().unwrap());
    let (poison, total) = enqueue_poison_scenario(&test).await;

    rabbit
        .wait_for_distinct(total - 1, Duration::from_secs(60))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    assert_eq!(
        doc_order(&rabbit),
        ["ok.before", "ok.after"],
        "skip: the key moved on"
    );
    let status = admin::status(&test.pool, &test.schema).await.unwrap();
    assert_eq!(
        (status.dead_lettered, status.blocked, status.pending),
        (1, 0, 0)
    );

    rabbit.bind("lost.#").await;
    let filter = DeadLetterFilter {
        event_ids: vec![*poison.id().as_uuid()],
        ..Default::default()
    };
    assert_eq!(
        admin::retry_dead_letters(&test.pool, &test.schema, &filter)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        admin::retry_dead_letters(&test.pool, &test.schema, &filter)
            .await
            .unwrap(),
        0,
        "idempotent"
    );
    rabbit
        .wait_for_distinct(total, Duration::from_secs(30))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    relay.stop().await;

    let deliveries = rabbit
        .received()
        .iter()
        .filter(|m| m.message_id == poison.id().to_string())
        .count();
    assert_eq!(deliveries, 1);
    let status = admin::status(&test.pool, &test.schema).await.unwrap();
    assert_eq!(status.dead_lettered, 0);
}

#[tokio::test]
async fn purge_requires_a_selection_and_removes_dead_letters_for_good() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let mut raw = raw_config(&test, &rabbit.exchange);
    raw.pipeline.max_attempts = Some(1);
    let relay = RunningRelay::start(raw.validate().unwrap());
    let (_poison, total) = enqueue_poison_scenario(&test).await;
    rabbit
        .wait_for_distinct(total - 1, Duration::from_secs(60))
        .await;
    wait_for_empty_outbox(&test, Duration::from_secs(30)).await;
    relay.stop().await;

    let filter = DeadLetterFilter {
        aggregate_type: Some("doc".into()),
        ..Default::default()
    };
    assert_eq!(
        admin::purge_dead_letters(&test.pool, &test.schema, &filter)
            .await
            .unwrap(),
        1
    );
    let status = admin::status(&test.pool, &test.schema).await.unwrap();
    assert_eq!(status.dead_lettered, 0);
}
