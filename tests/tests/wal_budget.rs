//! G6 for the WAL source: the slot's lag and retained WAL are reported on
//! `/metrics`, and a retained-WAL budget with `over_budget = "fallback-polling"`
//! drops the slot (PostgreSQL frees the WAL) and relays from the table instead,
//! losing nothing.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use outbox_tests::amqp::n_of;
use outbox_tests::amqp::{RabbitFixture, first_delivery_order_violations};
use outbox_tests::ops::{free_local_addr, metric};
use outbox_tests::relay::{RunningRelay, wait_for_empty_outbox};
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;

const DEADLINE: Duration = Duration::from_secs(30);

/// Enqueue 1,000 events over 20 keys in one transaction; per key `n` continues from `n_by_key`.
async fn enqueue_numbered(db: &WalDatabase, n_by_key: &mut [i64; 20]) {
    let outbox = outbox_core::Outbox::new(outbox_core::OutboxConfig {
        schema: db.test.schema.clone(),
        ..outbox_core::OutboxConfig::default()
    });
    let events: Vec<outbox_core::Event> = (0..1_000)
        .map(|i| {
            let key = i % 20;
            n_by_key[key] += 1;
            outbox_core::Event::builder("item", format!("k{key}"), "item.changed")
                .payload(&serde_json::json!({ "n": n_by_key[key] }))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = db.test.pool.begin().await.unwrap();
    outbox.enqueue_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn slot_lag_and_leadership_are_on_the_metrics_endpoint() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let ops = free_local_addr();
    let mut raw = db.raw_config(&rabbit.exchange);
    raw.ops.listen_addr = Some(ops.to_string());
    let relay = RunningRelay::start(raw.validate().unwrap());

    wait_until("the relay leads its slot", DEADLINE, || async {
        metric(ops, "outbox_relay_wal_leader").await == Some(1.0)
    })
    .await;
    outbox_tests::load::enqueue_backlog(&db.test, 200, 10).await;
    rabbit.wait_for_distinct(200, DEADLINE).await;
    wait_until("a confirmed position is reported", DEADLINE, || async {
        metric(ops, "outbox_relay_wal_confirmed_lsn")
            .await
            .is_some_and(|lsn| lsn > 0.0)
    })
    .await;
    wait_until("the retained WAL is sampled", DEADLINE, || async {
        metric(ops, "outbox_relay_wal_retained_bytes")
            .await
            .is_some_and(|bytes| bytes > 0.0)
    })
    .await;
    assert!(
        metric(ops, "outbox_relay_wal_slot_lag_bytes")
            .await
            .is_some(),
        "slot lag is exported"
    );
    assert_eq!(
        metric(ops, "outbox_relay_wal_slot_losses_total").await,
        Some(0.0)
    );
    // Counted when settled, which follows the broker's confirm by up to a settle tick.
    wait_until("the 200 events counted as published", DEADLINE, || async {
        metric(ops, "outbox_relay_events_published_total").await == Some(200.0)
    })
    .await;
    relay.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn over_the_retained_wal_budget_the_slot_is_dropped_and_the_relay_polls_without_losing_events()
 {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    // A slot always retains some WAL, so a one-byte budget is exceeded at the first sample.
    let mut raw = db.raw_config(&rabbit.exchange);
    if let Some(wal) = raw.wal.as_mut() {
        wal.retained_wal_budget_bytes = Some(1);
        wal.over_budget = Some("fallback-polling".into());
        wal.lag_sample_interval_ms = Some(500);
    }
    let mut n_by_key = [0_i64; 20];
    enqueue_numbered(&db, &mut n_by_key).await;
    let relay = RunningRelay::start(raw.validate().unwrap());
    // Keep writing while the relay switches from the slot to the table.
    for _ in 0..5 {
        enqueue_numbered(&db, &mut n_by_key).await;
    }
    wait_until("the slot is dropped", DEADLINE, || async {
        db.slot_confirmed().await.is_none()
    })
    .await;
    enqueue_numbered(&db, &mut n_by_key).await;

    rabbit
        .wait_for_distinct(7_000, Duration::from_secs(60))
        .await;
    wait_for_empty_outbox(&db.test, DEADLINE).await;
    relay.stop().await;
    assert!(
        db.slot_confirmed().await.is_none(),
        "the relay polls for the rest of the run: no new slot"
    );
    let received = rabbit.received();
    assert_eq!(rabbit.distinct(), 7_000, "nothing lost");
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    db.cleanup().await;
}
