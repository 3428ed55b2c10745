//! The crash-safe WAL protocol (issue 10), proven on the real `outbox-relay`
//! daemon run as a child process and interrupted from outside: SIGKILL,
//! SIGTERM, its database sessions terminated, a hung broker link. Nothing here
//! needs a failpoint, so every test also runs against a relay built without
//! them (`OUTBOX_RELAY_BIN`): each one failed on the relay before issue 10.
//!
//! * G2 nothing lost: an interrupted table drain resumes (finding 1); a slot
//!   left by a relay killed while creating it is adopted, never "lost" (finding 2).
//! * Bounded duplicates: kill -9 re-sends at most the in-flight window plus about
//!   a second of traffic (finding 3); SIGTERM re-sends nothing (finding 4).
//! * Bounded shutdown: SIGTERM with a hung broker link exits within the grace
//!   period plus a small fixed bound (finding 5).
//!
//! Every test owns a database ([`WalDatabase`]), an exchange and a queue.

#![allow(clippy::unwrap_used)] // a test should fail loudly at the broken step

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_tests::amqp::RabbitFixture;
use outbox_tests::daemon::{
    Daemon, GroundTruth, outbox_event_ids, polling_env, relay_binary, seen_on_kafka,
    seen_on_rabbitmq, set, use_kafka, wal_env,
};
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::wait_until;
use outbox_tests::wal::WalDatabase;

fn binary() -> std::path::PathBuf {
    relay_binary(env!("CARGO_BIN_EXE_outbox-relay-failpoints"))
}

/// `wal.max_in_flight_events` of [`wal_env`].
const MAX_IN_FLIGHT_EVENTS: usize = 500;

/// Whether a walsender streams from the slot.
async fn streaming(db: &WalDatabase) -> bool {
    sqlx::query_scalar::<_, bool>(
        "select exists (select 1 from pg_replication_slots s join pg_stat_replication r \
         on r.pid = s.active_pid where s.slot_name = $1)",
    )
    .bind(&db.slot)
    .fetch_one(&db.test.pool)
    .await
    .unwrap()
}

/// Terminate every database session of the relay (`application_name` outbox-relay*).
async fn terminate_relay_sessions(db: &WalDatabase) -> i64 {
    sqlx::query_scalar(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity \
         where datname = $1 and application_name like 'outbox-relay%'",
    )
    .bind(&db.name)
    .fetch_one(&db.test.pool)
    .await
    .unwrap()
}

/// Finding 1: a 10,000-event backlog; the first start's table drain is
/// interrupted by SIGKILL, SIGTERM and the relay's database sessions being
/// terminated, each after a part of it was delivered. Every event arrives.
/// (Before: the next session found a healthy slot with a recorded position and
/// never drained again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_table_drain_resumes_where_it_stopped_and_loses_nothing() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let truth = GroundTruth::new(&db.test, 50).await;
    truth.backlog(10_000).await;
    let env = wal_env(&db, &rabbit.exchange);

    for interruption in ["KILL", "TERM", "terminate-sessions"] {
        let before = rabbit.distinct();
        let mut daemon = Daemon::start(&binary(), &env, None);
        wait_until(
            "part of the drain delivered",
            Duration::from_secs(60),
            || async { rabbit.distinct() >= before + 1_000 },
        )
        .await;
        match interruption {
            "terminate-sessions" => {
                assert!(terminate_relay_sessions(&db).await > 0);
                // The relay starts a new session by itself; then stop it.
                let after = rabbit.distinct();
                wait_until(
                    "deliveries by the new session",
                    Duration::from_secs(60),
                    || async { rabbit.distinct() >= after + 500 || rabbit.distinct() >= 10_000 },
                )
                .await;
                daemon.kill().await;
            }
            signal => {
                daemon.signal(signal);
                daemon.wait(Duration::from_secs(30)).await;
            }
        }
        println!(
            "drain interrupted by {interruption} after {} of 10000 events",
            rabbit.distinct()
        );
        db.wait_slot_inactive().await;
    }
    // The drain's progress is durable, and `outbox-relay status` shows it.
    let status = outbox_relay::admin::status(&db.test.pool, &db.test.schema)
        .await
        .unwrap();
    let slot = status.slots.iter().find(|s| s.name == db.slot).unwrap();
    assert_eq!(slot.lifecycle.as_deref(), Some("draining"));
    let outbox_relay::admin::DrainProgress { after, upto } = slot.drain.unwrap();
    assert!(
        0 < after && after < upto,
        "drain progress {after} of {upto}"
    );
    print!("{status}");

    let mut last = Daemon::start(&binary(), &env, None);
    let delivery = truth.check(&rabbit, Duration::from_secs(90)).await;
    last.signal("TERM");
    assert!(last.wait(Duration::from_secs(30)).await.success());
    let status = outbox_relay::admin::status(&db.test.pool, &db.test.schema)
        .await
        .unwrap();
    let slot = status.slots.iter().find(|s| s.name == db.slot).unwrap();
    assert_eq!(slot.lifecycle.as_deref(), Some("streaming"));
    println!(
        "interrupted drain: {} events, 0 missing, {} duplicates",
        delivery.committed, delivery.duplicates
    );
    db.cleanup().await;
}

