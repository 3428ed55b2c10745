//! `outbox-relay inbox purge` through the real binary: it refuses a retention
//! shorter than the redelivery horizon, counts with `--dry-run`, and deletes only
//! ids older than the retention. Each test owns its schema.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::process::{Command, Output};

use outbox_tests::TestSchema;
use sqlx::AssertSqlSafe;

fn relay(test: &TestSchema, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .args(["--schema", test.schema.as_str()])
        .env("OUTBOX_RELAY__DATABASE__URL", &test.database_url)
        .env_remove("OUTBOX_RELAY_CONFIG")
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

/// 1,500 ids ten days old and 3 fresh ones.
async fn inbox_with_old_and_new_ids(test: &TestSchema) {
    let inbox = test.table("inbox");
    sqlx::query(AssertSqlSafe(format!(
        "insert into {inbox} (consumer, message_id, received_at) \
         select 'billing', 'old-' || g, now() - interval '10 days' from generate_series(1, 1500) g \
         union all select 'billing', 'new-' || g, now() from generate_series(1, 3) g"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
}

async fn ids(test: &TestSchema) -> i64 {
    let inbox = test.table("inbox");
    sqlx::query_scalar(AssertSqlSafe(format!("select count(*) from {inbox}")))
        .fetch_one(&test.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn inbox_purge_refuses_a_retention_shorter_than_the_redelivery_horizon() {
    let test = TestSchema::new().await;
    inbox_with_old_and_new_ids(&test).await;
    let output = relay(&test, &["inbox", "purge", "--older-than", "1d"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("shorter than the redelivery horizon") && stderr.contains("--older-than"),
        "names the problem and the fix: {stderr}"
    );
    assert_eq!(ids(&test).await, 1503, "nothing deleted");

    let output = relay(&test, &["inbox", "purge", "--older-than", "8x"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unknown unit"),
        "a bad duration is named"
    );
}

#[tokio::test]
async fn inbox_purge_counts_with_dry_run_then_deletes_only_old_ids() {
    let test = TestSchema::new().await;
    inbox_with_old_and_new_ids(&test).await;
    let dry = json(&relay(
        &test,
        &[
            "inbox",
            "purge",
            "--older-than",
            "8d",
            "--dry-run",
            "--json",
        ],
    ));
    assert_eq!(dry["would_purge"], 1500);
    assert_eq!(ids(&test).await, 1503, "a dry run deletes nothing");

    let done = json(&relay(
        &test,
        &[
            "inbox",
            "purge",
            "--older-than",
            "2d",
            "--redelivery-horizon",
            "1d",
            "--json",
        ],
    ));
    assert_eq!(done["purged"], 1500, "more than one batch, all of them");
    assert_eq!(ids(&test).await, 3, "the fresh ids stay");
}
