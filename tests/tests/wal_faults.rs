//! Fault injection for the WAL-source relay publishing to RabbitMQ (G2, G3): the
//! PostgreSQL server restarted mid-stream, the relay's walsender terminated, and a
//! broker outage through the TCP fault proxy, each under steady writes.
//!
//! Writers commit each event together with a row in a ground-truth table
//! (`public.committed_events`) in the same transaction, and bump the key's counter
//! row first, so the payload counter `n` is the per-key commit order. After the
//! fault, every id in the ground-truth table must arrive (0 missing), first
//! deliveries must keep per-key order, nothing is dead-lettered and the outbox
//! ends empty.
//!
//! Every test owns a database (see [`outbox_tests::wal::WalDatabase`]) and starts
//! writing only once the relay streams from its slot.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::{Event, Outbox, OutboxConfig};
use outbox_relay::config::RawConfig;
use outbox_tests::amqp::n_of;
use outbox_tests::amqp::{RabbitFixture, first_delivery_order_violations};
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::ops::{free_local_addr, metric};
use outbox_tests::relay::{RunningRelay, wait_for_empty_outbox};
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;

use outbox_tests::init_tracing;

/// The ground-truth table: one row per committed event, written in its transaction.
const TRUTH: &str = "public.committed_events";

/// Start a relay and wait until it streams from the slot, so that what is
/// written next comes through the replication stream.
async fn start_streaming(db: &WalDatabase, raw: RawConfig) -> RunningRelay {
    init_tracing();
    let relay = RunningRelay::start(raw.validate().unwrap());
    wait_until(
        "the relay streaming from its slot",
        Duration::from_secs(30),
        || async { db.walsender_streams().await },
    )
    .await;
    relay
}

/// The pid of the walsender streaming from the slot, if one does.
async fn walsender_pid(db: &WalDatabase) -> Option<i32> {
    sqlx::query_scalar::<_, Option<i32>>(
        "select active_pid from pg_replication_slots where slot_name = $1",
    )
    .bind(&db.slot)
    .fetch_optional(&db.test.pool)
    .await
    .unwrap()
    .flatten()
}

async fn dead_letters(db: &WalDatabase) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {}",
        db.test.table("outbox_dead_letter")
    )))
    .fetch_one(&db.test.pool)
    .await
    .unwrap()
}

/// Concurrent writers, each committing one event per transaction together with
/// its ground-truth row, retrying after any error (a commit whose reply was lost
/// is decided by the ground-truth table).
struct Writers {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    tasks: tokio::task::JoinSet<()>,
}

