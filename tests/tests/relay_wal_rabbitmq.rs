//! The relay with the WAL source (`source = "wal"`) publishing to RabbitMQ: G1
//! (atomic), G2 (nothing lost across kills, leader failover and slot loss), G3
//! (per-key first-delivery order), G4 (poison events dead-lettered), G6 (an idle
//! outbox does not pin WAL), checked by an AMQP consumer.
//!
//! Every test owns a database ([`WalDatabase`]: its own slot and publication), an
//! exchange and a queue, and waits on conditions with deadlines. Table rows are
//! deleted only after their transaction is confirmed, so "the outbox is empty"
//! means every row was settled. Set `RUST_LOG` (e.g. `outbox_relay=debug`) to
//! see the relay's logs.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_core::{Event, Outbox, OutboxConfig, wal_message};
use outbox_relay::config::{RawConfig, RawDatabase, RawPipeline, RawRabbitMq};
use outbox_tests::TestSchema;
use outbox_tests::amqp::n_of;
use outbox_tests::amqp::{RabbitFixture, Received, first_delivery_order_violations};
use outbox_tests::relay::{RunningRelay, outbox_rows};
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;
use tokio::time::Instant;

/// Longest wait for anything that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(30);
/// Longest wait for a few thousand events to arrive.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(50);

use outbox_tests::init_tracing;

fn outbox_for(test: &TestSchema) -> Outbox {
    Outbox::new(OutboxConfig {
        schema: test.schema.clone(),
        ..OutboxConfig::default()
    })
}

fn key_of(message: &Received) -> &str {
    message.header("outbox-partition-key").unwrap()
}

/// Deliveries beyond the first of each message id.
fn duplicates(received: &[Received]) -> usize {
    let distinct: HashSet<&str> = received.iter().map(|m| m.message_id.as_str()).collect();
    received.len() - distinct.len()
}

/// Wait until a relay streams from the slot, so later commits come through the stream.
async fn wait_streaming(db: &WalDatabase) {
    wait_until("a relay streams from the slot", DEADLINE, || {
        db.walsender_streams()
    })
    .await;
}

