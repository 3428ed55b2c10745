//! The writer: atomic with the caller's transaction, faithful, ordered, and strict about input.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use outbox_core::{Error, Event, EventId, KeyOrdering, Outbox, OutboxConfig, SchemaName};
use outbox_tests::TestSchema;
use sqlx::Row;

fn outbox_for(test: &TestSchema) -> Outbox {
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
}

async fn count(test: &TestSchema) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {}",
        test.table("outbox")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

fn event(aggregate_id: &str) -> Event {
    Event::builder("order", aggregate_id, "order.placed")
        .payload(&serde_json::json!({ "id": aggregate_id }))
        .build()
        .unwrap()
}

#[tokio::test]
async fn rolled_back_transaction_leaves_no_event() {
    let test = TestSchema::new().await;
    let outbox = outbox_for(&test);

    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("1")).await.unwrap();
    outbox
        .enqueue_all(&mut tx, &[event("2"), event("3")])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // A transaction dropped without commit (a writer that crashed mid-way) too.
    {
        let mut tx = test.pool.begin().await.unwrap();
        outbox.enqueue(&mut tx, &event("4")).await.unwrap();
    }

    assert_eq!(count(&test).await, 0);
}

#[tokio::test]
async fn committed_event_stores_every_field_as_given() {
    let test = TestSchema::new().await;
    let outbox = outbox_for(&test);
    let id = EventId::new();
    let created_at = Utc.with_ymd_and_hms(2026, 11, 23, 10, 30, 15).unwrap()
        + chrono::TimeDelta::microseconds(123_456);
    let payload = serde_json::json!({
        "order_id": 42,
        "lines": [{ "sku": "A-1", "qty": 2 }, { "sku": "B-7", "qty": 1 }],
        "note": "quote \" and unicode é ✓",
        "total": 19.99,
        "gift": null
    });
    let event = Event::builder("order", "42", "order.placed")
        .id(id)
        .payload(&payload)
        .header("schema-version", "2")
        .header("tenant.id", "acme")
        .partition_key("customer:7")
        .destination("orders-exchange")
        .created_at(created_at)
        .build()
        .unwrap();

    let mut tx = test.pool.begin().await.unwrap();
    let enqueued = outbox.enqueue(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(enqueued.event_id, id);

    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "select sequence, event_id, aggregate_type, aggregate_id, event_type, partition_key, key_hash, \
                destination, payload, headers, created_at, attempts, published_at is null as pending \
         from {}",
        test.table("outbox")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("sequence"), enqueued.sequence);
    assert_eq!(row.get::<uuid::Uuid, _>("event_id"), *id.as_uuid());
    assert_eq!(row.get::<String, _>("aggregate_type"), "order");
    assert_eq!(row.get::<String, _>("aggregate_id"), "42");
    assert_eq!(row.get::<String, _>("event_type"), "order.placed");
    assert_eq!(row.get::<String, _>("partition_key"), "customer:7");
    assert_eq!(
        row.get::<Option<String>, _>("destination").as_deref(),
        Some("orders-exchange")
    );
    assert_eq!(row.get::<serde_json::Value, _>("payload"), payload);
    let headers: BTreeMap<String, String> =
        serde_json::from_value(row.get::<serde_json::Value, _>("headers")).unwrap();
    assert_eq!(&headers, event.headers());
    assert_eq!(
        row.get::<chrono::DateTime<Utc>, _>("created_at"),
        created_at
    );
    assert_eq!(row.get::<i32, _>("attempts"), 0);
    assert!(row.get::<bool, _>("pending"));

    // The stored key hash is PostgreSQL's hashtext of the partition key, which relays partition on.
    let expected_hash: i32 = sqlx::query_scalar("select hashtext('customer:7')")
        .fetch_one(&test.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<i32, _>("key_hash"), expected_hash);
}

