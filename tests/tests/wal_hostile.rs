//! Hostile input never stops the WAL relay (G4): logical decoding messages with
//! the outbox prefix that are no event (any role that can connect can emit
//! them), table rows with values no event can carry, and events the broker can
//! never take are dead-lettered at the first attempt, with the reason and their
//! raw content; the slot moves past them and every other key keeps flowing.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig, wal_message};
use outbox_relay::source::wal::Lsn;
use outbox_tests::TestSchema;
use outbox_tests::amqp::RabbitFixture;
use outbox_tests::relay::{RunningRelay, wait_for_empty_outbox};
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;
use sqlx::AssertSqlSafe;

const DEADLINE: Duration = Duration::from_secs(30);

use outbox_tests::init_tracing;

/// Wait until a relay streams from the slot, so later commits come through the stream.
async fn wait_streaming(db: &WalDatabase) {
    wait_until("a relay streams from the slot", DEADLINE, async || {
        sqlx::query_scalar::<_, bool>(
            "select exists (select from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid \
             where s.slot_name = $1 and a.backend_type = 'walsender' and s.confirmed_flush_lsn is not null)",
        )
        .bind(&db.slot)
        .fetch_one(&db.test.pool)
        .await
        .unwrap()
    })
    .await;
}

fn outbox_for(test: &TestSchema) -> Outbox {
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
}

/// `count` ordinary events on keys `<prefix>:0..count`, routed with `ok.flow`, as table rows.
async fn enqueue_ordinary(test: &TestSchema, prefix: &str, count: usize) -> Vec<Event> {
    let events: Vec<Event> = (0..count)
        .map(|i| {
            Event::builder(prefix, i.to_string(), "ok.flow")
                .build()
                .unwrap()
        })
        .collect();
    outbox_for(test)
        .enqueue_all(&mut test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();
    events
}

/// A row as a writer in another language could insert it; returns its event id.
async fn insert_raw_row(
    test: &TestSchema,
    aggregate_id: &str,
    event_type: &str,
    created_at: &str,
) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    sqlx::query(AssertSqlSafe(format!(
        "insert into {} (event_id, aggregate_type, aggregate_id, event_type, partition_key, payload, \
                         headers, created_at) \
         values ($1, 'doc', $2, $3, 'doc:' || $2, '{{\"raw\": true}}'::jsonb, '{{}}', $4::text::timestamptz)",
        test.table("outbox")
    )))
    .bind(id)
    .bind(aggregate_id)
    .bind(event_type)
    .bind(created_at)
    .execute(&test.pool)
    .await
    .unwrap();
    id
}

/// Emit `content` with the outbox prefix as its own transaction; returns the message's LSN.
async fn emit_raw(conn: &mut sqlx::PgConnection, content: &[u8]) -> Lsn {
    let lsn: String =
        sqlx::query_scalar("select pg_logical_emit_message(true, 'outbox', $1::bytea)::text")
            .bind(content)
            .fetch_one(conn)
            .await
            .unwrap();
    lsn.parse().unwrap()
}

async fn dead_lettered(test: &TestSchema) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "select count(*) from {}",
        test.table("outbox_dead_letter")
    )))
    .fetch_one(&test.pool)
    .await
    .unwrap()
}

/// The dead letter at `sequence`: `(attempts, last_error, raw content, prefix, dead_lettered_at)`.
async fn dead_letter_message(
    test: &TestSchema,
    sequence: i64,
) -> Option<(i32, String, Vec<u8>, String, String)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "select attempts, last_error, decode(payload #>> '{{wal_message,content_base64}}', 'base64'), \
                payload #>> '{{wal_message,prefix}}', dead_lettered_at::text \
         from {} where sequence = $1",
        test.table("outbox_dead_letter")
    )))
    .bind(sequence)
    .fetch_optional(&test.pool)
    .await
    .unwrap()
}

