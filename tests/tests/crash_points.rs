//! The real `outbox-relay` daemon aborted (like `kill -9`) at each named
//! failpoint of its recovery protocols (`relay/src/failpoint.rs`) while writers
//! commit, then started again, through an independent consumer of the broker
//! (RabbitMQ; the stream's points also with Kafka):
//!
//! * G2: 0 committed events lost;
//! * G3: per-key order of first deliveries;
//! * bounded duplicates: at most the in-flight window plus about a second of
//!   traffic per crash.
//!
//! Points on the first start's path crash two starts in a row. The daemon is
//! the `outbox-relay-failpoints` binary of this crate (see
//! `outbox_tests::daemon`). Every test owns a database, exchange and queue.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::time::{Duration, Instant};

use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{
    Daemon, GroundTruth, polling_env, relay_binary, seen_on_kafka, seen_on_rabbitmq, use_kafka,
    wal_env,
};
use outbox_tests::kafka::{TopicConsumer, create_topic};
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;

fn binary() -> std::path::PathBuf {
    relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"))
}

/// `wal.max_in_flight_events` of [`wal_env`] and `polling.batch_size` of [`polling_env`].
const WINDOW: usize = 500;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Wal,
    Polling,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    RabbitMq,
    Kafka,
}

/// Commit `backlog` events, start writers, then start the daemon once per entry
/// of `crashes` (`point:N`), each time waiting for it to abort there; then run
/// it without a failpoint until every committed event arrived, and check.
async fn crash_and_recover(source: Source, backlog: usize, crashes: &[&str]) {
    crash_and_recover_to(source, Sink::RabbitMq, backlog, crashes).await;
}