impl Writers {
    async fn start(db: &WalDatabase, writers: usize, keys: usize) -> Self {
        let counters = outbox_tests::load::create_counters(&db.test, keys).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create table {TRUTH} (event_id uuid primary key)"
        )))
        .execute(&db.test.pool)
        .await
        .unwrap();
        let pool = db.test.connect(writers as u32).await;
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..writers {
            let (pool, counters) = (pool.clone(), counters.clone());
            let (stop, committed, errors) = (stop.clone(), committed.clone(), errors.clone());
            let outbox = Outbox::new(OutboxConfig {
                schema: db.test.schema.clone(),
                ..OutboxConfig::default()
            });
            tasks.spawn(async move {
                let mut i = 0_usize;
                while !stop.load(Ordering::Relaxed) {
                    let key = (writer * 31 + i * 7) % keys;
                    let attempt = async {
                        let mut tx = pool.begin().await?;
                        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                            "update {counters} set n = n + 1 where key = $1 returning n"
                        )))
                        .bind(key as i32)
                        .fetch_one(&mut *tx)
                        .await?;
                        let event = Event::builder("item", format!("k{key}"), "item.changed")
                            .payload(&serde_json::json!({ "n": n }))
                            .build()
                            .unwrap();
                        outbox
                            .enqueue(&mut tx, &event)
                            .await
                            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "insert into {TRUTH} values ($1)"
                        )))
                        .bind(event.id().as_uuid())
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await
                    };
                    match attempt.await {
                        Ok(()) => {
                            committed.fetch_add(1, Ordering::Relaxed);
                            i += 1;
                        }
                        // Server down or the outcome unknown: the ground-truth table decides.
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        Writers {
            stop,
            committed,
            errors,
            tasks,
        }
    }

    /// Stop writing; returns (transactions known committed, failed attempts).
    async fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(result) = self.tasks.join_next().await {
            result.unwrap();
        }
        (
            self.committed.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Wait until every event of the ground-truth table arrived, then check that none
/// is missing, per-key order holds, nothing is dead-lettered and the outbox is
/// empty. Returns (committed, deliveries).
async fn assert_all_arrived_in_order(
    db: &WalDatabase,
    rabbit: &RabbitFixture,
    deadline: Duration,
) -> (usize, usize) {
    let committed: Vec<uuid::Uuid> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select event_id from {TRUTH}")))
            .fetch_all(&db.test.pool)
            .await
            .unwrap();
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let received: HashSet<String> = rabbit
            .received()
            .iter()
            .map(|m| m.message_id.clone())
            .collect();
        let missing: Vec<&uuid::Uuid> = committed
            .iter()
            .filter(|id| !received.contains(&id.to_string()))
            .collect();
        if missing.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= until {
            let left: i64 = outbox_tests::relay::outbox_rows(&db.test).await;
            panic!(
                "{} of {} committed events missing after {deadline:?} (e.g. {:?}); {left} rows still in the outbox",
                missing.len(),
                committed.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_empty_outbox(&db.test, Duration::from_secs(30)).await;
    let received = rabbit.received();
    assert_eq!(first_delivery_order_violations(&received, n_of), 0);
    assert_eq!(dead_letters(db).await, 0, "nothing is dead-lettered");
    assert_eq!(
        rabbit.distinct(),
        committed.len(),
        "only committed events arrive"
    );
    (committed.len(), received.len())
}

async fn wait_for_metric(
    ops: SocketAddr,
    name: &str,
    what: &str,
    deadline: Duration,
    ok: impl Fn(f64) -> bool,
) {
    wait_until(what, deadline, || async {
        metric(ops, name).await.is_some_and(&ok)
    })
    .await;
}

/// Restarts the shared PostgreSQL server, so it cannot run beside other tests:
/// `scripts/test-heavy` runs it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared PostgreSQL server; run by scripts/test-heavy"]
async fn postgres_restart_mid_stream_loses_nothing_and_keeps_order() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut raw = db.raw_config(&rabbit.exchange);
    raw.database.connect_timeout_ms = Some(2_000);
    let relay = start_streaming(&db, raw).await;
    let writers = Writers::start(&db, 4, 40).await;
    rabbit.wait_for_distinct(300, Duration::from_secs(60)).await;

    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .unwrap();
    let pid_before = walsender_pid(&db).await;
    let restart = Instant::now();
    let restarted = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .unwrap();
    assert!(restarted.success());
    let restart_took = restart.elapsed();
    // The relay reconnects by itself: a new walsender streams from the slot.
    wait_until(
        "the relay streaming again after the restart",
        Duration::from_secs(60),
        || async {
            let pid = sqlx::query_scalar::<_, Option<i32>>(
                "select active_pid from pg_replication_slots where slot_name = $1",
            )
            .bind(&db.slot)
            .fetch_optional(&db.test.pool)
            .await
            .ok()
            .flatten()
            .flatten();
            pid.is_some() && pid != pid_before
        },
    )
    .await;
    let reconnected = restart.elapsed();
    let delivered = rabbit.distinct();
    wait_until(
        "deliveries after the restart",
        Duration::from_secs(60),
        || async { rabbit.distinct() >= delivered + 300 },
    )
    .await;
    let resumed = restart.elapsed();
    let (written, errors) = writers.stop().await;

    let (committed, deliveries) =
        assert_all_arrived_in_order(&db, &rabbit, Duration::from_secs(120)).await;
    let summary = relay.stop().await;
    println!(
        "wal postgres restart: restart took {:.1} s, relay streaming again after {:.1} s, \
         deliveries resumed after {:.1} s; {committed} committed events ({written} acknowledged, \
         {errors} failed attempts), 0 missing, {} duplicates",
        restart_took.as_secs_f64(),
        reconnected.as_secs_f64(),
        resumed.as_secs_f64(),
        deliveries - committed
    );
    assert_eq!(summary.dead_lettered, 0);
    db.cleanup().await;
}

/// The relay's walsender is terminated twice under steady writes; each time the
/// relay streams again from the confirmed position by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_terminated_twice_under_writes_resumes_without_loss() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let relay = start_streaming(&db, db.raw_config(&rabbit.exchange)).await;
    let writers = Writers::start(&db, 4, 40).await;
    rabbit.wait_for_distinct(300, Duration::from_secs(60)).await;

    for round in 1..=2 {
        let pid = walsender_pid(&db).await.unwrap();
        let killed = Instant::now();
        let terminated: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&db.test.pool)
            .await
            .unwrap();
        assert!(terminated, "terminate walsender {pid}");
        wait_until(
            "a new walsender for the relay",
            Duration::from_secs(30),
            || async { walsender_pid(&db).await.is_some_and(|new| new != pid) },
        )
        .await;
        let streaming = killed.elapsed();
        let delivered = rabbit.distinct();
        wait_until(
            "deliveries after the walsender was terminated",
            Duration::from_secs(45),
            || async { rabbit.distinct() >= delivered + 400 },
        )
        .await;
        println!(
            "walsender {pid} terminated (round {round}): streaming again after {:.2} s, \
             delivering after {:.2} s",
            streaming.as_secs_f64(),
            killed.elapsed().as_secs_f64()
        );
    }
    let (written, errors) = writers.stop().await;
    assert_eq!(errors, 0, "the writers never saw an error");

    let (committed, deliveries) =
        assert_all_arrived_in_order(&db, &rabbit, Duration::from_secs(45)).await;
    assert_eq!(committed, written);
    let summary = relay.stop().await;
    println!(
        "walsender terminated twice: {committed} events, 0 missing, {} duplicates",
        deliveries - committed
    );
    assert_eq!(summary.dead_lettered, 0);
    db.cleanup().await;
}

