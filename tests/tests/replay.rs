//! `outbox-relay replay` through the real binary: it re-publishes exactly the
//! selected retained events, in per-key order, with their original event ids and
//! an `outbox-replay` header; `--to` sends them elsewhere; `--dry-run` counts;
//! unpublished rows and other selections are never replayed. Each test owns its
//! schema and exchanges.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{polling_env, relay_binary};
use sqlx::AssertSqlSafe;

fn replay(test: &TestSchema, exchange: &str, args: &[&str]) -> Output {
    let binary = relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"));
    Command::new(binary)
        .arg("replay")
        .args(args)
        .env_remove("OUTBOX_RELAY_CONFIG")
        .envs(polling_env(test, exchange))
        .output()
        .unwrap()
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// 3 order keys × 5 published events, 4 published invoice events and 2 unpublished
/// order events; returns the published order events' ids per key, in order.
async fn retained_events(test: &TestSchema) -> BTreeMap<String, Vec<String>> {
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut events = Vec::new();
    for i in 0..5 {
        for key in ["o-1", "o-2", "o-3"] {
            let event = Event::builder("order", key, "order.placed")
                .payload(&serde_json::json!({ "n": i }))
                .build()
                .unwrap();
            expected
                .entry(format!("order:{key}"))
                .or_default()
                .push(event.id().to_string());
            events.push(event);
        }
    }
    for i in 0..4 {
        events.push(
            Event::builder("invoice", format!("i-{i}"), "invoice.sent")
                .payload(&serde_json::json!({ "n": i }))
                .build()
                .unwrap(),
        );
    }
    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let table = test.table("outbox");
    sqlx::query(AssertSqlSafe(format!(
        "update {table} set published_at = now() - interval '1 minute'"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    let pending: Vec<Event> = (0..2)
        .map(|i| {
            Event::builder("order", "o-1", "order.placed")
                .payload(&serde_json::json!({ "pending": i }))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue_all(&mut tx, &pending).await.unwrap();
    tx.commit().await.unwrap();
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_exactly_the_selection_in_per_key_order_with_original_ids() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::new().await; // bound with `#`: it would see anything sent
    let expected = retained_events(&test).await;

    let refused = replay(&test, &rabbit.exchange, &[]);
    assert!(
        !refused.status.success(),
        "an unnarrowed replay needs --all"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--all"));

    let dry = json(&replay(
        &test,
        &rabbit.exchange,
        &["--aggregate-type", "order", "--dry-run", "--json"],
    ));
    assert_eq!(
        (dry["selected"].as_u64(), dry["keys"].as_u64()),
        (Some(15), Some(3))
    );
    assert_eq!(rabbit.count(), 0, "a dry run publishes nothing");

    let report = json(&replay(
        &test,
        &rabbit.exchange,
        &["--aggregate-type", "order", "--json"],
    ));
    assert_eq!(report["published"], 15, "{report}");
    assert!(report["failed"].as_array().unwrap().is_empty(), "{report}");
    let replay_id = report["replay_id"].as_str().unwrap().to_owned();
    rabbit.wait_for_distinct(15, Duration::from_secs(30)).await;

    let mut received: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for message in rabbit.received() {
        assert_eq!(message.header("outbox-replay"), Some(replay_id.as_str()));
        let key = message.header("outbox-partition-key").unwrap().to_owned();
        received
            .entry(key)
            .or_default()
            .push(message.message_id.clone());
    }
    assert_eq!(
        received, expected,
        "exactly the selection, each key in order, original ids"
    );
    assert_eq!(
        rabbit.count(),
        15,
        "nothing else: no invoice, no unpublished row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_another_destination_leaves_the_original_route_alone() {
    let test = TestSchema::new().await;
    let original = RabbitFixture::new().await;
    let other = RabbitFixture::new().await;
    retained_events(&test).await;
    let report = json(&replay(
        &test,
        &original.exchange,
        &[
            "--event-type",
            "invoice.sent",
            "--to",
            &other.exchange,
            "--json",
        ],
    ));
    assert_eq!(report["published"], 4, "{report}");
    other.wait_for_distinct(4, Duration::from_secs(30)).await;
    assert!(
        other
            .received()
            .iter()
            .all(|m| m.header("outbox-event-type") == Some("invoice.sent"))
    );
    assert_eq!(original.count(), 0, "the original exchange got nothing");
}
