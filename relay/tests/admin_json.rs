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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_what_holds_the_relay_back() {
    let test = TestSchema::new().await;
    let (outbox, leases) = (test.table("outbox"), test.table("relay_lease"));
    // A key waiting for a retry, a blocked key, and a partition lease of an
    // instance that stopped sending heartbeats.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "insert into {outbox} (event_id, aggregate_type, aggregate_id, event_type, partition_key, \
             payload, created_at, attempts, last_error, first_failed_at, last_failed_at, available_at) \
         values (gen_random_uuid(), 'order', 'o-1', 'order.placed', 'order:o-1', '{{}}', now(), 2, \
                 'NOT_FOUND - no exchange', now(), now(), now() + interval '1 hour'), \
                (gen_random_uuid(), 'order', 'o-2', 'order.placed', 'order:o-2', '{{}}', now(), 5, \
                 'message too large', now(), now(), 'infinity'); \
         insert into {leases} (name, owner, fencing_token, expires_at) \
         values ('partition:3', 'ghost-relay', 1, now() + interval '30 seconds')"
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    // A transaction that wrote and stays open.
    let mut open = test.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "update {outbox} set attempts = attempts where aggregate_id = 'o-1'"
    )))
    .execute(&mut *open)
    .await
    .unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let status = json(&test, &["status", "--long-transaction", "1s"]);
        let found = status["stalls"]["long_transactions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["pid"] == pid);
        if found || std::time::Instant::now() > until {
            break status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    open.rollback().await.unwrap();

    let stalls = &status["stalls"];
    let transaction = stalls["long_transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["pid"] == pid)
        .unwrap_or_else(|| panic!("the open transaction is named: {stalls}"));
    assert_eq!(transaction["wrote"], true);
    assert!(transaction["age_secs"].as_f64().unwrap() >= 1.0);
    assert!(
        !transaction.to_string().contains("update"),
        "never the query text: {transaction}"
    );
    let held = stalls["held_keys"].as_array().unwrap();
    let reason = |key: &str| {
        held.iter()
            .find(|k| k["partition_key"] == key)
            .map(|k| k["reason"].as_str().unwrap().to_owned())
    };
    assert_eq!(reason("order:o-1").as_deref(), Some("retrying"), "{held:?}");
    assert_eq!(reason("order:o-2").as_deref(), Some("blocked"), "{held:?}");
    assert_eq!(
        stalls["orphaned_leases"][0]["owner"], "ghost-relay",
        "{stalls}"
    );
    assert_eq!(stalls["orphaned_leases"][0]["partitions"], 1);
}