/// Finding 2: a relay is killed while PostgreSQL creates its slot (creation
/// waits for a running transaction, so the server finishes it after the kill).
/// The next relay adopts that slot; it is killed before it records anything
/// more; a third relay streams on from the same slot: no "slot lost", and no
/// wal-message event committed in between is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_left_by_a_relay_killed_while_creating_it_is_adopted_never_lost() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut truth = GroundTruth::new(&db.test, 20).await;
    truth.write_wal_messages();
    let env = wal_env(&db, &rabbit.exchange);

    // A transaction with an xid holds the slot's creation up.
    let mut blocker = db.test.pool.begin().await.unwrap();
    sqlx::query("insert into public.other (note) values ('holds slot creation up')")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut creator = Daemon::start(&binary(), &env, None);
    wait_until(
        "the slot being created",
        Duration::from_secs(30),
        || async { db.slot_active().await },
    )
    .await;
    creator.kill().await;

    let mut adopter = Daemon::start(&binary(), &env, None);
    // Let the adopter find the half-created slot (it waits for the session that
    // holds it), then let the creation finish.
    wait_until(
        "the adopter waiting for the slot",
        Duration::from_secs(30),
        || async { adopter.log().contains("another session") },
    )
    .await;
    blocker.commit().await.unwrap();
    wait_until("the adopter streaming", Duration::from_secs(30), || async {
        streaming(&db).await
    })
    .await;
    truth
        .start_writers(&db.test, 2, Duration::from_millis(10))
        .await;
    wait_until(
        "the adopter delivering",
        Duration::from_secs(30),
        || async { rabbit.distinct() >= 50 },
    )
    .await;
    // Before its first position record (status_interval_ms is 10 s).
    adopter.kill().await;
    db.wait_slot_inactive().await;
    let written = truth.committed();
    wait_until(
        "events committed while no relay runs",
        Duration::from_secs(30),
        || async { truth.committed() >= written + 100 },
    )
    .await;

    let mut third = Daemon::start(&binary(), &env, None);
    wait_until(
        "the third relay delivering",
        Duration::from_secs(30),
        || async { rabbit.distinct() >= written + 100 },
    )
    .await;
    truth.stop_writers().await;
    let delivery = truth.check(&rabbit, Duration::from_secs(60)).await;
    third.signal("TERM");
    assert!(third.wait(Duration::from_secs(30)).await.success());
    let log = third.log();
    assert!(
        !log.contains("slot lost") && !log.contains("slot was lost"),
        "the third relay took a healthy slot for lost:\n{}",
        third.log_tail()
    );
    println!(
        "slot killed while created: {} wal-message events, 0 missing, {} duplicates",
        delivery.committed, delivery.duplicates
    );
    db.cleanup().await;
}