/// Wait until `distinct` different message ids arrived; at the deadline, panic
/// with what the database says (rows left, slot position) to tell a slow relay
/// from a stalled stream or a skipped transaction.
async fn wait_delivered(
    rabbit: &RabbitFixture,
    db: &WalDatabase,
    distinct: usize,
    deadline: Duration,
) {
    let until = Instant::now() + deadline;
    loop {
        let have = rabbit.distinct();
        if have >= distinct {
            return;
        }
        if Instant::now() >= until {
            let (rows, first, last): (i64, Option<i64>, Option<i64>) =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "select count(*), min(sequence), max(sequence) from {}",
                    db.test.table("outbox")
                )))
                .fetch_one(&db.test.pool)
                .await
                .unwrap();
            panic!(
                "only {have} of {distinct} distinct messages arrived within {deadline:?}; \
                 {rows} outbox rows left (sequences {first:?}..={last:?}), slot confirmed at {:?}, \
                 server WAL at {}, slot active: {}",
                db.slot_confirmed().await,
                db.current_wal_lsn().await,
                db.slot_active().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the outbox is empty (every row settled: deleted after its
/// transaction was confirmed); at the deadline, panic with the rows left,
/// whether their events were delivered, and the slot's position.
async fn wait_settled(rabbit: &RabbitFixture, db: &WalDatabase) {
    let until = Instant::now() + DEADLINE;
    loop {
        let rows = outbox_rows(&db.test).await;
        if rows == 0 {
            return;
        }
        if Instant::now() >= until {
            let left: Vec<(i64, uuid::Uuid, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "select sequence, event_id, partition_key from {} order by sequence limit 5",
                    db.test.table("outbox")
                )))
                .fetch_all(&db.test.pool)
                .await
                .unwrap();
            let received = rabbit.received();
            let left: Vec<String> = left
                .into_iter()
                .map(|(sequence, id, key)| {
                    let id = id.to_string();
                    let deliveries = received.iter().filter(|m| m.message_id == id).count();
                    format!("#{sequence} {key} delivered {deliveries}x")
                })
                .collect();
            panic!(
                "{rows} rows still in the outbox after {DEADLINE:?}, first {left:?}; slot confirmed at \
                 {:?}, server WAL at {}, {} of {} messages distinct",
                db.slot_confirmed().await,
                db.current_wal_lsn().await,
                rabbit.distinct(),
                received.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per key (partition key `item:k<i>`), every counter value `1..=n` arrived, and nothing else.
fn assert_complete(received: &[Received], expected: &HashMap<String, i64>) {
    let mut per_key: HashMap<&str, HashSet<i64>> = HashMap::new();
    for message in received {
        per_key
            .entry(key_of(message))
            .or_default()
            .insert(n_of(message));
    }
    let expected_keys = expected.values().filter(|&&n| n > 0).count();
    assert_eq!(per_key.len(), expected_keys, "keys that received events");
    for (key, &n) in expected.iter().filter(|(_, n)| **n > 0) {
        let got = per_key
            .get(key.as_str())
            .unwrap_or_else(|| panic!("nothing arrived for key {key}"));
        let want: HashSet<i64> = (1..=n).collect();
        let missing: Vec<i64> = want.difference(got).copied().take(10).collect();
        assert!(missing.is_empty(), "key {key} is missing n = {missing:?}");
        assert_eq!(
            got.len() as i64,
            n,
            "key {key} got unexpected counter values"
        );
    }
}

/// Writes events `item.changed` on keys `item:k0 .. item:k<keys-1>`, round robin,
/// each with the key's next counter value `n`: per key, `n` is the commit order.
struct KeyedWriter {
    outbox: Outbox,
    keys: usize,
    next: usize,
    n_by_key: Vec<i64>,
}

impl KeyedWriter {
    fn new(test: &TestSchema, keys: usize) -> Self {
        KeyedWriter {
            outbox: outbox_for(test),
            keys,
            next: 0,
            n_by_key: vec![0; keys],
        }
    }

    fn events(&mut self, count: usize) -> Vec<Event> {
        (0..count)
            .map(|_| {
                let key = self.next % self.keys;
                self.next += 1;
                self.n_by_key[key] += 1;
                Event::builder("item", format!("k{key}"), "item.changed")
                    .payload(&serde_json::json!({ "n": self.n_by_key[key] }))
                    .without_trace_context()
                    .build()
                    .unwrap()
            })
            .collect()
    }

    /// `count` events, `per_transaction` to a transaction (one multi-row insert each).
    async fn write(&mut self, test: &TestSchema, count: usize, per_transaction: usize) {
        self.write_to(&test.pool, count, per_transaction).await;
    }

    /// [`KeyedWriter::write`] in a background task, so a relay can be killed
    /// while the stream still has work; the task hands the writer back.
    fn write_in_background(
        mut self,
        test: &TestSchema,
        count: usize,
        per_transaction: usize,
    ) -> tokio::task::JoinHandle<KeyedWriter> {
        let pool = test.pool.clone();
        tokio::spawn(async move {
            self.write_to(&pool, count, per_transaction).await;
            self
        })
    }

    async fn write_to(&mut self, pool: &sqlx::PgPool, count: usize, per_transaction: usize) {
        let mut left = count;
        while left > 0 {
            let events = self.events(left.min(per_transaction));
            left -= events.len();
            let mut tx = pool.begin().await.unwrap();
            self.outbox.enqueue_all(&mut tx, &events).await.unwrap();
            tx.commit().await.unwrap();
        }
    }

    /// The highest counter value written per partition key.
    fn expected(&self) -> HashMap<String, i64> {
        self.n_by_key
            .iter()
            .enumerate()
            .map(|(key, &n)| (format!("item:k{key}"), n))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_events_are_never_published_and_committed_ones_arrive_with_their_properties() {
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let outbox = outbox_for(&db.test);
    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    wait_streaming(&db).await;

    let rolled_back = Event::builder("order", "1", "order.placed")
        .build()
        .unwrap();
    let mut tx = db.test.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &rolled_back).await.unwrap();
    tx.rollback().await.unwrap();

    let committed = outbox_tests::amqp::detailed_order_event();
    let mut tx = db.test.pool.begin().await.unwrap();
    let enqueued = outbox.enqueue(&mut tx, &committed).await.unwrap();
    tx.commit().await.unwrap();
    // Committed after both: once it is in, anything the rollback could have produced would be too.
    let marker = Event::builder("order", "3", "order.marker")
        .build()
        .unwrap();
    outbox
        .enqueue(&mut db.test.pool.acquire().await.unwrap(), &marker)
        .await
        .unwrap();

    wait_delivered(&rabbit, &db, 2, DEADLINE).await;
    // Rows are deleted once their transactions are confirmed.
    wait_settled(&rabbit, &db).await;
    let summary = relay.stop().await;
    assert_eq!(summary.published, 2);

    let received = rabbit.received();
    let ids: HashSet<&str> = received.iter().map(|m| m.message_id.as_str()).collect();
    assert!(
        !ids.contains(rolled_back.id().to_string().as_str()),
        "rolled-back event was published"
    );
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(marker.id().to_string().as_str()));
    assert_eq!(received.len(), 2, "no duplicates without failures");

    let message = received
        .iter()
        .find(|m| m.message_id == committed.id().to_string())
        .unwrap();
    outbox_tests::amqp::assert_detailed_order_message(message, &committed, enqueued.sequence);
    db.cleanup().await;
}

/// 8 writers, 20,000 events over 200 keys while the relay streams; each transaction
/// bumps its key's counter row, sleeps a random few ms and commits. Per key, first
/// deliveries must follow the counter (commit order), and the slot moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_events_arrive_complete_and_in_commit_order_per_key() {
    const WRITERS: usize = 8;
    const EVENTS: usize = 20_000;
    const KEYS: usize = 200;
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let counters = outbox_tests::load::create_counters(&db.test, KEYS).await;
    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    wait_streaming(&db).await;
    let confirmed_at_start = db.slot_confirmed().await.unwrap();

    let started = Instant::now();
    outbox_tests::load::run_counter_writers(&db.test, &counters, WRITERS, EVENTS, KEYS).await;
    let written_at = db.current_wal_lsn().await;
    wait_delivered(&rabbit, &db, EVENTS, Duration::from_secs(55)).await;
    eprintln!(
        "{EVENTS} events written and delivered in {:?}",
        started.elapsed()
    );
    wait_settled(&rabbit, &db).await;
    // Every outbox transaction ended at or before `written_at`: once they are all
    // confirmed (and the outbox is idle), the slot's position passes it.
    let until = Instant::now() + DEADLINE;
    loop {
        let confirmed = db.slot_confirmed().await;
        if confirmed.is_some_and(|lsn| lsn >= written_at) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the slot's confirmed_flush_lsn {confirmed:?} did not pass {written_at} (the WAL \
             position after the last outbox commit) within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let summary = relay.stop().await;

    let received = rabbit.received();
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    let expected: HashMap<String, i64> = sqlx::query_as::<_, (i32, i64)>(sqlx::AssertSqlSafe(
        format!("select key, n from {counters}"),
    ))
    .fetch_all(&db.test.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(key, n)| (format!("item:k{key}"), n))
    .collect();
    assert_eq!(expected.values().sum::<i64>() as usize, EVENTS);
    assert_complete(&received, &expected);
    assert_eq!(summary.published as usize, EVENTS);
    assert_eq!(received.len(), EVENTS, "no duplicates without failures");
    let confirmed = db.slot_confirmed().await.unwrap();
    assert!(
        confirmed > confirmed_at_start,
        "slot confirmed {confirmed}, started at {confirmed_at_start}"
    );
    db.cleanup().await;
}

/// Rows committed before the slot exists are not in its stream: the first start
/// publishes them from the table, then streams what comes after, per key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_before_the_slot_exists_are_published_from_the_table_then_the_stream() {
    const BEFORE: usize = 3_000;
    const AFTER: usize = 1_000;
    const KEYS: usize = 30;
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut writer = KeyedWriter::new(&db.test, KEYS);
    writer.write(&db.test, BEFORE, 500).await;
    assert_eq!(
        db.slot_confirmed().await,
        None,
        "no slot before the first start"
    );
    let before_ids: HashSet<String> = {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select event_id from {}",
            db.test.table("outbox")
        )))
        .fetch_all(&db.test.pool)
        .await
        .unwrap();
        ids.into_iter().map(|id| id.to_string()).collect()
    };
    assert_eq!(before_ids.len(), BEFORE);

    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    // Write the rest as soon as the slot exists, while the table drain runs.
    wait_until("the relay creates the slot", DEADLINE, || async {
        db.slot_confirmed().await.is_some()
    })
    .await;
    writer.write(&db.test, AFTER, 50).await;

    wait_delivered(&rabbit, &db, BEFORE + AFTER, DELIVERY_DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    relay.stop().await;

    let received = rabbit.received();
    assert_complete(&received, &writer.expected());
    // Per key, n continues across the drain and the stream: the drained rows came first.
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    assert!(
        before_ids.contains(&received[0].message_id),
        "the first message published is a row from the table drain"
    );
    // Rows committed after the slot's start but before the drain's high-water mark
    // may come from both; nothing else is sent twice.
    let duplicates = duplicates(&received);
    assert!(
        duplicates <= AFTER,
        "{duplicates} duplicates, more than the {AFTER} rows written during the drain"
    );
    db.cleanup().await;
}

/// Killed like `kill -9` after >= 1,000 of 6,000 streamed events were delivered; a
/// new relay resumes from the confirmed position (waiting out the dead one's slot
/// session) and re-sends at most the unconfirmed tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_stream_and_restarted_resumes_from_the_confirmed_position() {
    const EVENTS: usize = 6_000;
    const KEYS: usize = 50;
    const IN_FLIGHT: usize = 200;
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut raw = db.raw_config(&rabbit.exchange);
    raw.wal.as_mut().unwrap().max_in_flight_events = Some(IN_FLIGHT);

    let first = RunningRelay::start(raw.clone().validate().unwrap());
    wait_streaming(&db).await;
    let writing = KeyedWriter::new(&db.test, KEYS).write_in_background(&db.test, EVENTS, 100);
    wait_delivered(&rabbit, &db, 1_000, DELIVERY_DEADLINE).await;
    first.kill();
    let at_kill = rabbit.distinct();
    assert!(at_kill < EVENTS, "the kill must happen mid-stream");
    let writer = writing.await.unwrap();

    // Started at once: the WAL source waits for the dead relay's walsender to go.
    let started = Instant::now();
    let second = RunningRelay::start(raw.validate().unwrap());
    wait_delivered(&rabbit, &db, EVENTS, DELIVERY_DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    eprintln!(
        "killed at {at_kill} delivered; the rest arrived {:?} after the restart",
        started.elapsed()
    );
    second.stop().await;

    let received = rabbit.received();
    assert_complete(&received, &writer.expected());
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    // Re-sent: what was in flight, plus what was confirmed locally but not yet
    // reported to the server (one status interval, 100 ms) when the relay died.
    let duplicates = duplicates(&received);
    eprintln!("{duplicates} duplicates after the kill");
    assert!(
        duplicates <= 2_000,
        "{duplicates} duplicates: far more than the unconfirmed tail at the kill"
    );
    db.cleanup().await;
}

/// One transaction of 10,000 events over 100 keys is confirmed only as a whole:
/// killed part-way through, the next relay sends it again, complete and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_inside_a_ten_thousand_event_transaction_resends_it_whole() {
    const EVENTS: usize = 10_000;
    const KEYS: usize = 100;
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut raw = db.raw_config(&rabbit.exchange);
    raw.rabbitmq.as_mut().unwrap().app_id = Some("relay-1".into());
    let first = RunningRelay::start(raw.clone().validate().unwrap());
    wait_streaming(&db).await;
    let confirmed_before = db.slot_confirmed().await.unwrap();

    let mut writer = KeyedWriter::new(&db.test, KEYS);
    writer.write(&db.test, EVENTS, EVENTS).await;
    wait_delivered(&rabbit, &db, 1, DELIVERY_DEADLINE).await;
    first.kill();
    let at_kill = rabbit.distinct();
    assert!(
        at_kill < EVENTS,
        "the kill must happen inside the transaction"
    );
    // The transaction was not confirmed, so its rows are all still there.
    assert_eq!(outbox_rows(&db.test).await as usize, EVENTS);
    db.wait_slot_inactive().await;
    let confirmed = db.slot_confirmed().await.unwrap();
    assert!(
        confirmed >= confirmed_before,
        "the slot never moves back ({confirmed} < {confirmed_before})"
    );

    raw.rabbitmq.as_mut().unwrap().app_id = Some("relay-2".into());
    let second = RunningRelay::start(raw.validate().unwrap());
    wait_delivered(&rabbit, &db, EVENTS, DELIVERY_DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    let summary = second.stop().await;

    let received = rabbit.received();
    eprintln!(
        "killed at {at_kill} delivered; {} deliveries in all",
        received.len()
    );
    assert_complete(&received, &writer.expected());
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    // The second relay sent the unconfirmed transaction again, whole, once.
    let again: Vec<&Received> = received
        .iter()
        .filter(|m| m.app_id.as_deref() == Some("relay-2"))
        .collect();
    let again_ids: HashSet<&str> = again.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(
        again_ids.len(),
        EVENTS,
        "the whole transaction is sent again"
    );
    assert_eq!(again.len(), EVENTS, "and only once");
    assert_eq!(summary.published as usize, EVENTS);
    db.cleanup().await;
}

/// The slot is dropped while the relay is stopped, with unpublished rows written
/// before and after: the next start does not silently stream from a new slot; it
/// re-creates it and publishes every row still in the table first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_while_stopped_is_recovered_from_the_table_without_loss() {
    const KEYS: usize = 20;
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let raw = db.raw_config(&rabbit.exchange);
    let mut writer = KeyedWriter::new(&db.test, KEYS);

    let first = RunningRelay::start(raw.clone().validate().unwrap());
    wait_streaming(&db).await;
    writer.write(&db.test, 500, 50).await;
    wait_delivered(&rabbit, &db, 500, DELIVERY_DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    first.stop().await;
    db.wait_slot_inactive().await;

    // Written while the slot exists but nobody streams, then the slot goes, then more.
    writer.write(&db.test, 500, 50).await;
    db.drop_slot().await;
    writer.write(&db.test, 500, 50).await;
    assert_eq!(db.slot_confirmed().await, None);
    assert_eq!(outbox_rows(&db.test).await, 1_000);

    let second = RunningRelay::start(raw.validate().unwrap());
    wait_delivered(&rabbit, &db, 1_500, DELIVERY_DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    assert!(
        db.slot_confirmed().await.is_some(),
        "the slot was re-created"
    );
    // And the re-created slot streams.
    wait_streaming(&db).await;
    writer.write(&db.test, 500, 50).await;
    wait_delivered(&rabbit, &db, 2_000, DELIVERY_DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    second.stop().await;

    let received = rabbit.received();
    assert_complete(&received, &writer.expected());
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    let duplicates = duplicates(&received);
    assert!(
        duplicates <= 1_000,
        "{duplicates} duplicates: more than the rows recovered from the table"
    );
    db.cleanup().await;
}

/// Events written with `wal_message::emit` (no table row) reach the broker iff
/// their transaction commits; per key in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_message_events_are_published_iff_committed_and_never_touch_the_outbox_table() {
    const KEYS: usize = 4;
    const TRANSACTIONS: usize = 10;
    const PER_TRANSACTION: usize = 20;
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    // wal-message events written while no slot exists are never seen.
    wait_streaming(&db).await;

    let emit = async |conn: &mut sqlx::PgConnection, event: &Event| {
        wal_message::emit(
            conn,
            wal_message::DEFAULT_PREFIX,
            event,
            outbox_core::writer::DEFAULT_MAX_PAYLOAD_BYTES,
        )
        .await
        .unwrap();
    };
    let mut n_by_key = [0_i64; KEYS];
    let mut committed = Vec::new();
    let mut rolled_back = Vec::new();
    for t in 0..TRANSACTIONS {
        let mut tx = db.test.pool.begin().await.unwrap();
        for i in 0..PER_TRANSACTION {
            let key = (t + i) % KEYS;
            n_by_key[key] += 1;
            let event = Event::builder("item", format!("k{key}"), "item.changed")
                .payload(&serde_json::json!({ "n": n_by_key[key] }))
                .header("schema-version", "7")
                .without_trace_context()
                .build()
                .unwrap();
            emit(&mut tx, &event).await;
            committed.push(event);
        }
        tx.commit().await.unwrap();
        if t == TRANSACTIONS / 2 {
            let mut tx = db.test.pool.begin().await.unwrap();
            let event = Event::builder("item", "k0", "item.changed")
                .payload(&serde_json::json!({ "n": -1 }))
                .build()
                .unwrap();
            emit(&mut tx, &event).await;
            rolled_back.push(event);
            tx.rollback().await.unwrap();
        }
        assert_eq!(outbox_rows(&db.test).await, 0);
    }
    // One more rolled back at the end, then a committed marker after it.
    let mut tx = db.test.pool.begin().await.unwrap();
    let event = Event::builder("item", "k1", "item.changed")
        .payload(&serde_json::json!({ "n": -2 }))
        .build()
        .unwrap();
    emit(&mut tx, &event).await;
    rolled_back.push(event);
    tx.rollback().await.unwrap();
    let marker = Event::builder("marker", "m", "marker.done")
        .payload(&serde_json::json!({ "n": 1 }))
        .build()
        .unwrap();
    emit(&mut *db.test.pool.acquire().await.unwrap(), &marker).await;

    wait_delivered(&rabbit, &db, committed.len() + 1, DEADLINE).await;
    // The marker is last in commit order; wait for its transaction's confirm to settle.
    wait_until("the slot confirms past the marker", DEADLINE, {
        let written = db.current_wal_lsn().await;
        let db = &db;
        move || async move { db.slot_confirmed().await.is_some_and(|lsn| lsn >= written) }
    })
    .await;
    let summary = relay.stop().await;
    assert_eq!(summary.published as usize, committed.len() + 1);

    let received = rabbit.received();
    let ids: HashSet<&str> = received.iter().map(|m| m.message_id.as_str()).collect();
    for event in &rolled_back {
        assert!(
            !ids.contains(event.id().to_string().as_str()),
            "a rolled-back wal-message event was published"
        );
    }
    assert_eq!(ids.len(), committed.len() + 1);
    assert_eq!(received.len(), committed.len() + 1, "no duplicates");
    let expected: HashMap<String, i64> = n_by_key
        .iter()
        .enumerate()
        .map(|(key, &n)| (format!("item:k{key}"), n))
        .chain([("marker:m".to_owned(), 1)])
        .collect();
    assert_complete(&received, &expected);
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    // The position on the wire (the message's LSN) increases per key too.
    let position = |m: &Received| m.header("outbox-sequence").unwrap().parse::<i64>().unwrap();
    assert_eq!(first_delivery_order_violations(&received, position), 0);

    let first = &committed[0];
    let message = received
        .iter()
        .find(|m| m.message_id == first.id().to_string())
        .unwrap();
    assert_eq!(message.routing_key, "item.changed");
    assert_eq!(message.json(), serde_json::json!({ "n": 1 }));
    assert_eq!(message.header("schema-version"), Some("7"));
    assert_eq!(message.header("outbox-partition-key"), Some("item:k0"));
    let created_at =
        chrono::DateTime::parse_from_rfc3339(message.header("outbox-created-at").unwrap()).unwrap();
    assert_eq!(created_at, first.created_at());

    // No outbox row ever existed: the identity sequence of `outbox` was never used.
    let last_value: Option<i64> = sqlx::query_scalar(
        "select pg_sequence_last_value(pg_get_serial_sequence($1, 'sequence')::regclass)",
    )
    .bind(db.test.table("outbox"))
    .fetch_one(&db.test.pool)
    .await
    .unwrap();
    assert_eq!(last_value, None, "an outbox row was inserted at some point");
    db.cleanup().await;
}

/// With the outbox idle and another table busy, the slot's confirmed position
/// keeps moving past the last outbox event, so the slot does not pin WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_outbox_with_other_writes_lets_the_slot_advance() {
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let relay = RunningRelay::start(db.raw_config(&rabbit.exchange).validate().unwrap());
    wait_streaming(&db).await;
    let mut writer = KeyedWriter::new(&db.test, 5);
    writer.write(&db.test, 50, 10).await;
    wait_delivered(&rabbit, &db, 50, DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    let after_last_event = db.current_wal_lsn().await;

    let started = Instant::now();
    let until = started + DEADLINE;
    loop {
        db.write_other(100).await;
        let confirmed = db.slot_confirmed().await.unwrap();
        if confirmed > after_last_event {
            eprintln!(
                "slot confirmed {confirmed} > {after_last_event} after {:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < until,
            "the slot stayed at {confirmed}, not past {after_last_event} (the LSN after the last \
             outbox event), with {DEADLINE:?} of writes to public.other"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    let received = rabbit.received();
    assert_complete(&received, &writer.expected());
    assert_eq!(received.len(), 50);
    db.cleanup().await;
}

/// Two relays on one slot: A leads, B waits. A is killed mid-stream; B takes the
/// leader lock, waits for A's walsender to go and finishes the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leader_is_killed_and_loses_nothing() {
    const EVENTS: usize = 6_000;
    const KEYS: usize = 60;
    init_tracing();
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut a = db.raw_config(&rabbit.exchange);
    a.instance.id = Some("relay-a".into());
    a.rabbitmq.as_mut().unwrap().app_id = Some("relay-a".into());
    a.wal.as_mut().unwrap().max_in_flight_events = Some(200);
    let mut b = a.clone();
    b.instance.id = Some("relay-b".into());
    b.rabbitmq.as_mut().unwrap().app_id = Some("relay-b".into());

    let relay_a = RunningRelay::start(a.validate().unwrap());
    wait_streaming(&db).await;
    let relay_b = RunningRelay::start(b.validate().unwrap());

    let writing = KeyedWriter::new(&db.test, KEYS).write_in_background(&db.test, EVENTS, 100);
    wait_delivered(&rabbit, &db, 1_000, DELIVERY_DEADLINE).await;
    relay_a.kill();
    let at_kill = rabbit.distinct();
    assert!(at_kill < EVENTS, "the kill must happen mid-stream");
    let writer = writing.await.unwrap();

    let started = Instant::now();
    wait_delivered(&rabbit, &db, EVENTS, DELIVERY_DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    eprintln!(
        "leader killed at {at_kill} delivered; the standby finished {:?} later",
        started.elapsed()
    );
    relay_b.stop().await;

    let received = rabbit.received();
    let publishers: HashSet<&str> = received
        .iter()
        .filter_map(|m| m.app_id.as_deref())
        .collect();
    assert!(
        publishers.contains("relay-b"),
        "the standby took over: {publishers:?}"
    );
    assert_complete(&received, &writer.expected());
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    let duplicates = duplicates(&received);
    eprintln!("{duplicates} duplicates after the failover");
    assert!(
        duplicates <= 2_000,
        "{duplicates} duplicates: far more than the unconfirmed tail at the kill"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_event_is_retried_then_dead_lettered_with_the_reason_while_others_flow() {
    init_tracing();
    let db = WalDatabase::new().await;
    // Only `ok.*` routing keys reach the queue: `lost.*` events are unroutable.
    let rabbit = RabbitFixture::with_binding("ok.#").await;
    let mut raw = db.raw_config(&rabbit.exchange);
    raw.pipeline.max_attempts = Some(3);
    let relay = RunningRelay::start(raw.validate().unwrap());
    wait_streaming(&db).await;

    let outbox = outbox_for(&db.test);
    let poison = Event::builder("doc", "1", "lost.event").build().unwrap();
    let mut events = vec![
        Event::builder("doc", "1", "ok.before")
            .payload(&serde_json::json!({"n": 1}))
            .build()
            .unwrap(),
        poison.clone(),
        Event::builder("doc", "1", "ok.after")
            .payload(&serde_json::json!({"n": 3}))
            .build()
            .unwrap(),
    ];
    for i in 0..200 {
        events.push(
            Event::builder("other", i.to_string(), "ok.flow")
                .payload(&serde_json::json!({"n": i}))
                .build()
                .unwrap(),
        );
    }
    outbox
        .enqueue_all(&mut db.test.pool.acquire().await.unwrap(), &events)
        .await
        .unwrap();

    // Everything else arrives, including the poison's successor on its own key.
    wait_delivered(&rabbit, &db, events.len() - 1, DEADLINE).await;
    wait_settled(&rabbit, &db).await;
    let summary = relay.stop().await;
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(summary.published as usize, events.len() - 1);

    let received = rabbit.received();
    assert!(
        received
            .iter()
            .all(|m| m.message_id != poison.id().to_string())
    );
    let doc_order: Vec<&str> = received
        .iter()
        .filter(|m| m.header("outbox-partition-key") == Some("doc:1"))
        .map(|m| m.routing_key.as_str())
        .collect();
    assert_eq!(doc_order, ["ok.before", "ok.after"]);
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);

    let (event_id, attempts, last_error): (uuid::Uuid, i32, String) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select event_id, attempts, last_error from {}",
            db.test.table("outbox_dead_letter")
        )))
        .fetch_one(&db.test.pool)
        .await
        .unwrap();
    assert_eq!(event_id, *poison.id().as_uuid());
    assert_eq!(attempts, 3);
    assert!(last_error.contains("unroutable"), "{last_error}");
    assert_eq!(outbox_rows(&db.test).await, 0);
    db.cleanup().await;
}

/// A relay configuration with `source = "wal"`, no I/O needed to validate it.
fn wal_config(poison_policy: &str) -> RawConfig {
    RawConfig {
        sink: Some("rabbitmq".into()),
        source: Some("wal".into()),
        database: RawDatabase {
            url: Some("postgres://postgres@127.0.0.1:5432/postgres".into()),
            ..Default::default()
        },
        pipeline: RawPipeline {
            poison_policy: Some(poison_policy.into()),
            ..Default::default()
        },
        rabbitmq: Some(RawRabbitMq {
            url: Some("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            exchange: Some("events".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn block_poison_policy_is_refused_with_the_wal_source() {
    let error = wal_config("block").validate().unwrap_err();
    assert_eq!(error.field, "pipeline.poison_policy");
    assert!(error.fix.contains("skip"), "{}", error.fix);
    assert!(wal_config("skip").validate().is_ok());
}