/// `(attempts, last_error, created_at as text)` of a dead-lettered event.
async fn dead_letter_row(test: &TestSchema, id: uuid::Uuid) -> Option<(i32, String, String)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "select attempts, last_error, created_at::text from {} where event_id = $1",
        test.table("outbox_dead_letter")
    )))
    .bind(id)
    .fetch_optional(&test.pool)
    .await
    .unwrap()
}

/// A valid wal-message document with one field changed (or removed with `null`).
fn document_with(field: &str, value: serde_json::Value) -> Vec<u8> {
    let event = Event::builder("doc", "x", "ok.doc").build().unwrap();
    let mut document: serde_json::Value =
        serde_json::from_slice(&wal_message::encode(&event).unwrap()).unwrap();
    let object = document.as_object_mut().unwrap();
    if value.is_null() {
        object.remove(field);
    } else {
        object.insert(field.to_owned(), value);
    }
    serde_json::to_vec(&document).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_wal_messages_are_dead_lettered_raw_the_slot_passes_them_and_a_restart_does_not_see_them_again()
 {
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    wait_streaming(&db).await;

    // (content, a word the reason must contain)
    let malformed: Vec<(Vec<u8>, &str)> = vec![
        (b"garbage".to_vec(), "not a valid outbox event document"),
        (
            vec![0xff, 0xfe, 0x00, 0x80, b'{'],
            "not a valid outbox event document",
        ),
        (
            b"{\"v\":1,\"event_id\":".to_vec(),
            "not a valid outbox event document",
        ),
        (document_with("v", serde_json::json!(99)), "version 99"),
        (
            document_with("event_type", serde_json::Value::Null),
            "event_type",
        ),
        (
            document_with("aggregate_id", serde_json::json!("")),
            "aggregate_id",
        ),
        (
            document_with("event_id", serde_json::json!("not-a-uuid")),
            "not a valid outbox event document",
        ),
    ];
    let mut ordinary = enqueue_ordinary(&db.test, "before", 50).await;
    let mut conn = db.test.pool.acquire().await.unwrap();
    let mut lsns = Vec::new();
    for (content, _) in &malformed {
        lsns.push(emit_raw(&mut conn, content).await);
        ordinary.extend(enqueue_ordinary(&db.test, "between", 5).await);
    }
    // Returned to the pool: closing it at the end waits for every connection.
    drop(conn);
    // One more inside a transaction with valid events of other keys (table and wal-message).
    let mut tx = db.test.pool.begin().await.unwrap();
    let in_tx_table = Event::builder("tx", "1", "ok.tx").build().unwrap();
    let in_tx_message = Event::builder("tx", "2", "ok.tx").build().unwrap();
    outbox_for(&db.test)
        .enqueue(&mut tx, &in_tx_table)
        .await
        .unwrap();
    let in_tx_garbage = b"in a transaction \x00\x01 with others".to_vec();
    let in_tx_lsn = emit_raw(&mut tx, &in_tx_garbage).await;
    wal_message::emit(
        &mut tx,
        wal_message::DEFAULT_PREFIX,
        &in_tx_message,
        outbox_core::writer::DEFAULT_MAX_PAYLOAD_BYTES,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    ordinary.push(in_tx_table);
    ordinary.push(in_tx_message);
    ordinary.extend(enqueue_ordinary(&db.test, "after", 50).await);

    rabbit.wait_for_distinct(ordinary.len(), DEADLINE).await;
    let expected = malformed.len() as i64 + 1;
    wait_until(
        "every malformed message is dead-lettered",
        DEADLINE,
        async || dead_lettered(&db.test).await == expected,
    )
    .await;
    wait_for_empty_outbox(&db.test, DEADLINE).await;
    let last = *lsns.iter().chain([&in_tx_lsn]).max().unwrap();
    wait_until(
        "the slot confirms past the malformed messages",
        DEADLINE,
        async || db.slot_confirmed().await.is_some_and(|lsn| lsn > last),
    )
    .await;
    assert!(!relay.is_finished(), "the relay keeps running");
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, expected as u64);

    let received: Vec<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    for event in &ordinary {
        assert!(received.contains(&event.id().to_string()));
    }
    let mut first_seen = Vec::new();
    for ((content, reason), lsn) in malformed
        .iter()
        .map(|(c, r)| (c, *r))
        .chain([(&in_tx_garbage, "not a valid outbox event document")])
        .zip(lsns.iter().chain([&in_tx_lsn]))
    {
        let (attempts, error, raw, prefix, at) =
            dead_letter_message(&db.test, lsn.to_i64().unwrap())
                .await
                .unwrap_or_else(|| panic!("no dead letter at LSN {lsn}"));
        assert_eq!(attempts, 1);
        assert!(error.contains(reason), "{reason:?} not in {error}");
        assert!(error.contains(&lsn.to_string()), "the LSN is in {error}");
        assert_eq!(&raw, content, "the raw content is kept");
        assert_eq!(prefix, "outbox");
        first_seen.push(at);
    }

    // A restart resumes after them: nothing is dead-lettered (or updated) again.
    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    wait_streaming(&db).await;
    let later = enqueue_ordinary(&db.test, "later", 5).await;
    rabbit
        .wait_for_distinct(ordinary.len() + later.len(), DEADLINE)
        .await;
    wait_for_empty_outbox(&db.test, DEADLINE).await;
    let summary = relay.stop().await;
    assert_eq!(
        summary.dead_lettered, 0,
        "a restart re-processed a dead letter"
    );
    assert_eq!(dead_lettered(&db.test).await, expected);
    for (lsn, at) in lsns.iter().chain([&in_tx_lsn]).zip(&first_seen) {
        let (_, _, _, _, again) = dead_letter_message(&db.test, lsn.to_i64().unwrap())
            .await
            .unwrap();
        assert_eq!(&again, at);
    }
    // They are no events: `dead-letters retry` leaves them (re-entering one would publish it).
    let filter = outbox_relay::admin::DeadLetterFilter {
        event_type: Some(outbox_relay::source::wal::rows::MALFORMED_MESSAGE_EVENT_TYPE.into()),
        ..Default::default()
    };
    outbox_relay::admin::retry_dead_letters(&db.test.pool, &db.test.schema, &filter)
        .await
        .unwrap();
    assert_eq!(dead_lettered(&db.test).await, expected);
    assert_eq!(outbox_tests::relay::outbox_rows(&db.test).await, 0);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_rows_with_infinite_created_at_are_dead_lettered_raw_at_once_while_others_flow() {
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let mut raw = db.raw_config(&rabbit.exchange);
    // A retry would take 10 s: dead-lettering must not wait for one.
    raw.pipeline.max_attempts = Some(5);
    raw.pipeline.retry_backoff_initial_ms = Some(10_000);
    raw.pipeline.retry_backoff_max_ms = Some(10_000);
    let relay = RunningRelay::start(raw.validate().unwrap());
    wait_streaming(&db).await;

    let mut ordinary = enqueue_ordinary(&db.test, "before", 20).await;
    let infinite = insert_raw_row(&db.test, "1", "ok.bad", "infinity").await;
    let after = insert_raw_row(&db.test, "1", "ok.after", "2026-01-01 00:00:00+00").await;
    let minus = insert_raw_row(&db.test, "2", "ok.bad", "-infinity").await;
    ordinary.extend(enqueue_ordinary(&db.test, "after", 20).await);

    rabbit
        .wait_for_distinct(ordinary.len() + 1, Duration::from_secs(15))
        .await;
    wait_until(
        "both rows are dead-lettered",
        Duration::from_secs(15),
        async || dead_lettered(&db.test).await == 2,
    )
    .await;
    wait_for_empty_outbox(&db.test, Duration::from_secs(15)).await;
    assert!(!relay.is_finished(), "the relay keeps running");
    let received: Vec<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    assert!(received.contains(&after.to_string()), "the key continued");
    for (id, raw_value) in [(infinite, "infinity"), (minus, "-infinity")] {
        assert!(
            !received.contains(&id.to_string()),
            "{id} was not published"
        );
        let (attempts, error, created_at) = dead_letter_row(&db.test, id).await.unwrap();
        assert_eq!(attempts, 1, "{error}");
        assert_eq!(created_at, raw_value, "the raw value is kept");
        assert!(error.contains("created_at"), "{error}");
    }
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 2);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_source_dead_letters_rejections_no_retry_can_cure_at_the_first_attempt() {
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let mut raw = db.raw_config(&rabbit.exchange);
    raw.pipeline.max_attempts = Some(5);
    raw.pipeline.retry_backoff_initial_ms = Some(10_000);
    raw.pipeline.retry_backoff_max_ms = Some(10_000);
    if let Some(rabbitmq) = raw.rabbitmq.as_mut() {
        rabbitmq.max_message_bytes = Some(1_000);
    }
    let relay = RunningRelay::start(raw.validate().unwrap());
    wait_streaming(&db).await;

    // Routing key = event type: 300 bytes is over AMQP's 255 (the writer refuses
    // it, another writer's raw insert does not).
    let at = "2026-01-01 00:00:00+00";
    let long_key = insert_raw_row(&db.test, "1", &format!("ok.{}", "k".repeat(300)), at).await;
    let after_key = insert_raw_row(&db.test, "1", "ok.after", at).await;
    let big = Event::builder("doc", "2", "ok.big")
        .payload(&serde_json::json!({ "blob": "b".repeat(5_000) }))
        .build()
        .unwrap();
    let after_big = Event::builder("doc", "2", "ok.after").build().unwrap();
    outbox_for(&db.test)
        .enqueue_all(
            &mut db.test.pool.acquire().await.unwrap(),
            &[big.clone(), after_big.clone()],
        )
        .await
        .unwrap();
    // wal-message mode too: no table row, same verdict.
    let big_message = Event::builder("doc", "3", "ok.big")
        .payload(&serde_json::json!({ "blob": "m".repeat(5_000) }))
        .build()
        .unwrap();
    wal_message::emit(
        &mut db.test.pool.acquire().await.unwrap(),
        wal_message::DEFAULT_PREFIX,
        &big_message,
        outbox_core::writer::DEFAULT_MAX_PAYLOAD_BYTES,
    )
    .await
    .unwrap();
    let ordinary = enqueue_ordinary(&db.test, "other", 20).await;

    // Well within the first 10 s retry backoff.
    rabbit
        .wait_for_distinct(ordinary.len() + 2, Duration::from_secs(8))
        .await;
    wait_until(
        "the three are dead-lettered",
        Duration::from_secs(8),
        async || dead_lettered(&db.test).await == 3,
    )
    .await;
    wait_for_empty_outbox(&db.test, Duration::from_secs(8)).await;
    let received: Vec<String> = rabbit
        .received()
        .iter()
        .map(|m| m.message_id.clone())
        .collect();
    assert!(received.contains(&after_key.to_string()));
    assert!(received.contains(&after_big.id().to_string()));
    for (id, expected) in [
        (long_key, "routing key"),
        (*big.id().as_uuid(), "max_message_bytes"),
        (*big_message.id().as_uuid(), "max_message_bytes"),
    ] {
        assert!(
            !received.contains(&id.to_string()),
            "{id} was not published"
        );
        let (attempts, error, _) = dead_letter_row(&db.test, id).await.unwrap();
        assert_eq!(
            attempts, 1,
            "{id} dead-lettered at the first attempt: {error}"
        );
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 3);
    db.cleanup().await;
}
