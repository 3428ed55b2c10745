//! The WAL source against real PostgreSQL (`wal_level = logical`): commit order,
//! atomicity (G1), nothing lost across confirm and restart (G2), an idle outbox
//! does not pin WAL (G6), slot loss is reported instead of papered over, and
//! misconfiguration errors name the fix.
//!
//! Every test owns a database `wal_test_<id>` with its own slot and publication
//! (slots and publications are per database; slot names per cluster), and drops
//! the slot and the database at the end, also when it fails.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::Duration;

use chrono::{TimeZone, Utc};
use outbox_core::{Enqueued, Event, EventId, Outbox, OutboxConfig, SchemaName, wal_message};
use outbox_relay::RelayError;
use outbox_relay::event::OutboxEvent;
use outbox_relay::source::wal::{
    Lsn, SlotLossReason, Undecodable, WalError, WalSource, WalSourceConfig, WalStart,
    WalTransaction,
};
use outbox_tests::wal::{drop_database, drop_database_blocking};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool};
use tokio::time::Instant;

/// Longest wait for anything the server should do promptly.
const DEADLINE: Duration = Duration::from_secs(30);

fn server_options() -> PgConnectOptions {
    outbox_tests::server_url()
        .parse::<PgConnectOptions>()
        .unwrap()
        .disable_statement_logging()
}

/// A database of one test, with a migrated outbox schema; see the module docs.
struct WalDb {
    name: String,
    url: String,
    pool: PgPool,
    schema: SchemaName,
    slot: String,
    publication: String,
    cleaned: bool,
}

impl WalDb {
    async fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("wal_test_{}", &id[..16]);
        let mut admin = PgConnection::connect_with(&server_options().database("postgres"))
            .await
            .expect("PostgreSQL must be running: start it with scripts/dev-services");
        sqlx::raw_sql(AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        let options = server_options().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(DEADLINE)
            .connect_with(options.clone())
            .await
            .unwrap();
        let schema = SchemaName::default();
        outbox_core::migrate(&pool, &schema).await.unwrap();
        sqlx::query("create table public.other (id bigserial primary key, note text not null)")
            .execute(&pool)
            .await
            .unwrap();
        WalDb {
            url: options.to_url_lossy().to_string(),
            slot: name.clone(),
            name,
            pool,
            schema,
            publication: "outbox_pub".to_owned(),
            cleaned: false,
        }
    }

    fn config(&self) -> WalSourceConfig {
        let mut config = WalSourceConfig::new(
            self.url.clone(),
            self.schema.clone(),
            self.slot.clone(),
            self.publication.clone(),
        );
        config.status_interval = Duration::from_millis(100);
        config.connect_timeout = Duration::from_secs(10);
        config.slot_busy_timeout = DEADLINE;
        config
    }

    fn outbox(&self) -> Outbox {
        Outbox::new(OutboxConfig {
            schema: self.schema.clone(),
            ..OutboxConfig::default()
        })
    }

    async fn start(&self) -> WalSource {
        match WalSource::start(self.config()).await.unwrap() {
            WalStart::Ready(source) => source,
            WalStart::SlotLost(lost) => panic!("unexpected slot loss: {lost:?}"),
        }
    }

    /// The slot's `confirmed_flush_lsn`, or `None` when the slot does not exist.
    async fn slot_confirmed(&self) -> Option<Lsn> {
        let lsn: Option<Option<String>> = sqlx::query_scalar(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&self.pool)
        .await
        .unwrap();
        lsn.map(|lsn| lsn.unwrap().parse().unwrap())
    }