/// Finding 3: kill -9 under steady writes, with the production default
/// `status_interval_ms` (10 s), three times at different points. Each restart
/// re-sends at most the in-flight window plus about a second of traffic.
/// (Before: the position was recorded every 10 s, and a restart re-sent up to
/// 10 s of traffic.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_resends_at_most_the_in_flight_window_and_a_second_of_traffic() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut truth = GroundTruth::new(&db.test, 40).await;
    let env = wal_env(&db, &rabbit.exchange);
    let mut daemon = Daemon::start(&binary(), &env, None);
    wait_until("streaming", Duration::from_secs(30), || async {
        streaming(&db).await
    })
    .await;
    let began = Instant::now();
    truth
        .start_writers(&db.test, 4, Duration::from_millis(10))
        .await;
    let kills = [2_500_u64, 4_000, 6_000];
    for run_ms in kills {
        tokio::time::sleep(Duration::from_millis(run_ms)).await; // the scenario: load for a while
        daemon.kill().await;
        db.wait_slot_inactive().await;
        daemon = Daemon::start(&binary(), &env, None);
    }
    truth.stop_writers().await;
    let rate = truth.committed() as f64 / began.elapsed().as_secs_f64();
    let delivery = truth.check(&rabbit, Duration::from_secs(60)).await;
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30)).await;
    let bound = kills.len() * (MAX_IN_FLIGHT_EVENTS + rate as usize);
    println!(
        "kill -9 x{} at {rate:.0} events/s: {} events, 0 missing, {} duplicates (bound {bound})",
        kills.len(),
        delivery.committed,
        delivery.duplicates
    );
    assert!(
        delivery.duplicates <= bound,
        "{} duplicates after {} kills, more than the in-flight window ({MAX_IN_FLIGHT_EVENTS}) plus a second \
         of traffic ({rate:.0}) per kill",
        delivery.duplicates,
        kills.len()
    );
    db.cleanup().await;
}

/// Finding 4: SIGTERM under steady writes and bursts, four times. Each stop exits 0 and
/// leaves no row of a delivered event, and nothing is ever delivered twice.
/// (Before: results of finished lanes still queued were not settled, so their
/// rows stayed and the next start sent them again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_leaves_no_delivered_row_and_sends_nothing_twice() {
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut truth = GroundTruth::new(&db.test, 40).await;
    let env = wal_env(&db, &rabbit.exchange);
    let mut daemon = Daemon::start(&binary(), &env, None);
    wait_until("streaming", Duration::from_secs(30), || async {
        streaming(&db).await
    })
    .await;
    truth
        .start_writers(&db.test, 4, Duration::from_millis(5))
        .await;
    for round in 1..=4 {
        // A burst of large transactions over every key: many lanes finish at once
        // while the stop begins.
        let before = rabbit.distinct();
        truth.backlog(2_000).await;
        wait_until("deliveries", Duration::from_secs(30), || async {
            rabbit.distinct() >= before + 1_500
        })
        .await;
        daemon.signal("TERM");
        let status = daemon.wait(Duration::from_secs(30)).await;
        assert!(status.success(), "round {round}: exit {status}");
        // Everything the relay published is in the queue by now; let the consumer see it.
        let published = rabbit.count();
        wait_until(
            "the consumer caught up",
            Duration::from_secs(10),
            || async {
                let count = rabbit.count();
                tokio::time::sleep(Duration::from_millis(300)).await;
                count == rabbit.count() && count >= published
            },
        )
        .await;
        let delivered: HashSet<String> = rabbit
            .received()
            .iter()
            .map(|m| m.message_id.clone())
            .collect();
        let left: Vec<uuid::Uuid> = outbox_event_ids(&db.test)
            .await
            .into_iter()
            .filter(|id| delivered.contains(&id.to_string()))
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: {} rows of delivered events left in the outbox after a clean stop (e.g. {:?})",
            left.len(),
            &left[..left.len().min(3)]
        );
        db.wait_slot_inactive().await;
        daemon = Daemon::start(&binary(), &env, None);
    }
    truth.stop_writers().await;
    let delivery = truth.check(&rabbit, Duration::from_secs(60)).await;
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).await.success());
    println!(
        "SIGTERM x4 under load: {} events, 0 missing, {} duplicates",
        delivery.committed, delivery.duplicates
    );
    assert_eq!(delivery.duplicates, 0, "a clean stop re-sends nothing");
    db.cleanup().await;
}

