//! Retention that keeps up, through the real daemon: with `settle = "mark"` the
//! relay deletes published rows once they are older than the retention, and the
//! `[inbox]` ids older than theirs, continuously while writers run — and never an
//! unpublished row, a retrying one, or a dead letter.
//!
//! `OUTBOX_TEST_RETENTION_RATE` (events/s, default 500) and
//! `OUTBOX_TEST_RETENTION_SECS` (default 5) size the writers; `scripts/test-heavy`
//! runs it at 2,000 events/s for 30 s and reports the figures.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{Daemon, polling_env, relay_binary, set};
use sqlx::AssertSqlSafe;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn scalar(test: &TestSchema, sql: String) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&test.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_only_expired_published_rows_and_inbox_ids_while_writers_run() {
    let rate = env_number("OUTBOX_TEST_RETENTION_RATE", 500);
    let secs = env_number("OUTBOX_TEST_RETENTION_SECS", 5);
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("doc.saved").await;
    let (outbox, dead, inbox) = (
        test.table("outbox"),
        test.table("outbox_dead_letter"),
        test.table("inbox"),
    );

    // What retention must never delete: rows waiting for a retry (unpublished, not
    // yet available), and dead letters, both far older than any retention.
    sqlx::query(AssertSqlSafe(format!(
        "insert into {outbox} (event_id, aggregate_type, aggregate_id, event_type, partition_key, \
         payload, created_at, attempts, last_error, first_failed_at, last_failed_at, available_at) \
         select gen_random_uuid(), 'doc', 'waiting-' || g, 'doc.saved', 'waiting-' || g, '{{}}', \
         now() - interval '2 days', 1, 'broker said no', now() - interval '2 days', \
         now() - interval '2 days', now() + interval '1 day' from generate_series(1, 5) g"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "insert into {dead} (sequence, event_id, aggregate_type, aggregate_id, event_type, \
         partition_key, payload, headers, created_at, attempts, last_error, first_failed_at, \
         last_failed_at, dead_lettered_at) \
         select -g, gen_random_uuid(), 'doc', 'dead', 'doc.saved', 'dead', '{{}}', '{{}}', \
         now() - interval '2 days', 5, 'unroutable', now() - interval '2 days', \
         now() - interval '2 days', now() - interval '2 days' from generate_series(1, 3) g"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    // Inbox ids: 2,500 an hour old (more than two batches), 10 fresh ones.
    sqlx::query(AssertSqlSafe(format!(
        "insert into {inbox} (consumer, message_id, received_at) \
         select 'billing', 'old-' || g, now() - interval '1 hour' from generate_series(1, 2500) g \
         union all select 'billing', 'new-' || g, now() from generate_series(1, 10) g"
    )))
    .execute(&test.pool)
    .await
    .unwrap();

    let mut env = polling_env(&test, &rabbit.exchange);
    set(&mut env, "POLLING__SETTLE", "mark");
    set(&mut env, "POLLING__PUBLISHED_RETENTION_MS", "1000");
    set(&mut env, "INBOX__RETENTION_MS", "600000");
    set(&mut env, "INBOX__REDELIVERY_HORIZON_MS", "300000");
    let binary = relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"));
    let mut daemon = Daemon::start(&binary, &env, None);

    // Writers: `rate` events/s in transactions of 10, over 20 keys.
    let written = Arc::new(AtomicUsize::new(0));
    let writing_since = std::time::Instant::now();
    let writers = {
        let written = written.clone();
        let pool = test.pool.clone();
        let schema = test.schema.clone();
        tokio::spawn(async move {
            let outbox = Outbox::new(OutboxConfig {
                schema,
                ..OutboxConfig::default()
            });
            let per_tick = (rate / 10).max(1) as usize; // 10 ticks a second
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for round in 0..secs * 10 {
                tick.tick().await;
                for batch in 0..per_tick.div_ceil(10) {
                    let events: Vec<Event> = (0..10.min(per_tick - batch * 10))
                        .map(|i| {
                            Event::builder(
                                "doc",
                                format!("k{}", (round as usize + i) % 20),
                                "doc.saved",
                            )
                            .payload(&serde_json::json!({ "round": round, "i": i }))
                            .build()
                            .unwrap()
                        })
                        .collect();
                    let mut tx = pool.begin().await.unwrap();
                    outbox.enqueue_all(&mut tx, &events).await.unwrap();
                    tx.commit().await.unwrap();
                    written.fetch_add(events.len(), Ordering::Relaxed);
                }
            }
        })
    };

    // While the writers run: the rows older than the retention plus a margin stay few.
    let expired_sql =
        format!("select count(*) from {outbox} where published_at < now() - interval '3 seconds'");
    let mut peak_expired = 0;
    let mut peak_published = 0;
    while !writers.is_finished() {
        peak_expired = peak_expired.max(scalar(&test, expired_sql.clone()).await);
        peak_published = peak_published.max(
            scalar(
                &test,
                format!("select count(*) from {outbox} where published_at is not null"),
            )
            .await,
        );
        if std::env::var_os("OUTBOX_TEST_RETENTION_TRACE").is_some() {
            println!(
                "written {} published {peak_published} expired {peak_expired}",
                written.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    writers.await.unwrap();
    let writing = writing_since.elapsed().as_secs_f64();
    let total = written.load(Ordering::Relaxed);
    rabbit
        .wait_for_distinct(total, Duration::from_secs(60))
        .await;

    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut expired = scalar(&test, expired_sql.clone()).await;
    while expired > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        expired = scalar(&test, expired_sql.clone()).await;
    }
    let old_ids = scalar(
        &test,
        format!("select count(*) from {inbox} where message_id like 'old-%'"),
    )
    .await;
    let new_ids = scalar(
        &test,
        format!("select count(*) from {inbox} where message_id like 'new-%'"),
    )
    .await;
    let waiting = scalar(&test, format!(
        "select count(*) from {outbox} where partition_key like 'waiting-%' and published_at is null"
    ))
    .await;
    let dead_letters = scalar(&test, format!("select count(*) from {dead}")).await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30)).await;
    println!(
        "retention: {total} events written in {writing:.1} s ({:.0}/s, offered {rate}/s), retention 1 s: \
         peak rows older than 3 s {peak_expired}, peak published rows kept {peak_published}, \
         expired rows left {expired}",
        total as f64 / writing
    );
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        daemon.log_tail()
    );
    assert_eq!(rabbit.distinct(), total, "every event was published");
    assert_eq!(
        expired, 0,
        "every published row past the retention was deleted"
    );
    assert_eq!(waiting, 5, "retrying rows are never deleted");
    assert_eq!(dead_letters, 3, "dead letters are never deleted");
    assert_eq!(old_ids, 0, "inbox ids past the retention were deleted");
    assert_eq!(new_ids, 10, "fresh inbox ids are kept");
}