    /// Whether a session streams from the slot now.
    async fn slot_active(&self) -> bool {
        sqlx::query_scalar(
            "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn current_wal_lsn(&self) -> Lsn {
        let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        lsn.parse().unwrap()
    }

    async fn write_other(&self, rows: i64) {
        sqlx::query(
            "insert into public.other (note) select 'x' || g from generate_series(1, $1) g",
        )
        .bind(rows)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn cleanup(mut self) {
        self.pool.close().await;
        drop_database(&self.name).await;
        self.cleaned = true;
    }
}

impl Drop for WalDb {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // The test failed: clean up from a runtime of our own.
        drop_database_blocking(&self.name);
    }
}

/// The next transaction, within the deadline.
async fn next(source: &mut WalSource) -> WalTransaction {
    tokio::time::timeout(DEADLINE, source.next_transaction())
        .await
        .expect("a transaction within the deadline")
        .unwrap()
        .expect("the stream is open")
}

fn event(aggregate_id: &str) -> Event {
    Event::builder("order", aggregate_id, "order.placed")
        .payload(&serde_json::json!({ "id": aggregate_id, "lines": [1, 2, 3] }))
        .without_trace_context()
        .build()
        .unwrap()
}

fn detailed_event(aggregate_id: &str) -> Event {
    Event::builder("order", aggregate_id, "order.shipped")
        .payload(&serde_json::json!({
            "order_id": aggregate_id,
            "note": "quote \" and unicode é ✓",
            "total": 19.99,
            "gift": null
        }))
        .header("schema-version", "2")
        .header("tenant.id", "acme")
        .partition_key(format!("customer:{aggregate_id}"))
        .destination("orders-exchange")
        .created_at(
            Utc.with_ymd_and_hms(2026, 11, 23, 10, 30, 15).unwrap()
                + chrono::TimeDelta::microseconds(123_456),
        )
        .without_trace_context()
        .build()
        .unwrap()
}

/// `got` carries every field of `want` as written, at outbox position `sequence`.
fn assert_same(got: &OutboxEvent, want: &Event, sequence: i64) {
    assert_eq!(got.sequence, sequence);
    assert_eq!(got.event_id, want.id());
    assert_eq!(got.aggregate_type, want.aggregate_type());
    assert_eq!(got.aggregate_id, want.aggregate_id());
    assert_eq!(got.event_type, want.event_type());
    assert_eq!(got.partition_key, want.partition_key());
    assert_eq!(got.destination.as_deref(), want.destination());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&got.payload).unwrap(),
        *want.payload()
    );
    assert_eq!(got.headers, *want.headers());
    assert_eq!(got.created_at, want.created_at());
    assert_eq!(got.attempts, 0);
}