#[tokio::test]
async fn default_partition_key_and_no_destination_are_stored() {
    let test = TestSchema::new().await;
    let outbox = outbox_for(&test);
    let mut conn = test.pool.acquire().await.unwrap();
    // Without an explicit transaction the statement commits on its own.
    outbox.enqueue(&mut conn, &event("9")).await.unwrap();
    let (key, destination): (String, Option<String>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select partition_key, destination from {}",
            test.table("outbox")
        )))
        .fetch_one(&test.pool)
        .await
        .unwrap();
    assert_eq!(key, "order:9");
    assert_eq!(destination, None);
}

#[tokio::test]
async fn enqueue_all_keeps_slice_order_in_one_statement() {
    let test = TestSchema::new().await;
    let outbox = outbox_for(&test);
    let events: Vec<Event> = (0..500).map(|i| event(&format!("{}", i % 7))).collect();

    // Count insert statements with a statement-level trigger of the test's own.
    let statements = test.table("insert_statements");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {statements} (at timestamptz not null default now()); \
         create function {fun}() returns trigger language plpgsql as $$ \
           begin insert into {statements} default values; return null; end $$; \
         create trigger count_inserts after insert on {outbox} for each statement execute function {fun}();",
        fun = test.table("count_insert_statements"),
        outbox = test.table("outbox"),
    )))
    .execute(&test.pool)
    .await
    .unwrap();

    let mut tx = test.pool.begin().await.unwrap();
    let enqueued = outbox.enqueue_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let statement_count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {statements}"
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap();
    assert_eq!(statement_count, 1, "500 events, one insert statement");

    assert_eq!(enqueued.len(), events.len());
    for (event, enqueued) in events.iter().zip(&enqueued) {
        assert_eq!(event.id(), enqueued.event_id);
    }
    assert!(
        enqueued.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "sequences follow slice order"
    );

    let stored: Vec<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select event_id from {} order by sequence",
        test.table("outbox")
    )))
    .fetch_all(&test.pool)
    .await
    .unwrap();
    let given: Vec<uuid::Uuid> = events.iter().map(|e| *e.id().as_uuid()).collect();
    assert_eq!(stored, given);

    assert!(
        outbox
            .enqueue_all(&mut test.pool.acquire().await.unwrap(), &[])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn every_validation_error_is_returned_before_sql() {
    let test = TestSchema::new().await;
    // This schema does not exist: any SQL the writer sent would fail with a database error,
    // so getting the typed validation error proves it was raised first.
    let outbox = Outbox::new(OutboxConfig {
        schema: SchemaName::new("no_such_schema_for_validation").unwrap(),
        max_payload_bytes: 1_000,
        key_ordering: KeyOrdering::AdvisoryLock,
    });

    let builder_cases: Vec<(&str, Result<Event, Error>)> = vec![
        ("empty aggregate type", Event::builder("", "1", "t").build()),
        (
            "empty aggregate id",
            Event::builder("order", "", "t").build(),
        ),
        ("empty event type", Event::builder("order", "1", "").build()),
        (
            "empty partition key",
            Event::builder("order", "1", "t").partition_key("").build(),
        ),
        (
            "header with space",
            Event::builder("order", "1", "t")
                .header("bad name", "v")
                .build(),
        ),
        (
            "empty header name",
            Event::builder("order", "1", "t").header("", "v").build(),
        ),
        (
            "reserved header",
            Event::builder("order", "1", "t")
                .header("outbox-event-id", "v")
                .build(),
        ),
        (
            "non-ascii header",
            Event::builder("order", "1", "t")
                .header("größe", "v")
                .build(),
        ),
        (
            "NUL in header value",
            Event::builder("order", "1", "t")
                .header("h", "a\0b")
                .build(),
        ),
        (
            "NUL in payload",
            Event::builder("order", "1", "t")
                .payload(&serde_json::json!({"k": "\u{0}"}))
                .build(),
        ),
        (
            "NUL in aggregate id",
            Event::builder("order", "a\0", "t").build(),
        ),
        (
            "type too long",
            Event::builder("order", "1", "t".repeat(256)).build(),
        ),
        (
            "unserializable payload",
            Event::builder("order", "1", "t")
                .payload(&std::collections::HashMap::from([(
                    (1, 2),
                    "tuple keys are not JSON",
                )]))
                .build(),
        ),
    ];
    for (case, result) in builder_cases {
        let error = result.expect_err(case);
        assert!(error.is_validation(), "{case}: {error}");
    }

    let big = Event::builder("order", "1", "t")
        .payload(&"x".repeat(2_000))
        .build()
        .unwrap();
    let mut tx = test.pool.begin().await.unwrap();
    let error = outbox.enqueue(&mut tx, &big).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::PayloadTooLarge {
                size_bytes: 2_002,
                max_bytes: 1_000,
                ..
            }
        ),
        "{error}"
    );
    let error = outbox
        .enqueue_all(&mut tx, &[event("ok"), big.clone()])
        .await
        .unwrap_err();
    assert!(matches!(error, Error::PayloadTooLarge { .. }), "{error}");
    // The caller's transaction is untouched and still usable.
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(one, 1);

    // For contrast: a valid event does reach SQL, and the missing schema is named.
    let error = outbox.enqueue(&mut tx, &event("ok")).await.unwrap_err();
    assert!(!error.is_validation());
    assert!(
        matches!(error, Error::SchemaMissing { .. } | Error::Database { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn duplicate_event_id_is_a_typed_error() {
    let test = TestSchema::new().await;
    let outbox = outbox_for(&test);
    let first = event("1");
    outbox
        .enqueue(&mut test.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    let mut tx = test.pool.begin().await.unwrap();
    let error = outbox
        .enqueue_all(&mut tx, &[event("2"), first.clone()])
        .await
        .unwrap_err();
    match error {
        Error::DuplicateEventId { event_id } => assert_eq!(event_id, first.id()),
        other => panic!("expected DuplicateEventId, got {other}"),
    }
}

#[tokio::test]
async fn missing_tables_are_named_with_the_fix() {
    let test = TestSchema::unmigrated().await;
    let outbox = outbox_for(&test);
    let error = outbox
        .enqueue(&mut test.pool.acquire().await.unwrap(), &event("1"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::SchemaMissing { .. }), "{error}");
    assert!(error.to_string().contains("run the migrations"), "{error}");
}

async fn listener_on(test: &TestSchema) -> sqlx::postgres::PgListener {
    let mut listener = sqlx::postgres::PgListener::connect_with(&test.pool)
        .await
        .unwrap();
    listener
        .listen(&test.schema.notify_channel())
        .await
        .unwrap();
    listener
}

async fn next_notification(listener: &mut sqlx::postgres::PgListener) -> String {
    tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap()
        .payload()
        .to_owned()
}

async fn send_marker(test: &TestSchema, marker: &str) {
    sqlx::query("select pg_notify($1, $2)")
        .bind(test.schema.notify_channel())
        .bind(marker)
        .execute(&test.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn committed_inserts_send_no_notify_by_default_so_commits_do_not_serialise() {
    let test = TestSchema::new().await;
    let outbox = outbox_for(&test);
    let mut listener = listener_on(&test).await;

    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("1")).await.unwrap();
    tx.commit().await.unwrap();
    // A marker sent after the commit: had the insert notified, that would arrive first.
    send_marker(&test, "marker").await;
    assert_eq!(next_notification(&mut listener).await, "marker");
}

#[tokio::test]
async fn with_the_opt_in_trigger_inserts_notify_listeners_only_on_commit() {
    let test = TestSchema::new().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create trigger outbox_notify_insert after insert on {} for each statement \
         execute function {}()",
        test.table("outbox"),
        test.table("outbox_notify_insert")
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    let outbox = outbox_for(&test);
    let mut listener = listener_on(&test).await;

    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("1")).await.unwrap();
    tx.rollback().await.unwrap();
    // A marker sent after the rollback: if the rolled-back insert had notified, that would arrive first.
    send_marker(&test, "marker").await;
    assert_eq!(next_notification(&mut listener).await, "marker");

    let mut tx = test.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("2")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(next_notification(&mut listener).await, "");
}

/// With KeyOrdering::AdvisoryLock and no row lock of their own, concurrent writers on few
/// keys still produce per-key sequence order equal to commit order. Commit order is observed
/// through a per-key counter that each transaction bumps just before committing (its row lock
/// is held until commit, so counter order is commit order).
#[tokio::test]
async fn advisory_key_lock_makes_sequence_order_equal_commit_order() {
    let test = TestSchema::new().await;
    let outbox = Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        key_ordering: KeyOrdering::AdvisoryLock,
        ..OutboxConfig::default()
    });
    let counters = test.table("key_counter");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table {counters} (key text primary key, n bigint not null default 0); \
         create table {} (sequence bigint primary key, key text not null, n bigint not null);",
        test.table("commit_log")
    )))
    .execute(&test.pool)
    .await
    .unwrap();
    let keys: Vec<String> = (0..4).map(|k| format!("key-{k}")).collect();
    for key in &keys {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into {counters} (key) values ($1)"
        )))
        .bind(key)
        .execute(&test.pool)
        .await
        .unwrap();
    }

    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8_u64 {
        let pool = test.pool.clone();
        let outbox = outbox.clone();
        let keys = keys.clone();
        let counters = counters.clone();
        let log = test.table("commit_log");
        writers.spawn(async move {
            for i in 0..40_u64 {
                let key = &keys[((writer * 7 + i * 3) % keys.len() as u64) as usize];
                let event = Event::builder("thing", key.as_str(), "changed")
                    .partition_key(key.as_str())
                    .build()
                    .unwrap();
                let mut tx = pool.begin().await.unwrap();
                let enqueued = outbox.enqueue(&mut tx, &event).await.unwrap();
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..4))).await;
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "update {counters} set n = n + 1 where key = $1 returning n"
                )))
                .bind(key)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "insert into {log} values ($1, $2, $3)"
                )))
                .bind(enqueued.sequence)
                .bind(key)
                .bind(n)
                .execute(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
        });
    }
    while let Some(result) = writers.join_next().await {
        result.unwrap();
    }

    let violations: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from (select n, lag(n) over (partition by key order by sequence) as prev from {}) s \
         where prev is not null and n <> prev + 1",
        test.table("commit_log")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap();
    assert_eq!(
        violations, 0,
        "per key, sequence order must equal commit order"
    );
    assert_eq!(count(&test).await, 8 * 40);
}

