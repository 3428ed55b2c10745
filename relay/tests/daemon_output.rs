//! What the daemon writes while it runs: JSON log lines that parse one by one,
//! a progress line while events flow, no colour codes into a file, and a
//! database URL read from a secret file. Runs the real binary against the
//! services of `scripts/dev-services`; each test owns its schema and exchange.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{Daemon, polling_env, set};
use sqlx::AssertSqlSafe;

fn binary() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

async fn pending(test: &TestSchema) -> i64 {
    let outbox = test.table("outbox");
    sqlx::query_scalar(AssertSqlSafe(format!(
        "select count(*) from {outbox} where published_at is null"
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_report_progress_with_a_url_from_a_secret_file() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("doc.saved").await;
    let secret = std::env::temp_dir().join(format!(
        "outbox-relay-db-url-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&secret, format!("{}\n", test.database_url)).unwrap();
    let mut env = polling_env(&test, &rabbit.exchange);
    env.retain(|(k, _)| k != "OUTBOX_RELAY__DATABASE__URL");
    set(&mut env, "DATABASE__URL_FILE", secret.display().to_string());
    set(&mut env, "OPS__PROGRESS_INTERVAL_MS", "1000");
    env.push(("OUTBOX_RELAY_LOG_FORMAT".into(), "json".into()));
    let mut daemon = Daemon::start(&binary(), &env, None);

    // Events arrive over a few seconds, so at least one progress interval sees them flow.
    for _ in 0..4 {
        outbox_tests::enqueue_docs(&test, 100, 10).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    outbox_tests::wait_until(
        "all events published and a progress line logged",
        Duration::from_secs(60),
        async || pending(&test).await == 0 && daemon.log().contains("\"progress\""),
    )
    .await;
    rabbit.wait_for_distinct(400, Duration::from_secs(30)).await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30)).await;
    let log = daemon.log();
    let _ = std::fs::remove_file(&secret);
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        daemon.log_tail()
    );

    let mut progress = Vec::new();
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("a log line that is not JSON ({error}): {line}"));
        for field in ["timestamp", "level", "target", "fields"] {
            assert!(value.get(field).is_some(), "{field} in {line}");
        }
        if value["fields"]["message"] == "progress" {
            progress.push(value);
        }
    }
    let last = progress.last().unwrap();
    for field in [
        "published",
        "rate_per_sec",
        "backlog",
        "oldest_pending_age_secs",
    ] {
        assert!(last["fields"].get(field).is_some(), "{field} in {last}");
    }
    assert!(last["fields"]["published"].as_u64().unwrap() > 0, "{last}");
    assert!(!log.contains('\u{1b}'), "no ANSI codes in JSON logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_into_a_file_carry_no_colour_codes() {
    let test = TestSchema::new().await;
    let rabbit = RabbitFixture::with_binding("doc.saved").await;
    outbox_tests::enqueue_docs(&test, 20, 10).await;
    let mut daemon = Daemon::start(&binary(), &polling_env(&test, &rabbit.exchange), None);
    rabbit.wait_for_distinct(20, Duration::from_secs(60)).await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30)).await;
    let log = daemon.log();
    assert!(status.success(), "clean exit: {status:?}\n{log}");
    assert!(log.contains("INFO"), "the daemon logged: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI codes when stderr is a file:\n{log}"
    );
}