/// RabbitMQ unreachable for 5 s (fault proxy cut) under steady writes. After it
/// returns and delivery resumes, the relay is stopped with a backlog still
/// pending and a new relay finishes from the slot's confirmed position: every
/// committed event must arrive, so the first relay never confirmed an undelivered one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_in_wal_mode_loses_nothing_and_confirms_nothing_undelivered() {
    const OUTAGE: Duration = Duration::from_secs(5);
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let ops = free_local_addr();
    let mut raw = db.raw_config(&rabbit.exchange);
    let rabbitmq = raw.rabbitmq.as_mut().unwrap();
    rabbitmq.url = Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()));
    rabbitmq.publish_timeout_ms = Some(2_000);
    rabbitmq.connect_timeout_ms = Some(2_000);
    raw.ops.listen_addr = Some(ops.to_string());
    let relay = start_streaming(&db, raw).await;
    let writers = Writers::start(&db, 4, 40).await;
    rabbit.wait_for_distinct(200, Duration::from_secs(60)).await;

    proxy.cut();
    let cut = Instant::now();
    wait_for_metric(
        ops,
        "outbox_relay_circuit_breaker_state",
        "the breaker opening",
        Duration::from_secs(15),
        |v| v == 1.0,
    )
    .await;
    let breaker_opened = cut.elapsed();
    tokio::time::sleep(OUTAGE.saturating_sub(cut.elapsed())).await; // the scenario: the broker stays unreachable
    let pending_at_restore = outbox_tests::relay::outbox_rows(&db.test).await;
    let delivered_at_restore = rabbit.distinct();

    proxy.restore();
    let restored = Instant::now();
    wait_until(
        "deliveries after the broker returned",
        Duration::from_secs(30),
        || async { rabbit.distinct() > delivered_at_restore },
    )
    .await;
    let resumed = restored.elapsed();
    let (written, errors) = writers.stop().await;
    assert_eq!(errors, 0, "the writers never saw an error");
    // Stop this relay at once and let a new one finish from the slot's confirmed
    // position: had the first confirmed past an undelivered event, it is lost now.
    let first = relay.stop().await;
    assert_eq!(first.dead_lettered, 0, "an outage never dead-letters");
    let left_by_first = outbox_tests::relay::outbox_rows(&db.test).await;
    let second = start_streaming(&db, db.raw_config(&rabbit.exchange)).await;

    let (committed, deliveries) =
        assert_all_arrived_in_order(&db, &rabbit, Duration::from_secs(45)).await;
    assert_eq!(committed, written);
    let summary = second.stop().await;
    println!(
        "wal broker outage of {OUTAGE:?}: breaker open after {:.1} s, {pending_at_restore} events pending at \
         restore, delivery resumed {:.2} s after it; {left_by_first} left to the second relay; \
         {committed} events, 0 missing, {} duplicates",
        breaker_opened.as_secs_f64(),
        resumed.as_secs_f64(),
        deliveries - committed
    );
    assert_eq!(summary.dead_lettered, 0);
    db.cleanup().await;
}