/// Finding 5: with the broker link hung (bytes held, connection open), SIGTERM
/// ends the daemon within `shutdown_grace_ms` plus a small fixed bound (3 s),
/// not grace + the broker's connect timeout (10 s here), for both sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_hung_broker_link_exits_within_the_grace_plus_a_fixed_bound() {
    const GRACE: Duration = Duration::from_secs(2);
    const FIXED_BOUND: Duration = Duration::from_secs(3);
    let db = WalDatabase::new().await;
    for source in ["wal", "polling"] {
        let rabbit = RabbitFixture::new().await;
        let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
            .await
            .unwrap();
        let mut env = if source == "wal" {
            wal_env(&db, &rabbit.exchange)
        } else {
            polling_env(&db.test, &rabbit.exchange)
        };
        set(
            &mut env,
            "RABBITMQ__URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()),
        );
        set(&mut env, "RABBITMQ__CONNECT_TIMEOUT_MS", "10000");
        set(&mut env, "RABBITMQ__PUBLISH_TIMEOUT_MS", "30000");
        set(
            &mut env,
            "PIPELINE__SHUTDOWN_GRACE_MS",
            GRACE.as_millis().to_string(),
        );
        let mut daemon = Daemon::start(&binary(), &env, None);
        let outbox = outbox_core::Outbox::new(outbox_core::OutboxConfig {
            schema: db.test.schema.clone(),
            ..Default::default()
        });
        let write = |n: usize| {
            let outbox = outbox.clone();
            let pool = db.test.pool.clone();
            async move {
                let events: Vec<outbox_core::Event> = (0..n)
                    .map(|i| {
                        outbox_core::Event::builder("item", format!("k{i}"), "item.changed")
                            .payload(&serde_json::json!({ "n": i }))
                            .build()
                            .unwrap()
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                outbox.enqueue_all(&mut tx, &events).await.unwrap();
                tx.commit().await.unwrap();
            }
        };
        if source == "wal" {
            wait_until("streaming", Duration::from_secs(30), || async {
                streaming(&db).await
            })
            .await;
        }
        write(20).await;
        rabbit.wait_for_distinct(20, Duration::from_secs(30)).await;
        proxy.stall();
        write(50).await;
        // Publishes are stuck on the held link now.
        tokio::time::sleep(Duration::from_millis(500)).await; // the scenario: the link hangs with publishes in flight
        let term = Instant::now();
        daemon.signal("TERM");
        daemon.wait(Duration::from_secs(60)).await;
        let took = term.elapsed();
        println!(
            "{source}: SIGTERM with a hung broker link: exited after {:.2} s (grace {:?})",
            took.as_secs_f64(),
            GRACE
        );
        assert!(
            took <= GRACE + FIXED_BOUND,
            "{source}: shutdown took {took:?}, more than the grace {GRACE:?} plus {FIXED_BOUND:?}; log:\n{}",
            daemon.log_tail()
        );
        proxy.restore();
        drop(proxy);
    }
    db.cleanup().await;
}

/// Heavy (scripts/test-heavy): a 100,000-event backlog (`OUTBOX_TEST_HEAVY_BACKLOG`)
/// whose table drain is interrupted 5 times at random points by SIGKILL,
/// SIGTERM or the relay's sessions terminated, while writers commit: every
/// event arrives, in per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: run by scripts/test-heavy"]
async fn heavy_backlog_drain_interrupted_five_times_at_random_delivers_everything() {
    let backlog: usize = std::env::var("OUTBOX_TEST_HEAVY_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let db = WalDatabase::new().await;
    let rabbit = RabbitFixture::new().await;
    let mut truth = GroundTruth::new(&db.test, 200).await;
    truth.backlog(backlog).await;
    let env = wal_env(&db, &rabbit.exchange);
    let began = Instant::now();
    truth
        .start_writers(&db.test, 2, Duration::from_millis(10))
        .await;
    let mut daemon = Daemon::start(&binary(), &env, None);
    let mut kinds = Vec::new();
    for _ in 0..5 {
        let before = rabbit.distinct();
        let step = rand::random_range(backlog / 50..backlog / 8);
        wait_until("drain progress", Duration::from_secs(300), || async {
            rabbit.distinct() >= before + step
        })
        .await;
        let kind = ["KILL", "TERM", "terminate-sessions"][rand::random_range(0..3)];
        kinds.push(format!("{kind}@{}", rabbit.distinct()));
        if kind == "terminate-sessions" {
            terminate_relay_sessions(&db).await;
        } else {
            daemon.signal(kind);
            daemon.wait(Duration::from_secs(60)).await;
            db.wait_slot_inactive().await;
            daemon = Daemon::start(&binary(), &env, None);
        }
    }
    let written = truth.committed();
    wait_until("the rest delivered", Duration::from_secs(600), || async {
        rabbit.distinct() >= written
    })
    .await;
    truth.stop_writers().await;
    let delivery = truth.check(&rabbit, Duration::from_secs(120)).await;
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(60)).await.success());
    println!(
        "heavy drain: {backlog} backlog + writers, interrupted by {kinds:?}: {} events in {:.1} s, 0 missing, \
         {} duplicates",
        delivery.committed,
        began.elapsed().as_secs_f64(),
        delivery.duplicates
    );
    db.cleanup().await;
}

