//! `--json` output of the admin commands (`status`, `dead-letters list|show|retry|purge`)
//! checked against the database state, through the real binary. Each test owns its schema.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::process::Command;

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_tests::TestSchema;
use sqlx::AssertSqlSafe;

/// Run `outbox-relay <args> --json` against `test`'s schema and parse stdout.
fn json(test: &TestSchema, args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .args(["--json", "--schema", test.schema.as_str()])
        .env("OUTBOX_RELAY__DATABASE__URL", &test.database_url)
        .env_remove("OUTBOX_RELAY_CONFIG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "{args:?} printed no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Three pending events, two of which are moved to the dead-letter table with an error.
async fn outbox_with_dead_letters(test: &TestSchema) -> Vec<String> {
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    });
    let events: Vec<Event> = (0..3)
        .map(|i| {
            Event::builder("order", format!("o-{i}"), "order.placed")
                .payload(&serde_json::json!({ "n": i }))
                .header("tenant", "acme")
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let dead: Vec<String> = events[..2].iter().map(|e| e.id().to_string()).collect();
    let (outbox_table, dead_table) = (test.table("outbox"), test.table("outbox_dead_letter"));
    sqlx::raw_sql(AssertSqlSafe(format!(
        "with moved as (delete from {outbox_table} where aggregate_id in ('o-0', 'o-1') returning *) \
         insert into {dead_table} (sequence, event_id, aggregate_type, aggregate_id, event_type, \
             partition_key, destination, payload, headers, created_at, attempts, last_error, \
             first_failed_at, last_failed_at) \
         select sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, \
             destination, payload, headers, created_at, 5, 'NOT_FOUND - no exchange', now(), now() \
         from moved"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    dead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_the_outbox_as_the_database_holds_it() {
    let test = TestSchema::new().await;
    outbox_with_dead_letters(&test).await;
    let status = json(&test, &["status"]);
    assert_eq!(status["pending"], 1, "{status}");
    assert_eq!(status["dead_lettered"], 2, "{status}");
    assert_eq!(status["retrying"], 0, "{status}");
    assert_eq!(status["blocked"], 0, "{status}");
    assert!(
        status["oldest_pending_secs"].as_f64().unwrap() >= 0.0,
        "{status}"
    );
    assert!(
        status["instances"].as_array().unwrap().is_empty(),
        "{status}"
    );
    assert!(status["slots"].is_array(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_commands_print_json_matching_the_dead_letter_table() {
    let test = TestSchema::new().await;
    let dead = outbox_with_dead_letters(&test).await;

    let list = json(&test, &["dead-letters", "list"]);
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{list}");
    for id in &dead {
        assert!(listed.contains(&id.as_str()), "{id} missing from {list}");
    }

    let shown = json(&test, &["dead-letters", "show", &dead[0]]);
    assert_eq!(shown["event_id"], dead[0].as_str());
    assert_eq!(shown["status"], "dead-lettered");
    assert_eq!(shown["attempts"], 5);
    assert_eq!(shown["last_error"], "NOT_FOUND - no exchange");
    // Payload and headers are JSON values, not JSON text.
    assert_eq!(shown["payload"]["n"], 0, "{shown}");
    assert_eq!(shown["headers"]["tenant"], "acme", "{shown}");

    let retried = json(&test, &["dead-letters", "retry", &dead[0]]);
    assert_eq!(retried, serde_json::json!({ "retried": 1 }));
    let purged = json(&test, &["dead-letters", "purge", &dead[1]]);
    assert_eq!(purged, serde_json::json!({ "purged": 1 }));
    let status = json(&test, &["status"]);
    assert_eq!(
        status["pending"], 2,
        "the retried event is pending again: {status}"
    );
    assert_eq!(status["dead_lettered"], 0, "{status}");
    assert_eq!(
        json(&test, &["dead-letters", "list"]),
        serde_json::json!([])
    );
}