#[tokio::test]
async fn traceparent_of_the_current_span_is_captured() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing::instrument::WithSubscriber;
    use tracing_subscriber::layer::SubscriberExt;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-tests")));

    let (event, expected) = async {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::info_span!("place_order");
        let _entered = span.enter();
        let expected = {
            use opentelemetry::trace::TraceContextExt;
            let context = span.context();
            let span_ref = context.span();
            let sc = span_ref.span_context();
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            )
        };
        (
            Event::builder("order", "1", "placed").build().unwrap(),
            expected,
        )
    }
    .with_subscriber(subscriber)
    .await;

    let traceparent = event
        .headers()
        .get("traceparent")
        .expect("traceparent header");
    assert_eq!(traceparent, &expected);
    assert!(
        traceparent.starts_with("00-") && traceparent.len() == 55,
        "{traceparent}"
    );

    // Outside any span there is no trace context, so no header.
    let plain = Event::builder("order", "1", "placed").build().unwrap();
    assert!(!plain.headers().contains_key("traceparent"));

    let test = TestSchema::new().await;
    outbox_for(&test)
        .enqueue(&mut test.pool.acquire().await.unwrap(), &event)
        .await
        .unwrap();
    let stored: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select headers from {}",
        test.table("outbox")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap();
    assert_eq!(stored["traceparent"], serde_json::json!(expected));
}