fn ids(transaction: &WalTransaction) -> Vec<EventId> {
    transaction.events.iter().map(|e| e.event_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transactions_arrive_whole_in_commit_order_and_rolled_back_never() {
    let db = WalDb::new().await;
    let mut source = db.start().await;
    assert!(source.created_slot(), "the first start creates the slot");
    let outbox = db.outbox();

    // A enqueues first but commits after B: commit order is B, A.
    let a = [detailed_event("a1"), event("a2")];
    let mut tx_a = db.pool.begin().await.unwrap();
    let enq_a: Vec<Enqueued> = outbox.enqueue_all(&mut tx_a, &a).await.unwrap();
    let b = detailed_event("b1");
    let mut tx_b = db.pool.begin().await.unwrap();
    let enq_b = outbox.enqueue(&mut tx_b, &b).await.unwrap();
    let rolled_back = event("r1");
    let mut tx_r = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx_r, &rolled_back).await.unwrap();
    tx_r.rollback().await.unwrap();
    tx_b.commit().await.unwrap();
    tx_a.commit().await.unwrap();
    // C also writes another table, which is not published.
    let c = [event("c1"), detailed_event("c2"), event("c3")];
    let mut tx_c = db.pool.begin().await.unwrap();
    sqlx::query("insert into public.other (note) values ('business change')")
        .execute(&mut *tx_c)
        .await
        .unwrap();
    let enq_c = outbox.enqueue_all(&mut tx_c, &c).await.unwrap();
    tx_c.commit().await.unwrap();

    let first = next(&mut source).await;
    let second = next(&mut source).await;
    let third = next(&mut source).await;

    assert_eq!(first.events.len(), 1);
    assert_same(&first.events[0], &b, enq_b.sequence);
    assert_eq!(second.events.len(), 2);
    for ((got, want), enqueued) in second.events.iter().zip(&a).zip(&enq_a) {
        assert_same(got, want, enqueued.sequence);
    }
    assert_eq!(third.events.len(), 3);
    for ((got, want), enqueued) in third.events.iter().zip(&c).zip(&enq_c) {
        assert_same(got, want, enqueued.sequence);
    }
    // The rolled back event would have come before C, which committed after it.
    for transaction in [&first, &second, &third] {
        assert!(!ids(transaction).contains(&rolled_back.id()));
        assert_eq!(
            transaction.row_sequences,
            transaction
                .events
                .iter()
                .map(|e| e.sequence)
                .collect::<Vec<_>>()
        );
        assert!(transaction.commit_lsn < transaction.end_lsn);
    }
    assert!(first.end_lsn <= second.commit_lsn && second.end_lsn <= third.commit_lsn);

    source.shutdown().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_message_events_arrive_and_a_rolled_back_emit_does_not() {
    let db = WalDb::new().await;
    let mut source = db.start().await;
    let max = outbox_core::writer::DEFAULT_MAX_PAYLOAD_BYTES;

    // One transaction mixing both modes, in write order: message, row, message.
    let (m1, row, m2) = (detailed_event("m1"), event("t1"), event("m2"));
    let mut tx = db.pool.begin().await.unwrap();
    wal_message::emit(&mut tx, wal_message::DEFAULT_PREFIX, &m1, max)
        .await
        .unwrap();
    let enq_row = db.outbox().enqueue(&mut tx, &row).await.unwrap();
    wal_message::emit(&mut tx, wal_message::DEFAULT_PREFIX, &m2, max)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rolled_back = event("m3");
    let mut tx = db.pool.begin().await.unwrap();
    wal_message::emit(&mut tx, wal_message::DEFAULT_PREFIX, &rolled_back, max)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // Neither other prefixes nor non-transactional messages are events.
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("select pg_logical_emit_message(true, 'someone-else', 'x')")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("select pg_logical_emit_message(false, 'outbox', 'not an event')")
        .execute(&mut *conn)
        .await
        .unwrap();
    // Outside an explicit transaction the emit commits on its own.
    let last = event("m4");
    wal_message::emit(&mut conn, wal_message::DEFAULT_PREFIX, &last, max)
        .await
        .unwrap();
    drop(conn);

    let mixed = next(&mut source).await;
    assert_eq!(ids(&mixed), vec![m1.id(), row.id(), m2.id()]);
    assert_same(&mixed.events[1], &row, enq_row.sequence);
    assert_eq!(mixed.row_sequences, vec![enq_row.sequence]);
    // A message event's position is the (end) LSN of its record: increasing inside the
    // transaction, and not beyond its commit record.
    let (s1, s2) = (mixed.events[0].sequence, mixed.events[2].sequence);
    assert_same(&mixed.events[0], &m1, s1);
    assert_same(&mixed.events[2], &m2, s2);
    let commit = mixed.commit_lsn.to_i64().unwrap();
    assert!(0 < s1 && s1 < s2 && s2 <= commit, "{s1} {s2} {commit}");

    let alone = next(&mut source).await;
    assert_eq!(
        ids(&alone),
        vec![last.id()],
        "the rolled back emit must not appear"
    );
    assert!(alone.row_sequences.is_empty());
    assert!(alone.events[0].sequence > mixed.end_lsn.to_i64().unwrap());

    let rows: i64 = sqlx::query_scalar("select count(*) from outbox.outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "wal-message mode leaves no rows behind");

    // A message with the outbox prefix that is no event never stops the stream: it
    // comes in its transaction as undecodable (never skipped silently), with its raw
    // content; unconfirmed, it comes again after a reconnect.
    source.confirm(alone.end_lsn);
    sqlx::query("select pg_logical_emit_message(true, 'outbox', 'not an event')")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut seen_at = Vec::new();
    for _ in 0..2 {
        let transaction = tokio::time::timeout(DEADLINE, source.next_transaction())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(transaction.events.is_empty());
        match transaction.undecodable.as_slice() {
            [Undecodable::Message(message)] => {
                assert!(
                    message.reason.contains("not a valid outbox event"),
                    "{}",
                    message.reason
                );
                assert_eq!(message.content, b"not an event");
                assert_eq!(message.prefix, "outbox");
                seen_at.push(message.lsn);
            }
            other => panic!("expected one malformed message, got {other:?}"),
        }
        tokio::time::timeout(DEADLINE, source.reconnect())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(seen_at[0], seen_at[1]);

    source.shutdown().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_thousand_event_transaction_arrives_complete() {
    const EVENTS: usize = 10_000;
    let db = WalDb::new().await;
    let mut source = db.start().await;
    let events: Vec<Event> = (0..EVENTS)
        .map(|i| {
            Event::builder("order", format!("o-{}", i % 97), "order.placed")
                .payload(&serde_json::json!({ "i": i, "pad": "p".repeat(200) }))
                .without_trace_context()
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    let enqueued = db.outbox().enqueue_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();

    let began = std::time::Instant::now();
    let transaction = next(&mut source).await;
    let elapsed = began.elapsed();
    eprintln!(
        "{EVENTS} events in one transaction: streamed and decoded in {elapsed:?} ({:.0} events/s)",
        EVENTS as f64 / elapsed.as_secs_f64()
    );

    assert_eq!(transaction.events.len(), EVENTS);
    for ((got, want), enqueued) in transaction.events.iter().zip(&events).zip(&enqueued) {
        assert_eq!(got.event_id, want.id());
        assert_eq!(got.sequence, enqueued.sequence);
    }
    assert!(
        transaction
            .events
            .windows(2)
            .all(|w| w[0].sequence < w[1].sequence)
    );

    // Confirming it moves the slot past the whole transaction.
    source.confirm(transaction.end_lsn);
    assert_eq!(source.shutdown().await.unwrap(), transaction.end_lsn);
    assert!(db.slot_confirmed().await.unwrap() >= transaction.end_lsn);

    db.cleanup().await;
}

/// `next_transaction` is raced against other work in the relay loop; a call cut
/// short (here: by a timeout of a few hundred microseconds, with a status flush
/// due on almost every call) must never lose a transaction it had decoded.
#[tokio::test]
async fn cancelled_calls_lose_no_transaction_even_while_flushing() {
    const TRANSACTIONS: usize = 150;
    let db = WalDb::new().await;
    let mut config = db.config();
    config.status_interval = Duration::from_millis(1);
    let mut source = match WalSource::start(config).await.unwrap() {
        WalStart::Ready(source) => source,
        WalStart::SlotLost(lost) => panic!("unexpected slot loss: {lost:?}"),
    };
    let outbox = db.outbox();
    for i in 0..TRANSACTIONS {
        let mut tx = db.pool.begin().await.unwrap();
        outbox
            .enqueue(&mut tx, &event(&format!("c-{i}")))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let mut received = Vec::new();
    let mut cancelled = 0_usize;
    // Cut calls short for a while: poll a call once to three times, then drop it
    // (a call with a flush due is pending inside the flush's SQL). Then read the
    // rest with plain calls: a lost transaction never comes (the stream moved
    // past it), a slow one does.
    let cutting_until = Instant::now() + Duration::from_secs(10);
    let mut round = 0_usize;
    while received.len() < TRANSACTIONS {
        let outcome = if Instant::now() < cutting_until {
            round += 1;
            let mut call = Box::pin(source.next_transaction());
            let mut outcome = None;
            for _ in 0..=(round % 3) {
                let polled =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
                if let std::task::Poll::Ready(result) = polled {
                    outcome = Some(result);
                    break;
                }
                tokio::task::yield_now().await;
            }
            outcome
        } else {
            match tokio::time::timeout(DEADLINE, source.next_transaction()).await {
                Ok(result) => Some(result),
                Err(_) => break,
            }
        };
        match outcome {
            Some(transaction) => {
                let transaction = transaction.unwrap().expect("the stream is open");
                // Confirming keeps a flush due, so calls are often cut short inside it.
                source.confirm(transaction.end_lsn);
                received.push(transaction);
            }
            None => cancelled += 1,
        }
    }
    eprintln!(
        "{} transactions, {cancelled} calls cancelled",
        received.len()
    );
    assert_eq!(
        received.len(),
        TRANSACTIONS,
        "a cancelled call lost a transaction"
    );
    assert!(
        received.windows(2).all(|w| w[0].end_lsn < w[1].end_lsn),
        "each transaction once, in commit order"
    );
    source.shutdown().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_confirmed_transaction_is_not_resent_and_the_rest_are() {
    let db = WalDb::new().await;
    let mut source = db.start().await;
    let outbox = db.outbox();
    let written = [event("1"), event("2"), event("3")];
    for e in &written {
        let mut tx = db.pool.begin().await.unwrap();
        outbox.enqueue(&mut tx, e).await.unwrap();
        tx.commit().await.unwrap();
    }

    let first = next(&mut source).await;
    assert_eq!(ids(&first), vec![written[0].id()]);
    // Read (but do not confirm) the second one too: unconfirmed work is sent again.
    let second = next(&mut source).await;
    assert_eq!(ids(&second), vec![written[1].id()]);
    source.confirm(first.end_lsn);
    assert_eq!(source.shutdown().await.unwrap(), first.end_lsn);
    let recorded: i64 = sqlx::query_scalar(
        "select fencing_token from outbox.relay_lease where name = 'wal-confirmed:' || $1",
    )
    .bind(&db.slot)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(recorded, first.end_lsn.to_i64().unwrap());

    let mut source = db.start().await;
    assert!(!source.created_slot(), "a restart reuses the slot");
    let again = next(&mut source).await;
    assert_eq!(
        ids(&again),
        vec![written[1].id()],
        "resumes after the confirmed transaction"
    );
    assert_eq!(again.end_lsn, second.end_lsn);
    let third = next(&mut source).await;
    assert_eq!(ids(&third), vec![written[2].id()]);

    source.shutdown().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_lets_the_slot_advance_but_never_past_an_unconfirmed_event() {
    let db = WalDb::new().await;
    let mut source = db.start().await;
    let outbox = db.outbox();
    let mut tx = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("1")).await.unwrap();
    tx.commit().await.unwrap();
    let first = next(&mut source).await;
    source.confirm(first.end_lsn);

    // Only other tables take writes now.
    db.write_other(100).await;
    let target = db.current_wal_lsn().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        if db.slot_confirmed().await.unwrap() >= target {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot stayed at {:?}, behind {target} (positions {:?})",
            db.slot_confirmed().await,
            source.positions()
        );
        db.write_other(10).await;
        let waited =
            tokio::time::timeout(Duration::from_millis(200), source.next_transaction()).await;
        assert!(
            waited.is_err(),
            "no outbox transaction expected: {waited:?}"
        );
    }

    // An unconfirmed transaction holds the slot, however far the server reads.
    let mut tx = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("2")).await.unwrap();
    tx.commit().await.unwrap();
    let second = next(&mut source).await;
    let deadline = Instant::now() + DEADLINE;
    while source.positions().server_wal_end <= second.end_lsn {
        assert!(
            Instant::now() < deadline,
            "no keepalive beyond the transaction"
        );
        db.write_other(10).await;
        let waited =
            tokio::time::timeout(Duration::from_millis(200), source.next_transaction()).await;
        assert!(
            waited.is_err(),
            "no outbox transaction expected: {waited:?}"
        );
    }
    assert!(source.flush().await.unwrap() < second.commit_lsn);
    assert!(db.slot_confirmed().await.unwrap() < second.commit_lsn);

    // Once confirmed, the slot moves past it.
    source.confirm(second.end_lsn);
    let deadline = Instant::now() + DEADLINE;
    while db.slot_confirmed().await.unwrap() < second.end_lsn {
        assert!(
            Instant::now() < deadline,
            "slot did not pass the confirmed transaction"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), source.next_transaction()).await;
    }
    assert!(source.slot_lag_bytes().await.unwrap().is_some());

    source.shutdown().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_stopped_is_reported_lost_and_not_recreated_silently() {
    let db = WalDb::new().await;
    let mut source = db.start().await;
    let outbox = db.outbox();
    let mut tx = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("1")).await.unwrap();
    tx.commit().await.unwrap();
    let first = next(&mut source).await;
    source.confirm(first.end_lsn);
    source.shutdown().await.unwrap();

    // The walsender may take a moment to let go of the slot.
    let deadline = Instant::now() + DEADLINE;
    while sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&db.slot)
        .execute(&db.pool)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "slot stayed active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let lost = match WalSource::start(db.config()).await.unwrap() {
        WalStart::SlotLost(lost) => lost,
        WalStart::Ready(_) => panic!("a dropped slot must be reported, not re-created"),
    };
    assert_eq!(lost.last_confirmed_lsn, first.end_lsn);
    assert_eq!(lost.reason, SlotLossReason::Dropped);
    assert_eq!(db.slot_confirmed().await, None, "no slot was created");

    // Recovery: an explicit re-creation, after which new events stream again.
    let mut source = lost.recreate_slot().await.unwrap();
    assert!(source.created_slot());
    assert!(db.slot_confirmed().await.is_some());
    let after = event("2");
    let mut tx = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &after).await.unwrap();
    tx.commit().await.unwrap();
    let second = next(&mut source).await;
    assert_eq!(ids(&second), vec![after.id()]);
    source.confirm(second.end_lsn);
    source.shutdown().await.unwrap();

    // A slot advanced by someone else skipped events too.
    db.write_other(10).await;
    let deadline = Instant::now() + DEADLINE;
    while sqlx::query("select pg_replication_slot_advance($1, pg_current_wal_lsn())")
        .bind(&db.slot)
        .execute(&db.pool)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "slot stayed active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match WalSource::start(db.config()).await.unwrap() {
        WalStart::SlotLost(lost) => {
            assert_eq!(lost.last_confirmed_lsn, second.end_lsn);
            assert!(
                matches!(lost.reason, SlotLossReason::MovedAhead { .. }),
                "{:?}",
                lost.reason
            );
        }
        WalStart::Ready(_) => panic!("an advanced slot must be reported"),
    }

    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_misconfiguration_is_refused_with_the_fix_and_creates_no_slot() {
    let db = WalDb::new().await;
    let cases = [
        (
            "pub_other_table",
            "create publication pub_other_table for table public.other",
            "does not include the outbox table",
        ),
        (
            "pub_updates_only",
            "create publication pub_updates_only for table outbox.outbox with (publish = 'update')",
            "does not publish inserts",
        ),
        (
            "pub_row_filter",
            "create publication pub_row_filter for table outbox.outbox where (attempts = 0) \
             with (publish = 'insert')",
            "filters the rows",
        ),
        (
            "pub_column_list",
            "create publication pub_column_list for table outbox.outbox (sequence, event_id) \
             with (publish = 'insert')",
            "without \"aggregate_type\"",
        ),
    ];
    for (publication, create, problem) in cases {
        sqlx::raw_sql(AssertSqlSafe(create))
            .execute(&db.pool)
            .await
            .unwrap();
        let mut config = db.config();
        config.publication = publication.to_owned();
        let error = WalSource::start(config).await.unwrap_err();
        let text = error.to_string();
        assert!(
            matches!(error, WalError::Publication { .. }),
            "{publication}: {text}"
        );
        assert!(text.contains(problem), "{publication}: {text}");
        assert!(text.contains("ALTER PUBLICATION"), "{publication}: {text}");
        assert!(!error.is_retryable());
        let relay: RelayError = error.into();
        assert!(matches!(relay, RelayError::Config(_)), "{relay}");
    }
    assert_eq!(
        db.slot_confirmed().await,
        None,
        "no slot for a misconfigured source"
    );

    // Missing outbox tables are named too.
    let mut config = db.config();
    config.schema = SchemaName::new("no_such_schema").unwrap();
    let error = WalSource::start(config).await.unwrap_err();
    assert!(error.to_string().contains("run the migrations"), "{error}");

    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_in_use_by_another_session_is_waited_for_not_fatal_at_once() {
    let db = WalDb::new().await;
    let leader = db.start().await;

    let mut impatient = db.config();
    impatient.slot_busy_timeout = Duration::from_millis(300);
    match WalSource::start(impatient).await {
        Err(WalError::SlotBusy { pid, .. }) => assert!(pid.is_some()),
        other => panic!("expected SlotBusy, got {other:?}"),
    }

    // A standby starting while the leader still streams takes over once it stops.
    let standby = tokio::spawn(WalSource::start(db.config()));
    leader.shutdown().await.unwrap();
    let mut standby = match tokio::time::timeout(DEADLINE, standby).await {
        Ok(Ok(Ok(WalStart::Ready(source)))) => source,
        other => panic!("standby did not take over: {other:?}"),
    };
    let mut tx = db.pool.begin().await.unwrap();
    let e = event("1");
    db.outbox().enqueue(&mut tx, &e).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids(&next(&mut standby).await), vec![e.id()]);

    standby.shutdown().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_replication_connection_resumes_after_reconnect_without_loss() {
    let db = WalDb::new().await;
    let mut source = db.start().await;
    let outbox = db.outbox();
    let written = [event("1"), event("2"), event("3")];
    let enqueue = |e: Event| {
        let pool = db.pool.clone();
        let outbox = outbox.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue(&mut tx, &e).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    enqueue(written[0].clone()).await;
    let first = next(&mut source).await;
    // Confirmed, but maybe not yet reported when the connection breaks.
    source.confirm(first.end_lsn);
    enqueue(written[1].clone()).await;
    assert_eq!(ids(&next(&mut source).await), vec![written[1].id()]);

    // The walsender goes away (as in a PostgreSQL restart) while more is written.
    sqlx::query(
        "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = $1",
    )
    .bind(&db.slot)
    .execute(&db.pool)
    .await
    .unwrap();
    enqueue(written[2].clone()).await;
    loop {
        match tokio::time::timeout(DEADLINE, source.next_transaction())
            .await
            .expect("the broken stream is reported within the deadline")
        {
            // The dying walsender may still send the third transaction.
            Ok(Some(transaction)) => assert_eq!(ids(&transaction), vec![written[2].id()]),
            Ok(None) => break,
            Err(error) => {
                assert!(error.is_retryable(), "{error}");
                break;
            }
        }
    }
    assert!(matches!(
        source.next_transaction().await,
        Err(WalError::NeedsReconnect)
    ));

    source.reconnect().await.unwrap();
    // The confirmed transaction is not sent again; the unconfirmed ones are, in order.
    assert_eq!(ids(&next(&mut source).await), vec![written[1].id()]);
    assert_eq!(ids(&next(&mut source).await), vec![written[2].id()]);

    source.shutdown().await.unwrap();
    db.cleanup().await;
}

/// The slot's lifecycle is durable: a drain recorded at creation is handed out
/// again on every start until it is recorded finished; a position of 0/0 (what
/// a relay before migration 0003 could record for a slot still being created)
/// counts as never recorded, so the slot is adopted, not reported lost; a
/// position recorded without a lifecycle row (a relay before 0003) drains the
/// table once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_survives_restarts_and_an_unrecorded_position_is_adopted_not_lost() {
    let db = WalDb::new().await;
    let outbox = db.outbox();
    let mut tx = db.pool.begin().await.unwrap();
    let before = outbox.enqueue(&mut tx, &event("before")).await.unwrap();
    tx.commit().await.unwrap();

    let source = db.start().await;
    let drain = source.drain().expect("rows in the table: a drain");
    assert_eq!((drain.after, drain.upto), (0, before.sequence));
    source.shutdown().await.unwrap();
    // Not recorded finished: the next start drains again.
    let mut source = db.start().await;
    assert!(!source.created_slot(), "the slot is reused");
    assert_eq!(source.drain().map(|d| d.upto), Some(before.sequence));
    source.record_drain(before.sequence, true).await.unwrap();
    assert_eq!(source.drain(), None);
    source.shutdown().await.unwrap();
    let source = db.start().await;
    assert_eq!(source.drain(), None, "a finished drain is not repeated");
    source.shutdown().await.unwrap();

    // 0/0 recorded: adopted (position and a drain recorded), never lost.
    let deadline = Instant::now() + DEADLINE;
    while db.slot_active().await {
        assert!(Instant::now() < deadline, "slot stayed active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query(
        "update outbox.relay_lease set fencing_token = 0 where name = 'wal-confirmed:' || $1",
    )
    .bind(&db.slot)
    .execute(&db.pool)
    .await
    .unwrap();
    let source = match WalSource::start(db.config()).await.unwrap() {
        WalStart::Ready(source) => source,
        WalStart::SlotLost(lost) => panic!("a never-recorded position is no loss: {lost:?}"),
    };
    assert!(source.created_slot(), "adopted");
    assert!(source.drain().is_some());
    source.shutdown().await.unwrap();

    // A position without a lifecycle row (recorded before migration 0003): drain once.
    while db.slot_active().await {
        assert!(Instant::now() < deadline, "slot stayed active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("delete from outbox.relay_wal_slot")
        .execute(&db.pool)
        .await
        .unwrap();
    let source = db.start().await;
    assert!(!source.created_slot());
    assert_eq!(source.drain().map(|d| d.upto), Some(before.sequence));
    source.shutdown().await.unwrap();
    db.cleanup().await;
}