/// Heavy (scripts/test-heavy): SIGKILL roulette per source and sink (10 runs with
/// RabbitMQ, 3 with Kafka) under 8 writers: each run the daemon lives a random
/// 0.5-3 s and is killed with SIGKILL, then started again at once; after each restart
/// the test waits until everything committed before the kill arrived (the time to
/// resume) and counts the duplicates of that kill. 0 lost, per-key order of first
/// deliveries, duplicates per kill within the window plus a second of traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: run by scripts/test-heavy"]
async fn heavy_sigkill_roulette_per_source_and_sink_loses_nothing() {
    for (source, sink, runs) in [
        ("wal", "rabbitmq", 10),
        ("polling", "rabbitmq", 10),
        ("wal", "kafka", 3),
        ("polling", "kafka", 3),
    ] {
        let db = WalDatabase::new().await;
        let rabbit = RabbitFixture::new().await;
        let mut env = if source == "wal" {
            wal_env(&db, &rabbit.exchange)
        } else {
            polling_env(&db.test, &rabbit.exchange)
        };
        let kafka = if sink == "kafka" {
            let topic = outbox_tests::kafka::create_topic(3).await;
            use_kafka(&mut env, &topic);
            Some(outbox_tests::kafka::TopicConsumer::start(&topic, 3))
        } else {
            None
        };
        let seen = || match &kafka {
            Some(consumer) => seen_on_kafka(&consumer.received()),
            None => seen_on_rabbitmq(&rabbit.received()),
        };
        let mut truth = GroundTruth::new(&db.test, 50).await;
        let began = Instant::now();
        truth
            .start_writers(&db.test, 8, Duration::from_millis(10))
            .await;
        let mut daemon = Daemon::start(&binary(), &env, None);
        let mut per_kill = Vec::new();
        let mut resume_secs = Vec::new();
        let mut duplicates_before = 0;
        for _ in 0..runs {
            // The scenario: a random run time before the kill.
            tokio::time::sleep(Duration::from_millis(rand::random_range(500..3_000))).await;
            daemon.kill().await;
            let committed_at_kill = truth.committed_ids().await;
            if source == "wal" {
                db.wait_slot_inactive().await;
            }
            let restarted = Instant::now();
            daemon = Daemon::start(&binary(), &env, None);
            let wanted: HashSet<String> =
                committed_at_kill.iter().map(ToString::to_string).collect();
            wait_until(
                "the events committed before the kill",
                Duration::from_secs(120),
                || {
                    let arrived: HashSet<String> = seen().into_iter().map(|m| m.event_id).collect();
                    let done = wanted.is_subset(&arrived);
                    async move { done }
                },
            )
            .await;
            resume_secs.push(restarted.elapsed().as_secs_f64());
            let received = seen();
            let distinct = received
                .iter()
                .map(|m| m.event_id.as_str())
                .collect::<HashSet<_>>()
                .len();
            let duplicates = received.len() - distinct;
            per_kill.push(duplicates - duplicates_before);
            duplicates_before = duplicates;
        }
        truth.stop_writers().await;
        let rate = truth.committed() as f64 / began.elapsed().as_secs_f64();
        let delivery = truth.check_seen(seen, Duration::from_secs(120)).await;
        daemon.signal("TERM");
        assert!(daemon.wait(Duration::from_secs(60)).await.success());
        per_kill.sort_unstable();
        resume_secs.sort_by(f64::total_cmp);
        println!(
            "SIGKILL roulette, {source} -> {sink}: {runs} kills under 8 writers at {rate:.0} events/s: \
             {} events, 0 missing, 0 order violations, {} duplicates (per kill: median {}, max {}); \
             resumed (everything before the kill delivered) in median {:.2} s, max {:.2} s",
            delivery.committed,
            delivery.duplicates,
            per_kill[per_kill.len() / 2],
            per_kill[per_kill.len() - 1],
            resume_secs[resume_secs.len() / 2],
            resume_secs[resume_secs.len() - 1],
        );
        for duplicates in &per_kill {
            assert!(
                *duplicates <= MAX_IN_FLIGHT_EVENTS + rate as usize,
                "{duplicates} duplicates after one kill: more than the window plus a second"
            );
        }
        db.cleanup().await;
    }
}
