//! The WAL source counts a rejected event's attempts on its outbox row: `status`
//! shows the retrying event with its attempts and last error while the relay
//! runs, and a relay killed mid-retry and started again continues the count
//! instead of starting over (the event is dead-lettered after `max_attempts` in
//! all). Real daemons, SIGKILL; each test owns its database and exchange.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::process::Command;
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{Daemon, relay_binary, set, wal_env};
use outbox_tests::ops::{free_local_addr, metric};
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;
use sqlx::AssertSqlSafe;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_attempts_live_on_the_row_and_survive_a_restart() {
    let db = WalDatabase::new().await;
    // Nothing is bound for `doc.saved`: every publish is returned unroutable.
    let rabbit = RabbitFixture::with_binding("nothing.binds.this").await;
    let binary = relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"));
    let mut env = wal_env(&db, &rabbit.exchange);
    set(&mut env, "PIPELINE__MAX_ATTEMPTS", "3");
    set(&mut env, "PIPELINE__RETRY_BACKOFF_INITIAL_MS", "1500");
    set(&mut env, "PIPELINE__RETRY_BACKOFF_MAX_MS", "1500");
    let mut first = Daemon::start(&binary, &env, None);
    wait_until("the relay streams", Duration::from_secs(30), async || {
        db.walsender_streams().await
    })
    .await;
    let event = Event::builder("doc", "d-1", "doc.saved").build().unwrap();
    Outbox::new(OutboxConfig {
        schema: db.test.schema.clone(),
        ..OutboxConfig::default()
    })
    .enqueue(&mut db.test.pool.acquire().await.unwrap(), &event)
    .await
    .unwrap();

    let outbox = db.test.table("outbox");
    let attempts = || async {
        sqlx::query_scalar::<_, i32>(AssertSqlSafe(format!("select attempts from {outbox}")))
            .fetch_optional(&db.test.pool)
            .await
            .unwrap()
            .unwrap_or(-1)
    };
    wait_until(
        "two rejections counted on the row",
        Duration::from_secs(30),
        async || attempts().await == 2,
    )
    .await;
    first.kill().await;

    let status = Command::new(&binary)
        .args(["status", "--json", "--schema", db.test.schema.as_str()])
        .env("OUTBOX_RELAY__DATABASE__URL", &db.test.database_url)
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["retrying"], 1, "{status}");
    let held = &status["stalls"]["held_keys"][0];
    assert_eq!(held["attempts"], 2, "{status}");
    assert_eq!(held["reason"], "retrying");
    assert!(
        held["last_error"].as_str().unwrap().contains("NO_ROUTE"),
        "{held}"
    );

    // The second relay streams the event again (its transaction was not confirmed)
    // and dead-letters it at its third attempt in all: one more rejection.
    let ops = free_local_addr();
    set(&mut env, "OPS__LISTEN_ADDR", ops.to_string());
    let mut second = Daemon::start(&binary, &env, None);
    let dead = db.test.table("outbox_dead_letter");
    let dead_attempts = || async {
        sqlx::query_scalar::<_, i32>(AssertSqlSafe(format!("select attempts from {dead}")))
            .fetch_optional(&db.test.pool)
            .await
            .unwrap()
    };
    wait_until(
        "the event is dead-lettered",
        Duration::from_secs(60),
        async || dead_attempts().await.is_some(),
    )
    .await;
    assert_eq!(
        dead_attempts().await,
        Some(3),
        "max_attempts in all, across the restart"
    );
    assert_eq!(
        metric(ops, "outbox_relay_events_rejected_total").await,
        Some(1.0),
        "the restarted relay needed one more attempt, not three"
    );
    second.signal("TERM");
    second.wait(Duration::from_secs(30)).await;
    db.cleanup().await;
}