/// [`crash_and_recover`] publishing to `sink`.
async fn crash_and_recover_to(source: Source, sink: Sink, backlog: usize, crashes: &[&str]) {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut truth = GroundTruth::new(&db.test, 30).await;
    truth.backlog(backlog).await;
    let mut env = match source {
        Source::Wal => wal_env(&db, &rabbit.exchange),
        Source::Polling => polling_env(&db.test, &rabbit.exchange),
    };
    let kafka = match sink {
        Sink::RabbitMq => None,
        Sink::Kafka => {
            let topic = create_topic(3).await;
            use_kafka(&mut env, &topic);
            Some(TopicConsumer::start(&topic, 3))
        }
    };
    let seen = || match &kafka {
        Some(consumer) => seen_on_kafka(&consumer.received()),
        None => seen_on_rabbitmq(&rabbit.received()),
    };
    let distinct = || {
        seen()
            .into_iter()
            .map(|m| m.event_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let began = Instant::now();
    truth
        .start_writers(&db.test, 2, Duration::from_millis(10))
        .await;
    for point in crashes {
        let mut daemon = Daemon::start(&binary(), &env, Some(point));
        daemon.wait_for_abort(Duration::from_secs(45)).await;
        if source == Source::Wal {
            db.wait_slot_inactive().await;
        }
    }
    let mut daemon = Daemon::start(&binary(), &env, None);
    let written = truth.committed();
    wait_until(
        "the recovered relay delivering",
        Duration::from_secs(60),
        || {
            let done = distinct() >= written;
            async move { done }
        },
    )
    .await;
    truth.stop_writers().await;
    let rate = truth.committed().saturating_sub(backlog) as f64 / began.elapsed().as_secs_f64();
    let delivery = truth.check_seen(seen, Duration::from_secs(60)).await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        daemon.log_tail()
    );
    let bound = crashes.len() * (WINDOW + rate as usize) + 50;
    println!(
        "crashed at {crashes:?}: {} events ({backlog} backlog, {rate:.0}/s), 0 missing, {} duplicates (bound {bound})",
        delivery.committed, delivery.duplicates
    );
    assert!(
        delivery.duplicates <= bound,
        "{} duplicates, more than {bound}",
        delivery.duplicates
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_right_after_winning_the_leader_lock_loses_nothing() {
    crash_and_recover(
        Source::Wal,
        1_000,
        &["wal.leader.acquired:1", "wal.leader.acquired:1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_creating_the_slot_loses_nothing() {
    crash_and_recover(
        Source::Wal,
        1_000,
        &["wal.slot.creating:1", "wal.slot.creating:1"],
    )
    .await;
}

/// The slot exists, its start is not recorded: the next start adopts it (and
/// here crashes again inside the drain that adoption starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_creating_the_slot_before_recording_it_loses_nothing() {
    crash_and_recover(
        Source::Wal,
        3_000,
        &["wal.slot.created:1", "wal.drain.page:2"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_inside_the_table_drain_twice_resumes_it_and_loses_nothing() {
    crash_and_recover(
        Source::Wal,
        5_000,
        &["wal.drain.page:3", "wal.drain.page:2"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_drain_settled_before_it_is_recorded_loses_nothing() {
    crash_and_recover(
        Source::Wal,
        2_000,
        &["wal.drain.finished:1", "wal.drain.finished:1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_a_broker_confirm_before_the_settle_loses_nothing() {
    crash_and_recover(Source::Wal, 0, &["wal.publish.confirmed:300"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_deleting_rows_before_confirming_the_position_loses_nothing() {
    crash_and_recover(Source::Wal, 0, &["wal.settle.deleted:40"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_recording_the_position_before_reporting_it_loses_nothing() {
    crash_and_recover(Source::Wal, 0, &["wal.position.recorded:4"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_crash_after_a_delivery_report_before_the_settle_loses_nothing() {
    crash_and_recover_to(Source::Wal, Sink::Kafka, 0, &["wal.publish.confirmed:300"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_crash_after_deleting_rows_before_confirming_the_position_loses_nothing() {
    crash_and_recover_to(Source::Wal, Sink::Kafka, 0, &["wal.settle.deleted:40"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_crash_after_recording_the_position_before_reporting_it_loses_nothing() {
    crash_and_recover_to(Source::Wal, Sink::Kafka, 0, &["wal.position.recorded:4"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_polling_crash_after_a_delivery_report_before_the_settle_loses_nothing() {
    crash_and_recover_to(
        Source::Polling,
        Sink::Kafka,
        0,
        &["polling.publish.confirmed:300"],
    )
    .await;
}

/// The slot is dropped while no relay runs; the recovery is interrupted twice
/// right after dropping what was left of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_inside_a_slot_loss_recovery_twice_loses_nothing() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut truth = GroundTruth::new(&db.test, 30).await;
    let env = wal_env(&db, &rabbit.exchange);
    let mut daemon = Daemon::start(&binary(), &env, None);
    truth
        .start_writers(&db.test, 2, Duration::from_millis(10))
        .await;
    wait_until("deliveries", Duration::from_secs(30), || async {
        rabbit.distinct() >= 100
    })
    .await;
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).await.success());
    db.wait_slot_inactive().await;
    db.drop_slot().await;
    for _ in 0..2 {
        let mut crashing = Daemon::start(&binary(), &env, Some("wal.recovery.dropped:1"));
        crashing.wait_for_abort(Duration::from_secs(45)).await;
    }
    let mut daemon = Daemon::start(&binary(), &env, None);
    truth.stop_writers().await;
    let delivery = truth.check(&rabbit, Duration::from_secs(60)).await;
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).await.success());
    println!(
        "slot recovery crashed twice: {} events, 0 missing, {} duplicates",
        delivery.committed, delivery.duplicates
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_crash_after_a_claim_loses_nothing() {
    crash_and_recover(Source::Polling, 1_000, &["polling.claim:3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_crash_after_a_broker_confirm_before_the_settle_loses_nothing() {
    crash_and_recover(Source::Polling, 1_000, &["polling.publish.confirmed:300"]).await;
}

/// Relay A holds every partition; B joins, and A crashes right after handing
/// the extra partitions over. B and a restarted A deliver everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_crash_during_a_lease_handover_loses_nothing() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut truth = GroundTruth::new(&db.test, 30).await;
    truth.backlog(1_000).await;
    let env = polling_env(&db.test, &rabbit.exchange);
    let mut a = Daemon::start(&binary(), &env, Some("polling.lease.handover:1"));
    truth
        .start_writers(&db.test, 2, Duration::from_millis(10))
        .await;
    wait_until("A delivering", Duration::from_secs(30), || async {
        rabbit.distinct() >= 200
    })
    .await;
    let mut b = Daemon::start(&binary(), &env, None);
    a.wait_for_abort(Duration::from_secs(45)).await;
    let mut a = Daemon::start(&binary(), &env, None);
    let written = truth.committed();
    wait_until(
        "delivering after the crash",
        Duration::from_secs(60),
        || async { rabbit.distinct() >= written },
    )
    .await;
    truth.stop_writers().await;
    let delivery = truth.check(&rabbit, Duration::from_secs(60)).await;
    for daemon in [&mut a, &mut b] {
        daemon.signal("TERM");
        assert!(daemon.wait(Duration::from_secs(30)).await.success());
    }
    println!(
        "lease handover crash: {} events, 0 missing, {} duplicates",
        delivery.committed, delivery.duplicates
    );
    assert!(delivery.duplicates <= WINDOW + 50);
    db.cleanup().await;
}
